"""Dataset files: where they are looked for, and verified downloads of the official ones.

Every file-based dataset NAME is looked for in ``root/NAME/`` first and then in ``root`` itself,
where ``root`` is ``--data-dir``, ``$CERTIFY_DATA`` or ``./data``. Downloads go to ``root/NAME/``:
each file is streamed into a temporary file beside its destination, its MD5 is compared with
the published checksum, and only then is it renamed into place. A partial or mismatching
download is deleted, so a file with an official name is either complete or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from certify._io import atomic_open, interrupts_held
from certify.errors import DatasetError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0
DEFAULT_SPLITS = ("train", "test")


@dataclass(frozen=True)
class RemoteFile:
    """One official file of a dataset.

    Attributes:
        filename: Name it has on disk, e.g. ``train_32x32.mat``.
        urls: Mirrors, tried in order.
        md5: The published MD5 checksum (hex).
        splits: The splits that need this file.
        members: For an archive, the members extracted beside it (POSIX paths inside it).
    """

    filename: str
    urls: tuple[str, ...]
    md5: str
    splits: tuple[str, ...]
    members: tuple[str, ...] = ()


#: The official files of each downloadable dataset with their published MD5 checksums, filled
#: by the dataset modules (:func:`register_files`).
RESOURCES: dict[str, tuple[RemoteFile, ...]] = {}


def register_files(name: str, files: Sequence[RemoteFile]) -> None:
    """Declare the official files of dataset `name` (what ``download_dataset`` fetches)."""
    RESOURCES[name] = tuple(files)


def _title(name: str) -> str:
    """How messages spell dataset `name` (its ``DatasetInfo.title``)."""
    from certify.data.base import DATASETS

    info = DATASETS.get(name)
    return (info.title or name) if info is not None else name

Finder = Callable[[str, Path], tuple[Path, ...]]
_FINDERS: dict[str, Finder] = {}


def register_finder(name: str) -> Callable[[Finder], Finder]:
    """Register ``finder(split, root) -> paths`` for dataset `name`.

    A finder returns the files a split is read from, or raises :class:`DatasetError` saying
    where it looked (see :func:`missing_error`).
    """

    def decorate(fn: Finder) -> Finder:
        _FINDERS[name] = fn
        return fn

    return decorate


def search_dirs(name: str, root: Path) -> tuple[Path, Path]:
    """The folders dataset `name` is looked for in, in order: ``root/name`` and ``root``."""
    return (root / name, root)


def find_first(name: str, root: Path, candidates: Sequence[str]) -> Path | None:
    """The first existing file among `candidates` (relative paths) in the search folders."""
    for folder in search_dirs(name, root):
        for candidate in candidates:
            path = folder / candidate
            if path.is_file():
                return path
    return None


def missing_error(name: str, split: str, looked_at: Iterable[Path | str],
                  expected: str) -> DatasetError:
    """The error for dataset files that are not there: where we looked and how to get them.

    Args:
        name: Dataset name, e.g. ``svhn``.
        split: The split being loaded (SVHN's ``extra`` needs its own download flag).
        looked_at: Every path that was tried.
        expected: What to put under the data folder, e.g. ``train_32x32.mat / test_32x32.mat``.
    """
    title = _title(name)
    flag = f" --split {split}" if split not in DEFAULT_SPLITS else ""
    where = ", ".join(str(p) for p in looked_at)
    return DatasetError(
        f"{title} file not found: {where}. Download with `certify data download {name}{flag}` "
        f"or put {expected} under --data-dir (or $CERTIFY_DATA)."
    )


def corrupt_error(name: str, path: Path, reason: str) -> DatasetError:
    """The error for a dataset file that exists but cannot be read as its format."""
    title = _title(name)
    return DatasetError(
        f"{title} file {path} is corrupt or not in the expected format ({reason}). "
        f"Delete it and download it again with `certify data download {name}`."
    )


def find_split_files(name: str, split: str, root: Path) -> tuple[Path, ...]:
    """The files split `split` of dataset `name` is read from.

    Raises:
        DatasetError: a file is missing (the message lists where it was looked for).
    """
    return _FINDERS[name](split, root)


def require_files(name: str, split: str, root: Path, *, download: bool,
                  quiet: bool = False) -> tuple[Path, ...]:
    """Like :func:`find_split_files`, but first downloads missing files when `download`."""
    try:
        return find_split_files(name, split, root)
    except DatasetError:
        if not download:
            raise
    download_dataset(name, root, splits=(split,), quiet=quiet)
    return find_split_files(name, split, root)


@dataclass(frozen=True)
class SplitStatus:
    """Whether a split's files are on disk (`files` empty for bundled datasets)."""

    dataset: str
    split: str
    is_present: bool
    files: tuple[Path, ...]
    note: str


def dataset_status(name: str, root: Path) -> tuple[SplitStatus, ...]:
    """For each split of dataset `name`, whether its files are present under `root`."""
    from certify.data.base import get_dataset_info

    info = get_dataset_info(name)
    if name not in _FINDERS:
        return tuple(SplitStatus(name, s, True, (), "bundled") for s in info.splits)
    status = []
    for split in info.splits:
        try:
            files = find_split_files(name, split, root)
        except DatasetError:
            status.append(SplitStatus(name, split, False, (), "missing"))
        else:
            status.append(SplitStatus(name, split, True, files, "present"))
    return tuple(status)


def md5_file(path: str | os.PathLike[str]) -> str:
    """Hex MD5 of a file, read in chunks (the checksum the datasets publish)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


Action = Literal["downloaded", "replaced", "verified", "not needed"]


@dataclass(frozen=True)
class Fetched:
    """What :func:`download_dataset` did for one official file.

    ``action`` is ``downloaded``; ``verified`` (present, checksum matches); ``replaced`` (present
    with a wrong checksum, downloaded again); or ``not needed`` (its splits are already present
    in another accepted form).
    """

    path: Path
    action: Action


def download_dataset(name: str, root: str | os.PathLike[str] | None = None, *,
                     splits: Sequence[str] | None = None,
                     quiet: bool = False) -> tuple[Fetched, ...]:
    """Download the official files of dataset `name` into ``root/name/``, checking checksums.

    Files already present are verified by MD5 instead of downloaded again; one that does not
    match is downloaded again and replaced only once the new copy verifies. A split whose data
    is already present in another accepted form (uncompressed MNIST, an extracted CIFAR-10
    folder) is left alone. Archives are extracted beside themselves.

    Args:
        name: ``svhn``, ``cifar10`` or ``mnist`` (``digits`` is bundled: nothing to do).
        root: Data folder; default ``$CERTIFY_DATA`` or ``./data``.
        splits: Splits to fetch; default train and test (SVHN's ``extra`` only on request).
        quiet: No progress bar.
    Returns:
        One :class:`Fetched` per official file the splits need (empty for bundled datasets).
    Raises:
        UnknownNameError: an unknown dataset name.
        DatasetError: an unknown split; a download that failed, was interrupted or did not
            match its checksum (the partial file is removed).
    """
    from certify.data.base import default_root, get_dataset_info

    info = get_dataset_info(name)
    root = Path(root) if root is not None else default_root()
    wanted = tuple(splits) if splits else DEFAULT_SPLITS
    for split in wanted:
        if split not in info.splits:
            raise DatasetError(f"dataset '{name}' has no split '{split}'; "
                               f"available: {', '.join(info.splits)}.")
    if name not in RESOURCES:
        return ()
    done = []
    action: Action
    for remote in RESOURCES[name]:
        needed = [s for s in remote.splits if s in wanted]
        if not needed:
            continue
        existing = find_first(name, root, [remote.filename])
        if existing is not None:
            if md5_file(existing) == remote.md5:
                path, action = existing, "verified"
            else:
                path, action = fetch_file(name, remote, existing.parent, quiet=quiet), "replaced"
        elif all(_is_present(name, s, root) for s in needed):
            done.append(Fetched(root / name / remote.filename, "not needed"))
            continue
        else:
            path, action = fetch_file(name, remote, root / name, quiet=quiet), "downloaded"
        if remote.members and (action != "verified"
                               or not all((path.parent / m).is_file() for m in remote.members)):
            safe_extract(name, path, path.parent, remote.members)
        done.append(Fetched(path, action))
    return tuple(done)


def _is_present(name: str, split: str, root: Path) -> bool:
    try:
        find_split_files(name, split, root)
    except DatasetError:
        return False
    return True


def _urlopen(url: str, timeout: float) -> IO[bytes]:
    """Open `url` for reading (tests replace this to simulate broken servers)."""
    from certify import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"certify/{__version__}"})
    return urllib.request.urlopen(request, timeout=timeout)  # type: ignore[no-any-return]


class _FailedDownload(Exception):
    """One mirror failed; the message says how."""


def fetch_file(name: str, remote: RemoteFile, folder: Path, *, quiet: bool = False) -> Path:
    """Download `remote` to ``folder/remote.filename``, verified, trying each mirror in turn.

    The bytes go to a temporary file in `folder` and are renamed over the destination only
    after the MD5 matches, so the destination is never partial.

    Args:
        name: Dataset name (for messages).
        remote: The file, its mirrors and checksum.
        folder: Destination folder (created if needed).
        quiet: No progress bar.
    Returns:
        The path of the verified file.
    Raises:
        DatasetError: every mirror failed (network error, interrupted transfer or checksum
            mismatch); nothing is left behind.
    """
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(folder, e) from None
    dest = folder / remote.filename
    failures = []
    for url in remote.urls:
        try:
            _download_verified(url, dest, remote, quiet=quiet)
        except _FailedDownload as e:
            failures.append(str(e))
        else:
            return dest
    if created:
        with contextlib.suppress(OSError):  # leave no empty folder behind
            folder.rmdir()
    raise DatasetError(
        f"could not download {_title(name)} file {remote.filename}: "
        f"{'; '.join(failures)}. Run `certify data download {name}` again, or download the "
        f"file by hand and put it at {dest}."
    )


def _unwritable(folder: Path, error: OSError) -> DatasetError:
    return DatasetError(f"cannot write to {folder}: {error.strerror or error}. Point --data-dir "
                        "(or $CERTIFY_DATA) at a writable folder.")


def _download_verified(url: str, dest: Path, remote: RemoteFile, *, quiet: bool) -> None:
    from certify.utils import progress

    tmp: Path | None = None
    try:
        try:
            with interrupts_held():  # a Ctrl-C comes once `tmp` is bound: the finally removes it
                fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part",
                                                dir=dest.parent)
                tmp = Path(tmp_name)
        except OSError as e:
            raise _unwritable(dest.parent, e) from None
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        total: int | None = None
        try:
            with os.fdopen(fd, "wb") as out, _urlopen(url, TIMEOUT_S) as response:
                length = getattr(response, "headers", {}).get("Content-Length")
                total = int(length) if length is not None and length.isdigit() else None
                with progress(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=remote.filename, quiet=quiet) as bar:
                    while block := response.read(CHUNK_BYTES):
                        out.write(block)
                        digest.update(block)
                        received += len(block)
                        bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException, ValueError) as e:
            # URLError and timeouts are OSErrors; IncompleteRead is an HTTPException.
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            if not received:
                raise _FailedDownload(f"{url}: {reason}") from None
            raise _FailedDownload(f"{url} failed after {received} bytes ({reason}); "
                                  "the partial file was removed") from None
        if total is not None and received != total:
            raise _FailedDownload(f"{url} stopped after {received} of {total} bytes "
                                  "(interrupted download); the partial file was removed")
        got = digest.hexdigest()
        if got != remote.md5:
            raise _FailedDownload(f"{url} gave a file with MD5 {got}, expected {remote.md5} "
                                  "(corrupt or changed download); it was removed")
        os.replace(tmp, dest)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _extract_member(name: str, tar: tarfile.TarFile, archive: Path, member: str,
                    target: Path) -> None:
    try:
        entry = tar.getmember(member)
    except KeyError:
        raise corrupt_error(name, archive, f"it has no member {member}") from None
    if not entry.isreg():
        raise corrupt_error(name, archive, f"member {member} is not a regular file; "
                                           "refusing to extract it")
    source = tar.extractfile(entry)
    assert source is not None  # a regular file always has data
    data = source.read()
    try:
        with atomic_open(target, "wb") as out:
            out.write(data)
    except OSError as e:
        raise DatasetError(f"cannot extract {archive} into {target.parent}: {e.strerror or e}. "
                           "Make the folder writable (and check free space), or extract the "
                           "archive there by hand.") from None


def safe_extract(name: str, archive: Path, dest: Path, members: Sequence[str]) -> list[Path]:
    """Extract exactly `members` of a tar archive into `dest`, refusing anything unsafe.

    Only the listed members are read, each must be a regular file (no links or devices), and
    each output path is built from the listed name, never from the archive, so an archive
    cannot write outside `dest` (no path traversal). Each file is written atomically.

    Args:
        name: Dataset name (for messages).
        archive: A ``.tar``/``.tar.gz`` file.
        dest: Folder to extract into.
        members: POSIX relative paths inside the archive, e.g. ``cifar-10-batches-py/test_batch``.
    Returns:
        The extracted paths, in the order of `members`.
    Raises:
        DatasetError: the archive is unreadable, lacks a member, or a member is not a regular
            file; or `dest` cannot be written.
    """
    targets = []
    for member in members:
        parts = PurePosixPath(member).parts
        if PurePosixPath(member).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"unsafe member name {member!r} in the extraction list")
        targets.append(dest.joinpath(*parts))
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member, target in zip(members, targets, strict=True):
                _extract_member(name, tar, archive, member, target)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise corrupt_error(name, archive, f"cannot read it as a tar archive: {e}") from None
    except OSError as e:  # gzip.BadGzipFile is an OSError; so is a file we may not read
        if isinstance(e, PermissionError):
            raise DatasetError(f"cannot read {archive}: {e.strerror}.") from None
        raise corrupt_error(name, archive, f"cannot read it as a tar archive: {e}") from None
    return targets
