"""The shared rate limiter under concurrency: requests that arrive while this process leases
the next slice of a name's window all go on together when the lease comes back.

With an asyncio.Lock per name they were let through one event-loop iteration apart; on a busy
API (32 clients, ~2.5 ms per loop iteration) every slice renewal queued ~16 requests for up to
50 ms, which was the whole 32-client p99 of bench/sql_throughput.py (docs/sql.md, "Tail
latency at 32 clients"). Real control plane, real lease function (sql/0038).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from fluxbase.ratelimit import SharedRateLimiter

WAITERS = 20


async def test_requests_waiting_for_a_lease_all_go_on_in_the_same_loop_iteration(
    stack: Any, instance: Any
) -> None:
    pool = await asyncpg.create_pool(stack.database_url(instance.dbname), min_size=1, max_size=2)
    assert pool is not None
    try:
        lim = SharedRateLimiter(pool)
        name = f"waiters:{time.monotonic_ns()}"
        limit = 100 * WAITERS  # a slice of WAITERS tokens
        assert SharedRateLimiter.slice_of(limit) == WAITERS
        for _ in range(WAITERS):  # spend the first slice
            await lim.hit(name, limit, 60)
        before = lim.round_trips

        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        done_at: list[int] = []

        async def one() -> None:
            quota = await lim.hit(name, limit, 60)
            assert quota.limit == limit
            done_at.append(ticks)

        clock = asyncio.create_task(ticker())
        try:
            await asyncio.gather(*(one() for _ in range(WAITERS)))
        finally:
            stop = True
            await clock
        # One round trip leased the second slice for all of them ...
        assert lim.round_trips - before == 1
        # ... and none waited for the others to go first, one loop iteration each.
        spread = max(done_at) - min(done_at)
        assert spread <= 3, f"the waiters went on over {spread} loop iterations: {sorted(done_at)}"
    finally:
        await pool.close()
