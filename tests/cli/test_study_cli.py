"""attack / compare / experiment / demo through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from certify.cli import main
from tests.report.table_checks import assert_certified_at_most_pgd


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_attack_two_models(tiny_checkpoint: Path, tmp_path: Path) -> None:
    other = _copy(tiny_checkpoint, tmp_path / "other.pt")
    out = tmp_path / "att"
    r = CliRunner().invoke(main, ["attack", str(tiny_checkpoint), str(other), "--dataset",
                                  "digits", "--eps", "0:0.2:3", "--n", "12", "--steps", "3",
                                  "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "attack_curves.json").read_text())
    assert [c["label"] for c in data["curves"]] == ["tiny", "other"]
    for c in data["curves"]:
        assert c["eps"] == [0.0, 0.1, 0.2]
        assert all(a >= b for a, b in zip(c["accuracy"], c["accuracy"][1:], strict=False))
    assert (out / "attack_curves.png").stat().st_size > 1000
    assert len((out / "attack_curves.csv").read_text().splitlines()) == 1 + 2 * 3


def test_attack_autoattack_or_install_hint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["attack", str(tiny_checkpoint), "--dataset", "digits",
                                  "--eps", "0,0.1", "--n", "6", "--attack", "autoattack",
                                  "-o", str(tmp_path / "aa"), "-q"])
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        assert r.exit_code == 1 and "pip install --no-deps torchattacks" in r.output
        return
    assert r.exit_code == 0, r.output
    pgd = CliRunner().invoke(main, ["attack", str(tiny_checkpoint), "--dataset", "digits",
                                    "--eps", "0,0.1", "--n", "6", "-o", str(tmp_path / "p"),
                                    "-q"])
    assert pgd.exit_code == 0
    aa = json.loads((tmp_path / "aa" / "attack_curves.json").read_text())["curves"][0]
    clean = json.loads((tmp_path / "p" / "attack_curves.json").read_text())["curves"][0]
    assert aa["accuracy"][0] == clean["accuracy"][0]       # eps 0: clean accuracy


@pytest.mark.parametrize("args,message", [
    (["--dataset", "digits", "--eps", "0:x"], "cannot read eps grid"),
    (["--dataset", "cifar10"], "cifar10"),
])
def test_attack_bad_input(tiny_checkpoint: Path, tmp_path: Path, args: list[str],
                          message: str) -> None:
    r = CliRunner().invoke(main, ["attack", str(tiny_checkpoint), *args, "-o",
                                  str(tmp_path / "x")])
    assert r.exit_code == 1 and message in r.output
    assert "Traceback" not in r.output


def test_attack_missing_model(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["attack", str(tmp_path / "none.pt"), "--dataset", "digits"])
    assert r.exit_code == 1 and "none.pt" in r.output


def test_compare_reuses_runs(tiny_checkpoint: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    other = _copy(tiny_checkpoint, tmp_path / "second.pt")
    args = ["compare", str(tiny_checkpoint), str(other), "--dataset", "digits", "--n", "6",
            "--tol", "2e-3", "--eps-max", "0.3", "--cache", str(tmp_path / "cache"), "-q"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [row["label"] for row in rows] == ["tiny", "second"]
    assert rows[0]["certification_area"] == rows[1]["certification_area"]   # same weights
    assert len(list((tmp_path / "cache").iterdir())) == 1    # same sha256 + settings: one run
    for f in ("sorted_eps.png", "certified_accuracy.png", "compare.md", "compare.csv"):
        assert (tmp_path / "cmp" / f).is_file()
    assert assert_certified_at_most_pgd((tmp_path / "cmp" / "compare.md").read_text()) == 2

    import certify.run.area as area

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("recomputed a cached run")

    monkeypatch.setattr(area, "run_area", boom)
    again = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "cmp2")])
    assert again.exit_code == 0, again.output


def test_compare_missing_model(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "gone.pt"), "--dataset", "digits"])
    assert r.exit_code == 1 and "gone.pt" in r.output and "Traceback" not in r.output


def test_experiment_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[experiment]\ndataset = "digits"\n[teacher]\narch = "scn"\nepoch = 3\n')
    r = CliRunner().invoke(main, ["experiment", str(cfg)])
    assert r.exit_code == 1 and "epoch" in r.output and "epochs" in r.output


def test_every_study_command_has_help() -> None:
    for cmd in ("attack", "compare", "experiment", "demo"):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "Example" in r.output
