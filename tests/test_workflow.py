"""The Snakemake workflow: config validation, the run grid, the workflow's own code (formatting,
lint, the sources and software of each rule), dry runs of the demo and the paper grid, and
(slow) the demo pipeline end to end with the HTML report, then what a code change or a move of
the finished project reruns."""

from __future__ import annotations

import json
import modulefinder
import os
import re
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


def snakemake(workdir: Path, *args: str, configfile: Path, env: dict | None = None, timeout: int = 300,
              snakefile: Path = ROOT / "Snakefile", cwd: Path | None = None):
    cmd = [*SNAKEMAKE, "-s", str(snakefile), "-d", str(workdir), *args, f"--configfile={configfile}"]
    full_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


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
    expect = {  # the ClusterNS README table: global batch, gpus, lr, K, kmeans_lr, kmean_cosine, bml weight / alpha / beta
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
# The workflow's own code


def test_workflow_files_are_snakefmt_formatted():
    res = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert "No module named snakefmt" not in res.stderr, "snakefmt is missing: pip install -e '.[test]'"
    assert res.returncode == 0, f"run `snakefmt Snakefile workflow/`:\n{res.stdout}{res.stderr}"


@pytest.mark.parametrize("name", ["config.yaml", "demo.yaml"])
def test_snakemake_lint_is_clean(tmp_path, name):
    res = snakemake(tmp_path, "--lint", configfile=ROOT / "config" / name)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Lints for" not in out, out


# What each rule's command runs (`python -m clusterns.<stage>`; clusterns.launch starts
# clusterns.train). Checked against the commands below; a new rule with code inputs must be added.
RULE_STAGES = {
    "fetch_wiki": ("data",), "fetch_senteval": ("data",), "unpack_senteval": ("data",),
    "fetch_backbone": ("data",), "fetch_released": ("data",), "tokenize": ("tokenize",),
    "train": ("launch", "train"), "evaluate": ("sts",), "evaluate_base": ("sts",), "evaluate_released": ("sts",),
    "transfer": ("transfer",), "transfer_table": ("transfer",), "tables": ("report",), "plots": ("report",),
    "partial_report": ("report",), "report_manifest": (), "fetch_clustering": ("data",),
    "cluster_eval": ("cluster_eval",), "cluster_eval_base": ("cluster_eval",), "cluster_eval_released": ("cluster_eval",),
    "clustering_table": ("cluster_eval",), "release": ("release",), "push": ("release",),
    "mteb": ("mteb_eval",), "mteb_base": ("mteb_eval",), "mteb_released": ("mteb_eval",), "mteb_table": ("mteb_eval",),
}
# Rules that list no code: downloads (fixed by their checksums and pinned revisions), the
# manifest (a printf of a param), and partial_report (reruns every time).
UNTRACKED = {"fetch_wiki", "fetch_senteval", "unpack_senteval", "fetch_backbone", "fetch_released", "report_manifest",
             "partial_report", "fetch_clustering"}


def stage_imports(stages: tuple[str, ...]) -> tuple[set[Path], set[str]]:
    """The package files and the third-party top-level packages that ``python -m clusterns.<stage>``
    can import, as Python's own modulefinder sees them (it scans the bytecode of every function
    too): an oracle independent of the workflow's derivation from the syntax tree."""
    finder = modulefinder.ModuleFinder(path=[str(ROOT / "src")])
    for stage in stages:
        finder.import_hook(f"clusterns.{stage}")
    ours = {Path(m.__file__).resolve() for m in finder.modules.values() if m.__file__}
    tops = {name.split(".")[0] for name in finder.badmodules}
    return ours, tops - set(sys.stdlib_module_names) - {"__future__", "clusterns"}


def dry_run_jobs(stdout: str) -> list[tuple[str, list[str], str]]:
    """(rule, inputs, shell command) of every job of a `snakemake -n -p` listing."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", stdout)[1:]:
        rule = re.match(r"(?:local)?rule (\w+):", block).group(1)
        inputs = re.search(r"^    input: (.*)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append((rule, inputs.group(1).split(", ") if inputs else [], shell.group(1) if shell else ""))
    return jobs


def test_each_rule_lists_the_sources_its_stage_imports_relative_to_the_workdir(tmp_path, mirror):
    """The `code` inputs of every job are exactly the files its stage can import (directly or
    not, at the top of a module or inside a function), named relative to the working directory."""
    c = load("demo.yaml")
    c["transfer"] = {"enabled": True}
    c["mteb"] = {"enabled": True, "local_stsb": True, "tasks": ["STSBenchmark"]}
    c["release"] = {"push": True, "repo_id": "me/{method}-{backbone}-seed{seed}"}  # a dry run: nothing leaves
    c["released"] = {"r": {"model": "org/model", "method": "simcse", "backbone": "minilm", "pooler": "avg"}}
    c["backbones"]["hub"] = {"model": "org/bert", "family": "bert"}  # a base row: fetch_backbone
    res = snakemake(tmp_path, "-n", "-p", configfile=write_config(tmp_path, c), env={"CLUSTERNS_MIRROR": str(mirror)})
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = dry_run_jobs(res.stdout)
    checked = set()
    for rule, inputs, shell in jobs:
        if rule == "default":
            continue
        assert rule in RULE_STAGES, f"rule {rule}: add what it runs to RULE_STAGES"
        stages = RULE_STAGES[rule]
        if stages:
            assert f"python -m clusterns.{stages[0]} " in shell, (rule, shell)
        code = [p for p in inputs if p.endswith(".py")]
        for p in inputs:  # relative, but for what lies outside the working directory (the package's model)
            assert not os.path.isabs(p) or not (Path(p).is_relative_to(tmp_path) or p.endswith((".py", ".csv"))), \
                (rule, p)
        expected = set() if rule in UNTRACKED else stage_imports(stages)[0]
        assert {(tmp_path / p).resolve() for p in code} == expected, rule
        checked.add(rule)
    assert checked >= set(RULE_STAGES) - {"partial_report"}, set(RULE_STAGES) - checked
    train = stage_imports(("launch", "train"))[0]
    for module in ("method/losses.py", "model/packed.py", "method/settings.py", "model/prompt.py"):
        assert ROOT / "src/clusterns" / module in train, module  # imported indirectly or inside functions


def rule_envs() -> dict[str, Path]:
    """Rule name -> its conda env file, read from the (snakefmt-formatted) rule files; a
    `use rule a as b with:` that names none keeps a's."""
    envs, bases = {}, {}
    for smk in [ROOT / "Snakefile", *sorted((ROOT / "workflow").rglob("*.smk")), ROOT / "workflow" / "Snakefile"]:
        for block in re.split(r"\n(?=\S)", smk.read_text()):
            head = re.match(r"(?:rule (\w+):|use rule (\w+) as (\w+) with:)", block)
            if not head:
                continue
            name = head.group(1) or head.group(3)
            if head.group(2):
                bases[name] = head.group(2)
            conda = re.search(r"^    conda:\n        \"([^\"]+)\"", block, re.M)
            if conda:
                envs[name] = (smk.parent / conda.group(1)).resolve()
    for name, base in bases.items():
        envs.setdefault(name, envs.get(base))
    return envs


# import name -> the names its package has on conda-forge / PyPI (normalised: lower case, "_")
PACKAGE_NAMES = {"torch": {"pytorch", "torch"}, "yaml": {"pyyaml"}, "sklearn": {"scikit_learn"},
                 "matplotlib": {"matplotlib", "matplotlib_base"}, "PIL": {"pillow"}}


def test_each_rules_conda_env_has_what_its_stage_imports():
    envs = rule_envs()
    assert set(RULE_STAGES) <= set(envs), set(RULE_STAGES) - set(envs)
    for rule, stages in RULE_STAGES.items():
        env = envs[rule]
        assert env.is_file() and env.parent == ROOT / "workflow" / "envs", (rule, env)
        deps = yaml.safe_load(env.read_text())["dependencies"]
        specs = [d for d in deps if isinstance(d, str)] + [p for d in deps if isinstance(d, dict) for p in d["pip"]]
        names = {re.split(r"[<>=!~ \[]", s, maxsplit=1)[0].lower().replace("-", "_") for s in specs}
        assert "python" in names, env
        for top in stage_imports(stages)[1]:
            assert PACKAGE_NAMES.get(top, {top.lower()}) & names, f"{env.name} (rule {rule}) lacks {top}"


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
                              "plots": 1, "default": 1,
                              # short-text clustering: the eight sets, the base row, both runs, the table
                              "fetch_clustering": 8, "cluster_eval_base": 1, "cluster_eval": 2,
                              "clustering_table": 1,
                              "release": 2})  # each run's publishable folder (model + card)
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


PROJECT = ("Snakefile", "workflow", "config", "src", "profiles")  # what a run needs from the checkout


def copy_tree(src: Path, dst: Path) -> Path:
    """``cp -a``: the same files with the same mtimes."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def project_snakemake(project: Path, *args: str, env: dict | None = None, timeout: int = 300):
    """Snakemake in a project folder, as a user runs it there: its own Snakefile, config and src/."""
    return snakemake(project, *args, configfile=project / "config" / "demo.yaml", env=env, timeout=timeout,
                     snakefile=project / "Snakefile", cwd=project)


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory, mirror) -> Path:
    """The CPU demo (~10 min on 2 cores), run once for the slow tests below (only they use it), in
    a copy of the project tree: every source the DAG tracks lies in the copy, and the jobs import
    the copy's src/. Tests that change anything work on a copy of it, so any order passes."""
    project = tmp_path_factory.mktemp("demo") / "project"
    project.mkdir()
    for name in PROJECT:
        copy_tree(ROOT / name, project / name)
    res = project_snakemake(project, "--cores", "2", env={"CLUSTERNS_MIRROR": str(mirror)}, timeout=3600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    return project


def rerun_jobs(project: Path, mirror: Path) -> Counter:
    res = project_snakemake(project, "-n", env={"CLUSTERNS_MIRROR": str(mirror)})
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    return Counter() if "Nothing to be done" in out else job_counts(out)


def append_comment(path: Path) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write("# edited\n")


@pytest.mark.slow
def test_demo_pipeline_end_to_end(finished_demo, mirror):
    env = {"CLUSTERNS_MIRROR": str(mirror)}
    main_md = (finished_demo / "results/tables/main.md").read_text()
    for row in ("base", "SimCSE", "ClusterNS"):
        assert row in main_md
    for plot in ("avg_sts", "training_curves"):
        for ext in ("png", "pdf"):
            assert (finished_demo / f"results/plots/{plot}.{ext}").stat().st_size > 1000
    for method in ("simcse", "clusterns"):
        run = finished_demo / f"results/runs/{method}/minilm/seed42"
        for name in ("model/config.json", "model/modules.json", "train_log.csv", "eval_log.csv", "run.json",
                     "sts_test.json"):
            assert (run / name).exists(), name
    # Nothing left to do: a rerun is a no-op
    again = project_snakemake(finished_demo, "-n", env=env)
    assert "Nothing to be done" in again.stdout + again.stderr
    report = project_snakemake(finished_demo, "--report", str(finished_demo / "results/report.html"), env=env)
    assert report.returncode == 0, report.stdout + report.stderr
    assert (finished_demo / "results/report.html").stat().st_size > 10_000
    print(main_md)


@pytest.mark.slow
def test_a_change_in_a_module_train_imports_indirectly_reruns_training_and_what_follows(finished_demo, mirror,
                                                                                         tmp_path):
    project = copy_tree(finished_demo, tmp_path / "project")
    module = project / "src/clusterns/method/losses.py"
    train_imports = (project / "src/clusterns/train.py").read_text()
    assert "method.losses" not in train_imports and "import losses" not in train_imports  # via the objective only
    append_comment(module)
    counts = rerun_jobs(project, mirror)
    # the two runs, their scores and the report; nothing upstream of training (data, token cache)
    expected = {"train": 2, "evaluate": 2, "tables": 1, "plots": 1, "default": 1}
    if ROOT / "src/clusterns/method/losses.py" in stage_imports(("sts",))[0]:
        expected["evaluate_base"] = 1
    if load("demo.yaml")["clustering"]["enabled"]:  # the runs' clustering scores and their table follow
        expected.update(cluster_eval=2, clustering_table=1)
    expected["release"] = 2  # and each run's release folder (model + card)
    assert counts == Counter(expected), counts


@pytest.mark.slow
def test_a_change_in_the_report_module_reruns_only_the_report(finished_demo, mirror, tmp_path):
    project = copy_tree(finished_demo, tmp_path / "project")
    append_comment(project / "src/clusterns/report.py")
    assert rerun_jobs(project, mirror) == Counter({"tables": 1, "plots": 1, "default": 1})


@pytest.mark.slow
def test_demo_clustering_table_rows(finished_demo):
    """The short-text clustering stage in the DAG: the table has the base row and both runs, all
    eight sets, marked subsampled (the demo cuts each set), with the pooler each row used."""
    md = (finished_demo / "results/tables/clustering.md").read_text()
    for row in ("| MiniLM-L6 (base)‡ | avg | 1 |", "| SimCSE / MiniLM-L6‡ | avg | 1 |",
                "| ClusterNS / MiniLM-L6‡ | avg | 1 |"):
        assert row in md, md
    assert all(name in md for name in ("AG", "Bio", "Go-S", "G-T", "G-TS", "SS", "SO", "Tweet"))
    data = json.loads((finished_demo / "results/runs/clusterns/minilm/seed42/clustering.json").read_text())
    assert data["meta"]["subsampled"] and data["meta"]["restarts"] == [0, 1, 2]
    assert all(len(d["acc"]) == 3 for d in data["details"].values())
    print(md)


@pytest.mark.slow
def test_a_finished_project_copied_elsewhere_is_up_to_date(finished_demo, mirror, tmp_path):
    moved = copy_tree(finished_demo, tmp_path / "elsewhere")
    assert rerun_jobs(moved, mirror) == Counter()


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
    from clusterns.model.prompt import PROMPT_CONFIG_FILE, TEMPLATES, load_prompt_config
    from clusterns.evaluation.sts import TASKS as STS_TASKS
    from clusterns.evaluation.transfer import TASKS as TRANSFER_TASKS

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
                                              "fetch_clustering": 8, "cluster_eval": 2, "clustering_table": 1,
                                              "release": 2, "default": 1})
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
    # clustering (the demo's pooler: run): the prompt run embeds at its [MASK], the sentence cut at
    # 128 tokens (the tiny vocabulary spells long AG texts past the 512 positions)
    clu = json.loads((prompt_run / "clustering.json").read_text())
    assert clu["meta"]["pooler"] == "mask" and clu["meta"]["max_length"] == 128
    # Nothing left to do: a rerun is a no-op
    again = snakemake(tmp_path, "-n", configfile=conf, env=env)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr


# ------------------------------------------------------------------------------------------------
# The catalog's test case: .test/config/config.yaml runs every rule (but hub downloads, the upload)


def catalog_workdir(tmp_path: Path) -> Path:
    """A working directory for the .test config, with its random tiny backbone written in."""
    workdir = tmp_path / "test-case"
    res = subprocess.run([sys.executable, str(ROOT / ".test" / "make_tiny_backbone.py"),
                          str(workdir / "resources" / "tiny-bert")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return workdir


def test_catalog_test_config_lints_clean(tmp_path):
    res = snakemake(catalog_workdir(tmp_path), "--lint", configfile=ROOT / ".test" / "config" / "config.yaml")
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "Lints for" not in out, out


@pytest.mark.slow
def test_catalog_test_config_runs_every_rule(tmp_path, mirror):
    workdir = catalog_workdir(tmp_path)
    config = ROOT / ".test" / "config" / "config.yaml"
    res = snakemake(workdir, "--cores", "2", configfile=config, env={"CLUSTERNS_MIRROR": str(mirror)}, timeout=2400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-8000:]
    ran = set(re.findall(r"^(?:local)?rule (\w+):", res.stdout + res.stderr, re.M))
    rules = set(re.findall(r"^\s*(?:rule|use rule \w+ as) (\w+)", "\n".join(
        p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk")), re.M))
    not_offline = {"fetch_backbone", "fetch_released", "push", "partial_report"}  # hub, upload, on demand
    assert rules - not_offline <= ran, sorted(rules - not_offline - ran)
    for table in ("main", "ablation", "paired", "transfer", "clustering", "mteb"):
        assert (workdir / "results" / "tables" / f"{table}.md").stat().st_size > 100, table
    for method in ("simcse", "clusterns", "clusterns-prompt"):
        release = workdir / f"results/runs/{method}/tiny/seed1/release"
        assert (release / "README.md").is_file() and (release / "config.json").is_file()
    again = snakemake(workdir, "-n", configfile=config, env={"CLUSTERNS_MIRROR": str(mirror)})
    assert "Nothing to be done" in again.stdout + again.stderr
