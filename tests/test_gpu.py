"""The CUDA paths: bounds, radii, attacks, training and ``certify area --device cuda``.

Every test here is marked ``gpu``; tests/conftest.py skips them, saying why, on a machine
without a CUDA device. On a GPU each one checks the CUDA result against the CPU one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from certify.data import load_dataset
from certify.nets import create_arch

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return create_arch("scn-4-8", (1, 8, 8), 10, mean=[0.3], std=[0.4], hidden=[16]).eval()


def _points(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return load_dataset("digits", "test").take(slice(0, n))


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown"])
def test_bounds_on_cuda_match_the_cpu(method: str) -> None:
    from certify import margin_bounds

    model = _model().double()
    x, y = _points()
    x = x.double()
    cpu = margin_bounds(model, x, y, 0.02, method)
    gpu = margin_bounds(model.to(CUDA), x.to(CUDA), y.to(CUDA), 0.02, method)
    assert gpu.lower.device.type == "cuda"
    torch.testing.assert_close(gpu.lower.cpu(), cpu.lower, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu.upper.cpu(), cpu.upper, rtol=1e-9, atol=1e-9)


def test_radii_on_cuda_are_sound_and_match_the_cpu() -> None:
    from certify import certified_radii
    from certify.attacks import pgd

    model = _model().double()
    x, y = _points()
    x = x.double()
    cpu = certified_radii(model, x, y, "crown", eps_max=0.3, tol=1e-4)
    gpu = certified_radii(model.to(CUDA), x.to(CUDA), y.to(CUDA), "crown", eps_max=0.3,
                          tol=1e-4)
    torch.testing.assert_close(gpu.certified_eps.cpu(), cpu.certified_eps, atol=1e-6, rtol=0)
    eps = gpu.certified_eps.to(CUDA)
    attack = pgd(model, (x.to(CUDA), eps), y.to(CUDA), steps=50,
                 generator=torch.Generator(device=CUDA).manual_seed(0))
    assert not bool(attack.success[eps > 0].any()), "PGD broke a point inside its certified ball"


def test_training_on_cuda(tmp_path: Path) -> None:
    from certify.checkpoint import load_checkpoint
    from certify.train.loops import TrainConfig
    from certify.train.standard import train_standard

    trained = train_standard("scn-4-8", "digits", TrainConfig(epochs=1, device="cuda"),
                             output=tmp_path / "m.pt", quiet=True)
    assert trained.meta.metrics["test_accuracy"] > 0.3
    model, _ = load_checkpoint(tmp_path / "m.pt")
    assert next(model.parameters()).device.type == "cpu"   # checkpoints load on the CPU


def test_area_cli_on_cuda(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import json

    from tests.cli.cli_helpers import run

    r = run("area", tiny_checkpoint, "--dataset", "digits", "--n", 6, "--device", "cuda",
            "--tol", "1e-3", "-o", tmp_path / "run", "--json", "-q")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["n_done"] == 6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["settings"]["device"] \
        .startswith("cuda")
