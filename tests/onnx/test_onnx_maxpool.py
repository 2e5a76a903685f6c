"""ONNX MaxPool: exported MaxPool CNNs import with the same logits (onnxruntime) and the same
bounds as the torch model; unsupported MaxPool attributes fail by node and attribute; and
``certify area`` runs on a small digits CNN with MaxPool given as an ONNX file."""

from __future__ import annotations

import copy
import csv
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import helper
from onnx_helpers import export, export_bytes, make_graph, run_ort, tensor
from torch import nn

from certify.bounds import compute_bounds, list_methods, margin_bounds
from certify.errors import UnsupportedLayerError
from certify.nets import Normalize
from certify.onnx_import import import_onnx

RNG = np.random.default_rng(0)
# bab (complete, ReLU splits only) has its own tests: tests/bounds/test_bab.py
NATIVE = list_methods(uses_solver=False, external=False, is_complete=False)


def pool_cnn(kernel: int | tuple, stride: int | tuple, padding: int | tuple,
             *, seed: int = 0) -> tuple[nn.Sequential, tuple[int, int, int]]:
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        norm=Normalize([0.2, 0.4], [0.3, 0.5]), conv1=nn.Conv2d(2, 3, 3, padding=1),
        relu1=nn.ReLU(), pool1=nn.MaxPool2d(kernel, stride, padding),
        conv2=nn.Conv2d(3, 4, 2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2, 1)))
    shape = (2, 8, 8)
    features = model(torch.zeros(1, *shape)).numel()
    model.add_module("flatten", nn.Flatten())
    model.add_module("out", nn.Linear(features, 5))
    return model.eval(), shape


POOLS = [(2, 2, 0), (3, 1, 1), ((2, 3), (1, 2), (1, 1)), (3, 2, 0)]


@pytest.mark.parametrize("kernel, stride, padding", POOLS)
def test_exported_maxpool_cnn_matches_ort_and_the_torch_bounds(kernel, stride, padding,
                                                               tmp_path: Path) -> None:
    model, shape = pool_cnn(kernel, stride, padding)
    path = export(model, tmp_path / "m.onnx", torch.rand(1, *shape))
    net, meta = import_onnx(path)
    assert meta.input_shape == shape and meta.num_classes == 5
    pools = [m for m in net if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [
        (m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2,
         m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2,
         m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2)
        for m in model if isinstance(m, nn.MaxPool2d)]
    x = torch.rand(6, *shape)
    with torch.no_grad():
        ours = net(x).numpy()
        torch_out = model(x).numpy()
    np.testing.assert_allclose(ours, run_ort(path, x.numpy()), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours, torch_out, atol=1e-5, rtol=1e-5)
    # the same bounds as the torch model (float64: the converted weights are the same floats)
    x_lo, x_hi = (x - 0.03).clamp(0, 1).double(), (x + 0.03).clamp(0, 1).double()
    spec = torch.tensor(RNG.standard_normal((6, 3, 5)))
    model64, net64 = copy.deepcopy(model).double(), copy.deepcopy(net).double()
    for method in NATIVE:
        a = compute_bounds(model64, x_lo, x_hi, method, spec)
        b = compute_bounds(net64, x_lo, x_hi, method, spec)
        torch.testing.assert_close(b.lower, a.lower, atol=1e-9, rtol=1e-9, msg=method)
        torch.testing.assert_close(b.upper, a.upper, atol=1e-9, rtol=1e-9, msg=method)
    y = torch.as_tensor(torch_out.argmax(1))
    a = margin_bounds(model, x, y, 0.01, "crown")
    b = margin_bounds(net, x, y, 0.01, "crown")
    torch.testing.assert_close(b.lower, a.lower, atol=1e-6, rtol=1e-6)


def test_maxpool_node_with_auto_pad_and_defaults() -> None:
    """A hand-made MaxPool (SAME_UPPER padding that is symmetric, default strides 1)."""
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], auto_pad="SAME_UPPER",
                              name="pool"),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    weight = RNG.standard_normal((3, 2 * 5 * 5)).astype(np.float32)
    model = make_graph(nodes, [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 3])],
                       {"W": weight})
    net, _ = import_onnx(model)
    pool = next(m for m in net if isinstance(m, nn.MaxPool2d))
    assert pool.kernel_size == (3, 3) and pool.stride == (1, 1) and pool.padding == (1, 1)
    x = torch.rand(4, 2, 5, 5)
    np.testing.assert_allclose(net(x).detach().numpy(), run_ort(model, x.numpy()), atol=1e-5)


@pytest.mark.parametrize(("attrs", "name"), [
    ({"ceil_mode": 1}, "ceil_mode"), ({"dilations": [2, 2]}, "dilations"),
    ({"pads": [1, 1, 0, 0]}, "pads"), ({"kernel_shape": [2, 2, 2]}, "kernel_shape"),
])
def test_unsupported_maxpool_attribute_is_named(attrs: dict, name: str) -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["y"], name="pool_a",
                              **({"kernel_shape": [2, 2]} | attrs))]
    model = make_graph(nodes, [tensor("x", [1, 2, 6, 6])], [tensor("y", ["N", "a", "b", "c"])],
                       {})
    with pytest.raises(UnsupportedLayerError, match=rf"'pool_a' \(op MaxPool.*{name}"):
        import_onnx(model)


def test_maxpool_indices_output_in_use_is_refused() -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], kernel_shape=[2, 2],
                              name="pool_b"),
             helper.make_node("Cast", ["idx"], ["c"], to=1),
             helper.make_node("Relu", ["p"], ["y"])]
    model = make_graph(nodes, [tensor("x", [1, 1, 4, 4])], [tensor("y", [1, 1, 2, 2])], {})
    with pytest.raises(UnsupportedLayerError, match=r"'pool_b' \(op MaxPool.*Indices"):
        import_onnx(model)


# --- certify area on an ONNX digits CNN with MaxPool ------------------------------------------


@pytest.fixture(scope="module")
def digits_pool_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits CNN with MaxPool, trained for a few epochs with plain torch, as ONNX."""
    from certify.data import load_dataset

    train = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.3052], [0.376]), nn.Conv2d(1, 4, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for xb, yb in train.batches(64, shuffle=True, generator=g):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    path = tmp_path_factory.mktemp("models") / "digits-pool.onnx"
    path.write_bytes(export_bytes(model.eval(), torch.rand(1, 1, 8, 8)))
    return path


def test_area_runs_on_an_onnx_cnn_with_maxpool(digits_pool_onnx: Path, tmp_path: Path) -> None:
    from certify.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["area", str(digits_pool_onnx), "--dataset", "digits",
                                       "--n", "3", "--method", "crown", "-o", str(out),
                                       "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "complete" and data["n_done"] == 3
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    certified = [float(r["certified_eps"]) for r in rows]
    for r, cert in zip(rows, certified, strict=True):
        assert 0 <= cert <= float(r["attack_eps"])
        if r["label"] != r["prediction"]:
            assert cert == 0.0
    assert max(certified) > 0  # a proof went through the MaxPool
    assert data["summary"]["crown"]["certification_area"] == pytest.approx(sum(certified) / 3)
