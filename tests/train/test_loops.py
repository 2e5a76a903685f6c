"""The shared training loop: config checks, schedules, determinism, resume, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from certify.data import load_dataset
from certify.errors import CheckpointError, SpecError
from certify.nets import create_arch
from certify.train.loops import (
    Step,
    TemperatureCrossEntropy,
    TrainConfig,
    count_correct,
    evaluate,
    load_train_state,
    partial_path,
    predict_logits,
    train,
)


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return create_arch("scn-4-8", (1, 8, 8), 10, mean=[0.3], std=[0.4], hidden=[16])


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"optimizer": "adamw"},
    {"schedule": "linear"}, {"momentum": -0.1}, {"grad_clip": 0.0},
])
def test_config_rejects_bad_values(bad):  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError):
        TrainConfig(**bad)


def test_schedules():
    cos = TrainConfig(epochs=10, lr=0.1, schedule="cosine")
    rates = [cos.lr_at(e) for e in range(10)]
    assert rates[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rates[:-1], rates[1:], strict=True))
    assert rates[5] == pytest.approx(0.05)
    step = TrainConfig(epochs=8, lr=1.0, schedule="step")
    assert [step.lr_at(e) for e in range(8)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert {TrainConfig(epochs=5, lr=0.3, schedule="none").lr_at(e) for e in range(5)} == {0.3}


def test_step_progress():
    s = Step(epoch=2, index=3, batches=4, epochs=5, indices=torch.arange(3))
    assert s.global_step == 11 and s.total_steps == 20
    assert s.epoch_progress == pytest.approx(2.75)
    assert s.progress == pytest.approx(11 / 20)


def test_same_seed_gives_identical_weights_other_seed_differs(digits):  # type: ignore[no-untyped-def]
    train_set, _ = digits
    config = TrainConfig(epochs=2, batch_size=32, seed=3)
    runs = []
    for seed in (3, 3, 4):
        model = _model()
        train(model, train_set, None, TrainConfig(**{**config.to_dict(), "seed": seed}),
              quiet=True)
        runs.append(model)
    assert _same_weights(runs[0], runs[1])
    assert not _same_weights(runs[0], runs[2])


def test_training_leaves_global_rng_alone(digits):  # type: ignore[no-untyped-def]
    train_set, _ = digits
    model = _model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, train_set, None, TrainConfig(epochs=1, batch_size=256), quiet=True)
    assert torch.equal(torch.rand(3), expected)


def test_resume_after_interruption_equals_uninterrupted_run(digits, tmp_path):  # type: ignore[no-untyped-def]
    train_set, test_set = digits
    config = TrainConfig(epochs=4, batch_size=64, seed=1, optimizer="sgd", lr=0.05,
                         schedule="step")
    full = _model()
    full_result = train(full, train_set, test_set, config, quiet=True)

    state = partial_path(tmp_path / "m.pt")

    def stop_after_two(record):  # type: ignore[no-untyped-def]
        if record.epoch == 2:
            raise KeyboardInterrupt

    interrupted = _model()
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, train_set, test_set, config, on_epoch=stop_after_two,
              state_path=state, quiet=True)
    assert state.exists()
    payload = torch.load(state, weights_only=True)     # plain data only
    assert payload["epoch"] == 2 and isinstance(payload["generator"], torch.Tensor)

    resumed = _model(seed=99)                           # weights come from the state file
    result = train(resumed, train_set, test_set, config, state_path=state, resume=True,
                   quiet=True)
    assert result.resumed_epochs == 2
    assert _same_weights(full, resumed)
    assert [r.test_accuracy for r in result.history] == \
        [r.test_accuracy for r in full_result.history]


def test_resume_refuses_other_settings(digits, tmp_path):  # type: ignore[no-untyped-def]
    train_set, _ = digits
    state = tmp_path / "m.pt.partial"
    train(_model(), train_set, None, TrainConfig(epochs=1, batch_size=256), state_path=state,
          quiet=True)
    with pytest.raises(CheckpointError, match="other settings.*lr"):
        train(_model(), train_set, None, TrainConfig(epochs=1, batch_size=256, lr=0.5),
              state_path=state, resume=True, quiet=True)
    with pytest.raises(CheckpointError, match="belongs to run"):
        train(_model(), train_set, None, TrainConfig(epochs=1, batch_size=256),
              state_path=state, resume=True, tag="distill", quiet=True)
    state.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable training state"):
        load_train_state(state)


def test_pluggable_loss_sees_epoch_and_step(digits):  # type: ignore[no-untyped-def]
    train_set, _ = digits
    seen = []

    def loss_fn(model, x, y, epoch, step):  # type: ignore[no-untyped-def]
        seen.append((epoch, step.index, step.progress, len(step.indices)))
        assert torch.equal(train_set.take(step.indices)[1], y)
        return F.cross_entropy(model(x), y)     # a bare tensor: no training accuracy

    result = train(_model(), train_set, None, TrainConfig(epochs=2, batch_size=500), loss_fn,
                   quiet=True)
    assert [s[:2] for s in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [s[2] for s in seen] == pytest.approx([i / 6 for i in range(6)])
    assert sum(s[3] for s in seen[:3]) == len(train_set)
    assert result.history[0].train_accuracy is None and result.test_accuracy is None


def test_diverging_loss_is_a_clear_error(digits):  # type: ignore[no-untyped-def]
    train_set, _ = digits

    def nan_loss(model, x, y, epoch, step):  # type: ignore[no-untyped-def]
        return model(x).sum() * float("nan")

    with pytest.raises(SpecError, match="lower the learning rate"):
        train(_model(), train_set, None, TrainConfig(epochs=1), nan_loss, quiet=True)


def test_evaluate_counts_and_restores_mode(digits):  # type: ignore[no-untyped-def]
    _, test_set = digits
    model = _model().train()
    x, y = test_set.tensors()
    with torch.no_grad():
        expected = int((model.eval()(x).argmax(1) == y).sum())
    model.train()
    assert count_correct(model, test_set, batch_size=37) == expected
    assert evaluate(model, test_set, batch_size=1000) == pytest.approx(expected / len(test_set))
    assert model.training
    logits = predict_logits(model, test_set, batch_size=100)
    with torch.no_grad():
        assert torch.allclose(logits, model.eval()(x), atol=1e-6)


def test_temperature_cross_entropy():
    model = _model()
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    step = Step(0, 0, 1, 1, torch.arange(5))
    z = model(x)
    loss1, _ = TemperatureCrossEntropy(1.0)(model, x, y, 0, step)
    loss3, _ = TemperatureCrossEntropy(3.0)(model, x, y, 0, step)
    assert loss1.item() == pytest.approx(F.cross_entropy(z, y).item())
    assert loss3.item() == pytest.approx(F.cross_entropy(z / 3, y).item())
    with pytest.raises(SpecError):
        TemperatureCrossEntropy(0.0)
    assert math.isfinite(loss3.item())
