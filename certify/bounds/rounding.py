"""Floating-point error bounds: what makes a proof hold in exact arithmetic.

Every bound the engine reports is a *rigorous* bound of the network in exact real arithmetic,
although it is computed in float32 or float64 with round-to-nearest. The error model is the
standard one (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., ch. 2-3):

* one operation: ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u`` (``u = 2^-24`` in float32,
  ``2^-53`` in float64), plus an absolute underflow error of at most the smallest *normal*
  number per operation (so flush-to-zero is covered too);
* a sum of products of ``k`` terms, in **any** order and with or without fused multiply-adds:
  ``|fl(sum a_i b_i) - sum a_i b_i| <= gamma_k sum |a_i||b_i|`` with
  ``gamma_k = k u / (1 - k u)``.

Assumed: IEEE arithmetic in the tensors' dtype, as torch's CPU kernels and CUDA kernels with
TF32 switched off compute it (no reduced-precision matrix units, no transform-based
convolutions such as Winograd or FFT, whose error bounds are larger). The engine switches TF32
off while it bounds on CUDA (:func:`no_tf32`).

Error terms are sums of nonnegative numbers computed with rounding themselves; each is
multiplied by :data:`SAFETY` = 2, which covers their own relative rounding error (far below
1/2 for any size that fits in memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from certify.errors import SpecError

__all__ = ["SAFETY", "down", "gamma", "no_tf32", "tiny", "unit_roundoff", "up"]

SAFETY = 2.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the distance from 1 to the next float of `dtype`."""
    return float(torch.finfo(dtype).eps) / 2


def tiny(dtype: torch.dtype) -> float:
    """The smallest normal number: the absolute underflow error of one operation."""
    return float(torch.finfo(dtype).tiny)


def gamma(k: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)`` for `dtype`: the relative error bound of a
    ``k``-term sum of products.

    Raises:
        SpecError: when ``k u >= 1/2`` (no useful bound; never for realistic layer sizes).
    """
    ku = k * unit_roundoff(dtype)
    if ku >= 0.5:
        raise SpecError(f"a sum of {k} terms in {dtype} has no useful rounding-error bound; "
                        "bound the network in float64.")
    return ku / (1 - ku)


def down(t: Tensor) -> Tensor:
    """The next float below each value (rounds a result that was rounded to nearest down),
    never a subnormal one: a step that lands strictly between ``-tiny`` and ``tiny`` (the
    smallest normal) goes on down to 0 or ``-tiny``, whichever comes first
    (``down(0) = -tiny``, not ``-2^-149``). A smaller value is a lower bound all the same;
    subnormal numbers cost x86 CPUs 20-50x more in every product they enter (a ReLU's
    rigorous upper bound ``up(0)`` of an inactive neuron would otherwise make every later
    layer's interval and error products slow).

    Differentiable as the identity (``nextafter`` itself has no gradient)."""
    return _step(t, float("-inf"))


def up(t: Tensor) -> Tensor:
    """The next float above each value, never a subnormal one (as :func:`down`, mirrored:
    ``up(0) = tiny``); differentiable as the identity."""
    return _step(t, float("inf"))


def _step(t: Tensor, toward: float) -> Tensor:
    moved = torch.nextafter(t.detach(), torch.full_like(t.detach(), toward))
    small = tiny(moved.dtype)
    # strictly between -tiny and tiny (a subnormal, or a zero stepped to from one): on in the
    # direction of the step to 0 when the value is on the other side of 0, else to +-tiny
    past = moved.new_full((), small if toward > 0 else -small)
    before = t.detach() < 0 if toward > 0 else t.detach() > 0
    onward = torch.where(before, moved.new_zeros(()), past)
    moved = torch.where(moved.abs() < small, onward, moved)
    if not t.requires_grad:
        return moved
    # t + (moved - t) is `moved` exactly (adjacent floats differ exactly); keep non-finite
    # values as nextafter gives them
    return torch.where(torch.isfinite(t), t + (moved - t).detach(), moved)


@contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 matrix units off (their rounding, about 2^-11, would void the error bounds);
    the previous settings are restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
