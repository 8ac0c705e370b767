"""Dashboard accounts: register, login, logout, me; public admin status."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, post

from fluxbase.errors import AuthRequired
from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller, client_ip
from fluxbase.http.shapes import (
    AdminStatusAnswer,
    Body,
    LoginAnswer,
    LoginBody,
    MessageAnswer,
    Ok,
    RegisterBody,
    ResetAnswer,
    UserAnswer,
    user_out,
)
from fluxbase.services import accounts


def _session_user(caller: Caller) -> accounts.User:
    if caller.principal.user is None:
        raise AuthRequired("This endpoint needs a dashboard session token, not an API key.")
    return caller.principal.user


@post("/api/auth/register", operation_id="register", tags=["auth"], status_code=201)
async def register(data: RegisterBody, ctx: AppContext, request: Request[Any, Any, Any]) -> UserAnswer:
    user = await accounts.register(
        ctx.db, ctx.settings, data.email, data.password, data.display_name, client_ip(request, ctx)
    )
    return UserAnswer(user=user_out(user))


@post("/api/auth/login", operation_id="login", tags=["auth"], status_code=200)
async def login(data: LoginBody, ctx: AppContext, request: Request[Any, Any, Any]) -> LoginAnswer:
    session = await accounts.login(ctx.db, ctx.settings, data.email, data.password, client_ip(request, ctx))
    return LoginAnswer(token=session.token, expires_at=session.expires_at, user=user_out(session.user))


@post("/api/auth/logout", operation_id="logout", tags=["auth"], status_code=200)
async def logout(ctx: AppContext, caller: Caller) -> Ok:
    _session_user(caller)
    assert caller.principal.session_id is not None
    await accounts.logout(ctx.db, caller.principal.session_id)
    return Ok()


@get("/api/auth/me", operation_id="me", tags=["auth"])
async def me(caller: Caller) -> UserAnswer:
    return UserAnswer(user=user_out(_session_user(caller)))


class RecoverBody(Body):
    email: str


class ResetPasswordBody(Body):
    token: str
    password: str


@post("/api/auth/recover", operation_id="recoverAccount", tags=["auth"], status_code=202)
async def recover(data: RecoverBody, ctx: AppContext, request: Request[Any, Any, Any]) -> MessageAnswer:
    """Email a password-reset link; the same answer whether or not the address has an account."""
    await accounts.request_reset(ctx.db, ctx.settings, data.email, client_ip(request, ctx))
    return MessageAnswer(message="If this address belongs to an account, a message is on its way.")


@post("/api/auth/reset-password", operation_id="resetAccountPassword", tags=["auth"], status_code=200)
async def reset_password(data: ResetPasswordBody, ctx: AppContext) -> ResetAnswer:
    revoked = await accounts.reset_password(ctx.db, data.token, data.password)
    return ResetAnswer(revoked_sessions=revoked)


@get("/api/admin/status", operation_id="adminStatus", tags=["auth"])
async def admin_status(ctx: AppContext) -> AdminStatusAnswer:
    return AdminStatusAnswer(
        admin_exists=await accounts.admin_exists(ctx.db),
        registration_open=ctx.settings.auth.allow_registration,
    )
