"""One training step's ClusterNS objective (DESIGN §4), composed from :mod:`clusterns.clustering`
and :mod:`clusterns.losses`, plus its validated configuration.

The inputs are the **global** batch (the trainer all-gathers ``z1``/``z2`` first, the local
slice keeping its gradient), so :func:`compute_objective` does the same thing on every process.

Configuration decisions (all refusals raise :class:`ObjectiveConfigError` naming the key):

* ``kmeans: 0`` means plain unsupervised SimCSE. Because configs are merged over defaults,
  ``hard_negatives: true`` (the default) is accepted there and simply has no effect, whereas
  ``bml_weight > 0`` asks for a loss term that cannot exist without clusters and is refused.
* BML is zero for ``-β <= Δ <= -α``; that band is empty when ``α > β``, so with
  ``bml_weight > 0`` the config must have ``bml_alpha <= bml_beta``.
* ``kmeans: 1`` cannot give a second-nearest centroid: refused unless ``hard_negatives: false``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor

from clusterns.clustering import (ClusterState, assign, false_negative_mask, init_centroids,
                                  momentum_update, nearest_two, one_hot_mask)
from clusterns.losses import bml_from_cos, cosine_matrix, info_nce_from_cos

__all__ = ["ObjectiveConfig", "ObjectiveConfigError", "compute_objective", "STAT_KEYS"]

# Keys of the statistics dict returned by compute_objective (all float32 scalar tensors).
STAT_KEYS = (
    "loss", "infonce", "bml", "avg_cos", "clustering_started", "n_false_negative_pairs",
    "hard_negative_cos", "cluster_size_min", "cluster_size_max", "n_empty_clusters",
)


class ObjectiveConfigError(ValueError):
    """A ClusterNS objective setting that cannot work; the message names the key and the fix."""


_FLOAT_KEYS = ("temp", "kmeans_lr", "kmean_cosine", "hard_negative_weight", "bml_weight", "bml_alpha", "bml_beta")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyperparameters of the objective (names as in the official ClusterNS arguments).

    temp: InfoNCE temperature. kmeans: number of centroids K (0 = plain SimCSE).
    kmeans_lr: momentum rate of the centroid update. kmean_cosine: clustering starts at the
    first step whose mean cross-view cosine is <= this. hard_negatives: append the
    second-nearest-centroid block to the logits. hard_negative_weight: added to that block's
    diagonal logits (ignored when hard negatives are off). bml_weight, bml_alpha, bml_beta:
    weight and margins of the BML term (α/β ignored when bml_weight is 0).
    """

    temp: float = 0.05
    kmeans: int = 0
    kmeans_lr: float = 1e-3
    kmean_cosine: float = 0.4
    hard_negatives: bool = True
    hard_negative_weight: float = 0.0
    bml_weight: float = 0.0
    bml_alpha: float = 0.0
    bml_beta: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ObjectiveConfig":
        """Build from a (merged) config mapping; missing keys or ``null`` values take the
        defaults, unknown keys and wrongly typed values are refused. Validated without a batch
        size (call :meth:`validate` with the global batch size before training)."""
        d = dict(d or {})
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ObjectiveConfigError(f"unknown objective key {key!r}{hint}; valid keys: {', '.join(known)}")
        values: dict[str, Any] = {}
        for key, value in d.items():
            if value is None:
                continue
            if key in _FLOAT_KEYS:
                values[key] = _as_float(key, value)
            elif key == "kmeans":
                values[key] = _as_int(key, value, lenient=True)
            elif key == "hard_negatives":
                if not isinstance(value, bool):
                    raise ObjectiveConfigError(f"hard_negatives must be true or false, got {value!r}")
                values[key] = value
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, global_batch_size: int | None = None) -> "ObjectiveConfig":
        """Refuse settings that cannot work (see the module docstring); returns ``self``.

        With ``global_batch_size`` also checks K <= global batch (initialisation picks K
        distinct samples of one global batch)."""
        for key in _FLOAT_KEYS:
            _as_float(key, getattr(self, key))
        _as_int("kmeans", self.kmeans)
        if not isinstance(self.hard_negatives, bool):
            raise ObjectiveConfigError(f"hard_negatives must be true or false, got {self.hard_negatives!r}")

        if self.temp <= 0:
            raise ObjectiveConfigError(f"temp must be > 0 (the paper uses 0.05), got {self.temp}")
        if self.kmeans < 0:
            raise ObjectiveConfigError(f"kmeans must be >= 0 (0 = plain SimCSE, else the number of centroids), "
                                       f"got {self.kmeans}")
        if not 0.0 < self.kmeans_lr <= 1.0:
            raise ObjectiveConfigError(f"kmeans_lr must be in (0, 1] (the centroid momentum rate, e.g. 1e-3), "
                                       f"got {self.kmeans_lr}")
        if not -1.0 <= self.kmean_cosine <= 1.0:
            raise ObjectiveConfigError(f"kmean_cosine must be in [-1, 1] (a cosine threshold, e.g. 0.4), "
                                       f"got {self.kmean_cosine}")
        if self.bml_weight < 0:
            raise ObjectiveConfigError(f"bml_weight must be >= 0 (0 disables BML), got {self.bml_weight}")
        if self.kmeans == 0 and self.bml_weight > 0:
            raise ObjectiveConfigError(f"bml_weight={self.bml_weight} needs clustering, but clustering is off "
                                       f"(kmeans: 0): set kmeans > 0 or bml_weight: 0")
        if self.kmeans == 1 and self.hard_negatives:
            raise ObjectiveConfigError("kmeans: 1 cannot give hard negatives (they are the second-nearest "
                                       "centroid): set kmeans >= 2 or hard_negatives: false")
        if self.bml_weight > 0 and self.bml_alpha > self.bml_beta:
            raise ObjectiveConfigError(
                f"bml_alpha={self.bml_alpha} > bml_beta={self.bml_beta}: BML is zero only for "
                f"-bml_beta <= delta <= -bml_alpha, an empty band when alpha > beta; set bml_alpha <= bml_beta")
        if global_batch_size is not None:
            try:
                if isinstance(global_batch_size, bool):
                    raise TypeError
                batch = int(global_batch_size)
            except (TypeError, ValueError):
                raise ObjectiveConfigError(f"global batch size must be an integer, got {global_batch_size!r}") from None
            if batch < 1:
                raise ObjectiveConfigError(f"global batch size must be >= 1, got {batch}")
            if self.kmeans > batch:
                raise ObjectiveConfigError(
                    f"kmeans={self.kmeans} exceeds the global batch size {batch}: the centroids are "
                    f"initialised from {self.kmeans} distinct samples of one global batch; set kmeans <= {batch} "
                    f"or raise the batch size")
        return self


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ""
        if isinstance(value, str):
            hint = (" (YAML 1.1 reads numbers like 1e-3 without a dot as strings: write 1.0e-3)")
        raise ObjectiveConfigError(f"{key} must be a number, got {value!r}{hint}")
    value = float(value)
    if not math.isfinite(value):
        raise ObjectiveConfigError(f"{key} must be finite, got {value}")
    return value


def _as_int(key: str, value: Any, *, lenient: bool = False) -> int:
    """An int; ``lenient`` (config parsing) also takes integral floats such as 128.0."""
    if lenient and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ObjectiveConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _scalar(value: float, device: torch.device) -> Tensor:
    return torch.full((), value, dtype=torch.float32, device=device)


def compute_objective(z1: Tensor, z2: Tensor, state: ClusterState, cfg: ObjectiveConfig, step: int,
                      rng: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one step on the global batch and its statistics (DESIGN §4).

    Before initialisation (kmeans > 0): if ``avg = mean(cos(z1_i, z2_j))`` over the whole B x B
    matrix is <= ``kmean_cosine``, initialise the centroids from ``first_index =
    torch.randint(B, (1,), generator=rng)`` and mark the state started at ``step``; that step
    (and every step before it) is plain SimCSE. This threshold test is the only host sync.
    After initialisation, with ``z = z1.detach()``: assign, momentum-update the centroids
    (stored in ``state``), then with the updated centroids re-assign, take hard negatives
    (second-nearest centroid) and the false-negative mask; loss = InfoNCE (with the hard
    negative block unless ``hard_negatives`` is off) + ``bml_weight`` * BML (not computed when
    ``bml_weight`` is 0). ``kmeans: 0`` is plain SimCSE on every step.

    Returns ``(loss, stats)``; ``stats`` (also stored as ``state.last_stats``) holds detached
    float32 scalar tensors on z1's device under :data:`STAT_KEYS`: loss, infonce, bml,
    avg_cos, clustering_started (1 from the initialising step on), n_false_negative_pairs
    (True entries of the mask, ordered pairs), hard_negative_cos (mean cos(z1_i, h_i)),
    cluster_size_min / cluster_size_max (over non-empty clusters) and n_empty_clusters, all
    from the re-assignment against the updated centroids. NaN marks a statistic that was not
    computed this step (bml, hard_negative_cos and the cluster sizes before clustering starts
    or with that part switched off); n_false_negative_pairs is 0 before the start.
    """
    cfg.validate()
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor) or z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError("z1 and z2 must be 2-D tensors of the same shape [B, D]; got "
                         f"{getattr(z1, 'shape', z1)!s} and {getattr(z2, 'shape', z2)!s}")
    b, d = z1.shape
    device = z1.device
    nan = math.nan

    cos = cosine_matrix(z1, z2)  # [B, B], float32, with gradient
    avg_cos = cos.detach().mean()

    clustered = False
    if cfg.kmeans == 0:
        if state.started:
            raise ValueError("the cluster state has started clustering but the config has kmeans: 0 "
                             "(resuming a ClusterNS run with a SimCSE config?)")
    elif not state.started:
        if bool(avg_cos <= cfg.kmean_cosine):  # the one unavoidable sync, before initialisation only
            if rng is None:
                raise ValueError("compute_objective needs a torch.Generator (rng) to pick the first centroid")
            first_index = torch.randint(b, (1,), generator=rng, device=rng.device)
            state.centroids = init_centroids(z1, z2, cfg.kmeans, first_index)
            state.started = True
            state.start_step = int(step)
    else:
        clustered = True

    stats: dict[str, Tensor] = {
        "avg_cos": avg_cos.float(),
        "clustering_started": _scalar(1.0 if state.started else 0.0, device),
        "n_false_negative_pairs": _scalar(0.0, device),
        "hard_negative_cos": _scalar(nan, device),
        "cluster_size_min": _scalar(nan, device),
        "cluster_size_max": _scalar(nan, device),
        "n_empty_clusters": _scalar(nan, device),
        "bml": _scalar(nan, device),
    }

    if not clustered:
        loss = info_nce_from_cos(cos, cfg.temp)
        infonce = loss
    else:
        centroids = state.centroids
        if centroids is None or tuple(centroids.shape) != (cfg.kmeans, d):
            shape = None if centroids is None else tuple(centroids.shape)
            raise ValueError(f"the cluster state's centroids have shape {shape} but the config and batch need "
                             f"({cfg.kmeans}, {d}): the checkpoint belongs to another configuration")
        centroids = centroids.to(device)
        z = z1.detach()
        # (a) assign, (b) momentum update
        centroids = momentum_update(centroids, z, cfg.kmeans_lr, assignments=assign(z, centroids))
        state.centroids = centroids
        # (c) re-assign against the updated centroids; hard negatives = second-nearest centroid
        hard_cos = None
        if cfg.hard_negatives:
            nearest, second = nearest_two(z, centroids)
            hard = centroids.index_select(0, second)  # detached (centroids never carry grad)
            hard_cos = cosine_matrix(z1, hard)
            stats["hard_negative_cos"] = hard_cos.detach().diagonal().mean().float()
        else:
            nearest = assign(z, centroids)
        # (d) false-negative mask
        mask = false_negative_mask(nearest)
        # (e) InfoNCE with the hard-negative block, (f) BML, (g) sum
        infonce = info_nce_from_cos(cos, cfg.temp, hard_cos, cfg.hard_negative_weight)
        loss = infonce
        if cfg.bml_weight > 0:
            bml = bml_from_cos(cos, mask, cfg.bml_alpha, cfg.bml_beta)
            loss = infonce + cfg.bml_weight * bml
            stats["bml"] = bml.detach().float()
        counts = one_hot_mask(nearest, cfg.kmeans).sum(dim=0)  # not bincount: it syncs on GPUs
        empty = counts == 0
        stats["n_false_negative_pairs"] = mask.sum().float()
        stats["cluster_size_min"] = counts.masked_fill(empty, b + 1).min().float()
        stats["cluster_size_max"] = counts.max().float()
        stats["n_empty_clusters"] = empty.sum().float()

    stats["loss"] = loss.detach().float()
    stats["infonce"] = infonce.detach().float()
    stats = {key: stats[key] for key in STAT_KEYS}
    state.last_stats = dict(stats)
    return loss, stats
