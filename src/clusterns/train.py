"""Training stage: a plain, resumable accelerate loop for unsupervised SimCSE and ClusterNS.

Run it through ``accelerate launch`` (the workflow uses ``python -m clusterns.launch``, which
leases GPUs and builds that command). Semantics (DESIGN §4-5):

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
  rerun with the same hyperparameters resumes there and ends with the same result.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clusterns.files import atomic_path, sha256_file, write_json_atomic

TRAIN_LOG_FIELDS = ["step", "loss", "infonce", "bml", "avg_cos", "clustering_started", "n_false_negative_pairs",
                    "hard_negative_cos", "grad_norm", "lr", "sentences_per_s"]
EVAL_LOG_FIELDS = ["step", "stsb_dev", "sickr_dev", "is_best", "seconds"]
# Per-step statistics taken from the objective's stats dict, in TRAIN_LOG_FIELDS order.
_STAT_KEYS = ["loss", "infonce", "bml", "avg_cos", "clustering_started", "n_false_negative_pairs", "hard_negative_cos",
              "grad_norm"]


class TrainingError(RuntimeError):
    """A run cannot go on (bad input or a diverged loss); the message says why and what to do."""


# ------------------------------------------------------------------------------------------------
# Data: deterministic global batches, sharded by process, resumable at any step.


class TokenizedSentences(torch.utils.data.Dataset):
    """The tokenized cache as a map-style dataset with batched reads (``__getitems__``)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> list[int]:
        return self.ds[int(i)]["input_ids"]

    def __getitems__(self, indices: list[int]) -> list[list[int]]:
        return self.ds[indices]["input_ids"]


class GlobalBatchSampler:
    """Yields this process' slice of global batch ``step`` for every step from ``start_step``.

    Epoch ``e`` visits the sentences in a permutation drawn from ``seed + e``; the incomplete
    last global batch of an epoch is dropped, so every step has exactly the global batch size.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int,
                 total_steps: int) -> None:
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.local = global_batch // world
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.steps_per_epoch = n // global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.global_batch:(i + 1) * self.global_batch]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            idx = self.global_indices(step)
            yield idx[self.rank * self.local:(self.rank + 1) * self.local].tolist()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def make_collate(pad_id: int):
    """Right-pad a list of token id lists to the longest one (dynamic padding); ``token_index``
    lists the real tokens' flat positions (for the packed forward, computed here on the CPU)."""
    from clusterns.packed import token_index

    def collate(batch: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(x) for x in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_index": token_index(mask)}

    return collate


# ------------------------------------------------------------------------------------------------
# Small pure pieces of the loop (tested on their own).


def total_steps(n_sentences: int, global_batch: int, epochs: int, max_steps: int | None) -> int:
    """Steps of the run: full global batches over ``epochs`` epochs, capped by ``max_steps``."""
    per_epoch = n_sentences // global_batch
    if per_epoch == 0:
        raise TrainingError(f"the training data has {n_sentences} sentences, fewer than one global batch "
                            f"of {global_batch}; lower batch_size or use more data")
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps


def per_process_batch(global_batch: int, processes: int) -> int:
    """Per-process batch; a global batch not divisible by the process count is refused."""
    if global_batch % processes:
        raise TrainingError(f"global batch size {global_batch} is not divisible by {processes} processes; "
                            f"choose a batch_size that is a multiple of the GPU count")
    return global_batch // processes


@dataclass
class EarlyStopping:
    """Best-by-STS-B-dev tracking; stops after ``patience`` evaluations without improvement."""

    patience: int | None
    best: float = -math.inf
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, step: int, metric: float) -> bool:
        """Record one evaluation; True when it is a new best (strictly better)."""
        if metric > self.best:
            self.best, self.best_step, self.bad_evals = metric, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype autocast gives matmuls under a resolved ``mixed_precision`` (None: no autocast)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)


def resolve_mixed_precision(setting: str, cuda: bool) -> str:
    """``auto``: bf16 where the GPU supports it, else fp16 (with loss scaling); fp32 on the CPU."""
    if not cuda:
        return "no"
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_optimizer(params, tr: dict) -> torch.optim.Optimizer:
    """``adamw`` (the official optimizer: betas 0.9/0.999, eps 1e-8, no weight decay; torch's fused
    kernel on CPU and GPU) or ``sgd`` (plain SGD at the same lr: an update proportional to the
    gradient, which the equivalence tests need because AdamW is invariant to the gradient's scale)."""
    name = tr.get("optimizer", "adamw")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=float(tr["lr"]), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                 fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=float(tr["lr"]), momentum=0.0)
    raise TrainingError(f"training.optimizer must be adamw or sgd, got {name!r}")


def hparams_digest(hp: dict) -> str:
    """Identity of a run's settings; a checkpoint is resumed only by a run with the same digest."""
    keep = {k: v for k, v in hp.items() if k != "runtime"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def gather_with_grad(z: torch.Tensor, accelerator) -> torch.Tensor:
    """All-gather ``z`` over processes (rank order); the local slice keeps its autograd graph."""
    if accelerator.num_processes == 1:
        return z
    gathered = accelerator.gather(z.detach().contiguous())
    b, r = z.shape[0], accelerator.process_index
    return torch.cat([gathered[: r * b], z, gathered[(r + 1) * b:]], dim=0)


# ------------------------------------------------------------------------------------------------
# Checkpointed state that is not a module/optimizer/scheduler.


@dataclass
class LoopState:
    """Step, early-stopping state, clustering state and the clustering RNG, for ``save_state``."""

    step: int = 0
    stopper: EarlyStopping = field(default_factory=lambda: EarlyStopping(None))
    cluster_state: object = None
    rng: torch.Generator = field(default_factory=torch.Generator)
    digest: str = ""

    def state_dict(self) -> dict:
        s = self.stopper
        return {"step": self.step, "best": s.best, "best_step": s.best_step, "bad_evals": s.bad_evals,
                "cluster_state": self.cluster_state.state_dict(), "rng": self.rng.get_state(), "digest": self.digest}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])
        self.stopper.best, self.stopper.best_step, self.stopper.bad_evals = d["best"], d["best_step"], d["bad_evals"]
        self.cluster_state.load_state_dict(d["cluster_state"])
        self.rng.set_state(d["rng"])
        self.digest = d["digest"]


# ------------------------------------------------------------------------------------------------
# Logs (CSV in the state dir, truncated to the checkpoint on resume, copied out at the end).


def _append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def _truncate_rows(path: Path, fields: list[str], last_step: int) -> None:
    """Drop log rows written after the checkpoint being resumed."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


# ------------------------------------------------------------------------------------------------
# Export: HF folder + sentence-transformers files.

_ST_POOLING = {"cls_before_pooler": "pooling_mode_cls_token", "avg": "pooling_mode_mean_tokens"}


def export_model(backbone, tokenizer, out_dir: Path, eval_pooler: str, max_seq_length: int,
                 prompt_config: dict | None = None) -> None:
    """Save the encoder (no training MLP) in HF format plus sentence-transformers module files.

    ``SentenceTransformer(out_dir)`` then embeds with the evaluation pooler (CLS token for
    ``cls_before_pooler``, mean for ``avg``); other poolers are not expressible there and are
    recorded in ``clusterns_pooler.json`` only.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_json_atomic(out_dir / "clusterns_pooler.json", {"eval_pooler": eval_pooler})
    if prompt_config is not None:  # what clusterns.sts --pooler mask needs to embed with the template
        from clusterns.prompt import save_prompt_config

        save_prompt_config(out_dir, prompt_config)
    mode = _ST_POOLING.get(eval_pooler)
    if mode is None:
        return
    hidden = backbone.config.hidden_size
    pooling = {k: False for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                                  "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                  "pooling_mode_lasttoken")}
    pooling.update({"word_embedding_dimension": hidden, mode: True})
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    write_json_atomic(out_dir / "1_Pooling" / "config.json", pooling)
    write_json_atomic(out_dir / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ])
    write_json_atomic(out_dir / "sentence_bert_config.json", {"max_seq_length": max(max_seq_length, 128),
                                                              "do_lower_case": False})


# ------------------------------------------------------------------------------------------------
# The loop.


def _save_checkpoint(accelerator, state_dir: Path, meta: dict) -> None:
    """``accelerator.save_state`` into a temporary folder, renamed into place (never half-written)."""
    ckpt, tmp, old = state_dir / "checkpoint", state_dir / "checkpoint.tmp", state_dir / "checkpoint.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / "clusterns_meta.json", meta)
        if ckpt.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _find_checkpoint(state_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a kill between the two renames
        if (state_dir / name).is_dir():
            return state_dir / name
    return None


def _broadcast(accelerator, value):
    from accelerate.utils import broadcast_object_list

    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def train(hp: dict, data_dir: str | Path, model_dir: str | Path, senteval_dir: str | Path | None,
          run_dir: str | Path, state_dir: str | Path) -> dict:
    """Train one run end to end (or resume it); returns the run summary written to ``run.json``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from clusterns.clustering import ClusterState
    from clusterns.encoder import SentenceEncoder, load_backbone
    from clusterns.objective import ObjectiveConfig, ObjectiveConfigError, compute_objective
    from clusterns.provenance import environment
    from clusterns.tokenize import STATS_FILE, load_tokenized

    wall0 = time.time()
    tr, seed = hp["training"], int(hp["seed"])
    run_dir, state_dir, data_dir = Path(run_dir), Path(state_dir), Path(data_dir)
    cuda = torch.cuda.is_available()
    mp = resolve_mixed_precision(tr.get("mixed_precision", "auto"), cuda)
    accelerator = Accelerator(mixed_precision=mp, cpu=not cuda)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = int(tr["batch_size"])
    local_batch = per_process_batch(global_batch, world)
    try:
        obj_cfg = ObjectiveConfig.from_dict(hp.get("objective", {}))
        obj_cfg.validate(global_batch)
    except ObjectiveConfigError as e:
        raise TrainingError(str(e)) from None

    # Data and model.
    try:
        ds = load_tokenized(data_dir)
    except FileNotFoundError as e:
        raise TrainingError(str(e)) from None
    data_stats = json.loads((data_dir / STATS_FILE).read_text())
    steps = total_steps(len(ds), global_batch, int(tr.get("epochs", 1)), tr.get("max_steps"))
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backbone = load_backbone(model_dir, dropout=tr.get("dropout"))
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler.requires_grad_(False)  # never used in training (SimCSE drops it); DDP needs no grad
    prompt_cfg = hp.get("prompt") if hp.get("pooler") == "mask" else None
    expected_format = "sentence_only" if prompt_cfg is not None else "full"
    if data_stats.get("format", "full") != expected_format:
        raise TrainingError(f"the tokenized cache {data_dir} has format {data_stats.get('format', 'full')!r} but this "
                            f"run needs {expected_format!r} (prompt runs use python -m clusterns.tokenize --sentence-only)")
    if prompt_cfg is not None:
        from clusterns.prompt import PromptEncoder, make_prompt_collate, template_pair

        t1, t2 = template_pair(tokenizer, templates=prompt_cfg.get("templates"))
        model = PromptEncoder(backbone, t1, t2, denoise=prompt_cfg.get("denoise", True),
                              delta_rows=int(prompt_cfg.get("delta_rows", 50)),
                              eval_delta_rows=int(prompt_cfg.get("eval_delta_rows", 128)),
                              roberta_position_offset=prompt_cfg.get("roberta_position_offset", "original"),
                              max_len=int(tr["max_seq_length"]))
        collate = make_prompt_collate(t1, t2, max_len=int(tr["max_seq_length"]))
    else:
        model = SentenceEncoder(backbone, pooler=hp.get("pooler", "cls"), eval_pooler=hp.get("eval_pooler"))
        collate = make_collate(tokenizer.pad_token_id)
    model.to(accelerator.device)  # before the optimizer: fused AdamW needs its parameters on the GPU
    packed = _enable_packed(model, bool(tr.get("packed", True)), accelerator)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], tr)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    # The scheduler is not prepared: accelerate would step it once per process (it assumes a
    # sharded epoch); here one optimizer step is one global batch. It is checkpointed as a custom object.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    loop = LoopState(stopper=EarlyStopping(tr.get("early_stop")), cluster_state=ClusterState(),
                     rng=torch.Generator().manual_seed(seed), digest=hparams_digest(hp))
    accelerator.register_for_checkpointing(loop)

    # Resume (only a checkpoint of the same settings; a stale one is moved aside).
    state_dir.mkdir(parents=True, exist_ok=True)
    train_log, eval_log = state_dir / "train_log.csv", state_dir / "eval_log.csv"
    ckpt = _find_checkpoint(state_dir)
    if ckpt is not None:
        meta = json.loads((ckpt / "clusterns_meta.json").read_text()) if (ckpt / "clusterns_meta.json").exists() else {}
        if meta.get("digest") == loop.digest and meta.get("world") == world:
            accelerator.load_state(str(ckpt))
            accelerator.print(f"resumed from {ckpt} at step {loop.step}")
        else:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                stale = state_dir.with_name(state_dir.name + f".stale-{int(time.time())}")
                accelerator.print(f"checkpoint in {state_dir} is from other settings or process count; moved to {stale}")
                os.replace(state_dir, stale)
                state_dir.mkdir(parents=True)
            accelerator.wait_for_everyone()
            ckpt = None
    if ckpt is None and accelerator.is_main_process:
        for p in (train_log, eval_log):
            p.unlink(missing_ok=True)
    if accelerator.is_main_process:
        _truncate_rows(train_log, TRAIN_LOG_FIELDS, loop.step)
        _truncate_rows(eval_log, EVAL_LOG_FIELDS, loop.step)

    dev_tasks = None
    if senteval_dir is not None and accelerator.is_main_process:
        from clusterns.sts import load_tasks

        dev_tasks = load_tasks(senteval_dir, mode="dev")

    sampler = GlobalBatchSampler(len(ds), global_batch, rank, world, seed, loop.step, steps)
    loader = torch.utils.data.DataLoader(
        TokenizedSentences(ds), batch_sampler=sampler, collate_fn=collate,
        num_workers=int(tr.get("num_workers", 0)), pin_memory=cuda, generator=torch.Generator(),
        persistent_workers=False)

    def export_prompt() -> dict | None:
        if prompt_cfg is None:
            return None
        return accelerator.unwrap_model(model).config_dict(test_protocol=prompt_cfg.get("test_protocol", "raw"))

    def evaluate(step: int) -> None:
        t0 = time.perf_counter()
        metrics = None
        if accelerator.is_main_process and dev_tasks is not None:
            from clusterns.sts import hf_embedder, score_tasks

            enc = accelerator.unwrap_model(model)
            if prompt_cfg is not None:  # dev selection on the denoised [MASK] state (the original protocol)
                embed = enc.embedder(tokenizer, batch_size=int(tr.get("eval_batch_size", 128)))
            else:
                embed = hf_embedder(enc.backbone, tokenizer, enc.eval_pooler, batch_size=int(tr.get("eval_batch_size", 128)))
            res = score_tasks(dev_tasks, embed)
            metrics = (res["STSBenchmark"], res.get("SICKRelatedness", math.nan))
        metrics = _broadcast(accelerator, metrics)
        if metrics is None:
            return
        is_best = loop.stopper.update(step, metrics[0])
        if accelerator.is_main_process:
            if is_best:
                enc = accelerator.unwrap_model(model)
                with atomic_path(state_dir / "best") as tmp:
                    export_model(enc.backbone, tokenizer, tmp, enc.eval_pooler, int(tr["max_seq_length"]), export_prompt())
            _append_rows(eval_log, EVAL_LOG_FIELDS, [{"step": step, "stsb_dev": f"{metrics[0]:.4f}",
                                                      "sickr_dev": f"{metrics[1]:.4f}", "is_best": int(is_best),
                                                      "seconds": f"{time.perf_counter() - t0:.2f}"}])
            accelerator.print(f"step {step}: STS-B dev {metrics[0]:.2f}, SICK-R dev {metrics[1]:.2f}"
                              + (" (best)" if is_best else f" (best {loop.stopper.best:.2f} at {loop.stopper.best_step})"))

    eval_steps, save_steps, log_steps = int(tr["eval_steps"]), int(tr["save_steps"]), int(tr.get("log_steps", 10))
    pending: list[tuple[int, list[torch.Tensor], float]] = []
    nonfinite = torch.tensor(-1, device=accelerator.device)  # first step with a non-finite loss (no per-step sync)
    rank_losses: list[float] = []  # this process' loss per step: every rank must see the same values
    max_norm = tr.get("max_grad_norm", 1.0)
    max_norm = math.inf if max_norm is None else float(max_norm)  # inf: the norm is measured, nothing clipped
    matmul_dtype = autocast_dtype(mp)
    eval_at_end = bool(tr.get("eval_at_end", False))
    embedding_dtype = None
    t_last, steps_since = time.perf_counter(), 0
    progress = None
    if accelerator.is_main_process and sys.stderr.isatty():
        from tqdm.auto import tqdm

        progress = tqdm(total=steps, initial=loop.step, desc=f"{hp['method']}/{hp['backbone']}/seed{seed}", unit="step")

    def flush_logs() -> None:
        """One host sync per log interval: check the loss and write the buffered per-step rows."""
        nonlocal t_last, steps_since
        bad = int(nonfinite.item())
        if bad >= 0:
            raise TrainingError(f"non-finite loss at step {bad}; nothing was saved after the last checkpoint. "
                                "Lower the learning rate or use bf16/fp32 (mixed_precision), then rerun")
        if not pending:
            return
        rate = steps_since * global_batch / max(time.perf_counter() - t_last, 1e-9)
        values = torch.stack([torch.stack(v) for _, v, _ in pending]).float().cpu().tolist()
        rank_losses.extend(vals[0] for vals in values)
        rows = []
        for (step, _, lr), vals in zip(pending, values):
            row = {"step": step, **{k: f"{x:.6g}" for k, x in zip(_STAT_KEYS, vals)}}
            row["clustering_started"] = int(vals[_STAT_KEYS.index("clustering_started")])
            row["n_false_negative_pairs"] = int(vals[_STAT_KEYS.index("n_false_negative_pairs")])
            row.update({"lr": f"{lr:.6g}", "sentences_per_s": f"{rate:.1f}"})
            rows.append(row)
        if accelerator.is_main_process:
            _append_rows(train_log, TRAIN_LOG_FIELDS, rows)
        pending.clear()
        t_last, steps_since = time.perf_counter(), 0

    model.train()
    stopped_early = False
    for batch in loader:
        step = loop.step + 1
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            z1, z2 = _two_views(model, batch)
        embedding_dtype = z1.dtype  # float16 for [CLS] + MLP under fp16 autocast, as in the official runs
        z1, z2 = gather_with_grad(z1, accelerator), gather_with_grad(z2, accelerator)
        loss, stats = compute_objective(z1, z2, loop.cluster_state, obj_cfg, step, loop.rng, autocast_dtype=matmul_dtype)
        nonfinite = torch.where((nonfinite < 0) & ~torch.isfinite(loss.detach()), torch.tensor(step, device=nonfinite.device), nonfinite)
        accelerator.backward(loss * world)
        stats = {**stats, "grad_norm": accelerator.clip_grad_norm_(model.parameters(), max_norm)}
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loop.step = step
        steps_since += 1
        pending.append((step, [_scalar(stats.get(k, 0.0), accelerator.device) for k in _STAT_KEYS], lr))
        if progress is not None:
            progress.update(1)
        last = step == steps
        if step % log_steps == 0 or step % eval_steps == 0 or step % save_steps == 0 or last:
            flush_logs()
        if step % eval_steps == 0 or (last and eval_at_end):
            model.eval()
            evaluate(step)
            model.train()
            t_last = time.perf_counter()  # throughput counts training time only
        if loop.stopper.should_stop:
            stopped_early = not last
            flush_logs()
            break
        if step % save_steps == 0 and not last:
            _save_checkpoint(accelerator, state_dir, {"digest": loop.digest, "world": world, "step": step})
            t_last = time.perf_counter()
    flush_logs()
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
        "effective": effective_settings(tr, obj_cfg, world, mp, packed, embedding_dtype,
                                        loop.cluster_state.centroids),
        "ranks": _rank_records(accelerator, rank_losses, loop.cluster_state),
        "data": {"tokenized": str(data_dir), "sentences": len(ds), "source_sha256": data_stats.get("source_sha256"),
                 "tokenize_stats": data_stats},
        "model_source": str(model_dir), "wall_seconds": None,
        **environment(),
    }
    if accelerator.is_main_process:
        best = state_dir / "best"
        enc = accelerator.unwrap_model(model)
        if not best.is_dir():  # no evaluation data: the final model is the result
            with atomic_path(best) as tmp:
                export_model(enc.backbone, tokenizer, tmp, enc.eval_pooler, int(tr["max_seq_length"]), export_prompt())
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "model") as tmp:
            shutil.copytree(best, tmp)
        for src_log, name in ((train_log, "train_log.csv"), (eval_log, "eval_log.csv")):
            with atomic_path(run_dir / name) as tmp:
                if src_log.exists():
                    shutil.copyfile(src_log, tmp)
                else:
                    fields = TRAIN_LOG_FIELDS if name == "train_log.csv" else EVAL_LOG_FIELDS
                    tmp.write_text(",".join(fields) + "\n")
        summary["wall_seconds"] = round(time.time() - wall0, 1)
        summary["model_sha256"] = {p.name: sha256_file(p) for p in sorted((run_dir / "model").glob("*.safetensors"))}
        write_json_atomic(run_dir / "run.json", summary)
        shutil.rmtree(state_dir, ignore_errors=True)  # finished: checkpoints are no longer needed
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def effective_settings(tr: dict, obj_cfg, processes: int, mixed_precision: str, packed: str,
                       embedding_dtype: torch.dtype | None, centroids: torch.Tensor | None) -> dict:
    """What decided this run's numbers, for ``run.json`` (README: "Differences from the official
    code"): the resolved precision, clip norm, centroid precision and schedule switches."""
    name = lambda d: None if d is None else str(d).replace("torch.", "")  # noqa: E731
    max_norm = tr.get("max_grad_norm", 1.0)
    matmul = autocast_dtype(mixed_precision)
    return {
        "processes": processes, "mixed_precision": mixed_precision,
        "max_grad_norm": max_norm, "clipped_gradient": "of the global loss (the same for any process count)",
        "optimizer": tr.get("optimizer", "adamw"), "early_stop": tr.get("early_stop"),
        "eval_at_end": bool(tr.get("eval_at_end", False)),
        "embedding_dtype": name(embedding_dtype), "autocast_matmul_dtype": name(matmul),
        "centroid_dtype": obj_cfg.centroid_dtype if obj_cfg.kmeans else None,
        "centroid_tensor_dtype": name(None if centroids is None else centroids.dtype),
        "centroid_update": None if not obj_cfg.kmeans else
        ("official arithmetic" if obj_cfg.centroid_dtype == "embedding" else "exact float32"),
        "packed": packed,
    }


def _rank_records(accelerator, losses: list[float], cluster_state) -> list[dict]:
    """Per process: a digest of its loss history and of its final centroids. Every process
    computes the objective on the same gathered batch, so all records must be identical; a run
    whose processes drifted apart says so (and the 2-process test asserts they do not)."""
    from accelerate.utils import gather_object

    c = cluster_state.centroids
    record = {
        "rank": accelerator.process_index, "steps_logged": len(losses),
        "losses_sha256": hashlib.sha256(json.dumps(losses).encode()).hexdigest(),
        "last_loss": losses[-1] if losses else None,
        "centroids_sha256": None if c is None else hashlib.sha256(c.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest(),
        "clustering_start_step": cluster_state.start_step,
    }
    records = gather_object([record]) if accelerator.num_processes > 1 else [record]
    keys = ("losses_sha256", "centroids_sha256", "clustering_start_step")
    if accelerator.is_main_process and any(any(r[k] != records[0][k] for k in keys) for r in records):
        print("[clusterns.train] warning: the processes' losses or centroids differ (see run.json 'ranks')", flush=True)
    return records


def _scalar(x, device) -> torch.Tensor:
    """A statistic as a 0-d float tensor on ``device`` (no host sync)."""
    if torch.is_tensor(x):
        return x.detach().float().reshape(())
    return torch.tensor(float(x), device=device)


def _enable_packed(model, wanted: bool, accelerator) -> str:
    """Switch the padding-free training forward on where it applies; returns what run.json records."""
    from clusterns.encoder import SentenceEncoder
    from clusterns.packed import check_against_hf, unsupported_reason

    if not wanted:
        return "off (training.packed: false)"
    if not isinstance(model, SentenceEncoder):
        return "off (prompt runs use the HF forward)"
    reason = unsupported_reason(model.backbone)
    if reason is None:
        try:
            diff = check_against_hf(model.backbone)
        except RuntimeError as e:
            reason = str(e)
    if reason is not None:
        if accelerator.is_main_process:
            print(f"[clusterns.train] packed forward off: {reason}", flush=True)
        return f"off ({reason})"
    model.packed = True
    return f"on (max relative difference to the HF forward {diff:.1e})"


def _two_views(model, batch):
    """Two dropout views in one forward of 2B rows, called through the (DDP) wrapper's forward.

    Prompt batches arrive already as 2B rows (template 1 rows, then template 2 rows).
    """
    if "lengths" in batch:
        z = model(**batch)
        return z[: z.shape[0] // 2], z[z.shape[0] // 2:]
    from clusterns.encoder import duplicate_views

    b = batch["input_ids"].shape[0]
    ids, mask, _, index = duplicate_views(batch["input_ids"], batch["attention_mask"], None, batch.get("token_index"))
    z = model(ids, mask, token_index=index)
    return z[:b], z[b:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterns.train", description=__doc__.split("\n")[0])
    p.add_argument("--hparams", required=True, help="resolved run settings: a JSON string or a path to a JSON file")
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
        hp["training"]["max_steps"] = args.max_steps
    try:
        train(hp, args.data, args.model, args.senteval, args.run_dir, args.state_dir)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
