"""Training throughput: our loop (SimCSE and ClusterNS) vs sentence-transformers, plus FLOP/s.

Three systems train the same backbone on the same batches of the mirror's Wikipedia lines, the
unsupervised-SimCSE way (every sentence paired with itself, two dropout views, InfoNCE with
cosine / temperature 0.05 = MultipleNegativesRankingLoss(scale=20), max length 32, AdamW with the
same lr, linear decay, no warm-up, gradient clipping at 1.0, mean pooling):

* ``st``         sentence-transformers' ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss``
                 on a ``datasets.Dataset`` of (anchor, positive) = (s, s); no evaluation, saving or
                 logging; a sequential batch sampler over the sentences in our sampler's order, so
                 every system sees exactly the same batches;
* ``simcse``     our real loop, ``clusterns.train.train`` with ``kmeans: 0`` (tokenized cache,
                 ``max_steps``, no senteval = no evaluation, ``log_steps: 1``);
* ``clusterns``  the same with ``kmeans: K`` and ``kmean_cosine: 1.0`` (clustering from step 2; the
                 start step itself is a plain SimCSE step, inside the warm-up).

Timing (the same clock for every system: a global optimizer step hook). Default ``--mode
lockstep``: the three runs execute at once in worker threads that take turns one optimizer step
at a time (st step, simcse step, clusterns step, st step, ...; only one runs at any moment), so all
see the same machine load to within one step; a step's time runs from receiving the turn to the
end of its optimizer step and includes data loading/tokenization, forward, backward, clipping,
the optimizer, the scheduler and per-step logging. ``--mode sequential``: whole runs one after the
other on the main thread (round r in order, round r+1 in reverse order), a step being the time
between two optimizer-step ends; there the median of the ``sentences_per_s`` rows of our
``train_log.csv`` after the warm-up (the loop's own figure, which leaves out writing the CSV row)
is reported as well. Both modes report CPU seconds of the process per step next to wall time,
the contention-robust figure on a shared machine. The first ``warmup`` steps of every run
(model loading included in lockstep mode) are not measured.

Hardware efficiency: the achieved FLOP/s of every measured step, counted as

    FLOPs(step) = 6 * N * T  +  12 * L * H * sum_i(len_i ** 2)

where N = non-embedding parameters of the encoder layers (no embeddings, no pooler), T = real
(non-pad) tokens of the 2B rows (both views), len_i the real length of row i, L layers, H hidden
size (the second term: Q.K^T and A.V, 2 * 2 * len^2 * H per layer forward, x3 for backward), divided
by the step's wall time, as a fraction of the measured matmul peak (median of repeated large
square ``torch.mm``: fp32 on CPU, bf16 on CUDA) measured between the runs of every round.

    python benchmarks/train_throughput.py                 # CPU: packaged MiniLM, batch 64
    python benchmarks/train_throughput.py --quick         # CPU: batch 32, fewer steps
    python benchmarks/train_throughput.py --device cuda   # GPU: random BERT-base, bf16, batch 64 and 256

Options: ``--model minilm|random-bert-base|random-bert-tiny|PATH``, ``--batch N [N ...]``,
``--steps``, ``--warmup``, ``--rounds``, ``--kmeans`` (default B/2, the paper's 128 at 256),
``--systems``, ``--json FILE`` (every raw number).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SYSTEMS = ("st", "simcse", "clusterns", "simcse-unpacked")
DEFAULT_SYSTEMS = SYSTEMS[:3]
LABELS = {"st": "sentence-transformers (MNRL)", "simcse": "ours, SimCSE (kmeans 0)",
          "clusterns": "ours, ClusterNS (kmeans K)", "simcse-unpacked": "ours, SimCSE, packed: false"}
SEED = 42
LR = 3e-5
MAX_LEN = 32


# ------------------------------------------------------------------------------------------------
# Models and data


def make_random_bert(path: Path, size: str) -> Path:
    """A randomly initialised BERT (base config or a 2-layer toy) with the bert-base-uncased vocab
    (MiniLM's tokenizer is bert-base-uncased's), so nothing is downloaded."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(C.minilm_path()).save_pretrained(path)
    cfg = BertConfig() if size == "base" else BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=128)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def resolve_model(name: str, work: Path) -> Path:
    if name == "minilm":
        return C.minilm_path()
    if name in ("random-bert-base", "random-bert-tiny"):
        return make_random_bert(work / name, name.rsplit("-", 1)[1])
    path = Path(name)
    if not (path / "config.json").is_file():
        sys.exit(f"error: --model {name}: not minilm, random-bert-base, random-bert-tiny or a HF model folder")
    return path


def write_lines(out: Path, n: int) -> Path:
    """The first ``n`` lines of the mirror's wiki file (cycled when it has fewer)."""
    src = C.need_mirror() / "wiki1m_for_simcse.txt"
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    out.write_text("\n".join(lines[i % len(lines)] for i in range(n)) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------
# Timing


class StepClock:
    """Timestamps the end of every optimizer step of any torch optimizer (a global post hook)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.times, self.cpu, self.handle = cuda, [], [], None

    def __enter__(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(*_):
            if self.cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

        self.times, self.cpu = [], []
        self.handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def intervals(self, warmup: int) -> list[float]:
        """Seconds of steps warmup+1, warmup+2, ... (step k's interval ends at its optimizer step)."""
        t = self.times
        return [t[k] - t[k - 1] for k in range(max(warmup, 1), len(t))]

    def cpu_intervals(self, warmup: int) -> list[float]:
        """CPU seconds (all threads of this process) of the same steps: less sensitive to other
        processes competing for the cores than wall time (though not immune: caches, spinning)."""
        t = self.cpu
        return [t[k] - t[k - 1] for k in range(max(warmup, 1), len(t))]


class Rotation:
    """Lockstep interleaving: the systems run in threads that take turns, one optimizer step each
    (system A's step, B's step, C's step, A's step, ...), so every system sees the same load on a
    shared machine to within one step. Each turn is timed from receiving the turn to the end of
    that step's optimizer step (wall, and this process' CPU time: only one system runs at a time)."""

    def __init__(self, names: list[str], cuda: bool, optimizer_hook: bool = True) -> None:
        import threading

        self.active, self.turn, self.cuda, self.optimizer_hook = list(names), names[0], cuda, optimizer_hook
        self.cond = threading.Condition()
        self.by_thread: dict[int, str] = {}
        self.t0: dict[str, tuple[float, float]] = {}
        self.wall = {n: [] for n in names}
        self.cpu = {n: [] for n in names}
        self.tail = {n: (0.0, 0.0) for n in names}  # the last turn (after the last step: export, scoring, ...)
        self.handle = None

    def __enter__(self):
        if not self.optimizer_hook:  # the caller calls step_end itself (e.g. from a forward hook)
            return self
        import threading

        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def hook(*_):
            name = self.by_thread.get(threading.get_ident())
            if name is not None:
                if self.cuda:
                    torch.cuda.synchronize()
                self.step_end(name)

        self.handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()

    def begin(self, name: str) -> None:
        import threading

        self.by_thread[threading.get_ident()] = name
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)
        self.t0[name] = (time.perf_counter(), time.process_time())

    def _pass_turn(self, name: str) -> None:
        i = self.active.index(name)
        self.turn = self.active[(i + 1) % len(self.active)]

    def step_end(self, name: str) -> None:
        w0, c0 = self.t0[name]
        self.wall[name].append(time.perf_counter() - w0)
        self.cpu[name].append(time.process_time() - c0)
        with self.cond:
            self._pass_turn(name)
            self.cond.notify_all()
        self.begin(name)

    def finish(self, name: str) -> None:
        if name in self.t0:
            w0, c0 = self.t0[name]
            self.tail[name] = (time.perf_counter() - w0, time.process_time() - c0)
        with self.cond:
            if self.turn == name and len(self.active) > 1:
                self._pass_turn(name)
            self.active.remove(name)
            self.cond.notify_all()

    def member(self, name: str) -> "RotationMember":
        return RotationMember(self, name)


class RotationMember:
    """The clock one system's run uses under a :class:`Rotation` (same interface as StepClock)."""

    def __init__(self, rotation: Rotation, name: str) -> None:
        self.rotation, self.name, self.started = rotation, name, False

    def start(self) -> None:
        """Wait for the first turn (call before the system's setup, so setup runs in its turn)."""
        if not self.started:
            self.started = True
            self.rotation.begin(self.name)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def intervals(self, warmup: int) -> list[float]:
        return self.rotation.wall[self.name][warmup:]

    def cpu_intervals(self, warmup: int) -> list[float]:
        return self.rotation.cpu[self.name][warmup:]


def in_thread(fn, *args):
    """Run ``fn(*args)`` on a fresh worker thread and return its result."""
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(value=fn(*args)))
    t.start()
    t.join()
    return box["value"]


def reset_accelerate() -> None:
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    except Exception:  # noqa: BLE001 - older/newer accelerate: a fresh Accelerator works anyway
        pass


def peak_matmul(device: str, n: int, repeats: int) -> tuple[float, float]:
    """Median FLOP/s of an n x n x n ``torch.mm`` (fp32 on CPU, bf16 on CUDA): per wall second and
    per CPU second of this process (all threads; the contention-robust basis on a shared CPU)."""
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        sync()
        wall.append(2 * n ** 3 / (time.perf_counter() - t0))
        cpu.append(2 * n ** 3 / max(time.process_time() - c0, 1e-9))
    return C.median(wall), C.median(cpu)


# ------------------------------------------------------------------------------------------------
# The systems


def run_ours(method: str, model_dir: Path, data_dir: Path, work: Path, batch: int, kmeans: int, steps: int,
             warmup: int, cuda: bool, clock=None) -> dict:
    from clusterns.train import train

    packed = not method.endswith("-unpacked")  # simcse-unpacked: the HF forward (training.packed: false)
    method = method.removesuffix("-unpacked")
    objective = {"kmeans": 0} if method == "simcse" else {
        "kmeans": kmeans, "kmeans_lr": 1e-3, "kmean_cosine": 1.0, "hard_negatives": True,
        "bml_weight": 1e-3, "bml_alpha": 0.0, "bml_beta": 0.3}
    hp = {"method": method, "backbone": "bench", "seed": SEED, "pooler": "avg", "eval_pooler": "avg",
          "training": {"batch_size": batch, "lr": LR, "epochs": 1, "max_steps": warmup + steps,
                       "eval_steps": 10 ** 9, "save_steps": 10 ** 9, "log_steps": 1, "early_stop": None,
                       "max_seq_length": MAX_LEN, "mixed_precision": "bf16" if cuda else "auto",
                       "num_workers": 0, "gpus": 1, "packed": packed},
          "objective": objective}
    run_dir, state_dir = work / f"run-{method}-{packed}", work / f"state-{method}-{packed}"
    clock = clock or StepClock(cuda)
    with clock:
        summary = train(hp, data_dir, model_dir, None, run_dir, state_dir)
    with open(run_dir / "train_log.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > warmup]
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)
    return {"step_seconds": clock.intervals(warmup), "step_cpu_seconds": clock.cpu_intervals(warmup),
            "log_sentences_per_s": [float(r["sentences_per_s"]) for r in rows],
            "clustering_started": [int(r["clustering_started"]) for r in rows],
            "loss": [float(r["loss"]) for r in rows], "clustering_start_step": summary["clustering_start_step"],
            "mixed_precision": summary["mixed_precision"], "packed": summary["packed"]}


def run_st(model_dir: Path, ordered: list[str], work: Path, batch: int, steps: int, warmup: int, cuda: bool,
           clock=None) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    def sequential(dataset, batch_size, drop_last, **kw):
        return DefaultBatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size=batch_size,
                                   drop_last=drop_last, **kw)

    model = SentenceTransformer(str(model_dir), device="cuda" if cuda else "cpu")
    model.max_seq_length = MAX_LEN
    total = warmup + steps
    data = Dataset.from_dict({"anchor": ordered[:total * batch], "positive": ordered[:total * batch]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st-out"), per_device_train_batch_size=batch, max_steps=total, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused" if cuda else "adamw_torch",
        seed=SEED, bf16=cuda, use_cpu=not cuda, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_drop_last=True,
        batch_sampler=sequential)
    loss = MultipleNegativesRankingLoss(model, scale=1 / 0.05)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    clock = clock or StepClock(cuda)
    with clock:
        trainer.train()
    attn = getattr(model[0].auto_model.config, "_attn_implementation", "?")
    del trainer, model
    shutil.rmtree(work / "st-out", ignore_errors=True)
    return {"step_seconds": clock.intervals(warmup), "step_cpu_seconds": clock.cpu_intervals(warmup),
            "attn_implementation": attn}



# ------------------------------------------------------------------------------------------------
# FLOP accounting


def model_shape(model_dir: Path) -> dict:
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(model_dir)
    with __import__("torch").device("meta"):
        m = AutoModel.from_config(cfg)
    n_layers_params = sum(p.numel() for p in m.encoder.parameters())
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "non_embedding_params": n_layers_params,
            "total_params": sum(p.numel() for p in m.parameters())}


def step_flops(lengths: list[int], shape: dict) -> tuple[float, int]:
    """FLOPs of one training step on rows of real lengths ``lengths`` (both views included)."""
    tokens = sum(lengths)
    sq = sum(n * n for n in lengths)
    return 6 * shape["non_embedding_params"] * tokens + 12 * shape["layers"] * shape["hidden"] * sq, tokens


# ------------------------------------------------------------------------------------------------


def bench_batch(batch: int, args, model_dir: Path, work: Path, shape: dict, sentences: list[str],
                lengths: list[int], data_dir: Path) -> dict:
    from clusterns.training.data import GlobalBatchSampler

    cuda = args.device == "cuda"
    total = args.warmup + args.steps
    sampler = GlobalBatchSampler(len(sentences), batch, 0, 1, SEED, 0, total)
    idx = [sampler.global_indices(s).tolist() for s in range(total)]
    ordered = [sentences[i] for b in idx for i in b]
    per_step = [step_flops([lengths[i] for i in b] * 2, shape) for b in idx]  # two views
    kmeans = args.kmeans or max(2, batch // 2)
    res = {"batch": batch, "kmeans": kmeans, "runs": [], "peak_flops": [],
           "step_flops": [f for f, _ in per_step], "step_tokens": [t for _, t in per_step]}

    def run(system: str, clock=None) -> dict:
        if system == "st":
            return run_st(model_dir, ordered, work, batch, args.steps, args.warmup, cuda, clock)
        return run_ours(system, model_dir, data_dir, work, batch, kmeans, args.steps, args.warmup, cuda, clock)

    def finish(out: dict, system: str, r: int, load0: float, t0: float) -> None:
        out.update({"system": system, "round": r, "loadavg_before": load0, "loadavg_after": C.load1(),
                    "run_seconds": round(time.perf_counter() - t0, 2)})
        # FLOP/s per measured step: the intervals are steps warmup+1, warmup+2, ...
        first = args.warmup
        out["step_flops_per_s"] = [res["step_flops"][first + j] / dt for j, dt in enumerate(out["step_seconds"])]
        out["step_flops_per_cpu_s"] = [res["step_flops"][first + j] / max(dt, 1e-9)
                                       for j, dt in enumerate(out["step_cpu_seconds"])]
        res["runs"].append(out)
        med = C.median(out["step_seconds"])
        print(f"  batch {batch} round {r} {system:<9} median step {med * 1e3:8.1f} ms = "
              f"{batch / med:7.1f} sentences/s, {C.median(out['step_cpu_seconds']) * 1e3:8.1f} CPU-ms  "
              f"(load {load0:.2f} -> {out['loadavg_after']:.2f})", flush=True)

    for r in range(args.rounds):
        order = list(args.systems) if r % 2 == 0 else list(reversed(args.systems))
        if args.mode == "lockstep":
            import threading

            outs, errors = {}, []
            load0, t0 = C.load1(), time.perf_counter()
            with Rotation(order, cuda) as rotation:
                def worker(system: str) -> None:
                    member = rotation.member(system)
                    try:
                        member.start()
                        outs[system] = run(system, member)
                    except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                        errors.append((system, e))
                    finally:
                        rotation.finish(system)

                threads = [threading.Thread(target=worker, args=(s,), name=f"bench-{s}") for s in order]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            if errors:
                raise RuntimeError(f"{errors[0][0]} failed in round {r}") from errors[0][1]
            for system in order:
                finish(outs[system], system, r, load0, t0)
        else:
            for system in order:
                load0, t0 = C.load1(), time.perf_counter()
                reset_accelerate()
                finish(in_thread(run, system) if args.worker_thread else run(system), system, r, load0, t0)
        if not args.no_peak:
            # measured on the same kind of thread the steps ran on (lockstep: a worker thread; on a
            # loaded CPU a worker thread's BLAS calls behave differently from the main thread's)
            wall, cpu = in_thread(peak_matmul, args.device, args.peak_n, args.peak_repeats) \
                if args.mode == "lockstep" else peak_matmul(args.device, args.peak_n, args.peak_repeats)
            res["peak_flops"].append({"flops_per_s": wall, "flops_per_cpu_s": cpu, "loadavg": C.load1(), "round": r})
            print(f"  round {r} matmul peak ({args.peak_n}^3 {'bf16' if cuda else 'fp32'}): "
                  f"{res['peak_flops'][-1]['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    return res


def summarize(res: dict, args) -> tuple[str, dict]:
    batch = res["batch"]
    by = {s: [r for r in res["runs"] if r["system"] == s] for s in args.systems}
    step_s = {s: [x for r in rs for x in r["step_seconds"]] for s, rs in by.items()}
    rate = {s: batch / C.median(v) for s, v in step_s.items() if v}
    cpu_s = {s: [x for r in rs for x in r["step_cpu_seconds"]] for s, rs in by.items()}
    cpu_rate = {s: batch / C.median(v) for s, v in cpu_s.items() if v}
    # our train_log.csv figure is the loop's own wall clock: valid only when nothing else runs in between
    log_rate = {} if args.mode == "lockstep" else {
        s: C.median([x for r in rs for x in r.get("log_sentences_per_s", [])]) for s, rs in by.items() if s != "st"}
    # Paired ratios: per round, the same system pair measured back to back.
    paired = {}
    for a, b in (("simcse", "st"), ("clusterns", "simcse"), ("simcse", "simcse-unpacked"), ("simcse-unpacked", "st")):
        if a in by and b in by:
            paired[f"{a}/{b}"] = [C.median(rb["step_seconds"]) / C.median(ra["step_seconds"])
                                  for ra, rb in zip(by[a], by[b])]
    peak = C.median([p["flops_per_s"] for p in res["peak_flops"]]) if res["peak_flops"] else float("nan")
    flops = {s: C.median([x for r in rs for x in r["step_flops_per_s"]]) for s, rs in by.items()}
    peak_cpu = C.median([p["flops_per_cpu_s"] for p in res["peak_flops"]]) if res["peak_flops"] else float("nan")
    flops_cpu = {s: C.median([x for r in rs for x in r["step_flops_per_cpu_s"]]) for s, rs in by.items()}
    loads = {s: (min(r["loadavg_before"] for r in rs), max(r["loadavg_after"] for r in rs)) for s, rs in by.items()}
    rows = []
    for s in args.systems:
        ratio = rate[s] / rate["st"] if "st" in rate else float("nan")
        cpu_ratio = cpu_rate[s] / cpu_rate["st"] if "st" in cpu_rate else float("nan")
        rows.append([LABELS[s], f"{rate[s]:.1f}", f"{log_rate[s]:.1f}" if s in log_rate else "-",
                     f"{C.median(step_s[s]) * 1e3:.1f}", f"{ratio:.2f}x", f"{cpu_rate[s]:.2f}", f"{cpu_ratio:.2f}x",
                     f"{flops[s] / 1e9:.1f}",
                     f"{flops[s] / peak:.1%}" if peak == peak else "-", f"{loads[s][0]:.1f}-{loads[s][1]:.1f}"])
    title = (f"batch {batch} (K={res['kmeans']}), {args.mode}, {args.rounds} rounds x {args.steps} steps after "
             f"{args.warmup} warm-up, medians; peak matmul {peak / 1e9:.1f} GFLOP/s")
    text = C.table(["system", "sentences/s (step clock)", "sentences/s (train_log)", "ms/step", "vs ST",
                    "sentences/CPU-s", "vs ST (CPU)", "GFLOP/s", "of peak", "load avg"], rows, title)
    verdict = {"batch": batch, "sentences_per_s": rate, "log_sentences_per_s": log_rate,
               "sentences_per_cpu_s": cpu_rate, "peak_flops_per_s": peak, "peak_flops_per_cpu_s": peak_cpu,
               "flops_per_cpu_s": flops_cpu,
               "flops_per_s": flops, "paired_ratios": paired}
    lines = [text, ""]
    def compare(a: str, b: str, digits: int) -> tuple[float, str, str]:
        """a/b on the step clock, a/b per CPU-second and the per-round ratios, formatted."""
        per_round = ", ".join(f"{x:.{digits}f}" for x in paired.get(f"{a}/{b}", []))
        return rate[a] / rate[b], f"{cpu_rate[a] / cpu_rate[b]:.{digits}f}", per_round

    if "simcse" in rate and "st" in rate:
        r1, cpu1, rounds1 = compare("simcse", "st", 2)
        verdict["simcse_vs_st"] = r1
        log_note = f"{log_rate['simcse'] / rate['st']:.2f}x with the train_log figure, " if log_rate else ""
        lines.append(f"SimCSE / sentence-transformers: {r1:.2f}x on the step clock ({log_note}"
                     f"{cpu1}x per CPU-second; per-round {rounds1}) "
                     f"-- target >= 1.2x: {'met' if r1 >= 1.2 else 'NOT met'}")
    if "clusterns" in rate and "simcse" in rate:
        r2, cpu2, rounds2 = compare("clusterns", "simcse", 3)
        verdict["clusterns_vs_simcse"] = r2
        lines.append(f"ClusterNS / SimCSE: {r2:.3f} ({cpu2} per CPU-second; per-round {rounds2})"
                     f" -- target within 5% (>= 0.95): {'met' if r2 >= 0.95 else 'NOT met'}")
        started = all(x == 1 for r in by["clusterns"] for x in r["clustering_started"])
        lines.append(f"ClusterNS clustering active on every measured step: {started}")
    if "simcse-unpacked" in rate and "simcse" in rate:
        r3, cpu3, rounds3 = compare("simcse", "simcse-unpacked", 2)
        verdict["packed_vs_unpacked"] = r3
        lines.append(f"SimCSE packed / HF forward (training.packed: false): {r3:.2f}x "
                     f"({cpu3}x per CPU-second; per-round {rounds3})")
    if "simcse" in flops and peak == peak:
        frac = flops["simcse"] / peak
        target = 0.4 if args.device == "cuda" else 0.6
        verdict["simcse_fraction_of_peak"] = frac
        frac_cpu = flops_cpu["simcse"] / peak_cpu
        verdict["simcse_fraction_of_peak_cpu_time"] = frac_cpu
        lines.append(f"SimCSE step: {flops['simcse'] / 1e9:.1f} GFLOP/s = {frac:.1%} of the measured "
                     f"{'bf16' if args.device == 'cuda' else 'fp32'} matmul peak -- target >= {target:.0%}: "
                     f"{'met' if frac >= target else 'NOT met'} (per CPU-second: {flops_cpu['simcse'] / 1e9:.1f} "
                     f"of {peak_cpu / 1e9:.1f} GFLOP/CPU-s = {frac_cpu:.1%})")
    return "\n".join(lines), verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="minilm (CPU default), random-bert-base (CUDA default), "
                                                   "random-bert-tiny, or a HF model folder")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: CPU 64 (quick 32); CUDA 64 256")
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (default: CPU 4, quick 2; CUDA 30)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per run (default: CPU 1; CUDA 5)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2)")
    p.add_argument("--kmeans", type=int, default=None, help="ClusterNS K (default: batch/2)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS),
                   help="simcse-unpacked (not run by default): our SimCSE with the HF forward, training.packed: false")
    p.add_argument("--mode", choices=("lockstep", "sequential"), default="lockstep",
                   help="lockstep (default): the systems take turns step by step (threads, one runs at a time); "
                        "sequential: whole runs interleaved (also reports our train_log.csv figure)")
    p.add_argument("--worker-thread", action="store_true",
                   help="sequential mode: run each system on a worker thread instead of the main thread")
    p.add_argument("--quick", action="store_true", help="small CPU settings for CI")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size (default CPU 2048, quick 1024; CUDA 8192)")
    p.add_argument("--peak-repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", default=None, help="write every raw number here")
    args = p.parse_args(argv)

    import torch

    cuda = C.setup_torch(args)
    if cuda is None:
        return 1
    if not cuda:
        # our loop (accelerate) and HF Trainer both pick CUDA when they see it; keep CPU mode on the CPU
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    args.model = args.model or ("random-bert-base" if cuda else "minilm")
    args.batch = args.batch or ([64, 256] if cuda else [32] if args.quick else [64])
    args.steps = args.steps or (30 if cuda else 2 if args.quick else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.warmup = max(args.warmup, 1)
    args.rounds = args.rounds or 2
    args.peak_n = args.peak_n or (8192 if cuda else 1024 if args.quick else 2048)
    args.peak_repeats = args.peak_repeats or (20 if cuda else 5)

    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    info = C.print_header("train_throughput", args.device)
    from clusterns.tokenize import read_sentences, tokenize_to_disk

    results = {"machine": info, "args": vars(args), "batches": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        model_dir = resolve_model(args.model, work)
        shape = model_shape(model_dir)
        n_lines = max(11914, max(args.batch) * (args.warmup + args.steps))
        text = write_lines(work / "wiki.txt", n_lines)
        data_dir = work / "tok"
        tokenize_to_disk(model_dir, text, data_dir, MAX_LEN)
        from clusterns.tokenize import load_tokenized

        lengths = [len(x) for x in load_tokenized(data_dir)["input_ids"]]
        sentences, _ = read_sentences(text)
        print(f"model {args.model} ({shape['layers']} layers, hidden {shape['hidden']}, "
              f"{shape['non_embedding_params'] / 1e6:.1f}M non-embedding params), {len(sentences)} sentences, "
              f"mean {sum(lengths) / len(lengths):.1f} tokens; device {args.device}"
              f" ({'bf16' if cuda else 'fp32'})", flush=True)
        results["model"] = {"name": args.model, **shape}
        texts = []
        for batch in args.batch:
            res = bench_batch(batch, args, model_dir, work, shape, sentences, lengths, data_dir)
            text_b, verdict = summarize(res, args)
            res["summary"] = verdict
            results["batches"].append(res)
            texts.append(text_b)
    print()
    print("## summary (train_throughput)")
    print(f"FLOPs/step = 6 * {shape['non_embedding_params'] / 1e6:.2f}M * real tokens (2 views) "
          f"+ 12 * {shape['layers']} layers * {shape['hidden']} * sum(len^2)")
    print("\n\n".join(texts))
    C.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
