"""The training loop every recipe shares: a pluggable loss, schedules, evaluation, resume.

A recipe (standard, distillation, fine-tuning after pruning, robust training) is a *loss
function* plugged into :func:`train`::

    def loss_fn(model, x, y, epoch, step):      # -> scalar Tensor, or (loss, logits)
        ...

``epoch`` is the 0-based epoch index and ``step`` a :class:`Step` that says where training is
(``step.progress`` runs from 0 to 1 over the whole run, ``step.epoch_progress`` counts epochs as
a float, e.g. for an eps ramp) and which training samples the batch holds (``step.indices``,
e.g. to look up cached teacher logits). Returning ``(loss, logits)`` also shows the running
training accuracy.

Training is deterministic for a seed: the batches are shuffled with an explicit
``torch.Generator`` and any use of the global RNG inside the loop (dropout, random starts) runs
in a forked RNG seeded from the config, so the same seed gives bit-identical weights on CPU.
With ``state_path`` the loop writes its state after every epoch (atomically, plain data,
loadable with ``weights_only=True``); ``resume=True`` continues from it and ends with exactly
the weights an uninterrupted run would have.

Under ``torchrun`` (see :mod:`certify.distributed`) the loop is data-parallel: every rank takes
its slice ``batch[rank::world]`` of each batch of the epoch's seeded permutation, and the
gradients are summed over the ranks weighted by slice size (one all-reduce per step, as
``DistributedDataParallel`` does, but on the bare module so that losses which bound the model
layer by layer work unchanged): each step is the single-process step on the same batch, up to
floating-point summation order. Test accuracy is counted on a shard per rank and summed. Only
rank 0 reads and writes the state file; the other ranks receive its content.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.errors import CheckpointError, SpecError

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "none")
STATE_KIND = "certify-train-state"
STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimizer, schedule, batches, seed and device.

    Attributes:
        epochs: Number of passes over the training set (>= 1).
        batch_size: Samples per step.
        lr: Base learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``, Nesterov off).
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty passed to the optimizer.
        schedule: ``"cosine"`` (to 0 over the run), ``"step"`` (x0.1 at 50% and 75% of the
            epochs) or ``"none"``; the rate is set at the start of each epoch.
        seed: Seeds the shuffling and any randomness inside the loop.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        grad_clip: Clip the global gradient norm to this value; ``None`` for no clipping.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise SpecError("{epochs} must be >= 1; train for 1 epoch or more.",
                            epochs=self.epochs)
        if self.batch_size < 1:
            raise SpecError(f"batch size must be >= 1, got {self.batch_size}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SpecError(f"learning rate must be a positive number, got {self.lr}.")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"unknown optimizer '{self.optimizer}'; use one of "
                            f"{', '.join(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"unknown schedule '{self.schedule}'; use one of "
                            f"{', '.join(SCHEDULES)}.")
        if self.momentum < 0 or self.weight_decay < 0:
            raise SpecError(f"momentum and weight decay must be >= 0, got {self.momentum} and "
                            f"{self.weight_decay}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise SpecError(f"grad_clip must be > 0 or None, got {self.grad_clip}.")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, for checkpoint provenance."""
        return asdict(self)

    def lr_at(self, epoch: int) -> float:
        """The learning rate for 0-based `epoch` under the schedule."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "step":
            drops = sum(epoch >= m for m in (self.epochs // 2, (3 * self.epochs) // 4) if m > 0)
            return self.lr * 0.1 ** drops
        return self.lr


@dataclass(frozen=True)
class Step:
    """Where training is when the loss is evaluated.

    Attributes:
        epoch: 0-based epoch index.
        index: 0-based batch index inside the epoch.
        batches: Batches per epoch.
        epochs: Total epochs of the run.
        indices: Training-set indices of the batch's samples, ``(N,)`` int64 on the CPU.
    """

    epoch: int
    index: int
    batches: int
    epochs: int
    indices: Tensor = field(repr=False)

    @property
    def global_step(self) -> int:
        return self.epoch * self.batches + self.index

    @property
    def total_steps(self) -> int:
        return self.epochs * self.batches

    @property
    def epoch_progress(self) -> float:
        """Epochs done so far as a float, e.g. ``2.5`` half-way through the third epoch."""
        return self.epoch + self.index / self.batches

    @property
    def progress(self) -> float:
        """Fraction of the whole run done before this step, in ``[0, 1)``."""
        return self.global_step / self.total_steps


class LossFn(Protocol):
    """``loss_fn(model, x, y, epoch, step) -> loss`` or ``(loss, logits)``.

    ``x`` is ``(N, C, H, W)`` on the training device, ``y`` is ``(N,)`` int64 labels.
    """

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int,
                 step: Step) -> Tensor | tuple[Tensor, Tensor]: ...


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor, epoch: int,
                       step: Step) -> tuple[Tensor, Tensor]:
    """Standard training: cross-entropy of the logits, ``(loss, logits)``."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


@dataclass(frozen=True)
class TemperatureCrossEntropy:
    """Cross-entropy of ``softmax(z / T)``: training "at temperature T".

    Papernot et al.'s defensive distillation trains the teacher this way; the saved network
    still outputs ``z`` and is deployed at T = 1. ``T = 1`` is standard training.
    """

    temperature: float

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise SpecError(f"temperature must be > 0, got {self.temperature}.")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int,
                 step: Step) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits / self.temperature, y), logits


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch. Accuracies are fractions in [0, 1]; ``None`` where not measured.

    ``metrics`` holds what the ``epoch_metrics`` hook of :func:`train` measured after the
    epoch (e.g. robust and certified accuracy), numbers only; it is kept in the resume state,
    so a resumed run's history still has them.
    """

    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float | None
    test_accuracy: float | None
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did. The model itself is trained in place.

    Attributes:
        history: One record per epoch, resumed epochs included.
        test_accuracy: Test accuracy after the last epoch (``None`` without a test set).
        resumed_epochs: Epochs loaded from a state file instead of run (0 for a fresh run).
        seconds: Wall time of this call.
    """

    history: tuple[EpochRecord, ...]
    test_accuracy: float | None
    resumed_epochs: int
    seconds: float


class Batchable(Protocol):
    """What :func:`train` and :func:`evaluate` need of a dataset (``ImageDataset`` has it)."""

    def __len__(self) -> int: ...

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


EpochCallback = Callable[[EpochRecord], None]
EpochMetrics = Callable[[nn.Module, int], dict[str, float]]
"""``epoch_metrics(model, epoch) -> {name: number}`` after each epoch (1-based `epoch`)."""


def partial_path(output: str | os.PathLike[str], tag: str = "") -> Path:
    """The in-progress state file kept beside `output` while training (``model.pt.partial``)."""
    output = Path(output)
    suffix = f".{tag}" if tag else ""
    return output.with_name(f"{output.name}{suffix}.partial")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Batchable, *, batch_size: int = 512,
                   device: str | torch.device | None = None) -> Tensor:
    """Logits of `model` on every sample of `dataset`, in order, without gradients.

    Args:
        model: Any classifier; used in eval mode, its previous mode is restored.
        dataset: ``N`` samples.
        batch_size: Samples per forward pass.
        device: Where to run; default the model's device.
    Returns:
        ``(N, K)`` float32 logits on the CPU.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(dataset), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(dataset)))
            x, _ = dataset.take(idx)
            out.append(model(x.to(device)).float().cpu())
        if not out:
            raise SpecError("cannot compute logits on an empty dataset.")
        return torch.cat(out)
    finally:
        model.train(was_training)


@torch.no_grad()
def count_correct(model: nn.Module, dataset: Batchable, *, batch_size: int = 512,
                  device: str | torch.device | None = None) -> int:
    """How many samples of `dataset` `model` classifies correctly (eval mode, then restored)."""
    if len(dataset) == 0:
        raise SpecError("cannot evaluate on an empty dataset.")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(dataset), batch_size):
            x, y = dataset.take(torch.arange(start, min(start + batch_size, len(dataset))))
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        return correct
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, dataset: Batchable, batch_size: int = 512,
             device: str | torch.device | None = None) -> float:
    """Clean accuracy of `model` on `dataset`, a fraction in [0, 1].

    The model runs in eval mode on `device` (default: where its parameters are); its previous
    mode is restored.
    """
    return count_correct(model, dataset, batch_size=batch_size, device=device) / len(dataset)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _resume_key(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (the device may differ)."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name != "device"}


def save_train_state(path: str | os.PathLike[str], *, model: nn.Module,
                     optimizer: torch.optim.Optimizer, epoch: int, config: TrainConfig,
                     generator: torch.Generator, history: list[EpochRecord],
                     tag: str = "") -> None:
    """Write the state after `epoch` finished epochs atomically, as plain data only."""
    from certify._io import atomic_open

    payload = {
        "kind": STATE_KIND,
        "format_version": STATE_FORMAT,
        "tag": tag,
        "epoch": int(epoch),
        "config": _resume_key(config),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": [asdict(r) for r in history],
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state file written by :func:`save_train_state` (``weights_only=True``).

    Raises:
        CheckpointError: unreadable, or not a certify training state.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError,
            ValueError, KeyError, IndexError, AttributeError, TypeError, struct.error):
        raise CheckpointError(f"{path} is not a readable training state (corrupt or "
                              "truncated); delete it to start over.") from None
    if not isinstance(payload, dict) or payload.get("kind") != STATE_KIND:
        raise CheckpointError(f"{path} is not a certify training state; delete it to start over.")
    if payload.get("format_version") != STATE_FORMAT:
        raise CheckpointError(f"{path} has state format {payload.get('format_version')}; this "
                              f"certify writes {STATE_FORMAT}. Delete it to start over.")
    return payload


def discard_train_state(path: str | os.PathLike[str] | None) -> None:
    """Remove a state file once its run is saved for good (no error if it is gone)."""
    if path is not None:
        Path(path).unlink(missing_ok=True)


def _restore(path: Path, payload: dict[str, Any], model: nn.Module,
             optimizer: torch.optim.Optimizer, config: TrainConfig, tag: str,
             generator: torch.Generator) -> tuple[int, list[EpochRecord]]:
    if payload.get("tag", "") != tag:
        raise CheckpointError(f"{path} belongs to run '{payload.get('tag')}', not '{tag}'; delete "
                              "it or resume the run it belongs to.")
    saved = payload["config"]
    wanted = _resume_key(config)
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"{path} was written with other settings ({'; '.join(diff)}); rerun "
                              "with the same options to resume, or delete it to start over.")
    epoch = int(payload["epoch"])
    if not 0 < epoch <= config.epochs:
        raise CheckpointError(f"{path} records epoch {epoch} of {config.epochs}; delete it.")
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model ({str(e).splitlines()[0]}); delete "
                              "it to start over.") from None
    generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    history = [EpochRecord(**r) for r in payload["history"]]
    return epoch, history


def train(model: nn.Module, train_set: Batchable, test_set: Batchable | None,
          config: TrainConfig, loss_fn: LossFn = cross_entropy_loss, *,
          on_epoch: EpochCallback | None = None, state_path: str | os.PathLike[str] | None = None,
          resume: bool = False, tag: str = "", quiet: bool = False,
          epoch_metrics: EpochMetrics | None = None) -> TrainResult:
    """Train `model` in place on `train_set` with `loss_fn`; evaluate on `test_set` each epoch.

    Args:
        model: The network; moved to ``config.device``, left in eval mode afterwards.
        train_set: Training samples (``ImageDataset`` or anything with ``len`` and ``take``).
        test_set: Evaluated after every epoch; ``None`` to skip.
        config: Optimizer, schedule, batch size, epochs, seed, device.
        loss_fn: ``loss_fn(model, x, y, epoch, step)``, see :class:`LossFn`.
        on_epoch: Called with each finished :class:`EpochRecord` (after the state is saved).
        state_path: Where to keep the per-epoch state for ``resume`` (e.g.
            :func:`partial_path` of the output); ``None`` keeps no state.
        resume: Continue from ``state_path`` if it exists (else start from scratch).
        tag: Names the run inside the state file, so a file of another run is not resumed.
        quiet: No progress bar and no per-epoch lines on stderr.
        epoch_metrics: Called with the model (eval mode, on the training device) and the
            1-based epoch after each epoch's evaluation; its numbers go into the record's
            ``metrics`` (and the stderr line) before the state is saved. It must not draw
            from the global RNG (use its own generator) so that it leaves training unchanged.
    Returns:
        The :class:`TrainResult`; the same seed and settings give bit-identical weights on CPU,
        with or without an interruption and ``resume``.
    Raises:
        SpecError: an empty training set or an unusable device.
        CheckpointError: a state file that cannot be resumed with these settings.
    """
    from certify import distributed
    from certify.utils import resolve_device

    n = len(train_set)
    if n == 0:
        raise SpecError("the training set is empty; check the dataset and split.")
    ctx = distributed.init_from_env()
    device = ctx.device_for(resolve_device(config.device))
    quiet = quiet or not ctx.is_main
    started = time.perf_counter()
    model.to(device)
    distributed.broadcast_module(model)  # every rank starts from rank 0's weights
    optimizer = _make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    batches = math.ceil(n / config.batch_size)
    state_path = Path(state_path) if state_path is not None else None
    fork_devices: list[int] = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        start_epoch, history = 0, list[EpochRecord]()
        payload = None
        if resume and state_path is not None:
            path = state_path
            # rank 0 reads the state file; every rank restores from its content
            payload = distributed.run_on_main(
                lambda: load_train_state(path) if path.exists() else None)
        if payload is not None and state_path is not None:
            start_epoch, history = _restore(state_path, payload, model, optimizer, config, tag,
                                            generator)
            _log(quiet, f"resuming from {state_path} after epoch {start_epoch}/{config.epochs}")
        for epoch in range(start_epoch, config.epochs):
            record = _run_epoch(model, train_set, test_set, config, loss_fn, optimizer,
                                generator, epoch, batches, device, quiet)
            if epoch_metrics is not None:
                record = replace(record, metrics=_epoch_metrics(epoch_metrics, model,
                                                                epoch + 1))
            history.append(record)
            if state_path is not None and ctx.is_main:
                save_train_state(state_path, model=model, optimizer=optimizer, epoch=epoch + 1,
                                 config=config, generator=generator, history=history, tag=tag)
            _log(quiet, _describe(record, config.epochs))
            if on_epoch is not None:
                on_epoch(record)
    model.eval()
    final = history[-1].test_accuracy if history else None
    return TrainResult(tuple(history), final, start_epoch, time.perf_counter() - started)


def _run_epoch(model: nn.Module, train_set: Batchable, test_set: Batchable | None,
               config: TrainConfig, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
               generator: torch.Generator, epoch: int, batches: int, device: torch.device,
               quiet: bool) -> EpochRecord:
    from certify import distributed
    from certify.utils import progress

    t0 = time.perf_counter()
    lr = config.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    order = torch.randperm(len(train_set), generator=generator)
    loss_sum, seen, correct, counted = 0.0, 0, 0, 0
    bar = progress(range(batches), quiet=quiet, desc=f"epoch {epoch + 1}/{config.epochs}",
                   leave=False)
    ctx = distributed.context()
    for index in bar:
        idx = order[index * config.batch_size:(index + 1) * config.batch_size]
        step = Step(epoch, index, batches, config.epochs, idx)
        if ctx.is_distributed:
            loss_value, hits, scored = _distributed_step(model, train_set, loss_fn, optimizer,
                                                         step, device)
        else:
            x, y = train_set.take(idx)
            x, y = x.to(device), y.to(device)
            out = loss_fn(model, x, y, epoch, step)
            loss, logits = out if isinstance(out, tuple) else (out, None)
            loss_value = loss.item()
            if math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            hits = int((logits.detach().argmax(1) == y).sum()) if logits is not None else 0
            scored = len(idx) if logits is not None else 0
        if not math.isfinite(loss_value):
            raise SpecError(f"the training loss became {loss_value} at epoch {epoch + 1}, batch "
                            f"{index + 1}; lower the learning rate (now {lr:g}) or set grad_clip.")
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss_sum += loss_value * len(idx)
        seen += len(idx)
        correct += hits
        counted += scored
        postfix = {"loss": f"{loss_sum / seen:.4f}"}
        if counted:
            postfix["acc"] = f"{correct / counted:.3f}"
        bar.set_postfix(postfix, refresh=False)
    bar.close()
    if ctx.is_distributed:
        distributed.broadcast_module(model)  # BatchNorm statistics: rank 0's, as DDP keeps them
        test_acc = _sharded_accuracy(model, test_set, device) if test_set is not None else None
    else:
        test_acc = evaluate(model, test_set, device=device) if test_set is not None else None
    return EpochRecord(epoch + 1, lr, loss_sum / seen, correct / counted if counted else None,
                       test_acc, time.perf_counter() - t0)


def _distributed_step(model: nn.Module, train_set: Batchable, loss_fn: LossFn,
                      optimizer: torch.optim.Optimizer, step: Step,
                      device: torch.device) -> tuple[float, int, int]:
    """One data-parallel step on this rank's slice ``step.indices[rank::world]``.

    Leaves the global batch's mean-loss gradient in the model (the slices' gradients weighted
    by slice size and summed over the ranks in one all-reduce, with the loss sum and the
    correct counts riding along).

    Returns:
        ``(mean loss, correct, scored)`` over the global batch; ``scored`` counts the samples
        whose logits the loss returned (0 for a loss that returns only a scalar).
    """
    from certify import distributed

    ctx = distributed.context()
    full = step.indices
    idx = full[ctx.rank::ctx.world_size]
    optimizer.zero_grad(set_to_none=True)
    loss_sum, hits, scored = 0.0, 0.0, 0.0
    if len(idx):
        x, y = train_set.take(idx)
        x, y = x.to(device), y.to(device)
        out = loss_fn(model, x, y, step.epoch, replace(step, indices=idx))
        loss, logits = out if isinstance(out, tuple) else (out, None)
        loss.backward()
        loss_sum = loss.item() * len(idx)
        if logits is not None:
            hits = float((logits.detach().argmax(1) == y).sum())
            scored = float(len(idx))
    extra = torch.tensor([loss_sum, hits, scored], dtype=torch.float64)
    total = distributed.sync_gradients(model, weight=len(idx) / len(full), extra=extra)
    assert total is not None
    return float(total[0]) / len(full), int(round(float(total[1]))), int(round(float(total[2])))


class _Shard:
    """Every `world`-th sample of a dataset, from `rank` on (for sharded evaluation)."""

    def __init__(self, data: Batchable, rank: int, world: int) -> None:
        self.data = data
        self.positions = torch.arange(rank, len(data), world)

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.data.take(self.positions[indices])


def _sharded_accuracy(model: nn.Module, data: Batchable, device: torch.device) -> float:
    """Accuracy on `data`, each rank counting its shard, summed over the ranks."""
    from certify import distributed

    if len(data) == 0:
        raise SpecError("cannot evaluate on an empty dataset.")
    ctx = distributed.context()
    part = _Shard(data, ctx.rank, ctx.world_size)
    correct = count_correct(model, part, device=device) if len(part) else 0
    (total,) = distributed.all_reduce_sum([correct], device=_reduce_device(device))
    return total / len(data)


def _reduce_device(device: torch.device) -> torch.device | None:
    """Where collective tensors must live: the GPU for nccl, the CPU for gloo."""
    from certify import distributed

    return device if distributed.context().backend == "nccl" else None


def _epoch_metrics(fn: EpochMetrics, model: nn.Module, epoch: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        values = fn(model, epoch)
    finally:
        model.train(was_training)
    return {str(k): float(v) for k, v in values.items()}


def _describe(r: EpochRecord, epochs: int) -> str:
    parts = [f"epoch {r.epoch}/{epochs}", f"lr {r.lr:.2e}", f"loss {r.train_loss:.4f}"]
    if r.train_accuracy is not None:
        parts.append(f"train acc {100 * r.train_accuracy:.2f}%")
    if r.test_accuracy is not None:
        parts.append(f"test acc {100 * r.test_accuracy:.2f}%")
    for name, value in r.metrics.items():
        shown = f"{100 * value:.2f}%" if name.endswith("accuracy") else f"{value:.4g}"
        parts.append(f"{name.replace('_', ' ')} {shown}")
    parts.append(f"{r.seconds:.1f}s")
    return "  ".join(parts)


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
