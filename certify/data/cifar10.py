"""CIFAR-10: the official python version, ``cifar-10-batches-py`` or its tarball.

Each batch (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) is a Python 2 pickle of a
dict with ``b"batch_label"``, ``b"labels"`` (list of N ints in 0..9), ``b"data"`` (numpy
``(N, 3072)`` uint8: the red, green and blue 32x32 planes, each row-major) and
``b"filenames"``. Unpickling can run arbitrary code, so batches are read with an unpickler that
resolves only the numpy globals an array needs and refuses every other one.
"""

from __future__ import annotations

import pickle
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certify.data.base import DatasetInfo, ImageDataset, register_dataset
from certify.data.download import (
    RemoteFile,
    corrupt_error,
    find_first,
    missing_error,
    register_files,
    register_finder,
    require_files,
    safe_extract,
    search_dirs,
)
from certify.errors import DatasetError

# Per-channel mean and (population) standard deviation of the 50,000 train images / 255.
CIFAR10 = DatasetInfo("cifar10", 10, (3, 32, 32), mean=(0.4914, 0.4822, 0.4465),
                      std=(0.2470, 0.2435, 0.2616), splits=("train", "test"), title="CIFAR-10")
BATCH_DIR = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
MEMBERS = tuple(f"{BATCH_DIR}/{b}" for b in (*BATCHES["train"], *BATCHES["test"], "batches.meta"))
register_files("cifar10", (
    RemoteFile(ARCHIVE, ("https://www.cs.toronto.edu/~kriz/" + ARCHIVE,),
               "c58f30108f718f92721af3b95e74349a", ("train", "test"), MEMBERS),
))


@register_finder("cifar10")
def find_cifar10(split: str, root: Path) -> tuple[Path, ...]:
    """The batch files of `split`, or else the official tarball, from ``root/cifar10/`` or
    ``root``."""
    for folder in search_dirs("cifar10", root):
        paths = tuple(folder / BATCH_DIR / batch for batch in BATCHES[split])
        if all(p.is_file() for p in paths):
            return paths
    archive = find_first("cifar10", root, [ARCHIVE])
    if archive is not None:
        return (archive,)
    names = BATCHES[split]
    shown = names[0] if len(names) == 1 else f"{names[0][:-1]}{{1..{len(names)}}}"
    looked = [p for folder in search_dirs("cifar10", root)
              for p in (folder / BATCH_DIR / shown, folder / ARCHIVE)]
    raise missing_error("cifar10", split, looked, f"{BATCH_DIR}/ or {ARCHIVE}")


@lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        # The official files were pickled by numpy 1.x; numpy 2 writes numpy._core.
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referred to a global outside the allowed numpy array reconstruction."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class BatchUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: only numpy array reconstruction, nothing that runs code.

    Dicts, lists, bytes and ints need no globals; a numpy array needs exactly
    ``numpy.core.multiarray._reconstruct`` (or ``numpy._core...``), ``numpy.ndarray`` and
    ``numpy.dtype``. Any other global (``os.system``, ``builtins.eval``, ...) raises
    :class:`RefusedGlobal` before it is looked up, so nothing is imported or called.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise RefusedGlobal(module, name)
        return allowed


_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
                  IndexError, AttributeError, OverflowError, struct.error)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file with the restricted unpickler.

    Returns:
        Images `(N, 3, 32, 32)` uint8 and labels `(N,)` int64 in [0, 10).
    Raises:
        DatasetError: the pickle refers to anything but numpy array reconstruction (refused
            without running it), is damaged, or does not hold a batch dict.
    """
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise DatasetError(
            f"CIFAR-10 file {path} refers to {e.qualified}, which a CIFAR-10 batch never "
            "contains; refused to load it (unpickling it could run code). Delete it and "
            "download it again with `certify data download cifar10`."
        ) from None
    except _PICKLE_ERRORS as e:
        raise corrupt_error("cifar10", path, f"unpickling failed: {type(e).__name__}: {e}") \
            from None
    except OSError as e:
        raise DatasetError(f"cannot read CIFAR-10 file {path}: {e.strerror or e}.") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise corrupt_error("cifar10", path, f"holds {keys}, expected a dict with b'data' "
                                             "and b'labels'")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise corrupt_error("cifar10", path, f"b'data' is {got}, expected uint8 (N, 3072)")
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise corrupt_error("cifar10", path, f"b'labels' is not a list of ints: {e}") from None
    n = data.shape[0]
    if labels.shape != (n,):
        raise corrupt_error("cifar10", path, f"{labels.shape} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() > 9):
        raise corrupt_error("cifar10", path, "labels outside 0..9")
    # Each row is R, G, B planes of 32x32, row-major: exactly (3, 32, 32) in C order.
    return data.reshape(n, 3, 32, 32), labels


@register_dataset(CIFAR10)
def load_cifar10(split: str, root: Path, download: bool) -> ImageDataset:
    """CIFAR-10 `split` (train 50,000, test 10,000 images) as uint8 NCHW.

    A tarball found instead of the folder is extracted beside itself first (only the batch
    files, safely).
    """
    paths = require_files("cifar10", split, root, download=download)
    if paths[0].name == ARCHIVE:
        safe_extract("cifar10", paths[0], paths[0].parent, MEMBERS)
        paths = tuple(paths[0].parent / BATCH_DIR / b for b in BATCHES[split])
    parts = [read_batch(p) for p in paths]
    images = np.concatenate([x for x, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10, split)
