"""Robust training (Wong-Kolter, CROWN-IBP, IBP, PGD) and robust re-training on digits.

The models are trained once per module: a normally trained ``mlp-64-64``, the same network
trained with the Wong-Kolter robust loss at eps = 0.1, and the normal one robustly re-trained for
three epochs. The acceptance tests compare them (certified accuracy at 0.1 and certification
area); they assert comparisons, never stored numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from certify.bounds import margin_bounds
from certify.checkpoint import checkpoint_sha256, load_checkpoint
from certify.data import load_dataset
from certify.errors import CheckpointError, DatasetError, SpecError, UnknownNameError
from certify.nets import create_arch
from certify.spec import margin_spec
from certify.train.loops import Step, TrainConfig, partial_path
from certify.train.robust import (
    BOUND_METHODS,
    ROBUST_METHODS,
    RobustConfig,
    RobustLoss,
    bound_loss,
    evaluate_robust,
    plan_bound_batch,
    retrain_checkpoint,
    robust_cross_entropy,
    robust_fit,
    train_robust,
    worst_case_logits,
)
from certify.train.schedules import EpsSchedule
from certify.train.standard import train_standard
from tests.train.conftest import one_thread

EPS = 0.1
ARCH = "mlp-64-64"


def _step(epoch: int, index: int, batches: int = 4, epochs: int = 10) -> Step:
    return Step(epoch, index, batches, epochs, torch.arange(4))


def _tiny(seed: int = 0, *, batch_norm: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    if batch_norm:
        return create_arch("svhn-teacher", (1, 8, 8), 10, mean=[0.3], std=[0.4],
                           channels=[3, 4, 4, 4], hidden=[8])
    return create_arch("scn-3-4", (1, 8, 8), 10, mean=[0.3], std=[0.4], hidden=[12])


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------- the robust loss


def test_worst_case_logits_put_minus_j_at_the_other_classes() -> None:
    g = torch.Generator().manual_seed(1)
    lower = torch.randn(5, 9, generator=g)
    y = torch.tensor([0, 3, 9, 5, 3])
    z = worst_case_logits(lower, y)
    spec = margin_spec(y, 10)                       # row j: e_y - e_{other_j}, the engine's order
    others = (spec == -1).float().argmax(2)         # (N, K-1) class of each margin column
    for i in range(5):
        assert z[i, y[i]] == 0
        for col in range(9):
            assert z[i, others[i, col]] == -lower[i, col]
    expected = torch.log1p(torch.exp(-lower).sum(1))
    assert torch.allclose(robust_cross_entropy(lower, y, reduction="none"), expected, atol=1e-6)


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_robust_cross_entropy_bounds_the_loss_in_the_ball(method: str) -> None:
    model = _tiny().eval()
    x, y = _batch()
    lower = margin_bounds(model, x, y, 0.05, method).lower
    bound = robust_cross_entropy(lower, y, reduction="none").detach()
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        xs = (x + 0.05 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
        with torch.no_grad():
            ce = F.cross_entropy(model(xs), y, reduction="none")
        assert (ce <= bound + 1e-5).all()


@pytest.mark.parametrize("method", ROBUST_METHODS)
@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_every_robust_loss_has_finite_nonzero_gradients(method: str, kappa: float) -> None:
    model = _tiny()
    x, y = _batch(8)
    loss_fn = RobustLoss(RobustConfig(method, EpsSchedule(EPS), kappa=kappa, pgd_steps=3))
    loss, logits = loss_fn(model, x, y, 0, _step(0, 0))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert logits.shape == (8, 10) and torch.isfinite(loss)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) > 0


def test_loss_follows_the_eps_and_kappa_schedules() -> None:
    model = _tiny().eval()
    x, y = _batch(8)
    config = RobustConfig("crown-ibp", EpsSchedule(0.2, start=0.0, ramp_epochs=4),
                          kappa=0.25, kappa_start=1.0)
    loss_fn = RobustLoss(config)
    clean = F.cross_entropy(model(x), y)
    # epoch 0, first step: eps 0 and kappa 1 -> the clean loss
    assert torch.allclose(loss_fn(model, x, y, 0, _step(0, 0))[0], clean)
    # half-way through the ramp: eps 0.1, kappa 0.625
    mid = loss_fn(model, x, y, 2, _step(2, 0))[0]
    expected = 0.625 * clean + 0.375 * bound_loss(model, x, y, 0.1, "crown-ibp")
    assert torch.allclose(mid, expected, atol=1e-6)
    # after the ramp: eps 0.2, kappa 0.25
    late = loss_fn(model, x, y, 7, _step(7, 1))[0]
    expected = 0.25 * clean + 0.75 * bound_loss(model, x, y, 0.2, "crown-ibp")
    assert torch.allclose(late, expected, atol=1e-6)


def test_eps_schedule_values_are_what_the_options_say() -> None:
    from certify.cli.train import make_robust_config

    common = dict(robust="wong-kolter", kappa=0.0, kappa_start=1.0, pgd_steps=10,
                  bound_batch_size=None, bound_memory_mb=2048.0, eval_samples=0,
                  certify_method=None)
    c = make_robust_config(epochs=10, eps=0.1, eps_start=0.02, eps_ramp_epochs=4,
                           eps_warmup_epochs=1, **common)  # type: ignore[arg-type]
    assert (c.eps.final, c.eps.start, c.eps.ramp_epochs, c.eps.warmup_epochs) == (0.1, 0.02, 4, 1)
    for done, want in [(0, 0.02), (1, 0.02), (2, 0.04), (3, 0.06), (4, 0.08), (5, 0.1),
                       (9.5, 0.1)]:
        assert c.eps.value(done) == pytest.approx(want, abs=1e-12)
    assert c.eps.at(_step(3, 2, batches=4)) == pytest.approx(0.02 + 0.08 * 2.5 / 4)
    assert [c.kappa_at(t) for t in (0, 1, 3, 5, 8)] == pytest.approx([1, 1, 0.5, 0, 0])
    default = make_robust_config(epochs=6, eps=0.1, eps_start=0.0, eps_ramp_epochs=None,
                                 eps_warmup_epochs=0, **common)  # type: ignore[arg-type]
    assert default.eps.ramp_epochs == 3 and default.eps.value(1.5) == pytest.approx(0.05)
    assert default.eps.value(3) == 0.1


def test_checkpointed_micro_batches_give_the_same_gradient() -> None:
    x, y = _batch(7)
    grads = []
    for size in (None, 3):
        model = _tiny()
        loss = bound_loss(model, x, y, 0.05, "wong-kolter", bound_batch_size=size)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2, strict=True))


def test_planned_micro_batches_follow_the_memory_budget() -> None:
    model = _tiny()
    x, y = _batch(9)
    plans = [plan_bound_batch(model, x, y, 0.05, "wong-kolter", memory_mb=mb)
             for mb in (1e-6, 0.05, 0.2, 1e4)]
    assert plans[0] == 1 and plans[-1] == 9
    assert plans == sorted(plans)
    assert plans == [plan_bound_batch(model, x, y, 0.05, "wong-kolter", memory_mb=mb)
                     for mb in (1e-6, 0.05, 0.2, 1e4)]          # a function of weights and data
    grads = []
    for mb in (1e-6, 1e4):           # one sample per micro-batch, or the whole batch at once
        m = _tiny()
        config = RobustConfig("wong-kolter", EpsSchedule(0.05), bound_memory_mb=mb)
        loss, _ = RobustLoss(config)(m, x, y, 0, _step(1, 0))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2, strict=True))


def test_batch_norm_model_trains_its_eval_function_and_keeps_its_statistics() -> None:
    model = _tiny(batch_norm=True)
    with torch.no_grad():
        model.bn1.running_mean.fill_(0.3)
        model.bn1.running_var.fill_(2.0)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    x, y = _batch(8)
    loss, _ = RobustLoss(RobustConfig("wong-kolter", EpsSchedule(0.05)))(model, x, y, 0,
                                                                         _step(1, 0))
    loss.backward()
    assert model.training and model.bn1.training                       # modes restored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.bn1.weight.grad is not None and torch.isfinite(model.bn1.weight.grad).all()
    expected = bound_loss(model.eval(), x, y, 0.05, "wong-kolter")      # the eval-mode function
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"method": "wong_kolter"}, UnknownNameError, "did you mean 'wong-kolter'"),
    ({"method": "crown"}, UnknownNameError, "robust training method"),
    ({"kappa": 1.5}, SpecError, "kappa .* in \\[0, 1\\]"),
    ({"kappa_start": -0.1}, SpecError, "kappa_start"),
    ({"pgd_steps": 0}, SpecError, "pgd_steps=0"),
    ({"bound_batch_size": 0}, SpecError, "bound_batch_size"),
    ({"bound_memory_mb": 0.0}, SpecError, "bound_memory_mb"),
    ({"eval_samples": -1}, SpecError, "eval_samples"),
    ({"certify_method": "crwn"}, UnknownNameError, "did you mean 'crown'"),
])
def test_config_rejects_bad_values(kwargs: dict, error: type, match: str) -> None:
    args = {"method": "wong-kolter", "eps": EpsSchedule(0.1)} | kwargs
    with pytest.raises(error, match=match):
        RobustConfig(**args)


def test_eps_schedule_rejects_a_start_above_the_target() -> None:
    with pytest.raises(SpecError, match="starts at 0.2 above"):
        EpsSchedule(0.1, start=0.2)


# ------------------------------------------------------------------------------- evaluation


def test_evaluate_robust_orders_certified_robust_clean() -> None:
    model = _tiny().eval()
    x, y = _batch(30, seed=3)
    with torch.no_grad():
        y = model(x).argmax(1)          # some correct samples, so the orders are not trivial
    y[::3] = (y[::3] + 1) % 10
    for eps in (0.0, 0.002, 0.05):
        r = evaluate_robust(model, x, y, eps, certify_method="crown", pgd_steps=5,
                            generator=torch.Generator().manual_seed(0), batch_size=7)
        assert 0 <= r.certified_accuracy <= r.pgd_accuracy <= r.clean_accuracy <= 1
        assert r.clean_accuracy == pytest.approx(20 / 30)
    assert evaluate_robust(model, x, y, 0.0).certified_accuracy == pytest.approx(20 / 30)


# ------------------------------------------------------------------- training on digits


@dataclass(frozen=True)
class Models:
    normal: Path
    robust: Path
    retrained: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    folder = tmp_path_factory.mktemp("robust")
    with one_thread():
        train_standard(ARCH, "digits", TrainConfig(epochs=10, seed=0),
                       output=folder / "normal.pt", quiet=True)
        train_robust(ARCH, "digits", TrainConfig(epochs=10, seed=0),
                     RobustConfig("wong-kolter", EpsSchedule(EPS, ramp_epochs=5),
                                  eval_samples=100),
                     output=folder / "robust.pt", quiet=True)
        retrain_checkpoint(folder / "normal.pt",
                           RobustConfig("wong-kolter", EpsSchedule(EPS, ramp_epochs=1.5),
                                        eval_samples=100),
                           TrainConfig(epochs=3, seed=0), output=folder / "retrained.pt",
                           quiet=True)
    return Models(folder / "normal.pt", folder / "robust.pt", folder / "retrained.pt")


@pytest.fixture(scope="module")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    return load_dataset("digits", "test").tensors()


def _certified_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    model, _ = load_checkpoint(path)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
        lower = margin_bounds(model, x, y, EPS, "wong-kolter").lower.amin(1)
    return float((ok & (lower > 0)).double().mean())


def _area(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    from certify.radius import certified_radii

    model, _ = load_checkpoint(path)
    r = certified_radii(model, x, y, "wong-kolter", eps_max=0.5, tol=1e-3)
    assert (r.certified_eps[r.pred != r.label] == 0).all()
    return r.area


@pytest.fixture(scope="module")
def scores(models, digits_test) -> dict[str, tuple[float, float]]:  # type: ignore[no-untyped-def]
    """Per model: (certified accuracy at EPS, certification area), wong-kolter, test set."""
    x, y = digits_test
    with one_thread():
        return {name: (_certified_accuracy(path, x, y), _area(path, x, y))
                for name, path in (("normal", models.normal), ("robust", models.robust),
                                   ("retrained", models.retrained))}


def test_wong_kolter_training_certifies_far_more_than_normal_training(models, scores):  # type: ignore[no-untyped-def]
    (normal, normal_area), (robust, robust_area) = scores["normal"], scores["robust"]
    assert robust >= normal + 0.25 and robust >= 2 * normal
    assert robust_area > normal_area
    _, meta = load_checkpoint(models.robust)
    assert meta.metrics["test_accuracy"] >= 0.8   # still a useful classifier


def test_robust_retraining_raises_the_certification_area(scores):  # type: ignore[no-untyped-def]
    (normal, normal_area), (retrained, retrained_area) = scores["normal"], scores["retrained"]
    assert retrained_area > normal_area
    assert retrained > normal


def test_retrained_checkpoint_records_parent_and_recipe(models):  # type: ignore[no-untyped-def]
    _, parent = load_checkpoint(models.normal)
    model, meta = load_checkpoint(models.retrained)
    assert meta.parent == checkpoint_sha256(models.normal)
    t = meta.training
    assert t["command"] == "retrain" and t["method"] == "wong-kolter"
    assert (t["eps"], t["eps_start"], t["eps_ramp_epochs"], t["kappa"]) == (EPS, 0.0, 1.5, 0.0)
    assert (t["epochs"], t["lr"], t["seed"]) == (3, 1e-3, 0)
    assert t["parent_training"] == parent.training and t["parent_sha256"] == meta.parent
    assert (meta.arch, meta.arch_kwargs) == (parent.arch, parent.arch_kwargs)
    history = t["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["eps"] for h in history] == pytest.approx([EPS / 1.5, EPS, EPS])
    assert history[-1]["certified_accuracy"] == meta.metrics["certified_accuracy"]
    m = meta.metrics
    assert m["certified_accuracy"] > m["parent_certified_accuracy"]
    assert m["certified_accuracy"] <= m["pgd_accuracy"] <= m["clean_accuracy"]


def test_robust_checkpoint_records_schedule_and_epoch_reports(models):  # type: ignore[no-untyped-def]
    _, meta = load_checkpoint(models.robust)
    t = meta.training
    assert t["command"] == "train" and meta.parent is None
    assert [h["eps"] for h in t["history"]] == pytest.approx(
        [min(EPS, EPS * e / 5) for e in range(1, 11)])
    certified = [h["certified_accuracy"] for h in t["history"]]
    assert certified[-1] > certified[0]
    assert all(h["certified_accuracy"] <= h["pgd_accuracy"] for h in t["history"])


def test_retrain_refuses_another_dataset(models):  # type: ignore[no-untyped-def]
    with pytest.raises(DatasetError, match="expects input"):
        retrain_checkpoint(models.normal, RobustConfig("pgd", EpsSchedule(EPS)),
                           TrainConfig(epochs=1), dataset="svhn", quiet=True)
    with pytest.raises(CheckpointError, match="not found"):
        retrain_checkpoint(models.normal.with_name("missing.pt"),
                           RobustConfig("pgd", EpsSchedule(EPS)), TrainConfig(epochs=1))


def test_resume_with_robust_loss_and_eps_ramp_equals_uninterrupted_run(tmp_path):  # type: ignore[no-untyped-def]
    train_set = load_dataset("digits", "train").take(torch.arange(320))
    test_set = load_dataset("digits", "test").take(torch.arange(60))
    sets = [_Pairs(*train_set), _Pairs(*test_set)]
    config = TrainConfig(epochs=3, batch_size=64, seed=3)
    robust = RobustConfig("pgd", EpsSchedule(EPS, start=0.02, ramp_epochs=2), pgd_steps=3,
                          eval_samples=30, eval_pgd_steps=3)

    def model() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return create_arch("mlp-32", (1, 8, 8), 10, mean=[0.3], std=[0.4])

    full = model()
    full_run = robust_fit(full, *sets, config, robust, quiet=True)

    state = partial_path(tmp_path / "m.pt")

    def stop(record):  # type: ignore[no-untyped-def]
        if record.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        robust_fit(model(), *sets, config, robust, state_path=state, on_epoch=stop, quiet=True)
    resumed = model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)                                  # the weights must come from the state
    run = robust_fit(resumed, *sets, config, robust, state_path=state, resume=True, quiet=True)
    assert run.result.resumed_epochs == 2
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r.metrics for r in run.result.history] == [r.metrics for r in full_run.result.history]
    assert run.final == full_run.final
    other = RobustConfig("pgd", EpsSchedule(0.2, start=0.02, ramp_epochs=2), pgd_steps=3)
    with pytest.raises(CheckpointError, match="belongs to run"):
        robust_fit(model(), *sets, config, other, state_path=state, resume=True, quiet=True)


@dataclass(frozen=True)
class _Pairs:
    """A tiny in-memory dataset with ``len`` and ``take``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]


def test_unsupported_layer_fails_before_training() -> None:
    from certify.errors import UnsupportedLayerError

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.GELU())
    x, y = _batch(8)
    with pytest.raises(UnsupportedLayerError, match="GELU"):
        robust_fit(model, _Pairs(x, y), None, TrainConfig(epochs=1),
                   RobustConfig("crown-ibp", EpsSchedule(EPS)), quiet=True)


def test_zero_eps_robust_loss_is_the_clean_loss() -> None:
    model = _tiny().eval()
    x, y = _batch(8)
    clean = F.cross_entropy(model(x), y)
    for method in BOUND_METHODS:
        assert torch.allclose(bound_loss(model, x, y, 0.0, method), clean, atol=1e-5)
    pgd_loss, _ = RobustLoss(RobustConfig("pgd", EpsSchedule(0.0)))(model, x, y, 0, _step(0, 0))
    assert math.isclose(float(pgd_loss.detach()), float(clean.detach()), rel_tol=1e-6)
