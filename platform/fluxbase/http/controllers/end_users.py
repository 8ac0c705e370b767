"""Project end users: /api/projects/{id}/auth/* (public user endpoints and admin endpoints)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.params import QueryParameter

from fluxbase.errors import AuthRequired, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller, bearer_token, client_ip
from fluxbase.http.shapes import Body
from fluxbase.services import end_users
from fluxbase.services.access import Need, authorize

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


_decode_patch = msgspec.json.Decoder(AuthSettingsPatch).decode


def user_out(u: end_users.ProjectUser) -> dict[str, Any]:
    return {
        "id": u.id,
        "email": u.email,
        "displayName": u.display_name,
        "emailVerified": u.email_verified_at is not None,
        "emailVerifiedAt": u.email_verified_at,
        "disabled": u.disabled_at is not None,
        "disabledAt": u.disabled_at,
        "createdAt": u.created_at,
        "lastLoginAt": u.last_login_at,
    }


def pair_out(p: end_users.TokenPair) -> dict[str, Any]:
    return {
        "success": True,
        "accessToken": p.access_token,
        "tokenType": "bearer",
        "expiresAt": p.expires_at,
        "refreshToken": p.refresh_token,
        "user": user_out(p.user),
    }


def settings_out(c: end_users.AuthConfig) -> dict[str, Any]:
    # jwtSecret is write-only: only whether one is set is ever returned.
    return {
        "registrationOpen": c.registration_open,
        "jwtSecretSet": c.jwt_secret is not None,
        "jwksUri": c.jwks_uri,
        "jwtAllowedIssuers": list(c.jwt_allowed_issuers),
        "jwtExpectedAudiences": list(c.jwt_expected_audiences),
        "emailVerification": c.email_verification,
        "redirectUrls": list(c.redirect_urls),
    }


def _user_token(request: Request[Any, Any, Any]) -> str:
    token = bearer_token(request)
    if not token:
        raise AuthRequired("Send the user's access token as Authorization: Bearer <accessToken>.")
    return token


# -- end users (no API key; the project's own users) -------------------------------------------


@post(f"{BASE}/register", operation_id="projectUserRegister", tags=["end-user auth"], status_code=201)
async def register(
    project_id: str, data: UserRegisterBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> dict[str, Any]:
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
    return {"success": True, "user": user_out(user)}


@post(f"{BASE}/login", operation_id="projectUserLogin", tags=["end-user auth"], status_code=200)
async def login(
    project_id: str, data: UserLoginBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> dict[str, Any]:
    pair = await end_users.login(
        ctx.db, ctx.settings, project_id, data.email, data.password, client_ip(request, ctx)
    )
    return pair_out(pair)


@post(f"{BASE}/refresh", operation_id="projectUserRefresh", tags=["end-user auth"], status_code=200)
async def refresh(project_id: str, data: RefreshBody, ctx: AppContext) -> dict[str, Any]:
    return pair_out(await end_users.refresh(ctx.db, ctx.settings, project_id, data.refresh_token))


@post(f"{BASE}/logout", operation_id="projectUserLogout", tags=["end-user auth"], status_code=200)
async def logout(project_id: str, ctx: AppContext, request: Request[Any, Any, Any]) -> dict[str, Any]:
    claims, _ = await end_users.verify_own(ctx.db, ctx.settings, project_id, _user_token(request))
    await end_users.logout(ctx.db, claims["sid"])
    return {"success": True}


@get(f"{BASE}/me", operation_id="projectUserMe", tags=["end-user auth"])
async def me(project_id: str, ctx: AppContext, request: Request[Any, Any, Any]) -> dict[str, Any]:
    _, user = await end_users.verify_own(ctx.db, ctx.settings, project_id, _user_token(request))
    return {"success": True, "user": user_out(user)}


# -- email flows (no API key; requests answer the same whether or not the address exists) -------

# The one answer of every request endpoint, whatever the address.
REQUESTED = {"success": True, "message": "If this address belongs to an account, a message is on its way."}


async def _request(
    purpose: str, project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> dict[str, Any]:
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
) -> dict[str, Any]:
    return await _request("verify", project_id, data, ctx, request)


@post(f"{BASE}/verify", operation_id="projectUserVerifyEmail", tags=["end-user auth"], status_code=200)
async def verify_email(project_id: str, data: TokenBody, ctx: AppContext) -> dict[str, Any]:
    user = await end_users.verify_email(ctx.db, project_id, data.token)
    return {"success": True, "user": user_out(user)}


@post(f"{BASE}/recover", operation_id="projectUserRecover", tags=["end-user auth"], status_code=202)
async def recover(
    project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> dict[str, Any]:
    return await _request("reset", project_id, data, ctx, request)


@post(
    f"{BASE}/reset-password", operation_id="projectUserResetPassword", tags=["end-user auth"], status_code=200
)
async def reset_password(project_id: str, data: ResetPasswordBody, ctx: AppContext) -> dict[str, Any]:
    revoked = await end_users.reset_password(ctx.db, project_id, data.token, data.password)
    return {"success": True, "revokedSessions": revoked}


@post(f"{BASE}/magic-link", operation_id="projectUserMagicLink", tags=["end-user auth"], status_code=202)
async def magic_link(
    project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> dict[str, Any]:
    return await _request("magic_link", project_id, data, ctx, request)


@post(
    f"{BASE}/magic-link/verify",
    operation_id="projectUserMagicLinkLogin",
    tags=["end-user auth"],
    status_code=200,
)
async def magic_link_login(project_id: str, data: TokenBody, ctx: AppContext) -> dict[str, Any]:
    return pair_out(await end_users.magic_link_login(ctx.db, ctx.settings, project_id, data.token))


@post(
    f"{BASE}/email-change",
    operation_id="projectUserRequestEmailChange",
    tags=["end-user auth"],
    status_code=202,
)
async def request_email_change(
    project_id: str, data: EmailRequestBody, ctx: AppContext, request: Request[Any, Any, Any]
) -> dict[str, Any]:
    _, user = await end_users.verify_own(ctx.db, ctx.settings, project_id, _user_token(request))
    await end_users.request_email_change(
        ctx.db, ctx.settings, user, data.email, data.redirect_to, client_ip(request, ctx)
    )
    return {"success": True, "message": "A confirmation link was sent to the new address."}


@post(
    f"{BASE}/email-change/confirm",
    operation_id="projectUserConfirmEmailChange",
    tags=["end-user auth"],
    status_code=200,
)
async def confirm_email_change(project_id: str, data: TokenBody, ctx: AppContext) -> dict[str, Any]:
    user = await end_users.confirm_email_change(ctx.db, project_id, data.token)
    return {"success": True, "user": user_out(user)}


# -- admin (Need.MANAGE) ------------------------------------------------------------------------


@get(f"{BASE}/users", operation_id="listProjectUsers", tags=["end-user auth"])
async def list_users(
    project_id: str,
    ctx: AppContext,
    caller: Caller,
    limit: LimitQ = None,
    offset: OffsetQ = None,
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    users, total = await end_users.list_users(ctx.db, access.project.id, limit or 100, offset or 0)
    return {"success": True, "users": [user_out(u) for u in users], "total": total}


@post(
    f"{BASE}/users/{{user_id:str}}/disable",
    operation_id="disableProjectUser",
    tags=["end-user auth"],
    status_code=200,
)
async def disable_user(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    user = await end_users.set_disabled(ctx.db, access.project.id, user_id, True)
    return {"success": True, "user": user_out(user)}


@post(
    f"{BASE}/users/{{user_id:str}}/enable",
    operation_id="enableProjectUser",
    tags=["end-user auth"],
    status_code=200,
)
async def enable_user(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    user = await end_users.set_disabled(ctx.db, access.project.id, user_id, False)
    return {"success": True, "user": user_out(user)}


@post(
    f"{BASE}/users/{{user_id:str}}/revoke-sessions",
    operation_id="revokeProjectUserSessions",
    tags=["end-user auth"],
    status_code=200,
)
async def revoke_sessions(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    revoked = await end_users.revoke_sessions(ctx.db, access.project.id, user_id)
    return {"success": True, "revokedSessions": revoked}


@delete(
    f"{BASE}/users/{{user_id:str}}",
    operation_id="deleteProjectUser",
    tags=["end-user auth"],
    status_code=200,
)
async def delete_user(project_id: str, user_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    await end_users.delete_user(ctx.db, access.project.id, user_id)
    return {"success": True, "userId": user_id}


@get(f"{BASE}/settings", operation_id="getProjectAuthSettings", tags=["end-user auth"])
async def get_settings(project_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    return {"success": True, "settings": settings_out(await end_users.get_config(ctx.db, access.project.id))}


@patch(f"{BASE}/settings", operation_id="updateProjectAuthSettings", tags=["end-user auth"])
async def update_settings(
    project_id: str, ctx: AppContext, caller: Caller, request: Request[Any, Any, Any]
) -> dict[str, Any]:
    try:
        body = _decode_patch(await request.body())
    except msgspec.ValidationError as exc:
        raise ValidationError(str(exc)) from None
    except msgspec.DecodeError:
        raise ValidationError("The request body must be JSON.") from None
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    changes = {f: getattr(body, f) for f in body.__struct_fields__ if getattr(body, f) is not msgspec.UNSET}
    config = await end_users.update_config(ctx.db, access.project.id, changes)
    ctx.identity.forget(access.project.id)
    return {"success": True, "settings": settings_out(config)}
