"""The HTTP edge: error rendering (once, for every error) and caller resolution.

No stack trace, SQL text or secret reaches a response: unexpected errors are logged with
their cause and answered with INTERNAL_ERROR.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    SerializationException,
    ValidationException,
)

from fluxbase.errors import (
    DatabaseUnavailable,
    FluxbaseError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ValidationError,
)
from fluxbase.http.context import AppContext
from fluxbase.http.requestlog import request_id
from fluxbase.http.shapes import NOT_JSON
from fluxbase.ratelimit import Quota
from fluxbase.services.access import Need, Principal, Project, ProjectAccess, authorize

log = logging.getLogger("fluxbase.http")

DB_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)

# A control-plane wait that ran into its bound (db/control.py): lock_timeout, statement_timeout.
# Tenant statements never get here: the SQL and data paths map their own errors first.
CONTROL_BUSY = (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.QueryCanceledError)

_JSON = msgspec.json.Encoder()


def error_response(exc: FluxbaseError) -> Response[bytes]:
    return Response(
        content=_JSON.encode(exc.body()),
        status_code=exc.status,
        media_type=MediaType.JSON,
        headers=exc.headers,
    )


def on_fluxbase_error(_: Request[Any, Any, Any], exc: FluxbaseError) -> Response[bytes]:
    return error_response(exc)


_ENUM_RE = re.compile(r"^Invalid enum value (.+)$")


def _choices(request: Request[Any, Any, Any], key: str) -> list[str] | None:
    """The allowed values of the body field `key` when its type is a Literal, else None."""
    try:
        data = request.route_handler.parsed_fn_signature.parameters.get("data")
        info = msgspec.inspect.type_info(data.annotation) if data is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
    for field in getattr(info, "fields", ()):
        if key in (field.name, field.encode_name):
            values = getattr(field.type, "values", None)  # msgspec.inspect.LiteralType
            return [str(v) for v in values] if values else None
    return None


def _field_message(request: Request[Any, Any, Any], message: str, key: str | None) -> str:
    m = _ENUM_RE.match(message)
    if m and key:
        choices = _choices(request, key)
        if choices:
            return f"{key} must be one of {', '.join(choices)}; got {m.group(1)}."
    return message


def on_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    messages = [
        _field_message(request, str(e.get("message")), str(e["key"]) if e.get("key") else None)
        for e in extra
        if isinstance(e, dict) and e.get("message")
    ]
    fields = [str(e.get("key")) for e in extra if isinstance(e, dict) and e.get("key")]
    msg = "; ".join(messages) or "The request body or parameters are not valid."
    body: dict[str, Any] = {"success": False, "error": {"code": "VALIDATION_ERROR", "message": msg}}
    if fields:
        body["error"]["fields"] = fields
    return Response(content=_JSON.encode(body), status_code=400, media_type=MediaType.JSON)


def on_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    # Every code answered here is one of the catalog's (fluxbase.errors), so the contract lists it.
    if isinstance(exc, NotFoundException):
        code, msg = NotFound.code, "No such route."
    elif isinstance(exc, MethodNotAllowedException):
        code, msg = MethodNotAllowed.code, MethodNotAllowed.default_message
    elif exc.status_code == 413:
        code, msg = PayloadTooLarge.code, "The request body is too large."
    elif isinstance(exc.__cause__, SerializationException) and exc.status_code == 400:
        code, msg = ValidationError.code, NOT_JSON
    elif 400 <= exc.status_code < 500:
        code, msg = ValidationError.code, str(exc.detail)
    else:
        log.error("http exception %s: %s", exc.status_code, exc.detail)
        code, msg = InternalError.code, InternalError.default_message
    body = {"success": False, "error": {"code": code, "message": msg}}
    return Response(
        content=_JSON.encode(body),
        status_code=exc.status_code,
        media_type=MediaType.JSON,
        headers=exc.headers or {},
    )


def _nested_too_deeply(exc: Exception) -> bool:
    """msgspec's RecursionError while Litestar decodes a body (an `Any` field of deeply nested
    JSON): the client's fault, not a crash. Only when raised by Litestar's own JSON decoding."""
    if not isinstance(exc, RecursionError):
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    return (
        code is not None
        and code.co_name in ("decode_json", "decode_msgpack")
        and code.co_filename.replace("\\", "/").endswith("litestar/serialization/msgspec_hooks.py")
    )


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if _nested_too_deeply(exc):
        return error_response(ValidationError("The request body is nested too deeply."))
    if isinstance(exc, CONTROL_BUSY):
        log.warning(
            "control-plane wait timed out on %s %s (%s): %r",
            request.method,
            request.url.path,
            request_id(request.scope),
            exc,
        )
        return error_response(
            DatabaseUnavailable(
                "The database is busy: a lock or statement timed out. Retry in a few seconds."
            )
        )
    if isinstance(exc, DB_UNAVAILABLE) or isinstance(exc, TimeoutError):
        log.warning(
            "database unavailable on %s %s (%s): %r",
            request.method,
            request.url.path,
            request_id(request.scope),
            exc,
        )
        return error_response(DatabaseUnavailable())
    log.exception(
        "unexpected error on %s %s (%s)",
        request.method,
        request.url.path,
        request_id(request.scope),
        exc_info=exc,
    )
    return error_response(InternalError())


EXCEPTION_HANDLERS: dict[Any, Any] = {
    FluxbaseError: on_fluxbase_error,
    ValidationException: on_validation,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}


def bearer_token(request: Request[Any, Any, Any]) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if not value or scheme.lower() != "bearer":
        return None
    return value


def client_ip(request: Request[Any, Any, Any], ctx: AppContext) -> str:
    """The peer address, or the nearest untrusted X-Forwarded-For hop behind trusted proxies."""
    peer = request.client.host if request.client else "unknown"
    nets = ctx.settings.http.proxy_networks()
    if not nets:
        return peer

    def trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in nets)

    if not trusted(peer):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not trusted(hop):
            return hop
    return hops[0] if hops else peer


@dataclass(frozen=True)
class Caller:
    """The authenticated principal of a request, plus the API key's own project if any."""

    principal: Principal
    key_project: Project | None

    async def access(
        self, ctx: AppContext, project_id: str | None, need: Need, *, end_user_surface: bool = False
    ) -> ProjectAccess:
        """The one authorisation step of a project route: may this caller do `need` on it?"""
        return await authorize(
            ctx.db, self.principal, self.key_project, project_id, need, end_user_surface=end_user_surface
        )


async def provide_ctx(request: Request[Any, Any, Any]) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


async def provide_caller(request: Request[Any, Any, Any]) -> Caller:
    ctx: AppContext = request.app.state.ctx
    principal, project = await ctx.auth.principal(bearer_token(request), request.headers.get("origin"))
    key = principal.key
    if key is not None and project is not None:
        # Every API-key request counts against the key's limit, as the doc's RATE_LIMIT says, not
        # only SQL (which counts in its own path): the key's, else the project's, else the default.
        t = ctx.settings.tenant
        limit, window = key.rate_limit or project.rate_limit or (t.rate_limit_requests, t.rate_limit_window_s)
        remember_quota(request, await ctx.limiter.hit(principal.label, limit, window))
    return Caller(principal, project)


# Where a request's Quota waits for its answer (http.fastpath adds the X-RateLimit-* headers).
QUOTA_SCOPE_KEY = "fluxbase.quota"


def remember_quota(request: Any, quota: Quota) -> None:
    """Keep the caller's rate-limit standing for the answer's headers."""
    request.scope[QUOTA_SCOPE_KEY] = quota  # (no typing.cast: a call per request)
