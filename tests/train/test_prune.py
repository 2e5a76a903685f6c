"""L1 filter pruning: exactness against zeroed filters, real shrinking, provenance, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify._io import sha256_file
from certify.checkpoint import ModelMeta, build_model, load_checkpoint, save_checkpoint
from certify.data import load_dataset
from certify.errors import SpecError, UnknownNameError
from certify.nets import arch_kwargs_of, count_parameters, create_arch
from certify.train.loops import TrainConfig, evaluate
from certify.train.prune import (
    conv_layer_names,
    conv_parameters,
    filter_l1_norms,
    kept_filters,
    l1_filter_ranking,
    prune_checkpoint,
    prune_filters,
    resolve_ratios,
    sensitivity_scan,
)

N_CONVS = {"scn": 2, "wk-small": 2, "svhn-teacher": 4}


@st.composite
def random_models(draw):  # type: ignore[no-untyped-def]
    arch = draw(st.sampled_from(sorted(N_CONVS)))
    n = N_CONVS[arch]
    channels = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    hidden = [draw(st.integers(1, 6))]
    in_c = draw(st.sampled_from([1, 3]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = create_arch(arch, (in_c, 8, 8), 4, mean=[0.4] * in_c, std=[0.3] * in_c,
                        channels=channels, hidden=hidden).double()
    for m in model.modules():       # random batch-norm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.3, 3)
            m.weight.data.uniform_(-2, 2)
            m.bias.data.uniform_(-1, 1)
    ratios = {}
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for name, conv in zip(conv_layer_names(model), convs, strict=True):
        r = draw(st.floats(0.0, 0.95))
        if draw(st.booleans()) and int(r * conv.out_channels + 0.5) < conv.out_channels:
            ratios[name] = r
    return arch, in_c, model.eval(), ratios


def zero_filters(model: nn.Sequential, kept: dict[str, torch.Tensor]) -> nn.Sequential:
    """The original model with the removed filters' channels set to zero."""
    zeroed = copy.deepcopy(model)
    layers = list(zeroed.named_children())
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers):
            if name not in kept:
                continue
            gone = torch.ones(layer.out_channels, dtype=torch.bool)
            gone[kept[name]] = False
            layer.weight[gone] = 0
            layer.bias[gone] = 0
            nxt = layers[i + 1][1]
            if isinstance(nxt, nn.BatchNorm2d):   # BN would turn a zero channel into its bias
                nxt.weight[gone] = 0
                nxt.bias[gone] = 0
    return zeroed


@given(random_models())
@settings(max_examples=40, deadline=None)
def test_pruned_equals_zeroed_and_widths_say_the_parameter_count(case):  # type: ignore[no-untyped-def]
    arch, in_c, model, ratios = case
    kept = kept_filters(model, ratios)
    pruned = prune_filters(model, ratios)
    x = torch.rand(6, in_c, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(pruned(x), zero_filters(model, kept)(x), rtol=0, atol=1e-10)
    widths = arch_kwargs_of(pruned)
    for name, conv in zip(conv_layer_names(model), widths["channels"], strict=True):
        before = dict(model.named_children())[name].out_channels
        assert conv == (len(kept[name]) if name in kept else before)
    rebuilt = create_arch(arch, (in_c, 8, 8), 4, **widths)
    assert count_parameters(rebuilt) == count_parameters(pruned)
    rebuilt.load_state_dict(pruned.state_dict())         # strict: same layers, same shapes
    assert count_parameters(model) >= count_parameters(pruned)
    assert count_parameters(model) == count_parameters(create_arch(arch, (in_c, 8, 8), 4,
                                                                   **arch_kwargs_of(model)))


def test_model_is_left_unchanged_and_mode_kept():
    torch.manual_seed(0)
    model = create_arch("scn-6-6", (1, 8, 8), 10)
    before = copy.deepcopy(model.state_dict())
    pruned = prune_filters(model, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned.training and [n for n, _ in pruned.named_children()] == \
        [n for n, _ in model.named_children()]
    assert arch_kwargs_of(pruned)["channels"] == [3, 3]


def test_l1_ranking_weakest_first_stable_ties():
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        for f, scale in enumerate([3.0, 1.0, 2.0, -1.0]):
            conv.weight[f] = scale / 18        # 18 weights per filter: L1 norm |scale|
    assert torch.allclose(filter_l1_norms(conv), torch.tensor([3.0, 1.0, 2.0, 1.0]))
    assert l1_filter_ranking(conv).tolist() == [1, 3, 2, 0]
    model = nn.Sequential()
    model.add_module("conv1", conv)
    model.add_module("relu1", nn.ReLU())
    model.add_module("flatten", nn.Flatten())
    model.add_module("out", nn.Linear(4 * 4, 3))     # 4x4 input -> 4 channels of 2x2
    assert kept_filters(model, {"conv1": 0.5})["conv1"].tolist() == [0, 2]
    x = torch.rand(3, 2, 4, 4)
    pruned = prune_filters(model, {"conv1": 0.5})
    assert pruned.out.in_features == 8
    # channel c of a 2x2 map is features 4c..4c+3: kept channels 0 and 2
    assert torch.equal(pruned.out.weight, model.out.weight[:, [0, 1, 2, 3, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.allclose(pruned(x), zero_filters(model, {"conv1": torch.tensor([0, 2])})(x),
                              atol=1e-6)


@pytest.mark.parametrize("ratios, error, match", [
    (1.0, SpecError, r"must be in \[0, 1\), got 1.0"),
    (-0.1, SpecError, r"must be in \[0, 1\)"),
    ({"conv1": 0.9}, SpecError, "would remove all 2 filters of conv1"),
    ({"conv3": 0.5}, UnknownNameError, "unknown conv layer 'conv3'.*Available: conv1, conv2"),
    ({"fc1": 0.5}, UnknownNameError, "Available: conv1, conv2"),
])
def test_bad_ratios(ratios, error, match):  # type: ignore[no-untyped-def]
    model = create_arch("scn-2-4", (1, 8, 8), 10)
    with pytest.raises(error, match=match):
        prune_filters(model, ratios)


def test_model_without_conv_layers():
    with pytest.raises(SpecError, match="no conv layers to prune"):
        prune_filters(create_arch("mlp", (1, 8, 8), 10), 0.5)
    with pytest.raises(SpecError, match="no conv layers"):
        sensitivity_scan(create_arch("mlp", (1, 8, 8), 10), load_dataset("digits", "test"))


def test_unsupported_layer_after_a_conv():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 4, 3))
    model.add_module("pad", nn.ZeroPad2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("out", nn.Linear(4 * 8 * 8, 2))
    with pytest.raises(SpecError, match="layer pad \\(ZeroPad2d\\) follows it"):
        prune_filters(model, 0.5)
    assert resolve_ratios(model, 0.25) == {"conv1": 0.25}


def test_sensitivity_scan(digits_student):  # type: ignore[no-untyped-def]
    model, _ = load_checkpoint(digits_student.path)
    test = load_dataset("digits", "test")
    rows = sensitivity_scan(model, test, ratios=(0.0, 0.5, 0.9))
    assert [(r.layer, r.ratio) for r in rows] == [
        (layer, r) for layer in ("conv1", "conv2") for r in (0.0, 0.5, 0.9)]
    assert rows[0].drop == 0.0 and rows[0].removed == 0
    r = rows[4]
    assert r.removed == 16 and r.accuracy == evaluate(prune_filters(model, {"conv2": 0.5}), test)


def test_prune_and_finetune_student(digits_student, tmp_path):  # type: ignore[no-untyped-def]
    out = tmp_path / "pruned.pt"
    outcome = prune_checkpoint(digits_student.path, 0.5, finetune=TrainConfig(epochs=5, seed=0),
                               output=out, quiet=True)
    original, meta_before = load_checkpoint(digits_student.path)
    model, meta = load_checkpoint(out)
    before, pruned_row, tuned = outcome.rows
    assert before["test_accuracy"] == pytest.approx(digits_student.accuracy)
    assert tuned["test_accuracy"] >= before["test_accuracy"] - 0.03
    assert tuned["test_accuracy"] >= pruned_row["test_accuracy"]
    assert outcome.widths == {"conv1": (32, 16), "conv2": (32, 16)}
    assert conv_parameters(model) <= 0.55 * conv_parameters(original)
    assert tuned["parameters"] == count_parameters(model) < count_parameters(original)
    assert meta.arch_kwargs["channels"] == [16, 16] and meta.arch == meta_before.arch
    assert meta.parent == sha256_file(digits_student.path)
    t = meta.training
    assert (t["command"], t["ratios"], t["finetune_epochs"], t["seed"]) == \
        ("prune", {"conv1": 0.5, "conv2": 0.5}, 5, 0)
    assert t["parent_training"]["method"] == "hinton"
    x, _ = load_dataset("digits", "test").take(torch.arange(40))
    with torch.no_grad():
        assert torch.equal(model(x), outcome.model(x))
    payload = torch.load(out, weights_only=True)
    rebuilt = build_model(meta)
    rebuilt.load_state_dict(payload["state_dict"])
    assert not tmp_path.joinpath("pruned.pt.partial").exists()


def test_prune_without_finetune_equals_prune_filters(digits_student):  # type: ignore[no-untyped-def]
    outcome = prune_checkpoint(digits_student.path, {"conv2": 0.25}, quiet=True)
    original, _ = load_checkpoint(digits_student.path)
    direct = prune_filters(original, {"conv2": 0.25})
    assert all(torch.equal(a, b) for a, b in zip(outcome.model.state_dict().values(),
                                                 direct.state_dict().values(), strict=True))
    assert len(outcome.rows) == 2 and outcome.result is None
    assert outcome.meta.training["ratios"] == {"conv2": 0.25}


def test_finetune_by_distilling_from_parent(tmp_path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = create_arch("scn-4-4", (1, 8, 8), 10)
    src = tmp_path / "m.pt"
    save_checkpoint(src, model, ModelMeta("scn", arch_kwargs_of(model), "digits", (1, 8, 8), 10,
                                          (0.0,), (1.0,)))
    outcome = prune_checkpoint(src, 0.5, finetune=TrainConfig(epochs=1), distill_from_parent=True,
                               temperature=3.0, alpha=0.5, output=tmp_path / "p.pt", quiet=True)
    t = outcome.meta.training
    assert (t["distill_from_parent"], t["temperature"], t["alpha"]) == (True, 3.0, 0.5)
    with pytest.raises(SpecError, match="needs fine-tuning"):
        prune_checkpoint(src, 0.5, distill_from_parent=True, quiet=True)
