"""``certify retrain``: continue a checkpoint (a distilled student) with a robust loss."""

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
from certify.cli.train import make_config, make_robust_config, robust_options, train_config_options


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@robust_options(required=True)
@dataset_option(required=False)
@train_config_options(epochs=5)
@seed_option
@device_option
@data_dir_option
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="The re-trained checkpoint [default: models/<model stem>-<method>.pt].")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from <out>.partial (same options).")
@quiet_option
def retrain(model: str, robust: str, eps: float, eps_start: float,
            eps_ramp_epochs: float | None, eps_warmup_epochs: float, kappa: float,
            kappa_start: float | None, pgd_steps: int, bound_batch_size: int | None,
            bound_memory_mb: float, eval_samples: int, certify_method: str | None,
            dataset: str | None, epochs: int,
            batch_size: int, lr: float, optimizer: str, momentum: float, weight_decay: float,
            schedule: str, grad_clip: float | None, seed: int, device: str,
            data_dir: str | None, out: str | None, resume: bool, quiet: bool) -> None:
    """Robustly re-train a checkpoint for a few epochs and save it with its parent and recipe.

    Continues MODEL's weights with the robust loss of --robust at an eps ramped from
    --eps-start to --eps (see `certify train --help`). The new checkpoint records the input's
    sha256 as its parent and the recipe (and the parent's own recipe); stdout shows the test,
    PGD and certified accuracy at --eps before and after.

    \b
    Example:
      certify retrain models/student.pt --robust wong-kolter --eps 0.01 --epochs 3
      certify retrain models/mlp-digits.pt --robust crown-ibp --eps 0.1 --kappa-start 1 \\
          -o models/mlp-digits-crown-ibp.pt
    """
    from certify._io import check_output_file
    from certify._lock import hold_output
    from certify.train.robust import describe_result, retrain_checkpoint
    from certify.utils import seed_everything

    config = make_config(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                         grad_clip=grad_clip, seed=seed, device=device)
    recipe = make_robust_config(
        robust=robust, epochs=epochs, eps=eps, eps_start=eps_start,
        eps_ramp_epochs=eps_ramp_epochs, eps_warmup_epochs=eps_warmup_epochs, kappa=kappa,
        kappa_start=kappa_start, pgd_steps=pgd_steps, bound_batch_size=bound_batch_size,
        bound_memory_mb=bound_memory_mb, eval_samples=eval_samples,
        certify_method=certify_method)
    out = out or f"models/{Path(model).stem}-{robust}.pt"
    check_output_file(out)  # before any work: one line, not a traceback at the end
    seed_everything(seed)
    with hold_output(out, command="retrain", folder=False):
        trained = retrain_checkpoint(model, recipe, config, dataset=dataset,
                                     data_dir=data_dir, output=out, resume=resume, quiet=quiet)
    click.echo(f"{out}: {describe_result(trained)} ({robust} at eps {eps:g}, {epochs} "
               f"epoch{'s' if epochs != 1 else ''} from {model})")
