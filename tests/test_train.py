"""Training stage: data sharding, early stopping, refusals, distributed equivalence and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clusterns import launch
from conftest import assert_close_on_scale
from clusterns.training import TrainingError
from clusterns.training.data import GlobalBatchSampler, make_collate, per_process_batch, total_steps
from clusterns.training.selection import EarlyStopping

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------
# Pure pieces


def test_shards_of_every_process_make_the_global_batch():
    single = GlobalBatchSampler(100, 8, rank=0, world=1, seed=3, start_step=0, total_steps=12)
    shards = [list(GlobalBatchSampler(100, 8, rank=r, world=2, seed=3, start_step=0, total_steps=12)) for r in (0, 1)]
    for step, batch in enumerate(single):
        assert shards[0][step] + shards[1][step] == batch
    # 12 steps of 8 over 100 sentences: 12 full batches per epoch, so one epoch, no repeats
    seen = [i for b in GlobalBatchSampler(100, 8, 0, 1, 3, 0, 12) for i in b]
    assert len(seen) == len(set(seen)) == 96


def test_sampler_resumes_at_any_step_and_reshuffles_each_epoch():
    full = list(GlobalBatchSampler(20, 4, 0, 1, seed=1, start_step=0, total_steps=15))
    assert list(GlobalBatchSampler(20, 4, 0, 1, seed=1, start_step=7, total_steps=15)) == full[7:]
    epoch0, epoch1 = full[:5], full[5:10]
    assert sorted(i for b in epoch0 for i in b) == sorted(i for b in epoch1 for i in b) == list(range(20))
    assert epoch0 != epoch1


def test_collate_pads_right_with_mask():
    out = make_collate(pad_id=0)([[5, 6, 7], [8]])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["token_index"].tolist() == [0, 1, 2, 3]  # real tokens' flat positions, for the packed forward


def test_total_steps_and_batch_refusals():
    assert total_steps(1000, 64, 1, None) == 15
    assert total_steps(1000, 64, 2, 20) == 20
    with pytest.raises(TrainingError, match="fewer than one global batch"):
        total_steps(10, 64, 1, None)
    assert per_process_batch(512, 4) == 128
    with pytest.raises(TrainingError, match="not divisible by 3 processes"):
        per_process_batch(256, 3)


def test_early_stopping_on_a_scripted_metric_sequence():
    stop = EarlyStopping(patience=3)
    history = []
    for step, metric in zip(range(125, 1126, 125), [60.0, 62.5, 62.5, 61.0, 63.0, 62.0, 62.9, 63.0, 70.0]):
        history.append(stop.update(step, metric))
        if stop.should_stop:
            break
    # 62.5 ties are not improvements; after 63.0 at step 625 three evals without improvement stop it
    assert history == [True, True, False, False, True, False, False, False]
    assert (stop.best, stop.best_step, stop.bad_evals) == (63.0, 625, 3)
    assert EarlyStopping(patience=None).should_stop is False


def test_gpu_lease_is_exclusive_and_refuses_more_gpus_than_the_node_has(tmp_path):
    with launch.lease_gpus(1, ["0", "1"], tmp_path) as first:
        with launch.lease_gpus(1, ["0", "1"], tmp_path) as second:
            assert first != second and {first[0], second[0]} == {"0", "1"}
    with pytest.raises(launch.LaunchError, match="multi-node training is not supported"):
        with launch.lease_gpus(3, ["0", "1"], tmp_path):
            pass


def test_accelerate_command_uses_a_free_port_and_one_node():
    cmd = launch.accelerate_command(4, cpu=False, train_args=["--x"])
    assert cmd[cmd.index("--main_process_port") + 1] == "0"
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert cmd[-3:] == ["-m", "clusterns.train", "--x"]
    assert "--cpu" in launch.accelerate_command(1, cpu=True, train_args=[])


# ------------------------------------------------------------------------------------------------
# Runs of the real stage on a tiny model


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, mirror):
    """The first 400 mirror sentences tokenized for a tiny BERT (4 layers, hidden 64)."""
    from conftest import make_tiny_bert

    from clusterns.tokenize import tokenize_to_disk

    root = tmp_path_factory.mktemp("train_data")
    model = make_tiny_bert(root / "model", layers=4, hidden=64)
    lines = (mirror / "wiki1m_for_simcse.txt").read_text(encoding="utf-8").splitlines()[:400]
    (root / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenize_to_disk(model, root / "wiki.txt", root / "tok", max_length=32)
    return root


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory, mirror, minilm):
    """The first 400 mirror sentences tokenized for the packaged MiniLM, both cache formats. The
    equivalence tests train a real encoder: a random tiny model's embeddings are nearly parallel
    (cosines ~0.99998), so its cluster assignments are decided by rounding and two equivalent
    routes part ways on a tie; MiniLM's are spread (mean cross-view cosine ~0.6)."""
    from clusterns.tokenize import tokenize_to_disk

    root = tmp_path_factory.mktemp("train_minilm")
    (root / "model").symlink_to(minilm, target_is_directory=True)
    lines = (mirror / "wiki1m_for_simcse.txt").read_text(encoding="utf-8").splitlines()[:400]
    (root / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenize_to_disk(minilm, root / "wiki.txt", root / "tok", max_length=32)
    tokenize_to_disk(minilm, root / "wiki.txt", root / "tok_s", max_length=32, sentence_only=True)
    return root


def hparams(**over) -> dict:
    training = {"max_seq_length": 32, "epochs": 1, "max_steps": 6, "batch_size": 16, "lr": 1e-4, "dropout": None,
                "eval_steps": 1000, "early_stop": None, "save_steps": 1000, "log_steps": 2,
                "mixed_precision": "auto", "gpus": 1, "num_workers": 0, "eval_batch_size": 64}
    training.update(over.pop("training", {}))
    objective = {"kmeans": 4, "kmeans_lr": 0.1, "kmean_cosine": 1.0, "hard_negatives": True,
                 "bml_weight": 0.1, "bml_alpha": 0.0, "bml_beta": 0.3}
    objective.update(over.pop("objective", {}))
    return {"method": "clusterns", "backbone": "tiny", "seed": 7, "pooler": "cls", "eval_pooler": "cls_before_pooler",
            "training": training, "objective": objective, **over}


def run_stage(root: Path, name: str, hp: dict, processes: int = 1, wait: bool = True, data: str = "tok", **popen):
    (root / f"{name}.json").write_text(json.dumps(hp))
    cmd = [sys.executable, "-m", "clusterns.launch", "--gpus", str(processes), "--cpu-processes", str(processes), "--",
           "--hparams", str(root / f"{name}.json"), "--data", str(root / data), "--model", str(root / "model"),
           "--run-dir", str(root / name / "run"), "--state-dir", str(root / name / "state")]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def read_log(path: Path, drop=("sentences_per_s",)) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


# Two routes to the same training run (2 processes vs 1, packed vs HF forward) differ by float32
# summation order only. Compared with SGD, whose update is proportional to the gradient, so that
# rounding stays rounding: AdamW divides each element by its own gradient's magnitude, turning the
# noise of a mathematically zero gradient (the attention key biases') into a +-lr step.
SGD = {"optimizer": "sgd", "lr": 0.05, "max_grad_norm": None}  # unclipped: a wrong gradient factor shows
LOSS_TOL = {"rel": 1e-4, "abs": 1e-5}  # losses ~1, cosines in [-1, 1]: float32 rounding is ~1e-7 of that
FLOAT32_ULP = 2.0 ** -23


def assert_same_updates(init: Path, a: Path, b: Path, tol: float = 1e-4) -> None:
    """The weight updates of two runs from the same initial model are equal up to ``tol`` of the
    largest update of any parameter, plus the float32 rounding of the stored weights themselves
    (2 ulps of the tensor's largest weight: a LayerNorm weight of 1.0 rounds at 1.2e-7). A wrong
    gradient scale or a lost row moves them by 1e-2 or more of the scale."""
    w0, wa, wb = weights(init), weights(a), weights(b)
    assert wa.keys() == wb.keys()
    da = {k: wa[k].double() - w0[k].double() for k in wa}
    db = {k: wb[k].double() - w0[k].double() for k in wb}
    scale = max(float(d.abs().max()) for d in da.values())
    assert scale > 1e-3, f"the runs barely moved the weights (largest update {scale:.1e}): nothing would be proven"
    for k in da:
        floor = 2 * FLOAT32_ULP * float(w0[k].abs().max())
        diff = float((db[k] - da[k]).abs().max())
        assert diff <= tol * scale + floor, f"{k}: updates differ by {diff:.2e} (scale {scale:.2e}, floor {floor:.1e})"


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(minilm_data):
    """gloo, dropout off: same losses, clustering state, gradient norms and parameters with clustering
    active, on every rank. SGD without clipping, so a missing or wrong ``loss * world`` factor (DDP
    averages the ranks' gradients) changes the updates."""
    root = minilm_data
    hp = hparams(training={"dropout": 0.0, "max_steps": 6, "log_steps": 1, **SGD})
    one = run_stage(root, "ddp1", hp, processes=1)
    two = run_stage(root, "ddp2", hp, processes=2)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    log1, log2 = read_log(root / "ddp1/run/train_log.csv"), read_log(root / "ddp2/run/train_log.csv")
    assert len(log1) == len(log2) == 6
    assert all(r["clustering_started"] == "1" for r in log1[1:])  # threshold 1.0: starts at step 1
    assert len({r["n_false_negative_pairs"] for r in log1[1:]}) > 1  # real clusters, not one blob
    for a, b in zip(log1, log2):
        assert a["n_false_negative_pairs"] == b["n_false_negative_pairs"]
        for key in ("loss", "infonce", "bml", "avg_cos", "grad_norm", "lr"):
            x, y = float(a[key]), float(b[key])
            assert x == pytest.approx(y, **LOSS_TOL, nan_ok=True), (a["step"], key, x, y)
    run1 = json.loads((root / "ddp1/run/run.json").read_text())
    run2 = json.loads((root / "ddp2/run/run.json").read_text())
    assert (run1["processes"], run2["processes"]) == (1, 2) and run2["per_process_batch"] == 8
    assert run1["clustering_start_step"] == run2["clustering_start_step"] == 1
    # every rank computed the objective on the same gathered batch: identical losses and centroids
    ranks = run2["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps_logged"] == 6 for r in ranks)
    for key in ("losses_sha256", "centroids_sha256", "clustering_start_step", "last_loss"):
        assert ranks[1][key] == ranks[0][key], key
    assert ranks[0]["centroids_sha256"] is not None
    assert ranks[0]["last_loss"] == pytest.approx(float(log1[-1]["loss"]), **LOSS_TOL)
    assert run2["effective"]["processes"] == 2 and run2["effective"]["max_grad_norm"] is None
    assert_same_updates(root / "model", root / "ddp1/run/model", root / "ddp2/run/model")


@pytest.mark.slow
def test_official_clipping_rule_under_two_processes(tokenized):
    """The official run on W = 2 GPUs: each process backpropagates the global loss L through its
    own slice, DDP averages, so the optimizer sees grad(L) / 2 and clips that at 1.0. Ours with
    ``max_grad_norm: 2`` clips grad(L) at 2, i.e. exactly 2x the official clipped gradient (a
    factor AdamW ignores); with SGD the update shows the gradient, so it is compared directly."""
    from clusterns.method.clustering import ClusterState
    from clusterns.model.encoder import SentenceEncoder, load_backbone
    from clusterns.method.objective import ObjectiveConfig, compute_objective
    from clusterns.tokenize import load_tokenized
    from clusterns.training.data import TokenizedSentences

    lr, world = 0.05, 2
    hp = hparams(pooler="avg", eval_pooler="avg", objective={"kmeans": 0, "bml_weight": 0.0},
                 training={"dropout": 0.0, "max_steps": 1, "log_steps": 1, "optimizer": "sgd", "lr": lr,
                           "max_grad_norm": float(world), "packed": False})
    res = run_stage(tokenized, "clip2", hp, processes=world)
    assert res.returncode == 0, res.stdout + res.stderr
    # The official step on one process: the gradient of L on the same global batch, / W, clipped at 1.
    ds = load_tokenized(tokenized / "tok")
    indices = next(iter(GlobalBatchSampler(len(ds), 16, 0, 1, seed=hp["seed"], start_step=0, total_steps=1)))
    backbone = load_backbone(tokenized / "model", dropout=0.0)
    batch = make_collate(backbone.config.pad_token_id)(TokenizedSentences(ds).__getitems__(indices))
    enc = SentenceEncoder(backbone, pooler="avg").train()
    z1, z2 = enc.encode_views(batch["input_ids"], batch["attention_mask"])
    loss, _ = compute_objective(z1, z2, ClusterState(), ObjectiveConfig(kmeans=0), 1, None)
    loss.backward()
    official = {n: p.grad.double() / world for n, p in backbone.named_parameters() if p.grad is not None}
    official_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in official.values())))
    assert official_norm > 1.0, "clipping must be active for this test to mean anything"
    official = {n: g * (1.0 / (official_norm + 1e-6)) for n, g in official.items()}
    # Ours: the SGD update is -lr * (our clipped gradient).
    w0, w1 = weights(tokenized / "model"), weights(tokenized / "clip2/run/model")
    ours = {n: (w0[n].double() - w1[n].double()) / lr for n in official}
    scale = max(float(g.abs().max()) for g in official.values()) * world
    for name, g in official.items():
        assert_close_on_scale(ours[name], world * g, 1e-4, name, scale=scale)
    logged = read_log(tokenized / "clip2/run/train_log.csv")[0]
    assert float(logged["grad_norm"]) == pytest.approx(world * official_norm, rel=1e-4)  # the norm of grad(L)
    assert json.loads((tokenized / "clip2/run/run.json").read_text())["effective"]["max_grad_norm"] == 2.0


@pytest.mark.slow
def test_packed_forward_trains_like_the_hf_forward(minilm_data):
    """Dropout off: the padding-free forward gives the HF forward's losses and weights; run.json says which ran."""
    tokenized = minilm_data
    hp = {"training": {"dropout": 0.0, "max_steps": 6, "log_steps": 1, **SGD}}
    packed = run_stage(tokenized, "packed_on", hparams(**hp))
    plain = run_stage(tokenized, "packed_off", hparams(training={**hp["training"], "packed": False}))
    assert packed.returncode == 0, packed.stdout + packed.stderr
    assert plain.returncode == 0, plain.stdout + plain.stderr
    on = json.loads((tokenized / "packed_on/run/run.json").read_text())["packed"]
    off = json.loads((tokenized / "packed_off/run/run.json").read_text())["packed"]
    assert on.startswith("on (") and off == "off (training.packed: false)"
    log_on, log_off = read_log(tokenized / "packed_on/run/train_log.csv"), read_log(tokenized / "packed_off/run/train_log.csv")
    assert len(log_on) == len(log_off) == 6
    for a, b in zip(log_on, log_off):
        assert a["n_false_negative_pairs"] == b["n_false_negative_pairs"]
        for key in ("loss", "infonce", "bml", "avg_cos"):
            assert float(a[key]) == pytest.approx(float(b[key]), **LOSS_TOL, nan_ok=True), (a["step"], key)
    assert_same_updates(tokenized / "model", tokenized / "packed_off/run/model", tokenized / "packed_on/run/model")


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_run(tokenized):
    hp = hparams(training={"max_steps": 40, "save_steps": 5, "log_steps": 5, "batch_size": 8})
    ref = run_stage(tokenized, "ref", hp)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    proc = run_stage(tokenized, "killed", hp, wait=False, start_new_session=True)
    meta = tokenized / "killed/state/checkpoint/clusterns_meta.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if meta.exists() and json.loads(meta.read_text())["step"] >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tokenized / "killed/run/run.json").exists()
    killed_at = json.loads(meta.read_text())["step"]

    resumed = run_stage(tokenized, "killed", hp)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at step {killed_at}" in resumed.stdout + resumed.stderr
    assert read_log(tokenized / "killed/run/train_log.csv") == read_log(tokenized / "ref/run/train_log.csv")
    w_ref, w_res = weights(tokenized / "ref/run/model"), weights(tokenized / "killed/run/model")
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    assert not (tokenized / "killed/state").exists()  # finished runs drop their checkpoints


@pytest.mark.parametrize("eval_at_end", [False, True])
def test_dev_evaluation_every_eval_steps_and_at_the_end_only_when_asked(tokenized, senteval_dir, eval_at_end):
    """The official trainer evaluates STS-B dev at multiples of eval_steps only; eval_at_end adds the last step."""
    name = f"evalend{int(eval_at_end)}"
    hp = hparams(training={"max_steps": 5, "eval_steps": 2, "eval_at_end": eval_at_end, "log_steps": 1},
                 objective={"kmeans": 0, "bml_weight": 0.0})
    (tokenized / f"{name}.json").write_text(json.dumps(hp))
    res = subprocess.run([sys.executable, "-m", "clusterns.train", "--hparams", str(tokenized / f"{name}.json"),
                          "--data", str(tokenized / "tok"), "--model", str(tokenized / "model"),
                          "--senteval", str(senteval_dir), "--run-dir", str(tokenized / name / "run"),
                          "--state-dir", str(tokenized / name / "state")], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = [int(r["step"]) for r in read_log(tokenized / name / "run/eval_log.csv")]
    assert steps == ([2, 4, 5] if eval_at_end else [2, 4])
    run = json.loads((tokenized / name / "run/run.json").read_text())
    assert run["effective"]["eval_at_end"] is eval_at_end and run["best_step"] in steps


def test_refusals_name_the_problem(tokenized, tmp_path):
    # K larger than the global batch
    res = run_stage(tokenized, "bigk", hparams(objective={"kmeans": 64}))
    assert res.returncode != 0 and "batch" in res.stderr and "kmeans" in res.stderr
    assert not (tokenized / "bigk/run").exists()
    # missing tokenized cache
    hp_path = tmp_path / "hp.json"
    hp_path.write_text(json.dumps(hparams()))
    out = subprocess.run([sys.executable, "-m", "clusterns.train", "--hparams", str(hp_path), "--data",
                          str(tmp_path / "nope"), "--model", str(tokenized / "model"), "--run-dir", str(tmp_path / "r"),
                          "--state-dir", str(tmp_path / "s")], env=ENV, capture_output=True, text=True)
    assert out.returncode == 1 and "no tokenized cache" in out.stderr and "snakemake" in out.stderr
    assert not (tmp_path / "r").exists()


def test_nonfinite_loss_stops_with_the_step_and_saves_nothing(tokenized):
    # temp 1e-45 (a float32 denormal) makes the logits infinite, so the loss is NaN from step 1
    res = run_stage(tokenized, "nan", hparams(objective={"temp": 1e-45}, training={"save_steps": 1}))
    assert res.returncode != 0
    assert "non-finite loss at step 1" in res.stderr
    assert not (tokenized / "nan/run").exists()
    assert not (tokenized / "nan/state/checkpoint").exists()


# ------------------------------------------------------------------------------------------------
# Prompt-based ClusterNS through the real stage


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_prompt_training_runs_with_clustering_and_exports_its_template(tmp_path, mirror, family):
    from conftest import make_bpe_roberta, make_tiny_bert

    from clusterns.evaluation import sts
    from clusterns.model.prompt import load_prompt_config
    from clusterns.tokenize import tokenize_to_disk

    make = make_tiny_bert if family == "bert" else make_bpe_roberta  # BPE merges keep both prefixes 4 tokens
    model = make(tmp_path / "model")
    lines = (mirror / "wiki1m_for_simcse.txt").read_text(encoding="utf-8").splitlines()[:64]
    (tmp_path / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = tokenize_to_disk(model, tmp_path / "wiki.txt", tmp_path / "tok", max_length=32, sentence_only=True)
    assert stats["format"] == "sentence_only"
    hp = hparams(training={"max_steps": 3, "log_steps": 1}, pooler="mask", eval_pooler="mask",
                 prompt={"roberta_position_offset": "original"},
                 objective={"hard_negatives": family == "bert"})
    res = run_stage(tmp_path, "prompt", hp)
    assert res.returncode == 0, res.stdout + res.stderr
    log = read_log(tmp_path / "prompt/run/train_log.csv")
    assert [r["clustering_started"] for r in log] == ["1", "1", "1"]
    assert all(float(r["loss"]) > 0 for r in log)
    exported = tmp_path / "prompt/run/model"
    cfg = load_prompt_config(exported)
    assert cfg["family"] == family and cfg["protocol"] == "raw" and cfg["dev_protocol"] == "denoised"
    # the evaluator embeds the exported model with its template, and reports the other protocol too
    fixture = Path(__file__).resolve().parent / "data" / "sts_fixture"
    counts = {t: None for t in sts.TASKS["test"]}
    out = sts.evaluate(exported, "mask", fixture, "test", expected_counts=counts)
    assert out["meta"]["prompt"]["template"] == cfg["template"]
    assert set(out["other_protocols"]["denoised"]) >= {"STS12", "avg"}


@pytest.mark.slow
def test_prompt_training_two_processes_equal_one(minilm_data):
    """Prompt-BERT (MiniLM) with denoising under DDP (gloo, dropout off): same losses, clusters and
    weight updates as one process."""
    root = minilm_data
    hp = hparams(training={"max_steps": 4, "log_steps": 1, "dropout": 0.0, **SGD}, pooler="mask",
                 eval_pooler="mask", prompt={})
    one = run_stage(root, "p1", hp, processes=1, data="tok_s")
    two = run_stage(root, "p2", hp, processes=2, data="tok_s")
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    log1, log2 = read_log(root / "p1/run/train_log.csv"), read_log(root / "p2/run/train_log.csv")
    assert len(log1) == len(log2) == 4 and all(r["clustering_started"] == "1" for r in log1)
    for a, b in zip(log1, log2):
        assert a["n_false_negative_pairs"] == b["n_false_negative_pairs"]
        for key in ("loss", "infonce", "bml", "avg_cos", "grad_norm"):
            assert float(a[key]) == pytest.approx(float(b[key]), **LOSS_TOL, nan_ok=True), (a["step"], key)
    ranks = json.loads((root / "p2/run/run.json").read_text())["ranks"]
    assert ranks[0]["losses_sha256"] == ranks[1]["losses_sha256"]
    assert ranks[0]["centroids_sha256"] == ranks[1]["centroids_sha256"]
    # Denoising subtracts the template's own [MASK] state (a second pass with gradient), so many
    # gradients are differences of two passes' sums; measured: 1e-5 of the largest update.
    assert_same_updates(root / "model", root / "p1/run/model", root / "p2/run/model", tol=1e-3)


def test_prompt_run_refuses_a_full_format_cache(tokenized):
    res = run_stage(tokenized, "wrongcache", hparams(pooler="mask", eval_pooler="mask", prompt={}))
    assert res.returncode != 0 and "--sentence-only" in res.stderr


@pytest.mark.parametrize("prompt", [False, True], ids=["cls", "prompt"])
def test_exported_model_describes_its_pooler(tmp_path, mirror, prompt):
    """An exported model carries its evaluation pooler (and template): scored without --pooler it
    gives exactly the scores of the explicit pooler."""
    from conftest import make_tiny_bert

    from clusterns import poolers
    from clusterns.evaluation import sts
    from clusterns.tokenize import tokenize_to_disk

    make_tiny_bert(tmp_path / "model")
    lines = (mirror / "wiki1m_for_simcse.txt").read_text(encoding="utf-8").splitlines()[:64]
    (tmp_path / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenize_to_disk(tmp_path / "model", tmp_path / "wiki.txt", tmp_path / "tok", max_length=32, sentence_only=prompt)
    extra = {"pooler": "mask", "eval_pooler": "mask", "prompt": {}} if prompt else {}
    res = run_stage(tmp_path, "run", hparams(training={"max_steps": 2}, **extra))
    assert res.returncode == 0, res.stdout + res.stderr
    exported = tmp_path / "run/run/model"
    declared = poolers.read_model_pooler(exported)
    assert declared == ("mask" if prompt else "cls_before_pooler")
    fixture = Path(__file__).resolve().parent / "data" / "sts_fixture"
    counts = {t: None for t in sts.TASKS["test"]}
    implicit = sts.evaluate(exported, None, fixture, "test", expected_counts=counts)
    explicit = sts.evaluate(exported, declared, fixture, "test", expected_counts=counts)
    assert implicit["meta"]["pooler"] == declared
    for task in sts.TASKS["test"]:
        assert implicit[task] == explicit[task], task
    assert implicit.get("other_protocols") == explicit.get("other_protocols")


def test_tensorboard_tracking_mirrors_every_logged_step(tokenized, tmp_path):
    """training.report_to: tensorboard writes the per-step rows (and the dev rows) as scalars; read
    back from the event file they are the train_log.csv values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hp = hparams(training={"max_steps": 5, "log_steps": 2, "report_to": "tensorboard"})
    res = run_stage(tokenized, "tracked", hp)
    assert res.returncode == 0, res.stdout + res.stderr
    events = list((tokenized / "tracked/run/tracking").rglob("events.out.tfevents.*"))
    assert events, list((tokenized / "tracked/run").rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    log = read_log(tokenized / "tracked/run/train_log.csv")
    for key in ("loss", "infonce", "avg_cos", "grad_norm", "lr"):
        scalars = acc.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [int(r["step"]) for r in log] == [1, 2, 3, 4, 5], key
        for s, row in zip(scalars, log):
            assert s.value == pytest.approx(float(row[key]), rel=1e-5, abs=1e-7), (key, s.step)


def test_exported_model_is_a_complete_sentence_transformers_folder_with_a_card(tokenized):
    res = run_stage(tokenized, "st_export", hparams(training={"max_steps": 2}))
    assert res.returncode == 0, res.stdout + res.stderr
    model = tokenized / "st_export/run/model"
    st = json.loads((model / "config_sentence_transformers.json").read_text())
    assert st["similarity_fn_name"] == "cosine" and st["__version__"]["transformers"]
    assert json.loads((model / "sentence_bert_config.json").read_text())["max_seq_length"] == 512  # no STS cut
    card = (model / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "SentenceTransformer('PATH')" in card
    assert "@inproceedings{deng-etal-2023-clustering" in card and "seed 7" in card


@pytest.mark.slow
@pytest.mark.parametrize("pooler", ["cls", "avg"])
def test_sentence_transformers_embeds_an_exported_model_as_our_evaluator(minilm_data, senteval_dir, pooler):
    """SentenceTransformer(path) on a run's exported model: the evaluator's embeddings (to float32
    rounding) and, scored with our cosine and correlation, the STS-B test Spearman of clusterns.sts."""
    from sentence_transformers import SentenceTransformer

    from clusterns.evaluation import sts
    from clusterns.evaluation.base import load_model

    eval_pooler = "cls_before_pooler" if pooler == "cls" else "avg"
    name = f"st_{pooler}"
    res = run_stage(minilm_data, name, hparams(training={"max_steps": 2}, pooler=pooler, eval_pooler=eval_pooler))
    assert res.returncode == 0, res.stdout + res.stderr
    model_dir = minilm_data / name / "run/model"
    task = sts.load_tasks(senteval_dir, "test", ["STSBenchmark"])[0]
    sentences = sts.distinct_sentences([task])
    ours = load_model(model_dir).embedder()(sentences)
    theirs = SentenceTransformer(str(model_dir), device="cpu").encode(sentences, batch_size=128,
                                                                       convert_to_numpy=True)
    assert_close_on_scale(theirs, ours)
    expected = sts.evaluate(model_dir, None, senteval_dir, "test", tasks=["STSBenchmark"])["STSBenchmark"]
    row = {s: i for i, s in enumerate(sentences)}
    split = task.subsets[0]
    sims = sts.cosine_rows(theirs[[row[s] for s in split.sent1]], theirs[[row[s] for s in split.sent2]])
    assert sts.correlations(sims, split.gold)["spearman"] == pytest.approx(expected, abs=1e-4)


def test_a_run_warns_when_installed_versions_differ_from_the_lock(tmp_path, monkeypatch, capsys):
    from clusterns import train
    from clusterns.utils import provenance

    lock = tmp_path / "lock.txt"
    lock.write_text("# test\ntorch==0.0.1\nnumpy==" + __import__("numpy").__version__ + "\n")
    monkeypatch.setattr(provenance, "LOCK_FILE", lock)
    diff = provenance.lock_differences(path=lock)
    assert set(diff) == {"torch"} and diff["torch"]["locked"] == "0.0.1"
    monkeypatch.setattr(provenance.lock_differences, "__defaults__",
                        (provenance.lock_differences.__defaults__[0], lock))
    train.warn_about_lock()
    assert "differ from requirements/lock.txt: torch" in capsys.readouterr().out
    assert provenance.environment()["lock_differences"] == diff
