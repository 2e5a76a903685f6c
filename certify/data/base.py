"""Dataset registry and the in-memory image dataset every loader returns."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from certify.errors import DatasetError, unknown_name


@dataclass(frozen=True)
class DatasetInfo:
    """What a model for this dataset looks like.

    A dataset is added in one module: its ``DatasetInfo`` and loader
    (:func:`register_dataset`), and for a downloadable one its finder and official files
    (:func:`certify.data.download.register_finder`, :func:`~certify.data.download.register_files`);
    importing the module from ``certify/data/__init__.py`` makes it a choice everywhere.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    #: How messages spell it (``CIFAR-10``); default the name.
    title: str = ""


class ImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images `(N, C, H, W)` and labels `(N,)` int64 in [0, K), held in memory.

    Images may be stored as uint8 (scaled by 1/255 on access, to keep SVHN/CIFAR small) or as
    float in [0, 1]. Items and batches always come out as float32 in [0, 1].
    """

    def __init__(self, images: Tensor, labels: Tensor, info: DatasetInfo, split: str) -> None:
        if images.ndim != 4:
            raise DatasetError(
                f"{info.name}/{split}: images must be (N, C, H, W), got {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise DatasetError(
                f"{info.name}/{split}: {images.shape[0]} images but labels of shape "
                f"{tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _to_float(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            return x.to(torch.float32) / 255.0
        return x.to(torch.float32)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self._to_float(self.images[i]), self.labels[i]

    def take(self, indices: Tensor | list[int] | slice) -> tuple[Tensor, Tensor]:
        """Images `(n, C, H, W)` float32 in [0, 1] and labels `(n,)` at `indices`."""
        return self._to_float(self.images[indices]), self.labels[indices]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images as float32 in [0, 1], and all labels."""
        return self.take(slice(None))

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate over `(x, y)` batches by slicing (much faster than a DataLoader here)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield self.take(order[start : start + batch_size])

    def __repr__(self) -> str:
        shape = tuple(self.images.shape[1:])
        return f"ImageDataset({self.info.name}/{self.split}, n={len(self)}, shape={shape})"


#: Share of a training split held out for every choice (temperature, pruning ratio, ...).
VALIDATION_FRACTION = 0.1
#: The hold-out is fixed per dataset, whatever the training seed: every run validates alike.
VALIDATION_SEED = 20240


def validation_indices(labels: Tensor, fraction: float = VALIDATION_FRACTION,
                       seed: int = VALIDATION_SEED) -> tuple[Tensor, Tensor]:
    """Split sample positions into ``(fit, validation)``: a stratified, seeded hold-out.

    Each class gives ``round(fraction * its count)`` samples (at least one where it has two or
    more) to the validation part; both parts are sorted.

    Raises:
        DatasetError: `fraction` outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"the validation fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    held: list[Tensor] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        k = int(round(fraction * len(members)))
        k = max(k, 1) if len(members) >= 2 else 0
        held.append(members[torch.randperm(len(members), generator=gen)[:k]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def split_validation(data: ImageDataset, fraction: float = VALIDATION_FRACTION,
                     seed: int = VALIDATION_SEED) -> tuple[ImageDataset, ImageDataset]:
    """``(fit, validation)`` parts of a training split (see :func:`validation_indices`).

    Choices are made on the validation part, models trained on the fit part, and the test split
    stays for the final numbers only.
    """
    fit, val = validation_indices(data.labels, fraction, seed)
    return (ImageDataset(data.images[fit], data.labels[fit], data.info, f"{data.split}-fit"),
            ImageDataset(data.images[val], data.labels[val], data.info,
                         f"{data.split}-validation"))


Loader = Callable[[str, Path, bool], ImageDataset]

DATASETS: dict[str, DatasetInfo] = {}
_LOADERS: dict[str, Loader] = {}


def register_dataset(info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Decorator: register `info` with its loader ``loader(split, root, download)``."""

    def decorate(fn: Loader) -> Loader:
        DATASETS[info.name] = info
        _LOADERS[info.name] = fn
        return fn

    return decorate


def get_dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise unknown_name("dataset", name, sorted(DATASETS))
    return DATASETS[name]


def default_root() -> Path:
    """`$CERTIFY_DATA` if set, else ``./data``."""
    return Path(os.environ.get("CERTIFY_DATA", "data"))


def load_dataset(
    name: str,
    split: str = "test",
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load a dataset split as images in [0, 1], NCHW, and int64 labels.

    Args:
        name: ``svhn``, ``cifar10``, ``mnist`` or ``digits``.
        split: ``train`` or ``test`` (SVHN also ``extra``).
        root: Folder holding the files; default ``$CERTIFY_DATA`` or ``./data``. Each dataset
            looks in ``root/<name>/`` first, then in ``root`` itself.
        download: Fetch missing files (checksums verified).
    Raises:
        UnknownNameError: an unknown dataset name.
        DatasetError: missing or corrupt files, an unknown split.
    """
    info = get_dataset_info(name)
    if split not in info.splits:
        raise DatasetError(
            f"dataset '{name}' has no split '{split}'; available: {', '.join(info.splits)}."
        )
    return _LOADERS[name](split, Path(root) if root is not None else default_root(), download)
