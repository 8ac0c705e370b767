"""Platform locks are out of tenant reach: a tenant may take any advisory-lock key, so none of
the platform's waits may hang on one (issue 15, finding 5). Storage, registration and webhook
sending have their own tests next to them; this one covers the migration runner."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from fluxbase.db.migrate import migrate


async def test_tenant_advisory_lock_does_not_block_migrations(api, project, stack, instance) -> None:
    hold_s = 8
    holder = asyncio.create_task(
        api.sql(project.admin_key, project.id, f"SELECT pg_advisory_lock(7243190001), pg_sleep({hold_s})")
    )
    conn = await asyncpg.connect(stack.database_url(instance.dbname))
    try:
        deadline = time.monotonic() + 10
        while not await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1",
            7243190001 & 0xFFFFFFFF,
        ):
            assert time.monotonic() < deadline, "the tenant never got its lock"
            await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await asyncio.wait_for(migrate(conn), hold_s - 2) == []
        assert time.monotonic() - started < hold_s - 2
    finally:
        await conn.close()
        done = await holder
    assert done.json()["success"], done.text
