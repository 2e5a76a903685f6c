"""A run folder: the files of a run, appended batch by batch and finalized once.

:class:`RunFolder` owns the file names (:mod:`certify.records` lists them) and every write into
the folder:

- ``config.json`` first, before any work (so that ``--resume`` finds the run);
- rows **appended** to ``per_sample.csv`` (or, under torchrun, to this rank's
  ``shards/rank-<r>/per_sample.csv``) as each batch and method finishes: the cost of a batch is
  that of its own rows, so a run's writing cost is linear in its samples;
- ``results.json`` with status ``partial`` when the run starts and when it stops early;
- at the end (:meth:`RunFolder.finalize`): ``per_sample.csv`` rewritten once in its final order,
  ``results.json``, the figures and ``summary.md``, each written atomically; ``shards/`` removed.

A run that stops (a crash, Ctrl-C, a full disk, a SIGKILL) keeps every row appended before:
:meth:`RunFolder.read_rows` reads them back for ``--resume``, first cutting a torn last line
(the half-written row of a killed process) back to the last complete one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from certify._io import append_text, atomic_write_json, atomic_write_text, ensure_dir
from certify.errors import ReportError
from certify.records import (
    ACCURACY_FIGURE,
    CONFIG_FILE,
    RESULTS_FILE,
    SAMPLES_FILE,
    SHARDS_DIR,
    SORTED_FIGURE,
    SUMMARY_FILE,
    SampleRow,
    csv_columns,
    csv_lines,
    json_safe,
    read_json,
    read_sample_csv,
    write_sample_csv,
)


class RunFolder:
    """The folder of one run and the only writer of its files.

    Args:
        path: The folder.
        command: The command that writes it (named in its lock), e.g. ``area``.
        exact: Whether rows carry the exact columns (``exact_eps``, ``exact_status``).
    """

    CONFIG_FILE = CONFIG_FILE
    SAMPLES_FILE = SAMPLES_FILE
    RESULTS_FILE = RESULTS_FILE
    SUMMARY_FILE = SUMMARY_FILE
    SORTED_FIGURE = SORTED_FIGURE
    ACCURACY_FIGURE = ACCURACY_FIGURE
    SHARDS_DIR = SHARDS_DIR

    def __init__(self, path: str | os.PathLike[str], *, command: str = "area",
                 exact: bool = False) -> None:
        self.path = Path(path)
        self.command = command
        self.columns = csv_columns(exact=exact)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------------------ names

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def shards_dir(self) -> Path:
        return self.path / SHARDS_DIR

    def shard_file(self, rank: int) -> Path:
        """Rank `rank`'s rows under torchrun (merged into ``per_sample.csv`` at the end)."""
        return self.shards_dir / f"rank-{rank}" / SAMPLES_FILE

    # ------------------------------------------------------------------------ the folder

    @staticmethod
    def new_path(root: str | os.PathLike[str], command: str, stem: str) -> Path:
        """Create a fresh default folder ``<root>/<command>/<YYYYmmdd-HHMMSS>-<stem>``.

        Runs started in the same second get ``-2``, ``-3``, ... (the folder is created
        atomically: two runs never share one).
        """
        base = Path(root) / command / f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{stem}"
        base.parent.mkdir(parents=True, exist_ok=True)
        path, k = base, 2
        while True:
            try:
                path.mkdir()
                return path
            except FileExistsError:
                path = base.with_name(f"{base.name}-{k}")
                k += 1

    def lock(self, held: contextlib.ExitStack) -> None:
        """Create and lock the folder for this run (into `held`); remove the temporary files a
        killed run left.

        Raises:
            OutputError: a file is in the way, or the place is read-only.
            RunLockedError: another live run holds the folder.
        """
        from certify._io import remove_stale_temporaries
        from certify._lock import run_lock

        ensure_dir(self.path)
        held.enter_context(run_lock(self.path, command=self.command))
        remove_stale_temporaries(self.path, folder=True)

    def has_run(self) -> bool:
        """Whether the folder already holds a run (a config or rows)."""
        return self.config_file.exists() or self.samples_file.exists()

    def write_config(self, settings: Mapping[str, Any], versions: Mapping[str, Any]) -> None:
        """Write ``config.json`` (settings, versions, creation time), before any work."""
        atomic_write_json(self.config_file, json_safe({
            "command": self.command, "settings": dict(settings), "versions": dict(versions),
            "created": _dt.datetime.now().isoformat(timespec="seconds")}))

    def read_settings(self) -> dict[str, Any]:
        """The settings ``config.json`` records.

        Raises:
            ReportError: a missing or corrupt ``config.json``.
        """
        config = read_json(self.config_file)
        settings = config.get("settings") if isinstance(config, dict) else None
        return settings if isinstance(settings, dict) else {}

    # -------------------------------------------------------------------------------- rows

    def append(self, rows: Sequence[SampleRow], *, rank: int | None = None) -> None:
        """Append `rows` to ``per_sample.csv`` (or to rank `rank`'s shard file).

        Writes the header first into a new or empty file. The cost is that of `rows` alone.

        Raises:
            DiskFullError: the device is full; the file keeps the rows appended before.
        """
        path = self.samples_file if rank is None else self.shard_file(rank)
        if rank is not None:
            ensure_dir(path.parent)
        fresh = not path.is_file() or path.stat().st_size == 0
        append_text(path, csv_lines(rows, self.columns, header=fresh))

    def row_files(self) -> list[Path]:
        """``per_sample.csv`` and every shard's file, in reading order (later files win)."""
        files = [self.samples_file] if self.samples_file.is_file() else []
        if self.shards_dir.is_dir():
            files += sorted(self.shards_dir.glob(f"rank-*/{SAMPLES_FILE}"))
        return files

    def read_rows(self) -> list[SampleRow]:
        """Every row saved so far: ``per_sample.csv``, then every shard's file.

        Repairs each file first (:meth:`repair`), so that appending can continue after it.

        Raises:
            ReportError: a file with missing columns or malformed values.
        """
        rows: list[SampleRow] = []
        for path in self.row_files():
            self.repair(path)
            rows.extend(read_sample_csv(path))
        return rows

    def repair(self, path: Path) -> None:
        """Make `path` a file rows can be appended to: whole lines, this folder's header.

        A last line without its newline is the half-written row of a killed process: it is
        cut off (that row is computed again). A file whose header names other columns (e.g.
        written without the exact columns) is rewritten atomically with :attr:`columns`.
        """
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]
            with open(path, "r+b") as f:
                f.truncate(len(data))
                f.flush()
                os.fsync(f.fileno())
        if not data:
            return
        header = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
        if header.split(",") != list(self.columns):
            atomic_write_text(path, csv_lines(read_sample_csv(path), self.columns, header=True))

    # ------------------------------------------------------------------------ status, end

    def write_results(self, results: Mapping[str, Any]) -> None:
        """Write ``results.json`` atomically (strict JSON: non-finite floats become null)."""
        atomic_write_json(self.results_file, json_safe(dict(results)))

    def finalize(self, rows: Iterable[SampleRow], results: Mapping[str, Any], *,
                 title: str, settings: Mapping[str, Any], summaries: Mapping[str, Any],
                 label: str, tol: float | None = None) -> None:
        """Write the finished run: ``per_sample.csv`` in its final order, ``results.json``,
        the figures and ``summary.md`` (each atomically); then remove ``shards/``.

        Args:
            rows: Every row, in the final order (sample position, then method).
            results: The content of ``results.json``.
            title: The title of ``summary.md``.
            settings: The run's settings (some are listed in ``summary.md``).
            summaries: Per-method :class:`certify.report.summary.MethodSummary`.
            label: The model's name in the figures' legends.
            tol: The search's tolerance, noted in the figures' captions.
        """
        from certify.report.area import write_area_summary
        from certify.report.plots import write_figures

        rows = list(rows)
        write_sample_csv(self.samples_file, rows)
        self.write_results(results)
        write_figures(self.path, rows, label=label, tol=tol)
        write_area_summary(self.path, title=title, summaries=summaries, settings=settings)
        if self.shards_dir.is_dir():  # merged into per_sample.csv
            shutil.rmtree(self.shards_dir)


def check_run_folder(folder: RunFolder) -> None:
    """Refuse to continue a folder with rows but no ``config.json`` (not a run of certify).

    Raises:
        ReportError: naming the folder and what to do.
    """
    if not folder.config_file.is_file() and folder.samples_file.exists():
        raise ReportError(f"{folder.path} holds {SAMPLES_FILE} but no {CONFIG_FILE}: not a run "
                          "certify can continue; pick another folder with -o")
