"""``certify area`` as a library: per-sample certified and attack eps over a dataset split.

:func:`run_area` composes the run layer: it validates an :class:`AreaConfig`, loads the model
and the data, opens a :class:`~certify.run.folder.RunFolder` (new, or the one to resume), runs
:func:`~certify.run.iterate.certify_dataset` over the batches still to do -- under torchrun
through :func:`certify.distributed.sharded` -- appending each batch's rows as they come, and
finalizes the folder (see :mod:`certify.report.area` for its files).

An interrupted run (a crash, Ctrl-C, a full disk) keeps the rows appended so far and a
``partial`` ``results.json``; ``resume=True`` continues it, with the same result as an
uninterrupted run: batches are fixed by the options, each batch's attack has its own seeded
generator, and the fast search's first guesses depend only on the rows of the first batches.

Under ``torchrun`` (see :mod:`certify.distributed`) every rank computes the guess-learning
first batches itself (only rank 0 keeps them), then its share of the others, balanced by the
work left in each batch. Each rank appends its rows to ``shards/rank-<r>/per_sample.csv``;
rank 0 gathers all rows into the same files a single process writes and removes ``shards/``.
A failed rank fails the run on every rank; the finished batches stay in ``shards/`` for
``resume``, with any number of processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from certify.errors import NAME, ReportError, SpecError, literal, unknown_name
from certify.records import SampleRow, json_safe
from certify.report.area import AreaRun
from certify.report.summary import MethodSummary, default_eps_grid, summarize
from certify.run.folder import RunFolder, check_run_folder
from certify.run.iterate import ATTACKS, BatchResult, certify_dataset, guess_batches

# Settings that change the numbers: a run is only resumed with the same values.
RESULT_KEYS = ("model_sha256", "dataset", "split", "indices", "methods", "method_options",
               "attack", "attack_steps", "attack_restarts", "attack_tol", "eps_max", "tol",
               "search", "batch_size", "device", "dtype", "seed", "exact", "exact_time_limit")
# Settings added after runs were first written: a saved run without one used this value.
_SETTING_DEFAULTS: dict[str, Any] = {"exact": False, "exact_time_limit": None}


@dataclass(frozen=True)
class AreaConfig:
    """Everything that defines a ``certify area`` run.

    Attributes:
        model: Model file (certify checkpoint ``.pt`` or ``.onnx``).
        dataset: Dataset name, e.g. ``digits``; None: the one the checkpoint records.
        split: Dataset split.
        n: The first `n` samples of the split (None: all); exclusive with `indices`.
        indices: Explicit sample positions in the split.
        methods: Bound methods, each searched separately.
        attack: ``pgd`` (minimal adversarial eps per sample) or ``none``.
        eps_max: Upper end of both searches (> 0).
        tol: Width of the certified search's final bracket (> 0).
        batch_size: Samples per batch.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        dtype: ``float32`` or ``float64`` for the model, the attack and the bounds.
        seed: Seeds every batch's attack generator.
        search: ``fast`` or ``bisection``.
        attack_steps, attack_restarts: PGD settings of every attack probe.
        attack_tol: Bracket width of the attack's bisection (default: `tol`).
        data_dir: Folder with the dataset files (default ``$CERTIFY_DATA`` or ``./data``).
        method_options: Per-method options, e.g. ``{"alpha-crown": {"steps": 50}}``.
        eps_grid: Radii for the certified accuracy in the summary (default: a round grid).
        exact: Also compute every sample's exact minimal adversarial eps by MILP (small
            networks; see :mod:`certify.exact`).
        exact_time_limit: Seconds per MILP of the exact eps; a sample whose MILP hits it is
            ``unknown`` (with the reason).
    """

    model: str
    dataset: str | None
    split: str = "test"
    n: int | None = None
    indices: tuple[int, ...] | None = None
    methods: tuple[str, ...] = ("crown",)
    attack: str = "pgd"
    eps_max: float = 0.5
    tol: float = 1e-4
    batch_size: int = 100
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    search: str = "fast"
    attack_steps: int = 40
    attack_restarts: int = 1
    attack_tol: float | None = None
    data_dir: str | None = None
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    eps_grid: tuple[float, ...] | None = None
    exact: bool = False
    exact_time_limit: float = 60.0

    def validate(self) -> None:
        """Check every option; raise a one-line :class:`SpecError` naming the bad one."""
        from certify.radius import SEARCHES

        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise SpecError(f"{{tol}} must be a number > 0, got {literal(self.tol)}; e.g. 1e-4",
                            tol=NAME)
        if not (isinstance(self.eps_max, (int, float)) and math.isfinite(self.eps_max)
                and self.eps_max > 0):
            raise SpecError(f"{{eps_max}} must be a number > 0, got {literal(self.eps_max)}; "
                            "e.g. 0.5", eps_max=NAME)
        if self.dtype in ("float32", "float64"):
            smallest = smallest_tol(self.eps_max, self.dtype)
            if self.tol < smallest:
                other = ", or {dtype} float64" if self.dtype == "float32" else ""
                raise SpecError(f"{{tol}} {self.tol:g} is finer than {self.dtype} can resolve at "
                                f"{{eps_max}} {self.eps_max:g}; use {{tol}} {smallest:.2g} or "
                                f"more{other}", tol=NAME, eps_max=NAME, dtype=NAME)
        if self.attack_tol is not None and not (math.isfinite(self.attack_tol)
                                                and self.attack_tol > 0):
            raise SpecError(f"attack_tol must be > 0, got {self.attack_tol}")
        if self.n is not None and self.indices is not None:
            raise SpecError("give {n} (the first N samples) or {indices}, not both", n=NAME,
                            indices=NAME)
        if self.n is not None and self.n < 1:
            raise SpecError(f"{{n}} must be >= 1, got {self.n}", n=NAME)
        if self.batch_size < 1:
            raise SpecError(f"{{batch_size}} must be >= 1, got {self.batch_size}",
                            batch_size=NAME)
        if self.attack_steps < 1 or self.attack_restarts < 1:
            raise SpecError("attack steps and restarts must be >= 1, got "
                            f"{self.attack_steps} and {self.attack_restarts}")
        if not self.methods:
            raise SpecError("give at least one {methods}", methods=NAME)
        if len(set(self.methods)) != len(self.methods):
            raise SpecError(f"each of {{methods}} once, got {literal(', '.join(self.methods))}",
                            methods=NAME)
        _check_methods(self.methods, self.method_options)
        for m in self.method_options:
            if m not in self.methods:
                raise SpecError(f"options given for method '{m}', which is not run; methods: "
                                f"{', '.join(self.methods)}")
        if self.attack not in ATTACKS:
            raise unknown_name("attack", self.attack, ATTACKS)
        if self.search not in SEARCHES:
            raise unknown_name("search", self.search, SEARCHES)
        if self.dtype not in ("float32", "float64"):
            raise SpecError(f"{{dtype}} must be float32 or float64, got {literal(self.dtype)}",
                            dtype=NAME)
        if self.eps_grid is not None and any(not (e >= 0 and math.isfinite(e))
                                             for e in self.eps_grid):
            raise SpecError(f"eps_grid must hold finite eps >= 0, got {list(self.eps_grid)}")
        if not (isinstance(self.exact_time_limit, (int, float))
                and math.isfinite(self.exact_time_limit) and self.exact_time_limit > 0):
            raise SpecError(f"{{exact_time_limit}} must be a number of seconds > 0, got "
                            f"{literal(self.exact_time_limit)}; e.g. 60",
                            exact_time_limit=NAME)

    def select(self, size: int, where: str) -> list[int]:
        """The sample positions this run certifies in a split of `size` samples.

        Raises:
            SpecError: an empty, out-of-range or repeated position, or too few samples.
        """
        if self.indices is not None:
            idx = [int(i) for i in self.indices]
            if not idx:
                raise SpecError("{indices} is empty; give positions like 0,5,10 or 0:100",
                                indices=NAME)
            bad = [i for i in idx if not 0 <= i < size]
            if bad:
                raise SpecError(f"{{indices}} {bad[0]} is out of range for {literal(where)} "
                                f"({size} samples: 0..{size - 1})", indices=NAME)
            if len(set(idx)) != len(idx):
                raise SpecError("{indices} lists a sample twice; give each position once",
                                indices=NAME)
            return idx
        if self.n is not None:
            if self.n > size:
                raise SpecError(f"{{n}} {self.n} but {literal(where)} has only {size} samples; "
                                f"use {{n}} {size} or less", n=NAME)
            return list(range(self.n))
        return list(range(size))


def _check_methods(methods: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> None:
    """That every method exists, takes its options and (an optional one, auto_LiRPA's) is
    installed, before anything is written."""
    from certify.bounds import get_method

    for m in methods:
        get_method(m, **dict(options.get(m, {})))


def smallest_tol(eps_max: float, dtype: str) -> float:
    """The finest radius precision `dtype` resolves for radii up to `eps_max`.

    About four units in the last place of `eps_max` (two significant digits): a narrower
    bracket has ends that round to the same `dtype` number, so the search cannot tell them
    apart.
    """
    ulp = torch.finfo(getattr(torch, dtype)).eps * eps_max
    return float(f"{4 * ulp:.2g}")


# -------------------------------------------------------------------------------- helpers


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def _versions(methods: Sequence[str] = ()) -> dict[str, Any]:
    """Versions of what computed the numbers (an external method's package too)."""
    from certify import __version__
    from certify.bounds import get_method
    from certify.bounds.base import method_class

    versions = {"certify": __version__, "torch": torch.__version__,
                "python": platform.python_version(), "git_sha": _git_sha()}
    for m in methods:
        if method_class(m).external:
            info = get_method(m).info()  # type: ignore[attr-defined]
            versions[info["engine"]] = info["version"]
    return versions


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    if old.get("engine", "native") != "native":  # before auto_LiRPA's methods had own names
        out.append(f"engine={old['engine']!r} (now methods lirpa-*)")
    for k in RESULT_KEYS:
        a, b = old.get(k, _SETTING_DEFAULTS.get(k)), new.get(k)
        if json_safe(a) != json_safe(b):
            shown_a = "<list>" if isinstance(a, list) and len(a) > 8 else a
            shown_b = "<list>" if isinstance(b, list) and len(b) > 8 else b
            out.append(f"{k}={shown_a!r} (now {shown_b!r})")
    return out


def _find_resumable(root: Path, stem: str, settings: Mapping[str, Any]) -> Path:
    area = root / "area"
    candidates = sorted(area.glob(f"*-{stem}*"), reverse=True) if area.is_dir() else []
    for path in candidates:
        try:
            old = RunFolder(path).read_settings()
        except ReportError:
            continue
        if not _differences(old, settings):
            return path
    raise ReportError(f"nothing to resume for {stem} under {area} with these options; run "
                      "without --resume, or pass the run's folder with -o DIR")


def _open_folder(settings: Mapping[str, Any], *, out_dir: str | os.PathLike[str] | None,
                 resume: bool, root: Path, stem: str,
                 held: contextlib.ExitStack) -> tuple[RunFolder, list[SampleRow]]:
    """The run's folder, locked into `held`, and the rows saved there (resume) or none (new).

    A new run's ``config.json`` is written before any work, so that ``--resume`` finds it.
    """
    exact = bool(settings["exact"])
    if resume:
        path = Path(out_dir) if out_dir is not None else _find_resumable(root, stem, settings)
        folder = RunFolder(path, exact=exact)
        check_run_folder(folder)
        folder.lock(held)
        if not folder.config_file.is_file():  # stopped before anything was saved: start there
            folder.write_config(settings, _versions(settings["methods"]))
            return folder, []
        diff = _differences(folder.read_settings(), settings)
        if diff:
            raise SpecError(f"cannot resume {path}: it was run with {'; '.join(diff[:3])}. "
                            "Resume with the same options, or start a new run")
        return folder, folder.read_rows()
    path = Path(out_dir) if out_dir is not None else RunFolder.new_path(root, "area", stem)
    folder = RunFolder(path, exact=exact)
    folder.lock(held)  # one line if a file is in the way or the place is read-only
    if folder.has_run():
        raise ReportError(f"{literal(path)} already holds a run; continue it with {{resume}}, "
                          "or pick another folder ({out_dir})", resume=NAME, out_dir=NAME)
    folder.write_config(settings, _versions(settings["methods"]))
    return folder, []


def _results(settings: Mapping[str, Any], rows: Sequence[SampleRow], grid: Sequence[float],
             summaries: Mapping[str, MethodSummary], *, complete: bool, wall: float,
             attack_seconds: float, exact_seconds: float) -> dict[str, Any]:
    """The content of ``results.json``."""
    return {
        "status": "complete" if complete else "partial",
        "n_done": len({r.index for r in rows}),
        "n_total": len(settings["indices"]),
        "settings": {k: v for k, v in settings.items() if k != "indices"},
        "versions": _versions(settings["methods"]),
        "eps_grid": list(grid),
        "summary": {m: s.as_dict() for m, s in summaries.items()},
        "attack_seconds": attack_seconds,
        **({"exact_seconds": exact_seconds} if settings["exact"] else {}),
        "wall_seconds_this_session": wall,
    }


# ---------------------------------------------------------------------------------- running


def run_area(config: AreaConfig, *, out_dir: str | os.PathLike[str] | None = None,
             resume: bool = False, quiet: bool = False,
             reports_root: str | os.PathLike[str] = "reports") -> AreaRun:
    """Run ``certify area``: per-sample certified eps (per method) and attack eps, into a folder.

    Args:
        config: The run's options (validated here).
        out_dir: The run folder; default ``<reports_root>/area/<YYYYmmdd-HHMMSS>-<model stem>``.
        resume: Continue the run in `out_dir` (or the newest matching run under
            `reports_root`) instead of starting a new one; its settings must match.
        quiet: No progress bar.
        reports_root: Where default run folders go.
    Returns:
        :class:`~certify.report.area.AreaRun` of the finished run.
    Raises:
        SpecError: bad options; resuming with different settings.
        CheckpointError: a missing or unreadable model file.
        DatasetError: missing data, or a dataset the model does not fit.
        ReportError: `out_dir` already holds a run (without `resume`), or nothing to resume.
        RunLockedError: another live run is writing into the run folder.
        DiskFullError: the device is full (the rows saved before are intact; resume later).
        SoundnessError: a certified eps above an attack eps (a bug; never caught).
    """
    with contextlib.ExitStack() as held:  # the run folder's lock, held until the run ends
        return _run_area(config, out_dir=out_dir, resume=resume, quiet=quiet,
                         reports_root=Path(reports_root), held=held)


def _run_area(config: AreaConfig, *, out_dir: str | os.PathLike[str] | None, resume: bool,
              quiet: bool, reports_root: Path, held: contextlib.ExitStack) -> AreaRun:
    """:func:`run_area`; the run folder's lock goes into `held`."""
    from certify import distributed
    from certify._io import sha256_file
    from certify.compat import check_compatible
    from certify.data import get_dataset_info, load_dataset
    from certify.model_io import load_model, resolve_dataset
    from certify.utils import progress, resolve_device, resolve_dtype

    config.validate()
    ctx = distributed.init_from_env()
    base_device = resolve_device(config.device)
    device = ctx.device_for(base_device)
    dtype = resolve_dtype(config.dtype)
    model_path = Path(config.model)
    model, meta = load_model(model_path, device=device, dataset=config.dataset)
    if config.dataset is None:
        config = replace(config, dataset=resolve_dataset(None, meta, model_path))
    assert config.dataset is not None
    check_compatible(meta, get_dataset_info(config.dataset), model_name=model_path.name,
                     strict=True)
    data = load_dataset(config.dataset, config.split, root=config.data_dir)
    positions = config.select(len(data), f"{config.dataset}/{config.split}")
    model = model.to(dtype=dtype).eval()
    settings = _settings(config, model_path, sha256_file(model_path), positions, base_device)
    stem = model_path.name.split(".")[0] or "model"

    # rank 0 picks (or creates) the run folder and reads what is saved; every rank gets both
    folder, saved = distributed.run_on_main(lambda: _open_folder(
        settings, out_dir=out_dir, resume=resume, root=reports_root, stem=stem, held=held))
    wanted = set(positions)
    done: dict[tuple[int, str], SampleRow] = {
        (r.index, r.method): r for r in saved if r.index in wanted and r.method in config.methods}
    order = {p: k for k, p in enumerate(positions)}
    method_order = {m: k for k, m in enumerate(config.methods)}

    def ordered() -> list[SampleRow]:
        return sorted(done.values(), key=lambda r: (order[r.index], method_order[r.method]))

    grid = config.eps_grid
    timing = {"attack": 0.0, "exact": 0.0, "start": time.perf_counter()}

    def status(complete: bool) -> dict[str, Any]:
        rows = ordered()
        eps_grid = grid if grid is not None else default_eps_grid(rows)
        return _results(settings, rows, eps_grid, summarize(rows, eps_grid=eps_grid) if rows
                        else {}, complete=complete, wall=time.perf_counter() - timing["start"],
                        attack_seconds=timing["attack"], exact_seconds=timing["exact"])

    if ctx.is_main:
        folder.write_results(status(False))
    n_batches = math.ceil(len(positions) / config.batch_size)
    left = [sum((p, m) not in done for p in positions[b * config.batch_size:
                                                      (b + 1) * config.batch_size]
                for m in config.methods) for b in range(n_batches)]
    bar = progress(total=len(positions) * len(config.methods), initial=len(done),
                   quiet=quiet or not ctx.is_main, unit="cert", desc=f"area {stem}")

    def run(batches: list[int]) -> Any:
        return certify_dataset(
            model, data, config.methods, positions=positions, batch_size=config.batch_size,
            eps_max=config.eps_max, tol=config.tol, search=config.search, attack=config.attack,
            attack_steps=config.attack_steps, attack_restarts=config.attack_restarts,
            attack_tol=settings["attack_tol"], seed=config.seed, exact=config.exact,
            exact_time_limit=config.exact_time_limit, method_options=config.method_options,
            done=list(done.values()), batches=batches, device=device,
            dtype=dtype, quiet=quiet, label=stem, model_name=model_path.name)

    own: list[SampleRow] = []
    try:
        with distributed.shared_failure(hint=(
                f"finished shards are kept in {folder.shards_dir}; rerun with --resume (the "
                f"same options and -o {folder.path})")), bar:
            results = distributed.sharded(run, range(n_batches), item_of=_batch_of, costs=left,
                                          prefix=min(n_batches,
                                                     guess_batches(config.batch_size)))
            for result in results:
                folder.append(result.rows, rank=ctx.rank if ctx.is_distributed else None)
                own.extend(result.rows)
                done.update({(r.index, r.method): r for r in result.rows})
                timing["attack"] += result.attack_seconds
                timing["exact"] += result.exact_seconds
                bar.update(len(result.rows))
    except BaseException:
        if not ctx.is_distributed:  # the rows are saved; say so in results.json if possible
            with contextlib.suppress(Exception):
                folder.write_results(status(False))
        raise

    if ctx.is_distributed:
        gathered = distributed.all_gather_objects((own, timing["attack"], timing["exact"]))
        for part, _, _ in gathered:
            done.update({(r.index, r.method): r for r in part})
        timing["attack"] = sum(seconds for _, seconds, _ in gathered)
        timing["exact"] = sum(seconds for _, _, seconds in gathered)

    final = ordered()

    def finalize() -> dict[str, MethodSummary]:
        eps_grid = grid if grid is not None else default_eps_grid(final)
        summaries = summarize(final, eps_grid=eps_grid) if final else {}
        folder.finalize(final, _results(
            settings, final, eps_grid, summaries, complete=True,
            wall=time.perf_counter() - timing["start"], attack_seconds=timing["attack"],
            exact_seconds=timing["exact"]), title=f"certify area: {model_path.name} on "
            f"{config.dataset}/{config.split}", settings=settings, summaries=summaries,
            label=stem, tol=config.tol)
        return summaries

    summaries = distributed.run_on_main(finalize)
    return AreaRun(folder.path, settings, tuple(final), summaries, True)


def _batch_of(result: BatchResult) -> int:
    return result.batch


def _settings(config: AreaConfig, model_path: Path, sha256: str, positions: list[int],
              device: torch.device) -> dict[str, Any]:
    """Every resolved option of the run (``config.json``'s ``settings``)."""
    return {
        "model": str(model_path),
        "model_sha256": sha256,
        "dataset": config.dataset,
        "split": config.split,
        "n": len(positions),
        "indices": positions,
        "methods": list(config.methods),
        "method_options": {k: dict(v) for k, v in config.method_options.items()},
        "attack": config.attack,
        "attack_steps": config.attack_steps,
        "attack_restarts": config.attack_restarts,
        "attack_tol": config.attack_tol if config.attack_tol is not None else config.tol,
        "eps_max": float(config.eps_max),
        "tol": float(config.tol),
        "search": config.search,
        "batch_size": config.batch_size,
        "device": str(device),
        "dtype": config.dtype,
        "seed": config.seed,
        "data_dir": config.data_dir,
        "eps_grid": list(config.eps_grid) if config.eps_grid is not None else None,
        "exact": bool(config.exact),
        "exact_time_limit": float(config.exact_time_limit) if config.exact else None,
    }
