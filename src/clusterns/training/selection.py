"""Model selection on STS-B dev (the official trainers' ``metric_for_best_model: stsb_spearman``):
evaluation every ``eval_steps`` on the main process, the best model exported, early stopping."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clusterns import poolers
from clusterns.training.logs import EVAL_LOG, EVAL_LOG_FIELDS, append_rows
from clusterns.utils.files import atomic_path

__all__ = ["EarlyStopping", "DevSelection", "dev_embedder"]


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


def dev_embedder(encoder, tokenizer, batch_size: int):
    """How a training module is embedded for dev selection: its evaluation pooler, or for a prompt
    model its dev protocol (the denoised [MASK] state, as the original ``sentemb_forward``)."""
    from clusterns.evaluation.embedding import Embedder, embedder

    if poolers.is_prompt(encoder.eval_pooler):
        return Embedder(encoder.mask_encoder(tokenizer), batch_size=batch_size)
    return embedder(encoder.backbone, tokenizer, encoder.eval_pooler, batch_size=batch_size)


def _broadcast(accelerator, value):
    from accelerate.utils import broadcast_object_list

    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


class DevSelection:
    """STS-B dev and SICK-R dev of the model being trained (no evaluation data: a no-op).

    :meth:`evaluate` scores on the main process, shares the scores with every process (they all
    update their :class:`EarlyStopping` alike), exports a new best with ``export(folder)`` to
    ``state_dir/best`` (atomically) and appends a row to the eval log.
    """

    def __init__(self, accelerator, senteval_dir, state_dir: Path, tokenizer, batch_size: int,
                 export: Callable[[Path], None], track: bool = False) -> None:
        from clusterns.evaluation.sts import load_tasks

        self.accelerator, self.state_dir, self.tokenizer = accelerator, Path(state_dir), tokenizer
        self.batch_size, self.export, self.track = batch_size, export, track
        self.tasks = load_tasks(senteval_dir, mode="dev") if senteval_dir is not None and accelerator.is_main_process \
            else None

    def evaluate(self, model, step: int, stopper: EarlyStopping) -> None:
        from clusterns.evaluation.sts import score_tasks

        acc = self.accelerator
        t0 = time.perf_counter()
        metrics = None
        if acc.is_main_process and self.tasks is not None:
            embed = dev_embedder(acc.unwrap_model(model), self.tokenizer, self.batch_size)
            res = score_tasks(self.tasks, embed)
            metrics = (res["STSBenchmark"], res.get("SICKRelatedness", math.nan))
        metrics = _broadcast(acc, metrics)
        if metrics is None:
            return
        is_best = stopper.update(step, metrics[0])
        if self.track:
            acc.log({"dev/stsb_spearman": metrics[0], "dev/sickr_spearman": metrics[1], "dev/is_best": int(is_best)},
                    step=step)
        if not acc.is_main_process:
            return
        if is_best:
            with atomic_path(self.state_dir / "best") as tmp:
                self.export(tmp)
        append_rows(self.state_dir / EVAL_LOG, EVAL_LOG_FIELDS,
                    [{"step": step, "stsb_dev": f"{metrics[0]:.4f}", "sickr_dev": f"{metrics[1]:.4f}",
                      "is_best": int(is_best), "seconds": f"{time.perf_counter() - t0:.2f}"}])
        acc.print(f"step {step}: STS-B dev {metrics[0]:.2f}, SICK-R dev {metrics[1]:.2f}"
                  + (" (best)" if is_best else f" (best {stopper.best:.2f} at {stopper.best_step})"))
