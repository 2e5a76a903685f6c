"""The layer rule table: one small op type per supported layer, one function per (op, mode).

A :class:`~certify.bounds.network.Network` is a tuple of ops. Every op except the nonlinear
ones (:class:`ReluOp`, :class:`LeakyReluOp`, :class:`SigmoidOp`, :class:`TanhOp`,
:class:`MaxPoolOp`: rows of :data:`certify.bounds.relaxations.ACTIVATIONS`, relaxed over
bounds of their input) is affine,
``y = L(x) + b``, and has four rules in :data:`RULES`:

``forward(op, x)``
    ``L(x) + b`` on a batch `(B, *in_shape)`.
``linear(op, x)``
    ``L(x)``, the linear part (no bias): forward-mode propagation of coefficients.
``abs_linear(op, x)``
    ``|L|(x)``, the map with absolute weights: interval radii and forward-mode widths.
``backward(op, A)``
    The transpose: for rows ``A`` `(P, *out_shape)` of a linear function ``A · y``, returns
    ``(A L, A · b)``, i.e. rows `(P, *in_shape)` and the constant `(P,)` (or None).
``terms(op)``
    How many rounded operations add up into one coordinate of ``L(x) + b``, of the transpose
    ``A L``, and of one constant ``A · b``: the ``k`` of the ``gamma_k`` error bounds
    (:mod:`certify.bounds.rounding`); all 0 for an exact op (a reshape).
``backward_window(op, A, top, left)`` (optional)
    The same for rows that are zero outside a spatial window of a feature map (a conv neuron's
    receptive field): only the window is stored and propagated.

Intervals of an affine op follow from ``forward`` and ``abs_linear`` (center and radius), see
:func:`interval_affine`.

**Exactness.** An op's tensors may differ from the exact layer they stand for (a folded
BatchNorm's ``rsqrt``, ``1/std``, a folded specification, a cast to a narrower dtype): the
optional ``*_err`` fields bound that difference elementwise, and :func:`abs_op` /
:func:`err_op` give the ops with ``|weights|`` and with the error bounds as weights, which the
rigorous rules use to bound rounding. The relaxations of the nonlinear ops (ReLU, LeakyReLU,
Sigmoid, Tanh, MaxPool2d) are rows of :data:`certify.bounds.relaxations.ACTIVATIONS`; their
rows here have only ``forward`` (the model's own computation; its rounding is the
``ACTIVATIONS`` row's ``rounding``), ``cost`` and ``terms``.

A new layer type means a new op dataclass, a row in :data:`RULES` and a converter in
:data:`CONVERTERS`, all here (an activation also a row in ``ACTIVATIONS``, and LP/MILP a row in
the encoding table) -- no ``isinstance`` chains; see CONTRIBUTING.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from math import prod
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certify.bounds import rounding
from certify.nets.layers import Normalize, Permute, Reshape
from certify.spec import round_to

Shape = tuple[int, ...]

__all__ = [
    "CONVERTERS",
    "RULES",
    "SUPPORTED",
    "AdaptiveAvgPoolOp",
    "AddOp",
    "AvgPoolOp",
    "ConcatOp",
    "ConvOp",
    "FlattenOp",
    "LeakyReluOp",
    "LinearOp",
    "MaxPoolOp",
    "Op",
    "PermuteOp",
    "ReluOp",
    "ScaleShiftOp",
    "SigmoidOp",
    "SpecLinearOp",
    "SpecRows",
    "TanhOp",
    "interval_affine",
    "is_merge",
    "merge_backward",
    "merge_forward",
    "merge_interval",
    "reshape_op",
]


# --- ops -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LinearOp:
    """``y = W x + b``; `weight` `(O, I)`, `bias` `(O,)` or None; flat input `(I,)`."""

    weight: Tensor
    bias: Tensor | None
    in_shape: Shape
    out_shape: Shape
    weight_err: Tensor | None = None
    bias_err: Tensor | None = None


@dataclass(frozen=True, eq=False)
class ConvOp:
    """2-D convolution (zero padding, dilation 1, groups 1); `weight` `(Co, Ci, kh, kw)`."""

    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_shape: Shape
    out_shape: Shape
    weight_err: Tensor | None = None
    bias_err: Tensor | None = None

    @property
    def output_padding(self) -> tuple[int, int]:
        """What `conv_transpose2d` needs to give back exactly `in_shape`."""
        return tuple(  # type: ignore[return-value]
            self.in_shape[1 + i] - ((self.out_shape[1 + i] - 1) * self.stride[i]
                                    - 2 * self.padding[i] + self.weight.shape[2 + i])
            for i in range(2))


@dataclass(frozen=True, eq=False)
class ScaleShiftOp:
    """Elementwise ``y = x * scale + shift``; `scale`, `shift` broadcast to `in_shape`.

    Normalize (``scale = 1/std``, ``shift = -mean/std``) and eval-mode BatchNorm2d (which may
    have negative scales) are such ops; per-channel tensors have shape `(C, 1, 1)`.
    """

    scale: Tensor
    shift: Tensor
    in_shape: Shape
    out_shape: Shape
    scale_err: Tensor | None = None
    shift_err: Tensor | None = None


@dataclass(frozen=True, eq=False)
class AvgPoolOp:
    """2-D average pooling, every option of ``nn.AvgPool2d`` (a nonnegative linear map)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None
    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class FlattenOp:
    """Flatten every dimension but the batch."""

    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class AdaptiveAvgPoolOp:
    """``nn.AdaptiveAvgPool2d``: output cell ``(i, j)`` is the mean of the input rows
    ``floor(i H / oh) .. ceil((i + 1) H / oh) - 1`` and the columns likewise (a nonnegative
    linear map; ``output_size = (1, 1)`` is global average pooling)."""

    output_size: tuple[int, int]
    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class ReluOp:
    """``y = max(x, 0)``, relaxed in :mod:`certify.bounds.relaxations`."""

    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class LeakyReluOp:
    """``y = x`` for ``x >= 0``, ``negative_slope * x`` otherwise, with ``0 <= negative_slope
    <= 1`` (then convex and monotone); `negative_slope` is the exact layer's slope (the Python
    float of ``nn.LeakyReLU``, a float64 number)."""

    negative_slope: float
    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class SigmoidOp:
    """``y = 1 / (1 + exp(-x))``, relaxed by tangent and secant lines."""

    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class TanhOp:
    """``y = tanh(x)``, relaxed by tangent and secant lines."""

    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class PermuteOp:
    """Per sample: re-shape to ``source`` (row-major order kept), then permute its dimensions by
    `dims` (output dimension ``i`` is ``source`` dimension ``dims[i]``).

    A permutation of the coordinates, ``y = P x`` with a 0/1 matrix ``P`` having one 1 per row
    and per column: exact in floating point (values are moved, never computed), ``|P| = P``,
    and its transpose is the inverse permutation. A pure reshape is ``dims = (0, 1, ...)``:
    the one op of every reshape but a flatten to a vector (:func:`reshape_op`).
    """

    dims: tuple[int, ...]
    in_shape: Shape
    out_shape: Shape

    @property
    def source(self) -> Shape:
        """The shape the input is re-shaped to before the permutation."""
        shape = [0] * len(self.dims)
        for i, d in enumerate(self.dims):
            shape[d] = self.out_shape[i]
        return tuple(shape)


@dataclass(frozen=True, eq=False)
class SpecRows:
    """The specification as the starting matrix of the backward pass: one matrix per sample.

    ``spec(h)[n] = W[n] h[n] + b[n]`` on the output `h` of a network body, with `weight`
    `(N, S, I)` and `bias` `(N, S)`. When the network ends in a Linear layer, that layer is
    folded in (``W = spec @ W_last``, with the products' rounding in `weight_err`/`bias_err`)
    and the body stops before it (see :func:`certify.bounds.network.spec_rows`). It is not an
    op of any network; its row in :data:`RULES` gives its interval image (IBP's last step).
    """

    weight: Tensor
    bias: Tensor
    in_shape: Shape
    out_shape: Shape
    weight_err: Tensor | None = None
    bias_err: Tensor | None = None


@dataclass(frozen=True, eq=False)
class MaxPoolOp:
    """2-D max pooling (``nn.MaxPool2d`` with dilation 1 and ``ceil_mode=False``): every output
    is the max of its window of the input map, padding positions left out (they are -inf).

    Nonlinear: relaxed over bounds of its input in :mod:`certify.bounds.maxpool` (a row of
    :data:`certify.bounds.relaxations.ACTIVATIONS`), like a ReLU.
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class AddOp:
    """``y = x_1 + x_2``: the sum of two nodes of the same shape (a residual connection).

    A *merge* op: it takes two inputs (see ``Network.inputs``), so it has no row in
    :data:`RULES`' single-input form; :func:`merge_forward`, :func:`merge_backward` and
    :func:`merge_interval` are its rules. Its transpose copies the rows to both inputs (exact:
    nothing is computed); the sums happen where the rows of several consumers of one node meet
    (accounted in ``Propagator``), and the model's own rounding of ``x_1 + x_2`` in
    :mod:`certify.bounds.forward_error`.
    """

    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True, eq=False)
class ConcatOp:
    """Concatenation of its input nodes along per-sample dimension `dim` (0: channels of a
    `(C, H, W)` map); `sizes` is each input's extent along `dim`, `in_shape` the first
    input's shape. A merge op (see :class:`AddOp`): values are moved, never computed, so it is
    exact in every mode, and its transpose splits the rows."""

    dim: int
    sizes: tuple[int, ...]
    in_shape: Shape
    out_shape: Shape

    def input_shape(self, k: int) -> Shape:
        """The shape of input `k`."""
        shape = list(self.out_shape)
        shape[self.dim] = self.sizes[k]
        return tuple(shape)


SpecLinearOp = SpecRows  # the LP/MILP encodings' name for the rows at the end of a network


Op = (LinearOp | ConvOp | ScaleShiftOp | AvgPoolOp | AdaptiveAvgPoolOp | FlattenOp | PermuteOp
      | ReluOp | LeakyReluOp | SigmoidOp | TanhOp | MaxPoolOp | AddOp | ConcatOp)
# an op or the specification's rows: what the error-field helpers take and give back
_AnyOp = TypeVar("_AnyOp", bound="Op | SpecRows")


def tensor_fields(op: Any) -> list[str]:
    """Names of the tensor-valued fields of an op (weights, biases, scales)."""
    return [f.name for f in fields(op) if isinstance(getattr(op, f.name), Tensor)]


def cast_op(op: _AnyOp, dtype: torch.dtype, device: torch.device) -> _AnyOp:
    """The op with its tensors on `device` in `dtype` (the same op when nothing changes).

    A cast to a narrower dtype rounds the op's tensors: what it moves them by is added to
    their error fields, and error fields are rounded up, so they still bound the distance to
    the exact op.
    """
    changes: dict[str, Any] = {}
    err_names = set(ERR_FIELDS.values())

    def narrower(t: Tensor) -> bool:
        return torch.finfo(dtype).eps > torch.finfo(t.dtype).eps

    def cast_up(t: Tensor) -> Tensor:
        return round_to(t, dtype, up=True).to(device)

    for name in tensor_fields(op):  # weights first: a narrowing cast adds to their errors
        t = getattr(op, name)
        if name in err_names or (t.dtype == dtype and t.device == device):
            continue
        cast = t.to(device=device, dtype=dtype)
        changes[name] = cast
        if narrower(t):
            moved = cast_up((t.detach() - cast.detach().to(t.device, t.dtype)).abs())
            err_name = ERR_FIELDS[name]
            old = getattr(op, err_name)
            if old is not None:  # the sum rounded up (exact where the cast moved nothing)
                old = cast_up(old)
                moved = torch.where(moved == 0, old, rounding.up(old + moved))
            changes[err_name] = moved
    for name in tensor_fields(op):
        t = getattr(op, name)
        if name in err_names and name not in changes and (t.dtype != dtype
                                                          or t.device != device):
            changes[name] = cast_up(t)
    return replace(op, **changes) if changes else op


def is_mixing(op: Op) -> bool:
    """Whether an output coordinate depends on several input coordinates.

    Interval arithmetic is exact for a chain of affine ops with at most one mixing op.
    """
    return isinstance(op, (LinearOp, ConvOp, AvgPoolOp, AdaptiveAvgPoolOp, SpecRows))


def numel(shape: Shape) -> int:
    return prod(shape)


def true_first(mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Per row of `mask` `(N, K)`: the indices of its True entries in order, then of the
    others, `width` of them, and which of those are True, `(N, width)` each: the gather
    indices of a padded batch of each row's selected entries."""
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True,
                       stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < mask.sum(1)[:, None]
    return order, valid


def rows_of(t: Tensor, samples: Tensor) -> Tensor:
    """The rows `samples` `(B,)` of per-sample data `t` `(N, ...)`, as ``index_select``; on
    the CPU, a view of `t` (not a copy: callers only read it) when `samples` are consecutive
    rows in order, as in a pass over a whole batch or over one block of it, where the copy
    would be one more pass over `t`'s memory for nothing. (On a GPU the check would wait for
    the device; the copy is cheap.)"""
    b = int(samples.shape[0])
    if samples.device.type == "cpu" and 0 < b <= t.shape[0]:
        first = int(samples[0])
        if (first + b <= t.shape[0] and int(samples[-1]) == first + b - 1
                and bool(torch.equal(samples, torch.arange(first, first + b)))):
            return t if b == t.shape[0] else t[first:first + b]
    return t.index_select(0, samples)


# --- rules: Linear ---------------------------------------------------------------------------


def forward_linear(op: LinearOp, x: Tensor) -> Tensor:
    return F.linear(x, op.weight, op.bias)


def linear_linear(op: LinearOp, x: Tensor) -> Tensor:
    return F.linear(x, op.weight)


def abs_linear_linear(op: LinearOp, x: Tensor) -> Tensor:
    return F.linear(x, op.weight.abs())


def backward_linear(op: LinearOp, a: Tensor) -> tuple[Tensor, Tensor | None]:
    const = a @ op.bias if op.bias is not None else None
    return a @ op.weight, const


def cost_linear(op: LinearOp) -> int:
    return numel(tuple(op.weight.shape))


# --- rules: Conv2d ---------------------------------------------------------------------------


def forward_conv(op: ConvOp, x: Tensor) -> Tensor:
    return F.conv2d(x, op.weight, op.bias, op.stride, op.padding)


def linear_conv(op: ConvOp, x: Tensor) -> Tensor:
    return F.conv2d(x, op.weight, None, op.stride, op.padding)


def abs_linear_conv(op: ConvOp, x: Tensor) -> Tensor:
    return F.conv2d(x, op.weight.abs(), None, op.stride, op.padding)


# The transpose of a small convolution is faster as one matrix product with its dense matrix
# than as `conv_transpose2d` (whose CPU kernel pays a fixed cost per row: 10x slower on digits
# CNNs' 4x4 maps): the dense matrix is used where it holds at most DENSE_MAX_ENTRIES entries and
# costs at most DENSE_MAX_RATIO times the transposed convolution's multiply-adds, or at most
# DENSE_SMALL_MACS per row (there the fixed cost dominates). Its entries are the weights
# themselves, placed by index (exact), and the products it adds beyond the convolution's are
# exact zeros, so every sum has the same rounded terms: the `terms` rule stands.
DENSE_MAX_ENTRIES = 1 << 22
DENSE_MAX_RATIO = 2.5
DENSE_SMALL_MACS = 1 << 18
_DENSE: weakref.WeakKeyDictionary[ConvOp, dict[tuple[Any, ...], Tensor]] = (
    weakref.WeakKeyDictionary())


def dense_transpose(op: ConvOp, h: int, w: int, padded: bool) -> Tensor | None:
    """The convolution's transpose for `h x w` output maps as a dense matrix, its columns
    shaped as the input map, `(Co h w, Ci, H, W)`, or None where `conv_transpose2d` is cheaper
    (see DENSE_MAX_RATIO).

    `padded`: the whole output map of `op` (``in_shape`` back, padding dropped); else an output
    window without padding (the input window ``((h - 1) s + kh, (w - 1) s + kw)``)."""
    co, ci, kh, kw = op.weight.shape
    sh, sw = op.stride
    ph, pw = op.padding if padded else (0, 0)
    hi, wi = op.in_shape[1:] if padded else ((h - 1) * sh + kh, (w - 1) * sw + kw)
    entries = co * h * w * ci * hi * wi  # also the multiply-adds per row
    macs = co * h * w * ci * kh * kw
    if entries > DENSE_MAX_ENTRIES or (entries > DENSE_MAX_RATIO * macs
                                       and entries > DENSE_SMALL_MACS):
        return None
    cache = _DENSE.setdefault(op, {})
    key = (h, w, padded, op.weight.dtype, op.weight.device)
    if key not in cache:
        dev, weight = op.weight.device, op.weight.detach()
        dense = torch.zeros(co, h, w, ci, hi, wi, dtype=weight.dtype, device=dev)
        # (output row, output column, input row, input column, Co, Ci): one kernel tap at a time
        view = dense.permute(1, 2, 4, 5, 0, 3)
        rows, cols = torch.arange(h, device=dev) * sh - ph, torch.arange(w, device=dev) * sw - pw
        for ki in range(kh):
            for kj in range(kw):
                y, x = rows + ki, cols + kj
                iy = ((y >= 0) & (y < hi)).nonzero(as_tuple=True)[0]
                jx = ((x >= 0) & (x < wi)).nonzero(as_tuple=True)[0]
                view[iy[:, None], jx[None, :], y[iy][:, None], x[jx][None, :]] = (
                    weight[:, :, ki, kj])
        cache[key] = dense.view(co * h * w, ci, hi, wi)
    return cache[key]


def _dense_backward(op: ConvOp, a: Tensor, padded: bool) -> Tensor | None:
    """`a` `(P, Co, h, w)` through :func:`dense_transpose`'s matrix, `(P, Ci, H, W)`; None
    where `conv_transpose2d` is cheaper."""
    dense = dense_transpose(op, a.shape[2], a.shape[3], padded)
    if dense is None:
        return None
    return (a.reshape(a.shape[0], -1) @ dense.flatten(1)).view(a.shape[0], *dense.shape[1:])


# On CPUs, two more forms of the transpose beat `conv_transpose2d` by shape (measured by
# benchmarks/bench_transpose.py on svhn-teacher's shapes, one thread): float32 rows into a map
# of at most FOLD_MAX_CHANNELS channels (the input) as one batched product with the kernel's
# matrix and `F.fold` (1.2-1.8x); float64 rows on windows of at most GEMM_MAX_WINDOW positions
# and at least GEMM_MIN_CHANNELS channels (a deep neuron's window) as one product of all rows
# at once and `F.fold` (1.7-4.3x: float64's `conv_transpose2d` runs small products per row).
# Both sum the same products as `conv_transpose2d`, in another order, so the `terms` rule
# stands (gamma_k bounds a sum of k terms in any order).
FOLD_MAX_CHANNELS = 3
GEMM_MAX_WINDOW = 16
GEMM_MIN_CHANNELS = 64


def _fold_backward(op: ConvOp, a: Tensor, padded: bool) -> Tensor | None:
    """`a` `(P, Co, h, w)` through the transpose as products with the kernel matrix and
    `F.fold` (see FOLD_MAX_CHANNELS), `(P, Ci, H, W)`; None where `conv_transpose2d` is
    faster."""
    co, ci, kh, kw = op.weight.shape
    p, h, w = a.shape[0], a.shape[2], a.shape[3]
    if a.device.type != "cpu" or p == 0:
        return None
    narrow = ci <= FOLD_MAX_CHANNELS and a.dtype == torch.float32
    window = (a.dtype == torch.float64 and h * w <= GEMM_MAX_WINDOW
              and co >= GEMM_MIN_CHANNELS)
    if not (narrow or window):
        return None
    kernel = op.weight.reshape(co, ci * kh * kw).t()  # (Ci kh kw, Co)
    if narrow:  # one product per row, batched
        cols = kernel @ a.reshape(p, co, h * w)
    else:  # one product for all rows
        cols = (kernel @ a.transpose(0, 1).reshape(co, p * h * w)).view(
            ci * kh * kw, p, h * w).transpose(0, 1)
    if padded:
        size, padding = tuple(op.in_shape[1:]), op.padding
    else:
        size, padding = ((h - 1) * op.stride[0] + kh, (w - 1) * op.stride[1] + kw), (0, 0)
    return F.fold(cols, size, (kh, kw), padding=padding, stride=op.stride)


def _transpose(op: ConvOp, a: Tensor, padded: bool) -> Tensor:
    """`a` `(P, Co, h, w)` through the convolution's transpose in the cheapest form: the dense
    matrix, a fold form, else `conv_transpose2d`. `padded`: as for :func:`dense_transpose`."""
    out = _dense_backward(op, a, padded)
    if out is None:
        out = _fold_backward(op, a, padded)
    if out is None:
        out = (F.conv_transpose2d(a, op.weight, None, op.stride, op.padding, op.output_padding)
               if padded else F.conv_transpose2d(a, op.weight, None, op.stride))
    return out


def backward_conv(op: ConvOp, a: Tensor) -> tuple[Tensor, Tensor | None]:
    const = a.sum((2, 3)) @ op.bias if op.bias is not None else None
    return _transpose(op, a, padded=True), const


def backward_window_conv(op: ConvOp, a: Tensor, top: int, left: int
                         ) -> tuple[Tensor, Tensor | None, int, int]:
    """Transpose of the convolution for rows supported on a window of the output map.

    `a` `(P, Co, h, w)` holds the window whose top-left corner is `(top, left)` in the output
    map; the result is the window of the input map it touches (padding positions dropped),
    with its corner. Exact: outside the windows the rows are zero.
    """
    const = a.sum((2, 3)) @ op.bias if op.bias is not None else None
    out = _transpose(op, a, padded=False)
    corner = [top * op.stride[0] - op.padding[0], left * op.stride[1] - op.padding[1]]
    cuts = []
    for i in range(2):
        first = max(0, -corner[i])
        last = min(out.shape[2 + i], op.in_shape[1 + i] - corner[i])
        cuts.append(slice(first, last))
        corner[i] += first
    return out[:, :, cuts[0], cuts[1]], const, corner[0], corner[1]


def window_conv(op: ConvOp, h: int, w: int) -> tuple[int, int]:
    """Size of the input window `backward_window_conv` returns for an `h x w` output window."""
    return (min(op.in_shape[1], (h - 1) * op.stride[0] + op.weight.shape[2]),
            min(op.in_shape[2], (w - 1) * op.stride[1] + op.weight.shape[3]))


def cost_conv(op: ConvOp) -> int:
    return numel(op.out_shape) * numel(tuple(op.weight.shape[1:]))


# --- rules: elementwise scale and shift (Normalize, BatchNorm2d) ------------------------------


def forward_scale_shift(op: ScaleShiftOp, x: Tensor) -> Tensor:
    return x * op.scale + op.shift


def linear_scale_shift(op: ScaleShiftOp, x: Tensor) -> Tensor:
    return x * op.scale


def abs_linear_scale_shift(op: ScaleShiftOp, x: Tensor) -> Tensor:
    return x * op.scale.abs()


def backward_scale_shift(op: ScaleShiftOp, a: Tensor) -> tuple[Tensor, Tensor | None]:
    shift = op.shift
    if shift.ndim == 3 and shift.shape[1:] == (1, 1) and a.ndim == 4:  # per channel
        const = a.sum((2, 3)) @ shift.flatten()
    else:
        const = (a * shift).flatten(1).sum(1)
    return a * op.scale, const


def backward_window_scale_shift(op: ScaleShiftOp, a: Tensor, top: int, left: int
                                ) -> tuple[Tensor, Tensor | None, int, int]:
    h, w = a.shape[2:]
    scale, shift = op.scale, op.shift
    if scale.ndim == 3 and scale.shape[1:] != (1, 1):
        scale = scale[:, top:top + h, left:left + w]
    if shift.ndim == 3 and shift.shape[1:] != (1, 1):
        shift = shift[:, top:top + h, left:left + w]
    out, const = backward_scale_shift(replace(op, scale=scale, shift=shift), a)
    return out, const, top, left


def window_same(op: Op, h: int, w: int) -> tuple[int, int]:
    return h, w


def cost_elementwise(op: Op) -> int:
    return numel(op.in_shape)


# --- rules: AvgPool2d ------------------------------------------------------------------------


def forward_avg_pool(op: AvgPoolOp, x: Tensor) -> Tensor:
    return F.avg_pool2d(x, op.kernel_size, op.stride, op.padding, op.ceil_mode,
                        op.count_include_pad, op.divisor_override)


def backward_avg_pool(op: AvgPoolOp, a: Tensor) -> tuple[Tensor, Tensor | None]:
    # The transpose of average pooling is its gradient; only the template's size is read.
    template = a.new_zeros(()).expand(a.shape[0], *op.in_shape)
    out = torch.ops.aten.avg_pool2d_backward(
        a.contiguous(), template, list(op.kernel_size), list(op.stride), list(op.padding),
        op.ceil_mode, op.count_include_pad, op.divisor_override)
    return out, None


def cost_avg_pool(op: AvgPoolOp) -> int:
    return numel(op.out_shape) * op.kernel_size[0] * op.kernel_size[1]


# --- rules: AdaptiveAvgPool2d ----------------------------------------------------------------


def forward_adaptive_pool(op: AdaptiveAvgPoolOp, x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(x, op.output_size)


def backward_adaptive_pool(op: AdaptiveAvgPoolOp, a: Tensor) -> tuple[Tensor, Tensor | None]:
    # The transpose is the gradient; only the template's size is read.
    template = a.new_zeros(()).expand(a.shape[0], *op.in_shape)
    return torch.ops.aten._adaptive_avg_pool2d_backward(a.contiguous(), template), None


def adaptive_windows(size: int, out: int) -> tuple[int, int]:
    """For one axis of adaptive pooling from `size` to `out` cells: the largest window and the
    most windows any input index lies in."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-((-(i + 1) * size) // out) for i in range(out)]
    widest = max(e - s for s, e in zip(starts, ends, strict=True))
    cover = max(sum(s <= x < e for s, e in zip(starts, ends, strict=True)) for x in range(size))
    return widest, cover


def _adaptive_sizes(op: AdaptiveAvgPoolOp) -> tuple[int, int]:
    (kh, ch), (kw, cw) = (adaptive_windows(op.in_shape[1 + i], op.output_size[i])
                          for i in range(2))
    return kh * kw, ch * cw


def cost_adaptive_pool(op: AdaptiveAvgPoolOp) -> int:
    return numel(op.out_shape) * _adaptive_sizes(op)[0]


def terms_adaptive_pool(op: AdaptiveAvgPoolOp) -> tuple[int, int, int]:
    # forward: a sum of k terms and a division; transpose: a division and a sum per window an
    # input lies in (counted generously, as for AvgPool2d)
    k, cover = _adaptive_sizes(op)
    return k + 1, 2 * max(k, cover), 1


# --- rules: Flatten ---------------------------------------------------------------------------


def forward_flatten(op: FlattenOp, x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def backward_flatten(op: FlattenOp, a: Tensor) -> tuple[Tensor, Tensor | None]:
    return a.reshape(a.shape[0], *op.in_shape), None


# --- rules: per-sample reshape and permutation ----------------------------------------------


def forward_permute(op: PermuteOp, x: Tensor) -> Tensor:
    """``P x``: moves values only (exact); also its linear part and ``|P| x`` (``|P| = P``)."""
    moved = x.reshape(x.shape[0], *op.source).permute(0, *(d + 1 for d in op.dims))
    return moved.contiguous()


def backward_permute(op: PermuteOp, a: Tensor) -> tuple[Tensor, Tensor | None]:
    """``A P``: the inverse permutation applied to the rows (``P^T = P^-1``), then the inverse
    reshape; exact, and no constant (a permutation has no bias)."""
    inverse = [0] * len(op.dims)
    for i, d in enumerate(op.dims):
        inverse[d] = i
    rows = a.reshape(a.shape[0], *op.out_shape).permute(0, *(i + 1 for i in inverse))
    return rows.reshape(a.shape[0], *op.in_shape).contiguous(), None


# --- rules: the folded specification ---------------------------------------------------------


def forward_spec_linear(op: SpecRows, x: Tensor) -> Tensor:
    return torch.einsum("nsi,ni->ns", op.weight, x) + op.bias


def linear_spec_linear(op: SpecRows, x: Tensor) -> Tensor:
    return torch.einsum("nsi,ni->ns", op.weight, x)


def abs_linear_spec_linear(op: SpecRows, x: Tensor) -> Tensor:
    return torch.einsum("nsi,ni->ns", op.weight.abs(), x)


def cost_spec_linear(op: SpecRows) -> int:
    return numel(tuple(op.weight.shape[1:]))



# --- rounding: how many operations add up into one value ----------------------------------


def terms_linear(op: LinearOp) -> tuple[int, int, int]:
    out_features, in_features = op.weight.shape
    return in_features + 1, out_features, out_features


def terms_conv(op: ConvOp) -> tuple[int, int, int]:
    co, ci, kh, kw = op.weight.shape
    # one coordinate of the transpose sums the products of the kernel taps that land on it:
    # ceil(kh / stride) per axis at most (every other product in any algorithm's sum, e.g. a
    # dense matrix's zeros, is an exact 0 and adds exactly)
    taps = -(-kh // op.stride[0]) * -(-kw // op.stride[1])
    return ci * kh * kw + 1, co * taps, co + numel(op.out_shape[1:])


def terms_scale_shift(op: ScaleShiftOp) -> tuple[int, int, int]:
    return 3, 1, numel(op.in_shape)  # forward: (x - mean) / std as the model computes it


def terms_avg_pool(op: AvgPoolOp) -> tuple[int, int, int]:
    k = op.kernel_size[0] * op.kernel_size[1]
    return k + 1, 2 * k, 1


def terms_spec_linear(op: SpecRows) -> tuple[int, int, int]:
    return op.weight.shape[2] + 1, op.weight.shape[1], 1


def terms_exact(op: Op) -> tuple[int, int, int]:
    return 0, 0, 0


# --- activations (forward only; relaxations in certify.bounds.relaxations) ------------------


def forward_relu(op: ReluOp, x: Tensor) -> Tensor:
    return torch.relu(x)


def forward_leaky_relu(op: LeakyReluOp, x: Tensor) -> Tensor:
    return F.leaky_relu(x, op.negative_slope)


def forward_sigmoid(op: SigmoidOp, x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def forward_tanh(op: TanhOp, x: Tensor) -> Tensor:
    return torch.tanh(x)


# --- MaxPool2d (forward only; relaxation in certify.bounds.maxpool) ----------------------------


def forward_max_pool(op: MaxPoolOp, x: Tensor) -> Tensor:
    return F.max_pool2d(x, op.kernel_size, op.stride, op.padding)


def cost_max_pool(op: MaxPoolOp) -> int:
    return numel(op.out_shape) * op.kernel_size[0] * op.kernel_size[1]


# --- merges: Add and Concat (several inputs; see certify.bounds.network.Network.inputs) ------


def is_merge(op: Any) -> bool:
    """Whether `op` takes several input nodes (Add, Concat)."""
    return isinstance(op, (AddOp, ConcatOp))


def merge_forward(op: AddOp | ConcatOp, xs: list[Tensor]) -> Tensor:
    """The merge of batches `(B, *shape_k)` of its inputs (the model's own computation)."""
    if isinstance(op, AddOp):
        return xs[0] + xs[1]
    return torch.cat(xs, op.dim + 1)


def merge_backward(op: AddOp | ConcatOp, a: Tensor) -> list[Tensor]:
    """The transpose on rows `(P, *out_shape)`: rows on each input. Exact (no arithmetic): an
    Add gives its rows to both inputs, a Concat its slices."""
    if isinstance(op, AddOp):
        return [a, a]
    return list(torch.split(a, list(op.sizes), op.dim + 1))


def merge_interval(op: AddOp | ConcatOp, los: list[Tensor], his: list[Tensor], *,
                   rigorous: bool = False) -> tuple[Tensor, Tensor]:
    """Interval image of a merge. Concat is exact; Add is ``[l_1 + l_2, h_1 + h_2]`` (exact
    in exact arithmetic), each sum rounded to nearest once, so with `rigorous` one step
    outward (``rounding.down``/``up``) contains the exact sum (a rounded sum is within half a
    step of it; sums of subnormals are exact)."""
    if isinstance(op, ConcatOp):
        return torch.cat(los, op.dim + 1), torch.cat(his, op.dim + 1)
    lo, hi = los[0] + los[1], his[0] + his[1]
    if rigorous:
        lo, hi = rounding.down(lo), rounding.up(hi)
    return lo, hi


def _merge_single(op: Any, x: Tensor) -> Tensor:
    raise TypeError(f"a {type(op).__name__} takes several inputs: use merge_forward (a network "
                    "with merges is evaluated by Network.forward)")


def terms_add(op: AddOp) -> tuple[int, int, int]:
    return 1, 0, 0


WindowBackward = Callable[[Any, Tensor, int, int], tuple[Tensor, Tensor | None, int, int]]


class OpRules(NamedTuple):
    forward: Callable[[Any, Tensor], Tensor]
    linear: Callable[[Any, Tensor], Tensor] | None
    abs_linear: Callable[[Any, Tensor], Tensor] | None
    backward: Callable[[Any, Tensor], tuple[Tensor, Tensor | None]] | None
    cost: Callable[[Any], int]
    terms: Callable[[Any], tuple[int, int, int]]
    # Optional: backward for rows supported on a spatial window of a (C, H, W) map, and the
    # input window size for an output window size. Ops without it densify the rows first.
    backward_window: WindowBackward | None = None
    window: Callable[[Any, int, int], tuple[int, int]] | None = None


RULES: dict[type, OpRules] = {
    LinearOp: OpRules(forward_linear, linear_linear, abs_linear_linear, backward_linear,
                      cost_linear, terms_linear),
    ConvOp: OpRules(forward_conv, linear_conv, abs_linear_conv, backward_conv, cost_conv,
                    terms_conv, backward_window_conv, window_conv),
    ScaleShiftOp: OpRules(forward_scale_shift, linear_scale_shift, abs_linear_scale_shift,
                          backward_scale_shift, cost_elementwise, terms_scale_shift,
                          backward_window_scale_shift, window_same),
    AvgPoolOp: OpRules(forward_avg_pool, forward_avg_pool, forward_avg_pool, backward_avg_pool,
                       cost_avg_pool, terms_avg_pool),
    AdaptiveAvgPoolOp: OpRules(forward_adaptive_pool, forward_adaptive_pool,
                               forward_adaptive_pool, backward_adaptive_pool, cost_adaptive_pool,
                               terms_adaptive_pool),
    FlattenOp: OpRules(forward_flatten, forward_flatten, forward_flatten, backward_flatten,
                       cost_elementwise, terms_exact),
    # A permutation moves values: exact (terms 0), its own |L| and its transpose the inverse.
    PermuteOp: OpRules(forward_permute, forward_permute, forward_permute, backward_permute,
                       cost_elementwise, terms_exact),
    # The folded specification starts backward passes; it is never propagated through.
    SpecRows: OpRules(forward_spec_linear, linear_spec_linear, abs_linear_spec_linear, None,
                          cost_spec_linear, terms_spec_linear),
    ReluOp: OpRules(forward_relu, None, None, None, cost_elementwise, terms_exact),
    LeakyReluOp: OpRules(forward_leaky_relu, None, None, None, cost_elementwise, terms_exact),
    SigmoidOp: OpRules(forward_sigmoid, None, None, None, cost_elementwise, terms_exact),
    TanhOp: OpRules(forward_tanh, None, None, None, cost_elementwise, terms_exact),
    MaxPoolOp: OpRules(forward_max_pool, None, None, None, cost_max_pool, terms_exact),
    # Merges take several inputs: their rules are merge_forward/backward/interval; these rows
    # give their cost and terms (an Add is one rounded sum per output, a Concat exact).
    AddOp: OpRules(_merge_single, None, None, None, cost_elementwise, terms_add),
    ConcatOp: OpRules(_merge_single, None, None, None, cost_elementwise, terms_exact),
}

# The tensors an op's error fields bound (see "Exactness" in the module docstring).
ERR_FIELDS = {"weight": "weight_err", "bias": "bias_err", "scale": "scale_err",
              "shift": "shift_err"}


def _main_fields(op: Any) -> list[str]:
    names = {f.name for f in fields(op)}
    return [k for k in ERR_FIELDS if k in names]


def abs_op(op: _AnyOp) -> _AnyOp:
    """The op with absolute weights, scales and biases and no error fields: ``|L| x + |b|``."""
    main = _main_fields(op)
    if not main:
        return op  # pooling (nonnegative), reshapes, permutations, activations, MaxPool
    changes: dict[str, Any] = {}
    for name in main:
        t = getattr(op, name)
        changes[name] = None if t is None else t.abs()
        changes[ERR_FIELDS[name]] = None
    return replace(op, **changes)


def err_op(op: _AnyOp) -> _AnyOp | None:
    """The op whose weights are the error bounds of `op`'s (``L_err x + b_err``), or None
    when `op`'s tensors are exact."""
    main = _main_fields(op)
    if not any(getattr(op, ERR_FIELDS[name]) is not None for name in main):
        return None
    changes: dict[str, Any] = {}
    for name in main:
        t, e = getattr(op, name), getattr(op, ERR_FIELDS[name])
        changes[name] = e if e is not None else (None if t is None else torch.zeros_like(t))
        changes[ERR_FIELDS[name]] = None
    return replace(op, **changes)


def interval_affine(op: Op | SpecRows, lo: Tensor, hi: Tensor, *, rigorous: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """Interval bounds of an affine op over the box `[lo, hi]` (center and radius form).

    Exact for each output coordinate: the range of ``w · x + b`` over a box is
    ``w · c + b ± |w| · r``. With `rigorous`, the bounds also contain the range of the *exact*
    op (its error fields) in exact arithmetic: the radius is rounded up so that the box
    contains `[lo, hi]`, and the rounding of ``w · c + b`` and ``|w| · r`` is bounded by
    ``gamma_(k+2) (|w| (|c| + r) + |b|)`` and taken off outward.
    """
    rules = RULES[type(op)]
    if rigorous and rules.terms(op)[0] == 0:
        return rules.forward(op, lo), rules.forward(op, hi)  # a reshape: exact and monotone
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    if rigorous:
        radius = rounding.up(torch.maximum(hi - center, center - lo))
    c = rules.forward(op, center)
    r = rules.abs_linear(op, radius)  # type: ignore[misc]
    if not rigorous:
        return c - r, c + r
    k = rules.terms(op)[0] + 2
    reach = center.abs() + radius
    err = rounding.gamma(k, c.dtype) * rules.forward(abs_op(op), reach)
    exact = err_op(op)
    if exact is not None:
        err = err + rules.forward(exact, reach)
    err = rounding.SAFETY * (err + k * rounding.tiny(c.dtype))
    return rounding.down(c - r - err), rounding.up(c + r + err)


# --- converters: module -> op ------------------------------------------------------------------
# (a row per supported torch module; :func:`certify.bounds.network.to_network` applies them)

Converter = Callable[[Any, Shape], "Op | None"]  # (module of its type, input shape)


def _flat(shape: Shape) -> bool:
    return len(shape) == 1


def _convert_linear(m: nn.Linear, shape: Shape) -> Op:
    if not _flat(shape) or shape[0] != m.in_features:
        raise ShapeMismatch(f"expects ({m.in_features},) features, gets {shape}"
                             + ("; add an nn.Flatten before it" if not _flat(shape) else ""))
    return LinearOp(m.weight, m.bias, shape, (m.out_features,))


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _convert_conv(m: nn.Conv2d, shape: Shape) -> Op:
    if m.groups != 1 or _pair(m.dilation) != (1, 1) or m.padding_mode != "zeros":
        raise UnsupportedConfig(f"groups={m.groups}, dilation={m.dilation}, "
                           f"padding_mode={m.padding_mode!r}; only groups=1, dilation=1 and "
                           "zero padding have a rule")
    if len(shape) != 3 or shape[0] != m.in_channels:
        raise ShapeMismatch(f"expects (C={m.in_channels}, H, W) inputs, gets {shape}")
    kernel = _pair(m.kernel_size)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            padding = (0, 0)
        elif all(k % 2 == 1 for k in kernel):  # 'same' with odd kernels pads symmetrically
            padding = (kernel[0] // 2, kernel[1] // 2)
        else:
            raise UnsupportedConfig("padding='same' with an even kernel pads asymmetrically")
    else:
        padding = _pair(m.padding)
    stride = _pair(m.stride)
    h, w = ((shape[1 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))
    if h < 1 or w < 1:
        raise ShapeMismatch(f"input {shape} is smaller than the kernel {kernel}")
    return ConvOp(m.weight, m.bias, stride, padding, shape, (m.out_channels, h, w))


def unit_of(t: Tensor) -> float:
    """The unit roundoff of `t`'s dtype."""
    return rounding.unit_roundoff(t.dtype)


def _convert_normalize(m: Normalize, shape: Shape) -> Op:
    mean, std = cast(Tensor, m.mean), cast(Tensor, m.std)
    if len(shape) != 3 or mean.shape[0] != shape[0]:
        raise ShapeMismatch(f"normalizes {mean.shape[0]} channels, gets inputs {shape}")
    scale, shift = 1.0 / std, -mean / std
    # one rounded division each (bounded by 2u of the result to cover its own rounding)
    return ScaleShiftOp(scale, shift, shape, shape,
                        scale_err=2 * unit_of(scale) * scale.detach().abs(),
                        shift_err=2 * unit_of(shift) * shift.detach().abs())


def _convert_batch_norm(m: nn.BatchNorm2d, shape: Shape) -> Op:
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedConfig("track_running_stats=False (no running statistics to bound with)")
    if len(shape) != 3 or shape[0] != m.num_features:
        raise ShapeMismatch(f"expects (C={m.num_features}, H, W) inputs, gets {shape}")
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -m.running_mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    # rsqrt (not correctly rounded), the additions and products: 16u bounds them generously
    u = unit_of(scale)
    scale_err = 16 * u * scale.detach().abs()
    shift_err = (m.running_mean.detach().abs() * scale_err
                 + 16 * u * (m.running_mean.detach().abs() * scale.detach().abs()
                             + (0 if m.bias is None else m.bias.detach().abs())))
    return ScaleShiftOp(scale.view(-1, 1, 1), shift.view(-1, 1, 1), shape, shape,
                        scale_err=scale_err.view(-1, 1, 1), shift_err=shift_err.view(-1, 1, 1))


def _convert_avg_pool(m: nn.AvgPool2d, shape: Shape) -> Op:
    if len(shape) != 3:
        raise ShapeMismatch(f"expects (C, H, W) inputs, gets {shape}")
    kernel, stride, padding = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), \
        _pair(m.padding)
    op = AvgPoolOp(kernel, stride, padding, bool(m.ceil_mode), bool(m.count_include_pad),
                   m.divisor_override, shape, shape)
    try:
        out = RULES[AvgPoolOp].forward(op, torch.empty(1, *shape, device="meta"))
    except RuntimeError as e:
        raise ShapeMismatch(str(e).splitlines()[0]) from None
    return replace(op, out_shape=tuple(out.shape[1:]))


def _convert_max_pool(m: nn.MaxPool2d, shape: Shape) -> Op:
    # one option at a time, so the message names the one to change
    if _pair(m.dilation) != (1, 1):
        raise UnsupportedConfig(f"dilation={m.dilation}; only dilation=1 has a rule")
    if m.ceil_mode:
        raise UnsupportedConfig("ceil_mode=True; only ceil_mode=False has a rule")
    if m.return_indices:
        raise UnsupportedConfig("return_indices=True; the engine takes a module that returns "
                                "one tensor (return_indices=False)")
    kernel = _pair(m.kernel_size)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size)
    padding = _pair(m.padding)
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise UnsupportedConfig(f"padding={m.padding}, more than half the kernel {kernel} (torch "
                                "refuses it too)")
    if len(shape) != 3:
        raise ShapeMismatch(f"expects (C, H, W) inputs, gets {shape}")
    h, w = ((shape[1 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))
    if h < 1 or w < 1:
        raise ShapeMismatch(f"input {shape} is smaller than the kernel {kernel}")
    return MaxPoolOp(kernel, stride, padding, shape, (shape[0], h, w))


def _sample_dim(dim: int, rank: int, what: str) -> int:
    """A dimension of the batched tensor `(N, *shape)` (rank ``rank + 1``) as an index into
    `shape`; the batch dimension itself is refused."""
    full = dim + rank + 1 if dim < 0 else dim
    if not 1 <= full <= rank:
        raise UnsupportedConfig(f"{what}={dim}; only dimensions after the batch (1..{rank}, or "
                                "negative) have a rule")
    return full - 1


def _convert_flatten(m: nn.Flatten, shape: Shape) -> Op:
    start = _sample_dim(m.start_dim, len(shape), "start_dim")
    end = _sample_dim(m.end_dim, len(shape), "end_dim")
    if end < start:
        raise UnsupportedConfig(f"start_dim={m.start_dim} after end_dim={m.end_dim}")
    return reshape_op(shape, (*shape[:start], prod(shape[start:end + 1]), *shape[end + 1:]))


def _convert_unflatten(m: nn.Unflatten, shape: Shape) -> Op:
    if not isinstance(m.dim, int):
        raise UnsupportedConfig(f"dim={m.dim!r}; only an integer dimension has a rule")
    dim = _sample_dim(m.dim, len(shape), "dim")
    sizes = tuple(int(v) for v in m.unflattened_size)
    if sizes.count(-1) > 1 or any(v < 1 and v != -1 for v in sizes):
        raise UnsupportedConfig(f"unflattened_size={sizes}")
    known = prod(v for v in sizes if v != -1)
    if shape[dim] % known:
        raise ShapeMismatch(f"cannot unflatten {shape[dim]} values into {sizes}")
    sizes = tuple(shape[dim] // known if v == -1 else v for v in sizes)
    if prod(sizes) != shape[dim]:
        raise ShapeMismatch(f"cannot unflatten {shape[dim]} values into {sizes}")
    return reshape_op(shape, (*shape[:dim], *sizes, *shape[dim + 1:]))


def _convert_adaptive_avg_pool(m: nn.AdaptiveAvgPool2d, shape: Shape) -> Op:
    if len(shape) != 3:
        raise ShapeMismatch(f"expects (C, H, W) inputs, gets {shape}")
    size: Any = m.output_size
    pair = (size, size) if isinstance(size, int) or size is None else tuple(size)
    out = tuple(shape[1 + i] if pair[i] is None else int(pair[i]) for i in range(2))
    if min(out) < 1:
        raise UnsupportedConfig(f"output_size={size}")
    return AdaptiveAvgPoolOp((out[0], out[1]), shape, (shape[0], out[0], out[1]))


def _convert_relu(m: nn.ReLU, shape: Shape) -> Op:
    return ReluOp(shape, shape)


def reshape_op(in_shape: Shape, out_shape: Shape) -> Op:
    """The op of a per-sample reshape (values kept in row-major order), whatever layer asks
    for it (a partial ``nn.Flatten``, ``nn.Unflatten``, certify's ``Reshape``): a
    :class:`FlattenOp` to a vector, else the :class:`PermuteOp` that moves no dimension."""
    if len(out_shape) == 1:
        return FlattenOp(in_shape, out_shape)
    return PermuteOp(tuple(range(len(out_shape))), in_shape, out_shape)


def _convert_reshape(m: Reshape, shape: Shape) -> Op:
    if prod(m.shape) != prod(shape):
        raise ShapeMismatch(f"re-shapes {prod(m.shape)} values per sample to {m.shape}, gets "
                            f"{shape} ({prod(shape)} values)")
    return reshape_op(shape, m.shape)


def _convert_permute(m: Permute, shape: Shape) -> Op:
    if len(m.dims) != len(shape):
        raise ShapeMismatch(f"permutes {len(m.dims)} dimensions per sample, gets {shape}")
    return PermuteOp(m.dims, shape, tuple(shape[d] for d in m.dims))


def _convert_leaky_relu(m: nn.LeakyReLU, shape: Shape) -> Op:
    slope = float(m.negative_slope)
    if not 0.0 <= slope <= 1.0:
        raise UnsupportedConfig(f"negative_slope={slope}; only slopes in [0, 1] (a convex, "
                                "monotone LeakyReLU) have a rule")
    return LeakyReluOp(slope, shape, shape)


def _convert_sigmoid(m: nn.Sigmoid, shape: Shape) -> Op:
    return SigmoidOp(shape, shape)


def _convert_tanh(m: nn.Tanh, shape: Shape) -> Op:
    return TanhOp(shape, shape)


def _skip(m: nn.Module, shape: Shape) -> None:
    return None  # identity in eval mode


CONVERTERS: dict[type[nn.Module], Converter] = {
    nn.Linear: _convert_linear,
    nn.Conv2d: _convert_conv,
    nn.ReLU: _convert_relu,
    nn.LeakyReLU: _convert_leaky_relu,
    nn.Sigmoid: _convert_sigmoid,
    nn.Tanh: _convert_tanh,
    nn.Flatten: _convert_flatten,
    nn.Unflatten: _convert_unflatten,
    Normalize: _convert_normalize,
    nn.BatchNorm2d: _convert_batch_norm,
    nn.AvgPool2d: _convert_avg_pool,
    nn.AdaptiveAvgPool2d: _convert_adaptive_avg_pool,
    nn.MaxPool2d: _convert_max_pool,
    nn.Dropout: _skip,
    nn.Identity: _skip,
    Reshape: _convert_reshape,
    Permute: _convert_permute,
}
SUPPORTED = ("Linear, Conv2d, ReLU, LeakyReLU (slope in [0, 1]), Sigmoid, Tanh, Flatten, "
             "Unflatten, Normalize, BatchNorm2d (eval statistics), AvgPool2d, AdaptiveAvgPool2d, "
             "MaxPool2d (dilation 1, ceil_mode=False), Dropout and Identity (identity), nested "
             "Sequential, Reshape and Permute (certify.nets.layers)")


class UnsupportedConfig(Exception):
    """A supported layer type with an unsupported configuration (turned into a CertifyError)."""


class ShapeMismatch(Exception):
    """A layer that does not fit the shape it receives (turned into a SpecError)."""
