"""Datasets: SVHN, CIFAR-10, MNIST and scikit-learn's digits, with one `load_dataset`."""

from certify.data import digits as _digits  # noqa: F401  (registers)
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
from certify.data import cifar10 as _cifar10  # noqa: F401  (registers)
from certify.data import mnist as _mnist  # noqa: F401  (registers)
from certify.data import svhn as _svhn  # noqa: F401  (registers)
