"""Presence: who is in a topic, shared by every realtime replica through PostgreSQL.

A connection `track`s a small JSON state in a topic it joined; the member (a key the service
makes up) is a row of fluxbase.realtime_presence written by the process holding the connection,
and every change sets the topic's version (fluxbase.realtime_presence_topics, from one sequence)
and rings `fluxbase_presence` (its payload is never read: a forged NOTIFY only causes a read).
Each process keeps, for the topics its sockets joined, the members it last saw; on the doorbell
and on every tick it reads the versions of those topics, re-reads the members of the ones that
moved, and sends each watching socket the difference (`presence_diff`). A socket that joins gets
the process's current view (`presence_state`) and then the diffs, so the two always add up.

Leaving: a connection that closes is untracked at once. Each tick (a third of the heartbeat)
the process pings its tracking sockets and closes one whose previous ping got no pong, pushes
its own rows' expiry forward, and deletes the rows of any process that stopped doing so
(expired): whatever the way a member went, the others see it leave within the heartbeat.

Bounds: the state's JSON size, members per topic (checked under the topic row's lock, so two
replicas cannot both take the last place), members per project, tracked topics per socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from fluxbase.errors import Conflict, PayloadTooLarge, ValidationError

log = logging.getLogger("fluxbase.realtime.presence")

CHANNEL = "fluxbase_presence"
MAX_MEMBERS_PER_PROJECT = 10_000
MAX_TRACKED_PER_SOCKET = 20

Topic = tuple[str, str]  # (project id, topic)


@dataclass(eq=False)
class Watcher:
    """A socket that joined a topic: where its presence messages go."""

    room: str
    push: Callable[[bytes], None]


@dataclass
class _View:
    version: int | None
    members: dict[str, str]  # key → state (JSON text as PostgreSQL writes jsonb)
    watchers: set[Watcher] = field(default_factory=set)


_VERSION_SQL = "SELECT version FROM fluxbase.realtime_presence_topics WHERE project_id = $1 AND topic = $2"
_MEMBERS_SQL = """
SELECT member_key, state::text AS state FROM fluxbase.realtime_presence
WHERE project_id = $1 AND topic = $2
"""
_VERSIONS_SQL = """
SELECT w.project_id, w.topic, t.version
FROM unnest($1::text[], $2::text[]) AS w(project_id, topic)
LEFT JOIN fluxbase.realtime_presence_topics t ON t.project_id = w.project_id AND t.topic = w.topic
"""
_BUMP_SQL = """
INSERT INTO fluxbase.realtime_presence_topics AS t (project_id, topic) VALUES ($1, $2)
ON CONFLICT (project_id, topic) DO UPDATE SET version = nextval('fluxbase.realtime_presence_version')
RETURNING version
"""
_EXPIRE_SQL = """
WITH gone AS (
    DELETE FROM fluxbase.realtime_presence WHERE expires_at < now() RETURNING project_id, topic
)
UPDATE fluxbase.realtime_presence_topics t SET version = nextval('fluxbase.realtime_presence_version')
FROM (SELECT DISTINCT project_id, topic FROM gone) g
WHERE t.project_id = g.project_id AND t.topic = g.topic
RETURNING t.project_id
"""
_EMPTY_TOPICS_SQL = """
DELETE FROM fluxbase.realtime_presence_topics t
WHERE NOT EXISTS (SELECT 1 FROM fluxbase.realtime_presence m
                  WHERE m.project_id = t.project_id AND m.topic = t.topic)
"""


def _members(members: dict[str, str]) -> msgspec.Raw:
    """key → state, the states as PostgreSQL wrote them (never parsed again)."""
    body = b",".join(json.dumps(k).encode() + b":" + v.encode() for k, v in sorted(members.items()))
    return msgspec.Raw(b"{" + body + b"}")


def presence_state(room: str, members: dict[str, str]) -> bytes:
    return msgspec.json.encode({"type": "presence_state", "roomId": room, "payload": _members(members)})


def presence_diff(room: str, joins: dict[str, str], leaves: dict[str, str]) -> bytes:
    payload = {"joins": _members(joins), "leaves": _members(leaves)}
    return msgspec.json.encode({"type": "presence_diff", "roomId": room, "payload": payload})


class Presence:
    def __init__(
        self,
        dsn: str,
        db: asyncpg.Pool,
        *,
        heartbeat_s: float,
        max_members: int,
        max_state_bytes: int,
        replica_id: str | None = None,
    ):
        self.dsn = dsn
        self.db = db
        self.heartbeat_s = heartbeat_s
        self.max_members = max_members
        self.max_state_bytes = max_state_bytes
        self.replica_id = replica_id or "rt_" + secrets.token_hex(8)
        self.views: dict[Topic, _View] = {}
        self._lock = asyncio.Lock()
        self._bell = asyncio.Event()
        # Sockets that track something: their pending ping (for the pong check) and their members.
        self.tracking: dict[Any, dict[Topic, str]] = {}
        self.pings: dict[Any, tuple[asyncio.Future[float], float]] = {}

    # -- watching ------------------------------------------------------------------------------

    async def watch(self, project_id: str, topic: str, watcher: Watcher) -> None:
        """Join: the socket gets the current members now and the diffs from then on."""
        async with self._lock:
            key = (project_id, topic)
            view = self.views.get(key)
            if view is None:
                view = self.views[key] = await self._load(key)
            view.watchers.add(watcher)
            watcher.push(presence_state(watcher.room, view.members))

    def unwatch(self, project_id: str, topic: str, watcher: Watcher) -> None:
        key = (project_id, topic)
        view = self.views.get(key)
        if view is not None:
            view.watchers.discard(watcher)
            if not view.watchers:
                del self.views[key]

    async def _load(self, key: Topic) -> _View:
        # The version first: a change between the two reads leaves the view older than its
        # members, so the next sync reads them again (never the other way round).
        version = await self.db.fetchval(_VERSION_SQL, *key)
        rows = await self.db.fetch(_MEMBERS_SQL, *key)
        return _View(version, {r["member_key"]: r["state"] for r in rows})

    # -- tracking ------------------------------------------------------------------------------

    def _state_json(self, state: Any) -> str:
        if not isinstance(state, dict):
            raise ValidationError("A presence state is a JSON object.")
        try:
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
        except ValueError as exc:
            raise ValidationError("A presence state must be plain JSON (no NaN or Infinity).") from exc
        if len(text.encode()) > self.max_state_bytes:
            raise PayloadTooLarge(f"A presence state is limited to {self.max_state_bytes} bytes of JSON.")
        return text

    async def track(self, sock: Any, project_id: str, topic: str, state: Any) -> str:
        """Track (or update) this socket's member of the topic; returns its key."""
        text = self._state_json(state)
        mine = self.tracking.get(sock, {})
        key = mine.get((project_id, topic))
        if key is None and len(mine) >= MAX_TRACKED_PER_SOCKET:
            raise ValidationError(f"A connection tracks presence in at most {MAX_TRACKED_PER_SOCKET} topics.")
        new_key = key or secrets.token_hex(8)
        async with self.db.acquire() as conn, conn.transaction():
            await conn.fetchval(_BUMP_SQL, project_id, topic)  # locks the topic row
            if key is None:
                n_topic, n_project = await conn.fetchrow(
                    """SELECT count(*) FILTER (WHERE topic = $2), count(*)
                       FROM fluxbase.realtime_presence WHERE project_id = $1""",
                    project_id,
                    topic,
                )
                if n_topic >= self.max_members:
                    raise Conflict(f"The topic already has {self.max_members} presence members, its limit.")
                if n_project >= MAX_MEMBERS_PER_PROJECT:
                    raise Conflict(
                        f"The project already has {MAX_MEMBERS_PER_PROJECT} presence members, its limit."
                    )
            await conn.execute(
                """INSERT INTO fluxbase.realtime_presence
                       (project_id, topic, member_key, replica_id, state, expires_at)
                   VALUES ($1, $2, $3, $4, $5::jsonb, now() + make_interval(secs => $6))
                   ON CONFLICT (project_id, topic, member_key) DO UPDATE
                   SET state = EXCLUDED.state, expires_at = EXCLUDED.expires_at
                   WHERE fluxbase.realtime_presence.replica_id = EXCLUDED.replica_id""",
                project_id,
                topic,
                new_key,
                self.replica_id,
                text,
                self._expiry_s(),
            )
            await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
        self.tracking.setdefault(sock, {})[(project_id, topic)] = new_key
        self._bell.set()
        return new_key

    async def untrack(self, sock: Any, project_id: str, topic: str) -> bool:
        key = self.tracking.get(sock, {}).pop((project_id, topic), None)
        if key is None:
            return False
        if not self.tracking.get(sock):
            self.tracking.pop(sock, None)
            self.pings.pop(sock, None)
        await self._delete([(project_id, topic, key)])
        return True

    async def untrack_all(self, sock: Any) -> None:
        mine = self.tracking.pop(sock, {})
        self.pings.pop(sock, None)
        if mine:
            await self._delete([(p, t, k) for (p, t), k in mine.items()])

    async def _delete(self, members: list[tuple[str, str, str]]) -> None:
        async with self.db.acquire() as conn, conn.transaction():
            for project_id, topic, key in sorted(members):
                await conn.fetchval(_BUMP_SQL, project_id, topic)
                await conn.execute(
                    """DELETE FROM fluxbase.realtime_presence
                       WHERE project_id = $1 AND topic = $2 AND member_key = $3 AND replica_id = $4""",
                    project_id,
                    topic,
                    key,
                    self.replica_id,
                )
            await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
        self._bell.set()

    def _expiry_s(self) -> float:
        return self.heartbeat_s * 2 / 3

    # -- the loop ------------------------------------------------------------------------------

    def _on_notify(self, *_: object) -> None:
        self._bell.set()

    async def run(self, stop: asyncio.Event, close_socket: Callable[[Any], None]) -> None:
        tick = self.heartbeat_s / 3
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": "fluxbase-realtime-presence"}
                )
                await conn.add_listener(CHANNEL, self._on_notify)
                next_tick = 0.0
                while not stop.is_set():
                    now = time.monotonic()
                    if now >= next_tick:
                        next_tick = now + tick
                        self._check_pongs(close_socket)
                        await self._heartbeat()
                    await self.sync()
                    self._bell.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._bell.wait(), max(0.01, next_tick - time.monotonic()))
            except Exception as exc:
                log.warning("presence loop failed (%r); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)

    def _check_pongs(self, close_socket: Callable[[Any], None]) -> None:
        """Close a tracking socket whose last ping got no pong; ping the others."""
        now = time.monotonic()
        for sock in list(self.tracking):
            pending = self.pings.get(sock)
            if pending is not None and not pending[0].done() and now - pending[1] >= self.heartbeat_s / 3:
                log.info("closing a presence socket that stopped answering pings")
                self.pings.pop(sock, None)
                close_socket(sock)
                continue
            if pending is None or pending[0].done():
                with contextlib.suppress(Exception):
                    task = asyncio.ensure_future(sock.ws.ping())
                    task.add_done_callback(lambda t, s=sock, at=now: self._pinged(s, t, at))

    def _pinged(self, sock: Any, task: asyncio.Future[Any], at: float) -> None:
        if task.cancelled() or task.exception() is not None or sock not in self.tracking:
            return
        self.pings[sock] = (task.result(), at)

    async def _heartbeat(self) -> None:
        async with self.db.acquire() as conn:
            await conn.execute(
                """UPDATE fluxbase.realtime_presence SET expires_at = now() + make_interval(secs => $2)
                   WHERE replica_id = $1""",
                self.replica_id,
                self._expiry_s(),
            )
            async with conn.transaction():
                expired = await conn.fetch(_EXPIRE_SQL)
                if expired:
                    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            await conn.execute(_EMPTY_TOPICS_SQL)

    async def sync(self) -> None:
        """Send each watching socket what changed in its topics since the last look."""
        async with self._lock:
            if not self.views:
                return
            keys = list(self.views)
            rows = await self.db.fetch(_VERSIONS_SQL, [k[0] for k in keys], [k[1] for k in keys])
            for r in rows:
                key = (r["project_id"], r["topic"])
                view = self.views.get(key)
                if view is None or view.version == r["version"]:
                    continue
                fresh = await self._load(key)
                joins = {k: v for k, v in fresh.members.items() if view.members.get(k) != v}
                leaves = {k: v for k, v in view.members.items() if k not in fresh.members}
                view.version, view.members = fresh.version, fresh.members
                if joins or leaves:
                    for w in list(view.watchers):
                        w.push(presence_diff(w.room, joins, leaves))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with self.db.acquire() as conn, conn.transaction():
                gone = await conn.fetch(
                    """DELETE FROM fluxbase.realtime_presence WHERE replica_id = $1
                       RETURNING project_id, topic""",
                    self.replica_id,
                )
                for project_id, topic in sorted({(r["project_id"], r["topic"]) for r in gone}):
                    await conn.fetchval(_BUMP_SQL, project_id, topic)
                if gone:
                    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
