"""Standard training writes a complete checkpoint; evaluation and the compatibility check."""

from __future__ import annotations

import pytest
import torch

from certify.checkpoint import build_model, load_checkpoint
from certify.compat import check_compatible
from certify.data import DATASETS, DatasetInfo, get_dataset_info, load_dataset
from certify.errors import CheckpointError, DatasetError, UnknownNameError
from certify.nets import count_parameters
from certify.train.loops import TrainConfig, evaluate
from certify.train.standard import evaluate_checkpoint, init_model, train_standard


def test_teacher_checkpoint_is_complete(digits_teacher):  # type: ignore[no-untyped-def]
    payload = torch.load(digits_teacher.path, weights_only=True)
    meta = payload["meta"]
    assert meta["arch"] == "svhn-teacher"
    assert meta["arch_kwargs"]["channels"] == [8, 16, 16, 16]
    info = get_dataset_info("digits")
    assert meta["dataset"] == "digits" and tuple(meta["input_shape"]) == info.input_shape
    assert tuple(meta["mean"]) == pytest.approx(info.mean)
    recipe = meta["training"]
    assert recipe["command"] == "train" and recipe["optimizer"] == "adam"
    assert recipe["epochs"] == 12 and recipe["seed"] == 0 and recipe["lr"] == 1e-3
    assert meta["metrics"]["test_accuracy"] == pytest.approx(digits_teacher.accuracy)
    assert not digits_teacher.path.with_name("teacher.pt.partial").exists()


def test_checkpoint_round_trip_identical_logits(digits_teacher):  # type: ignore[no-untyped-def]
    model, meta = load_checkpoint(digits_teacher.path)
    x, _ = load_dataset("digits", "test").take(torch.arange(50))
    rebuilt = build_model(meta)
    rebuilt.load_state_dict(torch.load(digits_teacher.path, weights_only=True)["state_dict"])
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert evaluate(model, load_dataset("digits", "test")) == pytest.approx(
        digits_teacher.accuracy)


def test_evaluate_checkpoint(digits_teacher):  # type: ignore[no-untyped-def]
    r = evaluate_checkpoint(digits_teacher.path)
    assert (r.dataset, r.split, r.total) == ("digits", "test", 450)
    assert r.accuracy == pytest.approx(digits_teacher.accuracy)
    train_r = evaluate_checkpoint(digits_teacher.path, split="train")
    assert train_r.total == 1347 and train_r.accuracy >= r.accuracy - 0.05
    with pytest.raises(DatasetError, match="no split 'extra'"):
        evaluate_checkpoint(digits_teacher.path, split="extra")


def test_init_model_is_seeded_and_rebuildable():
    a, base, kwargs = init_model("scn-8-8", (1, 8, 8), 10, mean=[0.5], std=[0.2], seed=7)
    b, _, _ = init_model("scn-8-8", (1, 8, 8), 10, mean=[0.5], std=[0.2], seed=7)
    c, _, _ = init_model("scn-8-8", (1, 8, 8), 10, mean=[0.5], std=[0.2], seed=8)
    assert base == "scn" and kwargs["channels"] == [8, 8]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    from certify.nets import create_arch

    assert count_parameters(create_arch(base, (1, 8, 8), 10, **kwargs)) == count_parameters(a)


def test_unknown_arch_suggests_and_writes_nothing(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "x.pt"
    with pytest.raises(UnknownNameError, match="did you mean 'wk-small'"):
        train_standard("wk-smal", "digits", TrainConfig(epochs=1), output=out, quiet=True)
    assert not any(tmp_path.iterdir())


def _info(name: str, shape: tuple[int, int, int], classes: int = 10) -> DatasetInfo:
    return DatasetInfo(name, classes, shape, (0.5,) * shape[0], (0.25,) * shape[0], ("test",))


def test_check_compatible(digits_teacher):  # type: ignore[no-untyped-def]
    _, meta = load_checkpoint(digits_teacher.path)
    check_compatible(meta, get_dataset_info("digits"), strict=True)
    with pytest.raises(DatasetError) as e:
        check_compatible(meta, _info("svhn", (3, 32, 32)), model_name="model.pt")
    assert str(e.value) == ("model.pt expects input (1, 8, 8) (digits) but svhn has (3, 32, 32); "
                            "pick --dataset digits.")
    with pytest.raises(DatasetError, match="has 10 classes .* other has 5"):
        check_compatible(meta, _info("other", (1, 8, 8), classes=5))
    check_compatible(meta, _info("twin", (1, 8, 8)))           # same shape: allowed ...
    with pytest.raises(DatasetError, match="trained on digits, not twin"):
        check_compatible(meta, _info("twin", (1, 8, 8)), strict=True)   # ... unless strict


def test_eval_on_other_shape_fails_before_loading(digits_teacher, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setitem(DATASETS, "wide", _info("wide", (3, 32, 32)))
    with pytest.raises(DatasetError, match=r"teacher.pt expects input \(1, 8, 8\)"):
        evaluate_checkpoint(digits_teacher.path, dataset="wide")


def test_corrupt_checkpoint(tmp_path):  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError):
        evaluate_checkpoint(bad)
