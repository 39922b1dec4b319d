"""The contract every evaluator shares, so that each evaluator module holds only its task.

* :func:`load_model` turns a model folder into a :class:`LoadedModel`: the pooler (given, or the
  one the folder declares, :func:`clusterns.poolers.read_model_pooler`), its prompt template for
  the [MASK] pooler, the backbone and tokenizer on the device, the effective dtype; validated
  once, here.
* :meth:`LoadedModel.embedder` is its one embedding function (:mod:`clusterns.evaluation.embedding`).
* :func:`provenance` is the block of facts every result file carries (model, pooler, data and
  its checksums, batch, device, dtype, prompt, library versions).
* :func:`model_parser` and :func:`run_cli` are the command line every evaluator offers (the
  same model options; user errors print ``error: ...`` and exit 1 with nothing written; the
  result is written atomically as strict JSON).
* :func:`read_data_file`, :func:`text_lines`, :func:`as_matrix` and :func:`json_safe` are the
  small helpers of the evaluators' loaders and scorers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from clusterns import poolers
from clusterns.config import EVALUATION_DEFAULTS
from clusterns.evaluation.embedding import (DEVICES, DTYPES, Embedder, check_dtype, effective_dtype, embedder,
                                            resolve_device)

__all__ = ["DataError", "UsageError", "Parser", "LoadedModel", "resolve_pooler", "load_model", "provenance", "model_parser", "run_cli",
           "read_data_file", "text_lines", "as_matrix", "json_safe"]

PROMPT_PROTOCOLS = ("raw", "denoised", "spliced")  # clusterns.model.prompt.PROTOCOLS, for the CLI (torch-free)


class DataError(Exception):
    """An evaluator's data is missing, malformed or not the expected data; the message names the fix."""


class UsageError(Exception):
    """A command-line mistake (reported like every other user error: exit 1, nothing written)."""


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class LoadedModel:
    """A model folder ready to embed: backbone and tokenizer on ``device``, its evaluation
    ``pooler`` and, for the prompt pooler, its ``prompt`` config (``clusterns_prompt.json``)."""

    path: Path
    model: Any
    tokenizer: Any
    pooler: str
    prompt: dict | None
    device: str
    dtype: str  # effective: fp32 on the CPU whatever was asked

    def embedder(self, protocol: str | None = None, *, batch_size: int = EVALUATION_DEFAULTS["batch_size"],
                 progress: bool = False, max_length: int | None = None) -> Embedder:
        """The model's embedding function; ``protocol`` overrides a prompt model's test protocol,
        ``max_length`` cuts the input of the HF poolers."""
        return embedder(self.model, self.tokenizer, self.pooler, prompt=self.prompt, protocol=protocol,
                        batch_size=batch_size, device=self.device, dtype=self.dtype, progress=progress,
                        max_length=max_length)

    def prompt_for(self, protocol: str | None) -> dict | None:
        """The prompt config an embedder with ``protocol`` uses (what the result file records)."""
        if self.prompt is None:
            return None
        return {**self.prompt, "protocol": protocol or self.prompt["protocol"]}


def resolve_pooler(path: str | Path, pooler: str | None) -> str:
    """``pooler`` checked, or the one the model folder declares when it is None."""
    if pooler is None:
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"no model folder at {path}")
        pooler = poolers.read_model_pooler(path)
        if pooler is None:
            raise ValueError(f"{path} does not say how to pool it (no {poolers.POOLER_FILE}): pass --pooler, "
                             f"one of {', '.join(poolers.EVAL_POOLERS)}")
    return poolers.check(pooler)


def load_model(path: str | Path, pooler: str | None = None, *, device: str | None = None,
               dtype: str = EVALUATION_DEFAULTS["dtype"]) -> LoadedModel:
    """Load a HF model folder for evaluation (see the module doc); ``pooler`` None = the one the
    folder declares (``clusterns_pooler.json``, or ``mask`` with a ``clusterns_prompt.json``)."""
    from transformers import AutoTokenizer

    from clusterns.model.encoder import load_backbone
    from clusterns.model.prompt import TEMPLATES, detect_family, load_prompt_config, prompt_config

    path = Path(path)
    pooler = resolve_pooler(path, pooler)
    check_dtype(dtype)
    device = resolve_device(device)
    model = load_backbone(path).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = None
    if poolers.is_prompt(pooler):  # the folder's template, else the family's pair (released checkpoints)
        prompt = load_prompt_config(path)
        if prompt is None:
            family = detect_family(path)
            prompt = prompt_config(family, TEMPLATES[family])
    return LoadedModel(path, model, tokenizer, pooler, prompt, device, effective_dtype(device, dtype))


def provenance(loaded: LoadedModel, *, data_key: str, data_dir: str | Path, files: dict[str, str],
               batch_size: int, prompt: dict | None = None) -> dict:
    """The facts every result file records about how it was computed."""
    from clusterns.utils.provenance import environment

    return {
        "model": str(loaded.path.resolve()),
        "pooler": loaded.pooler,
        data_key: str(Path(data_dir).resolve()),
        "files_sha256": files,
        "batch_size": batch_size,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "prompt": prompt,
        "environment": environment(),
    }


# ---------------------------------------------------------------------------------------------
# The command line


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors raise :class:`UsageError` (exit 1 like every user error)."""

    def error(self, message):  # argparse hook: usage errors are user errors like the others (exit 1)
        raise UsageError(message)


def model_parser(prog: str, description: str, pooler_default: str | None = None) -> argparse.ArgumentParser:
    """A parser with the options of every evaluator: the model, how to embed it, the output.
    ``pooler_default`` describes what an omitted ``--pooler`` means (default: the model's own)."""
    p = Parser(prog=prog, description=description)
    p.add_argument("--model", required=True, help="HF model folder (AutoModel/AutoTokenizer)")
    p.add_argument("--pooler", default=None,
                   help=f"one of {', '.join(poolers.EVAL_POOLERS)}; default: "
                        + (pooler_default or f"the pooler the model folder declares ({poolers.POOLER_FILE}), "
                                             "needed for hub models"))
    p.add_argument("--prompt-protocol", choices=PROMPT_PROTOCOLS, default=None,
                   help="mask pooler: embedding protocol (default: the model's clusterns_prompt.json, else raw)")
    p.add_argument("--output", required=True, help="result JSON (written atomically)")
    p.add_argument("--batch-size", type=int, default=EVALUATION_DEFAULTS["batch_size"], help="encoding batch size")
    p.add_argument("--device", choices=DEVICES, default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=DTYPES, default=EVALUATION_DEFAULTS["dtype"],
                   help="bf16/fp16 autocast for encoding, CUDA only")
    return p


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None, evaluate: Callable[[argparse.Namespace], dict],
            summary: Callable[[dict, argparse.Namespace], str]) -> int:
    """Parse, evaluate, write ``--output`` atomically (strict JSON), print ``summary``; any user
    error (usage, data, value, file) prints ``error: ...`` and returns 1 with nothing written."""
    from clusterns.utils.files import write_json_atomic

    try:
        args = parser.parse_args(argv)
        if args.dtype != "fp32" and resolve_device(args.device) == "cpu":
            print(f"note: --dtype {args.dtype} applies on CUDA only; encoding in fp32 on CPU", file=sys.stderr)
        results = evaluate(args)
        write_json_atomic(args.output, json_safe(results))
    except (UsageError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(results, args))
    return 0


# ---------------------------------------------------------------------------------------------
# Helpers of the evaluators


def read_data_file(root: Path, rel: str, what: str, files: dict[str, str], fix: str,
                   encoding: str = "utf-8", error: type[DataError] = DataError) -> str:
    """The text of ``root / rel``, recording the sha256 of the exact bytes read in ``files``;
    a missing or undecodable file raises ``error`` naming ``what`` and the ``fix``."""
    path = root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what}: missing file {rel} in {root}; {fix}") from None
    files[rel] = hashlib.sha256(data).hexdigest()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise error(f"{what}: {rel} in {root} is not valid {encoding.upper() if encoding == 'utf-8' else encoding} "
                    f"({e}); {fix}") from None


def text_lines(text: str) -> list[str]:
    """Lines as Python iterates over a file opened in text mode (universal newlines)."""
    return list(io.StringIO(text, newline=None))


def as_matrix(emb, n: int) -> np.ndarray:
    """An embedder's output as an (n, D) float32 array."""
    if hasattr(emb, "detach"):
        emb = emb.detach().float().cpu().numpy()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embed returned shape {emb.shape}; expected ({n}, D), one row per sentence")
    return emb


def json_safe(obj):
    """Non-finite floats become null so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
