"""What a PostgreSQL error of a tenant session means for the caller: one table, one place.

Three kinds of failure reach a tenant request: the session is gone (the outcome is unknown:
DATABASE_CONNECTION_ERROR, never a success), a refusal of the platform's own guard functions
(sql/0002, 0007, 0010, 0011: FX codes), or the tenant's statement failed (StatementFailed with
its SQLSTATE). `SQLSTATES` says, for the statement failures that have one, which HTTP answer
the REST endpoints (records, tables, RLS management) give them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import asyncpg

from fluxbase.errors import (
    AuthRequired,
    Conflict,
    FluxbaseError,
    InsufficientPermissions,
    InvalidUserToken,
    ProjectReadOnly,
    ProjectSuspended,
    QueryTimeout,
    RateLimited,
    SqlConflict,
    SqlExecFailed,
    SqlForbidden,
    StatementFailed,
    StatementTimedOut,
    UserDisabled,
    ValidationError,
)
from fluxbase.tenancy import wire
from fluxbase.tenancy.params import ParamError

# Server-side errors that mean the session is gone, not that the statement was wrong.
SESSION_GONE = (
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
)
# ...and client-side ones: the connection broke under us.
CONNECTION_LOST = (OSError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, *SESSION_GONE)
# A concurrent DDL changed a plan asyncpg had cached: nothing ran for real, retry once.
CACHE_STALE = (asyncpg.InvalidCachedStatementError, asyncpg.exceptions.OutdatedSchemaCacheError)

# The session's prepared statements no longer match what asyncpg and the request prefix cached:
# project SQL ran `DEALLOCATE` (26000 on the next use) or `PREPARE` under one of their names
# (42P05) through a DO block's dynamic SQL, where the classifier cannot see it. The error names
# the statement, whose 128 random bits are all that keeps another principal's statement (or the
# platform's quota check) from being replaced: never echo it, never reuse the session
# (hostile review 5).
TAMPERED = frozenset({"26000", "42P05"})
# ...and only when the error names one of the session's own statements (pools.TenantConnection's
# names): a project's `RAISE … USING ERRCODE '26000'`, or its own `PREPARE x` twice, is its
# statement failing, not the session (hostile review 6: those ran the request again and again).
_OWN_STATEMENT = re.compile(r"__asyncpg_(?:stmt|cursor)_[0-9a-f]{32}__")


def tampered(exc: BaseException | None) -> bool:
    """Whether a failure means the session's statements changed: the driver's error, or an API
    error raised while handling one (`raise … from None` keeps it as `__context__`)."""
    for _ in range(8):
        if exc is None:
            return False
        if getattr(exc, "sqlstate", None) in TAMPERED and _OWN_STATEMENT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


CONFLICT, FORBIDDEN, TIMEOUT = "conflict", "forbidden", "timeout"

# realtime.broadcast() past what is left of the request's rate limit (sql/0042): 429 RATE_LIMIT.
SQL_BROADCASTS_SPENT = "FX429"

# SQLSTATE → what kind of failure it is for a REST caller (absent: the statement was wrong).
SQLSTATES: dict[str, str] = {
    "23505": CONFLICT,  # unique_violation
    "42P07": CONFLICT,  # duplicate_table
    "42710": CONFLICT,  # duplicate_object
    "42501": FORBIDDEN,  # insufficient_privilege
    "25006": FORBIDDEN,  # read_only_sql_transaction
    "57014": TIMEOUT,  # query_canceled: statement_timeout
}

# The platform guard's refusals raised inside the request's transaction (sql/0002, 0007, 0011).
GUARD_REFUSALS: dict[str, Callable[[], FluxbaseError]] = {
    "FX401": lambda: AuthRequired("API key is no longer valid (revoked, rotated or expired)."),
    "FX403": ProjectSuspended,
    "FXU01": lambda: InvalidUserToken("The token's session has been revoked or no longer exists."),
    "FXU02": UserDisabled,
}


def guard_refusal(exc: asyncpg.PostgresError) -> FluxbaseError | None:
    """The request guard's refusal as an API error (None: not one)."""
    make = GUARD_REFUSALS.get(exc.sqlstate or "")
    return make() if make is not None else None


def statement_failed(message: str, sqlstate: str, index: int | None = None) -> StatementFailed:
    if SQLSTATES.get(sqlstate) == TIMEOUT:
        return StatementTimedOut(message, sqlstate, index)
    return StatementFailed(message, sqlstate, index)


def statement_error(exc: BaseException, may_write: bool, index: int | None = None) -> BaseException:
    """A driver error of the tenant statement as StatementFailed; session-level errors pass.

    A read-only transaction refusing a write of a scope that may write means the project was
    switched read-only: PROJECT_READ_ONLY."""
    if isinstance(exc, SESSION_GONE):
        return exc
    if isinstance(exc, ParamError) or wire.refused_encoding(exc):  # client-side encoding
        # (asyncpg's refusal is an asyncpg.DataError: a PostgresError, SQLSTATE 22000, too)
        return StatementFailed(str(exc), "22023", index)
    if isinstance(exc, asyncpg.PostgresError):
        if exc.sqlstate == "25006" and may_write:
            return ProjectReadOnly()
        if exc.sqlstate == SQL_BROADCASTS_SPENT:  # realtime.broadcast past the request's share
            return RateLimited(1, str(exc.args[0]) if exc.args else None)
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        return statement_failed(message, exc.sqlstate or "XX000", index)
    return exc


def rest_error(exc: StatementFailed) -> FluxbaseError:
    """A SQL failure on a REST data endpoint: execute-sql's code and details, status by SQLSTATE."""
    extra = {"details": f"ERROR:  {exc.sqlstate}"}
    kind = SQLSTATES.get(exc.sqlstate)
    if isinstance(exc, StatementTimedOut):
        return QueryTimeout(exc.message, extra=extra)
    if kind == CONFLICT:
        return SqlConflict(exc.message, extra=extra)
    if kind == FORBIDDEN:
        return SqlForbidden(exc.message, extra=extra)
    return SqlExecFailed(exc.message, extra=extra)


def management_error(exc: asyncpg.PostgresError) -> BaseException:
    """A failed statement of a management request (RLS policies): PostgreSQL's own message names
    the cause (e.g. `column "owner" does not exist`), the status follows `SQLSTATES`."""
    if isinstance(exc, SESSION_GONE):
        return exc
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    extra = {"sqlstate": exc.sqlstate or "XX000"}
    kind = SQLSTATES.get(exc.sqlstate or "")
    if kind == CONFLICT:
        return Conflict(message, extra=extra)
    if kind == FORBIDDEN:
        return InsufficientPermissions(message, extra=extra)
    return ValidationError(message, extra=extra)
