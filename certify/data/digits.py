"""scikit-learn's bundled 8x8 digits: real data that works offline, the default for demos."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from certify.data.base import DatasetInfo, ImageDataset, register_dataset

# Computed on the train split below (pixels / 16).
DIGITS = DatasetInfo(
    "digits", 10, (1, 8, 8), mean=(0.3052,), std=(0.3760,), splits=("train", "test")
)
TEST_FRACTION = 0.25
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    return tuple(
        train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    )


@register_dataset(DIGITS)
def load_digits(split: str, root: Path, download: bool) -> ImageDataset:
    """1797 images, a fixed stratified 75/25 train/test split (1347/450), pixels / 16."""
    x_train, x_test, y_train, y_test = _split()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return ImageDataset(torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), DIGITS, split)
