"""The per-sample maximal certified eps: a batched, safeguarded root search on the bound margin.

For a sample ``(x, y)`` and a bound method, let ``m(eps)`` be the method's lower bound on the
smallest margin ``f_y - f_j`` over the L-infinity ball of radius eps around x (clipped to
[0, 1]). The method proves robustness at eps iff ``m(eps) > 0``. Robustness at eps implies
robustness at every smaller eps, so each sample keeps a bracket ``[lo, hi]``:

- ``lo`` is an eps where the proof **actually succeeded** (or 0, the clean point, which needs no
  proof: the sample is classified correctly), and is what gets reported — never a midpoint;
- ``hi`` is an eps where the proof failed, or `eps_max`, or the attack eps (where an adversarial
  example exists, so no sound method can succeed).

This stays sound when ``m`` is not monotone in eps: only ``lo`` being verified matters. The
search stops at ``hi - lo <= tol``.

Two searches drive the bracket, both evaluating all still-open samples of the batch in ONE
bound call per step (only their rows are passed):

- ``"bisection"``: the baseline, ``t = (lo + hi) / 2`` (for a method whose failures are most
  often its budget spent, first a closing shot ``hi - tol`` right after a near failure: see
  :func:`certified_radii`).
- ``"fast"``: root finding on the margin value ``m(eps) = 0`` (Brent-style): a first guess from
  the attack eps or the gradient's linearised distance to the boundary, secant extrapolation
  while the upper end's margin is unknown, quadratic interpolation through the bracket ends and
  a third point (regula falsi with the Illinois weighting as fallback), and *closing shots*
  ``lo + tol`` / ``hi - tol`` once the root estimate is within tol of an end, so the search
  finishes from both sides. Bisection steps take over whenever interpolation stops halving the
  bracket. On ReLU networks this needs a handful of bound evaluations per sample where
  bisection needs ``log2((eps_max) / tol)``.

References:
    Brent, "Algorithms for minimization without derivatives", 1973 (safeguarded interpolation).
    Dowell & Jarratt, "A modified regula falsi method", BIT 1971 (the Illinois algorithm).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from certify.attacks import eval_mode, margins
from certify.errors import SoundnessError, SpecError, unknown_name
from certify.records import SampleRow

if TYPE_CHECKING:
    from certify.bounds import BoundMethod, Network

BoundFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``bound_fn(x (n, C, H, W), y (n,), eps (n,)) -> (n,)`` lower bound on the smallest margin."""

SEARCHES = ("fast", "bisection")

# First guess of the fast search, as a fraction of the attack eps (an upper bound on the radius)
# or of the gradient's linearised distance to the decision boundary (an estimate of it).
ATTACK_FRACTION = 0.5
LINEAR_FRACTION = 0.5


# ------------------------------------------------------------------------------ certify_batch


@dataclass(frozen=True)
class CertResult:
    """One bound method on one batch at one eps per sample.

    Attributes:
        method: Bound method name.
        eps: `(N,)` radii.
        verified: `(N,)` bool, ``margin_lower > 0`` (strict).
        margin_lower: `(N,)` lower bound on the smallest margin ``f_y - f_j`` over the ball.
        seconds: Wall time of the bound computation.
    """

    method: str
    eps: Tensor
    verified: Tensor
    margin_lower: Tensor
    seconds: float

    def __repr__(self) -> str:
        n = int(self.verified.numel())
        return f"CertResult({self.method}, verified={int(self.verified.sum())}/{n}, " \
               f"{self.seconds:.3g}s)"


def margin_lower_bound(model: nn.Module | Network, x: Tensor, y: Tensor, eps: Tensor, *,
                       method: str | BoundMethod = "crown", model_rounding: bool | None = None,
                       **options: Any) -> Tensor:
    """The method's lower bound on ``min_j (f_y - f_j)`` over ``clip(x +- eps, 0, 1)``.

    Args:
        model: Classifier on `(N, C, H, W)` pixels, or the engine's ``Network`` of it.
        x: `(N, C, H, W)` inputs in [0, 1].
        y: `(N,)` labels.
        eps: `(N,)` radii.
        method: Bound method name (``certify.bounds.list_methods()``) or a configured method.
        **options: The method's options.
    Returns:
        `(N,)`; robustness is proven where it is > 0.
    """
    from certify.bounds import margin_bounds

    return margin_bounds(model, x, y, eps, method=method, model_rounding=model_rounding,
                         **options).lower.amin(dim=1)


def certify_batch(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor, *,
                  method: str = "crown", **options: Any) -> CertResult:
    """Try to prove robustness of every sample at its eps.

    Args:
        model: Classifier on `(N, C, H, W)` pixels.
        x: `(N, C, H, W)` inputs in [0, 1].
        y: `(N,)` labels.
        eps: A float or `(N,)` radii.
        method: Bound method name.
        **options: The method's options.
    Returns:
        :class:`CertResult` with ``verified = margin_lower > 0``.
    """
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(x.shape[0]).contiguous()
    start = time.perf_counter()
    with eval_mode(model), torch.no_grad():
        lower = margin_lower_bound(model, x, y, eps_t, method=method, **options)
    return CertResult(method, eps_t, lower > 0, lower, time.perf_counter() - start)


# ------------------------------------------------------------------------------- RadiusResult


@dataclass(frozen=True)
class RadiusResult:
    """Per-sample maximal certified eps of one bound method on one batch.

    Attributes:
        index: `(N,)` int64, sample positions in the dataset split.
        label: `(N,)` int64, true classes.
        pred: `(N,)` int64, the model's classes on the clean inputs.
        certified_eps: `(N,)` float64, the largest eps at which the method proved robustness
            (the lower end of the final bracket, an eps where the proof succeeded); 0 where
            misclassified or where nothing above 0 could be proven.
        attack_eps: `(N,)` float64, the attack's eps (upper bound on the radius); ``inf`` where
            unknown.
        search_upper: `(N,)` float64, the final bracket's upper end: an eps where the proof
            failed, or `eps_max`, or the attack eps.
        evaluations: `(N,)` int64, bound evaluations spent per sample.
        seconds: `(N,)` float64, search time attributed to each sample (each bound call's
            time shared equally by the rows it evaluated).
        method: Bound method name.
    """

    index: Tensor
    label: Tensor
    pred: Tensor
    certified_eps: Tensor
    attack_eps: Tensor
    search_upper: Tensor
    evaluations: Tensor
    seconds: Tensor
    method: str

    @property
    def area(self) -> float:
        """Certification area of this batch: the mean certified eps (misclassified count 0)."""
        return float(self.certified_eps.mean()) if self.certified_eps.numel() else math.nan

    def rows(self) -> list[SampleRow]:
        """One :class:`certify.report.results.SampleRow` per sample, for CSV/JSON."""
        return [
            SampleRow(int(i), int(lab), int(p), self.method, float(c), float(a), int(ev),
                      float(s), float(u))
            for i, lab, p, c, a, ev, s, u in zip(
                self.index.tolist(), self.label.tolist(), self.pred.tolist(),
                self.certified_eps.tolist(), self.attack_eps.tolist(),
                self.evaluations.tolist(), self.seconds.tolist(), self.search_upper.tolist(),
                strict=True)
        ]

    def __repr__(self) -> str:
        n = int(self.index.numel())
        evals = float(self.evaluations.double().mean()) if n else math.nan
        return (f"RadiusResult({self.method}, n={n}, area={self.area:.4g}, "
                f"evaluations/sample={evals:.2f})")


# ------------------------------------------------------------------------------------ search


class _Floats:
    """Rounding to the search dtype: every evaluated eps is exactly representable in it."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def cast(self, t: float) -> float:
        """`t` rounded to the nearest value of the dtype."""
        return float(torch.tensor(t, dtype=torch.float64).to(self.dtype))

    def toward(self, t: float, target: float) -> float:
        """The value of the dtype next to `t` (a dtype value) in the direction of `target`."""
        return float(torch.nextafter(torch.tensor(t, dtype=self.dtype),
                                     torch.tensor(target, dtype=self.dtype)))

    def cast_up(self, t: float) -> float:
        """The smallest value of the dtype that is >= `t`."""
        c = self.cast(t)
        return c if c >= t else self.toward(c, math.inf)


#: Interpolation shots aim this many tol above the root estimate (see :meth:`_fast_step`).
AIM_ABOVE = 0.5
#: A method that resumes its failures (``bab``) gets a closing shot just below a failure whose
#: margin bound is above ``-RESUME_GAP`` times the clean margin. On 20 digits MLP points with
#: bab's 3 s limit, the shots after such failures proved (the search's end) where those after
#: failures 15-27% of the clean margin below 0 spent another 3 s and failed.
RESUME_GAP = 0.1


class _Bracket:
    """The search state of one sample: a verified `lo`, an upper end `hi`, evaluated points.

    `hi_kind` says what `hi` is: ``"failed"`` (evaluated, proof failed, `m_hi` known),
    ``"limit"`` (eps_max, not evaluated) or ``"attack"`` (the attack eps, not evaluated; the
    proof must fail there, which is checked before the search ends against it).
    Each evaluation records its kind (``hint``, ``guess``, ``extrapolate``, ``interpolate``,
    ``close-lo``, ``close-hi``, ``bisect``, ``check``) and its side (``lo``: the proof
    succeeded and `lo` moved up; ``hi``: it failed and `hi` moved down); the safeguards read
    these.
    """

    __slots__ = ("lo", "m_lo", "lo_sure", "hi", "m_hi", "hi_kind", "points", "evaluations",
                 "done", "queue", "widths", "kinds", "sides", "pending", "tol", "fast",
                 "max_iter", "floats", "resume", "m0")

    def __init__(self, m0: float, hi: float, hi_kind: str, *, tol: float, fast: bool,
                 max_iter: int, queue: list[tuple[str, float]], floats: _Floats,
                 resume: bool = False) -> None:
        self.lo, self.m_lo = 0.0, m0
        self.m0 = m0  # the clean margin
        self.lo_sure = False  # lo proven by the rigorous bound (no confirmation needed)
        self.hi, self.m_hi, self.hi_kind = hi, math.nan, hi_kind
        self.points: list[tuple[float, float]] = [(0.0, m0)] if math.isfinite(m0) else []
        self.evaluations = 0
        self.done = False
        self.queue = queue  # (kind, eps) to evaluate first: a lower hint, then a first guess
        self.widths: list[float] = [hi]
        self.kinds: list[str] = []
        self.sides: list[str] = []
        self.pending = ""
        self.tol, self.fast, self.max_iter, self.floats = tol, fast, max_iter, floats
        self.resume = resume  # a closing shot just below each failure (resumes_failures)

    # -- proposals --------------------------------------------------------------------------

    def propose(self) -> float | None:
        """The next eps to evaluate, or None when the search of this sample is over."""
        if self.done:
            return None
        if self.evaluations >= self.max_iter:
            self.done = True
            return None
        if self.hi - self.lo <= self.tol:
            if self.hi_kind == "attack":
                self.pending = "check"  # the proof must fail at the attack eps: check it once
                return self.hi
            self.done = True
            return None
        while self.queue:
            kind, queued = self.queue.pop(0)
            inside = self._inside(self.floats.cast(queued))
            if inside is not None:
                self.pending = kind
                return inside
        t = self._fast_step() if self.fast else self._resume_step()
        if t is None:
            self.pending = "bisect"
            t = self._inside(self.floats.cast((self.lo + self.hi) / 2))
        if t is None:  # the bracket is as narrow as the dtype allows
            self.done = True
        return t

    def _inside(self, t: float) -> float | None:
        """`t` if it is a legal point: strictly inside the bracket, or an unevaluated `hi`."""
        if not math.isfinite(t):
            return None
        if self.lo < t < self.hi or (t == self.hi and self.hi_kind != "failed"):
            return t
        if t > self.hi and self.hi_kind != "failed":
            return self.hi
        return None

    def _failed_closing(self, kind: str, side: str) -> bool:
        """Whether the last evaluation was a closing shot of `kind` that did not close."""
        return bool(self.kinds) and self.kinds[-1] == kind and self.sides[-1] == side

    def _close_hi(self) -> float | None:
        """The closing shot from above: the dtype's value nearest ``hi - tol`` within tol."""
        f, hi = self.floats, self.hi
        t = f.cast(hi - self.tol)
        if hi - t > self.tol:
            t = f.toward(t, hi)
        self.pending = "close-hi"
        return self._inside(t)

    def _resume_step(self) -> float | None:
        """For a method whose failures are most often its budget spent: right after a failure
        (not a failed closing shot) whose margin bound is within ``RESUME_GAP`` of the clean
        margin below 0, the closing shot just below it, which resumes the failure's work and
        most often ends the search; else None (bisect)."""
        if (self.resume and self.sides and self.sides[-1] == "hi"
                and self.hi_kind == "failed" and self.kinds[-1] != "close-hi"
                and self.m_hi > -RESUME_GAP * self.m0):
            return self._close_hi()
        return None

    def _fast_step(self) -> float | None:
        lo, hi, tol, f = self.lo, self.hi, self.tol, self.floats
        r = self._estimate()
        if r is None:
            return None
        if r - lo <= tol and not self._failed_closing("close-lo", "lo"):
            # closing shot from below: the root should lie in (lo, lo + tol]
            t = f.cast(lo + tol)
            if t - lo > tol:
                t = f.toward(t, lo)
            self.pending = "close-lo"
            return self._inside(t)
        if (self.hi_kind == "failed" and hi - r <= tol
                and not self._failed_closing("close-hi", "hi")):
            return self._close_hi()
        if math.isfinite(self.m_hi) and self._stalled():
            return None
        self.pending = "interpolate" if math.isfinite(self.m_hi) else "extrapolate"
        if self.pending == "interpolate":
            # a little above the root estimate: a failure there is most often followed by a
            # proof at ``hi - tol`` (taken with the rigorous bound: see RIGOROUS_SHOTS) that
            # ends the search, where a proof just below the root needed a failing shot above
            # it and a confirmation; the secant of a concave margin also aims low
            r = max(r, min(r + AIM_ABOVE * tol, hi - tol))
        return self._inside(f.cast(r))

    def _stalled(self) -> bool:
        """Two evaluations on the same side that did not halve the bracket (Brent's test)."""
        s, w = self.sides, self.widths
        return (len(s) >= 2 and s[-1] == s[-2] and self.kinds[-1] != "bisect"
                and w[-1] > 0.5 * w[-3])

    def _estimate(self) -> float | None:
        """Root estimate of m(eps) = 0 from the evaluated points."""
        lo, hi, m_lo, m_hi = self.lo, self.hi, self.m_lo, self.m_hi
        if not math.isfinite(m_lo):
            return None
        if math.isfinite(m_hi):
            if m_lo - m_hi <= 0:
                return None
            secant = lo + m_lo * (hi - lo) / (m_lo - m_hi)
            others = [p for p in self.points if p[0] not in (lo, hi)]
            if others:
                third = min(others, key=lambda p: max(lo - p[0], p[0] - hi))
                r = _quadratic_root((lo, m_lo), (hi, m_hi), third, lo, hi)
                # trust the parabola only where it agrees with the chord: points straddling a
                # jump of a non-monotone bound give wild parabolas
                if r is not None and abs(r - secant) <= 0.25 * (hi - lo):
                    return r
            # regula falsi; Illinois: halve the margin of an end kept twice in a row
            if self.sides[-2:] == ["hi", "hi"]:
                m_lo = m_lo / 2
            elif self.sides[-2:] == ["lo", "lo"]:
                m_hi = m_hi / 2
            return lo + m_lo * (hi - lo) / (m_lo - m_hi)
        # upper end not evaluated: extrapolate through the two largest verified points
        below = sorted(p for p in self.points if p[0] < lo)
        if not below:
            return None
        e0, m0 = below[-1]
        if m0 <= m_lo:  # not decreasing: grow the bracket geometrically
            return min(hi, max(2 * lo, lo + 2 * self.tol))
        r = lo + m_lo * (lo - e0) / (m0 - m_lo)
        return min(hi, max(r, lo + self.tol))

    # -- updates ----------------------------------------------------------------------------

    def update(self, t: float, m: float, *, rigorous: bool = False) -> None:
        """Record the bound's margin `m` at the evaluated eps `t` (`rigorous`: the margin of
        the rigorous bound, whose proof needs no confirmation)."""
        self.evaluations += 1
        verified = m > 0  # strict; NaN is never verified
        if verified and self.hi_kind == "attack" and t >= self.hi:
            raise SoundnessError(
                f"the bound method proved robustness at eps={t!r}, where the attack found a "
                "re-checked adversarial example: the bound or the attack is unsound")
        if math.isfinite(m):
            self.points.append((t, m))
        self.kinds.append(self.pending)
        if verified:
            self.lo, self.m_lo, self.lo_sure = t, m, rigorous
            self.sides.append("lo")
            if t >= self.hi:  # verified at the upper limit itself
                self.done = True
        else:
            self.hi, self.m_hi, self.hi_kind = t, m, "failed"
            self.sides.append("hi")
        self.widths.append(self.hi - self.lo)
        if self.pending == "check":
            self.done = True


def _quadratic_root(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float],
                    lo: float, hi: float) -> float | None:
    """Root in (lo, hi) of the parabola through three points (Newton's divided differences)."""
    (x0, y0), (x1, y1), (x2, y2) = a, b, c
    if len({x0, x1, x2}) < 3:
        return None
    d01 = (y1 - y0) / (x1 - x0)
    d12 = (y2 - y1) / (x2 - x1)
    d012 = (d12 - d01) / (x2 - x0)
    # y = y0 + d01 (x - x0) + d012 (x - x0)(x - x1)  ->  A x^2 + B x + C
    qa = d012
    qb = d01 - d012 * (x0 + x1)
    qc = y0 - d01 * x0 + d012 * x0 * x1
    scale = max(abs(qb), abs(qc) / max(abs(hi), 1e-30), 1e-300)
    if abs(qa) * max(abs(hi), 1e-30) < 1e-12 * scale:
        return None if qb == 0 else _in(-qc / qb, lo, hi)
    disc = qb * qb - 4 * qa * qc
    if disc < 0:
        return None
    sq = math.sqrt(disc)
    q = -0.5 * (qb + math.copysign(sq, qb))
    roots = [r for r in (q / qa, qc / q if q != 0 else math.nan) if _in(r, lo, hi) is not None]
    if not roots:
        return None
    chord = x0 - y0 * (x1 - x0) / (y1 - y0) if y0 != y1 else (lo + hi) / 2
    return min(roots, key=lambda r: abs(r - chord))  # two roots inside: the one near the chord


def _in(r: float, lo: float, hi: float) -> float | None:
    return r if math.isfinite(r) and lo < r < hi else None


def linear_radius(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """First-order distance to the boundary of the runner-up class, clip-aware, `(N,)` float64.

    Linearises the margin ``f_y - f_j`` (j the runner-up) at x and solves for the smallest eps at
    which the linear model's worst point of ``clip(x +- eps, 0, 1)`` reaches zero; ``inf`` where
    it never does; 0 where misclassified. An estimate (the fast search's first guess), never a
    bound: the true distance can be larger or smaller.

    Args:
        model: Classifier on `(N, C, H, W)` pixels (used as is: put it in eval mode first).
        x: `(N, C, H, W)` inputs in [0, 1].
        y: `(N,)` labels.
    Returns:
        `(N,)` float64 on the CPU.
    """
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        masked = logits.detach().scatter(1, y[:, None], float("-inf"))
        runner = masked.argmax(dim=1)
        margin = (logits.gather(1, y[:, None]) - logits.gather(1, runner[:, None])).squeeze(1)
        (grad,) = torch.autograd.grad(margin.sum(), xg)
    g = grad.detach().flatten(1).double()
    xf = x.detach().flatten(1).double()
    # moving pixel i against its gradient sign decreases the margin by |g_i| per unit, until the
    # pixel reaches the domain boundary at distance `room`
    room = torch.where(g > 0, xf, 1.0 - xf).clamp(min=0)
    slope = g.abs()
    order = room.argsort(dim=1)
    room_s, slope_s = room.gather(1, order), slope.gather(1, order)
    # decrease(eps) = sum_i slope_i * min(eps, room_i): piecewise linear, evaluate at the knots
    cum_full = torch.cumsum(slope_s * room_s, dim=1)            # pixels saturated up to knot k
    rest = slope_s.flip(1).cumsum(1).flip(1)                     # slopes of pixels not saturated
    m = margin.detach().double()[:, None]
    saturated_before = torch.cat([torch.zeros_like(cum_full[:, :1]), cum_full[:, :-1]], 1)
    dec_at_knot = saturated_before + rest * room_s
    k = (dec_at_knot < m).sum(dim=1, keepdim=True)               # first knot where it reaches m
    n_pix = room_s.shape[1]
    kk = k.clamp(max=n_pix - 1)
    before = torch.where(k > 0, cum_full.gather(1, (kk - 1).clamp(min=0)), torch.zeros_like(m))
    active = rest.gather(1, kk)
    eps = ((m - before) / active).squeeze(1)
    eps = torch.where((k.squeeze(1) >= n_pix) | (active.squeeze(1) <= 0), math.inf, eps)
    return torch.where(margin.detach().double() > 0, eps, torch.zeros_like(eps)).cpu()


def certified_radii(model: nn.Module, x: Tensor, y: Tensor,
                    method: str | BoundMethod = "crown", *, eps_max: float = 0.5,
                    tol: float = 1e-4, attack_eps: Tensor | None = None,
                    lower_hint: Tensor | None = None, guess: Tensor | None = None,
                    search: str = "fast", max_iter: int = 64, index: Tensor | None = None,
                    reuse: bool = True, **method_options: Any) -> RadiusResult:
    """Per sample, the largest eps at which `method` proves robustness (within `tol`).

    All open samples of the batch are searched at once, each with its own bracket, with one
    bound call per step on the rows still open. The reported radius is the lower end of the final
    bracket, an eps where the proof succeeded; misclassified samples get 0.

    **Rounding.** The search is steered by the method's fast bound and every radius it reports
    is confirmed by the method's rigorous one (``method.search_pair()``): for the native
    methods, the plain floating-point bound steers, and the *rigorous* bound (every rounding
    accounted for, for the network in exact arithmetic and for the model's own forward pass in
    its dtype; see :mod:`certify.bounds.rounding`), computed in float64, must prove robustness
    at the radius. A closing shot from just below a failure, which most often ends the search
    with a proof, is taken with the rigorous bound at once; any other final proof is confirmed
    after the search, one extra evaluation. Where the rigorous bound does not prove (the fast
    bound's rounding decided in its favour, next to the boundary), eps steps down from the
    search's end until it does (or to 0). A fast "proof" at the attack eps is confirmed the
    same way before it counts as a contradiction. auto_LiRPA's methods steer and the native
    rigorous bound of the same method confirms; ``lp`` and ``milp`` account for rounding
    themselves and are final.

    **Budgeted methods** (``method.resumes_failures``: ``bab``): a failure near the radius is
    most often the time budget spent, and an evaluation just below it restarts from the
    failure's open leaves (another budget on the same tree). So right after a failure whose
    margin bound is within ``RESUME_GAP`` of the clean margin below 0, the bisection first
    tries ``hi - tol``; a proof there ends the search.

    Args:
        model: Classifier on `(N, C, H, W)` pixels; put in ``eval()`` (modes restored after).
        x: `(N, C, H, W)` inputs in [0, 1]; the bounds are computed in x's dtype.
        y: `(N,)` labels.
        method: A name from ``certify.bounds.list_methods()`` or a configured method (any
            :class:`certify.bounds.BoundMethod`).
        eps_max: Upper end of the search (> 0); radii are at most this.
        tol: Final bracket width (> 0).
        attack_eps: `(N,)` eps at which an attack found adversarial examples (``inf`` where
            none): caps the bracket from above. Before a search ends against it, the method is
            evaluated there and must fail.
        lower_hint: `(N,)` a likely lower bound, e.g. a cheaper method's radius; evaluated first
            and used as the lower end only where the proof succeeds there. Default: the radius
            of the method's ``bracket()`` method, if it names one (``bab``: alpha-CROWN's).
        guess: `(N,)` an unverified estimate of each radius: the fast search's first point
            (default ``ATTACK_FRACTION * attack_eps``, else ``LINEAR_FRACTION *``
            :func:`linear_radius`). Only affects the number of evaluations, never soundness.
        search: ``"fast"`` (interpolation on the margin value, safeguarded) or ``"bisection"``.
        max_iter: Most bound evaluations per sample; the bracket may stay wider than `tol` if hit.
        index: `(N,)` sample positions for the result (default ``0..N-1``).
        reuse: Carry what is sound from one evaluation to the next (default): the CROWN
            family's intermediate bounds at a larger eps start those at a smaller eps of the
            same sample (:mod:`certify.bounds.reuse`), ``bab`` restarts from its split trees.
            False: every evaluation from scratch (the baseline of ``benchmarks/bench_scale.py``).
        **method_options: Options of the bound method, e.g. ``steps=20`` for alpha-crown. A
            method that decides a threshold (``milp``) gets ``threshold=0`` by default: the
            search only needs the sign of each margin (each MILP stops once its row is decided;
            see :class:`certify.bounds.milp.MILP`), and bisects (a decided margin is a verdict,
            not a value to interpolate; pass ``threshold=None`` for exact margins and the
            `search` asked for); a MILP that hits its time limit is ``unknown`` and its row
            keeps a sound fallback bound, so it never counts as proven.
    Returns:
        :class:`RadiusResult`.
    Raises:
        SpecError: shapes, eps_max <= 0, tol <= 0, negative attack eps or hint.
        UnknownNameError: unknown method or search.
        SoundnessError: a radius above the attack eps (a bug in the bound or the attack).
    """
    from certify.bounds import to_network
    from certify.bounds.base import resolve_method, with_options

    _validate(x, y, eps_max, tol, max_iter)
    if search not in SEARCHES:
        raise unknown_name("search", search, SEARCHES)
    configured = resolve_method(method, method_options)
    if configured.decides_threshold:
        # the search needs the sign of each margin, not its minimum; a decided margin is a
        # verdict, not a distance to interpolate on, so the search bisects
        if "threshold" not in method_options:
            configured = with_options(configured, {"threshold": 0.0})
        if getattr(configured, "threshold", None) is not None:
            search = "bisection"
    if "optimize_upper" not in method_options and any(
            f.name == "optimize_upper" for f in dataclasses.fields(configured)):  # type: ignore[arg-type]
        # the search reads lower bounds only: no effort on the upper ones
        configured = with_options(configured, {"optimize_upper": False})
    bracket = configured.bracket()
    if bracket is not None and lower_hint is None:
        # a complete method starts from an incomplete one's radius (a proof there is cheap)
        # and the attack's above: each of its evaluations is a proof or a search at one eps
        hint = certified_radii(model, x, y, bracket, eps_max=eps_max, tol=tol,
                               attack_eps=attack_eps, search="fast", max_iter=max_iter,
                               index=index, reuse=reuse)
        result = certified_radii(model, x, y, configured, eps_max=eps_max, tol=tol,
                                 attack_eps=attack_eps, lower_hint=hint.certified_eps,
                                 guess=guess, search=search, max_iter=max_iter, index=index,
                                 reuse=reuse)
        # the bracket's search is part of the method's work
        return dataclasses.replace(result, seconds=result.seconds + hint.seconds,
                                   evaluations=result.evaluations + hint.evaluations)
    # a method that carries something sound from one evaluation to the next (the CROWN
    # family: intermediate bounds at larger eps; bab: its split trees) gets a fresh memory
    if reuse:
        configured = getattr(configured, "searching", lambda: configured)()
    steer, rigorous = configured.search_pair()
    module_bound = configured.takes_module
    net = model if module_bound else to_network(model, tuple(x.shape[1:]))  # once, not per step

    def bound_fn(xs: Tensor, ys: Tensor, eps: Tensor) -> Tensor:
        # the plain bound of the model's perturbed network: close to the rigorous one, so
        # the search's end is almost always confirmed at once
        return margin_lower_bound(net, xs, ys, eps, method=steer,
                                  model_rounding=None if module_bound else True)

    confirm_fn = None
    if rigorous is not None:
        confirm_net = to_network(model, tuple(x.shape[1:])) if module_bound else net

        def confirm_fn(xs: Tensor, ys: Tensor, eps: Tensor) -> Tensor:
            return margin_lower_bound(confirm_net, xs.double(), ys, eps.double(),
                                      method=rigorous)

    return search_radii(model, x, y, bound_fn, confirm_fn=confirm_fn, name=configured.name,
                        eps_max=eps_max, tol=tol, attack_eps=attack_eps,
                        lower_hint=lower_hint, guess=guess, search=search, max_iter=max_iter,
                        index=index, resume_failures=configured.resumes_failures)


def search_radii(model: nn.Module, x: Tensor, y: Tensor, bound_fn: BoundFn, *,
                 confirm_fn: BoundFn | None = None, name: str = "custom",
                 eps_max: float = 0.5, tol: float = 1e-4, attack_eps: Tensor | None = None,
                 lower_hint: Tensor | None = None, guess: Tensor | None = None,
                 search: str = "fast", max_iter: int = 64,
                 index: Tensor | None = None,
                 resume_failures: bool = False) -> RadiusResult:
    """The radius search of :func:`certified_radii` over any margin lower bound.

    Args:
        model: The classifier (its prediction and clean margin open each bracket).
        x, y, eps_max, tol, attack_eps, lower_hint, guess, search, max_iter, index: As for
            :func:`certified_radii`.
        bound_fn: ``bound_fn(x (n, C, H, W), y (n,), eps (n,)) -> (n,)``, a lower bound on
            the smallest margin over the ball: it steers the search.
        confirm_fn: The rigorous margin lower bound (same signature) that must prove every
            radius reported; None: `bound_fn`'s decisions are final.
        name: The method's name in the result.
        resume_failures: With ``search="bisection"``: right after each failure (not a failed
            closing shot) whose margin bound is within ``RESUME_GAP`` of the clean margin
            below 0, evaluate ``hi - tol`` before bisecting (for methods whose failures are
            most often a budget spent, see ``BoundMethod.resumes_failures``).

    Returns:
        :class:`RadiusResult`.
    """
    method = name
    n = _validate(x, y, eps_max, tol, max_iter)
    if search not in SEARCHES:
        raise unknown_name("search", search, SEARCHES)
    dev = x.device
    y = y.to(dev)
    attack = _per_sample(attack_eps, n, "attack_eps", fill=math.inf)
    hint = _per_sample(lower_hint, n, "lower_hint", fill=0.0)
    first = None
    if guess is not None and search == "fast":
        first = _per_sample(guess, n, "guess", fill=math.nan, allow_nan=True)
    index = torch.arange(n) if index is None else torch.as_tensor(index).flatten().cpu()
    if index.shape != (n,):
        raise SpecError(f"index must have one entry per sample ({n}), got {tuple(index.shape)}")

    dtype = x.dtype
    seconds = torch.zeros(n, dtype=torch.float64)
    start = time.perf_counter()
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        if logits.ndim != 2 or logits.shape[0] != n:
            raise SpecError(f"the model must map (N, C, H, W) to logits (N, K), got "
                            f"{tuple(logits.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
            raise SpecError(f"labels must lie in [0, {logits.shape[1]}), got range "
                            f"[{int(y.min())}, {int(y.max())}]")
        pred = logits.argmax(dim=1).cpu()
        clean = margins(logits, y).double().cpu()
        fast = search == "fast"
        if fast and first is None:
            lin = linear_radius(model, x, y)
            first = torch.where(torch.isfinite(attack), attack * ATTACK_FRACTION,
                                lin * LINEAR_FRACTION)
    seconds += (time.perf_counter() - start) / n

    floats = _Floats(dtype)

    brackets: list[_Bracket | None] = []
    for i in range(n):
        correct = bool(pred[i] == y[i].cpu()) and float(clean[i]) > 0
        if not correct:
            brackets.append(None)
            continue
        a = float(attack[i])
        # rounded up to the dtype: the adversarial example lies in that ball too
        hi, kind = ((floats.cast_up(a), "attack") if a < eps_max
                    else (floats.cast(eps_max), "limit"))
        queue = []
        if float(hint[i]) > 0:
            queue.append(("hint", min(float(hint[i]), hi)))
        if first is not None and math.isfinite(float(first[i])) and float(first[i]) > 0:
            queue.append(("guess", min(float(first[i]), hi)))
        brackets.append(_Bracket(float(clean[i]), hi, kind, tol=tol, fast=fast,
                                 max_iter=max_iter, queue=queue, floats=floats,
                                 resume=resume_failures))

    with eval_mode(model), torch.no_grad():
        while True:
            rows, ts = [], []
            for i, b in enumerate(brackets):
                if b is not None:
                    t = b.propose()
                    if t is not None:
                        rows.append(i)
                        ts.append(t)
            if not rows:
                break
            eps = torch.tensor(ts, dtype=torch.float64).to(dtype).to(dev)
            exact = eps.double()  # the same eps for the rigorous bound (ts are on dtype's grid)
            # a shot expected to end the search with a proof is taken with the rigorous bound
            # at once: its proof then needs no confirmation afterwards
            sure = set() if confirm_fn is None else {
                k for k, i in enumerate(rows)
                if brackets[i].pending in RIGOROUS_SHOTS}  # type: ignore[union-attr]
            plain = [k for k in range(len(rows)) if k not in sure]
            values = [math.nan] * len(rows)
            for part, fn in ((plain, bound_fn), (sorted(sure), confirm_fn)):
                if not part:
                    continue
                assert fn is not None
                t0 = time.perf_counter()
                sub = torch.tensor([rows[k] for k in part], device=dev)
                lower = fn(x[sub], y[sub], eps[part] if fn is bound_fn else exact[part])
                if lower.shape != (len(part),):
                    raise SpecError(f"bound_fn must return one margin per row ({len(part)},), "
                                    f"got {tuple(lower.shape)}")
                for k, m in zip(part, lower.double().cpu().tolist(), strict=True):
                    values[k] = m
                if fn is bound_fn and confirm_fn is not None:
                    # a fast proof at the attack eps: confirm it first
                    against = [k for k in part if values[k] > 0
                               and brackets[rows[k]].hi_kind == "attack"  # type: ignore[union-attr]
                               and ts[k] >= brackets[rows[k]].hi]  # type: ignore[union-attr]
                    if against:
                        sub = torch.tensor([rows[k] for k in against], device=dev)
                        again = confirm_fn(x[sub], y[sub], exact[against])
                        for k, m in zip(against, again.double().cpu().tolist(), strict=True):
                            values[k] = m
                seconds[[rows[k] for k in part]] += (time.perf_counter() - t0) / len(part)
            for k, (i, t, m) in enumerate(zip(rows, ts, values, strict=True)):
                brackets[i].update(t, m, rigorous=k in sure)  # type: ignore[union-attr]
        if confirm_fn is not None:
            _confirm(brackets, x, y, confirm_fn, tol, seconds)

    certified = torch.zeros(n, dtype=torch.float64)
    upper = torch.zeros(n, dtype=torch.float64)
    evaluations = torch.zeros(n, dtype=torch.int64)
    for i, b in enumerate(brackets):
        if b is not None:
            certified[i], upper[i], evaluations[i] = b.lo, b.hi, b.evaluations
    bad = certified > attack
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise SoundnessError(f"sample {int(index[j])}: certified eps {float(certified[j])!r} > "
                             f"attack eps {float(attack[j])!r} ({method}): the bound or the attack "
                             "is unsound")
    return RadiusResult(index.to(torch.int64), y.cpu().to(torch.int64), pred.to(torch.int64),
                        certified, attack.clone(), upper, evaluations, seconds, method)


CONFIRM_GROWTH = 8.0
CONFIRM_ROUNDS = 64
#: The shots of the search taken with the rigorous bound: a closing shot from above is
#: expected to prove robustness and end the search there.
RIGOROUS_SHOTS = frozenset({"close-hi"})


def _confirm(brackets: list[_Bracket | None], x: Tensor, y: Tensor, confirm_fn: BoundFn,
             tol: float, seconds: Tensor) -> None:
    """Make each bracket's `lo` an eps where `confirm_fn` (the rigorous bound) proves
    robustness, and its `hi` one where it failed or the search's own upper end.

    `lo` itself is tried first (almost always proven). Where it is not, it becomes `hi`, and
    eps steps down from it by ``d 8^k`` (``d = max(tol, lo 2^-20)``, k = 0, 1, ...) until a
    proof succeeds or 0 is reached (the clean point needs no proof), then bisects until the
    bracket is within `tol` again. One batched call per round; each call counts as an
    evaluation.
    """
    state: dict[int, list[float]] = {}  # i -> [good, bad, first, k]; good < 0: none yet
    candidate: dict[int, float] = {}
    for i, b in enumerate(brackets):
        if b is not None and b.lo > 0 and not b.lo_sure:
            state[i] = [-1.0, math.inf, b.lo, 0.0]
            candidate[i] = b.lo
    for _ in range(CONFIRM_ROUNDS):
        if not candidate:
            break
        rows = list(candidate)
        ts = [candidate[i] for i in rows]
        idx = torch.tensor(rows, device=x.device)
        t0 = time.perf_counter()
        lower = confirm_fn(x[idx], y[idx], torch.tensor(ts, dtype=torch.float64, device=x.device))
        seconds[rows] += (time.perf_counter() - t0) / len(rows)
        candidate = {}
        for i, t, m in zip(rows, ts, lower.double().cpu().tolist(), strict=True):
            b = brackets[i]
            assert b is not None
            b.evaluations += 1
            st = state[i]
            if m > 0:  # strict; NaN is never a proof
                st[0] = t
            else:
                st[1] = t
                b.hi, b.m_hi, b.hi_kind = t, m, "failed"
            good, bad, first, k = st
            if good >= 0 and (bad - good <= tol or not math.isfinite(bad)):
                continue  # confirmed (at the search's own end, or within tol of a failure)
            if good < 0:  # still stepping down
                step = max(tol, first * 2.0**-20)
                nxt = first - step * CONFIRM_GROWTH**k
                if k == 0 and step == tol and first - nxt > tol:
                    # a step of one tol, as computed: a proof there closes the bracket, where
                    # the rounded difference a hair above tol cost one more bisection
                    nxt = math.nextafter(nxt, math.inf)
                st[3] = k + 1
                if nxt <= 0:
                    st[0] = 0.0
                    if bad - 0.0 > tol:
                        candidate[i] = bad / 2
                    continue
                candidate[i] = nxt
            else:  # bisect between the proven and the failed eps
                candidate[i] = (good + bad) / 2
    for i, st in state.items():
        b = brackets[i]
        assert b is not None
        b.lo = max(st[0], 0.0)


def _validate(x: Tensor, y: Tensor, eps_max: float, tol: float, max_iter: int) -> int:
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SpecError(f"x must be an image batch (N, C, H, W), got {shape}")
    n = int(x.shape[0])
    if n == 0:
        raise SpecError("x is an empty batch; pass at least one sample")
    if not isinstance(y, Tensor) or y.shape != (n,) or y.is_floating_point():
        raise SpecError(f"y must be integer labels of shape ({n},), got "
                        f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if not (isinstance(eps_max, (int, float)) and math.isfinite(eps_max) and eps_max > 0):
        raise SpecError(f"eps_max must be a finite number > 0, got {eps_max!r}; e.g. 0.5")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise SpecError(f"tol must be a finite number > 0, got {tol!r}; e.g. 1e-4")
    if max_iter < 1:
        raise SpecError(f"max_iter must be >= 1, got {max_iter}")
    return n


def _per_sample(value: Tensor | None, n: int, name: str, *, fill: float,
                allow_nan: bool = False) -> Tensor:
    if value is None:
        return torch.full((n,), fill, dtype=torch.float64)
    t = torch.as_tensor(value).detach().to(torch.float64).flatten().cpu()
    if t.shape != (n,):
        raise SpecError(f"{name} must have one entry per sample ({n},), got {tuple(t.shape)}")
    if (not allow_nan and bool(torch.isnan(t).any())) or bool((t < 0).any()):
        raise SpecError(f"{name} must be >= 0 (inf allowed), got min {float(t.min())!r}")
    return t
