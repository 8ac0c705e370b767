"""`tenancy.params.adapt_params`: JSON parameters for the statement's placeholder types. The
common cases (an int for an integer placeholder, a string for a text one) skip `adapt`; every
other pairing goes through it, and the answers are the same either way."""

from __future__ import annotations

import datetime as dt
from collections import namedtuple
from typing import Any

import pytest

from fluxbase.tenancy.params import ParamError, adapt, adapt_params

Type = namedtuple("Type", "oid name kind schema")  # what asyncpg's statement reports


def _types(*names: str) -> list[Any]:
    return [Type(0, n, "scalar", "pg_catalog") for n in names]


@pytest.mark.parametrize(
    ("value", "typename", "expected"),
    [
        (7, "int4", 7),
        (True, "int4", 1),  # a bool is not passed through as an int
        (2.0, "int8", 2),
        (" 12 ", "int2", 12),
        ("text", "text", "text"),
        (3, "text", "3"),
        (False, "varchar", "false"),
        ({"a": 1}, "text", '{"a":1}'),
        (None, "int4", None),
        (None, "text", None),
        ("2026-04-14T12:00:00Z", "timestamptz", dt.datetime(2026, 4, 14, 12, tzinfo=dt.UTC)),
        (5, "float8", 5.0),
        ("x", "jsonb", "x"),
    ],
)
def test_each_pairing_adapts_as_adapt_does(value: Any, typename: str, expected: Any) -> None:
    out = adapt_params(_types(typename), [value])
    assert out == [expected] and type(out[0]) is type(expected)
    assert adapt(value, typename) == expected


def test_refusals_name_the_parameter() -> None:
    with pytest.raises(ParamError, match=r"parameter \$2: 'x' is not an integer \(int4\)"):
        adapt_params(_types("text", "int4"), ["ok", "x"])
    with pytest.raises(ParamError, match="expects 1 parameter"):
        adapt_params(_types("int4"), [1, 2])
