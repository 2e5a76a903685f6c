"""``certify retrain`` and ``certify train --robust`` through click's CliRunner.

Torch runs single-threaded here: on a small shared machine that is many times faster for
digits-sized models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import Result

from certify.checkpoint import checkpoint_sha256, load_checkpoint
from tests.cli.cli_helpers import one_line_error, run, single_thread  # noqa: F401

EPS = "0.1"


@pytest.fixture(scope="module")
def normal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A normally trained mlp-64-64 on digits."""
    out = tmp_path_factory.mktemp("normal") / "normal.pt"
    result = run("train", "--dataset", "digits", "--arch", "mlp-64-64", "--epochs", "8", "-o",
                 out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


RETRAIN = ("--robust", "wong-kolter", "--eps", EPS, "--epochs", "3", "--eval-samples", "60")


@pytest.fixture(scope="module")
def retrained(normal: Path) -> tuple[Path, Result]:
    out = normal.with_name("retrained.pt")
    return out, run("retrain", normal, *RETRAIN, "-o", out, "--quiet")


def test_retrain_writes_a_child_that_records_parent_and_recipe(normal, retrained):  # type: ignore[no-untyped-def]
    out, result = retrained
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith(f"{out}: test accuracy") and "certified (wong-kolter)" in line
    after, before = (float(v) for v in re.findall(r"certified(?: \(wong-kolter\))? ([\d.]+)%",
                                                  line))
    assert after > before
    _, meta = load_checkpoint(out)
    _, parent = load_checkpoint(normal)
    assert meta.parent == checkpoint_sha256(normal)
    t = meta.training
    assert (t["command"], t["method"], t["eps"], t["epochs"]) == ("retrain", "wong-kolter", 0.1, 3)
    assert t["eps_ramp_epochs"] == 1.5 and t["eps_start"] == 0.0    # default: half the epochs
    assert t["parent_training"] == parent.training
    assert meta.metrics["certified_accuracy"] == pytest.approx(after / 100, abs=5e-5)
    assert not Path(f"{out}.partial").exists()


def test_retrain_resumes_after_an_interruption(normal, retrained, monkeypatch):  # type: ignore[no-untyped-def]
    from certify.train.robust import EpochEvaluator

    reference, _ = retrained
    out = normal.with_name("resumed.pt")
    original = EpochEvaluator.__call__

    def interrupt(self, model, epoch):  # type: ignore[no-untyped-def]
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, model, epoch)

    monkeypatch.setattr(EpochEvaluator, "__call__", interrupt)
    first = run("retrain", normal, *RETRAIN, "-o", out, "--quiet")
    assert first.exit_code == 130 and "--resume" in first.stderr and not out.exists()
    assert Path(f"{out}.partial").exists()
    monkeypatch.setattr(EpochEvaluator, "__call__", original)
    second = run("retrain", normal, *RETRAIN, "-o", out, "--resume")
    assert second.exit_code == 0, second.output
    assert "resuming from" in second.stderr and "after epoch 1/3" in second.stderr
    a, b = torch.load(reference, weights_only=True), torch.load(out, weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["meta"]["metrics"] == b["meta"]["metrics"]
    assert reference.read_bytes() == out.read_bytes()  # no wall-clock times: the same file


def test_train_robust_crown_ibp_with_kappa_ramp(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "cibp.pt"
    result = run("train", "--dataset", "digits", "--arch", "mlp-32", "--robust", "crown-ibp",
                 "--eps", "0.05", "--epochs", "2", "--kappa-start", "1", "--kappa", "0.5",
                 "--grad-clip", "5", "--eval-samples", "40", "-o", out)
    assert result.exit_code == 0, result.output
    assert "certified (crown-ibp)" in result.stdout
    assert re.search(r"epoch 2/2 .*eps 0\.05 .*pgd accuracy .*certified accuracy", result.stderr)
    _, meta = load_checkpoint(out)
    t = meta.training
    assert (t["method"], t["eps"], t["kappa_start"], t["kappa"]) == ("crown-ibp", 0.05, 1.0, 0.5)
    assert t["grad_clip"] == 5.0 and t["eps_ramp_epochs"] == 1.0
    assert len(t["history"]) == 2


def test_train_robust_pgd_defaults(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "pgd.pt"
    result = run("train", "--dataset", "digits", "--arch", "mlp-32", "--robust", "pgd", "--eps",
                 EPS, "--epochs", "1", "--pgd-steps", "3", "--eval-samples", "30", "-o", out,
                 "--quiet")
    assert result.exit_code == 0, result.output
    t = load_checkpoint(out)[1].training
    assert (t["method"], t["pgd_steps"], t["certify_method"]) == ("pgd", 3, "crown-ibp")


@pytest.mark.parametrize(("args", "match"), [
    (("--eps", "0.1"), "robust-training options without --robust: --eps"),
    (("--kappa", "0.5", "--eps-start", "0.01"), "--eps-start, --kappa"),
    (("--robust", "pgd"), "needs the training eps"),
    (("--robust", "pgd", "--eps", "0.1", "--temperature", "2"), "does not combine"),
    (("--robust", "wong_kolter", "--eps", "0.1"), "Invalid value for '--robust'"),
    (("--robust", "pgd", "--eps", "-0.1"), "Invalid value for '--eps'"),
])
def test_train_robust_usage_errors(args, match):  # type: ignore[no-untyped-def]
    result = run("train", "--dataset", "digits", "--arch", "mlp", *args)
    assert result.exit_code == 2
    assert match in result.stderr


def test_retrain_errors_are_one_line(normal, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "x.pt"
    line = one_line_error(run("retrain", normal, "--robust", "pgd", "--eps", EPS,
                              "--certify-method", "crwn", "-o", out))
    assert "did you mean 'crown'" in line
    line = one_line_error(run("retrain", normal, "--robust", "pgd", "--eps", EPS, "--dataset",
                              "svhn", "-o", out))
    assert "pick --dataset digits" in line
    line = one_line_error(run("retrain", tmp_path / "missing.pt", "--robust", "pgd", "--eps",
                              EPS, "-o", out))
    assert "checkpoint not found" in line
    missing = run("retrain", normal, "--eps", EPS)
    assert missing.exit_code == 2 and "Missing option '--robust'" in missing.stderr


def test_cli_choices_are_the_library_methods() -> None:
    from certify.cli.train import ROBUST_CHOICES
    from certify.train.robust import ROBUST_METHODS

    assert sorted(ROBUST_CHOICES) == sorted(ROBUST_METHODS)


def _cli_area(model: Path, out: Path) -> float:
    result = run("area", model, "--dataset", "digits", "--method", "wong-kolter", "--attack",
                 "none", "--n", "150", "--tol", "1e-3", "-o", out, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    return float(json.loads(result.stdout)["summary"]["wong-kolter"]["certification_area"])


def test_certify_area_grows_with_robust_retraining(normal, retrained, tmp_path):  # type: ignore[no-untyped-def]
    out, result = retrained
    assert result.exit_code == 0, result.output
    assert _cli_area(out, tmp_path / "retrained") > _cli_area(normal, tmp_path / "normal")
