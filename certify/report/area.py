"""Reading and drawing ``certify area`` run folders (nothing here computes a bound).

A run folder (written by :class:`certify.run.folder.RunFolder`, see :mod:`certify.run.area`)::

    config.json            every resolved option, the model's sha256, versions, git SHA
    per_sample.csv         one row per sample and method (see certify.records)
    results.json           status, settings, versions and the summary per method
    sorted_eps.png         certified eps of every sample in increasing order, attack eps dashed
                           (and with ``exact``, the exact eps dotted)
    certified_accuracy.png certified accuracy (solid) and attack accuracy (dashed) vs eps
    summary.md             the tables and links to the figures

:func:`read_run` reads one back (complete or not) and :func:`write_area_summary` summarises
its rows; :func:`certify.report.plots.write_figures` draws them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certify.errors import ReportError
from certify.records import (
    ACCURACY_FIGURE,
    CONFIG_FILE,
    RESULTS_FILE,
    SAMPLES_FILE,
    SORTED_FIGURE,
    SUMMARY_FILE,
    SampleRow,
    read_json,
    read_sample_csv,
)
from certify.report.summary import MethodSummary, summarize, write_summary_md

__all__ = [
    "ACCURACY_FIGURE",
    "CONFIG_FILE",
    "RESULTS_FILE",
    "SAMPLES_FILE",
    "SORTED_FIGURE",
    "SUMMARY_FILE",
    "AreaRun",
    "read_run",
    "write_area_summary",
]


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


def write_area_summary(run_dir: str | os.PathLike[str], *, title: str,
                       summaries: Mapping[str, MethodSummary],
                       settings: Mapping[str, Any]) -> None:
    """Write ``summary.md``: the tables, the main settings and links to the two figures."""
    sorted_caption = ("Sorted certified ε (solid), exact ε (dotted) and attack ε (dashed)"
                      if settings.get("exact") else
                      "Sorted certified ε (solid) and attack ε (dashed)")
    write_summary_md(Path(run_dir) / SUMMARY_FILE, title=title, summaries=summaries,
                     settings=_md_settings(settings), figures={
                         sorted_caption: SORTED_FIGURE,
                         "Certified accuracy (solid: certified ε > x) and attack accuracy "
                         "(dashed: no adversarial example at x or below), in percent":
                             ACCURACY_FIGURE})


def _md_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("model", "dataset", "split", "n", "methods", "attack", "eps_max", "tol", "search",
            "dtype", "seed") + (("exact", "exact_time_limit") if settings.get("exact") else ())
    return {k: ", ".join(map(str, settings[k])) if isinstance(settings[k], list) else settings[k]
            for k in keys}


def read_run(run_dir: str | os.PathLike[str]) -> AreaRun:
    """Read a run folder written by ``certify area`` (complete or not), without recomputing.

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
