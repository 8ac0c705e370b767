"""PostgreSQL extensions of a project: list the instance's allow-list, install, remove."""

from __future__ import annotations

from datetime import datetime

from litestar import Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Answer, Body, Out
from fluxbase.services import extensions
from fluxbase.services.access import Need


class InstallBody(Body):
    name: str


class ExtensionOut(Out):
    name: str
    available: bool
    installed: bool
    version: str | None
    schema: str
    requires: list[str]
    reason: str
    unavailable_reason: str | None
    installed_at: datetime | None


class ExtensionsAnswer(Answer, kw_only=True):
    extensions: list[ExtensionOut]


class ExtensionAnswer(Answer, kw_only=True):
    extension: ExtensionOut


def extension_out(e: extensions.Extension) -> ExtensionOut:
    return ExtensionOut(
        e.name,
        e.available,
        e.installed,
        e.version,
        e.schema,
        e.requires,
        e.reason,
        e.unavailable_reason,
        e.installed_at,
    )


@get("/api/projects/{project_id:str}/extensions", operation_id="listExtensions", tags=["extensions"])
async def list_extensions(project_id: str, ctx: AppContext, caller: Caller) -> ExtensionsAnswer:
    access = await caller.access(ctx, project_id, Need.READ)
    # The allow-list and the project's installs are recorded where its data lives (sql/0023).
    home = await ctx.cluster_pools().pool(access.project.cluster_id)
    rows = await extensions.list_extensions(home, access.project.id)
    return ExtensionsAnswer(extensions=[extension_out(e) for e in rows])


@post(
    "/api/projects/{project_id:str}/extensions",
    operation_id="installExtension",
    tags=["extensions"],
    status_code=201,
    description="Install an extension of the allow-list in the project (201; 200 if it already was).",
    responses={200: ResponseSpec(ExtensionAnswer, description="It was installed already")},
)
async def install_extension(
    project_id: str, data: InstallBody, ctx: AppContext, caller: Caller
) -> Response[ExtensionAnswer]:
    access = await caller.access(ctx, project_id, Need.SCHEMA)
    home = await ctx.cluster_pools().pool(access.project.cluster_id)
    created, ext = await extensions.install(
        home, ctx.tenants, access.project, data.name, ctx.settings.tenant.pool_acquire_timeout_s
    )
    return Response(ExtensionAnswer(extension=extension_out(ext)), status_code=201 if created else 200)


@delete(
    "/api/projects/{project_id:str}/extensions/{name:str}",
    operation_id="removeExtension",
    tags=["extensions"],
    status_code=200,
)
async def remove_extension(project_id: str, name: str, ctx: AppContext, caller: Caller) -> ExtensionAnswer:
    access = await caller.access(ctx, project_id, Need.SCHEMA)
    home = await ctx.cluster_pools().pool(access.project.cluster_id)
    ext = await extensions.remove(
        home, ctx.tenants, access.project, name, ctx.settings.tenant.pool_acquire_timeout_s
    )
    return ExtensionAnswer(extension=extension_out(ext))
