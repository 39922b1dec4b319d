"""The SLURM profile (profiles/slurm) against a real scheduler.

A session fixture starts a throwaway single-node SLURM cluster on this machine
(``scripts/slurm-cluster``: Debian's slurm-wlm + munge, its own munge socket, no accounting
database, 2 CPUs, two fake GPUs), then a tiny configuration of the whole pipeline runs twice, at
the same time: locally (``snakemake --cores 2``) and through
``snakemake --workflow-profile <profile>`` with the real sbatch/squeue/srun, where <profile> is
profiles/slurm with the edits a user makes for a cluster (here: small 1-CPU jobs, job status
from squeue as there is no sacct). Every job must have gone through SLURM (training and
evaluation with a GPU allocated by SLURM, found to be no CUDA device, so on the CPU), and both
runs must give the same numbers (CPU, same seeds, same thread counts).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from clusterns import config as cfg

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
SLURM_CLUSTER = ROOT / "scripts" / "slurm-cluster"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# Threads (= CPUs) per job, the same in both runs (thread counts can change float results). One:
# the two runs share this machine's cores, and oversubscribed OpenMP threads are many times slower.
THREADS = 1
NODE_CPUS = 2  # the test node: two 1-CPU jobs at once (both trainings, both evaluations)


def require_plugin():
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.fail("snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')")


def run_snakemake(workdir: Path, *args: str, configfile: Path, env: dict | None = None, path: list[Path] = ()):
    cmd = [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args, f"--configfile={configfile}"]
    full_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    # the jobs' `python -m clusterns...` must resolve to this interpreter (SLURM jobs inherit this
    # environment: the plugin submits with sbatch --export=ALL)
    full_env["PATH"] = os.pathsep.join([*map(str, path), str(Path(sys.executable).parent), full_env.get("PATH", "")])
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)


def finish(proc: subprocess.Popen, timeout: int = 1800) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -1, out + "\n[timed out]"
    return proc.returncode, out


# ------------------------------------------------------------------------------------------------
# The profile itself (no cluster needed)


def workflow_rules() -> set[str]:
    res = subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--list-rules",
                          f"--configfile={ROOT / 'config' / 'demo.yaml'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return {line.strip() for line in res.stdout.splitlines() if re.fullmatch(r"\s*\w+\s*", line)}


def test_slurm_profile_names_real_rules_and_keeps_the_gpu_of_each_run():
    prof = yaml.safe_load(PROFILE.read_text())
    assert prof["executor"] == "slurm"
    assert prof["retries"] >= 1 and prof["latency-wait"] >= 30 and prof["jobs"] >= 1
    rules = workflow_rules()
    assert {"train", "evaluate", "tokenize", "fetch_wiki"} <= rules
    assert set(prof["set-resources"]) <= rules, set(prof["set-resources"]) - rules
    assert set(prof["set-threads"]) <= rules
    # every rule that reaches SLURM has its resources set (the local rule report_manifest never does)
    assert rules - set(prof["set-resources"]) <= {"report_manifest", "partial_report", "all", "default"}, \
        rules - set(prof["set-resources"])
    # the evaluations that encode text ask for a GPU
    for rule in ("evaluate", "evaluate_base", "evaluate_released", "transfer", "cluster_eval", "mteb"):
        assert prof["set-resources"][rule].get("gpu") == 1, rule
    # the rule's own gpu resource (= training.gpus of each run) reaches sbatch: never overridden
    assert "gpu" not in prof["set-resources"]["train"]
    for rule, threads in prof["set-threads"].items():  # cpus-per-task = the threads the job uses
        assert prof["set-resources"][rule].get("cpus_per_task", threads) == threads, rule
    # partition/account are left to the site: never a placeholder that sbatch would receive
    for key in ("slurm_partition", "slurm_account"):
        assert key not in prof.get("default-resources", {})


def test_slurm_profile_dry_run_shows_each_runs_gpus(tmp_path):
    require_plugin()
    c = cfg.load(ROOT / "config" / "config.yaml")
    res = subprocess.run([*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--workflow-profile",
                          str(PROFILE.parent), "-n", "results/runs/clusterns/roberta-base/seed42/sts_test.json",
                          "results/runs/clusterns/bert-large/seed42/sts_test.json",
                          f"--configfile={ROOT / 'config' / 'config.yaml'}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    blocks = {m.group(1): m.group(0) for m in re.finditer(
        r"rule train:.*?wildcards: method=clusterns, backbone=([\w-]+).*?resources: [^\n]*", res.stdout, re.S)}
    runs = {r.backbone: r for r in cfg.expand_runs(c) if r.method == "clusterns"}
    assert set(blocks) == {"roberta-base", "bert-large"}
    for bb, block in blocks.items():
        assert f"gpu={runs[bb].training['gpus']}" in block  # 2 and 4: the paper's GPUs per run
        assert "cpus_per_task=8" in block and "mem_mb=64000" in block and "runtime=720" in block
    assert re.search(r"rule evaluate:.*?resources: [^\n]*gpu=1", res.stdout, re.S)


# ------------------------------------------------------------------------------------------------
# A real cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node SLURM cluster (2 CPUs, 2 fake GPUs) for the session; yields its environment."""
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "squeue")
               if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    # .ci/run installs SLURM and sets CLUSTERNS_REQUIRE_SLURM=1: there a skip would hide that the
    # real-scheduler tests did not run, so it is a failure instead
    give_up = pytest.fail if os.environ.get("CLUSTERNS_REQUIRE_SLURM") == "1" else pytest.skip
    if missing:
        give_up(f"SLURM is not installed ({', '.join(missing)} missing): "
                "apt-get install -y slurm-wlm munge (.ci/run does this)")
    if os.geteuid() != 0:
        give_up("the test cluster's slurmd must run as root (run the tests as root or under sudo)")
    d = Path(tempfile.mkdtemp(prefix="clusterns-slurm-"))  # short path: munge's socket lives there
    res = subprocess.run([sys.executable, str(SLURM_CLUSTER), "start", str(d), "--cpus", str(NODE_CPUS),
                          "--gpus", "2"], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        pytest.fail(f"could not start the test SLURM cluster:\n{res.stdout}\n{res.stderr}")
    try:
        yield {"SLURM_CONF": str(d / "slurm.conf")}
    finally:
        subprocess.run([sys.executable, str(SLURM_CLUSTER), "stop", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


def cluster_profile(dst: Path) -> Path:
    """profiles/slurm with the edits a user makes for this cluster, written to ``dst/config.yaml``."""
    prof = yaml.safe_load(PROFILE.read_text())
    prof["slurm-status-command"] = "squeue"  # no accounting database (sacct) on the test cluster
    prof["slurm-init-seconds-before-status-checks"] = 2  # tiny jobs: poll often
    prof["seconds-between-status-checks"] = 2
    prof["slurm-keep-successful-logs"] = True  # the test looks at them
    prof["set-threads"] = {rule: THREADS for rule in prof["set-threads"]}  # = the local run's
    for res in prof["set-resources"].values():
        if "cpus_per_task" in res:
            res["cpus_per_task"] = THREADS
        res["mem_mb"] = min(res.get("mem_mb", 1000), 1000)
    prof["default-resources"]["mem_mb"] = 1000
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return dst


def tiny_config(path: Path, model: Path) -> Path:
    c = cfg.load(ROOT / "config" / "demo.yaml")
    c["data"]["wiki"]["head"] = 300
    c["backbones"] = {"tiny": {"model": str(model), "family": "bert", "label": "tiny BERT"}}
    c["training"] = {"batch_size": 16, "max_steps": 4, "lr": 3e-5, "eval_steps": 1000, "save_steps": 1000,
                     "log_steps": 1, "gpus": 1, "num_workers": 0}
    c["methods"]["clusterns"]["objective"].update(kmeans=4, kmean_cosine=1.0)  # clustering from step 1
    c["runs"] = [{"method": "simcse", "backbone": "tiny"}, {"method": "clusterns", "backbone": "tiny"}]
    c["seeds"] = [7]
    c["evaluation"] = {"batch_size": 256, "dtype": "fp32", "base": False}
    c["report"] = {"paired": [["clusterns", "simcse"]], "plots": False}
    c["clustering"] = {**c["clustering"], "enabled": False}  # the STS path is what is compared here
    path.write_text(yaml.safe_dump(c))
    return path


def numbers(obj, prefix=""):
    """Every numeric leaf of a JSON document, by path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{prefix}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{prefix}/{i}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def sts_scores(path: Path) -> dict:
    """Every score of an sts_test.json (``meta`` holds paths, checksums and timings: left out)."""
    data = json.loads(path.read_text())
    data.pop("meta")
    return dict(numbers(data))


def train_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k != "sentences_per_s"} for row in csv.DictReader(f)]


def job_stats(out: str) -> dict[str, int]:
    """Jobs per rule from Snakemake's "Job stats" table (the target rule left out)."""
    table = out[out.index("Job stats:"):].splitlines()[3:]
    counts = {}
    for line in table:
        parts = line.split()
        if not parts or parts[0] == "total":
            break
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    counts.pop("default", None)
    counts.pop("all", None)
    return counts


def squeue_jobs(env: dict) -> dict[str, tuple[str, str]]:
    res = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"], capture_output=True, text=True,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    rows = (line.split("|", 2) for line in res.stdout.splitlines() if line)
    return {i: (state, comment) for i, state, comment in rows}


@pytest.mark.slow
def test_pipeline_through_slurm_equals_local_run(tmp_path, tiny_bert, mirror, slurm_cluster):
    require_plugin()
    config = tiny_config(tmp_path / "tiny.yaml", tiny_bert)
    profile = cluster_profile(tmp_path / "profile")
    env = {"CLUSTERNS_MIRROR": str(mirror), "SLURM_CONF": slurm_cluster["SLURM_CONF"]}
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    # srun inside a job: see tests/slurm/bin/srun (the jobstep executor drops SLURM_CONF)
    shim = tmp_path / "bin"
    shim.mkdir()
    shutil.copy(ROOT / "tests" / "slurm" / "bin" / "srun", shim / "srun")
    (shim / "srun").chmod(0o755)
    slurm_env = {**env, "CLUSTERNS_TEST_SLURM_CONF": slurm_cluster["SLURM_CONF"],
                 "CLUSTERNS_TEST_SRUN": shutil.which("srun") or "/usr/bin/srun"}

    t0 = time.monotonic()
    # Both at once: the SLURM run mostly waits (submission, polling), the local run computes.
    slurm = run_snakemake(slurm_dir, "--workflow-profile", str(profile), configfile=config, env=slurm_env, path=[shim])
    threads = [f"{rule}={THREADS}" for rule in yaml.safe_load(PROFILE.read_text())["set-threads"]]
    local = run_snakemake(local_dir, "--cores", "2", "--set-threads", *threads, configfile=config, env=env)
    rc_local, out_local = finish(local)
    t_local = time.monotonic() - t0
    rc_slurm, out_slurm = finish(slurm)
    t_slurm = time.monotonic() - t0
    print(f"\nlocal run {t_local:.0f} s, SLURM run {t_slurm:.0f} s (concurrently)")
    assert rc_local == 0, out_local[-6000:]
    assert rc_slurm == 0, out_slurm[-8000:]

    # Every job went through SLURM: submitted with sbatch, seen COMPLETED by squeue, SLURM log kept.
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out_slurm))
    local_rules = set(re.findall(r"^localrule (\w+):", out_slurm, re.M))  # the target rule, `localrules:`
    expected = {r: n for r, n in job_stats(out_slurm).items() if r not in local_rules}
    assert expected["train"] == 2 and expected["evaluate"] == 2 and expected["tokenize"] == 1, expected
    assert len(submitted) == sum(expected.values()), out_slurm[-6000:]
    jobs = squeue_jobs(slurm_cluster)
    by_rule: dict[str, list[str]] = {}
    for slurm_id in submitted.values():
        state, comment = jobs[slurm_id]
        assert state == "COMPLETED", (slurm_id, state, comment)
        rule = re.match(r"rule_(\w+?)(_wildcards_.*)?$", comment).group(1)
        by_rule.setdefault(rule, []).append(slurm_id)
        logs = list((slurm_dir / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(f"{slurm_id}.log"))
        assert logs, f"no SLURM log for job {slurm_id} ({rule})"
    assert {r: len(ids) for r, ids in by_rule.items()} == expected
    # training (the run's training.gpus) and evaluation asked SLURM for a GPU; the test node's GPUs
    # are fake, so clusterns.launch and clusterns.evaluation.sts find no CUDA device and use the CPU
    for slurm_id in by_rule["train"] + by_rule["evaluate"]:
        show = subprocess.run(["scontrol", "show", "job", slurm_id], capture_output=True, text=True,
                              env={**os.environ, **slurm_cluster}).stdout
        assert re.search(r"TresPerJob=gres[:/]gpu:1\b", show), show

    # Same results.
    for method in ("simcse", "clusterns"):
        run = f"results/runs/{method}/tiny/seed7"
        a, b = sts_scores(local_dir / run / "sts_test.json"), sts_scores(slurm_dir / run / "sts_test.json")
        assert a.keys() == b.keys() and "/avg" in a
        for key in a:
            same = math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-9) or math.isnan(a[key]) and math.isnan(b[key])
            assert same, (method, key, a[key], b[key])
        rows_local = train_rows(local_dir / run / "train_log.csv")
        rows_slurm = train_rows(slurm_dir / run / "train_log.csv")
        assert len(rows_local) == 4 and rows_local == rows_slurm, method
        if method == "clusterns":  # the clustering path ran: hard negatives, false-negative masks
            assert all(r["clustering_started"] == "1" for r in rows_local)
            assert int(rows_local[-1]["n_false_negative_pairs"]) > 0
    assert (slurm_dir / "results/tables/main.md").read_text() == (local_dir / "results/tables/main.md").read_text()



@pytest.mark.slow
def test_a_training_job_cancelled_by_the_scheduler_is_resubmitted_and_resumes(tmp_path, tiny_bert, mirror,
                                                                               slurm_cluster):
    """Preemption for real: the scheduler kills a running training job (scancel, after its
    checkpoint at step 8), the profile's retry resubmits it, and it resumes from that checkpoint
    to the outputs of an uninterrupted local run. The run asks for 2 GPUs: so does its sbatch."""
    require_plugin()
    c = yaml.safe_load(tiny_config(tmp_path / "base.yaml", tiny_bert).read_text())
    c["runs"] = [{"method": "clusterns", "backbone": "tiny", "training": {"gpus": 2}}]
    c["training"].update(max_steps=12, save_steps=4)
    config = tmp_path / "preempt.yaml"
    config.write_text(yaml.safe_dump(c))
    profile = cluster_profile(tmp_path / "profile")
    markers = tmp_path / "markers"
    env = {"CLUSTERNS_MIRROR": str(mirror), "SLURM_CONF": slurm_cluster["SLURM_CONF"]}
    shim = tmp_path / "bin"
    shim.mkdir()
    shutil.copy(ROOT / "tests" / "slurm" / "bin" / "srun", shim / "srun")
    (shim / "srun").chmod(0o755)
    slurm_env = {**env, "CLUSTERNS_TEST_SLURM_CONF": slurm_cluster["SLURM_CONF"],
                 "CLUSTERNS_TEST_SRUN": shutil.which("srun") or "/usr/bin/srun",
                 "CLUSTERNS_FAULT": "pause@step:8", "CLUSTERNS_FAULT_MARKERS": str(markers)}
    slurm = run_snakemake(tmp_path / "slurm", "--workflow-profile", str(profile), configfile=config, env=slurm_env,
                          path=[shim])
    threads = [f"{rule}={THREADS}" for rule in yaml.safe_load(PROFILE.read_text())["set-threads"]]
    local = run_snakemake(tmp_path / "local", "--cores", "2", "--set-threads", *threads, configfile=config, env=env)
    # wait until the training job holds at step 8 (checkpoint written), then cancel it
    marker = markers / "paused-step-8"
    deadline = time.monotonic() + 900
    while not marker.exists() and time.monotonic() < deadline and slurm.poll() is None:
        time.sleep(1)
    assert marker.exists(), "the training job never reached step 8"
    train_jobs = [i for i, (state, comment) in squeue_jobs(slurm_cluster).items()
                  if state == "RUNNING" and comment.startswith("rule_train")]
    assert len(train_jobs) == 1, squeue_jobs(slurm_cluster)
    show = subprocess.run(["scontrol", "show", "job", train_jobs[0]], capture_output=True, text=True,
                          env={**os.environ, **slurm_cluster}).stdout
    assert re.search(r"TresPerJob=gres[:/]gpu:2\b", show), show  # the run's training.gpus reached sbatch
    subprocess.run(["scancel", train_jobs[0]], check=True, env={**os.environ, **slurm_cluster})
    rc_slurm, out_slurm = finish(slurm)
    rc_local, out_local = finish(local)
    assert rc_local == 0, out_local[-6000:]
    assert rc_slurm == 0, out_slurm[-8000:]
    resubmitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out_slurm)
    assert squeue_jobs(slurm_cluster)[train_jobs[0]][0] == "CANCELLED"
    log = (tmp_path / "slurm/results/logs/train/clusterns/tiny/seed7.log").read_text()
    assert "at step 8" in log, log[-3000:]  # the retry resumed from the checkpoint of step 8
    assert len(resubmitted) > len(set(job for job, _ in resubmitted))  # a job was submitted twice
    run = "results/runs/clusterns/tiny/seed7"
    assert train_rows(tmp_path / "slurm" / run / "train_log.csv") == train_rows(tmp_path / "local" / run / "train_log.csv")
    a, b = sts_scores(tmp_path / "slurm" / run / "sts_test.json"), sts_scores(tmp_path / "local" / run / "sts_test.json")
    assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=0, abs_tol=1e-9) for k in a), (a, b)
