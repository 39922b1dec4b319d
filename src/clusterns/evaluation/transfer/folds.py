"""Stratified folds and subsets of the transfer tasks, seeded as SentEval seeds them.

:func:`stratified_folds` assigns rows to folds exactly as scikit-learn's
``StratifiedKFold(k, shuffle=True, random_state=1111)`` does (since 0.22; checked against
scikit-learn in the tests when it is installed), without depending on it.
:func:`stratified_subset` is the seeded, class-balanced subset behind ``--max-examples``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SEED", "stratified_folds", "stratified_kfold", "stratified_subset"]

# SentEval's seed (SimCSE's ``params['seed']``): the fold shuffles, the subsets, and every
# classifier fit's initialisation and shuffles.
SEED = 1111


def stratified_folds(labels: Sequence[int], k: int, seed: int = SEED) -> np.ndarray:
    """Test-fold id of every row, as ``StratifiedKFold(k, shuffle=True, random_state=seed)``.

    Classes are numbered by first appearance. Fold ``i`` receives, of each class, as many rows as
    that class has among positions ``i, i + k, i + 2k, ...`` of the label-sorted list (so fold
    sizes differ by at most one per class). Each class's fold ids are laid out in fold order and
    then shuffled in place by one ``RandomState(seed)``, class after class, and handed to the
    class's rows in their original order.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    if k > len(y):
        raise ValueError(f"cannot make {k} folds of {len(y)} examples")
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # class id in order of first appearance
    coded = rank[inverse.reshape(-1)]
    nclasses = len(first)
    counts = np.bincount(coded, minlength=nclasses)
    if np.all(counts < k):
        raise ValueError(f"cannot make {k} stratified folds: every class has fewer than {k} examples")
    ordered = np.sort(coded)
    per_fold = np.stack([np.bincount(ordered[i::k], minlength=nclasses) for i in range(k)])  # (k, classes)
    rng = np.random.RandomState(seed)
    folds = np.empty(len(y), dtype=np.int64)
    for c in range(nclasses):
        ids = np.repeat(np.arange(k), per_fold[:, c])
        rng.shuffle(ids)
        folds[coded == c] = ids
    return folds


def stratified_kfold(labels: Sequence[int], k: int, seed: int = SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train_rows, test_rows), ...]`` for the k folds of :func:`stratified_folds`, rows ascending."""
    folds = stratified_folds(labels, k, seed)
    rows = np.arange(len(folds))
    return [(rows[folds != i], rows[folds == i]) for i in range(k)]


def stratified_subset(labels: Sequence[int], n: int, seed: int = SEED) -> list[int]:
    """A seeded subset of ``n`` rows (ascending) keeping the class proportions (largest remainder)."""
    y = np.asarray(labels)
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    if n >= len(y):
        return list(range(len(y)))
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n / len(y)
    quota = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[c] += 1
    rng = np.random.RandomState(seed)
    keep: list[int] = []
    for c, q in zip(classes, quota):
        rows = np.flatnonzero(y == c)
        keep.extend(rows[rng.permutation(len(rows))[:q]].tolist())
    return sorted(keep)
