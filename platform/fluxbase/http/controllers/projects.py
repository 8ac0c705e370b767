"""Projects and their API keys."""

from __future__ import annotations

import contextlib

from litestar import delete, get, post

from fluxbase.errors import AuthRequired, StorageUnavailable, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import (
    CreateKeyBody,
    CreateProjectBody,
    KeyAnswer,
    KeyCreated,
    KeysAnswer,
    ProjectAnswer,
    ProjectDeleted,
    ProjectsAnswer,
    key_out,
    project_out,
)
from fluxbase.services import apikeys, clusters, projects
from fluxbase.services.access import Need
from fluxbase.storage.service import delete_project_objects


def _user_id(caller: Caller) -> str:
    if caller.principal.user is None:
        raise AuthRequired("This endpoint needs a dashboard session token, not an API key.")
    return caller.principal.user.id


@post("/api/projects", operation_id="createProject", tags=["projects"], status_code=201)
async def create_project(data: CreateProjectBody, ctx: AppContext, caller: Caller) -> ProjectAnswer:
    user_id = _user_id(caller)
    if data.cluster_id is not None:  # choosing a cluster is an instance admin's decision
        clusters.require_instance_admin(
            caller.principal.user is not None and caller.principal.user.is_instance_admin
        )
    project = await projects.create_project(
        ctx.db,
        ctx.settings,
        user_id,
        data.name,
        cluster_pools=ctx.cluster_pools(),
        cluster_id=data.cluster_id,
    )
    return ProjectAnswer(project=project_out(project, "admin"))


@get("/api/projects", operation_id="listProjects", tags=["projects"])
async def list_projects(ctx: AppContext, caller: Caller) -> ProjectsAnswer:
    rows = await projects.list_projects(ctx.db, _user_id(caller))
    return ProjectsAnswer(projects=[project_out(p, role) for p, role in rows])


@get("/api/projects/{project_id:str}", operation_id="getProject", tags=["projects"])
async def get_project(project_id: str, ctx: AppContext, caller: Caller) -> ProjectAnswer:
    access = await caller.access(ctx, project_id, Need.READ)
    return ProjectAnswer(project=project_out(access.project, access.member_role))


@delete("/api/projects/{project_id:str}", operation_id="deleteProject", tags=["projects"], status_code=200)
async def delete_project(project_id: str, ctx: AppContext, caller: Caller) -> ProjectDeleted:
    access = await caller.access(ctx, project_id, Need.OWNER)
    await ctx.tenants.close_project(access.project.id)
    await projects.delete_project(ctx.db, access.project.id, ctx.cluster_pools())
    ctx.auth.forget_project(access.project.id)  # its cached keys die now, not when they expire
    # Rows are gone; the bytes follow (if S3 is down, housekeeping removes them as orphans).
    with contextlib.suppress(StorageUnavailable):
        await delete_project_objects(ctx.store, access.project.id)
    return ProjectDeleted(project_id=access.project.id)


_INT4_MAX = 2**31 - 1


def _rate_limit(data: CreateKeyBody) -> tuple[int, int] | None:
    if data.rate_limit_requests is None:
        return None
    window = data.rate_limit_window_seconds or 10
    if data.rate_limit_requests < 1 or window < 1:
        raise ValidationError("rateLimitRequests and rateLimitWindowSeconds must be positive.")
    if data.rate_limit_requests > _INT4_MAX or window > _INT4_MAX:  # the columns are `integer`
        raise ValidationError(f"rateLimitRequests and rateLimitWindowSeconds must be at most {_INT4_MAX}.")
    return data.rate_limit_requests, window


@post(
    "/api/projects/{project_id:str}/api-keys", operation_id="createApiKey", tags=["api-keys"], status_code=201
)
async def create_key(project_id: str, data: CreateKeyBody, ctx: AppContext, caller: Caller) -> KeyCreated:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    raw, key = await apikeys.create_key(
        ctx.db,
        access,
        name=data.name,
        scope=data.scope,
        expires_in_days=data.expires_in_days,
        allowed_origins=data.allowed_origins,
        rate_limit=_rate_limit(data),
        require_user_auth=data.require_user_auth,
    )
    return KeyCreated(key=raw, api_key=key_out(key))


@get("/api/projects/{project_id:str}/api-keys", operation_id="listApiKeys", tags=["api-keys"])
async def list_keys(project_id: str, ctx: AppContext, caller: Caller) -> KeysAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    return KeysAnswer(api_keys=[key_out(k) for k in await apikeys.list_keys(ctx.db, access.project.id)])


@post(
    "/api/projects/{project_id:str}/api-keys/{key_id:str}/rotate",
    operation_id="rotateApiKey",
    tags=["api-keys"],
    status_code=200,
)
async def rotate_key(project_id: str, key_id: str, ctx: AppContext, caller: Caller) -> KeyCreated:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    raw, key = await apikeys.rotate_key(ctx.db, access, key_id)
    return KeyCreated(key=raw, api_key=key_out(key))


@delete(
    "/api/projects/{project_id:str}/api-keys/{key_id:str}",
    operation_id="revokeApiKey",
    tags=["api-keys"],
    status_code=200,
)
async def revoke_key(project_id: str, key_id: str, ctx: AppContext, caller: Caller) -> KeyAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    key = await apikeys.revoke_key(ctx.db, access, key_id)
    return KeyAnswer(api_key=key_out(key))
