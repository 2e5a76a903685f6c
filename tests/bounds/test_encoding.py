"""The LP/MILP encoding table (:mod:`certify.bounds.encoding`) and the solver interface.

Every row of :data:`ENCODINGS` agrees with the forward pass at sampled points: an affine op's
chain is its map (within its stated error bound), the points ``(z, relu(z))`` satisfy the
activation's relaxation and, with the right binaries, its exact encoding, and a whole network's
forward pass is a feasible point of its LP with the objective equal to ``spec @ f(x)``. The LP of
a linear network is its exact minimum. Only :mod:`certify.bounds.solver` imports cvxpy.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from bound_helpers import make_box, make_cnn, make_mlp, random_spec
from torch import nn

import certify
from certify.bounds import compute_bounds, get_method, to_network
from certify.bounds.encoding import (
    ENCODINGS,
    Rows,
    affine_chain,
    encode,
    relu_big_m,
    relu_box,
    relu_triangle,
    widen,
)
from certify.bounds.layers import RULES, ReluOp
from certify.bounds.network import fold_spec
from certify.errors import UnsupportedLayerError

F64 = torch.float64


def _affine_ops(seed: int) -> list:  # type: ignore[type-arg]
    """The affine ops of a CNN with every supported layer and of an MLP, with their inputs."""
    (cnn, shape), mlp = make_cnn(seed, 1), make_mlp(seed, [5, 4])
    ops = []
    for model, in_shape in ((cnn, shape), (mlp, (1, 4, 4))):
        net = to_network(model.double(), in_shape).detach()
        ops += [op for op in net.layers if ENCODINGS[type(op)].kind == "affine"]
    return ops


def test_every_op_type_has_one_encoding_row() -> None:
    assert set(ENCODINGS) == set(RULES)
    kinds = {t.__name__: row.kind for t, row in ENCODINGS.items()}
    assert kinds["ReluOp"] == "activation" and kinds["SpecRows"] == "objective"
    for row in ENCODINGS.values():
        assert (row.activation is not None) == (row.kind == "activation")


def test_an_op_without_a_row_is_a_clear_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    net = to_network(make_mlp(0, [3]).double(), (1, 4, 4))
    folded = fold_spec(net, random_spec(0, 1, 2, 3, F64))
    monkeypatch.delitem(ENCODINGS, ReluOp)
    with pytest.raises(UnsupportedLayerError, match="ReluOp"):
        encode(folded)


@pytest.mark.parametrize("seed", [0, 1])
def test_affine_rows_are_their_forward_pass_within_the_error_bound(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for op in _affine_ops(seed):
        chain = affine_chain([op], op.in_shape)
        xs = torch.rand(16, *op.in_shape, generator=gen, dtype=F64) * 2 - 1
        want = RULES[type(op)].forward(op, xs).flatten(1).numpy()
        flat = xs.flatten(1).numpy()
        got = flat @ chain.matrix.T + chain.offset
        bound = np.abs(flat) @ chain.matrix_err.T + chain.offset_err  # type: ignore[union-attr]
        assert np.all(np.abs(got - want) <= bound + 1e-12), type(op).__name__
        assert got.shape[1] == math.prod(op.out_shape)


def _relu_bounds(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    return np.minimum(a, b), np.maximum(a, b)  # stable and unstable neurons both


@pytest.mark.parametrize("rigorous", [False, True])
def test_relu_relaxation_contains_the_graph(rigorous: bool) -> None:
    l, u = _relu_bounds(0)
    n = l.shape[0]
    rows = Rows(2 * n, [], [], [], [])
    relu_triangle(rows, l, u, 0, n, rigorous)
    a_eq, b_eq, a_ub, b_ub = rows.stacked()
    box_lo, box_hi = relu_box(l, u)
    rng = np.random.default_rng(1)
    for t in np.linspace(0, 1, 11):
        z = l + t * (u - l) if t in (0, 1) else l + rng.uniform(size=n) * (u - l)
        v = np.concatenate([z, np.maximum(z, 0)])
        assert np.all(np.abs(a_eq @ v - b_eq) <= 1e-12)
        assert np.all(a_ub @ v <= b_ub + 1e-12)
        assert np.all((box_lo - 1e-12 <= v[n:]) & (v[n:] <= box_hi + 1e-12))


def test_relu_relaxation_is_the_triangle() -> None:
    """The upper line passes through ``(l, 0)`` and ``(u, u)``: nothing looser."""
    l, u = _relu_bounds(2)
    unstable = (l < 0) & (u > 0)
    n = l.shape[0]
    rows = Rows(2 * n, [], [], [], [])
    relu_triangle(rows, l, u, 0, n, False)
    _, _, a_ub, b_ub = rows.stacked()
    for z, h in ((l, np.zeros(n)), (u, u)):
        slack = b_ub - a_ub @ np.concatenate([z, h])
        assert np.allclose(slack[-int(unstable.sum()):], 0, atol=1e-12)


def test_relu_exact_encoding_is_the_graph() -> None:
    """With ``a = [z > 0]`` the big-M rows hold at every ``(z, relu(z))``, and a point off the
    graph is cut off for both values of the binary."""
    l, u = _relu_bounds(3)
    n = l.shape[0]
    unstable = (l < 0) & (u > 0)
    part = relu_big_m(l, u, 0, n)
    assert part.n_bin == int(unstable.sum()) and part.n_rows == 2 * part.n_bin
    cont = np.zeros((part.n_rows, 2 * n))
    np.add.at(cont, (part.cont_rows, part.cont_cols), part.cont_vals)
    bins = np.zeros((part.n_rows, part.n_bin))
    np.add.at(bins, (part.bin_rows, part.bin_cols), part.bin_vals)
    rhs = np.array(part.rhs)
    rng = np.random.default_rng(4)
    for _ in range(20):
        z = l + rng.uniform(size=n) * (u - l)
        v = np.concatenate([z, np.maximum(z, 0)])
        a = (z[unstable] > 0).astype(float)
        assert np.all(cont @ v + bins @ a <= rhs + 1e-12)
        # h = relu(z) + 0.1 (above the graph) violates a row whatever the binaries are
        off = np.concatenate([z, np.maximum(z, 0) + 0.1])
        for a_any in (np.zeros(part.n_bin), np.ones(part.n_bin)):
            bad = cont @ off + bins @ a_any > rhs + 1e-12
            pairs = bad.reshape(-1, 2).any(1)
            assert pairs.all()


def _forward_point(net, x: torch.Tensor) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``[x, z_1, h_1, ..., z_L, h_L]`` of one sample from the forward pass."""
    parts = [x.flatten().numpy()]
    h = x
    for op in net.layers:
        if isinstance(op, ReluOp):
            parts.append(h.flatten().numpy())
        h = RULES[type(op)].forward(op, h)
        if isinstance(op, ReluOp):
            parts.append(h.flatten().numpy())
    return np.concatenate(parts)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("rigorous", [False, True])
def test_the_forward_pass_is_a_feasible_point_with_the_spec_as_objective(kind: str,
                                                                        rigorous: bool) -> None:
    if kind == "mlp":
        model, in_shape, k = make_mlp(5, [6, 5]).double(), (1, 4, 4), 3
    else:
        (model, in_shape), k = make_cnn(5, 0), 4
        model = model.double()
    net = to_network(model, in_shape).detach()
    x_lo, x_hi, _ = make_box(5, 2, in_shape, 0.2, F64)
    spec = random_spec(5, 2, 3, k, F64)
    pre = [widen(b, F64) for b in get_method("crown").intermediate(net, x_lo, x_hi)]
    encoding = encode(fold_spec(net, spec))
    gen = torch.Generator().manual_seed(6)
    for i in range(2):
        lo64, hi64 = x_lo[i].flatten().numpy(), x_hi[i].flatten().numpy()
        pre_i = [(lo[i], hi[i]) for lo, hi in pre]
        slack = encoding.slack(lo64, hi64, pre_i, None) if rigorous else None
        lp = encoding.lp(i, lo64, hi64, pre_i, slack)
        mip = encoding.milp(lp, pre_i)
        for _ in range(8):
            x = x_lo[i:i + 1] + torch.rand(x_lo[i:i + 1].shape, generator=gen,
                                           dtype=F64) * (x_hi[i:i + 1] - x_lo[i:i + 1])
            v = _forward_point(net, x)
            assert v.shape == lp.lo.shape
            assert np.all((lp.lo - 1e-12 <= v) & (v <= lp.hi + 1e-12))
            assert np.all(np.abs(lp.a_eq @ v - lp.b_eq) <= 1e-9)
            assert np.all(lp.a_ub @ v <= lp.b_ub + 1e-9)
            want = (spec[i] @ model(x).flatten()).detach().numpy()
            np.testing.assert_allclose(lp.objectives @ v + lp.constants, want, atol=1e-9)
            if rigorous:
                assert lp.objective_slack is not None and np.all(lp.objective_slack >= 0)
            # the MILP with the binaries of the forward pass
            binaries = np.concatenate([z[(l < 0) & (u > 0)] > 0 for (l, u), z in zip(
                pre_i, _pre_activations(v, lp), strict=True)]).astype(float)
            assert binaries.shape == (mip.n_bin,)
            assert np.all(mip.a_ub @ v + mip.a_ub_bin @ binaries <= mip.b_ub + 1e-9)


def _pre_activations(v: np.ndarray, lp) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    offsets = lp.offsets
    return [v[offsets[2 * k + 1]:offsets[2 * k + 2]] for k in range((len(offsets) - 2) // 2)]


@pytest.mark.solver
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_lp_of_a_linear_network_is_its_exact_minimum(dtype: torch.dtype) -> None:
    """Linear -> Linear (no ReLU): the LP's bounds are the box's exact range of each row."""
    pytest.importorskip("cvxpy")
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Linear(5, 3)).to(dtype)
    x_lo, x_hi, _ = make_box(0, 3, (1, 2, 3), 0.3, dtype)
    spec = torch.randn(3, 2, 3, generator=gen, dtype=F64).to(dtype)
    w = spec.double() @ (model[2].weight.double() @ model[1].weight.double())  # (N, S, 6)
    b = spec.double() @ (model[2].weight.double() @ model[1].bias.double()
                         + model[2].bias.double())
    lo, hi = x_lo.double().flatten(1), x_hi.double().flatten(1)
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    mid = torch.einsum("nsd,nd->ns", w, center) + b
    rad = torch.einsum("nsd,nd->ns", w.abs(), radius)
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    for method in ("lp", "milp"):
        bounds = compute_bounds(model, x_lo, x_hi, method, spec)
        assert (bounds.lower.double() <= mid - rad + 1e-12).all()  # sound
        torch.testing.assert_close(bounds.lower.double(), mid - rad, atol=atol, rtol=0)
        if method == "lp":
            assert (bounds.upper.double() >= mid + rad - 1e-12).all()
            torch.testing.assert_close(bounds.upper.double(), mid + rad, atol=atol, rtol=0)


@pytest.mark.solver
def test_the_dual_bound_is_sound_for_any_duals() -> None:
    """Weak duality: random dual values give a lower bound of the LP's minimum; zero duals the
    interval bound."""
    pytest.importorskip("cvxpy")
    from certify.bounds import solver

    model = make_mlp(7, [5, 4]).double()
    net = to_network(model, (1, 4, 4)).detach()
    x_lo, x_hi, _ = make_box(7, 1, (1, 4, 4), 0.2, F64)
    spec = random_spec(7, 1, 2, 3, F64)
    pre = [widen(b, F64) for b in get_method("crown").intermediate(net, x_lo, x_hi)]
    lp = encode(fold_spec(net, spec)).lp(0, x_lo[0].flatten().numpy(),
                                         x_hi[0].flatten().numpy(), [(l[0], u[0]) for l, u in pre])
    lower, _ = solver.lp_rows(lp, solver.DEFAULT_LP_SOLVER)
    rng = np.random.default_rng(0)
    for r in range(lp.objectives.shape[0]):
        c, const = lp.objectives[r], float(lp.constants[r])
        zero = solver.dual_bound(lp, c, const, None, None)
        assert zero == pytest.approx(const + float(np.minimum(c * lp.lo, c * lp.hi).sum()),
                                     abs=1e-9)
        for _ in range(5):
            y = rng.normal(size=lp.a_eq.shape[0])
            lam = rng.normal(size=lp.a_ub.shape[0])
            assert solver.dual_bound(lp, c, const, y, lam) <= lower[r] + 1e-9
        assert zero <= lower[r] + 1e-12


def test_only_the_solver_module_imports_cvxpy() -> None:
    root = Path(certify.__file__).parent
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "cvxpy" or n.startswith("cvxpy.") for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"bounds/solver.py"}
