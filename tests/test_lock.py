"""Run locks (certify._lock) and the removal of stale temporary files (certify._io)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from certify import _lock
from certify._io import atomic_write_text, remove_stale_temporaries
from certify._lock import lock_path, run_lock
from certify.errors import RunLockedError


def holder(lock: Path) -> dict[str, object]:
    return json.loads(lock.read_text())


def test_a_held_lock_refuses_a_second_holder_and_is_removed_after(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_lock(run, command="area") as lock:
        assert lock == run / ".certify.lock"
        assert holder(lock)["pid"] == os.getpid() and holder(lock)["command"] == "area"
        with pytest.raises(RunLockedError, match=rf"in use by `certify area`, pid {os.getpid()}"):
            with run_lock(run, command="experiment"):
                pass
        assert holder(lock)["command"] == "area"  # the refused run changed nothing
    assert not lock.exists()
    with run_lock(run, command="experiment") as lock:  # free again
        assert holder(lock)["command"] == "experiment"


def test_the_lock_is_released_when_the_run_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError), run_lock(tmp_path, command="area"):
        raise ValueError("a crash")
    with run_lock(tmp_path, command="area"):
        pass


def test_a_file_output_is_locked_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "models" / "m.pt"
    assert lock_path(out, folder=False) == tmp_path / "models" / ".m.pt.lock"
    with run_lock(out, command="train", folder=False):
        with pytest.raises(RunLockedError, match="m.pt is in use by `certify train`"):
            with run_lock(out, command="train", folder=False):
                pass
        with run_lock(tmp_path / "models" / "n.pt", command="train", folder=False):
            pass  # another output of the same folder is free
    assert list((tmp_path / "models").iterdir()) == []


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    script = ("import os, signal\nfrom certify._lock import run_lock\n"
              f"with run_lock({str(tmp_path)!r}, command='area'):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert child.returncode == -signal.SIGKILL
    lock = tmp_path / ".certify.lock"
    assert holder(lock)["pid"] != os.getpid()  # the dead run's record is still there
    with run_lock(tmp_path, command="area"):
        assert holder(lock)["pid"] == os.getpid()


def _record(lock: Path, pid: int, host: str) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host, "command": "area",
                                "started": "2024-01-01T00:00:00"}))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_without_flock_the_pid_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system without flock: a live holder on this host refuses, a dead one not."""
    monkeypatch.setattr(_lock, "_try_flock", lambda fd: None)
    lock = tmp_path / ".certify.lock"
    _record(lock, os.getppid(), socket.gethostname())  # alive: the process that started us
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()} on {socket.gethostname()}"):
        with run_lock(tmp_path, command="area"):
            pass
    _record(lock, _dead_pid(), socket.gethostname())
    with run_lock(tmp_path, command="area"):
        assert holder(lock)["pid"] == os.getpid()


def test_a_lock_recorded_on_another_host_is_refused_with_the_file_to_delete(
        tmp_path: Path) -> None:
    lock = tmp_path / ".certify.lock"
    _record(lock, 4242, "another-node")
    with pytest.raises(RunLockedError, match=rf"pid 4242 on another-node.*delete {lock}"):
        with run_lock(tmp_path, command="area"):
            pass
    assert holder(lock)["host"] == "another-node"
    lock.unlink()  # what the message says to do once that run is over
    with run_lock(tmp_path, command="area"):
        pass


def test_an_unwritable_place_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunLockedError, match="cannot lock"):
        with run_lock(blocker / "run", command="area"):
            pass


def test_stale_temporaries_of_a_folder_and_of_a_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "shards" / "rank-0").mkdir(parents=True)
    stale = [run / ".per_sample.csv.abcd_123.tmp", run / "shards" / "rank-0" /
             ".per_sample.csv.x1y2z3w4.tmp"]
    kept = [run / "per_sample.csv", run / "notes.tmp", run / ".hidden.tmp"]
    for p in stale + kept:
        p.write_text("x")
    assert sorted(remove_stale_temporaries(run, folder=True)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)

    models = tmp_path / "models"
    models.mkdir()
    mine = [models / ".m.pt.abcdefgh.tmp", models / ".m.pt.partial.abcdefgh.tmp",
            models / ".m.pt.train.partial.abcdefgh.tmp"]
    others = [models / ".n.pt.abcdefgh.tmp", models / ".m.pt.lock", models / "m.pt"]
    for p in mine + others:
        p.write_text("x")
    assert sorted(remove_stale_temporaries(models / "m.pt", folder=False)) == sorted(mine)
    assert all(p.exists() for p in others)


def test_atomic_writes_name_their_temporaries_as_the_cleanup_expects(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write killed half-way leaves exactly what remove_stale_temporaries removes."""
    import certify._io as io_module

    monkeypatch.setattr(io_module.os, "replace", lambda *a: None)
    atomic_write_text(tmp_path / "results.json", "{}")  # 'killed' before its rename
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".results.json.")
    monkeypatch.undo()
    assert remove_stale_temporaries(tmp_path, folder=True) == left
