"""Training stage: one flat, resumable accelerate loop for unsupervised SimCSE and ClusterNS.

Run it through ``accelerate launch`` (the workflow uses ``python -m clusterns.launch``, which
leases GPUs and builds that command). Semantics (README: "Multi-GPU semantics", "Resuming" and
"Differences from the official code"):

* the configured batch size is the **global** batch; each of the P processes encodes B/P
  sentences twice (two dropout views, one forward of 2B/P rows);
* ``z1``/``z2`` are all-gathered (the local slice keeps its gradient), so the objective and the
  clustering see the global batch and are identical on every process;
* the loss is multiplied by P before backward: DDP averages gradients over processes, so the
  gradient is that of the global loss L, whatever P is; ``max_grad_norm`` clips that gradient
  (the official W-GPU runs clip ∇L / W at 1.0, i.e. ∇L at W: the paper config sets W per run);
* STS-B dev (and SICK-R dev) every ``eval_steps`` on the main process (and at the last step only
  with ``eval_at_end``); the best model by STS-B dev is kept; ``early_stop`` evaluations without
  improvement stop the run (null: never, as SimCSE's own trainer);
* model, optimizer, scheduler, scaler, every process' RNG, data position, clustering state and
  logs are checkpointed every ``save_steps`` to ``--state-dir`` (outside Snakemake's outputs); a
  rerun with the same settings resumes there and ends with the same result.

The pieces the loop uses live in :mod:`clusterns.training` (data, checkpoint, logs, selection).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from clusterns.config import resolve_hparams
from clusterns.method.clustering import ClusterState
from clusterns.method.objective import compute_objective
from clusterns.method.settings import ObjectiveConfig, ObjectiveConfigError
from clusterns.model.encoder import SentenceEncoder, duplicate_views, load_backbone
from clusterns.model.card import model_card
from clusterns.model.export import export_model
from clusterns.model.packed import check_against_hf, unsupported_reason
from clusterns.model.prompt import PromptEncoder, make_prompt_collate, template_pair
from clusterns.training import TrainingError
from clusterns.training.checkpoint import Checkpoints, LoopState, hparams_digest
from clusterns.training.data import (GlobalBatchSampler, TokenizedSentences, check_tokenizer, load_training_data,
                                     make_collate, per_process_batch, total_steps)
from clusterns.training.faults import fault, injected
from clusterns.training.logs import TRAIN_LOG, StepLog, copy_logs, reset_logs
from clusterns.training.selection import DevSelection, EarlyStopping
from clusterns.utils.files import atomic_path, sha256_file, write_json_atomic
from clusterns.utils.provenance import environment

__all__ = ["train", "main", "TrainingError", "build_optimizer", "resolve_mixed_precision", "autocast_dtype",
           "gather_with_grad", "effective_settings"]


def train(hp: dict, data_dir: str | Path, model_dir: str | Path, senteval_dir: str | Path | None,
          run_dir: str | Path, state_dir: str | Path) -> dict:
    """Train one run end to end (or resume it); returns the run summary written to ``run.json``."""
    wall0 = time.time()
    hp = resolve_hparams(hp)
    tr, seed, prompt = hp["training"], int(hp["seed"]), hp.get("prompt")
    run_dir, state_dir, data_dir = Path(run_dir), Path(state_dir), Path(data_dir)
    cuda = torch.cuda.is_available()
    mp = resolve_mixed_precision(tr["mixed_precision"], cuda)
    tracking = None if tr["report_to"] == "none" else tr["report_to"]
    accelerator = Accelerator(mixed_precision=mp, cpu=not cuda, log_with=tracking, project_dir=run_dir / "tracking")
    world, main_process = accelerator.num_processes, accelerator.is_main_process
    if main_process:
        warn_about_lock()
    global_batch = int(tr["batch_size"])
    local_batch = per_process_batch(global_batch, world)
    objective = objective_settings(hp, global_batch)

    ds, data_stats = load_training_data(data_dir, sentence_only=prompt is not None)
    steps = total_steps(len(ds), global_batch, tr["epochs"], tr["max_steps"])
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_tokenizer(data_dir, data_stats, tokenizer, model_dir)
    model, collate = build_model(hp, model_dir, tokenizer)
    model.to(accelerator.device)  # before the optimizer: fused AdamW needs its parameters on the GPU
    packed = enable_packed(model, tr["packed"], accelerator)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], tr)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    # Not prepared: accelerate would step it once per process; one step here is one global batch.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    loop = LoopState(stopper=EarlyStopping(tr["early_stop"]), cluster_state=ClusterState(),
                     rng=torch.Generator().manual_seed(seed), digest=hparams_digest(hp))
    accelerator.register_for_checkpointing(loop)

    if tracking is not None:  # experiment tracking mirrors the log rows (training.report_to)
        accelerator.init_trackers(f"{hp['method']}-{hp['backbone']}-seed{seed}", config=tracker_config(hp))
    checkpoints = Checkpoints(accelerator, state_dir, loop.digest)
    resumed = checkpoints.resume()
    if resumed is not None:
        accelerator.print(f"resumed from {resumed} at step {loop.step}")
    if main_process:
        reset_logs(state_dir, loop.step if resumed is not None else None)
    log = StepLog(state_dir / TRAIN_LOG, accelerator.device, global_batch, write=main_process,
                  tracker=accelerator if tracking is not None else None)
    export = ModelExporter(accelerator, model, tokenizer, prompt)
    selection = DevSelection(accelerator, senteval_dir, state_dir, tokenizer, tr["eval_batch_size"], export,
                             track=tracking is not None)
    loader = torch.utils.data.DataLoader(
        TokenizedSentences(ds), batch_sampler=GlobalBatchSampler(len(ds), global_batch, accelerator.process_index,
                                                                 world, seed, loop.step, steps),
        collate_fn=collate, num_workers=tr["num_workers"], pin_memory=cuda, generator=torch.Generator())
    max_norm = math.inf if tr["max_grad_norm"] is None else float(tr["max_grad_norm"])  # inf: measured only
    matmul_dtype, embedding_dtype = autocast_dtype(mp), None
    progress = _progress_bar(main_process, steps, loop.step, f"{hp['method']}/{hp['backbone']}/seed{seed}")

    model.train()
    stopped_early = False
    for batch in loader:
        step = loop.step + 1
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            z1, z2 = two_views(model, batch)
        embedding_dtype = z1.dtype  # float16 for [CLS] + MLP under fp16 autocast, as in the official runs
        z1, z2 = gather_with_grad(z1, accelerator), gather_with_grad(z2, accelerator)
        loss, stats = compute_objective(z1, z2, loop.cluster_state, objective, step, loop.rng,
                                        autocast_dtype=matmul_dtype)
        if injected("nan", "loss", step):
            loss = loss * float("nan")
            stats = {**stats, "loss": stats["loss"] * float("nan")}
        accelerator.backward(loss * world)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        log.record(step, {**stats, "grad_norm": grad_norm}, scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loop.step = step
        if progress is not None:
            progress.update(1)
        last = step == steps
        if last or any(step % tr[k] == 0 for k in ("log_steps", "eval_steps", "save_steps")):
            log.flush()
        if step % tr["eval_steps"] == 0 or (last and tr["eval_at_end"]):
            model.eval()
            selection.evaluate(model, step, loop.stopper)
            model.train()
            log.restart_clock()  # throughput counts training time only
        if loop.stopper.should_stop:
            stopped_early = not last
            break
        if step % tr["save_steps"] == 0 and not last:
            checkpoints.save(step)
            log.restart_clock()
        fault("step", step, main_process)
    log.flush()
    if progress is not None:
        progress.close()
    accelerator.wait_for_everyone()

    summary = {
        "method": hp["method"], "backbone": hp["backbone"], "seed": seed,
        "hparams": hp, "digest": loop.digest,
        "steps": loop.step, "total_steps": steps, "stopped_early": stopped_early,
        "best_step": loop.stopper.best_step, "best_stsb_dev": loop.stopper.best if loop.stopper.best_step else None,
        "clustering_start_step": loop.cluster_state.start_step, "packed": packed,
        "processes": world, "per_process_batch": local_batch, "global_batch": global_batch, "mixed_precision": mp,
        "effective": effective_settings(tr, objective, world, mp, packed, embedding_dtype,
                                        loop.cluster_state.centroids),
        "ranks": rank_records(accelerator, log.losses, loop.cluster_state),
        "data": {"tokenized": str(data_dir), "sentences": len(ds), "source_sha256": data_stats.get("source_sha256"),
                 "tokenize_stats": data_stats},
        "model_source": str(model_dir), "wall_seconds": None,
        **environment(),
    }
    if main_process:
        finish(summary, export, state_dir, run_dir, wall0)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


# ------------------------------------------------------------------------------------------------
# Building the run


def warn_about_lock() -> None:
    """Say so at the start when installed libraries differ from requirements/lock.txt (the
    versions CI passed with): scores can move with them (run.json records both)."""
    from clusterns.utils.provenance import lock_differences

    diff = lock_differences()
    if diff:
        listed = ", ".join(f"{k} {v['installed']} (locked {v['locked']})" for k, v in sorted(diff.items()))
        print(f"[clusterns.train] warning: installed versions differ from requirements/lock.txt: {listed}; "
              "scripts/install --locked installs the tested ones", flush=True)


def tracker_config(hp: dict) -> dict:
    """The run's settings as flat scalars (what TensorBoard's hparams and the other trackers take)."""
    flat = {"method": hp["method"], "backbone": hp["backbone"], "seed": hp["seed"], "pooler": hp["pooler"]}
    for section in ("training", "objective"):
        for key, value in hp[section].items():
            flat[f"{section}/{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def objective_settings(hp: dict, global_batch: int) -> ObjectiveConfig:
    """The validated objective of the run (K against the global batch included)."""
    try:
        return ObjectiveConfig.from_dict(hp["objective"]).validate(global_batch)
    except ObjectiveConfigError as e:
        raise TrainingError(str(e)) from None


def build_model(hp: dict, model_dir, tokenizer):
    """The training module (a :class:`SentenceEncoder`, or a :class:`PromptEncoder` for prompt
    runs) on the backbone, and the collate function of its batches."""
    tr, prompt = hp["training"], hp.get("prompt")
    backbone = load_backbone(model_dir, dropout=tr["dropout"])
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler.requires_grad_(False)  # never used in training (SimCSE drops it); DDP needs no grad
    if prompt is None:
        model = SentenceEncoder(backbone, pooler=hp["pooler"], eval_pooler=hp["eval_pooler"])
        return model, make_collate(tokenizer.pad_token_id)
    t1, t2 = template_pair(tokenizer, templates=prompt["templates"])
    model = PromptEncoder(backbone, t1, t2, denoise=prompt["denoise"], delta_rows=prompt["delta_rows"],
                          eval_delta_rows=prompt["eval_delta_rows"],
                          roberta_position_offset=prompt["roberta_position_offset"], max_len=tr["max_seq_length"])
    return model, make_prompt_collate(t1, t2, max_len=tr["max_seq_length"])


def build_optimizer(params, tr: dict) -> torch.optim.Optimizer:
    """``adamw`` (the official optimizer: betas 0.9/0.999, eps 1e-8, no weight decay; torch's fused
    kernel on CPU and GPU) or ``sgd`` (plain SGD at the same lr: an update proportional to the
    gradient, which the equivalence tests need because AdamW is invariant to the gradient's scale)."""
    if tr["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=float(tr["lr"]), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                 fused=True)
    if tr["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=float(tr["lr"]), momentum=0.0)
    raise TrainingError(f"training.optimizer must be adamw or sgd, got {tr['optimizer']!r}")


def resolve_mixed_precision(setting: str, cuda: bool) -> str:
    """``auto``: bf16 where the GPU supports it, else fp16 (with loss scaling); fp32 on the CPU."""
    if not cuda:
        return "no"
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype autocast gives matmuls under a resolved ``mixed_precision`` (None: no autocast)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)


def enable_packed(model, wanted: bool, accelerator) -> str:
    """Switch the padding-free training forward on where it applies; returns what run.json records."""
    if not wanted:
        return "off (training.packed: false)"
    if not isinstance(model, SentenceEncoder):
        return "off (prompt runs use the HF forward)"
    reason = unsupported_reason(model.backbone)
    if reason is None:
        try:
            if injected("mismatch", "packed", 0):
                raise RuntimeError("the packed forward differs from the backbone's own forward (injected by "
                                   "CLUSTERNS_FAULT); set training.packed: false")
            diff = check_against_hf(model.backbone)
        except RuntimeError as e:
            reason = str(e)
    if reason is not None:
        if accelerator.is_main_process:
            print(f"[clusterns.train] packed forward off: {reason}", flush=True)
        return f"off ({reason})"
    model.packed = True
    return f"on (max relative difference to the HF forward {diff:.1e})"


class ModelExporter:
    """Writes the model being trained (unwrapped, without the training MLP) into a folder: the
    HF files, the pooler it is evaluated with and, for prompt runs, its template config."""

    def __init__(self, accelerator, model, tokenizer, prompt: dict | None) -> None:
        self.accelerator, self.model, self.tokenizer, self.prompt = accelerator, model, tokenizer, prompt

    def __call__(self, out_dir: Path) -> None:
        enc = self.accelerator.unwrap_model(self.model)
        prompt = None if self.prompt is None else enc.config_dict(test_protocol=self.prompt["test_protocol"])
        export_model(enc.backbone, self.tokenizer, out_dir, enc.eval_pooler, prompt)


# ------------------------------------------------------------------------------------------------
# One step


def two_views(model, batch):
    """Two dropout views in one forward of 2B rows, called through the (DDP) wrapper's forward.

    Prompt batches arrive already as 2B rows (template 1 rows, then template 2 rows).
    """
    if "lengths" in batch:
        z = model(**batch)
        return z[: z.shape[0] // 2], z[z.shape[0] // 2:]
    b = batch["input_ids"].shape[0]
    ids, mask, _, index = duplicate_views(batch["input_ids"], batch["attention_mask"], None, batch.get("token_index"))
    z = model(ids, mask, token_index=index)
    return z[:b], z[b:]


def gather_with_grad(z: torch.Tensor, accelerator) -> torch.Tensor:
    """All-gather ``z`` over processes (rank order); the local slice keeps its autograd graph."""
    if accelerator.num_processes == 1:
        return z
    gathered = accelerator.gather(z.detach().contiguous())
    b, r = z.shape[0], accelerator.process_index
    return torch.cat([gathered[: r * b], z, gathered[(r + 1) * b:]], dim=0)


def _progress_bar(main_process: bool, total: int, initial: int, desc: str):
    if not (main_process and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step")


# ------------------------------------------------------------------------------------------------
# The end of a run


def effective_settings(tr: dict, objective: ObjectiveConfig, processes: int, mixed_precision: str, packed: str,
                       embedding_dtype: torch.dtype | None, centroids: torch.Tensor | None) -> dict:
    """What decided this run's numbers, for ``run.json`` (README: "Differences from the official
    code"): the resolved precision, clip norm, centroid precision and schedule switches."""
    name = lambda d: None if d is None else str(d).replace("torch.", "")  # noqa: E731
    clustering = objective.kmeans > 0
    return {
        "processes": processes, "mixed_precision": mixed_precision,
        "max_grad_norm": tr["max_grad_norm"], "clipped_gradient": "of the global loss (the same for any process count)",
        "optimizer": tr["optimizer"], "early_stop": tr["early_stop"], "eval_at_end": tr["eval_at_end"],
        "embedding_dtype": name(embedding_dtype), "autocast_matmul_dtype": name(autocast_dtype(mixed_precision)),
        "centroid_dtype": objective.centroid_dtype if clustering else None,
        "centroid_tensor_dtype": name(None if centroids is None else centroids.dtype),
        "centroid_update": None if not clustering else
        ("official arithmetic" if objective.centroid_dtype == "embedding" else "exact float32"),
        "packed": packed,
    }


def rank_records(accelerator, losses: list[float], cluster_state) -> list[dict]:
    """Per process: a digest of its loss history and of its final centroids. Every process
    computes the objective on the same gathered batch, so all records must be identical; a run
    whose processes drifted apart says so (and the 2-process test asserts they do not)."""
    c = cluster_state.centroids
    record = {
        "rank": accelerator.process_index, "steps_logged": len(losses),
        "losses_sha256": hashlib.sha256(json.dumps(losses).encode()).hexdigest(),
        "last_loss": losses[-1] if losses else None,
        "centroids_sha256": None if c is None else
        hashlib.sha256(c.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest(),
        "clustering_start_step": cluster_state.start_step,
    }
    records = gather_object([record]) if accelerator.num_processes > 1 else [record]
    keys = ("losses_sha256", "centroids_sha256", "clustering_start_step")
    if accelerator.is_main_process and any(any(r[k] != records[0][k] for k in keys) for r in records):
        print("[clusterns.train] warning: the processes' losses or centroids differ (see run.json 'ranks')", flush=True)
    return records


def finish(summary: dict, export: ModelExporter, state_dir: Path, run_dir: Path, wall0: float) -> None:
    """Main process: the best model (or the final one, without evaluation data) and the logs into
    the run folder, atomically; ``run.json`` last; the checkpoints removed."""
    best = state_dir / "best"
    if not best.is_dir():  # no evaluation data: the final model is the result
        with atomic_path(best) as tmp:
            export(tmp)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary["wall_seconds"] = round(time.time() - wall0, 1)
    with atomic_path(run_dir / "model") as tmp:
        shutil.copytree(best, tmp)
        (tmp / "README.md").write_text(model_card(summary), encoding="utf-8")  # the results: release/
    copy_logs(state_dir, run_dir)
    summary["model_sha256"] = {p.name: sha256_file(p) for p in sorted((run_dir / "model").glob("*.safetensors"))}
    write_json_atomic(run_dir / "run.json", summary)
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: checkpoints are no longer needed


# ------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterns.train", description=__doc__.split("\n")[0])
    p.add_argument("--hparams", required=True, help="run settings: a JSON string or a path to a JSON file "
                                                    "(missing keys take the defaults of clusterns.config)")
    p.add_argument("--data", required=True, help="tokenized cache (python -m clusterns.tokenize)")
    p.add_argument("--model", required=True, help="backbone folder (HF format)")
    p.add_argument("--senteval", default=None, help="extracted senteval.tar for dev evaluation (omit: no evaluation)")
    p.add_argument("--run-dir", required=True, help="where model/, train_log.csv, eval_log.csv, run.json go")
    p.add_argument("--state-dir", required=True, help="checkpoints for resuming (outside the workflow's outputs)")
    p.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    args = p.parse_args(argv)
    text = args.hparams
    hp = json.loads(Path(text).read_text() if not text.lstrip().startswith("{") else text)
    if args.max_steps is not None:
        hp.setdefault("training", {})["max_steps"] = args.max_steps
    try:
        train(hp, args.data, args.model, args.senteval, args.run_dir, args.state_dir)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
