"""certify: provable robustness of image classifiers, and how shallow waters change it.

The public API is imported lazily, so ``certify --help`` does not pay for torch::

    from certify import load_model, load_dataset, certified_radii
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CertifyError": "certify.errors",
    "CheckpointError": "certify.errors",
    "DatasetError": "certify.errors",
    "SoundnessError": "certify.errors",
    "SpecError": "certify.errors",
    "UnknownNameError": "certify.errors",
    "UnsupportedLayerError": "certify.errors",
    "ModelMeta": "certify.checkpoint",
    "load_checkpoint": "certify.checkpoint",
    "save_checkpoint": "certify.checkpoint",
    "load_dataset": "certify.data",
    "load_model": "certify.model_io",
    "count_parameters": "certify.nets",
    "create_arch": "certify.nets",
    "certified_radii": "certify.radius",
    "compute_bounds": "certify.bounds",
    "margin_bounds": "certify.bounds",
    "LinfBall": "certify.spec",
    "pgd": "certify.attacks",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'certify' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
