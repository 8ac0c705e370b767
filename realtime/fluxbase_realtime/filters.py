"""Row filters: a subscription may name a filter per table, `{"column", "op", "value"}`.

A filter narrows what a subscription receives and never widens it: it is evaluated by the
service in Python, on the row image the subscriber is already allowed to receive (after the RLS
gate for end users), never as SQL. The image is the new row of an INSERT or UPDATE and the old
row of a DELETE, as the event's `record`. At subscribe the column is looked up in the catalog:
a table or column that does not exist, or that the subscriber's role may not SELECT, answers the
same `VALIDATION_ERROR` naming it (so a filter cannot probe for columns one may not read), and
the value must suit the column's type (numbers for numeric columns, booleans for booleans,
strings otherwise). Ordering operators apply to numeric and text columns only; text compares by
code point. A row whose column is null or of another JSON type never matches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from fluxbase.errors import ValidationError
from fluxbase.security.roles import schema_name

OPS = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
ORDERING = frozenset({"lt", "lte", "gt", "gte"})
MAX_TABLES = 50
MAX_IN_VALUES = 100
MAX_STRING = 1024
MAX_NAME = 63  # PostgreSQL identifiers

Scalar = str | int | float | bool


@dataclass(frozen=True)
class RowFilter:
    column: str
    op: str
    value: Scalar | frozenset[Scalar] | tuple[Scalar, ...]

    def matches(self, record: Mapping[str, Any] | None) -> bool:
        if not isinstance(record, Mapping):
            return False
        got = record.get(self.column)
        if got is None:
            return False
        if self.op == "in":
            assert isinstance(self.value, tuple)
            return any(_same(got, v) for v in self.value)
        v = self.value
        assert not isinstance(v, frozenset | tuple)
        if self.op == "eq":
            return _same(got, v)
        if self.op == "neq":
            return _comparable(got, v) and not _same(got, v)
        if not _comparable(got, v) or isinstance(got, bool):
            return False
        if self.op == "lt":
            return bool(got < v)
        if self.op == "lte":
            return bool(got <= v)
        if self.op == "gt":
            return bool(got > v)
        return bool(got >= v)


def _kind(x: Any) -> str:
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int | float):
        return "number"
    if isinstance(x, str):
        return "string"
    return "other"


def _comparable(a: Any, b: Any) -> bool:
    return _kind(a) == _kind(b) != "other"


def _same(a: Any, b: Any) -> bool:
    return _comparable(a, b) and bool(a == b)


def _scalar(table: str, column: str, value: Any) -> Scalar:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= 1 << 128:
            raise ValidationError(f"filter on {table}.{column}: the number is out of range.")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"filter on {table}.{column}: the value must be a finite number.")
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValidationError(
                f"filter on {table}.{column}: strings are limited to {MAX_STRING} characters."
            )
        return value
    raise ValidationError(f"filter on {table}.{column}: the value must be a string, a number or a boolean.")


def parse(raw: Any, tables: frozenset[str] | None) -> dict[str, RowFilter]:
    """The subscribe message's `filters` ({table: {column, op, value}}), checked for shape."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationError('filters must be an object: {"<table>": {"column", "op", "value"}}.')
    if len(raw) > MAX_TABLES:
        raise ValidationError(f"filters may name at most {MAX_TABLES} tables.")
    out: dict[str, RowFilter] = {}
    for table, spec in raw.items():
        if not table or len(table) > MAX_NAME:
            raise ValidationError("filters: table names are 1 to 63 characters.")
        if tables is not None and table not in tables:
            raise ValidationError(f"filters: table {table!r} is not among the subscription's tables.")
        if not isinstance(spec, dict) or set(spec) - {"column", "op", "value"}:
            raise ValidationError(f'filters: the filter of {table!r} must be {{"column", "op", "value"}}.')
        column, op, value = spec.get("column"), spec.get("op"), spec.get("value")
        if not isinstance(column, str) or not column or len(column) > MAX_NAME:
            raise ValidationError(
                f"filters: the filter of {table!r} needs a column name (1 to 63 characters)."
            )
        if op not in OPS:
            shown = repr(op)[:80]
            raise ValidationError(
                f"filters: unknown operator {shown} on {table}.{column}; use one of {', '.join(OPS)}."
            )
        if op == "in":
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
                raise ValidationError(
                    f"filter on {table}.{column}: 'in' takes a list of 1 to {MAX_IN_VALUES} values."
                )
            out[table] = RowFilter(column, op, tuple(_scalar(table, column, v) for v in value))
        else:
            scalar = _scalar(table, column, value)
            if op in ORDERING and isinstance(scalar, bool):
                raise ValidationError(f"filter on {table}.{column}: {op} does not apply to booleans.")
            out[table] = RowFilter(column, op, scalar)
    return out


_COLUMNS_SQL = """
SELECT c.relname AS table_name, a.attname AS column_name, t.typcategory::text AS category,
       t.typname AS type_name,
       $3::text IS NULL OR (pg_catalog.has_schema_privilege($3::text, n.oid, 'USAGE')
           AND pg_catalog.has_column_privilege($3::text, c.oid, a.attname::text, 'SELECT')) AS readable
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
WHERE n.nspname = $1 AND c.relname = ANY ($2::text[]) AND c.relkind IN ('r', 'p')
"""


async def check_columns(
    db: asyncpg.Pool, project_id: str, role: str | None, filters: dict[str, RowFilter]
) -> None:
    """Each filter's table and column exist and `role` (None: an admin) may SELECT the column,
    and the value suits the column's type; else a ValidationError naming what is wrong."""
    if not filters:
        return
    rows = await db.fetch(_COLUMNS_SQL, schema_name(project_id), sorted(filters), role)
    cols = {(r["table_name"], r["column_name"]): r for r in rows if r["readable"]}
    for table, f in sorted(filters.items()):
        col = cols.get((table, f.column))
        if col is None:
            # The same answer for a column that does not exist and one the role may not read.
            raise ValidationError(f"filters: unknown column {f.column!r} of table {table!r}.")
        category, type_name = col["category"], col["type_name"]
        values = f.value if isinstance(f.value, tuple) else (f.value,)
        if category == "N":
            want = "number"
        elif category == "B":
            want = "bool"
        elif category in ("S", "D") or type_name == "uuid":
            want = "string"
        else:
            raise ValidationError(f"filters: column {table}.{f.column} ({type_name}) cannot be filtered.")
        if any(_kind(v) != want for v in values):
            article = {"number": "a number", "bool": "a boolean", "string": "a string"}[want]
            raise ValidationError(f"filter on {table}.{f.column}: the value must be {article} ({type_name}).")
        if f.op in ORDERING and category not in ("N", "S"):
            raise ValidationError(
                f"filter on {table}.{f.column}: {f.op} applies to numeric and text columns only."
            )
