"""Models trained once per session on digits, shared by the training tests.

Torch runs single-threaded in these tests: on a small shared machine, multi-threaded kernels
on tiny digits batches are many times slower than one thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from certify.train.loops import TrainConfig

TEACHER_KWARGS = {"channels": [8, 16, 16, 16], "hidden": [32]}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@dataclass(frozen=True)
class Trained:
    path: Path
    accuracy: float


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A small svhn-teacher (4 convs with batch norm) trained on digits."""
    from certify.train.standard import train_standard

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    with one_thread():
        t = train_standard("svhn-teacher", "digits", TrainConfig(epochs=12, seed=0),
                           arch_kwargs=TEACHER_KWARGS, output=path, quiet=True)
    return Trained(path, t.meta.metrics["test_accuracy"])


@pytest.fixture(scope="session")
def digits_student(digits_teacher: Trained, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """scn-32-32 distilled from the teacher with Hinton's loss at T = 2."""
    from certify.train.distill import distill

    path = tmp_path_factory.mktemp("student") / "student.pt"
    with one_thread():
        s = distill(digits_teacher.path, "scn-32-32", method="hinton", temperature=2.0,
                    alpha=0.9, config=TrainConfig(epochs=15, seed=0), output=path, quiet=True)
    return Trained(path, s.meta.metrics["test_accuracy"])
