"""Errors a user can fix, and the one that means a bug.

Every message names what was wrong, the value received, what was expected and how to fix it.
The CLI turns :class:`CertifyError` into one line on stderr and exit code 1; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CertifyError(Exception):
    """Base for all errors a user can fix."""


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
