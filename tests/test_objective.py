"""Composition of the ClusterNS objective (docs/method.md steps 2-4g) and its config validation."""

from __future__ import annotations

import io
import math

import pytest
import torch

import clusterns.method.objective as objective
from clusterns.method.clustering import (ClusterState, assign, false_negative_mask, hard_negatives,
                                  init_centroids, momentum_update)
from clusterns.method.losses import bml_loss, cosine_matrix, info_nce
from clusterns.method.objective import STAT_KEYS, ObjectiveConfig, ObjectiveConfigError, compute_objective


pytestmark = pytest.mark.usefixtures("single_thread")

B, D = 24, 8


def similar_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows near one direction: mean cross-view cosine close to 1 (above any threshold)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=g)
    z1 = base + 0.05 * torch.randn(B, D, generator=g)
    z2 = base + 0.05 * torch.randn(B, D, generator=g)
    return z1.requires_grad_(True), z2.requires_grad_(True)


def spread_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random directions, views close to each other: mean cross-view cosine near 1/B."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, D, generator=g)
    z2 = z1 + 0.3 * torch.randn(B, D, generator=g)
    return z1.requires_grad_(True), z2.requires_grad_(True)


CFG = ObjectiveConfig(kmeans=6, kmeans_lr=0.05, kmean_cosine=0.4, hard_negatives=True,
                      hard_negative_weight=0.2, bml_weight=0.5, bml_alpha=0.1, bml_beta=0.3)


def mean_cross_cos(z1, z2):
    return torch.nn.functional.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1).mean().item()


def test_fixture_batches_are_on_the_intended_sides_of_the_threshold():
    assert mean_cross_cos(*similar_batch(0)) > 0.9
    assert abs(mean_cross_cos(*spread_batch(0))) < 0.2


# ----------------------------------------------------------------------------- start

def test_clustering_starts_once_below_threshold_and_start_step_is_plain_simcse():
    state, rng = ClusterState(), torch.Generator().manual_seed(11)
    for step in range(3):  # avg cos > 0.4: no start, plain SimCSE
        z1, z2 = similar_batch(step)
        loss, stats = compute_objective(z1, z2, state, CFG, step, rng)
        assert not state.started and state.centroids is None
        assert torch.equal(loss, info_nce(z1, z2, CFG.temp))
        assert stats["clustering_started"].item() == 0.0
    assert torch.equal(rng.get_state(), torch.Generator().manual_seed(11).get_state())  # rng untouched

    z1, z2 = spread_batch(3)
    expected_first = torch.randint(B, (1,), generator=torch.Generator().manual_seed(11))
    loss, stats = compute_objective(z1, z2, state, CFG, 3, rng)
    assert state.started and state.start_step == 3
    assert torch.equal(loss, info_nce(z1, z2, CFG.temp))  # the start step is plain SimCSE, exactly
    assert torch.equal(state.centroids, init_centroids(z1, z2, CFG.kmeans, expected_first))
    assert stats["clustering_started"].item() == 1.0 and math.isnan(stats["bml"].item())

    # later steps never re-initialise, even when the average cosine goes back above the threshold
    rng_state = rng.get_state()
    for step in (4, 5):
        z1, z2 = similar_batch(step)
        compute_objective(z1, z2, state, CFG, step, rng)
    assert state.start_step == 3 and torch.equal(rng.get_state(), rng_state)


def test_threshold_is_inclusive():
    z1, z2 = spread_batch(1)
    cfg = ObjectiveConfig(kmeans=4, kmean_cosine=cosine_matrix(z1, z2).mean().item())  # avg == threshold
    state = ClusterState()
    compute_objective(z1, z2, state, cfg, 0, torch.Generator().manual_seed(0))
    assert state.started


def test_same_seed_same_init_and_different_processes_agree():
    z1, z2 = spread_batch(5)
    states = []
    for _ in range(2):
        s = ClusterState()
        compute_objective(z1, z2, s, CFG, 0, torch.Generator().manual_seed(123))
        states.append(s)
    assert torch.equal(states[0].centroids, states[1].centroids)


# ----------------------------------------------------------------------------- after start

def started_state(seed: int = 7) -> ClusterState:
    state = ClusterState()
    compute_objective(*spread_batch(seed), state, CFG, 0, torch.Generator().manual_seed(seed))
    assert state.started
    return state


def hand_composed(z1, z2, centroids, cfg):
    z = z1.detach()
    new = momentum_update(centroids, z, cfg.kmeans_lr)
    loss = info_nce(z1, z2, cfg.temp, hard_negatives(z, new) if cfg.hard_negatives else None,
                    cfg.hard_negative_weight if cfg.hard_negatives else 0.0)
    mask = false_negative_mask(assign(z, new))
    if cfg.bml_weight > 0:
        loss = loss + cfg.bml_weight * bml_loss(z1, z2, mask, cfg.bml_alpha, cfg.bml_beta)
    return loss, new, mask


@pytest.mark.parametrize("cfg", [
    CFG,
    ObjectiveConfig(**{**CFG.to_dict(), "hard_negatives": False}),
    ObjectiveConfig(**{**CFG.to_dict(), "bml_weight": 0.0}),
    ObjectiveConfig(**{**CFG.to_dict(), "hard_negatives": False, "bml_weight": 0.0}),
], ids=["full", "no_hard_negatives", "no_bml", "neither"])
def test_after_start_loss_is_the_hand_composed_sum(cfg):
    state = started_state()
    for step in (1, 2, 3):
        z1, z2 = spread_batch(100 + step)
        expected, new_centroids, mask = hand_composed(z1, z2, state.centroids.clone(), cfg)
        loss, stats = compute_objective(z1, z2, state, cfg, step, None)
        assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(state.centroids, new_centroids)
        assert stats["n_false_negative_pairs"].item() == mask.sum().item()
        assert stats["clustering_started"].item() == 1.0
        if cfg.bml_weight == 0:
            assert math.isnan(stats["bml"].item())
        if not cfg.hard_negatives:
            assert torch.allclose(stats["infonce"], info_nce(z1, z2, cfg.temp))
            assert math.isnan(stats["hard_negative_cos"].item())


def test_bml_not_computed_when_weight_is_zero(monkeypatch):
    state = started_state()
    monkeypatch.setattr(objective, "bml_from_cos", lambda *a, **k: pytest.fail("BML computed with weight 0"))
    cfg = ObjectiveConfig(**{**CFG.to_dict(), "bml_weight": 0.0})
    compute_objective(*spread_batch(50), state, cfg, 1, None)


def test_no_gradient_reaches_centroids_or_hard_negatives():
    state = started_state()
    z1, z2 = spread_batch(60)
    loss, _ = compute_objective(z1, z2, state, CFG, 1, None)
    loss.backward()
    assert not state.centroids.requires_grad and state.centroids.grad is None
    assert z1.grad is not None and z2.grad is not None
    h = hard_negatives(z1, state.centroids)
    assert not h.requires_grad


def test_stats_are_device_tensors_with_consistent_values():
    state = started_state()
    z1, z2 = spread_batch(70)
    loss, stats = compute_objective(z1, z2, state, CFG, 1, None)
    assert tuple(stats) == STAT_KEYS
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert stats["loss"].item() == pytest.approx(loss.item())
    assert stats["loss"].item() == pytest.approx(stats["infonce"].item() + CFG.bml_weight * stats["bml"].item())
    sizes = torch.bincount(assign(z1, state.centroids), minlength=CFG.kmeans)
    assert stats["cluster_size_max"].item() == sizes.max().item()
    assert stats["cluster_size_min"].item() == sizes[sizes > 0].min().item()
    assert stats["n_empty_clusters"].item() == (sizes == 0).sum().item()
    h = hard_negatives(z1, state.centroids)
    expected_hcos = torch.nn.functional.cosine_similarity(z1, h, dim=-1).mean()
    # a mean of cosines (scale 1) can sit near 0: compared on that scale, not relative to itself
    assert stats["hard_negative_cos"].item() == pytest.approx(expected_hcos.item(), abs=1e-6)
    assert state.last_stats.keys() == stats.keys()


def test_kmeans_zero_is_plain_simcse_every_step():
    cfg = ObjectiveConfig()  # kmeans 0, hard_negatives true by default: accepted, no effect
    state, rng = ClusterState(), torch.Generator().manual_seed(0)
    for step in range(4):
        z1, z2 = (spread_batch if step % 2 else similar_batch)(step)
        loss, stats = compute_objective(z1, z2, state, cfg, step, rng)
        assert torch.equal(loss, info_nce(z1, z2, 0.05))
        assert not state.started and stats["clustering_started"].item() == 0.0


def test_state_dict_round_trip_gives_identical_losses():
    state = started_state()
    compute_objective(*spread_batch(80), state, CFG, 1, None)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    restored = ClusterState()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for step in (2, 3, 4):
        batch = spread_batch(80 + step)
        a, _ = compute_objective(*batch, state, CFG, step, None)
        b, _ = compute_objective(*batch, restored, CFG, step, None)
        assert torch.equal(a, b)
    assert torch.equal(state.centroids, restored.centroids) and restored.start_step == state.start_step


def test_low_precision_batch():
    state = ClusterState()
    z1, z2 = spread_batch(90)
    z1b, z2b = z1.detach().bfloat16().requires_grad_(True), z2.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compute_objective(z1b, z2b, state, CFG, 0, torch.Generator().manual_seed(0))
        loss, _ = compute_objective(z1b, z2b, state, CFG, 1, None)
    assert loss.dtype == torch.float32 and state.centroids.dtype == torch.float32
    loss.backward()
    assert z1b.grad.dtype == torch.bfloat16


def test_runtime_mismatches_are_refused():
    state = started_state()
    with pytest.raises(ValueError, match="kmeans: 0"):
        compute_objective(*spread_batch(1), state, ObjectiveConfig(), 1, None)
    with pytest.raises(ValueError, match="another configuration"):
        compute_objective(*spread_batch(1), state, ObjectiveConfig(**{**CFG.to_dict(), "kmeans": 5}), 1, None)
    with pytest.raises(ValueError, match="global batch size"):
        compute_objective(*spread_batch(1), ClusterState(), ObjectiveConfig(kmeans=B + 1), 0,
                          torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides,batch,key", [
    ({"kmeans": 256}, 128, "kmeans"),
    ({"kmeans": 1}, 64, "hard_negatives"),
    ({"kmeans": -1}, None, "kmeans"),
    ({"kmeans": 8, "kmeans_lr": 0.0}, None, "kmeans_lr"),
    ({"kmeans": 8, "kmeans_lr": 1.5}, None, "kmeans_lr"),
    ({"temp": 0.0}, None, "temp"),
    ({"temp": -0.05}, None, "temp"),
    ({"kmeans": 8, "bml_weight": -1e-3}, None, "bml_weight"),
    ({"kmean_cosine": 1.2}, None, "kmean_cosine"),
    ({"kmean_cosine": -1.01}, None, "kmean_cosine"),
    ({"kmeans": 8, "bml_weight": 1e-3, "bml_alpha": 0.4, "bml_beta": 0.3}, None, "bml_alpha"),
    ({"bml_weight": 1e-3, "bml_beta": 0.3}, None, "clustering is off"),
    ({"temp": float("nan")}, None, "temp"),
])
def test_validate_refusals_name_the_key(overrides, batch, key):
    with pytest.raises(ObjectiveConfigError, match=key):
        ObjectiveConfig(**overrides).validate(batch)
    assert issubclass(ObjectiveConfigError, ValueError)


def test_validate_accepts_paper_settings_and_decided_edge_cases():
    ObjectiveConfig(kmeans=128, bml_weight=1e-3, bml_alpha=0.0, bml_beta=0.3).validate(256)
    ObjectiveConfig(kmeans=128, kmeans_lr=5e-4).validate(512)  # RoBERTa-large: no BML
    ObjectiveConfig(kmeans=1, hard_negatives=False).validate(4)
    ObjectiveConfig(kmeans=0, hard_negatives=True).validate(64)  # default merged into SimCSE: fine
    ObjectiveConfig(kmeans=8, bml_weight=0.0, bml_alpha=0.5, bml_beta=0.1).validate(64)  # BML off
    ObjectiveConfig(kmeans=8, bml_weight=1e-3, bml_alpha=0.3, bml_beta=0.3).validate(8)  # K == B, α == β


def test_from_dict():
    cfg = ObjectiveConfig.from_dict({"kmeans": 128, "bml_weight": 1e-4, "bml_alpha": 0.2, "bml_beta": 0.5,
                                     "temp": 0.05, "hard_negatives": True})
    assert cfg == ObjectiveConfig(kmeans=128, bml_weight=1e-4, bml_alpha=0.2, bml_beta=0.5)
    assert ObjectiveConfig.from_dict({"bml_alpha": None}) == ObjectiveConfig()
    assert ObjectiveConfig.from_dict({"kmeans": 8, "bml_alpha": 0}).bml_alpha == 0.0
    with pytest.raises(ObjectiveConfigError, match="kmean_lr"):
        ObjectiveConfig.from_dict({"kmean_lr": 1e-3})
    with pytest.raises(ObjectiveConfigError, match="kmeans_lr.*1.0e-3"):
        ObjectiveConfig.from_dict({"kmeans": 8, "kmeans_lr": "1e-3"})
    with pytest.raises(ObjectiveConfigError, match="hard_negatives"):
        ObjectiveConfig.from_dict({"hard_negatives": "yes"})
    with pytest.raises(ObjectiveConfigError, match="kmeans"):
        ObjectiveConfig.from_dict({"kmeans": 2.5})


def test_no_host_sync_after_clustering_started(monkeypatch):
    """After initialisation a step must not read tensor values on the host (a GPU sync)."""
    state = started_state()
    batch = spread_batch(95)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync (tensor value read) inside compute_objective")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss, stats = compute_objective(*batch, state, CFG, 1, None)
    loss.backward()
    monkeypatch.undo()
    assert stats["clustering_started"].item() == 1.0
