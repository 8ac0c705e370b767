"""Rooms and subscribers: fan-out of pre-encoded messages through bounded per-socket queues.

A subscriber whose queue fills up (it cannot keep up) is closed with code 4008; it can
reconnect and resume with `since`. Memory per subscriber is bounded by the queue size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from fluxbase.services.realtime import Cursor
from fluxbase_realtime.credentials import Grant
from fluxbase_realtime.filters import RowFilter
from fluxbase_realtime.outbox import OutboxEvent
from fluxbase_realtime.rls import RlsGate, Viewer

log = logging.getLogger("fluxbase.realtime.hub")

CLOSE_SLOW_CONSUMER = 4008
_background: set[asyncio.Task[None]] = set()
DEFAULT_QUEUE = 1000


@dataclass(eq=False)
class Subscription:
    """One room joined by one socket, with optional filters.

    The project room (`topic` None) receives row, schema and project broadcast events; a topic
    room (`project_<id>:<topic>`) only its topic's broadcasts (and presence, sent directly).
    """

    project_id: str
    tables: frozenset[str] | None = None
    operations: frozenset[str] | None = None
    # While a `since` replay runs, live events are held here and flushed afterwards.
    held: list[OutboxEvent] | None = None
    replay_until: Cursor | None = None
    # Not an admin: receives only what the gate lets it see (None: everything).
    viewer: Viewer | None = None
    # The credential it was granted for (fluxbase_realtime.credentials.Grant).
    grant: Grant | None = None
    topic: str | None = None
    room: str = ""
    watcher: object | None = None  # presence.Watcher of a topic room
    # Row filters per table (fluxbase_realtime.filters): data compared in Python, never SQL.
    filters: dict[str, RowFilter] | None = None

    def wants(self, ev: OutboxEvent) -> bool:
        if ev.kind == "broadcast":
            return ev.table == self.topic  # a topic broadcast names its topic in table_name
        if self.topic is not None:
            return False
        if self.tables is not None:
            if ev.table is None and ev.kind == "row":
                return False
            if ev.table is not None and ev.table not in self.tables:
                return False
        if (
            self.operations is not None
            and (ev.operation if ev.kind == "row" else "SCHEMA") not in self.operations
        ):
            return False
        if self.filters and ev.kind == "row":
            f = self.filters.get(ev.table or "")
            if f is not None and not f.matches(ev.image()):
                return False
        return True


@dataclass(eq=False)
class Client:
    """A socket and its bounded outgoing buffer; a writer task runs only while it has messages.

    An idle subscriber therefore costs no task and no asyncio.Queue, only this object and the
    connection itself.
    """

    ws: ServerConnection
    queue_size: int = DEFAULT_QUEUE
    pending: deque[bytes] = field(default_factory=deque)
    subs: dict[str, Subscription] = field(default_factory=dict)
    closed: bool = False
    writer: asyncio.Task[None] | None = None

    def push(self, message: bytes) -> None:
        if self.closed:
            return
        if len(self.pending) >= self.queue_size:
            self.cut_off()
            return
        self.pending.append(message)
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write())

    def cut_off(self) -> None:
        """Close a consumer that cannot keep up; others are not affected."""
        if self.closed:
            return
        self.closed = True
        log.warning("closing slow consumer %s (queue full)", self.ws.remote_address)
        if self.writer is not None:
            self.writer.cancel()  # frames already written stay ahead of the close frame
        self.pending.clear()
        task = asyncio.create_task(
            self.ws.close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and resume with since")
        )
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _write(self) -> None:
        # Single-threaded: between the last emptiness check and the task finishing there is no
        # await, so a push either lands before the check or sees a finished writer and starts one.
        try:
            while self.pending:
                await self.ws.send(self.pending.popleft(), text=True)
        except ConnectionClosed:
            pass

    async def stop(self) -> None:
        self.closed = True
        self.pending.clear()
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.writer


class Hub:
    """project id → subscriptions; `dispatch` sends each event's bytes to every matching socket.

    Subscribers without a viewer get the fast path: the same bytes, pushed as the batch is
    walked. End-user subscribers of a project are served after that, from one gate decision per
    batch and project, in event order; without a gate they receive nothing (fail closed).
    """

    def __init__(self, gate: RlsGate | None = None) -> None:
        self.rooms: dict[str, dict[Subscription, Client]] = defaultdict(dict)
        self.delivered = 0
        self.gate = gate

    def join(self, client: Client, sub: Subscription) -> None:
        self.rooms[sub.project_id][sub] = client

    def leave(self, sub: Subscription) -> None:
        room = self.rooms.get(sub.project_id)
        if room is not None:
            room.pop(sub, None)
            if not room:
                del self.rooms[sub.project_id]

    async def dispatch(self, events: list[OutboxEvent]) -> None:
        # project → (the events some end user wants, the end-user subscriptions at this moment)
        gated: dict[str, tuple[list[OutboxEvent], dict[Subscription, Client]]] = {}
        for ev in events:
            room = self.rooms.get(ev.project_id)
            if not room:
                continue
            for sub, client in list(room.items()):
                if sub.held is not None:
                    sub.held.append(ev)
                    if len(sub.held) > client.queue_size:
                        client.cut_off()
                elif sub.viewer is not None:
                    if sub.wants(ev):
                        pending, subs = gated.setdefault(ev.project_id, ([], {}))
                        if not pending or pending[-1] is not ev:
                            pending.append(ev)
                        subs[sub] = client
                elif sub.wants(ev):
                    client.push(ev.message)
                    self.delivered += 1
        for project_id, (pending, subs) in gated.items():
            await self._dispatch_gated(project_id, pending, subs)

    async def _dispatch_gated(
        self, project_id: str, events: list[OutboxEvent], subs: dict[Subscription, Client]
    ) -> None:
        if self.gate is None:
            return
        viewers = {sub.viewer for sub in subs if sub.viewer is not None}
        allowed = await self.gate.decide(project_id, viewers, events)
        room = self.rooms.get(project_id, {})
        for i, ev in enumerate(events):
            for sub, client in subs.items():
                if sub.viewer is None or room.get(sub) is not client or not sub.wants(ev):
                    continue  # left (or resubscribed) while the gate was deciding
                message = allowed.get(sub.viewer, {}).get(i)
                if message is not None:
                    client.push(message)
                    self.delivered += 1

    async def visible(self, sub: Subscription, events: list[OutboxEvent]) -> list[bytes]:
        """The messages of `events` (a replay) that this subscription may receive, in order."""
        wanted = [ev for ev in events if sub.wants(ev)]
        if sub.viewer is None:
            return [ev.message for ev in wanted]
        if self.gate is None or not wanted:
            return []
        allowed = (await self.gate.decide(sub.project_id, [sub.viewer], wanted)).get(sub.viewer, {})
        return [allowed[i] for i in range(len(wanted)) if i in allowed]
