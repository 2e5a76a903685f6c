"""The exact LP of the triangle relaxation (cvxpy): the tightness reference for small networks.

Given pre-activation bounds ``l <= z <= u`` of every ReLU (by default CROWN's), the LP

    minimize  c · f    over  x in [x_lo, x_hi],  z_k = M_k h_(k-1) + m_k,  l_k <= z_k <= u_k,
              h_k = z_k (active), h_k = 0 (inactive), and for unstable neurons
              h >= 0,  h >= z,  h <= u (z - l) / (u - l)

is the tightest bound any method with these intermediate bounds and single-neuron ReLU
relaxations can give (Salman et al., "A Convex Relaxation Barrier to Tight Robustness
Verification of Neural Networks", NeurIPS 2019): it is never looser than ``crown``,
``wong-kolter`` or ``alpha-crown`` with the same intermediate bounds. One LP is solved per
sample and specification row (and per negated row for the upper bound).

**Soundness despite solver tolerance.** The solver's primal value is never reported. The bound
is the Lagrangian dual function evaluated at the solver's dual values ``(y, lam)``:

    g(y, lam) = -y · b_eq - lam · b_ub + sum_i min(r_i lo_i, r_i hi_i),
    r = c + A_eq^T y + A_ub^T lam,   lam := max(lam, 0),

where ``[lo, hi]`` are the variables' box bounds (all finite). By weak duality ``g`` is a lower
bound of the LP -- hence of the network -- for *any* ``y`` and any ``lam >= 0``, so an inexact or
failed solve can only make it looser, never unsound (a failed solve falls back to zero duals,
i.e. the interval bound of the last layer, with a warning). ``g`` is evaluated in float64 and a
rigorous bound on its floating-point rounding error (``gamma_k`` error bounds of dot products)
is subtracted. The network's float32 weights are exact in float64. The given intermediate
bounds, computed in float32 or float64, are widened by ``2^-16`` or ``2^-40`` times
``1 + |bound|`` so that their own rounding cannot make the exact LP infeasible (a looser, still
sound relaxation).

This is the only module that imports cvxpy (lazily: importing :mod:`certify.bounds` stays fast).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.base import Bounds, MethodBase, get_method, register_method
from certify.bounds.forward_error import chain_error, model_chains
from certify.bounds.layers import RULES, Op, ReluOp, SpecLinearOp, abs_op, err_op, numel
from certify.bounds.network import Network, fold_spec, identity_spec
from certify.errors import SpecError

if TYPE_CHECKING:
    import scipy.sparse

__all__ = ["LP"]

UNIT_ROUNDOFF = 2.0**-53
# Relative widening of intermediate bounds computed in each dtype (see `_widen`).
WIDEN = {torch.float32: 2.0**-16, torch.float64: 2.0**-40}
INTERMEDIATE_METHODS = ("ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown")


def _gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``: relative error bound of a k-term float64 sum."""
    return k * UNIT_ROUNDOFF / (1 - k * UNIT_ROUNDOFF)


@register_method("lp")
@dataclass(frozen=True)
class LP(MethodBase):
    """Exact LP over the triangle relaxation, bounded through its dual (see module docstring).

    Options:
        intermediate_method: Whose pre-activation bounds to use when none are given:
            ``crown`` (default), ``wong-kolter``, ``ibp``, ``crown-ibp`` or ``alpha-crown``.
        solver: A cvxpy LP solver name (default ``HIGHS``).
    """

    intermediate_method: str = "crown"
    solver: str = "HIGHS"
    name: ClassVar[str] = "lp"
    display_name: ClassVar[str] = "LP"
    uses_solver: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.intermediate_method not in INTERMEDIATE_METHODS:
            raise SpecError(f"lp: intermediate_method must be one of "
                            f"{', '.join(INTERMEDIATE_METHODS)}, got {self.intermediate_method!r}.")

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor) -> tuple[Bounds, ...]:
        """The pre-activation bounds of `intermediate_method`."""
        with torch.no_grad():
            return get_method(self.intermediate_method).intermediate(net, x_lo, x_hi)

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]` (inputs as validated by
        :func:`compute_bounds`); `(N, S)`, or the flattened outputs `(N, K)` without a spec."""
        import cvxpy as cp

        if self.solver not in cp.installed_solvers():
            raise SpecError(f"lp: solver {self.solver!r} is not installed; installed: "
                            f"{', '.join(cp.installed_solvers())}.")
        spec = identity_spec(net, x_lo) if spec is None else spec
        if intermediate is None:
            intermediate = self.intermediate(net, x_lo, x_hi)
        with torch.no_grad():
            cpu = torch.device("cpu")
            folded = fold_spec(net.detach(), spec.detach()).to(dtype=torch.float64, device=cpu)
            lo64 = x_lo.detach().to(cpu, torch.float64).flatten(1).numpy()
            hi64 = x_hi.detach().to(cpu, torch.float64).flatten(1).numpy()
            pre = [_widen(b, x_lo.dtype) for b in intermediate]
            blocks = _affine_blocks(folded)
            perturbation = _perturbations(net, x_lo, x_hi, pre)
            lowers, uppers = [], []
            for i in range(x_lo.shape[0]):
                pre_i = [(lo[i], hi[i]) for lo, hi in pre]
                slack = layer_slack(blocks, lo64[i], hi64[i], pre_i,
                                    None if perturbation is None
                                    else [p[i] for p in perturbation])
                problem = _build(blocks, folded.layers[-1], i, lo64[i], hi64[i], pre_i, slack)
                lower, upper = _solve_rows(problem, self.solver)
                lowers.append(lower)
                uppers.append(upper)
        lower = _cast_outward(np.stack(lowers), x_lo, down=True)
        upper = _cast_outward(np.stack(uppers), x_lo, down=False)
        return Bounds(lower, upper)


def _perturbations(net: Network, x_lo: Tensor, x_hi: Tensor,
                   pre: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray] | None:
    """The model's own rounding of each chain into a ReLU, `(N, n)` float64 per layer (None
    for the network in exact arithmetic)."""
    if net.runs_in is None:
        return None
    chains = model_chains(net)
    out = []
    in_lo, in_hi = x_lo.detach().to("cpu", torch.float64), x_hi.detach().to("cpu", torch.float64)
    for k, (_, hi) in enumerate(pre):
        err = chain_error(chains[k], in_lo, in_hi, net.runs_in)
        out.append(err.flatten(1).numpy())
        upper = torch.from_numpy(np.maximum(hi, 0))
        in_lo, in_hi = torch.zeros_like(upper), upper
        shape = chains[k + 1][0].in_shape if chains[k + 1] else None
        if shape is not None:
            in_lo, in_hi = in_lo.reshape(-1, *shape), in_hi.reshape(-1, *shape)
    return out


def _widen(bounds: Bounds, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Intermediate bounds as float64 arrays `(N, n)`, widened by `WIDEN[dtype] * (1 + |v|)`.

    They were computed in `dtype` and can miss the exact pre-activation by a rounding error;
    the exact LP would then be infeasible (a zero-width box makes that likely). Widening only
    enlarges the relaxation, so the bound stays sound.
    """
    rel = WIDEN.get(dtype, WIDEN[torch.float32])
    lo = bounds.lower.detach().to("cpu", torch.float64).flatten(1).numpy()
    hi = bounds.upper.detach().to("cpu", torch.float64).flatten(1).numpy()
    return lo - rel * (1 + np.abs(lo)), hi + rel * (1 + np.abs(hi))


def _cast_outward(values: np.ndarray, like: Tensor, *, down: bool) -> Tensor:
    """float64 bounds in `like`'s dtype and device, rounded outward (never inward)."""
    exact = torch.as_tensor(values, dtype=torch.float64)
    cast = exact.to(like.dtype)
    if like.dtype != torch.float64:
        inward = cast.double() > exact if down else cast.double() < exact
        step = torch.full_like(cast, -np.inf if down else np.inf)
        cast = torch.where(inward, torch.nextafter(cast, step), cast)
    return cast.to(like.device)


@dataclass(frozen=True)
class _Block:
    """An affine chain between ReLUs as ``out = M @ in + m`` (dense float64), with bounds on
    the distance of `matrix` and `offset` from the exact chain's (their rounding and the ops'
    error fields)."""

    matrix: np.ndarray  # (out, in)
    offset: np.ndarray  # (out,)
    matrix_err: np.ndarray | None = None
    offset_err: np.ndarray | None = None


def _chain(ops: list[Op], in_shape: tuple[int, ...]) -> _Block:
    """Dense matrix and offset of a chain of affine ops (applied to the identity basis), with
    rigorous error bounds (``E' = |L| E + gamma_k |L| |M| + L_err (|M| + E)``, see
    :mod:`certify.bounds.rounding`)."""
    d = numel(in_shape)
    f64 = torch.float64
    basis = torch.eye(d, dtype=f64).reshape(d, *in_shape)
    zero = torch.zeros(1, *in_shape, dtype=f64)
    basis_err, zero_err = torch.zeros_like(basis), torch.zeros_like(zero)
    for op in ops:
        rules = RULES[type(op)]
        k = rules.terms(op)[0]
        absolute, exact = abs_op(op), err_op(op)
        g = rounding.gamma(k, f64)
        lin_abs = rules.linear(absolute, basis_err + g * basis.abs())  # type: ignore[misc]
        # |L| E + gamma (|L| |m| + |b|)
        off_abs = (rules.linear(absolute, zero_err)  # type: ignore[misc]
                   + g * rules.forward(absolute, zero.abs()))
        if exact is not None:
            lin_abs = lin_abs + rules.linear(exact, basis.abs() + basis_err)  # type: ignore[misc]
            off_abs = off_abs + rules.forward(exact, zero.abs() + zero_err)
        basis = rules.linear(op, basis)  # type: ignore[misc]
        zero = rules.forward(op, zero)
        basis_err = lin_abs + k * rounding.tiny(f64)
        zero_err = off_abs + k * rounding.tiny(f64)
    safety = rounding.SAFETY
    return _Block(basis.reshape(d, -1).T.numpy(), zero.reshape(-1).numpy(),
                  safety * basis_err.reshape(d, -1).T.numpy(),
                  safety * zero_err.reshape(-1).numpy())


def _affine_blocks(net: Network) -> list[_Block]:
    """The chains before each ReLU and, last, the chain before the folded specification."""
    blocks, ops, shape = [], [], net.input_shape
    for op in net.layers:
        if isinstance(op, ReluOp):
            blocks.append(_chain(ops, shape))
            ops, shape = [], op.out_shape
        elif isinstance(op, SpecLinearOp):
            blocks.append(_chain(ops, shape))
        else:
            ops.append(op)
    return blocks


@dataclass(frozen=True)
class _Problem:
    """``min c·v + const`` s.t. ``A_eq v = b_eq``, ``A_ub v <= b_ub``, ``lo <= v <= hi``."""

    objectives: np.ndarray  # (S, n): one objective per specification row
    constants: np.ndarray  # (S,)
    a_eq: scipy.sparse.csr_matrix
    b_eq: np.ndarray
    a_ub: scipy.sparse.csr_matrix
    b_ub: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    objective_slack: np.ndarray | None = None  # (S,): bound on |exact - stored| objective


def _build(blocks: list[_Block], spec_op: SpecLinearOp, i: int, x_lo: np.ndarray,
           x_hi: np.ndarray, pre: list[tuple[np.ndarray, np.ndarray]],
           slack: list[np.ndarray] | None = None) -> _Problem:
    """The triangle-relaxation LP of sample `i`; variables ``[x, z_1, h_1, ..., z_L, h_L]``.

    With `slack` (one nonnegative vector per ReLU layer: how far ``z_k`` may be from
    ``M_k h_(k-1) + m_k`` in the exact, or exactly perturbed, network) each equality becomes
    two inequalities ``|z_k - M_k h - m_k| <= slack_k``; the triangle's upper lines are
    loosened by their own rounding, and the objective's distance from the exact one is
    recorded in ``objective_slack``: the LP is then a relaxation of the exact network.
    """
    import scipy.sparse as sp

    eq_rows: list[Any] = []
    eq_rhs: list[np.ndarray] = []
    ub_rows: list[Any] = []
    ub_rhs: list[np.ndarray] = []
    lo_parts, hi_parts = [x_lo], [x_hi]
    sizes = [x_lo.shape[0]]
    for (l, u) in pre:
        n = l.shape[0]
        lo_parts += [l, np.maximum(l, 0)]
        hi_parts += [u, np.maximum(u, 0)]
        sizes += [n, n]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])

    def place(cols_start: int, block: Any, n_rows: int) -> Any:
        """`block` (n_rows x k) placed at columns [cols_start, cols_start + k)."""
        k = block.shape[1]
        return sp.hstack([sp.csr_matrix((n_rows, cols_start)), sp.csr_matrix(block),
                          sp.csr_matrix((n_rows, total - cols_start - k))], format="csr")

    for k, (l, u) in enumerate(pre):
        n = l.shape[0]
        h_prev, z, h = offsets[2 * k], offsets[2 * k + 1], offsets[2 * k + 2]
        block = blocks[k]
        # z_k - M_k h_(k-1) = m_k
        row = place(z, sp.identity(n), n) - place(h_prev, block.matrix, n)
        if slack is None:
            eq_rows.append(row)
            eq_rhs.append(block.offset)
        else:
            ub_rows += [row, -row]
            ub_rhs += [block.offset + slack[k], -block.offset + slack[k]]
        active = l >= 0
        unstable = (l < 0) & (u > 0)
        if active.any():  # h = z
            sel = sp.identity(n, format="csr")[active]
            eq_rows.append(place(h, sel, sel.shape[0]) - place(z, sel, sel.shape[0]))
            eq_rhs.append(np.zeros(sel.shape[0]))
        if unstable.any():
            sel = sp.identity(n, format="csr")[unstable]
            m = sel.shape[0]
            slope = u[unstable] / (u[unstable] - l[unstable])
            ub_rows.append(place(z, sel, m) - place(h, sel, m))  # z - h <= 0
            ub_rhs.append(np.zeros(m))
            ub_rows.append(place(h, sel, m) - place(z, sp.diags(slope) @ sel, m))
            rhs = -slope * l[unstable]  # h - s z <= -s l
            if slack is not None:  # the rounded chord and intercept: valid up to 4u (|u| + |s l|)
                rhs = rhs + 4 * UNIT_ROUNDOFF * (np.abs(u[unstable]) + np.abs(rhs)) + 1e-300
            ub_rhs.append(rhs)
    last = blocks[-1]
    weight = spec_op.weight[i].numpy()  # (S, I)
    objectives_h = weight @ last.matrix  # (S, n_last)
    constants = weight @ last.offset + spec_op.bias[i].numpy()
    objectives = np.zeros((weight.shape[0], total))
    start = offsets[-2] if pre else 0
    objectives[:, start:start + objectives_h.shape[1]] = objectives_h

    def stack(rows: list[Any]) -> Any:
        return sp.vstack(rows, format="csr") if rows else sp.csr_matrix((0, total))

    objective_slack = None
    if slack is not None:
        # c = W M_last: its rounding, W's and M_last's own errors, over |h_last| <= reach
        w_abs = np.abs(weight)
        g = _gamma(weight.shape[1] + 1)
        m_abs, m_err = np.abs(last.matrix), _zeros_if_none(last.matrix_err, last.matrix)
        w_err = (np.zeros_like(weight) if spec_op.weight_err is None
                 else spec_op.weight_err[i].numpy())
        c_err = w_abs @ m_err + w_err @ (m_abs + m_err) + g * (w_abs @ m_abs)
        o_abs, o_err = np.abs(last.offset), _zeros_if_none(last.offset_err, last.offset)
        b_err = 0.0 if spec_op.bias_err is None else spec_op.bias_err[i].numpy()
        const_err = (w_abs @ o_err + w_err @ (o_abs + o_err) + g * (w_abs @ o_abs + np.abs(
            spec_op.bias[i].numpy())) + b_err)
        reach = np.maximum(np.abs(lo_parts[-1]), np.abs(hi_parts[-1]))
        objective_slack = 2.0 * (c_err @ reach + const_err)
    return _Problem(objectives, constants, stack(eq_rows),
                    np.concatenate(eq_rhs) if eq_rhs else np.zeros(0), stack(ub_rows),
                    np.concatenate(ub_rhs) if ub_rhs else np.zeros(0),
                    np.concatenate(lo_parts), np.concatenate(hi_parts), objective_slack)


def _zeros_if_none(err: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    return np.zeros_like(like) if err is None else err


def layer_slack(blocks: list[_Block], x_lo: np.ndarray, x_hi: np.ndarray,
                pre: list[tuple[np.ndarray, np.ndarray]],
                perturbation: list[np.ndarray] | None) -> list[np.ndarray]:
    """For each ReLU layer: ``|M - M*| |h| + |m - m*|`` over its input's range, plus the
    model's own rounding of that chain where given (see :func:`_build`)."""
    out = []
    reach = np.maximum(np.abs(x_lo), np.abs(x_hi))
    for k, (_, u) in enumerate(pre):
        block = blocks[k]
        value = (_zeros_if_none(block.matrix_err, block.matrix) @ reach
                 + _zeros_if_none(block.offset_err, block.offset))
        if perturbation is not None:
            value = value + perturbation[k]
        out.append(value)
        reach = np.maximum(u, 0)
    return out


def _solve_rows(problem: _Problem, solver: str) -> tuple[np.ndarray, np.ndarray]:
    """Sound lower and upper bounds of every objective row, from the duals of the LPs."""
    import cvxpy as cp

    n = problem.lo.shape[0]
    v = cp.Variable(n)
    c = cp.Parameter(n)
    constraints = []
    if problem.a_eq.shape[0]:
        constraints.append(problem.a_eq @ v == problem.b_eq)
    if problem.a_ub.shape[0]:
        constraints.append(problem.a_ub @ v <= problem.b_ub)
    constraints += [v >= problem.lo, v <= problem.hi]
    lp = cp.Problem(cp.Minimize(c @ v), constraints)
    eq_con = constraints[0] if problem.a_eq.shape[0] else None
    ub_con = constraints[1 if eq_con is not None else 0] if problem.a_ub.shape[0] else None
    bounds = []
    for sign in (1.0, -1.0):
        for row, const in zip(problem.objectives, problem.constants, strict=True):
            c.value = sign * row
            try:
                lp.solve(solver=solver)
                ok = lp.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
            except cp.SolverError:
                ok = False
            y = eq_con.dual_value if ok and eq_con is not None else None
            lam = ub_con.dual_value if ok and ub_con is not None else None
            if not ok:
                warnings.warn(f"LP solver {solver} failed (status {lp.status}); falling back "
                              "to zero dual values (a sound but looser bound).", RuntimeWarning,
                              stacklevel=4)
            bounds.append(_dual_bound(problem, sign * row, sign * const, y, lam))
    if problem.objective_slack is not None:
        slack = np.concatenate([problem.objective_slack, problem.objective_slack])
        bounds = list(np.array(bounds) - slack)
    s = problem.objectives.shape[0]
    values = np.array(bounds)
    return values[:s], -values[s:]


def _dual_bound(problem: _Problem, c: np.ndarray, const: float, y: np.ndarray | None,
                lam: np.ndarray | None) -> float:
    """``const + g(y, lam)`` minus a bound on its float64 rounding error (module docstring).

    Both signs of ``y`` are tried (conventions differ between solvers); both are valid.
    """
    a_eq, a_ub = problem.a_eq, problem.a_ub
    y = np.zeros(a_eq.shape[0]) if y is None else np.asarray(y, dtype=np.float64).reshape(-1)
    lam = np.zeros(a_ub.shape[0]) if lam is None else np.asarray(lam, dtype=np.float64)
    lam = np.maximum(lam.reshape(-1), 0.0)
    lo, hi = problem.lo, problem.hi
    magnitude = np.maximum(np.abs(lo), np.abs(hi))
    # Terms summed into each r_i, and into the final sum.
    per_column = (np.diff(a_eq.tocsc().indptr) + np.diff(a_ub.tocsc().indptr)).max(initial=0)
    r_gamma = _gamma(int(per_column) + 2)
    n_terms = lo.shape[0] + a_eq.shape[0] + a_ub.shape[0] + 1
    abs_eq, abs_ub = abs(a_eq), abs(a_ub)
    best = -np.inf
    for yy in (y, -y):
        r = c + a_eq.T @ yy + a_ub.T @ lam
        terms = np.minimum(r * lo, r * hi)
        value = const - yy @ problem.b_eq - lam @ problem.b_ub + terms.sum()
        r_abs = np.abs(c) + abs_eq.T @ np.abs(yy) + abs_ub.T @ lam
        error = (r_gamma * (r_abs @ magnitude)
                 + _gamma(n_terms) * (abs(const) + np.abs(yy) @ np.abs(problem.b_eq)
                                      + lam @ np.abs(problem.b_ub) + np.abs(terms).sum()))
        if np.isfinite(value):
            best = max(best, value - 2.0 * error)
    return float(best)
