"""Obs filters: a small, safe subset of TileDB-SOMA's value-filter language.

An obs filter such as ``tissue_general == 'blood' and disease in ['normal', 'COVID-19']``
is parsed with :mod:`ast` into a tree of three node types and nothing else is ever run:

- :class:`Comparison`: a column, one of ``== != < <= > >=``, and a literal (either side;
  ``1 < age < 5`` is two comparisons joined by ``and``);
- :class:`Membership`: ``column in [literal, ...]`` or ``not in`` (a list or tuple);
- :class:`Junction`: ``and`` / ``or`` over conditions, with parentheses as usual.

Literals are strings, integers, finite floats (a leading ``-`` allowed) and
``True``/``False``. ``not`` is pushed down to the comparisons (De Morgan: ``not (a == 1)``
is ``a != 1``), so a cell whose column is missing (None/NaN) never passes a comparison,
not even ``!=`` or ``not in``: the semantics of TileDB-SOMA, whose own ``not`` over
``and``/``or`` crashes tiledbsoma 2.3 (so it never sees one). Anything else (attribute
access, calls, subscripts, arithmetic, lambdas, f-strings, names in a literal's place)
is an :class:`~sampleclr_scale.errors.InputError` naming the offending part.

Both kinds of source accept the same filters: an ``.h5ad`` source evaluates the tree on
each obs block (:meth:`Filter.evaluate`, vectorised over categories and values), a SOMA
source checks it against the obs schema and pushes :attr:`Filter.soma_expression` (the
tree written back in TileDB-SOMA's syntax) down as its ``value_filter``. The column
types must fit the literals as TileDB-SOMA requires them to: strings with strings, bools
with ``True``/``False`` (``==``/``!=`` only), integer columns with integers (TileDB-SOMA
would truncate ``2.5`` to ``2``), float columns with numbers; categorical columns are
not ordered (``==``, ``!=``, ``in`` only).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from sampleclr_scale.errors import InputError

Literal = str | bool | int | float

GRAMMAR = (
    "write conditions `column OP literal` (OP one of == != < <= > >=) or `column in "
    "[literal, ...]` / `column not in [...]`, joined with and / or / not and parentheses; "
    "literals are quoted strings, numbers and True/False, e.g. "
    "\"disease == 'normal' and n_genes > 200\""
)

_SYMBOLS: dict[type, str] = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=",
                             ast.Gt: ">", ast.GtE: ">="}
_OPERATORS: dict[str, Callable] = {"==": operator.eq, "!=": operator.ne, "<": operator.lt,
                                   "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_NEGATED = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", "<=": ">", ">": "<="}
_MIRRORED = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}
_ACCEPTS = {"str": {"str"}, "bool": {"bool"}, "int": {"int"}, "float": {"int", "float"}}
_INT64 = (-(2**63), 2**63 - 1)


class ColumnKind(NamedTuple):
    """What a filter may do with a column: its values' kind and whether it is categorical."""

    values: str | None
    """``str``, ``bool``, ``int``, ``float``, or None (a type filters cannot compare)."""
    categorical: bool

    def __str__(self) -> str:
        return f"{'categorical ' * self.categorical}{self.values or 'unsupported'}"


def column_kind(dtype: object) -> ColumnKind:
    """The :class:`ColumnKind` of a pandas dtype (categoricals by their categories)."""
    if isinstance(dtype, pd.CategoricalDtype):
        return ColumnKind(column_kind(dtype.categories.dtype).values, True)
    checks = (("bool", pd.api.types.is_bool_dtype), ("int", pd.api.types.is_integer_dtype),
              ("float", pd.api.types.is_float_dtype), ("str", pd.api.types.is_string_dtype))
    return ColumnKind(next((kind for kind, check in checks if check(dtype)), None), False)


def _literal_kind(value: Literal) -> str:
    """``bool``, ``int``, ``float`` or ``str`` (bool first: ``True`` is also an int)."""
    return next(kind for kind, cls in (("bool", bool), ("int", int), ("float", float),
                                       ("str", str)) if isinstance(value, cls))


def _test_column(series: pd.Series, test: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``test`` applied to every row of ``series``; False where the value is missing.

    A categorical is tested once per category, then looked up by code (-1, missing,
    takes the appended False).
    """
    if isinstance(series.dtype, pd.CategoricalDtype):
        hits = np.asarray(test(np.asarray(series.cat.categories)), dtype=bool)
        return np.append(hits, False)[series.cat.codes.to_numpy()]
    known = series.notna().to_numpy()
    out = np.zeros(len(series), dtype=bool)
    out[known] = test(series[known].to_numpy())
    return out


def _as_column_type(values: np.ndarray, literal: Literal) -> Literal:
    """A numeric literal in the float type of ``values`` (float32 columns compare as
    TileDB-SOMA compares them, in float32); other literals unchanged."""
    return values.dtype.type(literal) if values.dtype.kind == "f" else literal


@dataclass(frozen=True)
class Comparison:
    """``column op value``."""

    column: str
    op: str
    value: Literal

    def negate(self) -> Comparison:
        return Comparison(self.column, _NEGATED[self.op], self.value)

    def columns(self) -> Iterator[str]:
        yield self.column

    def problems(self, kinds: dict[str, ColumnKind]) -> Iterator[str]:
        kind = kinds[self.column]
        if _literal_kind(self.value) not in _ACCEPTS.get(kind.values, set()):
            yield f"compares {kind} column {self.column!r} with {self.value!r}"
        elif self.op not in ("==", "!=") and (kind.categorical or kind.values == "bool"):
            yield f"orders {kind} column {self.column!r} ({self.op}): it has no order"

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        compare = _OPERATORS[self.op]
        return _test_column(frame[self.column],
                            lambda v: compare(v, _as_column_type(v, self.value)))

    def soma(self) -> str:
        return f"{self.column} {self.op} {self.value!r}"


@dataclass(frozen=True)
class Membership:
    """``column in values`` (``not in`` when ``negated``)."""

    column: str
    values: tuple[Literal, ...]
    negated: bool = False

    def negate(self) -> Membership:
        return Membership(self.column, self.values, not self.negated)

    def columns(self) -> Iterator[str]:
        yield self.column

    def problems(self, kinds: dict[str, ColumnKind]) -> Iterator[str]:
        kind = kinds[self.column]
        accepted = _ACCEPTS.get(kind.values, set()) - {"bool"}
        wrong = [v for v in self.values if _literal_kind(v) not in accepted]
        if wrong:
            yield f"tests {kind} column {self.column!r} for {wrong!r}"

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        values = list(self.values)
        return _test_column(frame[self.column],
                            lambda v: np.isin(v, values, invert=self.negated))

    def soma(self) -> str:
        values = ", ".join(map(repr, self.values))
        return f"{self.column} {'not in' if self.negated else 'in'} [{values}]"


@dataclass(frozen=True)
class Junction:
    """``and`` (``op == "and"``) or ``or`` over two or more conditions."""

    op: str
    parts: tuple[Comparison | Membership | Junction, ...]

    def negate(self) -> Junction:
        return Junction("or" if self.op == "and" else "and",
                        tuple(part.negate() for part in self.parts))

    def columns(self) -> Iterator[str]:
        for part in self.parts:
            yield from part.columns()

    def problems(self, kinds: dict[str, ColumnKind]) -> Iterator[str]:
        for part in self.parts:
            yield from part.problems(kinds)

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        combine = np.logical_and if self.op == "and" else np.logical_or
        return combine.reduce([part.mask(frame) for part in self.parts])

    def soma(self) -> str:
        return "(" + f" {self.op} ".join(part.soma() for part in self.parts) + ")"


Condition = Comparison | Membership | Junction
"""A node of a filter's tree. Every node answers ``negate()`` (the node under ``not``),
``columns()`` (the columns it reads, in order), ``problems(kinds)`` (literals that do
not fit the :class:`ColumnKind` of their column), ``mask(frame)`` (the rows that pass)
and ``soma()`` (the node in TileDB-SOMA's syntax)."""


@dataclass(frozen=True)
class Filter:
    """A parsed obs filter (:func:`parse_filter`).

    Attributes
    ----------
    expression
        The filter as written, for messages.
    root
        Its tree, with every ``not`` pushed down to the comparisons.
    """

    expression: str
    root: Condition

    @property
    def columns(self) -> list[str]:
        """The obs columns the filter reads, in order of first appearance."""
        return list(dict.fromkeys(self.root.columns()))

    @property
    def soma_expression(self) -> str:
        """The filter in TileDB-SOMA's value-filter syntax (without ``not``)."""
        return self.root.soma()

    def __and__(self, other: Filter) -> Filter:
        """Cells passing both filters."""
        return Filter(f"({self.expression}) and ({other.expression})",
                      Junction("and", (self.root, other.root)))

    def check_types(self, frame: pd.DataFrame) -> None:
        """Refuse literals that do not fit the types of ``frame``'s columns (which may be
        an empty frame with the source's dtypes).

        Raises
        ------
        InputError
            Naming the first comparison whose literal does not fit its column.
        """
        kinds = {c: column_kind(frame[c].dtype) for c in self.columns}
        problem = next(self.root.problems(kinds), None)
        if problem is not None:
            raise InputError(
                f"obs filter {self.expression!r} {problem}",
                "compare string columns with quoted strings, integer columns with integers, "
                "float columns with numbers and bool columns with True/False (== or != "
                "only); categorical columns take ==, != and in only",
            )

    def evaluate(self, frame: pd.DataFrame) -> np.ndarray:
        """Boolean mask of the rows of ``frame`` that pass (missing values never pass)."""
        self.check_types(frame)
        return self.root.mask(frame)


def parse_filter(expr: str) -> Filter:
    """Parse and check an obs filter without evaluating any of it.

    Raises
    ------
    InputError
        If ``expr`` does not parse as Python, or uses anything outside the grammar of
        this module (naming the offending part).
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as err:
        raise InputError(
            f"obs filter {expr!r} does not parse: {err.msg} (column {err.offset})",
            GRAMMAR,
        ) from None
    return Filter(expr, _condition(tree.body, expr.strip()))


def _refuse(node: ast.AST, source: str, what: str) -> InputError:
    """The error for a part of ``source`` outside the grammar."""
    part = ast.get_source_segment(source, node) or ast.dump(node)
    return InputError(f"obs filter {source!r}: `{part}` {what}", GRAMMAR)


def _condition(node: ast.expr, source: str) -> Condition:
    """The condition tree of ``node`` (a boolean expression)."""
    if isinstance(node, ast.BoolOp):
        op = "and" if isinstance(node.op, ast.And) else "or"
        return Junction(op, tuple(_condition(value, source) for value in node.values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _condition(node.operand, source).negate()
    if isinstance(node, ast.Compare):
        return _comparison(node, source)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr):
        raise _refuse(node, source, "uses & or |: join conditions with and / or")
    raise _refuse(node, source, "is not a condition")


def _comparison(node: ast.Compare, source: str) -> Condition:
    """A comparison (chains become ``and``) or a membership test."""
    if any(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):
        raise _refuse(node, source, "uses `is`/`is not`: compare with == or !=")
    if any(isinstance(op, ast.In | ast.NotIn) for op in node.ops):
        if len(node.ops) != 1:
            raise _refuse(node, source, "chains an `in` test with another comparison")
        return _membership(node, source)
    lefts = [node.left, *node.comparators[:-1]]
    parts = tuple(_pair(left, op, right, source)
                  for left, op, right in zip(lefts, node.ops, node.comparators, strict=True))
    return parts[0] if len(parts) == 1 else Junction("and", parts)


def _pair(left: ast.expr, op: ast.cmpop, right: ast.expr, source: str) -> Comparison:
    """``column op literal`` or ``literal op column``."""
    symbol = _SYMBOLS[type(op)]
    if isinstance(right, ast.Name) and not isinstance(left, ast.Name):
        return Comparison(right.id, _MIRRORED[symbol], _literal(left, source))
    return Comparison(_column(left, source), symbol, _literal(right, source))


def _membership(node: ast.Compare, source: str) -> Membership:
    """``column in [literal, ...]`` or ``column not in (...)``."""
    values = node.comparators[0]
    if not isinstance(values, ast.List | ast.Tuple):
        raise _refuse(values, source, "is not a list of literals: write [literal, ...]")
    if not values.elts:
        raise _refuse(values, source, "is empty: list at least one value")
    return Membership(_column(node.left, source),
                      tuple(_literal(value, source) for value in values.elts),
                      negated=isinstance(node.ops[0], ast.NotIn))


def _column(node: ast.expr, source: str) -> str:
    """The obs column named by ``node``."""
    if not isinstance(node, ast.Name):
        raise _refuse(node, source, "is not a column name")
    return node.id


def _literal(node: ast.expr, source: str) -> Literal:
    """The str, int, finite float or bool written at ``node`` (``-`` allowed on numbers)."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
        if _constant_kind(node) not in ("int", "float"):
            raise _refuse(node, source, "is not a number (only numbers take a sign)")
    if isinstance(node, ast.Name):
        raise _refuse(node, source, "is a name where a literal belongs: quote strings")
    kind = _constant_kind(node)
    if kind is None:
        raise _refuse(node, source, "is not a literal (a quoted string, number, True/False)")
    value = node.value if kind in ("str", "bool") else sign * node.value
    if kind == "float" and not math.isfinite(value):
        raise _refuse(node, source, "is not a finite number")
    if kind == "int" and not _INT64[0] <= value <= _INT64[1]:
        raise _refuse(node, source, "does not fit a 64-bit integer")
    return value


def _constant_kind(node: ast.expr) -> str | None:
    """The kind of a constant node's value, None for any other node or constant."""
    if not isinstance(node, ast.Constant) or not isinstance(node.value, bool | int | float | str):
        return None
    return _literal_kind(node.value)
