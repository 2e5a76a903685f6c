"""Layers of our own: the in-model input normalization, per-sample reshapes and permutations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the model's first layer.

    Models take pixels in [0, 1], so every eps is in pixel units. The bound engine treats this
    layer exactly (an elementwise affine map), never folded into a padded convolution.

    Args:
        mean: One value per input channel.
        std: One value per input channel, all > 0.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0 in every channel, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"


class Reshape(nn.Module):
    """Re-shape each sample to `shape` (the batch dimension stays first): ``(N, ...) -> (N,
    *shape)``, keeping the values' row-major order (an ONNX ``Reshape`` inside a network).

    Args:
        shape: The per-sample shape; it holds as many values as the input's samples.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(v) for v in shape)
        if not self.shape or any(v < 1 for v in self.shape):
            raise ValueError(f"shape must be positive sizes, got {self.shape}")

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Permute(nn.Module):
    """Permute the dimensions of each sample (the batch dimension stays first): output dimension
    ``i`` is input dimension ``dims[i]`` of the sample (an ONNX ``Transpose`` with ``perm =
    [0, *(d + 1 for d in dims)]``, e.g. ``dims=(2, 0, 1)`` takes NHWC images to NCHW).

    Args:
        dims: A permutation of ``0 .. rank - 1`` over the per-sample dimensions.
    """

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        if sorted(self.dims) != list(range(len(self.dims))):
            raise ValueError(f"dims must be a permutation of 0..{len(self.dims) - 1}, got "
                             f"{self.dims}")

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, *(d + 1 for d in self.dims))

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


class ResidualBlock(nn.Module):
    """A ResNet basic block: ``relu(body(x) + shortcut(x))`` with ``body`` conv3x3-BN-ReLU-
    conv3x3-BN and ``shortcut`` the identity, or a 1x1 convolution with BN when the block
    changes the width or strides (He et al., "Deep Residual Learning for Image Recognition",
    2016). The bound engine takes it through ``torch.fx`` (a residual ``Add``).

    Args:
        in_channels, out_channels: Widths before and after the block.
        stride: The first convolution's stride (and the shortcut's).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                nn.BatchNorm2d(out_channels))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        body = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(body + self.shortcut(x))
