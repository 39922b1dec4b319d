"""The modified K-means (docs/method.md steps 3, 4a-d). Expected values are worked out by hand in
the comments on tiny 2-D/4-D vectors, independently of the implementation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from clusterns.method.clustering import (ClusterState, assign, false_negative_mask, greedy_init_indices,
                                  hard_negatives, init_centroids, momentum_update, momentum_update_official,
                                  nearest_two)


pytestmark = pytest.mark.usefixtures("single_thread")


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


# ----------------------------------------------------------------------------- init

# z1 = the identity (rows e0..e3), so C[i, j] = cos(e_i, z2_j) = z2_j[i] (z2 rows are unit):
#   column j of C is z2_j.
Z1_EYE = torch.eye(4)
Z2_CRAFT = t([[1.0, 0.0, 0.0, 0.0],
              [0.6, 0.0, 0.8, 0.0],
              [-0.6, 0.8, 0.0, 0.0],
              [0.0, -0.8, 0.0, 0.6]])
# C = [[ 1.0, 0.6, -0.6,  0.0],
#      [ 0.0, 0.0,  0.8, -0.8],
#      [ 0.0, 0.8,  0.0,  0.0],
#      [ 0.0, 0.0,  0.0,  0.6]]


def test_init_picks_documented_chain_from_cross_view_cosines():
    # first 0: row 0 over {1: .6, 2: -.6, 3: 0} -> 2; row 2 over {1: .8, 3: 0} -> 3; row 3 over {1} -> 1
    assert greedy_init_indices(Z1_EYE, Z2_CRAFT, 4, 0).tolist() == [0, 2, 3, 1]
    # first 1: row 1 over {0: 0, 2: .8, 3: -.8} -> 3; row 3 over {0: 0, 2: 0} tie -> lowest, 0;
    # row 0 over {2: -.6} -> 2
    assert greedy_init_indices(Z1_EYE, Z2_CRAFT, 4, 1).tolist() == [1, 3, 0, 2]
    # the self-similarity chain cos(z1, z1) = I would go 0 -> 1 (tie at 0, lowest): not what we do
    assert greedy_init_indices(Z1_EYE, Z2_CRAFT, 2, 0).tolist() == [0, 2]


def test_init_centroids_are_raw_rows_of_z1_and_detached():
    z1 = (2.0 * Z1_EYE).requires_grad_(True)  # scaling does not change the cosines
    c = init_centroids(z1, Z2_CRAFT, 3, torch.tensor([0]))  # tensor index as from torch.randint
    expected = t([[2.0, 0.0, 0.0, 0.0],
                  [0.0, 0.0, 2.0, 0.0],
                  [0.0, 0.0, 0.0, 2.0]])
    assert torch.equal(c, expected)
    assert not c.requires_grad and c.dtype == torch.float32


@pytest.mark.parametrize("b,k", [(1, 1), (2, 2), (7, 3), (16, 16), (33, 33), (64, 20)])
def test_init_never_repeats_an_index(b, k):
    g = torch.Generator().manual_seed(b * 100 + k)
    for trial in range(5):
        z1 = torch.randn(b, 6, generator=g)
        z2 = z1 + 0.3 * torch.randn(b, 6, generator=g)
        first = int(torch.randint(b, (1,), generator=g))
        idx = greedy_init_indices(z1, z2, k, first)
        assert idx[0].item() == first
        assert len(set(idx.tolist())) == k  # all distinct; with k == b a permutation
        c = init_centroids(z1, z2, k, first)
        assert torch.equal(c, z1[idx])


def test_init_refuses_k_larger_than_batch_and_bad_index():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="global batch size"):
        init_centroids(z, z, 5, 0)
    with pytest.raises(ValueError, match="first_index"):
        init_centroids(z, z, 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        init_centroids(torch.full((4, 3), float("nan")), z, 2, 0)


def test_init_under_low_precision_and_autocast():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 8, generator=g).bfloat16()
    z2 = (z1.float() + 0.2 * torch.randn(12, 8, generator=g)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = init_centroids(z1, z2, 5, 3)
    assert c.dtype == torch.float32
    assert torch.equal(c, init_centroids(z1.float(), z2.float(), 5, 3))


# ----------------------------------------------------------------------------- assign

def test_assign_ties_go_to_lowest_index():
    centroids = t([[0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    z = t([[1.0, 0.0],    # cos: 0, .707, .707, .707 -> three-way tie -> 1
           [0.0, -1.0],   # cos: -1, -.707, -.707, .707 -> 3
           [0.0, 2.0],    # cos: 1, .707, .707, -.707 -> 0
           [3.0, 3.0]])   # cos: .707, 1, 1, 0 -> tie of duplicates -> 1
    assert assign(z, centroids).tolist() == [1, 3, 0, 1]
    same = torch.ones(5, 3)
    assert assign(torch.randn(7, 3), same).tolist() == [0] * 7


def test_assign_is_nearest_by_cosine_not_distance():
    # (10, 1) is Euclidean-closer to (5, 5) (6.4 vs 10.0) but cosine-closer to (0.01, 0) (.995 vs .774)
    centroids = t([[0.01, 0.0], [5.0, 5.0]])
    assert assign(t([[10.0, 1.0]]), centroids).tolist() == [0]


# ----------------------------------------------------------------------------- momentum update

def test_momentum_update_uses_sum_and_keeps_empty_clusters():
    centroids = t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = t([[2.0, 0.5], [3.0, -0.5], [0.5, 4.0]])
    # assignments: z0 -> 0, z1 -> 0, z2 -> 1; cluster 2 is empty
    # c0 = 0.1 * (5, 0) + 0.9 * (1, 0) = (1.4, 0)      (the mean would give (1.15, 0))
    # c1 = 0.1 * (0.5, 4) + 0.9 * (0, 1) = (0.05, 1.3)
    # c2 unchanged
    new = momentum_update(centroids, z, 0.1)
    assert torch.allclose(new, t([[1.4, 0.0], [0.05, 1.3], [-1.0, 0.0]]), atol=1e-6)
    assert torch.equal(centroids, t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # input untouched
    assert torch.equal(new[2], centroids[2])


def test_momentum_update_lr_one_and_explicit_assignments():
    centroids = t([[1.0, 0.0], [0.0, 1.0]])
    z = t([[1.0, 1.0], [2.0, 3.0], [4.0, 0.0]])
    # forced assignments [1, 1, 0]: c0 = (4, 0); c1 = (3, 4)
    new = momentum_update(centroids, z, 1.0, assignments=torch.tensor([1, 1, 0]))
    assert torch.equal(new, t([[4.0, 0.0], [3.0, 4.0]]))


def test_momentum_update_detached_and_skips_nonfinite_rows():
    centroids = t([[1.0, 0.0], [0.0, 1.0]])
    z = t([[2.0, 0.0], [float("nan"), 1.0], [0.0, 3.0]]).requires_grad_(True)
    new = momentum_update(centroids, z, 0.5)
    # the NaN row joins no cluster: c0 = .5*(2,0) + .5*(1,0) = (1.5, 0); c1 = .5*(0,3) + .5*(0,1) = (0, 2)
    assert torch.equal(new, t([[1.5, 0.0], [0.0, 2.0]]))
    assert not new.requires_grad


def test_momentum_update_refuses_bad_lr():
    with pytest.raises(ValueError, match="kmeans_lr"):
        momentum_update(torch.eye(2), torch.eye(2), 0.0)
    with pytest.raises(ValueError, match="kmeans_lr"):
        momentum_update(torch.eye(2), torch.eye(2), 1.5)


# ----------------------------------------------------------------------------- hard negatives

def test_hard_negative_is_the_literal_second_nearest():
    centroids = t([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    z = t([[1.0, 0.0],    # cos: 1, .8, 0, -1 -> nearest 0, second 1
           [0.0, 1.0],    # cos: 0, .6, 1, 0 -> nearest 2, second 1
           [-1.0, 0.1]])  # cos: -.995, -.736, .0995, .995 -> nearest 3, second 2
    h = hard_negatives(z, centroids)
    assert torch.equal(h, t([[0.8, 0.6], [0.8, 0.6], [0.0, 1.0]]))
    first, second = nearest_two(z, centroids)
    assert first.tolist() == [0, 2, 3] and second.tolist() == [1, 1, 2]


def test_hard_negative_with_duplicate_top_is_the_other_copy():
    centroids = t([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    first, second = nearest_two(t([[1.0, 1.0]]), centroids)
    assert (first.item(), second.item()) == (0, 2)


def test_hard_negative_never_own_centroid_random():
    g = torch.Generator().manual_seed(1)
    for k in (2, 3, 17):
        z = torch.randn(50, 8, generator=g, requires_grad=True)
        centroids = torch.randn(k, 8, generator=g)
        first, second = nearest_two(z, centroids)
        own = assign(z, centroids)
        assert torch.equal(first, own)
        assert (second != own).all()
        sims = torch.nn.functional.cosine_similarity(z.detach().unsqueeze(1), centroids.unsqueeze(0), dim=-1)
        others = sims.scatter(1, own.unsqueeze(1), -2.0)
        assert torch.allclose(sims.gather(1, second.unsqueeze(1)).squeeze(1), others.max(1).values)
        h = hard_negatives(z, centroids)
        assert torch.equal(h, centroids[second]) and not h.requires_grad


def test_hard_negatives_need_two_centroids():
    with pytest.raises(ValueError, match="at least 2 centroids"):
        hard_negatives(torch.randn(3, 2), torch.randn(1, 2))


# ----------------------------------------------------------------------------- mask

def test_false_negative_mask_literal():
    m = false_negative_mask(torch.tensor([0, 1, 0, 2, 1]))
    expected = torch.tensor([[0, 0, 1, 0, 0],
                             [0, 0, 0, 0, 1],
                             [1, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0],
                             [0, 1, 0, 0, 0]], dtype=torch.bool)
    assert m.dtype == torch.bool and torch.equal(m, expected)


def test_false_negative_mask_symmetric_zero_diagonal_random():
    a = torch.randint(4, (40,), generator=torch.Generator().manual_seed(3))
    m = false_negative_mask(a)
    assert torch.equal(m, m.T) and not m.diagonal().any()
    counts = torch.bincount(a)
    assert int(m.sum()) == int((counts * (counts - 1)).sum())


# ----------------------------------------------------------------------------- state

def test_cluster_state_round_trip_through_torch_save():
    s = ClusterState(centroids=torch.randn(3, 4), started=True, start_step=7,
                     last_stats={"loss": torch.tensor(1.5)})
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    r = ClusterState()
    r.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(r.centroids, s.centroids) and r.started and r.start_step == 7
    assert float(r.last_stats["loss"]) == 1.5
    fresh = ClusterState()
    fresh.load_state_dict(ClusterState().state_dict())
    assert fresh.centroids is None and not fresh.started and fresh.start_step is None


def test_cluster_state_refuses_corrupt_dict():
    with pytest.raises(ValueError, match="missing"):
        ClusterState().load_state_dict({"centroids": None})
    bad = ClusterState().state_dict() | {"started": True}
    with pytest.raises(ValueError, match="corrupt"):
        ClusterState().load_state_dict(bad)


# ----------------------------------------------------------------------------- centroid precision
# The official update, written from ClusterNS's simcse/models.py (kmeans_cluster.forward and
# update, kmeans_optim "momentum") as it runs under --fp16 autocast: nn.CosineSimilarity is on
# autocast's float32 list, torch.matmul on its float16 list; the centroid Parameter was created
# with zeros_like(z1), so it is float16 when z1 (the [CLS] + MLP output) is.

def official_step(centroid: torch.Tensor, z1: torch.Tensor, lr: float, autocast_fp16: bool) -> torch.Tensor:
    datapoints = z1.clone().detach()
    sim = F.cosine_similarity(datapoints.float().unsqueeze(1), centroid.float().unsqueeze(0), dim=-1)
    dp_index = torch.argmax(sim, dim=-1)
    index_dp = F.one_hot(dp_index, centroid.shape[0]).T  # [k, N]
    if autocast_fp16:
        data = torch.matmul(index_dp.float().half(), datapoints.half())
    else:
        data = torch.matmul(index_dp.float(), datapoints)
    updated_centroid = index_dp.sum(dim=-1).bool().unsqueeze(1).expand_as(centroid)
    data += centroid * updated_centroid.logical_not()
    return lr * data + (1 - lr) * centroid


def exact_float32_step(centroid: torch.Tensor, z1: torch.Tensor, lr: float) -> torch.Tensor:
    """Our documented float32 update: c <- lr * sum + (1 - lr) * c for non-empty clusters, others kept."""
    z = z1.detach().float()
    members = (assign(z, centroid).unsqueeze(1) == torch.arange(centroid.shape[0])).float()  # [B, K]
    sums, counts = members.T @ z, members.sum(0)
    return torch.where((counts > 0).unsqueeze(1), lr * sums + (1 - lr) * centroid, centroid)


def embedding_batches(steps: int, dtype: torch.dtype, b: int = 48, d: int = 16):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, d, generator=g)  # six directions: clusters that stay populated
    out = []
    for _ in range(steps):
        z1 = base[torch.randint(6, (b,), generator=g)] + 0.3 * torch.randn(b, d, generator=g)
        z2 = z1 + 0.1 * torch.randn(b, d, generator=g)
        out.append((torch.tanh(z1).to(dtype), torch.tanh(z2).to(dtype)))  # tanh: the MLP's range
    return out


@pytest.mark.parametrize("lr", [1e-3, 5e-4, 0.05])
def test_float16_centroids_follow_the_official_update_bit_for_bit(lr):
    from clusterns.method.objective import ObjectiveConfig, compute_objective

    cfg = ObjectiveConfig(kmeans=8, kmeans_lr=lr, kmean_cosine=1.0, centroid_dtype="embedding")
    state, rng = ClusterState(), torch.Generator().manual_seed(0)
    batches = embedding_batches(6, torch.float16)
    compute_objective(*batches[0], state, cfg, 1, rng, autocast_dtype=torch.float16)  # initialises
    assert state.centroids.dtype == torch.float16  # zeros_like(z1): the embedding's dtype
    reference = state.centroids.clone()
    empty_seen = False
    for step, (z1, z2) in enumerate(batches[1:], start=2):
        empty_seen |= bool((assign(z1, reference).bincount(minlength=8) == 0).any())
        reference = official_step(reference, z1, lr, autocast_fp16=True)
        compute_objective(z1, z2, state, cfg, step, rng, autocast_dtype=torch.float16)
        assert state.centroids.dtype == torch.float16
        assert torch.equal(state.centroids, reference), f"step {step}"
    assert empty_seen  # the official recomputation of empty clusters is exercised too


def test_float16_rounding_loses_part_of_a_small_momentum_step():
    """What centroid_dtype: float32 improves: at lr 1e-3 float16 keeps only part of the drift."""
    (z1, _), = embedding_batches(1, torch.float16)
    c16 = init_centroids(z1, z1, 8, 0, dtype=torch.float16)
    c32 = c16.float()
    new16 = official_step(c16, z1, 1e-3, autocast_fp16=True).float()
    new32 = official_step(c32, z1.float(), 1e-3, autocast_fp16=False)
    drift32, lost = (new32 - c32).abs().sum(), (new16 - new32).abs().sum()
    assert 0.02 < float(lost / drift32) < 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_float32_centroids_follow_the_exact_update_bit_for_bit(dtype):
    from clusterns.method.objective import ObjectiveConfig, compute_objective

    cfg = ObjectiveConfig(kmeans=8, kmeans_lr=1e-3, kmean_cosine=1.0, centroid_dtype="float32")
    state, rng = ClusterState(), torch.Generator().manual_seed(0)
    batches = embedding_batches(5, dtype)
    compute_objective(*batches[0], state, cfg, 1, rng, autocast_dtype=torch.float16)
    assert state.centroids.dtype == torch.float32
    reference = state.centroids.clone()
    for step, (z1, z2) in enumerate(batches[1:], start=2):
        reference = exact_float32_step(reference, z1, 1e-3)
        compute_objective(z1, z2, state, cfg, step, rng, autocast_dtype=torch.float16)
        assert torch.equal(state.centroids, reference), f"step {step}"


@pytest.mark.parametrize("dtype,autocast_fp16", [(torch.float16, True), (torch.float32, False)])
def test_official_update_recomputes_empty_clusters(dtype, autocast_fp16):
    """An empty cluster's centroid is recomputed as lr * c + (1 - lr) * c, in the centroid's
    dtype, which rounds it off its old value (the exact update keeps it bit for bit)."""
    g = torch.Generator().manual_seed(3)
    centroids = torch.randn(8, 16, generator=g).to(dtype)
    z = (centroids[0] + 0.01 * torch.randn(4, 16, generator=g)).to(dtype)  # every row in cluster 0
    assert assign(z, centroids).eq(0).all()
    got = momentum_update_official(centroids, z, 0.3, matmul_dtype=torch.float16 if autocast_fp16 else None)
    assert got.dtype == dtype
    assert torch.equal(got, official_step(centroids, z, 0.3, autocast_fp16))
    assert not torch.equal(got[1:], centroids[1:])  # the empty clusters moved by rounding
    assert torch.equal(momentum_update(centroids.float(), z, 0.3)[1:], centroids[1:].float())
