"""stdout carries results only: what native libraries print goes to stderr.

Solvers print from C and C++ straight to file descriptor 1 -- HiGHS writes its banner there the
first time a problem is built, whatever its logging options say -- which breaks ``--json`` and
any pipe. While a command runs, :func:`results_only_stdout` points descriptor 1 at stderr and
gives Python's ``sys.stdout`` (``click.echo``, ``print``) a private duplicate of the real stdout.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def results_only_stdout() -> Iterator[None]:
    """Within the block, native writes to descriptor 1 land on stderr; ``sys.stdout`` doesn't.

    Does nothing where ``sys.stdout`` is not the process's descriptor 1 (a test runner's
    capture, a notebook): native output cannot reach such a stream anyway.
    """
    stream = sys.stdout
    try:
        fd = stream.fileno()
        err = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = err = -1
    if fd != 1 or err < 0:
        yield
        return
    stream.flush()
    saved = os.dup(1)
    results = os.fdopen(os.dup(saved), "w", encoding=stream.encoding, errors=stream.errors,
                        newline=None, buffering=1 if stream.line_buffering else -1)
    os.dup2(err, 1)
    sys.stdout = results
    try:
        yield
    finally:
        sys.stdout = stream
        with contextlib.suppress(OSError, ValueError):
            results.flush()
        results.close()
        os.dup2(saved, 1)
        os.close(saved)
