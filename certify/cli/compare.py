"""``certify compare``: certify several models alike and report them side by side."""

from __future__ import annotations

import click

from certify.cli.options import (
    data_dir_option,
    dataset_option,
    device_option,
    num_samples_option,
    quiet_option,
    seed_option,
)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@dataset_option(required=True)
@click.option("--method", default="crown", show_default=True, help="Bound method.")
@num_samples_option(default=200, what="Certify")
@click.option("--eps", "eps", type=float, default=None,
              help="eps of the 'at eps' table columns [default: from the attacks].")
@click.option("--eps-grid", default=None,
              help="Radii of the runs' certified-accuracy tables: start:stop:count or a list.")
@click.option("--eps-max", type=float, default=0.5, show_default=True,
              help="Largest eps searched.")
@click.option("--tol", type=float, default=1e-4, show_default=True,
              help="Precision of each certified eps.")
@click.option("--label", "labels", multiple=True, help="Name per model, in order.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
              default="reports/cache/area", show_default=True,
              help="Area runs kept here, keyed by model sha256 and settings (reused).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              default="reports/compare", show_default=True, help="Report folder.")
@device_option
@seed_option
@data_dir_option
@quiet_option
def compare(models: tuple[str, ...], dataset: str, method: str, n: int, eps: float | None,
            eps_grid: str | None, eps_max: float, tol: float, labels: tuple[str, ...],
            cache_dir: str, out_dir: str, device: str, seed: int, data_dir: str | None,
            quiet: bool) -> None:
    """Certify several models the same way and write one comparison report.

    Runs (or reuses) `certify area` for each model, then writes compare.md/.csv/.json, the
    overlaid sorted-eps curves (sorted_eps.png) and certified accuracy (certified_accuracy.png).

    \b
    Example:
      certify compare models/teacher.pt models/student.pt --dataset svhn -o reports/svhn
      certify compare reports/demo/models/*.pt --dataset digits --num-samples 100
      torchrun --nproc_per_node=2 -m certify compare a.pt b.pt --dataset digits --num-samples 100
    """
    from certify._io import ensure_dir
    from certify.distributed import is_main
    from certify.study.attack_curves import parse_eps_grid
    from certify.study.compare import compare_models, table_markdown

    grid = parse_eps_grid(eps_grid) if eps_grid else None
    ensure_dir(out_dir)  # before any work: one line, not a traceback at the end
    result = compare_models(list(models), dataset, labels=labels or None, method=method, n=n,
                            eps=eps, eps_grid=grid, eps_max=eps_max, tol=tol, seed=seed,
                            device=device, data_dir=data_dir, cache_dir=cache_dir,
                            out_dir=out_dir, quiet=quiet)
    if not is_main():  # under torchrun, rank 0 prints the gathered result
        return
    click.echo(table_markdown(result.rows, method=method), nl=False)
    click.echo(f"report in {out_dir}")
