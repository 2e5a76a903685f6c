"""The claim table is computed from the numbers: each claim flips when its numbers do."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certify.study import claims as C


def _results(areas: dict[str, float], *, student_acc: float = 0.9, pruned_acc: float = 0.89,
             temps: dict[str, float] | None = None, logits: float = 0.85,
             teacher_pgd: tuple[float, ...] = (0.9, 0.5, 0.2, 0.0),
             pruned_pgd: tuple[float, ...] = (0.88, 0.6, 0.1, 0.0)) -> dict:
    models = {k: {"certification_area": v, "test_accuracy": 0.9} for k, v in areas.items()}
    models[C.STUDENT]["test_accuracy"] = student_acc
    models[C.PRUNED]["test_accuracy"] = pruned_acc
    grid = [0.0, 0.01, 0.02, 0.03]
    return {"models": models,
            "sweep": {"temperature": temps or {"1": 0.86, "2": 0.87}, "logits": logits},
            "attack": {C.TEACHER: {"eps": grid, "accuracy": list(teacher_pgd)},
                       C.PRUNED: {"eps": grid, "accuracy": list(pruned_pgd)}}}


AREAS = {C.TEACHER: 0.01, C.STUDENT: 0.02, C.PRUNED: 0.02, C.ROBUST_TEACHER: 0.05,
         C.ROBUST_STUDENT: 0.01, C.RETRAINED: 0.03, C.ROBUST_SHALLOW: 0.02}


def _by_key(results: dict, **kw: float) -> dict[str, C.Claim]:
    return {c.key: c for c in C.compute_claims(results, **kw)}


def test_all_supported_then_each_flips() -> None:
    base = _results(AREAS)
    claims = _by_key(base)
    assert all(c.supported for c in claims.values()), claims
    flips = {
        "distilled-area": (C.STUDENT, 0.005),
        "robust-teacher-area": (C.ROBUST_STUDENT, 0.06),
        "retrain-raises-area": (C.RETRAINED, 0.005),
        "distillation-vs-scratch": (C.ROBUST_SHALLOW, 0.5),
    }
    for key, (label, value) in flips.items():
        changed = copy.deepcopy(base)
        changed["models"][label]["certification_area"] = value
        assert _by_key(changed)[key].supported is False, key
        assert f"{value:.5f}" in _by_key(changed)[key].evidence


def test_prune_sweep_and_pgd_claims_flip() -> None:
    assert _by_key(_results(AREAS, pruned_acc=0.85))["pruned-accuracy"].supported is False
    assert _by_key(_results(AREAS, pruned_acc=0.85), prune_tolerance=6.0)[
        "pruned-accuracy"].supported is True
    assert _by_key(_results(AREAS, logits=0.9))["temperature-vs-logits"].supported is False
    worse = _results(AREAS, pruned_pgd=(0.9, 0.4, 0.1, 0.0))
    assert _by_key(worse)["pruned-pgd-small-eps"].supported is False
    # small eps chosen explicitly: at eps <= 0.02 the pruned curve (0.6, 0.1) averages below
    assert _by_key(_results(AREAS), small_eps=0.02)["pruned-pgd-small-eps"].supported is False


def test_missing_models_are_not_decidable() -> None:
    results = _results(AREAS)
    del results["models"][C.ROBUST_SHALLOW]
    results["attack"] = {}
    claims = _by_key(results)
    assert claims["distillation-vs-scratch"].supported is None
    assert claims["pruned-pgd-small-eps"].supported is None
    assert "n/a" in C.claims_markdown(list(claims.values()))


@given(st.floats(0, 1), st.floats(0, 1))
def test_area_claim_is_the_comparison(a: float, b: float) -> None:
    areas = dict(AREAS, **{C.STUDENT: a, C.TEACHER: b})
    assert _by_key(_results(areas))["distilled-area"].supported is (a > b)


@pytest.mark.parametrize("grid,small,expected", [([0, 0.1, 0.2, 0.3], None, [1]),
                                                 ([0, 0.1, 0.2, 0.3], 0.2, [1, 2]),
                                                 ([0, 0.5], 0.01, [1])])
def test_small_eps_points(grid: list[float], small: float | None, expected: list[int]) -> None:
    assert C.small_eps_points(grid, small) == expected


def test_temperature_claim_uses_the_student_chosen_on_validation() -> None:
    results = _results(AREAS, temps={"1": 0.90, "2": 0.84}, logits=0.85)
    assert _by_key(results)["temperature-vs-logits"].supported is True   # no validation: best
    results["sweep"]["temperature_validation"] = {"1": 0.95, "2": 0.97}   # T=2 is chosen
    claim = _by_key(results)["temperature-vs-logits"]
    assert claim.supported is False and "T=2 (chosen on validation)" in claim.evidence
