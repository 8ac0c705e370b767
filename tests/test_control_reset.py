"""The control pool's reset on release (db/control.py, issue 19): the cold request's key lookup
and rate lease leave no session state, so their connections go back without asyncpg's reset query
(a round trip each on a project's first request); every other use is still reset, which is what
frees a session advisory lock a holder failed to unlock (services/moves.py takes one on an
acquired control connection)."""

from __future__ import annotations

import asyncpg

from fluxbase.config import load_settings
from fluxbase.db.control import create_control_pool
from fluxbase.ratelimit import SharedRateLimiter
from fluxbase.services.access import authenticate_key
from support import Api

_LAST = "SELECT query, state FROM pg_stat_activity WHERE pid = $1"


async def _last_query(control_db: asyncpg.Pool, pid: int) -> str:
    row = await control_db.fetchrow(_LAST, pid)
    assert row is not None and row["state"] == "idle", row
    return str(row["query"])


async def test_key_lookup_and_lease_skip_the_reset(api: Api, instance, control_db) -> None:
    _, token = await api.new_user()
    pid = await api.new_project(token)
    key = await api.new_key(token, pid, "admin")
    pool = await create_control_pool(load_settings(instance.env), max_size=1)
    try:
        backend = await pool.fetchval("SELECT pg_backend_pid()")
        # An ordinary use is reset on release: the backend's last statement is the reset query.
        assert "pg_advisory_unlock_all" in await _last_query(control_db, backend)
        auth = await authenticate_key(pool, key, None)
        assert auth.project.id == pid
        assert "fluxbase.api_keys" in await _last_query(control_db, backend)
        limiter = SharedRateLimiter(pool)
        await limiter.hit(f"test-reset-{pid}", 10, 10.0)
        assert "rate_lease" in await _last_query(control_db, backend)
        # The mark lasts one release: the next ordinary use is reset again.
        assert await pool.fetchval("SELECT 1") == 1
        assert "pg_advisory_unlock_all" in await _last_query(control_db, backend)
    finally:
        await pool.close()


async def test_a_forgotten_advisory_lock_is_still_released(instance, control_db) -> None:
    """A session advisory lock left on a control connection (a move whose unlock failed) is freed
    when the connection goes back, also after the connection served a stateless statement, and
    when a stateless statement fails."""
    pool = await create_control_pool(load_settings(instance.env), max_size=1)
    keys = (424242, 7)
    try:
        await pool.fetchrow_stateless("SELECT 1 AS one")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", *keys)
            # Held while the connection is: another session cannot take it.
            assert not await control_db.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", *keys)
        other = await control_db.acquire()
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", *keys)
            assert await other.fetchval("SELECT pg_advisory_unlock($1::int4, $2::int4)", *keys)
        finally:
            await control_db.release(other)
        # A stateless statement that fails is reset as usual: here one that took a session lock
        # (not released by the error) before failing.
        failing = (
            "SELECT 1 / (x - x) FROM (SELECT pg_try_advisory_lock($1::int4, $2::int4)::int AS x OFFSET 0) s"
        )
        try:
            await pool.fetchrow_stateless(failing, *keys)
            raise AssertionError("the statement did not fail")
        except asyncpg.DivisionByZeroError:
            pass
        other = await control_db.acquire()
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", *keys)
            assert await other.fetchval("SELECT pg_advisory_unlock($1::int4, $2::int4)", *keys)
        finally:
            await control_db.release(other)
    finally:
        await pool.close()
