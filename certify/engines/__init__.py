"""Bound engines: the native one (:mod:`certify.bounds`, the default) and optional backends.

Commands that certify (``certify area``, robust training) take ``--engine`` and get the margin
bound from :func:`get_margin_bound_fn`, whatever engine computes it::

    from certify.engines import get_margin_bound_fn, list_engines
    bound = get_margin_bound_fn("auto-lirpa", "crown")   # fails now if auto_LiRPA is absent
    b = bound(model, x, y, eps)                          # Bounds (N, K - 1)
    verified = b.lower.min(1).values > 0
    record["engine"] = bound.info()                      # {"engine", "version", "method"}

=============  ==============================================================================
``native``     :mod:`certify.bounds` (always available)
``auto-lirpa`` :mod:`certify.engines.auto_lirpa`, if auto_LiRPA is installed
=============  ==============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from certify.engines.auto_lirpa import (
    INSTALL_MESSAGE,
    AutoLirpaOptions,
    auto_lirpa_bounds,
    auto_lirpa_intermediate,
    auto_lirpa_margin_bounds,
    engine_info,
    is_auto_lirpa_available,
    list_auto_lirpa_methods,
    require_auto_lirpa,
)
from certify.errors import unknown_name

if TYPE_CHECKING:
    from certify.bounds import Bounds

__all__ = [
    "INSTALL_MESSAGE",
    "AutoLirpaOptions",
    "MarginBound",
    "auto_lirpa_bounds",
    "auto_lirpa_intermediate",
    "auto_lirpa_margin_bounds",
    "engine_info",
    "get_engine_info",
    "get_margin_bound_fn",
    "is_auto_lirpa_available",
    "list_engine_methods",
    "list_engines",
    "require_auto_lirpa",
]

_ENGINES = ("native", "auto-lirpa")


def list_engines() -> list[str]:
    """Engine names, the default first (both are listed even where auto_LiRPA is absent, so
    choosing it gives the install instructions rather than a usage error)."""
    return list(_ENGINES)


def _check_engine(engine: str) -> str:
    if engine not in _ENGINES:
        raise unknown_name("engine", str(engine), _ENGINES)
    return engine


def list_engine_methods(engine: str) -> list[str]:
    """Method names `engine` offers (needs no optional package installed).

    Raises:
        UnknownNameError: for an unknown engine.
    """
    if _check_engine(engine) == "native":
        from certify.bounds import list_methods

        return list_methods()
    return list_auto_lirpa_methods()


def get_engine_info(engine: str) -> dict[str, str]:
    """``{"engine": name, "version": version}`` of `engine`, for result records.

    Raises:
        UnknownNameError: for an unknown engine.
        CertifyError: for ``auto-lirpa`` if auto_LiRPA is not installed.
    """
    if _check_engine(engine) == "native":
        from certify import __version__

        return {"engine": "native", "version": __version__}
    return engine_info()


@dataclass(frozen=True)
class MarginBound:
    """A configured margin bound: ``bound(model, x, y, eps) -> Bounds`` `(N, K - 1)`.

    Build it with :func:`get_margin_bound_fn`, which validates the engine, the method and the
    options at once (so a command fails before any work is done).

    Attributes:
        engine: ``native`` or ``auto-lirpa``.
        method: The method's canonical name, e.g. ``crown``.
        options: The method's (or engine's) options.
    """

    engine: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor) -> Bounds:
        """Bounds of the margins ``f_y - f_j`` (``j != y``) over ``clip(x ± eps, 0, 1)``.

        Args:
            model: The classifier, taking `(N, C, H, W)` in [0, 1].
            x: Images `(N, C, H, W)` in [0, 1].
            y: Labels `(N,)`.
            eps: A float or per-sample radii `(N,)`, >= 0.

        Returns:
            Bounds `(N, K - 1)` in the column order of :func:`certify.spec.margin_spec`.
        """
        if self.engine == "native":
            from certify.bounds import get_method, margin_bounds

            return margin_bounds(model, x, y, eps, get_method(self.method, **self.options))
        return auto_lirpa_margin_bounds(model, x, y, eps, self.method, **self.options)

    def info(self) -> dict[str, Any]:
        """``{"engine", "version", "method", "options"}`` for result records."""
        return {**get_engine_info(self.engine), "method": self.method,
                "options": dict(self.options)}


def get_margin_bound_fn(engine: str, method: str, **options: Any) -> MarginBound:
    """The margin bound of `method` computed by `engine`, validated now.

    Args:
        engine: A name from :func:`list_engines`.
        method: A name from ``list_engine_methods(engine)``.
        **options: The method's options (native: see :func:`certify.bounds.get_method`;
            auto-lirpa: fields of :class:`AutoLirpaOptions`).

    Returns:
        A callable ``(model, x, y, eps) -> Bounds`` `(N, K - 1)`.

    Raises:
        UnknownNameError: for an unknown engine or method (with a suggestion).
        SpecError: for an unknown or invalid option.
        CertifyError: for ``auto-lirpa`` where auto_LiRPA is not installed (one line with the
            install command).
    """
    if _check_engine(engine) == "native":
        from certify.bounds import get_method

        get_method(method, **options)  # raises now for a bad name or option
    else:
        if method not in list_auto_lirpa_methods():
            raise unknown_name("auto-lirpa method", str(method), list_auto_lirpa_methods())
        AutoLirpaOptions.from_kwargs(options)
        require_auto_lirpa()
    return MarginBound(engine, method, dict(options))
