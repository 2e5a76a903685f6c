"""ONNX graphs with branches: residual Add and Concat of computed tensors, imported as a graph
of chains; the same logits as onnxruntime, sound bounds, one-line errors otherwise."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from certify.bounds import compute_bounds, to_network
from certify.errors import UnsupportedLayerError
from certify.nets.layers import Normalize

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _export(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), buf, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return buf.getvalue()


class InputResidual(nn.Module):
    """The input itself is the shortcut (the input feeds a merge): ``x + conv(relu(conv(x)))``,
    then a channel concat with another branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.c = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.out = nn.Linear(5 * 5 * 5, 4)

    def forward(self, x: Tensor) -> Tensor:
        r = torch.relu(x + self.b(torch.relu(self.a(x))))
        y = torch.cat([r, torch.relu(self.bn(self.c(r)))], dim=1)
        return self.out(torch.flatten(y, 1))


class NormalizedResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalize([0.4], [0.3])
        self.fc = nn.Linear(16, 8)
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(torch.flatten(self.norm(x), 1)))
        r = h + self.fc2(torch.relu(self.fc1(h)))
        return self.out(torch.cat([torch.relu(r), h], 1))


def _random(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.5
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.2
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    return model.eval()


@pytest.mark.parametrize(("make", "shape"), [(InputResidual, (2, 5, 5)),
                                             (NormalizedResidual, (1, 4, 4))])
def test_branches_import_with_the_same_logits_and_sound_bounds(make, shape):  # type: ignore[no-untyped-def]
    from certify.onnx_import import import_onnx

    model = _random(make(), 3)
    data = _export(model, shape)
    imported, meta = import_onnx(onnx.load_from_string(data))
    assert meta.input_shape == shape
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ort.InferenceSession(data).run(None, {"x": x.numpy()})[0]
        got = imported(x).numpy()
    assert np.abs(got - want).max() < 1e-5
    net = to_network(imported, shape)
    assert not net.is_chain
    lo, hi = x - 0.02, x + 0.02
    bounds = compute_bounds(imported, lo, hi, "crown")
    pts = lo + (hi - lo) * torch.rand(200, *x.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        values = imported(pts.reshape(-1, *shape)).reshape(200, 6, -1)
    assert (values >= bounds.lower - 1e-5).all() and (values <= bounds.upper + 1e-5).all()


class _Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) * self.b(x)


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(("make", "words"), [(_Product, ["op Mul", "only Add and Concat"]),
                                             (_Broadcast, ["op Add", "same shape"])])
def test_unsupported_merges_get_one_line_naming_the_node(make, words):  # type: ignore[no-untyped-def]
    from certify.onnx_import import import_onnx

    data = _export(_random(make(), 0), (4,))
    with pytest.raises(UnsupportedLayerError) as info:
        import_onnx(onnx.load_from_string(data), input_shape=(1, 1, 4))
    message = str(info.value)
    assert "\n" not in message and "ONNX node" in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("eps", [0.002, 0.5])
def test_verify_decides_a_property_of_a_residual_onnx_network(eps, tmp_path):  # type: ignore[no-untyped-def]
    """The cascade on an imported residual graph: a tiny box is proven (unsat) by the bounds,
    a huge one gets a validated counterexample (sat)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from onnx_helpers import robustness_vnnlib

    from certify.onnx_import import import_onnx
    from certify.verify import verify
    from certify.vnnlib import read_vnnlib

    model = _random(NormalizedResidual(), 5)
    imported, meta = import_onnx(onnx.load_from_string(_export(model, (1, 4, 4))))
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    label = int(imported(x).argmax())
    spec = tmp_path / "p.vnnlib"
    spec.write_text(robustness_vnnlib(x, label, 3, eps))
    verdict = verify(imported, read_vnnlib(spec), timeout=30, input_shape=meta.input_shape)
    assert verdict.result == ("unsat" if eps < 0.01 else "sat"), verdict
    if eps < 0.01:
        assert verdict.method in ("ibp", "crown", "alpha-crown")
