"""Intermediate bounds reused across a radius search (certify.bounds.reuse), sparse (unstable
neurons only) against dense tightening, and the float32 rigorous constant's error bound."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import compute_bounds, get_method, to_network
from certify.bounds.layers import ReluOp
from certify.bounds.propagation import EngineOptions, Propagator
from certify.bounds.relaxations import ACTIVATIONS, ActivationRule
from certify.bounds.reuse import BoundMemory
from certify.nets import Normalize
from certify.radius import certified_radii
from certify.spec import LinfBall
from tests.bounds.bound_helpers import (
    SOUND_ATOL,
    all_points,
    make_cnn,
    make_mlp,
    random_spec,
    spec_values,
)
from tests.bounds.dag_helpers import make_dag

F64 = torch.float64


def _net(kind: str, seed: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    if kind == "mlp":
        return make_mlp(seed, [12, 10, 8], in_shape=(1, 4, 4)), (1, 4, 4)
    return make_cnn(seed, seed % 3)


def _centers(seed: int, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g, dtype=F64).to(dtype)


def _pre_activations(model: nn.Sequential, points: torch.Tensor) -> list[torch.Tensor]:
    """The input of every ReLU of `model` at `points` `(P, N, *in)`, `(P, N, *shape)` each."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    p, n = points.shape[:2]
    try:
        with torch.no_grad():
            model(points.reshape(p * n, *points.shape[2:]))
    finally:
        for h in hooks:
            h.remove()
    return [s.reshape(p, n, *s.shape[1:]) for s in seen]


def _assert_holds_reachable(bounds, model, lo, hi, spec, x, seed, rtol=0.0,  # type: ignore[no-untyped-def]
                            pre_activations=True):
    """`bounds` hold every spec value and pre-activation (unless not `pre_activations`: a
    model with functional ReLUs) reached by samples, corners and PGD points in the boxes
    ``[lo, hi]`` (up to `rtol` relative: plain float32 bounds round)."""
    points = all_points(model, lo, hi, spec, x, seed=seed)
    with torch.no_grad():
        values = spec_values(model, points, spec)
    pairs = [(bounds, values)]
    if pre_activations:
        assert bounds.pre_activation is not None
        pairs += zip(bounds.pre_activation, _pre_activations(model, points), strict=True)
    for b, reached in pairs:
        slack = 1e-9 + rtol * (1 + reached.abs())
        assert (reached >= b.lower - slack).all() and (reached <= b.upper + slack).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["mlp", "cnn"]),
       big=st.sampled_from([0.05, 0.2, 0.6]), shrink=st.sampled_from([0.0, 0.3, 0.9, 1.0]))
def test_reused_bounds_contain_every_reachable_value(dtype, seed, kind, big, shrink):  # type: ignore[no-untyped-def]
    """Bounds at a small eps computed from a memory filled at a larger eps (of the same samples)
    contain every pre-activation and spec value reached by samples, corners and PGD in the
    small box, in both dtypes, rigorous or not."""
    model, shape = _net(kind, seed)
    model = model.to(dtype).eval()
    x = _centers(seed + 1, 4, shape, dtype)
    spec = random_spec(seed + 2, 4, 3, 4 if kind == "cnn" else 3, dtype)
    for rigorous in (True, False):
        method = get_method("crown", rigorous=rigorous).searching()
        lo_big, hi_big = LinfBall(x, big).box()
        compute_bounds(model, lo_big, hi_big, method, spec)
        assert method.memory is not None and len(method.memory) == 1
        lo, hi = LinfBall(x, big * shrink).box()
        bounds = compute_bounds(model, lo, hi, method, spec)
        assert method.memory.recalled == 4  # every sample found the larger box
        points = all_points(model, lo, hi, spec, x, seed=seed)
        with torch.no_grad():
            values = spec_values(model, points, spec)
        atol = SOUND_ATOL[dtype] * (1 + float(values.abs().max()))
        assert (values >= bounds.lower - atol).all(), (bounds.lower - values).max()
        assert (values <= bounds.upper + atol).all(), (values - bounds.upper).max()
        pre = bounds.pre_activation
        assert pre is not None
        for b, reached in zip(pre, _pre_activations(model, points), strict=True):
            scale = SOUND_ATOL[dtype] * (1 + float(reached.abs().max()))
            assert (reached >= b.lower - scale).all() and (reached <= b.upper + scale).all()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_reused_bounds_are_never_looser_than_the_remembered_ones(kind):  # type: ignore[no-untyped-def]
    """Each reused pre-activation bound lies inside the one remembered from the larger box
    (they are intersected) and inside the small box's own interval (IBP) bound."""
    model, shape = _net(kind, 3)
    model = model.double()
    x = _centers(5, 6, shape, F64)
    spec = random_spec(6, 6, 3, 4 if kind == "cnn" else 3, F64)
    method = get_method("crown").searching()
    big = compute_bounds(model, *LinfBall(x, 0.1).box(), method, spec)
    lo, hi = LinfBall(x, 0.04).box()
    reused = compute_bounds(model, lo, hi, method, spec)
    ibp = Propagator(to_network(model, shape), lo, hi, EngineOptions())
    ibp.interval()
    assert big.pre_activation is not None and reused.pre_activation is not None
    for b, r, i in zip(big.pre_activation, reused.pre_activation, ibp.intermediate_bounds(),
                       strict=True):
        assert (r.lower >= b.lower).all() and (r.upper <= b.upper).all()
        # (the interval pass itself differs from the engine's by an ulp after pooling)
        ulp = 1e-12 * (1 + i.lower.abs() + i.upper.abs())
        assert (r.lower >= i.lower - ulp).all() and (r.upper <= i.upper + ulp).all()
        assert (r.lower <= r.upper).all()


def test_memory_never_recalls_a_box_that_does_not_hold_the_query():  # type: ignore[no-untyped-def]
    model, shape = _net("mlp", 1)
    net = to_network(model.double(), shape)
    x = _centers(2, 3, shape, F64)
    memory = BoundMemory()
    small = LinfBall(x, 0.01).box()
    prop = Propagator(net, *small, EngineOptions(), memory=memory)
    prop.compute_intermediate("adaptive", linear=True)
    assert len(memory) == 1
    # a larger box around the same centers, and the same-size box around moved centers:
    # neither lies inside the remembered one
    for lo, hi in (LinfBall(x, 0.02).box(), LinfBall((x + 0.001).clamp(0, 1), 0.01).box()):
        assert memory.recall(prop._memory_kind(), lo, hi) is None
    # only the sample whose box is inside is matched
    lo, hi = LinfBall(x, 0.005).box()
    lo[1], hi[1] = LinfBall(x[1:2], 0.5).box()[0][0], LinfBall(x[1:2], 0.5).box()[1][0]
    known = memory.recall(prop._memory_kind(), lo, hi)
    assert known is not None
    for pos, (k_lo, k_hi) in known.items():
        assert torch.isinf(k_lo[1]).all() and torch.isinf(k_hi[1]).all()
        assert torch.isfinite(k_lo[0]).all() and torch.isfinite(k_lo[2]).all()
        assert pos in prop.pre_bounds


def test_plain_bounds_never_enter_a_rigorous_one():  # type: ignore[no-untyped-def]
    """The search's plain float32 bound and its rigorous float64 confirmation share one
    memory; neither recalls the other's bounds."""
    model, shape = _net("cnn", 4)
    net = to_network(model, shape)
    x = _centers(3, 2, shape, torch.float32)
    memory = BoundMemory()
    box = LinfBall(x, 0.05).box()
    Propagator(net, *box, EngineOptions(rigorous=False), memory=memory).compute_intermediate(
        "adaptive", linear=True)
    rigorous = Propagator(net, *box, EngineOptions(), memory=memory)
    rigorous.compute_intermediate("adaptive", linear=True)
    net64 = net.to(dtype=F64, device=torch.device("cpu"))
    box64 = LinfBall(x.double(), 0.01).box()
    Propagator(net64, *box64, EngineOptions(), memory=memory).compute_intermediate(
        "adaptive", linear=True)
    assert memory.recalled == 0 and len(memory) == 3


def test_memory_budget_drops_the_oldest():  # type: ignore[no-untyped-def]
    model, shape = _net("mlp", 2)
    net = to_network(model.double(), shape)
    x = _centers(1, 2, shape, F64)
    memory = BoundMemory(budget_mb=1e-9)  # nothing fits
    Propagator(net, *LinfBall(x, 0.1).box(), EngineOptions(), memory=memory
               ).compute_intermediate("adaptive", linear=True)
    assert len(memory) == 0
    memory = BoundMemory()
    for eps in (0.3, 0.2, 0.1):
        Propagator(net, *LinfBall(x, eps).box(), EngineOptions(), memory=memory
                   ).compute_intermediate("adaptive", linear=True)
    one = memory.nbytes // 3
    memory.budget = 2 * one
    Propagator(net, *LinfBall(x, 0.05).box(), EngineOptions(), memory=memory
               ).compute_intermediate("adaptive", linear=True)
    assert len(memory) == 2 and memory.nbytes <= 2 * one
    kind = next(iter(memory._kinds))
    # the 0.3 and 0.2 boxes were dropped: a 0.15 box finds nothing
    assert memory.recall(kind, *LinfBall(x, 0.15).box()) is None


@pytest.mark.parametrize("rigorous", [True, False])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sparse_tightening_equals_dense(kind, rigorous, monkeypatch):  # type: ignore[no-untyped-def]
    """Linear bounds for the unstable neurons only (the engine) against linear bounds for every
    neuron (dense): the same relaxations (a stable neuron's is exact whatever its bounds), a
    final bound within 1% of the dense one and sound on samples, corners and PGD points."""
    model, shape = _net(kind, 7)
    x = _centers(8, 5, shape, F64)
    spec = random_spec(9, 5, 3, 4 if kind == "cnn" else 3, F64)
    lo, hi = LinfBall(x, 0.08).box()
    method = get_method("crown", rigorous=rigorous, intermediate_mode="backward")
    sparse = compute_bounds(model.double(), lo, hi, method, spec)
    rule = ACTIVATIONS[ReluOp]
    assert isinstance(rule, ActivationRule)
    monkeypatch.setitem(ACTIVATIONS, ReluOp, rule._replace(
        tighten=lambda lower, upper: torch.ones_like(lower, dtype=torch.bool)))
    dense = compute_bounds(model.double(), lo, hi, method, spec)
    # the stable neurons' interval bounds feed the next layer's intervals (and, rigorous,
    # the rounding terms): dense is tighter or equal, and close
    assert (dense.lower >= sparse.lower - 1e-12).all()
    assert (dense.upper <= sparse.upper + 1e-12).all()
    assert (dense.lower - sparse.lower <= 1e-2 * (1 + dense.lower.abs())).all()
    assert (sparse.upper - dense.upper <= 1e-2 * (1 + dense.upper.abs())).all()
    points = all_points(model.double(), lo, hi, spec, x)
    with torch.no_grad():
        values = spec_values(model.double(), points, spec)
    assert (values >= sparse.lower - 1e-9).all() and (values <= sparse.upper + 1e-9).all()
    assert sparse.pre_activation is not None and dense.pre_activation is not None
    for s, d in zip(sparse.pre_activation, dense.pre_activation, strict=True):
        # the dense bounds are tighter or equal, and agree on every neuron's stability
        assert (d.lower >= s.lower - 1e-9).all() and (d.upper <= s.upper + 1e-9).all()
        assert torch.equal((s.lower < 0) & (s.upper > 0), (d.lower < 0) & (d.upper > 0))


def test_search_reuses_bounds_and_keeps_its_radii(tiny_cnn):  # type: ignore[no-untyped-def]
    """A radius search with reuse computes fewer backward rows for intermediate layers than
    one without, and finds the same radii within tol."""
    model = tiny_cnn
    x = _centers(11, 12, (1, 8, 8), torch.float32)
    with torch.no_grad():
        y = model(x).argmax(1)
    rows = {"count": 0}
    original = Propagator.backward_neurons

    def counting(self, pos, mask, **options):  # type: ignore[no-untyped-def]
        rows["count"] += int(mask.sum())
        return original(self, pos, mask, **options)

    counts, radii = {}, {}
    for reuse in (False, True):
        rows["count"] = 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Propagator, "backward_neurons", counting)
            res = certified_radii(model, x, y, "crown", tol=1e-4, reuse=reuse)
        counts[reuse], radii[reuse] = rows["count"], res.certified_eps
    assert counts[True] < counts[False]
    assert (radii[True] - radii[False]).abs().max() <= 1e-4


def test_rigorous_float32_bound_is_close_to_float64_on_a_large_normalized_input():  # type: ignore[no-untyped-def]
    """The constant of a normalization over 3x32x32 pixels is a 3072-term sum; its error bound
    must not multiply the rows' own error by that count (float32 rigorous bounds were off by
    orders of magnitude)."""
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.45] * 3, [0.25] * 3), nn.Conv2d(3, 8, 4, 2, 1), nn.ReLU(),
                          nn.Conv2d(8, 8, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(512, 10)).eval()
    x = _centers(0, 3, (3, 32, 32), torch.float32)
    y = torch.tensor([0, 1, 2])
    from certify.bounds import margin_bounds

    b32 = margin_bounds(model, x, y, 0.001, "crown").lower
    b64 = margin_bounds(model.double(), x.double(), y, 0.001, "crown").lower
    assert ((b64 - b32.double()).abs() <= 0.01 * (1 + b64.abs())).all(), (b64 - b32).abs().max()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), flip=st.sampled_from([0.0, 0.3, 1.0]))
def test_inactivity_hints_keep_bounds_sound_even_when_wrong(kind, seed, flip):  # type: ignore[no-untyped-def]
    """Hints only choose which bound of a neuron is computed: with hints from the same box
    (right), or with a fraction `flip` of them replaced by coin flips (wrong), every bound
    still contains every reachable value, and right hints lose next to nothing of the
    margin."""
    model, shape = _net(kind, seed)
    model = model.double().eval()
    x = _centers(seed + 1, 3, shape, F64)
    spec = random_spec(seed + 2, 3, 3, 4 if kind == "cnn" else 3, F64)
    lo, hi = LinfBall(x, 0.05).box()
    plain = get_method("crown", rigorous=False).searching()
    compute_bounds(model, lo, hi, plain, spec)  # fills the memory: the hints' source
    memory = plain.memory
    assert memory is not None
    kind_key = next(iter(memory._kinds))
    hints = memory.hints(kind_key.layout, lo, hi)
    assert hints is not None and any(bool(h[0].any()) for h in hints.values())
    g = torch.Generator().manual_seed(seed)
    for pos, h in hints.items():
        flipped = []
        for part in h:
            wrong = torch.rand(part.shape, generator=g) < flip
            noise = torch.rand(part.shape, generator=g) < 0.5
            flipped.append(torch.where(wrong, noise, part))
        hints[pos] = (flipped[0], flipped[1])
    original = Propagator._hints
    try:
        Propagator._hints = lambda self: hints  # type: ignore[method-assign]
        bounds = compute_bounds(model, lo, hi, get_method("crown"), spec)
    finally:
        Propagator._hints = original  # type: ignore[method-assign]
    _assert_holds_reachable(bounds, model, lo, hi, spec, x, seed)
    if flip == 0.0:  # up to the float32 proofs of stable neurons (see the test below)
        fresh = compute_bounds(model, lo, hi, get_method("crown"), spec)
        assert (bounds.lower - fresh.lower).abs().max() <= 1e-4


def test_hints_come_from_the_same_box_or_one_holding_it():  # type: ignore[no-untyped-def]
    """The radius search's rigorous float64 bound takes hints from its plain float32
    evaluation at the same eps, or from one at a larger eps (a closing shot just below a
    failure); a box at a larger eps than any remembered gets none."""
    model, shape = _net("cnn", 5)
    net = to_network(model, shape)
    x = _centers(4, 2, shape, torch.float32)
    memory = BoundMemory()
    Propagator(net, *LinfBall(x, 0.03).box(), EngineOptions(rigorous=False), memory=memory
               ).compute_intermediate("adaptive", linear=True)
    net64 = net.to(dtype=F64, device=torch.device("cpu"))
    for eps, hinted in ((0.03, True), (0.02, True), (0.04, False)):
        prop = Propagator(net64, *LinfBall(x.double(), eps).box(), EngineOptions(),
                          memory=memory)
        assert bool(prop._hints()) == hinted, eps


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), jitter=st.sampled_from([0.0, 1e-12, 1e-6]))
def test_float32_stability_proofs_are_sound_and_lose_nothing(kind, seed, jitter):  # type: ignore[no-untyped-def]
    """A rigorous float64 bound given stability hints proves the hinted neurons stable in
    float32 first, the network cast with its rounding in the ops' error fields (`jitter`
    makes weights float32 cannot hold): every bound still holds every reachable value, most
    hinted neurons are proven in float32, and the final bound equals the one computed
    without hints up to float32's rounding."""
    model, shape = _net(kind, seed)
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + jitter * torch.randn(p.shape, generator=g, dtype=F64))
    x = _centers(seed + 1, 3, shape, F64)
    spec = random_spec(seed + 2, 3, 3, 4 if kind == "cnn" else 3, F64)
    lo, hi = LinfBall(x, 0.05).box()
    method = get_method("crown").searching()
    plain = dataclasses.replace(get_method("crown", rigorous=False), memory=method.memory)
    compute_bounds(model, lo, hi, plain, spec)  # the hints' source, in the shared memory
    seen = {"hinted": 0, "proven": 0, "errors": 0.0}
    original = Propagator._stable_in_float32

    def counting(self, twin, pos, rule, mask, *args):  # type: ignore[no-untyped-def]
        out = original(self, twin, pos, rule, mask, *args)
        seen["hinted"] += int(mask.sum())
        seen["proven"] += int(out[0].sum())
        # what the cast to float32 moved the weights by (folded ones move without jitter)
        seen["errors"] += sum(float(getattr(op, f).abs().sum())
                              for op in twin.layers[:pos] for f in ("weight_err", "bias_err")
                              if getattr(op, f, None) is not None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Propagator, "_stable_in_float32", counting)
        bounds = compute_bounds(model, lo, hi, method, spec)
    assert seen["hinted"] > 0, "no neuron was hinted stable: the test proves nothing"
    assert seen["proven"] >= 0.5 * seen["hinted"], seen
    assert seen["errors"] > 0 or jitter == 0, seen  # the cast's rounding is accounted
    _assert_holds_reachable(bounds, model, lo, hi, spec, x, seed)
    # the stable neurons' float32 bounds are looser by float32's rounding terms (up to ~1e-4
    # here, worst-case sums of absolute products), and so are the intervals of later layers
    # with them: the final bound moves by a fraction of that
    fresh = compute_bounds(model, lo, hi, get_method("crown"), spec)
    assert (bounds.lower - fresh.lower).abs().max() <= 1e-4
    assert (bounds.upper - fresh.upper).abs().max() <= 1e-4


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**20), dims=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_screened_comparisons_equal_the_elementwise_ones(seed, dims, dtype):  # type: ignore[no-untyped-def]
    """The coordinate-group screening before box comparisons never drops a pair: containment
    and the largest distance between ends equal the elementwise comparison of every pair, on
    nested boxes (one center, several eps, clipped to [0, 1]), identical boxes, boxes that
    differ in one coordinate by one float, and unrelated ones."""
    from certify.bounds import reuse

    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(5, dims, generator=g, dtype=F64)
    centers[:, : dims // 3] = 0.0  # shared coordinates, as an image's blank border
    boxes = []
    for c in centers:
        for eps in (0.0, 1e-4, 0.01, 0.3):
            boxes.append(((c - eps).clamp(0, 1), (c + eps).clamp(0, 1)))
    lo = torch.stack([b[0] for b in boxes]).to(dtype)
    hi = torch.stack([b[1] for b in boxes]).to(dtype)
    k = int(torch.randint(0, dims, (1,), generator=g))
    nudged_lo = lo[:3].clone()
    nudged_lo[:, k] = torch.nextafter(nudged_lo[:, k], torch.full_like(nudged_lo[:, k], 2.0))
    lo = torch.cat([lo, nudged_lo, lo[:2]])
    hi = torch.cat([hi, hi[:3], hi[:2]])
    q_lo, q_hi, e_lo, e_hi = lo, hi, lo.flip(0), hi.flip(0)
    brute_holds = reuse._holds(q_lo[:, None], q_hi[:, None], e_lo[None], e_hi[None])
    got = reuse._holding(q_lo, q_hi, e_lo, e_hi)
    assert torch.equal(got, brute_holds)
    assert got.any()
    q64, e64 = (q_lo.to(F64), q_hi.to(F64)), (e_lo.to(F64), e_hi.to(F64))
    brute = reuse._distance(q64[0][:, None], q64[1][:, None], e64[0][None], e64[1][None])
    for reach in (0.0, 1e-4, 0.02, 1.0):
        r = torch.full((q_lo.shape[0],), reach, dtype=F64)
        near = reuse._nearness(*q64, *e64, r)
        within = brute <= reach
        assert torch.equal(near <= reach, within)
        assert torch.equal(near[within], brute[within])


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, width=64), min_size=1, max_size=40))
def test_float32_casts_round_outward_and_never_to_a_subnormal(values):  # type: ignore[no-untyped-def]
    """The float32 twin's boxes and bounds: ``up`` is never below the float64 value, ``down``
    never above, a normal value float32 holds is kept, and no result is subnormal (they
    would slow every later product 20-50x)."""
    from certify.bounds.propagation import _float32

    t = torch.tensor(values + [0.0, 1e-300, -1e-300, 1e-40, 2.0**-149, 1.0 + 2.0**-40],
                     dtype=F64)
    up, down = _float32(t, up=True), _float32(t, up=False)
    assert up.dtype == down.dtype == torch.float32
    assert (up.double() >= t).all() and (down.double() <= t).all()
    tiny = torch.finfo(torch.float32).tiny
    held = (t.float().double() == t) & ((t == 0) | (t.abs() >= tiny))
    assert torch.equal(up[held], t[held].float()) and torch.equal(down[held], t[held].float())
    for r in (up, down):
        assert ((r == 0) | (r.abs() >= tiny)).all()


@pytest.mark.parametrize("kind", ["mlp", "cnn", "dag"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, F64]),
       guess=st.sampled_from(["center", "all", "random"]))
def test_inactivity_guesses_change_no_bound(kind, seed, dtype, guess):  # type: ignore[no-untyped-def]
    """Plain bounds without hints guess a ReLU neuron inactive (negative at the box's center;
    here also every neuron, or coin flips): its upper bound first, its lower bound only where
    that does not prove it inactive. The bounds equal those without guesses (up to the
    rounding of rows batched differently) on every neuron that can matter -- the final
    bounds, every upper bound, every lower bound of a neuron not proven inactive -- and hold
    every reachable value. Rigorous bounds make no guesses (their intermediate bounds feed
    LP/MILP encodings)."""
    rigorous = False
    model, shape = make_dag(seed, seed % 6) if kind == "dag" else _net(kind, seed)
    model = model.to(dtype).eval()
    x = _centers(seed + 1, 3, shape, dtype)
    spec = random_spec(seed + 2, 3, 3, 4 if kind == "cnn" else 3, dtype)
    lo, hi = LinfBall(x, 0.05).box()
    method = get_method("crown", rigorous=rigorous, intermediate_mode="backward")
    g = torch.Generator().manual_seed(seed)
    original = Propagator._center_inactive
    sides = {"upper": 0, "lower": 0, "both": 0, "live": 0}
    backward = Propagator.backward_neurons

    def guessed(self, pos):  # type: ignore[no-untyped-def]
        center = original(self, pos)
        if guess == "all":
            return torch.ones_like(center)
        if guess == "random":
            return torch.rand(center.shape, generator=g) < 0.5
        return center

    def counting(self, pos, mask, side="both"):  # type: ignore[no-untyped-def]
        sides[side] += int(mask.sum())
        out = backward(self, pos, mask, side=side)
        sides["live"] += int((out[3] > 1e-6).sum())  # tightened and certainly not inactive
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Propagator, "_center_inactive", guessed)
        mp.setattr(Propagator, "backward_neurons", counting)
        bounds = compute_bounds(model, lo, hi, method, spec)
    guessed_sides = dict(sides)
    sides.update(upper=0, lower=0, both=0, live=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Propagator, "_center_inactive",
                   lambda self, pos: torch.zeros_like(original(self, pos)))
        mp.setattr(Propagator, "backward_neurons", counting)
        plain = compute_bounds(model, lo, hi, method, spec)
    # the same neurons are tightened: each guessed one by its upper row first, the rest by both
    assert guessed_sides["upper"] + guessed_sides["both"] == sides["both"]
    assert sides["upper"] == sides["lower"] == 0
    if guess == "all":  # every guess the upper bound did not prove gets its lower bound
        assert guessed_sides["both"] == 0
        assert sides["live"] <= guessed_sides["lower"] <= sides["both"]
    tol = (1e-5 if dtype == torch.float32 else 1e-11)
    close = lambda a, b: ((a - b).abs() <= tol * (1 + b.abs())).all()  # noqa: E731
    assert close(bounds.lower, plain.lower) and close(bounds.upper, plain.upper)
    assert bounds.pre_activation is not None and plain.pre_activation is not None
    for b, p in zip(bounds.pre_activation, plain.pre_activation, strict=True):
        assert close(b.upper, p.upper)
        live = p.upper > 0
        assert close(b.lower[live], p.lower[live])
        assert (b.lower <= p.lower + tol * (1 + p.lower.abs())).all()  # never tighter
    rtol = SOUND_ATOL[torch.float32] if dtype == torch.float32 else 0.0  # plain: it rounds
    _assert_holds_reachable(bounds, model, lo, hi, spec, x, seed, rtol=rtol,
                            pre_activations=kind != "dag")  # the DAGs' ReLUs are functional
    calls = {"guesses": 0}

    def never(self, pos):  # type: ignore[no-untyped-def]
        calls["guesses"] += 1
        return original(self, pos)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Propagator, "_center_inactive", never)
        compute_bounds(model, lo, hi, get_method("crown", intermediate_mode="backward"), spec)
    assert calls["guesses"] == 0
