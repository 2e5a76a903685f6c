"""LinfBall (the input region) and margin_spec (the margins f_y - f_j)."""

from __future__ import annotations

import pytest
import torch

from certify.errors import SpecError
from certify.spec import LinfBall, margin_spec


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
