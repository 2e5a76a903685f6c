"""Standard training (cross-entropy, optionally at a temperature) and clean evaluation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.checkpoint import ModelMeta
from certify.train.loops import (
    TemperatureCrossEntropy,
    TrainConfig,
    TrainResult,
    count_correct,
    cross_entropy_loss,
    discard_train_state,
    partial_path,
    train,
)


@dataclass(frozen=True)
class TrainedModel:
    """A model a recipe produced, its metadata, how training went, and where it was saved."""

    model: nn.Sequential
    meta: ModelMeta
    result: TrainResult
    path: Path | None


@dataclass(frozen=True)
class EvalResult:
    """Clean accuracy of a checkpoint on one dataset split."""

    model: str
    dataset: str
    split: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def init_model(arch: str, input_shape: Sequence[int], num_classes: int, *,
               mean: Sequence[float], std: Sequence[float], seed: int,
               arch_kwargs: dict[str, Any] | None = None
               ) -> tuple[nn.Sequential, str, dict[str, Any]]:
    """Build `arch` with weights initialised from `seed`, leaving the global RNG untouched.

    Args:
        arch: A registry name, optionally with widths (``scn-32-32``).
        input_shape: ``(C, H, W)``.
        num_classes: K.
        mean, std: The model's in-model normalization.
        seed: Seeds the initialisation.
        arch_kwargs: Builder options that override the name's (``{"hidden": [64]}``).
    Returns:
        ``(model, base_name, kwargs)`` where ``kwargs`` (widths included) rebuild the model via
        ``certify.checkpoint.build_model``.
    Raises:
        UnknownNameError: an unknown architecture (with suggestions).
        SpecError: options the architecture does not take, or an input too small for it.
    """
    from certify.nets import arch_kwargs_of, create_arch, parse_arch

    base, kwargs = parse_arch(arch)
    kwargs.update(arch_kwargs or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_arch(base, input_shape, num_classes, mean=mean, std=std, **kwargs)
    return model, base, {**kwargs, **arch_kwargs_of(model)}


def train_standard(arch: str, dataset: str, config: TrainConfig, *,
                   output: str | os.PathLike[str] | None = None,
                   arch_kwargs: dict[str, Any] | None = None, temperature: float = 1.0,
                   data_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                   quiet: bool = False) -> TrainedModel:
    """Train `arch` on `dataset` with cross-entropy and save the checkpoint.

    With ``temperature`` T != 1 the loss is the cross-entropy of ``softmax(z / T)`` (the
    teacher of Papernot et al.'s defensive distillation); the saved model outputs ``z``.

    Args:
        arch: Architecture, e.g. ``mlp``, ``scn-32-32``, ``svhn-teacher``.
        dataset: Dataset name; its ``train`` split trains, its ``test`` split evaluates.
        config: The training recipe.
        output: Checkpoint path (written atomically, with ``<output>.partial`` kept for
            ``resume`` while training); ``None`` to not save.
        arch_kwargs: Builder options overriding the name's, e.g. ``{"hidden": [64]}``.
        temperature: Training temperature T > 0.
        data_dir: Where the dataset files are.
        resume: Continue an interrupted run from ``<output>.partial``.
        quiet: No progress output.
    Returns:
        The trained model (eval mode), its metadata (recipe and test accuracy) and the path.
    Raises:
        UnknownNameError, SpecError: bad architecture or options.
        DatasetError: missing data files.
    """
    from certify.checkpoint import save_checkpoint
    from certify.data import get_dataset_info, load_dataset

    info = get_dataset_info(dataset)
    loss_fn = cross_entropy_loss if temperature == 1.0 else TemperatureCrossEntropy(temperature)
    model, base, kwargs = init_model(arch, info.input_shape, info.num_classes, mean=info.mean,
                                     std=info.std, seed=config.seed, arch_kwargs=arch_kwargs)
    train_set = load_dataset(dataset, "train", data_dir)
    test_set = load_dataset(dataset, "test", data_dir)
    state = partial_path(output) if output is not None else None
    result = train(model, train_set, test_set, config, loss_fn, state_path=state, resume=resume,
                   tag="train", quiet=quiet)
    recipe = {"command": "train", "method": "standard", "temperature": float(temperature),
              **config.to_dict(), "train_samples": len(train_set)}
    metrics = {}
    if result.test_accuracy is not None:
        metrics["test_accuracy"] = float(result.test_accuracy)
    meta = ModelMeta(base, kwargs, info.name, info.input_shape, info.num_classes, info.mean,
                     info.std, training=recipe, metrics=metrics)
    model.cpu()
    if output is not None:
        save_checkpoint(output, model, meta)
        discard_train_state(state)
    return TrainedModel(model, meta, result, Path(output) if output is not None else None)


def evaluate_checkpoint(path: str | os.PathLike[str], *, dataset: str | None = None,
                        split: str = "test", data_dir: str | os.PathLike[str] | None = None,
                        batch_size: int = 512, device: str = "cpu") -> EvalResult:
    """Clean accuracy of the checkpoint at `path` on a dataset split.

    Args:
        path: A certify checkpoint or an ONNX network.
        dataset: Dataset name; default the one the model was trained on (an ONNX network
            needs it).
        split: ``test``, ``train`` (or ``extra`` for SVHN).
        data_dir: Where the dataset files are.
        batch_size: Samples per forward pass.
        device: Where to run.
    Raises:
        CheckpointError: not a readable checkpoint.
        DatasetError: missing data, or a dataset of another input shape or class count.
    """
    from certify.compat import check_compatible
    from certify.data import get_dataset_info, load_dataset
    from certify.model_io import load_model, resolve_dataset
    from certify.utils import resolve_device

    model, meta = load_model(path, device=resolve_device(device), dataset=dataset)
    info = get_dataset_info(resolve_dataset(dataset, meta, path))
    check_compatible(meta, info, model_name=Path(path).name)
    data = load_dataset(info.name, split, data_dir)
    correct = count_correct(model, data, batch_size=batch_size)
    return EvalResult(str(path), info.name, split, correct, len(data))
