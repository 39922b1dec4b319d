"""Contrastive losses of ClusterNS (docs/method.md steps 1, 4e, 4f): InfoNCE with optional
centroid hard negatives, and the bidirectional margin loss (BML) on raw cosines.

Precision: every cosine here is computed in float32 (float64 stays float64) with autocast
disabled, whatever the input dtype, so bf16/fp16 encoder outputs do not round the B x B
similarity matrix or the logits. Gradients flow back into the inputs in their own dtype.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_matrix", "info_nce", "bml_loss", "compute_dtype", "no_autocast"]

# Norm floor of F.normalize: a zero vector gets cosine 0 with everything instead of NaN.
_NORM_EPS = 1e-8


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (low-precision inputs are upcast)."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


@contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Disable autocast for ``device_type`` inside the block (no-op where autocast is unknown)."""
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        ctx = nullcontext()
    with ctx:
        yield


def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D tensor [B, D], got {shape}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_pair(z1: Tensor, z2: Tensor) -> None:
    _check_2d("z1", z1)
    _check_2d("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] == 0:
        raise ValueError("empty batch: z1 and z2 have no rows")


def _check_temp(temp: float) -> None:
    if isinstance(temp, bool) or not (isinstance(temp, numbers.Real) and math.isfinite(temp) and temp > 0):
        raise ValueError(f"temp must be a finite number > 0, got {temp!r}")


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """All-pairs cosine similarity ``cos(a_i, b_j)`` as an [A, B'] matrix, in float32 (float64
    for float64 inputs) with autocast off; ``b`` is moved to ``a``'s device. Differentiable."""
    dtype = compute_dtype(a, b)
    with no_autocast(a.device.type):
        an = F.normalize(a.to(dtype), dim=-1, eps=_NORM_EPS)
        bn = F.normalize(b.to(device=a.device, dtype=dtype), dim=-1, eps=_NORM_EPS)
        return an @ bn.transpose(0, 1)


def info_nce_from_cos(cos: Tensor, temp: float, hard_cos: Tensor | None = None,
                      hard_negative_weight: float = 0.0) -> Tensor:
    """InfoNCE from precomputed cosines: ``cos`` [B, B] (z1 rows x z2 columns) and optionally
    ``hard_cos`` [B, B] = cos(z1_i, h_j). Shared by :func:`info_nce` and the objective."""
    logits = cos / temp
    if hard_cos is not None:
        hard_logits = hard_cos / temp
        if hard_negative_weight != 0.0:
            eye = torch.eye(hard_logits.shape[0], hard_logits.shape[1], dtype=hard_logits.dtype,
                            device=hard_logits.device)
            hard_logits = hard_logits + hard_negative_weight * eye
        logits = torch.cat([logits, hard_logits], dim=1)
    labels = torch.arange(logits.shape[0], device=logits.device)
    with no_autocast(logits.device.type):
        return F.cross_entropy(logits, labels)


def info_nce(z1: Tensor, z2: Tensor, temp: float, hard_negatives: Tensor | None = None,
             hard_negative_weight: float = 0.0) -> Tensor:
    """Unsupervised SimCSE InfoNCE, optionally with one hard negative per sample.

    Logits ``S_ij = cos(z1_i, z2_j) / temp`` (B x B, positives on the diagonal). With
    ``hard_negatives`` h ([B, D]) the logits become ``[S | cos(z1_i, h_j) / temp]`` (B x 2B:
    every sample's hard negative is a negative for every row) and ``hard_negative_weight`` is
    added to the diagonal of the second block (supervised SimCSE's convention; 0 = plain).
    Returns the mean cross-entropy with labels ``arange(B)`` as a float32 (float64) scalar.
    """
    _check_pair(z1, z2)
    _check_temp(temp)
    if isinstance(hard_negative_weight, bool) or not isinstance(hard_negative_weight, numbers.Real) \
            or not math.isfinite(hard_negative_weight):
        raise ValueError(f"hard_negative_weight must be finite, got {hard_negative_weight!r}")
    hard_cos = None
    if hard_negatives is not None:
        _check_2d("hard_negatives", hard_negatives)
        if hard_negatives.shape != z1.shape:
            raise ValueError(f"hard_negatives must have the shape of z1 {tuple(z1.shape)} (one per sample), "
                             f"got {tuple(hard_negatives.shape)}")
        hard_cos = cosine_matrix(z1, hard_negatives)
    elif hard_negative_weight != 0.0:
        raise ValueError("hard_negative_weight is set but no hard_negatives were given")
    return info_nce_from_cos(cosine_matrix(z1, z2), float(temp), hard_cos, float(hard_negative_weight))


def bml_from_cos(cos: Tensor, mask: Tensor, alpha: float, beta: float) -> Tensor:
    """BML from precomputed cosines ``cos`` [B, B] and a [B, B] mask (bool or 0/1)."""
    positive = cos.diagonal()
    delta = (cos - positive.unsqueeze(1)) * mask.to(device=cos.device, dtype=cos.dtype)
    return (F.relu(delta + alpha) + F.relu(-delta - beta)).mean()


def bml_loss(z1: Tensor, z2: Tensor, mask: Tensor, alpha: float, beta: float) -> Tensor:
    """Bidirectional margin loss on raw cosines, exactly as the official ClusterNS code.

    ``Δ_ij = (cos(z1_i, z2_j) - cos(z1_i, z2_i)) * M_ij`` and the loss is the mean over **all**
    B x B entries of ``ReLU(Δ + α) + ReLU(-Δ - β)``: zero when ``-β <= Δ <= -α`` (a
    false-negative pair may be up to β below the positive but must stay α below it), linear with
    slope +1 above the band and -1 below it (per entry, before the 1/B² of the mean).
    Masked-out entries (M_ij = 0, including the diagonal) have Δ = 0 and each contributes the
    constant ``ReLU(α) + ReLU(-β)`` with no gradient; they still count in the B² denominator.
    """
    _check_pair(z1, z2)
    b = z1.shape[0]
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (b, b):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a [B, B] = [{b}, {b}] tensor, got {shape}")
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return bml_from_cos(cosine_matrix(z1, z2), mask, float(alpha), float(beta))
