"""RunFolder: rows appended per batch, read back to resume (torn last line cut), finalized once."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
from pathlib import Path

import pytest

import certify._io
import certify.run.folder as folder_module
from certify.errors import DiskFullError, ReportError, RunLockedError
from certify.records import EXACT_COLUMNS, SAMPLE_COLUMNS, SampleRow, read_sample_csv
from certify.run.folder import RunFolder, check_run_folder


def row(index: int, method: str = "crown", *, exact: bool = False) -> SampleRow:
    return SampleRow(index, index % 10, index % 10 if index % 7 else (index + 1) % 10, method,
                     0.01 * (index % 5), math.inf if index % 3 == 0 else 0.1 + index / 1000,
                     3 + index % 4, 0.25, 0.02,
                     exact_eps=(0.05 if exact else None),
                     exact_status=("optimal" if exact else ""))


def header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


def test_append_writes_the_header_once_and_reads_back_every_row(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    first, second = [row(i) for i in range(4)], [row(i, "ibp") for i in range(4)]
    folder.append(first)
    folder.append(second)
    assert header(folder.samples_file) == list(SAMPLE_COLUMNS)
    assert folder.samples_file.read_text().count("index,") == 1
    assert folder.read_rows() == first + second
    assert read_sample_csv(folder.samples_file) == first + second


def test_exact_rows_carry_the_exact_columns(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, exact=True)
    rows = [row(i, exact=True) for i in range(3)]
    folder.append(rows)
    assert header(folder.samples_file) == [*SAMPLE_COLUMNS, *EXACT_COLUMNS]
    assert folder.read_rows() == rows


def test_append_never_reads_or_rewrites_the_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear cost: a batch's append costs its own rows, whatever the file holds."""
    folder = RunFolder(tmp_path)
    folder.append([row(i) for i in range(50)])

    def no(*a: object, **k: object) -> None:
        raise AssertionError("append read or rewrote the whole file")

    monkeypatch.setattr(folder_module, "read_sample_csv", no)
    monkeypatch.setattr(folder_module, "atomic_write_text", no)
    monkeypatch.setattr(folder_module, "write_sample_csv", no)
    before = folder.samples_file.stat().st_size
    folder.append([row(50)])
    added = folder.samples_file.stat().st_size - before
    assert 0 < added < 100  # one line


def test_a_torn_last_line_is_cut_and_appending_goes_on(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    rows = [row(i) for i in range(5)]
    folder.append(rows)
    with open(folder.samples_file, "a") as f:  # a killed process's half-written row
        f.write("5,5,5,crown,0.0")
    assert folder.read_rows() == rows
    assert folder.samples_file.read_text().endswith("\n")
    folder.append([row(5)])
    assert folder.read_rows() == [*rows, row(5)]


def test_a_torn_header_leaves_an_empty_file_that_gets_a_header(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.samples_file.write_text("index,la")
    assert folder.read_rows() == []
    assert folder.samples_file.read_text() == ""
    folder.append([row(1)])
    assert folder.read_rows() == [row(1)]


def test_a_file_with_other_columns_is_rewritten_with_the_folders(tmp_path: Path) -> None:
    plain = RunFolder(tmp_path)
    plain.append([row(1)])
    exact = RunFolder(tmp_path, exact=True)
    assert exact.read_rows() == [row(1)]
    assert header(exact.samples_file) == [*SAMPLE_COLUMNS, *EXACT_COLUMNS]
    exact.append([row(2, exact=True)])
    assert exact.read_rows() == [row(1), row(2, exact=True)]


def test_resume_reads_the_main_file_then_every_shard(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append([row(0), row(1)])
    folder.append([row(2)], rank=1)
    folder.append([row(3)], rank=0)
    folder.append([row(1, "ibp")], rank=1)
    assert folder.shard_file(1) == tmp_path / "shards" / "rank-1" / "per_sample.csv"
    assert [p.relative_to(tmp_path).as_posix() for p in folder.row_files()] == [
        "per_sample.csv", "shards/rank-0/per_sample.csv", "shards/rank-1/per_sample.csv"]
    assert folder.read_rows() == [row(0), row(1), row(3), row(2), row(1, "ibp")]


def test_a_failed_append_leaves_the_file_as_it_was(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = RunFolder(tmp_path)
    folder.append([row(0)])
    saved = folder.samples_file.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(certify._io.os, "fsync", full)  # the data was written, not synced
    with pytest.raises(DiskFullError, match="no space left on the device writing .*per_sample"):
        folder.append([row(1), row(2)])
    monkeypatch.undo()
    assert folder.samples_file.read_bytes() == saved
    assert folder.read_rows() == [row(0)]


def test_finalize_writes_the_final_files_and_removes_the_shards(tmp_path: Path) -> None:
    from certify.report.summary import summarize

    folder = RunFolder(tmp_path)
    folder.write_config({"methods": ["crown"], "indices": [0, 1, 2, 3]}, {"certify": "x"})
    folder.append([row(2), row(3)], rank=1)
    folder.append([row(0), row(1)], rank=0)
    final = [row(i) for i in range(4)]
    summaries = summarize(final, eps_grid=[0.0, 0.01])
    settings = {"model": "m.pt", "dataset": "digits", "split": "test", "n": 4,
                "methods": ["crown"], "attack": "pgd", "eps_max": 0.5, "tol": 1e-4,
                "search": "fast", "dtype": "float32", "seed": 0, "exact": False}
    folder.finalize(final, {"status": "complete", "attack_seconds": math.inf},
                    title="certify area: m.pt", settings=settings, summaries=summaries,
                    label="m", tol=1e-4)
    assert read_sample_csv(folder.samples_file) == final
    assert json.loads(folder.results_file.read_text()) == {"status": "complete",
                                                           "attack_seconds": None}
    for name in ("summary.md", "sorted_eps.png", "certified_accuracy.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert "sorted_eps.png" in (tmp_path / "summary.md").read_text()
    assert not folder.shards_dir.exists()
    assert folder.read_settings()["indices"] == [0, 1, 2, 3]
    assert list(tmp_path.glob(".*.tmp")) == []


def test_new_folders_are_unique_and_a_locked_folder_is_refused(tmp_path: Path) -> None:
    a = RunFolder.new_path(tmp_path, "area", "m")
    b = RunFolder.new_path(tmp_path, "area", "m")
    assert a != b and a.parent == b.parent == tmp_path / "area" and a.name.endswith("-m")
    folder = RunFolder(a)
    assert not folder.has_run()
    with contextlib.ExitStack() as held:
        folder.lock(held)
        (a / ".per_sample.csv.abcd1234.tmp").write_text("half")  # a killed run's temporary
        with contextlib.ExitStack() as other, pytest.raises(RunLockedError):
            RunFolder(a).lock(other)
    with contextlib.ExitStack() as held:
        RunFolder(a).lock(held)  # free again; the stale temporary goes
    assert list(a.glob("*.tmp")) + list(a.glob(".*.tmp")) == []
    folder.append([row(0)])
    assert folder.has_run()


def test_rows_without_a_config_are_not_a_run_to_continue(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    check_run_folder(folder)
    folder.append([row(0)])
    with pytest.raises(ReportError, match="no config.json"):
        check_run_folder(folder)
