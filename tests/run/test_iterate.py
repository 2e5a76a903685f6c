"""certify_dataset: per-batch results that do not depend on which batches run, or when."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from torch import nn

from certify.records import SampleRow
from certify.run.iterate import (
    GUESS_SAMPLES,
    BatchResult,
    certify_dataset,
    guess_batches,
)
from tests.digits_models import train_digits_mlp

pytest.importorskip("certify.bounds")

BATCH = 8  # 48 samples: 6 batches, the first 4 teach the first guesses
OPTIONS: dict[str, Any] = {"batch_size": BATCH, "attack_steps": 4, "attack_tol": 1e-2, "tol": 1e-3,
                           "eps_max": 0.3, "seed": 3}


@pytest.fixture(scope="module")
def digits() -> Any:
    from certify.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return train_digits_mlp(3)


def plain(rows: Any) -> list[SampleRow]:
    """Rows without their timing."""
    return [replace(r, seconds=0.0) for r in rows]


@pytest.fixture(scope="module")
def full(model: nn.Module, digits: Any) -> list[BatchResult]:
    return list(certify_dataset(model, digits, ["ibp", "crown"], positions=range(48), **OPTIONS))


def test_one_result_per_batch_and_method_in_order(full: list[BatchResult]) -> None:
    assert [(r.batch, r.method) for r in full] == [(b, m) for b in range(6)
                                                   for m in ("ibp", "crown")]
    for r in full:
        assert [row.index for row in r.rows] == list(range(r.batch * BATCH, (r.batch + 1) * BATCH))
        assert {row.method for row in r.rows} == {r.method}
        for row in r.rows:
            assert row.certified_eps <= row.attack_eps
            if not row.correct:
                assert row.certified_eps == 0.0
    # the attack's time counts once per batch: on its first method's result
    assert all(r.attack_seconds > 0 for r in full if r.method == "ibp")
    assert all(r.attack_seconds == 0 for r in full if r.method == "crown")
    assert guess_batches(BATCH) == GUESS_SAMPLES // BATCH == 4


def test_resuming_from_saved_rows_gives_the_same_rows(model: nn.Module, digits: Any,
                                                      full: list[BatchResult]) -> None:
    # saved: the first three batches, and the fourth batch's ibp rows
    saved = [row for r in full[:7] for row in r.rows]
    rest = list(certify_dataset(model, digits, ["ibp", "crown"], positions=range(48),
                                done=saved, **OPTIONS))
    assert [(r.batch, r.method) for r in rest] == [(r.batch, r.method) for r in full[7:]]
    assert [plain(r.rows) for r in rest] == [plain(r.rows) for r in full[7:]]


def test_a_later_batch_alone_after_the_first_ones_equals_the_full_run(
        model: nn.Module, digits: Any, full: list[BatchResult]) -> None:
    """What a rank computes: the guess-learning batches, then its share in any order."""
    part = list(certify_dataset(model, digits, ["ibp", "crown"], positions=range(48),
                                batches=[0, 1, 2, 3, 5], **OPTIONS))
    expected = {(r.batch, r.method): plain(r.rows) for r in full}
    assert {(r.batch, r.method): plain(r.rows) for r in part} == {
        k: v for k, v in expected.items() if k[0] != 4}


def test_positions_may_be_any_samples_and_attack_none(model: nn.Module, digits: Any) -> None:
    out = list(certify_dataset(model, digits, ["ibp"], positions=[40, 3, 17], batch_size=2,
                               attack="none"))
    assert [[row.index for row in r.rows] for r in out] == [[40, 3], [17]]
    assert all(math.isinf(row.attack_eps) for r in out for row in r.rows)
    assert all(r.attack_seconds == 0 for r in out)


def test_nothing_left_yields_nothing(model: nn.Module, digits: Any,
                                     full: list[BatchResult]) -> None:
    saved = [row for r in full for row in r.rows]
    assert list(certify_dataset(model, digits, ["ibp", "crown"], positions=range(48),
                                done=saved, **OPTIONS)) == []


