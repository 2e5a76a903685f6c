"""What a new user hits first: defaults, ONNX models everywhere, budgets kept, resume, grids."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from tests.cli.cli_helpers import one_line_error, run
from tests.onnx.onnx_helpers import export, robustness_vnnlib


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained digits MLP as a checkpoint and as ONNX (exported without the dataset)."""
    from certify.checkpoint import ModelMeta, save_checkpoint
    from certify.nets import arch_kwargs_of, create_arch

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = create_arch("mlp-16-16", (1, 8, 8), 10, mean=[0.3], std=[0.4]).eval()
    meta = ModelMeta("mlp", arch_kwargs_of(model), "digits", (1, 8, 8), 10, (0.3,), (0.4,))
    save_checkpoint(root / "m.pt", model, meta)
    export(model, root / "m.onnx", torch.rand(1, 1, 8, 8))
    return {"pt": root / "m.pt", "onnx": root / "m.onnx", "root": root}


# ---- area: the checkpoint's dataset, a tolerance the dtype resolves, resume before any batch


def test_area_takes_the_checkpoints_dataset(models, tmp_path) -> None:
    result = run("area", models["pt"], "--n", 3, "--method", "ibp", "--attack", "none", "-q",
                 "-o", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["dataset"] == "digits"
    assert "the one the checkpoint records" in " ".join(run("area", "--help").stdout.split())


def test_area_of_onnx_without_dataset_asks_for_it(models, tmp_path) -> None:
    line = one_line_error(run("area", models["onnx"], "--n", 3, "-o", tmp_path / "run"))
    assert "does not record a known dataset" in line and "--dataset" in line


def test_area_tolerance_finer_than_the_dtype_is_refused(models, tmp_path) -> None:
    line = one_line_error(run("area", models["pt"], "--tol", "1e-12", "--n", 2,
                              "-o", tmp_path / "run"))
    assert "--tol 1e-12" in line and "float32" in line and "--dtype float64" in line
    assert not (tmp_path / "run").exists()
    from certify.run.area import AreaConfig, smallest_tol

    AreaConfig("m.pt", "digits", tol=1e-12, dtype="float64").validate()  # float64 resolves it
    floor = smallest_tol(0.5, "float32")
    assert 2e-7 < floor < 3e-7  # about four float32 ulps of 0.5
    AreaConfig("m.pt", "digits", tol=floor).validate()


def test_area_killed_before_its_first_batch_resumes(models, tmp_path, monkeypatch) -> None:
    """The config is on disk before any work; a run that saved nothing resumes from scratch."""
    import certify.radius

    args = ["area", models["pt"], "--n", 3, "--method", "ibp", "--attack", "none", "-q",
            "-o", tmp_path / "run"]

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(certify.radius, "certified_radii", killed)
        assert run(*args).exit_code == 130
    assert (tmp_path / "run" / "config.json").is_file()
    assert not (tmp_path / "run" / "per_sample.csv").exists()
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len((tmp_path / "run" / "per_sample.csv").read_text().splitlines()) == 4
    fresh = run(*args[:-1], tmp_path / "never-started", "--resume")  # nothing there yet
    assert fresh.exit_code == 0, fresh.output


# ---- ONNX in every command that reads a model


def test_info_eval_distill_take_onnx(models, tmp_path) -> None:
    info = run("info", models["onnx"])
    assert info.exit_code == 0, info.output
    assert "architecture: onnx" in info.stdout and "(1, 8, 8)" in info.stdout
    evaluated = run("eval", models["onnx"], "--dataset", "digits", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    from_pt = run("eval", models["pt"], "--json")
    assert json.loads(evaluated.stdout)["correct"] == json.loads(from_pt.stdout)["correct"]
    assert "--dataset" in one_line_error(run("eval", models["onnx"]))
    student = tmp_path / "student.pt"
    distilled = run("distill", models["onnx"], "--dataset", "digits", "--student", "mlp-8",
                    "--epochs", 1, "-q", "-o", student)
    assert distilled.exit_code == 0, distilled.output
    from certify.checkpoint import load_checkpoint

    _, meta = load_checkpoint(student)
    assert meta.dataset == "digits" and meta.training["teacher"].endswith("m.onnx")


@pytest.mark.parametrize("command", [["prune", "--ratio", "0.5"],
                                     ["retrain", "--robust", "ibp", "--eps", "0.01"]])
def test_prune_and_retrain_of_onnx_say_what_to_do(models, tmp_path, command) -> None:
    out = tmp_path / "out.pt"
    line = one_line_error(run(command[0], models["onnx"], *command[1:], "-o", out))
    assert "ONNX" in line and "certify distill" in line and not out.exists()


# ---- attack grids


def test_attack_range_without_count_is_refused(models, tmp_path) -> None:
    line = one_line_error(run("attack", models["pt"], "--dataset", "digits", "--eps=0:0.1",
                              "-o", tmp_path / "att"))
    assert "0:0.1:11" in line
    assert "(11 points)" not in run("attack", "--help").stdout


# ---- verify: every phase within the budget, and the budget spent before giving up


def test_verify_keeps_its_timeout_with_a_slow_milp(models, tmp_path, monkeypatch) -> None:
    """LP refinement and MILPs that take as long as they are allowed: still within T + 5 s."""
    import certify.bounds.solver as solver
    import certify.verify

    solve_rows = solver.lp_rows

    def slow_rows(problem, solver):  # noqa: ANN001, ANN202
        time.sleep(0.1 * problem.objectives.shape[0])  # 0.1 s per LP
        return solve_rows(problem, solver)

    def slow_milp(problem, time_limit, variables, options=None):  # noqa: ANN001, ANN202
        time.sleep(min(time_limit, 60.0))
        return solver.MilpOutcome("time_limit", -math.inf, math.inf, None, time_limit)

    monkeypatch.setattr(solver, "lp_rows", slow_rows)
    monkeypatch.setattr(solver, "solve_milp", slow_milp)
    monkeypatch.setattr(certify.verify, "_attack", lambda *a, **k: None)  # no shortcut by sat
    from certify.checkpoint import ModelMeta, save_checkpoint
    from certify.nets import arch_kwargs_of, create_arch

    torch.manual_seed(1)  # two refined layers of 64 unstable neurons: 12.8 s of LPs unbudgeted
    model = create_arch("mlp-64-64-64", (1, 8, 8), 10, mean=[0.3], std=[0.4]).eval()
    meta = ModelMeta("mlp", arch_kwargs_of(model), "digits", (1, 8, 8), 10, (0.3,), (0.4,))
    save_checkpoint(tmp_path / "wide.pt", model, meta)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = tmp_path / "wide.vnnlib"
    spec.write_text(robustness_vnnlib(x, int(model(x).argmax()), 10, 0.5))
    timeout = 3.0
    t0 = time.perf_counter()
    result = run("verify", tmp_path / "wide.pt", spec, "--method", "ibp", "--milp", "always",
                 "--timeout", timeout, "--json")
    wall = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"] in ("unknown", "timeout")
    assert wall <= timeout + 5, wall
