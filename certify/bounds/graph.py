"""Networks that are DAGs: a module's ``forward`` traced with ``torch.fx`` into ops with inputs.

An ``nn.Sequential`` converts to a chain (:func:`certify.bounds.network.to_network`); any other
module -- a residual block whose ``forward`` is ``relu(x + self.body(x))``, a model that
concatenates two branches -- is traced by ``torch.fx.symbolic_trace`` (every module with a
bound rule is a leaf) and each graph node becomes one op through this table:

* ``call_module`` of a module with a converter in :data:`~certify.bounds.layers.CONVERTERS`
  (Dropout and Identity are skipped: the node stands for its input);
* ``operator.add`` / ``torch.add`` / ``Tensor.add`` of two tensors: :class:`AddOp`;
* ``torch.cat`` / ``torch.concat`` of tensors along a per-sample dimension: :class:`ConcatOp`;
* ``torch.relu`` / ``F.relu`` / ``Tensor.relu``, ``torch.sigmoid``, ``torch.tanh``:
  the activation ops;
* ``torch.flatten`` / ``Tensor.flatten`` with a start dimension after the batch: a reshape.

Anything else is refused with one line naming the node and its operation. The result is a
:class:`~certify.bounds.network.Network` whose ``inputs`` give each op's input nodes in
topological order; eval-mode BatchNorm is folded into a convolution whose only consumer it is.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from certify.bounds.layers import (
    CONVERTERS,
    RULES,
    SUPPORTED,
    AddOp,
    ConcatOp,
    Op,
    ReluOp,
    Shape,
    ShapeMismatch,
    SigmoidOp,
    TanhOp,
    UnsupportedConfig,
    _sample_dim,
    is_merge,
    merge_forward,
    reshape_op,
)
from certify.errors import SpecError, UnsupportedLayerError

if TYPE_CHECKING:
    from certify.bounds.network import Network

__all__ = ["consumers", "evaluate", "graph_network"]

GRAPH_SUPPORTED = ("in a traced forward: the modules of the chain table, + / torch.add of two "
                   "tensors, torch.cat along a dimension after the batch, torch.relu / F.relu, "
                   "torch.sigmoid, torch.tanh, torch.flatten(x, d >= 1)")


def evaluate(layers: tuple[Op, ...] | list[Op], inputs: tuple[tuple[int, ...], ...],
             x: Tensor, keep: dict[int, Tensor] | None = None) -> Tensor:
    """The output of the DAG `layers` (inputs as ``Network.inputs``) on the batch `x`; each
    node's value is dropped after its last consumer. `keep`: filled with the values of the
    nodes it names (its keys; -1 is the input) as they are computed."""
    last_use = _last_use(inputs)
    values: dict[int, Tensor] = {-1: x}
    if keep is not None and -1 in keep:
        keep[-1] = x
    for i, op in enumerate(layers):
        args = [values[k] for k in inputs[i]]
        if is_merge(op):
            values[i] = merge_forward(op, args)  # type: ignore[arg-type]
        else:
            values[i] = RULES[type(op)].forward(op, args[0])
        if keep is not None and i in keep:
            keep[i] = values[i]
        for k in set(inputs[i]):
            if last_use.get(k) == i:
                del values[k]
    return values[len(layers) - 1] if layers else x


def _last_use(inputs: tuple[tuple[int, ...], ...]) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, srcs in enumerate(inputs):
        for k in srcs:
            last[k] = i
    return last


def consumers(inputs: tuple[tuple[int, ...], ...], n: int) -> list[list[int]]:
    """For nodes ``-1 .. n-1`` (index ``k + 1``), the ops that take them (with repeats)."""
    out: list[list[int]] = [[] for _ in range(n + 1)]
    for i, srcs in enumerate(inputs):
        for k in srcs:
            out[k + 1].append(i)
    return out


class _Tracer(fx.Tracer):
    """Every module with a bound rule is a leaf (certify's Normalize, Reshape and Permute
    included), so its converter sees it whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in CONVERTERS or super().is_leaf_module(m, module_qualified_name)


_ADD = {operator.add, operator.iadd, torch.add}
_CAT = {torch.cat, torch.concat}
_ACT: dict[Any, Callable[[Shape], Op]] = {
    torch.relu: lambda s: ReluOp(s, s), F.relu: lambda s: ReluOp(s, s),
    torch.sigmoid: lambda s: SigmoidOp(s, s), torch.tanh: lambda s: TanhOp(s, s),
}
_ACT_METHODS: dict[str, Callable[[Shape], Op]] = {
    "relu": lambda s: ReluOp(s, s), "sigmoid": lambda s: SigmoidOp(s, s),
    "tanh": lambda s: TanhOp(s, s),
}


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_module":
        return f"module {target!r}"
    if node.op == "call_method":
        return f"method Tensor.{target}"
    if node.op == "call_function":
        return f"function {getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}"
    return f"{node.op} {target!r}"


def graph_network(model: nn.Module, given: Shape) -> Network:
    """Trace `model` with ``torch.fx`` and convert its graph (see the module docstring).

    Raises:
        UnsupportedLayerError: for a model fx cannot trace, or naming the first node whose
            operation has no rule.
        SpecError: for shapes that do not fit.
    """
    from certify.bounds.network import Network

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for data-dependent control flow
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedLayerError(
            f"{type(model).__name__} cannot be traced by torch.fx ({first}); write its forward "
            "without data-dependent control flow, or as an nn.Sequential.") from None
    modules = dict(model.named_modules())
    ops: list[Op] = []
    names: list[str] = []
    inputs: list[tuple[int, ...]] = []
    node_of: dict[fx.Node, int] = {}  # fx node -> op index (-1: the input)
    placeholders = 0
    out_node: fx.Node | None = None

    def shape_of(k: int) -> Shape:
        return given if k == -1 else ops[k].out_shape

    for node in graph.nodes:
        where = f"node '{node.name}' ({_describe(node)})"
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise UnsupportedLayerError(f"{where}: the engine bounds models of one input "
                                            "tensor.")
            node_of[node] = -1
            continue
        if node.op == "output":
            out_node = node
            continue
        tensors = [a for a in _flat_args(node) if isinstance(a, fx.Node)]
        srcs = []
        for a in tensors:
            if a not in node_of:
                raise UnsupportedLayerError(f"{where} takes {a.name}, which is no tensor the "
                                            f"engine has a rule for; supported: "
                                            f"{GRAPH_SUPPORTED}.")
            srcs.append(node_of[a])
        op = _convert_node(node, where, modules, srcs, shape_of)
        if op is None:  # identity in eval mode: the node stands for its input
            node_of[node] = srcs[0]
            continue
        ops.append(op)
        names.append(str(node.target) if node.op == "call_module" else node.name)
        inputs.append(tuple(srcs) if is_merge(op) else (srcs[0],))
        node_of[node] = len(ops) - 1
    assert out_node is not None
    result = out_node.args[0]
    if not isinstance(result, fx.Node) or result not in node_of:
        raise UnsupportedLayerError(f"{type(model).__name__}'s forward must return one tensor.")
    ops, names, inputs = _prune(ops, names, inputs, node_of[result])
    if not ops:
        raise SpecError(f"{type(model).__name__} computes nothing from its input.")
    model_ops, model_inputs = tuple(ops), tuple(inputs)
    layers, names, inputs = _fold(ops, names, inputs)
    if _is_chain(inputs) and _is_chain(model_inputs):  # a chain after all: no inputs
        inputs, model_inputs = [], ()
    return Network(tuple(layers), given, tuple(names), model_ops, source=model,
                   inputs=tuple(inputs), model_inputs=model_inputs)


def _is_chain(inputs: Any) -> bool:
    return all(tuple(srcs) == (i - 1,) for i, srcs in enumerate(inputs))


def _flat_args(node: fx.Node) -> list[Any]:
    out: list[Any] = []
    for a in [*node.args, *node.kwargs.values()]:
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _convert_node(node: fx.Node, where: str, modules: dict[str, nn.Module], srcs: list[int],
                  shape_of: Callable[[int], Shape]) -> Op | None:
    """The op of one fx node whose tensor arguments are the nodes `srcs`."""
    if node.op == "get_attr":
        raise UnsupportedLayerError(f"{where}: a tensor constant in the forward has no rule; "
                                    "keep constants inside modules (e.g. Normalize).")
    if node.op == "call_module":
        module = modules[str(node.target)]
        converter = CONVERTERS.get(type(module))
        if converter is None:
            raise UnsupportedLayerError(f"{where} ({type(module).__name__}) has no bound rule; "
                                        f"supported: {SUPPORTED}.")
        if len(srcs) != 1 or len(node.args) != 1 or node.kwargs:
            raise UnsupportedLayerError(f"{where} must be called on one tensor.")
        try:
            return converter(module, shape_of(srcs[0]))
        except UnsupportedConfig as e:
            raise UnsupportedLayerError(f"{where} is not supported with {e}.") from None
        except ShapeMismatch as e:
            raise SpecError(f"{where} does not fit its input: it {e}.") from None
    target = node.target
    method = node.op == "call_method"
    if (not method and target in _ADD) or (method and target in ("add", "add_", "__add__")):
        extra = [a for a in _flat_args(node) if not isinstance(a, fx.Node)]
        if len(srcs) != 2 or extra:
            raise UnsupportedLayerError(f"{where}: only the sum of two tensors has a rule (no "
                                        "constants, no alpha).")
        a, b = shape_of(srcs[0]), shape_of(srcs[1])
        if a != b:
            raise SpecError(f"{where} adds tensors of shapes {a} and {b}; broadcasting has no "
                            "rule.")
        return AddOp(a, a)
    if not method and target in _CAT:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if (not isinstance(parts, (list, tuple)) or len(parts) != len(srcs) or len(srcs) < 2
                or not isinstance(dim, int)):
            raise UnsupportedLayerError(f"{where}: only torch.cat of a list of two or more "
                                        "tensors along a constant dimension has a rule.")
        shapes = [shape_of(k) for k in srcs]
        try:
            d = _sample_dim(dim, len(shapes[0]), "dim")
        except UnsupportedConfig as e:
            raise UnsupportedLayerError(f"{where} is not supported with {e}.") from None
        rest = [s[:d] + s[d + 1:] for s in shapes]
        if any(len(s) != len(shapes[0]) for s in shapes) or any(r != rest[0] for r in rest):
            raise SpecError(f"{where} concatenates shapes {shapes} along dim {dim}: the other "
                            "dimensions differ.")
        sizes = tuple(s[d] for s in shapes)
        out = list(shapes[0])
        out[d] = sum(sizes)
        return ConcatOp(d, sizes, shapes[0], tuple(out))
    act = _ACT_METHODS.get(str(target)) if method else _ACT.get(target)
    if act is not None:
        extra = [a for a in _flat_args(node) if not isinstance(a, fx.Node) and a is not False]
        if len(srcs) != 1 or extra:
            raise UnsupportedLayerError(f"{where} must be called on one tensor.")
        return act(shape_of(srcs[0]))
    if (not method and target is torch.flatten) or (method and target == "flatten"):
        shape = shape_of(srcs[0]) if srcs else ()
        args = [a for a in node.args[1:]]
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
        if len(srcs) != 1 or not isinstance(start, int) or not isinstance(end, int):
            raise UnsupportedLayerError(f"{where} must flatten one tensor between constant "
                                        "dimensions.")
        try:
            first, last = (_sample_dim(start, len(shape), "start_dim"),
                           _sample_dim(end, len(shape), "end_dim"))
        except UnsupportedConfig as err:
            raise UnsupportedLayerError(f"{where} is not supported with {err}.") from None
        size = 1
        for v in shape[first:last + 1]:
            size *= v
        return reshape_op(shape, (*shape[:first], size, *shape[last + 1:]))
    raise UnsupportedLayerError(f"{where} has no bound rule; supported: {GRAPH_SUPPORTED}.")


def _prune(ops: list[Op], names: list[str], inputs: list[tuple[int, ...]], out: int
           ) -> tuple[list[Op], list[str], list[tuple[int, ...]]]:
    """Keep the ops the output depends on, in order, ending with the output (so the last op is
    the output and every other op's output is used)."""
    if out == -1:
        return [], [], []
    live = {out}
    for i in range(out, -1, -1):
        if i in live:
            live.update(k for k in inputs[i] if k >= 0)
    keep = sorted(live)
    index = {old: new for new, old in enumerate(keep)} | {-1: -1}
    return ([ops[i] for i in keep], [names[i] for i in keep],
            [tuple(index[k] for k in inputs[i]) for i in keep])


def _fold(ops: list[Op], names: list[str], inputs: list[tuple[int, ...]]
          ) -> tuple[list[Op], list[str], list[tuple[int, ...]]]:
    """Fold each per-channel scale-shift (eval BatchNorm) into the convolution before it when
    that convolution has no other consumer (:func:`~certify.bounds.network.fold_pair`)."""
    from certify.bounds.network import fold_pair

    uses = consumers(tuple(inputs), len(ops))
    out_ops: list[Op] = []
    out_names: list[str] = []
    out_inputs: list[tuple[int, ...]] = []
    index: dict[int, int] = {-1: -1}
    for i, op in enumerate(ops):
        srcs = tuple(index[k] for k in inputs[i])
        if len(inputs[i]) == 1 and inputs[i][0] >= 0 and len(uses[inputs[i][0] + 1]) == 1:
            folded = fold_pair(out_ops[srcs[0]], op)
            if folded is not None:
                out_ops[srcs[0]] = folded
                out_names[srcs[0]] = f"{out_names[srcs[0]]}+{names[i]}"
                index[i] = srcs[0]
                continue
        out_ops.append(op)
        out_names.append(names[i])
        out_inputs.append(srcs)
        index[i] = len(out_ops) - 1
    return out_ops, out_names, out_inputs
