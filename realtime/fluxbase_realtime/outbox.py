"""Commit-safe outbox reading with a doorbell that rings only while the reader sleeps.

Event ids are assigned before commit, so "id > last" loses events that commit out of order.
The reader only reads transactions below its snapshot's xmin — every one of them has finished —
in (xid, id) order, and keeps that pair as its cursor. While events keep coming it polls; once
drained it marks itself waiting (so triggers NOTIFY), polls once more, and sleeps until the
doorbell or a safety timeout. NOTIFY payloads are ignored: a forged NOTIFY only causes a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from fluxbase.services.realtime import MESSAGE_SQL, Cursor

log = logging.getLogger("fluxbase.realtime.outbox")

CHANNEL = "fluxbase_events"


@dataclass(frozen=True)
class OutboxEvent:
    cursor: Cursor
    project_id: str
    kind: str
    table: str | None
    operation: str
    message: bytes  # the wire message, encoded once by PostgreSQL
    _image: list[Any] = field(default_factory=list, compare=False, repr=False)

    def image(self) -> Any:
        """The row image of a row event (`payload.record`), decoded once, for row filters."""
        if not self._image:
            self._image.append(_decode_record(self.message).payload.record)
        return self._image[0]


class _RecordPayload(msgspec.Struct):
    record: Any = None


class _RecordMessage(msgspec.Struct):
    payload: _RecordPayload = msgspec.field(default_factory=_RecordPayload)


_decode_record = msgspec.json.Decoder(_RecordMessage).decode


_SELECT = f"""
SELECT e.id, e.xid::text AS xid, e.project_id, e.kind, e.table_name, e.operation, {MESSAGE_SQL} AS message
FROM fluxbase.events e
"""

_POLL_SQL = (
    _SELECT
    + """
WHERE (e.xid, e.id) > ($1::text::xid8, $2::bigint) AND e.xid < $3::text::xid8
ORDER BY e.xid, e.id
LIMIT $4
"""
)

# A `since` replay: one project's events after the client's cursor, up to where live delivery
# to that subscriber begins. Both bounds lead with the project, so only the project's index can
# serve them: the plan never walks every project's events in xid order (see
# fluxbase.services.realtime.LATEST_CURSOR_SQL).
_REPLAY_SQL = (
    _SELECT
    + """
WHERE (e.project_id, e.xid, e.id) > ($1::text, $2::text::xid8, $3::bigint)
  AND (e.project_id, e.xid, e.id) <= ($1::text, $4::text::xid8, $5::bigint)
ORDER BY e.project_id, e.xid, e.id
LIMIT $6
"""
)

# Committed events this snapshot cannot read yet (an older transaction is still open). Written as
# an ordered LIMIT 1 so the plan is an index probe: as EXISTS, the generic plan asyncpg's
# prepared statement settles on is a sequential scan of the whole outbox on every poll.
_PENDING_SQL = "SELECT 1 FROM fluxbase.events WHERE xid >= $1::text::xid8 ORDER BY xid LIMIT 1"


def _event(row: asyncpg.Record) -> OutboxEvent:
    return OutboxEvent(
        Cursor(int(row["xid"]), row["id"]),
        row["project_id"],
        row["kind"],
        row["table_name"],
        row["operation"],
        row["message"].encode(),
    )


async def read_range(
    conn: asyncpg.Connection, after: Cursor, below_xid: int, limit: int
) -> list[OutboxEvent]:
    return [_event(r) for r in await conn.fetch(_POLL_SQL, str(after.xid), after.id, str(below_xid), limit)]


async def read_replay(
    db: asyncpg.Pool | asyncpg.Connection, project_id: str, after: Cursor, upto: Cursor, limit: int
) -> list[OutboxEvent]:
    rows = await db.fetch(_REPLAY_SQL, project_id, str(after.xid), after.id, str(upto.xid), upto.id, limit)
    return [_event(r) for r in rows]


async def snapshot_xmin(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))


class OutboxReader:
    """Reads fluxbase.events in commit-safe order and hands batches to `deliver`."""

    def __init__(
        self,
        dsn: str,
        deliver: Callable[[list[OutboxEvent]], Awaitable[None]],
        *,
        busy_poll_s: float = 0.005,
        idle_poll_s: float = 1.0,
        batch: int = 2000,
    ):
        self.dsn = dsn
        self.deliver = deliver
        self.busy_poll_s = busy_poll_s
        self.idle_poll_s = idle_poll_s
        self.batch = batch
        self.reader_id = "rt_" + secrets.token_hex(6)
        self.cursor: Cursor | None = None
        self.ready = asyncio.Event()
        self._bell = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self.polls = 0
        self.doorbells = 0
        self.drained = False  # the last poll found nothing more to read (lag 0)
        self.drained_at = time.monotonic()

    def lag_s(self) -> float:
        """Seconds since this reader last found the outbox drained; 0 while it is."""
        return 0.0 if self.drained else time.monotonic() - self.drained_at

    def _on_notify(self, *_: object) -> None:
        self.doorbells += 1
        self._bell.set()  # the payload is never read

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self.dsn, timeout=5, server_settings={"application_name": "fluxbase-realtime"}
        )
        await conn.add_listener(CHANNEL, self._on_notify)
        await conn.execute(
            "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ($1, false) "
            "ON CONFLICT (reader_id) DO UPDATE SET waiting = false, seen_at = now()",
            self.reader_id,
        )
        return conn

    async def _set_waiting(self, conn: asyncpg.Connection, waiting: bool) -> None:
        await conn.execute(
            "UPDATE fluxbase.event_readers SET waiting = $2, seen_at = now() WHERE reader_id = $1",
            self.reader_id,
            waiting,
        )

    async def _poll(self, conn: asyncpg.Connection) -> tuple[list[OutboxEvent], bool]:
        """One consistent read: events below xmin after the cursor, and whether more are pending."""
        self.polls += 1
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            xmin = await snapshot_xmin(conn)
            if self.cursor is None:
                self.cursor = Cursor(xmin, 0)
            events = await read_range(conn, self.cursor, xmin, self.batch)
            pending = len(events) == self.batch or (await conn.fetchval(_PENDING_SQL, str(xmin))) is not None
        if events:
            self.cursor = events[-1].cursor
        return events, pending

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            try:
                conn = self._conn = await self._connect()
                backoff = 0.2
                await self._loop(conn, stop)
            except Exception as exc:
                # A restart of PostgreSQL surfaces as OSError, PostgresError, InterfaceError and
                # even asyncpg's InternalClientError; whatever it was, reconnect and go on from
                # the cursor, which only ever advances past delivered events.
                log.warning("outbox reader lost its connection (%r); retrying in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self._conn.close(), 2)
                    self._conn = None

    async def _loop(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            events, pending = await self._poll(conn)
            self.ready.set()
            if events:
                await self.deliver(events)
            if events or pending:
                self.drained = False
                await asyncio.sleep(self.busy_poll_s)
                continue
            self.drained, self.drained_at = True, time.monotonic()
            # Drained: ask for the doorbell, then look once more so nothing slips in between.
            self._bell.clear()
            await self._set_waiting(conn, True)
            events, pending = await self._poll(conn)
            if events:
                await self.deliver(events)
            if not events and not pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._bell.wait(), self.idle_poll_s)
            self.drained, self.drained_at = False, time.monotonic()
            await self._set_waiting(conn, False)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(self.dsn, timeout=3)
            try:
                await conn.execute("DELETE FROM fluxbase.event_readers WHERE reader_id = $1", self.reader_id)
            finally:
                await conn.close()
