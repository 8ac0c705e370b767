"""The control-plane connection pool (service role; never runs tenant SQL).

Every wait on it is bounded: `lock_timeout` and `statement_timeout` on each of its sessions, and
a default timeout on acquiring a connection. A control-plane request therefore never waits
indefinitely for a lock someone else holds (another request, a tenant transaction on an object
both touch): it fails with 503 DATABASE_CONNECTION_ERROR (http/edge.py) and frees its connection.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from asyncpg.pool import Pool

from fluxbase.config import ConfigError, Settings


async def check_runtime_role(conn: asyncpg.Connection | asyncpg.Pool, settings: Settings) -> None:
    """Refuse to run as a superuser (docs/security.md): a slip anywhere in the platform would
    hand the whole cluster to whoever caused it. FLUXBASE_DATABASE_ALLOW_SUPERUSER=true is a
    development override."""
    row = await conn.fetchrow(
        "SELECT current_user AS name, rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    if row is not None and row["rolsuper"] and not settings.database.allow_superuser:
        raise ConfigError(
            f"FLUXBASE_DATABASE_URL logs in as {row['name']!r}, a PostgreSQL superuser; Fluxbase refuses to "
            "run as one. Set FLUXBASE_MIGRATION_DATABASE_URL to this superuser URL (used only to migrate) "
            "and FLUXBASE_DATABASE_URL to a role of its own, e.g. "
            "postgresql://fluxbase_app:<password>@host/db (`fluxbase migrate` creates it), or set "
            "FLUXBASE_DATABASE_ALLOW_SUPERUSER=true for local development only."
        )


class ControlConnection(asyncpg.Connection):
    """A control-pool connection: `stateless` says its last use left nothing in the session."""

    stateless = False

    def mark_stateless(self) -> None:
        self.stateless = True


async def _reset(conn: asyncpg.Connection) -> None:
    """The pool's reset on release (asyncpg has already rolled back an open transaction): its
    default query (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL), unless the
    connection's last use was one statement known to leave no session state
    (ControlPool.fetchrow_stateless). That query is what frees a session advisory lock a holder
    failed to unlock (services/moves.py takes its lock on an `acquire`d connection: always reset)."""
    if getattr(conn, "stateless", False):
        conn.stateless = False  # type: ignore[attr-defined]
        return
    query = conn.get_reset_query()
    if query:
        await conn.execute(query)


class ControlPool(Pool):
    """An asyncpg pool whose `acquire` (and so fetch/execute/...) times out by default."""

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self._acquire_timeout if timeout is None else timeout)

    async def fetchrow_stateless(self, query: str, *args: Any) -> asyncpg.Record | None:
        """`fetchrow` of one statement that leaves nothing in the session (no SET, advisory lock,
        LISTEN, cursor, temporary table or prepared statement of its own): its connection goes back
        without the reset query, a round trip (and ~0.1 ms of server CPU) off the caller's path.
        For the cold request's key lookup and rate lease (issue 19); only fixed statements of the
        platform's, never one built from input. If it fails, the connection is reset as usual."""
        async with self.acquire() as conn:
            row = await conn.fetchrow(query, *args)
            conn.mark_stateless()
        return row


async def fetchrow_stateless(db: asyncpg.Pool, query: str, *args: Any) -> asyncpg.Record | None:
    """ControlPool.fetchrow_stateless where `db` is one, else its plain fetchrow."""
    if isinstance(db, ControlPool):
        return await db.fetchrow_stateless(query, *args)
    return await db.fetchrow(query, *args)


async def create_control_pool(settings: Settings, max_size: int | None = None) -> asyncpg.Pool:
    db = settings.database
    pool = ControlPool(
        db.url,
        acquire_timeout=db.acquire_timeout_s,
        connection_class=ControlConnection,
        record_class=asyncpg.Record,
        min_size=min(db.pool_min, max_size or db.pool_max),
        max_size=max_size or db.pool_max,
        max_queries=50_000,
        loop=None,
        connect=None,
        setup=None,
        init=None,
        reset=_reset,
        max_inactive_connection_lifetime=120.0,
        timeout=db.connect_timeout,
        server_settings={
            "application_name": "fluxbase-control",
            "lock_timeout": f"{db.lock_timeout_ms}ms",
            "statement_timeout": f"{db.statement_timeout_ms}ms",
        },
    )
    await pool
    try:
        await check_runtime_role(pool, settings)
    except BaseException:
        await pool.close()
        raise
    return pool
