"""The dashboard's request plumbing: who is signed in, page rendering, and error pages.

A screen handler calls `signed_in(request, ctx)` for a `Dash`, then `dash.project(id, need)`,
which is `services.access.authorize` itself: the dashboard has no permission rule of its own.
`dash.render(template, ...)` renders a Jinja template (autoescaped) with the CSRF token and the
member's role, and `can(need)` lets templates disable what the role may not do, with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotFoundException
from litestar.response import Redirect

from fluxbase.errors import AuthRequired, FluxbaseError, InternalError, TokenExpired
from fluxbase.http.context import AppContext
from fluxbase.http.edge import on_unexpected as api_unexpected
from fluxbase.security import apikeys
from fluxbase.services.access import ROLE_RANK, Need, Principal, ProjectAccess, authorize
from fluxbase.services.accounts import User

from . import security

log = logging.getLogger("fluxbase.dashboard")

BASE = "/dashboard"
HERE = Path(__file__).parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _bytes(n: int | None) -> str:
    if n is None:
        return "no limit"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _when(value: Any) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


ESCAPE = "~"


def _segment(value: Any) -> str:
    """A tenant value (table, policy, row key) as ONE path segment: every `/` and `?` quoted, so
    a value can never aim a form at another route (hostile review 4). `.` and `..`, which browsers
    resolve even when percent-encoded, get the escape `~` in front, and so does any value that
    starts with `~`; `unsegment` (in the handlers) takes exactly one `~` off again."""
    text = str(value)
    if text in (".", "..") or text.startswith(ESCAPE):
        text = ESCAPE + text
    return quote(text, safe="")


def unsegment(value: str) -> str:
    """The tenant value a `segment`-built path parameter names (the inverse of `_segment`)."""
    return value[len(ESCAPE) :] if value.startswith(ESCAPE) else value


_ENV.filters["segment"] = _segment
_ENV.filters["bytes"] = _bytes
_ENV.filters["when"] = _when


class SignInNeeded(Exception):
    """No live dashboard session: the browser goes to the sign-in page."""


def render_html(template: str, status: int = 200, **context: Any) -> Response[str]:
    html = _ENV.get_template(template).render(base=BASE, **context)
    return Response(content=html, status_code=status, media_type=MediaType.HTML)


def csrf_basis(request: Request[Any, Any, Any]) -> tuple[str, bool]:
    """The browser's CSRF basis cookie, or a new one (True: it must be set on the response)."""
    basis = request.cookies.get(security.CSRF_COOKIE)
    if basis and 20 <= len(basis) <= 100:
        return basis, False
    return security.new_csrf_basis(), True


@dataclass
class Dash:
    """One dashboard request: the app context, the signed-in user (if any) and page state."""

    request: Request[Any, Any, Any]
    ctx: AppContext
    principal: Principal | None = None
    access: ProjectAccess | None = None
    cookies: list[tuple[str, str, int | None]] = field(default_factory=list)
    clear: list[str] = field(default_factory=list)

    @property
    def user(self) -> User:
        if self.principal is None or self.principal.user is None:
            raise SignInNeeded()
        return self.principal.user

    @property
    def secure(self) -> bool:
        return security.secure_cookies(self.request, self.ctx.settings.api_url)

    async def project(self, project_id: str, need: Need = Need.READ) -> ProjectAccess:
        """The API's own authorisation of this member for `need` on the project."""
        if self.principal is None:
            raise SignInNeeded()
        self.access = await authorize(self.ctx.db, self.principal, None, project_id, need)
        return self.access

    def can(self, need: Need) -> bool:
        role = self.access.member_role if self.access else None
        return role is not None and ROLE_RANK[role] >= ROLE_RANK[need.min_role]

    def reason(self, need: Need) -> str:
        role = self.access.member_role if self.access else "none"
        return f"Needs the {need.min_role} role; you are {role}."

    def render(self, template: str, status: int = 200, **context: Any) -> Response[str]:
        basis, fresh = csrf_basis(self.request)
        session = self.request.cookies.get(security.SESSION_COOKIE, "")
        if security.SESSION_COOKIE in self.clear:
            session = ""
        for name, value, _ in self.cookies:
            if name == security.CSRF_COOKIE:
                basis, fresh = value, False
            elif name == security.SESSION_COOKIE:
                session = value
        response = render_html(
            template,
            status,
            dash=self,
            user=self.principal.user if self.principal else None,
            project=self.access.project if self.access else None,
            role=self.access.member_role if self.access else None,
            csrf=security.csrf_token(self.ctx.settings.auth.secret_key, basis, session),
            csrf_field=security.CSRF_FIELD,
            Need=Need,
            path=self.request.url.path,
            **context,
        )
        if fresh:
            self.cookies.append((security.CSRF_COOKIE, basis, None))
        return self.finish(response)

    def redirect(self, path: str) -> Response[Any]:
        """303 to a dashboard page (a full redirect for htmx requests too)."""
        target = path if path.startswith(BASE) else BASE + path
        if self.request.headers.get("hx-request"):
            return self.finish(Response(content=b"", status_code=204, headers={"HX-Redirect": target}))
        return self.finish(Redirect(target, status_code=303))

    def finish(self, response: Response[Any]) -> Response[Any]:
        for name, value, max_age in self.cookies:
            security.set_cookie(response, name, value, secure=self.secure, max_age=max_age)
        for name in self.clear:
            security.clear_cookie(response, name, secure=self.secure)
        return response


async def session_principal(request: Request[Any, Any, Any], ctx: AppContext) -> Principal | None:
    """The signed-in member from the session cookie, or None (API keys are never accepted here)."""
    token = request.cookies.get(security.SESSION_COOKIE)
    if not token or apikeys.looks_like_key(token):
        return None
    try:
        principal, _ = await ctx.auth.principal(token, None)
    except (AuthRequired, TokenExpired):
        return None
    return principal if principal.user is not None else None


async def signed_in(request: Request[Any, Any, Any], ctx: AppContext) -> Dash:
    principal = await session_principal(request, ctx)
    if principal is None:
        raise SignInNeeded()
    return Dash(request, ctx, principal)


async def form(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The submitted form as plain strings (the last value of a repeated field; files skipped)."""
    data = await request.form()
    return {k: v for k, v in data.items() if isinstance(v, str)}


# -- the router's hooks and error pages ----------------------------------------------------------


async def check_csrf(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """Refuse any state change whose CSRF token does not match this browser's cookie."""
    if request.method in security.SAFE_METHODS:
        return None
    if request.url.path.startswith(BASE + "/static/"):
        return None
    ctx: AppContext = request.app.state.ctx
    presented = request.headers.get(security.CSRF_HEADER)
    if presented is None and request.route_handler.resolve_request_max_body_size() is not None:
        # Only a bounded body is parsed for the form's token. A raw-body route without a limit
        # (the import) takes the token in the header, which its page's script sends: parsing its
        # body here read all of it into memory before any check (hostile review 6).
        presented = (await form(request)).get(security.CSRF_FIELD)
    session = request.cookies.get(security.SESSION_COOKIE, "")
    if security.csrf_ok(
        ctx.settings.auth.secret_key, request.cookies.get(security.CSRF_COOKIE), presented, session
    ):
        return None
    log.warning("dashboard: refused %s %s without a valid CSRF token", request.method, request.url.path)
    return render_html(
        "error.html",
        403,
        dash=None,
        user=None,
        project=None,
        role=None,
        csrf="",
        csrf_field=security.CSRF_FIELD,
        path=request.url.path,
        code="CSRF_FAILED",
        message="This form has expired or did not come from this dashboard. Reload the page and try again.",
    )


def on_sign_in_needed(request: Request[Any, Any, Any], _: SignInNeeded) -> Response[Any]:
    target = f"{BASE}/sign-in"
    if request.headers.get("hx-request"):
        return Response(content=b"", status_code=204, headers={"HX-Redirect": target})
    return Redirect(target, status_code=303)


def _error_page(request: Request[Any, Any, Any], status: int, code: str, message: str) -> Response[str]:
    return render_html(
        "error.html",
        status,
        dash=None,
        user=None,
        project=None,
        role=None,
        csrf="",
        csrf_field=security.CSRF_FIELD,
        path=request.url.path,
        code=code,
        message=message,
    )


def on_fluxbase_error(request: Request[Any, Any, Any], exc: FluxbaseError) -> Response[Any]:
    if isinstance(exc, AuthRequired | TokenExpired):
        return on_sign_in_needed(request, SignInNeeded())
    return _error_page(request, exc.status if exc.status >= 400 else 400, exc.code, exc.message)


def on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, NotFoundException):
        return _error_page(request, 404, "NOT_FOUND", "No such page.")
    if exc.status_code < 500:
        return _error_page(request, exc.status_code, "VALIDATION_ERROR", str(exc.detail))
    return on_unexpected(request, exc)


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # The API's own classification (database down, lock timeouts) and logging, as a page.
    answer = api_unexpected(request, exc)
    error = InternalError()
    code, message = error.code, error.message
    if answer.status_code == 503:
        code, message = "DATABASE_CONNECTION_ERROR", "The database is not reachable. Retry in a few seconds."
    return _error_page(request, answer.status_code or 500, code, message)
