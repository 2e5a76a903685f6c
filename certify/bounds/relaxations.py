"""Linear relaxations of the activations, one rule per op type in :data:`ACTIVATIONS`.

Rows: ReLU, LeakyReLU (piecewise linear: the ReLU's lines with slope ``a`` on the negative
side), Sigmoid and Tanh (S-shaped: tangent and secant lines, see "S-shaped activations" below),
and MaxPool2d (:mod:`certify.bounds.maxpool`).

The propagation (:mod:`certify.bounds.propagation`) knows activations only through this table:
an :class:`ActivationRule` says how an activation maps interval bounds, how it is relaxed
between two lines given its input's bounds, how rows are substituted backward through those
lines (with the rigorous constant), and forward. A new activation is a row here (and an op and
a converter in :mod:`certify.bounds.layers`/:mod:`certify.bounds.network`). The bound methods
choose the lower slope: the *mapper* of each method is its slope rule below.

"Activation" means any op relaxed over bounds of its input: also MaxPool2d, which changes the
shape (its rule says which inputs are worth tightening and that rows on a spatial window must
be made dense before it). A row whose functions need the op's parameters (LeakyReLU's slope,
MaxPool's geometry) is a function of the op that builds its rule (:func:`leaky_relu_rule`,
:func:`certify.bounds.maxpool.maxpool_rule`); :func:`activation_rule` resolves every row.

ReLU, the slope rules shared by CROWN, Wong-Kolter and alpha-CROWN:

For a pre-activation ``z`` with sound bounds ``l <= z <= u`` the ReLU is sandwiched between
two lines,

    ``alpha * z  <=  relu(z)  <=  s * z + t``,

exactly (``alpha = s = 1, t = 0``) for a stable active neuron (``l >= 0``) and
(``alpha = s = t = 0``) for a stable inactive one (``u <= 0``). For an unstable neuron
(``l < 0 < u``) the upper line is the chord ``s = u / (u - l)``, ``t = -s * l`` and the lower
slope is any ``alpha`` in ``[0, 1]``; the rules are

``adaptive``  (CROWN, Zhang et al. 2018)
    ``alpha = 1 if u > -l else 0``: the lower line with the smaller area.
``parallel``  (Fast-Lin, Weng et al. 2018; Wong & Kolter 2018's dual network)
    ``alpha = u / (u - l)``, parallel to the chord.
``optimized``  (alpha-CROWN, Xu et al. 2021)
    free ``alpha`` in ``[0, 1]``, one per specification row, chosen by gradient ascent.

Every line is valid on ``[l, u]`` whatever ``alpha`` in ``[0, 1]`` is, so every rule is sound.

LeakyReLU with slope ``0 <= a <= 1`` (convex): the same lines with ``a`` for 0 on the negative
side -- the chord ``s = (u - a l) / (u - l)``, ``t = l (a - s)``, lower slopes in ``[a, 1]``
(adaptive: 1 if ``u > -l`` else ``a``; parallel: ``s``; alpha-CROWN: ``a + (1 - a) alpha``).

**The rigorous constant** of a backward substitution ``mu · act(z) >= nu · z + c`` is, for every
activation, a sound lower bound of the Lagrangian minimum ``sum_j min_{z_j in [l_j, u_j]}
(mu_j act(z_j) - nu_j z_j)`` for the rows ``nu`` *as computed* (whatever the lines were), so the
rows' own rounding cannot make a bound unsound (ReLU: :func:`relu_constant`; LeakyReLU:
:func:`leaky_relu_constant`; S-shaped: :func:`s_constant`).

**S-shaped activations** (Sigmoid, Tanh; :class:`SShape`): ``f`` increasing, convex on ``z <= 0``
and concave on ``z >= 0``, with ``f'`` a function of ``f`` (``s (1 - s)``, ``1 - t^2``). The lines
are CROWN's for general activations (Zhang et al., NeurIPS 2018): on ``u <= 0`` the chord above
and a tangent below, on ``l >= 0`` the reverse; on ``l < 0 < u`` the chord where it is valid
(``chord slope <= f'(u)`` above, ``<= f'(l)`` below), else the tangent through the far
endpoint, its touching point found by bisection. The tangent's point is the midpoint
(``adaptive``) or where the tangent is parallel to the chord (``parallel``). alpha-CROWN
optimizes the touching points of the tangents within the range where they are valid (one free
parameter per line, neuron and row); the chords stay fixed.

*Exactness.* torch's ``sigmoid``/``tanh`` (and ``exp``) are not correctly rounded, so no line is
trusted because of how it was found: every intercept is *certified* for its (float) slope ``k``
by :func:`upper_intercept` / :func:`lower_intercept`, which use only (i) the convexity on each
side of 0 and (ii) enclosures of ``f`` at float points, with the assumed evaluation error
:func:`evaluation_error` (``EVAL_ULPS`` = 1024 units of roundoff, i.e. 512 ulps, relative to the
computed value, plus ``EVAL_TINY`` = 16 smallest normal numbers -- torch's kernels are within a
few ulps; ``tests/bounds/test_activations.py`` checks the assumption against a 60-digit
``decimal`` reference), and directed rounding (``nextafter``) of every other operation. The
interval images and the LP's output boxes are enclosures of the same kind. In a rigorous
backward pass the lines only choose the new rows: the constant is :func:`s_constant`'s, which
trusts no line, so alpha-CROWN's tangents (exact tangents at its points, computed in the rows'
dtype) need no certificate; the certified intercepts serve the plain bounds (``rigorous=False``,
forward mode) and the LP's rows.

*The model as it runs* computes each activation itself: ReLU exactly, LeakyReLU with a rounded
product, sigmoid and tanh with their kernels' error; each row's ``rounding`` bounds that for
:mod:`certify.bounds.forward_error`, where it enters the next chain as an error of its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.layers import (
    LeakyReluOp,
    MaxPoolOp,
    ReluOp,
    SigmoidOp,
    TanhOp,
    rows_of,
    true_first,
)
from certify.bounds.maxpool import maxpool_rule
from certify.spec import round_to

__all__ = [
    "ACTIVATIONS",
    "EVAL_TINY",
    "EVAL_ULPS",
    "SIGMOID",
    "SLOPE_RULES",
    "TANH",
    "ActivationRule",
    "Relaxation",
    "SShape",
    "activation_rule",
    "backward_relu",
    "crossing_zero",
    "enclose",
    "evaluation_error",
    "forward_relu",
    "is_activation",
    "leaky_relu_constant",
    "leaky_relu_rule",
    "lower_intercept",
    "optimizable_alpha",
    "relax",
    "relu_constant",
    "s_constant",
    "s_lines",
    "s_tangents",
    "upper_intercept",
]

SLOPE_RULES = ("adaptive", "parallel")


@dataclass(frozen=True, eq=False)
class Relaxation:
    """The two lines of one activation layer, per sample:
    ``lower z + lower_bias <= act(z) <= upper z + upper_bias`` on ``[pre_lower, pre_upper]``.

    Attributes:
        lower: Lower slopes ``alpha`` `(N, *shape)`.
        upper: Upper slopes ``s`` `(N, *shape)`.
        upper_bias: Upper intercepts ``t`` `(N, *shape)`.
        unstable: `(N, *shape)` bool, where the lines have free parameters (ReLU: where
            ``l < 0 < u``, where ``alpha`` is free).
        pre_lower, pre_upper: The pre-activation bounds ``l``, ``u`` `(N, *shape)` themselves
            (the rigorous constant, :func:`relu_constant`, is computed from them).
        lower_bias: Lower intercepts `(N, *shape)`; zeros (a broadcast view) when not given, as
            for ReLU and LeakyReLU, whose lower lines pass through 0.
        params: `(N, P, *shape)`, an activation's own per-neuron data (S-shaped: the ranges of
            the tangent points and enclosures of ``f(l)``, ``f(u)``, float64); empty (``P = 0``)
            when not given.
    """

    lower: Tensor
    upper: Tensor
    upper_bias: Tensor
    unstable: Tensor
    pre_lower: Tensor
    pre_upper: Tensor
    lower_bias: Tensor = None  # type: ignore[assignment]  # zeros, set in __post_init__
    params: Tensor = None  # type: ignore[assignment]  # empty, set in __post_init__

    def __post_init__(self) -> None:
        if self.lower_bias is None:
            object.__setattr__(self, "lower_bias",
                               self.lower.new_zeros(()).expand_as(self.lower))
        if self.params is None:
            n, *shape = self.lower.shape
            object.__setattr__(self, "params", self.lower.new_empty(n, 0, *shape))


def relax(lower: Tensor, upper: Tensor, rule: str) -> Relaxation:
    """The relaxation of ``relu`` over pre-activation bounds `lower <= z <= upper`.

    Args:
        lower, upper: Sound pre-activation bounds `(N, *shape)`.
        rule: ``"adaptive"`` or ``"parallel"`` (see the module docstring).
    """
    if rule not in SLOPE_RULES:
        raise ValueError(f"unknown slope rule {rule!r}; expected one of {SLOPE_RULES}")
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    # Guard the division: off the unstable set the chord is never used.
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = torch.where(unstable, upper / width, active.to(upper.dtype))
    upper_bias = torch.where(unstable, -chord * lower, torch.zeros_like(lower))
    if rule == "adaptive":
        alpha = torch.where(unstable, (upper > -lower).to(upper.dtype), active.to(upper.dtype))
    else:
        alpha = chord
    return Relaxation(alpha, chord, upper_bias, unstable, lower, upper)


def optimizable_alpha(relaxation: Relaxation, samples: Tensor, rows: int) -> Tensor:
    """Initial free lower slopes, one set per row: the relaxation's own, `(B, R, *shape)`."""
    lower = relaxation.lower.index_select(0, samples).unsqueeze(1)
    return lower.expand(-1, rows, *lower.shape[2:]).clone()


def backward_relu(a: Tensor, relaxation: Relaxation, samples: Tensor,
                  alpha: Tensor | None = None, *, constant: bool = True
                  ) -> tuple[Tensor, Tensor | None]:
    """Substitute the relaxation into rows ``a · relu(z)`` to lower-bound them.

    ``a · relu(z) >= a+ · (alpha z) + a- · (s z + t)``, since ``a+ >= 0`` multiplies the
    lower line and ``a- <= 0`` the upper one; computed as ``a s + a+ (alpha - s)`` and
    ``a- · t``.

    Args:
        a: Rows `(B, R, *shape)` of the linear function of the ReLU's output; `B` samples with
            `R` rows each.
        relaxation: The layer's relaxation, per sample `(N, *shape)`.
        samples: `(B,)` the samples of the rows.
        alpha: Optional per-row lower slopes `(B, R, *shape)` (alpha-CROWN), used on unstable
            neurons only (clamped to [0, 1]).
        constant: Also the constants (False: None, when :func:`relu_constant` gives them).

    Returns:
        Rows `(B, R, *shape)` on the ReLU's input and the constants `(B, R)`.
    """
    b, r = a.shape[:2]
    upper = rows_of(relaxation.upper, samples).unsqueeze(1)
    bias = rows_of(relaxation.upper_bias, samples).reshape(b, -1, 1)
    lower = rows_of(relaxation.lower, samples).unsqueeze(1)
    if alpha is not None:
        unstable = rows_of(relaxation.unstable, samples).unsqueeze(1)
        lower = torch.where(unstable, alpha.clamp(0.0, 1.0), lower)
    pos = a.clamp(min=0)
    const = None
    if constant:
        const = torch.bmm((a - pos).reshape(b, r, -1), bias).reshape(b, r)  # a- exactly
    return torch.addcmul(a * upper, pos, lower - upper), const


def relu_constant(mu: Tensor, nu: Tensor, relaxation: Relaxation, samples: Tensor,
                  mu_err: Tensor | None, perturbation: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """The rigorous constant of the substitution ``mu · relu(z) >= nu · z + c`` on ``[l, u]``.

    Whatever the computed new rows ``nu`` are (rounded, or any slopes at all), the exact
    statement ``mu* · relu(z) - nu · z >= sum_j min_{z_j in [l_j, u_j]} (mu_j relu(z_j) -
    nu_j z_j) - sum_j |mu*_j - mu_j| u_j+`` holds for the exact rows ``mu*`` (within
    `mu_err` of `mu`): each term is piecewise linear with its kink at 0, so its minimum is at
    ``l``, ``u`` or 0 -- the Lagrangian view of the relaxation (for CROWN's lines the minimum
    equals CROWN's constant ``mu- · t``). Rows substituted this way make the bound depend on
    the rows' values only through this constant, so their own rounding cannot make it unsound.

    Args:
        mu: Rows of the ReLU's output `(B, R, *shape)`, as computed.
        nu: The new rows of its input, `(B, R, *shape)`.
        relaxation: The layer's relaxation (its ``pre_lower``/``pre_upper`` are used).
        samples: `(B,)` the rows' samples.
        mu_err: Elementwise bound on ``|mu* - mu|``, or None (exact).
        perturbation: `(N, *shape)` bound ``E`` on a perturbation of the pre-activation (the
            model's own rounding, :mod:`certify.bounds.forward_error`): ``- |nu| · E`` more.

    Returns:
        `(c, err)`, each `(B, R)`: the constant as computed and a bound on its distance from
        the exact one (before the :data:`~certify.bounds.rounding.SAFETY` factor).
    """
    dtype = mu.dtype
    b, r = mu.shape[:2]
    n = mu[0, 0].numel() if mu.numel() else 0
    mu, nu = mu.reshape(b, r, n), nu.reshape(b, r, n)
    lo = rows_of(relaxation.pre_lower, samples).reshape(b, n)
    hi = rows_of(relaxation.pre_upper, samples).reshape(b, n)
    unstable = rows_of(relaxation.unstable, samples).reshape(b, n)
    # Stable neurons: the substitution is exact (nu is mu itself on active neurons, 0 on
    # inactive ones, bit for bit), so h = 0 with no rounding. Unstable (l < 0 < u): the
    # minimum of h over [l, u] is min(h(l), h(u), h(0)) = min(-nu l, (mu - nu) u, 0). Only
    # the unstable neurons are gathered (padded to the most of any sample).
    counts = unstable.sum(1)
    m = int(counts.max()) if b else 0
    # Narrower rows sum their terms in float64: the terms are exact there (a product of two
    # float32 values is), and the sum's rounding is float64's instead of gamma_n of float32,
    # which on layers of 10^4 neurons is 10^-3 of the whole constant; one rounding to `dtype`
    # at the end costs u |total|.
    wide = torch.float64
    total = mu.new_zeros(b, r, dtype=wide)
    err_sum = mu.new_zeros(b, r)
    if m:
        order, valid = true_first(unstable, m)  # (b, m) each: unstable first
        index = order.unsqueeze(1).expand(b, r, m)
        mu_u, nu_u = mu.gather(2, index), nu.gather(2, index)
        # padding gets l = u = 0, where h and its error terms are 0 (a non-finite row there
        # makes the constant NaN: never a proof)
        zero = torch.zeros((), dtype=dtype, device=mu.device)
        lo_u = torch.where(valid, lo.gather(1, order), zero).unsqueeze(2)  # (b, m, 1)
        hi_u = torch.where(valid, hi.gather(1, order), zero).unsqueeze(2)
        h = torch.minimum(-nu_u * lo_u.transpose(1, 2),
                          (mu_u - nu_u) * hi_u.transpose(1, 2)).clamp(max=0)
        total = h.to(wide).sum(2)
        # gamma_3 (|nu| (u - l) + |mu| u): the rounding of h's products and difference
        err_sum = rounding.gamma(3, dtype) * (torch.bmm(nu_u.abs(), hi_u - lo_u)
                                              + torch.bmm(mu_u.abs(), hi_u)).squeeze(2)
    if mu_err is not None:
        err_sum = err_sum + torch.bmm(mu_err.reshape(b, r, n), hi.clamp(min=0).unsqueeze(2)
                                      ).squeeze(2)
    if perturbation is not None:
        e = rows_of(perturbation, samples).reshape(b, n, 1)
        paid = torch.bmm(nu.abs().to(wide), e.to(wide)).squeeze(2)
        total = total - paid
        if dtype == wide:
            # float64 rows keep their bound bit for bit: `paid`'s own rounding is counted
            # here too, besides its share of the magnitude's gamma below (the wide sums of
            # narrower rows count it there only, which covers it)
            err_sum = err_sum + rounding.gamma(n + 2, dtype) * paid
    # every h <= 0 and paid >= 0: -total is the sum of the terms' magnitudes (up to their
    # rounding, see SAFETY); gamma of the layer's size, not of the gathered count: the bound of
    # a row must not depend on which other samples share its block
    magnitude = -total
    bound = (err_sum + (rounding.gamma(n + 2, wide) * magnitude).to(dtype)
             + 6 * n * rounding.tiny(dtype))
    if dtype != wide:
        bound = bound + (rounding.unit_roundoff(dtype) * magnitude).to(dtype)
    return total.to(dtype), bound


def forward_relu(mid: Tensor, half_width: Tensor, relaxation: Relaxation, sample: Tensor,
                 with_bias: bool) -> tuple[Tensor, Tensor]:
    """Push forward-mode linear bounds through the relaxation.

    The pre-activation's lower and upper linear bounds are ``mid - half_width`` and
    ``mid + half_width`` (rows of coefficients of the input, or the constant row). The output's
    are ``alpha (mid - half_width)`` (``alpha >= 0``) and ``s (mid + half_width) [+ t]``.

    Args:
        mid, half_width: `(B, R, *shape)`, `B` samples with `R` rows each.
        relaxation: Per sample `(N, *shape)`; `sample` `(B,)` picks the rows' samples.
        with_bias: Add the upper intercept ``t`` (only for the constant row).
    """
    alpha = relaxation.lower.index_select(0, sample).unsqueeze(1)
    slope = relaxation.upper.index_select(0, sample).unsqueeze(1)
    lo = alpha * (mid - half_width)
    hi = slope * (mid + half_width)
    if with_bias:
        hi = hi + relaxation.upper_bias.index_select(0, sample).unsqueeze(1)
    return (hi + lo) / 2, (hi - lo) / 2


def interval_relu(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The exact image of ``[lower, upper]`` under relu (no rounding: a max with 0)."""
    return lower.clamp(min=0), upper.clamp(min=0)


def crossing_zero(lower: Tensor, upper: Tensor) -> Tensor:
    """The unstable neurons, ``l < 0 < u``: the only ReLUs whose relaxation is not exact, so
    the only ones whose relaxation changes when their input bounds tighten (the default
    ``tighten`` of a row)."""
    return (lower < 0) & (upper > 0)


# --- directed rounding in float64 -------------------------------------------------------------
# Each helper rounds the result of *one* operation (done in round-to-nearest) one float outward:
# the exact result of that operation on the same inputs lies between (nextafter argument, see
# certify.bounds.rounding). Chained, they give enclosures of exact expressions.

_dn = rounding.down
_up = rounding.up


def _sum_down(h: Tensor) -> Tensor:
    """A lower bound of the exact sum of float64 `h` over its last dimension: the computed sum
    (any order) minus twice Higham's ``gamma_n sum |h|`` (twice: the error term's own
    rounding), plus an underflow term."""
    n = h.shape[-1]
    total = h.sum(-1)
    if n <= 1:
        return total
    err = (2 * rounding.gamma(n, torch.float64)) * h.abs().sum(-1) + n * rounding.tiny(
        torch.float64)
    return _dn(total - err)


def _sum_up(h: Tensor) -> Tensor:
    return -_sum_down(-h)


def _attach(value: Tensor, smooth: Tensor) -> Tensor:
    """`value` (exactly) with the gradient of `smooth` (where `smooth` is finite)."""
    if not smooth.requires_grad:
        return value
    delta = smooth - smooth.detach()  # zero, exactly, where finite
    return torch.where(torch.isfinite(smooth), value + delta, value)


def _to_dtype(value: Tensor, dtype: torch.dtype, *, up: bool) -> Tensor:
    """float64 `value` in `dtype`, rounded outward (up or down), keeping its gradient."""
    if value.dtype == dtype:
        return value
    return _attach(round_to(value.detach(), dtype, up=up), value.to(dtype))


def _rows_data(mu: Tensor, nu: Tensor, relaxation: Relaxation, samples: Tensor
               ) -> tuple[int, int, int, Tensor, Tensor, Tensor, Tensor]:
    """`(b, r, n, mu, nu, l, u)`: the rows `(b, r, n)` and the bounds `(b, 1, n)`, float64."""
    b, r = mu.shape[:2]
    n = mu[0, 0].numel() if mu.numel() else 0
    m = mu.reshape(b, r, n).to(torch.float64)
    v = nu.reshape(b, r, n).to(torch.float64)
    lo = relaxation.pre_lower.index_select(0, samples).reshape(b, 1, n).to(torch.float64)
    hi = relaxation.pre_upper.index_select(0, samples).reshape(b, 1, n).to(torch.float64)
    return b, r, n, m, v, lo, hi


def _finish_constant(total: Tensor, v: Tensor, reach: Tensor, relaxation: Relaxation,
                     samples: Tensor, mu_err: Tensor | None, perturbation: Tensor | None,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The constant `total` `(b, r)` (a float64 lower bound) less what inexact rows and the
    model's own rounding cost, in `dtype` rounded down; its error bound is then 0.

    ``mu* · act(z~) - nu · z~ >= mu · act(z~) - nu · z~ - mu_err · max|act|`` over ``[l, u]``
    (`reach` `(b, 1, n)` bounds ``|act|`` there), and ``nu · z~ = nu · z + nu · e`` with ``|e|
    <= E`` (`perturbation`): ``- |nu| · E``.
    """
    b, r, n = v.shape
    if mu_err is not None:
        err = mu_err.reshape(b, r, n).to(torch.float64)
        total = _dn(total - _sum_up(_up(err * reach)))
    if perturbation is not None:
        e = perturbation.index_select(0, samples).reshape(b, 1, n).to(torch.float64)
        total = _dn(total - _sum_up(_up(v.abs() * e)))
    c = _to_dtype(total, dtype, up=False)
    return c, torch.zeros_like(c.detach())


# --- LeakyReLU --------------------------------------------------------------------------------


def _leaky_scale(x: Tensor, slope: float, *, up: bool) -> Tensor:
    """``slope * x`` in `x`'s dtype rounded up or down: one float64 product (`x` is exact in
    float64, `slope` is the layer's float64 slope), stepped outward and cast outward."""
    exact = x.detach().to(torch.float64) * slope
    value = _to_dtype(_up(exact) if up else _dn(exact), x.dtype, up=up).detach()
    return _attach(value, x * slope)


def interval_leaky_relu(op: LeakyReluOp, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The image of ``[lower, upper]`` (monotone), rounded outward where ``a x`` is rounded."""
    a = op.negative_slope
    lo = torch.where(lower >= 0, lower, _leaky_scale(lower, a, up=False))
    hi = torch.where(upper >= 0, upper, _leaky_scale(upper, a, up=True))
    return lo, hi


def tighten_leaky_relu(op: LeakyReluOp, lower: Tensor, upper: Tensor) -> Tensor:
    """Neurons whose relaxation is not exact (the row's ``tighten``): ``l < 0 < u`` (none when
    the slope is 1)."""
    if op.negative_slope >= 1:
        return torch.zeros_like(lower, dtype=torch.bool)
    return crossing_zero(lower, upper)


def relax_leaky_relu(op: LeakyReluOp, lower: Tensor, upper: Tensor, rule: str) -> Relaxation:
    """The lines of LeakyReLU(a) over `lower <= z <= upper` (see the module docstring):
    exact on stable neurons (slope 1 or ``a``), chord and a lower line through 0 of slope in
    ``[a, 1]`` on unstable ones."""
    if rule not in SLOPE_RULES:
        raise ValueError(f"unknown slope rule {rule!r}; expected one of {SLOPE_RULES}")
    a = op.negative_slope
    active = lower >= 0
    unstable = tighten_leaky_relu(op, lower, upper)
    stable_slope = torch.where(active, torch.ones_like(lower), torch.full_like(lower, a))
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    chord = torch.where(unstable, (upper - a * lower) / width, stable_slope)
    upper_bias = torch.where(unstable, lower * (a - chord), torch.zeros_like(lower))
    if rule == "adaptive":
        alpha = torch.where(unstable, torch.where(upper > -lower, torch.ones_like(lower),
                                                  torch.full_like(lower, a)), stable_slope)
    else:
        alpha = chord
    return Relaxation(alpha, chord, upper_bias, unstable, lower, upper)


def optimizable_leaky_relu(op: LeakyReluOp, relaxation: Relaxation, samples: Tensor,
                           rows: int) -> Tensor:
    """Free parameters ``t`` in [0, 1] per row (slope ``a + (1 - a) t``), started at the
    relaxation's own lower slopes, `(B, R, *shape)`."""
    a = op.negative_slope
    lower = relaxation.lower.index_select(0, samples).unsqueeze(1)
    t = ((lower - a) / max(1.0 - a, 1e-30)).clamp(0.0, 1.0)
    return t.expand(-1, rows, *t.shape[2:]).clone()


def backward_leaky_relu(op: LeakyReluOp, a: Tensor, relaxation: Relaxation, samples: Tensor,
                        alpha: Tensor | None = None, *, constant: bool = True
                        ) -> tuple[Tensor, Tensor | None]:
    """:func:`backward_relu` with alpha-CROWN's parameters mapped to slopes ``a + (1 - a) t``
    (the lower lines of LeakyReLU pass through 0 too)."""
    if alpha is not None:
        neg = op.negative_slope
        alpha = neg + (1.0 - neg) * alpha.clamp(0.0, 1.0)
    return backward_relu(a, relaxation, samples, alpha, constant=constant)


def leaky_relu_constant(op: LeakyReluOp, mu: Tensor, nu: Tensor, relaxation: Relaxation,
                        samples: Tensor, mu_err: Tensor | None,
                        perturbation: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The rigorous constant of ``mu · lrelu(z) >= nu · z + c`` on ``[l, u]``, for any `nu`.

    Every neuron (stable ones too: their substitution ``nu = a mu`` is rounded) contributes
    ``min_{z in [l, u]} h(z)``, ``h(z) = mu lrelu(z) - nu z``: piecewise linear with its kink at
    0, so the minimum is ``h(l)``, ``h(u)`` or ``h(0) = 0``; ``h(z) = (mu - nu) z`` for ``z >=
    0`` and ``(a mu - nu) z`` for ``z < 0``, each bounded below in float64 with directed
    rounding (``a`` is the exact float64 slope). Arguments and result as for
    :func:`relu_constant`; the constant is itself a rigorous lower bound, its error bound 0.
    """
    b, r, n, m, v, lo, hi = _rows_data(mu, nu, relaxation, samples)
    a = op.negative_slope
    pos_lo = _dn(m - v)  # <= mu - nu
    neg_hi = _up(_up(m * a) - v)  # >= a mu - nu

    def h_at(z: Tensor) -> Tensor:
        return torch.where(z >= 0, _dn(pos_lo * z), _dn(neg_hi * z))

    h = torch.minimum(h_at(lo), h_at(hi))
    h = torch.where((lo < 0) & (hi > 0), h.clamp(max=0), h)
    reach = torch.maximum(lo.abs(), hi.abs())  # |lrelu(z)| <= max(|l|, |u|) as a <= 1
    return _finish_constant(_sum_down(h), v, reach, relaxation, samples, mu_err, perturbation,
                            mu.dtype)


# --- S-shaped activations: Sigmoid, Tanh ------------------------------------------------------

#: The assumed accuracy of torch's ``sigmoid`` and ``tanh`` in a dtype with unit roundoff ``u``
#: and smallest normal number ``tiny``: the value ``v`` computed at a float ``x`` is within
#: ``EVAL_ULPS * u * |v| + EVAL_TINY * tiny`` of the exact ``f(x)``. Their kernels are accurate
#: to a few ulps (1 ulp = 2u); this allows 512 ulps.
EVAL_ULPS = 1024
EVAL_TINY = 16


def evaluation_error(value: Tensor, dtype: torch.dtype) -> Tensor:
    """The assumed bound of ``|computed f(x) - f(x)|`` for sigmoid and tanh computed in `dtype`
    with result `value` (held exactly in float64), in float64 rounded up: see
    :data:`EVAL_ULPS`."""
    u = rounding.unit_roundoff(dtype)
    v = value.to(torch.float64).abs()
    return _up(v * (EVAL_ULPS * u) + EVAL_TINY * rounding.tiny(dtype))


@dataclass(frozen=True, eq=False)
class SShape:
    """An S-shaped activation ``f``: increasing, convex on ``z <= 0``, concave on ``z >= 0``,
    with values in the open interval ``(low, high)`` and its slope a function of its value.

    Attributes:
        name: For messages.
        value: ``f`` in the tensor's dtype (torch's kernel).
        slope_of_value: ``D`` with ``f'(z) = D(f(z))``.
        slope_range: ``(a, b) -> (lo, hi)``: ``D`` over values in ``[a, b]``, rounded outward.
        where_slope: ``k -> z >= 0`` with ``f'(z) = k`` (``inf`` for ``k <= 0``, 0 for ``k >=
            f'(0)``); ``f'`` is even for both, so ``-z`` is the other solution.
        low, high: The range of ``f``.
        at_zero: ``f(0)``, exactly.
        peak: ``f'(0)``, its Lipschitz constant.
        reflected_name: The name of ``z -> -f(-z)`` (another S-shape; lower lines of ``f`` are
            upper lines of it, reflected).
    """

    name: str
    value: Callable[[Tensor], Tensor]
    slope_of_value: Callable[[Tensor], Tensor]
    slope_range: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    where_slope: Callable[[Tensor], Tensor]
    low: float
    high: float
    at_zero: float
    peak: float
    reflected_name: str

    @property
    def reflected(self) -> SShape:
        return S_SHAPES[self.reflected_name]


def _sigmoid_slope_range(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = a.clamp(0.0, 1.0), b.clamp(0.0, 1.0)  # s (1 - s) for s in [a, b]
    return _dn(a * _dn(1 - b)).clamp(min=0.0), _up(b * _up(1 - a))


def _neg_sigmoid_slope_range(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = a.clamp(-1.0, 0.0), b.clamp(-1.0, 0.0)  # (-v) (1 + v) for v in [a, b]
    return _dn(-b * _dn(1 + a)).clamp(min=0.0), _up(-a * _up(1 + b))


def _tanh_slope_range(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = a.clamp(-1.0, 1.0), b.clamp(-1.0, 1.0)  # 1 - t^2 for t in [a, b]
    big = torch.maximum(a.abs(), b.abs())
    small = torch.where((a <= 0) & (b >= 0), torch.zeros_like(a),
                        torch.minimum(a.abs(), b.abs()))
    return _dn(1 - _up(big * big)).clamp(min=0.0), _up(1 - _dn(small * small))


def _sigmoid_where_slope(k: Tensor) -> Tensor:
    # s (1 - s) = k  <=>  s = (1 +- sqrt(1 - 4k)) / 2, z = logit(s) = +-2 atanh(sqrt(1 - 4k))
    return 2 * torch.atanh(torch.sqrt((1 - 4 * k).clamp(0.0, 1.0)))


def _tanh_where_slope(k: Tensor) -> Tensor:
    return torch.atanh(torch.sqrt((1 - k).clamp(0.0, 1.0)))


def _neg_sigmoid(z: Tensor) -> Tensor:
    return -torch.sigmoid(-z)


SIGMOID = SShape("Sigmoid", torch.sigmoid, lambda v: v * (1 - v), _sigmoid_slope_range,
                 _sigmoid_where_slope, 0.0, 1.0, 0.5, 0.25, "-Sigmoid(-z)")
TANH = SShape("Tanh", torch.tanh, lambda v: 1 - v * v, _tanh_slope_range, _tanh_where_slope,
              -1.0, 1.0, 0.0, 1.0, "Tanh")
S_SHAPES: dict[str, SShape] = {
    "Sigmoid": SIGMOID,
    "Tanh": TANH,
    "-Sigmoid(-z)": SShape("-Sigmoid(-z)", _neg_sigmoid, lambda v: -v * (1 + v),
                           _neg_sigmoid_slope_range, _sigmoid_where_slope, -1.0, 0.0, -0.5,
                           0.25, "Sigmoid"),
}


def enclose(f: SShape, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` with ``lo <= f(z) <= hi`` exactly, at float64 points `z`: torch's value
    widened by :func:`evaluation_error`, rounded outward, clipped to ``f``'s range."""
    v = f.value(z)
    e = evaluation_error(v, z.dtype)
    return _dn(v - e).clamp(f.low, f.high), _up(v + e).clamp(f.low, f.high)


def upper_intercept(f: SShape, l: Tensor, u: Tensor, k: Tensor, anchor: Tensor) -> Tensor:
    """A ``B`` with ``f(z) <= k z + B`` for every real ``z`` in ``[l, u]``, proven for the
    float64 slope `k` as it is (any slope): float64 `(...)`, rounded up.

    With ``g(z) = k z + B - f(z)``:

    * on the convex part ``[l, min(u, 0)]`` (when ``l <= 0``) ``g`` is concave, so ``g >= 0``
      at its two ends suffices: ``B >= f(l) - k l`` and ``B >= f(c) - k c``, ``c = min(u, 0)``;
    * on the concave part ``[v, u]``, ``v = max(l, 0)`` (when ``u >= 0``) ``g`` is convex, so
      ``g(z) >= g(d) + g'(d) (z - d)`` for the `anchor` ``d`` (clipped into the part), and
      ``g'(d) = k - f'(d)``: ``B >= f(d) - k d - min_z (k - f'(d)) (z - d)``, the minimum over
      enclosures of ``f'(d)`` and of ``z - d`` at ``z = v, u`` (a bilinear form: its corners).

    A good anchor (the tangent's touching point, or ``u`` for a chord) makes the bound tight;
    any anchor makes it valid. Every ``f`` value is an :func:`enclose` enclosure and every other
    operation is rounded outward, so ``B`` holds in exact arithmetic.
    """
    minus_inf = torch.full_like(l, -math.inf)
    convex = l <= 0
    c = torch.clamp(u, max=0.0)
    at_l = _up(enclose(f, l)[1] - _dn(k * l))
    at_c = _up(enclose(f, c)[1] - _dn(k * c))
    bound = torch.where(convex, torch.maximum(at_l, at_c), minus_inf)
    concave = u >= 0
    v = torch.clamp(l, min=0.0)
    d = torch.minimum(torch.maximum(torch.nan_to_num(anchor.detach(), nan=0.0), v), u)
    fd_lo, fd_hi = enclose(f, d)
    slope_lo, slope_hi = f.slope_range(fd_lo, fd_hi)
    g_lo, g_hi = _dn(k - slope_hi), _up(k - slope_lo)  # k - f'(d)
    distances = (_dn(v - d), _up(v - d), _dn(u - d), _up(u - d))
    worst = torch.stack([_dn(g * x) for g in (g_lo, g_hi) for x in distances]).amin(0)
    at_d = _up(_up(fd_hi - _dn(k * d)) - worst)
    return torch.where(concave, torch.maximum(bound, at_d), bound)


def lower_intercept(f: SShape, l: Tensor, u: Tensor, k: Tensor, anchor: Tensor) -> Tensor:
    """A ``b`` with ``f(z) >= k z + b`` on ``[l, u]`` (rounded down): with ``g(w) = -f(-w)``,
    ``f(z) >= k z + b`` for ``z in [l, u]`` iff ``g(w) <= k w - b`` for ``w in [-u, -l]``, so
    ``b = -``:func:`upper_intercept` of ``g`` (anchor ``-d``); ``g`` is S-shaped too."""
    return -upper_intercept(f.reflected, -u, -l, k, -anchor)


class _Line(NamedTuple):
    """An upper line of an S-shape over ``[l, u]`` (float64, before certification)."""

    slope: Tensor
    anchor: Tensor  # where it touches f (u for a chord): the certificate's anchor
    range_lo: Tensor  # tangent points alpha-CROWN may move it to (equal: fixed)
    range_hi: Tensor
    start: Tensor  # the anchor's position in the range, in [0, 1]
    chord: Tensor  # bool: it is the chord


BISECTION_STEPS = 60


def _tangent_through_left(f: SShape, l: Tensor, u: Tensor) -> Tensor:
    """For ``l < 0 < u``: the point ``d`` in ``[0, u]`` whose tangent passes through ``(l,
    f(l))`` (tangents at larger ``d`` pass above it), by bisection of ``f(d) + f'(d) (l - d) -
    f(l)``, increasing in ``d`` on ``[0, inf)``; the end on the valid side. Only a choice: the
    intercept is certified whatever it is."""
    lo = torch.zeros_like(l)
    hi = torch.clamp(u, min=0.0)
    fl = f.value(l)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        v = f.value(mid)
        ok = v + f.slope_of_value(v) * (l - mid) - fl >= 0
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return hi


def _choose_upper(f: SShape, l: Tensor, u: Tensor, rule: str) -> _Line:
    """CROWN's upper line of `f` over ``[l, u]`` (float64, detached): the chord on the convex
    side or where it is valid (``chord slope <= f'(u)``), else a tangent -- at the midpoint
    (``adaptive``) or parallel to the chord (``parallel``) when ``l >= 0``, through ``(l,
    f(l))`` when ``l < 0 < u``."""
    fl, fu = f.value(l), f.value(u)
    width = u - l
    mid = l + width / 2
    wide = width > 0
    chord = torch.where(wide, (fu - fl) / torch.where(wide, width, torch.ones_like(width)),
                        f.slope_of_value(f.value(mid))).clamp(min=0.0)
    concave = l >= 0
    convex = u <= 0
    mixed = ~concave & ~convex
    is_chord = convex | (mixed & (chord <= f.slope_of_value(fu)))
    if rule == "adaptive":
        inner = mid
    else:
        inner = torch.minimum(torch.maximum(torch.nan_to_num(f.where_slope(chord), nan=0.0), l),
                              u)
    through = _tangent_through_left(f, l, u)
    tangent = torch.where(concave, inner, through)
    anchor = torch.where(is_chord, u, tangent)
    slope = torch.where(is_chord, chord, f.slope_of_value(f.value(anchor)))
    range_lo = torch.where(is_chord, anchor, torch.where(concave, l, through))
    range_hi = torch.where(is_chord, anchor, u)
    span = range_hi - range_lo
    start = torch.where(span > 0, (anchor - range_lo) / torch.where(span > 0, span, 1.0),
                        torch.zeros_like(span)).clamp(0.0, 1.0)
    return _Line(slope, anchor, range_lo, range_hi, start, is_chord)


def _choose(f: SShape, l: Tensor, u: Tensor, rule: str) -> tuple[_Line, _Line]:
    """The upper line and the lower one (in ``f``'s coordinates: the reflection's upper line
    mirrored, so its anchor and range are negated and its start is ``1 - start``)."""
    if rule not in SLOPE_RULES:
        raise ValueError(f"unknown slope rule {rule!r}; expected one of {SLOPE_RULES}")
    upper = _choose_upper(f, l, u, rule)
    g = _choose_upper(f.reflected, -u, -l, rule)
    lower = _Line(g.slope, -g.anchor, -g.range_hi, -g.range_lo, 1 - g.start, g.chord)
    return lower, upper


def s_lines(f: SShape, l: Tensor, u: Tensor, rule: str
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Certified lines ``kL z + bL <= f(z) <= kU z + bU`` on ``[l, u]``, float64 `(...)` each
    (the LP's rows); `rule` as for :func:`relax`."""
    l, u = l.detach().to(torch.float64), u.detach().to(torch.float64)
    lower, upper = _choose(f, l, u, rule)
    return (lower.slope, lower_intercept(f, l, u, lower.slope, lower.anchor),
            upper.slope, upper_intercept(f, l, u, upper.slope, upper.anchor))


def s_tangents(f: SShape, l: Tensor, u: Tensor, count: int
               ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """More certified lines for the LP, ``(kL, bL, kU, bU)`` float64 each: the tangents at
    `count` evenly spaced points of the ranges alpha-CROWN may use (each touches ``f`` at its
    point, so with the anchor there its certified intercept is tight); a fixed line (a chord)
    where a range is a point. Their intersection approaches ``f``'s convex hull on ``[l, u]``."""
    l, u = l.detach().to(torch.float64), u.detach().to(torch.float64)
    lower, upper = _choose(f, l, u, "adaptive")
    out = []
    for i in range(count):
        t = i / max(count - 1, 1)
        lines = []
        for line, bound in ((lower, lower_intercept), (upper, upper_intercept)):
            free = line.range_lo < line.range_hi
            d = torch.where(free, line.range_lo + t * (line.range_hi - line.range_lo),
                            line.anchor)
            k = torch.where(free, f.slope_of_value(f.value(d)), line.slope)
            lines += [k, bound(f, l, u, k, d)]
        out.append((lines[0], lines[1], lines[2], lines[3]))
    return out


def interval_s(f: SShape, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``[f(lower), f(upper)]`` (``f`` is increasing) enclosed: float64 enclosures, cast
    outward to the bounds' dtype."""
    lo = enclose(f, lower.detach().to(torch.float64))[0]
    hi = enclose(f, upper.detach().to(torch.float64))[1]
    dtype = lower.dtype
    return (_attach(round_to(lo, dtype, up=False), f.value(lower)),
            _attach(round_to(hi, dtype, up=True), f.value(upper)))


def tighten_s(lower: Tensor, upper: Tensor) -> Tensor:
    """S-shaped neurons whose relaxation is not exact (the row's ``tighten``): all but points,
    ``l < u``."""
    return lower < upper


def _smooth_upper(f: SShape, lo: Tensor, hi: Tensor, line: _Line, rule: str
                  ) -> tuple[Tensor, Tensor]:
    """The upper line as differentiable functions of the bounds in their dtype (gradients for
    training; the values come from the certified float64 line): chords and the tangent
    through ``(l, f(l))`` as such, the midpoint tangent at ``(l + u) / 2``."""
    dtype = lo.dtype
    is_chord = line.chord
    fl, fu = f.value(lo), f.value(hi)
    width = hi - lo
    wide = width.detach() > 0
    chord = (fu - fl) / torch.where(wide, width, torch.ones_like(width))
    concave = lo.detach() >= 0
    anchor = line.anchor.to(dtype)
    if rule == "adaptive":
        anchor = torch.where(concave & ~is_chord, (lo + hi) / 2, anchor)
    fd = f.value(anchor)
    kd = f.slope_of_value(fd)
    use_chord = is_chord & wide
    slope = torch.where(use_chord, chord, kd)
    bias = torch.where(use_chord, fl - chord * lo,
                       torch.where(concave | is_chord, fd - kd * anchor, fl - kd * lo))
    return slope, bias


def relax_s(f: SShape, lower: Tensor, upper: Tensor, rule: str) -> Relaxation:
    """The lines of an S-shaped activation over ``lower <= z <= upper`` (module docstring).

    Slopes are chosen in float64 and rounded to the bounds' dtype; each intercept is then
    certified for the rounded slope (:func:`upper_intercept`, :func:`lower_intercept`) and cast
    outward. ``params`` holds, per neuron (float64): the ranges of the lower and upper tangent
    points alpha-CROWN may use and its start in them, and enclosures of ``f(l)``, ``f(u)`` (for
    :func:`s_constant`).
    """
    dtype = lower.dtype
    l, u = lower.detach().to(torch.float64), upper.detach().to(torch.float64)
    low_line, up_line = _choose(f, l, u, rule)
    k_lo, k_up = low_line.slope.to(dtype), up_line.slope.to(dtype)
    b_lo = round_to(lower_intercept(f, l, u, k_lo.to(torch.float64), low_line.anchor), dtype,
                    up=False)
    b_up = round_to(upper_intercept(f, l, u, k_up.to(torch.float64), up_line.anchor), dtype,
                    up=True)
    if torch.is_grad_enabled() and (lower.requires_grad or upper.requires_grad):
        s_up, c_up = _smooth_upper(f, lower, upper, up_line, rule)
        g = f.reflected
        mirrored = _Line(low_line.slope, -low_line.anchor, low_line.range_lo,
                         low_line.range_hi, low_line.start, low_line.chord)
        s_lo, c_lo = _smooth_upper(g, -upper, -lower, mirrored, rule)
        k_lo, b_lo = _attach(k_lo, s_lo), _attach(b_lo, -c_lo)
        k_up, b_up = _attach(k_up, s_up), _attach(b_up, c_up)
    f_l, f_u = enclose(f, l), enclose(f, u)
    params = torch.stack([low_line.range_lo, low_line.range_hi, up_line.range_lo,
                          up_line.range_hi, low_line.start, up_line.start, *f_l, *f_u], 1)
    return Relaxation(k_lo, k_up, b_up, tighten_s(lower, upper), lower, upper, b_lo, params)


def _row_line(f: SShape, relaxation: Relaxation, samples: Tensor, t: Tensor, which: int
              ) -> tuple[Tensor, Tensor]:
    """alpha-CROWN's lines per row: the tangent at ``lo + t (hi - lo)`` of the range of the
    lower (`which` 0) or upper (1) line where it is free, the relaxation's line elsewhere;
    `t` `(B, R, *shape)`. Exact tangents in the rows' dtype (they only choose the rows; the
    rigorous constant does not trust them)."""
    p = relaxation.params.index_select(0, samples).to(t.dtype)
    lo, hi = p[:, 2 * which].unsqueeze(1), p[:, 2 * which + 1].unsqueeze(1)
    free = lo < hi
    d = lo + t.clamp(0.0, 1.0) * torch.where(free, hi - lo, torch.zeros_like(hi))
    d = torch.where(free, d, torch.zeros_like(d))
    v = f.value(d)
    k = f.slope_of_value(v)
    slope = (relaxation.upper if which else relaxation.lower).index_select(0, samples)
    bias = (relaxation.upper_bias if which else relaxation.lower_bias).index_select(0, samples)
    return (torch.where(free, k, slope.unsqueeze(1)),
            torch.where(free, v - k * d, bias.unsqueeze(1)))


def optimizable_s(relaxation: Relaxation, samples: Tensor, rows: int) -> Tensor:
    """alpha-CROWN's free parameters of an S-shape: the positions of the lower and upper
    tangent points in their ranges, `(B, R, 2, *shape)`, started at the relaxation's own."""
    start = relaxation.params.index_select(0, samples)[:, 4:6].to(relaxation.lower.dtype)
    return start.unsqueeze(1).expand(-1, rows, *start.shape[1:]).clone()


def backward_s(f: SShape, a: Tensor, relaxation: Relaxation, samples: Tensor,
               alpha: Tensor | None = None, *, constant: bool = True
               ) -> tuple[Tensor, Tensor | None]:
    """Substitute the lines into rows ``a · f(z)``: ``a+`` takes the lower line and ``a-`` the
    upper one, ``a f(z) >= (a+ kL + a- kU) z + a+ bL + a- bU``.

    Args:
        a, relaxation, samples, constant: As for :func:`backward_relu`.
        alpha: Optional `(B, R, 2, *shape)`: per row, the positions of the lower and upper
            tangent points in their ranges (alpha-CROWN, :func:`optimizable_s`).
    """
    b, r = a.shape[:2]
    if alpha is None:
        k_lo = relaxation.lower.index_select(0, samples).unsqueeze(1)
        k_up = relaxation.upper.index_select(0, samples).unsqueeze(1)
        b_lo = relaxation.lower_bias.index_select(0, samples).unsqueeze(1)
        b_up = relaxation.upper_bias.index_select(0, samples).unsqueeze(1)
    else:
        k_lo, b_lo = _row_line(f, relaxation, samples, alpha[:, :, 0], 0)
        k_up, b_up = _row_line(f, relaxation, samples, alpha[:, :, 1], 1)
    pos = a.clamp(min=0)
    const = None
    if constant:
        const = (pos * b_lo + (a - pos) * b_up).reshape(b, r, -1).sum(2)
    return torch.addcmul(a * k_up, pos, k_lo - k_up), const


def s_constant(f: SShape, mu: Tensor, nu: Tensor, relaxation: Relaxation, samples: Tensor,
               mu_err: Tensor | None, perturbation: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
    """The rigorous constant of ``mu · f(z) >= nu · z + c`` on ``[l, u]`` for any rows `nu`.

    Per neuron, a lower bound of ``min_{z in [l, u]} psi(z)``, ``psi = mu f - nu z``: ``psi`` is
    convex on one side of 0 and concave on the other (which, by the sign of ``mu``). On the
    concave side its minimum is at an end (``l``, ``u`` or 0); on the convex side ``[p, q]``,
    ``psi(z) >= psi(d) + psi'(d) (z - d)`` for any ``d`` in it, taken at the estimated minimizer
    (``f'(d) = nu / mu``, closed form, clipped) with ``psi'(d) = mu f'(d) - nu`` enclosed and
    the worst ``z`` in ``[p, q]``. All in float64 from enclosures of ``f`` (:func:`enclose`,
    stored for ``l`` and ``u`` in the relaxation's ``params``) with directed rounding, summed
    with :func:`_sum_down`: valid in exact arithmetic whatever the lines and `nu` are.
    Arguments and result as for :func:`relu_constant` (the error bound is 0: the constant is
    itself a rigorous lower bound, in the rows' dtype rounded down).
    """
    b, r, n, m, v, lo, hi = _rows_data(mu, nu, relaxation, samples)
    params = relaxation.params.index_select(0, samples).reshape(b, -1, n)
    fl_lo, fl_hi, fu_lo, fu_hi = (params[:, i:i + 1] for i in range(6, 10))
    pos = m >= 0

    def psi_low(z: Tensor, f_lo: Tensor, f_hi: Tensor) -> Tensor:
        return _dn(_dn(m * torch.where(pos, f_lo, f_hi)) - _up(v * z))

    h = torch.minimum(psi_low(lo, fl_lo, fl_hi), psi_low(hi, fu_lo, fu_hi))
    zero = torch.zeros_like(lo)
    f0 = torch.full_like(lo, f.at_zero)
    h = torch.where((lo < 0) & (hi > 0), torch.minimum(h, psi_low(zero, f0, f0)), h)
    # the convex side of psi: f's convex side where mu >= 0, its concave side where mu < 0
    p = torch.where(pos, lo, lo.clamp(min=0.0))
    q = torch.where(pos, hi.clamp(max=0.0), hi)
    with torch.no_grad():  # the anchor is a choice; its gradient is not needed (envelope)
        root = f.where_slope(v / m)
        d = torch.where(pos, -root, root)
        d = torch.minimum(torch.maximum(torch.nan_to_num(d, nan=0.0), p), q)
    fd_lo, fd_hi = enclose(f, d)
    s_lo, s_hi = f.slope_range(fd_lo, fd_hi)
    ms_lo = torch.minimum(_dn(m * s_lo), _dn(m * s_hi))
    ms_hi = torch.maximum(_up(m * s_lo), _up(m * s_hi))
    g_lo, g_hi = _dn(ms_lo - v), _up(ms_hi - v)  # psi'(d)
    distances = (_dn(p - d), _up(p - d), _dn(q - d), _up(q - d))
    worst = torch.stack([_dn(g * x) for g in (g_lo, g_hi) for x in distances]).amin(0)
    at_d = _dn(psi_low(d, fd_lo, fd_hi) + worst)
    h = torch.where(p <= q, torch.minimum(h, at_d), h)
    reach = torch.maximum(torch.maximum(fl_lo.abs(), fl_hi.abs()),
                          torch.maximum(fu_lo.abs(), fu_hi.abs()))
    return _finish_constant(_sum_down(h), v, reach, relaxation, samples, mu_err, perturbation,
                            mu.dtype)


def forward_lines(mid: Tensor, half_width: Tensor, relaxation: Relaxation, sample: Tensor,
                  with_bias: bool) -> tuple[Tensor, Tensor]:
    """:func:`forward_relu` for lines with lower intercepts too (slopes are nonnegative)."""
    alpha = relaxation.lower.index_select(0, sample).unsqueeze(1)
    slope = relaxation.upper.index_select(0, sample).unsqueeze(1)
    lo = alpha * (mid - half_width)
    hi = slope * (mid + half_width)
    if with_bias:
        lo = lo + relaxation.lower_bias.index_select(0, sample).unsqueeze(1)
        hi = hi + relaxation.upper_bias.index_select(0, sample).unsqueeze(1)
    return (hi + lo) / 2, (hi - lo) / 2


# --- the table --------------------------------------------------------------------------------


class ActivationRule(NamedTuple):
    """How the engine bounds one activation type (a row of :data:`ACTIVATIONS`).

    Attributes:
        interval: ``(lo, hi) -> (lo', hi')``, a sound interval image (rounded outward).
        relax: ``(lo, hi, rule) -> Relaxation``, the two lines over the input bounds for a
            method's slope rule.
        backward: ``(rows, relaxation, samples, alpha, constant=) -> (rows', const)``, rows of
            the output substituted into rows of the input (see :func:`backward_relu`).
        constant: ``(mu, nu, relaxation, samples, mu_err, perturbation) -> (c, err)``, the
            rigorous constant of that substitution (see :func:`relu_constant`).
        forward: ``(mid, half, relaxation, samples, with_bias) -> (mid', half')``, forward-mode
            linear bounds pushed through the lines.
        optimizable: ``(relaxation, samples, rows) -> alpha``, the free parameters of
            alpha-CROWN and their start (values in [0, 1]; none for MaxPool2d).
        tighten: ``(lo, hi) -> mask`` `(N, *in_shape)`, the inputs whose linear bounds are
            worth computing to tighten the interval ones: those on which the relaxation is
            not exact and depends (:func:`crossing_zero`, ReLU's unstable neurons, unless
            given; S-shapes: every neuron with ``l < u``; MaxPool: the inputs that may be the
            max of an undecided window).
        elementwise: Output and input are the same neurons (rows on a spatial window pass
            through with the window, the relaxation sliced to it); False for an op that
            changes the shape (MaxPool2d), before which such rows are made dense.
        rounding: ``(lo, hi, dtype) -> E`` float64, how far the model's own activation computed
            in `dtype` can be from the exact one for exact outputs in ``[lo, hi]``
            (:mod:`certify.bounds.forward_error`); None: computed exactly (ReLU, and MaxPool,
            whose max of floats is one of them).

    A row whose functions need the op (its parameters: LeakyReLU's slope, MaxPool's windows)
    is a function of the op that builds its rule with the op bound in (:func:`leaky_relu_rule`,
    :func:`certify.bounds.maxpool.maxpool_rule`); :func:`activation_rule` resolves a row.
    """

    interval: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    relax: Callable[[Tensor, Tensor, str], Relaxation]
    backward: Callable[..., tuple[Tensor, Tensor | None]]
    constant: Callable[..., tuple[Tensor, Tensor]]
    forward: Callable[..., tuple[Tensor, Tensor]]
    optimizable: Callable[[Relaxation, Tensor, int], Tensor]
    tighten: Callable[[Tensor, Tensor], Tensor] = crossing_zero
    elementwise: bool = True
    rounding: Callable[[Tensor, Tensor, torch.dtype], Tensor] | None = None


def leaky_relu_rounding(op: LeakyReluOp, lower: Tensor, upper: Tensor, dtype: torch.dtype
                        ) -> Tensor:
    """How far the model's LeakyReLU in `dtype` can be from the exact one, for outputs in
    ``[lower, upper]`` (float64): ``x >= 0`` passes exactly; ``a x`` is computed with ``a``
    rounded to `dtype` and one rounded product (perhaps in a wider type, then rounded once
    more), within ``4 u |a x| + 2 tiny``."""
    neg = (-lower.to(torch.float64)).clamp(min=0.0)
    u = rounding.unit_roundoff(dtype)
    return _up(neg * (4 * u) + 2 * rounding.tiny(dtype))


def s_rounding(f: SShape, lower: Tensor, upper: Tensor, dtype: torch.dtype) -> Tensor:
    """How far the model's sigmoid/tanh in `dtype` can be from the exact one, for exact outputs
    in ``[lower, upper]`` (float64): :func:`evaluation_error`'s assumption, relative to the
    computed value, which is within ``(M + T) / (1 - c u)`` of the largest exact magnitude
    ``M``; ``2 (c u M + T)`` bounds it generously."""
    reach = torch.maximum(lower.to(torch.float64).abs(), upper.to(torch.float64).abs())
    u = rounding.unit_roundoff(dtype)
    return _up(reach * (2 * EVAL_ULPS * u) + 2 * EVAL_TINY * rounding.tiny(dtype))


def leaky_relu_rule(op: LeakyReluOp) -> ActivationRule:
    """The rule of one LeakyReLU op (its :data:`ACTIVATIONS` row builds it per op: the
    functions take its slope)."""
    return ActivationRule(
        partial(interval_leaky_relu, op), partial(relax_leaky_relu, op),
        partial(backward_leaky_relu, op), partial(leaky_relu_constant, op), forward_relu,
        partial(optimizable_leaky_relu, op), tighten=partial(tighten_leaky_relu, op),
        rounding=partial(leaky_relu_rounding, op))


def _s_rule(f: SShape) -> ActivationRule:
    return ActivationRule(partial(interval_s, f), partial(relax_s, f), partial(backward_s, f),
                          partial(s_constant, f), forward_lines, optimizable_s,
                          tighten=tighten_s, rounding=partial(s_rounding, f))


#: A row is the rule, or for an op with parameters the function that builds its rule.
ACTIVATIONS: dict[type, ActivationRule | Callable[[Any], ActivationRule]] = {
    ReluOp: ActivationRule(interval_relu, relax, backward_relu, relu_constant, forward_relu,
                           optimizable_alpha),
    LeakyReluOp: leaky_relu_rule,
    SigmoidOp: _s_rule(SIGMOID),
    TanhOp: _s_rule(TANH),
    MaxPoolOp: maxpool_rule,
}


def is_activation(op: Any) -> bool:
    """Whether `op` is relaxed (a row of :data:`ACTIVATIONS`) rather than affine."""
    return type(op) in ACTIVATIONS


def activation_rule(op: Any) -> ActivationRule:
    """The rule of `op`: its :data:`ACTIVATIONS` row (built for `op` where the row is a
    function of the op)."""
    row = ACTIVATIONS[type(op)]
    return row if isinstance(row, ActivationRule) else row(op)
