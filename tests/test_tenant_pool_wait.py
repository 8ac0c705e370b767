"""Waiting for a busy tenant pool (tenancy.pools.TenantPool): first come, first served, bounded
by a timer that fails the waiter (not asyncio.timeout), and a waiter that gives up (timed out or
cancelled) never takes a connection with it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from fluxbase.tenancy.pools import TenantConnection, TenantPool


async def test_waiters_are_served_in_order_and_give_up_cleanly(stack: Any) -> None:
    url = stack.database_url(await stack.create_database())

    async def connect() -> TenantConnection:
        conn: TenantConnection = await asyncpg.connect(url, connection_class=TenantConnection)
        return conn

    pool = TenantPool(connect, 1)
    try:
        held = await pool.acquire(5)
        order: list[int] = []

        async def wait(n: int) -> None:
            conn = await pool.acquire(30)
            order.append(n)
            assert await conn.fetchval("SELECT $1::int", n) == n
            await pool.release(conn)

        tasks = []
        for n in range(5):
            tasks.append(asyncio.create_task(wait(n)))
            await asyncio.sleep(0.01)  # queued in this order
        with pytest.raises(TimeoutError):
            await pool.acquire(0.2)  # behind them, and nothing is released: times out
        cancelled = asyncio.create_task(pool.acquire(30))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await pool.release(held)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert order == [0, 1, 2, 3, 4]
        # Neither the timed-out nor the cancelled waiter kept the connection: it is idle, at once.
        assert pool.get_idle_size() == 1 and pool.get_size() == 1
        conn = await pool.acquire(0.5)
        await pool.release(conn)
    finally:
        await pool.close()
