"""Tables and plots from finished runs: mean ± std over seeds beside the published numbers,
an ablation table, a paired (same-seed) comparison, and the figures the README lists under "Tables, plots and the report".

Layout of this module, from the edges inwards:

* loading: the workflow's manifest JSON -> a listing of every expected run (``list_runs``) and
  a tidy frame of one row per finished run per task (``load_scores``); published numbers from
  ``config/paper_results.csv`` (``load_paper``);
* aggregation (pure): ``summarize`` (mean, sample std, n), ``paired_stats`` (difference, t-CI,
  paired t-test), ``main_table`` / ``ablation_table`` / ``paired_table`` (DataFrames, also the CSVs);
* rendering: Markdown and booktabs LaTeX from those frames;
* plotting: ``plot_avg_sts``, ``plot_training_curves``, ``plot_sensitivity`` (PNG + PDF).

A run counts only once its ``sts_test.json`` exists, so every output works on partial results.

CLI::

    python -m clusterns.report tables --manifest M.json [--paper config/paper_results.csv] --out-dir DIR
    python -m clusterns.report plots  --manifest M.json [--paper config/paper_results.csv] --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from clusterns.utils.files import atomic_path, write_text_atomic

TASKS: tuple[str, ...] = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
ALL_TASKS: tuple[str, ...] = TASKS + ("avg",)
TASK_LABELS = {"STS12": "STS12", "STS13": "STS13", "STS14": "STS14", "STS15": "STS15", "STS16": "STS16",
               "STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R", "avg": "Avg."}
BASE = "base"                      # method name of the untrained-backbone rows
BASE_LABEL = "base (untrained)"
RUN_GROUPS = ("main", "ablation", "sweep")
COMPARED_GROUPS = ("main", "ablation")   # groups whose runs may enter paired comparisons / curves
PAPER_COLUMNS = ("method", "backbone", "setting") + ALL_TASKS + ("source",)
MISSING = "—"      # a value that does not exist (yet)
NO_STD = "–"       # std of a single seed
SWEEP_LABELS = {"kmeans": "K (number of clusters)", "kmean_cosine": "clustering start threshold (kmean_cosine)"}
DEFAULT_PAPER = Path("config") / "paper_results.csv"


class ReportError(RuntimeError):
    """A problem with the report inputs that the user can fix (bad manifest, missing paper file)."""


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def read_manifest(path: str | Path) -> dict:
    """Read and check the workflow's manifest JSON (runs, base, paired, ablation_reference, labels)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"manifest {path} not found: run the workflow's manifest rule first") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"manifest {path} is not valid JSON: {e}") from None
    return validate_manifest(manifest, source=str(path))


def validate_manifest(manifest: Any, source: str = "manifest") -> dict:
    """Check required keys and fill defaults, so the rest of the module can index freely."""
    if not isinstance(manifest, dict):
        raise ReportError(f"{source}: expected a JSON object at the top level")
    runs = manifest.get("runs", [])
    if not isinstance(runs, list):
        raise ReportError(f"{source}: 'runs' must be a list")
    for i, run in enumerate(runs):
        for key in ("method", "backbone", "seed", "dir"):
            if not isinstance(run, dict) or key not in run:
                raise ReportError(f"{source}: runs[{i}] lacks the key {key!r}")
        group = run.get("group", "main")
        if group not in RUN_GROUPS:
            raise ReportError(f"{source}: runs[{i}] has group {group!r}; expected one of {', '.join(RUN_GROUPS)}")
        if group == "sweep" and not (isinstance(run.get("sweep"), dict) and "param" in run["sweep"]
                                     and "value" in run["sweep"]):
            raise ReportError(f"{source}: runs[{i}] is in group 'sweep' but lacks 'sweep': {{'param', 'value'}}")
    for i, base in enumerate(manifest.get("base", [])):
        if not isinstance(base, dict) or "backbone" not in base or "path" not in base:
            raise ReportError(f"{source}: base[{i}] needs 'backbone' and 'path'")
    for i, rel in enumerate(manifest.get("released", [])):
        if not isinstance(rel, dict) or not {"method", "backbone", "path"} <= set(rel):
            raise ReportError(f"{source}: released[{i}] needs 'method', 'backbone' and 'path'")
    for i, pair in enumerate(manifest.get("paired", [])):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ReportError(f"{source}: paired[{i}] must be a two-element list [A, B]")
    out = dict(manifest)
    out.setdefault("runs", [])
    out.setdefault("base", [])
    out.setdefault("released", [])
    out.setdefault("paired", [])
    out.setdefault("ablation_reference", "clusterns")
    labels = dict(out.get("labels") or {})
    labels.setdefault("methods", {})
    labels.setdefault("backbones", {})
    out["labels"] = labels
    return out


def _seed(value: Any) -> Any:
    """Seeds as ints where they are integral (manifests may carry them as strings)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def list_runs(manifest: dict, root: str | Path = ".") -> pd.DataFrame:
    """One row per run (and base evaluation) the manifest expects, with ``exists`` = result present.

    Columns: method, backbone, seed (None for base), group ('main'/'ablation'/'sweep'/'base'),
    sweep_param, sweep_value, dir, scores_path, exists.
    """
    root = Path(root)
    rows = []
    for run in manifest["runs"]:
        run_dir = root / run["dir"]
        sweep = run.get("sweep") or {}
        rows.append({"method": str(run["method"]), "backbone": str(run["backbone"]), "seed": _seed(run["seed"]),
                     "group": run.get("group", "main"), "sweep_param": sweep.get("param"),
                     "sweep_value": sweep.get("value"), "dir": str(run_dir),
                     "scores_path": str(run_dir / "sts_test.json")})
    for base in manifest["base"]:
        path = root / base["path"]
        rows.append({"method": BASE, "backbone": str(base["backbone"]), "seed": None, "group": "base",
                     "sweep_param": None, "sweep_value": None, "dir": str(path.parent), "scores_path": str(path)})
    for rel in manifest.get("released", []):  # published checkpoints scored by our evaluator
        path = root / rel["path"]
        rows.append({"method": str(rel["method"]), "backbone": str(rel["backbone"]), "seed": None,
                     "group": "released", "sweep_param": None, "sweep_value": None, "dir": str(path.parent),
                     "scores_path": str(path)})
    columns = ["method", "backbone", "seed", "group", "sweep_param", "sweep_value", "dir", "scores_path"]
    frame = pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in columns}, columns=columns)
    frame = frame.drop_duplicates(subset=["method", "backbone", "group", "dir"], keep="first").reset_index(drop=True)
    frame["exists"] = [Path(p).is_file() for p in frame["scores_path"]]
    return frame


def read_scores(path: str | Path) -> dict[str, float]:
    """The seven task scores and ``avg`` from an sts JSON (avg recomputed if absent); NaN for gaps."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON ({e}); delete it and rerun the evaluation") from None
    out: dict[str, float] = {}
    for task in TASKS:
        value = data.get(task)
        out[task] = float(value) if isinstance(value, (int, float)) else math.nan
    avg = data.get("avg")
    if isinstance(avg, (int, float)):
        out["avg"] = float(avg)
    else:
        vals = [out[t] for t in TASKS]
        out["avg"] = float(np.mean(vals)) if not any(math.isnan(v) for v in vals) else math.nan
    return out


def load_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """Tidy scores: one row per finished run (or base evaluation) per task in ``ALL_TASKS``."""
    rows = []
    for run in runs[runs["exists"]].itertuples(index=False):
        for task, score in read_scores(run.scores_path).items():
            rows.append({"method": run.method, "backbone": run.backbone, "seed": run.seed, "group": run.group,
                         "sweep_param": run.sweep_param, "sweep_value": run.sweep_value, "dir": run.dir,
                         "task": task, "score": score})
    columns = ["method", "backbone", "seed", "group", "sweep_param", "sweep_value", "dir", "task", "score"]
    frame = pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in columns}, columns=columns)
    frame["score"] = frame["score"].astype(float)
    return frame


def load_paper(path: str | Path) -> pd.DataFrame:
    """Published numbers (``config/paper_results.csv``); per-task cells may be empty (NaN)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"published-results file {path} not found (expected config/paper_results.csv)")
    paper = pd.read_csv(path, dtype={"method": str, "backbone": str, "setting": str, "source": str})
    missing = [c for c in PAPER_COLUMNS if c not in paper.columns]
    if missing:
        raise ReportError(f"{path} lacks the column(s) {', '.join(missing)}")
    for task in ALL_TASKS:
        paper[task] = pd.to_numeric(paper[task], errors="coerce")
    return paper


def default_paper_path() -> Path:
    """``config/paper_results.csv`` of the working directory, else of the project checkout."""
    if DEFAULT_PAPER.is_file():
        return DEFAULT_PAPER
    return Path(__file__).resolve().parents[2] / DEFAULT_PAPER


@dataclass
class Results:
    """Everything the tables and plots need, loaded once."""

    manifest: dict
    runs: pd.DataFrame
    scores: pd.DataFrame
    paper: pd.DataFrame


def load_results(manifest: str | Path | dict, paper: str | Path | pd.DataFrame | None = None,
                 root: str | Path = ".") -> Results:
    """Load a manifest (path or dict), its finished runs and the published numbers."""
    man = read_manifest(manifest) if isinstance(manifest, (str, Path)) else validate_manifest(manifest)
    runs = list_runs(man, root)
    if isinstance(paper, pd.DataFrame):
        paper_df = paper
    else:
        paper_df = load_paper(paper if paper is not None else default_paper_path())
    return Results(manifest=man, runs=runs, scores=load_scores(runs), paper=paper_df)


# --------------------------------------------------------------------------------------------
# aggregation (pure)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1; NaN for n < 2) and count of finite values."""

    mean: float
    std: float
    n: int


def summarize(values: Iterable[float]) -> Summary:
    """Mean ± sample std over seeds, ignoring NaN."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(statistics.fmean(vals), statistics.stdev(vals) if n > 1 else math.nan, n)


@dataclass(frozen=True)
class PairedStats:
    """A − B over paired seeds: mean difference, its t-based CI, and the paired t-test."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t: float
    p: float


def paired_stats(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedStats:
    """Paired comparison of equal-length samples (same seeds, same order).

    CI = mean ± t_{(1+level)/2, n-1} · sd / √n; t and p from ``scipy.stats.ttest_rel`` (two-sided).
    With n < 2 only the means (and the single difference) are defined; the rest is NaN.
    """
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired samples must have the same length")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if not (math.isnan(float(x)) or math.isnan(float(y)))]
    n = len(pairs)
    if n == 0:
        return PairedStats(0, *([math.nan] * 8))
    xa = [p[0] for p in pairs]
    xb = [p[1] for p in pairs]
    diffs = [x - y for x, y in pairs]
    mean_diff = statistics.fmean(diffs)
    if n < 2:
        return PairedStats(n, statistics.fmean(xa), statistics.fmean(xb), mean_diff, *([math.nan] * 5))
    sd = statistics.stdev(diffs)
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # zero-variance differences: t = ±inf or NaN
        res = stats.ttest_rel(xa, xb)
    return PairedStats(n, statistics.fmean(xa), statistics.fmean(xb), mean_diff, sd, mean_diff - half,
                       mean_diff + half, float(res.statistic), float(res.pvalue))


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def published_for(paper: pd.DataFrame, method: str, backbone: str,
                  setting: str = "unsup") -> tuple[dict[str, float], str]:
    """Published task -> value (NaN where the source gives none) and its source, for one row."""
    if paper is None or paper.empty or method == BASE:
        return {t: math.nan for t in ALL_TASKS}, ""
    hit = paper[(paper["method"].map(_norm) == _norm(method)) & (paper["backbone"].map(_norm) == _norm(backbone))
                & (paper["setting"].fillna(setting).map(_norm) == _norm(setting))]
    if hit.empty:
        return {t: math.nan for t in ALL_TASKS}, ""
    row = hit.iloc[0]
    source = row["source"] if isinstance(row["source"], str) else ""
    return {t: float(row[t]) for t in ALL_TASKS}, source


def _ordered_unique(values: Iterable[Any]) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def backbone_order(runs: pd.DataFrame) -> list[str]:
    """Backbones in manifest order: as first listed among runs, then base-only ones."""
    return _ordered_unique(list(runs.loc[runs["group"] != "base", "backbone"]) + list(runs["backbone"]))


def method_label(manifest: dict, method: str) -> str:
    if method == BASE:
        return BASE_LABEL
    return str(manifest["labels"]["methods"].get(method, method))


def backbone_label(manifest: dict, backbone: str) -> str:
    return str(manifest["labels"]["backbones"].get(backbone, backbone))


def summarize_row(runs: pd.DataFrame, scores: pd.DataFrame, method: str, backbone: str,
                  groups: Sequence[str]) -> dict:
    """Seeds expected/found/missing and per-task Summary for one (method, backbone) over ``groups``."""
    listed = runs[(runs["method"] == method) & (runs["backbone"] == backbone) & runs["group"].isin(groups)]
    expected = _ordered_unique(listed["seed"])
    found = _ordered_unique(listed.loc[listed["exists"], "seed"])
    missing = [s for s in expected if s not in found]
    sel = scores[(scores["method"] == method) & (scores["backbone"] == backbone) & scores["group"].isin(groups)]
    sel = sel.drop_duplicates(subset=["seed", "task"], keep="first")
    per_task = {t: summarize(sel.loc[sel["task"] == t, "score"]) for t in ALL_TASKS}
    return {"expected": expected, "found": found, "missing": missing, "summary": per_task}


def _fmt_seeds(seeds: Sequence[Any]) -> str:
    return ", ".join(str(s) for s in seeds)


def _row_record(res: Results, method: str, backbone: str, groups: Sequence[str]) -> dict:
    """One table row as a flat dict (numbers plus the formatted ``mean ± std`` cells)."""
    info = summarize_row(res.runs, res.scores, method, backbone, groups)
    pub, source = published_for(res.paper, method, backbone)
    released = tuple(groups) == ("released",)
    is_base = method == BASE or released  # one evaluation, no seeds
    label = method_label(res.manifest, method) + (" (released)" if released else "")
    rec: dict[str, Any] = {
        "row_type": "released" if released else ("base" if method == BASE else "run"), "method": method,
        "backbone": backbone, "method_label": label, "backbone_label": backbone_label(res.manifest, backbone),
        "n": len(info["found"]), "expected": len(info["expected"]),
        "seeds": f"{len(info['found'])}/{len(info['expected'])}",
        "found_seeds": "" if is_base else _fmt_seeds(info["found"]),
        "missing_seeds": "" if is_base else _fmt_seeds(info["missing"]),
    }
    for task in ALL_TASKS:
        s = info["summary"][task]
        rec[task] = format_cell(s, single_is_exact=is_base)
        rec[f"{task}_mean"] = s.mean
        rec[f"{task}_std"] = s.std
    for task in ALL_TASKS:
        rec[f"pub_{task}"] = pub[task]
    for task in ALL_TASKS:
        rec[f"diff_{task}"] = info["summary"][task].mean - pub[task]
    rec["pub_source"] = source
    return rec


def format_cell(s: Summary, digits: int = 2, single_is_exact: bool = False) -> str:
    """``mean ± std``; std as '–' for one seed; '—' when nothing exists."""
    if s.n == 0 or math.isnan(s.mean):
        return MISSING
    if s.n == 1:
        return f"{s.mean:.{digits}f}" if single_is_exact else f"{s.mean:.{digits}f} ± {NO_STD}"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def main_table(res: Results) -> pd.DataFrame:
    """Rows per backbone: the base row, released checkpoints, then every method of group 'main'."""
    runs = res.runs
    records = []
    for backbone in backbone_order(runs):
        if ((runs["group"] == "base") & (runs["backbone"] == backbone)).any():
            records.append(_row_record(res, BASE, backbone, ("base",)))
        released = runs[(runs["group"] == "released") & (runs["backbone"] == backbone)]
        for method in _ordered_unique(released["method"]):
            records.append(_row_record(res, method, backbone, ("released",)))
        main = runs[(runs["group"] == "main") & (runs["backbone"] == backbone)]
        for method in _ordered_unique(main["method"]):
            records.append(_row_record(res, method, backbone, ("main",)))
    return pd.DataFrame(records, columns=_summary_columns())


def ablation_table(res: Results) -> pd.DataFrame:
    """Ablation rows per backbone after the reference method's row, with ``ref_diff_<task>`` = row − ref."""
    runs = res.runs
    ref = res.manifest["ablation_reference"]
    records = []
    for backbone in backbone_order(runs):
        abl = runs[(runs["group"] == "ablation") & (runs["backbone"] == backbone) & (runs["method"] != ref)]
        if abl.empty:
            continue
        ref_rec = _row_record(res, ref, backbone, COMPARED_GROUPS)
        ref_rec["reference"] = ref
        for task in ALL_TASKS:
            ref_rec[f"ref_diff_{task}"] = math.nan
        records.append(ref_rec)
        for method in _ordered_unique(abl["method"]):
            rec = _row_record(res, method, backbone, ("ablation",))
            rec["reference"] = ref
            for task in ALL_TASKS:
                rec[f"ref_diff_{task}"] = rec[f"{task}_mean"] - ref_rec[f"{task}_mean"]
            records.append(rec)
    columns = _summary_columns() + ["reference"] + [f"ref_diff_{t}" for t in ALL_TASKS]
    return pd.DataFrame(records, columns=columns)


def _summary_columns() -> list[str]:
    cols = ["row_type", "method", "backbone", "method_label", "backbone_label", "n", "expected", "seeds",
            "found_seeds", "missing_seeds"]
    for task in ALL_TASKS:
        cols += [task, f"{task}_mean", f"{task}_std"]
    cols += [f"pub_{t}" for t in ALL_TASKS] + [f"diff_{t}" for t in ALL_TASKS] + ["pub_source"]
    return cols


PAIRED_COLUMNS = ["a", "b", "a_label", "b_label", "backbone", "backbone_label", "task", "n", "seeds", "mean_a",
                  "mean_b", "mean_diff", "sd_diff", "ci_low", "ci_high", "t", "p", "note"]
NEED_TWO = "n/a (need ≥2 paired seeds)"


def paired_table(res: Results) -> pd.DataFrame:
    """Tidy paired comparison: one row per (pair, backbone, task) over the seeds finished for both."""
    runs, scores = res.runs, res.scores
    comp = scores[scores["group"].isin(COMPARED_GROUPS)].drop_duplicates(
        subset=["method", "backbone", "seed", "task"], keep="first")
    listed = runs[runs["group"].isin(COMPARED_GROUPS)]
    records = []
    for a, b in res.manifest["paired"]:
        for backbone in backbone_order(runs):
            has = set(listed.loc[listed["backbone"] == backbone, "method"])
            if a not in has or b not in has:
                continue
            sa = comp[(comp["method"] == a) & (comp["backbone"] == backbone)]
            sb = comp[(comp["method"] == b) & (comp["backbone"] == backbone)]
            seeds_a = _ordered_unique(sa["seed"])
            shared = [s for s in seeds_a if s in set(sb["seed"])]
            shared = sorted(shared, key=lambda s: (str(type(s)), s))
            for task in ALL_TASKS:
                xa = [_score(sa, s, task) for s in shared]
                xb = [_score(sb, s, task) for s in shared]
                st = paired_stats(xa, xb)
                records.append({
                    "a": a, "b": b, "a_label": method_label(res.manifest, a), "b_label": method_label(res.manifest, b),
                    "backbone": backbone, "backbone_label": backbone_label(res.manifest, backbone), "task": task,
                    "n": st.n, "seeds": _fmt_seeds(shared), "mean_a": st.mean_a, "mean_b": st.mean_b,
                    "mean_diff": st.mean_diff, "sd_diff": st.sd_diff, "ci_low": st.ci_low, "ci_high": st.ci_high,
                    "t": st.t, "p": st.p, "note": "" if st.n >= 2 else NEED_TWO})
    return pd.DataFrame(records, columns=PAIRED_COLUMNS)


def _score(frame: pd.DataFrame, seed: Any, task: str) -> float:
    hit = frame.loc[(frame["seed"] == seed) & (frame["task"] == task), "score"]
    return float(hit.iloc[0]) if len(hit) else math.nan


def paired_caption(rows: pd.DataFrame) -> str:
    """One plain-English line for a (pair, backbone) block, from its ``avg`` row."""
    r = rows[rows["task"] == "avg"].iloc[0]
    head = f"{r['a_label']} − {r['b_label']} on {r['backbone_label']}"
    n = int(r["n"])
    if n == 0:
        return f"{head}: {NEED_TWO}; no seed finished for both yet."
    if n < 2:
        return (f"{head} over 1 shared seed ({r['seeds']}): {r['mean_diff']:+.2f} avg STS; CI and test "
                f"{NEED_TWO}.")
    return (f"{head} over {n} shared seeds: {r['mean_diff']:+.2f} avg STS "
            f"(95% CI [{r['ci_low']:.2f}, {r['ci_high']:.2f}]), paired t = {_fmt_t(r['t'])}, p = {_fmt_p(r['p'])}.")


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------

def _num(x: float, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_t(t: float) -> str:
    return "n/a" if math.isnan(t) else f"{t:.2f}"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 1e-3 else f"{p:.3f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep[a] for a in align) + " |"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


SUMMARY_CAPTION = ("Spearman correlation × 100 on the STS test sets (\"all\" setting), mean ± sample std over "
                   "finished seeds (– = one seed, — = not finished yet). Seeds: finished/expected. "
                   "Δ = our mean − published.")


def _summary_rows(table: pd.DataFrame, reference: bool, tex: bool) -> tuple[list[list[str]], list[str]]:
    """Cells for md/tex plus footnotes on missing seeds; adds a 'published' line where per-task numbers exist."""
    rows: list[list[str]] = []
    notes: list[str] = []
    pm = (lambda c: c.replace(" ± ", r" $\pm$ ").replace(NO_STD, "--").replace(MISSING, "---")) if tex else (lambda c: c)
    esc = _tex_escape if tex else (lambda c: c)
    prev_backbone = None
    for r in table.to_dict("records"):
        bb = esc(r["backbone_label"]) if r["backbone"] != prev_backbone else ""
        prev_backbone = r["backbone"]
        cells = [bb, esc(r["method_label"])] + [pm(r[t]) for t in ALL_TASKS]
        cells += [_num(r["pub_avg"]), _num(r["diff_avg"], signed=True)]
        if reference:
            cells.append(_num(r["ref_diff_avg"], signed=True) if r["method"] != r["reference"] else "(ref.)")
        seeds = r["seeds"]
        if r["row_type"] == "run" and r["n"] < r["expected"]:
            notes.append(f"{r['method_label']} / {r['backbone_label']}: missing seed(s) {r['missing_seeds']}"
                         + (" (no finished runs yet)" if r["n"] == 0 else ""))
            seeds += "*"
        elif r["row_type"] in ("base", "released") and r["n"] == 0:
            notes.append(f"{r['method_label']} / {r['backbone_label']}: not evaluated yet")
            seeds += "*"
        cells.append(seeds)
        rows.append(cells)
        if any(not math.isnan(r[f"pub_{t}"]) for t in TASKS):
            label = r"\quad \emph{published}" if tex else "↳ published"
            pub_cells = ["", label] + [_num(r[f"pub_{t}"]) for t in ALL_TASKS] + ["", ""]
            rows.append(pub_cells + ([""] if reference else []) + [""])
    return rows, notes


def _summary_header(reference: bool, tex: bool) -> list[str]:
    delta = r"$\Delta$" if tex else "Δ"
    head = ["Backbone", "Method"] + [TASK_LABELS[t] for t in ALL_TASKS] + ["Pub. avg.", f"{delta} avg."]
    if reference:
        head.append(f"{delta} vs ref.")
    return head + ["Seeds"]


def render_summary_md(table: pd.DataFrame, title: str, reference: bool = False, empty_note: str = "") -> str:
    """Markdown for the main/ablation tables, with a 'published' line and missing-seed footnotes."""
    lines = [f"# {title}", "", SUMMARY_CAPTION, ""]
    if reference and not table.empty:
        ref = table["reference"].iloc[0]
        lines += [f"Δ vs ref. = ablation mean avg − {table['method_label'][table['method'] == ref].iloc[0]} "
                  "mean avg on the same backbone.", ""]
    if table.empty:
        lines.append(empty_note or "No runs configured.")
        return "\n".join(lines) + "\n"
    rows, notes = _summary_rows(table, reference, tex=False)
    rows = [[c[:-1] + "\\*" if j == len(r) - 1 and c.endswith("*") else c for j, c in enumerate(r)] for r in rows]
    header = _summary_header(reference, tex=False)
    lines += _md_table(header, rows, ["l", "l"] + ["r"] * (len(header) - 2))
    sources = _ordered_unique(s for s in table["pub_source"] if s)
    if notes:
        lines += ["", "\\* Incomplete rows:", ""] + [f"- {n}" for n in notes]
    if sources:
        lines += ["", "Published numbers: " + "; ".join(sources) + "."]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "±": r"$\pm$", "×": r"$\times$", "−": "$-$", "–": "--", "—": "---", "Δ": r"$\Delta$", "≥": r"$\geq$"}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _tex_tabular(header: Sequence[str], rows: Sequence[Sequence[str]], align: str, notes: Sequence[str],
                 comment: str, breaks_before: Sequence[int] = ()) -> str:
    out = [f"% {comment}", "% requires \\usepackage{booktabs}", f"\\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(header) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        if i in breaks_before and i > 0:
            out.append(r"\midrule")
        out.append(" & ".join(row) + r" \\")
    out.append(r"\bottomrule")
    for note in notes:
        out.append(rf"\multicolumn{{{len(header)}}}{{l}}{{\footnotesize {note}}} \\")
    out.append(r"\end{tabular}")
    return "\n".join(out) + "\n"


def render_summary_tex(table: pd.DataFrame, reference: bool = False) -> str:
    """Booktabs LaTeX (a bare ``tabular`` to ``\\input`` inside a table environment)."""
    header = _summary_header(reference, tex=True)
    align = "ll" + "r" * (len(header) - 2)
    if table.empty:
        return _tex_tabular(header, [], align, ["No runs configured."], _tex_escape(SUMMARY_CAPTION))
    rows, notes = _summary_rows(table, reference, tex=True)
    breaks = [i for i, r in enumerate(rows) if r[0]]
    sources = _ordered_unique(s for s in table["pub_source"] if s)
    tex_notes = ["$^*$ " + _tex_escape(n) for n in notes]
    if sources:
        tex_notes.append(_tex_escape("Published: " + "; ".join(sources) + "."))
    rows = [[c.replace("*", "$^*$") if j == len(r) - 1 else c for j, c in enumerate(r)] for r in rows]
    return _tex_tabular(header, rows, align, tex_notes, _tex_escape(SUMMARY_CAPTION), breaks)


def _paired_blocks(paired: pd.DataFrame) -> list[pd.DataFrame]:
    keys = _ordered_unique(zip(paired["a"], paired["b"], paired["backbone"]))
    return [paired[(paired["a"] == a) & (paired["b"] == b) & (paired["backbone"] == bb)] for a, b, bb in keys]


def _paired_cells(r: dict, tex: bool) -> list[str]:
    na = "n/a"
    ok = r["n"] >= 2
    ci = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if ok else na
    t = _fmt_t(r["t"]) if ok else na
    p = _fmt_p(r["p"]) if ok else na
    if tex:
        p = p.replace("<", r"$<$")
    return [TASK_LABELS[r["task"]], _num(r["mean_a"]) or MISSING, _num(r["mean_b"]) or MISSING,
            _num(r["mean_diff"], signed=True) or MISSING, ci, t, p]


def render_paired_md(paired: pd.DataFrame) -> str:
    """A caption sentence and a per-task table for each (A, B, backbone)."""
    lines = ["# Paired comparison over shared seeds", "",
             "Δ = A − B per seed, averaged over the seeds finished for both; 95% CI from the t distribution "
             "(t₀.₉₇₅,ₙ₋₁ · sd/√n); paired two-sided t-test (scipy.stats.ttest_rel). "
             f"With fewer than two shared seeds the CI and test are {NEED_TWO}.", ""]
    if paired.empty:
        lines.append("No paired comparison configured (or neither method is listed on a common backbone).")
        return "\n".join(lines) + "\n"
    for block in _paired_blocks(paired):
        first = block.iloc[0]
        lines += [f"## {first['a_label']} − {first['b_label']}, {first['backbone_label']}", "",
                  paired_caption(block), ""]
        if int(first["n"]) > 0:
            lines.append(f"Shared seeds: {first['seeds']}.")
            lines.append("")
            header = ["Task", str(first["a_label"]), str(first["b_label"]), "Δ (A − B)", "95% CI", "t", "p"]
            lines += _md_table(header, [_paired_cells(r, tex=False) for r in block.to_dict("records")],
                               ["l"] + ["r"] * 6)
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def render_paired_tex(paired: pd.DataFrame) -> str:
    """Booktabs LaTeX: one block of task rows per (A − B, backbone)."""
    header = ["Comparison", "Backbone", "n", "Task", "A", "B", r"$\Delta$ (A$-$B)", r"95\% CI", "$t$", "$p$"]
    rows: list[list[str]] = []
    breaks: list[int] = []
    notes: list[str] = []
    for block in _paired_blocks(paired):
        first = block.iloc[0]
        breaks.append(len(rows))
        for k, r in enumerate(block.to_dict("records")):
            lead = ([_tex_escape(f"{r['a_label']} − {r['b_label']}"), _tex_escape(r["backbone_label"]), str(r["n"])]
                    if k == 0 else ["", "", ""])
            rows.append(lead + [_tex_escape(c) if j < 1 else c.replace(MISSING, "---")
                                for j, c in enumerate(_paired_cells(r, tex=True))])
        notes.append(_tex_escape(paired_caption(block)))
    if not rows:
        notes = ["No paired comparison configured."]
    return _tex_tabular(header, rows, "llrlrrrlrr", notes,
                        "Paired comparison over shared seeds; 95% CI from t distribution; paired t-test".replace(
                            "%", r"\%"), breaks)


def write_tables(res: Results, out_dir: str | Path) -> list[Path]:
    """Write main/ablation/paired as .md, .csv and .tex (atomically); return the paths."""
    out_dir = Path(out_dir)
    written: list[Path] = []

    def put(name: str, text: str) -> None:
        path = out_dir / name
        write_text_atomic(path, text)
        written.append(path)

    main = main_table(res)
    put("main.md", render_summary_md(main, "Main results: average STS"))
    put("main.csv", main.to_csv(index=False))
    put("main.tex", render_summary_tex(main))
    abl = ablation_table(res)
    put("ablation.md", render_summary_md(abl, f"Ablations (reference: {method_label(res.manifest, res.manifest['ablation_reference'])})",
                                         reference=True, empty_note="No ablation runs configured."))
    put("ablation.csv", abl.to_csv(index=False))
    put("ablation.tex", render_summary_tex(abl, reference=True))
    paired = paired_table(res)
    put("paired.md", render_paired_md(paired))
    put("paired.csv", paired.to_csv(index=False))
    put("paired.tex", render_paired_tex(paired))
    return written


# --------------------------------------------------------------------------------------------
# plotting
# --------------------------------------------------------------------------------------------

FIG_WIDTH = 6.5   # inches: a paper's text width
PNG_DPI = 200     # raster resolution (PDF is vector)
_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
       "legend.fontsize": 8, "figure.titlesize": 9, "pdf.fonttype": 42, "ps.fonttype": 42,
       "axes.spines.top": False, "axes.spines.right": False}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Save ``fig`` as STEM.png and STEM.pdf atomically, then close it."""
    out_dir = Path(out_dir)
    paths = []
    for fmt in ("png", "pdf"):
        path = out_dir / f"{stem}.{fmt}"
        with atomic_path(path, suffix="." + fmt) as tmp:
            fig.savefig(tmp, format=fmt, dpi=PNG_DPI)
        paths.append(path)
    _plt().close(fig)
    return paths


def _empty_figure(title: str, message: str = "no finished runs yet"):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(FIG_WIDTH, 2.0), layout="constrained")
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, transform=ax.transAxes)
    fig.suptitle(title)
    return fig


def _partial_note(listed: pd.DataFrame) -> str:
    done, total = int(listed["exists"].sum()), len(listed)
    return "" if done == total else f"\n(partial: {done}/{total} runs finished; missing runs skipped)"


def _method_colors(methods: Sequence[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _grid(n_panels: int, per_row: int, row_height: float):
    plt = _plt()
    ncols = max(1, min(per_row, n_panels))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(FIG_WIDTH, row_height * nrows), squeeze=False,
                             layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.axis("off")
    return fig, flat[:n_panels]


def plot_avg_sts(res: Results, out_dir: str | Path) -> list[Path]:
    """Average STS per method, one panel per backbone: seeds as dots, mean ± std, published stars.

    The untrained base row is drawn as a dashed line when it lies near the trained runs and
    written as text otherwise (it is far below and would flatten the seed spread).
    """
    plt = _plt()
    from matplotlib.lines import Line2D

    runs, scores = res.runs, res.scores
    avg = scores[(scores["task"] == "avg") & scores["group"].isin(("main", "base"))]
    title = "Average STS (Spearman × 100, seven test sets)"
    with plt.rc_context(_RC):
        if avg.empty:
            return _save(_empty_figure(title), out_dir, "avg_sts")
        main_runs = runs[runs["group"] == "main"]
        backbones = [b for b in backbone_order(runs)
                     if b in set(runs.loc[runs["group"].isin(("main", "base")), "backbone"])]
        methods = _ordered_unique(main_runs["method"])
        colors = _method_colors(methods)
        fig, axes = _grid(len(backbones), per_row=4, row_height=2.8)
        handles: dict[str, Any] = {}
        for ax, backbone in zip(axes, backbones):
            bb_methods = _ordered_unique(main_runs.loc[main_runs["backbone"] == backbone, "method"])
            lo, hi = math.inf, -math.inf
            for x, method in enumerate(bb_methods):
                vals = avg.loc[(avg["method"] == method) & (avg["backbone"] == backbone) & (avg["group"] == "main"),
                               "score"].dropna().to_numpy()
                c = colors[method]
                if len(vals):
                    jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
                    ax.scatter(x + jitter, vals, s=14, color=c, alpha=0.75, zorder=3, edgecolors="none")
                    s = summarize(vals)
                    ax.errorbar(x + 0.28, s.mean, yerr=0 if s.n < 2 else s.std, fmt="_", ms=12, mew=1.6, color=c,
                                capsize=2.5, zorder=4)
                    handles["seed"] = Line2D([], [], ls="", marker="o", ms=4, color="grey")
                    handles["mean ± std"] = Line2D([], [], ls="", marker="_", ms=12, mew=1.6, color="grey")
                    lo, hi = min(lo, vals.min()), max(hi, vals.max())
                else:
                    ax.text(x, 0.02, "not\nfinished", ha="center", va="bottom", fontsize=7, color="grey",
                            transform=ax.get_xaxis_transform())
                pub = published_for(res.paper, method, backbone)[0]["avg"]
                if not math.isnan(pub):
                    ax.scatter([x + 0.28], [pub], marker="*", s=60, color="black", zorder=5)
                    handles["published"] = Line2D([], [], ls="", marker="*", ms=8, color="black")
                    lo, hi = min(lo, pub), max(hi, pub)
            base = avg.loc[(avg["method"] == BASE) & (avg["backbone"] == backbone), "score"].dropna()
            if not math.isfinite(lo):   # nothing trained here yet: scale on the base value alone
                if len(base):
                    lo = hi = float(base.iloc[0])
                else:
                    lo, hi = 0.0, 100.0
            span = max(hi - lo, 1.0)
            ylo, yhi = lo - 0.25 * span, hi + 0.25 * span
            if len(base):
                b = float(base.iloc[0])
                if ylo - 2 * span <= b <= yhi:
                    ylo = min(ylo, b - 0.1 * span)
                    handles[BASE_LABEL] = ax.axhline(b, color="grey", ls="--", lw=1, label=BASE_LABEL, zorder=1)
                else:
                    ax.text(0.03, 0.03, f"untrained: {b:.2f} ↓", fontsize=7, color="dimgrey",
                            transform=ax.transAxes, va="bottom", ha="left")
            ax.set_ylim(ylo, yhi)
            ax.set_xlim(-0.6, max(len(bb_methods), 1) - 0.4)
            ax.set_xticks(range(len(bb_methods)))
            ax.set_xticklabels([method_label(res.manifest, m) for m in bb_methods], rotation=30, ha="right")
            ax.set_title(backbone_label(res.manifest, backbone))
            ax.grid(axis="y", lw=0.4, alpha=0.5)
        axes[0].set_ylabel("avg. STS")
        fig.suptitle(title + _partial_note(runs[runs["group"].isin(("main", "base"))]))
        if handles:
            fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=len(handles),
                       frameon=False)
        return _save(fig, out_dir, "avg_sts")


def read_curves(run_dir: str | Path) -> dict[str, Any]:
    """train_log / eval_log frames (or None) and the clustering start step (run.json, else train_log)."""
    run_dir = Path(run_dir)
    train = pd.read_csv(run_dir / "train_log.csv") if (run_dir / "train_log.csv").is_file() else None
    evals = pd.read_csv(run_dir / "eval_log.csv") if (run_dir / "eval_log.csv").is_file() else None
    start = None
    if (run_dir / "run.json").is_file():
        try:
            start = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("clustering_start_step")
        except json.JSONDecodeError:
            start = None
    if start is None and train is not None and {"clustering_started", "step"} <= set(train.columns):
        on = train.loc[train["clustering_started"].astype(float) > 0, "step"]
        start = int(on.iloc[0]) if len(on) else None
    return {"train": train, "eval": evals, "clustering_start": start}


def _mean_curve(frames: list[pd.DataFrame], column: str, smooth: int = 1) -> pd.DataFrame | None:
    """Per-step mean, min and max of ``column`` over seeds (each seed smoothed first)."""
    parts = []
    for f in frames:
        if f is None or column not in f.columns or "step" not in f.columns or f.empty:
            continue
        g = f[["step", column]].dropna().sort_values("step")
        if smooth > 1:
            g[column] = g[column].rolling(smooth, min_periods=1).mean()
        parts.append(g)
    if not parts:
        return None
    agg = pd.concat(parts).groupby("step")[column].agg(["mean", "min", "max"]).reset_index()
    if len(agg) > 1500:   # keep vector output light
        agg = agg.iloc[:: math.ceil(len(agg) / 1500)]
    return agg


def plot_training_curves(res: Results, out_dir: str | Path) -> list[Path]:
    """Rows = backbones, columns = loss / STS-B dev / average cosine; a line per method (mean over
    seeds, band = min–max), dotted verticals at each seed's clustering start step."""
    plt = _plt()
    from matplotlib.lines import Line2D

    runs = res.runs
    title = "Training curves"
    listed = runs[runs["group"].isin(COMPARED_GROUPS)]
    done = listed[listed["exists"]]
    with plt.rc_context(_RC):
        if done.empty:
            return _save(_empty_figure(title), out_dir, "training_curves")
        curves = {row.dir: read_curves(row.dir) for row in done.itertuples(index=False)}
        backbones = [b for b in backbone_order(runs) if b in set(done["backbone"])]
        methods = _ordered_unique(listed["method"])
        colors = _method_colors(methods)
        metrics = [("train", "loss", "training loss"), ("eval", "stsb_dev", "STS-B dev (Spearman)"),
                   ("train", "avg_cos", "average cosine")]
        fig, axes = plt.subplots(len(backbones), 3, figsize=(FIG_WIDTH, 1.9 * len(backbones) + 0.8), squeeze=False,
                                 layout="constrained")
        handles: dict[str, Any] = {}
        for i, backbone in enumerate(backbones):
            sub = done[done["backbone"] == backbone]
            for method in _ordered_unique(sub["method"]):
                dirs = list(sub.loc[sub["method"] == method, "dir"])
                c = colors[method]
                label = method_label(res.manifest, method)
                for j, (kind, col, _) in enumerate(metrics):
                    frames = [curves[d][kind] for d in dirs]
                    n_steps = max((len(f) for f in frames if f is not None), default=0)
                    smooth = max(1, n_steps // 50) if col == "loss" else 1
                    agg = _mean_curve(frames, col, smooth)
                    ax = axes[i][j]
                    if agg is None:
                        continue
                    (line,) = ax.plot(agg["step"], agg["mean"], color=c, lw=1.1, label=label)
                    handles.setdefault(label, line)
                    if len(dirs) > 1:
                        ax.fill_between(agg["step"], agg["min"], agg["max"], color=c, alpha=0.15, lw=0)
                    for d in dirs:
                        start = curves[d]["clustering_start"]
                        if start is not None:
                            ax.axvline(float(start), color=c, ls=":", lw=1)
                            handles.setdefault("clustering start (per seed)",
                                               Line2D([], [], color="grey", ls=":", lw=1))
            for j, (_, _, ylabel) in enumerate(metrics):
                ax = axes[i][j]
                ax.set_ylabel(ylabel)
                ax.grid(lw=0.4, alpha=0.5)
                if i == len(backbones) - 1:
                    ax.set_xlabel("step")
            axes[i][0].set_title(backbone_label(res.manifest, backbone), loc="left")
        fig.suptitle(f"{title}: mean over seeds (band = min–max), loss as a rolling mean{_partial_note(listed)}")
        if handles:
            fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                       ncol=min(len(handles), 5), frameon=False)
        return _save(fig, out_dir, "training_curves")


def plot_sensitivity(res: Results, out_dir: str | Path) -> list[Path]:
    """Avg STS against each swept hyperparameter (mean ± std over seeds, seeds as dots).

    Writes nothing (returns []) when the manifest lists no sweep runs.
    """
    plt = _plt()
    runs, scores = res.runs, res.scores
    sweep = runs[runs["group"] == "sweep"]
    if sweep.empty:
        return []
    title = "Sensitivity of average STS"
    avg = scores[(scores["group"] == "sweep") & (scores["task"] == "avg")]
    with plt.rc_context(_RC):
        if avg.empty:
            return _save(_empty_figure(title), out_dir, "sensitivity")
        params = _ordered_unique(sweep["sweep_param"])
        fig, axes = _grid(len(params), per_row=2, row_height=2.8)
        lines_keys = _ordered_unique(zip(sweep["method"], sweep["backbone"]))
        cmap = plt.get_cmap("tab10")
        colors = {k: cmap(i % 10) for i, k in enumerate(lines_keys)}
        handles: dict[str, Any] = {}
        for ax, param in zip(axes, params):
            sub = avg[avg["sweep_param"] == param]
            for key in lines_keys:
                pts = sub[(sub["method"] == key[0]) & (sub["backbone"] == key[1])]
                if pts.empty:
                    continue
                label = f"{method_label(res.manifest, key[0])}, {backbone_label(res.manifest, key[1])}"
                values = sorted(_ordered_unique(pts["sweep_value"]), key=float)
                xs = np.array([float(v) for v in values])
                summ = [summarize(pts.loc[pts["sweep_value"] == v, "score"]) for v in values]
                means = np.array([s.mean for s in summ])
                stds = np.array([0.0 if s.n < 2 else s.std for s in summ])
                c = colors[key]
                h = ax.errorbar(xs, means, yerr=stds, color=c, marker="o", ms=4, lw=1.2, capsize=2.5, label=label)
                handles.setdefault(label, h)
                ax.scatter([float(v) for v in pts["sweep_value"]], pts["score"], s=9, color=c, alpha=0.5,
                           edgecolors="none", zorder=3)
            all_x = [float(v) for v in sweep.loc[sweep["sweep_param"] == param, "sweep_value"]]
            if all_x and min(all_x) > 0 and max(all_x) / min(all_x) >= 8:
                ax.set_xscale("log", base=2)
            ticks = sorted(set(all_x))
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel(SWEEP_LABELS.get(str(param), str(param)))
            ax.set_ylabel("avg. STS (mean ± std)")
            ax.grid(lw=0.4, alpha=0.5)
        fig.suptitle(title + _partial_note(sweep))
        if handles:
            fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                       ncol=min(len(handles), 3), frameon=False)
        return _save(fig, out_dir, "sensitivity")


def write_plots(res: Results, out_dir: str | Path) -> list[Path]:
    """All figures: avg_sts, training_curves, and sensitivity when sweep runs are listed."""
    return plot_avg_sts(res, out_dir) + plot_training_curves(res, out_dir) + plot_sensitivity(res, out_dir)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clusterns.report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("tables", "main/ablation/paired tables as .md, .csv and .tex"),
                            ("plots", "avg_sts, training_curves (and sensitivity) as .png and .pdf")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--manifest", required=True, help="manifest JSON written by the workflow")
        p.add_argument("--paper", default=None, help="published numbers CSV (default: config/paper_results.csv)")
        p.add_argument("--out-dir", required=True, help="directory for the outputs")
        p.add_argument("--root", default=".", help="directory that relative run/base paths are relative to")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = load_results(args.manifest, args.paper, args.root)
        paths = write_tables(res, args.out_dir) if args.command == "tables" else write_plots(res, args.out_dir)
    except ReportError as e:
        print(f"clusterns.report: error: {e}", file=sys.stderr)
        return 2
    finished = int(res.runs["exists"].sum())
    print(f"clusterns.report {args.command}: {finished}/{len(res.runs)} results found; wrote "
          + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
