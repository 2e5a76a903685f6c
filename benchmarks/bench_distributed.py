"""Speed-up of ``certify area`` with 1 vs 2 torchrun processes (CPU, gloo, 1 thread each).

Trains a small digits model, then times the same ``area`` command in one process and under
``torchrun --nproc_per_node=2`` (wall time of the whole command, start-up included), and checks
that both reports hold the same rows. Usage::

    python benchmarks/bench_distributed.py [--n 256] [--batch-size 32] [--method crown]
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], nproc: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    t0 = time.perf_counter()
    subprocess.run([*launcher, "-m", "certify", *args], env=env, check=True,
                   capture_output=True, text=True)
    return time.perf_counter() - t0


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "per_sample.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--method", default="crown")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    opts = parser.parse_args()

    from certify.train.loops import TrainConfig
    from certify.train.standard import train_standard

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "digits-mlp.pt"
        train_standard("mlp-64-64", "digits", TrainConfig(epochs=5, lr=1e-2, seed=0),
                       output=model, quiet=True)
        args = ["area", str(model), "--dataset", "digits", "--indices", f"0:{opts.n}",
                "--batch-size", str(opts.batch_size), "--method", opts.method, "--quiet"]
        times = {}
        for nproc in (1, 2):
            out = Path(tmp) / f"run{nproc}"
            times[nproc] = _run([*args, "-o", str(out)], nproc, opts.threads)
        same = _rows(Path(tmp) / "run1") == _rows(Path(tmp) / "run2")
    print(f"area {opts.method}, digits mlp-64-64, {opts.n} samples, batch {opts.batch_size}, "
          f"{opts.threads} thread(s) per process")
    print(f"  1 process : {times[1]:7.2f} s")
    print(f"  2 processes: {times[2]:7.2f} s   speed-up x{times[1] / times[2]:.2f}   "
          f"identical rows: {same}")


if __name__ == "__main__":
    main()
