"""Bound-engine tests run single-threaded: their tensors are tiny, and on a shared machine
OpenMP threads waiting for each other make them tens of times slower. Restored after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
