"""The radius search, driven by analytic margin functions whose exact root is known.

A linear classifier ``f(x) = W x + b`` over an *unclipped* box has the exact margin lower bound
``m(eps) = min_j [(w_y - w_j).x + b_y - b_j - eps ||w_y - w_j||_1]``, so its exact certified
radius is ``min_j margin_j / ||w_y - w_j||_1``. The last part runs the search on the real bound
engine (tiny random networks and a quickly trained digits MLP).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import get_method
from certify.errors import SoundnessError, SpecError, UnknownNameError
from certify.radius import RadiusResult, certified_radii, linear_radius, search_radii
from certify.report.results import SAMPLE_COLUMNS, read_sample_csv, write_sample_csv

TOL = 1e-4
FP = 1e-12  # the test computes the exact root in a different float order than bound()


class Linear:
    """A linear classifier with its exact margin bound and exact radius."""

    def __init__(self, n: int = 60, d: int = 16, k: int = 5, seed: int = 0,
                 wrong: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        lin = nn.Linear(d, k).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64))
            lin.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64) * 0.1)
        self.lin = lin
        self.model = nn.Sequential(nn.Flatten(), lin).eval()
        self.x = 0.3 + 0.4 * torch.rand(n, 1, 4, d // 4, generator=g, dtype=torch.float64)
        with torch.no_grad():
            pred = self.model(self.x).argmax(1)
        self.y = pred.clone()
        self.y[:wrong] = (pred[:wrong] + 1) % k
        self.calls: list[int] = []

    @torch.no_grad()
    def bound(self, xs: torch.Tensor, ys: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(ys))
        w, b = self.lin.weight.double(), self.lin.bias.double()
        # row-wise sums, no matmul: the same value for a row in any batch, so re-verifying a
        # radius in another batch composition gives bit-identical margins
        z = (xs.flatten(1).double()[:, None, :] * w[None]).sum(-1) + b
        l1 = (w[ys][:, None, :] - w[None]).abs().sum(-1)  # (n, K)
        m = z.gather(1, ys[:, None]) - z - eps.double()[:, None] * l1
        return m.scatter(1, ys[:, None], math.inf).amin(1)

    @torch.no_grad()
    def exact(self) -> torch.Tensor:
        w = self.lin.weight
        z = self.model(self.x)
        out = torch.zeros(len(self.y), dtype=torch.float64)
        for i, yi in enumerate(self.y.tolist()):
            l1 = (w[yi] - w).abs().sum(1)
            r = (z[i, yi] - z[i]) / l1
            r[yi] = math.inf
            out[i] = max(float(r.min()), 0.0)
        return out

    def correct(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.x).argmax(1) == self.y


def run(lin: Linear, **kwargs) -> RadiusResult:
    kwargs.setdefault("tol", TOL)
    return search_radii(lin.model, lin.x, lin.y, lin.bound, name="exact", **kwargs)


# ------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("search", ["fast", "bisection"])
def test_recovers_the_exact_radius_from_below(search):
    lin = Linear()
    res = run(lin, search=search)
    exact = lin.exact()
    ok = lin.correct()
    assert (res.certified_eps[ok] < exact[ok] + FP).all(), "certified above the exact radius"
    assert (res.certified_eps[ok] >= exact[ok] - TOL - FP).all()
    assert (res.search_upper[ok] - res.certified_eps[ok] <= TOL).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 100_000), k=st.integers(2, 8), tol=st.sampled_from([1e-2, 1e-3, 1e-5]),
       eps_max=st.sampled_from([0.05, 0.5, 2.0]), search=st.sampled_from(["fast", "bisection"]))
def test_generated_linear_models(seed, k, tol, eps_max, search):
    lin = Linear(n=12, k=k, seed=seed, wrong=2)
    res = run(lin, tol=tol, eps_max=eps_max, search=search)
    truth = lin.exact().clamp(max=eps_max)
    ok = lin.correct()
    assert (res.certified_eps <= truth + FP).all()
    assert (res.certified_eps[ok] >= truth[ok] - tol - FP).all()
    assert (res.certified_eps[~ok] == 0).all()
    # every reported radius re-verifies; every upper end failed or is eps_max
    pos = res.certified_eps > 0
    assert (lin.bound(lin.x[pos], lin.y[pos], res.certified_eps[pos]) > 0).all()
    failed = lin.bound(lin.x[ok], lin.y[ok], res.search_upper[ok]) <= 0
    assert (failed | (res.search_upper[ok] == eps_max)).all()


def test_misclassified_get_zero_without_any_bound_evaluation():
    lin = Linear(wrong=10)
    res = run(lin)
    wrong = ~lin.correct()
    assert wrong.sum() >= 10
    assert (res.certified_eps[wrong] == 0).all()
    assert (res.evaluations[wrong] == 0).all()
    assert (res.pred[wrong] != res.label[wrong]).all()


def test_one_bound_call_per_step_with_only_the_open_rows():
    lin = Linear(n=40)
    res = run(lin)
    assert sum(lin.calls) == int(res.evaluations.sum())
    assert max(lin.calls) <= int(lin.correct().sum())
    assert lin.calls == sorted(lin.calls, reverse=True), "open rows can only shrink"
    assert len(lin.calls) == int(res.evaluations.max())


# -------------------------------------------------------------------------- fast vs bisection


def test_fast_equals_bisection_within_tol_with_far_fewer_evaluations():
    lin = Linear(n=120, k=10, seed=3)
    fast, bis = run(lin, search="fast"), run(lin, search="bisection")
    assert (fast.certified_eps - bis.certified_eps).abs().max() <= TOL
    ok = lin.correct()
    mean_fast = fast.evaluations[ok].double().mean()
    mean_bis = bis.evaluations[ok].double().mean()
    assert mean_bis >= 12  # log2(0.5 / 1e-4) ~ 12.3
    assert mean_fast <= 5 and mean_fast < mean_bis / 2


def smooth_bound(lin: Linear, curvature: float):
    """A concave, curved margin: m(eps) = m_lin(eps) - curvature * eps^2 * ||.||_1 (monotone)."""

    def bound(xs, ys, eps):
        m = lin.bound(xs, ys, eps)
        return m - curvature * eps.double() ** 2 * lin.lin.weight.abs().sum()

    return bound


@pytest.mark.parametrize("curvature", [5.0, 50.0])
def test_fast_search_on_curved_margins(curvature):
    lin = Linear(n=80, seed=4)
    bound = smooth_bound(lin, curvature)
    fast = search_radii(lin.model, lin.x, lin.y, bound, search="fast", tol=TOL)
    bis = search_radii(lin.model, lin.x, lin.y, bound, search="bisection", tol=TOL)
    assert (fast.certified_eps - bis.certified_eps).abs().max() <= TOL
    ok = lin.correct()
    assert fast.evaluations[ok].double().mean() < 0.5 * bis.evaluations[ok].double().mean()


def test_smaller_tol_never_lowers_a_radius_by_more_than_the_old_tol():
    lin = Linear(n=50, seed=5)
    bound = smooth_bound(lin, 20.0)
    previous = None
    for tol in [1e-2, 1e-3, 1e-4, 1e-6]:
        res = search_radii(lin.model, lin.x, lin.y, bound, tol=tol)
        if previous is not None:
            old_tol, old = previous
            assert (res.certified_eps >= old.certified_eps - old_tol).all()
        previous = (tol, res)


# ------------------------------------------------------------------------------- soundness


def wavy_bound(lin: Linear, amplitude: float, freq: float):
    """A non-monotone margin with several sign changes."""

    def bound(xs, ys, eps):
        m = lin.bound(xs, ys, eps)
        return m + amplitude * torch.sin(freq * eps.double())

    return bound


@pytest.mark.parametrize("search", ["fast", "bisection"])
@pytest.mark.parametrize("amplitude, freq", [(0.3, 400.0), (1.0, 90.0), (0.05, 3000.0)])
def test_non_monotone_margin_is_still_sound(search, amplitude, freq):
    lin = Linear(n=40, seed=6)
    bound = wavy_bound(lin, amplitude, freq)
    res = search_radii(lin.model, lin.x, lin.y, bound, search=search, tol=TOL)
    pos = res.certified_eps > 0
    assert (bound(lin.x[pos], lin.y[pos], res.certified_eps[pos]) > 0).all()
    ok = lin.correct()
    failed = bound(lin.x[ok], lin.y[ok], res.search_upper[ok]) <= 0
    assert (failed | (res.search_upper[ok] == 0.5)).all()
    assert (res.search_upper[ok] - res.certified_eps[ok] <= TOL).all()
    assert res.evaluations.max() <= 64


def test_nan_and_minus_inf_margins_never_verify():
    lin = Linear(n=20, seed=7)

    def bound(xs, ys, eps):
        m = lin.bound(xs, ys, eps)
        return torch.where(eps > 0.01, torch.full_like(m, math.nan), m)

    res = search_radii(lin.model, lin.x, lin.y, bound, tol=TOL)
    assert (res.certified_eps <= 0.01).all()
    res2 = search_radii(lin.model, lin.x, lin.y,
                        lambda xs, ys, eps: torch.full((len(ys),), -math.inf), tol=TOL)
    assert (res2.certified_eps == 0).all()


def test_float32_search_evaluates_representable_eps_and_reverifies():
    lin = Linear(n=30, seed=8)
    model32 = lin.model.float()
    x32 = lin.x.float()
    seen = []

    def bound(xs, ys, eps):
        assert eps.dtype == torch.float32
        seen.append(eps.clone())
        return lin.bound(xs, ys, eps)

    res = search_radii(model32, x32, lin.y, bound, tol=1e-5)
    assert torch.equal(res.certified_eps.float().double(), res.certified_eps)
    pos = res.certified_eps > 0
    assert (lin.bound(x32[pos], lin.y[pos], res.certified_eps[pos].float()) > 0).all()


def test_a_radius_the_rigorous_bound_refutes_steps_down_one_tol_in_one_evaluation():
    """The confirming bound trails the steering one by half a tol of eps: where it fails at the
    search's end, one step of tol down proves, and closes the bracket at once (a difference
    of a hair above tol in floating point once cost one more evaluation per such sample)."""
    lin = Linear(n=60, seed=21, wrong=0)
    model32, x32 = lin.model.float(), lin.x.float()
    confirms: dict[bytes, list[float]] = {}

    def confirm(xs, ys, eps):
        for row, e in zip(xs, eps.tolist(), strict=True):
            confirms.setdefault(row.numpy().tobytes(), []).append(e)
        return lin.bound(xs, ys, eps + TOL / 2)

    res = search_radii(model32, x32, lin.y, lin.bound, confirm_fn=confirm, tol=TOL)
    ok = res.certified_eps > 0
    assert int(ok.sum()) >= 50
    # every radius is proven by the confirming bound, and within tol of a failure
    assert (lin.bound(x32[ok], lin.y[ok], res.certified_eps[ok] + TOL / 2) > 0).all()
    assert (res.search_upper[ok] - res.certified_eps[ok] <= TOL).all()
    tries = [confirms[row.numpy().tobytes()] for row in x32[ok]]
    stepped = [t for t in tries if len(t) > 1]
    assert stepped, "no radius was refuted: the test proves nothing"
    assert all(len(t) == 2 and t[0] - t[1] <= TOL for t in stepped), stepped


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), lag=st.floats(0.0, 3.0))
def test_every_radius_is_proven_by_the_confirming_bound_once(seed, lag):  # type: ignore[no-untyped-def]
    """Whether a proof came from a closing shot taken with the confirming bound during the search
    or from the confirmation after it, every reported radius is an eps where the confirming
    bound (here trailing the steering one by `lag` tol of eps) proved robustness; and no proof
    of the confirming bound is asked for twice at the same eps."""
    lin = Linear(n=30, seed=seed, wrong=3)
    lin.x = lin.x.float().double()  # the float32 points, so that exact() is their radius
    # the confirming bound's own exact radius (before .float() converts the model in place)
    exact = (lin.exact() - lag * TOL).clamp(min=0)
    model32, x32 = lin.model.float(), lin.x.float()
    proofs: dict[bytes, list[tuple[float, float]]] = {}

    def confirm(xs, ys, eps):
        assert eps.dtype == torch.float64
        m = lin.bound(xs, ys, eps + lag * TOL)
        for row, e, v in zip(xs, eps.tolist(), m.tolist(), strict=True):
            proofs.setdefault(row.numpy().tobytes(), []).append((e, v))
        return m

    res = search_radii(model32, x32, lin.y, lin.bound, confirm_fn=confirm, tol=TOL)
    ok = res.certified_eps > 0
    assert int(ok.sum()) >= 15
    for row, r in zip(x32[ok], res.certified_eps[ok].tolist(), strict=True):
        tried = proofs.get(row.numpy().tobytes(), [])
        assert any(e == r and v > 0 for e, v in tried), (r, tried)
        proven = [e for e, v in tried if v > 0]
        assert len(proven) == len(set(proven)), tried
    assert (res.search_upper[ok] - res.certified_eps[ok] <= TOL).all()
    # and the radius is within tol of the confirming bound's own exact radius
    assert (res.certified_eps[ok] >= exact[ok] - TOL - 1e-6).all()


# ---------------------------------------------------------------------------- attack and hint


def test_attack_eps_caps_the_bracket_and_is_checked():
    lin = Linear(n=40, seed=9)
    exact = lin.exact()
    attack = exact * 1.001 + 1e-9  # a genuine upper bound, just above the radius
    res = run(lin, attack_eps=attack)
    ok = lin.correct()
    assert (res.certified_eps <= res.attack_eps).all()
    assert (res.certified_eps[ok] >= exact[ok] - TOL - FP).all()
    assert (res.search_upper <= attack).all()
    assert torch.equal(res.attack_eps, attack)


def test_certified_above_attack_raises_soundness_error():
    lin = Linear(n=20, seed=10)
    lying = lin.exact() * 0.5  # "adversarial examples" inside the certified region
    with pytest.raises(SoundnessError, match="unsound"):
        run(lin, attack_eps=lying)
    with pytest.raises(SoundnessError, match="unsound"):
        run(lin, attack_eps=lying, search="bisection")


def test_verified_hint_above_the_attack_eps_raises():
    lin = Linear(n=10, seed=11, wrong=0)
    exact = lin.exact()
    with pytest.raises(SoundnessError):
        run(lin, attack_eps=exact * 0.5, lower_hint=exact * 0.9)


def test_lower_hint_is_used_only_when_verified():
    lin = Linear(n=40, seed=12)
    exact = lin.exact()
    ok = lin.correct()
    good = run(lin, lower_hint=exact * 0.999)
    assert (good.certified_eps[ok] >= exact[ok] * 0.999).all()
    assert (good.certified_eps[ok] >= exact[ok] - TOL - FP).all()
    bad = run(lin, lower_hint=exact * 3 + 0.01)  # not verifiable: ignored
    assert (bad.certified_eps[ok] < exact[ok] + FP).all()
    assert (bad.certified_eps[ok] >= exact[ok] - TOL - FP).all()


def test_guess_changes_the_cost_not_the_answer():
    lin = Linear(n=40, seed=13)
    exact = lin.exact()
    a = run(lin, guess=exact)
    b = run(lin, guess=torch.full_like(exact, math.nan))
    c = run(lin, guess=exact * 40)
    for r in (a, b, c):
        ok = lin.correct()
        assert (r.certified_eps[ok] >= exact[ok] - TOL - FP).all()
        assert (r.certified_eps < exact + 1e-15).all()


def test_radius_above_eps_max_is_eps_max_or_within_tol():
    lin = Linear(n=30, seed=14)
    exact = lin.exact()
    eps_max = float(exact[lin.correct()].median())
    res = run(lin, eps_max=eps_max)
    big = lin.correct() & (exact > eps_max)
    assert big.any()
    assert (res.certified_eps[big] >= eps_max - TOL).all()
    assert (res.certified_eps <= eps_max).all()
    assert (res.search_upper[big] == eps_max).all()


def test_max_iter_caps_the_work_and_stays_sound():
    lin = Linear(n=20, seed=15)
    res = run(lin, search="bisection", max_iter=3)
    assert res.evaluations.max() <= 3
    pos = res.certified_eps > 0
    assert (lin.bound(lin.x[pos], lin.y[pos], res.certified_eps[pos]) > 0).all()


# ------------------------------------------------------------------------- results and errors


def test_rows_round_trip_through_csv(tmp_path):
    lin = Linear(n=15, seed=16)
    attack = lin.exact() * 1.01
    attack[3] = math.inf
    res = run(lin, attack_eps=attack, index=torch.arange(100, 115))
    rows = res.rows()
    assert [r.index for r in rows] == list(range(100, 115))
    assert all(r.method == "exact" for r in rows)
    write_sample_csv(tmp_path / "per_sample.csv", rows)
    assert read_sample_csv(tmp_path / "per_sample.csv") == rows
    header = (tmp_path / "per_sample.csv").read_text().splitlines()[0]
    assert header == ",".join(SAMPLE_COLUMNS)
    assert "RadiusResult(exact, n=15" in repr(res)


def test_seconds_and_evaluations_are_per_sample():
    lin = Linear(n=25, seed=17)
    res = run(lin)
    assert res.seconds.shape == (25,) and (res.seconds >= 0).all()
    assert res.evaluations.dtype == torch.int64


@pytest.mark.parametrize("kwargs, error, match", [
    ({"tol": 0.0}, SpecError, "tol must be"),
    ({"tol": -1e-3}, SpecError, "tol must be"),
    ({"eps_max": -0.1}, SpecError, "eps_max must be"),
    ({"eps_max": math.inf}, SpecError, "eps_max must be"),
    ({"search": "brent"}, UnknownNameError, "search"),
    ({"attack_eps": torch.zeros(3)}, SpecError, "attack_eps must have one entry"),
    ({"lower_hint": -torch.ones(60)}, SpecError, "lower_hint must be >= 0"),
    ({"max_iter": 0}, SpecError, "max_iter"),
])
def test_bad_input(kwargs, error, match):
    lin = Linear()
    with pytest.raises(error, match=match):
        run(lin, **kwargs)


def test_bad_batches():
    lin = Linear(n=4)
    with pytest.raises(SpecError, match="image batch"):
        search_radii(lin.model, lin.x.flatten(1), lin.y, lin.bound)
    with pytest.raises(SpecError, match="labels"):
        search_radii(lin.model, lin.x, lin.y[:2], lin.bound)
    with pytest.raises(SpecError, match=r"labels must lie in \[0, 5\)"):
        search_radii(lin.model, lin.x, lin.y + 10, lin.bound)
    with pytest.raises(SpecError, match="unknown option 'steps' for method 'crown'"):
        certified_radii(lin.model, lin.x, lin.y, get_method("crown"), steps=3)


def test_model_mode_is_restored():
    lin = Linear(n=5)
    lin.model.train()
    run(lin)
    assert lin.model.training and lin.model[1].training


def test_linear_radius_is_exact_for_a_linear_model_with_two_classes():
    lin = Linear(n=30, k=2, seed=18, wrong=3)
    est = linear_radius(lin.model, lin.x, lin.y)
    ok = lin.correct()
    torch.testing.assert_close(est[ok], lin.exact()[ok], rtol=1e-9, atol=1e-12)
    assert (est[~ok] == 0).all()


def test_linear_radius_accounts_for_clipping():
    # one pixel, weight +1 on class 0: the margin falls as the pixel falls; it can fall by at
    # most x before the domain stops it
    lin = nn.Linear(1, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [-1.0]], dtype=torch.float64))
        lin.bias.copy_(torch.tensor([0.0, 0.1], dtype=torch.float64))
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.tensor([0.3, 0.04], dtype=torch.float64).view(2, 1, 1, 1)
    y = torch.zeros(2, dtype=torch.int64)
    est = linear_radius(model, x, y)
    # margin 2x - 0.1 reaches 0 at x = 0.05: eps 0.25 for the first; the second is misclassified
    torch.testing.assert_close(est, torch.tensor([0.25, 0.0], dtype=torch.float64))
    x2 = torch.tensor([0.3], dtype=torch.float64).view(1, 1, 1, 1)
    lin.bias.data[1] = -0.7  # margin 2x + 0.7 > 0 on all of [0, 1]: never reaches 0
    assert math.isinf(float(linear_radius(model, x2, y[:1])[0]))


# --------------------------------------------------------------------- with the bound engine


def _trained_digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A digits MLP trained for a few epochs with plain torch (float64), and 48 test points."""
    from certify.data import load_dataset
    from certify.nets import create_arch

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = create_arch("mlp-32-16", (1, 8, 8), 10, mean=[0.3052], std=[0.376]).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for xb, yb in train.batches(64, shuffle=True, generator=g):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb.double()), yb).backward()
            opt.step()
    x, y = test.take(slice(0, 48))
    return model.eval(), x.double(), y


@pytest.fixture(scope="module")
def digits_mlp():
    return _trained_digits_mlp()


def _random_net_batch(net: nn.Module, shape: tuple[int, ...], n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    net = net.double().eval()
    x = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:2] = (y[:2] + 1) % net(x[:1]).shape[1]  # two misclassified samples
    return net, x, y


def _engine_cases(tiny_mlp, tiny_cnn, digits_mlp):
    return {"tiny_mlp": lambda: _random_net_batch(tiny_mlp, (1, 4, 4), 24, 0),
            "tiny_cnn": lambda: _random_net_batch(tiny_cnn, (1, 8, 8), 16, 1),
            "digits": lambda: digits_mlp}


def _margin(model, x, y, eps, method):
    from certify.bounds import margin_bounds

    return margin_bounds(model, x, y, eps, method=method).lower.amin(dim=1)


@pytest.mark.parametrize("method", ["crown", "ibp"])
@pytest.mark.parametrize("case", ["tiny_mlp", "tiny_cnn", "digits"])
def test_engine_radius_reverifies_and_upper_end_fails(case, method, tiny_mlp, tiny_cnn,
                                                      digits_mlp):
    model, x, y = _engine_cases(tiny_mlp, tiny_cnn, digits_mlp)[case]()
    res = certified_radii(model, x, y, method, eps_max=0.5, tol=TOL)
    ok = res.pred == res.label
    assert (res.certified_eps[~ok] == 0).all()
    pos = res.certified_eps > 0
    if pos.any():
        assert (_margin(model, x[pos], y[pos], res.certified_eps[pos], method) > 0).all()
    ends = res.search_upper[ok]
    failed = _margin(model, x[ok], y[ok], ends, method) <= 0
    assert (failed | (ends == 0.5)).all()
    assert (ends - res.certified_eps[ok] <= TOL).all()


def test_engine_certified_never_exceeds_real_pgd(digits_mlp, tiny_cnn):
    from certify.attacks import minimal_adversarial

    for model, x, y in (digits_mlp, _random_net_batch(tiny_cnn, (1, 8, 8), 16, 2)):
        attack = minimal_adversarial(model, x, y, eps_max=0.5, tol=1e-3, steps=20,
                                     generator=torch.Generator().manual_seed(0))
        for method in ("crown", "ibp"):
            res = certified_radii(model, x, y, method, attack_eps=attack.eps, tol=TOL)
            assert (res.certified_eps <= attack.eps).all()
            assert torch.equal(res.attack_eps, attack.eps)


@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_engine_fast_equals_bisection_where_the_bound_is_monotone(method, digits_mlp):
    model, x, y = digits_mlp
    fast = certified_radii(model, x, y, method, search="fast", tol=TOL)
    bis = certified_radii(model, x, y, method, search="bisection", tol=TOL)
    ok = fast.pred == fast.label
    diff = (fast.certified_eps - bis.certified_eps).abs()
    for i in torch.nonzero(diff > TOL).flatten().tolist():
        # both are valid; they can only differ where the bound is provably not monotone:
        # one search failed at an eps below one where the other one succeeded
        lo_a, lo_b = fast.certified_eps[i], bis.certified_eps[i]
        hi_low = fast.search_upper[i] if lo_a < lo_b else bis.search_upper[i]
        assert hi_low < max(lo_a, lo_b), f"sample {i}: differ by {float(diff[i])} on a monotone run"
    if method == "ibp":  # interval arithmetic is monotone in eps: always equal within tol
        assert (diff <= TOL).all()
    evals_fast = fast.evaluations[ok].double().mean()
    evals_bis = bis.evaluations[ok].double().mean()
    assert evals_bis >= 12 and evals_fast <= 6 and evals_fast < evals_bis / 2


def test_engine_options_and_unknown_method(digits_mlp):
    model, x, y = digits_mlp
    with pytest.raises(UnknownNameError, match="alpha-crown"):
        certified_radii(model, x[:4], y[:4], "alpha_crown")
    res = certified_radii(model, x[:6], y[:6], "alpha-crown", steps=3, tol=1e-3)
    pos = res.certified_eps > 0
    assert (_margin(model, x[:6][pos], y[:6][pos], res.certified_eps[pos], "alpha-crown") > 0).all()
    # alpha-CROWN is at least as tight as CROWN pointwise: it proves CROWN's radii too
    crown = certified_radii(model, x[:6], y[:6], "crown", tol=1e-3)
    pos = crown.certified_eps > 0
    assert (_margin(model, x[:6][pos], y[:6][pos], crown.certified_eps[pos], "alpha-crown")
            > 0).all()


# ------------------------------------------------------------ methods that resume failures


class Budgeted:
    """A one-sample margin bound shaped like a budgeted complete method: the margin is
    ``m0 (1 - eps / exact)``, but a first evaluation above `reach` fails a little below 0 (its
    budget ran out), and an evaluation within `tol` below the last failure resumes that work
    and proves whatever is true."""

    def __init__(self, lin: Linear, exact: float, reach: float, tol: float) -> None:
        self.lin, self.exact, self.reach, self.tol = lin, exact, reach, tol
        self.m0 = float(lin.bound(lin.x, lin.y, torch.zeros(1)))
        self.last_failure = math.inf
        self.eps: list[float] = []
        self.values: list[float] = []

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = float(eps[0])
        self.eps.append(t)
        true = self.m0 * (1 - t / self.exact)
        resumed = self.last_failure - self.tol <= t < self.last_failure
        if not (t <= self.reach or (resumed and true > 0)):
            self.last_failure = t
            true = min(true, -0.01 * self.m0)
        self.values.append(true)
        return torch.tensor([true], dtype=torch.float64)


def test_a_failure_near_zero_is_resumed_just_below():
    """With ``resume_failures``, a near failure (budget spent) is followed by one shot at
    ``hi - tol``, which a budgeted method proves: the search ends there, in fewer evaluations
    than bisecting down to what one budget proves, and no lower; without it, plain
    bisection."""
    from certify.radius import RESUME_GAP

    lin = Linear(n=1, k=3, seed=4, wrong=0)
    exact = float(lin.exact()[0])
    results = {}
    for resume in (False, True):
        fn = Budgeted(lin, exact, reach=0.8 * exact, tol=TOL)
        res = search_radii(lin.model, lin.x, lin.y, fn, tol=TOL, search="bisection",
                           resume_failures=resume)
        r = float(res.certified_eps[0])
        assert 0 < r <= exact, (resume, r, exact)
        assert fn(lin.x, lin.y, res.certified_eps.clone())[0] > 0  # proven there
        results[resume] = (r, int(res.evaluations[0]), fn.eps[:-1], fn.values[:-1])
    (plain, n_plain, *_), (resumed, n_resumed, shots, values) = results[False], results[True]
    assert plain <= 0.8 * exact + TOL
    assert resumed >= plain and n_resumed < n_plain, results
    # every near failure that is not itself such a shot is followed by the shot just below it
    near = [k for k, (t, m) in enumerate(zip(shots, values, strict=True))
            if -RESUME_GAP * fn.m0 < m <= 0
            and not (k > 0 and shots[k - 1] - TOL <= t < shots[k - 1])]
    assert near and all(shots[k] - TOL <= shots[k + 1] < shots[k] for k in near), shots


@pytest.mark.parametrize("seed", range(4))
def test_resumed_failures_keep_the_exact_radius_and_skip_far_failures(seed):
    """On an exact margin bound, failures far below 0 (beyond ``RESUME_GAP`` of the clean
    margin) bisect at once; the radii are the exact ones within tol and never above."""
    from certify.radius import RESUME_GAP

    lin = Linear(n=8, k=4, seed=seed, wrong=1)
    seen: list[tuple[float, float]] = []

    def bound(xs: torch.Tensor, ys: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        m = lin.bound(xs, ys, eps)
        if len(ys) == 1:
            seen.append((float(eps[0]), float(m[0])))
        return m

    res = search_radii(lin.model, lin.x, lin.y, bound, tol=TOL, search="bisection",
                       resume_failures=True)
    exact, ok = lin.exact(), lin.correct()
    assert (res.certified_eps[ok] <= exact[ok] + FP).all()
    assert (res.certified_eps[ok] >= exact[ok] - TOL - FP).all()
    one = Linear(n=1, k=4, seed=seed, wrong=0)
    lin = one
    seen.clear()
    search_radii(one.model, one.x, one.y, bound, tol=TOL, search="bisection",
                 resume_failures=True)
    m0 = float(one.bound(one.x, one.y, torch.zeros(1)))
    for (t, m), (t_next, _) in zip(seen[:-1], seen[1:], strict=True):
        if m <= -RESUME_GAP * m0:  # a far failure: no shot just below it
            assert not (t - TOL <= t_next < t), seen


def test_bab_resumes_failures_and_crown_does_not():
    assert get_method("bab").resumes_failures
    assert not get_method("crown").resumes_failures
    assert not get_method("milp").resumes_failures
