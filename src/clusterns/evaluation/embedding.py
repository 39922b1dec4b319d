"""The embedding runtime: the only code that turns a model, a pooler, a dtype, a device and a
batch size into ``embed(texts) -> np.ndarray``.

Every evaluator (STS, transfer, clustering), the training-time dev selection and the benchmarks
embed through :class:`Embedder`: each distinct text is encoded once, texts are sorted by
tokenised length into batches (minimal padding, the longest first so that memory errors come
early), the model runs in eval mode under ``torch.inference_mode`` (no gradient, dropout off;
the model's mode is restored afterwards) and, on CUDA, under bf16/fp16 autocast when asked.
Rows come back float32, on the CPU, in input order.

How a batch becomes vectors is a *batch encoder*: :class:`PoolerEncoder` for the HF poolers
(``cls``, ``cls_before_pooler``, ``avg``, ...), :class:`clusterns.model.prompt.MaskEncoder` for
the prompt [MASK] pooler. :func:`embedder` picks one from the pooler name (the one place where a
pooler name becomes code).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from clusterns import poolers
from clusterns.config import EVALUATION_DEFAULTS, PROMPT_DEFAULTS
from clusterns.model.encoder import check_fits, pool

__all__ = ["DTYPES", "DEVICES", "BatchEncoder", "PoolerEncoder", "Embedder", "embedder", "prompt_embedder",
           "resolve_device", "check_dtype", "effective_dtype", "autocast", "length_batches", "model_device"]

DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(device: str | None) -> str:
    """``cuda`` when available unless told otherwise; refuse ``cuda`` without a GPU."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available; use --device cpu")
    return device


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def effective_dtype(device, dtype: str) -> str:
    """The precision actually used: reduced precision only on CUDA."""
    return check_dtype(dtype) if torch.device(device).type == "cuda" else "fp32"


def autocast(device, dtype: str):
    """bf16/fp16 autocast on CUDA; fp32 (no autocast) otherwise."""
    if effective_dtype(device, dtype) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (minimal padding; OOM early)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------
# Batch encoders


class BatchEncoder(Protocol):
    """How one kind of pooler turns texts into vectors, one batch at a time.

    ``model`` is the module whose train/eval mode the runtime switches; ``prepare`` turns the
    distinct texts into items and their token counts (the batching key); ``setup`` runs once per
    call before the first batch (inside no-grad and autocast); ``encode`` embeds a batch of
    items on ``device`` as a (b, hidden_size) tensor.
    """

    model: Any
    hidden_size: int

    def prepare(self, texts: list[str]) -> tuple[list, list[int]]: ...

    def setup(self, lengths: list[int], device: torch.device) -> None: ...

    def encode(self, items: list, device: torch.device) -> Tensor: ...


class PoolerEncoder:
    """A HF backbone and one of the HF poolers: batch-padded, tokenised without truncation unless
    ``max_length`` is given (the clustering protocol cuts at 128 tokens)."""

    def __init__(self, model, tokenizer, pooler: str, max_length: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.pooler = poolers.check(pooler, poolers.HF_POOLERS)
        self.hidden_size = model.config.hidden_size
        self.cut = {} if max_length is None else {"truncation": True, "max_length": int(max_length)}

    def prepare(self, texts: list[str]) -> tuple[list, list[int]]:
        return texts, [len(ids) for ids in self.tokenizer(texts, **self.cut)["input_ids"]]

    def setup(self, lengths: list[int], device: torch.device) -> None:
        check_fits(max(lengths, default=0), self.model, self.tokenizer,
                   "cut the text (the clustering stage's max_length) or use a backbone with more positions")

    def encode(self, items: list, device: torch.device) -> Tensor:
        enc = self.tokenizer(items, padding=True, return_tensors="pt", **self.cut)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = self.model(**enc, output_hidden_states=poolers.needs_hidden_states(self.pooler), return_dict=True)
        return pool(self.pooler, out, enc["attention_mask"])


# ---------------------------------------------------------------------------------------------
# The runtime


class Embedder:
    """``embed(texts) -> np.ndarray`` (n, D) float32 for a :class:`BatchEncoder` (see the module doc)."""

    def __init__(self, encoder: BatchEncoder, *, batch_size: int = EVALUATION_DEFAULTS["batch_size"],
                 device=None, dtype: str = EVALUATION_DEFAULTS["dtype"], progress: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.encoder, self.batch_size, self.progress = encoder, int(batch_size), progress
        self.device = torch.device(device) if device is not None else model_device(encoder.model)
        self.dtype = effective_dtype(self.device, dtype)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        distinct = list(dict.fromkeys(texts))
        if not distinct:
            return np.zeros((0, self.encoder.hidden_size), dtype=np.float32)
        items, lengths = self.encoder.prepare(distinct)
        batches = length_batches(lengths, self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encoding", unit="batch", file=sys.stderr)
        out = torch.empty(len(distinct), self.encoder.hidden_size, dtype=torch.float32)
        model = self.encoder.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), autocast(self.device, self.dtype):
                self.encoder.setup(lengths, self.device)
                for idx in batches:
                    out[torch.tensor(idx)] = self.encoder.encode([items[i] for i in idx], self.device).float().cpu()
        finally:
            model.train(was_training)
        emb = out.numpy()
        if len(distinct) == len(texts):
            return emb
        row = {t: i for i, t in enumerate(distinct)}
        return emb[[row[t] for t in texts]]


def embedder(model, tokenizer, pooler: str, *, prompt: dict | None = None, protocol: str | None = None,
             batch_size: int = EVALUATION_DEFAULTS["batch_size"], device=None,
             dtype: str = EVALUATION_DEFAULTS["dtype"], progress: bool = False,
             max_length: int | None = None) -> Embedder:
    """The :class:`Embedder` of a loaded model for ``pooler``.

    The prompt pooler embeds with ``prompt`` (a ``clusterns_prompt.json`` content, see
    :func:`clusterns.model.prompt.prompt_config`; default: the model family's template pair) and
    its stored test protocol, or ``protocol`` when given; its template is never cut, so
    ``max_length`` cuts the input of the HF poolers, and the *sentence* tokens of the prompt
    pooler (its template is never cut).
    """
    poolers.check(pooler)
    runtime = {"batch_size": batch_size, "device": device, "dtype": dtype, "progress": progress}
    if not poolers.is_prompt(pooler):
        return Embedder(PoolerEncoder(model, tokenizer, pooler, max_length), **runtime)
    from clusterns.model.prompt import MaskEncoder

    return Embedder(MaskEncoder.from_config(model, tokenizer, prompt, protocol, max_length=max_length), **runtime)


def prompt_embedder(backbone, tokenizer, template, protocol: str = "raw", *,
                    delta_rows: int = PROMPT_DEFAULTS["eval_delta_rows"],
                    roberta_position_offset: str = PROMPT_DEFAULTS["roberta_position_offset"],
                    **runtime) -> Embedder:
    """An :class:`Embedder` at template 1's [MASK] with an explicit template (a
    :class:`~clusterns.model.prompt.Template`, a template string or a family name) and protocol."""
    from clusterns.model.prompt import MaskEncoder

    return Embedder(MaskEncoder(backbone, tokenizer, template, protocol, delta_rows=delta_rows,
                                roberta_position_offset=roberta_position_offset), **runtime)
