"""The benchmark scripts in their quickest modes, so they never rot: each must exit 0 and print its
summary table. No timing is asserted (the numbers depend on the machine and its load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    return proc.stdout


@pytest.fixture(autouse=True)
def _need_data(mirror, minilm):  # fixtures from conftest: the data mirror and the packaged MiniLM
    os.environ.setdefault("CLUSTERNS_TEST_MIRROR", str(mirror))


def test_train_throughput_tiny(tmp_path):
    """Every system (sentence-transformers, SimCSE, ClusterNS) through the real loops on a toy BERT."""
    raw = tmp_path / "train.json"
    out = run_script("train_throughput.py", "--model", "random-bert-tiny", "--batch", "8", "--steps", "2",
                     "--warmup", "1", "--rounds", "1", "--peak-n", "256", "--json", str(raw),
                     "--systems", "st", "simcse", "clusterns", "simcse-unpacked")
    assert "## summary (train_throughput)" in out
    assert "| sentence-transformers (MNRL)" in out and "| ours, ClusterNS (kmeans K)" in out
    assert "ClusterNS clustering active on every measured step: True" in out
    assert "SimCSE packed / HF forward (training.packed: false)" in out
    data = json.loads(raw.read_text())
    run = data["batches"][0]["runs"]
    assert {r["system"] for r in run} == {"st", "simcse", "clusterns", "simcse-unpacked"}
    assert all(len(r["step_seconds"]) == 2 for r in run)
    packed = {r["system"]: r["packed"] for r in run if r["system"] != "st"}
    assert packed["simcse"].startswith("on (") and packed["simcse-unpacked"].startswith("off (")


@pytest.mark.slow
def test_train_throughput_gpu_path_on_cpu():
    """The --device cuda code path's model (random BERT-base) with tiny settings, on the CPU."""
    out = run_script("train_throughput.py", "--device", "cpu", "--model", "random-bert-base", "--quick",
                     "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1", "--peak-n", "256",
                     "--systems", "st", "simcse")
    assert "## summary (train_throughput)" in out and "12 layers * 768" in out


@pytest.mark.slow
def test_eval_throughput_quick(tmp_path):
    raw = tmp_path / "eval.json"
    out = run_script("eval_throughput.py", "--quick", "--max-pairs", "60", "--rounds", "1", "--json", str(raw))
    assert "## summary (eval_throughput)" in out and "speed-up ours vs ST" in out
    data = json.loads(raw.read_text())
    assert set(data["score_diffs_x100"]) == {"STS12", "STSBenchmark", "SICKRelatedness"}
    # both evaluators scored the same model on the same pairs: the scores agree (x100 units); ST
    # rounds cosines to float32, which on near-ties moves a Spearman by ~1e-5
    assert max(abs(v) for v in data["score_diffs_x100"].values()) < 1e-3, data["score_diffs_x100"]


@pytest.mark.slow
def test_pipeline_overhead_quick():
    out = run_script("pipeline_overhead.py", "--quick")
    assert "## summary (pipeline_overhead)" in out
    assert "paper grid: snakemake -n" in out and "fit: t =" in out


def test_flops_tiny(tmp_path):
    raw = tmp_path / "flops.json"
    out = run_script("flops.py", "--quick", "--model", "random-bert-tiny", "--batch", "8", "--repeats", "1",
                     "--peak-n", "256", "--json", str(raw))
    assert "## summary (flops)" in out and "whole step (real tokens)" in out
    assert json.loads(raw.read_text())["summary"]["real_over_padded_tokens"] <= 1.0


def test_clustering_cost_quick():
    out = run_script("clustering_cost.py", "--quick", "--batch", "64", "--k", "16", "--dim", "64", "--repeats", "2")
    assert "clustering" in out.lower()


@pytest.mark.slow
def test_clustering_eval_quick(tmp_path):
    raw = tmp_path / "clustering.json"
    out = run_script("clustering_eval.py", "--quick", "--json", str(raw))
    assert "## summary (clustering_eval)" in out
    data = json.loads(raw.read_text())
    assert list(data["results"]["details"]) == ["AG", "Bio", "Go-S", "G-T", "G-TS", "SS", "SO", "Tweet"]
