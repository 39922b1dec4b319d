"""The guarantees the README makes under faults: a killed run resumes to the very result of an
uninterrupted one (every configuration we ship), checkpoints survive a kill at any moment and a
full disk, bad caches are refused before training, a diverged run keeps its last good checkpoint.

Faults are injected at exact points with ``CLUSTERNS_FAULT`` (clusterns.training.faults), so no
test races a timer: ``kill@step:N`` is a SIGKILL right after step N, as a preemption would be."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from test_train import ENV, hparams, read_log, weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory, mirror):
    """400 mirror sentences tokenized for a tiny BERT in both cache formats, and SentEval."""
    from conftest import make_tiny_bert

    from clusterns.tokenize import tokenize_to_disk

    root = tmp_path_factory.mktemp("reliability")
    make_tiny_bert(root / "model", layers=2, hidden=32)
    lines = (mirror / "wiki1m_for_simcse.txt").read_text(encoding="utf-8").splitlines()[:400]
    (root / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenize_to_disk(root / "model", root / "wiki.txt", root / "tok", max_length=32)
    tokenize_to_disk(root / "model", root / "wiki.txt", root / "tok_s", max_length=32, sentence_only=True)
    with tarfile.open(mirror / "senteval.tar") as tar:
        tar.extractall(root / "senteval", filter="data")
    return root


def stage(root: Path, name: str, hp: dict, *, processes: int = 1, fault: str | None = None, data: str = "tok",
          senteval: bool = False, state: str | None = None) -> subprocess.CompletedProcess:
    (root / f"{name}.json").write_text(json.dumps(hp))
    cmd = [sys.executable, "-m", "clusterns.launch", "--gpus", str(processes), "--cpu-processes", str(processes),
           "--", "--hparams", str(root / f"{name}.json"), "--data", str(root / data), "--model", str(root / "model"),
           "--run-dir", str(root / name / "run"), "--state-dir", str(root / (state or name) / "state")]
    if senteval:
        cmd += ["--senteval", str(root / "senteval")]
    env = {k: v for k, v in ENV.items() if k != "CLUSTERNS_FAULT"}
    if fault:
        env["CLUSTERNS_FAULT"] = fault
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def eval_rows(path: Path) -> list[dict]:
    return read_log(path, drop=("seconds",))


def assert_same_run(root: Path, a: str, b: str) -> None:
    """Bit-identical results: per-step log, eval log, every weight, selection and clustering."""
    assert read_log(root / a / "run/train_log.csv") == read_log(root / b / "run/train_log.csv")
    assert eval_rows(root / a / "run/eval_log.csv") == eval_rows(root / b / "run/eval_log.csv")
    wa, wb = weights(root / a / "run/model"), weights(root / b / "run/model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((root / n / "run/run.json").read_text()) for n in (a, b))
    for key in ("steps", "stopped_early", "best_step", "best_stsb_dev", "clustering_start_step"):
        assert ra[key] == rb[key], key
    assert [r["centroids_sha256"] for r in ra["ranks"]] == [r["centroids_sha256"] for r in rb["ranks"]]


def checkpoint_step(state: Path, name: str = "checkpoint") -> int:
    return json.loads((state / name / "clusterns_meta.json").read_text())["step"]


# Every configuration we ship: one process, two (gloo), with dev evaluation (best checkpoint,
# early-stopping counters, eval log), a prompt run.
CONFIGS = {
    "one_process": ({}, {}),
    "two_processes": ({}, {"processes": 2}),
    "dev_evaluation": ({"training": {"eval_steps": 4, "early_stop": 3}}, {"senteval": True}),
    "prompt": ({"pooler": "mask", "eval_pooler": "mask", "prompt": {}}, {"data": "tok_s"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_killed_run_resumes_to_the_uninterrupted_result(data, config):
    extra, how = CONFIGS[config]
    training = {"max_steps": 20, "save_steps": 5, "log_steps": 2, "batch_size": 16, **extra.get("training", {})}
    hp = hparams(training=training, **{k: v for k, v in extra.items() if k != "training"})
    ref = stage(data, f"ref_{config}", hp, **how)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    killed = stage(data, f"kill_{config}", hp, fault="kill@step:12", **how)
    assert killed.returncode != 0
    state = data / f"kill_{config}" / "state"
    assert checkpoint_step(state) == 10 and not (data / f"kill_{config}" / "run").exists()
    resumed = stage(data, f"kill_{config}", hp, **how)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "at step 10" in resumed.stdout + resumed.stderr
    assert_same_run(data, f"ref_{config}", f"kill_{config}")
    if config == "dev_evaluation":
        steps = [int(r["step"]) for r in eval_rows(data / f"kill_{config}" / "run/eval_log.csv")]
        assert steps == [4, 8, 12, 16, 20] or steps[-1] < 20  # every evaluation once (or an early stop)
    assert not state.exists()  # finished: checkpoints removed


@pytest.mark.slow
def test_a_kill_between_the_two_renames_resumes_from_checkpoint_old(data):
    hp = hparams(training={"max_steps": 15, "save_steps": 5, "log_steps": 5, "batch_size": 16})
    ref = stage(data, "old_ref", hp)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    killed = stage(data, "old_kill", hp, fault="kill@rename:10")
    assert killed.returncode != 0
    state = data / "old_kill" / "state"
    assert not (state / "checkpoint").exists() and checkpoint_step(state, "checkpoint.old") == 5
    resumed = stage(data, "old_kill", hp)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "checkpoint.old at step 5" in resumed.stdout + resumed.stderr
    assert_same_run(data, "old_ref", "old_kill")


@pytest.mark.slow
@pytest.mark.parametrize("change", ["settings", "process_count"])
def test_a_checkpoint_of_other_settings_is_moved_aside_and_the_run_starts_over(data, change):
    hp = hparams(training={"max_steps": 12, "save_steps": 5, "log_steps": 4, "batch_size": 16})
    killed = stage(data, f"stale_{change}", hp, fault="kill@step:7")
    assert killed.returncode != 0 and checkpoint_step(data / f"stale_{change}" / "state") == 5
    other = hparams(training={**hp["training"], "lr": 2e-4}) if change == "settings" else hp
    how = {"processes": 2} if change == "process_count" else {}
    rerun = stage(data, f"stale_{change}", other, **how)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    out = rerun.stdout + rerun.stderr
    assert "from other settings or process count; moved to" in out and "resumed from" not in out
    assert list(data.glob(f"stale_{change}/state.stale-*"))
    fresh = stage(data, f"fresh_{change}", other, **how)
    assert fresh.returncode == 0
    assert read_log(data / f"stale_{change}/run/train_log.csv") == read_log(data / f"fresh_{change}/run/train_log.csv")


@pytest.mark.slow
def test_a_diverged_run_stops_at_its_step_keeps_the_last_good_checkpoint_and_resumes(data):
    hp = hparams(training={"max_steps": 12, "save_steps": 5, "log_steps": 2, "batch_size": 16})
    ref = stage(data, "nan_ref", hp)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    bad = stage(data, "nan_run", hp, fault="nan@loss:8")
    assert bad.returncode != 0 and "non-finite loss at step 8" in bad.stderr
    assert checkpoint_step(data / "nan_run" / "state") == 5  # the last good one, no later checkpoint
    assert not (data / "nan_run" / "run").exists()  # no half-written outputs
    again = stage(data, "nan_run", hp)  # the cause gone (e.g. a lower lr would be a new run): resume
    assert again.returncode == 0 and "at step 5" in again.stdout + again.stderr
    assert_same_run(data, "nan_ref", "nan_run")


@pytest.mark.slow
def test_a_full_disk_at_checkpoint_time_fails_clearly_and_keeps_the_previous_checkpoint(data):
    hp = hparams(training={"max_steps": 12, "save_steps": 5, "log_steps": 2, "batch_size": 16})
    ref = stage(data, "disk_ref", hp)
    assert ref.returncode == 0
    full = stage(data, "disk_run", hp, fault="enospc@save:10")
    assert full.returncode == 1, full.stdout + full.stderr
    assert "cannot write the checkpoint of step 10" in full.stderr and "No space left" in full.stderr
    assert "is intact" in full.stderr
    # caught by the stage (one message), not a traceback out of our code (accelerate's launcher
    # does print its own CalledProcessError for the failed child)
    assert not re.search(r'File "[^"]*clusterns/(train|training)', full.stderr), full.stderr
    state = data / "disk_run" / "state"
    assert checkpoint_step(state) == 5 and not (state / "checkpoint.tmp").exists()
    assert not (data / "disk_run" / "run").exists()
    again = stage(data, "disk_run", hp)
    assert again.returncode == 0 and "at step 5" in again.stdout + again.stderr
    assert_same_run(data, "disk_ref", "disk_run")


def test_an_unwritable_state_folder_is_refused_before_training(data, tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the state folder should be")  # root ignores permission bits
    hp = hparams(training={"max_steps": 2})
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    res = subprocess.run([sys.executable, "-m", "clusterns.train", "--hparams", str(tmp_path / "hp.json"), "--data",
                          str(data / "tok"), "--model", str(data / "model"), "--run-dir", str(tmp_path / "run"),
                          "--state-dir", str(blocker / "state")], env=ENV, capture_output=True, text=True)
    assert res.returncode == 1 and "cannot write to the state folder" in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


def _train(root: Path, tok: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "hp.json").write_text(json.dumps(hparams(training={"max_steps": 2})))
    return subprocess.run([sys.executable, "-m", "clusterns.train", "--hparams", str(tmp_path / "hp.json"), "--data",
                           str(tok), "--model", str(root / "model"), "--run-dir", str(tmp_path / "run"),
                           "--state-dir", str(tmp_path / "state")], env=ENV, capture_output=True, text=True)


def test_a_truncated_or_foreign_token_cache_is_refused_before_training(data, tmp_path, tiny_roberta):
    import shutil

    from clusterns.tokenize import tokenize_to_disk

    # rows missing (a cache whose arrow file was cut, then rewritten by hand)
    cut = tmp_path / "cut"
    shutil.copytree(data / "tok", cut)
    stats = json.loads((cut / "tokenize_stats.json").read_text())
    (cut / "tokenize_stats.json").write_text(json.dumps({**stats, "sentences": stats["sentences"] + 7}))
    res = _train(data, cut, tmp_path / "a")
    assert res.returncode == 1 and "is incomplete" in res.stderr and not (tmp_path / "a/run").exists(), res.stderr
    # a cut arrow file
    broken = tmp_path / "broken"
    shutil.copytree(data / "tok", broken)
    arrow = next(broken.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 3])
    res = _train(data, broken, tmp_path / "b")
    assert res.returncode == 1 and "cannot be read" in res.stderr and "rebuild" in res.stderr, res.stderr
    # a cache of another tokenizer
    tokenize_to_disk(tiny_roberta, data / "wiki.txt", tmp_path / "roberta_tok", max_length=32)
    res = _train(data, tmp_path / "roberta_tok", tmp_path / "c")
    assert res.returncode == 1 and "another tokenizer" in res.stderr, res.stderr


def test_empty_lines_and_undecodable_bytes_are_counted_and_handled_as_documented(tiny_bert, tmp_path):
    from clusterns.tokenize import read_sentences, tokenize_to_disk

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a man is playing\n\n   \nthe dog runs \xff\xfe here\r\ntwo people\n")
    sentences, stats = read_sentences(corpus)
    assert sentences == ["a man is playing", "the dog runs \ufffd\ufffd here", "two people"]
    assert stats == {"lines": 5, "empty_dropped": 2, "decode_errors": 1}
    out = tokenize_to_disk(tiny_bert, corpus, tmp_path / "tok", max_length=32)
    assert out["sentences"] == 3 and out["empty_dropped"] == 2 and out["decode_errors"] == 1


@pytest.mark.slow
def test_a_failing_packed_check_falls_back_to_the_hf_forward_and_says_so(data):
    hp = hparams(training={"max_steps": 4, "log_steps": 1, "dropout": 0.0})
    res = stage(data, "fallback", hp, fault="mismatch@packed:0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[clusterns.train] packed forward off: the packed forward differs" in res.stdout + res.stderr
    run = json.loads((data / "fallback/run/run.json").read_text())
    assert run["packed"].startswith("off (the packed forward differs") and run["effective"]["packed"] == run["packed"]
    plain = stage(data, "plain", hparams(training={**hp["training"], "packed": False}))
    assert plain.returncode == 0
    assert read_log(data / "fallback/run/train_log.csv") == read_log(data / "plain/run/train_log.csv")  # the HF forward


def test_launch_under_slurm_uses_the_allocation_and_never_leases(monkeypatch, capsys):
    from clusterns import launch

    calls = []
    monkeypatch.setattr(launch, "_run", lambda cmd, env: calls.append((cmd, env["CUDA_VISIBLE_DEVICES"])) or 0)
    monkeypatch.setattr(launch, "lease_gpus", lambda *a, **k: pytest.fail("leased GPUs under SLURM"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the GPUs SLURM allocated to the job
    assert launch.main(["--gpus", "2", "--", "--x"]) == 0
    cmd, visible = calls[0]
    assert visible == "3,5" and cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert launch.main(["--gpus", "3", "--", "--x"]) == 1
    assert "asks for 3 GPUs but SLURM gave this job 2" in capsys.readouterr().err
    # without SLURM the same GPUs are leased (lock files), and only the leased ones are visible
    monkeypatch.delenv("SLURM_JOB_ID")
    leased = []

    class Lease:
        def __init__(self, n, gpus, lock_dir):
            leased.append((n, gpus))

        def __enter__(self):
            return ["5"]

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(launch, "lease_gpus", Lease)
    assert launch.main(["--gpus", "1", "--", "--x"]) == 0
    assert leased == [(1, ["3", "5"])] and calls[-1][1] == "5"
