"""Interval bound propagation (IBP).

Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably
Robust Models", 2018. Each layer maps a box to the smallest box containing its image (exact
per coordinate for an affine layer: ``W c + b ± |W| r``); the specification is folded into the
last linear layer first, which is tighter than bounding the logits and then the margins.
Differentiable with respect to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from certify.bounds.base import Bounds, MethodBase, register_method
from certify.bounds.network import Network, identity_spec, spec_rows
from certify.bounds.propagation import EngineOptions, Propagator

__all__ = ["IBP"]


@register_method("ibp")
@dataclass(frozen=True)
class IBP(MethodBase):
    """Interval bound propagation.

    Options:
        rigorous: True (default): every interval holds in exact arithmetic (outward rounding
            with the error bounds of :mod:`certify.bounds.rounding`). False: plain
            floating-point intervals, for what proves nothing (training losses).
    """

    rigorous: bool = True
    name: ClassVar[str] = "ibp"
    display_name: ClassVar[str] = "IBP"

    def __post_init__(self) -> None:
        self._check_options()

    def _options(self) -> EngineOptions:
        return EngineOptions(rigorous=self.rigorous)

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]` (inputs as validated by
        :func:`compute_bounds`); `(N, S)`, or the flattened outputs `(N, K)` without a spec.

        Given `intermediate` bounds, each ReLU input is intersected with them.
        """
        body, rows = spec_rows(net, identity_spec(net, x_lo) if spec is None else spec)
        prop = Propagator(body, x_lo, x_hi, self._options(), spec=rows)
        if intermediate is not None:
            prop.set_intermediate(intermediate, "adaptive")
        return prop.finish(*prop.interval())

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor) -> tuple[Bounds, ...]:
        """Interval bounds of every ReLU input, `(N, *shape)` each, in order."""
        prop = Propagator(net, x_lo, x_hi, self._options())
        prop.compute_intermediate("adaptive", linear=False)
        return prop.intermediate_bounds()
