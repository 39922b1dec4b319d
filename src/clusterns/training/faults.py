"""Deliberate faults at exact points of a run, for the reliability tests.

``CLUSTERNS_FAULT=<what>@<point>:<step>[,...]`` makes every process of a training run fail the
moment it reaches ``<point>`` at step ``<step>``, deterministically (no race against a timer):

* ``kill@step:N``: SIGKILL right after step N (after its checkpoint, if it wrote one): a
  preemption, a time limit, an OOM killer;
* ``kill@rename:N``: SIGKILL inside the checkpoint of step N, after the old checkpoint was renamed
  to ``checkpoint.old`` and before the new one was renamed into place;
* ``enospc@save:N``: the checkpoint of step N fails with ``OSError(ENOSPC)`` (a full disk);
* ``nan@loss:N``: the loss of step N becomes NaN (a diverged run);
* ``mismatch@packed:0``: the live check of the padding-free forward reports a mismatch;
* ``pause@step:N``: stop (sleep) right after step N until killed from outside, once: a marker
  file in ``CLUSTERNS_FAULT_MARKERS`` (default: the working directory) makes the rerun go on, so
  a scheduler can be made to kill the job at a known point (``scancel``) and its retry resume.

Unset (always, outside the tests) it does nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

__all__ = ["ENV", "MARKERS", "injected", "fault"]

ENV = "CLUSTERNS_FAULT"
MARKERS = "CLUSTERNS_FAULT_MARKERS"


def injected(what: str, point: str, step: int) -> bool:
    """Whether ``CLUSTERNS_FAULT`` asks for ``what`` at ``point`` of ``step``."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for item in spec.split(","):
        kind, _, where = item.strip().partition("@")
        name, _, at = where.partition(":")
        if kind == what and name == point and at.isdigit() and int(at) == step:
            return True
    return False


def fault(point: str, step: int, main_process: bool = True) -> None:
    """Kill the process, pause it or raise the injected error when one is asked for here."""
    if injected("kill", point, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if injected("pause", point, step):
        marker = Path(os.environ.get(MARKERS, ".")) / f"paused-{point}-{step}"
        if not marker.exists():
            if main_process:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{os.getpid()}\n")
            while True:  # until a signal ends the process
                time.sleep(3600)
    if injected("enospc", point, step):
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV} at {point} of step {step})")
