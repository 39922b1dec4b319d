"""clusterns.report: aggregation against hand-computed numbers, published-number alignment, missing
seeds, paired statistics, rendering, and plots on full, partial, empty and sweep manifests."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from clusterns import report
from clusterns.report import ALL_TASKS, TASKS

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "config" / "paper_results.csv"


# ---------------------------------------------------------------- fixtures: synthetic run dirs

def scores_for(avg_shift: float, base: float = 70.0) -> dict[str, float]:
    """Seven task scores base+0..6 shifted by ``avg_shift``; avg is their exact mean."""
    out = {t: base + i + avg_shift for i, t in enumerate(TASKS)}
    out["avg"] = sum(out[t] for t in TASKS) / len(TASKS)   # = base + 3 + shift
    out["STS12_subsets"] = {"ignored": 1.0}                   # extra keys are ignored
    return out


def make_run(run_dir: Path, scores: dict | None, steps: int = 40, start: int | None = 10) -> None:
    """A run directory; ``scores=None`` leaves sts_test.json absent (run not finished)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train = pd.DataFrame({
        "step": range(1, steps + 1),
        "loss": [2.0 / (1 + 0.1 * s) for s in range(1, steps + 1)],
        "infonce": [2.0 / (1 + 0.1 * s) for s in range(1, steps + 1)],
        "bml": [0.0] * steps,
        "avg_cos": [0.8 - 0.01 * s for s in range(1, steps + 1)],
        "clustering_started": [int(start is not None and s >= start) for s in range(1, steps + 1)],
        "n_false_negative_pairs": [0] * steps,
        "lr": [5e-5 * (1 - s / steps) for s in range(1, steps + 1)],
        "sentences_per_s": [100.0] * steps})
    train.to_csv(run_dir / "train_log.csv", index=False)
    pd.DataFrame({"step": [10, 20, 30, 40], "stsb_dev": [70.0, 75.0, 78.0, 77.0],
                  "sickr_dev": [65.0, 68.0, 70.0, 69.0], "is_best": [0, 0, 1, 0]}).to_csv(
        run_dir / "eval_log.csv", index=False)
    (run_dir / "run.json").write_text(json.dumps({"clustering_start_step": start, "best_step": 30}))
    if scores is not None:
        (run_dir / "sts_test.json").write_text(json.dumps(scores))


# avg shifts per seed (avg = 73 + shift): simcse 76.0, 76.5, 77.4 ; clusterns 77.1, 77.2, 78.6
SIMCSE_SHIFT = {42: 3.0, 43: 3.5, 44: 4.4}
CLUSTERNS_SHIFT = {42: 4.1, 43: 4.2, 44: 5.6}


def build(tmp_path: Path, *, finished: dict | None = None, sweep: bool = False, base: bool = True) -> Path:
    """Write a manifest with simcse/clusterns on bert-base (seeds 42-44), simcse on bert-large (seed 42),
    an ablation, optional sweep; ``finished`` maps (method, backbone, seed) -> shift (absent = unfinished)."""
    if finished is None:
        finished = {("simcse", "bert-base", s): v for s, v in SIMCSE_SHIFT.items()}
        finished |= {("clusterns", "bert-base", s): v for s, v in CLUSTERNS_SHIFT.items()}
        finished |= {("simcse", "bert-large", 42): 5.0, ("clusterns-no-bml", "bert-base", 42): 3.9,
                     ("clusterns-no-bml", "bert-base", 43): 4.0}
    runs = []

    def add(method, backbone, seed, group="main", sweep_spec=None, name=None):
        rel = f"results/runs/{name or method}/{backbone}/seed{seed}"
        shift = finished.get((name or method, backbone, seed))
        make_run(tmp_path / rel, scores_for(shift) if shift is not None else None,
                 start=None if method == "simcse" else 10)
        entry = {"method": method, "backbone": backbone, "seed": seed, "dir": rel, "group": group}
        if sweep_spec:
            entry["sweep"] = sweep_spec
        runs.append(entry)

    for seed in (42, 43, 44):
        add("simcse", "bert-base", seed)
        add("clusterns", "bert-base", seed)
    add("simcse", "bert-large", 42)
    for seed in (42, 43):
        add("clusterns-no-bml", "bert-base", seed, group="ablation")
    if sweep:
        for k in (32, 64, 128):
            for seed in (42, 43):
                name = f"clusterns-k{k}"
                finished[(name, "bert-base", seed)] = 3.0 + k / 100 + (seed - 42) * 0.2
                add("clusterns", "bert-base", seed, group="sweep", sweep_spec={"param": "kmeans", "value": k},
                    name=name)
        for cos in (0.3, 0.4):
            name = f"clusterns-c{cos}"
            finished[(name, "bert-base", 42)] = 3.0 + cos
            add("clusterns", "bert-base", 42, group="sweep", sweep_spec={"param": "kmean_cosine", "value": cos},
                name=name)
    base_entries = []
    if base:
        path = tmp_path / "results/base/bert-base/sts_test.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores_for(-40.0)))   # avg 33.0
        base_entries = [{"backbone": "bert-base", "path": "results/base/bert-base/sts_test.json"},
                        {"backbone": "bert-large", "path": "results/base/bert-large/sts_test.json"}]  # not yet
    manifest = {"runs": runs, "base": base_entries, "paired": [["clusterns", "simcse"]],
                "ablation_reference": "clusterns",
                "labels": {"methods": {"simcse": "SimCSE", "clusterns": "ClusterNS",
                                       "clusterns-no-bml": "ClusterNS w/o BML"},
                           "backbones": {"bert-base": "BERT-base", "bert-large": "BERT-large"}}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def load(tmp_path: Path, manifest: Path):
    return report.load_results(manifest, PAPER, root=tmp_path)


def row(table: pd.DataFrame, method: str, backbone: str) -> pd.Series:
    hit = table[(table["method"] == method) & (table["backbone"] == backbone)]
    assert len(hit) == 1, (method, backbone, table[["method", "backbone"]])
    return hit.iloc[0]


# ---------------------------------------------------------------- published numbers file

def test_paper_results_csv_has_design_numbers():
    paper = report.load_paper(PAPER)
    assert set(paper["setting"]) == {"unsup"}
    assert paper["source"].notna().all() and (paper["source"].str.len() > 10).all()

    def cell(method, backbone, col):
        hit = paper[(paper["method"] == method) & (paper["backbone"] == backbone)]
        assert len(hit) == 1
        return hit.iloc[0][col]

    expected_rows = {
        ("simcse", "bert-base"): [68.40, 82.41, 74.38, 80.91, 78.56, 76.85, 72.23, 76.25],
        ("simcse", "roberta-base"): [70.16, 81.77, 73.24, 81.36, 80.65, 80.22, 68.56, 76.57],
        ("simcse", "roberta-large"): [72.86, 83.99, 75.62, 84.77, 81.80, 81.98, 71.26, 78.90],
    }
    for (m, b), vals in expected_rows.items():
        assert [cell(m, b, t) for t in ALL_TASKS] == pytest.approx(vals, abs=1e-9)
    avg_only = {("simcse", "bert-large"): 78.41,
                ("clusterns", "bert-base"): 77.55, ("clusterns", "bert-large"): 79.19,
                ("clusterns", "roberta-base"): 77.98, ("clusterns", "roberta-large"): 79.43,
                ("clusterns-prompt", "bert-base"): 78.72, ("clusterns-prompt", "bert-large"): 80.30,
                ("clusterns-prompt", "roberta-base"): 79.74}
    for (m, b), avg in avg_only.items():
        assert cell(m, b, "avg") == pytest.approx(avg, abs=1e-9)
        assert all(math.isnan(cell(m, b, t)) for t in TASKS)
    assert len(paper) == len(expected_rows) + len(avg_only)


# ---------------------------------------------------------------- aggregation

def test_summarize_and_main_row_exact(tmp_path):
    res = load(tmp_path, build(tmp_path))
    table = report.main_table(res)
    r = row(table, "simcse", "bert-base")
    avgs = [76.0, 76.5, 77.4]                       # 73 + shifts 3.0, 3.5, 4.4
    assert r["avg_mean"] == pytest.approx(statistics.fmean(avgs), abs=1e-9)      # 76.6333...
    assert r["avg_mean"] == pytest.approx(229.9 / 3, abs=1e-9)
    # sample std by hand: deviations -0.6333, -0.1333, 0.7667 -> var = 0.99/2... computed explicitly
    dev = [a - 229.9 / 3 for a in avgs]
    assert r["avg_std"] == pytest.approx(math.sqrt(sum(d * d for d in dev) / 2), abs=1e-9)
    assert r["avg_std"] == pytest.approx(statistics.stdev(avgs), abs=1e-9)
    assert r["n"] == 3 and r["expected"] == 3 and r["seeds"] == "3/3" and r["missing_seeds"] == ""
    # STS12 = 70 + shift
    assert r["STS12_mean"] == pytest.approx(statistics.fmean([73.0, 73.5, 74.4]), abs=1e-9)
    assert r["STS12"] == f"{statistics.fmean([73.0, 73.5, 74.4]):.2f} ± {statistics.stdev([73.0, 73.5, 74.4]):.2f}"
    # published numbers aligned with this row (SimCSE paper Table 5, BERT-base)
    assert r["pub_avg"] == pytest.approx(76.25) and r["pub_STS12"] == pytest.approx(68.40)
    assert r["pub_SICKRelatedness"] == pytest.approx(72.23)
    assert r["diff_avg"] == pytest.approx(229.9 / 3 - 76.25, abs=1e-9)
    assert r["diff_STS12"] == pytest.approx(statistics.fmean([73.0, 73.5, 74.4]) - 68.40, abs=1e-9)
    c = row(table, "clusterns", "bert-base")
    assert c["pub_avg"] == pytest.approx(77.55) and math.isnan(c["pub_STS12"])
    assert c["diff_avg"] == pytest.approx(statistics.fmean([77.1, 77.2, 78.6]) - 77.55, abs=1e-9)


def test_single_seed_and_avg_only_published(tmp_path):
    res = load(tmp_path, build(tmp_path))
    r = row(report.main_table(res), "simcse", "bert-large")
    assert r["n"] == 1 and math.isnan(r["avg_std"]) and r["avg"] == "78.00 ± –"
    assert r["pub_avg"] == pytest.approx(78.41) and r["diff_avg"] == pytest.approx(78.0 - 78.41)
    assert all(math.isnan(r[f"pub_{t}"]) for t in TASKS)
    csv = pd.read_csv(io_from(report.main_table(res).to_csv(index=False)))
    big = csv[(csv["method"] == "simcse") & (csv["backbone"] == "bert-large")].iloc[0]
    assert all(pd.isna(big[f"pub_{t}"]) for t in TASKS) and big["pub_avg"] == pytest.approx(78.41)


def io_from(text: str):
    import io
    return io.StringIO(text)


def test_summarize_pure():
    s = report.summarize([1.0, 2.0, 4.0])
    assert (s.mean, s.n) == (pytest.approx(7 / 3), 3)
    assert s.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    one = report.summarize([5.0])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.std)
    none = report.summarize([])
    assert none.n == 0 and math.isnan(none.mean)
    assert report.format_cell(one) == "5.00 ± –" and report.format_cell(none) == "—"


def test_missing_seeds_marked(tmp_path):
    finished = {("simcse", "bert-base", 42): 3.0, ("simcse", "bert-base", 44): 4.0}
    res = load(tmp_path, build(tmp_path, finished=finished))
    table = report.main_table(res)
    r = row(table, "simcse", "bert-base")
    assert r["seeds"] == "2/3" and r["n"] == 2 and r["expected"] == 3
    assert r["missing_seeds"] == "43" and r["found_seeds"] == "42, 44"
    assert r["avg_mean"] == pytest.approx(76.5)
    nothing = row(table, "clusterns", "bert-base")        # listed, none finished: still a row
    assert nothing["seeds"] == "0/3" and nothing["avg"] == "—" and nothing["missing_seeds"] == "42, 43, 44"
    out = tmp_path / "tables"
    report.write_tables(res, out)
    md = (out / "main.md").read_text()
    assert "2/3\\*" in md and "missing seed(s) 43" in md and "no finished runs yet" in md
    csv = pd.read_csv(out / "main.csv")
    assert csv.loc[(csv["method"] == "simcse") & (csv["backbone"] == "bert-base"), "seeds"].item() == "2/3"


def test_base_row_and_order(tmp_path):
    res = load(tmp_path, build(tmp_path))
    table = report.main_table(res)
    assert list(zip(table["method"], table["backbone"])) == [
        ("base", "bert-base"), ("simcse", "bert-base"), ("clusterns", "bert-base"),
        ("base", "bert-large"), ("simcse", "bert-large")]
    b = row(table, "base", "bert-base")
    assert b["method_label"] == "base (untrained)" and b["avg_mean"] == pytest.approx(33.0)
    assert b["avg"] == "33.00" and b["seeds"] == "1/1" and math.isnan(b["pub_avg"])
    assert row(table, "base", "bert-large")["seeds"] == "0/1"


def test_ablation_table(tmp_path):
    res = load(tmp_path, build(tmp_path))
    abl = report.ablation_table(res)
    assert list(abl["method"]) == ["clusterns", "clusterns-no-bml"]
    r = row(abl, "clusterns-no-bml", "bert-base")
    assert r["seeds"] == "2/2" and r["avg_mean"] == pytest.approx(statistics.fmean([76.9, 77.0]))
    ref_mean = statistics.fmean([77.1, 77.2, 78.6])
    assert r["ref_diff_avg"] == pytest.approx(statistics.fmean([76.9, 77.0]) - ref_mean, abs=1e-9)
    assert math.isnan(row(abl, "clusterns", "bert-base")["ref_diff_avg"])


# ---------------------------------------------------------------- paired comparison

def expected_paired(a: list[float], b: list[float]):
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    t = mean / (sd / math.sqrt(n))
    p = 2 * stats.t.sf(abs(t), n - 1)
    return mean, mean - half, mean + half, t, p


def test_paired_stats_by_hand(tmp_path):
    res = load(tmp_path, build(tmp_path))
    paired = report.paired_table(res)
    assert set(paired["backbone"]) == {"bert-base"}       # clusterns not listed on bert-large
    avg = paired[paired["task"] == "avg"].iloc[0]
    a = [73 + CLUSTERNS_SHIFT[s] for s in (42, 43, 44)]
    b = [73 + SIMCSE_SHIFT[s] for s in (42, 43, 44)]
    mean, lo, hi, t, p = expected_paired(a, b)               # diffs 1.1, 0.7, 1.2
    assert mean == pytest.approx(1.0)
    assert avg["n"] == 3 and avg["seeds"] == "42, 43, 44"
    assert avg["mean_diff"] == pytest.approx(mean, abs=1e-9)
    assert avg["ci_low"] == pytest.approx(lo, abs=1e-9) and avg["ci_high"] == pytest.approx(hi, abs=1e-9)
    assert avg["t"] == pytest.approx(t, rel=1e-9) and avg["p"] == pytest.approx(p, rel=1e-9)
    assert avg["note"] == ""
    caption = report.paired_caption(paired[paired["backbone"] == "bert-base"])
    assert caption.startswith("ClusterNS − SimCSE on BERT-base over 3 shared seeds: +1.00 avg STS")
    assert f"[{lo:.2f}, {hi:.2f}]" in caption and f"t = {t:.2f}" in caption


def test_paired_partial_and_n_lt_2(tmp_path):
    finished = {("simcse", "bert-base", 42): 3.0, ("simcse", "bert-base", 43): 3.5,
                ("clusterns", "bert-base", 43): 4.5, ("clusterns", "bert-base", 44): 5.0}
    res = load(tmp_path, build(tmp_path, finished=finished))
    paired = report.paired_table(res)
    avg = paired[paired["task"] == "avg"].iloc[0]
    assert avg["n"] == 1 and avg["seeds"] == "43"
    assert avg["mean_diff"] == pytest.approx(1.0)
    assert all(math.isnan(avg[k]) for k in ("ci_low", "ci_high", "t", "p"))
    assert avg["note"] == "n/a (need ≥2 paired seeds)"
    out = tmp_path / "tables"
    report.write_tables(res, out)
    md = (out / "paired.md").read_text()
    assert "n/a (need ≥2 paired seeds)" in md
    st = report.paired_stats([], [])
    assert st.n == 0 and math.isnan(st.mean_diff)


def test_paired_stats_pure():
    a, b = [1.0, 2.0, 3.5, 4.0], [0.5, 2.5, 2.0, 3.0]
    st = report.paired_stats(a, b)
    mean, lo, hi, t, p = expected_paired(a, b)
    assert (st.mean_diff, st.ci_low, st.ci_high) == pytest.approx((mean, lo, hi), abs=1e-12)
    assert (st.t, st.p) == pytest.approx((t, p), rel=1e-9)


# ---------------------------------------------------------------- files and CLI

def test_cli_tables_all_formats(tmp_path, monkeypatch):
    manifest = build(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tables"
    assert report.main(["tables", "--manifest", str(manifest), "--paper", str(PAPER), "--out-dir", str(out)]) == 0
    for stem in ("main", "ablation", "paired"):
        for ext in ("md", "csv", "tex"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, (stem, ext)
    md = (out / "main.md").read_text()
    assert "| BERT-base | base (untrained) |" in md and "|  | SimCSE |" in md and "↳ published" in md and "| 68.40 |" in md
    assert "base (untrained)" in md
    tex = (out / "main.tex").read_text()
    assert r"\toprule" in tex and r"$\pm$" in tex and "±" not in tex and "\\begin{tabular}" in tex
    ptex = (out / "paired.tex").read_text()
    assert "±" not in ptex and "−" not in ptex and "≥" not in ptex
    pmd = (out / "paired.md").read_text()
    assert "ClusterNS − SimCSE on BERT-base over 3 shared seeds" in pmd
    assert not list(out.glob(".*tmp*"))


def test_cli_reports_bad_manifest(tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"runs": [{"method": "simcse", "backbone": "bert-base", "seed": 1}]}))
    assert report.main(["tables", "--manifest", str(bad), "--paper", str(PAPER), "--out-dir", str(tmp_path)]) == 2
    assert "lacks the key 'dir'" in capsys.readouterr().err


# ---------------------------------------------------------------- plots

def assert_figures(out: Path, stems):
    for stem in stems:
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


def test_plots_normal_no_sweep(tmp_path):
    res = load(tmp_path, build(tmp_path))
    out = tmp_path / "plots"
    paths = report.write_plots(res, out)
    assert_figures(out, ["avg_sts", "training_curves"])
    assert not (out / "sensitivity.png").exists() and not (out / "sensitivity.pdf").exists()
    assert len(paths) == 4


def test_plots_partial(tmp_path):
    finished = {("simcse", "bert-base", 42): 3.0, ("clusterns", "bert-base", 44): 5.0}
    res = load(tmp_path, build(tmp_path, finished=finished))
    out = tmp_path / "plots"
    report.write_plots(res, out)
    assert_figures(out, ["avg_sts", "training_curves"])


def test_plots_zero_runs(tmp_path):
    res = load(tmp_path, build(tmp_path, finished={}, base=False))
    assert not res.runs["exists"].any()
    out = tmp_path / "plots"
    assert report.main(["plots", "--manifest", str(tmp_path / "manifest.json"), "--paper", str(PAPER),
                        "--root", str(tmp_path), "--out-dir", str(out)]) == 0
    assert_figures(out, ["avg_sts", "training_curves"])
    report.write_tables(res, tmp_path / "tables")            # tables survive zero runs too
    assert "0/3\\*" in (tmp_path / "tables" / "main.md").read_text()


def test_plots_sensitivity_with_sweep(tmp_path):
    res = load(tmp_path, build(tmp_path, sweep=True))
    out = tmp_path / "plots"
    assert report.plot_sensitivity(res, out) == [out / "sensitivity.png", out / "sensitivity.pdf"]
    assert_figures(out, ["sensitivity"])
    # sweep runs do not leak into the main table
    assert row(report.main_table(res), "clusterns", "bert-base")["seeds"] == "3/3"
