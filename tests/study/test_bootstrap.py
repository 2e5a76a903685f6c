"""The paired bootstrap on synthetic areas whose true ratio is known."""

from __future__ import annotations

import numpy as np
import pytest

from certify.errors import SpecError
from certify.study import bootstrap as B


def _pair(rng: np.random.Generator, n: int, ratio: float, *, noise: float = 0.02
          ) -> tuple[np.ndarray, np.ndarray]:
    """Per-point eps of two models on the same points: b's spread is per point (hard and easy
    points), a = ratio * b plus independent noise, so E[sum a] / E[sum b] = ratio."""
    b = rng.gamma(2.0, 0.03, size=n)
    a = np.clip(ratio * b + rng.normal(0.0, noise, size=n), 0.0, None)
    return a, b


def test_a_true_difference_is_detected_both_ways() -> None:
    rng = np.random.default_rng(1)
    a, b = _pair(rng, 200, 1.3, noise=0.005)
    up = B.ratio_ci([a], [b])
    assert up.verdict == B.SUPPORTED and up.low > 1.0 and up.low < up.ratio < up.high
    down = B.ratio_ci([b], [a])
    assert down.verdict == B.CONTRADICTED and down.high < 1.0


def test_no_difference_is_inconclusive_at_the_stated_rate() -> None:
    """Two models drawn from the same distribution: a 95% interval wrongly excludes 1 in about
    5% of runs; over 200 runs we allow 0-12% (the binomial 99.9% band of 5% is about 1-11%)."""
    rng = np.random.default_rng(2)
    wrong = 0
    runs = 200
    for _ in range(runs):
        b = rng.gamma(2.0, 0.03, size=80)
        a = rng.gamma(2.0, 0.03, size=80)        # same distribution, independent of b
        if B.ratio_ci([a], [b], resamples=400).verdict != B.INCONCLUSIVE:
            wrong += 1
    assert wrong / runs <= 0.12, wrong


def test_coverage_of_a_known_ratio() -> None:
    """The interval covers the true ratio 1.15 in roughly 95% of synthetic studies."""
    rng = np.random.default_rng(3)
    true = 1.15
    covered = 0
    runs = 200
    for _ in range(runs):
        b = rng.gamma(2.0, 0.03, size=100)
        a = true * b * rng.lognormal(0.0, 0.3, size=100) / np.exp(0.3 ** 2 / 2)
        ci = B.ratio_ci([a], [b], resamples=400)
        covered += ci.low <= true <= ci.high
    assert 0.88 <= covered / runs <= 0.99, covered


def test_seed_noise_widens_the_interval() -> None:
    """Three seeds whose areas differ by training noise: the two-level bootstrap's interval is
    wider than the one from points alone, and a tiny point-level difference that the seeds do
    not reproduce is not called supported."""
    rng = np.random.default_rng(4)
    a_s, b_s = [], []
    for shift in (0.7, 1.0, 1.35):                   # the seed decides which model is ahead
        b = rng.gamma(2.0, 0.03, size=150)
        a_s.append(shift * b + rng.normal(0, 0.001, size=150).clip(0))
        b_s.append(b)
    pooled = B.ratio_ci([np.concatenate(a_s)], [np.concatenate(b_s)])
    seeded = B.ratio_ci(a_s, b_s)
    assert seeded.seeds == 3 and pooled.seeds == 1
    assert seeded.high - seeded.low > 2 * (pooled.high - pooled.low)
    assert seeded.verdict == B.INCONCLUSIVE


def test_deterministic_and_validated() -> None:
    rng = np.random.default_rng(5)
    a, b = _pair(rng, 50, 1.0)
    assert B.ratio_ci([a], [b]) == B.ratio_ci([a], [b])
    with pytest.raises(SpecError, match="same non-zero number"):
        B.ratio_ci([a], [b[:-1]])
    with pytest.raises(SpecError, match="same seeds"):
        B.ratio_ci([a, a], [b])
    with pytest.raises(SpecError, match="finite"):
        B.ratio_ci([np.full(3, np.inf)], [np.ones(3)])


def test_zero_areas_have_no_direction() -> None:
    ci = B.ratio_ci([np.zeros(10)], [np.zeros(10)])
    assert ci.verdict == B.INCONCLUSIVE and ci.describe() == "ratio undefined"


def test_mean_ci_covers_the_mean() -> None:
    rng = np.random.default_rng(6)
    x = rng.gamma(2.0, 0.03, size=300)
    mean, low, high = B.mean_ci([x])
    assert low < mean < high and low < 0.06 < high
