from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import certify.data.download as dl
from certify.cli import main
from certify.data.download import RemoteFile, md5_file


@pytest.mark.parametrize("args", [["data"], ["data", "list"], ["data", "download"]])
def test_help(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_list_shows_shapes_classes_and_present_files(tmp_path: Path, fmt, rng) -> None:
    x = rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    svhn_test = fmt.write_svhn(tmp_path / "svhn" / "test_32x32.mat", x, np.array([[1], [10]]))
    fmt.write_cifar_folder(tmp_path, rng, n=1)
    result = CliRunner().invoke(main, ["data", "list", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(ln.startswith("svhn") and "(3, 32, 32)" in ln and "10" in ln for ln in lines)
    assert any(ln.split()[:2] == ["test", str(svhn_test)] for ln in lines)
    assert any("train" in ln and "data_batch_1" in ln and "(5 files)" in ln for ln in lines)
    assert any(ln.startswith("mnist") and "(1, 28, 28)" in ln and "missing" in ln for ln in lines)
    assert any("bundled with scikit-learn" in ln for ln in lines)

    result = CliRunner().invoke(main, ["data", "list", "--data-dir", str(tmp_path), "--json"])
    rows = {(r["dataset"], r["split"]): r for r in json.loads(result.output)["datasets"]}
    assert rows["svhn", "test"]["present"] and rows["svhn", "test"]["files"] == [str(svhn_test)]
    assert not rows["svhn", "train"]["present"] and rows["svhn", "train"]["files"] == []
    assert rows["cifar10", "test"]["input_shape"] == [3, 32, 32]
    assert rows["digits", "train"]["present"] and rows["mnist", "test"]["classes"] == 10


def test_list_reads_env_var(tmp_path: Path, fmt, rng) -> None:
    fmt.write_mnist(tmp_path, "test", np.zeros((1, 28, 28), np.uint8), np.array([0]), gz=True)
    result = CliRunner().invoke(main, ["data", "list", "--json"],
                                env={"CERTIFY_DATA": str(tmp_path)})
    rows = {(r["dataset"], r["split"]): r for r in json.loads(result.output)["datasets"]}
    assert rows["mnist", "test"]["present"] and not rows["mnist", "train"]["present"]


@pytest.fixture
def mnist_server(tmp_path: Path, fmt, rng, monkeypatch):  # type: ignore[no-untyped-def]
    srv = tmp_path / "server"
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    paths = fmt.write_mnist(srv, "test", images, np.array([7, 0, 2]), gz=True)
    table = tuple(RemoteFile(p.name, (p.as_uri(),), md5_file(p), ("test",)) for p in paths)
    monkeypatch.setattr(dl, "RESOURCES", {**dl.RESOURCES, "mnist": table})
    return paths


def test_download_command(tmp_path: Path, mnist_server) -> None:
    root = tmp_path / "data"
    args = ["data", "download", "mnist", "--data-dir", str(root), "--split", "test", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("downloaded") == 2
    assert (root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes() == \
        mnist_server[0].read_bytes()
    result = CliRunner().invoke(main, args)
    assert result.output.count("verified") == 2
    from certify.data import load_dataset

    assert load_dataset("mnist", "test", root=root).labels.tolist() == [7, 0, 2]


def test_download_command_corrupt_source_is_one_line_error(tmp_path: Path, mnist_server) -> None:
    mnist_server[1].write_bytes(b"tampered")
    root = tmp_path / "data"
    result = CliRunner().invoke(main, ["data", "download", "mnist", "--data-dir", str(root),
                                       "--split", "test", "-q"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "MD5" in lines[0] and "Traceback" not in result.output
    assert not (root / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not any(p.name.endswith(".part") for p in root.rglob("*"))


def test_download_bundled_and_bad_input(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["data", "download", "digits"])
    assert result.exit_code == 0 and "nothing to download" in result.output
    result = CliRunner().invoke(main, ["data", "download", "cifar10", "--split", "extra",
                                       "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no split 'extra'" in result.output
    result = CliRunner().invoke(main, ["data", "download", "imagenet"])
    assert result.exit_code == 2


def test_a_newly_registered_dataset_is_a_cli_choice(monkeypatch):  # type: ignore[no-untyped-def]
    """The CLI's dataset choices come from the registry: nothing else to update."""
    from certify.cli.options import DATASET_NAMES
    from certify.data import DATASETS, DatasetInfo

    info = DatasetInfo("twin", 10, (1, 8, 8), (0.3,), (0.4,), ("train", "test"), title="Twin")
    monkeypatch.setitem(DATASETS, "twin", info)
    assert "twin" in DATASET_NAMES
    result = CliRunner().invoke(main, ["data", "download", "twin"])
    assert result.exit_code == 0 and "nothing to download" in result.output
    assert list(DATASET_NAMES)[:4] == ["svhn", "cifar10", "mnist", "digits"]
