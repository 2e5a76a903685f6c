"""Writers for small dataset files in exactly the official formats.

* SVHN: MATLAB v5 ``.mat`` with ``X`` ``(32, 32, 3, N)`` uint8 and ``y`` ``(N, 1)`` in 1..10.
* CIFAR-10: Python 2 ``cPickle`` protocol-2 batches, as the official files are: byte strings as
  ``BINSTRING`` opcodes (not Python 3's ``_codecs.encode``) and numpy referenced as
  ``numpy.core.multiarray._reconstruct``; also packed as ``cifar-10-python.tar.gz``.
* MNIST: idx files (big-endian header), plain or gzipped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined, misc]
    """Pickle like Python 2's cPickle: every str/bytes is a py2 ``str`` (BINSTRING)."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle_dumps(obj: Any) -> bytes:
    out = io.BytesIO()
    _Py2Pickler(out, protocol=2).dump(obj)
    # numpy 2 names its reconstructor numpy._core; the official (numpy 1.x) files say numpy.core.
    # Protocol 2 GLOBAL opcodes are newline-terminated text, so this rewrite is exact.
    raw = out.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                                 b"cnumpy.core.multiarray\n_reconstruct\n")
    assert b"_codecs" not in raw and b"numpy._core" not in raw
    return raw


def write_svhn(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """`x` `(32, 32, 3, N)` uint8, `y` `(N, 1)` in 1..10, saved as the official .mat files."""
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"X": x, "y": y})
    return path


def cifar_batch(data: np.ndarray, labels: list[int], label: bytes) -> dict[bytes, Any]:
    return {
        b"batch_label": label,
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))],
    }


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], label: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(py2_pickle_dumps(cifar_batch(data, labels, label)))
    return path


@dataclass
class CifarFiles:
    data: dict[str, np.ndarray]  # split -> (N, 3072) uint8, in file order
    labels: dict[str, np.ndarray]  # split -> (N,) int64


def write_cifar_folder(folder: Path, rng: np.random.Generator, n: int = 3) -> CifarFiles:
    """Write ``folder/cifar-10-batches-py/`` with five train batches and a test batch."""
    batches = folder / "cifar-10-batches-py"
    out = CifarFiles({}, {})
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    for split, files in names.items():
        data, labels = [], []
        for j, name in enumerate(files):
            d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.integers(0, 10, n)]
            title = f"training batch {j + 1} of 5" if split == "train" else "testing batch 1 of 1"
            write_cifar_batch(batches / name, d, y, title.encode())
            data.append(d)
            labels.extend(y)
        out.data[split] = np.concatenate(data)
        out.labels[split] = np.array(labels, dtype=np.int64)
    meta = {b"num_cases_per_batch": n, b"label_names": [b"airplane", b"automobile", b"bird",
            b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"], b"num_vis": 3072}
    (batches / "batches.meta").write_bytes(py2_pickle_dumps(meta))
    return out


def write_cifar_tarball(folder: Path, rng: np.random.Generator, n: int = 3) -> CifarFiles:
    """Write ``folder/cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/...``."""
    staging = folder / ".staging"
    files = write_cifar_folder(staging, rng, n)
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for p in sorted((staging / "cifar-10-batches-py").iterdir()):
        p.unlink()
    (staging / "cifar-10-batches-py").rmdir()
    staging.rmdir()
    return files


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An unsigned-byte idx file; gzipped when `path` ends in ``.gz``."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.tobytes(order="C")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def write_mnist(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, *,
                gz: bool) -> tuple[Path, Path]:
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    return (write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images),
            write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels))


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture
def fmt() -> SimpleNamespace:
    """The writers above, for tests in this folder."""
    return SimpleNamespace(
        py2_pickle_dumps=py2_pickle_dumps, write_svhn=write_svhn, cifar_batch=cifar_batch,
        write_cifar_batch=write_cifar_batch, write_cifar_folder=write_cifar_folder,
        write_cifar_tarball=write_cifar_tarball, write_idx=write_idx, write_mnist=write_mnist,
        md5_bytes=md5_bytes,
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
