"""STS evaluation wall time: our evaluator vs sentence-transformers' EmbeddingSimilarityEvaluator.

Both score the seven STS test sets (SimCSE/SentEval "test" protocol) with the same model (the
packaged all-MiniLM-L6-v2, mean pooling = our ``avg``), precision (fp32), device and batch size:

* ours:  ``clusterns.evaluation.sts.score_tasks(tasks, embedder(backbone, tokenizer, "avg", batch_size=...))``
         -- every distinct sentence of all tasks encoded once, in token-length-sorted batches,
         under ``torch.inference_mode``;
* ST:    one ``EmbeddingSimilarityEvaluator(sentences1, sentences2, gold, main_similarity="cosine")``
         per task, called on a ``SentenceTransformer`` of the same folder (STS12-16: one evaluator
         over the concatenation of all subsets = SentEval's "all" setting; STS-B test; SICK-R test);
         ``max_seq_length`` raised to 512 so that, like ours, nothing is truncated.

Both get the same parsed, normalised pairs (``clusterns.evaluation.sts.load_tasks`` on the mirror's
senteval.tar extracted to a temporary folder); data loading and model loading are outside the
timed region. By default both run at once in two threads that take turns batch by batch (a
forward hook on each model ends a turn), so they see the same load on a shared machine; a
system's time is the sum of its turns (``--mode sequential``: whole runs A B B A ..., medians).
The load average is recorded before/after every run; CPU seconds are reported next to wall time. Scores are compared per task: the max |Spearman difference| (x100 units
and 0-1 units) is printed (target: identical to 1e-6 in fp32).

    python benchmarks/eval_throughput.py              # all seven tasks (~2 x 85 s on 2 idle CPUs)
    python benchmarks/eval_throughput.py --quick      # STS12 + STS-B + SICK-R, 300 pairs each (CI)

Options: ``--tasks``, ``--max-pairs N`` (first pairs of every task, spread over its subsets),
``--batch-size`` (default 128, both), ``--rounds`` (default 1), ``--mode``, ``--device``, ``--json FILE``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from train_throughput import Rotation  # noqa: E402


def truncate(tasks, max_pairs: int):
    """The first ``max_pairs`` pairs of every task, spread evenly over its subsets."""
    from dataclasses import replace

    out = []
    for task in tasks:
        per = -(-max_pairs // len(task.subsets))
        subs = tuple(replace(s, sent1=s.sent1[:per], sent2=s.sent2[:per], gold=s.gold[:per]) for s in task.subsets)
        out.append(replace(task, subsets=subs))
    return out


def work(tasks, tokenizer, batch_size: int, max_len: int = 512) -> dict:
    """Load-independent encoder work of both systems: rows x padded length summed over batches.

    Ours: the distinct sentences in ``clusterns.evaluation.embedding.length_batches`` order (token lengths). ST:
    per evaluator call, ``sentences1`` and ``sentences2`` separately, sorted by character length
    (descending, as ``SentenceTransformer.encode`` does when it cannot flatten inputs), padded to the
    longest of each batch. Returned per system: sentences, real and padded tokens and sum(rows x
    padded_len^2) (the attention term).
    """
    import numpy as np

    from clusterns.evaluation.embedding import length_batches
    from clusterns.evaluation.sts import distinct_sentences

    def count(lengths_batches):
        rows = real = padded = sq = 0
        for lens in lengths_batches:
            m = max(lens)
            rows, real, padded, sq = rows + len(lens), real + sum(lens), padded + m * len(lens), sq + m * m * len(lens)
        return {"sentences": rows, "real_tokens": real, "padded_tokens": padded, "attention_rows_x_len2": sq}

    distinct = distinct_sentences(tasks)
    lens = [len(x) for x in tokenizer(distinct)["input_ids"]]
    ours = count([[lens[i] for i in b] for b in length_batches(lens, batch_size)])
    token_len = dict(zip(distinct, lens))
    st_batches = []
    for task in tasks:
        for column in ("sent1", "sent2"):
            sents = [s for sub in task.subsets for s in getattr(sub, column)]
            order = np.argsort([-len(x) for x in sents])
            sorted_lens = [min(token_len[sents[i]], max_len) for i in order]
            st_batches += [sorted_lens[i:i + batch_size] for i in range(0, len(sorted_lens), batch_size)]
    return {"ours": ours, "st": count(st_batches)}


def run_ours(tasks, backbone, tokenizer, batch_size: int, device: str) -> tuple[float, dict, int]:
    from clusterns.evaluation.embedding import embedder
    from clusterns.evaluation.sts import score_tasks

    t0 = time.perf_counter()
    res = score_tasks(tasks, embedder(backbone, tokenizer, "avg", batch_size=batch_size, device=device))
    dt = time.perf_counter() - t0
    return dt, {t.name: res[t.name] for t in tasks}, res["meta"]["n_sentences"]


def run_st(tasks, st_model, batch_size: int) -> tuple[float, dict, int]:
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    scores, encoded = {}, 0
    t0 = time.perf_counter()
    for task in tasks:
        s1 = [s for sub in task.subsets for s in sub.sent1]
        s2 = [s for sub in task.subsets for s in sub.sent2]
        gold = [g for sub in task.subsets for g in sub.gold]
        ev = EmbeddingSimilarityEvaluator(s1, s2, gold, batch_size=batch_size, main_similarity="cosine",
                                          name=task.name, show_progress_bar=False, write_csv=False)
        metrics = ev(st_model)
        scores[task.name] = float(metrics[f"{task.name}_spearman_cosine"]) * 100.0
        encoded += len(s1) + len(s2)
    return time.perf_counter() - t0, scores, encoded


def lockstep_round(order: list[str], tasks, backbone, tokenizer, st_model, batch_size: int, device: str) -> list[dict]:
    """Both evaluations in worker threads that take turns batch by batch (a forward hook on each
    model ends a turn), so both see the same machine load to within one batch. A system's time is
    the sum of its turns, its first (setup + first batch) and last (after its last batch: the
    remaining scoring) included."""
    import threading

    import torch

    cuda = device == "cuda"
    rotation = Rotation(order, cuda, optimizer_hook=False)
    models = {"ours": backbone, "st": st_model}  # ST.encode calls the model (hooks fire) once per batch

    def hook_for(name):
        def hook(*_):
            if cuda:
                torch.cuda.synchronize()
            rotation.step_end(name)
        return hook

    handles = [models[n].register_forward_hook(hook_for(n)) for n in order]
    outs, errors = {}, []

    def worker(name: str) -> None:
        try:
            rotation.begin(name)
            if name == "ours":
                outs[name] = run_ours(tasks, backbone, tokenizer, batch_size, device)
            else:
                outs[name] = run_st(tasks, st_model, batch_size)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append((name, e))
        finally:
            rotation.finish(name)

    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for h in handles:
            h.remove()
    if errors:
        raise RuntimeError(f"{errors[0][0]} failed") from errors[0][1]
    runs = []
    for name in order:
        _, scores, n_enc = outs[name]
        wall = sum(rotation.wall[name]) + rotation.tail[name][0]
        cpu = sum(rotation.cpu[name]) + rotation.tail[name][1]
        runs.append({"system": name, "seconds": wall, "cpu_seconds": cpu, "scores": scores, "sentences_encoded": n_enc,
                     "batches": len(rotation.wall[name])})
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=None, help="default: all seven (quick: STS12 STSBenchmark SICKRelatedness)")
    p.add_argument("--max-pairs", type=int, default=None, help="first N pairs per task (quick: 300)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="rounds (lockstep: each round runs both; sequential: "
                                                         "ours, ST, then ST, ours, ...)")
    p.add_argument("--mode", choices=("lockstep", "sequential"), default="lockstep",
                   help="lockstep (default): both run at once in threads that take turns batch by batch; "
                        "sequential: whole evaluations one after the other")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="HF/sentence-transformers folder (default: packaged MiniLM)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-only", action="store_true", help="only count each system's encoder work (no timing)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tasks = args.tasks or ["STS12", "STSBenchmark", "SICKRelatedness"]
        args.max_pairs = args.max_pairs or 300

    import logging

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    info = C.print_header("eval_throughput", args.device)

    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from clusterns.data import unpack
    from clusterns.model.encoder import load_backbone
    from clusterns.evaluation.sts import load_tasks

    model_dir = Path(args.model) if args.model else C.minilm_path()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        senteval = unpack(C.need_mirror() / "senteval.tar", Path(tmp) / "senteval", expect=["STS", "SICK"])
        tasks = load_tasks(senteval, "test", args.tasks)
    if args.max_pairs:
        tasks = truncate(tasks, args.max_pairs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.work_only:
        amount = work(tasks, tokenizer, args.batch_size)
        print(C.table(["system", *amount["ours"]], [[k, *(f"{x:,}" for x in v.values())] for k, v in amount.items()],
                      f"encoder work, batch {args.batch_size}"))
        return 0
    backbone = load_backbone(model_dir).to(args.device).eval()
    st_model = SentenceTransformer(str(model_dir), device=args.device)
    st_model.max_seq_length = 512
    st_model.eval()
    pairs = sum(t.n_pairs for t in tasks)
    print(f"model {model_dir}, tasks {' '.join(t.name for t in tasks)}: {pairs} pairs; "
          f"batch {args.batch_size}, fp32, {args.device}; attention: ours "
          f"{backbone.config._attn_implementation}, ST {st_model[0].auto_model.config._attn_implementation}",
          flush=True)

    runs = []
    amount = work(tasks, tokenizer, args.batch_size)
    if args.mode == "lockstep":
        for r in range(args.rounds):
            order = ["ours", "st"] if r % 2 == 0 else ["st", "ours"]
            load0 = C.load1()
            for run in lockstep_round(order, tasks, backbone, tokenizer, st_model, args.batch_size, args.device):
                run.update({"round": r, "loadavg_before": load0, "loadavg_after": C.load1()})
                runs.append(run)
                print(f"  round {r} {run['system']:<4} {run['seconds']:7.2f} s wall, {run['cpu_seconds']:7.2f} CPU-s "
                      f"({run['batches']} batches, {run['sentences_encoded']} sentences encoded; load {load0:.2f} -> "
                      f"{run['loadavg_after']:.2f})", flush=True)
    else:
        order = []
        for r in range(args.rounds):
            order += ["ours", "st"] if r % 2 == 0 else ["st", "ours"]
        for i, system in enumerate(order):
            load0 = C.load1()
            c0 = time.process_time()
            if system == "ours":
                dt, scores, n_enc = run_ours(tasks, backbone, tokenizer, args.batch_size, args.device)
            else:
                dt, scores, n_enc = run_st(tasks, st_model, args.batch_size)
            cpu = time.process_time() - c0
            runs.append({"system": system, "seconds": dt, "cpu_seconds": cpu, "scores": scores,
                         "sentences_encoded": n_enc, "loadavg_before": load0, "loadavg_after": C.load1()})
            print(f"  run {i} {system:<4} {dt:7.2f} s wall, {cpu:7.2f} CPU-s  ({n_enc} sentences encoded; load "
                  f"{load0:.2f} -> {runs[-1]['loadavg_after']:.2f})", flush=True)

    sec = {s: C.median([r["seconds"] for r in runs if r["system"] == s]) for s in ("ours", "st")}
    cpu = {s: C.median([r["cpu_seconds"] for r in runs if r["system"] == s]) for s in ("ours", "st")}
    ours_scores = next(r["scores"] for r in runs if r["system"] == "ours")
    st_scores = next(r["scores"] for r in runs if r["system"] == "st")
    # every repeat of a system must give the same scores as its first run
    stable = all(r["scores"] == (ours_scores if r["system"] == "ours" else st_scores) for r in runs)
    diffs = {t: abs(ours_scores[t] - st_scores[t]) for t in ours_scores}
    rows = [[t.name, t.n_pairs, f"{ours_scores[t.name]:.6f}", f"{st_scores[t.name]:.6f}", f"{diffs[t.name]:.2e}"]
            for t in tasks]
    speed = sec["st"] / sec["ours"]
    loads = [r["loadavg_before"] for r in runs] + [r["loadavg_after"] for r in runs]
    n_enc = {s: next(r["sentences_encoded"] for r in runs if r["system"] == s) for s in ("ours", "st")}
    max_diff = max(diffs.values())
    print()
    print("## summary (eval_throughput)")
    print(C.table(["task", "pairs", "ours Spearman x100", "ST Spearman x100", "|diff|"], rows,
                  f"scores (fp32, batch {args.batch_size}, {args.device})"))
    print()
    wo, ws = amount["ours"], amount["st"]
    print(C.table(["system", "median s", "runs (s)", "speed-up", "median CPU-s", "speed-up (CPU)", "sentences encoded",
                   "padded tokens", "real tokens"], [
        ["ours (clusterns.evaluation.sts)", f"{sec['ours']:.2f}", " ".join(f"{r['seconds']:.1f}" for r in runs if r["system"] == "ours"),
         f"{speed:.2f}x", f"{cpu['ours']:.1f}", f"{cpu['st'] / cpu['ours']:.2f}x", n_enc["ours"], f"{wo['padded_tokens']:,}",
         f"{wo['real_tokens']:,}"],
        ["sentence-transformers EmbeddingSimilarityEvaluator", f"{sec['st']:.2f}",
         " ".join(f"{r['seconds']:.1f}" for r in runs if r["system"] == "st"), "1.00x", f"{cpu['st']:.1f}", "1.00x",
         n_enc["st"], f"{ws['padded_tokens']:,}", f"{ws['real_tokens']:,}"]],
        f"wall time, {args.mode}, {args.rounds} round(s), load average {min(loads):.2f}-{max(loads):.2f}"))
    print()
    print(f"speed-up ours vs ST: {speed:.2f}x wall, {cpu['st'] / cpu['ours']:.2f}x CPU time -- target >= 1.5x: "
          f"{'met' if speed >= 1.5 else 'NOT met'}; encoder work ratio (padded tokens ST/ours): "
          f"{ws['padded_tokens'] / wo['padded_tokens']:.2f}x, attention term "
          f"{ws['attention_rows_x_len2'] / wo['attention_rows_x_len2']:.2f}x")
    print(f"max |Spearman difference|: {max_diff:.2e} (x100 units) = {max_diff / 100:.2e} (0-1 units) -- "
          f"identical to 1e-6: {'met' if max_diff / 100 <= 1e-6 else 'NOT met'}; repeats identical: {stable}")
    C.write_json(args.json, {"machine": info, "args": vars(args), "runs": runs, "median_seconds": sec, "median_cpu_seconds": cpu, "work": amount,
                             "speedup": speed, "score_diffs_x100": diffs, "max_diff_x100": max_diff,
                             "repeats_identical": stable})
    return 0


if __name__ == "__main__":
    sys.exit(main())
