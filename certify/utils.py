"""Small shared helpers: devices, dtypes, seeding."""

from __future__ import annotations

import random
from typing import Any

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


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 04 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class SampleProgress:
    """One stderr line per finished sample of a long, complete computation, with an ETA.

    For work whose every sample takes seconds to minutes (exact radii, the MILP radius search), a
    line per sample -- also in logs, where a tqdm bar stays silent -- says how far it is and, from
    the mean time per sample so far, when it will end.

    Args:
        what: What is computed, e.g. ``"exact ε"``.
        total: Samples to do in this run.
        quiet: Print nothing.
        clock: Seconds since an arbitrary start (``time.perf_counter``); tests pass a fake.
    """

    def __init__(self, what: str, total: int, *, quiet: bool = False,
                 clock: Any = None) -> None:
        import time

        self.what = what
        self.total = int(total)
        self.quiet = quiet
        self.clock = clock or time.perf_counter
        self.start = self.clock()
        self.done = 0
        self.busy = 0.0
        self._since: float | None = None
        self._timed = False

    def active(self) -> Any:
        """A context in which the time counts (only such time, once used: no other work's)."""
        import contextlib

        @contextlib.contextmanager
        def timing() -> Any:
            self._timed = True
            self._since = self.clock()
            try:
                yield
            finally:
                self.busy += self.clock() - self._since
                self._since = None

        return timing()

    def elapsed(self) -> float:
        if not self._timed:
            return self.clock() - self.start
        return self.busy + (self.clock() - self._since if self._since is not None else 0.0)

    def line(self, index: int) -> str:
        elapsed = self.elapsed()
        left = max(self.total - self.done, 0)
        eta = elapsed / self.done * left if self.done else float("nan")
        return (f"{self.what}: {self.done}/{self.total} samples (last: sample {index}), "
                f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}"
                if left else f"{self.what}: {self.done}/{self.total} samples done in "
                f"{format_duration(elapsed)}")

    def __call__(self, index: int) -> None:
        """Record that sample `index` finished and print the line."""
        import sys

        self.done += 1
        if not self.quiet:
            print(self.line(index), file=sys.stderr, flush=True)
