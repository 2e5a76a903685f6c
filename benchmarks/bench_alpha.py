"""alpha-CROWN on every layer next to the last layer only, CROWN, and auto_LiRPA's alpha-CROWN.

Digits models trained here (``mlp-100-100`` and ``scn-16-32``: Adam, 10 epochs, seed 0), the
first `--n` test points, the margins ``f_y - f_j`` over the L-inf ball (clipped to [0, 1]): the
mean lower bound and the CPU time of CROWN, alpha-CROWN with the last layer's slopes only, and
alpha-CROWN on every layer (20 steps, lr 0.1), all rigorous in float32; where auto_LiRPA is
importable, its CROWN and its alpha-CROWN with every layer's slopes optimized
(``fix_interm_bounds=False``, 20 iterations, lr 0.1) on the same boxes (its normalization
stripped and the box mapped through it, as ``certify.bounds.auto_lirpa`` does). The issue's
measure is each tool's improvement over its own CROWN. Each CPU time is the median of
`--repeat` runs of the same call (one run of a fraction of a second varies by ~10 %); the
bounds of the repeats are identical. Run one benchmark at a time.

    python benchmarks/bench_alpha.py [--n 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_radius import train_digits

from certify.bounds import compute_bounds
from certify.data import load_dataset
from certify.spec import LinfBall, margin_spec

CASES = (("mlp-100-100", 0.08), ("scn-16-32", 0.03))


def _timed(run: Callable[[], torch.Tensor], repeat: int) -> tuple[float, float]:
    """The mean of the lower bounds `run` returns, and its median CPU time over `repeat` runs."""
    seconds, means = [], []
    for _ in range(repeat):
        t0 = time.process_time()
        lower = run()
        seconds.append(time.process_time() - t0)
        means.append(float(lower.detach().mean()))
    if len(set(means)) > 1:
        raise RuntimeError(f"repeated runs gave different bounds: {means}")
    return means[0], statistics.median(seconds)


def _lirpa(model: torch.nn.Module, lo: torch.Tensor, hi: torch.Tensor,
           spec: torch.Tensor, repeat: int) -> dict[str, tuple[float, float]]:
    try:
        from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except ImportError:
        return {}
    norm, body = model[0], model[1:]
    mean, std = norm.mean.view(1, -1, 1, 1), norm.std.view(1, -1, 1, 1)
    n_lo, n_hi = (lo - mean) / std, (hi - mean) / std
    bounded = BoundedModule(body, torch.zeros_like(lo[:1]), device="cpu", verbose=0)
    bounded.set_bound_opts({"optimize_bound_args": {"iteration": 20, "lr_alpha": 0.1,
                                                    "fix_interm_bounds": False},
                            "verbosity": 0})
    x = BoundedTensor((n_lo + n_hi) / 2, PerturbationLpNorm(norm=float("inf"), x_L=n_lo,
                                                            x_U=n_hi))
    out = {}
    for method in ("CROWN", "alpha-CROWN"):
        def run(method: str = method) -> torch.Tensor:
            with torch.enable_grad():
                return bounded.compute_bounds(x=(x,), C=spec, method=method,
                                              bound_upper=False)[0]
        out[f"auto_LiRPA {method}"] = _timed(run, repeat)
    return out


def compare_alpha(arch: str, eps: float, x: torch.Tensor, y: torch.Tensor,
                  repeat: int = 5) -> None:
    """Print the comparison on one digits model at one eps."""
    model = train_digits(arch, epochs=10, seed=0)
    lo, hi = LinfBall(x, eps).box()
    spec = margin_spec(y, 10).to(x.dtype)
    rows: dict[str, tuple[float, float]] = {}
    for label, method, options in (
            ("crown", "crown", {}),
            ("alpha-crown, last layer", "alpha-crown",
             {"optimize_intermediate": False, "optimize_upper": False}),
            ("alpha-crown, every layer", "alpha-crown", {"optimize_upper": False})):
        def run(method: str = method, options: dict = options) -> torch.Tensor:
            return compute_bounds(model, lo, hi, method, spec, **options).lower
        rows[label] = _timed(run, repeat)
    rows.update(_lirpa(model, lo, hi, spec, repeat))
    print(f"\n{arch}, eps {eps}")
    for label, (mean, seconds) in rows.items():
        print(f"  {label:28s} mean lower {mean:9.4f}   {seconds:6.3f} CPU s (median)")
    ours = rows["alpha-crown, every layer"][0] - rows["crown"][0]
    print(f"  improvement over CROWN: ours {ours:.4f}", end="")
    if "auto_LiRPA alpha-CROWN" in rows:
        theirs = rows["auto_LiRPA alpha-CROWN"][0] - rows["auto_LiRPA CROWN"][0]
        ratio = rows["alpha-crown, every layer"][1] / rows["auto_LiRPA alpha-CROWN"][1]
        print(f", auto_LiRPA {theirs:.4f} (ratio {ours / theirs:.3f}); time ratio "
              f"{ratio:.3f}")
    else:
        print(" (auto_LiRPA not importable)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (median)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = next(iter(load_dataset("digits", "test").batches(args.n)))
    print(f"digits test points 0..{args.n - 1}, float32, torch {torch.__version__}, 1 thread")
    for arch, eps in CASES:
        compare_alpha(arch, eps, x, y, args.repeat)

if __name__ == "__main__":
    main()
