"""The library iterator of the run layer: certify a dataset batch by batch.

:func:`certify_dataset` takes a model, a dataset and bound methods, and yields one
:class:`BatchResult` per batch and method: for every sample of the batch the largest eps the
method proves (:func:`certify.radius.certified_radii`), next to the smallest eps at which PGD
found an adversarial example (:func:`certify.attacks.minimal_adversarial`) and, with
``exact=True``, the exact minimal adversarial eps from a MILP (:func:`certify.exact.exact_radii`;
``certified <= exact <= attack`` is checked per row, a violation raises ``SoundnessError``).

It writes nothing: a caller stores the rows (:class:`certify.run.folder.RunFolder` appends them
to ``per_sample.csv``), prints them, or shards the batches over processes
(:func:`certify.distributed.sharded`). The rows do not depend on which batches run, in which
process or in how many sessions: batches are fixed by `batch_size`, each batch's attack has its
own seeded generator, and the fast search's first guesses learn only from the rows of the first
batches (see :data:`GUESS_SAMPLES`), which every caller runs first.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from certify.records import SampleRow

MIN_RATIO_SAMPLES = 8  # earlier samples needed before their median ratio steers the first guess
# First guesses learn from the batches that hold the first GUESS_SAMPLES samples (whole batches):
# a fixed prefix, so that the later batches are independent and can run on any rank in any order.
GUESS_SAMPLES = 32
ATTACKS = ("pgd", "none")


class Samples(Protocol):
    """A dataset split: its length and the samples at given positions."""

    def __len__(self) -> int: ...

    def take(self, index: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class BatchResult:
    """One bound method's rows for one batch.

    Attributes:
        batch: The batch number (batch ``b`` holds ``positions[b*batch_size:(b+1)*batch_size]``).
        method: The bound method.
        rows: One row per sample of the batch, in the batch's order.
        attack_seconds: Time of the batch's attack, on the batch's first result (0 on the
            others), so that a sum over results is the total.
        exact_seconds: Time of the batch's exact eps, counted like `attack_seconds`.
    """

    batch: int
    method: str
    rows: tuple[SampleRow, ...]
    attack_seconds: float = 0.0
    exact_seconds: float = 0.0


def guess_batches(batch_size: int) -> int:
    """How many first batches the later batches' first guesses learn from."""
    return max(1, math.ceil(GUESS_SAMPLES / batch_size))


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The seeded generator of batch `batch`'s attack."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch) % (2**63))


def certify_dataset(model: nn.Module, data: Samples, methods: Sequence[str], *,
                    positions: Sequence[int] | None = None, batch_size: int = 100,
                    eps_max: float = 0.5, tol: float = 1e-4, search: str = "fast",
                    attack: str = "pgd", attack_steps: int = 40, attack_restarts: int = 1,
                    attack_tol: float | None = None, seed: int = 0, exact: bool = False,
                    exact_time_limit: float = 60.0,
                    method_options: Mapping[str, Mapping[str, Any]] | None = None,
                    done: Iterable[SampleRow] = (),
                    batches: Sequence[int] | None = None, device: torch.device | None = None,
                    dtype: torch.dtype | None = None, quiet: bool = True, label: str = "model",
                    model_name: str | None = None) -> Iterator[BatchResult]:
    """Certify the samples at `positions` of `data`, yielding each batch's rows per method.

    Args:
        model: The classifier, in eval mode, on its device and dtype (inputs follow it).
        data: The dataset split (``len`` and ``take(index) -> (x (n, C, H, W), y (n,))``).
        methods: Bound method names, each searched separately, in this order per batch.
        positions: Sample positions in `data` (default: all); batches split them in order.
        batch_size: Samples per batch (>= 1).
        eps_max, tol, search: The radius search's (see :func:`certify.radius.certified_radii`).
        attack: ``pgd`` (minimal adversarial eps per sample) or ``none``.
        attack_steps, attack_restarts: PGD settings of every attack probe.
        attack_tol: Bracket width of the attack's bisection (default: `tol`).
        seed: Seeds every batch's attack generator (:func:`batch_generator`).
        exact, exact_time_limit: Also the exact minimal adversarial eps, by MILP.
        method_options: Per-method options, e.g. ``{"alpha-crown": {"steps": 50}}``.
        done: Rows computed before (e.g. read back to resume): a method whose rows a batch
            already has is skipped there; those of the first batches feed the first guesses.
        batches: The batch numbers to run, in order (default: all). The first
            :func:`guess_batches` batches must come first where later ones are run, unless
            `done` holds their rows.
        device, dtype: Where and in which dtype the inputs go (default: the model's first
            parameter's).
        quiet: No per-sample progress lines (exact eps, complete methods).
        label: The model's name in progress lines.
        model_name: The model's name in errors (default: `label`).
    Yields:
        One :class:`BatchResult` per batch and method still to do, as soon as it is computed.
    Raises:
        DatasetError: non-finite model outputs on a batch.
        SoundnessError: a certified eps above an attack or exact eps (a bug; never caught).
    """
    from certify import attacks
    from certify import exact as exact_module
    from certify.model_io import check_finite_outputs
    from certify.utils import SampleProgress

    positions = list(range(len(data))) if positions is None else [int(p) for p in positions]
    options = method_options or {}
    attack_tol = tol if attack_tol is None else attack_tol
    n_batches = math.ceil(len(positions) / batch_size)
    batches = list(range(n_batches)) if batches is None else list(batches)
    prefix = min(n_batches, guess_batches(batch_size))
    learn = set(positions[:prefix * batch_size])
    saved = {(r.index, r.method) for r in done}
    # rows of the first batches, per method: the first guesses of later batches learn from them
    learned: dict[str, dict[int, SampleRow]] = {m: {} for m in methods}
    for r in done:
        if r.index in learn and r.method in learned:
            learned[r.method][r.index] = r
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32

    def batch_of(b: int) -> list[int]:
        return positions[b * batch_size:(b + 1) * batch_size]

    todo_points = [p for b in batches for p in batch_of(b)]
    exact_log = SampleProgress(f"exact ε ({label})", sum(
        any((p, m) not in saved for m in methods) for p in todo_points), quiet=quiet or not exact)
    slow_logs = {m: SampleProgress(f"{m} radius ({label})", sum(
        (p, m) not in saved for p in todo_points), quiet=quiet)
        for m in methods if _per_sample_method(m)}

    for b in batches:
        batch = batch_of(b)
        todo = [m for m in methods if any((p, m) not in saved for p in batch)]
        if not todo:
            continue
        x, y = data.take(torch.tensor(batch))
        x, y = x.to(device=device, dtype=dtype), y.to(device)
        check_finite_outputs(model, x, model_name or label)
        attack_eps = None
        attack_seconds = exact_seconds = 0.0
        if attack == "pgd":
            t0 = time.perf_counter()
            adv = attacks.minimal_adversarial(
                model, x, y, eps_max=eps_max, tol=attack_tol, steps=attack_steps,
                restarts=attack_restarts, generator=batch_generator(seed, b))
            attack_eps = adv.eps
            attack_seconds = time.perf_counter() - t0
        exact_result = None
        if exact:
            t0 = time.perf_counter()
            with exact_log.active():
                exact_result = exact_module.exact_radii(
                    model, x, y, eps_max=eps_max, attack_eps=attack_eps,
                    time_limit=exact_time_limit, index=torch.tensor(batch), on_sample=exact_log)
            exact_seconds = time.perf_counter() - t0
        earlier = set(positions[:min(b * batch_size, prefix * batch_size)])
        for m in todo:
            previous = [r for p, r in learned[m].items() if p in earlier]
            search_args = _SearchArgs(model, m, x, y, attack_eps,
                                      learned_guess(previous, attack_eps), batch,
                                      eps_max=eps_max, tol=tol, search=search,
                                      options=dict(options.get(m, {})))
            if m in slow_logs:  # one sample at a time (each searches alone anyway)
                parts = []
                for k in range(len(batch)):
                    with slow_logs[m].active():
                        parts.append(search_args.run(slice(k, k + 1)))
                    slow_logs[m](batch[k])
                rows = [row for part in parts for row in part.rows()]
                certified = torch.cat([part.certified_eps for part in parts])
            else:
                result = search_args.run(slice(None))
                rows = result.rows()
                certified = result.certified_eps
            if exact_result is not None:
                exact_module.check_sandwich(exact_result, certified_eps=certified,
                                            attack_eps=attack_eps, method=m)
                rows = _with_exact(rows, exact_result)
            for row in rows:
                saved.add((row.index, row.method))
                if row.index in learn:
                    learned[m][row.index] = row
            yield BatchResult(b, m, tuple(rows), attack_seconds, exact_seconds)
            attack_seconds = exact_seconds = 0.0


@dataclass(frozen=True)
class _SearchArgs:
    """One method's radius search on one batch (run on a part of it)."""

    model: nn.Module
    method: str
    x: Tensor
    y: Tensor
    attack_eps: Tensor | None
    guess: Tensor | None
    batch: Sequence[int]
    eps_max: float
    tol: float
    search: str
    options: Mapping[str, Any]

    def run(self, part: slice) -> Any:
        """The radius search of the samples `part` of the batch (a RadiusResult)."""
        from certify import radius

        return radius.certified_radii(
            self.model, self.x[part], self.y[part], self.method, eps_max=self.eps_max,
            tol=self.tol, attack_eps=None if self.attack_eps is None else self.attack_eps[part],
            guess=None if self.guess is None else self.guess[part], search=self.search,
            index=torch.tensor(list(self.batch)[part]), **self.options)


def _per_sample_method(method: str) -> bool:
    """Methods that take a time budget (complete ones: ``milp``) run and report per sample."""
    from certify.bounds import get_method

    return bool(get_method(method).accepts_time_budget)


def learned_guess(previous: Sequence[SampleRow], attack_eps: Tensor | None) -> Tensor | None:
    """First guesses from earlier batches: their median certified/attack ratio times attack eps.

    Args:
        previous: Rows of earlier samples (those misclassified, unproven or unattacked do not
            count).
        attack_eps: `(N,)` the attack eps of the samples to guess for.
    Returns:
        `(N,)` first guesses, or None without attack eps or with fewer than
        :data:`MIN_RATIO_SAMPLES` usable earlier rows (the search's default guess applies).
    """
    if attack_eps is None:
        return None
    ratios = [r.certified_eps / r.attack_eps for r in previous
              if r.correct and r.certified_eps > 0 and 0 < r.attack_eps < math.inf]
    if len(ratios) < MIN_RATIO_SAMPLES:
        return None
    return attack_eps * statistics.median(ratios)


def _with_exact(rows: list[SampleRow], result: Any) -> list[SampleRow]:
    """`rows` with the exact eps and status of `result` (an ExactResult of the same samples)."""
    position = {int(i): k for k, i in enumerate(result.index.tolist())}
    out = []
    for row in rows:
        k = position[row.index]
        status = result.status[k]
        value = float(result.exact_eps[k])
        out.append(replace(row, exact_eps=None if math.isnan(value) else value,
                           exact_status=status if status != "unknown"
                           else f"unknown: {result.reason[k]}"))
    return out

