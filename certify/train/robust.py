"""Robust training and robust re-training: Wong-Kolter, CROWN-IBP, IBP and PGD.

Bound-based methods (``wong-kolter``, ``crown-ibp``, ``ibp``) minimise the robust cross-entropy
of Wong & Kolter, "Provable Defenses against Adversarial Examples via the Convex Outer
Adversarial Polytope", ICML 2018::

    L_rob = CE(z, y),  z_y = 0,  z_j = -J_j(eps)  (j != y)

where ``J_j(eps)`` is the bound method's lower bound of the margin ``f_y - f_j`` over the ball
``clip(x +- eps, 0, 1)`` (:func:`certify.bounds.margin_bounds`). Every point ``x'`` of the ball has
``f_j(x') - f_y(x') <= -J_j``, so ``L_rob >= max_{x'} CE(f(x'), y)``: it bounds the worst-case
loss, and a small ``L_rob`` pushes every ``J_j`` above 0, i.e. towards certified samples. ``pgd``
(Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018) is the
cross-entropy on PGD examples (cross-entropy attack, random start), :func:`certify.attacks.pgd`.

Two schedules run along training (epochs counted as floats, so they move every step):

- eps (:class:`certify.train.schedules.EpsSchedule`): held at ``start`` for ``warmup_epochs``,
  raised linearly to the target over ``ramp_epochs``, then held. A large eps from the first step
  makes bound-based training fail (Wong & Kolter; Gowal et al. 2018).
- kappa, the weight of the clean loss, ``loss = kappa * CE(f(x), y) + (1 - kappa) * L_rob``:
  moved linearly from ``kappa_start`` to ``kappa`` along the same ramp (CROWN-IBP, Zhang et al.,
  ICLR 2020, use ``kappa_start = 1, kappa = 0``). The default is ``kappa = 0`` throughout: the pure
  robust loss of Wong & Kolter.

**BatchNorm and Dropout.** Every robust loss evaluates the model's *eval-mode* function -- the
function the bound engine bounds, ``certify area`` certifies and users deploy: BatchNorm uses its
running statistics, which stay as they are (its affine weight and bias are trained), and Dropout is
the identity. Training the batch-statistics function while certifying the running-statistics one
would train a different network than the one certified. Consequence: robust training of a
BatchNorm architecture *from scratch* trains each BatchNorm as a per-channel affine layer (its
statistics stay 0 and 1); re-training a normally trained model keeps the statistics it learned.
The architectures of Wong & Kolter (``wk-small``, ``wk-large``) and the students (``scn``,
``mlp``) have no BatchNorm.

**Memory.** With gradients on, autograd keeps every intermediate tensor of the bound computation
(the engine's chunking bounds only its working memory): for Wong-Kolter on ``wk-large`` and
3x32x32 inputs that is several GB per sample. So each batch is split into micro-batches whose bound
computation is checkpointed (:func:`torch.utils.checkpoint.checkpoint`): run without keeping its
tensors, then recomputed one micro-batch at a time during the backward pass, so the peak memory is
that of one micro-batch whatever the batch size (the gradient is the same up to float summation
order; the price is a second forward pass of the bound). By default the micro-batch size is
planned at every step (:func:`plan_bound_batch`): the bytes autograd saves for the batch's first
sample are measured, doubled for safety, and as many samples as fit ``bound_memory_mb`` go into
one micro-batch -- the whole batch when it fits, so small networks run unchanged. The plan depends
only on the weights and the batch, so a resumed run makes the same plans. A single sample larger
than the budget still runs (one sample per micro-batch).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.checkpoint import ModelMeta
from certify.errors import SoundnessError, SpecError, unknown_name
from certify.train.loops import Batchable, EpochCallback, Step, TrainConfig, TrainResult
from certify.train.schedules import EpsSchedule
from certify.train.standard import TrainedModel

__all__ = [
    "BOUND_METHODS",
    "ROBUST_LOSSES",
    "ROBUST_METHODS",
    "EpochEvaluator",
    "RobustConfig",
    "RobustEval",
    "RobustLoss",
    "RobustLossInfo",
    "RobustRun",
    "bound_loss",
    "plan_bound_batch",
    "default_ramp",
    "describe_result",
    "evaluate_robust",
    "list_robust_losses",
    "pgd_loss",
    "retrain_checkpoint",
    "robust_cross_entropy",
    "robust_fit",
    "train_robust",
    "worst_case_logits",
]

DEFAULT_BOUND_MEMORY_MB = 2048.0
PGD_CERTIFIER = "crown-ibp"
"""The bound that certifies the held-out slice while training with ``pgd`` (no bound of its own)."""


@dataclass(frozen=True)
class RobustLossInfo:
    """One robust training loss of the registry (:data:`ROBUST_LOSSES`).

    Attributes:
        name: What ``RobustConfig(method=...)`` and ``--robust`` take.
        bound_method: The bound method whose margin lower bounds give the robust cross-entropy
            (Wong & Kolter), or None for the cross-entropy at PGD points (Madry et al.).
        certifier: The bound that certifies the evaluation slice by default.
    """

    name: str
    bound_method: str | None
    certifier: str

    @property
    def uses_attack(self) -> bool:
        """The robust term comes from PGD examples (no bound of its own)."""
        return self.bound_method is None


#: The robust losses by name: the single source of ``--robust``'s choices.
ROBUST_LOSSES: dict[str, RobustLossInfo] = {
    info.name: info for info in (
        RobustLossInfo("ibp", "ibp", "ibp"),
        RobustLossInfo("crown-ibp", "crown-ibp", "crown-ibp"),
        RobustLossInfo("wong-kolter", "wong-kolter", "wong-kolter"),
        RobustLossInfo("pgd", None, PGD_CERTIFIER),
    )
}
BOUND_METHODS = tuple(n for n, info in ROBUST_LOSSES.items() if not info.uses_attack)
ROBUST_METHODS = tuple(ROBUST_LOSSES)


def list_robust_losses() -> list[str]:
    """The names of the robust training losses, bound-based first."""
    return list(ROBUST_LOSSES)


# ------------------------------------------------------------------------------------- losses


def worst_case_logits(lower: Tensor, y: Tensor) -> Tensor:
    """The logits vector ``z`` with ``z_y = 0`` and ``z_j = -J_j`` for ``j != y``.

    Args:
        lower: `(N, K - 1)` margin lower bounds ``J``; column `j` for the `j`-th class other
            than `y` in increasing order (as :func:`certify.bounds.margin_bounds` returns them).
        y: `(N,)` int64 labels.
    Returns:
        `(N, K)`, differentiable with respect to `lower`.
    """
    if lower.ndim != 2 or y.shape != (lower.shape[0],):
        raise SpecError(f"expected margin bounds (N, K-1) and labels (N,), got "
                        f"{tuple(lower.shape)} and {tuple(y.shape)}.")
    n, k = lower.shape[0], lower.shape[1] + 1
    others = torch.ones(n, k, dtype=torch.bool, device=lower.device)
    others[torch.arange(n, device=lower.device), y] = False
    return lower.new_zeros(n, k).masked_scatter(others, -lower)


def robust_cross_entropy(lower: Tensor, y: Tensor, *, reduction: str = "mean") -> Tensor:
    """Wong & Kolter's robust cross-entropy ``CE(-J, y)`` on margin lower bounds.

    It equals ``log(1 + sum_j exp(-J_j))`` per sample, an upper bound on the cross-entropy at
    every point of the region the bounds hold on.

    Args:
        lower: `(N, K - 1)` margin lower bounds, as from :func:`certify.bounds.margin_bounds`.
        y: `(N,)` labels.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (then `(N,)`).
    """
    return F.cross_entropy(worst_case_logits(lower, y), y, reduction=reduction)


def bound_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, *,
               bound_batch_size: int | None = None) -> Tensor:
    """The mean robust cross-entropy of `model` at `eps` under a bound method.

    Args:
        model: A network the bound engine supports; its eval-mode function is bounded.
        x: `(N, C, H, W)` in [0, 1].
        y: `(N,)` labels.
        eps: Radius (>= 0).
        method: A bound method name, e.g. ``wong-kolter``.
        bound_batch_size: Samples per checkpointed bound computation when gradients are on
            (bounds peak memory); ``None``: the whole batch at once.
    Returns:
        A scalar, differentiable with respect to the model's weights.
    """
    n = x.shape[0]
    if bound_batch_size is None or n <= bound_batch_size or not torch.is_grad_enabled():
        return _bound_loss_sum(model, method, eps, x, y) / n
    from torch.utils.checkpoint import checkpoint

    total = x.new_zeros(())
    for start in range(0, n, bound_batch_size):
        sl = slice(start, start + bound_batch_size)
        total = total + checkpoint(partial(_bound_loss_sum, model, method, eps), x[sl], y[sl],
                                   use_reentrant=False)
    return total / n


def plan_bound_batch(model: nn.Module, x: Tensor, y: Tensor, eps: float, method: str, *,
                     memory_mb: float = DEFAULT_BOUND_MEMORY_MB) -> int:
    """Samples per bound computation so that what autograd keeps stays within `memory_mb`.

    Measures the storage autograd saves for the backward pass of the robust loss of the first
    sample (each storage counted once, the model's own parameters and buffers not counted),
    doubles it for safety (other samples may have more unstable neurons), and fits as many
    samples as the budget allows. The probe's graph is discarded.

    Args:
        model: The network (its eval-mode function is bounded).
        x: `(N, C, H, W)` the batch in [0, 1]; only `x[:1]` is probed.
        y: `(N,)` labels.
        eps: The radius of this step.
        method: A bound method name.
        memory_mb: The budget for one micro-batch's saved tensors.
    Returns:
        An int in ``[1, N]``.
    """
    if not memory_mb > 0:
        raise SpecError(f"the bound memory budget must be > 0 MB, got {memory_mb}.")
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probe = _bound_loss_sum(model, method, eps, x[:1], y[:1])
    del probe
    per_sample = 2 * max(1, sum(saved.values()))
    return max(1, min(x.shape[0], int(memory_mb * 2 ** 20 // per_sample)))


def _bound_loss_sum(model: nn.Module, method: str, eps: float, x: Tensor, y: Tensor) -> Tensor:
    from certify.bounds import get_method, margin_bounds

    # a loss proves nothing: the plain floating-point bound (no rounding-error accounting)
    lower = margin_bounds(model, x, y, eps, get_method(method, rigorous=False)).lower
    return robust_cross_entropy(lower, y, reduction="sum")


def pgd_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 10,
             restarts: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Madry et al.'s loss: the mean cross-entropy at PGD examples of the eps-ball ∩ [0, 1].

    The examples come from :func:`certify.attacks.pgd` (cross-entropy ascent from a random
    start, steps of ``2.5 / steps`` of eps, the lowest-margin iterate kept; samples the model
    already gets wrong stay clean), computed without weight gradients.

    Args:
        model: Classifier on `(N, C, H, W)` pixels (attacked in eval mode).
        x: `(N, C, H, W)` in [0, 1].
        y: `(N,)` labels.
        eps: Radius (>= 0); at 0 this is the clean cross-entropy.
        steps, restarts: PGD settings.
        generator: Random starts.
    """
    if eps > 0:
        from certify.attacks import pgd
        from certify.spec import LinfBall

        # training points need no claim: the radius is eps as the inputs' dtype holds it
        region = LinfBall(x, torch.full((x.shape[0],), eps, dtype=x.dtype, device=x.device))
        x = pgd(model, region, y, steps=steps, restarts=restarts, loss="ce",
                generator=generator).x_adv.detach()
    return F.cross_entropy(model(x), y)


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class RobustConfig:
    """How to train robustly (on top of a :class:`certify.train.loops.TrainConfig`).

    Attributes:
        method: A name of :data:`ROBUST_LOSSES`: ``wong-kolter``, ``crown-ibp``, ``ibp``
            (robust cross-entropy on the bound) or ``pgd`` (cross-entropy on PGD examples).
        eps: The eps schedule; its ``final`` value is the training eps.
        kappa: Weight of the clean cross-entropy at the end of the ramp, in [0, 1].
        kappa_start: Its weight before the ramp (moved linearly to `kappa` along the eps ramp);
            ``None``: `kappa` throughout.
        pgd_steps, pgd_restarts: PGD settings of ``pgd`` training.
        bound_batch_size: Samples per checkpointed bound computation (bounds the memory of
            bound-based training); ``None``: planned at every step from `bound_memory_mb`
            (:func:`plan_bound_batch`).
        bound_memory_mb: Budget for the tensors autograd keeps for one micro-batch of the
            bound computation (with ``bound_batch_size=None``).
        eval_samples: After each epoch, clean, PGD and certified accuracy at the final eps on
            the first `eval_samples` test samples; 0 to skip.
        eval_pgd_steps: PGD steps of that evaluation.
        certify_method: The bound that certifies that slice; ``None``: the training bound
            (``crown-ibp`` for ``pgd``).
    """

    method: str
    eps: EpsSchedule
    kappa: float = 0.0
    kappa_start: float | None = None
    pgd_steps: int = 10
    pgd_restarts: int = 1
    bound_batch_size: int | None = None
    bound_memory_mb: float = DEFAULT_BOUND_MEMORY_MB
    eval_samples: int = 200
    eval_pgd_steps: int = 20
    certify_method: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ROBUST_METHODS:
            raise unknown_name("robust training method", str(self.method), ROBUST_METHODS)
        if not isinstance(self.eps, EpsSchedule):
            raise SpecError(f"eps must be an EpsSchedule, got {type(self.eps).__name__}; e.g. "
                            "EpsSchedule(final=0.1, ramp_epochs=5).")
        for name in ("kappa", "kappa_start"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise SpecError(f"{name} is the weight of the clean loss and must be in [0, 1], "
                                f"got {value}.")
        if self.pgd_steps < 1 or self.pgd_restarts < 1 or self.eval_pgd_steps < 1:
            raise SpecError(f"PGD steps and restarts must be >= 1, got pgd_steps="
                            f"{self.pgd_steps}, pgd_restarts={self.pgd_restarts}, "
                            f"eval_pgd_steps={self.eval_pgd_steps}.")
        if self.bound_batch_size is not None and self.bound_batch_size < 1:
            raise SpecError(f"bound_batch_size must be >= 1 or None, got "
                            f"{self.bound_batch_size}.")
        if not (math.isfinite(self.bound_memory_mb) and self.bound_memory_mb > 0):
            raise SpecError(f"bound_memory_mb must be a number > 0, got {self.bound_memory_mb}.")
        if self.eval_samples < 0:
            raise SpecError(f"eval_samples must be >= 0, got {self.eval_samples}.")
        if self.certify_method is not None:
            from certify.bounds import list_methods

            if self.certify_method not in list_methods():
                raise unknown_name("bound method", self.certify_method, list_methods())

    @property
    def loss(self) -> RobustLossInfo:
        """The registry entry of `method`."""
        return ROBUST_LOSSES[self.method]

    @property
    def certifier(self) -> str:
        """The bound method that certifies the evaluation slice."""
        if self.certify_method is not None:
            return self.certify_method
        return self.loss.certifier

    def kappa_at(self, epochs_done: float) -> float:
        """The clean-loss weight after `epochs_done` epochs (a float)."""
        if self.kappa_start is None:
            return self.kappa
        return self.kappa_start + (self.kappa - self.kappa_start) * self.eps.fraction(epochs_done)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, for checkpoint provenance."""
        return {"method": self.method, **self.eps.to_dict(), "kappa": self.kappa,
                "kappa_start": self.kappa if self.kappa_start is None else self.kappa_start,
                "pgd_steps": self.pgd_steps if self.loss.uses_attack else None,
                "pgd_restarts": self.pgd_restarts if self.loss.uses_attack else None,
                "bound_batch_size": self.bound_batch_size,
                "bound_memory_mb": self.bound_memory_mb, "eval_samples": self.eval_samples,
                "eval_pgd_steps": self.eval_pgd_steps, "certify_method": self.certifier}

    def run_tag(self) -> str:
        """What a resumed run must share with the interrupted one (besides the TrainConfig)."""
        e = self.eps
        tag = (f"{self.method}:eps={e.final:g},start={e.start:g},ramp={e.ramp_epochs:g},"
               f"warmup={e.warmup_epochs:g}:kappa={self.to_dict()['kappa_start']:g}->"
               f"{self.kappa:g}")
        return tag + (f":pgd={self.pgd_steps}x{self.pgd_restarts}" if self.loss.uses_attack
                      else "")


@dataclass(frozen=True, eq=False)
class RobustLoss:
    """A :class:`certify.train.loops.LossFn`: ``kappa * CE(f(x), y) + (1 - kappa) * L_rob``.

    Runs the model's eval-mode function (see the module docstring on BatchNorm) and returns
    ``(loss, clean logits)``. PGD random starts come from a generator seeded by `seed` and the
    global step, so a resumed run draws the same starts, on any device.

    Attributes:
        config: The robust recipe.
        seed: Seeds the PGD starts (the training seed).
    """

    config: RobustConfig
    seed: int = 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int,
                 step: Step) -> tuple[Tensor, Tensor]:
        from certify.attacks import eval_mode

        c = self.config
        eps = c.eps.at(step)
        kappa = c.kappa_at(step.epoch_progress)
        with eval_mode(model):
            # at eps = 0 the bounds equal the forward pass: the robust loss is the clean one
            needs_clean_grad = kappa > 0 or eps == 0
            with torch.set_grad_enabled(needs_clean_grad and torch.is_grad_enabled()):
                logits = model(x)
            clean = F.cross_entropy(logits, y) if needs_clean_grad else None
            if eps == 0 or kappa == 1:
                assert clean is not None
                return clean, logits
            robust = self.robust_term(model, x, y, eps, step)
        loss = robust if clean is None else kappa * clean + (1.0 - kappa) * robust
        return loss, logits

    def robust_term(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
                    step: Step) -> Tensor:
        """``L_rob`` at `eps` for this method (bound-based or PGD)."""
        c = self.config
        bound = c.loss.bound_method
        if bound is None:
            generator = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + step.global_step) % (2 ** 63))
            return pgd_loss(model, x, y, eps, steps=c.pgd_steps, restarts=c.pgd_restarts,
                            generator=generator)
        size = c.bound_batch_size
        if size is None and torch.is_grad_enabled() and x.shape[0] > 1:
            size = plan_bound_batch(model, x, y, eps, bound, memory_mb=c.bound_memory_mb)
        return bound_loss(model, x, y, eps, bound, bound_batch_size=size)


# -------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RobustEval:
    """Clean, PGD and certified accuracy at one eps on a slice of samples (fractions).

    A sample counts as robust when it is classified correctly and PGD found no adversarial
    example; as certified when the bound proves every margin positive. Certified samples are
    a subset of robust ones (checked).
    """

    eps: float
    samples: int
    clean_accuracy: float
    pgd_accuracy: float
    certified_accuracy: float
    certify_method: str

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """The numbers as a flat dict for ``ModelMeta.metrics``."""
        return {f"{prefix}clean_accuracy": self.clean_accuracy,
                f"{prefix}pgd_accuracy": self.pgd_accuracy,
                f"{prefix}certified_accuracy": self.certified_accuracy}


@torch.no_grad()
def evaluate_robust(model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
                    certify_method: str = "wong-kolter", pgd_steps: int = 20,
                    pgd_restarts: int = 1, batch_size: int = 200,
                    generator: torch.Generator | None = None) -> RobustEval:
    """Clean, PGD and certified accuracy of `model` at `eps` (eval mode, modes restored).

    Args:
        model: Classifier on `(N, C, H, W)` pixels, on `x`'s device.
        x: `(N, C, H, W)` in [0, 1].
        y: `(N,)` labels.
        eps: Radius (>= 0).
        certify_method: Bound method name for the certified accuracy.
        pgd_steps, pgd_restarts: PGD settings (margin loss, random start).
        batch_size: Samples per bound / attack call.
        generator: PGD starts (reproducible evaluations).
    Raises:
        SpecError: empty `x`, eps < 0.
        SoundnessError: a sample both certified and broken by PGD (a bug).
    """
    from certify.attacks import eval_mode, pgd
    from certify.bounds import margin_bounds
    from certify.spec import LinfBall

    n = x.shape[0]
    if n == 0:
        raise SpecError("cannot evaluate robustness on zero samples.")
    if not (math.isfinite(eps) and eps >= 0):
        raise SpecError(f"eps must be finite and >= 0, got {eps}.")
    y = y.to(x.device)
    correct = torch.zeros(n, dtype=torch.bool)
    robust = torch.zeros(n, dtype=torch.bool)
    certified = torch.zeros(n, dtype=torch.bool)
    with eval_mode(model):
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            xb, yb = x[sl], y[sl]
            ok = (model(xb).argmax(1) == yb).cpu()
            region = LinfBall(xb, torch.tensor(float(eps), dtype=torch.float64))
            attacked = pgd(model, region, yb, steps=pgd_steps,
                           restarts=pgd_restarts, generator=generator).success.cpu()
            # a claim: the rigorous bound, in float64 (tight; it covers the model as it runs
            # in its own dtype too)
            lower = margin_bounds(model, xb.double(), yb, eps, certify_method).lower.amin(1).cpu()
            correct[sl], robust[sl], certified[sl] = ok, ok & ~attacked, ok & (lower > 0)
    broken = certified & ~robust
    if bool(broken.any()):
        i = int(torch.nonzero(broken)[0])
        raise SoundnessError(f"sample {i} is certified by {certify_method} at eps {eps} but PGD "
                             "broke it (or it is misclassified): the bound or the attack is "
                             "unsound")
    return RobustEval(float(eps), n, float(correct.double().mean()),
                      float(robust.double().mean()), float(certified.double().mean()),
                      certify_method)


@dataclass(frozen=True, eq=False)
class EpochEvaluator:
    """The per-epoch hook of robust training (``epoch_metrics`` of :func:`train`).

    Reports the current training eps and the PGD and certified accuracy at the final eps on a
    fixed slice; its PGD starts come from its own generator (seeded the same every epoch), so
    it leaves training unchanged.
    """

    config: RobustConfig
    x: Tensor = field(repr=False)
    y: Tensor = field(repr=False)
    seed: int = 0

    @classmethod
    def on_slice(cls, config: RobustConfig, test_set: Batchable, seed: int) -> EpochEvaluator:
        """On the first ``config.eval_samples`` samples of `test_set`."""
        count = min(config.eval_samples, len(test_set))
        x, y = test_set.take(torch.arange(count))
        return cls(config, x, y, seed)

    def evaluate(self, model: nn.Module) -> RobustEval:
        device = next(iter(model.parameters())).device
        return evaluate_robust(model, self.x.to(device), self.y.to(device),
                               self.config.eps.final, certify_method=self.config.certifier,
                               pgd_steps=self.config.eval_pgd_steps,
                               generator=torch.Generator().manual_seed(self.seed))

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        r = self.evaluate(model)
        return {"eps": self.config.eps.value(epoch), "pgd_accuracy": r.pgd_accuracy,
                "certified_accuracy": r.certified_accuracy}


# --------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class RobustRun:
    """What :func:`robust_fit` did: the loop's result and the final held-out evaluation."""

    result: TrainResult
    final: RobustEval | None


def robust_fit(model: nn.Module, train_set: Batchable, test_set: Batchable | None,
               config: TrainConfig, robust: RobustConfig, *,
               state_path: str | os.PathLike[str] | None = None, resume: bool = False,
               tag: str = "robust", quiet: bool = False,
               on_epoch: EpochCallback | None = None) -> RobustRun:
    """Train `model` in place with the robust loss of `robust` on the shared loop.

    Args:
        model: Any supported network (bound-based methods need layers the engine supports).
        train_set, test_set: Training data; the test set is evaluated each epoch (clean
            accuracy on all of it; PGD and certified accuracy on its first
            ``robust.eval_samples``).
        config: Optimizer, schedule, batches, epochs, seed, device, gradient clipping.
        robust: The robust recipe.
        state_path, resume, tag, quiet, on_epoch: As for :func:`certify.train.loops.train`;
            the robust recipe is added to `tag`, so a state file of another recipe is not
            resumed. Each record's ``metrics`` hold the epoch's eps and its PGD and certified
            accuracy.
    Returns:
        The loop's result and the final evaluation (``None`` without a test set or with
        ``eval_samples = 0``).
    Raises:
        UnsupportedLayerError: a layer the bound engine cannot bound (bound-based methods),
            found before any training.
    """
    from certify.bounds import to_network
    from certify.train.loops import train

    evaluator = None
    if test_set is not None and robust.eval_samples > 0 and len(test_set) > 0:
        evaluator = EpochEvaluator.on_slice(robust, test_set, config.seed)
    if robust.method in BOUND_METHODS or evaluator is not None:
        probe = evaluator.x if evaluator is not None else train_set.take(torch.arange(1))[0]
        to_network(model, probe.shape[1:])
    if not quiet:
        e = robust.eps
        where = (f"; PGD/certified ({robust.certifier}) accuracy at eps {e.final:g} on the "
                 f"first {len(evaluator.x)} test samples" if evaluator is not None else "")
        print(f"robust training: {robust.method}, eps {e.start:g} -> {e.final:g} over "
              f"{e.ramp_epochs:g} epochs (after {e.warmup_epochs:g}), clean-loss weight "
              f"{robust.to_dict()['kappa_start']:g} -> {robust.kappa:g}{where}",
              file=sys.stderr, flush=True)
        _note_batch_norm(model)
    loss = RobustLoss(robust, config.seed)
    result = train(model, train_set, test_set, config, loss, state_path=state_path,
                   resume=resume, tag=f"{tag}:{robust.run_tag()}", quiet=quiet,
                   epoch_metrics=evaluator, on_epoch=on_epoch)
    final = None
    if evaluator is not None:
        last = result.history[-1].metrics if result.history else {}
        if "certified_accuracy" in last:  # measured on the final weights after the last epoch
            final = _with_clean(RobustEval(robust.eps.final, len(evaluator.x), math.nan,
                                           last["pgd_accuracy"], last["certified_accuracy"],
                                           robust.certifier), model, evaluator)
        else:
            final = evaluator.evaluate(model)
    return RobustRun(result, final)


def _with_clean(r: RobustEval, model: nn.Module, evaluator: EpochEvaluator) -> RobustEval:
    """`r` with the clean accuracy on the evaluation slice filled in."""
    from certify.attacks import eval_mode

    device = next(iter(model.parameters())).device
    with eval_mode(model), torch.no_grad():
        pred = model(evaluator.x.to(device)).argmax(1).cpu()
    clean = float((pred == evaluator.y.cpu()).double().mean())
    return RobustEval(r.eps, r.samples, clean, r.pgd_accuracy, r.certified_accuracy,
                      r.certify_method)


def _note_batch_norm(model: nn.Module) -> None:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        print("note: robust training uses the eval-mode function: BatchNorm keeps its running "
              "statistics (only its weight and bias are trained).", file=sys.stderr, flush=True)


def _history(result: TrainResult) -> list[dict[str, Any]]:
    """The per-epoch history kept in the checkpoint: numbers the seed fixes, no wall-clock
    times (the same seed must give the same file, byte for byte)."""
    rows = []
    for r in result.history:
        rows.append({"epoch": r.epoch, "lr": r.lr, "train_loss": r.train_loss,
                     "train_accuracy": r.train_accuracy, "test_accuracy": r.test_accuracy,
                     **r.metrics})
    return rows


def _metrics(run: RobustRun, prefix: str = "") -> dict[str, float]:
    metrics: dict[str, float] = {}
    if run.result.test_accuracy is not None:
        metrics["test_accuracy"] = float(run.result.test_accuracy)
    if run.final is not None:
        metrics |= {"eval_eps": run.final.eps, "eval_samples": run.final.samples,
                    **run.final.as_metrics(prefix)}
    return metrics


def train_robust(arch: str, dataset: str, config: TrainConfig, robust: RobustConfig, *,
                 output: str | os.PathLike[str] | None = None,
                 arch_kwargs: dict[str, Any] | None = None,
                 data_dir: str | os.PathLike[str] | None = None, resume: bool = False,
                 quiet: bool = False) -> TrainedModel:
    """Train a fresh `arch` on `dataset` with a robust loss and save the checkpoint.

    Args:
        arch: Architecture, e.g. ``wk-small``, ``mlp-64-64``, ``scn-32-32``.
        dataset: Dataset name; ``train`` trains, ``test`` evaluates.
        config: The optimizer recipe (its seed also seeds the initialisation).
        robust: The robust recipe.
        output: Checkpoint path (``<output>.partial`` is kept for `resume`); ``None``: not saved.
        arch_kwargs: Builder options overriding the name's.
        data_dir: Where the dataset files are.
        resume: Continue an interrupted run from ``<output>.partial``.
        quiet: No progress output.
    Returns:
        The model (eval mode, CPU) and its metadata: ``training`` holds the robust recipe, the
        optimizer recipe and the per-epoch history; ``metrics`` the test accuracy and the final
        clean / PGD / certified accuracy at the training eps on the evaluation slice.
    Raises:
        UnknownNameError, SpecError: bad architecture or options.
        UnsupportedLayerError: an architecture the bound engine cannot bound.
        DatasetError: missing data files.
    """
    from certify.checkpoint import save_checkpoint
    from certify.data import get_dataset_info, load_dataset
    from certify.train.loops import discard_train_state, partial_path
    from certify.train.standard import init_model

    info = get_dataset_info(dataset)
    model, base, kwargs = init_model(arch, info.input_shape, info.num_classes, mean=info.mean,
                                     std=info.std, seed=config.seed, arch_kwargs=arch_kwargs)
    train_set = load_dataset(dataset, "train", data_dir)
    test_set = load_dataset(dataset, "test", data_dir)
    state = partial_path(output) if output is not None else None
    run = robust_fit(model, train_set, test_set, config, robust, state_path=state,
                     resume=resume, tag="train", quiet=quiet)
    recipe = {"command": "train", **robust.to_dict(), **config.to_dict(),
              "train_samples": len(train_set), "history": _history(run.result)}
    meta = ModelMeta(base, kwargs, info.name, info.input_shape, info.num_classes, info.mean,
                     info.std, training=recipe, metrics=_metrics(run))
    model.cpu()
    if output is not None:
        save_checkpoint(output, model, meta)
        discard_train_state(state)
    return TrainedModel(model, meta, run.result, Path(output) if output is not None else None)


def retrain_checkpoint(path: str | os.PathLike[str], robust: RobustConfig,
                       config: TrainConfig, *, dataset: str | None = None,
                       data_dir: str | os.PathLike[str] | None = None,
                       output: str | os.PathLike[str] | None = None, resume: bool = False,
                       quiet: bool = False) -> TrainedModel:
    """Continue a checkpoint (a distilled student above all) with a robust loss; save it.

    The thesis's "robust re-training for a few epochs" (Wong & Kolter's loss on a distilled
    student). The model keeps its architecture, weights (as the starting point), normalization
    and, for BatchNorm, running statistics.

    Args:
        path: The checkpoint to continue.
        robust: The robust recipe.
        config: The optimizer recipe (fresh optimizer state).
        dataset: Must be the model's (default).
        data_dir: Where the dataset files are.
        output: The new checkpoint; ``None``: not saved.
        resume: Continue an interrupted re-training from ``<output>.partial``.
        quiet: No progress output.
    Returns:
        The re-trained model with ``meta.parent`` the input's sha256, ``meta.training`` the
        recipe (method, eps schedule, kappa, epochs, lr, seed, ..., ``parent_training``: the
        input's own recipe) and ``meta.metrics`` the final and the parent's (``parent_*``)
        accuracies.
    Raises:
        CheckpointError: an unreadable checkpoint.
        DatasetError: missing data, or a dataset other than the model's.
        UnsupportedLayerError: a layer the bound engine cannot bound.
    """
    from certify.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
    from certify.compat import check_compatible
    from certify.data import get_dataset_info, load_dataset
    from certify.model_io import require_checkpoint
    from certify.train.loops import discard_train_state, evaluate, partial_path
    from certify.utils import resolve_device

    path = Path(path)
    require_checkpoint(path, "retrain")
    model, meta = load_checkpoint(path, device=resolve_device(config.device))
    info = get_dataset_info(dataset or meta.dataset)
    check_compatible(meta, info, model_name=path.name, strict=True)
    sha = checkpoint_sha256(path)
    train_set = load_dataset(info.name, "train", data_dir)
    test_set = load_dataset(info.name, "test", data_dir)
    parent_metrics: dict[str, float] = {"parent_test_accuracy": evaluate(model, test_set)}
    if robust.eval_samples > 0:
        ev = EpochEvaluator.on_slice(robust, test_set, config.seed)
        parent = _with_clean(ev.evaluate(model), model, ev)
        parent_metrics |= parent.as_metrics("parent_")
        if not quiet:
            print(f"{path.name}: test accuracy {100 * parent_metrics['parent_test_accuracy']:.2f}"
                  f"%, at eps {robust.eps.final:g}: PGD accuracy {100 * parent.pgd_accuracy:.2f}"
                  f"%, certified ({robust.certifier}) {100 * parent.certified_accuracy:.2f}%",
                  file=sys.stderr, flush=True)
    state = partial_path(output) if output is not None else None
    run = robust_fit(model, train_set, test_set, config, robust, state_path=state,
                     resume=resume, tag=f"retrain:{sha[:16]}", quiet=quiet)
    recipe = {"command": "retrain", **robust.to_dict(), **config.to_dict(),
              "parent_path": str(path), "parent_sha256": sha, "parent_arch": meta.arch,
              "parent_training": meta.training, "train_samples": len(train_set),
              "history": _history(run.result)}
    new_meta = meta.with_updates(training=recipe, parent=sha,
                                 metrics=_metrics(run) | parent_metrics, certify_version="")
    model.cpu()
    if output is not None:
        save_checkpoint(output, model, new_meta)
        discard_train_state(state)
    return TrainedModel(model, new_meta, run.result, Path(output) if output is not None else None)


def describe_result(trained: TrainedModel) -> str:
    """One line for the CLI: test accuracy and the final PGD / certified accuracy."""
    m = trained.meta.metrics
    t = trained.meta.training
    line = f"test accuracy {100 * m['test_accuracy']:.2f}%"
    if "certified_accuracy" in m:
        line += (f"; at eps {m['eval_eps']:g} on {int(m['eval_samples'])} test samples: PGD "
                 f"accuracy {100 * m['pgd_accuracy']:.2f}%, certified "
                 f"({t['certify_method']}) {100 * m['certified_accuracy']:.2f}%")
    if "parent_certified_accuracy" in m:
        line += (f" (before: test {100 * m['parent_test_accuracy']:.2f}%, PGD "
                 f"{100 * m['parent_pgd_accuracy']:.2f}%, certified "
                 f"{100 * m['parent_certified_accuracy']:.2f}%)")
    elif "parent_test_accuracy" in m:
        line += f" (before: test {100 * m['parent_test_accuracy']:.2f}%)"
    return line


def default_ramp(epochs: int, ramp_epochs: float | None) -> float:
    """The eps ramp length: as given, else half the epochs."""
    return epochs / 2 if ramp_epochs is None else float(ramp_epochs)

