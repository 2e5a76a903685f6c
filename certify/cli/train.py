"""``certify train`` (standard training) and ``certify eval`` (clean accuracy)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from certify.cli.options import (
    ROBUST_LOSS_NAMES,
    F,
    RegistryChoice,
    data_dir_option,
    dataset_option,
    device_option,
    quiet_option,
    seed_option,
)

if TYPE_CHECKING:
    from certify.train.loops import TrainConfig
    from certify.train.robust import RobustConfig

# the choices of --robust: certify.train.robust.ROBUST_LOSSES, read when first needed (it loads
# torch)
ROBUST_CHOICES = ROBUST_LOSS_NAMES
ROBUST_OPTION_NAMES = ("eps", "eps_start", "eps_ramp_epochs", "eps_warmup_epochs", "kappa",
                       "kappa_start", "pgd_steps", "bound_batch_size", "bound_memory_mb",
                       "eval_samples", "certify_method")


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


def robust_options(required: bool) -> Callable[[F], F]:
    """``--robust METHOD --eps E`` and the robust recipe's options (``train``, ``retrain``)."""

    # click >= 8.2 does not enforce required=True on an option given an explicit default
    needed: dict[str, Any] = {"required": True} if required else {"default": None}

    def decorate(f: F) -> F:
        for opt in reversed([
            click.option("--robust", type=RegistryChoice(ROBUST_CHOICES), **needed,
                         help="Robust loss: wong-kolter / crown-ibp / ibp (robust "
                              "cross-entropy on the margin lower bounds), pgd (Madry)."),
            click.option("--eps", type=click.FloatRange(min=0), **needed,
                         help="Training eps (L-inf, pixel units in [0, 1])."),
            click.option("--eps-start", type=click.FloatRange(min=0), default=0.0,
                         show_default=True, help="Eps at the start of the ramp."),
            click.option("--eps-ramp-epochs", type=click.FloatRange(min=0), default=None,
                         help="Epochs of the linear ramp from --eps-start to --eps "
                              "[default: half of --epochs]."),
            click.option("--eps-warmup-epochs", type=click.FloatRange(min=0), default=0.0,
                         show_default=True, help="Epochs at --eps-start before the ramp."),
            click.option("--kappa", type=click.FloatRange(0, 1), default=0.0,
                         show_default=True,
                         help="Weight of the clean loss: kappa*clean + (1-kappa)*robust."),
            click.option("--kappa-start", type=click.FloatRange(0, 1), default=None,
                         help="Clean-loss weight before the ramp, moved linearly to --kappa "
                              "along it (CROWN-IBP: 1) [default: --kappa]."),
            click.option("--pgd-steps", type=click.IntRange(min=1), default=10,
                         show_default=True, help="PGD steps per batch (--robust pgd)."),
            click.option("--bound-batch-size", type=click.IntRange(min=1), default=None,
                         help="Samples per checkpointed bound computation (bounds the memory "
                              "of bound-based training) [default: planned each step from "
                              "--bound-memory-mb]."),
            click.option("--bound-memory-mb", type=click.FloatRange(min=0, min_open=True),
                         default=2048.0, show_default=True,
                         help="Memory for what autograd keeps of one micro-batch's bound "
                              "computation; the micro-batch size follows from it."),
            click.option("--eval-samples", type=click.IntRange(min=0), default=200,
                         show_default=True,
                         help="Each epoch: PGD and certified accuracy at --eps on the first N "
                              "test samples (0: skip)."),
            click.option("--certify-method", default=None,
                         help="Bound for that certified accuracy [default: the training bound; "
                              "crown-ibp for pgd]."),
        ]):
            f = opt(f)
        return f

    return decorate


def make_robust_config(*, robust: str, epochs: int, eps: float, eps_start: float,
                       eps_ramp_epochs: float | None, eps_warmup_epochs: float, kappa: float,
                       kappa_start: float | None, pgd_steps: int, bound_batch_size: int | None,
                       bound_memory_mb: float, eval_samples: int,
                       certify_method: str | None) -> RobustConfig:
    """A :class:`RobustConfig` from the robust options (the ramp defaulting to epochs / 2)."""
    from certify.train.robust import RobustConfig, default_ramp
    from certify.train.schedules import EpsSchedule

    schedule = EpsSchedule(final=eps, start=eps_start,
                           ramp_epochs=default_ramp(epochs, eps_ramp_epochs),
                           warmup_epochs=eps_warmup_epochs)
    return RobustConfig(robust, schedule, kappa=kappa, kappa_start=kappa_start,
                        pgd_steps=pgd_steps, bound_batch_size=bound_batch_size,
                        bound_memory_mb=bound_memory_mb, eval_samples=eval_samples,
                        certify_method=certify_method)


def _given(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among `names` set on the command line (or by a config default map)."""
    from click.core import ParameterSource

    given = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source not in (None, ParameterSource.DEFAULT):
            given.append("--" + name.replace("_", "-"))
    return given


@click.command()
@dataset_option()
@click.option("--arch", required=True,
              help="Architecture: mlp, mlp-200-100, wk-small, wk-large, svhn-teacher, "
                   "cifar-teacher, scn-32-32, ...")
@train_config_options()
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True,
              help="Train softmax(z/T) (a defensive-distillation teacher); 1 is standard.")
@robust_options(required=False)
@seed_option
@device_option
@data_dir_option
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to write [default: models/<arch>-<dataset>.pt, with "
                   "--robust models/<arch>-<dataset>-<method>.pt].")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from <out>.partial (same options).")
@quiet_option
def train(dataset: str, arch: str, epochs: int, batch_size: int, lr: float, optimizer: str,
          momentum: float, weight_decay: float, schedule: str, grad_clip: float | None,
          temperature: float, robust: str | None, eps: float | None, eps_start: float,
          eps_ramp_epochs: float | None, eps_warmup_epochs: float, kappa: float,
          kappa_start: float | None, pgd_steps: int, bound_batch_size: int | None,
          bound_memory_mb: float, eval_samples: int, certify_method: str | None, seed: int,
          device: str, data_dir: str | None, out: str | None, resume: bool,
          quiet: bool) -> None:
    """Train a model (cross-entropy, or a robust loss) and save it with its recipe and metrics.

    Progress and the test accuracy of every epoch go to stderr; the final test accuracy to
    stdout. The same --seed gives the same weights. With --robust, the loss is Wong & Kolter's
    robust cross-entropy on the margin lower bounds of wong-kolter, crown-ibp or ibp, or the
    cross-entropy on PGD examples, with eps ramped linearly from --eps-start to --eps; each
    epoch also reports PGD and certified accuracy at --eps on the first --eval-samples test
    samples.

    \b
    Example:
      certify train --dataset digits --arch mlp -o models/mlp-digits.pt
      certify train --dataset svhn --arch svhn-teacher --epochs 20 --device cuda
      certify train --dataset digits --arch mlp-64-64 --robust wong-kolter --eps 0.1
      certify train --dataset svhn --arch wk-large --robust wong-kolter --eps 0.01 \\
          --eps-start 0.001 --eps-ramp-epochs 10 --device cuda
    """
    from certify._io import check_output_file
    from certify._lock import hold_output
    from certify.train.standard import train_standard
    from certify.utils import seed_everything

    ctx = click.get_current_context()
    if robust is None:
        stray = _given(ctx, ROBUST_OPTION_NAMES)
        if stray:
            raise click.UsageError(f"robust-training options without --robust: "
                                   f"{', '.join(stray)}; add --robust "
                                   "wong-kolter|crown-ibp|ibp|pgd.")
    else:
        if eps is None:
            raise click.UsageError(f"--robust {robust} needs the training eps: add --eps, e.g. "
                                   "--eps 0.1.")
        if temperature != 1.0:
            raise click.UsageError("--temperature trains a defensive-distillation teacher with "
                                   "cross-entropy; it does not combine with --robust.")
    config = make_config(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                         momentum=momentum, weight_decay=weight_decay, schedule=schedule,
                         grad_clip=grad_clip, seed=seed, device=device)
    seed_everything(seed)
    if robust is not None:
        from certify.train.robust import describe_result, train_robust

        assert eps is not None
        recipe = make_robust_config(
            robust=robust, epochs=epochs, eps=eps, eps_start=eps_start,
            eps_ramp_epochs=eps_ramp_epochs, eps_warmup_epochs=eps_warmup_epochs, kappa=kappa,
            kappa_start=kappa_start, pgd_steps=pgd_steps, bound_batch_size=bound_batch_size,
            bound_memory_mb=bound_memory_mb, eval_samples=eval_samples,
            certify_method=certify_method)
        out = out or f"models/{arch}-{dataset}-{robust}.pt"
        check_output_file(out)
        with hold_output(out, command="train", folder=False):
            trained = train_robust(arch, dataset, config, recipe, output=out,
                                   data_dir=data_dir, resume=resume, quiet=quiet)
        click.echo(f"{out}: {describe_result(trained)} ({arch} on {dataset}, {robust} at eps "
                   f"{eps:g}, {epochs} epoch{'s' if epochs != 1 else ''})")
        return
    out = out or f"models/{arch}-{dataset}.pt"
    check_output_file(out)  # before any work: one line, not a traceback at the end
    with hold_output(out, command="train", folder=False):
        trained = train_standard(arch, dataset, config, output=out, temperature=temperature,
                                 data_dir=data_dir, resume=resume, quiet=quiet)
    acc = trained.meta.metrics["test_accuracy"]
    click.echo(f"{out}: test accuracy {100 * acc:.2f}% ({arch} on {dataset}, {epochs} epochs)")


@click.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@dataset_option(required=False, help="Dataset name [default: the one the checkpoint records; "
                "an ONNX network needs it].")
@click.option("--split", type=click.Choice(["test", "train", "extra"]), default="test",
              show_default=True, help="Dataset split.")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Samples per forward pass.")
@device_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model: str, dataset: str | None, split: str, batch_size: int, device: str,
             data_dir: str | None, as_json: bool) -> None:
    """Print a model's clean accuracy on a dataset (default: the one it was trained on).

    MODEL is a certify checkpoint (.pt) or an ONNX network (.onnx, .onnx.gz).

    \b
    Example:
      certify eval models/mlp-digits.pt
      certify eval net.onnx --dataset digits
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
