"""Exact radii by MILP on the digits MLP: seconds per sample, and how tight each relaxation is.

For the first ``--n`` test points of digits and the 64-100-100-10 MLP (``mlp-100-100``, trained
here for ``--epochs`` epochs with Adam, or loaded from ``--checkpoint``):

1. the attack eps: :func:`certify.attacks.minimal_adversarial` (PGD, ``--attack-steps`` steps,
   ``--attack-restarts`` restarts; a smaller attack eps is a smaller box for the MILP);
2. the exact minimal adversarial eps: :func:`certify.exact.exact_radii`, one sample at a time
   (its seconds are the figure of interest), ``--time-limit`` seconds per MILP;
3. the certified eps of every ``--methods`` method: :func:`certify.radius.certified_radii`
   (``--tol``), checked against the exact eps (:func:`certify.exact.check_sandwich`).

Printed: the exact radius's status counts and seconds per sample (mean, median, max), and per
method the certified/exact ratio (mean, median, min) over the samples whose exact eps is known
and > 0, its certified/attack ratio over the same samples, and its seconds per sample. ``--json``
writes every per-sample number.

Usage::

    python benchmarks/bench_milp.py                       # N=20, trains the MLP (about 10 s)
    python benchmarks/bench_milp.py --n 50 --time-limit 120 --json reports/bench_milp.json
    python benchmarks/bench_milp.py --checkpoint models/digits-mlp.pt --n 5

torch runs with ``--threads`` threads (default 1); HiGHS is single-threaded here.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

METHODS = ("ibp", "crown", "wong-kolter", "alpha-crown", "lp")


def _model(args: argparse.Namespace) -> Any:
    import torch

    if args.checkpoint:
        from certify.model_io import load_model

        model, _ = load_model(args.checkpoint, device="cpu", dataset="digits")
        return model.eval()
    from certify.data import get_dataset_info, load_dataset
    from certify.nets import create_arch

    info = get_dataset_info("digits")
    x, y = load_dataset("digits", "train").tensors()
    torch.manual_seed(args.seed)
    model = create_arch("mlp-100-100", info.input_shape, info.num_classes,
                        mean=list(info.mean), std=list(info.std))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _stats(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return math.nan, math.nan, math.nan
    return statistics.fmean(values), statistics.median(values), min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="test points (the first N)")
    parser.add_argument("--checkpoint", default=None, help="a digits model instead of training")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eps-max", type=float, default=0.5)
    parser.add_argument("--tol", type=float, default=1e-4, help="certified search precision")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP")
    parser.add_argument("--attack-steps", type=int, default=100)
    parser.add_argument("--attack-restarts", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write per-sample results here")
    args = parser.parse_args()

    import torch

    from certify.attacks import minimal_adversarial
    from certify.data import load_dataset
    from certify.exact import check_sandwich, exact_radii
    from certify.radius import certified_radii

    torch.set_num_threads(args.threads)
    model = _model(args)
    xt, yt = load_dataset("digits", "test").tensors()
    x, y = xt[:args.n], yt[:args.n]
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    source = args.checkpoint or f"mlp-100-100 trained {args.epochs} epochs"
    print(f"model: {source}, "
          f"test accuracy {accuracy:.4f}; N={args.n} test points, eps_max={args.eps_max}, "
          f"MILP time limit {args.time_limit:g}s, PGD {args.attack_steps} steps x "
          f"{args.attack_restarts} restarts", flush=True)

    t0 = time.perf_counter()
    attack = minimal_adversarial(model, x, y, eps_max=args.eps_max, tol=args.tol,
                                 steps=args.attack_steps, restarts=args.attack_restarts,
                                 generator=torch.Generator().manual_seed(args.seed)).eps
    attack_seconds = time.perf_counter() - t0

    results = []
    for i in range(args.n):
        r = exact_radii(model, x[i:i + 1], y[i:i + 1], eps_max=args.eps_max,
                        attack_eps=attack[i:i + 1], time_limit=args.time_limit,
                        index=torch.tensor([i]))
        results.append(r)
        print(f"  sample {i:3d}: exact {float(r.exact_eps[0]):.6g} [{float(r.exact_lo[0]):.6g}, "
              f"{float(r.exact_hi[0]):.6g}] attack {float(attack[i]):.6g} {r.status[0]} "
              f"{r.reason[0]} ({r.problems.item()} MILPs, {float(r.seconds[0]):.1f}s)",
              file=sys.stderr, flush=True)
    exact = torch.cat([r.exact_eps for r in results])
    lo = torch.cat([r.exact_lo for r in results])
    status = [r.status[0] for r in results]
    seconds = [float(r.seconds[0]) for r in results]
    tolerance = [float(r.tolerance[0]) for r in results]
    correct = [r.reason[0] != "misclassified" for r in results]
    known = [s == "optimal" and c and 0 < float(e) < math.inf
             for s, c, e in zip(status, correct, exact.tolist(), strict=True)]
    timed = [s for s, c in zip(seconds, correct, strict=True) if c]
    counts = {s: status.count(s) for s in ("optimal", "above_max", "unknown")}
    print(f"\nexact radius: {counts}, {sum(not c for c in correct)} misclassified; seconds per "
          f"correctly classified sample: mean {statistics.fmean(timed):.1f}, median "
          f"{statistics.median(timed):.1f}, max {max(timed):.1f}; MILP tolerance (eps) up to "
          f"{max(tolerance):.2g}; attack {attack_seconds / args.n:.2f}s per sample")

    per_method: dict[str, Any] = {}
    print(f"\n{'method':<12} {'cert/exact mean':>15} {'median':>8} {'min':>8} "
          f"{'cert/attack mean':>16} {'mean cert eps':>13} {'s/sample':>9}  (over "
          f"{sum(known)} samples with a known exact eps > 0)")
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        cert = certified_radii(model, x, y, method, eps_max=args.eps_max, tol=args.tol,
                               attack_eps=attack)
        elapsed = time.perf_counter() - t0
        merged = _merge(results)
        check_sandwich(merged, certified_eps=cert.certified_eps, attack_eps=attack,
                       method=method)
        ratios = [float(c) / float(e) for c, e, k in
                  zip(cert.certified_eps.tolist(), exact.tolist(), known, strict=True) if k]
        attack_ratios = [float(c) / float(a) for c, a, k in
                         zip(cert.certified_eps.tolist(), attack.tolist(), known, strict=True)
                         if k and math.isfinite(a)]
        mean, median, low = _stats(ratios)
        print(f"{method:<12} {mean:>15.3f} {median:>8.3f} {low:>8.3f} "
              f"{_stats(attack_ratios)[0]:>16.3f} {float(cert.certified_eps.mean()):>13.5f} "
              f"{elapsed / args.n:>9.3f}", flush=True)
        per_method[method] = {"certified_eps": cert.certified_eps.tolist(),
                              "seconds_per_sample": elapsed / args.n,
                              "ratio_mean": mean, "ratio_median": median, "ratio_min": low}
    if args.json:
        from certify._io import atomic_write_json
        from certify.report.results import json_safe

        atomic_write_json(args.json, json_safe({
            "settings": vars(args), "test_accuracy": accuracy, "attack_eps": attack.tolist(),
            "exact_eps": exact.tolist(), "exact_lo": lo.tolist(), "status": status,
            "reason": [r.reason[0] for r in results], "exact_seconds": seconds,
            "tolerance": tolerance, "methods": per_method}))


def _merge(results: list[Any]) -> Any:
    """One ExactResult from single-sample ones."""
    import torch

    from certify.exact import ExactResult

    def cat(name: str) -> Any:
        return torch.cat([getattr(r, name) for r in results])

    return ExactResult(cat("index"), cat("label"), cat("pred"), cat("exact_eps"),
                       cat("exact_lo"), cat("exact_hi"), tuple(r.status[0] for r in results),
                       tuple(r.reason[0] for r in results), cat("target"), cat("problems"),
                       cat("tolerance"), cat("seconds"))


if __name__ == "__main__":
    main()
