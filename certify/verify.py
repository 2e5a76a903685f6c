"""Decide a VNNLIB property: a validated counterexample (``sat``) or a proof (``unsat``).

The cascade, cheap to costly, stops at the first decision:

1. **attack**: random points and :func:`certify.attacks.pgd` inside the input box (a
   :class:`certify.spec.Box` rounded inward) that maximizes, per conjunction of the unsafe set
   ``matrix @ y <= bound``, the smallest slack ``min_r (bound - matrix @ y)_r``, with the
   conjunction as its success criterion. A point counts only after the attacks' re-check and a
   plain forward pass show it lies in the box and satisfies a conjunction exactly: then the
   verdict is ``sat``.
2. **bounds**: each method of `methods` (cheap to tight) bounds ``matrix @ y - bound`` over the
   box (in float64 by default); a conjunction is ruled out once one of its rows is *proven*
   violated (lower bound strictly > 0). When every conjunction is ruled out: ``unsat``.
3. **branch and bound** (``bab``: the complete method without a solver, ``use_bab``): the rows
   decided against their own constants, every row of the open conjunctions at once (the
   property holds when each of them is proven on every leaf); it gets :data:`BAB_SHARE` of the
   time left when the MILP follows, else all of it.
4. **the MILP** (the complete method with a solver), only for small networks
   (``use_milp="auto"``) and only where branch and bound left rows open; it gets the time that
   remains as its budget, the refinement of its intermediate bounds included.
5. **the budget**: rounds of longer attacks on the conjunctions left (fresh random starts, twice
   the steps each round), with alpha-CROWN at more steps after the first round when it is in
   the cascade, until only a small reserve of the time is left.

Otherwise the verdict is ``unknown`` (the budget was spent), or ``timeout`` when a phase ran
past the deadline. ``unsat`` is only ever the result of a proof.

Also here: the VNN-COMP result file (:func:`format_result`) and the benchmark runner over an
``instances.csv`` (:func:`run_instances`).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import gzip
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from certify.checkpoint import ModelMeta
from certify.errors import SpecError
from certify.vnnlib import VnnlibProperty

__all__ = [
    "RESULTS",
    "RESULT_COLUMNS",
    "Instance",
    "InstanceResult",
    "Verdict",
    "format_result",
    "read_instances",
    "run_instances",
    "verify",
    "verify_files",
]

#: The verdicts, as VNN-COMP spells them.
Result = Literal["sat", "unsat", "unknown", "timeout"]
RESULTS: tuple[Result, ...] = ("sat", "unsat", "unknown", "timeout")
#: Columns of the results CSV written by :func:`run_instances`.
RESULT_COLUMNS = ("onnx", "vnnlib", "result", "seconds", "method")
#: Piecewise-linear networks with at most this many activation units get the MILP with
#: ``use_milp="auto"``.
MILP_AUTO_MAX_RELUS = 256
#: The share of the time left that branch and bound gets when the MILP follows it. On the
#: digits ``mlp-100-100`` of ``benchmarks/bench_verify.py`` (256 units or fewer: the MILP
#: follows) branch and bound decided eps-0.08 properties in 20 s that the MILP did not decide in
#: 30 s; the MILP keeps the rest for nets small enough to finish in it.
BAB_SHARE = 0.8
#: The part of the timeout kept back at the end (at most :data:`RESERVE_MAX` seconds), so that
#: an undecided property ends as ``unknown`` before the deadline, not as ``timeout``.
RESERVE_FRACTION = 0.05
RESERVE_MAX = 1.0
#: alpha-CROWN's steps when it is tried again with the time left.
ALPHA_CROWN_LONG_STEPS = 100


@dataclass(frozen=True)
class Verdict:
    """The answer for one property.

    Attributes:
        result: ``"sat"`` (a counterexample exists), ``"unsat"`` (proven safe), ``"unknown"``
            or ``"timeout"``.
        counterexample: For ``sat``: ``(x, y)``, the flat input ``(D,)`` and the model's output
            ``(K,)`` there (float64 holding the exact values computed); otherwise None.
        method: What decided: ``"attack"``, a bound method name, ``"vnnlib"`` (the unsafe set
            is empty as written), or None when undecided.
        seconds: Wall-clock time taken.
    """

    result: Result
    counterexample: tuple[Tensor, Tensor] | None
    method: str | None
    seconds: float

    def __repr__(self) -> str:
        by = f" by {self.method}" if self.method else ""
        return f"Verdict({self.result}{by}, {self.seconds:.2f}s)"


# ---- the cascade ------------------------------------------------------------------------------


def verify(
    model: nn.Module,
    prop: VnnlibProperty,
    *,
    timeout: float = 60.0,
    methods: Sequence[str] = ("ibp", "crown", "alpha-crown"),
    use_milp: bool | Literal["auto"] = "auto",
    input_shape: Sequence[int] | None = None,
    bound_dtype: torch.dtype = torch.float64,
    attack_steps: int = 20,
    attack_restarts: int = 4,
    seed: int = 0,
    use_bab: bool = True,
) -> Verdict:
    """Decide `prop` for `model`: ``sat`` with a validated counterexample, ``unsat``, or neither.

    Args:
        model: A network of layers the bound engine supports; its device is used.
        prop: The property: input box and unsafe output set.
        timeout: Seconds; the cascade stops with ``timeout`` once they are spent.
        methods: Bound methods tried in this order (names from
            :func:`certify.bounds.list_methods`).
        use_milp: ``"auto"`` runs the engine's ``milp`` method (when registered) for networks
            with at most :data:`MILP_AUTO_MAX_RELUS` activation inputs (ReLU, LeakyReLU,
            MaxPool2d) and no activation that is not piecewise linear (Sigmoid, Tanh); True
            always, False never.
        input_shape: The model's per-sample input shape; default the flat ``(D,)``.
        bound_dtype: Precision of the bound computations (float64 keeps proofs free of float32
            rounding).
        attack_steps, attack_restarts: Effort of the first attack (per conjunction); the
            attacks after the bounds take 8 times the restarts and 5, 10, 20, ... times the
            steps, until the time left is the reserve.
        seed: Seed of the attack's random points.
        use_bab: Run branch and bound (``bab``) after the bounds of `methods`.
    Returns:
        The :class:`Verdict`.
    Raises:
        SpecError: a property that does not fit the model, or a bad timeout.
        UnknownNameError: an unknown method name.
        UnsupportedLayerError: a layer the bound engine has no rule for.
    """
    start = time.perf_counter()
    deadline = start + _check_timeout(timeout)
    from certify.bounds import list_methods

    available = list_methods()
    for name in methods:
        if name not in available:
            from certify.errors import unknown_name

            raise unknown_name("method", name, available)
    shape = tuple(int(v) for v in input_shape) if input_shape is not None else (prop.num_inputs,)
    if attack_steps < 0 or attack_restarts < 1:
        raise SpecError(f"attack_steps must be >= 0 and attack_restarts >= 1, got {attack_steps} "
                        f"and {attack_restarts}.")
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in model.parameters()), torch.float32)
        lower, upper = prop.input_box(shape, dtype=torch.float64, device=device)
        k = _num_outputs(model, lower.to(dtype), prop)
        rows = _Rows.of(prop, k, device)
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def done(result: Result, method: str | None,
                 counterexample: tuple[Tensor, Tensor] | None = None) -> Verdict:
            return Verdict(result, counterexample, method, time.perf_counter() - start)

        if not rows.count:
            return done("unsat", "vnnlib")  # every conjunction holds a constant false row
        attack_deadline = min(deadline, start + 0.25 * (deadline - start))
        found = _attack(model, prop, rows, shape, steps=attack_steps, restarts=attack_restarts,
                        generator=generator, deadline=attack_deadline)
        if found is not None:
            return done("sat", "attack", found)
        open_rows = torch.ones(rows.count, dtype=torch.bool)
        bound_model = _as_dtype(model, bound_dtype)
        box = prop.input_box(shape, dtype=bound_dtype, device=device)
        cascade = list(methods)
        searches = _complete_methods(use_milp, use_bab, bound_model, box[0])
        cascade += [name for name in searches if name not in cascade]
        for k, name in enumerate(cascade):
            if time.perf_counter() >= deadline:
                return done("timeout", None)
            left = deadline - time.perf_counter()
            if name in searches and k + 1 < len(cascade):  # a search with another after it
                left *= BAB_SHARE
            open_rows &= ~_ruled_out(bound_model, box, rows, open_rows, name, seconds=left)
            if not open_rows.any():
                return done("unsat", name)
        # spend what is left, keeping a reserve: longer attacks, and a longer alpha-CROWN
        stop = deadline - min(RESERVE_MAX, RESERVE_FRACTION * (deadline - start))
        retry = [name for name in cascade if _has_option(name, "steps")][-1:]
        round_ = 0
        while time.perf_counter() < stop:
            found = _attack(model, prop, rows.subset(open_rows), shape,
                            steps=5 * 2 ** min(round_, 6) * max(attack_steps, 1),
                            restarts=8 * attack_restarts, generator=generator, deadline=stop)
            if found is not None:
                return done("sat", "attack", found)
            round_ += 1
            while retry and time.perf_counter() < stop:
                name = retry.pop()
                open_rows &= ~_ruled_out(bound_model, box, rows, open_rows, name,
                                         seconds=stop - time.perf_counter(),
                                         options={"steps": ALPHA_CROWN_LONG_STEPS})
                if not open_rows.any():
                    return done("unsat", name)
        return done("timeout" if time.perf_counter() >= deadline else "unknown", None)
    finally:
        model.train(was_training)


def _check_timeout(timeout: float) -> float:
    if not isinstance(timeout, (int, float)) or not timeout > 0 or math.isnan(timeout):
        raise SpecError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    return float(timeout)


def _num_outputs(model: nn.Module, x: Tensor, prop: VnnlibProperty) -> int:
    try:
        with torch.no_grad():
            y = model(x)
    except RuntimeError as e:
        raise SpecError(f"the model does not take the property's input of shape "
                        f"{tuple(x.shape[1:])}: {str(e).splitlines()[0]}. Pass the model's "
                        "input shape.") from None
    if y.ndim != 2:
        raise SpecError(f"the model's output has shape {tuple(y.shape)}; expected (N, K).")
    k = int(y.shape[1])
    if prop.num_outputs > k:
        raise SpecError(f"{prop.source} declares {prop.num_outputs} outputs Y_j but the model has "
                        f"{k}; use the property written for this network.")
    return k


@dataclass(frozen=True)
class _Rows:
    """All conjunctions' rows stacked: row i belongs to conjunction ``owner[i]``."""

    matrix: Tensor     # (S, K) float64
    bound: Tensor      # (S,)
    strict: Tensor     # (S,) bool
    owner: Tensor      # (S,) conjunction index
    conjunctions: int  # P, including those without rows

    @property
    def count(self) -> int:
        return self.conjunctions

    @staticmethod
    def of(prop: VnnlibProperty, k: int, device: torch.device) -> _Rows:
        mats, bounds, stricts, owners = [], [], [], []
        for i, d in enumerate(prop.disjuncts):
            pad = k - d.matrix.shape[1]
            mats.append(torch.nn.functional.pad(d.matrix, (0, pad)))
            bounds.append(d.bound)
            stricts.append(d.strict)
            owners.append(torch.full((d.bound.numel(),), i, dtype=torch.long))
        if not mats:
            empty = torch.zeros(0, k, dtype=torch.float64)
            return _Rows(empty.to(device), empty[:, 0].to(device),
                         torch.zeros(0, dtype=torch.bool, device=device),
                         torch.zeros(0, dtype=torch.long, device=device), 0)
        return _Rows(torch.cat(mats).to(device), torch.cat(bounds).to(device),
                     torch.cat(stricts).to(device), torch.cat(owners).to(device),
                     len(prop.disjuncts))

    def subset(self, keep: Tensor) -> _Rows:
        """Only the conjunctions where `keep` ``(P,)`` is True (renumbered)."""
        keep = keep.to(self.owner.device)
        index = torch.cumsum(keep.long(), 0) - 1
        rows = keep[self.owner]
        return _Rows(self.matrix[rows], self.bound[rows], self.strict[rows],
                     index[self.owner[rows]], int(keep.sum()))


def _as_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(dtype)


def _has_option(name: str, option: str) -> bool:
    """Whether bound method `name` takes `option` (e.g. ``steps``: it improves with effort)."""
    from certify.bounds.base import method_class

    return option in {f.name for f in dataclasses.fields(method_class(name))}


def _complete_methods(use_milp: bool | str, use_bab: bool, model: nn.Module, x: Tensor
                      ) -> list[str]:
    """The complete methods to add to the cascade, in order: branch and bound (no solver),
    then the MILP (a solver) for small networks; see `use_bab` and `use_milp`."""
    from certify.bounds import list_methods
    from certify.bounds.bab import supports

    if use_milp not in (True, False, "auto"):
        raise SpecError(f"use_milp must be True, False or 'auto', got {use_milp!r}.")
    out = []
    searches = list_methods(is_complete=True, accepts_time_budget=True, uses_solver=False)
    if use_bab and searches and supports(model, x):
        out.append(searches[0])
    solvers = list_methods(is_complete=True, accepts_time_budget=True, uses_solver=True)
    if use_milp is not False and solvers:
        count = None if use_milp is True else _relu_count(model, x)
        if use_milp is True or (count is not None and count <= MILP_AUTO_MAX_RELUS):
            out.append(solvers[0])
    return out


def _relu_count(model: nn.Module, x: Tensor) -> int | None:
    """The number of activation inputs (ReLU, LeakyReLU, MaxPool2d) the MILP would encode for
    `model` on inputs like `x` ``(1, ...)``; None when it cannot be exact (an activation that is not
    piecewise linear, such as Sigmoid or Tanh, or a model the engine does not convert)."""
    from certify.bounds import to_network
    from certify.bounds.encoding import exact_encoding_units
    from certify.errors import CertifyError

    try:
        net = to_network(model, tuple(x.shape[1:]))
    except CertifyError:
        return None
    return exact_encoding_units(net)


def _ruled_out(model: nn.Module, box: tuple[Tensor, Tensor], rows: _Rows, open_rows: Tensor,
               method: str, *, seconds: float,
               options: dict[str, Any] | None = None) -> Tensor:
    """``(P,)`` bool: conjunctions with a row proven violated by `method` (only open ones).

    The MILP gets the `seconds` left as its budget, shared by the refinement of its
    intermediate bounds and its problems (one per row); a problem it does not finish in time
    falls back to a sound bound inside the engine. `options` go to the method.
    """
    from certify.bounds import compute_bounds, get_method

    active = open_rows.to(rows.owner.device)[rows.owner]
    out = torch.zeros(rows.count, dtype=torch.bool)
    if not active.any():
        return out
    lower, upper = box
    spec = rows.matrix[active].to(lower.dtype).unsqueeze(0)
    from certify.bounds.base import method_class

    options = dict(options or {})  # a copy: the MILP's time is set here
    cls = method_class(method)
    if getattr(cls, "accepts_time_budget", False):
        for option in ("time_limit", "budget"):
            if _has_option(method, option):
                options[option] = max(seconds, 1e-3)
    # proven violated: the smallest value of (matrix @ y)_r over the box exceeds bound_r; the
    # property's decimal constant was rounded to float64, so compare with the next float above
    # it (the sign of a float64 difference is exact)
    bound = rows.bound[active]
    bound = torch.nextafter(bound, torch.full_like(bound, float("inf")))
    if cls.decides_threshold and not cls.uses_solver and "threshold" not in options:
        # a search stops once every row is decided against its own constant (the MILP
        # computes each row's exact minimum instead)
        options["threshold"] = tuple(bound.tolist())
    configured = get_method(method, **options)

    def violated_by(m: Any, matrix: Tensor, lo: Tensor, hi: Tensor, against: Tensor) -> Tensor:
        # rigorous for the network in exact arithmetic and for the model's own forward pass
        b = compute_bounds(model, lo, hi, m, matrix, model_rounding=True)
        return (b.lower[0].to(torch.float64) - against) > 0

    violated = violated_by(configured, spec, lower, upper, bound)
    if configured.takes_module and bool(violated.any()):
        # a method without rounding control (auto_LiRPA's) only proposes: the native rigorous
        # bound of the same method, in float64, must prove each row it found violated
        _, confirm = configured.search_pair()
        keep = torch.nonzero(violated).flatten()
        violated = torch.zeros_like(violated)
        if confirm is not None:
            violated[keep] = violated_by(confirm, spec[:, keep].double(), lower.double(),
                                         upper.double(), bound[keep])
    owners = rows.owner[active][violated].cpu()
    out[owners] = True
    return out


# ---- the attack -------------------------------------------------------------------------------


def _inward_box(prop: VnnlibProperty, shape: Sequence[int], dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor] | None:
    """The box rounded inwards to `dtype` (every point of it is in the property's box)."""
    from certify.spec import round_to

    lower = round_to(prop.lower, dtype, up=True)
    upper = round_to(prop.upper, dtype, up=False)
    if (lower > upper).any():
        return None
    return lower.reshape(1, *shape).to(device), upper.reshape(1, *shape).to(device)


def _attack(model: nn.Module, prop: VnnlibProperty, rows: _Rows, shape: Sequence[int], *,
            steps: int, restarts: int, generator: torch.Generator,
            deadline: float) -> tuple[Tensor, Tensor] | None:
    """Search the box for a point whose outputs satisfy a conjunction; validated or None."""
    if rows.count == 0:
        return None
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    device = rows.matrix.device
    box = _inward_box(prop, shape, dtype, device)
    if box is None:  # a box too thin for the model's precision: search in float64
        model, dtype = _as_dtype(model, torch.float64), torch.float64
        box = _inward_box(prop, shape, dtype, device)
        assert box is not None
    lower, upper = box
    per_chunk = max(1, 512 // max(restarts, 1))
    best: tuple[float, Tensor, Tensor] | None = None
    for first in range(0, rows.count, per_chunk):
        keep = torch.zeros(rows.count, dtype=torch.bool)
        keep[first:first + per_chunk] = True
        chunk = rows.subset(keep)
        found = _pgd(model, prop, chunk, lower, upper, steps=steps, restarts=restarts,
                     generator=generator, deadline=deadline)
        if found is not None and (best is None or found[0] > best[0]):
            best = found
        if best is not None or time.perf_counter() >= deadline:
            break
    if best is None:
        return None
    _, x, _ = best
    # the counterexample is what a plain forward pass of this single point gives
    with torch.no_grad():
        y = model(x.reshape(1, *shape))
    if not (prop.contains(x.unsqueeze(0)).item()
            and prop.is_unsafe(y[:, :prop.num_outputs]).item()):
        return None  # it held only within a batch's rounding; not a validated counterexample
    return x.detach().to(torch.float64).cpu(), y[0].detach().to(torch.float64).cpu()


def _pgd(model: nn.Module, prop: VnnlibProperty, rows: _Rows, lower: Tensor, upper: Tensor, *,
         steps: int, restarts: int, generator: torch.Generator,
         deadline: float) -> tuple[float, Tensor, Tensor] | None:
    """:func:`certify.attacks.pgd` on the smallest slack, `restarts` points per conjunction, in
    the box ``[lower, upper]`` (``(1, *shape)``), with the conjunction as success criterion.

    Returns ``(slack, x, y)`` of the re-checked point with the largest smallest slack, or None.
    """
    from certify.attacks import pgd, recheck
    from certify.spec import Box

    p = rows.count
    # padded per-conjunction rows: (P, R, K), (P, R); missing rows never bind (+inf slack)
    counts = torch.bincount(rows.owner, minlength=p)
    r = max(int(counts.max()) if rows.owner.numel() else 0, 1)
    k = rows.matrix.shape[1]
    matrix64 = torch.zeros(p, r, k, dtype=torch.float64, device=lower.device)
    bound64 = torch.full((p, r), float("inf"), dtype=torch.float64, device=lower.device)
    strict = torch.zeros(p, r, dtype=torch.bool, device=lower.device)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.owner.numel(), device=rows.owner.device) - first[rows.owner]
    matrix64[rows.owner, slot] = rows.matrix
    bound64[rows.owner, slot] = rows.bound
    strict[rows.owner, slot] = rows.strict
    matrix, bound = matrix64.to(lower.dtype), bound64.to(lower.dtype)
    x = _starts(model, lower, upper, matrix, bound, restarts=restarts, generator=generator)
    matrix, bound, matrix64, bound64, strict = (
        t.repeat_interleave(restarts, 0) for t in (matrix, bound, matrix64, bound64, strict))

    def smallest_slack(y: Tensor) -> Tensor:
        """What the search ascends: ``min_r (bound - matrix @ y)_r`` of each point's conjunction
        (+inf, capped at 1e30, for a conjunction without rows)."""
        slack = bound - torch.einsum("brk,bk->br", matrix, y)
        return slack.min(dim=1).values.clamp(max=1e30)

    def unsafe(y: Tensor) -> Tensor:
        """The success criterion: each point's conjunction holds, in float64 with no tolerance."""
        slack = bound64 - torch.einsum("brk,bk->br", matrix64, y.to(torch.float64))
        return torch.where(strict, slack > 0, slack >= 0).all(dim=1)

    n = x.shape[0]
    region = Box(lower.expand(n, *lower.shape[1:]), upper.expand(n, *upper.shape[1:]))
    if steps == 0:
        ok, logits = recheck(model, region, x, success=unsafe)
        x_best, score = x, smallest_slack(logits)
    else:
        # steps of half the box's width, shrinking to 2% of it; ten more steps after the first
        # success move away from the boundary
        res = pgd(model, region, success=unsafe, loss=smallest_slack, steps=steps,
                  step_size=lambda i: 2 * (0.5 * (1 - i / steps) + 0.02), start=x,
                  patience=10, deadline=deadline)
        ok, x_best, score = res.success, res.x_adv, -res.margin
    if not bool(ok.any()):
        return None
    score = torch.where(ok, score, torch.full_like(score, -math.inf))
    i = int(torch.argmax(score))
    with torch.no_grad():
        y = model(x_best[i:i + 1])[0]
    return float(score[i]), x_best[i].flatten().clone(), y


def _starts(model: nn.Module, lower: Tensor, upper: Tensor, matrix: Tensor, bound: Tensor, *,
            restarts: int, generator: torch.Generator, samples: int = 1024) -> Tensor:
    """PGD starting points ``(P * restarts, *shape)``: per conjunction the box's centre and the
    best of `samples` random points (uniform, and box corners) by smallest slack."""
    shape = lower.shape[1:]
    half = samples // 2
    noise = torch.rand((samples, *shape), generator=generator, dtype=torch.float64)
    noise[half:] = noise[half:].round()  # random corners: the extremes of a ReLU network
    noise = noise.to(device=lower.device, dtype=lower.dtype)
    pool = torch.minimum(lower + (upper - lower) * noise, upper)
    with torch.no_grad():
        y = torch.cat([model(chunk) for chunk in pool.split(256)])
        slack = bound.unsqueeze(0) - torch.einsum("prk,nk->npr", matrix, y)
        score = slack.min(dim=2).values  # (samples, P)
    top = score.topk(min(restarts - 1, samples), dim=0).indices.T  # (P, restarts - 1)
    centre = (lower + 0.5 * (upper - lower)).expand(matrix.shape[0], 1, *shape)
    x = torch.cat([centre, pool[top]], dim=1)  # (P, restarts, *shape)
    return x.reshape(-1, *shape)


# ---- files ------------------------------------------------------------------------------------


def verify_files(
    net: str | os.PathLike[str],
    spec: str | os.PathLike[str],
    *,
    timeout: float = 60.0,
    methods: Sequence[str] = ("ibp", "crown", "alpha-crown"),
    use_milp: bool | Literal["auto"] = "auto",
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    use_bab: bool = True,
) -> Verdict:
    """Load a network (``.onnx``/``.pt``) and a ``.vnnlib`` property and :func:`verify` it.

    The time spent loading counts towards `timeout` (as in VNN-COMP). Options as for
    :func:`verify` and :func:`certify.model_io.load_model`.
    """
    from certify.model_io import load_model

    start = time.perf_counter()
    model, meta = load_model(net, device=device, input_shape=input_shape, mean=mean, std=std)
    return _verify_spec(model, meta, spec, start=start, timeout=timeout, methods=methods,
                        use_milp=use_milp, seed=seed, use_bab=use_bab)


def _verify_spec(model: nn.Module, meta: ModelMeta, spec: str | os.PathLike[str], *,
                 start: float, timeout: float, methods: Sequence[str],
                 use_milp: bool | Literal["auto"], seed: int, use_bab: bool = True
                 ) -> Verdict:
    """Read `spec` for a loaded model and verify it in what is left of `timeout` since `start`."""
    from certify.vnnlib import read_vnnlib

    prop = read_vnnlib(spec, num_inputs=math.prod(meta.input_shape),
                       num_outputs=meta.num_classes)
    left = _check_timeout(timeout) - (time.perf_counter() - start)
    if left <= 0:
        return Verdict("timeout", None, None, time.perf_counter() - start)
    verdict = verify(model, prop, timeout=left, methods=methods, use_milp=use_milp,
                     input_shape=meta.input_shape, seed=seed, use_bab=use_bab)
    return Verdict(verdict.result, verdict.counterexample, verdict.method,
                   time.perf_counter() - start)


def format_result(verdict: Verdict) -> str:
    """The VNN-COMP result file: the result, then for ``sat`` the counterexample.

    Example::

        sat
        ((X_0 0.25)
         (X_1 -0.5)
         (Y_0 1.5)
         (Y_1 2.0))
    """
    if verdict.result != "sat" or verdict.counterexample is None:
        return f"{verdict.result}\n"
    x, y = verdict.counterexample
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x.flatten().tolist())]
    pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y.flatten().tolist())]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


# ---- benchmarks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One row of a VNN-COMP ``instances.csv``: paths as written, resolved, and the timeout."""

    onnx: str
    vnnlib: str
    onnx_path: Path
    vnnlib_path: Path
    timeout: float


@dataclass(frozen=True)
class InstanceResult:
    """One row of the results CSV (:data:`RESULT_COLUMNS`)."""

    onnx: str
    vnnlib: str
    result: str
    seconds: float
    method: str

    def row(self) -> dict[str, str]:
        return {"onnx": self.onnx, "vnnlib": self.vnnlib, "result": self.result,
                "seconds": f"{self.seconds:.3f}", "method": self.method}


def read_instances(path: str | os.PathLike[str]) -> list[Instance]:
    """Read a VNN-COMP ``instances.csv``: rows ``onnx, vnnlib, timeout`` without a header.

    Paths are relative to the csv's folder; a path that is missing but exists with ``.gz``
    appended is used compressed.

    Raises:
        SpecError: a missing file, a malformed row (naming its line) or a missing network or
            property.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"instances file not found: {path}. Give the benchmark's instances.csv.")
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    out: list[Instance] = []
    for number, row in enumerate(lines, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) < 3:
            raise SpecError(f"{path.name}:{number}: expected 'onnx, vnnlib, timeout', got "
                            f"{','.join(row)!r}.")
        try:
            timeout = float(cells[2])
        except ValueError:
            if number == 1:
                continue  # a header row
            raise SpecError(f"{path.name}:{number}: timeout {cells[2]!r} is not a number of "
                            "seconds.") from None
        resolved = []
        for cell in cells[:2]:
            file = path.parent / cell
            if not file.is_file() and Path(f"{file}.gz").is_file():
                file = Path(f"{file}.gz")
            if not file.is_file():
                raise SpecError(f"{path.name}:{number}: file not found: {file}.")
            resolved.append(file)
        out.append(Instance(cells[0], cells[1], resolved[0], resolved[1], timeout))
    if not out:
        raise SpecError(f"{path} lists no instances; expected rows 'onnx, vnnlib, timeout'.")
    return out


def run_instances(
    instances: str | os.PathLike[str],
    results: str | os.PathLike[str],
    *,
    methods: Sequence[str] = ("ibp", "crown", "alpha-crown"),
    use_milp: bool | Literal["auto"] = "auto",
    timeout: float | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    resume: bool = True,
    on_result: Callable[[InstanceResult], None] | None = None,
    use_bab: bool = True,
) -> list[InstanceResult]:
    """Run every instance of a VNN-COMP benchmark and write one results CSV.

    The CSV (:data:`RESULT_COLUMNS`, with a header) is rewritten atomically after every
    instance, so a crash or Ctrl-C loses at most the instance in progress; with `resume`,
    instances already in `results` are not run again.

    Args:
        instances: The benchmark's ``instances.csv``.
        results: The results CSV to write.
        timeout: Seconds per instance instead of the csv's.
        input_shape, mean, std: For every network, as in :func:`certify.model_io.load_model`.
        on_result: Called after each instance (for progress output).
    Returns:
        The results, in the order of `instances`.
    """
    from certify._io import atomic_open
    from certify.errors import CertifyError
    from certify.model_io import load_model

    todo = read_instances(instances)
    done: dict[tuple[str, str], InstanceResult] = {}
    results = Path(results)
    if resume and results.is_file():
        with open(results, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    item = InstanceResult(row["onnx"], row["vnnlib"], row["result"],
                                          float(row["seconds"]), row["method"])
                except (KeyError, TypeError, ValueError):
                    raise SpecError(f"{results} is not a results CSV of certify verify (columns "
                                    f"{', '.join(RESULT_COLUMNS)}); remove it or pass another "
                                    "file.") from None
                if item.result != "error":  # errors run again
                    done[(item.onnx, item.vnnlib)] = item
    out: list[InstanceResult] = []
    models: dict[Path, tuple[nn.Sequential, ModelMeta] | CertifyError] = {}
    for instance in todo:
        key = (instance.onnx, instance.vnnlib)
        if key in done:
            out.append(done[key])
            continue
        start = time.perf_counter()
        try:
            if instance.onnx_path not in models:  # each network is loaded once
                try:
                    models[instance.onnx_path] = load_model(
                        instance.onnx_path, device=device, input_shape=input_shape, mean=mean,
                        std=std)
                except CertifyError as e:
                    models[instance.onnx_path] = e
            loaded = models[instance.onnx_path]
            if isinstance(loaded, CertifyError):
                raise loaded
            verdict = _verify_spec(*loaded, instance.vnnlib_path, start=start,
                                   timeout=timeout or instance.timeout, methods=methods,
                                   use_milp=use_milp, seed=seed, use_bab=use_bab)
            item = InstanceResult(instance.onnx, instance.vnnlib, verdict.result, verdict.seconds,
                                  verdict.method or "")
        except CertifyError as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            item = InstanceResult(instance.onnx, instance.vnnlib, "error", 0.0, message)
        done[key] = item
        out.append(item)
        with atomic_open(results, "w") as f:
            writer = csv.DictWriter(f, fieldnames=list(RESULT_COLUMNS))
            writer.writeheader()
            for result in done.values():
                writer.writerow(result.row())
        if on_result is not None:
            on_result(item)
    return out
