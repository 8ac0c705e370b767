"""Project end users: /api/projects/{id}/auth/* (public user endpoints and admin endpoints)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.params import QueryParameter

from fluxbase.errors import AuthRequired
from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller, bearer_token, client_ip
from fluxbase.http.shapes import Answer, Body, MessageAnswer, Ok, Out, ResetAnswer, decode_body
from fluxbase.services import end_users
from fluxbase.services.access import Need

BASE = "/api/projects/{project_id:str}/auth"
LimitQ = Annotated[int | None, QueryParameter(name="limit", required=False)]
OffsetQ = Annotated[int | None, QueryParameter(name="offset", required=False)]


class UserRegisterBody(Body):
    email: str
    password: str
    display_name: str = ""
    redirect_to: str | None = None


class EmailRequestBody(Body):
    email: str
    redirect_to: str | None = None


class TokenBody(Body):
    token: str


class ResetPasswordBody(Body):
    token: str
    password: str


class UserLoginBody(Body):
    email: str
    password: str


class RefreshBody(Body):
    refresh_token: str


class AuthSettingsPatch(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    """PATCH body: absent fields stay as they are; null clears."""

    registration_open: bool | msgspec.UnsetType = msgspec.UNSET
    jwt_secret: str | msgspec.UnsetType | None = msgspec.UNSET
    jwks_uri: str | msgspec.UnsetType | None = msgspec.UNSET
    jwt_allowed_issuers: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    jwt_expected_audiences: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    email_verification: str | msgspec.UnsetType = msgspec.UNSET
    redirect_urls: list[str] | msgspec.UnsetType | None = msgspec.UNSET


class ProjectUserOut(Out):
    id: str
    email: str
    display_name: str
    email_verified: bool
    email_verified_at: datetime | None
    disabled: bool
    disabled_at: datetime | None
    created_at: datetime
    last_login_at: datetime | None


class TokenPairAnswer(Answer, kw_only=True):
    access_token: str
    token_type: str
    expires_at: int
    refresh_token: str
    user: ProjectUserOut


class AuthSettingsOut(Out):
    registration_open: bool
    jwt_secret_set: bool
    jwks_uri: str | None
    jwt_allowed_issuers: list[str]
    jwt_expected_audiences: list[str]
    email_verification: str
    redirect_urls: list[str]


class ProjectUserAnswer(Answer, kw_only=True):
    user: ProjectUserOut


class ProjectUsersAnswer(Answer, kw_only=True):
    users: list[ProjectUserOut]
    total: int


class UserDeleted(Answer, kw_only=True):
    user_id: str


class AuthSettingsAnswer(Answer, kw_only=True):
    settings: AuthSettingsOut


def user_out(u: end_users.ProjectUser) -> ProjectUserOut:
    return ProjectUserOut(
        u.id,
        u.email,
        u.display_name,
        u.email_verified_at is not None,
        u.email_verified_at,
        u.disabled_at is not None,
        u.disabled_at,
        u.created_at,
        u.last_login_at,
    )


def pair_out(p: end_users.TokenPair) -> TokenPairAnswer:
    return TokenPairAnswer(
        access_token=p.access_token,
        token_type="bearer",  # noqa: S106 (the token type, not a secret)
        expires_at=p.expires_at,
        refresh_token=p.refresh_token,
        user=user_out(p.user),
    )


def settings_out(c: end_users.AuthConfig) -> AuthSettingsOut:
    # jwtSecret is write-only: only whether one is set is ever returned.
    return AuthSettingsOut(
        c.registration_open,
        c.jwt_secret is not None,
        c.jwks_uri,
        list(c.jwt_allowed_issuers),
        list(c.jwt_expected_audiences),
        c.email_verification,
        list(c.redirect_urls),
    )


def _user_token(request: Request[Any, Any, Any]) -> str:
    token = bearer_token(request)
    if not token:
        raise AuthRequired("Send the user's access token as Authorization: Bearer <accessToken>.")
    return token


# -- end users (no API key; the project's own users) -------------------------------------------


@post(f"{BASE}/register", operation_id="projectUserRegister", tags=["end-user auth"], status_code=201)
async def register(
    project_id: str, data: UserRegisterBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> ProjectUserAnswer:
    user = await end_users.register(
        ctx.db,
        ctx.settings,
        project_id,
        data.email,
        data.password,
        data.display_name,
        client_ip(request, ctx),
        data.redirect_to,
    )
    return ProjectUserAnswer(user=user_out(user))


@post(f"{BASE}/login", operation_id="projectUserLogin", tags=["end-user auth"], status_code=200)
async def login(
    project_id: str, data: UserLoginBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> TokenPairAnswer:
    pair = await end_users.login(
        ctx.db, ctx.settings, project_id, data.email, data.password, client_ip(request, ctx)
    )
    return pair_out(pair)


@post(f"{BASE}/refresh", operation_id="projectUserRefresh", tags=["end-user auth"], status_code=200)
async def refresh(project_id: str, data: RefreshBody, ctx: AppContext) -> TokenPairAnswer:
    return pair_out(await end_users.refresh(ctx.db, ctx.settings, project_id, data.refresh_token))


@post(f"{BASE}/logout", operation_id="projectUserLogout", tags=["end-user auth"], status_code=200)
async def logout(project_id: str, ctx: AppContext, request: Request[Any, Any, Any]) -> Ok:
    claims, _ = await end_users.verify_own(ctx.db, ctx.settings, project_id, _user_token(request))
    await end_users.logout(ctx.db, claims["sid"])
    return Ok()


@get(f"{BASE}/me", operation_id="projectUserMe", tags=["end-user auth"])
async def me(project_id: str, ctx: AppContext, request: Request[Any, Any, Any]) -> ProjectUserAnswer:
    _, user = await end_users.verify_own(ctx.db, ctx.settings, project_id, _user_token(request))
    return ProjectUserAnswer(user=user_out(user))


# -- email flows (no API key; requests answer the same whether or not the address exists) -------

# The one answer of every request endpoint, whatever the address.
REQUESTED = MessageAnswer(message="If this address belongs to an account, a message is on its way.")


async def _request(
    purpose: str, project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> MessageAnswer:
    await end_users.request_link(
        ctx.db, ctx.settings, project_id, purpose, data.email, data.redirect_to, client_ip(request, ctx)
    )
    return REQUESTED


@post(
    f"{BASE}/verify/request",
    operation_id="projectUserRequestVerification",
    tags=["end-user auth"],
    status_code=202,
)
async def request_verification(
    project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> MessageAnswer:
    return await _request("verify", project_id, data, ctx, request)


@post(f"{BASE}/verify", operation_id="projectUserVerifyEmail", tags=["end-user auth"], status_code=200)
async def verify_email(project_id: str, data: TokenBody, ctx: AppContext) -> ProjectUserAnswer:
    user = await end_users.verify_email(ctx.db, project_id, data.token)
    return ProjectUserAnswer(user=user_out(user))


@post(f"{BASE}/recover", operation_id="projectUserRecover", tags=["end-user auth"], status_code=202)
async def recover(
    project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> MessageAnswer:
    return await _request("reset", project_id, data, ctx, request)


@post(
    f"{BASE}/reset-password", operation_id="projectUserResetPassword", tags=["end-user auth"], status_code=200
)
async def reset_password(project_id: str, data: ResetPasswordBody, ctx: AppContext) -> ResetAnswer:
    revoked = await end_users.reset_password(ctx.db, project_id, data.token, data.password)
    return ResetAnswer(revoked_sessions=revoked)


@post(f"{BASE}/magic-link", operation_id="projectUserMagicLink", tags=["end-user auth"], status_code=202)
async def magic_link(
    project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> MessageAnswer:
    return await _request("magic_link", project_id, data, ctx, request)


@post(
    f"{BASE}/magic-link/verify",
    operation_id="projectUserMagicLinkLogin",
    tags=["end-user auth"],
    status_code=200,
)
async def magic_link_login(project_id: str, data: TokenBody, ctx: AppContext) -> TokenPairAnswer:
    return pair_out(await end_users.magic_link_login(ctx.db, ctx.settings, project_id, data.token))


@post(
    f"{BASE}/email-change",
    operation_id="projectUserRequestEmailChange",
    tags=["end-user auth"],
    status_code=202,
)
async def request_email_change(
    project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> MessageAnswer:
    _, user = await end_users.verify_own(ctx.db, ctx.settings, project_id, _user_token(request))
    await end_users.request_email_change(
        ctx.db, ctx.settings, user, data.email, data.redirect_to, client_ip(request, ctx)
    )
    return MessageAnswer(message="A confirmation link was sent to the new address.")


@post(
    f"{BASE}/email-change/confirm",
    operation_id="projectUserConfirmEmailChange",
    tags=["end-user auth"],
    status_code=200,
)
async def confirm_email_change(project_id: str, data: TokenBody, ctx: AppContext) -> ProjectUserAnswer:
    user = await end_users.confirm_email_change(ctx.db, project_id, data.token)
    return ProjectUserAnswer(user=user_out(user))


# -- admin (Need.MANAGE) ------------------------------------------------------------------------


@get(f"{BASE}/users", operation_id="listProjectUsers", tags=["end-user auth"])
async def list_users(
    project_id: str,
    ctx: AppContext,
    caller: Caller,
    limit: LimitQ = None,
    offset: OffsetQ = None,
) -> ProjectUsersAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    users, total = await end_users.list_users(ctx.db, access.project.id, limit or 100, offset or 0)
    return ProjectUsersAnswer(users=[user_out(u) for u in users], total=total)


@post(
    f"{BASE}/users/{{user_id:str}}/disable",
    operation_id="disableProjectUser",
    tags=["end-user auth"],
    status_code=200,
)
async def disable_user(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> ProjectUserAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    user = await end_users.set_disabled(ctx.db, access.project.id, user_id, True)
    return ProjectUserAnswer(user=user_out(user))


@post(
    f"{BASE}/users/{{user_id:str}}/enable",
    operation_id="enableProjectUser",
    tags=["end-user auth"],
    status_code=200,
)
async def enable_user(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> ProjectUserAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    user = await end_users.set_disabled(ctx.db, access.project.id, user_id, False)
    return ProjectUserAnswer(user=user_out(user))


@post(
    f"{BASE}/users/{{user_id:str}}/revoke-sessions",
    operation_id="revokeProjectUserSessions",
    tags=["end-user auth"],
    status_code=200,
)
async def revoke_sessions(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> ResetAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    revoked = await end_users.revoke_sessions(ctx.db, access.project.id, user_id)
    return ResetAnswer(revoked_sessions=revoked)


@delete(
    f"{BASE}/users/{{user_id:str}}",
    operation_id="deleteProjectUser",
    tags=["end-user auth"],
    status_code=200,
)
async def delete_user(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> UserDeleted:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    await end_users.delete_user(ctx.db, access.project.id, user_id)
    return UserDeleted(user_id=user_id)


@get(f"{BASE}/settings", operation_id="getProjectAuthSettings", tags=["end-user auth"])
async def get_settings(project_id: str, ctx: AppContext, caller: Caller) -> AuthSettingsAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    return AuthSettingsAnswer(settings=settings_out(await end_users.get_config(ctx.db, access.project.id)))


@patch(f"{BASE}/settings", operation_id="updateProjectAuthSettings", tags=["end-user auth"])
async def update_settings(
    project_id: str, ctx: AppContext, caller: Caller, request: Request[Any, Any, Any]
) -> AuthSettingsAnswer:
    body = decode_body(await request.body(), AuthSettingsPatch)
    access = await caller.access(ctx, project_id, Need.MANAGE)
    changes = {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not msgspec.UNSET}
    config = await end_users.update_config(ctx.db, access.project.id, changes)
    ctx.identity.forget(access.project.id)
    return AuthSettingsAnswer(settings=settings_out(config))
