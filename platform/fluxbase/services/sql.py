"""Tenant SQL over HTTP: one statement, one transaction, the project's own role, hard limits.

Round trips per request (cached statement): 1) BEGIN + guard + identity (SET LOCAL), 2) Bind/Execute
of the tenant statement with a row cap, 3) COMMIT (or ROLLBACK) + session reset.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from fluxbase.db.tenants import SESSION_RESET, TenantPools, quote_literal
from fluxbase.errors import (
    AuthRequired,
    DatabaseUnavailable,
    InvalidUserToken,
    ProjectSuspended,
    RateLimited,
    UserDisabled,
    ValidationError,
)

log = logging.getLogger("fluxbase.sql")

MAX_QUERY_CHARS = 1_000_000

# Server-side errors that mean the session is gone, not that the statement was wrong.
_SESSION_GONE = (
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
)
_CONNECTION_LOST = (OSError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError, *_SESSION_GONE)
MAX_PARAMS = 10_000

# Statements refused before they reach PostgreSQL: each request is exactly one transaction, so
# transaction control would end it early (and drop the request's identity), and session-level
# state (prepared statements, LISTEN, DISCARD, COPY streams) has no meaning over stateless HTTP.
DENIED = {
    "BEGIN": "transaction control",
    "START": "transaction control",
    "COMMIT": "transaction control",
    "END": "transaction control",
    "ROLLBACK": "transaction control",
    "ABORT": "transaction control",
    "SAVEPOINT": "transaction control",
    "RELEASE": "transaction control",
    "PREPARE": "session prepared statements",
    "DEALLOCATE": "session prepared statements",
    "DISCARD": "session state",
    "LISTEN": "session state",
    "UNLISTEN": "session state",
    "COPY": "COPY streams",
    "LOAD": "loading libraries",
}

_WORD = re.compile(r"[A-Za-z_]+")


def leading_keyword(sql: str) -> str:
    """The first keyword of a statement, skipping whitespace, comments, '(' and ';'."""
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace() or c in "(;":
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        else:
            break
    m = _WORD.match(sql, i)
    return m.group(0).upper() if m else ""


@dataclass(frozen=True)
class Identity:
    """Who the statement runs for: auth.uid(), auth.jwt() claims and auth.role()."""

    uid: str | None
    claims: dict[str, Any]
    role: str
    # A Fluxbase project user's (session id, project id): checked inside the transaction by
    # fluxbase_guard.check_user_session, so logout and disabling apply to the next request.
    user_session: tuple[str, str] | None = None


@dataclass(frozen=True)
class Limits:
    deadline_s: float
    max_rows: int
    max_bytes: int
    acquire_timeout_s: float


class SqlError(msgspec.Struct):
    message: str
    code: str
    details: str


def _error_body(message: str, sqlstate: str, code: str = "SQL_EXEC_ERROR") -> bytes:
    return _ENC.encode({"success": False, "error": SqlError(message, code, f"ERROR:  {sqlstate}")})


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


_ENC = msgspec.json.Encoder(enc_hook=_enc_hook, decimal_format="string")


def _op_of(status: str | None, fallback: str) -> str:
    if not status:
        return fallback
    words = [w for w in status.split() if not w.isdigit()]
    return " ".join(words) or fallback


def _count_of(status: str | None) -> int | None:
    if status:
        last = status.rsplit(" ", 1)[-1]
        if last.isdigit():
            return int(last)
    return None


# -- parameters -------------------------------------------------------------------------------

_INT_TYPES = {"int2", "int4", "int8", "oid"}
_FLOAT_TYPES = {"float4", "float8"}


def _adapt(value: Any, typename: str) -> Any:
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
        elif typename in ("text", "varchar", "bpchar", "name", "citext"):
            if isinstance(value, (dict, list)):
                return msgspec.json.encode(value).decode()
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, (int, float)):
                return str(value)
    except (ValueError, TypeError) as exc:
        raise _ParamError(f"cannot convert {value!r} to {typename}: {exc}") from None
    return value


class _ParamError(Exception):
    pass


def adapt_params(types: Sequence[Any], params: list[Any]) -> list[Any]:
    if len(params) != len(types):
        raise _ParamError(f"the query expects {len(types)} parameter(s), {len(params)} given")
    out = []
    for i, (value, typ) in enumerate(zip(params, types, strict=True), start=1):
        try:
            out.append(_adapt(value, typ.name))
        except _ParamError as exc:
            raise _ParamError(f"parameter ${i}: {exc}") from None
    return out


# -- execution --------------------------------------------------------------------------------


def begin_script(identity: Identity, read_only: bool, guard: tuple[bytes, str] | None = None) -> str:
    """BEGIN, the key guard and the request identity in one simple-protocol round trip.

    Identity is set with SET LOCAL statements, not set_config(): tenant read and readwrite
    roles may not execute set_config (sql/0007), so they cannot change it mid-statement.
    """
    mode = "READ ONLY" if read_only else "READ WRITE"
    claims = msgspec.json.encode(identity.claims).decode()
    check = ""
    if guard is not None:
        check = f"SELECT fluxbase_guard.check_key('\\x{guard[0].hex()}'::bytea, {quote_literal(guard[1])}); "
    if identity.user_session is not None:
        sid, project = (quote_literal(v) for v in identity.user_session)
        uid = quote_literal(identity.uid or "")
        check += f"SELECT fluxbase_guard.check_user_session({sid}, {uid}, {project}); "
    return (
        f"BEGIN ISOLATION LEVEL READ COMMITTED {mode}; {check}"
        f"SET LOCAL fluxbase.auth_uid = {quote_literal(identity.uid or '')}; "
        f"SET LOCAL fluxbase.auth_claims = {quote_literal(claims)}; "
        f"SET LOCAL fluxbase.auth_role = {quote_literal(identity.role)}"
    )


async def _bind_execute(
    conn: Any, query: str, params: list[Any], limit: int
) -> tuple[Any, list[Any], str | None, bool]:
    # asyncpg's public API cannot cap fetched rows and also return the command tag and the
    # columns in one round trip; these are the internals Connection.fetch itself uses
    # (asyncpg is pinned to a tested range in pyproject.toml).
    stmt = await conn._get_statement(query, None)
    args = adapt_params(stmt._get_parameters(), params)
    rows, status, completed = await conn._protocol.bind_execute(
        state=stmt, args=args, portal_name="", limit=limit, return_extra=True, timeout=None
    )
    return stmt, rows, (status.decode() if isinstance(status, bytes) else status), bool(completed)


async def _terminate(control: asyncpg.Pool, conn: Any) -> None:
    """Kill a tenant backend that outlived its deadline (cancel can be swallowed by plpgsql)."""
    pid = conn.get_server_pid()
    conn.terminate()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(control.execute("SELECT pg_terminate_backend($1)", pid), 3)


async def execute(
    pools: TenantPools,
    control: asyncpg.Pool,
    *,
    project_id: str,
    scope: str,
    read_only: bool,
    query: str,
    params: list[Any],
    identity: Identity,
    limits: Limits,
    guard: tuple[bytes, str] | None = None,
) -> bytes:
    """Run one tenant statement; return the encoded response body (success or SQL error)."""
    if not query.strip():
        raise ValidationError("query must not be empty.")
    if len(query) > MAX_QUERY_CHARS or "\x00" in query:
        raise ValidationError("query is too long or contains NUL characters.")
    if len(params) > MAX_PARAMS:
        raise ValidationError(f"at most {MAX_PARAMS} params are allowed.")
    keyword = leading_keyword(query)
    if keyword in DENIED:
        return _error_body(
            f"{keyword} is not allowed ({DENIED[keyword]}): each request runs as exactly one transaction. "
            "Use /api/execute-batch to run several statements atomically.",
            "0A000",
        )
    if keyword == "SET" and re.match(r"\s*SET\s+(SESSION\s+)?AUTHORIZATION\b", query.lstrip(" (\t\n"), re.I):
        return _error_body("SET SESSION AUTHORIZATION is not allowed.", "42501")
    begin = begin_script(identity, read_only or scope == "read", guard)
    pool = await pools.pool(project_id, scope)
    started = time.perf_counter()
    try:
        conn = await pool.acquire(timeout=limits.acquire_timeout_s)
    except TimeoutError:
        raise RateLimited(1, "All database connections of this project are busy. Retry shortly.") from None
    dead = False
    try:
        try:
            async with asyncio.timeout(limits.deadline_s):
                return await _run(conn, begin, query, params, keyword, limits, started)
        except TimeoutError:
            dead = True
            await _terminate(control, conn)
            ms = int(limits.deadline_s * 1000)
            return _error_body(
                f"canceling statement due to request deadline ({ms} ms)", "57014", "QUERY_TIMEOUT"
            )
        except _CONNECTION_LOST as exc:
            # The connection broke: the transaction did not commit (or we cannot know it did).
            dead = True
            with contextlib.suppress(asyncpg.InterfaceError):  # already detached from the pool
                conn.terminate()
            log.warning("tenant connection lost for project %s: %r", project_id, exc)
            raise DatabaseUnavailable() from None
    finally:
        if not dead and not conn.is_closed() and conn.is_in_transaction():
            dead = True
            conn.terminate()  # never hand an open transaction to the next request
        if not dead:
            await pool.release(conn)


async def _run(
    conn: Any, begin: str, query: str, params: list[Any], keyword: str, limits: Limits, started: float
) -> bytes:
    try:
        await conn.execute(begin)
    except asyncpg.PostgresError as exc:
        if isinstance(exc, _SESSION_GONE):
            raise
        await conn.execute("ROLLBACK; " + SESSION_RESET)
        if exc.sqlstate == "FX401":
            raise AuthRequired("API key is no longer valid (revoked or expired).") from None
        if exc.sqlstate == "FX403":
            raise ProjectSuspended() from None
        if exc.sqlstate == "FXU01":
            raise InvalidUserToken("The token's session has been revoked or no longer exists.") from None
        if exc.sqlstate == "FXU02":
            raise UserDisabled() from None
        raise
    try:
        stmt, rows, status, completed = await _bind_execute(conn, query, params, limits.max_rows + 1)
    except (asyncpg.InvalidCachedStatementError, asyncpg.exceptions.OutdatedSchemaCacheError):
        # A concurrent DDL changed a cached plan; the statement did not run. Retry once.
        await conn.execute("ROLLBACK")
        await conn.execute(begin)
        try:
            stmt, rows, status, completed = await _bind_execute(conn, query, params, limits.max_rows + 1)
        except asyncpg.PostgresError as exc:
            return await _fail(conn, exc)
    except asyncpg.PostgresError as exc:
        return await _fail(conn, exc)
    except _ParamError as exc:
        await conn.execute("ROLLBACK; " + SESSION_RESET)
        return _error_body(str(exc), "22023")
    except asyncpg.DataError as exc:  # client-side encoding of a parameter
        await conn.execute("ROLLBACK; " + SESSION_RESET)
        return _error_body(str(exc), "22023")

    columns = [a.name for a in stmt._get_attributes()]
    truncated = not completed or len(rows) > limits.max_rows
    encoded: list[msgspec.Raw] = []
    size = 0
    enc = _ENC.encode
    for rec in rows[: limits.max_rows]:
        chunk = enc(dict(zip(columns, rec, strict=False)))
        size += len(chunk) + 1
        if size > limits.max_bytes:
            truncated = True
            break
        encoded.append(msgspec.Raw(chunk))
    try:
        await conn.execute("COMMIT; " + SESSION_RESET)
    except asyncpg.PostgresError as exc:  # e.g. a deferred constraint failing at commit
        if isinstance(exc, _SESSION_GONE):
            raise
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        await conn.execute(SESSION_RESET)
        return _error_body(exc.args[0] if exc.args else "commit failed", exc.sqlstate or "XX000")
    elapsed_ms = (time.perf_counter() - started) * 1000
    operation = _op_of(status, keyword or "UNKNOWN")
    count = len(encoded) if columns else (_count_of(status) or 0)
    message = None if columns else status
    body = {
        "success": True,
        "result": {
            "rows": encoded,
            "columns": columns,
            "rowCount": count,
            "message": message,
            "truncated": truncated,
        },
        "executionInfo": {
            "time": f"{round(elapsed_ms)}ms",
            "timeMs": round(elapsed_ms, 3),
            "rowCount": count,
            "operation": operation,
        },
    }
    return _ENC.encode(body)


async def _fail(conn: Any, exc: asyncpg.PostgresError) -> bytes:
    if isinstance(exc, _SESSION_GONE):
        raise exc
    await conn.execute("ROLLBACK; " + SESSION_RESET)
    sqlstate = exc.sqlstate or "XX000"
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    code = "QUERY_TIMEOUT" if sqlstate == "57014" else "SQL_EXEC_ERROR"
    return _error_body(message, sqlstate, code)
