"""Exact minimal adversarial eps per sample, by MILP: the truth between certified and attack eps.

For a correctly classified sample ``(x, y)`` the exact radius is

    eps* = min { eps : some x' with |x' - x|_inf <= eps, x' in [0, 1], has f_j(x') >= f_y(x')
                 for a class j != y },

the distance to the decision boundary (a tie counts as adversarial, as for the attacks of
:mod:`certify.attacks`). Every sound certified eps is below it and every attack eps above it:
**certified <= exact <= attack**, and certified/exact is the honest tightness of a relaxation.

**How: eps as a variable, one MILP per target class** (:func:`certify._min_eps.solve_min_eps`),
not bisection on the MILP verdict. ``min eps`` subject to the network's big-M encoding and
``f_j(x') >= f_y(x')`` gives the radius itself (to the solver's gap `tol`) with at most ``K - 1``
MILPs, where bisection needs ``(K - 1) * log2(eps_max / tol)`` verification MILPs of the same size
and ends with a bracket, not a value; and each class after the first only searches below the best
eps found so far, so most are pruned quickly (and classes whose margin CROWN or the LP proves
positive on the whole box need no MILP at all). The price: the big-M constants must hold for
every eps the MILP may take, so the intermediate bounds are computed for the box of radius
``cap = min(attack eps, eps_max)`` (the attack eps is an upper bound on eps*, so nothing is
lost), which is looser than at eps* itself; once a class's MILP finds an example well inside the
box (below 0.9 times its radius), the box, its bounds and the MILP are rebuilt at that eps for
the classes still to solve. A stronger attack (a smaller cap) makes the MILPs much easier.

**Tolerance, stated and used conservatively.** HiGHS works to feasibility tolerances ``TAU =
1e-9`` (see :mod:`certify.bounds.milp`), so its numbers are reported as an interval:

- ``exact_lo``: the smallest dual bound over classes minus ``tolerance = SAFETY * (TAU * (sum of
  the variables' box widths + cap) + TAU)`` (``SAFETY = 10``), per sample; below it there is no
  adversarial example (up to that stated tolerance: a solver's dual bound is not a proof the way
  :mod:`certify.bounds.lp`'s dual evaluation is -- certified radii never rest on it).
- ``exact_hi``: the eps of the MILP's best point after a **re-check** in float64 (a fresh forward
  pass of the network, the point clipped into [0, 1]): an adversarial example in the sense above
  exists there, up to float64 evaluation noise (``margin <= 1e-12 (1 + max |f|)`` counts: the
  optimum is a tie ``f_j = f_y``). HiGHS's point satisfies ``f_j >= f_y`` only up to its
  tolerance; if the re-check fails, the point is pushed across the boundary along the margin's
  gradient sign (a slightly larger eps) and re-checked again. Without a re-checked point,
  ``exact_hi`` is the attack eps (also re-checked, by the attack) or ``inf``.
- ``exact_eps = exact_hi`` when the status is ``optimal`` (then ``exact_hi - exact_lo <= tol +
  tolerance``, up to the push); ``inf`` with status ``above_max`` (no adversarial example up to
  ``eps_max``); NaN with status ``unknown`` (a time limit or solver failure; `reason` says which
  class and why), where ``[exact_lo, exact_hi]`` still brackets it.

:func:`check_sandwich` checks ``certified <= exact_hi`` and ``exact_lo <= attack`` per sample,
allowing ``tolerance + SANDWICH_ATOL`` (``1e-6``: the attack and the bound methods evaluate the
model in float32, the MILP in float64); a violation is a bug and raises
:class:`~certify.errors.SoundnessError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from certify.errors import SoundnessError, SpecError

if TYPE_CHECKING:
    from certify.bounds import Network

__all__ = ["SANDWICH_ATOL", "STATUSES", "ExactResult", "check_sandwich", "exact_radii"]

#: Per-sample outcomes: the radius is known, above eps_max, or not determined.
STATUSES = ("optimal", "above_max", "unknown")
#: Slack of the sandwich check on top of the MILP tolerance (float32 vs float64 evaluation).
SANDWICH_ATOL = 1e-6
#: Pushes of a MILP point that does not re-check (see ``_recheck``).
PUSH_TRIES = 12
#: Relative float64 noise of a re-checked margin: ``margin <= NOISE * (1 + max |f|)`` counts.
NOISE = 1e-12


@dataclass(frozen=True)
class ExactResult:
    """Per-sample exact minimal adversarial eps of one batch.

    Attributes:
        index: `(N,)` int64 sample positions.
        label: `(N,)` int64 true classes.
        pred: `(N,)` int64 the model's classes on the clean inputs.
        exact_eps: `(N,)` float64: the exact radius (``exact_hi``) where status is ``optimal``
            (0 where misclassified), ``inf`` for ``above_max``, NaN for ``unknown``.
        exact_lo: `(N,)` float64, a lower bound (within `tolerance`) on the radius.
        exact_hi: `(N,)` float64, the eps of a re-checked adversarial example: the MILP's, or
            else the attack's (``inf`` if neither).
        status: One of :data:`STATUSES` per sample.
        reason: Why a sample is not ``optimal`` (or ``"misclassified"``), else ``""``.
        target: `(N,)` int64, the class of the closest adversarial example found (-1 if none).
        problems: `(N,)` int64, MILPs solved.
        tolerance: `(N,)` float64, the solver tolerance in eps (see the module docstring).
        seconds: `(N,)` float64, time per sample (intermediate bounds and MILPs).
    """

    index: Tensor
    label: Tensor
    pred: Tensor
    exact_eps: Tensor
    exact_lo: Tensor
    exact_hi: Tensor
    status: tuple[str, ...]
    reason: tuple[str, ...]
    target: Tensor
    problems: Tensor
    tolerance: Tensor
    seconds: Tensor

    def __repr__(self) -> str:
        n = int(self.index.numel())
        counts = ", ".join(f"{s}={self.status.count(s)}" for s in STATUSES if s in self.status)
        return f"ExactResult(n={n}, {counts}, seconds/sample={float(self.seconds.mean()):.3g})" \
            if n else "ExactResult(n=0)"

    @property
    def known(self) -> Tensor:
        """`(N,)` bool: samples whose exact eps is determined (status ``optimal``)."""
        return torch.tensor([s == "optimal" for s in self.status], dtype=torch.bool)


def _ball_box(x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The box of the ball ``{|x' - x| <= eps} ∩ [0, 1]`` of float64 inputs `(N, ...)`: its
    :meth:`LinfBall.box <certify.spec.LinfBall.box>` (ends rounded outward), over images
    `(N, C, H, W)` (other shapes are viewed as `(N, 1, 1, D)`)."""
    from certify.spec import LinfBall

    images = x if x.ndim == 4 else x.reshape(x.shape[0], 1, 1, -1)
    lo, hi = LinfBall(images, eps).box()
    return lo.view_as(x), hi.view_as(x)


def _margin64(net: Network, x: Tensor, label: int) -> tuple[float, Tensor, float]:
    """``f_y - max_{j != y} f_j`` at `x` `(1, ...)` in float64, its gradient (flat) and
    ``max |f|`` (the scale of its rounding noise)."""
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = net(xg).flatten()
        others = torch.cat([out[:label], out[label + 1:]])
        margin = out[label] - others.max()
        (grad,) = torch.autograd.grad(margin, xg)
    return float(margin.detach()), grad.flatten(), float(out.detach().abs().max())


def _recheck(net: Network, x: Tensor, point: Tensor, label: int) -> tuple[float, Tensor] | None:
    """The eps of an adversarial example at or just beyond `point`, re-checked; None if none.

    `point` `(D,)` is clipped into ``[0, 1]``; it counts if the float64 margin there is at most
    :data:`NOISE` times ``1 + max |f|`` (float64 evaluation noise: a tie counts as adversarial).
    Otherwise (the solver's tolerance) it is pushed across the boundary: moved by ``delta``
    against the margin's gradient sign -- from the point itself, then from random points at
    distance ``delta`` (the point is often a kink of the network, where one-sided gradients
    mislead) -- with ``delta`` from the linearized distance to the boundary, doubled up to
    :data:`PUSH_TRIES` times.
    """
    x0 = x.flatten()
    point = point.clamp(0.0, 1.0)
    margin, grad, scale = _margin64(net, point.view_as(x), label)
    if margin <= NOISE * (1 + scale):
        return float((point - x0).abs().max()), point
    g1 = float(grad.abs().sum())
    delta = max(2 * margin / g1 if g1 > 0 else 0.0, 1e-12)
    gen = torch.Generator().manual_seed(0)
    for attempt in range(PUSH_TRIES):
        start = point
        if attempt:
            signs = torch.randint(0, 2, point.shape, generator=gen).to(point.dtype) * 2 - 1
            start = (point + delta * signs).clamp(0.0, 1.0)
        _, g_start, _ = _margin64(net, start.view_as(x), label)
        cand = (start - delta * g_start.sign()).clamp(0.0, 1.0)
        m_cand, _, s_cand = _margin64(net, cand.view_as(x), label)
        if m_cand <= NOISE * (1 + s_cand):
            return float((cand - x0).abs().max()), cand
        delta *= 2
    return None


def exact_radii(model: nn.Module | Network, x: Tensor, y: Tensor, *, eps_max: float = 0.5,
                attack_eps: Tensor | None = None, tol: float = 1e-6, time_limit: float = 60.0,
                intermediate_method: str = "lp", index: Tensor | None = None,
                certified_eps: Tensor | None = None,
                on_sample: Callable[[int], None] | None = None) -> ExactResult:
    """Per sample, the exact minimal adversarial L-inf eps, by one MILP per target class.

    Args:
        model: Classifier on `(N, *input_shape)` pixels in [0, 1] (a supported ``nn.Sequential``,
            a module with residual Adds or Concats that ``torch.fx`` traces,
            or the engine's ``Network``); evaluated in eval mode.
        x: `(N, *input_shape)` inputs in [0, 1], e.g. `(N, C, H, W)`.
        y: `(N,)` labels.
        eps_max: Largest eps of interest (> 0); radii above it are reported as ``inf``
            (status ``above_max``).
        attack_eps: `(N,)` eps of re-checked adversarial examples (``inf`` where none), e.g.
            from :func:`certify.attacks.min_adversarial_eps`: caps each search (and the box of
            the intermediate bounds) at ``min(attack_eps, eps_max)``. Default: ``eps_max``.
        tol: Each MILP stops once its best eps is within `tol` of its dual bound (> 0).
        time_limit: Seconds per MILP (> 0); a problem that hits it makes the sample
            ``unknown`` unless its dual bound already rules it out.
        intermediate_method: Pre-activation bounds for the big-M constants, as for the ``milp``
            bound method (default ``"lp"``, the tightest).
        index: `(N,)` sample positions for the result (default ``0..N-1``).
        certified_eps: `(N,)` certified radii of some bound method: if given,
            :func:`check_sandwich` checks them against the result (and `attack_eps`).
        on_sample: Called with a sample's `index` entry when its MILPs are done (progress).

    Returns:
        :class:`ExactResult`.

    Raises:
        SpecError: shapes, labels, eps_max/tol/time_limit <= 0, negative attack eps.
        SoundnessError: a sandwich violation (with `certified_eps` or `attack_eps`).
    """
    from certify._min_eps import solve_min_eps
    from certify.attacks import eval_mode, margins
    from certify.bounds import Bounds, to_network
    from certify.bounds.encoding import require_exact_encoding
    from certify.bounds.milp import MILP

    n = _validate(x, y, eps_max, tol, time_limit)
    attack = _per_sample(attack_eps, n, "attack_eps")
    index = torch.arange(n) if index is None else torch.as_tensor(index).flatten().cpu()
    if index.shape != (n,):
        raise SpecError(f"index must have one entry per sample ({n}), got {tuple(index.shape)}")
    method = MILP(intermediate_method=intermediate_method, time_limit=time_limit)
    f64 = torch.float64
    net = to_network(model, tuple(x.shape[1:])).detach().to(dtype=f64, device="cpu")
    require_exact_encoding(net)  # exact radii need piecewise-linear activations
    start = time.perf_counter()
    with torch.no_grad():
        if isinstance(model, nn.Module):
            with eval_mode(model):
                logits = model(x)
        else:
            logits = model(x)
    if logits.ndim != 2 or logits.shape[0] != n:
        raise SpecError(f"the model must map (N, ...) inputs to logits (N, K), got "
                        f"{tuple(logits.shape)}")
    k = logits.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise SpecError(f"labels must lie in [0, {k}), got range [{int(y.min())}, "
                        f"{int(y.max())}]")
    y = y.cpu().long()
    pred = logits.argmax(1).cpu()
    correct = (pred == y) & (margins(logits.cpu(), y) > 0)

    x64 = x.detach().to("cpu", f64)
    cap = torch.clamp(attack, max=float(eps_max))
    exact = torch.full((n,), math.nan, dtype=f64)
    lo = torch.zeros(n, dtype=f64)
    hi = attack.clone()
    status = ["unknown"] * n
    reason = [""] * n
    target = torch.full((n,), -1, dtype=torch.int64)
    problems = torch.zeros(n, dtype=torch.int64)
    tolerance = torch.zeros(n, dtype=f64)
    seconds = torch.zeros(n, dtype=f64)
    for i in torch.nonzero(~correct).flatten().tolist():
        exact[i], lo[i], hi[i] = 0.0, 0.0, 0.0
        status[i], reason[i] = "optimal", "misclassified"
    rows = torch.nonzero(correct).flatten()
    seconds += (time.perf_counter() - start) / n
    if rows.numel():
        t0 = time.perf_counter()
        box_lo, box_hi = _ball_box(x64[rows], cap[rows])
        inter = method.intermediate(net, box_lo, box_hi)
        share = (time.perf_counter() - t0) / rows.numel()
        for r, i in enumerate(rows.tolist()):
            t1 = time.perf_counter()
            label = int(y[i])
            xi = x64[i:i + 1]

            def rebound(c: float, xi: Tensor = xi) -> tuple[Tensor, Tensor, tuple[Bounds, ...]]:
                lo_c, hi_c = _ball_box(xi, torch.tensor([c], dtype=f64))
                return lo_c, hi_c, method.intermediate(net, lo_c, hi_c)

            out = solve_min_eps(net, xi, label, box_lo[r:r + 1], box_hi[r:r + 1],
                                [Bounds(b.lower[r:r + 1], b.upper[r:r + 1]) for b in inter],
                                cap=float(cap[i]), time_limit=time_limit, gap=tol,
                                rebound=rebound)
            problems[i], tolerance[i] = out.problems, out.tolerance
            lo[i] = out.lower
            found = None
            if out.point is not None:
                found = _recheck(net, x64[i:i + 1], torch.as_tensor(out.point, dtype=f64),
                                 label)
            if found is not None:
                hi[i] = min(float(hi[i]), found[0])
                target[i] = out.target
            if not out.optimal:
                status[i], reason[i] = "unknown", out.reason
            elif found is not None:
                status[i], exact[i] = "optimal", found[0]
            elif out.point is None and float(cap[i]) >= eps_max:
                status[i], exact[i] = "above_max", math.inf
                reason[i] = f"no adversarial example up to eps_max={eps_max:g}"
            elif out.point is None:
                reason[i] = (f"no adversarial example in exact arithmetic up to the attack eps "
                             f"{float(cap[i]):.6g} (its example may be one by float rounding)")
            else:
                reason[i] = (f"the MILP's point at eps {out.value:.6g} did not re-check as "
                             "adversarial")
            seconds[i] += share + time.perf_counter() - t1
            if on_sample is not None:
                on_sample(int(index[i]))
    if on_sample is not None:
        for i in torch.nonzero(~correct).flatten().tolist():
            on_sample(int(index[i]))   # misclassified: nothing to solve
    result = ExactResult(index.to(torch.int64), y, pred.to(torch.int64), exact, lo, hi,
                         tuple(status), tuple(reason), target, problems, tolerance, seconds)
    check_sandwich(result, certified_eps=certified_eps,
                   attack_eps=attack if attack_eps is not None else None)
    return result


def check_sandwich(result: ExactResult, *, certified_eps: Tensor | None = None,
                   attack_eps: Tensor | None = None, method: str = "") -> None:
    """Check ``certified <= exact <= attack`` per sample, within the stated tolerance.

    Violations: ``certified_eps > exact_hi + slack`` (a robustness proof beyond a re-checked
    adversarial example) or ``exact_lo > attack_eps + slack`` (an attack example below the
    exact radius), with ``slack = tolerance + SANDWICH_ATOL``.

    Args:
        result: From :func:`exact_radii`.
        certified_eps: `(N,)` certified radii (or None).
        attack_eps: `(N,)` attack eps (or None; ``inf`` entries are skipped).
        method: Bound method name, for the message.

    Raises:
        SoundnessError: naming the first violating sample.
    """
    slack = result.tolerance + SANDWICH_ATOL
    n = result.index.numel()
    if certified_eps is not None:
        cert = _per_sample(certified_eps, n, "certified_eps")
        bad = cert > result.exact_hi + slack
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0])
            raise SoundnessError(
                f"sample {int(result.index[j])}: certified eps {float(cert[j])!r}"
                f"{' (' + method + ')' if method else ''} > exact eps {float(result.exact_hi[j])!r}"
                " of a re-checked adversarial example: the bound method or the MILP is unsound")
    if attack_eps is not None:
        attack = _per_sample(attack_eps, n, "attack_eps")
        bad = result.exact_lo > attack + slack
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0])
            raise SoundnessError(
                f"sample {int(result.index[j])}: exact eps >= {float(result.exact_lo[j])!r} "
                f"> attack eps {float(attack[j])!r}: the MILP or the attack is unsound")


def _validate(x: Tensor, y: Tensor, eps_max: float, tol: float, time_limit: float) -> int:
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SpecError(f"x must be a float batch (N, C, H, W), got {shape}")
    n = int(x.shape[0])
    if n == 0:
        raise SpecError("x is an empty batch; pass at least one sample")
    if bool(torch.isnan(x).any()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise SpecError("x must lie in [0, 1] (pixel space); models take [0, 1] pixels")
    if not isinstance(y, Tensor) or y.shape != (n,) or y.is_floating_point():
        raise SpecError(f"y must be integer labels of shape ({n},), got "
                        f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    for name, value, example in (("eps_max", eps_max, "0.5"), ("tol", tol, "1e-6"),
                                 ("time_limit", time_limit, "60")):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise SpecError(f"{name} must be a finite number > 0, got {value!r}; e.g. {example}")
    return n


def _per_sample(value: Tensor | None, n: int, name: str) -> Tensor:
    if value is None:
        return torch.full((n,), math.inf, dtype=torch.float64)
    t = torch.as_tensor(value).detach().to(torch.float64).flatten().cpu()
    if t.shape != (n,):
        raise SpecError(f"{name} must have one entry per sample ({n},), got {tuple(t.shape)}")
    if bool(torch.isnan(t).any()) or bool((t < 0).any()):
        raise SpecError(f"{name} must be >= 0 (inf allowed), got min {float(t.min())!r}")
    return t
