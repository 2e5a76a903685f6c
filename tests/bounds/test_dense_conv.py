"""The dense transpose of small convolutions (``certify.bounds.layers.dense_transpose``): the same
map as ``conv_transpose2d``, built from the weights without rounding, used only where it is
cheaper, and giving the engine the same bounds as the transposed-convolution path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.bounds import compute_bounds, get_method, layers
from certify.bounds.layers import (
    ConvOp,
    backward_conv,
    backward_window_conv,
    dense_transpose,
)

F64 = torch.float64


def _op(co: int, ci: int, k: int, stride: int, padding: int, size: int,
        weight: torch.Tensor) -> ConvOp:
    out = (size + 2 * padding - k) // stride + 1
    return ConvOp(weight, None, (stride, stride), (padding, padding), (ci, size, size),
                  (co, out, out))


convs = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3),
                  st.integers(0, 2), st.integers(4, 9), st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(convs)
def test_dense_transpose_is_conv_transpose_exactly(case) -> None:  # type: ignore[no-untyped-def]
    """Small integer weights and rows: every sum is exact both ways, so the two must be equal
    bit for bit, on the whole map (padding dropped) and on every output window."""
    co, ci, k, stride, padding, size, seed = case
    if k > size + 2 * padding or padding >= k:
        return
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-8, 9, (co, ci, k, k), generator=gen).to(F64)
    op = _op(co, ci, k, stride, padding, size, weight)
    h, w = op.out_shape[1:]
    dense = dense_transpose(op, h, w, padded=True)
    assert dense is not None  # tiny maps: always the dense path
    a = torch.randint(-8, 9, (5, co, h, w), generator=gen).to(F64)
    want = F.conv_transpose2d(a, weight, None, op.stride, op.padding, op.output_padding)
    got, _ = backward_conv(op, a)
    assert torch.equal(got, want)
    for wh in range(1, h + 1):
        for ww in range(1, w + 1):
            rows = torch.randint(-8, 9, (3, co, wh, ww), generator=gen).to(F64)
            top, left = h - wh, w - ww  # the bottom-right window: padding on some sides
            got_w = backward_window_conv(op, rows, top, left)
            full = torch.zeros(3, co, h, w, dtype=F64)
            full[:, :, top:, left:] = rows
            want_full = F.conv_transpose2d(full, weight, None, op.stride, op.padding,
                                           op.output_padding)
            out, _, r0, c0 = got_w
            assert torch.equal(want_full[:, :, r0:r0 + out.shape[2], c0:c0 + out.shape[3]],
                               out)
            # nothing of the rows lands outside the window it returns
            rest = want_full.clone()
            rest[:, :, r0:r0 + out.shape[2], c0:c0 + out.shape[3]] = 0
            assert not rest.any()


def test_dense_entries_are_the_weights_unrounded() -> None:
    """Each entry is a weight or zero (no arithmetic touches them), and each weight appears
    once per output position whose window holds its tap."""
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 4, 4)  # float32, not representable with fewer bits
    op = _op(5, 3, 4, 2, 1, 8, weight)
    dense = dense_transpose(op, 4, 4, padded=True)
    assert dense is not None and dense.dtype == torch.float32
    d = dense.view(5, 4, 4, 3, 8, 8)
    for c_o in range(5):
        for i in range(4):
            for j in range(4):
                for ki in range(4):
                    for kj in range(4):
                        y, x = 2 * i - 1 + ki, 2 * j - 1 + kj
                        if 0 <= y < 8 and 0 <= x < 8:
                            assert torch.equal(d[c_o, i, j, :, y, x], weight[c_o, :, ki, kj])
    taps_inside = sum(1 for i in range(4) for ki in range(4) if 0 <= 2 * i - 1 + ki < 8) ** 2
    assert int((dense != 0).sum()) == 5 * 3 * taps_inside


def test_dense_is_used_only_where_it_is_cheaper(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    # SVHN-sized maps: the dense matrix would hold 10^8 entries
    big = _op(32, 3, 3, 1, 1, 32, torch.randn(32, 3, 3, 3))
    assert dense_transpose(big, 32, 32, padded=True) is None
    # a 1x1 output window of a 4x4 stride-2 conv: the matrix is the kernel, as cheap
    mid = _op(128, 128, 4, 2, 1, 16, torch.randn(128, 128, 4, 4))
    assert dense_transpose(mid, 1, 1, padded=False) is not None
    # a 6x6 window of it: 12x the multiply-adds of the transposed convolution
    assert dense_transpose(mid, 6, 6, padded=False) is None
    # the budget is what decides
    monkeypatch.setattr(layers, "DENSE_MAX_ENTRIES", 0)
    assert dense_transpose(mid, 1, 1, padded=False) is None


def _cnn() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10)).eval()


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_engine_bounds_match_the_transposed_convolution_path(method, monkeypatch
                                                             ) -> None:  # type: ignore[no-untyped-def]
    """A digits-sized CNN (every transpose dense) against the same bound with the dense path
    off: equal up to the summation order's rounding, and both hold at sampled points."""
    model = _cnn()
    torch.manual_seed(4)
    x = torch.rand(6, 1, 8, 8)
    x_lo, x_hi = (x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1)
    dense = compute_bounds(model, x_lo, x_hi, method)
    monkeypatch.setattr(layers, "DENSE_MAX_ENTRIES", 0)
    monkeypatch.setattr(layers, "_DENSE", type(layers._DENSE)())
    plain = compute_bounds(model, x_lo, x_hi, method)
    scale = 1e-4 * (1 + plain.lower.abs())
    assert ((dense.lower - plain.lower).abs() <= scale).all()
    assert ((dense.upper - plain.upper).abs() <= 1e-4 * (1 + plain.upper.abs())).all()
    with torch.no_grad():
        pts = x_lo + (x_hi - x_lo) * torch.rand(200, *x.shape)
        out = model(pts.flatten(0, 1)).view(200, 6, 10)
    assert (out >= dense.lower).all() and (out <= dense.upper).all()


# --- the fold forms of the transpose (certify.bounds.layers._fold_backward) ---------------------


def _force_fold(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every transpose through `_fold_backward`'s forms: no dense matrices, both forms on."""
    monkeypatch.setattr(layers, "DENSE_MAX_ENTRIES", 0)
    monkeypatch.setattr(layers, "_DENSE", type(layers._DENSE)())
    monkeypatch.setattr(layers, "GEMM_MIN_CHANNELS", 1)
    monkeypatch.setattr(layers, "GEMM_MAX_WINDOW", 10**6)


@settings(max_examples=60, deadline=None)
@given(convs, st.sampled_from([torch.float32, F64]), st.booleans())
def test_fold_transpose_is_conv_transpose_exactly(case, dtype, narrow) -> None:  # type: ignore[no-untyped-def]
    """Small integer weights and rows: every sum is exact in either form, so both forms (the
    batched product for narrow maps in float32, the single product for float64 windows) equal
    ``conv_transpose2d`` bit for bit, on the whole map and on every output window."""
    co, ci, k, stride, padding, size, seed = case
    if k > size + 2 * padding or padding >= k:
        return
    patch = pytest.MonkeyPatch()
    try:
        _force_fold(patch)
        # one form at a time: narrow float32 maps, or float64 windows
        if narrow:
            dtype = torch.float32
            patch.setattr(layers, "FOLD_MAX_CHANNELS", ci)
        else:
            dtype = F64
            patch.setattr(layers, "FOLD_MAX_CHANNELS", 0)
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randint(-8, 9, (co, ci, k, k), generator=gen).to(dtype)
        op = _op(co, ci, k, stride, padding, size, weight)
        h, w = op.out_shape[1:]
        a = torch.randint(-8, 9, (5, co, h, w), generator=gen).to(dtype)
        assert layers._fold_backward(op, a, padded=True) is not None
        want = F.conv_transpose2d(a, weight, None, op.stride, op.padding, op.output_padding)
        got, _ = backward_conv(op, a)
        assert got.dtype == dtype and torch.equal(got, want)
        for wh in range(1, h + 1):
            for ww in range(1, w + 1):
                rows = torch.randint(-8, 9, (3, co, wh, ww), generator=gen).to(dtype)
                top, left = h - wh, w - ww
                out, _, r0, c0 = backward_window_conv(op, rows, top, left)
                full = torch.zeros(3, co, h, w, dtype=dtype)
                full[:, :, top:, left:] = rows
                want_full = F.conv_transpose2d(full, weight, None, op.stride, op.padding,
                                               op.output_padding)
                assert torch.equal(want_full[:, :, r0:r0 + out.shape[2], c0:c0 + out.shape[3]],
                                   out)
                rest = want_full.clone()
                rest[:, :, r0:r0 + out.shape[2], c0:c0 + out.shape[3]] = 0
                assert not rest.any()
    finally:
        patch.undo()


def test_fold_forms_are_used_where_they_are_faster() -> None:
    """The shapes of svhn-teacher's backward passes (see benchmarks/bench_transpose.py)."""
    torch.manual_seed(0)

    def op(co: int, ci: int, k: int, stride: int, size: int, dtype: torch.dtype) -> ConvOp:
        return _op(co, ci, k, stride, 1, size, torch.randn(co, ci, k, k, dtype=dtype))

    fold = layers._fold_backward
    # rows into the 3-channel input: the batched product in float32 only
    assert fold(op(32, 3, 3, 1, 32, torch.float32), torch.randn(7, 32, 8, 8), False) is not None
    assert fold(op(32, 3, 3, 1, 32, F64), torch.randn(7, 32, 8, 8, dtype=F64), False) is None
    # a deep neuron's small window of 64 channels: the single product in float64 only
    window = torch.randn(7, 64, 3, 3, dtype=F64)
    assert fold(op(64, 32, 4, 2, 32, F64), window, False) is not None
    assert fold(op(64, 32, 4, 2, 32, torch.float32), window.float(), False) is None
    # a wide window, or few channels: conv_transpose2d
    assert fold(op(64, 32, 4, 2, 32, F64), torch.randn(7, 64, 6, 6, dtype=F64), False) is None
    assert fold(op(32, 32, 4, 2, 16, F64), torch.randn(7, 32, 3, 3, dtype=F64), False) is None
    assert fold(op(64, 32, 4, 2, 32, F64), window[:0], False) is None  # no rows


def _wide_cnn() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=1, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 64, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 16, 3, stride=1, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 10)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_engine_bounds_match_with_the_fold_forms(dtype, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A CNN whose passes take the fold forms against the same bound with them off: equal up
    to the summation order's rounding, and both hold at sampled points. float32: the plain
    bound (a radius search's steering), whose passes end in the 3-channel input; float64: the
    rigorous bound, whose neurons' windows pass the 64-channel layer."""
    method = get_method("crown", rigorous=dtype == F64)
    model = _wide_cnn()
    torch.manual_seed(6)
    x = torch.rand(4, 3, 8, 8, dtype=dtype)
    x_lo, x_hi = (x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1)
    monkeypatch.setattr(layers, "DENSE_MAX_ENTRIES", 0)
    monkeypatch.setattr(layers, "_DENSE", type(layers._DENSE)())
    calls = []
    fold = layers._fold_backward

    def counted(op, a, padded):  # type: ignore[no-untyped-def]
        out = fold(op, a, padded)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(layers, "_fold_backward", counted)
    with torch.no_grad():
        folded = compute_bounds(model, x_lo, x_hi, method)
        assert any(calls)
        monkeypatch.setattr(layers, "_fold_backward", lambda *args, **kwargs: None)
        plain = compute_bounds(model, x_lo, x_hi, method)
        tol = (1e-4 if dtype == torch.float32 else 1e-10)
        assert ((folded.lower - plain.lower).abs() <= tol * (1 + plain.lower.abs())).all()
        assert ((folded.upper - plain.upper).abs() <= tol * (1 + plain.upper.abs())).all()
        pts = x_lo + (x_hi - x_lo) * torch.rand(300, *x.shape, dtype=dtype)
        out = model.to(dtype)(pts.flatten(0, 1)).view(300, 4, 10)
    assert (out >= folded.lower).all() and (out <= folded.upper).all()
