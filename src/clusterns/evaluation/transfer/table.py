"""One table over several transfer result files: ``python -m clusterns.transfer table``.

:func:`transfer_table` writes ``transfer.md`` and ``transfer.csv``: one row per result file (the
seven tasks' test accuracy x 100 and the average), with notes on the modes used, partial runs
(marked †) and subsampled data (marked ‡).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from clusterns.evaluation.base import Parser, UsageError
from clusterns.evaluation.transfer.data import TASKS
from clusterns.evaluation.transfer.protocols import MODES
from clusterns.utils.files import write_text_atomic

__all__ = ["transfer_table", "build_table_parser", "main"]


def _load_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or meta.get("mode") not in MODES or not any(t in data for t in TASKS):
        raise ValueError(f"{path} is not a clusterns.transfer result (no transfer tasks / meta.mode)")
    return data


def _cell(value) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.2f}"


def transfer_table(inputs: Sequence[str | Path], labels: Sequence[str] | None,
                   out_dir: str | Path) -> tuple[Path, Path]:
    """``transfer.md`` and ``transfer.csv`` in ``out_dir``: one row per input, the seven tasks + avg."""
    if not inputs:
        raise ValueError("table needs at least one --inputs file")
    if labels is None:
        labels = [Path(p).parent.as_posix() for p in inputs]
    if len(labels) != len(inputs):
        raise ValueError(f"{len(labels)} labels for {len(inputs)} inputs; give one label per input")
    results = [_load_result(p) for p in inputs]
    header = ["label", *TASKS, "avg"]
    rows = [[label, *(r.get(t) for t in TASKS), r.get("avg")] for label, r in zip(labels, results)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row[0], *("" if v is None else repr(float(v)) for v in row[1:])])
    md = ["| Model | " + " | ".join(TASKS) + " | Avg. |", "|---|" + "---:|" * (len(TASKS) + 1)]
    notes = []
    for row, r, label in zip(rows, results, labels):
        mark = ""
        missing = [t for t in TASKS if t not in r]
        if missing:
            mark += "†"
        if r["meta"].get("subsampled"):
            mark += "‡"
        md.append(f"| {label}{mark} | " + " | ".join(_cell(v) for v in row[1:]) + " |")
    modes = sorted({r["meta"]["mode"] for r in results})
    describe = {"test": "test (SimCSE `test`: 10-fold, Adam, batch 64, tenacity 5, epoch size 4)",
                "fast": "fast (SimCSE `fasttest`: 5-fold, RMSprop, batch 128, tenacity 3, epoch size 2)"}
    notes.append("Test accuracy x 100 (SentEval protocol, logistic regression on frozen embeddings); "
                 "Avg. = mean over the tasks run. Mode: " + "; ".join(describe[m] for m in modes) + ".")
    if len(modes) > 1:
        notes.append("Rows use different modes: " + ", ".join(f"{lab}: {r['meta']['mode']}"
                                                            for lab, r in zip(labels, results)) + ".")
    if any(t not in r for r in results for t in TASKS):
        notes.append("† not all seven tasks were run; Avg. is over the tasks run.")
    if any(r["meta"].get("subsampled") for r in results):
        notes.append("‡ subsampled data (--max-examples): not comparable with published numbers.")
    out = Path(out_dir)
    md_path, csv_path = out / "transfer.md", out / "transfer.csv"
    write_text_atomic(md_path, "\n".join(md) + "\n\n" + "\n\n".join(notes) + "\n")
    write_text_atomic(csv_path, buf.getvalue())
    return md_path, csv_path


# ---------------------------------------------------------------------------------------------
# CLI


def build_table_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m clusterns.transfer table",
                description="One table (transfer.md, transfer.csv) from several transfer result files.")
    p.add_argument("--inputs", nargs="+", required=True, help="transfer JSON files, one row each")
    p.add_argument("--labels", nargs="+", default=None, help="row labels, one per input (default: the folders)")
    p.add_argument("--out-dir", required=True, help="where transfer.md and transfer.csv are written")
    return p


def main(argv: Sequence[str]) -> int:
    """``python -m clusterns.transfer table ARGS`` (``argv`` = ARGS); user errors print
    ``error: ...`` and return 1 with nothing written."""
    try:
        args = build_table_parser().parse_args(argv)
        md, csv_path = transfer_table(args.inputs, args.labels, args.out_dir)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(md.read_text(), end="")
    print(f"wrote {md} and {csv_path}")
    return 0
