"""Paired bootstrap confidence intervals for the ratio of two certification areas.

A certification area is the mean of per-point values (certified eps, misclassified points 0).
Two models certified on the *same* test points give paired values ``a[i]``, ``b[i]``; the claim
"model A's area is larger than model B's" is a statement about the ratio
``sum(a) / sum(b)``. :func:`ratio_ci` resamples test points with replacement, keeping each
point's pair together (the paired bootstrap), and -- where the study ran several seeds --
resamples the seeds first and then the points within each drawn seed (a two-level bootstrap,
so training noise enters the interval too). The 95% percentile interval of the ratio decides:

* ``supported``    the interval lies above 1 (A's area is larger),
* ``contradicted`` the interval lies below 1 (A's area is smaller),
* ``inconclusive`` the interval contains 1: the run cannot tell the two apart.

The generator is seeded, so a report is the same on every run of the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from certify.errors import SpecError

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
RESAMPLES = 2000
LEVEL = 0.95
RNG_SEED = 20


@dataclass(frozen=True)
class RatioCI:
    """The ratio of two paired areas with its bootstrap interval.

    Attributes:
        a: Area of the first model (mean over seeds of the per-seed mean).
        b: Area of the second model.
        ratio: ``a / b`` (``nan`` where ``b`` is 0).
        low: Lower end of the interval.
        high: Upper end of the interval.
        level: Confidence level of the interval (0.95).
        points: Test points per seed.
        seeds: Number of seeds.
    """

    a: float
    b: float
    ratio: float
    low: float
    high: float
    level: float
    points: int
    seeds: int

    @property
    def verdict(self) -> str:
        """``supported``, ``contradicted`` or ``inconclusive`` (see the module docstring)."""
        return verdict(self.low, self.high)

    def describe(self) -> str:
        """E.g. ``x1.21 [1.05, 1.40]``."""
        if not math.isfinite(self.ratio):
            return "ratio undefined"
        return f"x{self.ratio:.2f} [{_fmt(self.low)}, {_fmt(self.high)}]"


def _fmt(v: float) -> str:
    return f"{v:.2f}" if math.isfinite(v) else ("inf" if v > 0 else "undefined")


def verdict(low: float, high: float) -> str:
    """The verdict of an interval ``[low, high]`` of a ratio: does it exclude 1?"""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > 1.0:
        return SUPPORTED
    if high < 1.0:
        return CONTRADICTED
    return INCONCLUSIVE


def _pairs(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]
           ) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b) or not a:
        raise SpecError(f"paired bootstrap needs the same seeds on both sides, got {len(a)} "
                        f"and {len(b)}")
    xa = [np.asarray(v, dtype=np.float64) for v in a]
    xb = [np.asarray(v, dtype=np.float64) for v in b]
    n = xa[0].size
    if n == 0 or any(v.size != n for v in xa + xb):
        raise SpecError("paired bootstrap needs the same non-zero number of test points in "
                        "every seed and on both sides")
    if not all(np.isfinite(v).all() for v in xa + xb):
        raise SpecError("paired bootstrap needs finite per-point values (cap infinite eps "
                        "first)")
    return np.stack(xa), np.stack(xb)


def ratio_ci(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *,
             resamples: int = RESAMPLES, level: float = LEVEL, seed: int = RNG_SEED) -> RatioCI:
    """Bootstrap interval of ``mean(a) / mean(b)`` over paired test points (and seeds).

    Args:
        a: Per seed, the first model's per-point values (one list per seed; points in the same
            order as in `b`).
        b: Per seed, the second model's per-point values.
        resamples: Bootstrap replicates.
        level: Confidence level of the two-sided percentile interval.
        seed: Seed of the resampling generator (fixed: same numbers, same interval).
    Returns:
        :class:`RatioCI`.
    Raises:
        SpecError: unpaired or empty inputs, non-finite values.
    """
    xa, xb = _pairs(a, b)
    seeds, n = xa.shape
    rng = np.random.default_rng(seed)
    # level 1: seeds (only when there are several); level 2: points within each drawn seed
    if seeds > 1:
        s_idx = rng.integers(0, seeds, size=(resamples, seeds))
    else:
        s_idx = np.zeros((resamples, 1), dtype=np.int64)
    p_idx = rng.integers(0, n, size=(resamples, seeds, n))
    sa = xa[s_idx[..., None], p_idx].sum(axis=(1, 2))
    sb = xb[s_idx[..., None], p_idx].sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(sb > 0, sa / np.where(sb > 0, sb, 1.0),
                          np.where(sa > 0, np.inf, np.nan))
    alpha = (1.0 - level) / 2
    if np.isnan(ratios).any():   # 0/0 replicates: both areas zero, no direction at all
        low = high = math.nan
    else:
        low, high = (float(np.quantile(ratios, q, method="inverted_cdf"))
                     for q in (alpha, 1 - alpha))
    ma, mb = float(xa.mean()), float(xb.mean())
    ratio = ma / mb if mb > 0 else math.nan
    return RatioCI(ma, mb, ratio, low, high, level, n, seeds)


def mean_ci(values: Sequence[Sequence[float]], *, resamples: int = RESAMPLES,
            level: float = LEVEL, seed: int = RNG_SEED) -> tuple[float, float, float]:
    """``(mean, low, high)``: one model's area with its bootstrap interval (points and seeds)."""
    x = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    seeds, n = x.shape
    rng = np.random.default_rng(seed)
    s_idx = (rng.integers(0, seeds, size=(resamples, seeds)) if seeds > 1
             else np.zeros((resamples, 1), dtype=np.int64))
    p_idx = rng.integers(0, n, size=(resamples, seeds, n))
    means = x[s_idx[..., None], p_idx].mean(axis=(1, 2))
    alpha = (1.0 - level) / 2
    return (float(x.mean()), float(np.quantile(means, alpha)),
            float(np.quantile(means, 1 - alpha)))
