"""Backbone + pooling + the training-only MLP head (SimCSE's ``mlp_only_train``).

The same pooling code serves training (``SentenceEncoder``) and evaluation (``pool``), so the
embedding the evaluator scores is by construction the one the model was trained to produce.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from clusterns import poolers
from clusterns.poolers import HF_POOLERS as POOLERS  # noqa: F401 (the training poolers, for callers)
from clusterns.poolers import needs_hidden_states



def _masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def pool(pooler: str, outputs, attention_mask: Tensor) -> Tensor:
    """Sentence embedding from a HF backbone output, exactly as SimCSE's evaluation poolers.

    ``cls`` is the backbone's own pooler output (dense + tanh over [CLS]); ``cls_before_pooler``
    is the last-layer [CLS] state; ``avg`` the masked mean of the last layer; ``avg_first_last``
    the masked mean of (first transformer layer + last layer) / 2 (``hidden_states[1]``, as in
    SimCSE's model code; ``hidden_states[0]`` would be the embedding layer); ``avg_top2`` the
    masked mean of the last two layers.
    """
    last = outputs.last_hidden_state
    if pooler == "cls":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise ValueError(
                "pooler 'cls' needs a backbone with a pooling layer (pooler_output is None); "
                "use 'cls_before_pooler' for models saved without one"
            )
        return pooled
    if pooler == "cls_before_pooler":
        return last[:, 0]
    if pooler == "avg":
        return _masked_mean(last, attention_mask)
    hidden_states = outputs.hidden_states
    if hidden_states is None:
        raise ValueError(f"pooler {pooler!r} needs output_hidden_states=True")
    if pooler == "avg_first_last":
        return _masked_mean((hidden_states[1] + hidden_states[-1]) / 2.0, attention_mask)
    if pooler == "avg_top2":
        return _masked_mean((hidden_states[-2] + hidden_states[-1]) / 2.0, attention_mask)
    raise ValueError(f"unknown pooler {pooler!r}; choose one of {', '.join(poolers.HF_POOLERS)}")


class MLPHead(nn.Module):
    """SimCSE's training-only projection: one H x H linear layer followed by tanh."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.dense(x))


class SentenceEncoder(nn.Module):
    """A HF encoder with a pooler; with ``pooler='cls'`` an MLP is applied in training only.

    In training, ``cls`` means [CLS] -> MLP (SimCSE's unsupervised recipe); the backbone's own
    pooling layer is never used. At evaluation the MLP is dropped and the embedding is
    ``eval_pooler`` (``cls_before_pooler`` for the paper's models).
    """

    def __init__(self, backbone: nn.Module, pooler: str = "cls", eval_pooler: str | None = None,
                 packed: bool = False) -> None:
        super().__init__()
        poolers.check(pooler, poolers.HF_POOLERS)
        self.backbone = backbone
        # Training forward without pad positions (clusterns.model.packed); evaluation always uses HF's own.
        self.packed = packed
        self.pooler = pooler
        self.eval_pooler = poolers.check(eval_pooler or poolers.default_eval_pooler(pooler), poolers.HF_POOLERS)
        self.mlp = MLPHead(backbone.config.hidden_size) if pooler == "cls" else None

    def _backbone(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None, pooler: str,
                  token_index: Tensor | None = None):
        if self.packed and self.training:
            from clusterns.model.packed import packed_forward

            return packed_forward(self.backbone, input_ids, attention_mask, token_type_ids,
                                  output_hidden_states=needs_hidden_states(pooler), index=token_index)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.backbone(**kwargs, output_hidden_states=needs_hidden_states(pooler), return_dict=True)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                token_index: Tensor | None = None) -> Tensor:
        """Training embedding (``self.training``) or evaluation embedding (``eval()`` mode).

        ``token_index``: flat positions of the real tokens (``clusterns.model.packed.token_index``), used
        by the packed training forward when given.
        """
        if self.training:
            if self.pooler == "cls":
                out = self._backbone(input_ids, attention_mask, token_type_ids, "cls_before_pooler", token_index)
                return self.mlp(out.last_hidden_state[:, 0])
            out = self._backbone(input_ids, attention_mask, token_type_ids, self.pooler, token_index)
            return pool(self.pooler, out, attention_mask)
        out = self._backbone(input_ids, attention_mask, token_type_ids, self.eval_pooler)
        return pool(self.eval_pooler, out, attention_mask)

    def encode_views(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                     token_index: Tensor | None = None):
        """Two dropout views of a batch in one forward pass of 2B rows; returns ``(z1, z2)``."""
        b = input_ids.shape[0]
        z = self(*duplicate_views(input_ids, attention_mask, token_type_ids, token_index))
        return z[:b], z[b:]


def duplicate_views(input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                    token_index: Tensor | None = None):
    """The 2B-row inputs of two views: every row twice (rows 0..B-1, then again), the real-token
    index shifted by B * L for the second copy."""
    dup = lambda t: None if t is None else torch.cat([t, t], dim=0)  # noqa: E731
    if token_index is not None:
        token_index = torch.cat([token_index, token_index + input_ids.numel()])
    return dup(input_ids), dup(attention_mask), dup(token_type_ids), token_index


def load_backbone(path: str | Path, dropout: float | None = None, attn_implementation: str | None = "sdpa"):
    """Load a HF encoder (``AutoModel``) from a local folder, optionally overriding dropout.

    ``dropout`` sets both hidden and attention dropout (SimCSE's default is the backbone's 0.1).
    """
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no model at {path} (config.json missing); fetch the backbone first "
            "(snakemake resources/models/...) or give a folder saved with save_pretrained"
        )
    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModel.from_pretrained(path, config=config, **kwargs)
    except (ValueError, ImportError):
        # Older architectures without SDPA support fall back to the eager implementation.
        return AutoModel.from_pretrained(path, config=config)


def input_limit(backbone, tokenizer) -> int:
    """The longest input the backbone takes (its position table, RoBERTa's two reserved rows
    aside), so that sentence-transformers never cuts a sentence our evaluator embeds whole."""
    positions = int(getattr(backbone.config, "max_position_embeddings", 512))
    if getattr(backbone.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        positions -= int(backbone.config.pad_token_id) + 1
    declared = getattr(tokenizer, "model_max_length", None)
    return min(positions, int(declared)) if isinstance(declared, int) and declared < 10**6 else positions


def check_fits(longest: int, backbone, tokenizer, fix: str) -> None:
    """Refuse, before anything is encoded, an input of ``longest`` tokens that the backbone's
    position table cannot hold (it would fail deep inside the model with an index error)."""
    limit = input_limit(backbone, tokenizer)
    if longest > limit:
        raise ValueError(f"an input of {longest} tokens does not fit the backbone, which takes at most {limit}; {fix}")
