"""Nothing lost, nothing mixed: run locks, Ctrl-C, full disks, stale temporary files, seeds.

Two runs on one output (the second is refused, the first stays intact), a lock left by a killed
run (taken over), Ctrl-C of every long-running command (one line saying how to continue), a
disk that fills up mid-run (one line; ``--resume`` afterwards gives the uninterrupted result),
temporary files a SIGKILL left (removed by the next run), the same seed giving the same file,
and ``--num-samples`` spelled alike by every command that selects samples.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import certify._io
from tests.cli.cli_helpers import one_line_error, run, single_thread  # noqa: F401

pytest.importorskip("certify.bounds")

ROOT = Path(__file__).resolve().parents[2]
AREA_ARGS = ["--dataset", "digits", "--num-samples", "20", "--batch-size", "8", "--method",
             "ibp", "--method", "crown", "--quiet"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "per_sample.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp"))


def env() -> dict[str, str]:
    """The environment of a child certify process: this checkout first, one thread."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str],
             timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended ({proc.returncode}) before {what}: "
                                 f"{proc.communicate()[1]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# A `certify area` child that stops before its radius search number N (1-based) until the file
# named by GATE exists: it holds its run folder's lock while the test looks at it.
GATED_AREA = """
import os, sys, time
import certify.radius as radius
from certify.cli import main
real, calls = radius.certified_radii, [0]
def gated(*a, **k):
    calls[0] += 1
    if calls[0] == int(os.environ["GATE_AT"]):
        open(os.environ["GATE"] + ".waiting", "w").close()
        while not os.path.exists(os.environ["GATE"]):
            time.sleep(0.02)
    return real(*a, **k)
radius.certified_radii = gated
main(sys.argv[1:], prog_name="certify")
"""


def start_gated_area(tmp_path: Path, args: list[str], gate_at: int) -> tuple[
        subprocess.Popen[str], Path]:
    gate = tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, "-c", GATED_AREA, "area", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env(), GATE=str(gate), GATE_AT=str(gate_at)))
    wait_for(lambda: gate.with_name("gate.waiting").exists(), "the run to start", proc)
    return proc, gate


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "mlp.pt"
    done = run("train", "--dataset", "digits", "--arch", "mlp-32-16", "--epochs", "3", "-q",
               "-o", out)
    assert done.exit_code == 0, done.output
    return out


@pytest.fixture(scope="module")
def uninterrupted(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    done = run("area", model, *AREA_ARGS, "-o", out)
    assert done.exit_code == 0, done.output
    return out


# ----------------------------------------------------------------------------------- locks


def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_stays_intact(
        model: Path, uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first, gate = start_gated_area(tmp_path, [str(model), *AREA_ARGS, "-o", str(out)],
                                   gate_at=3)  # after its first batch is saved
    try:
        saved = (out / "per_sample.csv").read_bytes()
        second = run("area", model, "--dataset", "digits", "--num-samples", "20", "--method",
                     "crown", "--quiet", "-o", out)
        line = one_line_error(second)
        assert "in use by `certify area`" in line and f"pid {first.pid}" in line, line
        # resuming it is refused the same way, and neither touched the folder
        again = run("area", model, *AREA_ARGS, "-o", out, "--resume")
        assert f"pid {first.pid}" in one_line_error(again)
        assert (out / "per_sample.csv").read_bytes() == saved
    finally:
        gate.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((out / "config.json").read_text())["settings"]["methods"] == ["ibp",
                                                                                     "crown"]
    assert read_rows(out) == read_rows(uninterrupted)
    assert not (out / ".certify.lock").exists()


def test_a_killed_runs_lock_and_temporary_files_are_taken_over_on_resume(
        model: Path, uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed, gate = start_gated_area(tmp_path, [str(model), *AREA_ARGS, "-o", str(out)],
                                    gate_at=3)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    lock = out / ".certify.lock"
    assert json.loads(lock.read_text())["pid"] == killed.pid  # left behind, naming the dead run
    # what a kill in the middle of an atomic write leaves: a temporary file beside its target
    (out / ".per_sample.csv.k1ll3d_x.tmp").write_text("index,la")
    resumed = run("area", model, *AREA_ARGS, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert read_rows(out) == read_rows(uninterrupted)
    assert temporaries(out) == [] and not lock.exists()


def test_a_training_output_in_use_is_refused_and_its_stale_temporaries_go(
        tmp_path: Path) -> None:
    from certify._lock import run_lock

    out = tmp_path / "m.pt"
    args = ["train", "--dataset", "digits", "--arch", "scn-4-4", "--epochs", "1", "-q", "-o", out]
    with run_lock(out, command="train", folder=False):
        line = one_line_error(run(*args))
    assert "in use by `certify train`" in line and f"pid {os.getpid()}" in line
    assert not out.exists()
    stale = [tmp_path / ".m.pt.abcd1234.tmp", tmp_path / ".m.pt.partial.abcd1234.tmp"]
    other = tmp_path / ".n.pt.abcd1234.tmp"  # another output's: not this run's to remove
    for path in [*stale, other]:
        path.write_bytes(b"half a checkpoint")
    assert run(*args).exit_code == 0
    assert [p.exists() for p in stale] == [False, False] and other.exists()
    assert not (tmp_path / ".m.pt.lock").exists()


# ------------------------------------------------------------------------------------ Ctrl-C


def _interrupt(*a: Any, **k: Any) -> Any:
    raise KeyboardInterrupt


# (command line, the library function it calls, what the hint must say)
INTERRUPTIBLE = [
    (["train", "--dataset", "digits", "--arch", "mlp"], "certify.train.standard.train_standard",
     "--resume"),
    (["train", "--dataset", "digits", "--arch", "mlp", "--robust", "ibp", "--eps", "0.1"],
     "certify.train.robust.train_robust", "--resume"),
    (["distill", "{model}", "--student", "mlp"], "certify.train.distill.distill", "--resume"),
    (["prune", "{model}", "--ratio", "0.5"], "certify.train.prune.prune_checkpoint",
     "--resume"),
    (["retrain", "{model}", "--robust", "ibp", "--eps", "0.1"],
     "certify.train.robust.retrain_checkpoint", "--resume"),
    (["area", "{model}", "--dataset", "digits"], "certify.run.area.run_area", "--resume"),
    (["attack", "{model}", "--dataset", "digits"],
     "certify.study.attack_curves.run_attack_curves", "rerun the same command"),
    (["compare", "{model}", "--dataset", "digits"], "certify.study.compare.compare_models",
     "area runs in --cache are reused"),
    (["experiment", "{config}"], "certify.study.experiment.run_experiment",
     "finished stages and steps are reused"),
    (["demo"], "certify.study.demo.run_demo", "finished stages and steps are reused"),
    (["verify", "--instances", "{config}"], "certify.verify.run_instances",
     "finished instances are kept"),
]


@pytest.mark.parametrize(("args", "target", "hint"), INTERRUPTIBLE,
                         ids=[t.rsplit(".", 1)[1] for _, t, _ in INTERRUPTIBLE])
def test_ctrl_c_says_how_to_continue(args: list[str], target: str, hint: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _interrupt)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.pt").write_bytes(b"")
    (tmp_path / "c.toml").write_text("")
    args = [a.format(model="m.pt", config="c.toml") for a in args]
    result = run(*args)
    assert result.exit_code == 130, result.output
    assert "Aborted!" not in result.output and "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("interrupted: what was saved so far is valid;"), lines
    assert hint in lines[-1]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_of_a_real_training_run_prints_the_hint_and_keeps_its_state(
        tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    args = ["train", "--dataset", "digits", "--arch", "mlp-32-16", "--epochs", "100000", "-q",
            "-o", str(out)]
    # SIGINT as a terminal's Ctrl-C delivers it: a child of a runner that ignores SIGINT (a CI
    # job started in the background) inherits SIG_IGN, and Python then installs no handler
    proc = subprocess.Popen([sys.executable, "-m", "certify", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            preexec_fn=_default_sigint)
    wait_for(lambda: out.with_name("m.pt.partial").exists(), "the first epoch's state", proc)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        left = proc.communicate()[1]
        raise AssertionError(f"still training 120 s after SIGINT: {left}") from None
    assert proc.returncode == 130, err
    assert "Aborted!" not in err and "Traceback" not in err
    assert "interrupted: what was saved so far is valid; rerun it with the same options and " \
           "--resume" in err
    assert out.with_name("m.pt.partial").exists() and temporaries(tmp_path) == []


# --------------------------------------------------------------------------------- full disk


class FullDisk(types.ModuleType):
    """``os`` for :mod:`certify._io` on a disk that fills up after `files` more files: every
    write into a later file fails with ENOSPC (as the kernel reports it)."""

    def __init__(self, files: int) -> None:
        super().__init__("os")
        self.files_left = files
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fdopen(self, fd: int, *args: Any, **kwargs: Any) -> Any:
        f = os.fdopen(fd, *args, **kwargs)
        self.files_left -= 1
        return f if self.files_left >= 0 else _NoSpace(f, self)


class _NoSpace:
    def __init__(self, f: Any, disk: FullDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data: Any) -> int:
        self._disk.refused += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> _NoSpace:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def fill_disk(monkeypatch: pytest.MonkeyPatch, *, after_files: int) -> FullDisk:
    disk = FullDisk(after_files)
    monkeypatch.setattr(certify._io, "os", disk)
    return disk


def test_a_full_disk_during_area_is_one_line_and_resume_gives_the_same_result(
        model: Path, uninterrupted: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    # config.json and the partial results.json, then the rows appended to per_sample.csv after
    # each of the first batch's two methods: the disk is full when the second batch's first rows
    # are appended
    disk = fill_disk(monkeypatch, after_files=4)
    line = one_line_error(run("area", model, *AREA_ARGS, "-o", out))
    assert disk.refused >= 1
    assert "no space left on the device writing" in line and "per_sample.csv" in line, line
    assert "free some space, then rerun it with the same options and --resume" in line
    assert len(read_rows(out)) == 16 and temporaries(out) == []  # the first batch, valid
    assert json.loads((out / "results.json").read_text())["status"] == "partial"
    monkeypatch.undo()  # space freed
    resumed = run("area", model, *AREA_ARGS, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert read_rows(out) == read_rows(uninterrupted)


def test_a_full_disk_during_training_is_one_line_and_resume_gives_the_same_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["train", "--dataset", "digits", "--arch", "scn-4-4", "--epochs", "3", "-q"]
    whole = tmp_path / "whole.pt"
    assert run(*args, "-o", whole).exit_code == 0
    out = tmp_path / "m.pt"
    fill_disk(monkeypatch, after_files=1)  # epoch 1's state is saved, epoch 2's is not
    line = one_line_error(run(*args, "-o", out))
    assert "no space left on the device writing" in line and "m.pt.partial" in line, line
    assert "--resume" in line
    assert not out.exists() and temporaries(tmp_path) == []
    monkeypatch.undo()
    resumed = run(*args, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert sha256(out) == sha256(whole)


def test_a_full_disk_inside_torch_save_is_named_and_leaves_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save wraps the ENOSPC of its writes in a RuntimeError; it is still a full disk."""
    from certify._io import atomic_open
    from certify.errors import DiskFullError

    path = tmp_path / "state.pt"
    path.write_bytes(b"previous")
    fill_disk(monkeypatch, after_files=0)
    with pytest.raises(DiskFullError, match="no space left on the device writing .*state.pt"):
        with atomic_open(path, "wb") as f:
            torch.save({"w": torch.zeros(1000)}, f)
    assert path.read_bytes() == b"previous" and temporaries(tmp_path) == []


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("command", [
    ["train", "--dataset", "digits", "--arch", "mlp-32-16", "--robust", "ibp", "--eps", "0.02",
     "--epochs", "2", "--eval-samples", "20"],
    ["retrain", "{parent}", "--robust", "crown-ibp", "--eps", "0.02", "--epochs", "1",
     "--eval-samples", "20"],
    ["train", "--dataset", "digits", "--arch", "mlp-32", "--epochs", "1"],
    ["distill", "{parent}", "--student", "mlp-32", "--epochs", "1"],
], ids=["train --robust", "retrain", "train", "distill"])
def test_the_same_seed_gives_the_same_checkpoint_file(command: list[str], model: Path,
                                                      tmp_path: Path) -> None:
    args = [a.format(parent=model) for a in command] + ["-q", "--seed", "3"]
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for out in (a, b):
        done = run(*args, "-o", out)
        assert done.exit_code == 0, done.output
    assert sha256(a) == sha256(b)
    history = torch.load(a, weights_only=True)["meta"]["training"].get("history", [])
    assert all("seconds" not in epoch for epoch in history)


# ----------------------------------------------------------------------- sample selection


@pytest.mark.parametrize("command", ["area", "attack", "compare"])
def test_every_sample_selecting_command_takes_num_samples(command: str) -> None:
    text = run(command, "--help").output
    assert "--num-samples" in text and "--n " in text.replace("--n,", "--n ")


def test_area_num_samples_selects_the_first_n(model: Path, tmp_path: Path) -> None:
    done = run("area", model, "--dataset", "digits", "--num-samples", "5", "--method", "ibp",
               "--attack", "none", "--quiet", "-o", tmp_path / "run", "--json")
    assert done.exit_code == 0, done.output
    assert [int(r["index"]) for r in read_rows(tmp_path / "run")] == [0, 1, 2, 3, 4]
    assert json.loads(done.stdout)["n_total"] == 5



def test_ctrl_c_inside_a_writer_that_wraps_it_is_still_an_interrupt(tmp_path: Path) -> None:
    """torch.save's zip writer turns a Ctrl-C during a save into its own RuntimeError; the save
    must still end as an interrupt (so the command says how to continue), the old file intact."""
    target = tmp_path / "state.pt"
    torch.save({"epoch": 1}, target)

    class Writer:
        def write(self, f: Any) -> None:
            try:
                f.write(b"partial")
                raise KeyboardInterrupt
            finally:
                f.seek(0)
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    with pytest.raises(KeyboardInterrupt):
        with certify._io.atomic_open(target, "wb") as f:
            Writer().write(f)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    with pytest.raises(RuntimeError, match="plain failure"):  # other errors stay themselves
        with certify._io.atomic_open(target, "wb"):
            raise RuntimeError("plain failure")


@pytest.mark.parametrize("where", ["atomic_open", "download"])
def test_ctrl_c_while_the_temporary_file_is_made_leaves_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """mkstemp creates its file and then runs more Python code before it returns the name: a
    Ctrl-C landing there (as one did in CI, in a training run saving its state every few ms) must
    still end as an interrupt that leaves no temporary file behind."""
    import tempfile

    import certify.data.download as download

    real_mkstemp = tempfile.mkstemp

    def mkstemp_interrupted_after_creating(*args: Any, **kwargs: Any) -> tuple[int, str]:
        created = real_mkstemp(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # Python runs the handler at once, here
        return created

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_interrupted_after_creating)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            if where == "atomic_open":
                with certify._io.atomic_open(tmp_path / "state.pt", "wb") as f:
                    f.write(b"never reached")
            else:
                remote = download.RemoteFile(filename="f.bin", urls=(), md5="0" * 32,
                                             splits=())
                download._download_verified("http://127.0.0.1:9/f.bin", tmp_path / "f.bin",
                                            remote, quiet=True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []
