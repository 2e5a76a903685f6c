from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from certify.data import DATASETS, get_dataset_info, load_dataset
from certify.errors import DatasetError


def _official(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """X `(32, 32, 3, n)` uint8 and y `(n, 1)` in 1..10, with label 10 (digit 0) present."""
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    y[1, 0] = 1
    return x, y


def test_registry_info() -> None:
    info = get_dataset_info("svhn")
    assert "svhn" in DATASETS
    assert info.input_shape == (3, 32, 32) and info.num_classes == 10
    assert info.splits == ("train", "test", "extra")
    assert len(info.mean) == len(info.std) == 3
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)


@pytest.mark.parametrize("y_dtype", [np.uint8, np.float64])
def test_pixel_exact_nchw_and_label_10_is_digit_0(tmp_path: Path, fmt, rng, y_dtype) -> None:
    x, y = _official(rng, 6)
    x[4, 17, 2, 3] = 201  # row 4, column 17, blue, sample 3
    x[0, 0, 0, 0] = 0
    x[31, 31, 0, 5] = 255
    fmt.write_svhn(tmp_path / "svhn" / "test_32x32.mat", x, y.astype(y_dtype))

    ds = load_dataset("svhn", "test", root=tmp_path)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (6, 3, 32, 32)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (6,)
    images, labels = ds.tensors()
    assert images.dtype == torch.float32 and images.shape == (6, 3, 32, 32)
    assert images[3, 2, 4, 17].item() == pytest.approx(201 / 255)
    assert images[0, 0, 0, 0].item() == 0.0 and images[5, 0, 31, 31].item() == 1.0
    # every pixel: X[h, w, c, n] == image[n, c, h, w]
    expected = torch.from_numpy(np.transpose(x, (3, 2, 0, 1)).copy())
    assert torch.equal(ds.images, expected)
    assert torch.equal(torch.round(images * 255).to(torch.uint8), expected)
    assert labels[0].item() == 0 and labels[1].item() == 1
    assert labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert 0 <= labels.min() and labels.max() <= 9


def test_root_itself_is_searched_and_name_folder_wins(tmp_path: Path, fmt, rng) -> None:
    x, y = _official(rng, 3)
    fmt.write_svhn(tmp_path / "train_32x32.mat", x, y)
    assert len(load_dataset("svhn", "train", root=tmp_path)) == 3
    fmt.write_svhn(tmp_path / "svhn" / "train_32x32.mat", *_official(rng, 5))
    assert len(load_dataset("svhn", "train", root=tmp_path)) == 5


def test_env_var_is_the_default_root(tmp_path: Path, fmt, rng, monkeypatch) -> None:
    fmt.write_svhn(tmp_path / "svhn" / "extra_32x32.mat", *_official(rng, 2))
    monkeypatch.setenv("CERTIFY_DATA", str(tmp_path))
    assert len(load_dataset("svhn", "extra")) == 2


def test_missing_file_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="SVHN file not found") as e:
        load_dataset("svhn", "test", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "svhn" / "test_32x32.mat") in msg
    assert str(tmp_path / "test_32x32.mat") in msg
    assert "certify data download svhn" in msg and "--data-dir" in msg and "$CERTIFY_DATA" in msg
    with pytest.raises(DatasetError, match="download svhn --split extra"):
        load_dataset("svhn", "extra", root=tmp_path)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_named(tmp_path: Path, fmt, rng, damage: str) -> None:
    path = fmt.write_svhn(tmp_path / "svhn" / "test_32x32.mat", *_official(rng, 4))
    if damage == "truncate":
        _truncated(path)
    else:
        path.write_bytes(b"" if damage == "empty" else rng.bytes(3000))
    with pytest.raises(DatasetError, match="corrupt") as e:
        load_dataset("svhn", "test", root=tmp_path)
    assert str(path) in str(e.value) and "download" in str(e.value)


@pytest.mark.parametrize("variables,what", [
    ({"X": np.zeros((32, 32, 3, 2), np.float32), "y": np.ones((2, 1))}, "X is float32"),
    ({"X": np.zeros((3, 32, 32, 2), np.uint8), "y": np.ones((2, 1))}, "expected uint8 of shape"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "y has shape"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.zeros((2, 1))}, "1..10"),
    ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.full((2, 1), 1.5)}, "1..10"),
    ({"images": np.zeros((32, 32, 3, 2), np.uint8)}, "expected X and y"),
])
def test_wrong_contents_are_rejected(tmp_path: Path, variables, what: str) -> None:
    from scipy.io import savemat

    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", variables)
    with pytest.raises(DatasetError, match=what):
        load_dataset("svhn", "test", root=tmp_path)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no split 'val'"):
        load_dataset("svhn", "val", root=tmp_path)
