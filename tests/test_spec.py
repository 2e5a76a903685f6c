"""LinfBall (the input region) and margin_spec (the margins f_y - f_j)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certify.errors import SpecError
from certify.spec import Box, LinfBall, margin_spec, round_to


def test_eps_is_broadcast_and_the_box_clipped():  # type: ignore[no-untyped-def]
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3).repeat(2, 1, 1, 1)
    ball = LinfBall(x, 0.2)
    assert ball.eps.shape == (2,) and ball.eps.dtype == x.dtype
    lo, hi = ball.box()
    torch.testing.assert_close(lo[0, 0, 0], torch.tensor([0.0, 0.3, 0.8]))
    torch.testing.assert_close(hi[0, 0, 0], torch.tensor([0.2, 0.7, 1.0]))
    per_sample = LinfBall(x, torch.tensor([0.0, 0.1]))
    lo, hi = per_sample.box()  # eps = 0: the point, widened by at most one ulp, inside [0, 1]
    assert (lo[0] <= x[0]).all() and (hi[0] >= x[0]).all()
    assert ((x[0] - lo[0]) <= 6e-8).all() and ((hi[0] - x[0]) <= 6e-8).all()
    assert lo.min() >= 0 and hi.max() <= 1
    assert "eps=[0, 0.1]" in repr(per_sample) and "eps=0.2" in repr(ball)


@pytest.mark.parametrize("eps", [0.01, 1 / 3, 0.003,
                                 torch.tensor([0.01, 0.2], dtype=torch.float64)])
def test_float32_box_contains_the_exact_ball(eps):  # type: ignore[no-untyped-def]
    """Rounding (of eps to float32, and of x ± eps) never shrinks the region."""
    x = torch.tensor([[0.0101, 0.5, 0.999, 0.0, 0.3, 0.2001]] * 2).view(2, 1, 1, 6)
    lo, hi = LinfBall(x, eps).box()
    exact = (eps if isinstance(eps, torch.Tensor) else torch.tensor([eps, eps])).view(2, 1, 1, 1)
    assert (lo.double() <= (x.double() - exact).clamp(0, 1)).all()
    assert (hi.double() >= (x.double() + exact).clamp(0, 1)).all()
    assert (LinfBall(x, eps).eps.double() >= exact.flatten()).all()


def test_samples_and_corners_lie_in_the_box():  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 4, generator=gen)
    ball = LinfBall(x, torch.tensor([0.0, 0.05, 0.5]))
    lo, hi = ball.box()
    points = ball.sample(50, generator=gen)
    assert points.shape == (50, 3, 2, 4, 4)
    assert ((points >= lo) & (points <= hi)).all()
    corners = ball.sample(20, generator=gen, corners=True)
    assert ((corners == lo) | (corners == hi)).all()
    assert (corners[:, 2] == lo[2]).any() and (corners[:, 2] == hi[2]).any()
    again = ball.sample(50, generator=torch.Generator().manual_seed(0).manual_seed(0))
    assert again.shape == points.shape


def test_ball_validation():  # type: ignore[no-untyped-def]
    x = torch.rand(2, 1, 3, 3)
    with pytest.raises(SpecError, match="eps must be >= 0"):
        LinfBall(x, -0.1)
    with pytest.raises(SpecError, match=r"shape \(2,\)"):
        LinfBall(x, torch.tensor([0.1, 0.1, 0.1]))
    with pytest.raises(SpecError, match=r"center must lie in the domain \[0.0, 1.0\]"):
        LinfBall(x + 1.0, 0.1)
    with pytest.raises(SpecError, match=r"\(N, C, H, W\)"):
        LinfBall(x[0], 0.1)
    with pytest.raises(SpecError, match="low < high"):
        LinfBall(x, 0.1, domain=(1.0, 0.0))
    with pytest.raises(SpecError, match=">= 0"):
        LinfBall(x, 0.1).sample(-1)


def test_margin_spec_rows():  # type: ignore[no-untyped-def]
    spec = margin_spec(torch.tensor([0, 2, 3]), 4)
    assert spec.shape == (3, 3, 4)
    logits = torch.tensor([[5.0, 1.0, 2.0, 3.0]] * 3)
    margins = torch.einsum("nsk,nk->ns", spec, logits)
    torch.testing.assert_close(margins[0], torch.tensor([4.0, 3.0, 2.0]))  # f_0 - f_{1,2,3}
    torch.testing.assert_close(margins[1], torch.tensor([-3.0, 1.0, -1.0]))  # f_2 - f_{0,1,3}
    torch.testing.assert_close(margins[2], torch.tensor([-2.0, 2.0, 1.0]))  # f_3 - f_{0,1,2}
    assert (spec.sum(2) == 0).all()
    assert margin_spec(torch.zeros(0, dtype=torch.long), 3).shape == (0, 2, 3)


@pytest.mark.parametrize("labels, k, match", [
    (torch.tensor([0, 4]), 4, r"labels must lie in \[0, 4\), got values in \[0, 4\]"),
    (torch.tensor([-1]), 4, r"labels must lie in \[0, 4\)"),
    (torch.tensor([0.0]), 4, "integer tensor"),
    (torch.tensor([[0]]), 4, r"shape \(N,\)"),
    (torch.tensor([0]), 1, "num_classes must be >= 2"),
])
def test_margin_spec_validation(labels, k, match):  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=match):
        margin_spec(labels, k)


# ---------------------------------------------------------- outward box, inward box (hypothesis)

_EDGES = [0.0, 1.0, 0.5, 1 / 3, 0.1, 0.0101, 1e-8, 0.2001, 0.999]


def _near(values: list[float], dtype: torch.dtype) -> list[float]:
    """The values as `dtype` floats and their neighbours (the rounding edges)."""
    t = torch.tensor(values, dtype=dtype)
    out = torch.cat([t, torch.nextafter(t, torch.ones_like(t) * 2),
                     torch.nextafter(t, -torch.ones_like(t))]).clamp(0, 1)
    return sorted(set(out.tolist()))


@st.composite
def balls(draw):  # type: ignore[no-untyped-def]
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    pool = _near(_EDGES, dtype)
    n, d = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    centre = st.one_of(st.sampled_from(pool), st.floats(0.0, 1.0, width=32))
    x = torch.tensor(draw(st.lists(centre, min_size=n * d, max_size=n * d)),
                     dtype=dtype).view(n, 1, 1, d)
    radius = st.one_of(st.sampled_from([0.0, 0.1, 1 / 3, 0.01, 0.003, 1e-7, 0.5, 2.0]),
                       st.floats(0.0, 1.5))
    eps = draw(st.lists(radius, min_size=n, max_size=n))
    given_as = draw(st.sampled_from(["float64", "dtype"]))
    eps_t = torch.tensor(eps, dtype=torch.float64 if given_as == "float64" else dtype)
    return x, eps_t


def _exact(t: torch.Tensor) -> list[Fraction]:
    return [Fraction(v) for v in t.double().flatten().tolist()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=balls())
def test_box_outward_and_inner_box_inward_in_exact_arithmetic(case):  # type: ignore[no-untyped-def]
    """box() holds the exact clipped ball; every point of inner_box() lies in it exactly."""
    x, eps = case
    ball = LinfBall(x, eps)
    lo, hi = ball.box()
    ilo, ihi = ball.inner_box()
    d = x[0].numel()
    e_req = [Fraction(v) for v in eps.tolist()]
    for i, (xv, lov, hiv, ilov, ihiv) in enumerate(zip(
            _exact(x), _exact(lo), _exact(hi), _exact(ilo), _exact(ihi), strict=True)):
        e = e_req[i // d]
        assert lov <= max(xv - e, Fraction(0)) and hiv >= min(xv + e, Fraction(1))
        assert xv - e <= ilov <= xv <= ihiv <= xv + e
        assert Fraction(0) <= ilov and ihiv <= Fraction(1)
    assert all(Fraction(v) >= e for v, e in zip(ball.eps.tolist(), e_req, strict=True))
    assert all(Fraction(v) <= e for v, e in zip(ball.eps_inner.tolist(), e_req, strict=True))
    assert ball.contains(ilo).all() and ball.contains(ihi).all()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=balls(), seed=st.integers(0, 2**16))
def test_project_lands_inside_and_contains_is_exact(case, seed):  # type: ignore[no-untyped-def]
    x, eps = case
    ball = LinfBall(x, eps)
    g = torch.Generator().manual_seed(seed)
    wild = x + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 4 - 2)
    assert ball.contains(ball.project(wild)).all()
    # contains() against exact arithmetic, on points one float beyond the box's ends too
    lo, hi = ball.inner_box()
    beyond = torch.where(torch.rand(x.shape, generator=g) < 0.5,
                         torch.nextafter(lo, torch.full_like(lo, -1.0)),
                         torch.nextafter(hi, torch.full_like(hi, 2.0)))
    for points in (beyond, ball.box()[0], ball.box()[1]):
        d = x[0].numel()
        got = ball.contains(points).tolist()
        for i in range(x.shape[0]):
            e = Fraction(float(ball.eps_inner[i]))
            ps, xs = _exact(points[i]), _exact(x[i])
            want = all(abs(p - c) <= e and 0 <= p <= 1 for p, c in zip(ps, xs, strict=True))
            assert got[i] == want, (i, d)


def test_float32_eps_rounding_edges():  # type: ignore[no-untyped-def]
    """0.1 is not a float32: proofs widen it, attacks narrow it."""
    x = torch.full((1, 1, 1, 2), 0.5)
    ball = LinfBall(x, 0.1)
    assert Fraction(float(ball.eps)) > Fraction(0.1) > Fraction(float(ball.eps_inner))
    exact = LinfBall(x, torch.tensor([0.25]))  # representable: both the same
    assert torch.equal(exact.eps, exact.eps_inner)
    up = round_to(torch.tensor([0.1, -0.1], dtype=torch.float64), torch.float32, up=True)
    down = round_to(torch.tensor([0.1, -0.1], dtype=torch.float64), torch.float32, up=False)
    assert all(Fraction(u) >= Fraction(v) >= Fraction(w) for u, v, w in
               zip(up.tolist(), [0.1, -0.1], down.tolist(), strict=True))


def test_inner_box_domain_is_rounded_inward():  # type: ignore[no-untyped-def]
    x = torch.full((1, 1, 1, 3), 0.5)
    ball = LinfBall(x, 1.0, domain=(0.1, 0.9))
    lo, hi = ball.inner_box()
    assert Fraction(float(lo.min())) >= Fraction(0.1) and Fraction(float(hi.max())) <= Fraction(0.9)
    assert ball.contains(lo).all() and ball.contains(hi).all()


def test_box_region():  # type: ignore[no-untyped-def]
    lower = torch.tensor([[0.0, 0.2]])
    upper = torch.tensor([[0.5, 0.2]])
    box = Box(lower, upper)
    assert box.contains(box.center).all() and torch.equal(box.radius, torch.tensor([[0.25, 0.0]]))
    assert box.contains(box.project(torch.tensor([[3.0, -1.0]]))).all()
    assert not box.contains(torch.tensor([[0.5, 0.3]])).any()
    with pytest.raises(SpecError, match="lower <= upper"):
        Box(upper, lower - 1)
