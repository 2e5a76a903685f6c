"""ONNX networks with LeakyRelu, Sigmoid, Tanh and global average pooling: imported, compared
with onnxruntime, bounded soundly, and certified end to end by ``certify area``."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper
from onnx_helpers import export, export_bytes, make_graph, run_ort, tensor
from torch import nn

from certify.bounds import compute_bounds, list_methods
from certify.cli import main
from certify.errors import UnsupportedLayerError
from certify.nets import Normalize
from certify.onnx_import import import_onnx
from tests.digits_models import train_digits

F64 = torch.float64


def smooth_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(Normalize([0.4, 0.5], [0.3, 0.2]), nn.Conv2d(2, 4, 3, padding=1),
                         nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.Sigmoid(),
                         nn.Linear(6, 3)).eval()


def smooth_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.Sigmoid(), nn.Linear(10, 8),
                         nn.LeakyReLU(0.05), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).eval()


@pytest.mark.parametrize("build, shape", [(smooth_cnn, (2, 6, 6)), (smooth_mlp, (1, 4, 4))])
def test_exported_networks_import_and_match_onnxruntime(build, shape):  # type: ignore[no-untyped-def]
    model = build(0)
    example = torch.rand(5, *shape)
    data = export_bytes(model, example[:1])
    net, meta = import_onnx(onnx.load_from_string(data))
    kinds = {type(m) for m in net}
    assert {nn.Sigmoid, nn.Tanh, nn.LeakyReLU} <= kinds
    with torch.no_grad():
        ours = net(example).numpy()
    np.testing.assert_allclose(ours, run_ort(data, example.numpy()), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours, model(example).detach().numpy(), atol=1e-5, rtol=1e-5)
    assert meta.num_classes == 3


# branch and bound (complete, budgeted) has its own tests: tests/bounds/test_bab.py
@pytest.mark.parametrize("method", list_methods(uses_solver=False, external=False,
                                                is_complete=False))
def test_imported_network_bounds_contain_onnxruntime_outputs(method, tmp_path):  # type: ignore[no-untyped-def]
    """Bounds of the imported model (float64) contain what onnxruntime computes at sampled
    points of the box (up to onnxruntime's float32 rounding)."""
    path = export(smooth_cnn(1), tmp_path / "net.onnx", torch.rand(1, 2, 6, 6))
    net, _ = import_onnx(path)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 2, 6, 6, generator=gen, dtype=F64)
    lo, hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    bounds = compute_bounds(net.double(), lo, hi, method)
    points = lo + torch.rand(64, *x.shape, generator=gen, dtype=F64) * (hi - lo)
    theirs = torch.from_numpy(run_ort(path, points.reshape(-1, 2, 6, 6).float().numpy()))
    theirs = theirs.double().reshape(64, 2, 3)
    assert (theirs >= bounds.lower - 1e-5).all() and (theirs <= bounds.upper + 1e-5).all()


def test_flatten_before_an_activation_and_global_pooling(tmp_path):  # type: ignore[no-untyped-def]
    """A hand-made graph: GlobalAveragePool, a Flatten in the middle, then Sigmoid/LeakyRelu."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["a"], ["b"]),
             helper.make_node("GlobalAveragePool", ["b"], ["c"]),
             helper.make_node("Flatten", ["c"], ["d"], axis=1),
             helper.make_node("Sigmoid", ["d"], ["e"]),
             helper.make_node("Gemm", ["e", "w2", "b2"], ["f"], transB=1),
             helper.make_node("LeakyRelu", ["f"], ["g"], alpha=0.3),
             helper.make_node("Gemm", ["g", "w3", "b3"], ["y"], transB=1)]
    inits = {"w1": rng.normal(size=(3, 1, 3, 3)), "b1": rng.normal(size=3),
             "w2": rng.normal(size=(5, 3)), "b2": rng.normal(size=5),
             "w3": rng.normal(size=(2, 5)), "b3": rng.normal(size=2)}
    model = make_graph(nodes, [tensor("x", [None, 1, 5, 5])], [tensor("y", [None, 2])], inits)
    net, _ = import_onnx(model)
    assert [type(m).__name__ for m in net][1:] == ["Tanh", "AvgPool2d", "Flatten", "Sigmoid",
                                                   "Linear", "LeakyReLU", "Linear"]
    assert abs(net[6].negative_slope - 0.3) < 1e-7
    x = torch.rand(4, 1, 5, 5)
    np.testing.assert_allclose(net(x).detach().numpy(), run_ort(model, x.numpy()), atol=1e-5)
    b = compute_bounds(net.double(), x.double() - 0.1, x.double() + 0.1, "crown")
    assert torch.isfinite(b.lower).all()


def test_leaky_relu_slope_outside_zero_one_names_the_node():  # type: ignore[no-untyped-def]
    nodes = [helper.make_node("Flatten", ["x"], ["a"]),
             helper.make_node("LeakyRelu", ["a"], ["y"], alpha=-0.5, name="steep_1")]
    model = make_graph(nodes, [tensor("x", [None, 1, 2, 2])], [tensor("y", [None, 4])], {})
    with pytest.raises(UnsupportedLayerError, match=r"'steep_1' \(op LeakyRelu.*alpha=-0.5") as e:
        import_onnx(model)
    assert "\n" not in str(e.value)


def test_unsupported_ops_still_name_the_node():  # type: ignore[no-untyped-def]
    nodes = [helper.make_node("Flatten", ["x"], ["a"]),
             helper.make_node("Softplus", ["a"], ["y"], name="soft_9")]
    model = make_graph(nodes, [tensor("x", [None, 1, 2, 2])], [tensor("y", [None, 4])], {})
    with pytest.raises(UnsupportedLayerError, match=r"'soft_9' \(op Softplus") as e:
        import_onnx(model)
    assert "\n" not in str(e.value)


# --- certify area on a digits model with the new activations -----------------------------------


def train_smooth_digits(epochs: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.3052], [0.376]), nn.Flatten(), nn.Linear(64, 24),
                          nn.Tanh(), nn.Linear(24, 16), nn.LeakyReLU(0.1), nn.Linear(16, 12),
                          nn.Sigmoid(), nn.Linear(12, 10))
    train_digits(model, epochs, seed=0)
    return model


def test_area_cli_certifies_a_smooth_digits_model(tmp_path):  # type: ignore[no-untyped-def]
    path = export(train_smooth_digits(), tmp_path / "smooth.onnx", torch.rand(1, 1, 8, 8))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["area", str(path), "--dataset", "digits", "--n", "3",
                                       "--method", "crown", "--method", "alpha-crown",
                                       "-o", str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "complete" and data["n_done"] == 3
    assert data["summary"]["crown"]["certification_area"] > 0
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for r in rows:
        assert float(r["certified_eps"]) <= float(r["attack_eps"])
    # exact radii need a piecewise-linear network: one line, not a wrong number
    result = CliRunner().invoke(main, ["area", str(path), "--dataset", "digits", "--n", "3",
                                       "--exact", "-o", str(tmp_path / "exact"), "--quiet"])
    assert result.exit_code == 1 and "not piecewise linear" in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_verify_cli_decides_a_smooth_onnx_network(tmp_path):  # type: ignore[no-untyped-def]
    """``certify verify`` on an ONNX network with Sigmoid, LeakyRelu and Tanh: a tiny ball is
    proven (the automatic MILP stage is skipped, it would claim exactness), and a ball where
    sampling finds another class is never called ``unsat``."""
    from onnx_helpers import robustness_vnnlib

    model = smooth_mlp(0)
    with torch.no_grad():  # steeper: the class changes inside the unit box
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(4)
    net = export(model, tmp_path / "net.onnx", torch.rand(1, 1, 4, 4))
    x = torch.full((1, 1, 4, 4), 0.5)
    label = int(model(x).argmax())
    gen = torch.Generator().manual_seed(0)
    points = torch.where(torch.rand(4096, 1, 4, 4, generator=gen) < 0.5, 0.0, 1.0)
    with torch.no_grad():
        assert (model(points).argmax(1) != label).any()  # a counterexample in the unit box
    answers = []
    for name, eps in (("tiny", 1e-4), ("wide", 0.5)):
        prop = tmp_path / f"{name}.vnnlib"
        prop.write_text(robustness_vnnlib(x, label, 3, eps))
        result = CliRunner().invoke(main, ["verify", str(net), str(prop), "--timeout", "30"])
        assert result.exit_code == 0, result.output
        answers.append(result.output.split()[0])
    assert answers[0] == "unsat"
    assert answers[1] == "sat"
