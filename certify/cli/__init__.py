"""The ``certify`` command line: a click group whose subcommands are imported lazily.

Heavy modules (torch, cvxpy, matplotlib) are imported inside each command, so ``certify --help``
stays fast. A :class:`certify.errors.CertifyError` raised anywhere below becomes one line on
stderr and exit code 1, a bad option or argument one line and exit code 2; any other exception
is a bug and keeps its traceback, except a full disk (one line, exit 1) and Ctrl-C (one line
saying how to continue, exit 130). Both keep what was saved valid, and the line says how to go
on: :data:`CONTINUE_HINTS`.
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


# How to continue each command after Ctrl-C or a full disk (what it saved is valid).
_RESUME = "rerun it with the same options and --resume"
CONTINUE_HINTS: dict[str, str] = {
    "train": _RESUME,
    "distill": _RESUME,
    "prune": _RESUME,
    "retrain": _RESUME,
    "area": _RESUME + " (-o pointing at the run folder)",
    "experiment": "rerun the same command: finished stages and steps are reused",
    "demo": "rerun the same command: finished stages and steps are reused",
    "compare": "rerun the same command: finished area runs in --cache are reused",
    "verify": "rerun the same command: with --instances, finished instances are kept",
}
_RERUN = "rerun the same command"
INTERRUPTED_EXIT = 130


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
        from certify.errors import CertifyError, DiskFullError

        try:
            with results_only_stdout():
                return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted: what was saved so far is valid; {_hint(ctx)}.",
                       err=True)
            raise click.exceptions.Exit(INTERRUPTED_EXIT) from None
        except DiskFullError as e:
            raise click.ClickException(f"{_first_line(e)}: free some space, then "
                                       f"{_hint(ctx)}") from None
        except CertifyError as e:
            raise click.ClickException(_first_line(e)) from None
        except click.UsageError as e:  # a bad option, too, is one line (exit code 2 kept)
            raise _one_line_usage_error(e) from None
        except click.ClickException:
            raise
        except Exception as e:  # a full disk outside the atomic writers (mkdir, a log file)
            from certify._io import disk_full_cause

            cause = disk_full_cause(e)
            if cause is None:
                raise
            where = f" writing {cause.filename}" if cause.filename else ""
            raise click.ClickException(f"no space left on the device{where}; the files saved "
                                       f"before are intact: free some space, then "
                                       f"{_hint(ctx)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _hint(ctx: click.Context) -> str:
    """How to continue the subcommand being run."""
    name = ctx.invoked_subcommand or ""
    return CONTINUE_HINTS.get(name, _RERUN)


class _UsageLine(click.ClickException):
    """A usage error shown as one line, with click's exit code for usage errors."""

    exit_code = click.UsageError.exit_code


def _one_line_usage_error(e: click.UsageError) -> click.ClickException:
    """`e` as one ``Error: ...`` line that points at the command's ``--help``."""
    message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
    where = e.ctx.command_path if e.ctx is not None else "certify"
    return _UsageLine(f"{message} (see '{where} --help')")


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
