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

from certify.bounds import compute_bounds, layers
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
