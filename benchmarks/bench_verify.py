"""``certify verify`` on generated digits robustness instances: how many are decided, how fast.

Two digits models trained here (``mlp-100-100`` and ``scn-16-32``: Adam, 10 epochs, seed 0), the
first `--n` test points, each at eps 0.01, 0.03 and 0.08: the VNN-COMP local-robustness property
of :func:`certify.vnnlib.robustness_vnnlib`, its box clipped to the pixel range [0, 1] as the
radius search's balls are (``--unclipped``: ``x +- eps`` as it is). Per model and eps the
verdicts (sat / unsat / unknown / timeout), the deciding phase, and the slowest instance, with
the default cascade (attack, ibp/crown/alpha-crown, bab, the MILP where small) and, with
``--compare``, the same without branch and bound. Run one benchmark at a time.

    python benchmarks/bench_verify.py [--n 15] [--timeout 30] [--compare] [--unclipped]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from bench_radius import train_digits

from certify.data import load_dataset
from certify.verify import verify
from certify.vnnlib import parse_vnnlib, robustness_vnnlib

EPS = (0.01, 0.03, 0.08)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=15)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--compare", action="store_true", help="also without branch and bound")
    parser.add_argument("--unclipped", action="store_true",
                        help="boxes x +- eps, not clipped to [0, 1]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, _ = next(iter(load_dataset("digits", "test").batches(args.n)))
    clip = None if args.unclipped else (0.0, 1.0)
    print(f"digits test points 0..{args.n - 1}, eps {EPS}, boxes "
          f"{'not clipped' if clip is None else 'clipped to [0, 1]'}, timeout {args.timeout} s, "
          f"torch {torch.__version__}, 1 thread")
    for arch in ("mlp-100-100", "scn-16-32"):
        model = train_digits(arch, epochs=10, seed=0)
        with torch.no_grad():
            labels = model(x).argmax(1).tolist()
        for use_bab in ((True, False) if args.compare else (True,)):
            total: collections.Counter[str] = collections.Counter()
            for eps in EPS:
                counts: collections.Counter[str] = collections.Counter()
                slowest = 0.0
                for i in range(args.n):
                    prop = parse_vnnlib(robustness_vnnlib(x[i], labels[i], 10, eps, clip=clip))
                    t0 = time.perf_counter()
                    v = verify(model, prop, timeout=args.timeout, input_shape=(1, 8, 8),
                               use_bab=use_bab)
                    slowest = max(slowest, time.perf_counter() - t0)
                    counts[v.result] += 1
                    counts[f"by {v.method}"] += v.result in ("sat", "unsat")
                total += counts
                decided = counts["sat"] + counts["unsat"]
                by = ", ".join(f"{k[3:]} {v}" for k, v in sorted(counts.items())
                               if k.startswith("by ") and v)
                print(f"{arch:12s} bab={'on ' if use_bab else 'off'} eps {eps:<5} decided "
                      f"{decided:2d}/{args.n} (sat {counts['sat']}, unsat {counts['unsat']}, "
                      f"unknown {counts['unknown']}, timeout {counts['timeout']}; {by}); "
                      f"slowest {slowest:.1f} s")
            print(f"{arch:12s} bab={'on ' if use_bab else 'off'} all: decided "
                  f"{total['sat'] + total['unsat']}/{args.n * len(EPS)}")


if __name__ == "__main__":
    main()
