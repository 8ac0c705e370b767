"""The control-plane connection pool (the runtime login role; never runs tenant SQL)."""

from __future__ import annotations

import asyncpg

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


async def create_control_pool(settings: Settings, max_size: int | None = None) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        settings.database.url,
        min_size=0,
        max_size=max_size or settings.database.pool_max,
        timeout=settings.database.connect_timeout,
        max_inactive_connection_lifetime=120.0,
        server_settings={"application_name": "fluxbase-control"},
    )
    assert pool is not None
    try:
        await check_runtime_role(pool, settings)
    except BaseException:
        await pool.close()
        raise
    return pool
