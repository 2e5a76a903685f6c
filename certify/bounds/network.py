"""From an ``nn.Module`` to a :class:`Network`: a flat tuple of ops the bound engine knows.

Conversion is a table lookup by exact module type (:data:`CONVERTERS`); nested
``nn.Sequential`` containers are flattened. Ops keep *references* to the model's parameters
(no copies), so bounds computed from a fresh conversion are differentiable with respect to the
model's weights; eval-mode BatchNorm2d is folded into the preceding convolution (exact), and
Normalize stays an exact elementwise op (never folded into a padded convolution).

Modes: the bound engine always bounds the **eval-mode** function of the model -- Dropout is the
identity and BatchNorm2d uses its running statistics, whatever ``model.training`` is -- because
that is the function that gets deployed and certified. (Robust training therefore trains the
eval-mode function of a BatchNorm network.)

A :class:`Network` is a snapshot of the model's structure and of the *folded* tensors at
conversion time; :func:`certify.bounds.compute_bounds` converts an ``nn.Module`` on every call
(it takes well under a millisecond), so passing the module is always current.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from certify.bounds import rounding
from certify.bounds.layers import (
    CONVERTERS,
    RULES,
    SUPPORTED,
    ConvOp,
    FlattenOp,
    LinearOp,
    Op,
    ScaleShiftOp,
    Shape,
    ShapeMismatch,
    SpecRows,
    UnsupportedConfig,
    cast_op,
    tensor_fields,
    unit_of,
)
from certify.errors import SpecError, UnsupportedLayerError

__all__ = ["CONVERTERS", "Network", "fold_spec", "identity_spec", "spec_rows", "to_network"]


@dataclass(frozen=True, eq=False)
class Network:
    """A feed-forward network as a tuple of supported ops.

    Attributes:
        layers: The ops, input to output.
        input_shape: `(C, H, W)` (or any per-sample shape) the network takes.
        names: For each op, the name of the module it came from (for messages).
        model_layers: The ops one per module, unfolded, in the model's own dtype: the
            computation the model itself performs, whose rounding
            :mod:`certify.bounds.forward_error` bounds (empty: `layers`).
        runs_in: If set, bounds also cover the model's own forward pass in this dtype (the
            network with the perturbations of :mod:`certify.bounds.forward_error`); None:
            the network in exact arithmetic only.
        source: The module it was converted from (methods that bound modules, such as
            auto_LiRPA's, use it); None for a network built from ops.
        inputs: For a network that is a DAG (residual Add, Concat; see
            :mod:`certify.bounds.graph`): for each op, the nodes it takes, in topological
            order (``-1``: the network's input, ``j``: the output of ``layers[j]``); the last
            op is the output and every other op's output is used. Empty: a chain (each op
            takes the previous one), how every ``nn.Sequential`` converts.
        model_inputs: The same for `model_layers` (empty for a chain).
    """

    layers: tuple[Op, ...]
    input_shape: Shape
    names: tuple[str, ...]
    model_layers: tuple[Op, ...] = ()
    runs_in: torch.dtype | None = None
    source: nn.Module | None = field(default=None, compare=False, repr=False)
    inputs: tuple[tuple[int, ...], ...] = ()
    model_inputs: tuple[tuple[int, ...], ...] = ()

    def __repr__(self) -> str:
        body = ", ".join(f"{n}:{type(op).__name__[:-2]}{op.out_shape}"
                         for n, op in zip(self.names, self.layers, strict=True))
        return f"Network(input={self.input_shape}, [{body}])"

    @property
    def output_shape(self) -> Shape:
        return self.layers[-1].out_shape if self.layers else self.input_shape

    @property
    def activation_positions(self) -> tuple[int, ...]:
        """Indices of the activation ops (rows of
        :data:`~certify.bounds.relaxations.ACTIVATIONS`: ReLU, LeakyReLU, Sigmoid, Tanh, and
        MaxPool2d, which is relaxed over bounds of its input too); their inputs are the
        pre-activations to bound."""
        from certify.bounds.relaxations import is_activation

        return tuple(i for i, op in enumerate(self.layers) if is_activation(op))

    relu_positions = activation_positions

    @property
    def is_chain(self) -> bool:
        """Whether every op takes the previous one's output (no ``inputs``)."""
        return not self.inputs

    def sources(self, i: int) -> tuple[int, ...]:
        """The nodes ``layers[i]`` takes (``-1``: the network's input)."""
        return self.inputs[i] if self.inputs else (i - 1,)

    def forward(self, x: Tensor) -> Tensor:
        """The network's output `(N, *output_shape)` for inputs `(N, *input_shape)`."""
        if not self.is_chain:
            from certify.bounds.graph import evaluate

            return evaluate(self.layers, self.inputs, x)
        for op in self.layers:
            x = RULES[type(op)].forward(op, x)
        return x

    __call__ = forward

    def activation_inputs(self, x: Tensor) -> dict[int, Tensor]:
        """The input of every activation (key: its position) at inputs `x`
        `(N, *input_shape)`, in floating point; a chain is run up to its last activation."""
        positions = self.activation_positions
        if not positions:
            return {}
        if not self.is_chain:
            from certify.bounds.graph import evaluate

            keep = dict.fromkeys((self.sources(p)[0] for p in positions), x)
            evaluate(self.layers, self.inputs, x, keep)
            return {p: keep[self.sources(p)[0]] for p in positions}
        out: dict[int, Tensor] = {}
        for i, op in enumerate(self.layers[:positions[-1] + 1]):
            if i in positions:
                out[i] = x
            x = RULES[type(op)].forward(op, x)
        return out

    def forward_batch(self, xs: Tensor) -> Tensor:
        """Outputs `(n, N, *output_shape)` for points `(n, N, *input_shape)`.

        Only for networks without a folded specification (whose ops are per sample).
        """
        n, b = xs.shape[:2]
        return self.forward(xs.reshape(n * b, *xs.shape[2:])).reshape(n, b, *self.output_shape)

    def detach(self) -> Network:
        """The same network with tensors detached from autograd (for inner optimizations)."""
        layers = tuple(replace(op, **{k: getattr(op, k).detach() for k in tensor_fields(op)})
                       for op in self.layers)
        return replace(self, layers=layers)

    def to(self, *, dtype: torch.dtype, device: torch.device | str) -> Network:
        """The same network with tensors in `dtype` on `device` (no copy when already there)."""
        device = torch.device(device)
        layers = tuple(cast_op(op, dtype, device) for op in self.layers)
        if all(a is b for a, b in zip(layers, self.layers, strict=True)):
            return self
        return replace(self, layers=layers)


def _modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    if type(model) is nn.Sequential:
        for name, child in model.named_children():
            yield from _modules(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or type(model).__name__, model


def to_network(model: nn.Module | Network, input_shape: Shape | torch.Size) -> Network:
    """Convert a model into the bound engine's :class:`Network`.

    Args:
        model: An ``nn.Sequential`` (nested ones are flattened) of supported layers, a single
            supported layer, a Network (returned as is after a shape check), or any other
            module made of them whose ``forward`` ``torch.fx`` traces -- a residual block, a
            concatenation of branches -- which becomes a DAG (:mod:`certify.bounds.graph`).
        input_shape: The per-sample input shape, e.g. `(3, 32, 32)`.

    Returns:
        The network, with eval-mode BatchNorm folded into the preceding convolution.

    Raises:
        UnsupportedLayerError: naming the first layer without a rule, and the supported ones.
        SpecError: if the layers do not fit `input_shape`.
    """
    given = tuple(int(s) for s in input_shape)
    if isinstance(model, Network):
        if model.input_shape != given:
            raise SpecError(f"the network takes inputs of shape {model.input_shape}, got "
                            f"{given}.")
        return model
    modules = list(_modules(model))
    if any(type(m) not in CONVERTERS and any(True for _ in m.children()) for _, m in modules):
        # a module with its own forward (a residual block, ...): traced into a graph
        from certify.bounds.graph import graph_network

        return graph_network(model, given)
    shape = given
    layers: list[Op] = []
    names: list[str] = []
    for index, (name, module) in enumerate(modules):
        label = f"layer {index} '{name}' ({type(module).__name__})"
        converter = CONVERTERS.get(type(module))
        if converter is None:
            raise UnsupportedLayerError(
                f"{label} has no bound rule; supported: {SUPPORTED}. Add a rule in "
                "certify/bounds/layers.py or change the architecture.")
        try:
            op = converter(module, shape)
        except UnsupportedConfig as e:
            raise UnsupportedLayerError(f"{label} is not supported with {e}.") from None
        except ShapeMismatch as e:
            raise SpecError(f"{label} does not fit its input: it {e}. Check the input shape "
                            f"(the network gets {given}).") from None
        if op is None:
            continue
        layers.append(op)
        names.append(name)
        shape = op.out_shape
    model_layers = tuple(layers)
    layers, names = _fold_scale_shift(layers, names)
    return Network(tuple(layers), given, tuple(names), model_layers, source=model)


def _fold_scale_shift(layers: list[Op], names: list[str]) -> tuple[list[Op], list[str]]:
    """Fold a per-channel scale-shift (eval BatchNorm) into the convolution right before it."""
    out_layers: list[Op] = []
    out_names: list[str] = []
    for op, name in zip(layers, names, strict=True):
        prev = out_layers[-1] if out_layers else None
        folded = fold_pair(prev, op)
        if folded is not None:
            out_layers[-1] = folded
            out_names[-1] = f"{out_names[-1]}+{name}"
            continue
        out_layers.append(op)
        out_names.append(name)
    return out_layers, out_names


def fold_pair(prev: Op | None, op: Op) -> Op | None:
    """The convolution `prev` with the per-channel scale-shift `op` after it folded in (exact
    weights ``W s``, bias ``b s + t``, their rounding and the inputs' errors in the error
    fields), or None when `op` is not such a scale-shift of `prev`'s output."""
    if not (isinstance(op, ScaleShiftOp) and isinstance(prev, ConvOp)
            and op.scale.shape == op.shift.shape == (prev.out_shape[0], 1, 1)):
        return None
    scale = op.scale.flatten()
    bias = prev.bias if prev.bias is not None else torch.zeros_like(scale)
    weight = prev.weight * scale.view(-1, 1, 1, 1)
    new_bias = bias * scale + op.shift.flatten()
    # exact weight = W * (s + ds): |W| |ds| + the product's rounding (and W's own error)
    s_err = _zero_if_none(op.scale_err, op.scale).flatten().view(-1, 1, 1, 1)
    w_abs = prev.weight.detach().abs()
    u = unit_of(weight)
    weight_err = w_abs * s_err + 2 * u * weight.detach().abs()
    if prev.weight_err is not None:
        weight_err = weight_err + prev.weight_err * (scale.detach().abs().view(-1, 1, 1, 1)
                                                     + s_err)
    b_abs = bias.detach().abs()
    t_err = _zero_if_none(op.shift_err, op.shift).flatten()
    shift_abs = op.shift.detach().abs().flatten()
    bias_err = (b_abs * s_err.flatten() + t_err
                + 4 * u * (b_abs * scale.detach().abs() + shift_abs))
    if prev.bias_err is not None:
        bias_err = bias_err + prev.bias_err * (scale.detach().abs() + s_err.flatten())
    return replace(prev, weight=weight, bias=new_bias, weight_err=weight_err, bias_err=bias_err)


def _zero_if_none(err: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like.detach()) if err is None else err


def identity_spec(net: Network, like: Tensor) -> Tensor:
    """The specification `(N, K, K)` that bounds the (flattened) outputs themselves."""
    k = math.prod(net.output_shape)
    eye = torch.eye(k, dtype=like.dtype, device=like.device)
    return eye.expand(like.shape[0], k, k)


def spec_rows(net: Network, spec: Tensor) -> tuple[Network, SpecRows]:
    """The specification `(N, S, K)` as the starting matrix of a backward pass.

    Args:
        spec: `(N, S, K)`, `K` the network's (flat) output size.

    Returns:
        `(body, rows)`: ``spec @ net(x) = rows(body(x))``. A last Linear layer is folded into
        the rows (one product instead of a backward step, with its rounding bounded in the
        rows' error fields) and left out of the body; otherwise the body is the network with its
        output flattened.
    """
    layers = list(net.layers)
    names = list(net.names)
    last = layers[-1] if layers else None
    if isinstance(last, LinearOp):
        weight = torch.matmul(spec, last.weight)
        bias = spec @ last.bias if last.bias is not None else spec.new_zeros(spec.shape[:2])
        # the products' rounding (gamma_K |spec| |W|) and the last layer's own error
        g = rounding.gamma(spec.shape[2] + 1, weight.dtype)
        spec_abs = spec.detach().abs()
        weight_err = g * torch.matmul(spec_abs, last.weight.detach().abs())
        if last.weight_err is not None:
            weight_err = weight_err + torch.matmul(spec_abs, last.weight_err)
        bias_err = None
        if last.bias is not None:
            bias_err = g * (spec_abs @ last.bias.detach().abs())
            if last.bias_err is not None:
                bias_err = bias_err + spec_abs @ last.bias_err
        rows = SpecRows(weight, bias, last.in_shape, (spec.shape[1],), weight_err=weight_err,
                        bias_err=bias_err)
        # (in a DAG the last op's input is the op before it: every other output is used)
        return replace(net, layers=tuple(layers[:-1]), names=tuple(names[:-1]),
                       inputs=net.inputs[:-1]), rows
    inputs = net.inputs
    if len(net.output_shape) != 1 or not layers:
        layers.append(FlattenOp(net.output_shape, (math.prod(net.output_shape),)))
        names.append("flatten")
        if inputs:
            inputs = (*inputs, (len(layers) - 2,))
    flat = layers[-1].out_shape
    rows = SpecRows(spec, spec.new_zeros(spec.shape[:2]), flat, (spec.shape[1],))
    return replace(net, layers=tuple(layers), names=tuple(names), inputs=inputs), rows


def fold_spec(net: Network, spec: Tensor) -> Network:
    """The network whose output is `spec @ net(x)`: :func:`spec_rows`' body followed by its
    rows as a last op (the LP/MILP encodings' form)."""
    body, rows = spec_rows(net, spec)
    name = f"{net.names[-1]}+spec" if len(body.layers) < len(net.layers) else "spec"
    inputs = (*body.inputs, (len(body.layers) - 1,)) if body.inputs else ()
    return replace(body, layers=(*body.layers, rows),  # type: ignore[arg-type]
                   names=(*body.names, name), inputs=inputs)
