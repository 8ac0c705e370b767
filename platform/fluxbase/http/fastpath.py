"""`POST /api/execute-sql` straight from ASGI, ahead of Litestar's per-request machinery.

The hottest route does its own work (body, key, authorisation, SQL) and builds its answer from
bytes; routing, middleware, dependency injection and response objects cost more than the rest
of the Python side together. Everything else — including OPTIONS preflights and the route's
OpenAPI entry — stays with Litestar. The answers are the same: the same handler code
(`run_execute_sql`), the same error envelope, `access-control-allow-origin: *` as the CORS
config sends, 413 past Litestar's body limit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from litestar import Litestar

from fluxbase.errors import DatabaseUnavailable, FluxbaseError, InternalError, PayloadTooLarge
from fluxbase.http.context import AppContext
from fluxbase.http.controllers.sql import run_execute_sql
from fluxbase.http.edge import _JSON, DB_UNAVAILABLE, QUOTA_SCOPE_KEY
from fluxbase.http.requestlog import request_id
from fluxbase.ratelimit import Quota

log = logging.getLogger("fluxbase.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PATH = "/api/execute-sql"
MAX_BODY = 10_000_000  # Litestar's request_max_body_size default, which the other routes use


class _Headers(dict[str, str]):
    """Lower-case header names, as Litestar's `request.headers.get` sees them."""


class _Request:
    """What the SQL handler reads from a request (and the scope it leaves the quota in)."""

    __slots__ = ("_body", "headers", "scope")

    def __init__(self, headers: dict[str, str], body: bytes, scope: Scope):
        self.headers = headers
        self._body = body
        self.scope = scope

    async def body(self) -> bytes:
        return self._body


class SqlFastPath:
    def __init__(self, app: Litestar):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            if scope["type"] != "http":
                await self.app(scope, receive, send)  # type: ignore[arg-type]
                return

            async def send_with_quota(message: MutableMapping[str, Any]) -> None:
                quota = scope.get(QUOTA_SCOPE_KEY)
                if message["type"] == "http.response.start" and quota is not None:
                    have = {k.lower() for k, _ in message.get("headers", ())}
                    message["headers"] = [
                        *message.get("headers", ()),
                        *_quota_headers(quota, have),
                    ]
                await send(message)

            await self.app(scope, receive, send_with_quota)  # type: ignore[arg-type]
            return
        scope["path_template"] = PATH  # the route label of the request metrics
        headers = _Headers((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])
        try:
            body = await _read_body(receive)
        except PayloadTooLarge as exc:
            status, response, content = exc.status, [], _JSON.encode(exc.body())
            if "origin" in headers:
                response.append((b"access-control-allow-origin", b"*"))
        else:
            status, response, content = await self.answer(headers, body, scope)
        response[:0] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": response})
        await send({"type": "http.response.body", "body": content})

    async def answer(
        self, headers: dict[str, str], body: bytes, scope: Scope
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers other than content-type/-length, body) of one execute-sql request:
        the ASGI path above and the HTTP protocol's (fluxbase.http.protocol) share it."""
        ctx: AppContext = self.app.state.ctx
        extra: list[tuple[bytes, bytes]] = []
        try:
            content, status = await run_execute_sql(_Request(headers, body, scope), ctx), 200  # type: ignore[arg-type]
        except FluxbaseError as exc:
            content, status = _JSON.encode(exc.body()), exc.status
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        except Exception as exc:
            if isinstance(exc, (*DB_UNAVAILABLE, TimeoutError)):
                log.warning("database unavailable on POST %s (%s): %r", PATH, request_id(scope), exc)
                err: FluxbaseError = DatabaseUnavailable()
            else:
                log.exception("unexpected error on POST %s (%s)", PATH, request_id(scope), exc_info=exc)
                err = InternalError()
            content, status = _JSON.encode(err.body()), err.status
        quota = scope.get(QUOTA_SCOPE_KEY)
        if quota is not None:
            if extra:  # an error's own headers (a 429 brings X-RateLimit-* itself)
                extra.extend(_quota_headers(quota, {k for k, _ in extra}))
            else:
                extra = quota.raw_headers()
        if "origin" in headers:
            extra.append((b"access-control-allow-origin", b"*"))
        return status, extra, content


def _quota_headers(quota: Quota, have: set[bytes]) -> list[tuple[bytes, bytes]]:
    """X-RateLimit-* for an answer that does not carry them yet (a 429 brings its own)."""
    return [
        (k.lower().encode(), v.encode()) for k, v in quota.headers().items() if k.lower().encode() not in have
    ]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge("The request body is too large.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
