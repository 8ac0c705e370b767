"""Tenant SQL over HTTP: one transaction per request on the project's own role, hard limits.

`transaction` is the code path of every tenant data endpoint (execute-batch, schema, tables
and records, and execute-sql where the fast path does not apply): 1) BEGIN + key guard +
identity (SET LOCAL), 2) Bind/Execute of each statement with a row cap, 3) COMMIT (or
ROLLBACK) + session reset. A single execute-sql statement (cached) takes one round trip
instead (`_pipelined`, db.pipeline): session reset, identity (SET LOCAL), guard and the
statement, written together and run as one implicit transaction up to a single Sync.

What a statement is, and whether it is refused, is tenancy.statements' decision (PostgreSQL's
own parser, one cached classification per text); nothing here reads SQL text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import msgspec

from fluxbase.db import pipeline, tenants
from fluxbase.db.tenants import SESSION_RESET, TenantPools, quote_literal
from fluxbase.errors import (
    AuthRequired,
    DatabaseUnavailable,
    FluxbaseError,
    InvalidUserToken,
    ProjectReadOnly,
    ProjectSuspended,
    RateLimited,
    UserDisabled,
    ValidationError,
)
from fluxbase.services import quota
from fluxbase.services.quota import SizeCache
from fluxbase.tenancy import statements as classification

log = logging.getLogger("fluxbase.sql")

T = TypeVar("T")

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


def leading_keyword(sql: str) -> str:
    """The first keyword of a statement ("" if none), as PostgreSQL's scanner reads it."""
    return classification.default().classify(sql).keyword


@dataclass(frozen=True)
class Identity:
    """Who the statement runs for: auth.uid(), auth.jwt() claims and auth.role()."""

    uid: str | None
    claims: dict[str, Any]
    role: str
    # A Fluxbase project user's (session id, project id): checked inside the transaction by
    # fluxbase_guard.check_user_session, so logout and disabling apply to the next request.
    user_session: tuple[str, str] | None = None
    # An end user's request (a user token: requireUserAuth keys always carry one). It runs on
    # connections of its own, never shared with a trusted server key's requests.
    end_user: bool = False


@dataclass(frozen=True)
class Limits:
    deadline_s: float
    max_rows: int
    max_bytes: int
    acquire_timeout_s: float


@dataclass(frozen=True)
class TenantRequest:
    """What one data request brings to its tenant transaction, resolved once at the HTTP edge."""

    project_id: str
    scope: str
    identity: Identity
    limits: Limits
    # The project's read-only switch as the edge knows it (for a key: from its cached state,
    # which the one-round-trip path trusts only while `epoch` is current; the explicit path
    # leaves it to the key guard, which reads it inside the transaction).
    project_read_only: bool = False
    guard: tuple[bytes, str] | None = None  # (key hash, project) for fluxbase_guard.check_key
    db_quota: int | None = None  # the project's database-size cap
    sizes: SizeCache | None = None
    # The project's auth epoch the cached key state was read with (sql/0011), and how to drop
    # that cache entry when the epoch has moved on since.
    epoch: int | None = None
    evict_key: Callable[[bytes], None] | None = None


def base_claims(scope: str, project_id: str) -> dict[str, Any]:
    """auth.jwt() of a request without an end user (an API key or member acting for itself)."""
    return {"role": scope, "project_id": project_id}


class SqlError(msgspec.Struct):
    message: str
    code: str
    details: str


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


# -- batch statement checks -------------------------------------------------------------------

MAX_BATCH_STATEMENTS = 100
ISOLATION_LEVELS = {
    "read committed": "READ COMMITTED",
    "repeatable read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}

# -- execution --------------------------------------------------------------------------------


class StatementFailed(Exception):
    """A tenant statement (or the commit) failed; the transaction has been rolled back."""

    def __init__(self, message: str, sqlstate: str, code: str = "SQL_EXEC_ERROR", index: int | None = None):
        super().__init__(message)
        self.message, self.sqlstate, self.code, self.index = message, sqlstate, code, index

    def body(self, with_index: bool = False) -> dict[str, Any]:
        message = self.message
        error: dict[str, Any] = {"message": message, "code": self.code, "details": f"ERROR:  {self.sqlstate}"}
        if with_index:
            where = "commit" if self.index is None else f"statement {self.index}"
            error["message"] = f"{where}: {message}"
            error["statementIndex"] = self.index
        return {"success": False, "error": error}


# Command tags of statements that end the transaction they run in (even when AND CHAIN
# starts another): COMMIT, ROLLBACK (also ROLLBACK TO a savepoint), PREPARE TRANSACTION.
_ENDED = ("COMMIT", "ROLLBACK", "PREPARE TRANSACTION")


class TransactionEnded(StatementFailed):
    """A tenant statement ended the request's transaction; the connection has been closed."""

    def __init__(self, index: int | None):
        super().__init__(
            "the statement ended the request's transaction (transaction control is not allowed); "
            "what it committed cannot be undone, and the connection was closed",
            "0A000",
            index=index,
        )


def _error_body(message: str, sqlstate: str, code: str = "SQL_EXEC_ERROR") -> bytes:
    return _ENC.encode({"success": False, "error": SqlError(message, code, f"ERROR:  {sqlstate}")})


def identity_statements(identity: Identity) -> tuple[str, str, str]:
    """The request identity as SET LOCAL statements, not set_config(): tenant read and readwrite
    roles may not execute set_config (sql/0007), so they cannot change it mid-statement.

    SET LOCAL on every path, so no identity outlives its transaction. On the one-round-trip path
    the messages before the Sync are one implicit transaction: there SET LOCAL takes effect for
    the rest of it, and since the session reset steps come first (PostgreSQL 17+ treats the
    pipeline as an implicit transaction block from its second message on) it logs no "SET LOCAL
    can only be used in transaction blocks" warning (tests/test_sql_pipeline_identity.py)."""
    claims = msgspec.json.encode(identity.claims).decode()
    return (
        f"SET LOCAL fluxbase.auth_uid = {quote_literal(identity.uid or '')}",
        f"SET LOCAL fluxbase.auth_claims = {quote_literal(claims)}",
        f"SET LOCAL fluxbase.auth_role = {quote_literal(identity.role)}",
    )


def identity_script(identity: Identity) -> str:
    return "; ".join(identity_statements(identity))


def begin_script(
    identity: Identity,
    read_only: bool,
    guard: tuple[bytes, str] | None = None,
    isolation: str = "READ COMMITTED",
) -> str:
    """BEGIN, the key guard, the end user's session check and the identity in one round trip."""
    mode = "READ ONLY" if read_only else "READ WRITE"
    check = ""
    if guard is not None:
        check = f"SELECT fluxbase_guard.check_key('\\x{guard[0].hex()}'::bytea, {quote_literal(guard[1])}); "
    if identity.user_session is not None:
        sid, project = (quote_literal(v) for v in identity.user_session)
        uid = quote_literal(identity.uid or "")
        check += f"SELECT fluxbase_guard.check_user_session({sid}, {uid}, {project}); "
    return f"BEGIN ISOLATION LEVEL {isolation} {mode}; {check}{identity_script(identity)}"


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


_CACHE_STALE = (asyncpg.InvalidCachedStatementError, asyncpg.exceptions.OutdatedSchemaCacheError)


async def _forget_cached_plans(conn: Any, exc: BaseException) -> None:
    """Before the one retry after a DDL: without this asyncpg hands back the same cached
    statement (we call `_get_statement` ourselves, past the driver's own retry)."""
    if isinstance(exc, asyncpg.exceptions.OutdatedSchemaCacheError):
        await conn.reload_schema_state()
    else:
        conn._drop_local_statement_cache()


@dataclass
class StatementResult:
    """One statement's outcome, encoded: execute-sql's `result` plus the operation name."""

    columns: list[str]
    rows: list[msgspec.Raw]
    count: int
    message: str | None
    truncated: bool
    operation: str

    def result(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "columns": self.columns,
            "rowCount": self.count,
            "message": self.message,
            "truncated": self.truncated,
        }


def encode_result(
    stmt: Any,
    rows: list[Any],
    status: str | None,
    completed: bool,
    limits: Limits,
    bytes_left: int,
    keyword: str,
) -> tuple[StatementResult, int]:
    """Encode a statement's rows within the row cap (`rows` holds up to one more) and the byte
    budget; the result and the budget left."""
    columns = [a.name for a in stmt._get_attributes()]
    truncated = not completed or len(rows) > limits.max_rows
    encoded: list[msgspec.Raw] = []
    enc = _ENC.encode
    for rec in rows[: limits.max_rows]:
        chunk = enc(dict(zip(columns, rec, strict=False)))
        if len(chunk) + 1 > bytes_left:
            truncated = True
            break
        bytes_left -= len(chunk) + 1
        encoded.append(msgspec.Raw(chunk))
    count = len(encoded) if columns else (_count_of(status) or 0)
    operation = _op_of(status, keyword or "UNKNOWN")
    return StatementResult(
        columns, encoded, count, None if columns else status, truncated, operation
    ), bytes_left


class Tx:
    """The request's open transaction on a tenant connection: the only way work touches it."""

    def __init__(
        self,
        conn: Any,
        limits: Limits,
        identity: Identity,
        may_write: bool = False,
        quota_of: tuple[str, int, SizeCache] | None = None,
    ):
        self.conn = conn
        self.limits = limits
        self.identity = identity
        self.index: int | None = None  # the statement running now (for error messages)
        self.retried = False
        self.bytes_left = limits.max_bytes
        # A read-only transaction for a scope that may write means the project is read-only.
        self.may_write = may_write
        # (project, cap, sizes) of a project with a database-size cap: checked before COMMIT.
        self.quota_of = quota_of

    def _failed(self, exc: BaseException) -> BaseException:
        """Map a driver error to StatementFailed; session-level failures pass through."""
        if isinstance(exc, _CACHE_STALE) and not self.retried:
            return exc  # the transaction runner retries once
        return _statement_error(exc, self.may_write, self.index)

    async def run(self, query: str, params: list[Any], keyword: str = "") -> StatementResult:
        """Run one statement with the row cap and the request's remaining byte budget."""
        try:
            stmt, rows, status, completed = await _bind_execute(
                self.conn, query, params, self.limits.max_rows + 1
            )
        except Exception as exc:
            raise self._failed(exc) from None
        if not self.conn.is_in_transaction() or (status is not None and status.startswith(_ENDED)):
            # The statement ended the request's transaction (what tenancy.statements refuses
            # got through; AND CHAIN opens a new one, without the request's SET LOCALs): its
            # identity, read-only mode and size check are gone. Fail, and never hand this
            # session to anyone again.
            self.conn.terminate()
            raise TransactionEnded(self.index)
        res, self.bytes_left = encode_result(
            stmt, rows, status, completed, self.limits, self.bytes_left, keyword
        )
        return res

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """A platform-written query (catalog lookups) in the same transaction, decoded."""
        try:
            return list(await self.conn.fetch(query, *args))
        except Exception as exc:
            raise self._failed(exc) from None

    async def check_quota(self) -> None:
        """Before COMMIT: refuse the write that takes a capped project past its size limit.

        Every writing transaction of a capped project (services.quota)."""
        if self.quota_of is None:
            return
        project_id, cap, sizes = self.quota_of
        if not sizes.needs_check(project_id, cap):
            return
        try:
            await quota.check(self.conn, project_id, sizes)
        except asyncpg.PostgresError as exc:
            raise self._failed(exc) from None

    async def reassert_identity(self) -> None:
        """Set the request identity again (a batch does this before each later statement)."""
        try:
            await self.conn.execute(identity_script(self.identity))
        except Exception as exc:
            raise self._failed(exc) from None


def _guard_refusal(exc: asyncpg.PostgresError) -> FluxbaseError | None:
    """The request guard's refusals (sql/0002, 0007, 0011) as API errors."""
    state = exc.sqlstate
    if state == "FX401":
        return AuthRequired("API key is no longer valid (revoked or expired).")
    if state == "FX403":
        return ProjectSuspended()
    if state == "FXU01":
        return InvalidUserToken("The token's session has been revoked or no longer exists.")
    if state == "FXU02":
        return UserDisabled()
    return None


async def _begin(conn: Any, begin: str) -> None:
    try:
        await conn.execute(begin)
    except asyncpg.PostgresError as exc:
        if isinstance(exc, _SESSION_GONE):
            raise
        await conn.execute("ROLLBACK; " + SESSION_RESET)
        refusal = _guard_refusal(exc)
        if refusal is not None:
            raise refusal from None
        raise


async def _in_transaction(tx: Tx, begin: str, work: Callable[[Tx], Awaitable[T]]) -> T:
    conn = tx.conn
    await _begin(conn, begin)
    try:
        try:
            out = await work(tx)
        except _CACHE_STALE as exc:
            # A concurrent DDL changed a cached plan; nothing ran for real. Retry once.
            await conn.execute("ROLLBACK")
            await _forget_cached_plans(conn, exc)
            await _begin(conn, begin)
            tx.retried, tx.index, tx.bytes_left = True, None, tx.limits.max_bytes
            out = await work(tx)
        await tx.check_quota()
    except TransactionEnded:
        raise  # the connection is closed: nothing to roll back on it
    except (StatementFailed, FluxbaseError):
        await conn.execute("ROLLBACK; " + SESSION_RESET)
        raise
    try:
        await conn.execute("COMMIT; " + SESSION_RESET)
    except asyncpg.PostgresError as exc:  # e.g. a deferred constraint failing at commit
        if isinstance(exc, _SESSION_GONE):
            raise
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        await conn.execute(SESSION_RESET)
        raise StatementFailed(exc.args[0] if exc.args else "commit failed", exc.sqlstate or "XX000") from None
    return out


async def _on_connection(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    run: Callable[[Any], Awaitable[T]],
    index: Callable[[], int | None] = lambda: None,
    *,
    pipelined: bool = False,
) -> T:
    """Run `run(conn)` on a pooled connection of the project's own role within the request
    deadline (the backend is terminated when it passes). A connection that is lost, timed out or
    still in a transaction afterwards is terminated, never handed to the next request."""
    project_id, limits = req.project_id, req.limits
    pool = await pools.pool(project_id, req.scope, end_user=req.identity.end_user)
    try:
        conn = await pool.acquire(limits.acquire_timeout_s)
    except TimeoutError:
        raise RateLimited(1, "All database connections of this project are busy. Retry shortly.") from None
    dead = False
    try:
        # The request deadline: a timer that cancels this task (asyncio.timeout, at a fraction
        # of its cost on this path); the backend is then terminated.
        task = asyncio.current_task()
        assert task is not None
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            task.cancel()

        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + limits.deadline_s, expire)
        try:
            if not pipelined:
                await tenants.clean(conn)
            return await run(conn)
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel()
            dead = True
            await _terminate(control, conn)
            ms = int(limits.deadline_s * 1000)
            raise StatementFailed(
                f"canceling statement due to request deadline ({ms} ms)", "57014", "QUERY_TIMEOUT", index()
            ) from None
        except _CONNECTION_LOST as exc:
            # The connection broke: the transaction did not commit (or we cannot know it did).
            dead = True
            with contextlib.suppress(asyncpg.InterfaceError):  # already detached from the pool
                conn.terminate()
            log.warning("tenant connection lost for project %s: %r", project_id, exc)
            raise DatabaseUnavailable() from None
        finally:
            timer.cancel()
    finally:
        if not dead and not conn.is_closed() and conn.is_in_transaction():
            dead = True
            conn.terminate()  # never hand an open transaction to the next request
        if not dead:
            await pool.release(conn)


async def transaction(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    work: Callable[[Tx], Awaitable[T]],
    *,
    read_only: bool = False,
    isolation: str = "READ COMMITTED",
) -> T:
    """Run `work` in one transaction on the project's own role, with identity and limits.

    The code path for tenant data access (execute-batch, schema, records, and execute-sql
    where `_pipelined` does not apply): a pooled connection whose session user is the project
    role, BEGIN + key guard + identity, the request deadline, commit + session reset.
    Raises StatementFailed (rolled back), DatabaseUnavailable (connection lost: the outcome is
    unknown, never reported as success), RateLimited (pool exhausted) or `work`'s own
    FluxbaseError (rolled back), including PROJECT_READ_ONLY for a write to a read-only project
    and DATABASE_QUOTA_EXCEEDED for one that crosses the project's size cap. `read_only` is the
    caller's own request for a read-only transaction: a write then fails as SQL (25006), not as
    the project's switch.
    """
    scope = req.scope
    begin = begin_script(
        req.identity,
        read_only or (req.project_read_only and req.guard is None) or scope == "read",
        req.guard,
        isolation,
    )
    may_write = scope != "read" and not read_only
    quota_of = None
    if may_write and req.db_quota and req.sizes is not None:
        quota_of = (req.project_id, req.db_quota, req.sizes)
    txs: list[Tx] = []

    async def run(conn: Any) -> T:
        tx = Tx(conn, req.limits, req.identity, may_write, quota_of)
        txs.append(tx)
        return await _in_transaction(tx, begin, work)

    return await _on_connection(pools, control, req, run, lambda: txs[0].index if txs else None)


def pipelinable(req: TenantRequest, verdict: classification.Verdict) -> bool:
    """Whether the one-round-trip path may run it (tenancy.statements.Verdict.pipelinable)."""
    # A capped project's writes are size-checked before COMMIT, which needs the explicit one.
    return verdict.pipelinable and not (req.db_quota and req.scope != "read")


_REFUSALS = frozenset({"FXRST", "FXEPO", "FXU01", "FXU02", "FX401", "FX403"})


class _Fallback(Exception):
    """Run the request as an explicit transaction after all (sql/0011): FXRST, a previous
    request changed the session's transaction defaults (now reset); FXEPO, the cached key state
    is out of date (`check_key` decides); FXU01/FXU02, the end user's session check refused."""


async def _pipelined(
    conn: Any, req: TenantRequest, query: str, params: list[Any], keyword: str
) -> StatementResult:
    """One round trip: reset, identity, guard and the statement as one implicit transaction."""
    prefix = getattr(conn, "request_prefix", None)
    if prefix is None:
        claims = base_claims(req.scope, req.project_id)
        fixed = identity_statements(Identity(None, claims, req.scope))
        prefix = conn.request_prefix = await pipeline.RequestPrefix.prepare(conn, fixed, claims)
    identity = req.identity
    if identity.uid is None and identity.user_session is None and identity.claims == prefix.anonymous_claims:
        who = prefix.anonymous
    else:
        who = b"".join(prefix.statement(s) for s in identity_statements(identity))
    head = b"".join(
        (
            prefix.reset,
            who,
            prefix.checks(
                req.project_id,
                req.epoch if req.guard is not None else None,
                req.scope == "read" or req.project_read_only,
                identity.user_session,
                identity.uid,
            ),
        )
    )
    may_write = req.scope != "read"
    limits = req.limits
    for attempt in (0, 1):
        try:
            stmt = await conn._get_statement(query, None)
        except Exception as exc:
            raise _statement_error(exc, may_write) from None
        try:
            args = adapt_params(stmt._get_parameters(), params)
        except _ParamError as exc:
            await conn.execute(SESSION_RESET)  # ends the implicit transaction a Parse may have opened
            raise StatementFailed(str(exc), "22023") from None
        pipeline.write(conn, head)
        conn.dirty = True  # until the next request's prefix (or tenants.clean) resets the session
        try:
            rows, status, completed = await conn._protocol.bind_execute(
                state=stmt,
                args=args,
                portal_name="",
                limit=limits.max_rows + 1,
                return_extra=True,
                timeout=None,
            )
        except asyncpg.PostgresError as exc:
            state = exc.sqlstate
            if state in _REFUSALS:
                # A pipeline check refused, or the tenant's statement raised one of these codes
                # itself: either way nothing committed, and the explicit-transaction path, whose
                # guard runs apart from the statement, tells the two apart.
                if state == "FXRST":
                    await conn.execute(SESSION_RESET)
                    conn.dirty = False
                elif state == "FXEPO" and req.evict_key is not None and req.guard is not None:
                    req.evict_key(req.guard[0])
                raise _Fallback() from None
            if isinstance(exc, _CACHE_STALE) and attempt == 0:
                await _forget_cached_plans(conn, exc)
                continue  # a DDL changed a cached plan; nothing ran for real
            raise _statement_error(exc, may_write) from None
        except asyncpg.DataError as exc:
            # Refused while encoding, before the driver wrote anything: the prefix is already
            # on the wire without a Sync. Run a harmless prefix step to end it, then report.
            await prefix.drain(conn)
            raise StatementFailed(str(exc), "22023") from None
        except _CONNECTION_LOST:
            raise
        except Exception:
            conn.terminate()  # the protocol state is unknown: never reuse this connection
            raise
        if len(rows) > limits.max_rows:
            status = None  # the portal was suspended: the last command tag is the prefix's
        status_text = status.decode() if isinstance(status, bytes) else status
        return encode_result(stmt, rows, status_text, bool(completed), limits, limits.max_bytes, keyword)[0]
    raise AssertionError("unreachable")


def _statement_error(exc: BaseException, may_write: bool, index: int | None = None) -> BaseException:
    """A driver error of the tenant statement as StatementFailed; session-level errors pass."""
    if isinstance(exc, _SESSION_GONE):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        if exc.sqlstate == "25006" and may_write:
            return ProjectReadOnly()
        sqlstate = exc.sqlstate or "XX000"
        message = str(exc.args[0]) if exc.args else type(exc).__name__
        code = "QUERY_TIMEOUT" if sqlstate == "57014" else "SQL_EXEC_ERROR"
        return StatementFailed(message, sqlstate, code, index)
    if isinstance(exc, (_ParamError, asyncpg.DataError)):  # DataError: client-side encoding
        return StatementFailed(str(exc), "22023", index=index)
    return exc


def _check_query(query: str, what: str = "query") -> None:
    if not query or query.isspace():
        raise ValidationError(f"{what} must not be empty.")
    if len(query) > MAX_QUERY_CHARS or "\x00" in query:
        raise ValidationError(f"{what} is too long or contains NUL characters.")


def _execution_info(started: float, count: int, operation: str) -> dict[str, Any]:
    elapsed_ms = (time.perf_counter() - started) * 1000
    return {
        "time": f"{round(elapsed_ms)}ms",
        "timeMs": round(elapsed_ms, 3),
        "rowCount": count,
        "operation": operation,
    }


async def execute(
    pools: TenantPools, control: asyncpg.Pool, req: TenantRequest, query: str, params: list[Any]
) -> bytes:
    """Run one tenant statement; return the encoded response body (success or SQL error)."""
    _check_query(query)
    if len(params) > MAX_PARAMS:
        raise ValidationError(f"at most {MAX_PARAMS} params are allowed.")
    verdict = pools.statements.classify(query)
    refused = verdict.refusal(classification.REQUEST)
    if refused is not None:
        return _error_body(refused.message, refused.sqlstate)
    keyword = verdict.keyword
    started = time.perf_counter()

    async def work(tx: Tx) -> StatementResult:
        return await tx.run(query, params, keyword)

    try:
        if pipelinable(req, verdict):
            try:
                res = await _on_connection(
                    pools,
                    control,
                    req,
                    lambda conn: _pipelined(conn, req, query, params, keyword),
                    pipelined=True,
                )
            except _Fallback:
                res = await transaction(pools, control, req, work)
        else:
            res = await transaction(pools, control, req, work)
    except StatementFailed as exc:
        return _error_body(exc.message, exc.sqlstate, exc.code)
    body = {
        "success": True,
        "result": res.result(),
        "executionInfo": _execution_info(started, res.count, res.operation),
    }
    return _ENC.encode(body)


@dataclass(frozen=True)
class Statement:
    query: str
    params: list[Any]


def _batch_error(index: int, message: str, sqlstate: str) -> bytes:
    return _ENC.encode(StatementFailed(message, sqlstate, index=index).body(with_index=True))


async def execute_batch(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    statements: list[Statement],
    *,
    isolation: str,
    read_only: bool = False,
) -> bytes:
    """Run statements in order in one transaction, all or nothing; return the encoded body."""
    if not statements:
        raise ValidationError("statements must not be empty.")
    if len(statements) > MAX_BATCH_STATEMENTS:
        raise ValidationError(f"at most {MAX_BATCH_STATEMENTS} statements are allowed in a batch.")
    if sum(len(s.query) for s in statements) > MAX_QUERY_CHARS:
        raise ValidationError(f"the statements may total at most {MAX_QUERY_CHARS} characters.")
    if sum(len(s.params) for s in statements) > MAX_PARAMS:
        raise ValidationError(f"at most {MAX_PARAMS} params are allowed in a batch.")
    level = ISOLATION_LEVELS.get(isolation.strip().lower())
    if level is None:
        raise ValidationError("isolationLevel must be one of: " + ", ".join(ISOLATION_LEVELS) + ".")
    keywords: list[str] = []
    for i, s in enumerate(statements):
        _check_query(s.query, f"statements[{i}].query")
        verdict = pools.statements.classify(s.query)
        refused = verdict.refusal(classification.BATCH)
        if refused is not None:
            return _batch_error(i, refused.message, refused.sqlstate)
        keywords.append(verdict.keyword)
    started = time.perf_counter()

    async def work(tx: Tx) -> list[StatementResult]:
        out = []
        for i, s in enumerate(statements):
            tx.index = i
            if i:
                # Whatever statement i-1 did to the settings, statement i runs as the request.
                await tx.reassert_identity()
            out.append(await tx.run(s.query, s.params, keywords[i]))
        return out

    try:
        results = await transaction(pools, control, req, work, read_only=read_only, isolation=level)
    except StatementFailed as exc:
        return _ENC.encode(exc.body(with_index=True))
    elapsed_ms = (time.perf_counter() - started) * 1000
    body = {
        "success": True,
        "results": [r.result() for r in results],
        "executionInfo": {
            "time": f"{round(elapsed_ms)}ms",
            "timeMs": round(elapsed_ms, 3),
            "statements": len(results),
            "rowCount": sum(r.count for r in results),
            "operations": [r.operation for r in results],
        },
    }
    return _ENC.encode(body)


def encode(body: Any) -> bytes:
    """Encode a response body with the tenant value encoding (records, schema)."""
    return _ENC.encode(body)
