"""SentEval transfer tasks (MR, CR, SUBJ, MPQA, SST2, TREC, MRPC) as SimCSE's evaluation scripts run them.

Spec: ``shared/PROMPT_AND_TRANSFER.md`` section B (and C.8-C.9). The pieces:

* **Loaders** (B.3): the seven tasks from an extracted ``senteval.tar`` (``DIR/MR``, ``DIR/CR``,
  ``DIR/SUBJ``, ``DIR/MPQA``, ``DIR/SST/binary``, ``DIR/TREC``, ``DIR/MRPC``), parsed the way
  SentEval's loaders read them (binary tasks and TREC as Latin-1, SST and MRPC as UTF-8; words split
  on whitespace and re-joined with single spaces, as SimCSE's batcher does), count-checked against
  the standard sizes (:data:`EXPECTED_COUNTS`).
* **Order** (B.1): every split is put in SentEval's embedding order, a stable sort by (word count,
  label), for MRPC (words of A, words of B, label), because the fold assignment depends on the row
  order.
* **Folds**: :func:`stratified_folds` assigns rows to folds exactly as scikit-learn's
  ``StratifiedKFold(k, shuffle=True, random_state=1111)`` does (since 0.22; checked against
  scikit-learn in the tests when it is installed), without depending on it.
* **Classifier** (B.2): :func:`fit_logreg`, logistic regression (one Linear layer, mean
  cross-entropy) trained as SentEval's ``MLP`` with ``nhid=0``: Linear initialised under
  ``torch.manual_seed(1111)``, a fresh ``numpy`` RandomState(1111) for the 5 % validation split and
  the per-pass shuffles, mini-batches with the last partial one kept, Adam/RMSprop with default
  hyper-parameters and coupled ``weight_decay = reg`` on weight and bias, ``epoch_size`` passes
  between validation checks, early stopping with SentEval's never-reset ``tenacity`` counter,
  ``max_epoch`` 200, the best model restored. It runs on CPU or CUDA (``device``).
* **Protocols** (B.3): nested CV for MR/CR/SUBJ/MPQA (:func:`nested_cv`), dev-based selection for
  SST2 (:func:`split_selection`), k-fold CV on train then a refit for TREC and MRPC
  (:func:`kfold_selection`); MRPC features are [|u - v|; u * v]. Scores are rounded as SentEval
  rounds them (2 decimals in percent).
* **Modes** (B.4): ``test`` (10-fold; adam, batch 64, tenacity 5, epoch_size 4) and ``fast``
  (SimCSE's ``fasttest``: 5-fold; rmsprop, batch 128, tenacity 3, epoch_size 2).

Faithfulness notes
------------------
1. Fits are independent (each reseeds), so :func:`train_jobs` trains a set of them side by side
   as one bank of models (batched matrix products): all inner fits of an outer fold (k folds x 4
   regs), all k outer refits, the k x 4 CV fits of TREC/MRPC, SST2's 4 fits. Each model has its
   own rows, shuffles, weight decay, optimizer state and stopping, and its arithmetic is that of
   a lone fit (gradients of the batch-mean cross-entropy written out; Adam/RMSprop updates as
   torch.optim's single-tensor code); the tests check it against a literal SentEval training
   loop. Only the wall time changes (an order of magnitude in ``test`` mode on CPU).
2. SST2's final refit (same reg, same seed, same data) would repeat the selected grid fit exactly,
   so that fit is reused.
3. The global RNGs are not touched: the Linear is initialised inside ``torch.random.fork_rng`` and
   shuffles come from a private ``numpy.random.RandomState(1111)``, which gives the same streams
   as SentEval's global reseeding.
4. Residual differences from SentEval are floating-point only (CPU vs CUDA kernels, batched
   scoring), plus the encoder's own batching (we sort by token length, SentEval by word count).
5. ``max_examples`` (off by default) keeps a seeded, stratified subset of every split larger than
   it, for quick checks; such results are marked ``subsampled`` and are not comparable to the
   paper's.

CLI::

    python -m clusterns.transfer --model PATH --pooler POOLER --senteval DIR --mode test|fast \\
        --output FILE.json [--tasks ...] [--device cpu|cuda] [--batch-size N] [--max-examples N]
    python -m clusterns.transfer table --inputs A.json B.json ... [--labels A B ...] --out-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clusterns.files import write_json_atomic, write_text_atomic

TASKS = ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC")
BINARY_TASKS = ("MR", "CR", "SUBJ", "MPQA")
MODES = ("test", "fast")
SEED = 1111
VALIDATION_SPLIT = 0.05
# SentEval's regularisation grid for the PyTorch classifier: 10**t for t in -5..-2.
REGS: tuple[float, ...] = tuple(10 ** t for t in range(-5, -1))


@dataclass(frozen=True)
class ClassifierSettings:
    """SimCSE's ``params['classifier']`` plus the fold count (``kfold``) of one mode."""

    optim: str
    batch_size: int
    tenacity: int
    epoch_size: int
    kfold: int
    max_epoch: int = 200


SETTINGS: dict[str, ClassifierSettings] = {
    "test": ClassifierSettings("adam", 64, 5, 4, 10),
    "fast": ClassifierSettings("rmsprop", 128, 3, 2, 5),
}
# Torch's defaults, spelled out (B.2).
OPTIMIZERS: dict[str, dict] = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
    "rmsprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8},
}

# Examples per split in the real senteval.tar (shared/mirror/README.md).
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "MR": {"all": 10662}, "CR": {"all": 3775}, "SUBJ": {"all": 10000}, "MPQA": {"all": 10606},
    "SST2": {"train": 67349, "dev": 872, "test": 1821},
    "TREC": {"train": 5452, "test": 500},
    "MRPC": {"train": 4076, "test": 1725},
}
# (positive file -> label 1, negative file -> label 0), as SentEval's binary tasks.
_BINARY_FILES: dict[str, tuple[str, str]] = {
    "MR": ("MR/rt-polarity.pos", "MR/rt-polarity.neg"),
    "CR": ("CR/custrev.pos", "CR/custrev.neg"),
    "SUBJ": ("SUBJ/subj.objective", "SUBJ/subj.subjective"),
    "MPQA": ("MPQA/mpqa.pos", "MPQA/mpqa.neg"),
}
_SPLIT_FILES: dict[str, dict[str, str]] = {
    "SST2": {s: f"SST/binary/sentiment-{s}" for s in ("train", "dev", "test")},
    "TREC": {"train": "TREC/train_5500.label", "test": "TREC/TREC_10.label"},
    "MRPC": {"train": "MRPC/msr_paraphrase_train.txt", "test": "MRPC/msr_paraphrase_test.txt"},
}
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
NCLASSES = {"MR": 2, "CR": 2, "SUBJ": 2, "MPQA": 2, "SST2": 2, "TREC": 6, "MRPC": 2}
PROTOCOLS = {**{t: "nested_cv" for t in BINARY_TASKS}, "SST2": "dev_selection", "TREC": "kfold", "MRPC": "kfold"}
_REFETCH = "re-fetch and extract senteval.tar (SentEval layout: DIR/MR, DIR/SST/binary, DIR/TREC, ...)"

Embedder = Callable[[list[str]], "np.ndarray"]
Log = Callable[[str], None]


class TransferDataError(Exception):
    """The SentEval transfer data is missing, malformed or does not have the expected size."""


@dataclass(frozen=True)
class Split:
    """Labelled sentences (``b`` holds the second sentence of each pair for MRPC)."""

    a: tuple[str, ...]
    labels: tuple[int, ...]
    b: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: Sequence[int]) -> "Split":
        return Split(tuple(self.a[i] for i in rows), tuple(self.labels[i] for i in rows),
                     None if self.b is None else tuple(self.b[i] for i in rows))


@dataclass(frozen=True)
class TransferTask:
    """One task's splits: ``all`` for the binary tasks, else ``train`` (``dev``) ``test``."""

    name: str
    splits: dict[str, Split]
    files: dict[str, str] = field(default_factory=dict)  # path relative to DIR -> sha256
    full_counts: dict[str, int] = field(default_factory=dict)  # before any subsampling

    @property
    def nclasses(self) -> int:
        return NCLASSES[self.name]

    @property
    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}

    @property
    def subsampled(self) -> bool:
        return self.counts != self.full_counts


# ---------------------------------------------------------------------------------------------
# Parsing (pure: text in, labelled sentences out)


def join_words(text: str) -> str:
    """SentEval splits on whitespace; SimCSE's batcher joins the words with single spaces."""
    return " ".join(text.split())


def parse_binary(pos_text: str, neg_text: str) -> Split:
    """MR/CR/SUBJ/MPQA: the positive file's lines (label 1), then the negative file's (label 0).

    As SentEval: each file's whole text split with ``str.splitlines``; empty lines are kept (as
    empty sentences).
    """
    pos = [join_words(line) for line in pos_text.splitlines()]
    neg = [join_words(line) for line in neg_text.splitlines()]
    return Split(tuple(pos + neg), tuple([1] * len(pos) + [0] * len(neg)))


def _text_lines(text: str) -> list[str]:
    """Lines as Python iterates over a file opened in text mode (universal newlines)."""
    return list(io.StringIO(text, newline=None))


def parse_sst2(text: str, where: str = "SST2") -> Split:
    """``sentence<TAB>label`` per line (SST binary)."""
    a, labels = [], []
    for i, line in enumerate(_text_lines(text), start=1):
        fields = line.strip().split("\t")
        if len(fields) < 2 or fields[1] not in ("0", "1"):
            raise TransferDataError(f"{where}: line {i} is not 'sentence<TAB>0|1'; {_REFETCH}")
        a.append(join_words(fields[0]))
        labels.append(int(fields[1]))
    return Split(tuple(a), tuple(labels))


def parse_trec(text: str, where: str = "TREC") -> Split:
    """``COARSE:fine question`` per line; the coarse label is kept, the fine one dropped."""
    a, labels = [], []
    for i, line in enumerate(_text_lines(text), start=1):
        target, sep, rest = line.strip().partition(":")
        words = rest.split(" ", 1)
        if not sep or target not in TREC_CLASSES or len(words) < 2:
            raise TransferDataError(f"{where}: line {i} is not 'COARSE:fine question' with COARSE in "
                                    f"{', '.join(TREC_CLASSES)}; {_REFETCH}")
        a.append(join_words(words[1]))
        labels.append(TREC_CLASSES.index(target))
    return Split(tuple(a), tuple(labels))


def parse_mrpc(text: str, where: str = "MRPC") -> Split:
    """MSR paraphrase file: header row skipped; column 0 the label, columns 3 and 4 the sentences."""
    a, b, labels = [], [], []
    lines = _text_lines(text)
    for i, line in enumerate(lines[1:], start=2):
        fields = line.strip().split("\t")
        if len(fields) < 5 or fields[0] not in ("0", "1"):
            raise TransferDataError(f"{where}: line {i} is not 'label<TAB>id<TAB>id<TAB>sentence<TAB>sentence'"
                                    f" with label 0|1; {_REFETCH}")
        labels.append(int(fields[0]))
        a.append(join_words(fields[3]))
        b.append(join_words(fields[4]))
    return Split(tuple(a), tuple(labels), tuple(b))


# ---------------------------------------------------------------------------------------------
# Loading (I/O)


def _read(root: Path, rel: str, task: str, files: dict[str, str], encoding: str) -> str:
    """Read a data file, recording the sha256 of the exact bytes read."""
    path = root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TransferDataError(f"{task}: missing file {rel} in {root}; {_REFETCH}") from None
    files[rel] = hashlib.sha256(data).hexdigest()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise TransferDataError(f"{task}: {rel} in {root} is not valid {encoding} ({e}); {_REFETCH}") from None


def check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown transfer task {name!r}; choose from {', '.join(TASKS)}")


def load_task(senteval_dir: str | Path, name: str) -> TransferTask:
    """Load one task's splits (no count check; see :func:`load_tasks`)."""
    check_task(name)
    root = Path(senteval_dir)
    files: dict[str, str] = {}
    if name in BINARY_TASKS:
        pos, neg = (_read(root, rel, name, files, "latin-1") for rel in _BINARY_FILES[name])
        splits = {"all": parse_binary(pos, neg)}
    else:
        encoding = "latin-1" if name == "TREC" else "utf-8"
        parse = {"SST2": parse_sst2, "TREC": parse_trec, "MRPC": parse_mrpc}[name]
        splits = {split: parse(_read(root, rel, name, files, encoding), where=f"{name} {rel}")
                  for split, rel in _SPLIT_FILES[name].items()}
    return TransferTask(name, splits, files, {k: len(v) for k, v in splits.items()})


def check_counts(task: TransferTask, expected: dict[str, int] | None, senteval_dir: str | Path) -> None:
    """Refuse a task whose split sizes differ from the expected ones."""
    if expected is not None and task.full_counts != expected:
        raise TransferDataError(
            f"{task.name}: expected {expected} examples but found {task.full_counts} in {senteval_dir}; "
            f"the data is truncated or not SentEval's: {_REFETCH}")


def load_tasks(senteval_dir: str | Path, tasks: Sequence[str] | None = None,
               expected_counts: dict[str, dict[str, int]] | None = None,
               max_examples: int | None = None) -> list[TransferTask]:
    """Load and count-check ``tasks`` (all seven by default) from an extracted senteval.tar.

    ``expected_counts`` overrides the real sizes per task (hand-made test data);
    ``max_examples`` then subsamples every larger split (:func:`subsample_task`).
    """
    root = Path(senteval_dir)
    if not root.is_dir():
        raise TransferDataError(f"senteval directory not found: {root}; fetch and extract senteval.tar there")
    names = list(dict.fromkeys(tasks)) if tasks else list(TASKS)
    for name in names:
        check_task(name)
    if not any((root / sub).is_dir() for sub in ("MR", "CR", "SUBJ", "MPQA", "SST", "TREC", "MRPC")):
        raise TransferDataError(f"{root} has none of MR/ CR/ SUBJ/ MPQA/ SST/ TREC/ MRPC/: give the folder "
                                "where senteval.tar was extracted")
    expected = {**EXPECTED_COUNTS, **(expected_counts or {})}
    loaded = []
    for name in names:
        task = load_task(root, name)
        check_counts(task, expected.get(name), root)
        loaded.append(subsample_task(task, max_examples) if max_examples else task)
    return loaded


# ---------------------------------------------------------------------------------------------
# Row order, folds, subsets


def senteval_order(split: Split) -> list[int]:
    """Row order in which SentEval embeds a split and hands it to the classifier.

    A stable sort by (word count, label); for pairs by (words of A, words of B, label).
    """
    if split.b is None:
        key = [(len(s.split()), y) for s, y in zip(split.a, split.labels)]
    else:
        key = [(len(s.split()), len(t.split()), y) for s, t, y in zip(split.a, split.b, split.labels)]
    return sorted(range(len(split)), key=key.__getitem__)


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


def subsample_task(task: TransferTask, max_examples: int, seed: int = SEED) -> TransferTask:
    """The task with every split larger than ``max_examples`` cut to a stratified subset of that size."""
    splits = {name: split if len(split) <= max_examples
              else split.take(stratified_subset(split.labels, max_examples, seed))
              for name, split in task.splits.items()}
    return TransferTask(task.name, splits, task.files, task.full_counts)


# ---------------------------------------------------------------------------------------------
# The classifier


@dataclass
class LogRegFit:
    """A trained logistic regression (the best checkpoint on its validation data)."""

    reg: float
    weight: "object"  # torch.Tensor (C, D), CPU
    bias: "object"  # torch.Tensor (C,), CPU
    best_val: float  # validation accuracy of the kept model, in [0, 1]
    epochs: int  # passes over the training data when training stopped

    def predict(self, X, device: str = "cpu", chunk: int = 65536) -> np.ndarray:
        import torch

        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        w, b = self.weight.to(device), self.bias.to(device)
        with torch.no_grad():
            out = [torch.nn.functional.linear(X[i:i + chunk].to(device), w, b).argmax(1).cpu()
                   for i in range(0, len(X), chunk)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    def score(self, X, y, device: str = "cpu") -> float:
        """Accuracy in [0, 1] (SentEval's ``correct / n``)."""
        y = np.asarray(y)
        return int((self.predict(X, device) == y).sum()) / len(y)


@dataclass(frozen=True)
class FitJob:
    """One SentEval classifier fit on rows of a shared feature matrix.

    ``train`` rows in training order; early stopping on the ``val`` rows, or (``val=None``) on
    the first ``validation_split`` of a RandomState(seed) permutation of ``train``.
    """

    train: np.ndarray
    reg: float
    val: np.ndarray | None = None


class _Optimizer:
    """Adam / RMSprop with coupled weight decay for a bank of J models, one row each.

    The update of each model is torch.optim.Adam's / RMSprop's single-tensor update with
    ``weight_decay = reg`` of that model; a model whose ``active`` flag is off this step is left
    exactly as it is (parameters, moments and step count), as an optimizer that is not stepped.
    """

    def __init__(self, name: str, params: list, regs, device):
        import torch

        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose adam or rmsprop")
        self.name, self.hp = name, OPTIMIZERS[name]
        self.params = params
        self.wd = [torch.as_tensor(np.asarray(regs), dtype=p.dtype, device=device).view(-1, *[1] * (p.dim() - 1))
                   for p in params]
        self.sq = [torch.zeros_like(p) for p in params]
        self.avg = [torch.zeros_like(p) for p in params] if name == "adam" else None
        self.steps = np.zeros(len(regs), dtype=np.int64)

    def keep(self, rows) -> None:
        """Drop the models not in ``rows`` (they stopped training)."""
        self.params[:] = [p[rows] for p in self.params]
        self.wd = [w[rows] for w in self.wd]
        self.sq = [s[rows] for s in self.sq]
        if self.avg is not None:
            self.avg = [a[rows] for a in self.avg]
        self.steps = self.steps[rows.cpu().numpy() if hasattr(rows, "cpu") else rows]

    def step(self, grads: list, active) -> None:
        import torch

        act_np = active.cpu().numpy()
        self.steps = self.steps + act_np
        if self.name == "adam":
            beta1, beta2 = self.hp["betas"]
            steps = np.maximum(self.steps, 1).astype(np.float64)
            step_size = torch.as_tensor(self.hp["lr"] / (1 - beta1 ** steps), dtype=self.params[0].dtype)
            bc2_sqrt = torch.as_tensor(np.sqrt(1 - beta2 ** steps), dtype=self.params[0].dtype)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            shape = (-1,) + (1,) * (p.dim() - 1)
            mask = active.view(shape)
            g = g + self.wd[i] * p
            if self.name == "adam":
                avg = self.avg[i].lerp(g, 1 - beta1)
                sq = self.sq[i] * beta2 + (1 - beta2) * g * g
                denom = sq.sqrt() / bc2_sqrt.to(p.device).view(shape) + self.hp["eps"]
                new = p - step_size.to(p.device).view(shape) * avg / denom
                self.avg[i] = torch.where(mask, avg, self.avg[i])
            else:
                sq = self.sq[i] * self.hp["alpha"] + (1 - self.hp["alpha"]) * g * g
                new = p - self.hp["lr"] * g / (sq.sqrt() + self.hp["eps"])
            self.sq[i] = torch.where(mask, sq, self.sq[i])
            p.copy_(torch.where(mask, new, p))


def train_jobs(X, y, jobs: Sequence[FitJob], nclasses: int, settings: ClassifierSettings, *,
               device: str = "cpu", seed: int = SEED, dtype=None) -> list[LogRegFit]:
    """Run SentEval classifier fits (``MLP`` with ``nhid=0``) on rows of ``X``; one result per job.

    Every fit starts as SentEval's does after reseeding with ``seed``: the Linear(D, C) drawn
    under ``torch.manual_seed(seed)`` and a fresh ``RandomState(seed)`` for the validation split
    and the per-pass shuffles. Per pass, the training rows are visited in a new permutation in
    mini-batches of ``batch_size`` (last one partial); each step minimises the batch-mean
    cross-entropy with the mode's optimizer and ``weight_decay = reg``. After every
    ``epoch_size`` passes the validation accuracy is checked: a strictly better one keeps a copy
    of the model; otherwise, once ``tenacity`` earlier checks have failed to improve, the fit
    stops (the failure counter is never reset). At most ``max_epoch`` (+ one round) passes; the
    kept model is returned.

    The jobs are independent and are trained side by side as one bank (batched matrix
    products), each with its own data, shuffles, weight decay, optimizer state and stopping; a
    job whose pass has fewer batches than the longest skips the extra steps.

    ``dtype``: float32 (SentEval's, the default); float64 lets tests compare against a literal
    reference loop without float32 rounding deciding a tied validation prediction.
    """
    import torch

    dtype = dtype or torch.float32

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, d) with one label per row; got X {X.shape}, y {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= nclasses):
        raise ValueError(f"labels must lie in [0, {nclasses})")
    if not jobs:
        return []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = torch.nn.Linear(X.shape[1], nclasses)  # created on CPU, as SentEval's before .cuda()
    rngs, trains, vals = [], [], []
    for job in jobs:
        rng = np.random.RandomState(seed)  # = np.random.seed(seed), then the global draws of one fit
        train = np.asarray(job.train, dtype=np.int64)
        if job.val is None:
            perm = rng.permutation(len(train))
            cut = int(VALIDATION_SPLIT * len(train))
            train, val = train[perm[cut:]], train[perm[:cut]]
        else:
            val = np.asarray(job.val, dtype=np.int64)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"too few examples to fit: {len(train)} to train on, {len(val)} to validate on")
        rngs.append(rng)
        trains.append(train)
        vals.append(val)
    dev = torch.device(device)
    vals_t = [torch.from_numpy(v).to(dev) for v in vals]
    X_t, y_t = torch.from_numpy(X).to(device=dev, dtype=dtype), torch.from_numpy(y).to(dev)
    J, bs = len(jobs), settings.batch_size
    W = init.weight.detach().to(device=dev, dtype=dtype).expand(J, -1, -1).clone()  # (J, C, D)
    b = init.bias.detach().to(device=dev, dtype=dtype).expand(J, -1).clone()  # (J, C)
    params = [W, b]
    opt = _Optimizer(settings.optim, params, [j.reg for j in jobs], dev)
    ids = list(range(J))  # the job of each bank row
    best = [-1.0] * J
    kept: list = [None] * J
    strikes = [0] * J
    stopped_at = [0] * J
    nepoch = 0
    with torch.no_grad():
        while ids and nepoch <= settings.max_epoch:
            W, b = params
            n_rows = [len(trains[j]) for j in ids]
            steps = -(-max(n_rows) // bs)
            for _ in range(settings.epoch_size):
                order = np.zeros((len(ids), steps * bs), dtype=np.int64)
                valid = np.zeros((len(ids), steps * bs), dtype=np.float32)
                for r, j in enumerate(ids):
                    order[r, :n_rows[r]] = trains[j][rngs[j].permutation(n_rows[r])]
                    valid[r, :n_rows[r]] = 1.0
                order_t, valid_t = torch.from_numpy(order).to(dev), torch.from_numpy(valid).to(dev, dtype)
                for s in range(steps):
                    idx, mask = order_t[:, s * bs:(s + 1) * bs], valid_t[:, s * bs:(s + 1) * bs]
                    count = mask.sum(1)  # rows in this step's batch, per job (0: the job's pass is over)
                    xb = X_t[idx]  # (J, B, D)
                    logits = torch.baddbmm(b.unsqueeze(1), xb, W.transpose(1, 2))  # (J, B, C)
                    g = torch.softmax(logits, dim=2)
                    g.scatter_add_(2, y_t[idx].unsqueeze(2), -torch.ones_like(mask).unsqueeze(2))
                    g = g * (mask / count.clamp(min=1).unsqueeze(1)).unsqueeze(2)  # d(mean CE)/d logits
                    opt.step([torch.bmm(g.transpose(1, 2), xb), g.sum(1)], count > 0)
            nepoch += settings.epoch_size
            still = []
            for r, j in enumerate(ids):
                acc = _accuracy(X_t[vals_t[j]], y_t[vals_t[j]], W[r], b[r])
                if acc > best[j]:
                    best[j] = acc
                    kept[j] = (W[r].cpu().clone(), b[r].cpu().clone())
                    still.append(r)
                elif strikes[j] >= settings.tenacity:
                    strikes[j] += 1
                    stopped_at[j] = nepoch
                else:
                    strikes[j] += 1
                    still.append(r)
            if len(still) < len(ids):
                rows = torch.as_tensor(still, dtype=torch.long, device=dev)
                opt.keep(rows)
                ids = [ids[r] for r in still]
    for j in ids:  # ran out of epochs
        stopped_at[j] = nepoch
    return [LogRegFit(float(job.reg), kept[j][0], kept[j][1], best[j], stopped_at[j]) for j, job in enumerate(jobs)]


def _accuracy(X, y, weight, bias, chunk: int = 65536) -> float:
    import torch

    correct = 0
    for i in range(0, len(X), chunk):
        pred = torch.nn.functional.linear(X[i:i + chunk], weight, bias).argmax(1)
        correct += int((pred == y[i:i + chunk]).sum().item())
    return correct / len(X)


def fit_logreg(X, y, nclasses: int, regs: Sequence[float], settings: ClassifierSettings, *,
               validation: tuple | None = None, validation_split: bool = False,
               device: str = "cpu", seed: int = SEED, dtype=None) -> list[LogRegFit]:
    """One fit per value in ``regs`` on all of (X, y), early-stopping on ``validation`` =
    (X_val, y_val), or with ``validation_split=True`` on SentEval's 5 % split of (X, y)."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if not regs:
        raise ValueError("fit_logreg needs at least one regularisation value")
    train = np.arange(len(X))
    if validation is not None:
        Xv, yv = np.asarray(validation[0], dtype=np.float32), np.asarray(validation[1], dtype=np.int64)
        val = np.arange(len(X), len(X) + len(Xv))
        X, y = np.concatenate([X, Xv.reshape(-1, X.shape[1])]), np.concatenate([y, yv])
    elif validation_split:
        val = None
    else:
        raise ValueError("fit_logreg needs validation data or validation_split=True")
    return train_jobs(X, y, [FitJob(train, float(reg), val) for reg in regs], nclasses, settings,
                      device=device, seed=seed, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Protocols (B.3); accuracies in percent, rounded where and as SentEval rounds them


def _round_np(x) -> float:
    """SentEval's ``round(numpy_float, 2)`` (numpy's rounding)."""
    return float(np.round(np.float64(x), 2))


def _round_py(x: float) -> float:
    """SentEval's ``round(python_float, 2)``."""
    return round(float(x), 2)


def _grid(scores_per_reg: list[list[float]]) -> tuple[list[float], int]:
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
        scores, best = _grid(per_reg)
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
    scores, best = _grid(per_reg)
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


def _as_matrix(emb, n: int) -> np.ndarray:
    if hasattr(emb, "detach"):
        emb = emb.detach().float().cpu().numpy()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embed returned shape {emb.shape}; expected ({n}, D), one row per sentence")
    return emb


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


@contextlib.contextmanager
def _classifier_threads(device: str):
    """One intra-op thread for the classifier on CPU: its matrices are small, so threads only add
    overhead (a lot on a busy machine), and a fixed count keeps the arithmetic the same on every
    machine. The previous setting is restored."""
    import torch

    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_task(task: TransferTask, embed: Embedder, mode: str = "fast", device: str = "cpu",
             log: Log | None = None) -> dict:
    """Embed the task's distinct sentences once and run its protocol; returns its details."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    settings = SETTINGS[mode]
    sentences = distinct_sentences(task)
    start = time.perf_counter()
    emb = _as_matrix(embed(list(sentences)), len(sentences))
    encode_seconds = time.perf_counter() - start
    row = {s: i for i, s in enumerate(sentences)}
    data = {name: features(split, emb, row) for name, split in task.splits.items()}
    start = time.perf_counter()
    with _classifier_threads(device):
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


# ---------------------------------------------------------------------------------------------
# End to end


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate(model_path: str | Path, pooler: str, senteval_dir: str | Path, mode: str = "fast", *,
             tasks: Sequence[str] | None = None, batch_size: int = 128, device: str | None = None,
             dtype: str = "fp32", max_examples: int | None = None, prompt_protocol: str | None = None,
             expected_counts: dict[str, dict[str, int]] | None = None, progress: bool = False,
             log: Log | None = None) -> dict:
    """Load the data (count-checked), the HF model at ``model_path``, run the tasks; adds ``meta``.

    ``pooler='mask'`` embeds with the prompt template (``clusterns_prompt.json``, else the
    family's default templates) and its test protocol (``prompt_protocol`` overrides it), as
    :func:`clusterns.sts.evaluate` does. The classifier runs on the encoder's ``device``.
    """
    from transformers import AutoTokenizer

    from clusterns.encoder import check_pooler, load_backbone
    from clusterns.provenance import environment
    from clusterns.sts import DTYPES, effective_dtype, model_embedder, resolve_device

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if pooler != "mask":
        check_pooler(pooler)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples}")
    task_list = load_tasks(senteval_dir, tasks, expected_counts, max_examples)
    device = resolve_device(device)
    model_path = Path(model_path)
    model = load_backbone(model_path).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    used_dtype = effective_dtype(device, dtype)
    embed, prompt = model_embedder(model, tokenizer, model_path, pooler, batch_size=batch_size, device=device,
                                   dtype=used_dtype, progress=progress, prompt_protocol=prompt_protocol)
    results = score_tasks(task_list, embed, mode, device, log)
    settings = SETTINGS[mode]
    results["meta"] = {
        "model": str(model_path.resolve()),
        "pooler": pooler,
        "mode": mode,
        "senteval_mode": "test" if mode == "test" else "fasttest",
        "classifier": {**asdict(settings), "nhid": 0, "optimizer": OPTIMIZERS[settings.optim], "regs": list(REGS),
                       "seed": SEED, "validation_split": VALIDATION_SPLIT},
        "tasks": [t.name for t in task_list],
        "subsampled": any(t.subsampled for t in task_list),
        "max_examples": max_examples,
        "senteval": str(Path(senteval_dir).resolve()),
        "files_sha256": {rel: sha for t in task_list for rel, sha in t.files.items()},
        **results["meta"],
        "batch_size": batch_size,
        "device": device,
        "dtype": used_dtype,
        "prompt": prompt,
        "environment": environment(),
    }
    return results


def format_table(results: dict) -> str:
    """Task, examples used, accuracy x 100 (and dev), and the average."""
    lines = [f"{'task':<6} {'examples':>20} {'acc':>7} {'dev':>7}"]
    for name, d in results["details"].items():
        counts = "/".join(str(v) for v in d["counts"].values())
        extra = f"  F1 {d['f1']:.2f}" if "f1" in d else ""
        lines.append(f"{name:<6} {counts:>20} {d['acc']:>7.2f} {d['devacc']:>7.2f}{extra}")
    lines.append(f"{'avg':<6} {'':>20} {results['avg']:>7.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Table over several result files


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


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # noqa: D102 - argparse hook: user errors exit 1 like the others
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from clusterns.encoder import POOLERS
    from clusterns.sts import DTYPES

    p = _Parser(prog="python -m clusterns.transfer",
                description="Score a HF encoder on the SentEval transfer tasks (SimCSE test/fasttest protocol). "
                            "See also: python -m clusterns.transfer table --help")
    p.add_argument("--model", required=True, help="HF model folder (AutoModel/AutoTokenizer)")
    p.add_argument("--pooler", required=True, help=f"one of {', '.join(POOLERS)}, or mask (prompt models)")
    p.add_argument("--prompt-protocol", choices=("raw", "denoised", "spliced"), default=None,
                   help="mask pooler: embedding protocol (default: the model's clusterns_prompt.json, else raw)")
    p.add_argument("--senteval", required=True, help="folder where senteval.tar was extracted (holds MR/, SST/, ...)")
    p.add_argument("--mode", default="fast", choices=MODES,
                   help="test: SimCSE 'test' (10-fold, adam); fast: SimCSE 'fasttest' (5-fold, rmsprop)")
    p.add_argument("--output", required=True, help="result JSON (written atomically)")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, metavar="TASK",
                   help=f"subset of {', '.join(TASKS)} (default: all seven)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="encoder and classifier device (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="bf16/fp16 autocast for encoding, CUDA only")
    p.add_argument("--max-examples", type=int, default=None,
                   help="quick checks only: cut every split to a seeded stratified subset of N (marked subsampled)")
    return p


def build_table_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m clusterns.transfer table",
                description="One table (transfer.md, transfer.csv) from several transfer result files.")
    p.add_argument("--inputs", nargs="+", required=True, help="transfer JSON files, one row each")
    p.add_argument("--labels", nargs="+", default=None, help="row labels, one per input (default: the folders)")
    p.add_argument("--out-dir", required=True, help="where transfer.md and transfer.csv are written")
    return p


def _table_main(argv: Sequence[str]) -> int:
    try:
        args = build_table_parser().parse_args(argv)
        md, csv_path = transfer_table(args.inputs, args.labels, args.out_dir)
    except (_UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(md.read_text(), end="")
    print(f"wrote {md} and {csv_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; user errors print ``error: ...`` and return 1 with no output written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return _table_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        results = evaluate(args.model, args.pooler, args.senteval, args.mode, tasks=args.tasks,
                           batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                           max_examples=args.max_examples, prompt_protocol=args.prompt_protocol,
                           progress=sys.stderr.isatty(), log=_stderr)
        from clusterns.sts import _json_safe

        write_json_atomic(args.output, _json_safe(results))
    except (_UsageError, TransferDataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    meta = results["meta"]
    note = " (SUBSAMPLED)" if meta["subsampled"] else ""
    print(f"mode {meta['mode']}{note}: {meta['n_sentences']} sentences encoded in {meta['encode_seconds']:.1f} s, "
          f"classifier {meta['classify_seconds']:.1f} s on {meta['device']}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
