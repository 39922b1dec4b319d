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


LOCK_FILE = Path(__file__).resolve().parents[3] / "requirements" / "lock.txt"  # in a checkout


def read_lock(path: str | Path = LOCK_FILE) -> dict[str, str]:
    """``{package: version}`` of a lock file (``name==version`` lines); empty when there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[_normalise(name)] = version.strip()
    return out


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def lock_differences(names=_LIBRARIES + ("sentence-transformers", "tokenizers", "scikit-learn", "safetensors"),
                     path: str | Path = LOCK_FILE) -> dict[str, dict[str, str | None]]:
    """The libraries whose installed version differs from the lock file (``{name: {installed,
    locked}}``); PyTorch's local build tag (+cpu, +cu126) does not count. Empty without a lock."""
    locked = read_lock(path)
    out = {}
    for name in names:
        want = locked.get(_normalise(name))
        if want is None:
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or have.split("+", 1)[0] != want.split("+", 1)[0]:
            out[name] = {"installed": have, "locked": want}
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
        "lock_differences": lock_differences(),
    }
