"""Attacks: every reported success is a real adversarial example, and PGD finds them."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import certify.attacks as attacks
from certify.attacks import (
    accuracy_under_attack,
    fgsm,
    min_adversarial_eps,
    minimal_adversarial,
    pgd,
)
from certify.errors import SpecError, UnknownNameError
from certify.nets import create_arch
from certify.spec import LinfBall


def independent_check(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                      eps: torch.Tensor) -> torch.Tensor:
    """Written separately from the library: in the exact ball, in [0, 1], not strictly y."""
    with torch.no_grad():
        logits = model(x_adv).double()
    others = logits.clone()
    others[torch.arange(len(y)), y] = -math.inf
    not_strict = logits[torch.arange(len(y)), y] <= others.amax(dim=1)
    dist = (x_adv.double() - x.double()).abs().flatten(1).amax(dim=1)
    return (not_strict & (dist <= eps.double()) & (x_adv >= 0).flatten(1).all(1)
            & (x_adv <= 1).flatten(1).all(1))


def linear_model(d: int = 16, k: int = 4, seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, k).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64) * 0.1)
    return nn.Sequential(nn.Flatten(), lin).eval()


def exact_linear_radius(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact L-inf distance to the decision boundary of a linear classifier (unclipped)."""
    lin = model[1]
    w = lin.weight.double()
    z = model(x).double()
    out = []
    for i in range(len(y)):
        diff = (w[y[i]] - w).abs().sum(dim=1)
        r = (z[i, y[i]] - z[i]) / diff
        r[y[i]] = math.inf
        out.append(r.min().clamp(min=0))
    return torch.stack(out)


# ------------------------------------------------------------------------- re-check is enforced


def test_recheck_rejects_points_outside_the_ball(tiny_mlp, monkeypatch):
    """With projection broken, PGD wanders out of the ball; none of that may count."""
    torch.manual_seed(1)
    x = torch.rand(32, 1, 4, 4)
    y = tiny_mlp(x).argmax(1)
    monkeypatch.setattr(attacks, "_project", lambda x_adv, lower, upper: x_adv)
    eps = torch.full((32,), 0.01)
    res = pgd(tiny_mlp, (x, eps), y, steps=20, step_size=5.0)
    moved = (res.x_adv - x).abs().flatten(1).amax(1) > eps
    assert moved.any(), "the broken projection should have produced points outside the ball"
    assert not res.success[moved].any()
    assert torch.equal(res.success, independent_check(tiny_mlp, x, res.x_adv, y, eps))


def test_recheck_rejects_claims_of_the_search(tiny_mlp, monkeypatch):
    """A search that claims success for correctly classified points gets no success."""
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = tiny_mlp(x).argmax(1)

    def lying_run(model, start, lower, upper, steps, run):
        n = start.shape[0]
        return start.clone(), torch.full((n,), 1.0), torch.ones(n, dtype=torch.bool)

    monkeypatch.setattr(attacks, "_pgd_run", lying_run)
    res = pgd(tiny_mlp, (x, 0.3), y, random_start=False)  # the run returns its start
    assert not res.success.any()
    assert (res.margin > 0).all()


def test_recheck_rejects_points_outside_the_domain(tiny_mlp, monkeypatch):
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = tiny_mlp(x).argmax(1)

    def escaping_run(model, start, lower, upper, steps, run):
        n = start.shape[0]  # far outside [0, 1]
        return start + 5.0, torch.full((n,), 1.0), torch.ones(n, dtype=torch.bool)

    monkeypatch.setattr(attacks, "_pgd_run", escaping_run)
    res = pgd(tiny_mlp, (x, 10.0), y)  # the ball is huge; the domain still binds
    assert not res.success.any()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), width=st.integers(2, 12), n=st.integers(1, 12),
       eps_scale=st.floats(0.0, 0.6), loss=st.sampled_from(["margin", "ce"]),
       restarts=st.integers(1, 2))
def test_pgd_success_is_always_a_real_adversarial(seed, width, n, eps_scale, loss, restarts):
    torch.manual_seed(seed)
    model = create_arch(f"mlp-{width}-{width}", (1, 3, 3), 3, mean=[0.5], std=[0.25]).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 3, 3, generator=g)
    x[0, 0, 0] = 0.0  # pixels on the domain boundary
    y = torch.randint(0, 3, (n,), generator=g)
    eps = torch.rand(n, generator=g) * eps_scale
    res = pgd(model, (x, eps), y, steps=8, restarts=restarts, loss=loss, generator=g)
    assert torch.equal(res.success, independent_check(model, x, res.x_adv, y, eps))
    dist = (res.x_adv.double() - x.double()).abs().flatten(1).amax(1)
    assert (dist[res.success] <= eps.double()[res.success]).all()
    # misclassified inputs are adversarial at any eps (the clean point itself)
    clean_wrong = independent_check(model, x, x, y, torch.zeros(n))
    assert res.success[clean_wrong].all()


def test_projection_box_lies_inside_the_exact_ball():
    """x +- eps rounded to float32 may leave the real ball; the box must not."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 5, 5, generator=g)
    eps = torch.rand(64, generator=g) * 0.3
    lower, upper = LinfBall(x, eps).inner_box()
    e = eps.double().view(-1, 1, 1, 1)
    assert ((x.double() - lower.double()) <= e).all()
    assert ((upper.double() - x.double()) <= e).all()
    assert (lower >= 0).all() and (upper <= 1).all() and (lower <= upper).all()


# ----------------------------------------------------------------------- PGD finds adversarials


def test_pgd_breaks_a_linear_model_just_above_its_exact_radius():
    model = linear_model()
    g = torch.Generator().manual_seed(0)
    x = (0.4 + 0.2 * torch.rand(40, 1, 4, 4, generator=g, dtype=torch.float64))
    y = model(x).argmax(1)
    r = exact_linear_radius(model, x, y)
    # unclipped regime: the whole ball at 1.01 r stays inside [0, 1]
    assert (r * 1.01 < 0.4).all()
    above = pgd(model, (x, r * 1.01), y, steps=20, generator=g)
    assert above.success.all()
    below = pgd(model, (x, r * 0.99), y, steps=20, generator=g)
    assert not below.success.any()  # impossible: nothing is adversarial inside the radius


def test_min_adversarial_eps_brackets_the_exact_linear_radius():
    model = linear_model(seed=1)
    g = torch.Generator().manual_seed(1)
    x = (0.4 + 0.2 * torch.rand(30, 1, 4, 4, generator=g, dtype=torch.float64))
    y = model(x).argmax(1)
    r = exact_linear_radius(model, x, y)
    tol = 1e-4
    found = minimal_adversarial(model, x, y, eps_max=0.5, tol=tol, steps=20,
                                generator=torch.Generator().manual_seed(1))
    assert found.found.all()
    assert (found.eps >= r - 1e-12).all(), "an attack eps below the exact radius is impossible"
    assert (found.eps <= r * 1.02 + tol).all()
    assert torch.equal(found.eps, min_adversarial_eps(
        model, x, y, eps_max=0.5, tol=tol, steps=20, generator=torch.Generator().manual_seed(1)))
    # the example is there and re-checks at the reported eps
    assert independent_check(model, x, found.x_adv, y, found.eps).all()


def test_min_adversarial_eps_misclassified_zero_and_unbreakable_inf(tiny_mlp):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(12, 1, 4, 4, generator=g)
    pred = tiny_mlp(x).argmax(1)
    y = pred.clone()
    y[:4] = (pred[:4] + 1) % 3  # these four are misclassified
    res = minimal_adversarial(tiny_mlp, x, y, eps_max=1e-3, tol=1e-4, steps=5, generator=g)
    assert (res.eps[:4] == 0).all() and res.found[:4].all()
    assert torch.equal(res.x_adv[:4], x[:4])
    # where nothing was found the eps is inf, and the flag says so
    assert torch.equal(torch.isinf(res.eps), ~res.found)
    assert (res.evaluations[:4] == 0).all()
    idx = res.found.nonzero().flatten()
    assert independent_check(tiny_mlp, x[idx], res.x_adv[idx], y[idx], res.eps[idx]).all()


def test_min_adversarial_eps_float32_reports_representable_eps(tiny_cnn):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 1, 8, 8, generator=g)
    y = tiny_cnn(x).argmax(1)
    res = minimal_adversarial(tiny_cnn, x, y, eps_max=0.5, tol=1e-3, steps=5, generator=g)
    assert res.found.any()
    finite = res.found
    assert torch.equal(res.eps[finite].float().double(), res.eps[finite])
    assert independent_check(tiny_cnn, x[finite], res.x_adv[finite], y[finite],
                             res.eps[finite]).all()


# ----------------------------------------------------------------------------- other behaviour


def test_zero_eps_never_breaks_a_correct_sample(tiny_cnn):
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = tiny_cnn(x).argmax(1)
    eps = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0, 0.5, 0.0, 0.5])
    res = pgd(tiny_cnn, (x, eps), y, steps=10)
    assert not res.success[eps == 0].any()
    assert torch.equal(res.x_adv[eps == 0], x[eps == 0])


def test_fgsm_is_checked_too(tiny_cnn):
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = tiny_cnn(x).argmax(1)
    eps = torch.full((20,), 0.3)
    res = fgsm(tiny_cnn, (x, eps), y)
    assert torch.equal(res.success, independent_check(tiny_cnn, x, res.x_adv, y, eps))


def test_accepts_a_linf_ball(tiny_cnn):
    from certify import spec

    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = tiny_cnn(x).argmax(1)
    a = pgd(tiny_cnn, spec.LinfBall(x, 0.2), y, generator=torch.Generator().manual_seed(0))
    b = pgd(tiny_cnn, (x, 0.2), y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)


def test_same_generator_seed_same_result(tiny_cnn):
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = tiny_cnn(x).argmax(1)
    runs = [pgd(tiny_cnn, (x, 0.1), y, steps=5, restarts=2,
                generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)


def test_model_mode_is_restored_and_attack_runs_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.9), nn.ReLU(),
                          nn.Linear(8, 3))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    x = torch.rand(8, 1, 4, 4)
    y = torch.zeros(8, dtype=torch.int64)
    a = pgd(model, (x, 0.1), y, steps=3, random_start=False)
    b = pgd(model, (x, 0.1), y, steps=3, random_start=False)
    assert torch.equal(a.x_adv, b.x_adv)  # dropout off during the attack: deterministic
    assert model.training and model[1].training and not model[2].training


def test_accuracy_under_attack_is_monotone_and_starts_at_clean(tiny_cnn):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(30, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (30,), generator=g)
    y[:20] = tiny_cnn(x[:20]).argmax(1)
    curve = accuracy_under_attack(tiny_cnn, x, y, [0.2, 0.0, 0.05, 0.1], steps=10,
                                  batch_size=7, generator=g)
    assert curve.eps.tolist() == [0.0, 0.05, 0.1, 0.2]
    assert (curve.accuracy[1:] <= curve.accuracy[:-1]).all()
    with torch.no_grad():
        clean = (tiny_cnn(x).argmax(1) == y).double().mean()
    assert curve.accuracy[0] == pytest.approx(float(clean))
    assert curve.robust.shape == (4, 30)


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": -0.1}, "eps must be finite and >= 0"),
    ({"eps": torch.zeros(3)}, "shape"),
    ({"steps": 0}, "steps and restarts"),
    ({"step_size": -1.0}, "step_size"),
])
def test_bad_input_is_a_clear_error(tiny_cnn, kwargs, match):
    x = torch.rand(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.int64)
    eps = kwargs.pop("eps", 0.1)
    with pytest.raises(SpecError, match=match):
        pgd(tiny_cnn, (x, eps), y, **kwargs)


def test_bad_labels_and_names(tiny_cnn):
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(SpecError, match="labels must lie in"):
        pgd(tiny_cnn, (x, 0.1), torch.full((4,), 10))
    with pytest.raises(UnknownNameError, match="did you mean 'margin'"):
        pgd(tiny_cnn, (x, 0.1), torch.zeros(4, dtype=torch.int64), loss="margn")  # type: ignore[arg-type]
    with pytest.raises(UnknownNameError, match="attack"):
        accuracy_under_attack(tiny_cnn, x, torch.zeros(4, dtype=torch.int64), [0.1], "cw")
    with pytest.raises(SpecError, match="tol"):
        minimal_adversarial(tiny_cnn, x, torch.zeros(4, dtype=torch.int64), tol=0.0)
    with pytest.raises(SpecError, match="eps_max"):
        minimal_adversarial(tiny_cnn, x, torch.zeros(4, dtype=torch.int64), eps_max=-1.0)


# ------------------------------------------------------------- one PGD, any success criterion


def test_pgd_with_a_custom_criterion_finds_targeted_examples(tiny_cnn):
    """Success = the model predicts a chosen target; every success re-checks independently."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(16, 1, 8, 8, generator=g)
    y = tiny_cnn(x).argmax(1)
    target = (y + 1) % 10

    def hits_target(logits):
        return logits.argmax(1) == target

    def towards_target(logits):
        others = logits.scatter(1, target[:, None], float("-inf"))
        return logits.gather(1, target[:, None]).squeeze(1) - others.amax(1)

    region = LinfBall(x, 0.4)
    res = pgd(tiny_cnn, region, success=hits_target, loss=towards_target, steps=30,
              generator=torch.Generator().manual_seed(0))
    assert res.success.any()
    with torch.no_grad():
        pred = tiny_cnn(res.x_adv).argmax(1)
    dist = (res.x_adv.double() - x.double()).abs().flatten(1).amax(1)
    assert torch.equal(res.success, (pred == target) & (dist <= 0.4)
                       & (res.x_adv >= 0).flatten(1).all(1) & (res.x_adv <= 1).flatten(1).all(1))
    # with labels, the default loss ascends the margin but success is still the criterion
    again = pgd(tiny_cnn, region, y, success=hits_target, steps=30,
                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tiny_cnn(again.x_adv[again.success]).argmax(1) == target[again.success]).all()


def test_pgd_custom_criterion_is_rechecked(tiny_cnn):
    """A criterion that never holds gives no success, whatever the search does."""
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    y = tiny_cnn(x).argmax(1)
    res = pgd(tiny_cnn, LinfBall(x, 0.5), y, success=lambda logits: logits[:, 0] > 1e9)
    assert not res.success.any()
    with pytest.raises(SpecError, match="labels"):
        pgd(tiny_cnn, LinfBall(x, 0.1), success=lambda logits: logits[:, 0] > 0)


def test_pgd_in_a_box_with_explicit_starts_and_patience():
    """A Box region (a VNNLIB input box): success is the criterion, points stay in the box."""
    from certify.spec import Box

    model = nn.Sequential(nn.Linear(2, 1)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        model[0].bias.zero_()
    lower = torch.tensor([[0.0, 0.0], [0.2, 0.3]], dtype=torch.float64)
    upper = torch.tensor([[0.5, 0.5], [0.4, 0.5]], dtype=torch.float64)
    box = Box(lower, upper)
    res = pgd(model, box, success=lambda out: out[:, 0] >= 0.45, loss=lambda out: out[:, 0],
              steps=20, start=box.center, patience=3)
    # y = x0 - x1 reaches 0.5 in the first box, at most 0.1 in the second
    assert res.success.tolist() == [True, False]
    assert box.contains(res.x_adv).all()
    with torch.no_grad():
        assert float(model(res.x_adv[:1])) >= 0.45


def test_public_recheck_rejects_points_outside_the_region(tiny_cnn):
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(13))
    y = (tiny_cnn(x).argmax(1) + 1) % 10  # misclassified at the clean point
    ball = LinfBall(x, 0.1)
    ok, logits = attacks.recheck(tiny_cnn, ball, x, y)
    assert ok.all() and logits.shape == (4, 10)
    outside = x.clone()
    outside[:, 0, 0, 0] += 0.2  # beyond the ball (or above 1, beyond the domain)
    ok, _ = attacks.recheck(tiny_cnn, ball, outside, success=lambda logits: torch.ones(
        4, dtype=torch.bool))
    assert not ok.any()


def test_verify_attacks_with_the_one_pgd(monkeypatch):
    """certify.verify's counterexample search is attacks.pgd with the property as criterion."""
    from certify import verify as verify_module
    from certify.spec import Box
    from certify.vnnlib import parse_vnnlib

    calls = []
    real = attacks.pgd

    def spy(model, region, labels=None, **kwargs):
        calls.append((region, labels, kwargs))
        return real(model, region, labels, **kwargs)

    monkeypatch.setattr(attacks, "pgd", spy)
    model = nn.Sequential(nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[0].bias.zero_()
    text = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n"
            "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
            "(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n"
            "(assert (>= X_1 0.0))\n(assert (<= X_1 1.0))\n"
            "(assert (>= Y_1 Y_0))\n")  # unsafe: y1 >= y0, e.g. x = (0, 1)
    verdict = verify_module.verify(model, parse_vnnlib(text), timeout=10)
    assert verdict.result == "sat" and verdict.method == "attack"
    assert calls, "verify did not call attacks.pgd"
    region, labels, kwargs = calls[0]
    assert isinstance(region, Box) and labels is None
    assert callable(kwargs["success"]) and callable(kwargs["loss"])
    x, yv = verdict.counterexample  # type: ignore[misc]
    assert float(yv[1]) >= float(yv[0])
