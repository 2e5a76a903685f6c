"""The result type, the method protocol and the method registry of the bound engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from certify.errors import SpecError, unknown_name

if TYPE_CHECKING:
    from torch import nn

    from certify.bounds.network import Network
    from certify.spec import LinfBall

__all__ = ["CAPABILITIES", "BoundMethod", "Bounds", "display_name", "get_method",
           "list_methods", "method_class", "register_method", "resolve_method"]


@dataclass(frozen=True)
class Bounds:
    """Elementwise lower and upper bounds, batch first.

    Attributes:
        lower: `(N, *shape)`, e.g. `(N, S)` for a specification or `(N, K)` for logits.
        upper: Same shape as `lower`.
        pre_activation: Optionally, the bounds of every ReLU input the method used (they
            bound the magnitudes in :func:`certify.bounds.forward_error.forward_error`).
    """

    lower: Tensor
    upper: Tensor
    pre_activation: tuple[Bounds, ...] | None = field(default=None, repr=False, compare=False,
                                                     kw_only=True)

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape:
            raise SpecError(f"Bounds lower {tuple(self.lower.shape)} and upper "
                            f"{tuple(self.upper.shape)} must have the same shape.")

    def __repr__(self) -> str:
        if self.lower.numel() == 0:
            return f"Bounds(shape={tuple(self.lower.shape)})"
        return (f"Bounds(shape={tuple(self.lower.shape)}, lower in [{float(self.lower.min()):.4g}, "
                f"{float(self.lower.max()):.4g}], upper in [{float(self.upper.min()):.4g}, "
                f"{float(self.upper.max()):.4g}])")

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    def contains(self, y: Tensor, atol: float = 0.0) -> Tensor:
        """Whether values lie within the bounds, per sample.

        Args:
            y: Values of the bounded quantity, `(N, *shape)` or `(n, N, *shape)` (n points per
                sample).
            atol: Absolute slack on both sides.

        Returns:
            `(N,)` bool: True where every value of that sample is inside `[lower - atol,
            upper + atol]`.
        """
        ok = (y >= self.lower - atol) & (y <= self.upper + atol)
        if ok.shape == self.lower.shape:
            return ok.flatten(1).all(1)
        if ok.ndim == self.lower.ndim + 1 and ok.shape[1:] == self.lower.shape:
            return ok.transpose(0, 1).flatten(1).all(1)
        raise SpecError(f"values of shape {tuple(y.shape)} do not match bounds of shape "
                        f"{tuple(self.lower.shape)} (expected (N, ...) or (n, N, ...)).")


@runtime_checkable
class BoundMethod(Protocol):
    """One configured bound method; no hidden state between calls.

    Every method is a frozen dataclass whose fields are its options. `bound` is the core;
    `intermediate` returns the pre-activation bounds it uses, so that methods can be compared
    with the *same* intermediate bounds (pass them back as `intermediate=`).
    """

    name: ClassVar[str]
    #: Capabilities, read instead of comparing names (defaults in :class:`MethodBase`).
    #: The method's lower bound is the exact minimum (a complete verifier).
    is_complete: ClassVar[bool]
    #: It has a ``threshold`` option: decides rows against a value instead of bounding them.
    decides_threshold: ClassVar[bool]
    #: It has ``time_limit``/``budget`` options (seconds).
    accepts_time_budget: ClassVar[bool]
    #: Its pre-activation bounds may serve another method (``intermediate_method=``).
    serves_intermediate: ClassVar[bool]
    #: It solves optimization problems with an external solver (cvxpy); small networks only.
    uses_solver: ClassVar[bool]
    #: It bounds the ``nn.Module`` itself (``bound_module``), not a converted Network.
    takes_module: ClassVar[bool]
    #: Its failures near the radius are most often a budget spent, not a counterexample, and
    #: a second evaluation just below resumes the first's work: a radius search takes one
    #: just below each failure (see :func:`certify.radius.certified_radii`).
    resumes_failures: ClassVar[bool]
    #: It needs an optional package (auto_LiRPA); listed, but failing with install steps.
    external: ClassVar[bool]
    #: Given the bounds of the earlier layers, its bound of a neuron can be tighter than
    #: CROWN's: a complete method may re-bound the pre-activations with it, layer by layer.
    refines_intermediate: ClassVar[bool]
    #: How tables and figures spell it, e.g. ``CROWN``.
    display_name: ClassVar[str]

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """Bounds of `spec @ net(x)` over the box; `(N, S)`, or `(N, K)` without a spec."""
        ...

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor) -> tuple[Bounds, ...]:
        """Bounds of the input of every ReLU, in order; each `(N, *shape)`."""
        ...

    def bracket(self) -> str | None:
        """The incomplete method whose certified radius a radius search with this method starts
        from (None: from 0)."""
        ...

    def search_pair(self) -> tuple[BoundMethod, BoundMethod | None]:
        """``(steer, confirm)``: the bound that steers a radius search (fast), and the rigorous
        bound that confirms each radius it reports, evaluated in float64 (None: the steering
        bound's proofs are final)."""
        ...

    def __call__(self, model: nn.Module | Network, region: LinfBall,
                 spec: Tensor | None = None) -> Bounds:
        """Bounds of ``spec @ f(x)`` over `region` (its outward-rounded box), rigorous for the
        network and for the model's own forward pass; see
        :func:`certify.bounds.compute_bounds`."""
        ...


class MethodBase:
    """Shared plumbing and default capabilities of the built-in methods."""

    name: ClassVar[str]
    is_complete: ClassVar[bool] = False
    decides_threshold: ClassVar[bool] = False
    accepts_time_budget: ClassVar[bool] = False
    serves_intermediate: ClassVar[bool] = True
    uses_solver: ClassVar[bool] = False
    takes_module: ClassVar[bool] = False
    resumes_failures: ClassVar[bool] = False
    external: ClassVar[bool] = False
    refines_intermediate: ClassVar[bool] = False
    display_name: ClassVar[str] = ""

    def search_pair(self) -> tuple[BoundMethod, BoundMethod | None]:
        """A method with a ``rigorous`` option steers with its plain bound and confirms with its
        rigorous one; any other method's proofs are final."""
        if isinstance(getattr(self, "rigorous", None), bool):
            return (with_options(self, {"rigorous": False}),  # type: ignore[arg-type]
                    with_options(self, {"rigorous": True}))  # type: ignore[arg-type]
        return self, None  # type: ignore[return-value]

    def bracket(self) -> str | None:
        """The incomplete method whose certified radius a radius search with this method starts
        from (its bracket's lower end); None: the search starts from 0."""
        return None

    def searching(self) -> BoundMethod:
        """The method to use for one radius search: an instance that may carry what is sound
        from one evaluation to the next (``bab``: its split trees); by default this one."""
        return self  # type: ignore[return-value]

    def __call__(self, model: nn.Module | Network, region: LinfBall,
                 spec: Tensor | None = None) -> Bounds:
        from certify.bounds.api import compute_bounds

        x_lo, x_hi = region.box()
        return compute_bounds(model, x_lo, x_hi, self, spec,  # type: ignore[arg-type]
                              model_rounding=getattr(self, "rigorous", True))

    def _check_options(self) -> None:
        """Validate common options: called from `__post_init__` of each method."""
        for option in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, option.name)
            if option.name == "memory_budget_mb" and not (isinstance(value, (int, float))
                                                         and value > 0):
                raise SpecError(f"{self.name}: memory_budget_mb must be > 0, got {value!r}.")
            if option.name == "chunk_size" and value is not None and not (
                    isinstance(value, int) and value >= 1):
                raise SpecError(f"{self.name}: chunk_size must be None or an int >= 1, "
                                f"got {value!r}.")
            if option.type in ("bool", bool) and not isinstance(value, bool):
                # (a string such as "false" would otherwise count as True)
                raise SpecError(f"{self.name}: {option.name} must be True or False, got "
                                f"{value!r}.")
            if option.name == "intermediate_mode" and value not in ("auto", "backward",
                                                                   "forward"):
                raise SpecError(f"{self.name}: intermediate_mode must be 'auto', 'backward' or "
                                f"'forward', got {value!r}.")


_METHODS: dict[str, type] = {}
CAPABILITIES = ("is_complete", "decides_threshold", "accepts_time_budget",
                "serves_intermediate", "uses_solver", "refines_intermediate", "takes_module",
                "resumes_failures", "external")
M = TypeVar("M", bound=type)


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a bound method under its canonical `name`.

    The class must be a dataclass whose fields are its options (so `get_method` can reject an
    unknown option) with `name: ClassVar[str]`; the decorator sets `name`.
    """

    def decorate(cls: M) -> M:
        if name in _METHODS:
            raise ValueError(f"bound method {name!r} is registered twice")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"bound method {name!r} must be a dataclass (its fields are options)")
        cls.name = name  # type: ignore[attr-defined]
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods(**capabilities: bool) -> list[str]:
    """Canonical method names, from cheap and loose to costly and tight (registration order).

    Args:
        **capabilities: Keep only the methods with these capability values, e.g.
            ``list_methods(serves_intermediate=True, uses_solver=False)``.
    """
    unknown = sorted(set(capabilities) - set(CAPABILITIES))
    if unknown:
        raise SpecError(f"unknown capability {', '.join(map(repr, unknown))}; capabilities "
                        f"are: {', '.join(CAPABILITIES)}.")
    return [name for name, cls in _METHODS.items()
            if all(getattr(cls, k) == v for k, v in capabilities.items())]


def method_class(name: str) -> type:
    """The registered class of `name` (its capabilities are class attributes).

    Raises:
        UnknownNameError: for an unknown name (with a suggestion).
    """
    if name not in _METHODS:
        raise unknown_name("method", name, list_methods())
    return _METHODS[name]


def display_name(name: str) -> str:
    """How tables and figures spell method `name` (``CROWN``, ``alpha-crown``, ...)."""
    cls = _METHODS.get(name)
    return (getattr(cls, "display_name", "") or name) if cls is not None else name


def get_method(name: str, **options: Any) -> BoundMethod:
    """A configured bound method.

    Args:
        name: A name from :func:`list_methods`, e.g. ``"alpha-crown"``.
        **options: The method's options, e.g. ``steps=50`` for ``alpha-crown``.

    Raises:
        UnknownNameError: for an unknown name (with a suggestion).
        SpecError: for an unknown option or an invalid option value.
    """
    if name not in _METHODS:
        raise unknown_name("method", name, list_methods())
    cls = _METHODS[name]
    _check_known(cls, name, options)
    return cls(**options)  # type: ignore[no-any-return]


def resolve_method(method: str | BoundMethod, options: dict[str, Any]) -> BoundMethod:
    """A configured method from a name (:func:`get_method`) or a configured method with some
    options replaced (:func:`with_options`).

    Raises:
        SpecError: `method` is neither, or an option is unknown or invalid.
        UnknownNameError: for an unknown name.
    """
    if isinstance(method, str):
        return get_method(method, **options)
    if not isinstance(method, BoundMethod):
        raise SpecError(f"method must be a name (see list_methods()) or a configured method "
                        f"from get_method(), got {type(method).__name__}.")
    return with_options(method, options)


#: ``field(metadata=STATE)`` marks a method's field as state it carries (a radius search's
#: memory), set by the method itself (or a test); not listed among its options.
STATE = {"state": True}


def option_names(method: Any) -> list[str]:
    """The options of a method class or instance: its init fields, less its state."""
    return [f.name for f in dataclasses.fields(method) if f.init and not f.metadata.get("state")]


def _check_known(method: Any, name: str, options: dict[str, Any]) -> None:
    """Raise SpecError, listing the options, if any of `options` is not an init field of
    `method` (a class or instance; state fields are accepted but not listed)."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(method) if f.init})
    if unknown:
        raise SpecError(f"unknown option {', '.join(repr(u) for u in unknown)} for method "
                        f"'{name}'; its options are: "
                        f"{', '.join(option_names(method)) or '(none)'}.")


def with_options(method: BoundMethod, options: dict[str, Any]) -> BoundMethod:
    """`method` with some options replaced, validated like :func:`get_method`."""
    if not options:
        return method
    _check_known(method, method.name, options)
    return dataclasses.replace(method, **options)  # type: ignore[type-var]
