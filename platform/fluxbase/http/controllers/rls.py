"""Row Level Security management and the realtime setting for end users.

Every endpoint here needs `Need.MANAGE` except reading the realtime setting: policies decide
who sees which rows, so only an admin-scope key or an admin member may read or change them.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import delete, get, post
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Body
from fluxbase.services import rls
from fluxbase.services.access import Need, authorize

ProjectQ = Annotated[str | None, QueryParameter(name="projectId", required=False)]


class CreatePolicyBody(Body):
    table: str
    name: str
    command: str = "ALL"
    using: str | None = None
    with_check: str | None = None
    permissive: bool = True


class TableRlsBody(Body):
    enabled: bool | None = None
    forced: bool | None = None


class RealtimeSettingsBody(Body):
    project_id: str
    schema_events_to_users: bool | None = None
    topics: list[Any] | None = None


def table_out(t: rls.TableRls) -> dict[str, Any]:
    return {
        "name": t.name,
        "rlsEnabled": t.enabled,
        "rlsForced": t.forced,
        "policies": [
            {
                "name": p.name,
                "command": p.command,
                "permissive": p.permissive,
                "roles": p.roles,
                "using": p.using,
                "withCheck": p.with_check,
            }
            for p in t.policies
        ],
    }


@get("/api/projects/{project_id:str}/rls", operation_id="listRls", tags=["rls"])
async def list_rls(project_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    tables = await rls.list_tables(ctx.tenants, access.project.id)
    return {"success": True, "tables": [table_out(t) for t in tables]}


@post(
    "/api/projects/{project_id:str}/rls/policies", operation_id="createPolicy", tags=["rls"], status_code=201
)
async def create_policy(
    project_id: str, data: CreatePolicyBody, ctx: AppContext, caller: Caller
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    table, enabled_now = await rls.create_policy(
        ctx.tenants,
        access.project.id,
        table=data.table,
        name=data.name,
        command=data.command,
        using=data.using,
        with_check=data.with_check,
        permissive=data.permissive,
    )
    out: dict[str, Any] = {"success": True, "table": table_out(table), "rlsEnabledNow": enabled_now}
    if enabled_now:
        out["message"] = (
            f'Row level security was off on table "{table.name}": Fluxbase ran ALTER TABLE … ENABLE ROW '
            "LEVEL SECURITY with this policy, so it applies now. Keys of scope read and readwrite (and end "
            "users) see only the rows policies allow; an admin key owns the table and bypasses RLS "
            "unless it is forced (POST …/rls/tables/{table} with forced: true)."
        )
    return out


@delete(
    "/api/projects/{project_id:str}/rls/policies/{table:str}/{name:str}",
    operation_id="dropPolicy",
    tags=["rls"],
    status_code=200,
)
async def drop_policy(
    project_id: str, table: str, name: str, ctx: AppContext, caller: Caller
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    return {
        "success": True,
        "table": table_out(await rls.drop_policy(ctx.tenants, access.project.id, table, name)),
    }


@post(
    "/api/projects/{project_id:str}/rls/tables/{table:str}",
    operation_id="setTableRls",
    tags=["rls"],
    status_code=200,
)
async def set_table_rls(
    project_id: str, table: str, data: TableRlsBody, ctx: AppContext, caller: Caller
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    found = await rls.set_table(
        ctx.tenants, access.project.id, table, enabled=data.enabled, forced=data.forced
    )
    return {"success": True, "table": table_out(found)}


@get("/api/realtime/settings", operation_id="getRealtimeSettings", tags=["realtime"])
async def get_realtime_settings(
    ctx: AppContext, caller: Caller, project_id: ProjectQ = None
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.READ)
    settings = await rls.realtime_settings(ctx.db, access.project.id)
    return {"success": True, "projectId": access.project.id, "settings": settings}


@post("/api/realtime/settings", operation_id="setRealtimeSettings", tags=["realtime"], status_code=200)
async def set_realtime_settings(
    data: RealtimeSettingsBody, ctx: AppContext, caller: Caller
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, data.project_id, Need.MANAGE)
    settings = await rls.set_realtime_settings(
        ctx.db, access.project.id, data.schema_events_to_users, data.topics
    )
    return {"success": True, "projectId": access.project.id, "settings": settings}
