"""Resume checkpoints of a run: what they hold, how they are written (never half) and when a
checkpoint may be resumed (only by a run with the same settings and process count)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clusterns.training import TrainingError
from clusterns.training.faults import fault
from clusterns.training.selection import EarlyStopping
from clusterns.utils.files import write_json_atomic

__all__ = ["LoopState", "hparams_digest", "Checkpoints"]

META_FILE = "clusterns_meta.json"


def hparams_digest(hp: dict) -> str:
    """Identity of a run's settings; a checkpoint is resumed only by a run with the same digest."""
    keep = {k: v for k, v in hp.items() if k != "runtime"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


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


class Checkpoints:
    """``accelerator.save_state`` of everything registered with the accelerator (model, optimizer,
    scheduler, loss scaler, every process' RNG, the :class:`LoopState`) in ``state_dir/checkpoint``.

    Written into ``checkpoint.tmp`` and renamed into place; the previous checkpoint is renamed to
    ``checkpoint.old`` first and removed last, so a kill at any moment leaves one complete
    checkpoint (``.old`` survives a kill between the two renames).
    """

    def __init__(self, accelerator, state_dir: Path, digest: str) -> None:
        self.accelerator, self.state_dir, self.digest = accelerator, Path(state_dir), digest
        self.world = accelerator.num_processes

    def find(self) -> Path | None:
        for name in ("checkpoint", "checkpoint.old"):
            if (self.state_dir / name).is_dir():
                return self.state_dir / name
        return None

    def resume(self) -> Path | None:
        """Load the checkpoint when it is this run's; move one of other settings or another process
        count aside (``<state_dir>.stale-<time>``) and start from step 0. Returns what was loaded."""
        acc = self.accelerator
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            probe = self.state_dir / f".writable-{acc.process_index}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise TrainingError(f"cannot write to the state folder {self.state_dir} ({e}); make it writable "
                                "(or free space) and rerun") from None
        ckpt = self.find()
        if ckpt is None:
            return None
        meta_path = ckpt / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("digest") == self.digest and meta.get("world") == self.world:
            acc.load_state(str(ckpt))
            return ckpt
        acc.wait_for_everyone()
        if acc.is_main_process:
            stale = self.state_dir.with_name(self.state_dir.name + f".stale-{int(time.time())}")
            acc.print(f"checkpoint in {self.state_dir} is from other settings or process count; moved to {stale}")
            os.replace(self.state_dir, stale)
            self.state_dir.mkdir(parents=True)
        acc.wait_for_everyone()
        return None

    def save(self, step: int) -> None:
        """Write the checkpoint of ``step``; a write failure (a full disk, a lost mount) stops the
        run with a message and leaves the previous checkpoint as it was, ready to resume."""
        acc = self.accelerator
        ckpt, tmp, old = (self.state_dir / n for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
        try:
            if acc.is_main_process and tmp.exists():
                shutil.rmtree(tmp)
            acc.wait_for_everyone()
            fault("save", step)
            acc.save_state(str(tmp))
            acc.wait_for_everyone()
            if acc.is_main_process:
                write_json_atomic(tmp / META_FILE, {"digest": self.digest, "world": self.world, "step": step})
        except OSError as e:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.find()
            kept = f"the checkpoint {previous} is intact; " if previous else "no earlier checkpoint exists; "
            raise TrainingError(f"cannot write the checkpoint of step {step} to {tmp} ({e}); {kept}free space or "
                                "fix the folder and rerun to resume") from None
        if acc.is_main_process:
            if ckpt.exists():
                if old.exists():
                    shutil.rmtree(old)
                os.replace(ckpt, old)
            fault("rename", step)
            os.replace(tmp, ckpt)
            if old.exists():
                shutil.rmtree(old)
        acc.wait_for_everyone()
