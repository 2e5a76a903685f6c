"""``certify experiment``: config validation, a tiny study end to end, stage caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from certify.errors import CertifyError, SpecError
from certify.study.experiment import STAGES, load_config, parse_config, run_experiment
from tests.report.table_checks import assert_certified_at_most_pgd

HERE = Path(__file__).parent
TINY = HERE / "tiny.toml"
CONFIGS = HERE.parents[1] / "configs"


def _tiny() -> dict:
    return tomllib.loads(TINY.read_text())


@pytest.mark.parametrize("name", ["shallow-waters-digits", "shallow-waters-svhn",
                                  "shallow-waters-cifar10"])
def test_shipped_configs_parse_and_validate(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.toml")
    assert config.name == name
    assert config.robust_teacher.eps > 0 and config.distill.temperatures


def test_unknown_key_is_named() -> None:
    data = _tiny()
    data["distill"]["temperture"] = 2.0
    with pytest.raises(CertifyError, match="temperture.*did you mean 'temperatures'"):
        parse_config(data, source="x.toml")


def test_unknown_section_wrong_type_and_missing_key() -> None:
    data = _tiny()
    data["atack"] = {}
    with pytest.raises(CertifyError, match="atack"):
        parse_config(data)
    data = _tiny()
    data["teacher"]["epochs"] = "ten"
    with pytest.raises(SpecError, match="'epochs' must be int"):
        parse_config(data)
    data = _tiny()
    del data["robust_teacher"]["eps"]
    with pytest.raises(SpecError, match="needs 'eps'"):
        parse_config(data)
    data = _tiny()
    data["experiment"]["dataset"] = "mnsit"
    with pytest.raises(CertifyError, match="mnsit"):
        parse_config(data)


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="not found"):
        load_config("nope.toml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("tiny-study")
    return out, run_experiment(TINY, out_dir=out, quiet=True)


def test_tiny_study_end_to_end(tiny_run: tuple[Path, object]) -> None:
    out, result = tiny_run
    assert result.ran == STAGES and result.skipped == ()
    study = json.loads((out / "study.json").read_text())
    assert len(study["models"]) == 7
    for m in study["models"].values():
        assert m["certification_area"] >= 0
    summary = (out / "summary.md").read_text()
    assert "Does this run support the thesis?" in summary
    # every table compares like with like: its certified column never exceeds its PGD column
    assert assert_certified_at_most_pgd(summary) == 7
    assert "All columns on the same first 8 test points" in summary
    assert {m["arch"] for m in study["models"].values()} >= {"scn-8-8", "scn-4-8"}
    for fig in ("attack/attack_curves.png", "figures/sorted_eps_all.png",
                "figures/certification_area.png", "figures/certified_accuracy_all.png"):
        assert (out / fig).stat().st_size > 1000, fig
    # the claims in the summary are the ones computed from study.json
    from certify.study.claims import compute_claims

    claims = compute_claims(study)
    assert [c.supported for c in claims] == [c["supported"] for c in study["claims"]]


def test_rerun_reuses_every_stage(tiny_run: tuple[Path, object],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = tiny_run
    records = {s: (out / "stages" / f"{s}.json").read_text() for s in STAGES}

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a cached stage")

    import certify.run.area as area
    import certify.study.attack_curves as curves
    import certify.train.robust as robust
    import certify.train.standard as standard

    monkeypatch.setattr(standard, "train_standard", boom)
    monkeypatch.setattr(robust, "train_robust", boom)
    monkeypatch.setattr(robust, "retrain_checkpoint", boom)
    monkeypatch.setattr(area, "run_area", boom)
    monkeypatch.setattr(curves, "attack_curves", boom)
    again = run_experiment(TINY, out_dir=out, quiet=True)
    assert again.ran == () and again.skipped == STAGES
    assert {s: (out / "stages" / f"{s}.json").read_text() for s in STAGES} == records


def test_from_stage_and_changed_section_rerun_only_later_stages(
        tiny_run: tuple[Path, object]) -> None:
    out, _ = tiny_run
    again = run_experiment(TINY, out_dir=out, from_stage="report", quiet=True)
    assert again.ran == ("report",)
    data = _tiny()
    data["claims"] = {"prune_tolerance": 50.0}
    changed = run_experiment(parse_config(data, source=str(TINY)), out_dir=out, quiet=True)
    assert changed.ran == ("report",)
    pruned = {c.key: c for c in changed.claims}["pruned-accuracy"]
    assert "within 50 points" in pruned.statement


def test_bad_stage_name(tmp_path: Path) -> None:
    with pytest.raises(CertifyError, match="stage"):
        run_experiment(TINY, out_dir=tmp_path, from_stage="certfy", quiet=True)
