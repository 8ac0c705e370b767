"""Dashboard accounts: register, login, logout, me; public admin status."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, post

from fluxbase.errors import AuthRequired
from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller, client_ip
from fluxbase.http.shapes import Body, LoginBody, RegisterBody, user_out
from fluxbase.services import accounts


def _session_user(caller: Caller) -> accounts.User:
    if caller.principal.user is None:
        raise AuthRequired("This endpoint needs a dashboard session token, not an API key.")
    return caller.principal.user


@post("/api/auth/register", operation_id="register", tags=["auth"], status_code=201)
async def register(data: RegisterBody, ctx: AppContext, request: Request[Any, Any, Any]) -> dict[str, Any]:
    user = await accounts.register(
        ctx.db, ctx.settings, data.email, data.password, data.display_name, client_ip(request, ctx)
    )
    return {"success": True, "user": user_out(user)}


@post("/api/auth/login", operation_id="login", tags=["auth"], status_code=200)
async def login(data: LoginBody, ctx: AppContext, request: Request[Any, Any, Any]) -> dict[str, Any]:
    session = await accounts.login(ctx.db, ctx.settings, data.email, data.password, client_ip(request, ctx))
    return {
        "success": True,
        "token": session.token,
        "expiresAt": session.expires_at,
        "user": user_out(session.user),
    }


@post("/api/auth/logout", operation_id="logout", tags=["auth"], status_code=200)
async def logout(ctx: AppContext, caller: Caller) -> dict[str, Any]:
    _session_user(caller)
    assert caller.principal.session_id is not None
    await accounts.logout(ctx.db, caller.principal.session_id)
    return {"success": True}


@get("/api/auth/me", operation_id="me", tags=["auth"])
async def me(caller: Caller) -> dict[str, Any]:
    return {"success": True, "user": user_out(_session_user(caller))}


class RecoverBody(Body):
    email: str


class ResetPasswordBody(Body):
    token: str
    password: str


@post("/api/auth/recover", operation_id="recoverAccount", tags=["auth"], status_code=202)
async def recover(data: RecoverBody, ctx: AppContext, request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Email a password-reset link; the same answer whether or not the address has an account."""
    await accounts.request_reset(ctx.db, ctx.settings, data.email, client_ip(request, ctx))
    return {"success": True, "message": "If this address belongs to an account, a message is on its way."}


@post("/api/auth/reset-password", operation_id="resetAccountPassword", tags=["auth"], status_code=200)
async def reset_password(data: ResetPasswordBody, ctx: AppContext) -> dict[str, Any]:
    revoked = await accounts.reset_password(ctx.db, data.token, data.password)
    return {"success": True, "revokedSessions": revoked}


@get("/api/admin/status", operation_id="adminStatus", tags=["auth"])
async def admin_status(ctx: AppContext) -> dict[str, Any]:
    return {
        "success": True,
        "adminExists": await accounts.admin_exists(ctx.db),
        "registrationOpen": ctx.settings.auth.allow_registration,
    }
