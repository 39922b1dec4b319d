"""Launch one training run with ``accelerate launch`` on GPUs it leases for itself.

``python -m clusterns.launch --gpus N -- <clusterns.train arguments>``

* On a machine with GPUs, the run takes N GPUs that no other run holds: one lock file per GPU
  (``flock``; released by the kernel when the process ends, even on a kill) in
  ``$CLUSTERNS_GPU_LOCK_DIR`` (default ``/tmp/clusterns-gpu-locks``), then
  ``CUDA_VISIBLE_DEVICES`` is set to exactly those GPUs. Concurrent Snakemake jobs (or two
  Snakemake instances) therefore never share a GPU; a run waits until enough are free.
* Under SLURM (``SLURM_JOB_ID`` set) the scheduler already allocated the GPUs: no lease.
* A run asking for more GPUs than the node has is refused (multi-node training is not
  supported); on a machine without GPUs the run uses the CPU with one process.
* ``--main_process_port 0`` lets the OS pick a free rendezvous port, so concurrent runs never
  collide.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class LaunchError(RuntimeError):
    """The run cannot be placed on this machine; the message says why."""


def visible_gpus() -> list[str]:
    """Physical ids of the GPUs this process may use (honours an existing CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install means no usable GPU
        count = 0
    if env is not None and env.strip() != "":
        ids = [x.strip() for x in env.split(",") if x.strip()]
        return ids[:count]
    return [str(i) for i in range(count)]


@contextlib.contextmanager
def lease_gpus(n: int, available: list[str], lock_dir: Path, poll: float = 10.0, log=print):
    """Hold exclusive locks on ``n`` of ``available`` GPUs; yields their ids."""
    if n > len(available):
        raise LaunchError(f"the run asks for {n} GPUs but this node has {len(available)} "
                          f"({','.join(available) or 'none'}); multi-node training is not supported: "
                          f"lower training.gpus (the global batch is kept) or use a larger node")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = 0.0
    while True:
        held = []
        for gpu in available:
            f = open(lock_dir / f"gpu{gpu}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            held.append((gpu, f))
            if len(held) == n:
                break
        if len(held) == n:
            try:
                yield [g for g, _ in held]
            finally:
                for _, f in held:
                    f.close()
            return
        for _, f in held:
            f.close()
        if waited % 300 == 0:
            log(f"waiting for {n} free GPUs (locks in {lock_dir})")
        time.sleep(poll)
        waited += poll


def accelerate_command(processes: int, cpu: bool, train_args: list[str]) -> list[str]:
    """The ``accelerate launch`` command line for one run on one node."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--num_processes", str(processes), "--main_process_port", "0", "--dynamo_backend", "no",
           # The precision is resolved by clusterns.train (Accelerator's argument wins over this).
           "--mixed_precision", "no",
           "--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS", "1")]
    if cpu:
        cmd += ["--cpu"] if processes == 1 else ["--multi_gpu"]
    elif processes > 1:
        cmd += ["--multi_gpu"]
    return cmd + ["-m", "clusterns.train", *train_args]


def _run(cmd: list[str], env: dict) -> int:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterns.launch", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, required=True, help="GPUs for this run (its processes)")
    p.add_argument("--cpu-processes", type=int, default=1,
                   help="processes when no GPU is present (tests use 2 to exercise the distributed path)")
    p.add_argument("--lock-dir", default=os.environ.get("CLUSTERNS_GPU_LOCK_DIR", "/tmp/clusterns-gpu-locks"))
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the clusterns.train arguments")
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    env = dict(os.environ)
    gpus = visible_gpus()
    try:
        if not gpus or args.gpus == 0:
            if args.gpus > 0:
                print(f"no GPU found: training on the CPU with {args.cpu_processes} process(es) "
                      "(same global batch, so the same objective)", flush=True)
            return _run(accelerate_command(args.cpu_processes, True, train_args), env)
        if os.environ.get("SLURM_JOB_ID"):
            if args.gpus > len(gpus):
                raise LaunchError(f"the run asks for {args.gpus} GPUs but SLURM gave this job {len(gpus)}; "
                                  "set the rule's gpu resource (profiles/slurm) to training.gpus")
            return _run(accelerate_command(args.gpus, False, train_args), env)
        with lease_gpus(args.gpus, gpus, Path(args.lock_dir)) as mine:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
            print(f"leased GPUs {','.join(mine)}", flush=True)
            return _run(accelerate_command(args.gpus, False, train_args), env)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
