"""Projects: list, create, home (ids, URLs, snippets, usage against quotas), delete."""

from __future__ import annotations

import contextlib
import json
import shlex
from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Stream

from fluxbase.errors import FluxbaseError, StorageUnavailable
from fluxbase.http.context import AppContext
from fluxbase.http.edge import error_response
from fluxbase.services import dump, migrations, operations, projects, team
from fluxbase.services.access import Need
from fluxbase.storage.service import delete_project_objects

from .web import BASE, Dash, form, signed_in


async def projects_page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    """The projects list with the user's open invitations (also the error page of its forms)."""
    rows = await projects.list_projects(dash.ctx.db, dash.user.id)
    invites = await team.my_invites(dash.ctx.db, dash.user)
    extra.setdefault("name", "")
    return dash.render("projects.html", status, projects=rows, invites=invites, **extra)


@get("/")
async def project_list(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    return await projects_page(await signed_in(request, ctx))


@post("/projects", status_code=200)
async def create_project(request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    name = (await form(request)).get("name", "")
    try:
        project = await projects.create_project(
            ctx.db, ctx.settings, dash.user.id, name, cluster_pools=ctx.cluster_pools()
        )
    except FluxbaseError as exc:
        return await projects_page(dash, exc.status, error=exc, name=name)
    return dash.redirect(f"/p/{project.id}/")


def snippets(api_url: str, project_id: str) -> dict[str, str]:
    body = json.dumps({"projectId": project_id, "query": "SELECT now() AS server_time"})
    curl = (
        f"curl -s {api_url}/api/execute-sql \\\n  -H 'Authorization: Bearer $FLUXBASE_KEY' \\\n"
        f"  -H 'Content-Type: application/json' \\\n  -d {shlex.quote(body)}"
    )
    js = (
        f"const res = await fetch('{api_url}/api/execute-sql', {{\n"
        "  method: 'POST',\n"
        "  headers: {\n"
        "    'Authorization': `Bearer ${FLUXBASE_KEY}`,\n"
        "    'Content-Type': 'application/json',\n"
        "  },\n"
        f"  body: JSON.stringify({{ projectId: '{project_id}', query: 'SELECT now() AS server_time' }}),\n"
        "});\n"
        "const { result } = await res.json();\n"
        "console.log(result.rows);"
    )
    return {"curl": curl, "js": js}


@get("/p/{project_id:str}/")
async def project_home(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.READ)
    quotas = await operations.get_quotas(ctx.db, ctx.settings, access.project.id)
    api_url = ctx.settings.api_url.rstrip("/")
    return dash.render(
        "project_home.html",
        quotas=quotas,
        api_url=api_url,
        realtime_url=ctx.settings.realtime_url,
        room=f"project_{access.project.id}",
        snippets=snippets(api_url, access.project.id),
    )


async def settings_page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    home = await dash.ctx.cluster_pools().pool(dash.access.project.cluster_id)  # the ledger's cluster
    applied = await migrations.list_migrations(home, dash.access.project.id)
    extra.setdefault("confirm", "")
    extra.setdefault("mig_name", "")
    extra.setdefault("mig_sql", "")
    extra.setdefault("sqlstate", None)
    return dash.render("project_settings.html", status, migrations=applied, **extra)


@get("/p/{project_id:str}/settings")
async def project_settings(
    project_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await settings_page(dash)


@post("/p/{project_id:str}/read-only", status_code=200)
async def set_read_only(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The API's updateProject: the read-only switch."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    on = (await form(request)).get("read_only") == "true"
    await operations.set_read_only(ctx.db, access.project.id, on)
    ctx.auth.forget_project(access.project.id)
    await dash.project(project_id, Need.READ)  # the page shows the new state
    return await settings_page(
        dash, notice="The project is read-only now." if on else "Writes are allowed again."
    )


@post("/p/{project_id:str}/vacuum", status_code=200)
async def vacuum(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    try:
        r = await operations.vacuum(
            ctx.db, ctx.tenants, access.project.id, ctx.settings.tenant.pool_acquire_timeout_s
        )
    except FluxbaseError as exc:
        return await settings_page(dash, exc.status, error=exc)
    return await settings_page(
        dash,
        notice=f"Vacuumed {r.tables} tables in {r.duration_ms} ms: {r.size_before} → {r.size_after} bytes.",
    )


@post("/p/{project_id:str}/migrations", status_code=200)
async def apply_migration(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The API's applyMigration: a named SQL migration, applied once (developer role or above)."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.SCHEMA)
    data = await form(request)
    name, sql = data.get("name", "").strip(), data.get("sql", "")
    try:
        applied, migration = await migrations.apply_migration(
            await ctx.cluster_pools().pool(access.project.cluster_id),  # the ledger's cluster
            ctx.tenants,
            access,
            name,
            sql,
            ctx.settings.tenant.pool_acquire_timeout_s,
        )
    except FluxbaseError as exc:
        # MigrationFailed carries the SQLSTATE as the API shows it: details "ERROR:  42P01".
        sqlstate = str(exc.extra.get("details", "")).removeprefix("ERROR:").strip() or None
        return await settings_page(dash, exc.status, error=exc, sqlstate=sqlstate, mig_name=name, mig_sql=sql)
    if not applied:
        return await settings_page(
            dash, notice=f"{migration.name} was already applied (same SQL); nothing ran."
        )
    return await settings_page(dash, notice=f"Applied migration {migration.name}.")


@post("/import", status_code=201, request_max_body_size=None)
async def import_project(request: Request[Any, Any, Any], ctx: AppContext, name: str = "") -> Response[Any]:
    """The API's importProject: the export file as the raw body (sent by the page's script, with
    upload progress); the new project is the member's own."""
    dash = await signed_in(request, ctx)
    try:
        project = await dump.import_upload(
            ctx.db,
            ctx.tenants,
            ctx.settings,
            dash.user.id,
            name.strip() or None,
            request.stream(),
            ctx.cluster_pools(),
        )
    except FluxbaseError as exc:
        return error_response(exc)
    return Response(
        {
            "success": True,
            "project": {"id": project.id, "name": project.name},
            "url": f"{BASE}/p/{project.id}/",
        },
        status_code=201,
    )


@get("/p/{project_id:str}/export")
async def export(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Stream:
    """The API's exportProject, as a download (a GET: it changes nothing)."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    started = await dump.start_export(
        ctx.settings,
        ctx.db,
        access.project.id,
        cluster_pools=ctx.cluster_pools(),
        cluster_id=access.project.cluster_id,
    )
    return Stream(
        started.stream(),
        media_type="application/sql",
        headers={"Content-Disposition": f'attachment; filename="fluxbase-{access.project.id}.sql"'},
    )


@post("/p/{project_id:str}/delete", status_code=200)
async def delete_project(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The API's deleteProject, after the member typed the project's name."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.OWNER)
    confirm = (await form(request)).get("confirm", "")
    if confirm != access.project.name:
        return await settings_page(
            dash,
            400,
            confirm=confirm,
            error_message="Type the project's name exactly to confirm its deletion.",
        )
    await ctx.tenants.close_project(access.project.id)
    await projects.delete_project(ctx.db, access.project.id, ctx.cluster_pools())
    ctx.auth.forget_project(access.project.id)
    with contextlib.suppress(StorageUnavailable):
        await delete_project_objects(ctx.store, access.project.id)
    return dash.redirect("/")


ROUTES = [
    project_list,
    create_project,
    project_home,
    project_settings,
    set_read_only,
    vacuum,
    apply_migration,
    import_project,
    export,
    delete_project,
]
