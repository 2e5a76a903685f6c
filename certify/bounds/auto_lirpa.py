"""auto_LiRPA's bounds as registered methods: ``lirpa-ibp``, ``lirpa-crown``, ``lirpa-crown-ibp``,
``lirpa-alpha-crown``.

auto_LiRPA (Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness and
Beyond", NeurIPS 2020) bounds general computation graphs, so it certifies models with layers the
native engine has no rule for (residual blocks). It is **not** a dependency: its PyPI
release does not import on torch 2.x, so users install it from its repository. Every function
here fails with one line saying how (:func:`require_auto_lirpa`) when it is absent.

The methods are listed by :func:`certify.bounds.list_methods` whether or not it is installed (so
choosing one gives the install instructions, not a usage error); every command that takes a
bound method takes them. They bound the ``nn.Module`` itself (``takes_module``), not a native
:class:`~certify.bounds.Network`, and are not rigorous in floating point: the radius search
confirms each of their radii with the native rigorous bound of the same method
(:meth:`AutoLirpaMethod.search_pair`).

Methods (``lirpa-`` + the native method each reproduces; auto_LiRPA's names in brackets):

=============  ===============================================================================
``ibp``        interval bound propagation [``IBP``]
``crown``      CROWN, CROWN intermediate bounds [``CROWN``]; intersected with IBP (below)
``crown-ibp``  CROWN for the output, IBP for the intermediate layers [``CROWN-IBP``]
``alpha-crown``  CROWN with optimized lower slopes [``CROWN-Optimized``]; intermediate bounds
               from CROWN, not optimized
=============  ===============================================================================

auto_LiRPA 0.7.1 has beta-CROWN's split constraints (``enable_beta_crown``, split histories)
but no branch-and-bound driver: that lives in the separate alpha-beta-CROWN verifier, whose
split bookkeeping is internal. There is no usable public branch-and-bound API, so there is no
``beta-crown`` method here.

**Normalization.** Models start with :class:`certify.nets.Normalize` and ``eps`` is in pixel
units. auto_LiRPA's convolution "patches" mode fails on an in-model normalization, so the
backend strips a leading ``Normalize`` and maps the pixel box into normalized space with the
layer's own arithmetic, ``(x - mean) / std`` (``std > 0``). This is exact, not merely sound:
subtraction and division by a positive number are monotone and so is floating-point rounding,
so the mapped box holds exactly the normalized points the model itself computes from the pixel
box. A model without a leading ``Normalize`` is bounded as it is (in "matrix" mode if a
``Normalize`` remains inside it).

**Matching the native engine.** The lower ReLU slope is CROWN's adaptive rule (slope 1 where
``u > -l``), auto_LiRPA's default and the native rule. The native engine bounds the neurons that
intervals prove stable by intervals, and intersects the interval and linear bounds of the
others; ``crown`` and ``alpha-crown`` do the same here (auto_LiRPA's sparse intermediate
bounds with ``compare_crown_with_ibp``), which also intersects the final bound with IBP's.
Unlike the native engine, auto_LiRPA picks the neurons to bound by CROWN over the whole batch,
so a batch can be slightly *tighter* than its samples one by one (both are sound).

**Modes and state.** Like the native engine, the backend bounds the eval-mode function (Dropout
is the identity, BatchNorm uses its running statistics). Building auto_LiRPA's graph traces the
model (which can update BatchNorm statistics) and auto_LiRPA toggles ``requires_grad`` of the
parameters by mode; the backend restores the model's state and modes after the build and
disables that toggle, so the model is left as it was. The graph is cached per model and reads
the model's parameters by reference (weight updates are seen); buffers are copied in on every
call.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import io
import math
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import Tensor, nn

from certify.bounds.base import Bounds, MethodBase, get_method, register_method
from certify.errors import CertifyError, SpecError, UnsupportedLayerError, unknown_name
from certify.nets.layers import Normalize

if TYPE_CHECKING:
    from certify.bounds.base import BoundMethod
    from certify.bounds.network import Network

__all__ = [
    "INSTALL_MESSAGE",
    "AutoLirpaMethod",
    "AutoLirpaOptions",
    "auto_lirpa_bounds",
    "auto_lirpa_intermediate",
    "auto_lirpa_margin_bounds",
    "engine_info",
    "is_auto_lirpa_available",
    "list_auto_lirpa_methods",
    "require_auto_lirpa",
]

INSTALL_MESSAGE = (
    "auto_LiRPA is not installed; install it from its repository: pip install "
    "git+https://github.com/Verified-Intelligence/auto_LiRPA (it is optional; the native "
    "engine is the default)"
)

# Our canonical method names -> auto_LiRPA's.
_METHODS: dict[str, str] = {
    "ibp": "IBP",
    "crown": "CROWN",
    "crown-ibp": "CROWN-IBP",
    "alpha-crown": "CROWN-Optimized",
}
# Our slope-rule names -> auto_LiRPA's `activation_bound_option`.
_SLOPE_RULES: dict[str, str] = {"adaptive": "adaptive", "zero": "zero-lb", "one": "one-lb"}
_CONV_MODES = ("auto", "patches", "matrix")
_DTYPES = (torch.float32, torch.float64)


def list_auto_lirpa_methods() -> list[str]:
    """Method names the auto-lirpa engine offers (canonical names, as the native engine's)."""
    return list(_METHODS)


def require_auto_lirpa() -> ModuleType:
    """The imported ``auto_LiRPA`` module.

    Raises:
        CertifyError: one line saying how to install it, if it is not installed (never an
            ImportError traceback); or naming the failure if an installed copy fails to import
            (e.g. the PyPI release, which needs torch < 1.13).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its import warns about torch.jit.script
        try:
            return importlib.import_module("auto_LiRPA")
        except ImportError:
            raise CertifyError(INSTALL_MESSAGE) from None
        except Exception as e:  # a broken install: say so in one line, not a traceback
            raise CertifyError(
                f"auto_LiRPA is installed but fails to import ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no message'}); install the current "
                "version from its repository: pip install "
                "git+https://github.com/Verified-Intelligence/auto_LiRPA") from None


def is_auto_lirpa_available() -> bool:
    """Whether auto_LiRPA imports."""
    try:
        require_auto_lirpa()
    except CertifyError:
        return False
    return True


def engine_info() -> dict[str, str]:
    """``{"engine": "auto-lirpa", "version": <auto_LiRPA's version>}`` for result records.

    Raises:
        CertifyError: if auto_LiRPA is not installed.
    """
    module = require_auto_lirpa()
    return {"engine": "auto-lirpa", "version": str(getattr(module, "__version__", "unknown"))}


@dataclass(frozen=True)
class AutoLirpaOptions:
    """Options of the auto-lirpa engine (an unknown option is an error, never ignored).

    Attributes:
        conv_mode: auto_LiRPA's convolution mode: ``"patches"`` (fast), ``"matrix"``, or
            ``"auto"`` (patches unless a ``Normalize`` remains inside the bounded graph).
        slope: Lower ReLU slope rule of ``crown``/``crown-ibp`` and the start of
            ``alpha-crown``: ``"adaptive"`` (CROWN's, the native rule), ``"zero"`` or ``"one"``.
        intersect_ibp: For ``crown`` and ``alpha-crown``, intersect CROWN's bounds with IBP's
            (intermediate layers and output), as the native engine does for intermediate layers.
        alpha_steps: Optimization iterations of ``alpha-crown`` (auto_LiRPA's default 20).
        alpha_lr: Adam learning rate of the slopes (auto_LiRPA's default 0.5).
        optimize_upper: For ``alpha-crown``, optimize the upper bounds too (a second
            optimization, as the native engine does); False takes them from CROWN (sound, half
            the time; certification only needs the lower bounds).
        chunk_size: Bound at most this many samples at once (memory); None: the whole batch.
            Chunks are sound like the whole batch; their bounds can differ slightly, since
            auto_LiRPA picks the neurons it tightens over the samples bounded together.
    """

    conv_mode: str = "auto"
    slope: str = "adaptive"
    intersect_ibp: bool = True
    alpha_steps: int = 20
    alpha_lr: float = 0.5
    optimize_upper: bool = True
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.conv_mode not in _CONV_MODES:
            raise unknown_name("auto-lirpa conv_mode", str(self.conv_mode), _CONV_MODES)
        if self.slope not in _SLOPE_RULES:
            raise unknown_name("auto-lirpa slope rule", str(self.slope), _SLOPE_RULES)
        if not (isinstance(self.alpha_steps, int) and self.alpha_steps >= 1):
            raise SpecError(f"auto-lirpa: alpha_steps must be an int >= 1, got "
                            f"{self.alpha_steps!r}.")
        if not (isinstance(self.alpha_lr, (int, float)) and self.alpha_lr > 0):
            raise SpecError(f"auto-lirpa: alpha_lr must be > 0, got {self.alpha_lr!r}.")
        if self.chunk_size is not None and not (isinstance(self.chunk_size, int)
                                                and self.chunk_size >= 1):
            raise SpecError(f"auto-lirpa: chunk_size must be None or an int >= 1, got "
                            f"{self.chunk_size!r}.")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> AutoLirpaOptions:
        """Build from keyword options, rejecting unknown ones with the list of known ones."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise SpecError(f"unknown option {', '.join(repr(u) for u in unknown)} for the "
                            f"auto-lirpa engine; its options are: {', '.join(fields)}.")
        return cls(**options)


# --- the model as auto_LiRPA sees it ---------------------------------------------------------


def _split_normalize(model: nn.Module) -> tuple[nn.Module, Normalize | None]:
    """`(body, norm)`: a leading Normalize stripped (and top-level Dropout, the eval identity)."""
    if not isinstance(model, nn.Sequential):
        return model, None
    children = list(model.named_children())
    norm = None
    if children and isinstance(children[0][1], Normalize):
        norm = children[0][1]
        children = children[1:]
    kept = [(n, m) for n, m in children if not isinstance(m, nn.Dropout)]
    if norm is None and len(kept) == len(children):
        return model, None
    return nn.Sequential(OrderedDict(kept)), norm


def _tensors(module: nn.Module) -> Iterator[Tensor]:
    yield from module.parameters()
    yield from module.buffers()


@contextlib.contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Restore `module`'s tensors, modes and requires_grad flags after the block."""
    state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            current = module.state_dict(keep_vars=True)
            for k, v in state.items():
                if k in current and current[k].shape == v.shape:
                    current[k].copy_(v)
        for m, mode in modes:
            m.train(mode)
        for p, flag in grads:
            p.requires_grad_(flag)


@dataclass(eq=False)
class _Graph:
    """A built ``BoundedModule`` and how to keep it in sync with the model it came from."""

    bounded: Any  # auto_LiRPA.BoundedModule
    buffers: list[tuple[Tensor, Tensor]]  # (model buffer, graph copy) pairs to copy each call
    output_shape: tuple[int, ...]
    fingerprint: tuple[Any, ...]


# model -> {key: graph}; a weak key, so a cached graph never keeps a model alive.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], _Graph]] = (
    weakref.WeakKeyDictionary())


def _fingerprint(body: nn.Module, *, versions: bool) -> tuple[Any, ...]:
    """Identity of the tensors a graph reads; with `versions`, also their in-place edits."""
    return tuple((id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape),
                  t._version if versions else 0) for t in _tensors(body))


def _graph(model: nn.Module, in_shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device, opts: AutoLirpaOptions) -> tuple[_Graph, Normalize | None]:
    """The cached (or newly built) graph of `model` for inputs of `in_shape`, dtype, device."""
    lirpa = require_auto_lirpa()
    body, norm = _split_normalize(model)
    sample = next(_tensors(body), None)
    converted = sample is not None and (sample.dtype != dtype or sample.device != device)
    conv_mode = opts.conv_mode
    if conv_mode == "auto":
        inner = any(isinstance(m, Normalize) for m in body.modules())
        conv_mode = "matrix" if inner else "patches"
    key = (tuple(in_shape), dtype, device, conv_mode, opts.slope)
    fingerprint = _fingerprint(model, versions=converted)
    graphs = _CACHE.setdefault(model, {})
    cached = graphs.get(key)
    if cached is not None and cached.fingerprint == fingerprint:
        return cached, norm

    source = body
    if converted:  # the native engine follows the inputs' dtype and device; so do we (a copy)
        source = copy.deepcopy(body).to(dtype=dtype, device=device)
    bound_opts = {
        "conv_mode": conv_mode,
        "activation_bound_option": _SLOPE_RULES[opts.slope],
        # Bound by CROWN every neuron that intervals do not prove stable (never fall back to
        # bounding all of them), as the native engine does.
        "minimum_sparsity": 1.0,
        # Parameters keep their requires_grad (auto_LiRPA would set it from the mode).
        "param": {"auto_requires_grad": False},
    }
    dummy = torch.zeros(1, *in_shape, dtype=dtype, device=device)
    with _untouched(source), warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # tracing warnings the user can do nothing about
        source.eval()
        try:
            bounded = lirpa.BoundedModule(source, dummy, bound_opts=bound_opts, device=device)
        except Exception as e:  # auto_LiRPA's conversion errors are of many types
            first = str(e).splitlines()[0] if str(e) else "no message"
            raise UnsupportedLayerError(
                f"auto_LiRPA cannot bound this model ({type(e).__name__}: {first}); use a "
                "model of layers auto_LiRPA supports, or the native engine.") from e
    bounded.eval()
    params = {id(p) for p in bounded.parameters()}
    shared = all(id(p) in params for p in source.parameters())
    graph_buffers = dict(bounded.named_buffers())
    pairs = [(b, graph_buffers[name]) for name, b in source.named_buffers()
             if name in graph_buffers and graph_buffers[name].shape == b.shape]
    if not shared or len(pairs) != len(list(source.buffers())):
        # The graph holds copies we cannot track: never reuse it for a later call.
        fingerprint = ("uncached", id(bounded))
    with torch.no_grad():
        out_shape = tuple(bounded(dummy).shape[1:])
    graph = _Graph(bounded, pairs, out_shape, fingerprint)
    graphs[key] = graph
    return graph, norm


# --- the entry points --------------------------------------------------------------------------


def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise unknown_name("auto-lirpa method", str(method), list_auto_lirpa_methods())
    return _METHODS[method]


def auto_lirpa_bounds(model: nn.Module, x_lo: Tensor, x_hi: Tensor, method: str = "crown",
                      spec: Tensor | None = None, *,
                      intermediate: tuple[Bounds, ...] | None = None,
                      **options: Any) -> Bounds:
    """Sound bounds of ``spec @ f(x)`` for every ``x`` in the box ``[x_lo, x_hi]``, by auto_LiRPA.

    The same contract as :func:`certify.bounds.compute_bounds`, for any model auto_LiRPA can
    trace (e.g. with MaxPool2d or residual connections). The box is per sample and in pixel
    space; a leading ``Normalize`` is handled exactly (see the module docstring).

    Args:
        model: The classifier, an ``nn.Module`` taking `(N, C, H, W)`; bounded in eval mode.
        x_lo, x_hi: The box `(N, C, H, W)`, float32 or float64; the bounds follow their dtype
            and device (a model of another dtype/device is bounded through a converted copy).
        method: ``ibp``, ``crown``, ``crown-ibp`` or ``alpha-crown``.
        spec: `(N, S, K)`; None bounds the outputs themselves.
        intermediate: Pre-activation bounds to use instead of the method's own, one
            :class:`Bounds` per ReLU in graph order (e.g. from :func:`auto_lirpa_intermediate`
            or the native engine's ``get_method(m).intermediate(...)``), to compare methods and
            engines with the *same* intermediate bounds.
        **options: Fields of :class:`AutoLirpaOptions`.

    Returns:
        :class:`certify.bounds.Bounds` `(N, S)`, or `(N, *output_shape)` without a spec.
        ``ibp``, ``crown`` and ``crown-ibp`` are differentiable with respect to the weights
        (under autograd); ``alpha-crown`` returns detached bounds.

    Raises:
        CertifyError: if auto_LiRPA is not installed (one line with the install command).
        UnknownNameError: for an unknown method.
        SpecError: for an unknown option, an empty or malformed box or spec.
        UnsupportedLayerError: if auto_LiRPA cannot convert the model.
    """
    al_method = _check_method(method)
    graph, norm, opts = _prepare(model, x_lo, x_hi, options)
    n = x_lo.shape[0]
    k = math.prod(graph.output_shape)
    if spec is not None:
        if (not isinstance(spec, Tensor) or not spec.is_floating_point() or spec.ndim != 3
                or spec.shape[0] != n or spec.shape[2] != k):
            got = tuple(spec.shape) if isinstance(spec, Tensor) else type(spec).__name__
            raise SpecError(f"spec must be a float tensor of shape (N={n}, S, K={k}), got {got}.")
        if not torch.isfinite(spec).all():
            raise SpecError("spec contains NaN or inf.")
        spec = spec.to(dtype=x_lo.dtype, device=x_lo.device)
    # Without a spec, bound the outputs through an explicit identity (auto_LiRPA's implicit one
    # is float32 whatever the model's dtype).
    spec_t = spec if spec is not None else torch.eye(
        k, dtype=x_lo.dtype, device=x_lo.device).expand(n, k, k)
    interm = None if intermediate is None else _interm_bounds(graph, intermediate, x_lo)
    if al_method == "CROWN-Optimized" and x_lo.dtype != torch.float32 and any(
            type(node).__name__ == "BoundMaxPool" for node in graph.bounded.nodes()):
        raise SpecError("auto_LiRPA's alpha-crown keeps MaxPool slopes in float32 and fails on "
                        f"{x_lo.dtype} inputs; use float32 inputs, or method crown.")
    if n == 0:
        empty = x_lo.new_zeros(0, spec_t.shape[1])
        lower, upper = empty, empty
    else:
        step = opts.chunk_size or n
        parts = []
        for first in range(0, n, step):
            rows = slice(first, first + step)
            chunk_interm = None if interm is None else {
                name: (lo[rows], hi[rows]) for name, (lo, hi) in interm.items()}
            parts.append(_run(graph, norm, x_lo[rows], x_hi[rows], spec_t[rows], al_method,
                              opts, chunk_interm)[:2])
        lower = torch.cat([p[0] for p in parts])
        upper = torch.cat([p[1] for p in parts])
    if spec is None and len(graph.output_shape) != 1:
        lower = lower.reshape(n, *graph.output_shape)
        upper = upper.reshape(n, *graph.output_shape)
    return Bounds(lower, upper)


def auto_lirpa_intermediate(model: nn.Module, x_lo: Tensor, x_hi: Tensor,
                            method: str = "crown", **options: Any) -> tuple[Bounds, ...]:
    """auto_LiRPA's pre-activation bounds of every ReLU input, in graph order.

    Args:
        model, x_lo, x_hi, options: As for :func:`auto_lirpa_bounds`.
        method: ``crown`` (CROWN intermediate bounds, intersected with IBP unless
            ``intersect_ibp=False``; also those of ``alpha-crown``) or ``ibp`` (also those of
            ``crown-ibp``).

    Returns:
        One :class:`certify.bounds.Bounds` `(N, *shape)` per ReLU.

    Raises:
        As :func:`auto_lirpa_bounds`; UnknownNameError for another method.
    """
    if method not in ("crown", "ibp"):
        raise unknown_name("auto-lirpa intermediate method", str(method), ("crown", "ibp"))
    graph, norm, opts = _prepare(model, x_lo, x_hi, options)
    n = x_lo.shape[0]
    k = math.prod(graph.output_shape)
    spec = torch.eye(k, dtype=x_lo.dtype, device=x_lo.device)[:1].expand(n, 1, k)
    _, _, found = _run(graph, norm, x_lo, x_hi, spec, _METHODS[method], opts, None,
                       want_intermediate=True)
    assert found is not None
    return tuple(Bounds(lo.detach(), hi.detach()) for lo, hi in found)


def _prepare(model: nn.Module, x_lo: Tensor, x_hi: Tensor,
             options: dict[str, Any]) -> tuple[_Graph, Normalize | None, AutoLirpaOptions]:
    opts = AutoLirpaOptions.from_kwargs(options)
    require_auto_lirpa()
    if not isinstance(model, nn.Module):
        raise SpecError(f"the auto-lirpa engine bounds an nn.Module, got {type(model).__name__}.")
    from certify.bounds.api import check_box

    check_box(x_lo, x_hi)  # the native engine's validation: the same rules, the same messages
    graph, norm = _graph(model, tuple(x_lo.shape[1:]), x_lo.dtype, x_lo.device, opts)
    return graph, norm, opts


def _interm_bounds(graph: _Graph, intermediate: tuple[Bounds, ...],
                   like: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """auto_LiRPA's `interm_bounds`: ReLU input node name -> (lower, upper)."""
    relus = graph.bounded.relus
    if len(intermediate) != len(relus):
        raise SpecError(f"intermediate must hold one Bounds per ReLU ({len(relus)}), got "
                        f"{len(intermediate)}.")
    out = {}
    for relu, b in zip(relus, intermediate, strict=True):
        pre = relu.inputs[0]
        want = (like.shape[0], *pre.output_shape[1:])
        if tuple(b.lower.shape) != want or tuple(b.upper.shape) != want:
            raise SpecError(f"intermediate bounds of {pre.name} must have shape {want}, got "
                            f"{tuple(b.lower.shape)}.")
        out[pre.name] = (b.lower.to(like), b.upper.to(like))
    return out


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _run(graph: _Graph, norm: Normalize | None, x_lo: Tensor, x_hi: Tensor, spec: Tensor,
         al_method: str, opts: AutoLirpaOptions,
         interm: dict[str, tuple[Tensor, Tensor]] | None, *, want_intermediate: bool = False,
         ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]] | None]:
    """auto_LiRPA's bounds of `spec @ f(x)` `(N, S)` over the pixel box (and, if wanted, the
    bounds of every ReLU input)."""
    lirpa = require_auto_lirpa()
    if norm is not None:  # Normalize's own arithmetic on both ends: exact (module docstring)
        mean = cast(Tensor, norm.mean).to(dtype=x_lo.dtype, device=x_lo.device)
        std = cast(Tensor, norm.std).to(dtype=x_lo.dtype, device=x_lo.device)
        x_lo, x_hi = (x_lo - mean) / std, (x_hi - mean) / std
    with torch.no_grad():
        for source, copy_ in graph.buffers:
            copy_.copy_(source)
    bounded = graph.bounded
    bounded.eval()
    bounded.set_bound_opts({
        "compare_crown_with_ibp": opts.intersect_ibp and al_method != "CROWN-IBP",
        "optimize_bound_args": {"iteration": opts.alpha_steps, "lr_alpha": opts.alpha_lr},
    })
    center = (x_lo + x_hi) / 2
    region = lirpa.PerturbationLpNorm(norm=float("inf"), x_L=x_lo, x_U=x_hi)
    x = lirpa.BoundedTensor(center, region)
    # alpha-CROWN prints its early stops on stdout, which is for results: swallow them. It also
    # casts its best bounds to torch's default dtype in the last iteration (a float64 lower
    # bound rounded to float32 can round up: unsound), so the default follows the inputs here.
    with contextlib.redirect_stdout(io.StringIO()), _default_dtype(x_lo.dtype):
        if al_method != "CROWN-Optimized":
            lower, upper = bounded.compute_bounds(x=(x,), method=al_method, C=spec,
                                                  interm_bounds=interm)
        else:
            with torch.enable_grad():  # the slopes are optimized by gradient ascent
                lower, _ = bounded.compute_bounds(x=(x,), method=al_method, C=spec,
                                                  bound_upper=False, interm_bounds=interm)
                if opts.optimize_upper:
                    _, upper = bounded.compute_bounds(x=(x,), method=al_method, C=spec,
                                                      bound_lower=False, interm_bounds=interm)
            if not opts.optimize_upper:
                with torch.no_grad():
                    _, upper = bounded.compute_bounds(x=(x,), method="CROWN", C=spec,
                                                      bound_lower=False, interm_bounds=interm)
            lower, upper = lower.detach(), upper.detach()
    found = None
    if want_intermediate:
        found = [(r.inputs[0].lower, r.inputs[0].upper) for r in bounded.relus]
    return lower, upper, found


def auto_lirpa_margin_bounds(model: nn.Module, x: Tensor, y: Tensor, eps: float | Tensor,
                             method: str = "crown", **options: Any) -> Bounds:
    """Bounds of the margins ``f_y(x') - f_j(x')``, ``j != y``, over ``clip(x ± eps, 0, 1)``.

    The auto-lirpa counterpart of :func:`certify.bounds.margin_bounds`; a sample is verified at
    `eps` iff ``lower.min(1) > 0`` (strictly).

    Args:
        model: As for :func:`auto_lirpa_bounds`.
        x: Images `(N, C, H, W)` in [0, 1].
        y: Labels `(N,)`.
        eps: A float or per-sample radii `(N,)`, >= 0, in pixel units.
        method: As for :func:`auto_lirpa_bounds`.
        **options: Fields of :class:`AutoLirpaOptions`.

    Returns:
        :class:`certify.bounds.Bounds` `(N, K - 1)`, columns in the order of
        :func:`certify.spec.margin_spec`.

    Raises:
        CertifyError: if auto_LiRPA is not installed.
        SpecError: for eps < 0, x outside [0, 1], labels out of range or mismatched shapes.
    """
    from certify.spec import LinfBall, margin_spec

    _check_method(method)
    opts = AutoLirpaOptions.from_kwargs(options)
    require_auto_lirpa()
    region = LinfBall(x, eps)  # type: ignore[arg-type]  # a float eps is taken as float64
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise SpecError(f"labels must have shape ({x.shape[0]},), one per image, got {got}.")
    if x.dtype not in _DTYPES:
        raise SpecError(f"x must be float32 or float64, got {x.dtype}.")
    if not isinstance(model, nn.Module):
        raise SpecError(f"the auto-lirpa engine bounds an nn.Module, got {type(model).__name__}.")
    graph, _ = _graph(model, tuple(x.shape[1:]), x.dtype, x.device, opts)
    k = math.prod(graph.output_shape)
    spec = margin_spec(y.to(x.device), k).to(x.dtype)
    x_lo, x_hi = region.box()
    return auto_lirpa_bounds(model, x_lo, x_hi, method, spec, **options)


# --- registered methods ------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoLirpaMethod(AutoLirpaOptions, MethodBase):
    """An auto_LiRPA method in the method registry; its fields are :class:`AutoLirpaOptions`.

    It bounds the ``nn.Module`` (``takes_module``): :func:`certify.bounds.compute_bounds` hands
    it the model as given, so models the native engine has no rule for work too.
    """

    native: ClassVar[str]
    takes_module: ClassVar[bool] = True
    external: ClassVar[bool] = True
    serves_intermediate: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_auto_lirpa()  # fail when configured, before any work, with the install line

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AutoLirpaOptions)}

    def bound_module(self, model: nn.Module, x_lo: Tensor, x_hi: Tensor,
                     spec: Tensor | None = None, *,
                     intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """auto_LiRPA's bounds of ``spec @ model(x)`` over the box (see
        :func:`auto_lirpa_bounds`)."""
        return auto_lirpa_bounds(model, x_lo, x_hi, self.native, spec,
                                 intermediate=intermediate, **self.options())

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        return self.bound_module(_module_of(net, self.name), x_lo, x_hi, spec,
                                 intermediate=intermediate)

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor) -> tuple[Bounds, ...]:
        kind = "ibp" if self.native in ("ibp", "crown-ibp") else "crown"
        return auto_lirpa_intermediate(_module_of(net, self.name), x_lo, x_hi, kind,
                                       **self.options())

    def search_pair(self) -> tuple[BoundMethod, BoundMethod | None]:
        """auto_LiRPA steers the search; the native rigorous bound of the same method confirms
        every radius (auto_LiRPA has no rounding control)."""
        return self, get_method(self.native)

    def info(self) -> dict[str, Any]:
        return {**engine_info(), "method": self.name, "options": self.options()}


def _module_of(net: Network, name: str) -> nn.Module:
    if net.source is None:
        raise SpecError(f"{name} bounds an nn.Module; pass the model, not a Network built "
                        "from layers.")
    return net.source


def _register(native: str) -> type[AutoLirpaMethod]:
    cls = type(f"AutoLirpa_{native.replace('-', '_')}", (AutoLirpaMethod,),
               {"native": native, "display_name": f"auto_LiRPA {native}",
                "__doc__": f"auto_LiRPA's {native} (:class:`AutoLirpaMethod`)."})
    return register_method(f"lirpa-{native}")(dataclass(frozen=True)(cls))


for _native in _METHODS:
    _register(_native)
