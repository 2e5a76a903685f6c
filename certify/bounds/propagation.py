"""The propagation engine shared by every method: intervals and linear bounds.

Notation (see :mod:`certify.types`): a :class:`Propagator` holds one batch of boxes
`[x_lo, x_hi]` `(N, *in_shape)`, a network (usually with the specification folded into its last
layer) and the ReLU relaxations found so far.

* **Backward** (CROWN): rows ``A`` of a linear function of some layer's output are pushed back
  through the network, substituting the relaxation of each ReLU, down to the input, where the
  box is concretized. Rows come in blocks `(B, R)`: `B` samples with `R` rows each (zero rows
  pad a sample with fewer), so per-sample relaxations broadcast. Any set of (sample, neuron)
  pairs can be bounded -- in particular only the *unstable* neurons of a layer. The rows of a
  convolutional neuron are zero outside its receptive field, so they are propagated as a
  spatial *window* of each feature map (exact; ops without a window rule densify first).
  Rows are independent, so they are processed in blocks that fit a memory budget; the block
  size never changes a bound.
* **Forward** (forward-mode linear bound propagation): lower and upper linear functions of the
  input are pushed forward for every neuron at once; its cost grows with the input size `D`
  instead of the number of neurons. The input dimensions are processed in chunks (the
  concretization is a sum over them).
* **Intervals** (IBP): centers and radii, restarted after every ReLU from the tightest bounds
  known so far.

Intermediate (pre-activation) bounds are computed layer by layer. A layer reached through at
most one mixing op (Linear, Conv2d, AvgPool2d) and no ReLU is bounded exactly by intervals.
Every other layer gets its interval bound intersected with the linear bound of its unstable
neurons, those its row's ``tighten`` names (both are sound, so their intersection is). An
"activation" is any op relaxed over bounds of its input: ReLU, LeakyReLU, Sigmoid, Tanh, and
MaxPool2d, whose rows on a spatial window are made dense before it. The linear bound comes
from backward mode, or from forward mode where the two are provably equal and forward is cheaper
(``intermediate_mode="auto"``, the default; see :func:`forward_is_exact`), or always from
forward mode (``"forward"``: sound, but looser beyond the second ReLU layer because it chooses
the lower or upper line per path instead of per neuron -- on a random ``wk-large`` at eps 0.01
the mean margin lower bound was -472 against -13.8 in backward mode). The choice depends only
on the sample and the network, so a batch gives the bounds of its samples one by one.

**Graphs** (a network with ``inputs``: residual Adds, Concats): intervals walk the nodes in
topological order; backward passes walk them in reverse, each node's rows being the sum of its
consumers' (:meth:`Propagator._backward_dag`, the sum's rounding accounted); rows stay dense
(no conv windows) and forward mode is not used. A chain takes exactly the code paths it took
before graphs existed (its bounds are bit-identical).

**Rounding** (``EngineOptions.rigorous``, the default): every interval is rounded outward and
every backward pass prices the rounding of its rows and constants (see
:meth:`Propagator.backward_chunk` and :mod:`certify.bounds.rounding`), so each bound holds for
the network in exact arithmetic; forward mode has no such accounting and is then not used.
With ``net.runs_in`` the bounds also cover the model's own forward pass
(:mod:`certify.bounds.forward_error`): each ReLU's input is widened by its perturbation bound
and every backward pass pays ``|nu| E`` there. A rigorous float64 chain of ReLUs given
stability hints (a radius search's plain evaluation over the same box or one holding it, see
:meth:`BoundMemory.hints`) first proves the hinted neurons stable in a rigorous float32 twin of
itself (:meth:`Propagator._stable_in_float32`): float64 products of wide rows are memory-bound
and cost several times float32's on CPU, and a stable neuron needs only its sign proven; the
neurons the twin cannot prove get float64 rows as before.

**The float64 tail.** A rigorous float32 chain finishes every backward pass in float64 below
its first activation: the rows, constants and error terms are cast there (exactly), the ops
below it (normalization, the first convolution, a BatchNorm) are applied in float64 and the box
is concretized in float64; the bound is then rounded outward to float32. Rows are widest and
their terms cancel most near the input, so that is where float32's ``gamma_k`` terms priced the
most: on a 3x32x32 ``scn-32-32`` at a radius they took 0.36 off margins of about 0.02 (the
normalization's constant over 3072 pixels, the first conv, the box's dot products), and
float32 rigorous bounds proved almost nothing there; with the tail the float32 bound is within
0.005 of float64's, at 0.65x its CPU time (1.35x a float32 bound without the tail). The ops
above the first activation, where the network's work is, stay in float32. The float32 twin of
a float64 chain has no tail (see :meth:`Propagator._float32_twin`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.base import Bounds
from certify.bounds.forward_error import chain_error, graph_error, model_chains
from certify.bounds.layers import (
    RULES,
    ConvOp,
    LeakyReluOp,
    Op,
    ReluOp,
    ScaleShiftOp,
    SpecRows,
    abs_op,
    cast_op,
    err_op,
    interval_affine,
    is_merge,
    is_mixing,
    merge_backward,
    merge_interval,
    numel,
    rows_of,
    true_first,
)
from certify.bounds.network import Network
from certify.bounds.relaxations import (
    ActivationRule,
    Relaxation,
    activation_rule,
    is_activation,
)
from certify.bounds.reuse import BoundMemory, Layout, MemoryKind
from certify.errors import SpecError

__all__ = ["EngineOptions", "Propagator", "forward_is_exact"]

MB = 2**20
# Working memory per element of the widest tensor a row passes, in element sizes: the rows,
# their positive part, the products and the convolution's output (with slack).
BACKWARD_FACTOR = 10
FORWARD_FACTOR = 12
Window = tuple[int, int]  # top-left corner of a window in a (C, H, W) feature map
# the float64 copy of each op of a rigorous float32 chain's float64 tail (Propagator._tail_op)
_FLOAT64_OPS: weakref.WeakKeyDictionary[Op, Op] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class EngineOptions:
    """Options of the propagation engine, shared by the CROWN-family methods."""

    memory_budget_mb: float = 2048
    chunk_size: int | None = None
    intermediate_mode: str = "auto"
    rigorous: bool = True


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _groups(counts: list[int], budget: int) -> Iterator[tuple[list[int], int, int]]:
    """Blocks `(samples, first_row, rows)` covering `counts[s]` rows of every sample `s`.

    Samples in decreasing order of rows; a block holds at most `budget` rows including the
    padding of samples with fewer rows than the block's first, and pads no sample to more
    than twice its rows. A sample with more than `budget` rows gets blocks of its own.
    """
    order = sorted((s for s, c in enumerate(counts) if c > 0), key=lambda s: -counts[s])
    group: list[int] = []
    width = 0
    for s in order:
        c = counts[s]
        if c > budget:
            for first in range(0, c, budget):
                yield [s], first, min(budget, c - first)
            continue
        if group and ((len(group) + 1) * width > budget or 2 * c < width):
            yield group, 0, width
            group = []
        if not group:
            width = c
        group.append(s)
    if group:
        yield group, 0, width


def _window_of(t: Tensor, window: Window, h: int, w: int) -> Tensor:
    top, left = window
    return t[..., top:top + h, left:left + w]


def _densify(a: Tensor, window: Window, shape: tuple[int, ...]) -> Tensor:
    full = a.new_zeros(a.shape[0], *shape)
    top, left = window
    full[:, :, top:top + a.shape[2], left:left + a.shape[3]] = a
    return full


def _activation_constant(act: ActivationRule, mu: Tensor, a3: Tensor, c: Tensor | None,
                         relaxation: Relaxation, samples: Tensor, const: Tensor,
                         cerr: Tensor | None, err: Tensor | None, perturbation: Tensor | None,
                         u: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The constant an activation's substitution adds, rows `mu` -> `a3` `(B, R, ...)`:
    rigorous (`cerr` given) through the rule's ``constant`` for any computed rows, which
    restarts the rows' error at 0 (`err`: the rows' elementwise error bound, a DAG's; None
    in a chain, whose rows' error is paid in `cerr` already, see
    :meth:`Propagator._rounding_cost`); else the plain `c`, less ``|a3| e`` for the model's
    own rounding `perturbation`. Returns the new ``(const, cerr, err)``."""
    if cerr is not None:
        c, c_err = act.constant(mu, a3, relaxation, samples,
                                None if err is None else err.reshape(mu.shape), perturbation)
        const = const + c
        cerr = cerr + c_err + u * const.abs()
        return const, cerr, (None if err is None
                             else torch.zeros_like(a3).reshape(-1, *a3.shape[2:]))
    assert c is not None
    if perturbation is not None:  # |a3| · e, one pass over the rows and a product
        b, r = a3.shape[:2]
        e = rows_of(perturbation, samples).reshape(b, -1, 1)
        c = c - torch.bmm(a3.abs().reshape(b, r, -1), e).reshape(b, r)
    return const + c, cerr, err


class _RoundingWeights(NamedTuple):
    """How a chain's backward pass prices its rows' rounding at one op's output (per sample,
    see :meth:`Propagator.backward_chunk`).

    Attributes:
        out: `(N, *out_shape)` ``W``: an error ``E`` on rows of the op's output costs the
            bound at most ``E · W``.
        rows: `(N, *out_shape)` ``g |L| W_in + (L_err W_in + b_err)``: what the transpose's
            rounding of rows `a` costs, ``|a| · rows`` (None: the op only moves values).
        bias: `(1, *out_shape)` ``|b|``: the constant ``b · a`` costs ``g_c |a| · |b|`` more.
        tiny: `(N,)` the underflow terms, ``lin tiny sum(W_in)``.
    """

    out: Tensor
    rows: Tensor | None
    bias: Tensor | None
    tiny: Tensor


def _op_weights(op: Op, absolute: Op, exact: Op | None, below: Tensor) -> _RoundingWeights:
    """:class:`_RoundingWeights` of linear op `op` (`absolute`, `exact`: its ``abs_op`` and
    ``err_op``) given the weights `below` `(N, *in_shape)` of its input."""
    rules = RULES[type(op)]
    _, lin, _ = rules.terms(op)
    if lin == 0:  # a reshape or permutation: weights move with the values
        out = rules.forward(op, below)
        return _RoundingWeights(out, None, None, below.new_zeros(below.shape[0]))
    assert rules.abs_linear is not None
    g = rounding.gamma(lin, below.dtype)
    bias = rules.forward(absolute, below.new_zeros(1, *below.shape[1:]))  # |b|
    spread = rules.abs_linear(op, below)  # |L| W_in, one product for both weights
    out = spread + bias  # |L| W_in + |b|
    rows = g * spread
    if exact is not None:
        errors = RULES[type(exact)].forward(exact, below)  # L_err W_in + b_err
        out, rows = out + errors, rows + errors
    tiny = lin * rounding.tiny(below.dtype) * below.flatten(1).sum(1)
    return _RoundingWeights(out, rows, bias if bool((bias != 0).any()) else None, tiny)


def _constant_terms(op: Op, rows: Tensor) -> int:
    """How many terms the constant of `op`'s transpose sums for rows `rows` `(P, ...)`: the
    op's ``cons``; a ScaleShift's sums the row's own elements (a window's, when windowed), at
    most numel + 1 terms (per channel: h w sums, then C products; see backward_scale_shift),
    however large the whole map is."""
    _, _, cons = RULES[type(op)].terms(op)
    if isinstance(op, ScaleShiftOp):
        cons = min(cons, rows[0].numel() + 1)
    return cons


def _intersect(lo: Tensor, hi: Tensor, known: tuple[Tensor, Tensor] | None
               ) -> tuple[Tensor, Tensor]:
    """`[lo, hi]` intersected with remembered bounds (both sound, so their intersection is)."""
    if known is None:
        return lo, hi
    return torch.maximum(lo, known[0]), torch.minimum(hi, known[1])


def _float32(t: Tensor, *, up: bool) -> Tensor:
    """`t` in float32, rounded up (never below `t`) or down (never above); a value rounded
    the wrong way, or to a subnormal, is stepped as :func:`rounding.up` / :func:`rounding.down`
    do (never to a subnormal, which would slow every later product)."""
    cast = t.to(torch.float32)
    back = cast.to(t.dtype)
    subnormal = (cast != 0) & (cast.abs() < rounding.tiny(torch.float32))
    if up:
        return torch.where((back < t) | subnormal, rounding.up(cast), cast)
    return torch.where((back > t) | subnormal, rounding.down(cast), cast)


def _float64_tail(a: Tensor, const: Tensor, cerr: Tensor | None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rows, constants and their error bound in float64 (exact casts; no copy when they are
    already): where a rigorous float32 chain's backward pass enters its float64 tail."""
    return a.double(), const.double(), None if cerr is None else cerr.double()


def forward_is_exact(layers: tuple[Op, ...], pos: int) -> bool:
    """Whether forward mode bounds the input of ``layers[pos]`` exactly as backward mode does.

    True when no ReLU lies below it (both are the exact range of an affine map), or one ReLU
    layer with at most one mixing op after it (each neuron's lower/upper line is then chosen
    by the sign of a single weight in both modes). Elementwise ops anywhere keep this.
    """
    relus = [j for j in range(pos) if is_activation(layers[j])]
    if not relus:
        return True
    return len(relus) == 1 and sum(is_mixing(op) for op in layers[relus[0]:pos]) <= 1


class Propagator:
    """Bounds of one batch of boxes through one network.

    Args:
        net: The network (the body, when a specification follows it).
        x_lo, x_hi: The boxes `(N, *net.input_shape)`.
        options: Memory budget, chunk size and intermediate mode.
        spec: The specification's rows on the network's output (:func:`spec_rows`): the
            starting matrix of the backward pass, from position ``len(net.layers)``.
        memory: Intermediate bounds of earlier evaluations over boxes that may hold these
            (:class:`~certify.bounds.reuse.BoundMemory`): :meth:`compute_intermediate`
            starts each layer from them and remembers its own.
    """

    def __init__(self, net: Network, x_lo: Tensor, x_hi: Tensor,
                 options: EngineOptions, spec: SpecRows | None = None,
                 memory: BoundMemory | None = None) -> None:
        self.net = net
        self.memory = memory
        self.layers = net.layers
        self.spec = spec
        self.x_lo, self.x_hi = x_lo, x_hi
        self.center = (x_hi + x_lo) / 2
        self.radius = (x_hi - x_lo) / 2
        self.options = options
        self.rigorous = options.rigorous
        if self.rigorous:
            if options.intermediate_mode == "forward":
                raise SpecError("intermediate_mode='forward' has no rounding-error accounting; "
                                "use 'auto' or 'backward' for proofs (rigorous=False only for "
                                "bounds that prove nothing, e.g. training losses).")
            # [center - radius, center + radius] must contain the box in exact arithmetic
            self.radius = rounding.up(torch.maximum(x_hi - self.center, self.center - x_lo))
        self.relaxations: dict[int, Relaxation] = {}
        self.pre_bounds: dict[int, tuple[Tensor, Tensor]] = {}
        # The model's own rounding (net.runs_in): a bound of the perturbation of each ReLU's
        # input, see certify.bounds.forward_error
        self.perturbation: dict[int, Tensor] = {}
        self._abs_cache: dict[int, tuple[Op, Op | None]] = {}
        # per chain position: (relaxation it was computed for, the weights below, weights)
        self._weights: dict[int, tuple[Relaxation | None, Tensor | None, _RoundingWeights]] = {}
        self._chains = (model_chains(net) if net.runs_in is not None and net.is_chain
                        else None)
        # a DAG: rigorous bounds of every activation's exact output, once known (the model's
        # own rounding of a node depends on all of them, see graph_error)
        self._act_out: dict[int, tuple[Tensor, Tensor]] = {}
        self.itemsize = x_lo.element_size()
        # float32 twin of a float64 rigorous chain (see _float32_twin): None until asked for
        self._twin: Propagator | None = None
        # the activations' inputs at the box's center (see _center_inactive)
        self._center_pre: dict[int, Tensor] = {}
        # A rigorous float32 chain's backward passes finish in float64 below its first
        # activation (see backward_chunk): the ops there, cast exactly, and the box
        self._tail: int | None = None
        if self.rigorous and x_lo.dtype == torch.float32 and net.is_chain:
            self._tail = next((i for i, op in enumerate(self.layers) if is_activation(op)),
                              len(self.layers))
        # Samples with a non-finite pre-activation bound (overflow): their relaxations are
        # meaningless, so their final bounds are reported as (-inf, inf).
        self.nonfinite = torch.zeros(self.n, dtype=torch.bool, device=x_lo.device)

    @property
    def n(self) -> int:
        return int(self.x_lo.shape[0])

    # --- the model's own rounding ------------------------------------------------------------

    def _perturb(self, pos: int, in_lo: Tensor, in_hi: Tensor, lo: Tensor, hi: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """`[lo, hi]` (bounds of the exact chain into ReLU `pos`) widened by the model's own
        rounding of that chain over its inputs `[in_lo, in_hi]` (nothing without runs_in)."""
        e = self._model_rounding(pos, in_lo, in_hi)
        if e is None:
            return lo, hi
        return rounding.down(lo - e), rounding.up(hi + e)

    def _model_rounding(self, pos: int, in_lo: Tensor, in_hi: Tensor) -> Tensor | None:
        """The bound of the model's own rounding of the chain into ReLU `pos` over its inputs
        `[in_lo, in_hi]` (once per propagator), or None without runs_in."""
        if self.net.runs_in is None or (self._chains is None and self.net.is_chain):
            return None
        if pos not in self.perturbation:
            k = self.net.relu_positions.index(pos)
            if self._chains is None:
                positions = self.net.relu_positions
                boxes = {positions.index(p): box for p, box in self._act_out.items()}
                exact = graph_error(self.net, k, boxes, self.x_lo, self.x_hi,
                                    self.net.runs_in)
            else:
                exact = chain_error(self._chains[k], in_lo, in_hi, self.net.runs_in)
            cast = exact.to(in_lo.dtype)
            cast = torch.where(cast.to(torch.float64) < exact, rounding.up(cast), cast)
            self.perturbation[pos] = cast
        return self.perturbation[pos]

    # --- intervals ---------------------------------------------------------------------------

    def interval(self) -> tuple[Tensor, Tensor]:
        """Interval bounds of the network's output (of the specification, if given); ReLU
        inputs are intersected with the pre-activation bounds already known (and recorded
        where none were)."""
        if not self.net.is_chain:
            return self._interval_dag()
        lo, hi = self.x_lo, self.x_hi
        chain_lo, chain_hi = lo, hi
        for i, op in enumerate(self.layers):
            if is_activation(op):
                lo, hi = self._perturb(i, chain_lo, chain_hi, lo, hi)
                if i in self.pre_bounds:
                    known_lo, known_hi = self.pre_bounds[i]
                    lo, hi = torch.maximum(lo, known_lo), torch.minimum(hi, known_hi)
                else:
                    self.pre_bounds[i] = (lo, hi)
                lo, hi = activation_rule(op).interval(lo, hi)
                chain_lo, chain_hi = lo, hi
            else:
                lo, hi = interval_affine(op, lo, hi, rigorous=self.rigorous)
        if self.spec is not None:
            lo, hi = interval_affine(self.spec, lo, hi, rigorous=self.rigorous)
        return lo, hi

    # --- intermediate bounds -----------------------------------------------------------------

    def set_intermediate(self, bounds: tuple[Bounds, ...], rule: str) -> None:
        """Use given pre-activation bounds (one per ReLU, in order) and relax them (widened by
        the model's own rounding when the network has ``runs_in``)."""
        chain_lo, chain_hi = self.x_lo, self.x_hi
        for pos, b in zip(self.net.relu_positions, bounds, strict=True):
            lo, hi = self._perturb(pos, chain_lo, chain_hi, b.lower, b.upper)
            self._store(pos, lo, hi, rule)
            chain_lo, chain_hi = activation_rule(self.layers[pos]).interval(lo, hi)
            if not self.net.is_chain:
                self._act_out[pos] = (chain_lo, chain_hi)

    def _store(self, pos: int, lo: Tensor, hi: Tensor, rule: str) -> None:
        self.pre_bounds[pos] = (lo, hi)
        self.relaxations[pos] = activation_rule(self.layers[pos]).relax(lo, hi, rule)
        finite = torch.isfinite(lo).flatten(1).all(1) & torch.isfinite(hi).flatten(1).all(1)
        self.nonfinite |= ~finite

    def finish(self, lower: Tensor, upper: Tensor) -> Bounds:
        """Final bounds `(N, ...)`, with (-inf, inf) wherever a bound is NaN or a sample had a
        non-finite intermediate bound (never a finite number from overflowed arithmetic)."""
        bad = self.nonfinite.view(-1, *([1] * (lower.ndim - 1)))
        lower = torch.where(bad | torch.isnan(lower), float("-inf"), lower)
        upper = torch.where(bad | torch.isnan(upper), float("inf"), upper)
        known = all(p in self.pre_bounds for p in self.net.relu_positions)
        return Bounds(lower, upper,
                      pre_activation=self.intermediate_bounds() if known else None)

    def compute_intermediate(self, rule: str, *, linear: bool) -> None:
        """Bound every ReLU's input, layer by layer, and relax it with `rule`.

        Args:
            rule: The slope rule of the relaxations (``"adaptive"`` or ``"parallel"``).
            linear: Tighten interval bounds by linear (CROWN-style) bounds; False gives IBP.
        """
        if not self.net.is_chain:
            self._intermediate_dag(rule, linear=linear)
            return
        known = self._recall()
        # stability hints come from a plain evaluation of the same box: in a radius search,
        # the one its rigorous confirmation repeats (the plain ones never repeat an eps)
        hints = self._hints() if linear and self.rigorous else {}
        tightened: dict[int, tuple[Tensor, Tensor]] = {}
        lo, hi = self.x_lo, self.x_hi
        chain_lo, chain_hi = lo, hi
        exact = True  # no ReLU and at most one mixing op so far: intervals are exact
        mixing = 0
        for i, op in enumerate(self.layers):
            if is_activation(op):
                if not exact:
                    lo, hi = _intersect(lo, hi, known.get(i))
                    self._model_rounding(i, chain_lo, chain_hi)  # for _tighten
                    if linear:
                        lo, hi = self._tighten(i, lo, hi, hints.get(i), rule=rule)
                    tightened[i] = (lo, hi)
                lo, hi = self._perturb(i, chain_lo, chain_hi, lo, hi)
                self._store(i, lo, hi, rule)
                lo, hi = activation_rule(op).interval(lo, hi)
                chain_lo, chain_hi = lo, hi
                exact = False
            else:
                lo, hi = interval_affine(op, lo, hi, rigorous=self.rigorous)
                mixing += is_mixing(op)
                exact = exact and mixing <= 1
        self._remember(tightened)

    def _memory_kind(self) -> MemoryKind:
        """What makes remembered bounds interchangeable: how they were computed and the
        network's activation layout (see :mod:`certify.bounds.reuse`)."""
        layout = tuple((p, tuple(self.layers[p].in_shape)) for p in self.net.relu_positions)
        return MemoryKind(self.rigorous, self.x_lo.dtype, self.net.runs_in,
                          Layout(self.x_lo.device, numel(self.net.input_shape), layout))

    def _recall(self) -> dict[int, tuple[Tensor, Tensor]]:
        if self.memory is None:
            return {}
        return self.memory.recall(self._memory_kind(), self.x_lo, self.x_hi) or {}

    def _hints(self) -> dict[int, tuple[Tensor, Tensor]]:
        if self.memory is None:
            return {}
        return self.memory.hints(self._memory_kind().layout, self.x_lo, self.x_hi) or {}

    def _remember(self, tightened: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Keep the bounds of the exact chain into each activation (before the model's own
        rounding widens them) for later evaluations over boxes inside these."""
        if self.memory is not None and tightened:
            self.memory.store(self._memory_kind(), self.x_lo, self.x_hi, tightened)

    def _interval_dag(self) -> tuple[Tensor, Tensor]:
        """:meth:`interval` for a DAG: each node's interval from its inputs' (a merge's by
        :func:`~certify.bounds.layers.merge_interval`)."""
        vals: dict[int, tuple[Tensor, Tensor]] = {-1: (self.x_lo, self.x_hi)}
        for i, op in enumerate(self.layers):
            args = [vals[k] for k in self.net.sources(i)]
            if is_activation(op):
                lo, hi = self._perturb(i, *args[0], *args[0])
                if i in self.pre_bounds:
                    known_lo, known_hi = self.pre_bounds[i]
                    lo, hi = torch.maximum(lo, known_lo), torch.minimum(hi, known_hi)
                else:
                    self.pre_bounds[i] = (lo, hi)
                vals[i] = activation_rule(op).interval(lo, hi)
                self._act_out.setdefault(i, vals[i])
            elif is_merge(op):
                vals[i] = merge_interval(op, [a[0] for a in args],  # type: ignore[arg-type]
                                         [a[1] for a in args], rigorous=self.rigorous)
            else:
                vals[i] = interval_affine(op, *args[0], rigorous=self.rigorous)
        lo, hi = vals[len(self.layers) - 1] if self.layers else vals[-1]
        if self.spec is not None:
            lo, hi = interval_affine(self.spec, lo, hi, rigorous=self.rigorous)
        return lo, hi

    def _intermediate_dag(self, rule: str, *, linear: bool) -> None:
        """:meth:`compute_intermediate` for a DAG, node by node in topological order. A node
        is bounded exactly by intervals when it is reached from the input by a chain of
        affine ops with at most one mixing op (no activation, no merge: a sum of two paths
        from the same input is not exact by intervals)."""
        known = self._recall()
        tightened: dict[int, tuple[Tensor, Tensor]] = {}
        vals: dict[int, tuple[Tensor, Tensor]] = {-1: (self.x_lo, self.x_hi)}
        mixing: dict[int, int | None] = {-1: 0}  # mixing ops on an exact chain; None: inexact
        for i, op in enumerate(self.layers):
            srcs = self.net.sources(i)
            args = [vals[k] for k in srcs]
            if is_activation(op):
                lo, hi = args[0]
                if mixing[srcs[0]] is None:
                    lo, hi = _intersect(lo, hi, known.get(i))
                    self._model_rounding(i, lo, hi)  # for _tighten
                    if linear:
                        lo, hi = self._tighten(i, lo, hi)
                    tightened[i] = (lo, hi)
                lo, hi = self._perturb(i, lo, hi, lo, hi)
                self._store(i, lo, hi, rule)
                vals[i] = activation_rule(op).interval(lo, hi)
                self._act_out[i] = vals[i]
                mixing[i] = None
            elif is_merge(op):
                vals[i] = merge_interval(op, [a[0] for a in args],  # type: ignore[arg-type]
                                         [a[1] for a in args], rigorous=self.rigorous)
                mixing[i] = None
            else:
                vals[i] = interval_affine(op, *args[0], rigorous=self.rigorous)
                m = mixing[srcs[0]]
                m = None if m is None else m + is_mixing(op)
                mixing[i] = None if m is None or m > 1 else m
        self._remember(tightened)

    def intermediate_bounds(self) -> tuple[Bounds, ...]:
        return tuple(Bounds(*self.pre_bounds[p]) for p in self.net.relu_positions)

    def _tighten(self, pos: int, lo: Tensor, hi: Tensor,
                 hint: tuple[Tensor, Tensor] | None = None, *, rule: str | None = None
                 ) -> tuple[Tensor, Tensor]:
        """Intersect interval bounds of layer `pos`'s input with linear bounds.

        `hint` `(inactive, active)`, each `(N, *shape)` bool: the neurons an evaluation over
        (almost) the same box found inactive or active (see :meth:`BoundMemory.hints`). Of
        such an inactive ReLU-like neuron only the upper bound is computed, the one that can
        prove it inactive: its lower bound then matters nowhere (its output is 0, and so are
        its terms in the rounding bounds). (An active neuron's upper bound sizes the rounding
        terms of what follows, so both of its bounds are computed.) A float64 rigorous chain
        of ReLUs first tries to prove the hinted neurons stable in float32 (see
        :meth:`_stable_in_float32`, given the slope `rule`); only the rest get float64 rows.

        Plain bounds (``rigorous=False``: the radius search's, training's) without a hint
        guess a ReLU neuron negative at the box's center inactive (:meth:`_center_inactive`):
        in trained networks most neurons that the linear bounds prove stable keep the sign
        they have at the center, and the one row of ``-e_j`` costs about half the two rows of
        a neuron past the first ReLU below it. A guess (or hint) of inactivity that the upper
        bound does not prove gets its lower bound after all, so every bound that can matter
        is the one without guesses: the output's, every upper bound, and the lower bound of
        every neuron not proven inactive (a proven one keeps its interval lower bound, which
        nothing uses; rigorous bounds, which LP/MILP encodings take, make no guesses). Sound
        whichever way a hint or guess turns out: any computed bound is sound, and a wrong
        one only costs a row.
        """
        n = self.n
        unstable = activation_rule(self.layers[pos]).tighten(lo, hi)  # the neurons worth it
        use_forward = self._use_forward(pos, unstable.reshape(n, -1).sum(1))
        lo_flat, hi_flat = lo.reshape(n, -1), hi.reshape(n, -1)
        backward_mask = unstable & ~use_forward.view(-1, *([1] * (unstable.ndim - 1)))
        upper_first = torch.zeros_like(backward_mask)
        if hint is None and not self.rigorous and isinstance(self.layers[pos], ReluOp):
            guess = self._center_inactive(pos)
            upper_first = backward_mask & guess
            backward_mask = backward_mask & ~guess
        elif hint is not None and isinstance(self.layers[pos], (ReluOp, LeakyReluOp)):
            inactive, active = hint
            twin = self._float32_twin() if rule is not None else None
            if twin is not None:
                assert rule is not None
                proven, lo_flat, hi_flat = self._stable_in_float32(
                    twin, pos, rule, backward_mask & (inactive | active), inactive, lo_flat,
                    hi_flat)
                backward_mask = backward_mask & ~proven
            upper_first = backward_mask & inactive
            backward_mask = backward_mask & ~inactive
        for mask, side in ((backward_mask, "both"), (upper_first, "upper"), (None, "lower")):
            if mask is None:
                # the guesses that the upper bound did not prove, the model's own rounding
                # included (its bound widens the neuron's, see _perturb): their lower bound
                e = self.perturbation.get(pos)
                upper = hi_flat.view(unstable.shape) + (0.0 if e is None else e)
                mask = upper_first & ~(upper <= 0)
            if mask.any():
                sample, neuron, lin_lo, lin_hi = self.backward_neurons(pos, mask, side=side)
                index = (sample, neuron)
                lo_flat = lo_flat.index_put(index, torch.maximum(lo_flat[index], lin_lo))
                hi_flat = hi_flat.index_put(index, torch.minimum(hi_flat[index], lin_hi))
        if use_forward.any():
            samples = use_forward.nonzero(as_tuple=True)[0]
            fwd_lo, fwd_hi = self.forward_linear(pos, samples)
            keep = ~unstable.reshape(n, -1)[samples]  # stable neurons keep the interval bound
            old_lo, old_hi = lo_flat[samples], hi_flat[samples]
            fwd_lo = torch.where(keep, old_lo, torch.maximum(old_lo, fwd_lo))
            fwd_hi = torch.where(keep, old_hi, torch.minimum(old_hi, fwd_hi))
            lo_flat = lo_flat.index_put((samples,), fwd_lo)
            hi_flat = hi_flat.index_put((samples,), fwd_hi)
        return lo_flat.reshape(lo.shape), hi_flat.reshape(hi.shape)

    # --- stability proofs in float32 -----------------------------------------------------------

    def _float32_twin(self) -> Propagator | None:
        """A rigorous float32 propagator over a box holding this one's, with the network cast
        to float32 (its rounding added to the ops' error fields, see
        :func:`~certify.bounds.layers.cast_op`): for a rigorous float64 chain of ReLUs, else
        None. Its bounds hold for this network over this box (a bound over a box holds over
        every box inside it); they are looser, by float32's rounding terms, and cost a
        fraction of float64's, whose products of wide rows are memory-bound."""
        if not (self.rigorous and self.x_lo.dtype == torch.float64 and self.net.is_chain
                and all(isinstance(op, ReluOp) for op in self.layers if is_activation(op))):
            return None
        if self._twin is None:
            net = self.net.to(dtype=torch.float32, device=self.x_lo.device)
            self._twin = Propagator(net, _float32(self.x_lo, up=False),
                                    _float32(self.x_hi, up=True), self.options)
            # no float64 tail: the twin proves the signs of neurons its hints name, mostly
            # with a clear margin; on scn-32-32 the tail cost the radius search's float64
            # confirmations 10% more time than the neurons it proved saved
            self._twin._tail = None
        return self._twin

    def _stable_in_float32(self, twin: Propagator, pos: int, rule: str, mask: Tensor,
                           inactive: Tensor, lo_flat: Tensor, hi_flat: Tensor
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """Bound the neurons `mask` of layer `pos`'s input, hinted stable, in `twin`: the
        upper bound of those hinted `inactive`, both bounds of the others. Where that proves
        the hint (upper < 0, or lower > 0), the bounds are taken (intersected with `lo_flat`,
        `hi_flat`: both sound); the other neurons are left to float64.

        The twin's relaxations below `pos` are this propagator's bounds rounded outward to
        float32 (relaxed with the same `rule`), and so is the model's own rounding at each
        ReLU: every relaxation holds over bounds that hold these, so the twin's backward
        passes bound the same exact chain.

        Returns:
            `(proven, lo_flat, hi_flat)`: the neurons proven stable, `mask`'s shape.
        """
        n = self.n
        proven = torch.zeros(lo_flat.shape, dtype=torch.bool, device=lo_flat.device)
        if not bool(mask.any()):
            return proven.view(mask.shape), lo_flat, hi_flat
        for p in self.net.relu_positions:
            if p >= pos:
                break
            if p not in twin.relaxations:
                lo, hi = self.pre_bounds[p]
                twin._store(p, _float32(lo, up=False), _float32(hi, up=True), rule)
                if p in self.perturbation:
                    twin.perturbation[p] = _float32(self.perturbation[p], up=True)
        for hinted, upper in ((mask & inactive, True), (mask & ~inactive, False)):
            if not bool(hinted.any()):
                continue
            sample, neuron, lin_lo, lin_hi = twin.backward_neurons(
                pos, hinted, side="upper" if upper else "both")
            lin_lo, lin_hi = lin_lo.to(lo_flat.dtype), lin_hi.to(lo_flat.dtype)  # exact
            ok = (lin_hi < 0) if upper else (lin_lo > 0)
            ok &= ~twin.nonfinite[sample] & ~torch.isnan(lin_lo) & ~torch.isnan(lin_hi)
            if not bool(ok.any()):
                continue
            index = (sample[ok], neuron[ok])
            lo_flat = lo_flat.index_put(index, torch.maximum(lo_flat[index], lin_lo[ok]))
            hi_flat = hi_flat.index_put(index, torch.minimum(hi_flat[index], lin_hi[ok]))
            proven[index] = True
        return proven.view(n, *mask.shape[1:]), lo_flat, hi_flat

    def _use_forward(self, pos: int, unstable_counts: Tensor) -> Tensor:
        """Per sample, whether layer `pos` is bounded by forward mode (see module docstring)."""
        mode = self.options.intermediate_mode
        if self.rigorous:  # forward mode has no rounding-error accounting
            return torch.zeros_like(unstable_counts, dtype=torch.bool)
        if mode == "forward":
            return unstable_counts > 0
        if not self.net.is_chain:  # forward mode has no rule for merges
            return torch.zeros_like(unstable_counts, dtype=torch.bool)
        if mode == "backward" or not forward_is_exact(self.layers, pos):
            return torch.zeros_like(unstable_counts, dtype=torch.bool)
        forward_cost, backward_row_cost = self.intermediate_cost(pos)
        return unstable_counts.to(torch.float64) * backward_row_cost > forward_cost

    def intermediate_cost(self, pos: int) -> tuple[float, float]:
        """Estimated multiply-adds of bounding the input of ``layers[pos]`` for one sample.

        Returns:
            `(forward, backward_per_row)`: forward mode pushes `D + 1` rows (twice the work
            after the first ReLU, where lower and upper functions differ); backward mode pushes
            each unstable neuron as two rows (lower and upper; one shared up to the first ReLU)
            through the windows of everything below it.
        """
        layers = self.layers
        costs = [RULES[type(op)].cost(op) for op in layers[:pos]]
        relus = [j for j in range(pos) if is_activation(layers[j])]
        first = relus[0] if relus else pos
        forward = (numel(self.net.input_shape) + 1) * (sum(costs[:first])
                                                       + 2 * sum(costs[first:pos]))
        fractions = self._window_fractions(pos)
        last = relus[-1] if relus else 0
        backward_row = sum(c * f * (1 if j >= last else 2)
                           for j, (c, f) in enumerate(zip(costs, fractions, strict=True)))
        return float(forward), float(backward_row)

    def _windows(self, pos: int) -> list[tuple[int, int] | None]:
        """Window sizes of the rows of a 1x1 window at the input of ``layers[pos]``.

        Entry `j` is the `(h, w)` window at the input of ``layers[j]`` (`j = 0..pos`), None once
        the rows are dense (a flat layer, or an op without a window rule).
        """
        windows: list[tuple[int, int] | None] = [None] * (pos + 1)
        shape = self.layers[pos].in_shape if pos < len(self.layers) else ()
        if len(shape) != 3:
            return windows
        size: tuple[int, int] | None = (1, 1)
        windows[pos] = size
        for j in range(pos - 1, -1, -1):
            op = self.layers[j]
            rules = RULES[type(op)]
            if size is not None and not is_activation(op):
                size = (rules.window(op, *size) if rules.window is not None
                        and len(op.in_shape) == 3 else None)
            elif is_activation(op) and not activation_rule(op).elementwise:
                size = None  # rows are made dense before it
            windows[j] = size
        return windows

    def _window_fractions(self, pos: int) -> list[float]:
        """For each op below `pos`: the fraction of its output that a 1x1 window touches."""
        windows = self._windows(pos)
        fractions = []
        for j in range(pos):
            out, size = self.layers[j].out_shape, windows[j + 1]
            fractions.append(1.0 if size is None else size[0] * size[1] / (out[1] * out[2]))
        return fractions

    def _widest(self, start: int, windowed: bool) -> int:
        """Elements of the largest tensor one row holds on its way down from `start` (twice
        the elements in the float64 tail of a float32 chain: in this dtype's sizes)."""
        windows = self._windows(start) if windowed else [None] * (start + 1)
        shapes = [op.in_shape for op in self.layers[:start]] + (
            [self.layers[start].in_shape] if start < len(self.layers) else [self.net.output_shape])
        tail = -1 if self._tail is None else self._tail
        return max((numel(shape) if size is None else shape[0] * size[0] * size[1])
                   * (2 if i <= tail else 1)
                   for i, (shape, size) in enumerate(zip(shapes, windows, strict=True)))

    def rows_per_chunk(self, start: int, both: bool, windowed: bool = False) -> int:
        """How many rows of a backward pass from `start` fit the memory budget."""
        if self.options.chunk_size is not None:
            return self.options.chunk_size
        # a DAG's rigorous rows carry their elementwise error bounds too
        factor = BACKWARD_FACTOR * (3 if self.rigorous and not self.net.is_chain else 2) // 2
        per_row = (self._widest(start, windowed) * factor * (2 if both else 1) * self.itemsize)
        return max(1, int(self.options.memory_budget_mb * MB // per_row))

    def backward_neurons(self, pos: int, mask: Tensor, *, side: str = "both"
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Lower and upper bounds of the neurons `mask` `(N, *shape)` of layer `pos`'s input.

        `side`: ``"both"``; ``"upper"``: one row per neuron (``-e_j``, the lower bound of
        ``-z``) instead of two, the lower bounds then ``-inf``; ``"lower"``: one row ``e_j``,
        the upper bounds ``inf``.

        Returns:
            `(sample, neuron, lower, upper)`, each `(P,)`: flat neuron indices and bounds.
        """
        assert side in ("both", "upper", "lower")
        shape = self.layers[pos].in_shape
        if (len(shape) == 3 and self.net.is_chain
                and any(isinstance(op, ConvOp) for op in self.layers[:pos])):
            return self._backward_conv_neurons(pos, mask, side)
        return self._backward_flat_neurons(pos, mask.reshape(self.n, -1), side)

    def _neuron_bounds(self, lower: Tensor, upper: Tensor | None, side: str
                       ) -> tuple[Tensor, Tensor]:
        """`(lower, upper)` of a block of neuron rows: as computed, or for one `side`, the
        other bound infinite (``"upper"``: the rows were ``-e_j``, `lower` bounds ``-z``)."""
        if side == "upper":
            return torch.full_like(lower, float("-inf")), -lower
        if side == "lower":
            return lower, torch.full_like(lower, float("inf"))
        assert upper is not None
        return lower, upper

    def _center_inactive(self, pos: int) -> Tensor:
        """`(N, *shape)` whether the input of ReLU ``layers[pos]`` is negative at the box's
        center, in plain arithmetic: a guess of which neurons are inactive over the box (see
        :meth:`_tighten`)."""
        if not self._center_pre:  # one forward pass for every activation
            with torch.no_grad():
                self._center_pre = self.net.activation_inputs(self.center)
        return self._center_pre[pos] < 0

    def _backward_flat_neurons(self, pos: int, mask: Tensor, side: str
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Blocks of samples sorted by their number of rows (see :func:`_groups`)."""
        shape = self.layers[pos].in_shape
        sample, neuron = mask.nonzero(as_tuple=True)
        counts = torch.bincount(sample, minlength=self.n)
        offsets = torch.cumsum(counts, 0) - counts
        budget = self.rows_per_chunk(pos, both=True)
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        for samples, first, rows in _groups(counts.tolist(), budget):
            samples_t = torch.tensor(samples, device=sample.device)
            rank = first + torch.arange(rows, device=sample.device)
            valid = rank[None, :] < counts[samples_t][:, None]  # (B, R)
            where = (offsets[samples_t][:, None] + rank[None, :]).clamp(max=neuron.numel() - 1)
            idx = neuron[where]
            values = -valid.to(self.x_lo.dtype) if side == "upper" else valid.to(self.x_lo.dtype)
            one_hot = self.x_lo.new_zeros(len(samples), rows, mask.shape[1])
            one_hot.scatter_(2, idx.unsqueeze(2), values.unsqueeze(2))
            lower, upper = self._neuron_bounds(*self.backward_chunk(
                pos, one_hot.reshape(len(samples), rows, *shape),
                self.x_lo.new_zeros(len(samples), rows), samples_t, both=side == "both"),
                side)
            rows_sample = samples_t[:, None].expand_as(valid)
            parts.append((rows_sample[valid], idx[valid], lower[valid], upper[valid]))
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _backward_conv_neurons(self, pos: int, mask: Tensor, side: str
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One block per spatial position: its samples times their unstable channels there,
        each row a 1x1 window."""
        c, h, w = self.layers[pos].in_shape
        per_position = mask.reshape(self.n, c, h * w).permute(2, 0, 1)  # (HW, N, C)
        counts = per_position.sum(2)  # (HW, N)
        budget = self.rows_per_chunk(pos, both=True, windowed=True)
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        for q in counts.any(1).nonzero(as_tuple=True)[0].tolist():
            samples = counts[q].nonzero(as_tuple=True)[0]
            sample_counts = counts[q, samples]
            rows = int(sample_counts.max())
            order, valid = true_first(per_position[q, samples], rows)  # unstable channels first
            row_step = min(rows, budget)
            for ssl in _chunks(samples.shape[0], max(1, budget // rows)):
                for rsl in _chunks(rows, row_step):
                    ch, ok = order[ssl, rsl], valid[ssl, rsl]
                    b, r = ch.shape
                    values = -ok.to(self.x_lo.dtype) if side == "upper" else ok.to(self.x_lo.dtype)
                    one_hot = self.x_lo.new_zeros(b, r, c)
                    one_hot.scatter_(2, ch.unsqueeze(2), values.unsqueeze(2))
                    lower, upper = self._neuron_bounds(*self.backward_chunk(
                        pos, one_hot.reshape(b, r, c, 1, 1), self.x_lo.new_zeros(b, r),
                        samples[ssl], both=side == "both", window=(q // w, q % w)), side)
                    rows_sample = samples[ssl][:, None].expand_as(ok)
                    parts.append((rows_sample[ok], ch[ok] * (h * w) + q, lower[ok], upper[ok]))
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def backward_uniform(self, start: int, rows: Tensor, const: Tensor, *, both: bool,
                         rows_err: Tensor | None = None, const_err: Tensor | None = None
                         ) -> tuple[Tensor, Tensor | None]:
        """Bounds of `R` rows per sample, `rows` `(N, R, *shape)` and `const` `(N, R)`.

        `rows_err` `(N, R, *shape)` and `const_err` `(N, R)` optionally bound how far the given
        rows and constants are from the exact ones (see :meth:`backward_chunk`).

        Returns `(lower, upper)`, each `(N, R)` (upper None unless `both`).
        """
        n, r = rows.shape[:2]
        budget = self.rows_per_chunk(start, both)
        row_step = min(r, budget)
        lowers, uppers = [], []
        for ssl in _chunks(n, max(1, budget // r)):
            samples = torch.arange(ssl.start, ssl.stop, device=rows.device)
            parts = [self.backward_chunk(
                start, rows[ssl, rsl], const[ssl, rsl], samples, both=both,
                rows_err=None if rows_err is None else rows_err[ssl, rsl],
                const_err=None if const_err is None else const_err[ssl, rsl])
                for rsl in _chunks(r, row_step)]
            lowers.append(torch.cat([p[0] for p in parts], 1))
            if both:
                uppers.append(torch.cat([p[1] for p in parts], 1))  # type: ignore[misc]
        return torch.cat(lowers), (torch.cat(uppers) if both else None)

    def backward_chunk(self, start: int, a: Tensor, const: Tensor, samples: Tensor, *,
                       both: bool, alphas: dict[int, Tensor] | None = None,
                       window: Window | None = None, rows_err: Tensor | None = None,
                       const_err: Tensor | None = None, rigorous: bool | None = None,
                       betas: dict[int, Tensor] | None = None,
                       record: dict[int, Tensor] | None = None,
                       record_const: dict[int, Tensor] | None = None
                       ) -> tuple[Tensor, Tensor | None]:
        """Lower (and upper) bounds of linear functions of the input of ``layers[start]``.

        Args:
            start: Rows are functions of the output of ``layers[start - 1]``.
            a: Rows `(B, R, *shape)`, `R` per sample (zero rows are padding).
            const: Their constants `(B, R)`.
            samples: `(B,)` the sample of each block of rows.
            both: Also the upper bound, as minus the lower bound of the negated rows (which
                share the work up to the first ReLU).
            alphas: Optional free lower slopes per ReLU position, `(B, R, *shape)` each
                (only with ``both=False`` and no window).
            window: If given, `a` is `(B, R, C, h, w)`: the window of the `(C, H, W)` map with
                this top-left corner, the rows being zero outside it.
            rows_err, const_err: Elementwise bounds on the distance of `a` and `const` from the
                exact rows and constants (a folded specification's rounding); None: exact.
            rigorous: Override the engine's setting (alpha-CROWN optimizes without it).
            betas: Optional split multipliers per activation position, `(B, R, *shape)` each
                (only with ``both=False`` and no window): the term ``-beta s`` of a split
                constraint ``s z >= 0`` (beta >= 0, s = +-1 on split neurons, 0 elsewhere),
                added to the rows of the activation's input (beta-CROWN, see
                :mod:`certify.bounds.bab`). Valid for inputs that satisfy the constraints, and
                whatever its rounding: ``fl(nu - beta s)`` moves ``nu`` in the direction of
                ``-s`` or not at all (rounding is monotone), so the term that was added is
                ``-beta' s`` with ``beta' >= 0`` exactly.
            record: If given, filled with the rows `(B, R, *shape)` of every activation's
                output as they reach it (key: its position) and the rows of the input (key
                -1), as computed (the branching scores and the candidate points of
                branch and bound).
            record_const: If given (a chain only), filled with the constants `(B, R)` as they
                reach every activation's output (key: its position), as computed: a pass
                started at that output (``start`` = position + 1) with the recorded rows and
                constants finishes this one (branch and bound's children, whose relaxations
                differ only there and below).

        Rigorous mode (the default): the result bounds the *exact* rows over the box in exact
        arithmetic. Between ReLUs the transposes' rounding makes an error ``E`` on the rows,
        ``E' <= |L|^T (E + gamma_k |a|) + L_err^T (|a| + E)``, and on the constants; at a ReLU
        the constant is :func:`~certify.bounds.relaxations.relu_constant`, which holds for any
        computed new rows, so ``E`` restarts at 0 and what it cost is ``E · w``, `w` a bound on
        the ReLU's ``|output|`` (the input's reach ``|center| + radius`` at the box). A chain
        never forms ``E``: it pays each op's share into the constant's error as the rows pass,
        ``|a| · P`` with ``P = (gamma_k |L| + L_err) W_in + gamma_c |b| + b_err`` and ``W_out
        = (|L| + L_err) W_in + |b| + b_err`` pushed *forward* once per sample from the block's
        ``w`` (:meth:`_rounding_weights`): the same sum as ``E · w`` plus the constants'
        ``(|b| + b_err) · E``, by associativity, for one dot product per row instead of one
        more transpose of ``|L|``. A DAG's rows carry ``E`` elementwise (:meth:`_track`). The
        box is concretized with ``gamma_(D+1)`` error terms. The total error, times
        :data:`~certify.bounds.rounding.SAFETY`, is taken off the bound, rounding outward. A
        float32 chain switches to float64 below its first activation (the float64 tail, see
        the module docstring): from there the ops' float64 copies, float64 prices and a
        float64 concretization; the bounds are rounded outward to float32.

        Returns:
            `(lower, upper)`, each `(B, R)`; `upper` is None unless `both`.
        """
        assert alphas is None or (not both and window is None)
        assert betas is None or (not both and window is None)
        rigorous = self.rigorous if rigorous is None else rigorous
        if not self.net.is_chain:
            assert window is None, "a DAG's rows are dense"
            assert record_const is None, "a DAG's passes do not split at an activation"
            return self._backward_dag(start, a, const, samples, both=both, alphas=alphas,
                                      rows_err=rows_err, const_err=const_err,
                                      rigorous=rigorous, betas=betas, record=record)
        dtype = a.dtype
        u = rounding.unit_roundoff(dtype)
        b, r = a.shape[:2]
        a = a.reshape(b * r, *a.shape[2:])
        cerr: Tensor | None = None
        if rigorous:  # the rows' error is paid into the constant's as it arises
            cerr = (const.new_zeros(const.shape) if const_err is None
                    else const_err.to(dtype).clone())
            if rows_err is not None:
                cerr = cerr + self._rows_error_cost(start - 1, rows_err.to(dtype), samples,
                                                    window)
        split = False
        for j in range(start - 1, -1, -1):
            if self._tail is not None and j < self._tail and rigorous:
                a, const, cerr = _float64_tail(a, const, cerr)
                u = rounding.unit_roundoff(a.dtype)
            op = self.layers[j] if a.dtype == self.x_lo.dtype else self._tail_op(j)
            if is_activation(op):
                act = activation_rule(op)
                if window is not None and not act.elementwise:  # e.g. MaxPool: rows made dense
                    a = _densify(a, window, op.out_shape)
                    window = None
                a3 = a.reshape(b, -1, *a.shape[1:])
                if both and not split:
                    a3, const, split = torch.cat([a3, -a3], 1), torch.cat([const, -const], 1), True
                    if cerr is not None:
                        cerr = torch.cat([cerr, cerr], 1)
                relaxation = self.relaxations[j]
                if window is not None:
                    relaxation = Relaxation(*(_window_of(getattr(relaxation, f.name), window,
                                                         *a.shape[2:])
                                              for f in dataclasses.fields(relaxation)))
                mu = a3
                if record is not None:
                    record[j] = a3
                if record_const is not None:
                    record_const[j] = const
                a3, c = act.backward(a3, relaxation, samples,
                                     None if alphas is None else alphas.get(j),
                                     constant=cerr is None)
                if betas is not None and j in betas:
                    # split neurons are stable (their bounds are clamped at 0): the constant
                    # of the substitution does not depend on their rows (0 is a valid minimum
                    # of (mu - nu') z on [0, u] and of -nu' z on [l, 0] for the moved nu')
                    a3 = a3 + betas[j]
                perturbation = self.perturbation.get(j)
                if perturbation is not None and window is not None:
                    perturbation = _window_of(perturbation, window, *a.shape[2:])
                const, cerr, _ = _activation_constant(act, mu, a3, c, relaxation, samples,
                                                      const, cerr, None, perturbation, u)
                a = a3.reshape(-1, *a3.shape[2:])
                continue
            rules = RULES[type(op)]
            if cerr is not None:
                cerr = cerr + self._rounding_cost(j, a, samples, window)
            if window is not None and rules.backward_window is not None:
                a, c, *corner = rules.backward_window(op, a, *window)
                window = (corner[0], corner[1])
            else:
                if window is not None:
                    a = _densify(a, window, op.out_shape)
                    window = None
                a, c = rules.backward(op, a)  # type: ignore[misc]
            if c is not None:
                const = const + c.reshape(b, -1)
                if cerr is not None:
                    cerr = cerr + u * const.abs()
        if record is not None:
            record[-1] = a.reshape(b, -1, *a.shape[1:])
        if self._tail is not None and rigorous:  # (a chain of activations only: no op below)
            a, const, cerr = _float64_tail(a, const, cerr)
        lower, upper = self._concretize(a, const, None, cerr, samples, window, both=both,
                                        split=split, r=r)
        if lower.dtype != dtype:  # the float64 tail's bounds, rounded outward into dtype
            lower = _float32(lower, up=False)
            upper = None if upper is None else _float32(upper, up=True)
        return lower, upper

    def _tail_op(self, j: int) -> Op:
        """``layers[j]`` in float64 (exact), for the float64 tail of :meth:`backward_chunk`:
        one per op of the network (what ops cache, e.g. a conv's dense transposes, is kept)."""
        op = self.layers[j]
        wide = _FLOAT64_OPS.get(op)
        if wide is None:
            wide = _FLOAT64_OPS[op] = cast_op(op, torch.float64, self.x_lo.device)
        return wide

    def _backward_dag(self, start: int, a: Tensor, const: Tensor, samples: Tensor, *,
                      both: bool, alphas: dict[int, Tensor] | None,
                      rows_err: Tensor | None, const_err: Tensor | None, rigorous: bool,
                      betas: dict[int, Tensor] | None, record: dict[int, Tensor] | None
                      ) -> tuple[Tensor, Tensor | None]:
        """:meth:`backward_chunk` for a DAG (``net.inputs``): the rows start at the input of
        ``layers[start]`` (the output of its input node; ``start = len(layers)``: of the last
        node) and are pushed through the nodes in reverse topological order.

        Each node's rows are the sum of the rows its consumers give it (a node with fan-out,
        e.g. a residual block's input, gets the rows of both paths); a merge's transpose
        copies (Add) or slices (Concat) its rows exactly. Rigorous mode: rows are ``(A, E)``
        pairs as in the chain; a sum of two consumers' rows is ``fl(A_1 + A_2)``, within
        ``gamma_1 |fl(A_1 + A_2)|`` of ``A_1 + A_2`` (one rounding,
        ``|s| <= |fl(s)| / (1 - u)``; sums of subnormals are exact), so its bound is
        ``E_1 + E_2 + gamma_1 |fl(A_1 + A_2)|``. Everything else -- the ops' transposes and
        their ``_track``, the activations' constants (which restart ``E`` at 0), the
        constants' sum -- is the chain's, node by node. With `both`, the rows are doubled
        into ``[A, -A]`` at the start (lower bounds of both).
        """
        dtype = a.dtype
        u = rounding.unit_roundoff(dtype)
        b, r = a.shape[:2]
        split = False
        if both:
            a, const, split = torch.cat([a, -a], 1), torch.cat([const, -const], 1), True
            if rows_err is not None:
                rows_err = torch.cat([rows_err, rows_err], 1)
            if const_err is not None:
                const_err = torch.cat([const_err, const_err], 1)
        a = a.reshape(-1, *a.shape[2:])
        err: Tensor | None = None
        cerr: Tensor | None = None
        if rigorous:
            err = (torch.zeros_like(a) if rows_err is None
                   else rows_err.reshape(a.shape).to(dtype))
            cerr = (const.new_zeros(const.shape) if const_err is None
                    else const_err.to(dtype).clone())
        g1 = rounding.gamma(1, dtype)
        pending: dict[int, tuple[Tensor, Tensor | None]] = {}

        def send(node: int, rows: Tensor, e: Tensor | None) -> None:
            if node not in pending:
                pending[node] = (rows, e)
                return
            old, old_e = pending[node]
            total = old + rows
            if old_e is not None and e is not None:
                e = old_e + e + g1 * total.abs()
            pending[node] = (total, e)

        n = len(self.layers)
        assert start >= n or not is_merge(self.layers[start]), "rows start at one node"
        send(self.net.sources(start)[0] if start < n else n - 1, a, err)
        used: set[int] = set()
        for j in range(min(start, n) - 1, -1, -1):
            if j not in pending:
                continue
            a, err = pending.pop(j)
            op = self.layers[j]
            srcs = self.net.sources(j)
            if is_activation(op):
                act = activation_rule(op)
                a3 = a.reshape(b, -1, *a.shape[1:])
                relaxation = self.relaxations[j]
                mu = a3
                if record is not None:
                    record[j] = a3
                alpha = None if alphas is None else alphas.get(j)
                if alpha is not None:
                    used.add(j)
                a3, c = act.backward(a3, relaxation, samples, alpha, constant=err is None)
                if betas is not None and j in betas:
                    a3 = a3 + betas[j]  # valid as in the chain (see backward_chunk)
                const, cerr, err = _activation_constant(act, mu, a3, c, relaxation, samples,
                                                        const, cerr, err,
                                                        self.perturbation.get(j), u)
                send(srcs[0], a3.reshape(-1, *a3.shape[2:]), err)
                continue
            if is_merge(op):
                parts = merge_backward(op, a)  # type: ignore[arg-type]
                errs = (merge_backward(op, err) if err is not None  # type: ignore[arg-type]
                        else [None] * len(parts))
                for k, part, e in zip(srcs, parts, errs, strict=True):
                    send(k, part, e)
                continue
            old = a
            a, c = RULES[type(op)].backward(op, a)  # type: ignore[misc]
            if err is not None:
                err, cerr = self._track(op, old, err, cerr, None)  # type: ignore[arg-type]
            if c is not None:
                const = const + c.reshape(b, -1)
                if cerr is not None:
                    cerr = cerr + u * const.abs()
            send(srcs[0], a, err)
        a, err = pending.pop(-1)
        if record is not None:
            record[-1] = a.reshape(b, -1, *a.shape[1:])
        lower, upper = self._concretize(a, const, err, cerr, samples, None, both=both,
                                        split=split, r=r)
        if alphas is not None and torch.is_grad_enabled():
            # slopes of activations the rows never reach (another branch) get a zero gradient
            # rather than none (adding 0.0 leaves every bound exactly as it is)
            unused = [t for p, t in alphas.items() if p not in used and t.requires_grad]
            if unused:
                lower = lower + 0.0 * sum(t.sum() for t in unused)
        return lower, upper

    def _concretize(self, a: Tensor, const: Tensor, err: Tensor | None, cerr: Tensor | None,
                    samples: Tensor, window: Window | None, *, both: bool, split: bool, r: int
                    ) -> tuple[Tensor, Tensor | None]:
        """The end of a backward pass: rows `(B * R', *in_shape)` on the input (with their
        error bounds in rigorous mode) concretized over the box (see :meth:`backward_chunk`);
        `split`: the rows are `R` rows then their negations."""
        dtype = a.dtype
        u = rounding.unit_roundoff(dtype)
        b = int(samples.shape[0])
        center, radius = self.center.to(dtype), self.radius.to(dtype)  # exact: a wider dtype
        if window is not None:
            center = _window_of(center, window, *a.shape[2:])
            radius = _window_of(radius, window, *a.shape[2:])
        flat = a.reshape(b, -1, a[0].numel())
        center = rows_of(center, samples).reshape(b, -1, 1)
        radius = rows_of(radius, samples).reshape(b, -1, 1)
        linear = torch.bmm(flat, center).reshape(b, -1)
        magnitude = flat.abs()
        spread = torch.bmm(magnitude, radius).reshape(b, -1)
        lower = const + linear - spread
        slack: Tensor | None = None
        if cerr is not None:
            d = flat.shape[2]
            g = rounding.gamma(d + 1, dtype)
            # g |a| · (|center| + radius), the spread's dot product reused
            into = g * (torch.bmm(magnitude, center.abs()).reshape(b, -1) + spread)
            if err is not None:
                into = into + torch.bmm(err.reshape(flat.shape), center.abs() + radius
                                        ).reshape(b, -1)
            slack = rounding.SAFETY * (cerr + into + 3 * u * (const.abs() + linear.abs()
                                                              + spread.abs())
                                       + (d + 3) * rounding.tiny(dtype))
            lower = rounding.down(lower - slack)
        if not both:
            return lower, None
        if split:
            return lower[:, :r], -lower[:, r:]
        upper = const + linear + spread
        if slack is not None:
            upper = rounding.up(upper + slack)
        return lower, upper

    def _rounding_cost(self, pos: int, a: Tensor, samples: Tensor, window: Window | None
                       ) -> Tensor:
        """What the rounding of the transpose of ``layers[pos]`` (a chain's linear op) applied
        to rows `a` `(B * R, *out_shape)` (on `window`, if given) can cost the bound, `(B, R)`:
        ``|a| · P``, `P` from :meth:`_rounding_weights` (see :meth:`backward_chunk`)."""
        weights = self._rounding_weights(pos)
        if weights.rows is None:  # moves values only: exact
            return a.new_zeros(int(samples.shape[0]), a.shape[0] // int(samples.shape[0]))
        p = rows_of(weights.rows, samples)
        if weights.bias is not None:
            cons = _constant_terms(self.layers[pos], a)
            p = p + rounding.gamma(cons, a.dtype) * weights.bias
        if window is not None:
            p = _window_of(p, window, *a.shape[2:])
        b = int(samples.shape[0])
        cost = torch.bmm(a.abs().reshape(b, -1, p[0].numel()), p.reshape(b, -1, 1)).squeeze(2)
        return cost + rows_of(weights.tiny, samples).unsqueeze(1)

    def _rows_error_cost(self, pos: int, rows_err: Tensor, samples: Tensor,
                         window: Window | None) -> Tensor:
        """What an elementwise error bound `rows_err` `(B, R, *shape)` on rows of the output of
        ``layers[pos]`` (the input's, `pos = -1`) costs the bound, `(B, R)`:
        ``rows_err · W``, `W` from :meth:`_rounding_weights`."""
        w = rows_of(self._rounding_weights(pos).out, samples)
        if window is not None:
            w = _window_of(w, window, *rows_err.shape[3:])
        b, r = rows_err.shape[:2]
        rows_err = rows_err.to(w.dtype)  # exact (the float64 tail's weights are wider)
        return torch.bmm(rows_err.reshape(b, r, -1), w.reshape(b, -1, 1)).squeeze(2)

    def _rounding_weights(self, pos: int) -> _RoundingWeights:
        """The weights that price a chain's rounding of rows at the output of ``layers[pos]``
        (`pos = -1`: the input), for every sample (see :meth:`backward_chunk`)."""
        if pos < 0:
            if -1 not in self._weights:
                reach = self.center.abs() + self.radius
                if self._tail is not None:  # priced in float64 below the first activation
                    reach = reach.double()
                self._weights[-1] = (None, None, _RoundingWeights(reach, None, None,
                                                                  reach.new_zeros(self.n)))
            return self._weights[-1][2]
        op = self.layers[pos]
        anchor = self.relaxations.get(pos) if is_activation(op) else None
        cached = self._weights.get(pos)
        if cached is not None and cached[0] is anchor and (
                anchor is not None or cached[1] is self._rounding_weights(pos - 1).out):
            return cached[2]
        with torch.no_grad():
            if is_activation(op):
                # |act(z)| over the relaxation's [l, u] (its outward-rounded image)
                lo, hi = self.pre_bounds[pos]
                out_lo, out_hi = activation_rule(op).interval(lo, hi)
                w = torch.maximum(out_lo.abs(), out_hi.abs()).reshape(self.n, *op.out_shape)
                weights = _RoundingWeights(w, None, None, w.new_zeros(self.n))
                below = None
            else:
                below = self._rounding_weights(pos - 1).out
                if self._tail is not None and pos < self._tail:
                    op = self._tail_op(pos)
                weights = _op_weights(op, *self._abs_ops(op), below)
        self._weights[pos] = (anchor, below, weights)
        return weights

    def _track(self, op: Op, a: Tensor, err: Tensor, cerr: Tensor, window: Window | None
               ) -> tuple[Tensor, Tensor]:
        """The rows' and constants' error bounds after the transpose of `op` (see
        :meth:`backward_chunk`); `a` are the rows before it."""
        rules = RULES[type(op)]
        _, lin, _ = rules.terms(op)
        if lin == 0:  # a reshape
            return rules.backward(op, err)[0], cerr  # type: ignore[misc]
        dtype = a.dtype
        g = rounding.gamma(lin, dtype)

        def transpose(o: Op, rows: Tensor) -> tuple[Tensor, Tensor | None]:
            if window is not None:
                out, c, *_ = rules.backward_window(o, rows, *window)  # type: ignore[misc]
                return out, c
            return rules.backward(o, rows)  # type: ignore[misc]

        absolute, exact = self._abs_ops(op)
        new_err, c = transpose(absolute, err + g * a.abs())
        b = cerr.shape[0]
        if c is not None:
            # The constant's error: |b| · E (the rows' own error) plus its sum's rounding,
            # g_c |a| · |b| (a dot product of at most `cons` terms). `c` is
            # |b| · (E + g|a|) >= |b| · E + g |a| · |b|.
            cons = _constant_terms(op, a)
            g_c = rounding.gamma(cons, dtype)
            if cons > 4 * lin:
                # a sum much longer than a row's (a ScaleShift: every pixel): |a| · |b| on its
                # own, not bounded by c / g, which would scale |b| · E by g_c / g (3072x on a
                # 3x32x32 input; float32 bounds were loose by this alone)
                _, c_abs = transpose(absolute, a.abs())
                assert c_abs is not None
                cerr = cerr + c.reshape(b, -1) + g_c * c_abs.reshape(b, -1)
            else:  # E + g|a| covers |a| by g, so c (1 + g_c / g) covers both terms
                cerr = cerr + c.reshape(b, -1) * (1 + g_c / g)
        if exact is not None:
            e2, c2 = transpose(exact, a.abs() + err)
            new_err = new_err + e2
            if c2 is not None:
                cerr = cerr + c2.reshape(b, -1)
        return new_err + lin * rounding.tiny(dtype), cerr

    def _abs_ops(self, op: Op) -> tuple[Op, Op | None]:
        """`abs_op(op)` and `err_op(op)`, once per op of this propagator."""
        if id(op) not in self._abs_cache:
            self._abs_cache[id(op)] = (abs_op(op), err_op(op))
        return self._abs_cache[id(op)]

    # --- forward mode ------------------------------------------------------------------------

    def forward_linear(self, pos: int, samples: Tensor) -> tuple[Tensor, Tensor]:
        """Forward-mode linear bounds of the input of ``layers[pos]`` for some samples.

        Args:
            pos: The layer whose input is bounded.
            samples: `(B,)` sample indices.

        Returns:
            `(lower, upper)`, each `(B, n)` with `n` the layer's (flattened) input size.
        """
        d = numel(self.net.input_shape)
        shape = self.net.input_shape
        widest = max([d] + [numel(op.out_shape) for op in self.layers[:pos]])
        if self.options.chunk_size is not None:
            rows_budget = self.options.chunk_size
        else:
            rows_budget = max(1, int(self.options.memory_budget_mb * MB
                                     // (widest * FORWARD_FACTOR * self.itemsize)))
        sample_chunk = max(1, min(samples.shape[0], rows_budget))
        dim_chunk = max(1, rows_budget // sample_chunk)
        lowers, uppers = [], []
        for ssl in _chunks(samples.shape[0], sample_chunk):
            idx = samples[ssl]
            b = idx.shape[0]
            zero = self.x_lo.new_zeros(b, 1, *shape)
            mid, half = self._forward_rows(pos, zero, idx, with_bias=True)
            lower = (mid if half is None else mid - half).flatten(2).sum(1)
            upper = (mid if half is None else mid + half).flatten(2).sum(1)
            center = self.center.index_select(0, idx).reshape(b, d)
            radius = self.radius.index_select(0, idx).reshape(b, d)
            for dsl in _chunks(d, dim_chunk):
                k = dsl.stop - dsl.start
                basis = self.x_lo.new_zeros(b, k, d)
                basis[:, torch.arange(k), torch.arange(dsl.start, dsl.stop)] = 1.0
                mid, half = self._forward_rows(pos, basis.reshape(b, k, *shape), idx,
                                               with_bias=False)
                mid, half = mid.flatten(2), (None if half is None else half.flatten(2))
                c, r = center[:, dsl, None], radius[:, dsl, None]
                lo_coef = mid if half is None else mid - half
                hi_coef = mid if half is None else mid + half
                lower = lower + (lo_coef * c - lo_coef.abs() * r).sum(1)
                upper = upper + (hi_coef * c + hi_coef.abs() * r).sum(1)
            lowers.append(lower)
            uppers.append(upper)
        return torch.cat(lowers), torch.cat(uppers)

    def _forward_rows(self, pos: int, rows: Tensor, samples: Tensor,
                      with_bias: bool) -> tuple[Tensor, Tensor | None]:
        """Push `(B, R, *in_shape)` coefficient rows (or the constant row) through ops < pos.

        Returns the middle and half width of the lower/upper linear functions at the input of
        ``layers[pos]``, `(B, R, *shape)`; the half width is None while it is exactly zero.
        """
        b, r = rows.shape[:2]
        mid: Tensor = rows.reshape(b * r, *rows.shape[2:])
        half: Tensor | None = None
        for j in range(pos):
            op = self.layers[j]
            if is_activation(op):
                m3 = mid.reshape(b, r, *op.in_shape)
                h3 = torch.zeros_like(m3) if half is None else half.reshape(m3.shape)
                m3, h3 = activation_rule(op).forward(m3, h3, self.relaxations[j], samples,
                                                     with_bias)
                mid, half = m3.reshape(b * r, *op.out_shape), h3.reshape(b * r, *op.out_shape)
            else:
                rules = RULES[type(op)]
                mid = rules.forward(op, mid) if with_bias else rules.linear(op, mid)  # type: ignore[misc]
                if half is not None:
                    half = rules.abs_linear(op, half)  # type: ignore[misc]
        out_shape = self.layers[pos - 1].out_shape if pos else self.net.input_shape
        return (mid.reshape(b, r, *out_shape),
                None if half is None else half.reshape(b, r, *out_shape))

