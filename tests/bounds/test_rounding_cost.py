"""The price a chain's backward pass pays for its rows' rounding (``Propagator._rounding_cost``)
covers the rounding that happens: rows pushed through a block of linear ops in float32 are
compared with the same rows pushed in float64 (where the float32 weights are exact and the
float64 rounding is ~2^29 times smaller than what is priced), and the priced cost must exceed
what the rows' and constants' error can change the bound by, ``|a32 - a*| · W + |c32 - c*|``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import to_network
from certify.bounds.layers import RULES
from certify.bounds.propagation import EngineOptions, Propagator, _densify
from certify.bounds.relaxations import is_activation

F32, F64 = torch.float32, torch.float64


def _model(seed: int, pool: bool, bias_heavy: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    # a ReLU first (the input is in [0, 1]: it changes nothing): every op below it would be
    # priced in float64, as a rigorous float32 chain finishes its backward passes there
    layers: list[nn.Module] = [nn.ReLU(), nn.Conv2d(2, 6, 3, padding=1),
                               nn.Conv2d(6, 5, 3, stride=2)]
    if pool:
        layers.append(nn.AvgPool2d(2, stride=1))
    layers += [nn.ReLU(), nn.Conv2d(5, 4, 2), nn.Flatten()]
    out = 4 * (1 if pool else 2) ** 2
    layers += [nn.Linear(out, 9), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 5)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # large, cancelling weights and biases: rounding that shows
        for p in model.parameters():
            p.mul_(30.0)
        if bias_heavy:  # the lowest op of a block: its constant's rounding dominates
            model[len(layers) - 4].weight.mul_(1e-5)
            model[len(layers) - 4].bias.mul_(1e3)
    return model


@torch.no_grad()
def _push(prop32: Propagator, prop64: Propagator, top: int, rows: torch.Tensor,
          window: tuple[int, int] | None, bottom: int = -1) -> tuple[float, float]:
    """Push float32 `rows` `(1, R, ...)` of the output of ``layers[top]`` down to the
    activation (or input) below it, or to the output of ``layers[bottom]`` if that comes
    first, in float32 (pricing every op) and in float64; returns
    ``(priced cost, error the rounding made)``, maxima over the rows."""
    samples = torch.zeros(1, dtype=torch.long)
    a32 = rows.reshape(-1, *rows.shape[2:])
    a64 = a32.double()
    cost = torch.zeros(1, rows.shape[1], dtype=F64)
    const_err = torch.zeros(1, rows.shape[1], dtype=F64)
    j = top
    while j > bottom and not is_activation(prop32.layers[j]):
        rules = RULES[type(prop32.layers[j])]
        cost = cost + prop32._rounding_cost(j, a32, samples, window).double()
        if window is not None and rules.backward_window is not None:
            a32, c32, *corner = rules.backward_window(prop32.layers[j], a32, *window)
            a64, c64, *_ = rules.backward_window(prop64.layers[j], a64, *window)
            window = (corner[0], corner[1])
        else:
            if window is not None:  # as the engine does: rows made dense first
                shape = prop32.layers[j].out_shape
                a32, a64 = _densify(a32, window, shape), _densify(a64, window, shape)
                window = None
            a32, c32 = rules.backward(prop32.layers[j], a32)
            a64, c64 = rules.backward(prop64.layers[j], a64)
        if c32 is not None:
            const_err = const_err + (c32.double() - c64).abs().reshape(1, -1)
        j -= 1
    weights = prop32._rounding_weights(j).out.double()[0]
    if window is not None:
        top_, left = window
        weights = weights[..., top_:top_ + a32.shape[-2], left:left + a32.shape[-1]]
    rows_err = ((a32.double() - a64).abs() * weights).flatten(1).sum(1).reshape(1, -1)
    made = rows_err + const_err
    slack = 2.0 ** -40 * (a64.abs() * weights).flatten(1).sum(1).reshape(1, -1)  # float64's
    return float(cost.max()), float((made - slack).max())


@pytest.mark.parametrize(("pool", "bias_heavy"), [(False, False), (True, False), (False, True)])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_priced_rounding_covers_what_float32_makes(pool: bool, bias_heavy: bool, seed: int,
                                                   scale: float) -> None:
    model = _model(seed, pool, bias_heavy)
    net32 = to_network(model, (2, 7, 7)).to(dtype=F32, device="cpu")
    net64 = net32.to(dtype=F64, device="cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 2, 7, 7, generator=g)
    prop32 = Propagator(net32, x - 0.05, x + 0.05, EngineOptions())
    prop64 = Propagator(net64, x.double() - 0.05, x.double() + 0.05, EngineOptions())
    prop32.compute_intermediate("adaptive", linear=True)
    layers = prop32.layers
    positions = [j for j in range(len(layers)) if not is_activation(layers[j])]
    made_any = 0.0
    for top in positions:
        shape = layers[top].out_shape
        rows = torch.randn(1, 6, *shape, generator=g) * scale
        cost, made = _push(prop32, prop64, top, rows, None)
        assert made <= cost, (top, made, cost)
        made_any = max(made_any, made)
        if len(shape) == 3 and shape[1] >= 2:  # rows on a window of a feature map
            window_rows = torch.randn(1, 6, shape[0], 2, 2, generator=g) * scale
            cost, made = _push(prop32, prop64, top, window_rows, (shape[1] - 2, 0))
            assert made <= cost, (top, "window", made, cost)
    assert made_any > 0  # the rows did round: a cost of 0 would fail


def test_rows_error_is_priced_with_the_weights_of_its_layer() -> None:
    model = _model(3, False)
    net = to_network(model, (2, 7, 7)).to(dtype=F32, device="cpu")
    x = torch.rand(2, 2, 7, 7, generator=torch.Generator().manual_seed(0))
    prop = Propagator(net, x - 0.1, x + 0.1, EngineOptions())
    prop.compute_intermediate("adaptive", linear=True)
    top = len(net.layers) - 1
    weights = prop._rounding_weights(top).out
    err = torch.rand(2, 3, *net.layers[top].out_shape, generator=torch.Generator())
    priced = prop._rows_error_cost(top, err, torch.tensor([1, 0]), None)
    expected = (err * weights[[1, 0]].unsqueeze(1)).flatten(2).sum(2)
    torch.testing.assert_close(priced, expected)
    # the weights of a layer's output cover its input's through |L| (plus |b|)
    below = prop._rounding_weights(top - 1).out
    op = net.layers[top]
    assert bool((weights >= (below.flatten(1) @ op.weight.abs().t()) - 1e-6).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cancelling_rows_into_a_large_bias(seed: int) -> None:
    # rows that cancel almost exactly through one op (two equal output neurons, rows of
    # opposite sign) and meet a large bias below it: the constant's error is then |b| times
    # the rows' error, far more than the rounding of |b| · |a| itself
    model = _model(seed, False, bias_heavy=True)
    with torch.no_grad():
        model[7].weight[1] = model[7].weight[0]
    net32 = to_network(model, (2, 7, 7)).to(dtype=F32, device="cpu")
    net64 = net32.to(dtype=F64, device="cpu")
    x = torch.rand(1, 2, 7, 7, generator=torch.Generator().manual_seed(seed))
    prop32 = Propagator(net32, x - 0.05, x + 0.05, EngineOptions())
    prop64 = Propagator(net64, x.double() - 0.05, x.double() + 0.05, EngineOptions())
    prop32.compute_intermediate("adaptive", linear=True)
    rows = torch.zeros(1, 1, 7)
    rows[0, 0, 0], rows[0, 0, 1] = 1.0, -(1.0 + 2.0 ** -20)
    cost, made = _push(prop32, prop64, 7, rows * 1e3, None, bottom=5)
    assert 0 < made <= cost
