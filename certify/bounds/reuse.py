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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["REMEMBER_MB", "BoundMemory"]

MB = 2**20
#: Default most megabytes one memory holds (oldest evaluations are forgotten first).
REMEMBER_MB = 512.0
#: Most remembered evaluations intersected for one sample.
MAX_MATCHES = 4


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
        self._kinds: dict[Any, OrderedDict[int, _Evaluation]] = {}
        self._next = 0
        self.recalled = 0  # samples that found at least one remembered bound (statistics)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for kind in self._kinds.values() for e in kind.values())

    def __len__(self) -> int:
        return sum(len(kind) for kind in self._kinds.values())

    def store(self, kind: Any, x_lo: Tensor, x_hi: Tensor,
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

    def recall(self, kind: Any, x_lo: Tensor, x_hi: Tensor
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
            holds = _containment(q_lo, q_hi, e_lo, e_hi)  # (N, M)
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

    def hints(self, kind: tuple[Any, ...], x_lo: Tensor, x_hi: Tensor
              ) -> dict[int, Tensor] | None:
        """Sign hints for the boxes ``[x_lo, x_hi]`` `(N, *in)`: per position, `(N, *shape)`
        int8, +1 where a remembered evaluation over (almost) the same box -- of any dtype,
        rigorous or not, e.g. the radius search's plain float32 evaluation at the eps its
        rigorous float64 bound confirms -- had a lower bound above 0, -1 where its upper bound
        was below 0, 0 elsewhere or without one. Never sound by themselves: they only say
        which bound of a neuron is worth computing (see ``Propagator._tighten``). `kind` as
        for :meth:`recall`; entries match on its device and network layout (its last three
        entries but one: ``kind[2]``, ``kind[4:]``)."""
        n = x_lo.shape[0]
        q_lo = x_lo.reshape(n, -1).to(torch.float64)
        q_hi = x_hi.reshape(n, -1).to(torch.float64)
        reach = HINT_DISTANCE * ((q_hi - q_lo).amax(1) / 2)  # (N,)
        best = torch.full((n,), math.inf, dtype=torch.float64, device=x_lo.device)
        out: dict[int, Tensor] = {}
        for other, entries in self._kinds.items():
            if other[2] != kind[2] or other[4:] != kind[4:]:
                continue
            for entry in entries.values():
                e_lo = entry.x_lo.reshape(entry.x_lo.shape[0], -1).to(torch.float64)
                e_hi = entry.x_hi.reshape(entry.x_hi.shape[0], -1).to(torch.float64)
                dist = _distance(q_lo, q_hi, e_lo, e_hi)  # (N, M)
                near, which = dist.min(1)
                take = (near <= reach) & (near < best)
                if not bool(take.any()):
                    continue
                best = torch.where(take, near, best)
                for pos, (lo, hi) in entry.bounds.items():
                    sign = ((lo[which] > 0).to(torch.int8) - (hi[which] < 0).to(torch.int8))
                    if pos not in out:
                        out[pos] = torch.zeros_like(sign)
                    view = (-1,) + (1,) * (sign.ndim - 1)
                    out[pos] = torch.where(take.view(view), sign, out[pos])
        return out or None


#: A remembered box gives sign hints to a query box whose ends are all within this fraction of
#: the query's largest half-width of it (in practice: the same eps, the other dtype).
HINT_DISTANCE = 1e-3


#: Most elements of one containment comparison (queries x entries x input dimensions).
_COMPARE_ELEMENTS = 2**25


def _containment(q_lo: Tensor, q_hi: Tensor, e_lo: Tensor, e_hi: Tensor) -> Tensor:
    """`(N, M)`: whether box `m` of the entries `[e_lo, e_hi]` `(M, D)` holds query box `n`
    `[q_lo, q_hi]` `(N, D)`, in chunks of queries."""
    n, m, d = q_lo.shape[0], e_lo.shape[0], q_lo.shape[1]
    step = max(1, _COMPARE_ELEMENTS // max(1, m * d))
    parts = []
    for start in range(0, n, step):
        lo, hi = q_lo[start:start + step, None], q_hi[start:start + step, None]
        parts.append(((e_lo[None] <= lo) & (e_hi[None] >= hi)).all(2))
    return torch.cat(parts)


def _distance(q_lo: Tensor, q_hi: Tensor, e_lo: Tensor, e_hi: Tensor) -> Tensor:
    """`(N, M)`: the largest distance between the ends of query box `n` and entry box `m`."""
    n, m, d = q_lo.shape[0], e_lo.shape[0], q_lo.shape[1]
    step = max(1, _COMPARE_ELEMENTS // max(1, m * d))
    parts = []
    for start in range(0, n, step):
        lo, hi = q_lo[start:start + step, None], q_hi[start:start + step, None]
        parts.append(torch.maximum((e_lo[None] - lo).abs().amax(2),
                                   (e_hi[None] - hi).abs().amax(2)))
    return torch.cat(parts)
