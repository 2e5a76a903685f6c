"""Helpers for the ONNX tests: export torch models, build graphs by hand, run onnxruntime."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from certify.nets import Normalize  # noqa: E402

ENGINE_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize, nn.BatchNorm2d,
                 nn.AvgPool2d, nn.Identity)


def export_bytes(model: nn.Module, example: torch.Tensor, *, dynamic: bool = True,
                 keep_batchnorm: bool = False) -> bytes:
    """The classic (TorchScript) exporter's ONNX bytes for `model` in eval mode."""
    model = model.eval()
    f = io.BytesIO()
    kwargs: dict = {"dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}} if dynamic else {}
    if keep_batchnorm:
        kwargs |= {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), f, dynamo=False, input_names=["x"],
                          output_names=["y"], **kwargs)
    return f.getvalue()


def export(model: nn.Module, path: Path, example: torch.Tensor, **kwargs: bool) -> Path:
    path.write_bytes(export_bytes(model, example, **kwargs))
    return path


def run_ort(model: Path | bytes | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output for input `x` (float32)."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float32)})[0]


def make_graph(nodes: list, inputs: list, outputs: list, initializers: dict[str, np.ndarray],
               *, opset: int = 17) -> onnx.ModelProto:
    """A checked ModelProto from onnx.helper pieces; initializers are float32 unless int."""
    inits = [numpy_helper.from_array(v if v.dtype.kind in "iu" else v.astype(np.float32), name=k)
             for k, v in initializers.items()]
    graph = helper.make_graph(nodes, "hand", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def assert_matches_ort(net: nn.Module, model: Path | bytes | onnx.ModelProto,
                       x: torch.Tensor, onnx_shape: tuple[int, ...] | None = None) -> None:
    """The converted `net` and onnxruntime agree to 1e-5 on `x` (reshaped for ORT if asked)."""
    ours = net(x).detach().numpy()
    feed = x.numpy() if onnx_shape is None else x.reshape(x.shape[0], *onnx_shape).numpy()
    theirs = run_ort(model, feed).reshape(ours.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    for layer in net:
        assert isinstance(layer, ENGINE_LAYERS), f"{type(layer).__name__} is no engine layer"


def robustness_vnnlib(x: torch.Tensor, label: int, k: int, eps: float) -> str:
    """The VNN-COMP robustness property: some other class reaches `label` in the eps box."""
    from certify.vnnlib import robustness_vnnlib as text

    return text(x, label, k, eps)


def crown_proves_ibp_does_not(model: nn.Module, x: torch.Tensor, spec: torch.Tensor,
                              eps_grid: np.ndarray) -> float:
    """The first eps of `eps_grid` at which CROWN proves every row of `spec` positive over the
    box ``x ± eps`` (the robustness property's box, as :func:`robustness_vnnlib` writes it) and
    IBP does not, in float64; fails the test if there is none. `model` is left as it is."""
    import copy

    import pytest

    from certify.bounds import compute_bounds

    net = copy.deepcopy(model).double()
    for eps in eps_grid:
        lo, hi = x.double() - eps, x.double() + eps
        ibp = compute_bounds(net, lo, hi, "ibp", spec)
        crown = compute_bounds(net, lo, hi, "crown", spec)
        if (crown.lower > 0).all() and not (ibp.lower > 0).all():
            return float(eps)
    pytest.fail("no eps where crown proves and ibp does not")
