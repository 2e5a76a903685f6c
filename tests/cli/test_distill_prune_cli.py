"""``certify distill`` and ``certify prune`` through click's CliRunner, bad input included."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from certify._io import sha256_file
from tests.cli.cli_helpers import one_line_error, run, single_thread  # noqa: F401


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {"teacher": root / "teacher.pt", "student": root / "student.pt",
             "mlp": root / "mlp.pt"}
    for arch, key, epochs in [("wk-small", "teacher", 4), ("mlp-16", "mlp", 1)]:
        r = run("train", "--dataset", "digits", "--arch", arch, "--epochs", epochs, "-o",
                paths[key], "-q")
        assert r.exit_code == 0, r.output
    r = run("distill", paths["teacher"], "--student", "scn-8-8", "--epochs", 3, "-o",
            paths["student"], "-q")
    assert r.exit_code == 0, r.output
    paths["distill_stdout"] = r.stdout  # type: ignore[assignment]
    return paths


def test_distill_hinton(models):  # type: ignore[no-untyped-def]
    assert re.search(r"test accuracy [\d.]+% \(teacher [\d.]+%; scn-8-8 via hinton at T=2\)",
                     models["distill_stdout"])
    meta = torch.load(models["student"], weights_only=True)["meta"]
    assert meta["parent"] == sha256_file(models["teacher"])
    t = meta["training"]
    assert (t["method"], t["temperature"], t["alpha"], t["epochs"]) == ("hinton", 2.0, 0.9, 3)


@pytest.mark.parametrize("method", ["logits", "defensive"])
def test_distill_other_methods(models, tmp_path, method):  # type: ignore[no-untyped-def]
    out = tmp_path / "s.pt"
    r = run("distill", models["teacher"], "--student", "scn-4-4", "--method", method,
            "--temperature", "5", "--epochs", 1, "-o", out)
    assert r.exit_code == 0, r.output
    t = torch.load(out, weights_only=True)["meta"]["training"]
    assert t["method"] == method and t["deployment_temperature"] == 1.0
    assert t["temperature"] == (None if method == "logits" else 5.0)
    if method == "defensive":   # the teacher was trained at T = 1: say how to match Papernot
        assert "certify train --temperature 5" in r.stderr


def test_distill_sweep_table(models, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "best.pt"
    r = run("distill", models["teacher"], "--student", "scn-4-4", "--temperature", "1,2.5",
            "--epochs", 1, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert "Temperature" in r.stdout and "Logits Accuracy" in r.stdout
    assert "best student on validation" in r.stdout
    with open(tmp_path / "best.sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["temperature"]) for row in rows] == [1.0, 2.5]
    assert rows[0]["name"] == "scn-4-4" and int(rows[0]["parameters"]) > 0
    assert (tmp_path / "best.sweep.md").exists() and out.exists()
    assert sorted(p.name for p in (tmp_path / "best.sweep").iterdir()) == \
        ["hinton-T1.pt", "hinton-T2.5.pt", "logits.pt"]


def test_distill_bad_input(models, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "s.pt"
    teacher = models["teacher"]
    line = one_line_error(run("distill", teacher, "--student", "scn-4-4", "--dataset", "svhn",
                              "-o", out))
    assert "teacher teacher.pt expects input (1, 8, 8) (digits) but svhn has" in line
    assert "did you mean 'scn" in one_line_error(
        run("distill", teacher, "--student", "scnn-4-4", "-o", out))
    assert "--method logits" in one_line_error(
        run("distill", teacher, "--student", "scn-4-4", "--transfer-split", "extra", "-o", out))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"plain text, not a checkpoint")
    assert "bad.pt" in one_line_error(run("distill", bad, "--student", "scn-4-4", "-o", out))
    for temps in ("0", "abc", "1,-2"):
        r = run("distill", teacher, "--student", "scn-4-4", "--temperature", temps, "-o", out)
        assert r.exit_code == 2 and "--temperature" in r.output
    assert not any(tmp_path.glob("s.*"))


def test_prune_ratio_with_finetune(models, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "p.pt"
    r = run("prune", models["student"], "--ratio", "0.5", "--finetune-epochs", 1, "-o", out,
            "-q")
    assert r.exit_code == 0, r.output
    table = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| Name") and len(table) == 4    # header, before, pruned, tuned
    assert "conv1 8->4, conv2 8->4" in r.stdout
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["arch_kwargs"]["channels"] == [4, 4]
    assert meta["parent"] == sha256_file(models["student"])
    assert meta["training"]["ratios"] == {"conv1": 0.5, "conv2": 0.5}
    info = run("info", out)
    assert info.exit_code == 0 and "channels=[4, 4]" in info.stdout


def test_prune_per_layer_and_sensitivity(models, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "p.pt"
    r = run("prune", models["student"], "--ratios", "conv2=0.25", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert torch.load(out, weights_only=True)["meta"]["arch_kwargs"]["channels"] == [8, 6]
    scan = tmp_path / "scan.csv"
    r = run("prune", models["student"], "--sensitivity", "--scan-ratios", "0.25,0.5", "-o", scan)
    assert r.exit_code == 0, r.output
    with open(scan) as f:
        rows = list(csv.DictReader(f))
    assert [(row["layer"], float(row["ratio"])) for row in rows] == [
        ("conv1", 0.25), ("conv1", 0.5), ("conv2", 0.25), ("conv2", 0.5)]
    assert scan.with_suffix(".md").exists() and "on the validation hold-out" in r.stdout


def test_prune_bad_input(models, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "p.pt"
    student = models["student"]
    assert "must be in [0, 1), got 1.0" in one_line_error(
        run("prune", student, "--ratio", "1.0", "-o", out))
    assert "must be in [0, 1)" in one_line_error(
        run("prune", student, "--ratio", "-0.1", "-o", out))
    assert "would remove all 8 filters of conv1" in one_line_error(
        run("prune", student, "--ratios", "conv1=0.97", "-o", out))
    line = one_line_error(run("prune", student, "--ratios", "conv9=0.5", "-o", out))
    assert "unknown conv layer 'conv9'" in line and "Available: conv1, conv2" in line
    assert "no conv layers to prune" in one_line_error(
        run("prune", models["mlp"], "--ratio", "0.5", "-o", out))
    assert run("prune", student, "--ratios", "conv1", "-o", out).exit_code == 2
    assert run("prune", student, "-o", out).exit_code == 2
    assert run("prune", student, "--ratio", "0.5", "--sensitivity", "-o", out).exit_code == 2
    assert "needs fine-tuning" in one_line_error(
        run("prune", student, "--ratio", "0.5", "--distill-from-parent", "-o", out))
    assert not any(tmp_path.iterdir())


def test_prune_never_overwrites_silently(models, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "p.pt"
    out.write_bytes(b"someone's model")
    line = one_line_error(run("prune", models["student"], "--ratio", "0.5", "-o", out, "-q"))
    assert "already exists" in line and "--force" in line
    assert out.read_bytes() == b"someone's model"
    r = run("prune", models["student"], "--ratio", "0.5", "-o", out, "-q", "--force")
    assert r.exit_code == 0, r.output
    assert torch.load(out, weights_only=True)["meta"]["arch_kwargs"]["channels"] == [4, 4]
