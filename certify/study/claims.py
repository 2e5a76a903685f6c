"""The thesis's conclusions as checks computed from a study's numbers.

:func:`compute_claims` takes the numbers an experiment measured (``study.json``'s content) and
says, claim by claim, whether they support the thesis. An area claim with per-point evidence
(``results["area_ci"]``, see :mod:`certify.study.certifiers`) is *supported*, *contradicted* or
*inconclusive* by whether the 95% bootstrap interval of the area ratio excludes 1, under the
main certifier, with the verdict of every other certifier next to it; the other claims say
``yes``/``no`` with the numbers, and every claim says ``n/a`` where the run lacks a model it
needs. Nothing here is written by hand per run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TEACHER = "teacher"
STUDENT = "student"
PRUNED = "student-pruned"
ROBUST_TEACHER = "robust-teacher"
ROBUST_STUDENT = "robust-student"
RETRAINED = "robust-student-retrained"
ROBUST_SHALLOW = "robust-shallow"


@dataclass(frozen=True)
class Claim:
    """One conclusion of the thesis checked against a run.

    Attributes:
        key: Short identifier.
        statement: The claim in words.
        supported: True/False, or None where the run cannot decide it (a model is missing).
        evidence: The numbers behind the verdict.
    """

    key: str
    statement: str
    supported: bool | None
    evidence: str
    status: str = ""
    by_certifier: tuple[tuple[str, str], ...] = ()
    flips: bool = False

    @property
    def attack_disagrees(self) -> bool:
        """Whether the area under the attack eps (an upper bound) gives another verdict than
        the main certifier: the difference may be the certifier's rather than the models'."""
        by = dict(self.by_certifier)
        return bool(self.status) and "attack" in by and by["attack"] != self.status

    @property
    def verdict(self) -> str:
        """``supported``/``contradicted``/``inconclusive`` for an area claim decided by its
        bootstrap interval; otherwise ``yes``/``no``/``n/a``."""
        if self.status:
            return self.status
        return {True: "yes", False: "no", None: "n/a"}[self.supported]


def _area(models: Mapping[str, Any], label: str) -> float | None:
    m = models.get(label)
    v = m.get("certification_area") if m else None
    return float(v) if v is not None else None


def _acc(models: Mapping[str, Any], label: str) -> float | None:
    m = models.get(label)
    v = m.get("test_accuracy") if m else None
    return float(v) if v is not None else None


def _greater(key: str, statement: str, a_label: str, a: float | None, b_label: str,
             b: float | None, what: str = "area",
             intervals: Mapping[str, Any] | None = None, primary: str = "") -> Claim:
    if intervals and primary in intervals:
        return _interval_claim(key, statement, a_label, b_label, intervals, primary)
    if a is None or b is None:
        return Claim(key, statement, None, f"needs {a_label} and {b_label}")
    return Claim(key, statement, a > b, f"{a_label} {what} {a:.5f} vs {b_label} {b:.5f} "
                 f"({_relative(a, b)})")


def _interval_claim(key: str, statement: str, a_label: str, b_label: str,
                    intervals: Mapping[str, Any], primary: str) -> Claim:
    """An area claim decided by the 95% bootstrap interval of the ratio under `primary`."""
    from certify.study.certifiers import describe, flips

    ci = intervals[primary]
    status = str(ci["verdict"])
    supported = {"supported": True, "contradicted": False}.get(status)
    seeds = f" x {ci['seeds']} seeds" if ci["seeds"] > 1 else ""
    evidence = (f"{a_label} vs {b_label} area under {primary}: {describe(ci)} "
                f"({100 * ci['level']:.0f}% paired bootstrap, {ci['points']} points{seeds})")
    by = tuple((c, str(v["verdict"])) for c, v in intervals.items())
    flipped = flips(intervals)
    if flipped:
        evidence += "; the verdict changes with the certifier"
    attack = intervals.get("attack")
    if attack is not None and attack["verdict"] != status:
        evidence += (f"; under the attack ε (an upper bound) it is {attack['verdict']}: "
                     f"{describe(attack)}, so the difference may be the certifier's "
                     "(see the relaxation gaps)")
    return Claim(key, statement, supported, evidence, status, by, flipped)


def _relative(a: float, b: float) -> str:
    if b == 0:
        return "ratio undefined"
    return f"x{a / b:.2f}"


def small_eps_points(eps: Sequence[float], small_eps: float | None) -> list[int]:
    """Indices of the grid's nonzero eps at most `small_eps` (default: the lowest third)."""
    nonzero = [e for e in eps if e > 0]
    if not nonzero:
        return []
    limit = small_eps if small_eps is not None else max(nonzero) / 3
    picked = [i for i, e in enumerate(eps) if 0 < e <= limit + 1e-12]
    return picked or [eps.index(min(nonzero))]


def compute_claims(results: Mapping[str, Any], *, prune_tolerance: float = 2.0,
                   small_eps: float | None = None) -> list[Claim]:
    """Check the thesis's conclusions against a study's numbers.

    Args:
        results: ``{"models": {label: {"test_accuracy", "certification_area", ...}},
            "attack": {label: {"eps": [...], "accuracy": [...]}}, "sweep": {"temperature":
            {T: accuracy}, "logits": accuracy}}`` with the labels of this module.
        prune_tolerance: Accuracy loss (percentage points) the pruned student may show.
        small_eps: The "small eps" of the PGD claim (default: the lowest third of the grid).
    Returns:
        The claims in the thesis's order.
    """
    models = results.get("models", {})
    ci = results.get("area_ci") or {}
    primary = str(results.get("method", ""))

    def area(key: str, statement: str, a: str, b: str) -> Claim:
        return _greater(key, statement, a, _area(models, a), b, _area(models, b),
                        intervals=ci.get(key), primary=primary)

    claims = [
        area("distilled-area", "The distilled student's certification area is larger than its "
             "normally trained teacher's (Figs 8.30/8.31).", STUDENT, TEACHER),
        area("robust-teacher-area", "The robust teacher's certification area is larger than "
             "the robust-distilled student's (Fig 8.47).", ROBUST_TEACHER, ROBUST_STUDENT),
        area("retrain-raises-area", "Robust re-training raises the robust-distilled student's "
             "certification area (Fig 8.48, left).", RETRAINED, ROBUST_STUDENT),
        area("distillation-vs-scratch", "The re-trained distilled student's certification "
             "area is larger than that of the same shallow net trained robustly from scratch "
             "(Fig 8.48).", RETRAINED, ROBUST_SHALLOW),
        _prune_claim(models, prune_tolerance),
        _sweep_claim(results.get("sweep") or {}),
        _pgd_claim(results.get("attack") or {}, small_eps),
    ]
    return claims


def _prune_claim(models: Mapping[str, Any], tolerance: float) -> Claim:
    statement = (f"The pruned student's accuracy is within {tolerance:g} points of the unpruned "
                 "student's (Table 8.10).")
    a, b = _acc(models, PRUNED), _acc(models, STUDENT)
    if a is None or b is None:
        return Claim("pruned-accuracy", statement, None, f"needs {PRUNED} and {STUDENT}")
    params = ""
    pa = models[PRUNED].get("parameters")
    pb = models[STUDENT].get("parameters")
    if pa and pb:
        params = f"; parameters {pb:,} -> {pa:,} ({100 * (1 - pa / pb):.0f}% fewer)"
    drop = 100 * (b - a)
    return Claim("pruned-accuracy", statement, drop <= tolerance,
                 f"pruned {100 * a:.2f}% vs unpruned {100 * b:.2f}% (drop {drop:+.2f} points)"
                 f"{params}")


def _sweep_claim(sweep: Mapping[str, Any]) -> Claim:
    statement = ("Temperature-trained (Hinton) students beat the logit-matched one (Tables "
                 "8.7/8.8).")
    temps = sweep.get("temperature") or {}
    logits = sweep.get("logits")
    if not temps or logits is None:
        return Claim("temperature-vs-logits", statement, None, "needs a temperature sweep with "
                     "logit matching")
    val = sweep.get("temperature_validation") or {}
    if temps.keys() <= val.keys() and all(val[t] is not None for t in temps):
        key = max(temps, key=lambda t: float(val[t]))   # chosen on validation, as the sweep does
        how = "chosen on validation"
    else:   # an older record without validation accuracies
        key = max(temps, key=lambda t: float(temps[t]))
        how = "best on test"
    best_t, best = float(key), float(temps[key])
    return Claim("temperature-vs-logits", statement, best > float(logits),
                 f"T={best_t:g} ({how}): {100 * best:.2f}% vs logits {100 * float(logits):.2f}% "
                 "(test accuracy)")


def _pgd_claim(attack: Mapping[str, Any], small_eps: float | None) -> Claim:
    statement = ("For small ε the pruned student is more robust under PGD than the teacher "
                 "(Figs 8.19/8.22).")
    t, p = attack.get(TEACHER), attack.get(PRUNED)
    if not t or not p:
        return Claim("pruned-pgd-small-eps", statement, None, f"needs PGD curves of {TEACHER} "
                     f"and {PRUNED}")
    eps = [float(e) for e in t["eps"]]
    if [float(e) for e in p["eps"]] != eps:
        return Claim("pruned-pgd-small-eps", statement, None, "the two curves use other grids")
    idx = small_eps_points(eps, small_eps)
    if not idx:
        return Claim("pruned-pgd-small-eps", statement, None, "the grid has no eps > 0")
    mean_t = sum(float(t["accuracy"][i]) for i in idx) / len(idx)
    mean_p = sum(float(p["accuracy"][i]) for i in idx) / len(idx)
    shown = ", ".join(f"{eps[i]:g}" for i in idx)
    return Claim("pruned-pgd-small-eps", statement, mean_p > mean_t,
                 f"mean PGD accuracy over ε in {{{shown}}}: pruned {100 * mean_p:.2f}% vs "
                 f"teacher {100 * mean_t:.2f}%")


def claims_markdown(claims: Sequence[Claim]) -> str:
    """The claim table in markdown, with a one-line tally."""
    lines = ["| claim | verdict | evidence |", "|---|:---:|---|"]
    for c in claims:
        mark = f"**{c.verdict}**" if c.verdict not in ("n/a", "inconclusive") else c.verdict
        if c.flips:
            mark += " (flips with the certifier)"
        if c.attack_disagrees:
            mark += " (the attack area disagrees)"
        lines.append(f"| {c.statement} | {mark} | {c.evidence} |")
    decided = [c for c in claims if c.supported is not None]
    yes = sum(1 for c in decided if c.supported)
    open_ = [c for c in claims if c.supported is None]
    inconclusive = sum(1 for c in open_ if c.status == "inconclusive")
    lines += ["", f"{yes} of {len(decided)} decided claims supported by this run"
              + (f" ({inconclusive} inconclusive, {len(open_) - inconclusive} not decidable)."
                 if open_ else ".")]
    return "\n".join(lines) + "\n"

