"""The auto-lirpa backend: soundness, exact normalization, layers the native engine lacks, and
leaving the model as it was. Skipped where auto_LiRPA is not installed."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from engine_helpers import (
    init_weights,
    make_ball,
    make_cnn,
    make_mlp,
    reachable_points,
    spec_values,
)
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # its import warns about torch.jit
    pytest.importorskip("auto_LiRPA",
                        reason="auto_LiRPA not installed: backend tests need it (see README)")

from certify.bounds import (  # noqa: E402
    get_method,
    margin_bounds,
)
from certify.bounds.auto_lirpa import (  # noqa: E402
    auto_lirpa_bounds,
    auto_lirpa_margin_bounds,
    engine_info,
    list_auto_lirpa_methods,
)
from certify.errors import SpecError, UnknownNameError  # noqa: E402
from certify.nets import Normalize  # noqa: E402
from certify.spec import LinfBall, margin_spec  # noqa: E402

METHODS = list_auto_lirpa_methods()
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# alpha-CROWN is sound at every iterate; a few steps keep these tests fast.
FEW = {"alpha_steps": 3}


def _options(method: str) -> dict[str, int]:
    return FEW if method == "alpha-crown" else {}


def _assert_sound(model: nn.Module, ball: LinfBall, method: str, **options) -> None:
    y = model(ball.center).argmax(1)
    spec = margin_spec(y, model(ball.center).shape[1]).to(ball.center.dtype)
    x_lo, x_hi = ball.box()
    b = auto_lirpa_bounds(model, x_lo, x_hi, method, spec, **options)
    values = spec_values(model, reachable_points(model, ball, spec), spec)
    atol = ATOL[ball.center.dtype]
    assert (values >= b.lower - atol).all(), f"{method}: lower bound above a reachable margin"
    assert (values <= b.upper + atol).all(), f"{method}: upper bound below a reachable margin"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounds_contain_reachable_margins(method: str, dtype: torch.dtype) -> None:
    for model, shape in [(make_mlp(1, [8, 6]), (1, 4, 4)),
                         (make_cnn(2, batch_norm=True, pool=True), (2, 7, 7))]:
        model = model.to(dtype)
        _assert_sound(model, make_ball(3, 3, shape, 0.15, dtype), method, **_options(method))


def _maxpool_net() -> nn.Sequential:
    gen = torch.Generator().manual_seed(5)
    return init_weights(nn.Sequential(OrderedDict(
        norm=Normalize([0.5], [0.25]), conv1=nn.Conv2d(1, 3, 3, padding=1), relu1=nn.ReLU(),
        pool=nn.MaxPool2d(2), flatten=nn.Flatten(), out=nn.Linear(3 * 3 * 3, 4))), gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_maxpool_model_gets_sound_bounds(dtype: torch.dtype) -> None:
    model = _maxpool_net().to(dtype)
    ball = make_ball(6, 2, (1, 6, 6), 0.1, dtype)
    for method in METHODS:
        if method == "alpha-crown" and dtype == torch.float64:
            with pytest.raises(SpecError, match="MaxPool slopes in float32"):
                auto_lirpa_bounds(model, *ball.box(), method, **FEW)
            continue
        _assert_sound(model, ball, method, **_options(method))


class _Residual(nn.Module):
    """Normalize, conv, then a residual block ``h + conv(relu(conv(h)))``: not a Sequential, so
    the Normalize stays inside the graph (bounded in auto_LiRPA's matrix mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalize([0.3, 0.6], [0.4, 0.2])
        self.stem = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(self.norm(x)))
        h = torch.relu(h + self.b(torch.relu(self.a(h))))
        return self.head(h.flatten(1))


def test_residual_model_gets_sound_bounds() -> None:
    model = init_weights(_Residual(), torch.Generator().manual_seed(7)).double()
    ball = make_ball(8, 2, (2, 6, 6), 0.08)
    for method in METHODS:
        _assert_sound(model, ball, method, **_options(method))


@pytest.mark.parametrize("method", METHODS)
def test_zero_width_box_gives_the_forward_pass(method: str) -> None:
    model = make_cnn(9, batch_norm=True).double()
    x = make_ball(10, 2, (2, 7, 7), 0.0).center
    b = auto_lirpa_bounds(model, x, x, method, **_options(method))
    out = model(x)
    torch.testing.assert_close(b.lower, out, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.upper, out, atol=1e-10, rtol=0)


def test_normalization_is_exact() -> None:
    """A leading Normalize gives the bounds of the same function with the normalization folded
    into the first linear layer (an exact fold for an MLP): the pixel box is mapped exactly."""
    model = make_mlp(11, [7, 5], in_shape=(2, 3, 3)).double()
    folded = copy.deepcopy(model)
    norm, fc1 = folded.norm, folded.fc1
    scale = (1 / norm.std).expand(2, 3, 3).flatten()
    shift = (norm.mean / norm.std).expand(2, 3, 3).flatten()
    with torch.no_grad():
        fc1.bias.sub_(fc1.weight @ shift)
        fc1.weight.mul_(scale)
    folded.norm = nn.Identity()
    ball = make_ball(12, 3, (2, 3, 3), 0.2)
    for method in ["ibp", "crown"]:
        a = auto_lirpa_bounds(model, *ball.box(), method)
        b = auto_lirpa_bounds(folded, *ball.box(), method)
        torch.testing.assert_close(a.lower, b.lower, atol=1e-9, rtol=0)
        torch.testing.assert_close(a.upper, b.upper, atol=1e-9, rtol=0)


def test_model_is_left_as_it_was() -> None:
    """Building the graph traces the model (which would update BatchNorm statistics) and
    auto_LiRPA toggles requires_grad by mode: the backend restores all of it."""
    model = make_cnn(13, batch_norm=True).train()
    model.conv1.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    ball = make_ball(14, 2, (2, 7, 7), 0.05, torch.float32)
    for method in METHODS:
        auto_lirpa_margin_bounds(model, ball.center, torch.tensor([0, 1]), ball.eps, method,
                                 **_options(method))
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_cached_graph_follows_weight_and_buffer_updates() -> None:
    model = make_cnn(15, batch_norm=True).double()
    ball = make_ball(16, 2, (2, 7, 7), 0.05)
    auto_lirpa_bounds(model, *ball.box(), "crown")  # builds and caches the graph
    with torch.no_grad():
        model.out.weight.mul_(-2.0)
        model.bn1.running_mean.add_(0.5)
    got = auto_lirpa_bounds(model, *ball.box(), "crown")
    fresh = auto_lirpa_bounds(copy.deepcopy(model), *ball.box(), "crown")
    torch.testing.assert_close(got.lower, fresh.lower, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.upper, fresh.upper, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
def test_bounds_are_differentiable_in_the_weights(method: str) -> None:
    model = make_mlp(17, [6])
    ball = make_ball(18, 2, (1, 4, 4), 0.1, torch.float32)
    b = auto_lirpa_margin_bounds(model, ball.center, torch.tensor([0, 2]), ball.eps, method)
    b.lower.sum().backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0


def test_alpha_crown_float64_is_no_looser_than_crown() -> None:
    """float64 throughout (auto_LiRPA itself would cast its best bound to float32)."""
    model = make_cnn(19).double()
    ball = make_ball(20, 2, (2, 7, 7), 0.1)
    y = model(ball.center).argmax(1)
    crown = auto_lirpa_margin_bounds(model, ball.center, y, ball.eps, "crown")
    alpha = auto_lirpa_margin_bounds(model, ball.center, y, ball.eps, "alpha-crown",
                                     optimize_upper=False, alpha_steps=5)
    assert alpha.lower.dtype == torch.float64 and not alpha.lower.requires_grad
    assert (alpha.lower >= crown.lower - 1e-10).all()
    torch.testing.assert_close(alpha.upper, crown.upper, atol=1e-12, rtol=0)


def test_inputs_dtype_decides_model_is_not_converted() -> None:
    model = make_mlp(21, [5])  # float32
    ball = make_ball(22, 2, (1, 4, 4), 0.1)  # float64
    b = auto_lirpa_bounds(model, *ball.box(), "crown")
    assert b.lower.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = auto_lirpa_bounds(copy.deepcopy(model).double(), *ball.box(), "crown")
    torch.testing.assert_close(b.lower, ref.lower, atol=1e-12, rtol=0)


def test_per_sample_eps_and_empty_batch() -> None:
    model = make_mlp(23, [6]).double()
    x = make_ball(24, 3, (1, 4, 4), 0.0).center
    eps = torch.tensor([0.0, 0.05, 0.2], dtype=torch.float64)
    b = auto_lirpa_margin_bounds(model, x, torch.tensor([0, 1, 2]), eps, "crown")
    assert b.lower.shape == (3, 3)
    spec = margin_spec(torch.tensor([0]), 4).double()
    exact = (spec @ model(x[:1]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(b.lower[:1], exact, atol=1e-10, rtol=0)
    widths = (b.upper - b.lower).sum(1)
    assert widths[0] < widths[1] < widths[2]
    empty = auto_lirpa_bounds(model, x[:0], x[:0], "crown", spec[:0])
    assert empty.lower.shape == (0, 3)


def test_chunks_bound_like_single_samples() -> None:
    model = make_cnn(29).double()
    ball = make_ball(30, 3, (2, 7, 7), 0.1)
    x_lo, x_hi = ball.box()
    chunked = auto_lirpa_bounds(model, x_lo, x_hi, "crown", chunk_size=1)
    for i in range(3):
        one = auto_lirpa_bounds(model, x_lo[i:i + 1], x_hi[i:i + 1], "crown")
        torch.testing.assert_close(chunked.lower[i:i + 1], one.lower, atol=1e-12, rtol=0)
        torch.testing.assert_close(chunked.upper[i:i + 1], one.upper, atol=1e-12, rtol=0)
    with pytest.raises(SpecError, match="chunk_size must be None or an int >= 1"):
        auto_lirpa_bounds(model, x_lo, x_hi, "crown", chunk_size=0)


def test_alpha_crown_prints_nothing_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    model = make_mlp(25, [6])
    auto_lirpa_margin_bounds(model, torch.rand(1, 1, 4, 4), torch.tensor([0]), 0.1,
                             "alpha-crown", alpha_steps=12)
    assert capsys.readouterr().out == ""


def test_errors_are_clear() -> None:
    model = make_mlp(26, [4])
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(UnknownNameError, match="did you mean 'alpha-crown'"):
        auto_lirpa_bounds(model, x, x, "alpha_crown")
    with pytest.raises(UnknownNameError, match="wong-kolter"):
        auto_lirpa_bounds(model, x, x, "wong-kolter")
    with pytest.raises(SpecError, match="unknown option 'steps'.*alpha_steps"):
        auto_lirpa_bounds(model, x, x, "alpha-crown", steps=5)
    with pytest.raises(SpecError, match="empty box"):
        auto_lirpa_bounds(model, x + 0.1, x, "crown")
    with pytest.raises(SpecError, match=r"spec must be a float tensor of shape \(N=2, S, K=4\)"):
        auto_lirpa_bounds(model, x, x, "crown", torch.ones(2, 3, 5))
    with pytest.raises(SpecError, match="eps must be >= 0"):
        auto_lirpa_margin_bounds(model, x, torch.tensor([0, 1]), -0.1)
    with pytest.raises(UnknownNameError, match="conv_mode"):
        auto_lirpa_bounds(model, x, x, "crown", conv_mode="fast")


def test_engine_info_and_margin_bound_fn() -> None:
    import auto_LiRPA

    assert engine_info() == {"engine": "auto-lirpa", "version": auto_LiRPA.__version__}
    model = make_mlp(27, [5]).double()
    ball = make_ball(28, 2, (1, 4, 4), 0.1)
    y = torch.tensor([1, 3])
    method = get_method("lirpa-crown-ibp")
    a = margin_bounds(model, ball.center, y, ball.eps, method)
    b = auto_lirpa_margin_bounds(model, ball.center, y, ball.eps, "crown-ibp")
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
    assert method.info()["version"] == auto_LiRPA.__version__
    assert method.info()["method"] == "lirpa-crown-ibp"
