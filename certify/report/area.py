"""``certify area`` as a library: per-sample certified and attack eps over a dataset split.

:func:`run_area` loads a model and a dataset, and for every selected sample and every bound
method finds the largest certified eps (:func:`certify.radius.certified_radii`) next to the
smallest eps at which PGD found an adversarial example
(:func:`certify.attacks.minimal_adversarial`). It writes a run directory::

    config.json            every resolved option, the model's sha256, versions, git SHA
    per_sample.csv         one row per sample and method (see certify.report.results)
    results.json           status, settings, versions and the summary per method
    sorted_eps.png         certified eps of every sample in increasing order, attack eps dashed
                           (and with ``exact``, the exact eps dotted)
    certified_accuracy.png certified accuracy (solid) and attack accuracy (dashed) vs eps
    summary.md             the tables and links to the figures

``per_sample.csv`` and ``results.json`` are rewritten atomically after every batch and method,
so an interrupted run (a crash, Ctrl-C) leaves valid files, and ``resume=True`` continues it. The
result is the same as an uninterrupted run: batches are fixed by the options, each batch's
attack has its own seeded generator, and the fast search's first guesses depend only on the
rows of the first batches (see ``GUESS_SAMPLES``).

With ``exact=True`` every sample also gets its exact minimal adversarial eps
(:func:`certify.exact.exact_radii`, a MILP per target class, capped by the attack eps): an
``exact_eps`` / ``exact_status`` column next to every method's row, the exact curve in the
sorted-eps figure, and each method's certified/exact ratio in the summary. Every row is checked:
``certified <= exact <= attack`` within the MILP's stated tolerance
(:func:`certify.exact.check_sandwich`; a violation raises ``SoundnessError``).

Under ``torchrun`` (see :mod:`certify.distributed`) the batches are sharded over the ranks:
every rank computes the guess-learning first batches itself (only rank 0 keeps them), then its
share of the others, balanced by the work left in each batch. Each rank saves its rows in
``shards/rank-<r>/per_sample.csv`` after every batch; rank 0 gathers all rows into the same
files a single process writes (the same rows in the same order: a batch's attack seed and first
guesses do not depend on which rank runs it) and removes ``shards/``. A failed rank fails the
run on every rank; the finished batches stay in ``shards/`` for ``resume``, with any number of
processes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from certify._io import atomic_write_json, ensure_dir
from certify.errors import ReportError, SpecError, unknown_name
from certify.report.results import (
    SampleRow,
    json_safe,
    read_json,
    read_sample_csv,
    write_sample_csv,
)
from certify.report.summary import (
    MethodSummary,
    default_eps_grid,
    summarize,
    write_summary_md,
)

ATTACKS = ("pgd", "none")
CONFIG_FILE = "config.json"
SAMPLES_FILE = "per_sample.csv"
RESULTS_FILE = "results.json"
SORTED_FIGURE = "sorted_eps.png"
ACCURACY_FIGURE = "certified_accuracy.png"
SUMMARY_FILE = "summary.md"

# Settings that change the numbers: a run is only resumed with the same values.
RESULT_KEYS = ("model_sha256", "dataset", "split", "indices", "methods", "method_options",
               "attack", "attack_steps", "attack_restarts", "attack_tol", "eps_max", "tol",
               "search", "batch_size", "device", "dtype", "seed", "engine", "exact",
               "exact_time_limit")
# Settings added after runs were first written: a saved run without one used this value.
_SETTING_DEFAULTS: dict[str, Any] = {"engine": "native", "exact": False, "exact_time_limit": None}
MIN_RATIO_SAMPLES = 8  # earlier samples needed before their median ratio steers the first guess
# First guesses learn from the batches that hold the first GUESS_SAMPLES samples (whole batches):
# a fixed prefix, so that the later batches are independent and can run on any rank in any order.
GUESS_SAMPLES = 32
SHARDS_DIR = "shards"


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
        engine: Bound engine, ``native`` (default) or ``auto-lirpa`` (optional; see
            :mod:`certify.engines`).
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
    engine: str = "native"
    exact: bool = False
    exact_time_limit: float = 60.0

    def validate(self) -> None:
        """Check every option; raise a one-line :class:`SpecError` naming the bad one."""
        from certify.engines import get_margin_bound_fn, list_engine_methods
        from certify.radius import SEARCHES

        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise SpecError(f"--tol must be a number > 0, got {self.tol}; e.g. --tol 1e-4")
        if not (isinstance(self.eps_max, (int, float)) and math.isfinite(self.eps_max)
                and self.eps_max > 0):
            raise SpecError(f"--eps-max must be a number > 0, got {self.eps_max}; e.g. "
                            "--eps-max 0.5")
        if self.dtype in ("float32", "float64"):
            smallest = smallest_tol(self.eps_max, self.dtype)
            if self.tol < smallest:
                other = ", or --dtype float64" if self.dtype == "float32" else ""
                raise SpecError(f"--tol {self.tol:g} is finer than {self.dtype} can resolve at "
                                f"--eps-max {self.eps_max:g}; use --tol {smallest:.2g} or more"
                                f"{other}")
        if self.attack_tol is not None and not (math.isfinite(self.attack_tol)
                                                and self.attack_tol > 0):
            raise SpecError(f"attack_tol must be > 0, got {self.attack_tol}")
        if self.n is not None and self.indices is not None:
            raise SpecError("give --num-samples (the first N samples) or --indices, not both")
        if self.n is not None and self.n < 1:
            raise SpecError(f"--num-samples must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise SpecError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.attack_steps < 1 or self.attack_restarts < 1:
            raise SpecError("attack steps and restarts must be >= 1, got "
                            f"{self.attack_steps} and {self.attack_restarts}")
        if not self.methods:
            raise SpecError("give at least one --method")
        if len(set(self.methods)) != len(self.methods):
            raise SpecError(f"each --method once, got {', '.join(self.methods)}")
        available = list_engine_methods(self.engine)  # also rejects an unknown engine
        for m in self.methods:
            if m not in available:
                kind = "method" if self.engine == "native" else f"{self.engine} method"
                raise unknown_name(kind, m, available)
            if self.engine != "native":  # options, and that the engine is installed, now
                get_margin_bound_fn(self.engine, m, **dict(self.method_options.get(m, {})))
        for m in self.method_options:
            if m not in self.methods:
                raise SpecError(f"options given for method '{m}', which is not run; methods: "
                                f"{', '.join(self.methods)}")
        if self.attack not in ATTACKS:
            raise unknown_name("attack", self.attack, ATTACKS)
        if self.search not in SEARCHES:
            raise unknown_name("search", self.search, SEARCHES)
        if self.dtype not in ("float32", "float64"):
            raise SpecError(f"--dtype must be float32 or float64, got {self.dtype}")
        if self.eps_grid is not None and any(not (e >= 0 and math.isfinite(e))
                                             for e in self.eps_grid):
            raise SpecError(f"eps_grid must hold finite eps >= 0, got {list(self.eps_grid)}")
        if not (isinstance(self.exact_time_limit, (int, float))
                and math.isfinite(self.exact_time_limit) and self.exact_time_limit > 0):
            raise SpecError(f"--exact-time-limit must be a number of seconds > 0, got "
                            f"{self.exact_time_limit}; e.g. --exact-time-limit 60")


def smallest_tol(eps_max: float, dtype: str) -> float:
    """The finest radius precision `dtype` resolves for radii up to `eps_max`.

    About four units in the last place of `eps_max` (two significant digits): a narrower
    bracket has ends that round to the same `dtype` number, so the search cannot tell them
    apart.
    """
    ulp = torch.finfo(getattr(torch, dtype)).eps * eps_max
    return float(f"{4 * ulp:.2g}")


@dataclass(frozen=True)
class AreaRun:
    """A run directory's content.

    Attributes:
        run_dir: The folder.
        settings: The resolved settings (``config.json``'s ``settings``).
        rows: Per-sample rows, ordered by sample position then method.
        summaries: Per-method aggregates.
        complete: Whether every selected sample has a row for every method.
    """

    run_dir: Path
    settings: dict[str, Any]
    rows: tuple[SampleRow, ...]
    summaries: dict[str, MethodSummary]
    complete: bool

    @property
    def label(self) -> str:
        """The model's file stem, for legends."""
        return Path(str(self.settings.get("model", self.run_dir.name))).stem

    def rows_of(self, method: str) -> list[SampleRow]:
        return [r for r in self.rows if r.method == method]


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


def _versions(engine: str = "native") -> dict[str, Any]:
    from certify import __version__

    versions = {"certify": __version__, "torch": torch.__version__,
                "python": platform.python_version(), "git_sha": _git_sha()}
    if engine != "native":
        from certify.engines import get_engine_info

        versions[engine] = get_engine_info(engine)["version"]
    return versions


def _engine_bound_fn(config: AreaConfig, method: str,
                     model: torch.nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """The radius search's bound for a non-native engine (None: the native engine's own)."""
    if config.engine == "native":
        return None
    from certify.engines import get_margin_bound_fn

    bound = get_margin_bound_fn(config.engine, method,
                                **dict(config.method_options.get(method, {})))
    return lambda x, y, eps: bound(model, x, y, eps).lower.amin(1)


def _engine_confirm_fn(config: AreaConfig, method: str, model: torch.nn.Module
                       ) -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """For a non-native engine, whose bounds have no rounding control: the native engine's
    rigorous bound of the same method in float64, which confirms every radius (None: native,
    which confirms its own)."""
    if config.engine == "native":
        return None
    from certify.bounds import get_method
    from certify.radius import margin_lower_bound

    rigorous = get_method(method)
    return lambda x, y, eps: margin_lower_bound(model, x.double(), y, eps.double(),
                                                method=rigorous)


def _select(config: AreaConfig, size: int, where: str) -> list[int]:
    if config.indices is not None:
        idx = [int(i) for i in config.indices]
        if not idx:
            raise SpecError("--indices is empty; give positions like 0,5,10 or 0:100")
        bad = [i for i in idx if not 0 <= i < size]
        if bad:
            raise SpecError(f"--indices {bad[0]} is out of range for {where} ({size} samples: "
                            f"0..{size - 1})")
        if len(set(idx)) != len(idx):
            raise SpecError("--indices lists a sample twice; give each position once")
        return idx
    if config.n is not None:
        if config.n > size:
            raise SpecError(f"--num-samples {config.n} but {where} has only {size} samples; "
                            f"use --num-samples {size} or less")
        return list(range(config.n))
    return list(range(size))


def _new_run_dir(root: Path, stem: str) -> Path:
    """Create a fresh default run folder (runs started in the same second get ``-2``, ...)."""
    base = root / "area" / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{stem}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, k = base, 2
    while True:
        try:
            path.mkdir()  # atomic: two runs starting together never share a folder
            return path
        except FileExistsError:
            path = base.with_name(f"{base.name}-{k}")
            k += 1


def _lock_run(run_dir: Path, held: contextlib.ExitStack) -> None:
    """Lock `run_dir` for this run (into `held`) and remove temporary files a killed run left."""
    from certify._io import remove_stale_temporaries
    from certify._lock import run_lock

    held.enter_context(run_lock(run_dir, command="area"))
    remove_stale_temporaries(run_dir, folder=True)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
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
            old = read_json(path / CONFIG_FILE).get("settings", {})
        except ReportError:
            continue
        if not _differences(old, settings):
            return path
    raise ReportError(f"nothing to resume for {stem} under {area} with these options; run "
                      "without --resume, or pass the run's folder with -o DIR")


def _search(config: AreaConfig, model: torch.nn.Module, method: str, x: Tensor, y: Tensor,
            attack_eps: Tensor | None, guess: Tensor | None, batch: Sequence[int],
            part: slice) -> Any:
    """The radius search of `method` on the samples `part` of a batch."""
    from certify import radius

    return radius.certified_radii(
        model, x[part], y[part], method, eps_max=config.eps_max, tol=config.tol,
        attack_eps=None if attack_eps is None else attack_eps[part],
        guess=None if guess is None else guess[part], search=config.search,
        index=torch.tensor(list(batch)[part]), bound_fn=_engine_bound_fn(config, method, model),
        confirm_fn=_engine_confirm_fn(config, method, model),
        **({} if config.engine != "native" else dict(config.method_options.get(method, {}))))


def _per_sample_method(method: str) -> bool:
    """Methods that take a time budget (complete ones: ``milp``) run and report per sample."""
    from certify.bounds import get_method

    return hasattr(get_method(method), "time_limit")


def _guess(previous: Sequence[SampleRow], attack_eps: torch.Tensor | None) -> torch.Tensor | None:
    """First guesses from earlier batches: their median certified/attack ratio times attack eps."""
    if attack_eps is None:
        return None
    ratios = [r.certified_eps / r.attack_eps for r in previous
              if r.correct and r.certified_eps > 0 and 0 < r.attack_eps < math.inf]
    if len(ratios) < MIN_RATIO_SAMPLES:
        return None
    return attack_eps * statistics.median(ratios)


def _guess_batches(batch_size: int) -> int:
    """How many first batches the later batches' first guesses learn from."""
    return max(1, math.ceil(GUESS_SAMPLES / batch_size))


def _shard_file(run_dir: Path, rank: int) -> Path:
    return run_dir / SHARDS_DIR / f"rank-{rank}" / SAMPLES_FILE


def _saved_rows(run_dir: Path) -> list[SampleRow]:
    """Rows of ``per_sample.csv`` and of every shard's partial file (later files win)."""
    files = [run_dir / SAMPLES_FILE] if (run_dir / SAMPLES_FILE).is_file() else []
    shards = run_dir / SHARDS_DIR
    if shards.is_dir():
        files += sorted(shards.glob(f"rank-*/{SAMPLES_FILE}"))
    rows: list[SampleRow] = []
    for path in files:
        rows.extend(read_sample_csv(path))
    return rows


def _batch_generator(seed: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + batch) % (2**63))


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
        :class:`AreaRun` of the finished run.
    Raises:
        SpecError: bad options; resuming with different settings.
        CheckpointError: a missing or unreadable model file.
        DatasetError: missing data, or a dataset the model does not fit.
        ReportError: `out_dir` already holds a run (without `resume`), or nothing to resume.
        RunLockedError: another live run is writing into the run folder.
        DiskFullError: the device is full (the files saved before are intact; resume later).
        SoundnessError: a certified eps above an attack eps (a bug; never caught).
    """
    with contextlib.ExitStack() as held:  # the run folder's lock, held until the run ends
        return _run_area(config, out_dir=out_dir, resume=resume, quiet=quiet,
                         reports_root=reports_root, held=held)


def _run_area(config: AreaConfig, *, out_dir: str | os.PathLike[str] | None, resume: bool,
              quiet: bool, reports_root: str | os.PathLike[str],
              held: contextlib.ExitStack) -> AreaRun:
    """:func:`run_area`; the run folder's lock goes into `held`."""
    from certify import attacks, distributed, exact
    from certify.compat import check_compatible
    from certify.data import get_dataset_info, load_dataset
    from certify.model_io import check_finite_outputs, load_model, resolve_dataset
    from certify.utils import SampleProgress, progress, resolve_device, resolve_dtype

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
    info = get_dataset_info(config.dataset)
    check_compatible(meta, info, model_name=model_path.name, strict=True)
    data = load_dataset(config.dataset, config.split, root=config.data_dir)
    positions = _select(config, len(data), f"{config.dataset}/{config.split}")
    model = model.to(dtype=dtype).eval()

    from certify._io import sha256_file

    settings: dict[str, Any] = {
        "model": str(model_path),
        "model_sha256": sha256_file(model_path),
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
        "device": str(base_device),
        "dtype": config.dtype,
        "seed": config.seed,
        "data_dir": config.data_dir,
        "eps_grid": list(config.eps_grid) if config.eps_grid is not None else None,
        "engine": config.engine,
        "exact": bool(config.exact),
        "exact_time_limit": float(config.exact_time_limit) if config.exact else None,
    }
    root = Path(reports_root)
    stem = model_path.name.split(".")[0] or "model"

    def open_run() -> tuple[Path, list[SampleRow]]:
        if resume:
            run_dir = Path(out_dir) if out_dir is not None else _find_resumable(root, stem,
                                                                                 settings)
            if not (run_dir / CONFIG_FILE).is_file():
                if (run_dir / SAMPLES_FILE).exists():
                    raise ReportError(f"{run_dir} holds {SAMPLES_FILE} but no {CONFIG_FILE}: "
                                      "not a run certify can continue; pick another folder "
                                      "with -o")
                # stopped before anything was saved: nothing to continue, so start it there
                ensure_dir(run_dir)
                _lock_run(run_dir, held)
                return start_run(run_dir), []
            _lock_run(run_dir, held)
            old = read_json(run_dir / CONFIG_FILE).get("settings", {})
            diff = _differences(old, settings)
            if diff:
                raise SpecError(f"cannot resume {run_dir}: it was run with "
                                f"{'; '.join(diff[:3])}. Resume with the same options, or start "
                                "a new run")
            return run_dir, _saved_rows(run_dir)
        run_dir = Path(out_dir) if out_dir is not None else _new_run_dir(root, stem)
        ensure_dir(run_dir)  # one line if a file is in the way or the place is read-only
        _lock_run(run_dir, held)
        if (run_dir / CONFIG_FILE).exists() or (run_dir / SAMPLES_FILE).exists():
            raise ReportError(f"{run_dir} already holds a run; continue it with --resume, or "
                              "pick another folder with -o")
        return start_run(run_dir), []

    def start_run(run_dir: Path) -> Path:
        """The run's folder and config, written before any work so that --resume finds it."""
        atomic_write_json(run_dir / CONFIG_FILE, json_safe({
            "command": "area", "settings": settings, "versions": _versions(config.engine),
            "created": _dt.datetime.now().isoformat(timespec="seconds")}))
        return run_dir

    # rank 0 picks (or creates) the run folder and reads what is saved; every rank gets both
    run_dir, rows = distributed.run_on_main(open_run)

    wanted = set(positions)
    done: dict[tuple[int, str], SampleRow] = {
        (r.index, r.method): r for r in rows if r.index in wanted and r.method in config.methods}
    order = {p: k for k, p in enumerate(positions)}
    method_order = {m: k for k, m in enumerate(config.methods)}

    def ordered() -> list[SampleRow]:
        return sorted(done.values(), key=lambda r: (order[r.index], method_order[r.method]))

    total = len(positions) * len(config.methods)
    n_batches = math.ceil(len(positions) / config.batch_size)
    prefix = min(n_batches, _guess_batches(config.batch_size))
    starts = [b * config.batch_size for b in range(n_batches)]
    if ctx.is_distributed:
        # every rank runs the guess-learning prefix (rank 0 keeps it), then its share of the rest
        rest = list(range(prefix, n_batches))
        left = [sum((p, m) not in done for p in positions[starts[b]:starts[b] + config.batch_size]
                    for m in config.methods) for b in rest]
        mine = distributed.shard(rest, ctx.rank, ctx.world_size, costs=left)
        batches = list(range(prefix)) + mine
        kept = set(mine) | (set(range(prefix)) if ctx.is_main else set())
    else:
        batches = list(range(n_batches))
        kept = set(batches)
    own: dict[tuple[int, str], SampleRow] = {}
    shard_file = _shard_file(run_dir, ctx.rank)
    attack_seconds = 0.0
    exact_seconds = 0.0
    start = time.perf_counter()
    bar = progress(total=total, initial=len(done), quiet=quiet or not ctx.is_main, unit="cert",
                   desc=f"area {stem}")
    # complete computations take seconds to minutes per sample: a line per sample with an ETA
    todo_points = [p for b in batches for p in positions[starts[b]:starts[b] + config.batch_size]]
    exact_log = SampleProgress(f"exact ε ({stem})", sum(
        any((p, m) not in done for m in config.methods) for p in todo_points),
        quiet=quiet or not config.exact)
    slow = [m for m in config.methods if _per_sample_method(m)]
    slow_logs = {m: SampleProgress(f"{m} radius ({stem})", sum(
        (p, m) not in done for p in todo_points), quiet=quiet) for m in slow}
    computed = 0
    with distributed.shared_failure(hint=(
            f"finished shards are kept in {run_dir / SHARDS_DIR}; rerun with --resume (the same "
            f"options and -o {run_dir})")), bar:
        for b in batches:
            first = starts[b]
            batch = positions[first:first + config.batch_size]
            todo = [m for m in config.methods if any((p, m) not in done for p in batch)]
            if not todo:
                continue
            if ctx.is_distributed and b in kept:  # tests only: fail after `computed` batches
                distributed.maybe_fail_for_test(computed)
                computed += 1
            x, y = data.take(torch.tensor(batch))
            x, y = x.to(device=device, dtype=dtype), y.to(device)
            check_finite_outputs(model, x, model_path.name)
            attack_eps = None
            if config.attack == "pgd":
                t0 = time.perf_counter()
                adv = attacks.minimal_adversarial(
                    model, x, y, eps_max=config.eps_max, tol=settings["attack_tol"],
                    steps=config.attack_steps, restarts=config.attack_restarts,
                    generator=_batch_generator(config.seed, b))
                attack_eps = adv.eps
                attack_seconds += time.perf_counter() - t0
            exact_result = None
            if config.exact:
                t0 = time.perf_counter()
                with exact_log.active():
                    exact_result = exact.exact_radii(
                        model, x, y, eps_max=config.eps_max, attack_eps=attack_eps,
                        time_limit=config.exact_time_limit, index=torch.tensor(batch),
                        on_sample=exact_log)
                exact_seconds += time.perf_counter() - t0
            earlier = set(positions[:min(first, prefix * config.batch_size)])
            for m in todo:
                previous = [r for (p, meth), r in done.items() if meth == m and p in earlier]
                args = (config, model, m, x, y, attack_eps, _guess(previous, attack_eps), batch)
                if m in slow_logs:   # one sample at a time (each searches alone anyway)
                    parts = []
                    for k in range(len(batch)):
                        with slow_logs[m].active():
                            parts.append(_search(*args, slice(k, k + 1)))
                        slow_logs[m](batch[k])
                    result_rows = [row for part in parts for row in part.rows()]
                    certified = torch.cat([part.certified_eps for part in parts])
                else:
                    result = _search(*args, slice(None))
                    result_rows = result.rows()
                    certified = result.certified_eps
                if exact_result is not None:
                    exact.check_sandwich(exact_result, certified_eps=certified,
                                         attack_eps=attack_eps, method=m)
                    result_rows = _with_exact(result_rows, exact_result)
                for row in result_rows:
                    done[(row.index, row.method)] = row
                    if b in kept:
                        own[(row.index, row.method)] = row
                if ctx.is_distributed:
                    if b in kept:
                        ensure_dir(shard_file.parent)
                        write_sample_csv(shard_file, sorted(
                            own.values(), key=lambda r: (order[r.index], method_order[r.method])))
                else:
                    current = ordered()
                    write_sample_csv(run_dir / SAMPLES_FILE, current)
                    _write_results(run_dir, settings, current, config,
                                   complete=len(done) == total,
                                   wall=time.perf_counter() - start,
                                   attack_seconds=attack_seconds, exact_seconds=exact_seconds)
                bar.update(len(batch))

    if ctx.is_distributed:
        gathered = distributed.all_gather_objects((list(own.values()), attack_seconds,
                                                   exact_seconds))
        for part, _, _ in gathered:
            done.update({(r.index, r.method): r for r in part})
        attack_seconds = sum(seconds for _, seconds, _ in gathered)
        exact_seconds = sum(seconds for _, _, seconds in gathered)

    final = ordered()
    wall = time.perf_counter() - start

    def write_final() -> dict[str, MethodSummary]:
        write_sample_csv(run_dir / SAMPLES_FILE, final)
        summaries = _write_results(run_dir, settings, final, config, complete=True, wall=wall,
                                   attack_seconds=attack_seconds, exact_seconds=exact_seconds)
        write_figures(run_dir, final, label=stem, tol=config.tol)
        sorted_caption = ("Sorted certified ε (solid), exact ε (dotted) and attack ε (dashed)"
                          if config.exact else "Sorted certified ε (solid) and attack ε (dashed)")
        write_summary_md(run_dir / SUMMARY_FILE, title=f"certify area: {model_path.name} on "
                         f"{config.dataset}/{config.split}", summaries=summaries,
                         settings=_md_settings(settings), figures={
                             sorted_caption: SORTED_FIGURE,
                             "Certified accuracy (solid: certified ε > x) and attack accuracy "
                             "(dashed: no adversarial example at x or below), in percent":
                                 ACCURACY_FIGURE})
        if (run_dir / SHARDS_DIR).is_dir():  # merged into per_sample.csv
            shutil.rmtree(run_dir / SHARDS_DIR)
        return summaries

    summaries = distributed.run_on_main(write_final)
    return AreaRun(run_dir, settings, tuple(final), summaries, True)


def _with_exact(rows: list[SampleRow], result: Any) -> list[SampleRow]:
    """`rows` with the exact eps and status of `result` (an ExactResult of the same samples)."""
    position = {int(i): k for k, i in enumerate(result.index.tolist())}
    out = []
    for row in rows:
        k = position[row.index]
        status = result.status[k]
        value = float(result.exact_eps[k])
        out.append(replace(row, exact_eps=None if math.isnan(value) else value,
                           exact_status=status if status != "unknown"
                           else f"unknown: {result.reason[k]}"))
    return out


def _md_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("model", "dataset", "split", "n", "methods", "attack", "eps_max", "tol", "search",
            "dtype", "seed") + (("exact", "exact_time_limit") if settings.get("exact") else ())
    return {k: ", ".join(map(str, settings[k])) if isinstance(settings[k], list) else settings[k]
            for k in keys}


def _write_results(run_dir: Path, settings: Mapping[str, Any], rows: Sequence[SampleRow],
                   config: AreaConfig, *, complete: bool, wall: float,
                   attack_seconds: float, exact_seconds: float = 0.0) -> dict[str, MethodSummary]:
    grid = config.eps_grid if config.eps_grid is not None else default_eps_grid(rows)
    summaries = summarize(rows, eps_grid=grid) if rows else {}
    atomic_write_json(run_dir / RESULTS_FILE, json_safe({
        "status": "complete" if complete else "partial",
        "n_done": len({r.index for r in rows}),
        "n_total": len(settings["indices"]),
        "settings": {k: v for k, v in settings.items() if k != "indices"},
        "versions": _versions(config.engine),
        "eps_grid": list(grid),
        "summary": {m: s.as_dict() for m, s in summaries.items()},
        "attack_seconds": attack_seconds,
        **({"exact_seconds": exact_seconds} if config.exact else {}),
        "wall_seconds_this_session": wall,
    }))
    return summaries


def write_figures(run_dir: str | os.PathLike[str], rows: Sequence[SampleRow], *,
                  label: str, tol: float | None = None) -> None:
    """Write ``sorted_eps.png`` and ``certified_accuracy.png`` of one run's rows."""
    from certify.report.plots import (
        caption,
        plot_certified_accuracy,
        plot_sorted_eps,
        runs_from_rows,
        save_figure,
    )

    runs = runs_from_rows(rows, label)
    run_dir = Path(run_dir)
    note = caption(rows, tol=tol)
    save_figure(plot_sorted_eps(runs, caption=note), run_dir / SORTED_FIGURE)
    save_figure(plot_certified_accuracy(runs, caption=note), run_dir / ACCURACY_FIGURE)


def read_run(run_dir: str | os.PathLike[str]) -> AreaRun:
    """Read a run folder written by :func:`run_area` (complete or not), without recomputing.

    Raises:
        ReportError: not a run folder, or malformed files.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder not found: {run_dir}. Pass a folder written by "
                          "`certify area` (reports/area/...)")
    config = read_json(run_dir / CONFIG_FILE)
    settings = config.get("settings") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise ReportError(f"{run_dir / CONFIG_FILE} has no 'settings'; was it written by "
                          "`certify area`?")
    rows = read_sample_csv(run_dir / SAMPLES_FILE)
    methods = settings.get("methods") or sorted({r.method for r in rows})
    grid = settings.get("eps_grid")
    summaries = summarize(rows, eps_grid=grid) if rows else {}
    complete = len(rows) == len(settings.get("indices", [])) * len(methods)
    return AreaRun(run_dir, settings, tuple(rows), summaries, complete)
