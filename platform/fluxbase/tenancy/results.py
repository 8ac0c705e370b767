"""A tenant statement's outcome, encoded once: rows as JSON within the row and byte caps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import msgspec


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, asyncpg.Range):
        return {
            "lower": obj.lower,
            "upper": obj.upper,
            "lowerInc": obj.lower_inc,
            "upperInc": obj.upper_inc,
            "empty": obj.isempty,
        }
    if isinstance(obj, asyncpg.Record):
        return dict(obj.items())
    return str(obj)


ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook, decimal_format="string")
encode = ENCODER.encode  # a response body with the tenant value encoding (records, schema)


def operation_of(status: str | None, fallback: str) -> str:
    """The command tag without its counts ("INSERT 0 3" → "INSERT")."""
    if not status:
        return fallback
    key = (status, fallback)
    known = _OPERATIONS.get(key)
    if known is None:
        if len(_OPERATIONS) >= 4096:
            _OPERATIONS.clear()
        words = [w for w in status.split() if not w.isdigit()]
        known = _OPERATIONS[key] = " ".join(words) or fallback
    return known


# operation_of's answers: a few tags and counts repeat request after request.
_OPERATIONS: dict[tuple[str, str], str] = {}


def count_of(status: str | None) -> int | None:
    """The row count of a command tag, if it has one."""
    if status:
        last = status.rsplit(" ", 1)[-1]
        if last.isdigit():
            return int(last)
    return None


class StatementResult(msgspec.Struct):
    """One statement's outcome, encoded: execute-sql's `result` plus the operation name."""

    columns: list[str]
    rows: list[msgspec.Raw]
    count: int
    message: str | None
    truncated: bool
    operation: str
    # The result columns as asyncpg Attributes: the dashboard shows their PostgreSQL types; the
    # API's envelope does not carry them (the guide's `result` shape).
    attributes: Sequence[Any] = ()

    def column_types(self) -> list[str]:
        """Each result column's PostgreSQL type name (`int4`, `text`, `timestamptz`, …)."""
        return [a.type.name for a in self.attributes]

    def result(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "columns": self.columns,
            "rowCount": self.count,
            "message": self.message,
            "truncated": self.truncated,
        }


def encode_result(
    columns: list[str],
    rows: list[Any],
    status: str | None,
    completed: bool,
    max_rows: int,
    bytes_left: int,
    keyword: str,
    attributes: Sequence[Any] = (),
) -> tuple[StatementResult, int]:
    """Encode a statement's rows within the row cap (`rows` holds up to one more) and the byte
    budget; the result and the budget left."""
    truncated = not completed or len(rows) > max_rows
    encoded: list[msgspec.Raw] = []
    enc = ENCODER.encode
    for rec in rows[:max_rows]:
        chunk = enc(dict(zip(columns, rec, strict=False)))
        if len(chunk) + 1 > bytes_left:
            truncated = True
            break
        bytes_left -= len(chunk) + 1
        encoded.append(msgspec.Raw(chunk))
    count = len(encoded) if columns else (count_of(status) or 0)
    operation = operation_of(status, keyword or "UNKNOWN")
    return StatementResult(
        columns, encoded, count, None if columns else status, truncated, operation, attributes
    ), bytes_left
