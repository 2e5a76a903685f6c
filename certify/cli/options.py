"""Option decorators shared by the commands."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, overload

import click

F = TypeVar("F", bound=Callable[..., Any])


class RegistryNames(Sequence[str]):
    """The names of a library registry, read on first use.

    Commands are declared when ``certify --help`` lists them; reading a registry then would
    import torch. The registry stays the single source: a dataset, loss or method registered
    in the library is a valid choice here with no list to update.
    """

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    def _get(self) -> tuple[str, ...]:
        return tuple(self._load())  # every time: a name registered later is a choice too

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __repr__(self) -> str:
        return f"RegistryNames({list(self._get())})"


class RegistryChoice(click.Choice):  # type: ignore[type-arg]
    """A :class:`click.Choice` over a :class:`RegistryNames`, resolved when first needed."""

    def __init__(self, names: RegistryNames, case_sensitive: bool = True) -> None:
        self._registry = names
        super().__init__((), case_sensitive)

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._registry)

    @choices.setter
    def choices(self, value: Any) -> None:  # click.Choice.__init__ assigns; the registry wins
        pass


def _datasets() -> list[str]:
    from certify.data import DATASETS

    return list(DATASETS)


def _robust_losses() -> list[str]:
    from certify.train.robust import list_robust_losses

    return list_robust_losses()


#: Every registered dataset (:data:`certify.data.DATASETS`).
DATASET_NAMES = RegistryNames(_datasets)
#: Every robust training loss (:func:`certify.train.robust.list_robust_losses`).
ROBUST_LOSS_NAMES = RegistryNames(_robust_losses)


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


def dataset_option(required: bool = True, default: str | None = None,
                   help: str = "Dataset name.") -> Callable[[F], F]:
    def decorate(f: F) -> F:
        return click.option("--dataset", type=RegistryChoice(DATASET_NAMES), required=required,
                            default=default, help=help)(f)

    return decorate


def num_samples_option(default: int | None, what: str) -> Callable[[F], F]:
    """``--num-samples N`` (or ``--n N``): the first N samples, spelled alike by every command.

    Under torchrun write ``--num-samples``: torchrun's own parser takes ``--n`` for an
    abbreviation of its options and stops.
    """
    shown = "all" if default is None else str(default)
    return click.option("--num-samples", "--n", "n", type=int, default=default,
                        help=f"{what} the first N samples of the split [default: {shown}]. "
                             "Under torchrun write --num-samples (torchrun rejects --n).")


def dtype_option(f: F) -> F:
    return click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
                        show_default=True, help="Precision of the bound computation.")(f)


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars.")(f)


def seeds_option(f: F) -> F:
    """``--seeds 0,1,2``: run the whole pipeline once per seed (overrides the config's)."""
    return click.option("--seeds", metavar="S[,S...]", default=None,
                        callback=_number_list(int, "comma-separated integer seeds, e.g. 0,1,2"),
                        help="Run the whole study once per seed; tables show mean ± std and "
                             "the intervals resample the seeds.")(f)


def _number_list(kind: type, what: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return tuple(kind(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            raise click.BadParameter(f"expected {what}, got {value!r}.") from None

    return parse


def model_input_options(f: F) -> F:
    """``--input-shape``, ``--mean`` and ``--std`` for models (ONNX) whose file does not say."""
    f = click.option("--std", metavar="S[,S...]",
                     callback=_number_list(float, "comma-separated numbers"),
                     help="Per-channel std of that normalization, e.g. 0.3081.")(f)
    f = click.option("--mean", metavar="M[,M...]",
                     callback=_number_list(float, "comma-separated numbers"),
                     help="Per-channel mean of the input normalization an ONNX network expects "
                     "(added as its first layer), e.g. 0.1307.")(f)
    return click.option("--input-shape", metavar="C,H,W",
                        callback=_number_list(int, "C,H,W"),
                        help="Input shape of an ONNX network whose file does not say (or to "
                        "read a flat input as an image).")(f)
