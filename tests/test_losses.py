"""InfoNCE and BML (docs/method.md steps 1, 4e, 4f): literal values on tiny inputs, equality with an
explicitly built logits matrix, float64 gradchecks and low-precision behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clusterns.method.losses import bml_loss, cosine_matrix, info_nce


pytestmark = pytest.mark.usefixtures("single_thread")


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


E2 = t([[1.0, 0.0], [0.0, 1.0]])


def reference_logits(z1, z2, temp, h=None, w=0.0):
    """Official-style logits: nn.CosineSimilarity on broadcast pairs, weight on the 2nd block's diagonal."""
    s = F.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1) / temp
    if h is None:
        return s
    hs = F.cosine_similarity(z1.unsqueeze(1), h.unsqueeze(0), dim=-1) / temp
    weights = torch.zeros_like(hs)
    for i in range(hs.shape[0]):
        weights[i, i] = w
    return torch.cat([s, hs + weights], dim=1)


# ----------------------------------------------------------------------------- InfoNCE

def test_info_nce_literal_values():
    # logits [[1, 0], [0, 1]] -> each row: -log(e / (e + 1)) = log(1 + e^-1)
    assert info_nce(E2, E2, 1.0).item() == pytest.approx(0.31326168751822286, rel=1e-6)
    # temp 0.5 -> logits [[2, 0], [0, 2]] -> log(1 + e^-2)
    assert info_nce(E2, E2, 0.5).item() == pytest.approx(0.1269280110429726, rel=1e-6)


def test_info_nce_literal_with_hard_negatives_and_weight():
    h = t([[0.0, 1.0], [1.0, 0.0]])
    # rows: [1, 0 | 0, 1] and [0, 1 | 1, 0] -> log((2e + 2) / e)
    assert info_nce(E2, E2, 1.0, h).item() == pytest.approx(1.0064088680781682, rel=1e-6)
    # weight .5 on the 2nd block's diagonal: [1, 0 | .5, 1], [0, 1 | 1, .5] -> log((2e + 1 + e^.5) / e)
    assert info_nce(E2, E2, 1.0, h, 0.5).item() == pytest.approx(1.0900457339193235, rel=1e-6)


@pytest.mark.parametrize("with_h,w", [(False, 0.0), (True, 0.0), (True, 0.7), (True, -1.3)])
def test_info_nce_equals_cross_entropy_of_explicit_logits(with_h, w):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(9, 5, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(9, 5, generator=g, dtype=torch.float64)
    h = torch.randn(9, 5, generator=g, dtype=torch.float64) if with_h else None
    logits = reference_logits(z1, z2, 0.05, h, w)
    assert logits.shape == (9, 18 if with_h else 9)
    expected = F.cross_entropy(logits, torch.arange(9))
    got = info_nce(z1, z2, 0.05, h, w) if with_h else info_nce(z1, z2, 0.05)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_info_nce_refuses_bad_arguments():
    with pytest.raises(ValueError, match="temp"):
        info_nce(E2, E2, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        info_nce(E2, torch.ones(3, 2), 0.05)
    with pytest.raises(ValueError, match="hard_negatives"):
        info_nce(E2, E2, 0.05, torch.ones(3, 2))
    with pytest.raises(ValueError, match="hard_negative_weight"):
        info_nce(E2, E2, 0.05, None, 1.0)


# ----------------------------------------------------------------------------- BML

def bml_on_cos(c, alpha=0.1, beta=0.3):
    """B = 2: z1 = (e0, e1), z2 = (e0, (c, sqrt(1 - c^2))), mask only (0, 1): Δ_01 = c - 1."""
    z2 = t([[1.0, 0.0], [c, math.sqrt(1.0 - c * c)]], torch.float64)
    mask = torch.tensor([[False, True], [False, False]])
    return bml_loss(E2.double(), z2, mask, alpha, beta).item()


def test_bml_literal_values():
    # the three masked-out entries (Δ = 0) contribute ReLU(.1) + ReLU(-.3) = .1 each: .3 in total
    assert bml_on_cos(0.8) == pytest.approx((0.3 + 0.0) / 4)    # Δ = -.2, inside [-.3, -.1]
    assert bml_on_cos(0.5) == pytest.approx((0.3 + 0.2) / 4)    # Δ = -.5: ReLU(.5 - .3)
    assert bml_on_cos(0.95) == pytest.approx((0.3 + 0.05) / 4)  # Δ = -.05: ReLU(-.05 + .1)


def test_bml_zero_inside_band_and_linear_outside():
    inside = [bml_on_cos(c) for c in (0.7, 0.75, 0.8, 0.85, 0.9)]  # Δ in [-.3, -.1]
    assert inside == pytest.approx([0.075] * 5, abs=1e-12)
    # below the band (Δ < -β) slope -1 per entry, i.e. -1/4 in the mean over B² = 4 entries
    for c1, c2 in ((0.2, 0.4), (0.4, 0.6), (0.1, 0.65)):
        assert (bml_on_cos(c2) - bml_on_cos(c1)) / (c2 - c1) == pytest.approx(-0.25, rel=1e-9)
    # above the band (Δ > -α) slope +1/4
    for c1, c2 in ((0.91, 0.95), (0.95, 0.99)):
        assert (bml_on_cos(c2) - bml_on_cos(c1)) / (c2 - c1) == pytest.approx(0.25, rel=1e-9)


def test_bml_masked_out_entries_contribute_relu_alpha_plus_relu_minus_beta():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(6, 4, generator=g, requires_grad=True)
    z2 = torch.randn(6, 4, generator=g)
    none = torch.zeros(6, 6, dtype=torch.bool)
    loss = bml_loss(z1, z2, none, 0.25, 0.3)
    assert loss.item() == pytest.approx(0.25)  # ReLU(.25) + ReLU(-.3)
    loss.backward()
    assert torch.count_nonzero(z1.grad) == 0


def test_bml_refuses_wrong_mask_shape():
    with pytest.raises(ValueError, match="mask"):
        bml_loss(E2, E2, torch.zeros(3, 3, dtype=torch.bool), 0.0, 0.3)


# ----------------------------------------------------------------------------- gradients

def _inputs(seed=0, b=4, d=3):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(b, d, generator=g, dtype=torch.float64)
    return z1, z2, h


def test_gradcheck_info_nce():
    z1, z2, h = _inputs()
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.5), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: info_nce(a, b, 0.5, h, 0.3), (z1, z2))
    hh = h.clone().requires_grad_(True)  # the loss is differentiable in h too (the objective detaches it)
    assert torch.autograd.gradcheck(lambda a, b, c: info_nce(a, b, 0.5, c), (z1, z2, hh))


def test_gradcheck_bml():
    z1, z2, _ = _inputs(seed=1, b=5)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0],
                         [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: bml_loss(a, b, mask, 0.1, 0.3), (z1, z2))
    assert torch.autograd.gradcheck(lambda a, b: bml_loss(a, b, mask, -0.4, 0.2), (z1, z2))


# ----------------------------------------------------------------------------- precision

def test_low_precision_inputs_give_float32_cosines_under_autocast():
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(8, 16, generator=g).bfloat16().requires_grad_(True)
    z2 = torch.randn(8, 16, generator=g).bfloat16()
    h = torch.randn(8, 16, generator=g)
    mask = torch.rand(8, 8, generator=g) > 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = cosine_matrix(z1, z2)
        loss = info_nce(z1, z2, 0.05, h) + bml_loss(z1, z2, mask, 0.1, 0.3)
    assert c.dtype == torch.float32 and loss.dtype == torch.float32
    ref = info_nce(z1.float(), z2.float(), 0.05, h) + bml_loss(z1.float(), z2.float(), mask, 0.1, 0.3)
    assert torch.allclose(loss, ref, rtol=1e-6)
    loss.backward()
    assert z1.grad is not None and z1.grad.dtype == torch.bfloat16
