"""POST /api/execute-sql (the reference doc's Core SQL API) and POST /api/execute-batch.

The services run the statements; this module renders their answers: `result`/`results`, the
`executionInfo` timing, and a failed statement as the SQL envelope (200, SQL_EXEC_ERROR or
QUERY_TIMEOUT, `details` with the SQLSTATE, `statementIndex` in a batch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import asyncpg
import msgspec
from litestar import MediaType, Request, Response, post

from fluxbase.errors import (
    AuthRequired,
    DatabaseUnavailable,
    ProjectNotFound,
    ProjectSuspended,
    StatementFailed,
    ValidationError,
)
from fluxbase.http.context import AppContext
from fluxbase.http.edge import bearer_token, remember_quota
from fluxbase.http.shapes import TOO_DEEP
from fluxbase.ratelimit import Quota
from fluxbase.security import apikeys
from fluxbase.services import sql
from fluxbase.services.access import KeyAuth, Need, Project, ProjectAccess, authenticate_key, authorize
from fluxbase.tenancy.results import ENCODER, StatementResult
from fluxbase.tenancy.session import Identity, Limits, TenantRequest

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
    except RecursionError:  # deeply nested `params`: a client error, not a 500
        raise ValidationError(TOO_DEEP) from None


async def request_identity(
    request: Request[Any, Any, Any], ctx: AppContext, access: ProjectAccess, auth_uid: str | None
) -> Identity:
    """Who a data request runs for: the end-user token (`X-Fluxbase-User-Token`), else the
    `authUid` a trusted key holder asserts; a `requireUserAuth` key must carry a token. The
    session of a Fluxbase project user is re-checked inside the request's transaction."""
    return await ctx.identity.identity(
        access,
        user_token=request.headers.get(USER_TOKEN_HEADER),
        auth_uid=auth_uid,
        session_checked_in_sql=True,
    )


_LIMITS: dict[int, tuple[object, Limits]] = {}


def limits_of(ctx: AppContext) -> Limits:
    """The request limits of these settings (built once per settings object: they are frozen)."""
    t = ctx.settings.tenant
    known = _LIMITS.get(id(t))
    if known is not None and known[0] is t:
        return known[1]
    if len(_LIMITS) > 64:
        _LIMITS.clear()
    limits = _LIMITS[id(t)] = (t, _limits(t))
    return limits[1]


def _limits(t: Any) -> Limits:
    return Limits(
        deadline_s=t.request_deadline_ms / 1000,
        max_rows=t.max_rows,
        max_bytes=t.max_bytes,
        acquire_timeout_s=t.pool_acquire_timeout_s,
    )


class _Grant:
    """`authorize`'s answer for one cached key, project and need, with what follows from it on
    every request: the rate limit and its name, whether a connection may open ahead, and the
    request's `TenantRequest` but for its identity and broadcast share."""

    __slots__ = (
        "access",
        "bearer",
        "ctx",
        "key_auth",
        "label",
        "limit",
        "need",
        "preopen",
        "project_id",
        "request",
        "settings",
        "window",
        "writes",
    )

    def __init__(
        self,
        ctx: AppContext,
        bearer: str,
        key_auth: KeyAuth,
        project_id: str,
        need: Need,
        access: ProjectAccess,
    ) -> None:
        self.ctx, self.settings, self.bearer, self.key_auth = ctx, ctx.settings, bearer, key_auth
        self.project_id, self.need, self.access = project_id, need, access
        self.limit, self.window = access.rate_limit(ctx.settings)
        self.label = access.principal.label
        key = access.principal.key
        # Not for a requireUserAuth key (see `_sql_access`); a key of a project on another
        # cluster gets no grant (it is checked uncached on the control plane every time).
        self.preopen = key is None or not key.require_user_auth
        self.writes = access.sql_scope != "read"
        self.request = _tenant_request(ctx, access, key_auth, _NOBODY, None)


_NOBODY = Identity(None, {}, "anon")  # (a grant's TenantRequest gets each request's identity)

# Per Authorization header of a cached key: the authorisation of its last project and need. All
# that `authorize` and the rate limit read is in the key's cached KeyAuth (its principal, its
# project's state) or in the frozen settings, so while the key cache hands out that same KeyAuth
# object a grant is the answer `authorize` would give; a key the cache dropped (entry expired,
# revocation seen, doorbell, settings changed) comes back as a new KeyAuth, and the grant is
# made again. A refusal is never remembered.
_GRANTS: dict[str, _Grant] = {}
_GRANTS_MAX = 10_000


def _granted(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str | None, need: Need
) -> tuple[_Grant, Quota] | None:
    """`sql_access`'s hot path, without a coroutine: the grant of a cached key and a token of
    this process's rate lease, or None (then `_sql_access`)."""
    headers = request.headers
    grant = _GRANTS.get(headers.get("authorization", ""))
    if (
        grant is None
        or grant.project_id != project_id
        or grant.need is not need
        or grant.ctx is not ctx
        or grant.settings is not ctx.settings
        # The key cache's own checks (expiry, allowed origins, lastUsedAt), on the same entry.
        or ctx.auth.cached_key(grant.bearer, headers.get("origin")) is not grant.key_auth
    ):
        return None
    quota = ctx.limiter.take(grant.label, grant.limit, grant.window)
    if quota is None:
        return None
    if grant.preopen:  # admitted: a cold project's connection opens meanwhile (issue 19)
        access = grant.access
        ctx.tenants.preopen(
            access.project.id, access.sql_scope, end_user=bool(headers.get(USER_TOKEN_HEADER))
        )
    remember_quota(request, quota)
    return grant, quota


async def sql_access(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str | None, need: Need = Need.READ
) -> tuple[ProjectAccess, KeyAuth | None, Quota]:
    """Authenticate (cached key on the hot path), authorise `need` and count the request.

    With an API key the second value is its cached state, whose liveness `tenancy.session.transaction`
    re-checks inside the request's transaction (the key may have been revoked since).
    """
    granted = _granted(request, ctx, project_id, need)
    if granted is not None:
        grant, quota = granted
        return grant.access, grant.key_auth, quota
    return await _sql_access(request, ctx, project_id, need)


async def _sql_access(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str | None, need: Need
) -> tuple[ProjectAccess, KeyAuth | None, Quota]:
    """`sql_access` without a grant at hand or a token of the lease (and for dashboard sessions)."""
    bearer = bearer_token(request)
    origin = request.headers.get("origin")
    key_auth: KeyAuth | None = None
    key_project: Project | None
    if bearer and apikeys.looks_like_key(bearer):
        # Hot path: the key's project and scope come from a short-lived cache; its liveness
        # is re-checked inside the request's transaction (auth epoch, fluxbase_guard.check_key).
        key_auth = await ctx.auth.key_for_sql(bearer, origin)
        principal, key_project = key_auth.principal, key_auth.project
    else:
        principal, key_project = await ctx.auth.principal(bearer, origin)
    # A data surface: request_identity applies the requireUserAuth rule right after.
    access = await authorize(ctx.db, principal, key_project, project_id, need, end_user_surface=True)
    if key_auth is not None and access.project.cluster_id != "default":
        # The in-transaction key guard reads the control plane, which is not in a registered
        # cluster's database: the key is checked there, uncached, just before (services.clusters).
        key_auth = await authenticate_key(ctx.db, bearer or "", origin)
        access = await authorize(
            ctx.db, key_auth.principal, key_auth.project, project_id, need, end_user_surface=True
        )
    elif (
        key_auth is not None
        and bearer is not None
        and project_id is not None
        # Only the canonical header: entries stay one per key and key-sized (review 18: `Bearer`
        # + n spaces + a key was a new entry of up to 256 KiB each, refused requests included).
        and request.headers.get("authorization") == "Bearer " + bearer
    ):
        if len(_GRANTS) >= _GRANTS_MAX:
            _GRANTS.clear()
        _GRANTS["Bearer " + bearer] = _Grant(ctx, bearer, key_auth, project_id, need, access)
    limit, window = access.rate_limit(ctx.settings)
    if access.project.cluster_id == "default":
        # Authenticated and authorised: a cold project's connection opens while the rate lease
        # is read (issue 19). The pool is the one the request will take (scope, end user or not).
        # Not for a requireUserAuth key: such a key is public (it ships in browser apps) and
        # authenticates nothing until its end-user token is verified, which happens after this;
        # nor for a caller this process knows to be out of tokens (hostile review 15: a made-up
        # token, or a key over its rate limit, opened a connection, then got 401 or 429).
        key = principal.key
        if (key is None or not key.require_user_auth) and not ctx.limiter.spent_out(
            principal.label, limit, window
        ):
            user_token = request.headers.get(USER_TOKEN_HEADER)
            ctx.tenants.preopen(access.project.id, access.sql_scope, end_user=bool(user_token))
    quota = await ctx.limiter.hit(principal.label, limit, window)
    remember_quota(request, quota)
    return access, key_auth, quota


@post("/api/execute-sql", operation_id="executeSql", tags=["sql"], status_code=200)
async def execute_sql(request: Request[Any, Any, Any], ctx: AppContext) -> Response[bytes]:
    """The route as Litestar serves it (and documents it); `http.fastpath` usually answers first."""
    return Response(content=await run_execute_sql(request, ctx), media_type=MediaType.JSON, status_code=200)


async def tenant_request(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    project_id: str | None,
    auth_uid: str | None,
    need: Need = Need.READ,
) -> TenantRequest:
    """Authenticate, authorise, count and resolve the identity of one data request."""
    granted = _granted(request, ctx, project_id, need)
    if granted is not None:  # the hot path: the grant's request with this one's identity
        grant, quota = granted
        return msgspec.structs.replace(
            grant.request,
            identity=await request_identity(request, ctx, grant.access, auth_uid),
            broadcasts=quota.remaining if grant.writes else None,
        )
    access, key_auth, quota = await _sql_access(request, ctx, project_id, need)
    identity = await request_identity(request, ctx, access, auth_uid)
    # Broadcasts from SQL spend the same window as the request (sql/0042): read keys cannot
    # call realtime.broadcast at all.
    return _tenant_request(
        ctx, access, key_auth, identity, quota.remaining if access.sql_scope != "read" else None
    )


def _tenant_request(
    ctx: AppContext,
    access: ProjectAccess,
    key_auth: KeyAuth | None,
    identity: Identity,
    broadcasts: int | None,
) -> TenantRequest:
    if access.project.cluster_id != "default":
        key_auth = None  # checked on the control plane in sql_access; no guard on that cluster
    return TenantRequest(
        project_id=access.project.id,
        scope=access.sql_scope,
        identity=identity,
        limits=limits_of(ctx),
        project_read_only=access.project.read_only,
        project_moving=access.project.moving,
        guard=(key_auth.key_hash, key_auth.project.id) if key_auth is not None else None,
        db_quota=access.project.db_quota,
        sizes=ctx.sizes,
        epoch=key_auth.epoch if key_auth is not None else None,
        evict_key=ctx.auth.evict,
        broadcasts=broadcasts,
    )


# What `refused_key` handles: a refused key or a project gone under its cached key.
KEY_REFUSALS = (
    AuthRequired,
    ProjectSuspended,
    DatabaseUnavailable,
    asyncpg.InvalidAuthorizationSpecificationError,
)


@contextlib.asynccontextmanager
async def forget_refused_key(ctx: AppContext, req: TenantRequest) -> AsyncIterator[None]:
    """`refused_key` around a block (execute-sql's hot path calls it from a plain `except`:
    a context manager per request costs ~90 bytecodes)."""
    try:
        yield
    except KEY_REFUSALS as exc:
        await refused_key(ctx, req, exc)


async def refused_key(ctx: AppContext, req: TenantRequest, exc: BaseException) -> NoReturn:
    """Re-raise `exc` (one of KEY_REFUSALS) from a tenant request, or what it means: a key the
    in-transaction guard refused (revoked, expired, suspended) leaves the cache.

    A project deleted since its key was cached (by any replica) has no roles left, so the tenant
    connection fails before any guard runs: that is the caller's credential being gone (401, or
    404 for a dashboard session), not a server error."""
    if isinstance(exc, AuthRequired | ProjectSuspended):
        if req.guard is not None:
            ctx.auth.evict(req.guard[0])
        raise exc
    if await _project_exists(ctx, req):
        if isinstance(exc, DatabaseUnavailable):
            raise exc
        raise DatabaseUnavailable() from None
    ctx.auth.forget_project(req.project_id)
    await ctx.tenants.close_project(req.project_id)
    if req.guard is not None:
        raise AuthRequired("API key is not valid.") from None
    raise ProjectNotFound() from None


async def _project_exists(ctx: AppContext, req: TenantRequest) -> bool:
    try:
        return bool(
            await ctx.db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM fluxbase.projects WHERE id = $1)", req.project_id
            )
        )
    except (OSError, asyncpg.PostgresError):
        return True  # the control plane is unreachable too: report the outage, not a verdict


async def run_execute_sql(request: Request[Any, Any, Any], ctx: AppContext) -> bytes:
    """One execute-sql request: the encoded body of a 200 answer, or a FluxbaseError."""
    body = decode_body(await request.body())
    auth_uid = body.auth_uid if body.auth_uid is not None else request.headers.get(AUTH_UID_HEADER)
    req = await tenant_request(request, ctx, body.project_id, auth_uid)
    started = time.perf_counter()
    try:
        res = await sql.execute(ctx.tenants, ctx.db, req, body.query, body.params)
    except StatementFailed as exc:
        return statement_failed_body(exc)
    except KEY_REFUSALS as exc:
        await refused_key(ctx, req, exc)
    elapsed_ms = (time.perf_counter() - started) * 1000
    return ENCODER.encode(
        {
            "success": True,
            "result": res.result(),
            "executionInfo": {
                "time": f"{round(elapsed_ms)}ms",
                "timeMs": round(elapsed_ms, 3),
                "rowCount": res.count,
                "operation": res.operation,
            },
        }
    )


class SqlError(msgspec.Struct):
    """The SQL envelope's error, in its field order."""

    message: str
    code: str
    details: str


def statement_failed_body(exc: StatementFailed, *, batch: bool = False) -> bytes:
    """A failed statement as execute-sql (or, with its index, execute-batch) answers it."""
    details = f"ERROR:  {exc.sqlstate}"
    if not batch:
        return ENCODER.encode({"success": False, "error": SqlError(exc.message, exc.code, details)})
    where = "commit" if exc.index is None else f"statement {exc.index}"
    error = {
        "message": f"{where}: {exc.message}",
        "code": exc.code,
        "details": details,
        "statementIndex": exc.index,
    }
    return ENCODER.encode({"success": False, "error": error})


def batch_body(results: list[StatementResult], elapsed_ms: float) -> bytes:
    return ENCODER.encode(
        {
            "success": True,
            "results": [r.result() for r in results],
            "executionInfo": {
                "time": f"{round(elapsed_ms)}ms",
                "timeMs": round(elapsed_ms, 3),
                "statements": len(results),
                "rowCount": sum(r.count for r in results),
                "operations": [r.operation for r in results],
            },
        }
    )


class BatchStatement(msgspec.Struct, rename="camel"):
    query: str
    params: list[Any] = []


class ExecuteBatchBody(msgspec.Struct, rename="camel"):
    project_id: str
    statements: list[BatchStatement]
    read_only: bool = False
    isolation_level: str = "read committed"
    auth_uid: str | None = None


_decode_batch = msgspec.json.Decoder(ExecuteBatchBody).decode


@post("/api/execute-batch", operation_id="executeBatch", tags=["sql"], status_code=200)
async def execute_batch(request: Request[Any, Any, Any], ctx: AppContext) -> Response[bytes]:
    try:
        body = _decode_batch(await request.body())
    except msgspec.ValidationError as exc:
        raise ValidationError(str(exc)) from None
    except msgspec.DecodeError:
        raise ValidationError("The request body must be JSON.") from None
    except RecursionError:
        raise ValidationError(TOO_DEEP) from None
    auth_uid = body.auth_uid if body.auth_uid is not None else request.headers.get(AUTH_UID_HEADER)
    req = await tenant_request(request, ctx, body.project_id, auth_uid)
    statements = [sql.Statement(s.query, s.params) for s in body.statements]
    started = time.perf_counter()
    try:
        async with forget_refused_key(ctx, req):
            results = await sql.execute_batch(
                ctx.tenants, ctx.db, req, statements, isolation=body.isolation_level, read_only=body.read_only
            )
    except StatementFailed as exc:
        content = statement_failed_body(exc, batch=True)
    else:
        content = batch_body(results, (time.perf_counter() - started) * 1000)
    return Response(content=content, media_type=MediaType.JSON, status_code=200)
