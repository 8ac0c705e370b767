"""End users of a project: list, disable/enable, revoke sessions; the project's end-user auth
settings (own sign-up, external JWTs: secret, JWKS URL, issuers, audiences), as the API's."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError
from fluxbase.http.context import AppContext
from fluxbase.services import end_users
from fluxbase.services.access import Need

from .web import Dash, form, signed_in

PAGE = 100


def _lines(text: str) -> list[str]:
    return [v.strip() for v in text.replace(",", "\n").splitlines() if v.strip()]


async def _page(dash: Dash, status: int = 200, offset: int = 0, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    users: list[end_users.ProjectUser] = []
    total, config = 0, None
    if dash.can(Need.MANAGE):
        users, total = await end_users.list_users(dash.ctx.db, dash.access.project.id, PAGE, offset)
        config = await end_users.get_config(dash.ctx.db, dash.access.project.id)
    return dash.render(
        "end_users.html", status, users=users, total=total, offset=offset, page=PAGE, config=config, **extra
    )


@get("/p/{project_id:str}/users")
async def users_page(
    project_id: str, request: Request[Any, Any, Any], ctx: AppContext, offset: int = 0
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _page(dash, offset=max(0, offset))


@post("/p/{project_id:str}/users/{user_id:str}/{action:str}", status_code=200)
async def act(
    project_id: str, user_id: str, action: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    """disable, enable or revoke-sessions."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    pid = access.project.id
    try:
        if action in ("disable", "enable"):
            user = await end_users.set_disabled(ctx.db, pid, user_id, action == "disable")
            return await _page(dash, notice=f"{user.email} is {action}d.")
        if action == "revoke-sessions":
            n = await end_users.revoke_sessions(ctx.db, pid, user_id)
            return await _page(dash, notice=f"{n} session{'' if n == 1 else 's'} ended.")
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    return await _page(dash, 404, error_message=f"Unknown action {action!r}.")


@post("/p/{project_id:str}/auth-settings", status_code=200)
async def update_settings(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    data = await form(request)
    changes: dict[str, Any] = {
        "registration_open": data.get("registration_open") == "on",
        "email_verification": data.get("email_verification", "off"),
        "jwks_uri": data.get("jwks_uri", "").strip() or None,
        "jwt_allowed_issuers": _lines(data.get("jwt_allowed_issuers", "")) or None,
        "jwt_expected_audiences": _lines(data.get("jwt_expected_audiences", "")) or None,
        "redirect_urls": _lines(data.get("redirect_urls", "")) or None,
    }
    # The secret is write-only: an empty field keeps it, the checkbox clears it.
    if data.get("clear_jwt_secret") == "on":
        changes["jwt_secret"] = None
    elif data.get("jwt_secret", ""):
        changes["jwt_secret"] = data["jwt_secret"]
    try:
        await end_users.update_config(ctx.db, access.project.id, changes)
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    ctx.identity.forget(access.project.id)
    return await _page(dash, notice="Auth settings saved.")


ROUTES = [users_page, act, update_settings]
