"""MTEB scores of a model, so the SentEval-protocol numbers sit beside the ones most readers
compare sentence encoders by.

The ``mteb`` package runs its tasks (default: its English STS tasks) on the model through our
embedding runtime (the same embeddings every other evaluator scores; cosine similarity), so
the only differences from ``clusterns.sts`` are MTEB's data and metric choices. MTEB downloads
each task's data from the Hugging Face Hub; ``--local-stsb SENTEVAL_DIR`` builds its
``STSBenchmark`` task from SentEval's STS-B test file instead (offline checks, the tests).

CLI::

    python -m clusterns.mteb_eval --model PATH [--pooler P] --output FILE.json [--tasks STS12 ...]
        [--local-stsb SENTEVAL_DIR]
    python -m clusterns.mteb_eval table --inputs A.json ... --labels ... --sts A_sts.json ... --out-dir DIR
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from clusterns.config import EVALUATION_DEFAULTS, MTEB_DEFAULTS
from clusterns.evaluation.base import Parser, UsageError, load_model, model_parser, provenance, resolve_pooler, run_cli
from clusterns.utils.files import write_text_atomic

__all__ = ["MtebEncoder", "local_stsb_task", "evaluate", "mteb_table", "main"]


class MtebEncoder:
    """An :class:`~clusterns.evaluation.embedding.Embedder` behind MTEB's encoder interface."""

    def __init__(self, embed, name: str) -> None:
        self.embed, self.name = embed, name
        self.mteb_model_meta = None  # MTEB then names the model "no_model_name/available"

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        return self.embed([text for batch in inputs for text in batch["text"]])

    @staticmethod
    def _unit(x):
        import torch

        return torch.nn.functional.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float64), dim=-1)

    def similarity(self, a, b):
        return self._unit(a) @ self._unit(b).T

    def similarity_pairwise(self, a, b):
        return (self._unit(a) * self._unit(b)).sum(-1)


def local_stsb_task(senteval_dir: str | Path):
    """MTEB's ``STSBenchmark`` task with its test split built from SentEval's ``sts-test.csv``
    (the pairs and gold scores ``clusterns.sts`` scores), so no download is needed."""
    from datasets import Dataset, DatasetDict
    from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

    from clusterns.evaluation.sts import load_task

    split = load_task(senteval_dir, "STSBenchmark", "test").subsets[0]

    class LocalSTSBenchmark(STSBenchmarkSTS):
        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": list(split.sent1), "sentence2": list(split.sent2), "score": list(split.gold)})})
            self.data_loaded = True

    return LocalSTSBenchmark()


def evaluate(model_path: str | Path, pooler: str | None, *, tasks: Sequence[str] = MTEB_DEFAULTS["tasks"],
             local_stsb: str | Path | None = None, batch_size: int = EVALUATION_DEFAULTS["batch_size"],
             device: str | None = None, dtype: str = EVALUATION_DEFAULTS["dtype"],
             prompt_protocol: str | None = None) -> dict:
    """MTEB main scores x 100 per task (``avg`` over them), the full score dicts and ``meta``."""
    import mteb

    pooler = resolve_pooler(model_path, pooler)
    task_objs = [local_stsb_task(local_stsb) if local_stsb is not None and name == "STSBenchmark"
                 else mteb.get_task(name) for name in tasks]
    loaded = load_model(model_path, pooler, device=device, dtype=dtype)
    encoder = MtebEncoder(loaded.embedder(prompt_protocol, batch_size=batch_size), str(model_path))
    t0 = time.perf_counter()
    result = mteb.evaluate(encoder, task_objs, cache=None, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    results, details = {}, {}
    for tr in result.task_results:
        scores = {split: [{k: v for k, v in s.items() if isinstance(v, (int, float))} for s in subsets]
                  for split, subsets in tr.scores.items()}
        main = [s["main_score"] for subsets in scores.values() for s in subsets]
        results[tr.task_name] = 100.0 * float(np.mean(main))
        details[tr.task_name] = scores
    results["avg"] = float(np.mean([results[t] for t in details])) if details else math.nan
    results["details"] = details
    files = {}
    if local_stsb is not None:
        files = {"STS/STSBenchmark/sts-test.csv": "local (SentEval)"}
    results["meta"] = {"tasks": list(tasks), "local_stsb": None if local_stsb is None else str(local_stsb),
                       "mteb_version": mteb.__version__, "seconds": seconds,
                       **provenance(loaded, data_key="data", data_dir=local_stsb or ".", files=files,
                                    batch_size=batch_size, prompt=loaded.prompt_for(prompt_protocol))}
    return results


# ---------------------------------------------------------------------------------------------
# The table: MTEB beside the SentEval protocol


def _load(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} ({e})") from None


def mteb_table(inputs: Sequence[str | Path], labels: Sequence[str], sts: Sequence[str | Path],
               out_dir: str | Path) -> list[Path]:
    """``mteb.md`` and ``mteb.csv``: per input, our SentEval-protocol STS average and STS-B beside
    MTEB's score of every task (x 100); rows with the same label (a run's seeds) are averaged."""
    if not (len(inputs) == len(labels) == len(sts)) or not inputs:
        raise ValueError("give one --labels and one --sts file per --inputs file")
    rows: dict[str, list[tuple[dict, dict]]] = {}
    for path, label, sts_path in zip(inputs, labels, sts):
        rows.setdefault(label, []).append((_load(path), _load(sts_path)))
    tasks = list(dict.fromkeys(t for members in rows.values() for m, _ in members for t in m["details"]))
    header = ["Model", "Seeds", "SentEval avg", "SentEval STS-B", *(f"MTEB {t}" for t in tasks), "MTEB avg"]
    md = ["# MTEB beside the SentEval protocol", "",
          "Spearman × 100. SentEval: clusterns.sts (the papers' protocol, \"all\" setting); MTEB: the mteb package's "
          "main score of each task (cosine Spearman for STS) on the same embeddings. Rows: mean over seeds.", "",
          "| " + " | ".join(header) + " |", "| :--- | ---: |" + " ---: |" * (len(header) - 2)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "seeds", "senteval_avg", "senteval_STSBenchmark", *tasks, "mteb_avg"])
    for label, members in rows.items():
        mean = lambda key, src: float(np.mean([(s if src == "sts" else m).get(key, math.nan)  # noqa: E731
                                               for m, s in members]))
        values = [mean("avg", "sts"), mean("STSBenchmark", "sts"), *(mean(t, "mteb") for t in tasks),
                  mean("avg", "mteb")]
        md.append(f"| {label} | {len(members)} | " + " | ".join("—" if math.isnan(v) else f"{v:.2f}" for v in values)
                  + " |")
        w.writerow([label, len(members), *("" if math.isnan(v) else repr(v) for v in values)])
    out = Path(out_dir)
    written = [out / "mteb.md", out / "mteb.csv"]
    write_text_atomic(written[0], "\n".join(md) + "\n")
    write_text_atomic(written[1], buf.getvalue())
    return written


def build_parser():
    p = model_parser("python -m clusterns.mteb_eval", "MTEB scores of a HF encoder through the embedding runtime.")
    p.add_argument("--tasks", nargs="+", default=list(MTEB_DEFAULTS["tasks"]), help="MTEB task names")
    p.add_argument("--local-stsb", default=None, metavar="SENTEVAL_DIR",
                   help="build MTEB's STSBenchmark from SentEval's test file in this folder (no download)")
    return p


def _table_main(argv: Sequence[str]) -> int:
    p = Parser(prog="python -m clusterns.mteb_eval table", description="MTEB beside the SentEval protocol.")
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", required=True)
    p.add_argument("--sts", nargs="+", required=True, help="each input's sts_test.json")
    p.add_argument("--out-dir", required=True)
    try:
        args = p.parse_args(argv)
        written = mteb_table(args.inputs, args.labels, args.sts, args.out_dir)
    except (UsageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(written[0].read_text(), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return _table_main(argv[1:])

    def run(args) -> dict:
        try:
            import mteb  # noqa: F401
        except ImportError:
            raise ValueError("the MTEB stage needs the mteb package: pip install -e '.[mteb]'") from None
        try:
            return evaluate(args.model, args.pooler, tasks=args.tasks, local_stsb=args.local_stsb,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                            prompt_protocol=args.prompt_protocol)
        except ValueError:
            raise
        except Exception as e:  # mteb's own errors: an unknown task, a download without internet
            raise ValueError(f"MTEB failed: {e} ({type(e).__name__}); MTEB reads its data from the Hugging Face "
                             "Hub: without internet access only --local-stsb works") from None

    def summary(results: dict, args) -> str:
        lines = [f"{t:<24} {results[t]:>7.2f}" for t in results["details"]]
        return "\n".join(lines + [f"{'avg':<24} {results['avg']:>7.2f}", f"wrote {args.output}"])

    return run_cli(build_parser(), argv, run, summary)
