"""Orderings that are theorems (with the same intermediate bounds) and equalities with
independent dense references: Wong & Kolter's dual, CROWN's primal form, and the intermediate
bounds layer by layer."""

from __future__ import annotations

import pytest
import torch
from bound_helpers import (
    F64,
    assert_alpha_crown_never_looser,
    crown_primal,
    dense_blocks,
    interval_block,
    make_box,
    make_cnn,
    make_mlp,
    random_spec,
    tol,
    wong_kolter_dual,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.bounds import compute_bounds, get_method, to_network
from certify.bounds.propagation import forward_is_exact


def generated(seed: int, kind: int) -> tuple[torch.nn.Sequential, tuple[int, ...]]:
    if kind < 3:
        return make_cnn(seed, kind)
    return make_mlp(seed, [5, 4, 6][: kind - 2], classes=4), (1, 4, 4)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**20), kind=st.integers(0, 5), eps=st.sampled_from([0.05, 0.3]))
def test_alpha_crown_never_looser_than_crown(seed, kind, eps):  # type: ignore[no-untyped-def]
    model, in_shape = generated(seed, kind)
    assert_alpha_crown_never_looser(model, in_shape, seed, eps, classes=4, steps=8)


def test_alpha_crown_improves_somewhere():  # type: ignore[no-untyped-def]
    """Not a theorem, but optimizing the slopes must help on a net with unstable neurons."""
    model = make_mlp(3, [12, 12], classes=4).double()
    x_lo, x_hi, _ = make_box(3, 4, (1, 4, 4), 0.2, F64)
    spec = random_spec(3, 4, 3, 4, F64)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec)
    alpha = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec)
    assert (alpha.lower - crown.lower).max() > 1e-4


@pytest.mark.solver
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), widths=st.lists(st.integers(2, 6), min_size=1, max_size=2),
       eps=st.sampled_from([0.1, 0.4]))
def test_lp_is_tightest(seed, widths, eps):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    model = make_mlp(seed, widths, in_shape=(1, 3, 3), classes=3).double()
    x_lo, x_hi, _ = make_box(seed, 2, (1, 3, 3), eps, F64)
    spec = random_spec(seed, 2, 2, 3, F64)
    net = to_network(model, (1, 3, 3))
    for inter_method, methods in (("crown", ("crown", "alpha-crown")), ("wong-kolter",
                                                                       ("wong-kolter",))):
        inter = get_method(inter_method).intermediate(net, x_lo, x_hi)
        lp = compute_bounds(net, x_lo, x_hi, "lp", spec, intermediate=inter)
        found = {m: compute_bounds(net, x_lo, x_hi, m, spec, intermediate=inter) for m in methods}
        t = 1e-8 * (1 + lp.lower.abs().max().item())
        for m, b in found.items():
            assert (lp.lower >= b.lower - t).all(), m
            assert (lp.upper <= b.upper + t).all(), m
        if "alpha-crown" in found:
            assert (found["alpha-crown"].lower >= found["crown"].lower - t).all()


@pytest.mark.solver
def test_lp_with_its_default_intermediate_bounds_beats_crown(tiny_cnn):  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    model = tiny_cnn.double()
    x_lo, x_hi, _ = make_box(0, 2, (1, 8, 8), 0.05, F64)
    spec = random_spec(0, 2, 2, 10, F64)
    lp = compute_bounds(model, x_lo, x_hi, "lp", spec)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec)
    assert (lp.lower >= crown.lower - 1e-8).all() and (lp.upper <= crown.upper + 1e-8).all()


def _relu_layers(model: torch.nn.Sequential, in_shape):  # type: ignore[no-untyped-def]
    return to_network(model, in_shape).relu_positions


@pytest.mark.parametrize("method, reference", [("wong-kolter", wong_kolter_dual),
                                               ("crown", crown_primal)])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20), kind=st.integers(0, 5), eps=st.sampled_from([0.05, 0.3]))
def test_output_equals_reference(method, reference, seed, kind, eps):  # type: ignore[no-untyped-def]
    """With the same intermediate bounds, the output bound is the textbook one: Wong & Kolter's
    dual objective J (= CROWN with the parallel lower slope), CROWN's primal form."""
    model, in_shape = generated(seed, kind)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 2, in_shape, eps, F64)
    spec = random_spec(seed, 2, 3, 4, F64)
    net = to_network(model, in_shape)
    inter = get_method(method).intermediate(net, x_lo, x_hi)
    got = compute_bounds(net, x_lo, x_hi, method, spec, intermediate=inter)
    blocks = dense_blocks(model, in_shape)
    last = len(blocks) - 1
    for n in range(2):
        pre = [(b.lower[n].flatten(), b.upper[n].flatten()) for b in inter]
        lo, hi = x_lo[n].flatten(), x_hi[n].flatten()
        want_lower = reference(blocks, lo, hi, spec[n], last, pre)
        want_upper = -reference(blocks, lo, hi, -spec[n], last, pre)
        t = tol(want_lower, want_upper)
        torch.testing.assert_close(got.lower[n], want_lower, atol=t, rtol=0)
        torch.testing.assert_close(got.upper[n], want_upper, atol=t, rtol=0)


@pytest.mark.parametrize("mode", ["auto", "backward"])
@pytest.mark.parametrize("method, reference", [("wong-kolter", wong_kolter_dual),
                                               ("crown", crown_primal)])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), kind=st.integers(0, 5))
def test_intermediate_bounds_equal_reference(mode, method, reference, seed, kind):  # type: ignore[no-untyped-def]
    """Layer by layer: the interval bound from the previous layer (module by module) intersected
    with the reference linear bound of each unstable neuron; for the first layer the interval
    bound alone when it is exact (at most one mixing module), else intersected too. Windows,
    chunks, forward mode and neuron skipping must not change a number."""
    model, in_shape = generated(seed, kind)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 2, in_shape, 0.2, F64)
    net = to_network(model, in_shape)
    inter = get_method(method, intermediate_mode=mode, chunk_size=7).intermediate(
        net, x_lo, x_hi)
    blocks = dense_blocks(model, in_shape)
    for n in range(2):
        pre = [(b.lower[n].flatten(), b.upper[n].flatten()) for b in inter]
        lo_in, hi_in = x_lo[n].flatten(), x_hi[n].flatten()
        for k, (w, _, parts) in enumerate(blocks[:-1]):
            box_lo, box_hi = (lo_in, hi_in) if k == 0 else (pre[k - 1][0].clamp(min=0),
                                                            pre[k - 1][1].clamp(min=0))
            ibp_lo, ibp_hi = interval_block(parts, box_lo, box_hi)
            want_lo, want_hi = ibp_lo.clone(), ibp_hi.clone()
            mixing = sum(bool((wm.count_nonzero(1) > 1).any()) for wm, _ in parts)
            if k > 0 or mixing > 1:
                eye = torch.eye(w.shape[0], dtype=F64)
                ref_lo = reference(blocks, lo_in, hi_in, eye, k, pre[:k])
                ref_hi = -reference(blocks, lo_in, hi_in, -eye, k, pre[:k])
                unstable = (ibp_lo < 0) & (ibp_hi > 0)
                want_lo = torch.where(unstable, torch.maximum(ibp_lo, ref_lo), ibp_lo)
                want_hi = torch.where(unstable, torch.minimum(ibp_hi, ref_hi), ibp_hi)
            t = tol(want_lo, want_hi)
            torch.testing.assert_close(pre[k][0], want_lo, atol=t, rtol=0)
            torch.testing.assert_close(pre[k][1], want_hi, atol=t, rtol=0)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20), kind=st.integers(0, 5))
def test_forward_mode_equals_backward_where_exact(seed, kind):  # type: ignore[no-untyped-def]
    """Forward-mode intermediate bounds equal backward mode's where the two are exact: every
    upper bound, and every lower bound of a neuron not proven inactive (plain backward mode
    guesses inactive neurons and leaves the lower bound of those it proves at the interval
    bound, which nothing uses: see Propagator._tighten)."""
    model, in_shape = generated(seed, kind)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 3, in_shape, 0.2, F64)
    net = to_network(model, in_shape)
    fwd = get_method("crown", intermediate_mode="forward", rigorous=False).intermediate(
        net, x_lo, x_hi)
    bwd = get_method("crown", intermediate_mode="backward", rigorous=False).intermediate(
        net, x_lo, x_hi)
    for i, pos in enumerate(net.relu_positions):
        if forward_is_exact(net.layers, pos) and all(
                forward_is_exact(net.layers, p) for p in net.relu_positions[:i]):
            t = tol(bwd[i].lower, bwd[i].upper)
            live = bwd[i].upper > 0
            torch.testing.assert_close(fwd[i].lower[live], bwd[i].lower[live], atol=t, rtol=0)
            torch.testing.assert_close(fwd[i].upper, bwd[i].upper, atol=t, rtol=0)
            assert (bwd[i].lower <= fwd[i].lower + t).all()
