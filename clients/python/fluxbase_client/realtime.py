"""Realtime: one WebSocket, heartbeats, reconnection with backoff and jitter, and resume by cursor.

Exactly once, in commit order, across any number of reconnects: the channel remembers the
`cursor` of the last event it delivered (or, before the first event, the one `subscribed`
answered) and subscribes again with `since` set to it; the server replays what was missed and
then continues live. Anything at or before the remembered cursor is dropped, so even a server
that sent an event twice could not make the app see it twice. `resync_required` (the cursor is
older than the server keeps) is delivered as an event: reload your state, then go on.

Row filters (`filters={"todos": {"column": "owner", "op": "eq", "value": "u1"}}`) narrow what
the server sends; topics (`subscribe(topic="chat")`) are rooms inside the project for broadcasts
and presence: `channel.track(state)`, `channel.untrack()`, `channel.presence` (key → state), and
`presence_state` / `presence_diff` events. A tracked state is tracked again after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from fluxbase_client.errors import FluxbaseError

log = logging.getLogger("fluxbase_client.realtime")

# A subscription refused for one of these reasons is not retried on its own: the credential or
# the request has to change first (the app sees the error event).
FATAL_CODES = frozenset(
    {
        "AUTH_REQUIRED",
        "TOKEN_EXPIRED",
        "SCOPE_MISMATCH",
        "PROJECT_SUSPENDED",
        "PROJECT_NOT_FOUND",
        "INSUFFICIENT_PERMISSIONS",
        "INVALID_USER_TOKEN",
        "USER_DISABLED",
        "USER_TOKEN_REQUIRED",
        "VALIDATION_ERROR",
        "CONFLICT",  # presence: the topic is full
        "PAYLOAD_TOO_LARGE",  # presence: the state is too large
    }
)
EVENT_TYPES = frozenset({"db_event", "schema_update", "broadcast"})
PRESENCE_TYPES = frozenset({"presence_state", "presence_diff"})


def cursor_key(cursor: str) -> tuple[int, int]:
    xid, _, ident = cursor.partition(":")
    return int(xid), int(ident)


class Channel:
    """The subscription to one project: iterate it (`async for event in channel`) or pass
    `on_event`. Events are the server's messages (db_event, schema_update, broadcast,
    resync_required, error), each delivered once."""

    def __init__(
        self,
        rt: Realtime,
        room: str,
        tables: list[str] | None,
        operations: list[str] | None,
        since: str | None,
        on_event: Callable[[dict[str, Any]], Any] | None,
        filters: dict[str, dict[str, Any]] | None = None,
    ):
        self.rt = rt
        self.room = room
        self.tables = tables
        self.operations = operations
        self.filters = filters
        # Presence (topics only): the members as the server last described them, this socket's
        # own tracked state (tracked again after a reconnect) and the answer a track waits for.
        self.presence: dict[str, Any] = {}
        self.presence_key: str | None = None
        self._tracked: Any = None
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self.cursor: str | None = since
        self._last: tuple[int, int] | None = cursor_key(since) if since else None
        self.on_event = on_event
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.subscribed = asyncio.Event()
        self.error: dict[str, Any] | None = None
        self.duplicates_dropped = 0
        self.closed = False

    def _subscribe_message(self, token: str) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "subscribe", "roomId": self.room}
        if token:
            msg["token"] = token
        if self.cursor is not None:
            msg["since"] = self.cursor
        if self.tables is not None:
            msg["tables"] = self.tables
        if self.operations is not None:
            msg["operations"] = self.operations
        if self.filters is not None:
            msg["filters"] = self.filters
        return msg

    async def _deliver(self, msg: dict[str, Any]) -> None:
        if self.on_event is not None:
            out = self.on_event(msg)
            if inspect.isawaitable(out):
                await out
        self.queue.put_nowait(msg)

    async def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if (
            self._pending is not None
            and not self._pending.done()
            and kind in ("tracked", "untracked", "error")
        ):
            # The answer to track()/untrack() (the server answers a room's requests in order).
            if kind != "error" or self.subscribed.is_set():
                self._pending.set_result(msg)
                return
        if kind in PRESENCE_TYPES:
            payload = msg.get("payload") or {}
            if kind == "presence_state":
                self.presence = dict(payload)
            else:
                for key in payload.get("leaves") or {}:
                    self.presence.pop(key, None)
                self.presence.update(payload.get("joins") or {})
            await self._deliver(msg)
            return
        if kind == "subscribed":
            if self.cursor is None and isinstance(msg.get("cursor"), str):
                # Nothing seen yet: resume from where live delivery began.
                self.cursor = msg["cursor"]
                self._last = cursor_key(msg["cursor"])
            self.error = None
            self.subscribed.set()
        elif kind in EVENT_TYPES:
            cur = msg.get("cursor")
            if isinstance(cur, str):
                key = cursor_key(cur)
                if self._last is not None and key <= self._last:
                    self.duplicates_dropped += 1
                    return
                self._last, self.cursor = key, cur
            await self._deliver(msg)
        elif kind == "resync_required":
            if isinstance(msg.get("cursor"), str):
                self.cursor = msg["cursor"]
                self._last = cursor_key(msg["cursor"])
            await self._deliver(msg)
        elif kind == "error":
            self.error = msg
            self.subscribed.clear()
            await self._deliver(msg)

    async def next(self, timeout: float | None = None) -> dict[str, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any]]:
        while not self.closed or not self.queue.empty():
            yield await self.queue.get()

    async def broadcast(self, event: str, payload: Any = None) -> None:
        """Broadcast over the socket (needs scope readwrite or admin)."""
        await self.rt._send({"type": "broadcast", "roomId": self.room, "event": event, "payload": payload})

    async def _request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self._pending = asyncio.get_running_loop().create_future()
        try:
            await self.rt._send(msg)
            answer = await asyncio.wait_for(self._pending, timeout)
        finally:
            self._pending = None
        if answer.get("type") == "error":
            err = answer.get("error") or {}
            raise FluxbaseError(0, str(err.get("code")), str(err.get("message")), body=answer)
        return answer

    async def track(self, state: dict[str, Any], timeout: float = 10.0) -> str:
        """Track this connection in the topic with `state` (a small JSON object); returns the
        member key. Tracking again replaces the state."""
        answer = await self._request({"type": "track", "roomId": self.room, "payload": state}, timeout)
        self._tracked = state
        self.presence_key = str(answer.get("key"))
        return self.presence_key

    async def untrack(self, timeout: float = 10.0) -> None:
        self._tracked = None
        await self._request({"type": "untrack", "roomId": self.room}, timeout)
        self.presence_key = None

    async def unsubscribe(self) -> None:
        self.closed = True
        self.rt.channels.pop(self.room, None)
        with contextlib.suppress(ConnectionError, ConnectionClosed):
            await self.rt._send({"type": "unsubscribe", "roomId": self.room})


class Realtime:
    """A self-healing realtime connection for one project."""

    def __init__(
        self,
        url: str,
        project_id: str,
        credential: Callable[[], Awaitable[str]],
        *,
        heartbeat_s: float = 15.0,
        heartbeat_timeout_s: float = 10.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 15.0,
        open_timeout_s: float = 5.0,
        on_status: Callable[[str], Any] | None = None,
    ):
        self.url = url
        self.project_id = project_id
        self.credential = credential
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.open_timeout_s = open_timeout_s
        self.on_status = on_status
        self.channels: dict[str, Channel] = {}
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._token = ""

    async def __aenter__(self) -> Realtime:
        self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def subscribe(
        self,
        *,
        tables: Iterable[str] | None = None,
        operations: Iterable[str] | None = None,
        since: str | None = None,
        on_event: Callable[[dict[str, Any]], Any] | None = None,
        wait: bool = True,
        timeout: float = 10.0,
        filters: dict[str, dict[str, Any]] | None = None,
        topic: str | None = None,
    ) -> Channel:
        """Subscribe to the project (optionally only some tables or operations, and rows
        matching `filters`; `since` resumes after a cursor saved earlier), or with `topic` to
        that topic's room. Waits for `subscribed` unless `wait` is False."""
        room = f"project_{self.project_id}" + (f":{topic}" if topic is not None else "")
        ch = Channel(
            self,
            room,
            list(tables) if tables is not None else None,
            [o.upper() for o in operations] if operations is not None else None,
            since,
            on_event,
            filters,
        )
        self.channels[room] = ch
        self.start()
        if self._ws is not None and self.connected.is_set():
            with contextlib.suppress(ConnectionError, ConnectionClosed):
                await self._send(ch._subscribe_message(self._token))
        if wait:
            waiter = asyncio.create_task(ch.subscribed.wait())
            failed = asyncio.create_task(_until(lambda: ch.error is not None))
            try:
                done, _ = await asyncio.wait({waiter, failed}, timeout=timeout, return_when="FIRST_COMPLETED")
            finally:
                waiter.cancel()
                failed.cancel()
            if ch.error is not None:
                err = ch.error.get("error") or {}
                raise FluxbaseError(0, str(err.get("code")), str(err.get("message")), body=ch.error)
            if not done:
                raise TimeoutError("no `subscribed` from the realtime service")
        return ch

    async def close(self) -> None:
        self._closing = True
        for ch in self.channels.values():
            ch.closed = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def disconnect(self) -> None:
        """Drop the current socket (it reconnects and resumes): for tests and network changes."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.transport.abort()

    async def _send(self, msg: dict[str, Any]) -> None:
        if self._ws is None:
            raise ConnectionError("not connected")
        await self._ws.send(json.dumps(msg))

    def _status(self, status: str) -> None:
        if self.on_status is not None:
            with contextlib.suppress(Exception):
                self.on_status(status)

    def _backoff(self, attempt: int) -> float:
        # Exponential with "equal jitter": never zero (no reconnect storm), never in lockstep.
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                self._token = await self.credential()
                async with connect(
                    self.url,
                    open_timeout=self.open_timeout_s,
                    max_size=16 << 20,
                    max_queue=None,
                    ping_interval=None,  # application-level pings below work through any proxy
                ) as ws:
                    self._ws = ws
                    self.connected.set()
                    self._status("connected")
                    for ch in list(self.channels.values()):
                        if ch.error is None or ch.error.get("error", {}).get("code") not in FATAL_CODES:
                            await self._send(ch._subscribe_message(self._token))
                    if await self._read(ws):
                        attempt = 0
            except asyncio.CancelledError:
                raise
            except (OSError, ConnectionClosed, InvalidHandshake, InvalidURI, TimeoutError) as exc:
                log.info("realtime connection lost: %r", exc)
            except Exception:
                log.exception("realtime connection failed")
            finally:
                self._ws = None
                self.connected.clear()
                for ch in self.channels.values():
                    ch.subscribed.clear()
            if self._closing:
                break
            self._status("disconnected")
            self.reconnects += 1
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    async def _read(self, ws: ClientConnection) -> bool:
        """Read until the socket fails; True when a subscription was confirmed on it."""
        confirmed = False
        last_rx = time.monotonic()
        next_ping = last_rx + self.heartbeat_s
        while True:
            now = time.monotonic()
            if now - last_rx > self.heartbeat_s + self.heartbeat_timeout_s:
                log.info("realtime heartbeat missed; reconnecting")
                ws.transport.abort()
                return confirmed
            if now >= next_ping:
                await ws.send('{"type":"ping"}')
                next_ping = now + self.heartbeat_s
            try:
                raw = await asyncio.wait_for(
                    ws.recv(),
                    max(0.05, min(next_ping, last_rx + self.heartbeat_s + self.heartbeat_timeout_s) - now),
                )
            except TimeoutError:
                continue
            last_rx = time.monotonic()
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            ch = self.channels.get(str(msg.get("roomId")))
            if ch is None:
                if msg.get("type") == "error":
                    log.warning("realtime error: %s", msg.get("error"))
                continue
            if msg.get("type") == "subscribed":
                confirmed = True
                if ch._tracked is not None:
                    # Presence does not survive the old socket: track the same state again.
                    await ws.send(json.dumps({"type": "track", "roomId": ch.room, "payload": ch._tracked}))
            if msg.get("type") == "tracked" and (ch._pending is None or ch._pending.done()):
                ch.presence_key = str(msg.get("key"))
                continue
            if msg.get("type") == "error" and ch._pending is not None and not ch._pending.done():
                await ch._handle(msg)
                continue
            if msg.get("type") == "error":
                code = (msg.get("error") or {}).get("code")
                if code not in FATAL_CODES:
                    # Transient (a database hiccup): deliver it, then reconnect and resume.
                    await ch._handle(msg)
                    ch.error = None
                    ws.transport.abort()
                    return confirmed
            await ch._handle(msg)


async def _until(pred: Callable[[], bool]) -> None:
    while not pred():
        await asyncio.sleep(0.02)


def with_token(url: str, token: str) -> str:
    """`url` with `?token=` (for runtimes that cannot send the token in the subscribe message)."""
    parts = urlsplit(url)
    query = (parts.query + "&" if parts.query else "") + urlencode({"token": token})
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, parts.fragment))
