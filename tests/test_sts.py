"""The STS evaluator: SentEval test-mode parsing, scoring, encoding, CLI; real data under ``slow``."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from clusterns.evaluation import embedding, sts
from clusterns.evaluation.base import json_safe
from clusterns.model.encoder import POOLERS
from conftest import assert_close_on_scale

FIXTURE = Path(__file__).resolve().parent / "data" / "sts_fixture"
# Pairs kept in the hand-made fixture (STS12 MSRpar drops 1 empty gold line, STS15 belief drops 2).
FIXTURE_COUNTS = {"STS12": 23, "STS13": 15, "STS14": 30, "STS15": 22, "STS16": 24,
                  "STSBenchmark": 7, "SICKRelatedness": 8}
FIXTURE_DEV_COUNTS = {"STSBenchmark": 5, "SICKRelatedness": 5}
# The evaluator's scores of the packaged all-MiniLM-L6-v2 on the mirror (avg pooler, fp32, batch 128),
# as measured on 2026-12-01 (the same numbers as the demo's base row).
MINILM_TEST_SCORES = {"STS12": 72.3674, "STS13": 80.6032, "STS14": 75.5891, "STS15": 85.3896, "STS16": 78.9895,
                      "STSBenchmark": 82.0325, "SICKRelatedness": 77.1469, "avg": 78.8740}
REAL_COUNTS = {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
               "STSBenchmark": 1379, "SICKRelatedness": 4927}


def fake_vector(sentence: str, dim: int = 8) -> np.ndarray:
    """A deterministic pseudo-random embedding per sentence (controlled, model-free cosines)."""
    seed = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "little")
    # float32-exact values: score_tasks holds embeddings in float32
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32).astype(np.float64)


def fake_embed(sentences: list[str]) -> np.ndarray:
    return np.stack([fake_vector(s) for s in sentences])


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- an independent reading of the fixture, written from the SentEval description ---

def ref_sts_subset(year: str, subset: str) -> tuple[list[str], list[str], list[float]]:
    folder = FIXTURE / "STS" / f"{year}-en-test"
    inputs = (folder / f"STS.input.{subset}.txt").read_text(encoding="utf-8").splitlines()
    golds = (folder / f"STS.gs.{subset}.txt").read_text(encoding="utf-8").splitlines()
    a, b, g = [], [], []
    for line, gold in zip(inputs, golds):
        if gold == "":
            continue
        left, right = line.split("\t")
        a.append(" ".join(left.split()))
        b.append(" ".join(right.split()))
        g.append(float(gold))
    return a, b, g


def ref_columns(rel: str, cols: tuple[int, int, int], header: bool) -> tuple[list[str], list[str], list[float]]:
    rows = (FIXTURE / rel).read_bytes().decode().replace("\r\n", "\n").split("\n")
    rows = [r for r in rows if r][1 if header else 0:]
    fields = [r.split("\t") for r in rows]
    return ([" ".join(f[cols[0]].split()) for f in fields], [" ".join(f[cols[1]].split()) for f in fields],
            [float(f[cols[2]]) for f in fields])


def ref_sims(a: list[str], b: list[str]) -> list[float]:
    return [cos(fake_vector(x), fake_vector(y)) for x, y in zip(a, b)]


@pytest.fixture()
def fixture_tasks() -> list[sts.STSTask]:
    return sts.load_tasks(FIXTURE, "test", expected_counts=FIXTURE_COUNTS)


# ------------------------------------------------------------------------------------------
# Parsing and loading


def test_fixture_counts_empty_gold_dropped_and_whitespace(fixture_tasks):
    assert [t.name for t in fixture_tasks] == list(sts.TASKS["test"])
    assert {t.name: t.n_pairs for t in fixture_tasks} == FIXTURE_COUNTS
    by_name = {t.name: t for t in fixture_tasks}
    msrpar = by_name["STS12"].subsets[0]
    assert msrpar.name == "MSRpar" and len(msrpar) == 3  # 4 lines, one empty gold line
    assert "dropped pair left side" not in msrpar.sent1
    assert msrpar.sent1[0] == "a man is playing guitar"
    assert msrpar.sent2[0] == "a woman is playing piano"  # runs of spaces and a NBSP collapsed
    belief = by_name["STS15"].subsets[2]
    assert belief.name == "belief" and len(belief) == 4  # 6 lines, two empty gold lines
    assert [s.name for s in by_name["STS13"].subsets] == ["FNWN", "headlines", "OnWN"]
    # SICK: header skipped, CRLF stripped, scores parsed
    sick = by_name["SICKRelatedness"].subsets[0]
    assert sick.name == "test" and len(sick) == 8 and not any("\r" in s for s in sick.sent2)
    assert sick.gold == tuple(ref_columns("SICK/SICK_test_annotated.txt", (1, 2, 3), True)[2])
    # every file read is hashed
    files = by_name["STS12"].files
    assert len(files) == 10
    rel = "STS/STS12-en-test/STS.gs.MSRpar.txt"
    assert files[rel] == hashlib.sha256((FIXTURE / rel).read_bytes()).hexdigest()


def test_dev_mode_loads_dev_splits():
    tasks = sts.load_tasks(FIXTURE, "dev", expected_counts=FIXTURE_DEV_COUNTS)
    assert [(t.name, t.subsets[0].name, t.n_pairs) for t in tasks] == [
        ("STSBenchmark", "dev", 5), ("SICKRelatedness", "dev", 5)]
    assert list(tasks[0].files) == ["STS/STSBenchmark/sts-dev.csv"]
    assert list(tasks[1].files) == ["SICK/SICK_trial.txt"]
    with pytest.raises(ValueError, match="not scored in dev mode"):
        sts.load_tasks(FIXTURE, "dev", tasks=["STS12"])


def test_parse_sts_subset_rules():
    sub = sts.parse_sts_subset("x", "a  b\tc d\ne f\tg\nh\ti j\n", "1.5\n\n 2\n")
    assert sub.sent1 == ("a b", "h") and sub.sent2 == ("c d", "i j") and sub.gold == (1.5, 2.0)
    with pytest.raises(sts.STSDataError, match="2 input lines but 1 gold"):
        sts.parse_sts_subset("x", "a\tb\nc\td\n", "1\n")
    with pytest.raises(sts.STSDataError, match="3 tab-separated fields"):
        sts.parse_sts_subset("x", "a\tb\tc\n", "1\n")
    with pytest.raises(sts.STSDataError, match="not a number"):
        sts.parse_sts_subset("x", "a\tb\n", "high\n")


def test_parse_columns_header_and_crlf():
    text = "id\ta\tb\tscore\r\n1\tThe  cat\tA dog\t3.5\tX\r\n2\tx\ty\t1\tY\r\n"
    split = sts.parse_columns("test", text, (1, 2, 3), skip_header=True)
    assert split.sent1 == ("The cat", "x") and split.sent2 == ("A dog", "y") and split.gold == (3.5, 1.0)
    with pytest.raises(sts.STSDataError, match="line 1 has 3"):
        sts.parse_columns("test", "g\tf\t1\n", (5, 6, 4), skip_header=False)


def _copy_fixture(tmp_path: Path) -> Path:
    dst = tmp_path / "senteval"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_truncated_data_is_refused(tmp_path):
    root = _copy_fixture(tmp_path)
    for name in ("STS.input.images.txt", "STS.gs.images.txt"):
        path = root / "STS" / "STS14-en-test" / name
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]))
    with pytest.raises(sts.STSDataError) as err:
        sts.load_tasks(root, "test", expected_counts=FIXTURE_COUNTS)
    msg = str(err.value)
    assert "STS14" in msg and "expected 30" in msg and "found 29" in msg and str(root) in msg
    assert "senteval.tar" in msg


def test_real_counts_are_the_default():
    assert sts.EXPECTED_COUNTS["test"] == REAL_COUNTS
    assert sts.EXPECTED_COUNTS["dev"] == {"STSBenchmark": 1500, "SICKRelatedness": 500}
    with pytest.raises(sts.STSDataError, match="STS12: expected 3108 sentence pairs but found 23"):
        sts.load_tasks(FIXTURE, "test")


def test_missing_file_and_dir(tmp_path):
    root = _copy_fixture(tmp_path)
    (root / "STS" / "STS16-en-test" / "STS.gs.plagiarism.txt").unlink()
    with pytest.raises(sts.STSDataError, match="STS16: missing file STS/STS16-en-test/STS.gs.plagiarism.txt"):
        sts.load_tasks(root, "test", expected_counts=FIXTURE_COUNTS)
    with pytest.raises(sts.STSDataError, match="not found"):
        sts.load_tasks(tmp_path / "nowhere")
    with pytest.raises(sts.STSDataError, match="neither STS/ nor SICK/"):
        sts.load_tasks(tmp_path)


# ------------------------------------------------------------------------------------------
# Scoring with a controlled embedder


def test_all_setting_and_means_match_independent_scipy(fixture_tasks):
    results = sts.score_tasks(fixture_tasks, fake_embed)
    for year, subsets in sts.STS_SUBSETS.items():
        all_sys, all_gold, sub_spr, sub_prs, sub_n = [], [], [], [], []
        for subset in subsets:
            a, b, g = ref_sts_subset(year, subset)
            sims = ref_sims(a, b)
            all_sys += sims
            all_gold += g
            sub_spr.append(spearmanr(sims, g)[0] * 100)
            sub_prs.append(pearsonr(sims, g)[0] * 100)
            sub_n.append(len(g))
            got = results["details"][year]["subsets"][subset]
            assert got["n_pairs"] == len(g)
            assert got["spearman"] == pytest.approx(sub_spr[-1], abs=1e-9)
            assert got["pearson"] == pytest.approx(sub_prs[-1], abs=1e-9)
        d = results["details"][year]
        expected_all = spearmanr(all_sys, all_gold)[0] * 100
        assert results[year] == pytest.approx(expected_all, abs=1e-9)
        assert d["spearman"] == results[year]
        assert d["pearson"] == pytest.approx(pearsonr(all_sys, all_gold)[0] * 100, abs=1e-9)
        assert d["n_pairs"] == FIXTURE_COUNTS[year] == len(all_gold)
        assert d["mean"]["spearman"] == pytest.approx(np.mean(sub_spr), abs=1e-9)
        assert d["wmean"]["spearman"] == pytest.approx(np.average(sub_spr, weights=sub_n), abs=1e-9)
        assert d["mean"]["pearson"] == pytest.approx(np.mean(sub_prs), abs=1e-9)
        assert d["wmean"]["pearson"] == pytest.approx(np.average(sub_prs, weights=sub_n), abs=1e-9)
        # the headline is the concatenation, which is not the mean of the subsets
        assert abs(results[year] - d["mean"]["spearman"]) > 0.1
    for name, rel, cols, header in (("STSBenchmark", "STS/STSBenchmark/sts-test.csv", (5, 6, 4), False),
                                    ("SICKRelatedness", "SICK/SICK_test_annotated.txt", (1, 2, 3), True)):
        a, b, g = ref_columns(rel, cols, header)
        assert results[name] == pytest.approx(spearmanr(ref_sims(a, b), g)[0] * 100, abs=1e-9)
        assert results["details"][name]["split"] == "test"
        assert results["details"][name]["n_pairs"] == len(g)
    headlines = [results[t] for t in sts.TASKS["test"]]
    assert results["avg"] == pytest.approx(np.mean(headlines), abs=1e-12)
    assert list(results)[:9] == [*sts.TASKS["test"], "avg", "details"]


def test_each_distinct_sentence_embedded_once(fixture_tasks):
    calls: list[list[str]] = []

    def recording(sentences):
        calls.append(list(sentences))
        return torch.tensor(fake_embed(sentences), dtype=torch.float32)  # tensors are accepted too

    results = sts.score_tasks(fixture_tasks, recording)
    assert len(calls) == 1
    sent = calls[0]
    assert len(sent) == len(set(sent)) == results["meta"]["n_sentences"]
    everything = {s for t in fixture_tasks for sub in t.subsets for s in sub.sent1 + sub.sent2}
    assert set(sent) == everything
    assert "a man is playing guitar" in sent  # shared by STS12 and STS-B: once
    assert "dropped pair left side" not in sent and "only in a dropped pair" not in sent


def test_embedder_shape_is_checked(fixture_tasks):
    with pytest.raises(ValueError, match="one row per sentence"):
        sts.score_tasks(fixture_tasks, lambda s: np.zeros((len(s) - 1, 4)))


def test_cosine_rows_like_senteval():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [np.nan, 1.0]])
    b = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(sts.cosine_rows(a, b), [2 ** -0.5, 0.0, 1.0])


def test_length_batches():
    batches = embedding.length_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError):
        embedding.length_batches([1], 0)


# ------------------------------------------------------------------------------------------
# Encoding with real (tiny) backbones


@pytest.fixture(scope="module")
def _bert(tiny_bert):
    from transformers import AutoTokenizer

    from clusterns.model.encoder import load_backbone

    return load_backbone(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture()
def bert(_bert):
    """A fresh copy of the model per test (tests switch train/eval mode and devices)."""
    import copy

    model, tok = _bert
    return copy.deepcopy(model), tok


def _manual(model, tok, pooler: str, sentence: str) -> torch.Tensor:
    enc = tok([sentence], return_tensors="pt")
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
        if pooler == "cls":  # BERT's pooling layer: dense + tanh over the last [CLS] state
            return torch.tanh(model.pooler.dense(hs[-1][:, 0]))[0]
    if pooler == "cls_before_pooler":
        return hs[-1][0, 0]
    if pooler == "avg":
        return hs[-1][0].mean(0)
    if pooler == "avg_first_last":
        return ((hs[1][0] + hs[-1][0]) / 2).mean(0)
    return ((hs[-2][0] + hs[-1][0]) / 2).mean(0)


@pytest.mark.parametrize("pooler", POOLERS)
def test_poolers_match_manual_computation(bert, pooler):
    model, tok = bert
    model.eval()
    embed = embedding.embedder(model, tok, pooler, batch_size=3)
    sentences = ["a man is playing guitar", "two people", "the dog runs on the grass with a cat", "x"]
    emb = embed(sentences)
    assert emb.dtype == np.float32 and emb.shape == (4, model.config.hidden_size)
    for i, s in enumerate(sentences):  # batched (padded) vs alone: float32 rounding on the vector's scale
        assert_close_on_scale(emb[i], _manual(model, tok, pooler, s).numpy(), msg=s)


def test_roberta_backbone(tiny_roberta):
    from transformers import AutoTokenizer

    from clusterns.model.encoder import load_backbone

    model, tok = load_backbone(tiny_roberta), AutoTokenizer.from_pretrained(tiny_roberta)
    emb = embedding.embedder(model, tok, "avg_first_last", batch_size=2)(["a man", "a woman is here", "hi"])
    assert emb.shape == (3, 32) and np.isfinite(emb).all()
    assert_close_on_scale(emb[1], _manual(model, tok, "avg_first_last", "a woman is here").numpy())


def test_dropout_off_and_mode_restored(bert):
    model, tok = bert
    model.train()
    embed = embedding.embedder(model, tok, "cls_before_pooler")
    first, second = embed(["a cat runs", "the man"]), embed(["a cat runs", "the man"])
    assert model.training
    np.testing.assert_array_equal(first, second)
    model.eval()


@pytest.mark.parametrize("pooler", ["avg", "cls_before_pooler"])
def test_length_batching_equals_one_by_one_encoding(bert, fixture_tasks, pooler, single_thread):
    """Length-sorted batches put every embedding back on its sentence's row: equal to encoding each
    sentence alone (unpadded) up to float32 rounding. Compared as embeddings, not as Spearman: a
    rank statistic of a random tiny model's cosines (packed near 1) turns 1e-7 of noise into a
    swapped rank. The scoring of the rows is checked exactly with a model-free embedder above."""
    model, tok = bert
    model.eval()
    sentences = sts.distinct_sentences(fixture_tasks)
    batched = embedding.embedder(model, tok, pooler, batch_size=16)(sentences)
    for i, sentence in enumerate(sentences):
        alone = embedding.embedder(model, tok, pooler, batch_size=1)([sentence])[0]
        assert_close_on_scale(batched[i], alone, msg=sentence)


# ------------------------------------------------------------------------------------------
# End to end and CLI


def test_evaluate_meta(tiny_bert):
    res = sts.evaluate(tiny_bert, "avg", FIXTURE, "dev", expected_counts=FIXTURE_DEV_COUNTS, device="cpu")
    assert list(res)[:3] == ["STSBenchmark", "SICKRelatedness", "avg"]
    meta = res["meta"]
    assert meta["mode"] == "dev" and meta["pooler"] == "avg" and meta["device"] == "cpu" and meta["dtype"] == "fp32"
    assert set(meta["files_sha256"]) == {"STS/STSBenchmark/sts-dev.csv", "SICK/SICK_trial.txt"}
    assert meta["n_sentences"] == 20 and meta["sentences_per_second"] > 0
    assert "versions" in meta["environment"]


def test_cli_on_fixture(tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sts.EXPECTED_COUNTS, "test", FIXTURE_COUNTS)
    out = tmp_path / "res" / "sts.json"
    rc = sts.main(["--model", str(tiny_bert), "--pooler", "cls_before_pooler", "--senteval", str(FIXTURE),
                   "--output", str(out), "--batch-size", "8", "--device", "cpu", "--dtype", "bf16"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "STSBenchmark" in captured.out and "avg" in captured.out and "fp32 on CPU" in captured.err
    data = json.loads(out.read_text())
    assert list(data) == [*sts.TASKS["test"], "avg", "details", "meta"]
    assert all(isinstance(data[t], float) for t in sts.TASKS["test"])
    assert data["meta"]["dtype"] == "fp32" and data["meta"]["batch_size"] == 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["sts.json"]


def _cli_error(capsys, argv) -> str:
    assert sts.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_cli_user_errors(tiny_bert, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.json"
    base = ["--model", str(tiny_bert), "--output", str(out)]
    assert "not found" in _cli_error(capsys, [*base, "--pooler", "avg", "--senteval", str(tmp_path / "missing")])
    assert "unknown pooler" in _cli_error(capsys, [*base, "--pooler", "max", "--senteval", str(FIXTURE)])
    err = _cli_error(capsys, [*base, "--pooler", "avg", "--senteval", str(FIXTURE)])
    assert "expected 3108" in err and "senteval.tar" in err
    monkeypatch.setitem(sts.EXPECTED_COUNTS, "dev", FIXTURE_DEV_COUNTS)  # data fine, model missing
    err = _cli_error(capsys, ["--model", str(tmp_path / "nomodel"), "--output", str(out), "--pooler", "avg",
                              "--senteval", str(FIXTURE), "--mode", "dev", "--tasks", "STSBenchmark"])
    assert "no model" in err
    assert "required" in _cli_error(capsys, ["--pooler", "avg"])
    assert "not scored in dev mode" in _cli_error(capsys, [*base, "--pooler", "avg", "--senteval", str(FIXTURE),
                                                           "--mode", "dev", "--tasks", "STS12"])
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Real data (the mirror's senteval.tar) with the packaged MiniLM


@pytest.mark.slow
def test_real_data_test_mode_minilm(minilm, senteval_dir, tmp_path, capsys):
    out = tmp_path / "sts_test.json"
    start = time.perf_counter()
    rc = sts.main(["--model", str(minilm), "--pooler", "avg", "--senteval", str(senteval_dir),
                   "--mode", "test", "--output", str(out)])
    wall = time.perf_counter() - start
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(out.read_text())
    assert list(data) == [*REAL_COUNTS, "avg", "details", "meta"]
    assert {t: data["details"][t]["n_pairs"] for t in REAL_COUNTS} == REAL_COUNTS
    for t in REAL_COUNTS:
        assert 60 < data[t] < 95, (t, data[t])
    assert data["avg"] == pytest.approx(np.mean([data[t] for t in REAL_COUNTS]))
    assert set(data["details"]["STS12"]["subsets"]) == set(sts.STS_SUBSETS["STS12"])
    meta = data["meta"]
    assert meta["mode"] == "test" and meta["pooler"] == "avg" and len(meta["files_sha256"]) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sts_test.json"]
    with capsys.disabled():
        print(f"\n{captured.out}\nwall {wall:.1f} s, {meta['n_sentences']} sentences, "
              f"{meta['sentences_per_second']:.0f} sentences/s")
    # Regression pin: the evaluator's scores of the packaged MiniLM on the mirror (mean pooling,
    # fp32). A change in parsing, pairing, normalisation, pooling or scoring moves them by far more
    # than 0.01; float32 reordering on another CPU moves them by < 1e-4.
    for task, score in MINILM_TEST_SCORES.items():
        assert data[task] == pytest.approx(score, abs=0.01), (task, data[task], score)


@pytest.mark.slow
def test_real_data_dev_mode_minilm(minilm, senteval_dir, tmp_path, capsys):
    out = tmp_path / "sts_dev.json"
    rc = sts.main(["--model", str(minilm), "--pooler", "avg", "--senteval", str(senteval_dir),
                   "--mode", "dev", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(out.read_text())
    assert list(data) == ["STSBenchmark", "SICKRelatedness", "avg", "details", "meta"]
    assert data["details"]["STSBenchmark"]["n_pairs"] == 1500
    assert data["details"]["SICKRelatedness"]["n_pairs"] == 500
    assert all(data["details"][t]["split"] == "dev" for t in ("STSBenchmark", "SICKRelatedness"))
    assert all(60 < data[t] < 95 for t in ("STSBenchmark", "SICKRelatedness"))
    with capsys.disabled():
        print(f"\n{captured.out}")


def test_non_finite_scores_become_null_in_json():
    assert json_safe({"a": float("nan"), "b": [1.5, float("inf")], "c": "x"}) == {"a": None, "b": [1.5, None],
                                                                                      "c": "x"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_autocast_close_to_fp32(bert, dtype):
    model, tok = bert
    model.to("cuda").eval()
    try:
        ref = embedding.embedder(model, tok, "avg", device="cuda")(["a man is playing guitar", "two dogs"])
        low = embedding.embedder(model, tok, "avg", device="cuda", dtype=dtype)(["a man is playing guitar", "two dogs"])
    finally:
        model.to("cpu")
    assert low.dtype == np.float32
    # bf16 keeps 8 mantissa bits (2^-8 = 4e-3 relative per op); a few layers compound it to ~1e-2
    # of the vector's scale. A wrong autocast (e.g. fp16 overflow, a dropped layer) is far off.
    assert_close_on_scale(low, ref, 5e-2)
