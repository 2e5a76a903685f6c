from __future__ import annotations

import pytest
import torch
from torch import nn

from certify.errors import SpecError, UnknownNameError
from certify.nets import (
    Normalize,
    arch_kwargs_of,
    count_parameters,
    create_arch,
    list_archs,
    parse_arch,
)

SHAPES = [(1, 8, 8), (3, 32, 32), (1, 28, 28)]


@pytest.mark.parametrize(
    "name", ["mlp", "wk-small", "wk-large", "svhn-teacher", "cifar-teacher", "scn-32-32"]
)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_arch_builds_and_runs(name: str, shape: tuple[int, int, int]) -> None:
    model = create_arch(name, shape, 10).eval()
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert isinstance(next(iter(model.children())), Normalize), (
        "models take [0,1] pixels: Normalize first"
    )


def test_registry_lists_the_zoo() -> None:
    assert {"mlp", "wk-small", "wk-large", "svhn-teacher", "cifar-teacher", "scn"} <= set(
        list_archs()
    )


def test_width_names_parse_into_kwargs() -> None:
    assert parse_arch("scn-64-128") == ("scn", {"channels": [64, 128]})
    assert parse_arch("mlp-200-100") == ("mlp", {"hidden": [200, 100]})
    assert parse_arch("wk-small") == ("wk-small", {})


def test_unknown_arch_suggests_close_name() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'wk-small'"):
        create_arch("wk_small", (1, 8, 8), 10)


def test_thesis_parameter_counts_on_svhn_shape() -> None:
    # Table 8.7: SCN-32-32 has ~220k parameters, SCN-64-128 ~850k on 32x32x3 inputs.
    assert 200_000 < count_parameters(create_arch("scn-32-32", (3, 32, 32), 10)) < 240_000
    assert 800_000 < count_parameters(create_arch("scn-64-128", (3, 32, 32), 10)) < 1_000_000


def test_parameter_count_matches_manual_formula() -> None:
    model = create_arch("mlp-7-5", (1, 4, 4), 3)
    assert count_parameters(model) == (16 * 7 + 7) + (7 * 5 + 5) + (5 * 3 + 3)


def test_widths_read_back_rebuild_the_same_shapes() -> None:
    model = create_arch("svhn-teacher", (3, 32, 32), 10, channels=[8, 9, 10, 11], hidden=[13])
    kwargs = arch_kwargs_of(model)
    assert kwargs == {"channels": [8, 9, 10, 11], "hidden": [13]}
    again = create_arch("svhn-teacher", (3, 32, 32), 10, **kwargs)
    assert [p.shape for p in model.state_dict().values()] == [
        p.shape for p in again.state_dict().values()
    ]


def test_normalize_is_per_channel_affine() -> None:
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    x = torch.rand(4, 3, 5, 5)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("bad", [{"channels": [0, 4]}, {"hidden": [-1]}])
def test_bad_widths_are_clear_errors(bad: dict) -> None:
    with pytest.raises(SpecError, match="width"):
        create_arch("scn", (1, 8, 8), 10, **bad)


def test_too_small_input_is_a_clear_error() -> None:
    with pytest.raises(SpecError, match="too small"):
        create_arch("cifar-teacher", (3, 2, 2), 10, channels=[4] * 6)


def test_normalization_channel_mismatch() -> None:
    with pytest.raises(SpecError, match="channels"):
        create_arch("mlp", (3, 8, 8), 10, mean=[0.5], std=[0.2])


def test_models_are_flat_sequentials_of_named_layers() -> None:
    model = create_arch("wk-small", (1, 8, 8), 10)
    names = [n for n, _ in model.named_children()]
    assert names == [
        "norm",
        "conv1",
        "relu1",
        "conv2",
        "relu2",
        "flatten",
        "fc1",
        "relu_fc1",
        "out",
    ]
    assert all(not isinstance(m, nn.Sequential) for m in model.children())
