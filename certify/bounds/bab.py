"""Complete verification by branch and bound over ReLU splits, bounded by alpha/beta-CROWN.

A property is ``spec @ f(x) > threshold`` for every ``x`` in a box, row by row. One linear
relaxation proves it or not; **branch and bound** (BaB) splits the box's preimage instead: an
unstable ReLU (or LeakyReLU) ``z`` is split into the *domains* ``z >= 0`` and ``z <= 0``, on
each of which it is linear, and each domain is bounded again, tighter. Every point of the box
lies in some leaf of the split tree, so the property holds when every leaf's bound is above the
threshold; a point of the box below it (a counterexample) ends the search the other way. With
budgets (time, domains) the answer may stay ``unknown``; without them the search is complete
(once every ReLU of a domain is split, its input is split).

**Bounding a batch of domains** (hundreds at once, one :class:`Propagator` call; domains of
different properties share the batch). A domain inherits its parent's pre-activation bounds
(valid: it is a subset), clamps its split neurons (``l = 0`` for ``z >= 0``, ``u = 0`` for
``z <= 0``), and optionally re-bounds the unstable neurons of the layers after its newest split
by a CROWN pass with the clamped relaxations (``recompute_intermediate``), intersected with what
it had. A
domain whose bounds cross (``l > u``) is empty: nothing to prove there. The output rows are then
bounded by **beta-CROWN** (Wang et al., "Beta-CROWN: Efficient Bound Propagation with
Per-neuron Split Constraints for Neural Network Robustness Verification", NeurIPS 2021): the
split constraints ``s z >= 0`` enter the bound through multipliers ``beta >= 0``,

    min_{x in domain} f(x)  >=  min_{x in box} f(x) - sum_j beta_j s_j z_j(x),

(the subtracted terms are >= 0 on the domain), which the backward pass carries as the rows
``-beta s`` added at each split layer; ``beta`` and alpha-CROWN's lower slopes are optimized
jointly by projected gradient ascent, warm-started from the parent's. Only the open rows are
bounded (each domain's rows still below their targets, one block of one row each: no padding
for domains with fewer open rows than others), and a row leaves the optimization as soon as a
plain pass puts it above its target. Any ``beta >= 0`` and
``alpha in [0, 1]`` give a sound bound; the optimization runs without rounding control and the
bound at the best parameters is then computed **rigorously** (every rounding accounted for, as
for every method of the engine), so each domain's decision holds in exact arithmetic. (For the
children, first in float32 over the domains' boxes and bounds rounded outward, then in float64
for the rows whose float32 rounding terms alone keep them at or below their target.)

**Branching**: BaBSR's intercept score (Bunel et al., "Branch and Bound for Piecewise Linear
Neural Network Verification", JMLR 2020). For the domain's worst row, with ``mu`` the row's
coefficient on a free unstable neuron, a negative ``mu`` takes the neuron's chord, whose
intercept ``t`` (``-u l / (u - l)`` for a ReLU) costs the bound ``-mu t``; splitting the neuron
with the largest cost removes it. ``|mu| min(-l, u)``, at 1e-4 of the weight, breaks ties. (On
hard digits properties this splits in 2-3x fewer domains than the gap of each neuron's lines
at the domain's candidate point, tried before.) The score only ranks: **filtered smart
branching** (De Palma et al., 2021) then bounds both children of each of the `candidates`
best-scored neurons (default 5) of every open domain, one plain pass each at the domain's own
slopes and multipliers (no optimization, one row: the worst), and splits the neuron whose
children's bounds sum highest, each counted up to its target (a child above it is done, however
far above). On hard digits MLP properties this proves in 30-55% fewer domains than the best
score alone (3 to 10 candidates); the filter is about a quarter of bab's time on a digits CNN,
whose hardest verify instance it proves in 134k domains (the best score alone: unknown after
200k). The children's relaxations are their parents' with only the split neuron relaxed
again. A domain whose free unstable neurons all score
0 (none left, or none in its worst row), and every domain with ``branching="input"`` (the
default for inputs of at most :data:`INPUT_SPLIT_DIMS` coordinates), splits its input box in
half along the coordinate with the largest ``(|row| + |row|_mean / 4) (hi - lo)``.

**Counterexamples**: every bounded domain proposes the corner of its box that minimizes its
worst row's linear bound; the most promising ones are improved by a few PGD steps in the box
(:func:`certify.attacks.pgd`). A point whose row value, evaluated in floating point, is at or
below the threshold ends its property as ``"at or below threshold"`` (callers that claim a
counterexample re-check it with the model: :func:`certify.attacks.recheck`). float64 points
are screened in float32 first: only those with a row near the threshold or near its best
value so far are evaluated again in float64.

**Results** (:class:`BabBounds`): per property ``"above threshold"`` (proved: every leaf's
rigorous bound is above it), ``"at or below threshold"`` (a point was found) or ``"unknown: time
budget spent"`` / ``"unknown: domain budget spent"`` / ``"unknown: memory budget spent"`` (the
open domains outgrew ``pool_memory_mb``) / ``"unknown: beyond the time budget"`` (in a radius
search, not tried: see :class:`SearchMemory`); the lower bound of each row is the smallest
over the leaves, always sound. Without a threshold (``threshold=None``) the search tightens the
lower bounds until the budget is spent or each row is within ``gap`` of the best point found.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from certify.bounds import rounding
from certify.bounds.alpha_crown import (
    AlphaCrown,
    adam_ascent,
    optimized_intermediate,
)
from certify.bounds.base import STATE, Bounds, MethodBase, register_method
from certify.bounds.layers import LeakyReluOp, ReluOp, SpecRows, cast_op, numel, true_first
from certify.bounds.network import Network, identity_spec, spec_rows
from certify.bounds.propagation import (
    BACKWARD_FACTOR,
    MB,
    EngineOptions,
    Propagator,
    _float32,
)
from certify.bounds.relaxations import Relaxation, activation_rule
from certify.errors import SpecError
from certify.spec import round_to

__all__ = ["BabBounds", "BranchAndBound", "INPUT_SPLIT_DIMS", "SearchMemory", "supports"]

ABOVE = "above threshold"
BELOW = "at or below threshold"
TIME_SPENT = "unknown: time budget spent"
DOMAINS_SPENT = "unknown: domain budget spent"
MEMORY_SPENT = "unknown: memory budget spent"
BEYOND_TIME = "unknown: beyond the time budget"
GAP_CLOSED = "gap closed"
#: Inputs with at most this many coordinates are split on the input with ``branching="auto"``.
INPUT_SPLIT_DIMS = 16
BRANCHINGS = ("auto", "relu", "input")
#: The activations bab splits (piecewise linear with one kink at 0: linear on each side).
SPLITS = (ReluOp, LeakyReluOp)
#: Weight of the tie-breaking score ``|mu| min(-l, u)`` next to the intercept score.
TIE_BREAK = 1e-4
#: Candidate points are screened in float32 (see _Search._screened_values) from this many on,
#: and evaluated in float64 where a row is within this fraction (of 1 + its value) of what
#: would change the search's best points.
SCREEN_MIN = 64
SCREEN_SLACK = 1e-3
#: On the CPU, the filter's passes bound at most this many bytes of rows per tensor at once
#: (the widest layer's): a pass whose tensors stay in the CPU's caches runs faster per row
#: (on scn-16-32's hardest verify instance the filter took 0.5x the time with 3,072 rows per
#: pass instead of 12,288, and 1.2x with 768).
PASS_BYTES = 3 * 2**20
#: Most domains bounded in one call (the memory budget may allow fewer).
MAX_BATCH = 1024


@dataclass(frozen=True, repr=False)
class BabBounds(Bounds):
    """Bounds from ``bab``, with each property's verdict and the search's statistics.

    Attributes:
        lower, upper: `(N, S)` as for :class:`Bounds`; `lower` is the smallest bound over the
            leaves of the split tree (sound), `upper` the root's CROWN bound.
        status: `N` strings: ``"above threshold"``, ``"at or below threshold"``,
            ``"unknown: <reason>"`` (with a threshold), or ``"gap closed"`` /
            ``"unknown: ..."`` without one.
        points: `(N, *input_shape)`: the best point found per property (the lowest worst row
            value), NaN where none was evaluated.
        domains: `(N,)` domains bounded, the root included.
        depth: `(N,)` the deepest split.
        seconds: `(N,)` time spent per property (a batch's time is shared by its domains).
    """

    status: tuple[str, ...] = ()
    points: Tensor = field(default_factory=lambda: torch.zeros(0))
    domains: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    depth: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    seconds: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    @property
    def proved(self) -> Tensor:
        """`(N,)` bool: where every row is proven above the threshold."""
        return torch.tensor([s == ABOVE for s in self.status], dtype=torch.bool)


@dataclass
class _Domains:
    """A batch of domains (structure of arrays, first dimension `D`).

    `lo`/`hi`/`split` per activation layer are flat `(D, n_k)`; `alpha`/`beta` `(D, W, n_k)`
    per layer warm-start the next optimization of the spec rows `rows` `(D, W)` (-1: padding),
    the rows still open when the domain was bounded (a row proven in a domain is proven in its
    children: almost every domain deep in a proof keeps one row of its property's); `bound`
    `(D, S)` holds each row's best rigorous lower bound so far (a parent's bound holds for its
    children).
    """

    sample: Tensor
    x_lo: Tensor
    x_hi: Tensor
    lo: list[Tensor]
    hi: list[Tensor]
    split: list[Tensor]
    alpha: list[Tensor]
    beta: list[Tensor]
    rows: Tensor
    bound: Tensor
    depth: Tensor
    newest: Tensor  # (D,) the layer of the newest split (-1: the input; the root: n_layers)
    layer: Tensor  # (D,) the branching choice: an activation layer, or -1 for the input
    index: Tensor  # (D,) its neuron (flat), or the input coordinate

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    def take(self, index: Tensor) -> _Domains:
        def pick(ts: list[Tensor]) -> list[Tensor]:
            return [t.index_select(0, index) for t in ts]

        return _Domains(self.sample[index], self.x_lo[index], self.x_hi[index], pick(self.lo),
                        pick(self.hi), pick(self.split), pick(self.alpha), pick(self.beta),
                        self.rows[index], self.bound[index], self.depth[index],
                        self.newest[index], self.layer[index], self.index[index])

    def widened(self, w: int) -> _Domains:
        """These domains with `w` parameter slots (padded: rows -1, parameters 0)."""
        pad = w - int(self.rows.shape[1])
        if pad == 0:
            return self

        def grow(t: Tensor, fill: float) -> Tensor:
            return torch.cat([t, t.new_full((t.shape[0], pad, *t.shape[2:]), fill)], 1)

        return replace(self, alpha=[grow(a, 0) for a in self.alpha],
                       beta=[grow(b, 0) for b in self.beta], rows=grow(self.rows, -1))

    def slot(self, at: Tensor, row: Tensor) -> Tensor:
        """`(P,)` the parameter slot of spec row `row` `(P,)` in domain `at` `(P,)`; slot 0
        where the domain did not keep the row (only a radius search's restart from leaves
        bounded against another threshold meets that: any slopes and multipliers are a sound
        warm start)."""
        return (self.rows.index_select(0, at) == row[:, None]).to(torch.uint8).argmax(1)

    @staticmethod
    def cat(parts: list[_Domains]) -> _Domains:
        w = max(int(p.rows.shape[1]) for p in parts)
        parts = [p.widened(w) for p in parts]

        def join(get: Any) -> Any:
            first = get(parts[0])
            if isinstance(first, list):
                return [torch.cat([get(p)[k] for p in parts]) for k in range(len(first))]
            return torch.cat([get(p) for p in parts])

        return _Domains(*(join(lambda p, f=f: getattr(p, f)) for f in (
            "sample", "x_lo", "x_hi", "lo", "hi", "split", "alpha", "beta", "rows", "bound",
            "depth", "newest", "layer", "index")))


#: Most megabytes a :class:`SearchMemory` holds (an entry that does not fit is not kept).
REMEMBER_MB = 1024.0
#: Most proven leaves one property collects for its memory entry.
REMEMBER_MAX = 16_384


class SearchMemory:
    """What one radius search's branch-and-bound evaluations carry to the next, per property
    (its specification rows; the threshold may differ between evaluations, a radius search
    raising it by the model's rounding error over each box):

    - **a failed evaluation** (a budget spent) at a box ``B1``: its open leaves, the lowest
      bound of each row over the leaves it proved, and those leaves' splits. Every leaf
      proven on ``B1`` is proven on any box ``B2`` inside ``B1`` (the property on the larger
      set restricted to the smaller), the open leaves cover the rest of ``B2``, and their
      pre-activation and row bounds, valid on ``B1``, hold there: an evaluation at a smaller
      eps starts from the open leaves instead of the root, and the proven leaves' bounds still
      count in the rows' lower bounds (where they are all above its threshold; else it starts
      from the root).
    - **a proof** at a box ``B1``: its leaves' splits. At a larger box nothing of theirs is
      sound but the splits themselves (any split is sound), which save re-deriving the top of
      the tree: an evaluation at a larger eps starts from them, bounded afresh. They must
      cover every input, not only ``B1``: the leaves found empty on ``B1`` are kept too, and
      a proof that started from a failure's open leaves counts the failure's proven leaves
      among its own (past :data:`REMEMBER_MAX` leaves, a proof is not kept).
    - **the cost of both**: the boxes of the failures that spent the time budget, and of the
      proofs that took at least ``budget_reach`` of it. A box between such a proof and such a
      failure (holding the one, inside the other) is answered "unknown: beyond the time
      budget" after its root, without a search: the search's cost grows steeply with eps near
      the edge of what it proves (on the digits MLP it doubles every 2-3% of eps there), so a
      proof there would most likely outlast the budget, and each failure costs all of it.

    Holds at most `budget_mb` megabytes. Scoped to one search over one model (see
    :meth:`BranchAndBound.searching`); not thread-safe.
    """

    def __init__(self, budget_mb: float = REMEMBER_MB) -> None:
        self.budget = int(budget_mb * MB)
        self.entries: dict[bytes, list[_Entry]] = {}
        # per property: the boxes of slow proofs and of failures for time (boxes only)
        self.slow: dict[bytes, list[_Entry]] = {}
        self.timed_out: dict[bytes, list[_Entry]] = {}

    def beyond(self, key: bytes, x_lo: Tensor, x_hi: Tensor) -> bool:
        """Whether the box lies between a slow proof's box and a failure's for time."""
        box = _Entry(x_lo, x_hi)
        return (any(e.inside(box) for e in self.slow.get(key, ()))
                and any(box.inside(e) for e in self.timed_out.get(key, ())))

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for entries in self.entries.values() for e in entries)

    def store(self, key: bytes, entry: _Entry) -> None:
        """Keep `entry` for the property `key` (its rows and threshold), replacing what it
        supersedes: a failure at a box that holds its box, a proof at a box inside it."""
        entries = self.entries.setdefault(key, [])
        entries[:] = [e for e in entries if e.proof != entry.proof or not (
            entry.inside(e) if entry.proof is False else e.inside(entry))]
        if self.nbytes + entry.nbytes > self.budget and not entry.proof and entry.split:
            # a failure's open leaves matter more than its proven leaves' splits (which only
            # let a later proof's leaves restart a larger box)
            entry = replace(entry, split=[], depth=None)
        if self.nbytes + entry.nbytes <= self.budget:
            entries.append(entry)

    def recall(self, key: bytes, x_lo: Tensor, x_hi: Tensor, target: Tensor) -> _Entry | None:
        """The entry to start from on the box ``[x_lo, x_hi]`` with the row targets `target`
        `(S,)`: the newest failure at a box holding it whose proven leaves' bounds are all above
        `target` (they were proven against the failure's own threshold), else the newest proof
        at a box inside it; None: start from the root."""
        box = _Entry(x_lo, x_hi)
        entries = self.entries.get(key, [])
        for e in reversed(entries):
            if not e.proof and box.inside(e) and (
                    e.proven_bound is None or bool((e.proven_bound > target).all())):
                return e
        for e in reversed(entries):
            if e.proof and e.inside(box):
                return e
        return None


@dataclass
class _Entry:
    """A remembered evaluation: its box, and either a failure's open leaves (`leaves`) and
    proven rows' bounds, or a proof's leaves' splits (`split`, `depth`)."""

    x_lo: Tensor
    x_hi: Tensor
    leaves: _Domains | None = None
    proven_bound: Tensor | None = None  # (S,) the lowest bounds over a failure's proofs
    # a proof's leaves' splits, or a failure's proven leaves' (depth None: too many to keep)
    split: list[Tensor] = field(default_factory=list)
    depth: Tensor | None = None

    @property
    def proof(self) -> bool:
        return self.leaves is None

    def inside(self, other: _Entry) -> bool:
        """Whether this entry's box lies inside `other`'s."""
        return bool((self.x_lo >= other.x_lo).all()) and bool((self.x_hi <= other.x_hi).all())

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.split)
        return own + (0 if self.leaves is None else _nbytes(self.leaves))

class _Pool:
    """The open domains: one chunk per bounded batch, each with a mask of the domains still in
    it. Taking a batch copies only its domains; a chunk is compacted once half of it is gone,
    so each round costs about its batch, not the whole pool."""

    def __init__(self) -> None:
        self.chunks: list[_Domains] = []
        self.live: list[Tensor] = []

    def __len__(self) -> int:
        return sum(int(m.sum()) for m in self.live)

    def add(self, doms: _Domains, live: Tensor | None = None) -> None:
        """Add the domains `doms` (the pool keeps them: callers no longer change them), only
        those where `live` `(D,)` is True if given."""
        if live is None:
            live = torch.ones(len(doms), dtype=torch.bool, device=doms.sample.device)
        if bool(live.any()):
            self.chunks.append(doms)
            self.live.append(live)
            self._compact()

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(c) for c in self.chunks)

    def counts(self, n: int) -> Tensor:
        """`(n,)` open domains per property."""
        out = torch.zeros(n, dtype=torch.int64)
        for c, m in zip(self.chunks, self.live, strict=True):
            out += torch.bincount(c.sample[m].cpu(), minlength=n)
        return out

    def samples(self) -> list[int]:
        """The properties with open domains, sorted."""
        return sorted(set().union(*(set(c.sample[m].tolist())
                                    for c, m in zip(self.chunks, self.live, strict=True))))

    def take(self, size: int, margin: Any, cap: Tensor | None = None) -> _Domains:
        """Remove and return the `size` domains with the lowest `margin(chunk)` `(D, S)` row,
        at most `cap[i]` `(n,)` of property i's."""
        keys = torch.cat([torch.where(m, margin(c).min(1).values, math.inf)
                          for c, m in zip(self.chunks, self.live, strict=True)])
        alive = torch.cat(self.live)
        order = torch.argsort(keys, stable=True)
        order = order[alive[order]]
        if cap is not None:
            sample = torch.cat([c.sample for c in self.chunks])[order].cpu()
            # each domain's rank among its property's, in this order
            ranked, perm = torch.sort(sample, stable=True)
            rank = torch.empty_like(sample)
            rank[perm] = torch.arange(len(sample)) - torch.searchsorted(ranked, ranked)
            order = order[(rank < cap[sample]).to(order.device)]
        order = order[:size]
        starts = [0]
        for c in self.chunks:
            starts.append(starts[-1] + len(c))
        parts = []
        for k, c in enumerate(self.chunks):
            mine = order[(order >= starts[k]) & (order < starts[k + 1])] - starts[k]
            if len(mine):
                parts.append(c.take(mine))
                self.live[k] = self.live[k].index_fill(0, mine, False)
        self._compact()
        return _Domains.cat(parts)

    def remove(self, sample: int) -> _Domains:
        """Remove and return every domain of property `sample`."""
        return _Domains.cat([c.take(mine.nonzero(as_tuple=True)[0])
                             for c, mine in self._release(sample)])

    def drop(self, sample: int) -> Tensor:
        """Remove every domain of property `sample` (it has some) and return only their
        bounds `(D, S)`: no copy of their relaxations and parameters (tens of thousands of
        domains' worth: 2 s on a digits CNN after 30 s of search)."""
        return torch.cat([c.bound[mine] for c, mine in self._release(sample)])

    def _release(self, sample: int) -> list[tuple[_Domains, Tensor]]:
        """Mark every domain of property `sample` gone; the chunks that held some, each with
        the mask of its domains of `sample` (the chunks stay valid after compaction)."""
        parts = []
        for k, c in enumerate(self.chunks):
            mine = self.live[k] & (c.sample == sample)
            if bool(mine.any()):
                parts.append((c, mine))
                self.live[k] = self.live[k] & ~mine
        self._compact()
        return parts

    def _compact(self) -> None:
        chunks, live = [], []
        for c, m in zip(self.chunks, self.live, strict=True):
            n = int(m.sum())
            if n == 0:
                continue
            if 2 * n < len(c):
                c, m = c.take(m.nonzero(as_tuple=True)[0]), torch.ones(n, dtype=torch.bool,
                                                                        device=m.device)
            chunks.append(c)
            live.append(m)
        self.chunks, self.live = chunks, live


def _nbytes(d: _Domains) -> int:
    tensors = [d.sample, d.x_lo, d.x_hi, d.rows, d.bound, d.depth, d.newest, d.layer, d.index,
               *d.lo, *d.hi, *d.split, *d.alpha, *d.beta]
    return sum(t.numel() * t.element_size() for t in tensors)


def _unflatten(flat: Tensor, ends: Tensor) -> tuple[Tensor, Tensor]:
    """Positions in the activation layers' neurons concatenated (`ends`: where each layer's
    neurons end) as `(layer, neuron)`."""
    layer = torch.bucketize(flat, ends, right=True)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    return layer, flat - starts[layer]


def _ids(t: Tensor) -> list[int]:
    """The distinct values of an integer tensor, sorted."""
    return sorted(set(t.tolist()))


def supports(model: nn.Module | Network, x: Tensor) -> bool:
    """Whether ``bab`` can bound `model` on inputs like `x` `(1, ...)`: a network the engine
    converts (chain or graph) whose activations are all ReLUs or LeakyReLUs (the splits are
    at their kink)."""
    from certify.bounds.network import to_network
    from certify.errors import CertifyError

    try:
        net = to_network(model, tuple(x.shape[1:]))
    except CertifyError:
        return False
    return unsplittable(net) is None


def unsplittable(net: Network) -> SpecError | None:
    """The one-line error for the first activation of `net` that bab cannot split, or None."""
    for pos in net.relu_positions:
        op = net.layers[pos]
        if not isinstance(op, SPLITS):
            return SpecError(f"bab splits ReLUs and LeakyReLUs only; layer {net.names[pos]!r} is "
                             f"a {type(op).__name__[:-2]}: use alpha-crown or lp for this network "
                             "(or milp if it is piecewise linear).")
    return None


class _AsModule(nn.Module):
    """A :class:`Network` as a module (what the attack takes)."""

    def __init__(self, net: Network) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward(x).flatten(1)


@register_method("bab")
@dataclass(frozen=True)
class BranchAndBound(MethodBase):
    """Branch and bound over ReLU splits with alpha/beta-CROWN bounds (see the module docstring).

    Options:
        threshold: Decide every row against this value, or against its own value (a tuple,
            one per specification row): the search stops once each property is proven above
            them or a point at or below one is found; None: tighten the lower bounds within
            the budgets.
        time_limit: Seconds per property (a batch's time is shared by its domains).
        max_domains: Most domains bounded per property.
        batch_size: Domains bounded per call; None: as many as the memory budget allows (at
            most :data:`MAX_BATCH`).
        root_steps: alpha-CROWN iterations at the root, where every layer's slopes are
            optimized (the intermediate bounds every domain starts from).
        steps: alpha/beta iterations per batch of domains (warm-started from the parents; on
            digits MLPs and CNNs more steps barely lower the number of domains, 5 instead of 10
            took 25-30 % less time per decided property).
        lr_alpha, lr_beta: Adam learning rates of the slopes and of the split multipliers
            (on hard digits properties, 0.2 for the multipliers splits the MLP into 26% and
            the CNN into 29% fewer domains than 0.05 did; 0.1 and 0.5 do worse than 0.2).
        branching: ``"relu"`` (BaBSR-style scores), ``"input"`` (halve the input box), or
            ``"auto"`` (input splits for inputs of at most :data:`INPUT_SPLIT_DIMS`
            coordinates, else ReLU splits).
        candidates: ReLU splits: each open domain bounds the children of its `candidates`
            best-scored neurons (one plain pass each, at the domain's slopes and
            multipliers, from the split's activation down) and splits the one whose
            children's bounds, each counted up to its target, sum highest (filtered smart
            branching); 1: the best score's neuron. On scn-16-32's hardest verify instance
            5 / 10 / 14 / 20 candidates need 133,761 / 101,711 / 92,549 / 84,737 domains;
            10 took 0.86x the time of 5 (14: 0.89x).
        recompute_intermediate: Re-bound the layers after a domain's newest ReLU split with its
            clamped relaxations: tighter per domain, but on digits MLPs and CNNs 30-40 % slower
            per decided property than leaving the splits to the multipliers (the default).
            Input splits always re-bound every layer (the box is new).
        attack_steps: PGD steps from the most promising domains' candidate points each round
            (0: only the corner candidates).
        gap: Without a threshold: a row is done once its bound is within `gap` of the best
            point's value.
        budget_reach: In a radius search (see :class:`SearchMemory`): a box between a proof
            that took at least this fraction of `time_limit` and a larger box whose search ran
            out of time ends as "unknown: beyond the time budget" after its root, instead of
            another search that would most likely spend the whole limit. None (the default):
            search every box. On 20 digits MLP points with a 3 s limit, 0.75 took 0.68x the
            CPU time (6.7 s per point instead of 9.7) for a 0.8% smaller mean radius, 0.9
            0.93x for 0.2% (measured before the search's step just below a near failure,
            which brought the default to 7.1 s per point).
        bracket_method: The incomplete method whose radius a radius search starts from (the
            bracket's lower end, see :func:`certify.radius.certified_radii`).
        float64: Bound in float64 whatever the input's dtype (the rigorous accounting of
            float32's rounding costs far more than the splits gain next to the threshold); the
            result is rounded outward to the input's dtype.
        float32_steps: With float64 bounds, run the plain passes of the children's
            optimization in float32 (the slopes and multipliers only shape the bound): 1.3x
            faster on digits MLPs and CNNs, with the same number of domains. The rigorous pass
            at the best ones then runs in float32 too, on the same float32 propagator (boxes,
            bounds and rows rounded outward: the plain passes' relaxations are an ulp wider),
            and in float64 only for the rows it leaves at or below their target while the
            optimization's plain bound is above it (float32's rounding terms in the way; 1.4%
            of the rows on scn-16-32's hardest verify instance, whose proof then bounds 10% more
            domains per second, the same 133,697 domains).
        memory_budget_mb: Working memory of one batch (autograd's included).
        pool_memory_mb: Most memory the open domains may hold between batches; past it, the
            property with the most open domains ends as unknown (its bound stays sound).
    """

    threshold: float | tuple[float, ...] | None = None
    time_limit: float = 60.0
    max_domains: int = 200_000
    batch_size: int | None = None
    root_steps: int = 20
    steps: int = 5
    lr_alpha: float = 0.1
    lr_beta: float = 0.2
    branching: str = "auto"
    candidates: int = 10
    recompute_intermediate: bool = False
    budget_reach: float | None = None
    attack_steps: int = 10
    gap: float = 1e-4
    bracket_method: str | None = "alpha-crown"
    float64: bool = True
    float32_steps: bool = True
    memory_budget_mb: float = 2048
    pool_memory_mb: float = 4096
    memory: SearchMemory | None = field(default=None, compare=False, repr=False, metadata=STATE)
    name: ClassVar[str] = "bab"
    display_name: ClassVar[str] = "BaB"
    is_complete: ClassVar[bool] = True
    decides_threshold: ClassVar[bool] = True
    accepts_time_budget: ClassVar[bool] = True
    serves_intermediate: ClassVar[bool] = False
    resumes_failures: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_options()
        values = (self.threshold if isinstance(self.threshold, tuple)
                  else () if self.threshold is None else (self.threshold,))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise SpecError(f"bab: threshold must be a finite number, one per row, or None, "
                            f"got {self.threshold!r}.")
        if self.budget_reach is not None and not (
                isinstance(self.budget_reach, (int, float)) and self.budget_reach > 0):
            raise SpecError(f"bab: budget_reach must be > 0 or None, got {self.budget_reach!r}.")
        for option in ("time_limit", "lr_alpha", "lr_beta", "gap", "pool_memory_mb"):
            value = getattr(self, option)
            if not (isinstance(value, (int, float)) and value > 0):
                raise SpecError(f"bab: {option} must be > 0, got {value!r}.")
        for option in ("root_steps", "steps", "attack_steps"):
            value = getattr(self, option)
            if not (isinstance(value, int) and value >= 0):
                raise SpecError(f"bab: {option} must be an int >= 0, got {value!r}.")
        if not (isinstance(self.candidates, int) and self.candidates >= 1):
            raise SpecError(f"bab: candidates must be an int >= 1, got {self.candidates!r}.")
        if not (isinstance(self.max_domains, int) and self.max_domains >= 1):
            raise SpecError(f"bab: max_domains must be an int >= 1, got {self.max_domains!r}.")
        if self.batch_size is not None and not (isinstance(self.batch_size, int)
                                                and self.batch_size >= 1):
            raise SpecError(f"bab: batch_size must be None or an int >= 1, got "
                            f"{self.batch_size!r}.")
        if self.branching not in BRANCHINGS:
            raise SpecError(f"bab: branching must be one of {', '.join(BRANCHINGS)}, got "
                            f"{self.branching!r}.")

    def bracket(self) -> str | None:
        """The incomplete method a radius search brackets from (see `bracket_method`)."""
        return self.bracket_method

    def searching(self) -> BranchAndBound:
        """This method with a fresh :class:`SearchMemory`: one radius search's evaluations
        reuse each other's split trees (see :class:`SearchMemory`)."""
        return replace(self, memory=SearchMemory())

    def intermediate(self, net: Network, x_lo: Tensor, x_hi: Tensor) -> tuple[Bounds, ...]:
        """The root's pre-activation bounds (CROWN's)."""
        prop = Propagator(net, x_lo, x_hi, EngineOptions(self.memory_budget_mb))
        prop.compute_intermediate("adaptive", linear=True)
        return prop.intermediate_bounds()

    def bound(self, net: Network, x_lo: Tensor, x_hi: Tensor, spec: Tensor | None = None, *,
              intermediate: tuple[Bounds, ...] | None = None) -> Bounds:
        """Bounds of `spec @ net(x)` over `[x_lo, x_hi]`, `(N, S)`, as a :class:`BabBounds`."""
        spec = identity_spec(net, x_lo) if spec is None else spec
        dtype = x_lo.dtype
        work = torch.float64 if self.float64 else dtype
        net = net.detach().to(dtype=work, device=x_lo.device)
        if intermediate is not None:
            intermediate = tuple(Bounds(b.lower.detach().to(work), b.upper.detach().to(work))
                                 for b in intermediate)
        with torch.no_grad():
            out = _Search(self, net, x_lo.detach().to(work), x_hi.detach().to(work),
                          spec.detach().to(work), intermediate, self.memory).run()
        if work == dtype:
            return out
        # the float64 bounds in the input's dtype, rounded outward
        return replace(out, lower=round_to(out.lower, dtype, up=False),
                       upper=round_to(out.upper, dtype, up=True),
                       points=out.points.to(dtype))


@dataclass
class _Live:
    """The children still optimized in a batch: their positions `index` in it, and their
    spec rows, constants and split signs."""

    index: Tensor
    rows: Tensor
    const: Tensor
    signs: list[Tensor]

    def take(self, keep: Tensor) -> _Live:
        return _Live(self.index[keep], self.rows[keep], self.const[keep],
                     [s[keep] for s in self.signs])


class _Search:
    """One branch-and-bound run over a batch of properties."""

    def __init__(self, method: BranchAndBound, net: Network, x_lo: Tensor, x_hi: Tensor,
                 spec: Tensor, intermediate: tuple[Bounds, ...] | None,
                 memory: SearchMemory | None = None) -> None:
        self.m = method
        self.memory = memory
        # the leaves proven so far per property (for the memory), None once too many
        self.proven: list[list[list[Tensor]] | None] = [[] for _ in range(int(x_lo.shape[0]))]
        self.net = net
        self.spec = spec
        self.x_lo, self.x_hi = x_lo, x_hi
        self.n = int(x_lo.shape[0])
        self.body, self.rows = spec_rows(net, spec)
        self.positions = self.body.relu_positions
        error = unsplittable(self.body)
        if error is not None:
            raise error
        self.shapes = [self.body.layers[p].in_shape for p in self.positions]
        # elements of the widest tensor one row passes through the body (sizes the batches)
        self.widest = max([numel(net.input_shape)] + [numel(op.out_shape)
                                                      for op in self.body.layers])
        self.body32: Network | None = None  # the body in float32 (see _rigorous_float32)
        self.net32: Network | None = None  # the network in float32 (_screened_values)
        self.rows32: SpecRows | None = None  # the spec rows in float32 (_float32_rows)
        # whether the children's optimization runs its plain passes in float32; then the
        # domains keep their slopes and multipliers (warm starts only) in float32 too, which
        # halves the open domains' memory
        self.float32_steps = method.float32_steps and x_lo.dtype == torch.float64
        self.param_dtype = torch.float32 if self.float32_steps else x_lo.dtype
        self.options = EngineOptions(method.memory_budget_mb)
        self.intermediate = intermediate
        self.s = int(spec.shape[1])
        self.threshold: Tensor | None = None
        if method.threshold is not None:
            self.threshold = torch.as_tensor(method.threshold, dtype=torch.float64,
                                             device=x_lo.device).expand(self.s)
        d_in = numel(net.input_shape)
        self.input_split = method.branching == "input" or (
            method.branching == "auto" and d_in <= INPUT_SPLIT_DIMS)
        dev = x_lo.device
        self.status: list[str | None] = [None] * self.n
        self.domains = torch.zeros(self.n, dtype=torch.int64)
        self.depth = torch.zeros(self.n, dtype=torch.int64)
        self.seconds = torch.zeros(self.n, dtype=torch.float64)
        # the best point per property and its worst row value (what is "at or below")
        self.points = torch.full_like(x_lo, math.nan)
        self.point_value = torch.full((self.n,), math.inf, dtype=torch.float64, device=dev)
        self.point_rows = torch.full((self.n, self.s), math.inf, dtype=torch.float64,
                                     device=dev)
        # smallest row bounds over the leaves that are done (proven, empty or closed)
        self.done_bound = torch.full((self.n, self.s), math.inf, dtype=x_lo.dtype, device=dev)
        self.perturbation: dict[int, Tensor] = {}
        self.upper = torch.full((self.n, self.s), math.inf, dtype=x_lo.dtype, device=dev)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> BabBounds:
        t0 = time.perf_counter()
        root = self._root()
        self.seconds += (time.perf_counter() - t0) / self.n
        pool = _Pool()
        self._settle(root, pool)
        if self.memory is not None:
            if self.threshold is not None and self.m.budget_reach is not None:
                for i in pool.samples():
                    if self.memory.beyond(self._key(i), self.x_lo[i], self.x_hi[i]):
                        self._end(pool, i, BEYOND_TIME)
            self._recall(pool)
        per_domain: float | None = None  # seconds per child domain in the last batch
        while len(pool):
            t0 = time.perf_counter()
            self._retire(pool)
            if not len(pool):
                break
            size = self._batch_size()
            cap = None
            if per_domain is not None:  # no batch runs far past a property's time limit:
                # each property bounds at most the children its time left pays for
                left = (self.m.time_limit - self.seconds).clamp(min=0)
                cap = (left / (2 * per_domain)).floor().clamp(min=1, max=size).long()
            # worst first: the domains most likely to hold a counterexample or to fail
            batch = pool.take(size, self._margin, cap)
            children = self._branch(batch)
            self._attack(children, self._bound(children, root=False))
            self._settle(children, pool)
            counts = torch.bincount(children.sample.cpu(), minlength=self.n)
            # the whole round counts, the pool's bookkeeping included
            spent = time.perf_counter() - t0
            per_domain = spent / len(children)
            self.seconds += spent * counts.double() / len(children)
            self.domains += counts
            depth = torch.zeros(self.n, dtype=torch.int64).scatter_reduce(
                0, children.sample.cpu(), children.depth.cpu(), "amax")
            self.depth = torch.maximum(self.depth, depth)
        if self.memory is not None:
            self._remember_proven()
        return self._result()

    def _retire(self, pool: _Pool) -> None:
        """End the properties decided or out of budget: their open domains leave the pool
        (their bounds still bound the rows)."""
        for i in pool.samples():
            reason = None
            if self.status[i] is not None:
                reason = self.status[i]
            elif self.seconds[i] >= self.m.time_limit:
                reason = TIME_SPENT
            elif int(self.domains[i]) >= self.m.max_domains:
                reason = DOMAINS_SPENT
            if reason is not None:
                self._end(pool, i, reason)
        budget = self.m.pool_memory_mb * MB
        while len(pool) and pool.nbytes > budget:  # the largest search gives way
            counts = pool.counts(self.n)
            self._end(pool, int(counts.argmax()), MEMORY_SPENT)

    def _end(self, pool: _Pool, i: int, reason: str) -> None:
        if self.status[i] is None:
            self.status[i] = reason
        if self.memory is None or reason not in (TIME_SPENT, DOMAINS_SPENT, MEMORY_SPENT):
            # nothing keeps the open leaves: only their bounds count
            bounds = pool.drop(i)
            self.done_bound[i] = torch.minimum(self.done_bound[i], bounds.min(0).values)
            return
        left = pool.remove(i)
        if reason == TIME_SPENT and self.threshold is not None:
            self.memory.timed_out.setdefault(self._key(i), []).append(
                _Entry(self.x_lo[i].clone(), self.x_hi[i].clone()))
        kept = self.proven[i]
        split, depth = [], None
        if kept:
            *split, depth = [torch.cat(ts) for ts in zip(*kept, strict=True)]
        elif kept is not None:
            depth = left.depth[:0]
        self.memory.store(self._key(i), _Entry(
            self.x_lo[i].clone(), self.x_hi[i].clone(), leaves=left,
            proven_bound=self.done_bound[i].clone(), split=split, depth=depth))
        self.done_bound[i] = torch.minimum(self.done_bound[i], left.bound.min(0).values)

    # --- reuse between evaluations (a radius search's SearchMemory) -----------------------------

    def _key(self, i: int) -> bytes:
        # the rows only: the threshold may differ between evaluations (a radius search raises
        # it by the model's rounding error over each box), see _recall
        return self.spec[i].cpu().numpy().tobytes()

    def _remember_proven(self) -> None:
        assert self.memory is not None
        if self.threshold is None:
            return
        reach = self.m.budget_reach
        for i in range(self.n):
            if (reach is not None and self.status[i] == ABOVE
                    and float(self.seconds[i]) >= reach * self.m.time_limit):
                self.memory.slow.setdefault(self._key(i), []).append(
                    _Entry(self.x_lo[i].clone(), self.x_hi[i].clone()))
            kept = self.proven[i]
            if self.status[i] == ABOVE and kept and not self.input_split:
                parts = [torch.cat(ts) for ts in zip(*kept, strict=True)]
                if len(parts[-1]) > 1:  # a proof at the root leaves nothing to reuse
                    self.memory.store(self._key(i), _Entry(
                        self.x_lo[i].clone(), self.x_hi[i].clone(), split=parts[:-1],
                        depth=parts[-1]))

    def _recall(self, pool: _Pool) -> None:
        """Replace the root of each open property by the leaves a remembered evaluation left:
        the open leaves of a failed one at a larger box (its proven leaves are proven here
        too), else the leaves of a proof at a smaller box (their splits only)."""
        assert self.memory is not None
        if self.threshold is None:  # only decisions carry over
            return
        starts = []
        for i in pool.samples():
            target = self._target(torch.tensor([i], device=self.x_lo.device))[0]
            entry = self.memory.recall(self._key(i), self.x_lo[i], self.x_hi[i], target)
            if entry is None:
                continue
            root = pool.remove(i)
            starts.append(self._restart(root, entry))
            if not entry.proof:
                # the failure's proven leaves are proven here too; with their splits, a proof
                # of this search covers the whole box (without them, it is not kept)
                assert entry.proven_bound is not None
                self.done_bound[i] = torch.minimum(self.done_bound[i], entry.proven_bound)
                self.proven[i] = (None if entry.depth is None else []
                                  if not len(entry.depth) else [[*entry.split, entry.depth]])
        if not starts:
            return
        every = _Domains.cat(starts)
        size = self._batch_size()
        for k in range(0, len(every), size):
            part = every.take(torch.arange(k, min(k + size, len(every)),
                                           device=every.sample.device))
            t0 = time.perf_counter()
            self._attack(part, self._bound(part, root=False))
            # the properties with leaves still to come are not decided by this part
            self._settle(part, pool, pending=set(_ids(every.sample[k + size:])))
            counts = torch.bincount(part.sample.cpu(), minlength=self.n)
            self.seconds += (time.perf_counter() - t0) * counts.double() / len(part)
            self.domains += counts

    def _restart(self, root: _Domains, entry: _Entry) -> _Domains:
        """The leaves of a remembered evaluation as domains of this one's property
        (`root`, its root domain): a failure's open leaves with their boxes intersected with
        this box and their pre-activation bounds with the root's (both hold on the failure's
        larger box, so here too), their row bounds and parameters kept; or a proof's leaves'
        splits on the root's bounds and parameters."""
        dev = root.sample.device
        leaves = entry.leaves
        split = entry.split if leaves is None else leaves.split
        depth = entry.depth if leaves is None else leaves.depth
        assert depth is not None
        d = len(depth)

        def expand(t: Tensor) -> Tensor:
            return t.expand(d, *t.shape[1:]).clone()

        x_lo, x_hi = expand(root.x_lo), expand(root.x_hi)
        bound = expand(root.bound)
        alpha, beta = [expand(a) for a in root.alpha], [expand(b) for b in root.beta]
        rows = expand(root.rows)
        lo, hi = [expand(t) for t in root.lo], [expand(t) for t in root.hi]
        if leaves is not None:
            x_lo, x_hi = torch.maximum(leaves.x_lo, x_lo), torch.minimum(leaves.x_hi, x_hi)
            lo = [torch.maximum(a, b) for a, b in zip(lo, leaves.lo, strict=True)]
            hi = [torch.minimum(a, b) for a, b in zip(hi, leaves.hi, strict=True)]
            bound = torch.maximum(bound, leaves.bound)
            alpha, beta = [a.clone() for a in leaves.alpha], [b.clone() for b in leaves.beta]
            rows = leaves.rows.clone()
        lo = [torch.where(sp > 0, t.clamp(min=0), t) for sp, t in zip(split, lo, strict=True)]
        hi = [torch.where(sp < 0, t.clamp(max=0), t) for sp, t in zip(split, hi, strict=True)]
        # an input-split leaf may not meet this box: empty (its bound says so)
        empty = (x_lo > x_hi).flatten(1).any(1)
        x_hi = torch.maximum(x_lo, x_hi)
        bound = torch.where(empty[:, None], math.inf, bound)
        return _Domains(
            torch.full((d,), int(root.sample[0]), dtype=torch.int64, device=dev), x_lo, x_hi,
            lo, hi, [t.clone() for t in split], alpha, beta, rows, bound, depth.clone(),
            torch.full((d,), len(self.positions), dtype=torch.int64, device=dev),
            torch.zeros(d, dtype=torch.int64, device=dev),
            torch.zeros(d, dtype=torch.int64, device=dev))

    def _margin(self, doms: _Domains) -> Tensor:
        """`(D, S)` each row's bound minus its target; rows done are +inf."""
        target = self._target(doms.sample)
        return torch.where(doms.bound > target, math.inf, doms.bound - target)

    def _target(self, sample: Tensor) -> Tensor:
        """`(D, S)` the value each row must exceed: the threshold, or the best point's value
        minus `gap` (bound mode)."""
        if self.threshold is not None:  # never below the threshold in the working dtype
            return round_to(self.threshold, self.x_lo.dtype, up=True).expand(sample.shape[0], -1)
        return (self.point_rows[sample] - self.m.gap).to(self.x_lo.dtype)

    def _settle(self, doms: _Domains, pool: _Pool, pending: set[int] | None = None) -> None:
        """Record the domains that are done (every row above its target) and add the rest to
        `pool`; decide the properties of `doms` left without open domains, in the pool or
        among the `pending` ones (still to be bounded)."""
        margin = self._margin(doms)
        done = torch.isinf(margin).all(1)
        for i in _ids(doms.sample[done]):
            mine = done & (doms.sample == i)
            self.done_bound[i] = torch.minimum(self.done_bound[i],
                                               doms.bound[mine].min(0).values)
            kept = self.proven[i]
            if self.memory is not None and self.threshold is not None and kept is not None:
                # the leaves' splits, the empty ones' too: empty on this box, they may hold
                # points of a larger one, which the leaves restart (together, the leaves of a
                # split tree cover every input)
                kept.append([t[mine] for t in doms.split] + [doms.depth[mine]])
                if sum(len(k[-1]) for k in kept) > REMEMBER_MAX:
                    self.proven[i] = None
        pool.add(doms, ~done)
        # a property is decided by its last open domain, not by its last one in this batch:
        # the pool may hold others (the batch takes the worst domains of all properties)
        still = set((pool.counts(self.n) > 0).nonzero(as_tuple=True)[0].tolist())
        still |= pending or set()
        for i in _ids(doms.sample):
            if i not in still and self.status[i] is None:
                self.status[i] = ABOVE if self.threshold is not None else GAP_CLOSED

    def _rows_per_pass(self) -> int:
        """Rows bounded by one pass of the filter: what the memory budget allows for a batch,
        and on the CPU at most :data:`PASS_BYTES` of the widest layer."""
        cap = self._batch_size() * max(1, min(self.s, 4))
        if self.x_lo.device.type != "cpu":
            return cap
        return max(1, min(cap, PASS_BYTES // (self.widest * self.param_dtype.itemsize)))

    def _batch_size(self) -> int:
        if self.m.batch_size is not None:
            return self.m.batch_size
        relus = sum(numel(s) for s in self.shapes)
        # per domain and row: the backward pass (with autograd), slopes, multipliers, Adam
        per_row = (BACKWARD_FACTOR * self.widest * 3 + 8 * relus) * self.x_lo.element_size()
        rows = max(1, int(self.m.memory_budget_mb * MB // per_row))
        return max(1, min(MAX_BATCH, rows // max(1, min(self.s, 4))))

    def _result(self) -> BabBounds:
        lower = self.done_bound.clone()
        status = tuple(s if s is not None else ABOVE for s in self.status)
        return BabBounds(lower, torch.maximum(self.upper, lower), status=status,
                         points=self.points, domains=self.domains, depth=self.depth,
                         seconds=self.seconds)

    # --- the root ----------------------------------------------------------------------------

    def _root(self) -> _Domains:
        n, dev, dtype = self.n, self.x_lo.device, self.x_lo.dtype
        prop = Propagator(self.body, self.x_lo, self.x_hi, self.options, spec=self.rows)
        if self.intermediate is None:
            prop.compute_intermediate("adaptive", linear=True)
            if self.m.root_steps and len(self.positions) > 1:
                # alpha-CROWN on every layer: fewer unstable neurons, fewer domains
                rows = self.rows.weight.reshape(n, self.s, *self.rows.in_shape)
                rows_err = (None if self.rows.weight_err is None
                            else self.rows.weight_err.reshape(rows.shape))
                _, optimized = optimized_intermediate(
                    AlphaCrown(steps=self.m.root_steps, lr=self.m.lr_alpha,
                               memory_budget_mb=self.m.memory_budget_mb),
                    prop, rows, self.rows.bias, rows_err, self.rows.bias_err)
                for p, (p_lo, p_hi) in optimized.items():
                    prop._store(p, p_lo, p_hi, "adaptive")
        else:
            prop.set_intermediate(self.intermediate, "adaptive")
        self.perturbation = dict(prop.perturbation)
        # the root's CROWN upper bounds (sound; BaB tightens only the lower ones)
        rows = self.rows.weight.reshape(n, self.s, *self.rows.in_shape)
        rows_err = (None if self.rows.weight_err is None
                    else self.rows.weight_err.reshape(rows.shape))
        _, upper = prop.backward_uniform(len(self.body.layers), rows, self.rows.bias, both=True,
                                         rows_err=rows_err, const_err=self.rows.bias_err)
        assert upper is not None
        self.upper = torch.where(prop.nonfinite[:, None], math.inf, upper)
        lo = [prop.pre_bounds[p][0].reshape(n, -1) for p in self.positions]
        hi = [prop.pre_bounds[p][1].reshape(n, -1) for p in self.positions]
        root = _Domains(
            torch.arange(n, device=dev), self.x_lo, self.x_hi, lo, hi,
            [torch.zeros(t.shape, dtype=torch.int8, device=dev) for t in lo],
            [activation_rule(self.body.layers[p]).optimizable(
                prop.relaxations[p], torch.arange(n, device=dev), self.s).reshape(n, self.s, -1)
             for p in self.positions],
            [torch.zeros(n, self.s, t.shape[1], dtype=dtype, device=dev) for t in lo],
            torch.arange(self.s, device=dev).repeat(n, 1),
            torch.full((n, self.s), -math.inf, dtype=dtype, device=dev),
            torch.zeros(n, dtype=torch.int64, device=dev),
            torch.full((n,), len(self.positions), dtype=torch.int64, device=dev),
            torch.zeros(n, dtype=torch.int64, device=dev),
            torch.zeros(n, dtype=torch.int64, device=dev))
        self.domains += 1
        self._attack(root, self._bound(root, root=True, prop=prop))
        return root

    # --- branching ---------------------------------------------------------------------------

    def _branch(self, doms: _Domains) -> _Domains:
        """Two children per domain, split on its chosen ReLU (or input coordinate)."""
        d = len(doms)
        every = torch.arange(d, device=doms.sample.device)
        # the left children (rows :d), then the right ones (d:), one copy of the parents
        out = _Domains.cat([doms, doms])
        layer, index = doms.layer, doms.index
        for k in range(len(self.positions)):
            mine = layer == k
            if bool(mine.any()):
                rows, nrn = every[mine], index[mine]
                out.split[k][rows, nrn] = 1
                out.split[k][rows + d, nrn] = -1
                out.lo[k][rows, nrn] = out.lo[k][rows, nrn].clamp(min=0)
                out.hi[k][rows + d, nrn] = out.hi[k][rows + d, nrn].clamp(max=0)
        inp = layer < 0
        if bool(inp.any()):
            rows, dim = every[inp], index[inp]
            lo_d = doms.x_lo.flatten(1)[rows, dim]
            hi_d = doms.x_hi.flatten(1)[rows, dim]
            # any cut point in [lo, hi] keeps the union of the halves the whole box
            mid = torch.maximum(torch.minimum((lo_d + hi_d) / 2, hi_d), lo_d)
            x_hi, x_lo = out.x_hi.flatten(1), out.x_lo.flatten(1)  # (views: out's own copy)
            x_hi[rows, dim] = mid
            x_lo[rows + d, dim] = mid
        out.depth = out.depth + 1
        out.newest = torch.cat([layer, layer])
        return out

    # --- bounding ----------------------------------------------------------------------------

    def _bound(self, doms: _Domains, *, root: bool, prop: Propagator | None = None) -> Tensor:
        """Bound `doms` in place: their intermediate bounds, row bounds, slopes, multipliers and
        their branching choice; returns each domain's candidate point."""
        d = len(doms)
        dev = doms.sample.device
        if prop is None:
            prop = Propagator(self.body, doms.x_lo, doms.x_hi, self.options)
            for pos, e in self.perturbation.items():
                prop.perturbation[pos] = e.index_select(0, doms.sample)
            empty = self._intermediate(prop, doms)
        else:
            empty = torch.zeros(d, dtype=torch.bool, device=dev)
        target = self._target(doms.sample)
        open_rows = (doms.bound <= target) & ~empty[:, None]
        r = max(1, int(open_rows.sum(1).max())) if d else 1
        order, valid = true_first(open_rows, r)  # (D, R): open rows first
        # the children's float32 propagator (see `float32_steps`): the optimization's passes
        # and the filter's children run on it
        narrow = (self._rigorous_float32(prop) if self.float32_steps and not root
                  and self.m.steps else None)
        new, record, consts, best_alpha, best_beta = self._optimize(
            prop, doms, order, valid, target, root=root, narrow=narrow)
        # each row keeps its best rigorous bound (a parent's holds for its children)
        full = torch.full_like(doms.bound, -math.inf).scatter(
            1, order, torch.where(valid, new, -math.inf))
        doms.bound = torch.maximum(doms.bound, full)
        doms.bound[empty] = math.inf  # an empty domain holds no point
        # the domains keep the parameters of their rows still open (as in `_margin`), which
        # were all open, so bounded: a subset of `order`'s rows, in the same (ascending) order
        still = ~(doms.bound > target)
        kept, held = true_first(still, max(1, int(still.sum(1).max())) if d else 1)  # (D, W)
        at = (order[:, None, :] == kept[:, :, None]).to(torch.uint8).argmax(2)  # (D, W)
        for k in range(len(self.positions)):
            index = at.unsqueeze(2).expand(-1, -1, best_alpha[k].shape[2])
            doms.alpha[k] = best_alpha[k].gather(1, index)
            doms.beta[k] = best_beta[k].gather(1, index)
        doms.rows = torch.where(held, kept, -1)
        point = self._candidates(doms, record, order, valid, new)
        doms.layer, doms.index = self._scores(prop, doms, record, consts, order, valid,
                                              valid & still.gather(1, order), new, target,
                                              prop if narrow is None else narrow)
        return point

    def _intermediate(self, prop: Propagator, doms: _Domains) -> Tensor:
        """Set `prop`'s relaxations from the domains' bounds, re-bounding the layers after each
        domain's newest split (every layer after an input split: its box is new; after a ReLU
        split with ``recompute_intermediate``); returns `(D,)` True for empty domains."""
        d = len(doms)
        empty = torch.zeros(d, dtype=torch.bool, device=doms.sample.device)
        again = doms.newest < 0 if not self.m.recompute_intermediate else torch.ones_like(empty)
        for k, pos in enumerate(self.positions):
            lo, hi = doms.lo[k], doms.hi[k]
            if bool(again.any()):
                mask = ((lo < 0) & (hi > 0) & ((doms.newest < k) & again & ~empty)[:, None])
                if bool(mask.any()):
                    sample, neuron, lin_lo, lin_hi = prop.backward_neurons(
                        pos, mask.view(d, *self.shapes[k]))
                    e = prop.perturbation.get(pos)
                    if e is not None:  # the model's own rounding widens its pre-activations
                        e_flat = e.reshape(d, -1)[sample, neuron]
                        lin_lo = rounding.down(lin_lo - e_flat)
                        lin_hi = rounding.up(lin_hi + e_flat)
                    lo = lo.index_put((sample, neuron), torch.maximum(lo[sample, neuron], lin_lo))
                    hi = hi.index_put((sample, neuron), torch.minimum(hi[sample, neuron], lin_hi))
            split = doms.split[k]
            lo = torch.where(split > 0, lo.clamp(min=0), lo)
            hi = torch.where(split < 0, hi.clamp(max=0), hi)
            empty |= (~(lo <= hi)).any(1)  # crossed, or NaN
            # an empty domain is dropped; give it harmless bounds for the rest of the batch
            lo = torch.where(empty[:, None], 0.0, lo)
            hi = torch.where(empty[:, None], 0.0, hi)
            doms.lo[k], doms.hi[k] = lo, hi
            prop._store(pos, lo.view(d, *self.shapes[k]), hi.view(d, *self.shapes[k]),
                        "adaptive")
        return empty

    def _optimize(self, prop: Propagator, doms: _Domains, order: Tensor, valid: Tensor,
                  target: Tensor, *, root: bool, narrow: Propagator | None = None
                  ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor] | None,
                             list[Tensor], list[Tensor]]:
        """Optimize slopes and multipliers of the open rows, then the rigorous bound at the
        best ones (`target` `(D, S)`: each row's target); returns `(bound (D, R), record,
        consts, alphas, betas)`, rows `(D, R, ...)` as `order`: the rigorous pass's record and
        its constants at each activation (None: a DAG's) as ``backward_chunk`` fills them.

        The passes bound only the open rows, each a block of one row: a batch's domains have
        from 1 to `R` open rows (domains of different properties, their rows decided at
        different depths), and `(D, R)` blocks would bound every domain's padding too (on a
        batched digits MLP radius search, half the rows were padding). A domain without an
        open row bounds its first (zero) row, so that each has its record. `narrow`: the
        children's float32 propagator (:meth:`_rigorous_float32`), or None."""
        d, r = order.shape
        dev = order.device
        use = valid | ((~valid.any(1))[:, None] & (torch.arange(r, device=dev) == 0)[None, :])
        dom, slot = use.nonzero(as_tuple=True)  # the (domain, row) pairs, (P,) each
        p = int(dom.shape[0])
        row = order[dom, slot]  # each pair's spec row
        pvalid = valid[dom, slot][:, None]  # (P, 1)
        rows, const, rows_err, const_err = self._rows(doms.sample.index_select(0, dom),
                                                      row[:, None], pvalid)
        signs = []
        for k, pos in enumerate(self.positions):
            relax = prop.relaxations[pos]
            split = doms.split[k]
            lo, hi = relax.pre_lower.reshape(d, -1), relax.pre_upper.reshape(d, -1)
            # only split neurons whose clamped bounds are stable carry a multiplier
            s = torch.where((split > 0) & (lo >= 0), 1.0, 0.0) - torch.where(
                (split < 0) & (hi <= 0), 1.0, 0.0)
            signs.append(s.to(rows.dtype).index_select(0, dom).unsqueeze(1))
        steps = self.m.root_steps if root else self.m.steps
        has_split = any(bool((s != 0).any()) for s in signs)
        has_free = any(bool(prop.relaxations[q].unstable.any()) for q in self.positions)
        # the children's optimization runs its plain passes in float32 on `narrow` (see
        # `float32_steps`; its outward-rounded bounds widen their relaxations by an ulp), and
        # its rigorous pass too; the root's runs in float64, as alpha-CROWN's, so that bab's
        # bound is never below alpha-CROWN's (every child keeps its parent's bound)
        if not (steps and (has_free or has_split)):
            narrow = None
        # the plain passes' propagator and inputs, cast once
        plain = (prop, rows, const, signs) if narrow is None else (
            narrow, rows.float(), const.float(), [s.float() for s in signs])
        work = plain[1].dtype
        kept = doms.slot(dom, row)  # (where each pair's row keeps its parameters)
        alphas = [a[dom, kept].unsqueeze(1).to(work) for a in doms.alpha]
        betas = [b[dom, kept].unsqueeze(1).to(work) for b in doms.beta]
        params: list[Tensor] = []
        if has_free:
            params += alphas
        if has_split:
            params += betas
        best = torch.full((p, 1), -math.inf, dtype=work, device=dev)
        best_alpha = {k: a.detach().clone() for k, a in enumerate(alphas)}
        best_beta = {k: b.detach().clone() for k, b in enumerate(betas)}

        def pass_(al: list[Tensor], be: list[Tensor], live: _Live) -> Tensor:
            return self._pass(plain[0], dom.index_select(0, live.index), live.rows,
                              live.const, None, None, live.signs, al, be, has_split,
                              rigorous=False)

        if params and steps:
            # A row whose plain bound is above its target leaves the optimization; the
            # rigorous pass at its best parameters decides it. (At the root every row keeps
            # its steps: bab's bound is never below alpha-CROWN's.)
            goal = torch.where(pvalid, target[dom, row][:, None].to(work),
                               -math.inf)
            live = _Live(torch.arange(p, device=dev), plain[1], plain[2], plain[3])
            for q in params:
                q.requires_grad_(True)
            state = [(torch.zeros_like(q), torch.zeros_like(q)) for q in params]
            # (learning rate, upper end of the projection): slopes in [0, 1], multipliers >= 0
            rates = ([(self.m.lr_alpha, 1.0)] * len(alphas) if has_free else []) + (
                [(self.m.lr_beta, None)] * len(betas) if has_split else [])
            for step in range(steps + 1):
                with torch.set_grad_enabled(step < steps):  # the last pass only evaluates
                    lower = pass_(alphas, betas, live)
                    ok = pvalid.index_select(0, live.index)
                    value = torch.where(ok, lower.detach(), -math.inf)
                    # each row keeps its best iterate: only the rows this step improved are
                    # copied (on the CPU, most rows of a batch improve at most a few times)
                    better = (value > best.index_select(0, live.index))[:, 0]
                    if bool(better.any()):
                        up = better.nonzero(as_tuple=True)[0]
                        at = live.index.index_select(0, up)
                        best.index_copy_(0, at, value.index_select(0, up))
                        for k, a in enumerate(alphas):
                            best_alpha[k].index_copy_(0, at, a.detach().index_select(0, up))
                        for k, b in enumerate(betas):
                            best_beta[k].index_copy_(0, at, b.detach().index_select(0, up))
                    if step == steps:
                        break
                    grads = torch.autograd.grad(torch.where(ok, lower, 0.0).sum(), params)
                with torch.no_grad():
                    for q, g, (m, v), (lr, top) in zip(params, grads, state, rates, strict=True):
                        adam_ascent(q, g, m, v, step + 1, lr, upper=top)
                    if root:
                        continue
                    done = ((best[live.index] > goal[live.index]) | ~pvalid[live.index])[:, 0]
                    if bool(done.all()):
                        break
                    if not bool(done.any()):
                        continue
                    keep = (~done).nonzero(as_tuple=True)[0]
                    live = live.take(keep)
                    alphas = [a.detach()[keep] for a in alphas]
                    betas = [b.detach()[keep] for b in betas]
                    params = (alphas if has_free else []) + (betas if has_split else [])
                    for q in params:
                        q.requires_grad_(True)
                    state = [(m[keep], v[keep]) for m, v in state]
        pair_record: dict[int, Tensor] = {}
        # (on a chain, the rows' constants at each activation too: the filter's children
        # finish the pass from their split's activation, see _filter)
        pair_const: dict[int, Tensor] | None = {} if self.body.is_chain else None
        alpha_rows = [best_alpha[k] for k in range(len(alphas))]
        beta_rows = [best_beta[k] for k in range(len(betas))]
        # the children's rigorous pass runs in float32 first (see `float32_steps`); a row it
        # leaves at or below its target although the optimization's plain bound is above it
        # (float32's rounding terms are in the way) is bounded again in float64
        if narrow is None:
            lower = self._pass(prop, dom, rows, const, rows_err, const_err, signs,
                               alpha_rows, beta_rows, has_split, record=pair_record,
                               record_const=pair_const)
        else:
            lower = self._pass(narrow, dom, *self._rows(
                doms.sample.index_select(0, dom), row[:, None], pvalid, self._float32_rows()),
                [s.float() for s in signs], alpha_rows, beta_rows, has_split,
                record=pair_record, record_const=pair_const).double()
            goal64 = target[dom, row][:, None].to(lower.dtype)
            retry = (pvalid & (lower <= goal64) & (best.to(lower.dtype) > goal64))[:, 0]
            if bool(retry.any()):
                # on a propagator of their domains only: its rounding weights are per domain
                at = retry.nonzero(as_tuple=True)[0]
                few, local = torch.unique(dom.index_select(0, at), return_inverse=True)
                wide = self._pass(self._domains_of(prop, few), local, rows[at], const[at],
                                  None if rows_err is None else rows_err[at],
                                  None if const_err is None else const_err[at],
                                  [s[at] for s in signs], [a[at] for a in alpha_rows],
                                  [b[at] for b in beta_rows], has_split)
                lower[at] = torch.maximum(lower[at], wide)  # both sound

        def spread(t: Tensor, fill: float) -> Tensor:
            """`(P, 1, ...)` per pair to `(D, R, ...)` per domain and row of `order`."""
            out = t.new_full((d, r, *t.shape[2:]), fill)
            out[dom, slot] = t[:, 0]
            return out

        record = {key: spread(t, 0.0) for key, t in pair_record.items()}
        consts = (None if pair_const is None
                  else {key: spread(t, 0.0) for key, t in pair_const.items()})
        return (spread(lower, -math.inf), record, consts,
                [spread(a, 0.0).to(self.param_dtype) for a in alpha_rows],
                [spread(b.clamp(min=0), 0.0).to(self.param_dtype) for b in beta_rows])

    def _pass(self, on: Propagator, blocks: Tensor, rows: Tensor, const: Tensor,
              rows_err: Tensor | None, const_err: Tensor | None, signs: list[Tensor],
              alphas: list[Tensor], betas: list[Tensor], has_split: bool, *,
              rigorous: bool = True, record: dict[int, Tensor] | None = None,
              record_const: dict[int, Tensor] | None = None) -> Tensor:
        """The bound `(P, 1)` of the one-row blocks `rows` `(P, 1, ...)` of the domains
        `blocks` `(P,)` of `on` at the slopes `alphas` and multipliers `betas` (`signs`: the
        split signs per layer, `(P, 1, n_k)`), in `rows`' dtype. Rigorous: -inf where it is
        not finite; plain: as computed (differentiable in the parameters)."""
        dtype = rows.dtype  # (the parameters are cast for a float64 pass)
        b = int(blocks.shape[0])
        a_map = {q: alphas[k].to(dtype).view(b, 1, *self.shapes[k])
                 for k, q in enumerate(self.positions)}
        b_map = ({q: (-(betas[k].to(dtype).clamp(min=0) * signs[k])).view(
            b, 1, *self.shapes[k]) for k, q in enumerate(self.positions)}
            if has_split else None)
        lower, _ = on.backward_chunk(
            len(self.body.layers), rows, const, blocks, both=False, alphas=a_map, betas=b_map,
            rigorous=rigorous, rows_err=rows_err, const_err=const_err, record=record,
            record_const=record_const)
        if not rigorous:
            return lower
        return torch.where(on.nonfinite.index_select(0, blocks)[:, None] | torch.isnan(lower),
                           -math.inf, lower)

    def _carried(self, prop: Propagator, body: Network, down: Callable[[Tensor], Tensor],
                 up: Callable[[Tensor], Tensor]) -> Propagator:
        """A propagator of `body` over the domains of `prop`: every lower end (boxes,
        pre-activation bounds) mapped by `down`, every upper end and the model's rounding by
        `up`, relaxed "adaptive" (as :meth:`_intermediate` relaxes the children)."""
        out = Propagator(body, down(prop.x_lo), up(prop.x_hi), self.options)
        for pos in self.positions:
            lo, hi = prop.pre_bounds[pos]
            out._store(pos, down(lo), up(hi), "adaptive")
        for pos, e in prop.perturbation.items():
            out.perturbation[pos] = up(e)
        return out

    def _domains_of(self, prop: Propagator, few: Tensor) -> Propagator:
        """A propagator of the children `few` of `prop`."""
        def pick(t: Tensor) -> Tensor:
            return t.index_select(0, few)

        return self._carried(prop, self.body, pick, pick)

    def _rigorous_float32(self, prop: Propagator) -> Propagator | None:
        """A rigorous float32 propagator over `prop`'s children: the float32 body (its
        rounding in the ops' error fields), the boxes, pre-activation bounds and the model's
        rounding rounded outward (never to a subnormal). Its bounds hold wherever `prop`'s
        relaxations hold; None where a bound overflows float32."""
        narrow = self._carried(prop, self._float32_body(), lambda t: _float32(t, up=False),
                               lambda t: _float32(t, up=True))
        return None if bool(narrow.nonfinite.any()) else narrow

    def _float32_rows(self) -> SpecRows:
        """The spec rows in float32 (built once): their rounding in the error fields."""
        if self.rows32 is None:
            self.rows32 = cast_op(self.rows, torch.float32, self.x_lo.device)
        return self.rows32

    def _float32_body(self) -> Network:
        """The body in float32 (built once)."""
        if self.body32 is None:
            self.body32 = self.body.to(dtype=torch.float32, device=self.x_lo.device)
        return self.body32

    def _rows(self, sample: Tensor, order: Tensor, valid: Tensor, spec: SpecRows | None = None
              ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The spec rows `order` `(D, R)` of each domain's property (zero where not valid),
        from `spec` (default: the search's)."""
        d, r = order.shape
        spec = self.rows if spec is None else spec
        at = (sample[:, None], order)  # (only the rows wanted are copied)
        keep = valid.unsqueeze(2)
        rows = torch.where(keep, spec.weight[at], 0.0).reshape(d, r, *spec.in_shape)
        const = torch.where(valid, spec.bias[at], 0.0)
        rows_err = const_err = None
        if spec.weight_err is not None:
            rows_err = torch.where(keep, spec.weight_err[at], 0.0).reshape(rows.shape)
        if spec.bias_err is not None:
            const_err = torch.where(valid, spec.bias_err[at], 0.0)
        return rows, const, rows_err, const_err

    def _scores(self, prop: Propagator, doms: _Domains, record: dict[int, Tensor],
                consts: dict[int, Tensor] | None, order: Tensor, valid: Tensor, still: Tensor,
                new: Tensor, target: Tensor, relaxed: Propagator) -> tuple[Tensor, Tensor]:
        """The branching choice `(layer, index)` per domain (see the module docstring);
        `relaxed`: `prop` or its float32 twin, whose relaxations the filter's children take."""
        d = len(doms)
        dev = new.device
        # (D,) the row to split for: the open row (`still` `(D, R)`, as `order`) with the
        # lowest bound against its target (rows may have different targets: a row this batch
        # decided is not split for)
        rise = new - target.gather(1, order)
        worst = torch.where(still.any(1), torch.where(still, rise, math.inf).argmin(1),
                            torch.where(valid, new, math.inf).argmin(1))
        pick = torch.arange(d, device=dev)
        layer = torch.full((d,), -1, dtype=torch.int64, device=dev)
        index = torch.zeros(d, dtype=torch.int64, device=dev)
        if not self.input_split:
            scores = []
            for k, pos in enumerate(self.positions):
                mu = record[pos][pick, worst].reshape(d, -1)
                relax = prop.relaxations[pos]
                free = relax.unstable.reshape(d, -1) & (doms.split[k] == 0)
                lo, hi = relax.pre_lower.reshape(d, -1), relax.pre_upper.reshape(d, -1)
                # what the chord's intercept costs the row (a row on the lower line pays none
                # at the neuron), ties broken by the row's weight times the smaller side
                intercept = (-mu).clamp(min=0) * relax.upper_bias.reshape(d, -1)
                tie = mu.abs() * torch.minimum(-lo, hi).clamp(min=0)
                scores.append(torch.where(free, intercept + TIE_BREAK * tie, -1.0))
            score = torch.cat(scores, 1)
            top, arg = score.max(1)
            ends = torch.tensor([s.shape[1] for s in scores], device=dev).cumsum(0)
            chosen = top > 0
            best_layer, best_index = _unflatten(arg, ends)
            layer = torch.where(chosen, best_layer, layer)
            index = torch.where(chosen, best_index, index)
            if self.m.candidates > 1:
                # the worst row's rows and constants at each activation, where its pass
                # reached them (a chain's)
                above = None if consts is None else {
                    pos: (record[pos][pick, worst], consts[pos][pick, worst])
                    for pos in self.positions}
                self._filter(relaxed, doms, score, ends, order[pick, worst], target, layer,
                             index, above)
        inp = layer < 0
        if bool(inp.any()):  # input splits: the widest coordinate weighted by its row
            a = record[-1][pick, worst].reshape(d, -1)
            width = (doms.x_hi - doms.x_lo).reshape(d, -1)
            # (a floor on the weight keeps every coordinate shrinking: the row's own
            # coefficient can be 0 where the relaxations' gaps still depend on it)
            weight = a.abs() + 0.25 * a.abs().mean(1, keepdim=True) + 1e-30
            index = torch.where(inp, (weight * width).argmax(1), index)
        return layer, index

    def _filter(self, bounded: Propagator, doms: _Domains, score: Tensor, ends: Tensor,
                row: Tensor, target: Tensor, layer: Tensor, index: Tensor,
                above: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        """Filtered smart branching (De Palma et al., "Improved Branch and Bound for Neural
        Network Verification via Lagrangian Decomposition", 2021): among each open domain's
        `candidates` best-scored neurons, the one whose two children bound the domain's worst
        row `row` `(D,)` highest, their bounds summed, each counted up to the row's target
        (a child above it is done however far above); each child is bounded by one plain
        pass at the domain's slopes and multipliers. Updates `layer` and `index` in place
        (a heuristic: any choice is sound).

        `above`: per activation position, the rows `(D, *shape)` and constants `(D,)` of
        `row` where the domain's own pass reached that activation's output (a chain's). A
        child's relaxations are its parent's but at its split neuron, so its pass above the
        split's activation is the parent's: it starts there, from those rows (on scn-16-32's
        hardest verify instance the passes then skip about a third of the work)."""
        open_ = ((doms.bound <= target).any(1) & (layer >= 0)).nonzero(as_tuple=True)[0]
        o = int(open_.shape[0])
        k = min(self.m.candidates, int(score.shape[1]))
        if o == 0 or k < 2:
            return
        top, arg = score.index_select(0, open_).topk(k, dim=1)  # (O, k)
        lay, nrn = _unflatten(arg, ends)  # (O, k) each
        work = torch.float32 if self.float32_steps else self.x_lo.dtype
        body = self._float32_body() if self.float32_steps else self.body
        rsel = row.index_select(0, open_)  # (O,) each open domain's worst row
        samples = doms.sample.index_select(0, open_)
        rows, const, _, _ = self._rows(samples, rsel[:, None],
                                       torch.ones(o, 1, dtype=torch.bool, device=row.device))
        alphas, betas = [], []
        slot = doms.slot(open_, rsel)
        for k_ in range(len(self.positions)):
            split = doms.split[k_].index_select(0, open_)
            sign = (split > 0).to(work) - (split < 0).to(work)
            alphas.append(doms.alpha[k_][open_, slot].to(work))
            betas.append(-(doms.beta[k_][open_, slot].to(work).clamp(min=0) * sign))
        goal = target[open_, rsel].to(work)
        value = torch.full((o, k), -math.inf, dtype=work, device=row.device)
        # the (domain, candidate) pairs bounded: free neurons only (a positive score)
        pair_dom, pair_c = (top > 0).nonzero(as_tuple=True)
        # pairs per call: two children each, one row each, no autograd
        per_call = max(1, self._rows_per_pass() // 2)
        for first in range(0, int(pair_dom.shape[0]), per_call):
            pd, pc = pair_dom[first:first + per_call], pair_c[first:first + per_call]
            q = int(pd.shape[0])
            # the pairs by layer; each layer's children are one block of the batch, its
            # pairs' left children (z >= 0) then their right ones (z <= 0): a pass over one
            # layer's children reads a range of the relaxations (no copy, see `rows_of`)
            by = torch.argsort(lay[pd, pc], stable=True)
            pd, pc = pd.index_select(0, by), pc.index_select(0, by)
            lay_q, nrn_q = lay[pd, pc], nrn[pd, pc]
            sizes = torch.bincount(lay_q, minlength=len(self.positions))
            starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])  # per layer, in pairs
            left_of = starts[:-1].index_select(0, lay_q) + torch.arange(q, device=row.device)
            right_of = left_of + sizes.index_select(0, lay_q)
            m = 2 * q
            parent = torch.empty(m, dtype=pd.dtype, device=row.device)
            parent[left_of], parent[right_of] = pd, pd
            src = open_.index_select(0, parent)
            prop = Propagator(body, doms.x_lo.index_select(0, src).to(work),
                              doms.x_hi.index_select(0, src).to(work), self.options)
            edges = starts.tolist()
            for k_, pos in enumerate(self.positions):
                mine = slice(edges[k_], edges[k_ + 1])
                # (with `above`, only the children split at this layer or above pass it)
                relax = self._children(bounded.relaxations[pos], pos, src, left_of[mine],
                                       right_of[mine], nrn_q[mine].repeat(2), work,
                                       first=0 if above is None else 2 * edges[k_])
                prop.relaxations[pos] = relax
                prop.pre_bounds[pos] = (relax.pre_lower, relax.pre_upper)
            for pos, e in self.perturbation.items():
                prop.perturbation[pos] = e.index_select(
                    0, samples.index_select(0, parent)).to(work)
            if above is None:  # every child's pass from the rows of `row`
                lower = self._child_pass(prop, torch.arange(m, device=row.device), parent,
                                         len(self.body.layers),
                                         rows.index_select(0, parent).to(work),
                                         const.index_select(0, parent).to(work), alphas, betas)
            else:  # each layer's children from the rows at their split's activation
                lower = torch.empty(m, 1, dtype=work, device=row.device)
                for k_, pos in enumerate(self.positions):
                    lo_k, hi_k = 2 * edges[k_], 2 * edges[k_ + 1]
                    if lo_k == hi_k:
                        continue
                    mother = parent[lo_k:hi_k]
                    at = open_.index_select(0, mother)
                    mu, c = above[pos]
                    lower[lo_k:hi_k] = self._child_pass(
                        prop, torch.arange(lo_k, hi_k, device=row.device), mother, pos + 1,
                        mu.index_select(0, at).unsqueeze(1).to(work),
                        c.index_select(0, at).unsqueeze(1).to(work), alphas, betas)
            # each child's bound counts up to its target: past it, the child is done
            lower = torch.minimum(lower[:, 0], goal.index_select(0, parent))
            pair_value = lower.index_select(0, left_of) + lower.index_select(0, right_of)
            value[pd, pc] = torch.where(torch.isnan(pair_value), -math.inf, pair_value)
        best = value.argmax(1)
        good = torch.isfinite(value.gather(1, best[:, None]))[:, 0]
        at = open_[good]
        layer[at] = lay[good, best[good]]
        index[at] = nrn[good, best[good]]

    def _child_pass(self, prop: Propagator, kids: Tensor, parent: Tensor, start: int,
                    rows: Tensor, const: Tensor, alphas: list[Tensor], betas: list[Tensor]
                    ) -> Tensor:
        """The plain bound `(K, 1)` of the filter's children `kids` `(K,)` of `prop`, of
        their rows `(K, 1, ...)` and constants `(K, 1)` on the output of
        ``layers[start - 1]``, at their open parents' `parent` `(K,)` slopes and signed
        multipliers (`alphas`, `betas`: per layer, a row per open parent)."""
        k = int(kids.shape[0])
        a_map = {p: alphas[j].index_select(0, parent).view(k, 1, *self.shapes[j])
                 for j, p in enumerate(self.positions) if p < start}
        b_map = {p: betas[j].index_select(0, parent).view(k, 1, *self.shapes[j])
                 for j, p in enumerate(self.positions) if p < start}
        lower, _ = prop.backward_chunk(start, rows, const, kids, both=False, alphas=a_map,
                                       betas=b_map, rigorous=False)
        return lower

    def _children(self, relax: Relaxation, pos: int, src: Tensor, left: Tensor, right: Tensor,
                  neuron: Tensor, work: torch.dtype, first: int = 0) -> Relaxation:
        """The relaxation of activation `pos` in children of the domains `src` `(M,)` (rows
        of `relax`): the parents' own, but for the neuron of each child in `left` (``z >= 0``)
        and in `right` (``z <= 0``), relaxed again on its clamped bounds (`neuron`: the left
        children's neurons, then the right ones'); the children before `first` get zeros
        (no pass of theirs reads this layer)."""
        shape = relax.lower.shape[1:]
        m = int(src.shape[0])

        def rows(t: Tensor) -> Tensor:
            t = t.reshape(t.shape[0], -1)
            t = t.to(work) if t.is_floating_point() else t
            if not first:
                return t.index_select(0, src)
            out = t.new_zeros(m, t.shape[1])
            torch.index_select(t, 0, src[first:], out=out[first:])
            return out

        lower, upper, bias = rows(relax.lower), rows(relax.upper), rows(relax.upper_bias)
        unstable, pre_lo, pre_hi = rows(relax.unstable), rows(relax.pre_lower), rows(
            relax.pre_upper)
        at = torch.cat([left, right])
        n_left = int(left.shape[0])
        lo, hi = pre_lo[at, neuron], pre_hi[at, neuron]
        lo = torch.cat([lo[:n_left].clamp(min=0), lo[n_left:]])
        hi = torch.cat([hi[:n_left], hi[n_left:].clamp(max=0)])
        # (ReLU and LeakyReLU: lower lines through 0, no per-neuron data)
        small = activation_rule(self.body.layers[pos]).relax(lo[:, None], hi[:, None],
                                                             "adaptive")
        for full, part in ((lower, small.lower), (upper, small.upper),
                           (bias, small.upper_bias), (unstable, small.unstable),
                           (pre_lo, lo[:, None]), (pre_hi, hi[:, None])):
            full[at, neuron] = part[:, 0].to(full.dtype)
        return Relaxation(*(t.view(m, *shape) for t in (lower, upper, bias, unstable, pre_lo,
                                                         pre_hi)))

    def _candidates(self, doms: _Domains, record: dict[int, Tensor], order: Tensor,
                    valid: Tensor, new: Tensor) -> Tensor:
        """Per domain, the corner of its box minimizing its worst row's linear bound."""
        d = len(doms)
        worst = torch.where(valid, new, math.inf).argmin(1)
        a = record[-1][torch.arange(d, device=order.device), worst].reshape(doms.x_lo.shape)
        return torch.where(a >= 0, doms.x_lo, doms.x_hi)

    # --- counterexamples ---------------------------------------------------------------------

    def _values(self, x: Tensor, sample: Tensor, net: Network | None = None) -> Tensor:
        """`(D, S)` the spec rows evaluated at points `x` (floating point, float64 result), by
        `net` (default: the search's) in `x`'s dtype."""
        out = (self.net if net is None else net).forward(x).flatten(1)
        spec = self.spec.index_select(0, sample).to(out.dtype)
        return torch.bmm(spec, out.unsqueeze(2)).squeeze(2).double()

    def _screened_values(self, x: Tensor, sample: Tensor) -> Tensor:
        """:meth:`_values` of the points that may change what :meth:`_consider` keeps, +inf for
        the others: float64 points are first evaluated in float32 (2-3x cheaper on CPU
        convolutions), and only those with a row within :data:`SCREEN_SLACK` (relative) of
        the threshold or of its row's best value so far are evaluated again as they are. (A
        screen only: far more slack than float32's rounding of such nets' outputs, and the
        points never decide a proof.)"""
        if x.dtype != torch.float64 or x.shape[0] < SCREEN_MIN:
            return self._values(x, sample)
        if self.net32 is None:
            self.net32 = self.net.to(dtype=torch.float32, device=x.device)
        rough = self._values(x.float(), sample, self.net32)
        bar = self.point_rows.index_select(0, sample)
        if self.threshold is not None:
            bar = torch.maximum(bar, self.threshold)
        near = ((rough <= bar + SCREEN_SLACK * (1 + rough.abs()))
                | ~torch.isfinite(rough)).any(1)
        values = torch.full_like(rough, math.inf)
        at = near.nonzero(as_tuple=True)[0]
        if at.numel():
            values[at] = self._values(x.index_select(0, at), sample.index_select(0, at))
        return values

    def _attack(self, doms: _Domains, x: Tensor) -> None:
        """Evaluate the domains' candidate points `x`, improve the most promising with PGD, and
        end the properties where a point is at or below the threshold."""
        if not len(doms):
            return
        self._consider(x, doms.sample)
        if self.m.attack_steps and self.threshold is not None:
            # one start per undecided property: its domain with the lowest bound
            undecided = torch.tensor([self.status[i] is None for i in doms.sample.tolist()],
                                     dtype=torch.bool, device=x.device)
            if not bool(undecided.any()):
                return
            worst = doms.bound.min(1).values
            worst = torch.where(undecided, worst, math.inf)
            firsts = []
            for i in _ids(doms.sample[undecided]):
                mine = (doms.sample == i).nonzero(as_tuple=True)[0]
                firsts.append(int(mine[worst[mine].argmin()]))
            pick = torch.tensor(firsts, device=x.device)
            self._descend(x[pick], doms.sample[pick])

    def _descend(self, start: Tensor, sample: Tensor) -> None:
        from certify.attacks import pgd
        from certify.spec import Box

        spec = self.spec.index_select(0, sample)
        threshold = (self.threshold if self.threshold is not None
                     else torch.full((self.s,), -math.inf, dtype=torch.float64))

        def rows(logits: Tensor) -> Tensor:
            return torch.bmm(spec.to(logits.dtype), logits.unsqueeze(2)).squeeze(2)

        with torch.enable_grad():
            result = pgd(_AsModule(self.net), Box(self.x_lo[sample], self.x_hi[sample]),
                         success=lambda z: (rows(z) <= threshold.to(z)).any(1),
                         loss=lambda z: -rows(z).min(1).values, steps=self.m.attack_steps,
                         start=start, random_start=False)
        self._consider(result.x_adv.detach(), sample)

    def _consider(self, x: Tensor, sample: Tensor) -> None:
        """Keep the best point per property; decide properties with a point at or below the
        threshold."""
        values = self._screened_values(x, sample)
        worst = values.min(1).values
        worst = torch.where(torch.isnan(worst), math.inf, worst)
        sample = sample.to(values.device)
        best = torch.full_like(self.point_value, math.inf).scatter_reduce(0, sample, worst,
                                                                          "amin")
        for i in (best < self.point_value).nonzero(as_tuple=True)[0].tolist():
            j = int(((sample == i) & (worst == best[i])).nonzero(as_tuple=True)[0][0])
            self.point_value[i] = worst[j]
            self.points[i] = x[j]
        self.point_rows = torch.minimum(self.point_rows, torch.full_like(
            self.point_rows, math.inf).scatter_reduce(0, sample[:, None].expand_as(values),
                                                      values, "amin"))
        if self.threshold is not None:
            hit = (values <= self.threshold).any(1)
            for i in set(sample[hit].tolist()):
                if self.status[i] is None:
                    self.status[i] = BELOW
