"""CROWN and CROWN-IBP: backward linear relaxation bounds.

* ``crown`` -- Zhang et al., "Efficient Neural Network Robustness Certification with General
  Activation Functions", NeurIPS 2018 (the same bound as DeepPoly, Singh et al. 2019): the
  adaptive lower slope, and every intermediate layer bounded by the same linear propagation.
* ``crown-ibp`` -- Zhang et al., "Towards Stable and Efficient Training of Verifiably Robust
  Neural Networks", ICLR 2020: CROWN for the output, interval bounds for the intermediate
  layers; the usual bound for robust training.

Both are differentiable with respect to the network's weights (they do not switch autograd off;
the caller decides).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import Tensor

from certify.bounds.base import STATE, Bounds, MethodBase, register_method
from certify.bounds.layers import SpecRows
from certify.bounds.network import Network, identity_spec, spec_rows
from certify.bounds.propagation import EngineOptions, Propagator
from certify.bounds.reuse import BoundMemory

__all__ = ["Crown", "CrownIBP", "LinearRelaxationMethod", "output_rows", "spec_op"]


def output_rows(prop: Propagator) -> tuple[int, int, int]:
    """`(start, N, S)` of the specification's rows after `prop`'s network."""
    rows = spec_op(prop)
    n, s = rows.weight.shape[:2]
    return len(prop.layers), int(n), int(s)


def spec_op(prop: Propagator) -> SpecRows:
    """The specification's rows `(N, S, I)` of `prop`: the starting matrix of the backward
    pass."""
    if prop.spec is None:
        raise TypeError("the propagator was built without a specification (spec_rows)")
    return prop.spec


def crown_output(prop: Propagator) -> Bounds:
    """Backward (CROWN) bounds of the folded specification `(N, S)`, given the relaxations."""
    start, n, s = output_rows(prop)
    last = spec_op(prop)
    rows = last.weight.reshape(n, s, *last.in_shape)
    rows_err = None if last.weight_err is None else last.weight_err.reshape(rows.shape)
    lower, upper = prop.backward_uniform(start, rows, last.bias, both=True, rows_err=rows_err,
                                         const_err=last.bias_err)
    assert upper is not None
    return prop.finish(lower, upper)


@dataclass(frozen=True)
class LinearRelaxationMethod(MethodBase):
    """Shared body and options of the methods that end with a backward pass of the spec.

    Subclasses set `slope_rule` (see :mod:`certify.bounds.relaxations`) and
    `linear_intermediate` (False: interval intermediate bounds), and may add the option
    `intermediate_mode`.

    Options:
        memory_budget_mb: Working memory for one chunk of rows (not counting what autograd
            keeps when gradients are needed).
        chunk_size: Rows per chunk, overriding the budget; bounds never depend on it.
        rigorous: True (default): bounds hold for the network in exact arithmetic, every
            rounding error accounted for (:mod:`certify.bounds.rounding`). False: the plain
            floating-point bound, faster, for what proves nothing (training losses).
        memory: Intermediate bounds remembered from earlier evaluations (set by
            :meth:`searching` for one radius search; see :mod:`certify.bounds.reuse`).
    """

    memory_budget_mb: float = 2048
    chunk_size: int | None = None
    rigorous: bool = True
    memory: BoundMemory | None = field(default=None, compare=False, repr=False, metadata=STATE)
    slope_rule: ClassVar[str]
    linear_intermediate: ClassVar[bool]

    def __post_init__(self) -> None:
        self._check_options()

    def engine_options(self) -> EngineOptions:
        return EngineOptions(self.memory_budget_mb, self.chunk_size,
                             getattr(self, "intermediate_mode", "auto"), self.rigorous)

    def propagator(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None,
                   intermediate: tuple[Bounds, ...] | None) -> Propagator:
        """A propagator over the network (the body before the specification's rows, if any)
        with its relaxations in place."""
        rows = None
        if spec is not None:
            net, rows = spec_rows(net, spec)
        prop = Propagator(net, x_lo, x_hi, self.engine_options(), spec=rows,
                          memory=self.memory)
        if intermediate is None:
            prop.compute_intermediate(self.slope_rule, linear=self.linear_intermediate)
        else:
            prop.set_intermediate(intermediate, self.slope_rule)
        return prop

    def searching(self) -> LinearRelaxationMethod:
        """This method with a fresh :class:`~certify.bounds.reuse.BoundMemory`: one radius
        search's evaluations start each layer from the intermediate bounds of the evaluations
        at larger eps of the same samples (sound: a bound over a box holds over every box
        inside it), so only the neurons still unstable there get a backward pass."""
        return replace(self, memory=BoundMemory())

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]` (inputs as validated by
        :func:`compute_bounds`); `(N, S)`, or the flattened outputs `(N, K)` without a spec."""
        spec = identity_spec(net, x_lo) if spec is None else spec
        return crown_output(self.propagator(net, x_lo, x_hi, spec, intermediate))

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor) -> tuple[Bounds, ...]:
        """Pre-activation bounds of every ReLU input, `(N, *shape)` each, in order."""
        return self.propagator(net, x_lo, x_hi, None, None).intermediate_bounds()


@register_method("crown")
@dataclass(frozen=True)
class Crown(LinearRelaxationMethod):
    """CROWN: adaptive lower slopes (``alpha = 1 if u > -l else 0``), linear intermediate bounds.

    Options:
        memory_budget_mb, chunk_size: See :class:`LinearRelaxationMethod`.
        intermediate_mode: How intermediate layers get their linear bounds. ``"auto"``
            (default): backward propagation of the unstable neurons, or forward-mode
            propagation where it gives the same bound and is cheaper (per sample and layer);
            the textbook CROWN bound (auto_LiRPA's ``method="CROWN"``). ``"backward"``: always
            backward (the same bound). ``"forward"``: always forward mode -- sound, but looser
            beyond the second ReLU layer.
    """

    intermediate_mode: str = "auto"
    name: ClassVar[str] = "crown"
    display_name: ClassVar[str] = "CROWN"
    slope_rule: ClassVar[str] = "adaptive"
    linear_intermediate: ClassVar[bool] = True


@register_method("crown-ibp")
@dataclass(frozen=True)
class CrownIBP(LinearRelaxationMethod):
    """CROWN-IBP: interval bounds for intermediate layers, CROWN (adaptive slopes) for the output.

    Options:
        memory_budget_mb, chunk_size: See :class:`LinearRelaxationMethod`.
    """

    name: ClassVar[str] = "crown-ibp"
    slope_rule: ClassVar[str] = "adaptive"
    linear_intermediate: ClassVar[bool] = False
