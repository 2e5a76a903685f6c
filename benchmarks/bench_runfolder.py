"""Run-folder writing cost of ``certify area``: appended per batch (linear) vs rewritten (old).

``certify area`` on N digits test points (default 2,000; the test split's 450 points repeated,
position p being test point p mod 450) with a cheap method (``ibp``, no attack, batches of 100),
through the library: :func:`certify.run.certify_dataset` yields each batch's rows and
:class:`certify.run.RunFolder` appends them to ``per_sample.csv``, then finalizes the folder
once (``per_sample.csv`` in its final order, ``results.json``, the figures, ``summary.md``).

For every batch it times the run-folder writing -- the append -- next to what the previous code
did after every batch and method: rewrite ``per_sample.csv`` with every row so far and
re-summarise every row into ``results.json`` (the same library functions, replayed on the same
rows into a second folder). The append stays flat from the first batch to the last; the rewrite
grows with the rows already written, so its total is quadratic in N.

Run:
    python benchmarks/bench_runfolder.py --threads 1
    python benchmarks/bench_runfolder.py --n 4000 --batch-size 100 --model models/m.pt
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from certify.data import load_dataset
from certify.records import SampleRow, write_sample_csv
from certify.report.summary import default_eps_grid, summarize
from certify.run import RunFolder, certify_dataset


class Tiled:
    """A dataset split repeated to `n` positions (position p is sample p mod len(base))."""

    def __init__(self, base: Any, n: int) -> None:
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def take(self, index: Tensor) -> tuple[Tensor, Tensor]:
        x, y = self.base.take(index % len(self.base))
        return x, y


def digits_model(path: str | None) -> nn.Module:
    """The checkpoint at `path`, or a digits MLP trained here in a second."""
    if path is not None:
        from certify.model_io import load_model

        return load_model(Path(path), device=torch.device("cpu"), dataset="digits")[0].eval()
    from bench_radius import train_digits  # benchmarks/ is on the path of a script here

    return train_digits("mlp-32-16", epochs=4, seed=0, lr=1e-2)


def old_write(folder: RunFolder, rows: list[SampleRow], settings: dict[str, Any]) -> None:
    """What the previous ``run_area`` wrote after every batch and method: everything again."""
    write_sample_csv(folder.samples_file, rows)
    grid = default_eps_grid(rows)
    summaries = summarize(rows, eps_grid=grid)
    folder.write_results({"status": "partial", "n_done": len({r.index for r in rows}),
                          "settings": settings, "eps_grid": list(grid),
                          "summary": {m: s.as_dict() for m, s in summaries.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="test points (default 2000)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--method", action="append", default=None,
                        help="bound method, repeatable (default ibp)")
    parser.add_argument("--model", default=None, help="digits checkpoint (default: train one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for the two run folders")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.method or ["ibp"]
    model = digits_model(args.model)
    data = Tiled(load_dataset("digits", "test"), args.n)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_runfolder-"))
    new, old = RunFolder(out / "appended"), RunFolder(out / "rewritten")
    new.path.mkdir(parents=True, exist_ok=True)
    old.path.mkdir(parents=True, exist_ok=True)
    settings = {"n": args.n, "methods": methods, "batch_size": args.batch_size}

    appended: list[float] = []
    rewritten: list[float] = []
    compute: list[float] = []
    rows: list[SampleRow] = []
    t_run = time.perf_counter()
    t_batch = time.perf_counter()
    for result in certify_dataset(model, data, methods, batch_size=args.batch_size,
                                  attack="none", eps_max=0.5, tol=1e-4, quiet=True,
                                  label="digits"):
        compute.append(time.perf_counter() - t_batch)
        t0 = time.perf_counter()
        new.append(result.rows)
        appended.append(time.perf_counter() - t0)
        rows.extend(result.rows)
        t0 = time.perf_counter()
        old_write(old, sorted(rows, key=lambda r: (r.index, methods.index(r.method))), settings)
        rewritten.append(time.perf_counter() - t0)
        t_batch = time.perf_counter()
    t0 = time.perf_counter()
    final = sorted(new.read_rows(), key=lambda r: (r.index, methods.index(r.method)))
    grid = default_eps_grid(final)
    summaries = summarize(final, eps_grid=grid)
    new.finalize(final, {"status": "complete", "settings": settings, "eps_grid": list(grid),
                         "summary": {m: s.as_dict() for m, s in summaries.items()}},
                 title="bench_runfolder", settings={
                     "model": "digits-mlp", "dataset": "digits", "split": "test",
                     "n": args.n, "methods": methods, "attack": "none", "eps_max": 0.5,
                     "tol": 1e-4, "search": "fast", "dtype": "float32", "seed": 0},
                 summaries=summaries, label="digits")
    finalize = time.perf_counter() - t0
    wall = time.perf_counter() - t_run

    print(f"certify area on {args.n} digits test points, {', '.join(methods)}, no attack, "
          f"batches of {args.batch_size} ({len(appended)} batch results), torch threads "
          f"{args.threads}; run folders in {out}")
    print(f"{'batch':>5} {'rows so far':>11} {'compute ms':>10} {'append ms':>10} "
          f"{'old rewrite ms':>14}")
    for k, (c, a, r) in enumerate(zip(compute, appended, rewritten, strict=True)):
        print(f"{k:>5} {(k + 1) * args.batch_size:>11} {1e3 * c:>10.1f} {1e3 * a:>10.2f} "
              f"{1e3 * r:>14.2f}")
    q = max(1, len(appended) // 4)
    for name, times in (("append (new)", appended), ("rewrite (old)", rewritten)):
        first, last = statistics.mean(times[:q]), statistics.mean(times[-q:])
        print(f"{name:>14}: first {q} batches {1e3 * first:.2f} ms/batch, last {q} "
              f"{1e3 * last:.2f} ms/batch (x{last / first:.2f}), total {1e3 * sum(times):.1f} ms")
    print(f"{'finalize':>14}: {1e3 * finalize:.1f} ms once (final CSV, results.json, figures, "
          f"summary.md); new writing total {1e3 * (sum(appended) + finalize):.1f} ms")
    print(f"{'compute':>14}: total {sum(compute):.2f} s; whole run {wall:.2f} s")
    assert [(r.index, r.method) for r in final] == [
        (r.index, r.method) for r in sorted(rows, key=lambda r: (r.index,
                                                                  methods.index(r.method)))]


if __name__ == "__main__":
    main()
