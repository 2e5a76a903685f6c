"""Exact cases and invariances: zero-width boxes, one linear layer, batch vs per-sample, chunk
sizes, dtypes, gradients, margins."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from bound_helpers import make_box, make_cnn, make_mlp, random_spec
from torch import nn

from certify.bounds import (
    Bounds,
    compute_bounds,
    get_method,
    list_methods,
    margin_bounds,
    to_network,
)
from certify.bounds.base import method_class
from certify.nets import Normalize
from certify.spec import LinfBall, margin_spec

F64 = torch.float64
# branch and bound (complete, budgeted) has its own tests: tests/bounds/test_bab.py
FAST = list_methods(uses_solver=False, external=False, is_complete=False)


def _uses_solver(method: str) -> bool:
    return bool(method_class(method).uses_solver)


def _needs_solver(method: str) -> None:
    if _uses_solver(method):
        pytest.importorskip("cvxpy")


def _methods() -> list:  # type: ignore[type-arg]
    # branch and bound shares its time budget across a batch (not batch-invariant by design);
    # its own tests are in tests/bounds/test_bab.py
    return [pytest.param(m, marks=pytest.mark.solver) if _uses_solver(m) else m
            for m in list_methods(external=False)
            if _uses_solver(m) or not method_class(m).is_complete]


@pytest.mark.parametrize("method", _methods())
def test_zero_width_box_is_the_forward_pass(method):  # type: ignore[no-untyped-def]
    _needs_solver(method)
    model, in_shape = make_cnn(11, 0)
    model = model.double()
    x = torch.rand(2, *in_shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    spec = random_spec(2, 2, 3, 4, F64)
    bounds = compute_bounds(model, x, x, method, spec)
    with torch.no_grad():
        want = torch.einsum("nsk,nk->ns", spec, model(x))
    torch.testing.assert_close(bounds.lower, want, atol=1e-9, rtol=0)
    torch.testing.assert_close(bounds.upper, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", _methods())
def test_single_linear_layer_is_analytic(method, dtype):  # type: ignore[no-untyped-def]
    """``W x0 + b ± eps |W| 1`` through Normalize(0, 1), the box away from the [0, 1] edges."""
    _needs_solver(method)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(OrderedDict(norm=Normalize([0.0], [1.0]), flatten=nn.Flatten(),
                                      out=nn.Linear(9, 4))).to(dtype)
    x = (0.3 + 0.4 * torch.rand(3, 1, 3, 3, generator=gen)).to(dtype)
    eps = torch.tensor([0.0, 0.05, 0.2], dtype=dtype)
    x_lo, x_hi = LinfBall(x, eps).box()
    bounds = compute_bounds(model, x_lo, x_hi, method)
    w, b = model.out.weight.detach(), model.out.bias.detach()
    center = x.flatten(1) @ w.T + b
    radius = eps[:, None] * w.abs().sum(1)[None, :]
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(bounds.lower, center - radius, atol=atol, rtol=0)
    torch.testing.assert_close(bounds.upper, center + radius, atol=atol, rtol=0)


@pytest.mark.parametrize("method", _methods())
def test_batch_equals_per_sample(method):  # type: ignore[no-untyped-def]
    _needs_solver(method)
    if _uses_solver(method):
        model, in_shape, k = make_mlp(4, [4, 3]).double(), (1, 4, 4), 3
    else:
        (model, in_shape), k = make_cnn(4, 1), 4
        model = model.double()
    x_lo, x_hi, _ = make_box(4, 4, in_shape, 0.15, F64)
    spec = random_spec(4, 4, 2, k, F64)
    batch = compute_bounds(model, x_lo, x_hi, method, spec)
    for i in range(4):
        one = compute_bounds(model, x_lo[i:i + 1], x_hi[i:i + 1], method, spec[i:i + 1])
        torch.testing.assert_close(batch.lower[i:i + 1], one.lower, atol=1e-9, rtol=0)
        torch.testing.assert_close(batch.upper[i:i + 1], one.upper, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", ["crown", "crown-ibp", "wong-kolter", "alpha-crown"])
def test_chunk_size_does_not_change_bounds(method):  # type: ignore[no-untyped-def]
    (model, in_shape), k = make_cnn(5, 0), 4
    model = model.double()
    x_lo, x_hi, _ = make_box(5, 3, in_shape, 0.2, F64)
    spec = random_spec(5, 3, 3, k, F64)
    options = {"steps": 3} if method == "alpha-crown" else {}
    ref = compute_bounds(model, x_lo, x_hi, method, spec, **options)
    for chunking in ({"chunk_size": 1}, {"chunk_size": 5}, {"memory_budget_mb": 1e-4}):
        got = compute_bounds(model, x_lo, x_hi, method, spec, **options, **chunking)
        # alpha-CROWN optimizes the samples of a memory-budget group together: the products'
        # last bits depend on the group's shapes, and gradient ascent over every layer's
        # slopes carries such differences into which iterate is best (never into soundness)
        atol = 1e-4 if method == "alpha-crown" and "memory_budget_mb" in chunking else 1e-10
        torch.testing.assert_close(got.lower, ref.lower, atol=atol, rtol=0)
        torch.testing.assert_close(got.upper, ref.upper, atol=atol, rtol=0)


def test_dtype_and_device_follow_the_inputs(tiny_cnn):  # type: ignore[no-untyped-def]
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 4])
    b32 = margin_bounds(tiny_cnn, x, y, 0.02, "crown")
    b64 = margin_bounds(tiny_cnn, x.double(), y, 0.02, "crown")  # float32 model, float64 box
    assert b32.lower.dtype == torch.float32 and b64.lower.dtype == F64
    assert next(tiny_cnn.parameters()).dtype == torch.float32  # the model is not changed
    # both rigorous; float32's rounding-error terms (gamma_k with u = 2^-24) make it looser
    torch.testing.assert_close(b64.lower.float(), b32.lower, atol=1e-3, rtol=0)
    fast = margin_bounds(tiny_cnn, x.double(), y, 0.02, get_method("crown", rigorous=False))
    assert (b64.lower <= fast.lower).all() and (b32.lower.double() <= fast.lower).all()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "wong-kolter", "crown"])
def test_gradients_with_respect_to_weights(method):  # type: ignore[no-untyped-def]
    model, in_shape = make_cnn(6, 0)
    x = torch.rand(3, *in_shape, generator=torch.Generator().manual_seed(0))
    bounds = margin_bounds(model, x, torch.tensor([0, 1, 2]), torch.tensor([0.0, 0.02, 0.1]),
                           method)
    assert bounds.lower.requires_grad
    torch.nn.functional.cross_entropy(
        torch.cat([torch.zeros(3, 1), -bounds.lower], 1), torch.zeros(3, dtype=torch.long)
    ).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        again = margin_bounds(model, x, torch.tensor([0, 1, 2]),
                              torch.tensor([0.0, 0.02, 0.1]), method)
    assert not again.lower.requires_grad
    torch.testing.assert_close(again.lower, bounds.lower.detach())


@pytest.mark.parametrize("method", _methods())
def test_every_method_works_under_no_grad(method, tiny_mlp):  # type: ignore[no-untyped-def]
    _needs_solver(method)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bounds = margin_bounds(tiny_mlp, x, torch.tensor([0, 2]), 0.05, method)
    assert bounds.lower.shape == (2, 2) and torch.isfinite(bounds.lower).all()
    assert all(p.grad is None for p in tiny_mlp.parameters())  # alpha-CROWN leaves no grads


def test_alpha_crown_leaves_model_gradients_alone(tiny_cnn):  # type: ignore[no-untyped-def]
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    margin_bounds(tiny_cnn, x, torch.tensor([0, 1]), 0.05, "alpha-crown", steps=3)
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_margin_bounds_is_compute_bounds_over_the_clipped_ball(tiny_cnn):  # type: ignore[no-untyped-def]
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0] = 1.0
    y = torch.tensor([9, 0, 4])
    eps = torch.tensor([0.3, 0.01, 0.0])
    got = margin_bounds(tiny_cnn, x, y, eps, "wong-kolter")
    x_lo, x_hi = (x - eps.view(-1, 1, 1, 1)).clamp(0, 1), (x + eps.view(-1, 1, 1, 1)).clamp(0, 1)
    want = compute_bounds(tiny_cnn, x_lo, x_hi, "wong-kolter", margin_spec(y, 10),
                          model_rounding=True)
    torch.testing.assert_close(got.lower, want.lower)
    with torch.no_grad():
        logits = tiny_cnn(x[2:])
    margins = logits[:, 4:5] - torch.cat([logits[:, :4], logits[:, 5:]], 1)
    # eps = 0: the exact margins, less the float32 model's own rounding (a few 1e-4 here)
    assert (got.lower[2:] <= margins).all()
    torch.testing.assert_close(got.lower[2:], margins, atol=1e-3, rtol=0)


def test_bounds_of_logits_and_of_a_spatial_output():  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 2)).eval()
    x = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    for method in FAST:
        b = compute_bounds(model, x - 0.01, x + 0.01, method)
        assert b.lower.shape == (2, 2, 2, 2)
        with torch.no_grad():
            assert b.contains(model(x), atol=1e-5).all()
    b = compute_bounds(make_mlp(1, [3]), x[:, :, :4, :4], x[:, :, :4, :4], "crown")
    assert b.lower.shape == (2, 3)


def test_given_intermediate_bounds_are_used(tiny_mlp):  # type: ignore[no-untyped-def]
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x_lo, x_hi = x - 0.05, x + 0.05
    net_ibp = get_method("ibp").intermediate(to_network(tiny_mlp, (1, 4, 4)), x_lo, x_hi)
    own = compute_bounds(tiny_mlp, x_lo, x_hi, "crown-ibp")
    given = compute_bounds(tiny_mlp, x_lo, x_hi, "crown", intermediate=net_ibp)
    torch.testing.assert_close(given.lower, own.lower)  # crown on IBP intermediates = crown-ibp


def test_overflow_gives_infinite_not_wrong_bounds():  # type: ignore[no-untyped-def]
    model = make_mlp(2, [4, 4])
    with torch.no_grad():
        model.fc1.weight.mul_(1e37)
        model.out.weight.mul_(1e37)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for method in FAST:
        b = compute_bounds(model, x - 0.1, x + 0.1, method)
        assert not torch.isnan(b.lower).any() and not torch.isnan(b.upper).any(), method
        assert (b.lower <= b.upper).all(), method


def test_bounds_value_object(tiny_mlp):  # type: ignore[no-untyped-def]
    b = Bounds(torch.zeros(2, 3), torch.ones(2, 3))
    assert b.contains(torch.full((2, 3), 0.5)).tolist() == [True, True]
    inside = torch.full((4, 2, 3), 0.5)
    inside[1, 1, 2] = 1.5
    assert b.contains(inside).tolist() == [True, False]
    assert b.contains(torch.full((2, 3), 1.0 + 1e-3), atol=1e-2).all()
    assert "Bounds(shape=(2, 3)" in repr(b)


@pytest.mark.parametrize("name", ["ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown"])
def test_relu_free_network_gets_the_analytic_box_bound(name: str) -> None:
    # No ReLU: every method is exact on an affine map, W x0 + b -/+ |W| r (r the box radius).
    torch.manual_seed(3)
    layer = nn.Linear(4, 3).double()
    lo = torch.rand(2, 4, dtype=torch.float64) * 0.5
    hi = lo + torch.rand(2, 4, dtype=torch.float64) * 0.5
    b = compute_bounds(nn.Sequential(layer), lo, hi, name)
    center, radius = (lo + hi) / 2, (hi - lo) / 2
    mid = layer(center)
    spread = radius @ layer.weight.abs().T
    torch.testing.assert_close(b.lower, (mid - spread).detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.upper, (mid + spread).detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown"])
def test_empty_batch_gives_empty_bounds(name: str) -> None:
    from certify.bounds import margin_bounds
    from certify.nets import create_arch

    model = create_arch("mlp-8", (1, 4, 4), 3).eval()
    b = margin_bounds(model, torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long), 0.1, name)
    assert b.lower.shape == (0, 2) and b.upper.shape == (0, 2)
