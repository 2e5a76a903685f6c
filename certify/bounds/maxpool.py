"""MaxPool2d in the bound engine: its windows, its linear relaxation and the relaxation's rules.

A :class:`~certify.bounds.layers.MaxPoolOp` computes ``y_p = max_(j in W_p) x_j`` for every
output position ``p``, ``W_p`` its window of the input map (padding positions are left out,
as torch pads with -inf). Like a ReLU it is relaxed over sound bounds ``l <= x <= u`` of its
input, which the propagation computes first (it is a row of
:data:`certify.bounds.relaxations.ACTIVATIONS`, built per op by :func:`maxpool_rule` since
the rules need the op's geometry).

**The two lines of one output** (auto_LiRPA's ``BoundMaxPool`` and DeepPoly's). Let ``k(p)`` be
an argmax of ``l`` over ``W_p`` (any one is valid; the first in the window is taken), ``L_p =
l_k = max_W l`` and ``U_p = max_W u``.

* lower: ``y_p >= x_k``. A max is at least each of its arguments: valid for every ``x``.
* upper, *decided* window (``L_p >= max_(j in W_p, j != k) u_j``): ``y_p <= x_k``. For ``x``
  in the box ``x_k >= l_k = L_p >= u_j >= x_j`` for every other ``j``, so ``y_p = x_k``
  exactly; the lower and upper lines coincide.
* upper, otherwise: ``y_p <= U_p``, a constant: every argument is at most its ``u``.

The decision compares stored floats (exact), and the lines have coefficients 0 and 1 and the
intercept ``U_p``, a stored bound: they are valid as stored, in exact arithmetic. The lines are
the same under every slope rule; there is no free slope, so alpha-CROWN keeps them fixed (the
relaxation reports no unstable neurons).

**Backward.** Rows ``mu`` on ``y`` become rows ``nu`` on ``x`` by ``mu_p y_p >= mu_p+ x_k +
mu_p- (upper line)``: ``nu = sum_p c_p e_(k(p))`` with ``c_p = mu_p`` (decided) or ``mu_p+``
(otherwise), and the constant ``sum_p mu_p- U_p`` over the undecided outputs. Only the
scatter-add into ``nu`` rounds, and only where windows overlap (an input that is the argmax
of several windows); :func:`maxpool_constant` makes the constant rigorous for the rows as
computed.

**The model's own rounding** (:mod:`certify.bounds.forward_error`): a max of floats is one of
them, so the model computes MaxPool exactly, and ``|max(x + e) - max(x)| <= max |e|``: the
perturbation of its input passes through it. It ends an affine chain like a ReLU: its input
bounds are widened by the chain's perturbation bound ``E`` and every backward pass pays ``|nu|
E`` there.

**Rows on a spatial window** (a convolutional neuron's receptive field) are made dense before
a MaxPool (the rule is not ``elementwise``); windows restart at the next neuron bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.layers import MaxPoolOp, Shape, numel

if TYPE_CHECKING:
    from certify.bounds.relaxations import ActivationRule

__all__ = [
    "MaxPoolRelaxation",
    "Windows",
    "maxpool_backward",
    "maxpool_constant",
    "maxpool_forward",
    "maxpool_interval",
    "maxpool_relax",
    "maxpool_rule",
    "maxpool_tighten",
    "windows",
]

NEG_INF = float("-inf")


# --- windows ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Windows:
    """The windows of a MaxPool op as indices into its flattened input `(C*H*W,)`.

    Attributes:
        index: `(m, K)` int64, ``m`` outputs (``C*Ho*Wo``, in the output's flat order) and
            ``K = kh * kw`` window positions; padding positions hold 0.
        valid: `(m, K)` bool, False at padding positions.
        multiplicity: The most windows any one input lies in (1: no two windows overlap).
    """

    index: Tensor
    valid: Tensor
    multiplicity: int


@lru_cache(maxsize=64)
def _windows(in_shape: Shape, out_shape: Shape, kernel: tuple[int, int],
             stride: tuple[int, int], padding: tuple[int, int], device: str) -> Windows:
    c, h, w = in_shape
    _, ho, wo = out_shape
    rows = (torch.arange(ho) * stride[0] - padding[0])[:, None] + torch.arange(kernel[0])
    cols = (torch.arange(wo) * stride[1] - padding[1])[:, None] + torch.arange(kernel[1])
    i = rows[:, None, :, None]  # (ho, 1, kh, 1)
    j = cols[None, :, None, :]  # (1, wo, 1, kw)
    valid = (i >= 0) & (i < h) & (j >= 0) & (j < w)  # (ho, wo, kh, kw)
    spatial = torch.where(valid, i * w + j, 0)
    index = torch.arange(c)[:, None, None, None, None] * (h * w) + spatial  # (c, ho, wo, kh, kw)
    k = kernel[0] * kernel[1]
    index = index.reshape(c * ho * wo, k)
    valid = valid.unsqueeze(0).expand(c, -1, -1, -1, -1).reshape(c * ho * wo, k)
    index = torch.where(valid, index, 0)
    multiplicity = int(torch.bincount(index[valid], minlength=c * h * w).max())
    return Windows(index.to(device), valid.to(device), multiplicity)


def windows(op: MaxPoolOp, device: torch.device | str = "cpu") -> Windows:
    """The (cached) :class:`Windows` of `op` on `device`."""
    return _windows(tuple(op.in_shape), tuple(op.out_shape), op.kernel_size, op.stride,
                    op.padding, str(device))


def _gather(t: Tensor, win: Windows) -> Tensor:
    """`t` `(N, *in_shape)` gathered per window: `(N, m, K)`, -inf at padding positions."""
    values = t.reshape(t.shape[0], -1)[:, win.index]
    return torch.where(win.valid, values, torch.full((), NEG_INF, dtype=t.dtype,
                                                     device=t.device))


def _decide(op: MaxPoolOp, lower: Tensor, upper: Tensor
            ) -> tuple[Windows, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per output: `(windows, lower window values, upper window values, argmax position kk of
    the lower bounds in the window, L = max l, decided)`, each `(N, m[, K])`."""
    win = windows(op, lower.device)
    lo_w, hi_w = _gather(lower, win), _gather(upper, win)
    low = lo_w.max(2).values
    # the first maximizer in the window (deterministic ties, as max_pool2d's own indices)
    k = lo_w.shape[2]
    position = torch.arange(k, device=lower.device)
    kk = torch.where(lo_w == low.unsqueeze(2), position, k).min(2).values.clamp(max=k - 1)
    others = hi_w.scatter(2, kk.unsqueeze(2), NEG_INF).max(2).values  # -inf for a 1x1 window
    return win, lo_w, hi_w, kk, low, low >= others


# --- the relaxation --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MaxPoolRelaxation:
    """The two lines of every output of one MaxPool layer, per sample (see the module
    docstring); `m` is the number of outputs, flat.

    Attributes:
        index: `(N, m)` int64, ``k(p)``: the flat input index of the lower line's argument.
        decided: `(N, m)` bool, where the upper line is ``x_k`` too (the output is exact).
        upper_bias: `(N, m)`, ``U_p`` where undecided (the upper line), 0 where decided.
        out_reach: `(N, m)`, ``max(|L_p|, |U_p|)``, a bound on ``|y_p|``.
        in_reach: `(N, m)`, ``max(|l_k|, |u_k|)``, a bound on ``|x_k(p)|``.
    """

    index: Tensor
    decided: Tensor
    upper_bias: Tensor
    out_reach: Tensor
    in_reach: Tensor

    @property
    def unstable(self) -> Tensor:
        """`(N, m)` bool: where a free (alpha-CROWN) slope is -- nowhere, the lines are fixed."""
        return torch.zeros_like(self.decided)


def maxpool_interval(op: MaxPoolOp, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The exact image of the box: ``[maxpool(l), maxpool(u)]`` (max is monotone and exact in
    floating point)."""
    return (F.max_pool2d(lower, op.kernel_size, op.stride, op.padding),
            F.max_pool2d(upper, op.kernel_size, op.stride, op.padding))


def maxpool_relax(op: MaxPoolOp, lower: Tensor, upper: Tensor, rule: str) -> MaxPoolRelaxation:
    """The lines of `op` over input bounds `lower <= x <= upper` `(N, *in_shape)`; the same
    for every slope `rule`."""
    n = lower.shape[0]
    win, _, hi_w, kk, low, decided = _decide(op, lower, upper)
    high = hi_w.max(2).values
    index = win.index.unsqueeze(0).expand(n, -1, -1).gather(2, kk.unsqueeze(2)).squeeze(2)
    in_reach = torch.maximum(lower.reshape(n, -1).gather(1, index).abs(),
                             upper.reshape(n, -1).gather(1, index).abs())
    return MaxPoolRelaxation(index, decided, torch.where(decided, torch.zeros_like(high), high),
                             torch.maximum(low.abs(), high.abs()), in_reach)


def maxpool_tighten(op: MaxPoolOp, lower: Tensor, upper: Tensor) -> Tensor:
    """`(N, *in_shape)` bool: the inputs whose tighter bounds could change the relaxation --
    those of an undecided window that may be its max (``u_j >= L_p``). The others never are a
    max (``x_j <= u_j < L_p <= y_p``) or lie in decided windows only."""
    n = lower.shape[0]
    win, _, hi_w, _, low, decided = _decide(op, lower, upper)
    relevant = win.valid & (hi_w >= low.unsqueeze(2)) & ~decided.unsqueeze(2)  # (N, m, K)
    counts = lower.new_zeros(n, numel(op.in_shape)).scatter_add(
        1, win.index.reshape(1, -1).expand(n, -1), relevant.reshape(n, -1).to(lower.dtype))
    return (counts > 0).reshape(lower.shape)


def _coefficients(mu: Tensor, relaxation: MaxPoolRelaxation, samples: Tensor) -> Tensor:
    """``c_p``: ``mu_p`` where decided, ``mu_p+`` otherwise (exact), `(B, R, m)`."""
    decided = relaxation.decided.index_select(0, samples).unsqueeze(1)
    return torch.where(decided, mu, mu.clamp(min=0))


def maxpool_backward(op: MaxPoolOp, a: Tensor, relaxation: MaxPoolRelaxation, samples: Tensor,
                     alpha: Tensor | None = None, *, constant: bool = True
                     ) -> tuple[Tensor, Tensor | None]:
    """Substitute the lines into rows ``a · y`` to lower-bound them (see the module docstring).

    Args:
        a: Rows `(B, R, *out_shape)` on the MaxPool's output.
        relaxation: The layer's lines, per sample.
        samples: `(B,)` the samples of the rows.
        alpha: Ignored (no free slopes).
        constant: Also the constants (False: None, when :func:`maxpool_constant` gives them).

    Returns:
        Rows `(B, R, *in_shape)` on its input and the constants `(B, R)`.
    """
    b, r = a.shape[:2]
    mu = a.reshape(b, r, -1)
    index = relaxation.index.index_select(0, samples).unsqueeze(1).expand(b, r, -1)
    nu = mu.new_zeros(b, r, numel(op.in_shape)).scatter_add(
        2, index, _coefficients(mu, relaxation, samples))
    const = None
    if constant:
        bias = relaxation.upper_bias.index_select(0, samples).unsqueeze(2)
        const = torch.bmm(mu.clamp(max=0), bias).squeeze(2)
    return nu.reshape(b, r, *op.in_shape), const


def maxpool_constant(op: MaxPoolOp, mu: Tensor, nu: Tensor, relaxation: MaxPoolRelaxation,
                     samples: Tensor, mu_err: Tensor | None, perturbation: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """The rigorous constant of the substitution ``mu* · y >= nu · x + c`` on the box.

    In exact arithmetic, for the exact rows ``mu*`` (within `mu_err` of `mu`) and the rows
    ``nu`` *as computed*:

        mu* · y - nu · x = (mu* - mu) · y + (mu · y - nu^ · x) + (nu^ - nu) · x
                        >= -mu_err · |y|  +  sum_p mu_p- U_p  -  |nu^ - nu| · |x|,

    where ``nu^ = sum_p c_p e_k(p)`` are the exact substituted rows (the middle term is the
    lines, valid as stored). ``|y_p| <= max(|L_p|, |U_p|)``; ``c_p`` is computed exactly, and
    ``nu`` sums at most `multiplicity` of them per input, so ``|nu^ - nu|_j <= gamma_mult
    sum_(p: k(p) = j) |c_p|`` (0 when no windows overlap), hence the last term is at most
    ``gamma_mult sum_p |c_p| max(|l_k|, |u_k|)``. With a perturbation bound ``E`` of the input
    (the model's own rounding), ``- |nu| · E`` more.

    Args:
        mu: Rows of the output `(B, R, *out_shape)`, as computed.
        nu: The new rows of the input `(B, R, *in_shape)`, as computed.
        relaxation: The layer's lines.
        samples: `(B,)` the rows' samples.
        mu_err: Elementwise bound on ``|mu* - mu|``, or None (exact).
        perturbation: `(N, *in_shape)` bound ``E``, or None.

    Returns:
        `(c, err)`, each `(B, R)`: the constant as computed and a bound on its distance from
        the exact one (before the :data:`~certify.bounds.rounding.SAFETY` factor).
    """
    dtype = mu.dtype
    b, r = mu.shape[:2]
    m, n = numel(op.out_shape), numel(op.in_shape)
    mu = mu.reshape(b, r, m)
    terms = mu.clamp(max=0) * relaxation.upper_bias.index_select(0, samples).unsqueeze(1)
    total = terms.sum(2)
    magnitude = terms.abs().sum(2)
    err_sum = mu.new_zeros(b, r)
    multiplicity = windows(op, mu.device).multiplicity
    if multiplicity > 1:  # the scatter-add of overlapping windows rounds
        reach = relaxation.in_reach.index_select(0, samples).unsqueeze(2)
        err_sum = err_sum + rounding.gamma(multiplicity, dtype) * torch.bmm(
            _coefficients(mu, relaxation, samples).abs(), reach).squeeze(2)
    if mu_err is not None:
        reach = relaxation.out_reach.index_select(0, samples).unsqueeze(2)
        err_sum = err_sum + torch.bmm(mu_err.reshape(b, r, m), reach).squeeze(2)
    if perturbation is not None:
        e = perturbation.index_select(0, samples).reshape(b, n, 1)
        paid = torch.bmm(nu.reshape(b, r, n).abs(), e).squeeze(2)
        total = total - paid
        magnitude = magnitude + paid
        err_sum = err_sum + rounding.gamma(n + 2, dtype) * paid
    bound = (err_sum + rounding.gamma(m + n + 2, dtype) * magnitude
             + 6 * (m + n) * rounding.tiny(dtype))
    return total, bound


def maxpool_forward(op: MaxPoolOp, mid: Tensor, half_width: Tensor,
                    relaxation: MaxPoolRelaxation, samples: Tensor, with_bias: bool
                    ) -> tuple[Tensor, Tensor]:
    """Push forward-mode linear bounds through the lines.

    The input's lower and upper linear functions are ``mid - half_width`` and ``mid +
    half_width`` `(B, R, *in_shape)`; output ``p`` gets the lower function of ``x_k(p)`` and,
    as upper function, that of ``x_k(p)`` (decided) or the constant ``U_p`` (only in the
    constant row, `with_bias`).

    Returns:
        The middle and half width `(B, R, *out_shape)`.
    """
    b, r = mid.shape[:2]
    index = relaxation.index.index_select(0, samples).unsqueeze(1).expand(b, r, -1)
    decided = relaxation.decided.index_select(0, samples).unsqueeze(1)
    lo = (mid - half_width).reshape(b, r, -1).gather(2, index)
    hi = (mid + half_width).reshape(b, r, -1).gather(2, index)
    bias = (relaxation.upper_bias.index_select(0, samples).unsqueeze(1).expand_as(hi)
            if with_bias else torch.zeros_like(hi))
    hi = torch.where(decided, hi, bias)
    return ((hi + lo) / 2).reshape(b, r, *op.out_shape), ((hi - lo) / 2).reshape(b, r,
                                                                                 *op.out_shape)


def no_free_slopes(relaxation: MaxPoolRelaxation, samples: Tensor, rows: int) -> Tensor:
    """alpha-CROWN's free slopes of a MaxPool layer: none, `(B, R, 0)`."""
    return relaxation.upper_bias.new_zeros(samples.shape[0], rows, 0)


def maxpool_rule(op: MaxPoolOp) -> ActivationRule:
    """The :class:`~certify.bounds.relaxations.ActivationRule` of one MaxPool op (its
    :data:`~certify.bounds.relaxations.ACTIVATIONS` row builds it per op)."""
    from certify.bounds.relaxations import ActivationRule

    # (the rule's relaxation type is ReLU's; this row's own is MaxPoolRelaxation)
    return ActivationRule(
        interval=partial(maxpool_interval, op),
        relax=partial(maxpool_relax, op),  # type: ignore[arg-type]
        backward=partial(maxpool_backward, op), constant=partial(maxpool_constant, op),
        forward=partial(maxpool_forward, op),
        optimizable=no_free_slopes,  # type: ignore[arg-type]
        tighten=partial(maxpool_tighten, op), elementwise=False)
