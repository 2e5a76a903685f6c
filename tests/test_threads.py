"""The thread-count default and what determinism holds: same seed + same thread count."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from certify import threads
from tests.cli.cli_helpers import run


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_half_the_usable_cpus_and_omp_num_threads_wins(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    assert threads.default_threads() == 1          # a 2-core machine: one thread, not two
    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    assert threads.default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")     # torchrun: 4 processes share the node
    assert threads.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")   # not a count: ignored
    assert threads.default_threads() == 2


def test_available_cpus_respects_the_affinity_mask() -> None:
    import os

    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))


def test_threads_option_sets_torch(tmp_path: Path) -> None:
    r = run("data", "list", "--threads", 3)
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 3
    r = run("info", tmp_path / "missing.pt", "--threads", 0)
    assert r.exit_code == 2 and "--threads" in r.output


def _train(out: Path, threads_: int) -> dict[str, torch.Tensor]:
    r = run("train", "--dataset", "digits", "--arch", "scn-4-8", "--epochs", 1, "--seed", 3,
            "--threads", threads_, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    return torch.load(out, weights_only=True)["state_dict"]


def test_same_seed_and_same_thread_count_give_identical_weights(tmp_path: Path) -> None:
    for n in (1, 2):
        a = _train(tmp_path / f"a{n}.pt", n)
        b = _train(tmp_path / f"b{n}.pt", n)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{n} threads: weights differ"
