"""Exact minimal adversarial eps by MILP: equal to a brute-force enumeration on 2-D networks,
between every certified eps and the attack eps, and honest about time limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from brute_force import make_net2d, min_adv_eps, regions
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.attacks import min_adversarial_eps
from certify.bounds import margin_bounds
from certify.errors import SoundnessError, SpecError
from certify.radius import certified_radii

pytest.importorskip("cvxpy")

import certify.bounds.solver as solver_module  # noqa: E402
from certify.exact import STATUSES, ExactResult, check_sandwich, exact_radii  # noqa: E402

pytestmark = pytest.mark.solver
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _points(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), widths=st.sampled_from([[6, 3], [8], [5, 4], [4, 3, 3]]))
def test_exact_eps_matches_the_brute_force_enumeration(seed, widths):  # type: ignore[no-untyped-def]
    model = make_net2d(seed, widths)
    x = _points(seed, 3)
    y = model(x).argmax(1)
    y[2] = (y[2] + 1) % 3  # one misclassified sample
    eps_max = 0.6
    result = exact_radii(model, x, y, eps_max=eps_max, tol=1e-7)
    parts = regions(model, np.zeros(2), np.ones(2))
    assert result.status[2] == "optimal" and result.reason[2] == "misclassified"
    assert float(result.exact_eps[2]) == 0.0
    for i in range(2):
        truth = min_adv_eps(parts, x[i].flatten().numpy(), int(y[i]))
        lo, hi = float(result.exact_lo[i]), float(result.exact_hi[i])
        assert lo <= truth + 1e-9, "exact_lo above the true radius"
        if truth > eps_max:
            assert result.status[i] == "above_max" and math.isinf(result.exact_eps[i])
            continue
        assert result.status[i] == "optimal", result.reason[i]
        assert truth <= hi + 1e-9, "exact_hi below the true radius"
        assert abs(float(result.exact_eps[i]) - truth) <= 1e-7 + float(result.tolerance[i])


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), widths=st.sampled_from([[8, 8], [6, 4], [10]]))
def test_certified_below_exact_below_attack_on_random_nets(seed, widths):  # type: ignore[no-untyped-def]
    model = make_net2d(seed, widths)
    x = _points(seed + 1, 4)
    y = model(x).argmax(1)
    attack = min_adversarial_eps(model, x, y, eps_max=0.5, tol=1e-5,
                                 generator=torch.Generator().manual_seed(seed))
    exact = exact_radii(model, x, y, eps_max=0.5, attack_eps=attack)
    assert all(s in STATUSES for s in exact.status)
    known = exact.known
    for method in ("ibp", "crown", "milp"):
        cert = certified_radii(model, x, y, method, eps_max=0.5, tol=1e-5, attack_eps=attack)
        check_sandwich(exact, certified_eps=cert.certified_eps, attack_eps=attack,
                       method=method)
        slack = exact.tolerance + 1e-9
        assert (cert.certified_eps[known] <= exact.exact_eps[known] + slack[known]).all()
        if method == "milp":  # the MILP-driven search converges to the exact radius ...
            gap = exact.exact_eps - cert.certified_eps
            short = known & (gap > 1e-5 + 2 * slack)
            # ... except where the MILP bound itself fails short of it: it subtracts a tolerance
            # for the solver's (certify.bounds.milp), which near the radius, where the margin is
            # ~1e-6, moves the bound's zero by up to ~1e-5 in eps. There the search must have
            # stopped (search_upper) where the bound fails only by that tolerance: the dual
            # bound before the subtraction still proves every row.
            for i in short.nonzero(as_tuple=True)[0].tolist():
                at = margin_bounds(model, x[i:i + 1], y[i:i + 1], float(cert.search_upper[i]),
                                   "milp")
                assert float(at.lower.min()) <= 0.0
                assert float((at.lower + at.tolerance).min()) > 0.0, (i, gap[i])
    found = torch.isfinite(attack) & known
    assert (exact.exact_eps[found] <= attack[found] + exact.tolerance[found] + 1e-6).all()


@pytest.fixture(scope="module")
def digits_mlp():  # type: ignore[no-untyped-def]
    """mlp-16-16 trained for 5 epochs on digits (a few seconds), and 6 test points."""
    from certify.data import get_dataset_info, load_dataset
    from certify.nets import create_arch

    info = get_dataset_info("digits")
    x, y = load_dataset("digits", "train").tensors()
    xt, yt = load_dataset("digits", "test").tensors()
    torch.manual_seed(0)
    model = create_arch("mlp-16-16", info.input_shape, info.num_classes,
                        mean=list(info.mean), std=list(info.std))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.8
    return model, xt[:6], yt[:6]


def test_certified_below_exact_below_attack_on_a_digits_mlp(digits_mlp):  # type: ignore[no-untyped-def]
    model, x, y = digits_mlp
    attack = min_adversarial_eps(model, x, y, eps_max=0.3, tol=1e-4,
                                 generator=torch.Generator().manual_seed(0))
    exact = exact_radii(model, x, y, eps_max=0.3, attack_eps=attack, time_limit=30)
    assert all(s in STATUSES for s in exact.status)
    assert bool(exact.known.any())
    for method in ("crown", "lp"):
        cert = certified_radii(model, x, y, method, eps_max=0.3, tol=1e-4, attack_eps=attack)
        check_sandwich(exact, certified_eps=cert.certified_eps, attack_eps=attack, method=method)
        k = exact.known
        assert (cert.certified_eps[k] <= exact.exact_eps[k] + exact.tolerance[k] + 1e-6).all()
    k = exact.known & torch.isfinite(attack)
    assert (exact.exact_lo[k] <= attack[k] + exact.tolerance[k] + 1e-6).all()


# ------------------------------------------------------------------------ time limits


def test_a_time_limit_makes_the_sample_unknown(monkeypatch):  # type: ignore[no-untyped-def]
    def timed_out(problem, time_limit, variables, options=None):  # type: ignore[no-untyped-def]
        return solver_module.MilpOutcome("time_limit", 0.01, math.inf, None, time_limit)

    model = make_net2d(11, [8, 8])
    x = _points(0, 3)
    y = model(x).argmax(1)
    honest = exact_radii(model, x, y, eps_max=0.6)
    assert honest.status == ("optimal",) * 3
    monkeypatch.setattr(solver_module, "solve_milp", timed_out)
    result = exact_radii(model, x, y, eps_max=0.6)
    assert result.status == ("unknown",) * 3
    for i in range(3):
        assert "time limit" in result.reason[i]
        assert math.isnan(result.exact_eps[i])
        # what is left is a valid bracket: no better than the solved one
        assert float(result.exact_lo[i]) <= float(honest.exact_lo[i]) + 1e-12
        assert float(result.exact_hi[i]) >= float(honest.exact_hi[i]) - 1e-12


def test_a_real_tiny_time_limit_is_unknown_not_exact():  # type: ignore[no-untyped-def]
    model = make_net2d(8, [30, 30, 30])
    x = _points(8, 1)
    y = model(x).argmax(1)
    result = exact_radii(model, x, y, eps_max=0.8, time_limit=1e-3, intermediate_method="crown")
    assert result.problems[0] > 0  # some class needed a MILP: it cannot finish in 1 ms
    assert result.status[0] == "unknown" and "time limit" in result.reason[0]
    assert float(result.exact_lo[0]) <= float(result.exact_hi[0])


# ---------------------------------------------------------------------- the check itself


def _result(lo: float, hi: float, tolerance: float = 0.0) -> ExactResult:
    one = torch.tensor([0])
    return ExactResult(one, one, one, torch.tensor([hi], dtype=F64),
                       torch.tensor([lo], dtype=F64), torch.tensor([hi], dtype=F64),
                       ("optimal",), ("",), one, one, torch.tensor([tolerance], dtype=F64),
                       torch.zeros(1, dtype=F64))


def test_check_sandwich_raises_on_violations():  # type: ignore[no-untyped-def]
    r = _result(0.10, 0.1001, tolerance=1e-6)
    check_sandwich(r, certified_eps=torch.tensor([0.1001]), attack_eps=torch.tensor([0.1]))
    with pytest.raises(SoundnessError, match="certified eps .*crown.* > exact eps"):
        check_sandwich(r, certified_eps=torch.tensor([0.1002]), method="crown")
    with pytest.raises(SoundnessError, match="> attack eps"):
        check_sandwich(r, attack_eps=torch.tensor([0.0999]))
    check_sandwich(r, attack_eps=torch.tensor([math.inf]))


def test_bad_arguments_are_one_line_errors():  # type: ignore[no-untyped-def]
    model = make_net2d(0, [4])
    x = _points(0, 2)
    y = torch.tensor([0, 1])
    with pytest.raises(SpecError, match="eps_max must be a finite number > 0"):
        exact_radii(model, x, y, eps_max=0)
    with pytest.raises(SpecError, match="time_limit must be a finite number > 0"):
        exact_radii(model, x, y, time_limit=-1)
    with pytest.raises(SpecError, match="attack_eps must be >= 0"):
        exact_radii(model, x, y, attack_eps=torch.tensor([-1.0, 0.1]))
    with pytest.raises(SpecError, match=r"y must be integer labels of shape \(2,\)"):
        exact_radii(model, x, torch.tensor([0]))
    with pytest.raises(SpecError, match=r"x must lie in \[0, 1\]"):
        exact_radii(model, x + 2, y)
    with pytest.raises(SpecError, match="intermediate_method must be one of"):
        exact_radii(model, x, y, intermediate_method="exact")


# ------------------------------------------------------------------ certify area --exact


def test_area_with_milp_and_exact_end_to_end(digits_mlp, tmp_path):  # type: ignore[no-untyped-def]
    """``certify area --method crown --method milp --exact``: the exact column, the sandwich,
    the milp radius at the exact eps, the ratio in the summary, the figure, and resume."""
    import csv
    import json

    from click.testing import CliRunner

    from certify.checkpoint import ModelMeta, save_checkpoint
    from certify.cli import main
    from certify.nets import arch_kwargs_of
    from certify.report.plots import plot_runs

    model, _, _ = digits_mlp
    ckpt = tmp_path / "mlp.pt"
    save_checkpoint(ckpt, model, ModelMeta("mlp", arch_kwargs_of(model), "digits", (1, 8, 8),
                                           10, (0.3052,), (0.376,)))
    out = tmp_path / "run"
    args = ["area", str(ckpt), "--dataset", "digits", "--n", "4", "--batch-size", "2",
            "--method", "crown", "--method", "milp", "--exact", "--eps-max", "0.2",
            "--tol", "1e-3", "-o", str(out), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"exact_eps", "exact_status"} <= set(rows[0])
    for r in rows:
        status = r["exact_status"]
        assert status in ("optimal", "above_max") or status.startswith("unknown: ")
        if status != "optimal" or r["label"] != r["prediction"]:
            continue
        exact_eps, cert = float(r["exact_eps"]), float(r["certified_eps"])
        assert cert <= exact_eps + 1e-5 <= float(r["attack_eps"]) + 2e-5
        if r["method"] == "milp":  # the MILP-driven search ends within tol of the exact eps
            assert exact_eps - cert <= 1e-3 + 1e-5
    assert summary["milp"]["n_exact"] >= 1
    # within tol (1e-3) of the exact eps: the ratio is near 1 except for tiny radii (one of the
    # four points here has exact eps 0.003, so its ratio can be 0.7)
    assert summary["milp"]["median_exact_ratio"] > 0.95
    assert summary["crown"]["mean_exact_ratio"] <= summary["milp"]["mean_exact_ratio"] + 1e-9
    assert "certified÷exact" in (out / "summary.md").read_text()
    assert (out / "sorted_eps.png").stat().st_size > 0
    assert plot_runs([out]).is_file()
    # a finished run resumes to the same rows; other exact settings are refused
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    with open(out / "per_sample.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows
    other = CliRunner().invoke(main, [*args[:-3], "--exact-time-limit", "5", "-o", str(out),
                                      "--quiet", "--resume"])
    assert other.exit_code != 0 and "exact_time_limit" in other.output


def test_complete_computations_report_every_sample_with_an_eta(digits_mlp, tmp_path):  # type: ignore[no-untyped-def]
    """``--exact`` and ``--method milp``: one stderr line per sample, with an ETA, also in logs."""
    from click.testing import CliRunner

    from certify.checkpoint import ModelMeta, save_checkpoint
    from certify.cli import main
    from certify.nets import arch_kwargs_of

    model, _, _ = digits_mlp
    ckpt = tmp_path / "mlp.pt"
    save_checkpoint(ckpt, model, ModelMeta("mlp", arch_kwargs_of(model), "digits", (1, 8, 8),
                                           10, (0.3052,), (0.376,)))
    result = CliRunner().invoke(main, [
        "area", str(ckpt), "--dataset", "digits", "--n", "3", "--batch-size", "2", "--method",
        "milp", "--exact", "--eps-max", "0.2", "--tol", "1e-3", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    for what in ("exact ε (mlp)", "milp radius (mlp)"):
        mine = [ln for ln in lines if ln.startswith(what)]
        assert len(mine) == 3, (what, lines)
        assert "1/3 samples" in mine[0] and "ETA" in mine[0]
        assert "3/3 samples done" in mine[-1]
    assert "ETA" not in result.stdout


def test_sample_progress_eta_from_the_mean_time_per_sample(capsys):  # type: ignore[no-untyped-def]
    from certify.utils import SampleProgress

    now = [0.0]
    log = SampleProgress("exact ε", 4, clock=lambda: now[0])
    now[0] = 30.0
    log(7)
    now[0] = 60.0
    log(9)      # 2 samples in 60 s: 2 left take 60 s more
    err = capsys.readouterr().err.splitlines()
    assert err == ["exact ε: 1/4 samples (last: sample 7), 30 s elapsed, ETA 1 min 30 s",
                   "exact ε: 2/4 samples (last: sample 9), 1 min 00 s elapsed, ETA 1 min 00 s"]
    SampleProgress("quiet", 1, quiet=True)(0)
    assert capsys.readouterr().err == ""


def test_sample_progress_counts_only_its_own_time(capsys):  # type: ignore[no-untyped-def]
    from certify.utils import SampleProgress

    now = [0.0]
    log = SampleProgress("milp radius", 2, clock=lambda: now[0])
    now[0] = 100.0          # other work (the exact radii) before the first sample
    with log.active():
        now[0] = 110.0
    log(0)
    assert capsys.readouterr().err.strip() == (
        "milp radius: 1/2 samples (last: sample 0), 10 s elapsed, ETA 10 s")
