"""`POST /api/execute-sql` answered inside uvicorn's HTTP/1.1 protocol, without ASGI.

`fluxbase api` serves with `SqlHttpProtocol`, uvicorn's own httptools protocol (its parsing,
limits, keep-alive timeout, flow control, pipelining order, graceful drain) with one change: a
`POST /api/execute-sql` request whose body comes with a Content-Length is recognised when its
headers are complete and answered by the same code as the ASGI fast path
(`SqlFastPath.answer`: body decoding, key, origin, authorisation, rate limit, deadline,
envelope) from the parsed headers and body, its answer written as one `transport.write`. No
ASGI scope, receive/send closures, message dicts or per-request `asyncio.Event`; one task per
request (the database is awaited), started and tracked (drain on SIGTERM) as uvicorn tracks its
own.

What `RequestLog` does for every other request it does here too: the request id (the client's
valid `X-Request-Id` or a new one, answered as `X-Request-Id` and set for the request's log
lines), the request metrics (route `/api/execute-sql`) and the JSON log line. Anything it is
unsure of goes to ASGI unchanged: another route or method, a query string, `Transfer-Encoding`
(chunked bodies), an `Expect` header, an upgrade, uvicorn's `limit_concurrency`, a root
path, tracing on, or the terminal request log of `fluxbase dev`. A body past the 10 MB limit is
answered 413 at once and the connection closed.

Relies on uvicorn internals (`HttpToolsProtocol`'s per-request attributes, `_start_asgi_task`,
`on_response_complete`): pyproject pins uvicorn's minor version, and `tests/test_sql_protocol.py`
tests every behaviour taken over.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import operator
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from fluxbase import metrics
from fluxbase.errors import PayloadTooLarge
from fluxbase.http.edge import _JSON
from fluxbase.http.fastpath import MAX_BODY, PATH, SqlFastPath
from fluxbase.http.requestlog import (
    _PEEK,
    _PROJECT_IN_BODY,
    _VALID_ID,
    HTTP_IN_FLIGHT,
    HTTP_REQUESTS,
    HTTP_SECONDS,
    REQUEST_ID_KEY,
    RequestLog,
    new_request_id,
    request_log,
)
from fluxbase.logs import REQUEST_ID

_PATH = PATH.encode()
# Bounds uvicorn leaves open (hostile review 8): a header block still incomplete after this many
# bytes is answered 400 and the connection closed (nginx's default allows 4 buffers of 8 KiB); a request
# body that stops arriving for this long is answered 408 and the connection closed.
MAX_HEADER_BYTES = 256 * 1024
BODY_IDLE_S = 5.0
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_CORS = (b"access-control-allow-origin", b"*")
# The request metrics' label keys (fluxbase.metrics `inc_key`): by status, and the route's.
_REQUESTS_KEYS: dict[int, tuple[str, ...]] = {}
_ROUTE_KEY = ("POST", PATH)
_LATIN1 = itertools.repeat("latin-1")  # `map(str, names, _LATIN1)`: each name decoded, in C
_OWS = itertools.repeat(b" \t")
_NAME, _VALUE = operator.itemgetter(0), operator.itemgetter(1)
_HEADER_LINE = b"%s: %s\r\n".__mod__  # (name, value) -> its line
# The server's default headers (uvicorn replaces the list each second: its date) as one block,
# by the list they were built from.
_DEFAULTS: list[Any] = [None, b""]


def _default_headers(defaults: list[tuple[bytes, bytes]]) -> bytes:
    if defaults is not _DEFAULTS[0]:
        _DEFAULTS[:] = defaults, b"".join(b"%s: %s\r\n" % pair for pair in defaults)
    block: bytes = _DEFAULTS[1]
    return block


class _Tally:
    """The request metrics of this path between two flushes into the registry's: a request
    appends its status and duration and moves `live`, where four metric updates cost ~100
    bytecodes; `flush_metrics` adds them up in C before every scrape and once a second (a timer
    the first request starts), so a scrape, or a sibling worker reading the shared file a
    second later, sees every request answered."""

    __slots__ = ("flushed_live", "live", "loop", "seconds", "statuses")

    def __init__(self) -> None:
        self.live = 0  # requests of this path being answered now
        self.flushed_live = 0  # `live` as the in-flight gauge last got it
        self.statuses: list[int] = []
        self.seconds: list[float] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop the flush timer runs on


_TALLY = _Tally()  # (an instance: storing into a class's attributes costs its type caches)


def flush_metrics() -> None:
    """Add the tallied requests to the registry's metrics (route `/api/execute-sql`)."""
    statuses, seconds = _TALLY.statuses, _TALLY.seconds
    if statuses:
        _TALLY.statuses, _TALLY.seconds = [], []
        for status, n in collections.Counter(statuses).items():
            key = _REQUESTS_KEYS.get(status)
            if key is None:
                key = _REQUESTS_KEYS[status] = ("POST", PATH, str(status))
            HTTP_REQUESTS.inc_key(key, float(n))
        HTTP_SECONDS.observe_many(seconds, _ROUTE_KEY)
    live = _TALLY.live
    if live != _TALLY.flushed_live:
        HTTP_IN_FLIGHT.inc_key((), float(live - _TALLY.flushed_live))
        _TALLY.flushed_live = live


def _flush_every_second(loop: asyncio.AbstractEventLoop) -> None:
    flush_metrics()
    loop.call_later(1.0, _flush_every_second, loop)


metrics.REGISTRY.on_scrape(flush_metrics)


def _request_log_of(app: Any) -> RequestLog | None:
    """The RequestLog under uvicorn's wrappers (proxy headers, message logger), if any."""
    for _ in range(8):
        if isinstance(app, RequestLog):
            return app
        app = getattr(app, "app", None)
    return None


_STALLED = object()


def _time_out(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_STALLED)


class _SqlCycle:
    """One execute-sql request on a connection, in the place of uvicorn's RequestResponseCycle
    (the protocol reads and sets the same attributes: body, more_body, response_complete,
    disconnected, keep_alive, message_event.set())."""

    # Defaults as class attributes (an instance sets what changes): fewer stores per request.
    more_body = True
    too_large = False
    response_complete = False
    disconnected = False
    waiter: asyncio.Future[object] | None = None

    def __init__(
        self, proto: SqlHttpProtocol, fast: SqlFastPath, headers: dict[str, str], keep_alive: bool
    ) -> None:
        self.proto = proto
        self.fast = fast
        self.json_log = proto.json_log
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = bytearray()

    @property
    def message_event(self) -> _SqlCycle:
        return self

    def set(self) -> None:
        """More of the request arrived (or the client left): wake the task waiting for it."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run_asgi(self, _app: object) -> None:
        """Answer the request (the name is the one uvicorn's task starter calls)."""
        proto = self.proto
        while self.more_body and not self.too_large and not self.disconnected:
            proto.flow.resume_reading()  # a pipelined request's reading was paused
            self.waiter = waiter = proto.loop.create_future()
            timer = proto.loop.call_later(BODY_IDLE_S, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
            self.waiter = None
            if waiter.result() is _STALLED and self.more_body and not self.disconnected:
                # The body stopped arriving: unauthenticated, it holds the connection and up to
                # MAX_BODY of buffer; answer 408 and close.
                self.response_complete = True
                proto.transport.write(_TIMED_OUT)
                proto.transport.close()
                return
        if self.disconnected:
            return
        headers = self.headers
        given = headers.get("x-request-id")
        rid = given if given is not None and _VALID_ID.fullmatch(given) else new_request_id()
        token = REQUEST_ID.set(rid)
        _TALLY.live += 1
        started = time.perf_counter()
        status = 500
        written = False
        try:
            if self.too_large:
                exc = PayloadTooLarge("The request body is too large.")
                status, extra, content = (
                    exc.status,
                    [_CORS] if "origin" in headers else [],
                    _JSON.encode(exc.body()),
                )
                self.keep_alive = False  # the rest of the body is not read
            else:
                status, extra, content = await self.fast.answer(
                    headers, bytes(self.body), {REQUEST_ID_KEY: rid}
                )
            if proto.flow.write_paused and not self.disconnected:
                await proto.flow.drain()
            if not self.disconnected:
                out = [
                    STATUS_LINE[status],
                    _default_headers(proto.server_state.default_headers),
                    b"content-type: application/json\r\ncontent-length: %d\r\n" % len(content),
                ]
                out += map(_HEADER_LINE, extra)
                out += (b"x-request-id: ", rid.encode(), b"\r\n")
                if not self.keep_alive:
                    out.append(b"connection: close\r\n")
                out += (b"\r\n", content)
                proto.transport.write(b"".join(out))
                written = True
        finally:
            seconds = time.perf_counter() - started
            _TALLY.live -= 1
            _TALLY.statuses.append(status)
            _TALLY.seconds.append(seconds)
            if self.json_log:
                m = _PROJECT_IN_BODY.search(self.body, 0, _PEEK)
                request_log.info(
                    "request",
                    extra={
                        "method": "POST",
                        "route": PATH,
                        "status": status,
                        "durationMs": round(seconds * 1000, 3),
                        "project": m.group(1).decode() if m else None,
                    },
                )
            REQUEST_ID.reset(token)
            self.response_complete = True
            if not written or not self.keep_alive:
                proto.transport.close()
            if written:
                proto.on_response_complete()


class SqlHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering execute-sql itself (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        log = _request_log_of(self.app)
        self.fast: SqlFastPath | None = log.fast if log is not None else None
        self.json_log = log.json_log if log is not None else False
        self._headers_pending = False
        self._header_bytes = 0
        self._idle_at: float | None = None  # loop time of the last answer, None while busy
        if self.fast is not None and _TALLY.loop is not self.loop:  # the metrics' flush (_Tally)
            _TALLY.loop = self.loop
            self.loop.call_later(1.0, _flush_every_second, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        timer = self.timeout_keep_alive_task
        if timer is not None:
            self.timeout_keep_alive_task = None
            timer.cancel()

    # The keep-alive timeout, as uvicorn's (the connection closes `timeout_keep_alive` seconds
    # after its last answer unless more data came), with one timer per connection instead of
    # one armed at every answer and cancelled at the next request's first bytes (a timer handle
    # made and cancelled per request): an answer notes the time, arriving data marks the
    # connection busy, and the timer, when it fires, closes an idle connection or waits on.

    def _unset_keepalive_if_required(self) -> None:
        self._idle_at = None  # data arrived: busy until its answer (the timer lets it be)

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive timer above."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self._idle_at = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        loop = self.loop
        self._idle_at = loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = loop.call_later(self.timeout_keep_alive, self._keep_alive_due)

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        idle_at = self._idle_at
        if idle_at is None or self.transport.is_closing():
            return  # busy: its answer arms the timer again
        left = idle_at + self.timeout_keep_alive - self.loop.time()
        if left > 0.001:  # (within uvloop's millisecond it is due: waiting on would spin)
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._headers_pending:  # this request's header block is still incomplete
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self.send_400_response("The request headers are too large.")

    def on_message_begin(self) -> None:
        """uvicorn's, but the ASGI scope is built only for a request that goes to ASGI
        (`_asgi_headers_complete`): the fast path never reads it."""
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._headers_pending = True
        self._header_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        """uvicorn's, with its per-header work (lower-case name, value without trailing
        whitespace, the Expect check) done for the whole block in `on_headers_complete`."""
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_pending = False
        fast = self.fast
        parser = self.parser
        if (
            fast is None
            or self.url != _PATH
            or parser.get_method() != b"POST"
            or parser.should_upgrade()
            or self.root_path
            or self.limit_concurrency is not None
        ):
            self._asgi_headers_complete()
            return
        raw = self.headers
        # uvicorn's on_header work (lower-case names, no trailing whitespace), in C over the
        # block; a repeated name: its last value, as before.
        headers = dict(
            zip(
                map(str, map(bytes.lower, map(_NAME, raw)), _LATIN1),
                map(str, map(bytes.rstrip, map(_VALUE, raw), _OWS), _LATIN1),
                strict=True,
            )
        )
        if "transfer-encoding" in headers or "expect" in headers:
            self._asgi_headers_complete()
            return
        cycle = _SqlCycle(
            self, fast, headers, parser.get_http_version() != "1.0" and parser.should_keep_alive()
        )
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, None)  # type: ignore[arg-type]
        else:  # pipelined: answered in order, after the one before it
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]

    def _asgi_headers_complete(self) -> None:
        """The request goes to ASGI: uvicorn's on_header work and its scope first."""
        raw = self.headers = [(name.lower(), value.rstrip(b" \t")) for name, value in self.headers]
        self.expect_100_continue = any(n == b"expect" and v.lower() == b"100-continue" for n, v in raw)
        self.scope = {  # type: ignore[typeddict-item]  # uvicorn's on_message_begin's
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": raw,
            "state": self.app_state.copy(),
        }
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is not _SqlCycle:
            super().on_body(body)
            return
        if cycle.response_complete or cycle.too_large:
            return
        if len(cycle.body) + len(body) > MAX_BODY:
            cycle.too_large = True
            cycle.body = bytearray()
            cycle.set()
            return
        cycle.body += body
