"""Realtime: per-table capture switches and the project's latest event cursor (services.realtime,
as the API's /api/realtime endpoints). The live event inspector comes next (it needs the realtime
service's origin in connect-src and a member realtime token)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError
from fluxbase.http.context import AppContext
from fluxbase.services import realtime
from fluxbase.services.access import Need

from .web import Dash, form, signed_in


async def _page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    pid = dash.access.project.id
    tables = await realtime.list_tables(dash.ctx.db, pid)
    cursor = await realtime.latest_cursor(dash.ctx.db, pid)
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
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.SCHEMA)
    on = (await form(request)).get("enabled") == "true"
    try:
        await realtime.set_enabled(ctx.db, access.project.id, [table], on)
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    return await _page(dash, notice=f"Changes of {table} are {'captured' if on else 'no longer captured'}.")


ROUTES = [realtime_page, switch]
