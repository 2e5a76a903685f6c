"""``certify area`` and ``certify plot`` end to end on a digits checkpoint, resume, bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from certify.cli import main
from tests.digits_models import train_digits_mlp

pytest.importorskip("certify.bounds")


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """A digits MLP trained for a few epochs with plain torch, saved as a checkpoint."""
    from certify.checkpoint import ModelMeta, save_checkpoint
    from certify.nets import arch_kwargs_of

    model = train_digits_mlp(4)
    path = tmp_path_factory.mktemp("models") / "digits-mlp.pt"
    meta = ModelMeta("mlp", arch_kwargs_of(model), "digits", (1, 8, 8), 10, (0.3052,), (0.376,))
    save_checkpoint(path, model, meta)
    return path


def area(*args: str, **kwargs):
    return CliRunner().invoke(main, ["area", *args], **kwargs)


def read_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "per_sample.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_area_end_to_end_json(digits_ckpt, tmp_path):
    out = tmp_path / "run"
    result = area(
        str(digits_ckpt),
        "--dataset",
        "digits",
        "--n",
        "16",
        "--batch-size",
        "8",
        "-o",
        str(out),
        "--quiet",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "complete" and data["n_done"] == 16
    crown = data["summary"]["crown"]
    assert crown["n"] == 16 and 0.5 < crown["clean_accuracy"] <= 1
    assert crown["certification_area"] > 0
    for name in (
        "config.json",
        "per_sample.csv",
        "results.json",
        "sorted_eps.png",
        "certified_accuracy.png",
        "summary.md",
    ):
        assert (out / name).is_file(), name
    rows = read_rows(out)
    assert len(rows) == 16 and [int(r["index"]) for r in rows] == list(range(16))
    for r in rows:
        cert, attack = float(r["certified_eps"]), float(r["attack_eps"])
        assert cert <= attack
        if r["label"] != r["prediction"]:
            assert cert == 0.0 and attack == 0.0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["tol"] == 1e-4 and config["settings"]["methods"] == ["crown"]
    assert config["versions"]["certify"]
    assert "sorted_eps.png" in (out / "summary.md").read_text()
    # the area is the mean certified eps over all samples, misclassified at 0
    area_value = sum(float(r["certified_eps"]) for r in rows) / 16
    assert crown["certification_area"] == pytest.approx(area_value)


def test_area_table_and_several_methods(digits_ckpt, tmp_path):
    out = tmp_path / "run"
    result = area(
        str(digits_ckpt),
        "--dataset",
        "digits",
        "--indices",
        "5,0:4,40",
        "--method",
        "ibp",
        "--method",
        "crown",
        "--attack",
        "none",
        "-o",
        str(out),
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split()[0] == "method"
    assert f"results in {out}" in result.stdout
    assert len(read_rows(out)) == 6 * 2
    rows = read_rows(out)
    assert [(r["index"], r["method"]) for r in rows][:2] == [("5", "ibp"), ("5", "crown")]
    assert all(math.isinf(float(r["attack_eps"])) for r in rows)


def test_area_duplicate_indices_is_an_error(digits_ckpt, tmp_path):
    result = area(
        str(digits_ckpt), "--dataset", "digits", "--indices", "3,0:5", "-o", str(tmp_path / "r")
    )
    assert result.exit_code == 1
    assert "twice" in result.output


def test_area_bab_with_budgets(digits_ckpt, tmp_path):
    """--method bab runs with its budgets, never below alpha-CROWN's radius (its bracket) and
    never above the attack's; the budgets without --method bab are a usage error."""
    out = tmp_path / "b"
    result = area(str(digits_ckpt), "--dataset", "digits", "--n", "3", "--method", "alpha-crown",
                  "--method", "bab", "--bab-time-limit", "1", "--bab-max-domains", "500",
                  "--bab-budget-reach", "0.75", "--tol", "1e-3", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    by = {(r["index"], r["method"]): r for r in rows}
    for index in {r["index"] for r in rows}:
        alpha, bab = by[(index, "alpha-crown")], by[(index, "bab")]
        assert float(bab["certified_eps"]) >= float(alpha["certified_eps"])
        assert float(bab["certified_eps"]) <= float(bab["attack_eps"])
    bad = area(str(digits_ckpt), "--dataset", "digits", "--n", "1", "--bab-time-limit", "1",
               "-o", str(tmp_path / "c"))
    assert bad.exit_code == 2 and "--method bab" in bad.output
    bad = area(str(digits_ckpt), "--dataset", "digits", "--n", "1", "--method", "bab",
               "--bab-budget-reach", "0", "-o", str(tmp_path / "d"))
    assert bad.exit_code == 2 and "--bab-budget-reach" in bad.output


def _strip_seconds(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


RESUME_ARGS = [
    "--dataset",
    "digits",
    "--n",
    "20",
    "--batch-size",
    "8",
    "--method",
    "ibp",
    "--method",
    "crown",
    "--quiet",
]


@pytest.fixture(scope="module")
def uninterrupted(digits_ckpt, tmp_path_factory) -> Path:
    full = tmp_path_factory.mktemp("full") / "run"
    assert area(str(digits_ckpt), *RESUME_ARGS, "-o", str(full)).exit_code == 0
    return full


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_resume_after_a_kill_equals_an_uninterrupted_run(
    digits_ckpt, uninterrupted, tmp_path, monkeypatch, failure
):
    args = [str(digits_ckpt), *RESUME_ARGS]
    full = uninterrupted

    import certify.radius as radius

    real = radius.certified_radii
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # after the first batch (2 methods) and half of the second
            raise failure("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(radius, "certified_radii", dying)
    part = tmp_path / "part"
    killed = area(*args, "-o", str(part))
    assert killed.exit_code != 0
    if failure is KeyboardInterrupt:
        assert killed.exit_code == 130 and "--resume" in killed.output
    # what is on disk is valid: complete rows of the work done so far, a partial status
    saved = read_rows(part)
    assert len(saved) == 8 * 2 + 8  # batch 1 with both methods, batch 2 with ibp
    status = json.loads((part / "results.json").read_text())
    assert status["status"] == "partial" and status["n_done"] == 16
    monkeypatch.setattr(radius, "certified_radii", real)
    resumed = area(*args, "-o", str(part), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert _strip_seconds(read_rows(part)) == _strip_seconds(read_rows(full))
    full_summary = json.loads((full / "results.json").read_text())["summary"]
    part_summary = json.loads((part / "results.json").read_text())["summary"]
    for method in ("ibp", "crown"):
        assert (
            part_summary[method]["certification_area"] == full_summary[method]["certification_area"]
        )


def test_resume_finds_the_newest_matching_run(digits_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        str(digits_ckpt),
        "--dataset",
        "digits",
        "--n",
        "4",
        "--attack",
        "none",
        "--method",
        "ibp",
        "--quiet",
    ]
    assert area(*args).exit_code == 0
    runs = list((tmp_path / "reports" / "area").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-digits-mlp")
    again = area(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert f"results in {Path('reports') / 'area' / runs[0].name}" in again.stdout
    other = area(*args[:-3], "--method", "crown", "--quiet", "--resume")
    assert other.exit_code == 1 and "nothing to resume" in other.output


def test_resume_with_other_options_is_refused(digits_ckpt, tmp_path):
    out = tmp_path / "run"
    base = [
        str(digits_ckpt),
        "--dataset",
        "digits",
        "--n",
        "4",
        "--attack",
        "none",
        "--method",
        "ibp",
        "-o",
        str(out),
        "--quiet",
    ]
    assert area(*base).exit_code == 0
    again = area(*base)
    assert again.exit_code == 1 and "already holds a run" in again.output
    changed = area(*base, "--tol", "1e-3", "--resume")
    assert changed.exit_code == 1
    assert "cannot resume" in changed.output and "tol" in changed.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tol", "0"], "--tol must be a number > 0"),
        (["--eps-max", "-0.1"], "--eps-max must be a number > 0"),
        (["--n", "0"], "--num-samples must be >= 1"),
        (["--n", "5000"], "has only 450 samples"),
        (["--n", "3", "--indices", "1,2"], "not both"),
        (["--indices", "999"], "out of range"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_options_are_one_line_errors(digits_ckpt, tmp_path, args, message):
    result = area(str(digits_ckpt), "--dataset", "digits", "-o", str(tmp_path / "r"), *args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_missing_model_and_wrong_dataset(digits_ckpt, tmp_path):
    missing = area(str(tmp_path / "nope.pt"), "--dataset", "digits")
    assert missing.exit_code == 1 and "checkpoint not found" in missing.output
    wrong = area(str(digits_ckpt), "--dataset", "mnist", "-o", str(tmp_path / "r"))
    assert wrong.exit_code == 1
    assert "pick --dataset digits" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1
    unknown = area(str(digits_ckpt), "--dataset", "digits", "--method", "alpha_crown")
    assert unknown.exit_code == 2 and "did you mean 'alpha-crown'" in unknown.output


def test_plot_redraws_several_runs(digits_ckpt, tmp_path):
    runs = []
    for k, method in enumerate(["ibp", "crown"]):
        out = tmp_path / f"run{k}"
        assert (
            area(
                str(digits_ckpt),
                "--dataset",
                "digits",
                "--n",
                "6",
                "--method",
                method,
                "--attack",
                "none",
                "-o",
                str(out),
                "--quiet",
            ).exit_code
            == 0
        )
        runs.append(str(out))
    target = tmp_path / "figs" / "both.png"
    result = CliRunner().invoke(main, ["plot", *runs, "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes().startswith(b"\x89PNG")
    acc = CliRunner().invoke(main, ["plot", runs[0], "--kind", "certified-accuracy"])
    assert acc.exit_code == 0 and (Path(runs[0]) / "certified_accuracy.png").is_file()
    bad = CliRunner().invoke(main, ["plot", str(tmp_path / "figs")])
    assert bad.exit_code == 1 and "not found" in bad.output
    none = CliRunner().invoke(main, ["plot", runs[0], "--method", "lp"])
    assert none.exit_code == 1 and "no per-sample rows for lp" in none.output


def test_library_run_matches_cli(digits_ckpt, tmp_path):
    from certify.report.area import read_run
    from certify.run.area import AreaConfig, run_area

    run = run_area(
        AreaConfig(model=str(digits_ckpt), dataset="digits", n=5, attack="none", methods=("ibp",)),
        out_dir=tmp_path / "lib",
        quiet=True,
    )
    assert run.complete and len(run.rows) == 5 and run.label == "digits-mlp"
    again = read_run(tmp_path / "lib")
    assert again.rows == run.rows
    assert again.summaries["ibp"].certification_area == pytest.approx(
        run.summaries["ibp"].certification_area
    )


# auto_LiRPA's methods (lirpa-*), optional, next to the native ones

HAS_AUTO_LIRPA = importlib.util.find_spec("auto_LiRPA") is not None


def _certified(run: Path) -> dict[int, float]:
    with open(run / "per_sample.csv", newline="") as f:
        return {int(r["index"]): float(r["certified_eps"]) for r in csv.DictReader(f)}


def test_missing_auto_lirpa_is_one_line_with_the_install_command(
    digits_ckpt,
    tmp_path,
    monkeypatch,
):
    monkeypatch.setitem(sys.modules, "auto_LiRPA", None)  # as if not installed
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "area",
            str(digits_ckpt),
            "--dataset",
            "digits",
            "--n",
            "4",
            "--method",
            "lirpa-crown",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1 and "auto_LiRPA is not installed" in lines[0] and "pip install" in lines[0]
    )
    assert not out.exists(), "nothing may be written before the engine is known to work"


def test_a_method_auto_lirpa_lacks_is_a_clear_error(digits_ckpt, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "area",
            str(digits_ckpt),
            "--dataset",
            "digits",
            "--n",
            "4",
            "--method",
            "lirpa-lp",
            "-o",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert "unknown method 'lirpa-lp'" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(
    not HAS_AUTO_LIRPA,
    reason="auto_LiRPA not installed: this test compares "
    "the two engines (see README, 'Using auto_LiRPA')",
)
def test_auto_lirpa_engine_certifies_soundly_and_records_its_version(digits_ckpt, tmp_path):
    common = [
        "area",
        str(digits_ckpt),
        "--dataset",
        "digits",
        "--n",
        "12",
        "--dtype",
        "float64",
        "--tol",
        "1e-4",
        "--quiet",
    ]
    ours = CliRunner().invoke(main, [*common, "--method", "crown", "-o", str(tmp_path / "native")])
    theirs = CliRunner().invoke(
        main, [*common, "--method", "lirpa-crown", "-o", str(tmp_path / "al")]
    )
    assert ours.exit_code == 0, ours.output
    assert theirs.exit_code == 0, theirs.output
    native, other = _certified(tmp_path / "native"), _certified(tmp_path / "al")
    assert native.keys() == other.keys()
    # auto_LiRPA's CROWN also intersects the output with IBP, so it can only be as tight or
    # tighter; both radii are searched to within tol, so they differ by at least -tol.
    assert all(other[i] >= native[i] - 1e-4 for i in native)
    results = json.loads((tmp_path / "al" / "results.json").read_text())
    assert results["settings"]["methods"] == ["lirpa-crown"]
    assert results["versions"]["auto-lirpa"]
