"""Generated networks, boxes and reachable points for the engine tests."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from certify.nets import Normalize
from certify.spec import LinfBall


def init_weights(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Fan-in scaled random weights (outputs of order one), random eval BatchNorm statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen)
                               / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(c, generator=gen))  # negative scales too
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    return model.eval()


def _normalize(c: int, gen: torch.Generator) -> Normalize:
    mean = (torch.rand(c, generator=gen) * 0.6 + 0.2).tolist()
    std = (torch.rand(c, generator=gen) * 0.8 + 0.2).tolist()
    return Normalize(mean, std)


def make_mlp(seed: int, widths: list[int], *, in_shape: tuple[int, int, int] = (1, 4, 4),
             classes: int = 4) -> nn.Sequential:
    """Normalize, Flatten, [Linear, ReLU]*, Linear, with random weights."""
    gen = torch.Generator().manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict(norm=_normalize(in_shape[0], gen),
                                                      flatten=nn.Flatten())
    features = in_shape[0] * in_shape[1] * in_shape[2]
    for i, w in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(features, w)
        layers[f"relu_fc{i}"] = nn.ReLU()
        features = w
    layers["out"] = nn.Linear(features, classes)
    return init_weights(nn.Sequential(layers), gen)  # type: ignore[return-value]


def make_cnn(seed: int, *, channels: tuple[int, int] = (3, 4), stride: int = 2,
             padding: int = 1, batch_norm: bool = False, pool: bool = False,
             in_shape: tuple[int, int, int] = (2, 7, 7), classes: int = 4) -> nn.Sequential:
    """Normalize, conv [bn] relu, conv relu [avgpool], flatten, linear relu, linear."""
    gen = torch.Generator().manual_seed(seed)
    c, h, _ = in_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict(norm=_normalize(c, gen))
    layers["conv1"] = nn.Conv2d(c, channels[0], 3, stride=stride, padding=padding)
    h = (h + 2 * padding - 3) // stride + 1
    if batch_norm:
        layers["bn1"] = nn.BatchNorm2d(channels[0])
    layers["relu1"] = nn.ReLU()
    layers["conv2"] = nn.Conv2d(channels[0], channels[1], 3, stride=1, padding=1)
    layers["relu2"] = nn.ReLU()
    if pool:
        layers["pool"] = nn.AvgPool2d(2)
        h = h // 2
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(channels[1] * h * h, 8)
    layers["relu_fc1"] = nn.ReLU()
    layers["out"] = nn.Linear(8, classes)
    return init_weights(nn.Sequential(layers), gen)  # type: ignore[return-value]


def make_ball(seed: int, n: int, in_shape: tuple[int, ...], eps_max: float,
              dtype: torch.dtype = torch.float64) -> LinfBall:
    """`n` random images in [0, 1] with random radii in [0, eps_max]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *in_shape, generator=gen, dtype=dtype)
    eps = torch.rand(n, generator=gen, dtype=dtype) * eps_max
    return LinfBall(x, eps)


def reachable_points(model: nn.Module, ball: LinfBall, spec: Tensor, *, seed: int = 0,
                     steps: int = 10) -> Tensor:
    """Points of the ball: uniform, box corners, and ones pushed (by projected sign-gradient
    steps) to the lowest and highest value of every spec row. `(n, N, C, H, W)`."""
    gen = torch.Generator().manual_seed(seed)
    x_lo, x_hi = ball.box()
    points = [ball.sample(64, generator=gen), ball.sample(32, generator=gen, corners=True)]
    step = (x_hi - x_lo) / 4
    for row in range(spec.shape[1]):
        for sign in (1.0, -1.0):
            x = ball.sample(1, generator=gen)[0].requires_grad_(True)
            for _ in range(steps):
                value = (spec[:, row] * model(x)).sum() * sign
                (grad,) = torch.autograd.grad(value, x)
                with torch.no_grad():
                    x = torch.minimum(torch.maximum(x - step * grad.sign(), x_lo), x_hi)
                x.requires_grad_(True)
            points.append(x.detach()[None])
    return torch.cat(points)


def spec_values(model: nn.Module, points: Tensor, spec: Tensor) -> Tensor:
    """`spec @ model(x)` for points `(n, N, ...)`: `(n, N, S)`."""
    with torch.no_grad():
        out = torch.stack([model(p) for p in points])  # (n, N, K)
    return torch.einsum("nsk,mnk->mns", spec, out)
