"""Checkpoints: plain data only, loaded with ``torch.load(weights_only=True)``.

A checkpoint is ``{"format_version": 1, "meta": {...}, "state_dict": {...}}`` holding tensors
and primitive types only. The model is rebuilt from the architecture registry; a checkpoint
never carries pickled code, so loading one from a stranger cannot run their code.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.errors import CertifyError, CheckpointError
from certify.nets import create_arch

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild and describe a model.

    Attributes:
        arch: Registry name, e.g. ``"scn"``.
        arch_kwargs: Builder options, widths included (``{"channels": [32, 32], "hidden": [100]}``).
        dataset: Dataset the model was trained for, e.g. ``"svhn"``.
        input_shape: ``(C, H, W)``.
        num_classes: K.
        mean, std: The model's in-model normalization (pixel space in, normalized inside).
        training: The recipe: ``{"command": "distill", "method": "hinton", "temperature": 2.0,
            "seed": 0, ...}``.
        parent: sha256 of the checkpoint this one was distilled/pruned/retrained from.
        metrics: Numbers only, e.g. ``{"test_accuracy": 0.97}``.
    """

    arch: str
    arch_kwargs: dict[str, Any]
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    training: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    certify_version: str = ""
    format_version: int = FORMAT_VERSION

    def with_updates(self, **changes: Any) -> ModelMeta:
        return replace(self, **changes)


def build_model(meta: ModelMeta) -> nn.Sequential:
    """A freshly initialised model of the architecture `meta` describes."""
    return create_arch(
        meta.arch,
        meta.input_shape,
        meta.num_classes,
        mean=meta.mean,
        std=meta.std,
        **meta.arch_kwargs,
    )


def _plain(obj: Any) -> Any:
    """Tuples to lists, numpy/torch scalars to Python numbers: what weights_only can load.

    Strings are interned: pickle writes a repeated string as a reference to the same object
    only, so equal metadata (e.g. of a resumed run and of an uninterrupted one) must share its
    string objects to give the same bytes.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {sys.intern(str(k)): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"checkpoint metadata must be plain data, got {type(obj).__name__}")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: ModelMeta) -> None:
    """Write `model` and `meta` to `path` atomically (temporary file, then rename).

    Under ``torchrun`` only rank 0 writes; every rank returns once the file is written (and
    raises if rank 0 could not write it).
    """
    from certify import distributed

    distributed.run_on_main(lambda: _write_checkpoint(path, model, meta))


def _write_checkpoint(path: str | os.PathLike[str], model: nn.Module, meta: ModelMeta) -> None:
    from certify import __version__
    from certify._io import atomic_open

    meta = replace(meta, certify_version=meta.certify_version or __version__)
    payload = {
        "format_version": FORMAT_VERSION,
        "meta": _plain(asdict(meta)),
        "state_dict": {sys.intern(k): v.detach().cpu().clone()
                       for k, v in model.state_dict().items()},
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw payload, loaded safely; every failure is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}. Check the path, or train one with `certify train`."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} contains pickled code or objects and was refused (it could run code "
                "on load). Only certify checkpoints with plain data are loaded; re-save the "
                "model with save_checkpoint."
            ) from None
        raise _unreadable(path) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        AttributeError,
        TypeError,
        struct.error,
    ):
        raise _unreadable(path) from None
    if not isinstance(payload, dict) or "meta" not in payload or "state_dict" not in payload:
        raise CheckpointError(
            f"{path} is a torch file but not a certify checkpoint (no 'meta'/'state_dict'). "
            "Save models with certify.save_checkpoint."
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was saved with format_version {version}; this certify understands "
            f"<= {FORMAT_VERSION}. Upgrade certify."
        )
    return payload


def _unreadable(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint (corrupt, truncated, or not a torch "
        "file). Re-create it with `certify train` or save_checkpoint."
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def meta_from_dict(d: dict[str, Any], path: str | os.PathLike[str] = "checkpoint") -> ModelMeta:
    try:
        return ModelMeta(
            arch=str(d["arch"]),
            arch_kwargs=dict(d.get("arch_kwargs", {})),
            dataset=str(d["dataset"]),
            input_shape=tuple(int(s) for s in d["input_shape"]),  # type: ignore[arg-type]
            num_classes=int(d["num_classes"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            training=dict(d.get("training", {})),
            parent=d.get("parent"),
            metrics=dict(d.get("metrics", {})),
            certify_version=str(d.get("certify_version", "")),
            format_version=int(d.get("format_version", FORMAT_VERSION)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: metadata is incomplete or malformed ({e!r}). Re-save the checkpoint."
        ) from None


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Sequential, ModelMeta]:
    """Load a checkpoint safely and rebuild its model in eval mode.

    Returns:
        ``(model, meta)``; the model is on `device` and in ``eval()`` mode.
    Raises:
        CheckpointError: missing, corrupt, truncated, newer-format, code-carrying, or weights
            that do not fit the recorded architecture.
    """
    payload = read_checkpoint(path)
    meta = meta_from_dict(payload["meta"], path)
    try:
        model = build_model(meta)
    except CertifyError as e:
        raise CheckpointError(f"{path}: cannot rebuild its architecture: {e}") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: weights do not fit architecture '{meta.arch}' "
            f"{meta.arch_kwargs}: {_first_line(e)}"
        ) from None
    from certify.model_io import check_finite_weights

    check_finite_weights(model, path)
    return model.to(device).eval(), meta


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    from certify._io import sha256_file

    return sha256_file(path)
