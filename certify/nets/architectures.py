"""The model zoo: ``nn.Sequential`` networks with named layers (flat, but for the residual
blocks of ``resnet``).

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

from certify.nets.layers import Normalize, ResidualBlock
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


@register_arch("resnet", positional="channels")
def resnet(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int] = (8, 16),
    hidden: Sequence[int] = (),
) -> nn.Sequential:
    """A small ResNet of two basic blocks (``resnet-8-16``): a conv3x3-BN-ReLU stem of
    ``channels[0]``, a block of ``channels[0]`` with the identity shortcut, a stride-2 block of
    ``channels[1]`` with a 1x1 strided conv shortcut, 2x2 average pooling, flatten, logits.

    Layers: ``norm``, ``conv1``, ``bn1``, ``relu1``, ``block1``, ``block2``
    (:class:`~certify.nets.layers.ResidualBlock`), ``pool``, ``flatten``, ``out``. On 1x8x8
    digits the features are ``channels[1] x 2 x 2``, on 3x32x32 ``channels[1] x 8 x 8``.
    """
    if len(channels) != 2 or any(int(c) < 1 for c in channels):
        raise ValueError(f"resnet has two blocks: channels must be two widths >= 1, got "
                         f"{list(channels)}")
    if len(hidden):
        raise ValueError("resnet has no hidden dense layers; hidden must be empty")
    c, h, w = input_shape
    c0, c1 = int(channels[0]), int(channels[1])
    h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)  # block2's stride
    if h < 2 or w < 2:
        raise ValueError(f"input {input_shape} is too small for resnet (at least 3x3)")
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        norm=Normalize(mean, std),
        conv1=nn.Conv2d(c, c0, 3, padding=1),
        bn1=nn.BatchNorm2d(c0),
        relu1=nn.ReLU(),
        block1=ResidualBlock(c0, c0),
        block2=ResidualBlock(c0, c1, stride=2),
        pool=nn.AvgPool2d(2),
        flatten=nn.Flatten(),
        out=nn.Linear(c1 * (h // 2) * (w // 2), num_classes),
    )
    return nn.Sequential(layers)


@register_arch("resnet-2b")
def resnet_2b(
    input_shape: Shape,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels: Sequence[int] = (8, 16),
    hidden: Sequence[int] = (),
) -> nn.Sequential:
    """``resnet-8-16``: the two-block ResNet of :func:`resnet` with its default widths."""
    return resnet(input_shape, num_classes, mean, std, channels=channels, hidden=hidden)
