"""The ``certify`` command line: a click group whose subcommands are imported lazily.

Heavy modules (torch, cvxpy, matplotlib) are imported inside each command, so ``certify --help``
stays fast. A :class:`certify.errors.CertifyError` raised anywhere below becomes one line on
stderr and exit code 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click

from certify import __version__

# name -> "module:function". Each command lives in its own module under certify/cli/.
COMMANDS: dict[str, str] = {
    "train": "certify.cli.train:train",
    "eval": "certify.cli.train:eval_cmd",
    "info": "certify.cli.info:info",
    "data": "certify.cli.data:data",
    "distill": "certify.cli.distill:distill",
    "prune": "certify.cli.prune:prune",
    "retrain": "certify.cli.retrain:retrain",
    "attack": "certify.cli.attack:attack",
    "area": "certify.cli.area:area",
    "plot": "certify.cli.plot:plot",
    "compare": "certify.cli.compare:compare",
    "experiment": "certify.cli.experiment:experiment",
    "demo": "certify.cli.demo:demo",
    "verify": "certify.cli.verify:verify",
}


class CertifyGroup(click.Group):
    """Lazy subcommands and the single place where user errors become one-line messages."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if _importable(COMMANDS[name]))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not _importable(target):
            return None
        module, attr = target.split(":")
        return _with_threads(getattr(importlib.import_module(module), attr))

    def invoke(self, ctx: click.Context) -> Any:
        from certify.cli.streams import results_only_stdout
        from certify.errors import CertifyError

        try:
            with results_only_stdout():
                return super().invoke(ctx)
        except CertifyError as e:
            raise click.ClickException(
                str(e).splitlines()[0] if str(e) else type(e).__name__
            ) from None


def _apply_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """Set torch's thread counts as soon as the option is parsed (before the command runs)."""
    if ctx.resilient_parsing:
        return value
    from certify.threads import set_threads

    set_threads(value)
    return value


THREADS_OPTION = click.Option(
    ["--threads"], type=click.IntRange(min=1), default=None, envvar="CERTIFY_THREADS",
    show_envvar=True, expose_value=False, callback=_apply_threads,
    help="CPU threads for torch [default: OMP_NUM_THREADS if set, else half the CPUs this "
         "process may use, at least 1]. Same seed and same thread count give the same result.")


def _with_threads(command: click.Command) -> click.Command:
    """Give a command (and every subcommand of a group) the shared ``--threads`` option."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _with_threads(sub)
        return command
    if not any(p.name == "threads" for p in command.params):
        command.params.append(THREADS_OPTION)
    return command


def _importable(target: str) -> bool:
    module = target.split(":")[0]
    return importlib.util.find_spec(module) is not None


@click.group(cls=CertifyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="certify")
def main() -> None:
    """Prove how robust an image classifier is, and how distillation and pruning change it.

    \b
    Quick start:
      certify demo                       # the whole study on bundled digits data
      certify area model.pt --dataset svhn
    """
