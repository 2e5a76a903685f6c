"""Parity of the native DAG engine with auto_LiRPA 0.7.1: residual networks (the zoo ResNet and
generated residual DAGs) and a MaxPool CNN, float64, plain floating point (``rigorous=False``).

* IBP end to end;
* CROWN's intermediate bounds of every ReLU input (one sample: auto_LiRPA picks the neurons to
  tighten over the whole batch), on the neurons the native engine tightens (the unstable ones);
* CROWN's output with the *same* intermediate bounds (auto_LiRPA's, without its extra IBP
  intersection of the output); end to end, auto_LiRPA (which also intersects the output with
  IBP) is never looser.

"Within 1e-5" means ``|ours - theirs| <= 1e-5 * max(1, max |theirs|)``.
"""

from __future__ import annotations

import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from engine_helpers import init_weights, make_ball
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # its import warns about torch.jit
    pytest.importorskip("auto_LiRPA",
                        reason="auto_LiRPA not installed: parity tests need it (see README)")

sys.path.insert(0, str(Path(__file__).parent.parent / "bounds"))
from dag_helpers import make_dag  # noqa: E402

from certify.bounds import compute_bounds, get_method, to_network  # noqa: E402
from certify.bounds.auto_lirpa import auto_lirpa_bounds, auto_lirpa_intermediate  # noqa: E402
from certify.bounds.layers import ReluOp  # noqa: E402
from certify.nets import create_arch  # noqa: E402
from certify.nets.layers import Normalize  # noqa: E402
from certify.spec import margin_spec  # noqa: E402

REL = 1e-5
F64 = torch.float64
PLAIN = {"rigorous": False}
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    ours, theirs = ours.detach(), theirs.detach()
    if not theirs.numel():
        return
    scale = max(1.0, float(theirs.abs().max()))
    diff = float((ours - theirs).abs().max())
    assert diff <= REL * scale, f"{what}: differs by {diff:.3g} (scale {scale:.3g})"


def _resnet(seed: int) -> tuple[nn.Module, tuple[int, int, int]]:
    model = create_arch("resnet-3-4", (1, 8, 8), 4, mean=[0.3], std=[0.4])
    return init_weights(model, torch.Generator().manual_seed(seed)), (1, 8, 8)


def _maxpool_cnn(seed: int) -> tuple[nn.Module, tuple[int, int, int]]:
    model = nn.Sequential(OrderedDict(
        norm=Normalize([0.5], [0.25]), conv1=nn.Conv2d(1, 3, 3, padding=1), relu1=nn.ReLU(),
        pool=nn.MaxPool2d(2), conv2=nn.Conv2d(3, 4, 2), relu2=nn.ReLU(), flatten=nn.Flatten(),
        out=nn.Linear(16, 4)))
    return init_weights(model, torch.Generator().manual_seed(seed)), (1, 6, 6)


def _networks(seed: int, which: int) -> tuple[nn.Module, tuple[int, int, int]]:
    if which == 0:
        return _resnet(seed)
    if which == 1:
        return _maxpool_cnn(seed)
    return make_dag(seed, [0, 1, 2, 5][which - 2], classes=4)  # the ReLU-only residual DAGs


def _box(model: nn.Module, shape: tuple[int, int, int], seed: int, n: int, eps: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ball = make_ball(seed, n, shape, eps, F64)
    with torch.no_grad():
        out = model(ball.center)
    x_lo, x_hi = ball.box()
    return x_lo, x_hi, margin_spec(out.argmax(1), out.shape[1]).to(F64)


@SETTINGS
@given(seed=st.integers(0, 2**16), which=st.integers(0, 5), n=st.integers(1, 3),
       eps=st.sampled_from([0.01, 0.05, 0.2]))
def test_ibp_agrees_end_to_end(seed, which, n, eps) -> None:  # type: ignore[no-untyped-def]
    model, shape = _networks(seed, which)
    model = model.double()
    x_lo, x_hi, spec = _box(model, shape, seed, n, eps)
    ours = compute_bounds(model, x_lo, x_hi, "ibp", spec, **PLAIN)
    theirs = auto_lirpa_bounds(model, x_lo, x_hi, "ibp", spec)
    _close(ours.lower, theirs.lower, "ibp lower")
    _close(ours.upper, theirs.upper, "ibp upper")


@SETTINGS
@given(seed=st.integers(0, 2**16), which=st.integers(0, 5),
       eps=st.sampled_from([0.01, 0.05, 0.2]))
def test_crown_agrees(seed, which, eps) -> None:  # type: ignore[no-untyped-def]
    model, shape = _networks(seed, which)
    model = model.double()
    x_lo, x_hi, spec = _box(model, shape, seed, 1, eps)
    net = to_network(model, shape)
    crown = get_method("crown", intermediate_mode="backward", **PLAIN)
    ours_inter = crown.intermediate(net, x_lo, x_hi)
    theirs_inter = auto_lirpa_intermediate(model, x_lo, x_hi, "crown")
    relu = [b for p, b in zip(net.activation_positions, ours_inter, strict=True)
            if isinstance(net.layers[p], ReluOp)]  # auto_LiRPA's are the ReLUs'
    assert len(relu) == len(theirs_inter)
    for i, (a, b) in enumerate(zip(relu, theirs_inter, strict=True)):
        # the native engine tightens the neurons unstable by intervals (the others keep their
        # interval bound, which their relaxation does not use); auto_LiRPA tightens more
        # neurons after a merge: equal where both tighten, never looser elsewhere
        unstable = (a.lower < 0) & (a.upper > 0)
        _close(a.lower[unstable], b.lower[unstable], f"ReLU {i} input lower")
        _close(a.upper[unstable], b.upper[unstable], f"ReLU {i} input upper")
        assert (b.lower >= a.lower - REL).all() and (b.upper <= a.upper + REL).all()
    if len(relu) == len(ours_inter):  # (MaxPool has no intermediate bounds in auto_LiRPA's)
        ours = compute_bounds(model, x_lo, x_hi, "crown", spec, intermediate=theirs_inter,
                              **PLAIN)
        theirs = auto_lirpa_bounds(model, x_lo, x_hi, "crown", spec,
                                   intermediate=theirs_inter, intersect_ibp=False)
        _close(ours.lower, theirs.lower, "crown lower (same intermediate bounds)")
        _close(ours.upper, theirs.upper, "crown upper (same intermediate bounds)")
    # end to end, auto_LiRPA also intersects the output with IBP: never looser
    ours = compute_bounds(model, x_lo, x_hi, crown, spec)
    theirs = auto_lirpa_bounds(model, x_lo, x_hi, "crown", spec)
    scale = max(1.0, float(ours.lower.detach().abs().max()))
    assert (theirs.lower >= ours.lower - REL * scale).all()
    assert (theirs.upper <= ours.upper + REL * scale).all()
