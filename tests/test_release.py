"""The release folder of a run (model files + a model card with its results) and the Hub upload."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from clusterns import release
from test_train import run_stage, hparams

FIXTURE = Path(__file__).resolve().parent / "data" / "sts_fixture"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, mirror):
    from conftest import make_tiny_bert

    from clusterns.evaluation import sts
    from clusterns.tokenize import tokenize_to_disk
    from clusterns.utils.files import write_json_atomic

    root = tmp_path_factory.mktemp("release")
    make_tiny_bert(root / "model")
    lines = (mirror / "wiki1m_for_simcse.txt").read_text(encoding="utf-8").splitlines()[:64]
    (root / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenize_to_disk(root / "model", root / "wiki.txt", root / "tok", max_length=32)
    res = run_stage(root, "run", hparams(training={"max_steps": 2}))
    assert res.returncode == 0, res.stdout + res.stderr
    run = root / "run" / "run"
    scores = sts.evaluate(run / "model", None, FIXTURE, "test", expected_counts={t: None for t in sts.TASKS["test"]})
    write_json_atomic(run / "sts_test.json", scores)
    return run


def test_release_folder_links_the_model_and_its_card_shows_the_run_results(finished_run, tmp_path):
    out = release.build_release(finished_run, tmp_path / "release", sts=finished_run / "sts_test.json")
    model = finished_run / "model"
    for f in model.glob("*.safetensors"):
        assert os.path.samefile(f, out / f.name)  # a hard link: no second copy of the weights
    assert (out / "config.json").is_file() and (out / "modules.json").is_file()
    card = (out / "README.md").read_text()
    scores = json.loads((finished_run / "sts_test.json").read_text())
    row = next(line for line in card.splitlines() if line.startswith("| ") and re.match(r"\| -?\d", line))
    cells = [c.strip() for c in row.strip("|").split("|")]
    tasks = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness", "avg"]
    assert cells == [f"{scores[t]:.2f}" for t in tasks]  # the card's numbers are the run's sts_test.json
    assert (model / "README.md").read_text() != card  # the model folder keeps its own (results-free) card


def test_release_leaves_hidden_bookkeeping_files_of_the_model_out(finished_run, tmp_path):
    """Snakemake marks a finished directory output with a hidden .snakemake_timestamp; a hard link
    to it would let the release rule's marker touch the model folder and rerun every evaluation."""
    marker = finished_run / "model" / ".snakemake_timestamp"
    marker.touch()
    before = marker.stat().st_mtime_ns
    out = release.build_release(finished_run, tmp_path / "release")
    assert not any(p.name.startswith(".") for p in out.rglob("*"))
    (out / ".snakemake_timestamp").touch()  # what Snakemake does to the release output
    os.utime(out / ".snakemake_timestamp", ns=(before + 10**9, before + 10**9))
    assert marker.stat().st_mtime_ns == before


def test_release_of_an_unfinished_run_is_refused(tmp_path, capsys):
    assert release.main(["build", "--run-dir", str(tmp_path), "--output", str(tmp_path / "r")]) == 1
    assert "is not a finished run" in capsys.readouterr().err and not (tmp_path / "r").exists()


class FakeHub:
    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise self.fail
        self.calls.append(("upload_folder", kwargs))
        return type("Info", (), {"commit_url": f"https://hub.example/{kwargs['repo_id']}/commit/1"})()


def test_push_creates_the_repo_and_uploads_the_folder(finished_run, tmp_path, monkeypatch, capsys):
    out = release.build_release(finished_run, tmp_path / "release", sts=finished_run / "sts_test.json")
    hub = FakeHub()
    url = release.push(out, "me/clusterns-test", private=True, api=hub)
    assert url == "https://hub.example/me/clusterns-test/commit/1"
    assert hub.calls[0] == ("create_repo", {"repo_id": "me/clusterns-test", "repo_type": "model", "private": True,
                                            "exist_ok": True})
    assert hub.calls[1][1]["folder_path"] == str(out) and hub.calls[1][1]["repo_id"] == "me/clusterns-test"
    # through the CLI, with the Hub's client replaced: the record, and one error line on failure
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: FakeHub())
    record = tmp_path / "pushed.json"
    assert release.main(["push", "--folder", str(out), "--repo-id", "me/x", "--record", str(record)]) == 0
    assert json.loads(record.read_text())["repo_id"] == "me/x"
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: FakeHub(RuntimeError("401 Unauthorized")))
    assert release.main(["push", "--folder", str(out), "--repo-id", "me/x"]) == 1
    assert "upload to me/x failed" in capsys.readouterr().err
    assert release.main(["push", "--folder", str(tmp_path), "--repo-id", "me/x"]) == 1  # not a release folder
