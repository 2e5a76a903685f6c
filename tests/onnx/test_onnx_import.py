"""ONNX import: converted networks match onnxruntime; unsupported graphs fail by name."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_helpers import (
    assert_matches_ort,
    export,
    export_bytes,
    make_graph,
    run_ort,
    tensor,
)
from torch import nn

from certify.checkpoint import load_checkpoint, save_checkpoint
from certify.errors import CheckpointError, SpecError, UnsupportedLayerError
from certify.model_io import load_model
from certify.nets import Normalize
from certify.onnx_import import import_onnx

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(Normalize([0.4], [0.3]), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(12, 3)).eval()


def cnn(*, batch_norm: bool = True) -> nn.Sequential:
    torch.manual_seed(2)
    layers: list[nn.Module] = [Normalize([0.1, 0.2], [0.3, 0.4]), nn.Conv2d(2, 4, 3, padding=1)]
    if batch_norm:
        bn = nn.BatchNorm2d(4)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
        layers.append(bn)
    layers += [nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.ReLU(),
               nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5)]
    return nn.Sequential(*layers).eval()


class ViewFlatten(nn.Module):
    """``x.view(x.size(0), -1)``: exported as Shape/Gather/Unsqueeze/Concat/Reshape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


# ---- torch.onnx.export ----------------------------------------------------------------------


def test_exported_mlp_matches_onnxruntime(tmp_path: Path) -> None:
    model = mlp()
    path = export(model, tmp_path / "mlp.onnx", torch.rand(1, 1, 4, 4))
    net, meta = import_onnx(path, dataset="digits")
    x = torch.rand(9, 1, 4, 4)
    assert_matches_ort(net, path, x)
    torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-5)
    assert meta.arch == "onnx" and meta.dataset == "digits"
    assert meta.input_shape == (1, 4, 4) and meta.num_classes == 3
    assert meta.mean == pytest.approx((0.4,)) and meta.std == pytest.approx((0.3,))
    assert isinstance(net[0], Normalize) and list(dict(net.named_children()))[-1] == "out"


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_exported_cnn_matches_onnxruntime(tmp_path: Path, batch_norm: bool, dynamic: bool) -> None:
    model = cnn(batch_norm=batch_norm)
    path = tmp_path / "cnn.onnx"
    path.write_bytes(export_bytes(model, torch.rand(1, 2, 8, 8), dynamic=dynamic,
                                  keep_batchnorm=batch_norm))
    net, meta = import_onnx(path)
    x = torch.rand(1 if not dynamic else 6, 2, 8, 8)
    assert_matches_ort(net, path, x)
    assert meta.input_shape == (2, 8, 8) and meta.num_classes == 5 and meta.dataset == "unknown"
    assert meta.mean == pytest.approx((0.1, 0.2)) and meta.std == pytest.approx((0.3, 0.4))
    kinds = [type(layer) for layer in net]
    assert (nn.BatchNorm2d in kinds) == batch_norm and nn.AvgPool2d in kinds


def test_exported_view_flatten_pattern(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), ViewFlatten(), nn.Linear(12, 4)).eval()
    path = export(model, tmp_path / "view.onnx", torch.rand(1, 1, 4, 4))
    net, meta = import_onnx(path)
    assert_matches_ort(net, path, torch.rand(5, 1, 4, 4))
    assert meta.mean == (0.0,) and meta.std == (1.0,)


def test_gzip_file_and_load_model(tmp_path: Path) -> None:
    model = mlp()
    raw = export_bytes(model, torch.rand(1, 1, 4, 4))
    gz = tmp_path / "mlp.onnx.gz"
    gz.write_bytes(gzip.compress(raw))
    net, meta = load_model(gz, device="cpu", dataset="digits")
    x = torch.rand(4, 1, 4, 4)
    torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-5)
    assert meta.dataset == "digits"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channels=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       hidden=st.lists(st.integers(1, 6), min_size=0, max_size=2),
       seed=st.integers(0, 2**16), pool=st.booleans(), stride=st.integers(1, 2))
def test_random_exported_nets_match_onnxruntime(channels: list[int], hidden: list[int], seed: int,
                                                pool: bool, stride: int) -> None:
    torch.manual_seed(seed)
    c, size = 2, 6
    layers: list[nn.Module] = [Normalize([0.5, 0.4], [0.2, 0.3])]
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1), nn.ReLU()]
        c, size = out, (size - 1) // stride + 1
    if pool and size >= 2:
        layers.append(nn.AvgPool2d(2))
        size //= 2
    layers.append(nn.Flatten())
    features = c * size * size
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, 3))
    model = nn.Sequential(*layers).eval()
    raw = export_bytes(model, torch.rand(1, 2, 6, 6))
    net, meta = import_onnx(_proto(raw))
    x = torch.rand(4, 2, 6, 6)
    assert_matches_ort(net, raw, x)
    torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=1e-5)


def _proto(raw: bytes):  # type: ignore[no-untyped-def]
    import onnx

    return onnx.load_model_from_string(raw)


# ---- hand-built graphs ----------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_alpha_beta(trans_b: int) -> None:
    w = rand(5, 4)
    b = w if trans_b else w.T.copy()
    model = make_graph(
        [helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", transB=trans_b,
                          alpha=0.7, beta=-1.3)],
        [tensor("x", ["N", 4])], [tensor("y", ["N", 5])], {"B": b, "C": rand(5)})
    net, meta = import_onnx(model, input_shape=(1, 2, 2))
    assert_matches_ort(net, model, torch.rand(3, 1, 2, 2), onnx_shape=(4,))
    assert meta.input_shape == (1, 2, 2) and meta.num_classes == 5


def test_flat_input_without_shape_becomes_1x1xd() -> None:
    model = make_graph([helper.make_node("Gemm", ["x", "B"], ["y"], transB=1)],
                       [tensor("x", [1, 6])], [tensor("y", [1, 2])], {"B": rand(2, 6)})
    net, meta = import_onnx(model)
    assert meta.input_shape == (1, 1, 6)
    assert_matches_ort(net, model, torch.rand(1, 1, 1, 6), onnx_shape=(6,))


def test_matmul_add_relu_with_sub_div_normalization() -> None:
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"], name="sub"),
        helper.make_node("Div", ["a", "std"], ["b"], name="div"),
        helper.make_node("Constant", [], ["shape"], name="shape_const",
                         value=helper.make_tensor("s", TensorProto.INT64, [2], [-1, 12])),
        helper.make_node("Reshape", ["b", "shape"], ["c"], name="reshape"),
        helper.make_node("MatMul", ["c", "W1"], ["d"], name="mm1"),
        helper.make_node("Add", ["d", "b1"], ["e"], name="bias1"),
        helper.make_node("Relu", ["e"], ["f"], name="relu"),
        helper.make_node("MatMul", ["f", "W2"], ["g"], name="mm2"),
        helper.make_node("Add", ["b2", "g"], ["y"], name="bias2"),
    ]
    consts = {"mean": np.array([0.2, 0.5, 0.7]).reshape(1, 3, 1, 1),
              "std": np.array([0.3, 0.25, 0.2]).reshape(3, 1, 1),
              "W1": rand(12, 8), "b1": rand(8), "W2": rand(8, 4), "b2": rand(1, 4)}
    model = make_graph(nodes, [tensor("x", ["N", 3, 2, 2])], [tensor("y", ["N", 4])], consts)
    net, meta = import_onnx(model)
    assert_matches_ort(net, model, torch.rand(7, 3, 2, 2))
    assert meta.mean == pytest.approx((0.2, 0.5, 0.7))
    assert meta.std == pytest.approx((0.3, 0.25, 0.2))
    assert [type(m) for m in net] == [Normalize, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]


def test_scalar_normalization_of_a_flat_input_with_input_shape() -> None:
    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]), helper.make_node("Div", ["a", "s"], ["b"]),
             helper.make_node("Gemm", ["b", "W"], ["y"], transB=1)]
    model = make_graph(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 3])],
                       {"m": np.array(0.1307), "s": np.array(0.3081), "W": rand(3, 16)})
    net, meta = import_onnx(model, input_shape=(1, 4, 4))
    assert isinstance(net[0], Normalize) and isinstance(net[1], nn.Flatten)
    assert meta.mean == pytest.approx((0.1307,)) and meta.std == pytest.approx((0.3081,))
    assert_matches_ort(net, model, torch.rand(5, 1, 4, 4), onnx_shape=(16,))


def test_per_pixel_and_mid_network_affine_maps_are_folded_exactly() -> None:
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["a"]),       # per pixel: not a Normalize
        helper.make_node("Add", ["a", "shift"], ["b"]),
        helper.make_node("Flatten", ["b"], ["c"]),
        helper.make_node("Gemm", ["c", "W"], ["d"], transB=1),
        helper.make_node("Mul", ["d", "neg"], ["e"]),         # negative scale after a Linear
        helper.make_node("Relu", ["e"], ["f"]),
        helper.make_node("Sub", ["one", "f"], ["g"]),         # constant minus data
        helper.make_node("BatchNormalization", ["g", "bs", "bb", "bm", "bv"], ["h"], epsilon=1e-3),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    consts = {"scale": rand(1, 2, 2) + 3, "shift": rand(1, 2, 2), "W": rand(5, 4),
              "neg": -np.abs(rand(5)), "one": np.array(1.0), "bs": rand(5), "bb": rand(5),
              "bm": rand(5), "bv": np.abs(rand(5)) + 0.1}
    model = make_graph(nodes, [tensor("x", ["N", 1, 2, 2])], [tensor("y", ["N", 5])], consts)
    net, meta = import_onnx(model)
    assert_matches_ort(net, model, torch.rand(6, 1, 2, 2))
    assert meta.mean == (0.0,) and meta.std == (1.0,)


def test_channel_affine_after_relu_and_global_pool_and_same_padding() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "K"], ["a"], auto_pad="SAME_UPPER", name="conv"),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Mul", ["b", "s"], ["c"]),           # per channel, sign mixed
        helper.make_node("Add", ["c", "t"], ["d"]),
        helper.make_node("Conv", ["d", "K2", "B2"], ["e"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["e"], ["f"]),
        helper.make_node("Flatten", ["f"], ["y"]),
    ]
    consts = {"K": rand(3, 2, 3, 3), "s": np.array([1.5, -0.5, 2.0]).reshape(3, 1, 1),
              "t": rand(3, 1, 1), "K2": rand(4, 3, 3, 3), "B2": rand(4)}
    model = make_graph(nodes, [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 4])], consts)
    net, _ = import_onnx(model)
    assert_matches_ort(net, model, torch.rand(3, 2, 5, 5))
    assert any(isinstance(m, nn.BatchNorm2d) for m in net)  # the affine map between two convs


def test_flat_input_reshaped_to_an_image_inside_the_graph() -> None:
    """(N, 16) -> Reshape (N, 1, 4, 4) -> Conv: the model takes the image shape directly."""
    nodes = [helper.make_node("Constant", [], ["s"],
                              value=helper.make_tensor("s", TensorProto.INT64, [4], [-1, 1, 4, 4])),
             helper.make_node("Reshape", ["x", "s"], ["a"]),
             helper.make_node("Sub", ["a", "m"], ["b"]),
             helper.make_node("Conv", ["b", "K"], ["c"]),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Flatten", ["d"], ["e"]),
             helper.make_node("Gemm", ["e", "W"], ["y"], transB=1)]
    model = make_graph(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 3])],
                       {"m": np.array([0.5]), "K": rand(2, 1, 3, 3), "W": rand(3, 8)})
    net, meta = import_onnx(model)
    assert meta.input_shape == (1, 4, 4) and meta.mean == (0.5,) and meta.std == (1.0,)
    assert_matches_ort(net, model, torch.rand(3, 1, 4, 4), onnx_shape=(16,))


@pytest.mark.parametrize("include_pad", [0, 1])
def test_average_pool_with_padding(include_pad: int) -> None:
    nodes = [helper.make_node("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2], count_include_pad=include_pad),
             helper.make_node("Flatten", ["a"], ["b"]),
             helper.make_node("Gemm", ["b", "W"], ["y"], transB=1)]
    model = make_graph(nodes, [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 3])],
                       {"W": rand(3, 18)})
    net, _ = import_onnx(model)
    assert_matches_ort(net, model, torch.rand(4, 2, 5, 5))


def test_checkpoint_round_trip_is_refused_cleanly(tmp_path: Path) -> None:
    """An ONNX model's meta says arch 'onnx', which the zoo can not rebuild: a clear error."""
    net, meta = import_onnx(make_graph([helper.make_node("Gemm", ["x", "B"], ["y"], transB=1)],
                                       [tensor("x", [1, 4])], [tensor("y", [1, 2])],
                                       {"B": rand(2, 4)}))
    save_checkpoint(tmp_path / "m.pt", net, meta)
    with pytest.raises(CheckpointError, match="onnx"):
        load_checkpoint(tmp_path / "m.pt")


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_op_names_node_and_op() -> None:
    nodes = [helper.make_node("Conv", ["x", "K"], ["a"], name="c1"),
             helper.make_node("LpPool", ["a"], ["y"], kernel_shape=[2, 2], name="pool_7")]
    model = make_graph(nodes, [tensor("x", [1, 1, 4, 4])], [tensor("y", [1, 2, 1, 1])],
                       {"K": rand(2, 1, 3, 3)})
    with pytest.raises(UnsupportedLayerError, match=r"'pool_7' \(op LpPool"):
        import_onnx(model)


@pytest.mark.parametrize(("attrs", "name"), [
    ({"group": 2}, "group"), ({"dilations": [2, 2]}, "dilations"),
    ({"pads": [1, 1, 0, 0]}, "pads"),
])
def test_unsupported_conv_attribute_is_named(attrs: dict, name: str) -> None:
    nodes = [helper.make_node("Conv", ["x", "K"], ["y"], name="conv_a", **attrs)]
    model = make_graph(nodes, [tensor("x", [1, 2, 6, 6])], [tensor("y", ["N", "a", "b", "c"])],
                       {"K": rand(2, 2 // attrs.get("group", 1), 3, 3)})
    with pytest.raises(UnsupportedLayerError, match=rf"'conv_a' \(op Conv.*{name}"):
        import_onnx(model)


def test_skip_connection_imports_as_a_graph() -> None:
    """A residual Add imports as a graph of chains (tests/onnx/test_onnx_dag.py has more)."""
    nodes = [helper.make_node("Gemm", ["x", "W"], ["a"], transB=1, name="fc"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Add", ["a", "b"], ["y"], name="residual")]
    model = make_graph(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])], {"W": rand(3, 3)})
    net, meta = import_onnx(model)
    x = torch.randn(1, *meta.input_shape)
    want = run_ort(model, x.reshape(1, 3).numpy())
    np.testing.assert_allclose(net(x).detach().numpy(), want, atol=1e-5, rtol=1e-5)


def test_a_merge_of_other_ops_is_an_error() -> None:
    nodes = [helper.make_node("Gemm", ["x", "W"], ["a"], transB=1, name="fc"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Mul", ["a", "b"], ["y"], name="product")]
    model = make_graph(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])], {"W": rand(3, 3)})
    with pytest.raises(UnsupportedLayerError, match="'product' .*only Add and Concat"):
        import_onnx(model)


def test_two_inputs_are_refused() -> None:
    nodes = [helper.make_node("Add", ["x", "z"], ["y"])]
    model = make_graph(nodes, [tensor("x", [1, 3]), tensor("z", [1, 3])], [tensor("y", [1, 3])], {})
    with pytest.raises(UnsupportedLayerError, match="2 data inputs"):
        import_onnx(model)


def test_gemm_trans_a_is_named() -> None:
    model = make_graph([helper.make_node("Gemm", ["x", "B"], ["y"], transA=1, name="g")],
                       [tensor("x", [4, 1])], [tensor("y", [1, 2])], {"B": rand(4, 2)})
    with pytest.raises(UnsupportedLayerError, match="transA"):
        import_onnx(model)


def test_unknown_input_dims_need_input_shape() -> None:
    model = make_graph([helper.make_node("Relu", ["x"], ["y"])],
                       [tensor("x", ["N", "C", "H", "W"])], [tensor("y", ["N", "a", "b", "c"])], {})
    with pytest.raises(SpecError, match="--input-shape"):
        import_onnx(model)
    net, meta = import_onnx(model, input_shape=(1, 2, 3))
    assert meta.input_shape == (1, 2, 3) and meta.num_classes == 6


def test_input_shape_that_does_not_fit_is_an_error() -> None:
    model = make_graph([helper.make_node("Gemm", ["x", "B"], ["y"], transB=1)],
                       [tensor("x", [1, 6])], [tensor("y", [1, 2])], {"B": rand(2, 6)})
    with pytest.raises(SpecError, match="6 values"):
        import_onnx(model, input_shape=(1, 2, 2))


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all \x00\x01"])
def test_unreadable_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.onnx"):
        import_onnx(path)
    with pytest.raises(CheckpointError, match="not found"):
        import_onnx(tmp_path / "missing.onnx")


def test_ort_reference_helper_runs() -> None:
    """The test helper itself: a Relu graph is the identity on positives."""
    model = make_graph([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [1, 3])],
                       [tensor("y", [1, 3])], {})
    x = np.abs(rand(1, 3))
    np.testing.assert_array_equal(run_ort(model, x), x)
