"""SentEval transfer tasks (MR, CR, SUBJ, MPQA, SST2, TREC, MRPC) as SimCSE's evaluation scripts
run them: frozen embeddings, logistic regression trained like SentEval's PyTorch classifier (see
the README section "Transfer tasks (SentEval)").

The package, by concern:

* :mod:`~clusterns.evaluation.transfer.data`: the seven tasks from an extracted ``senteval.tar``,
  parsed as SentEval reads them and count-checked against the standard sizes.
* :mod:`~clusterns.evaluation.transfer.folds`: scikit-learn's seeded ``StratifiedKFold``
  reimplemented, and the stratified subsets of ``--max-examples``.
* :mod:`~clusterns.evaluation.transfer.classifier`: the logistic regression, trained as SentEval's
  ``MLP`` with ``nhid=0``, many fits side by side as one bank.
* :mod:`~clusterns.evaluation.transfer.protocols`: nested CV (MR/CR/SUBJ/MPQA), dev selection
  (SST2), k-fold CV then refit (TREC, MRPC), the two modes, and ``score_tasks(tasks, embed)``
  with any embedding function.
* :mod:`~clusterns.evaluation.transfer.table`: one table over several result files.
* here: the evaluator (:func:`evaluate`, :func:`main`), on the shared evaluator contract
  (:mod:`clusterns.evaluation.base`). ``max_examples`` (off by default) keeps a seeded, stratified
  subset of every split larger than it, for quick checks; such results are marked ``subsampled``
  and are not comparable to the paper's.

CLI::

    python -m clusterns.transfer --model PATH [--pooler POOLER] --senteval DIR --mode test|fast \\
        --output FILE.json [--tasks ...] [--device cpu|cuda] [--batch-size N] [--max-examples N]
    python -m clusterns.transfer table --inputs A.json B.json ... [--labels A B ...] --out-dir DIR
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from clusterns.config import EVALUATION_DEFAULTS
from clusterns.evaluation.base import load_model, model_parser, provenance, resolve_pooler, run_cli
from clusterns.evaluation.transfer.classifier import (OPTIMIZERS, VALIDATION_SPLIT, ClassifierSettings, FitJob,
                                                      LogRegFit, fit_logreg, train_jobs)
from clusterns.evaluation.transfer.data import (BINARY_TASKS, EXPECTED_COUNTS, NCLASSES, TASKS, TREC_CLASSES, Split,
                                                TransferDataError, TransferTask, check_counts, check_task,
                                                join_words, load_task, load_tasks, parse_binary, parse_mrpc,
                                                parse_sst2, parse_trec, subsample_task)
from clusterns.evaluation.transfer.folds import SEED, stratified_folds, stratified_kfold, stratified_subset
from clusterns.evaluation.transfer.protocols import (MODES, PROTOCOLS, REGS, SETTINGS, Embedder, Log,
                                                     distinct_sentences, f1_binary, features, grid,
                                                     kfold_selection, nested_cv, run_task, score_tasks,
                                                     senteval_order, split_selection)
from clusterns.evaluation.transfer.table import main as table_main
from clusterns.evaluation.transfer.table import transfer_table

__all__ = [
    # data
    "TASKS", "BINARY_TASKS", "EXPECTED_COUNTS", "TREC_CLASSES", "NCLASSES", "TransferDataError", "Split",
    "TransferTask", "join_words", "parse_binary", "parse_sst2", "parse_trec", "parse_mrpc", "check_task",
    "load_task", "check_counts", "load_tasks", "subsample_task",
    # folds
    "SEED", "stratified_folds", "stratified_kfold", "stratified_subset",
    # classifier
    "VALIDATION_SPLIT", "OPTIMIZERS", "ClassifierSettings", "LogRegFit", "FitJob", "train_jobs", "fit_logreg",
    # protocols
    "MODES", "SETTINGS", "REGS", "PROTOCOLS", "Embedder", "Log", "grid", "nested_cv", "split_selection",
    "kfold_selection", "f1_binary", "senteval_order", "distinct_sentences", "features", "run_task", "score_tasks",
    # table
    "transfer_table", "table_main",
    # the evaluator
    "evaluate", "format_table", "build_parser", "main",
]


def evaluate(model_path: str | Path, pooler: str | None, senteval_dir: str | Path, mode: str = "fast", *,
             tasks: Sequence[str] | None = None, batch_size: int = EVALUATION_DEFAULTS["batch_size"],
             device: str | None = None, dtype: str = EVALUATION_DEFAULTS["dtype"], max_examples: int | None = None,
             prompt_protocol: str | None = None, expected_counts: dict[str, dict[str, int]] | None = None,
             progress: bool = False, log: Log | None = None) -> dict:
    """Load the data (count-checked) and the model at ``model_path``, run the tasks; adds ``meta``.

    ``pooler`` None: the one the model folder declares. A prompt model (the ``mask`` pooler)
    embeds with its template and test protocol (``prompt_protocol`` overrides it). The classifier
    runs on the encoder's ``device``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    pooler = resolve_pooler(model_path, pooler)  # before the data: a wrong name fails fast
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples}")
    task_list = load_tasks(senteval_dir, tasks, expected_counts, max_examples)
    loaded = load_model(model_path, pooler, device=device, dtype=dtype)
    embed = loaded.embedder(prompt_protocol, batch_size=batch_size, progress=progress)
    results = score_tasks(task_list, embed, mode, loaded.device, log)
    settings = SETTINGS[mode]
    files = {rel: sha for t in task_list for rel, sha in t.files.items()}
    facts = provenance(loaded, data_key="senteval", data_dir=senteval_dir, files=files, batch_size=batch_size,
                       prompt=loaded.prompt_for(prompt_protocol))
    # The keys in the order the result files have always had: the model, the protocol, the data,
    # the counts and times, then the rest of the shared facts (batch, device, dtype, prompt, versions).
    model = {k: facts.pop(k) for k in ("model", "pooler")}
    data = {k: facts.pop(k) for k in ("senteval", "files_sha256")}
    results["meta"] = {
        **model,
        "mode": mode,
        "senteval_mode": "test" if mode == "test" else "fasttest",
        "classifier": {**asdict(settings), "nhid": 0, "optimizer": OPTIMIZERS[settings.optim], "regs": list(REGS),
                       "seed": SEED, "validation_split": VALIDATION_SPLIT},
        "tasks": [t.name for t in task_list],
        "subsampled": any(t.subsampled for t in task_list),
        "max_examples": max_examples,
        **data,
        **results["meta"],
        **facts,
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


def build_parser():
    p = model_parser("python -m clusterns.transfer",
                     "Score a HF encoder on the SentEval transfer tasks (SimCSE test/fasttest protocol). "
                     "See also: python -m clusterns.transfer table --help")
    p.add_argument("--senteval", required=True, help="folder where senteval.tar was extracted (holds MR/, SST/, ...)")
    p.add_argument("--mode", default="fast", choices=MODES,
                   help="test: SimCSE 'test' (10-fold, adam); fast: SimCSE 'fasttest' (5-fold, rmsprop)")
    p.add_argument("--tasks", nargs="+", default=None, choices=TASKS, metavar="TASK",
                   help=f"subset of {', '.join(TASKS)} (default: all seven)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="quick checks only: cut every split to a seeded stratified subset of N (marked subsampled)")
    return p


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(results: dict, args) -> str:
    meta = results["meta"]
    note = " (SUBSAMPLED)" if meta["subsampled"] else ""
    return (format_table(results) + f"\nmode {meta['mode']}{note}: {meta['n_sentences']} sentences encoded in "
            f"{meta['encode_seconds']:.1f} s, classifier {meta['classify_seconds']:.1f} s on {meta['device']}; "
            f"wrote {args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``table`` as the first argument: :func:`table_main`); user errors print
    ``error: ...`` and return 1 with no output written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return table_main(argv[1:])

    def run(args) -> dict:
        return evaluate(args.model, args.pooler, args.senteval, args.mode, tasks=args.tasks,
                        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                        max_examples=args.max_examples, prompt_protocol=args.prompt_protocol,
                        progress=sys.stderr.isatty(), log=_stderr)

    return run_cli(build_parser(), argv, run, _summary)
