"""load_model: one loader for checkpoints and ONNX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper
from onnx_helpers import export, make_graph, run_ort, tensor
from torch import nn

from certify.errors import CheckpointError, SpecError
from certify.model_io import load_model
from certify.nets import Normalize


def _plain_net(tmp_path: Path) -> Path:
    """An ONNX net on flat 64-value inputs without normalization."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    return export(model, tmp_path / "flat.onnx", torch.rand(1, 64))


def test_checkpoint_through_load_model(tiny_checkpoint: Path, tiny_cnn: nn.Sequential) -> None:
    model, meta = load_model(tiny_checkpoint, device="cpu")
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model(x), tiny_cnn(x))
    assert meta.arch == "scn"
    same, _ = load_model(tiny_checkpoint, device="cpu", input_shape=(1, 8, 8), mean=[0.3],
                         std=[0.4])
    with pytest.raises(SpecError, match="--input-shape"):
        load_model(tiny_checkpoint, device="cpu", input_shape=(3, 8, 8))
    with pytest.raises(SpecError, match="normalizes with"):
        load_model(tiny_checkpoint, device="cpu", mean=[0.5], std=[0.5])


def test_flat_onnx_takes_the_dataset_shape_and_given_normalization(tmp_path: Path) -> None:
    path = _plain_net(tmp_path)
    model, meta = load_model(path, device="cpu", dataset="digits", mean=[0.5], std=[0.25])
    assert meta.input_shape == (1, 8, 8) and meta.dataset == "digits"
    assert meta.mean == (0.5,) and meta.std == (0.25,)
    assert isinstance(model[0], Normalize)
    x = torch.rand(4, 1, 8, 8)
    expected = run_ort(path, ((x - 0.5) / 0.25).reshape(4, 64).numpy())
    np.testing.assert_allclose(model(x).detach().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_explicit_input_shape_wins(tmp_path: Path) -> None:
    _, meta = load_model(_plain_net(tmp_path), device="cpu", input_shape=(4, 4, 4))
    assert meta.input_shape == (4, 4, 4)


def test_option_errors(tmp_path: Path) -> None:
    path = _plain_net(tmp_path)
    with pytest.raises(SpecError, match="both --mean and --std"):
        load_model(path, device="cpu", mean=[0.5])
    with pytest.raises(SpecError, match="channels"):
        load_model(path, device="cpu", input_shape=(4, 4, 4), mean=[0.5, 0.5], std=[1, 1])
    with pytest.raises(CheckpointError, match="unknown model file type"):
        load_model(tmp_path / "net.h5", device="cpu")


def test_file_normalization_conflicts_with_other_mean(tmp_path: Path) -> None:
    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]), helper.make_node("Div", ["a", "s"], ["b"]),
             helper.make_node("Flatten", ["b"], ["c"]),
             helper.make_node("Gemm", ["c", "W"], ["y"], transB=1)]
    model = make_graph(nodes, [tensor("x", [1, 1, 2, 2])], [tensor("y", [1, 3])],
                       {"m": np.array(0.5), "s": np.array(0.25),
                        "W": np.ones((3, 4), dtype=np.float32)})
    path = tmp_path / "norm.onnx"
    path.write_bytes(model.SerializeToString())
    _, meta = load_model(path, device="cpu", mean=[0.5], std=[0.25])  # agrees: fine
    assert meta.mean == (0.5,)
    with pytest.raises(SpecError, match="already normalizes"):
        load_model(path, device="cpu", mean=[0.1], std=[0.25])
