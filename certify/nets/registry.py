"""The architecture registry: names to builders, and ``scn-32-32``-style name parsing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from certify.errors import SpecError, unknown_name

Builder = Callable[..., nn.Sequential]


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture; ``positional`` names the kwarg that ``name-A-B`` sets."""

    name: str
    builder: Builder
    positional: str | None


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str, *, positional: str | None = None) -> Callable[[Builder], Builder]:
    def decorate(fn: Builder) -> Builder:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is registered twice")
        _ARCHS[name] = ArchSpec(name, fn, positional)
        return fn

    return decorate


def list_archs() -> list[str]:
    return sorted(_ARCHS)


def parse_arch(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``scn-64-128`` into ``("scn", {"channels": [64, 128]})``.

    A registered name (``wk-small``) is returned as is with no kwargs.
    """
    if spec in _ARCHS:
        return spec, {}
    base, _, rest = spec.partition("-")
    widths = rest.split("-") if rest else []
    if base in _ARCHS and _ARCHS[base].positional and widths and all(w.isdigit() for w in widths):
        return base, {_ARCHS[base].positional: [int(w) for w in widths]}
    names = list_archs() + [f"{a}-A-B" for a in list_archs() if _ARCHS[a].positional]
    raise unknown_name("architecture", spec, names)


def arch_name(base: str, arch_kwargs: dict[str, Any] | None = None) -> str:
    """The full name of an architecture with its widths: ``("scn", {"channels": [8, 16]})``
    gives ``scn-8-16`` (what ``--arch`` takes); a name without positional widths is kept."""
    spec = _ARCHS.get(base)
    widths = (arch_kwargs or {}).get(spec.positional) if spec and spec.positional else None
    if not widths:
        return base
    return "-".join([base, *(str(int(w)) for w in widths)])


def create_arch(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Sequential:
    """Build architecture `name` (a registered name or ``scn-32-32`` form) for the given input.

    Args:
        name: Registry name, optionally with widths (``mlp-200-100``).
        input_shape: ``(C, H, W)``.
        num_classes: K.
        mean, std: Per-channel normalization for the model's first layer (default 0 and 1).
        **kwargs: Widths (``channels``, ``hidden``) and other builder options; override the name's.
    """
    base, parsed = parse_arch(name)
    parsed.update(kwargs)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise SpecError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    c = shape[0]
    mean = list(mean) if mean is not None else [0.0] * c
    std = list(std) if std is not None else [1.0] * c
    if len(mean) != c or len(std) != c:
        raise SpecError(f"normalization has {len(mean)} channels but the input has {c}")
    try:
        return _ARCHS[base].builder(shape, int(num_classes), mean, std, **parsed)
    except TypeError as e:
        raise SpecError(f"bad options for architecture '{base}': {e}") from None
    except ValueError as e:
        raise SpecError(f"architecture '{base}': {e}") from None


def arch_kwargs_of(model: nn.Sequential) -> dict[str, list[int]]:
    """Read the widths (``channels``, ``hidden``) off a built model, e.g. after pruning."""
    from certify.nets.layers import ResidualBlock

    channels = [m.out_channels for n, m in model.named_children() if isinstance(m, nn.Conv2d)]
    blocks = [m for m in model.children() if isinstance(m, ResidualBlock)]
    if blocks:  # resnet: the stem's width, then the last block's
        channels = channels[:1] + [blocks[-1].conv2.out_channels]
    hidden = [
        m.out_features for n, m in model.named_children() if isinstance(m, nn.Linear) and n != "out"
    ]
    return {"channels": channels, "hidden": hidden}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
