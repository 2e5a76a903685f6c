"""Downloads, tested without a network: ``file://`` URLs and a fake opener serve files the tests
wrote, including corrupt and interrupted ones."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import certify.data.download as dl
from certify.data import load_dataset
from certify.data.download import Fetched, RemoteFile, download_dataset, fetch_file, md5_file
from certify.errors import DatasetError

SVHN_TRAIN_MD5 = "e26dedcc434d2e4c54c9b2d4a06d8373"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def server(tmp_path: Path, fmt, rng):  # type: ignore[no-untyped-def]
    """Official-format SVHN train/test files in a 'server' folder, and a URL table for them."""
    srv = tmp_path / "server"
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    y = np.array([[10], [1], [5], [10]], dtype=np.uint8)
    fmt.write_svhn(srv / "train_32x32.mat", x, y)
    fmt.write_svhn(srv / "test_32x32.mat", x[..., :2], y[:2])

    def table(files: dict[str, Path] | None = None) -> dict[str, tuple[RemoteFile, ...]]:
        files = files or {}
        entries = []
        for split in ("train", "test"):
            name = f"{split}_32x32.mat"
            served = files.get(name, srv / name)
            entries.append(RemoteFile(name, (served.as_uri(),), md5_file(srv / name), (split,)))
        return {**dl.RESOURCES, "svhn": tuple(entries)}

    return srv, table, x, y


def test_published_checksums_are_the_official_ones() -> None:
    md5 = {r.filename: r.md5 for rs in dl.RESOURCES.values() for r in rs}
    assert md5["train_32x32.mat"] == SVHN_TRAIN_MD5
    assert md5["test_32x32.mat"] == "eb5a983be6a315427106f1b164d9cef3"
    assert md5["extra_32x32.mat"] == "a93ce644f1a588dc4d68dda5feec44a7"
    assert md5["cifar-10-python.tar.gz"] == "c58f30108f718f92721af3b95e74349a"
    assert md5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert md5["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    for remote in (r for rs in dl.RESOURCES.values() for r in rs):
        assert remote.urls and all(u.startswith(("http://", "https://")) for u in remote.urls)
        assert all(u.endswith(remote.filename) for u in remote.urls)


def test_download_verifies_and_loads(tmp_path: Path, server, monkeypatch) -> None:
    srv, table, x, y = server
    monkeypatch.setattr(dl, "RESOURCES", table())
    root = tmp_path / "data"
    fetched = download_dataset("svhn", root, quiet=True)
    assert fetched == (Fetched(root / "svhn" / "train_32x32.mat", "downloaded"),
                       Fetched(root / "svhn" / "test_32x32.mat", "downloaded"))
    got = (root / "svhn" / "train_32x32.mat").read_bytes()
    assert got == (srv / "train_32x32.mat").read_bytes()
    assert _leftovers(root) == ["svhn", "test_32x32.mat", "train_32x32.mat"]
    ds = load_dataset("svhn", "train", root=root)
    assert torch.equal(ds.images, torch.from_numpy(np.transpose(x, (3, 2, 0, 1)).copy()))
    assert ds.labels.tolist() == [0, 1, 5, 0]
    # a second run checks instead of downloading
    again = download_dataset("svhn", root, quiet=True)
    assert [f.action for f in again] == ["verified", "verified"]


def test_load_with_download_fetches_only_the_split(tmp_path: Path, server, monkeypatch) -> None:
    _, table, _, _ = server
    monkeypatch.setattr(dl, "RESOURCES", table())
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("svhn", "test", root=root)
    ds = load_dataset("svhn", "test", root=root, download=True)
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1]
    assert _leftovers(root) == ["svhn", "test_32x32.mat"]


def test_checksum_mismatch_is_removed_with_a_clear_error(tmp_path: Path, server, fmt, rng,
                                                         monkeypatch) -> None:
    srv, table, _, _ = server
    bad = srv / "tampered.mat"
    data = bytearray((srv / "test_32x32.mat").read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(dl, "RESOURCES", table({"test_32x32.mat": bad}))
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="MD5 .* expected .*it was removed") as e:
        load_dataset("svhn", "test", root=root, download=True)
    assert md5_file(bad) in str(e.value) and "certify data download svhn" in str(e.value)
    assert _leftovers(root) == []  # no file, no temporary, no empty folder


class _Response(io.BytesIO):
    """A fake HTTP response that announces `length` bytes and may break off early."""

    def __init__(self, data: bytes, length: int, fail_with: Exception | None = None) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(length)}
        self.fail_with = fail_with

    def read(self, size: int | None = -1) -> bytes:
        block = super().read(min(size or 4096, 4096))
        if not block and self.fail_with is not None:
            raise self.fail_with
        return block


@pytest.mark.parametrize("fail_with,what", [
    (None, "stopped after 4096 of"),
    (ConnectionResetError(104, "Connection reset by peer"), "failed after 4096 bytes"),
    (TimeoutError("timed out"), "failed after 4096 bytes"),
])
def test_interrupted_download_leaves_nothing(tmp_path: Path, server, monkeypatch, fail_with,
                                             what: str) -> None:
    srv, table, _, _ = server
    full = (srv / "test_32x32.mat").read_bytes()
    monkeypatch.setattr(dl, "RESOURCES", table())
    monkeypatch.setattr(dl, "_urlopen",
                        lambda url, timeout: _Response(full[:4096], len(full), fail_with))
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match=what) as e:
        download_dataset("svhn", root, splits=["test"], quiet=True)
    assert "partial file was removed" in str(e.value)
    assert _leftovers(root) == []


def test_next_mirror_is_tried(tmp_path: Path, server) -> None:
    srv, _, _, _ = server
    good = srv / "test_32x32.mat"
    remote = RemoteFile("test_32x32.mat", ((srv / "absent.mat").as_uri(), good.as_uri()),
                        md5_file(good), ("test",))
    path = fetch_file("svhn", remote, tmp_path / "out", quiet=True)
    assert path.read_bytes() == good.read_bytes()
    remote = RemoteFile("x.mat", ((srv / "absent.mat").as_uri(), "file:///nonexistent/y.mat"),
                        "0" * 32, ("test",))
    with pytest.raises(DatasetError, match="absent.mat.*nonexistent/y.mat"):
        fetch_file("svhn", remote, tmp_path / "out", quiet=True)


def test_corrupt_existing_file_is_replaced_only_after_verification(tmp_path: Path, server,
                                                                   monkeypatch) -> None:
    srv, table, _, _ = server
    monkeypatch.setattr(dl, "RESOURCES", table())
    root = tmp_path / "data"
    (root / "svhn").mkdir(parents=True)
    (root / "svhn" / "test_32x32.mat").write_bytes(b"half a file")
    fetched = download_dataset("svhn", root, splits=["test"], quiet=True)
    assert fetched == (Fetched(root / "svhn" / "test_32x32.mat", "replaced"),)
    assert md5_file(root / "svhn" / "test_32x32.mat") == md5_file(srv / "test_32x32.mat")


def test_cifar_tarball_is_downloaded_and_extracted(tmp_path: Path, fmt, rng, monkeypatch) -> None:
    srv = tmp_path / "server"
    srv.mkdir()
    files = fmt.write_cifar_tarball(srv, rng, n=2)
    tarball = srv / "cifar-10-python.tar.gz"
    remote = RemoteFile(tarball.name, (tarball.as_uri(),), md5_file(tarball), ("train", "test"),
                        dl.RESOURCES["cifar10"][0].members)
    monkeypatch.setattr(dl, "RESOURCES", {**dl.RESOURCES, "cifar10": (remote,)})
    root = tmp_path / "data"
    assert download_dataset("cifar10", root, quiet=True)[0].action == "downloaded"
    assert (root / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    ds = load_dataset("cifar10", "train", root=root)
    assert torch.equal(ds.images.reshape(-1, 3072), torch.from_numpy(files.data["train"]))


def test_mnist_present_uncompressed_is_not_downloaded(tmp_path: Path, fmt, rng,
                                                      monkeypatch) -> None:
    monkeypatch.setattr(dl, "_urlopen", lambda url, timeout: pytest.fail(f"fetched {url}"))
    images = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    fmt.write_mnist(tmp_path / "mnist", "test", images, np.array([3, 4]), gz=False)
    fetched = download_dataset("mnist", tmp_path, splits=["test"], quiet=True)
    assert [f.action for f in fetched] == ["not needed", "not needed"]


def test_bad_names_and_splits(tmp_path: Path) -> None:
    from certify.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean 'svhn'"):
        download_dataset("svhm", tmp_path)
    with pytest.raises(DatasetError, match="no split 'extra'"):
        download_dataset("cifar10", tmp_path, splits=["extra"])
    assert download_dataset("digits", tmp_path) == ()
