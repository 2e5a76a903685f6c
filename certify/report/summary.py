"""Aggregates of per-sample results: certification area, certified accuracy, ratios, throughput.

Definitions (all over the samples of one method):

- **clean accuracy**: fraction with ``prediction == label``;
- **certification area**: mean certified eps over *all* samples, misclassified ones counting 0
  (the area under the sorted certified-eps curve, divided by the number of samples);
- **certified accuracy at eps**: fraction classified correctly with ``certified_eps >= eps``;
- **attack accuracy at eps**: fraction classified correctly with ``attack_eps > eps`` (no
  adversarial example was found at eps);
- **certified/attack ratio**: ``certified_eps / attack_eps`` over correctly classified samples
  with a finite attack eps > 0; its mean and median say how tight the certificate is;
- **throughput**: samples per second of search time;
- **certified/exact ratio** (runs with exact eps, ``certify area --exact``): ``certified_eps /
  exact_eps`` over correctly classified samples whose exact eps is known (status ``optimal``)
  and finite and > 0 -- the honest tightness of a relaxation (the attack eps is only an upper
  bound on the truth); samples whose exact eps is ``unknown`` are counted, not used.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from certify._io import atomic_write_text
from certify.records import SampleRow, json_safe


@dataclass(frozen=True)
class MethodSummary:
    """Aggregates of one bound method's per-sample results.

    Attributes:
        method: Bound method name.
        n: Number of samples.
        clean_accuracy: Fraction classified correctly.
        certification_area: Mean certified eps over all samples (misclassified count 0).
        median_certified_eps: Median certified eps over all samples.
        certified_accuracy: ``((eps, fraction), ...)`` over the eps grid.
        attack_accuracy: ``((eps, fraction), ...)``, or None when no attack eps is known.
        mean_attack_eps: Mean finite attack eps over correctly classified samples (nan if none).
        mean_ratio, median_ratio: certified/attack eps over correctly classified samples with a
            finite attack eps > 0 (nan if none).
        n_ratio: How many samples the ratio is taken over.
        evaluations_per_sample: Mean bound evaluations over correctly classified samples.
        seconds: Total search time.
        samples_per_second: ``n / seconds``.
        mean_exact_ratio, median_exact_ratio: certified/exact eps over correctly classified
            samples with a known, finite exact eps > 0 (nan if none).
        n_exact: How many samples the exact ratio is taken over.
        n_exact_unknown: Correctly classified samples whose exact eps is ``unknown``.
    """

    method: str
    n: int
    clean_accuracy: float
    certification_area: float
    median_certified_eps: float
    certified_accuracy: tuple[tuple[float, float], ...]
    attack_accuracy: tuple[tuple[float, float], ...] | None
    mean_attack_eps: float
    mean_ratio: float
    median_ratio: float
    n_ratio: int
    evaluations_per_sample: float
    seconds: float
    samples_per_second: float
    mean_exact_ratio: float = math.nan
    median_exact_ratio: float = math.nan
    n_exact: int = 0
    n_exact_unknown: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (numbers stay numbers; nan/inf become null)."""
        d: dict[str, Any] = {
            "method": self.method,
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            "certification_area": self.certification_area,
            "median_certified_eps": self.median_certified_eps,
            "certified_accuracy": [{"eps": e, "accuracy": a} for e, a in self.certified_accuracy],
            "attack_accuracy": (None if self.attack_accuracy is None else
                                [{"eps": e, "accuracy": a} for e, a in self.attack_accuracy]),
            "mean_attack_eps": self.mean_attack_eps,
            "mean_ratio": self.mean_ratio,
            "median_ratio": self.median_ratio,
            "n_ratio": self.n_ratio,
            "evaluations_per_sample": self.evaluations_per_sample,
            "seconds": self.seconds,
            "samples_per_second": self.samples_per_second,
        }
        if self.n_exact or self.n_exact_unknown:
            d.update({"mean_exact_ratio": self.mean_exact_ratio,
                      "median_exact_ratio": self.median_exact_ratio,
                      "n_exact": self.n_exact, "n_exact_unknown": self.n_exact_unknown})
        return json_safe(d)


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 (times a power of ten) that is >= `value`."""
    if not (value > 0 and math.isfinite(value)):
        return 0.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if step * power >= value * (1 - 1e-12):
            return step * power
    return 10.0 * power


def default_eps_grid(rows: Sequence[SampleRow], points: int = 6) -> tuple[float, ...]:
    """`points` evenly spaced eps from 0 to a round number above the largest finite eps.

    The top is the largest finite attack eps, or the largest certified eps when there is no
    attack; rounded up to 1, 2, 2.5 or 5 times a power of ten.
    """
    attack = [r.attack_eps for r in rows if math.isfinite(r.attack_eps) and r.correct]
    cert = [r.certified_eps for r in rows]
    top = _nice_ceiling(max(attack) if attack else max(cert, default=0.0))
    if top == 0.0:
        return (0.0,)
    return tuple(round(top * k / (points - 1), 12) for k in range(points))


def summarize_method(rows: Sequence[SampleRow], eps_grid: Sequence[float]) -> MethodSummary:
    """Aggregates of one method's rows (see the module docstring for the definitions).

    Raises:
        ValueError: no rows, or rows of several methods.
    """
    if not rows:
        raise ValueError("no rows to summarize")
    methods = {r.method for r in rows}
    if len(methods) != 1:
        raise ValueError(f"rows of several methods {sorted(methods)}; use summarize()")
    n = len(rows)
    correct = [r for r in rows if r.correct]
    cert = [r.certified_eps if r.correct else 0.0 for r in rows]
    grid = sorted(float(e) for e in eps_grid)
    certified_accuracy = tuple((e, sum(r.certified_eps >= e for r in correct) / n) for e in grid)
    has_attack = any(math.isfinite(r.attack_eps) for r in rows)
    attack_accuracy = (tuple((e, sum(r.attack_eps > e for r in correct) / n) for e in grid)
                       if has_attack else None)
    finite_attack = [r.attack_eps for r in correct if math.isfinite(r.attack_eps)]
    ratios = [r.certified_eps / r.attack_eps for r in correct
              if math.isfinite(r.attack_eps) and r.attack_eps > 0]
    seconds = sum(r.seconds for r in rows)
    exact_ratios = [r.certified_eps / r.exact_eps for r in correct
                    if r.exact_status == "optimal" and r.exact_eps is not None
                    and 0 < r.exact_eps < math.inf]
    return MethodSummary(
        method=rows[0].method,
        n=n,
        clean_accuracy=len(correct) / n,
        certification_area=sum(cert) / n,
        median_certified_eps=statistics.median(cert),
        certified_accuracy=certified_accuracy,
        attack_accuracy=attack_accuracy,
        mean_attack_eps=statistics.fmean(finite_attack) if finite_attack else math.nan,
        mean_ratio=statistics.fmean(ratios) if ratios else math.nan,
        median_ratio=statistics.median(ratios) if ratios else math.nan,
        n_ratio=len(ratios),
        evaluations_per_sample=(statistics.fmean(r.evaluations for r in correct)
                                if correct else 0.0),
        seconds=seconds,
        samples_per_second=n / seconds if seconds > 0 else math.inf,
        mean_exact_ratio=statistics.fmean(exact_ratios) if exact_ratios else math.nan,
        median_exact_ratio=statistics.median(exact_ratios) if exact_ratios else math.nan,
        n_exact=len(exact_ratios),
        n_exact_unknown=sum(r.exact_status.startswith("unknown") for r in correct),
    )


def summarize(rows: Sequence[SampleRow], *, eps_grid: Sequence[float] | None = None
              ) -> dict[str, MethodSummary]:
    """One :class:`MethodSummary` per method, in the order methods first appear.

    Args:
        rows: Per-sample rows of one run (any number of methods).
        eps_grid: Radii for the certified/attack accuracy; default :func:`default_eps_grid`
            of all rows (one grid shared by every method, so they compare).
    """
    grid = tuple(eps_grid) if eps_grid is not None else default_eps_grid(rows)
    by_method: dict[str, list[SampleRow]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    return {m: summarize_method(rs, grid) for m, rs in by_method.items()}


def _fmt(value: float, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def summary_table(summaries: Mapping[str, MethodSummary]) -> str:
    """A plain-text table, one line per method (what ``certify area`` prints)."""
    exact = _has_exact(summaries)
    head = (f"{'method':<12} {'n':>6} {'clean acc':>9} {'area':>9} {'median eps':>10} "
            f"{'cert/attack':>11} {'evals/sample':>12} {'samples/s':>9}")
    if exact:  # mean certified/exact over the samples with a known exact eps
        head += f" {'cert/exact':>10}"
    lines = [head]
    for s in summaries.values():
        line = (
            f"{s.method:<12} {s.n:>6} {s.clean_accuracy:>9.4f} {_fmt(s.certification_area):>9} "
            f"{_fmt(s.median_certified_eps):>10} {_fmt(s.median_ratio, '.3f'):>11} "
            f"{s.evaluations_per_sample:>12.2f} {_fmt(s.samples_per_second, '.1f'):>9}")
        if exact:
            line += f" {_fmt(s.mean_exact_ratio, '.3f'):>10}"
        lines.append(line)
    return "\n".join(lines)


def _has_exact(summaries: Mapping[str, MethodSummary]) -> bool:
    return any(s.n_exact or s.n_exact_unknown for s in summaries.values())


def summary_markdown(*, title: str, summaries: Mapping[str, MethodSummary],
                     settings: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """The text of ``summary.md``: settings, one table of aggregates, certified accuracy, figures.

    Args:
        title: First heading, e.g. ``certify area: teacher.pt on svhn/test``.
        summaries: Per-method aggregates.
        settings: Key settings to list (model, dataset, eps_max, tol, ...).
        figures: Caption -> relative path of each figure.
    """
    out = [f"# {title}", ""]
    for k, v in settings.items():
        out.append(f"- **{k}**: {v}")
    exact = _has_exact(summaries)
    out += ["", "| method | n | clean accuracy | certification area | median certified ε | "
            "mean / median certified÷attack | bound evaluations / sample | samples / s |"
            + (" mean / median certified÷exact |" if exact else ""),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            + (" ---: |" if exact else "")]
    for s in summaries.values():
        out.append(f"| {s.method} | {s.n} | {s.clean_accuracy:.4f} | "
                   f"{_fmt(s.certification_area, '.5g')} | {_fmt(s.median_certified_eps, '.5g')} | "
                   f"{_fmt(s.mean_ratio, '.3f')} / {_fmt(s.median_ratio, '.3f')} "
                   f"(n={s.n_ratio}) | {s.evaluations_per_sample:.2f} | "
                   f"{_fmt(s.samples_per_second, '.1f')} |"
                   + (f" {_fmt(s.mean_exact_ratio, '.3f')} / {_fmt(s.median_exact_ratio, '.3f')}"
                      f" (n={s.n_exact}) |" if exact else ""))
    if exact:
        unknown = max(s.n_exact_unknown for s in summaries.values())
        out += ["", "certified÷exact is the honest tightness of each method: the exact ε is the "
                "MILP's minimal adversarial ε (certify.exact)"
                + (f"; it is unknown (time limit) for {unknown} correctly classified sample(s), "
                   "left out of the ratio." if unknown else ".")]
    first = next(iter(summaries.values()), None)
    if first is not None:
        grid = [e for e, _ in first.certified_accuracy]
        out += ["", "Certified accuracy (attack accuracy in parentheses) at ε:", "",
                "| method | " + " | ".join(f"{e:.4g}" for e in grid) + " |",
                "| --- |" + " ---: |" * len(grid)]
        for s in summaries.values():
            cells = []
            for k, (_, acc) in enumerate(s.certified_accuracy):
                att = f" ({s.attack_accuracy[k][1]:.3f})" if s.attack_accuracy else ""
                cells.append(f"{acc:.3f}{att}")
            out.append(f"| {s.method} | " + " | ".join(cells) + " |")
    if figures:
        out.append("")
        for caption, path in figures.items():
            out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def write_summary_md(path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write :func:`summary_markdown` to `path` atomically."""
    atomic_write_text(path, summary_markdown(**kwargs))
