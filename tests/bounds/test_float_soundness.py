"""Floating-point soundness: a proof holds in exact arithmetic and for the model as it runs.

Linear networks are the sharpest test: every method is exact on them, so the radius search
converges onto the true radius and only rounding decides. Everything here is checked against
exact rational arithmetic (``fractions.Fraction`` of the weights *as stored*) and against the
model's own forward pass in its dtype -- no tolerance anywhere.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import compute_bounds, get_method, layers, margin_bounds
from certify.nets import Normalize
from certify.radius import certified_radii
from certify.spec import margin_spec

F64 = torch.float64
FAST_METHODS = ("ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown")
SEARCH_METHODS = ("ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown")


# --- exact rational arithmetic on linear networks -----------------------------------------------


def _frac(t: torch.Tensor) -> list:
    """Nested lists of exact Fractions of a tensor's stored values."""
    if t.ndim == 0:
        return Fraction(float(t))  # type: ignore[return-value]
    return [_frac(s) for s in t]


def _apply_exact(model: nn.Sequential, x: list[Fraction], shape: tuple[int, ...]
                 ) -> list[Fraction]:
    """The model's function in exact arithmetic on a flat input `x` of `shape` (linear
    layers only: Normalize, Conv2d, Flatten, Linear)."""
    cur: list = x
    cur_shape = shape
    for layer in model:
        if isinstance(layer, Normalize):
            mean, std = _frac(layer.mean.flatten()), _frac(layer.std.flatten())
            c, h, w = cur_shape
            cur = [(cur[(k * h + i) * w + j] - mean[k]) / std[k]
                   for k in range(c) for i in range(h) for j in range(w)]
        elif isinstance(layer, nn.Conv2d):
            weight = _frac(layer.weight.detach())
            bias = _frac(layer.bias.detach()) if layer.bias is not None else None
            c, h, w = cur_shape
            co, _, kh, kw = layer.weight.shape
            (sh, sw), (ph, pw) = layer.stride, layer.padding
            oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            out = []
            for o in range(co):
                for i in range(oh):
                    for j in range(ow):
                        acc = bias[o] if bias is not None else Fraction(0)
                        for k in range(c):
                            for a in range(kh):
                                for b in range(kw):
                                    ii, jj = i * sh - ph + a, j * sw - pw + b
                                    if 0 <= ii < h and 0 <= jj < w:
                                        acc += weight[o][k][a][b] * cur[(k * h + ii) * w + jj]
                        out.append(acc)
            cur, cur_shape = out, (co, oh, ow)
        elif isinstance(layer, nn.Flatten):
            cur_shape = (math.prod(cur_shape),)
        elif isinstance(layer, nn.Linear):
            weight = _frac(layer.weight.detach())
            bias = _frac(layer.bias.detach())
            cur = [sum((wi * xi for wi, xi in zip(row, cur, strict=True)), start=b)
                   for row, b in zip(weight, bias, strict=True)]
            cur_shape = (len(cur),)
        else:
            raise TypeError(type(layer))
    return cur


def _exact_linear_map(model: nn.Sequential, shape: tuple[int, ...]
                      ) -> tuple[list[list[Fraction]], list[Fraction]]:
    """``(A, c)`` with ``model(x) = A x + c`` exactly (rows: outputs)."""
    d = math.prod(shape)
    zero = [Fraction(0)] * d
    c = _apply_exact(model, zero, shape)
    cols = []
    for i in range(d):
        e = list(zero)
        e[i] = Fraction(1)
        out = _apply_exact(model, e, shape)
        cols.append([o - ci for o, ci in zip(out, c, strict=True)])
    a = [[cols[i][k] for i in range(d)] for k in range(len(c))]
    return a, c


def _ball_end(x: float, eps: Fraction, sign: int) -> Fraction:
    """The end of ``clip(x ± eps, 0, 1)`` in direction `sign`, exactly."""
    v = Fraction(x) + sign * eps
    return min(max(v, Fraction(0)), Fraction(1))


def _inside_float(v: Fraction, x: float, dtype: torch.dtype) -> float:
    """The float of `dtype` nearest to the exact point `v` that still lies in the ball: `v`
    rounded toward the center `x` (the model only ever sees floats of its dtype)."""
    t = torch.tensor(float(v), dtype=F64).to(dtype)
    back = Fraction(float(t))
    if (back > v and v < Fraction(x)) or (back < v and v > Fraction(x)):
        t = torch.nextafter(t, torch.tensor(x, dtype=dtype))
    return float(t)


def _check_certified_linear(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                            radii: torch.Tensor, dtype: torch.dtype) -> int:
    """For every certified sample and every other class: the worst corner of the ball has an
    exact margin > 0, and its nearest in-ball float point is classified correctly by the
    model in its dtype. Returns the number of (sample, class) pairs checked."""
    shape = tuple(x.shape[1:])
    a, c = _exact_linear_map(model, shape)
    checked = 0
    for n in range(x.shape[0]):
        eps = Fraction(float(radii[n]))
        if eps <= 0:
            continue
        label = int(y[n])
        xs = x[n].flatten().tolist()
        for j in range(len(c)):
            if j == label:
                continue
            diff = [ay - aj for ay, aj in zip(a[label], a[j], strict=True)]
            corner = [_ball_end(xi, eps, -1 if di > 0 else 1) for xi, di in zip(xs, diff,
                                                                                 strict=True)]
            margin = sum((di * ci for di, ci in zip(diff, corner, strict=True)),
                         start=c[label] - c[j])
            assert margin > 0, (n, j, float(eps), float(margin))
            point = torch.tensor([_inside_float(v, xi, dtype) for v, xi in zip(corner, xs,
                                                                               strict=True)],
                                 dtype=dtype).reshape(1, *shape)
            with torch.no_grad():
                logits = model(point)[0]
            assert int(logits.argmax()) == label and bool(logits[label] > logits[j]), \
                (n, j, float(eps), logits.tolist())
            checked += 1
    return checked


def _linear_model(seed: int, kind: str, dtype: torch.dtype) -> tuple[nn.Sequential, tuple]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        shape: tuple[int, ...] = (1, 3, 3)
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(9, 4)]
    elif kind == "norm-mlp":
        shape = (1, 3, 3)
        layers = [Normalize([0.3], [0.35]), nn.Flatten(), nn.Linear(9, 4)]
    else:  # a conv layer, then a linear one
        shape = (1, 4, 4)
        layers = [Normalize([0.45], [0.3]), nn.Conv2d(1, 2, 3, stride=1, padding=1),
                  nn.Flatten(), nn.Linear(32, 3)]
    model = nn.Sequential(*layers).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(dtype))
    return model, shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mlp", "norm-mlp", "conv"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_linear_nets_certified_worst_corner_exact_and_in_dtype(kind, dtype, seed):  # type: ignore[no-untyped-def]
    model, shape = _linear_model(seed, kind, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(12, *shape, generator=g, dtype=F64).to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    checked = 0
    for method in SEARCH_METHODS:
        res = certified_radii(model, x, y, method, eps_max=0.5, tol=1e-9)
        checked += _check_certified_linear(model, x, y, res.certified_eps, dtype)
    assert checked > 0  # the search certified something to check


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_linear_conv_nets_in_the_fold_transposes_worst_corner_exact(dtype, seed):  # type: ignore[no-untyped-def]
    """The conv net with every transpose in a fold form of ``certify.bounds.layers`` (no dense
    matrices, the forms' shape limits lifted): the steering bound's batched product in
    float32, the rigorous bound's single product in float64 (the float32 chain's float64 tail
    too). The worst corner of every certified ball, exact and in dtype."""
    model, shape = _linear_model(seed, "conv", dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(12, *shape, generator=g, dtype=F64).to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    fold = layers._fold_backward
    used: list[torch.dtype] = []

    def counted(op, a, padded):  # type: ignore[no-untyped-def]
        out = fold(op, a, padded)
        if out is not None:
            used.append(a.dtype)
        return out

    checked = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layers, "DENSE_MAX_ENTRIES", 0)
        patch.setattr(layers, "GEMM_MIN_CHANNELS", 1)
        patch.setattr(layers, "GEMM_MAX_WINDOW", 10**6)
        patch.setattr(layers, "_fold_backward", counted)
        for method in ("crown", "alpha-crown"):
            res = certified_radii(model, x, y, method, eps_max=0.5, tol=1e-9)
            checked += _check_certified_linear(model, x, y, res.certified_eps, dtype)
    assert checked > 0
    assert F64 in used and (dtype == F64 or torch.float32 in used)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mlp", "norm-mlp", "conv"])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_bab_radii_on_linear_nets_worst_corner_exact_and_in_dtype(kind, dtype, seed):  # type: ignore[no-untyped-def]
    """bab's radius search (its steps restart from each other's split trees, under thresholds
    raised by the model's rounding over each box): the worst corner of every certified ball,
    in exact rationals and by the model in its dtype. Small budgets: past the radius a linear
    net's input splits never end."""
    model, shape = _linear_model(seed, kind, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(12, *shape, generator=g, dtype=F64).to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    res = certified_radii(model, x, y, "bab", eps_max=0.5, tol=1e-9, time_limit=0.2,
                          max_domains=200)
    assert _check_certified_linear(model, x, y, res.certified_eps, dtype) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", FAST_METHODS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**20), kind=st.sampled_from(["mlp", "norm-mlp", "conv"]),
       eps=st.sampled_from([0.0, 1e-7, 1e-3, 0.05, 0.3]))
def test_linear_net_bounds_contain_the_exact_range(method, dtype, seed, kind, eps):  # type: ignore[no-untyped-def]
    _check_exact_range(method, dtype, seed, kind, eps)


@pytest.mark.solver
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["lp", "milp"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**20), kind=st.sampled_from(["mlp", "norm-mlp"]),
       eps=st.sampled_from([0.0, 1e-7, 1e-3, 0.05]))
def test_solver_bounds_contain_the_exact_range(method, dtype, seed, kind, eps):  # type: ignore[no-untyped-def]
    _check_exact_range(method, dtype, seed, kind, eps)


def _check_exact_range(method, dtype, seed, kind, eps):  # type: ignore[no-untyped-def]
    """compute_bounds on a linear net: lower <= the exact rational minimum of every spec row
    over the box, upper >= the maximum; and margin_bounds' lower bound is below the exact
    minimal margin *and* below every margin the model computes in its dtype at the corner."""
    model, shape = _linear_model(seed, kind, dtype)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.rand(3, *shape, generator=g, dtype=F64).to(dtype)
    a, c = _exact_linear_map(model, shape)
    k = len(c)
    y = torch.randint(0, k, (3,), generator=g)
    b = margin_bounds(model, x, y, eps, method)
    spec = margin_spec(y, k).to(dtype)
    e = Fraction(eps)  # the ball asked for, exactly
    for n in range(3):
        xs = x[n].flatten().tolist()
        for r in range(k - 1):
            row = [Fraction(float(v)) for v in spec[n, r]]
            w = [sum((row[o] * a[o][i] for o in range(k)), start=Fraction(0))
                 for i in range(len(xs))]
            const = sum((row[o] * c[o] for o in range(k)), start=Fraction(0))
            corner = [_ball_end(xi, e, -1 if wi > 0 else 1) for xi, wi in zip(xs, w,
                                                                              strict=True)]
            exact_min = sum((wi * ci for wi, ci in zip(w, corner, strict=True)), start=const)
            assert Fraction(float(b.lower[n, r])) <= exact_min, (n, r)
            point = torch.tensor([_inside_float(v, xi, dtype) for v, xi in zip(corner, xs,
                                                                               strict=True)],
                                 dtype=dtype).reshape(1, *shape)
            with torch.no_grad():
                out = model(point)[0]
            computed = Fraction(float(out[int(y[n])])) - Fraction(float(
                out[[j for j in range(k) if j != int(y[n])][r]]))
            assert Fraction(float(b.lower[n, r])) <= computed, (n, r)


@pytest.mark.parametrize("method", FAST_METHODS)
def test_rigorous_bounds_only_loosen(method, tiny_cnn):  # type: ignore[no-untyped-def]
    """Rounding is never decided in the certifier's favour: the rigorous bound is below the
    plain floating-point one (same method, same box) everywhere, in both dtypes."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, F64):
        x = torch.rand(4, 1, 8, 8, generator=g, dtype=F64).to(dtype)
        spec = torch.randn(4, 3, 10, generator=g, dtype=F64).to(dtype)
        lo, hi = (x - 0.02).clamp(0, 1), (x + 0.02).clamp(0, 1)
        fast = compute_bounds(tiny_cnn, lo, hi, get_method(method, rigorous=False), spec)
        rig = compute_bounds(tiny_cnn, lo, hi, get_method(method), spec)
        own = compute_bounds(tiny_cnn, lo, hi, get_method(method), spec, model_rounding=True)
        assert (rig.lower <= fast.lower).all() and (rig.upper >= fast.upper).all()
        # alpha-crown optimizes its slopes for each bound separately: the model's rounding
        # (a few ulps here) can steer the optimizer to slopes a few ulps better, so its two
        # rigorous bounds are compared up to that (each is held to exact values elsewhere)
        slack = 1e-5 * (1 + rig.lower.abs()) if method == "alpha-crown" else 0.0
        assert (own.lower <= rig.lower + slack).all()
        slack = 1e-5 * (1 + rig.upper.abs()) if method == "alpha-crown" else 0.0
        assert (own.upper >= rig.upper - slack).all()


def _train_linear_digits(seed: int = 0) -> nn.Sequential:
    from certify.data import load_dataset

    x, y = load_dataset("digits", "train").take(slice(None))
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize([0.3052], [0.376]), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_regression_linear_digits_tol_1e9(method):  # type: ignore[no-untyped-def]
    """The reported failure: a linear digits classifier, its 450 test points, tol 1e-9. The
    search converges onto the true radius; before, float32 rounding of the last bound certified
    radii at which the worst corner is misclassified (margin <= 0 exactly, and in float32)."""
    from certify.data import load_dataset

    model = _train_linear_digits()
    x, y = load_dataset("digits", "test").take(slice(None))
    res = certified_radii(model, x, y, method, eps_max=0.5, tol=1e-9)
    assert int((res.certified_eps > 0).sum()) > 400
    assert _check_certified_linear(model, x, y, res.certified_eps, torch.float32) > 3600


def test_regression_linear_digits_through_onnx_and_the_cli(tmp_path):  # type: ignore[no-untyped-def]
    """The same failure through the command line on the ONNX export of the model."""
    import csv
    import subprocess
    import sys

    from certify.data import load_dataset

    model = _train_linear_digits()
    path = tmp_path / "linear.onnx"
    torch.onnx.export(model, (torch.rand(1, 1, 8, 8),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"])
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "certify", "area", str(path), "--dataset", "digits", "--n", "450",
         "--method", "crown", "--tol", "1e-6", "-o", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x, y = load_dataset("digits", "test").take(slice(None))
    radii = torch.zeros(len(y), dtype=F64)
    for r in rows:
        radii[int(r["index"])] = float(r["certified_eps"])
    assert int((radii > 0).sum()) > 400
    assert _check_certified_linear(model, x, y, radii, torch.float32) > 3600


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**20), widths=st.sampled_from([[8], [6, 5], [10, 6, 4]]))
def test_relu_nets_pgd_and_corners_find_nothing_at_the_certified_eps(seed, widths):  # type: ignore[no-untyped-def]
    """Piecewise-linear nets (float32): at each certified eps, PGD on the float64 copy of the
    model and random corners of the ball evaluated by the model itself find no point whose
    prediction changes."""
    import copy

    from certify.attacks import pgd
    from certify.spec import LinfBall

    torch.manual_seed(seed)
    layers: list[nn.Module] = [Normalize([0.4], [0.3]), nn.Flatten()]
    width = 16
    for w in widths:
        layers += [nn.Linear(width, w), nn.ReLU()]
        width = w
    layers.append(nn.Linear(width, 3))
    model = nn.Sequential(*layers).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    model64 = copy.deepcopy(model).double()
    for method in ("ibp", "crown", "alpha-crown"):
        res = certified_radii(model, x, y, method, eps_max=0.5, tol=1e-7)
        ok = res.certified_eps > 0
        if not ok.any():
            continue
        xs, ys, eps = x[ok], y[ok], res.certified_eps[ok]
        attack = pgd(model64, (xs.double(), eps), ys, steps=50, restarts=3,
                     generator=torch.Generator().manual_seed(seed))
        assert not attack.success.any(), method
        corners = LinfBall(xs, eps.to(torch.float32)).sample(200, corners=True,
                                                             generator=g)
        # the box of the float32 ball is rounded outward: keep the points inside the exact one
        inside = ((corners.double() - xs.double()).abs() <= eps.view(1, -1, 1, 1, 1)).all(
            dim=(2, 3, 4))
        with torch.no_grad():
            pred = model(corners.reshape(-1, 1, 4, 4)).argmax(1).reshape(200, -1)
        assert (pred[inside] == ys.expand(200, -1)[inside]).all(), method
