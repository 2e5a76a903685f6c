"""Conversion to the engine's Network, and the method registry."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from bound_helpers import make_cnn, make_mlp
from torch import nn

from certify.bounds import (
    BoundMethod,
    Network,
    compute_bounds,
    get_method,
    list_methods,
    register_method,
    to_network,
)
from certify.bounds.layers import ConvOp, ReluOp, ScaleShiftOp, rows_of
from certify.nets import Normalize, create_arch


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_network_computes_the_eval_model(variant):  # type: ignore[no-untyped-def]
    model, in_shape = make_cnn(3, variant)
    x = torch.rand(5, *in_shape, generator=torch.Generator().manual_seed(0))
    net = to_network(model, in_shape)
    with torch.no_grad():
        want = model(x)
        model.train()  # the engine bounds the eval-mode function whatever the mode
        torch.testing.assert_close(net.forward(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(to_network(model, in_shape)(x), want, atol=1e-5, rtol=1e-5)
    assert model.training  # conversion does not change the model's mode


def test_zoo_architectures_convert(tiny_cnn):  # type: ignore[no-untyped-def]
    for arch, shape in [("svhn-teacher", (3, 16, 16)), ("wk-large", (3, 16, 16)),
                        ("mlp-20-10", (1, 8, 8))]:
        model = create_arch(arch, shape, 10, mean=[0.4] * shape[0], std=[0.2] * shape[0]).eval()
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        x = torch.rand(2, *shape)
        with torch.no_grad():
            torch.testing.assert_close(to_network(model, shape)(x), model(x), atol=1e-5,
                                       rtol=1e-4)


def test_batch_norm_is_folded_and_normalize_is_not():  # type: ignore[no-untyped-def]
    model, in_shape = make_cnn(0, 0)
    net = to_network(model, in_shape)
    assert isinstance(net.layers[0], ScaleShiftOp) and net.names[0] == "norm"
    assert isinstance(net.layers[1], ConvOp) and net.names[1] == "conv1+bn1"
    assert "block.conv2" in net.names  # nested Sequential flattened, dotted names
    assert "Dropout" not in repr(net) and "pool" in " ".join(net.names)
    assert net.relu_positions == tuple(i for i, op in enumerate(net.layers)
                                       if isinstance(op, ReluOp))


def test_network_keeps_references_to_the_weights():  # type: ignore[no-untyped-def]
    model = make_mlp(0, [3])
    net = to_network(model, (1, 4, 4))
    assert net.layers[2].weight is model.fc0.weight
    assert to_network(net, (1, 4, 4)) is net
    assert net.to(dtype=torch.float32, device="cpu") is net
    net64 = net.to(dtype=torch.float64, device="cpu")
    assert net64.layers[2].weight.dtype == torch.float64
    assert isinstance(net64, Network)


def test_single_layer_and_dropout_only_models():  # type: ignore[no-untyped-def]
    x = torch.rand(2, 6)
    b = compute_bounds(nn.Linear(6, 2), x - 0.1, x + 0.1, "crown")
    assert b.lower.shape == (2, 2)
    b = compute_bounds(nn.Sequential(nn.Dropout(), nn.Identity()), x, x + 0.1, "ibp")
    torch.testing.assert_close(b.lower, x) and torch.testing.assert_close(b.upper, x + 0.1)


def test_list_methods_order_and_instances():  # type: ignore[no-untyped-def]
    assert list_methods()[:6] == ["ibp", "crown", "crown-ibp", "wong-kolter", "alpha-crown",
                                  "lp"]
    for name in list_methods(external=False):
        method = get_method(name)
        assert method.name == name and isinstance(method, BoundMethod)
    assert get_method("alpha-crown", steps=5).steps == 5
    assert get_method("crown") == get_method("crown")  # frozen value objects


def test_register_method_rejects_duplicates_and_non_dataclasses():  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="registered twice"):
        register_method("crown")(type("X", (), {}))
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_method("not-a-dataclass-method")(type("Y", (), {}))


def test_method_called_on_a_region(tiny_mlp):  # type: ignore[no-untyped-def]
    from certify.spec import LinfBall

    x = torch.rand(2, 1, 4, 4)
    region = LinfBall(x, 0.05)
    got = get_method("crown")(to_network(tiny_mlp, (1, 4, 4)), region)
    want = compute_bounds(tiny_mlp, *region.box(), "crown")
    torch.testing.assert_close(got.lower, want.lower)


def test_normalize_with_negative_batch_norm_scale_intervals():  # type: ignore[no-untyped-def]
    bn = nn.BatchNorm2d(2).eval()
    bn.weight.data = torch.tensor([-2.0, 0.5])
    model = nn.Sequential(OrderedDict(norm=Normalize([0.5, 0.5], [0.5, 0.25]), bn=bn))
    x_lo, x_hi = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    b = compute_bounds(model, x_lo, x_hi, "ibp", rigorous=False)
    with torch.no_grad():
        ends = torch.stack([model(x_lo), model(x_hi)])
    torch.testing.assert_close(b.lower, ends.min(0).values)
    torch.testing.assert_close(b.upper, ends.max(0).values)
    # rigorous: outward by at most the stated rounding-error terms, never inward
    r = compute_bounds(model, x_lo, x_hi, "ibp")
    assert (r.lower <= b.lower).all() and (r.upper >= b.upper).all()
    torch.testing.assert_close(r.lower, b.lower, atol=1e-4, rtol=0)


def test_rows_of_shares_the_tensor_only_for_consecutive_rows_in_order():  # type: ignore[no-untyped-def]
    t = torch.arange(15.0).reshape(5, 3)
    assert rows_of(t, torch.arange(5)) is t  # a whole batch's pass: no copy
    for first, b in ((0, 3), (1, 3), (2, 3), (4, 1)):  # one block of a batch: a view
        out = rows_of(t, torch.arange(first, first + b))
        assert out.data_ptr() == t[first].data_ptr() and out.shape == (b, 3)
        assert torch.equal(out, t[first:first + b])
    for samples in (torch.tensor([0, 1, 3, 2]), torch.tensor([0, 2, 3]),
                    torch.tensor([0, 1, 2, 3, 3]), torch.tensor([2, 2, 2, 2]),
                    torch.tensor([1, 0]), torch.tensor([0, 1, 2, 3, 4, 0])):
        out = rows_of(t, samples)  # a copy
        assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert torch.equal(out, t[samples])
    assert rows_of(t[:0], torch.arange(0)).shape == (0, 3)
