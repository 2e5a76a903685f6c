"""Helpers shared by the CLI tests: invoke a command, read its one-line error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from click.testing import CliRunner, Result

from certify.cli import main


def run(*args: object) -> Result:
    """``certify ARGS...`` through click's runner (arguments stringified)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result) -> str:
    """The command failed with exit code 1 and exactly one ``Error: ...`` line on stderr."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Torch single-threaded for the module: small CPU ops are much faster so on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
