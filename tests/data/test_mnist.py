from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.data import get_dataset_info, load_dataset
from certify.data.mnist import read_idx
from certify.errors import DatasetError


def _digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def test_registry_info() -> None:
    info = get_dataset_info("mnist")
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.mean == (0.1307,) and info.std == (0.3081,)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_pixel_exact(tmp_path: Path, fmt, rng, gz: bool, split: str) -> None:
    images, labels = _digits(rng, 5)
    images[2, 13, 27] = 77  # image 2, row 13, column 27
    images[4, 0, 0] = 255
    fmt.write_mnist(tmp_path / "mnist", split, images, labels, gz=gz)
    ds = load_dataset("mnist", split, root=tmp_path)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 1, 28, 28)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    x, _ = ds.tensors()
    assert x[2, 0, 13, 27].item() == pytest.approx(77 / 255) and x[4, 0, 0, 0].item() == 1.0
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))


def test_gz_and_plain_in_root(tmp_path: Path, fmt, rng) -> None:
    images, labels = _digits(rng, 3)
    fmt.write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    fmt.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    ds = load_dataset("mnist", "test", root=tmp_path)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=4), seed=st.integers(0, 2**31),
       gz=st.booleans())
def test_idx_round_trip(tmp_path_factory, shape: list[int], seed: int, gz: bool) -> None:
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    raw = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    raw += array.tobytes()
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = read_idx(path, ndim=len(shape))
    assert out.dtype == np.uint8 and out.shape == tuple(shape)
    assert np.array_equal(out, array)
    with pytest.raises(DatasetError, match="magic number"):
        read_idx(path, ndim=len(shape) + 1)


def test_missing_only_names_the_missing_file(tmp_path: Path, fmt, rng) -> None:
    images, _ = _digits(rng, 2)
    fmt.write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(DatasetError, match="MNIST file not found") as e:
        load_dataset("mnist", "train", root=tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / 'mnist' / 'train-labels-idx1-ubyte'}[.gz]" in msg
    assert "train-images" not in msg.split(". Download")[0]
    assert "certify data download mnist" in msg


def _header(magic: int, *dims: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims)


@pytest.mark.parametrize("raw,what", [
    (b"", "shorter than an idx header"),
    (_header(0x0801, 2) + b"\x00\x01", "magic number 0x00000801, expected 0x00000803"),
    (_header(0x0D03, 1, 28, 28), "magic number 0x00000D03"),
    (b"\x1f\x8b" + b"\x00" * 20, "magic number 0x1F8B0000"),  # gzipped but not named .gz
    (_header(0x0803, 2, 28), "shorter than its 16-byte header"),
    (_header(0x0803, 2, 28, 28) + bytes(28 * 28), "holds 784"),  # truncated
    (_header(0x0803, 1, 28, 28) + bytes(28 * 28 + 1), "holds 785"),  # trailing bytes
])
def test_bad_idx_header_names_the_file(tmp_path: Path, fmt, raw: bytes, what: str) -> None:
    fmt.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DatasetError, match=what) as e:
        load_dataset("mnist", "test", root=tmp_path)
    assert str(path) in str(e.value) and "corrupt" in str(e.value)


def test_bad_gzip_names_the_file(tmp_path: Path, fmt, rng) -> None:
    images, labels = _digits(rng, 2)
    fmt.write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    good = gzip.compress(_header(0x0803, 2, 28, 28) + images.tobytes())
    for damaged in (good[: len(good) // 2], b"not gzip at all"):
        path.write_bytes(damaged)
        with pytest.raises(DatasetError, match="bad gzip data") as e:
            load_dataset("mnist", "test", root=tmp_path)
        assert str(path) in str(e.value)


def test_disagreeing_files(tmp_path: Path, fmt, rng) -> None:
    images, labels = _digits(rng, 3)
    fmt.write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    fmt.write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2])
    with pytest.raises(DatasetError, match="3 images but .* has 2 labels"):
        load_dataset("mnist", "test", root=tmp_path)
    fmt.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 10]))
    with pytest.raises(DatasetError, match="label 10, expected 0..9"):
        load_dataset("mnist", "test", root=tmp_path)
    fmt.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"size \(8, 8\), expected \(28, 28\)"):
        load_dataset("mnist", "test", root=tmp_path)
