"""Typed errors: every failure the API reports becomes a FluxbaseError with status, code, message."""

from __future__ import annotations

from typing import Any


class FluxbaseError(Exception):
    """An error answered by Fluxbase: HTTP `status`, the documented `code` and its `message`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: str | None = None,
        statement_index: int | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ):
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.statement_index = statement_index
        self.retry_after = retry_after
        self.body = body


class SqlError(FluxbaseError):
    """A statement PostgreSQL refused (`SQL_EXEC_ERROR`; the SQLSTATE is in `details`)."""

    @property
    def sqlstate(self) -> str | None:
        d = (self.details or "").split()
        return d[-1] if d else None


class AuthError(FluxbaseError):
    """401: a missing, expired or revoked credential (AUTH_REQUIRED, TOKEN_EXPIRED, ...)."""


class PermissionDenied(FluxbaseError):
    """403: the credential may not do this (SCOPE_MISMATCH, INSUFFICIENT_PERMISSIONS, ...)."""


class NotFoundError(FluxbaseError):
    """404: PROJECT_NOT_FOUND, NOT_FOUND, USER_NOT_FOUND."""


class RateLimitError(FluxbaseError):
    """429 RATE_LIMIT; `retry_after` holds the server's Retry-After in seconds."""


class UnavailableError(FluxbaseError):
    """503: a transient failure (DATABASE_CONNECTION_ERROR, STORAGE_UNAVAILABLE, ...)."""


class ConnectionFailed(FluxbaseError):
    """The server could not be reached at all (status 0)."""


class WebhookVerificationError(Exception):
    """A webhook delivery whose signature or timestamp does not verify."""


def error_for(status: int, body: Any, retry_after: float | None = None) -> FluxbaseError:
    """The typed error for an API answer (`{"success": false, "error": {...}}` or anything else)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"code": "HTTP_ERROR", "message": f"HTTP {status}"}
    code = str(err.get("code") or "HTTP_ERROR")
    message = str(err.get("message") or code)
    cls: type[FluxbaseError]
    if code in ("SQL_EXEC_ERROR", "QUERY_TIMEOUT"):
        cls = SqlError
    elif status == 401:
        cls = AuthError
    elif status == 403:
        cls = PermissionDenied
    elif status == 404:
        cls = NotFoundError
    elif status == 429:
        cls = RateLimitError
    elif status == 503:
        cls = UnavailableError
    else:
        cls = FluxbaseError
    index = err.get("statementIndex")
    return cls(
        status,
        code,
        message,
        details=err.get("details") if isinstance(err.get("details"), str) else None,
        statement_index=index if isinstance(index, int) else None,
        retry_after=retry_after,
        body=body,
    )
