"""PostgreSQL extensions of a project: list the instance's allow-list, install, remove."""

from __future__ import annotations

from typing import Any

from litestar import Response, delete, get, post

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Body
from fluxbase.services import extensions
from fluxbase.services.access import Need, authorize


class InstallBody(Body):
    name: str


@get("/api/projects/{project_id:str}/extensions", operation_id="listExtensions", tags=["extensions"])
async def list_extensions(project_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.READ)
    rows = await extensions.list_extensions(ctx.db, access.project.id)
    return {"success": True, "extensions": [e.out() for e in rows]}


@post(
    "/api/projects/{project_id:str}/extensions",
    operation_id="installExtension",
    tags=["extensions"],
    description="Install an extension of the allow-list in the project (201; 200 if it already was).",
)
async def install_extension(
    project_id: str, data: InstallBody, ctx: AppContext, caller: Caller
) -> Response[dict[str, Any]]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.SCHEMA)
    created, ext = await extensions.install(
        ctx.db, ctx.tenants, access.project, data.name, ctx.settings.tenant.pool_acquire_timeout_s
    )
    return Response({"success": True, "extension": ext.out()}, status_code=201 if created else 200)


@delete(
    "/api/projects/{project_id:str}/extensions/{name:str}",
    operation_id="removeExtension",
    tags=["extensions"],
    status_code=200,
)
async def remove_extension(project_id: str, name: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.SCHEMA)
    ext = await extensions.remove(
        ctx.db, ctx.tenants, access.project, name, ctx.settings.tenant.pool_acquire_timeout_s
    )
    return {"success": True, "extension": ext.out()}
