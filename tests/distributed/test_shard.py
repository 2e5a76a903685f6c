"""certify.distributed in one process: sharding, single-process no-ops, the sharded iterator."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certify import distributed
from certify.errors import DistributedError, SpecError


@given(st.lists(st.floats(0, 100), max_size=40), st.integers(1, 5))
def test_shard_partitions_items_in_order(costs, world):
    items = list(range(len(costs)))
    for weighted in (None, costs):
        parts = [distributed.shard(items, r, world, costs=weighted) for r in range(world)]
        assert sorted(i for p in parts for i in p) == items  # each item exactly once
        assert all(p == sorted(p) for p in parts)  # original order kept
        assert parts == [distributed.shard(items, r, world, costs=weighted)
                         for r in range(world)]  # deterministic


def _optimal_makespan(costs: list[float], world: int) -> float:
    """Brute force over every assignment of items to workers (small inputs only)."""
    import itertools

    best = float("inf")
    for assignment in itertools.product(range(world), repeat=len(costs)):
        loads = [0.0] * world
        for cost, worker in zip(costs, assignment, strict=True):
            loads[worker] += cost
        best = min(best, max(loads))
    return best


@given(st.lists(st.floats(0, 100), min_size=1, max_size=7), st.integers(1, 3))
def test_lpt_load_is_within_graham_bound(costs, world):
    # Graham (1969): longest-processing-time-first is within 4/3 - 1/(3m) of the optimum.
    items = list(range(len(costs)))
    loads = [sum(costs[i] for i in distributed.shard(items, r, world, costs=costs))
             for r in range(world)]
    optimum = _optimal_makespan(costs, world)
    assert max(loads) <= (4 / 3 - 1 / (3 * world)) * optimum + 1e-9


def test_lpt_balances_unequal_costs():
    costs = [10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    parts = [distributed.shard(list(range(11)), r, 2, costs=costs) for r in range(2)]
    assert parts == [[0], list(range(1, 11))]


def test_shard_rejects_bad_arguments():
    with pytest.raises(SpecError, match="rank 2 of world 2"):
        distributed.shard([1, 2], 2, 2)
    with pytest.raises(SpecError, match="3 costs for 2 items"):
        distributed.shard([1, 2], 0, 2, costs=[1, 2, 3])
    with pytest.raises(SpecError, match="finite"):
        distributed.shard([1], 0, 1, costs=[float("inf")])


def test_single_process_helpers_are_no_ops(monkeypatch):
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(3) == 3
    assert distributed.run_on_main(lambda: 5) == 5
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    distributed.exchange_status(None)
    with pytest.raises(ValueError, match="boom"):
        distributed.exchange_status(ValueError("boom"))


def test_sharded_is_the_iterator_itself_in_one_process():
    seen = []

    def run(items):
        seen.append(list(items))
        for item in items:
            yield (item, item * item)

    out = list(distributed.sharded(run, [0, 1, 2, 3], item_of=lambda r: r[0],
                                   costs=[1, 1, 1, 1], prefix=2))
    assert out == [(0, 0), (1, 1), (2, 4), (3, 9)] and seen == [[0, 1, 2, 3]]


def test_describe_names_unexpected_errors():
    assert distributed.describe(SpecError("bad eps")) == "bad eps"
    assert distributed.describe(ZeroDivisionError("x")) == "ZeroDivisionError: x"
    assert issubclass(DistributedError, Exception)
