"""The Snakemake workflow: config validation, the run grid, dry runs of the demo and the paper
grid, and (slow) the demo pipeline end to end with the HTML report."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from clusterns import config as cfg

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def load(name: str) -> dict:
    return cfg.load(ROOT / "config" / name)


def snakemake(workdir: Path, *args: str, configfile: Path, env: dict | None = None, timeout: int = 300):
    cmd = [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args, f"--configfile={configfile}"]
    full_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------------
# Schema and grid


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.update(seedz=[1]), "seedz"),
    (lambda c: c["training"].update(batch_size="big"), "training.batch_size"),
    (lambda c: c["methods"]["clusterns"]["objective"].update(kmeans=-1), "methods.clusterns.objective.kmeans"),
    (lambda c: c["backbones"]["minilm"].update(pooler="max"), "backbones.minilm.pooler"),
    (lambda c: c["data"]["wiki"].update(sha256="xyz"), "data.wiki.sha256"),
    (lambda c: c.update(released={"x": {"model": "m", "method": "simcse", "backbone": "minilm"}}), "released.x"),
    (lambda c: c.update(transfer={"enabled": True, "max_examples": 0}), "transfer.max_examples"),
])
def test_schema_rejects_with_the_key_named(mutate, key):
    c = load("demo.yaml")
    mutate(c)
    with pytest.raises(cfg.ConfigError, match=re.escape(key)):
        cfg.validate_schema(c)


def test_shipped_configs_validate_and_expand():
    for name in ("demo.yaml", "config.yaml"):
        c = load(name)
        cfg.validate_schema(c)
        assert cfg.expand_runs(c)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["methods"]["clusterns"]["objective"].update(kmeans=64), "batch"),
    (lambda c: c["training"].update(gpus=3), "not divisible by gpus=3"),
    (lambda c: c["runs"].append({"method": "nope", "backbone": "minilm"}), "unknown method 'nope'"),
    (lambda c: c["runs"].append({"method": "simcse", "backbone": "minilm"}), "appears twice"),
    (lambda c: c["methods"]["simcse"]["objective"].update(bml_weight=0.1), "kmeans"),
])
def test_grid_checks_refuse_inconsistent_settings(mutate, message):
    c = load("demo.yaml")
    mutate(c)
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.expand_runs(c)


def test_settings_precedence_and_sweeps():
    c = load("demo.yaml")
    c["methods"]["clusterns"]["training"] = {"lr": 1e-4, "eval_steps": 7}
    c["backbones"]["minilm"]["training"] = {"eval_steps": 9}
    c["runs"][1]["training"] = {"lr": 2e-4}
    c["sweeps"] = [{"method": "clusterns", "backbone": "minilm", "param": "kmeans", "values": [4, 16], "seeds": [1]}]
    runs = {(r.method, r.seed): r for r in cfg.expand_runs(c)}
    r = runs[("clusterns", 42)]
    assert (r.training["lr"], r.training["eval_steps"], r.training["batch_size"]) == (2e-4, 9, 32)
    assert runs[("simcse", 42)].training["lr"] == 3e-5
    sweep = runs[("clusterns-kmeans16", 1)]
    assert sweep.group == "sweep" and sweep.objective["kmeans"] == 16 and sweep.sweep["param"] == "kmeans"
    assert sweep.dir == "results/runs/clusterns-kmeans16/minilm/seed1"


def test_paper_grid_hyperparameters_match_design():
    runs = {(r.method, r.backbone): r for r in cfg.expand_runs(load("config.yaml"))}
    expect = {  # DESIGN §5: global batch, gpus, lr, K, kmeans_lr, kmean_cosine, bml weight / alpha / beta
        "bert-base": (256, 1, 5e-5, 128, 1e-3, 0.4, 1e-3, 0.0, 0.3),
        "bert-large": (512, 4, 5e-5, 128, 1e-3, 0.5, 5e-5, 0.25, 0.3),
        "roberta-base": (512, 2, 5e-5, 128, 1e-3, 0.4, 1e-4, 0.2, 0.5),
        "roberta-large": (512, 4, 5e-5, 128, 5e-4, 0.4, 0.0, None, None),
    }
    for bb, (batch, gpus, lr, k, klr, kcos, w, a, b) in expect.items():
        r = runs[("clusterns", bb)]
        o = r.objective
        assert (r.training["batch_size"], r.training["gpus"], r.training["lr"]) == (batch, gpus, lr)
        assert (o["kmeans"], o["kmeans_lr"], o["kmean_cosine"], o["hard_negatives"]) == (k, klr, kcos, True)
        assert o.get("bml_weight", 0.0) == w and o.get("bml_alpha") == a and o.get("bml_beta") == b
    simcse = {bb: (runs[("simcse", bb)].training["batch_size"], runs[("simcse", bb)].training["lr"]) for bb in expect}
    assert simcse == {"bert-base": (64, 3e-5), "bert-large": (64, 1e-5), "roberta-base": (512, 1e-5),
                      "roberta-large": (512, 3e-5)}
    prompt = {bb: runs[("clusterns-prompt", bb)] for bb in ("bert-base", "bert-large", "roberta-base")}
    got = {bb: (r.training["batch_size"], r.training["lr"], r.objective["kmeans"], r.objective["kmeans_lr"],
                r.objective["kmean_cosine"], r.objective["hard_negatives"], r.objective["bml_weight"],
                r.objective["bml_alpha"], r.objective["bml_beta"]) for bb, r in prompt.items()}
    assert got == {"bert-base": (512, 5e-5, 96, 5e-4, 0.4, True, 1e-2, 0.0, 0.2),
                   "bert-large": (256, 3e-5, 96, 1e-4, 0.2, True, 5e-4, 0.25, 0.3),
                   "roberta-base": (512, 5e-5, 128, 1e-3, 0.4, False, 1e-2, 0.2, 0.6)}
    assert prompt["bert-large"].training["gpus"] == 4 and prompt["roberta-base"].training["gpus"] == 2
    assert all(r.hparams({})["pooler"] == "mask" for r in prompt.values())
    assert runs[("clusterns-no-hn", "bert-base")].objective["hard_negatives"] is False
    assert runs[("clusterns-no-bml", "bert-base")].objective.get("bml_weight", 0.0) == 0.0


def test_paper_grid_reproduces_the_official_schedule_clipping_and_precision():
    """Read from the resolved grid (what the trainer receives), not from the YAML text."""
    runs = cfg.expand_runs(load("config.yaml"))
    by = {(r.method, r.backbone): r for r in runs}
    # SimCSE's own trainer has no early stopping; ClusterNS's train.py stops after 3 evaluations
    assert all(r.training["early_stop"] is None for r in runs if r.method == "simcse")
    assert all(r.training["early_stop"] == 3 for r in runs if r.method != "simcse")
    assert all(r.training["eval_steps"] == 125 and r.training["epochs"] == 1 and r.training["max_steps"] is None
               and r.training["eval_at_end"] is False for r in runs)
    # fp16 autocast + loss scaling, and the centroids in the embedding's dtype, as the official runs
    assert all(r.training["mixed_precision"] == "fp16" for r in runs)
    assert all(r.objective.get("centroid_dtype") == "embedding" for r in runs if r.objective.get("kmeans"))
    # the official W-GPU runs clip grad(L) / W at 1.0 = grad(L) at W (GPU counts: ClusterNS README)
    official_gpus = {("clusterns", "bert-base"): 1, ("clusterns", "bert-large"): 4, ("clusterns", "roberta-base"): 2,
                     ("clusterns", "roberta-large"): 4, ("clusterns-prompt", "bert-base"): 1,
                     ("clusterns-prompt", "bert-large"): 4, ("clusterns-prompt", "roberta-base"): 2,
                     ("clusterns-no-hn", "bert-base"): 1, ("clusterns-no-bml", "bert-base"): 1,
                     **{("simcse", bb): 1 for bb in ("bert-base", "bert-large", "roberta-base", "roberta-large")}}
    assert {key: r.training["max_grad_norm"] for key, r in by.items()} == {k: float(w) for k, w in official_gpus.items()}
    # and the hparams handed to the trainer carry them
    hp = by[("clusterns", "roberta-large")].hparams({})
    assert hp["training"]["max_grad_norm"] == 4.0 and hp["objective"]["centroid_dtype"] == "embedding"


# ------------------------------------------------------------------------------------------------
# Dry runs


def job_counts(stdout: str) -> Counter:
    table = stdout[stdout.index("Job stats:"):]
    counts = Counter()
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            if parts and parts[0] == "total":
                break
            continue
        counts[parts[0]] = int(parts[1])
    return counts


def test_bad_config_stops_snakemake_with_the_key_named(tmp_path):
    c = load("demo.yaml")
    c["training"]["lr"] = "fast"
    res = snakemake(tmp_path, "-n", configfile=write_config(tmp_path, c))
    assert res.returncode != 0
    assert "lr" in res.stdout + res.stderr and "fast" in res.stdout + res.stderr


def test_demo_dag_dry_run(tmp_path, mirror):
    res = snakemake(tmp_path, "-n", configfile=ROOT / "config" / "demo.yaml", env={"CLUSTERNS_MIRROR": str(mirror)})
    assert res.returncode == 0, res.stdout + res.stderr
    counts = job_counts(res.stdout)
    assert counts == Counter({"fetch_wiki": 1, "fetch_senteval": 1, "unpack_senteval": 1, "tokenize": 1,
                              "evaluate_base": 1, "train": 2, "evaluate": 2, "report_manifest": 1, "tables": 1,
                              "plots": 1, "default": 1})
    assert "--mirror" not in res.stdout  # the environment variable is read by the stage itself


def test_paper_grid_dry_run_lists_every_job_with_its_gpus(tmp_path):
    c = load("config.yaml")
    runs = cfg.expand_runs(c)
    res = snakemake(tmp_path, "-n", configfile=ROOT / "config" / "config.yaml", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    counts = job_counts(res.stdout)
    n_backbones = len(c["backbones"])
    assert counts["train"] == counts["evaluate"] == len(runs) == 13 * 5
    assert counts["fetch_backbone"] == counts["evaluate_base"] == n_backbones
    # one cache per backbone (shared by methods and seeds) + sentence-only caches of the 3 prompt backbones
    assert counts["tokenize"] == n_backbones + 3
    assert counts["fetch_wiki"] == counts["fetch_senteval"] == counts["unpack_senteval"] == 1
    assert counts["tables"] == counts["plots"] == 1
    assert counts["fetch_released"] == counts["evaluate_released"] == len(c["released"]) == 11
    assert counts["transfer"] == len(runs) and counts["transfer_table"] == 1
    # GPUs per training job: read from the dry-run job listing
    gpus = {}
    for block in res.stdout.split("rule train:")[1:]:
        wc = re.search(r"wildcards: method=(\S+), backbone=(\S+), seed=(\d+)", block)
        gpu = re.search(r"gpu=(\d+)", block)
        gpus[(wc.group(1).rstrip(","), wc.group(2).rstrip(","), int(wc.group(3)))] = int(gpu.group(1))
    assert len(gpus) == len(runs)
    for r in runs:
        assert gpus[(r.method, r.backbone, r.seed)] == r.training["gpus"]
    assert gpus[("clusterns", "roberta-base", 42)] == 2 and gpus[("clusterns", "bert-large", 42)] == 4


# ------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, mirror):
    env = {"CLUSTERNS_MIRROR": str(mirror)}
    demo = ROOT / "config" / "demo.yaml"
    res = snakemake(tmp_path, "--cores", "2", configfile=demo, env=env, timeout=3600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    main_md = (tmp_path / "results/tables/main.md").read_text()
    for row in ("base", "SimCSE", "ClusterNS"):
        assert row in main_md
    for plot in ("avg_sts", "training_curves"):
        for ext in ("png", "pdf"):
            assert (tmp_path / f"results/plots/{plot}.{ext}").stat().st_size > 1000
    for method in ("simcse", "clusterns"):
        run = tmp_path / f"results/runs/{method}/minilm/seed42"
        for name in ("model/config.json", "model/modules.json", "train_log.csv", "eval_log.csv", "run.json",
                     "sts_test.json"):
            assert (run / name).exists(), name
    # Nothing left to do: a rerun is a no-op
    again = snakemake(tmp_path, "-n", configfile=demo, env=env)
    assert "Nothing to be done" in again.stdout + again.stderr
    report = snakemake(tmp_path, "--report", str(tmp_path / "results/report.html"), configfile=demo, env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (tmp_path / "results/report.html").stat().st_size > 10_000
    print(main_md)


@pytest.mark.slow
def test_released_checkpoint_rows(tmp_path, mirror, tiny_bert):
    """A locally saved model stands in for a hub id: scored by the rule, shown as a 'released' row."""
    c = load("demo.yaml")
    c["released"] = {"tiny-simcse": {"model": str(tiny_bert), "method": "simcse", "backbone": "minilm",
                                     "pooler": "cls_before_pooler"}}
    conf = write_config(tmp_path, c)
    env = {"CLUSTERNS_MIRROR": str(mirror)}
    res = snakemake(tmp_path, "--cores", "2", "results/released/tiny-simcse/sts_test.json", "results/report/manifest.json",
                    configfile=conf, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    partial = snakemake(tmp_path, "--cores", "1", "partial_report", configfile=conf, env=env, timeout=600)
    assert partial.returncode == 0, partial.stdout[-4000:] + partial.stderr[-4000:]
    table = (tmp_path / "results/partial/tables/main.md").read_text()
    assert "SimCSE (released)" in table
    csv_rows = (tmp_path / "results/partial/tables/main.csv").read_text()
    assert "released" in csv_rows


@pytest.mark.slow
def test_prompt_run_and_transfer_tasks_end_to_end(tmp_path, mirror, tiny_bert):
    """A prompt-based run and a plain run on a tiny random BERT, trained for real, then scored on STS
    and on the seven transfer tasks (subsampled) through the transfer and transfer_table rules."""
    from clusterns.prompt import PROMPT_CONFIG_FILE, TEMPLATES, load_prompt_config
    from clusterns.sts import TASKS as STS_TASKS
    from clusterns.transfer import TASKS as TRANSFER_TASKS

    c = load("demo.yaml")
    c["data"]["wiki"]["head"] = 200
    c["backbones"] = {"tiny": {"model": str(tiny_bert), "family": "bert", "label": "tiny BERT"}}
    c["training"] = {"batch_size": 8, "max_steps": 3, "lr": 3e-5, "eval_steps": 1000, "save_steps": 1000,
                     "log_steps": 1, "gpus": 1, "num_workers": 0}
    for method in ("clusterns", "clusterns-prompt"):  # clustering from step 1
        c["methods"][method]["objective"].update(kmeans=4, kmean_cosine=1.0)
    c["runs"] = [{"method": "clusterns-prompt", "backbone": "tiny"}, {"method": "clusterns", "backbone": "tiny"}]
    c["seeds"] = [7]
    c["transfer"] = {"enabled": True, "mode": "fast", "max_examples": 200}
    c["evaluation"] = {"batch_size": 256, "dtype": "fp32", "base": False}
    c["report"] = {"paired": [["clusterns-prompt", "clusterns"]], "plots": False}
    conf = write_config(tmp_path, c)
    env = {"CLUSTERNS_MIRROR": str(mirror)}
    res = snakemake(tmp_path, "--cores", "2", configfile=conf, env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert job_counts(res.stdout + res.stderr) == Counter({"fetch_wiki": 1, "fetch_senteval": 1, "unpack_senteval": 1,
                                              "tokenize": 2, "train": 2, "evaluate": 2, "transfer": 2,
                                              "transfer_table": 1, "report_manifest": 1, "tables": 1,
                                              "default": 1})
    runs = tmp_path / "results/runs"
    prompt_run, plain_run = runs / "clusterns-prompt/tiny/seed7", runs / "clusterns/tiny/seed7"
    # the prompt run trains on the sentence-only cache, with clustering, and exports its template
    assert (tmp_path / "resources/tokenized/tiny/S32").is_dir() and (tmp_path / "resources/tokenized/tiny/L32").is_dir()
    for run in (prompt_run, plain_run):
        log = (run / "train_log.csv").read_text().splitlines()
        header = log[0].split(",")
        started = [row.split(",")[header.index("clustering_started")] for row in log[1:]]
        assert started == ["1", "1", "1"], (run, log)
    assert (prompt_run / "model" / PROMPT_CONFIG_FILE).is_file()
    assert not (plain_run / "model" / PROMPT_CONFIG_FILE).exists()
    prompt_cfg = load_prompt_config(prompt_run / "model")
    assert prompt_cfg["template"] == TEMPLATES["bert"][0] and prompt_cfg["protocol"] == "raw"
    # STS: the seven test tasks; the prompt run embeds with its template and reports the other protocol
    for run in (prompt_run, plain_run):
        sts = json.loads((run / "sts_test.json").read_text())
        assert set(STS_TASKS["test"]) <= set(sts), run
    sts = json.loads((prompt_run / "sts_test.json").read_text())
    assert sts["meta"]["pooler"] == "mask" and sts["meta"]["prompt"]["template"] == prompt_cfg["template"]
    assert set(sts["other_protocols"]["denoised"]) >= {*STS_TASKS["test"], "avg"}
    # transfer: seven tasks per run, subsampled, accuracies in [0, 100]
    for run, pooler in ((prompt_run, "mask"), (plain_run, "cls_before_pooler")):
        tr = json.loads((run / "transfer.json").read_text())
        assert tr["meta"]["pooler"] == pooler and tr["meta"]["mode"] == "fast"
        assert tr["meta"]["subsampled"] is True and tr["meta"]["max_examples"] == 200
        assert tr["meta"]["tasks"] == list(TRANSFER_TASKS)
        for task in TRANSFER_TASKS:
            assert 0.0 <= tr[task] <= 100.0, (run, task, tr[task])
            assert max(tr["details"][task]["counts"].values()) <= 200
    assert json.loads((prompt_run / "transfer.json").read_text())["meta"]["prompt"]["template"] == prompt_cfg["template"]
    table = (tmp_path / "results/tables/transfer.md").read_text()
    for label in ("ClusterNS (prompt) / tiny BERT / seed 7", "ClusterNS / tiny BERT / seed 7"):
        assert f"| {label}‡ |" in table, table
    assert "subsampled" in table
    csv_rows = (tmp_path / "results/tables/transfer.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].split(",")[1:8] == list(TRANSFER_TASKS)
    main_md = (tmp_path / "results/tables/main.md").read_text()
    assert "ClusterNS (prompt)" in main_md and "ClusterNS" in main_md
    # Nothing left to do: a rerun is a no-op
    again = snakemake(tmp_path, "-n", configfile=conf, env=env)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr
