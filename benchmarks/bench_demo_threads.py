"""Wall time of ``certify demo`` with its default thread count vs ``OMP_NUM_THREADS=1``.

The default (``certify.threads.default_threads``) must not oversubscribe a small machine: the
acceptance bound is default <= 1.2 x the single-thread time. Each run is a fresh
``python -m certify demo`` into its own temporary folder (nothing cached between them), with
``OMP_NUM_THREADS`` and ``CERTIFY_THREADS`` removed from the environment for the default run
and ``OMP_NUM_THREADS=1`` for the other. The runs alternate (default first), so a change of the
machine's load hits both. The load average before and after each run is printed next to it:
on a shared machine, report the figures with it.

Usage::

    python benchmarks/bench_demo_threads.py                 # one pair of full demos
    python benchmarks/bench_demo_threads.py --quick --pairs 2
    python benchmarks/bench_demo_threads.py --keep reports/demo   # keep the default run's report
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path, *, single: bool, quick: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CERTIFY_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if single:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "certify", "demo", "-o", str(out), "-q"]
    if quick:
        cmd.append("--quick")
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="certify demo --quick")
    parser.add_argument("--pairs", type=int, default=1, help="(default, single) pairs to run")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the first default run's report folder here")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from certify.threads import available_cpus, default_threads

    saved = os.environ.pop("OMP_NUM_THREADS", None)
    print(f"usable CPUs {available_cpus()}, default threads {default_threads()}, "
          f"{'quick' if args.quick else 'full'} demo")
    if saved is not None:
        os.environ["OMP_NUM_THREADS"] = saved
    times: dict[str, list[float]] = {"default": [], "OMP_NUM_THREADS=1": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for name, single in (("default", False), ("OMP_NUM_THREADS=1", True)):
                out = Path(tmp) / f"{pair}-{'single' if single else 'default'}"
                load0 = os.getloadavg()[0]
                seconds = run_demo(out, single=single, quick=args.quick)
                times[name].append(seconds)
                print(f"{name:>18}: {seconds:7.1f} s   (1-min load average {load0:.2f} -> "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
                if args.keep is not None and not single and pair == 0:
                    if args.keep.exists():
                        shutil.rmtree(args.keep)
                    shutil.copytree(out, args.keep)
    best = {k: min(v) for k, v in times.items()}
    ratio = best["default"] / best["OMP_NUM_THREADS=1"]
    print(f"best of {args.pairs}: default {best['default']:.1f} s, OMP_NUM_THREADS=1 "
          f"{best['OMP_NUM_THREADS=1']:.1f} s, ratio {ratio:.2f} (target <= 1.20)")


if __name__ == "__main__":
    main()
