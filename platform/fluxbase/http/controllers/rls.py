"""Row Level Security management and the realtime setting for end users.

Every endpoint here needs `Need.MANAGE` except reading the realtime setting: policies decide
who sees which rows, so only an admin-scope key or an admin member may read or change them.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import delete, get, post
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Answer, Body, Out
from fluxbase.services import rls
from fluxbase.services.access import Need

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


class PolicyOut(Out):
    name: str
    command: str
    permissive: bool
    roles: list[str]
    using: str | None
    with_check: str | None


class TableRlsOut(Out):
    name: str
    rls_enabled: bool
    rls_forced: bool
    policies: list[PolicyOut]


class RlsAnswer(Answer, kw_only=True):
    tables: list[TableRlsOut]


class TableAnswer(Answer, kw_only=True):
    table: TableRlsOut


class PolicyCreated(Answer, kw_only=True):
    """`message` only when the policy switched row level security on."""

    table: TableRlsOut
    rls_enabled_now: bool
    message: str | msgspec.UnsetType = msgspec.UNSET


class RealtimeSettingsOut(Out):
    schema_events_to_users: bool
    topics: list[Any]


class RealtimeSettingsAnswer(Answer, kw_only=True):
    project_id: str
    settings: RealtimeSettingsOut


def table_out(t: rls.TableRls) -> TableRlsOut:
    return TableRlsOut(
        t.name,
        t.enabled,
        t.forced,
        [PolicyOut(p.name, p.command, p.permissive, p.roles, p.using, p.with_check) for p in t.policies],
    )


def _settings(project_id: str, settings: dict[str, Any]) -> RealtimeSettingsAnswer:
    out = RealtimeSettingsOut(settings["schemaEventsToUsers"], settings["topics"])
    return RealtimeSettingsAnswer(project_id=project_id, settings=out)


@get("/api/projects/{project_id:str}/rls", operation_id="listRls", tags=["rls"])
async def list_rls(project_id: str, ctx: AppContext, caller: Caller) -> RlsAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    tables = await rls.list_tables(ctx.tenants, access.project.id)
    return RlsAnswer(tables=[table_out(t) for t in tables])


@post(
    "/api/projects/{project_id:str}/rls/policies", operation_id="createPolicy", tags=["rls"], status_code=201
)
async def create_policy(
    project_id: str, data: CreatePolicyBody, ctx: AppContext, caller: Caller
) -> PolicyCreated:
    access = await caller.access(ctx, project_id, Need.MANAGE)
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
    out = PolicyCreated(table=table_out(table), rls_enabled_now=enabled_now)
    if enabled_now:
        out.message = (
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
async def drop_policy(project_id: str, table: str, name: str, ctx: AppContext, caller: Caller) -> TableAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    return TableAnswer(table=table_out(await rls.drop_policy(ctx.tenants, access.project.id, table, name)))


@post(
    "/api/projects/{project_id:str}/rls/tables/{table:str}",
    operation_id="setTableRls",
    tags=["rls"],
    status_code=200,
)
async def set_table_rls(
    project_id: str, table: str, data: TableRlsBody, ctx: AppContext, caller: Caller
) -> TableAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    found = await rls.set_table(
        ctx.tenants, access.project.id, table, enabled=data.enabled, forced=data.forced
    )
    return TableAnswer(table=table_out(found))


@get("/api/realtime/settings", operation_id="getRealtimeSettings", tags=["realtime"])
async def get_realtime_settings(
    ctx: AppContext, caller: Caller, project_id: ProjectQ = None
) -> RealtimeSettingsAnswer:
    access = await caller.access(ctx, project_id, Need.READ)
    settings = await rls.realtime_settings(ctx.db, access.project.id)
    return _settings(access.project.id, settings)


@post("/api/realtime/settings", operation_id="setRealtimeSettings", tags=["realtime"], status_code=200)
async def set_realtime_settings(
    data: RealtimeSettingsBody, ctx: AppContext, caller: Caller
) -> RealtimeSettingsAnswer:
    access = await caller.access(ctx, data.project_id, Need.MANAGE)
    settings = await rls.set_realtime_settings(
        ctx.db, access.project.id, data.schema_events_to_users, data.topics
    )
    return _settings(access.project.id, settings)
