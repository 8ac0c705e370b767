"""The control-plane doorbell every replica listens to (sql/0038 `fluxbase_control`).

Revoking, rotating or deleting an API key and suspending, resuming or deleting a project (or
changing its rate limit or read-only flag) ring `fluxbase_control` on commit. Each API and
realtime process keeps one dedicated LISTEN connection (not from a pool), reconnected with
backoff; the callback only sets an event. The payload is never read, so a tenant's forged NOTIFY
only costs a re-check: API processes forget their cached keys, realtime processes re-check every
subscriber's credential at once instead of at the next `revalidate_s` round. A reconnect counts
as a ring too (one may have been missed meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "fluxbase_control"


class ControlBell:
    """`run(stop)` keeps the LISTEN connection; `rang` is set on every ring (clear it to wait)."""

    def __init__(self, dsn: str, application_name: str):
        self.dsn = dsn
        self.application_name = application_name
        self.rang = asyncio.Event()
        self.listening = asyncio.Event()
        self.rings = 0

    def _on_notify(self, *_: object) -> None:
        self.rings += 1
        self.rang.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            closed = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": self.application_name}
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("control doorbell: could not connect: %r", exc)
            else:
                try:
                    conn.add_termination_listener(lambda _c, ev=closed: ev.set())
                    await conn.add_listener(CHANNEL, self._on_notify)
                    self.listening.set()
                    self.rang.set()
                    backoff = 0.1
                    await wait_any(stop, closed)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("control doorbell: connection lost: %r", exc)
                finally:
                    self.listening.clear()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(5.0, backoff * 2)


async def wait_any(*events: asyncio.Event, at_most_s: float | None = None) -> None:
    """Until one of `events` is set (or `at_most_s` seconds pass)."""
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, timeout=at_most_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
