"""Branch and bound (``bab``): exact against enumeration, sound on generated nets, decisive.

References independent of the engine: the activation regions of 2-D networks enumerated by
LPs (``tests/brute_force.py``), sampled/corner/PGD points, and the MILP on small MLPs.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from bound_helpers import all_points, make_box, make_cnn, make_mlp, random_spec, spec_values
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import compute_bounds, get_method
from certify.bounds.bab import ABOVE, BELOW, DOMAINS_SPENT, BabBounds
from certify.bounds.layers import LeakyReluOp, ReluOp
from certify.errors import SpecError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brute_force import make_net2d, min_adv_eps, min_spec, regions  # noqa: E402

BOX_LO = np.array([0.15, 0.2])
BOX_HI = np.array([0.75, 0.7])


def _box2d() -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.tensor(BOX_LO, dtype=torch.float64).reshape(1, 1, 1, 2)
    hi = torch.tensor(BOX_HI, dtype=torch.float64).reshape(1, 1, 1, 2)
    return lo, hi


def _exact_min(model: nn.Sequential, row: np.ndarray) -> float:
    return min_spec(regions(model, BOX_LO, BOX_HI), row, BOX_LO, BOX_HI)


@pytest.mark.parametrize("branching", ["input", "relu", "relu-1"])
@pytest.mark.parametrize("seed", range(4))
def test_decisions_agree_with_enumeration(seed: int, branching: str) -> None:
    """Just above the exact minimum a point is found; just below it the proof succeeds
    (ReLU splits filtered among 5 candidates, the default, and by the best score alone)."""
    candidates = 1 if branching == "relu-1" else 5
    branching = branching.removesuffix("-1")
    model = make_net2d(seed, [8, 8])
    row = np.random.default_rng(seed).normal(size=3)
    exact = _exact_min(model, row)
    lo, hi = _box2d()
    spec = torch.tensor(row, dtype=torch.float64).reshape(1, 1, 3)
    for delta, expected in ((-0.02, ABOVE), (0.02, BELOW)):
        b = compute_bounds(model, lo, hi, "bab", spec, threshold=exact + delta,
                           branching=branching, candidates=candidates, time_limit=30.0)
        assert isinstance(b, BabBounds)
        assert b.status == (expected,), (seed, delta, b.status, exact)
        assert float(b.lower[0, 0]) <= exact + 1e-9  # sound whatever the verdict
        if expected == BELOW:  # the point it reports is in the box and below the threshold
            p = b.points[0].flatten().numpy()
            assert np.all(p >= BOX_LO) and np.all(p <= BOX_HI)
            with torch.no_grad():
                value = float(row @ model(b.points).double()[0].numpy())
            assert value <= exact + delta


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("branching", ["input", "relu"])
@pytest.mark.parametrize("seed", range(4))
def test_proven_only_once_no_domain_is_open(seed: int, branching: str, batch_size: int) -> None:
    """With batches smaller than the open pool, a batch whose children are all proven does
    not decide its property while the pool holds others: "above threshold" exactly when the
    exact minimum is above it, and then every row's lower bound is above it too."""
    model = make_net2d(seed, [8, 8])
    row = np.random.default_rng(seed).normal(size=3)
    exact = _exact_min(model, row)
    lo, hi = _box2d()
    spec = torch.tensor(row, dtype=torch.float64).reshape(1, 1, 3)
    for delta in (-0.05, -0.01, 0.01):
        b = compute_bounds(model, lo, hi, "bab", spec, threshold=exact + delta,
                           branching=branching, time_limit=30.0, batch_size=batch_size,
                           attack_steps=0)
        assert isinstance(b, BabBounds)
        assert b.status == ((ABOVE,) if delta < 0 else (BELOW,)), (seed, delta, b.status)
        assert float(b.lower[0, 0]) <= exact + 1e-9
        if delta < 0:
            assert float(b.lower[0, 0]) > exact + delta


@pytest.mark.parametrize("seed", range(3))
def test_bound_mode_closes_the_gap(seed: int) -> None:
    """Without a threshold, the lower bound ends within `gap` of the exact minimum."""
    model = make_net2d(10 + seed, [6, 6])
    row = np.random.default_rng(seed).normal(size=3)
    exact = _exact_min(model, row)
    lo, hi = _box2d()
    spec = torch.tensor(row, dtype=torch.float64).reshape(1, 1, 3)
    b = compute_bounds(model, lo, hi, "bab", spec, gap=1e-3, time_limit=30.0)
    assert float(b.lower[0, 0]) <= exact + 1e-9
    assert float(b.lower[0, 0]) >= exact - 2e-3
    crown = compute_bounds(model, lo, hi, "crown", spec)
    assert float(b.lower[0, 0]) >= float(crown.lower[0, 0]) - 1e-9


def test_radius_between_alpha_crown_and_exact() -> None:
    """bab's certified radius is at most the exact one (enumerated) and at least alpha-CROWN's
    (the bracket it starts from)."""
    from certify.radius import certified_radii

    model = make_net2d(3, [8, 8])
    parts = regions(model, np.zeros(2), np.ones(2))
    x = torch.tensor([[0.45, 0.5], [0.3, 0.6], [0.6, 0.35]], dtype=torch.float64)
    with torch.no_grad():
        y = model(x.reshape(3, 1, 1, 2)).argmax(1)
    exact = [min_adv_eps(parts, x[i].numpy(), int(y[i])) for i in range(3)]
    xs = x.reshape(3, 1, 1, 2)
    bab = certified_radii(model, xs, y, "bab", tol=1e-4, time_limit=20.0)
    alpha = certified_radii(model, xs, y, "alpha-crown", tol=1e-4)
    for i in range(3):
        r = float(bab.certified_eps[i])
        assert r <= exact[i] + 1e-9, (i, r, exact[i])
        assert r >= float(alpha.certified_eps[i]) - 1e-4
        assert r >= 0.97 * exact[i] - 2e-4, (i, r, exact[i])  # complete on so small a net


SOUND_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20), widths=st.lists(st.integers(1, 10), min_size=1, max_size=3),
       eps_max=st.sampled_from([0.05, 0.3]), threshold=st.sampled_from([None, 0.0]))
def test_sound_on_generated_mlps(dtype: torch.dtype, seed: int, widths: list[int],
                                 eps_max: float, threshold: float | None) -> None:
    model = make_mlp(seed, widths).to(dtype)
    x_lo, x_hi, x = make_box(seed, 2, (1, 4, 4), eps_max, dtype)
    spec = random_spec(seed, 2, 2, 3, dtype)
    b = compute_bounds(model, x_lo, x_hi, "bab", spec, threshold=threshold, max_domains=60,
                       time_limit=5.0)
    assert b.lower.dtype == dtype
    values = spec_values(model, all_points(model, x_lo, x_hi, spec, x), spec)
    atol = SOUND_ATOL[dtype] * (1 + values.abs().max().item())
    assert (values >= b.lower - atol).all()
    assert (values <= b.upper + atol).all()


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**20), variant=st.integers(0, 2))
def test_sound_on_generated_cnns(seed: int, variant: int) -> None:
    model, in_shape = make_cnn(seed, variant)
    x_lo, x_hi, x = make_box(seed, 2, in_shape, 0.1, torch.float32)
    spec = random_spec(seed, 2, 2, 4, torch.float32)
    b = compute_bounds(model, x_lo, x_hi, "bab", spec, threshold=0.0, max_domains=40,
                       time_limit=5.0)
    values = spec_values(model, all_points(model, x_lo, x_hi, spec, x), spec)
    assert (values >= b.lower - 1e-5 * (1 + values.abs().max().item())).all()


def _small_mlp(seed: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 3)).double()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.8
    return model.eval()


def _memory_case(seed: int, draw: int
                 ) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor, Callable[[float], float]]:
    """`_small_mlp(seed)`, a point `x` and one spec row drawn with seed `draw`, and the MILP's
    exact minimum of the row over the box of half-width `w` around `x`."""
    model = _small_mlp(seed)
    gen = torch.Generator().manual_seed(draw)
    x = torch.rand(1, 1, 1, 6, generator=gen, dtype=torch.float64)
    spec = torch.randn(1, 1, 3, generator=gen, dtype=torch.float64)

    def exact(width: float) -> float:
        return float(compute_bounds(model, x - width, x + width, "milp", spec).lower[0, 0])

    return model, x, spec, exact


@pytest.mark.parametrize("float32_steps", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_agrees_with_the_milp(seed: int, float32_steps: bool) -> None:
    """Thresholds between CROWN's bound and the MILP's exact minimum: bab proves them all (the
    MILP's minimum is above), and finds points for thresholds above the minimum; with the
    optimization's plain passes in float32 or in float64."""
    model = _small_mlp(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(1, 1, 1, 6, generator=gen, dtype=torch.float64)
    lo, hi = x - 0.25, x + 0.25
    spec = torch.randn(1, 1, 3, generator=gen, dtype=torch.float64)
    exact = float(compute_bounds(model, lo, hi, "milp", spec).lower[0, 0])
    crown = float(compute_bounds(model, lo, hi, "crown", spec).lower[0, 0])
    for t in (crown + 0.5 * (exact - crown), exact - 0.01 * abs(exact) - 1e-3):
        b = compute_bounds(model, lo, hi, "bab", spec, threshold=t, branching="relu",
                           float32_steps=float32_steps)
        assert b.status == (ABOVE,) and float(b.lower[0, 0]) > t
        assert exact >= float(b.lower[0, 0])
    b = compute_bounds(model, lo, hi, "bab", spec, threshold=exact + 0.02, branching="relu",
                       float32_steps=float32_steps)
    assert b.status == (BELOW,)


def test_float32_rows_hold_the_float64_rows_exactly() -> None:
    """The spec rows of the children's float32 rigorous pass (a narrowing ``cast_op`` of the
    folded rows): in exact (rational) arithmetic every interval ``row32 +- err32`` holds
    ``row64 +- err64``, for values float32 rounds, with and without errors already there."""
    from fractions import Fraction

    from certify.bounds.layers import SpecRows, cast_op

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 1, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [1e-30, 1e-3, 1.0, 1e3, 1e30], dtype=torch.float64)
    bias = torch.randn(4, 1, generator=gen, dtype=torch.float64) / 3
    weight_err = torch.rand(4, 1, 5, generator=gen, dtype=torch.float64) * 1e-12
    bias_err = torch.rand(4, 1, generator=gen, dtype=torch.float64) * 1e-9
    for errs in ((weight_err, bias_err), (None, None)):
        spec = SpecRows(weight, bias, (5,), (1,), *errs)
        narrow = cast_op(spec, torch.float32, torch.device("cpu"))
        assert narrow.weight.dtype == narrow.weight_err.dtype == torch.float32
        for v64, e64, v32, e32 in ((weight, errs[0], narrow.weight, narrow.weight_err),
                                   (bias, errs[1], narrow.bias, narrow.bias_err)):
            flat = zip(v64.flatten().tolist(), (torch.zeros_like(v64) if e64 is None
                                                else e64).flatten().tolist(),
                       v32.double().flatten().tolist(), e32.double().flatten().tolist(),
                       strict=True)
            for a, ea, b, eb in flat:
                a_, ea_, b_, eb_ = map(Fraction, (a, ea, b, eb))
                assert b_ - eb_ <= a_ - ea_ and a_ + ea_ <= b_ + eb_
        assert bool((narrow.weight.double() != weight).any())  # the rounding was real


def test_float32_pass_holds_the_domains_boxes_and_bounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every float32 propagator of the children's rigorous pass holds its float64 one: boxes,
    pre-activation bounds and the model's rounding rounded outward (compared exactly, in
    float64), the float32 body carrying its rounding in the ops' error fields."""
    from certify.bounds.bab import _Search

    real = _Search._rigorous_float32
    seen = []

    def check(self, prop):  # type: ignore[no-untyped-def]
        narrow = real(self, prop)
        assert narrow is not None
        assert bool((narrow.x_lo.double() <= prop.x_lo).all())
        assert bool((narrow.x_hi.double() >= prop.x_hi).all())
        for pos in self.positions:
            (lo, hi), (lo32, hi32) = prop.pre_bounds[pos], narrow.pre_bounds[pos]
            assert lo32.dtype == torch.float32
            assert bool((lo32.double() <= lo).all()) and bool((hi32.double() >= hi).all())
        for pos, e in prop.perturbation.items():
            assert bool((narrow.perturbation[pos].double() >= e).all())
        seen.append(len(narrow.x_lo))
        return narrow

    monkeypatch.setattr(_Search, "_rigorous_float32", check)
    model, x, spec, exact = _memory_case(1, 7)
    b = compute_bounds(model, x - 0.2, x + 0.2, "bab", spec, threshold=exact(0.2) - 1e-3,
                       branching="relu", model_rounding=True)
    assert b.status == (ABOVE,) and seen


@pytest.mark.parametrize("seed", range(3))
def test_float64_retry_decides_what_float32_rounding_leaves_open(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The children's rigorous pass runs in float32 and bounds a row again in float64 where
    the optimization's plain bound is above its target but the float32 bound is not. With the
    float32 pass made useless (1 taken off every constant), the search decides as the
    float64-only one does, in the same number of domains."""
    from certify.bounds.bab import _Search

    model, x, spec, exact = _memory_case(seed, 7)
    lo, hi = x - 0.2, x + 0.2
    t = exact(0.2) - 1e-3

    def run() -> BabBounds:
        b = compute_bounds(model, lo, hi, "bab", spec, threshold=t, branching="relu")
        assert isinstance(b, BabBounds)
        return b

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(_Search, "_rigorous_float32", lambda self, prop: None)
        wide = run()
    real = _Search._float32_rows

    def useless(self):  # type: ignore[no-untyped-def]
        spec = real(self)
        return replace(spec, bias_err=spec.bias_err + 1.0)

    monkeypatch.setattr(_Search, "_float32_rows", useless)
    crippled = run()
    assert wide.status == fast.status == crippled.status == (ABOVE,)
    assert int(wide.domains[0]) > 1  # the children were bounded
    assert int(crippled.domains[0]) == int(wide.domains[0])
    assert float(fast.lower[0, 0]) <= exact(0.2)


@pytest.mark.parametrize("seed", range(4))
def test_never_proves_a_threshold_just_above_the_exact_minimum(seed: int) -> None:
    """Next to the exact minimum (the MILP's, within 1e-5 relative: far above the solver's
    tolerance, far below float32's rounding terms on these nets) bab proves the threshold just
    below it and never the one just above it, whichever precision decided each child."""
    model, x, spec, exact = _memory_case(seed, 11)
    lo, hi = x - 0.15, x + 0.15
    m = exact(0.15)
    step = 1e-5 * max(1.0, abs(m))
    above = compute_bounds(model, lo, hi, "bab", spec, threshold=m + step, branching="relu",
                           time_limit=10.0)
    assert above.status != (ABOVE,)
    assert float(above.lower[0, 0]) <= m + step
    below = compute_bounds(model, lo, hi, "bab", spec, threshold=m - 1e-3 * max(1.0, abs(m)),
                           branching="relu", time_limit=10.0)
    assert below.status == (ABOVE,) and float(below.lower[0, 0]) <= m + 1e-7 * max(1.0, abs(m))


def test_filtered_branching_splits_one_of_the_best_scored_free_neurons(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each open domain's filtered choice is one of its `candidates` best-scored neurons, an
    unstable one not split yet; the filter changes some choices; the verdicts stay exact and
    the bounds below every sampled point (on 6 properties with 5 candidates)."""
    from certify.bounds.bab import _Search

    seen = {"open": 0, "changed": 0}
    original = _Search._filter

    def spy(self, prop, doms, score, ends, row, target, layer, index,  # type: ignore[no-untyped-def]
            above=None):
        before = layer.clone(), index.clone()
        original(self, prop, doms, score, ends, row, target, layer, index, above)
        open_ = ((doms.bound <= target).any(1) & (before[0] >= 0)).nonzero(as_tuple=True)[0]
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        top = score.topk(min(self.m.candidates, score.shape[1]), dim=1).indices
        for i in open_.tolist():
            k, j = int(layer[i]), int(index[i])
            assert int(starts[k]) + j in top[i].tolist()
            assert doms.split[k][i, j] == 0 and doms.lo[k][i, j] < 0 < doms.hi[k][i, j]
            seen["open"] += 1
            seen["changed"] += int((k, j) != (int(before[0][i]), int(before[1][i])))

    monkeypatch.setattr(_Search, "_filter", spy)
    for seed, draw in itertools.product(range(3), range(2)):
        model, x, spec, exact = _memory_case(seed, draw)
        lo, hi = x - 0.3, x + 0.3
        minimum = exact(0.3)
        b = compute_bounds(model, lo, hi, "bab", spec, branching="relu", candidates=5,
                           threshold=minimum - 1e-3 * (1 + abs(minimum)))
        assert b.status == (ABOVE,)
        with torch.no_grad():
            values = spec_values(model, all_points(model, lo, hi, spec, x, seed=seed), spec)
        assert float(b.lower[0, 0]) <= float(values.min())
    assert seen["changed"] > 0 and seen["open"] > seen["changed"], seen


def test_budget_spent_is_unknown_and_still_sound() -> None:
    model = _small_mlp(7)
    x = torch.full((1, 1, 1, 6), 0.5, dtype=torch.float64)
    lo, hi = x - 0.4, x + 0.4
    spec = torch.tensor([[[1.0, -1.0, 0.0]]], dtype=torch.float64)
    exact = float(compute_bounds(model, lo, hi, "milp", spec).lower[0, 0])
    b = compute_bounds(model, lo, hi, "bab", spec, threshold=exact - 1e-6, max_domains=3,
                       attack_steps=0, branching="relu")
    assert b.status == (DOMAINS_SPENT,)
    assert float(b.lower[0, 0]) <= exact
    assert int(b.domains[0]) >= 3


def test_float32_inputs_get_outward_rounded_float32_bounds() -> None:
    model = make_mlp(3, [8, 8]).float()
    x_lo, x_hi, _ = make_box(3, 2, (1, 4, 4), 0.1, torch.float32)
    spec = random_spec(3, 2, 2, 3, torch.float32)
    b32 = compute_bounds(model, x_lo, x_hi, "bab", spec, gap=1e-2, max_domains=50)
    b64 = compute_bounds(model.double(), x_lo.double(), x_hi.double(), "bab", spec.double(),
                         gap=1e-2, max_domains=50)
    assert b32.lower.dtype == torch.float32
    assert (b32.lower.double() <= b64.lower).all()


@pytest.mark.parametrize("options", [{"branching": "sideways"}, {"time_limit": 0},
                                     {"max_domains": 0}, {"threshold": float("nan")},
                                     {"steps": -1}, {"threshold": (0.0, "a")},
                                     {"budget_reach": 0}, {"candidates": 0}])
def test_bad_options_are_one_line_errors(options: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(SpecError) as err:
        get_method("bab", **options)
    assert "bab:" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("seed", range(3))
def test_memory_restarts_are_decided_as_without_one(seed: int) -> None:
    """A failed evaluation's open leaves restart a smaller box, a proof's splits a larger one:
    every verdict is the one the MILP's exact minimum gives, every lower bound is below that
    minimum (the leaves a failure proved still count), and both kinds of entry were used."""
    from certify.bounds.bab import SearchMemory

    model, x, spec, exact = _memory_case(seed, 200 + seed)
    # just below the exact minimum at the first width: true there and at every smaller one,
    # too close to prove with two domains
    threshold = exact(0.25) - 1e-3 * (1 + abs(exact(0.25)))
    memory = SearchMemory()
    kinds = []
    for k, width in enumerate((0.25, 0.2, 0.23, 0.35, 0.24, 0.1)):
        lo, hi = x - width, x + width
        # the first call spends a tiny budget: a failure; later ones start from what is left
        method = get_method("bab", branching="relu", attack_steps=0, threshold=threshold,
                            max_domains=2 if k == 0 else 100_000, memory=memory)
        before = [(e.proof, e.x_lo.clone(), e.x_hi.clone()) for es in memory.entries.values()
                  for e in es]
        kinds += [proof for proof, e_lo, e_hi in before
                  if (not proof and bool((lo >= e_lo).all() and (hi <= e_hi).all()))
                  or (proof and bool((lo <= e_lo).all() and (hi >= e_hi).all()))]
        b = compute_bounds(model, lo, hi, method, spec)
        minimum = exact(width)
        assert float(b.lower[0, 0]) <= minimum + 1e-9, (k, float(b.lower[0, 0]), minimum)
        if k > 0 and abs(minimum - threshold) > 1e-6:
            assert b.status == ((ABOVE if minimum > threshold else BELOW),), (k, b.status)
        if k == 0:
            assert b.status == (DOMAINS_SPENT,)
    assert False in kinds, "no failure's leaves were reused"


@pytest.mark.parametrize("seed", range(3))
def test_memory_restarts_across_thresholds(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A radius search raises the threshold by the model's rounding error over each box, so
    every evaluation has its own: a failure's open leaves still restart a smaller box (its
    proven leaves count where their bounds are above the new threshold), and every verdict is
    still the exact minimum's."""
    from certify.bounds import bab
    from certify.bounds.bab import SearchMemory

    restarts: list[bool] = []  # per restart: whether from a failure's leaves
    original = bab._Search._restart

    def spy(self, root, entry):  # type: ignore[no-untyped-def]
        restarts.append(not entry.proof)
        return original(self, root, entry)

    monkeypatch.setattr(bab._Search, "_restart", spy)
    model, x, spec, exact = _memory_case(seed, 300 + seed)
    base = exact(0.25) - 1e-3 * (1 + abs(exact(0.25)))
    memory = SearchMemory()
    for k, width in enumerate((0.25, 0.2, 0.24, 0.1, 0.22)):
        # the threshold grows with the box, as the rounding allowance does (the last one
        # drops below the others)
        threshold = base + (1e-4 * width if k < 4 else -0.05)
        lo, hi = x - width, x + width
        method = get_method("bab", branching="relu", attack_steps=0, threshold=threshold,
                            max_domains=2 if k == 0 else 100_000, memory=memory)
        b = compute_bounds(model, lo, hi, method, spec)
        minimum = exact(width)
        assert float(b.lower[0, 0]) <= minimum + 1e-9, (k, float(b.lower[0, 0]), minimum)
        if k == 0:
            assert b.status == (DOMAINS_SPENT,)
        elif abs(minimum - threshold) > 1e-6:
            assert b.status == ((ABOVE if minimum > threshold else BELOW),), (k, b.status)
            if b.status == (ABOVE,):
                assert float(b.lower[0, 0]) > threshold
    # the failure at 0.25 (under a larger threshold) restarted a smaller box
    assert True in restarts, restarts


@pytest.mark.parametrize("seed", range(4))
def test_a_proofs_leaves_cover_the_larger_box_they_restart(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every proof whose leaves restart a larger box covers that box: each sampled point and
    corner of it lies in some leaf (its pre-activations have the leaf's split signs). That
    takes the leaves found empty on the proof's own box, and, for a proof that started from a
    failure's open leaves, the failure's proven leaves."""
    from certify.bounds import bab
    from certify.bounds.bab import SearchMemory

    model, x, spec, exact = _memory_case(seed, 400 + seed)
    original = bab._Search._restart
    checked: list[tuple[float, int]] = []

    def check(self, root, entry):  # type: ignore[no-untyped-def]
        if entry.proof:
            lo, hi = root.x_lo[0], root.x_hi[0]
            gen = torch.Generator().manual_seed(0)
            pts = lo + (hi - lo) * torch.rand(2000, *lo.shape, generator=gen,
                                              dtype=lo.dtype)
            corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=lo.numel())),
                                   dtype=lo.dtype).reshape(-1, *lo.shape)
            pts = torch.cat([pts, lo + (hi - lo) * corners])
            with torch.no_grad():
                z1 = model[1](model[0](pts))
                z2 = model[3](model[2](z1))
            inside = torch.ones(len(pts), len(entry.depth), dtype=torch.bool)
            for z, sign in zip((z1, z2), entry.split, strict=True):
                s = sign.to(z.dtype)[None]  # (1, leaves, 12)
                inside &= ((s * z[:, None, :]) >= -1e-12).all(-1)
            assert inside.any(1).all(), "a point of the box lies in no leaf"
            checked.append((float((hi - lo).max()) / 2, len(entry.depth)))
        return original(self, root, entry)

    monkeypatch.setattr(bab._Search, "_restart", check)
    threshold = exact(0.25) - 1e-3 * (1 + abs(exact(0.25)))
    memory = SearchMemory()
    statuses = []
    for k, width in enumerate((0.24, 0.25, 0.245, 0.3)):
        # 0.24 proven from the root, 0.25 fails (domain budget), 0.245 restarts from its open
        # leaves, 0.3 (outside the failure's box) from the newest proof, 0.245's
        method = get_method("bab", branching="relu", attack_steps=0, threshold=threshold,
                            max_domains=2 if k == 1 else 100_000, memory=memory)
        statuses.append(compute_bounds(model, x - width, x + width, method, spec).status[0])
    assert statuses[:3] == [ABOVE, DOMAINS_SPENT, ABOVE], statuses
    assert [w for w, _ in checked][-1] == pytest.approx(0.3), checked


def test_beyond_the_time_budget() -> None:
    """In a radius search's memory, a box between a proof that took most of the time limit
    and a larger box that ran out of it is not searched: "unknown: beyond the time budget",
    with a sound lower bound; boxes outside that range are searched as usual."""
    from certify.bounds.bab import BEYOND_TIME, SearchMemory, _Entry

    model, x, spec, exact = _memory_case(0, 7)
    key = spec[0].numpy().tobytes()
    memory = SearchMemory()
    memory.slow[key] = [_Entry((x - 0.1)[0], (x + 0.1)[0])]
    memory.timed_out[key] = [_Entry((x - 0.3)[0], (x + 0.3)[0])]
    assert memory.beyond(key, (x - 0.2)[0], (x + 0.2)[0])
    assert not memory.beyond(key, (x - 0.05)[0], (x + 0.05)[0])
    assert not memory.beyond(key, (x - 0.4)[0], (x + 0.4)[0])
    assert not memory.beyond(b"other rows", (x - 0.2)[0], (x + 0.2)[0])
    minimum = exact(0.2)
    threshold = minimum - 1e-3 * (1 + abs(minimum))  # true, and not provable at the root
    root = compute_bounds(model, x - 0.2, x + 0.2, "alpha-crown", spec)
    assert float(root.lower[0, 0]) < threshold
    b = compute_bounds(model, x - 0.2, x + 0.2, get_method(
        "bab", branching="relu", threshold=threshold, memory=memory, budget_reach=0.75), spec)
    assert b.status == (BEYOND_TIME,)
    assert float(b.lower[0, 0]) <= minimum + 1e-9
    # without the rule (or without the memory) the same box is searched and proven
    for method in (get_method("bab", branching="relu", threshold=threshold, memory=memory,
                              budget_reach=None),
                   get_method("bab", branching="relu", threshold=threshold)):
        assert compute_bounds(model, x - 0.2, x + 0.2, method, spec).status == (ABOVE,)


def test_radius_search_uses_a_fresh_memory() -> None:
    """The radius search hands bab a memory of its own (reused across its evaluations), and
    the radius stays between alpha-CROWN's and the exact one."""
    from certify.bounds.bab import BranchAndBound, SearchMemory
    from certify.radius import certified_radii

    seen: list[SearchMemory | None] = []
    original = BranchAndBound.bound

    def spy(self: BranchAndBound, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        seen.append(self.memory)
        return original(self, *args, **kwargs)

    model = make_net2d(5, [8, 8])
    parts = regions(model, np.zeros(2), np.ones(2))
    x = torch.tensor([[0.4, 0.55], [0.62, 0.3]], dtype=torch.float64)
    with torch.no_grad():
        y = model(x.reshape(2, 1, 1, 2)).argmax(1)
    exact = [min_adv_eps(parts, x[i].numpy(), int(y[i])) for i in range(2)]
    BranchAndBound.bound = spy  # type: ignore[method-assign]
    try:
        r = certified_radii(model, x.reshape(2, 1, 1, 2), y, "bab", tol=1e-4, time_limit=20.0)
    finally:
        BranchAndBound.bound = original  # type: ignore[method-assign]
    memories = {id(m) for m in seen}
    assert len(seen) >= 2 and len(memories) == 1 and seen[0] is not None
    for i in range(2):
        assert float(r.certified_eps[i]) <= exact[i] + 1e-9


def test_radius_search_resumes_budget_failures_soundly(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a domain budget so small that the steps near the radius run out of it, the search
    steps just below such failures (restarting from their open leaves); every radius stays at
    or below the exact one (enumerated regions), and at or above alpha-CROWN's."""
    from certify import radius
    from certify.radius import certified_radii

    shots: list[float] = []
    original = radius._Bracket._resume_step

    def spy(self):  # type: ignore[no-untyped-def]
        t = original(self)
        if t is not None:
            shots.append(t)
        return t

    monkeypatch.setattr(radius._Bracket, "_resume_step", spy)
    for seed in range(3):
        model = make_net2d(30 + seed, [10, 10])
        parts = regions(model, np.zeros(2), np.ones(2))
        gen = torch.Generator().manual_seed(seed)
        x = 0.2 + 0.6 * torch.rand(4, 2, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            y = model(x.reshape(4, 1, 1, 2)).argmax(1)
        exact = [min_adv_eps(parts, x[i].numpy(), int(y[i])) for i in range(4)]
        xs = x.reshape(4, 1, 1, 2)
        alpha = certified_radii(model, xs, y, "alpha-crown", tol=1e-4).certified_eps
        r = certified_radii(model, xs, y, "bab", tol=1e-4, branching="relu", max_domains=6,
                            attack_steps=0).certified_eps
        for i in range(4):
            assert float(r[i]) <= exact[i] + 1e-9, (seed, i, float(r[i]), exact[i])
            assert float(r[i]) >= float(alpha[i]) - 1e-4, (seed, i, float(r[i]), float(alpha[i]))
    assert shots, "no step just below a failure"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", [0, 1, 2, 5])
def test_dag_networks_sound_and_gap_closed(kind: int, dtype: torch.dtype) -> None:
    """Residual networks (the ReLU kinds of dag_helpers): bab's lower bounds hold at sampled,
    corner and PGD points and are never looser than alpha-CROWN's; on the residual MLPs, in
    bound mode, they close on the best point found (complete)."""
    from dag_helpers import make_dag

    model, shape = make_dag(40 + kind, kind)
    x_lo, x_hi, x = make_box(kind, 2, shape, 0.05, dtype)
    spec = random_spec(kind, 2, 2, 3, dtype)
    model = model.to(dtype)
    b = compute_bounds(model, x_lo, x_hi, "bab", spec, gap=1e-3, time_limit=3.0)
    values = spec_values(model, all_points(model, x_lo, x_hi, spec, x), spec)
    atol = SOUND_ATOL[dtype] * (1 + values.abs().max().item())
    assert (values >= b.lower - atol).all()
    alpha = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec)
    assert (b.lower >= alpha.lower.detach() - atol).all()
    assert isinstance(b, BabBounds)
    if kind in (0, 5):  # each row within the gap of a point of the box
        assert b.status == ("gap closed", "gap closed")
        assert (b.lower >= values.min(0).values - 1e-3 - atol).all()


def test_dag_threshold_decisions_and_radius() -> None:
    """On a residual MLP: a threshold just above the best point's value is decided "at or
    below" with a point of the box, one below the closed bound is proven; the radius search
    runs from alpha-CROWN's radius and stays below the attack's."""
    from dag_helpers import make_dag

    from certify.attacks import minimal_adversarial
    from certify.radius import certified_radii

    model, shape = make_dag(7, 0)
    model = model.double()
    x_lo, x_hi, _ = make_box(7, 1, shape, 0.1, torch.float64)
    spec = random_spec(7, 1, 1, 3, torch.float64)
    closed = compute_bounds(model, x_lo, x_hi, "bab", spec, gap=1e-4, time_limit=20.0)
    low = float(closed.lower[0, 0])
    b = compute_bounds(model, x_lo, x_hi, "bab", spec, threshold=low - 1e-3, time_limit=20.0)
    assert b.status == (ABOVE,)
    b = compute_bounds(model, x_lo, x_hi, "bab", spec, threshold=low + 1e-3, time_limit=20.0)
    assert b.status == (BELOW,)
    point = b.points[:1]
    assert (point >= x_lo).all() and (point <= x_hi).all()
    with torch.no_grad():
        assert float(spec[0, 0] @ model(point)[0]) <= low + 1e-3

    gen = torch.Generator().manual_seed(3)
    xs = torch.rand(2, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(xs).argmax(1)
    adv = minimal_adversarial(model, xs, y, eps_max=0.5, tol=1e-4)
    alpha = certified_radii(model, xs, y, "alpha-crown", tol=1e-4, attack_eps=adv.eps)
    r = certified_radii(model, xs, y, "bab", tol=1e-3, attack_eps=adv.eps, time_limit=1.0)
    assert (r.certified_eps >= alpha.certified_eps - 1e-4).all()
    assert (r.certified_eps <= adv.eps).all()


@pytest.mark.parametrize("seed", range(2))
def test_leaky_relu_networks_agree_with_the_milp(seed: int) -> None:
    """LeakyReLU splits at its kink as ReLU does: thresholds below the MILP's exact minimum
    are proven, one above it gets a point."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 12), nn.LeakyReLU(0.1), nn.Linear(12, 12),
                          nn.LeakyReLU(0.3), nn.Linear(12, 3)).double()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.8
    model.eval()
    x = torch.rand(1, 1, 1, 6, generator=gen, dtype=torch.float64)
    lo, hi = x - 0.25, x + 0.25
    spec = torch.randn(1, 1, 3, generator=gen, dtype=torch.float64)
    exact = float(compute_bounds(model, lo, hi, "milp", spec).lower[0, 0])
    crown = float(compute_bounds(model, lo, hi, "crown", spec).lower[0, 0])
    assert crown < exact
    reachable = float(spec_values(model, all_points(model, lo, hi, spec, x), spec).min())
    for t in (crown + 0.5 * (exact - crown), exact - 0.01 * abs(exact) - 1e-3):
        b = compute_bounds(model, lo, hi, "bab", spec, threshold=t, branching="relu")
        assert b.status == (ABOVE,) and float(b.lower[0, 0]) > t
        assert float(b.lower[0, 0]) <= reachable  # sound at sampled, corner and PGD points
    b = compute_bounds(model, lo, hi, "bab", spec, threshold=exact + 0.02, branching="relu")
    assert b.status == (BELOW,)


@pytest.mark.parametrize("layer", [nn.Sigmoid(), nn.Tanh()])
def test_smooth_activations_are_refused_in_one_line(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), layer, nn.Linear(5, 2)).double()
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    with pytest.raises(SpecError) as info:
        compute_bounds(model, x - 0.1, x + 0.1, "bab", threshold=0.0)
    message = str(info.value)
    assert "\n" not in message and "LeakyReLU" in message and type(layer).__name__ in message


def test_memory_budget_spent_is_unknown_and_still_sound() -> None:
    """Open domains past `pool_memory_mb` end the property as unknown, its bound still below
    the exact minimum."""
    from certify.bounds.bab import MEMORY_SPENT

    model = _small_mlp(7)
    x = torch.full((1, 1, 1, 6), 0.5, dtype=torch.float64)
    lo, hi = x - 0.4, x + 0.4
    spec = torch.tensor([[[1.0, -1.0, 0.0]]], dtype=torch.float64)
    exact = float(compute_bounds(model, lo, hi, "milp", spec).lower[0, 0])
    b = compute_bounds(model, lo, hi, "bab", spec, threshold=exact - 1e-6, attack_steps=0,
                       branching="relu", pool_memory_mb=1e-4)
    assert b.status == (MEMORY_SPENT,)
    assert float(b.lower[0, 0]) <= exact


def test_pool_drop_returns_the_bounds_remove_returns() -> None:
    # a property that ends without a memory to keep its leaves gives back only their bounds
    from certify.bounds.bab import _Domains, _Pool

    def chunk(samples: list[int], seed: int) -> _Domains:
        g = torch.Generator().manual_seed(seed)
        d, s, n = len(samples), 3, 4

        def r(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=g)

        return _Domains(torch.tensor(samples), r(d, 2), r(d, 2), [r(d, n)], [r(d, n)],
                        [r(d, n)], [r(d, s, n)], [r(d, s, n)], torch.arange(s).repeat(d, 1),
                        r(d, s), torch.zeros(d, dtype=torch.long), torch.zeros(d, dtype=torch.long),
                        torch.zeros(d, dtype=torch.long), torch.zeros(d, dtype=torch.long))

    pools = [_Pool(), _Pool()]
    for pool in pools:
        for k, samples in enumerate(([0, 1, 0, 2], [1, 0], [2, 2, 1])):
            pool.add(chunk(samples, k))
    dropped = pools[0].drop(0)
    removed = pools[1].remove(0)
    torch.testing.assert_close(dropped, removed.bound, rtol=0, atol=0)
    assert len(pools[0]) == len(pools[1]) == 6
    for pool in pools:  # what stays is the same
        rest = pool.remove(1)
        assert rest.sample.tolist() == [1, 1, 1]


def test_pool_take_caps_each_propertys_share_of_a_batch() -> None:
    # a property near its time limit takes at most its cap of the worst domains; the others
    # still fill the batch, worst first
    from certify.bounds.bab import _Domains, _Pool

    def chunk(samples: list[int], bounds: list[float]) -> _Domains:
        d, n = len(samples), 2
        z = torch.zeros(d, n)
        return _Domains(torch.tensor(samples), z, z, [z], [z], [z], [z[:, None]], [z[:, None]],
                        torch.zeros(d, 1, dtype=torch.long), torch.tensor(bounds)[:, None],
                        torch.zeros(d, dtype=torch.long),
                        torch.zeros(d, dtype=torch.long), torch.zeros(d, dtype=torch.long),
                        torch.zeros(d, dtype=torch.long))

    def fill() -> _Pool:
        pool = _Pool()
        pool.add(chunk([0, 1, 0, 2, 1], [5.0, 1.0, 2.0, 3.0, 0.0]))
        pool.add(chunk([0, 0, 2, 1], [-1.0, 4.0, -2.0, 6.0]))
        return pool

    def pairs(doms: _Domains) -> list[tuple[int, float]]:
        return sorted(zip(doms.sample.tolist(), doms.bound[:, 0].tolist(), strict=True))

    margin = lambda doms: doms.bound  # noqa: E731
    pool = fill()
    batch = pool.take(10, margin, torch.tensor([1, 5, 1]))
    assert pairs(batch) == [(0, -1.0), (1, 0.0), (1, 1.0), (1, 6.0), (2, -2.0)]
    assert len(pool) == 4  # the rest stays
    # the size still bounds the batch, the worst first within the caps
    assert pairs(fill().take(3, margin, torch.tensor([1, 5, 1]))) == [
        (0, -1.0), (1, 0.0), (2, -2.0)]
    # no cap: the worst of all
    assert pairs(fill().take(3, margin)) == [(0, -1.0), (1, 0.0), (2, -2.0)]
    assert pairs(fill().take(4, margin)) == [(0, -1.0), (1, 0.0), (1, 1.0), (2, -2.0)]


def test_memory_keeps_a_failures_open_leaves_before_its_proven_splits() -> None:
    # a failure whose proven leaves' splits would not fit is kept without them (its proofs'
    # leaves then restart nothing larger); one that fits keeps both
    from certify.bounds.bab import SearchMemory, _Domains, _Entry

    d, n = 3, 4
    z = torch.zeros(d, n)
    leaves = _Domains(torch.zeros(d, dtype=torch.long), z, z, [z], [z], [z], [z[:, None]],
                      [z[:, None]], torch.zeros(d, 1, dtype=torch.long), torch.zeros(d, 1),
                      torch.zeros(d, dtype=torch.long),
                      torch.zeros(d, dtype=torch.long), torch.zeros(d, dtype=torch.long),
                      torch.zeros(d, dtype=torch.long))
    x = torch.zeros(1, 1, 4)
    big = [torch.zeros(300_000, 4, dtype=torch.int8)]
    for budget_mb, kept_splits in ((0.5, False), (4.0, True)):
        memory = SearchMemory(budget_mb=budget_mb)
        memory.store(b"k", _Entry(x, x + 1, leaves=leaves, proven_bound=torch.ones(1),
                                  split=big, depth=torch.zeros(300_000, dtype=torch.long)))
        (entry,) = memory.entries[b"k"]
        assert entry.leaves is leaves
        assert (entry.depth is not None) == kept_splits and bool(entry.split) == kept_splits


@pytest.mark.parametrize("op", [ReluOp((2, 3), (2, 3)), LeakyReluOp(0.1, (2, 3), (2, 3))])
def test_childrens_relaxations_are_their_clamped_bounds_relaxed(op: object) -> None:
    """The filter's children reuse their parents' relaxations and relax only the split neuron
    again: every field equals the relaxation computed afresh from the children's bounds."""
    from types import SimpleNamespace

    from certify.bounds.bab import _Search
    from certify.bounds.relaxations import activation_rule

    gen = torch.Generator().manual_seed(0)
    lo = -torch.rand(4, 2, 3, generator=gen, dtype=torch.float64)
    hi = torch.rand(4, 2, 3, generator=gen, dtype=torch.float64)
    lo[0, 0, 0] = 0.2  # a stable neuron among them
    rule = activation_rule(op)
    parents = rule.relax(lo, hi, "adaptive")
    src = torch.tensor([0, 2, 3, 0, 2, 3])  # children of parents 0, 2, 3: left, then right
    left, right = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    neuron = torch.tensor([4, 1, 5, 4, 1, 5])
    fake = SimpleNamespace(body=SimpleNamespace(layers={7: op}))
    for work in (torch.float64, torch.float32):
        got = _Search._children(fake, parents, 7, src, left, right, neuron,  # type: ignore[arg-type]
                                work)
        c_lo, c_hi = lo[src].reshape(6, -1).clone(), hi[src].reshape(6, -1).clone()
        c_lo[left, neuron[:3]] = c_lo[left, neuron[:3]].clamp(min=0)
        c_hi[right, neuron[3:]] = c_hi[right, neuron[3:]].clamp(max=0)
        want = rule.relax(c_lo.reshape(6, 2, 3).to(work), c_hi.reshape(6, 2, 3).to(work),
                          "adaptive")
        for name in ("lower", "upper", "upper_bias", "unstable", "pre_lower", "pre_upper"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), name
        assert not bool(got.unstable.reshape(6, -1)[torch.arange(6), neuron].any())


@pytest.mark.parametrize("decide", [False, True])
@pytest.mark.parametrize("seed", [0, 2, 3])
def test_screened_candidate_points_change_nothing_a_full_evaluation_keeps(
        seed: int, decide: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidate points screened in float32 (from one point on, here): every point evaluated
    again gets its float64 value bit for bit, and every point left out (+inf) has each row,
    evaluated in float64, above both the threshold and its row's best value so far, so
    keeping it would have changed nothing; in bound mode some are left out."""
    import certify.bounds.bab as bab_module

    monkeypatch.setattr(bab_module, "SCREEN_MIN", 1)
    real = bab_module._Search._screened_values
    dropped = []

    def check(self, x, sample):  # type: ignore[no-untyped-def]
        bar = self.point_rows.index_select(0, sample).clone()
        if self.threshold is not None:
            bar = torch.maximum(bar, self.threshold)
        got = real(self, x, sample)
        full = self._values(x, sample)
        kept = torch.isfinite(got).all(1)
        assert torch.equal(got[kept], full[kept])
        assert bool((got[~kept] == math.inf).all())
        assert bool((full[~kept] > bar[~kept]).all())
        dropped.append(int((~kept).sum()))
        return got

    monkeypatch.setattr(bab_module._Search, "_screened_values", check)
    model, in_shape = make_cnn(seed, 1)
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 2, in_shape, 0.1, torch.float64)
    spec = random_spec(seed, 2, 2, 4, torch.float64)
    threshold = None
    if decide:  # per row, halfway between CROWN's bound and the smallest value sampled
        crown = compute_bounds(model, x_lo, x_hi, "crown", spec).lower.min(0).values
        values = spec_values(model, all_points(model, x_lo, x_hi, spec, x_lo), spec)
        threshold = tuple(((crown + values.min(0).values.min(0).values) / 2).tolist())
    compute_bounds(model, x_lo, x_hi, "bab", spec, threshold=threshold, max_domains=60,
                   branching="relu", time_limit=20.0)
    assert len(dropped) > 1  # the children's points were considered too
    if not decide:  # (a decision ends after few batches, often before any point is left out)
        assert sum(dropped) > 0


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_a_pass_from_an_activations_record_finishes_the_whole_pass(variant: int) -> None:
    """A backward pass started at an activation's output from the rows and constants the
    whole pass recorded there gives the whole pass's bound (plain, at random slopes and
    split multipliers): what the filter's children start from."""
    from certify.bounds.network import to_network
    from certify.bounds.propagation import EngineOptions, Propagator

    model, in_shape = make_cnn(variant, variant)
    model = model.double()
    net = to_network(model, in_shape)
    x_lo, x_hi, _ = make_box(variant, 3, in_shape, 0.2, torch.float64)
    prop = Propagator(net, x_lo, x_hi, EngineOptions())
    prop.compute_intermediate("adaptive", linear=True)
    positions = [j for j, op in enumerate(net.layers) if isinstance(op, ReluOp)]
    assert len(positions) >= 3
    gen = torch.Generator().manual_seed(variant)
    rows = torch.randn(3, 2, *net.layers[-1].out_shape, generator=gen, dtype=torch.float64)
    const = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    shapes = {j: net.layers[j].in_shape for j in positions}
    alphas = {j: torch.rand(3, 2, *shapes[j], generator=gen, dtype=torch.float64)
              for j in positions}
    betas = {j: torch.randn(3, 2, *shapes[j], generator=gen, dtype=torch.float64)
             * (torch.rand(3, 2, *shapes[j], generator=gen) < 0.3) for j in positions}
    samples = torch.arange(3)
    record: dict[int, torch.Tensor] = {}
    record_const: dict[int, torch.Tensor] = {}
    whole, _ = prop.backward_chunk(len(net.layers), rows, const, samples, both=False,
                                   alphas=alphas, betas=betas, rigorous=False, record=record,
                                   record_const=record_const)
    assert set(record_const) == set(positions)
    for j in positions:
        part, _ = prop.backward_chunk(
            j + 1, record[j], record_const[j], samples, both=False, rigorous=False,
            alphas={q: a for q, a in alphas.items() if q <= j},
            betas={q: b for q, b in betas.items() if q <= j})
        torch.testing.assert_close(part, whole, rtol=1e-12, atol=1e-12)
        # (a pass that started lower changes the bound: the record is not ignored)
        moved, _ = prop.backward_chunk(j + 1, record[j], record_const[j] + 1.0, samples,
                                       both=False, rigorous=False, alphas=alphas, betas=betas)
        torch.testing.assert_close(moved, whole + 1.0, rtol=1e-12, atol=1e-12)


def test_filters_children_from_their_split_activation_choose_as_whole_passes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The filter's children start their passes at their split's activation from their
    parent's recorded rows: every domain gets the same split as with whole passes, on a CNN
    with four activation layers (children split at each of them)."""
    from certify.bounds.bab import _Search

    original = _Search._filter
    seen = {"domains": 0, "layers": set()}

    def twice(self, prop, doms, score, ends, row, target, layer, index,  # type: ignore[no-untyped-def]
              above=None):
        assert above is not None  # a chain's record reaches the filter
        whole = layer.clone(), index.clone()
        original(self, prop, doms, score, ends, row, target, whole[0], whole[1], None)
        original(self, prop, doms, score, ends, row, target, layer, index, above)
        assert torch.equal(layer, whole[0]) and torch.equal(index, whole[1])
        seen["domains"] += int((layer >= 0).sum())
        seen["layers"] |= set(layer.tolist())

    monkeypatch.setattr(_Search, "_filter", twice)
    model, in_shape = make_cnn(0, 0)
    model = model.double()
    x_lo, x_hi, _ = make_box(0, 2, in_shape, 0.15, torch.float64)
    spec = random_spec(0, 2, 3, 4, torch.float64)
    compute_bounds(model, x_lo, x_hi, "bab", spec, branching="relu", max_domains=300,
                   time_limit=30.0)
    assert seen["domains"] > 50 and {0, 1, 2, 3} <= seen["layers"], seen


def test_domains_keep_the_parameters_of_their_open_rows_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After each batch is bounded, every domain keeps slopes and multipliers for exactly its
    rows still open, in ascending order, padding (-1) last; the rows found by `slot` are
    those; each open domain splits for one of its open rows (rows with different targets);
    domains of different widths join padded; the search's bounds stay below every sampled
    point."""
    from certify.bounds.bab import _Domains, _Search

    original = _Search._bound
    widths = []

    def check(self, doms, **kw):  # type: ignore[no-untyped-def]
        point = original(self, doms, **kw)
        still = ~(doms.bound > self._target(doms.sample))
        w = doms.rows.shape[1]
        widths.append(w)
        for i in range(len(doms)):
            want = still[i].nonzero(as_tuple=True)[0].tolist()
            got = doms.rows[i].tolist()
            assert got == want + [-1] * (w - len(want))
            if want:
                slots = doms.slot(torch.full((len(want),), i), torch.tensor(want))
                assert slots.tolist() == list(range(len(want)))
        assert all(a.shape[:2] == doms.rows.shape for a in doms.alpha + doms.beta)
        return point

    split_for = []
    real_filter = _Search._filter

    def rows_split_for(self, prop, doms, score, ends, row, target, layer, index,  # type: ignore[no-untyped-def]
                       above=None):
        # each domain with an open row splits for one of its open rows
        open_ = (~(doms.bound > target)).any(1)
        at = torch.arange(len(doms))
        assert bool((~(doms.bound[at, row] > target[at, row]))[open_].all())
        split_for.append(int(open_.sum()))
        return real_filter(self, prop, doms, score, ends, row, target, layer, index, above)

    monkeypatch.setattr(_Search, "_bound", check)
    monkeypatch.setattr(_Search, "_filter", rows_split_for)
    model, in_shape = make_cnn(1, 2)
    model = model.double()
    x_lo, x_hi, x = make_box(1, 2, in_shape, 0.1, torch.float64)
    spec = random_spec(1, 2, 4, 4, torch.float64)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec).lower
    values = spec_values(model, all_points(model, x_lo, x_hi, spec, x), spec).min(0).values
    # per row, between CROWN's bound and the smallest value sampled: rows decided one by one
    threshold = tuple((crown.min(0).values + (values.min(0).values - crown.min(0).values)
                       * torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)).tolist())
    b = compute_bounds(model, x_lo, x_hi, "bab", spec, branching="relu", max_domains=400,
                       time_limit=30.0, threshold=threshold)
    assert max(widths) > 1 and min(widths) < max(widths), widths
    assert sum(split_for) > 0
    assert bool((b.lower <= values + 1e-9).all())
    for i, status in enumerate(b.status):
        assert status in (ABOVE, BELOW)
        if status == ABOVE:
            assert bool((b.lower[i] > torch.tensor(threshold, dtype=torch.float64)).all())
    # joining domains of different widths pads the narrower; a row not kept finds slot 0
    first = [t[:1] for t in (torch.zeros(1), x_lo, x_hi)]
    one = _Domains(first[0].long(), first[1], first[2], [], [], [], [torch.ones(1, 1, 3)],
                   [torch.ones(1, 1, 3)], torch.tensor([[2]]), torch.zeros(1, 4),
                   *[torch.zeros(1, dtype=torch.int64)] * 4)
    two = replace(one, alpha=[torch.full((1, 2, 3), 0.5)], beta=[torch.full((1, 2, 3), 0.5)],
                  rows=torch.tensor([[1, 3]]))
    both = _Domains.cat([one, two])
    assert both.rows.tolist() == [[2, -1], [1, 3]]
    assert both.alpha[0][0, 1].tolist() == [0.0] * 3 and both.alpha[0][1, 1].tolist() == [0.5] * 3
    assert both.slot(torch.tensor([0, 1, 1, 0]), torch.tensor([2, 3, 1, 0])).tolist() == [
        0, 1, 0, 0]
