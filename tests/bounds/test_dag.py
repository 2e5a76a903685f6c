"""DAG networks (residual Add, Concat) in the bound engine: conversion, soundness of every
method that takes them, the model's own rounding, orderings, and one-line refusals."""

from __future__ import annotations

import pytest
import torch
from bound_helpers import (
    F64,
    all_points,
    assert_alpha_crown_never_looser,
    assert_sound,
    make_box,
    random_spec,
    spec_values,
    tol,
)
from dag_helpers import KINDS, S_KINDS, make_dag
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import compute_bounds, get_method, list_methods, to_network
from certify.errors import SpecError, UnsupportedLayerError
from certify.nets import create_arch

F32 = torch.float32
# every method bounds DAGs; these are tested elsewhere:
ENCODED = {"lp", "milp"}  # tests/bounds/test_dag_encoding.py
SLOW = {"lirpa-alpha-crown", "bab"}  # tests/engines/test_dag_parity.py, tests/bounds/test_bab.py


def _lirpa_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("auto_LiRPA") is not None


def dag_methods() -> list[str]:
    """The methods this file's soundness tests draw: the native ones, and auto_LiRPA's where it
    is installed (tests/engines/test_dag_parity.py compares them and says when it skips)."""
    names = list_methods() if _lirpa_importable() else list_methods(external=False)
    return [m for m in names if m not in ENCODED]


def test_every_native_method_bounds_a_dag():  # type: ignore[no-untyped-def]
    """A new method must bound DAGs (a residual MLP here; budgets keep bab short), with bounds
    that hold at the box's centre."""
    model, shape = make_dag(0, 0)
    model = model.double()
    x_lo, x_hi, x = make_box(0, 2, shape, 0.02, F64)
    spec = random_spec(0, 2, 2, 3, F64)
    with torch.no_grad():
        centre = spec_values(model, x.unsqueeze(0), spec)[0]
    for method in list_methods(external=False):
        options = {"time_limit": 2.0, "max_domains": 50} if method == "bab" else {}
        bounds = compute_bounds(model, x_lo, x_hi, method, spec, **options)
        assert (bounds.lower <= centre + 1e-9).all() and (centre <= bounds.upper + 1e-9).all()


@pytest.mark.parametrize("kind", range(KINDS))
def test_network_forward_equals_the_module(kind):  # type: ignore[no-untyped-def]
    model, shape = make_dag(3, kind)
    net = to_network(model, shape)
    assert not net.is_chain
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(kind))
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)
        model = model.double()
        assert torch.allclose(to_network(model, shape)(x.double()), model(x.double()),
                              atol=1e-12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.integers(0, KINDS - 1),
       dtype=st.sampled_from([F32, F64]), eps=st.sampled_from([0.02, 0.1, 0.4]),
       method=st.sampled_from(sorted(set(dag_methods()) - SLOW)))
def test_bounds_are_sound(seed, kind, dtype, eps, method):  # type: ignore[no-untyped-def]
    """Sampling, corners and PGD in the box stay inside every method's bounds (auto_LiRPA's on
    the ReLU kinds: its sigmoid/tanh fail in float64 inside auto_LiRPA itself)."""
    assume(not (method.startswith("lirpa-") and kind in S_KINDS))
    model, shape = make_dag(seed, kind)
    x_lo, x_hi, x = make_box(seed, 3, shape, eps, dtype)
    spec = random_spec(seed, 3, 2, 3, dtype)
    assert_sound(model, x_lo, x_hi, x, spec, method, dtype)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.integers(0, KINDS - 1),
       eps=st.sampled_from([0.01, 0.1]),
       method=st.sampled_from(["ibp", "crown", "crown-ibp", "alpha-crown", "wong-kolter"]))
def test_bounds_with_model_rounding_hold_for_the_float32_model(seed, kind, eps, method):  # type: ignore[no-untyped-def]
    """With ``model_rounding`` the bounds hold for the float32 model as computed (its Adds
    rounded too): no tolerance beyond the float64 product with the spec."""
    model, shape = make_dag(seed, kind)
    model = model.float()
    x_lo, x_hi, x = make_box(seed, 3, shape, eps, F32)
    spec = random_spec(seed, 3, 2, 3, F64)
    bounds = compute_bounds(model, x_lo, x_hi, method, spec.float(), model_rounding=True)
    points = all_points(model, x_lo, x_hi, spec.float(), x)
    with torch.no_grad():
        out = model(points.reshape(-1, *shape)).double().reshape(*points.shape[:2], -1)
    values = torch.einsum("nbk,bsk->nbs", out, spec.double())
    slack = 1e-12 * (1 + values.abs().max().item())
    assert (values >= bounds.lower.double() - slack).all()
    assert (values <= bounds.upper.double() + slack).all()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.integers(0, KINDS - 1),
       eps=st.sampled_from([0.05, 0.3]))
def test_alpha_crown_never_looser_than_crown(seed, kind, eps):  # type: ignore[no-untyped-def]
    model, shape = make_dag(seed, kind)
    assert_alpha_crown_never_looser(model, shape, seed, eps, classes=3, steps=5)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**20), kind=st.integers(0, KINDS - 1),
       eps=st.sampled_from([0.05, 0.3]))
def test_crown_intermediate_bounds_within_ibp(seed, kind, eps):  # type: ignore[no-untyped-def]
    """CROWN's pre-activation bounds intersect the interval ones with linear bounds, and
    interval arithmetic is inclusion-monotone: never wider than IBP's, layer by layer (up to
    the float64 rounding of different computations, ``tol``)."""
    model, shape = make_dag(seed, kind)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 3, shape, eps, F64)
    net = to_network(model, shape).to(dtype=F64, device="cpu")
    crown = get_method("crown").intermediate(net, x_lo, x_hi)
    ibp = get_method("ibp").intermediate(net, x_lo, x_hi)
    assert len(crown) == len(ibp) == len(net.activation_positions)
    for c, i in zip(crown, ibp, strict=True):
        t = tol(i.lower, i.upper)
        assert (c.lower >= i.lower - t).all() and (c.upper <= i.upper + t).all()


def test_crown_is_tighter_than_ibp_somewhere():  # type: ignore[no-untyped-def]
    """Not a theorem, but on a residual net with unstable neurons CROWN must gain."""
    model, shape = make_dag(5, 1)
    model = model.double()
    x_lo, x_hi, _ = make_box(5, 3, shape, 0.1, F64)
    crown = compute_bounds(model, x_lo, x_hi, "crown")
    ibp = compute_bounds(model, x_lo, x_hi, "ibp")
    assert ((crown.upper - crown.lower) < 0.9 * (ibp.upper - ibp.lower)).any()


def test_rigorous_bounds_only_loosen():  # type: ignore[no-untyped-def]
    """The rounding terms of the DAG pass (sums at fan-out nodes included) only widen."""
    model, shape = make_dag(2, 2)
    x_lo, x_hi, _ = make_box(2, 3, shape, 0.05, F32)
    for method in ("crown", "alpha-crown"):
        plain = compute_bounds(model, x_lo, x_hi, method, rigorous=False)
        strict = compute_bounds(model, x_lo, x_hi, method)
        assert (strict.lower <= plain.lower).all() and (strict.upper >= plain.upper).all()
        assert ((strict.upper - strict.lower) - (plain.upper - plain.lower)).max() < 1e-3


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_zoo_resnet_converts_to_a_dag(shape):  # type: ignore[no-untyped-def]
    model = create_arch("resnet-2b", shape, 10).eval()
    net = to_network(model, shape)
    assert sum(len(s) > 1 for s in net.inputs) == 2  # two residual Adds
    assert len(net.activation_positions) == 5
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)


def test_zoo_resnet_bounds_are_sound_on_digits_shapes():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = create_arch("resnet-4-6", (1, 8, 8), 10).eval()
    x_lo, x_hi, x = make_box(0, 2, (1, 8, 8), 0.02, F64)
    spec = random_spec(0, 2, 3, 10, F64)
    for method in ("ibp", "crown", "alpha-crown"):
        assert_sound(model, x_lo, x_hi, x, spec, method, F64)


# --- refusals: one line naming the node and the operation -------------------------------------


class _Mul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * 2


class _Exp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.fc(x)) + x


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


class _Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


@pytest.mark.parametrize(("model", "error", "words"), [
    (_Mul(), UnsupportedLayerError, ["'mul'", "mul"]),
    (_Exp(), UnsupportedLayerError, ["'exp'", "exp"]),
    (_Gelu(), UnsupportedLayerError, ["'act'", "GELU"]),
    (_Broadcast(), SpecError, ["'add'", "(4,) and (1,)"]),
    (_Branchy(), UnsupportedLayerError, ["_Branchy", "torch.fx"]),
])
def test_unsupported_graph_ops_get_one_line(model, error, words):  # type: ignore[no-untyped-def]
    with pytest.raises(error) as info:
        to_network(model, (4,))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_chain_errors_are_unchanged():  # type: ignore[no-untyped-def]
    """A Sequential of leaf modules stays on the chain path and its message."""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 '1' \(GELU\) has no bound rule"):
        to_network(model, (4,))


def test_a_traced_chain_is_a_chain():  # type: ignore[no-untyped-def]
    """A custom module whose forward is a chain converts to a chain (no inputs)."""

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    net = to_network(Chain(), (4,))
    assert net.is_chain and len(net.layers) == 3
    seq = nn.Sequential(Chain().a, nn.ReLU(), Chain().b)
    assert to_network(seq, (4,)).is_chain


def test_spec_rows_and_backward_on_a_dag_match_a_dense_check():  # type: ignore[no-untyped-def]
    """On a point box (eps 0) every method's bound equals the network's value (up to its
    rounding terms): the rows reach the input through both paths of each merge."""
    for kind in range(KINDS):
        model, shape = make_dag(7, kind)
        model = model.double()
        x = torch.rand(2, *shape, dtype=F64, generator=torch.Generator().manual_seed(kind))
        spec = random_spec(kind, 2, 2, 3, F64)
        with torch.no_grad():
            want = spec_values(model, x[None], spec)[0]
        for method in ("crown", "alpha-crown", "ibp"):
            b = compute_bounds(model, x, x, method, spec)
            assert torch.allclose(b.lower, want, atol=1e-9), (kind, method)
            assert torch.allclose(b.upper, want, atol=1e-9), (kind, method)


@pytest.mark.parametrize("kind", [3, 4])
def test_alpha_crown_with_given_intermediate_bounds_on_branches(kind):  # type: ignore[no-untyped-def]
    """Branches whose activations the output rows reach on one path only (a Concat): their
    slopes get a zero gradient, and optimizing the others never loosens CROWN's bound."""
    model, shape = make_dag(1, kind)
    model = model.double()
    x_lo, x_hi, _ = make_box(1, 3, shape, 0.2, F64)
    inter = get_method("crown").intermediate(to_network(model, shape), x_lo, x_hi)
    alpha = compute_bounds(model, x_lo, x_hi, "alpha-crown", intermediate=inter)
    crown = compute_bounds(model, x_lo, x_hi, "crown", intermediate=inter)
    assert (alpha.lower >= crown.lower - tol(crown.lower)).all()
    assert (alpha.lower > crown.lower + 1e-3).any()


class _Spellings(nn.Module):
    """Every spelling of the graph table: torch.add, Tensor.add, operator +, torch.concat,
    F.relu, Tensor.relu, torch.sigmoid, Tensor.tanh, Tensor.flatten, torch.flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu(self.conv(x))
        r = torch.add(h, self.conv2(h)).relu()
        y = torch.concat([r, torch.sigmoid(h)], dim=1).flatten(1)
        z = self.fc(y)
        w = z.add(self.fc2(z).tanh())
        return self.out(torch.flatten(torch.cat((torch.relu(w), z + w), -1), 1))


def test_every_spelling_of_the_graph_table_converts_and_bounds():  # type: ignore[no-untyped-def]
    model = _Spellings().double().eval()
    net = to_network(model, (1, 4, 4))
    kinds = [type(op).__name__ for op in net.layers]
    assert kinds.count("AddOp") == 3 and kinds.count("ConcatOp") == 2
    assert {"SigmoidOp", "TanhOp", "ReluOp"} <= set(kinds)
    x_lo, x_hi, x = make_box(0, 3, (1, 4, 4), 0.1, F64)
    spec = random_spec(0, 3, 2, 3, F64)
    for method in ("ibp", "crown", "alpha-crown"):
        assert_sound(model, x_lo, x_hi, x, spec, method, F64)
