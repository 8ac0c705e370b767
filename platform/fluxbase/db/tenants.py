"""Project schemas and roles, and the pools whose session user is the project role itself.

Tenant SQL never runs on a privileged connection that switches with SET ROLE: the tenant
could `RESET ROLE` or `set_config('role', ...)` its way out. Each (project, scope) gets its
own LOGIN role and its own lazily created, bounded pool; idle connections are closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg
import msgspec

from fluxbase.config import Settings
from fluxbase.security.roles import (
    CHECKER,
    CHECKER_FUNCTIONS,
    ROLES,
    SCOPES,
    role_name,
    role_password,
    schema_name,
)
from fluxbase.tenancy.statements import Caps, Classifier

log = logging.getLogger(__name__)

INT53 = 2**53 - 1
IDLE_CONNECTION_S = 60.0  # a tenant connection unused this long is closed
IDLE_RESET_S = 0.2  # a session the one-round-trip path left is reset when idle this long

# Run after every request, in the same round trip as COMMIT/ROLLBACK: nothing a tenant did to
# its session (settings, cursors, LISTEN, advisory locks, temp tables) survives into the next.
SESSION_RESET = (
    "CLOSE ALL; UNLISTEN *; RESET ALL; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES;"
)


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


def _int8_decode(text: str) -> int | str:
    n = int(text)
    return n if -INT53 <= n <= INT53 else text


def _json_encode(value: object) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


async def init_tenant_connection(conn: asyncpg.Connection) -> None:
    """JSON-faithful decoding: json stays raw JSON, numeric exact, big int8 as strings."""
    # asyncpg wraps its type introspection (first use of an enum, domain, composite, ...) in
    # set_config('jit', ...), which read and readwrite roles may not call (sql/0007). Without
    # this, such a type would fail for them; the introspection query runs with the role's jit.
    conn._server_caps = conn._server_caps._replace(jit=False)
    raw = msgspec.Raw
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(
            typ, schema="pg_catalog", format="text", encoder=_json_encode, decoder=lambda s: raw(s.encode())
        )
    await conn.set_type_codec("numeric", schema="pg_catalog", format="text", encoder=str, decoder=str)
    await conn.set_type_codec("int8", schema="pg_catalog", format="text", encoder=str, decoder=_int8_decode)


class TenantConnection(asyncpg.Connection):  # type: ignore[misc]
    """A tenant pool connection: its prepared one-round-trip prefix (db.pipeline), and whether
    a request left session state that only the next one-round-trip request's prefix clears."""

    __slots__ = ("dirty", "idle_since", "request_prefix")


class TenantPool:
    """The connections of one (project, scope): a LIFO list of idle ones and a queue of waiters.

    asyncpg's Pool cost ~19 µs per acquire/release on the SQL hot path (a task for wait_for,
    another for shield, a proxy per acquire, an inactivity timer per release); this costs ~1 µs.
    Connections are plain TenantConnections. A terminated one (deadline, lost connection, open
    transaction) gives its slot back through its termination listener; `reap` closes idle ones.
    Tenant connections reset nothing on release: every request starts with the session reset.
    """

    def __init__(self, connect: Callable[[], Awaitable[TenantConnection]], max_size: int) -> None:
        self._connect = connect
        self._max = max_size
        self._idle: list[TenantConnection] = []
        self._all: set[TenantConnection] = set()
        self._opening = 0
        self._waiters: collections.deque[asyncio.Future[TenantConnection | None]] = collections.deque()
        self._resets: set[asyncio.Task[None]] = set()
        self._closed = False

    def get_size(self) -> int:
        return len(self._all) + self._opening

    def get_idle_size(self) -> int:
        return len(self._idle)

    async def acquire(self, timeout: float | None = None) -> TenantConnection:  # noqa: ASYNC109 (asyncpg's Pool API)
        """An idle connection, a new one while below the cap, else the next one released
        (TimeoutError after `timeout`)."""
        if self._closed:
            raise asyncpg.InterfaceError("pool is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.is_closed():
                return conn
        if self.get_size() < self._max:
            return await self._open()
        fut: asyncio.Future[TenantConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                got = await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._hand_on(fut.result())  # handed one just as we gave up: pass it on
            else:
                fut.cancel()
            raise
        return got if got is not None else await self._open()

    async def _open(self) -> TenantConnection:
        self._opening += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._opening -= 1
            self._hand_on(None)  # the slot is free again for a waiter
            raise
        self._opening -= 1
        self._all.add(conn)
        conn.add_termination_listener(self._gone)
        if self._closed:
            conn.terminate()
            raise asyncpg.InterfaceError("pool is closed")
        return conn

    def _gone(self, conn: asyncpg.Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)  # type: ignore[arg-type]
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)  # type: ignore[arg-type]
            self._hand_on(None)

    def _hand_on(self, conn: TenantConnection | None) -> None:
        """Give a connection (or None: a free slot) to the first live waiter, else park it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        if conn is not None:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)

    async def release(self, conn: TenantConnection) -> None:
        if self._closed or conn.is_closed():
            conn.terminate()  # its termination listener frees the slot
            return
        self._hand_on(conn)
        if getattr(conn, "dirty", False):
            # A one-round-trip request resets the session only when the next one starts: if
            # none comes soon, reset it now, so that nothing it held (session advisory locks,
            # temp tables) outlives it by more than IDLE_RESET_S.
            asyncio.get_running_loop().call_later(IDLE_RESET_S, self._reset_if_idle, conn)

    def _reset_if_idle(self, conn: TenantConnection) -> None:
        if self._closed or not getattr(conn, "dirty", False) or conn not in self._idle:
            return
        if time.monotonic() - conn.idle_since < IDLE_RESET_S * 0.9:
            return  # used and released again since: that release's timer decides
        self._idle.remove(conn)
        task = asyncio.get_running_loop().create_task(self._reset(conn))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    async def _reset(self, conn: TenantConnection) -> None:
        try:
            await asyncio.wait_for(conn.execute(SESSION_RESET), 10)
            conn.dirty = False
        except Exception:
            conn.terminate()  # its termination listener frees the slot
            return
        await self.release(conn)

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[TenantConnection]:  # noqa: ASYNC109
        conn = await self.acquire(timeout)
        try:
            yield conn
        except BaseException:
            conn.terminate()  # state unknown: never hand it to the next request
            raise
        else:
            await self.release(conn)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[asyncpg.Record]:  # noqa: ASYNC109
        async with self.connection() as conn:
            return list(await conn.fetch(query, *args, timeout=timeout))

    async def reap(self, idle_s: float) -> None:
        """Close connections idle for longer than `idle_s`."""
        cutoff = time.monotonic() - idle_s
        old = [c for c in self._idle if c.idle_since < cutoff]
        for conn in old:
            self._idle.remove(conn)
        for conn in old:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()

    def terminate(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.terminate()
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(asyncpg.InterfaceError("pool is closed"))

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()
        self.terminate()


async def clean(conn: TenantConnection) -> None:
    """Reset the session if a one-round-trip request used it last (call right after acquire
    on any path that does not start with the request prefix)."""
    if getattr(conn, "dirty", False):
        await conn.execute(SESSION_RESET)
        conn.dirty = False


def _role_settings(settings: Settings) -> dict[str, str]:
    t = settings.tenant
    return {
        "statement_timeout": f"{t.statement_timeout_ms}ms",
        "lock_timeout": f"{t.lock_timeout_ms}ms",
        "idle_in_transaction_session_timeout": f"{t.idle_in_transaction_ms}ms",
        "work_mem": f"{t.work_mem_kb}kB",
        "temp_file_limit": f"{t.temp_file_limit_kb}kB",
    }


async def provision_project(conn: asyncpg.Connection, project_id: str, settings: Settings) -> None:
    """Create the project's schema and its three LOGIN roles (caller owns the transaction)."""
    schema = quote_ident(schema_name(project_id))
    admin, rw, ro = (quote_ident(role_name(project_id, s)) for s in ("admin", "readwrite", "read"))
    db = quote_ident(await conn.fetchval("SELECT current_database()"))
    limit = settings.tenant.role_connection_limit
    for scope in SCOPES:
        role = role_name(project_id, scope)
        pw = quote_literal(role_password(settings.auth.secret_key, role))
        await conn.execute(
            f"CREATE ROLE {quote_ident(role)} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE "
            f"NOREPLICATION NOBYPASSRLS CONNECTION LIMIT {int(limit)} PASSWORD {pw}"
        )
        await conn.execute(f"GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {quote_ident(role)}")
        await conn.execute(f"ALTER ROLE {quote_ident(role)} SET search_path = {schema}")
        for name, value in _role_settings(settings).items():
            await conn.execute(f"ALTER ROLE {quote_ident(role)} SET {name} = {quote_literal(value)}")
    # Only the admin role may change request-local settings or run plpgsql (DO blocks,
    # functions): read and readwrite roles must not be able to forge auth.uid() (sql/0007).
    await conn.execute(f"GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO {admin}")
    await conn.execute(f"GRANT USAGE ON LANGUAGE plpgsql TO {admin}")
    await _provision_checker(conn, project_id, settings)
    await conn.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {admin}")
    # The runtime role is not a superuser: what only the schema's owner may do, it does as the
    # owner (it may SET ROLE to the roles it created; sql/0012, db/privileges.py).
    await conn.execute(f"SET LOCAL ROLE {admin}")
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {rw}, {ro}")
    defaults = f"ALTER DEFAULT PRIVILEGES FOR ROLE {admin} IN SCHEMA {schema}"
    await conn.execute(f"{defaults} GRANT SELECT, INSERT, UPDATE ON TABLES TO {rw}")
    await conn.execute(f"{defaults} GRANT SELECT ON TABLES TO {ro}")
    await conn.execute(f"{defaults} GRANT USAGE, SELECT ON SEQUENCES TO {rw}")
    await conn.execute(f"{defaults} GRANT SELECT ON SEQUENCES TO {ro}")
    await conn.execute("SET LOCAL ROLE NONE")


async def _provision_checker(conn: asyncpg.Connection, project_id: str, settings: Settings) -> None:
    """The realtime RLS checker role: inherits the read role, may set the identity, and may call
    the check functions (sql/0008), which nobody else may."""
    rt, ro = (quote_ident(role_name(project_id, s)) for s in (CHECKER, "read"))
    pw = quote_literal(role_password(settings.auth.secret_key, role_name(project_id, CHECKER)))
    db = quote_ident(await conn.fetchval("SELECT current_database()"))
    await conn.execute(
        f"CREATE ROLE {rt} LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
        f"CONNECTION LIMIT {int(settings.tenant.role_connection_limit)} PASSWORD {pw}"
    )
    await conn.execute(f"GRANT CONNECT ON DATABASE {db} TO {rt}")
    await conn.execute(f"ALTER ROLE {rt} SET search_path = {quote_ident(schema_name(project_id))}")
    for name, value in _role_settings(settings).items():
        await conn.execute(f"ALTER ROLE {rt} SET {name} = {quote_literal(value)}")
    await conn.execute(f"GRANT {ro} TO {rt}")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO {rt}")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {CHECKER_FUNCTIONS} TO {rt}")
    # Checks run as the subscriber's own role (sql/0015): read, or readwrite without its rights.
    rw = quote_ident(role_name(project_id, "readwrite"))
    await conn.execute(f"GRANT {rw} TO {rt} WITH INHERIT FALSE, SET TRUE")


async def drop_project(conn: asyncpg.Connection, project_id: str) -> None:
    """Remove the project's schema, objects and roles (caller owns the transaction).

    Runs as the runtime role (not a superuser): what only an owner may drop, it drops as that
    role (SET LOCAL ROLE); the privileges it granted the roles, it revokes."""
    roles = [role_name(project_id, s) for s in ROLES]
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])", roles
    )
    existing = {
        r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", roles)
    }
    admin = role_name(project_id, "admin")
    if admin in existing:
        await conn.execute(f"SET LOCAL ROLE {quote_ident(admin)}")
    await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema_name(project_id))} CASCADE")
    await conn.execute("SET LOCAL ROLE NONE")
    db = quote_ident(await conn.fetchval("SELECT current_database()"))
    for role in roles:
        if role not in existing:
            continue
        r = quote_ident(role)
        await conn.execute(f"SET LOCAL ROLE {r}")
        await conn.execute(f"DROP OWNED BY {r} CASCADE")
        await conn.execute("SET LOCAL ROLE NONE")
        await conn.execute(f"REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM {r}")
        await conn.execute(f"REVOKE USAGE ON LANGUAGE plpgsql FROM {r}")
        await conn.execute(f"REVOKE EXECUTE ON FUNCTION {CHECKER_FUNCTIONS} FROM {r}")
        await conn.execute(f"REVOKE ALL ON DATABASE {db} FROM {r}")
        await conn.execute(f"DROP ROLE {r}")


async def sync_role_passwords(conn: asyncpg.Connection, settings: Settings) -> int:
    """Re-derive every tenant role password (after FLUXBASE_SECRET_KEY rotation)."""
    n = 0
    for row in await conn.fetch("SELECT id FROM fluxbase.projects"):
        for kind in ROLES:
            role = role_name(row["id"], kind)
            pw = quote_literal(role_password(settings.auth.secret_key, role))
            await conn.execute(f"ALTER ROLE {quote_ident(role)} PASSWORD {pw}")
            n += 1
    return n


class TenantPools:
    """Lazily created, bounded `TenantPool`s keyed by (project, scope, end user or not); idle
    pools are closed."""

    def __init__(self, settings: Settings, idle_pool_seconds: float = 300.0, max_size: int | None = None):
        self._settings = settings
        self._max_size = max_size or settings.tenant.pool_max_per_role
        parts = urlsplit(settings.database.url)
        self._host, self._port = settings.database.server()
        self._database = (parts.path or "/postgres").lstrip("/") or "postgres"
        self._pools: dict[tuple[str, str, bool], TenantPool] = {}
        self._last_used: dict[tuple[str, str, bool], float] = {}
        # What tenant statements are and which are refused, for these roles' caps.
        self.statements = Classifier(Caps.of(settings.tenant))
        self._idle_pool_seconds = idle_pool_seconds
        self._reaper: asyncio.Task[None] | None = None

    def _connect_kwargs(self, project_id: str, scope: str) -> dict[str, object]:
        role = role_name(project_id, scope)
        return {
            "host": self._host,
            "port": self._port,
            "database": self._database,
            "user": role,
            "password": role_password(self._settings.auth.secret_key, role),
            "ssl": False,
            "timeout": self._settings.database.connect_timeout,
            "server_settings": {"application_name": f"fluxbase-tenant-{project_id}"},
        }

    async def pool(self, project_id: str, scope: str, end_user: bool = False) -> TenantPool:
        """The pool of (project, scope); `end_user` requests (a user token) get connections of
        their own, never a session that a trusted server key's requests use."""
        key = (project_id, scope, end_user)
        self._last_used[key] = time.monotonic()
        existing = self._pools.get(key)
        if existing is not None:
            return existing
        kwargs = self._connect_kwargs(project_id, scope)

        async def connect() -> TenantConnection:
            conn = await asyncpg.connect(connection_class=TenantConnection, **kwargs)  # type: ignore[arg-type]
            try:
                await init_tenant_connection(conn)
            except BaseException:
                conn.terminate()
                raise
            return cast(TenantConnection, conn)

        pool = self._pools[key] = TenantPool(connect, self._max_size)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle())
        return pool

    async def close_project(self, project_id: str) -> None:
        for key in [k for k in self._pools if k[0] == project_id]:
            pool = self._pools.pop(key)
            self._last_used.pop(key, None)
            pool.terminate()

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(30)
            now = time.monotonic()
            for key, last in list(self._last_used.items()):
                pool = self._pools.get(key)
                if pool is None:
                    continue
                if now - last > self._idle_pool_seconds and pool.get_idle_size() == pool.get_size():
                    self._pools.pop(key, None)
                    self._last_used.pop(key, None)
                    await pool.close()
                else:
                    await pool.reap(IDLE_CONNECTION_S)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, Exception):
                pool.terminate()
