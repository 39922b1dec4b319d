"""One training step's ClusterNS objective (docs/method.md), composed from :mod:`clusterns.method.clustering`
and :mod:`clusterns.method.losses`, plus its validated configuration.

The inputs are the **global** batch (the trainer all-gathers ``z1``/``z2`` first, the local
slice keeping its gradient), so :func:`compute_objective` does the same thing on every process.

The configuration and its validation live in :mod:`clusterns.method.settings` (torch-free,
so the workflow can check configs quickly); they are re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clusterns.method.clustering import (ClusterState, assign, false_negative_mask, init_centroids,
                                  momentum_update, momentum_update_official, nearest_two, one_hot_mask)
from clusterns.method.losses import bml_from_cos, cosine_matrix, info_nce_from_cos
from clusterns.method.settings import ObjectiveConfig, ObjectiveConfigError

__all__ = ["ObjectiveConfig", "ObjectiveConfigError", "compute_objective", "STAT_KEYS"]

# Keys of the statistics dict returned by compute_objective (all float32 scalar tensors).
STAT_KEYS = (
    "loss", "infonce", "bml", "avg_cos", "clustering_started", "n_false_negative_pairs",
    "hard_negative_cos", "cluster_size_min", "cluster_size_max", "n_empty_clusters",
)


def _scalar(value: float, device: torch.device) -> Tensor:
    return torch.full((), value, dtype=torch.float32, device=device)


def compute_objective(z1: Tensor, z2: Tensor, state: ClusterState, cfg: ObjectiveConfig, step: int,
                      rng: torch.Generator | None,
                      autocast_dtype: torch.dtype | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of one step on the global batch and its statistics (docs/method.md).

    Before initialisation (kmeans > 0): if ``avg = mean(cos(z1_i, z2_j))`` over the whole B x B
    matrix is <= ``kmean_cosine``, initialise the centroids from ``first_index =
    torch.randint(B, (1,), generator=rng)`` and mark the state started at ``step``; that step
    (and every step before it) is plain SimCSE. This threshold test is the only host sync.
    After initialisation, with ``z = z1.detach()``: assign, momentum-update the centroids
    (stored in ``state``), then with the updated centroids re-assign, take hard negatives
    (second-nearest centroid) and the false-negative mask; loss = InfoNCE (with the hard
    negative block unless ``hard_negatives`` is off) + ``bml_weight`` * BML (not computed when
    ``bml_weight`` is 0). ``kmeans: 0`` is plain SimCSE on every step.

    ``z1``/``z2`` come in the encoder's output dtype (float16 for the [CLS] + MLP embedding under
    fp16 autocast); every cosine is computed in float32. With ``centroid_dtype: embedding`` the
    centroids take ``z1``'s dtype and the official update arithmetic, whose sum is a matmul in
    ``autocast_dtype`` (the dtype the training autocast gives matmuls; None: no autocast); with
    ``float32`` they are float32 and updated exactly (:func:`clusterns.clustering.momentum_update`).

    Returns ``(loss, stats)``; ``stats`` (also stored as ``state.last_stats``) holds detached
    float32 scalar tensors on z1's device under :data:`STAT_KEYS`: loss, infonce, bml,
    avg_cos, clustering_started (1 from the initialising step on), n_false_negative_pairs
    (True entries of the mask, ordered pairs), hard_negative_cos (mean cos(z1_i, h_i)),
    cluster_size_min / cluster_size_max (over non-empty clusters) and n_empty_clusters, all
    from the re-assignment against the updated centroids. NaN marks a statistic that was not
    computed this step (bml, hard_negative_cos and the cluster sizes before clustering starts
    or with that part switched off); n_false_negative_pairs is 0 before the start.
    """
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
            dtype = z1.dtype if cfg.centroid_dtype == "embedding" else None
            state.centroids = init_centroids(z1, z2, cfg.kmeans, first_index, dtype=dtype)
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
        assignments = assign(z, centroids)
        if cfg.centroid_dtype == "embedding":
            centroids = momentum_update_official(centroids, z, cfg.kmeans_lr, assignments=assignments,
                                                 matmul_dtype=autocast_dtype)
        else:
            centroids = momentum_update(centroids, z, cfg.kmeans_lr, assignments=assignments)
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
