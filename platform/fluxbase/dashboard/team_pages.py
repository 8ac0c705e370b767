"""Team: members and their roles, invitations; and the signed-in user's own invitations
(services.team, as the API's /api/team and /api/invites)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError
from fluxbase.http.context import AppContext
from fluxbase.services import team
from fluxbase.services.access import Need

from .project_pages import projects_page
from .web import Dash, form, signed_in

ROLES = ("viewer", "developer", "admin")


async def _page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    found = await team.list_team(dash.ctx.db, dash.access.project.id) if dash.can(Need.MANAGE) else None
    extra.setdefault("values", {})
    return dash.render("team.html", status, team=found, roles=ROLES, **extra)


@get("/p/{project_id:str}/team")
async def team_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _page(dash)


@post("/p/{project_id:str}/team/invite", status_code=200)
async def invite(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    data = await form(request)
    try:
        sent = await team.invite(ctx.db, ctx.settings, access, data.get("email", ""), data.get("role", ""))
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc, values=data)
    return await _page(dash, notice=f"{sent.email} is invited as {sent.role}.")


@post("/p/{project_id:str}/team/{user_id:str}/role", status_code=200)
async def change_role(
    project_id: str, user_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    try:
        member = await team.change_role(ctx.db, access, user_id, (await form(request)).get("role", ""))
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    if member.user_id == dash.user.id and member.role != "admin":
        return dash.redirect(f"/p/{project_id}/")  # no longer allowed on this screen
    return await _page(dash, notice=f"{member.email} is now {member.role}.")


@post("/p/{project_id:str}/team/{user_id:str}/remove", status_code=200)
async def remove(
    project_id: str, user_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    try:
        member = await team.remove_member(ctx.db, access, user_id)
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    if member.user_id == dash.user.id:
        return dash.redirect("/")
    return await _page(dash, notice=f"{member.email} was removed from the project.")


@post("/invites/{invite_id:str}", status_code=200)
async def answer(invite_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """Accept or reject one of the signed-in user's own invitations (from the projects page)."""
    dash = await signed_in(request, ctx)
    status = (await form(request)).get("status", "")
    try:
        done = await team.respond(ctx.db, dash.user, invite_id, status)
    except FluxbaseError as exc:
        return await projects_page(dash, exc.status, error=exc)
    if done.status == "accepted":
        return dash.redirect(f"/p/{done.project_id}/")
    return dash.redirect("/")


ROUTES = [team_page, invite, change_role, remove, answer]
