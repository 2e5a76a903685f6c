"""VNNLIB parsing: boxes, unsafe sets in DNF, and errors that name the line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.errors import SpecError
from certify.vnnlib import parse_vnnlib, read_vnnlib


def declare(n_in: int, n_out: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(n_out))


def box(lower: list[float], upper: list[float]) -> str:
    return "".join(f"(assert (<= X_{i} {u}))\n(assert (>= X_{i} {lo}))\n"
                   for i, (lo, u) in enumerate(zip(lower, upper, strict=True)))


def test_box_both_orientations_and_and() -> None:
    text = declare(3, 2) + """
(assert (<= X_0 0.5))
(assert (>= X_0 -0.25))
(assert (<= 0.1 X_1))
(assert (>= 0.2 X_1))
(assert (and (<= X_2 1e-3) (>= X_2 -1E-3) (<= X_2 0.5)))
(assert (<= Y_0 Y_1))
"""
    prop = parse_vnnlib(text)
    assert prop.lower.tolist() == [-0.25, 0.1, -1e-3]
    assert prop.upper.tolist() == [0.5, 0.2, 1e-3]
    assert prop.num_inputs == 3 and prop.num_outputs == 2 and len(prop.disjuncts) == 1
    d = prop.disjuncts[0]
    assert d.matrix.tolist() == [[1.0, -1.0]] and d.bound.tolist() == [0.0]


def test_robustness_disjunction_is_one_conjunction_per_class() -> None:
    """The VNN-COMP shape: label 0 is safe iff no other output reaches Y_0."""
    text = declare(2, 4) + box([0, 0], [1, 1]) + \
        "(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0)) (and (>= Y_3 Y_0))))\n"
    prop = parse_vnnlib(text)
    assert len(prop.disjuncts) == 3
    y = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    assert prop.is_unsafe(y).tolist() == [False, True, True]
    for j, d in enumerate(prop.disjuncts, start=1):
        expected = [0.0] * 4
        expected[0], expected[j] = 1.0, -1.0
        assert d.matrix.tolist() == [expected]


def test_nested_formulas_scaled_terms_constants_and_strictness() -> None:
    text = declare(1, 3) + box([0], [1]) + """
(assert (and (or (<= (+ Y_0 (* 2 Y_1)) 3) (> Y_2 (- 1)))
             (or (= Y_0 (/ Y_1 2)) (< (- Y_0 Y_2) -0.5))))
"""
    prop = parse_vnnlib(text)
    assert len(prop.disjuncts) == 4

    def unsafe_by_hand(y0: float, y1: float, y2: float) -> bool:
        first = y0 + 2 * y1 <= 3 or y2 > -1
        second = y0 == y1 / 2 or y0 - y2 < -0.5
        return first and second

    g = torch.Generator().manual_seed(0)
    ys = torch.cat([torch.randint(-3, 4, (400, 3), generator=g).double() / 2,
                    torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 0.5], [1.0, 1.0, -1.0]])])
    expected = [unsafe_by_hand(*row) for row in ys.tolist()]
    assert prop.is_unsafe(ys).tolist() == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(-3, 3), st.sampled_from(["<=", ">="])),
                min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(-4, 4), st.integers(-4, 4), st.integers(-4, 4)),
                min_size=1, max_size=20))
def test_single_rows_agree_with_direct_evaluation(rows: list, ys: list) -> None:
    """An (or ...) of single comparisons Y_j op c: unsafe iff one of them holds."""
    atoms = " ".join(f"(and ({op} Y_{j} {c}))" for j, c, op in rows)
    prop = parse_vnnlib(declare(1, 3) + box([0], [1]) + f"(assert (or {atoms}))\n")
    y = torch.tensor(ys, dtype=torch.float64)
    expected = [any((v[j] <= c) if op == "<=" else (v[j] >= c) for j, c, op in rows)
                for v in ys]
    assert prop.is_unsafe(y).tolist() == expected


def test_input_box_reshapes_and_rounds_outward() -> None:
    prop = parse_vnnlib(declare(4, 1) + box([0.1, 0.2, 0.3, 0.3], [0.1, 0.3, 0.7, 1.0 / 3]) +
                        "(assert (<= Y_0 0))\n")
    lo, hi = prop.input_box((1, 2, 2))
    assert lo.shape == (1, 1, 2, 2) and lo.dtype == torch.float32
    assert (lo.double().flatten() <= prop.lower).all()
    assert (hi.double().flatten() >= prop.upper).all()
    assert prop.contains(prop.lower.reshape(1, -1)).item()
    assert not prop.contains(hi.double()).item()  # 0.7 and 1/3 round up in float32
    with pytest.raises(SpecError, match="4 inputs"):
        prop.input_box((1, 3, 3))


def test_gzip_and_comments(tmp_path: Path) -> None:
    text = "; a comment\n" + declare(1, 2) + box([0], [1]) + "(assert (<= Y_0 Y_1)) ; tail\n"
    path = tmp_path / "p.vnnlib.gz"
    path.write_bytes(gzip.compress(text.encode()))
    assert read_vnnlib(path).num_outputs == 2


# ---- errors ---------------------------------------------------------------------------------


def test_missing_input_bound_names_variable_and_line() -> None:
    text = declare(2, 1) + "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 1))\n"
    with pytest.raises(SpecError, match=r"<string>:2: X_1 has no lower bound"):
        parse_vnnlib(text)


def test_output_index_out_of_range_names_line() -> None:
    text = declare(1, 3) + box([0], [1]) + "(assert (<= Y_0 Y_2))\n"
    with pytest.raises(SpecError, match=r":4: Y_2 is out of range: the network has 2 outputs"):
        parse_vnnlib(text, num_outputs=2)


def test_used_but_undeclared_output() -> None:
    text = declare(1, 2) + box([0], [1]) + "\n(assert (<= Y_0 Y_5))\n"
    with pytest.raises(SpecError, match=r":7: Y_5 is used but never declared"):
        parse_vnnlib(text)


@pytest.mark.parametrize(("body", "pattern"), [
    ("(assert (<= X_0 Y_0))", r":6: a constraint mixes inputs"),
    ("(assert (<= (+ X_0 X_0 X_0) 1))\n(assert (<= (* Y_0 Y_0) 1))", r":7: a product"),
    ("(assert (foo Y_0 1))", r":6: unknown constraint \(foo"),
    ("(define-fun f () Real 1)", r":6: unknown command \(define-fun"),
    ("(assert (<= Y_0 bar))", r":6: unknown symbol 'bar'"),
    ("(assert (<= Y_0 1)", r":6: '\(' is never closed"),
    ("(assert (<= Y_0 1)))", r":6: unbalanced"),
    ("(assert (or (and (<= X_0 0.5) (<= Y_0 1)) (and (<= X_0 0.7) (<= Y_0 2))))",
     r":6: input constraints inside \(or"),
    ("(assert (<= (+ X_0 X_1) 1))", r"X_1 is used but never declared"),
])
def test_malformed_properties_name_the_line(body: str, pattern: str) -> None:
    text = declare(1, 2) + box([0], [1]) + body + "\n"
    with pytest.raises(SpecError, match=pattern):
        parse_vnnlib(text)


def test_declared_inputs_must_match_the_network() -> None:
    with pytest.raises(SpecError, match="declares 1 inputs X_i but the network has 4"):
        parse_vnnlib(declare(1, 1) + box([0], [1]), num_inputs=4)


def test_gap_in_declarations_and_empty_box() -> None:
    text = "(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
    with pytest.raises(SpecError, match="X_0 is never declared"):
        parse_vnnlib(text)
    with pytest.raises(SpecError, match="input box is empty"):
        parse_vnnlib(declare(1, 1) + box([1], [0]))


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="not found"):
        read_vnnlib("/nonexistent/prop.vnnlib")


def test_robustness_property_box_clipped_to_the_input_range() -> None:
    """With `clip`, the box is ``x +- eps`` intersected with the range (as LinfBall's box is);
    without, ``x +- eps`` as it is; a bad range is a one-line error."""
    from certify.spec import LinfBall
    from certify.vnnlib import robustness_vnnlib

    x = torch.tensor([[[[0.0, 0.03, 0.5, 0.98, 1.0]]]], dtype=torch.float64)
    clipped = parse_vnnlib(robustness_vnnlib(x[0], 2, 3, 0.05, clip=(0.0, 1.0)))
    lo, hi = LinfBall(x, 0.05).box()
    assert torch.allclose(clipped.lower, lo.flatten(), atol=1e-15)
    assert torch.allclose(clipped.upper, hi.flatten(), atol=1e-15)
    plain = parse_vnnlib(robustness_vnnlib(x[0], 2, 3, 0.05))
    assert float(plain.lower.min()) == pytest.approx(-0.05)
    assert float(plain.upper.max()) == pytest.approx(1.05)
    with pytest.raises(SpecError, match="clip must be a range"):
        robustness_vnnlib(x[0], 2, 3, 0.05, clip=(1.0, 0.0))
