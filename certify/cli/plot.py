"""``certify plot``: redraw figures from saved ``certify area`` runs, without recomputing."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Output PNG [default: sorted_eps.png / certified_accuracy.png in the first "
              "run folder for one run, else in the current folder].")
@click.option("--kind", type=click.Choice(["sorted-eps", "certified-accuracy"]),
              default="sorted-eps", show_default=True, help="Which figure.")
@click.option("--method", "methods", multiple=True,
              help="Only these bound methods (repeatable) [default: every method of each run].")
@click.option("--title", default=None, help="Figure title.")
def plot(run_dirs: tuple[str, ...], out: str | None, kind: str, methods: tuple[str, ...],
         title: str | None) -> None:
    """Draw sorted-eps (or certified-accuracy) curves of runs, overlaid, one colour per model.

    Reads each run folder's per_sample.csv and config.json; nothing is recomputed.

    \b
    Example:
      certify plot reports/area/20250101-120000-teacher reports/area/20250102-090000-student
      certify plot reports/area/* --kind certified-accuracy -o figures/accuracy.png
    """
    from pathlib import Path

    from certify._io import check_output_file
    from certify.report.plots import plot_runs

    if out is not None:
        check_output_file(out)
    target = plot_runs([Path(d) for d in run_dirs], out=Path(out) if out else None, kind=kind,
                       methods=methods or None, title=title)
    click.echo(str(target))
