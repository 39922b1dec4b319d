"""Pipeline overhead: Snakemake planning time and the tokenization stage's scaling.

1. ``snakemake -n`` on the paper grid (``config/config.yaml``) in an empty temporary workdir
   (``-s <repo>/Snakefile -d <tmp> --configfile=<repo>/config/config.yaml``): the time to parse,
   validate and plan every job; and the demo's no-op: with ``--demo-workdir DIR`` (a finished demo
   workdir; it is copied to a temporary folder with its timestamps and ``.snakemake`` metadata so
   the original is never touched), ``snakemake -n`` and a real ``snakemake --cores 1`` there,
   both of which must find nothing to do; without it, ``snakemake -n`` on ``config/demo.yaml`` in
   an empty workdir (the demo's full plan) is measured instead and the table says so. Target: each
   < 5 s. Runs are interleaved (grid, demo, demo, grid, ...); medians.
2. ``clusterns.tokenize.tokenize_to_disk`` (packaged MiniLM tokenizer, max length 32, one
   process as the default CLI) on the mirror's 11,914 Wikipedia lines replicated to 50k / 100k /
   200k lines (and 1M with ``--full``); sizes interleaved ascending then descending; sentences/s
   per size and a least-squares fit t = a + b * n (R^2, the 1M prediction).

    python benchmarks/pipeline_overhead.py [--quick] [--full] [--demo-workdir DIR] [--json FILE]

``--quick`` (CI): one round, the paper grid's ``snakemake -n`` only, tokenization at 2k / 4k / 8k lines.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_S = 5.0


def snakemake_cmd(workdir: Path, configfile: Path, *extra: str) -> list[str]:
    exe = shutil.which("snakemake")
    base = [exe] if exe else [sys.executable, "-m", "snakemake"]
    return base + ["-s", str(C.ROOT / "Snakefile"), "-d", str(workdir), *extra, f"--configfile={configfile}"]


def time_cmd(cmd: list[str], env: dict) -> tuple[float, str, int, float]:
    load0 = C.load1()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    dt = time.perf_counter() - t0
    return dt, proc.stdout + proc.stderr, proc.returncode, load0


def planned_jobs(output: str) -> str:
    """'N jobs' from snakemake's job-stats table, or 'nothing to do'."""
    if "Nothing to be done" in output:
        return "nothing to do"
    m = re.search(r"^total\s+(\d+)", output, re.M)
    return f"{m.group(1)} jobs" if m else "?"


def bench_snakemake(args, env: dict) -> list[dict]:
    cases = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-smk-"))
    try:
        grid = tmp / "grid"
        grid.mkdir()
        cases.append(("paper grid: snakemake -n (empty workdir)",
                      snakemake_cmd(grid, C.ROOT / "config" / "config.yaml", "-n")))
        if args.demo_workdir:
            src = Path(args.demo_workdir).resolve()
            demo = tmp / "demo"
            shutil.copytree(src, demo, symlinks=True)  # copy2 keeps mtimes: the copy is as up to date
            cfg = Path(args.demo_config).resolve()
            cases.append(("demo no-op: snakemake -n (finished workdir copy)", snakemake_cmd(demo, cfg, "-n")))
            cases.append(("demo no-op: snakemake --cores 1 (finished workdir copy)",
                          snakemake_cmd(demo, cfg, "--cores", "1")))
        elif not args.quick:
            demo = tmp / "demo"
            demo.mkdir()
            cases.append(("demo plan: snakemake -n (empty workdir; no finished demo given)",
                          snakemake_cmd(demo, C.ROOT / "config" / "demo.yaml", "-n")))
        results = {name: {"command": " ".join(cmd), "seconds": [], "loadavg": [], "planned": None}
                   for name, cmd in cases}
        for r in range(args.rounds):
            for name, cmd in (cases if r % 2 == 0 else list(reversed(cases))):
                dt, out, rc, load0 = time_cmd(cmd, env)
                if rc != 0:
                    raise RuntimeError(f"{name} failed (exit {rc}):\n{out[-3000:]}")
                res = results[name]
                res["seconds"].append(dt)
                res["loadavg"].append(load0)
                res["planned"] = planned_jobs(out)
                print(f"  {name}: {dt:.2f} s ({res['planned']}; load {load0:.2f})", flush=True)
        return [{"case": k, **v, "median_s": C.median(v["seconds"])} for k, v in results.items()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_tokenize(args) -> dict:
    from clusterns.tokenize import tokenize_to_disk

    src = C.need_mirror() / "wiki1m_for_simcse.txt"
    lines = src.read_text(encoding="utf-8").splitlines()
    sizes = [2_000, 4_000, 8_000] if args.quick else [50_000, 100_000, 200_000]
    if args.full:
        sizes.append(1_000_000)
    model = C.minilm_path()
    out = {n: [] for n in sizes}
    tmp = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    try:
        for n in sizes:
            (tmp / f"wiki{n}.txt").write_text("\n".join(lines[i % len(lines)] for i in range(n)) + "\n",
                                              encoding="utf-8")
        for r in range(args.rounds):
            for n in (sizes if r % 2 == 0 else list(reversed(sizes))):
                load0 = C.load1()
                t0 = time.perf_counter()
                stats = tokenize_to_disk(model, tmp / f"wiki{n}.txt", tmp / f"tok{n}", 32, num_proc=args.num_proc)
                dt = time.perf_counter() - t0
                shutil.rmtree(tmp / f"tok{n}")
                assert stats["sentences"] == n, stats
                out[n].append({"seconds": dt, "loadavg": load0})
                print(f"  tokenize {n:>9,} lines: {dt:7.2f} s = {n / dt:9,.0f} sentences/s (load {load0:.2f})",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    xs = sizes
    ys = [C.median([x["seconds"] for x in out[n]]) for n in sizes]
    k = len(xs)
    mx, my = sum(xs) / k, sum(ys) / k
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"sizes": sizes, "runs": {str(n): v for n, v in out.items()}, "median_seconds": ys,
            "fit": {"intercept_s": a, "seconds_per_sentence": b, "r2": r2, "predicted_1M_s": a + b * 1_000_000,
                    "marginal_sentences_per_s": 1 / b if b > 0 else float("nan")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-workdir", default=None, help="a finished demo workdir (copied, never modified)")
    p.add_argument("--demo-config", default=str(C.ROOT / "config" / "demo.yaml"),
                   help="the config the finished demo was run with")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    p.add_argument("--quick", action="store_true", help="one round, grid -n only, tokenization at 2k/4k/8k lines")
    p.add_argument("--full", action="store_true", help="also tokenize 1,000,000 lines")
    p.add_argument("--num-proc", type=int, default=1, help="tokenize_to_disk num_proc (the CLI default is 1)")
    p.add_argument("--skip-snakemake", action="store_true")
    p.add_argument("--skip-tokenize", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    info = C.print_header("pipeline_overhead")
    import datasets

    datasets.disable_progress_bars()
    env = dict(os.environ)
    env.setdefault("CLUSTERNS_MIRROR", str(C.MIRROR))
    result = {"machine": info, "args": vars(args)}
    if not args.skip_snakemake:
        result["snakemake"] = bench_snakemake(args, env)
    if not args.skip_tokenize:
        result["tokenize"] = bench_tokenize(args)

    print()
    print("## summary (pipeline_overhead)")
    if "snakemake" in result:
        rows = [[c["case"], c["planned"], f"{c['median_s']:.2f}", " ".join(f"{x:.2f}" for x in c["seconds"]),
                 f"{min(c['loadavg']):.1f}-{max(c['loadavg']):.1f}",
                 "met" if c["median_s"] < TARGET_S else "NOT met"] for c in result["snakemake"]]
        print(C.table(["case", "plan", "median s", "runs (s)", "load avg", f"< {TARGET_S:.0f} s"], rows,
                      "Snakemake overhead"))
        print()
    if "tokenize" in result:
        t = result["tokenize"]
        rows = [[f"{n:,}", f"{s:.2f}", f"{n / s:,.0f}",
                 f"{min(x['loadavg'] for x in t['runs'][str(n)]):.1f}-{max(x['loadavg'] for x in t['runs'][str(n)]):.1f}"]
                for n, s in zip(t["sizes"], t["median_seconds"])]
        f = t["fit"]
        print(C.table(["lines", "median s", "sentences/s", "load avg"], rows,
                      f"tokenize_to_disk (MiniLM tokenizer, max length 32, num_proc {args.num_proc})"))
        print()
        print(f"fit: t = {f['intercept_s']:.2f} s + n / {f['marginal_sentences_per_s']:,.0f} per s "
              f"(R^2 = {f['r2']:.4f}); predicted for 1,000,000 lines: {f['predicted_1M_s']:.0f} s")
    C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
