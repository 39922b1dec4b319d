"""The run's CSV logs: one row per step (buffered on the device, written once per log interval:
one host sync) and one row per dev evaluation. They live in the state folder while the run goes
on (truncated to the checkpoint on resume) and are copied next to the model at the end."""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import torch

from clusterns.training import TrainingError
from clusterns.utils.files import atomic_path

__all__ = ["TRAIN_LOG_FIELDS", "EVAL_LOG_FIELDS", "STAT_KEYS", "StepLog", "append_rows", "truncate_rows",
           "reset_logs", "copy_logs"]

TRAIN_LOG_FIELDS = ["step", "loss", "infonce", "bml", "avg_cos", "clustering_started", "n_false_negative_pairs",
                    "hard_negative_cos", "grad_norm", "lr", "sentences_per_s"]
EVAL_LOG_FIELDS = ["step", "stsb_dev", "sickr_dev", "is_best", "seconds"]
# Per-step statistics (the objective's, plus the gradient norm), in TRAIN_LOG_FIELDS order.
STAT_KEYS = ["loss", "infonce", "bml", "avg_cos", "clustering_started", "n_false_negative_pairs", "hard_negative_cos",
             "grad_norm"]
_INTEGER_KEYS = ("clustering_started", "n_false_negative_pairs")
TRAIN_LOG, EVAL_LOG = "train_log.csv", "eval_log.csv"


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def truncate_rows(path: Path, fields: list[str], last_step: int) -> None:
    """Drop log rows written after the checkpoint being resumed."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def reset_logs(state_dir: Path, resumed_step: int | None) -> None:
    """Main process: a fresh run starts without logs; a resumed one keeps the rows up to its checkpoint."""
    if resumed_step is None:
        for name in (TRAIN_LOG, EVAL_LOG):
            (state_dir / name).unlink(missing_ok=True)
        return
    truncate_rows(state_dir / TRAIN_LOG, TRAIN_LOG_FIELDS, resumed_step)
    truncate_rows(state_dir / EVAL_LOG, EVAL_LOG_FIELDS, resumed_step)


def copy_logs(state_dir: Path, run_dir: Path) -> None:
    """Both logs into the run folder, atomically (a header only when a log has no rows)."""
    for name, fields in ((TRAIN_LOG, TRAIN_LOG_FIELDS), (EVAL_LOG, EVAL_LOG_FIELDS)):
        with atomic_path(run_dir / name) as tmp:
            if (state_dir / name).exists():
                shutil.copyfile(state_dir / name, tmp)
            else:
                tmp.write_text(",".join(fields) + "\n")


def _scalar(x, device) -> torch.Tensor:
    """A statistic as a 0-d float tensor on ``device`` (no host sync)."""
    if torch.is_tensor(x):
        return x.detach().float().reshape(())
    return torch.tensor(float(x), device=device)


class StepLog:
    """Per-step statistics kept as device tensors; :meth:`flush` is the one host sync per log
    interval: it stops the run at the first non-finite loss and writes the buffered rows.

    Every process records and flushes (so each knows its own loss history, :attr:`losses`); the
    main process writes the file. Throughput counts training time only (:meth:`restart_clock`
    after evaluations and checkpoints).
    """

    def __init__(self, path: Path, device, global_batch: int, write: bool, tracker=None) -> None:
        self.path, self.device, self.global_batch, self.write = path, device, global_batch, write
        self.tracker = tracker  # an Accelerator with trackers (training.report_to): each row is logged to them
        self.pending: list[tuple[int, list[torch.Tensor], float]] = []
        self.nonfinite = torch.tensor(-1, device=device)  # first step with a non-finite loss (no per-step sync)
        self.losses: list[float] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_last, self.steps_since = time.perf_counter(), 0

    def record(self, step: int, stats: dict, lr: float) -> None:
        loss = stats["loss"]
        bad = (self.nonfinite < 0) & ~torch.isfinite(loss)
        self.nonfinite = torch.where(bad, torch.tensor(step, device=self.nonfinite.device), self.nonfinite)
        self.pending.append((step, [_scalar(stats.get(k, 0.0), self.device) for k in STAT_KEYS], lr))
        self.steps_since += 1

    def flush(self) -> None:
        bad = int(self.nonfinite.item())
        if bad >= 0:
            raise TrainingError(f"non-finite loss at step {bad}; nothing was saved after the last checkpoint. "
                                "Lower the learning rate or use bf16/fp32 (mixed_precision), then rerun")
        if not self.pending:
            return
        rate = self.steps_since * self.global_batch / max(time.perf_counter() - self.t_last, 1e-9)
        values = torch.stack([torch.stack(v) for _, v, _ in self.pending]).float().cpu().tolist()
        self.losses.extend(vals[0] for vals in values)
        rows = []
        for (step, _, lr), vals in zip(self.pending, values):
            row = {"step": step, **{k: f"{x:.6g}" for k, x in zip(STAT_KEYS, vals)}}
            for key in _INTEGER_KEYS:
                row[key] = int(vals[STAT_KEYS.index(key)])
            row.update({"lr": f"{lr:.6g}", "sentences_per_s": f"{rate:.1f}"})
            rows.append(row)
        if self.write:
            append_rows(self.path, TRAIN_LOG_FIELDS, rows)
        if self.tracker is not None:
            for (step, _, lr), vals in zip(self.pending, values):
                self.tracker.log({**{f"train/{k}": x for k, x in zip(STAT_KEYS, vals)}, "train/lr": lr,
                                  "train/sentences_per_s": rate}, step=step)
        self.pending.clear()
        self.restart_clock()
