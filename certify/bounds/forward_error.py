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

import torch
from torch import Tensor

from certify.bounds import rounding
from certify.bounds.layers import RULES, Op, abs_op, cast_op, err_op, interval_affine
from certify.bounds.network import Network
from certify.bounds.relaxations import activation_rule, is_activation

__all__ = ["chain_error", "model_chains", "model_dtype"]


def model_dtype(net: Network) -> torch.dtype | None:
    """The dtype the model computes in: that of its first weight (None: no weights)."""
    for op in net.model_layers or net.layers:
        for value in vars(op).values():
            if isinstance(value, Tensor) and value.is_floating_point():
                return value.dtype
    return None


def model_chains(net: Network) -> list[list[Op]]:
    """The model's chains: before the first activation, between activations, after the last;
    every chain but the first starts with the activation whose output it takes."""
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
        op = cast_op(op, f64, lo.device)
        op = replace(op, **{k: v.detach() for k, v in vars(op).items()  # type: ignore[arg-type]
                            if isinstance(v, Tensor)})
        rules = RULES[type(op)]
        k = rules.terms(op)[0]
        if k == 0:  # a reshape
            err = rules.forward(op, err)
            lo, hi = rules.forward(op, lo), rules.forward(op, hi)
            continue
        reach = torch.maximum(lo.abs(), hi.abs()) + err
        g = rounding.gamma(k + 1, dtype)
        absolute = abs_op(op)
        new = rules.linear(absolute, err) + g * rules.forward(absolute, reach)  # type: ignore[misc]
        exact = err_op(op)
        if exact is not None:
            new = new + rules.forward(exact, reach)
        err = rounding.up(new * (1 + rounding.gamma(k + 4, f64)) + (k + 1) * rounding.tiny(dtype))
        lo, hi = interval_affine(op, lo, hi, rigorous=True)
    return err
