"""The ``milp`` bound method: exact against a brute-force enumeration of activation regions,
ordered above ``lp`` and ``crown`` with the same intermediate bounds, sound, and honest about
time limits (``unknown`` rows keep a sound fallback; the radius search does not count them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bound_helpers import all_points, make_box, make_mlp, random_spec, spec_values
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.bounds import compute_bounds, get_method, margin_bounds, to_network
from certify.errors import SpecError

pytest.importorskip("cvxpy")
from brute_force import grid_min_spec, make_net2d, min_spec, regions  # noqa: E402

import certify.bounds.solver as solver_module  # noqa: E402
from certify.bounds.milp import MilpBounds, refine_intermediate  # noqa: E402

pytestmark = pytest.mark.solver
F64 = torch.float64


def _box2d(center: np.ndarray, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    lo = np.clip(center - eps, 0, 1)
    hi = np.clip(center + eps, 0, 1)
    return (torch.tensor(lo, dtype=F64).view(1, 1, 1, 2),
            torch.tensor(hi, dtype=F64).view(1, 1, 1, 2))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), widths=st.sampled_from([[6, 3], [8], [5, 4], [4, 4, 3]]),
       eps=st.sampled_from([0.1, 0.25, 0.6]))
def test_milp_equals_the_brute_force_minimum(seed, widths, eps):  # type: ignore[no-untyped-def]
    """The MILP's lower bound is the exact minimum over the box (regions enumerated by LPs)."""
    model = make_net2d(seed, widths)
    rng = np.random.default_rng(seed)
    center = rng.random(2)
    x_lo, x_hi = _box2d(center, eps)
    lo, hi = x_lo.flatten().numpy(), x_hi.flatten().numpy()
    rows = rng.standard_normal((2, 3))
    spec = torch.tensor(rows, dtype=F64)[None]
    b = compute_bounds(model, x_lo, x_hi, "milp", spec)
    assert isinstance(b, MilpBounds) and b.optimal.all()
    parts = regions(model, lo, hi)
    for r in range(2):
        truth = min_spec(parts, rows[r], lo, hi)
        assert truth <= grid_min_spec(model, rows[r], lo, hi, steps=61) + 1e-9  # enumerator
        tol = float(b.tolerance[0, r])
        assert float(b.lower[0, r]) <= truth + 1e-9, "unsound: above the true minimum"
        assert float(b.lower[0, r]) >= truth - tol - 1e-7, "not exact"


def test_exact_upper_equals_the_brute_force_maximum():  # type: ignore[no-untyped-def]
    model = make_net2d(3, [6, 4])
    x_lo, x_hi = _box2d(np.array([0.4, 0.55]), 0.3)
    lo, hi = x_lo.flatten().numpy(), x_hi.flatten().numpy()
    row = np.array([1.0, -1.0, 0.5])
    spec = torch.tensor(row, dtype=F64).view(1, 1, 3)
    b = compute_bounds(model, x_lo, x_hi, "milp", spec, exact_upper=True)
    truth = -min_spec(regions(model, lo, hi), -row, lo, hi)
    assert b.upper_status == (("optimal",),)
    assert truth - 1e-9 <= float(b.upper[0, 0]) <= truth + float(b.tolerance[0, 0]) + 1e-7
    relaxed = compute_bounds(model, x_lo, x_hi, "milp", spec)
    assert relaxed.upper_status == (("relaxation",),)
    assert float(relaxed.upper[0, 0]) >= float(b.upper[0, 0]) - 1e-9


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), widths=st.sampled_from([[5, 4], [6], [4, 3, 3]]))
def test_milp_above_lp_above_crown_with_the_same_intermediate_bounds(seed, widths):  # type: ignore[no-untyped-def]
    model = make_mlp(seed, widths, in_shape=(1, 3, 3), classes=3).double()
    net = to_network(model, (1, 3, 3))
    x_lo, x_hi, x = make_box(seed, 2, (1, 3, 3), 0.3, F64)
    spec = random_spec(seed, 2, 2, 3, F64)
    inter = get_method("crown").intermediate(net, x_lo, x_hi)
    crown = compute_bounds(net, x_lo, x_hi, "crown", spec, intermediate=inter)
    lp = compute_bounds(net, x_lo, x_hi, "lp", spec, intermediate=inter)
    milp = compute_bounds(net, x_lo, x_hi, "milp", spec, intermediate=inter)
    assert (milp.lower >= crown.lower - 1e-9).all()
    assert (milp.lower >= lp.lower - milp.tolerance - 1e-9).all()
    # sound: below every reachable value (samples, corners, PGD points)
    points = all_points(model, x_lo, x_hi, spec, x)
    with torch.no_grad():
        values = spec_values(model, points, spec)
    assert (values >= milp.lower - 1e-9).all()
    assert (values <= milp.upper + 1e-9).all()


def _relu_inputs(model: torch.nn.Module, xs: torch.Tensor) -> list[torch.Tensor]:
    """The input of every ReLU of `model` at points `(n, N, ...)`, each `(n, N, features)`."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
             for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        with torch.no_grad():
            model(xs.reshape(-1, *xs.shape[2:]))
    finally:
        for h in hooks:
            h.remove()
    return [t.reshape(xs.shape[0], xs.shape[1], -1) for t in seen]


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), eps=st.sampled_from([0.05, 0.15, 0.3]))
def test_threshold_mode_decides_like_the_exact_minimum(seed, eps):  # type: ignore[no-untyped-def]
    """``threshold=0``: the same verdict as the exact minima, sound lower bounds, row statuses."""
    model = make_net2d(seed, [8, 6])
    x = torch.rand(3, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    y = model(x).argmax(1)
    exact = margin_bounds(model, x, y, eps, "milp")
    decided = margin_bounds(model, x, y, eps, "milp", threshold=0.0)
    allowed = {"optimal", "above threshold", "at or below threshold",
               "skipped: another row is at or below the threshold"}
    for i in range(3):
        assert set(decided.status[i]) <= allowed
        truth = float(exact.lower[i].min())
        if abs(truth) > 1e-6:  # away from the tolerance: the verdicts agree
            assert (float(decided.lower[i].min()) > 0) == (truth > 0)
        if truth > 1e-6:
            assert all(st in ("optimal", "above threshold") for st in decided.status[i])
    # sound: never above the exact minimum (plus its tolerance)
    assert (decided.lower <= exact.lower + exact.tolerance + 1e-9).all()


def test_refined_intermediate_bounds_are_tighter_and_sound():  # type: ignore[no-untyped-def]
    model = make_mlp(1, [10, 10, 8], in_shape=(1, 3, 3), classes=3).double().eval()
    net = to_network(model, (1, 3, 3))
    x_lo, x_hi, x = make_box(1, 2, (1, 3, 3), 0.3, F64)
    with torch.no_grad():
        crown = get_method("crown").intermediate(net, x_lo, x_hi)
    pre = _relu_inputs(model, all_points(model, x_lo, x_hi, random_spec(0, 2, 1, 3, F64), x))
    for method in ("lp", "alpha-crown"):
        refined = refine_intermediate(net, x_lo, x_hi, crown, method=method)
        assert len(refined) == len(crown)
        gained = 0.0
        for b, c, values in zip(refined, crown, pre, strict=True):
            assert (b.lower >= c.lower).all() and (b.upper <= c.upper).all()
            gained += float(((c.upper - c.lower) - (b.upper - b.lower)).sum())
            assert (values >= b.lower.flatten(1) - 1e-9).all(), method
            assert (values <= b.upper.flatten(1) + 1e-9).all(), method
        assert gained > 0, method


def test_refined_bounds_of_the_model_as_it_runs_hold_for_its_float32_pre_activations():  # type: ignore[no-untyped-def]
    """With the model's own rounding (``runs_in``), the refined pre-activation bounds are the
    exact network's widened by the model's rounding: they contain the exact network's refined
    bounds and the float32 model's computed pre-activations (no tolerance), and stay within
    the given (CROWN's, also widened) bounds."""
    from dataclasses import replace

    model = make_mlp(2, [10, 10, 8], in_shape=(1, 3, 3), classes=3).float().eval()
    x_lo, x_hi, x = make_box(2, 2, (1, 3, 3), 0.3, torch.float32)
    exact = to_network(model, (1, 3, 3)).to(dtype=F64, device="cpu")
    runs = replace(exact, runs_in=torch.float32)
    lo64, hi64 = x_lo.double(), x_hi.double()
    with torch.no_grad():
        crown = get_method("crown").intermediate(runs, lo64, hi64)
        crown_exact = get_method("crown").intermediate(exact, lo64, hi64)
    points = all_points(model, x_lo, x_hi, random_spec(0, 2, 1, 3, torch.float32), x)
    pre = _relu_inputs(model, points)  # the float32 model's own pre-activations
    for method in ("lp", "alpha-crown"):
        refined = refine_intermediate(runs, lo64, hi64, crown, method=method)
        plain = refine_intermediate(exact, lo64, hi64, crown_exact, method=method)
        for k, (b, c, p, values) in enumerate(zip(refined, crown, plain, pre, strict=True)):
            assert (b.lower >= c.lower).all() and (b.upper <= c.upper).all()
            assert (values.double() >= b.lower.flatten(1)).all(), (method, k)
            assert (values.double() <= b.upper.flatten(1)).all(), (method, k)
            if k > 0 and method == "lp":  # a refined layer: the exact LP's bounds, widened
                widened = (b.lower <= p.lower) & (b.upper >= p.upper)
                assert widened.all(), (method, k)


def test_no_unstable_relu_uses_the_rigorous_lp_dual():  # type: ignore[no-untyped-def]
    model = make_mlp(2, [4, 3], in_shape=(1, 2, 2)).double()
    x = torch.rand(2, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    b = margin_bounds(model, x, torch.tensor([0, 1]), 0.0, "milp")
    assert float(b.tolerance.abs().max()) == 0.0 and b.optimal.all()
    with torch.no_grad():
        logits = model(x)
    want = torch.stack([logits[0, 0] - logits[0, 1:], logits[1, 1] - logits[1, [0, 2]]])
    torch.testing.assert_close(b.lower, want, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------ time limits


def _timed_out(problem, time_limit, variables, options=None):  # type: ignore[no-untyped-def]
    """A solve that ran out of time before any dual bound or point."""
    return solver_module.MilpOutcome("time_limit", -math.inf, math.inf, None, time_limit)


def test_a_time_limit_gives_unknown_rows_with_a_sound_fallback(monkeypatch):  # type: ignore[no-untyped-def]
    model = make_net2d(11, [8, 8])
    x = torch.tensor([[[[0.45, 0.5]]]], dtype=F64)
    y = torch.tensor([int(model(x).argmax())])
    exact = margin_bounds(model, x, y, 0.3, "milp")
    monkeypatch.setattr(solver_module, "solve_milp", _timed_out)
    forced = margin_bounds(model, x, y, 0.3, "milp")
    assert all(s.startswith("unknown: time limit") for s in forced.status[0])
    assert not forced.optimal.any()
    # the fallback is CROWN with the same (refined) intermediate bounds: sound, never above
    net = to_network(model, (1, 1, 2))
    x_lo, x_hi = (x - 0.3).clamp(0, 1), (x + 0.3).clamp(0, 1)
    inter = get_method("milp").intermediate(net, x_lo, x_hi)
    from certify.spec import margin_spec

    crown = compute_bounds(net, x_lo, x_hi, "crown", margin_spec(y, 3).double(),
                           intermediate=inter)
    torch.testing.assert_close(forced.lower, crown.lower, atol=1e-9, rtol=0)
    assert (forced.lower <= exact.lower + 1e-12).all()


def test_a_real_time_limit_is_reported_as_unknown():  # type: ignore[no-untyped-def]
    model = make_mlp(5, [40, 40, 40], in_shape=(1, 4, 4), classes=3).double()
    x = torch.rand(1, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0])
    b = margin_bounds(model, x, y, 0.3, "milp", time_limit=0.01, intermediate_method="crown")
    assert any(s.startswith("unknown") for s in b.status[0])
    crown = margin_bounds(model, x, y, 0.3, "crown")
    assert (b.lower >= crown.lower - 1e-9).all()  # CROWN with widened bounds at the least


def test_the_radius_search_does_not_count_unknown_rows(monkeypatch):  # type: ignore[no-untyped-def]
    from certify.radius import certified_radii

    model = make_net2d(4, [8, 8])
    x = torch.rand(4, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    exact = certified_radii(model, x, y, "milp", eps_max=0.5, tol=1e-4)
    monkeypatch.setattr(solver_module, "solve_milp", _timed_out)
    forced = certified_radii(model, x, y, "milp", eps_max=0.5, tol=1e-4)
    # every MILP timed out: only what the sound fallback proves is certified
    assert (forced.certified_eps <= exact.certified_eps + 1e-12).all()
    assert bool((forced.certified_eps < exact.certified_eps - 1e-3).any())
    x_lo = (x - forced.certified_eps.view(-1, 1, 1, 1)).clamp(0, 1)
    x_hi = (x + forced.certified_eps.view(-1, 1, 1, 1)).clamp(0, 1)
    net = to_network(model, (1, 1, 2))
    inter = get_method("milp").intermediate(net, x_lo, x_hi)
    from certify.spec import margin_spec

    crown = compute_bounds(net, x_lo, x_hi, "crown", margin_spec(y, 3).double(),
                           intermediate=inter)
    proven = crown.lower.amin(1) > 0
    assert proven[forced.certified_eps > 0].all()


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize(("options", "match"), [
    ({"intermediate_method": "milp"}, "intermediate_method must be one of"),
    ({"time_limit": 0}, "time_limit must be a number of seconds > 0"),
    ({"time_limit": math.inf}, "time_limit must be a number of seconds > 0"),
    ({"exact_upper": "yes"}, "exact_upper must be True or False"),
    ({"timeout": 3}, "unknown option 'timeout' for method 'milp'"),
])
def test_bad_options_are_one_line_errors(options, match):  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=match):
        get_method("milp", **options)


def test_refine_rejects_other_methods():  # type: ignore[no-untyped-def]
    model = make_mlp(0, [3, 3], in_shape=(1, 2, 2)).double()
    net = to_network(model, (1, 2, 2))
    x = torch.rand(1, 1, 2, 2, dtype=F64)
    with pytest.raises(SpecError, match="must be 'lp' or 'alpha-crown'"):
        refine_intermediate(net, x, x, get_method("ibp").intermediate(net, x, x), method="ibp")
