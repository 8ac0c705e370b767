"""Wire shapes: request Structs (camelCase, as in the reference doc) and response builders."""

from __future__ import annotations

from typing import Any

import msgspec

from fluxbase.services.access import Project
from fluxbase.services.accounts import User
from fluxbase.services.apikeys import ApiKey


class Body(msgspec.Struct, rename="camel", forbid_unknown_fields=False):
    """Base for JSON request bodies."""


class RegisterBody(Body):
    email: str
    password: str
    display_name: str = ""


class LoginBody(Body):
    email: str
    password: str


class CreateProjectBody(Body):
    name: str
    cluster_id: str | None = None  # instance admins only (services.clusters)


class CreateKeyBody(Body):
    name: str
    scope: str
    expires_in_days: int | None = None
    allowed_origins: list[str] = []
    rate_limit_requests: int | None = None
    rate_limit_window_seconds: int | None = None
    require_user_auth: bool = False


def user_out(u: User) -> dict[str, Any]:
    return {
        "id": u.id,
        "email": u.email,
        "displayName": u.display_name,
        "isInstanceAdmin": u.is_instance_admin,
        "createdAt": u.created_at,
    }


def project_out(p: Project, role: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": p.id,
        "name": p.name,
        "status": p.status,
        "readOnly": p.read_only,
        "createdAt": p.created_at,
    }
    if role is not None:
        out["role"] = role
    return out


def key_out(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "projectId": k.project_id,
        "name": k.name,
        "prefix": k.prefix,
        "scope": k.scope,
        "allowedOrigins": k.allowed_origins,
        "createdAt": k.created_at,
        "lastUsedAt": k.last_used_at,
        "expiresAt": k.expires_at,
        "revokedAt": k.revoked_at,
        "requireUserAuth": k.require_user_auth,
    }
