"""Attacks: FGSM, PGD and the per-sample minimal adversarial eps (upper bounds on the radius).

Every attack works in pixel space on a :class:`~certify.spec.LinfBall`, the L-infinity ball
``{x' : ||x' - x||_inf <= eps}`` intersected with the image domain ``[0, 1]``, one eps per
sample, searched in its **inward**-rounded box (``eps`` rounded down to the inputs' dtype, so a
point found lies within the requested eps in exact arithmetic). There is one PGD (:func:`pgd`):
it takes any success criterion on the logits (default :func:`misclassified`) and a
:class:`~certify.spec.Box` too, which is how :mod:`certify.verify` searches a VNNLIB property.
A counterexample only counts after it is **re-checked** by :func:`recheck`, independently of the
search that produced it: it lies in the region (exactly, with no float slack) and meets the
criterion -- by default the model does not strictly prefer the true class there
(``f_y(x') <= max_{j != y} f_j(x')``). This is the counterpart of the bound engine's strict
``margin lower bound > 0``: a point the attack accepts can never lie in a region the engine
verified, so ``certified eps <= attack eps`` must hold.

References:
    Goodfellow et al., "Explaining and harnessing adversarial examples", ICLR 2015 (FGSM).
    Madry et al., "Towards deep learning models resistant to adversarial attacks", ICLR 2018 (PGD).
    Carlini & Wagner, "Towards evaluating the robustness of neural networks", S&P 2017
    (the margin loss).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from certify.errors import SoundnessError, SpecError, unknown_name
from certify.spec import Box, LinfBall, round_to

LOSSES = ("margin", "ce")
ATTACKS = ("pgd", "fgsm")

#: A success criterion: ``logits (N, K) -> (N,) bool``, True where the point counts (e.g.
#: :func:`misclassified`, or a VNNLIB property's unsafe set).
Criterion = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AttackResult:
    """The outcome of one attack on a batch.

    Attributes:
        x_adv: `(N, C, H, W)` the best point found per sample (lowest margin); the clean input
            where nothing better was found.
        success: `(N,)` bool, True only where `x_adv` passed the re-check (:func:`recheck`):
            inside the region exactly, and meeting the success criterion (by default: not
            strictly classified as the true label).
        margin: `(N,)` the re-checked margin ``f_y - max_{j != y} f_j`` at `x_adv` (with a
            loss callable and no labels: minus that loss; lower is closer to success).
    """

    x_adv: Tensor
    success: Tensor
    margin: Tensor

    def __repr__(self) -> str:
        n = int(self.success.numel())
        return f"AttackResult(n={n}, success={int(self.success.sum())}/{n})"


@dataclass(frozen=True)
class MinimalAdversarial:
    """Per-sample minimal adversarial eps found by bisection over PGD success.

    Attributes:
        eps: `(N,)` float64, the smallest eps at which a re-checked adversarial example was
            found (an upper bound on the distance to the decision boundary); 0 for samples
            misclassified at the clean input; ``inf`` where no attack succeeded up to `eps_max`.
        x_adv: `(N, C, H, W)` the adversarial example at `eps` (the clean input where
            misclassified, and also where none was found).
        found: `(N,)` bool, whether an adversarial example (or a misclassification) was found.
        evaluations: `(N,)` int64, PGD runs spent on each sample.
    """

    eps: Tensor
    x_adv: Tensor
    found: Tensor
    evaluations: Tensor

    def __repr__(self) -> str:
        n = int(self.found.numel())
        finite = self.eps[self.found]
        med = float(finite.median()) if finite.numel() else math.nan
        return f"MinimalAdversarial(n={n}, found={int(self.found.sum())}, median_eps={med:.4g})"


@dataclass(frozen=True)
class AttackCurve:
    """Accuracy under attack over a grid of eps.

    Attributes:
        eps: `(E,)` float64, the grid, increasing.
        accuracy: `(E,)` float64, fraction of samples still correctly classified.
        robust: `(E, N)` bool, per sample: no adversarial example found at this eps or below
            (an example found at a smaller eps also lies in every larger ball).
    """

    eps: Tensor
    accuracy: Tensor
    robust: Tensor


# ----------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """The classification margin ``f_y - max_{j != y} f_j`` per sample.

    Args:
        logits: `(N, K)`.
        labels: `(N,)` int64 in [0, K).
    Returns:
        `(N,)`: positive where the model strictly prefers the true class.
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.amax(dim=1)


def misclassified(labels: Tensor) -> Criterion:
    """The default success criterion: the model does not strictly prefer the true class.

    Args:
        labels: `(N,)` true labels.
    Returns:
        ``criterion(logits (N, K)) -> (N,) bool``, True where ``f_y <= max_{j != y} f_j``.
    """

    def criterion(logits: Tensor) -> Tensor:
        return margins(logits, labels.to(logits.device)) <= 0

    return criterion


def _as_region(region: object, n_labels: int | None) -> LinfBall | Box:
    """The region of an attack: a LinfBall or a Box as given, or a LinfBall from ``(x, eps)``."""
    if isinstance(region, tuple):
        if len(region) != 2:
            raise SpecError(f"region must be a LinfBall or an (x, eps) pair, got a tuple of "
                            f"{len(region)} items")
        x, eps = region
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SpecError(f"x must be an image batch (N, C, H, W), got {shape}")
        eps_t = torch.as_tensor(eps)
        if not bool(torch.isfinite(eps_t).all()) or bool((eps_t < 0).any()):
            raise SpecError(f"eps must be finite and >= 0, got min {float(eps_t.min()):g}, "
                            f"max {float(eps_t.max()):g}")
        region = LinfBall(x, eps)
    if isinstance(region, LinfBall):
        if not bool(torch.isfinite(region.eps).all()):
            raise SpecError(f"eps must be finite and >= 0 for an attack, got max "
                            f"{float(region.eps.max()):g}")
        points = region.center
    elif isinstance(region, Box):
        points = region.lower
    else:
        raise SpecError("region must be a LinfBall, a Box or an (x, eps) pair, got "
                        f"{type(region).__name__}")
    if n_labels is not None and points.shape[0] != n_labels:
        raise SpecError(f"{points.shape[0]} inputs but {n_labels} labels; pass one label per "
                        "input")
    return region


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise SpecError(f"labels must be an integer tensor (N,), got {labels.dtype} "
                        f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise SpecError(f"labels must lie in [0, {num_classes}), got range "
                        f"[{int(labels.min())}, {int(labels.max())}]")


def _project(x_adv: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Project onto the box ``[lower, upper]`` (the region's inner box)."""
    return torch.minimum(torch.maximum(x_adv, lower), upper)


def recheck(model: nn.Module, region: LinfBall | Box, x_adv: Tensor, labels: Tensor | None = None,
            *, success: Criterion | None = None) -> tuple[Tensor, Tensor]:
    """Independent check of candidate counterexamples: the one every attack result passes.

    Computed from scratch (a fresh forward pass in eval mode, an exact membership test of the
    region), never from values a search kept, so a bug in a search cannot make a point count.

    Args:
        model: Classifier on `(N, ...)` inputs.
        region: The region the points must lie in (:meth:`LinfBall.contains`, exactly).
        x_adv: `(N, ...)` candidate points, one per sample of the region.
        labels: `(N,)` true labels, for the default criterion (:func:`misclassified`).
        success: The success criterion on logits; default :func:`misclassified`.
    Returns:
        `(ok (N,) bool, logits (N, K))`: ok where the point is in the region and succeeds.
    Raises:
        SpecError: no criterion and no labels.
    """
    if success is None:
        if labels is None:
            raise SpecError("recheck needs labels or a success criterion")
        success = misclassified(labels)
    with eval_mode(model), torch.no_grad():
        logits = model(x_adv)
        hit = success(logits).to(torch.bool)
    return region.contains(x_adv).to(hit.device) & hit, logits


def _loss(logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    """Per-sample loss to ascend: the negative margin, or cross-entropy."""
    if kind == "margin":
        return -margins(logits, labels)
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def _named_loss(logits: Tensor, *, labels: Tensor, kind: str) -> Tensor:
    return _loss(logits, labels, kind)


def _negative_margin(logits: Tensor, *, labels: Tensor) -> Tensor:
    """The score a named loss keeps the best point by: minus the margin."""
    return -margins(logits, labels)


def _uniform(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [-1, 1) noise drawn on the generator's device, moved to `like`'s device."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return (2 * u - 1).to(like.device)


# ------------------------------------------------------------------------------------ attacks


def pgd(model: nn.Module, region: LinfBall | Box | tuple[Tensor, float | Tensor],
        labels: Tensor | None = None, *, success: Criterion | None = None,
        loss: Literal["margin", "ce"] | Callable[[Tensor], Tensor] = "margin", steps: int = 40,
        step_size: float | Callable[[int], float] | None = None, restarts: int = 1,
        random_start: bool = True, start: Tensor | None = None, patience: int | None = None,
        deadline: float | None = None, generator: torch.Generator | None = None) -> AttackResult:
    """Projected gradient ascent in a region, for any success criterion: the one PGD of certify.

    Ascends the loss with signed-gradient steps of size ``step_size`` times the region's radius
    (``eps_inner`` per sample for a :class:`~certify.spec.LinfBall`, half the width per
    coordinate for a :class:`~certify.spec.Box`), projects onto the region's inward-rounded
    :meth:`inner_box` after every step, keeps per sample the best point over all steps and
    restarts (a success first, then the highest loss; for the default loss, the lowest margin)
    and re-checks those points with :func:`recheck` before reporting success (Madry et al.,
    2018). Samples that already succeeded are not attacked again in later restarts.

    Args:
        model: Classifier taking `(N, ...)` inputs and returning logits `(N, K)`. Put in
            ``eval()`` for the attack; every submodule's previous mode is restored afterwards.
        region: A :class:`~certify.spec.LinfBall` (the clean input is its centre), a
            :class:`~certify.spec.Box`, or a shorthand pair ``(x, eps)`` for
            ``LinfBall(x, eps)``.
        labels: `(N,)` true labels; needed by the default criterion and the named losses.
        success: The success criterion, ``logits (N, K) -> (N,) bool``; default
            :func:`misclassified` (``f_y <= max_{j != y} f_j``).
        loss: What to ascend: ``"margin"`` (minus the Carlini-Wagner margin, the default),
            ``"ce"`` (cross-entropy), or a callable ``logits -> (N,)`` (then also the score the
            best point is kept by).
        steps: Gradient steps per restart (>= 1).
        step_size: Step as a fraction of the radius, or a schedule ``step -> fraction``
            (steps count from 0); default ``2.5 / steps``.
        restarts: Number of runs (>= 1); later runs only attack samples not yet broken.
        random_start: Start each run at a uniform point of the region (else at its centre).
        start: `(N, ...)` explicit starting points (projected into the region); one run only.
        patience: Stop this many steps after the first success of any sample (default: stop
            when every sample succeeded, or after `steps`).
        deadline: A :func:`time.perf_counter` time after which no further step is taken.
        generator: Random generator for the starts (reproducible runs).
    Returns:
        :class:`AttackResult`; ``success[i]`` only after the re-check.
    Raises:
        SpecError: bad shapes, eps < 0, labels out of range, or bad options.
    """
    if steps < 1 or restarts < 1:
        raise SpecError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    if isinstance(loss, str) and loss not in LOSSES:
        raise unknown_name("attack loss", str(loss), LOSSES)
    if (success is None or isinstance(loss, str)) and labels is None:
        raise SpecError("pgd needs labels for the default criterion and the named losses; pass "
                        "labels, or both a success criterion and a loss callable")
    if start is not None and restarts != 1:
        raise SpecError(f"explicit starting points allow one run, got restarts={restarts}")
    if patience is not None and patience < 0:
        raise SpecError(f"patience must be >= 0 steps, got {patience}")
    ball = _as_region(region, None if labels is None else int(labels.shape[0]))
    rel = 0.0
    schedule: Callable[[int], float] | None = None
    if callable(step_size):
        schedule = step_size
    else:
        rel = 2.5 / steps if step_size is None else float(step_size)
        if not rel > 0 or not math.isfinite(rel):
            raise SpecError(f"step_size is a fraction of eps and must be > 0, got {step_size}")
    if isinstance(ball, LinfBall):
        x: Tensor | None = ball.center
        radius = ball.eps_inner.view(-1, *([1] * (ball.center.ndim - 1)))
    else:
        x = None
        radius = ball.radius
    points = ball.center
    if labels is not None:
        labels = labels.to(points.device)
    ascent: Callable[[Tensor], Tensor]
    score: Callable[[Tensor], Tensor]
    if callable(loss):
        ascent = score = loss
    else:
        assert labels is not None  # checked above
        ascent = partial(_named_loss, labels=labels, kind=str(loss))
        score = partial(_negative_margin, labels=labels)
    if success is not None:
        criterion = success
    else:
        assert labels is not None
        criterion = misclassified(labels)

    n = points.shape[0]
    with eval_mode(model):
        best_x = points.detach().clone()
        best_score = torch.full((n,), -math.inf, dtype=points.dtype, device=points.device)
        best_ok = torch.zeros(n, dtype=torch.bool, device=points.device)
        if x is not None:
            with torch.no_grad():
                clean_logits = model(x)
            if labels is not None:
                _check_labels(labels, clean_logits.shape[1])
            best_score = score(clean_logits).to(best_score.dtype)
            best_ok = criterion(clean_logits).to(torch.bool)
        lower, upper = ball.inner_box()
        for _ in range(restarts):
            active = torch.nonzero(~best_ok).flatten()
            if active.numel() == 0:
                break
            lo, hi = lower[active], upper[active]
            if start is not None:
                begin = _project(start[active].to(points.dtype), lo, hi)
            elif random_start:
                noise = _uniform(lo.shape, lo, generator)
                if x is not None:
                    begin = _project(x[active] + radius[active] * noise, lo, hi)
                else:
                    begin = _project(lo + (hi - lo) * (noise + 1) / 2, lo, hi)
            else:
                begin = points[active].clone()
            run = _Run(ascent, score, criterion, patience, deadline,
                       _steps(radius[active], schedule, rel),
                       None if active.numel() == n else active, n)
            run_x, run_score, run_ok = _pgd_run(model, begin, lo, hi, steps, run)
            better = _better(run_ok, run_score, best_ok[active], best_score[active])
            idx = active[better]
            best_x[idx] = run_x[better]
            best_score[idx] = run_score[better]
            best_ok[idx] = run_ok[better]
        ok, logits = recheck(model, ball, best_x, labels, success=criterion)
        margin = margins(logits, labels) if labels is not None else -score(logits)
    return AttackResult(best_x, ok, margin)


@dataclass(frozen=True)
class _Run:
    """What one PGD run ascends, keeps and stops on."""

    ascent: Callable[[Tensor], Tensor]
    score: Callable[[Tensor], Tensor]
    criterion: Criterion
    patience: int | None
    deadline: float | None
    step: Callable[[int], Tensor]
    rows: Tensor | None  # the samples attacked, when not all of them
    n: int  # the number of samples the criterion and the losses are written for

    def full(self, logits: Tensor) -> Tensor:
        """Logits `(N, K)` of every sample (zeros for those not attacked), differentiable."""
        if self.rows is None:
            return logits
        out = logits.new_zeros((self.n, logits.shape[1]))
        return out.index_copy(0, self.rows, logits)

    def part(self, values: Tensor) -> Tensor:
        """The attacked samples' entries of a per-sample `(N,)` tensor."""
        return values if self.rows is None else values[self.rows]


def _steps(radius: Tensor, schedule: Callable[[int], float] | None,
           rel: float) -> Callable[[int], Tensor]:
    """Step sizes by step number: `radius` times the schedule's fraction (or `rel`)."""
    if schedule is None:
        constant = rel * radius
        return lambda _i: constant
    return lambda i: radius * schedule(i)


def _better(ok: Tensor, score: Tensor, best_ok: Tensor, best_score: Tensor) -> Tensor:
    """Where a point beats the best so far: a success first, then a strictly higher score."""
    return (ok & ~best_ok) | ((ok == best_ok) & (score > best_score))


def _pgd_run(model: nn.Module, start: Tensor, lower: Tensor, upper: Tensor, steps: int,
             run: _Run) -> tuple[Tensor, Tensor, Tensor]:
    """One PGD run from `start`; returns the best iterate per sample, its score and success."""
    xa = start.detach()
    n = xa.shape[0]
    best_x = xa.clone()
    best_score = torch.full((n,), -math.inf, dtype=xa.dtype, device=xa.device)
    best_ok = torch.zeros(n, dtype=torch.bool, device=xa.device)
    last = steps
    found = False
    with torch.enable_grad():
        for i in range(steps + 1):
            xa = xa.detach().requires_grad_(True)
            logits = run.full(model(xa))
            with torch.no_grad():
                value = run.part(run.score(logits)).to(best_score.dtype)
                ok = run.part(run.criterion(logits)).to(torch.bool)
            better = _better(ok, value, best_ok, best_score)
            best_x[better] = xa.detach()[better]
            best_score = torch.where(better, value, best_score)
            best_ok = torch.where(better, ok, best_ok)
            if run.patience is None:
                stop = i == steps or bool(best_ok.all())
            else:
                if not found and bool(best_ok.any()):
                    found, last = True, min(steps, i + run.patience)
                stop = i >= last
            if stop or (run.deadline is not None and time.perf_counter() >= run.deadline):
                break
            (grad,) = torch.autograd.grad(run.part(run.ascent(logits)).sum(), xa)
            xa = _project(xa.detach() + run.step(i) * grad.sign(), lower, upper)
    return best_x, best_score, best_ok


def fgsm(model: nn.Module, region: LinfBall | tuple[Tensor, float | Tensor], labels: Tensor, *,
         loss: Literal["margin", "ce"] = "ce") -> AttackResult:
    """Fast gradient sign method: one step of size eps from the clean input (Goodfellow et al.).

    Equivalent to ``pgd(model, region, labels, steps=1, step_size=1.0, random_start=False)``;
    the result is re-checked the same way.

    Args:
        model: Classifier on `(N, C, H, W)` pixels.
        region: A LinfBall or ``(x, eps)`` pair (eps a float or `(N,)`).
        labels: `(N,)` true labels.
        loss: ``"ce"`` (the classic FGSM) or ``"margin"``.
    Returns:
        :class:`AttackResult`.
    """
    return pgd(model, region, labels, steps=1, step_size=1.0, restarts=1, random_start=False,
               loss=loss)


def _run_attack(name: str, model: nn.Module, region: LinfBall, y: Tensor, *, steps: int,
                restarts: int, generator: torch.Generator | None) -> AttackResult:
    if name == "pgd":
        return pgd(model, region, y, steps=steps, restarts=restarts, generator=generator)
    if name == "fgsm":
        return fgsm(model, region, y)
    raise unknown_name("attack", name, ATTACKS)


def accuracy_under_attack(model: nn.Module, x: Tensor, y: Tensor,
                          eps_grid: Sequence[float] | Tensor, attack: str = "pgd", *,
                          steps: int = 40, restarts: int = 1,
                          batch_size: int = 256,
                          generator: torch.Generator | None = None) -> AttackCurve:
    """Accuracy under attack for each eps of a grid.

    A sample counts as robust at eps only if no re-checked adversarial example was found at that
    eps or any smaller one of the grid (an example in a small ball lies in every larger one).

    Args:
        model: Classifier on `(N, C, H, W)` pixels.
        x: `(N, C, H, W)` inputs in [0, 1].
        y: `(N,)` labels.
        eps_grid: Radii, each >= 0 (sorted here).
        attack: ``"pgd"`` or ``"fgsm"``.
        steps, restarts: PGD settings.
        batch_size: Samples per attack call.
        generator: Random generator for PGD starts.
    Returns:
        :class:`AttackCurve` over the sorted grid.
    Raises:
        SpecError: eps < 0, empty grid, shapes.
        UnknownNameError: unknown attack.
    """
    if attack not in ATTACKS:
        raise unknown_name("attack", attack, ATTACKS)
    grid = torch.as_tensor(eps_grid, dtype=torch.float64).flatten().sort().values
    if grid.numel() == 0 or bool((grid < 0).any()) or not bool(torch.isfinite(grid).all()):
        raise SpecError("eps_grid must be a non-empty list of finite eps >= 0, got "
                        f"{grid.tolist()}")
    if batch_size < 1:
        raise SpecError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    robust = torch.ones(grid.numel(), n, dtype=torch.bool)
    for k, e in enumerate(grid.tolist()):
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            xb, yb = x[sl], y[sl]
            # the grid's eps is rounded down to the inputs' dtype: examples lie in its ball
            res = _run_attack(attack, model, LinfBall(xb, e), yb, steps=steps,
                              restarts=restarts, generator=generator)
            robust[k, sl] = ~res.success.cpu()
    robust = robust.cummin(dim=0).values
    return AttackCurve(grid, robust.double().mean(dim=1), robust)


def minimal_adversarial(model: nn.Module, x: Tensor, y: Tensor, *, eps_max: float = 0.5,
                        tol: float = 1e-4, steps: int = 40, restarts: int = 1,
                        generator: torch.Generator | None = None) -> MinimalAdversarial:
    """Per-sample smallest eps at which PGD finds a re-checked adversarial example.

    All samples bisect at once, each with its own bracket ``(lo, hi]``: PGD failed at `lo` (not a
    proof of anything) and a re-checked example was found at `hi`. After a success the upper end
    is tightened to the example's own distance from `x` (rounded up to the input dtype), so the
    result is an upper bound on the distance to the decision boundary and the example is returned.

    Args:
        model: Classifier on `(N, C, H, W)` pixels.
        x: `(N, C, H, W)` inputs in [0, 1].
        y: `(N,)` labels.
        eps_max: Largest eps tried (> 0); samples not broken there get ``inf``.
        tol: Stop when ``hi - lo <= tol`` (> 0).
        steps, restarts: PGD settings for every probe.
        generator: Random generator for PGD starts.
    Returns:
        :class:`MinimalAdversarial`: `eps` is 0 for misclassified samples, ``inf`` where none was
        found; every finite `eps` comes with its re-checked example in `x_adv`.
    Raises:
        SpecError: eps_max <= 0, tol <= 0, shapes, labels.
        SoundnessError: a returned example fails the final re-check (a bug).
    """
    if not (math.isfinite(eps_max) and eps_max > 0):
        raise SpecError(f"eps_max must be finite and > 0, got {eps_max}")
    if not (math.isfinite(tol) and tol > 0):
        raise SpecError(f"tol must be finite and > 0, got {tol}; use e.g. 1e-4")
    n = x.shape[0]
    if y.shape != (n,):
        raise SpecError(f"{n} inputs but labels of shape {tuple(y.shape)}")
    y = y.to(x.device)
    dtype = x.dtype
    with eval_mode(model), torch.no_grad():
        clean_logits = model(x)
        _check_labels(y, clean_logits.shape[1])
        clean = margins(clean_logits, y)
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    x_adv = x.detach().clone()
    evaluations = torch.zeros(n, dtype=torch.int64)
    misclassified = (clean <= 0).cpu()
    hi[misclassified] = 0.0

    def probe(rows: Tensor, eps: Tensor) -> Tensor:
        """Attack `rows` at `eps` (float64, exact in dtype); returns which succeeded."""
        evaluations[rows] += 1
        res = pgd(model, LinfBall(x[rows], eps.to(dtype).to(x.device)), y[rows], steps=steps,
                  restarts=restarts, generator=generator)
        ok = res.success.cpu()
        if bool(ok.any()):
            won = rows[ok]
            x_adv[won] = res.x_adv[ok]
            dist = (res.x_adv[ok].double() - x[won].double()).abs().flatten(1).amax(dim=1).cpu()
            hi[won] = torch.minimum(eps[ok], round_to(dist, dtype, up=True).double())
            lo[won] = torch.minimum(lo[won], hi[won])
        return ok

    rows = torch.nonzero(~misclassified).flatten()
    if rows.numel():
        top = torch.full((rows.numel(),), eps_max, dtype=dtype).double()
        ok = probe(rows, top)
        lo[rows[~ok]] = top[~ok]  # nothing found up to eps_max: hi stays inf
    while True:
        open_ = torch.nonzero(torch.isfinite(hi) & (hi - lo > tol)).flatten()
        if open_.numel() == 0:
            break
        mid = ((lo[open_] + hi[open_]) / 2).to(dtype).double()
        # Rounding to dtype may land on an end; such brackets are as small as dtype allows.
        stuck = (mid <= lo[open_]) | (mid >= hi[open_])
        lo[open_[stuck]] = hi[open_[stuck]]
        open_, mid = open_[~stuck], mid[~stuck]
        if open_.numel() == 0:
            continue
        ok = probe(open_, mid)
        lo[open_[~ok]] = mid[~ok]

    found = torch.isfinite(hi)
    eps_out = hi.clone()
    if bool(found.any()):
        idx = torch.nonzero(found).flatten()
        with eval_mode(model):
            good, _ = recheck(model, LinfBall(x[idx], eps_out[idx].to(dtype).to(x.device)),
                              x_adv[idx], y[idx])
        if not bool(good.all()):
            bad = idx[~good.cpu()].tolist()
            raise SoundnessError(f"minimal_adversarial: stored examples of samples {bad[:5]} fail "
                                 "the re-check at their reported eps")
    return MinimalAdversarial(eps_out, x_adv, found, evaluations)


def min_adversarial_eps(model: nn.Module, x: Tensor, y: Tensor, *, eps_max: float = 0.5,
                        tol: float = 1e-4, steps: int = 40, restarts: int = 1,
                        generator: torch.Generator | None = None) -> Tensor:
    """Per-sample minimal adversarial eps, `(N,)` float64; see :func:`minimal_adversarial`.

    Returns:
        0 where misclassified, ``inf`` where no example was found up to `eps_max`, else the
        smallest eps (within `tol`) at which a re-checked adversarial example was found. Use
        :func:`minimal_adversarial` to also get the examples.
    """
    return minimal_adversarial(model, x, y, eps_max=eps_max, tol=tol, steps=steps,
                               restarts=restarts, generator=generator).eps
