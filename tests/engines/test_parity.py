"""Parity of the native bound engine with auto_LiRPA on generated MLPs and CNNs.

Like is compared with like:

* ``ibp`` and ``crown-ibp``: end to end (both engines bound the same quantities the same way).
* ``crown``: in two stages, because auto_LiRPA (as configured by the backend, like the native
  engine) intersects CROWN's intermediate bounds with IBP's and *also* intersects the output
  bound with IBP's, which the native engine does not. (1) The intermediate bounds of every ReLU
  input agree; (2) with the same intermediate bounds, the output bounds agree. End to end the
  backend is then never looser than the native engine. The native engine runs with
  ``intermediate_mode="backward"``: its default "auto" may pick forward-mode linear bounds,
  which are looser beyond the second ReLU layer.
* ``alpha-crown``: a local optimization with different step rules (auto_LiRPA: Adam, lr 0.5,
  decay 0.98; native: Adam, lr 0.1; 20 steps each, both keeping the best iterate), compared
  with the same intermediate bounds: the native lower bound may trail auto_LiRPA's by at most
  ``ALPHA_MARGIN`` of auto_LiRPA's improvement over CROWN (measured: at most 7%).

"Within 1e-5 relative" means ``|ours - theirs| <= 1e-5 * max(1, max |theirs|)``, per tensor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_helpers import make_ball, make_cnn, make_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # its import warns about torch.jit
    pytest.importorskip("auto_LiRPA",
                        reason="auto_LiRPA not installed: parity tests need it (see README)")

from certify.bounds import Bounds, compute_bounds, get_method, to_network  # noqa: E402
from certify.bounds.auto_lirpa import auto_lirpa_bounds, auto_lirpa_intermediate  # noqa: E402
from certify.spec import margin_spec  # noqa: E402

REL = 1e-5
ALPHA_MARGIN = 0.2
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _assert_rel(ours: torch.Tensor, theirs: torch.Tensor, what: str, rel: float = REL) -> None:
    ours, theirs = ours.detach(), theirs.detach()
    scale = max(1.0, float(theirs.abs().max())) if theirs.numel() else 1.0
    diff = float((ours - theirs).abs().max()) if theirs.numel() else 0.0
    assert diff <= rel * scale, f"{what}: differs by {diff:.3g} (scale {scale:.3g})"


@st.composite
def networks(draw: st.DrawFn) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """A small MLP or CNN starting with Normalize, in float64."""
    seed = draw(st.integers(0, 2**20))
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 2)), 3, 3)
        widths = draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))
        model = make_mlp(seed, widths, in_shape=shape, classes=draw(st.integers(2, 5)))
    else:
        shape = (draw(st.integers(1, 2)), 6, 6)
        model = make_cnn(seed, channels=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                         stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 1)),
                         batch_norm=draw(st.booleans()), pool=draw(st.booleans()),
                         in_shape=shape, classes=draw(st.integers(2, 5)))
    return model.double(), shape


def _margin_box(model: nn.Module, shape: tuple[int, int, int], seed: int, n: int,
                eps_max: float, dtype: torch.dtype = torch.float64
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ball = make_ball(seed, n, shape, eps_max, dtype)
    with torch.no_grad():
        out = model(ball.center)
    spec = margin_spec(out.argmax(1), out.shape[1]).to(dtype)
    x_lo, x_hi = ball.box()
    return x_lo, x_hi, spec


def _native_intermediate(model: nn.Module, x_lo: torch.Tensor, x_hi: torch.Tensor, *,
                         rigorous: bool = True) -> tuple[Bounds, ...]:
    net = to_network(model, x_lo.shape[1:]).to(dtype=x_lo.dtype, device=x_lo.device)
    return get_method("crown", intermediate_mode="backward",
                      rigorous=rigorous).intermediate(net, x_lo, x_hi)


NATIVE_CROWN = {"intermediate_mode": "backward"}


@SETTINGS
@given(net=networks(), seed=st.integers(0, 2**16), n=st.integers(1, 3),
       eps_max=st.sampled_from([0.02, 0.1, 0.3]))
def test_ibp_and_crown_ibp_agree_end_to_end(net, seed, n, eps_max) -> None:  # type: ignore[no-untyped-def]
    model, shape = net
    x_lo, x_hi, spec = _margin_box(model, shape, seed, n, eps_max)
    for method in ("ibp", "crown-ibp"):
        ours = compute_bounds(model, x_lo, x_hi, method, spec)
        theirs = auto_lirpa_bounds(model, x_lo, x_hi, method, spec)
        _assert_rel(ours.lower, theirs.lower, f"{method} lower")
        _assert_rel(ours.upper, theirs.upper, f"{method} upper")


@SETTINGS
@given(net=networks(), seed=st.integers(0, 2**16), eps_max=st.sampled_from([0.02, 0.1, 0.3]))
def test_crown_intermediate_bounds_agree(net, seed, eps_max) -> None:  # type: ignore[no-untyped-def]
    """One sample (auto_LiRPA picks the neurons to tighten over the whole batch)."""
    model, shape = net
    x_lo, x_hi, _ = _margin_box(model, shape, seed, 1, eps_max)
    ours = _native_intermediate(model, x_lo, x_hi)
    theirs = auto_lirpa_intermediate(model, x_lo, x_hi, "crown")
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        _assert_rel(a.lower, b.lower, f"ReLU {i} input lower")
        _assert_rel(a.upper, b.upper, f"ReLU {i} input upper")


@SETTINGS
@given(net=networks(), seed=st.integers(0, 2**16), n=st.integers(1, 3),
       eps_max=st.sampled_from([0.02, 0.1, 0.3]))
def test_crown_output_agrees_with_the_same_intermediate_bounds(net, seed, n, eps_max) -> None:  # type: ignore[no-untyped-def]
    model, shape = net
    x_lo, x_hi, spec = _margin_box(model, shape, seed, n, eps_max)
    inter = _native_intermediate(model, x_lo, x_hi)
    ours = compute_bounds(model, x_lo, x_hi, "crown", spec, intermediate=inter)
    theirs = auto_lirpa_bounds(model, x_lo, x_hi, "crown", spec, intermediate=inter,
                               intersect_ibp=False)
    _assert_rel(ours.lower, theirs.lower, "crown lower")
    _assert_rel(ours.upper, theirs.upper, "crown upper")


@SETTINGS
@given(net=networks(), seed=st.integers(0, 2**16), n=st.integers(1, 3),
       eps_max=st.sampled_from([0.02, 0.1, 0.3]))
def test_crown_backend_is_never_looser_end_to_end(net, seed, n, eps_max) -> None:  # type: ignore[no-untyped-def]
    model, shape = net
    x_lo, x_hi, spec = _margin_box(model, shape, seed, n, eps_max)
    ours = compute_bounds(model, x_lo, x_hi, get_method("crown", **NATIVE_CROWN), spec)
    theirs = auto_lirpa_bounds(model, x_lo, x_hi, "crown", spec)
    scale = max(1.0, float(ours.lower.detach().abs().max()))
    assert (theirs.lower >= ours.lower - REL * scale).all()
    assert (theirs.upper <= ours.upper + REL * scale).all()


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(net=networks(), seed=st.integers(0, 2**16), eps_max=st.sampled_from([0.05, 0.15]))
def test_alpha_crown_is_no_looser_than_auto_lirpa_s_by_more_than_the_margin(
        net, seed, eps_max) -> None:  # type: ignore[no-untyped-def]
    model, shape = net
    x_lo, x_hi, spec = _margin_box(model, shape, seed, 1, eps_max)
    inter = _native_intermediate(model, x_lo, x_hi)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec, intermediate=inter).lower.detach()
    ours = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec, intermediate=inter).lower
    theirs = auto_lirpa_bounds(model, x_lo, x_hi, "alpha-crown", spec, intermediate=inter,
                               intersect_ibp=False, optimize_upper=False).lower
    scale = max(1.0, float(theirs.abs().max()))
    assert (ours >= crown - REL * scale).all(), "native alpha-crown looser than CROWN"
    assert (theirs >= crown - REL * scale).all(), "auto_LiRPA alpha-crown looser than CROWN"
    allowed = ALPHA_MARGIN * (theirs - crown).clamp(min=0) + REL * scale
    worst = float((theirs - ours - allowed).max())
    assert worst <= 0, f"native alpha-crown trails auto_LiRPA's by {worst:.3g} beyond the margin"


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_float32_parity_on_fixtures(which: str, tiny_mlp, tiny_cnn) -> None:  # type: ignore[no-untyped-def]
    """The default dtype: IBP end to end, CROWN in the two stages, within 1e-5 relative -- the
    plain floating-point bounds (float32's rigorous bounds are wider by their rounding terms,
    which auto_LiRPA does not account for)."""
    model, shape = (tiny_mlp, (1, 4, 4)) if which == "mlp" else (tiny_cnn, (1, 8, 8))
    x_lo, x_hi, spec = _margin_box(model, shape, 3, 4, 0.05, torch.float32)
    _assert_rel(compute_bounds(model, x_lo, x_hi, "ibp", spec, rigorous=False).lower,
                auto_lirpa_bounds(model, x_lo, x_hi, "ibp", spec).lower, "ibp lower")
    for i in range(x_lo.shape[0]):
        one = slice(i, i + 1)
        for a, b in zip(_native_intermediate(model, x_lo[one], x_hi[one], rigorous=False),
                        auto_lirpa_intermediate(model, x_lo[one], x_hi[one]), strict=True):
            # plain bounds leave the lower bound of a neuron proven inactive at its interval
            # bound (nothing uses it, see Propagator._tighten): compared where not proven
            live = a.upper > 0
            _assert_rel(a.lower[live], b.lower[live], "intermediate lower")
            assert (a.lower <= b.lower + REL * b.lower.abs().clamp(min=1)).all()
    inter = _native_intermediate(model, x_lo, x_hi, rigorous=False)
    ours = compute_bounds(model, x_lo, x_hi, "crown", spec, intermediate=inter, rigorous=False)
    theirs = auto_lirpa_bounds(model, x_lo, x_hi, "crown", spec, intermediate=inter,
                               intersect_ibp=False)
    _assert_rel(ours.lower, theirs.lower, "crown lower")
    _assert_rel(ours.upper, theirs.upper, "crown upper")
