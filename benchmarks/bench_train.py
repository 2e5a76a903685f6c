"""Seconds per epoch and peak memory of robust training, per method.

Each (setup, method) runs in its own subprocess, so its peak resident memory (``ru_maxrss``; on
CUDA ``torch.cuda.max_memory_allocated``) is its own. A run trains with the method's loss
(:class:`certify.train.robust.RobustLoss`) at a constant eps (the cost after the ramp) with Adam
and batch 64, for one epoch or for ``--max-steps`` steps; seconds per epoch (wall clock, and the
process's CPU time) are the measured seconds per step times the steps of an epoch (marked
"extrapolated" when not all steps ran).

Setups:
    digits    mlp-64-64 on the digits training split (1347 images 1x8x8), eps 0.1.
    wk-small  Wong & Kolter's small conv net on 512 synthetic 3x32x32 images, eps 0.01.
    wk-large  Wong & Kolter's large conv net on 512 synthetic 3x32x32 images, eps 0.01.

Usage::

    python benchmarks/bench_train.py                                   # digits and wk-small
    python benchmarks/bench_train.py --setups wk-small --max-steps 2 --threads 2
    python benchmarks/bench_train.py --setups wk-large --methods crown-ibp,wong-kolter \\
        --batch-size 4 --max-steps 1

Bound-based methods plan their checkpointed micro-batches from ``--bound-memory-mb`` (the
default of ``certify train``) unless ``--bound-batch-size`` is given. torch runs with
``--threads`` threads (default 1: on a small shared machine one thread is
the fastest for these sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

SETUPS: dict[str, dict[str, Any]] = {
    "digits": {"arch": "mlp-64-64", "shape": (1, 8, 8), "samples": None, "eps": 0.1},
    "wk-small": {"arch": "wk-small", "shape": (3, 32, 32), "samples": 512, "eps": 0.01},
    "wk-large": {"arch": "wk-large", "shape": (3, 32, 32), "samples": 512, "eps": 0.01},
}
METHODS = ("standard", "ibp", "crown-ibp", "wong-kolter", "pgd")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (setup, method) training run in this process; returns its measurements."""
    import torch
    import torch.nn.functional as F

    from certify.nets import create_arch
    from certify.train.loops import Step
    from certify.train.robust import BOUND_METHODS, RobustConfig, RobustLoss, plan_bound_batch
    from certify.train.schedules import EpsSchedule

    torch.set_num_threads(args.threads)
    setup = SETUPS[args.setup]
    device = torch.device(args.device)
    if setup["samples"] is None:
        from certify.data import load_dataset

        x, y = load_dataset("digits", "train").tensors()
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(setup["samples"], *setup["shape"], generator=g)
        y = torch.randint(0, 10, (setup["samples"],), generator=g)
    channels = setup["shape"][0]
    torch.manual_seed(0)
    model = create_arch(setup["arch"], setup["shape"], 10, mean=[0.5] * channels,
                        std=[0.25] * channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if args.method == "standard":
        def loss_fn(m: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor, epoch: int,
                    step: Step) -> torch.Tensor:
            return F.cross_entropy(m(xb), yb)
    else:
        loss_fn = RobustLoss(RobustConfig(args.method, EpsSchedule(setup["eps"]),
                                          bound_batch_size=args.bound_batch_size,
                                          bound_memory_mb=args.bound_memory_mb,
                                          eval_samples=0))  # type: ignore[assignment]
    n = x.shape[0]
    micro = None
    if args.method in BOUND_METHODS:
        micro = args.bound_batch_size or plan_bound_batch(
            model, x[:args.batch_size].to(device), y[:args.batch_size].to(device), setup["eps"],
            args.method, memory_mb=args.bound_memory_mb)
    batches = math.ceil(n / args.batch_size)
    steps = batches if args.max_steps is None else min(batches, args.max_steps)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
        sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
        xb, yb = x[sl].to(device), y[sl].to(device)
        out = loss_fn(model, xb, yb, 0, Step(0, i, batches, 1, torch.arange(len(yb))))
        loss = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    result = {"setup": args.setup, "arch": setup["arch"], "method": args.method,
              "eps": setup["eps"], "samples": n, "batch_size": args.batch_size,
              "steps": steps, "steps_per_epoch": batches,
              "seconds_per_step": seconds / steps,
              "seconds_per_epoch": seconds / steps * batches,
              "cpu_seconds_per_step": cpu_seconds / steps,
              "cpu_seconds_per_epoch": cpu_seconds / steps * batches,
              "extrapolated": steps < batches, "threads": args.threads,
              "device": str(device), "bound_batch_size": args.bound_batch_size,
              "bound_memory_mb": args.bound_memory_mb, "micro_batch": micro,
              "baseline_rss_mb": base_rss,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="digits,wk-small",
                        help=f"comma list of {', '.join(SETUPS)}")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="train at most this many steps per run (then extrapolate)")
    parser.add_argument("--bound-batch-size", type=int, default=None,
                        help="samples per checkpointed bound computation [default: planned]")
    parser.add_argument("--bound-memory-mb", type=float, default=2048.0,
                        help="budget of the planned micro-batches (see RobustConfig)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", nargs=2, metavar=("SETUP", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.setup, args.method = args.worker
        print(json.dumps(worker(args)))
        return
    rows = []
    print(f"{'setup':9s} {'method':12s} {'s/step':>9s} {'s/epoch':>10s} {'cpu s/epoch':>12s} "
          f"{'steps':>7s} {'micro':>6s} {'peak MB':>9s} {'(+ over import)':>15s}")
    for setup in args.setups.split(","):
        if setup not in SETUPS:
            sys.exit(f"unknown setup {setup!r}; use {', '.join(SETUPS)}")
        for method in args.methods.split(","):
            if method not in METHODS:
                sys.exit(f"unknown method {method!r}; use {', '.join(METHODS)}")
            cmd = [sys.executable, __file__, "--worker", setup, method,
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--device", args.device]
            if args.max_steps is not None:
                cmd += ["--max-steps", str(args.max_steps)]
            if args.bound_batch_size is not None:
                cmd += ["--bound-batch-size", str(args.bound_batch_size)]
            cmd += ["--bound-memory-mb", str(args.bound_memory_mb)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{setup:9s} {method:12s} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            peak = r.get("peak_cuda_mb", r["peak_rss_mb"])
            extra = "" if "peak_cuda_mb" in r else f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f}"
            mark = "*" if r["extrapolated"] else ""
            steps = f"{r['steps']}/{r['steps_per_epoch']}"
            micro = str(r["micro_batch"] or "-")
            cpu = r["cpu_seconds_per_epoch"]
            print(f"{setup:9s} {method:12s} {r['seconds_per_step']:9.3f} "
                  f"{r['seconds_per_epoch']:9.2f}{mark:1s} {cpu:11.2f}{mark:1s} "
                  f"{steps:>7s} {micro:>6s} {peak:9.0f} {extra:>15s}", flush=True)
    if any(r["extrapolated"] for r in rows):
        print("* extrapolated from the steps run (seconds per step x steps per epoch)")
    print("micro: samples per checkpointed bound computation (the batch when it is all of it)")
    print("s: wall-clock seconds; cpu s: CPU time of the process (the better figure on a busy "
          "machine when --threads is 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
