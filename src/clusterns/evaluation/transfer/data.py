"""The seven transfer tasks from an extracted ``senteval.tar``: parsed as SentEval reads them,
count-checked against the standard sizes.

Layout: ``DIR/MR``, ``DIR/CR``, ``DIR/SUBJ``, ``DIR/MPQA``, ``DIR/SST/binary``, ``DIR/TREC``,
``DIR/MRPC``. The binary tasks and TREC are read as Latin-1, SST and MRPC as UTF-8; words are
split on whitespace and re-joined with single spaces, as SimCSE's batcher does. A task's split
sizes must equal :data:`EXPECTED_COUNTS`, or the data is refused; ``max_examples`` then keeps a
seeded stratified subset of every larger split (quick checks only, marked ``subsampled``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from clusterns.evaluation.base import DataError, read_data_file, text_lines
from clusterns.evaluation.transfer.folds import SEED, stratified_subset

__all__ = ["TASKS", "BINARY_TASKS", "EXPECTED_COUNTS", "TREC_CLASSES", "NCLASSES", "TransferDataError", "Split",
           "TransferTask", "join_words", "parse_binary", "parse_sst2", "parse_trec", "parse_mrpc", "check_task",
           "load_task", "check_counts", "load_tasks", "subsample_task"]

TASKS = ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC")
BINARY_TASKS = ("MR", "CR", "SUBJ", "MPQA")

# Examples per split in the real senteval.tar.
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
_REFETCH = "re-fetch and extract senteval.tar (SentEval layout: DIR/MR, DIR/SST/binary, DIR/TREC, ...)"


class TransferDataError(DataError):
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


def parse_sst2(text: str, where: str = "SST2") -> Split:
    """``sentence<TAB>label`` per line (SST binary)."""
    a, labels = [], []
    for i, line in enumerate(text_lines(text), start=1):
        fields = line.strip().split("\t")
        if len(fields) < 2 or fields[1] not in ("0", "1"):
            raise TransferDataError(f"{where}: line {i} is not 'sentence<TAB>0|1'; {_REFETCH}")
        a.append(join_words(fields[0]))
        labels.append(int(fields[1]))
    return Split(tuple(a), tuple(labels))


def parse_trec(text: str, where: str = "TREC") -> Split:
    """``COARSE:fine question`` per line; the coarse label is kept, the fine one dropped."""
    a, labels = [], []
    for i, line in enumerate(text_lines(text), start=1):
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
    lines = text_lines(text)
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


def check_task(name: str) -> None:
    """Refuse a name that is not one of the seven tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown transfer task {name!r}; choose from {', '.join(TASKS)}")


def load_task(senteval_dir: str | Path, name: str) -> TransferTask:
    """Load one task's splits (no count check; see :func:`load_tasks`)."""
    check_task(name)
    root = Path(senteval_dir)
    files: dict[str, str] = {}
    if name in BINARY_TASKS:
        pos, neg = (read_data_file(root, rel, name, files, _REFETCH, encoding="latin-1", error=TransferDataError)
                    for rel in _BINARY_FILES[name])
        splits = {"all": parse_binary(pos, neg)}
    else:
        encoding = "latin-1" if name == "TREC" else "utf-8"
        parse = {"SST2": parse_sst2, "TREC": parse_trec, "MRPC": parse_mrpc}[name]
        splits = {split: parse(read_data_file(root, rel, name, files, _REFETCH, encoding=encoding,
                                              error=TransferDataError), where=f"{name} {rel}")
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


def subsample_task(task: TransferTask, max_examples: int, seed: int = SEED) -> TransferTask:
    """The task with every split larger than ``max_examples`` cut to a stratified subset of that size."""
    splits = {name: split if len(split) <= max_examples
              else split.take(stratified_subset(split.labels, max_examples, seed))
              for name, split in task.splits.items()}
    return TransferTask(task.name, splits, task.files, task.full_counts)
