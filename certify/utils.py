"""Small shared helpers: devices, dtypes, seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from certify.errors import SpecError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpecError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            f"device '{name}' requested but no CUDA GPU is available; use --device cpu."
        )
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SpecError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch (CLI only; the library takes explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable=None, *, quiet: bool = False, **kwargs):  # type: ignore[no-untyped-def]
    """A tqdm bar on stderr when stderr is a terminal; silent in logs, CI, or with `quiet`."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        iterable, disable=True if quiet else None, file=sys.stderr, dynamic_ncols=True, **kwargs
    )
