"""LeakyReLU, Sigmoid and Tanh: soundness of every method, orderings that are theorems, and
the relaxations checked against high-precision references.

References are independent of the engine: lines and constants are compared in exact rational
arithmetic (``fractions.Fraction`` of the stored floats) against ``decimal`` evaluations of
sigmoid and tanh at 60 significant digits (``Decimal.exp`` is correctly rounded), whose error
(below ``1e-55`` relative) is taken off in the engine's favour never; LeakyReLU is piecewise
linear, so its references are exact.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
import torch
from bound_helpers import (
    F64,
    all_points,
    assert_alpha_crown_never_looser,
    assert_sound,
    init_weights,
    make_box,
    random_spec,
    tol,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import compute_bounds, get_method, list_methods, margin_bounds, to_network
from certify.bounds.layers import LeakyReluOp, SigmoidOp, TanhOp
from certify.bounds.relaxations import (
    SIGMOID,
    TANH,
    activation_rule,
    evaluation_error,
    relax,
    relu_constant,
    s_lines,
    s_tangents,
)
from certify.errors import UnsupportedLayerError
from certify.nets import Normalize
from certify.nets.layers import Permute, Reshape

DTYPES = [torch.float32, torch.float64]
# branch and bound (complete, budgeted) has its own tests: tests/bounds/test_bab.py
FAST = list_methods(uses_solver=False, external=False, is_complete=False)
DIGITS = 60


# --- high-precision references -----------------------------------------------------------------


def d_sigmoid(x: float) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = DIGITS
        return 1 / (1 + (-Decimal(x)).exp())


def d_tanh(x: float) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = DIGITS
        d = Decimal(x)
        if abs(x) < 1e-12:  # the series: no cancellation; the next term is below x^5
            return d - d**3 / 3 + 2 * d**5 / 15
        e = (2 * d).exp()
        return (e - 1) / (e + 1)


REFERENCE = {"Sigmoid": d_sigmoid, "Tanh": d_tanh}
SHAPES = {"Sigmoid": SIGMOID, "Tanh": TANH}
OPS = {"Sigmoid": SigmoidOp, "Tanh": TanhOp}


def exact_value(name: str, x: float) -> tuple[Fraction, Fraction]:
    """An interval of rationals containing ``f(x)`` exactly: the decimal value +- 1e-55
    relative, within f's range (sigmoid in (0, 1), tanh in (-1, 1))."""
    v = Fraction(REFERENCE[name](x))
    slack = abs(v) / 10**55
    low = Fraction(0) if name == "Sigmoid" else Fraction(-1)
    return max(v - slack, low), min(v + slack, Fraction(1))


def frac(t: torch.Tensor | float) -> Fraction:
    return Fraction(float(t))


# --- generated networks ------------------------------------------------------------------------


def activation(kind: str, gen: torch.Generator) -> nn.Module:
    if kind == "leaky":
        slopes = [0.0, 0.01, 0.1, 0.37, 1.0]
        return nn.LeakyReLU(slopes[int(torch.randint(len(slopes), (1,), generator=gen))])
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[kind]()


def init(model: nn.Module, gen: torch.Generator, gain: float) -> nn.Sequential:
    """Fan-in scaled weights times `gain` (large gains saturate S-shapes), biases of scale 0.5."""
    return init_weights(model, gen, gain, bias_scale=0.5)


def act_mlp(seed: int, widths: list[int], kinds: list[str], *, in_shape=(1, 3, 3),  # type: ignore[no-untyped-def]
            classes: int = 3, gain: float = 2.0) -> nn.Sequential:
    """Normalize, Flatten, [Linear, activation]*, Linear; large gains saturate S-shapes."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [Normalize([0.4] * in_shape[0], [0.3] * in_shape[0]), nn.Flatten()]
    d = math.prod(in_shape)
    for i, w in enumerate(widths):
        layers += [nn.Linear(d, w), activation(kinds[i % len(kinds)], gen)]
        d = w
    layers.append(nn.Linear(d, classes))
    return init(nn.Sequential(*layers), gen, gain)  # type: ignore[return-value]


def act_cnn(seed: int, kinds: list[str], variant: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Convolutions with the activations, pooling, and (variant 1) a Flatten in the middle."""
    gen = torch.Generator().manual_seed(seed)
    a = [activation(kinds[i % len(kinds)], gen) for i in range(3)]
    if variant == 0:
        layers = [Normalize([0.5, 0.4], [0.3, 0.2]), nn.Conv2d(2, 3, 3, padding=1), a[0],
                  nn.Conv2d(3, 4, 3, stride=2), a[1], nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
                  nn.Linear(16, 5), a[2], nn.Linear(5, 4)]
    else:
        layers = [Normalize([0.5, 0.4], [0.3, 0.2]), nn.Conv2d(2, 2, 3), a[0], nn.Flatten(),
                  nn.Linear(50, 18), a[1], nn.Unflatten(1, (2, 3, 3)), nn.Conv2d(2, 3, 2), a[2],
                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)]
    return init(nn.Sequential(*layers), gen, 2.0), (2, 7, 7)  # type: ignore[return-value]


KIND_LISTS = st.lists(st.sampled_from(["leaky", "sigmoid", "tanh", "relu"]), min_size=1,
                      max_size=3)


def assert_model_outputs_covered(model: nn.Module, x_lo: torch.Tensor, x_hi: torch.Tensor,
                                 x: torch.Tensor, method: str) -> None:
    """`method`'s output bounds with ``model_rounding`` contain the model's own outputs (in its
    dtype, its kernels included) at :func:`all_points` of the box, with no tolerance at all."""
    bounds = compute_bounds(model, x_lo, x_hi, method, model_rounding=True)
    n, k = bounds.lower.shape
    eye = torch.eye(k, dtype=x.dtype).expand(n, k, k)
    points = all_points(model, x_lo, x_hi, eye, x)
    with torch.no_grad():
        out = model(points.reshape(-1, *x.shape[1:])).reshape(points.shape[0], n, k)
    assert (out >= bounds.lower).all() and (out <= bounds.upper).all(), method


# --- soundness of every method -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**20), widths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       kinds=KIND_LISTS, eps_max=st.sampled_from([0.02, 0.1, 0.4]))
def test_generated_mlp_sound(method, dtype, seed, widths, kinds, eps_max):  # type: ignore[no-untyped-def]
    model = act_mlp(seed, widths, kinds)
    x_lo, x_hi, x = make_box(seed, 3, (1, 3, 3), eps_max, dtype)
    assert_sound(model, x_lo, x_hi, x, random_spec(seed, 3, 2, 3, dtype), method, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), kinds=KIND_LISTS, variant=st.integers(0, 1),
       eps_max=st.sampled_from([0.03, 0.2]))
def test_generated_cnn_sound(method, dtype, seed, kinds, variant, eps_max):  # type: ignore[no-untyped-def]
    model, in_shape = act_cnn(seed, kinds, variant)
    x_lo, x_hi, x = make_box(seed, 3, in_shape, eps_max, dtype)
    assert_sound(model, x_lo, x_hi, x, random_spec(seed, 3, 3, 4, dtype), method, dtype)


def mixed_cnn(seed: int, kinds: list[str]) -> nn.Sequential:
    """The activations next to MaxPool2d, permutations and every kind of reshape: an NHWC
    input permuted to NCHW, MaxPool between two activations, a partial Flatten and certify's
    Reshape back, adaptive pooling. Input `(7, 7, 2)`."""
    gen = torch.Generator().manual_seed(seed)
    a = [activation(kinds[i % len(kinds)], gen) for i in range(3)]
    layers = [Permute((2, 0, 1)), Normalize([0.5, 0.4], [0.3, 0.2]),
              nn.Conv2d(2, 3, 3, padding=1), a[0], nn.MaxPool2d(3, 2, 1), a[1],
              nn.Flatten(2), Reshape((3, 4, 4)), nn.Conv2d(3, 3, 2), a[2],
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)]
    return init(nn.Sequential(*layers), gen, 2.0)  # type: ignore[return-value]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**20), kinds=KIND_LISTS, eps=st.sampled_from([0.0, 0.03, 0.2]))
def test_with_maxpool_and_permutes_sound(method, dtype, seed, kinds, eps):  # type: ignore[no-untyped-def]
    """Every method on :func:`mixed_cnn`: the exact network's outputs at sampled, corner and
    PGD points, and (``model_rounding``) the model's own outputs with no tolerance."""
    model = mixed_cnn(seed, kinds).to(dtype)
    x_lo, x_hi, x = make_box(seed, 3, (7, 7, 2), max(eps, 1e-9), dtype)
    spec = random_spec(seed, 3, 3, 4, dtype)
    assert_sound(model, x_lo, x_hi, x, spec, method, dtype)
    assert_model_outputs_covered(model, x_lo, x_hi, x, method)


@pytest.mark.parametrize("mode", ["backward", "forward"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), kinds=KIND_LISTS, variant=st.integers(0, 1))
def test_intermediate_modes_sound(mode, seed, kinds, variant):  # type: ignore[no-untyped-def]
    model, in_shape = act_cnn(seed, kinds, variant)
    x_lo, x_hi, x = make_box(seed, 3, in_shape, 0.1, F64)
    spec = random_spec(seed, 3, 3, 4, F64)
    for method in ("crown", "wong-kolter", "alpha-crown"):  # forward mode: plain bounds only
        assert_sound(model, x_lo, x_hi, x, spec, method, F64, intermediate_mode=mode,
                     rigorous=mode != "forward")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), kinds=KIND_LISTS, eps=st.sampled_from([0.0, 0.01, 0.1]))
def test_model_as_it_runs_is_covered_without_tolerance(method, dtype, seed, kinds, eps):  # type: ignore[no-untyped-def]
    """With ``model_rounding`` the bounds hold for the model's own outputs in its dtype, the
    activations' kernels included: compared with no tolerance at all."""
    model = act_mlp(seed, [6, 5], kinds, gain=3.0).to(dtype)
    x_lo, x_hi, x = make_box(seed, 3, (1, 3, 3), max(eps, 1e-9), dtype)
    assert_model_outputs_covered(model, x_lo, x_hi, x, method)


@pytest.mark.solver
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**20), kinds=KIND_LISTS, widths=st.lists(st.integers(1, 5),
                                                                      min_size=1, max_size=2))
def test_lp_sound(dtype, seed, kinds, widths):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    model = act_mlp(seed, widths, kinds, in_shape=(1, 2, 2))
    x_lo, x_hi, x = make_box(seed, 2, (1, 2, 2), 0.3, dtype)
    assert_sound(model, x_lo, x_hi, x, random_spec(seed, 2, 2, 3, dtype), "lp", dtype)


@pytest.mark.solver
@pytest.mark.parametrize("dtype", DTYPES)
def test_milp_sound_on_leaky_relu(dtype):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    model = act_mlp(5, [4, 3], ["leaky"], in_shape=(1, 2, 2))
    x_lo, x_hi, x = make_box(5, 2, (1, 2, 2), 0.3, dtype)
    assert_sound(model, x_lo, x_hi, x, random_spec(5, 2, 2, 3, dtype), "milp", dtype)


# --- orderings that are theorems (same intermediate bounds) ------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**20), kinds=KIND_LISTS, cnn=st.booleans(),
       eps=st.sampled_from([0.05, 0.3]))
def test_alpha_crown_never_looser_than_crown(seed, kinds, cnn, eps):  # type: ignore[no-untyped-def]
    if cnn:
        model, in_shape = act_cnn(seed, kinds, seed % 2)
    else:
        model, in_shape = act_mlp(seed, [6, 5], kinds, classes=4), (1, 3, 3)
    assert_alpha_crown_never_looser(model, in_shape, seed, eps, classes=4, steps=6)


@pytest.mark.parametrize("kind", ["leaky", "tanh", "sigmoid"])
def test_alpha_crown_improves_somewhere(kind):  # type: ignore[no-untyped-def]
    """Not a theorem: optimizing slopes (LeakyReLU) and tangent points (S-shapes) must help
    on a net with loose neurons."""
    model = act_mlp(3, [12, 12], [kind], classes=4, in_shape=(1, 4, 4)).double()
    x_lo, x_hi, _ = make_box(3, 4, (1, 4, 4), 0.3, F64)
    spec = random_spec(3, 4, 3, 4, F64)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec)
    alpha = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec)
    assert (alpha.lower - crown.lower).max() > 1e-4


@pytest.mark.solver
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), kinds=KIND_LISTS, eps=st.sampled_from([0.1, 0.4]))
# a Tanh saturated on one sample (output box ~6e-9 wide): HiGHS called its LP infeasible
@example(seed=10126, kinds=["leaky", "tanh"], eps=0.1)
def test_lp_is_tighter_than_the_linear_bounds_and_ibp(seed, kinds, eps):  # type: ignore[no-untyped-def]
    """With the same intermediate bounds the LP (which holds CROWN's and Wong-Kolter's lines and
    the activations' output boxes) is at least as tight as CROWN, Wong-Kolter and IBP."""
    pytest.importorskip("cvxpy")
    model = act_mlp(seed, [4, 3], kinds, in_shape=(1, 2, 2)).double()
    x_lo, x_hi, _ = make_box(seed, 2, (1, 2, 2), eps, F64)
    spec = random_spec(seed, 2, 2, 3, F64)
    net = to_network(model, (1, 2, 2))
    for inter_method, methods in (("crown", ("crown", "ibp")), ("wong-kolter", ("wong-kolter",))):
        inter = get_method(inter_method).intermediate(net, x_lo, x_hi)
        lp = compute_bounds(net, x_lo, x_hi, "lp", spec, intermediate=inter)
        # up to the accuracy of the solver's dual values (its bound is evaluated at them)
        t = 1e-6 * (1 + lp.lower.abs().max().item())
        for m in methods:
            b = compute_bounds(net, x_lo, x_hi, m, spec, intermediate=inter)
            assert (lp.lower >= b.lower - t).all() and (lp.upper <= b.upper + t).all(), m


@pytest.mark.solver
def test_leaky_relu_milp_is_exact_and_tighter_than_lp():  # type: ignore[no-untyped-def]
    """On a one-input LeakyReLU net the MILP's minimum is the true one (a dense grid of the
    input), and never below the LP's."""
    pytest.importorskip("cvxpy")
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 6), nn.LeakyReLU(0.2), nn.Linear(6, 4),
                          nn.LeakyReLU(0.05), nn.Linear(4, 2))
    model = init(model, gen, 3.0).double()
    x_lo, x_hi = torch.full((1, 1, 1, 1), -0.5, dtype=F64), torch.full((1, 1, 1, 1), 0.8, dtype=F64)
    spec = torch.tensor([[[1.0, -1.0], [-0.3, 1.0]]], dtype=F64)
    net = to_network(model, (1, 1, 1))
    inter = get_method("crown").intermediate(net, x_lo, x_hi)
    milp = compute_bounds(net, x_lo, x_hi, "milp", spec, intermediate=inter, exact_upper=True)
    lp = compute_bounds(net, x_lo, x_hi, "lp", spec, intermediate=inter)
    grid = torch.linspace(-0.5, 0.8, 200001, dtype=F64).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        values = model(grid) @ spec[0].T  # (G, 2)
    true_min, true_max = values.min(0).values, values.max(0).values
    assert (milp.lower[0] <= true_min).all() and (milp.upper[0] >= true_max).all()
    assert (milp.lower[0] >= true_min - 1e-4).all() and (milp.upper[0] <= true_max + 1e-4).all()
    slack = milp.tolerance.to(F64) + 1e-8  # what the MILP subtracted for the solver's tolerance
    assert (milp.lower >= lp.lower - slack).all() and (milp.upper <= lp.upper + slack).all()


def test_leaky_relu_limits_agree_with_relu_and_identity():  # type: ignore[no-untyped-def]
    """LeakyReLU(0) is ReLU and LeakyReLU(1) the identity: their bounds (different code paths:
    the Lagrangian constant over every neuron) agree with ReLU's and with the affine net's."""
    relu = act_mlp(7, [6, 5], ["relu"]).double()
    x_lo, x_hi, _ = make_box(7, 3, (1, 3, 3), 0.2, F64)
    spec = random_spec(7, 3, 2, 3, F64)
    leaky0 = nn.Sequential(*[nn.LeakyReLU(0.0) if isinstance(m, nn.ReLU) else m for m in relu])
    leaky1 = nn.Sequential(*[nn.LeakyReLU(1.0) if isinstance(m, nn.ReLU) else m for m in relu])
    linear = nn.Sequential(*[m for m in relu if not isinstance(m, nn.ReLU)])
    for method in FAST:
        a = compute_bounds(relu, x_lo, x_hi, method, spec)
        b = compute_bounds(leaky0, x_lo, x_hi, method, spec)
        t = tol(a.lower, a.upper)
        assert torch.allclose(a.lower, b.lower, atol=t) and torch.allclose(a.upper, b.upper, atol=t)
        if method != "ibp":  # the linear relaxation of the identity is exact
            c = compute_bounds(leaky1, x_lo, x_hi, method, spec)
            d = compute_bounds(linear, x_lo, x_hi, method, spec)
            assert torch.allclose(c.lower, d.lower, atol=t) and torch.allclose(c.upper, d.upper,
                                                                                 atol=t)


# --- the relaxations against the references ----------------------------------------------------


def intervals(seed: int, n: int) -> list[tuple[float, float]]:
    """Pre-activation intervals of every kind: both signs, on one side, points, tiny and huge
    widths, tails, ends at 0."""
    gen = torch.Generator().manual_seed(seed)
    out = [(-1.0, 1.0), (0.0, 2.0), (-3.0, 0.0), (0.0, 0.0), (-2.5, -2.5), (1e-9, 2e-9),
           (-40.0, -30.0), (30.0, 45.0), (-0.1, 20.0), (-20.0, 0.1), (-700.0, -690.0),
           (-1e-300, 1e-300), (-5.0, 5e-5), (-5e-5, 5.0)]
    for _ in range(n):
        center = float(torch.randn(1, generator=gen)) * [0.5, 3.0, 15.0][int(torch.randint(3, (1,),
                                                                              generator=gen))]
        width = 10 ** float(torch.rand(1, generator=gen) * 9 - 7)
        out.append((center - width * float(torch.rand(1, generator=gen)),
                    center + width * float(torch.rand(1, generator=gen))))
    return out


def grid(l: float, u: float, extra: list[float]) -> list[float]:
    points = [l + (u - l) * i / 40 for i in range(41)] + [l, u] + extra
    if l < 0 < u:
        points.append(0.0)
    return sorted({min(max(p, l), u) for p in points if math.isfinite(p)})


def check_line(name: str, k: float, b: float, l: float, u: float, *, below: bool,
               extra: list[float]) -> None:
    kf, bf = Fraction(k), Fraction(b)
    for z in grid(l, u, extra):
        line = kf * Fraction(z) + bf
        lo, hi = exact_value(name, z)
        if below:
            assert line <= lo, (name, l, u, z, k, b, float(lo - line))
        else:
            assert line >= hi, (name, l, u, z, k, b, float(line - hi))


@pytest.mark.parametrize("name", ["Sigmoid", "Tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["adaptive", "parallel"])
def test_engine_lines_bound_the_function_exactly(name, dtype, rule):  # type: ignore[no-untyped-def]
    """Every line the engine uses (slopes rounded to the dtype, intercepts certified and cast
    outward) lies below/above f at the ends and on a grid of [l, u], in exact arithmetic."""
    pairs = intervals(1, 60)
    lo = torch.tensor([p[0] for p in pairs], dtype=F64).to(dtype)
    hi = torch.tensor([p[1] for p in pairs], dtype=F64).to(dtype)
    hi = torch.maximum(lo, hi)
    rel = activation_rule(OPS[name]((len(pairs),), (len(pairs),))).relax(lo[None], hi[None], rule)
    for j in range(len(pairs)):
        l, u = float(lo[j]), float(hi[j])
        anchors = [float(rel.params[0, i, j]) for i in range(4)]
        check_line(name, float(rel.lower[0, j]), float(rel.lower_bias[0, j]), l, u, below=True,
                   extra=anchors)
        check_line(name, float(rel.upper[0, j]), float(rel.upper_bias[0, j]), l, u, below=False,
                   extra=anchors)


@pytest.mark.parametrize("name", ["Sigmoid", "Tanh"])
@settings(max_examples=60, deadline=None)
@given(center=st.floats(-60, 60), width=st.floats(0, 80), split=st.floats(0, 1),
       rule=st.sampled_from(["adaptive", "parallel"]))
def test_lp_lines_bound_the_function_exactly(name, center, width, split, rule):  # type: ignore[no-untyped-def]
    l, u = center - width * split, center + width * (1 - split)
    lt, ut = torch.tensor([l], dtype=F64), torch.tensor([u], dtype=F64)
    lines = [s_lines(SHAPES[name], lt, ut, rule), *s_tangents(SHAPES[name], lt, ut, 3)]
    for k_lo, b_lo, k_up, b_up in lines:
        check_line(name, float(k_lo), float(b_lo), l, u, below=True, extra=[])
        check_line(name, float(k_up), float(b_up), l, u, below=False, extra=[])


@pytest.mark.parametrize("name", ["Sigmoid", "Tanh"])
def test_tangent_ranges_of_alpha_crown_are_valid(name):  # type: ignore[no-untyped-def]
    """The tangent points alpha-CROWN may move to give valid lines (its inner loop uses exact
    tangents; the final bound does not trust them, but they should be right): the tangent at
    each end and the middle of the range, in decimal arithmetic, up to the bisection's
    precision."""
    pairs = [p for p in intervals(2, 40) if p[1] - p[0] > 1e-6 and max(map(abs, p)) < 100]
    lo = torch.tensor([[p[0] for p in pairs]], dtype=F64)
    hi = torch.tensor([[p[1] for p in pairs]], dtype=F64)
    rel = activation_rule(OPS[name]((len(pairs),), (len(pairs),))).relax(lo, hi, "adaptive")
    ref = REFERENCE[name]
    checked = 0
    with localcontext() as ctx:
        ctx.prec = DIGITS
        for j, (l, u) in enumerate(pairs):
            for which, below in ((0, True), (1, False)):
                r_lo = float(rel.params[0, 2 * which, j])
                r_hi = float(rel.params[0, 2 * which + 1, j])
                if not r_lo < r_hi:
                    continue  # a fixed line (a chord): no tangent points to choose
                checked += 1
                for d in (r_lo, (r_lo + r_hi) / 2, r_hi):
                    fd = ref(d)
                    slope = fd * (1 - fd) if name == "Sigmoid" else 1 - fd * fd
                    for z in grid(l, u, []):
                        gap = ref(z) - (fd + slope * (Decimal(z) - Decimal(d)))
                        assert (gap >= Decimal(-1e-9)) if below else (gap <= Decimal(1e-9)), \
                            (name, l, u, which, d, z, float(gap))
    assert checked > len(pairs) // 2


@pytest.mark.parametrize("name", ["Sigmoid", "Tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_kernels_meet_the_assumed_accuracy(name, dtype):  # type: ignore[no-untyped-def]
    """The evaluation error the engine assumes (EVAL_ULPS) holds for torch's kernels here, on a
    dense grid from the far tails to tiny arguments."""
    xs = torch.cat([torch.linspace(-30, 30, 3001, dtype=F64), torch.linspace(-750, 750, 601,
                                                                              dtype=F64),
                    torch.logspace(-40, 1, 300, dtype=F64), -torch.logspace(-40, 1, 300,
                                                                           dtype=F64),
                    torch.tensor([0.0, -88.7, -103.9, -87.3, -709.5, -745.2, 19.1, 9.01])])
    xs = xs.to(dtype)
    fn = torch.sigmoid if name == "Sigmoid" else torch.tanh
    values = fn(xs)
    bound = evaluation_error(values.to(F64), dtype)
    ref = REFERENCE[name]
    for x, v, e in zip(xs.tolist(), values.to(F64).tolist(), bound.tolist(), strict=True):
        assert abs(Fraction(v) - Fraction(ref(x))) <= Fraction(e), (name, dtype, x, v)


@pytest.mark.parametrize("name", ["Sigmoid", "Tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_interval_image_encloses_exactly(name, dtype):  # type: ignore[no-untyped-def]
    pairs = intervals(3, 40)
    lo = torch.tensor([[p[0] for p in pairs]], dtype=F64).to(dtype)
    hi = torch.maximum(lo, torch.tensor([[p[1] for p in pairs]], dtype=F64).to(dtype))
    out_lo, out_hi = activation_rule(OPS[name]((len(pairs),), (len(pairs),))).interval(lo, hi)
    assert out_lo.dtype == dtype
    for j in range(len(pairs)):
        assert frac(out_lo[0, j]) <= exact_value(name, float(lo[0, j]))[0]
        assert frac(out_hi[0, j]) >= exact_value(name, float(hi[0, j]))[1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_leaky_relu_interval_image_is_exact_and_outward(dtype):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    lo = (torch.randn(1, 200, generator=gen, dtype=F64) * 10).to(dtype)
    hi = lo + (torch.rand(1, 200, generator=gen, dtype=F64) * 5).to(dtype)
    for slope in (0.01, 0.1, 1 / 3):
        rule = activation_rule(LeakyReluOp(slope, (200,), (200,)))
        out_lo, out_hi = rule.interval(lo, hi)
        for j in range(200):
            a = Fraction(slope)
            exact_lo = frac(lo[0, j]) if lo[0, j] >= 0 else a * frac(lo[0, j])
            exact_hi = frac(hi[0, j]) if hi[0, j] >= 0 else a * frac(hi[0, j])
            assert frac(out_lo[0, j]) <= exact_lo and frac(out_hi[0, j]) >= exact_hi


def random_relaxation(op, dtype: torch.dtype, seed: int, n: int = 7):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    center = torch.randn(2, n, generator=gen, dtype=F64) * 3
    width = torch.rand(2, n, generator=gen, dtype=F64) * 4
    width[0, 0] = 0.0  # a point
    lo, hi = (center - width * 0.3).to(dtype), (center + width * 0.7).to(dtype)
    return activation_rule(op).relax(lo, hi, "adaptive"), lo, hi


def psi_min(name: str, mu: float, nu: float, mu_err: float, e: float, l: float, u: float,
            extra: list[float]) -> Fraction:
    """``min`` over a grid of ``[l, u]`` of ``(mu +- mu_err) f(z) - nu z - |nu| e``, exactly
    (decimal f, rounded in the minimum's favour, i.e. upwards: an upper bound of the min)."""
    best = None
    for z in grid(l, u, extra):
        if name == "Leaky":
            fz_lo = fz_hi = Fraction(z) if z >= 0 else Fraction(extra[-1]) * Fraction(z)
        else:
            fz_lo, fz_hi = exact_value(name, z)
        m = Fraction(mu)
        value = max(m * fz_lo, m * fz_hi) - Fraction(nu) * Fraction(z)
        value -= Fraction(mu_err) * max(abs(fz_lo), abs(fz_hi)) + abs(Fraction(nu)) * Fraction(e)
        best = value if best is None else min(best, value)
    assert best is not None
    return best


@pytest.mark.parametrize("name", ["Sigmoid", "Tanh", "Leaky"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nu_kind", ["lines", "arbitrary"])
def test_rigorous_constant_is_below_the_true_minimum(name, dtype, nu_kind):  # type: ignore[no-untyped-def]
    """``c <= sum_j min_z (mu_j f(z_j) - nu_j z_j)`` (with inexact rows and a perturbation) for
    the rows as substituted and for arbitrary rows; for rows of the lines, the constant is at
    least the lines' own (the Lagrangian minimum is never below it)."""
    slope = 0.15
    op = (LeakyReluOp(slope, (7,), (7,)) if name == "Leaky" else OPS[name]((7,), (7,)))
    rule = activation_rule(op)
    rel, lo, hi = random_relaxation(op, dtype, seed=len(name) + (dtype == F64))
    gen = torch.Generator().manual_seed(9)
    mu = torch.randn(2, 3, 7, generator=gen, dtype=F64).to(dtype)
    samples = torch.arange(2)
    nu, line_const = rule.backward(mu, rel, samples, None, constant=True)
    if nu_kind == "arbitrary":
        nu = torch.randn(2, 3, 7, generator=gen, dtype=F64).to(dtype)
    mu_err = (torch.rand(2, 3, 7, generator=gen, dtype=F64) * 1e-3).to(dtype)
    pert = (torch.rand(2, 7, generator=gen, dtype=F64) * 1e-3).to(dtype)
    for err, e in ((None, None), (mu_err, pert)):
        c, c_err = rule.constant(mu, nu, rel, samples, err, e)
        assert c.dtype == dtype
        for i in range(2):
            for r in range(3):
                total = Fraction(0)
                for j in range(7):
                    extra = [slope] if name == "Leaky" else []
                    total += psi_min(name, float(mu[i, r, j]), float(nu[i, r, j]),
                                     0.0 if err is None else float(err[i, r, j]),
                                     0.0 if e is None else float(e[i, j]),
                                     float(lo[i, j]), float(hi[i, j]), extra)
                assert frac(c[i, r]) - frac(c_err[i, r]) <= total, (i, r)
        if nu_kind == "lines" and err is None:  # up to the rows' own rounding
            assert line_const is not None
            slack = (1e-9 if dtype == F64 else 1e-5) * (1 + mu.abs().sum(2))
            assert (c >= line_const - slack).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_constant_of_a_wide_layer_holds_exactly_and_sums_wide(dtype):  # type: ignore[no-untyped-def]
    """ReLU's rigorous constant on a layer of 3000 neurons (about half unstable), with inexact
    rows and a perturbation, in exact rational arithmetic: ``c - err`` is at most ``sum_j
    min_{z in [l_j, u_j]} ((mu_j +- mu_err_j) relu(z) - nu_j z) - |nu_j| e_j`` (the minimum of
    each term is at l, u or 0). In float32 the sum runs in float64: its error bound is far
    below the ``gamma_n`` of a float32 sum of n terms."""
    n, b, r = 3000, 2, 2
    gen = torch.Generator().manual_seed(5)
    lo = (torch.randn(b, n, generator=gen, dtype=F64) * 2 - 0.5).to(dtype)
    hi = lo + (torch.rand(b, n, generator=gen, dtype=F64) * 3).to(dtype)
    rel = relax(lo, hi, "adaptive")
    mu = (torch.randn(b, r, n, generator=gen, dtype=F64) * 10).to(dtype)
    nu = (torch.randn(b, r, n, generator=gen, dtype=F64) * 10).to(dtype)
    # any rows on the unstable neurons; on the stable ones, the substitution's own (mu or 0)
    nu = torch.where((lo >= 0)[:, None], mu, torch.where((hi <= 0)[:, None], 0.0, nu))
    mu_err = (torch.rand(b, r, n, generator=gen, dtype=F64) * 1e-6).to(dtype)
    pert = (torch.rand(b, n, generator=gen, dtype=F64) * 1e-6).to(dtype)
    c, err = relu_constant(mu, nu, rel, torch.arange(b), mu_err, pert)
    assert c.dtype == err.dtype == dtype
    for i in range(b):
        ls, us = [frac(v) for v in lo[i].tolist()], [frac(v) for v in hi[i].tolist()]
        es = [frac(v) for v in pert[i].tolist()]
        for k in range(r):
            exact = Fraction(0)
            magnitude = Fraction(0)
            for j, (m, v, me) in enumerate(zip(mu[i, k].tolist(), nu[i, k].tolist(),
                                               mu_err[i, k].tolist(), strict=True)):
                m, v, me = Fraction(m), Fraction(v), Fraction(me)
                term = min(-v * z + m * max(z, 0) - me * max(z, 0) for z in (ls[j], us[j], 0)
                           if ls[j] <= z <= us[j]) - abs(v) * es[j]
                exact += term
                magnitude += abs(term)
            assert frac(c[i, k]) - frac(err[i, k]) <= exact, (i, k)
            # what a float32 sum of n terms would have to allow: gamma_n of the magnitudes
            plain = Fraction(n * float(torch.finfo(torch.float32).eps) / 2) * magnitude
            assert dtype == F64 or frac(err[i, k]) < plain / 10, (i, k)


# --- errors, the MILP's refusal, verify and training ---------------------------------------------


@pytest.mark.parametrize("act", [nn.Sigmoid(), nn.Tanh()])
def test_milp_refuses_smooth_activations_with_one_line(act):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), act, nn.Linear(3, 2)).double()
    x = torch.rand(2, 1, 2, 2, dtype=F64)
    name = type(act).__name__
    with pytest.raises(UnsupportedLayerError, match=rf"'2' \({name}\) is not piecewise linear"
                       r".*use lp") as info:
        compute_bounds(model, x - 0.1, x + 0.1, "milp")
    assert "\n" not in str(info.value)
    from certify.exact import exact_radii

    with pytest.raises(UnsupportedLayerError, match=f"{name}"):
        exact_radii(model, x, torch.tensor([0, 1]), eps_max=0.1)


def test_leaky_relu_slope_outside_zero_one_is_refused():  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedLayerError, match=r"LeakyReLU.*negative_slope=1.5"):
        to_network(nn.Sequential(nn.Flatten(), nn.LeakyReLU(1.5)), (1, 2, 2))


def test_verify_decides_smooth_networks_without_the_milp():  # type: ignore[no-untyped-def]
    """verify's automatic MILP stage is for piecewise-linear networks only: on a Tanh/Sigmoid
    network the cascade decides with the bound methods; asking for the MILP is one line."""
    pytest.importorskip("cvxpy")
    from certify.verify import verify
    from certify.vnnlib import parse_vnnlib

    model = act_mlp(2, [6], ["tanh", "sigmoid"], in_shape=(1, 1, 4)).eval()
    x = torch.full((1, 1, 1, 4), 0.5)
    label = int(model(x).argmax())
    eps = 1e-4
    lines = [f"(declare-const X_{i} Real)" for i in range(4)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(3)]
    lines += [f"(assert (>= X_{i} {0.5 - eps}))\n(assert (<= X_{i} {0.5 + eps}))"
              for i in range(4)]
    others = " ".join(f"(>= Y_{j} Y_{label})" for j in range(3) if j != label)
    lines.append(f"(assert (or {others}))")
    prop = parse_vnnlib("\n".join(lines), source="tiny.vnnlib")
    verdict = verify(model, prop, timeout=60, input_shape=(1, 1, 4))
    assert verdict.result == "unsat" and verdict.method in ("ibp", "crown", "alpha-crown")
    with pytest.raises(UnsupportedLayerError, match="not piecewise linear"):
        verify(model, prop, timeout=60, input_shape=(1, 1, 4), methods=(), use_milp=True)


@pytest.mark.parametrize("kind", ["leaky", "sigmoid", "tanh"])
def test_robust_training_runs_and_lowers_the_loss(kind):  # type: ignore[no-untyped-def]
    """The robust losses are differentiable through the new relaxations (finite, nonzero
    gradients for every method) and a few Adam steps on CROWN-IBP lower the loss."""
    from certify.train.robust import BOUND_METHODS, bound_loss

    model = act_mlp(1, [16, 12], [kind], in_shape=(1, 4, 4), classes=4, gain=1.0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 4, 4, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    for method in BOUND_METHODS:
        model.zero_grad()
        loss = bound_loss(model, x, y, 0.05, method)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all()
                                            for g in grads), method
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, method
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = float(bound_loss(model, x, y, 0.05, "crown-ibp").detach())
    for _ in range(30):
        opt.zero_grad()
        bound_loss(model, x, y, 0.05, "crown-ibp").backward()
        opt.step()
    assert float(bound_loss(model, x, y, 0.05, "crown-ibp").detach()) < first - 1e-3


def test_margin_bounds_certify_a_trained_smooth_net():  # type: ignore[no-untyped-def]
    """End to end through the public API: rigorous margins of a Tanh net (model rounding
    included, the default) are below the margins at PGD points of the ball."""
    from certify.attacks import pgd
    from certify.spec import LinfBall

    model = act_mlp(8, [10], ["tanh"], in_shape=(1, 4, 4), classes=3, gain=1.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 4, 4, generator=gen)
    y = model(x).argmax(1)
    for method in FAST:
        lower = margin_bounds(model, x, y, 0.05, method).lower
        adv = pgd(model, LinfBall(x, 0.05), y, steps=20).x_adv
        logits = model(adv).detach()
        top = logits.gather(1, y[:, None])
        others = torch.stack([logits[i][torch.arange(3) != y[i]] for i in range(4)])
        assert (lower <= top - others + 1e-6).all(), method


class _Pairs:
    """A tiny in-memory dataset with ``len`` and ``take`` (what the training loop reads)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]


def test_robust_fit_trains_and_certifies_a_smooth_net():  # type: ignore[no-untyped-def]
    """The library's robust training loop on a LeakyReLU/Sigmoid/Tanh net: it trains and its
    end-of-training evaluation certifies with the rigorous bound (certified <= robust)."""
    from certify.train.loops import TrainConfig
    from certify.train.robust import RobustConfig, robust_fit
    from certify.train.schedules import EpsSchedule

    model = act_mlp(2, [16, 12], ["leaky", "sigmoid", "tanh"], in_shape=(1, 4, 4), classes=3,
                    gain=1.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(96, 1, 4, 4, generator=gen)
    y = (x.flatten(1)[:, :3].argmax(1))  # a learnable rule
    run = robust_fit(model, _Pairs(x[:64], y[:64]), _Pairs(x[64:], y[64:]),
                     TrainConfig(epochs=2, batch_size=16, lr=1e-2),
                     RobustConfig("crown-ibp", EpsSchedule(0.01), eval_samples=16,
                                  eval_pgd_steps=3), quiet=True)
    assert run.final is not None and run.final.samples == 16
    assert 0.0 <= run.final.certified_accuracy <= run.final.pgd_accuracy <= 1.0
