"""The two entry points: :func:`compute_bounds` for any box and specification, and
:func:`margin_bounds` for the margins ``f_y - f_j`` over an L-inf ball."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from certify.bounds import rounding
from certify.bounds.base import BoundMethod, Bounds, resolve_method, with_options
from certify.bounds.forward_error import model_dtype, output_error
from certify.bounds.network import Network, identity_spec, to_network
from certify.bounds.propagation import EngineOptions, Propagator
from certify.errors import SpecError
from certify.spec import LinfBall, margin_spec, round_to

no_tf32 = rounding.no_tf32

__all__ = ["compute_bounds", "margin_bounds"]

_DTYPES = (torch.float32, torch.float64)


def check_box(x_lo: Tensor, x_hi: Tensor) -> None:
    """Validate a batch of boxes `(N, ...)`: float32/64 tensors of one shape, no NaN, lo <= hi.

    Raises:
        SpecError: naming what is wrong and how to fix it.
    """
    for name, t in (("x_lo", x_lo), ("x_hi", x_hi)):
        if not isinstance(t, Tensor):
            raise SpecError(f"{name} must be a tensor (N, C, H, W), got {type(t).__name__}.")
        if t.dtype not in _DTYPES:
            raise SpecError(f"{name} must be float32 or float64, got {t.dtype}; convert the "
                            "inputs (the bound engine follows their dtype).")
        if t.ndim < 2:
            raise SpecError(f"{name} must be batched (N, ...), got shape {tuple(t.shape)}.")
    if x_lo.shape != x_hi.shape or x_lo.dtype != x_hi.dtype or x_lo.device != x_hi.device:
        raise SpecError(f"x_lo and x_hi must match: got {tuple(x_lo.shape)} {x_lo.dtype} "
                        f"{x_lo.device} and {tuple(x_hi.shape)} {x_hi.dtype} {x_hi.device}.")
    if torch.isnan(x_lo).any() or torch.isnan(x_hi).any():
        raise SpecError("the box contains NaN; bounds of a NaN input are meaningless.")
    bad = x_lo > x_hi
    if bad.any():
        gap = float((x_lo - x_hi).max())
        raise SpecError(f"empty box: x_lo > x_hi at {int(bad.sum())} coordinates (by up to "
                        f"{gap:.3g}); pass x_lo <= x_hi elementwise.")


def _check_spec(spec: Tensor, n: int, k: int, like: Tensor) -> Tensor:
    if not isinstance(spec, Tensor) or not spec.is_floating_point():
        got = f"{spec.dtype}" if isinstance(spec, Tensor) else type(spec).__name__
        raise SpecError(f"spec must be a float tensor (N, S, K), got {got}.")
    if spec.ndim != 3 or spec.shape[0] != n or spec.shape[2] != k:
        raise SpecError(f"spec must have shape (N={n}, S, K={k}) (one row per bounded linear "
                        f"function of the {k} outputs), got {tuple(spec.shape)}.")
    if not torch.isfinite(spec).all():
        raise SpecError("spec contains NaN or inf.")
    return spec.to(dtype=like.dtype, device=like.device)


def _check_intermediate(intermediate: tuple[Bounds, ...], net: Network,
                        like: Tensor) -> tuple[Bounds, ...]:
    positions = net.relu_positions
    if len(intermediate) != len(positions):
        raise SpecError(f"intermediate must hold one Bounds per ReLU ({len(positions)}), got "
                        f"{len(intermediate)}.")
    out = []
    for pos, b in zip(positions, intermediate, strict=True):
        want = (like.shape[0], *net.layers[pos].in_shape)
        if tuple(b.lower.shape) != want:
            raise SpecError(f"intermediate bounds of layer {pos} must have shape {want}, got "
                            f"{tuple(b.lower.shape)}.")
        out.append(Bounds(b.lower.to(like.dtype), b.upper.to(like.dtype)))
    return tuple(out)


def compute_bounds(model: nn.Module | Network, x_lo: Tensor, x_hi: Tensor,
                   method: str | BoundMethod = "crown", spec: Tensor | None = None, *,
                   intermediate: tuple[Bounds, ...] | None = None,
                   model_rounding: bool = False, **options: Any) -> Bounds:
    """Sound bounds of ``spec @ f(x)`` for every ``x`` in the box ``[x_lo, x_hi]``, per sample.

    The bounds hold for the network in exact real arithmetic (unless the method was configured
    with ``rigorous=False``): every rounding of the computation is accounted for (see
    :mod:`certify.bounds.rounding`). With `model_rounding` they also hold for the model's own
    floating-point forward pass in its dtype (:mod:`certify.bounds.forward_error`).

    Args:
        model: An ``nn.Sequential`` of supported layers (converted with :func:`to_network`,
            which is cheap) or a :class:`Network`. Always bounded in eval mode.
        x_lo, x_hi: The box `(N, C, H, W)`, float32 or float64; the network follows their
            dtype and device.
        method: A name from :func:`list_methods` or a configured method from
            :func:`get_method`.
        spec: `(N, S, K)`; None bounds the outputs themselves.
        intermediate: Pre-activation bounds to use instead of the method's own (one
            :class:`Bounds` per ReLU, e.g. from ``get_method(m).intermediate(...)``), to compare
            methods with the same intermediate bounds.
        model_rounding: Widen the bounds by the rounding error of the model's own forward
            pass, so that they bound ``spec @ model(x)`` as computed too.
        **options: The method's options (see :func:`get_method`).

    Returns:
        Bounds `(N, S)`, or `(N, *output_shape)` without a spec.

    Raises:
        SpecError: for an empty box, NaN, mismatched shapes or a malformed spec.
        UnsupportedLayerError: for a layer without a bound rule.
        UnknownNameError: for an unknown method name.
    """
    bound_method = resolve_method(method, options)
    check_box(x_lo, x_hi)
    if getattr(bound_method, "takes_module", False) and isinstance(model, nn.Module):
        # a method that bounds the module itself (auto_LiRPA's): no conversion, no rounding
        # control (its radii are confirmed by a native rigorous bound)
        bounds: Bounds = bound_method.bound_module(  # type: ignore[attr-defined]
            model, x_lo, x_hi, spec, intermediate=intermediate)
        return bounds
    given = to_network(model, x_lo.shape[1:])
    net = given.to(dtype=x_lo.dtype, device=x_lo.device)
    if model_rounding:
        net = replace(net, runs_in=model_dtype(given) or x_lo.dtype)
    n = x_lo.shape[0]
    out_shape = net.output_shape
    k = math.prod(out_shape)
    if spec is None:
        spec_t = identity_spec(net, x_lo)
    else:
        spec_t = _check_spec(spec, n, k, x_lo)
    if intermediate is not None:
        intermediate = _check_intermediate(intermediate, net, x_lo)
    if n == 0:
        empty = x_lo.new_zeros(0, spec_t.shape[1])
        bounds = Bounds(empty, empty)
    else:
        by_row = None
        threshold = getattr(bound_method, "threshold", None)
        if model_rounding and isinstance(threshold, (int, float, tuple)):
            # a method that only decides "above the threshold" must decide it for the model's
            # computed output: raise the threshold by that output's rounding error (per row
            # for per-row thresholds)
            by_row = _output_error(net, x_lo, x_hi, spec_t, None)
            if isinstance(threshold, tuple):
                raised: float | tuple[float, ...] = tuple(
                    float(rounding.up(torch.tensor(t, dtype=torch.float64) + e).item())
                    for t, e in zip(threshold, by_row.max(0).values.tolist(), strict=True))
            else:
                raised = float(rounding.up(by_row.max()).item()) + threshold
            bound_method = with_options(bound_method, {"threshold": raised})
        with no_tf32():
            bounds = bound_method.bound(net, x_lo, x_hi, spec_t, intermediate=intermediate)
        if model_rounding:
            if by_row is None:
                by_row = _output_error(net, x_lo, x_hi, spec_t, bounds.pre_activation)
            bounds = _widen(bounds, by_row)
    if spec is None and len(out_shape) != 1:
        return Bounds(bounds.lower.reshape(n, *out_shape), bounds.upper.reshape(n, *out_shape))
    return bounds


def _output_error(net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor,
                  pre: tuple[Bounds, ...] | None) -> Tensor:
    """``|spec| @ E`` `(N, S)` float64, `E` the model's rounding of its last chain (a method
    accounts for every earlier one itself); magnitudes from `pre` or from intervals."""
    assert net.runs_in is not None
    if pre is None:
        prop = Propagator(net, x_lo, x_hi, EngineOptions())
        prop.interval()
        pre = prop.intermediate_bounds()
    err = output_error(net, pre, x_lo, x_hi, net.runs_in).flatten(1)  # (N, K)
    spec_abs = spec.detach().to(torch.float64).abs()
    k = spec_abs.shape[2]
    by_row = torch.bmm(spec_abs, err.unsqueeze(2)).squeeze(2)
    return rounding.up(by_row * (1 + rounding.gamma(k + 1, torch.float64)))


def _widen(bounds: Bounds, by_row: Tensor) -> Bounds:
    """`bounds` widened by `by_row` (float64), rounded outward."""
    lower = _cast_down(bounds.lower.detach().to(torch.float64) - by_row, bounds.lower)
    upper = -_cast_down(-bounds.upper.detach().to(torch.float64) - by_row, bounds.upper)
    # a constant shift: gradients (robust training) flow as through the unshifted bounds
    return replace(bounds, lower=bounds.lower + (lower - bounds.lower).detach(),
                   upper=bounds.upper + (upper - bounds.upper).detach())


def _cast_down(values: Tensor, like: Tensor) -> Tensor:
    """float64 `values` (from a subtraction, rounded down first) in `like`'s dtype, never
    above the exact value."""
    return round_to(rounding.down(values), like.dtype, up=False)


def margin_bounds(model: nn.Module | Network, x: Tensor, y: Tensor, eps: float | Tensor,
                  method: str | BoundMethod = "crown", *, model_rounding: bool | None = None,
                  **options: Any) -> Bounds:
    """Bounds of the margins ``f_y(x') - f_j(x')``, ``j != y``, over ``clip(x ± eps, 0, 1)``.

    A sample is verified at `eps` iff ``lower.min(1) > 0`` (strictly). The bounds hold for the
    network in exact arithmetic *and* for the model's own forward pass in its dtype (see
    :func:`compute_bounds` with ``model_rounding=True``), so a proof means that no point of the
    ball changes the prediction of either.

    Args:
        model: As for :func:`compute_bounds`.
        x: Images `(N, C, H, W)` in [0, 1].
        y: Labels `(N,)`.
        eps: A float or per-sample radii `(N,)`, >= 0.
        method: As for :func:`compute_bounds`.
        model_rounding: Cover the model's own forward pass too (default: when the method is
            rigorous; a plain bound may still include it, to estimate the rigorous one).
        **options: The method's options.

    Returns:
        Bounds `(N, K - 1)`, the `j`-th column for the `j`-th class other than `y` in
        increasing order (see :func:`certify.spec.margin_spec`).

    Raises:
        SpecError: for eps < 0, x outside [0, 1], labels out of range or mismatched shapes.
    """
    region = LinfBall(x, eps)  # type: ignore[arg-type]  # a float eps is taken as float64
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise SpecError(f"labels must have shape ({x.shape[0]},), one per image, got {got}.")
    bound_method = resolve_method(method, options)
    if x.dtype not in _DTYPES:
        raise SpecError(f"x must be float32 or float64, got {x.dtype}.")
    x_lo, x_hi = region.box()
    if getattr(bound_method, "takes_module", False) and isinstance(model, nn.Module):
        k = _output_size(model, x)
        spec = margin_spec(y.to(x.device), k).to(x.dtype)
        return compute_bounds(model, x_lo, x_hi, bound_method, spec)
    net = to_network(model, x.shape[1:])
    k = math.prod(net.output_shape)
    spec = margin_spec(y.to(x.device), k).to(x.dtype)
    if model_rounding is None:
        model_rounding = getattr(bound_method, "rigorous", True)
    return compute_bounds(net, x_lo, x_hi, bound_method, spec, model_rounding=model_rounding)


def _output_size(model: nn.Module, x: Tensor) -> int:
    """The number of outputs of `model` on one sample of `x` (a forward pass)."""
    from certify.attacks import eval_mode

    with eval_mode(model), torch.no_grad():
        return math.prod(model(x[:1]).shape[1:])
