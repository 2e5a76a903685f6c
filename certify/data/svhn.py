"""SVHN (Street View House Numbers), cropped digits: the official ``*_32x32.mat`` files.

In each file ``X`` is ``(32, 32, 3, N)`` uint8 (height, width, channel, sample) and ``y`` is
``(N, 1)`` with values 1..10, where 10 means the digit 0.
"""

from __future__ import annotations

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

# Per-channel mean and standard deviation of the train split's pixels / 255 (73,257 images),
# the values commonly published for SVHN; not recomputed here.
SVHN = DatasetInfo("svhn", 10, (3, 32, 32), mean=(0.4377, 0.4438, 0.4728),
                   std=(0.1980, 0.2010, 0.1970), splits=("train", "test", "extra"), title="SVHN")
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
URL = "http://ufldl.stanford.edu/housenumbers/"
register_files("svhn", (
    RemoteFile(FILES["train"], (URL + FILES["train"],), "e26dedcc434d2e4c54c9b2d4a06d8373",
               ("train",)),
    RemoteFile(FILES["test"], (URL + FILES["test"],), "eb5a983be6a315427106f1b164d9cef3",
               ("test",)),
    RemoteFile(FILES["extra"], (URL + FILES["extra"],), "a93ce644f1a588dc4d68dda5feec44a7",
               ("extra",)),
))


@register_finder("svhn")
def find_svhn(split: str, root: Path) -> tuple[Path, ...]:
    """The ``.mat`` file of `split`, from ``root/svhn/`` or ``root``."""
    path = find_first("svhn", root, [FILES[split]])
    if path is None:
        looked = [folder / FILES[split] for folder in search_dirs("svhn", root)]
        expected = "train_32x32.mat / test_32x32.mat" if split != "extra" else FILES[split]
        raise missing_error("svhn", split, looked, expected)
    return (path,)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an official SVHN ``.mat`` file.

    Args:
        path: A MATLAB v5 file holding ``X`` `(32, 32, 3, N)` uint8 and ``y`` `(N, 1)` in 1..10.
    Returns:
        Images `(N, 3, 32, 32)` uint8 (C-contiguous) and labels `(N,)` int64 in [0, 10), with
        label 10 mapped to the digit 0.
    Raises:
        DatasetError: the file cannot be read or does not hold arrays of these shapes.
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except (PermissionError, IsADirectoryError) as e:
        raise DatasetError(f"cannot read SVHN file {path}: {e.strerror}.") from None
    except NotImplementedError:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise corrupt_error("svhn", path, "a MATLAB v7.3 file; the official files are v5") from None
    except (MatReadError, OSError, ValueError, TypeError) as e:
        # truncated files raise OSError("could not read bytes"), garbage raises ValueError
        raise corrupt_error("svhn", path, f"scipy.io.loadmat: {e}") from None
    if "X" not in mat or "y" not in mat:
        raise corrupt_error("svhn", path, f"variables {sorted(k for k in mat if k[0] != '_')}, "
                                          "expected X and y")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise corrupt_error("svhn", path, f"X is {x.dtype} of shape {x.shape}, "
                                          "expected uint8 of shape (32, 32, 3, N)")
    n = x.shape[3]
    if y.shape not in ((n, 1), (n,)):
        raise corrupt_error("svhn", path, f"y has shape {y.shape} for {n} images, "
                                          f"expected ({n}, 1)")
    labels = y.reshape(n)
    if labels.dtype.kind not in "uif" or not np.all((labels >= 1) & (labels <= 10)) \
            or not np.all(labels == np.round(labels)):
        raise corrupt_error("svhn", path, "y must hold the integers 1..10 (10 meaning digit 0)")
    # (H, W, C, N) -> (N, C, H, W)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, labels.astype(np.int64) % 10


@register_dataset(SVHN)
def load_svhn(split: str, root: Path, download: bool) -> ImageDataset:
    """SVHN `split` (train 73,257, test 26,032, extra 531,131 images) as uint8 NCHW."""
    (path,) = require_files("svhn", split, root, download=download)
    images, labels = read_svhn_mat(path)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), SVHN, split)
