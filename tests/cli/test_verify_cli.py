"""``certify verify`` through click's CliRunner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from certify.cli import main
from certify.nets import Normalize
from tests.onnx.onnx_helpers import export, robustness_vnnlib


@pytest.fixture
def bench(tmp_path: Path) -> dict[str, Path]:
    """A VNN-COMP folder with one robust (eps 1e-3) and one non-robust (eps 0.5) property."""
    torch.manual_seed(4)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()
    root = tmp_path / "bench"
    (root / "onnx").mkdir(parents=True)
    (root / "vnnlib").mkdir()
    net = export(model, root / "onnx" / "net.onnx", torch.rand(1, 1, 4, 4))
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    label = int(model(x).argmax())
    robust = root / "vnnlib" / "robust.vnnlib"
    robust.write_text(robustness_vnnlib(x, label, 3, 1e-3))
    wide = root / "vnnlib" / "wide.vnnlib"
    wide.write_text(robustness_vnnlib(x, label, 3, 0.5))
    (root / "instances.csv").write_text("onnx/net.onnx,vnnlib/robust.vnnlib,20\n"
                                        "onnx/net.onnx,vnnlib/wide.vnnlib,20\n")
    return {"net": net, "robust": robust, "wide": wide, "csv": root / "instances.csv"}


def test_help_has_example() -> None:
    result = CliRunner().invoke(main, ["verify", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "--instances" in result.output


def test_unsat_and_sat_with_results_file(bench: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "robust.txt"
    result = runner.invoke(main, ["verify", str(bench["net"]), str(bench["robust"]),
                                  "--results", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.split()[0] == "unsat"
    assert out.read_text() == "unsat\n"

    out = tmp_path / "wide.txt"
    result = runner.invoke(main, ["verify", str(bench["net"]), str(bench["wide"]),
                                  "--timeout", "20", "--results", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.split()[0] == "sat"
    lines = out.read_text().splitlines()
    assert lines[0] == "sat" and lines[1].startswith("((X_0 ") and lines[-1].endswith("))")
    names = [line.strip(" ()").split()[0] for line in lines[1:]]
    assert names == [f"X_{i}" for i in range(16)] + ["Y_0", "Y_1", "Y_2"]


def test_json_counterexample_is_checked(bench: dict[str, Path]) -> None:
    import onnxruntime as ort

    from certify.vnnlib import read_vnnlib

    result = CliRunner().invoke(main, ["verify", str(bench["net"]), str(bench["wide"]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["result"] == "sat" and data["method"] == "attack"
    x = torch.tensor(data["counterexample"]["x"], dtype=torch.float64)
    prop = read_vnnlib(bench["wide"])
    assert prop.contains(x.unsqueeze(0)).item()
    session = ort.InferenceSession(str(bench["net"]), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x.float().reshape(1, 1, 4, 4).numpy()})[0]
    assert prop.is_unsafe(torch.from_numpy(y).double()).item()


def test_instances_csv_and_resume(bench: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "results.csv"
    runner = CliRunner()
    result = runner.invoke(main, ["verify", "--instances", str(bench["csv"]), "--results",
                                  str(out)])
    assert result.exit_code == 0, result.output
    assert "sat=1" in result.stdout and "unsat=1" in result.stdout
    assert len(result.stderr.splitlines()) == 2  # one progress line per instance
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["vnnlib"], r["result"]) for r in rows] == [("vnnlib/robust.vnnlib", "unsat"),
                                                         ("vnnlib/wide.vnnlib", "sat")]
    assert all(float(r["seconds"]) >= 0 for r in rows)
    before = out.read_text()
    again = runner.invoke(main, ["verify", "--instances", str(bench["csv"]), "--results",
                                 str(out)])
    assert again.exit_code == 0 and out.read_text() == before
    assert again.stderr == ""  # resumed: no instance ran again (each run reports on stderr)


def test_user_errors_are_one_line(bench: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1)\n")
    result = runner.invoke(main, ["verify", str(bench["net"]), str(bad)])
    assert result.exit_code == 1 and "bad.vnnlib:3" in result.output
    result = runner.invoke(main, ["verify", str(bench["net"])])
    assert result.exit_code == 2 and "SPEC" in result.output
    result = runner.invoke(main, ["verify", str(bench["net"]), str(bench["robust"]),
                                  "--method", "crwn"])
    assert result.exit_code == 1 and "did you mean 'crown'" in result.output
    result = runner.invoke(main, ["verify", str(bench["net"]), str(bench["robust"]),
                                  "--input-shape", "4,4"])
    assert result.exit_code == 1 and "C,H,W" in result.output
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"], name="r"),
         helper.make_node("Elu", ["a"], ["y"], name="elu_1")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    onnx.save(helper.make_model(graph), str(tmp_path / "elu.onnx"))
    result = runner.invoke(main, ["verify", str(tmp_path / "elu.onnx"), str(bench["robust"])])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "'elu_1' (op Elu" in result.output


def test_checkpoint_models_work_too(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from certify.checkpoint import load_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    x = torch.rand(1, *meta.input_shape, generator=torch.Generator().manual_seed(2))
    label = int(model(x).argmax())
    spec = tmp_path / "wide.vnnlib"
    spec.write_text(robustness_vnnlib(x, label, meta.num_classes, 0.5))
    result = CliRunner().invoke(main, ["verify", str(tiny_checkpoint), str(spec), "--json",
                                       "--timeout", "5"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["result"] in ("sat", "unknown")  # never unsat: the box is half the image range
    if data["result"] == "sat":
        cx = torch.tensor(data["counterexample"]["x"]).float().reshape(1, *meta.input_shape)
        out = model(cx)[0]
        assert any(out[j] >= out[label] for j in range(meta.num_classes) if j != label)
