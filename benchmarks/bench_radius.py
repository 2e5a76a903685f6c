"""Radius search benchmark: bound evaluations and time per sample, bisection vs the fast search.

On a digits MLP and a small CNN (trained here in a few seconds unless checkpoints are given),
for the first N test points, tol 1e-4 and eps in [0, 0.5]:

- certify's engine driven by plain bisection (the baseline: ceil(log2(0.5 / 1e-4)) = 13 steps),
- certify's engine driven by the fast search (margin interpolation + closing shots),
- auto_LiRPA CROWN driven by the same bisection (and by the fast search), where importable,

all through :func:`certify.radius.certified_radii`, one batch of N samples per call. Radii of
every variant are compared with certify's bisection: they must agree within tol where the bound
is monotone in eps (CROWN's adaptive slopes make it non-monotone at a few points; the table
counts the samples that differ by more than tol). Writes ``bench_radius.json``,
``bench_radius.md`` and ``bench_radius.png`` to --out.

Every certify variant reports radii confirmed by the rigorous bound in float64 (see the
README's "What certified means"); ``--rounding`` adds the same fast search without that
confirmation, to measure what soundness costs (evaluations per sample and ms per sample).

Run:
    python benchmarks/bench_radius.py --threads 1
    python benchmarks/bench_radius.py --threads 1 --rounding --no-lirpa --methods crown
    python benchmarks/bench_radius.py --mlp models/digits-mlp.pt --cnn models/digits-cnn.pt
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from certify.data import load_dataset
from certify.radius import certified_radii, search_radii


def train_digits(arch: str, *, epochs: int, seed: int, lr: float = 3e-3,
                 **kwargs: Any) -> nn.Module:
    """A digits classifier trained with Adam (`lr`) and cross-entropy for a few epochs."""
    from certify.nets import create_arch

    train = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = create_arch(arch, (1, 8, 8), 10, mean=[0.3052], std=[0.376], **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in train.batches(64, shuffle=True, generator=g):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def load_or_train(path: str | None, arch: str, epochs: int, seed: int, **kwargs: Any
                  ) -> tuple[nn.Module, str]:
    if path:
        from certify.checkpoint import load_checkpoint

        model, meta = load_checkpoint(path)
        return model, f"{Path(path).name} ({meta.arch})"
    return train_digits(arch, epochs=epochs, seed=seed, **kwargs), f"{arch} (trained here)"


def lirpa_bound_fn(model: nn.Module, conv_mode: str,  # type: ignore[no-untyped-def]
                   input_shape: tuple[int, ...] = (1, 8, 8), device: str | torch.device = "cpu"):
    """auto_LiRPA CROWN as a ``bound_fn`` on `input_shape` inputs; None (with the reason)
    where it is unavailable.

    The model's Normalize layer is applied to the box instead (``(x - mean) / std`` per
    channel, std > 0: the same box in the normalized space), and auto_LiRPA bounds the layers
    after it: with the normalization inside its graph, auto_LiRPA 0.7.1's patches mode fails
    on 3x32x32 CNNs once many neurons are unstable (a shape error in its concretization). The
    margin spec is certify's own.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    except ImportError as e:
        return None, f"auto_LiRPA not importable ({e}); skipped"
    from certify.spec import margin_spec

    layers = list(model.children())
    mean = layers[0].mean.reshape(1, -1, 1, 1).to(device)
    std = layers[0].std.reshape(1, -1, 1, 1).to(device)
    body = nn.Sequential(*layers[1:]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bounded = BoundedModule(body, torch.zeros(1, *input_shape, device=device), verbose=0,
                                device=device, bound_opts={"conv_mode": conv_mode})

    def bound(x: Tensor, y: Tensor, eps: Tensor) -> Tensor:
        e = eps.view(-1, 1, 1, 1)
        x_lo = ((x - e).clamp(0, 1) - mean) / std
        x_hi = ((x + e).clamp(0, 1) - mean) / std
        ptb = PerturbationLpNorm(norm=math.inf, x_L=x_lo, x_U=x_hi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lower, _ = bounded.compute_bounds(x=(BoundedTensor((x - mean) / std, ptb),),
                                              C=margin_spec(y, 10),
                                              method="CROWN", bound_upper=False)
        return lower.detach().amin(dim=1)

    import auto_LiRPA

    return bound, f"auto_LiRPA {getattr(auto_LiRPA, '__version__', '?')} (conv_mode={conv_mode})"


def measure(model: nn.Module, x: Tensor, y: Tensor, method: str, search: str, *, tol: float,
            eps_max: float, bound_fn: Any = None) -> dict[str, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    if bound_fn is None:
        res = certified_radii(model, x, y, method, search=search, tol=tol, eps_max=eps_max)
    else:
        res = search_radii(model, x, y, bound_fn, name=method, search=search, tol=tol,
                           eps_max=eps_max)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    ok = res.pred == res.label
    evals = res.evaluations[ok].double()
    return {"search": search, "seconds": seconds, "ms_per_sample": 1e3 * seconds / len(y),
            "cpu_ms_per_sample": 1e3 * cpu / len(y),
            "evaluations_mean": float(evals.mean()), "evaluations_max": int(evals.max()),
            "evaluations_hist": torch.bincount(res.evaluations[ok]).tolist(),
            "area": res.area, "radii": res.certified_eps, "upper": res.search_upper}


def _unconfirmed(model: nn.Module, method: str) -> Any:
    """The plain floating-point margin bound (``rigorous=False``) as a `bound_fn`: the search
    without confirmation, as before floating-point soundness (a baseline, not sound)."""
    from certify.bounds import get_method, to_network
    from certify.radius import margin_lower_bound

    net = to_network(model, (1, 8, 8))
    fast = get_method(method, rigorous=False)
    return lambda x, y, eps: margin_lower_bound(net, x, y, eps, method=fast)


def compare(a: dict[str, Any], ref: dict[str, Any], tol: float) -> dict[str, Any]:
    diff = (a["radii"] - ref["radii"]).abs()
    return {"max_abs_diff": float(diff.max()), "n_differ_gt_tol": int((diff > tol).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlp", help="digits MLP checkpoint (default: train mlp-100-100 here)")
    p.add_argument("--cnn", help="digits CNN checkpoint (default: train scn-16-32 here)")
    p.add_argument("--n", type=int, default=200, help="test points (default 200)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--eps-max", type=float, default=0.5)
    p.add_argument("--methods", default="crown,ibp", help="certify methods (comma list)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs when training here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--no-lirpa", action="store_true", help="skip the auto_LiRPA comparison")
    p.add_argument("--lirpa-conv-mode", choices=["patches", "matrix"], default="patches",
                   help="auto_LiRPA's conv_mode for the CNN (default patches, its faster one)")
    p.add_argument("--rounding", action="store_true",
                   help="also run each method's fast search without the rigorous float64 "
                        "confirmation (the cost of floating-point soundness; the unconfirmed "
                        "radii are NOT sound)")
    p.add_argument("--out", default="reports/bench_radius", help="output folder")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); n={args.n}, "
          f"tol={args.tol}, eps in [0, {args.eps_max}]")

    x_all, y_all = load_dataset("digits", "test").take(slice(0, args.n))
    models = {
        "mlp": load_or_train(args.mlp, "mlp-100-100", args.epochs, args.seed),
        "cnn": load_or_train(args.cnn, "scn-16-32", args.epochs, args.seed, hidden=[100]),
    }
    results: dict[str, Any] = {"settings": vars(args), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "models": {}}
    table = ["| model | bound | search | evaluations / sample (max) | ms / sample "
             "| CPU ms / sample "
             "| area | max abs Δ radius vs certify bisection | samples Δ > tol |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, (model, name) in models.items():
        with torch.no_grad():
            acc = float((model(x_all).argmax(1) == y_all).double().mean())
        print(f"\n== {key}: {name}, clean accuracy on the {args.n} points {acc:.3f}")
        entry: dict[str, Any] = {"name": name, "clean_accuracy": acc, "runs": {}}
        variants: list[tuple[str, str, str, Any]] = []
        for method in args.methods.split(","):
            variants += [(f"certify {method}", method, s, None) for s in ("bisection", "fast")]
            if args.rounding:  # the same search without the rigorous float64 confirmation
                variants.append((f"certify {method} unconfirmed", method, "fast",
                                 _unconfirmed(model, method)))
        if not args.no_lirpa:
            fn, info = lirpa_bound_fn(model, args.lirpa_conv_mode if key == "cnn"
                                      else "patches")
            entry["auto_lirpa"] = info
            print(info)
            if fn is not None:
                variants += [("auto_LiRPA CROWN", "crown", s, fn) for s in ("bisection", "fast")]
        ref_by_method: dict[str, dict[str, Any]] = {}
        for label, method, search, fn in variants:
            r = measure(model, x_all, y_all, method, search, tol=args.tol, eps_max=args.eps_max,
                        bound_fn=fn)
            ref = ref_by_method.setdefault(method, r)
            cmp = compare(r, ref, args.tol)
            row = {k: v for k, v in r.items() if k not in ("radii", "upper")} | cmp
            entry["runs"][f"{label} / {search}"] = row
            line = (f"| {key} | {label} | {search} | {r['evaluations_mean']:.2f} "
                    f"({r['evaluations_max']}) | {r['ms_per_sample']:.2f} | "
                    f"{r['cpu_ms_per_sample']:.2f} | {r['area']:.5f} | "
                    f"{cmp['max_abs_diff']:.2e} | {cmp['n_differ_gt_tol']} |")
            table.append(line)
            print(line)
        runs = entry["runs"]
        fast, bis = runs.get("certify crown / fast"), runs.get("certify crown / bisection")
        lirpa = runs.get("auto_LiRPA CROWN / bisection")
        if fast and bis:
            entry["speedup_fast_vs_bisection"] = bis["ms_per_sample"] / fast["ms_per_sample"]
        if fast and lirpa:
            entry["speedup_fast_vs_auto_lirpa_bisection"] = \
                lirpa["ms_per_sample"] / fast["ms_per_sample"]
        results["models"][key] = entry
        for k in ("speedup_fast_vs_bisection", "speedup_fast_vs_auto_lirpa_bisection"):
            if k in entry:
                print(f"{k}: {entry[k]:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_radius.json").write_text(json.dumps(results, indent=2) + "\n")
    speed = [f"- {k} {s}: {v[s]:.2f}x" for k, v in results["models"].items()
             for s in ("speedup_fast_vs_bisection", "speedup_fast_vs_auto_lirpa_bisection")
             if s in v]
    (out / "bench_radius.md").write_text(
        f"# Radius search benchmark\n\ntorch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), n={args.n}, tol={args.tol}, eps in [0, {args.eps_max}]\n\n"
        + "\n".join(table) + "\n\n" + "\n".join(speed) + "\n")
    plot(results, out / "bench_radius.png")
    print(f"\nwrote {out}/bench_radius.{{json,md,png}}")


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars: evaluations per sample and ms per sample of every variant, per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.6), dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    models = list(results["models"])
    labels = list(dict.fromkeys(k for m in models for k in results["models"][m]["runs"]))
    width = 0.8 / max(len(labels), 1)
    for ax, key, title in ((axes[0], "evaluations_mean", "bound evaluations / sample"),
                           (axes[1], "ms_per_sample", "ms / sample")):
        for j, label in enumerate(labels):
            vals = [results["models"][m]["runs"].get(label, {}).get(key, math.nan)
                    for m in models]
            ax.bar([i + j * width for i in range(len(models))], vals, width, label=label)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(models))],
                      [results["models"][m]["name"] for m in models], fontsize=9)
        ax.set_title(title, fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
        if key == "ms_per_sample":
            ax.set_yscale("log")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)


if __name__ == "__main__":
    main()
