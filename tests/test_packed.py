"""The padding-free training forward (clusterns.model.packed) against the HF forward it replaces."""

from __future__ import annotations

import copy

import pytest
import torch

from clusterns.model import packed
from clusterns.model.encoder import POOLERS, SentenceEncoder, duplicate_views, load_backbone
from clusterns.model.packed import check_against_hf, packed_forward, token_index, unsupported_reason
from conftest import FLOAT32_SCALE_TOL, FLOAT64_SCALE_TOL, assert_close_on_scale, make_tiny_bert, make_tiny_roberta


@pytest.fixture(scope="module", params=["bert", "roberta"])
def pristine(request, tmp_path_factory):
    make = make_tiny_bert if request.param == "bert" else make_tiny_roberta
    path = make(tmp_path_factory.mktemp(request.param), layers=3, hidden=48)
    torch.manual_seed(0)
    model = load_backbone(path)
    model.pooler.dense.bias.data.normal_()  # a non-trivial pooler so 'cls' is compared too
    return model.float()


@pytest.fixture()
def backbone(pristine):
    """A fresh copy per test: tests change dropout, modes and configs, and nothing may leak into
    the next test whatever the order or outcome."""
    return copy.deepcopy(pristine)


def set_dropout(module: torch.nn.Module, p: float) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def ragged_batch(model, lengths, seed=0, left=False):
    gen = torch.Generator().manual_seed(seed)
    pad = int(model.config.pad_token_id or 0)
    width = max(lengths)
    ids = torch.randint(pad + 3, model.config.vocab_size, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        mask[row, cols] = 1
    ids[mask == 0] = pad
    return ids, mask


@pytest.mark.parametrize("lengths", [[9, 4, 1, 9, 6], [7, 7, 7]])  # ragged, and no padding at all
def test_every_layer_equals_hf_on_real_positions(backbone, lengths):
    backbone.eval()
    ids, mask = ragged_batch(backbone, lengths)
    with torch.no_grad():
        ref = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        got = packed_forward(backbone, ids, mask, output_hidden_states=True)
    keep = mask.bool()
    assert len(got.hidden_states) == len(ref.hidden_states) == backbone.config.num_hidden_layers + 1
    for i, (r, g) in enumerate(zip(ref.hidden_states, got.hidden_states)):
        assert_close_on_scale(g[keep], r[keep], msg=f"hidden state {i}")
        assert torch.all(g[~keep] == 0)  # pad rows are zero, not HF's masked-out values
    assert_close_on_scale(got.last_hidden_state[keep], ref.last_hidden_state[keep], msg="last hidden state")
    assert_close_on_scale(got.pooler_output, ref.pooler_output, msg="pooler output")


def training_pass(backbone, pooler: str, packed_on: bool, ids, mask):
    """Embeddings of two views and every backbone gradient of one train-mode pass, dropout 0."""
    torch.manual_seed(0)
    enc = SentenceEncoder(backbone, pooler=pooler, packed=packed_on)
    if enc.mlp is not None:
        torch.manual_seed(1)
        enc.mlp.dense.weight.data.normal_(std=0.5)
    enc.to(next(backbone.parameters()).dtype)
    set_dropout(enc, 0.0)
    backbone.zero_grad(set_to_none=True)
    enc.train()
    z1, z2 = enc.encode_views(ids, mask)
    (z1.pow(3).sum() + (z1 * z2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
    return z1.detach(), z2.detach(), grads


def compare_training(backbone, pooler: str, dtype: torch.dtype, tol: float) -> None:
    """Packed vs HF training pass: the embeddings equal up to ``tol`` of their scale, every
    gradient up to ``tol`` of the scale of the whole gradient (its largest entry over all
    parameters). Not each tensor's own scale: a gradient element can be a cancellation of terms
    10^4 times larger, and the attention key biases' gradient is mathematically zero (softmax
    ignores a constant shift of a query's logits), so theirs is pure rounding noise."""
    model = copy.deepcopy(backbone).to(dtype)
    ids, mask = ragged_batch(model, [10, 3, 8, 1, 10, 5], seed=1)
    (r1, r2, rg), (g1, g2, gg) = (training_pass(model, pooler, on, ids, mask) for on in (False, True))
    assert_close_on_scale(g1, r1, tol, "z1")
    assert_close_on_scale(g2, r2, tol, "z2")
    assert rg.keys() == gg.keys() and rg
    scale = max(float(g.abs().max()) for g in rg.values())
    for name in rg:
        assert_close_on_scale(gg[name], rg[name], tol, name, scale=scale)


@pytest.mark.parametrize("pooler", POOLERS)
def test_encoder_training_embeddings_and_gradients_equal_hf(backbone, pooler):
    """Train mode with dropout 0: the packed encoder's embeddings and every gradient equal HF's,
    in float64 (where only rounding at 1e-16 separates them) and in float32 (the production dtype)."""
    compare_training(backbone, pooler, torch.float64, FLOAT64_SCALE_TOL)
    compare_training(backbone, pooler, torch.float32, FLOAT32_SCALE_TOL)


def _drop_last_token(monkeypatch):
    original = packed.token_index
    monkeypatch.setattr(packed, "token_index", lambda m: original(m)[:-1])


def _shift_attention_rows(monkeypatch):
    original = packed._attention
    monkeypatch.setattr(packed, "_attention", lambda *a, **k: original(*a, **k).roll(1, dims=0))


def _skip_last_layer(monkeypatch):
    original = packed.packed_forward

    def forward(backbone, *args, **kwargs):
        layers = backbone.encoder.layer
        backbone.encoder.layer = layers[:-1]
        try:
            return original(backbone, *args, **kwargs)
        finally:
            backbone.encoder.layer = layers

    monkeypatch.setattr(packed, "packed_forward", forward)


@pytest.mark.parametrize("breakage", [_drop_last_token, _shift_attention_rows, _skip_last_layer],
                         ids=["missing_token", "wrong_row", "dropped_layer"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, FLOAT64_SCALE_TOL), (torch.float32, FLOAT32_SCALE_TOL)],
                         ids=["float64", "float32"])
def test_the_comparison_catches_a_broken_packed_forward(backbone, monkeypatch, breakage, dtype, tol):
    """The tolerances above are rounding-sized: a packed forward that loses a token, writes a row
    to the wrong token or drops a layer fails them."""
    breakage(monkeypatch)
    with pytest.raises(AssertionError, match="of the scale"):
        compare_training(backbone, "avg", dtype, tol)


def test_left_padding_and_single_token_rows(backbone):
    backbone.eval()
    ids, mask = ragged_batch(backbone, [6, 1, 4], seed=2, left=True)
    with torch.no_grad():
        ref = backbone(input_ids=ids, attention_mask=mask, return_dict=True)
        got = packed_forward(backbone, ids, mask)
    keep = mask.bool()
    assert_close_on_scale(got.last_hidden_state[keep], ref.last_hidden_state[keep])


def test_dropout_is_active_and_seeded(backbone):
    """With dropout the two views differ, and the same seed gives the same views."""
    enc = SentenceEncoder(backbone, pooler="avg", packed=True).train()
    ids, mask = ragged_batch(backbone, [8, 5, 3], seed=3)
    torch.manual_seed(7)
    a1, a2 = enc.encode_views(ids, mask)
    torch.manual_seed(7)
    b1, b2 = enc.encode_views(ids, mask)
    assert not torch.allclose(a1, a2)
    torch.testing.assert_close(a1, b1, rtol=0, atol=0)
    torch.testing.assert_close(a2, b2, rtol=0, atol=0)


def test_live_check_passes_and_catches_a_changed_layout(backbone):
    backbone.train()
    # check_against_hf's measure is already judged on each tensor's scale (max diff / max value)
    assert check_against_hf(backbone) < FLOAT32_SCALE_TOL
    assert backbone.training  # the check runs in eval mode and restores the mode
    # transformers computing something the packed path does not reproduce (here: an attention
    # module whose own forward changed) is caught by the live check.
    sa = backbone.encoder.layer[0].attention.self
    original = sa.forward
    sa.forward = lambda *a, **k: tuple(x * 2 if torch.is_tensor(x) else x for x in original(*a, **k))
    with pytest.raises(RuntimeError, match="training.packed: false"):
        check_against_hf(backbone)


def test_unsupported_layouts_are_named(backbone):
    assert unsupported_reason(backbone) is None
    backbone.config.position_embedding_type = "relative_key"
    assert "relative_key" in unsupported_reason(backbone)
    assert "layout" in unsupported_reason(torch.nn.Linear(2, 2)) or "config" in unsupported_reason(torch.nn.Linear(2, 2))


def test_precomputed_index_two_views_and_no_host_sync(backbone, monkeypatch):
    """With the loader's token index the packed training forward reads nothing back from the device
    (no GPU sync), and gives the same views as the index computed in the forward."""
    enc = SentenceEncoder(backbone, pooler="avg", packed=True).train()
    set_dropout(enc, 0.0)
    ids, mask = ragged_batch(backbone, [8, 2, 5, 8], seed=4)
    ref1, ref2 = enc.encode_views(ids, mask)
    index = token_index(mask)
    _, mask2, _, index2 = duplicate_views(ids, mask, None, index)
    assert torch.equal(index2, token_index(mask2))  # the shifted copy is the 2B batch's own index

    def refuse(*args, **kwargs):
        raise AssertionError("host sync (tensor value read / data-dependent shape) in the packed forward")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    with pytest.raises(AssertionError, match="host sync"):  # without the index the forward must look
        enc.encode_views(ids, mask)
    z1, z2 = enc.encode_views(ids, mask, token_index=index)
    (z1.sum() + z2.sum()).backward()
    monkeypatch.undo()
    # the same operations on the same inputs: bit-identical, not merely close
    torch.testing.assert_close(z1, ref1, rtol=0, atol=0)
    torch.testing.assert_close(z2, ref2, rtol=0, atol=0)


def test_per_token_work_runs_on_the_real_tokens_only(backbone):
    """A hook on every layer's FFN sees exactly the real-token rows (T = mask.sum(), not B x L),
    and they are the HF forward's FFN inputs at the real positions."""
    backbone.eval()
    ids, mask = ragged_batch(backbone, [9, 4, 1, 9, 6])
    keep = mask.bool()
    seen = {}

    def hook(name):
        return lambda module, inputs, output: seen.setdefault(name, []).append(inputs[0].detach())

    handles = [layer.intermediate.register_forward_hook(hook(i)) for i, layer in enumerate(backbone.encoder.layer)]
    try:
        with torch.no_grad():
            packed_forward(backbone, ids, mask)
            backbone(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    for i, (packed_in, hf_in) in seen.items():
        assert packed_in.shape == (int(mask.sum()), backbone.config.hidden_size), (i, packed_in.shape)
        assert hf_in.shape[:2] == ids.shape  # HF: every position, pads included
        assert_close_on_scale(packed_in, hf_in[keep], msg=f"layer {i} FFN input")
