"""Provenance recorded next to every result: library versions, git commit, host."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

_LIBRARIES = ("clusterns", "torch", "transformers", "datasets", "accelerate", "numpy", "scipy", "pandas")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries whose behaviour affects the numbers."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(start: str | Path | None = None) -> str | None:
    """Commit of the project checkout (``-dirty`` appended when it has local changes), or None."""
    cwd = Path(start) if start else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def environment() -> dict:
    """Versions, commit and host in one dict for ``run.json`` / evaluator outputs."""
    import torch

    return {
        "versions": library_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
