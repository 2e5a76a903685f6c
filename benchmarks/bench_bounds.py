"""Speed, memory and tightness of the bound methods (not a test).

For every network and method: samples per second, peak memory and the mean lower bound of the
margins ``f_y - f_j`` at a few eps, the batch size stated. Where auto_LiRPA is importable its
IBP, CROWN and alpha-CROWN run on the same networks and boxes, and the time ratio and the
largest bound difference are printed.

Networks:
  mlp           ``mlp`` (two hidden layers of 100) on the digits test split (1x8x8), trained for
                a few seconds here with Adam (seeded) -- a realistic, mostly stable network.
  wk-small      random weights (PyTorch's default init, seed 0), random 3x32x32 inputs.
  wk-large      the same.
  svhn-teacher  the same (BatchNorm with its initial statistics).
Random networks have nearly every neuron unstable: a worst case for the linear methods.

Every (network, method) runs in a fresh subprocess, so the peak memory is that process's
``ru_maxrss`` growth from when the model, the inputs and the library are loaded to the end of
all runs (torch's CPU allocations are invisible to tracemalloc), or
``torch.cuda.max_memory_allocated`` on CUDA. auto_LiRPA runs in its own subprocess too.
auto_LiRPA's convolution "patches" mode fails on an in-model normalization, so it gets the
model without its leading Normalize and the box mapped into normalized space (exact).

Usage:
    python benchmarks/bench_bounds.py --quick             # about 5 minutes on 2 CPU cores
    python benchmarks/bench_bounds.py --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

NETS = ("mlp", "wk-small", "wk-large", "svhn-teacher")
METHODS = ("ibp", "crown-ibp", "crown", "wong-kolter", "alpha-crown", "lp")
AUTO_LIRPA = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "CROWN-Optimized"}
ALPHA_STEPS, ALPHA_LR = 20, 0.1


@dataclass(frozen=True)
class Plan:
    batch: dict[str, int]
    lp_batch: int
    eps: dict[str, tuple[float, ...]]


FULL = Plan(batch={"mlp": 256, "wk-small": 16, "wk-large": 4, "svhn-teacher": 4}, lp_batch=8,
            eps={"mlp": (0.01, 0.03, 0.1), "wk-small": (0.0005, 0.002),
                 "wk-large": (0.0005, 0.002), "svhn-teacher": (0.0005, 0.002)})
QUICK = Plan(batch={"mlp": 64, "wk-small": 4, "wk-large": 1, "svhn-teacher": 1}, lp_batch=4,
             eps={"mlp": (0.01, 0.05), "wk-small": (0.002,), "wk-large": (0.002,),
                  "svhn-teacher": (0.002,)})


def _has_auto_lirpa() -> bool:
    try:
        import auto_LiRPA  # noqa: F401
    except Exception:  # noqa: BLE001  (any import failure means: not available)
        return False
    return True


# --- the networks and inputs (built once, in the parent) --------------------------------------


def _train_mlp(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from certify.data import load_dataset
    from certify.nets import create_arch

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    x, y = train.tensors()
    torch.manual_seed(seed)
    model = create_arch("mlp", (1, 8, 8), 10, mean=[0.3052], std=[0.3760])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):  # full batch: a couple of seconds
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    xt, yt = test.tensors()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    print(f"# mlp trained on digits: test accuracy {accuracy:.3f}", file=sys.stderr)
    return model, xt, yt


def _prepare(net: str, n: int, path: str) -> None:
    """Write the model (full module, trusted: made here) and its inputs to `path`."""
    from certify.nets import create_arch

    if net == "mlp":
        model, x, y = _train_mlp()
        x, y = x[:n], y[:n]
    else:
        torch.manual_seed(0)
        model = create_arch(net, (3, 32, 32), 10, mean=[0.4914, 0.4822, 0.4465],
                            std=[0.2470, 0.2435, 0.2616]).eval()
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(n, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
    torch.save({"model": model, "x": x, "y": y}, path)


# --- workers (one per network x method x engine, in a subprocess) -----------------------------


def _peak_mb(device: torch.device, base: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _worker(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = torch.load(args.data, weights_only=False)  # written by this script's parent
    model, x, y = data["model"].to(device), data["x"][: args.batch].to(device), \
        data["y"][: args.batch].to(device)
    eps_list = [float(e) for e in args.eps.split(",")]
    run = _run_ours if args.engine == "ours" else _run_auto_lirpa
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    import certify.bounds  # noqa: F401  (imports are not the method's memory)

    if args.engine != "ours":
        import auto_LiRPA  # noqa: F401
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model and inputs loaded
    run(model, x, y, eps_list[0], args.method, warmup=True)  # lazy imports, one sample
    seconds, lowers = [], {}
    for eps in eps_list:
        start = time.perf_counter()
        lower = run(model, x, y, eps, args.method, warmup=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        lowers[str(eps)] = lower.cpu()
    torch.save(lowers, args.out)
    print(json.dumps({"seconds": seconds, "peak_mb": _peak_mb(device, base),
                      "mean_lower": {e: float(v.mean()) for e, v in lowers.items()},
                      "threads": torch.get_num_threads()}))


def _run_ours(model, x, y, eps, method, warmup):  # type: ignore[no-untyped-def]
    from certify.bounds import margin_bounds

    options = {"steps": ALPHA_STEPS, "lr": ALPHA_LR} if method == "alpha-crown" else {}
    if warmup:
        x, y = x[:1], y[:1]
    with torch.no_grad():
        return margin_bounds(model, x, y, eps, method, **options).lower


def _run_auto_lirpa(model, x, y, eps, method, warmup):  # type: ignore[no-untyped-def]
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    from certify.nets import Normalize
    from certify.spec import LinfBall, margin_spec

    norm, body = model[0], model[1:]
    assert isinstance(norm, Normalize)
    if warmup:
        x, y = x[:1], y[:1]
    x_lo, x_hi = LinfBall(x, eps).box()
    spec = margin_spec(y, 10).to(x.dtype)
    bounded = BoundedModule(body, torch.empty(1, *x.shape[1:], device=x.device),
                            device=x.device, verbose=False)
    if method == "alpha-crown":
        bounded.set_bound_opts({"optimize_bound_args": {"iteration": ALPHA_STEPS,
                                                        "lr_alpha": ALPHA_LR}})
    box = BoundedTensor(norm(x), PerturbationLpNorm(norm=float("inf"), x_L=norm(x_lo),
                                                    x_U=norm(x_hi)))
    upper = method != "alpha-crown"  # its alpha-CROWN: lower bounds only
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad() if upper else \
            contextlib.nullcontext():
        lower, _ = bounded.compute_bounds(x=(box,), C=spec, method=AUTO_LIRPA[method],
                                          bound_upper=upper)
    return lower.detach()


# --- the parent ------------------------------------------------------------------------------


def _spawn(args: argparse.Namespace, net: str, method: str, engine: str, data: str, batch: int,
           eps: tuple[float, ...], out: str) -> dict | None:  # type: ignore[type-arg]
    cmd = [sys.executable, __file__, "--worker", "--data", data, "--method", method,
           "--engine", engine, "--batch", str(batch), "--eps", ",".join(map(str, eps)),
           "--device", args.device, "--threads", str(args.threads), "--out", out]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"# {net} {method} {engine}: no result within --timeout {args.timeout:g} s",
              file=sys.stderr)
        return None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"# {net} {method} {engine}: failed: {tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, fewer eps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (0: torch's default); default 1")
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--method", "--engine", "--eps", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    plan = QUICK if args.quick else FULL
    compare = _has_auto_lirpa()
    print(f"# certify bound benchmark ({'quick' if args.quick else 'full'}), device "
          f"{args.device}, threads {args.threads or torch.get_num_threads()}, torch "
          f"{torch.__version__}, auto_LiRPA {'yes' if compare else 'not installed'}")
    print(f"# lp batch {plan.lp_batch}; lp only on mlp. alpha-crown: {ALPHA_STEPS} steps, lr "
          f"{ALPHA_LR} (ours and auto_LiRPA's; auto_LiRPA's lower bounds only, also optimizing "
          "intermediate layers). ratio = our time / auto_LiRPA's; diff = our lower bound - "
          "theirs (max |diff|, and the mean: > 0 means ours is tighter).")
    header = (f"{'net':13s} {'method':12s} {'batch':>5s} {'eps':>7s} {'samples/s':>10s} "
              f"{'peak MB':>8s} {'mean lower':>11s}")
    print(header + (f" {'AL ratio':>8s} {'max|diff|':>9s} {'mean diff':>10s}" if compare
                    else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            data = os.path.join(tmp, f"{net}.pt")
            _prepare(net, plan.batch[net], data)
            for method in args.methods.split(","):
                if method == "lp" and net != "mlp":
                    continue
                batch = plan.lp_batch if method == "lp" else plan.batch[net]
                eps = plan.eps[net]
                ours_out = os.path.join(tmp, f"{net}-{method}-ours.pt")
                ours = _spawn(args, net, method, "ours", data, batch, eps, ours_out)
                if ours is None:
                    continue
                theirs = None
                if compare and method in AUTO_LIRPA:
                    theirs_out = os.path.join(tmp, f"{net}-{method}-al.pt")
                    theirs = _spawn(args, net, method, "auto_lirpa", data, batch, eps,
                                    theirs_out)
                    if theirs is not None:
                        mine, other = torch.load(ours_out), torch.load(theirs_out)
                for i, e in enumerate(eps):
                    peak = ours["peak_mb"]
                    row = (f"{net:13s} {method:12s} {batch:5d} {e:7g} "
                           f"{batch / ours['seconds'][i]:10.3g} "
                           f"{(f'{peak:.0f}' if peak >= 1 else '<1'):>8s} "
                           f"{ours['mean_lower'][str(e)]:11.4f}")
                    if theirs is not None:
                        diff = mine[str(e)] - other[str(e)]
                        row += (f" {ours['seconds'][i] / theirs['seconds'][i]:8.2f} "
                                f"{diff.abs().max().item():9.2e} {diff.mean().item():+10.2e}")
                    print(row, flush=True)


if __name__ == "__main__":
    main()
