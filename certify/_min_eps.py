"""The minimal-eps MILP of :mod:`certify.exact`: the smallest L-inf radius at which a target class
reaches the true one, with ``eps`` as a variable (one MILP per target class).

The network is encoded as for the ``milp`` bound method (:mod:`certify.bounds.encoding`: the
relaxation's rows plus each activation's exact big-M encoding) and solved by
:mod:`certify.bounds.solver` (:class:`~certify.bounds.solver.RadiusMilp`). HiGHS works to the
tolerance ``TAU``; ``SAFETY * (TAU * (sum of the variables' box widths + cap) + TAU)`` is
subtracted from its dual bounds (see :mod:`certify.bounds.milp` and :mod:`certify.exact`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from certify.bounds import Bounds, Network, get_method, solver
from certify.bounds.encoding import LinearProgram, encode, widen
from certify.bounds.milp import check_solver
from certify.bounds.network import fold_spec
from certify.bounds.solver import SAFETY, TAU, MilpOutcome, RadiusMilp

__all__ = ["MinEpsOutcome", "solve_min_eps"]


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
        f64, cpu = torch.float64, torch.device("cpu")
        encoding = encode(fold_spec(net, spec))
        pre = [widen(Bounds(b.lower.detach().to(cpu, f64), b.upper.detach().to(cpu, f64)),
                     b.lower.dtype) for b in intermediate]
        pre0 = [(lo[0], hi[0]) for lo, hi in pre]
        lo64 = x_lo.detach().to(cpu, f64).flatten(1).numpy()[0]
        hi64 = x_hi.detach().to(cpu, f64).flatten(1).numpy()[0]
        x0 = x.flatten().numpy()
        problem = encoding.lp(0, lo64, hi64, pre0)
        data = encoding.milp(problem, pre0)
        self.milp = RadiusMilp(data, x0, cap)
        self.problem = problem
        self.cap = float(cap)
        self.d = x0.shape[0]
        self.tolerance = SAFETY * (TAU * (data.width + cap) + TAU)
        # classes whose margin row is > 0 on the whole box: no example of theirs up to cap
        widened = tuple(Bounds(torch.from_numpy(lo).reshape(b.lower.shape),
                               torch.from_numpy(hi).reshape(b.upper.shape))
                        for (lo, hi), b in zip(pre, intermediate, strict=True))
        self.ruled_out = _ruled_out(net, x_lo, x_hi, spec, widened, problem, targets)

    def solve(self, s: int, limit: float, time_limit: float, gap: float) -> MilpOutcome:
        """``min eps`` with ``f_j >= f_y`` for spec row `s` (``(e_y - e_j) . f <= 0``)."""
        return self.milp.solve(self.problem.objectives[s], -self.problem.constants[s], limit,
                               time_limit, {"mip_abs_gap": gap, "mip_rel_gap": 0.0})


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
    from every dual bound (and from the cap of an infeasible class); see
    :mod:`certify.bounds.milp`.

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

    check_solver()
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
        if out.status == solver.INFEASIBLE:
            lowers[j] = current - model.tolerance
            continue
        lowers[j] = out.dual - model.tolerance
        if out.status != solver.OPTIMAL:
            reason = (f"time limit {time_limit:g}s" if out.status == solver.TIME_LIMIT
                      else out.status)
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
               intermediate: Sequence[Bounds], problem: LinearProgram,
               targets: list[int]) -> set[int]:
    """Target classes whose margin row is proven > 0 on the whole box (no MILP needed).

    CROWN with the given (widened) intermediate bounds first, counted only above a margin for
    its own float64 rounding; the rows it cannot settle get the LP's rigorous dual bound
    (:func:`certify.bounds.solver.lp_rows`).
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
        lp_lower, _ = solver.lp_rows(problem.rows(rest), solver.DEFAULT_LP_SOLVER)
        out |= {targets[s] for s, value in zip(rest, lp_lower, strict=True) if value > 0}
    return out
