"""MaxPool2d in the native engine: converter, soundness, exactness, orderings, rounding.

Generated MaxPool CNNs (conv-relu-maxpool-linear and deeper: varied kernels, strides and
paddings, overlapping windows, a MaxPool with no ReLU before it, two MaxPools) are bounded by
every registered method in float32 and float64, and checked against sampled, corner and PGD
points. Independent references written here from the nn.Module itself (dense Jacobians and
windows enumerated by loops, never the engine's tables): CROWN's and Wong-Kolter's backward
bound with MaxPool's lines, and a brute-force enumeration of the linear regions (ReLU signs and
each window's argmax) that the MILP must match.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
import torch
from bound_helpers import (
    F64,
    SOUND_ATOL,
    all_points,
    assert_alpha_crown_never_looser,
    assert_sound,
    init_weights,
    make_box,
    random_spec,
    spec_values,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from certify.bounds import compute_bounds, get_method, list_methods, margin_bounds, to_network
from certify.bounds.layers import RULES, MaxPoolOp
from certify.bounds.maxpool import (
    maxpool_backward,
    maxpool_constant,
    maxpool_relax,
    maxpool_tighten,
    windows,
)
from certify.bounds.propagation import forward_is_exact
from certify.errors import SpecError, UnsupportedLayerError
from certify.nets import Normalize
from certify.spec import LinfBall, margin_spec

DTYPES = [torch.float32, torch.float64]
# bab (complete, ReLU splits only) has its own tests: tests/bounds/test_bab.py
FAST = list_methods(uses_solver=False, external=False, is_complete=False)
SOLVER = list_methods(uses_solver=True, external=False)

# (kernel, stride, padding): non-overlapping, overlapping, padded, rectangular, 1x1
POOLS = [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((2, 2), (1, 1), (0, 0)),
         ((3, 3), (2, 2), (1, 1)), ((2, 3), (1, 2), (1, 1)), ((1, 1), (1, 1), (0, 0)),
         ((3, 2), (3, 1), (0, 1))]


# --- generated networks ----------------------------------------------------------------------


def make_pool_cnn(seed: int, pool: tuple, variant: int, *, classes: int = 3
                  ) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """A small MaxPool CNN. `pool` = (kernel, stride, padding) of its first MaxPool.

    variant 0: Normalize, Conv, ReLU, MaxPool, Flatten, Linear (the textbook shape)
    variant 1: Normalize, Conv, BatchNorm, MaxPool (no ReLU before it), ReLU, Conv, ReLU, ...
    variant 2: Normalize, Conv, ReLU, MaxPool, Conv, ReLU, MaxPool(2, stride 1), Flatten,
               Linear, ReLU, Linear (two MaxPools, a conv's windowed rows through them)
    """
    gen = torch.Generator().manual_seed(seed)
    kernel, stride, padding = pool
    in_shape = (2, 6, 6) if variant != 1 else (1, 7, 7)
    c = in_shape[0]
    mean = (torch.rand(c, generator=gen) * 0.6 + 0.2).tolist()
    std = (torch.rand(c, generator=gen) * 0.5 + 0.2).tolist()
    layers: list[tuple[str, nn.Module]] = [("norm", Normalize(mean, std))]
    mp = nn.MaxPool2d(kernel, stride, padding)
    if variant == 0:
        layers += [("conv1", nn.Conv2d(c, 3, 3, padding=1)), ("relu1", nn.ReLU()), ("pool", mp)]
    elif variant == 1:
        layers += [("conv1", nn.Conv2d(c, 3, 2)), ("bn1", nn.BatchNorm2d(3)), ("pool", mp),
                   ("relu1", nn.ReLU()), ("conv2", nn.Conv2d(3, 2, 2, padding=1)),
                   ("relu2", nn.ReLU())]
    else:
        layers += [("conv1", nn.Conv2d(c, 3, 3, padding=1)), ("relu1", nn.ReLU()), ("pool", mp),
                   ("conv2", nn.Conv2d(3, 3, 2, padding=1)), ("relu2", nn.ReLU()),
                   ("pool2", nn.MaxPool2d(2, stride=1))]
    model = nn.Sequential(OrderedDict(layers))
    features = model(torch.zeros(1, *in_shape)).numel()
    model.add_module("flatten", nn.Flatten())
    if variant == 2:
        model.add_module("fc1", nn.Linear(features, 5))
        model.add_module("relu_fc1", nn.ReLU())
        features = 5
    model.add_module("out", nn.Linear(features, classes))
    return init_weights(model, gen), in_shape


pool_st = st.sampled_from(POOLS)


# --- the converter ---------------------------------------------------------------------------


@pytest.mark.parametrize("pool", POOLS)
def test_converted_network_computes_the_module(pool):  # type: ignore[no-untyped-def]
    model, in_shape = make_pool_cnn(3, pool, 2)
    net = to_network(model, in_shape)
    x = torch.rand(4, *in_shape)
    torch.testing.assert_close(net(x), model(x), rtol=0, atol=1e-5)  # Normalize: x * s + t
    ops = [op for op in net.layers if isinstance(op, MaxPoolOp)]
    assert len(ops) == 2 and ops[0].kernel_size == pool[0] and ops[0].stride == pool[1]
    assert ops[0].padding == pool[2]
    # the MaxPools' inputs get pre-activation bounds like the ReLUs'
    assert {net.layers.index(op) for op in ops} <= set(net.activation_positions)


@pytest.mark.parametrize("layer, match", [
    (nn.MaxPool2d(2, dilation=2), "dilation=2"),
    (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode=True"),
    (nn.MaxPool2d(2, return_indices=True), "return_indices=True"),
])
def test_unsupported_options_are_named(layer, match):  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedLayerError, match=rf"'pool' \(MaxPool2d\).*{match}"):
        to_network(nn.Sequential(OrderedDict(pool=layer)), (1, 6, 6))


def test_shape_errors_are_one_line():  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=r"MaxPool2d.*smaller than the kernel"):
        to_network(nn.Sequential(nn.MaxPool2d(5)), (1, 3, 3))
    with pytest.raises(SpecError, match=r"MaxPool2d.*\(C, H, W\)"):
        to_network(nn.Sequential(nn.Flatten(), nn.MaxPool2d(2)), (1, 4, 4))


def test_windows_against_loops():  # type: ignore[no-untyped-def]
    for kernel, stride, padding in POOLS:
        op = to_network(nn.Sequential(nn.MaxPool2d(kernel, stride, padding)), (2, 5, 6)).layers[0]
        assert isinstance(op, MaxPoolOp)
        win = windows(op)
        want = _window_lists((2, 5, 6), kernel, stride, padding)
        got = [sorted(win.index[p][win.valid[p]].tolist()) for p in range(win.index.shape[0])]
        assert got == [sorted(w) for w in want]
        cover = np.zeros(2 * 5 * 6, dtype=int)
        for w in want:
            cover[w] += 1
        assert win.multiplicity == cover.max()


# --- soundness -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20), pool=pool_st, variant=st.integers(0, 2),
       eps_max=st.sampled_from([0.02, 0.1, 0.3]))
def test_generated_pool_cnn_sound(method, dtype, seed, pool, variant, eps_max):  # type: ignore[no-untyped-def]
    model, in_shape = make_pool_cnn(seed, pool, variant)
    x_lo, x_hi, x = make_box(seed, 3, in_shape, eps_max, dtype)
    spec = random_spec(seed, 3, 3, 3, dtype)
    assert_sound(model, x_lo, x_hi, x, spec, method, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
def test_margins_of_the_model_as_it_runs(method, dtype):  # type: ignore[no-untyped-def]
    """margin_bounds covers the model's own forward pass (model_rounding), through MaxPools
    that end the network's last chain as well as inner ones."""
    for variant, pool in ((0, POOLS[1]), (1, POOLS[0]), (2, POOLS[3])):
        model, in_shape = make_pool_cnn(11 + variant, pool, variant)
        model = model.to(dtype)
        gen = torch.Generator().manual_seed(variant)
        x = torch.rand(3, *in_shape, generator=gen).to(dtype)
        y = torch.tensor([0, 1, 2])
        eps = torch.tensor([0.0, 0.02, 0.1], dtype=dtype)
        bounds = margin_bounds(model, x, y, eps, method)
        x_lo, x_hi = LinfBall(x, eps).box()
        spec = margin_spec(y, 3).to(dtype)
        with torch.no_grad():
            values = spec_values(model, all_points(model, x_lo, x_hi, spec, x), spec)
        assert bounds.contains(values, atol=SOUND_ATOL[dtype]).all(), method


@pytest.mark.parametrize("method", FAST)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), pool=pool_st, variant=st.integers(0, 2))
def test_pre_activation_bounds_contain_the_layer_inputs(method, seed, pool, variant):  # type: ignore[no-untyped-def]
    """Every MaxPool's (and ReLU's) input bounds contain the input at the sampled points."""
    model, in_shape = make_pool_cnn(seed, pool, variant)
    model = model.double()
    x_lo, x_hi, x = make_box(seed, 2, in_shape, 0.15, F64)
    net = to_network(model, in_shape)
    inter = get_method(method).intermediate(net, x_lo, x_hi)
    points = all_points(model, x_lo, x_hi, random_spec(seed, 2, 3, 3, F64), x)
    h = points.reshape(-1, *in_shape)
    k = 0
    for i, op in enumerate(net.layers):
        if i in net.activation_positions:
            lo = inter[k].lower.repeat(points.shape[0], *([1] * (h.ndim - 1)))
            hi = inter[k].upper.repeat(points.shape[0], *([1] * (h.ndim - 1)))
            assert (h >= lo - 1e-10).all() and (h <= hi + 1e-10).all(), (method, i)
            k += 1
        h = RULES[type(op)].forward(op, h)
    assert k == len(inter)


@pytest.mark.parametrize("mode", ["backward", "forward"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), pool=pool_st, variant=st.integers(0, 2))
def test_intermediate_modes_sound(mode, seed, pool, variant):  # type: ignore[no-untyped-def]
    """Forward mode (plain floating point only) pushes linear functions through the lines."""
    model, in_shape = make_pool_cnn(seed, pool, variant)
    x_lo, x_hi, x = make_box(seed, 3, in_shape, 0.1, F64)
    spec = random_spec(seed, 3, 3, 3, F64)
    for method in ("crown", "wong-kolter", "alpha-crown"):
        assert_sound(model, x_lo, x_hi, x, spec, method, F64, intermediate_mode=mode,
                     rigorous=mode != "forward")


@pytest.mark.solver
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", SOLVER)
def test_solver_methods_sound(method, dtype):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    for variant, pool in ((0, POOLS[2]), (1, POOLS[4])):
        model, in_shape = _tiny_pool_cnn(5 + variant, pool, variant)
        x_lo, x_hi, x = make_box(variant, 2, in_shape, 0.2, dtype)
        spec = random_spec(variant, 2, 2, 3, dtype)
        assert_sound(model, x_lo, x_hi, x, spec, method, dtype)


@pytest.mark.solver
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", SOLVER)
def test_solver_methods_cover_the_model_as_it_runs(method, dtype):  # type: ignore[no-untyped-def]
    """margin_bounds of the LP/MILP (model_rounding) on the model as it runs: the chain after a
    MaxPool takes the MaxPool's output box (its shape, not its input's), whether the MaxPool
    is the last activation or a LeakyReLU follows it."""
    pytest.importorskip("cvxpy")
    for variant, pool in ((0, POOLS[2]), (1, POOLS[4]), (2, POOLS[0])):
        if variant < 2:
            model, in_shape = _tiny_pool_cnn(5 + variant, pool, variant)
        else:
            model = init_weights(nn.Sequential(
                Normalize([0.4], [0.3]), nn.Conv2d(1, 2, 2), nn.ReLU(), nn.MaxPool2d(*pool),
                nn.Flatten(), nn.Linear(2, 4), nn.LeakyReLU(0.1), nn.Linear(4, 3)),
                torch.Generator().manual_seed(7))
            in_shape = (1, 4, 4)
        model = model.to(dtype)
        gen = torch.Generator().manual_seed(variant)
        x = torch.rand(2, *in_shape, generator=gen).to(dtype)
        y = torch.tensor([0, 1])
        eps = torch.tensor([0.05, 0.2], dtype=dtype)
        bounds = margin_bounds(model, x, y, eps, method)
        x_lo, x_hi = LinfBall(x, eps).box()
        spec = margin_spec(y, 3).to(dtype)
        with torch.no_grad():
            values = spec_values(model, all_points(model, x_lo, x_hi, spec, x), spec)
        assert bounds.contains(values, atol=SOUND_ATOL[dtype]).all(), (method, variant)


def _tiny_pool_cnn(seed: int, pool: tuple, variant: int) -> tuple[nn.Sequential, tuple]:
    """At most ~20 ReLUs (for the LP/MILP)."""
    gen = torch.Generator().manual_seed(seed)
    kernel, stride, padding = pool
    layers: list[nn.Module] = [Normalize([0.4], [0.3]), nn.Conv2d(1, 2, 2)]
    if variant == 0:
        layers += [nn.ReLU(), nn.MaxPool2d(kernel, stride, padding)]
    else:
        layers += [nn.MaxPool2d(kernel, stride, padding), nn.ReLU()]
    model = nn.Sequential(*layers)
    features = model(torch.zeros(1, 1, 4, 4)).numel()
    model.append(nn.Flatten())
    model.append(nn.Linear(features, 3))
    return init_weights(model, gen), (1, 4, 4)


@pytest.mark.parametrize("method", FAST)
def test_zero_width_box_is_the_forward_pass_and_batches_are_per_sample(method):  # type: ignore[no-untyped-def]
    model, in_shape = make_pool_cnn(4, POOLS[1], 2)
    model = model.double()
    x_lo, x_hi, x = make_box(4, 4, in_shape, 0.1, F64)
    spec = random_spec(4, 4, 2, 3, F64)
    point = compute_bounds(model, x, x, method, spec)
    with torch.no_grad():
        value = torch.einsum("nk,nsk->ns", model(x), spec)
    torch.testing.assert_close(point.lower, value, atol=1e-9, rtol=0)
    torch.testing.assert_close(point.upper, value, atol=1e-9, rtol=0)
    if method == "alpha-crown":
        return  # its optimizer is not batch-invariant (on ReLU-only nets too, ~1e-5)
    batch = compute_bounds(model, x_lo, x_hi, method, spec)
    for n in range(4):
        one = compute_bounds(model, x_lo[n:n + 1], x_hi[n:n + 1], method, spec[n:n + 1])
        torch.testing.assert_close(one.lower, batch.lower[n:n + 1], atol=1e-12, rtol=0)
        torch.testing.assert_close(one.upper, batch.upper[n:n + 1], atol=1e-12, rtol=0)


def test_chunks_and_modes_do_not_change_a_bound():  # type: ignore[no-untyped-def]
    """Windows made dense at a MaxPool, chunks and the intermediate mode are bookkeeping."""
    model, in_shape = make_pool_cnn(8, POOLS[4], 2)
    model = model.double()
    x_lo, x_hi, _ = make_box(8, 3, in_shape, 0.1, F64)
    spec = random_spec(8, 3, 3, 3, F64)
    ref = compute_bounds(model, x_lo, x_hi, "crown", spec)
    for options in ({"chunk_size": 3}, {"chunk_size": 1000}, {"intermediate_mode": "backward"}):
        b = compute_bounds(model, x_lo, x_hi, "crown", spec, **options)
        torch.testing.assert_close(b.lower, ref.lower, atol=1e-12, rtol=0)
        torch.testing.assert_close(b.upper, ref.upper, atol=1e-12, rtol=0)


# --- independent references ------------------------------------------------------------------


def _window_lists(in_shape: tuple, kernel: tuple, stride: tuple, padding: tuple
                  ) -> list[list[int]]:
    """Flat input indices of every output's window, by loops (padding left out)."""
    c, h, w = in_shape
    ho = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    wo = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    out = []
    for ch in range(c):
        for i in range(ho):
            for j in range(wo):
                out.append([ch * h * w + a * w + b
                            for a in range(i * stride[0] - padding[0],
                                           i * stride[0] - padding[0] + kernel[0])
                            for b in range(j * stride[1] - padding[1],
                                           j * stride[1] - padding[1] + kernel[1])
                            if 0 <= a < h and 0 <= b < w])
    return out


def _pair(v: int | tuple) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def _pieces(model: nn.Sequential, in_shape: tuple) -> list[tuple]:
    """The model as ``("affine", W, b)``, ``("relu",)`` and ``("max", windows)`` pieces on
    flat float64 vectors; affine modules from their Jacobians, consecutive ones composed."""
    pieces: list[tuple] = []
    shape = tuple(in_shape)
    for m in model:
        if isinstance(m, nn.ReLU):
            pieces.append(("relu",))
            continue
        if isinstance(m, nn.MaxPool2d):
            kernel, stride, padding = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
            wins = _window_lists(shape, kernel, stride, padding)
            c, h, w = shape
            shape = (c, (h + 2 * padding[0] - kernel[0]) // stride[0] + 1,
                     (w + 2 * padding[1] - kernel[1]) // stride[1] + 1)
            pieces.append(("max", wins))
            continue
        module = m.double().eval()
        zero = torch.zeros(1, *shape, dtype=F64)
        with torch.no_grad():
            b = module(zero)
        jac = torch.autograd.functional.jacobian(module, zero).reshape(b.numel(), -1)
        shape = tuple(b.shape[1:])
        if pieces and pieces[-1][0] == "affine":
            _, w0, b0 = pieces.pop()
            pieces.append(("affine", jac.numpy() @ w0, jac.numpy() @ b0 + b.flatten().numpy()))
        else:
            pieces.append(("affine", jac.numpy(), b.flatten().numpy()))
    return pieces


def _reference_backward(pieces: list[tuple], rows: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                        pre: list[tuple[np.ndarray, np.ndarray]], rule: str) -> np.ndarray:
    """The CROWN-family lower bound of ``rows @ f(x)`` over the box, given the inputs' bounds of
    every ReLU/MaxPool, written directly: ReLU's chord and lower slope (adaptive or parallel),
    MaxPool's lines ``y >= x_k`` (first argmax of l) and ``y <= x_k`` if decided else
    ``y <= max u``."""
    nu = rows.copy()
    const = np.zeros(rows.shape[0])
    k = len(pre)
    for piece in reversed(pieces):
        if piece[0] == "affine":
            _, w, b = piece
            const = const + nu @ b
            nu = nu @ w
            continue
        k -= 1
        l, u = pre[k]
        if piece[0] == "relu":
            unstable = (l < 0) & (u > 0)
            width = np.where(unstable, u - l, 1.0)
            s = np.where(unstable, u / width, (l >= 0).astype(float))
            t = np.where(unstable, -s * l, 0.0)
            if rule == "adaptive":
                alpha = np.where(unstable, (u > -l).astype(float), (l >= 0).astype(float))
            else:
                alpha = s
            pos, neg = np.maximum(nu, 0), np.minimum(nu, 0)
            const = const + neg @ t
            nu = pos * alpha + neg * s
            continue
        wins = piece[1]
        new = np.zeros((nu.shape[0], l.shape[0]))
        for p, win in enumerate(wins):
            ls = [l[j] for j in win]
            first = int(np.argmax(ls))
            kk = win[first]
            decided = all(l[kk] >= u[j] for j in win if j != kk)
            pos, neg = np.maximum(nu[:, p], 0), np.minimum(nu[:, p], 0)
            if decided:
                new[:, kk] += nu[:, p]
            else:
                new[:, kk] += pos
                const = const + neg * max(u[j] for j in win)
        nu = new
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    return const + nu @ center - np.abs(nu) @ radius  # type: ignore[no-any-return]


@pytest.mark.parametrize("method, rule", [("crown", "adaptive"), ("wong-kolter", "parallel"),
                                          ("crown-ibp", "adaptive")])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**20), pool=pool_st, variant=st.integers(0, 2),
       eps=st.sampled_from([0.05, 0.3]))
def test_output_equals_the_reference(method, rule, seed, pool, variant, eps):  # type: ignore[no-untyped-def]
    """With the same intermediate bounds, the output bound is the one written directly from
    the lines (CROWN: adaptive ReLU slope; Wong & Kolter: parallel; MaxPool's lines fixed)."""
    model, in_shape = make_pool_cnn(seed, pool, variant)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 2, in_shape, eps, F64)
    spec = random_spec(seed, 2, 3, 3, F64)
    net = to_network(model, in_shape)
    inter = get_method(method).intermediate(net, x_lo, x_hi)
    got = compute_bounds(net, x_lo, x_hi, method, spec, intermediate=inter)
    pieces = _pieces(model, in_shape)
    for n in range(2):
        pre = [(b.lower[n].detach().flatten().numpy(), b.upper[n].detach().flatten().numpy())
               for b in inter]
        lo, hi = x_lo[n].flatten().numpy(), x_hi[n].flatten().numpy()
        rows = spec[n].numpy()
        want_lo = _reference_backward(pieces, rows, lo, hi, pre, rule)
        want_hi = -_reference_backward(pieces, -rows, lo, hi, pre, rule)
        t = 1e-9 * (1 + np.abs(want_lo).max() + np.abs(want_hi).max())
        np.testing.assert_allclose(got.lower[n].detach().numpy(), want_lo, atol=t, rtol=0)
        np.testing.assert_allclose(got.upper[n].detach().numpy(), want_hi, atol=t, rtol=0)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**20), pool=pool_st, variant=st.integers(0, 2))
def test_forward_mode_equals_backward_where_exact(seed, pool, variant):  # type: ignore[no-untyped-def]
    model, in_shape = make_pool_cnn(seed, pool, variant)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 3, in_shape, 0.2, F64)
    net = to_network(model, in_shape)
    fwd = get_method("crown", intermediate_mode="forward", rigorous=False).intermediate(
        net, x_lo, x_hi)
    bwd = get_method("crown", intermediate_mode="backward", rigorous=False).intermediate(
        net, x_lo, x_hi)
    checked = 0
    for i in range(len(net.activation_positions)):
        if all(forward_is_exact(net.layers, p) for p in net.activation_positions[:i + 1]):
            t = 1e-9 * (1 + bwd[i].upper.abs().max().item())
            torch.testing.assert_close(fwd[i].lower, bwd[i].lower, atol=t, rtol=0)
            torch.testing.assert_close(fwd[i].upper, bwd[i].upper, atol=t, rtol=0)
            checked += 1
    assert checked >= 2  # the first ReLU and the MaxPool after it (one activation below)


# --- orderings that are theorems ---------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**20), pool=pool_st, variant=st.integers(0, 2),
       eps=st.sampled_from([0.05, 0.3]))
def test_alpha_crown_never_looser_than_crown(seed, pool, variant, eps):  # type: ignore[no-untyped-def]
    model, in_shape = make_pool_cnn(seed, pool, variant)
    assert_alpha_crown_never_looser(model, in_shape, seed, eps, classes=3, steps=6)


@pytest.mark.solver
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**20), pool=st.sampled_from(POOLS[:5]), variant=st.integers(0, 1),
       eps=st.sampled_from([0.1, 0.3]))
def test_milp_above_lp_above_the_linear_methods(seed, pool, variant, eps):  # type: ignore[no-untyped-def]
    """With the same intermediate bounds: milp >= lp >= alpha-crown >= crown, lp >= wong-kolter
    (lower bounds; upper bounds mirrored)."""
    pytest.importorskip("cvxpy")
    model, in_shape = _tiny_pool_cnn(seed, pool, variant)
    model = model.double()
    net = to_network(model, in_shape)
    x_lo, x_hi, _ = make_box(seed, 2, in_shape, eps, F64)
    spec = random_spec(seed, 2, 2, 3, F64)
    for source, methods in (("crown", ("crown", "alpha-crown")), ("wong-kolter",
                                                                  ("wong-kolter",))):
        inter = get_method(source).intermediate(net, x_lo, x_hi)
        lp = compute_bounds(net, x_lo, x_hi, "lp", spec, intermediate=inter)
        t = 1e-8 * (1 + lp.lower.abs().max().item() + lp.upper.abs().max().item())
        for m in methods:
            b = compute_bounds(net, x_lo, x_hi, m, spec, intermediate=inter)
            assert (lp.lower >= b.lower - t).all(), m
            assert (lp.upper <= b.upper + t).all(), m
        milp = compute_bounds(net, x_lo, x_hi, "milp", spec, intermediate=inter)
        assert (milp.lower >= lp.lower - t - milp.tolerance.to(F64)).all()


# --- the MILP is exact: brute-force enumeration of linear regions ------------------------------


def _enumerate_min(pieces: list[tuple], row: np.ndarray, lo: np.ndarray, hi: np.ndarray
                   ) -> float:
    """``min row . f(x)`` over the box, exactly: depth first over every ReLU's sign and every
    window's argmax (each a closed polyhedron where ``f`` is affine, checked by an LP), then one
    LP per region."""
    from scipy.optimize import linprog

    d = lo.shape[0]
    bounds = list(zip(lo, hi, strict=True))
    best = [math.inf]

    def feasible(a: list, b: list) -> np.ndarray | None:
        res = linprog(np.zeros(d), A_ub=np.array(a), b_ub=np.array(b), bounds=bounds,
                      method="highs")
        return res.x if res.status == 0 else None

    def layer(i: int, fw: np.ndarray, fc: np.ndarray, a: list, b: list, point: np.ndarray
              ) -> None:
        if i == len(pieces):
            res = linprog(row @ fw, A_ub=np.array(a) if a else None,
                          b_ub=np.array(b) if b else None, bounds=bounds, method="highs")
            assert res.status == 0
            best[0] = min(best[0], float(res.fun + row @ fc))
            return
        piece = pieces[i]
        if piece[0] == "affine":
            layer(i + 1, piece[1] @ fw, piece[1] @ fc + piece[2], a, b, point)
            return
        units = range(fw.shape[0]) if piece[0] == "relu" else range(len(piece[1]))
        n_out = len(units)

        def unit(q: int, a: list, b: list, point: np.ndarray, ow: np.ndarray,
                 oc: np.ndarray) -> None:
            if q == n_out:
                layer(i + 1, ow, oc, a, b, point)
                return
            if piece[0] == "relu":  # active: -z <= 0 (value z); inactive: z <= 0 (value 0)
                options = [([(-fw[q], fc[q])], (fw[q], fc[q])),
                           ([(fw[q], -fc[q])], (np.zeros(d), 0.0))]
            else:  # argmax j: z_i - z_j <= 0 for the window's others
                win = piece[1][q]
                options = [([(fw[i2] - fw[j], fc[j] - fc[i2]) for i2 in win if i2 != j],
                            (fw[j], fc[j])) for j in win]
            for cons, (vw, vc) in options:
                holds = all(cw @ point <= cb + 1e-12 for cw, cb in cons)
                a2, b2 = a + [cw for cw, _ in cons], b + [cb for _, cb in cons]
                witness = point if holds else feasible(a2, b2)
                if witness is None:
                    continue
                ow2, oc2 = ow.copy(), oc.copy()
                ow2[q], oc2[q] = vw, vc
                unit(q + 1, a2, b2, witness, ow2, oc2)

        unit(0, a, b, point, np.zeros((n_out, d)), np.zeros(n_out))

    layer(0, np.eye(d), np.zeros(d), [], [], (lo + hi) / 2)
    return best[0]


def _line_net(seed: int, pool: tuple, relu_first: bool) -> nn.Sequential:
    """Input (1, 1, 4): Conv(1 -> 2, (1, 2)), [ReLU], MaxPool over the row, Flatten, Linear."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(1, 2, (1, 2))
    conv.weight.data = torch.randn(2, 1, 1, 2, generator=gen) * 2.0
    conv.bias.data = torch.randn(2, generator=gen) * 0.5
    layers: list[nn.Module] = [conv, nn.ReLU(), nn.MaxPool2d(*pool)] if relu_first else \
        [conv, nn.MaxPool2d(*pool), nn.ReLU()]
    model = nn.Sequential(*layers)
    features = model(torch.zeros(1, 1, 1, 4)).numel()
    out = nn.Linear(features, 3)
    out.weight.data = torch.randn(3, features, generator=gen)
    out.bias.data = torch.randn(3, generator=gen) * 0.3
    return nn.Sequential(*layers, nn.Flatten(), out).double().eval()


LINE_POOLS = [((1, 2), (1, 1), (0, 0)), ((1, 3), (1, 1), (0, 1)), ((1, 2), (1, 2), (0, 0)),
              ((1, 3), (1, 2), (0, 1))]


@pytest.mark.solver
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), pool=st.sampled_from(LINE_POOLS), relu_first=st.booleans(),
       eps=st.sampled_from([0.15, 0.3]))
def test_milp_equals_the_brute_force_minimum(seed, pool, relu_first, eps):  # type: ignore[no-untyped-def]
    """Lower (and, with exact_upper, upper) bounds of a random row are the exact extremes."""
    pytest.importorskip("cvxpy")
    model = _line_net(seed, pool, relu_first)
    rng = np.random.default_rng(seed)
    center = rng.random(4)
    lo, hi = np.clip(center - eps, 0, 1), np.clip(center + eps, 0, 1)
    x_lo = torch.tensor(lo, dtype=F64).view(1, 1, 1, 4)
    x_hi = torch.tensor(hi, dtype=F64).view(1, 1, 1, 4)
    rows = rng.standard_normal((1, 3))
    spec = torch.tensor(rows, dtype=F64)[None]
    b = compute_bounds(model, x_lo, x_hi, "milp", spec, exact_upper=True)
    assert b.optimal.all()
    pieces = _pieces(model, (1, 1, 4))
    for r in range(1):
        truth = _enumerate_min(pieces, rows[r], lo, hi)
        top = -_enumerate_min(pieces, -rows[r], lo, hi)
        with torch.no_grad():  # the enumeration itself: its minimum is reached
            samples = torch.tensor(lo + rng.random((4000, 4)) * (hi - lo)).view(-1, 1, 1, 4)
            values = model(samples).numpy() @ rows[r]
        assert truth <= values.min() + 1e-9 and top >= values.max() - 1e-9
        tol = float(b.tolerance[0, r])
        assert float(b.lower[0, r]) <= truth + 1e-9, "unsound: above the true minimum"
        assert float(b.lower[0, r]) >= truth - tol - 1e-7, "not exact"
        assert top - 1e-9 <= float(b.upper[0, r]) <= top + tol + 1e-7


@pytest.mark.solver
def test_milp_is_exact_where_only_windows_are_undecided():  # type: ignore[no-untyped-def]
    """Every ReLU stable, windows undecided: the LP is not exact there, the MILP (with one
    binary per candidate of each undecided window) is."""
    pytest.importorskip("cvxpy")
    from certify.bounds.encoding import encode, sample_programs, widen
    from certify.bounds.network import fold_spec

    model = _line_net(2, LINE_POOLS[0], relu_first=False)
    conv = model[0]
    conv.weight.data = torch.tensor([[[[1.0, -1.0]]], [[[-2.0, 1.0]]]], dtype=F64)
    conv.bias.data = torch.tensor([3.0, 4.0], dtype=F64)  # outputs in [1, 5]: ReLUs active
    net = to_network(model, (1, 1, 4))
    x_lo = torch.full((1, 1, 1, 4), 0.1, dtype=F64)
    x_hi = torch.full((1, 1, 1, 4), 0.9, dtype=F64)
    inter = get_method("crown").intermediate(net, x_lo, x_hi)
    assert (inter[1].lower > 0).all()  # the ReLU after the MaxPool is stable
    relax = maxpool_relax(net.layers[1], inter[0].lower, inter[0].upper, "adaptive")
    assert not relax.decided.any()
    enc = encode(fold_spec(net.detach(), torch.eye(3, dtype=F64)[None]))
    pre = [widen(b, F64) for b in inter]
    (pre_i, lp), = sample_programs(enc, x_lo.flatten(1).numpy(), x_hi.flatten(1).numpy(), pre,
                                   None)
    assert enc.milp(lp, pre_i).n_bin == 2 * relax.decided.numel()  # windows of 2 candidates
    rows = np.array([[1.0, -2.0, 0.5], [-1.0, 1.0, 1.0], [0.3, 1.0, -1.0]])
    spec = torch.tensor(rows, dtype=F64)[None]
    milp = compute_bounds(net, x_lo, x_hi, "milp", spec, intermediate=inter)
    lp_bound = compute_bounds(net, x_lo, x_hi, "lp", spec, intermediate=inter)
    assert milp.optimal.all()
    pieces = _pieces(model, (1, 1, 4))
    lo, hi = x_lo.flatten().numpy(), x_hi.flatten().numpy()
    gaps = []
    for r in range(3):
        truth = _enumerate_min(pieces, rows[r], lo, hi)
        tol = float(milp.tolerance[0, r])
        assert truth - tol - 1e-7 <= float(milp.lower[0, r]) <= truth + 1e-9
        gaps.append(truth - float(lp_bound.lower[0, r]))
    assert max(gaps) > 1e-3  # the LP relaxation alone is looser: the binaries were needed


# --- the relaxation and its rigorous constant --------------------------------------------------


def _op(kernel, stride, padding, in_shape) -> MaxPoolOp:  # type: ignore[no-untyped-def]
    op = to_network(nn.Sequential(nn.MaxPool2d(kernel, stride, padding)), in_shape).layers[0]
    assert isinstance(op, MaxPoolOp)
    return op


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**20), pool=pool_st)
def test_lines_hold_at_sampled_points(seed, pool):  # type: ignore[no-untyped-def]
    """x_k <= y <= (x_k if decided else U) for points in the box; decided windows are exact."""
    op = _op(*pool, (2, 5, 6))
    gen = torch.Generator().manual_seed(seed)
    lo = torch.randn(3, 2, 5, 6, generator=gen, dtype=F64)
    hi = lo + torch.rand(3, 2, 5, 6, generator=gen, dtype=F64) * torch.rand(
        3, 1, 1, 1, generator=gen, dtype=F64)
    relax = maxpool_relax(op, lo, hi, "adaptive")
    x = lo + torch.rand(200, *lo.shape, generator=gen, dtype=F64) * (hi - lo)
    x = torch.cat([x, torch.where(torch.rand(50, *lo.shape, generator=gen) < 0.5, lo, hi)])
    y = nn.functional.max_pool2d(x.reshape(-1, 2, 5, 6), *pool).reshape(x.shape[0], 3, -1)
    xk = x.reshape(x.shape[0], 3, -1).gather(2, relax.index.expand(x.shape[0], -1, -1))
    assert (y >= xk).all()
    upper = torch.where(relax.decided, xk, relax.upper_bias)
    assert (y <= upper).all()
    assert (y[:, relax.decided] == xk[:, relax.decided]).all()
    assert not relax.unstable.any()  # alpha-CROWN: no free slopes


def test_tighten_skips_dominated_inputs_and_decided_windows():  # type: ignore[no-untyped-def]
    op = _op(2, 2, 0, (1, 2, 4))
    lo = torch.tensor([[[[0.0, -1.0, 5.0, 0.0], [0.5, -2.0, 1.0, 0.0]]]], dtype=F64)
    hi = torch.tensor([[[[1.0, 0.2, 6.0, 4.0], [0.7, 3.0, 2.0, 1.0]]]], dtype=F64)
    # window 1 (cols 0-1): max l = 0.5, inputs with u >= 0.5: (0,0), (1,0), (1,1) -- not (0,1)
    # window 2 (cols 2-3): l = 5 at (0,2) dominates every other u (<= 4): decided
    mask = maxpool_tighten(op, lo, hi)
    want = torch.tensor([[[[True, False, False, False], [True, True, False, False]]]])
    assert torch.equal(mask, want)
    relax = maxpool_relax(op, lo, hi, "adaptive")
    assert relax.decided.tolist() == [[False, True]]
    assert relax.index.tolist() == [[4, 2]] and relax.upper_bias.tolist() == [[3.0, 0.0]]


def _exact_min_decided(mu: Tensor, nu: Tensor, relax, lo: Tensor, hi: Tensor) -> list:  # type: ignore[no-untyped-def]
    """Exact (Fraction) ``min_x mu . maxpool(x) - nu . x`` over the box when every window is
    decided (``maxpool(x)_p = x_k(p)``): a linear function, minimized coordinatewise."""
    out = []
    index = relax.index[0].tolist()
    lo_f, hi_f = lo.flatten().tolist(), hi.flatten().tolist()
    for row_mu, row_nu in zip(mu[0].flatten(1).tolist(), nu[0].flatten(1).tolist(),
                              strict=True):
        coef = [-Fraction(v) for v in row_nu]
        for p, k in enumerate(index):
            coef[k] += Fraction(row_mu[p])
        out.append(sum(min(c * Fraction(a), c * Fraction(b))
                       for c, a, b in zip(coef, lo_f, hi_f, strict=True)))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_covers_the_rounding_of_overlapping_windows(dtype):  # type: ignore[no-untyped-def]
    """One large input is the max of 9 overlapping windows, so its row in ``nu`` sums 9 rounded
    terms; the rigorous constant must hold in exact arithmetic for the rows as computed."""
    op = _op(3, 1, 1, (1, 3, 3))
    assert windows(op).multiplicity == 9
    gen = torch.Generator().manual_seed(0)
    lo = (torch.rand(1, 1, 3, 3, generator=gen, dtype=F64) + 3.0).to(dtype)
    lo[0, 0, 1, 1] = 1000.0  # the centre dominates every window
    hi = lo + 0.5
    relax = maxpool_relax(op, lo, hi, "adaptive")
    assert relax.decided.all()
    mu = (torch.rand(1, 64, 1, 3, 3, generator=gen, dtype=F64) * 2 - 0.3).to(dtype)
    mu = mu * torch.logspace(0, 6, 9, dtype=F64).to(dtype).view(1, 1, 1, 3, 3)
    samples = torch.zeros(1, dtype=torch.long)
    nu, _ = maxpool_backward(op, mu, relax, samples, constant=False)
    c, err = maxpool_constant(op, mu, nu, relax, samples, None)
    truth = _exact_min_decided(mu, nu, relax, lo, hi)
    rounded = 0
    for r in range(mu.shape[1]):
        assert Fraction(float(c[0, r])) - 2 * Fraction(float(err[0, r])) <= truth[r]
        rounded += truth[r] != 0
    assert rounded > 0  # the rows did round: the check was not vacuous


def test_constant_with_row_and_input_errors():  # type: ignore[no-untyped-def]
    """``mu*`` within `mu_err` of ``mu`` and a perturbed input: the constant still holds."""
    op = _op(2, 1, 0, (1, 3, 3))
    gen = torch.Generator().manual_seed(1)
    lo = torch.randn(1, 1, 3, 3, generator=gen, dtype=F64)
    hi = lo + torch.rand(1, 1, 3, 3, generator=gen, dtype=F64)
    relax = maxpool_relax(op, lo, hi, "adaptive")
    mu = torch.randn(1, 5, 1, 2, 2, generator=gen, dtype=F64)
    mu_err = torch.full_like(mu, 0.01)
    e = torch.full((1, 1, 3, 3), 0.05, dtype=F64)
    samples = torch.zeros(1, dtype=torch.long)
    nu, _ = maxpool_backward(op, mu, relax, samples, constant=False)
    c, err = maxpool_constant(op, mu, nu, relax, samples, mu_err, e)
    # the perturbed input x (the model's) lies in the relaxed box; the exact one z within e
    x = lo + torch.rand(3000, 1, 3, 3, generator=gen, dtype=F64) * (hi - lo)
    x = torch.cat([x, torch.where(torch.rand(1000, 1, 3, 3, generator=gen) < 0.5, lo, hi)])
    y = nn.functional.max_pool2d(x, 2, 1).flatten(1)  # (P, 4)
    signs = torch.where(torch.rand(x.shape[0], 5, 4, generator=gen) < 0.5, -1.0, 1.0)
    mu_star = mu.flatten(2) + 0.01 * signs.to(F64)  # (P, 5, 4), within mu_err
    shift = torch.where(torch.rand(x.shape[0], 9, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    z = x.flatten(1) + e.flatten() * shift
    value = (mu_star * y[:, None, :]).sum(2) - (nu.flatten(2) * z[:, None, :]).sum(2)
    assert (value >= c - 2 * err - 1e-12).all()
    # without the rows' and the input's errors the constant would be wrong somewhere
    c0, _ = maxpool_constant(op, mu, nu, relax, samples, None)
    assert (value < c0 - 1e-9).any()


# --- auto_LiRPA: the external methods, and parity where it has MaxPool -------------------------

EXTERNAL = list_methods(external=True)


def _auto_lirpa() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its import warns about torch.jit
        pytest.importorskip("auto_LiRPA", reason="auto_LiRPA not installed (see README)")


@pytest.mark.parametrize("method", EXTERNAL)
def test_external_methods_sound(method):  # type: ignore[no-untyped-def]
    """auto_LiRPA's MaxPool needs stride == kernel; its alpha-CROWN keeps MaxPool slopes in
    float32 and fails on a conv after a MaxPool ("use conv_mode matrix"), so that method runs
    in float32 on the textbook shape only."""
    _auto_lirpa()
    alpha = method == "lirpa-alpha-crown"
    dtype = torch.float32 if alpha else F64
    for variant in (0,) if alpha else (0, 1):
        model, in_shape = make_pool_cnn(21 + variant, POOLS[0], variant)
        x_lo, x_hi, x = make_box(variant, 2, in_shape, 0.1, dtype)
        assert_sound(model, x_lo, x_hi, x, random_spec(variant, 2, 2, 3, dtype), method, dtype)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), variant=st.integers(0, 1), eps=st.sampled_from([0.05, 0.2]))
def test_parity_with_auto_lirpa(seed, variant, eps):  # type: ignore[no-untyped-def]
    """On MaxPool CNNs auto_LiRPA bounds (non-overlapping, unpadded windows): IBP and
    CROWN-IBP end to end, and CROWN with the same ReLU input bounds (auto_LiRPA takes those of
    ReLUs only; each MaxPool's input bounds then follow the same way in both engines) equal
    auto_LiRPA's within 1e-5 relative: the same MaxPool lines."""
    _auto_lirpa()
    from certify.bounds.auto_lirpa import auto_lirpa_bounds
    from certify.bounds.layers import ReluOp

    model, in_shape = make_pool_cnn(seed, POOLS[0], variant)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 2, in_shape, eps, F64)
    spec = random_spec(seed, 2, 3, 3, F64)
    net = to_network(model, in_shape)
    inter = get_method("crown").intermediate(net, x_lo, x_hi)
    relus = tuple(b for pos, b in zip(net.activation_positions, inter, strict=True)
                  if isinstance(net.layers[pos], ReluOp))
    for method in ("ibp", "crown-ibp", "crown"):
        if method == "crown":
            ours = compute_bounds(net, x_lo, x_hi, method, spec, intermediate=inter)
            theirs = auto_lirpa_bounds(model, x_lo, x_hi, method, spec, intermediate=relus,
                                       intersect_ibp=False)
        else:
            ours = compute_bounds(model, x_lo, x_hi, method, spec)
            theirs = auto_lirpa_bounds(model, x_lo, x_hi, method, spec)
        scale = max(1.0, float(theirs.lower.detach().abs().max()),
                    float(theirs.upper.detach().abs().max()))
        assert float((ours.lower - theirs.lower).abs().max()) <= 1e-5 * scale, method
        assert float((ours.upper - theirs.upper).abs().max()) <= 1e-5 * scale, method
