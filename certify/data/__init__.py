"""Datasets: SVHN, CIFAR-10, MNIST and scikit-learn's digits, with one `load_dataset`."""

from certify.data.base import (
    DATASETS,
    DatasetInfo,
    ImageDataset,
    default_root,
    get_dataset_info,
    load_dataset,
    register_dataset,
    split_validation,
    validation_indices,
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageDataset",
    "default_root",
    "get_dataset_info",
    "load_dataset",
    "register_dataset",
    "split_validation",
    "validation_indices",
]

# Importing a dataset's module registers it; DATASETS keeps this order (the CLI's choices).
from certify.data import svhn as _svhn  # noqa: E402, F401, I001
from certify.data import cifar10 as _cifar10  # noqa: E402, F401
from certify.data import mnist as _mnist  # noqa: E402, F401
from certify.data import digits as _digits  # noqa: E402, F401
