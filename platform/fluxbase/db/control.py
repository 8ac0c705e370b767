"""The control-plane connection pool (service role; never runs tenant SQL)."""

from __future__ import annotations

import asyncpg

from fluxbase.config import Settings


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
    return pool
