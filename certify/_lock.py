"""Exclusive locks on a run's output, so that two runs never write into the same place.

A run folder (``certify area -o DIR``, ``experiment``, ``attack``, ``compare``) is locked by
``DIR/.certify.lock``; a file output (a checkpoint ``models/x.pt``) by ``models/.x.pt.lock``
beside it. The lock is an ``flock`` on that file, held for the life of the run: the kernel
releases it when the process ends, however it ends (a crash, ``kill -9``). The file also records
the holder (pid, host, command, start time), which names it when a second run is refused, and
tells a stale lock where ``flock`` cannot (a file system without it, another host):

* a lock file whose ``flock`` is free was left by a run that is gone: it is taken over;
* without ``flock``, a holder on this host whose pid is no longer running is gone: taken over;
* a holder recorded on another host is refused (its pid cannot be checked from here) with the
  message to delete the lock file if that run is over.

Under ``torchrun`` only rank 0 takes the lock (:func:`hold_output`); a refusal stops every rank.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from certify.errors import DiskFullError, RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the pid/host record alone decides
    fcntl = None  # type: ignore[assignment]

FOLDER_LOCK = ".certify.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock: read from the lock file."""

    pid: int
    host: str
    command: str
    started: str

    def describe(self) -> str:
        return f"`certify {self.command}`, pid {self.pid} on {self.host}, since {self.started}"


def lock_path(target: str | os.PathLike[str], *, folder: bool) -> Path:
    """The lock file of an output: ``DIR/.certify.lock`` for a folder, ``.NAME.lock`` beside a
    file."""
    target = Path(target)
    return target / FOLDER_LOCK if folder else target.with_name(f".{target.name}.lock")


def _this_host() -> str:
    return socket.gethostname()


def _read_holder(fd: int) -> LockHolder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        d = json.loads(raw.decode())
        return LockHolder(int(d["pid"]), str(d["host"]), str(d["command"]), str(d["started"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None  # empty (being written, or released) or not ours: no live holder named


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _refuse(target: Path, lock: Path, holder: LockHolder | None, *, other_host: bool) -> None:
    who = holder.describe() if holder is not None else "another certify run"
    if other_host:
        raise RunLockedError(f"{target} is locked by {who}; wait for it to finish or use another "
                             f"output. If that run is over, delete {lock} and rerun")
    raise RunLockedError(f"{target} is in use by {who}; wait for it to finish or use another "
                         "output")


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by another open file; None: this file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _acquire(target: Path, lock: Path, command: str) -> int:
    """Open and lock `lock`, write this process as its holder; return the descriptor."""
    for _ in range(10):  # retried only when a releasing run removed the file under us
        fd = _open_lock_file(target, lock)
        try:
            locked = _try_flock(fd)
            holder = _read_holder(fd)
            if locked is False:
                _refuse(target, lock, holder, other_host=False)
            if not _same_file(fd, lock):
                os.close(fd)
                continue
            if holder is not None and holder.pid != os.getpid():
                if holder.host != _this_host():
                    _refuse(target, lock, holder, other_host=True)
                if locked is None and _is_running(holder.pid):
                    _refuse(target, lock, holder, other_host=False)
            # free, or a stale record (its run is gone): this run holds it now
            record = {"pid": os.getpid(), "host": _this_host(), "command": command,
                      "started": _dt.datetime.now().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise RunLockedError(f"could not lock {target}: {lock} keeps being replaced; is another "
                         "certify run starting there?")


def _open_lock_file(target: Path, lock: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        from certify._io import disk_full_cause

        if disk_full_cause(e) is not None:
            raise DiskFullError(f"no space left on the device for the lock of {target} "
                                f"({e.strerror})") from None
        raise RunLockedError(f"cannot lock {target}: {e.strerror} ({e.filename}); write the "
                             "output to a folder you can write to") from None


def _release(fd: int, lock: Path) -> None:
    try:
        if _same_file(fd, lock):
            lock.unlink(missing_ok=True)  # still holding the flock: no one else owns it yet
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(target: str | os.PathLike[str], *, command: str,
             folder: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of the output `target` for the ``with`` block.

    Args:
        target: A run folder, or an output file (see :func:`lock_path`).
        command: The command holding it, named to a refused run (e.g. ``area``).
        folder: Whether `target` is a folder (else a file).
    Yields:
        The lock file (removed when the block ends).
    Raises:
        RunLockedError: another live run holds it (the message names it and what to do).
    """
    target = Path(target)
    lock = lock_path(target, folder=folder)
    fd = _acquire(target, lock, command)
    try:
        yield lock
    finally:
        _release(fd, lock)


@contextlib.contextmanager
def hold_output(target: str | os.PathLike[str], *, command: str,
                folder: bool = True) -> Iterator[None]:
    """Lock `target` for a command's run and remove temporary files a killed run left there.

    Under ``torchrun`` rank 0 takes the lock and cleans; a refusal is raised on every rank.
    """
    from certify import distributed
    from certify._io import remove_stale_temporaries

    distributed.init_from_env()
    with contextlib.ExitStack() as held:

        def take() -> None:
            held.enter_context(run_lock(target, command=command, folder=folder))
            remove_stale_temporaries(target, folder=folder)

        distributed.run_on_main(take)
        yield
