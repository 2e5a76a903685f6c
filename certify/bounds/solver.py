"""The solver interface: the only module of certify that imports cvxpy (lazily).

Programs come from :mod:`certify.bounds.encoding` as numpy/scipy data; this module turns them
into cvxpy problems, solves them and hands back numbers that are either *rigorous* or come
with an explicit *status* -- never a solver's primal value dressed up as a bound:

:func:`lp_rows`
    Sound lower and upper bounds of every objective row of a :class:`LinearProgram`, by weak
    duality: the Lagrangian dual function at the solver's dual values, evaluated in float64
    minus a rigorous bound on its rounding (:func:`dual_bound`). An inexact or failed solve can
    only make it looser.
:class:`BoundMilp`, :class:`RadiusMilp`
    A :class:`MixedIntegerProgram` compiled once with a parametric objective (and cut), or with
    the L-inf radius around a point as the objective; each solve returns a
    :class:`MilpOutcome`: HiGHS's status, dual bound and best point, within a time limit.
    HiGHS works to the tolerance :data:`TAU`; callers subtract ``SAFETY * (TAU * ...)`` from
    its dual bounds (:mod:`certify.bounds.milp`).

**The dual bound.** For ``min c·v`` s.t. ``A_eq v = b_eq``, ``A_ub v <= b_ub``, ``lo <= v <=
hi``:

    g(y, lam) = -y · b_eq - lam · b_ub + sum_i min(r_i lo_i, r_i hi_i),
    r = c + A_eq^T y + A_ub^T lam,   lam := max(lam, 0),

is a lower bound of the LP for *any* ``y`` and any ``lam >= 0`` (the box bounds are finite);
a failed solve falls back to zero duals (the interval bound), with a warning.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from certify.bounds.encoding import LinearProgram, MixedIntegerProgram, gamma

if TYPE_CHECKING:
    import scipy.sparse  # type: ignore[import-untyped, unused-ignore]

__all__ = ["DEFAULT_LP_SOLVER", "HIGHS_OPTIONS", "INFEASIBLE", "OPTIMAL", "SAFETY", "TAU",
           "TIME_LIMIT", "BoundMilp", "MilpOutcome", "RadiusMilp", "dual_bound",
           "installed_solvers", "lp_rows", "solve_milp"]

#: The LP solver of the ``lp`` method and of the LP bounds the MILP uses.
DEFAULT_LP_SOLVER = "HIGHS"
#: Primal feasibility, dual feasibility and integrality tolerance given to HiGHS.
TAU = 1e-9
#: HiGHS's own primal and dual feasibility tolerance.
HIGHS_DEFAULT_TOLERANCE = 1e-7
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
#: Statuses of :class:`MilpOutcome` besides ``"error: ..."``.
OPTIMAL, INFEASIBLE, TIME_LIMIT = "optimal", "infeasible", "time_limit"


def installed_solvers() -> list[str]:
    """The cvxpy solvers installed here, e.g. ``["CLARABEL", "HIGHS", ...]``."""
    import cvxpy as cp

    return list(cp.installed_solvers())  # type: ignore[no-untyped-call, unused-ignore]


# --- LP: rigorous bounds from dual values -----------------------------------------------------


def lp_rows(problem: LinearProgram, solver: str) -> tuple[np.ndarray, np.ndarray]:
    """Sound lower and upper bounds `(S,)` of every objective row, from the duals of the LPs
    (each row minimized and maximized), minus the program's ``objective_slack``."""
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
    # HiGHS's default tolerances leave reduced costs whose box terms cost ~1e-8 of a
    # bound; HiGHS's own (1e-7) are tried where it fails with tighter ones.
    tries: list[dict[str, Any]] = [{}]
    if solver == "HIGHS":
        tries = [{f"{k}_feasibility_tolerance": tol for k in ("primal", "dual")}
                 for tol in (TAU, HIGHS_DEFAULT_TOLERANCE)]
    bounds = []
    for sign in (1.0, -1.0):
        for row, const in zip(problem.objectives, problem.constants, strict=True):
            c.value = sign * row
            for options in tries:
                try:
                    lp.solve(solver=solver, **options)  # type: ignore[no-untyped-call, unused-ignore]
                    status = lp.status
                except cp.SolverError:
                    status = "solver error"
                if status == cp.OPTIMAL:
                    break
            # an inaccurate solve's duals still give a sound bound
            ok = status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
            y = eq_con.dual_value if ok and eq_con is not None else None
            lam = ub_con.dual_value if ok and ub_con is not None else None
            if not ok:
                warnings.warn(f"LP solver {solver} failed (status {status}); falling back "
                              "to zero dual values (a sound but looser bound).", RuntimeWarning,
                              stacklevel=4)
            bounds.append(dual_bound(problem, sign * row, sign * const, y, lam))
    if problem.objective_slack is not None:
        slack = np.concatenate([problem.objective_slack, problem.objective_slack])
        bounds = list(np.array(bounds) - slack)
    s = problem.objectives.shape[0]
    values = np.array(bounds)
    return values[:s], -values[s:]


def dual_bound(problem: LinearProgram, c: np.ndarray, const: float, y: np.ndarray | None,
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
    r_gamma = gamma(int(per_column) + 2)
    n_terms = lo.shape[0] + a_eq.shape[0] + a_ub.shape[0] + 1
    abs_eq, abs_ub = abs(a_eq), abs(a_ub)
    best = -np.inf
    for yy in (y, -y):
        r = c + a_eq.T @ yy + a_ub.T @ lam
        terms = np.minimum(r * lo, r * hi)
        value = const - yy @ problem.b_eq - lam @ problem.b_ub + terms.sum()
        r_abs = np.abs(c) + abs_eq.T @ np.abs(yy) + abs_ub.T @ lam
        error = (r_gamma * (r_abs @ magnitude)
                 + gamma(n_terms) * (abs(const) + np.abs(yy) @ np.abs(problem.b_eq)
                                     + lam @ np.abs(problem.b_ub) + np.abs(terms).sum()))
        if np.isfinite(value):
            best = max(best, value - 2.0 * error)
    return float(best)


# --- MILP: HiGHS with a time limit ------------------------------------------------------------


@dataclass
class MilpOutcome:
    """One MILP solve: HiGHS's verdict, dual bound and best point."""

    status: str  # "optimal", "infeasible", "time_limit", "error: ..."
    dual: float  # the dual bound (-inf when none); +inf for infeasible
    value: float  # the primal objective (inf when no point)
    point: np.ndarray | None  # the continuous variables of the best point
    seconds: float


def solve_milp(problem: Any, time_limit: float, variables: Any,
               options: dict[str, Any] | None = None) -> MilpOutcome:
    """Solve a compiled cvxpy MILP with HiGHS within `time_limit` seconds (`options` override
    :data:`HIGHS_OPTIONS`); `variables` are the continuous ones whose point is returned."""
    import cvxpy as cp

    start = time.perf_counter()
    settings = {**HIGHS_OPTIONS, **(options or {}), "time_limit": float(time_limit)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy warns on inaccurate/limited solves
            problem.solve(solver="HIGHS", **settings)
    except (cp.SolverError, ValueError, IndexError) as e:
        return MilpOutcome(f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}",
                           -math.inf, math.inf, None, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    info = problem.solver_stats.extra_stats if problem.solver_stats is not None else None
    dual = float(getattr(info, "mip_dual_bound", -math.inf)) if info is not None else -math.inf
    if not math.isfinite(dual) and dual != math.inf:
        dual = -math.inf
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        return MilpOutcome(INFEASIBLE, math.inf, math.inf, None, seconds)
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
            return MilpOutcome("error: HiGHS reported optimal without a dual bound", -math.inf,
                               val, pt, seconds)
        return MilpOutcome(OPTIMAL, dual, val, pt, seconds)
    reason = TIME_LIMIT if problem.status == cp.USER_LIMIT else f"error: status {problem.status}"
    return MilpOutcome(reason, dual, val, pt, seconds)


class BoundMilp:
    """A program with a parametric objective ``c · v`` and cut ``c · v <= cut``, compiled
    once and solved per objective row (:meth:`solve`)."""

    def __init__(self, data: MixedIntegerProgram) -> None:
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

    def solve(self, c: np.ndarray, cut: float, time_limit: float,
              options: dict[str, Any] | None = None) -> MilpOutcome:
        """``min c · v`` (without the program's constant) with ``c · v <= cut``."""
        self.c.value = c
        self.cut.value = cut
        return solve_milp(self.problem, time_limit, self.v, options)


class RadiusMilp:
    """``min eps`` s.t. ``|x' - x0|_inf <= eps <= min(cap, limit)`` (``x'`` the program's first
    ``D`` variables), the program's rows and a parametric row ``row · v <= rhs``; compiled
    once, solved per row (:meth:`solve`)."""

    def __init__(self, data: MixedIntegerProgram, x0: np.ndarray, cap: float) -> None:
        import cvxpy as cp
        import scipy.sparse as sp  # type: ignore[import-untyped, unused-ignore]

        problem = data.lp
        n, d = problem.lo.shape[0], x0.shape[0]
        self.v = cp.Variable(n, bounds=[problem.lo, problem.hi])
        eps = cp.Variable(bounds=[0.0, float(cap)])
        a = cp.Variable(data.n_bin, boolean=True) if data.n_bin else None
        self.row = cp.Parameter(n)
        self.rhs = cp.Parameter()
        self.limit = cp.Parameter(nonneg=True)
        pick: scipy.sparse.csr_matrix = sp.hstack([sp.identity(d), sp.csr_matrix((d, n - d))],
                                                  format="csr")  # x' = pick v
        constraints = [pick @ self.v - eps <= x0, -(pick @ self.v) - eps <= -x0,
                       self.row @ self.v <= self.rhs, eps <= self.limit]
        if data.a_ub.shape[0]:
            constraints.append(data.a_ub @ self.v + (data.a_ub_bin @ a if a is not None else 0)
                               <= data.b_ub)
        if problem.a_eq.shape[0]:
            constraints.append(problem.a_eq @ self.v == problem.b_eq)
        self.problem = cp.Problem(cp.Minimize(eps), constraints)

    def solve(self, row: np.ndarray, rhs: float, limit: float, time_limit: float,
              options: dict[str, Any] | None = None) -> MilpOutcome:
        """``min eps`` with ``row · v <= rhs`` and ``eps <= limit``."""
        self.row.value = row
        self.rhs.value = rhs
        self.limit.value = limit
        return solve_milp(self.problem, time_limit, self.v, options)
