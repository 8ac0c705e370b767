"""Project API keys: shown once, stored as SHA-256, rotated and revoked at once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg

from fluxbase import ids
from fluxbase.errors import InsufficientPermissions, NotFound, ValidationError
from fluxbase.security import apikeys
from fluxbase.services.access import SCOPE_RANK, ProjectAccess


@dataclass(frozen=True)
class ApiKey:
    id: str
    project_id: str
    name: str
    prefix: str
    scope: str
    allowed_origins: list[str]
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    require_user_auth: bool = False

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> ApiKey:
        return cls(
            r["id"],
            r["project_id"],
            r["name"],
            r["prefix"],
            r["scope"],
            list(r["allowed_origins"]),
            r["created_at"],
            r["last_used_at"],
            r["expires_at"],
            r["revoked_at"],
            r["require_user_auth"],
        )


def _check_origins(origins: list[str]) -> list[str]:
    out = []
    for o in origins:
        parts = urlsplit(o)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValidationError(
                f"allowedOrigins entries must look like https://app.example.com, got {o!r}."
            )
        out.append(f"{parts.scheme}://{parts.netloc}")
    return out


def _may_manage(access: ProjectAccess, scope: str) -> None:
    """Members with the admin role manage every key; an admin key only read/readwrite keys."""
    if access.principal.key is not None and SCOPE_RANK[scope] >= SCOPE_RANK["admin"]:
        raise InsufficientPermissions("An API key may only manage read and readwrite keys.")


async def create_key(
    db: asyncpg.Pool,
    access: ProjectAccess,
    *,
    name: str,
    scope: str,
    expires_in_days: int | None = None,
    allowed_origins: list[str] | None = None,
    rate_limit: tuple[int, int] | None = None,
    require_user_auth: bool = False,
) -> tuple[str, ApiKey]:
    if scope not in SCOPE_RANK:
        raise ValidationError("scope must be one of read, readwrite, admin.")
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ValidationError("name must be 1 to 100 characters.")
    if expires_in_days is not None and not 1 <= expires_in_days <= 3650:
        raise ValidationError("expiresInDays must be between 1 and 3650.")
    _may_manage(access, scope)
    origins = _check_origins(allowed_origins or [])
    raw = apikeys.generate()
    expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
    row = await db.fetchrow(
        """INSERT INTO fluxbase.api_keys (id, project_id, name, prefix, key_hash, scope, allowed_origins,
               expires_at, created_by, rate_limit_requests, rate_limit_window_s, require_user_auth)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING *""",
        ids.prefixed("key"),
        access.project.id,
        name,
        apikeys.display_prefix(raw),
        apikeys.hash_key(raw),
        scope,
        origins,
        expires,
        access.principal.label,
        rate_limit[0] if rate_limit else None,
        rate_limit[1] if rate_limit else None,
        require_user_auth,
    )
    assert row is not None
    return raw, ApiKey.from_row(row)


async def list_keys(db: asyncpg.Pool, project_id: str) -> list[ApiKey]:
    rows = await db.fetch(
        "SELECT * FROM fluxbase.api_keys WHERE project_id = $1 ORDER BY created_at, id", project_id
    )
    return [ApiKey.from_row(r) for r in rows]


async def _get(db: asyncpg.Pool | asyncpg.Connection, project_id: str, key_id: str) -> ApiKey:
    row = await db.fetchrow(
        "SELECT * FROM fluxbase.api_keys WHERE id = $1 AND project_id = $2", key_id, project_id
    )
    if row is None:
        raise NotFound("No such API key in this project.")
    return ApiKey.from_row(row)


async def rotate_key(db: asyncpg.Pool, access: ProjectAccess, key_id: str) -> tuple[str, ApiKey]:
    """A new secret for the same key id; the old secret stops working in the same commit."""
    current = await _get(db, access.project.id, key_id)
    _may_manage(access, current.scope)
    if current.revoked_at is not None:
        raise ValidationError("A revoked key cannot be rotated.")
    raw = apikeys.generate()
    # The old hash is remembered (sql/0024) so that the old secret is answered "rotated".
    row = await db.fetchrow(
        """WITH old AS (SELECT key_hash FROM fluxbase.api_keys
                        WHERE id = $1 AND project_id = $2 AND revoked_at IS NULL FOR UPDATE),
                retired AS (INSERT INTO fluxbase.rotated_api_keys (key_hash, key_id)
                            SELECT key_hash, $1 FROM old ON CONFLICT (key_hash) DO NOTHING)
           UPDATE fluxbase.api_keys k SET key_hash = $3, prefix = $4, last_used_at = NULL
           FROM old WHERE k.id = $1 RETURNING k.*""",
        key_id,
        access.project.id,
        apikeys.hash_key(raw),
        apikeys.display_prefix(raw),
    )
    if row is None:
        raise NotFound("No such API key in this project.")
    return raw, ApiKey.from_row(row)


async def revoke_key(db: asyncpg.Pool, access: ProjectAccess, key_id: str) -> ApiKey:
    current = await _get(db, access.project.id, key_id)
    _may_manage(access, current.scope)
    row = await db.fetchrow(
        """UPDATE fluxbase.api_keys SET revoked_at = coalesce(revoked_at, now())
           WHERE id = $1 AND project_id = $2 RETURNING *""",
        key_id,
        access.project.id,
    )
    assert row is not None
    return ApiKey.from_row(row)
