"""Directed rounding steps (``rounding.up`` / ``rounding.down``): each value moves at least one
float in its direction -- checked exactly, as rationals -- never by more than one float or to
the nearest of 0 and the smallest normal number, and never onto a subnormal number (which x86
CPUs compute many times slower in every later product)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.bounds import rounding

DTYPES = (torch.float32, torch.float64)


def _subnormal(t: torch.Tensor) -> torch.Tensor:
    return (t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)


def _edges(dtype: torch.dtype) -> list[float]:
    tiny = torch.finfo(dtype).tiny
    smallest = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
    return [0.0, -0.0, smallest, -smallest, tiny, -tiny, tiny / 2, -tiny / 2, tiny * 3,
            -tiny * 3, 1.0, -1.0, 1e-30, -1e-30, 3.4e38, -3.4e38]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_steps_bound_every_value_exactly_and_skip_subnormals(dtype: torch.dtype,
                                                             data: st.DataObject) -> None:
    width = 32 if dtype == torch.float32 else 64
    floats = st.floats(allow_nan=False, allow_infinity=False, width=width,
                       allow_subnormal=True)
    values = data.draw(st.lists(floats, min_size=1, max_size=30)) + _edges(dtype)
    t = torch.tensor(values, dtype=dtype)
    tiny = Fraction(torch.finfo(dtype).tiny)
    for step, sign in ((rounding.up, 1), (rounding.down, -1)):
        moved = step(t)
        assert moved.dtype == dtype and not bool(_subnormal(moved).any())
        nxt = torch.nextafter(t, torch.full_like(t, sign * float("inf")))
        for v, m, n in zip(t.tolist(), moved.tolist(), nxt.tolist(), strict=True):
            if abs(n) == float("inf"):  # past the largest float
                assert m == n
                continue
            v, m, n = Fraction(v), Fraction(m), Fraction(n)
            assert sign * (m - v) > 0, (float(v), float(m))  # strictly past the value
            if abs(n) >= tiny:  # the next float itself
                assert m == n, (float(v), float(m))
            else:  # the first of 0 and +-tiny past the value
                past = [x for x in (Fraction(0), sign * tiny) if sign * (x - v) > 0]
                assert m == min(past, key=lambda x: sign * x), (float(v), float(m))

@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_nan_and_gradient(dtype: torch.dtype) -> None:
    t = torch.tensor([float("inf"), float("-inf"), float("nan"), 2.0], dtype=dtype)
    up, down = rounding.up(t), rounding.down(t)
    assert up[0] == float("inf") and down[1] == float("-inf")
    assert up[1] == -torch.finfo(dtype).max and down[0] == torch.finfo(dtype).max
    assert torch.isnan(up[2]) and torch.isnan(down[2])
    x = torch.tensor([0.0, 1e-40, -3.0], dtype=dtype, requires_grad=True)
    (rounding.up(x) * torch.tensor([1.0, 2.0, 3.0], dtype=dtype)).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [1.0, 2.0, 3.0]  # the identity's gradient


def test_zero_steps_to_the_smallest_normal() -> None:
    for dtype in DTYPES:
        zero = torch.zeros(3, dtype=dtype)
        tiny = torch.finfo(dtype).tiny
        assert rounding.up(zero).tolist() == [tiny] * 3
        assert rounding.down(zero).tolist() == [-tiny] * 3
