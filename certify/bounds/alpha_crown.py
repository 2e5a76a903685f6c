"""alpha-CROWN: CROWN with lower slopes optimized per specification row.

Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
Massively Parallel Incomplete Verifiers", ICLR 2021. Any lower slope ``alpha`` in ``[0, 1]``
gives a sound bound, so the bound is a function of the slopes that can be maximized: each
output row (the lower bound of each specification row, and of its negation for the upper bound)
gets its own slopes for every unstable neuron, initialized with CROWN's adaptive slopes and
improved by projected gradient ascent (Adam, then clamping to ``[0, 1]``). Every iterate is a
sound bound; the best one per row is kept, so the result is never looser than CROWN's with the
same intermediate bounds (which are CROWN's here; they are not optimized).

The optimization runs with autograd enabled even under ``torch.no_grad()`` and on detached
weights; the returned bounds carry no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from certify.bounds.base import Bounds, register_method
from certify.bounds.crown import LinearRelaxationMethod, output_rows, spec_op
from certify.bounds.layers import numel
from certify.bounds.network import Network, identity_spec
from certify.bounds.propagation import BACKWARD_FACTOR, MB, Propagator
from certify.bounds.relaxations import activation_rule
from certify.errors import SpecError

__all__ = ["AlphaCrown", "adam_ascent"]


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
    """

    steps: int = 20
    lr: float = 0.1
    intermediate_mode: str = "auto"
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
        # Rows: the lower bound of every spec row, then of its negation (the upper bound).
        rows = torch.cat([last.weight, -last.weight], 1)  # (N, 2S, I)
        rows = rows.reshape(n, 2 * s, *last.in_shape)
        const = torch.cat([last.bias, -last.bias], 1)  # (N, 2S)
        rows_err = const_err = None
        if last.weight_err is not None:
            rows_err = torch.cat([last.weight_err, last.weight_err], 1).reshape(rows.shape)
        if last.bias_err is not None:
            const_err = torch.cat([last.bias_err, last.bias_err], 1)
        group = self._samples_per_group(prop, start, 2 * s)
        best = []
        for first in range(0, n, group):
            samples = torch.arange(first, min(n, first + group), device=rows.device)
            best.append(self._optimize(
                prop, start, rows[samples], const[samples], samples,
                None if rows_err is None else rows_err[samples],
                None if const_err is None else const_err[samples]))
        lower_rows = torch.cat(best)
        return prop.finish(lower_rows[:, :s], -lower_rows[:, s:])

    def _samples_per_group(self, prop: Propagator, start: int, rows_per_sample: int) -> int:
        relu_size = sum(numel(prop.layers[p].in_shape) for p in prop.net.relu_positions)
        path = sum(numel(op.out_shape) for op in prop.layers[:start])
        # at least one byte a row: a net without ReLUs (nothing to optimize) has no cost here
        per_row = max(1, (4 * relu_size + BACKWARD_FACTOR * path) * prop.itemsize)
        rows = max(1, int(self.memory_budget_mb * MB // per_row))
        return max(1, rows // rows_per_sample)

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
                    better = value > best
                    best = torch.where(better, value, best)
                    for p, a in alphas.items():
                        mask = better.view(*better.shape, *([1] * (a.ndim - 2)))
                        best_alphas[p] = torch.where(mask, a.detach(), best_alphas[p])
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


def adam_ascent(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int, lr: float, *,
                upper: float | None = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8) -> None:
    """One Adam step *up* the gradient (Kingma & Ba 2015), then projection onto [0, `upper`]
    (``[0, inf)`` for ``upper=None``)."""
    m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    m_hat = m / (1 - betas[0] ** t)
    v_hat = v / (1 - betas[1] ** t)
    param.add_(lr * m_hat / (v_hat.sqrt() + eps)).clamp_(0.0, upper)
