"""One line per request on a terminal (`fluxbase api --request-log`, as `fluxbase dev` runs it).

    08:03:16 POST /api/execute-sql 200 3ms project=51c04beb753a42f3 req_1a2b3c4d5e6f
    08:03:17 GET /api/projects/51c0… 401 1ms - req_9f8e7d6c5b4a AUTH_REQUIRED: API key is not valid.

Method, path (never the query string: tokens travel there), status, milliseconds, project and a
request id, which every answer carries as `X-Request-Id` and the error logs of the API repeat;
an error answer (any status ≥ 400, or an SQL error's 200 with `success: false`) adds its code
and message. Coloured by status when the output is a terminal.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TextIO
from urllib.parse import parse_qs

import msgspec

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


def request_id(scope: Any) -> str:
    """The id of the request in this scope ('-' outside the request log)."""
    return str(scope.get(REQUEST_ID_KEY, "-"))


class RequestLog:
    """ASGI wrapper that writes one line per HTTP request to `out`."""

    def __init__(self, app: Any, out: TextIO | None = None, colour: bool | None = None):
        self.app = app
        self.out = out or sys.stderr
        self.colour = self.out.isatty() if colour is None else colour

    @property
    def state(self) -> Any:  # the wrapped app's state, for code that reaches through
        return self.app.state

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req_" + secrets.token_hex(6)
        scope[REQUEST_ID_KEY] = rid
        started = time.perf_counter()
        project = _project_of(scope)
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
                headers = list(message.get("headers", ()))
                json_answer = any(
                    k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers
                )
                message["headers"] = [*headers, (b"x-request-id", rid.encode())]
            elif message["type"] == "http.response.body" and json_answer and len(error_body) < _PEEK:
                error_body.extend(message.get("body", b"")[: _PEEK - len(error_body)])
            await send(message)

        try:
            await self.app(scope, receive_peek, send_peek)
        finally:
            if project is None:
                m = _PROJECT_IN_BODY.search(head)
                project = m.group(1).decode() if m else None
            ms = (time.perf_counter() - started) * 1000
            self._write(scope, status or 500, ms, project, rid, _error_of(bytes(error_body)))

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
