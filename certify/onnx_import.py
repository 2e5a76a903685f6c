"""ONNX networks into the bound engine's layer sequence: our own small converter.

An ONNX graph that is a *chain* (one input, one output, every computed tensor read by the next
node only) of the operators below becomes a flat ``nn.Sequential`` of the layers the bound
engine supports: ``Normalize``, ``Conv2d``, ``BatchNorm2d`` (eval), ``ReLU``, ``LeakyReLU``,
``Sigmoid``, ``Tanh``, ``AvgPool2d``, ``MaxPool2d``, ``Flatten``, ``Linear``, and certify's
``Reshape`` and ``Permute``.

The converted model takes the file's input as it is (its shape, or a re-shaping of it that keeps
the values' order): flattened, it is the ONNX input flattened, so a VNNLIB property's ``X_i`` and
a counterexample mean the same value for both.

================================  ==========================================================
ONNX operator                     becomes
================================  ==========================================================
Gemm, MatMul (constant weight)    ``nn.Linear`` (``transA=0``; ``transB``, ``alpha``, ``beta``)
Conv (2-D, group 1, dilation 1)   ``nn.Conv2d`` (symmetric pads, or ``auto_pad`` that is)
Relu                              ``nn.ReLU``
LeakyRelu (``0 <= alpha <= 1``)   ``nn.LeakyReLU``
Sigmoid, Tanh                     ``nn.Sigmoid``, ``nn.Tanh``
BatchNormalization (inference)    ``nn.BatchNorm2d`` on images; folded into the affine map on
                                  vectors
AveragePool, GlobalAveragePool    ``nn.AvgPool2d``
MaxPool (2-D, dilation 1)         ``nn.MaxPool2d`` (symmetric pads, ``ceil_mode=0``, the
                                  Indices output unused)
Flatten (axis 1), Reshape         ``nn.Flatten`` for ``(N, ...) -> (N, D)``, otherwise a
                                  ``Reshape`` of each sample (the batch stays first)
Transpose (``perm[0] = 0``)        a ``Permute`` of each sample's dimensions; consecutive ones
                                  are composed (and dropped when they cancel), elementwise maps
                                  move through them. An exporter's NHWC->NCHW input Transpose
                                  (Keras, TensorFlow) is the model's first layer: the model
                                  takes the file's NHWC input
Add, Sub, Mul, Div (constants)    elementwise affine maps: a ``Normalize`` when they are the
                                  per-channel input normalization, otherwise folded exactly
                                  into the neighbouring ``Linear``/``Conv2d``, or a
                                  ``BatchNorm2d``/diagonal ``Linear`` of their own
Identity, Dropout                 nothing (inference)
Constant, Shape, Gather,          evaluated at conversion time (the ``x.view(x.size(0), -1)``
Unsqueeze, Squeeze, Concat, Cast, pattern of exported models); they may not touch the data
Transpose, Reshape (constants)
================================  ==========================================================

A graph with branches -- a residual ``Add`` of two computed tensors, a ``Concat`` of computed
tensors -- becomes a ``torch.fx.GraphModule`` of such chains joined by those merges (see
:class:`_DagImporter`), which the bound engine traces.

Anything else (an unknown operator, an unsupported attribute value, another node merging
computed tensors) raises :class:`~certify.errors.UnsupportedLayerError` naming the ONNX node (its
name, its index and its operator) and, where it applies, the attribute.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certify.checkpoint import ModelMeta
from certify.errors import CertifyError, CheckpointError, SpecError, UnsupportedLayerError
from certify.nets import Normalize
from certify.nets.layers import Permute, Reshape

__all__ = ["SUPPORTED_OPS", "import_onnx", "onnx_input_dims", "read_onnx"]

Shape = tuple[int, ...]

#: The ONNX operators the converter understands (others raise UnsupportedLayerError).
SUPPORTED_OPS: tuple[str, ...] = (
    "Add", "AveragePool", "BatchNormalization", "Cast", "Concat", "Constant", "Conv", "Div",
    "Dropout", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "Identity", "LeakyRelu",
    "MatMul", "MaxPool", "Mul", "Relu", "Reshape", "Shape", "Sigmoid", "Squeeze", "Sub",
    "Tanh", "Transpose", "Unsqueeze",
)

# Operators evaluated on constants at conversion time (never on the network's data).
_CONSTANT_OPS = ("Cast", "Concat", "Constant", "Gather", "Identity", "Reshape", "Shape",
                 "Squeeze", "Unsqueeze", "Transpose")


def read_onnx(path: str | os.PathLike[str]) -> Any:
    """Read an ONNX file (``.onnx`` or gzip-compressed ``.onnx.gz``) into a ``ModelProto``.

    Raises:
        CheckpointError: the file is missing, or not a readable ONNX model.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file not found: {path}. Check the path.")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                proto = onnx.load_model_from_string(f.read())
        else:
            proto = onnx.load(str(path))
    except (DecodeError, OSError, EOFError, zlib.error, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable ONNX model (corrupt, truncated or another "
                              f"format): {type(e).__name__}. Re-export the network.") from None
    if not proto.graph.node:
        raise CheckpointError(f"{path} holds no ONNX graph nodes; it is empty or not an ONNX "
                              "model.")
    return proto


def import_onnx(
    model: str | os.PathLike[str] | Any,
    *,
    input_shape: Shape | None = None,
    dataset: str | None = None,
    source: str | None = None,
) -> tuple[nn.Sequential, ModelMeta]:
    """Convert an ONNX network into a flat ``nn.Sequential`` of bound-engine layers (a graph
    with branches: a ``torch.fx.GraphModule`` of such Sequentials, see :class:`_DagImporter`).

    The converted model takes inputs of shape ``(N, *meta.input_shape)``. When the file's input
    is a flat vector ``(N, D)`` and no image shape is given, the model takes ``(N, 1, 1, D)``
    and starts with a ``Flatten``.

    Args:
        model: Path to a ``.onnx``/``.onnx.gz`` file, or an ``onnx.ModelProto``.
        input_shape: ``(C, H, W)`` of one input; needed when the file leaves dimensions other
            than the batch unknown, and it may re-shape a flat input ``(N, C*H*W)`` as an image.
        dataset: Recorded in the metadata (``"unknown"`` when not given).
        source: The name used in messages and the metadata (default: the file name).
    Returns:
        ``(model, meta)``: the model in ``eval()`` mode (float32, CPU), and a
        :class:`ModelMeta` with ``arch="onnx"``, the input shape, the number of classes and the
        recognised input normalization (``mean=0, std=1`` per channel when there is none).
    Raises:
        UnsupportedLayerError: an operator, attribute or graph structure the engine cannot take.
        SpecError: an input shape that is unknown or disagrees with the file.
        CheckpointError: an unreadable file.
    """
    import onnx

    if isinstance(model, onnx.ModelProto):
        proto, source = model, source or model.graph.name or "model"
    else:
        proto, source = read_onnx(model), source or Path(model).name
    converter: _Converter
    net: nn.Module
    if _is_dag(proto):
        net, converter = _DagImporter(proto, source=source, input_shape=input_shape).run()
    else:
        converter = _Converter(proto, source=source, input_shape=input_shape)
        net = converter.run()
    shape = converter.model_input_shape
    assert shape is not None
    channels = shape[0]
    if converter.norm is not None:
        mean, std = converter.norm
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    meta = ModelMeta(
        arch="onnx",
        arch_kwargs={"source": source, "opset": int(opset),
                     "producer": f"{proto.producer_name} {proto.producer_version}".strip()},
        dataset=dataset or "unknown",
        input_shape=shape,  # type: ignore[arg-type]
        num_classes=converter.num_classes,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )
    return net, meta  # type: ignore[return-value]


def onnx_input_dims(proto: Any) -> tuple[int | None, ...] | None:
    """The per-sample dimensions of the graph's data input (``None`` where unknown).

    Returns ``None`` when the graph does not have exactly one data input with a declared rank.
    """
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in list(dims)[1:])


@dataclass(frozen=True)
class _Window:
    """A 2-D pooling window: kernel, stride, symmetric padding, and the (C, H, W) it gives."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    out_shape: tuple[int, int, int]


@dataclass
class _Affine:
    """A pending elementwise map ``x * scale + shift`` (float64, arrays of the feature shape)."""

    scale: np.ndarray
    shift: np.ndarray

    def is_identity(self) -> bool:
        return bool(np.all(self.scale == 1.0) and np.all(self.shift == 0.0))

    def reshaped(self, shape: Shape) -> _Affine:
        return _Affine(self.scale.reshape(shape), self.shift.reshape(shape))

    def permuted(self, dims: tuple[int, ...]) -> _Affine:
        """The same map after a permutation of the data: ``P(x * s + t) = P(x) * P(s) + P(t)``
        (exact: values are only moved)."""
        return _Affine(np.transpose(self.scale, dims), np.transpose(self.shift, dims))

    def per_channel(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(scale, shift)`` of shape ``(C,)`` when constant over each channel of a (C,H,W) map."""
        if self.scale.ndim != 3:
            return None
        c = self.scale.shape[0]
        scale = self.scale.reshape(c, -1)
        shift = self.shift.reshape(c, -1)
        if np.all(scale == scale[:, :1]) and np.all(shift == shift[:, :1]):
            return scale[:, 0].copy(), shift[:, 0].copy()
        return None


class _Converter:
    """One pass over the nodes of a chain-structured graph (ONNX keeps nodes topologically)."""

    def __init__(self, proto: Any, *, source: str, input_shape: Shape | None,
                 segment_shape: Shape | None = None) -> None:
        from onnx import numpy_helper

        self.graph = proto.graph
        self.source = source
        self.consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in self.graph.initializer
        }
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            names = ", ".join(repr(i.name) for i in inputs) or "none"
            raise UnsupportedLayerError(
                f"{source}: the ONNX graph has {len(inputs)} data inputs ({names}); only networks "
                "with exactly one input are supported.")
        if len(self.graph.output) != 1:
            raise UnsupportedLayerError(
                f"{source}: the ONNX graph has {len(self.graph.output)} outputs; only networks "
                "with exactly one output are supported.")
        self.input = inputs[0]
        self.output_name = self.graph.output[0].name
        self.current = self.input.name
        self.requested_shape: Shape | None = None
        self.shape: Shape = self._file_input_shape(input_shape)
        self.file_shape = self.shape
        self.shapes: dict[str, Shape] = {self.current: self.shape}
        self.model_input_shape: tuple[int, int, int] | None = None
        # a chain inside a DAG (not at its input, not at its output): it takes `segment_shape`
        # as it is (no input normalization, no re-shaping) and ends without a flatten
        self.final = segment_shape is None
        if segment_shape is not None:
            self.shape = self.file_shape = segment_shape
            self.shapes = {self.current: self.shape}
            self.model_input_shape = segment_shape  # type: ignore[assignment]
        self.layers: list[tuple[str, nn.Module]] = []
        self.counts: dict[str, int] = {}
        self.pending: _Affine | None = None
        self.pending_nodes: list[str] = []  # the nodes whose elementwise maps are pending
        self.node_label = ""  # the node being converted, for pending_nodes
        self.open_affine = False  # the last layer is a Linear/Conv2d its output map can fold into
        self.norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.num_classes = 0
        self.consumers: dict[str, list[str]] = {}
        for index, node in enumerate(self.graph.node):
            if node.op_type == "Shape":
                continue  # reads only the shape; not a branch of the data
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(
                        node.name or f"{node.op_type} (node {index})")
        self.handlers: dict[str, Callable[[Any, str], None]] = {
            "Gemm": self._gemm, "MatMul": self._matmul, "Add": self._add, "Sub": self._sub,
            "Mul": self._mul, "Div": self._div, "Relu": self._relu, "Conv": self._conv,
            "Flatten": self._flatten, "Reshape": self._reshape,
            "BatchNormalization": self._batchnorm, "AveragePool": self._avgpool,
            "GlobalAveragePool": self._global_avgpool, "MaxPool": self._maxpool,
            "Identity": self._passthrough,
            "Dropout": self._dropout, "Cast": self._cast,
            "Transpose": self._transpose, "LeakyRelu": self._leaky_relu,
            "Sigmoid": self._sigmoid, "Tanh": self._tanh,
        }

    # ---- input shape ---------------------------------------------------------------------

    def _file_input_shape(self, requested: Shape | None) -> Shape:
        """The per-sample input shape in the file's own frame (the batch dimension dropped)."""
        dims = list(self.input.type.tensor_type.shape.dim)
        name = self.input.name
        if requested is not None:
            requested = tuple(int(v) for v in requested)
            if len(requested) != 3 or any(v < 1 for v in requested):
                raise SpecError(f"input shape {requested} must be three positive sizes C,H,W.")
            self.requested_shape = requested
        features = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in dims[1:]]
        shown = ", ".join("?" if v is None else str(v) for v in features)
        if not dims or any(v is None for v in features):
            if requested is None:
                raise SpecError(f"{self.source}: the ONNX input '{name}' has unknown dimensions "
                                f"(N, {shown or '...'}); pass --input-shape C,H,W.")
            if len(features) == 1:  # a flat input of unknown length: C*H*W values
                return (int(np.prod(requested)),)
            if dims and (len(features) != 3 or any(
                    v is not None and v != r for v, r in zip(features, requested, strict=False))):
                raise SpecError(f"{self.source}: --input-shape {requested} does not fit the ONNX "
                                f"input '{name}' of shape (N, {shown}).")
            return requested
        shape = tuple(int(v) for v in features)  # type: ignore[arg-type]
        if requested is not None and int(np.prod(requested)) != int(np.prod(shape)):
            raise SpecError(f"{self.source}: --input-shape {requested} has "
                            f"{int(np.prod(requested))} values but the ONNX input '{name}' has "
                            f"shape (N, {shown}) ({int(np.prod(shape))} values); pass a matching "
                            "shape.")
        return shape

    # ---- the pass ------------------------------------------------------------------------

    def run(self) -> nn.Sequential:
        for index, node in enumerate(self.graph.node):
            where = f"{self.source}: ONNX node '{node.name or '<unnamed>'}' (op {node.op_type}, " \
                    f"node {index})"
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedLayerError(
                    f"{where} is from operator domain '{node.domain}', which is not supported.")
            data = [name for name in node.input if name and name not in self.consts]
            if node.op_type == "Shape":
                with _malformed(where):
                    self._shape(node, where)
                continue
            if not data:
                with _malformed(where):
                    self._constant_node(node, where)
                continue
            handler = self.handlers.get(node.op_type)
            if handler is None:
                raise UnsupportedLayerError(
                    f"{where} is not supported; supported ops: {', '.join(SUPPORTED_OPS)}. "
                    "Re-export the network without it.")
            if len(data) > 1:
                raise UnsupportedLayerError(
                    f"{where} combines computed tensors {', '.join(map(repr, data))}; only chain "
                    "networks are supported (no branches or skip connections).")
            if data[0] != self.current:
                raise UnsupportedLayerError(
                    f"{where} reads '{data[0]}' but the chain is at '{self.current}'; only chain "
                    "networks are supported (no branches or skip connections).")
            readers = self.consumers.get(self.current, [])
            if len(readers) > 1:
                raise UnsupportedLayerError(
                    f"{where}: tensor '{self.current}' feeds {len(readers)} nodes "
                    f"({', '.join(map(repr, readers))}); only chain networks are supported "
                    "(no branches or skip connections).")
            self._check_attributes(node, where)
            self.node_label = f"'{node.name}'" if node.name else f"{node.op_type} (node {index})"
            with _malformed(where):
                handler(node, where)
            self.current = node.output[0]
            self.shapes[self.current] = self.shape
        where = f"{self.source}: the graph output '{self.output_name}'"
        if self.current != self.output_name:
            raise UnsupportedLayerError(
                f"{where} is not the end of the chain of nodes (which ends at '{self.current}'); "
                "only chain networks are supported.")
        self._flush(where)
        self._start_layers(where)
        if not self.final:
            if not self.layers:
                self._emit("identity", nn.Identity())
            return nn.Sequential(OrderedDict(self.layers)).eval()
        if len(self.shape) != 1:
            self._emit("flatten", nn.Flatten())
            self.shape = (int(np.prod(self.shape)),)
        self.num_classes = self.shape[0]
        self._check_output(where)
        if not self.layers:
            self._emit("identity", nn.Identity())
        layers = OrderedDict(self.layers)
        last = next(reversed(layers))
        if isinstance(layers[last], nn.Linear) and "out" not in layers:
            layers = OrderedDict((("out" if k == last else k), v) for k, v in layers.items())
        return nn.Sequential(layers).eval()

    def _check_output(self, where: str) -> None:
        dims = list(self.graph.output[0].type.tensor_type.shape.dim)
        known = [d.dim_value for d in dims[1:] if d.HasField("dim_value")]
        if dims and len(known) == len(dims) - 1 and int(np.prod(known)) != self.num_classes:
            raise UnsupportedLayerError(
                f"{where} declares shape {_batched(tuple(known))} but the converted "
                f"network gives {self.num_classes} values; the file is inconsistent.")

    # ---- attributes ----------------------------------------------------------------------

    _ATTRIBUTES: dict[str, tuple[str, ...]] = {
        "Gemm": ("alpha", "beta", "transA", "transB", "broadcast"),
        "MatMul": (), "Add": ("broadcast", "axis"), "Sub": ("broadcast", "axis"),
        "Mul": ("broadcast", "axis"), "Div": ("broadcast", "axis"), "Relu": (),
        "Conv": ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"),
        "Flatten": ("axis",), "Reshape": ("allowzero", "shape"),
        "BatchNormalization": ("epsilon", "momentum", "training_mode", "spatial", "is_test",
                               "consumed_inputs"),
        "AveragePool": ("auto_pad", "ceil_mode", "count_include_pad", "dilations",
                        "kernel_shape", "pads", "strides"),
        "MaxPool": ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads",
                    "storage_order", "strides"),
        "GlobalAveragePool": (), "Identity": (), "Dropout": ("ratio", "seed", "is_test"),
        "Cast": ("to", "saturate"),
        "Transpose": ("perm",), "LeakyRelu": ("alpha",), "Sigmoid": (), "Tanh": (),
    }

    def _check_attributes(self, node: Any, where: str) -> None:
        known = self._ATTRIBUTES.get(node.op_type, ())
        for attr in node.attribute:
            if attr.name not in known:
                raise UnsupportedLayerError(f"{where} has attribute '{attr.name}', which the "
                                            "converter does not support.")
        attrs = _attributes(node)
        if attrs.get("broadcast", 1) != 1 or "axis" in attrs and node.op_type != "Flatten":
            raise UnsupportedLayerError(f"{where}: legacy broadcasting attributes (broadcast/axis) "
                                        "are not supported; re-export with opset >= 7.")

    # ---- layers --------------------------------------------------------------------------

    def _emit(self, kind: str, layer: nn.Module) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        n = self.counts[kind]
        name = kind if kind in ("norm", "flatten") and n == 1 else f"{kind}{n}"
        self.layers.append((name, layer))
        self.open_affine = isinstance(layer, (nn.Linear, nn.Conv2d))

    def _start_layers(self, where: str) -> None:
        """Fix the model's input shape before the first layer (flatten a re-shaped input)."""
        if self.model_input_shape is not None:
            return
        target = self._input_target()
        self.model_input_shape = target
        self._reshape_input(target, where)

    def _reshape_input(self, target: Shape, where: str) -> None:
        """Layers that take the model's input `target` to the data's shape, keeping the values'
        order: nothing, a Flatten, or (for a flat file input given an image shape) a Reshape."""
        shape = self.shape
        if target == shape:
            return
        if len(shape) == 1:
            self._emit("flatten", nn.Flatten())
            return
        if len(self.file_shape) == 1:  # --input-shape for a flat input: the same order
            self._emit("reshape", Reshape(shape))
            return
        raise UnsupportedLayerError(
            f"{where}: the network re-shapes its input to {shape}, which does not match the model "
            f"input {target}; pass --input-shape {','.join(map(str, shape))}.")

    def _input_target(self) -> tuple[int, int, int]:
        """The model's input shape: the requested one, an image shape of the file, or (1, 1, D)."""
        requested = self.requested_shape
        if requested is not None:
            return requested  # type: ignore[return-value]
        for shape in (self.shape, self.file_shape):  # the first layer's frame, else the file's
            if len(shape) == 3:
                return shape  # type: ignore[return-value]
        return (1, 1, int(np.prod(self.shape)))

    def _flush(self, where: str, *, fold_into: str | None = None,
               conv_padded: bool = False) -> _Affine | None:
        """Turn the pending elementwise map into layers; return it when the next layer takes it.

        Args:
            fold_into: ``"linear"`` or ``"conv"`` when the next layer can absorb the map on its
                input side; the map is then returned instead of emitted.
            conv_padded: the next conv pads its input (a shift does not commute with padding).
        """
        pending, self.pending = self.pending, None
        nodes, self.pending_nodes = self.pending_nodes, []
        if pending is None or pending.is_identity():
            self._start_layers(where)
            return None
        if self.model_input_shape is None:
            # At the input: a per-channel map with positive scale is the input normalization.
            target = self._input_target()
            channel = pending.reshaped(target).per_channel()
            if channel is not None and np.all(channel[0] > 0):
                scale, shift = channel
                mean, std = -shift / scale, 1.0 / scale
                self.model_input_shape = target  # type: ignore[assignment]
                self._emit("norm", Normalize(mean.tolist(), std.tolist()))
                self.norm = (tuple(mean.tolist()), tuple(std.tolist()))
                self._reshape_input(target, where)
                return None
            self._start_layers(where)
        last = self.layers[-1][1] if self.layers else None
        if self.open_affine and isinstance(last, nn.Linear):
            _fold_after_linear(last, pending)
            return None
        channel = pending.per_channel()
        if self.open_affine and isinstance(last, nn.Conv2d) and channel is not None:
            _fold_after_conv(last, *channel)
            return None
        if fold_into == "linear":
            return pending
        if fold_into == "conv" and channel is not None and (
                not conv_padded or np.all(channel[1] == 0)):
            return pending
        if channel is not None:
            self._emit("affine", _channel_affine(*channel))
            return None
        if pending.scale.ndim == 1:
            self._emit("affine", _diagonal_linear(pending))
            return None
        raise UnsupportedLayerError(
            f"{where}: the constant elementwise Add/Sub/Mul/Div of node(s) "
            f"{', '.join(nodes) or '?'} varies within a channel of the {self.shape} feature map "
            "and can not be expressed with the engine's layers.")

    # ---- elementwise ---------------------------------------------------------------------

    def _constant_operand(self, node: Any, where: str) -> tuple[np.ndarray, bool]:
        """The constant operand of a binary op (broadcast to the feature shape), data first?"""
        data_first = node.input[0] == self.current
        other = node.input[1] if data_first else node.input[0]
        value = np.asarray(self.consts[other], dtype=np.float64)
        if not np.all(np.isfinite(value)):
            raise UnsupportedLayerError(f"{where}: its constant operand '{other}' is not finite.")
        rank = len(self.shape) + 1
        if value.ndim > rank or value.ndim == rank and value.shape[0] != 1:
            raise UnsupportedLayerError(
                f"{where}: its constant operand '{other}' of shape {value.shape} does not "
                f"broadcast per sample onto the data of shape {_batched(self.shape)}.")
        if value.ndim == rank:
            value = value[0]
        try:
            if np.broadcast_shapes(value.shape, self.shape) != self.shape:
                raise ValueError
        except ValueError:
            raise UnsupportedLayerError(
                f"{where}: its constant operand '{other}' of shape {value.shape} does not "
                f"broadcast onto the data of shape {_batched(self.shape)}.") from None
        return np.broadcast_to(value, self.shape).copy(), data_first

    def _affine(self) -> _Affine:
        if self.pending is None:
            self.pending = _Affine(np.ones(self.shape), np.zeros(self.shape))
        if self.node_label not in self.pending_nodes:
            self.pending_nodes.append(self.node_label)
        return self.pending

    def _add(self, node: Any, where: str) -> None:
        value, _ = self._constant_operand(node, where)
        self._affine().shift += value

    def _sub(self, node: Any, where: str) -> None:
        value, data_first = self._constant_operand(node, where)
        affine = self._affine()
        if data_first:
            affine.shift -= value
        else:
            affine.scale, affine.shift = -affine.scale, value - affine.shift

    def _mul(self, node: Any, where: str) -> None:
        value, _ = self._constant_operand(node, where)
        affine = self._affine()
        affine.scale, affine.shift = affine.scale * value, affine.shift * value

    def _div(self, node: Any, where: str) -> None:
        value, data_first = self._constant_operand(node, where)
        if not data_first:
            raise UnsupportedLayerError(f"{where} divides a constant by the data, which is not "
                                        "an affine map.")
        if np.any(value == 0):
            raise UnsupportedLayerError(f"{where} divides by a constant that contains 0.")
        affine = self._affine()
        affine.scale, affine.shift = affine.scale / value, affine.shift / value

    # ---- linear layers -------------------------------------------------------------------

    def _linear(self, weight: np.ndarray, bias: np.ndarray, where: str) -> None:
        if len(self.shape) != 1:
            raise UnsupportedLayerError(
                f"{where} multiplies a tensor of shape {_batched(self.shape)}; "
                "only flat (N, D) inputs are supported (Flatten first).")
        if weight.shape[1] != self.shape[0]:
            raise UnsupportedLayerError(
                f"{where}: its weight takes {weight.shape[1]} features but the data has "
                f"{self.shape[0]}; the file is inconsistent.")
        pre = self._flush(where, fold_into="linear")
        weight = weight.astype(np.float64)
        bias = bias.astype(np.float64)
        if pre is not None:  # W (x * s + t) + b = (W diag s) x + (W t + b)
            bias = bias + weight @ pre.shift
            weight = weight * pre.scale[None, :]
        layer = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            layer.bias.copy_(torch.from_numpy(bias))
        self._emit("fc", layer)
        self.shape = (weight.shape[0],)

    def _gemm(self, node: Any, where: str) -> None:
        attrs = _attributes(node)
        if node.input[0] != self.current:
            raise UnsupportedLayerError(f"{where} takes the data as its second operand; only "
                                        "Gemm(data, constant weight) is supported.")
        if attrs.get("transA", 0):
            raise UnsupportedLayerError(f"{where}: attribute transA=1 (transposed data) is not "
                                        "supported.")
        b = np.asarray(self.consts[node.input[1]], dtype=np.float64)
        if b.ndim != 2:
            raise UnsupportedLayerError(f"{where}: its weight has shape {b.shape}; expected 2-D.")
        weight = (b if attrs.get("transB", 0) else b.T) * float(attrs.get("alpha", 1.0))
        out = weight.shape[0]
        bias = np.zeros(out)
        if len(node.input) > 2 and node.input[2]:
            c = np.asarray(self.consts[node.input[2]], dtype=np.float64)
            if c.size not in (1, out) or c.ndim > 2 or c.ndim == 2 and c.shape[0] != 1:
                raise UnsupportedLayerError(f"{where}: its bias has shape {c.shape}; expected "
                                            f"({out},), (1, {out}) or a scalar.")
            bias = np.broadcast_to(c.reshape(-1), (out,)) * float(attrs.get("beta", 1.0))
        self._linear(weight, bias, where)

    def _matmul(self, node: Any, where: str) -> None:
        if node.input[0] != self.current:
            raise UnsupportedLayerError(f"{where} takes the data as its second operand; only "
                                        "MatMul(data, constant weight) is supported.")
        b = np.asarray(self.consts[node.input[1]], dtype=np.float64)
        if b.ndim != 2:
            raise UnsupportedLayerError(f"{where}: its weight has shape {b.shape}; expected 2-D.")
        self._linear(b.T, np.zeros(b.shape[1]), where)

    def _conv(self, node: Any, where: str) -> None:
        attrs = _attributes(node)
        if len(self.shape) != 3:
            raise UnsupportedLayerError(f"{where} needs (N, C, H, W) data; got "
                                        f"{_batched(self.shape)}.")
        if node.input[0] != self.current:
            raise UnsupportedLayerError(f"{where}: the data must be the first input.")
        weight = np.asarray(self.consts[node.input[1]], dtype=np.float64)
        if weight.ndim != 4:
            raise UnsupportedLayerError(f"{where}: only 2-D convolutions are supported (weight "
                                        f"shape {weight.shape}).")
        out_c, in_c, kh, kw = weight.shape
        c, h, w = self.shape
        if attrs.get("group", 1) != 1:
            raise UnsupportedLayerError(f"{where}: attribute group={attrs['group']} is not "
                                        "supported (only group=1).")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise UnsupportedLayerError(f"{where}: attribute dilations={attrs['dilations']} is not "
                                        "supported (only 1).")
        if list(attrs.get("kernel_shape", [kh, kw])) != [kh, kw]:
            raise UnsupportedLayerError(f"{where}: attribute kernel_shape={attrs['kernel_shape']} "
                                        f"disagrees with the weight shape {weight.shape}.")
        if in_c != c:
            raise UnsupportedLayerError(f"{where}: its weight takes {in_c} channels but the data "
                                        f"has {c}; the file is inconsistent.")
        strides = [int(s) for s in attrs.get("strides", [1, 1])]
        pad = _pads_2d(attrs, (h, w), (kh, kw), strides, where)
        bias = np.zeros(out_c)
        if len(node.input) > 2 and node.input[2]:
            bias = np.asarray(self.consts[node.input[2]], dtype=np.float64).reshape(-1)
        pre = self._flush(where, fold_into="conv", conv_padded=any(pad))
        if pre is not None:  # per-channel x*s + t before the conv (t = 0 when padded)
            channel = pre.per_channel()
            assert channel is not None
            scale, shift = channel
            bias = bias + np.einsum("oikl,i->o", weight, shift)
            weight = weight * scale[None, :, None, None]
        layer = nn.Conv2d(c, out_c, (kh, kw), stride=tuple(strides), padding=pad)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight))
            assert layer.bias is not None
            layer.bias.copy_(torch.from_numpy(bias))
        self._emit("conv", layer)
        self.shape = (out_c, (h + 2 * pad[0] - kh) // strides[0] + 1,
                      (w + 2 * pad[1] - kw) // strides[1] + 1)
        if min(self.shape) < 1:
            raise UnsupportedLayerError(f"{where} gives an empty output {self.shape}.")

    def _batchnorm(self, node: Any, where: str) -> None:
        attrs = _attributes(node)
        if attrs.get("training_mode", 0) or len(node.output) > 1 and any(node.output[1:]):
            raise UnsupportedLayerError(f"{where}: attribute training_mode=1 (training statistics) "
                                        "is not supported; export in eval mode.")
        if attrs.get("spatial", 1) != 1:
            raise UnsupportedLayerError(f"{where}: attribute spatial=0 is not supported.")
        scale, bias, mean, var = (np.asarray(self.consts[n], dtype=np.float64).reshape(-1)
                                  for n in node.input[1:5])
        eps = float(attrs.get("epsilon", 1e-5))
        channels = self.shape[0]
        if len(self.shape) == 3:
            self._flush(where)
            layer = nn.BatchNorm2d(channels, eps=eps)
            with torch.no_grad():
                for param, value in ((layer.weight, scale), (layer.bias, bias),
                                     (layer.running_mean, mean), (layer.running_var, var)):
                    assert param is not None
                    param.copy_(torch.from_numpy(value))
            self._emit("bn", layer.eval())
            return
        if len(self.shape) != 1:
            raise UnsupportedLayerError(f"{where} on data of shape "
                                        f"{_batched(self.shape)} is not supported.")
        factor = scale / np.sqrt(var + eps)  # an elementwise affine map on a vector
        affine = self._affine()
        affine.scale, affine.shift = affine.scale * factor, (affine.shift - mean) * factor + bias

    # ---- the rest ------------------------------------------------------------------------

    def _relu(self, node: Any, where: str) -> None:
        self._flush(where)
        self._emit("relu", nn.ReLU())

    def _leaky_relu(self, node: Any, where: str) -> None:
        alpha = float(_attributes(node).get("alpha", 0.01))
        if not 0.0 <= alpha <= 1.0:
            raise UnsupportedLayerError(f"{where}: attribute alpha={alpha} is not supported; "
                                        "only slopes in [0, 1] (a convex, monotone LeakyRelu).")
        self._flush(where)
        self._emit("lrelu", nn.LeakyReLU(alpha))

    def _sigmoid(self, node: Any, where: str) -> None:
        self._flush(where)
        self._emit("sigmoid", nn.Sigmoid())

    def _tanh(self, node: Any, where: str) -> None:
        self._flush(where)
        self._emit("tanh", nn.Tanh())

    def _pool_window(self, node: Any, where: str) -> tuple[dict[str, Any], _Window]:
        """The attributes and the window of an AveragePool or MaxPool on (N, C, H, W) data:
        2-D kernel, strides, symmetric padding (at most half the kernel) and output shape,
        refusing what the pooling layers do not support (ceil_mode=1, dilations other than 1)."""
        attrs = _attributes(node)
        if len(self.shape) != 3:
            raise UnsupportedLayerError(f"{where} needs (N, C, H, W) data.")
        kernel = [int(k) for k in attrs.get("kernel_shape", [])]
        if len(kernel) != 2:
            raise UnsupportedLayerError(f"{where}: attribute kernel_shape={kernel} is not 2-D.")
        if attrs.get("ceil_mode", 0):
            raise UnsupportedLayerError(f"{where}: attribute ceil_mode=1 is not supported.")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise UnsupportedLayerError(f"{where}: attribute dilations={attrs['dilations']} is not "
                                        "supported.")
        strides = [int(s) for s in attrs.get("strides", [1, 1])]
        c, h, w = self.shape
        pad = _pads_2d(attrs, (h, w), (kernel[0], kernel[1]), strides, where)
        if any(2 * p > k for p, k in zip(pad, kernel, strict=True)):
            raise UnsupportedLayerError(f"{where}: padding {pad} larger than half the kernel.")
        out = (c, (h + 2 * pad[0] - kernel[0]) // strides[0] + 1,
               (w + 2 * pad[1] - kernel[1]) // strides[1] + 1)
        return attrs, _Window((kernel[0], kernel[1]), (strides[0], strides[1]), pad, out)

    def _avgpool(self, node: Any, where: str) -> None:
        attrs, win = self._pool_window(node, where)
        self._flush(where)
        include_pad = bool(attrs.get("count_include_pad", 0))
        self._emit("pool", nn.AvgPool2d(win.kernel, stride=win.stride, padding=win.padding,
                                        count_include_pad=include_pad))
        self.shape = win.out_shape

    def _maxpool(self, node: Any, where: str) -> None:
        if len(node.output) > 1 and node.output[1] and node.output[1] in self.consumers:
            raise UnsupportedLayerError(f"{where}: its Indices output is used; only the pooled "
                                        "values are supported.")
        _, win = self._pool_window(node, where)
        self._flush(where)  # max does not commute with a pending elementwise map
        self._emit("maxpool", nn.MaxPool2d(win.kernel, stride=win.stride, padding=win.padding))
        self.shape = win.out_shape
        if min(self.shape) < 1:
            raise UnsupportedLayerError(f"{where} gives an empty output {self.shape}.")

    def _global_avgpool(self, node: Any, where: str) -> None:
        if len(self.shape) != 3:
            raise UnsupportedLayerError(f"{where} needs (N, C, H, W) data.")
        c, h, w = self.shape
        self._flush(where)
        self._emit("pool", nn.AvgPool2d((h, w)))
        self.shape = (c, 1, 1)

    def _passthrough(self, node: Any, where: str) -> None:
        """Identity: nothing to do."""

    def _cast(self, node: Any, where: str) -> None:
        from onnx import helper

        to = _attributes(node).get("to")
        if to is None or np.dtype(helper.tensor_dtype_to_np_dtype(to)).kind != "f":
            raise UnsupportedLayerError(f"{where}: attribute to={to} casts the data to a "
                                        "non-float type; only float casts are supported.")

    def _dropout(self, node: Any, where: str) -> None:
        if len(node.output) > 1 and node.output[1] and node.output[1] in self.consumers:
            raise UnsupportedLayerError(f"{where}: its mask output is used; only inference "
                                        "Dropout is supported.")
        if len(node.input) > 2 and node.input[2]:
            mode = self.consts.get(node.input[2])
            if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
                raise UnsupportedLayerError(f"{where}: training_mode is on; only inference "
                                            "Dropout is supported.")

    def _flatten(self, node: Any, where: str) -> None:
        axis = int(_attributes(node).get("axis", 1))
        if axis < 0:
            axis += len(self.shape) + 1
        if axis != 1:
            raise UnsupportedLayerError(f"{where}: attribute axis={axis} is not supported; only "
                                        "axis=1 (keep the batch) flattens per sample.")
        self._to_shape((int(np.prod(self.shape)),), where)

    def _reshape(self, node: Any, where: str) -> None:
        attrs = _attributes(node)
        if len(node.input) < 2 or node.input[1] not in self.consts:
            raise UnsupportedLayerError(f"{where}: its target shape is not a constant.")
        target = [int(v) for v in np.asarray(self.consts[node.input[1]]).reshape(-1)]
        full = (-2, *self.shape)  # -2 stands for the batch size
        if not attrs.get("allowzero", 0):
            target = [full[i] if v == 0 and i < len(full) else v for i, v in enumerate(target)]
        numel = int(np.prod(self.shape))
        batch_ok = target and target[0] in (-2, -1, 1)
        rest = target[1:]
        if not batch_ok or rest.count(-1) > 1 or any(v < -1 or v == 0 for v in rest) or (
                target[0] == -1 and -1 in rest):
            raise UnsupportedLayerError(
                f"{where}: reshape to {_show(target)} is not supported; only re-shaping each "
                "sample, (N, ...) -> (N, ...), keeping the batch first.")
        if -1 in rest:
            known = int(np.prod([v for v in rest if v != -1]))
            if known == 0 or numel % known:
                raise UnsupportedLayerError(f"{where}: reshape of {numel} values per sample to "
                                            f"{_show(target)} is impossible.")
            rest = [numel // known if v == -1 else v for v in rest]
        if int(np.prod(rest)) != numel:
            raise UnsupportedLayerError(f"{where}: reshape of {numel} values per sample to "
                                        f"{_show(target)} is impossible.")
        self._to_shape(tuple(rest), where)

    def _to_shape(self, shape: Shape, where: str) -> None:
        if shape == self.shape:
            return
        if self.model_input_shape is None:
            # Still before the first layer: the model's input frame is decided later.
            if self.pending is not None:
                self.pending = self.pending.reshaped(shape)
            self.shape = shape
            return
        # exact: the map is elementwise and the reshape keeps the values' order
        self._place_pending(None if self.pending is None else self.pending.reshaped(shape), where)
        self._emit("flatten" if len(shape) == 1 else "reshape",
                   nn.Flatten() if len(shape) == 1 else Reshape(shape))
        self.shape = shape

    def _place_pending(self, moved: _Affine | None, where: str) -> None:
        """Before a reshape or permutation of the data: where the pending elementwise map goes.

        `moved` is the map in the new layout (exact: the values are only moved). When it folds
        into the Linear/Conv2d before it, or is the input normalization, it does so now (no
        layer). Otherwise it moves along when the new layout can express it (it may fold into
        the next layer), else it becomes a layer now (a per-channel BatchNorm2d or a diagonal
        Linear), else it moves along (an error names its nodes if it never becomes expressible).
        """
        pending = self.pending
        if pending is None or moved is None:
            return
        last = self.layers[-1][1] if self.layers else None
        if self.model_input_shape is None:
            channel = pending.reshaped(self._input_target()).per_channel()
            free = channel is not None and bool(np.all(channel[0] > 0))
        else:
            channel = pending.per_channel()
            free = self.open_affine and (isinstance(last, nn.Linear) or (
                isinstance(last, nn.Conv2d) and channel is not None))
        now = channel is not None or pending.scale.ndim == 1
        later = moved.per_channel() is not None or moved.scale.ndim == 1
        if free or now and not later:
            self._flush(where)
        else:
            self.pending = moved

    def _transpose(self, node: Any, where: str) -> None:
        rank = len(self.shape) + 1
        perm = [int(p) for p in _attributes(node).get("perm", range(rank - 1, -1, -1))]
        if sorted(perm) != list(range(rank)):
            raise UnsupportedLayerError(f"{where}: attribute perm={perm} is not a permutation of "
                                        f"the {rank} dimensions of its data "
                                        f"{_batched(self.shape)}.")
        if perm[0] != 0:
            raise UnsupportedLayerError(f"{where}: attribute perm={perm} moves the batch "
                                        "dimension; only permutations of each sample's dimensions "
                                        "(perm[0] = 0) are supported.")
        self._permute(tuple(p - 1 for p in perm[1:]), where)

    def _permute(self, dims: tuple[int, ...], where: str) -> None:
        """Permute each sample's dimensions: output dimension ``i`` is dimension ``dims[i]``.

        A pending elementwise map goes where :meth:`_place_pending` says. Before the first layer
        the model's input frame is fixed first: the model keeps the file's input order and
        starts with the permutation (a Keras NHWC input stays NHWC, so a VNNLIB property's X_i
        keep their meaning). A permutation right after another is composed with it, and both
        are dropped when they cancel (exact: values are only moved).
        """
        if dims == tuple(range(len(dims))):
            return
        self._place_pending(None if self.pending is None else self.pending.permuted(dims), where)
        self._start_layers(where)
        shape = tuple(self.shape[d] for d in dims)
        last = self.layers[-1][1] if self.layers else None
        if isinstance(last, Permute):
            dims = tuple(last.dims[d] for d in dims)
            self.layers.pop()
            if dims == tuple(range(len(dims))):  # the two cancel
                previous = self.layers[-1][1] if self.layers else None
                self.open_affine = isinstance(previous, (nn.Linear, nn.Conv2d))
                self.shape = shape
                return
        self._emit("permute", Permute(dims))
        self.shape = shape

    # ---- constants -----------------------------------------------------------------------

    def _shape(self, node: Any, where: str) -> None:
        source = node.input[0]
        if source in self.consts:
            value = np.asarray(self.consts[source].shape, dtype=np.int64)
        elif source in self.shapes:
            value = np.asarray([0, *self.shapes[source]], dtype=np.int64)  # 0: "keep the batch"
        else:
            raise UnsupportedLayerError(f"{where} reads the shape of '{source}', which is not on "
                                        "the chain.")
        attrs = _attributes(node)
        start, end = attrs.get("start", 0), attrs.get("end", None)
        self.consts[node.output[0]] = value[start:end]

    def _constant_node(self, node: Any, where: str) -> None:
        """Evaluate a node whose inputs are all constants."""
        from onnx import helper, numpy_helper

        op = node.op_type
        attrs = _attributes(node)
        args = [self.consts[n] if n else None for n in node.input]
        if op not in _CONSTANT_OPS:
            raise UnsupportedLayerError(
                f"{where} on constants is not supported; supported constant ops: "
                f"{', '.join(_CONSTANT_OPS)}.")
        if op == "Constant":
            if "value" in attrs:
                value = numpy_helper.to_array(attrs["value"])
            elif "value_float" in attrs or "value_int" in attrs:
                value = np.asarray(attrs.get("value_float", attrs.get("value_int")))
            elif "value_floats" in attrs or "value_ints" in attrs:
                value = np.asarray(attrs.get("value_floats", attrs.get("value_ints")))
            else:
                raise UnsupportedLayerError(f"{where}: attribute '{next(iter(attrs), '?')}' is not "
                                            "supported (only numeric tensors).")
        elif op == "Identity":
            value = args[0]
        elif op == "Cast":
            value = np.asarray(args[0]).astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        elif op == "Gather":
            value = np.take(args[0], np.asarray(args[1]), axis=int(attrs.get("axis", 0)))
        elif op == "Concat":
            value = np.concatenate([np.atleast_1d(a) for a in args if a is not None],
                                   axis=int(attrs["axis"]))
        elif op == "Reshape":
            shape = [int(v) for v in np.asarray(args[1]).reshape(-1)]
            shape = [np.shape(args[0])[i] if v == 0 else v for i, v in enumerate(shape)]
            value = np.reshape(args[0], shape)
        elif op == "Transpose":
            perm = attrs.get("perm")
            axes = None if perm is None else [int(p) for p in perm]
            value = np.transpose(np.asarray(args[0]), axes)
        else:  # Unsqueeze / Squeeze: axes from the attribute (opset < 13) or the input
            axes = attrs.get("axes")
            if axes is None and len(args) > 1 and args[1] is not None:
                axes = [int(v) for v in np.asarray(args[1]).reshape(-1)]
            value = np.asarray(args[0])
            if op == "Unsqueeze":
                rank = value.ndim + len(axes or [])
                for axis in sorted(a % rank for a in axes or []):
                    value = np.expand_dims(value, axis)
            else:
                value = np.squeeze(value, axis=tuple(axes) if axes is not None else None)
        self.consts[node.output[0]] = np.asarray(value)


# ---- graphs with branches (residual Add, Concat) ---------------------------------------------

#: Operators that merge computed tensors (two or more data inputs).
MERGE_OPS = ("Add", "Concat")


def _data_consumers(proto: Any) -> tuple[dict[str, list[int]], set[str]]:
    """For each tensor, the nodes reading it as data (Shape nodes left out: they read only
    the shape); and the names of the constants (initializers, and outputs of nodes without data
    inputs)."""
    consts = {t.name for t in proto.graph.initializer}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(proto.graph.node):
        data = [n for n in node.input if n and n not in consts]
        if node.op_type == "Shape" or not data:  # a shape is known at conversion time
            consts.update(node.output)
            continue
        for name in data:
            consumers.setdefault(name, []).append(index)
    return consumers, consts


def _is_dag(proto: Any) -> bool:
    """Whether the graph has a node with several data inputs or a tensor read by several nodes
    (then :class:`_DagImporter` converts it; a chain keeps the chain converter)."""
    consumers, consts = _data_consumers(proto)
    if any(len(v) > 1 for v in consumers.values()):
        return True
    return any(len([n for n in node.input if n and n not in consts]) > 1
               for node in proto.graph.node if node.op_type != "Shape")


class _DagImporter:
    """An ONNX graph with branches: chains of single-input nodes (each converted by
    :class:`_Converter` as a sub-graph, with every operator it supports) joined by merge nodes:
    ``Add`` of two computed tensors of the same shape (a residual connection) and ``Concat`` of
    computed tensors along a dimension after the batch. The result is a ``torch.fx.GraphModule``
    whose submodules are the chains' ``nn.Sequential``s and whose graph adds and concatenates
    their outputs: the bound engine traces it (:mod:`certify.bounds.graph`). The first chain
    starts at the file's input (its input normalization and re-shaping as for a chain); any
    other node with several computed inputs raises a one-line error naming it.
    """

    def __init__(self, proto: Any, *, source: str, input_shape: Shape | None) -> None:
        self.proto = proto
        self.source = source
        self.input_shape = input_shape
        self.consumers, self.consts = _data_consumers(proto)
        self.data_nodes = {i for v in self.consumers.values() for i in v}

    def _where(self, index: int) -> str:
        node = self.proto.graph.node[index]
        return (f"{self.source}: ONNX node '{node.name or '<unnamed>'}' (op {node.op_type}, "
                f"node {index})")

    def _segments(self) -> tuple[list[tuple[str, list[int], str]], list[int]]:
        """Chains `(start tensor, node indices, end tensor)` and the merge nodes, in order."""
        graph = self.proto.graph
        output = graph.output[0].name
        chains: list[tuple[str, list[int], str]] = []
        merges: list[int] = []
        open_at: dict[str, int] = {}  # end tensor -> its chain, while it may grow
        for index, node in enumerate(graph.node):
            if node.op_type == "Shape":
                continue
            data = [n for n in node.input if n and n not in self.consts]
            if not data:
                continue
            if len(data) > 1:
                if node.op_type not in MERGE_OPS:
                    raise UnsupportedLayerError(
                        f"{self._where(index)} combines computed tensors "
                        f"{', '.join(map(repr, data))}; only Add and Concat may merge branches.")
                merges.append(index)
                continue
            t = data[0]
            k = open_at.pop(t, None)
            if k is not None and len(self.consumers.get(t, [])) == 1 and t != output:
                start, nodes, _ = chains[k]
                chains[k] = (start, [*nodes, index], node.output[0])
            else:
                chains.append((t, [index], node.output[0]))
                k = len(chains) - 1
            open_at[node.output[0]] = k
        return chains, merges

    def _sub_proto(self, start: str, nodes: list[int], end: str, shape: Shape | None) -> Any:
        """The chain as a graph of its own: its nodes, the constant nodes they can use, every
        initializer; input `start` (of `shape`, or the file's input), output `end`."""
        from onnx import TensorProto, helper

        graph = self.proto.graph
        chosen = set(nodes)
        known = {t.name for t in graph.initializer}
        available = {start} | {graph.node[i].output[0] for i in nodes}
        keep = []
        for index, node in enumerate(graph.node):
            ins = [n for n in node.input if n]
            if (index in chosen
                    or (node.op_type == "Shape" and ins and ins[0] in available)
                    or (node.op_type != "Shape" and index not in self.data_nodes
                        and all(n in known for n in ins))):
                keep.append(node)
                known.update(node.output)
        if shape is None:
            inp = next(i for i in graph.input if i.name == start)
        else:
            inp = helper.make_tensor_value_info(start, TensorProto.FLOAT, ["N", *shape])
        out = helper.make_tensor_value_info(end, TensorProto.FLOAT, None)
        sub = helper.make_graph(keep, f"{graph.name}:{end}", [inp], [out],
                                initializer=list(graph.initializer))
        return helper.make_model(sub, opset_imports=list(self.proto.opset_import))

    def run(self) -> tuple[nn.Module, _Converter]:
        import operator

        from torch import fx

        graph = self.proto.graph
        inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedLayerError(
                f"{self.source}: the ONNX graph has {len(inputs)} data inputs and "
                f"{len(graph.output)} outputs; only networks with one of each are supported.")
        x_name, output = inputs[0].name, graph.output[0].name
        chains, merges = self._segments()
        # the model's input: a chain from the file's input (an empty one when the input feeds
        # a merge or several nodes), which fixes the input shape and normalization
        first = next((k for k, c in enumerate(chains) if c[0] == x_name), None)
        if first is None or len(self.consumers.get(x_name, [])) > 1:
            chains.insert(0, (x_name, [], x_name))
            first = 0
        order: list[tuple[int, str, int]] = []  # (position, kind, index)
        for k, (_, nodes, _) in enumerate(chains):
            order.append((nodes[0] if nodes else -1, "chain", k))
        order += [(i, "merge", i) for i in merges]
        order.sort(key=lambda t: t[0])  # node order (the empty input chain first)
        root = nn.Module()
        fx_graph = fx.Graph()
        values: dict[str, Any] = {}
        shapes: dict[str, Shape] = {}
        head: _Converter | None = None
        placeholder = fx_graph.placeholder("x")
        for _, kind, k in order:
            if kind == "chain":
                start, nodes, end = chains[k]
                if k == first:
                    converter = _Converter(self._sub_proto(start, nodes, end, None),
                                           source=self.source, input_shape=self.input_shape)
                    head = converter
                    source_value = placeholder
                else:
                    if start not in values:
                        raise UnsupportedLayerError(
                            f"{self._where(nodes[0])} reads '{start}', which is computed "
                            "after it; the graph is not in topological order.")
                    converter = _Converter(self._sub_proto(start, nodes, end, shapes[start]),
                                           source=self.source, input_shape=None,
                                           segment_shape=shapes[start])
                    source_value = values[start]
                converter.final = end == output
                module = converter.run()
                name = f"chain{k}"
                root.add_module(name, module)
                values[end] = fx_graph.call_module(name, (source_value,))
                shapes[end] = converter.shape
                continue
            node = graph.node[k]
            where = self._where(k)
            data = [n for n in node.input if n and n not in self.consts]
            if len(data) != len([n for n in node.input if n]):
                raise UnsupportedLayerError(f"{where} mixes computed tensors and constants; "
                                            "only merges of computed tensors are supported.")
            missing = [n for n in data if n not in values]
            if missing:
                raise UnsupportedLayerError(f"{where} reads {missing[0]!r}, which no supported "
                                            "node computes before it.")
            got = [shapes[n] for n in data]
            if node.op_type == "Add":
                if len(data) != 2 or got[0] != got[1]:
                    raise UnsupportedLayerError(
                        f"{where} adds shapes {got}; only two tensors of the same shape (no "
                        "broadcasting) are supported.")
                values[node.output[0]] = fx_graph.call_function(
                    operator.add, (values[data[0]], values[data[1]]))
                shapes[node.output[0]] = got[0]
            else:
                axis = int(_attributes(node).get("axis", 1))
                rank = len(got[0]) + 1
                dim = axis + rank if axis < 0 else axis
                if not 1 <= dim < rank or any(len(g) != len(got[0]) for g in got):
                    raise UnsupportedLayerError(f"{where} concatenates along axis {axis}; only a "
                                                "dimension after the batch is supported.")
                values[node.output[0]] = fx_graph.call_function(
                    torch.cat, ([values[n] for n in data],), {"dim": dim})
                out = list(got[0])
                out[dim - 1] = sum(g[dim - 1] for g in got)
                shapes[node.output[0]] = tuple(out)
        if output not in values:
            raise UnsupportedLayerError(f"{self.source}: the graph output '{output}' is not "
                                        "computed by the supported nodes.")
        result = values[output]
        if len(shapes[output]) != 1:  # the logits as a vector, as for a chain
            root.add_module("flatten", nn.Flatten())
            result = fx_graph.call_module("flatten", (result,))
        fx_graph.output(result)
        assert head is not None
        head.shape = (int(np.prod(shapes[output])),)
        head.num_classes = head.shape[0]
        return fx.GraphModule(root, fx_graph, class_name="OnnxGraph").eval(), head


@contextmanager
def _malformed(where: str) -> Iterator[None]:
    """A node the converter can not read (missing inputs or attributes, constants of the wrong
    shape) as one UnsupportedLayerError naming the node."""
    try:
        yield
    except CertifyError:
        raise
    except (KeyError, IndexError, ValueError) as e:
        raise UnsupportedLayerError(
            f"{where} is malformed or uses a form the converter does not support "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}).") from None


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _batched(shape: Shape) -> str:
    """``(N, C, H, W)`` for a per-sample shape."""
    return "(" + ", ".join(["N", *map(str, shape)]) + ")"


def _show(target: list[int]) -> str:
    return "(" + ", ".join("N" if v == -2 else str(v) for v in target) + ")"


def _pads_2d(attrs: dict[str, Any], size: tuple[int, int], kernel: tuple[int, int],
             strides: list[int], where: str) -> tuple[int, int]:
    """Symmetric ``(pad_h, pad_w)`` from ``pads``/``auto_pad``; anything asymmetric is an error."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if len(strides) != 2 or any(s < 1 for s in strides):
        raise UnsupportedLayerError(f"{where}: attribute strides={strides} is not 2-D.")
    if auto in ("NOTSET", ""):
        pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i in range(2):
            out = -(-size[i] // strides[i])
            total = max((out - 1) * strides[i] + kernel[i] - size[i], 0)
            small, large = total // 2, total - total // 2
            pads[i], pads[i + 2] = (small, large) if auto == "SAME_UPPER" else (large, small)
    else:
        raise UnsupportedLayerError(f"{where}: attribute auto_pad={auto} is not supported.")
    if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
        raise UnsupportedLayerError(f"{where}: attribute pads={pads} is not symmetric; only "
                                    "equal padding on both sides is supported.")
    return pads[0], pads[1]


def _fold_after_linear(layer: nn.Linear, affine: _Affine) -> None:
    """``s * (W x + b) + t`` as one Linear."""
    with torch.no_grad():
        w = layer.weight.double() * torch.from_numpy(affine.scale)[:, None]
        b = layer.bias.double() * torch.from_numpy(affine.scale) + torch.from_numpy(affine.shift)
        layer.weight.copy_(w)
        layer.bias.copy_(b)


def _fold_after_conv(layer: nn.Conv2d, scale: np.ndarray, shift: np.ndarray) -> None:
    """A per-output-channel ``s * conv(x) + t`` as one Conv2d."""
    with torch.no_grad():
        s = torch.from_numpy(scale)
        assert layer.bias is not None
        layer.weight.copy_(layer.weight.double() * s[:, None, None, None])
        layer.bias.copy_(layer.bias.double() * s + torch.from_numpy(shift))


def _channel_affine(scale: np.ndarray, shift: np.ndarray) -> nn.BatchNorm2d:
    """A per-channel ``x * s + t`` as an eval BatchNorm2d (mean 0, var 1, eps 0): exact."""
    layer = nn.BatchNorm2d(len(scale), eps=0.0)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(scale))
        layer.bias.copy_(torch.from_numpy(shift))
    return layer.eval()


def _diagonal_linear(affine: _Affine) -> nn.Linear:
    """An elementwise ``x * s + t`` on vectors as a diagonal Linear."""
    d = affine.scale.shape[0]
    layer = nn.Linear(d, d)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.from_numpy(affine.scale)))
        layer.bias.copy_(torch.from_numpy(affine.shift))
    return layer
