"""``certify compare``: certify several models the same way and report them side by side.

For each model, :func:`compare_models` runs :func:`certify.run.area.run_area` -- or reuses a
saved run: runs live in a cache folder keyed by the model's sha256 and a hash of the settings,
so the same model with the same settings is never certified twice (an interrupted run there is
resumed). Then it writes one report folder::

    compare.csv / compare.md   one row per model: parameters, clean accuracy, PGD accuracy at the
                               given eps, certification area, certified accuracy at the given eps,
                               mean certified/attack ratio
    sorted_eps.png             sorted certified eps (solid) and attack eps (dashed), one colour
                               per model (the thesis's Figs 8.30/8.31, 8.47/8.48)
    certified_accuracy.png     certified (solid) and attack (dashed) accuracy vs eps
    compare.json               the table as numbers, the settings and the run folders

Under ``torchrun`` each area run is sharded over the ranks (see :mod:`certify.run.area`);
rank 0 alone looks up and clears the cache and writes the report, and tells the other ranks what
it found, so ``torchrun --nproc_per_node=N -m certify compare ...`` writes what one process does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from certify.errors import ReportError, SpecError

TABLE_CSV = "compare.csv"
TABLE_MD = "compare.md"
TABLE_JSON = "compare.json"
SORTED_FIGURE = "sorted_eps.png"
ACCURACY_FIGURE = "certified_accuracy.png"
DEFAULT_CACHE = Path("reports") / "cache" / "area"


@dataclass(frozen=True)
class CompareRow:
    """One model's line of the comparison table (accuracies are fractions).

    Attributes:
        label: Model name (legend and table).
        path: Model file.
        parameters: Number of parameters (None for a model that cannot be counted).
        clean_accuracy: On the certified samples.
        pgd_accuracy: Attack accuracy at `eps` (no adversarial example found at or below it).
        certification_area: Mean certified eps over the samples (misclassified count 0).
        certified_accuracy: Fraction certified at `eps`.
        mean_ratio: Mean certified/attack eps over correct samples with a finite attack eps.
        eps: The eps of the two "at eps" columns.
        run_dir: The area run used.
    """

    label: str
    path: str
    parameters: int | None
    clean_accuracy: float
    pgd_accuracy: float
    certification_area: float
    certified_accuracy: float
    mean_ratio: float
    eps: float
    run_dir: str

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_models`."""

    rows: tuple[CompareRow, ...]
    runs: tuple[Any, ...]          # certify.report.area.AreaRun, one per model
    out_dir: Path | None


def settings_key(config: Any, model_sha256: str) -> str:
    """Cache key of an area run: the model's sha256 and every setting that changes numbers."""
    from dataclasses import asdict

    d = asdict(config)
    d.pop("model", None)
    d.pop("data_dir", None)
    d["model_sha256"] = model_sha256
    text = json.dumps(d, sort_keys=True, default=str)
    return f"{model_sha256[:16]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def cached_area(config: Any, *, cache_dir: str | os.PathLike[str] = DEFAULT_CACHE,
                quiet: bool = False) -> Any:
    """`run_area(config)` in a cache folder keyed by model sha256 and settings; reuse if there.

    A complete run with identical settings is read back without recomputing; a partial one is
    resumed; a folder whose settings do not match (e.g. an older format) is replaced. Under
    ``torchrun`` rank 0 makes these decisions and tells the others, every rank takes part in
    the (sharded) area run, and every rank returns the same run.

    Returns:
        The :class:`certify.report.area.AreaRun`.
    """
    from certify import distributed
    from certify._io import sha256_file
    from certify.errors import CheckpointError, DistributedError
    from certify.records import CONFIG_FILE
    from certify.report.area import read_run
    from certify.run.area import run_area

    path = Path(config.model)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}. Pass an existing .pt or .onnx file")
    run_dir = Path(cache_dir) / settings_key(config, sha256_file(path))

    def look_up() -> tuple[str, Any]:
        if not (run_dir / CONFIG_FILE).is_file():
            return "new", None
        try:
            run = read_run(run_dir)
        except ReportError:
            shutil.rmtree(run_dir)
            return "new", None
        if run.complete and run.settings.get("model_sha256") == sha256_file(path):
            return "reuse", run
        return "resume", None

    decision, cached = distributed.run_on_main(look_up)
    if decision == "reuse":
        return cached
    if decision == "resume":
        try:
            return run_area(config, out_dir=run_dir, resume=True, quiet=quiet)
        except (ReportError, SpecError, DistributedError) as e:
            # rank 0 raised the cache folder's own error (the others hear of it as a
            # DistributedError): the folder is stale; any other failure is the run's own
            if not distributed.broadcast_object(isinstance(e, (ReportError, SpecError))):
                raise
            if distributed.is_main():
                shutil.rmtree(run_dir)
    return run_area(config, out_dir=run_dir, quiet=quiet)


def _row(run: Any, label: str, path: str, method: str, eps: float) -> CompareRow:
    from certify.report.summary import summarize_method

    rows = run.rows_of(method)
    if not rows:
        raise ReportError(f"run {run.run_dir} has no rows for method {method}")
    s = summarize_method(rows, [eps])
    pgd = s.attack_accuracy[0][1] if s.attack_accuracy else math.nan
    return CompareRow(label, path, _parameters(path), s.clean_accuracy, pgd,
                      s.certification_area, s.certified_accuracy[0][1], s.mean_ratio, eps,
                      str(run.run_dir))


def _parameters(path: str) -> int | None:
    from certify.model_io import load_model
    from certify.nets import count_parameters

    try:
        model, _ = load_model(Path(path))
    except Exception:  # noqa: BLE001 - a count is informative only; the run already loaded it
        return None
    return count_parameters(model)


def compare_models(models: Sequence[str | os.PathLike[str]], dataset: str, *,
                   labels: Sequence[str] | None = None, method: str = "crown",
                   n: int | None = 200, eps: float | None = None,
                   eps_grid: Sequence[float] | None = None, eps_max: float = 0.5,
                   tol: float = 1e-4, attack_steps: int = 40, seed: int = 0,
                   device: str = "cpu", data_dir: str | os.PathLike[str] | None = None,
                   cache_dir: str | os.PathLike[str] = DEFAULT_CACHE,
                   out_dir: str | os.PathLike[str] | None = None, title: str | None = None,
                   quiet: bool = False) -> Comparison:
    """Certify (or reuse) every model with the same settings and write one comparison report.

    Args:
        models: Model files.
        dataset: Dataset name (test split).
        labels: Names for the table and legends (default: file stems).
        method: Bound method of the certified eps.
        n: The first `n` test samples (None: all).
        eps: The eps of the "PGD accuracy" and "certified accuracy" columns (default: the
            median of the models' mean attack eps, rounded).
        eps_grid: Radii of the certified accuracy tables in each run.
        eps_max, tol, attack_steps, seed, device, data_dir: Passed to each area run.
        cache_dir: Where area runs are kept, keyed by model sha256 and settings.
        out_dir: Report folder, or None to write nothing but the cache.
        title: Title prefix of the figures.
        quiet: No progress output.
    Returns:
        :class:`Comparison` (on every rank under torchrun: the area runs are sharded over the
        ranks, the cache and the report are handled by rank 0).
    Raises:
        SpecError, CheckpointError, DatasetError: bad options, a missing model, another dataset.
        DistributedError: under torchrun, when any rank failed (naming it).
        RunLockedError: another live run writes into `out_dir`.
    """
    from certify.run.area import AreaConfig
    from certify.study.attack_curves import model_labels

    if not models:
        raise SpecError("give at least one model file to compare")
    names = model_labels(models, labels)
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise SpecError("{eps} must be >= 0", eps=eps)
    base = AreaConfig(model="", dataset=dataset, n=n, methods=(method,), eps_max=eps_max,
                      tol=tol, attack_steps=attack_steps, seed=seed, device=device,
                      data_dir=str(data_dir) if data_dir is not None else None,
                      eps_grid=tuple(eps_grid) if eps_grid is not None else None)
    with contextlib.ExitStack() as held:
        if out_dir is not None:  # one run per report folder; stale temporaries go
            from certify._lock import hold_output

            held.enter_context(hold_output(out_dir, command="compare"))
        return _compare(models, names, base, method=method, eps=eps, cache_dir=cache_dir,
                        out_dir=out_dir, title=title, quiet=quiet)


def _compare(models: Sequence[str | os.PathLike[str]], names: Sequence[str], base: Any, *,
             method: str, eps: float | None, cache_dir: str | os.PathLike[str],
             out_dir: str | os.PathLike[str] | None, title: str | None,
             quiet: bool) -> Comparison:
    """:func:`compare_models` once its report folder is locked."""
    from certify import distributed

    runs = []
    for path in models:
        config = replace(base, model=str(path))
        config.validate()
        runs.append(cached_area(config, cache_dir=cache_dir, quiet=quiet))

    def report() -> Comparison:
        at = eps if eps is not None else _default_eps(runs, method)
        rows = tuple(_row(r, lab, str(p), method, at) for r, lab, p in
                     zip(runs, names, models, strict=True))
        result = Comparison(rows, tuple(runs), Path(out_dir) if out_dir is not None else None)
        if out_dir is not None:
            write_comparison(out_dir, result, method=method, title=title)
        return result

    return distributed.run_on_main(report)  # under torchrun: written by rank 0, given to all


def _default_eps(runs: Sequence[Any], method: str) -> float:
    from certify.report.summary import _nice_ceiling

    means = sorted(s.mean_attack_eps for r in runs for m, s in r.summaries.items()
                   if m == method and math.isfinite(s.mean_attack_eps))
    if not means:
        return 0.01
    return _nice_ceiling(means[len(means) // 2] / 2)


def table_markdown(rows: Sequence[CompareRow], *, method: str) -> str:
    """The comparison table in markdown."""
    if not rows:
        return ""
    e = rows[0].eps
    head = ("| model | parameters | clean accuracy | PGD accuracy at ε=" f"{e:g}"
            f" | certification area ({method}) | certified accuracy at ε={e:g} "
            "| mean certified/attack ratio |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = f"{r.parameters:,}" if r.parameters is not None else "?"
        lines.append(f"| {r.label} | {params} | {100 * r.clean_accuracy:.2f}% | "
                     f"{100 * r.pgd_accuracy:.2f}% | {r.certification_area:.5f} | "
                     f"{100 * r.certified_accuracy:.2f}% | {_ratio(r.mean_ratio)} |")
    return "\n".join(lines) + "\n"


def _ratio(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "–"


def write_comparison(out_dir: str | os.PathLike[str], comparison: Comparison, *,
                     method: str, title: str | None = None) -> Path:
    """Write the table (CSV, markdown, JSON) and the two overlaid figures into `out_dir`."""
    from certify._io import atomic_write_csv, atomic_write_json, atomic_write_text, ensure_dir
    from certify.report.plots import caption, plot_certified_accuracy, plot_sorted_eps, save_figure
    from certify.report.results import json_safe

    out = ensure_dir(out_dir)
    rows = comparison.rows
    fields = list(CompareRow.__dataclass_fields__)
    atomic_write_csv(out / TABLE_CSV, fields, ([getattr(r, k) for k in fields] for r in rows))
    atomic_write_json(out / TABLE_JSON, json_safe({
        "method": method, "rows": [r.as_dict() for r in rows]}))
    runs = {r.label: run.rows_of(method) for r, run in zip(rows, comparison.runs, strict=True)}
    prefix = f"{title}: " if title else ""
    tols = {run.settings.get("tol") for run in comparison.runs}
    tol = tols.pop() if len(tols) == 1 else None
    note = caption(runs, tol=tol if isinstance(tol, (int, float)) else None)
    save_figure(plot_sorted_eps(runs, title=f"{prefix}sorted certified ({method}) and attack ε",
                                caption=note), out / SORTED_FIGURE)
    save_figure(plot_certified_accuracy(runs, title=f"{prefix}certified and PGD accuracy",
                                        caption=note), out / ACCURACY_FIGURE)
    md = [f"# {title or 'Model comparison'}", "", table_markdown(rows, method=method),
          f"Every column of a row from the same test points ({note}): certified ε by `{method}`; "
          "PGD accuracy at ε: correctly classified and no adversarial example found at ε or below "
          "by the per-sample minimal-ε PGD search (its attack ε, an upper bound on the true "
          "distance). Certification area = mean certified ε over the test points (misclassified "
          "count 0).",
          "", f"![sorted ε]({SORTED_FIGURE})", "", f"![certified accuracy]({ACCURACY_FIGURE})",
          ""]
    atomic_write_text(out / TABLE_MD, "\n".join(md))
    return out
