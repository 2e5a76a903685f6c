"""Does a checkpoint fit a dataset? One check shared by every command that runs a model on data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from certify.errors import DatasetError

if TYPE_CHECKING:
    from certify.checkpoint import ModelMeta
    from certify.data import DatasetInfo


def check_compatible(meta: ModelMeta, info: DatasetInfo, *, model_name: str = "the model",
                     strict: bool = False) -> None:
    """Raise a one-line :class:`DatasetError` unless the model can run on the dataset.

    A model fits a dataset of its input shape and number of classes. With ``strict`` it must
    also have been trained on that very dataset (distillation, fine-tuning: a teacher for
    CIFAR-10 cannot teach an SVHN student even though both are 3x32x32).

    Args:
        meta: The checkpoint's metadata.
        info: The dataset to run on, from ``certify.data.get_dataset_info``.
        model_name: How to call the model in the message, e.g. its file name.
        strict: Also require ``meta.dataset == info.name``.
    Raises:
        DatasetError: e.g. ``model.pt expects input (1, 8, 8) (digits) but svhn has
            (3, 32, 32); pick --dataset digits``.
    """
    shape = tuple(int(s) for s in meta.input_shape)
    if shape != tuple(info.input_shape):
        raise DatasetError(f"{model_name} expects input {shape} ({meta.dataset}) but {info.name} "
                           f"has {tuple(info.input_shape)}; pick --dataset {meta.dataset}.")
    if meta.num_classes != info.num_classes:
        raise DatasetError(f"{model_name} has {meta.num_classes} classes ({meta.dataset}) but "
                           f"{info.name} has {info.num_classes}; pick --dataset {meta.dataset}.")
    if strict and meta.dataset != info.name:
        raise DatasetError(f"{model_name} was trained on {meta.dataset}, not {info.name}; pick "
                           f"--dataset {meta.dataset} or a model trained on {info.name}.")
