"""Instance administration of database clusters (/api/admin/clusters) and management keys.

Callers: an instance admin's dashboard session, or a management key (`flx_mgmt_…`, minted by an
instance admin) for automation. Management keys are accepted here only: everywhere else they are
not a credential at all, so they can never reach a project's data. Project API keys are refused.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, delete, get, patch, post

from fluxbase.errors import AuthRequired, InsufficientPermissions
from fluxbase.http.context import AppContext
from fluxbase.http.edge import bearer_token
from fluxbase.security import apikeys
from fluxbase.services import clusters, moves
from fluxbase.services.clusters import Cluster, ConnectionCheck, ManagementKey

TAGS = ["clusters"]


class _Wire(msgspec.Struct, rename="camel", omit_defaults=False):
    """Base for this controller's request and response bodies (camelCase on the wire)."""


class RegisterClusterBody(_Wire, forbid_unknown_fields=True):
    label: str
    connection_string: str
    region: str | None = None
    placement: str | None = None  # "open" | "closed"; default: open for a session, closed for a key


class UpdateClusterBody(_Wire, forbid_unknown_fields=True):
    label: str | None = None
    connection_string: str | None = None
    region: str | None = None
    placement: str | None = None  # "open" needs an instance admin's session


class MoveProjectBody(_Wire, forbid_unknown_fields=True):
    cluster_id: str


class ProjectMovedResponse(_Wire):
    project_id: str
    from_cluster_id: str
    cluster_id: str
    success: bool = True


class ClusterConnectionOut(_Wire):
    """Where the cluster is and who logs in; never the password."""

    host: str
    port: int
    database: str
    user: str


class ClusterOut(_Wire):
    id: str
    label: str
    region: str | None
    is_default: bool
    connection: ClusterConnectionOut | None
    server_version: int | None
    projects: int
    placement: str
    created_at: datetime
    updated_at: datetime


class ClusterResponse(_Wire):
    cluster: ClusterOut
    success: bool = True


class ClusterListResponse(_Wire):
    clusters: list[ClusterOut]
    success: bool = True


class RemovedResponse(_Wire):
    id: str
    success: bool = True


class FailureOut(_Wire):
    code: str  # CloudSync's lower-case name, e.g. database_unreachable
    message: str
    retryable: bool


class ConnectionCheckOut(_Wire):
    ok: bool
    checked_at: datetime
    latency_ms: float | None
    failure: FailureOut | None


class ConnectionCheckResponse(_Wire):
    connection: ConnectionCheckOut
    success: bool = True


class CreateManagementKeyBody(_Wire, forbid_unknown_fields=True):
    name: str


class ManagementKeyOut(_Wire):
    id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ManagementKeyCreated(_Wire):
    key: str  # shown once
    management_key: ManagementKeyOut
    success: bool = True


class ManagementKeyResponse(_Wire):
    management_key: ManagementKeyOut
    success: bool = True


class ManagementKeyListResponse(_Wire):
    management_keys: list[ManagementKeyOut]
    success: bool = True


def _cluster_out(c: Cluster) -> ClusterOut:
    conn = None if c.target is None else ClusterConnectionOut(**c.target.public())
    return ClusterOut(
        c.id,
        c.label,
        c.region,
        c.target is None,
        conn,
        c.server_version,
        c.projects,
        c.placement,
        c.created_at,
        c.updated_at,
    )


def _check_out(c: ConnectionCheck) -> ConnectionCheckOut:
    failure = None
    if c.failure is not None:
        failure = FailureOut(c.failure.failure, c.failure.message, c.failure.retryable)
    return ConnectionCheckOut(c.ok, c.checked_at, c.latency_ms, failure)


def _key_out(k: ManagementKey) -> ManagementKeyOut:
    return ManagementKeyOut(k.id, k.name, k.prefix, k.created_at, k.last_used_at, k.revoked_at)


async def _instance_admin(
    request: Request[Any, Any, Any], ctx: AppContext, *, allow_key: bool = True
) -> str | None:
    """The caller must be an instance admin's session (returns the user id) or, where
    `allow_key`, a live management key (returns None)."""
    bearer = bearer_token(request)
    if bearer and clusters.looks_like_management_key(bearer):
        if not allow_key:
            raise InsufficientPermissions(
                "Management keys are minted and revoked by an instance admin's session."
            )
        await clusters.authenticate_management_key(ctx.db, bearer)
        return None
    if bearer and apikeys.looks_like_key(bearer):
        raise InsufficientPermissions("Project API keys cannot manage database clusters.")
    principal, _ = await ctx.auth.principal(bearer, request.headers.get("origin"))
    if principal.user is None:
        raise AuthRequired()
    clusters.require_instance_admin(principal.user.is_instance_admin)
    return principal.user.id


@post("/api/admin/clusters", operation_id="registerCluster", tags=TAGS, status_code=201)
async def register_cluster(
    request: Request[Any, Any, Any], ctx: AppContext, data: RegisterClusterBody
) -> ClusterResponse:
    user_id = await _instance_admin(request, ctx)
    c = await clusters.register_cluster(
        ctx.db,
        ctx.settings,
        data.label,
        data.connection_string,
        data.region,
        by_session=user_id is not None,
        placement=data.placement,
    )
    return ClusterResponse(_cluster_out(c))


@get("/api/admin/clusters", operation_id="listClusters", tags=TAGS)
async def list_clusters(request: Request[Any, Any, Any], ctx: AppContext) -> ClusterListResponse:
    await _instance_admin(request, ctx)
    return ClusterListResponse([_cluster_out(c) for c in await clusters.list_clusters(ctx.db)])


@get("/api/admin/clusters/{cluster_id:str}", operation_id="getCluster", tags=TAGS)
async def get_cluster(request: Request[Any, Any, Any], ctx: AppContext, cluster_id: str) -> ClusterResponse:
    await _instance_admin(request, ctx)
    return ClusterResponse(_cluster_out(await clusters.get_cluster(ctx.db, cluster_id)))


@patch("/api/admin/clusters/{cluster_id:str}", operation_id="updateCluster", tags=TAGS)
async def update_cluster(
    request: Request[Any, Any, Any], ctx: AppContext, cluster_id: str, data: UpdateClusterBody
) -> ClusterResponse:
    user_id = await _instance_admin(request, ctx)
    c = await clusters.update_cluster(
        ctx.db,
        ctx.settings,
        cluster_id,
        label=data.label,
        region=data.region,
        connection_string=data.connection_string,
        clear_region=data.region == "",
        placement=data.placement,
        by_session=user_id is not None,
    )
    if data.connection_string is not None:
        # This process at once; the others when the control doorbell rings (sql/0045).
        await ctx.cluster_pools().forget_changed()
        await ctx.tenants.forget_moved()
    return ClusterResponse(_cluster_out(c))


@delete("/api/admin/clusters/{cluster_id:str}", operation_id="removeCluster", tags=TAGS, status_code=200)
async def remove_cluster(
    request: Request[Any, Any, Any], ctx: AppContext, cluster_id: str
) -> RemovedResponse:
    await _instance_admin(request, ctx)
    await clusters.remove_cluster(ctx.db, cluster_id)
    return RemovedResponse(cluster_id)


@get("/api/admin/clusters/{cluster_id:str}/connection", operation_id="checkClusterConnection", tags=TAGS)
async def check_connection(
    request: Request[Any, Any, Any], ctx: AppContext, cluster_id: str
) -> ConnectionCheckResponse:
    await _instance_admin(request, ctx)
    return ConnectionCheckResponse(
        _check_out(await clusters.check_connection(ctx.db, ctx.settings, cluster_id))
    )


@post("/api/admin/management-keys", operation_id="createManagementKey", tags=TAGS, status_code=201)
async def create_management_key(
    request: Request[Any, Any, Any], ctx: AppContext, data: CreateManagementKeyBody
) -> ManagementKeyCreated:
    user_id = await _instance_admin(request, ctx, allow_key=False)
    assert user_id is not None
    raw, key = await clusters.create_management_key(ctx.db, user_id, data.name)
    return ManagementKeyCreated(raw, _key_out(key))


@get("/api/admin/management-keys", operation_id="listManagementKeys", tags=TAGS)
async def list_management_keys(request: Request[Any, Any, Any], ctx: AppContext) -> ManagementKeyListResponse:
    await _instance_admin(request, ctx, allow_key=False)
    return ManagementKeyListResponse([_key_out(k) for k in await clusters.list_management_keys(ctx.db)])


@delete(
    "/api/admin/management-keys/{key_id:str}", operation_id="revokeManagementKey", tags=TAGS, status_code=200
)
async def revoke_management_key(
    request: Request[Any, Any, Any], ctx: AppContext, key_id: str
) -> ManagementKeyResponse:
    await _instance_admin(request, ctx, allow_key=False)
    return ManagementKeyResponse(_key_out(await clusters.revoke_management_key(ctx.db, key_id)))


@post("/api/admin/projects/{project_id:str}/move", operation_id="moveProject", tags=TAGS, status_code=200)
async def move_project(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str, data: MoveProjectBody
) -> ProjectMovedResponse:
    """Move a project to another cluster (services.moves): read-only while its schema and data
    are copied, then switched; keys, storage, webhooks and team are untouched. A management key
    moves projects only to clusters open to placement."""
    user_id = await _instance_admin(request, ctx)
    source = await moves.move_project(
        ctx.db,
        ctx.cluster_pools(),
        ctx.tenants,
        ctx.settings,
        project_id,
        data.cluster_id,
        by_session=user_id is not None,
    )
    ctx.auth.forget_all()  # cached keys carry the project's cluster
    return ProjectMovedResponse(project_id, source, data.cluster_id)


ROUTES = [
    move_project,
    register_cluster,
    list_clusters,
    get_cluster,
    update_cluster,
    remove_cluster,
    check_connection,
    create_management_key,
    list_management_keys,
    revoke_management_key,
]
