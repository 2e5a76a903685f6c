"""``certify info``: what a checkpoint (or an ONNX network) holds."""

from __future__ import annotations

import json

import click

from certify.cli.options import model_input_options


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@model_input_options
def info(model: str, as_json: bool, input_shape: tuple[int, ...] | None,
         mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """Print a model's architecture, dataset, parameters, provenance and metrics.

    MODEL is a certify checkpoint (.pt) or an ONNX network (.onnx, .onnx.gz).

    \b
    Example:
      certify info models/teacher.pt
      certify info net.onnx
    """
    from dataclasses import asdict

    from certify.checkpoint import checkpoint_sha256
    from certify.model_io import load_model
    from certify.nets import count_parameters

    net, meta = load_model(model, input_shape=input_shape, mean=mean, std=std)
    params = count_parameters(net)
    if as_json:
        out = asdict(meta) | {"parameters": params, "sha256": checkpoint_sha256(model)}
        click.echo(json.dumps(out, indent=2))
        return
    widths = ", ".join(f"{k}={v}" for k, v in meta.arch_kwargs.items())
    click.echo(f"file:         {model}")
    click.echo(f"architecture: {meta.arch} ({widths})")
    click.echo(f"parameters:   {params:,}")
    click.echo(
        f"dataset:      {meta.dataset}  input {tuple(meta.input_shape)}, {meta.num_classes} classes"
    )
    click.echo(f"normalize:    mean={list(meta.mean)} std={list(meta.std)}")
    if meta.parent:
        click.echo(f"parent:       {meta.parent[:16]}…")
    for k, v in meta.training.items():
        click.echo(f"training.{k}: {_show(v)}")
    for k, v in meta.metrics.items():
        click.echo(f"metrics.{k}:  {v:.4f}" if isinstance(v, float) else f"metrics.{k}:  {v}")
    click.echo("layers:")
    for name, layer in net.named_children():
        click.echo(f"  {name:10s} {layer}")


def _show(value: object) -> str:
    """Nested recipes (a pruned model's parent recipe) as ``key=value`` pairs on one line."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_show(v)}" for k, v in value.items()) + "}"
    return str(value)
