"""Distillation: the three losses analytically, the cached teacher, provenance, the sweep."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from certify._io import sha256_file
from certify.checkpoint import load_checkpoint
from certify.data import DATASETS, DatasetInfo, load_dataset
from certify.errors import DatasetError, SpecError, UnknownNameError
from certify.train.distill import (
    ConcatSet,
    DistillLoss,
    distill,
    distill_from,
    distill_sweep,
    hinton_loss,
    load_teacher,
    logit_matching_loss,
    soft_target_loss,
)
from certify.train.loops import TrainConfig, train

logits_pairs = st.tuples(st.integers(1, 6), st.integers(2, 10), st.integers(0, 2**16))


def _pair(n: int, k: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, k, generator=g, dtype=torch.float64),
            scale * torch.randn(n, k, generator=g, dtype=torch.float64))


@given(logits_pairs)
@settings(max_examples=30, deadline=None)
def test_logit_matching_zero_iff_equal(case):  # type: ignore[no-untyped-def]
    z_s, z_t = _pair(*case)
    assert logit_matching_loss(z_t.clone(), z_t).item() == 0.0
    assert logit_matching_loss(z_s, z_t).item() == pytest.approx(((z_s - z_t) ** 2).mean().item())
    if not torch.equal(z_s, z_t):
        assert logit_matching_loss(z_s, z_t).item() > 0


@given(logits_pairs, st.floats(0.5, 8.0), st.floats(0.0, 1.0))
@settings(max_examples=30, deadline=None)
def test_hinton_loss_matches_formula(case, temperature, alpha):  # type: ignore[no-untyped-def]
    z_s, z_t = _pair(*case)
    y = torch.randint(0, z_s.shape[1], (z_s.shape[0],), generator=torch.Generator().manual_seed(1))
    p_t = torch.softmax(z_t / temperature, 1)
    log_p_s = torch.log_softmax(z_s / temperature, 1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()
    ce = -torch.log_softmax(z_s, 1)[torch.arange(len(y)), y].mean()
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    got = hinton_loss(z_s, z_t, y, temperature=temperature, alpha=alpha)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-12)


@given(logits_pairs, st.floats(0.5, 8.0))
@settings(max_examples=30, deadline=None)
def test_hinton_soft_gradient_is_t_times_probability_gap(case, temperature):  # type: ignore[no-untyped-def]
    z_s, z_t = _pair(*case)
    z_s.requires_grad_(True)
    hinton_loss(z_s, z_t, None, temperature=temperature, alpha=1.0).backward()
    p_s = torch.softmax(z_s.detach() / temperature, 1)
    p_t = torch.softmax(z_t / temperature, 1)
    expected = temperature * (p_s - p_t) / z_s.shape[0]
    assert torch.allclose(z_s.grad, expected, atol=1e-12)


def test_hinton_t_squared_keeps_soft_gradient_scale_for_large_t():
    z_s, z_t = _pair(4, 10, 0, scale=1.0)
    k, n = z_s.shape[1], z_s.shape[0]
    centered = (z_s - z_s.mean(1, keepdim=True)) - (z_t - z_t.mean(1, keepdim=True))
    limit = centered / (k * n)        # first-order gradient for T -> infinity, independent of T
    grads, errors = [], []
    for t in (20.0, 40.0, 80.0):
        z = z_s.clone().requires_grad_(True)
        hinton_loss(z, z_t, None, temperature=t, alpha=1.0).backward()
        grads.append(z.grad)
        errors.append(((z.grad - limit).norm() / limit.norm()).item())
    assert errors[0] > errors[1] > errors[2] and errors[0] < 0.1 and errors[2] < 0.02
    norms = [g.norm().item() for g in grads]
    assert max(norms) / min(norms) < 1.05      # without T^2 they would shrink by 16x
    no_t2 = [n / t ** 2 for n, t in zip(norms, (20.0, 40.0, 80.0), strict=True)]
    assert no_t2[0] / no_t2[2] > 10


def test_hinton_alpha_zero_is_cross_entropy_and_needs_labels():
    z_s, z_t = _pair(5, 4, 3)
    y = torch.tensor([0, 1, 2, 3, 0])
    assert hinton_loss(z_s, z_t, y, temperature=3.0, alpha=0.0).item() == pytest.approx(
        F.cross_entropy(z_s, y).item())
    with pytest.raises(SpecError, match="needs labels"):
        hinton_loss(z_s, z_t, None, temperature=2.0, alpha=0.5)
    with pytest.raises(SpecError):
        hinton_loss(z_s, z_t, y, temperature=0.0, alpha=0.5)
    with pytest.raises(SpecError):
        hinton_loss(z_s, z_t, y, temperature=1.0, alpha=1.5)


@given(logits_pairs)
@settings(max_examples=30, deadline=None)
def test_defensive_at_t1_is_cross_entropy_on_soft_labels(case):  # type: ignore[no-untyped-def]
    z_s, z_t = _pair(*case)
    soft = torch.softmax(z_t, 1)
    assert soft_target_loss(z_s, z_t, temperature=1.0).item() == pytest.approx(
        F.cross_entropy(z_s, soft).item(), rel=1e-9)


def test_defensive_training_at_t1_equals_training_on_soft_labels():
    data = load_dataset("digits", "train")
    g = torch.Generator().manual_seed(5)
    teacher_logits = 2 * torch.randn(len(data), 10, generator=g)

    def soft_label_ce(model, x, y, epoch, step):  # type: ignore[no-untyped-def]
        return F.cross_entropy(model(x), torch.softmax(teacher_logits[step.indices], 1))

    from certify.train.standard import init_model

    config = TrainConfig(epochs=2, batch_size=128, seed=2)
    a, _, _ = init_model("scn-4-4", (1, 8, 8), 10, mean=[0.3], std=[0.4], seed=1)
    b, _, _ = init_model("scn-4-4", (1, 8, 8), 10, mean=[0.3], std=[0.4], seed=1)
    train(a, data, None, config, DistillLoss("defensive", teacher_logits, 1.0), quiet=True)
    train(b, data, None, config, soft_label_ce, quiet=True)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_teacher_logits_are_cached_not_recomputed(digits_teacher):  # type: ignore[no-untyped-def]
    teacher = load_teacher(digits_teacher.path)
    x, _ = teacher.train_set.tensors()
    with torch.no_grad():
        assert torch.allclose(teacher.logits, teacher.model(x), atol=1e-5)
    calls = []
    teacher.model.register_forward_hook(lambda *a: calls.append(1))
    distill_from(teacher, "scn-4-4", method="hinton", config=TrainConfig(epochs=2), quiet=True)
    assert calls == []


def test_student_close_to_teacher_with_provenance(digits_teacher, digits_student):  # type: ignore[no-untyped-def]
    assert digits_teacher.accuracy >= 0.9
    assert digits_student.accuracy >= digits_teacher.accuracy - 0.03
    model, meta = load_checkpoint(digits_student.path)
    assert meta.parent == sha256_file(digits_teacher.path)
    assert meta.arch == "scn" and meta.arch_kwargs["channels"] == [32, 32]
    t = meta.training
    assert (t["command"], t["method"], t["temperature"], t["alpha"], t["seed"]) == \
        ("distill", "hinton", 2.0, 0.9, 0)
    assert t["teacher"] == str(digits_teacher.path) and t["deployment_temperature"] == 1.0
    assert meta.metrics["teacher_test_accuracy"] == pytest.approx(digits_teacher.accuracy)
    assert torch.load(digits_student.path, weights_only=True)["meta"]["parent"] == meta.parent


def test_teacher_for_another_dataset_is_refused(digits_teacher, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    info = DatasetInfo("twin", 10, (1, 8, 8), (0.3,), (0.4,), ("train", "test"))
    monkeypatch.setitem(DATASETS, "twin", info)
    out = tmp_path / "s.pt"
    with pytest.raises(DatasetError, match="trained on digits, not twin"):
        distill(digits_teacher.path, "scn-4-4", dataset="twin", output=out, quiet=True)
    assert not out.exists()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "soft"}, UnknownNameError, "distillation method"),
    ({"temperature": 0.0}, SpecError, "temperature"),
    ({"alpha": 1.2}, SpecError, "alpha"),
    ({"method": "hinton", "transfer_split": "extra"}, SpecError, "logits only"),
])
def test_bad_options_fail_before_the_teacher_runs(tmp_path, kwargs, error, match):  # type: ignore[no-untyped-def]
    missing = tmp_path / "no-teacher.pt"       # never opened: options are checked first
    with pytest.raises(error, match=match):
        distill(missing, "scn-4-4", **kwargs)


def test_transfer_split_test_is_refused(digits_teacher):  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match="test set"):
        load_teacher(digits_teacher.path, transfer_split="test")


def test_concat_set_reads_both_parts():
    a, b = load_dataset("digits", "train"), load_dataset("digits", "test")
    both = ConcatSet([a, b])
    assert len(both) == len(a) + len(b)
    idx = torch.tensor([len(a) + 3, 0, len(a) - 1, len(a)])
    x, y = both.take(idx)
    xa, ya = a.take(torch.tensor([0, len(a) - 1]))
    xb, yb = b.take(torch.tensor([3, 0]))
    assert torch.equal(x, torch.stack([xb[0], xa[0], xa[1], xb[1]]))
    assert torch.equal(y, torch.stack([yb[0], ya[0], ya[1], yb[1]]))


def test_sweep_table_and_best(digits_teacher, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "best.pt"
    config = TrainConfig(epochs=2, seed=0)
    sweep = distill_sweep(digits_teacher.path, "scn-8-8", [1.0, 3.0], config=config,
                          output=out, quiet=True)
    assert [r.temperature for r in sweep.rows] == [1.0, 3.0]
    assert len({r.logits_accuracy for r in sweep.rows}) == 1     # trained once
    accs = {p.stem: load_checkpoint(p)[1].metrics["test_accuracy"]
            for p in (tmp_path / "best.sweep").glob("*.pt")}
    assert set(accs) == {"hinton-T1", "hinton-T3", "logits"}
    _, best_meta = load_checkpoint(out)
    assert best_meta.training["sweep"]["selected"] == sweep.best_label
    # chosen on the validation hold-out, measured afresh here; never on the test split
    from certify.data import load_dataset, split_validation
    from certify.train.loops import evaluate

    fit, validation = split_validation(load_dataset("digits", "train"))
    val = {p.stem: evaluate(load_checkpoint(p)[0], validation)
           for p in (tmp_path / "best.sweep").glob("*.pt")}
    assert val[sweep.best_label] == max(val.values())
    assert best_meta.metrics["validation_accuracy"] == val[sweep.best_label]
    assert best_meta.metrics["test_accuracy"] == accs[sweep.best_label]
    assert best_meta.training["train_samples"] == len(fit)   # the hold-out is not trained on
    with open(tmp_path / "best.sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["temperature_accuracy"]) for r in rows] == \
        [accs["hinton-T1"], accs["hinton-T3"]]
    assert "Temperature" in (tmp_path / "best.sweep.md").read_text()
    again = distill_sweep(digits_teacher.path, "scn-8-8", [1.0, 3.0], config=config,
                          output=out, resume=True, quiet=True)   # reuses the saved students
    assert again.rows == sweep.rows
    with pytest.raises(SpecError, match="logit matching is included"):
        distill_sweep(digits_teacher.path, "scn-8-8", [1.0, 2.0], method="logits")
