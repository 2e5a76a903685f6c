"""Branch and bound's certified radii next to CROWN's, alpha-CROWN's, the attack's and the exact
ones, on a digits MLP and a digits CNN, in one process.

Two digits models trained here (``mlp-100-100`` and ``scn-16-32``: Adam, 10 epochs, seed 0),
the first `--n` test points. Per model and point: the attack's eps (PGD, an upper bound), the
certified radii of ``crown``, ``alpha-crown`` and ``bab`` (bisection from alpha-CROWN's radius
up to the attack's, one branch and bound per step with `--time-limit` seconds), and, on the MLP,
the exact minimal adversarial eps by MILP (``certify.exact``, `--milp-time-limit` seconds per
MILP; a point whose MILP hits it has no exact radius and is left out of the ratios). Then the
means, the CPU seconds per point of each search, and the ratios the issue asks for: bab / exact
(mean radius over the points where the MILP finished) and the MILP's CPU time over bab's on the
MLP; bab / alpha-CROWN on the CNN. Last, alpha-CROWN on every layer against auto_LiRPA's
alpha-CROWN (``bench_alpha.py``'s comparison) where auto_LiRPA is importable.

Run one benchmark at a time (CPU times are only comparable within a run). The MILP column takes
minutes per point: ``--no-exact`` leaves it out.

    python benchmarks/bench_bab.py [--n 20] [--time-limit 3] [--tol 1e-4] [--no-exact]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from bench_alpha import CASES, compare_alpha
from bench_radius import train_digits

from certify.attacks import minimal_adversarial
from certify.data import load_dataset
from certify.radius import certified_radii

ARCHS = ("mlp-100-100", "scn-16-32")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def run_model(arch: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
              exact: bool) -> dict[str, float]:
    """The table of one model; returns its figures."""
    model = train_digits(arch, epochs=10, seed=0)
    n = len(y)
    t0 = time.process_time()
    adv = minimal_adversarial(model, x, y, eps_max=0.5, tol=args.tol)
    rows: dict[str, list[float]] = {"attack": adv.eps.tolist()}
    seconds: dict[str, float] = {"attack": time.process_time() - t0}
    for name, options in (("crown", {}), ("alpha-crown", {}),
                          ("bab", {"time_limit": args.time_limit})):
        t0 = time.process_time()
        r = certified_radii(model, x, y, name, tol=args.tol, attack_eps=adv.eps, **options)
        seconds[name] = time.process_time() - t0
        rows[name] = r.certified_eps.tolist()
    if exact:
        from certify.exact import exact_radii

        t0 = time.process_time()
        result = exact_radii(model, x, y, eps_max=0.5, attack_eps=adv.eps,
                             time_limit=args.milp_time_limit)
        seconds["exact"] = time.process_time() - t0
        rows["exact"] = result.exact_eps.tolist()
    print(f"\n{arch}, digits test points 0..{n - 1}, tol {args.tol}, bab {args.time_limit} s per "
          f"step" + (f", MILP {args.milp_time_limit} s per problem" if exact else ""))
    names = list(rows)
    print("point  " + "  ".join(f"{m:>11}" for m in names))
    for i in range(n):
        print(f"{i:5d}  " + "  ".join(f"{rows[m][i]:11.5f}" for m in names))
    finite = {m: [v for v in rows[m] if math.isfinite(v)] for m in names}
    print("mean   " + "  ".join(f"{_mean(finite[m]):11.5f}" for m in names))
    print("CPU s  " + "  ".join(f"{seconds[m] / n:11.2f}" for m in names) + "   (per point)")
    out = {"bab/alpha": _mean(rows["bab"]) / _mean(rows["alpha-crown"]),
           "alpha/crown": _mean(rows["alpha-crown"]) / _mean(rows["crown"])}
    print(f"mean radius: bab / alpha-crown {out['bab/alpha']:.3f}, alpha-crown / crown "
          f"{out['alpha/crown']:.3f}")
    if exact:
        done = [i for i in range(n) if math.isfinite(rows["exact"][i])]
        bab_done = _mean([rows["bab"][i] for i in done])
        exact_done = _mean([rows["exact"][i] for i in done])
        out["bab/exact"] = bab_done / exact_done
        out["exact/bab time"] = seconds["exact"] / seconds["bab"]
        worst = min((rows["bab"][i] / rows["exact"][i] for i in done if rows["exact"][i] > 0),
                    default=math.nan)
        print(f"the MILP finished on {len(done)}/{n} points; there: bab / exact mean radius "
              f"{out['bab/exact']:.3f} (lowest point {worst:.3f}); the MILP's CPU time / bab's "
              f"{out['exact/bab time']:.1f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--time-limit", type=float, default=3.0,
                        help="bab's seconds per property and search step")
    parser.add_argument("--milp-time-limit", type=float, default=60.0,
                        help="seconds per MILP of the exact radius")
    parser.add_argument("--no-exact", action="store_true", help="leave out the exact MILP")
    parser.add_argument("--arch", choices=ARCHS, action="append",
                        help="only these models (default: both)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = next(iter(load_dataset("digits", "test").batches(args.n)))
    print(f"torch {torch.__version__}, 1 thread; CPU seconds from time.process_time()")
    for arch in args.arch or ARCHS:
        run_model(arch, x, y, args, exact=not args.no_exact and arch.startswith("mlp"))
    print("\nalpha-CROWN on every layer against auto_LiRPA's (bench_alpha.py, 20 points):")
    x20, y20 = next(iter(load_dataset("digits", "test").batches(20)))
    for arch, eps in CASES:
        compare_alpha(arch, eps, x20, y20)


if __name__ == "__main__":
    main()
