"""Short-text clustering evaluation (the paper's Table 6): metric, parser on the real files, the
[CLS] embedding with truncation, and the evaluator end to end on the mirror."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from clusterns.evaluation import cluster_eval as C

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
# Metrics


def brute_force_accuracy(y_true, y_pred) -> float:
    """Best one-to-one relabelling of the clusters by trying every permutation."""
    size = max(max(y_true), max(y_pred)) + 1
    best = 0
    for perm in itertools.permutations(range(size)):
        best = max(best, sum(perm[p] == t for p, t in zip(y_pred, y_true)))
    return best / len(y_true)


def entropy_nmi(y_true, y_pred) -> float:
    """NMI with the arithmetic mean of the entropies, from the definitions."""
    n = len(y_true)
    joint = {}
    for t, p in zip(y_true, y_pred):
        joint[(t, p)] = joint.get((t, p), 0) + 1
    pt = {t: sum(v for (a, _), v in joint.items() if a == t) / n for t in set(y_true)}
    pp = {p: sum(v for (_, b), v in joint.items() if b == p) / n for p in set(y_pred)}
    mi = sum(v / n * math.log((v / n) / (pt[t] * pp[p])) for (t, p), v in joint.items())
    h = lambda d: -sum(x * math.log(x) for x in d.values())  # noqa: E731
    denom = (h(pt) + h(pp)) / 2
    return 1.0 if denom == 0 else mi / denom


@pytest.mark.parametrize("seed", range(12))
def test_accuracy_is_the_best_one_to_one_mapping_and_nmi_is_sklearns(seed):
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(seed)
    classes = int(rng.integers(2, 5))
    clusters = int(rng.integers(2, 7))  # often more clusters than classes
    n = int(rng.integers(5, 14))
    y_true = rng.integers(0, classes, n).tolist()
    y_pred = rng.choice(np.arange(clusters)[::2] if seed % 3 == 0 else np.arange(clusters), n).tolist()  # empty ids
    assert C.clustering_accuracy(y_true, y_pred) == pytest.approx(brute_force_accuracy(y_true, y_pred), abs=1e-12)
    assert C.nmi(y_true, y_pred) == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
    assert C.nmi(y_true, y_pred) == pytest.approx(entropy_nmi(y_true, y_pred), abs=1e-9)


def test_accuracy_of_a_relabelled_perfect_clustering_is_one():
    y = [0, 0, 1, 1, 2, 5, 5]  # a label id without examples (as Tweet's 110 ids for 89 classes)
    assert C.clustering_accuracy(y, [3, 3, 0, 0, 1, 2, 2]) == 1.0
    assert C.clustering_accuracy(y, [0] * 7) == pytest.approx(2 / 7)


# ------------------------------------------------------------------------------------------------
# Data: the real files


def test_every_mirror_file_parses_with_its_documented_counts(mirror):
    for spec in C.SETS.values():
        cs = C.load_set(mirror, spec)
        assert len(cs.texts) == spec.lines == cs.n_total and not cs.subsampled
        assert len(np.unique(cs.labels)) == spec.classes, spec.name
        assert cs.labels.min() == 0 and all(t and "\t" not in t and "\r" not in t for t in cs.texts)
    # as the official loader: the second field only (an SO text with a tab inside is cut there)
    so = C.load_set(mirror, C.SETS["SO"])
    assert so.texts[10343] == 'Phonon VideoWidget error: "the video widget could not be'
    assert C.load_set(mirror, C.SETS["Tweet"]).labels.max() == 109  # 110 label ids, 89 used (K = 89)


def test_crlf_files_first_and_last_examples(mirror):
    bio = C.load_set(mirror, C.SETS["Bio"])  # CRLF, the last line without a line end
    assert bio.texts[0] == ("histochemical and autoradiographic studies on the effects of aging on the "
                            "mucopolysacharides of the periosteum") and bio.labels[0] == 0
    assert bio.texts[-1] == ("improved efficiency of mouse guinea pig and human c3b inactivator at low ionic "
                             "strength and reproducible immune adherence with mouse complement")
    assert bio.labels[-1] == 19
    so = C.load_set(mirror, C.SETS["SO"])  # CRLF with a tab before the CR
    assert so.texts[0] == "How do I fill a DataSet or a DataTable from a LINQ query resultset ?"
    assert so.texts[-1] == "Magento : Call to a member function count() on a non-object" and so.labels[-1] == 19


def test_truncated_or_malformed_files_are_refused_naming_the_file(mirror, tmp_path):
    spec = C.SETS["AG"]
    lines = (mirror / spec.file).read_bytes().split(b"\n")
    (tmp_path / spec.file).write_bytes(b"\n".join(lines[:5000]) + b"\n")
    with pytest.raises(C.ClusteringDataError, match=r"AG .*agnewsdataraw-8000.*5000 examples, expected 8000"):
        C.load_set(tmp_path, spec)
    bad = list(lines)
    bad[10] = b"x3\t" + bad[10].split(b"\t", 1)[1]
    (tmp_path / spec.file).write_bytes(b"\n".join(bad))
    with pytest.raises(C.ClusteringDataError, match=r"agnewsdataraw-8000.*line 11: label 'x3' is not an integer"):
        C.load_set(tmp_path, spec)
    (tmp_path / spec.file).write_bytes(b"1 no tab here\n")
    with pytest.raises(C.ClusteringDataError, match="line 1: expected"):
        C.load_set(tmp_path, C.SetSpec("AG", spec.file, 1, 1))
    with pytest.raises(C.ClusteringDataError, match="distinct labels, expected 5 classes"):
        C.load_set(mirror, C.SetSpec("AG", spec.file, 8000, 5))
    with pytest.raises(C.ClusteringDataError, match="missing file"):
        C.load_set(tmp_path, C.SETS["SO"])


def test_subsample_is_stratified_seeded_and_marked(mirror):
    a = C.load_set(mirror, C.SETS["SS"], max_examples=400)
    b = C.load_set(mirror, C.SETS["SS"], max_examples=400)
    assert a.subsampled and len(a.texts) == 400 and a.texts == b.texts
    full = C.load_set(mirror, C.SETS["SS"])
    share = np.bincount(full.labels) / len(full.labels)
    assert np.abs(np.bincount(a.labels, minlength=8) / 400 - share).max() < 1 / 400 + 1e-9


# ------------------------------------------------------------------------------------------------
# The embedding


def test_embedding_is_the_last_layer_cls_state_cut_at_128_tokens(tiny_bert):
    from transformers import AutoTokenizer

    from clusterns.evaluation.base import load_model

    loaded = load_model(tiny_bert, "cls_before_pooler")
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    long_text = " ".join(["the man is playing guitar and the dog runs"] * 40)  # ~360 tokens
    texts = ["a man", "two people and a cat", long_text]
    assert len(tok(long_text)["input_ids"]) > 128
    got = loaded.embedder(max_length=128, batch_size=2)(texts)
    model = loaded.model.eval()
    with torch.no_grad():
        for text, row in zip(texts, got):
            enc = tok([text], truncation=True, max_length=128, return_tensors="pt")
            assert enc["input_ids"].shape[1] <= 128
            ref = model(**enc).last_hidden_state[0, 0]
            np.testing.assert_allclose(row, ref.numpy(), rtol=0, atol=1e-5 * float(ref.abs().max()))
        untruncated = model(**tok([long_text], return_tensors="pt")).last_hidden_state[0, 0]
    assert not np.allclose(got[2], untruncated.numpy(), atol=1e-4)  # the cut matters
    # Without the cut, an input longer than the position table is refused before encoding.
    too_long = " ".join(["the man is playing guitar and the dog runs"] * 60)
    assert len(tok(too_long)["input_ids"]) > 512
    with pytest.raises(ValueError, match="does not fit the backbone, which takes at most 512"):
        loaded.embedder()(texts + [too_long])
    assert loaded.embedder(max_length=128)([too_long]).shape == (1, 32)


# ------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_minilm_on_the_mirror_subsampled_all_eight_sets_reproducible(minilm, mirror, tmp_path, capsys):
    out = tmp_path / "clustering.json"
    args = ["--model", str(minilm), "--data", str(mirror), "--max-examples", "150", "--restarts", "0", "1",
            "--output", str(out)]
    assert C.main(args) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert list(data["details"]) == list(C.SETS)
    for name, d in data["details"].items():
        assert len(d["acc"]) == len(d["nmi"]) == 2 and d["subsampled"] and d["k"] == C.SETS[name].classes
        assert d["n"] == max(150, d["k"])  # never fewer examples than clusters
        assert 0 < d["acc_mean"] <= 100 and 0 <= d["nmi_mean"] <= 100 and data[name] == d["acc_mean"]
    assert data["meta"]["pooler"] == "cls_before_pooler" and data["meta"]["subsampled"] is True
    assert data["avg"] == pytest.approx(np.mean([data[s] for s in C.SETS]))
    # the same random_state gives the same clustering; another one may differ
    again = tmp_path / "again.json"
    assert C.main([*args[:-1], str(again), "--sets", "AG", "SS", "--restarts", "1"]) == 0
    redo = json.loads(again.read_text())
    for name in ("AG", "SS"):
        assert redo["details"][name]["acc"] == [data["details"][name]["acc"][1]]
        assert redo["details"][name]["nmi"] == [data["details"][name]["nmi"][1]]


def test_cli_refuses_bad_input(tiny_bert, mirror, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert C.main(["--model", str(tiny_bert), "--data", str(tmp_path / "none"), "--output", str(out)]) == 1
    assert "clustering data folder not found" in capsys.readouterr().err
    assert C.main(["--model", str(tiny_bert), "--data", str(mirror), "--sets", "XY", "--output", str(out)]) == 1
    assert "unknown set" in capsys.readouterr().err
    shutil.copy(mirror / "tweet-original-order.txt", tmp_path / "tweet-original-order.txt")
    assert C.main(["--model", str(tiny_bert), "--data", str(tmp_path), "--sets", "AG", "--output", str(out)]) == 1
    assert "missing file" in capsys.readouterr().err and not out.exists()


def _fake_result(path, acc: dict, nmi: dict, pooler="cls_before_pooler", subsampled=False):
    details = {s: {"acc": [a, a], "nmi": [nmi[s]] * 2, "acc_mean": a, "nmi_mean": nmi[s]} for s, a in acc.items()}
    data = {**acc, "avg": float(np.mean(list(acc.values()))), "nmi": {**nmi, "avg": float(np.mean(list(nmi.values())))},
            "details": details, "meta": {"pooler": pooler, "subsampled": subsampled}}
    path.write_text(json.dumps(data))
    return path


def test_table_means_and_stds_over_seeds_beside_base_and_released(tmp_path):
    from clusterns.evaluation.cluster_table import clustering_table

    a = _fake_result(tmp_path / "a.json", {"AG": 60.0, "SS": 50.0}, {"AG": 30.0, "SS": 20.0})
    b = _fake_result(tmp_path / "b.json", {"AG": 64.0, "SS": 54.0}, {"AG": 34.0, "SS": 22.0})
    base = _fake_result(tmp_path / "c.json", {"AG": 40.0, "SS": 45.0}, {"AG": 10.0, "SS": 12.0}, pooler="avg",
                        subsampled=True)
    md, csv_path, tex = clustering_table([a, b, base], ["ClusterNS / BERT", "ClusterNS / BERT", "BERT"],
                                         ["run", "run", "base"], tmp_path / "out")
    text = md.read_text()
    assert "| ClusterNS / BERT | cls_before_pooler | 2 | 62.00 ± 2.83 | 52.00 ± 2.83 | 57.00 ± 2.83 |" in text
    assert "| BERT (base)‡ | avg | 1 | 40.00 ± – | 45.00 ± – | 42.50 ± – |" in text
    assert "| ClusterNS / BERT | cls_before_pooler | 2 | 32.00 ± 2.83 | 21.00 ± 1.41 | 26.50 ± 2.12 |" in text  # NMI
    rows = list(__import__("csv").DictReader(csv_path.open()))
    assert rows[0]["acc_avg_mean"] == repr(57.0) and rows[1]["kind"] == "base" and rows[1]["subsampled"] == "1"
    assert r"\begin{tabular}" in tex.read_text()
    assert C.main(["table", "--inputs", str(a), "--labels", "x", "y", "--kinds", "run", "--out-dir",
                   str(tmp_path / "o2")]) == 1


def test_the_paper_config_lists_the_official_sets():
    from clusterns import config as cfg
    from clusterns.data import upstream_basename
    from conftest import ROOT

    for name in ("config.yaml", "demo.yaml"):
        datasets = cfg.load(ROOT / "config" / name)["clustering"]["datasets"]
        got = {k: C.SetSpec(k, upstream_basename(v["url"]), v["lines"], v["classes"]) for k, v in datasets.items()}
        assert got == C.SETS, name
