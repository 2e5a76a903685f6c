"""Exact verification by mixed-integer linear programming: big-M ReLUs, solved by HiGHS (cvxpy).

Given pre-activation bounds ``l <= z <= u`` of every ReLU, the network's outputs over a box are
*exactly* the feasible set of

    x in [x_lo, x_hi],  z_k = M_k h_(k-1) + m_k,  l_k <= z_k <= u_k,
    h = z (stable active, l >= 0),  h = 0 (stable inactive, u <= 0), and for unstable neurons
    h >= 0,  h >= z,  h <= u a,  h <= z - l (1 - a),  a in {0, 1}

(Tjeng, Xiao & Tedrake, "Evaluating Robustness of Neural Networks with Mixed Integer
Programming", ICLR 2019). Minimizing a specification row over it gives the exact lower bound;
the triangle inequalities of :mod:`certify.bounds.lp` (valid for every integer solution) are
kept as cuts. The tighter ``l, u``, the fewer unstable neurons (binaries) and the tighter the
big-M relaxation; hence the option ``intermediate_method`` (default ``"lp"``): CROWN's bounds,
then every ReLU layer after the first re-bounded neuron by neuron by the exact triangle LP over
the already-refined layers before it (``"alpha-crown"``: by alpha-CROWN instead; both
intersected with CROWN's). The first layer's bounds are exact already (an affine map of a box).

**Soundness despite solver tolerance.** HiGHS solves the MILP by branch and bound with LP
relaxations solved to tolerances; it reports a primal value (a tolerance-feasible point, which
may be slightly infeasible and so *below* the true minimum) and a dual bound (the smallest LP
bound of the open nodes). The primal value is never reported as a bound. The lower bound is

    lower = dual bound + constant - tol,
    tol   = SAFETY * (TAU * sum_j (hi_j - lo_j) + P),

where ``TAU`` is the primal, dual and integrality tolerance set for HiGHS (``1e-9``), the sum
runs over the variables' box widths (a reduced cost wrong by ``TAU`` moves an LP bound by at most
``TAU`` times its variable's width) and ``P`` bounds how far a tolerance-feasible point's
objective can be from the network's value at a true input: a binary off by ``TAU`` lets an
unstable neuron's output move by ``TAU * max(|l|, |u|)`` (the big-M scale), every row and bound
may be violated by ``TAU``, and these errors are propagated to the objective through the
absolute weights ``|M_k|`` (ReLU is 1-Lipschitz). ``SAFETY = 10``. The tolerance is only ever
subtracted (never in favour of verification) and is reported per row as ``tolerance``.
Samples whose ReLUs are all stable have no binaries; their rows are bounded by the LP's
rigorous dual bound instead (:mod:`certify.bounds.lp`), with no tolerance.

**Unknown rows.** A MILP that hits ``time_limit`` (seconds per problem) or fails is ``unknown``:
its lower bound is the best *sound* value available, the larger of the dual bound reached (minus
`tol`) and CROWN's bound with the same intermediate bounds -- never a claim the MILP did not
prove. :class:`MilpBounds` carries each row's status (``"optimal"`` or ``"unknown: <reason>"``)
so callers can tell exact rows from fallback ones. Upper bounds are CROWN's with the same
intermediate bounds (sound, not exact) unless ``exact_upper=True``.

Everything is computed in float64 (the float32 weights are exact in float64); the intermediate
bounds are widened as in :mod:`certify.bounds.lp` so that their rounding cannot cut off a
reachable point, and the result is rounded outward to the input's dtype.

:func:`solve_min_eps` is the other use of the same model: the smallest L-inf radius at which a
target class reaches the true one (``eps`` as a variable), for :mod:`certify.exact`.

With :mod:`certify.bounds.lp`, the only module that imports cvxpy (lazily).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from certify.bounds.base import Bounds, MethodBase, get_method, register_method
from certify.bounds.lp import (
    LP,
    _affine_blocks,
    _Block,
    _build,
    _cast_outward,
    _perturbations,
    _Problem,
    _widen,
    layer_slack,
)
from certify.bounds.network import Network, fold_spec
from certify.errors import SpecError

if TYPE_CHECKING:
    import scipy.sparse

__all__ = ["MILP", "TAU", "SAFETY", "MilpBounds", "MinEpsOutcome", "refine_intermediate",
           "solve_min_eps"]

#: Primal feasibility, dual feasibility and integrality tolerance given to HiGHS.
TAU = 1e-9
#: Factor on the estimated solver error before it is subtracted from a dual bound.
SAFETY = 10.0
HIGHS_OPTIONS: dict[str, Any] = {
    "primal_feasibility_tolerance": TAU,
    "dual_feasibility_tolerance": TAU,
    "mip_feasibility_tolerance": TAU,
    "mip_rel_gap": 1e-9,
    "mip_abs_gap": 1e-10,
    "random_seed": 0,
}
INTERMEDIATE_METHODS = ("ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown", "lp")
OPTIMAL = "optimal"
ABOVE = "above threshold"
BELOW = "at or below threshold"
SKIPPED = "skipped: another row is at or below the threshold"
BUDGET_SPENT = "unknown: time budget spent"
#: Neurons per LP call when refining intermediate bounds against a deadline.
REFINE_ROWS = 16


@dataclass(frozen=True, repr=False)
class MilpBounds(Bounds):
    """Bounds from the ``milp`` method, with the status of every row.

    Attributes:
        lower, upper: `(N, S)` as for :class:`Bounds`.
        status: `N` tuples of `S` strings: ``"optimal"`` where `lower` is the MILP's proven
            minimum minus `tolerance`; ``"unknown: <reason>"`` (time limit, solver failure)
            where `lower` is a sound fallback; with the ``threshold`` option also ``"above
            threshold"``, ``"at or below threshold"`` and ``"skipped: ..."`` (see
            :class:`MILP`).
        upper_status: The same for `upper`; ``"relaxation"`` where it is CROWN's bound (the
            default, ``exact_upper=False``).
        tolerance: `(N, S)` float64, what was subtracted from each dual bound (0 for rows bounded
            by the rigorous LP dual, i.e. without unstable ReLUs).
    """

    status: tuple[tuple[str, ...], ...] = ()
    upper_status: tuple[tuple[str, ...], ...] = ()
    tolerance: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))

    @property
    def optimal(self) -> Tensor:
        """`(N, S)` bool: where `lower` is the proven optimum (up to `tolerance`)."""
        return torch.tensor([[s == OPTIMAL for s in row] for row in self.status],
                            dtype=torch.bool).reshape(self.lower.shape)


@register_method("milp")
@dataclass(frozen=True)
class MILP(MethodBase):
    """Exact lower bounds by big-M MILP (HiGHS); see the module docstring.

    Options:
        intermediate_method: Pre-activation bounds for the big-M constants when none are given:
            ``"lp"`` (default: CROWN refined layer by layer by the triangle LP, the tightest),
            ``"alpha-crown"`` (CROWN refined by alpha-CROWN, cheaper), or the plain bounds of
            ``"crown"``, ``"wong-kolter"``, ``"crown-ibp"`` or ``"ibp"``.
        time_limit: Seconds per MILP (> 0); a problem that hits it is ``unknown``.
        budget: None (default), or seconds for the whole call, the refinement of the
            intermediate bounds included: once spent, the refinement keeps the bounds it has
            reached, each MILP gets at most what is left, and the rows not reached are
            ``"unknown: time budget spent"`` with their sound fallback bound.
        exact_upper: Also solve the maximization of every row (upper bounds); default False
            (CROWN's upper bound with the same intermediate bounds, sound but not exact).
        threshold: None (default: every row's exact minimum), or decide the rows against this
            value only, which is all a verification needs (``0`` for margins; the radius
            search passes it): a row's MILP stops at its first point at or below the threshold
            (status ``"at or below threshold"``, the lower bound is the dual bound reached, and
            the sample's remaining rows are skipped with their fallback bounds) or when its
            minimum is proven above ``threshold + tol`` (status ``"above threshold"``, lower
            bound ``threshold + tol``). Rows solved before either happens are ``"optimal"``.
    """

    intermediate_method: str = "lp"
    time_limit: float = 60.0
    exact_upper: bool = False
    threshold: float | None = None
    budget: float | None = None
    name: ClassVar[str] = "milp"
    display_name: ClassVar[str] = "MILP"
    uses_solver: ClassVar[bool] = True
    is_complete: ClassVar[bool] = True
    decides_threshold: ClassVar[bool] = True
    accepts_time_budget: ClassVar[bool] = True
    serves_intermediate: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.intermediate_method not in INTERMEDIATE_METHODS:
            raise SpecError(f"milp: intermediate_method must be one of "
                            f"{', '.join(INTERMEDIATE_METHODS)}, got {self.intermediate_method!r}.")
        if not (isinstance(self.time_limit, (int, float)) and math.isfinite(self.time_limit)
                and self.time_limit > 0):
            raise SpecError(f"milp: time_limit must be a number of seconds > 0, got "
                            f"{self.time_limit!r}.")
        if self.budget is not None and not (isinstance(self.budget, (int, float))
                                            and math.isfinite(self.budget) and self.budget > 0):
            raise SpecError(f"milp: budget must be None or a number of seconds > 0, got "
                            f"{self.budget!r}.")
        if not isinstance(self.exact_upper, bool):
            raise SpecError(f"milp: exact_upper must be True or False, got {self.exact_upper!r}.")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold)):
            raise SpecError(f"milp: threshold must be None or a finite number (e.g. 0 for "
                            f"margins), got {self.threshold!r}.")

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor, *,
                     deadline: float | None = None) -> tuple[Bounds, ...]:
        """Pre-activation bounds of `intermediate_method` (refined for ``lp``/``alpha-crown``,
        until the ``time.perf_counter()`` `deadline` if one is given)."""
        method = self.intermediate_method
        with torch.no_grad():
            base = "crown" if method in ("lp", "alpha-crown") else method
            bounds = get_method(base).intermediate(net, x_lo, x_hi)
            if method in ("lp", "alpha-crown"):
                bounds = refine_intermediate(net, x_lo, x_hi, bounds, method=method,
                                             deadline=deadline)
        return bounds

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> MilpBounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]`; see :func:`compute_bounds`."""
        if spec is None:
            raise ValueError("pass a specification; compute_bounds supplies the identity")
        _check_solver()
        deadline = None if self.budget is None else time.perf_counter() + self.budget
        f64, cpu = torch.float64, torch.device("cpu")
        with torch.no_grad():
            net64 = net.detach().to(dtype=f64, device=cpu)
            lo_t = x_lo.detach().to(cpu, f64)
            hi_t = x_hi.detach().to(cpu, f64)
            spec64 = spec.detach().to(cpu, f64)
            if intermediate is None:
                intermediate = self.intermediate(net64, lo_t, hi_t, deadline=deadline)
                dtypes = [f64] * len(intermediate)
            else:
                dtypes = [b.lower.dtype for b in intermediate]
                intermediate = tuple(Bounds(b.lower.detach().to(cpu, f64),
                                            b.upper.detach().to(cpu, f64)) for b in intermediate)
            pre = [_widen(b, d) for b, d in zip(intermediate, dtypes, strict=True)]
            widened = tuple(Bounds(torch.from_numpy(lo).reshape(b.lower.shape),
                                   torch.from_numpy(hi).reshape(b.upper.shape))
                            for (lo, hi), b in zip(pre, intermediate, strict=True))
            # the sound fallback of unknown rows: CROWN with the same (widened) bounds
            fallback = get_method("crown").bound(net64, lo_t, hi_t, spec64,
                                                 intermediate=widened)
            folded = fold_spec(net64, spec64)
            blocks = _affine_blocks(folded)
            lo64, hi64 = lo_t.flatten(1).numpy(), hi_t.flatten(1).numpy()
            n, s = spec.shape[:2]
            lower = fallback.lower.numpy().copy()
            upper = fallback.upper.numpy().copy()
            tolerance = np.zeros((n, s))
            status: list[tuple[str, ...]] = []
            upper_status: list[tuple[str, ...]] = []
            perturbation = _perturbations(net64, lo_t, hi_t, pre)
            for i in range(n):
                pre_i = [(lo[i], hi[i]) for lo, hi in pre]
                # the exact (or the model's perturbed) network: chains' rounding and errors
                slack = layer_slack(blocks, lo64[i], hi64[i], pre_i,
                                    None if perturbation is None
                                    else [p[i] for p in perturbation])
                problem = _build(blocks, folded.layers[-1], i, lo64[i], hi64[i], pre_i, slack)
                if not any(bool(((lo < 0) & (hi > 0)).any()) for lo, hi in pre_i):
                    exact_lo, exact_hi = _lp_rows(problem)
                    lower[i] = np.maximum(lower[i], exact_lo)
                    upper[i] = np.minimum(upper[i], exact_hi)
                    status.append((OPTIMAL,) * s)
                    upper_status.append((OPTIMAL,) * s)
                    continue
                model = _BoundModel(_MipData.of(problem, pre_i))
                tol = SAFETY * (TAU * model.data.width + _propagated_error(blocks, pre_i,
                                                                           problem))
                if problem.objective_slack is not None:
                    tol = tol + problem.objective_slack
                tolerance[i] = tol
                rows = [SKIPPED] * s
                up_rows = ["relaxation"] * s
                below = False
                # threshold mode: the rows most likely at or below it first
                order = range(s) if self.threshold is None else np.argsort(lower[i])
                for r in order:
                    const = problem.constants[r]
                    if not below:
                        limit = _limit(self.time_limit, deadline)
                        if limit is None:
                            rows[r] = BUDGET_SPENT
                        else:
                            theta = None if self.threshold is None else self.threshold - const
                            lb, rows[r] = model.minimize(problem.objectives[r], limit, tol[r],
                                                         theta)
                            lower[i, r] = max(lower[i, r], lb + const)
                            below = rows[r] == BELOW
                    if self.exact_upper:
                        limit = _limit(self.time_limit, deadline)
                        if limit is None:
                            up_rows[r] = BUDGET_SPENT
                            continue
                        ub, up_rows[r] = model.minimize(-problem.objectives[r], limit, tol[r])
                        upper[i, r] = min(upper[i, r], -ub + const)
                status.append(tuple(rows))
                upper_status.append(tuple(up_rows))
        return MilpBounds(_cast_outward(lower, x_lo, down=True),
                          _cast_outward(upper, x_lo, down=False), tuple(status),
                          tuple(upper_status), torch.as_tensor(tolerance))


def _limit(time_limit: float, deadline: float | None) -> float | None:
    """Seconds for the next MILP: `time_limit`, cut to what is left before `deadline` (None
    when nothing is left)."""
    if deadline is None:
        return time_limit
    left = deadline - time.perf_counter()
    return min(time_limit, left) if left > 0 else None


def _check_solver() -> None:
    import cvxpy as cp

    if "HIGHS" not in cp.installed_solvers():
        raise SpecError("milp needs the HiGHS solver; install it with `pip install highspy` "
                        f"(installed cvxpy solvers: {', '.join(cp.installed_solvers())}).")


# --------------------------------------------------------------------- intermediate bounds


def _truncated(net: Network, pos: int) -> Network:
    """The network up to (not including) op `pos`: its output is that op's input."""
    return Network(net.layers[:pos], net.input_shape, net.names[:pos])


def refine_intermediate(net: Network, x_lo: Tensor, x_hi: Tensor, bounds: Sequence[Bounds], *,
                        method: str = "lp", deadline: float | None = None
                        ) -> tuple[Bounds, ...]:
    """Tighter pre-activation bounds: each ReLU layer after the first re-bounded by `method`.

    Layer by layer, the unstable neurons of layer ``k`` (``l < 0 < u``) are bounded by `method`
    on the network truncated before ReLU ``k``, with the already refined bounds of the layers
    before it, and intersected with the given bounds (both sound, so the intersection is).

    Args:
        net: The network (the dtype of its tensors must match the box).
        x_lo, x_hi: The input box `(N, *input_shape)`.
        bounds: Sound bounds of every ReLU input, `(N, *shape)` each, e.g. CROWN's.
        method: ``"lp"`` (per sample, one min and one max LP per unstable neuron) or
            ``"alpha-crown"`` (batched).
        deadline: A ``time.perf_counter()`` value; once it has passed, the neurons not yet
            refined keep their given bounds (sound, only looser). With a deadline the LPs are
            solved :data:`REFINE_ROWS` neurons at a time so that it is checked often.

    Returns:
        One :class:`Bounds` per ReLU, each within the given one.
    """
    if method not in ("lp", "alpha-crown"):
        raise SpecError(f"refine_intermediate: method must be 'lp' or 'alpha-crown', got "
                        f"{method!r}.")
    refined = [Bounds(b.lower.clone(), b.upper.clone()) for b in bounds]
    positions = net.relu_positions
    n = x_lo.shape[0]
    bounder = get_method(method)
    for k in range(1, len(positions)):
        trunc = _truncated(net, positions[k])
        shape = refined[k].lower.shape[1:]
        lo = refined[k].lower.reshape(n, -1).clone()
        hi = refined[k].upper.reshape(n, -1).clone()
        unstable = (lo < 0) & (hi > 0)
        if not bool(unstable.any()):
            continue
        before = refined[:k]
        groups = ([[i] for i in range(n) if bool(unstable[i].any())] if method == "lp"
                  else [list(range(n))])
        for samples in groups:
            idx = torch.tensor(samples)
            unstable_rows = torch.nonzero(unstable[idx].any(0)).flatten()
            chunks = (unstable_rows.split(REFINE_ROWS) if deadline is not None
                      and method == "lp" else (unstable_rows,))
            for rows in chunks:
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                _refine_rows(bounder, trunc, x_lo, x_hi, idx, rows, lo, hi,
                             tuple(Bounds(b.lower[idx], b.upper[idx]) for b in before))
        refined[k] = Bounds(lo.reshape(n, *shape), hi.reshape(n, *shape))
    return tuple(refined)


def _refine_rows(bounder: Any, trunc: Network, x_lo: Tensor, x_hi: Tensor, idx: Tensor,
                 rows: Tensor, lo: Tensor, hi: Tensor, given: tuple[Bounds, ...]) -> None:
    """Intersect ``lo``/``hi`` ``(N, D)`` at samples `idx` and neurons `rows` with `bounder`'s
    bounds of those neurons (in place)."""
    spec = torch.zeros(len(idx), rows.numel(), lo.shape[1], dtype=lo.dtype)
    spec[:, torch.arange(rows.numel()), rows] = 1.0
    b = bounder.bound(trunc, x_lo[idx], x_hi[idx], spec.to(x_lo.device), intermediate=given)
    new_lo = torch.maximum(lo[idx][:, rows], b.lower.to(lo.dtype).cpu())
    new_hi = torch.minimum(hi[idx][:, rows], b.upper.to(hi.dtype).cpu())
    # both are sound; a crossing can only be rounding of an (almost) point interval
    lo[idx[:, None], rows] = torch.minimum(new_lo, new_hi)
    hi[idx[:, None], rows] = torch.maximum(new_lo, new_hi)


# ------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class _MipData:
    """The LP of :func:`certify.bounds.lp._build` plus binaries and big-M rows.

    ``a_eq v = b_eq``, ``a_ub v + b_ub_bin a <= b_ub``, ``lo <= v <= hi``, ``a`` binary.
    """

    lp: _Problem
    a_ub: scipy.sparse.csr_matrix  # (R, n) continuous part of all inequality rows
    a_ub_bin: scipy.sparse.csr_matrix  # (R, m) binary part
    b_ub: np.ndarray  # (R,)
    n_bin: int
    width: float  # sum of the variables' box widths (binaries: 1 each)

    @staticmethod
    def of(problem: _Problem, pre: list[tuple[np.ndarray, np.ndarray]]) -> _MipData:
        import scipy.sparse as sp

        total = problem.lo.shape[0]
        sizes = [total - sum(2 * lo.shape[0] for lo, _ in pre)]
        for lo, _ in pre:
            sizes += [lo.shape[0], lo.shape[0]]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        rows_c, cols_c, vals_c, rows_b, cols_b, vals_b, rhs = [], [], [], [], [], [], []
        r = problem.a_ub.shape[0]
        m = 0
        for k, (l, u) in enumerate(pre):
            z0, h0 = offsets[2 * k + 1], offsets[2 * k + 2]
            for j in np.nonzero((l < 0) & (u > 0))[0]:
                # h - u a <= 0
                rows_c.append(r)
                cols_c.append(h0 + j)
                vals_c.append(1.0)
                rows_b.append(r)
                cols_b.append(m)
                vals_b.append(-u[j])
                rhs.append(0.0)
                # h - z - l a <= -l
                rows_c += [r + 1, r + 1]
                cols_c += [h0 + j, z0 + j]
                vals_c += [1.0, -1.0]
                rows_b.append(r + 1)
                cols_b.append(m)
                vals_b.append(-l[j])
                rhs.append(-l[j])
                r += 2
                m += 1
        extra = r - problem.a_ub.shape[0]
        big_c = sp.csr_matrix((vals_c, (np.array(rows_c) - problem.a_ub.shape[0], cols_c)),
                              shape=(extra, total))
        a_ub = sp.vstack([problem.a_ub, big_c], format="csr")
        a_ub_bin = sp.csr_matrix((vals_b, (rows_b, cols_b)), shape=(r, m))
        b_ub = np.concatenate([problem.b_ub, np.array(rhs)])
        width = float(np.sum(problem.hi - problem.lo)) + m
        return _MipData(problem, a_ub, a_ub_bin, b_ub, m, width)


def _propagated_error(blocks: list[_Block], pre: list[tuple[np.ndarray, np.ndarray]],
                      problem: _Problem) -> np.ndarray:
    """``P`` of the module docstring per objective row: `(S,)`."""
    err = np.full(blocks[0].matrix.shape[1], TAU)  # input bounds violated by TAU
    for block, (l, u) in zip(blocks[:-1], pre, strict=True):
        ez = np.abs(block.matrix) @ err + TAU
        unstable = (l < 0) & (u > 0)
        err = ez + np.where(unstable, TAU * np.maximum(np.abs(l), np.abs(u)) + 2 * TAU, TAU)
    start = problem.lo.shape[0] - err.shape[0]
    weights = np.abs(problem.objectives[:, start:])  # the last layer's (folded) rows
    return weights @ err + TAU  # type: ignore[no-any-return]


def _lp_rows(problem: _Problem) -> tuple[np.ndarray, np.ndarray]:
    from certify.bounds.lp import _solve_rows

    return _solve_rows(problem, LP.solver)


@dataclass
class _Outcome:
    """One MILP solve: HiGHS's verdict, dual bound and best point."""

    status: str  # "optimal", "infeasible", "time_limit", "error: ..."
    dual: float  # the dual bound (-inf when none); +inf for infeasible
    value: float  # the primal objective (inf when no point)
    point: np.ndarray | None  # the continuous variables of the best point
    seconds: float


def _solve(problem: Any, time_limit: float, variables: Any,
           options: dict[str, Any] | None = None) -> _Outcome:
    """Solve a cvxpy MILP with HiGHS within `time_limit` seconds (`options` override ours)."""
    import cvxpy as cp

    start = time.perf_counter()
    settings = {**HIGHS_OPTIONS, **(options or {}), "time_limit": float(time_limit)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy warns on inaccurate/limited solves
            problem.solve(solver="HIGHS", **settings)
    except (cp.SolverError, ValueError, IndexError) as e:
        return _Outcome(f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}", -math.inf,
                        math.inf, None, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    info = problem.solver_stats.extra_stats if problem.solver_stats is not None else None
    dual = float(getattr(info, "mip_dual_bound", -math.inf)) if info is not None else -math.inf
    if not math.isfinite(dual) and dual != math.inf:
        dual = -math.inf
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        return _Outcome("infeasible", math.inf, math.inf, None, seconds)
    value = problem.value
    point = variables.value
    # HiGHS's primal_solution_status 2 (kSolutionStatusFeasible): a point was found; on a time
    # limit without one, cvxpy still hands back whatever the column values are
    feasible = info is not None and int(getattr(info, "primal_solution_status", 0)) == 2
    has_point = feasible and point is not None and value is not None and \
        math.isfinite(float(value)) and bool(np.all(np.isfinite(point)))
    pt = np.asarray(point, dtype=np.float64).copy() if has_point else None
    val = float(value) if has_point else math.inf
    if problem.status == cp.OPTIMAL:
        if not math.isfinite(dual):
            return _Outcome("error: HiGHS reported optimal without a dual bound", -math.inf,
                            val, pt, seconds)
        return _Outcome("optimal", dual, val, pt, seconds)
    reason = "time_limit" if problem.status == cp.USER_LIMIT else f"error: status {problem.status}"
    return _Outcome(reason, dual, val, pt, seconds)


class _BoundModel:
    """The MILP of one sample with a parametric objective, compiled once, solved per row.

    A parametric cut ``c . v <= cut`` is part of the model: redundant for exact rows, and the
    threshold test of ``threshold`` mode (see :meth:`minimize`).
    """

    def __init__(self, data: _MipData) -> None:
        import cvxpy as cp

        self.data = data
        lp = data.lp
        n = lp.lo.shape[0]
        self.v = cp.Variable(n, bounds=[lp.lo, lp.hi])
        a = cp.Variable(data.n_bin, boolean=True)
        self.c = cp.Parameter(n)
        self.cut = cp.Parameter()
        constraints = [data.a_ub @ self.v + data.a_ub_bin @ a <= data.b_ub,
                       self.c @ self.v <= self.cut]
        if lp.a_eq.shape[0]:
            constraints.append(lp.a_eq @ self.v == lp.b_eq)
        self.problem = cp.Problem(cp.Minimize(self.c @ self.v), constraints)

    def minimize(self, c: np.ndarray, time_limit: float, tol: float,
                 threshold: float | None = None) -> tuple[float, str]:
        """Sound lower bound of ``min c . v`` (without the constant) and the row's status.

        With a `threshold` the row is only decided against it: the cut ``c . v <= threshold +
        2 tol`` makes the MILP infeasible when the minimum is above that (then the bound is
        ``threshold + tol``, status ``ABOVE``), and HiGHS stops at the first point with
        ``c . v <= threshold`` (status ``BELOW``, the bound is the dual bound reached).
        """
        lp = self.data.lp
        self.c.value = c
        options: dict[str, Any] = {}
        if threshold is None:  # a bound on c . v over the variables' box: never binding
            self.cut.value = float(np.maximum(c * lp.lo, c * lp.hi).sum()) + 1.0
        else:
            self.cut.value = threshold + 2 * tol
            options["objective_target"] = threshold
        out = _solve(self.problem, time_limit, self.v, options)
        if out.status == "infeasible":
            if threshold is not None:
                return threshold + tol, ABOVE
            return -math.inf, "unknown: HiGHS reported the box infeasible"
        if threshold is not None and out.point is not None and out.value <= threshold:
            return out.dual - tol, BELOW
        if out.status == OPTIMAL:
            return out.dual - tol, OPTIMAL
        reason = (f"time limit {time_limit:g}s" if out.status == "time_limit" else out.status)
        return out.dual - tol, f"unknown: {reason}"


# ------------------------------------------------------------------ minimal adversarial eps


@dataclass(frozen=True)
class MinEpsOutcome:
    """The minimal-eps MILPs of one sample (see :func:`solve_min_eps`).

    Attributes:
        lower: A lower bound on the minimal adversarial eps: the smallest, over target classes,
            dual bound minus `tolerance` (0 at the least).
        value: The smallest eps of a point HiGHS found (tolerance-feasible, not yet re-checked);
            ``inf`` when none.
        point: That point, flat `(D,)` float64, or None.
        target: Its target class, or -1.
        optimal: Whether every class's problem was solved (or is irrelevant: its lower bound is
            above `value`).
        reason: Empty when optimal, else what was not solved.
        problems: MILPs solved.
        tolerance: The eps tolerance subtracted from the dual bounds.
        seconds: Solver time.
    """

    lower: float
    value: float
    point: np.ndarray | None
    target: int
    optimal: bool
    reason: str
    problems: int
    tolerance: float
    seconds: float


class _EpsModel:
    """The minimal-eps MILP of one sample over one box (see :func:`solve_min_eps`)."""

    def __init__(self, net: Network, x: Tensor, spec: Tensor, targets: list[int], x_lo: Tensor,
                 x_hi: Tensor, intermediate: Sequence[Bounds], cap: float) -> None:
        import cvxpy as cp
        import scipy.sparse as sp

        f64, cpu = torch.float64, torch.device("cpu")
        folded = fold_spec(net, spec)
        blocks = _affine_blocks(folded)
        pre = [_widen(Bounds(b.lower.detach().to(cpu, f64), b.upper.detach().to(cpu, f64)),
                      b.lower.dtype) for b in intermediate]
        pre0 = [(lo[0], hi[0]) for lo, hi in pre]
        lo64 = x_lo.detach().to(cpu, f64).flatten(1).numpy()[0]
        hi64 = x_hi.detach().to(cpu, f64).flatten(1).numpy()[0]
        x0 = x.flatten().numpy()
        problem = _build(blocks, folded.layers[-1], 0, lo64, hi64, pre0)
        data = _MipData.of(problem, pre0)
        n, d = problem.lo.shape[0], x0.shape[0]
        self.v = cp.Variable(n, bounds=[problem.lo, problem.hi])
        eps = cp.Variable(bounds=[0.0, float(cap)])
        a = cp.Variable(data.n_bin, boolean=True) if data.n_bin else None
        self.row = cp.Parameter(n)
        self.rhs = cp.Parameter()
        self.limit = cp.Parameter(nonneg=True)
        pick = sp.hstack([sp.identity(d), sp.csr_matrix((d, n - d))], format="csr")  # x' = pick v
        constraints = [pick @ self.v - eps <= x0, -(pick @ self.v) - eps <= -x0,
                       self.row @ self.v <= self.rhs, eps <= self.limit]
        if data.a_ub.shape[0]:
            constraints.append(data.a_ub @ self.v + (data.a_ub_bin @ a if a is not None else 0)
                               <= data.b_ub)
        if problem.a_eq.shape[0]:
            constraints.append(problem.a_eq @ self.v == problem.b_eq)
        self.milp = cp.Problem(cp.Minimize(eps), constraints)
        self.problem = problem
        self.cap = float(cap)
        self.d = d
        self.tolerance = SAFETY * (TAU * (data.width + cap) + TAU)
        # classes whose margin row is > 0 on the whole box: no example of theirs up to cap
        widened = tuple(Bounds(torch.from_numpy(lo).reshape(b.lower.shape),
                               torch.from_numpy(hi).reshape(b.upper.shape))
                        for (lo, hi), b in zip(pre, intermediate, strict=True))
        self.ruled_out = _ruled_out(net, x_lo, x_hi, spec, widened, problem, targets)

    def solve(self, s: int, limit: float, time_limit: float, gap: float) -> _Outcome:
        """``min eps`` with ``f_j >= f_y`` for spec row `s` (``(e_y - e_j) . f <= 0``)."""
        self.row.value = self.problem.objectives[s]
        self.rhs.value = -self.problem.constants[s]
        self.limit.value = limit
        return _solve(self.milp, time_limit, self.v, {"mip_abs_gap": gap, "mip_rel_gap": 0.0})


def solve_min_eps(net: Network, x: Tensor, label: int, x_lo: Tensor, x_hi: Tensor,
                  intermediate: Sequence[Bounds], *, cap: float, time_limit: float,
                  gap: float = 1e-6, order: Sequence[int] | None = None,
                  rebound: Callable[[float], tuple[Tensor, Tensor, Sequence[Bounds]]] | None = None,
                  shrink: float = 0.9) -> MinEpsOutcome:
    """Smallest L-inf radius at which some class ``j != label`` reaches the label's logit.

    One MILP per target class: ``min eps`` s.t. ``|x' - x| <= eps``, ``x'`` in the box
    ``[x_lo, x_hi]`` (which must contain the ball of radius `cap`, clipped to [0, 1]), the
    network encoded as in the module docstring with `intermediate` (valid on the box), and
    ``f_j(x') - f_label(x') >= 0``, with ``eps <= cap``. Classes whose margin is proven positive
    on the whole box (CROWN, then the LP) need no MILP. After each class the cap drops to the
    best eps found, so later classes only search below it (an infeasible class is above it);
    with `rebound`, once the best eps is below ``shrink`` times the box's radius, the box, its
    intermediate bounds (``rebound(new_cap)``) and the MILP are rebuilt at the best eps:
    fewer unstable ReLUs and smaller big-M constants for the classes still to solve.

    Tolerance: ``tolerance = SAFETY * (TAU * (sum_j (hi_j - lo_j) + cap) + TAU)`` is subtracted
    from every dual bound (and from the cap of an infeasible class); see the module docstring.

    Args:
        net: The network (any dtype; used in float64).
        x: One input `(1, *input_shape)` in [0, 1].
        label: Its true class.
        x_lo, x_hi: `(1, *input_shape)` the box of radius `cap` around x, clipped to [0, 1].
        intermediate: Pre-activation bounds valid on that box, `(1, *shape)` each.
        cap: The largest eps of interest (> 0), e.g. an attack's eps or eps_max.
        time_limit: Seconds per MILP.
        gap: HiGHS stops a problem once its best eps is within `gap` of its dual bound.
        order: Target classes in the order to solve them (default: by decreasing logit).
        rebound: ``rebound(c) -> (x_lo, x_hi, intermediate)`` for the ball of radius ``c``.
        shrink: Rebuild when the best eps is below ``shrink`` times the box's radius.

    Returns:
        :class:`MinEpsOutcome` (its `tolerance` is the largest of the models used).
    """
    from certify.spec import margin_spec

    _check_solver()
    f64, cpu = torch.float64, torch.device("cpu")
    net64 = net.detach().to(dtype=f64, device=cpu)
    x64 = x.detach().to(cpu, f64)
    k = int(math.prod(net64.output_shape))
    spec = margin_spec(torch.tensor([label]), k).to(f64)  # rows e_y - e_j, j != y
    targets = [j for j in range(k) if j != label]
    start = time.perf_counter()
    model = _EpsModel(net64, x64, spec, targets, x_lo, x_hi, intermediate, cap)
    tolerance = model.tolerance
    with torch.no_grad():
        logits = net64(x64).flatten()
    if order is None:
        order = sorted(targets, key=lambda j: -float(logits[j]))
    best_value, best_point, best_target = math.inf, None, -1
    current = float(cap)
    lowers: dict[int, float] = {}
    unsolved: dict[int, str] = {}
    solved = 0
    seconds = time.perf_counter() - start
    for j in order:
        if j in lowers:
            continue
        if j in model.ruled_out:
            lowers[j] = model.cap  # f_y > f_j on the whole box: no example up to its radius
            continue
        solved += 1
        out = model.solve(targets.index(j), current, time_limit, gap)
        seconds += out.seconds
        if out.status == "infeasible":
            lowers[j] = current - model.tolerance
            continue
        lowers[j] = out.dual - model.tolerance
        if out.status != OPTIMAL:
            reason = f"time limit {time_limit:g}s" if out.status == "time_limit" else out.status
            unsolved[j] = f"class {j}: {reason}"
        if out.point is not None and out.value < best_value:
            best_value, best_point, best_target = out.value, out.point[:model.d], j
            current = min(current, best_value)
            if rebound is not None and 0 < current < shrink * model.cap and \
                    any(t not in lowers for t in targets):
                t0 = time.perf_counter()
                # the ball of radius `current` holds every example still of interest
                model = _EpsModel(net64, x64, spec, targets, *rebound(current), current)
                tolerance = max(tolerance, model.tolerance)
                seconds += time.perf_counter() - t0
    lower = max(0.0, min(lowers.values())) if lowers else 0.0
    open_reasons = [r for j, r in unsolved.items() if lowers[j] < best_value]
    return MinEpsOutcome(lower, best_value, best_point, best_target, not open_reasons,
                         "; ".join(open_reasons), solved, tolerance, seconds)


def _ruled_out(net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor,
               intermediate: Sequence[Bounds], problem: _Problem,
               targets: list[int]) -> set[int]:
    """Target classes whose margin row is proven > 0 on the whole box (no MILP needed).

    CROWN with the given (widened) intermediate bounds first, counted only above a margin for
    its own float64 rounding; the rows it cannot settle get the LP's rigorous dual bound
    (:mod:`certify.bounds.lp`).
    """
    f64, cpu = torch.float64, torch.device("cpu")
    inter = tuple(Bounds(b.lower.detach().to(cpu, f64), b.upper.detach().to(cpu, f64))
                  for b in intermediate)
    lo_t, hi_t = x_lo.detach().to(cpu, f64), x_hi.detach().to(cpu, f64)
    with torch.no_grad():
        crown = get_method("crown").bound(net, lo_t, hi_t, spec, intermediate=inter)
    lower = crown.lower[0].numpy()
    scale = 1e-9 * (1.0 + np.abs(lower))  # CROWN's own float64 rounding, generously
    out = {j for j, value, slack in zip(targets, lower, scale, strict=True) if value > slack}
    rest = [s for s, j in enumerate(targets) if j not in out]
    if rest:
        sub = _Problem(problem.objectives[rest], problem.constants[rest], problem.a_eq,
                       problem.b_eq, problem.a_ub, problem.b_ub, problem.lo, problem.hi)
        from certify.bounds.lp import _solve_rows

        lp_lower, _ = _solve_rows(sub, LP.solver)
        out |= {targets[s] for s, value in zip(rest, lp_lower, strict=True) if value > 0}
    return out
