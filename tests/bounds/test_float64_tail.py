"""A rigorous float32 chain finishes each backward pass in float64 below its first activation
(``Propagator.backward_chunk``): there the rows are widest and float32's rounding terms would
cost the most. The bounds must stay sound and come close to float64's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from certify.bounds import compute_bounds, get_method, to_network
from certify.bounds.layers import ConvOp, terms_conv
from certify.nets.layers import Normalize
from certify.radius import margin_lower_bound
from certify.spec import LinfBall, margin_spec

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize(("k", "stride", "padding"),
                         [(3, 1, 1), (4, 2, 1), (3, 2, 0), (5, 3, 2), (2, 2, 0), (1, 1, 0),
                          (4, 3, 1)])
def test_conv_transpose_terms_cover_every_coordinate(k: int, stride: int, padding: int) -> None:
    # the number of products that land on one coordinate of the transpose, counted with all
    # weights and rows 1: the gamma_k of the rounding bounds must cover it, and is not loose
    ci, co, size = 3, 5, 9
    net = to_network(nn.Conv2d(ci, co, k, stride=stride, padding=padding), (ci, size, size))
    op = net.layers[0]
    assert isinstance(op, ConvOp)
    rows = torch.ones(1, *op.out_shape, dtype=F64)
    counts = F.conv_transpose2d(rows, torch.ones_like(op.weight, dtype=F64), None, op.stride,
                                op.padding, op.output_padding)
    _, lin, _ = terms_conv(op)
    assert counts.shape[1:] == op.in_shape
    assert int(counts.max()) <= lin
    assert int(counts.max()) == lin  # the map is large enough for a full coordinate


def _cnn(seed: int, scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize([0.4, 0.5, 0.45], [0.2, 0.25, 0.3]),
                          nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def test_rigorous_float32_bound_is_close_to_float64() -> None:
    # before the tail, float32's rounding terms at the input (the normalization's constant
    # over 768 pixels, the first conv, the box's dot products) took 1.7e-3 off these margins
    # (of 0.003 to 0.06 where positive); with it, 4e-5
    model = _cnn(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    y = model(x).argmax(1)
    rigorous = get_method("crown")
    eps = torch.full((6,), 0.01)
    lower32 = margin_lower_bound(model, x, y, eps, method=rigorous)
    lower64 = margin_lower_bound(model, x.double(), y, eps.double(), method=rigorous)
    assert bool((lower64 > 0).any())
    assert (lower64 - lower32.double()).abs().max().item() < 2e-4


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.5, 1.0, 3.0]),
       eps=st.sampled_from([1e-3, 0.02, 0.1]))
def test_rigorous_float32_bounds_hold_at_sampled_points_and_corners(seed: int, scale: float,
                                                                    eps: float) -> None:
    model = _cnn(seed, scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (2,), generator=g)
    lo, hi = LinfBall(x, torch.full((2,), eps)).box()
    spec = margin_spec(y, 10)
    bounds = compute_bounds(model, lo, hi, get_method("crown"), spec, model_rounding=True)
    points = LinfBall(x, torch.full((2,), eps)).sample(64, corners=True, generator=g)
    points = torch.minimum(torch.maximum(points, lo), hi)  # (P, 2, C, H, W)
    wide = _cnn(seed, scale).double()
    with torch.no_grad():
        for k in range(2):
            for out in (model(points[:, k]).double(), wide(points[:, k].double())):
                values = out @ spec[k].double().t()  # (P, S)
                assert bool((values >= bounds.lower[k].double()).all())
                assert bool((values <= bounds.upper[k].double()).all())
