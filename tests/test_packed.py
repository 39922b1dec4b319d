"""The padding-free training forward (clusterns.packed) against the HF forward it replaces."""

from __future__ import annotations

import pytest
import torch

from clusterns.encoder import POOLERS, SentenceEncoder, duplicate_views, load_backbone
from clusterns.packed import check_against_hf, packed_forward, token_index, unsupported_reason
from conftest import make_tiny_bert, make_tiny_roberta


@pytest.fixture(scope="module", params=["bert", "roberta"])
def backbone(request, tmp_path_factory):
    make = make_tiny_bert if request.param == "bert" else make_tiny_roberta
    path = make(tmp_path_factory.mktemp(request.param), layers=3, hidden=48)
    torch.manual_seed(0)
    model = load_backbone(path)
    model.pooler.dense.bias.data.normal_()  # a non-trivial pooler so 'cls' is compared too
    return model.float()


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
    for r, g in zip(ref.hidden_states, got.hidden_states):
        torch.testing.assert_close(g[keep], r[keep], rtol=1e-5, atol=1e-5)
        assert torch.all(g[~keep] == 0)  # pad rows are zero, not HF's masked-out values
    torch.testing.assert_close(got.last_hidden_state[keep], ref.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooler", POOLERS)
def test_encoder_training_embeddings_and_gradients_equal_hf(backbone, pooler):
    """Train mode with dropout 0: the packed encoder's embeddings and every gradient equal HF's."""
    ids, mask = ragged_batch(backbone, [10, 3, 8, 1, 10, 5], seed=1)
    results = []
    for packed in (False, True):
        torch.manual_seed(0)
        enc = SentenceEncoder(backbone, pooler=pooler, packed=packed)
        if enc.mlp is not None:
            torch.manual_seed(1)
            enc.mlp.dense.weight.data.normal_(std=0.5)
        for m in enc.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        backbone.zero_grad(set_to_none=True)
        enc.train()
        z1, z2 = enc.encode_views(ids, mask)
        (z1.pow(3).sum() + (z1 * z2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
        results.append((z1.detach(), z2.detach(), grads))
    for d in backbone.modules():
        if isinstance(d, torch.nn.Dropout):
            d.p = 0.1
    (r1, r2, rg), (g1, g2, gg) = results
    torch.testing.assert_close(g1, r1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2, r2, rtol=1e-5, atol=1e-6)
    assert rg.keys() == gg.keys() and rg
    for name in rg:
        torch.testing.assert_close(gg[name], rg[name], rtol=1e-4, atol=1e-6, msg=name)


def test_left_padding_and_single_token_rows(backbone):
    backbone.eval()
    ids, mask = ragged_batch(backbone, [6, 1, 4], seed=2, left=True)
    with torch.no_grad():
        ref = backbone(input_ids=ids, attention_mask=mask, return_dict=True)
        got = packed_forward(backbone, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[keep], ref.last_hidden_state[keep], rtol=1e-5, atol=1e-5)


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
    assert check_against_hf(backbone) < 1e-5
    assert backbone.training  # the check runs in eval mode and restores the mode
    # transformers computing something the packed path does not reproduce (here: an attention
    # module whose own forward changed) is caught by the live check.
    sa = backbone.encoder.layer[0].attention.self
    original = sa.forward
    sa.forward = lambda *a, **k: tuple(x * 2 if torch.is_tensor(x) else x for x in original(*a, **k))
    try:
        with pytest.raises(RuntimeError, match="training.packed: false"):
            check_against_hf(backbone)
    finally:
        del sa.forward


def test_unsupported_layouts_are_named(backbone):
    assert unsupported_reason(backbone) is None
    cfg = backbone.config
    cfg.position_embedding_type = "relative_key"
    try:
        assert "relative_key" in unsupported_reason(backbone)
    finally:
        cfg.position_embedding_type = "absolute"
    assert "layout" in unsupported_reason(torch.nn.Linear(2, 2)) or "config" in unsupported_reason(torch.nn.Linear(2, 2))


def test_precomputed_index_two_views_and_no_host_sync(backbone, monkeypatch):
    """With the loader's token index the packed training forward reads nothing back from the device
    (no GPU sync), and gives the same views as the index computed in the forward."""
    enc = SentenceEncoder(backbone, pooler="avg", packed=True).train()
    for m in enc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
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
    for m in enc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    torch.testing.assert_close(z1, ref1, rtol=0, atol=0)
    torch.testing.assert_close(z2, ref2, rtol=0, atol=0)
