"""``certify data``: download the official dataset files and show which are present."""

from __future__ import annotations

import json
from pathlib import Path

import click

from certify.cli.options import DATASET_NAMES, RegistryChoice, data_dir_option, quiet_option


@click.group()
def data() -> None:
    """Download dataset files and show which are present.

    \b
    Example:
      certify data list
      certify data download svhn --data-dir ~/data
    """


@data.command("list")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def list_datasets(data_dir: str | None, as_json: bool) -> None:
    """List datasets: input shape, classes, and which split files are present.

    \b
    Example:
      certify data list --data-dir ~/data
    """
    from certify.data import DATASETS, default_root
    from certify.data.download import dataset_status

    root = Path(data_dir) if data_dir is not None else default_root()
    rows = []
    for name, info in DATASETS.items():
        for status in dataset_status(name, root):
            rows.append({"dataset": name, "input_shape": list(info.input_shape),
                         "classes": info.num_classes, "split": status.split,
                         "present": status.is_present, "note": status.note,
                         "files": [str(p) for p in status.files]})
    if as_json:
        click.echo(json.dumps({"root": str(root), "datasets": rows}, indent=2))
        return
    click.echo(f"data folder: {root}  (--data-dir or $CERTIFY_DATA)")
    click.echo(f"{'dataset':8s} {'shape':12s} {'classes':>7s}  {'split':5s}  files")
    last = None
    for row in rows:
        first = row["dataset"] != last
        last = row["dataset"]
        head = (f"{row['dataset']:8s} {str(tuple(row['input_shape'])):12s} {row['classes']:>7d}"
                if first else " " * 29)
        if row["note"] == "bundled":
            files = "bundled with scikit-learn"
        elif row["present"]:
            files = _files(row["files"])
        else:
            files = "missing"
        click.echo(f"{head}  {row['split']:5s}  {files}")
    if any(not row["present"] for row in rows):
        click.echo("Get missing files with `certify data download NAME`.")


def _files(paths: list[str]) -> str:
    """The files, with a long list (CIFAR-10's five train batches) shortened."""
    if len(paths) <= 2:
        return ", ".join(paths)
    return f"{paths[0]} .. {Path(paths[-1]).name} ({len(paths)} files)"


@data.command()
@click.argument("name", type=RegistryChoice(DATASET_NAMES))
@data_dir_option
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "test", "extra"]),
              help="Split to fetch (repeatable). Default: train and test; SVHN's extra split "
                   "(1.3 GB) only when asked for.")
@quiet_option
def download(name: str, data_dir: str | None, splits: tuple[str, ...], quiet: bool) -> None:
    """Download a dataset's official files and verify their checksums.

    Files go to DATA_DIR/NAME/. Files already present are checked instead of fetched again;
    a partial or corrupt download is removed.

    \b
    Example:
      certify data download svhn --data-dir ~/data
      certify data download svhn --split extra
    """
    from certify.data.download import download_dataset

    fetched = download_dataset(name, data_dir, splits=splits or None, quiet=quiet)
    if not fetched:
        click.echo(f"{name}: bundled with scikit-learn; nothing to download.")
        return
    for item in fetched:
        note = " (other accepted files already present)" if item.action == "not needed" else ""
        click.echo(f"{item.action:10s}  {item.path}{note}")
