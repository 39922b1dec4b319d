"""Prompt-based ClusterNS (clusterns.model.prompt): templates, token assembly, denoising, encoder, embedders.

Tiny random models only. Real-vocabulary checks use the packaged MiniLM tokenizer (the uncased
BERT word-piece vocabulary). For RoBERTa a tiny byte-level BPE whose merges spell the template
words as single tokens stands in for the real vocabulary (the real ids are not available
offline); the conftest's merge-less RoBERTa checks the general (character-level) case.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close_on_scale, make_bpe_roberta
import torch
from torch import nn

from clusterns.evaluation.embedding import Embedder, embedder, prompt_embedder
from clusterns.model.prompt import (PROMPT_CONFIG_FILE, TEMPLATES, PromptEncoder, Template, assemble,
                                    check_prefix_lengths, delta_position_ids, detect_family, format_test_sentence,
                                    load_prompt_config, make_prompt_collate, prompt_config, save_prompt_config,
                                    sentence_only_ids, sentence_position_ids, template_deltas, template_pair)

pytestmark = pytest.mark.usefixtures("single_thread")

SENTENCES = ["a man is playing", "the dog runs", "two people on a guitar", "this is a cat",
             "a woman with a dog", "the man is playing guitar"]
BERT_TAU = (101, 2023, 6251, 1997, 1000, 1000, 2965, 103, 1012, 102)
SHORT_BERT_TEMPLATE = '*cls*_This_sentence_"*sent_0*"_means*mask*.*sep+*'  # 3 prefix tokens, not 4


@pytest.fixture(scope="module")
def bpe_roberta(tmp_path_factory) -> Path:
    return make_bpe_roberta(tmp_path_factory.mktemp("bpe_roberta"))


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _backbone(path, dropout=None):
    from clusterns.model.encoder import load_backbone

    return load_backbone(path, dropout=dropout)


class Recorder(nn.Module):
    """Passes calls to a backbone and records the position ids of each call."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone
        self.config = backbone.config
        self.calls: list = []

    def forward(self, **kwargs):
        self.calls.append(kwargs.get("position_ids"))
        return self.inner(**kwargs)


# ------------------------------------------------------------------------------------------------
# Templates


def test_bert_template_ids_with_the_real_uncased_vocab(minilm):
    tok = _tok(minilm)
    t1, t2 = template_pair(tok)
    assert t1.family == "bert" and t1.template == TEMPLATES["bert"][0]
    assert t1.tau == BERT_TAU
    assert t1.prefix_ids == BERT_TAU[:5] and t1.suffix_ids == BERT_TAU[5:]
    assert t1.prefix_ns == BERT_TAU[1:5] and t1.suffix_ns == BERT_TAU[5:9]
    assert t1.mask_id == 103 and t1.length == 10 and t1.tau_mask_index == 7 and t1.tail == 3
    assert tok.convert_ids_to_tokens(list(t2.tau)) == ["[CLS]", "this", "sentence", ":", '"', '"', "means",
                                                       "[MASK]", ".", "[SEP]"]
    # A real sentence: the [MASK] sits at n + 7 = L - 3.
    sent = sentence_only_ids(tok, ["A man is playing a guitar."])
    ids, mask = assemble(sent, t1)
    n = len(sent[0])
    assert ids[0, n + 7].item() == 103 and int(mask.sum()) - 3 == n + 7
    # Test-time (string-level) BERT input = training layout of the sentence with its appended period.
    text = format_test_sentence(t1.template, "a man is playing", tok.mask_token)
    assert text == 'This sentence of "a man is playing." means[MASK].'
    assert tok(text)["input_ids"] == assemble(sentence_only_ids(tok, ["a man is playing."]), t1)[0][0].tolist()


def test_roberta_template_tokens_and_stripping(bpe_roberta, tiny_roberta):
    tok = _tok(bpe_roberta)
    t1, t2 = template_pair(tok)
    assert t1.family == "roberta"
    assert t1.prefix_text == "This sentence : '" and t1.suffix_text == " ' means<mask>."  # prefix stripped
    assert tok.convert_ids_to_tokens(list(t1.tau)) == ["<s>", "This", "Ġsentence", "Ġ:", "Ġ'", "Ġ'", "Ġmeans",
                                                       "<mask>", ".", "</s>"]
    assert tok.convert_ids_to_tokens(list(t2.tau))[1] == "The"
    for t in (t1, t2):
        assert len(t.prefix_ns) == 4 and len(t.suffix_ns) == 4 and t.length == 10 and t.tau_mask_index == 7
    # Training: the sentence alone, so its first word has no Ġ (docs/prompt.md §1.3).
    assert tok.convert_ids_to_tokens(sentence_only_ids(tok, ["a man is playing"])[0]) == ["a", "Ġman", "Ġis", "Ġplaying"]
    # Merge-less byte-level BPE: the identity holds with character-level sizes.
    char = _tok(tiny_roberta)
    for text in TEMPLATES["roberta"]:
        t = Template.from_string(text, char)
        assert t.length == len(t.prefix_ns) + len(t.suffix_ns) + 2
        assert char.convert_ids_to_tokens([t.prefix_ns[0]]) == ["T"]  # stripped: no leading Ġ


def test_test_time_formatting():
    bert, roberta = TEMPLATES["bert"][0], TEMPLATES["roberta"][0]
    assert format_test_sentence(roberta, "a man is playing", "<mask>") == "This sentence : ' a man is playing. ' means<mask>."
    assert format_test_sentence(bert, "is it?", "[MASK]") == 'This sentence of "is it?" means[MASK].'
    assert format_test_sentence(bert, "he said 'no'", "[MASK]") == 'This sentence of "he said \'no\'" means[MASK].'
    assert format_test_sentence(bert, "", "[MASK]") == 'This sentence of "" means[MASK].'


def test_template_refusals(tiny_bert):
    tok = _tok(tiny_bert)
    with pytest.raises(ValueError, match="literal space"):
        Template.from_string('This sentence "*sent_0*" means*mask*.', tok)
    with pytest.raises(ValueError, match=r"\*sent_0\* exactly once"):
        Template.from_string("*cls*_This_means*mask*.*sep+*", tok)
    with pytest.raises(ValueError, match="must follow"):
        Template.from_string('*cls*_*mask*_"*sent_0*"_means.*sep+*', tok)
    # Prefix and suffix that merge when tokenized together: τ != [BOS] + P_ns + S_ns + [EOS].
    with pytest.raises(ValueError, match=r"\|P_ns\| \+ \|S_ns\| \+ 2"):
        Template.from_string("*cls*_This_sentence_of*sent_0*means*mask*.*sep+*", tok)


def test_family_detection_reads_the_config_not_the_path(tiny_bert, tmp_path):
    import shutil

    from transformers import AutoConfig

    misleading = tmp_path / "my-roberta-copy"
    shutil.copytree(tiny_bert, misleading)
    assert detect_family(misleading) == "bert"  # the original's substring test would say roberta
    assert detect_family(AutoConfig.from_pretrained(misleading)) == "bert"
    assert detect_family(_tok(misleading)) == "bert"
    assert detect_family("roberta") == "roberta"
    cfg = json.loads((misleading / "config.json").read_text())
    (misleading / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="BERT and RoBERTa"):
        detect_family(misleading)


# ------------------------------------------------------------------------------------------------
# Assembly


@pytest.mark.parametrize("which", ["bert", "roberta"])
def test_mask_index_is_n_plus_7_and_truncation_keeps_the_template(which, minilm, bpe_roberta, tiny_roberta):
    tok = _tok(minilm if which == "bert" else bpe_roberta)
    for text in TEMPLATES[which]:
        t = Template.from_string(text, tok)
        assert t.length == len(t.prefix_ns) + len(t.suffix_ns) + 2 == 10
        word = sentence_only_ids(tok, ["a man"])[0][-1:]  # one token ("man" / "Ġman")
        sents = [word * n for n in range(33)]
        ids, mask = assemble(sents, t, max_len=32)
        for n in range(33):
            L = int(mask[n].sum())
            assert L == n + 10 and t.mask_index(n) == n + 7 == L - 3
            assert ids[n, n + 7].item() == t.mask_id and (ids[n] == t.mask_id).sum() == 1
            assert ids[n, L:].eq(t.pad_id).all()
        # A 100-token sentence is cut to its first 32 tokens; the template is intact at both ends.
        long = sentence_only_ids(tok, [" ".join(["man"] * 100)], max_len=32)
        assert len(long[0]) == 32
        uncut = sentence_only_ids(tok, [" ".join(["man"] * 100)], max_len=None)
        assert len(uncut[0]) >= 100 and uncut[0][:32] == long[0]
        for row in (assemble(long, t)[0][0], assemble(uncut, t, max_len=32)[0][0]):
            assert row.shape[0] == 42
            assert row[:5].tolist() == list(t.prefix_ids) and row[-5:].tolist() == list(t.suffix_ids)
            assert row[5:37].tolist() == uncut[0][:32] and row[39].item() == t.mask_id
    # Character-level BPE: general formula, mask at L - tail.
    char = _tok(tiny_roberta)
    t = Template.from_string(TEMPLATES["roberta"][0], char)
    ids, mask = assemble([[70] * n for n in range(33)], t)
    for n in range(33):
        assert ids[n, t.mask_index(n)].item() == t.mask_id == ids[n, int(mask[n].sum()) - t.tail].item()


def test_collate_builds_both_views(bpe_roberta):
    tok = _tok(bpe_roberta)
    t1, t2 = template_pair(tok)
    sents = sentence_only_ids(tok, ["a man is playing", " ".join(["man"] * 40)], max_len=None)
    batch = make_prompt_collate(t1, t2, max_len=32)(sents)
    assert batch["input_ids"].shape == (4, 42)
    assert batch["lengths"].tolist() == [4, 32, 4, 32]
    assert batch["input_ids"][0, 1].item() == t1.prefix_ids[1] != batch["input_ids"][2, 1].item() == t2.prefix_ids[1]
    for i, n in enumerate(batch["lengths"].tolist()):
        assert batch["input_ids"][i, n + 7].item() == t1.mask_id
    single = make_prompt_collate(t1, None)(sents)
    assert torch.equal(single["input_ids"][:2], single["input_ids"][2:])
    with pytest.raises(ValueError, match="prefixes differ"):
        make_prompt_collate(t1, Template.from_string("*cls*_The_'_*sent_0*_'_means*mask*.*sep+*", tok))


# ------------------------------------------------------------------------------------------------
# Denoising


def test_delta_positions_match_a_real_row_bert(minilm):
    tok = _tok(minilm)
    t = Template.from_string(TEMPLATES["bert"][0], tok)
    rows = 50
    pos = delta_position_ids(t, rows)
    for n in range(rows):
        ids, mask = assemble([[2158] * n], t)
        real = sentence_position_ids(ids, mask, "bert")[0]
        assert pos[n, :5].tolist() == real[:5].tolist() == list(range(5))
        assert pos[n, 5:].tolist() == real[5 + n:10 + n].tolist()  # suffix + EOS where the sentence puts them


def test_delta_positions_roberta_both_offsets(bpe_roberta):
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    tok = _tok(bpe_roberta)
    t1, t2 = template_pair(tok)
    rec = Recorder(_backbone(bpe_roberta))
    for mode, offset in (("original", -2), ("fixed", 0)):
        enc = PromptEncoder(rec, t1, t2, roberta_position_offset=mode)
        rec.calls.clear()
        enc.train()
        batch = make_prompt_collate(t1, t2)(sentence_only_ids(tok, SENTENCES[:2]))
        enc(**batch)
        assert rec.calls[0] is None  # the sentence pass: positions left to RoBERTa
        for pos in rec.calls[1:]:  # the two δ passes
            assert pos.shape == (50, 10)
            for n in (0, 1, 7, 32, 49):
                ids, mask = assemble([[tok.convert_tokens_to_ids("Ġman")] * n], t1)
                real = RobertaEmbeddings.create_position_ids_from_input_ids(ids, 1)[0]
                assert torch.equal(real, sentence_position_ids(ids, mask, "roberta", 1)[0])
                assert real[0].item() == 2
                assert (pos[n, 5:] - real[5 + n:10 + n]).tolist() == [offset] * 5
                assert (pos[n, :5] - real[:5]).tolist() == [offset] * 5


def test_delta_is_subtracted_per_row_length(tiny_bert):
    tok = _tok(tiny_bert)
    t1, t2 = template_pair(tok)
    backbone = _backbone(tiny_bert, dropout=0.0)  # deterministic train-mode passes
    enc = PromptEncoder(backbone, t1, t2)
    sents = sentence_only_ids(tok, ["a man", "the dog runs on the guitar"])
    batch = make_prompt_collate(t1, t2)(sents)
    n = batch["lengths"]
    assert n[0] != n[1]
    enc.train()
    with torch.no_grad():
        z = enc(**batch)
        last = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        h = last[torch.arange(4), n + 7]
        d1, d2 = template_deltas(backbone, t1, 50), template_deltas(backbone, t2, 50, prefix_len_from=t1)
        assert not torch.allclose(d1[n[0]], d1[n[1]])  # different lengths, different δ rows
        expected = h - torch.stack([d1[n[0]], d1[n[1]], d2[n[2]], d2[n[3]]])
        assert_close_on_scale(z, enc.mlp(expected))
        # Eval: template 1 rows, δ_1(n), no MLP; equals the token-level "denoised" embedder.
        enc.eval()
        ids, mask = assemble(sents, t1)
        e = enc(ids, mask)
        d1_eval = template_deltas(backbone, t1, 128)
        assert_close_on_scale(d1_eval[:50], d1)  # 128 vs 50 rows in one batch: rounding only
        assert_close_on_scale(e, h[:2] - d1_eval[n[:2]])
        texts = ["a man", "the dog runs on the guitar"]
        assert_close_on_scale(prompt_embedder(backbone, tok, t1, "denoised")(texts), e.numpy())
        assert_close_on_scale(prompt_embedder(backbone, tok, t1, "spliced")(texts), h[:2].numpy())


def test_prefix_length_guard(tiny_bert):
    tok = _tok(tiny_bert)
    t1 = Template.from_string(TEMPLATES["bert"][0], tok)
    short = Template.from_string(SHORT_BERT_TEMPLATE, tok)
    assert len(short.prefix_ns) == 3
    with pytest.raises(ValueError, match="prefixes differ"):
        check_prefix_lengths(t1, short)
    backbone = _backbone(tiny_bert)
    with pytest.raises(ValueError, match="prefixes differ"):
        template_deltas(backbone, short, 4, prefix_len_from=t1)
    with pytest.raises(ValueError, match="prefixes differ"):
        PromptEncoder(backbone, t1, short)
    with pytest.raises(ValueError, match="prefixes differ"):
        template_pair(tok, templates=(TEMPLATES["bert"][0], SHORT_BERT_TEMPLATE))


# ------------------------------------------------------------------------------------------------
# Training and evaluation


@pytest.mark.parametrize("which", ["bert", "roberta"])
def test_training_steps_with_clustering_and_gradient_through_delta(which, tiny_bert, bpe_roberta):
    from clusterns.method.clustering import ClusterState
    from clusterns.method.objective import ObjectiveConfig, compute_objective

    path = tiny_bert if which == "bert" else bpe_roberta
    tok = _tok(path)
    t1, t2 = template_pair(tok)
    torch.manual_seed(0)
    model = PromptEncoder(_backbone(path), t1, t2)
    if getattr(model.backbone, "pooler", None) is not None:
        model.backbone.pooler.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cfg = ObjectiveConfig(kmeans=4, kmean_cosine=1.0, bml_weight=0.01, bml_alpha=0.0, bml_beta=0.2,
                          hard_negatives=(which == "bert"))
    state, rng = ClusterState(), torch.Generator().manual_seed(0)
    collate = make_prompt_collate(t1, t2)
    sents = sentence_only_ids(tok, SENTENCES)
    model.train()
    outputs = []  # every backbone call's output: the sentence pass, then the two δ passes

    def keep(module, args, out):
        out.last_hidden_state.retain_grad()
        outputs.append(out.last_hidden_state)

    model.backbone.register_forward_hook(keep)
    for step in (1, 2, 3):
        batch = collate(sents)
        outputs.clear()
        z = model(**batch)
        b = len(sents)
        assert z.shape == (2 * b, 32)
        loss, stats = compute_objective(z[:b], z[b:], state, cfg, step, rng)
        assert torch.isfinite(loss)
        loss.backward()
        # Gradient reaches the encoder through both δ passes, at the rows ℓ = n that were used.
        assert [tuple(o.shape[:2]) for o in outputs[1:]] == [(50, 10), (50, 10)]
        for o, lengths in zip(outputs[1:], (batch["lengths"][:b], batch["lengths"][b:])):
            grad = o.grad[:, t1.tau_mask_index].abs().sum(1)
            assert grad[lengths].gt(0).all()
            unused = torch.ones(50, dtype=torch.bool)
            unused[lengths] = False
            assert grad[unused].eq(0).all()
        assert model.mlp.dense.weight.grad.abs().sum() > 0
        assert model.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert state.started and state.start_step == 1 and stats["clustering_started"] == 1


def test_template_deltas_carry_gradient(tiny_bert):
    tok = _tok(tiny_bert)
    t1 = Template.from_string(TEMPLATES["bert"][0], tok)
    backbone = _backbone(tiny_bert)
    backbone.train()
    torch.manual_seed(0)  # dropout masks: independent of the tests that ran before
    d = template_deltas(backbone, t1, 6)
    assert d.shape == (6, 32) and d.requires_grad
    # not d.sum(): a LayerNorm output sums to a constant over its features, so that gradient is
    # mathematically zero and what reaches the weights is rounding noise (sometimes exactly 0)
    d.pow(2).sum().backward()
    assert backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("which", ["bert", "roberta"])
def test_eval_embedders_and_no_mlp(which, tiny_bert, bpe_roberta):
    from clusterns.evaluation.sts import PairSet, STSTask, score_tasks

    path = tiny_bert if which == "bert" else bpe_roberta
    tok = _tok(path)
    t1, t2 = template_pair(tok)
    backbone = _backbone(path)
    texts = SENTENCES[:4] + ["is it?"]
    outs = {}
    for mode in ("raw", "denoised", "spliced"):
        embed = prompt_embedder(backbone, tok, which, mode, batch_size=2)
        outs[mode] = embed(texts)
        assert outs[mode].shape == (5, 32) and outs[mode].dtype == np.float32 and np.isfinite(outs[mode]).all()
    assert not np.allclose(outs["denoised"], outs["spliced"])
    # raw = the hidden state at the [MASK] of the string-level formatted input
    with torch.no_grad():
        text = format_test_sentence(t1.template, texts[0], tok.mask_token)
        enc = tok([text], return_tensors="pt")
        last = backbone(**enc).last_hidden_state[0]
        pos = (enc["input_ids"][0] == t1.mask_id).nonzero().item()
    assert_close_on_scale(outs["raw"][0], last[pos].numpy())  # batched (padded) vs alone
    assert prompt_embedder(backbone, tok, t1, "raw")([]).shape == (0, 32)
    # The MLP is not used in eval mode.
    model = PromptEncoder(backbone, t1, t2).eval()
    ids, mask = assemble(sentence_only_ids(tok, texts, max_len=None), t1)
    with torch.no_grad():
        before = model(ids, mask)
        nn.init.normal_(model.mlp.dense.weight, std=5.0)
        assert torch.equal(model(ids, mask), before)
    assert_close_on_scale(before.numpy(), outs["denoised"])  # one batch vs batches of 2
    assert_close_on_scale(Embedder(model.mask_encoder(tok))(texts), outs["denoised"])
    # score_tasks accepts the embedder.
    pairs = PairSet("toy", tuple(texts[:3]), tuple(texts[2:5]), (1.0, 3.0, 2.0))
    res = score_tasks([STSTask("STSBenchmark", (pairs,))], prompt_embedder(backbone, tok, t1, "raw"))
    assert np.isfinite(res["STSBenchmark"])


@pytest.mark.parametrize("which", ["bert", "roberta"])
def test_max_length_cuts_the_sentence_never_the_template(which, tiny_bert, bpe_roberta):
    """The clustering stage's cut: a long sentence embeds as its first max_length tokens with the
    whole template around them (the [MASK] is still found), for every protocol; an input longer
    than the position table is refused before anything is encoded."""
    path = tiny_bert if which == "bert" else bpe_roberta
    tok, backbone = _tok(path), _backbone(path)
    cfg = prompt_config(which, TEMPLATES[which], "raw")
    long_text = " ".join(["the man is playing guitar with a dog"] * 80)  # > 512 tokens on any tiny vocab
    assert len(tok(long_text, add_special_tokens=False)["input_ids"]) > 520
    n = 20
    ids = sentence_only_ids(tok, [long_text], max_len=n)[0]
    assert len(ids) == n
    for protocol in ("raw", "denoised", "spliced"):
        with pytest.raises(ValueError, match="does not fit the backbone"):
            embedder(backbone, tok, "mask", prompt=cfg, protocol=protocol)([long_text])
        got = embedder(backbone, tok, "mask", prompt=cfg, protocol=protocol, max_length=n)([long_text, SENTENCES[0]])
        if protocol == "raw":  # the string cut at the end of its n-th token
            ends = tok(long_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            want = embedder(backbone, tok, "mask", prompt=cfg, protocol="raw")([long_text[:ends[n - 1][1]]])
        else:  # the splice of the first n sentence tokens
            t1 = template_pair(tok)[0]
            encoder = embedder(backbone, tok, "mask", prompt=cfg, protocol=protocol).encoder
            with torch.no_grad():
                encoder.setup([n], torch.device("cpu"))
                want = encoder.encode([ids], torch.device("cpu")).numpy()
            assert t1.mask_index(n) < len(t1.prefix_ids) + n + len(t1.suffix_ids)
        assert_close_on_scale(got[0], want[0])
        # a short sentence is not changed by the cut
        assert_close_on_scale(got[1], embedder(backbone, tok, "mask", prompt=cfg, protocol=protocol)([SENTENCES[0]])[0])


def test_prompt_config_roundtrip(tiny_bert, tmp_path):
    tok = _tok(tiny_bert)
    t1, t2 = template_pair(tok)
    backbone = _backbone(tiny_bert)
    cfg = PromptEncoder(backbone, t1, t2).config_dict()
    assert cfg == prompt_config("bert", TEMPLATES["bert"], "raw")
    assert cfg["pooler"] == "mask" and cfg["protocol"] == "raw" and cfg["dev_protocol"] == "denoised"
    assert load_prompt_config(tmp_path) is None
    save_prompt_config(tmp_path, cfg)
    assert (tmp_path / PROMPT_CONFIG_FILE).is_file() and load_prompt_config(tmp_path) == cfg
    a = embedder(backbone, tok, "mask", prompt=cfg)(SENTENCES[:2])
    b = prompt_embedder(backbone, tok, t1, "raw")(SENTENCES[:2])
    assert np.array_equal(a, b)
    (tmp_path / PROMPT_CONFIG_FILE).write_text(json.dumps({**cfg, "protocol": "avg"}))
    with pytest.raises(ValueError, match="unknown prompt protocol"):
        load_prompt_config(tmp_path)
    with pytest.raises(ValueError, match="roberta_position_offset"):
        PromptEncoder(backbone, t1, t2, roberta_position_offset="shifted")
