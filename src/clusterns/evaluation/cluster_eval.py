"""Short-text clustering evaluation: the paper's Table 6 (the authors' ``cluster_eval.py``).

Protocol (the official one, by default):

* eight sets, one example per line as ``<label>\\t<text>``; label = the first field minus 1, text
  = the second field (CRLF line ends, a tab before the line end and a last line without a line
  end are all read as the official loader reads them); a file whose line count, number of classes
  or format differs from what is expected is refused, naming the file and the line;
* the embedding is the last-layer [CLS] state (no pooler, no MLP) of the text cut at 128 tokens
  (``pooler: cls_before_pooler``); ``--pooler`` can ask for another one (the workflow's
  ``clustering.pooler: run`` passes the run's own evaluation pooler, needed for mean-pooled and
  prompt models);
* scikit-learn ``KMeans(n_clusters=K, n_init=10, random_state=r)`` on the raw embeddings, K = the
  number of classes; the official script runs one unseeded KMeans, we run the seeded restarts
  ``r`` of ``--restarts`` (default 0 1 2) and report each and their mean ± std;
* clustering accuracy: the best one-to-one mapping of clusters to classes (Hungarian method,
  ``scipy.optimize.linear_sum_assignment``) over a square count matrix of size max label + 1, as
  the official ``acc``; also NMI (``sklearn.metrics.normalized_mutual_info_score``), which the
  SCCL line of work reports. Both x 100.

Encoding goes through the embedding runtime (each distinct text once, length-sorted batches, no
gradient, GPU when present); loading, provenance and the command line are the evaluator contract.

CLI::

    python -m clusterns.cluster_eval --model PATH [--pooler P] --data DIR --output FILE.json \\
        [--restarts 0 1 2] [--max-examples N] [--sets AG Bio ...] [--set NAME FILE LINES CLASSES ...]
    python -m clusterns.cluster_eval table --inputs A.json ... --labels ... --kinds run|base|released ... --out-dir DIR
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from clusterns.config import CLUSTERING_DEFAULTS, EVALUATION_DEFAULTS
from clusterns.evaluation.base import (DataError, as_matrix, load_model, model_parser, provenance, read_data_file,
                                       resolve_pooler, run_cli)
from clusterns.evaluation.transfer.folds import stratified_subset

__all__ = ["SETS", "SetSpec", "ClusterSet", "ClusteringDataError", "parse_examples", "load_set", "load_sets",
           "clustering_accuracy", "nmi", "kmeans", "score_sets", "evaluate", "main"]

SUBSET_SEED = 1111


@dataclass(frozen=True)
class SetSpec:
    """A clustering set: its file (upstream basename), lines and number of classes (= K)."""

    name: str
    file: str
    lines: int
    classes: int


# The eight sets of Table 6 in the paper's order, as the official script names them (K = classes).
SETS: dict[str, SetSpec] = {s.name: s for s in (
    SetSpec("AG", "agnewsdataraw-8000", 8000, 4),
    SetSpec("Bio", "biomedical_true_text", 20000, 20),
    SetSpec("Go-S", "S", 11108, 152),
    SetSpec("G-T", "T", 11108, 152),
    SetSpec("G-TS", "TS", 11109, 152),
    SetSpec("SS", "search_snippets_true_text", 12340, 8),
    SetSpec("SO", "stackoverflow_true_text", 20000, 20),
    SetSpec("Tweet", "tweet-original-order.txt", 2472, 89),
)}
_FIX = "re-fetch it (snakemake resources/data/clustering/...) or point --data at the eight upstream files"


class ClusteringDataError(DataError):
    """A clustering data file is missing or does not match its specification."""


@dataclass(frozen=True)
class ClusterSet:
    """The examples of one set (possibly a stratified subset of them)."""

    spec: SetSpec
    texts: tuple[str, ...]
    labels: np.ndarray  # int64, label - 1
    n_total: int
    sha256: str

    @property
    def subsampled(self) -> bool:
        return len(self.texts) < self.n_total


# ---------------------------------------------------------------------------------------------
# Data


def parse_examples(text: str, where: str) -> list[tuple[int, str]]:
    """``(label - 1, text)`` per line. Lines end in LF or CRLF (a last line may have no line
    end); a line is ``<integer label>\\t<non-empty text>``, where further tab-separated fields may
    only be empty (SO ends every line with a tab)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line end
    out = []
    for i, line in enumerate(lines, start=1):
        fields = line.removesuffix("\r").split("\t")
        if len(fields) < 2 or not fields[1].strip():
            raise ClusteringDataError(f"{where} line {i}: expected '<label>\\t<text>', got {line[:80]!r}; {_FIX}")
        try:
            label = int(fields[0])
        except ValueError:
            raise ClusteringDataError(f"{where} line {i}: label {fields[0][:20]!r} is not an integer; {_FIX}") from None
        if label < 1:
            raise ClusteringDataError(f"{where} line {i}: label {label} is below 1 (labels count from 1); {_FIX}")
        out.append((label - 1, fields[1]))
    return out


def load_set(data_dir: str | Path, spec: SetSpec, max_examples: int | None = None,
             seed: int = SUBSET_SEED) -> ClusterSet:
    """One set from ``data_dir / spec.file``, checked against ``spec``; ``max_examples`` keeps a
    seeded stratified subset (quick checks only: the result is marked subsampled), never fewer
    examples than the set has classes (KMeans needs at least K points)."""
    root = Path(data_dir)
    files: dict[str, str] = {}
    where = f"{spec.name} ({root / spec.file})"
    examples = parse_examples(read_data_file(root, spec.file, spec.name, files, _FIX, error=ClusteringDataError),
                              where)
    if len(examples) != spec.lines:
        raise ClusteringDataError(f"{where}: {len(examples)} examples, expected {spec.lines}; the file is truncated "
                                  f"or not the upstream one: {_FIX}")
    labels = np.asarray([label for label, _ in examples], dtype=np.int64)
    classes = len(np.unique(labels))
    if classes != spec.classes:
        raise ClusteringDataError(f"{where}: {classes} distinct labels, expected {spec.classes} classes; {_FIX}")
    texts = tuple(t for _, t in examples)
    if max_examples is not None and max(max_examples, spec.classes) < len(texts):
        keep = stratified_subset(labels, max(max_examples, spec.classes), seed)
        texts, labels = tuple(texts[i] for i in keep), labels[keep]
    return ClusterSet(spec, texts, labels, len(examples), files[spec.file])


def load_sets(data_dir: str | Path, specs: Sequence[SetSpec], max_examples: int | None = None) -> list[ClusterSet]:
    if not Path(data_dir).is_dir():
        raise ClusteringDataError(f"clustering data folder not found: {data_dir}; {_FIX}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples}")
    return [load_set(data_dir, spec, max_examples) for spec in specs]


# ---------------------------------------------------------------------------------------------
# Scoring


def clustering_accuracy(y_true, y_pred) -> float:
    """The share of examples in the best one-to-one matching of clusters to classes (Hungarian
    method on a square count matrix of size max label + 1, as the official ``acc``)."""
    from scipy.optimize import linear_sum_assignment

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or not len(y_true):
        raise ValueError("y_true and y_pred must be non-empty 1-D arrays of the same length")
    size = int(max(y_true.max(), y_pred.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (y_pred, y_true), 1)
    rows, cols = linear_sum_assignment(counts.max() - counts)
    return float(counts[rows, cols].sum()) / len(y_true)


def nmi(y_true, y_pred) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(y_true, y_pred))


def kmeans(emb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster labels of scikit-learn ``KMeans(n_clusters=k, n_init=10, random_state=seed)``."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def score_sets(sets: Sequence[ClusterSet], embed, restarts: Sequence[int], log=None) -> dict:
    """Embed each set's texts once and cluster them once per restart; ACC and NMI x 100."""
    if not restarts:
        raise ValueError("at least one KMeans restart (random_state) is needed")
    details, results, nmis = {}, {}, {}
    for cs in sets:
        t0 = time.perf_counter()
        emb = as_matrix(embed(list(cs.texts)), len(cs.texts))
        encode_seconds = time.perf_counter() - t0
        accs, nmi_values, seconds = [], [], []
        for r in restarts:
            t0 = time.perf_counter()
            pred = kmeans(emb, cs.spec.classes, int(r))
            seconds.append(time.perf_counter() - t0)
            accs.append(100.0 * clustering_accuracy(cs.labels, pred))
            nmi_values.append(100.0 * nmi(cs.labels, pred))
        acc_mean, acc_std = _mean_std(accs)
        nmi_mean, nmi_std = _mean_std(nmi_values)
        details[cs.spec.name] = {
            "acc": accs, "nmi": nmi_values, "acc_mean": acc_mean, "acc_std": acc_std, "nmi_mean": nmi_mean,
            "nmi_std": nmi_std, "k": cs.spec.classes, "n": len(cs.texts), "n_total": cs.n_total,
            "subsampled": cs.subsampled, "file": cs.spec.file, "sha256": cs.sha256, "dim": int(emb.shape[1]),
            "encode_seconds": encode_seconds, "kmeans_seconds": seconds,
        }
        results[cs.spec.name], nmis[cs.spec.name] = acc_mean, nmi_mean
        if log:
            log(f"{cs.spec.name}: n {len(cs.texts)}, K {cs.spec.classes}: ACC {acc_mean:.2f} ± {acc_std:.2f}, "
                f"NMI {nmi_mean:.2f}; encoded in {encode_seconds:.1f} s, KMeans {sum(seconds):.1f} s")
    results["avg"] = float(np.mean(list(results.values()))) if details else math.nan
    nmis["avg"] = float(np.mean(list(nmis.values()))) if details else math.nan
    results["nmi"] = nmis
    results["details"] = details
    return results


# ---------------------------------------------------------------------------------------------
# End to end and command line


def evaluate(model_path: str | Path, pooler: str | None, data_dir: str | Path, *,
             specs: Sequence[SetSpec] | None = None, restarts: Sequence[int] = CLUSTERING_DEFAULTS["restarts"],
             max_examples: int | None = None, max_length: int = CLUSTERING_DEFAULTS["max_length"],
             batch_size: int = EVALUATION_DEFAULTS["batch_size"], device: str | None = None,
             dtype: str = EVALUATION_DEFAULTS["dtype"], prompt_protocol: str | None = None,
             progress: bool = False, log=None) -> dict:
    """Load the sets (checked) and the model, cluster, and add ``meta``; ``pooler`` None = the
    official [CLS] state (``cls_before_pooler``), not the model folder's pooler."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    pooler = resolve_pooler(model_path, pooler or CLUSTERING_DEFAULTS["pooler"])
    set_list = load_sets(data_dir, list(specs or SETS.values()), max_examples)
    loaded = load_model(model_path, pooler, device=device, dtype=dtype)
    t0 = time.perf_counter()
    embed = loaded.embedder(prompt_protocol, batch_size=batch_size, progress=progress, max_length=max_length)
    results = score_sets(set_list, embed, list(restarts), log)
    facts = provenance(loaded, data_key="data", data_dir=data_dir,
                       files={cs.spec.file: cs.sha256 for cs in set_list}, batch_size=batch_size,
                       prompt=loaded.prompt_for(prompt_protocol))
    details = results["details"].values()
    results["meta"] = {
        "sets": [cs.spec.name for cs in set_list], "restarts": list(restarts), "max_length": max_length,
        "kmeans": {"library": "scikit-learn", "n_init": 10, "random_state": "each restart"},
        "subsampled": any(d["subsampled"] for d in details), "max_examples": max_examples, **facts,
        "n_texts": sum(d["n"] for d in details), "encode_seconds": sum(d["encode_seconds"] for d in details),
        "kmeans_seconds": sum(sum(d["kmeans_seconds"]) for d in details), "seconds": time.perf_counter() - t0,
    }
    return results


def format_table(results: dict) -> str:
    lines = [f"{'set':<6} {'n':>6} {'K':>4} {'ACC':>14} {'NMI':>7}"]
    for name, d in results["details"].items():
        lines.append(f"{name:<6} {d['n']:>6} {d['k']:>4} {d['acc_mean']:>7.2f} ± {d['acc_std']:<4.2f} "
                     f"{d['nmi_mean']:>7.2f}")
    lines.append(f"{'avg':<6} {'':>6} {'':>4} {results['avg']:>7.2f}        {results['nmi']['avg']:>7.2f}")
    return "\n".join(lines)


def build_parser():
    p = model_parser("python -m clusterns.cluster_eval",
                     "Short-text clustering of a HF encoder's embeddings (the paper's Table 6 protocol).",
                     pooler_default=f"{CLUSTERING_DEFAULTS['pooler']} (the official last-layer [CLS] state)")
    p.add_argument("--data", required=True, help="folder holding the sets' files under their upstream names")
    p.add_argument("--sets", nargs="+", default=None, metavar="NAME",
                   help=f"subset of {', '.join(SETS)} (default: all eight)")
    p.add_argument("--set", nargs=4, action="append", default=None, metavar=("NAME", "FILE", "LINES", "CLASSES"),
                   help="a set given explicitly (repeatable; replaces the built-in list)")
    p.add_argument("--restarts", nargs="+", type=int, default=list(CLUSTERING_DEFAULTS["restarts"]),
                   help="KMeans random_state of each restart")
    p.add_argument("--max-examples", type=int, default=None,
                   help="quick checks only: a seeded stratified subset of N examples per set, at least K (marked subsampled)")
    p.add_argument("--max-length", type=int, default=CLUSTERING_DEFAULTS["max_length"], help="truncation in tokens")
    return p


def _specs(args) -> list[SetSpec]:
    if args.set:
        try:
            specs = [SetSpec(name, file, int(lines), int(classes)) for name, file, lines, classes in args.set]
        except ValueError:
            raise ValueError("--set takes NAME FILE LINES CLASSES with integer LINES and CLASSES") from None
    else:
        specs = list(SETS.values())
    if args.sets:
        unknown = [s for s in args.sets if s not in {sp.name for sp in specs}]
        if unknown:
            raise ValueError(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(sp.name for sp in specs)}")
        specs = [sp for sp in specs if sp.name in args.sets]
    return specs


def _summary(results: dict, args) -> str:
    meta = results["meta"]
    note = " (SUBSAMPLED)" if meta["subsampled"] else ""
    return (format_table(results) + f"\n{meta['n_texts']} texts{note}: encoded in {meta['encode_seconds']:.1f} s, "
            f"KMeans {meta['kmeans_seconds']:.1f} s on {meta['device']}; wrote {args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``table`` as the first argument: :mod:`clusterns.evaluation.cluster_table`);
    user errors print ``error: ...`` and return 1 with no output written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        from clusterns.evaluation.cluster_table import table_main

        return table_main(argv[1:])

    def run(args) -> dict:
        return evaluate(args.model, args.pooler, args.data, specs=_specs(args), restarts=args.restarts,
                        max_examples=args.max_examples, max_length=args.max_length, batch_size=args.batch_size,
                        device=args.device, dtype=args.dtype, prompt_protocol=args.prompt_protocol,
                        progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr, flush=True))

    return run_cli(build_parser(), argv, run, _summary)
