"""VNNLIB properties (the VNN-COMP format): an input box and an unsafe set over the outputs.

A property file declares the network's inputs ``X_0 .. X_{D-1}`` and outputs ``Y_0 .. Y_{K-1}``
and asserts constraints; the assertions together describe the **unsafe** set. The network is
safe (the verdict ``unsat``) iff no input in the box has outputs that satisfy the output
constraints. The subset read here is the one robustness properties use:

- ``(declare-const X_i Real)`` and ``(declare-const Y_j Real)``;
- input bounds ``(assert (<= X_i c))``, ``(assert (>= X_i c))``, either orientation, ``=``,
  also inside a top-level ``(and ...)``;
- output constraints: linear (in)equalities over the ``Y_j`` with constants, written with
  ``<=``, ``>=``, ``<``, ``>``, ``=`` and terms ``(+ ...)``, ``(- ...)``, ``(* c Y_j)``,
  ``(/ e c)``, combined by ``and`` and ``or`` to any depth (brought to disjunctive normal form);
- ``set-logic``, ``set-info``, ``set-option``, ``check-sat``, ``get-model`` and ``exit`` are
  accepted and ignored; comments start with ``;``.

The result is a :class:`VnnlibProperty`: the box ``lower <= x <= upper`` of the flat input and
the unsafe set as a disjunction of conjunctions ``matrix @ y <= bound`` (rows may be strict).
Every error names the file and line.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from certify.errors import SpecError
from certify.spec import round_to

__all__ = ["MAX_DISJUNCTS", "OutputConstraint", "VnnlibProperty", "parse_vnnlib", "read_vnnlib",
           "robustness_vnnlib"]

#: The most conjunctions the output constraint may expand to (disjunctive normal form).
MAX_DISJUNCTS = 10_000

_IGNORED = {"set-logic", "set-info", "set-option", "check-sat", "get-model", "exit"}
_VAR = re.compile(r"^([XY])_(\d+)$")
_COMPARISONS = ("<=", ">=", "<", ">", "=")


@dataclass(frozen=True)
class OutputConstraint:
    """One conjunction of the unsafe set: ``matrix @ y <= bound`` row by row.

    Attributes:
        matrix: ``(R, K)`` float64 coefficients over the outputs.
        bound: ``(R,)`` float64 right-hand sides.
        strict: ``(R,)`` bool; a strict row asks ``matrix @ y < bound``.
        lines: The source line of each row (for messages).
    """

    matrix: Tensor
    bound: Tensor
    strict: Tensor
    lines: tuple[int, ...]

    def slack(self, y: Tensor) -> Tensor:
        """``bound - matrix @ y`` for outputs `y` ``(N, K)``: ``(N, R)``, >= 0 where a row holds."""
        y = y.to(torch.float64)
        return self.bound.to(y.device) - y @ self.matrix.to(y.device).T

    def holds(self, y: Tensor) -> Tensor:
        """``(N,)`` bool: every row holds for outputs `y` ``(N, K)`` (exactly, no tolerance)."""
        slack = self.slack(y)
        strict = self.strict.to(slack.device)
        ok = torch.where(strict, slack > 0, slack >= 0)
        return ok.all(dim=1)


@dataclass(frozen=True)
class VnnlibProperty:
    """A VNNLIB robustness property: input box and unsafe output set.

    Attributes:
        lower, upper: ``(D,)`` float64 bounds of the flat input (reshape to the model's input
            shape with :meth:`input_box`).
        disjuncts: The unsafe set: outputs are unsafe if any conjunction holds.
        num_outputs: K, the number of declared outputs ``Y_j``.
        source: The file name (for messages).
    """

    lower: Tensor
    upper: Tensor
    disjuncts: tuple[OutputConstraint, ...]
    num_outputs: int
    source: str = "<string>"

    @property
    def num_inputs(self) -> int:
        """D, the number of declared inputs ``X_i``."""
        return int(self.lower.numel())

    def input_box(self, input_shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """The box as ``(1, *input_shape)`` tensors ``(lower, upper)``.

        Rounding to `dtype` is outward (the box can only grow), so bounds proved on it hold on
        the property's box.

        Raises:
            SpecError: the shape does not hold D values.
        """
        shape = tuple(int(v) for v in input_shape)
        count = 1
        for v in shape:
            count *= v
        if count != self.num_inputs:
            raise SpecError(f"{self.source} declares {self.num_inputs} inputs X_i but the model "
                            f"input {shape} has {count} values; use the property written for "
                            "this network.")
        lower = round_to(self.lower, dtype, up=False).reshape(1, *shape).to(device)
        upper = round_to(self.upper, dtype, up=True).reshape(1, *shape).to(device)
        return lower, upper

    def contains(self, x: Tensor) -> Tensor:
        """``(N,)`` bool: inputs `x` ``(N, ...)`` lie in the box (exactly)."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        lower, upper = self.lower.to(flat.device), self.upper.to(flat.device)
        return ((flat >= lower) & (flat <= upper)).all(dim=1)

    def is_unsafe(self, y: Tensor) -> Tensor:
        """``(N,)`` bool: outputs `y` ``(N, K)`` satisfy some conjunction of the unsafe set."""
        self._check_outputs(y)
        out = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        for d in self.disjuncts:
            out |= d.holds(y)
        return out

    def _check_outputs(self, y: Tensor) -> None:
        if y.ndim != 2 or y.shape[1] != self.num_outputs:
            raise SpecError(f"{self.source} is about {self.num_outputs} outputs Y_j but the model "
                            f"gives outputs of shape {tuple(y.shape)}.")


# ---- writing ----------------------------------------------------------------------------------


def robustness_vnnlib(x: Tensor, label: int, num_outputs: int, eps: float, *,
                      clip: tuple[float, float] | None = None) -> str:
    """The VNN-COMP local-robustness property of one input: the box ``x +- eps`` and the unsafe
    set "some other output reaches `label`'s", as VNNLIB text.

    Args:
        x: One input (any shape; flattened in order as ``X_0, X_1, ...``).
        label: The class that must stay strictly largest.
        num_outputs: The number of outputs ``Y_j``.
        eps: The L-inf radius (>= 0).
        clip: The inputs' valid range, e.g. ``(0.0, 1.0)`` for pixels: the box is intersected
            with it (as the radius search's balls are, and as VNN-COMP's image benchmarks
            generate their boxes); None: ``x +- eps`` as it is.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise SpecError(f"eps must be a finite number >= 0, got {eps!r}")
    if clip is not None and not (len(clip) == 2 and all(math.isfinite(c) for c in clip)
                                 and clip[0] <= clip[1]):
        raise SpecError(f"clip must be a range (low, high) with low <= high, got {clip!r}")
    if not 0 <= label < num_outputs:
        raise SpecError(f"label must lie in [0, {num_outputs}), got {label}")
    flat = x.detach().flatten().tolist()
    lines = [f"(declare-const X_{i} Real)" for i in range(len(flat))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_outputs)]
    for i, v in enumerate(flat):
        hi, lo = v + eps, v - eps
        if clip is not None:
            hi, lo = min(max(hi, clip[0]), clip[1]), max(min(lo, clip[1]), clip[0])
        lines += [f"(assert (<= X_{i} {hi!r}))", f"(assert (>= X_{i} {lo!r}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(num_outputs) if j != label)
    return "\n".join([*lines, f"(assert (or {others}))", ""])


# ---- reading ----------------------------------------------------------------------------------


def read_vnnlib(path: str | os.PathLike[str], *, num_inputs: int | None = None,
                num_outputs: int | None = None) -> VnnlibProperty:
    """Read a ``.vnnlib`` (or gzip-compressed ``.vnnlib.gz``) property file.

    Args:
        path: The file.
        num_inputs: The network's D; when given, the declared inputs must match it.
        num_outputs: The network's K; when given, every ``Y_j`` used must be below it.
    Raises:
        SpecError: a missing or malformed file, naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"VNNLIB file not found: {path}. Check the path.")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SpecError(f"{path} is not a readable VNNLIB text file: {type(e).__name__}.") from None
    return parse_vnnlib(text, source=path.name, num_inputs=num_inputs, num_outputs=num_outputs)


@dataclass(frozen=True)
class _Node:
    """An s-expression: an atom (``text``) or a list (``items``), with its line."""

    line: int
    text: str | None = None
    items: tuple[_Node, ...] = ()

    @property
    def is_atom(self) -> bool:
        return self.text is not None

    def head(self) -> str | None:
        return self.items[0].text if self.items and self.items[0].is_atom else None


def _tokens(text: str, source: str) -> Iterator[tuple[str, int]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(";", 1)[0]
        for token in re.findall(r"\(|\)|[^\s()]+", line):
            if token.startswith(("|", '"')):
                raise SpecError(f"{source}:{number}: quoted symbols and strings ({token}) are "
                                "not part of the VNNLIB subset read here.")
            yield token, number


def _parse_sexprs(text: str, source: str) -> list[_Node]:
    stack: list[tuple[int, list[_Node]]] = []
    top: list[_Node] = []
    for token, line in _tokens(text, source):
        if token == "(":
            stack.append((line, []))
        elif token == ")":
            if not stack:
                raise SpecError(f"{source}:{line}: unbalanced ')'; remove it or add the "
                                "matching '('.")
            start, items = stack.pop()
            node = _Node(start, items=tuple(items))
            (stack[-1][1] if stack else top).append(node)
        else:
            (stack[-1][1] if stack else top).append(_Node(line, text=token))
    if stack:
        raise SpecError(f"{source}:{stack[-1][0]}: '(' is never closed; the file is truncated "
                        "or a ')' is missing.")
    return top


# A linear expression: {("X"|"Y", index): coefficient}, constant.
_Linear = tuple[dict[tuple[str, int], float], float]
# An atom: expression <= 0 (or < 0 when strict), with its line.
_Atom = tuple[dict[tuple[str, int], float], float, bool, int]


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.declared: dict[tuple[str, int], int] = {}

    def error(self, node: _Node, message: str) -> SpecError:
        return SpecError(f"{self.source}:{node.line}: {message}")

    def declare(self, node: _Node) -> None:
        items = node.items
        if len(items) != 3 or not items[1].is_atom or not items[2].is_atom:
            raise self.error(node, "expected (declare-const NAME Real).")
        name, sort = items[1].text, items[2].text
        assert name is not None
        match = _VAR.match(name)
        if match is None:
            raise self.error(node, f"unknown variable name '{name}'; VNNLIB properties declare "
                                   "inputs X_i and outputs Y_j.")
        if sort != "Real":
            raise self.error(node, f"variable {name} has sort {sort}; only Real is supported.")
        key = (match.group(1), int(match.group(2)))
        if key in self.declared:
            raise self.error(node, f"{name} is declared twice (first at line "
                                   f"{self.declared[key]}).")
        self.declared[key] = node.line

    def variable(self, node: _Node) -> tuple[str, int]:
        assert node.text is not None
        match = _VAR.match(node.text)
        if match is None:
            raise self.error(node, f"unknown symbol '{node.text}'; expected a number, X_i or Y_j.")
        key = (match.group(1), int(match.group(2)))
        if key not in self.declared:
            raise self.error(node, f"{node.text} is used but never declared; add "
                                   f"(declare-const {node.text} Real).")
        return key

    def linear(self, node: _Node) -> _Linear:
        if node.is_atom:
            assert node.text is not None
            try:
                return {}, float(node.text)
            except ValueError:
                return {self.variable(node): 1.0}, 0.0
        op, args = node.head(), [self.linear(n) for n in node.items[1:]]
        if op == "+" and args:
            return _combine(args, [1.0] * len(args))
        if op == "-" and len(args) == 1:
            return _scale(args[0], -1.0)
        if op == "-" and args:
            return _combine(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*" and args:
            variable = [a for a in args if a[0]]
            if len(variable) > 1:
                raise self.error(node, "a product of variables is not linear.")
            factor = 1.0
            for terms, const in args:
                if not terms:
                    factor *= const
            return _scale(variable[0], factor) if variable else ({}, factor)
        if op == "/" and len(args) == 2:
            if args[1][0] or args[1][1] == 0.0:
                raise self.error(node, "division must be by a nonzero constant.")
            return _scale(args[0], 1.0 / args[1][1])
        raise self.error(node, f"unknown term ({op} ...); expected a number, a variable, or "
                               "(+ ...), (- ...), (* c ...), (/ ... c).")

    def formula(self, node: _Node) -> list[list[_Atom]]:
        """Disjunctive normal form: a list of conjunctions of atoms."""
        op = node.head()
        if node.is_atom or op is None:
            raise self.error(node, "expected a constraint such as (<= Y_0 Y_1), (and ...), "
                                   "(or ...).")
        args = node.items[1:]
        if op == "and":
            result: list[list[_Atom]] = [[]]
            for arg in args:
                result = [a + b for a in result for b in self.formula(arg)]
                if len(result) > MAX_DISJUNCTS:
                    raise self.error(node, f"the constraint expands to more than {MAX_DISJUNCTS} "
                                           "conjunctions; simplify it.")
            return result
        if op == "or":
            if not args:
                raise self.error(node, "(or) needs at least one argument.")
            return [c for arg in args for c in self.formula(arg)]
        if op in _COMPARISONS:
            if len(args) < 2:
                raise self.error(node, f"({op} ...) needs two or more terms.")
            terms = [self.linear(a) for a in args]
            conjunction: list[_Atom] = []
            for left, right in itertools.pairwise(terms):
                difference = _combine([left, right], [1.0, -1.0])
                if op in ("<=", "<", "="):
                    conjunction.append((*difference, op == "<", node.line))
                if op in (">=", ">", "="):
                    negated = _scale(difference, -1.0)
                    conjunction.append((*negated, op == ">", node.line))
            return [conjunction]
        raise self.error(node, f"unknown constraint ({op} ...); expected <=, >=, <, >, =, and, "
                               "or.")


def _combine(parts: Sequence[_Linear], weights: Sequence[float]) -> _Linear:
    terms: dict[tuple[str, int], float] = {}
    const = 0.0
    for (part_terms, part_const), w in zip(parts, weights, strict=True):
        for key, coeff in part_terms.items():
            terms[key] = terms.get(key, 0.0) + w * coeff
        const += w * part_const
    return {k: v for k, v in terms.items() if v != 0.0}, const


def _scale(part: _Linear, factor: float) -> _Linear:
    terms, const = part
    return {k: factor * v for k, v in terms.items() if factor * v != 0.0}, factor * const


def parse_vnnlib(text: str, *, source: str = "<string>", num_inputs: int | None = None,
                 num_outputs: int | None = None) -> VnnlibProperty:
    """Parse VNNLIB text (see the module docstring for the subset).

    Args:
        text: The property.
        source: A name for messages.
        num_inputs: The network's D; when given, the declared inputs must match it.
        num_outputs: The network's K; when given, every ``Y_j`` used must be below it.
    Returns:
        The property, with the unsafe set in disjunctive normal form.
    Raises:
        SpecError: unknown syntax, undeclared or out-of-range variables, missing input bounds,
            an input constraint other than a bound, or a disjunction over input bounds; each
            message names the line.
    """
    parser = _Parser(source)
    asserts: list[_Node] = []
    for node in _parse_sexprs(text, source):
        head = node.head()
        if head == "declare-const":
            parser.declare(node)
        elif head == "assert":
            if len(node.items) != 2:
                raise parser.error(node, "expected (assert CONSTRAINT) with one constraint.")
            asserts.append(node.items[1])
        elif head in _IGNORED:
            continue
        else:
            shown = node.text if node.is_atom else f"({head} ...)"
            raise parser.error(node, f"unknown command {shown}; expected declare-const or assert.")

    inputs = sorted(i for kind, i in parser.declared if kind == "X")
    outputs = sorted(j for kind, j in parser.declared if kind == "Y")
    for kind, indices in (("X", inputs), ("Y", outputs)):
        if not indices:
            raise SpecError(f"{source}: declares no {kind}_i variables; a property needs inputs "
                            "X_0.. and outputs Y_0...")
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise SpecError(f"{source}: {kind}_{missing[0]} is never declared but "
                            f"{kind}_{indices[-1]} is; declare {kind}_0 .. {kind}_{indices[-1]}.")
    if num_inputs is not None and len(inputs) != num_inputs:
        raise SpecError(f"{source} declares {len(inputs)} inputs X_i but the network has "
                        f"{num_inputs}; use the property written for this network.")
    if num_outputs is not None and len(outputs) > num_outputs:
        j = len(outputs) - 1
        raise SpecError(f"{source}:{parser.declared[('Y', j)]}: Y_{j} is out of range: the "
                        f"network has {num_outputs} outputs (Y_0 .. Y_{num_outputs - 1}).")
    k = len(outputs) if num_outputs is None else num_outputs

    lower = torch.full((len(inputs),), float("-inf"), dtype=torch.float64)
    upper = torch.full((len(inputs),), float("inf"), dtype=torch.float64)
    rows: list[_Atom] = []           # conjoined output rows
    factors: list[list[list[_Atom]]] = []   # disjunctive output factors
    for formula in asserts:
        dnf = parser.formula(formula)
        inputs_part = [[a for a in conj if _is_input(a)] for conj in dnf]
        outputs_part = [[a for a in conj if not _is_input(a)] for conj in dnf]
        first = _atom_keys(inputs_part[0])
        if any(_atom_keys(p) != first for p in inputs_part[1:]):
            raise SpecError(f"{source}:{formula.line}: input constraints inside (or ...) are not "
                            "supported; split the property into one file per input box.")
        for atom in inputs_part[0]:
            _apply_bound(atom, lower, upper, source)
        if len(outputs_part) == 1:
            rows.extend(outputs_part[0])
        elif all(outputs_part):
            factors.append(outputs_part)
        # an (or ...) with a disjunct of input bounds only makes the outputs unconstrained

    for j in range(len(inputs)):
        if torch.isinf(lower[j]) or torch.isinf(upper[j]):
            side = "lower" if torch.isinf(lower[j]) else "upper"
            raise SpecError(f"{source}:{parser.declared[('X', j)]}: X_{j} has no {side} bound; "
                            f"add (assert ({'>=' if side == 'lower' else '<='} X_{j} VALUE)).")
        if lower[j] > upper[j]:
            raise SpecError(f"{source}: the input box is empty: X_{j} >= {lower[j].item()} and "
                            f"X_{j} <= {upper[j].item()}.")

    combos = 1
    for factor in factors:
        combos *= len(factor)
        if combos > MAX_DISJUNCTS:
            raise SpecError(f"{source}: the output constraint expands to more than "
                            f"{MAX_DISJUNCTS} conjunctions; simplify it.")
    disjuncts: list[OutputConstraint] = []
    for choice in itertools.product(*factors):
        atoms = rows + [a for part in choice for a in part]
        constraint = _constraint(atoms, k, source)
        if constraint is not None:
            disjuncts.append(constraint)
    return VnnlibProperty(lower=lower, upper=upper, disjuncts=tuple(disjuncts), num_outputs=k,
                          source=source)


def _is_input(atom: _Atom) -> bool:
    terms = atom[0]
    return bool(terms) and all(kind == "X" for kind, _ in terms)


def _atom_keys(atoms: list[_Atom]) -> set[tuple[object, ...]]:
    return {(tuple(sorted(a[0].items())), a[1], a[2]) for a in atoms}


def _apply_bound(atom: _Atom, lower: Tensor, upper: Tensor, source: str) -> None:
    terms, const, strict, line = atom
    if len(terms) != 1:
        names = ", ".join(f"X_{i}" for _, i in sorted(terms))
        raise SpecError(f"{source}:{line}: an input constraint over several inputs ({names}) is "
                        "not a box bound; only (<= X_i c) and (>= X_i c) are supported.")
    if strict:
        raise SpecError(f"{source}:{line}: strict input bounds (< or >) are not supported; use "
                        "<= or >=.")
    ((_, i), coeff), = terms.items()
    value = -const / coeff  # coeff * x + const <= 0
    if coeff > 0:
        upper[i] = min(upper[i].item(), value)
    else:
        lower[i] = max(lower[i].item(), value)


def _constraint(atoms: list[_Atom], k: int, source: str) -> OutputConstraint | None:
    """The conjunction as matrix rows; ``None`` when a constant row makes it unsatisfiable."""
    matrix: list[list[float]] = []
    bound: list[float] = []
    strict: list[bool] = []
    lines: list[int] = []
    for terms, const, is_strict, line in atoms:
        if any(kind == "X" for kind, _ in terms):
            raise SpecError(f"{source}:{line}: a constraint mixes inputs X_i and outputs Y_j; "
                            "only input bounds and output constraints are supported.")
        if not terms:  # a constant comparison: true drops, false empties the conjunction
            if const > 0 or (is_strict and const == 0):
                return None
            continue
        row = [0.0] * k
        for (_, j), coeff in terms.items():
            if j >= k:
                raise SpecError(f"{source}:{line}: Y_{j} is out of range: the network has {k} "
                                f"outputs (Y_0 .. Y_{k - 1}).")
            row[j] = coeff
        matrix.append(row)
        bound.append(-const)
        strict.append(is_strict)
        lines.append(line)
    return OutputConstraint(
        matrix=torch.tensor(matrix, dtype=torch.float64).reshape(len(bound), k),
        bound=torch.tensor(bound, dtype=torch.float64),
        strict=torch.tensor(strict, dtype=torch.bool),
        lines=tuple(lines),
    )
