"""alpha-CROWN on every layer: optimized intermediate bounds are sound and pay off."""

from __future__ import annotations

import torch
from bound_helpers import make_box, make_mlp, random_spec
from torch import nn

from certify.bounds import compute_bounds, get_method
from certify.bounds.alpha_crown import optimized_intermediate
from certify.bounds.network import spec_rows, to_network
from certify.bounds.propagation import EngineOptions, Propagator


def _pre_activations(model: nn.Sequential, xs: torch.Tensor) -> list[torch.Tensor]:
    out, h = [], xs
    for m in model:
        if isinstance(m, nn.ReLU):
            out.append(h.flatten(1))
        h = m(h)
    return out


def test_optimized_intermediate_bounds_contain_the_network_and_beat_crown() -> None:
    model = make_mlp(4, [16, 16, 16]).double()
    x_lo, x_hi, _ = make_box(4, 3, (1, 4, 4), 0.3, torch.float64)
    spec = random_spec(4, 3, 2, 3, torch.float64)
    net = to_network(model, (1, 4, 4)).to(dtype=torch.float64, device="cpu").detach()
    body, rows = spec_rows(net, spec)
    prop = Propagator(body, x_lo, x_hi, EngineOptions(), spec=rows)
    prop.compute_intermediate("adaptive", linear=True)
    crown = {p: prop.pre_bounds[p] for p in body.relu_positions}
    w = rows.weight.reshape(3, 2, *rows.in_shape)
    _, optimized = optimized_intermediate(get_method("alpha-crown", steps=30), prop, w,
                                          rows.bias, rows.weight_err.reshape(w.shape),
                                          rows.bias_err)
    gen = torch.Generator().manual_seed(0)
    points = x_lo + (x_hi - x_lo) * torch.rand(2000, *x_lo.shape, generator=gen,
                                               dtype=torch.float64)
    corners = torch.where(torch.rand(2000, *x_lo.shape, generator=gen) < 0.5, x_lo, x_hi)
    tighter = 0.0
    for p, z in zip(body.relu_positions,
                    zip(*(_pre_activations(model, xs.reshape(-1, 1, 4, 4)) for xs in
                          (points, corners)), strict=True), strict=True):
        lo, hi = (t.reshape(3, -1) for t in optimized[p])
        c_lo, c_hi = (t.reshape(3, -1) for t in crown[p])
        assert (lo >= c_lo).all() and (hi <= c_hi).all()  # intersected with CROWN's
        for values in z:
            v = values.reshape(2000, 3, -1)
            assert (v >= lo - 1e-12).all() and (v <= hi + 1e-12).all()
        tighter += float((c_hi - c_lo).sum() - (hi - lo).sum())
    assert tighter > 0  # the deeper layers' bounds improved somewhere


def test_every_layer_beats_the_last_layer_only() -> None:
    model = make_mlp(9, [24, 24, 24]).double()
    x_lo, x_hi, _ = make_box(9, 4, (1, 4, 4), 0.25, torch.float64)
    spec = random_spec(9, 4, 3, 3, torch.float64)
    last = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec, optimize_intermediate=False)
    every = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec)
    assert (every.lower >= crown.lower).all() and (every.upper <= crown.upper).all()
    assert float(every.lower.mean()) > float(last.lower.mean())


def test_lower_only_keeps_crowns_upper_bound() -> None:
    model = make_mlp(2, [12, 12]).double()
    x_lo, x_hi, _ = make_box(2, 2, (1, 4, 4), 0.2, torch.float64)
    spec = random_spec(2, 2, 2, 3, torch.float64)
    both = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec)
    lower_only = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec, optimize_upper=False)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec)
    torch.testing.assert_close(lower_only.upper, crown.upper, atol=1e-12, rtol=0)
    assert (lower_only.lower >= crown.lower).all()
    assert (both.upper <= crown.upper).all()
