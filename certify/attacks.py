"""Attacks: FGSM, PGD and the per-sample minimal adversarial eps (upper bounds on the radius).

Every attack works in pixel space on the L-infinity ball ``{x' : ||x' - x||_inf <= eps}``
intersected with the image domain ``[0, 1]``, with one eps per sample. An adversarial example
only counts after it is **re-checked** on its own, independently of the search that produced it:
it lies in the ball (exactly, with no float slack), in the domain, and the model does not
strictly prefer the true class there (``f_y(x') <= max_{j != y} f_j(x')``). This is the
counterpart of the bound engine's strict ``margin lower bound > 0``: a point the attack accepts
can never lie in a region the engine verified, so ``certified eps <= attack eps`` must hold.

References:
    Goodfellow et al., "Explaining and harnessing adversarial examples", ICLR 2015 (FGSM).
    Madry et al., "Towards deep learning models resistant to adversarial attacks", ICLR 2018 (PGD).
    Carlini & Wagner, "Towards evaluating the robustness of neural networks", S&P 2017
    (the margin loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from certify.errors import SoundnessError, SpecError, unknown_name

if TYPE_CHECKING:
    from certify.spec import LinfBall

LOSSES = ("margin", "ce")
ATTACKS = ("pgd", "fgsm")


@dataclass(frozen=True)
class AttackResult:
    """The outcome of one attack on a batch.

    Attributes:
        x_adv: `(N, C, H, W)` the best point found per sample (lowest margin); the clean input
            where nothing better was found.
        success: `(N,)` bool, True only where `x_adv` passed the re-check: inside the ball,
            inside the domain, and not strictly classified as the true label.
        margin: `(N,)` the re-checked margin ``f_y - max_{j != y} f_j`` at `x_adv`.
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


def _split_region(region: object, n_labels: int) -> tuple[Tensor, Tensor, tuple[float, float]]:
    """`(x, eps (N,), domain)` from a LinfBall or an ``(x, eps)`` pair, validated."""
    if isinstance(region, tuple):
        if len(region) != 2:
            raise SpecError(f"region must be a LinfBall or an (x, eps) pair, got a tuple of "
                            f"{len(region)} items")
        x, eps = region
        domain = (0.0, 1.0)
    elif hasattr(region, "center") and hasattr(region, "eps"):
        x, eps = region.center, region.eps  # type: ignore[attr-defined]
        domain = tuple(getattr(region, "domain", (0.0, 1.0)))  # type: ignore[assignment]
    else:
        raise SpecError("region must be a LinfBall or an (x, eps) pair, got "
                        f"{type(region).__name__}")
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SpecError(f"x must be an image batch (N, C, H, W), got {shape}")
    n = x.shape[0]
    if n != n_labels:
        raise SpecError(f"{n} inputs but {n_labels} labels; pass one label per input")
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.ndim == 0:
        eps_t = eps_t.expand(n)
    if eps_t.shape != (n,):
        raise SpecError(f"eps must be a float or a tensor of shape ({n},), got "
                        f"{tuple(eps_t.shape)}")
    if not bool(torch.isfinite(eps_t).all()) or bool((eps_t < 0).any()):
        raise SpecError(f"eps must be finite and >= 0, got min {float(eps_t.min()):g}, "
                        f"max {float(eps_t.max()):g}")
    return x, eps_t.contiguous(), (float(domain[0]), float(domain[1]))


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise SpecError(f"labels must be an integer tensor (N,), got {labels.dtype} "
                        f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise SpecError(f"labels must lie in [0, {num_classes}), got range "
                        f"[{int(labels.min())}, {int(labels.max())}]")


def _ball_box(x: Tensor, eps: Tensor, domain: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """The largest float box inside both the exact ball ``|x' - x| <= eps`` and the domain.

    ``x - eps`` and ``x + eps`` are rounded to the nearest float, which can land a hair
    outside the real ball; such ends are moved one float inwards, so every point of the box
    passes the exact re-check.

    Returns:
        `(lower, upper)`, each `(N, C, H, W)` in `x`'s dtype.
    """
    e = eps.view(-1, *([1] * (x.ndim - 1)))
    lower = x - e
    upper = x + e
    xd, ed = x.double(), e.double()
    lower = torch.where(xd - lower.double() > ed, torch.nextafter(lower, x), lower)
    upper = torch.where(upper.double() - xd > ed, torch.nextafter(upper, x), upper)
    return lower.clamp(min=domain[0]), upper.clamp(max=domain[1])


def _project(x_adv: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Project onto the box ``[lower, upper]`` (the eps-ball intersected with the domain)."""
    return torch.minimum(torch.maximum(x_adv, lower), upper)


def _recheck(model: nn.Module, x: Tensor, x_adv: Tensor, labels: Tensor, eps: Tensor,
             domain: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Independent check of candidate adversarial examples.

    Computed from scratch (a fresh forward pass, exact float64 distances), never from values
    the search kept, so a bug in the search cannot make a point count.

    Returns:
        `(success (N,) bool, margin (N,))`.
    """
    with torch.no_grad():
        margin = margins(model(x_adv), labels)
    dist = (x_adv.double() - x.double()).abs().flatten(1).amax(dim=1)
    flat = x_adv.flatten(1)
    in_ball = dist <= eps.double()
    in_domain = (flat >= domain[0]).all(dim=1) & (flat <= domain[1]).all(dim=1)
    finite = torch.isfinite(flat).all(dim=1)
    return (margin <= 0) & in_ball & in_domain & finite, margin


def _loss(logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    """Per-sample loss to ascend: the negative margin, or cross-entropy."""
    if kind == "margin":
        return -margins(logits, labels)
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def _uniform(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [-1, 1) noise drawn on the generator's device, moved to `like`'s device."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return (2 * u - 1).to(like.device)


# ------------------------------------------------------------------------------------ attacks


def pgd(model: nn.Module, region: LinfBall | tuple[Tensor, float | Tensor], labels: Tensor, *,
        steps: int = 40, step_size: float | None = None, restarts: int = 1,
        random_start: bool = True, loss: Literal["margin", "ce"] = "margin",
        generator: torch.Generator | None = None) -> AttackResult:
    """Projected gradient descent in the L-infinity ball intersected with the image domain.

    Ascends the loss with signed-gradient steps of size ``step_size * eps`` (per sample), projects
    after every step, keeps each sample's lowest-margin point over all steps and restarts, and
    re-checks those points independently before reporting success (Madry et al., 2018). Samples
    that already succeeded are not attacked again in later restarts.

    Args:
        model: Classifier taking `(N, C, H, W)` pixels and returning logits `(N, K)`. Put in
            ``eval()`` for the attack; every submodule's previous mode is restored afterwards.
        region: A :class:`certify.spec.LinfBall`, or a pair ``(x, eps)`` with `x` `(N, C, H, W)`
            in [0, 1] and `eps` a float or `(N,)` (domain [0, 1]).
        labels: `(N,)` true labels.
        steps: Gradient steps per restart (>= 1).
        step_size: Step as a fraction of each sample's eps; default ``2.5 / steps``.
        restarts: Number of runs (>= 1); later runs only attack samples not yet broken.
        random_start: Start each run at a uniform point of the ball (else at `x`).
        loss: ``"margin"`` (Carlini-Wagner margin, the default) or ``"ce"`` (cross-entropy).
        generator: Random generator for the starts (reproducible runs).
    Returns:
        :class:`AttackResult`; ``success[i]`` only after the re-check.
    Raises:
        SpecError: bad shapes, eps < 0, labels out of range, or bad options.
    """
    if steps < 1 or restarts < 1:
        raise SpecError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    if loss not in LOSSES:
        raise unknown_name("attack loss", str(loss), LOSSES)
    x, eps, domain = _split_region(region, int(labels.shape[0]))
    rel = 2.5 / steps if step_size is None else float(step_size)
    if not rel > 0 or not math.isfinite(rel):
        raise SpecError(f"step_size is a fraction of eps and must be > 0, got {step_size}")
    labels = labels.to(x.device)

    with eval_mode(model):
        with torch.no_grad():
            clean_logits = model(x)
        _check_labels(labels, clean_logits.shape[1])
        best_x = x.detach().clone()
        best_margin = margins(clean_logits, labels)
        lower, upper = _ball_box(x, eps, domain)
        step = (rel * eps).view(-1, *([1] * (x.ndim - 1)))
        for _ in range(restarts):
            active = torch.nonzero(best_margin > 0).flatten()
            if active.numel() == 0:
                break
            xs, ys, st = x[active], labels[active], step[active]
            lo, hi = lower[active], upper[active]
            if random_start:
                e = eps[active].view(-1, *([1] * (x.ndim - 1)))
                start = _project(xs + e * _uniform(xs.shape, xs, generator), lo, hi)
            else:
                start = xs.clone()
            run_x, run_margin = _pgd_run(model, xs, ys, start, lo, hi, st, steps, loss)
            better = run_margin < best_margin[active]
            idx = active[better]
            best_x[idx] = run_x[better]
            best_margin[idx] = run_margin[better]
        success, margin = _recheck(model, x, best_x, labels, eps, domain)
    return AttackResult(best_x, success, margin)


def _pgd_run(model: nn.Module, x: Tensor, labels: Tensor, start: Tensor, lower: Tensor,
             upper: Tensor, step: Tensor, steps: int, loss: str) -> tuple[Tensor, Tensor]:
    """One PGD run from `start`; returns the lowest-margin iterate per sample and its margin."""
    xa = start.detach()
    best_x = xa.clone()
    best_margin = torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    with torch.enable_grad():
        for i in range(steps + 1):
            xa = xa.detach().requires_grad_(True)
            logits = model(xa)
            margin = margins(logits, labels).detach()
            better = margin < best_margin
            best_x[better] = xa.detach()[better]
            best_margin = torch.where(better, margin, best_margin)
            if i == steps or bool((best_margin <= 0).all()):
                break
            (grad,) = torch.autograd.grad(_loss(logits, labels, loss).sum(), xa)
            xa = _project(xa.detach() + step * grad.sign(), lower, upper)
    return best_x, best_margin


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


def _run_attack(name: str, model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, *, steps: int,
                restarts: int, generator: torch.Generator | None) -> AttackResult:
    if name == "pgd":
        return pgd(model, (x, eps), y, steps=steps, restarts=restarts, generator=generator)
    if name == "fgsm":
        return fgsm(model, (x, eps), y)
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
            eps = torch.full((xb.shape[0],), e, dtype=xb.dtype, device=xb.device)
            res = _run_attack(attack, model, xb, yb, eps, steps=steps, restarts=restarts,
                              generator=generator)
            robust[k, sl] = ~res.success.cpu()
    robust = robust.cummin(dim=0).values
    return AttackCurve(grid, robust.double().mean(dim=1), robust)


def _round_up(value: Tensor, dtype: torch.dtype) -> Tensor:
    """`value` (float64) as `dtype`, rounded up so the result is never below `value`."""
    v = value.to(dtype)
    return torch.where(v.double() < value, torch.nextafter(v, torch.full_like(v, math.inf)), v)


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
        res = pgd(model, (x[rows], eps.to(dtype).to(x.device)), y[rows], steps=steps,
                  restarts=restarts, generator=generator)
        ok = res.success.cpu()
        if bool(ok.any()):
            won = rows[ok]
            x_adv[won] = res.x_adv[ok]
            dist = (res.x_adv[ok].double() - x[won].double()).abs().flatten(1).amax(dim=1).cpu()
            hi[won] = torch.minimum(eps[ok], _round_up(dist, dtype).double())
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
            good, _ = _recheck(model, x[idx], x_adv[idx], y[idx],
                               eps_out[idx].to(dtype).to(x.device), (0.0, 1.0))
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
