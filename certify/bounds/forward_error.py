"""How far the model's own floating-point forward pass can be from the exact network.

A proof covers the network in exact arithmetic (every bound of the engine is rigorous, see
:mod:`certify.bounds.rounding`). The model as it runs -- in its dtype, on this machine --
computes every layer with rounding. Its computation is the exact network with a bounded
perturbation added to every pre-activation and to the output:

    z~_k = chain_k(act_(k-1)(z~_(k-1))) + e_k,   |e_k| <= E_k,

where ``chain_k`` is the exact affine chain of the model's own (unfolded) layers between two
activations and ``act`` the *exact* activation of the computed pre-activation ``z~``. The
engine bounds this perturbed network -- which contains the exact one (``e = 0``) -- when a proof
must also hold for the model as it runs: intermediate bounds are widened by ``E_k`` and every
backward pass pays ``|nu_k| E_k`` at each activation
(:class:`~certify.bounds.propagation.Propagator`), so the error is propagated with the
cancellations of the relaxation's rows instead of worst-case ``|W|`` products.

``e_k`` holds both the rounding of the chain and that of the activation before it: the model
computes ``act(z~)`` itself with an error (none for ReLU and MaxPool, a rounded product for
LeakyReLU, sigmoid's and tanh's kernels; the row's ``rounding`` of
:data:`~certify.bounds.relaxations.ACTIVATIONS`), which enters the chain as an error of its
input. So the chains of :func:`model_chains` after the first start with their activation (and
take its output box, in its output's shape).

:func:`chain_error` bounds ``E_k`` for one chain over a box of inputs, op by op:

    F_out = |L| F + gamma_(k+1) (|L| (M + F) + |b|) + L_err (M + F) + b_err + (k+1) tiny

where ``M`` bounds the magnitude of the exact op input (rigorous intervals), ``F`` the error
of the computed input (at the chain's start, the activation's rounding over its output box;
0 for the first chain), ``k`` the op's terms per output, ``L_err`` and ``b_err`` how far the
stored tensors are from the exact layer (the model computes ``1/std`` and BatchNorm's
``rsqrt`` as well), in the *model's* unit roundoff. Flatten, reshapes and the skipped modules
(Dropout, Identity) are exact. Computed in float64 and rounded up.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.layers import (
    RULES,
    AddOp,
    ConcatOp,
    Op,
    abs_op,
    cast_op,
    err_op,
    interval_affine,
    merge_interval,
)
from certify.bounds.network import Network
from certify.bounds.relaxations import activation_rule, is_activation

__all__ = ["chain_error", "graph_error", "model_chains", "model_dtype", "output_error"]


def model_dtype(net: Network) -> torch.dtype | None:
    """The dtype the model computes in: that of its first weight (None: no weights)."""
    for op in net.model_layers or net.layers:
        for value in vars(op).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                return value.dtype
    return None


def model_chains(net: Network) -> list[list[Op]]:
    """The model's chains: before the first activation, between activations, after the last;
    every chain but the first starts with the activation whose output it takes (a chain
    network only: a DAG's are bounded by :func:`graph_error`)."""
    if not net.is_chain:
        raise TypeError("model_chains takes a chain network; use graph_error for a DAG")
    chains: list[list[Op]] = [[]]
    for op in net.model_layers or net.layers:
        if is_activation(op):
            chains.append([op])
        elif type(op).__name__ != "SpecLinearOp":
            chains[-1].append(op)
    return chains


def chain_error(ops: list[Op], lo: Tensor, hi: Tensor, dtype: torch.dtype) -> Tensor:
    """Bound on ``|computed chain(a) - exact chain(a)|`` for every input `a` in `[lo, hi]`.

    Args:
        ops: One chain of :func:`model_chains` (after its first, it starts with an activation:
            its rounding is the error of the chain's input).
        lo, hi: Rigorous bounds of the chain's input `(N, *shape)` (the exact output of its
            activation), any float dtype.
        dtype: The dtype the model computes in.

    Returns:
        `(N, *out_shape)` float64 (``inf`` where it overflows).
    """
    f64 = torch.float64
    lo, hi = lo.detach().to(f64), hi.detach().to(f64)
    err = torch.zeros_like(lo)
    for op in ops:
        if is_activation(op):  # the head: the model's rounding of the activation
            bound = activation_rule(op).rounding
            if bound is not None:
                err = err + bound(lo, hi, dtype)
            continue
        lo, hi, err = _op_error(op, lo, hi, err, dtype)
    return err


def _op_error(op: Op, lo: Tensor, hi: Tensor, err: Tensor, dtype: torch.dtype
              ) -> tuple[Tensor, Tensor, Tensor]:
    """One affine op of a chain: the exact output's bounds and the computed output's error
    (the formula of the module docstring), all float64."""
    op = cast_op(op, torch.float64, lo.device)
    op = replace(op, **{k: v.detach() for k, v in vars(op).items()  # type: ignore[arg-type]
                        if isinstance(v, Tensor)})
    rules = RULES[type(op)]
    k = rules.terms(op)[0]
    if k == 0:  # a reshape
        return rules.forward(op, lo), rules.forward(op, hi), rules.forward(op, err)
    reach = torch.maximum(lo.abs(), hi.abs()) + err
    g = rounding.gamma(k + 1, dtype)
    absolute = abs_op(op)
    new = rules.linear(absolute, err) + g * rules.forward(absolute, reach)  # type: ignore[misc]
    exact = err_op(op)
    if exact is not None:
        new = new + rules.forward(exact, reach)
    err = rounding.up(new * (1 + rounding.gamma(k + 4, torch.float64))
                      + (k + 1) * rounding.tiny(dtype))
    lo, hi = interval_affine(op, lo, hi, rigorous=True)
    return lo, hi, err


def graph_error(net: Network, upto: int, boxes: dict[int, tuple[Tensor, Tensor]],
                x_lo: Tensor, x_hi: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`chain_error` for a network that is a DAG (``net.model_inputs``).

    The model's computed value of every node is within ``F`` of the exact function of the
    computed outputs of the activations below it (the perturbed network of the module
    docstring): ``F = 0`` at the input, an activation's own rounding at its output, the
    affine ops' formula, and for a sum ``F = F_1 + F_2 + gamma_1 (R_1 + R_2)`` with ``R`` the
    computed inputs' magnitudes (``|fl(a + b) - (a + b)| <= u |a + b|``); a concatenation
    moves values (``F`` concatenated).

    Args:
        upto: The ordinal of the activation whose input's error is wanted (the number of
            activations: the output's).
        boxes: For the ordinal of every activation below, rigorous bounds of its exact output
            (over the perturbed pre-activation bounds).
        x_lo, x_hi: The input box.
        dtype: The dtype the model computes in.

    Returns:
        `(N, *shape)` float64, the error bound of the node.
    """
    f64 = torch.float64
    layers, inputs = net.model_layers, net.model_inputs
    positions = [i for i, op in enumerate(layers) if is_activation(op)]
    target = (positions[upto] if upto < len(positions) else len(layers))
    want = inputs[target][0] if target < len(layers) else len(layers) - 1
    vals: dict[int, tuple[Tensor, Tensor, Tensor]] = {
        -1: (x_lo.detach().to(f64), x_hi.detach().to(f64),
             torch.zeros_like(x_lo, dtype=f64))}
    for i in range(want + 1):
        op = layers[i]
        args = [vals[k] for k in inputs[i]]
        if is_activation(op):
            lo, hi = (t.detach().to(f64) for t in boxes[positions.index(i)])
            err = torch.zeros_like(lo)
            bound = activation_rule(op).rounding
            if bound is not None:
                err = bound(lo, hi, dtype)
            vals[i] = (lo, hi, err)
        elif isinstance(op, AddOp):
            (lo1, hi1, e1), (lo2, hi2, e2) = args
            reach = (torch.maximum(lo1.abs(), hi1.abs()) + e1
                     + torch.maximum(lo2.abs(), hi2.abs()) + e2)
            lo, hi = merge_interval(op, [lo1, lo2], [hi1, hi2], rigorous=True)
            err = rounding.up((e1 + e2 + rounding.gamma(1, dtype) * reach)
                              * (1 + rounding.gamma(4, f64)) + rounding.tiny(dtype))
            vals[i] = (lo, hi, err)
        elif isinstance(op, ConcatOp):
            lo, hi = merge_interval(op, [a[0] for a in args], [a[1] for a in args])
            vals[i] = (lo, hi, torch.cat([a[2] for a in args], op.dim + 1))
        else:
            vals[i] = _op_error(op, *args[0], dtype)
    return vals[want][2]


def output_error(net: Network, pre: tuple[Any, ...], x_lo: Tensor, x_hi: Tensor,
                 dtype: torch.dtype) -> Tensor:
    """``E`` `(N, *output_shape)` float64: the model's rounding of its output after the last
    activation (every earlier one is accounted by the methods), given the (perturbed)
    pre-activation bounds `pre` (one ``Bounds`` per activation)."""
    if net.is_chain:
        if pre:  # the last chain takes the last activation's output: its image of its bounds
            last = activation_rule(net.layers[net.relu_positions[-1]])
            in_lo, in_hi = last.interval(pre[-1].lower.detach(), pre[-1].upper.detach())
        else:
            in_lo, in_hi = x_lo, x_hi
        return chain_error(model_chains(net)[-1], in_lo, in_hi, dtype)
    boxes = {k: activation_rule(net.layers[p]).interval(b.lower.detach(), b.upper.detach())
             for k, (p, b) in enumerate(zip(net.relu_positions, pre, strict=True))}
    return graph_error(net, len(pre), boxes, x_lo, x_hi, dtype)
