"""``certify distill``: teach a shallow student (Hinton, logit matching, defensive)."""

from __future__ import annotations

from pathlib import Path

import click

from certify.cli.options import (
    data_dir_option,
    dataset_option,
    device_option,
    quiet_option,
    seed_option,
)
from certify.cli.train import make_config, train_config_options


def _temperatures(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        temps = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers "
                                 "(e.g. 2 or 1,1.5,2).") from None
    if not temps or any(not t > 0 for t in temps):
        raise click.BadParameter(f"temperatures must be > 0, got '{value}'.")
    return temps


@click.command()
@click.argument("teacher", type=click.Path(dir_okay=False))
@click.option("--student", required=True, help="Student architecture, e.g. scn-32-32.")
@click.option("--method", type=click.Choice(["hinton", "logits", "defensive"]),
              default="hinton", show_default=True,
              help="hinton: soft targets at T plus labels; logits: match the teacher's logits "
                   "(Ba & Caruana); defensive: soft labels at T, deployed at T=1 (Papernot).")
@click.option("--temperature", "temperatures", default="2", show_default=True,
              callback=_temperatures,
              help="T, or a comma list (1,1.5,2) for a sweep against logit matching.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="hinton: weight of the soft (teacher) term; 1 - alpha goes to the labels.")
@dataset_option(required=False)
@click.option("--transfer-split", default=None,
              help="logits only: add this split's images (e.g. SVHN extra) to the training set.")
@train_config_options()
@seed_option
@device_option
@data_dir_option
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Student checkpoint [default: models/<student>-from-<teacher>.pt]; a sweep "
                   "saves the best here, all students in <out stem>.sweep/ and the table as "
                   "<out stem>.sweep.csv/.md.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same options).")
@quiet_option
def distill(teacher: str, student: str, method: str, temperatures: list[float], alpha: float,
            dataset: str | None, transfer_split: str | None, epochs: int, batch_size: int,
            lr: float, optimizer: str, momentum: float, weight_decay: float, schedule: str,
            grad_clip: float | None, seed: int, device: str, data_dir: str | None,
            out: str | None, resume: bool, quiet: bool) -> None:
    """Distill a teacher checkpoint into a fresh shallow student and save it.

    The teacher's logits on the training set are computed once and cached. With several
    temperatures, one student is trained per T and one by logit matching, and a table like
    the thesis's Table 8.7 is printed and saved.

    \b
    Example:
      certify distill models/teacher.pt --student scn-32-32 --temperature 2 -o models/s.pt
      certify distill models/teacher.pt --student scn-32-32 --temperature 1,1.5,2,2.5
      certify distill models/teacher.pt --student scn-32-32 --method logits \\
          --transfer-split extra
    """
    from certify._io import check_output_file
    from certify._lock import hold_output
    from certify.train._tables import markdown_table
    from certify.train.distill import SWEEP_NOTE, distill_sweep, sweep_columns
    from certify.train.distill import distill as run_distill
    from certify.utils import seed_everything

    config = make_config(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                         grad_clip=grad_clip, seed=seed, device=device)
    out = out or f"models/{student}-from-{Path(teacher).stem}.pt"
    check_output_file(out)  # before any work: one line, not a traceback at the end
    seed_everything(seed)
    if len(temperatures) > 1:
        if transfer_split is not None:
            raise click.UsageError("--transfer-split goes with a single --method logits run, "
                                   "not with a temperature sweep.")
        with hold_output(out, command="distill", folder=False):
            sweep = distill_sweep(teacher, student, temperatures, method=method, alpha=alpha,
                                  config=config, dataset=dataset, data_dir=data_dir,
                                  output=out, resume=resume, quiet=quiet)
        click.echo(markdown_table(sweep.table_rows(), sweep_columns(method)))
        click.echo(SWEEP_NOTE)
        m = sweep.best.meta.metrics
        click.echo(f"teacher test accuracy {100 * sweep.teacher_accuracy:.2f}%; best student "
                   f"on validation {sweep.best_label} (validation "
                   f"{100 * m['validation_accuracy']:.2f}%, test {100 * m['test_accuracy']:.2f}%)"
                   f" -> {out}; table: {sweep.table_md}")
        return
    with hold_output(out, command="distill", folder=False):
        trained = run_distill(teacher, student, method=method, temperature=temperatures[0],
                              alpha=alpha, config=config, dataset=dataset, data_dir=data_dir,
                              transfer_split=transfer_split, output=out, resume=resume,
                              quiet=quiet)
    m = trained.meta.metrics
    how = method if method == "logits" else f"{method} at T={temperatures[0]:g}"
    click.echo(f"{out}: test accuracy {100 * m['test_accuracy']:.2f}% (teacher "
               f"{100 * m['teacher_test_accuracy']:.2f}%; {student} via {how})")
