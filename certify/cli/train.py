"""``certify train`` (standard training) and ``certify eval`` (clean accuracy)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from certify.cli.options import (
    F,
    data_dir_option,
    dataset_option,
    device_option,
    quiet_option,
    seed_option,
)

if TYPE_CHECKING:
    from certify.train.loops import TrainConfig


def train_config_options(epochs: int = 30, lr: float = 1e-3) -> Callable[[F], F]:
    """The optimizer/schedule options every training command shares (see :func:`make_config`)."""

    def decorate(f: F) -> F:
        for opt in reversed([
            click.option("--epochs", type=click.IntRange(min=1), default=epochs,
                         show_default=True, help="Passes over the training set."),
            click.option("--batch-size", type=click.IntRange(min=1), default=64,
                         show_default=True, help="Samples per step."),
            click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=lr,
                         show_default=True, help="Learning rate."),
            click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam",
                         show_default=True, help="Adam, or SGD with --momentum."),
            click.option("--momentum", type=click.FloatRange(min=0), default=0.9,
                         show_default=True, help="SGD momentum."),
            click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0,
                         show_default=True, help="L2 penalty."),
            click.option("--schedule", type=click.Choice(["cosine", "step", "none"]),
                         default="cosine", show_default=True,
                         help="Learning-rate schedule over the epochs."),
            click.option("--grad-clip", type=click.FloatRange(min=0, min_open=True),
                         default=None, help="Clip the gradient norm to this value."),
        ]):
            f = opt(f)
        return f

    return decorate


def make_config(*, epochs: int, batch_size: int, lr: float, optimizer: str, momentum: float,
                weight_decay: float, schedule: str, grad_clip: float | None, seed: int,
                device: str) -> TrainConfig:
    """A :class:`TrainConfig` from the shared options (the device resolved)."""
    from certify.train.loops import TrainConfig
    from certify.utils import resolve_device

    return TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                       momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                       seed=seed, device=str(resolve_device(device)), grad_clip=grad_clip)


@click.command()
@dataset_option()
@click.option("--arch", required=True,
              help="Architecture: mlp, mlp-200-100, wk-small, wk-large, svhn-teacher, "
                   "cifar-teacher, scn-32-32, ...")
@train_config_options()
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True,
              help="Train softmax(z/T) (a defensive-distillation teacher); 1 is standard.")
@seed_option
@device_option
@data_dir_option
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to write [default: models/<arch>-<dataset>.pt].")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from <out>.partial (same options).")
@quiet_option
def train(dataset: str, arch: str, epochs: int, batch_size: int, lr: float, optimizer: str,
          momentum: float, weight_decay: float, schedule: str, grad_clip: float | None,
          temperature: float, seed: int, device: str, data_dir: str | None, out: str | None,
          resume: bool, quiet: bool) -> None:
    """Train a model with cross-entropy and save it with its recipe and test accuracy.

    Progress and the test accuracy of every epoch go to stderr; the final test accuracy to
    stdout. The same --seed gives the same weights.

    \b
    Example:
      certify train --dataset digits --arch mlp -o models/mlp-digits.pt
      certify train --dataset svhn --arch svhn-teacher --epochs 20 --device cuda
    """
    from certify.train.standard import train_standard
    from certify.utils import seed_everything

    config = make_config(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                         grad_clip=grad_clip, seed=seed, device=device)
    out = out or f"models/{arch}-{dataset}.pt"
    seed_everything(seed)
    trained = train_standard(arch, dataset, config, output=out, temperature=temperature,
                             data_dir=data_dir, resume=resume, quiet=quiet)
    acc = trained.meta.metrics["test_accuracy"]
    click.echo(f"{out}: test accuracy {100 * acc:.2f}% ({arch} on {dataset}, {epochs} epochs)")


@click.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@dataset_option(required=False)
@click.option("--split", type=click.Choice(["test", "train", "extra"]), default="test",
              show_default=True, help="Dataset split.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Samples per forward pass.")
@device_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model: str, dataset: str | None, split: str, batch_size: int, device: str,
             data_dir: str | None, as_json: bool) -> None:
    """Print a checkpoint's clean accuracy on a dataset (default: the one it was trained on).

    \b
    Example:
      certify eval models/mlp-digits.pt
      certify eval models/teacher.pt --dataset svhn --split train
    """
    from certify.train.standard import evaluate_checkpoint

    r = evaluate_checkpoint(model, dataset=dataset, split=split, data_dir=data_dir,
                            batch_size=batch_size, device=device)
    if as_json:
        click.echo(json.dumps({"model": r.model, "dataset": r.dataset, "split": r.split,
                               "correct": r.correct, "total": r.total,
                               "accuracy": r.accuracy}))
        return
    click.echo(f"{model}: accuracy {100 * r.accuracy:.2f}% ({r.correct}/{r.total}) on "
               f"{r.dataset}/{r.split}")
