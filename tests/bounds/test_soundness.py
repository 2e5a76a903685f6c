"""Soundness: every method's bounds contain the outputs at sampled, corner and PGD points.

Generated networks (hypothesis: widths, depths, seeds, layer variants) and boxes (centers on
and off the [0, 1] edges, per-sample eps including 0), in float32 and float64.
"""

from __future__ import annotations

import pytest
import torch
from bound_helpers import (
    SOUND_ATOL,
    all_points,
    assert_sound,
    make_box,
    make_cnn,
    make_mlp,
    random_spec,
    spec_values,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.bounds import list_methods, margin_bounds
from certify.spec import LinfBall, margin_spec

# branch and bound (complete, budgeted) has its own tests: tests/bounds/test_bab.py
FAST = list_methods(uses_solver=False, external=False, is_complete=False)
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**20), widths=st.lists(st.integers(1, 10), min_size=0, max_size=3),
       eps_max=st.sampled_from([0.02, 0.1, 0.4]))
def test_generated_mlp(method, dtype, seed, widths, eps_max):  # type: ignore[no-untyped-def]
    model = make_mlp(seed, widths)
    x_lo, x_hi, x = make_box(seed, 3, (1, 4, 4), eps_max, dtype)
    spec = random_spec(seed, 3, 2, 3, dtype)
    assert_sound(model, x_lo, x_hi, x, spec, method, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20), variant=st.integers(0, 2),
       eps_max=st.sampled_from([0.02, 0.15]))
def test_generated_cnn(method, dtype, seed, variant, eps_max):  # type: ignore[no-untyped-def]
    model, in_shape = make_cnn(seed, variant)
    x_lo, x_hi, x = make_box(seed, 3, in_shape, eps_max, dtype)
    spec = random_spec(seed, 3, 3, 4, dtype)
    assert_sound(model, x_lo, x_hi, x, spec, method, dtype)


@pytest.mark.parametrize("mode", ["backward", "forward"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), variant=st.integers(0, 2))
def test_intermediate_modes_sound(mode, seed, variant):  # type: ignore[no-untyped-def]
    model, in_shape = make_cnn(seed, variant)
    x_lo, x_hi, x = make_box(seed, 3, in_shape, 0.1, torch.float64)
    spec = random_spec(seed, 3, 3, 4, torch.float64)
    # forward mode has no rounding-error accounting: it serves rigorous=False bounds only
    rigorous = mode != "forward"
    for method in ("crown", "wong-kolter", "alpha-crown"):
        assert_sound(model, x_lo, x_hi, x, spec, method, torch.float64, intermediate_mode=mode,
                     rigorous=rigorous)


@pytest.mark.solver
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**20), widths=st.lists(st.integers(1, 5), min_size=1, max_size=2))
def test_generated_lp(dtype, seed, widths):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    model = make_mlp(seed, widths, in_shape=(1, 2, 3))
    x_lo, x_hi, x = make_box(seed, 2, (1, 2, 3), 0.3, dtype)
    spec = random_spec(seed, 2, 2, 3, dtype)
    assert_sound(model, x_lo, x_hi, x, spec, "lp", dtype)


@pytest.mark.solver
def test_lp_cnn_every_layer():  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    for variant in range(3):
        model, in_shape = make_cnn(7, variant, classes=3)
        x_lo, x_hi, x = make_box(3, 2, in_shape, 0.05, torch.float64)
        assert_sound(model, x_lo, x_hi, x, random_spec(1, 2, 2, 3, torch.float64), "lp",
                     torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", list_methods(external=False))
def test_fixture_nets_margins(method, dtype, tiny_mlp, tiny_cnn):  # type: ignore[no-untyped-def]
    """The conftest nets, through ``margin_bounds`` (clipped balls, per-sample eps)."""
    if method in ("lp", "milp"):
        pytest.importorskip("cvxpy")
        if dtype == torch.float32:
            pytest.skip("solver methods: float64 only here (slow); float32 lp in test_generated_lp")
    cases = [(tiny_mlp, (1, 4, 4), 3), (tiny_cnn, (1, 8, 8), 10)]
    if method in ("lp", "milp"):
        cases = cases[:1]
    for model, in_shape, k in cases:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(3, *in_shape, generator=gen).to(dtype)
        y = torch.tensor([0, 1, 2])
        eps = torch.tensor([0.0, 0.03, 0.2], dtype=dtype)
        model = model.to(dtype)
        budget = {"max_domains": 50} if method == "bab" else {}
        bounds = margin_bounds(model, x, y, eps, method, **budget)
        x_lo, x_hi = LinfBall(x, eps).box()
        spec = margin_spec(y, k).to(dtype)
        points = all_points(model, x_lo, x_hi, spec, x)
        with torch.no_grad():
            values = spec_values(model, points, spec)
        atol = SOUND_ATOL[dtype] * (1 + values.abs().max().item())
        assert bounds.contains(values, atol=atol).all(), method
