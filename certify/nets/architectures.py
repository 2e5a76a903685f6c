"""The model zoo: flat ``nn.Sequential`` networks with named layers.

Every architecture starts with :class:`Normalize` (models take [0, 1] pixels) and takes every
width as an argument: ``channels`` (one per conv layer) and ``hidden`` (one per hidden dense
layer). A filter-pruned model is the same architecture with smaller widths.

Layer names are stable and used by pruning (``--ratios conv1=0.5``): ``norm``, ``conv1``,
``bn1``, ``relu1``, ..., ``flatten``, ``fc1``, ``relu_fc1``, ..., ``out``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from certify.nets.layers import Normalize
from certify.nets.registry import register_arch

Shape = tuple[int, int, int]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_net(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int],
    kernels: Sequence[int],
    strides: Sequence[int],
    paddings: Sequence[int],
    hidden: Sequence[int],
    batch_norm: bool = False,
) -> nn.Sequential:
    """Conv layers (each ``conv -> [bn] -> relu``), flatten, dense layers, logits."""
    if not (len(channels) == len(kernels) == len(strides) == len(paddings)):
        raise ValueError("channels, kernels, strides and paddings need one entry per conv layer")
    if any(int(w) < 1 for w in [*channels, *hidden]):
        raise ValueError(
            f"every width must be >= 1, got channels={list(channels)} hidden={list(hidden)}"
        )
    c, h, w = input_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict(norm=Normalize(mean, std))
    convs = zip(channels, kernels, strides, paddings, strict=True)
    for i, (out_c, k, s, p) in enumerate(convs, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, int(out_c), k, stride=s, padding=p)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(int(out_c))
        layers[f"relu{i}"] = nn.ReLU()
        c, h, w = int(out_c), _conv_out(h, k, s, p), _conv_out(w, k, s, p)
        if h < 1 or w < 1:
            raise ValueError(f"input {input_shape} is too small for this architecture (conv{i})")
    layers["flatten"] = nn.Flatten()
    features = c * h * w
    for j, width in enumerate(hidden, start=1):
        layers[f"fc{j}"] = nn.Linear(features, int(width))
        layers[f"relu_fc{j}"] = nn.ReLU()
        features = int(width)
    layers["out"] = nn.Linear(features, num_classes)
    return nn.Sequential(layers)


@register_arch("mlp", positional="hidden")
def mlp(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    hidden: Sequence[int] = (100, 100),
    channels: Sequence[int] = (),
) -> nn.Sequential:
    """Fully connected ReLU network (``mlp-200-100``: two hidden layers of 200 and 100)."""
    if len(channels):
        raise ValueError("mlp has no conv layers; channels must be empty")
    return conv_net(
        input_shape,
        num_classes,
        mean,
        std,
        channels=(),
        kernels=(),
        strides=(),
        paddings=(),
        hidden=hidden,
    )


@register_arch("wk-small")
def wk_small(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int] = (16, 32),
    hidden: Sequence[int] = (100,),
) -> nn.Sequential:
    """Wong et al. (2018) small: two 4x4 stride-2 convs, one dense layer of 100."""
    return conv_net(
        input_shape,
        num_classes,
        mean,
        std,
        channels=channels,
        kernels=(4, 4),
        strides=(2, 2),
        paddings=(1, 1),
        hidden=hidden,
    )


@register_arch("wk-large")
def wk_large(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int] = (32, 32, 64, 64),
    hidden: Sequence[int] = (512, 512),
) -> nn.Sequential:
    """Wong et al. (2018) large: four convs (3x3/1, 4x4/2, 3x3/1, 4x4/2), two dense of 512."""
    return conv_net(
        input_shape,
        num_classes,
        mean,
        std,
        channels=channels,
        kernels=(3, 4, 3, 4),
        strides=(1, 2, 1, 2),
        paddings=(1, 1, 1, 1),
        hidden=hidden,
    )


@register_arch("svhn-teacher")
def svhn_teacher(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int] = (32, 64, 128, 128),
    hidden: Sequence[int] = (256,),
    batch_norm: bool = True,
) -> nn.Sequential:
    """The thesis's SVHN teacher: four conv layers with batch norm, one dense layer."""
    return conv_net(
        input_shape,
        num_classes,
        mean,
        std,
        channels=channels,
        kernels=(3, 4, 3, 4),
        strides=(1, 2, 1, 2),
        paddings=(1, 1, 1, 1),
        hidden=hidden,
        batch_norm=batch_norm,
    )


@register_arch("cifar-teacher")
def cifar_teacher(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int] = (32, 32, 64, 64, 128, 128),
    hidden: Sequence[int] = (256,),
    batch_norm: bool = True,
) -> nn.Sequential:
    """The thesis's CIFAR-10 teacher: six conv layers with batch norm, one dense layer."""
    return conv_net(
        input_shape,
        num_classes,
        mean,
        std,
        channels=channels,
        kernels=(3, 4, 3, 4, 3, 4),
        strides=(1, 2, 1, 2, 1, 2),
        paddings=(1, 1, 1, 1, 1, 1),
        hidden=hidden,
        batch_norm=batch_norm,
    )


@register_arch("scn", positional="channels")
def scn(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int] = (32, 32),
    hidden: Sequence[int] = (100,),
) -> nn.Sequential:
    """Shallow convolutional student (the thesis's SCN): two 4x4 stride-2 convs, one dense.

    ``scn-64-128`` has 64 and 128 filters; on 32x32x3 inputs ``scn-32-32`` has about 220k
    parameters, as in the thesis's Table 8.7.
    """
    if len(channels) != 2:
        raise ValueError(f"scn has exactly two conv layers, got channels={list(channels)}")
    return conv_net(
        input_shape,
        num_classes,
        mean,
        std,
        channels=channels,
        kernels=(4, 4),
        strides=(2, 2),
        paddings=(1, 1),
        hidden=hidden,
    )
