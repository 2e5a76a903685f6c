"""Accuracy under attack over an eps grid for several models (the thesis's Figs 8.19 and 8.22).

:func:`run_attack_curves` attacks the first `n` test points of every model at every eps of a
grid and writes, into one folder::

    attack_curves.csv   model,attack,eps,accuracy,n   (one row per model and eps)
    attack_curves.json  the settings and the curves
    attack_curves.png   accuracy under attack (%) vs eps, one curve per model

Attacks: ``pgd`` and ``fgsm`` (:func:`certify.attacks.accuracy_under_attack`, every adversarial
example re-checked), and ``autoattack``: the worst case per sample over APGD-CE, APGD-DLR, FAB
and Square from the optional `torchattacks` package. Its examples are re-checked here too
(inside the ball and [0, 1], misclassified) before a sample counts as broken.

The samples are attacked batch by batch, each batch seeded by its number, so under ``torchrun``
the batches are sharded over the ranks and rank 0 writes the same files as one process.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from certify.errors import SpecError, unknown_name

ATTACK_NAMES = ("pgd", "fgsm", "autoattack")
AUTOATTACK_PARTS = ("apgd-ce", "apgd-dlr", "fab", "square")
AUTOATTACK_INSTALL = "pip install --no-deps torchattacks"
CSV_FILE = "attack_curves.csv"
CSV_COLUMNS = ("model", "attack", "eps", "accuracy", "n")
JSON_FILE = "attack_curves.json"
FIGURE_FILE = "attack_curves.png"


@dataclass(frozen=True)
class ModelCurve:
    """Accuracy under attack of one model over the grid.

    Attributes:
        label: Legend name (the file stem unless given).
        path: The model file.
        eps: The grid, increasing.
        accuracy: Fraction still correct at each eps (same length as `eps`).
        n: Samples attacked.
    """

    label: str
    path: str
    eps: tuple[float, ...]
    accuracy: tuple[float, ...]
    n: int

    def accuracy_at(self, eps: float) -> float:
        """Accuracy at the grid point nearest to `eps`."""
        k = min(range(len(self.eps)), key=lambda i: abs(self.eps[i] - eps))
        return self.accuracy[k]


@dataclass(frozen=True)
class AttackCurves:
    """The result of :func:`run_attack_curves`: one curve per model and the files written."""

    curves: tuple[ModelCurve, ...]
    attack: str
    out_dir: Path | None


def parse_eps_grid(text: str) -> tuple[float, ...]:
    """``"0:0.014:15"`` (start:stop:count, both ends included) or ``"0,0.01,0.02"``.

    A range always says how many points it has: ``"0:0.1"`` is refused, not given a default.

    Raises:
        SpecError: malformed text, a range without its count, a negative eps, or a count < 2.
    """
    text = text.strip()
    if text.count(":") == 1 and _numbers(text.split(":")):
        raise SpecError(f"eps grid {text!r} is a range without its number of points; write "
                        f"start:stop:count, e.g. {text}:11")
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop = float(parts[0]), float(parts[1])
            count = int(parts[2])
            if count < 2 or stop <= start:
                raise SpecError(f"eps grid {text!r} needs stop > start and at least 2 points; "
                                "e.g. 0:0.014:15")
            grid = tuple(start + (stop - start) * k / (count - 1) for k in range(count))
        else:
            grid = tuple(sorted(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise SpecError(f"cannot read eps grid {text!r}; expected start:stop:count (0:0.014:15) "
                        "or a list (0,0.005,0.01)") from None
    if not grid or any(not (math.isfinite(e) and e >= 0) for e in grid):
        raise SpecError(f"eps grid {text!r} must hold finite eps >= 0")
    return tuple(round(e, 12) for e in grid)


def _numbers(parts: Sequence[str]) -> bool:
    try:
        [float(p) for p in parts]
    except ValueError:
        return False
    return True


def model_labels(paths: Sequence[str | os.PathLike[str]], labels: Sequence[str] | None
                 ) -> list[str]:
    """`labels` checked against `paths`, or the file stems (made unique by their folder)."""
    if labels is not None:
        if len(labels) != len(paths):
            raise SpecError(f"{len(labels)} labels for {len(paths)} models; give one per model")
        return list(labels)
    stems = [Path(p).name.split(".")[0] for p in paths]
    return [s if stems.count(s) == 1 else f"{s} [{Path(p).parent.name}]"
            for s, p in zip(stems, paths, strict=True)]


def _import_torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError:
        raise SpecError("{attack} needs the optional package torchattacks; install it with "
                        f"`{AUTOATTACK_INSTALL}`", attack="autoattack") from None
    return torchattacks


def autoattack_robust(model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
                      seed: int = 0, batch_size: int = 256) -> Tensor:
    """Per sample: no attack of AutoAttack's standard set broke it at `eps`.

    Runs APGD-CE, APGD-DLR, FAB and Square (Croce & Hein, ICML 2020) from `torchattacks` on the
    samples still robust, projects every returned example into the ball rounded inward and
    re-checks it (:func:`certify.attacks.recheck`): inside the ball (exactly), inside [0, 1],
    and not strictly classified as the label.

    Args:
        model: Classifier on pixels in [0, 1] (eval mode is set and restored).
        x: `(N, C, H, W)` inputs in [0, 1].
        y: `(N,)` labels.
        eps: The L-inf radius (pixel units, >= 0).
        seed: Seed of the attacks' randomness.
        batch_size: Samples per attack call.
    Returns:
        `(N,)` bool, True where the sample is correct and no re-checked example was found.
    Raises:
        SpecError: torchattacks is not installed; eps < 0.
    """
    from certify.attacks import eval_mode, margins, recheck
    from certify.spec import LinfBall

    if not (math.isfinite(eps) and eps >= 0):
        raise SpecError(f"eps must be >= 0, got {eps}")
    ta = _import_torchattacks()
    num_classes = int(model(x[:1]).shape[1]) if x.shape[0] else 10
    robust = torch.ones(x.shape[0], dtype=torch.bool)
    with eval_mode(model), torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            robust[s:s + batch_size] = margins(model(x[s:s + batch_size]), y[s:s + batch_size]
                                               ).cpu() > 0
    if eps == 0 or not bool(robust.any()):
        return robust
    attacks = {
        "apgd-ce": lambda: ta.APGD(model, eps=eps, norm="Linf", steps=50, loss="ce", seed=seed),
        "apgd-dlr": lambda: ta.APGDT(model, eps=eps, norm="Linf", steps=50, seed=seed,
                                     n_classes=num_classes),
        "fab": lambda: ta.FAB(model, eps=eps, norm="Linf", steps=50, seed=seed,
                              n_classes=num_classes, multi_targeted=False),
        "square": lambda: ta.Square(model, eps=eps, norm="Linf", n_queries=1000, seed=seed),
    }
    with eval_mode(model):
        for name in AUTOATTACK_PARTS:
            open_idx = torch.nonzero(robust).flatten()
            if open_idx.numel() == 0:
                break
            attack = attacks[name]()
            for s in range(0, open_idx.numel(), batch_size):
                idx = open_idx[s:s + batch_size]
                xb, yb = x[idx], y[idx]
                # the examples, moved into the ball as rounded inward (torchattacks rounds to
                # nearest), count only after the exact re-check every attack passes
                ball = LinfBall(xb, torch.tensor(float(eps), dtype=torch.float64))
                x_adv = ball.project(attack(xb, yb).detach().to(xb.dtype))
                broken, _ = recheck(model, ball, x_adv, yb)
                robust[idx[broken.cpu()]] = False
    return robust


def batch_seed(seed: int, batch: int) -> int:
    """Seed of batch number `batch`'s attacks: fixed by the batch, not by who runs it."""
    return (seed * 1_000_003 + batch) % (2**63)


def _batch_robust(model: nn.Module, x: Tensor, y: Tensor, grid: Sequence[float], attack: str, *,
                  steps: int, restarts: int, seed: int) -> Tensor:
    """`(E, B)` bool on the CPU: sample still robust at each eps of `grid` (monotone in eps)."""
    from certify.attacks import accuracy_under_attack

    if attack == "autoattack":
        robust = torch.stack([autoattack_robust(model, x, y, e, seed=seed, batch_size=x.shape[0])
                              for e in grid]).cpu()
        return robust.cummin(dim=0).values   # broken at a small eps: broken at larger ones
    gen = torch.Generator(device=x.device).manual_seed(seed)
    res = accuracy_under_attack(model, x, y, list(grid), attack, steps=steps, restarts=restarts,
                                batch_size=x.shape[0], generator=gen)
    return res.robust.cpu()


def attack_curves(models: Sequence[str | os.PathLike[str]], dataset: str, eps_grid: Sequence[float],
                  *, attack: str = "pgd", n: int | None = 500, steps: int = 40,
                  restarts: int = 1, labels: Sequence[str] | None = None, seed: int = 0,
                  batch_size: int = 256, device: str = "cpu",
                  data_dir: str | os.PathLike[str] | None = None,
                  quiet: bool = False) -> list[ModelCurve]:
    """Accuracy under `attack` at every eps of `eps_grid` for each model (nothing written).

    The samples are cut into batches of `batch_size`; batch ``b`` is attacked with seed
    :func:`batch_seed` ``(seed, b)``. Under ``torchrun`` (see :mod:`certify.distributed`) the
    batches are sharded over the ranks and the per-sample results gathered on every rank, so
    the curves equal a single-process run's whatever the number of processes.

    Args:
        models: Model files (certify ``.pt`` or ``.onnx``).
        dataset: Dataset name; its test split is attacked.
        eps_grid: Radii in pixel units (sorted here).
        attack: ``pgd``, ``fgsm`` or ``autoattack``.
        n: The first `n` test samples (None: all).
        steps, restarts: PGD settings.
        labels: Legend names, one per model (default: file stems).
        seed: Seeds the attacks.
        batch_size: Samples per batch; batch ``b``'s attacks are seeded by ``(seed, b)``.
        device: Where to run (``cuda`` is ``cuda:LOCAL_RANK`` under torchrun).
        data_dir: Dataset folder.
        quiet: No progress output.
    Returns:
        One :class:`ModelCurve` per model, in order (on every rank under torchrun).
    Raises:
        SpecError: bad options; torchattacks missing for ``autoattack``.
        CheckpointError, DatasetError: missing model, data, or a model for another dataset.
        DistributedError: under torchrun, when any rank failed (naming it).
    """
    from certify import distributed
    from certify.compat import check_compatible
    from certify.data import get_dataset_info, load_dataset
    from certify.model_io import load_model
    from certify.utils import progress, resolve_device

    if attack not in ATTACK_NAMES:
        raise unknown_name("attack", attack, ATTACK_NAMES)
    if not models:
        raise SpecError("give at least one model file")
    if n is not None and n < 1:
        raise SpecError("{n} must be >= 1", n=n)
    if steps < 1 or restarts < 1:
        raise SpecError("{steps} and {restarts} must be >= 1", steps=steps, restarts=restarts)
    grid = sorted(float(e) for e in eps_grid)
    if not grid or any(not (math.isfinite(e) and e >= 0) for e in grid):
        raise SpecError(f"eps grid must hold finite eps >= 0, got {grid}")
    if attack == "autoattack":
        _import_torchattacks()
    if batch_size < 1:
        raise SpecError("{batch_size} must be >= 1", batch_size=batch_size)
    names = model_labels(models, labels)
    ctx = distributed.init_from_env()
    dev = ctx.device_for(resolve_device(device))
    info = get_dataset_info(dataset)
    loaded = []
    for path in models:
        model, meta = load_model(Path(path), device=dev, dataset=dataset)
        check_compatible(meta, info, model_name=Path(path).name, strict=True)
        loaded.append(model.eval())
    data = load_dataset(dataset, "test", root=data_dir)
    x, y = data.tensors()
    if n is not None:
        x, y = x[:n], y[:n]
    total = int(x.shape[0])
    n_batches = math.ceil(total / batch_size)
    sizes = [min(batch_size, total - b * batch_size) for b in range(n_batches)]
    mine = distributed.shard(list(range(n_batches)), ctx.rank, ctx.world_size, costs=sizes)
    # batch number -> per model the (E, B) robust mask; each batch seeded by its number
    robust: dict[int, list[Tensor]] = {}
    bar = progress(total=len(mine) * len(loaded), quiet=quiet or not ctx.is_main,
                   desc=f"{attack} curves", unit="batch")
    with distributed.shared_failure(hint="nothing was written; rerun the command"), bar:
        for b in mine:
            sl = slice(b * batch_size, (b + 1) * batch_size)
            xb, yb = x[sl].to(dev), y[sl].to(dev)
            masks = []
            for model in loaded:
                masks.append(_batch_robust(model, xb, yb, grid, attack, steps=steps,
                                           restarts=restarts, seed=batch_seed(seed, b)))
                bar.update(1)
            robust[b] = masks
    if ctx.is_distributed:
        for part in distributed.all_gather_objects(robust):
            robust.update(part)
    out = []
    for m, (label, path) in enumerate(zip(names, models, strict=True)):
        mask = torch.cat([robust[b][m] for b in range(n_batches)], dim=1)
        acc = mask.double().mean(dim=1).tolist()
        out.append(ModelCurve(label, str(path), tuple(grid), tuple(acc), total))
    return out


def write_attack_curves(out_dir: str | os.PathLike[str], curves: Sequence[ModelCurve], *,
                        attack: str, settings: dict[str, Any] | None = None,
                        title: str | None = None) -> Path:
    """Write ``attack_curves.csv``, ``.json`` and ``.png`` of `curves` into `out_dir` (atomic)."""
    from certify._io import atomic_write_csv, atomic_write_json, ensure_dir
    from certify.report.plots import plot_attack_curves, save_figure

    out = ensure_dir(out_dir)
    atomic_write_csv(out / CSV_FILE, CSV_COLUMNS, (
        (c.label, attack, e, a, c.n)
        for c in curves for e, a in zip(c.eps, c.accuracy, strict=True)))
    atomic_write_json(out / JSON_FILE, {
        "attack": attack, "settings": settings or {},
        "curves": [{"label": c.label, "path": c.path, "n": c.n, "eps": list(c.eps),
                    "accuracy": list(c.accuracy)} for c in curves]})
    sizes = "/".join(str(n) for n in sorted({c.n for c in curves}))
    steps = (settings or {}).get("steps")
    caption = f"{attack}, n={sizes}" + (f", {steps} steps" if steps else "")
    ax = plot_attack_curves({c.label: (c.eps, c.accuracy) for c in curves},
                            title=title or f"Accuracy under {_attack_title(attack)}",
                            caption=caption)
    save_figure(ax, out / FIGURE_FILE)
    return out


def read_attack_curves(out_dir: str | os.PathLike[str]) -> AttackCurves:
    """Read the curves written by :func:`write_attack_curves`.

    Raises:
        ReportError: a missing or malformed file.
    """
    from certify.report.results import read_json

    out = Path(out_dir)
    data = read_json(out / JSON_FILE)
    curves = tuple(ModelCurve(c["label"], c["path"], tuple(c["eps"]), tuple(c["accuracy"]),
                              int(c["n"])) for c in data["curves"])
    return AttackCurves(curves, str(data["attack"]), out)


def _attack_title(attack: str) -> str:
    return {"pgd": "PGD", "fgsm": "FGSM", "autoattack": "AutoAttack"}.get(attack, attack)


def run_attack_curves(models: Sequence[str | os.PathLike[str]], dataset: str,
                      eps_grid: Sequence[float], *, out_dir: str | os.PathLike[str],
                      attack: str = "pgd", n: int | None = 500, steps: int = 40,
                      restarts: int = 1, labels: Sequence[str] | None = None, seed: int = 0,
                      batch_size: int = 256, device: str = "cpu",
                      data_dir: str | os.PathLike[str] | None = None,
                      quiet: bool = False) -> AttackCurves:
    """:func:`attack_curves`, then :func:`write_attack_curves` into `out_dir` (by rank 0 only
    under ``torchrun``; every rank returns the gathered curves)."""
    from certify import distributed
    from certify._lock import hold_output

    with hold_output(out_dir, command="attack"):  # one run per folder; stale temporaries go
        curves = attack_curves(models, dataset, eps_grid, attack=attack, n=n, steps=steps,
                               restarts=restarts, labels=labels, seed=seed,
                               batch_size=batch_size, device=device, data_dir=data_dir,
                               quiet=quiet)
        settings = {"dataset": dataset, "attack": attack, "n": curves[0].n, "steps": steps,
                    "restarts": restarts, "seed": seed, "batch_size": batch_size,
                    "eps_grid": list(curves[0].eps)}
        distributed.run_on_main(lambda: write_attack_curves(out_dir, curves, attack=attack,
                                                            settings=settings))
    return AttackCurves(tuple(curves), attack, Path(out_dir))


def safe_label(text: str) -> str:
    """A label usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
