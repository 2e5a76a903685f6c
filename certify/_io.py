"""Atomic file writing: a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from certify.errors import DiskFullError, OutputError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# what mkstemp adds between atomic_open's prefix and suffix
_RANDOM_PART = r"[a-z0-9_]{8}"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success it is renamed over `path`.

    On any exception the temporary file is removed and `path` is left as it was. Only a regular
    file (or nothing) is ever replaced: a folder, FIFO, device node or socket at `path` is
    refused before anything is written.

    Raises:
        OutputError: `path` is not a regular file, or its folder cannot be created or written.
        DiskFullError: the device (or a quota) is full; `path` keeps its previous content.
    """
    path = Path(path)
    check_output_file(path)
    tmp: str | None = None
    try:  # from here on an interrupt (Ctrl-C) removes the temporary file too
        try:
            with interrupts_held():  # an interrupt comes once `tmp` and `f` are bound
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                           dir=path.parent)
                f = os.fdopen(fd, mode)
        except OSError as e:
            _raise_if_disk_full(e, path)
            raise _output_error(path, e) from None
        with f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600: the usual permissions
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, (DiskFullError, OutputError)):
            raise
        _raise_if_disk_full(e, path)
        if not isinstance(e, KeyboardInterrupt) and _cause(e, KeyboardInterrupt) is not None:
            # Ctrl-C inside a writer that turns it into its own error (torch.save's zip writer
            # raises a RuntimeError while the interrupt unwinds): it is still an interrupt
            raise KeyboardInterrupt from e
        raise


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the block and deliver it when the block ends.

    For a few statements that must finish together, such as creating a temporary file and
    binding its name: ``tempfile.mkstemp`` creates the file and then runs more Python code before
    it returns, and an interrupt landing there would leak a file its caller never learns of.
    Only Python-level handlers can be held, and they run in the main thread only; elsewhere, or
    when SIGINT is ignored or has its default action, this does nothing.
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield
        return
    held: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if held:
            handler(*held[0])


def _cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in `error`'s cause/context chain, if any."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind `error`, if any (torch.save wraps it in a RuntimeError)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def _raise_if_disk_full(error: BaseException, path: Path) -> None:
    cause = disk_full_cause(error)
    if cause is not None:
        raise DiskFullError(f"no space left on the device writing {path} "
                            f"({os.strerror(cause.errno or errno.ENOSPC)}); the files saved "
                            "before are intact") from error


def remove_stale_temporaries(target: str | os.PathLike[str], *, folder: bool) -> list[Path]:
    """Remove the temporary files :func:`atomic_open` leaves when a run is killed (SIGKILL).

    Call it only while holding the output's lock (:mod:`certify._lock`): then no live run is
    writing them. For a folder: every ``.NAME.XXXXXXXX.tmp`` in it, subfolders included. For a
    file ``NAME``: those of ``NAME`` and of its training state (``NAME[.TAG].partial``) beside it.

    Returns:
        The files removed.
    """
    target = Path(target)
    if folder:
        pattern = re.compile(rf"\..+\.{_RANDOM_PART}\.tmp")
        candidates = target.rglob(".*.tmp") if target.is_dir() else iter(())
    else:
        name = re.escape(target.name)
        pattern = re.compile(rf"\.{name}(\.[A-Za-z0-9_-]+)?(\.partial)?\.{_RANDOM_PART}\.tmp")
        parent = target.parent
        candidates = parent.glob(".*.tmp") if parent.is_dir() else iter(())
    removed = []
    for path in candidates:
        if pattern.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
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


def append_text(path: str | os.PathLike[str], text: str) -> None:
    """Append `text` to `path` (created if absent) and flush it to the device.

    The cost is that of `text`, not of the file: for logs that grow by a batch at a time. On
    failure (a full disk, Ctrl-C) the file is cut back to its previous length, so it never ends
    in a half-written line that this call wrote.

    Raises:
        OutputError: `path` is not a regular file, or its folder cannot be written.
        DiskFullError: the device (or a quota) is full; `path` keeps its previous content.
    """
    path = Path(path)
    check_output_file(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        _raise_if_disk_full(e, path)
        raise _output_error(path, e) from None
    size = os.fstat(fd).st_size
    data = memoryview(text.encode())
    try:
        with os.fdopen(fd, "ab", buffering=0) as f:  # unbuffered: nothing left to flush later
            try:
                while data:
                    data = data[f.write(data) or 0:]
                os.fsync(f.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fileno(), size)
                raise
    except BaseException as e:
        _raise_if_disk_full(e, path)
        raise


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV through the ``csv`` module: a field with a comma, quote or newline is quoted.

    ``None`` is written as an empty field, floats in their shortest round-trip form.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def atomic_write_csv(path: str | os.PathLike[str], header: Sequence[str],
                     rows: Iterable[Sequence[Any]]) -> None:
    """Write :func:`csv_text` of `header` and `rows` to `path` atomically."""
    atomic_write_text(path, csv_text(header, rows))


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
