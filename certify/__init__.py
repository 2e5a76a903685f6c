"""certify: provable robustness of image classifiers, and how shallow waters change it."""

from __future__ import annotations

__version__ = "0.1.0"

from certify.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from certify.data import load_dataset
from certify.errors import (
    CertifyError,
    CheckpointError,
    DatasetError,
    SoundnessError,
    SpecError,
    UnknownNameError,
    UnsupportedLayerError,
)
from certify.model_io import load_model
from certify.nets import count_parameters, create_arch
from certify.radius import certified_radii

__all__ = [
    "CertifyError",
    "CheckpointError",
    "DatasetError",
    "ModelMeta",
    "SoundnessError",
    "SpecError",
    "UnknownNameError",
    "UnsupportedLayerError",
    "__version__",
    "certified_radii",
    "count_parameters",
    "create_arch",
    "load_checkpoint",
    "load_dataset",
    "load_model",
    "save_checkpoint",
]
