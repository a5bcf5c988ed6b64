"""Search-space expressions: range ends that depend on earlier parameters, and constraints.

A range end may be an arithmetic expression of parameters sampled before it, or of
training settings the study does not search (``swa_start: {low: "epochs / 2", high:
"3 * epochs / 4"}``); a constraint is a comparison that every trial's parameters must
satisfy (``"swa_lr <= lr"``). Expressions are parsed once, checked against the names
they may use, and evaluated by a small interpreter (no ``eval``): numbers, strings,
names, ``+ - * / // % **``, comparisons, ``and``/``or``/``not``, ``in`` a list, and the
functions ``min``, ``max``, ``abs``, ``round``.
"""

from __future__ import annotations

import ast
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class SearchParam(Protocol):
    """What this module reads of a searched setting (``tasks.config.SearchParam``): a
    structural type, so the schema can use these functions without a cycle of imports."""

    @property
    def type(self) -> str: ...
    @property
    def low(self) -> float | str | None: ...
    @property
    def high(self) -> float | str | None: ...
    @property
    def log(self) -> bool: ...
    @property
    def step(self) -> float | None: ...
    @property
    def choices(self) -> list[Any] | None: ...
    @property
    def when(self) -> dict[str, list[Any]] | None: ...
    @property
    def depends_on(self) -> frozenset[str]: ...


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs, "round": round}


class ExpressionError(ValueError):
    """An expression that cannot be read, or that names what it may not use."""


@dataclass(frozen=True)
class Expr:
    text: str
    tree: ast.expr
    names: frozenset[str]

    def __call__(self, values: Mapping[str, Any]) -> Any:
        return _evaluate(self.tree, values)


@functools.lru_cache(maxsize=1024)
def parse_expr(text: str) -> Expr:
    """Parse ``text``; raise ExpressionError naming what is not allowed in it.

    Cached: a study evaluates the same few expressions for every sample and random draw.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ExpressionError(
            f"cannot read {text!r} ({exc.msg}); write an expression such as '3 * epochs / 4'"
        ) from None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if not isinstance(func, ast.Name) or func.id not in _FUNCTIONS or node.keywords:
                raise ExpressionError(
                    f"{text!r}: only the functions {', '.join(_FUNCTIONS)} may be called"
                )
        elif isinstance(node, ast.Name):
            if node.id not in _FUNCTIONS:
                names.add(node.id)
        elif not isinstance(node, _ALLOWED):
            raise ExpressionError(
                f"{text!r}: {type(node).__name__} is not allowed; use numbers, names, "
                f"arithmetic, comparisons, and/or/not, 'in [...]', min, max, abs, round"
            )
        if isinstance(node, ast.Constant) and not isinstance(node.value, int | float | str):
            raise ExpressionError(f"{text!r}: {node.value!r} is not a number or a string")
    return Expr(text=text, tree=tree, names=frozenset(names))


_ALLOWED = (
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Constant,
    ast.List,
    ast.Tuple,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
    ast.Call,
    ast.Name,
)


def _evaluate(node: ast.expr, values: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in values:
            raise ExpressionError(f"{node.id!r} has no value here")
        return values[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, values), _evaluate(node.right, values)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        if isinstance(node.op, ast.Not):
            return not operand
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, ast.BoolOp):
        results = (_evaluate(v, values) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(comparator, values)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.List | ast.Tuple):
        return [_evaluate(e, values) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return _FUNCTIONS[node.func.id](*(_evaluate(a, values) for a in node.args))
    raise ExpressionError(f"cannot evaluate {ast.dump(node)}")  # refused by parse_expr


# Sampling-time helpers ---------------------------------------------------------------------
class EmptyRange(ValueError):
    """A range whose ends, given the earlier parameters, leave no value to draw."""


def condition_holds(spec: SearchParam, values: Mapping[str, Any]) -> bool:
    """Whether a conditional parameter is drawn, given the values drawn before it."""
    return all(values.get(name) in allowed for name, allowed in (spec.when or {}).items())


def bounds(name: str, spec: SearchParam, values: Mapping[str, Any]) -> tuple[float, float]:
    """The numeric range of ``spec`` given earlier values (ints: whole numbers inside)."""
    low, high = (_end(end, values, name) for end in (spec.low, spec.high))
    if spec.type == "int":
        low, high = math.ceil(low - 1e-9), math.floor(high + 1e-9)
    if low > high:
        raise EmptyRange(
            f"{name}: the range [{_show(spec.low)}, {_show(spec.high)}] is empty "
            f"({low:g} > {high:g}) for {_context(spec, values)}"
        )
    if spec.log and low <= 0:
        raise EmptyRange(f"{name}: log scale needs low > 0, but low is {low:g}")
    return low, high


def _end(end: float | str | None, values: Mapping[str, Any], name: str) -> float:
    if isinstance(end, str):
        try:
            return float(parse_expr(end)(values))
        except (ArithmeticError, TypeError, ExpressionError) as exc:
            raise EmptyRange(f"{name}: cannot compute {end!r}: {exc}") from None
    return float(end or 0)


def _show(end: float | str | None) -> str:
    return f"{end!r}" if isinstance(end, str) else f"{end:g}" if end is not None else "?"


def _context(spec: SearchParam, values: Mapping[str, Any]) -> str:
    used = sorted(spec.depends_on)
    return ", ".join(f"{n}={values.get(n)!r}" for n in used) or "these settings"


def snap(value: float, low: float, high: float, step: float) -> float:
    """The multiple of ``step`` above ``low`` nearest to ``value``, inside [low, high]."""
    k = round((value - low) / step)
    top = math.floor((high - low) / step + 1e-9)
    return round(low + min(max(k, 0), top) * step, 12)


def violated(constraints: list[str], values: Mapping[str, Any]) -> str | None:
    """The first constraint these values break, shown with the values it reads."""
    for text in constraints:
        expr = parse_expr(text)
        try:
            ok = bool(expr(values))
        except (ArithmeticError, TypeError, ExpressionError) as exc:
            return f"constraint {text!r} cannot be evaluated: {exc}"
        if not ok:
            shown = ", ".join(f"{n}={values.get(n)!r}" for n in sorted(expr.names))
            return f"constraint {text!r} is violated ({shown})"
    return None


#: The shortfall of a strict comparison broken by a tie (``a < b`` with ``a == b``).
_LEAST_SHORTFALL = 1e-6


def shortfalls(constraints: list[str], values: Mapping[str, Any]) -> dict[str, float]:
    """How far ``values`` are from meeting each constraint, by its text: 0 where it holds,
    in (0, 1] where it is broken.

    The study records them on a rejected sample as Optuna constraint values, so that a
    sampler that reads them (TPE) ranks the samples nearer to the feasible region above
    those further away instead of learning nothing from a rejection.
    """
    amounts: dict[str, float] = {}
    for text in constraints:
        try:
            amounts[text] = _shortfall(parse_expr(text).tree, values)
        except (ArithmeticError, TypeError, ExpressionError):
            amounts[text] = 1.0
    return amounts


def _shortfall(node: ast.expr, values: Mapping[str, Any]) -> float:
    """0 when ``node`` holds, else how far it is from holding, in (0, 1].

    A broken numeric comparison gives its gap relative to the size of its sides (``a <= b``:
    ``(a - b) / (|a| + |b|)``), so constraints over small and large settings weigh alike;
    ``and`` gives its largest shortfall, ``or`` its smallest; anything else broken (``in``,
    ``not``, strings) 1.
    """
    if isinstance(node, ast.BoolOp):
        parts = [_shortfall(v, values) for v in node.values]
        return max(parts) if isinstance(node.op, ast.And) else min(parts)
    if _evaluate(node, values):
        return 0.0
    if not isinstance(node, ast.Compare):
        return 1.0
    sides = [_evaluate(node.left, values), *(_evaluate(c, values) for c in node.comparators)]
    return max(
        _gap(op, a, b) for op, (a, b) in zip(node.ops, itertools.pairwise(sides), strict=True)
    )


def _gap(op: ast.cmpop, a: Any, b: Any) -> float:
    """The shortfall of one link of a comparison (0 where it holds)."""
    if _COMPARE[type(op)](a, b):
        return 0.0
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
    if not numbers or isinstance(op, ast.NotEq | ast.In | ast.NotIn):
        return 1.0
    scale = abs(a) + abs(b)
    ratio = abs(a - b) / scale if scale else 0.0
    if not math.isfinite(ratio):
        return 1.0
    return min(max(ratio, _LEAST_SHORTFALL), 1.0)


def draw(
    space: Mapping[str, SearchParam], base: Mapping[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    """Parameters drawn at random from ``space``, in space order, as a trial would take
    them: a parameter whose condition fails is left out, a range end written as an
    expression is computed from the values drawn before it (or from ``base``), ``log``
    draws on a log scale, ``step`` gives multiples of the step (rounded to it on a log
    scale). Raises EmptyRange when a range leaves nothing to draw.

    It costs no trial: the study draws many, cheaply, when its sampler keeps proposing
    samples that break the constraints.
    """
    values: dict[str, Any] = dict(base)
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if not condition_holds(spec, values):
            continue
        if spec.type == "categorical":
            choices = list(spec.choices or [])
            value = choices[int(rng.integers(len(choices)))]
        else:
            value = _draw_number(name, spec, values, rng)
        params[name] = value
        values[name] = value
    return params


def _draw_number(
    name: str, spec: SearchParam, values: Mapping[str, Any], rng: np.random.Generator
) -> float | int:
    low, high = bounds(name, spec, values)
    whole = spec.type == "int"
    if spec.log:
        pad = 0.5 if whole else 0.0  # each whole number gets its share of the log range
        value = math.exp(rng.uniform(math.log(low - pad), math.log(high + pad)))
        value = min(max(round(value) if whole else value, low), high)
        if spec.step:
            value = snap(value, low, high, float(spec.step))
    elif spec.step or whole:
        step = float(spec.step or 1)
        count = math.floor((high - low) / step + 1e-9)
        value = round(low + int(rng.integers(count + 1)) * step, 12)
    else:
        value = float(rng.uniform(low, high))
    return round(value) if whole else float(value)


def feasible_draw(
    space: Mapping[str, SearchParam],
    constraints: list[str],
    base: Mapping[str, Any],
    rng: np.random.Generator,
    tries: int,
) -> tuple[dict[str, Any] | None, str | None]:
    """The first of up to ``tries`` random draws (``draw``) that meets the constraints, and
    None; or None and why the last draw was refused."""
    why: str | None = None
    for _ in range(tries):
        try:
            params = draw(space, base, rng)
        except EmptyRange as exc:
            why = f"empty range: {exc}"
            continue
        why = violated(constraints, {**base, **params})
        if why is None:
            return params, None
    return None, why


# Static checks -------------------------------------------------------------------------------
#: Above this many corner assignments, ranges are checked one parameter at a time.
MAX_CORNERS = 20_000


def corners(space: Mapping[str, SearchParam], base: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every assignment of range ends (and choices) a trial could draw, in space order.

    Each range's ends are computed from the ends chosen for the parameters before it, so
    for ranges that grow or shrink monotonically with their inputs (sums, products and
    quotients of positive settings, min, max) the extremes of every parameter appear. A
    parameter whose condition fails is left out; a range that is empty at some corner
    raises EmptyRange (some trials could draw nothing).
    """
    names = list(space)

    def walk(index: int, values: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if index == len(names):
            yield {n: values[n] for n in names if n in values}
            return
        name = names[index]
        spec = space[name]
        if not condition_holds(spec, values):
            yield from walk(index + 1, values)
            return
        if spec.type == "categorical":
            options: list[Any] = list(spec.choices or [])
        else:
            low, high = bounds(name, spec, values)
            options = [low] if low == high else [low, high]
            if spec.type == "int":
                options = [int(v) for v in options]
        for option in options:
            yield from walk(index + 1, {**values, name: option})

    yield from walk(0, dict(base))


def corner_count(space: Mapping[str, SearchParam]) -> int:
    return math.prod(
        len(spec.choices or []) if spec.type == "categorical" else 2 for spec in space.values()
    )


def limited_corners(
    space: Mapping[str, SearchParam], base: Mapping[str, Any]
) -> Iterator[dict[str, Any]]:
    """``corners``, or one parameter's ends at a time when there are too many."""
    if corner_count(space) <= MAX_CORNERS:
        yield from corners(space, base)
        return
    for name, spec in space.items():
        if not spec.depends_on:
            yield from (
                {k: v for k, v in corner.items() if k == name}
                for corner in itertools.islice(corners({name: spec}, base), 64)
            )
