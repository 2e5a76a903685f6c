"""LP and MILP encodings of DAG networks (residual Add, Concat): soundness on every generated
DAG kind (float32 and float64, and for the float32 model as it runs), the orderings that are
theorems (``lp`` never looser than CROWN/alpha-CROWN with the same intermediate bounds, the MILP
never below the LP), exactness against a brute-force region enumeration of a 2-D residual
net, exact radii, and the MILP scheduled and deciding in ``certify verify``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bound_helpers import F64, all_points, assert_sound, make_box, random_spec, tol
from dag_helpers import KINDS, S_KINDS, make_dag
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from certify.bounds import compute_bounds, get_method, to_network
from certify.errors import UnsupportedLayerError

pytest.importorskip("cvxpy")
from brute_force import (  # noqa: E402
    grid_min_spec,
    make_residual2d,
    min_adv_eps,
    min_spec,
    residual_regions,
)

from certify.bounds.encoding import encode, exact_encoding_units  # noqa: E402
from certify.bounds.milp import MilpBounds, refine_intermediate  # noqa: E402
from certify.bounds.network import fold_spec  # noqa: E402

pytestmark = pytest.mark.solver
F32 = torch.float32
PWL_KINDS = [k for k in range(KINDS) if k not in S_KINDS]
CNN_KINDS = (1, 2, 3)  # many neurons: the MILP gets CROWN's intermediate bounds there


def _milp_options(kind: int) -> dict[str, object]:
    return {"intermediate_method": "crown"} if kind in CNN_KINDS else {}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.integers(0, KINDS - 1),
       dtype=st.sampled_from([F32, F64]), eps=st.sampled_from([0.02, 0.1, 0.4]))
def test_lp_is_sound_on_every_dag_kind(seed, kind, dtype, eps):  # type: ignore[no-untyped-def]
    """Sampling, corners and PGD in the box stay inside the LP's bounds (Sigmoid/Tanh kinds
    included: the LP takes their certified lines)."""
    model, shape = make_dag(seed, kind)
    x_lo, x_hi, x = make_box(seed, 2, shape, eps, dtype)
    spec = random_spec(seed, 2, 2, 3, dtype)
    assert_sound(model, x_lo, x_hi, x, spec, "lp", dtype)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.sampled_from(PWL_KINDS),
       dtype=st.sampled_from([F32, F64]), eps=st.sampled_from([0.02, 0.1]))
def test_milp_is_sound_on_every_piecewise_linear_dag_kind(seed, kind, dtype, eps):  # type: ignore[no-untyped-def]
    model, shape = make_dag(seed, kind)
    x_lo, x_hi, x = make_box(seed, 2, shape, eps if kind not in CNN_KINDS else 0.02, dtype)
    spec = random_spec(seed, 2, 2, 3, dtype)
    bounds = assert_sound(model, x_lo, x_hi, x, spec, "milp", dtype, **_milp_options(kind))
    assert isinstance(bounds, MilpBounds)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.integers(0, KINDS - 1),
       eps=st.sampled_from([0.01, 0.1]), method=st.sampled_from(["lp", "milp"]))
def test_lp_and_milp_with_model_rounding_hold_for_the_float32_model(seed, kind, eps, method):  # type: ignore[no-untyped-def]
    """With ``model_rounding`` the bounds hold for the float32 model as computed (its Adds
    rounded too, :func:`certify.bounds.forward_error.graph_error` in the chains' slack)."""
    if method == "milp" and kind in S_KINDS:
        kind = 0
    model, shape = make_dag(seed, kind)
    model = model.float()
    x_lo, x_hi, x = make_box(seed, 2, shape, eps if kind not in CNN_KINDS else 0.02, F32)
    spec = random_spec(seed, 2, 2, 3, F64)
    options = _milp_options(kind) if method == "milp" else {}
    bounds = compute_bounds(model, x_lo, x_hi, method, spec.float(), model_rounding=True,
                            **options)
    points = all_points(model, x_lo, x_hi, spec.float(), x)
    with torch.no_grad():
        out = model(points.reshape(-1, *shape)).double().reshape(*points.shape[:2], -1)
    values = torch.einsum("nbk,bsk->nbs", out, spec.double())
    slack = 1e-12 * (1 + values.abs().max().item())
    assert (values >= bounds.lower.double() - slack).all()
    assert (values <= bounds.upper.double() + slack).all()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.integers(0, KINDS - 1),
       eps=st.sampled_from([0.05, 0.3]))
# HiGHS's default tolerances left duals 1.4e-8 (relative) looser than Wong-Kolter's here
@example(seed=460091, kind=4, eps=0.05)
def test_lp_is_tightest_with_the_same_intermediate_bounds(seed, kind, eps):  # type: ignore[no-untyped-def]
    """With the same intermediate bounds the LP is never looser than CROWN, alpha-CROWN or
    Wong-Kolter (Salman et al. 2019; the chain test's theorem; on Sigmoid/Tanh kinds only
    CROWN's and Wong-Kolter's lines are among the LP's, alpha-CROWN's optimized tangents are
    not), and the MILP never below the LP (minus its tolerance)."""
    model, shape = make_dag(seed, kind)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 2, shape, eps, F64)
    spec = random_spec(seed, 2, 2, 3, F64)
    net = to_network(model, shape)
    for inter_method, methods in (("crown", ("crown", "alpha-crown")),
                                  ("wong-kolter", ("wong-kolter",))):
        inter = get_method(inter_method).intermediate(net, x_lo, x_hi)
        lp = compute_bounds(net, x_lo, x_hi, "lp", spec, intermediate=inter)
        t = 1e-8 * (1 + lp.lower.abs().max().item())
        for m in methods:
            if m == "alpha-crown" and kind in S_KINDS:
                continue
            b = compute_bounds(net, x_lo, x_hi, m, spec, intermediate=inter)
            assert (lp.lower >= b.lower - t).all(), m
            assert (lp.upper <= b.upper + t).all(), m
        if kind in S_KINDS or kind in CNN_KINDS:
            continue  # the MILP on the CNN kinds: in the soundness test
        milp = compute_bounds(net, x_lo, x_hi, "milp", spec, intermediate=inter)
        assert isinstance(milp, MilpBounds)
        assert (milp.lower >= lp.lower - milp.tolerance - 1e-9).all()


def test_lp_gains_on_crown_somewhere_on_a_residual_net():  # type: ignore[no-untyped-def]
    """Not a theorem, but with unstable neurons the LP must be strictly tighter somewhere."""
    model, shape = make_dag(4, 5)
    model = model.double()
    x_lo, x_hi, _ = make_box(4, 2, shape, 0.3, F64)
    spec = random_spec(4, 2, 3, 3, F64)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec)
    lp = compute_bounds(model, x_lo, x_hi, "lp", spec)
    assert (lp.lower - crown.lower).max() > 1e-4


def _box2d(center: np.ndarray, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = np.clip(center - eps, 0, 1), np.clip(center + eps, 0, 1)
    return (torch.tensor(lo, dtype=F64).view(1, 1, 1, 2),
            torch.tensor(hi, dtype=F64).view(1, 1, 1, 2))


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), width=st.sampled_from([2, 3, 4]),
       eps=st.sampled_from([0.1, 0.3, 0.6]))
def test_milp_equals_the_brute_force_minimum_of_a_residual_net(seed, width, eps):  # type: ignore[no-untyped-def]
    """The MILP's lower bound is the exact minimum over the box (the residual net's regions
    enumerated by LPs), and the LP's is below it."""
    model = make_residual2d(seed, width, 3)
    assert not to_network(model, (1, 1, 2)).is_chain
    rng = np.random.default_rng(seed)
    x_lo, x_hi = _box2d(rng.random(2), eps)
    lo, hi = x_lo.flatten().numpy(), x_hi.flatten().numpy()
    rows = rng.standard_normal((2, 3))
    spec = torch.tensor(rows, dtype=F64)[None]
    milp = compute_bounds(model, x_lo, x_hi, "milp", spec, exact_upper=True)
    lp = compute_bounds(model, x_lo, x_hi, "lp", spec)
    assert isinstance(milp, MilpBounds) and milp.optimal.all()
    parts = residual_regions(model, lo, hi)
    for r in range(2):
        truth = min_spec(parts, rows[r], lo, hi)
        top = -min_spec(parts, -rows[r], lo, hi)
        assert truth <= grid_min_spec(model, rows[r], lo, hi, steps=61) + 1e-9  # enumerator
        t = float(milp.tolerance[0, r])
        assert float(milp.lower[0, r]) <= truth + 1e-9, "unsound: above the true minimum"
        assert float(milp.lower[0, r]) >= truth - t - 1e-7, "not exact"
        assert top - 1e-9 <= float(milp.upper[0, r]) <= top + t + 1e-7
        assert float(lp.lower[0, r]) <= truth + 1e-9 and float(lp.upper[0, r]) >= top - 1e-9


def test_refined_intermediate_bounds_of_a_dag_are_sound_and_tighter():  # type: ignore[no-untyped-def]
    """The LP refinement of a DAG's pre-activation bounds (the truncated DAG ends in the node
    the activation takes) stays within CROWN's and contains every sampled pre-activation."""
    model, shape = make_dag(7, 5)
    model = model.double()
    x_lo, x_hi, x = make_box(7, 2, shape, 0.3, F64)
    net = to_network(model, shape).detach().to(dtype=F64, device="cpu")
    with torch.no_grad():
        crown = get_method("crown").intermediate(net, x_lo, x_hi)
    refined = refine_intermediate(net, x_lo, x_hi, crown, method="lp")
    pts = all_points(model, x_lo, x_hi, random_spec(7, 2, 1, 3, F64), x)
    from certify.bounds.graph import evaluate
    gained = 0.0
    for k, pos in enumerate(net.activation_positions):
        src = net.sources(pos)[0]
        with torch.no_grad():
            z = evaluate(net.layers[:src + 1], net.inputs[:src + 1],
                         pts.reshape(-1, *shape)).reshape(*pts.shape[:2], -1)
        lo, hi = refined[k].lower.flatten(1), refined[k].upper.flatten(1)
        t = tol(lo, hi)
        assert (z >= lo - t).all() and (z <= hi + t).all()
        assert (lo >= crown[k].lower.flatten(1) - t).all()
        assert (hi <= crown[k].upper.flatten(1) + t).all()
        gained = max(gained, float((crown[k].upper.flatten(1) - hi).max()))
    assert gained > 1e-4


def test_encoded_chains_reproduce_the_network():  # type: ignore[no-untyped-def]
    """The DAG's chains (from several blocks) evaluated on the true activations give every
    activation's input and the specification's value (float64, to rounding)."""
    for kind in range(KINDS):
        model, shape = make_dag(kind, kind)
        model = model.double()
        net = to_network(model, shape).detach().to(dtype=F64, device="cpu")
        x = torch.rand(3, *shape, dtype=F64, generator=torch.Generator().manual_seed(kind))
        spec = random_spec(kind, 3, 2, 3, F64)
        enc = encode(fold_spec(net, spec))
        assert len(enc.chains) == len(net.activation_positions) + 1
        from certify.bounds.graph import evaluate
        for i in range(3):
            blocks = {-1: x[i].flatten().numpy()}
            for k, pos in enumerate(net.activation_positions):
                chain = enc.chains[k]
                src = net.sources(pos)[0]
                with torch.no_grad():
                    z = evaluate(net.layers[:src + 1], net.inputs[:src + 1], x[i:i + 1])
                    h = evaluate(net.layers[:pos + 1], net.inputs[:pos + 1], x[i:i + 1])
                got = chain.matrix @ np.concatenate([blocks[b] for b in chain.blocks(k)]) \
                    + chain.offset
                assert np.allclose(got, z.flatten().numpy(), atol=1e-10), (kind, k)
                blocks[k] = h.flatten().numpy()
            last = enc.chains[-1]
            out = last.matrix @ np.concatenate([blocks[b] for b in last.blocks(len(
                enc.chains) - 1)]) + last.offset
            value = enc.spec.weight[i].numpy() @ out + enc.spec.bias[i].numpy()
            with torch.no_grad():
                want = (spec[i] @ model(x[i:i + 1]).flatten()).numpy()
            assert np.allclose(value, want, atol=1e-9), kind


def test_milp_refuses_a_dag_with_sigmoid_in_one_line():  # type: ignore[no-untyped-def]
    model, shape = make_dag(0, S_KINDS[0])
    x_lo, x_hi, _ = make_box(0, 1, shape, 0.05, F64)
    net = to_network(model.double(), shape)
    assert exact_encoding_units(net) is None
    with pytest.raises(UnsupportedLayerError) as info:
        compute_bounds(model.double(), x_lo, x_hi, "milp", random_spec(0, 1, 1, 3, F64))
    assert "\n" not in str(info.value) and "not piecewise linear" in str(info.value)


def test_exact_encoding_units_counts_a_dag():  # type: ignore[no-untyped-def]
    model, shape = make_dag(0, 0)
    net = to_network(model, shape)
    sizes = [math.prod(net.layers[p].in_shape) for p in net.activation_positions]
    assert exact_encoding_units(net) == sum(sizes) == 6 + 5 + 6


# --- exact radii ---------------------------------------------------------------------------------


def test_exact_radii_of_a_residual_net_match_the_brute_force():  # type: ignore[no-untyped-def]
    """Exact radii on a residual net: equal to the enumeration's, above CROWN's certified
    radius and below the attack's eps; the MILP-driven radius search converges to them."""
    from certify.attacks import min_adversarial_eps
    from certify.exact import check_sandwich, exact_radii
    from certify.radius import certified_radii

    model = make_residual2d(1, 4, 3)
    x = torch.rand(3, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    attack = min_adversarial_eps(model, x, y, eps_max=0.5, tol=1e-5,
                                 generator=torch.Generator().manual_seed(0))
    result = exact_radii(model, x, y, eps_max=0.5, attack_eps=attack, tol=1e-7)
    parts = residual_regions(model, np.zeros(2), np.ones(2))
    slack = result.tolerance + 1e-9
    for i in range(3):
        truth = min_adv_eps(parts, x[i].flatten().numpy(), int(y[i]))
        assert float(result.exact_lo[i]) <= truth + 1e-9
        if truth > 0.5:
            assert result.status[i] == "above_max"
            continue
        assert result.status[i] == "optimal", result.reason[i]
        assert abs(float(result.exact_eps[i]) - truth) <= 1e-7 + float(slack[i])
        if math.isfinite(float(attack[i])):
            assert float(result.exact_eps[i]) <= float(attack[i]) + float(slack[i]) + 1e-6
    known = result.known
    assert bool(known.any())
    for method in ("crown", "milp"):
        cert = certified_radii(model, x, y, method, eps_max=0.5, tol=1e-5, attack_eps=attack)
        check_sandwich(result, certified_eps=cert.certified_eps, attack_eps=attack,
                       method=method)
        assert (cert.certified_eps[known] <= result.exact_eps[known] + slack[known]).all()
        if method == "milp":
            gap = result.exact_eps[known] - cert.certified_eps[known]
            assert (gap <= 1e-5 + 2 * slack[known]).all()


# --- verify ------------------------------------------------------------------------------------


def test_verify_schedules_the_milp_on_a_residual_onnx_model_and_decides(tmp_path):  # type: ignore[no-untyped-def]
    """On an imported residual ONNX graph the MILP is scheduled (its units are counted) and
    proves a robustness property that CROWN and alpha-CROWN cannot."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "onnx"))
    from onnx_helpers import robustness_vnnlib
    from test_onnx_dag import NormalizedResidual, _export, _random

    from certify.onnx_import import import_onnx
    from certify.spec import margin_spec
    from certify.verify import _complete_methods, verify
    from certify.vnnlib import read_vnnlib

    model = _random(NormalizedResidual(), 5)
    imported, meta = import_onnx(onnx.load_from_string(_export(model, (1, 4, 4))))
    net = to_network(imported, meta.input_shape)
    assert not net.is_chain and exact_encoding_units(net) is not None
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    assert "milp" in _complete_methods("auto", False, imported, x)
    label = int(imported(x).argmax())
    spec = margin_spec(torch.tensor([label]), 3)
    decided = None
    for eps in (0.15, 0.12, 0.1, 0.08, 0.06, 0.04):
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        alpha = compute_bounds(imported, lo, hi, "alpha-crown", spec)
        if bool((alpha.lower > 0).all()):
            break  # the bounds prove it already: no instance left for the MILP
        milp = compute_bounds(imported, lo, hi, "milp", spec)
        if bool((milp.lower > 0).all()):
            decided = eps
            break
    assert decided is not None, "no eps where the MILP proves what alpha-CROWN cannot"
    path = tmp_path / "p.vnnlib"
    path.write_text(robustness_vnnlib(x, label, 3, decided))
    verdict = verify(imported, read_vnnlib(path), timeout=60, methods=("crown", "alpha-crown"),
                     use_milp=True, use_bab=False, input_shape=meta.input_shape)
    assert verdict.result == "unsat" and verdict.method == "milp", verdict


class _SharedBlocks(torch.nn.Module):
    """Branches that are affine in the same block (their matrices are summed) and a concat:
    ``h = relu(A x)``, ``s = relu(cat(B h + C h, D h))``, output ``E s + F h``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(3, 4), torch.nn.Linear(4, 3),
                                  torch.nn.Linear(4, 3))
        self.d, self.e, self.f = (torch.nn.Linear(4, 2), torch.nn.Linear(5, 3),
                                  torch.nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        s = torch.relu(torch.cat([self.b(h) + self.c(h), self.d(h)], 1))
        return self.e(s) + self.f(h)  # type: ignore[no-any-return]


def test_dag_chain_errors_bound_the_exact_chains():  # type: ignore[no-untyped-def]
    """Every chain's float64 matrix and offset are within their error bounds of the exact
    (rational) chain: sums of two branches' matrices (the Add) rounded, concat exact."""
    from fractions import Fraction

    model = _SharedBlocks().double().eval()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():  # full float64 mantissas: their sums round
        p.data = torch.randn(p.shape, dtype=F64, generator=gen)
    net = to_network(model, (3,)).detach()
    assert not net.is_chain
    spec = torch.eye(3, dtype=F64)[None]
    enc = encode(fold_spec(net, spec))

    def exact(lin: torch.nn.Linear) -> tuple[list[list[Fraction]], list[Fraction]]:
        w = [[Fraction(float(v)) for v in row] for row in lin.weight.detach()]
        return w, [Fraction(float(v)) for v in lin.bias.detach()]

    (a, a0), (b, b0), (c, c0), (d, d0), (e, e0), (f, f0) = (
        exact(m) for m in (model.a, model.b, model.c, model.d, model.e, model.f))
    summed = [[bi + ci for bi, ci in zip(rb, rc, strict=True)] for rb, rc in zip(b, c, strict=True)]
    want = [
        (a, a0),  # into relu(h): block x
        (summed + d, [p + q for p, q in zip(b0, c0, strict=True)] + d0),  # block h
        ([rf + re for rf, re in zip(f, e, strict=True)],  # blocks h, s stacked
         [p + q for p, q in zip(e0, f0, strict=True)]),
    ]
    assert [ch.sources for ch in enc.chains] == [(-1,), (0,), (0, 1)]
    rounded = 0
    for chain, (matrix, offset) in zip(enc.chains, want, strict=True):
        assert chain.matrix_err is not None and chain.offset_err is not None
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                gap = abs(Fraction(float(chain.matrix[i, j])) - value)
                assert gap <= Fraction(float(chain.matrix_err[i, j])), (i, j)
                rounded += gap > 0
            gap = abs(Fraction(float(chain.offset[i])) - offset[i])
            assert gap <= Fraction(float(chain.offset_err[i])), i
            rounded += gap > 0
    assert rounded > 0  # the sums did round somewhere: the bounds were tested
