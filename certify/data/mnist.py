"""MNIST: the official idx files, gzipped or not.

An idx file starts with a 4-byte magic number: two zero bytes, a type code (``0x08`` for
unsigned bytes) and the number of dimensions; then each dimension as a big-endian uint32; then
the data in row-major order. Images are ``0x00000803`` (N, 28, 28), labels ``0x00000801`` (N,).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

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
    search_dirs,
)
from certify.errors import DatasetError

MNIST = DatasetInfo("mnist", 10, (1, 28, 28), mean=(0.1307,), std=(0.3081,),
                    splits=("train", "test"), title="MNIST")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UBYTE = 0x08
# yann.lecun.com often refuses scripted downloads; the S3 mirror serves the same bytes.
URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
register_files("mnist", tuple(
    RemoteFile(f"{stem}.gz", tuple(f"{url}{stem}.gz" for url in URLS), md5, (split,))
    for split, stem, md5 in (
        ("train", FILES["train"][0], "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        ("train", FILES["train"][1], "d53e105ee54ea40749a09fcbcd1e9432"),
        ("test", FILES["test"][0], "9fb629c4189551a2d022fa330f9573f3"),
        ("test", FILES["test"][1], "ec29112dd5afa0611ce80d1b7f02629c"),
    )
))


@register_finder("mnist")
def find_mnist(split: str, root: Path) -> tuple[Path, ...]:
    """The images and labels files of `split` (each plain or ``.gz``), from ``root/mnist/`` or
    ``root``."""
    found = []
    missing = []
    for base in FILES[split]:
        path = find_first("mnist", root, [base, base + ".gz"])
        if path is None:
            missing.extend(f"{folder / base}[.gz]" for folder in search_dirs("mnist", root))
        found.append(path)
    if missing:
        expected = " / ".join(f"{b}[.gz]" for name in ("train", "test") for b in FILES[name])
        raise missing_error("mnist", split, missing, expected)
    return tuple(p for p in found if p is not None)


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (gzipped when the name ends in ``.gz``).

    Args:
        path: The file.
        ndim: Number of dimensions the header must declare (3 for images, 1 for labels).
    Returns:
        A uint8 array of the shape the header declares.
    Raises:
        DatasetError: the file cannot be read, the magic number is not ``0x000008`` followed
            by `ndim`, or the data size does not match the header exactly.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise corrupt_error("mnist", path, f"bad gzip data: {e}") from None
    except OSError as e:
        raise DatasetError(f"cannot read MNIST file {path}: {e.strerror or e}.") from None
    expected_magic = (UBYTE << 8) | ndim
    header_size = 4 + 4 * ndim
    if len(raw) < 4:
        raise corrupt_error("mnist", path, f"{len(raw)} bytes, shorter than an idx header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise corrupt_error("mnist", path, f"magic number 0x{magic:08X}, expected "
                                           f"0x{expected_magic:08X} (unsigned bytes, {ndim} dims)")
    if len(raw) < header_size:
        raise corrupt_error("mnist", path, f"{len(raw)} bytes, shorter than its "
                                           f"{header_size}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape, dtype=np.int64))
    have = len(raw) - header_size
    if have != size:
        raise corrupt_error("mnist", path, f"the header declares shape {shape} = {size} bytes "
                                           f"of data but the file holds {have}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def read_mnist(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a pair of MNIST idx files.

    Returns:
        Images `(N, 1, 28, 28)` uint8 and labels `(N,)` int64 in [0, 10).
    Raises:
        DatasetError: a corrupt file, images that are not 28x28, counts that disagree, or
            labels outside 0..9.
    """
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise corrupt_error("mnist", images_path, f"images of size {images.shape[1:]}, "
                                                  "expected (28, 28)")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"MNIST files disagree: {images_path} has {images.shape[0]} images "
                           f"but {labels_path} has {labels.shape[0]} labels. Delete both and "
                           "download them again with `certify data download mnist`.")
    if labels.size and labels.max() > 9:
        raise corrupt_error("mnist", labels_path, f"label {int(labels.max())}, expected 0..9")
    return images[:, None, :, :].copy(), labels.astype(np.int64)


@register_dataset(MNIST)
def load_mnist(split: str, root: Path, download: bool) -> ImageDataset:
    """MNIST `split` (train 60,000, test 10,000 images) as uint8 NCHW."""
    images_path, labels_path = require_files("mnist", split, root, download=download)
    images, labels = read_mnist(images_path, labels_path)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), MNIST, split)
