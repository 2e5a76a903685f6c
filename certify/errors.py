"""Errors a user can fix, and the one that means a bug.

Every message names what was wrong, the value received, what was expected and how to fix it.
The CLI turns :class:`CertifyError` into one line on stderr and exit code 1; anything else is a
bug and keeps its traceback.

A library message speaks of the library's arguments, never of a command-line flag: it writes
them as ``{name}`` fields and passes their values as keyword arguments::

    raise SpecError("{transfer_split} would train on the test set", transfer_split="test")

which reads ``transfer_split='test' would train ...`` from the library and, when the CLI
reports it, ``--transfer-split test would train ...`` (the running command's option whose
parameter has that name; see :meth:`CertifyError.render`). Pass :data:`NAME` to mention an
argument without a value.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable
from typing import Any


class _Name:
    """The value of an argument mentioned by name only."""

    def __repr__(self) -> str:
        return "NAME"


#: Mention an argument without a value: ``SpecError("drop {transfer_split}", transfer_split=NAME)``.
NAME: Any = _Name()


def literal(text: object) -> str:
    """`text` for a message template with named arguments: its braces escaped."""
    return str(text).replace("{", "{{").replace("}", "}}")


class CertifyError(Exception):
    """Base for all errors a user can fix.

    Args:
        *args: The message (a template when `arguments` are given).
        **arguments: The library arguments the message names, by name, with their values (or
            :data:`NAME`).
    """

    def __init__(self, *args: object, **arguments: Any) -> None:
        super().__init__(*args)
        self.arguments = arguments

    def __str__(self) -> str:
        return self.render(_cli_flag)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})" if self.arguments else super().__repr__()

    def render(self, flag: Callable[[str], str | None] | None = None) -> str:
        """The message with each named argument as ``name='value'``, or as ``--flag value``
        where `flag` maps the argument's name to an option (the CLI's mapping)."""
        text = super().__str__()
        if not self.arguments:
            return text
        shown = {}
        for name, value in self.arguments.items():
            option = flag(name) if flag is not None else None
            if option is not None:
                shown[name] = option if value is NAME else f"{option} {value}"
            else:
                shown[name] = name if value is NAME else f"{name}={value!r}"
        return text.format_map(shown)


def _cli_flag(name: str) -> str | None:
    """The option of the CLI command being run whose parameter is `name`, if any.

    The CLI (click) reports errors while the command's context is active; the mapping comes
    from the commands' own declared options, so it never goes stale. Outside the CLI: None.
    """
    click: Any = sys.modules.get("click")
    if click is None:
        return None
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    commands = [ctx.command]
    while ctx is not None and ctx.parent is not None:
        ctx = ctx.parent
    if ctx is not None and isinstance(ctx.command, click.Group) and ctx.invoked_subcommand:
        sub = ctx.command.get_command(ctx, ctx.invoked_subcommand)
        pending = [sub] if sub is not None else []
        while pending:
            command = pending.pop()
            commands.append(command)
            if isinstance(command, click.Group):
                pending.extend(c for c in command.commands.values())
    for command in commands:
        for param in command.params:
            if param.name == name and isinstance(param, click.Option):
                long = [str(o) for o in param.opts if o.startswith("--")]
                return long[0] if long else str(param.opts[0])
    return None


class UnsupportedLayerError(CertifyError):
    """A layer the bound engine has no sound rule for."""


class UnknownNameError(CertifyError, KeyError):
    """An unknown method, architecture or dataset name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SpecError(CertifyError, ValueError):
    """Malformed input: shapes, eps < 0, labels out of range, lower > upper."""


class CheckpointError(CertifyError):
    """A file that is not a valid certify checkpoint."""


class DatasetError(CertifyError):
    """Missing, corrupt or mismatched data."""


class SoundnessError(AssertionError):
    """An internal soundness invariant is broken: a bug, never caught, never clamped away."""


def unknown_name(kind: str, name: str, available: Iterable[str]) -> UnknownNameError:
    """Build the error for an unknown `kind` name, suggesting close matches.

    Example: ``unknown method 'alpha_crown'; did you mean 'alpha-crown'? Available: ibp, crown.``
    """
    available = list(available)
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
    hint = f" did you mean '{close[0]}'?" if close else ""
    return UnknownNameError(f"unknown {kind} '{name}';{hint} Available: {', '.join(available)}.")


class ReportError(CertifyError):
    """A missing or malformed run directory or result file (per_sample.csv, results.json)."""


class OutputError(CertifyError):
    """An output path that cannot be written: not a folder, read-only, or not a regular file."""


class DistributedError(CertifyError):
    """A multi-process (torchrun) run failed on some rank; the message names the rank."""


class RunLockedError(CertifyError):
    """Another live run holds the output (run folder or file) this run would write."""


class DiskFullError(CertifyError):
    """No space left (ENOSPC, or a quota) while writing a result; what was saved before is kept."""
