"""Rooms and subscribers: fan-out of pre-encoded messages through bounded per-socket queues.

A subscriber whose queue fills up (it cannot keep up) is closed with code 4008; it can
reconnect and resume with `since`. Memory per subscriber is bounded by the queue size.

The WebSocket frame of a message is the same bytes for every subscriber (server frames are not
masked, and the service negotiates no compression), so it is serialized once (`frame_of`) and a
socket's writer sends all its pending frames in one transport write: the cost per delivery is a
list append and a share of one write, not a frame encoding and a system call each.

Subscribers that want the same events of a batch (same room, tables, operations and filters: a
fan-out class, `Subscription.key`) get the same bytes, so `Hub.dispatch` selects and joins a
batch's frames once per class and hands each socket of the class that one buffer: at 1 000
subscribers the work per socket and batch is one dictionary look-up and one transport write,
whatever the number of events in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from fluxbase.metrics import REGISTRY
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
    _key: tuple[object, ...] | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[object, ...]:
        """The fan-out class: subscriptions with equal keys want exactly the same events.

        Filter values enter by `repr`, so `1`, `1.0` and `true` (equal in Python, different to
        a filter, which compares types) never share a class."""
        if self._key is None:
            filters = (
                tuple(sorted((t, f.column, f.op, repr(f.value)) for t, f in self.filters.items()))
                if self.filters
                else None
            )
            self._key = (
                self.project_id,
                self.topic,
                tuple(sorted(self.tables)) if self.tables is not None else None,
                tuple(sorted(self.operations)) if self.operations is not None else None,
                filters,
            )
        return self._key

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


# Sockets with messages pushed during the current event-loop callback; one call_soon flushes
# them all, so a batch of events costs one write per socket and no task per socket.
_dirty: list[Client] = []


def _flush_dirty() -> None:
    batch = _dirty[:]
    _dirty.clear()
    for client in batch:
        try:
            client.flush()
        except Exception as exc:  # a broken socket: its handler ends it
            log.debug("flush failed: %r", exc)


# Frames of small messages are cached (the same event reaches many sockets); a large one is built
# each time, so the cache cannot keep megabytes of delivered messages alive (hostile review 9:
# 8 192 entries of any size let one tenant pin gigabytes).
FRAME_CACHE_MAX_MESSAGE = 16 * 1024


@functools.lru_cache(maxsize=8192)
def _small_frame_of(message: bytes) -> bytes:
    return Frame(Opcode.TEXT, message).serialize(mask=False)


def frame_of(message: bytes) -> bytes:
    """The unmasked, uncompressed text frame of `message` (the same for every socket)."""
    if len(message) <= FRAME_CACHE_MAX_MESSAGE:
        return _small_frame_of(message)
    return Frame(Opcode.TEXT, message).serialize(mask=False)


# A socket's writes carry at most this much (whole frames): a fan-out class's large batch goes
# out in runs of frames, each written once the socket has taken the previous one, so what a
# socket holds beyond its queue is one run in its transport buffer, not the whole batch copied.
WRITE_CHUNK = 256 * 1024
DEFAULT_MAX_BYTES = 8 << 20
# A socket whose next part has waited this long without fitting under its byte bound is cut off
# (4008): it stopped reading, or reads slower than about half its bound per STALL_S. The default
# of `Client.stall_s` (FLUXBASE_REALTIME_STALL_SECONDS).
STALL_S = 0.25
# Parts a socket has not taken yet (its backlog) may reference at most this many times its bound:
# a reader that keeps up takes a statement of this size; one that falls this far behind is cut off.
BACKLOG_FACTOR = 32
# A socket holding at most this much unsent (its transport drained) takes the next part whatever
# its size: a single message larger than the bound still reaches a reader that keeps up.
SMALL_HELD = 64 * 1024


def runs_of(frames: list[bytes]) -> list[bytes | memoryview]:
    """`frames` joined, as one buffer or (past WRITE_CHUNK) views of it cut at frame boundaries,
    each at most WRITE_CHUNK unless one frame alone is larger."""
    data = b"".join(frames)
    if len(data) <= WRITE_CHUNK:
        return [data]
    view = memoryview(data)
    runs: list[bytes | memoryview] = []
    start = end = 0
    for f in frames:
        if end > start and end + len(f) - start > WRITE_CHUNK:
            runs.append(view[start:end])
            start = end
        end += len(f)
    runs.append(view[start:end])
    return runs


def _frame_size(n: int) -> int:
    """Bytes of the unmasked frame of an `n`-byte message (RFC 6455 header: 2, 4 or 10 bytes)."""
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


class Backlogs:
    """The service-wide budget of what sockets' backlogs keep in memory (hostile review 13).

    A backlog may reference BACKLOG_FACTOR times its socket's bound, and a part keeps its frames
    (built once for its fan-out class) while any socket holds it: sockets of many classes that
    read just enough not to be cut off would otherwise make the service hold classes x 32 x bound.
    `used` counts what waiting parts keep alive, each byte once: the event messages they reference
    (shared by the parts of every class, counted while any waiting part references them) and the
    frames of a waiting part once built. Past `most`, the sockets holding the most backlog are
    closed (4008) until it fits again: a socket that keeps up holds little backlog, so a slow
    socket of one class closes no socket that keeps up."""

    __slots__ = ("holders", "most", "refs", "used")

    def __init__(self, most: int) -> None:
        self.most = most
        self.used = 0
        self.holders: set[Client] = set()  # sockets whose backlog is not empty
        self.refs: dict[int, int] = {}  # id(message) -> waiting parts referencing it

    def hold(self, part: Part) -> None:
        """`part` entered its first backlog: count its messages (once each) and built frames."""
        refs = self.refs
        for m in part.messages:
            k = id(m)  # stable while counted: the part keeps `m` alive
            n = refs.get(k, 0)
            if not n:
                self.used += len(m)
            refs[k] = n + 1
        if part.cached is not None:
            self.used += part.size
        part.budget = self

    def release(self, part: Part) -> None:
        """`part` left its last backlog (its built frames are dropped with it)."""
        refs = self.refs
        for m in part.messages:
            k = id(m)
            n = refs[k] - 1
            if n:
                refs[k] = n
            else:
                del refs[k]
                self.used -= len(m)
        if part.cached is not None:
            self.used -= part.size
        part.budget = None

    def shed(self) -> None:
        """Close the sockets holding the most backlog until `used` is within `most` again (called
        after a part enters a backlog or a socket takes a part, whose frames it may have built)."""
        while self.used > self.most and self.holders:
            victim = max(self.holders, key=lambda c: c.backlog_bytes)
            OVER_BUDGET.inc()
            victim.cut_off()  # (leaves `holders`)


class Part:
    """Messages handed to sockets as one unit: a fan-out class's batch (or one slice of a large
    one, at most `Hub.part_bytes`), the same object for every socket of the class.

    Its frames are built when the first socket takes it, once for the class, and dropped when
    the last socket holding it in its backlog takes it (or is cut off); a part no socket took yet
    holds only the event messages (shared with the outbox batch)."""

    __slots__ = ("budget", "cached", "count", "messages", "size", "waiting")

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.count = len(messages)
        self.size = sum(_frame_size(len(m)) for m in messages)
        self.waiting = 0  # backlogs holding it
        self.cached: list[bytes | memoryview] | None = None  # runs(), once built
        self.budget: Backlogs | None = None  # counted in it while waiting in a backlog

    def runs(self) -> list[bytes | memoryview]:
        runs = self.cached
        if runs is None:
            runs = self.cached = runs_of([frame_of(m) for m in self.messages])
            if self.budget is not None:  # built while other sockets hold it: kept until taken
                self.budget.used += self.size
        return runs

    def taken(self) -> None:
        """One socket with this part in its backlog took it (or dropped it)."""
        self.waiting -= 1
        if self.waiting <= 0:
            if self.budget is not None:
                self.budget.release(self)
            self.cached = None

    def wait_in(self, budget: Backlogs | None) -> None:
        """One more backlog holds this part (the first one counts it in `budget`)."""
        if self.waiting <= 0 and budget is not None:
            budget.hold(self)
        self.waiting += 1


def parts_of(messages: list[bytes], most: int) -> list[Part]:
    """`messages` in parts of at most `most` frame bytes (a message larger alone is one part)."""
    parts: list[Part] = []
    start = size = 0
    for i, m in enumerate(messages):
        n = _frame_size(len(m))
        if size and size + n > most:
            parts.append(Part(messages[start:i]))
            start, size = i, 0
        size += n
    if start < len(messages):
        parts.append(Part(messages[start:] if start else messages))
    return parts


CUT_OFF = REGISTRY.counter(
    "fluxbase_realtime_slow_consumers_total", "Subscribers closed because their queue was full."
)
DROPPED = REGISTRY.counter(
    "fluxbase_realtime_dropped_messages_total", "Messages not sent because their subscriber was cut off."
)
OVER_BUDGET = REGISTRY.counter(
    "fluxbase_realtime_backlog_budget_closes_total",
    "Subscribers closed because the backlogs passed FLUXBASE_REALTIME_MAX_BACKLOG_BYTES.",
)


@dataclass(eq=False)
class Client:
    """A socket and its bounded outgoing buffer; a writer task runs only while it has messages.

    An idle subscriber therefore costs no task and no asyncio.Queue, only this object and the
    connection itself. `pending` holds serialized frames (one entry may carry several messages,
    a fan-out class's batch); `queued` counts the messages in it, which the queue bound limits.
    Frames are written straight to the transport; a connection that negotiated an extension
    (compression: server.serve offers none, an embedding server may) is not `framed` and gets
    its messages one by one through `ws.send` instead.

    Each socket takes its messages at its own pace: a part that does not fit under the socket's
    byte bound (`max_bytes`, counting `pending` and the transport's buffer) waits in the socket's
    `backlog` (shared Parts, in order) and is taken as the socket drains; one that has waited
    STALL_S without fitting cuts the socket off (4008). Nothing waits for a socket but its own
    writer, so a slow or stalled socket delays no other socket's delivery.
    """

    ws: ServerConnection
    queue_size: int = DEFAULT_QUEUE
    pending: deque[bytes | memoryview] = field(default_factory=deque)
    queued: int = 0
    # Bytes in `pending`, and the most a socket may hold unsent (pending and its transport's
    # buffer) before it is cut off: a socket holding nothing always takes the next batch.
    pending_bytes: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    stall_s: float = STALL_S  # how long the backlog's head part may wait to fit
    subs: dict[str, Subscription] = field(default_factory=dict)
    closed: bool = False
    writer: asyncio.Task[None] | None = None
    dirty: bool = False  # in _dirty: flushed once the current callback (a dispatch) is done
    framed: bool = True  # frames may be written straight to the transport (no extension)
    # Parts not taken yet (None while empty: an idle socket holds no deque), their messages and
    # frame bytes, and when the head part started waiting (event-loop time).
    backlog: deque[Part] | None = None
    backlog_count: int = 0
    backlog_bytes: int = 0
    head_since: float = 0.0
    timer: asyncio.TimerHandle | None = None  # checks the head part's STALL_S deadline
    # The service-wide budget of backlogged parts (None: this socket's own bound only).
    budget: Backlogs | None = None

    def __post_init__(self) -> None:
        self.framed = not self.ws.protocol.extensions

    def push(self, message: bytes) -> None:
        """Queue one message; written with whatever else is pushed in this callback."""
        if self.closed:
            return
        if self.backlog is not None:
            self.send_part(Part([message]))
            return
        if self.queued >= self.queue_size:
            self.cut_off()
            return
        data = frame_of(message) if self.framed else message
        if self._over(len(data)):
            self.send_part(Part([message]))
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.queued += 1
        self._schedule()

    def _schedule(self) -> None:
        if not self.dirty and (self.writer is None or self.writer.done()):
            self.dirty = True
            _dirty.append(self)
            if len(_dirty) == 1:
                asyncio.get_running_loop().call_soon(_flush_dirty)

    def held(self) -> int:
        """Bytes this socket holds unsent: queued, and in its transport's buffer."""
        transport = self.ws.transport
        return self.pending_bytes + (transport.get_write_buffer_size() if transport is not None else 0)

    def _over(self, more: int) -> bool:
        held = self.held()
        return held > 0 and held + more > self.max_bytes

    def _fits(self, size: int) -> bool:
        held = self.held()
        return held + size <= self.max_bytes or (held <= SMALL_HELD and not self.pending)

    def send_part(self, part: Part) -> None:
        """Send a part (its frames the same buffers for every socket of its class): taken at once
        when nothing waits ahead of it and it fits under the byte bound, else appended to the
        backlog, which the socket's writer takes from as the socket drains."""
        if self.closed:
            return
        if self.queued + self.backlog_count + part.count > self.queue_size:
            self.cut_off()
            return
        if self.backlog is None:
            transport = self.ws.transport
            held = self.pending_bytes + (transport.get_write_buffer_size() if transport is not None else 0)
            if held + part.size <= self.max_bytes or (held <= SMALL_HELD and not self.pending):
                self._take_part(part)
                if self.budget is not None and self.budget.used > self.budget.most:
                    self.budget.shed()  # (its frames, built now, are kept for the class's backlogs)
                return
        if self.backlog_bytes + part.size > BACKLOG_FACTOR * self.max_bytes:
            self.cut_off()
            return
        budget = self.budget
        if self.backlog is None:
            self.backlog = deque()
            self.head_since = asyncio.get_running_loop().time()
            if budget is not None:
                budget.holders.add(self)
        self.backlog.append(part)
        part.wait_in(budget)
        self.backlog_count += part.count
        self.backlog_bytes += part.size
        self._arm()
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write())
        if budget is not None and budget.used > budget.most:
            budget.shed()  # (may close this socket: it then holds the most)

    def _arm(self) -> None:
        """Check the backlog's head part once it has waited STALL_S (whatever the writer awaits)."""
        if self.timer is None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_at(self.head_since + self.stall_s, self._deadline)

    def _deadline(self) -> None:
        """The head part's time is up: take what fits now, cut the socket off if the head part
        still does not fit (it waited STALL_S), else look again at the new head's deadline."""
        self.timer = None
        if self.closed or not self.backlog:
            return
        self._admit()
        if self.pending and (self.writer is None or self.writer.done()):
            self.writer = asyncio.create_task(self._write())
        if not self.backlog:
            return
        if asyncio.get_running_loop().time() >= self.head_since + self.stall_s:
            self.cut_off()
        else:
            self._arm()

    def _take_part(self, part: Part) -> None:
        """Queue `part` behind what is pending; its first run is written at once when nothing is
        ahead of it and the socket takes it without waiting."""
        if not self.framed:
            for m in part.messages:
                self.pending.append(m)
                self.pending_bytes += len(m)
            self.queued += part.count
            self._schedule()
            return
        runs = part.cached or part.runs()
        if not self.pending and (self.writer is None or self.writer.done()) and self._writable():
            self.ws.transport.write(runs[0])
            if len(runs) == 1:
                return
            runs = runs[1:]
        self.pending.extend(runs)
        self.pending_bytes += sum(len(r) for r in runs)
        self.queued += part.count
        self._schedule()

    def _admit(self) -> None:
        """Move the backlog's parts that fit now into `pending`, in order; then, if frames built
        for them (kept while other sockets of the class hold the parts) pass the service-wide
        budget, close the sockets holding the most backlog (maybe this one: callers check)."""
        self._move_fitting()
        budget = self.budget
        if budget is not None and budget.used > budget.most:
            budget.shed()

    def _move_fitting(self) -> None:
        backlog = self.backlog
        while backlog:
            part = backlog[0]
            if not self._fits(part.size):
                return
            backlog.popleft()
            self.backlog_count -= part.count
            self.backlog_bytes -= part.size
            runs = part.runs() if self.framed else None
            part.taken()
            if runs is None:
                for m in part.messages:
                    self.pending.append(m)
                    self.pending_bytes += len(m)
            else:
                self.pending.extend(runs)
                self.pending_bytes += sum(len(r) for r in runs)
            self.queued += part.count
            self.head_since = asyncio.get_running_loop().time()
        self._drop_backlog()  # (empty)

    def _drop_backlog(self) -> None:
        if self.backlog is not None:
            for part in self.backlog:
                part.taken()
            if self.budget is not None:
                self.budget.holders.discard(self)
        self.backlog = None
        self.backlog_count = self.backlog_bytes = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _writable(self) -> bool:
        ws = self.ws
        return self.framed and ws.protocol.state is State.OPEN and not ws.paused

    def _take(self) -> bytes | memoryview:
        """Whole frames from the head of `pending`, about WRITE_CHUNK of them (one run at least)."""
        pending = self.pending
        if len(pending) == 1:
            data = pending.popleft()
        else:
            parts = [pending.popleft()]
            size = len(parts[0])
            while pending and size + len(pending[0]) <= WRITE_CHUNK:
                part = pending.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts) if len(parts) > 1 else parts[0]
        self.pending_bytes -= len(data)
        if not pending:
            self.pending_bytes = 0
            self.queued = 0
        return data

    def flush(self) -> None:
        """Write what is pending now, in one write, if the socket takes it without waiting;
        else leave it to a writer task that waits for the socket (flow control)."""
        self.dirty = False
        if self.closed or not self.pending:
            return
        if self.writer is not None and not self.writer.done():
            return  # a writer is waiting for the socket: it sends these too, in order
        if self._writable():
            self.ws.transport.write(self._take())
            if not self.pending:
                return
        self.writer = asyncio.create_task(self._write())

    def cut_off(self) -> None:
        """Close a consumer that cannot keep up; others are not affected."""
        if self.closed:
            return
        self.closed = True
        CUT_OFF.inc()
        DROPPED.inc(amount=self.queued + self.backlog_count + 1)
        log.warning("closing slow consumer %s (queue full)", self.ws.remote_address)
        if self.writer is not None:
            self.writer.cancel()  # frames already written stay ahead of the close frame
        self.pending.clear()
        self.pending_bytes = 0
        self.queued = 0
        self._drop_backlog()
        task = asyncio.create_task(
            self.ws.close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and resume with since")
        )
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _wait(self) -> bool:
        """Wait while the socket's buffer is full (flow control); False once it is cut off (its
        backlog's head part waited STALL_S and still does not fit: `_deadline`)."""
        backlog = self.backlog
        if backlog and not self._fits(backlog[0].size):
            if asyncio.get_running_loop().time() >= self.head_since + self.stall_s:
                self.cut_off()
                return False
            if not self.pending and not self.ws.paused:
                await asyncio.sleep(0.005)  # the transport is sending what it holds: look again soon
                return True
        if self.ws.paused:
            await self.ws.drain()
        return True

    async def _write(self) -> None:
        # Single-threaded: between the last emptiness check and the task finishing there is no
        # await, so a push either lands before the check or sees a finished writer and starts one.
        ws = self.ws
        try:
            while True:
                if self.backlog:
                    self._admit()
                if self.closed:
                    return
                if not self.pending:
                    if not self.backlog:
                        return
                    if not await self._wait():
                        return
                    continue
                if not self.framed:
                    self.queued -= 1
                    message = self.pending.popleft()
                    self.pending_bytes -= len(message)
                    await ws.send(bytes(message), text=True)  # (raises once closed)
                    continue
                if ws.protocol.state is not State.OPEN:
                    # Closing: nothing more may follow the close frame (its handler ends it).
                    self.pending.clear()
                    self.pending_bytes = 0
                    self.queued = 0
                    self._drop_backlog()
                    return
                # Whole frames, in order, a run per write; frames the protocol itself sends (pong,
                # close) go between two writes, never inside a frame.
                ws.transport.write(self._take())
                if not await self._wait():
                    return
        except ConnectionClosed:
            pass

    async def stop(self) -> None:
        self.closed = True
        self.pending.clear()
        self.pending_bytes = 0
        self.queued = 0
        self._drop_backlog()
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.writer


# Events of one project waiting for its gate decisions; past this the project's gated
# subscribers are cut off (4008) rather than held in memory without bound.
MAX_GATED_PENDING = 20_000


@dataclass(eq=False)
class _Lane:
    """One project's gated batches, delivered in order by one task at a time."""

    batches: deque[tuple[list[OutboxEvent], dict[Subscription, Client]]] = field(default_factory=deque)
    size: int = 0
    task: asyncio.Task[None] | None = None


class Hub:
    """project id → subscriptions; `dispatch` sends each event's bytes to every matching socket.

    Subscribers without a viewer get the fast path: the same bytes, pushed as the batch is
    walked. End-user subscribers of a project are served by the project's lane, from one gate
    decision per batch and project, in event order, concurrently with other projects' lanes;
    without a gate they receive nothing (fail closed).
    """

    def __init__(self, gate: RlsGate | None = None) -> None:
        self.rooms: dict[str, dict[Subscription, Client]] = defaultdict(dict)
        self.delivered = 0
        self.gate = gate
        self._lanes: dict[str, _Lane] = {}
        # A class's batch reaches its sockets in parts of at most this many bytes (half the
        # per-socket bound: one part never cuts off a socket that holds nothing).
        self.part_bytes = DEFAULT_MAX_BYTES // 2

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
        by_project: dict[str, list[OutboxEvent]] = {}
        rooms = self.rooms
        for ev in events:
            if ev.project_id in rooms:
                by_project.setdefault(ev.project_id, []).append(ev)
        for project_id, evs in by_project.items():
            room = rooms.get(project_id)
            if not room:
                continue
            # The fast path: a socket with this one subscription, no replay running and no gate
            # gets its class's batch, selected and joined once per class.
            batches: dict[tuple[object, ...], tuple[list[Part], int]] = {}
            rest: list[tuple[Subscription, Client]] = []
            for sub, client in list(room.items()):
                if (
                    sub.held is not None
                    or sub.viewer is not None
                    or len(client.subs) != 1
                    or not client.framed
                ):
                    rest.append((sub, client))
                    continue
                key = sub.key
                batch = batches.get(key)
                if batch is None:
                    messages = [ev.message for ev in evs if sub.wants(ev)]
                    batch = batches[key] = (parts_of(messages, self.part_bytes), len(messages))
                if batch[1]:
                    for part in batch[0]:
                        client.send_part(part)
                    self.delivered += batch[1]
            if rest:
                self._dispatch_each(project_id, evs, rest, gated)
        for project_id, (pending, subs) in gated.items():
            self._enqueue_gated(project_id, pending, subs)

    def _dispatch_each(
        self,
        project_id: str,
        events: list[OutboxEvent],
        subs: list[tuple[Subscription, Client]],
        gated: dict[str, tuple[list[OutboxEvent], dict[Subscription, Client]]],
    ) -> None:
        """Event by event: replays in progress hold their events, end users' go to the gate,
        and a socket with several subscriptions gets one project's events in their order."""
        for ev in events:
            for sub, client in subs:
                if sub.held is not None:
                    sub.held.append(ev)
                    if len(sub.held) > client.queue_size:
                        client.cut_off()
                elif sub.viewer is not None:
                    if sub.wants(ev):
                        pending, waiting = gated.setdefault(project_id, ([], {}))
                        if not pending or pending[-1] is not ev:
                            pending.append(ev)
                        waiting[sub] = client
                elif sub.wants(ev):
                    client.push(ev.message)
                    self.delivered += 1

    def _enqueue_gated(
        self, project_id: str, events: list[OutboxEvent], subs: dict[Subscription, Client]
    ) -> None:
        """Hand a batch to its project's lane: each project's gate decisions run in a task of
        their own, one batch after another (so a socket gets a project's events in commit
        order), and a slow policy of one project delays no other project's events."""
        lane = self._lanes.get(project_id)
        if lane is None:
            lane = self._lanes[project_id] = _Lane()
        lane.batches.append((events, subs))
        lane.size += len(events)
        if lane.size > MAX_GATED_PENDING:
            # The project's checks cannot keep up: its gated subscribers are slow consumers
            # (they resume with `since`), and nothing more is held in memory for them.
            for _events, waiting in lane.batches:
                for client in waiting.values():
                    client.cut_off()
            lane.batches.clear()
            lane.size = 0
            return
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(project_id, lane))

    async def _run_lane(self, project_id: str, lane: _Lane) -> None:
        try:
            while lane.batches:
                events, subs = lane.batches.popleft()
                lane.size -= len(events)
                try:
                    await self._dispatch_gated(project_id, events, subs)
                except Exception:
                    log.exception("gated delivery failed for project %s (events withheld)", project_id)
        finally:
            lane.task = None
            if self._lanes.get(project_id) is lane and not lane.batches:
                del self._lanes[project_id]

    async def close(self) -> None:
        """Stop the lanes (the service is closing: what they held is resumed with `since`)."""
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        self._lanes.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch_gated(
        self, project_id: str, events: list[OutboxEvent], subs: dict[Subscription, Client]
    ) -> None:
        if self.gate is None:
            return
        viewers = {sub.viewer for sub in subs if sub.viewer is not None}
        allowed = await self.gate.decide(project_id, viewers, events)
        room = self.rooms.get(project_id, {})
        # As in dispatch: one batch per viewer and fan-out class for sockets with one
        # subscription, event by event for the others.
        batches: dict[tuple[object, ...], tuple[list[Part], int]] = {}
        rest: list[tuple[Subscription, Client]] = []
        for sub, client in subs.items():
            if sub.viewer is None or room.get(sub) is not client:
                continue  # left (or resubscribed) while the gate was deciding
            if len(client.subs) != 1 or not client.framed:
                rest.append((sub, client))
                continue
            key = (sub.viewer, sub.key)
            batch = batches.get(key)
            if batch is None:
                mine = allowed.get(sub.viewer, {})
                messages = [
                    message
                    for i, ev in enumerate(events)
                    if (message := mine.get(i)) is not None and sub.wants(ev)
                ]
                batch = batches[key] = (parts_of(messages, self.part_bytes), len(messages))
            if batch[1]:
                for part in batch[0]:
                    client.send_part(part)
                self.delivered += batch[1]
        for i, ev in enumerate(events):
            for sub, client in rest:
                if sub.viewer is None or not sub.wants(ev):
                    continue
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
