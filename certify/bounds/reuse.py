"""Intermediate bounds carried from one evaluation of a radius search to the next.

A pre-activation bound proven over a box ``B1`` holds over every box ``B2`` inside ``B1``: the
values the network takes on ``B2`` are among those it takes on ``B1``. A radius search
evaluates the same samples at several eps, and ``clip(x +- eps, 0, 1)`` grows with eps, so the
bounds computed at a larger eps are valid -- looser -- bounds at every smaller one.
:class:`BoundMemory` keeps them; before a layer is tightened, its interval bounds are intersected
with every remembered bound whose box holds the current one (an intersection of sound bounds is
sound), and only the neurons still unstable get a linear (backward) pass. Where the larger eps
proved a neuron stable, the work for it is saved; the relaxations are at least as tight as
those computed from scratch.

What makes a remembered bound applicable is checked on the boxes themselves (elementwise
containment, per sample), never on names or indices: a stale or foreign entry simply never
matches. Bounds are kept apart by how they were computed (``rigorous`` or the plain floating
point bound, dtype, device, the model's own rounding, the network's activation layout), so a
plain bound never enters a rigorous one. The memory is scoped to one radius search over one
model (:meth:`certify.bounds.base.MethodBase.searching`); it is not thread-safe.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["REMEMBER_MB", "BoundMemory", "Layout", "MemoryKind"]

MB = 2**20
#: Default most megabytes one memory holds (oldest evaluations are forgotten first).
REMEMBER_MB = 512.0
#: Most remembered evaluations intersected for one sample.
MAX_MATCHES = 4


class Layout(NamedTuple):
    """The network as remembered bounds see it: device, input size and, per activation, its
    position and input shape."""

    device: torch.device
    input_size: int
    activations: tuple[tuple[int, tuple[int, ...]], ...]


class MemoryKind(NamedTuple):
    """How remembered bounds were computed: only bounds of the same kind are recalled."""

    rigorous: bool
    dtype: torch.dtype
    runs_in: torch.dtype | None
    layout: Layout


@dataclass
class _Evaluation:
    """One remembered evaluation: its boxes `(N, *in)` and the bounds of every activation's
    input (the exact chain's, before the model's own rounding widens them), `(N, *shape)`."""

    x_lo: Tensor
    x_hi: Tensor
    bounds: dict[int, tuple[Tensor, Tensor]]

    @property
    def nbytes(self) -> int:
        tensors = [self.x_lo, self.x_hi] + [t for pair in self.bounds.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)


class BoundMemory:
    """Pre-activation bounds of earlier evaluations, recalled for boxes inside theirs.

    Args:
        budget_mb: Most megabytes held; the oldest evaluations are dropped first, and one that
            alone exceeds the budget is not kept.
    """

    def __init__(self, budget_mb: float = REMEMBER_MB) -> None:
        self.budget = int(budget_mb * MB)
        self._kinds: dict[MemoryKind, OrderedDict[int, _Evaluation]] = {}
        self._next = 0
        self.recalled = 0  # samples that found at least one remembered bound (statistics)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for kind in self._kinds.values() for e in kind.values())

    def __len__(self) -> int:
        return sum(len(kind) for kind in self._kinds.values())

    def store(self, kind: MemoryKind, x_lo: Tensor, x_hi: Tensor,
              bounds: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Remember the bounds `bounds` (position -> `(lower, upper)`, `(N, *shape)` each)
        proven over the boxes ``[x_lo, x_hi]`` `(N, *in)`, computed as `kind` says."""
        entry = _Evaluation(x_lo.detach(), x_hi.detach(),
                            {p: (lo.detach(), hi.detach()) for p, (lo, hi) in bounds.items()})
        if entry.nbytes > self.budget:
            return
        while self._kinds and self.nbytes + entry.nbytes > self.budget:
            oldest = min(((k, next(iter(v))) for k, v in self._kinds.items() if v),
                         key=lambda kv: kv[1])
            del self._kinds[oldest[0]][oldest[1]]
        self._kinds.setdefault(kind, OrderedDict())[self._next] = entry
        self._next += 1

    def recall(self, kind: MemoryKind, x_lo: Tensor, x_hi: Tensor
               ) -> dict[int, tuple[Tensor, Tensor]] | None:
        """For the boxes ``[x_lo, x_hi]`` `(N, *in)`: per position, the intersection of the
        remembered bounds (of the same `kind`) whose box holds each sample's box; ``-inf`` /
        ``inf`` for samples without one. None when no sample has any."""
        entries = self._kinds.get(kind)
        if not entries:
            return None
        n = x_lo.shape[0]
        q_lo, q_hi = x_lo.reshape(n, -1), x_hi.reshape(n, -1)
        out: dict[int, tuple[Tensor, Tensor]] = {}
        matched = torch.zeros(n, dtype=torch.long, device=x_lo.device)
        for entry in reversed(entries.values()):  # newest first: usually the tightest
            e_lo, e_hi = entry.x_lo.reshape(entry.x_lo.shape[0], -1), entry.x_hi.reshape(
                entry.x_hi.shape[0], -1)
            if e_lo.shape[1] != q_lo.shape[1]:
                continue
            holds = _holding(q_lo, q_hi, e_lo, e_hi)  # (N, M)
            holds &= (matched < MAX_MATCHES)[:, None]
            if not bool(holds.any()):
                continue
            # one remembered sample per query sample from this evaluation (the first)
            has = holds.any(1)
            which = holds.to(torch.int8).argmax(1)
            matched += has.long()
            for pos, (lo, hi) in entry.bounds.items():
                if pos not in out:
                    shape = (n, *lo.shape[1:])
                    out[pos] = (lo.new_full(shape, float("-inf")),
                                hi.new_full(shape, float("inf")))
                cur_lo, cur_hi = out[pos]
                view = (-1,) + (1,) * (lo.ndim - 1)
                sel = has.view(view)
                out[pos] = (torch.where(sel, torch.maximum(cur_lo, lo[which]), cur_lo),
                            torch.where(sel, torch.minimum(cur_hi, hi[which]), cur_hi))
        if not out:
            return None
        self.recalled += int((matched > 0).sum())
        return out

    def hints(self, layout: Layout, x_lo: Tensor, x_hi: Tensor
              ) -> dict[int, tuple[Tensor, Tensor]] | None:
        """Stability hints for the boxes ``[x_lo, x_hi]`` `(N, *in)`: per position,
        `(inactive, active)`, each `(N, *shape)` bool, True where the nearest remembered
        evaluation over (almost) the same box or, without one, over a box holding it -- of any
        dtype, rigorous or not, e.g. the radius search's plain float32 evaluation at the eps
        its rigorous float64 bound confirms, or at the failing eps just above a closing shot --
        had an upper bound below 0 (a lower bound above 0). Never sound by themselves: they
        only say which bound of a neuron is worth computing, and how (see
        ``Propagator._tighten``). Entries of every kind with this `layout` are searched."""
        n = x_lo.shape[0]
        q_lo = x_lo.reshape(n, -1).to(torch.float64)
        q_hi = x_hi.reshape(n, -1).to(torch.float64)
        reach = HINT_DISTANCE * ((q_hi - q_lo).amax(1) / 2)  # (N,)
        best = torch.full((n,), math.inf, dtype=torch.float64, device=x_lo.device)
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for kind, entries in self._kinds.items():
            if kind.layout != layout:
                continue
            for entry in entries.values():
                e_lo = entry.x_lo.reshape(entry.x_lo.shape[0], -1).to(torch.float64)
                e_hi = entry.x_hi.reshape(entry.x_hi.shape[0], -1).to(torch.float64)
                near, which = _nearness(q_lo, q_hi, e_lo, e_hi, reach).min(1)  # (N,)
                holds = _holding(q_lo, q_hi, e_lo, e_hi)  # (N, M)
                # without a near match: the first sample whose box holds the query's, at its
                # distance (of boxes holding it, the nearest is the smallest)
                held = (near > reach) & holds.any(1)
                if bool(held.any()):
                    first = holds.to(torch.int8).argmax(1)
                    near = torch.where(held, _distance(q_lo, q_hi, e_lo[first], e_hi[first]),
                                       near)
                    which = torch.where(held, first, which)
                take = ((near <= reach) | held) & (near < best)
                if not bool(take.any()):
                    continue
                best = torch.where(take, near, best)
                for pos, (lo, hi) in entry.bounds.items():
                    below, above = hi[which] < 0, lo[which] > 0
                    view = take.view((-1,) + (1,) * (below.ndim - 1))
                    old = out.get(pos, (torch.zeros_like(below), torch.zeros_like(above)))
                    out[pos] = (torch.where(view, below, old[0]),
                                torch.where(view, above, old[1]))
        return out or None


#: A remembered box gives stability hints to a query box whose ends are all within this
#: fraction of the query's largest half-width of it (in practice: the same eps, another dtype).
HINT_DISTANCE = 1e-3


#: Most elements of one elementwise comparison of boxes (pairs x input dimensions).
_COMPARE_ELEMENTS = 2**25


def _holds(q_lo: Tensor, q_hi: Tensor, e_lo: Tensor, e_hi: Tensor) -> Tensor:
    """Whether the entry boxes hold the query boxes (broadcast over the last dim)."""
    return ((e_lo <= q_lo) & (e_hi >= q_hi)).all(-1)


def _distance(q_lo: Tensor, q_hi: Tensor, e_lo: Tensor, e_hi: Tensor) -> Tensor:
    """The largest distance between the ends of query and entry boxes (over the last dim)."""
    return torch.maximum((e_lo - q_lo).abs().amax(-1), (e_hi - q_hi).abs().amax(-1))


#: Coordinate groups of the screening that precedes an elementwise comparison of boxes.
_GROUPS = 4


def _group_sums(t: Tensor) -> tuple[Tensor, Tensor]:
    """`(K, G)` float64 sums of the coordinates ``d = g mod G`` of `t` `(K, D)`, and of their
    absolute values."""
    d = t.shape[1]
    g = min(_GROUPS, d)
    t64 = torch.nn.functional.pad(t.to(torch.float64), (0, (-d) % g)).reshape(t.shape[0], -1, g)
    return t64.sum(1), t64.abs().sum(1)


def _group_differences(q_lo: Tensor, q_hi: Tensor, e_lo: Tensor, e_hi: Tensor
                       ) -> tuple[Tensor, Tensor, float]:
    """`(N, M, G)` differences of entry and query boxes' group sums (:func:`_group_sums`) at
    the lower and the upper ends, and a slack far above their float64 rounding (`D` terms:
    ``D 2^-53`` relative), so that the necessary conditions built on them never drop a pair."""
    (ql, ql_abs), (qh, qh_abs) = _group_sums(q_lo), _group_sums(q_hi)
    (el, el_abs), (eh, eh_abs) = _group_sums(e_lo), _group_sums(e_hi)
    magnitude = float(torch.stack([t.amax() if t.numel() else t.new_zeros(())
                                   for t in (ql_abs, qh_abs, el_abs, eh_abs)]).max())
    return el[None] - ql[:, None], eh[None] - qh[:, None], 1e-9 * magnitude + 1e-300


def _on_pairs(keep: Tensor, out: Tensor, q_lo: Tensor, q_hi: Tensor, e_lo: Tensor,
              e_hi: Tensor, compare: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
              ) -> Tensor:
    """`out` `(N, M)` with `compare` of query box `n` and entry box `m` written where `keep`,
    elementwise, in chunks of at most ``_COMPARE_ELEMENTS``."""
    n_idx, m_idx = keep.nonzero(as_tuple=True)
    step = max(1, _COMPARE_ELEMENTS // max(1, q_lo.shape[1]))
    for k in range(0, n_idx.numel(), step):
        n, m = n_idx[k:k + step], m_idx[k:k + step]
        out[n, m] = compare(q_lo[n], q_hi[n], e_lo[m], e_hi[m]).to(out.dtype)
    return out


def _holding(q_lo: Tensor, q_hi: Tensor, e_lo: Tensor, e_hi: Tensor) -> Tensor:
    """`(N, M)`: whether entry box `m` `[e_lo, e_hi]` `(M, D)` holds query box `n` `[q_lo,
    q_hi]` `(N, D)` (:func:`_holds`). Screened first: a box holds another only if each
    coordinate group's sum of lower ends is at most the other's, and of upper ends at least;
    only the pairs left are compared elementwise."""
    diff_lo, diff_hi, slack = _group_differences(q_lo, q_hi, e_lo, e_hi)
    keep = ((diff_lo <= slack) & (diff_hi >= -slack)).all(-1)
    out = torch.zeros(keep.shape, dtype=torch.bool, device=q_lo.device)
    return _on_pairs(keep, out, q_lo, q_hi, e_lo, e_hi, _holds)


def _nearness(q_lo: Tensor, q_hi: Tensor, e_lo: Tensor, e_hi: Tensor, reach: Tensor
              ) -> Tensor:
    """`(N, M)`: the largest distance between the ends of query box `n` and entry box `m`
    (:func:`_distance`) where it is at most ``reach[n]``, ``inf`` elsewhere or more. Screened
    first: that distance is at least a coordinate group's summed difference over the group's
    size; only the pairs left are compared elementwise."""
    diff_lo, diff_hi, slack = _group_differences(q_lo, q_hi, e_lo, e_hi)
    size = -(-q_lo.shape[1] // min(_GROUPS, q_lo.shape[1]))  # coordinates per group, at most
    lower = (torch.maximum(diff_lo.abs(), diff_hi.abs()).amax(-1) - slack) / size
    keep = lower <= reach.to(torch.float64)[:, None]
    out = torch.full(keep.shape, math.inf, dtype=q_lo.dtype, device=q_lo.device)
    return _on_pairs(keep, out, q_lo, q_hi, e_lo, e_hi, _distance)
