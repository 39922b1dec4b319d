"""The transfer tasks' protocols, run with any embedding function.

* nested k-fold CV for MR/CR/SUBJ/MPQA (:func:`nested_cv`), dev-based selection for SST2
  (:func:`split_selection`), k-fold CV on train then a refit for TREC and MRPC
  (:func:`kfold_selection`); MRPC features are [|u - v|; u * v], MRPC also reports F1. Each
  selects the L2 regularisation in :data:`REGS`; scores are rounded as SentEval rounds them
  (2 decimals in percent).
* Every split is put in SentEval's embedding order (:func:`senteval_order`), a stable sort by
  (word count, label), for MRPC (words of A, words of B, label), because the fold assignment
  depends on the row order.
* Modes (:data:`SETTINGS`): ``test`` (SimCSE's ``test``: 10-fold; adam, batch 64, tenacity 5,
  epoch_size 4) and ``fast`` (SimCSE's ``fasttest``: 5-fold; rmsprop, batch 128, tenacity 3,
  epoch_size 2).
* :func:`run_task` embeds a task's distinct sentences once and runs its protocol;
  :func:`score_tasks` runs a list of tasks and averages them.

Notes: SST2's final refit (same reg, same seed, same data) would repeat the selected grid fit
exactly, so that fit is reused. Residual differences from SentEval are floating-point only (CPU
vs CUDA kernels, batched scoring), plus the encoder's own batching (sorted by token length,
SentEval's by word count).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from clusterns.evaluation.base import as_matrix
from clusterns.evaluation.transfer.classifier import (ClassifierSettings, FitJob, classifier_threads, fit_logreg,
                                                      train_jobs)
from clusterns.evaluation.transfer.data import BINARY_TASKS, Split, TransferTask
from clusterns.evaluation.transfer.folds import stratified_kfold

__all__ = ["MODES", "SETTINGS", "REGS", "PROTOCOLS", "Embedder", "Log", "grid", "nested_cv", "split_selection",
           "kfold_selection", "f1_binary", "senteval_order", "distinct_sentences", "features", "run_task",
           "score_tasks"]

MODES = ("test", "fast")
SETTINGS: dict[str, ClassifierSettings] = {
    "test": ClassifierSettings("adam", 64, 5, 4, 10),
    "fast": ClassifierSettings("rmsprop", 128, 3, 2, 5),
}
# SentEval's regularisation grid for the PyTorch classifier: 10**t for t in -5..-2.
REGS: tuple[float, ...] = tuple(10 ** t for t in range(-5, -1))
PROTOCOLS = {**{t: "nested_cv" for t in BINARY_TASKS}, "SST2": "dev_selection", "TREC": "kfold", "MRPC": "kfold"}

Embedder = Callable[[list[str]], "np.ndarray"]
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Protocols; accuracies in percent, rounded where and as SentEval rounds them


def _round_np(x) -> float:
    """SentEval's ``round(numpy_float, 2)`` (numpy's rounding)."""
    return float(np.round(np.float64(x), 2))


def _round_py(x: float) -> float:
    """SentEval's ``round(python_float, 2)``."""
    return round(float(x), 2)


def grid(scores_per_reg: list[list[float]]) -> tuple[list[float], int]:
    """Mean score per reg (x100, 2 dp) and the index of the first best."""
    scores = [_round_np(100 * np.mean(s)) for s in scores_per_reg]
    return scores, int(np.argmax(scores))


def nested_cv(X, y, nclasses: int, settings: ClassifierSettings, device: str = "cpu",
              log: Log | None = None) -> dict:
    """MR/CR/SUBJ/MPQA (SentEval's InnerKFoldClassifier).

    For every outer fold: inner k-fold CV on the outer-train part for each reg (each inner fit
    early-stops on, and is scored on, its inner held-out fold); the reg with the best mean inner
    score is refit on the whole outer-train part (5 % validation split) and scored on the outer
    test fold. ``acc`` = mean test-fold accuracy, ``devacc`` = mean best inner score.
    """
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)
    outer = stratified_kfold(y, settings.kfold)
    folds, refits = [], []
    for f, (train, test) in enumerate(outer):
        inner = stratified_kfold(y[train], settings.kfold)
        jobs = [FitJob(train[itrain], reg, train[itest]) for itrain, itest in inner for reg in REGS]
        fits = train_jobs(X, y, jobs, nclasses, settings, device=device)
        # each inner fit's kept model, scored on its inner test fold = its best validation accuracy
        per_reg = [[fits[i * len(REGS) + r].best_val for i in range(len(inner))] for r in range(len(REGS))]
        scores, best = grid(per_reg)
        folds.append({"devacc": float(np.max(scores)), "reg": REGS[best], "reg_scores": scores,
                      "n_train": int(len(train)), "n_test": int(len(test))})
        refits.append(FitJob(train, REGS[best]))
        if log:
            log(f"  fold {f + 1}/{settings.kfold}: inner CV {float(np.max(scores)):.2f} with reg {REGS[best]:g}")
    finals = train_jobs(X, y, refits, nclasses, settings, device=device)
    for fold, final, (_, test) in zip(folds, finals, outer):
        fold["acc"] = _round_py(100 * final.score(X[test], y[test], device))
    return {"acc": _round_np(np.mean([f["acc"] for f in folds])),
            "devacc": _round_np(np.mean([f["devacc"] for f in folds])),
            "folds": folds}


def split_selection(train, dev, test, nclasses: int, settings: ClassifierSettings, device: str = "cpu") -> dict:
    """SST2 (SentEval's SplitClassifier): one fit per reg on train, early-stopped and scored on dev;
    the best reg's model is scored on test (SentEval's refit of it would repeat that fit)."""
    (Xtr, ytr), (Xdev, ydev), (Xte, yte) = train, dev, test
    fits = fit_logreg(Xtr, ytr, nclasses, REGS, settings, validation=(Xdev, ydev), device=device)
    scores = [_round_py(100 * f.best_val) for f in fits]
    best = int(np.argmax(scores))
    return {"acc": _round_py(100 * fits[best].score(Xte, yte, device)), "devacc": float(np.max(scores)),
            "reg": REGS[best], "reg_scores": scores}


def kfold_selection(train, test, nclasses: int, settings: ClassifierSettings, device: str = "cpu") -> dict:
    """TREC/MRPC (SentEval's KFoldClassifier): stratified k-fold CV on train per reg (each fit
    early-stops on, and is scored on, its held-out fold), then the best reg refit on all of train
    (5 % validation split) and scored on test. Adds the test predictions (``pred``)."""
    (Xtr, ytr), (Xte, yte) = train, test
    Xtr, ytr = np.asarray(Xtr, dtype=np.float32), np.asarray(ytr, dtype=np.int64)
    folds = stratified_kfold(ytr, settings.kfold)
    fits = train_jobs(Xtr, ytr, [FitJob(tr, reg, te) for tr, te in folds for reg in REGS], nclasses, settings,
                      device=device)
    per_reg = [[fits[i * len(REGS) + r].best_val for i in range(len(folds))] for r in range(len(REGS))]
    scores, best = grid(per_reg)
    final = fit_logreg(Xtr, ytr, nclasses, [REGS[best]], settings, validation_split=True, device=device)[0]
    pred = final.predict(Xte, device)
    correct = int((pred == np.asarray(yte)).sum())
    return {"acc": _round_py(100 * correct / len(yte)) if len(yte) else math.nan,
            "devacc": float(np.max(scores)), "reg": REGS[best], "reg_scores": scores, "pred": pred}


def f1_binary(y_true, y_pred) -> float:
    """F1 of class 1 (0 when there is no true or predicted positive)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    tp = int(((y_true == 1) & (y_pred == 1)).sum())
    denom = int((y_true == 1).sum() + (y_pred == 1).sum())
    return 2 * tp / denom if denom else 0.0


# ---------------------------------------------------------------------------------------------
# Running tasks with an embedding function


def senteval_order(split: Split) -> list[int]:
    """Row order in which SentEval embeds a split and hands it to the classifier.

    A stable sort by (word count, label); for pairs by (words of A, words of B, label).
    """
    if split.b is None:
        key = [(len(s.split()), y) for s, y in zip(split.a, split.labels)]
    else:
        key = [(len(s.split()), len(t.split()), y) for s, t, y in zip(split.a, split.b, split.labels)]
    return sorted(range(len(split)), key=key.__getitem__)


def distinct_sentences(task: TransferTask) -> list[str]:
    """Every sentence of the task once, in first-seen order."""
    seen: dict[str, None] = {}
    for split in task.splits.values():
        seen.update(dict.fromkeys(split.a))
        if split.b is not None:
            seen.update(dict.fromkeys(split.b))
    return list(seen)


def features(split: Split, emb: np.ndarray, row: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of a split in SentEval's order; pairs become [|u - v|; u * v]."""
    order = senteval_order(split)
    y = np.asarray([split.labels[i] for i in order], dtype=np.int64)
    u = emb[[row[split.a[i]] for i in order]]
    if split.b is None:
        return u, y
    v = emb[[row[split.b[i]] for i in order]]
    return np.concatenate([np.abs(u - v), u * v], axis=1), y


def run_task(task: TransferTask, embed: Embedder, mode: str = "fast", device: str = "cpu",
             log: Log | None = None) -> dict:
    """Embed the task's distinct sentences once and run its protocol; returns its details."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    settings = SETTINGS[mode]
    sentences = distinct_sentences(task)
    start = time.perf_counter()
    emb = as_matrix(embed(list(sentences)), len(sentences))
    encode_seconds = time.perf_counter() - start
    row = {s: i for i, s in enumerate(sentences)}
    data = {name: features(split, emb, row) for name, split in task.splits.items()}
    start = time.perf_counter()
    with classifier_threads(device):
        if task.name in BINARY_TASKS:
            out = nested_cv(*data["all"], task.nclasses, settings, device, log)
        elif task.name == "SST2":
            out = split_selection(data["train"], data["dev"], data["test"], task.nclasses, settings, device)
        else:
            out = kfold_selection(data["train"], data["test"], task.nclasses, settings, device)
            pred = out.pop("pred")
            if task.name == "MRPC":
                out["f1"] = _round_np(100 * f1_binary(data["test"][1], pred))
    details = {"acc": out.pop("acc"), "devacc": out.pop("devacc"), "protocol": PROTOCOLS[task.name],
               "counts": task.counts, **({"full_counts": task.full_counts} if task.subsampled else {}),
               "n_sentences": len(sentences), "dim": int(data[next(iter(data))][0].shape[1]), **out,
               "encode_seconds": encode_seconds, "classify_seconds": time.perf_counter() - start}
    return details


def score_tasks(tasks: Sequence[TransferTask], embed: Embedder, mode: str = "fast", device: str = "cpu",
                log: Log | None = None) -> dict:
    """Run ``tasks`` with any embedding function (list of strings -> 2-D array, same order).

    Returns the test accuracy x 100 per task, ``avg`` (their plain mean), ``details`` per task
    (``devacc``, selected regs, counts, MRPC ``f1``, timings) and ``meta`` (counts, times).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    details = {}
    for task in tasks:
        if log:
            counts = ", ".join(f"{k} {v}" for k, v in task.counts.items())
            log(f"{task.name}: {counts} ({PROTOCOLS[task.name]}, {mode})")
        details[task.name] = d = run_task(task, embed, mode, device, log)
        if log:
            extra = f", F1 {d['f1']:.2f}" if "f1" in d else ""
            log(f"{task.name}: acc {d['acc']:.2f} (dev {d['devacc']:.2f}{extra}); {d['n_sentences']} sentences "
                f"encoded in {d['encode_seconds']:.1f} s, classifier {d['classify_seconds']:.1f} s")
    results: dict = {name: d["acc"] for name, d in details.items()}
    results["avg"] = float(np.mean(list(results.values()))) if details else math.nan
    results["details"] = details
    n = sum(d["n_sentences"] for d in details.values())
    seconds = sum(d["encode_seconds"] for d in details.values())
    results["meta"] = {"n_sentences": n, "encode_seconds": seconds,
                       "classify_seconds": sum(d["classify_seconds"] for d in details.values()),
                       "sentences_per_second": n / seconds if seconds > 0 else None}
    return results
