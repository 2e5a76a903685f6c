"""The zoo's ResNet (``resnet-A-B``, ``resnet-2b``): registry, the CLI (train, robust training,
``certify area``) and its ONNX export re-imported as a graph (same logits, same radii)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from certify.bounds import to_network
from certify.checkpoint import load_checkpoint
from certify.cli import main
from certify.errors import SpecError
from certify.nets import create_arch, list_archs, parse_arch


def run(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(autouse=True, scope="module")
def single_thread():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_names_and_widths():  # type: ignore[no-untyped-def]
    assert {"resnet", "resnet-2b"} <= set(list_archs())
    assert parse_arch("resnet-4-6") == ("resnet", {"channels": [4, 6]})
    model = create_arch("resnet-2b", (3, 32, 32), 10)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)][:2] == [8, 8]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(SpecError, match="two widths"):
        create_arch("resnet-4-6-8", (1, 8, 8), 10)
    with pytest.raises(SpecError, match="too small"):
        create_arch("resnet-2b", (1, 2, 2), 10)


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):  # type: ignore[no-untyped-def]
    """``certify train --arch resnet-4-6`` on digits, ten epochs."""
    out = tmp_path_factory.mktemp("resnet") / "resnet.pt"
    result = run("train", "--dataset", "digits", "--arch", "resnet-4-6", "--epochs", "10",
                 "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_trained_checkpoint_is_a_dag_network(resnet_ckpt):  # type: ignore[no-untyped-def]
    model, meta = load_checkpoint(resnet_ckpt)
    assert meta.arch in ("resnet", "resnet-4-6")
    net = to_network(model, meta.input_shape)
    assert not net.is_chain
    assert sum(len(s) > 1 for s in net.inputs) == 2


def test_area_on_a_resnet_checkpoint(resnet_ckpt, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    result = run("area", resnet_ckpt, "--dataset", "digits", "--n", "8", "--method", "crown",
                 "--method", "ibp", "-o", out, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "complete" and data["n_done"] == 8
    crown, ibp = data["summary"]["crown"], data["summary"]["ibp"]
    assert crown["clean_accuracy"] > 0.5
    assert crown["certification_area"] > 0
    assert crown["certification_area"] >= ibp["certification_area"] * 0.5


def test_robust_training_runs_on_a_resnet(tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "robust.pt"
    result = run("train", "--dataset", "digits", "--arch", "resnet-4-6", "--robust",
                 "crown-ibp", "--eps", "0.02", "--epochs", "1", "--eval-samples", "16", "-o",
                 out)
    assert result.exit_code == 0, result.output
    assert "certified (crown-ibp)" in result.stdout
    _, meta = load_checkpoint(out)
    assert meta.training["method"] == "crown-ibp"


def test_onnx_export_reimports_with_the_same_logits_and_radii(resnet_ckpt, tmp_path):  # type: ignore[no-untyped-def]
    ort = pytest.importorskip("onnxruntime")
    from certify.data import load_dataset
    from certify.onnx_import import import_onnx
    from certify.radius import certified_radii

    model, meta = load_checkpoint(resnet_ckpt)
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(model, (torch.rand(1, *meta.input_shape),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    imported, imeta = import_onnx(path)
    assert imeta.input_shape == meta.input_shape and imeta.num_classes == 10
    x, y = load_dataset("digits", "test").take(slice(0, 12))
    with torch.no_grad():
        theirs = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
        ours, ref = imported(x).numpy(), model(x).numpy()
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(ours - ref).max() < 1e-5
    assert not to_network(imported, meta.input_shape).is_chain
    tol = 1e-4
    a = certified_radii(model, x, y, "crown", tol=tol).certified_eps
    b = certified_radii(imported, x, y, "crown", tol=tol).certified_eps
    assert (a > 0).sum() >= 6
    assert torch.allclose(a, b, atol=2 * tol), (a, b)
