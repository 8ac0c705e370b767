"""The control-plane doorbell every replica listens to (sql/0038 `fluxbase_control`).

Revoking, rotating or deleting an API key and suspending, resuming or deleting a project (or
changing its rate limit or read-only flag) ring `fluxbase_control` on commit. Each API and
realtime process keeps one dedicated LISTEN connection (not from a pool), reconnected with
backoff; the callback only wakes a reader. Any session may NOTIFY the channel (tenants too), so a
ring is only a hint: the reader reads `fluxbase.control_epoch` (sql/0040), which only the
platform's triggers bump, and `rang` is set only when the epoch moved (hostile review 8). A forged
ring costs one indexed read per process; rings that arrive together cost one. A reconnect reads
the epoch too and counts as a ring (one may have been missed meanwhile).
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
        self.rings = 0  # real rings: the epoch moved
        self.hints = 0  # notifications received, forged ones included
        self._poked = asyncio.Event()
        self._epoch: int | None = None

    def _on_notify(self, *_: object) -> None:
        self.hints += 1
        self._poked.set()

    async def _read_epochs(
        self, conn: asyncpg.Connection, done: asyncio.Event, closed: asyncio.Event
    ) -> None:
        """On every hint, read the epoch; ring only when it moved. A failed read ends the
        connection (`closed`), and the reconnect reads the epoch and rings."""
        while not done.is_set():
            await wait_any(self._poked, done)
            if done.is_set():
                return
            self._poked.clear()
            try:
                epoch = await conn.fetchval("SELECT epoch FROM fluxbase.control_epoch WHERE id = 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("control doorbell: could not read the epoch: %r", exc)
                closed.set()
                return
            if epoch != self._epoch:
                self._epoch = epoch
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
                done = asyncio.Event()
                reader: asyncio.Task[None] | None = None
                try:
                    conn.add_termination_listener(lambda _c, ev=closed: ev.set())
                    await conn.add_listener(CHANNEL, self._on_notify)
                    self._epoch = await conn.fetchval("SELECT epoch FROM fluxbase.control_epoch WHERE id = 1")
                    self.listening.set()
                    self.rang.set()
                    backoff = 0.1
                    reader = asyncio.create_task(self._read_epochs(conn, done, closed))
                    await wait_any(stop, closed)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("control doorbell: connection lost: %r", exc)
                finally:
                    done.set()
                    if reader is not None:
                        reader.cancel()
                        with contextlib.suppress(BaseException):
                            await reader
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
