from __future__ import annotations

import pickle
import pickletools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from certify.data import get_dataset_info, load_dataset
from certify.data.cifar10 import BatchUnpickler, read_batch
from certify.errors import DatasetError


def test_registry_info() -> None:
    info = get_dataset_info("cifar10")
    assert info.input_shape == (3, 32, 32) and info.num_classes == 10
    assert info.splits == ("train", "test")
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2470, 0.2435, 0.2616)


def test_test_pickles_look_like_python2_cpickle(fmt) -> None:
    """The fixture writes what the official files contain: only these three globals."""
    raw = fmt.py2_pickle_dumps(fmt.cifar_batch(np.zeros((2, 3072), np.uint8), [1, 2], b"t"))
    globals_used = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert globals_used == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert raw[:2] == b"\x80\x02"
    assert pickle.loads(raw, encoding="bytes")[b"labels"] == [1, 2]


@pytest.mark.parametrize("split", ["train", "test"])
def test_pixel_exact_from_folder(tmp_path: Path, fmt, rng, split: str) -> None:
    files = fmt.write_cifar_folder(tmp_path / "cifar10", rng, n=3)
    data = files.data[split]
    data[1, 1024 + 5 * 32 + 7] = 123  # image 1, green, row 5, column 7
    data[0, 2 * 1024 + 31 * 32 + 31] = 255  # image 0, blue, last pixel
    first = "data_batch_1" if split == "train" else "test_batch"
    fmt.write_cifar_batch(tmp_path / "cifar10" / "cifar-10-batches-py" / first, data[:3],
                          files.labels[split][:3].tolist(), b"rewritten")

    ds = load_dataset("cifar10", split, root=tmp_path)
    n = 15 if split == "train" else 3
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (n, 3, 32, 32)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == files.labels[split].tolist()
    x, _ = ds.tensors()
    assert x[1, 1, 5, 7].item() == pytest.approx(123 / 255)
    assert x[0, 2, 31, 31].item() == 1.0
    for i, c, h, w in [(0, 0, 0, 0), (2, 1, 17, 3), (n - 1, 2, 8, 30)]:
        assert ds.images[i, c, h, w].item() == data[i, c * 1024 + h * 32 + w]
    assert torch.equal(ds.images.reshape(n, 3072), torch.from_numpy(data))


def test_numpy2_protocol4_pickles_load_too(tmp_path: Path, fmt, rng) -> None:
    """A batch re-saved by Python 3 / numpy 2 (numpy._core, STACK_GLOBAL) is accepted."""
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    (batches / "test_batch").write_bytes(
        pickle.dumps(fmt.cifar_batch(data, [0, 9, 3, 3], b"test"), protocol=4))
    ds = load_dataset("cifar10", "test", root=tmp_path)
    assert torch.equal(ds.images.reshape(4, 3072), torch.from_numpy(data))
    assert ds.labels.tolist() == [0, 9, 3, 3]


@pytest.mark.parametrize("where", ["cifar10", "."])
def test_tarball_is_extracted_and_loaded(tmp_path: Path, fmt, rng, where: str) -> None:
    folder = tmp_path / where
    folder.mkdir(exist_ok=True)
    files = fmt.write_cifar_tarball(folder, rng, n=2)
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert torch.equal(ds.images.reshape(10, 3072), torch.from_numpy(files.data["train"]))
    assert (folder / "cifar-10-batches-py" / "data_batch_5").is_file()
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert test.labels.tolist() == files.labels["test"].tolist()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tarball_cannot_write_outside_its_folder(tmp_path: Path, fmt) -> None:
    root = tmp_path / "root"
    root.mkdir()
    good = fmt.py2_pickle_dumps(fmt.cifar_batch(np.zeros((1, 3072), np.uint8), [1], b"b"))
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
            _add_bytes(tar, f"cifar-10-batches-py/{name}", good)
        _add_bytes(tar, "cifar-10-batches-py/../../escaped", b"owned")
        _add_bytes(tar, "../escaped2", b"owned")
        _add_bytes(tar, str(tmp_path / "absolute"), b"owned")
    assert len(load_dataset("cifar10", "test", root=root)) == 1
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped2").exists()
    assert not (tmp_path / "absolute").exists()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py",
                                                      "cifar-10-python.tar.gz"]


def test_tarball_with_a_symlink_member_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not for you")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        link.type = tarfile.SYMTYPE
        link.linkname = str(secret)
        tar.addfile(link)
    with pytest.raises(DatasetError, match="not a regular file"):
        load_dataset("cifar10", "train", root=root)
    assert not (root / "cifar-10-batches-py" / "data_batch_1").exists()


@pytest.mark.parametrize("content", [b"", b"not a tarball at all", b"\x1f\x8b\x08\x00garbage"])
def test_corrupt_tarball(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="corrupt") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(path) in str(e.value)


def test_missing_files_say_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="CIFAR-10 file not found") as e:
        load_dataset("cifar10", "train", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in msg
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg
    assert "certify data download cifar10" in msg


def test_truncated_batch_is_corrupt(tmp_path: Path, fmt, rng) -> None:
    fmt.write_cifar_folder(tmp_path, rng, n=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match="corrupt") as e:
        load_dataset("cifar10", "test", root=tmp_path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("batch,what", [
    ([1, 2, 3], "expected a dict"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "expected a dict"),
    ({b"data": np.zeros((2, 3072), np.int64), b"labels": [0, 1]}, "uint8 \\(N, 3072\\)"),
    ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "uint8 \\(N, 3072\\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels for 2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside 0..9"),
])
def test_wrong_contents_are_rejected(tmp_path: Path, fmt, batch, what: str) -> None:
    path = tmp_path / "batch"
    path.write_bytes(fmt.py2_pickle_dumps(batch))
    with pytest.raises(DatasetError, match=what):
        read_batch(path)


def _evil_pickle(marker: Path) -> bytes:
    """A batch dict whose data is ``exec(<create marker>)``: runs code under plain pickle."""
    code = f"open({str(marker)!r}, 'w').close()"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (exec, (code,))

    return pickle.dumps({b"labels": [0], b"data": Evil()}, protocol=4)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "test_batch").write_bytes(_evil_pickle(marker))
    with pytest.raises(DatasetError, match=r"refers to builtins\.exec.*refused"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not marker.exists(), "the pickle payload ran"
    # control: the same bytes do run code under a plain unpickler
    pickle.loads((batches / "test_batch").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("subprocess", "Popen"), ("builtins", "eval"),
    ("builtins", "getattr"), ("_codecs", "encode"), ("numpy", "load"), ("numpy", "frombuffer"),
    ("numpy.core.multiarray", "scalar"), ("numpy.testing._private.utils", "runstring"),
    ("torch", "load"),
])
def test_only_array_reconstruction_globals_are_allowed(tmp_path: Path, module: str,
                                                       name: str) -> None:
    raw = f"c{module}\n{name}\n(S'x'\ntR.".encode()
    path = tmp_path / "batch"
    path.write_bytes(raw)
    with pytest.raises(DatasetError, match=f"refers to {module}.{name}"):
        read_batch(path)


def test_unpickler_allows_exactly_the_array_globals() -> None:
    import io

    unpickler = BatchUnpickler(io.BytesIO(b""), encoding="bytes")
    assert unpickler.find_class("numpy", "ndarray") is np.ndarray
    assert unpickler.find_class("numpy", "dtype") is np.dtype
    assert unpickler.find_class("numpy.core.multiarray", "_reconstruct") is \
        unpickler.find_class("numpy._core.multiarray", "_reconstruct")
    with pytest.raises(pickle.UnpicklingError):
        unpickler.find_class("numpy", "array")
