"""Branch and bound's certified radii next to alpha-CROWN's and the attack's, in one process.

A digits model trained here (``mlp-100-100`` by default: Adam, 10 epochs, seed 0), the first
`--n` test points: per point the attack's eps (PGD), alpha-CROWN's certified radius and bab's
(bisection from alpha-CROWN's radius up to the attack's, one branch and bound per step, each
with `--time-limit` seconds), and the CPU seconds of each search; then the means and the ratios.
With ``--exact`` also the exact minimal adversarial eps by MILP (slow: about a minute per point
on ``mlp-100-100``). Run one benchmark at a time: CPU times are only comparable within a run.

    python benchmarks/bench_bab.py [--arch mlp-100-100] [--n 6] [--time-limit 10] [--exact]
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_radius import train_digits

from certify.attacks import minimal_adversarial
from certify.data import load_dataset
from certify.radius import certified_radii


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mlp-100-100")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--exact", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = train_digits(args.arch, epochs=10, seed=0)
    x, y = next(iter(load_dataset("digits", "test").batches(args.n)))
    adv = minimal_adversarial(model, x, y, eps_max=0.5, tol=args.tol)
    rows: dict[str, list[float]] = {"attack": adv.eps.tolist()}
    seconds: dict[str, float] = {}
    for name, options in (("alpha-crown", {}), ("bab", {"time_limit": args.time_limit})):
        t0 = time.process_time()
        r = certified_radii(model, x, y, name, tol=args.tol, attack_eps=adv.eps, **options)
        seconds[name] = time.process_time() - t0
        rows[name] = r.certified_eps.tolist()
    if args.exact:
        from certify.exact import exact_radii

        t0 = time.process_time()
        rows["exact"] = exact_radii(model, x, y, eps_max=0.5, attack_eps=adv.eps).exact_eps.tolist()
        seconds["exact"] = time.process_time() - t0
    print(f"{args.arch}, digits test points 0..{args.n - 1}, tol {args.tol}, bab time limit "
          f"{args.time_limit} s per step, torch {torch.__version__}, 1 thread")
    names = list(rows)
    print("point  " + "  ".join(f"{n:>11}" for n in names))
    for i in range(args.n):
        print(f"{i:5d}  " + "  ".join(f"{rows[n][i]:11.5f}" for n in names))
    mean = {n: sum(v) / len(v) for n, v in rows.items()}
    print("mean   " + "  ".join(f"{mean[n]:11.5f}" for n in names))
    for name, s in seconds.items():
        print(f"{name}: {s / args.n:.2f} CPU s per point")
    print(f"bab / alpha-crown mean radius: {mean['bab'] / mean['alpha-crown']:.3f}")
    if args.exact:
        print(f"bab / exact mean radius: {mean['bab'] / mean['exact']:.3f}; "
              f"exact CPU time / bab's: {seconds['exact'] / seconds['bab']:.2f}")


if __name__ == "__main__":
    main()
