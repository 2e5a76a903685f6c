"""``certify experiment``: the whole shallow-waters study from one TOML file."""

from __future__ import annotations

import click

from certify.cli.options import quiet_option, seeds_option

STAGE_NAMES = ["teachers", "distill", "prune", "robust", "attack", "certify", "report"]


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--from", "from_stage", type=click.Choice(STAGE_NAMES), default=None,
              help="Recompute this stage and every later one.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Experiment folder [default: reports/<experiment name>].")
@seeds_option
@quiet_option
def experiment(config: str, from_stage: str | None, out_dir: str | None,
               seeds: tuple[int, ...] | None, quiet: bool) -> None:
    """Run the study of a config file: train, distill, prune, attack, certify, report.

    Stages are cached: a rerun reuses every finished stage whose inputs are unchanged, and an
    interrupted run continues where it stopped. Writes <out>/summary.md with every table and
    figure and a claim-by-claim verdict computed from the run.

    \b
    Example:
      certify experiment configs/shallow-waters-digits.toml
      certify experiment configs/shallow-waters-svhn.toml --from certify -o reports/svhn
      certify experiment configs/shallow-waters-digits.toml --seeds 0,1,2
    """
    from certify.study.experiment import run_experiment

    result = run_experiment(config, out_dir=out_dir, from_stage=from_stage, quiet=quiet,
                            seeds=seeds)
    _print(result)


def _print(result: object) -> None:
    from certify.study.experiment import ExperimentResult

    assert isinstance(result, ExperimentResult)
    for c in result.claims:
        flag = (" (flips with the certifier)" if c.flips else "") + (
            " (the attack area disagrees)" if c.attack_disagrees else "")
        click.echo(f"{c.verdict:>12}{flag}  {c.statement}  [{c.evidence}]")
    ran = ", ".join(result.ran) or "none"
    click.echo(f"stages run: {ran}; reused: {', '.join(result.skipped) or 'none'} "
               f"({result.seconds:.0f}s)")
    click.echo(f"report: {result.out_dir / 'summary.md'}")
