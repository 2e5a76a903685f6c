"""Every model's area under several certifiers, and the area claims with their intervals.

A certification area measured by one relaxation mixes two things: how far the model's decision
boundary is, and how loose the relaxation is on that model (looser on deeper nets). This module
reads, for every seed and model, the per-point eps of each bound method of the certify stage
(``ibp``, ``crown``, ``alpha-crown``, ...), of the exact MILP where it ran, and of the attack
(an upper bound), and gives:

* :func:`area_table`: each model's area per certifier (mean over seeds, bootstrap interval);
* :func:`relaxation_gaps`: per model and bound method, attack (or exact) area minus certified
  area -- how much the certifier leaves unproven;
* :func:`claim_intervals`: each area claim's ratio per certifier with its paired bootstrap
  interval and verdict (:mod:`certify.study.bootstrap`).

Certifier names are plain strings taken from the config, so a new bound method (``bab``) joins
by name. ``attack`` and ``exact`` are the two reference columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from certify.report.results import SampleRow
from certify.study import bootstrap as B
from certify.study import claims as C

ATTACK = "attack"
EXACT = "exact"
#: (claim key, model whose area should be larger, the other model)
AREA_CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("distilled-area", C.STUDENT, C.TEACHER),
    ("robust-teacher-area", C.ROBUST_TEACHER, C.ROBUST_STUDENT),
    ("retrain-raises-area", C.RETRAINED, C.ROBUST_STUDENT),
    ("distillation-vs-scratch", C.RETRAINED, C.ROBUST_SHALLOW),
)

#: Per model, per certifier, per seed: {test index: per-point eps}.
Evidence = dict[str, dict[str, list[dict[int, float]]]]


def _value(row: SampleRow, certifier: str, eps_max: float) -> float | None:
    if not row.correct:
        return 0.0
    if certifier == ATTACK:
        return min(row.attack_eps, eps_max)      # no adversarial example up to eps_max: capped
    if certifier == EXACT:
        if row.exact_status in ("optimal", "above_max") and row.exact_eps is not None:
            return min(row.exact_eps, eps_max)
        return None
    return row.certified_eps


def point_values(rows_by_method: Mapping[str, Sequence[SampleRow]], certifier: str,
                 eps_max: float) -> dict[int, float] | None:
    """``{index: eps}`` of one run for `certifier` (a bound method, ``attack`` or ``exact``);
    None where the run lacks it (a method not run, an exact eps not known for every point)."""
    if certifier in (ATTACK, EXACT):
        rows = next((r for r in rows_by_method.values() if r), None)
    else:
        rows = rows_by_method.get(certifier)
    if not rows or (certifier == EXACT and not any(r.exact_status for r in rows)):
        return None                               # exact not run on this model
    out = {}
    for r in rows:
        v = _value(r, certifier, eps_max)
        if v is None:
            return None
        out[r.index] = float(v)
    return out


def read_evidence(seed_dirs: Sequence[Path], labels: Sequence[str], methods: Sequence[str],
                  eps_max: float) -> tuple[Evidence, tuple[str, ...]]:
    """Per model and certifier, the per-point eps of every seed's certify stage.

    Returns:
        ``(evidence, certifiers)``: per model the certifiers it has in every seed (``exact``
        only where every point has an exact eps, e.g. only the small nets), and all certifiers
        some model has, in the order ``methods``, then ``exact``, then ``attack``.
    """
    from certify.report.area import read_run

    wanted = (*methods, EXACT, ATTACK)
    evidence: Evidence = {label: {c: [] for c in wanted} for label in labels}
    for d in seed_dirs:
        for label in labels:
            run = read_run(Path(d) / "certify" / label)
            by_method = {m: run.rows_of(m) for m in methods}
            for c in wanted:
                evidence[label][c].append(point_values(by_method, c, eps_max) or {})
    kept = {label: {c: v for c, v in evidence[label].items() if all(v)} for label in labels}
    present = tuple(c for c in wanted if any(c in kept[label] for label in labels))
    return kept, present


def _paired(a: list[dict[int, float]], b: list[dict[int, float]]
            ) -> tuple[list[list[float]], list[list[float]]]:
    xa, xb = [], []
    for sa, sb in zip(a, b, strict=True):
        common = sorted(sa.keys() & sb.keys())
        xa.append([sa[i] for i in common])
        xb.append([sb[i] for i in common])
    n = min(len(v) for v in xa)       # the same count in every seed (the first n test points)
    return [v[:n] for v in xa], [v[:n] for v in xb]


def area_table(evidence: Evidence, certifiers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{model: {certifier: {"area", "low", "high", "seed_areas"}}}``."""
    out: dict[str, dict[str, Any]] = {}
    for label, per in evidence.items():
        out[label] = {}
        for c in certifiers:
            if c not in per:
                continue
            seeds = [list(s.values()) for s in per[c]]
            n = min(len(s) for s in seeds)
            mean, low, high = B.mean_ci([s[:n] for s in seeds])
            out[label][c] = {"area": mean, "low": low, "high": high,
                             "seed_areas": [sum(s) / len(s) for s in seeds]}
    return out


def relaxation_gaps(areas: Mapping[str, Mapping[str, Any]], certifiers: Sequence[str]
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {method: {"attack": gap, "exact": gap}}}``: reference area minus certified."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, per in areas.items():
        out[label] = {}
        for m in certifiers:
            if m in (ATTACK, EXACT):
                continue
            if m in per:
                out[label][m] = {ref: per[ref]["area"] - per[m]["area"]
                                 for ref in (ATTACK, EXACT) if ref in per}
    return out


def claim_intervals(evidence: Evidence, certifiers: Sequence[str]
                    ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{claim key: {certifier: {"a", "b", "ratio", "low", "high", "verdict", ...}}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, a, b in AREA_CLAIMS:
        if a not in evidence or b not in evidence:
            continue
        out[key] = {}
        for c in certifiers:
            if c not in evidence[a] or c not in evidence[b]:
                continue
            xa, xb = _paired(evidence[a][c], evidence[b][c])
            ci = B.ratio_ci(xa, xb)
            out[key][c] = {"a_label": a, "b_label": b, "a": ci.a, "b": ci.b, "ratio": ci.ratio,
                           "low": ci.low, "high": ci.high, "level": ci.level,
                           "points": ci.points, "seeds": ci.seeds, "verdict": ci.verdict}
    return out


def flips(per_certifier: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the verdict differs between the certifiers (bound methods and exact; the attack
    column is an upper bound, shown but not counted)."""
    verdicts = {v["verdict"] for c, v in per_certifier.items() if c != ATTACK}
    return len(verdicts) > 1


def describe(ci: Mapping[str, Any]) -> str:
    """E.g. ``0.06320 vs 0.06370, x0.99 [0.95, 1.04]``."""
    ratio, low, high = (_real(ci[k]) for k in ("ratio", "low", "high"))
    if not math.isfinite(ratio):
        return f"{ci['a']:.5f} vs {ci['b']:.5f}, ratio undefined"
    return f"{ci['a']:.5f} vs {ci['b']:.5f}, x{ratio:.2f} [{B._fmt(low)}, {B._fmt(high)}]"


def _real(v: Any) -> float:
    """A stored number; None (a NaN written to JSON) reads as NaN."""
    return math.nan if v is None else float(v)
