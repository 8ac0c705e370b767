"""POST /api/execute-sql: the reference doc's Core SQL API."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import MediaType, Request, Response, post

from fluxbase.errors import AuthRequired, ProjectSuspended, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.http.edge import bearer_token
from fluxbase.security import apikeys
from fluxbase.services import sql
from fluxbase.services.access import Need, Project, ProjectAccess, authorize
from fluxbase.services.identity import key_identity

AUTH_UID_HEADER = "x-fluxbase-auth-uid"
USER_TOKEN_HEADER = "x-fluxbase-user-token"  # noqa: S105 (a header name)


class ExecuteSqlBody(msgspec.Struct, rename="camel"):
    project_id: str
    query: str
    params: list[Any] = []
    auth_uid: str | None = None


_decode = msgspec.json.Decoder(ExecuteSqlBody).decode


def decode_body(raw: bytes) -> ExecuteSqlBody:
    try:
        return _decode(raw)
    except msgspec.ValidationError as exc:
        raise ValidationError(str(exc)) from None
    except msgspec.DecodeError:
        raise ValidationError("The request body must be JSON.") from None


def identity_for(access: ProjectAccess, auth_uid: str | None) -> sql.Identity:
    """The identity an `authUid` asserts (no end-user token); see IdentityResolver.identity."""
    return key_identity(access, auth_uid)


def limits_of(ctx: AppContext) -> sql.Limits:
    t = ctx.settings.tenant
    return sql.Limits(
        deadline_s=t.request_deadline_ms / 1000,
        max_rows=t.max_rows,
        max_bytes=t.max_bytes,
        acquire_timeout_s=t.pool_acquire_timeout_s,
    )


@post("/api/execute-sql", operation_id="executeSql", tags=["sql"], status_code=200)
async def execute_sql(request: Request[Any, Any, Any], ctx: AppContext) -> Response[bytes]:
    body = decode_body(await request.body())
    bearer = bearer_token(request)
    origin = request.headers.get("origin")
    guard: tuple[bytes, str] | None = None
    key_project: Project | None
    if bearer and apikeys.looks_like_key(bearer):
        # Hot path: the key's project and scope come from a short-lived cache; its liveness
        # is re-checked inside the request's transaction by fluxbase_guard.check_key.
        key_auth = await ctx.auth.key_for_sql(bearer, origin)
        principal, key_project = key_auth.principal, key_auth.project
        guard = (key_auth.key_hash, key_auth.project.id)
    else:
        principal, key_project = await ctx.auth.principal(bearer, origin)
    access = await authorize(ctx.db, principal, key_project, body.project_id, Need.READ)
    limit, window = access.rate_limit(ctx.settings)
    ctx.limiter.hit(principal.label, limit, window)
    auth_uid = body.auth_uid if body.auth_uid is not None else request.headers.get(AUTH_UID_HEADER)
    identity = await ctx.identity.identity(
        access,
        user_token=request.headers.get(USER_TOKEN_HEADER),
        auth_uid=auth_uid,
        session_checked_in_sql=True,
    )
    try:
        result = await sql.execute(
            ctx.tenants,
            ctx.db,
            project_id=access.project.id,
            scope=access.sql_scope,
            read_only=access.project.read_only and guard is None,
            query=body.query,
            params=body.params,
            identity=identity,
            limits=limits_of(ctx),
            guard=guard,
        )
    except (AuthRequired, ProjectSuspended):
        if guard is not None:
            ctx.auth.evict(guard[0])
        raise
    return Response(content=result, media_type=MediaType.JSON, status_code=200)
