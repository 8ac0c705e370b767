"""Request parameters (JSON values) coerced to what the statement's placeholders take."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

_INT_TYPES = {"int2", "int4", "int8", "oid"}
_FLOAT_TYPES = {"float4", "float8"}
_TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "citext"})


def adapt(value: Any, typename: str) -> Any:
    """Coerce a JSON value to what asyncpg's codec for `typename` accepts; leave others alone."""
    if value is None:
        return None
    try:
        if typename in _INT_TYPES:
            if isinstance(value, bool):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(value.strip())
        elif typename in _FLOAT_TYPES:
            if isinstance(value, (int, str)) and not isinstance(value, bool):
                return float(value)
        elif typename == "bool":
            if isinstance(value, str):
                v = value.strip().lower()
                if v in ("true", "t", "1", "yes", "on"):
                    return True
                if v in ("false", "f", "0", "no", "off"):
                    return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
        elif typename == "timestamptz" or typename == "timestamp":
            if isinstance(value, str):
                parsed = dt.datetime.fromisoformat(value)
                if typename == "timestamptz" and parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=dt.UTC)
                if typename == "timestamp" and parsed.tzinfo is not None:
                    parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
                return parsed
        elif typename == "date":
            if isinstance(value, str):
                return dt.date.fromisoformat(value[:10])
        elif typename in ("time", "timetz"):
            if isinstance(value, str):
                return dt.time.fromisoformat(value)
        elif typename == "uuid":
            if isinstance(value, str):
                return uuid.UUID(value)
        elif typename == "bytea":
            if isinstance(value, str):
                return base64.b64decode(value, validate=True)
        elif typename in _TEXT_TYPES:
            if isinstance(value, (dict, list)):
                return msgspec.json.encode(value).decode()
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, (int, float)):
                return str(value)
    except (ValueError, TypeError):
        # Python's own text ("invalid literal for int() with base 10") means nothing to a caller.
        raise ParamError(f"{_shown(value)} is not {_EXPECTED.get(typename, 'valid')} ({typename})") from None
    return value


_EXPECTED = {
    **dict.fromkeys(_INT_TYPES, "an integer"),
    **dict.fromkeys(_FLOAT_TYPES, "a number"),
    "timestamptz": "an ISO 8601 timestamp like 2026-04-14T12:00:00Z",
    "timestamp": "an ISO 8601 timestamp like 2026-04-14T12:00:00",
    "date": "an ISO 8601 date like 2026-04-14",
    "time": "an ISO 8601 time like 12:00:00",
    "timetz": "an ISO 8601 time like 12:00:00+00:00",
    "uuid": "a UUID",
    "bytea": "base64-encoded bytes",
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ParamError(Exception):
    """A request parameter does not fit its placeholder's type (reported as SQLSTATE 22023)."""


def adapt_params(types: Sequence[Any], params: list[Any]) -> list[Any]:
    """The request's JSON parameters for the statement's parameter types (ParamError if not)."""
    if len(params) != len(types):
        raise ParamError(f"the query expects {len(types)} parameter(s), {len(params)} given")
    out = []
    for i, (value, typ) in enumerate(zip(params, types, strict=True), start=1):
        kind = type(value)
        if (kind is int and typ.name in _INT_TYPES) or (kind is str and typ.name in _TEXT_TYPES):
            out.append(value)  # what `adapt` answers for them, without its tests
            continue
        try:
            out.append(adapt(value, typ.name))
        except ParamError as exc:
            raise ParamError(f"parameter ${i}: {exc}") from None
    return out
