"""What the short-text clustering stage costs: encoding and KMeans time per set, and the whole stage.

Runs the real evaluator (``clusterns.evaluation.cluster_eval.evaluate``: the embedding runtime at
128 tokens, scikit-learn ``KMeans(n_init=10)`` per restart) on the mirror's eight sets with the
packaged MiniLM, and reports per set the texts, K, encoding seconds (and texts/s), KMeans seconds
per restart, ACC and NMI, then the stage's wall time. ``--quick`` cuts every set to a stratified
subset of 200 texts (at least K) with one restart, for the smoke test.

    python benchmarks/clustering_eval.py [--quick] [--restarts 0 1 2] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="subsets of 200 texts per set, one restart")
    p.add_argument("--restarts", nargs="+", type=int, default=None, help="KMeans random_state per restart (default 0 1 2)")
    p.add_argument("--max-examples", type=int, default=None, help="stratified subset per set (default: full sets)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, help="write every raw number to this file")
    args = p.parse_args(argv)
    if _common.setup_torch(args) is None:
        return 1
    from clusterns.evaluation.cluster_eval import evaluate

    mirror = _common.need_mirror()
    restarts = args.restarts or ([0] if args.quick else [0, 1, 2])
    max_examples = args.max_examples or (200 if args.quick else None)
    info = _common.print_header("clustering_eval", args.device)
    t0 = time.perf_counter()
    res = evaluate(_common.minilm_path(), "cls_before_pooler", mirror, restarts=restarts, max_examples=max_examples,
                   batch_size=args.batch_size, device=args.device)
    wall = time.perf_counter() - t0
    rows = []
    for name, d in res["details"].items():
        rows.append([name, d["n"], d["k"], d["encode_seconds"], d["n"] / d["encode_seconds"],
                     _common.median(d["kmeans_seconds"]), sum(d["kmeans_seconds"]), d["acc_mean"], d["nmi_mean"]])
    meta = res["meta"]
    print(_common.table(["set", "texts", "K", "encode s", "texts/s", "KMeans s (median restart)", "KMeans s (all)",
                         "ACC", "NMI"], rows, title="## per set (MiniLM, [CLS], 128 tokens)"))
    print()
    print("## summary (clustering_eval)")
    print(_common.table(["", "value"], [
        ["texts", meta["n_texts"]], ["restarts", len(restarts)], ["encoding, s", meta["encode_seconds"]],
        ["KMeans, s", meta["kmeans_seconds"]], ["whole stage (load + encode + cluster), s", wall],
        ["ACC avg", res["avg"]], ["NMI avg", res["nmi"]["avg"]],
        ["subsampled", str(meta["subsampled"])]]))
    _common.write_json(args.json, {"machine": info, "restarts": restarts, "max_examples": max_examples,
                                   "wall_seconds": wall, "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
