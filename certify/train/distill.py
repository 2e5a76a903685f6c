"""Knowledge distillation into shallow students: Hinton, Ba & Caruana, and Papernot.

Three losses, all on logits ``(N, K)``:

- ``hinton`` (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"):
  ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)``. The soft
  term's gradient scales as ``1/T^2``; the ``T^2`` factor keeps its weight independent of T.
- ``logits`` (Ba & Caruana 2014, "Do deep nets really need to be deep?", "matching the
  logits"): the mean squared error between student and teacher logits. It needs no labels,
  so an unlabeled transfer set (SVHN ``extra``) can be added.
- ``defensive`` (Papernot et al. 2016, "Distillation as a defense to adversarial
  perturbations"): the teacher is trained at temperature T (``certify train --temperature T``),
  the student is trained on the teacher's soft labels ``softmax(z_t/T)`` with the
  cross-entropy of ``softmax(z_s/T)``, and deployed at T = 1 (the saved network outputs
  ``z_s``).

The teacher's logits on the (fixed, un-augmented) training set are computed once, without
gradients, and cached for every epoch and every student of a temperature sweep.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.checkpoint import ModelMeta
from certify.errors import NAME, SpecError, literal
from certify.train.loops import Step, TrainConfig
from certify.train.standard import TrainedModel

METHODS = ("hinton", "logits", "defensive")


def hinton_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, *,
                temperature: float, alpha: float) -> Tensor:
    """Hinton et al.'s distillation loss, averaged over the batch.

    ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y)``.

    Args:
        student_logits: ``(N, K)``, with gradients.
        teacher_logits: ``(N, K)``, treated as constants.
        labels: ``(N,)`` int64; may be ``None`` when ``alpha == 1``.
        temperature: T > 0.
        alpha: Weight of the soft term, in [0, 1].
    Returns:
        A scalar.
    """
    _check_temperature(temperature)
    _check_alpha(alpha)
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    loss = alpha * t * t * soft
    if alpha < 1.0:
        if labels is None:
            raise SpecError(f"hinton loss with alpha={alpha} < 1 needs labels; pass them or use "
                            "alpha=1.")
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
    return loss


def logit_matching_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Ba & Caruana's "matching the logits": mean squared error over batch and classes.

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``, treated as constants.
    Returns:
        A scalar; zero exactly when the logits agree.
    """
    return F.mse_loss(student_logits, teacher_logits.detach())


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, *,
                     temperature: float) -> Tensor:
    """Papernot et al.'s defensive-distillation loss: cross-entropy on soft labels at T.

    ``-sum_k softmax(z_t/T)_k * log softmax(z_s/T)_k``, averaged over the batch. At T = 1 this
    is standard training on the soft labels ``softmax(z_t)``.

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``, treated as constants.
        temperature: T > 0, the temperature the teacher was trained at.
    """
    _check_temperature(temperature)
    t = float(temperature)
    soft_labels = F.softmax(teacher_logits.detach() / t, dim=1)
    return -(soft_labels * F.log_softmax(student_logits / t, dim=1)).sum(1).mean()


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SpecError(f"temperature must be a positive number, got {temperature}.")


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise SpecError(f"alpha must be in [0, 1], got {alpha}.")


@dataclass(frozen=True, eq=False)
class DistillLoss:
    """A :class:`certify.train.loops.LossFn` that distills from cached teacher logits.

    Attributes:
        method: ``hinton``, ``logits`` or ``defensive``.
        teacher_logits: ``(N_train, K)`` logits of the teacher on the training set, looked up
            by ``step.indices``.
        temperature: T for ``hinton`` and ``defensive``.
        alpha: Soft-term weight for ``hinton``.
    """

    method: str
    teacher_logits: Tensor = field(repr=False)
    temperature: float = 1.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            from certify.errors import unknown_name

            raise unknown_name("distillation method", self.method, METHODS)
        _check_temperature(self.temperature)
        _check_alpha(self.alpha)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int,
                 step: Step) -> tuple[Tensor, Tensor]:
        z_t = self.teacher_logits[step.indices].to(x.device)
        z_s = model(x)
        if self.method == "hinton":
            loss = hinton_loss(z_s, z_t, y, temperature=self.temperature, alpha=self.alpha)
        elif self.method == "logits":
            loss = logit_matching_loss(z_s, z_t)
        else:
            loss = soft_target_loss(z_s, z_t, temperature=self.temperature)
        return loss, z_s


class ConcatSet:
    """Several datasets read as one (the training split plus a transfer split)."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        sizes = torch.tensor([len(p) for p in self.parts])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.long)
        part = torch.bucketize(indices, self.offsets[1:], right=True)
        xs = torch.empty(0)
        ys = torch.empty(0, dtype=torch.long)
        for p in range(len(self.parts)):
            mask = part == p
            if mask.any():
                x, y = self.parts[p].take(indices[mask] - self.offsets[p])
                if xs.numel() == 0:
                    xs = x.new_empty((len(indices), *x.shape[1:]))
                    ys = y.new_empty(len(indices))
                xs[mask], ys[mask] = x, y
        return xs, ys


@dataclass(frozen=True, eq=False)
class Teacher:
    """A loaded teacher with the data it teaches on and its cached training-set logits."""

    path: Path
    sha256: str
    meta: ModelMeta
    model: nn.Sequential = field(repr=False)
    train_set: Any = field(repr=False)
    test_set: Any = field(repr=False)
    logits: Tensor = field(repr=False)
    test_accuracy: float
    transfer_split: str | None = None


def load_teacher(path: str | os.PathLike[str], *, dataset: str | None = None,
                 data_dir: str | os.PathLike[str] | None = None,
                 transfer_split: str | None = None, device: str = "cpu",
                 batch_size: int = 512) -> Teacher:
    """Load a teacher checkpoint, its dataset, and its logits on the training set (once).

    Args:
        path: The teacher: a certify checkpoint or an ONNX network.
        dataset: The dataset to distill on; must be the teacher's (default; an ONNX teacher
            needs it).
        data_dir: Where the dataset files are.
        transfer_split: An extra split whose images are added to the training set (only for
            logit matching, which needs no labels), e.g. SVHN ``extra``.
        device: Where to run the teacher.
        batch_size: Samples per forward pass of the teacher.
    Raises:
        CheckpointError: not a readable checkpoint.
        DatasetError: a dataset other than the teacher's, missing data, an unknown split.
    """
    from certify.checkpoint import checkpoint_sha256
    from certify.compat import check_compatible
    from certify.data import get_dataset_info, load_dataset
    from certify.model_io import load_model, resolve_dataset
    from certify.train.loops import evaluate, predict_logits
    from certify.utils import resolve_device

    path = Path(path)
    dev = resolve_device(device)
    model, meta = load_model(path, device=dev, dataset=dataset)
    info = get_dataset_info(resolve_dataset(dataset, meta, path))
    check_compatible(meta, info, model_name=f"teacher {path.name}", strict=True)
    if transfer_split == "test":
        raise SpecError("{transfer_split} would train the student on the test set it is "
                        "evaluated on; pick another split (e.g. SVHN 'extra').",
                        transfer_split="test")
    train_set: Any = load_dataset(info.name, "train", data_dir)
    if transfer_split is not None and transfer_split != "train":
        train_set = ConcatSet([train_set, load_dataset(info.name, transfer_split, data_dir)])
    test_set = load_dataset(info.name, "test", data_dir)
    logits = predict_logits(model, train_set, batch_size=batch_size)
    accuracy = evaluate(model, test_set, batch_size=batch_size)
    return Teacher(path, checkpoint_sha256(path), meta, model, train_set, test_set, logits,
                   accuracy, transfer_split)


def distill_from(teacher: Teacher, student_arch: str, *, method: str = "hinton",
                 temperature: float = 2.0, alpha: float = 0.9,
                 config: TrainConfig | None = None,
                 student_kwargs: dict[str, Any] | None = None,
                 output: str | os.PathLike[str] | None = None, resume: bool = False,
                 quiet: bool = False) -> TrainedModel:
    """Train a fresh `student_arch` from a loaded :class:`Teacher` and save it.

    Args:
        teacher: From :func:`load_teacher`; its cached logits are reused.
        student_arch: e.g. ``scn-32-32``.
        method: ``hinton``, ``logits`` or ``defensive``.
        temperature: T for ``hinton``/``defensive`` (ignored by ``logits``).
        alpha: Soft-term weight for ``hinton`` (ignored by the others).
        config: Training recipe (default ``TrainConfig()``); ``config.seed`` also seeds the
            student's initialisation.
        student_kwargs: Builder options overriding the name's, e.g. ``{"hidden": [64]}``.
        output: Checkpoint path, or ``None`` to not save.
        resume: Continue an interrupted run from ``<output>.partial``.
        quiet: No progress output.
    Returns:
        The student (eval mode, CPU), with ``meta.parent`` the teacher's sha256 and
        ``meta.training`` recording method, temperature, alpha, seed and teacher.
    """
    from certify.checkpoint import save_checkpoint
    from certify.train.loops import discard_train_state, partial_path, train
    from certify.train.standard import init_model

    config = config or TrainConfig()
    if method not in METHODS:
        from certify.errors import unknown_name

        raise unknown_name("distillation method", method, METHODS)
    if teacher.transfer_split not in (None, "train") and method != "logits":
        raise SpecError(f"a transfer split ({literal(repr(teacher.transfer_split))}) has no "
                        f"usable labels for method {literal(repr(method))}; use {{method}}, or "
                        "drop {transfer_split}.", method="logits", transfer_split=NAME)
    uses_t = method != "logits"
    loss = DistillLoss(method, teacher.logits, temperature if uses_t else 1.0,
                       alpha if method == "hinton" else 1.0)
    meta_t = teacher.meta
    if method == "defensive" and not quiet:
        trained_at = float(meta_t.training.get("temperature", 1.0))
        if trained_at != float(temperature):
            print(f"note: defensive distillation at T={temperature:g} but the teacher was trained "
                  f"at T={trained_at:g}; Papernot et al. train it at the same T "
                  f"(certify train --temperature {temperature:g}).", file=sys.stderr)
    student, base, kwargs = init_model(student_arch, meta_t.input_shape, meta_t.num_classes,
                                       mean=meta_t.mean, std=meta_t.std, seed=config.seed,
                                       arch_kwargs=student_kwargs)
    state = partial_path(output) if output is not None else None
    tag = f"distill-{method}-T{temperature:g}" if uses_t else "distill-logits"
    result = train(student, teacher.train_set, teacher.test_set, config, loss, state_path=state,
                   resume=resume, tag=tag, quiet=quiet)
    recipe = {
        "command": "distill", "method": method,
        "temperature": float(temperature) if uses_t else None,
        "alpha": float(alpha) if method == "hinton" else None,
        "deployment_temperature": 1.0,
        "teacher": str(teacher.path), "teacher_sha256": teacher.sha256,
        "teacher_arch": meta_t.arch, "teacher_arch_kwargs": meta_t.arch_kwargs,
        "transfer_split": teacher.transfer_split, "train_samples": len(teacher.train_set),
        **config.to_dict(),
    }
    metrics = {"teacher_test_accuracy": float(teacher.test_accuracy)}
    if result.test_accuracy is not None:
        metrics["test_accuracy"] = float(result.test_accuracy)
    meta = ModelMeta(base, kwargs, meta_t.dataset, meta_t.input_shape, meta_t.num_classes,
                     meta_t.mean, meta_t.std, training=recipe, parent=teacher.sha256,
                     metrics=metrics)
    student.cpu()
    if output is not None:
        save_checkpoint(output, student, meta)
        discard_train_state(state)
    return TrainedModel(student, meta, result, Path(output) if output is not None else None)


def distill(teacher_path: str | os.PathLike[str], student_arch: str, *, method: str = "hinton",
            temperature: float = 2.0, alpha: float = 0.9, config: TrainConfig | None = None,
            dataset: str | None = None, data_dir: str | os.PathLike[str] | None = None,
            transfer_split: str | None = None, student_kwargs: dict[str, Any] | None = None,
            output: str | os.PathLike[str] | None = None, resume: bool = False,
            quiet: bool = False) -> TrainedModel:
    """Distill the teacher checkpoint at `teacher_path` into a fresh `student_arch`.

    See :func:`load_teacher` and :func:`distill_from` for the arguments.

    Raises:
        UnknownNameError: unknown method or student architecture.
        SpecError: temperature <= 0, alpha outside [0, 1], a transfer split with a method
            that needs labels.
        CheckpointError, DatasetError: a bad teacher file; missing data; a dataset other
            than the teacher's.
    """
    config = config or TrainConfig()
    _validate(student_arch, method, [temperature], alpha, transfer_split, student_kwargs)
    teacher = load_teacher(teacher_path, dataset=dataset, data_dir=data_dir,
                           transfer_split=transfer_split, device=config.device)
    return distill_from(teacher, student_arch, method=method, temperature=temperature,
                        alpha=alpha, config=config, student_kwargs=student_kwargs,
                        output=output, resume=resume, quiet=quiet)


def _validate(student_arch: str, method: str, temperatures: Sequence[float], alpha: float,
              transfer_split: str | None, student_kwargs: dict[str, Any] | None) -> None:
    """Fail on bad options before the (slow) teacher pass."""
    from certify.nets import parse_arch

    parse_arch(student_arch)
    if method not in METHODS:
        from certify.errors import unknown_name

        raise unknown_name("distillation method", method, METHODS)
    if not temperatures:
        raise SpecError("give at least one temperature.")
    for t in temperatures:
        _check_temperature(t)
    _check_alpha(alpha)
    if transfer_split not in (None, "train") and method != "logits":
        raise SpecError("{transfer_split} adds samples without usable labels; it is for logits "
                        f"only ({{method}}), not {literal(repr(method))}.",
                        transfer_split=transfer_split, method="logits")


# ---------------------------------------------------------------------------------------------
# The temperature sweep (thesis Table 8.7)


@dataclass(frozen=True)
class SweepRow:
    """One temperature of a sweep. Accuracies are fractions; ``None`` where not trained.

    ``*_accuracy`` are on the test split (final numbers), ``*_validation`` on the validation
    part held out of the training split, on which the best student is chosen.
    """

    name: str
    parameters: int
    temperature: float
    temperature_accuracy: float
    logits_accuracy: float | None
    path: str | None
    temperature_validation: float | None = None
    logits_validation: float | None = None


@dataclass(frozen=True)
class SweepResult:
    """All students of a sweep, the best one, and where the table went."""

    rows: tuple[SweepRow, ...]
    method: str
    teacher_accuracy: float
    best: TrainedModel
    best_label: str
    table_csv: Path | None
    table_md: Path | None

    def table_rows(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "parameters": r.parameters, "temperature": r.temperature,
                 "temperature_validation": r.temperature_validation,
                 "temperature_accuracy": r.temperature_accuracy,
                 "logits_validation": r.logits_validation,
                 "logits_accuracy": r.logits_accuracy} for r in self.rows]


def sweep_columns(method: str) -> list[Any]:
    from certify.train._tables import Column, count, percent

    return [Column("name", "Name"), Column("parameters", "Number of Parameters", count),
            Column("temperature", "Temperature", lambda v: f"{v:g}"),
            Column("temperature_validation", f"Temp. Validation ({method})", percent),
            Column("temperature_accuracy", f"Temp. Accuracy ({method})", percent),
            Column("logits_validation", "Logits Validation", percent),
            Column("logits_accuracy", "Logits Accuracy", percent)]


SWEEP_NOTE = ("Logit matching does not use the temperature: it is trained once and its accuracy "
              "is shown on every row. The best student is chosen on the validation part held out "
              "of the training split; accuracies without 'Validation' are on the test split.")


def distill_sweep(teacher_path: str | os.PathLike[str], student_arch: str,
                  temperatures: Sequence[float], *, method: str = "hinton", alpha: float = 0.9,
                  with_logits: bool = True, config: TrainConfig | None = None,
                  dataset: str | None = None, data_dir: str | os.PathLike[str] | None = None,
                  student_kwargs: dict[str, Any] | None = None,
                  output: str | os.PathLike[str] | None = None, resume: bool = False,
                  quiet: bool = False) -> SweepResult:
    """Distill one student per temperature (and once by logit matching); keep the best.

    Reproduces the thesis's Table 8.7: for each T a student trained with temperature
    training (`method`, ``hinton`` or ``defensive``) and, once, a student trained by logit
    matching, which does not depend on T. All students start from the same initialisation
    (``config.seed``) and share the teacher's cached logits.

    With `output`, every student is saved under ``<output stem>.sweep/`` (``hinton-T2.pt``,
    ``logits.pt``), the table beside `output` as ``<stem>.sweep.csv`` and ``<stem>.sweep.md``
    (atomically), and the student with the best *validation* accuracy at `output`: the students
    train on the training split less a stratified hold-out
    (:func:`certify.data.split_validation`), are chosen on that hold-out, and the test split
    only gives the final numbers. With ``resume``, students already saved with the same recipe
    are reused.

    Returns:
        The :class:`SweepResult`; ``best.meta.training["sweep"]`` records the candidates.
    """
    from certify.checkpoint import load_checkpoint, save_checkpoint
    from certify.nets import count_parameters
    from certify.train._tables import write_table

    config = config or TrainConfig()
    if method == "logits":
        raise SpecError("a temperature sweep compares temperature training with logit matching; "
                        "use {method} or 'defensive' (logit matching is included).",
                        method="hinton")
    _validate(student_arch, method, temperatures, alpha, None, student_kwargs)
    if len(set(temperatures)) != len(temperatures):
        raise SpecError(f"temperatures repeat: {list(temperatures)}; give each once.")
    from dataclasses import replace

    from certify.data import ImageDataset, validation_indices
    from certify.train.loops import evaluate

    full = load_teacher(teacher_path, dataset=dataset, data_dir=data_dir, device=config.device)
    fit_idx, val_idx = validation_indices(full.train_set.labels)
    data = full.train_set
    teacher = replace(full, logits=full.logits[fit_idx], train_set=ImageDataset(
        data.images[fit_idx], data.labels[fit_idx], data.info, f"{data.split}-fit"))
    validation = ImageDataset(data.images[val_idx], data.labels[val_idx], data.info,
                              f"{data.split}-validation")
    out = Path(output) if output is not None else None
    folder = out.with_name(out.stem + ".sweep") if out is not None else None
    from certify.nets import parse_arch

    student_base, student_widths = parse_arch(student_arch)
    student_widths.update(student_kwargs or {})

    def run(label: str, m: str, t: float) -> TrainedModel:
        path = folder / f"{label}.pt" if folder is not None else None
        if resume and path is not None and path.exists():
            model, meta = load_checkpoint(path)
            want = {"method": m, "temperature": t if m != "logits" else None,
                    "alpha": alpha if m == "hinton" else None, "teacher_sha256": teacher.sha256,
                    "train_samples": len(teacher.train_set), **config.to_dict()}
            same_arch = meta.arch == student_base and all(
                meta.arch_kwargs.get(k) == v for k, v in student_widths.items())
            if same_arch and all(meta.training.get(k) == v for k, v in want.items()
                                 if k != "device"):
                if not quiet:
                    print(f"reusing {path}", file=sys.stderr)
                from certify.train.loops import TrainResult

                acc = meta.metrics.get("test_accuracy")
                return TrainedModel(model, meta, TrainResult((), acc, config.epochs, 0.0), path)
        if not quiet:
            print(f"student {student_arch}: {label}", file=sys.stderr)
        return distill_from(teacher, student_arch, method=m, temperature=t, alpha=alpha,
                            config=config, student_kwargs=student_kwargs, output=path,
                            resume=resume, quiet=quiet)

    students: list[tuple[str, TrainedModel]] = []
    for t in temperatures:
        students.append((f"{method}-T{t:g}", run(f"{method}-T{t:g}", method, t)))
    logits = run("logits", "logits", 1.0) if with_logits else None
    if logits is not None:
        students.append(("logits", logits))
    params = count_parameters(students[0][1].model)
    val = {lab: evaluate(s.model, validation) for lab, s in students}
    logits_acc = logits.meta.metrics.get("test_accuracy") if logits is not None else None
    rows = tuple(SweepRow(student_arch, params, float(t), s.meta.metrics["test_accuracy"],
                          logits_acc, str(s.path) if s.path else None, val[lab],
                          val.get("logits"))
                 for t, (lab, s) in zip(temperatures, students[:len(temperatures)], strict=True))
    # the choice is made on the validation hold-out; the first best wins a tie
    best_label, best = max(students, key=lambda ls: val[ls[0]])
    csv_path = md_path = None
    if out is not None:
        training = {**best.meta.training, "sweep": {
            "temperatures": [float(t) for t in temperatures], "method": method,
            "selected": best_label, "selected_on": "validation",
            "validation_samples": len(validation),
            "validation_accuracies": val,
            "accuracies": {lab: s.meta.metrics["test_accuracy"] for lab, s in students}}}
        metrics = {**best.meta.metrics, "validation_accuracy": val[best_label]}
        best_meta = best.meta.with_updates(training=training, metrics=metrics)
        save_checkpoint(out, best.model, best_meta)
        best = TrainedModel(best.model, best_meta, best.result, out)
        csv_path = out.with_name(out.stem + ".sweep.csv")
        md_path = out.with_name(out.stem + ".sweep.md")
        result = SweepResult(rows, method, teacher.test_accuracy, best, best_label, csv_path,
                             md_path)
        write_table(csv_path, md_path, result.table_rows(), sweep_columns(method),
                    note=SWEEP_NOTE + f" Teacher test accuracy: "
                                      f"{100 * teacher.test_accuracy:.2f}%. Best on validation "
                                      f"({len(validation)} samples): {best_label}.")
        return result
    return SweepResult(rows, method, teacher.test_accuracy, best, best_label, csv_path, md_path)
