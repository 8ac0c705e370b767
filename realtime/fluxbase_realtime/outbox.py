"""Commit-safe outbox reading, per project, with a doorbell that rings only while the reader sleeps.

Event ids are assigned before commit, so "id > last" loses events that commit out of order.
Every transaction below the snapshot's xmin has finished, so the reader reads those in (xid, id)
order and keeps that pair as its global cursor. Above xmin it reads per project: an event of
project P is read once no transaction that could still write P's events with a lower xid is in
progress. The snapshot's in-progress xids are matched to their sessions in `pg_stat_activity`: a
project role (`p_<id>_<scope>`) writes only its own project's events (the capture definers
check the schema against the session user), so it holds back only its project; any other
session (the platform's own roles, a superuser, one that ended meanwhile, a prepared
transaction) holds back every project, as the global horizon always did. One project's open
transaction therefore no longer delays every other project's events (hostile review 3, hole 11).
Per project, events are still delivered in (xid, id) order, so a client's cursor stays a safe
resume point; `position(project)` is where live delivery of a project stands.

While events keep coming it polls; once drained it marks itself waiting (so triggers NOTIFY),
polls once more, and sleeps until the doorbell or a safety timeout. While events are held back
by an open transaction it polls at `blocked_poll_s`. NOTIFY payloads are ignored: a forged NOTIFY
only causes a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
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
POSITION_EVERY_S = 0.2  # how often a busy reader records where its delivery stands (sql/0045)


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

# The per-project read: after the global cursor ($1, $2) and below the horizon of every project
# ($3), each project below its own horizon ($4/$5: the lowest open xid of its roles) and after
# what was already delivered of it early ($6/$7/$8).
_PROJECT_POLL_SQL = (
    _SELECT
    + """
LEFT JOIN unnest($4::text[], $5::text[]) AS b(project_id, below) ON b.project_id = e.project_id
LEFT JOIN unnest($6::text[], $7::text[], $8::bigint[]) AS f(project_id, xid, id)
  ON f.project_id = e.project_id
WHERE (e.xid, e.id) > ($1::text::xid8, $2::bigint) AND e.xid < $3::text::xid8
  AND (b.below IS NULL OR e.xid < b.below::xid8)
  AND (f.project_id IS NULL OR (e.xid, e.id) > (f.xid::xid8, f.id))
ORDER BY e.xid, e.id
LIMIT $9
"""
)

# Committed events this snapshot sees above xmin that are not delivered yet: held back by an open
# transaction of their project (or of the platform). Written as an ordered LIMIT 1 so the plan is
# an index probe: as EXISTS, the generic plan asyncpg's prepared statement settles on is a
# sequential scan of the whole outbox on every poll.
_HELD_SQL = """
SELECT 1 FROM fluxbase.events e
LEFT JOIN unnest($2::text[], $3::text[], $4::bigint[]) AS f(project_id, xid, id)
  ON f.project_id = e.project_id
WHERE e.xid >= $1::text::xid8 AND (f.project_id IS NULL OR (e.xid, e.id) > (f.xid::xid8, f.id))
ORDER BY e.xid LIMIT 1
"""

# The sessions holding the snapshot's open transactions (needs pg_read_all_stats: the runtime
# role has it, docs/security.md).
_HOLDERS_SQL = (
    "SELECT backend_xid::text AS xid, usename FROM pg_catalog.pg_stat_activity WHERE backend_xid IS NOT NULL"
)

# A project's LOGIN roles (fluxbase.security.roles.role_name): p_<16 hex>_<scope>. Only the
# platform creates roles; tenants have no CREATEROLE.
_PROJECT_ROLE = re.compile(r"p_([0-9a-f]{16})_[a-z]+")


def parse_snapshot(text: str) -> tuple[int, int, list[int]]:
    """`pg_current_snapshot()` as text, 'xmin:xmax:xip,xip': its bounds and open xids."""
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), [int(x) for x in xip.split(",") if x]


def horizons(xmax: int, xip: list[int], holders: dict[int, str | None]) -> tuple[int, dict[str, int]]:
    """The horizon below which every project's events are complete (the lowest open xid of a
    session that is not a project role, else xmax), and each project's own lower one.

    `holders` maps a 32-bit xid to its session's user; an open xid found in no session (it
    ended after the snapshot, or is a prepared transaction) holds every project back."""
    below_all = xmax
    below: dict[str, int] = {}
    for x in xip:
        m = _PROJECT_ROLE.fullmatch(holders.get(x & 0xFFFFFFFF) or "")
        if m is None:
            below_all = min(below_all, x)
        else:
            below[m.group(1)] = min(below.get(m.group(1), x), x)
    return below_all, {p: b for p, b in below.items() if b < below_all}


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


def _event(row: asyncpg.Record) -> OutboxEvent:
    return OutboxEvent(
        Cursor(int(row["xid"]), row["id"]),
        row["project_id"],
        row["kind"],
        row["table_name"],
        row["operation"],
        row["message"].encode(),
    )


async def read_replay(
    db: asyncpg.Pool | asyncpg.Connection, project_id: str, after: Cursor, upto: Cursor, limit: int
) -> list[OutboxEvent]:
    rows = await db.fetch(_REPLAY_SQL, project_id, str(after.xid), after.id, str(upto.xid), upto.id, limit)
    return [_event(r) for r in rows]


class OutboxReader:
    """Reads fluxbase.events in commit-safe order and hands batches to `deliver`."""

    def __init__(
        self,
        dsn: str,
        deliver: Callable[[list[OutboxEvent]], Awaitable[None]],
        *,
        busy_poll_s: float = 0.005,
        blocked_poll_s: float = 0.01,
        idle_poll_s: float = 1.0,
        batch: int = 2000,
    ):
        self.dsn = dsn
        self.deliver = deliver
        self.busy_poll_s = busy_poll_s
        self.blocked_poll_s = blocked_poll_s
        self.idle_poll_s = idle_poll_s
        self.batch = batch
        self.reader_id = "rt_" + secrets.token_hex(6)
        self.cursor: Cursor | None = None  # every event at or below it is delivered
        self.early: dict[str, Cursor] = {}  # per project: delivered up to here, above `cursor`
        self.ready = asyncio.Event()
        self._bell = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self.polls = 0
        self.doorbells = 0
        self.drained = False  # the last poll found nothing more to read (lag 0)
        self.drained_at = time.monotonic()
        self._recorded_at = 0.0

    def position(self, project_id: str) -> Cursor:
        """Where live delivery of a project's events stands: each of its events at or below it
        has been handed to `deliver`, each later one will be (in order)."""
        assert self.cursor is not None
        early = self.early.get(project_id)
        if early is not None and (early.xid, early.id) > (self.cursor.xid, self.cursor.id):
            return early
        return self.cursor

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
        # backend_pid: a move (services.moves) waits only for readers whose backend is alive.
        await conn.execute(
            "INSERT INTO fluxbase.event_readers (reader_id, waiting, backend_pid) "
            "VALUES ($1, false, pg_backend_pid()) "
            "ON CONFLICT (reader_id) DO UPDATE SET waiting = false, seen_at = now(), "
            "backend_pid = pg_backend_pid()",
            self.reader_id,
        )
        return conn

    async def _set_waiting(self, conn: asyncpg.Connection, waiting: bool) -> None:
        """Also records where delivery stands (`read_xid`, `read_id`: every event at or below it
        has been handed to `deliver`), which a move between clusters waits on (sql/0045)."""
        cursor = self.cursor
        await conn.execute(
            "UPDATE fluxbase.event_readers SET waiting = $2, seen_at = now(), "
            "read_xid = $3::text::xid8, read_id = $4 WHERE reader_id = $1",
            self.reader_id,
            waiting,
            str(cursor.xid) if cursor is not None else None,
            cursor.id if cursor is not None else None,
        )
        self._recorded_at = time.monotonic()

    async def _record_position(self, conn: asyncpg.Connection) -> None:
        """While events keep coming (no drain, so no `_set_waiting`), the position is recorded
        at most every POSITION_EVERY_S: one small UPDATE, whatever the event rate."""
        if self.cursor is None or time.monotonic() - self._recorded_at < POSITION_EVERY_S:
            return
        self._recorded_at = time.monotonic()
        await conn.execute(
            "UPDATE fluxbase.event_readers SET seen_at = now(), read_xid = $2::text::xid8, read_id = $3 "
            "WHERE reader_id = $1",
            self.reader_id,
            str(self.cursor.xid),
            self.cursor.id,
        )

    async def _poll(self, conn: asyncpg.Connection) -> tuple[list[OutboxEvent], bool]:
        """One consistent read: the events each project's horizon lets through, after what was
        delivered, and whether more are pending (a full batch, or events held back)."""
        self.polls += 1
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # The first statement takes the transaction's snapshot: the one the reads below see.
            xmin, xmax, xip = parse_snapshot(await conn.fetchval("SELECT pg_current_snapshot()::text"))
            if self.cursor is None:
                self.cursor = Cursor(xmin, 0)
            early = list(self.early.items())
            f_projects = [p for p, _ in early]
            f_xids = [str(c.xid) for _, c in early]
            f_ids = [c.id for _, c in early]
            # Committed events above xmin not delivered yet? Only then do the open transactions'
            # sessions matter (pg_stat_activity is the costly read); otherwise all there is to
            # read lies below xmin.
            above = (
                xmax > xmin
                and (await conn.fetchval(_HELD_SQL, str(xmin), f_projects, f_xids, f_ids)) is not None
            )
            below_all, below = xmin, dict[str, int]()
            if above:
                # Read after the snapshot: an xid whose session has ended by now is found in none
                # and holds everything back for this one poll.
                holders = {int(r["xid"]): r["usename"] for r in await conn.fetch(_HOLDERS_SQL)}
                below_all, below = horizons(xmax, xip, holders)
            rows = await conn.fetch(
                _PROJECT_POLL_SQL,
                str(self.cursor.xid),
                self.cursor.id,
                str(below_all),
                list(below),
                [str(b) for b in below.values()],
                f_projects,
                f_xids,
                f_ids,
                self.batch,
            )
            events = [_event(r) for r in rows]
            full = len(events) == self.batch
            # Conservative: what was above xmin may all have been read now; one more poll says.
            held = full or above
        # Below xmin everything is read in order: the global cursor moves to the last event read
        # there, or to xmin when the batch held all of it.
        last_safe = next((ev.cursor for ev in reversed(events) if ev.cursor.xid < xmin), None)
        if not full or (events and events[-1].cursor.xid >= xmin):
            if xmin > self.cursor.xid:
                self.cursor = Cursor(xmin, 0)
            elif last_safe is not None:
                self.cursor = last_safe
        elif last_safe is not None:
            self.cursor = last_safe
        for ev in events:
            if ev.cursor.xid >= xmin:
                self.early[ev.project_id] = ev.cursor
        g = (self.cursor.xid, self.cursor.id)
        for p in [p for p, c in self.early.items() if (c.xid, c.id) <= g]:
            del self.early[p]
        return events, held

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
                # The cursor already stands past these: a reader cancelled now (a cluster's
                # connection changed, fluxbase_realtime.clusters) still hands them on.
                await asyncio.shield(self.deliver(events))
            if events or pending:
                await self._record_position(conn)
                self.drained = False
                # Held back by an open transaction, nothing new read: no doorbell will say when
                # it ends (an abort rings none), so look again soon, but not in a tight loop.
                await asyncio.sleep(self.busy_poll_s if events else self.blocked_poll_s)
                continue
            self.drained, self.drained_at = True, time.monotonic()
            # Drained: ask for the doorbell, then look once more so nothing slips in between.
            self._bell.clear()
            await self._set_waiting(conn, True)
            events, pending = await self._poll(conn)
            if events:
                await asyncio.shield(self.deliver(events))
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
