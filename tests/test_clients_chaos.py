"""Chaos for the clients: while 1 000 rows are committed, the connection is cut three times and
the realtime service is SIGKILLed and restarted; each client must receive every event exactly
once, in commit order (resume by cursor)."""

from __future__ import annotations

import asyncio
import time

from clients_chaos import (
    ROWS,
    check_exactly_once_in_order,
    realtime_behind_proxy,
    write_rows_with_chaos,
)
from fluxbase_client import AsyncFluxbase
from support import Api


async def test_python_client_gets_every_event_once_through_cuts_and_a_kill(
    api: Api, project, instance, log_dir, control_db
) -> None:
    key = await api.new_key(project.owner_token, project.id, "admin", rateLimitRequests=1_000_000)
    async with AsyncFluxbase(api.base_url, project.id, key) as fx:
        await fx.sql("CREATE TABLE items (id serial PRIMARY KEY, v int)")
        async with realtime_behind_proxy(instance, log_dir) as (chaos, kill_and_restart):
            received: list[tuple[int, str]] = []
            rt = fx.realtime(
                url=chaos.url, heartbeat_s=2, heartbeat_timeout_s=2, backoff_base_s=0.1, backoff_max_s=1
            )
            async with rt:
                ch = await rt.subscribe(tables=["items"])

                async def consume() -> None:
                    async for ev in ch:
                        if ev["type"] == "db_event":
                            received.append((ev["payload"]["record"]["v"], ev["cursor"]))
                            if len(received) >= ROWS:
                                return

                consumer = asyncio.create_task(consume())
                started = time.monotonic()
                await write_rows_with_chaos(control_db, project.id, chaos, kill_and_restart)
                await asyncio.wait_for(consumer, 30)
                await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up now
                while not ch.queue.empty():
                    ev = ch.queue.get_nowait()
                    if ev["type"] == "db_event":
                        received.append((ev["payload"]["record"]["v"], ev["cursor"]))
                elapsed = time.monotonic() - started
            assert chaos.proxy.cuts >= 3 and chaos.kills == 1 and rt.reconnects >= 4, (
                chaos.proxy.cuts,
                rt.reconnects,
            )
            check_exactly_once_in_order(received, chaos.committed)
            assert elapsed < 60, elapsed
