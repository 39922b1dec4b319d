"""Padding-free ("packed") forward pass of BERT/RoBERTa encoders for training.

A training batch of wiki sentences cut at 32 tokens is about one third padding, and the HF forward
computes every linear layer, layer norm, GELU and dropout on the pad positions too. Here the
tokens of all rows are packed into one ``(T, H)`` matrix (``T`` = real tokens) for everything
that acts per token; only the attention product itself is computed on the padded ``(B, L)`` layout
(with the same key mask as HF), which is cheap at these lengths. The backbone's own modules and
weights are used (nothing is copied), so checkpoints, the optimizer and the export are unchanged.

Equivalence: on every real position the outputs equal HF's forward up to float rounding (tested,
and checked on the live model before training uses it). With dropout on, the masks are drawn from
the same distribution but over fewer positions, so the random stream differs from HF's: runs are
reproducible with themselves, not bit-identical to ``packed: false``. Pad positions of the returned
``last_hidden_state`` are zero (HF leaves values there that every pooler masks out).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Tolerance of the live check against HF's forward (fp32, max abs difference / max abs value).
CHECK_RTOL = 1e-4


class _Pack(torch.autograd.Function):
    """Rows ``index`` of ``x`` (N, C) -> (T, C); the backward writes the gradient back with a copy
    (indices are unique), cheaper than the scatter-add that ``index_select``'s backward runs."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_copy_(0, index, grad), None


class _Unpack(torch.autograd.Function):
    """(T, C) -> (N, C) with zeros on the rows not in ``index``; the backward is a gather."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, rows: int) -> Tensor:
        ctx.save_for_backward(index)
        return x.new_zeros(rows, x.shape[1]).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def unsupported_reason(backbone: nn.Module) -> str | None:
    """Why ``backbone`` cannot use the packed forward, or None when it can.

    Supported: encoder-only BERT-style stacks (BERT, RoBERTa, MiniLM, ...) with absolute position
    embeddings: ``embeddings``, ``encoder.layer[i].{attention.self.{query,key,value},
    attention.output, intermediate, output}`` as in ``transformers``' BERT family.
    """
    cfg = getattr(backbone, "config", None)
    if cfg is None:
        return "the backbone has no config"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "decoder / cross-attention models are not supported"
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={cfg.position_embedding_type!r} (only 'absolute')"
    if getattr(cfg, "chunk_size_feed_forward", 0):
        return "chunked feed-forward is not supported"
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if getattr(backbone, "embeddings", None) is None or not layers:
        return f"{type(backbone).__name__} does not have the BERT module layout (embeddings, encoder.layer)"
    for layer in layers:
        att = getattr(layer, "attention", None)
        sa = getattr(att, "self", None)
        if not all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value")):
            return f"{type(backbone).__name__} does not have the BERT attention layout (attention.self.query/key/value)"
        if any(getattr(sa, n).bias is None for n in ("query", "key", "value")):
            return "attention projections without bias are not supported"
        if not all(hasattr(sa, n) for n in ("num_attention_heads", "attention_head_size", "dropout")):
            return f"{type(sa).__name__} lacks num_attention_heads/attention_head_size/dropout"
        for part in (getattr(att, "output", None), getattr(layer, "intermediate", None), getattr(layer, "output", None)):
            if part is None:
                return f"{type(layer).__name__} does not have the BERT layer layout (attention.output, intermediate, output)"
    return None


def _attention(sa: nn.Module, h: Tensor, index: Tensor | None, batch: int, length: int, key_mask: Tensor) -> Tensor:
    """Self-attention of one layer: packed (T, H) in, packed (T, H) out."""
    heads, head_dim = sa.num_attention_heads, sa.attention_head_size
    width = heads * head_dim
    # One (T, H) x (H, 3H) product instead of three (the concatenated weights are tiny next to T x H).
    weight = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
    bias = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
    qkv = F.linear(h, weight, bias)
    if index is not None:
        qkv = _Unpack.apply(qkv, index, batch * length)
    qkv = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, L, d)
    scale = getattr(sa, "scaling", head_dim ** -0.5)
    p = sa.dropout.p if sa.training else 0.0
    ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=key_mask, dropout_p=p, scale=scale)
    ctx = ctx.transpose(1, 2).reshape(batch * length, width)
    return ctx if index is None else _Pack.apply(ctx, index)


def token_index(attention_mask: Tensor) -> Tensor:
    """Flat positions of the real tokens of a (B, L) mask: what ``packed_forward`` packs.

    The data loader computes it on the CPU (``clusterns.train.make_collate``), so the forward does
    not have to read the mask back from the GPU (a host sync) to learn how many tokens there are.
    """
    return attention_mask.reshape(-1).nonzero().squeeze(1)


def packed_forward(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   token_type_ids: Tensor | None = None, output_hidden_states: bool = False,
                   index: Tensor | None = None):
    """HF-style output (``last_hidden_state``, ``pooler_output``, ``hidden_states``) of a packed pass.

    Rows must be right- or left-padded with ``attention_mask`` 0 on pads and at least one real token.
    ``index``: ``token_index(attention_mask)`` if already known (no host sync then); computed here
    otherwise.
    """
    batch, length = input_ids.shape
    kwargs = {"input_ids": input_ids}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    emb = backbone.embeddings(**kwargs)  # (B, L, H); RoBERTa's position ids come from input_ids here
    hidden = emb.shape[-1]
    if index is None:
        index = token_index(attention_mask)
    if index.numel() == batch * length:  # no padding at all: skip the gather/scatter, keep the fused projections
        index = None
    h = emb.reshape(batch * length, hidden)
    if index is not None:
        h = _Pack.apply(h, index)
    key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): which keys every query may attend

    def unpack(x: Tensor) -> Tensor:
        if index is None:
            return x.view(batch, length, hidden)
        return _Unpack.apply(x, index, batch * length).view(batch, length, hidden)

    states = [unpack(h)] if output_hidden_states else None
    for layer in backbone.encoder.layer:
        ctx = _attention(layer.attention.self, h, index, batch, length, key_mask)
        a = layer.attention.output(ctx, h)  # dense, dropout, LayerNorm(x + residual): per token
        h = layer.output(layer.intermediate(a), a)
        if states is not None:
            states.append(unpack(h))
    last = states[-1] if states is not None else unpack(h)
    pooler = getattr(backbone, "pooler", None)
    return SimpleNamespace(last_hidden_state=last, pooler_output=pooler(last) if pooler is not None else None,
                           hidden_states=tuple(states) if states is not None else None)


@torch.no_grad()
def check_against_hf(backbone: nn.Module, rtol: float = CHECK_RTOL) -> float:
    """Max relative difference between the packed and HF forward on a small ragged batch (eval mode).

    Raises ``RuntimeError`` above ``rtol``: the live guard that the module layout this file relies
    on still computes what ``transformers`` computes (a newer version could change it).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        cfg = backbone.config
        vocab = int(cfg.vocab_size)
        pad = getattr(cfg, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        gen = torch.Generator().manual_seed(0)
        length = min(12, int(getattr(cfg, "max_position_embeddings", 512)) - 4)
        ids = torch.randint(pad + 3, vocab, (3, length), generator=gen)  # never the pad id
        mask = torch.ones_like(ids)
        for row, n in enumerate((length, length // 2, 2)):
            mask[row, n:] = 0
            ids[row, n:] = pad
        ids, mask = ids.to(device), mask.to(device)
        ref = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        got = packed_forward(backbone, ids, mask, output_hidden_states=True)
        keep = mask.bool()
        pairs = [(r[keep], g[keep]) for r, g in zip(ref.hidden_states, got.hidden_states)]
        if ref.pooler_output is not None and got.pooler_output is not None:
            pairs.append((ref.pooler_output, got.pooler_output))
        worst = max(float((r.float() - g.float()).abs().max() / r.float().abs().max().clamp_min(1e-12))
                    for r, g in pairs)
    finally:
        backbone.train(was_training)
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        rtol = max(rtol, 1e-2)  # TF32 matmuls (enabled by the user) round both forwards at ~1e-3
    if not worst <= rtol:
        raise RuntimeError(f"the packed forward differs from {type(backbone).__name__}'s own forward "
                           f"(max relative difference {worst:.2e} > {rtol:.0e}); set training.packed: false")
    return worst
