"""The MTEB stage: through the mteb package, on MTEB's STSBenchmark task built locally from the
mirror's SentEval file, the same Spearman as clusterns.sts (same data, same model, same embeddings)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mteb")

from clusterns.evaluation import mteb_eval, sts  # noqa: E402


@pytest.mark.slow
def test_local_stsb_through_mteb_equals_clusterns_sts(minilm, senteval_dir, tmp_path, capsys):
    out = tmp_path / "mteb.json"
    rc = mteb_eval.main(["--model", str(minilm), "--pooler", "avg", "--tasks", "STSBenchmark",
                         "--local-stsb", str(senteval_dir), "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    ours = sts.evaluate(minilm, "avg", senteval_dir, "test", tasks=["STSBenchmark"])["STSBenchmark"]
    assert data["STSBenchmark"] == pytest.approx(ours, abs=1e-4)
    assert data["meta"]["pooler"] == "avg" and data["meta"]["local_stsb"] == str(senteval_dir)
    # the table puts it beside the SentEval-protocol numbers
    sts_file = tmp_path / "sts_test.json"
    sts_file.write_text(json.dumps({"STSBenchmark": ours, "avg": 78.87}))
    md, csv_path = mteb_eval.mteb_table([out], ["MiniLM (base)"], [sts_file], tmp_path / "tables")
    assert f"| MiniLM (base) | 1 | 78.87 | {ours:.2f} | {data['STSBenchmark']:.2f} |" in md.read_text()


def test_without_the_data_the_error_says_what_works_offline(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = mteb_eval.main(["--model", str(tiny_bert), "--pooler", "cls_before_pooler", "--tasks", "STS12",
                         "--output", str(tmp_path / "x.json")])
    assert rc == 1 and "--local-stsb" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
