"""Realtime control endpoints: table switches, version cursor, tokens, broadcasts."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller, bearer_token
from fluxbase.http.shapes import Answer, Out
from fluxbase.security import apikeys, usertokens
from fluxbase.services import realtime
from fluxbase.services.access import Need
from fluxbase.services.realtime import Minter

ProjectQ = Annotated[str | None, QueryParameter(name="projectId", required=False)]


class TablesBody(msgspec.Struct, rename="camel"):
    project_id: str
    tables: list[str]


class TokenBody(msgspec.Struct, rename="camel"):
    project_id: str
    auth_uid: str | None = None
    expires_in: int = 3600


class BroadcastBody(msgspec.Struct, rename="camel"):
    project_id: str
    event: str
    payload: Any = None


class RealtimeTable(Out):
    name: str
    enabled: bool


class TablesAnswer(Answer, kw_only=True):
    tables: list[RealtimeTable]


class VersionAnswer(Answer, kw_only=True):
    project_id: str
    version: str | None


class TokenAnswer(Answer, kw_only=True):
    token: str
    expires_at: int
    project_id: str


class BroadcastAnswer(Answer, kw_only=True):
    id: int


def _tables(rows: list[dict[str, Any]]) -> TablesAnswer:
    return TablesAnswer(tables=[RealtimeTable(r["name"], r["enabled"]) for r in rows])


@get("/api/realtime/tables", operation_id="listRealtimeTables", tags=["realtime"])
async def list_tables(ctx: AppContext, caller: Caller, project_id: ProjectQ = None) -> TablesAnswer:
    access = await caller.access(ctx, project_id, Need.READ)
    home = await ctx.cluster_pools().pool(access.project.cluster_id)  # where its tables live
    return _tables(await realtime.list_tables(home, access.project.id))


@post("/api/realtime/enable", operation_id="enableRealtime", tags=["realtime"], status_code=200)
async def enable(data: TablesBody, ctx: AppContext, caller: Caller) -> TablesAnswer:
    access = await caller.access(ctx, data.project_id, Need.SCHEMA)
    home = await ctx.cluster_pools().pool(access.project.cluster_id)  # its switches live there
    return _tables(await realtime.set_enabled(home, access.project.id, data.tables, True))


@post("/api/realtime/disable", operation_id="disableRealtime", tags=["realtime"], status_code=200)
async def disable(data: TablesBody, ctx: AppContext, caller: Caller) -> TablesAnswer:
    access = await caller.access(ctx, data.project_id, Need.SCHEMA)
    home = await ctx.cluster_pools().pool(access.project.cluster_id)  # its switches live there
    return _tables(await realtime.set_enabled(home, access.project.id, data.tables, False))


@get("/api/version", operation_id="getVersion", tags=["realtime"])
async def version(ctx: AppContext, caller: Caller, project_id: ProjectQ = None) -> VersionAnswer:
    access = await caller.access(ctx, project_id, Need.READ)
    return VersionAnswer(
        project_id=access.project.id,
        # The newest event in the outbox of the project's cluster (its events are written there).
        version=await realtime.latest_cursor(
            await ctx.cluster_pools().pool(access.project.cluster_id), access.project.id
        ),
    )


@post("/api/realtime/token", operation_id="createRealtimeToken", tags=["realtime"], status_code=201)
async def create_token(
    data: TokenBody, ctx: AppContext, caller: Caller, request: Request[Any, Any, Any]
) -> TokenAnswer:
    access = await caller.access(ctx, data.project_id, Need.READ, end_user_surface=True)
    # The same identity rules as SQL: an end-user token wins, requireUserAuth keys need one.
    user_token = request.headers.get("x-fluxbase-user-token")
    identity = await ctx.identity.identity(access, user_token=user_token, auth_uid=data.auth_uid)
    token, exp = realtime.mint_token(
        ctx.settings.auth.secret_key,
        access.project.id,
        access.sql_scope,
        identity.uid if user_token else data.auth_uid,
        data.expires_in,
        _minter(caller, request, identity.claims if user_token else None),
    )
    return TokenAnswer(token=token, expires_at=exp, project_id=access.project.id)


def _minter(caller: Caller, request: Request[Any, Any, Any], user_claims: dict[str, Any] | None) -> Minter:
    """The credentials a realtime token dies with: the key (this version of it) or the member's
    session, and a project user's own session."""
    principal = caller.principal
    key_id = fingerprint = member_id = session_id = user_session = None
    if principal.key is not None:
        bearer = bearer_token(request)
        assert bearer is not None  # the key was authenticated from it
        key_id, fingerprint = principal.key.id, realtime.key_fingerprint(apikeys.hash_key(bearer))
    elif principal.user is not None:
        member_id, session_id = principal.user.id, principal.session_id
    if user_claims is not None and user_claims.get("iss") == usertokens.OWN_ISSUER:
        user_session = str(user_claims["sid"])
    return Minter(key_id, fingerprint, member_id, session_id, user_session)


@post("/api/realtime/broadcast", operation_id="broadcast", tags=["realtime"], status_code=200)
async def broadcast(
    data: BroadcastBody, ctx: AppContext, caller: Caller, request: Request[Any, Any, Any]
) -> BroadcastAnswer:
    access = await caller.access(ctx, data.project_id, Need.WRITE, end_user_surface=True)
    # A requireUserAuth (browser) key broadcasts only for a verified end user, as it runs SQL
    # and as it broadcasts over the socket.
    await ctx.identity.identity(
        access, user_token=request.headers.get("x-fluxbase-user-token"), auth_uid=None
    )
    event_id = await realtime.broadcast(ctx.db, access.project.id, data.event, data.payload)
    return BroadcastAnswer(id=event_id)
