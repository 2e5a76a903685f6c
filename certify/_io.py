"""Atomic file writing: a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success it is renamed over `path`.

    On any exception the temporary file is removed and `path` is left as it was. Only a regular
    file (or nothing) is ever replaced: a folder, FIFO, device node or socket at `path` is
    refused before anything is written.

    Raises:
        OutputError: `path` is not a regular file, or its folder cannot be created or written.
    """
    path = Path(path)
    check_output_file(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from None
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _output_error(path: Path, e: OSError) -> Exception:
    """An :class:`~certify.errors.OutputError` naming why `path` cannot be written."""
    from certify.errors import OutputError

    if isinstance(e, NotADirectoryError) or (isinstance(e, FileExistsError)
                                             and not Path(e.filename or path).is_dir()):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()),
                       None)
        what = f"{blocker} is a file, not a folder" if blocker is not None else \
            "a part of the path is a file, not a folder"
    elif isinstance(e, PermissionError):
        what = "permission denied (a read-only place)"
    elif isinstance(e, FileNotFoundError):
        what = "its folder cannot be created there"
    else:
        what = e.strerror or type(e).__name__
    return OutputError(f"cannot write {path}: {what}; choose a writable output path (-o).")


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create the folder `path` (and its parents) for output, or say in one line why not.

    Raises:
        OutputError: a file is in the way, or the place is read-only.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(path, e) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _output_error(path, PermissionError(13, "Permission denied"))
    return path


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Check, before any work, that `path` can be written by :func:`atomic_open`.

    Creates the parent folders. A regular file at `path` is fine (it will be replaced); a
    folder, FIFO, device node or socket is refused (so is a link to one).

    Raises:
        OutputError: what is in the way, in one line.
    """
    from certify.errors import OutputError

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise _output_error(path, e) from None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"cannot write {path}: it is {_kind(mode)}, and certify only replaces "
                          "regular files; choose a file path for the output (-o).")
    ensure_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
