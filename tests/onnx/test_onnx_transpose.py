"""ONNX Transpose and Reshape: Keras/TensorFlow-style NHWC networks and permutations anywhere,
compared with onnxruntime; every importer error names the node and its op."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_helpers import ENGINE_LAYERS, make_graph, run_ort, tensor
from torch import nn

from certify.bounds.network import to_network
from certify.errors import UnsupportedLayerError
from certify.nets import Normalize
from certify.nets.layers import Permute, Reshape
from certify.onnx_import import import_onnx

LAYERS = (*ENGINE_LAYERS, Permute, Reshape)
NHWC_TO_NCHW = [0, 3, 1, 2]
NCHW_TO_NHWC = [0, 2, 3, 1]


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def matches_ort(net: nn.Module, model: object, x: np.ndarray, *, onnx_shape: tuple | None = None
                ) -> None:
    """`net` on `x` equals onnxruntime on `x` (re-shaped to `onnx_shape`); engine layers only,
    and the bound engine takes the network."""
    ours = net(torch.from_numpy(x)).detach().numpy()
    feed = x if onnx_shape is None else x.reshape(x.shape[0], *onnx_shape)
    theirs = run_ort(model, feed).reshape(ours.shape)  # type: ignore[arg-type]
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    for layer in net:
        assert isinstance(layer, LAYERS), f"{type(layer).__name__} is no engine layer"
    to_network(net, x.shape[1:])


def keras_cnn(rng: np.random.Generator, *, normalize: bool, reshape: bool, batch: object
              ) -> object:
    """What tf2onnx writes for a Keras CNN: NHWC input, Rescaling and per-channel
    normalization in NHWC, Transpose to NCHW, Conv/Relu, Transpose back, Reshape/Flatten,
    MatMul + Add (Dense)."""
    nodes = []
    current = "x"
    if normalize:
        nodes += [helper.make_node("Mul", ["x", "rescale"], ["r"], name="rescaling"),
                  helper.make_node("Sub", ["r", "mean"], ["s"], name="norm_sub"),
                  helper.make_node("Div", ["s", "std"], ["t"], name="norm_div")]
        current = "t"
    nodes += [helper.make_node("Transpose", [current], ["a"], perm=NHWC_TO_NCHW,
                               name="conv2d__6"),
              helper.make_node("Conv", ["a", "K1", "B1"], ["b"], pads=[1, 1, 1, 1],
                               name="conv2d"),
              helper.make_node("Relu", ["b"], ["c"], name="conv2d/Relu"),
              helper.make_node("Conv", ["c", "K2", "B2"], ["d"], strides=[2, 2],
                               name="conv2d_1"),
              helper.make_node("Relu", ["d"], ["e"], name="conv2d_1/Relu"),
              helper.make_node("Transpose", ["e"], ["f"], perm=NCHW_TO_NHWC,
                               name="conv2d_1__9")]
    if reshape:
        nodes += [helper.make_node("Constant", [], ["shape"], name="flatten/Const",
                                   value=helper.make_tensor("v", TensorProto.INT64, [2],
                                                            [-1, 2 * 2 * 3])),
                  helper.make_node("Reshape", ["f", "shape"], ["g"], name="flatten/Reshape")]
    else:
        nodes += [helper.make_node("Flatten", ["f"], ["g"], name="flatten")]
    nodes += [helper.make_node("MatMul", ["g", "W1"], ["h"], name="dense/MatMul"),
              helper.make_node("Add", ["h", "c1"], ["i"], name="dense/BiasAdd"),
              helper.make_node("Relu", ["i"], ["j"], name="dense/Relu"),
              helper.make_node("MatMul", ["j", "W2"], ["k"], name="dense_1/MatMul"),
              helper.make_node("Add", ["k", "c2"], ["y"], name="dense_1/BiasAdd")]
    consts = {"K1": rand(rng, 4, 3, 3, 3), "B1": rand(rng, 4), "K2": rand(rng, 3, 4, 2, 2),
              "B2": rand(rng, 3), "W1": rand(rng, 12, 7), "c1": rand(rng, 7),
              "W2": rand(rng, 7, 4), "c2": rand(rng, 4)}
    if normalize:
        consts |= {"rescale": np.array(1 / 255, dtype=np.float32),
                   "mean": np.array([0.4, 0.5, 0.6], dtype=np.float32),
                   "std": np.array([0.2, 0.3, 0.25], dtype=np.float32)}
    return make_graph(nodes, [tensor("x", [batch, 5, 4, 3])], [tensor("y", [batch, 4])],
                      consts)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reshape", [False, True])
@pytest.mark.parametrize("batch", ["unk__6", 1])
def test_keras_style_cnn_matches_onnxruntime(normalize: bool, reshape: bool, batch: object
                                             ) -> None:
    rng = np.random.default_rng(0)
    model = keras_cnn(rng, normalize=normalize, reshape=reshape, batch=batch)
    net, meta = import_onnx(model)
    assert meta.input_shape == (5, 4, 3)  # the file's NHWC input: X_i keep their meaning
    assert isinstance(net[0], Permute) and net[0].dims == (2, 0, 1)
    assert meta.num_classes == 4
    n = 1 if batch == 1 else 6
    x = rng.random((n, 5, 4, 3)).astype(np.float32) * (255 if normalize else 1)
    matches_ort(net, model, x)


def test_input_transpose_of_a_flat_file_input_given_an_image_shape() -> None:
    """(N, 18) -> Reshape (N, 3, 3, 2) -> Transpose -> Conv: with --input-shape 2,3,3 the model
    takes (2, 3, 3) in the file's order (a Reshape, then the Permute); without, (3, 3, 2)."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["a"], name="unflatten"),
             helper.make_node("Transpose", ["a"], ["b"], perm=NHWC_TO_NCHW, name="nchw"),
             helper.make_node("Conv", ["b", "K"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Flatten", ["d"], ["e"]),
             helper.make_node("Gemm", ["e", "W"], ["y"], transB=1)]
    model = make_graph(nodes, [tensor("x", ["N", 18])], [tensor("y", ["N", 3])],
                       {"s": np.array([-1, 3, 3, 2]), "K": rand(rng, 4, 2, 2, 2),
                        "W": rand(rng, 3, 16)})
    x = rng.random((4, 18)).astype(np.float32)
    net, meta = import_onnx(model, input_shape=(2, 3, 3))
    assert meta.input_shape == (2, 3, 3)
    assert isinstance(net[0], Reshape) and isinstance(net[1], Permute)
    matches_ort(net, model, x.reshape(4, 2, 3, 3), onnx_shape=(18,))
    net, meta = import_onnx(model)
    assert meta.input_shape == (3, 3, 2) and isinstance(net[0], Permute)
    matches_ort(net, model, x.reshape(4, 3, 3, 2), onnx_shape=(18,))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), first=st.permutations([0, 1, 2]),
       middle=st.permutations([0, 1, 2]), sizes=st.tuples(*[st.integers(2, 4)] * 3),
       flat_perm=st.booleans())
def test_random_transposes_match_onnxruntime(seed: int, first: list[int], middle: list[int],
                                             sizes: tuple[int, int, int], flat_perm: bool
                                             ) -> None:
    """A Transpose of the input, one between two convolutions (with an elementwise Mul before
    it that moves through it), and a Transpose before the Flatten: any permutations."""
    rng = np.random.default_rng(seed)
    in_shape = sizes
    perm1 = [0, *(p + 1 for p in first)]
    after1 = tuple(in_shape[p] for p in first)  # (C, H, W) seen by the first conv
    perm2 = [0, *(p + 1 for p in middle)]
    nodes = [helper.make_node("Transpose", ["x"], ["a"], perm=perm1, name="t_in"),
             helper.make_node("Conv", ["a", "K1"], ["b"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["b"], ["c"], name="relu1"),
             helper.make_node("Mul", ["c", "s"], ["d"], name="scale"),
             helper.make_node("Transpose", ["d"], ["e"], perm=perm2, name="t_mid")]
    mid = tuple((3, after1[1], after1[2])[p] for p in middle)
    nodes += [helper.make_node("Conv", ["e", "K2"], ["f"], pads=[1, 1, 1, 1], name="conv2"),
              helper.make_node("Relu", ["f"], ["g"], name="relu2")]
    last = "g"
    if flat_perm:
        nodes.append(helper.make_node("Transpose", ["g"], ["h"], perm=NCHW_TO_NHWC,
                                      name="t_out"))
        last = "h"
    features = 2 * (mid[1] + 2 - 2) * (mid[2] + 2 - 2)
    nodes += [helper.make_node("Flatten", [last], ["i"], name="flatten"),
              helper.make_node("Gemm", ["i", "W"], ["y"], transB=1, name="fc")]
    consts = {"K1": rand(rng, 3, after1[0], 3, 3), "s": rand(rng, 3, 1, 1),
              "K2": rand(rng, 2, mid[0], 3, 3), "W": rand(rng, 3, features)}
    model = make_graph(nodes, [tensor("x", ["N", *in_shape])], [tensor("y", ["N", 3])], consts)
    net, meta = import_onnx(model)
    assert meta.input_shape == in_shape
    x = rng.random((3, *in_shape)).astype(np.float32)
    matches_ort(net, model, x)
    permutes = sum(isinstance(m, Permute) for m in net)
    expected = sum(p != [0, 1, 2, 3] for p in (perm1, perm2)) + flat_perm
    assert permutes == expected


def test_transposes_that_cancel_are_dropped_and_maps_between_them_fold() -> None:
    """Conv -> Transpose to NHWC -> per-channel Mul/Add in NHWC -> Transpose back -> Conv: the
    two Transposes cancel and the per-channel map folds into the first Conv."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "K1", "B1"], ["a"], name="conv1"),
             helper.make_node("Transpose", ["a"], ["b"], perm=NCHW_TO_NHWC, name="to_nhwc"),
             helper.make_node("Mul", ["b", "s"], ["c"], name="scale"),
             helper.make_node("Add", ["c", "t"], ["d"], name="shift"),
             helper.make_node("Transpose", ["d"], ["e"], perm=NHWC_TO_NCHW, name="to_nchw"),
             helper.make_node("Relu", ["e"], ["f"], name="relu"),
             helper.make_node("Transpose", ["f"], ["g"], perm=[0, 1, 3, 2], name="swap_hw"),
             helper.make_node("Transpose", ["g"], ["h"], perm=[0, 2, 1, 3], name="swap_ch"),
             helper.make_node("Transpose", ["h"], ["i"], perm=[0, 3, 1, 2], name="rotate"),
             helper.make_node("Flatten", ["i"], ["j"]),
             helper.make_node("Gemm", ["j", "W"], ["y"], transB=1)]
    consts = {"K1": rand(rng, 3, 2, 2, 2), "B1": rand(rng, 3),
              "s": rand(rng, 3), "t": rand(rng, 3), "W": rand(rng, 2, 3 * 3 * 4)}
    model = make_graph(nodes, [tensor("x", ["N", 2, 4, 5])], [tensor("y", ["N", 2])], consts)
    net, _ = import_onnx(model)
    assert [type(m) for m in net] == [nn.Conv2d, nn.ReLU, Permute, nn.Flatten, nn.Linear]
    matches_ort(net, model, rng.random((5, 2, 4, 5)).astype(np.float32))


def test_three_transposes_that_compose_to_identity_leave_no_layer() -> None:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "K"], ["a"], name="conv"),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["b"], ["c"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["c"], ["d"], perm=[0, 2, 3, 1]),
             helper.make_node("Relu", ["d"], ["e"]),
             helper.make_node("Flatten", ["e"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    # [0,2,3,1] then [0,2,1,3] then [0,2,3,1]: C,H,W -> H,W,C -> W,H,C -> H,C,W
    model = make_graph(nodes, [tensor("x", ["N", 1, 3, 4])], [tensor("y", ["N", 2])],
                       {"K": rand(rng, 2, 1, 2, 2), "W": rand(rng, 2, 12)})
    net, _ = import_onnx(model)
    assert sum(isinstance(m, Permute) for m in net) == 1
    matches_ort(net, model, rng.random((3, 1, 3, 4)).astype(np.float32))
    nodes[3] = helper.make_node("Transpose", ["c"], ["d"], perm=[0, 3, 2, 1])  # now identity
    model = make_graph(nodes, [tensor("x", ["N", 1, 3, 4])], [tensor("y", ["N", 2])],
                       {"K": rand(rng, 2, 1, 2, 2), "W": rand(rng, 2, 12)})
    net, _ = import_onnx(model)
    assert not any(isinstance(m, Permute) for m in net)
    matches_ort(net, model, rng.random((3, 1, 3, 4)).astype(np.float32))


def test_reshape_to_an_image_inside_the_network() -> None:
    """Gemm -> Reshape (N, 2, 3, 3) -> Conv: a Reshape layer (no longer flatten-only)."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["a"], transB=1, name="fc1"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Mul", ["b", "s"], ["c"], name="scale"),  # after the Relu
             helper.make_node("Reshape", ["c", "shape"], ["d"], name="to_image"),
             helper.make_node("Conv", ["d", "K"], ["e"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("Flatten", ["f"], ["g"]),
             helper.make_node("Gemm", ["g", "W2"], ["y"], transB=1)]
    consts = {"W1": rand(rng, 18, 5), "b1": rand(rng, 18), "s": rand(rng, 18),
              "shape": np.array([0, 2, 3, 3]), "K": rand(rng, 2, 2, 3, 3),
              "W2": rand(rng, 3, 18)}
    model = make_graph(nodes, [tensor("x", ["N", 5])], [tensor("y", ["N", 3])], consts)
    net, _ = import_onnx(model)
    assert any(isinstance(m, Reshape) and m.shape == (2, 3, 3) for m in net)
    matches_ort(net, model, rng.random((4, 1, 1, 5)).astype(np.float32), onnx_shape=(5,))


def test_transpose_of_a_constant_weight_is_evaluated() -> None:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0], name="weight_t"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = make_graph(nodes, [tensor("x", ["N", 6])], [tensor("y", ["N", 4])],
                       {"Wt": rand(rng, 4, 6)})
    net, _ = import_onnx(model)
    assert not any(isinstance(m, Permute) for m in net)
    matches_ort(net, model, rng.random((3, 1, 1, 6)).astype(np.float32), onnx_shape=(6,))


@pytest.mark.parametrize("dynamic", [False, True])
def test_exported_permute_and_reshape_modules_round_trip(tmp_path: Path, dynamic: bool) -> None:
    """certify's own Permute and Reshape layers, exported by torch.onnx (Transpose, and the
    Shape/Gather/Concat/Reshape pattern) and imported again: the same function."""
    from onnx_helpers import export

    torch.manual_seed(8)
    model = nn.Sequential(Permute((2, 0, 1)), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          Permute((1, 2, 0)), Reshape((10, 8)), nn.ReLU(), nn.Flatten(),
                          nn.Linear(80, 5)).eval()
    path = export(model, tmp_path / "permuted.onnx", torch.rand(1, 5, 4, 3), dynamic=dynamic)
    net, meta = import_onnx(path)
    assert meta.input_shape == (5, 4, 3)
    x = np.random.default_rng(8).random((3 if dynamic else 1, 5, 4, 3)).astype(np.float32)
    matches_ort(net, path.read_bytes(), x)
    torch.testing.assert_close(net(torch.from_numpy(x)), model(torch.from_numpy(x)),
                               rtol=1e-5, atol=1e-5)


# ---- errors name the node and its op --------------------------------------------------------


def _one_transpose(perm: list[int], name: str) -> object:
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Transpose", ["a"], ["y"], perm=perm, name=name)]
    return make_graph(nodes, [tensor("x", [2, 3, 4, 5])], [tensor("y", ["a", "b", "c", "d"])],
                      {})


def test_transpose_moving_the_batch_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedLayerError,
                       match=r"ONNX node 'batch_swap' \(op Transpose, node 1\).*batch"):
        import_onnx(_one_transpose([1, 0, 2, 3], "batch_swap"))


def test_unnamed_node_is_named_by_index_and_op() -> None:
    with pytest.raises(UnsupportedLayerError,
                       match=r"ONNX node '<unnamed>' \(op Transpose, node 1\).*batch"):
        import_onnx(_one_transpose([3, 1, 2, 0], ""))


def test_perm_that_is_not_a_permutation_of_the_data_is_refused() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1], name="short_perm")]
    model = make_graph(nodes, [tensor("x", ["N", 2, 3, 4])], [tensor("y", ["N", 3, 2, 4])], {})
    with pytest.raises(UnsupportedLayerError, match=r"'short_perm' \(op Transpose.*perm"):
        import_onnx(model)


def test_malformed_constant_node_is_named() -> None:
    """A Concat of constants without its required axis: one line naming the node."""
    from onnx import numpy_helper

    nodes = [helper.make_node("Concat", ["p", "q"], ["shape"], name="bad_concat"),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [numpy_helper.from_array(np.array([-1]), name="p"),
             numpy_helper.from_array(np.array([6]), name="q")]
    graph = helper.make_graph(nodes, "malformed", [tensor("x", ["N", 2, 3])],
                              [tensor("y", ["N", 6])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedLayerError,
                       match=r"'bad_concat' \(op Concat, node 0\) is malformed"):
        import_onnx(model)


def test_elementwise_map_that_cannot_be_expressed_names_its_nodes() -> None:
    """A per-pixel Mul on a feature map before a padded conv: the error names the Mul node."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "K1"], ["a"], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Transpose", ["b"], ["c"], perm=[0, 1, 3, 2], name="swap"),
             helper.make_node("Mul", ["c", "s"], ["d"], name="per_pixel"),
             helper.make_node("Conv", ["d", "K2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    model = make_graph(nodes, [tensor("x", ["N", 1, 4, 4])], [tensor("y", ["N", 2, 3, 3])],
                       {"K1": rand(rng, 2, 1, 2, 2), "s": rand(rng, 2, 3, 3) + 2,
                        "K2": rand(rng, 2, 2, 3, 3)})
    with pytest.raises(UnsupportedLayerError, match=r"'conv2' \(op Conv.*'per_pixel'"):
        import_onnx(model)


def test_imported_nhwc_network_is_in_pixel_order_for_bounds() -> None:
    """The Permute is exact in the engine: IBP bounds of the imported network over a box equal
    those of the same network fed the NCHW box with the Permute removed."""
    from certify.bounds import compute_bounds

    rng = np.random.default_rng(7)
    model = keras_cnn(rng, normalize=False, reshape=True, batch="N")
    net, _ = import_onnx(model)
    net = net.double()
    x = torch.from_numpy(rng.random((2, 5, 4, 3)))
    lo, hi = x - 0.01, x + 0.01
    rest = nn.Sequential(*list(net)[1:])
    for method in ("ibp", "crown"):
        ours = compute_bounds(net, lo, hi, method)
        plain = compute_bounds(rest, lo.permute(0, 3, 1, 2), hi.permute(0, 3, 1, 2), method)
        torch.testing.assert_close(ours.lower, plain.lower, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.upper, plain.upper, rtol=1e-12, atol=1e-12)
    assert not isinstance(rest[0], Normalize)
