"""``certify demo``: the shallow-waters study on bundled digits data, minutes on a CPU."""

from __future__ import annotations

import click

from certify.cli.options import quiet_option, seeds_option


@click.command()
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="reports/demo",
              show_default=True, help="Report folder.")
@click.option("--quick", is_flag=True,
              help="A smaller run (2 seeds, fewer epochs and points), about 1.5 minutes: a smoke "
                   "test.")
@seeds_option
@quiet_option
def demo(out_dir: str, quick: bool, seeds: tuple[int, ...] | None, quiet: bool) -> None:
    """The whole study on scikit-learn's digits, offline: report in reports/demo/summary.md.

    Runs configs/shallow-waters-digits.toml (bundled with certify) for 3 seeds on 100 points:
    teachers, distilled, pruned and robust students, PGD curves, certification under IBP, CROWN
    and alpha-CROWN, and the claim table with bootstrap intervals.

    \b
    Example:
      certify demo
      certify demo --quick -o /tmp/demo
    """
    from certify.cli.experiment import _print
    from certify.study.demo import run_demo

    _print(run_demo(out_dir=out_dir, quick=quick, quiet=quiet, seeds=seeds))
