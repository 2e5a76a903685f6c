"""User mistakes end in one clear error naming the problem (tested by message)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certify.bounds import compute_bounds, get_method, margin_bounds, to_network
from certify.errors import SpecError, UnknownNameError, UnsupportedLayerError
from certify.nets import Normalize


def test_unsupported_layer_is_named_with_the_supported_ones():  # type: ignore[no-untyped-def]
    model = nn.Sequential(Normalize([0.5], [0.2]), nn.Conv2d(1, 2, 3), nn.ReLU(),
                          nn.LPPool2d(2, 2), nn.Flatten(), nn.Linear(18, 3))
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UnsupportedLayerError, match=r"layer 3 '3' \(LPPool2d\) has no bound rule"
                       r".*supported: Linear, Conv2d, ReLU") as info:
        compute_bounds(model, x, x, "crown")
    assert "certify/bounds/layers.py" in str(info.value)
    nested = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 3), nn.GELU()))
    with pytest.raises(UnsupportedLayerError, match=r"'1.1' \(GELU\)"):
        to_network(nested, (1, 2, 2))


@pytest.mark.parametrize("layer, match", [
    (nn.Conv2d(1, 2, 3, groups=1, dilation=2), "dilation"),
    (nn.Conv2d(2, 2, 3, groups=2), "groups=2"),
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), "circular"),
    (nn.Conv2d(1, 2, 2, padding="same"), "even kernel"),
    (nn.BatchNorm2d(1, track_running_stats=False), "running statistics"),
    (nn.Flatten(0), "start_dim=0"),
    (nn.LeakyReLU(-0.1), "negative_slope=-0.1"),
])
def test_unsupported_configurations(layer, match):  # type: ignore[no-untyped-def]
    shape = (2, 6, 6) if getattr(layer, "groups", 1) == 2 else (1, 6, 6)
    with pytest.raises(UnsupportedLayerError, match=match):
        to_network(nn.Sequential(layer), shape)


def test_shape_mismatches():  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(2, 1, 5, 5)
    with pytest.raises(SpecError, match=r"expects \(16,\) features, gets \(25,\)"):
        compute_bounds(model, x, x)
    with pytest.raises(SpecError, match="add an nn.Flatten"):
        to_network(nn.Sequential(nn.Linear(4, 2)), (1, 2, 2))
    with pytest.raises(SpecError, match=r"expects \(C=3, H, W\)"):
        to_network(nn.Sequential(nn.Conv2d(3, 2, 3)), (1, 6, 6))
    with pytest.raises(SpecError, match="normalizes 3 channels"):
        to_network(nn.Sequential(Normalize([0.5] * 3, [0.2] * 3)), (1, 6, 6))
    net = to_network(model, (1, 4, 4))
    with pytest.raises(SpecError, match=r"takes inputs of shape \(1, 4, 4\)"):
        compute_bounds(net, x, x)


def test_malformed_boxes():  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(SpecError, match=r"empty box: x_lo > x_hi at 1 coordinates"):
        lo = x.clone()
        lo[1, 0, 0, 0] += 0.5
        compute_bounds(model, lo, x)
    with pytest.raises(SpecError, match="x_lo and x_hi must match"):
        compute_bounds(model, x, x[:1])
    with pytest.raises(SpecError, match="NaN"):
        compute_bounds(model, x * float("nan"), x)
    with pytest.raises(SpecError, match="float32 or float64"):
        compute_bounds(model, x.half(), x.half())
    with pytest.raises(SpecError, match="batched"):
        compute_bounds(model, x[0, 0, 0], x[0, 0, 0])


def test_malformed_specs_and_intermediate_bounds():  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(SpecError, match=r"spec must have shape \(N=2, S, K=3\).*\(2, 1, 4\)"):
        compute_bounds(model, x, x, "crown", torch.ones(2, 1, 4))
    with pytest.raises(SpecError, match="float tensor"):
        compute_bounds(model, x, x, "crown", torch.ones(2, 1, 3, dtype=torch.long))
    with pytest.raises(SpecError, match="one Bounds per ReLU"):
        compute_bounds(model, x, x, "crown", intermediate=())


def test_margin_inputs():  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(2, 1, 2, 2)
    y = torch.tensor([0, 2])
    with pytest.raises(SpecError, match="eps must be >= 0"):
        margin_bounds(model, x, y, -0.1)
    with pytest.raises(SpecError, match=r"eps must be >= 0"):
        margin_bounds(model, x, y, torch.tensor([0.1, -1e-3]))
    with pytest.raises(SpecError, match=r"shape \(2,\)"):
        margin_bounds(model, x, y, torch.tensor([0.1, 0.1, 0.1]))
    with pytest.raises(SpecError, match=r"labels must lie in \[0, 3\)"):
        margin_bounds(model, x, torch.tensor([0, 3]), 0.1)
    with pytest.raises(SpecError, match=r"labels must have shape \(2,\)"):
        margin_bounds(model, x, torch.tensor([0]), 0.1)
    with pytest.raises(SpecError, match=r"domain \[0.0, 1.0\]"):
        margin_bounds(model, x + 1.5, y, 0.1)


def test_unknown_method_and_options():  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownNameError, match="unknown method 'alpha_crown'; did you mean "
                                               "'alpha-crown'\\? Available: ibp, crown"):
        get_method("alpha_crown")
    x = torch.rand(1, 1, 2, 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(UnknownNameError, match="'crow'; did you mean 'crown'"):
        compute_bounds(model, x, x, "crow")
    with pytest.raises(SpecError, match="unknown option 'stepz' for method 'alpha-crown'; its "
                                        "options are: memory_budget_mb, chunk_size, rigorous, "
                                        "steps, lr"):
        get_method("alpha-crown", stepz=3)
    with pytest.raises(SpecError, match="unknown option 'steps' for method 'crown'"):
        compute_bounds(model, x, x, "crown", steps=3)
    with pytest.raises(SpecError,
                       match="unknown option 'lr' for method 'ibp'; its options are: rigorous\\."):
        compute_bounds(model, x, x, get_method("ibp"), lr=0.1)


@pytest.mark.parametrize("name, options, match", [
    ("alpha-crown", {"steps": -1}, "steps must be an int >= 0"),
    ("alpha-crown", {"lr": 0.0}, "lr must be > 0"),
    ("crown", {"memory_budget_mb": 0}, "memory_budget_mb must be > 0"),
    ("wong-kolter", {"chunk_size": 0}, "chunk_size must be None or an int >= 1"),
    ("crown", {"intermediate_mode": "fast"}, "intermediate_mode must be 'auto'"),
    ("lp", {"intermediate_method": "lp"}, "intermediate_method must be one of"),
    # every boolean option takes only True or False (a string would be truthy)
    ("bab", {"float32_steps": "no"}, "float32_steps must be True or False"),
    ("bab", {"recompute_intermediate": 1}, "recompute_intermediate must be True or False"),
    ("bab", {"float64": "false"}, "float64 must be True or False"),
    ("crown", {"rigorous": "yes"}, "rigorous must be True or False"),
])
def test_invalid_option_values(name, options, match):  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=match):
        get_method(name, **options)


@pytest.mark.solver
def test_unknown_lp_solver():  # type: ignore[no-untyped-def]
    pytest.importorskip("cvxpy")
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(1, 1, 2, 2)
    with pytest.raises(SpecError, match="solver 'NOPE' is not installed"):
        compute_bounds(model, x, x, "lp", solver="NOPE")
