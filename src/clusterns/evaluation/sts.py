"""STS evaluation exactly as SimCSE's SentEval "test" (and "dev") mode.

Data layout, pair filtering, sentence normalisation, cosine scoring and the correlations follow
SentEval's ``STSEval``/``STSBenchmarkEval``/``SICKRelatednessEval`` as modified by SimCSE; the
encoder is pluggable (``score_tasks(tasks, embed)``) so training can score the model it trains.
Loading, embedding, provenance and the command line are the shared evaluator contract
(:mod:`clusterns.evaluation.base`).

CLI::

    python -m clusterns.sts --model PATH [--pooler POOLER] --senteval DIR [--mode test|dev] \
        --output FILE.json [--batch-size N] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--tasks ...]
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from clusterns.config import EVALUATION_DEFAULTS
from clusterns.evaluation.base import (DataError, as_matrix, load_model, model_parser, provenance, read_data_file,
                                       resolve_pooler, run_cli, text_lines)

# SentEval's subsets per STS year, in SentEval's order (STS13 has no SMT subset, licence).
STS_SUBSETS: dict[str, tuple[str, ...]] = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
MODES = ("test", "dev")
TASKS: dict[str, tuple[str, ...]] = {
    "test": ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"),
    "dev": ("STSBenchmark", "SICKRelatedness"),
}
# Pairs kept per task (after dropping empty gold lines) in the real senteval.tar.
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "test": {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
             "STSBenchmark": 1379, "SICKRelatedness": 4927},
    "dev": {"STSBenchmark": 1500, "SICKRelatedness": 500},
}
_SPLIT_FILES: dict[str, dict[str, str]] = {
    "STSBenchmark": {"test": "STS/STSBenchmark/sts-test.csv", "dev": "STS/STSBenchmark/sts-dev.csv"},
    "SICKRelatedness": {"test": "SICK/SICK_test_annotated.txt", "dev": "SICK/SICK_trial.txt"},
}
_REFETCH = "re-fetch and extract senteval.tar (SentEval layout: DIR/STS/..., DIR/SICK/...)"

Embedder = Callable[[list[str]], "np.ndarray"]


class STSDataError(DataError):
    """The SentEval data is missing, malformed or does not have the expected number of pairs."""


@dataclass(frozen=True)
class PairSet:
    """One scored list of sentence pairs: an STS subset or an STS-B/SICK split."""

    name: str
    sent1: tuple[str, ...]
    sent2: tuple[str, ...]
    gold: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.gold)


@dataclass(frozen=True)
class STSTask:
    """A task to score; its headline is the Spearman over the concatenation of its subsets.

    For STS12-16 that is SentEval's "all" setting; STS-B and SICK-R have a single subset (the
    split), so the same rule gives the split's Spearman.
    """

    name: str
    subsets: tuple[PairSet, ...]
    files: dict[str, str] = field(default_factory=dict)  # path relative to DIR -> sha256

    @property
    def n_pairs(self) -> int:
        return sum(len(s) for s in self.subsets)


# ---------------------------------------------------------------------------------------------
# Parsing (pure: text in, pairs out)


def normalize_sentence(text: str) -> str:
    """SentEval splits sentences on whitespace and SimCSE's batcher joins them with spaces."""
    return " ".join(text.split())


def _parse_score(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise STSDataError(f"{where}: gold score {value!r} is not a number; {_REFETCH}") from None


def parse_sts_subset(name: str, input_text: str, gold_text: str, where: str = "") -> PairSet:
    """An STS12-16 subset from the texts of ``STS.input.<name>.txt`` and ``STS.gs.<name>.txt``.

    As SentEval: both files split with ``str.splitlines``; pairs whose gold line is exactly
    empty are dropped.
    """
    where = where or name
    inputs = input_text.splitlines()
    golds = gold_text.splitlines()
    if len(inputs) != len(golds):
        raise STSDataError(f"{where}: {len(inputs)} input lines but {len(golds)} gold lines; {_REFETCH}")
    s1, s2, gold = [], [], []
    for i, (line, g) in enumerate(zip(inputs, golds), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise STSDataError(f"{where}: input line {i} has {len(fields)} tab-separated fields, expected 2; {_REFETCH}")
        if g == "":
            continue
        gold.append(_parse_score(g, f"{where} gold line {i}"))
        s1.append(normalize_sentence(fields[0]))
        s2.append(normalize_sentence(fields[1]))
    return PairSet(name, tuple(s1), tuple(s2), tuple(gold))


def parse_columns(name: str, text: str, cols: tuple[int, int, int], skip_header: bool, where: str = "") -> PairSet:
    """A split of STS-B (cols 5, 6, score 4) or SICK (cols 1, 2, score 3; header skipped).

    As SentEval: each line is stripped (which also drops CR line ends) and split on tabs.
    """
    where = where or name
    a, b, score = cols
    lines = text_lines(text)[1 if skip_header else 0:]
    s1, s2, gold = [], [], []
    for i, line in enumerate(lines, start=2 if skip_header else 1):
        fields = line.strip().split("\t")
        if len(fields) <= max(cols):
            raise STSDataError(f"{where}: line {i} has {len(fields)} tab-separated fields, "
                               f"expected at least {max(cols) + 1}; {_REFETCH}")
        gold.append(_parse_score(fields[score], f"{where} line {i}"))
        s1.append(normalize_sentence(fields[a]))
        s2.append(normalize_sentence(fields[b]))
    return PairSet(name, tuple(s1), tuple(s2), tuple(gold))


# ---------------------------------------------------------------------------------------------
# Loading (I/O)


def _read(root: Path, rel: str, task: str, files: dict[str, str]) -> str:
    return read_data_file(root, rel, task, files, _REFETCH, error=STSDataError)


def load_task(senteval_dir: str | Path, task: str, mode: str = "test") -> STSTask:
    """Load one task's pairs for ``mode`` (no count check; see ``load_tasks``)."""
    root = Path(senteval_dir)
    check_task(task, mode)
    files: dict[str, str] = {}
    if task in STS_SUBSETS:
        subsets = []
        for sub in STS_SUBSETS[task]:
            folder = f"STS/{task}-en-test"
            inp = _read(root, f"{folder}/STS.input.{sub}.txt", task, files)
            gs = _read(root, f"{folder}/STS.gs.{sub}.txt", task, files)
            subsets.append(parse_sts_subset(sub, inp, gs, where=f"{task} {folder}/STS.*.{sub}.txt"))
        return STSTask(task, tuple(subsets), files)
    rel = _SPLIT_FILES[task][mode]
    text = _read(root, rel, task, files)
    if task == "STSBenchmark":
        split = parse_columns(mode, text, (5, 6, 4), skip_header=False, where=f"{task} {rel}")
    else:
        split = parse_columns(mode, text, (1, 2, 3), skip_header=True, where=f"{task} {rel}")
    return STSTask(task, (split,), files)


def check_task(task: str, mode: str) -> None:
    """Refuse an unknown mode or a task that the mode does not score."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if task not in TASKS[mode]:
        raise ValueError(f"task {task!r} is not scored in {mode} mode; choose from {', '.join(TASKS[mode])}")


def check_count(task: STSTask, expected: int | None, senteval_dir: str | Path) -> None:
    """Refuse a task whose number of kept pairs differs from the expected count."""
    if expected is not None and task.n_pairs != expected:
        raise STSDataError(
            f"{task.name}: expected {expected} sentence pairs but found {task.n_pairs} in {senteval_dir}; "
            f"the data is truncated or not SentEval's: {_REFETCH}")


def load_tasks(senteval_dir: str | Path, mode: str = "test", tasks: Sequence[str] | None = None,
               expected_counts: dict[str, int] | None = None) -> list[STSTask]:
    """Load and count-check the tasks of ``mode`` (all of them by default) from an extracted senteval.tar.

    ``expected_counts`` overrides the real pair counts per task (for hand-made test data).
    """
    root = Path(senteval_dir)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not root.is_dir():
        raise STSDataError(f"senteval directory not found: {root}; fetch and extract senteval.tar there")
    if not (root / "STS").is_dir() and not (root / "SICK").is_dir():
        raise STSDataError(f"{root} has neither STS/ nor SICK/: give the folder where senteval.tar was extracted")
    names = list(tasks) if tasks else list(TASKS[mode])
    for name in names:
        check_task(name, mode)
    expected = {**EXPECTED_COUNTS[mode], **(expected_counts or {})}
    loaded = []
    for name in dict.fromkeys(names):
        task = load_task(root, name, mode)
        check_count(task, expected.get(name), root)
        loaded.append(task)
    return loaded


# ---------------------------------------------------------------------------------------------
# Scoring (pure given the embedding function)


def distinct_sentences(tasks: Iterable[STSTask]) -> list[str]:
    """Every sentence of the tasks once, in first-seen order."""
    seen: dict[str, None] = {}
    for task in tasks:
        for sub in task.subsets:
            seen.update(dict.fromkeys(sub.sent1))
            seen.update(dict.fromkeys(sub.sent2))
    return list(seen)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; like SentEval, NaN inputs and results become 0."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64))
    b = np.nan_to_num(np.asarray(b, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.nan_to_num(cos)


def correlations(system: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """Spearman and Pearson (scipy.stats) x 100; NaN when undefined (constant input)."""
    from scipy.stats import pearsonr, spearmanr

    if len(gold) < 2:
        return {"spearman": math.nan, "pearson": math.nan}
    return {"spearman": float(spearmanr(system, gold)[0]) * 100.0,
            "pearson": float(pearsonr(system, gold)[0]) * 100.0}


def score_task(task: STSTask, similarities: Sequence[np.ndarray]) -> dict:
    """Details of one task from the per-subset similarity arrays (SentEval's all/mean/wmean)."""
    subsets = {}
    for sub, sims in zip(task.subsets, similarities, strict=True):
        subsets[sub.name] = {"n_pairs": len(sub), **correlations(sims, sub.gold)}
    all_sys = np.concatenate([np.asarray(s, dtype=np.float64) for s in similarities]) if similarities else np.empty(0)
    all_gold = [g for sub in task.subsets for g in sub.gold]
    details = {"n_pairs": task.n_pairs, **correlations(all_sys, all_gold)}
    if task.name in STS_SUBSETS:
        weights = [v["n_pairs"] for v in subsets.values()]
        details["subsets"] = subsets
        for stat in ("spearman", "pearson"):
            values = np.array([v[stat] for v in subsets.values()], dtype=np.float64)
            details.setdefault("mean", {})[stat] = float(np.mean(values))
            details.setdefault("wmean", {})[stat] = float(np.average(values, weights=weights))
    else:
        details["split"] = task.subsets[0].name
    return details


def score_tasks(tasks: Sequence[STSTask], embed: Embedder) -> dict:
    """Score ``tasks`` with any embedding function (list of strings -> 2-D array, same order).

    Each distinct sentence is embedded once, in one call. Returns the headline Spearman x 100 per
    task, ``avg`` (mean of the headlines), ``details`` per task and ``meta`` (encoding counts/time).
    """
    sentences = distinct_sentences(tasks)
    start = time.perf_counter()
    emb = as_matrix(embed(list(sentences)), len(sentences)) if sentences else np.zeros((0, 1), np.float32)
    seconds = time.perf_counter() - start
    row = {s: i for i, s in enumerate(sentences)}
    details = {}
    for task in tasks:
        sims = [cosine_rows(emb[[row[s] for s in sub.sent1]], emb[[row[s] for s in sub.sent2]])
                if len(sub) else np.empty(0) for sub in task.subsets]
        details[task.name] = score_task(task, sims)
    results: dict = {name: d["spearman"] for name, d in details.items()}
    results["avg"] = float(np.mean(list(results.values()))) if details else math.nan
    results["details"] = details
    results["meta"] = {"n_sentences": len(sentences), "encode_seconds": seconds,
                       "sentences_per_second": len(sentences) / seconds if seconds > 0 else None}
    return results


# ---------------------------------------------------------------------------------------------
# End to end


def evaluate(model_path: str | Path, pooler: str | None, senteval_dir: str | Path, mode: str = "test", *,
             tasks: Sequence[str] | None = None, batch_size: int = EVALUATION_DEFAULTS["batch_size"],
             device: str | None = None, dtype: str = EVALUATION_DEFAULTS["dtype"],
             expected_counts: dict[str, int] | None = None, progress: bool = False,
             prompt_protocol: str | None = None) -> dict:
    """Load the data (count-checked) and the model at ``model_path``, and score; adds ``meta``.

    ``pooler`` None: the one the model folder declares. For prompt models (the ``mask`` pooler)
    the other protocol's scores are added under ``other_protocols``.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    pooler = resolve_pooler(model_path, pooler)  # before the data: a wrong name fails fast
    task_list = load_tasks(senteval_dir, mode, tasks, expected_counts)
    loaded = load_model(model_path, pooler, device=device, dtype=dtype)
    results = score_tasks(task_list, loaded.embedder(prompt_protocol, batch_size=batch_size, progress=progress))
    prompt = loaded.prompt_for(prompt_protocol)
    if prompt is not None:  # the original protocol selects and tests on different embeddings: report both
        other = "denoised" if prompt["protocol"] != "denoised" else "raw"
        alt = score_tasks(task_list, loaded.embedder(other, batch_size=batch_size, progress=progress))
        results["other_protocols"] = {other: {k: v for k, v in alt.items() if k not in ("details", "meta")}}
    files = {rel: sha for t in task_list for rel, sha in t.files.items()}
    facts = provenance(loaded, data_key="senteval", data_dir=senteval_dir, files=files, batch_size=batch_size,
                       prompt=prompt)
    results["meta"] = {"mode": mode, "tasks": [t.name for t in task_list], **facts, **results["meta"]}
    return results


def format_table(results: dict) -> str:
    """A compact text table: task, pairs, headline Spearman x 100, and the average."""
    lines = [f"{'task':<16} {'pairs':>6} {'spearman':>9}"]
    for name, d in results["details"].items():
        lines.append(f"{name:<16} {d['n_pairs']:>6} {results[name]:>9.2f}")
    lines.append(f"{'avg':<16} {'':>6} {results['avg']:>9.2f}")
    return "\n".join(lines)


def build_parser():
    p = model_parser("python -m clusterns.sts",
                     "Score a HF encoder on the SentEval STS tasks (SimCSE test/dev protocol).")
    p.add_argument("--senteval", required=True, help="folder where senteval.tar was extracted (holds STS/, SICK/)")
    p.add_argument("--mode", default="test", choices=MODES)
    p.add_argument("--tasks", nargs="+", default=None, help="subset of the mode's tasks (default: all)")
    return p


def _summary(results: dict, args) -> str:
    meta = results["meta"]
    return (format_table(results) + f"\n{meta['n_sentences']} distinct sentences in {meta['encode_seconds']:.1f} s"
            f" ({meta['sentences_per_second'] or 0:.0f}/s) on {meta['device']} ({meta['dtype']}); wrote {args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; user errors print ``error: ...`` and return 1 with no output written."""

    def run(args) -> dict:
        return evaluate(args.model, args.pooler, args.senteval, args.mode, tasks=args.tasks,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        progress=sys.stderr.isatty(), prompt_protocol=args.prompt_protocol)

    return run_cli(build_parser(), argv, run, _summary)
