"""The Wong-Kolter dual network bound: the certifier of the thesis.

Wong & Kolter, "Provable Defenses against Adversarial Examples via the Convex Outer Adversarial
Polytope", ICML 2018. Their dual network propagates ``nu`` backward through ``W^T`` and through
each ReLU by ``D = u / (u - l)`` on unstable neurons (1 on active, 0 on inactive ones) and
collects ``sum l [nu]_+`` from unstable neurons; the bound is the dual objective. That is
exactly the backward linear relaxation with the upper chord and the lower line *parallel* to
it (Fast-Lin, Weng et al. 2018), which is how it is computed here, with intermediate layers
bounded by the same dual network (as in the paper), through the shared engine. The L-inf ball
of the paper becomes the clipped box ``[x_lo, x_hi]``. Differentiable with respect to the
weights: robust training (``CE(-J(eps), y)``) uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from certify.bounds.base import register_method
from certify.bounds.crown import LinearRelaxationMethod

__all__ = ["WongKolter"]


@register_method("wong-kolter")
@dataclass(frozen=True)
class WongKolter(LinearRelaxationMethod):
    """Wong-Kolter dual bound: parallel lower slope ``u / (u - l)``, linear intermediate bounds.

    Options:
        memory_budget_mb, chunk_size, intermediate_mode: As for ``crown``.
    """

    intermediate_mode: str = "auto"
    name: ClassVar[str] = "wong-kolter"
    slope_rule: ClassVar[str] = "parallel"
    linear_intermediate: ClassVar[bool] = True
