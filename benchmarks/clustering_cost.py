"""How much does ClusterNS's clustering add to a training step?

Times (median over repeats, after warm-up) the clustering part of one step at the paper's
sizes -- assign + momentum update, re-assign + hard negatives + false-negative mask, and BML
forward + backward -- next to the whole objective (ClusterNS vs plain SimCSE InfoNCE, forward +
backward) and, as a reference for the encoder's cost, one ``nn.TransformerEncoderLayer(d_model,
nhead=16)`` forward + backward on a (batch, seq, d_model) input. With ``--quick`` the reference
layer runs on a slice of the batch and is scaled linearly to the full batch (a transformer layer's
cost is per sequence), so the script finishes in well under a minute on 2 CPUs.

    python benchmarks/clustering_cost.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from clusterns.method.clustering import (ClusterState, assign, false_negative_mask, init_centroids,
                                  momentum_update, nearest_two)
from clusterns.method.losses import bml_loss, info_nce
from clusterns.method.objective import compute_objective
from clusterns.method.settings import ObjectiveConfig


def timed(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=512, help="global batch B")
    p.add_argument("--k", type=int, default=128, help="number of centroids K")
    p.add_argument("--dim", type=int, default=1024, help="embedding size D (= d_model of the reference layer)")
    p.add_argument("--seq", type=int, default=32, help="sequence length of the reference layer input")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20, quick 5)")
    p.add_argument("--layer-batch", type=int, default=None,
                   help="sequences the reference layer actually runs on (scaled to --batch); default: all, quick 32")
    p.add_argument("--quick", action="store_true", help="fewer repeats and a sliced reference layer (< 60 s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 20)
    warmup = 1 if args.quick else 3
    b, k, d = args.batch, args.k, args.dim
    layer_batch = min(b, args.layer_batch or (32 if args.quick else b))

    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(b, d, generator=g).to(device).requires_grad_(True)
    z2 = (z1.detach() + 0.5 * torch.randn(b, d, generator=g).to(device)).requires_grad_(True)
    z = z1.detach()
    centroids = init_centroids(z1, z2, k, 0)
    lr = 1e-3
    mask = false_negative_mask(assign(z, centroids))

    def assign_update() -> None:
        momentum_update(centroids, z, lr, assignments=assign(z, centroids))

    def hardneg_mask() -> None:
        first, second = nearest_two(z, centroids)
        centroids.index_select(0, second)
        false_negative_mask(first)

    def bml_fb() -> None:
        z1.grad = z2.grad = None
        bml_loss(z1, z2, mask, 0.0, 0.3).backward()

    def clustering_part() -> None:
        c = momentum_update(centroids, z, lr, assignments=assign(z, centroids))
        first, second = nearest_two(z, c)
        c.index_select(0, second)
        m = false_negative_mask(first)
        z1.grad = z2.grad = None
        bml_loss(z1, z2, m, 0.0, 0.3).backward()

    def simcse_fb() -> None:
        z1.grad = z2.grad = None
        info_nce(z1, z2, 0.05).backward()

    cfg = ObjectiveConfig(kmeans=k, kmeans_lr=lr, bml_weight=1e-3, bml_alpha=0.0, bml_beta=0.3)
    state = ClusterState(centroids=centroids.clone(), started=True, start_step=0)

    def clusterns_fb() -> None:
        z1.grad = z2.grad = None
        loss, _ = compute_objective(z1, z2, state, cfg, 1, None)
        loss.backward()

    rows: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    rows.append(("assign + momentum update", timed(assign_update, repeats, warmup, device)))
    rows.append(("re-assign + hard negatives + mask", timed(hardneg_mask, repeats, warmup, device)))
    rows.append(("BML forward + backward", timed(bml_fb, repeats, warmup, device)))
    clustering = timed(clustering_part, repeats, warmup, device)
    rows.append(("clustering part of a step (all of the above)", clustering))
    simcse = timed(simcse_fb, repeats, warmup, device)
    clusterns = timed(clusterns_fb, repeats, warmup, device)
    rows.append(("objective fwd+bwd: plain SimCSE InfoNCE", simcse))
    rows.append(("objective fwd+bwd: ClusterNS (hard neg. + BML)", clusterns))
    rows.append(("  ClusterNS - SimCSE", clusterns - simcse))

    layer = torch.nn.TransformerEncoderLayer(d_model=d, nhead=16, batch_first=True).to(device)
    x = torch.randn(layer_batch, args.seq, d, generator=g).to(device).requires_grad_(True)

    def layer_fb() -> None:
        layer.zero_grad(set_to_none=True)
        layer(x).sum().backward()

    layer_reps = 2 if args.quick else 3
    layer_ms = timed(layer_fb, layer_reps, 1, device) * (b / layer_batch)
    how = "measured" if layer_batch == b else f"from {layer_batch} seqs x{b / layer_batch:g}"
    ref_name = f"reference: TransformerEncoderLayer({d}, 16) fwd+bwd ({b}, {args.seq}, {d}) [{how}]"
    rows.append((ref_name, layer_ms))
    elapsed = time.perf_counter() - t0

    width = max(len(name) for name, _ in rows) + 2
    print(f"ClusterNS clustering cost: B={b} K={k} D={d}, {device.type} float32, torch threads "
          f"{torch.get_num_threads()}, median of {repeats} after {warmup} warm-up "
          f"(reference layer: median of {layer_reps})")
    print(f"{'component':<{width}}{'ms':>10}")
    print("-" * (width + 10))
    for name, ms in rows:
        print(f"{name:<{width}}{ms:>10.2f}")
    print("-" * (width + 10))
    print(f"{'clustering part / one encoder layer fwd+bwd':<{width}}{100 * clustering / layer_ms:>9.2f}%")
    print(f"{'clustering part / 24 such layers (BERT-large depth)':<{width}}"
          f"{100 * clustering / (24 * layer_ms):>9.3f}%")
    print(f"(benchmark ran {elapsed:.1f} s)")


if __name__ == "__main__":
    main()
