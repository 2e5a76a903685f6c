"""The eps ramp that robust losses read from the loop's Step."""

from __future__ import annotations

import pytest
import torch

from certify.errors import SpecError
from certify.train.loops import Step
from certify.train.schedules import EpsSchedule


def test_warmup_ramp_hold():
    s = EpsSchedule(final=0.01, start=0.002, ramp_epochs=4, warmup_epochs=1)
    assert s.value(0.0) == s.value(0.99) == 0.002
    assert s.value(1.0) == pytest.approx(0.002)
    assert s.value(3.0) == pytest.approx(0.006)
    assert s.value(5.0) == s.value(50.0) == 0.01
    values = [s.value(e / 10) for e in range(80)]
    assert all(a <= b for a, b in zip(values[:-1], values[1:], strict=True))


def test_reads_float_epochs_from_step():
    s = EpsSchedule(final=1.0, ramp_epochs=2)
    step = Step(epoch=1, index=5, batches=10, epochs=3, indices=torch.arange(2))
    assert s.at(step) == pytest.approx(0.75)
    assert EpsSchedule(final=0.3).at(step) == 0.3


@pytest.mark.parametrize("kwargs", [
    {"final": -0.1}, {"final": 0.1, "start": 0.2}, {"final": 0.1, "ramp_epochs": float("nan")},
    {"final": 0.1, "warmup_epochs": -1},
])
def test_bad_schedules(kwargs):  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError):
        EpsSchedule(**kwargs)
