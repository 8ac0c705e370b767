"""Realtime: per-table capture switches, the latest event cursor, and a live event inspector that
subscribes to the project's room with a realtime token minted for the member's session
(services.realtime, as the API's /api/realtime endpoints)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError
from fluxbase.http.context import AppContext
from fluxbase.services import realtime
from fluxbase.services.access import Need

from .web import Dash, form, signed_in, unsegment

TOKEN_TTL_S = 300  # the inspector subscribes at once; the token is re-checked while subscribed


async def _page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    pid = dash.access.project.id
    # The project's cluster: its tables, capture switches and outbox live there (docs/clusters.md).
    home = await dash.ctx.cluster_pools().pool(dash.access.project.cluster_id)
    tables = await realtime.list_tables(home, pid)
    cursor = await realtime.latest_cursor(home, pid)
    return dash.render(
        "realtime.html",
        status,
        tables=tables,
        cursor=cursor,
        realtime_url=dash.ctx.settings.realtime_url,
        room=f"project_{pid}",
        **extra,
    )


@get("/p/{project_id:str}/realtime")
async def realtime_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _page(dash)


@post("/p/{project_id:str}/realtime/{table:str}", status_code=200)
async def switch(
    project_id: str, table: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    table = unsegment(table)
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.SCHEMA)
    on = (await form(request)).get("enabled") == "true"
    try:
        home = await ctx.cluster_pools().pool(access.project.cluster_id)
        await realtime.set_enabled(home, access.project.id, [table], on)
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    return await _page(dash, notice=f"Changes of {table} are {'captured' if on else 'no longer captured'}.")


@post("/p/{project_id:str}/realtime-token", status_code=201)
async def token(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> dict[str, Any]:
    """A short-lived realtime token for the inspector, as /api/realtime/token mints one for a member
    session: it reads what the member's SQL scope reads and dies with the session."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.READ)
    assert dash.principal is not None and dash.principal.user is not None
    minter = realtime.Minter(None, None, dash.principal.user.id, dash.principal.session_id, None)
    raw, exp = realtime.mint_token(
        ctx.settings.auth.secret_key, access.project.id, access.sql_scope, None, TOKEN_TTL_S, minter
    )
    return {
        "token": raw,
        "expiresAt": exp,
        "url": ctx.settings.realtime_url,
        "roomId": f"project_{project_id}",
    }


ROUTES = [realtime_page, switch, token]
