"""``certify prune``: L1-norm filter pruning (Li et al. 2017) that really shrinks the model."""

from __future__ import annotations

from pathlib import Path

import click

from certify.cli.options import data_dir_option, device_option, quiet_option, seed_option


def _layer_ratios(ctx: click.Context, param: click.Parameter,
                  value: str | None) -> dict[str, float] | None:
    if value is None:
        return None
    ratios: dict[str, float] = {}
    for item in value.split(","):
        name, sep, number = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            ratios[name.strip()] = float(number)
        except ValueError:
            raise click.BadParameter(f"'{item}' is not LAYER=RATIO (e.g. conv1=0.5,conv2=0.7)."
                                     ) from None
    return ratios


def _float_list(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers.") from None


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--ratio", type=float, default=None,
              help="Fraction of filters to remove from every conv layer, in [0, 1).")
@click.option("--ratios", "layer_ratios", default=None, callback=_layer_ratios,
              help="Per-layer fractions, e.g. conv1=0.5,conv2=0.7 (other layers untouched).")
@click.option("--sensitivity", is_flag=True,
              help="Prune each conv layer alone at --scan-ratios and report the accuracy drop.")
@click.option("--scan-ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
              show_default=True, callback=_float_list, help="Ratios for --sensitivity.")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tune the pruned model on the training split for N epochs.")
@click.option("--distill-from-parent", is_flag=True,
              help="Fine-tune with Hinton distillation from the unpruned model.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, help="Temperature for --distill-from-parent.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Soft-term weight for --distill-from-parent.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              show_default=True, help="Fine-tuning learning rate (Adam, cosine schedule).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Fine-tuning batch size.")
@seed_option
@device_option
@data_dir_option
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Pruned checkpoint [default: models/<model>-pruned.pt]; with --sensitivity "
                   "a CSV file for the scan (a .md beside it).")
@click.option("--resume", is_flag=True, help="Continue interrupted fine-tuning (same options).")
@click.option("--force", is_flag=True, help="Overwrite an existing output checkpoint.")
@quiet_option
def prune(model: str, ratio: float | None, layer_ratios: dict[str, float] | None,
          sensitivity: bool, scan_ratios: list[float], finetune_epochs: int,
          distill_from_parent: bool, temperature: float, alpha: float, lr: float,
          batch_size: int, seed: int, device: str, data_dir: str | None, out: str | None,
          resume: bool, force: bool, quiet: bool) -> None:
    """Remove the filters with the smallest L1 norm and save the smaller model.

    Prints a table like the thesis's Table 8.10 (name, parameters, test accuracy) before and
    after pruning (and after fine-tuning).

    \b
    Example:
      certify prune models/student.pt --ratio 0.5 --finetune-epochs 5 -o models/pruned.pt
      certify prune models/student.pt --ratios conv1=0.3,conv2=0.6
      certify prune models/student.pt --sensitivity
    """
    from certify.train._tables import markdown_table

    chosen = sum([ratio is not None, layer_ratios is not None, sensitivity])
    if chosen != 1:
        raise click.UsageError("give exactly one of --ratio R, --ratios conv1=R1,... or "
                               "--sensitivity.")
    from certify._io import check_output_file

    if out is not None:
        check_output_file(out)  # before any work: one line, not a traceback at the end
    if sensitivity:
        _sensitivity(model, scan_ratios, data_dir, device, out)
        return
    from certify._lock import hold_output
    from certify.cli.train import make_config
    from certify.train.prune import prune_checkpoint, prune_columns

    finetune = None
    if finetune_epochs > 0:
        finetune = make_config(epochs=finetune_epochs, batch_size=batch_size, lr=lr,
                               optimizer="adam", momentum=0.9, weight_decay=0.0,
                               schedule="cosine", grad_clip=None, seed=seed, device=device)
    out = out or f"models/{Path(model).stem}-pruned.pt"
    if Path(out).exists() and not (force or resume):
        from certify.errors import SpecError

        raise SpecError(f"{out} already exists; pass --force to overwrite it, or -o another path")
    check_output_file(out)
    with hold_output(out, command="prune", folder=False):
        outcome = prune_checkpoint(model, ratio if ratio is not None else layer_ratios or {},
                                   finetune=finetune, distill_from_parent=distill_from_parent,
                                   temperature=temperature, alpha=alpha, data_dir=data_dir,
                                   output=out, resume=resume, device=device, quiet=quiet)
    click.echo(markdown_table(outcome.rows, prune_columns()))
    widths = ", ".join(f"{n} {a}->{b}" for n, (a, b) in outcome.widths.items())
    click.echo(f"filters: {widths} -> {out}")


def _sensitivity(model: str, scan_ratios: list[float], data_dir: str | None, device: str,
                 out: str | None) -> None:
    from certify.checkpoint import load_checkpoint
    from certify.data import load_dataset, split_validation
    from certify.model_io import require_checkpoint
    from certify.train._tables import markdown_table, write_table
    from certify.train.prune import sensitivity_columns, sensitivity_scan, sensitivity_table_rows
    from certify.utils import resolve_device

    require_checkpoint(model, "prune")
    net, meta = load_checkpoint(model, device=resolve_device(device))
    # a scan chooses ratios: on the validation hold-out of the training split, never the test set
    _, validation = split_validation(load_dataset(meta.dataset, "train", data_dir))
    rows = sensitivity_scan(net, validation, scan_ratios)
    table = sensitivity_table_rows(rows)
    click.echo(markdown_table(table, sensitivity_columns()))
    if rows:
        click.echo(f"baseline accuracy {100 * rows[0].baseline:.2f}% on the validation hold-out "
                   f"({len(validation)} training samples; the test split is left for the final "
                   "numbers)")
    if out is not None:
        write_table(out, Path(out).with_suffix(".md"), table, sensitivity_columns())
