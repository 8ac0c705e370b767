"""Project operations: migrations, export/import, vacuum, read-only, quotas, suspend/resume."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get, patch, post
from litestar.params import QueryParameter
from litestar.response import Stream

from fluxbase.errors import AuthRequired, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Answer, Body, Out, ProjectAnswer, ProjectOut, project_out
from fluxbase.services import dump, migrations, operations
from fluxbase.services.access import Need


class MigrationBody(Body):
    name: str
    sql: str


class ProjectPatchBody(Body):
    read_only: bool | None = None


class MigrationOut(Out):
    name: str
    checksum: str
    applied_at: datetime
    applied_by: str | None


class MigrationApplied(Answer, kw_only=True):
    applied: bool
    migration: MigrationOut


class MigrationsAnswer(Answer, kw_only=True):
    migrations: list[MigrationOut]


class VacuumAnswer(Answer, kw_only=True):
    tables: int
    size_before: int
    size_after: int
    duration_ms: int


class QuotasOut(Out):
    database_bytes: int | None
    database_used_bytes: int
    storage_bytes: int
    storage_used_bytes: int
    max_file_size: int
    rate_limit_requests: int
    rate_limit_window_seconds: int


class QuotasAnswer(Answer, kw_only=True):
    quotas: QuotasOut


class InstanceProjectOut(ProjectOut, kw_only=True):
    owner_email: str | None
    members: int


class InstanceProjectsAnswer(Answer, kw_only=True):
    projects: list[InstanceProjectOut]
    next_cursor: str | None


def _migration_out(m: migrations.Migration) -> MigrationOut:
    return MigrationOut(m.name, m.checksum, m.applied_at, m.applied_by)


def _instance_project(p: operations.InstanceProject) -> InstanceProjectOut:
    x = p.project
    return InstanceProjectOut(
        x.id, x.name, x.status, x.read_only, x.created_at, owner_email=p.owner_email, members=p.members
    )


def _quotas(q: operations.Quotas) -> QuotasAnswer:
    return QuotasAnswer(
        quotas=QuotasOut(
            q.database_bytes,
            q.database_used,
            q.storage_bytes,
            q.storage_used,
            q.max_file_size,
            q.requests,
            q.window_s,
        )
    )


@post(
    "/api/projects/{project_id:str}/migrations",
    operation_id="applyMigration",
    tags=["migrations"],
    status_code=200,
)
async def apply_migration(
    project_id: str, data: MigrationBody, ctx: AppContext, caller: Caller
) -> MigrationApplied:
    access = await caller.access(ctx, project_id, Need.SCHEMA)
    # The ledger and its tickets live on the project's cluster (the control pool for the default).
    home = await ctx.cluster_pools().pool(access.project.cluster_id)
    applied, migration = await migrations.apply_migration(
        home, ctx.tenants, access, data.name, data.sql, ctx.settings.tenant.pool_acquire_timeout_s
    )
    return MigrationApplied(applied=applied, migration=_migration_out(migration))


@get("/api/projects/{project_id:str}/migrations", operation_id="listMigrations", tags=["migrations"])
async def list_migrations(project_id: str, ctx: AppContext, caller: Caller) -> MigrationsAnswer:
    access = await caller.access(ctx, project_id, Need.READ)
    home = await ctx.cluster_pools().pool(access.project.cluster_id)
    rows = await migrations.list_migrations(home, access.project.id)
    return MigrationsAnswer(migrations=[_migration_out(m) for m in rows])


@post(
    "/api/projects/{project_id:str}/vacuum",
    operation_id="vacuumProject",
    tags=["operations"],
    status_code=200,
)
async def vacuum_project(project_id: str, ctx: AppContext, caller: Caller) -> VacuumAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    r = await operations.vacuum(
        ctx.db, ctx.tenants, access.project.id, ctx.settings.tenant.pool_acquire_timeout_s
    )
    return VacuumAnswer(
        tables=r.tables, size_before=r.size_before, size_after=r.size_after, duration_ms=r.duration_ms
    )


@patch("/api/projects/{project_id:str}", operation_id="updateProject", tags=["projects"])
async def update_project(
    project_id: str, data: ProjectPatchBody, ctx: AppContext, caller: Caller
) -> ProjectAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    project = access.project
    if data.read_only is not None:
        project = await operations.set_read_only(ctx.db, project.id, data.read_only)
        ctx.auth.forget_project(project.id)
    return ProjectAnswer(project=project_out(project, access.member_role))


@get("/api/projects/{project_id:str}/quotas", operation_id="getQuotas", tags=["operations"])
async def get_quotas(project_id: str, ctx: AppContext, caller: Caller) -> QuotasAnswer:
    access = await caller.access(ctx, project_id, Need.READ)
    quotas = await operations.get_quotas(ctx.db, ctx.settings, access.project.id)
    return _quotas(quotas)


@patch("/api/admin/projects/{project_id:str}/quotas", operation_id="setQuotas", tags=["admin"])
async def set_quotas(
    request: Request[Any, Any, Any], project_id: str, ctx: AppContext, caller: Caller
) -> QuotasAnswer:
    operations.require_instance_admin(caller.principal)
    try:
        changes = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        raise ValidationError("The request body must be JSON.") from None
    if not isinstance(changes, dict):
        raise ValidationError("The request body must be a JSON object.")
    quotas = await operations.set_quotas(ctx.db, ctx.settings, project_id, changes, ctx.cluster_pools())
    # This process's caches learn the new cap at once; other processes within the key cache TTL.
    ctx.auth.forget_project(project_id)
    ctx.sizes.forget(project_id)
    return _quotas(quotas)


LimitQ = Annotated[int, QueryParameter(name="limit", required=False, ge=1, le=1000)]
AfterQ = Annotated[str | None, QueryParameter(name="after", required=False)]


@get("/api/admin/projects", operation_id="listAllProjects", tags=["admin"])
async def list_all_projects(
    ctx: AppContext, caller: Caller, limit: LimitQ = 100, after: AfterQ = None
) -> InstanceProjectsAnswer:
    """Every project of the instance (instance admins only), newest first; `nextCursor` pages on."""
    operations.require_instance_admin(caller.principal)
    page, cursor = await operations.list_all_projects(ctx.db, limit, after)
    return InstanceProjectsAnswer(projects=[_instance_project(p) for p in page], next_cursor=cursor)


@post(
    "/api/admin/projects/{project_id:str}/suspend",
    operation_id="suspendProject",
    tags=["admin"],
    status_code=200,
)
async def suspend_project(project_id: str, ctx: AppContext, caller: Caller) -> ProjectAnswer:
    operations.require_instance_admin(caller.principal)
    project = await operations.set_status(ctx.db, project_id, "suspended")
    ctx.auth.forget_project(project_id)
    return ProjectAnswer(project=project_out(project))


@post(
    "/api/admin/projects/{project_id:str}/resume",
    operation_id="resumeProject",
    tags=["admin"],
    status_code=200,
)
async def resume_project(project_id: str, ctx: AppContext, caller: Caller) -> ProjectAnswer:
    operations.require_instance_admin(caller.principal)
    project = await operations.set_status(ctx.db, project_id, "active")
    return ProjectAnswer(project=project_out(project))


@get(
    "/api/projects/{project_id:str}/export",
    operation_id="exportProject",
    tags=["operations"],
    media_type="application/sql",
    response_description="The project as SQL (schema and data), streamed.",
)
async def export_project(project_id: str, ctx: AppContext, caller: Caller) -> Stream:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    export = await dump.start_export(
        ctx.settings,
        ctx.db,
        access.project.id,
        cluster_pools=ctx.cluster_pools(),
        cluster_id=access.project.cluster_id,
    )
    return Stream(
        export.stream(),
        media_type="application/sql",
        headers={"Content-Disposition": f'attachment; filename="fluxbase-{access.project.id}.sql"'},
    )


NameQ = Annotated[str | None, QueryParameter(name="name", required=False)]


@post(
    "/api/projects/import",
    operation_id="importProject",
    tags=["operations"],
    status_code=201,
    request_max_body_size=None,
    description="Body: a Fluxbase export (application/sql). Creates a new project owned by the caller.",
)
async def import_project(
    request: Request[Any, Any, Any], ctx: AppContext, caller: Caller, name: NameQ = None
) -> ProjectAnswer:
    if caller.principal.user is None:
        raise AuthRequired("This endpoint needs a dashboard session token, not an API key.")
    project = await dump.import_upload(
        ctx.db,
        ctx.tenants,
        ctx.settings,
        caller.principal.user.id,
        name,
        request.stream(),
        ctx.cluster_pools(),
    )
    return ProjectAnswer(project=project_out(project, "admin"))
