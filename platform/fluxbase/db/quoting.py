"""Quoting for the few places that must interpolate an identifier or literal into SQL."""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """Quote an SQL identifier (the one helper for interpolated identifiers)."""
    if "\x00" in name:
        raise ValueError("identifier contains NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string literal that means the same whatever standard_conforming_strings is: a
    value with a backslash becomes an escape string (E'...'), where backslashes are escaped."""
    if "\x00" in value:
        raise ValueError("string contains NUL")
    body = value.replace("'", "''")
    if "\\" in value:
        return "E'" + body.replace("\\", "\\\\") + "'"
    return "'" + body + "'"
