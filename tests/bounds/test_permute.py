"""The permutation op (certify's ``Reshape`` and ``Permute`` layers, e.g. from an ONNX
Transpose): sound for every method, and exact — a permutation of coordinates changes no bound.

Every relaxation is elementwise, so a network with permutations and the same network with them
folded into its neighbours (the input box permuted, the next Linear's columns permuted) have
the same bound under every method: a theorem, tested with generated networks and boxes.
"""

from __future__ import annotations

import math

import pytest
import torch
from bound_helpers import all_points, make_box, random_spec, spec_values
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import compute_bounds, list_methods
from certify.bounds.layers import RULES, PermuteOp, abs_op, err_op, interval_affine
from certify.bounds.network import to_network
from certify.errors import SpecError
from certify.nets import Normalize
from certify.nets.layers import Permute, Reshape

SOUND_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# bab (complete, ReLU splits only) has its own tests: tests/bounds/test_bab.py
FAST = list_methods(uses_solver=False, external=False, is_complete=False)
DTYPES = [torch.float32, torch.float64]
IN_SHAPE = (3, 3, 2)  # H, W, C: the network starts with an NHWC -> NCHW permutation
PERMS = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def make_net(seed: int, mid: tuple[int, int, int], split: int) -> tuple[nn.Sequential,
                                                                         nn.Sequential]:
    """A network with permutations and reshapes, and the same function without them.

    ``Permute(2,0,1)``, Normalize, Conv, BatchNorm, ReLU, ``Permute(mid)``, ``Reshape(split,
    -1)``, Flatten, Linear, ReLU, ``Reshape(2, 2)``, ``Permute(1, 0)``, Flatten, Linear; and
    its folded twin (which takes the NCHW box): the permutations folded into the Linears.
    """
    gen = torch.Generator().manual_seed(seed)
    c = IN_SHAPE[2]
    conv = nn.Conv2d(c, 2, 3, padding=1)
    bn = nn.BatchNorm2d(2)
    fc1, fc2 = nn.Linear(18, 4), nn.Linear(4, 3)
    for m in (conv, fc1, fc2):
        m.weight.data = torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5
        m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.3
    bn.running_mean = torch.randn(2, generator=gen) * 0.3
    bn.running_var = torch.rand(2, generator=gen) + 0.5
    bn.weight.data = torch.randn(2, generator=gen)
    bn.bias.data = torch.randn(2, generator=gen) * 0.3
    mean = (torch.rand(c, generator=gen) * 0.6 + 0.2).tolist()
    std = (torch.rand(c, generator=gen) * 0.5 + 0.2).tolist()
    conv_out = (2, IN_SHAPE[0], IN_SHAPE[1])
    permuted = nn.Sequential(
        Permute((2, 0, 1)), Normalize(mean, std), conv, bn, nn.ReLU(), Permute(mid),
        Reshape((split, 18 // split)), nn.Flatten(), fc1, nn.ReLU(), Reshape((2, 2)),
        Permute((1, 0)), nn.Flatten(), fc2).eval()
    # fold: feature i of fc1's input is conv feature order[i]; likewise for fc2
    order = torch.arange(18).reshape(conv_out).permute(*mid).reshape(-1)
    fc1_folded = nn.Linear(18, 4)
    fc1_folded.weight.data = torch.zeros(4, 18)
    fc1_folded.weight.data[:, order] = fc1.weight.data
    fc1_folded.bias.data = fc1.bias.data.clone()
    order2 = torch.arange(4).reshape(2, 2).permute(1, 0).reshape(-1)
    fc2_folded = nn.Linear(4, 3)
    fc2_folded.weight.data = torch.zeros(3, 4)
    fc2_folded.weight.data[:, order2] = fc2.weight.data
    fc2_folded.bias.data = fc2.bias.data.clone()
    folded = nn.Sequential(Normalize(mean, std), conv, bn, nn.ReLU(), nn.Flatten(), fc1_folded,
                           nn.ReLU(), fc2_folded).eval()
    return permuted, folded


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FAST)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20), mid=st.sampled_from(PERMS), split=st.sampled_from([1, 2, 3]),
       eps_max=st.sampled_from([0.02, 0.2]))
def test_sound_at_sampled_corner_and_pgd_points(method: str, dtype: torch.dtype, seed: int,
                                                mid: tuple[int, int, int], split: int,
                                                eps_max: float) -> None:
    model, _ = make_net(seed, mid, split)
    model = model.to(dtype)
    x_lo, x_hi, x = make_box(seed, 3, IN_SHAPE, eps_max, dtype)
    spec = random_spec(seed, 3, 2, 3, dtype)
    bounds = compute_bounds(model, x_lo, x_hi, method, spec)
    points = all_points(model, x_lo, x_hi, spec, x)
    with torch.no_grad():
        values = spec_values(model, points, spec)
    atol = SOUND_ATOL[dtype] * (1 + values.abs().max().item())
    assert (values >= bounds.lower - atol).all(), f"{method}: lower bound above a reachable value"
    assert (values <= bounds.upper + atol).all(), f"{method}: upper bound below a reachable value"


@pytest.mark.parametrize("method", FAST)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**20), mid=st.sampled_from(PERMS), split=st.sampled_from([1, 2, 3]),
       eps_max=st.sampled_from([0.02, 0.2]))
def test_permutations_change_no_bound(method: str, seed: int, mid: tuple[int, int, int],
                                      split: int, eps_max: float) -> None:
    """The same function without the permutations has the same bounds (float64). An optimizing
    method runs from its initial slopes only (``steps=0``): the permuted network's different
    order of float operations may steer gradient ascent to a slightly different best iterate
    (seen: 5e-5), which says nothing about the permutation."""
    permuted, folded = make_net(seed, mid, split)
    permuted, folded = permuted.double(), folded.double()
    x_lo, x_hi, x = make_box(seed, 3, IN_SHAPE, eps_max, torch.float64)
    torch.testing.assert_close(permuted(x), folded(_nchw(x)), rtol=1e-12, atol=1e-12)
    spec = random_spec(seed, 3, 2, 3, torch.float64)
    from certify.bounds.base import method_class

    options = {"steps": 0} if "steps" in method_class(method).__dataclass_fields__ else {}
    ours = compute_bounds(permuted, x_lo, x_hi, method, spec, **options)
    theirs = compute_bounds(folded, _nchw(x_lo), _nchw(x_hi), method, spec, **options)
    torch.testing.assert_close(ours.lower, theirs.lower, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ours.upper, theirs.upper, rtol=1e-7, atol=1e-9)


@pytest.mark.solver
@pytest.mark.parametrize("method", ["lp", "milp"])
def test_solver_methods_sound_and_unchanged(method: str) -> None:
    """LP and MILP (22 ReLUs) encode the permutation exactly: sound, and equal to the folded
    network's bound."""
    pytest.importorskip("cvxpy")
    permuted, folded = make_net(5, (1, 2, 0), 2)
    permuted, folded = permuted.double(), folded.double()
    x_lo, x_hi, x = make_box(5, 2, IN_SHAPE, 0.1, torch.float64)
    spec = random_spec(5, 2, 2, 3, torch.float64)
    ours = compute_bounds(permuted, x_lo, x_hi, method, spec)
    theirs = compute_bounds(folded, _nchw(x_lo), _nchw(x_hi), method, spec)
    torch.testing.assert_close(ours.lower, theirs.lower, rtol=1e-5, atol=1e-6)
    points = all_points(permuted, x_lo, x_hi, spec, x)
    with torch.no_grad():
        values = spec_values(permuted, points, spec)
    assert (values >= ours.lower - 1e-8).all() and (values <= ours.upper + 1e-8).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dims", "in_shape"), [((2, 0, 1), (3, 4, 2)), ((1, 0), (5, 3)),
                                                ((0, 1, 2), (2, 3, 2))])
def test_rules_move_values_only(dims: tuple[int, ...], in_shape: tuple[int, ...],
                                dtype: torch.dtype) -> None:
    """Forward is a 0/1 matrix with one 1 per row and column; backward is exactly its
    transpose; |op| is the op; no rounding terms; rigorous intervals are the forward images."""
    out_shape = tuple(in_shape[d] for d in dims)
    op = PermuteOp(dims, in_shape, out_shape)
    rules = RULES[PermuteOp]
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=dtype).reshape(n, *in_shape)
    matrix = rules.forward(op, eye).reshape(n, -1).T  # (out, in)
    assert set(matrix.unique().tolist()) <= {0.0, 1.0}
    assert (matrix.sum(0) == 1).all() and (matrix.sum(1) == 1).all()
    x = torch.randn(4, *in_shape, dtype=dtype)
    assert torch.equal(rules.forward(op, x), x.permute(0, *(d + 1 for d in dims)))
    rows = torch.randn(5, *out_shape, dtype=dtype)
    back, const = rules.backward(op, rows)  # type: ignore[misc]
    assert const is None and back.shape == (5, *in_shape)
    assert torch.equal(back.reshape(5, -1), rows.reshape(5, -1) @ matrix)
    assert rules.terms(op) == (0, 0, 0)
    assert abs_op(op) is op and err_op(op) is None
    lo, hi = x - 0.5, x + 0.25
    ilo, ihi = interval_affine(op, lo, hi, rigorous=True)
    assert torch.equal(ilo, rules.forward(op, lo)) and torch.equal(ihi, rules.forward(op, hi))


def test_layers_that_do_not_fit_their_input_are_named() -> None:
    with pytest.raises(SpecError, match=r"'1' \(Reshape\).*\(4, 5\)"):
        to_network(nn.Sequential(nn.Flatten(), Reshape((4, 5))), (3, 3, 2))
    with pytest.raises(SpecError, match=r"'0' \(Permute\).*2 dimensions"):
        to_network(nn.Sequential(Permute((1, 0)), nn.Flatten()), (3, 3, 2))
    with pytest.raises(ValueError, match="permutation"):
        Permute((0, 0, 1))
    with pytest.raises(ValueError, match="positive"):
        Reshape((3, 0))
