"""Brute-force references for 2-D ReLU networks: enumeration of activation regions.

Independent of the bound engine and of the MILP: the network's weights are read from the
``nn.Sequential`` (Flatten, [Linear, ReLU]*, Linear) and every activation pattern that is
realized on the input box is enumerated depth first, each branch checked for feasibility by a
small LP (scipy's ``linprog``). On a region the network is affine, so the minimum of a
specification row, or the smallest eps at which a class reaches the label, is one more LP per
region. The regions are closed and cover the box, so the minima over them are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn


def make_net2d(seed: int, widths: list[int], classes: int = 3) -> nn.Sequential:
    """A 2-D input MLP (input shape (1, 1, 2)) whose first-layer kinks cross the unit square."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    d = 2
    for i, w in enumerate(widths):
        lin = nn.Linear(d, w)
        lin.weight.data = torch.randn(w, d, generator=gen) * (3.0 if i == 0 else 1.5 / d**0.5)
        if i == 0:  # hyperplanes through random points of the square
            centers = torch.rand(w, d, generator=gen)
            lin.bias.data = -(lin.weight.data * centers).sum(1)
        else:
            lin.bias.data = torch.randn(w, generator=gen) * 0.5
        layers += [lin, nn.ReLU()]
        d = w
    out = nn.Linear(d, classes)
    out.weight.data = torch.randn(classes, d, generator=gen)
    out.bias.data = torch.randn(classes, generator=gen) * 0.5
    layers.append(out)
    return nn.Sequential(*layers).double().eval()


@dataclass(frozen=True)
class Region:
    """``{x : a x <= b}`` within the box, where the logits are ``f = w x + c``."""

    a: np.ndarray  # (R, 2)
    b: np.ndarray  # (R,)
    w: np.ndarray  # (K, 2)
    c: np.ndarray  # (K,)


def _weights(model: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    lins = [m for m in model if isinstance(m, nn.Linear)]
    return [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
            for m in lins]


def _witness(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """A point of ``{a x <= b} ∩ [lo, hi]``, or None if it is empty."""
    res = linprog(np.zeros(2), A_ub=a, b_ub=b, bounds=list(zip(lo, hi, strict=True)),
                  method="highs")
    return res.x if res.status == 0 else None


def regions(model: nn.Sequential, lo: np.ndarray, hi: np.ndarray) -> list[Region]:
    """Every activation region of `model` that meets the box ``[lo, hi]`` (2-D input).

    Depth first over the neurons; a branch is kept when its region is non-empty: the branch
    holding the parent's witness point is, the other one is checked by an LP.
    """
    layers = _weights(model)
    out: list[Region] = []

    def walk(k: int, j: int, a: list[np.ndarray], b: list[float], point: np.ndarray,
             zw: np.ndarray, zc: np.ndarray, hw: np.ndarray, hc: np.ndarray) -> None:
        if j == zw.shape[0]:  # layer done
            w, c = layers[k + 1]
            if k + 1 == len(layers) - 1:
                out.append(Region(np.array(a).reshape(-1, 2), np.array(b), w @ hw, w @ hc + c))
                return
            walk(k + 1, 0, a, b, point, w @ hw, w @ hc + c, np.zeros((w.shape[0], 2)),
                 np.zeros(w.shape[0]))
            return
        value = zw[j] @ point + zc[j]
        for active in (True, False):
            # active: z_j >= 0  <=>  -zw_j x <= zc_j;  inactive: zw_j x <= -zc_j
            row, rhs = (-zw[j], zc[j]) if active else (zw[j], -zc[j])
            a2, b2 = [*a, row], [*b, rhs]
            holds = value >= 0 if active else value <= 0
            witness = point if holds else _witness(np.array(a2), np.array(b2), lo, hi)
            if witness is None:
                continue
            hw2, hc2 = hw.copy(), hc.copy()
            if active:
                hw2[j], hc2[j] = zw[j], zc[j]
            walk(k, j + 1, a2, b2, witness, zw, zc, hw2, hc2)

    w0, c0 = layers[0]
    if len(layers) == 1:
        return [Region(np.zeros((0, 2)), np.zeros(0), w0, c0)]
    walk(0, 0, [], [], (lo + hi) / 2, w0, c0, np.zeros((w0.shape[0], 2)), np.zeros(w0.shape[0]))
    return out


def min_spec(parts: list[Region], row: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """``min_x row . f(x)`` over the box ``[lo, hi]`` (flat 2-D), given the regions of a box
    that contains it."""
    best = np.inf
    for r in parts:
        res = linprog(row @ r.w, A_ub=r.a if r.a.size else None, b_ub=r.b if r.b.size else None,
                      bounds=list(zip(lo, hi, strict=True)), method="highs")
        if res.status == 0:
            best = min(best, float(res.fun + row @ r.c))
    return best


def min_adv_eps(parts: list[Region], x0: np.ndarray, label: int) -> float:
    """Smallest eps with ``f_j(x) >= f_label(x)`` for some ``j != label``, ``x`` in [0, 1]^2
    and ``|x - x0|_inf <= eps``, given the regions of [0, 1]^2; ``inf`` if there is none."""
    best = np.inf
    for r in parts:
        for j in range(r.w.shape[0]):
            if j == label:
                continue
            # variables (x1, x2, t): min t; x - t <= x0; -x - t <= -x0;
            # (w_y - w_j) x <= c_j - c_y; the region's rows
            d = r.w[label] - r.w[j]
            rows = [np.r_[1, 0, -1], np.r_[0, 1, -1], np.r_[-1, 0, -1], np.r_[0, -1, -1],
                    np.r_[d, 0]]
            rhs = [x0[0], x0[1], -x0[0], -x0[1], r.c[j] - r.c[label]]
            for ra, rb in zip(r.a, r.b, strict=True):
                rows.append(np.r_[ra, 0])
                rhs.append(rb)
            res = linprog(np.r_[0, 0, 1.0], A_ub=np.array(rows), b_ub=np.array(rhs),
                          bounds=[(0, 1), (0, 1), (0, None)], method="highs")
            if res.status == 0:
                best = min(best, float(res.fun))
    return best


def grid_min_spec(model: nn.Sequential, row: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                  steps: int = 301) -> float:
    """``min row . f`` over a `steps` x `steps` grid of the box (an upper bound on the minimum)."""
    g0 = np.linspace(lo[0], hi[0], steps)
    g1 = np.linspace(lo[1], hi[1], steps)
    pts = np.stack(np.meshgrid(g0, g1), -1).reshape(-1, 1, 1, 2)
    with torch.no_grad():
        f = model(torch.as_tensor(pts, dtype=torch.float64)).numpy()
    return float((f @ row).min())


# --- residual (DAG) networks -------------------------------------------------------------------


class Residual2d(nn.Module):
    """A 2-D input residual MLP: ``h = relu(A x + a)``, ``g = relu(B h + b)``,
    ``s = relu(h + C g + c)``, logits ``D s + d`` (the Add makes it a DAG)."""

    def __init__(self, width: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.fc0 = nn.Linear(2, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc0(torch.flatten(x, 1)))
        s = torch.relu(h + self.fc2(torch.relu(self.fc1(h))))
        return self.out(s)  # type: ignore[no-any-return]


def make_residual2d(seed: int, width: int = 3, hidden: int = 3, classes: int = 3) -> Residual2d:
    """A :class:`Residual2d` (input shape (1, 1, 2)) whose first-layer kinks cross the unit
    square, float64, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model = Residual2d(width, hidden, classes)
    w0 = torch.randn(width, 2, generator=gen) * 3.0
    model.fc0.weight.data = w0
    model.fc0.bias.data = -(w0 * torch.rand(width, 2, generator=gen)).sum(1)
    for lin in (model.fc1, model.fc2, model.out):
        d = lin.in_features
        lin.weight.data = torch.randn(lin.out_features, d, generator=gen) * 1.5 / d**0.5
        lin.bias.data = torch.randn(lin.out_features, generator=gen) * 0.5
    return model.double().eval()


def residual_regions(model: Residual2d, lo: np.ndarray, hi: np.ndarray) -> list[Region]:
    """Every activation region of a :class:`Residual2d` that meets the box (2-D input), depth
    first over its three ReLU layers as :func:`regions` (each layer's pre-activation is affine
    in ``x`` once the patterns of the layers before it are fixed: the sum of the shortcut's and
    the branch's affine maps)."""
    (a, a0), (b, b0), (c, c0), (d, d0) = _weights(
        nn.Sequential(model.fc0, model.fc1, model.fc2, model.out))
    out: list[Region] = []

    def pre(k: int, post: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if k == 0:
            return a, a0
        if k == 1:
            hw, hc = post[0]
            return b @ hw, b @ hc + b0
        (hw, hc), (gw, gc) = post
        return hw + c @ gw, hc + c @ gc + c0

    def walk(k: int, j: int, rows: list[np.ndarray], rhs: list[float], point: np.ndarray,
             post: list[tuple[np.ndarray, np.ndarray]], cur: tuple[np.ndarray, np.ndarray]
             ) -> None:
        zw, zc = pre(k, post)
        if j == zw.shape[0]:
            post = [*post, cur]
            if k == 2:
                sw, sc = cur
                out.append(Region(np.array(rows).reshape(-1, 2), np.array(rhs), d @ sw,
                                  d @ sc + d0))
                return
            nw, _ = pre(k + 1, post)
            walk(k + 1, 0, rows, rhs, point, post, (np.zeros((nw.shape[0], 2)),
                                                    np.zeros(nw.shape[0])))
            return
        value = zw[j] @ point + zc[j]
        for active in (True, False):
            row, r = (-zw[j], zc[j]) if active else (zw[j], -zc[j])
            rows2, rhs2 = [*rows, row], [*rhs, r]
            holds = value >= 0 if active else value <= 0
            witness = point if holds else _witness(np.array(rows2), np.array(rhs2), lo, hi)
            if witness is None:
                continue
            hw, hc = cur[0].copy(), cur[1].copy()
            if active:
                hw[j], hc[j] = zw[j], zc[j]
            walk(k, j + 1, rows2, rhs2, witness, post, (hw, hc))

    walk(0, 0, [], [], (lo + hi) / 2, [], (np.zeros((a.shape[0], 2)), np.zeros(a.shape[0])))
    return out
