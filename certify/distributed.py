"""Running on several processes with ``torchrun``: sharding, gathering, failures.

``torchrun --nproc_per_node=N -m certify area ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`init_from_env` joins them into one process
group (``gloo`` on CPU, ``nccl`` when CUDA is present; each rank on ``cuda:LOCAL_RANK`` or the
CPU); without those variables everything here is a single-process no-op, so library code calls
it unconditionally.

- :func:`shard` splits work items over the ranks, balanced by per-item cost (greedy
  longest-processing-time; deterministic, so every rank computes the same split), and
  :func:`sharded` runs a batch iterator on this rank's share.
- :func:`exchange_status` is the only point where ranks wait for each other after long
  independent work: each rank posts "ok" or its error message in the rendezvous store and polls
  for the others, so a rank that finishes early never runs into a collective timeout, and a rank
  that failed makes every rank raise :class:`~certify.errors.DistributedError` naming it.
- :func:`all_gather_objects`, :func:`broadcast_object` and :func:`run_on_main` move small
  Python objects (result rows, a run folder's name, a checkpoint write's outcome).
- :func:`sync_gradients` averages gradients like ``DistributedDataParallel`` does, on the bare
  module, so losses that bound the model layer by layer (robust training) work unchanged.

Collectives use a process-group timeout (``CERTIFY_DIST_TIMEOUT_MINUTES``, default 30): a rank
that stops answering inside a collective ends the run instead of hanging it. A rank that dies
outright is detected by ``torchrun``, which stops the others.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import heapq
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from certify.errors import CertifyError, DistributedError, SpecError

T = TypeVar("T")

TIMEOUT_ENV = "CERTIFY_DIST_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 30.0
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: Global rank, 0 is the main process.
        world_size: Number of processes (1 without torchrun).
        local_rank: Rank on this node; picks ``cuda:LOCAL_RANK``.
        backend: ``gloo``, ``nccl``, or ``None`` when not distributed.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda`` (any index) becomes ``cuda:LOCAL_RANK`` when distributed."""
        if self.is_distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


_SINGLE = DistContext()
_context: DistContext | None = None
_exchanges = 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SpecError(f"environment variable {name}={value!r} is not an integer; torchrun sets "
                        "it, unset it to run a single process") from None


def _timeout() -> _dt.timedelta:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        raise SpecError(f"{TIMEOUT_ENV}={text!r} is not a number of minutes; e.g. "
                        f"{TIMEOUT_ENV}=60") from None
    if not minutes > 0:
        raise SpecError(f"{TIMEOUT_ENV} must be > 0 minutes, got {text}")
    return _dt.timedelta(minutes=minutes)


def init_from_env() -> DistContext:
    """Join the process group torchrun describes in the environment (idempotent).

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and torchrun's ``MASTER_ADDR`` /
    ``MASTER_PORT`` through ``env://``). Uses ``nccl`` when CUDA is available (and pins
    ``cuda:LOCAL_RANK``), else ``gloo``; ``CERTIFY_DIST_BACKEND`` overrides the choice.
    Returns:
        The context; a single-process one (rank 0 of 1) without ``WORLD_SIZE`` > 1.
    Raises:
        SpecError: malformed variables, or more GPUs requested than present.
    """
    global _context
    if _context is not None:
        return _context
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        _context = _SINGLE
        return _context
    import torch.distributed as dist

    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    backend = os.environ.get("CERTIFY_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise SpecError(f"CERTIFY_DIST_BACKEND={backend!r}; use gloo or nccl")
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise SpecError(f"LOCAL_RANK {local_rank} but this node has "
                            f"{torch.cuda.device_count()} GPUs; start at most that many "
                            "processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world, timeout=_timeout())
        atexit.register(_shutdown)
    _context = DistContext(rank, world, local_rank, backend)
    return _context


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def context() -> DistContext:
    """The current context (joins the process group on first use, see :func:`init_from_env`)."""
    return _context if _context is not None else init_from_env()


def is_main() -> bool:
    """Whether this is rank 0 (always true in a single process)."""
    return context().is_main


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if context().is_distributed:
        import torch.distributed as dist

        dist.barrier()


def shard(items: Sequence[T], rank: int, world: int,
          costs: Sequence[float] | None = None) -> list[T]:
    """The items `rank` of `world` processes works on, in their original order.

    Without costs, item ``k`` goes to rank ``k % world``. With costs, greedy
    longest-processing-time: items in decreasing cost (ties by position) each go to the rank
    with the smallest load so far (ties by rank), which keeps the largest load within 4/3 of
    the optimum. Every rank computes the same split.

    Args:
        items: Work items (e.g. batch numbers).
        rank: This process, ``0 <= rank < world``.
        world: Number of processes (>= 1).
        costs: Per-item cost (>= 0, finite), same length as `items`.
    Returns:
        The items of `rank`, in the order they have in `items`.
    Raises:
        SpecError: bad rank/world or costs.
    """
    if world < 1 or not 0 <= rank < world:
        raise SpecError(f"rank {rank} of world {world}: need world >= 1 and 0 <= rank < world")
    if costs is None:
        return [item for k, item in enumerate(items) if k % world == rank]
    if len(costs) != len(items):
        raise SpecError(f"{len(costs)} costs for {len(items)} items; give one cost per item")
    if any(not (c >= 0 and c < float("inf")) for c in costs):
        raise SpecError("costs must be finite numbers >= 0")
    loads = [(0.0, r) for r in range(world)]
    owner = [0] * len(items)
    for k in sorted(range(len(items)), key=lambda k: (-float(costs[k]), k)):
        load, r = heapq.heappop(loads)
        owner[k] = r
        heapq.heappush(loads, (load + float(costs[k]), r))
    return [item for k, item in enumerate(items) if owner[k] == rank]


def sharded(run: Callable[[list[int]], Iterable[T]], items: Sequence[int], *,
            item_of: Callable[[T], int], costs: Sequence[float] | None = None,
            prefix: int = 0) -> Iterator[T]:
    """This rank's share of a batch iterator: the results of its items, as they come.

    `run(items)` is an iterator over work items (e.g. :func:`certify.run.certify_dataset` over
    batch numbers) that yields results, each naming its item (`item_of`). In one process this
    is ``run(items)`` itself. Under torchrun every rank runs the first `prefix` items (work the
    later items depend on, such as the first batches a search learns its first guesses from;
    only rank 0 keeps their results), then its :func:`shard` of the others, and yields the
    results it keeps: each result of the run is yielded by exactly one rank. Gather them with
    :func:`all_gather_objects`.

    Args:
        run: The iterator over a list of items.
        items: Every item, in order.
        item_of: The item a result belongs to.
        costs: The work left per item (same length as `items`), to balance the shares.
        prefix: How many first items every rank runs.
    Yields:
        The results this rank keeps, in the order `run` yields them.
    """
    ctx = context()
    items = list(items)
    if not ctx.is_distributed:
        yield from run(items)
        return
    first, rest = items[:prefix], items[prefix:]
    mine = shard(rest, ctx.rank, ctx.world_size,
                 costs=None if costs is None else list(costs)[prefix:])
    kept = set(mine) | (set(first) if ctx.is_main else set())
    for result in run(first + mine):
        if item_of(result) in kept:
            yield result


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, indexed by rank (``[obj]`` in a single process)."""
    ctx = context()
    if not ctx.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (`obj` itself in a single process)."""
    ctx = context()
    if not ctx.is_distributed:
        return obj
    import torch.distributed as dist

    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def run_on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result (or its error) to every rank.

    A :class:`CertifyError` raised by `fn` is raised again on every rank with the same message;
    any other exception is re-raised on rank 0 and reported as a failure of rank 0 elsewhere.
    """
    ctx = context()
    if not ctx.is_distributed:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as e:  # handed to every rank below
            error = e
    message = None if error is None else (type(error).__name__, str(error),
                                          isinstance(error, CertifyError))
    result, message = broadcast_object((result, message))
    if message is None:
        return result  # type: ignore[no-any-return]
    if error is not None:
        raise error
    name, text, is_user_error = message
    if is_user_error:
        raise DistributedError(text)
    raise DistributedError(f"rank 0 failed: {name}: {text}")


def describe(error: BaseException) -> str:
    """One line for another rank's report: the message, with the type for unexpected errors."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, CertifyError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def exchange_status(error: BaseException | None, *, hint: str = "") -> None:
    """Wait until every rank posted its outcome; raise if any rank failed.

    Each rank posts ``ok`` or :func:`describe` of its error in the rendezvous store and polls
    for the others' posts (no collective, so a rank that finishes long before the others does
    not time out). Every rank must call this the same number of times.

    Args:
        error: This rank's failure, or ``None``.
        hint: Appended to the message, e.g. ``finished shards are kept, rerun with --resume``.
    Raises:
        DistributedError: on every rank, naming each failed rank and its message, when any
            rank failed (this rank's own error is chained).
    """
    global _exchanges
    ctx = context()
    if not ctx.is_distributed:
        if error is not None:
            raise error
        return
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    _exchanges += 1
    store = dist.PrefixStore(f"certify-status-{_exchanges}/", _get_default_store())
    store.set(str(ctx.rank), "ok" if error is None else "failed:" + describe(error))
    keys = [str(r) for r in range(ctx.world_size)]
    while not store.check(keys):
        time.sleep(_POLL_SECONDS)
    failed = []
    for r in range(ctx.world_size):
        value = store.get(str(r)).decode()
        if value != "ok":
            failed.append(f"rank {r} failed: {value.removeprefix('failed:')}")
    if failed:
        message = "; ".join(failed) + (f"; {hint}" if hint else "")
        raise DistributedError(message) from error


@contextlib.contextmanager
def shared_failure(*, hint: str = "") -> Iterator[None]:
    """Run this rank's share of a job so that a failure on any rank fails every rank cleanly.

    In a distributed run an exception inside the block is printed and held back, then every
    rank's outcome is exchanged (:func:`exchange_status`): all ranks raise the same
    :class:`DistributedError`, naming each failed rank, followed by `hint`. In one process the
    exception propagates unchanged. ``KeyboardInterrupt`` is never held back.
    """
    ctx = context()
    failure: Exception | None = None
    try:
        yield
    except Exception as e:  # in a distributed run every rank learns of it below
        if not ctx.is_distributed:
            raise
        import traceback

        traceback.print_exc()
        failure = e
    if ctx.is_distributed:
        exchange_status(failure, hint=hint)


def _flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])


def sync_gradients(model: nn.Module, *, weight: float = 1.0,
                   extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum ``weight * grad`` over the ranks, in place, in one all-reduce (like DDP's buckets).

    With ``weight = local_batch / global_batch`` the result is the gradient of the mean loss
    over the global batch, as one process would compute it. `extra` (a 1-D float tensor, e.g.
    loss sum and correct counts) rides along in the same all-reduce and is returned summed.

    Returns:
        The summed `extra` (``None`` if not given). In a single process, nothing changes.
    """
    ctx = context()
    if not ctx.is_distributed:
        return extra
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    grads = _flat_grads(params) * weight if params else torch.zeros(0)
    pieces = [grads] + ([extra.to(grads.device, grads.dtype)] if extra is not None else [])
    flat = torch.cat(pieces)
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n
    return flat[offset:].clone() if extra is not None else None


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's `model` (in place)."""
    ctx = context()
    if not ctx.is_distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src)


def all_reduce_sum(values: Sequence[float], *, device: torch.device | None = None) -> list[float]:
    """Sum each number over the ranks (the numbers themselves in a single process)."""
    ctx = context()
    if not ctx.is_distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]
