from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from certify.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint, save_checkpoint
from certify.errors import CheckpointError
from tests.conftest import make_meta


def test_round_trip_gives_identical_logits(tiny_cnn, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    meta = make_meta("scn", tiny_cnn).with_updates(
        metrics={"test_accuracy": 0.5}, training={"command": "train", "seed": 3}
    )
    save_checkpoint(path, tiny_cnn, meta)
    model, loaded = load_checkpoint(path)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(model(x), tiny_cnn(x))
    assert loaded.arch == "scn" and loaded.input_shape == (1, 8, 8)
    assert loaded.metrics == {"test_accuracy": 0.5} and loaded.training["seed"] == 3
    assert not model.training


def test_file_is_plain_data_loadable_with_weights_only(tiny_checkpoint: Path) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION
    assert set(payload) == {"format_version", "meta", "state_dict"}


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch " + os.environ["CERTIFY_PWNED_MARK"],))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path, monkeypatch) -> None:
    mark = tmp_path / "pwned"
    monkeypatch.setenv("CERTIFY_PWNED_MARK", str(mark))
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "meta": _Payload(), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_checkpoint(path)
    assert not mark.exists(), "loading ran the attacker's code"


def test_truncated_file_is_a_clear_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tiny_checkpoint.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(text)
    other = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a certify checkpoint"):
        load_checkpoint(other)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_newer_format_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(CheckpointError, match="Upgrade certify"):
        read_checkpoint(newer)


def test_weights_that_do_not_fit_the_architecture(tiny_checkpoint: Path, tmp_path: Path) -> None:
    payload = torch.load(tiny_checkpoint, weights_only=True)
    payload["meta"]["arch_kwargs"]["hidden"] = [7]
    bad = tmp_path / "mismatch.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(bad)


def test_failed_save_leaves_previous_file_intact(
    tiny_cnn, tiny_checkpoint: Path, monkeypatch
) -> None:
    before = tiny_checkpoint.read_bytes()

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_checkpoint, tiny_cnn, make_meta("scn", tiny_cnn))
    assert tiny_checkpoint.read_bytes() == before
    assert [p.name for p in tiny_checkpoint.parent.iterdir() if p.name.endswith(".tmp")] == []
    with zipfile.ZipFile(tiny_checkpoint):
        pass
    assert pickle  # imported for the crafted-file helpers above


def test_saved_files_have_ordinary_permissions(tiny_checkpoint: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    assert tiny_checkpoint.stat().st_mode & 0o777 == 0o666 & ~mask
