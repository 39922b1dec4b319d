"""The modified K-means of ClusterNS (docs/method.md steps 2-4d), as pure tensor functions plus a
small checkpointable :class:`ClusterState`.

Conventions shared by every function here:

* Everything is detached: centroids are moved only by :func:`momentum_update`, never by the
  optimizer, and no gradient reaches them or the hard negatives.
* Cosines are computed in float32 (float64 for float64 inputs) with autocast off, as the
  official code's ``nn.CosineSimilarity`` is under autocast. Centroids come in two precisions
  (``objective.centroid_dtype``): ``embedding``, the official behaviour, keeps them in the
  embedding's dtype (float16 for the [CLS] + MLP embedding under fp16 autocast) and updates them
  with the official arithmetic (:func:`momentum_update_official`), where a momentum step of rate
  1e-3 is partly lost to float16 rounding; ``float32`` keeps them in float32 and updates them
  exactly (:func:`momentum_update`). Matmuls follow torch's float32 matmul precision (TF32 only
  if the trainer opts in).
* Ties are resolved deterministically towards the **lowest index**, on every device: the
  nearest centroid of :func:`assign`, the next pick of :func:`init_centroids` (argmin) and the
  second-nearest centroid of :func:`hard_negatives`. Selection is done with explicit
  comparisons, not by relying on a backend's argmax/argmin tie behaviour.
* No host-device synchronisation except where stated (initialisation, which runs once).
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from clusterns.method.losses import compute_dtype, cosine_matrix, no_autocast

__all__ = [
    "init_centroids", "greedy_init_indices", "assign", "momentum_update", "momentum_update_official",
    "hard_negatives", "nearest_two", "false_negative_mask", "one_hot_mask", "ClusterState",
]


# ----------------------------------------------------------------------------- helpers

def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D floating-point tensor [rows, D], got {desc}")


def _check_z_centroids(z: Tensor, centroids: Tensor) -> None:
    _check_2d("z", z)
    _check_2d("centroids", centroids)
    if z.shape[1] != centroids.shape[1]:
        raise ValueError(f"z has dimension {z.shape[1]} but centroids have dimension {centroids.shape[1]}")
    if centroids.shape[0] < 1:
        raise ValueError("centroids must have at least one row")


def one_hot_mask(assignments: Tensor, k: int) -> Tensor:
    """BoolTensor [B, k]: row i is True at column ``assignments[i]``. Built by comparison, not
    ``F.one_hot``/``bincount``, which validate their input with a host sync on GPUs."""
    return assignments.unsqueeze(1) == torch.arange(k, device=assignments.device).unsqueeze(0)


def _lowest_index_of_max(scores: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Per row, the lowest column index attaining the row maximum (NaN counts as -inf);
    columns where ``exclude`` is True are never chosen (if a row has another column)."""
    scores = torch.nan_to_num(scores, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    allowed = torch.ones_like(scores, dtype=torch.bool) if exclude is None else ~exclude
    scores = scores.masked_fill(~allowed, -math.inf)
    best = scores.max(dim=1, keepdim=True).values
    ncols = scores.shape[1]
    cols = torch.arange(ncols, device=scores.device).expand_as(scores)
    candidates = torch.where((scores == best) & allowed, cols, torch.full_like(cols, ncols))
    return candidates.min(dim=1).values


# ----------------------------------------------------------------------------- step 3

def greedy_init_indices(z1: Tensor, z2: Tensor, k: int, first_index: int | Tensor) -> Tensor:
    """Batch indices of the K initial centroids (docs/method.md step 3) as a LongTensor [k].

    On the raw cross-view cosines ``C = cos(z1, z2)`` (B x B): start at ``first_index``; then
    K-1 times exclude every index picked so far and move to ``j = argmin_j C[last, j]`` over
    the remaining columns (lowest index on ties). A chain from the *previous* pick, not
    farthest-point sampling over all picks, as in the official code. Requires 1 <= k <= B.
    """
    _check_2d("z1", z1)
    _check_2d("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of centroids) must be an integer >= 1, got {k!r}")
    if k > b:
        raise ValueError(f"cannot initialise k={k} centroids from a batch of {b} samples: initialisation picks "
                         f"k distinct samples, so k must be <= the global batch size (lower kmeans or raise "
                         f"the batch size)")
    if isinstance(first_index, Tensor):
        if first_index.numel() != 1:
            raise ValueError(f"first_index must hold a single index, got shape {tuple(first_index.shape)}")
        first_index = int(first_index.reshape(()).item())
    try:
        if isinstance(first_index, bool):
            raise TypeError
        first_index = operator.index(first_index)
    except TypeError:
        raise ValueError(f"first_index must be an integer, got {first_index!r}") from None
    if not 0 <= first_index < b:
        raise ValueError(f"first_index must be in [0, {b}) for a batch of {b}, got {first_index}")

    with torch.no_grad():
        cos = cosine_matrix(z1.detach(), z2.detach())
        if not bool(torch.isfinite(cos).all()):
            raise ValueError("cannot initialise centroids: the embeddings contain NaN or inf")
        device = cos.device
        picked = torch.zeros(b, dtype=torch.bool, device=device)
        order = torch.empty(k, dtype=torch.long, device=device)
        last = torch.full((1,), first_index, dtype=torch.long, device=device)  # 1-D: indexing never syncs
        order[0:1] = last
        picked.index_fill_(0, last, True)
        for t in range(1, k):  # inherently sequential; stays on device (no sync per pick)
            row = cos.index_select(0, last)
            # argmin with lowest-index ties == lowest-index argmax of the negated row
            last = _lowest_index_of_max(-row, exclude=picked.unsqueeze(0))
            order[t:t + 1] = last
            picked.index_fill_(0, last, True)
    return order


def init_centroids(z1: Tensor, z2: Tensor, k: int, first_index: int | Tensor,
                   dtype: torch.dtype | None = None) -> Tensor:
    """Initial centroids ``z1[greedy_init_indices(...)]`` (step 3 of the objective): Tensor
    [k, D], detached, raw (not normalised) rows of ``z1`` in ``dtype`` (default float32, or
    float64 for float64 input; ``z1.dtype`` gives the official ``zeros_like(z1)`` centroids)."""
    order = greedy_init_indices(z1, z2, k, first_index)
    z = z1.detach()
    return z.index_select(0, order).to(dtype or compute_dtype(z)).clone()


# ----------------------------------------------------------------------------- step 4a-d

def nearest_two(z: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """(nearest, second-nearest) centroid index per row of ``z`` by cosine, LongTensors [B].

    Lowest index on ties; the second is always a different index from the first (with
    duplicate centroids it may be an identical vector). Needs at least two centroids.
    """
    _check_z_centroids(z, centroids)
    if centroids.shape[0] < 2:
        raise ValueError("a second-nearest centroid needs at least 2 centroids (kmeans >= 2); "
                         "with kmeans: 1 disable hard negatives")
    with torch.no_grad():
        sims = cosine_matrix(z.detach(), centroids.detach())
        first = _lowest_index_of_max(sims)
        own = one_hot_mask(first, sims.shape[1])
        second = _lowest_index_of_max(sims, exclude=own)
    return first, second


def assign(z: Tensor, centroids: Tensor) -> Tensor:
    """Cluster of each row of ``z``: ``argmax_k cos(z_i, c_k)`` as a LongTensor [B]
    (docs/method.md step 4a). Ties go to the lowest centroid index; NaN similarities count as -inf."""
    _check_z_centroids(z, centroids)
    with torch.no_grad():
        return _lowest_index_of_max(cosine_matrix(z.detach(), centroids.detach()))


def _update_inputs(centroids: Tensor, z: Tensor, lr, assignments: Tensor | None) -> tuple[float, int, Tensor]:
    """The checked inputs of a centroid update: lr in (0, 1], K, and the assignments (computed
    with :func:`assign` when not given)."""
    _check_z_centroids(z, centroids)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0.0 < float(lr) <= 1.0:
        raise ValueError(f"lr (kmeans_lr) must be in (0, 1], got {lr!r}")
    if assignments is None:
        assignments = assign(z, centroids)
    elif tuple(assignments.shape) != (z.shape[0],) or assignments.dtype != torch.long:
        raise ValueError(f"assignments must be a LongTensor of shape [{z.shape[0]}], "
                         f"got {assignments.dtype} {tuple(assignments.shape)}")
    return float(lr), centroids.shape[0], assignments


def momentum_update(centroids: Tensor, z: Tensor, lr: float, *, assignments: Tensor | None = None) -> Tensor:
    """New centroids after one momentum step (docs/method.md step 4b); the input is not modified.

    ``c_k <- lr * sum_{i in k} z_i + (1 - lr) * c_k`` for every non-empty cluster k (the
    **sum** of the assigned points, as in the official code, not their mean); empty clusters
    are returned unchanged. ``assignments`` defaults to :func:`assign` ``(z, centroids)``.
    Rows of ``z`` that are not finite are left out of every cluster, so a bad step cannot turn
    the centroids into NaN. Vectorised as a one-hot matmul (deterministic on every device, so
    all data-parallel processes keep identical centroids). Detached; float32 (float64).
    """
    lr, k, assignments = _update_inputs(centroids, z, lr, assignments)
    dtype = compute_dtype(centroids, z)
    with torch.no_grad(), no_autocast(centroids.device.type):
        c = centroids.detach().to(dtype)
        zz = z.detach().to(device=c.device, dtype=dtype)
        valid = torch.isfinite(zz).all(dim=1)
        zz = torch.where(valid.unsqueeze(1), zz, torch.zeros_like(zz))
        onehot = (one_hot_mask(assignments.to(c.device), k) & valid.unsqueeze(1)).to(dtype)  # [B, K]
        sums = onehot.transpose(0, 1) @ zz  # [K, D]
        counts = onehot.sum(dim=0)  # [K]
        updated = lr * sums + (1.0 - lr) * c
        return torch.where((counts > 0).unsqueeze(1), updated, c)


def momentum_update_official(centroids: Tensor, z: Tensor, lr: float, *, assignments: Tensor | None = None,
                             matmul_dtype: torch.dtype | None = None) -> Tensor:
    """One momentum step with the official code's arithmetic, operation for operation
    (``kmeans_cluster.update``, ``kmeans_optim: momentum``); the input is not modified.

    ``data = onehot[K, B] @ z`` (the per-cluster **sum**) in ``matmul_dtype``: what autocast gives
    the official matmul, float16 under ``--fp16`` whatever the embedding's dtype, else float32;
    then ``data += c * empty`` (in place, so ``data`` keeps its dtype) and ``lr * data + (1 - lr) * c``
    with PyTorch's type promotion. So float16 embeddings under fp16 autocast give float16
    centroids updated in float16 (a rate of 1e-3 is partly lost to rounding), and an empty
    cluster's centroid is recomputed as ``lr * c + (1 - lr) * c``, not kept bit for bit.
    Unlike :func:`momentum_update`, non-finite rows are not filtered (the official code does not).
    """
    lr, k, assignments = _update_inputs(centroids, z, lr, assignments)
    mm_dtype = matmul_dtype or torch.promote_types(torch.float32, z.dtype)
    with torch.no_grad(), no_autocast(centroids.device.type):
        c = centroids.detach()
        index = one_hot_mask(assignments.to(c.device), k).transpose(0, 1)  # [K, B]
        data = torch.matmul(index.to(mm_dtype), z.detach().to(device=c.device, dtype=mm_dtype))
        empty = ~index.any(dim=1, keepdim=True)
        data += c * empty
        return lr * data + (1.0 - lr) * c


def hard_negatives(z: Tensor, centroids: Tensor) -> Tensor:
    """Each sample's hard negative (docs/method.md step 4c): the centroid with the **second**-highest
    cosine to ``z_i`` (never its own nearest centroid; lowest index on ties). Tensor [B, D],
    detached, in the centroids' precision (float32/float64). Needs at least two centroids."""
    _, second = nearest_two(z, centroids)
    c = centroids.detach()
    return c.index_select(0, second.to(c.device)).to(compute_dtype(c)).clone()


def false_negative_mask(assignments: Tensor) -> Tensor:
    """BoolTensor [B, B]: ``M_ij`` is True when samples i and j share a cluster and i != j
    (docs/method.md step 4d). Symmetric with a False diagonal."""
    if not isinstance(assignments, Tensor) or assignments.dim() != 1:
        desc = tuple(assignments.shape) if isinstance(assignments, Tensor) else type(assignments).__name__
        raise ValueError(f"assignments must be a 1-D tensor [B], got {desc}")
    same = assignments.unsqueeze(0) == assignments.unsqueeze(1)
    eye = torch.eye(assignments.shape[0], dtype=torch.bool, device=assignments.device)
    return same & ~eye


# ----------------------------------------------------------------------------- state

_STATE_FORMAT = 1


@dataclass
class ClusterState:
    """What the clustering carries across steps; checkpointed with the trainer.

    ``centroids`` ([K, D], detached, float32) is None until initialisation; ``started`` and
    ``start_step`` record when that happened (once per run); ``last_stats`` holds the most
    recent step's statistics (detached tensors, see :func:`clusterns.method.objective.compute_objective`).
    """

    centroids: Tensor | None = None
    started: bool = False
    start_step: int | None = None
    last_stats: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "ClusterState":
        """Move the centroids to ``device`` (in place); returns ``self``."""
        if self.centroids is not None:
            self.centroids = self.centroids.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors only (loads with ``torch.load(weights_only=True)`` on any
        machine). Syncs with the device: call it when checkpointing, not every step."""
        return {
            "format": _STATE_FORMAT,
            "centroids": None if self.centroids is None else self.centroids.detach().cpu().clone(),
            "started": bool(self.started),
            "start_step": None if self.start_step is None else int(self.start_step),
            "last_stats": {k: float(v) for k, v in self.last_stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Restore from :meth:`state_dict`; centroids go to ``device`` (default: where they were
        saved, i.e. CPU; the objective moves them to the embeddings' device on first use)."""
        missing = {"format", "centroids", "started", "start_step", "last_stats"} - set(state)
        if missing:
            raise ValueError(f"cluster state is missing {sorted(missing)}: not a ClusterState.state_dict()")
        if state["format"] != _STATE_FORMAT:
            raise ValueError(f"cluster state format {state['format']!r} is not supported (expected {_STATE_FORMAT})")
        centroids = state["centroids"]
        started = bool(state["started"])
        if started and (centroids is None or state["start_step"] is None):
            raise ValueError("corrupt cluster state: started but no centroids / start_step")
        if not started and centroids is not None:
            raise ValueError("corrupt cluster state: centroids present but clustering not started")
        if centroids is not None:
            if not isinstance(centroids, Tensor) or centroids.dim() != 2:
                raise ValueError("corrupt cluster state: centroids must be a 2-D tensor")
            centroids = centroids.detach().clone()
            if device is not None:
                centroids = centroids.to(device)
        self.centroids = centroids
        self.started = started
        self.start_step = None if state["start_step"] is None else int(state["start_step"])
        self.last_stats = {k: torch.tensor(float(v), dtype=torch.float32) for k, v in state["last_stats"].items()}
