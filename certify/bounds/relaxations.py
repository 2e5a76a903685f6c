"""Linear relaxations of the activations, one rule per op type in :data:`ACTIVATIONS`.

The propagation (:mod:`certify.bounds.propagation`) knows activations only through this table:
an :class:`ActivationRule` says how an activation maps interval bounds, how it is relaxed
between two lines given its input's bounds, how rows are substituted backward through those
lines (with the rigorous constant), and forward. A new activation is a row here (and an op and
a converter in :mod:`certify.bounds.layers`/:mod:`certify.bounds.network`). The bound methods
choose the lower slope: the *mapper* of each method is its slope rule below.

"Activation" means any op relaxed over bounds of its input: also MaxPool2d, which changes the
shape (its row, :func:`certify.bounds.maxpool.maxpool_rule`, is built per op from the op's
geometry, and says which inputs are worth tightening and that rows on a spatial window must be
made dense before it).

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.layers import MaxPoolOp, ReluOp
from certify.bounds.maxpool import maxpool_rule

__all__ = [
    "ACTIVATIONS",
    "SLOPE_RULES",
    "ActivationRule",
    "Relaxation",
    "backward_relu",
    "crossing_zero",
    "forward_relu",
    "is_activation",
    "optimizable_alpha",
    "relax",
    "relu_constant",
]

SLOPE_RULES = ("adaptive", "parallel")


@dataclass(frozen=True, eq=False)
class Relaxation:
    """The two lines of one ReLU layer, per sample.

    Attributes:
        lower: Lower slopes ``alpha`` `(N, *shape)`.
        upper: Upper slopes ``s`` `(N, *shape)`.
        upper_bias: Upper intercepts ``t`` `(N, *shape)`.
        unstable: `(N, *shape)` bool, where ``l < 0 < u`` (where ``alpha`` is free).
        pre_lower, pre_upper: The pre-activation bounds ``l``, ``u`` `(N, *shape)` themselves
            (the rigorous constant, :func:`relu_constant`, is computed from them).
    """

    lower: Tensor
    upper: Tensor
    upper_bias: Tensor
    unstable: Tensor
    pre_lower: Tensor
    pre_upper: Tensor


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
    upper = relaxation.upper.index_select(0, samples).unsqueeze(1)
    bias = relaxation.upper_bias.index_select(0, samples).reshape(b, -1, 1)
    lower = relaxation.lower.index_select(0, samples).unsqueeze(1)
    if alpha is not None:
        unstable = relaxation.unstable.index_select(0, samples).unsqueeze(1)
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
    lo = relaxation.pre_lower.index_select(0, samples).reshape(b, n)
    hi = relaxation.pre_upper.index_select(0, samples).reshape(b, n)
    unstable = relaxation.unstable.index_select(0, samples).reshape(b, n)
    # Stable neurons: the substitution is exact (nu is mu itself on active neurons, 0 on
    # inactive ones, bit for bit), so h = 0 with no rounding. Unstable (l < 0 < u): the
    # minimum of h over [l, u] is min(h(l), h(u), h(0)) = min(-nu l, (mu - nu) u, 0). Only
    # the unstable neurons are gathered (padded to the most of any sample).
    counts = unstable.sum(1)
    m = int(counts.max()) if b else 0
    total = mu.new_zeros(b, r)
    err_sum = mu.new_zeros(b, r)
    magnitude = mu.new_zeros(b, r)
    if m:
        order = torch.sort(unstable.to(torch.int8), dim=1, descending=True,
                           stable=True).indices[:, :m]  # (b, m): unstable first
        valid = (torch.arange(m, device=mu.device)[None, :] < counts[:, None]).unsqueeze(1)
        index = order.unsqueeze(1).expand(b, r, m)
        mu_u, nu_u = mu.gather(2, index), nu.gather(2, index)
        lo_u, hi_u = lo.gather(1, order).unsqueeze(1), hi.gather(1, order).unsqueeze(1)
        zero = torch.zeros((), dtype=dtype, device=mu.device)
        h = torch.where(valid, torch.minimum(-nu_u * lo_u, (mu_u - nu_u) * hi_u).clamp(max=0),
                        zero)
        err = torch.where(valid, nu_u.abs() * (hi_u - lo_u) + mu_u.abs() * hi_u, zero)
        total = h.sum(2)
        magnitude = h.abs().sum(2)
        err_sum = rounding.gamma(3, dtype) * err.sum(2)
    if mu_err is not None:
        err_sum = err_sum + torch.bmm(mu_err.reshape(b, r, n), hi.clamp(min=0).unsqueeze(2)
                                      ).squeeze(2)
    if perturbation is not None:
        e = perturbation.index_select(0, samples).reshape(b, n, 1)
        paid = torch.bmm(nu.abs(), e).squeeze(2)
        total = total - paid
        magnitude = magnitude + paid
        err_sum = err_sum + rounding.gamma(n + 2, dtype) * paid
    # (gamma of the layer's size, not of the gathered count: the bound of a row must not
    # depend on which other samples share its block)
    bound = err_sum + rounding.gamma(n + 2, dtype) * magnitude + 6 * n * rounding.tiny(dtype)
    return total, bound


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
    """The unstable neurons, ``l < 0 < u``: the only ReLUs whose relaxation changes when their
    input bounds tighten (the default ``tighten`` of a row)."""
    return (lower < 0) & (upper > 0)


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
        optimizable: ``(relaxation, samples, rows) -> alpha``, the free lower slopes of
            alpha-CROWN and their start.
        tighten: ``(lo, hi) -> mask`` `(N, *in_shape)`, the inputs whose linear bounds are
            worth computing to tighten the interval ones (:func:`crossing_zero`, ReLU's
            unstable neurons, unless given).
        elementwise: Output and input are the same neurons (rows on a spatial window pass
            through with the window, the relaxation sliced to it); False for an op that
            changes the shape (MaxPool2d), before which such rows are made dense.
    """

    interval: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    relax: Callable[[Tensor, Tensor, str], Relaxation]
    backward: Callable[..., tuple[Tensor, Tensor | None]]
    constant: Callable[..., tuple[Tensor, Tensor]]
    forward: Callable[..., tuple[Tensor, Tensor]]
    optimizable: Callable[[Relaxation, Tensor, int], Tensor]
    tighten: Callable[[Tensor, Tensor], Tensor] = crossing_zero
    elementwise: bool = True


#: A row is the rule, or for an op with parameters the function that builds its rule.
ACTIVATIONS: dict[type, ActivationRule | Callable[[Any], ActivationRule]] = {
    ReluOp: ActivationRule(interval_relu, relax, backward_relu, relu_constant, forward_relu,
                           optimizable_alpha),
    MaxPoolOp: maxpool_rule,
}


def is_activation(op: Any) -> bool:
    """Whether `op` is relaxed (a row of :data:`ACTIVATIONS`) rather than affine."""
    return type(op) in ACTIVATIONS


def activation_rule(op: Any) -> ActivationRule:
    """The rule of `op`: its :data:`ACTIVATIONS` row (built for `op` where the row is a
    function)."""
    row = ACTIVATIONS[type(op)]
    return row if isinstance(row, ActivationRule) else row(op)
