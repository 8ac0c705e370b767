"""The outermost ASGI wrapper of the API: request ids, request metrics, /metrics and request logs.

Every request gets an id — the client's `X-Request-Id` when it is printable ASCII of at most
128 characters, else a new one — returned as `X-Request-Id` and set in `fluxbase.logs.REQUEST_ID`
for every log line the request causes. Each request counts into `fluxbase_http_requests_total`
and a latency histogram by method, route template (never the raw path) and status.
`GET /metrics` answers the process's metrics (see fluxbase.metrics for who may read them).
With FLUXBASE_LOG_FORMAT=json, one JSON line per request (logger `fluxbase.request`).

One line per request on a terminal (`fluxbase api --request-log`, as `fluxbase dev` runs it):

    08:03:16 POST /api/execute-sql 200 3ms project=51c04beb753a42f3 req_1a2b3c4d5e6f
    08:03:17 GET /api/projects/51c0… 401 1ms - req_9f8e7d6c5b4a AUTH_REQUIRED: API key is not valid.

Method, path (never the query string: tokens travel there), status, milliseconds, project and a
request id, which every answer carries as `X-Request-Id` and the error logs of the API repeat;
an error answer (any status ≥ 400, or an SQL error's 200 with `success: false`) adds its code
and message. Coloured by status when the output is a terminal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TextIO
from urllib.parse import parse_qs

import msgspec

from fluxbase import metrics
from fluxbase.logs import REQUEST_ID

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

REQUEST_ID_KEY = "fluxbase.request_id"
_PROJECT_IN_PATH = re.compile(r"/api/projects/([0-9a-f]{16})(?:/|$)")
_PROJECT_IN_BODY = re.compile(rb'"projectId"\s*:\s*"([0-9a-f]{16})"')
_PEEK = 64 * 1024  # bytes of a request or error body looked at, at most
_COLOURS = {2: "\033[32m", 3: "\033[36m", 4: "\033[33m", 5: "\033[31m"}
_DIM, _RESET = "\033[2m", "\033[0m"


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_VALID_ID = re.compile(r"[\x20-\x7e]{1,128}")
HTTP_REQUESTS = metrics.REGISTRY.counter(
    "fluxbase_http_requests_total",
    "HTTP requests answered, by method, route template and status.",
    ("method", "route", "status"),
)
HTTP_SECONDS = metrics.REGISTRY.histogram(
    "fluxbase_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ("method", "route"),
)
HTTP_IN_FLIGHT = metrics.REGISTRY.gauge(
    "fluxbase_http_requests_in_flight", "HTTP requests being answered now."
)
request_log = logging.getLogger("fluxbase.request")


# Request ids name a request in logs and answers; nothing depends on their being unguessable
# (the client may choose its own). A process-local generator seeded from os.urandom: no
# getrandom syscall per request, as secrets.token_hex had. Same shape: `req_` + 12 hex digits.
_ids = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(16)))  # forked workers differ


def new_request_id() -> str:
    return f"req_{_ids.getrandbits(48):012x}"


def request_id(scope: Any) -> str:
    """The id of the request in this scope ('-' outside the request log)."""
    return str(scope.get(REQUEST_ID_KEY, "-"))


class RequestLog:
    """ASGI wrapper: request id, metrics, /metrics; a terminal line per request when `terminal`,
    a JSON log line when `json_log`."""

    def __init__(
        self,
        app: Any,
        out: TextIO | None = None,
        colour: bool | None = None,
        *,
        terminal: bool = True,
        json_log: bool = False,
        metrics_token: str = "",
    ):
        self.app = app
        self.out = out or sys.stderr
        self.colour = self.out.isatty() if colour is None else colour
        self.terminal = terminal
        self.json_log = json_log
        self.metrics_token = metrics_token
        self._refresher: asyncio.Task[None] | None = None
        # The SQL fast path the HTTP protocol may call directly (fluxbase.http.protocol): set by
        # the factory when nothing between this wrapper and it needs to see the request.
        self.fast: Any = None

    @property
    def state(self) -> Any:  # the wrapped app's state, for code that reaches through
        return self.app.state

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._refresher is None and metrics.REGISTRY.shared:
            # Siblings answer scrapes with this process's collected gauges: keep them fresh.
            self._refresher = asyncio.get_running_loop().create_task(metrics.REGISTRY.refresh_forever())
        if scope.get("path") == "/metrics" and scope.get("method") in ("GET", "HEAD"):
            await self._metrics(scope, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given is not None and _VALID_ID.fullmatch(given) else new_request_id()
        scope[REQUEST_ID_KEY] = rid
        rid_header = rid.encode()
        token = REQUEST_ID.set(rid)
        HTTP_IN_FLIGHT.inc()
        started = time.perf_counter()
        logged = self.terminal or self.json_log  # else: no project, no peeking (the hot path)
        project = _project_of(scope) if logged else None
        head = bytearray()
        status = 0
        error_body = bytearray()
        json_answer = False

        async def receive_peek() -> Message:
            message: Message = await receive()
            if project is None and message["type"] == "http.request" and len(head) < _PEEK:
                head.extend(message.get("body", b"")[: _PEEK - len(head)])
            return message

        async def send_peek(message: Message) -> None:
            nonlocal status, json_answer
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = message.get("headers", ())
                if not isinstance(headers, (list, tuple)):
                    headers = list(headers)  # any iterable, read twice below
                json_answer = self.terminal and any(
                    k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers
                )
                # one new list: the app's headers but any X-Request-Id of its own, then ours
                message["headers"] = [h for h in headers if h[0].lower() != b"x-request-id"]
                message["headers"].append((b"x-request-id", rid_header))
            elif message["type"] == "http.response.body" and json_answer and len(error_body) < _PEEK:
                error_body.extend(message.get("body", b"")[: _PEEK - len(error_body)])
            await send(message)

        try:
            await self.app(scope, receive_peek if logged else receive, send_peek)
        finally:
            if logged and project is None:
                m = _PROJECT_IN_BODY.search(head)
                project = m.group(1).decode() if m else None
            seconds = time.perf_counter() - started
            method = str(scope.get("method", "?"))
            method = method if method in _METHODS else "OTHER"
            route = str(scope.get("path_template") or "") or "unmatched"
            HTTP_IN_FLIGHT.inc(amount=-1)
            HTTP_REQUESTS.inc(method, route, str(status or 500))
            HTTP_SECONDS.observe(seconds, method, route)
            if self.json_log:
                request_log.info(
                    "request",
                    extra={
                        "method": method,
                        "route": route,
                        "status": status or 500,
                        "durationMs": round(seconds * 1000, 3),
                        "project": project,
                    },
                )
            if self.terminal:
                self._write(scope, status or 500, seconds * 1000, project, rid, _error_of(bytes(error_body)))
            REQUEST_ID.reset(token)

    async def _metrics(self, scope: Scope, send: Any) -> None:
        client = scope.get("client")
        host = client[0] if client else None
        proxied = any(_header(scope, h.encode()) is not None for h in metrics.PROXY_HEADERS)
        if not metrics.allowed(self.metrics_token, _header(scope, b"authorization"), host, proxied):
            body, status, ctype = metrics.DENIED, 401, b"application/json"
        else:
            body, status, ctype = await metrics.REGISTRY.render(), 200, metrics.CONTENT_TYPE.encode()
        headers = [
            (b"content-type", ctype),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope.get("method") == "GET" else b""})

    def _write(
        self, scope: Scope, status: int, ms: float, project: str | None, rid: str, error: str | None
    ) -> None:
        clock = time.strftime("%H:%M:%S")
        status_text = str(status)
        if self.colour:
            status_text = f"{_COLOURS.get(status // 100, '')}{status}{_RESET}"
            clock = f"{_DIM}{clock}{_RESET}"
        line = (
            f"{clock} {scope.get('method', '?')} {scope.get('path', '?')} {status_text} {ms:.0f}ms "
            f"project={project or '-'} {rid}"
        )
        if error:
            line += f" {_COLOURS[5] if self.colour else ''}{error}{_RESET if self.colour else ''}"
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not fail the request


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _project_of(scope: Scope) -> str | None:
    m = _PROJECT_IN_PATH.search(str(scope.get("path", "")))
    if m:
        return m.group(1)
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    for value in query.get("projectId", []):
        if re.fullmatch(r"[0-9a-f]{16}", value):
            return value
    return None


def _error_of(body: bytes) -> str | None:
    """`CODE: message` of an error envelope, else None."""
    if not body.startswith(b"{") or b'"success":false' not in body.replace(b" ", b""):
        return None
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return None
    message = " ".join(str(err.get("message", "")).split())
    return f"{err.get('code', 'ERROR')}: {message[:300]}"
