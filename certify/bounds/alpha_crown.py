"""alpha-CROWN: CROWN with lower slopes optimized per specification row.

Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
Massively Parallel Incomplete Verifiers", ICLR 2021. Any lower slope ``alpha`` in ``[0, 1]``
gives a sound bound, so the bound is a function of the slopes that can be maximized: each
output row (the lower bound of each specification row, and of its negation for the upper bound)
gets its own slopes for every unstable neuron, initialized with CROWN's adaptive slopes and
improved by projected gradient ascent (Adam, then clamping to ``[0, 1]``). Every iterate is a
sound bound; the best one per row is kept, so the result is never looser than CROWN's with the
same intermediate bounds.

**Every layer** (``optimize_intermediate``, the default when no intermediate bounds are given):
the bounds of each unstable neuron of every later ReLU layer are themselves alpha-CROWN bounds,
with their own slopes per neuron row (lower and upper bound separately) for every ReLU below
them, and they shape the relaxations above: all slopes are optimized jointly for the output
rows' bound, the intermediate bounds recomputed in every iteration from the current slopes and
intersected with CROWN's (both are sound). Each intermediate row keeps its best slopes; the
final bound is then computed rigorously layer by layer from those slopes, and the result is the
elementwise best of it and CROWN's own rigorous bound.

The optimization runs with autograd enabled even under ``torch.no_grad()`` and on detached
weights; the returned bounds carry no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.base import Bounds, register_method
from certify.bounds.crown import LinearRelaxationMethod, crown_output, output_rows, spec_op
from certify.bounds.layers import numel, true_first
from certify.bounds.network import Network, identity_spec
from certify.bounds.propagation import BACKWARD_FACTOR, MB, Propagator
from certify.bounds.relaxations import activation_rule
from certify.errors import SpecError

__all__ = ["AlphaCrown", "adam_ascent", "keep_best", "optimized_intermediate"]


@register_method("alpha-crown")
@dataclass(frozen=True)
class AlphaCrown(LinearRelaxationMethod):
    """alpha-CROWN with CROWN intermediate bounds.

    Options:
        memory_budget_mb, chunk_size, intermediate_mode: As for ``crown``; the budget also
            sets how many samples are optimized at once (their slopes, gradients and Adam
            state are held in memory together).
        steps: Gradient steps (0 gives CROWN's bound).
        lr: Adam learning rate for the slopes.
        optimize_intermediate: Optimize the slopes of every intermediate layer's bounds too
            (the module docstring); False keeps CROWN's intermediate bounds.
        optimize_upper: Optimize the upper bounds too (their own slopes); False: the upper
            bounds are CROWN's and all the effort goes to the lower ones (what a radius search
            needs, which sets it).
    """

    steps: int = 20
    lr: float = 0.1
    intermediate_mode: str = "auto"
    optimize_intermediate: bool = True
    optimize_upper: bool = True
    name: ClassVar[str] = "alpha-crown"
    refines_intermediate: ClassVar[bool] = True
    slope_rule: ClassVar[str] = "adaptive"
    linear_intermediate: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise SpecError(f"alpha-crown: steps must be an int >= 0, got {self.steps!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise SpecError(f"alpha-crown: lr must be > 0, got {self.lr!r}.")
        for flag in ("optimize_intermediate", "optimize_upper"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"alpha-crown: {flag} must be True or False, got "
                                f"{getattr(self, flag)!r}.")

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]` (inputs as validated by
        :func:`compute_bounds`); `(N, S)`, or the flattened outputs `(N, K)` without a spec."""
        spec = identity_spec(net, x_lo) if spec is None else spec
        with torch.no_grad():
            if intermediate is not None:
                intermediate = tuple(Bounds(b.lower.detach(), b.upper.detach())
                                     for b in intermediate)
            prop = self.propagator(net.detach(), x_lo.detach(), x_hi.detach(), spec.detach(),
                                   intermediate)
        start, n, s = output_rows(prop)
        last = spec_op(prop)
        # Rows: the lower bound of every spec row, then of its negation (the upper bound);
        # only the first without optimize_upper (the upper bound is then CROWN's)
        sides = 2 if self.optimize_upper else 1
        rows = torch.cat([last.weight, -last.weight][:sides], 1)  # (N, 2S, I)
        rows = rows.reshape(n, sides * s, *last.in_shape)
        const = torch.cat([last.bias, -last.bias][:sides], 1)  # (N, 2S)
        rows_err = const_err = None
        if last.weight_err is not None:
            rows_err = torch.cat([last.weight_err] * sides, 1).reshape(rows.shape)
        if last.bias_err is not None:
            const_err = torch.cat([last.bias_err] * sides, 1)
        layerwise = (self.optimize_intermediate and intermediate is None and self.steps > 0
                     and len(prop.net.relu_positions) > 1)
        group = self._samples_per_group(prop, start, sides * s, layerwise=layerwise)
        best = []
        for first in range(0, n, group):
            samples = torch.arange(first, min(n, first + group), device=rows.device)
            args = (rows[samples], const[samples], samples,
                    None if rows_err is None else rows_err[samples],
                    None if const_err is None else const_err[samples])
            if layerwise:
                best.append(_Layerwise(self, prop, start, *args).run())
            else:
                best.append(self._optimize(prop, start, *args))
        lower_rows = torch.cat(best)
        if self.optimize_upper:
            return prop.finish(lower_rows[:, :s], -lower_rows[:, s:])
        with torch.no_grad():  # CROWN's upper bound with CROWN's intermediate bounds
            crown = crown_output(prop)
        return prop.finish(lower_rows, crown.upper)

    def _samples_per_group(self, prop: Propagator, start: int, rows_per_sample: int, *,
                           layerwise: bool = False) -> int:
        positions = prop.net.relu_positions
        sizes = [numel(prop.layers[p].in_shape) for p in positions]
        relu_size = sum(sizes)
        path = sum(numel(op.out_shape) for op in prop.layers[:start])
        # at least one byte a row: a net without ReLUs (nothing to optimize) has no cost here
        per_row = max(1, (4 * relu_size + BACKWARD_FACTOR * path) * prop.itemsize)
        per_sample = per_row * rows_per_sample
        if layerwise:  # every unstable intermediate neuron is two rows with their own slopes
            for k, p in enumerate(positions[1:], 1):
                lo, hi = prop.pre_bounds[p]
                rows_k = 2 * int(((lo < 0) & (hi > 0)).flatten(1).sum(1).max())
                path_k = sum(numel(op.out_shape) for op in prop.layers[:p])
                per_sample += rows_k * (4 * sum(sizes[:k]) + BACKWARD_FACTOR * path_k) \
                    * prop.itemsize
        return max(1, int(self.memory_budget_mb * MB // per_sample))

    def _optimize(self, prop: Propagator, start: int, rows: Tensor, const: Tensor,
                  samples: Tensor, rows_err: Tensor | None, const_err: Tensor | None
                  ) -> Tensor:
        """Best lower bound per row over the slope iterates, `(B, R)` for rows `(B, R, ...)`."""
        r = rows.shape[1]
        positions = [p for p in prop.net.relu_positions if p < start]
        alphas = {p: activation_rule(prop.layers[p]).optimizable(prop.relaxations[p], samples, r)
                  .requires_grad_(True)
                  for p in positions
                  if bool(prop.relaxations[p].unstable.index_select(0, samples).any())}
        if not alphas or self.steps == 0:  # CROWN's bound
            with torch.no_grad():
                return prop.backward_chunk(start, rows, const, samples, both=False,
                                           rows_err=rows_err, const_err=const_err)[0]
        params = list(alphas.values())
        state = [(torch.zeros_like(a), torch.zeros_like(a)) for a in params]
        best: Tensor | None = None
        best_alphas = {p: a.detach().clone() for p, a in alphas.items()}
        for step in range(self.steps + 1):  # iterate 0 is CROWN's slopes
            with torch.enable_grad():
                lower, _ = prop.backward_chunk(start, rows, const, samples, both=False,
                                               alphas=alphas, rigorous=False)
                value = lower.detach()
                if best is None:
                    best = value
                else:  # keep each row's best slopes
                    best = keep_best(value, best, alphas, best_alphas)
                if step == self.steps:
                    break
                grads = torch.autograd.grad(lower.sum(), params)
            with torch.no_grad():
                for alpha, grad, (m, v) in zip(params, grads, state, strict=True):
                    adam_ascent(alpha, grad, m, v, step + 1, self.lr)
        assert best is not None
        if not prop.rigorous:
            return best
        with torch.no_grad():  # the bound at each row's best slopes, every rounding accounted
            return prop.backward_chunk(start, rows, const, samples, both=False,
                                       alphas=best_alphas, rows_err=rows_err,
                                       const_err=const_err)[0]


def keep_best(value: Tensor, best: Tensor, current: Mapping[Any, Tensor],
              kept: MutableMapping[Any, Tensor]) -> Tensor:
    """Each row's best iterate: the larger of `value` and `best` `(B, R)`, returned; where
    `value` is larger, the row's parameters `(B, R, ...)` of `current` are copied into `kept`."""
    better = value > best
    for key, a in current.items():
        mask = better.view(*better.shape, *([1] * (a.ndim - 2)))
        kept[key] = torch.where(mask, a.detach(), kept[key])
    return torch.where(better, value, best)


_SQRT_FLOOR = 1e-30  # a normal number in float32 and float64


def adam_ascent(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int, lr: float, *,
                upper: float | None = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8) -> None:
    """One Adam step *up* the gradient (Kingma & Ba 2015), then projection onto [0, `upper`]
    (``[0, inf)`` for ``upper=None``)."""
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    # lr m_hat / (sqrt(v_hat) + eps) with the bias corrections folded into scalars. The
    # square root is taken of v + 1e-30: x86 CPUs take ~20x longer for sqrt(0) than for any
    # normal number, and most entries of v are zero (the slopes of stable neurons, which get
    # no gradient); the floor moves sqrt(v_hat) by at most 1e-15, far below eps.
    denom = v.add(_SQRT_FLOOR).sqrt_().div_(math.sqrt(1 - betas[1] ** t)).add_(eps)
    param.addcdiv_(m, denom, value=lr / (1 - betas[0] ** t)).clamp_(0.0, upper)


def optimized_intermediate(method: AlphaCrown, prop: Propagator, rows: Tensor, const: Tensor,
                           rows_err: Tensor | None, const_err: Tensor | None
                           ) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """alpha-CROWN on every layer for the lower bounds of `rows` `(N, R, ...)` (the output
    rows of `prop`'s specification): returns their bounds `(N, R)` and the optimized
    pre-activation bounds of every activation (as `prop.pre_bounds`: with the model's own
    rounding, rigorous when `prop` is), in groups of samples that fit the memory budget."""
    start = len(prop.layers)
    n = int(rows.shape[0])
    group = method._samples_per_group(prop, start, int(rows.shape[1]), layerwise=True)
    lowers: list[Tensor] = []
    found: dict[int, list[tuple[Tensor, Tensor]]] = {p: [] for p in prop.net.relu_positions}
    for first in range(0, n, group):
        samples = torch.arange(first, min(n, first + group), device=rows.device)
        run = _Layerwise(method, prop, start, rows[samples], const[samples], samples,
                         None if rows_err is None else rows_err[samples],
                         None if const_err is None else const_err[samples])
        lowers.append(run.run())
        for p in found:
            found[p].append(run.prop.pre_bounds[p])
    bounds = {p: (torch.cat([b[0] for b in v]), torch.cat([b[1] for b in v]))
              for p, v in found.items()}
    return torch.cat(lowers), bounds


class _Layerwise:
    """alpha-CROWN with optimized intermediate bounds for one group of samples (see the module
    docstring): rows `(B, R, ...)` of the output, as for :meth:`AlphaCrown._optimize`."""

    def __init__(self, method: AlphaCrown, prop: Propagator, start: int, rows: Tensor,
                 const: Tensor, samples: Tensor, rows_err: Tensor | None,
                 const_err: Tensor | None) -> None:
        self.m = method
        self.start = start
        self.rows, self.const, self.rows_err, self.const_err = rows, const, rows_err, const_err
        net = prop.net
        self.positions = list(net.relu_positions)
        # a propagator of the group alone, with the reference (CROWN) bounds and relaxations
        sub = Propagator(net, prop.x_lo[samples], prop.x_hi[samples], prop.options)
        for p in self.positions:
            lo, hi = (t.index_select(0, samples) for t in prop.pre_bounds[p])
            sub.pre_bounds[p] = (lo, hi)
            sub.relaxations[p] = activation_rule(net.layers[p]).relax(lo, hi, "adaptive")
            if p in prop.perturbation:
                sub.perturbation[p] = prop.perturbation[p].index_select(0, samples)
        sub.nonfinite = prop.nonfinite.index_select(0, samples)
        self.prop = sub
        self.b = int(samples.shape[0])
        self.local = torch.arange(self.b, device=rows.device)
        # the unstable neurons of each later layer, as rows (lower, then negated for upper)
        self.targets: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._rows_of: dict[int, Tensor] = {}
        for p in self.positions[1:]:
            lo, hi = sub.pre_bounds[p]
            unstable = sub.relaxations[p].unstable.reshape(self.b, -1)
            counts = unstable.sum(1)
            r = int(counts.max()) if self.b else 0
            if r == 0:
                continue
            order, valid = true_first(unstable, r)
            self.targets[p] = (order, valid, unstable)

    def _one_hot(self, p: int) -> Tensor:
        """The rows selecting layer `p`'s unstable neurons (lower, then negated), built once."""
        cached = self._rows_of.get(p)
        if cached is not None:
            return cached
        order, valid, unstable = self.targets[p]
        r = order.shape[1]
        e = unstable.new_zeros(unstable.shape, dtype=self.rows.dtype)
        e = e.unsqueeze(1).expand(-1, r, -1).clone()
        e.scatter_(2, order.unsqueeze(2), valid.unsqueeze(2).to(e.dtype))
        shape = self.prop.layers[p].in_shape
        self._rows_of[p] = torch.cat([e, -e], 1).reshape(self.b, 2 * r, *shape)
        return self._rows_of[p]

    def _slopes(self, rows: int, below: list[int]) -> dict[int, Tensor]:
        return {q: activation_rule(self.prop.layers[q]).optimizable(
            self.prop.relaxations[q], self.local, rows).requires_grad_(True)
            for q in below if bool(self.prop.relaxations[q].unstable.any())}

    def _layer_bounds(self, p: int, alphas: dict[int, Tensor], rigorous: bool
                      ) -> tuple[Tensor, Tensor]:
        """Bounds `(B, R)` of layer `p`'s unstable neurons from slopes `alphas` (rows: lower
        of the neuron, then of its negation)."""
        order, _, _ = self.targets[p]
        r = order.shape[1]
        rows = self._one_hot(p)
        lower, _ = self.prop.backward_chunk(p, rows, rows.new_zeros(self.b, 2 * r), self.local,
                                            both=False, alphas=alphas, rigorous=rigorous)
        return lower[:, :r], -lower[:, r:]

    def _set(self, p: int, lo_rows: Tensor, hi_rows: Tensor, ref: tuple[Tensor, Tensor],
             *, rigorous: bool) -> None:
        """Intersect the reference bounds of layer `p` with the rows' bounds and relax."""
        order, valid, _ = self.targets[p]
        ref_lo, ref_hi = ref
        shape = ref_lo.shape
        e = self.prop.perturbation.get(p)
        if e is not None:  # bounds of the exact chain, widened by the model's own rounding
            e_rows = e.reshape(self.b, -1).gather(1, order)
            lo_rows, hi_rows = lo_rows - e_rows, hi_rows + e_rows
            if rigorous:
                lo_rows, hi_rows = rounding.down(lo_rows), rounding.up(hi_rows)
        inf = torch.tensor(float("inf"), dtype=lo_rows.dtype, device=lo_rows.device)
        with torch.no_grad():
            lo = ref_lo.reshape(self.b, -1).scatter_reduce(
                1, order, torch.where(valid, lo_rows, -inf), "amax")
            hi = ref_hi.reshape(self.b, -1).scatter_reduce(
                1, order, torch.where(valid, hi_rows, inf), "amin")
        if lo_rows.requires_grad or hi_rows.requires_grad:
            # the intersection's value, the rows' gradient (straight through): a neuron whose
            # rows only tie with or lose to the reference bound still steers its slopes
            zero = torch.zeros((), dtype=lo_rows.dtype, device=lo_rows.device)
            for_lo = lo.new_zeros(lo.shape).scatter_add(1, order,
                                                        torch.where(valid, lo_rows, zero))
            for_hi = hi.new_zeros(hi.shape).scatter_add(1, order,
                                                        torch.where(valid, hi_rows, zero))
            lo = lo + (for_lo - for_lo.detach())
            hi = hi + (for_hi - for_hi.detach())
        lo, hi = lo.reshape(shape), hi.reshape(shape)
        self.prop.pre_bounds[p] = (lo, hi)
        self.prop.relaxations[p] = activation_rule(self.prop.layers[p]).relax(lo, hi, "adaptive")

    def run(self) -> Tensor:
        m = self.m
        ref = {p: self.prop.pre_bounds[p] for p in self.positions}
        ref_relax = dict(self.prop.relaxations)
        r_out = self.rows.shape[1]
        below = {p: [q for q in self.positions if q < p] for p in self.targets}
        with torch.no_grad():  # CROWN's own rigorous bound: the result is never looser
            crown, _ = self.prop.backward_chunk(self.start, self.rows, self.const, self.local,
                                                both=False, rows_err=self.rows_err,
                                                const_err=self.const_err)
        inner = {p: self._slopes(2 * self.targets[p][0].shape[1], below[p])
                 for p in self.targets}
        outer = self._slopes(r_out, self.positions)
        params = [a for d in inner.values() for a in d.values()] + list(outer.values())
        if not params:
            return crown
        state = [(torch.zeros_like(a), torch.zeros_like(a)) for a in params]
        best = torch.full_like(crown, float("-inf"))
        best_outer = {q: a.detach().clone() for q, a in outer.items()}
        best_inner = {p: {q: a.detach().clone() for q, a in d.items()} for p, d in inner.items()}
        best_rows = {p: torch.full((self.b, 2 * self.targets[p][0].shape[1]), float("-inf"),
                                   dtype=crown.dtype, device=crown.device) for p in inner}
        for step in range(m.steps + 1):
            # the last iterate is only evaluated: no graph for a gradient
            with torch.enable_grad() if step < m.steps else torch.no_grad():
                for p in self.positions[1:]:
                    if p not in self.targets:
                        continue
                    lo_rows, hi_rows = self._layer_bounds(p, inner[p], rigorous=False)
                    value = torch.cat([lo_rows, -hi_rows], 1).detach()
                    best_rows[p] = keep_best(value, best_rows[p], inner[p], best_inner[p])
                    self._set(p, lo_rows, hi_rows, ref[p], rigorous=False)
                lower, _ = self.prop.backward_chunk(self.start, self.rows, self.const,
                                                    self.local, both=False, alphas=outer,
                                                    rigorous=False)
                best = keep_best(lower.detach(), best, outer, best_outer)
                if step == m.steps:
                    break
                grads = torch.autograd.grad(lower.sum(), params, allow_unused=True)
            with torch.no_grad():
                for a, g, (mm, v) in zip(params, grads, state, strict=True):
                    if g is not None:
                        adam_ascent(a, g, mm, v, step + 1, m.lr)
        with torch.no_grad():
            # the rigorous bounds, layer by layer, from each row's best slopes
            self.prop.relaxations.update(ref_relax)
            self.prop.pre_bounds.update(ref)
            rigorous = self.prop.rigorous
            for p in self.positions[1:]:
                if p in self.targets:
                    lo_rows, hi_rows = self._layer_bounds(p, best_inner[p], rigorous=rigorous)
                    self._set(p, lo_rows, hi_rows, ref[p], rigorous=rigorous)
            lower, _ = self.prop.backward_chunk(
                self.start, self.rows, self.const, self.local, both=False, alphas=best_outer,
                rows_err=self.rows_err if rigorous else None,
                const_err=self.const_err if rigorous else None)
            lower = torch.where(torch.isnan(lower), float("-inf"), lower)
            if not rigorous:  # the best iterate is a bound too
                lower = torch.maximum(lower, best)
            return torch.maximum(lower, crown)
