"""Plain results shared by the client's modules: a statement's answer and an end user's session."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SqlResult:
    """One statement's answer: rows (dicts), column names, counts and execution info."""

    rows: list[dict[str, Any]]
    columns: list[str]
    row_count: int
    message: str | None = None
    truncated: bool = False
    execution_info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, result: Mapping[str, Any], info: Mapping[str, Any] | None) -> SqlResult:
        return cls(
            rows=list(result.get("rows") or []),
            columns=list(result.get("columns") or []),
            row_count=int(result.get("rowCount") or 0),
            message=result.get("message"),
            truncated=bool(result.get("truncated", False)),
            execution_info=dict(info or {}),
        )


@dataclass
class Session:
    """An end user's session: the access token (JWT) and the single-use refresh token."""

    access_token: str
    refresh_token: str
    expires_at: float
    user: dict[str, Any]


AuthListener = Callable[[str, "Session | None"], Any]
