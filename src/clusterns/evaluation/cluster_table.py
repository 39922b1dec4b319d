"""The clustering table (the paper's Table 6): ``results/tables/clustering.{md,csv,tex}``.

One row per model: trained runs grouped by their label (method and backbone), with the mean ±
sample std over seeds of each seed's restart mean; the untrained backbones ("base") and the
released checkpoints ("released") beside them. ACC in the first table, NMI in the second; the
pooler of each row is shown, subsampled inputs are marked.

``python -m clusterns.cluster_eval table --inputs A.json B.json --labels "SimCSE / BERT-base" ...
--kinds run run --out-dir results/tables``
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from clusterns.evaluation.base import Parser, UsageError
from clusterns.utils.files import write_text_atomic

__all__ = ["KINDS", "clustering_table", "build_table_parser", "table_main"]

KINDS = ("run", "base", "released")
_NO_STD = "–"


def _load(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rerun the clustering evaluation") from None
    if not isinstance(data, dict) or not isinstance(data.get("details"), dict) or "meta" not in data:
        raise ValueError(f"{path} is not a clusterns.cluster_eval result")
    return data


def _stats(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def _cell(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "—"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else f" ± {_NO_STD}")


def clustering_table(inputs: Sequence[str | Path], labels: Sequence[str], kinds: Sequence[str],
                     out_dir: str | Path) -> list[Path]:
    """Write ``clustering.md``, ``clustering.csv`` and ``clustering.tex`` into ``out_dir``."""
    if not inputs:
        raise ValueError("the table needs at least one --inputs file")
    if not (len(inputs) == len(labels) == len(kinds)):
        raise ValueError(f"{len(inputs)} inputs, {len(labels)} labels and {len(kinds)} kinds: give one of each per input")
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        raise ValueError(f"unknown kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    results = [_load(p) for p in inputs]
    sets = list(dict.fromkeys(s for r in results for s in r["details"]))
    groups: dict[tuple[str, str], list[dict]] = {}
    for label, kind, r in zip(labels, kinds, results):
        groups.setdefault((kind, label), []).append(r)
    order = [g for kind in KINDS for g in groups if g[0] == kind]
    rows = []
    for kind, label in order:
        members = groups[(kind, label)]
        row = {"label": label, "kind": kind, "seeds": len(members),
               "pooler": "/".join(sorted({m["meta"]["pooler"] for m in members})),
               "subsampled": any(m["meta"].get("subsampled") for m in members),
               "restarts": sorted({len(d["acc"]) for m in members for d in m["details"].values()})}
        for metric in ("acc", "nmi"):
            for name in sets:
                row[(metric, name)] = _stats([m["details"][name][f"{metric}_mean"] if name in m["details"] else None
                                              for m in members])
            row[(metric, "avg")] = _stats([(m["avg"] if metric == "acc" else m["nmi"]["avg"])
                                           if all(s in m["details"] for s in sets) else None for m in members])
        rows.append(row)
    out = Path(out_dir)
    written = [out / "clustering.md", out / "clustering.csv", out / "clustering.tex"]
    write_text_atomic(written[0], _markdown(rows, sets))
    write_text_atomic(written[1], _csv(rows, sets))
    write_text_atomic(written[2], _latex(rows, sets))
    return written


def _label(row: dict) -> str:
    suffix = {"run": "", "base": " (base)", "released": " (released)"}[row["kind"]]
    return f"{row['label']}{suffix}{'‡' if row['subsampled'] else ''}"


def _markdown(rows: list[dict], sets: list[str]) -> str:
    restarts = sorted({n for r in rows for n in r["restarts"]})
    lines = ["# Short-text clustering (Table 6)", "",
             "KMeans on the embeddings (K = number of classes, n_init 10); clustering accuracy (ACC, best "
             "one-to-one mapping of clusters to classes) and NMI × 100. Each seed's score is the mean over "
             f"{'/'.join(map(str, restarts))} KMeans restarts (random_state 0, 1, ...); a row is the mean ± sample "
             "std over its seeds (± – = one seed). Pooler: cls_before_pooler = the official last-layer [CLS] state.", ""]
    for metric, title in (("acc", "ACC"), ("nmi", "NMI")):
        header = ["Model", "Pooler", "Seeds", *sets, "Avg."]
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |",
                  "| :--- | :--- | ---: | " + " | ".join("---:" for _ in range(len(sets) + 1)) + " |"]
        for r in rows:
            cells = [_cell(*r[(metric, s)]) for s in [*sets, "avg"]]
            lines.append(f"| {_label(r)} | {r['pooler']} | {r['seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(r["subsampled"] for r in rows):
        lines.append("‡ subsampled sets (clustering.max_examples): a quick check, not comparable with published numbers.")
        lines.append("")
    return "\n".join(lines)


def _csv(rows: list[dict], sets: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [f"{m}_{s}_{stat}" for m in ("acc", "nmi") for s in [*sets, "avg"] for stat in ("mean", "std", "n")]
    w.writerow(["label", "kind", "pooler", "seeds", "subsampled", *cols])
    for r in rows:
        values = [v for m in ("acc", "nmi") for s in [*sets, "avg"] for v in r[(m, s)]]
        w.writerow([r["label"], r["kind"], r["pooler"], r["seeds"], int(r["subsampled"]),
                    *("" if isinstance(v, float) and math.isnan(v) else repr(v) for v in values)])
    return buf.getvalue()


def _latex(rows: list[dict], sets: list[str]) -> str:
    esc = lambda t: t.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "r" * (len(sets) + 1) + "}", r"\toprule",
             "Model & " + " & ".join(esc(s) for s in sets) + r" & Avg. \\", r"\midrule"]
    for r in rows:
        cells = []
        for s in [*sets, "avg"]:
            mean, std, n = r[("acc", s)]
            cells.append("--" if n == 0 else f"{mean:.2f}" + (f" $\\pm$ {std:.2f}" if n > 1 else ""))
        lines.append(esc(_label(r).replace("‡", "*")) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% ACC x 100, mean (± std over seeds) of the KMeans restarts' mean", ""]
    return "\n".join(lines)


def build_table_parser() -> Parser:
    p = Parser(prog="python -m clusterns.cluster_eval table",
               description="The clustering table (clustering.md/.csv/.tex) from several cluster_eval result files.")
    p.add_argument("--inputs", nargs="+", required=True, help="cluster_eval JSON files")
    p.add_argument("--labels", nargs="+", required=True, help="row label of each input (seeds of a run share one)")
    p.add_argument("--kinds", nargs="+", required=True, help=f"kind of each input: {', '.join(KINDS)}")
    p.add_argument("--out-dir", required=True, help="where the three files are written")
    return p


def table_main(argv: Sequence[str]) -> int:
    import sys

    try:
        args = build_table_parser().parse_args(argv)
        written = clustering_table(args.inputs, args.labels, args.kinds, args.out_dir)
    except (UsageError, ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(written[0].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
