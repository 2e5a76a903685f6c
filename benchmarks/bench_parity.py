"""The native bound engine against auto_LiRPA: milliseconds per batch and bound differences.

For every (net, method) both engines bound the margins ``f_y - f_j`` of the same batch over the
same boxes ``clip(x ± eps, 0, 1)`` (float32), with their default options: native ``crown`` with
``intermediate_mode="auto"``, auto_LiRPA through :mod:`certify.bounds.auto_lirpa` (CROWN
intersected with IBP, as the backend does by default); ``alpha-crown`` is 20 steps in both
(native: Adam lr 0.1; auto_LiRPA: Adam lr 0.5 with decay), lower and upper bounds optimized.

Columns: the median milliseconds per batch over ``--repeats`` runs after one warm-up run (the
warm-up also builds auto_LiRPA's graph, reported once per net as ``build``), their ratio
(``ours/theirs``: below 1 means the native engine is faster), the largest absolute difference of
the lower bounds (and relative to ``max(1, max |ours|)``), and the mean of ``theirs - ours``
(positive: auto_LiRPA's lower bounds are tighter on average). For ``crown`` a second difference
compares like with like: the native output bound given auto_LiRPA's intermediate bounds, against
auto_LiRPA's output bound without the IBP intersection (``same-interm``: float32 rounding).

Nets:
    digits-mlp   mlp-64-64 trained for a few seconds on digits (1x8x8), eps 0.02.
    digits-cnn   scn-8-16 (two 4x4 stride-2 convs, 100 dense) trained on digits, eps 0.02.
    wk-small     Wong & Kolter's small conv net on 3x32x32, random (fan-in) weights and random
                 images, eps 0.002.

Usage::

    python benchmarks/bench_parity.py
    python benchmarks/bench_parity.py --nets wk-small --methods crown --batch-size 8 --repeats 5

torch runs with ``--threads`` threads (default 1, for stable timings on a shared machine).
Needs auto_LiRPA (see the README, "Using auto_LiRPA").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

NETS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"arch": "mlp-64-64", "shape": (1, 8, 8), "eps": 0.02, "train": True},
    "digits-cnn": {"arch": "scn-8-16", "shape": (1, 8, 8), "eps": 0.02, "train": True},
    "wk-small": {"arch": "wk-small", "shape": (3, 32, 32), "eps": 0.002, "train": False},
}
METHODS = ("ibp", "crown", "alpha-crown")


def _trained(arch: str, seed: int) -> tuple[Any, Any, Any]:
    """`arch` trained on digits for a few epochs; returns (model, test x, test y)."""
    import torch
    import torch.nn.functional as F

    from certify.data import load_dataset
    from certify.nets import create_arch

    torch.manual_seed(seed)
    x, y = load_dataset("digits", "train").tensors()
    mean, std = x.mean().item(), x.std().item()
    model = create_arch(arch, (1, 8, 8), 10, mean=[mean], std=[std])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    xt, yt = load_dataset("digits", "test").tensors()
    return model.eval(), xt, yt


def _random(arch: str, shape: tuple[int, int, int], n: int, seed: int) -> tuple[Any, Any, Any]:
    import torch

    from certify.nets import create_arch

    torch.manual_seed(seed)
    model = create_arch(arch, shape, 10, mean=[0.45] * shape[0], std=[0.25] * shape[0]).eval()
    x = torch.rand(n, *shape)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from certify.bounds import compute_bounds, get_method, margin_bounds
    from certify.bounds.auto_lirpa import (
        auto_lirpa_bounds,
        auto_lirpa_intermediate,
        auto_lirpa_margin_bounds,
        engine_info,
    )
    from certify.spec import LinfBall, margin_spec

    torch.set_num_threads(args.threads)
    print(f"auto_LiRPA {engine_info()['version']}, torch {torch.__version__}, "
          f"{args.threads} thread(s), batch {args.batch_size}, float32")
    rows = []
    for name in args.nets:
        net = NETS[name]
        if net["train"]:
            model, x, y = _trained(net["arch"], args.seed)
        else:
            model, x, y = _random(net["arch"], net["shape"], args.batch_size, args.seed)
        x, y = x[:args.batch_size], y[:args.batch_size]
        eps = net["eps"]
        start = time.perf_counter()
        auto_lirpa_margin_bounds(model, x, y, eps, "ibp")  # builds and caches the graph
        print(f"{name}: {net['arch']} {net['shape']}, eps {eps}, auto_LiRPA build "
              f"{(time.perf_counter() - start) * 1e3:.0f} ms")
        for method in args.methods:
            batch = (model, x, y, eps, method)
            ours_ms, ours = _time(lambda b=batch: margin_bounds(*b), args.repeats)
            theirs_ms, theirs = _time(lambda b=batch: auto_lirpa_margin_bounds(*b),
                                      args.repeats)
            delta = (theirs.lower - ours.lower).detach()
            scale = max(1.0, float(ours.lower.detach().abs().max()))
            row = {"net": name, "method": method, "ours_ms": ours_ms, "theirs_ms": theirs_ms,
                   "ratio": ours_ms / theirs_ms, "max_abs_diff": float(delta.abs().max()),
                   "max_rel_diff": float(delta.abs().max()) / scale,
                   "mean_theirs_minus_ours": float(delta.mean()), "same_interm": None}
            if method == "crown":
                x_lo, x_hi = LinfBall(x, eps).box()
                spec = margin_spec(y, 10)
                inter = auto_lirpa_intermediate(model, x_lo, x_hi, "crown")
                a = compute_bounds(model, x_lo, x_hi, get_method("crown"), spec,
                                   intermediate=inter)
                b = auto_lirpa_bounds(model, x_lo, x_hi, "crown", spec, intermediate=inter,
                                      intersect_ibp=False)
                row["same_interm"] = float((a.lower - b.lower).detach().abs().max())
            rows.append(row)
            print(_format(row), flush=True)
    return rows


def _format(row: dict[str, Any]) -> str:
    same = f"{row['same_interm']:.1e}" if row["same_interm"] is not None else "-"
    return (f"  {row['net']:<11} {row['method']:<12} ours {row['ours_ms']:9.1f} ms  theirs "
            f"{row['theirs_ms']:9.1f} ms  ours/theirs {row['ratio']:6.2f}  max|dlower| "
            f"{row['max_abs_diff']:.2e} (rel {row['max_rel_diff']:.1e})  mean(theirs-ours) "
            f"{row['mean_theirs_minus_ours']:+.2e}"
            f"  same-interm {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", type=lambda s: s.split(","), default=list(NETS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.nets:
        if name not in NETS:
            parser.error(f"unknown net {name!r}; choose from {', '.join(NETS)}")
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    run(args)


if __name__ == "__main__":
    main()
