"""The exact LP of the triangle relaxation: the tightness reference for small networks.

Given pre-activation bounds ``l <= z <= u`` of every ReLU (by default CROWN's), the LP

    minimize  c · f    over  x in [x_lo, x_hi],  z_k = M_k h_(k-1) + m_k,  l_k <= z_k <= u_k,
              h_k = z_k (active), h_k = 0 (inactive), and for unstable neurons
              h >= 0,  h >= z,  h <= u (z - l) / (u - l)

is the tightest bound any method with these intermediate bounds and single-neuron ReLU
relaxations can give (Salman et al., "A Convex Relaxation Barrier to Tight Robustness
Verification of Neural Networks", NeurIPS 2019): it is never looser than ``crown``,
``wong-kolter`` or ``alpha-crown`` with the same intermediate bounds. One LP is solved per
sample and specification row (and per negated row for the upper bound).

A DAG network (residual Add, Concat) is encoded the same way: its affine chains run from
several earlier variable blocks (the input, activations' outputs) to the next activation
(:func:`certify.bounds.encoding.encode`).

The program is :mod:`certify.bounds.encoding`'s (one encoding rule per op type); it is solved
by :mod:`certify.bounds.solver`, the only module that imports cvxpy.

**Soundness despite solver tolerance.** The solver's primal value is never reported. The bound
is the Lagrangian dual function evaluated at the solver's dual values
(:func:`certify.bounds.solver.dual_bound`): by weak duality a lower bound of the LP -- hence of
the network -- for *any* dual values, so an inexact or failed solve can only make it looser,
never unsound (a failed solve falls back to zero duals, i.e. the interval bound of the last
layer, with a warning). It is evaluated in float64 and a rigorous bound on its floating-point
rounding error (``gamma_k`` error bounds of dot products) is subtracted. The network's float32
weights are exact in float64; the affine chains carry bounds on their own rounding (the LP
relaxes the exact network, see :mod:`certify.bounds.encoding`). The given intermediate bounds,
computed in float32 or float64, are widened by ``2^-16`` or ``2^-40`` times ``1 + |bound|`` so
that their own rounding cannot make the exact LP infeasible (a looser, still sound relaxation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from certify.bounds import solver
from certify.bounds.base import Bounds, MethodBase, get_method, list_methods, register_method
from certify.bounds.encoding import (
    cast_outward,
    encode,
    model_perturbations,
    sample_programs,
    widen,
)
from certify.bounds.network import Network, fold_spec, identity_spec
from certify.errors import SpecError

__all__ = ["LP"]


def intermediate_sources() -> list[str]:
    """The methods whose pre-activation bounds the LP can use: those that serve intermediate
    bounds without a solver."""
    return list_methods(serves_intermediate=True, uses_solver=False)


@register_method("lp")
@dataclass(frozen=True)
class LP(MethodBase):
    """Exact LP over the triangle relaxation, bounded through its dual (see module docstring).

    Options:
        intermediate_method: Whose pre-activation bounds to use when none are given:
            ``crown`` (default), or any method that serves intermediate bounds without a
            solver (``wong-kolter``, ``ibp``, ``crown-ibp``, ``alpha-crown``).
        solver: A cvxpy LP solver name (default ``HIGHS``).
    """

    intermediate_method: str = "crown"
    solver: str = solver.DEFAULT_LP_SOLVER
    name: ClassVar[str] = "lp"
    display_name: ClassVar[str] = "LP"
    uses_solver: ClassVar[bool] = True
    refines_intermediate: ClassVar[bool] = True

    def __post_init__(self) -> None:
        sources = intermediate_sources()
        if self.intermediate_method not in sources:
            raise SpecError(f"lp: intermediate_method must be one of "
                            f"{', '.join(sources)}, got {self.intermediate_method!r}.")

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor) -> tuple[Bounds, ...]:
        """The pre-activation bounds of `intermediate_method`."""
        with torch.no_grad():
            return get_method(self.intermediate_method).intermediate(net, x_lo, x_hi)

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]` (inputs as validated by
        :func:`compute_bounds`); `(N, S)`, or the flattened outputs `(N, K)` without a spec."""
        installed = solver.installed_solvers()
        if self.solver not in installed:
            raise SpecError(f"lp: solver {self.solver!r} is not installed; installed: "
                            f"{', '.join(installed)}.")
        spec = identity_spec(net, x_lo) if spec is None else spec
        if intermediate is None:
            intermediate = self.intermediate(net, x_lo, x_hi)
        with torch.no_grad():
            cpu = torch.device("cpu")
            folded = fold_spec(net.detach(), spec.detach()).to(dtype=torch.float64, device=cpu)
            lo64 = x_lo.detach().to(cpu, torch.float64).flatten(1).numpy()
            hi64 = x_hi.detach().to(cpu, torch.float64).flatten(1).numpy()
            pre = [widen(b, x_lo.dtype) for b in intermediate]
            encoding = encode(folded)
            perturbation = model_perturbations(net, x_lo, x_hi, pre)
            lowers, uppers = [], []
            for _, problem in sample_programs(encoding, lo64, hi64, pre, perturbation):
                lower, upper = solver.lp_rows(problem, self.solver)
                lowers.append(lower)
                uppers.append(upper)
        return Bounds(cast_outward(np.stack(lowers), x_lo, down=True),
                      cast_outward(np.stack(uppers), x_lo, down=False))
