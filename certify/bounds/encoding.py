"""The LP/MILP encoding of a network: one encoding rule per op type in :data:`ENCODINGS`.

A network with a folded specification (:func:`certify.bounds.network.fold_spec`) is encoded
over the variables ``[x, z_1, h_1, ..., z_L, h_L]``: the input ``x`` in its box, and for every
activation ``k`` its input ``z_k`` (within the given pre-activation bounds ``l_k <= z_k <=
u_k``) and its output ``h_k`` (within the activation's image of that box). Every op type has
one row in :data:`ENCODINGS`:

``affine`` (Linear, Conv2d, ScaleShift, AvgPool2d, AdaptiveAvgPool2d, Flatten, reshapes and
permutations)
    Composed with its neighbours into one dense *affine chain* ``z_k = M_k h_(k-1) + m_k``
    between two activations (:func:`affine_chain`), with rigorous bounds on how far the float64
    ``M_k``, ``m_k`` are from the exact chain's (the ``gamma_k`` error bounds of
    :mod:`certify.bounds.rounding` and the ops' own ``*_err`` fields).
``activation`` (ReLU, LeakyReLU, Sigmoid, Tanh)
    Its output box, its convex relaxation (the LP rows: ReLU's triangle ``h >= 0, h >= z,
    h <= u (z - l) / (u - l)`` on unstable neurons, ``h = z`` on active ones, ``h = 0`` by the
    box on inactive ones), its exact encoding with binaries (the MILP rows: ReLU's big-M ``h <=
    u a, h <= z - l (1 - a)``, Tjeng et al., ICLR 2019) and how far a solver point within a
    tolerance can move its output (:func:`relu_solver_error`). LeakyReLU(a) is piecewise
    linear too: its triangle (``h >= z``, ``h >= a z``, the chord) and an exact big-M
    (:func:`leaky_relu_big_m`). Sigmoid and Tanh are not: the LP takes their certified
    tangent and secant lines (:func:`certify.bounds.relaxations.s_lines`, valid in exact
    arithmetic), and they have **no exact encoding** -- the MILP, which claims exactness,
    refuses them with one line (:func:`require_exact_encoding`) instead of solving a
    relaxation it would report as exact.
``activation`` (MaxPool2d)
    Output box ``[max_W l, max_W u]``; where the window is decided (``l_k >= u_j`` for every
    other ``j``) ``h = z_k``, otherwise the LP rows ``h >= z_j`` and ``h <= max_W l + sum_j
    (z_j - l_j)`` over the window's candidates and the MILP's exact encoding with one binary
    per candidate (:func:`maxpool_big_m`).

``merge`` (Add, Concat: a DAG's, ``Network.inputs``)
    No variables: a DAG's affine chains run from *several* variable blocks (the input and
    earlier activations' outputs, :attr:`AffineChain.sources`) to the next activation; an
    Add's node is the sum of its two inputs' affine functions (blockwise, with the sum's
    float64 rounding bounded, :func:`_add_nodes`), a Concat's their stacking (exact). The
    model's own rounding of the DAG (the float32 Add's included) is
    :func:`~certify.bounds.forward_error.graph_error`'s, added to each chain's slack as a
    chain network's :func:`~certify.bounds.forward_error.chain_error` is.

A row whose rules need the op's parameters (LeakyReLU's slope, MaxPool's windows) holds a
function of the op that gives them (:func:`leaky_relu_encoding`, :func:`maxpool_encoding`;
:meth:`OpEncoding.activation_of` resolves a row).
``objective`` (the folded specification)
    One objective row per specification row over the last activation's output, with a bound
    on its distance from the exact one.

A new layer is one row here (and its rules in :mod:`certify.bounds.layers`).

**Floating-point soundness.** The float64 program must be a *relaxation* of the exact network
(and, when ``net.runs_in`` is set, of the model's own floating-point forward pass):

* the given intermediate bounds were computed in float32 or float64 and are widened by
  :data:`WIDEN` ``* (1 + |bound|)`` (:func:`widen`) so that their own rounding cannot cut off a
  reachable point;
* with ``slack`` (:meth:`NetworkEncoding.slack`: ``|M - M*| |h| + |m - m*|`` over the chain's
  input box, plus the model's own rounding of the chain, :func:`model_perturbations`) every
  chain equality becomes two inequalities ``|z_k - M_k h - m_k| <= slack_k``, the triangle's
  upper lines are loosened by their own rounding, and the objective's distance from the exact
  one is recorded as ``objective_slack``, to be subtracted from every bound;
* bounds computed in float64 are cast to the input's dtype outward (:func:`cast_outward`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.base import Bounds
from certify.bounds.forward_error import chain_error, graph_error, model_chains
from certify.bounds.layers import (
    RULES,
    AdaptiveAvgPoolOp,
    AddOp,
    AvgPoolOp,
    ConcatOp,
    ConvOp,
    FlattenOp,
    LeakyReluOp,
    LinearOp,
    MaxPoolOp,
    Op,
    PermuteOp,
    ReluOp,
    ScaleShiftOp,
    SigmoidOp,
    SpecLinearOp,
    TanhOp,
    abs_op,
    err_op,
    numel,
)
from certify.bounds.maxpool import windows
from certify.bounds.relaxations import (
    SIGMOID,
    SLOPE_RULES,
    TANH,
    SShape,
    enclose,
    s_lines,
    s_tangents,
)
from certify.errors import UnsupportedLayerError
from certify.spec import round_to

if TYPE_CHECKING:
    import scipy.sparse  # type: ignore[import-untyped, unused-ignore]

    from certify.bounds.network import Network

__all__ = [
    "ENCODINGS",
    "UNIT_ROUNDOFF",
    "WIDEN",
    "ActivationEncoding",
    "AffineChain",
    "BinaryRows",
    "LinearProgram",
    "MixedIntegerProgram",
    "NetworkEncoding",
    "OpEncoding",
    "Rows",
    "affine_chain",
    "cast_outward",
    "encode",
    "exact_encoding_units",
    "gamma",
    "leaky_relu_big_m",
    "leaky_relu_box",
    "leaky_relu_encoding",
    "leaky_relu_triangle",
    "maxpool_big_m",
    "maxpool_encoding",
    "model_perturbations",
    "relu_big_m",
    "relu_box",
    "relu_solver_error",
    "relu_triangle",
    "require_exact_encoding",
    "s_box",
    "s_relax",
    "sample_programs",
    "widen",
]

UNIT_ROUNDOFF = rounding.unit_roundoff(torch.float64)
#: Relative widening of intermediate bounds computed in each dtype (see :func:`widen`).
WIDEN = {torch.float32: 2.0**-16, torch.float64: 2.0**-40}

Array = np.ndarray
Interval = tuple[Array, Array]


def gamma(k: int) -> float:
    """Higham's ``gamma_k`` of a k-term float64 sum (:func:`certify.bounds.rounding.gamma`)."""
    return rounding.gamma(k, torch.float64)


# --- conversions in and out of float64 --------------------------------------------------------


def widen(bounds: Bounds, dtype: torch.dtype) -> Interval:
    """Intermediate bounds as float64 arrays `(N, n)`, widened by `WIDEN[dtype] * (1 + |v|)`.

    They were computed in `dtype` and can miss the exact pre-activation by a rounding error;
    the exact LP would then be infeasible (a zero-width box makes that likely). Widening only
    enlarges the relaxation, so the bound stays sound.
    """
    rel = WIDEN.get(dtype, WIDEN[torch.float32])
    lo = bounds.lower.detach().to("cpu", torch.float64).flatten(1).numpy()
    hi = bounds.upper.detach().to("cpu", torch.float64).flatten(1).numpy()
    return lo - rel * (1 + np.abs(lo)), hi + rel * (1 + np.abs(hi))


def cast_outward(values: Array, like: Tensor, *, down: bool) -> Tensor:
    """float64 bounds in `like`'s dtype and device, rounded outward (never inward)."""
    exact = torch.as_tensor(values, dtype=torch.float64)
    return round_to(exact, like.dtype, up=not down).to(like.device)


# --- affine chains ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineChain:
    """An affine chain between activations as ``out = M @ in + m`` (dense float64), with bounds
    on the distance of `matrix` and `offset` from the exact chain's (their rounding and the
    ops' error fields).

    `sources` (a DAG's chains, :func:`_encode_dag`): the variable blocks ``in`` stacks, in
    order (``-1``: the network's input ``x``, ``j``: the output ``h_j`` of activation ``j``);
    None: the chain of a chain network, whose input is the block before it (``x`` for the
    first chain, ``h_(k-1)`` for chain ``k``)."""

    matrix: Array  # (out, in)
    offset: Array  # (out,)
    matrix_err: Array | None = None
    offset_err: Array | None = None
    sources: tuple[int, ...] | None = None

    def error(self, reach: Array) -> Array:
        """``|M - M*| r + |m - m*|``: how far ``M h + m`` is from the exact chain for every
        input ``|h| <= reach``, `(out,)`."""
        out: Array = _zeros_if_none(self.matrix_err, self.matrix) @ reach + _zeros_if_none(
            self.offset_err, self.offset)
        return out

    def blocks(self, k: int) -> tuple[int, ...]:
        """The blocks its input stacks, for chain `k` of its encoding."""
        return (k - 1,) if self.sources is None else self.sources


def _linear_step(op: Op, basis: Tensor, basis_err: Tensor) -> tuple[Tensor, Tensor]:
    """One affine op applied to the linear part `basis` (rows: the identity basis of an input
    block pushed through the ops so far) with its error bound ``E`` (``E' = |L| E + gamma_k
    |L| |M| + L_err (|M| + E)``, see :mod:`certify.bounds.rounding`)."""
    rules = RULES[type(op)]
    k = rules.terms(op)[0]
    absolute, exact = abs_op(op), err_op(op)
    g = rounding.gamma(k, torch.float64)
    lin_abs = rules.linear(absolute, basis_err + g * basis.abs())  # type: ignore[misc]
    if exact is not None:
        lin_abs = lin_abs + rules.linear(exact, basis.abs() + basis_err)  # type: ignore[misc]
    return (rules.linear(op, basis),  # type: ignore[misc]
            lin_abs + k * rounding.tiny(torch.float64))


def _offset_step(op: Op, zero: Tensor, zero_err: Tensor) -> tuple[Tensor, Tensor]:
    """One affine op applied to the offset `zero` (the ops so far at input 0) with its error
    bound: ``|L| E + gamma_k (|L| |m| + |b|)`` plus ``L_err`` on ``|m| + E``."""
    rules = RULES[type(op)]
    k = rules.terms(op)[0]
    absolute, exact = abs_op(op), err_op(op)
    g = rounding.gamma(k, torch.float64)
    off_abs = (rules.linear(absolute, zero_err)  # type: ignore[misc]
               + g * rules.forward(absolute, zero.abs()))
    if exact is not None:
        off_abs = off_abs + rules.forward(exact, zero.abs() + zero_err)
    return rules.forward(op, zero), off_abs + k * rounding.tiny(torch.float64)


def affine_chain(ops: list[Op], in_shape: tuple[int, ...]) -> AffineChain:
    """Dense matrix and offset of a chain of affine ops (applied to the identity basis), with
    rigorous error bounds (``E' = |L| E + gamma_k |L| |M| + L_err (|M| + E)``, see
    :mod:`certify.bounds.rounding`)."""
    d = numel(in_shape)
    f64 = torch.float64
    basis = torch.eye(d, dtype=f64).reshape(d, *in_shape)
    zero = torch.zeros(1, *in_shape, dtype=f64)
    basis_err, zero_err = torch.zeros_like(basis), torch.zeros_like(zero)
    for op in ops:
        basis, basis_err = _linear_step(op, basis, basis_err)
        zero, zero_err = _offset_step(op, zero, zero_err)
    safety = rounding.SAFETY
    return AffineChain(basis.reshape(d, -1).T.numpy(), zero.reshape(-1).numpy(),
                       safety * basis_err.reshape(d, -1).T.numpy(),
                       safety * zero_err.reshape(-1).numpy())


@dataclass
class _Node:
    """A DAG node's value as an affine function of variable blocks, ``sum_b B_b^T h_b + m``:
    per block `(d_b, *shape)` its basis and the bound on the basis' distance from the exact
    one; the offset `(1, *shape)` and its bound."""

    basis: dict[int, tuple[Tensor, Tensor]]
    zero: Tensor
    zero_err: Tensor

    @staticmethod
    def block(b: int, shape: tuple[int, ...]) -> _Node:
        """The variable block `b` itself (exact)."""
        d = numel(shape)
        eye = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
        zero = torch.zeros(1, *shape, dtype=torch.float64)
        return _Node({b: (eye, torch.zeros_like(eye))}, zero, torch.zeros_like(zero))

    def affine(self, op: Op) -> _Node:
        """The node after one affine op (:func:`_linear_step` per block, :func:`_offset_step`)."""
        return _Node({b: _linear_step(op, m, e) for b, (m, e) in self.basis.items()},
                     *_offset_step(op, self.zero, self.zero_err))

    def chain(self) -> AffineChain:
        """The dense chain over the blocks stacked in increasing order, errors times
        ``rounding.SAFETY`` (their own float64 rounding, as in :func:`affine_chain`)."""
        order = sorted(self.basis)
        mats = [self.basis[b][0].detach().reshape(self.basis[b][0].shape[0], -1).T.numpy()
                for b in order]
        errs = [self.basis[b][1].detach().reshape(self.basis[b][1].shape[0], -1).T.numpy()
                for b in order]
        n = self.zero.numel()
        safety = rounding.SAFETY
        matrix = np.concatenate(mats, 1) if mats else np.zeros((n, 0))
        matrix_err = safety * np.concatenate(errs, 1) if errs else np.zeros((n, 0))
        return AffineChain(matrix, self.zero.detach().reshape(-1).numpy(), matrix_err,
                           safety * self.zero_err.detach().reshape(-1).numpy(), tuple(order))


def _add_nodes(a: _Node, b: _Node) -> _Node:
    """``a + b``: per shared block ``fl(B_1 + B_2)``, one rounding within ``u |B_1 + B_2| <=
    gamma_1 (|B_1| + |B_2|)`` of the exact sum (sums of subnormals are exact), so the bound is
    ``E_1 + E_2 + gamma_1 (|B_1| + |B_2|)``; the same for the offsets; a block of one side only
    is copied (``B + 0`` is exact)."""
    g = rounding.gamma(1, torch.float64)
    basis = dict(a.basis)
    for k, (m2, e2) in b.basis.items():
        if k in basis:
            m1, e1 = basis[k]
            basis[k] = (m1 + m2, e1 + e2 + g * (m1.abs() + m2.abs()))
        else:
            basis[k] = (m2, e2)
    return _Node(basis, a.zero + b.zero,
                 a.zero_err + b.zero_err + g * (a.zero.abs() + b.zero.abs()))


def _concat_nodes(op: ConcatOp, parts: list[_Node], sizes: dict[int, int]) -> _Node:
    """The concatenation (exact: values are moved); a block absent from a part is zero there.
    `sizes`: each block's number of variables."""
    dim = op.dim + 1
    basis: dict[int, tuple[Tensor, Tensor]] = {}
    for b in sorted({k for p in parts for k in p.basis}):
        mats, errs = [], []
        for k, p in enumerate(parts):
            if b in p.basis:
                mats.append(p.basis[b][0])
                errs.append(p.basis[b][1])
            else:
                z = torch.zeros(sizes[b], *op.input_shape(k), dtype=torch.float64)
                mats.append(z)
                errs.append(z)
        basis[b] = (torch.cat(mats, dim), torch.cat(errs, dim))
    return _Node(basis, torch.cat([p.zero for p in parts], dim),
                 torch.cat([p.zero_err for p in parts], dim))


def _zeros_if_none(err: Array | None, like: Array) -> Array:
    return np.zeros_like(like) if err is None else err


# --- rows of a program ------------------------------------------------------------------------


@dataclass
class Rows:
    """Sparse constraint rows over all `total` variables of a program, in order."""

    total: int
    eq: list[Any]
    eq_rhs: list[Array]
    ub: list[Any]
    ub_rhs: list[Array]

    def place(self, start: int, block: Any, n_rows: int) -> Any:
        """`block` (n_rows x k) placed at columns [start, start + k)."""
        import scipy.sparse as sp  # type: ignore[import-untyped, unused-ignore]

        k = block.shape[1]
        return sp.hstack([sp.csr_matrix((n_rows, start)), sp.csr_matrix(block),
                          sp.csr_matrix((n_rows, self.total - start - k))], format="csr")

    def stacked(self) -> tuple[Any, Array, Any, Array]:
        """``(A_eq, b_eq, A_ub, b_ub)``."""
        import scipy.sparse as sp  # type: ignore[import-untyped, unused-ignore]

        def stack(rows: list[Any]) -> Any:
            return sp.vstack(rows, format="csr") if rows else sp.csr_matrix((0, self.total))

        return (stack(self.eq), np.concatenate(self.eq_rhs) if self.eq_rhs else np.zeros(0),
                stack(self.ub), np.concatenate(self.ub_rhs) if self.ub_rhs else np.zeros(0))


@dataclass(frozen=True)
class BinaryRows:
    """Inequality rows with binaries of one activation layer (an exact encoding), numbered
    from 0 (rows and binaries): ``sum cont_vals v[cont_cols] + sum bin_vals a[bin_cols] <=
    rhs`` per row."""

    cont_rows: list[int]
    cont_cols: list[int]
    cont_vals: list[float]
    bin_rows: list[int]
    bin_cols: list[int]
    bin_vals: list[float]
    rhs: list[float]
    n_rows: int
    n_bin: int


# --- the encoding table -----------------------------------------------------------------------

#: ``(l, u) -> (lo, hi)``: the box of an activation's output given its input's bounds.
OutputBox = Callable[[Array, Array], Interval]
#: ``(rows, l, u, z, h, rigorous)``: append the relaxation's rows on input columns
#: ``[z, z + n)`` and output columns ``[h, h + n)`` (loosened for their rounding if rigorous).
Relax = Callable[[Rows, Array, Array, int, int, bool], None]
#: ``(l, u, z, h) -> BinaryRows``: the exact encoding's rows, with binaries.
Exact = Callable[[Array, Array, int, int], BinaryRows]
#: ``(err, l, u, tau) -> err'``: how far the output of a point that satisfies the rows only up
#: to `tau` (binaries included) can be, given its input's distance `err`.
SolverError = Callable[[Array, Array, Array, float], Array]


@dataclass(frozen=True)
class ActivationEncoding:
    """How an activation enters the programs (see the type aliases): its output box, its
    convex relaxation (LP rows), its exact encoding (MILP rows with binaries; None: it has
    none, it is not piecewise linear) and how a tolerance-feasible solver point can move its
    output. An op with parameters gets its own, from its row's function of the op
    (:meth:`OpEncoding.activation_of`)."""

    output_box: OutputBox
    relax: Relax
    exact: Exact | None
    solver_error: SolverError


@dataclass(frozen=True)
class OpEncoding:
    """How one op type enters the LP/MILP: a row of :data:`ENCODINGS`.

    Attributes:
        kind: ``"affine"`` (composed into a chain), ``"activation"`` (new variables, relaxed
            or exactly encoded), ``"objective"`` (the folded specification, last), or
            ``"merge"`` (Add, Concat: a DAG's; no variables, the nodes they take are summed
            or stacked into the next chain, see :func:`_encode_dag`).
        activation: The activation's rules (for ``"activation"`` only), or for an op with
            parameters (LeakyReLU's slope, MaxPool2d's windows) the function of the op that
            gives them.
    """

    kind: Literal["affine", "activation", "objective", "merge"]
    activation: ActivationEncoding | Callable[[Any], ActivationEncoding] | None = None

    def activation_of(self, op: Op) -> ActivationEncoding | None:
        """The activation's rules for `op` (None for a row of another kind)."""
        row = self.activation
        return row if row is None or isinstance(row, ActivationEncoding) else row(op)


def relu_box(l: Array, u: Array) -> Interval:
    """ReLU's output box: ``[max(l, 0), max(u, 0)]``."""
    return np.maximum(l, 0), np.maximum(u, 0)


def relu_triangle(rows: Rows, l: Array, u: Array, z: int, h: int, rigorous: bool) -> None:
    """``h = z`` where ``l >= 0``; the triangle ``h >= z``, ``h <= u (z - l) / (u - l)`` where
    ``l < 0 < u`` (``h >= 0`` and ``h = 0`` where ``u <= 0`` are the output box). With
    `rigorous`, the rounded chord and intercept are valid up to ``4u (|u| + |s l|)``."""
    import scipy.sparse as sp

    n = l.shape[0]
    active = l >= 0
    unstable = (l < 0) & (u > 0)
    if active.any():  # h = z
        sel = sp.identity(n, format="csr")[active]
        rows.eq.append(rows.place(h, sel, sel.shape[0]) - rows.place(z, sel, sel.shape[0]))
        rows.eq_rhs.append(np.zeros(sel.shape[0]))
    if unstable.any():
        sel = sp.identity(n, format="csr")[unstable]
        m = sel.shape[0]
        slope = u[unstable] / (u[unstable] - l[unstable])
        rows.ub.append(rows.place(z, sel, m) - rows.place(h, sel, m))  # z - h <= 0
        rows.ub_rhs.append(np.zeros(m))
        rows.ub.append(rows.place(h, sel, m) - rows.place(z, sp.diags(slope) @ sel, m))
        rhs = -slope * l[unstable]  # h - s z <= -s l
        if rigorous:
            rhs = rhs + 4 * UNIT_ROUNDOFF * (np.abs(u[unstable]) + np.abs(rhs)) + 1e-300
        rows.ub_rhs.append(rhs)


def relu_big_m(l: Array, u: Array, z: int, h: int) -> BinaryRows:
    """Per unstable neuron, ``h - u a <= 0`` and ``h - z - l a <= -l`` (``a`` binary)."""
    out = BinaryRows([], [], [], [], [], [], [], 0, 0)
    r = m = 0
    for j in np.nonzero((l < 0) & (u > 0))[0]:
        # h - u a <= 0
        out.cont_rows.append(r)
        out.cont_cols.append(int(h + j))
        out.cont_vals.append(1.0)
        out.bin_rows.append(r)
        out.bin_cols.append(m)
        out.bin_vals.append(-u[j])
        out.rhs.append(0.0)
        # h - z - l a <= -l
        out.cont_rows.extend([r + 1, r + 1])
        out.cont_cols.extend([int(h + j), int(z + j)])
        out.cont_vals.extend([1.0, -1.0])
        out.bin_rows.append(r + 1)
        out.bin_cols.append(m)
        out.bin_vals.append(-l[j])
        out.rhs.append(-l[j])
        r += 2
        m += 1
    return replace(out, n_rows=r, n_bin=m)


def relu_solver_error(err: Array, l: Array, u: Array, tau: float) -> Array:
    """A binary off by `tau` lets an unstable output move by ``tau max(|l|, |u|)`` (the big-M
    scale), and every row by `tau`; ReLU is 1-Lipschitz."""
    unstable = (l < 0) & (u > 0)
    return err + np.where(unstable, tau * np.maximum(np.abs(l), np.abs(u)) + 2 * tau, tau)


# --- LeakyReLU, S-shapes ---------------------------------------------------------------------


def _up(x: Array) -> Array:
    return np.nextafter(x, np.inf)  # type: ignore[no-any-return]


def _dn(x: Array) -> Array:
    return np.nextafter(x, -np.inf)  # type: ignore[no-any-return]


def leaky_relu_box(slope: float, l: Array, u: Array) -> Interval:
    """LeakyReLU's output box ``[lrelu(l), lrelu(u)]`` (monotone), ``a x`` rounded outward."""
    return (np.where(l >= 0, l, _dn(slope * l)), np.where(u >= 0, u, _up(slope * u)))


def leaky_relu_triangle(slope: float, rows: Rows, l: Array, u: Array, z: int, h: int,
                        rigorous: bool) -> None:
    """``h = z`` where ``l >= 0``, ``h = a z`` where ``u <= 0``; where ``l < 0 < u``: ``h >= z``,
    ``h >= a z`` and the chord ``h <= s z + t``, ``s = (u - a l) / (u - l)``, with ``t`` the
    maximum of the convex ``lrelu(z) - s z`` over ``[l, u]`` -- at an end -- rounded up, so the
    row is valid for the rounded ``s`` as it is (whether or not `rigorous`)."""
    import scipy.sparse as sp

    n = l.shape[0]
    unstable = (l < 0) & (u > 0) & (slope < 1)
    active = (l >= 0) | ((slope >= 1) & ~unstable)
    inactive = ~active & ~unstable
    eye = sp.identity(n, format="csr")
    for mask, factor in ((active, 1.0), (inactive, slope)):
        if mask.any():  # h = factor z (factor is the exact slope)
            sel = eye[mask]
            m = sel.shape[0]
            rows.eq.append(rows.place(h, sel, m) - factor * rows.place(z, sel, m))
            rows.eq_rhs.append(np.zeros(m))
    if unstable.any():
        sel = eye[unstable]
        m = sel.shape[0]
        lo, hi = l[unstable], u[unstable]
        s = (hi - slope * lo) / (hi - lo)
        rows.ub.append(rows.place(z, sel, m) - rows.place(h, sel, m))  # z - h <= 0
        rows.ub_rhs.append(np.zeros(m))
        rows.ub.append(slope * rows.place(z, sel, m) - rows.place(h, sel, m))  # a z - h <= 0
        rows.ub_rhs.append(np.zeros(m))
        rows.ub.append(rows.place(h, sel, m) - rows.place(z, sp.diags(s) @ sel, m))
        rows.ub_rhs.append(np.maximum(_up(_up(slope * lo) - _dn(s * lo)),
                                      _up(hi - _dn(s * hi))))


def leaky_relu_big_m(slope: float, l: Array, u: Array, z: int, h: int) -> BinaryRows:
    """Per unstable neuron (binary ``a`` = 1 where active): ``h - z <= M1 (1 - a)`` and ``h -
    a_s z <= M2 a`` with ``M1 >= (1 - a_s)(-l)`` and ``M2 >= (1 - a_s) u`` rounded up; with the
    triangle's ``h >= z``, ``h >= a_s z`` they leave exactly ``h = z, z >= 0`` (``a = 1``) or
    ``h = a_s z, z <= 0`` (``a = 0``). For slope 0 these are ReLU's rows."""
    out = BinaryRows([], [], [], [], [], [], [], 0, 0)
    r = m = 0
    gap = _up(np.float64(1.0) - slope)
    for j in np.nonzero((l < 0) & (u > 0) & (slope < 1))[0]:
        m1, m2 = float(_up(gap * -l[j])), float(_up(gap * u[j]))
        # h - z + M1 a <= M1
        out.cont_rows.extend([r, r])
        out.cont_cols.extend([int(h + j), int(z + j)])
        out.cont_vals.extend([1.0, -1.0])
        out.bin_rows.append(r)
        out.bin_cols.append(m)
        out.bin_vals.append(m1)
        out.rhs.append(m1)
        # h - a_s z - M2 a <= 0
        out.cont_rows.extend([r + 1, r + 1])
        out.cont_cols.extend([int(h + j), int(z + j)])
        out.cont_vals.extend([1.0, -slope])
        out.bin_rows.append(r + 1)
        out.bin_cols.append(m)
        out.bin_vals.append(-m2)
        out.rhs.append(0.0)
        r += 2
        m += 1
    return replace(out, n_rows=r, n_bin=m)


def leaky_relu_encoding(op: LeakyReluOp) -> ActivationEncoding:
    """The :class:`ActivationEncoding` of one LeakyReLU op (its slope bound in; its
    :data:`ENCODINGS` row builds it per op)."""
    a = op.negative_slope
    return ActivationEncoding(partial(leaky_relu_box, a), partial(leaky_relu_triangle, a),
                              partial(leaky_relu_big_m, a), relu_solver_error)


def s_box(f: SShape, l: Array, u: Array) -> Interval:
    """An S-shape's output box: enclosures of ``f(l)`` and ``f(u)``."""
    lo = enclose(f, torch.from_numpy(np.asarray(l, dtype=np.float64)))[0]
    hi = enclose(f, torch.from_numpy(np.asarray(u, dtype=np.float64)))[1]
    return lo.numpy(), hi.numpy()


#: Tangents per side of an S-shaped neuron in the LP, besides the slope rules' lines.
S_TANGENTS = 5
#: An S-shaped neuron whose output box is narrower than this keeps only the box in the LP.
S_BOX_ONLY_WIDTH = 1e-7


def s_relax(f: SShape, rows: Rows, l: Array, u: Array, z: int, h: int, rigorous: bool) -> None:
    """For every neuron, ``h >= kL z + bL`` and ``h <= kU z + bU`` for the lines of each slope
    rule (:func:`certify.bounds.relaxations.s_lines`, so the LP holds CROWN's and Wong-Kolter's
    lines) and :data:`S_TANGENTS` more tangents per side
    (:func:`certify.bounds.relaxations.s_tangents`), all with certified intercepts, valid in
    exact arithmetic for the float64 slopes as they are (whether or not `rigorous`); the LP
    relaxes ``h = f(z)`` by their intersection with the output box.

    A saturated neuron, whose output box is narrower than :data:`S_BOX_ONLY_WIDTH`, keeps the
    box alone: its lines could move a bound by less than the box width times the neuron's
    weight, and a dozen near-parallel rows that close to each other make HiGHS report a
    feasible LP infeasible (and the bound fall back to the interval one)."""
    import scipy.sparse as sp

    out_lo, out_hi = s_box(f, l, u)
    keep = out_hi - out_lo >= S_BOX_ONLY_WIDTH
    if not keep.any():
        return
    sel = sp.identity(l.shape[0], format="csr")[keep]
    m = sel.shape[0]
    lt, ut = (torch.from_numpy(np.asarray(b, dtype=np.float64)[keep]) for b in (l, u))
    lines = [s_lines(f, lt, ut, rule) for rule in SLOPE_RULES] + s_tangents(f, lt, ut,
                                                                              S_TANGENTS)
    for line in lines:
        k_lo, b_lo, k_up, b_up = (t.numpy() for t in line)
        rows.ub.append(rows.place(z, sp.diags(k_lo) @ sel, m) - rows.place(h, sel, m))
        rows.ub_rhs.append(-b_lo)  # kL z - h <= -bL
        rows.ub.append(rows.place(h, sel, m) - rows.place(z, sp.diags(k_up) @ sel, m))
        rows.ub_rhs.append(b_up)  # h - kU z <= bU


def s_solver_error(f: SShape, err: Array, l: Array, u: Array, tau: float) -> Array:
    """An S-shape is ``f'(0)``-Lipschitz; every row may be violated by `tau`."""
    return f.peak * err + tau


def _s_encoding(f: SShape) -> ActivationEncoding:
    return ActivationEncoding(partial(s_box, f), partial(s_relax, f), None,
                              partial(s_solver_error, f))


# --- MaxPool2d ---------------------------------------------------------------------------------


def _windows_np(op: MaxPoolOp) -> tuple[Array, Array]:
    """The windows of `op`: flat input indices `(m, K)` and where they are no padding."""
    win = windows(op, "cpu")
    return win.index.numpy(), win.valid.numpy()


def _window_values(values: Array, index: Array, valid: Array) -> Array:
    """`values` `(..., n)` gathered per window, `(..., m, K)`, -inf at padding positions."""
    return np.where(valid, values[..., index], -np.inf)


def maxpool_box(index: Array, valid: Array, l: Array, u: Array) -> Interval:
    """MaxPool's output box: ``[max_W l, max_W u]`` (exact), for `(..., n)` bounds."""
    return (_window_values(l, index, valid).max(-1), _window_values(u, index, valid).max(-1))


@dataclass(frozen=True)
class _Windows:
    """One sample's decision per window (see :mod:`certify.bounds.maxpool`): `(m,)` each,
    `candidates` `(m, K)` (the inputs that may be the max: the argmax of ``l`` and every
    ``j`` with ``u_j > max_W l``)."""

    k: Array  # flat input index of the argmax of l
    low: Array  # max_W l
    decided: Array
    candidates: Array


def _decide(index: Array, valid: Array, l: Array, u: Array) -> _Windows:
    lw, uw = _window_values(l, index, valid), _window_values(u, index, valid)
    rows = np.arange(index.shape[0])
    kk = lw.argmax(1)
    low = lw[rows, kk]
    others = uw.copy()
    others[rows, kk] = -np.inf
    candidates = valid & (uw > low[:, None])
    candidates[rows, kk] = True
    return _Windows(index[rows, kk], low, low >= others.max(1), candidates)


def maxpool_relax(index: Array, valid: Array, rows: Rows, l: Array, u: Array, z: int, h: int,
                  rigorous: bool) -> None:
    """Decided windows: ``h_p = z_k``. Otherwise, over the candidates ``J_p`` (the others never
    are the max: ``z_j <= u_j <= max_W l <= z_k``): ``h_p >= z_j`` and ``h_p <= L_p + sum_J
    (z_j - l_j)`` (``L_p = max l``; the max ``z_j*`` is ``l_j* + (z_j* - l_j*) <= L_p +`` that
    sum, whose terms are all >= 0); ``h_p <= max u`` is the output box. With `rigorous`, the
    last row's right-hand side is loosened by its rounding ``gamma_(K+1) (|L| + sum |l_J|)``.
    """
    import scipy.sparse as sp

    d = _decide(index, valid, l, u)
    m = index.shape[0]
    out = np.arange(m)
    dec = np.nonzero(d.decided)[0]
    if dec.size:  # h_p - z_k = 0
        r = np.arange(dec.size)
        rows.eq.append(sp.csr_matrix(
            (np.r_[np.ones(dec.size), -np.ones(dec.size)],
             (np.r_[r, r], np.r_[h + out[dec], z + d.k[dec]])), shape=(dec.size, rows.total)))
        rows.eq_rhs.append(np.zeros(dec.size))
    cand = d.candidates & ~d.decided[:, None]
    p, q = np.nonzero(cand)
    if not p.size:
        return
    j = index[p, q]
    r = np.arange(p.size)  # z_j - h_p <= 0
    rows.ub.append(sp.csr_matrix((np.r_[np.ones(p.size), -np.ones(p.size)],
                                  (np.r_[r, r], np.r_[z + j, h + p])),
                                 shape=(p.size, rows.total)))
    rows.ub_rhs.append(np.zeros(p.size))
    und = np.nonzero(~d.decided)[0]
    slot = np.full(m, -1)
    slot[und] = np.arange(und.size)
    # h_p - sum_J z_j <= L_p - sum_J l_j
    rows.ub.append(sp.csr_matrix((np.r_[np.ones(und.size), -np.ones(p.size)],
                                  (np.r_[np.arange(und.size), slot[p]], np.r_[h + und, z + j])),
                                 shape=(und.size, rows.total)))
    l_sum = np.zeros(m)
    np.add.at(l_sum, p, l[j])
    rhs = d.low[und] - l_sum[und]
    if rigorous:
        l_abs = np.zeros(m)
        np.add.at(l_abs, p, np.abs(l[j]))
        k = int(cand.sum(1).max()) + 1
        rhs = rhs + 2 * gamma(k) * (np.abs(d.low[und]) + l_abs[und]) + 1e-300
    rows.ub_rhs.append(rhs)


def maxpool_big_m(index: Array, valid: Array, l: Array, u: Array, z: int, h: int
                  ) -> BinaryRows:
    """The exact encoding of every undecided window (decided ones are exact in the LP rows):
    one binary ``a_j`` per candidate ``j``, ``sum_j a_j = 1`` and

        ``h_p <= z_j + M_j (1 - a_j)``,  ``M_j = max_(i in J, i != j) u_i - l_j`` (rounded up).

    With the LP's ``h_p >= z_j`` this is exact: ``a_j = 1`` forces ``h_p = z_j = max``, and the
    true point with ``a`` at its argmax is feasible (``z_j + M_j >= max_(i in J, i != j) u_i``,
    and the max over the window is the max over ``J``). ``M_j`` is rounded up (a larger one is
    as valid).
    """
    d = _decide(index, valid, l, u)
    uw = _window_values(u, index, valid)
    out = BinaryRows([], [], [], [], [], [], [], 0, 0)
    r = m = 0
    for p in np.nonzero(~d.decided)[0]:
        cand = np.nonzero(d.candidates[p])[0]
        first = m
        for q in cand:
            j = int(index[p, q])
            others = uw[p, cand[cand != q]]  # at least one: an undecided window has two
            big = float(np.nextafter(others.max() - l[j], np.inf))
            # h_p - z_j + M_j a_j <= M_j
            out.cont_rows.extend([r, r])
            out.cont_cols.extend([int(h + p), int(z + j)])
            out.cont_vals.extend([1.0, -1.0])
            out.bin_rows.append(r)
            out.bin_cols.append(m)
            out.bin_vals.append(big)
            out.rhs.append(big)
            r += 1
            m += 1
        for sign in (1.0, -1.0):  # sum a <= 1 and -sum a <= -1
            out.bin_rows.extend([r] * (m - first))
            out.bin_cols.extend(range(first, m))
            out.bin_vals.extend([sign] * (m - first))
            out.rhs.append(sign)
            r += 1
    return replace(out, n_rows=r, n_bin=m)


def maxpool_solver_error(index: Array, valid: Array, err: Array, l: Array, u: Array,
                         tau: float) -> Array:
    """A max is 1-Lipschitz: the inputs' ``max_W err``; the rows within `tau` put ``h`` within
    ``3 tau`` of ``max z`` where decided, and within ``(M + 1) tau`` otherwise (a binary within
    `tau` of 1 lets ``h <= z_j + M_j tau + tau``; ``M <= max_W u - min_W l``)."""
    d = _decide(index, valid, l, u)
    spread = (_window_values(u, index, valid).max(1)
              - np.where(valid, l[index], np.inf).min(1))
    moved = np.where(d.decided, 3 * tau, (spread + 4) * tau)
    return _window_values(err, index, valid).max(1) + moved  # type: ignore[no-any-return]


def maxpool_encoding(op: MaxPoolOp) -> ActivationEncoding:
    """The :class:`ActivationEncoding` of one MaxPool op (its windows bound in; its
    :data:`ENCODINGS` row builds it per op)."""
    index, valid = _windows_np(op)
    return ActivationEncoding(partial(maxpool_box, index, valid),
                              partial(maxpool_relax, index, valid),
                              partial(maxpool_big_m, index, valid),
                              partial(maxpool_solver_error, index, valid))


AFFINE = OpEncoding("affine")
ENCODINGS: dict[type, OpEncoding] = {
    LinearOp: AFFINE,
    ConvOp: AFFINE,
    ScaleShiftOp: AFFINE,
    AvgPoolOp: AFFINE,
    AdaptiveAvgPoolOp: AFFINE,
    FlattenOp: AFFINE,
    PermuteOp: AFFINE,
    ReluOp: OpEncoding("activation", ActivationEncoding(relu_box, relu_triangle, relu_big_m,
                                                        relu_solver_error)),
    LeakyReluOp: OpEncoding("activation", leaky_relu_encoding),
    SigmoidOp: OpEncoding("activation", _s_encoding(SIGMOID)),
    TanhOp: OpEncoding("activation", _s_encoding(TANH)),
    MaxPoolOp: OpEncoding("activation", maxpool_encoding),
    SpecLinearOp: OpEncoding("objective"),
    AddOp: OpEncoding("merge"),
    ConcatOp: OpEncoding("merge"),
}


def _rule(op: Op, index: int) -> OpEncoding:
    rule = ENCODINGS.get(type(op))
    if rule is None:
        raise UnsupportedLayerError(
            f"op {index} ({type(op).__name__}) has no LP/MILP encoding; add a row to "
            "certify.bounds.encoding.ENCODINGS or use a method without a solver.")
    return rule


def _activation(op: Op, index: int) -> ActivationEncoding:
    rule = _rule(op, index).activation_of(op)
    if rule is None:
        raise ValueError(f"op {index} ({type(op).__name__}) is not an activation")
    return rule


def _layer_name(net: Network, index: int) -> str:
    """Layer `index` of `net` as messages name it: ``layer 3 'conv1' (Sigmoid)``."""
    name = net.names[index] if index < len(net.names) else str(index)
    return f"layer {index} '{name}' ({type(net.layers[index]).__name__[:-2]})"


def _no_exact_encoding(what: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"{what} is not piecewise linear, so it has no exact MILP encoding (the MILP and "
        "exact radii claim exactness); use lp (its linear relaxation), alpha-crown or crown.")


def exact_encoding_units(net: Network) -> int | None:
    """How many activation inputs the exact MILP of `net` encodes (binaries for the unstable
    ones, or MaxPool's candidates), or None when one of its activations has no exact
    encoding (Sigmoid, Tanh). Chains and DAGs alike (merges add no binaries)."""
    total = 0
    for op in net.layers:
        rule = ENCODINGS.get(type(op))
        activation = None if rule is None else rule.activation_of(op)
        if activation is None:
            continue
        if activation.exact is None:
            return None
        total += numel(op.in_shape)
    return total


def require_exact_encoding(net: Network) -> None:
    """Raise a one-line error naming the first activation of `net` without an exact MILP
    encoding (before any work is spent on a MILP)."""
    for index, op in enumerate(net.layers):
        rule = ENCODINGS.get(type(op))
        activation = None if rule is None else rule.activation_of(op)
        if activation is not None and activation.exact is None:
            raise _no_exact_encoding(_layer_name(net, index))


# --- programs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearProgram:
    """``min c·v + const`` s.t. ``A_eq v = b_eq``, ``A_ub v <= b_ub``, ``lo <= v <= hi``.

    `offsets` are the first columns of ``x, z_1, h_1, ..., z_L, h_L`` and the end.
    """

    objectives: Array  # (S, n): one objective per specification row
    constants: Array  # (S,)
    a_eq: scipy.sparse.csr_matrix
    b_eq: Array
    a_ub: scipy.sparse.csr_matrix
    b_ub: Array
    lo: Array
    hi: Array
    objective_slack: Array | None = None  # (S,): bound on |exact - stored| objective
    offsets: Array | None = None

    def rows(self, keep: list[int]) -> LinearProgram:
        """The program with only the objective rows `keep` (and no objective slack)."""
        return replace(self, objectives=self.objectives[keep], constants=self.constants[keep],
                       objective_slack=None)


@dataclass(frozen=True)
class MixedIntegerProgram:
    """A :class:`LinearProgram` plus binaries and the rows of the activations' exact encoding.

    ``a_eq v = b_eq``, ``a_ub v + a_ub_bin a <= b_ub``, ``lo <= v <= hi``, ``a`` binary.
    """

    lp: LinearProgram
    a_ub: scipy.sparse.csr_matrix  # (R, n) continuous part of all inequality rows
    a_ub_bin: scipy.sparse.csr_matrix  # (R, m) binary part
    b_ub: Array  # (R,)
    n_bin: int
    width: float  # sum of the variables' box widths (binaries: 1 each)


@dataclass(frozen=True)
class NetworkEncoding:
    """The encoding of one network with a folded specification (see :func:`encode`).

    Attributes:
        chains: The affine chain before each activation and, last, before the specification.
        activations: The encoding row of each activation, in order.
        spec: The folded specification (per-sample weights).
    """

    chains: list[AffineChain]
    activations: list[ActivationEncoding]
    spec: SpecLinearOp
    names: tuple[str, ...] = ()  # of the activations, for messages

    def slack(self, x_lo: Array, x_hi: Array, pre: list[Interval],
              perturbation: list[Array] | None) -> list[Array]:
        """For each activation: how far its input ``z_k`` may be from ``M_k h + m_k`` (the
        chain's :meth:`AffineChain.error` over its input blocks' ranges, plus the model's own
        rounding of that chain where given) for one sample."""
        out = []
        reach = {-1: np.maximum(np.abs(x_lo), np.abs(x_hi))}
        for k, (l, u) in enumerate(pre):
            chain = self.chains[k]
            value = chain.error(_stack([reach[b] for b in chain.blocks(k)]))
            if perturbation is not None:
                value = value + perturbation[k]
            out.append(value)
            lo, hi = _reach_box(self.activations[k], l, u)
            reach[k] = np.maximum(np.abs(lo), np.abs(hi))
        return out

    def lp(self, i: int, x_lo: Array, x_hi: Array, pre: list[Interval],
           slack: list[Array] | None = None) -> LinearProgram:
        """The relaxation LP of sample `i` over ``[x, z_1, h_1, ..., z_L, h_L]``.

        With `slack` (one nonnegative vector per activation, :meth:`slack`) each chain
        equality becomes two inequalities ``|z_k - M_k h - m_k| <= slack_k``, the relaxation
        rows are loosened by their own rounding, and the objective's distance from the exact
        one is recorded in ``objective_slack``: the LP is then a relaxation of the exact (or
        exactly perturbed) network. A DAG's chains take several blocks (``h`` stacks the
        blocks of :attr:`AffineChain.sources`).
        """
        lo_parts, hi_parts = [x_lo], [x_hi]
        sizes = [x_lo.shape[0]]
        for rule, (l, u) in zip(self.activations, pre, strict=True):
            out_lo, out_hi = rule.output_box(l, u)
            lo_parts += [l, out_lo]
            hi_parts += [u, out_hi]
            sizes += [l.shape[0], out_lo.shape[0]]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        rows = Rows(int(offsets[-1]), [], [], [], [])
        for k, (l, u) in enumerate(pre):
            z, h = offsets[2 * k + 1], offsets[2 * k + 2]
            self._chain_rows(rows, k, offsets, z, None if slack is None else slack[k])
            self.activations[k].relax(rows, l, u, z, h, slack is not None)
        last = len(self.chains) - 1
        blocks = self.chains[-1].blocks(last)
        objectives, constants, objective_slack = self._objective(
            i, rows.total, [(int(offsets[_column(b)]), int(offsets[_column(b) + 1]
                                                          - offsets[_column(b)]))
                            for b in blocks],
            _stack([lo_parts[2 * b + 2] for b in blocks]),
            _stack([hi_parts[2 * b + 2] for b in blocks]), slack is not None)
        a_eq, b_eq, a_ub, b_ub = rows.stacked()
        return LinearProgram(objectives, constants, a_eq, b_eq, a_ub, b_ub,
                             np.concatenate(lo_parts), np.concatenate(hi_parts), objective_slack,
                             offsets)

    def milp(self, lp: LinearProgram, pre: list[Interval]) -> MixedIntegerProgram:
        """`lp` (of :meth:`lp`) with binaries: the activations' exact encoding added."""
        import scipy.sparse as sp  # type: ignore[import-untyped, unused-ignore]

        assert lp.offsets is not None
        total = lp.lo.shape[0]
        first = lp.a_ub.shape[0]
        rows_c: list[int] = []
        cols_c: list[int] = []
        vals_c: list[float] = []
        rows_b: list[int] = []
        cols_b: list[int] = []
        vals_b: list[float] = []
        rhs: list[float] = []
        r = m = 0
        for k, (rule, (l, u)) in enumerate(zip(self.activations, pre, strict=True)):
            if rule.exact is None:
                name = self.names[k] if k < len(self.names) else f"activation {k}"
                raise _no_exact_encoding(name)
            part = rule.exact(l, u, lp.offsets[2 * k + 1], lp.offsets[2 * k + 2])
            rows_c += [r + q for q in part.cont_rows]
            cols_c += part.cont_cols
            vals_c += part.cont_vals
            rows_b += [first + r + q for q in part.bin_rows]
            cols_b += [m + q for q in part.bin_cols]
            vals_b += part.bin_vals
            rhs += part.rhs
            r += part.n_rows
            m += part.n_bin
        big_c = sp.csr_matrix((vals_c, (np.array(rows_c), cols_c)), shape=(r, total))
        a_ub = sp.vstack([lp.a_ub, big_c], format="csr")
        a_ub_bin = sp.csr_matrix((vals_b, (rows_b, cols_b)), shape=(first + r, m))
        b_ub = np.concatenate([lp.b_ub, np.array(rhs)])
        width = float(np.sum(lp.hi - lp.lo)) + m
        return MixedIntegerProgram(lp, a_ub, a_ub_bin, b_ub, m, width)

    def solver_error(self, pre: list[Interval], lp: LinearProgram, tau: float) -> Array:
        """How far, per objective row `(S,)`, the objective at a point that satisfies every
        row, bound and integrality within `tau` can be from the network's value at a true
        input: input bounds violated by `tau`, propagated through ``|M_k|`` (over the chain's
        input blocks) and the activations (:attr:`OpEncoding.solver_error`)."""
        assert lp.offsets is not None
        err = {-1: np.full(lp.offsets[1], tau)}  # input bounds violated by tau
        for k, (rule, (l, u)) in enumerate(zip(self.activations, pre, strict=True)):
            chain = self.chains[k]
            ez = np.abs(chain.matrix) @ _stack([err[b] for b in chain.blocks(k)]) + tau
            err[k] = rule.solver_error(ez, l, u, tau)
        blocks = self.chains[-1].blocks(len(self.chains) - 1)
        starts = [int(lp.offsets[_column(b)]) for b in blocks]
        # the objective's blocks' (folded) rows
        weights = (np.abs(lp.objectives[:, starts[0]:starts[0] + err[blocks[0]].shape[0]])
                   if len(blocks) == 1 else np.abs(lp.objectives[:, np.concatenate(
                       [np.arange(s, s + err[b].shape[0]) for s, b in zip(starts, blocks,
                                                                          strict=True)])]))
        return weights @ _stack([err[b] for b in blocks]) + tau  # type: ignore[no-any-return]

    def _chain_rows(self, rows: Rows, k: int, offsets: Array, z: int,
                    slack: Array | None) -> None:
        """``z_k - M_k h = m_k`` (``h`` the chain's input blocks), or within ``slack`` of it."""
        import scipy.sparse as sp  # type: ignore[import-untyped, unused-ignore]

        chain = self.chains[k]
        n = chain.matrix.shape[0]
        row = rows.place(z, sp.identity(n), n)
        first = 0
        for b in chain.blocks(k):
            width = int(offsets[_column(b) + 1] - offsets[_column(b)])
            row = row - rows.place(int(offsets[_column(b)]),
                                   chain.matrix[:, first:first + width], n)
            first += width
        if slack is None:
            rows.eq.append(row)
            rows.eq_rhs.append(chain.offset)
        else:
            rows.ub += [row, -row]
            rows.ub_rhs += [chain.offset + slack, -chain.offset + slack]

    def _objective(self, i: int, total: int, starts: list[tuple[int, int]], last_lo: Array,
                   last_hi: Array, rigorous: bool) -> tuple[Array, Array, Array | None]:
        """Objectives `(S, total)` over the last chain's input blocks (first columns and
        widths `starts`), constants `(S,)` and, if `rigorous`, the bound on their distance from the
        exact ones (over the blocks' stacked box ``[last_lo, last_hi]``)."""
        last, spec = self.chains[-1], self.spec
        weight = spec.weight[i].numpy()  # (S, I)
        objectives_h = weight @ last.matrix  # (S, n_last)
        constants = weight @ last.offset + spec.bias[i].numpy()
        objectives = np.zeros((weight.shape[0], total))
        first = 0
        for start, width in starts:
            objectives[:, start:start + width] = objectives_h[:, first:first + width]
            first += width
        if not rigorous:
            return objectives, constants, None
        # c = W M_last: its rounding, W's and M_last's own errors, over |h_last| <= reach
        w_abs = np.abs(weight)
        g = gamma(weight.shape[1] + 1)
        m_abs, m_err = np.abs(last.matrix), _zeros_if_none(last.matrix_err, last.matrix)
        w_err = (np.zeros_like(weight) if spec.weight_err is None
                 else spec.weight_err[i].numpy())
        c_err = w_abs @ m_err + w_err @ (m_abs + m_err) + g * (w_abs @ m_abs)
        o_abs, o_err = np.abs(last.offset), _zeros_if_none(last.offset_err, last.offset)
        b_err = 0.0 if spec.bias_err is None else spec.bias_err[i].numpy()
        const_err = (w_abs @ o_err + w_err @ (o_abs + o_err) + g * (w_abs @ o_abs + np.abs(
            spec.bias[i].numpy())) + b_err)
        reach = np.maximum(np.abs(last_lo), np.abs(last_hi))
        return objectives, constants, 2.0 * (c_err @ reach + const_err)


def _column(block: int) -> int:
    """Where block `block` (``-1``: ``x``, ``j``: ``h_j``) is in the offsets of
    ``[x, z_1, h_1, ..., z_L, h_L]``."""
    return 2 * block + 2


def _stack(parts: list[Array]) -> Array:
    """Blocks' vectors stacked (one block: itself, unchanged)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _reach_box(rule: ActivationEncoding, l: Array, u: Array) -> Interval:
    """The activation's output box spanned with 0: what error bounds over its output use."""
    lo, hi = rule.output_box(l, u)
    return np.minimum(lo, 0), hi


def encode(net: Network) -> NetworkEncoding:
    """The encoding of `net`, which ends in a folded specification (``fold_spec``), in float64.

    A DAG (``net.inputs``) is encoded by :func:`_encode_dag`.

    Raises:
        UnsupportedLayerError: for an op without a row in :data:`ENCODINGS`.
    """
    if not net.is_chain:
        return _encode_dag(net)
    chains: list[AffineChain] = []
    activations: list[ActivationEncoding] = []
    names: list[str] = []
    ops: list[Op] = []
    shape = net.input_shape
    spec: SpecLinearOp | None = None
    for index, op in enumerate(net.layers):
        rule = _rule(op, index)
        if rule.kind == "affine":
            ops.append(op)
        elif rule.kind == "activation":
            chains.append(affine_chain(ops, shape))
            activations.append(_activation(op, index))
            names.append(_layer_name(net, index))
            ops, shape = [], op.out_shape
        else:
            chains.append(affine_chain(ops, shape))
            spec = op  # type: ignore[assignment]
    if spec is None:
        raise ValueError("encode: the network must end in a folded specification (fold_spec)")
    return NetworkEncoding(chains, activations, spec, tuple(names))


def _encode_dag(net: Network) -> NetworkEncoding:
    """:func:`encode` for a DAG: nodes in topological order, each an affine function of the
    variable blocks below it (``x`` and the activations' outputs, :class:`_Node`); an affine
    op is applied to every block's basis and to the offset with the chain's error bounds, an
    Add sums two nodes (its rounding in :func:`_add_nodes`), a Concat stacks them (exact). The
    input node of every activation and of the specification becomes a chain over the blocks
    it depends on (:attr:`AffineChain.sources`)."""
    nodes: dict[int, _Node] = {-1: _Node.block(-1, net.input_shape)}
    sizes = {-1: numel(net.input_shape)}
    chains: list[AffineChain] = []
    activations: list[ActivationEncoding] = []
    names: list[str] = []
    spec: SpecLinearOp | None = None
    uses = {j: sum(srcs.count(j) for srcs in net.inputs) for j in range(-1, len(net.layers))}
    for index, op in enumerate(net.layers):
        rule = _rule(op, index)
        srcs = net.sources(index)
        if rule.kind == "affine":
            nodes[index] = nodes[srcs[0]].affine(op)
        elif rule.kind == "activation":
            chains.append(nodes[srcs[0]].chain())
            activations.append(_activation(op, index))
            names.append(_layer_name(net, index))
            k = len(activations) - 1
            sizes[k] = numel(op.out_shape)
            nodes[index] = _Node.block(k, op.out_shape)
        elif rule.kind == "merge":
            parts = [nodes[j] for j in srcs]
            nodes[index] = (_add_nodes(parts[0], parts[1]) if isinstance(op, AddOp)
                            else _concat_nodes(op, parts, sizes))  # type: ignore[arg-type]
        else:
            if index != len(net.layers) - 1:
                raise ValueError("encode: the folded specification must be the last op")
            chains.append(nodes[srcs[0]].chain())
            spec = op  # type: ignore[assignment]
        for j in srcs:  # a node no op takes any more is not needed
            uses[j] -= 1
            if uses[j] == 0:
                nodes.pop(j, None)
    if spec is None:
        raise ValueError("encode: the network must end in a folded specification (fold_spec)")
    return NetworkEncoding(chains, activations, spec, tuple(names))


def model_perturbations(net: Network, x_lo: Tensor, x_hi: Tensor,
                        pre: list[Interval]) -> list[Array] | None:
    """The model's own rounding of each chain into an activation, `(N, n)` float64 per layer
    (None for the network in exact arithmetic, ``net.runs_in`` unset); see
    :mod:`certify.bounds.forward_error`."""
    if net.runs_in is None:
        return None
    if not net.is_chain:
        return _graph_perturbations(net, x_lo, x_hi, pre, net.runs_in)
    chains = model_chains(net)
    rules = [_activation(net.layers[p], p) for p in net.relu_positions]
    out = []
    in_lo, in_hi = x_lo.detach().to("cpu", torch.float64), x_hi.detach().to("cpu", torch.float64)
    for k, (lo, hi) in enumerate(pre):
        err = chain_error(chains[k], in_lo, in_hi, net.runs_in)
        out.append(err.flatten(1).numpy())
        box_lo, box_hi = _reach_box(rules[k], lo, hi)
        in_lo, in_hi = torch.from_numpy(box_lo), torch.from_numpy(box_hi)
        shape = chains[k + 1][0].out_shape  # the next chain starts with activation k
        in_lo, in_hi = in_lo.reshape(-1, *shape), in_hi.reshape(-1, *shape)
    return out


def _graph_perturbations(net: Network, x_lo: Tensor, x_hi: Tensor, pre: list[Interval],
                         dtype: torch.dtype) -> list[Array]:
    """:func:`model_perturbations` for a DAG: the bound of
    :func:`~certify.bounds.forward_error.graph_error` on every activation's input node (the
    model's rounding of every op below it back to the activations' outputs, the float32
    Add's own rounding included), given the activations' output boxes over `pre`."""
    positions = net.relu_positions
    boxes: dict[int, tuple[Tensor, Tensor]] = {}
    out = []
    for k, (lo, hi) in enumerate(pre):
        err = graph_error(net, k, boxes, x_lo.detach().cpu(), x_hi.detach().cpu(), dtype)
        out.append(err.flatten(1).numpy())
        op = net.layers[positions[k]]
        box_lo, box_hi = _activation(op, positions[k]).output_box(lo, hi)
        shape = op.out_shape
        boxes[k] = (torch.from_numpy(np.asarray(box_lo)).reshape(-1, *shape),
                    torch.from_numpy(np.asarray(box_hi)).reshape(-1, *shape))
    return out


def sample_programs(encoding: NetworkEncoding, x_lo: Array, x_hi: Array, pre: list[Interval],
                    perturbation: list[Array] | None
                    ) -> Iterator[tuple[list[Interval], LinearProgram]]:
    """Per sample ``i``: its intermediate bounds and its rigorous LP (with :meth:`slack
    <NetworkEncoding.slack>`), a relaxation of the exact network (and of the model's own
    forward pass when `perturbation` is given).

    Args:
        x_lo, x_hi: Input boxes `(N, D)` float64.
        pre: Widened intermediate bounds (:func:`widen`), `(N, n_k)` each.
        perturbation: :func:`model_perturbations`, or None.
    """
    for i in range(x_lo.shape[0]):
        pre_i = [(lo[i], hi[i]) for lo, hi in pre]
        slack = encoding.slack(x_lo[i], x_hi[i], pre_i,
                               None if perturbation is None else [p[i] for p in perturbation])
        yield pre_i, encoding.lp(i, x_lo[i], x_hi[i], pre_i, slack)
