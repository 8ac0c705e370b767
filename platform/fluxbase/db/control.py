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


class ControlPool(Pool):
    """An asyncpg pool whose `acquire` (and so fetch/execute/...) times out by default."""

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self._acquire_timeout if timeout is None else timeout)


async def create_control_pool(settings: Settings, max_size: int | None = None) -> asyncpg.Pool:
    db = settings.database
    pool = ControlPool(
        db.url,
        acquire_timeout=db.acquire_timeout_s,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        min_size=min(db.pool_min, max_size or db.pool_max),
        max_size=max_size or db.pool_max,
        max_queries=50_000,
        loop=None,
        connect=None,
        setup=None,
        init=None,
        reset=None,
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
