"""The dashboard's browser security: session and CSRF cookies, the CSRF check, response headers.

The session is the same signed, server-revocable session token the API's `/api/auth/login`
issues (services.accounts), kept in an HttpOnly, SameSite=Strict cookie scoped to /dashboard
(Secure behind HTTPS) and never exposed to page scripts. Every state-changing request carries a
CSRF token (a form field or the `X-CSRF-Token` header) that must equal the HMAC of a random
per-browser cookie under the server secret: a cross-site page can neither read the cookie nor
compute the token. The Content-Security-Policy allows no inline script and no framing.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from litestar import Request, Response
from litestar.types import Message, Scope

SESSION_COOKIE = "fluxbase_session"
CSRF_COOKIE = "fluxbase_csrf"
CSRF_FIELD = "_csrf"
CSRF_HEADER = "x-csrf-token"
COOKIE_PATH = "/dashboard"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'{realtime}; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'; object-src 'none'"
)
HEADERS: dict[str, str] = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # Page URLs carry project ids only, but no dashboard URL needs to reach another site.
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
_HEADER_BYTES = [(k.encode(), v.encode()) for k, v in HEADERS.items()]
_NO_STORE = (b"cache-control", b"no-store")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@functools.lru_cache(maxsize=8)
def csp_header(realtime_url: str, s3_url: str = "") -> tuple[bytes, bytes]:
    """The policy: scripts, styles and connections to this origin only, plus the realtime
    service's origin for the live event inspector's WebSocket and, on storage pages only, the S3
    endpoint's origin the presigned POST uploads go to (`s3_url`, derived from settings)."""
    parts = urlsplit(realtime_url)
    origin = f" {parts.scheme}://{parts.netloc}" if parts.scheme in ("ws", "wss") and parts.netloc else ""
    s3 = urlsplit(s3_url)
    if s3.scheme in ("http", "https") and s3.netloc:
        origin += f" {s3.scheme}://{s3.netloc}"
    return b"content-security-policy", CSP.format(realtime=origin).encode()


def _settings(scope: Scope) -> Any:
    app = scope.get("app")
    ctx = getattr(getattr(app, "state", None), "ctx", None)
    return ctx.settings if ctx is not None else None


def s3_origin_url(settings: Any) -> str:
    """Where presigned URLs point (storage.s3.ObjectStore signs with the public endpoint if set)."""
    return str(settings.s3.public_endpoint_url or settings.s3.endpoint_url)


def _csp(scope: Scope, path: str) -> tuple[bytes, bytes]:
    settings = _settings(scope)
    if settings is None:
        return csp_header("")
    # /dashboard/p/<project>/storage/<bucket>: the only pages that upload to S3 directly.
    parts = path.split("/")
    uploads = len(parts) >= 6 and parts[2] == "p" and parts[4] == "storage"
    return csp_header(str(settings.realtime_url), s3_origin_url(settings) if uploads else "")


def add_headers(message: Message, scope: Scope) -> None:
    """An app `before_send` hook: every /dashboard answer (pages, partials, errors, the router's own
    404s, static files) gets the security headers; all but static assets are `no-store` (a page
    may show a key that is shown only once)."""
    if message["type"] != "http.response.start":
        return
    path = str(scope.get("path", ""))
    if not (path == COOKIE_PATH or path.startswith(COOKIE_PATH + "/")):
        return
    headers = list(message.get("headers", []))  # type: ignore[union-attr]
    names = {h[0].lower() for h in headers}
    headers += [h for h in (*_HEADER_BYTES, _csp(scope, path)) if h[0] not in names]
    if not path.startswith(COOKIE_PATH + "/static/"):
        headers = [h for h in headers if h[0].lower() != b"cache-control"]
        headers.append(_NO_STORE)
    message["headers"] = headers  # type: ignore[typeddict-unknown-key]


def secure_cookies(request: Request[Any, Any, Any], api_url: str) -> bool:
    """Secure cookies when the dashboard is reached over HTTPS (directly or as configured)."""
    return request.url.scheme == "https" or api_url.startswith("https://")


def csrf_token(secret: str, basis: str, session: str = "") -> str:
    """The token for this browser's CSRF basis cookie AND its session cookie ("" when signed out):
    a basis cookie planted by someone else (a sibling subdomain, plain HTTP) is worthless once the
    member signs in, because the attacker cannot know the session (hostile review 4)."""
    bound = hashlib.sha256(session.encode()).digest()
    mac = hmac.new(secret.encode(), b"dashboard-csrf\x00" + basis.encode() + b"\x00" + bound, hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def new_csrf_basis() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(secret: str, basis: str | None, presented: str | None, session: str = "") -> bool:
    if not basis or not presented:
        return False
    return hmac.compare_digest(csrf_token(secret, basis, session), presented)


def set_cookie(
    response: Response[Any], name: str, value: str, *, secure: bool, max_age: int | None = None
) -> None:
    response.set_cookie(
        name,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=secure,
        max_age=max_age,
    )


def clear_cookie(response: Response[Any], name: str, *, secure: bool) -> None:
    response.set_cookie(
        name, "", path=COOKIE_PATH, httponly=True, samesite="strict", secure=secure, max_age=0
    )
