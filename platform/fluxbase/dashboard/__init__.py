"""The web dashboard at /dashboard/: server-rendered pages (Jinja + htmx) over the same services
and permission checks as the API, with its assets (vendored, pinned) inside this package.

`router()` is everything the app mounts; each screen module lists its handlers in `ROUTES`, so a
new screen is a module with handlers and templates, added to `SCREENS` below.
"""

from __future__ import annotations

from typing import Any

from litestar import Router, get
from litestar.exceptions import HTTPException, NotFoundException
from litestar.response import Redirect
from litestar.static_files import create_static_files_router

from fluxbase.errors import FluxbaseError

from . import (
    admin_pages,
    auth_pages,
    end_user_pages,
    key_pages,
    project_pages,
    realtime_pages,
    rls_pages,
    security,
    sql_pages,
    storage_pages,
    table_pages,
    team_pages,
    web,
    webhook_pages,
)

__all__ = ["root", "router", "security"]

SCREENS = (
    auth_pages,
    project_pages,
    key_pages,
    table_pages,
    sql_pages,
    rls_pages,
    storage_pages,
    realtime_pages,
    end_user_pages,
    team_pages,
    webhook_pages,
    admin_pages,
)


def router() -> Router:
    """The /dashboard router: screens, static assets, the CSRF check and the security headers."""
    static = create_static_files_router(
        path="/static", directories=[web.HERE / "static"], name="dashboard-static", include_in_schema=False
    )
    handlers: list[Any] = [h for screen in SCREENS for h in screen.ROUTES]
    return Router(
        path=web.BASE,
        route_handlers=[*handlers, static, not_found],
        before_request=web.check_csrf,
        exception_handlers={
            web.SignInNeeded: web.on_sign_in_needed,
            FluxbaseError: web.on_fluxbase_error,
            HTTPException: web.on_http_exception,
            Exception: web.on_unexpected,
        },
        include_in_schema=False,
    )


@get("/{rest:path}", include_in_schema=False)
async def not_found(rest: str) -> None:
    """Any other /dashboard path: the dashboard's own 404 page (with its headers), not the API's."""
    raise NotFoundException()


@get("/", include_in_schema=False)
async def root() -> Redirect:
    """The bare server URL opens the dashboard."""
    return Redirect(web.BASE + "/", status_code=302)
