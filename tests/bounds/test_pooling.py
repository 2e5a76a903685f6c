"""AdaptiveAvgPool2d (global average pooling), Flatten anywhere, partial Flatten and Unflatten:
soundness of every method, and exact rational checks of the linear ops.

The exact references build each layer's matrix from its definition (``fractions.Fraction`` of
the stored weights; adaptive windows ``floor(i H / oh) .. ceil((i + 1) H / oh)``), independent of
torch's kernels and of the engine.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from bound_helpers import F64, assert_sound, init_weights, make_box, random_spec
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import list_methods, to_network
from certify.bounds.layers import RULES, AdaptiveAvgPoolOp, interval_affine
from certify.bounds.rounding import gamma
from certify.errors import SpecError, UnsupportedLayerError
from certify.nets import Normalize
from certify.radius import certified_radii

DTYPES = [torch.float32, torch.float64]
# branch and bound (complete, budgeted) has its own tests: tests/bounds/test_bab.py
FAST = list_methods(uses_solver=False, external=False, is_complete=False)


def init(model: nn.Module, seed: int) -> nn.Sequential:
    return init_weights(model, torch.Generator().manual_seed(seed))


def pooling_net(seed: int, variant: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Every way the new layers appear: global pooling, uneven adaptive windows, upsampling
    windows, a Flatten in the middle and an Unflatten back, a partial Flatten."""
    if variant == 0:  # global average pooling after convolutions
        layers = [Normalize([0.4, 0.5], [0.3, 0.2]), nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                  nn.Flatten(), nn.Linear(5, 4)]
    elif variant == 1:  # uneven and overlapping windows, then upsampling ones
        layers = [Normalize([0.4, 0.5], [0.3, 0.2]), nn.Conv2d(2, 3, 2), nn.ReLU(),
                  nn.AdaptiveAvgPool2d((4, 3)), nn.Conv2d(3, 3, 2, padding=1), nn.ReLU(),
                  nn.AdaptiveAvgPool2d((7, None)), nn.Flatten(), nn.Linear(3 * 7 * 4, 6),
                  nn.ReLU(), nn.Linear(6, 4)]
    elif variant == 2:  # a Flatten in the middle and an Unflatten back to a feature map
        layers = [Normalize([0.4, 0.5], [0.3, 0.2]), nn.Conv2d(2, 2, 3), nn.Flatten(),
                  nn.ReLU(), nn.Linear(50, 27), nn.ReLU(), nn.Unflatten(1, (3, 3, 3)),
                  nn.Conv2d(3, 4, 2), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 2)), nn.Flatten(),
                  nn.Linear(8, 4)]
    else:  # partial flatten (C, H*W) and back
        layers = [Normalize([0.4, 0.5], [0.3, 0.2]), nn.Conv2d(2, 3, 3), nn.Flatten(2),
                  nn.ReLU(), nn.Unflatten(2, (5, 5)), nn.AvgPool2d(2), nn.Conv2d(3, 2, 2),
                  nn.ReLU(), nn.Flatten(1, 2), nn.Unflatten(1, (1, -1)), nn.Flatten(),
                  nn.Linear(2, 4)]
    return init(nn.Sequential(*layers), seed), (2, 7, 7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**20), variant=st.integers(0, 3),
       eps_max=st.sampled_from([0.02, 0.15]))
def test_generated_pooling_nets_sound(method, dtype, seed, variant, eps_max):  # type: ignore[no-untyped-def]
    model, in_shape = pooling_net(seed, variant)
    x_lo, x_hi, x = make_box(seed, 3, in_shape, eps_max, dtype)
    assert_sound(model, x_lo, x_hi, x, random_spec(seed, 3, 3, 4, dtype), method, dtype)


@pytest.mark.solver
@pytest.mark.parametrize("method", ["lp", "milp"])
def test_solver_methods_sound_through_pooling_and_reshapes(method):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    gen_model = nn.Sequential(Normalize([0.5], [0.3]), nn.Conv2d(1, 2, 2), nn.Flatten(),
                              nn.ReLU(), nn.Unflatten(1, (2, 3, 3)),
                              nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(4, 3),
                              nn.LeakyReLU(0.1), nn.Linear(3, 3))
    model = init(gen_model, 3).double()
    x_lo, x_hi, x = make_box(3, 2, (1, 4, 4), 0.2, F64)
    assert_sound(model, x_lo, x_hi, x, random_spec(3, 2, 2, 3, F64), method, F64)


# --- exact rational references -----------------------------------------------------------------


def windows(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def pool_matrix(shape: tuple[int, int, int], out: tuple[int, int]) -> np.ndarray:
    c, h, w = shape
    rows = []
    for k in range(c):
        for r0, r1 in windows(h, out[0]):
            for c0, c1 in windows(w, out[1]):
                row = [Fraction(0)] * (c * h * w)
                size = (r1 - r0) * (c1 - c0)
                for i in range(r0, r1):
                    for j in range(c0, c1):
                        row[(k * h + i) * w + j] = Fraction(1, size)
                rows.append(row)
    return np.array(rows, dtype=object)


def exact_map(model: nn.Sequential, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(A, c)``: the network in exact arithmetic, ``f(x) = A x + c`` (linear layers only)."""
    d = math.prod(in_shape)
    a = np.array([[Fraction(int(i == j)) for j in range(d)] for i in range(d)], dtype=object)
    c = np.array([Fraction(0)] * d, dtype=object)
    shape = tuple(in_shape)
    for layer in model:
        if isinstance(layer, Normalize):
            ch, h, w = shape
            scale = np.array([1 / Fraction(float(s)) for s in layer.std.flatten()
                              for _ in range(h * w)], dtype=object)
            shift = np.array([-Fraction(float(m)) / Fraction(float(s))
                              for m, s in zip(layer.mean.flatten(), layer.std.flatten(),
                                              strict=True) for _ in range(h * w)], dtype=object)
            a, c = scale[:, None] * a, scale * c + shift
        elif isinstance(layer, nn.Conv2d):
            ch, h, w = shape
            weight = layer.weight.detach()
            co, _, kh, kw = weight.shape
            oh, ow = h - kh + 1, w - kw + 1  # stride 1, no padding here
            m = np.array([[Fraction(0)] * (ch * h * w) for _ in range(co * oh * ow)],
                         dtype=object)
            for o in range(co):
                for i in range(oh):
                    for j in range(ow):
                        for k in range(ch):
                            for p in range(kh):
                                for q in range(kw):
                                    m[(o * oh + i) * ow + j, (k * h + i + p) * w + j + q] = \
                                        Fraction(float(weight[o, k, p, q]))
            bias = np.array([Fraction(float(layer.bias.detach()[o])) for o in range(co)
                             for _ in range(oh * ow)], dtype=object)
            a, c, shape = m.dot(a), m.dot(c) + bias, (co, oh, ow)
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            out = layer.output_size
            out = (out, out) if isinstance(out, int) else out
            m = pool_matrix(shape, out)  # type: ignore[arg-type]
            a, c, shape = m.dot(a), m.dot(c), (shape[0], *out)
        elif isinstance(layer, nn.Linear):
            m = np.array([[Fraction(float(v)) for v in row] for row in layer.weight.detach()],
                         dtype=object)
            bias = np.array([Fraction(float(v)) for v in layer.bias.detach()], dtype=object)
            a, c, shape = m.dot(a), m.dot(c) + bias, (layer.out_features,)
        elif isinstance(layer, nn.Flatten):
            shape = (math.prod(shape),)
        elif isinstance(layer, nn.Unflatten):
            shape = tuple(layer.unflattened_size)  # type: ignore[arg-type]
        else:
            raise TypeError(type(layer))
    return a, c


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out", [(1, 1), (2, 3), (3, 2), (5, 4), (7, 6)])
def test_adaptive_pool_forward_and_interval_against_the_exact_map(dtype, out):  # type: ignore[no-untyped-def]
    """The op computes the exact window means up to its stated rounding terms, and its
    rigorous interval contains the exact image of the box (a nonnegative map: the means of
    the ends)."""
    shape = (2, 5, 4)
    op = RULES[AdaptiveAvgPoolOp]
    pool = to_network(nn.Sequential(nn.AdaptiveAvgPool2d(out)), shape).layers[0]
    assert isinstance(pool, AdaptiveAvgPoolOp) and pool.out_shape == (2, *out)
    m = pool_matrix(shape, out)
    gen = torch.Generator().manual_seed(sum(out))
    x = torch.randn(3, *shape, generator=gen, dtype=F64).to(dtype)
    y = op.forward(pool, x)
    k = op.terms(pool)[0]
    for n in range(3):
        xs = [Fraction(float(v)) for v in x[n].flatten()]
        exact = m.dot(np.array(xs, dtype=object))
        reach = np.abs(m).dot(np.array([abs(v) for v in xs], dtype=object))
        for i, value in enumerate(y[n].flatten().tolist()):
            assert abs(Fraction(value) - exact[i]) <= Fraction(gamma(k, dtype)) * reach[i]
    lo, hi = x - 0.25, x + 0.5
    out_lo, out_hi = interval_affine(pool, lo, hi, rigorous=True)
    for n in range(3):
        ex_lo = m.dot(np.array([Fraction(float(v)) for v in lo[n].flatten()], dtype=object))
        ex_hi = m.dot(np.array([Fraction(float(v)) for v in hi[n].flatten()], dtype=object))
        for i in range(ex_lo.shape[0]):
            assert Fraction(float(out_lo[n].flatten()[i])) <= ex_lo[i]
            assert Fraction(float(out_hi[n].flatten()[i])) >= ex_hi[i]


def test_adaptive_pool_backward_is_the_exact_transpose():  # type: ignore[no-untyped-def]
    shape = (2, 5, 4)
    pool = to_network(nn.Sequential(nn.AdaptiveAvgPool2d((3, 3))), shape).layers[0]
    m = pool_matrix(shape, (3, 3))
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    back, const = RULES[AdaptiveAvgPoolOp].backward(pool, rows)
    assert const is None and back.shape == (4, *shape)
    _, lin, _ = RULES[AdaptiveAvgPoolOp].terms(pool)
    for r in range(4):
        a = np.array([Fraction(float(v)) for v in rows[r].flatten()], dtype=object)
        exact = a.dot(m)
        reach = np.abs(a).dot(np.abs(m))
        for i, value in enumerate(back[r].flatten().tolist()):
            assert abs(Fraction(value) - exact[i]) <= Fraction(gamma(lin, F64)) * reach[i]


def ball_end(x: float, eps: Fraction, sign: int) -> Fraction:
    return min(max(Fraction(x) + sign * eps, Fraction(0)), Fraction(1))


def inside_float(v: Fraction, x: float, dtype: torch.dtype) -> float:
    """The float of `dtype` nearest to `v` that still lies in the ball (rounded toward x)."""
    t = torch.tensor(float(v), dtype=F64).to(dtype)
    back = Fraction(float(t))
    if (back > v and v < Fraction(x)) or (back < v and v > Fraction(x)):
        t = torch.nextafter(t, torch.tensor(x, dtype=dtype))
    return float(t)


def linear_net(seed: int, kind: int, dtype: torch.dtype) -> tuple[nn.Sequential, tuple[int, ...]]:
    if kind == 0:
        layers = [Normalize([0.45], [0.3]), nn.Conv2d(1, 3, 2), nn.AdaptiveAvgPool2d((2, 1)),
                  nn.Flatten(), nn.Linear(6, 3)]
    else:
        layers = [nn.Flatten(), nn.Linear(16, 18), nn.Unflatten(1, (2, 3, 3)),
                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return model.to(dtype).eval(), (1, 4, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [0, 1])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_linear_pooling_nets_certified_worst_corner_exact_and_in_dtype(kind, dtype, seed):  # type: ignore[no-untyped-def]
    """Linear networks through the new ops, where every method is exact: at every certified
    radius the worst corner of the ball has an exact margin > 0, and its nearest float point
    in the ball is classified correctly by the model in its own dtype."""
    model, shape = linear_net(seed, kind, dtype)
    a, c = exact_map(model, shape)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(6, *shape, generator=g, dtype=F64).to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    checked = 0
    for method in FAST:
        radii = certified_radii(model, x, y, method, eps_max=0.5, tol=1e-9).certified_eps
        for n in range(6):
            eps = Fraction(float(radii[n]))
            if eps <= 0:
                continue
            label = int(y[n])
            xs = x[n].flatten().tolist()
            for j in range(c.shape[0]):
                if j == label:
                    continue
                diff = a[label] - a[j]
                corner = [ball_end(xi, eps, -1 if di > 0 else 1) for xi, di in zip(xs, diff,
                                                                                     strict=True)]
                margin = sum((di * ci for di, ci in zip(diff, corner, strict=True)),
                             start=c[label] - c[j])
                assert margin > 0, (method, n, j)
                point = torch.tensor([inside_float(v, xi, dtype) for v, xi in zip(corner, xs,
                                                                                   strict=True)],
                                     dtype=dtype).reshape(1, *shape)
                with torch.no_grad():
                    logits = model(point)[0]
                assert int(logits.argmax()) == label, (method, n, j)
                checked += 1
    assert checked > 0


# --- configurations and errors -----------------------------------------------------------------


def test_reshape_conversions():  # type: ignore[no-untyped-def]
    net = to_network(nn.Sequential(nn.Flatten(2), nn.Unflatten(2, (3, -1)), nn.Flatten(1, 2),
                                   nn.Flatten(-2)), (2, 3, 4))
    assert [op.out_shape for op in net.layers] == [(2, 12), (2, 3, 4), (6, 4), (24,)]
    x = torch.rand(5, 2, 3, 4)
    assert torch.equal(net(x), x.reshape(5, -1))


@pytest.mark.parametrize("layer, shape, error, match", [
    (nn.Flatten(0), (1, 4, 4), UnsupportedLayerError, "start_dim=0"),
    (nn.Unflatten(0, (1, 2)), (2, 4), UnsupportedLayerError, "dim=0"),
    (nn.Unflatten(1, (3, 3)), (8,), SpecError, r"cannot unflatten 8 values into \(3, 3\)"),
    (nn.AdaptiveAvgPool2d(2), (8,), SpecError, r"expects \(C, H, W\) inputs"),
])
def test_bad_configurations_are_one_line(layer, shape, error, match):  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match) as info:
        to_network(nn.Sequential(layer), shape)
    assert "\n" not in str(info.value)
