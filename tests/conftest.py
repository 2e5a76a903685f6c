"""Shared fixtures: seeded tiny networks and checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from certify.checkpoint import ModelMeta, save_checkpoint
from certify.nets import create_arch

# CI runs the same examples on every run (HYPOTHESIS_PROFILE=ci, set by .ci/run), so a
# submission's result does not hang on which examples were drawn; local runs draw fresh ones
# and keep the failures they find in .hypothesis/ to replay first.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SOUND_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_meta(
    arch: str,
    model: torch.nn.Module,
    dataset: str = "digits",
    input_shape: tuple[int, int, int] = (1, 8, 8),
    num_classes: int = 10,
) -> ModelMeta:
    from certify.nets import arch_kwargs_of, parse_arch

    base, _ = parse_arch(arch)
    norm = model.norm
    return ModelMeta(
        base,
        arch_kwargs_of(model),
        dataset,
        input_shape,
        num_classes,
        tuple(norm.mean.flatten().tolist()),
        tuple(norm.std.flatten().tolist()),
    )


@pytest.fixture
def tiny_mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return create_arch("mlp-16-12", (1, 4, 4), 3, mean=[0.4], std=[0.3]).eval()


@pytest.fixture
def tiny_cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return create_arch("scn-4-6", (1, 8, 8), 10, mean=[0.3], std=[0.4], hidden=[12]).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_cnn):  # type: ignore[no-untyped-def]
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, tiny_cnn, make_meta("scn", tiny_cnn))
    return path
