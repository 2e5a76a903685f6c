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
big-M relaxation; hence the option ``intermediate_method`` (default ``"lp"``): a method that
refines intermediate bounds (``refines_intermediate``: ``"lp"``, ``"alpha-crown"``) starts from
its own (CROWN's) bounds, then re-bounds every ReLU layer after the first neuron by neuron over
the already-refined layers before it (intersected with the given bounds). The first layer's
bounds are exact already (an affine map of a box).

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
rigorous dual bound instead (:func:`certify.bounds.solver.lp_rows`), with no tolerance.

**Unknown rows.** A MILP that hits ``time_limit`` (seconds per problem) or fails is ``unknown``:
its lower bound is the best *sound* value available, the larger of the dual bound reached (minus
`tol`) and CROWN's bound with the same intermediate bounds -- never a claim the MILP did not
prove. :class:`MilpBounds` carries each row's status (``"optimal"`` or ``"unknown: <reason>"``)
so callers can tell exact rows from fallback ones. Upper bounds are CROWN's with the same
intermediate bounds (sound, not exact) unless ``exact_upper=True``.

Everything is computed in float64 (the float32 weights are exact in float64); the intermediate
bounds are widened (:func:`certify.bounds.encoding.widen`) so that their rounding cannot cut off
a reachable point, the program relaxes the exact network (its chains' rounding, as for the LP),
and the result is rounded outward to the input's dtype.

The program is :mod:`certify.bounds.encoding`'s (the relaxation's rows plus each activation's
exact encoding), solved by :mod:`certify.bounds.solver` (the only module that imports cvxpy).
The other use of the same program, the smallest L-inf radius at which a target class reaches the
true one, lives with :mod:`certify.exact`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from certify.bounds import rounding, solver
from certify.bounds.base import (
    BoundMethod,
    Bounds,
    MethodBase,
    get_method,
    list_methods,
    register_method,
)
from certify.bounds.encoding import (
    cast_outward,
    encode,
    model_perturbations,
    require_exact_encoding,
    sample_programs,
    widen,
)
from certify.bounds.layers import FlattenOp
from certify.bounds.network import Network, fold_spec
from certify.bounds.relaxations import activation_rule
from certify.bounds.solver import SAFETY, TAU, BoundMilp
from certify.errors import SpecError

__all__ = ["MILP", "SAFETY", "TAU", "MilpBounds", "refine_intermediate"]

OPTIMAL = "optimal"
ABOVE = "above threshold"
BELOW = "at or below threshold"
SKIPPED = "skipped: another row is at or below the threshold"
BUDGET_SPENT = "unknown: time budget spent"
#: Neurons per LP call when refining intermediate bounds against a deadline.
REFINE_ROWS = 16


def intermediate_sources() -> list[str]:
    """The methods whose pre-activation bounds the MILP can use (``intermediate_method``)."""
    return list_methods(serves_intermediate=True)


def refiners() -> list[str]:
    """The methods :func:`refine_intermediate` can refine with, tightest first."""
    return list_methods(refines_intermediate=True)[::-1]


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
            ``"alpha-crown"`` (CROWN refined by alpha-CROWN, cheaper) -- the methods that
            refine intermediate bounds -- or the plain bounds of any other method that serves
            them (``"crown"``, ``"wong-kolter"``, ``"crown-ibp"``, ``"ibp"``).
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
        sources = intermediate_sources()
        if self.intermediate_method not in sources:
            raise SpecError(f"milp: intermediate_method must be one of "
                            f"{', '.join(sources)}, got {self.intermediate_method!r}.")
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
        """Pre-activation bounds of `intermediate_method`: its own, refined by it
        (:func:`refine_intermediate`) when it refines intermediate bounds, until the
        ``time.perf_counter()`` `deadline` if one is given."""
        source = get_method(self.intermediate_method)
        with torch.no_grad():
            bounds = source.intermediate(net, x_lo, x_hi)
            if source.refines_intermediate:
                bounds = refine_intermediate(net, x_lo, x_hi, bounds,
                                             method=self.intermediate_method, deadline=deadline)
        return bounds

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> MilpBounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]`; see :func:`compute_bounds`."""
        if spec is None:
            raise ValueError("pass a specification; compute_bounds supplies the identity")
        require_exact_encoding(net)  # it claims exactness: no relaxed Sigmoid/Tanh
        check_solver()
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
            pre = [widen(b, d) for b, d in zip(intermediate, dtypes, strict=True)]
            widened = tuple(Bounds(torch.from_numpy(lo).reshape(b.lower.shape),
                                   torch.from_numpy(hi).reshape(b.upper.shape))
                            for (lo, hi), b in zip(pre, intermediate, strict=True))
            # the sound fallback of unknown rows: CROWN with the same (widened) bounds
            fallback = get_method("crown").bound(net64, lo_t, hi_t, spec64,
                                                 intermediate=widened)
            encoding = encode(fold_spec(net64, spec64))
            lo64, hi64 = lo_t.flatten(1).numpy(), hi_t.flatten(1).numpy()
            n, s = spec.shape[:2]
            lower = fallback.lower.numpy().copy()
            upper = fallback.upper.numpy().copy()
            tolerance = np.zeros((n, s))
            status: list[tuple[str, ...]] = []
            upper_status: list[tuple[str, ...]] = []
            perturbation = model_perturbations(net64, lo_t, hi_t, pre)
            # the exact (or the model's perturbed) network: chains' rounding and errors
            programs = sample_programs(encoding, lo64, hi64, pre, perturbation)
            for i, (pre_i, problem) in enumerate(programs):
                program = encoding.milp(problem, pre_i)
                if program.n_bin == 0:  # no binaries: the LP is the exact network
                    exact_lo, exact_hi = solver.lp_rows(problem, solver.DEFAULT_LP_SOLVER)
                    lower[i] = np.maximum(lower[i], exact_lo)
                    upper[i] = np.minimum(upper[i], exact_hi)
                    status.append((OPTIMAL,) * s)
                    upper_status.append((OPTIMAL,) * s)
                    continue
                model = BoundMilp(program)
                tol = SAFETY * (TAU * model.data.width + encoding.solver_error(pre_i, problem,
                                                                               TAU))
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
                            lb, rows[r] = _minimize(model, problem.objectives[r], limit,
                                                    tol[r], theta)
                            lower[i, r] = max(lower[i, r], lb + const)
                            below = rows[r] == BELOW
                    if self.exact_upper:
                        limit = _limit(self.time_limit, deadline)
                        if limit is None:
                            up_rows[r] = BUDGET_SPENT
                            continue
                        ub, up_rows[r] = _minimize(model, -problem.objectives[r], limit,
                                                   tol[r])
                        upper[i, r] = min(upper[i, r], -ub + const)
                status.append(tuple(rows))
                upper_status.append(tuple(up_rows))
        return MilpBounds(cast_outward(lower, x_lo, down=True),
                          cast_outward(upper, x_lo, down=False), tuple(status),
                          tuple(upper_status), torch.as_tensor(tolerance))


def _limit(time_limit: float, deadline: float | None) -> float | None:
    """Seconds for the next MILP: `time_limit`, cut to what is left before `deadline` (None
    when nothing is left)."""
    if deadline is None:
        return time_limit
    left = deadline - time.perf_counter()
    return min(time_limit, left) if left > 0 else None


def check_solver() -> None:
    """Raise a one-line error when HiGHS, the MILP solver, is not installed."""
    installed = solver.installed_solvers()
    if "HIGHS" not in installed:
        raise SpecError("milp needs the HiGHS solver; install it with `pip install highspy` "
                        f"(installed cvxpy solvers: {', '.join(installed)}).")


# --------------------------------------------------------------------- intermediate bounds


def _truncated(net: Network, pos: int) -> Network:
    """The network up to (not including) op `pos`: its output is that op's input.

    A DAG keeps every op before `pos` (so that its activations are those whose bounds are
    given: the first ones of `net`) and ends in a Flatten of the node `pos` takes (exact: it
    moves values); ops after that node whose outputs nothing takes are never reached by a
    backward pass and only add constrained variables to an LP."""
    # the model's own computation is kept whole: its rounding up to each activation of the
    # truncated network is the full network's (forward_error looks below that activation only)
    if net.is_chain:
        return Network(net.layers[:pos], net.input_shape, net.names[:pos],
                       model_layers=net.model_layers, runs_in=net.runs_in)
    src = net.sources(pos)[0]
    shape = net.input_shape if src < 0 else net.layers[src].out_shape
    out = FlattenOp(shape, (math.prod(shape),))
    return Network((*net.layers[:pos], out), net.input_shape, (*net.names[:pos], "output"),
                   model_layers=net.model_layers, runs_in=net.runs_in,
                   inputs=(*net.inputs[:pos], (src,)), model_inputs=net.model_inputs)


def refine_intermediate(net: Network, x_lo: Tensor, x_hi: Tensor, bounds: Sequence[Bounds], *,
                        method: str = "lp", deadline: float | None = None
                        ) -> tuple[Bounds, ...]:
    """Tighter pre-activation bounds: each ReLU layer after the first re-bounded by `method`.

    Layer by layer, the neurons of layer ``k`` its relaxation depends on (its row's
    ``tighten``: a ReLU's unstable ones, ``l < 0 < u``) are bounded by `method`
    on the network truncated before ReLU ``k``, with the already refined bounds of the layers
    before it, and intersected with the given bounds (both sound, so the intersection is).

    Args:
        net: The network (the dtype of its tensors must match the box).
        x_lo, x_hi: The input box `(N, *input_shape)`.
        bounds: Sound bounds of every ReLU input, `(N, *shape)` each, e.g. CROWN's.
        method: A method that refines intermediate bounds (:func:`refiners`): ``"lp"`` (a
            solver's: per sample, one min and one max LP per unstable neuron) or
            ``"alpha-crown"`` (batched).
        deadline: A ``time.perf_counter()`` value; once it has passed, the neurons not yet
            refined keep their given bounds (sound, only looser). With a deadline the LPs are
            solved :data:`REFINE_ROWS` neurons at a time so that it is checked often.

    Returns:
        One :class:`Bounds` per ReLU, each within the given one.

    With ``net.runs_in`` (bounds that also cover the model's own forward pass) each truncated
    network keeps it, so `method` accounts for the model's rounding into every activation
    before layer ``k``; the rounding of the chain into layer ``k`` itself (which a method
    leaves to :func:`~certify.bounds.compute_bounds`) widens the method's bounds before they
    are intersected.
    """
    allowed = refiners()
    if method not in allowed:
        raise SpecError(f"refine_intermediate: method must be "
                        f"{' or '.join(map(repr, allowed))}, got {method!r}.")
    refined = [Bounds(b.lower.clone(), b.upper.clone()) for b in bounds]
    positions = net.relu_positions
    n = x_lo.shape[0]
    bounder = get_method(method)
    for k in range(1, len(positions)):
        trunc = _truncated(net, positions[k])
        shape = refined[k].lower.shape[1:]
        lo = refined[k].lower.reshape(n, -1).clone()
        hi = refined[k].upper.reshape(n, -1).clone()
        # the neurons whose bounds the relaxation depends on (ReLU: l < 0 < u)
        tighten = activation_rule(net.layers[positions[k]]).tighten
        unstable = tighten(lo.reshape(n, *shape), hi.reshape(n, *shape)).reshape(n, -1)
        if not bool(unstable.any()):
            continue
        before = refined[:k]
        # the model's rounding of the chain into layer k (None: the exact network)
        e = None
        if net.runs_in is not None:
            pre = [widen(b, x_lo.dtype) for b in refined[:k + 1]]
            perturbation = model_perturbations(net, x_lo, x_hi, pre)
            assert perturbation is not None
            e = torch.from_numpy(np.asarray(perturbation[k])).to(lo.dtype).reshape(lo.shape)
        # a solver's problems are per sample anyway
        groups = ([[i] for i in range(n) if bool(unstable[i].any())] if bounder.uses_solver
                  else [list(range(n))])
        for samples in groups:
            idx = torch.tensor(samples)
            unstable_rows = torch.nonzero(unstable[idx].any(0)).flatten()
            split = deadline is not None and bounder.uses_solver
            chunks = (torch.split(unstable_rows, REFINE_ROWS) if split else (unstable_rows,))
            for rows in chunks:
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                _refine_rows(bounder, trunc, x_lo, x_hi, idx, rows, lo, hi,
                             tuple(Bounds(b.lower[idx], b.upper[idx]) for b in before), e)
        refined[k] = Bounds(lo.reshape(n, *shape), hi.reshape(n, *shape))
    return tuple(refined)


def _refine_rows(bounder: BoundMethod, trunc: Network, x_lo: Tensor, x_hi: Tensor, idx: Tensor,
                 rows: Tensor, lo: Tensor, hi: Tensor, given: tuple[Bounds, ...],
                 e: Tensor | None) -> None:
    """Intersect ``lo``/``hi`` ``(N, D)`` at samples `idx` and neurons `rows` with `bounder`'s
    bounds of those neurons widened by `e` ``(N, D)`` (the model's rounding of their chain),
    rounded outward (in place)."""
    spec = torch.zeros(len(idx), rows.numel(), lo.shape[1], dtype=lo.dtype)
    spec[:, torch.arange(rows.numel()), rows] = 1.0
    b = bounder.bound(trunc, x_lo[idx], x_hi[idx], spec.to(x_lo.device), intermediate=given)
    found_lo, found_hi = b.lower.to(lo.dtype).cpu(), b.upper.to(hi.dtype).cpu()
    if e is not None:
        widening = e[idx][:, rows]
        found_lo, found_hi = rounding.down(found_lo - widening), rounding.up(found_hi + widening)
    new_lo = torch.maximum(lo[idx][:, rows], found_lo)
    new_hi = torch.minimum(hi[idx][:, rows], found_hi)
    # both are sound; a crossing can only be rounding of an (almost) point interval
    lo[idx[:, None], rows] = torch.minimum(new_lo, new_hi)
    hi[idx[:, None], rows] = torch.maximum(new_lo, new_hi)


# --------------------------------------------------------------------------- one MILP row


def _minimize(model: BoundMilp, c: np.ndarray, time_limit: float, tol: float,
              threshold: float | None = None) -> tuple[float, str]:
    """Sound lower bound of ``min c . v`` (without the constant) and the row's status.

    With a `threshold` the row is only decided against it: the cut ``c . v <= threshold +
    2 tol`` makes the MILP infeasible when the minimum is above that (then the bound is
    ``threshold + tol``, status ``ABOVE``), and HiGHS stops at the first point with
    ``c . v <= threshold`` (status ``BELOW``, the bound is the dual bound reached).
    """
    lp = model.data.lp
    options: dict[str, Any] = {}
    if threshold is None:  # a bound on c . v over the variables' box: never binding
        cut = float(np.maximum(c * lp.lo, c * lp.hi).sum()) + 1.0
    else:
        cut = threshold + 2 * tol
        options["objective_target"] = threshold
    out = model.solve(c, cut, time_limit, options)
    if out.status == solver.INFEASIBLE:
        if threshold is not None:
            return threshold + tol, ABOVE
        return -math.inf, "unknown: HiGHS reported the box infeasible"
    if threshold is not None and out.point is not None and out.value <= threshold:
        return out.dual - tol, BELOW
    if out.status == solver.OPTIMAL:
        return out.dual - tol, OPTIMAL
    reason = (f"time limit {time_limit:g}s" if out.status == solver.TIME_LIMIT else out.status)
    return out.dual - tol, f"unknown: {reason}"
