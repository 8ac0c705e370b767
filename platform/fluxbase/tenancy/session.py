"""The one routine every tenant session goes through: acquire, clean, BEGIN, deadline, COMMIT,
reset — and termination of a backend whose state is unknown.

Tenant data requests (`transaction`, `one_round_trip`) run on a pooled connection of the
project's own role with the request identity (SET LOCAL), the key guard and the request
deadline; platform-driven work on a project's objects (migrations, import, vacuum, RLS
management) runs in `admin_session` on the project's admin role. Every path acquires through
`acquire` (an exhausted pool is 503 DATABASE_CONNECTION_ERROR, never a wait without bound), and
hands back only a connection that is out of any transaction with its session reset: anything
else is terminated. The resource caps hold against what the classifier cannot see (plpgsql's
`EXECUTE 'SET …'`, a role's own `ALTER ROLE CURRENT_USER SET`): a connection that logged in
above them gets them asserted at every transaction's start, and a batch's later statements
start with the identity and the caps set again (docs/security.md, "Resource caps").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from fluxbase import tracing
from fluxbase.db.quoting import quote_literal
from fluxbase.errors import (
    ConnectionsBusy,
    DatabaseUnavailable,
    FluxbaseError,
    InternalError,
    ProjectMoving,
    ProjectReadOnly,
    ResultTypeChanged,
    SessionStatementsLost,
    StatementFailed,
    StatementTimedOut,
)
from fluxbase.services import quota
from fluxbase.services.quota import SizeCache
from fluxbase.tenancy import statements as classification
from fluxbase.tenancy import wire
from fluxbase.tenancy.errors import (
    CACHE_STALE,
    CONNECTION_LOST,
    SESSION_GONE,
    SQL_BROADCASTS_SPENT,
    guard_refusal,
    statement_error,
    tampered,
)
from fluxbase.tenancy.identity import (
    BROADCAST_CAP_MAX,
    FULL_CAP,
    Identity,
    identity_statements,
    identity_values,
)
from fluxbase.tenancy.params import ParamError, adapt_params
from fluxbase.tenancy.pools import SESSION_RESET, TenantConnection, TenantPool, TenantPools, clean
from fluxbase.tenancy.results import StatementResult, encode_result
from fluxbase.tenancy.statements import Caps

log = logging.getLogger("fluxbase.tenancy")

T = TypeVar("T")


class Limits(msgspec.Struct, frozen=True):
    deadline_s: float
    max_rows: int
    max_bytes: int
    acquire_timeout_s: float


class TenantRequest(msgspec.Struct, frozen=True):
    """What one data request brings to its tenant transaction, resolved once at the HTTP edge."""

    project_id: str
    scope: str
    identity: Identity
    limits: Limits
    # The project's read-only switch as the edge knows it (for a key: from its cached state,
    # which the one-round-trip path trusts only while `epoch` is current; the explicit path
    # leaves it to the key guard, which reads it inside the transaction).
    project_read_only: bool = False
    project_moving: bool = False  # being moved between clusters (services.moves): writes refused
    guard: tuple[bytes, str] | None = None  # (key hash, project) for fluxbase_guard.check_key
    db_quota: int | None = None  # the project's database-size cap
    sizes: SizeCache | None = None
    # The project's auth epoch the cached key state was read with (sql/0011), and how to drop
    # that cache entry when the epoch has moved on since.
    epoch: int | None = None
    evict_key: Callable[[bytes], None] | None = None
    # How many realtime.broadcast() calls the transaction may make (sql/0042): what is left of
    # the caller's rate-limit window after this request. None: the function's hard cap.
    broadcasts: int | None = None


def broadcast_cap_statement(n: int) -> str:
    """The SET LOCAL that gives the transaction its share of broadcasts (sql/0042)."""
    return f"SET LOCAL fluxbase.broadcast_cap = '{max(0, min(int(n), _CAP_MAX))}'"


def identity_script(identity: Identity) -> str:
    return "; ".join(identity_statements(identity))


def begin_script(
    identity: Identity,
    read_only: bool,
    guard: tuple[bytes, str] | None = None,
    isolation: str = "READ COMMITTED",
    broadcasts: int | None = None,
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
    if broadcasts is not None:
        check += broadcast_cap_statement(broadcasts) + "; "
    return f"BEGIN ISOLATION LEVEL {isolation} {mode}; {check}{identity_script(identity)}"


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
            index,
        )


def over_caps(conn: Any) -> bool:
    """Whether `conn` logged in with settings above the caps (tenancy.pools.login_over_caps):
    then every transaction on it starts with the caps asserted. (RESET ALL, at each request's
    start, goes back to the login values: within a session nothing else can leave them raised.)"""
    return bool(getattr(conn, "over_caps", True))


# -- acquire and termination ------------------------------------------------------------------


async def acquire(pool: TenantPool, timeout_s: float) -> TenantConnection:
    """A connection of `pool`, or 503 DATABASE_CONNECTION_ERROR when all stay busy `timeout_s`."""
    try:
        return await pool.acquire(timeout_s)
    except TimeoutError:
        raise ConnectionsBusy() from None


async def terminate(control: asyncpg.Pool, conn: Any) -> None:
    """Kill a tenant backend that outlived its deadline (cancel can be swallowed by plpgsql)."""
    pid = conn.get_server_pid()
    conn.terminate()
    cluster = getattr(conn, "remote", None)
    if cluster:
        # The backend is on a registered cluster, not the control plane's server (there the pid
        # means another session, maybe another project's): signal it through that cluster's
        # runtime pool. Closing the socket alone is not enough: a plpgsql loop that swallows
        # query_canceled never reads it (hostile review 7).
        pool_of = getattr(conn, "cluster_pool", None)
        if pool_of is not None:
            with contextlib.suppress(Exception):
                pool = await asyncio.wait_for(pool_of(cluster), 3)
                await asyncio.wait_for(pool.execute("SELECT pg_terminate_backend($1)", pid), 3)
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(control.execute("SELECT pg_terminate_backend($1)", pid), 3)


# -- the request's transaction ----------------------------------------------------------------


class Tx:
    """The request's open transaction on a tenant connection: the only way work touches it."""

    def __init__(
        self,
        conn: Any,
        limits: Limits,
        identity: Identity,
        may_write: bool = False,
        quota_of: tuple[str, int, SizeCache] | None = None,
        caps: Caps | None = None,
    ):
        self.conn = conn
        self.caps = caps
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
        if isinstance(exc, CACHE_STALE) and not self.retried:
            return exc  # the transaction runner retries once
        return statement_error(exc, self.may_write, self.index)

    def run(
        self, query: str, params: list[Any], keyword: str = "", before: tuple[str, ...] = ()
    ) -> Awaitable[StatementResult]:
        """Run one statement (in a span of its kind when tracing is on: fluxbase.tracing)."""
        if tracing.enabled():
            return self._traced(query, params, keyword, before)
        return self._run(query, params, keyword, before)

    async def _traced(
        self, query: str, params: list[Any], keyword: str, before: tuple[str, ...]
    ) -> StatementResult:
        with tracing.statement_span(keyword):
            return await self._run(query, params, keyword, before)

    async def _run(
        self, query: str, params: list[Any], keyword: str = "", before: tuple[str, ...] = ()
    ) -> StatementResult:
        """Run one statement with the row cap and the request's remaining byte budget; `before`
        (statements without parameters or rows: `reasserting`) runs first, in the same round
        trip where the statement is prepared by name."""
        conn = self.conn
        limit = self.limits.max_rows + 1
        try:
            stmt = await wire.prepare(conn, query)
            args = adapt_params(wire.parameter_types(stmt), params)
            if before and not wire.named(stmt):
                # A simple query destroys the unnamed statement: run `before`, then parse again.
                await conn.execute("; ".join(before))
                stmt = await wire.prepare(conn, query)
                before = ()
            if before:
                drain = await wire.prepare(conn, wire.DRAIN)
                wire.write(conn, b"".join(wire.parse_bind_execute(sql) for sql in before))
                try:
                    rows, status, completed = await wire.execute(conn, stmt, args, limit)
                except asyncpg.DataError:
                    # Refused while encoding, before the driver wrote anything: end the steps
                    # already written (their outcome is moot: the statement failed).
                    with contextlib.suppress(asyncpg.PostgresError):
                        await wire.execute(conn, drain, [], 0)
                    raise
                if len(rows) >= limit:
                    status = None  # the portal was suspended: the last command tag is a step's
            else:
                rows, status, completed = await wire.execute(conn, stmt, args, limit)
        except Exception as exc:
            raise self._failed(exc) from None
        if not conn.is_in_transaction() or (status is not None and status.startswith(_ENDED)):
            # The statement ended the request's transaction (what tenancy.statements refuses
            # got through; AND CHAIN opens a new one, without the request's SET LOCALs): its
            # identity, read-only mode and size check are gone. Fail, and never hand this
            # session to anyone again.
            conn.terminate()
            raise TransactionEnded(self.index)
        attributes = wire.attributes(stmt)
        res, self.bytes_left = encode_result(
            wire.names(attributes),
            rows,
            status,
            completed,
            self.limits.max_rows,
            self.bytes_left,
            keyword,
            attributes,
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

    def reasserting(self, carried: dict[str, str] | None = None) -> tuple[str, ...]:
        """The request identity and the caps, the caps at the values the request SET visibly
        (`carried`), for `run(before=...)`: a batch sets them again before each later statement,
        so nothing a statement changed unseen (plpgsql's `EXECUTE 'SET …'`, an aggregate over
        set_config) outlives it."""
        caps = self.caps.statements(carried) if self.caps is not None else ()
        return (*identity_statements(self.identity), *caps)


async def _begin(conn: Any, begin: str) -> None:
    try:
        await conn.execute(begin)
    except asyncpg.PostgresError as exc:
        if isinstance(exc, SESSION_GONE):
            raise
        await conn.execute("ROLLBACK; " + SESSION_RESET)
        refusal = guard_refusal(exc)
        if refusal is not None:
            raise refusal from None
        raise


async def _in_transaction(tx: Tx, begin: str, work: Callable[[Tx], Awaitable[T]]) -> T:
    conn = tx.conn
    await _begin(conn, begin)
    try:
        try:
            out = await work(tx)
        except CACHE_STALE as exc:
            # A concurrent DDL changed a cached plan; nothing ran for real. Retry once.
            await conn.execute("ROLLBACK")
            await wire.forget_cached_plans(conn, exc)
            await _begin(conn, begin)
            tx.retried, tx.index, tx.bytes_left = True, None, tx.limits.max_bytes
            out = await work(tx)
        await tx.check_quota()
    except TransactionEnded:
        raise  # the connection is closed: nothing to roll back on it
    except FluxbaseError:
        if conn.is_closed():
            raise  # given up (wire: a value the codecs cannot take): nothing to roll back on it
        await conn.execute("ROLLBACK; " + SESSION_RESET)
        raise
    try:
        await conn.execute("COMMIT; " + SESSION_RESET)
    except asyncpg.PostgresError as exc:  # e.g. a deferred constraint failing at commit
        if isinstance(exc, SESSION_GONE):
            raise
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        await conn.execute(SESSION_RESET)
        if exc.sqlstate == SQL_BROADCASTS_SPENT:  # a deferred trigger's broadcasts past the share
            raise statement_error(exc, False) from None
        raise StatementFailed(exc.args[0] if exc.args else "commit failed", exc.sqlstate or "XX000") from None
    return out


async def on_connection(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    run: Callable[[Any], Awaitable[T]],
    index: Callable[[], int | None] = lambda: None,
    *,
    pipelined: bool = False,
) -> T:
    """`_on_connection`, run once more when the session it got had its prepared statements
    dropped by project SQL (nothing of the request committed there): the pool's idle sessions,
    which the same SQL may have reached, are closed first, so the retry gets a session nobody
    tampered with and another principal's `DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$` costs
    this request nothing. Only once: a request that drops its own statements fails with the
    503 instead of running again and again."""
    started = time.monotonic()
    try:
        try:
            return await _on_connection(pools, control, req, run, index, pipelined=pipelined)
        except SessionStatementsLost:
            return await _again(pools, control, req, run, index, pipelined, started)
    except ProjectReadOnly:
        # Read-only because a move between clusters is copying it (services.moves): say so.
        if control is not None and await control.fetchval(
            "SELECT moving_to IS NOT NULL FROM fluxbase.projects WHERE id = $1", req.project_id
        ):
            raise ProjectMoving() from None
        raise


async def _again(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    run: Callable[[Any], Awaitable[T]],
    index: Callable[[], int | None],
    pipelined: bool,
    started: float,
) -> T:
    """`on_connection`'s one retry (a coroutine of its own: the hot path awaits one frame less)."""
    since = time.monotonic()
    (await pools.pool(req.project_id, req.scope, end_user=req.identity.end_user)).discard_idle()
    # Within the request's one deadline, not a second one.
    left = req.limits.deadline_s - (since - started)
    if left <= 0:
        raise SessionStatementsLost()
    again = msgspec.structs.replace(req, limits=msgspec.structs.replace(req.limits, deadline_s=left))
    # On a session opened from now on: others in use meanwhile may be tampered with too.
    return await _on_connection(pools, control, again, run, index, pipelined=pipelined, opened_after=since)


_CLOCK_TICK_S = 0.001


class Deadline:
    """The request deadline of one tenant connection, with one timer for the connection's life
    instead of one made and cancelled per request (a timer handle and a libuv timer each).
    `start` notes the request's task and when it is due, arming the timer only if none is
    armed by then; when the timer fires it cancels the request in flight if it is due (and
    sets `expired`), arms itself again for a later one, or stops while the connection is idle
    (the next `start` arms it)."""

    __slots__ = ("due", "expired", "loop", "task", "timer", "timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: asyncio.Task[Any] | None = None  # the request in flight
        self.due = 0.0  # loop time its deadline passes
        self.expired = False  # the timer cancelled it
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def start(self, task: asyncio.Task[Any], seconds: float) -> None:
        due = self.loop.time() + seconds
        self.task, self.due, self.expired = task, due, False
        timer = self.timer
        if timer is None or self.timer_at > due:
            if timer is not None:
                timer.cancel()
            self.timer, self.timer_at = self.loop.call_at(due, self._fire), due

    def close(self) -> None:
        """The connection is done with: no timer left behind."""
        self.task = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self) -> None:
        self.timer = None
        task = self.task
        if task is None:
            return  # idle
        # A later request's deadline: wait for it. (Within a millisecond, uvloop's clock and
        # timer resolution, it is due: waiting on spun, up to hundreds of firings, until the
        # clock ticked; tests/test_deadline_timer.py.)
        if self.due - self.loop.time() > _CLOCK_TICK_S:
            self.timer, self.timer_at = self.loop.call_at(self.due, self._fire), self.due
            return
        self.task, self.expired = None, True
        task.cancel()


async def _on_connection(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    run: Callable[[Any], Awaitable[T]],
    index: Callable[[], int | None] = lambda: None,
    *,
    pipelined: bool = False,
    opened_after: float | None = None,
) -> T:
    """Run `run(conn)` on a pooled connection of the project's own role within the request
    deadline (the backend is terminated when it passes). A connection that is lost, timed out or
    still in a transaction afterwards, or whose prepared statements project SQL dropped or
    replaced, is terminated, never handed to the next request."""
    project_id, limits = req.project_id, req.limits
    end_user = req.identity.end_user
    pool = pools.pool_now(project_id, req.scope, end_user)
    if pool is None:
        pool = await pools.pool(project_id, req.scope, end_user=end_user)
    # An idle connection without a coroutine (the hot path), else wait for one.
    conn = pool.take_idle() if opened_after is None else None
    if conn is None:
        try:
            conn = await (
                pool.acquire(limits.acquire_timeout_s)
                if opened_after is None
                else pool.acquire_opened_after(opened_after, limits.acquire_timeout_s)
            )
        except TimeoutError:
            raise ConnectionsBusy() from None
    dead = False
    try:
        # The request deadline: a timer that cancels this task (asyncio.timeout, at a fraction
        # of its cost on this path); the backend is then terminated. One timer per connection
        # (`Deadline`), not one made and cancelled per request.
        # (The connection's loop, this task's: `get_running_loop()` makes a getpid system
        # call on Python 3.11, `current_task()` without a loop another.)
        loop = wire.loop_of(conn)
        task = asyncio.current_task(loop)
        assert task is not None
        watch: Deadline | None = getattr(conn, "deadline", None)
        if watch is None:
            watch = Deadline(loop)
            with contextlib.suppress(AttributeError):  # (a connection of another class)
                conn.deadline = watch
        watch.start(task, limits.deadline_s)
        try:
            if not pipelined:
                await clean(conn)
            return await run(conn)
        except asyncio.CancelledError:
            if not watch.expired:
                raise
            task.uncancel()
            dead = True
            watch.close()
            await terminate(control, conn)
            ms = int(limits.deadline_s * 1000)
            raise StatementTimedOut(
                f"canceling statement due to request deadline ({ms} ms)", "57014", index()
            ) from None
        except CONNECTION_LOST as exc:
            # The connection broke: the transaction did not commit (or we cannot know it did).
            dead = True
            with contextlib.suppress(asyncpg.InterfaceError):  # already detached from the pool
                conn.terminate()
            log.warning("tenant connection lost for project %s: %r", project_id, exc)
            raise DatabaseUnavailable() from None
        except Exception as exc:
            if not tampered(exc):
                raise
            dead = True
            conn.terminate()
            log.warning("project %s dropped or replaced a pooled session's prepared statements", project_id)
            raise SessionStatementsLost() from None
        finally:
            watch.task = None  # the request is over: the timer lets the connection be
    finally:
        if not dead and not conn.is_closed() and conn.is_in_transaction():
            dead = True
            conn.terminate()  # never hand an open transaction to the next request
        if not dead:
            pool.release_now(conn)


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
    where `one_round_trip` does not apply): a pooled connection whose session user is the project
    role, BEGIN + key guard + identity, the request deadline, commit + session reset.
    Raises StatementFailed (rolled back), DatabaseUnavailable (connection lost: the outcome is
    unknown, never reported as success; ConnectionsBusy: pool exhausted) or `work`'s own
    FluxbaseError (rolled back), including PROJECT_READ_ONLY for a write to a read-only project
    and DATABASE_QUOTA_EXCEEDED for one that crosses the project's size cap. `read_only` is the
    caller's own request for a read-only transaction: a write then fails as SQL (25006), not as
    the project's switch.
    """
    scope = req.scope
    caps = pools.statements.caps
    begin = begin_script(
        req.identity,
        read_only or (req.project_read_only and req.guard is None) or scope == "read",
        req.guard,
        isolation,
        req.broadcasts,
    )
    begin_over_caps = f"{begin}; {caps.script()}"  # a connection that logged in above the caps
    may_write = scope != "read" and not read_only
    quota_of = None
    if may_write and req.db_quota and req.sizes is not None:
        quota_of = (req.project_id, req.db_quota, req.sizes)
    txs: list[Tx] = []

    async def run(conn: Any) -> T:
        tx = Tx(conn, req.limits, req.identity, may_write, quota_of, caps)
        txs.append(tx)
        return await _in_transaction(tx, begin_over_caps if over_caps(conn) else begin, work)

    return await on_connection(pools, control, req, run, lambda: txs[-1].index if txs else None)


# -- one round trip ---------------------------------------------------------------------------


# asyncpg names (and caches) only statements up to this size; a longer one is parsed unnamed,
# and the one-round-trip prefix's own unnamed steps (an end user's identity) would replace it:
# Bind would then run the prefix's SET instead of the statement, and report success (hostile
# review 2). Longer statements take the explicit-transaction path.
MAX_PIPELINED_CHARS = 15 * 1024  # asyncpg's max_cacheable_statement_size (it compares len(query))


def pipelinable(req: TenantRequest, verdict: classification.Verdict, query: str = "") -> bool:
    """Whether the one-round-trip path may run it (tenancy.statements.Verdict.pipelinable)."""
    # A capped project's writes are size-checked before COMMIT, which needs the explicit one.
    return (
        verdict.pipelinable
        and len(query) <= MAX_PIPELINED_CHARS
        and not (req.db_quota and req.scope != "read")
    )


_REFUSALS = frozenset({"FXRST", "FXEPO", "FXU01", "FXU02", "FX401", "FX403"})


# The broadcast cap's step (unnamed Parse/Bind/Execute, the same on every connection) by count:
# a window's counts repeat window after window.
_CAP_STEPS: dict[int, bytes] = {}
_CAP_MAX = BROADCAST_CAP_MAX


def _cap_step(n: int) -> bytes:
    if len(_CAP_STEPS) >= 4096:
        _CAP_STEPS.clear()
    step = _CAP_STEPS[n] = wire.parse_bind_execute(broadcast_cap_statement(n))
    return step


class Fallback(Exception):
    """Run the request as an explicit transaction after all (sql/0011): FXRST, a previous
    request changed the session's transaction defaults (now reset); FXEPO, the cached key state
    is out of date (`check_key` decides); FXU01/FXU02, the end user's session check refused; a
    statement whose types asyncpg must introspect (wire.NeedsIntrospection)."""

    traced_as_ok = True  # not a failure of the statement's span (fluxbase.tracing)


async def _one_round_trip(
    conn: Any, req: TenantRequest, query: str, params: list[Any], keyword: str, caps: Caps
) -> StatementResult:
    """Reset, identity, caps, guard and the statement as one implicit transaction."""
    prefix = conn.request_prefix  # prepared when the connection opened (pools.open_tenant_session)
    identity = req.identity
    caps_steps = prefix.limits if over_caps(conn) else b""
    anonymous = (
        identity.uid is None and identity.user_session is None and identity.claims == prefix.anonymous_claims
    )
    n = req.broadcasts
    share = b""
    if n is not None:
        if n >= _CAP_MAX:
            share = prefix.statement(FULL_CAP)  # (as broadcast_cap_statement caps it)
        else:
            cap = _CAP_STEPS.get(n)
            share = cap if cap is not None else _cap_step(n)
    read_only = req.scope == "read" or req.project_read_only
    # After the identity (whose step may be the reset too: RequestPrefix.begins_request): the caps,
    # this request's share of broadcasts, the checks.
    rest = b"".join(
        (
            caps_steps,
            share,
            prefix.checks(
                req.project_id,
                req.epoch if req.guard is not None else None,
                read_only,
                identity.user_session,
                identity.uid,
            ),
        )
    )
    may_write = req.scope != "read"
    limits = req.limits
    user_session = identity.user_session is not None
    for attempt in (0, 1):
        # The reset's first statements run only on a session some request used (`begin`).
        reset_runs = not prefix.fresh
        # Per attempt: a retry's session is no longer fresh, or resets with statements now.
        if prefix.begins_request():
            who = prefix.begin_request(None if anonymous else identity_values(identity))
        else:
            who = prefix.anonymous if anonymous else _identity_steps(prefix, identity)
        head = who + rest
        stmt = wire.cached_statement(conn, query)
        sent = False
        try:
            if stmt is None:
                # Parsed after the prefix, in its transaction (wire.prepare_after): what parsing
                # runs of the tenant's code runs under the request's identity, caps and checks.
                conn.dirty = True
                try:
                    stmt = await wire.prepare_after(
                        conn, prefix, prefix.begin(read_only, user_session) + head, query
                    )
                    sent = True
                except wire.NeedsIntrospection:
                    raise Fallback() from None  # asyncpg introspects it there, inside the request
                except asyncpg.PostgresError:
                    raise
                except Exception as exc:
                    raise statement_error(exc, may_write) from None
            types, attributes, columns = prefix.shape(stmt)
            try:
                args = adapt_params(types, params)
            except ParamError as exc:
                if sent:
                    await prefix.drain(conn)  # rolls back the transaction the prefix opened
                raise StatementFailed(str(exc), "22023") from None
            if not sent:
                # The reset (none on a fresh session) and the Parse of any step not sent before,
                # built per attempt: a retry's session is no longer fresh, and what the first
                # sent is parsed.
                prefix.send(conn, prefix.begin(read_only, user_session) + head)
                conn.dirty = True  # until the next request's prefix (or pools.clean) resets the session
            rows, status, completed = await wire.run_bound(conn, stmt, args, limits.max_rows + 1)
        except asyncpg.PostgresError as exc:
            if wire.refused_encoding(exc):
                # Refused while encoding, before the driver wrote anything: the prefix is
                # already on the wire without a Sync. Run a harmless prefix step to end it.
                await prefix.drain(conn)
                raise StatementFailed(str(exc), "22023") from None
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
                raise Fallback() from None
            if isinstance(exc, CACHE_STALE) and attempt == 0:
                await wire.forget_cached_plans(conn, exc)
                continue  # a DDL changed a cached plan; nothing ran for real
            if attempt == 0 and reset_runs and await prefix.reset_failed(conn, exc):
                continue  # the C reset failed, first in the pipeline: nothing else ran
            raise statement_error(exc, may_write) from None
        except asyncpg.exceptions.OutdatedSchemaCacheError as exc:
            # A composite type of the result changed since this session cached it (ALTER TYPE):
            # asyncpg found it reading the rows, after the Sync ended the transaction. Fresh type
            # codecs; the session stays. Run again only what could not write (hostile review 28:
            # this was answered as a lost connection and the session closed).
            await wire.forget_cached_plans(conn, exc)
            if attempt == 0 and read_only:
                continue
            raise ResultTypeChanged() from None
        except wire.UNDECODABLE_ERRORS:
            raise wire.undecodable(conn) from None  # as wire.execute's
        except (*CONNECTION_LOST, FluxbaseError, Fallback):
            raise
        except Exception:
            conn.terminate()  # the protocol state is unknown: never reuse this connection
            raise
        if len(rows) > limits.max_rows:
            status = None  # the portal was suspended: the last command tag is the prefix's
        elif type(status) is bytes:
            status = status.decode()
        return encode_result(
            columns,
            rows,
            status,
            completed,
            limits.max_rows,
            limits.max_bytes,
            keyword,
            attributes,
        )[0]
    raise AssertionError("unreachable")


def _identity_steps(prefix: wire.RequestPrefix, identity: Identity) -> bytes:
    return b"".join(prefix.statement(s) for s in identity_statements(identity))


async def _traced_one_round_trip(
    conn: Any, req: TenantRequest, query: str, params: list[Any], keyword: str, caps: Caps
) -> StatementResult:
    with tracing.statement_span(keyword):
        return await _one_round_trip(conn, req, query, params, keyword, caps)


def one_round_trip(
    pools: TenantPools, control: asyncpg.Pool, req: TenantRequest, query: str, params: list[Any], keyword: str
) -> Awaitable[StatementResult]:
    """One statement in one round trip (raises Fallback when it must run in `transaction`)."""
    # A partial, not a lambda: the hot path calls it without a Python frame of its own.
    step = _traced_one_round_trip if tracing.enabled() else _one_round_trip
    run = functools.partial(
        step, req=req, query=query, params=params, keyword=keyword, caps=pools.statements.caps
    )
    return on_connection(pools, control, req, run, pipelined=True)


# -- platform work on a project's objects -----------------------------------------------------


@contextlib.asynccontextmanager
async def admin_session(
    pools: TenantPools,
    project_id: str,
    acquire_timeout_s: float | None = None,
    *,
    begin: str | None = "BEGIN",
    deadline_s: float | None = None,
) -> AsyncIterator[TenantConnection]:
    """A connection of the project's admin role for platform-driven work (migrations, import,
    vacuum, RLS management): `begin` opens its one transaction (None: no transaction, VACUUM),
    committed when the block ends and rolled back when it raises; the session is reset either
    way, and a connection that cannot be reset is terminated, never pooled again.

    A transaction has a deadline (`deadline_s`, by default `pools.admin_deadline_s`): past it the
    block is cancelled and the backend terminated (a plpgsql loop can swallow a cancel), and the
    caller gets 57014 — an open transaction holds back every project's realtime events."""
    pool = await pools.pool(project_id, "admin")
    timeout = pools.acquire_timeout_s if acquire_timeout_s is None else acquire_timeout_s
    conn = await acquire(pool, timeout)
    ok = False
    limit = None if begin is None else (pools.admin_deadline_s if deadline_s is None else deadline_s)
    try:
        try:
            async with asyncio.timeout(limit):
                await clean(conn)
                # Platform work prepares its statements afresh: the admin pool is shared with admin
                # keys, whose DO blocks may have dropped what asyncpg cached on this session
                # (hostile review 6).
                wire.forget_statements(conn)
                # The caps, as for requests (the admin role's own defaults may have been changed
                # from plpgsql); VACUUM, outside a transaction, gets them for the session until
                # the reset.
                caps = pools.statements.caps
                if begin is not None:
                    await conn.execute(f"{begin}; {caps.script()}" if over_caps(conn) else begin)
                elif over_caps(conn):
                    await conn.execute(caps.script(local=False))
                yield conn
        except TimeoutError:
            if pools.control is not None:
                await terminate(pools.control, conn)
            else:
                conn.terminate()
            ms = int((limit or 0) * 1000)
            raise StatementTimedOut(f"canceling statement due to deadline ({ms} ms)", "57014", None) from None
        except Exception as exc:
            if not tampered(exc):
                raise
            conn.terminate()  # its prepared statements are not the ones asyncpg cached
            log.warning("project %s dropped or replaced a pooled session's prepared statements", project_id)
            raise SessionStatementsLost() from None
        if begin is not None:
            if not conn.is_in_transaction():
                # tenancy.statements refuses transaction control in scripts: a bug, never a path.
                log.error("an admin session of %s left its transaction", project_id)
                raise InternalError()
            await conn.execute("COMMIT; " + SESSION_RESET)
        else:
            await conn.execute(SESSION_RESET)
        ok = True
    finally:
        if not ok and not conn.is_closed():
            try:
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                await conn.execute(SESSION_RESET)
            except Exception:
                conn.terminate()
        await pool.release(conn)
