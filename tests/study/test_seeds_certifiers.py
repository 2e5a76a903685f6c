"""Several seeds, several certifiers: config, the pooled report, per-certifier verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from certify.cli import main
from certify.errors import CertifyError, SpecError
from certify.report.results import SampleRow
from certify.study import certifiers as K
from certify.study import claims as C
from certify.study.experiment import STAGES, parse_config, run_experiment, seed_dir

TINY = Path(__file__).parent / "tiny.toml"


def _tiny(**certify: object) -> dict:
    data = tomllib.loads(TINY.read_text())
    data["certify"].update(certify)
    return data


def test_config_seeds_and_certifiers() -> None:
    config = parse_config(_tiny(certifiers=["ibp", "alpha-crown"]))
    assert config.seeds == (0,)                       # one seed unless seeds are given
    assert config.certifiers == ("crown", "ibp", "alpha-crown")   # the main method first
    data = _tiny()
    data["experiment"]["seeds"] = [3, 1]
    assert parse_config(data).seeds == (3, 1)


@pytest.mark.parametrize("change, message", [
    ({"certify": {"certifiers": ["ibp", "crwon"]}}, "crwon"),
    ({"certify": {"certifiers": ["ibp", "ibp"]}}, "each method once"),
    ({"certify": {"certifiers": "ibp"}}, "'certifiers' must be tuple"),
    ({"experiment": {"seeds": [0, 0]}}, "distinct"),
    ({"experiment": {"seeds": [0.5]}}, "'seeds' must be tuple"),
    ({"certify": {"exact_time_limit": 0}}, "exact_time_limit"),
])
def test_bad_seeds_and_certifiers_are_named(change: dict, message: str) -> None:
    data = _tiny()
    for section, values in change.items():
        data[section].update(values)
    with pytest.raises(CertifyError, match=message):
        parse_config(data)


def _row(index: int, *, correct: bool = True, cert: float = 0.1, attack: float = 0.2,
         exact: float | None = None, status: str = "") -> SampleRow:
    return SampleRow(index, 1, 1 if correct else 2, "crown", cert, attack, 3, 0.0, 0.5, exact,
                     status)


def test_point_values_per_certifier() -> None:
    rows = {"crown": [_row(0), _row(1, correct=False, cert=0.0, attack=0.0),
                      _row(2, attack=math.inf)]}
    assert K.point_values(rows, "crown", 0.5) == {0: 0.1, 1: 0.0, 2: 0.1}
    assert K.point_values(rows, K.ATTACK, 0.5) == {0: 0.2, 1: 0.0, 2: 0.5}   # capped at eps_max
    assert K.point_values(rows, "ibp", 0.5) is None                        # not run
    assert K.point_values(rows, K.EXACT, 0.5) is None                      # exact not computed
    exact = {"crown": [_row(0, exact=0.15, status="optimal"), _row(1, exact=None,
                                                                   status="above_max")]}
    assert K.point_values(exact, K.EXACT, 0.5) is None                     # one unknown
    exact["crown"][1] = _row(1, exact=0.3, status="optimal")
    assert K.point_values(exact, K.EXACT, 0.5) == {0: 0.15, 1: 0.3}


def _ci(verdict: str, a: float = 0.06, b: float = 0.05) -> dict:
    return {"a_label": C.STUDENT, "b_label": C.TEACHER, "a": a, "b": b, "ratio": a / b,
            "low": 0.9, "high": 1.4, "level": 0.95, "points": 100, "seeds": 3,
            "verdict": verdict}


def test_a_claim_whose_verdict_flips_with_the_certifier_is_flagged() -> None:
    results = {"models": {}, "method": "crown", "area_ci": {"distilled-area": {
        "crown": _ci("supported"), "ibp": _ci("inconclusive"), "attack": _ci("supported")}}}
    claim = {c.key: c for c in C.compute_claims(results)}["distilled-area"]
    assert claim.verdict == "supported" and claim.supported is True and claim.flips
    assert dict(claim.by_certifier) == {"crown": "supported", "ibp": "inconclusive",
                                        "attack": "supported"}
    assert "x1.20 [0.90, 1.40]" in claim.evidence and "3 seeds" in claim.evidence
    assert "flips with the certifier" in C.claims_markdown([claim])
    assert not claim.attack_disagrees and "under the attack" not in claim.evidence
    # agreement among the certifiers: no flag, even where the attack column disagrees
    results["area_ci"]["distilled-area"]["ibp"] = _ci("supported")
    results["area_ci"]["distilled-area"]["attack"] = _ci("inconclusive")
    claim = {c.key: c for c in C.compute_claims(results)}["distilled-area"]
    assert not claim.flips
    # ... but the report says the attack area (an upper bound) gives another verdict
    assert claim.attack_disagrees and "under the attack ε (an upper bound) it is inconclusive" \
        in claim.evidence
    assert "the attack area disagrees" in C.claims_markdown([claim])
    results["area_ci"]["distilled-area"]["crown"] = _ci("inconclusive")
    claim = {c.key: c for c in C.compute_claims(results)}["distilled-area"]
    assert claim.verdict == "inconclusive" and claim.supported is None


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("two-seeds")
    config = parse_config(_tiny(certifiers=["ibp", "crown"]), source=str(TINY))
    return out, run_experiment(config, out_dir=out, quiet=True, seeds=(0, 1))


def test_two_seeds_pooled_report(two_seeds: tuple[Path, object]) -> None:
    out, result = two_seeds
    assert result.ran == tuple(f"seed-{s}/{st}" for s in (0, 1) for st in STAGES)
    for s in (0, 1):
        assert (seed_dir(out, s) / "summary.md").is_file()
    # the seeds trained different models
    a = json.loads((seed_dir(out, 0) / "study.json").read_text())
    b = json.loads((seed_dir(out, 1) / "study.json").read_text())
    study = json.loads((out / "study.json").read_text())
    assert study["seeds"] == [0, 1] and study["certifiers"] == ["crown", "ibp", "attack"]
    for label, m in study["models"].items():
        areas = [a["models"][label]["certification_area"],
                 b["models"][label]["certification_area"]]
        assert m["certification_area"] == pytest.approx(sum(areas) / 2)
        assert m["certification_area_std"] == pytest.approx(abs(areas[0] - areas[1]) / 2 ** 0.5)
        # the per-certifier table's crown area is the same number, with an interval around it
        cell = study["areas"][label]["crown"]
        assert cell["area"] == pytest.approx(m["certification_area"])
        assert cell["low"] <= cell["area"] <= cell["high"]
        gap = study["relaxation_gaps"][label]["crown"]["attack"]
        assert gap == pytest.approx(study["areas"][label]["attack"]["area"] - cell["area"])
        assert gap >= 0                       # certified eps never exceeds the attack eps
    for key, per in study["area_ci"].items():
        assert set(per) == {"crown", "ibp", "attack"}, key
        for ci in per.values():
            assert ci["verdict"] in ("supported", "contradicted", "inconclusive")
            assert ci["seeds"] == 2 and ci["points"] == 8
    claims = {c["key"]: c for c in study["claims"]}
    assert claims["distilled-area"]["status"] == study["area_ci"]["distilled-area"]["crown"][
        "verdict"]
    summary = (out / "summary.md").read_text()
    assert "## Certifier-independence" in summary and " ± " in summary
    assert "2 seeds (0, 1)" in summary
    for fig in ("figures/sorted_eps_panels.png", "figures/claims.png"):
        assert (out / fig).stat().st_size > 5000, fig


def test_two_seeds_rerun_reuses_everything(two_seeds: tuple[Path, object],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = two_seeds
    import certify.run.area as area

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(area, "run_area", boom)
    config = parse_config(_tiny(certifiers=["ibp", "crown"]), source=str(TINY))
    again = run_experiment(config, out_dir=out, quiet=True, seeds=(0, 1))
    assert again.ran == () and len(again.skipped) == 2 * len(STAGES)


def test_cli_seeds_bad_value(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["experiment", str(TINY), "--seeds", "0,x", "-o",
                                  str(tmp_path / "x")])
    assert r.exit_code != 0 and "comma-separated integer seeds" in r.output
    assert "Traceback" not in r.output


def test_empty_seed_list() -> None:
    with pytest.raises(SpecError, match="at least one seed"):
        run_experiment(TINY, out_dir="/nonexistent-never-created", seeds=())
