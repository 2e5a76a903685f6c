"""One way to load a model for every command: a certify checkpoint or an ONNX network."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from certify.checkpoint import ModelMeta
from certify.errors import CheckpointError, SpecError

__all__ = ["MODEL_SUFFIXES", "check_finite_outputs", "check_finite_weights", "load_model",
           "require_checkpoint", "resolve_dataset"]

#: File endings :func:`load_model` understands.
MODEL_SUFFIXES = (".pt", ".pth", ".onnx", ".onnx.gz")


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset: str | None = None,
) -> tuple[nn.Sequential, ModelMeta]:
    """Load a model by its file ending: ``.pt``/``.pth`` checkpoint or ``.onnx``/``.onnx.gz``.

    A checkpoint says everything about itself; the options must then agree with it. An ONNX
    file may leave things out: ``input_shape`` gives the per-sample shape ``(C, H, W)`` (the
    dataset's shape is used for a flat or unknown input of the same size), and ``mean``/``std``
    add the input normalization as a first :class:`~certify.nets.Normalize` layer when the file
    does not normalize (models always take pixels in [0, 1]).

    Args:
        path: The model file.
        device: Where the model goes.
        input_shape: ``(C, H, W)`` of one input.
        mean: Per-channel (or one) mean of the normalization the network expects.
        std: Per-channel (or one) std, all > 0.
        dataset: Dataset name recorded for an ONNX model (``"unknown"`` when not given).
    Returns:
        ``(model, meta)`` with the model on `device` in ``eval()`` mode.
    Raises:
        CheckpointError: unknown file type, missing or unreadable file.
        SpecError: options that disagree with the file or with each other.
        UnsupportedLayerError: an ONNX network the bound engine can not take.
    """
    path = Path(path)
    name = path.name.lower()
    if (mean is None) != (std is None):
        raise SpecError("give both --mean and --std (the input normalization), or neither.")
    if name.endswith((".pt", ".pth")):
        from certify.checkpoint import load_checkpoint

        model, meta = load_checkpoint(path, device=device)
        _check_agrees(path, meta, input_shape, mean, std)
        return model, meta
    if name.endswith((".onnx", ".onnx.gz")):
        return _load_onnx(path, device=device, input_shape=input_shape, mean=mean, std=std,
                          dataset=dataset)
    raise CheckpointError(f"unknown model file type: {path.name}; expected a certify checkpoint "
                          "(.pt) or an ONNX network (.onnx, .onnx.gz).")


def _check_agrees(path: Path, meta: ModelMeta, input_shape: Sequence[int] | None,
                  mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    if input_shape is not None and tuple(int(v) for v in input_shape) != tuple(meta.input_shape):
        raise SpecError(f"{path.name} takes inputs of shape {tuple(meta.input_shape)}, not "
                        f"--input-shape {tuple(input_shape)}; drop the option for checkpoints.")
    if mean is not None and std is not None:
        channels = len(meta.mean)
        if not (_close(_per_channel(mean, channels, "mean"), meta.mean)
                and _close(_per_channel(std, channels, "std"), meta.std)):
            raise SpecError(f"{path.name} normalizes with mean={list(meta.mean)} "
                            f"std={list(meta.std)}, not the --mean/--std given; drop the options "
                            "for checkpoints.")


def _load_onnx(path: Path, *, device: str | torch.device, input_shape: Sequence[int] | None,
               mean: Sequence[float] | None, std: Sequence[float] | None,
               dataset: str | None) -> tuple[nn.Sequential, ModelMeta]:
    import numpy as np

    from certify.nets import Normalize
    from certify.onnx_import import import_onnx, onnx_input_dims, read_onnx

    proto = read_onnx(path)
    shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
    if shape is None and dataset is not None:
        from certify.data import DATASETS

        info = DATASETS.get(dataset)
        dims = onnx_input_dims(proto)
        flat_fits = dims is not None and len(dims) == 1 and dims[0] in (
            None, int(np.prod(info.input_shape)) if info is not None else -1)
        unknown_image = dims is not None and len(dims) == 3 and None in dims
        if info is not None and (flat_fits or unknown_image):
            shape = tuple(info.input_shape)
    model, meta = import_onnx(proto, input_shape=shape, dataset=dataset, source=path.name)
    check_finite_weights(model, path)
    if mean is not None and std is not None:
        channels = meta.input_shape[0]
        mean_c = _per_channel(mean, channels, "mean")
        std_c = _per_channel(std, channels, "std")
        if any(s <= 0 for s in std_c):
            raise SpecError(f"--std must be > 0 in every channel, got {list(std)}.")
        if isinstance(model[0], Normalize):
            if not (_close(mean_c, meta.mean) and _close(std_c, meta.std)):
                raise SpecError(f"{path.name} already normalizes its input with "
                                f"mean={list(meta.mean)} std={list(meta.std)}; drop --mean/--std.")
        else:
            layers = OrderedDict([("norm", Normalize(mean_c, std_c)), *model.named_children()])
            model = nn.Sequential(layers).eval()
            meta = meta.with_updates(mean=mean_c, std=std_c)
    return model.to(device).eval(), meta


def resolve_dataset(dataset: str | None, meta: ModelMeta, path: str | os.PathLike[str]) -> str:
    """`dataset` if given, else the one the model file records; one line when neither is known.

    Raises:
        SpecError: no `dataset` and the file records none certify knows (an ONNX network).
    """
    from certify.data import DATASETS

    if dataset is not None:
        return dataset
    if meta.dataset not in DATASETS:
        raise SpecError(f"{Path(path).name} does not record a known dataset ({meta.dataset!r}); "
                        f"pass --dataset NAME ({', '.join(DATASETS)}).")
    return meta.dataset


def require_checkpoint(path: str | os.PathLike[str], command: str) -> None:
    """Refuse an ONNX network for a command that re-builds the architecture it writes.

    Raises:
        SpecError: `path` is an ONNX file.
    """
    if Path(path).name.lower().endswith((".onnx", ".onnx.gz")):
        raise SpecError(f"{command} writes a certify checkpoint of the same architecture, which "
                        f"an ONNX network ({Path(path).name}) does not have; {command} the "
                        "checkpoint it was exported from, or distill it into a student first "
                        "(certify distill NET.onnx --student ...).")


def check_finite_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Refuse a model whose weights hold NaN or infinity: its every output would be nonsense.

    Raises:
        CheckpointError: naming the first non-finite tensor.
    """
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(tensor.isnan().any()) else "infinite values"
            raise CheckpointError(f"{Path(path).name}: weights '{name}' hold {bad}; the model "
                                  "is broken (diverged training?). Re-train or re-export it.")


def check_finite_outputs(model: nn.Module, x: torch.Tensor, name: str) -> None:
    """Refuse a model whose outputs (logits) on the batch `x` are NaN or infinite.

    Raises:
        SpecError: the model overflows on real inputs; no bound or attack on it means anything.
    """
    with torch.no_grad():
        out = model(x)
    if not bool(torch.isfinite(out).all()):
        raise SpecError(f"{name} gives NaN or infinite logits on the data (its weights overflow "
                        "the model's precision); re-train it, or try --dtype float64.")


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise SpecError(f"--{what} has {len(values)} values but the model input has {channels} "
                        "channels; give one value per channel, or one for all.")
    return values


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in
                                    zip(a, b, strict=True))
