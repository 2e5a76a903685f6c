"""Option decorators shared by the commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DATASET_NAMES = ["svhn", "cifar10", "mnist", "digits"]


def device_option(f: F) -> F:
    return click.option("--device", default="cpu", show_default=True,
                        help="cpu, cuda, cuda:N, or auto (CUDA when present).")(f)


def seed_option(f: F) -> F:
    return click.option("--seed", type=int, default=0, show_default=True,
                        help="Random seed: the same seed gives the same result.")(f)


def data_dir_option(f: F) -> F:
    return click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        envvar="CERTIFY_DATA", show_envvar=True,
                        help="Folder holding the dataset files (default ./data).")(f)


def dataset_option(required: bool = True, default: str | None = None) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        return click.option("--dataset", type=click.Choice(DATASET_NAMES), required=required,
                            default=default, help="Dataset name.")(f)

    return decorate


def dtype_option(f: F) -> F:
    return click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
                        show_default=True, help="Precision of the bound computation.")(f)


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)
