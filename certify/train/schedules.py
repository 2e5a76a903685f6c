"""Schedules that depend on training progress, e.g. the eps ramp of robust training.

Wong & Kolter (2018) and IBP-style training start at a small eps and raise it to the target
over the first epochs; a loss function reads the current value from the loop's
:class:`certify.train.loops.Step`::

    schedule = EpsSchedule(final=0.01, start=0.001, ramp_epochs=5)
    def loss_fn(model, x, y, epoch, step):
        eps = schedule.at(step)
        ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from certify.errors import SpecError
from certify.train.loops import Step


@dataclass(frozen=True)
class EpsSchedule:
    """Eps held at `start` for `warmup_epochs`, then raised linearly to `final` over
    `ramp_epochs`, then held at `final`. Epochs are counted as floats, so the ramp moves
    every step.

    Attributes:
        final: The target eps (>= 0).
        start: The eps at the beginning (0 <= start <= final).
        ramp_epochs: Length of the linear ramp in epochs (0: jump to `final`).
        warmup_epochs: Epochs at `start` before the ramp begins.
    """

    final: float
    start: float = 0.0
    ramp_epochs: float = 0.0
    warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        values = (self.final, self.start, self.ramp_epochs, self.warmup_epochs)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise SpecError(f"eps schedule values must be finite and >= 0, got final={self.final}, "
                            f"start={self.start}, ramp_epochs={self.ramp_epochs}, "
                            f"warmup_epochs={self.warmup_epochs}.")
        if self.start > self.final:
            raise SpecError(f"the eps ramp starts at {self.start} above its final value "
                            f"{self.final}; use start <= final.")

    def value(self, epochs_done: float) -> float:
        """The eps after `epochs_done` epochs (a float, e.g. 2.5)."""
        t = epochs_done - self.warmup_epochs
        if t < 0:
            return self.start
        if self.ramp_epochs == 0 or t >= self.ramp_epochs:
            return self.final
        return self.start + (self.final - self.start) * t / self.ramp_epochs

    def fraction(self, epochs_done: float) -> float:
        """How far the ramp is after `epochs_done` epochs: 0 before it, 1 after it, linear in
        between (e.g. to move another weight, such as CROWN-IBP's kappa, along with eps)."""
        t = epochs_done - self.warmup_epochs
        if t < 0:
            return 0.0
        if self.ramp_epochs == 0 or t >= self.ramp_epochs:
            return 1.0
        return t / self.ramp_epochs

    def to_dict(self) -> dict[str, float]:
        """The schedule as plain data, for checkpoint provenance."""
        return {"eps": self.final, "eps_start": self.start, "eps_ramp_epochs": self.ramp_epochs,
                "eps_warmup_epochs": self.warmup_epochs}

    def at(self, step: Step) -> float:
        """The eps for the loop's current `step`."""
        return self.value(step.epoch_progress)
