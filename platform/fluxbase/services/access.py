"""Who is calling and what they may do: the one permission model every project endpoint obeys.

A caller is a *principal*: a project API key (checked by scope) or a dashboard session
(checked by the member's role). `authorize` turns (principal, project, need) into a
`ProjectAccess` or raises the documented error. Handlers never check permissions themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import msgspec

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.db.control import fetchrow_stateless
from fluxbase.errors import (
    AuthRequired,
    InsufficientPermissions,
    OriginNotAllowed,
    ProjectMoving,
    ProjectNotFound,
    ProjectReadOnly,
    ProjectSuspended,
    ScopeMismatch,
    UserTokenRequired,
    ValidationError,
)
from fluxbase.security import apikeys
from fluxbase.services import accounts
from fluxbase.services.accounts import User

SCOPE_RANK = {"read": 0, "readwrite": 1, "admin": 2}
ROLE_RANK = {"viewer": 0, "developer": 1, "admin": 2}
# The SQL role a dashboard member's session runs as.
ROLE_SQL_SCOPE = {"viewer": "read", "developer": "admin", "admin": "admin"}


class Need(enum.Enum):
    """What an endpoint requires, as (minimum key scope or None, minimum member role)."""

    READ = ("read", "viewer")  # read data, list, sign downloads
    WRITE = ("readwrite", "developer")  # insert/update data, upload
    SCHEMA = ("admin", "developer")  # DDL, buckets, realtime switches
    MANAGE = ("admin", "admin")  # keys, webhooks, team, settings
    OWNER = (None, "admin")  # dashboard-only: delete the project

    def __init__(self, min_scope: str | None, min_role: str) -> None:
        # Plain attributes: read on every request (an enum `.value` property costs ~20 bytecodes).
        self.min_scope = min_scope
        self.min_role = min_role


@dataclass(frozen=True)
class ApiKeyIdentity:
    id: str
    project_id: str
    scope: str
    rate_limit: tuple[int, int] | None
    require_user_auth: bool = False  # every data call must carry a valid end-user token


@dataclass(frozen=True)
class Principal:
    user: User | None = None
    session_id: str | None = None
    key: ApiKeyIdentity | None = None

    @functools.cached_property
    def label(self) -> str:
        """The rate limiter's name (computed once: a cached key's principal serves many requests)."""
        return f"key:{self.key.id}" if self.key else f"user:{self.user.id if self.user else '?'}"


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    status: str
    read_only: bool
    rate_limit: tuple[int, int] | None
    created_at: datetime
    db_quota: int | None = None  # database-size cap in bytes (None: no cap)
    cluster_id: str = "default"  # the database cluster the project lives on (services.clusters)
    moving: bool = False  # being moved to another cluster (services.moves): writes are refused

    @classmethod
    def from_row(cls, row: asyncpg.Record, prefix: str = "") -> Project:
        rl = row[prefix + "rate_limit_requests"], row[prefix + "rate_limit_window_s"]
        return cls(
            row[prefix + "id"],
            row[prefix + "name"],
            row[prefix + "status"],
            row[prefix + "read_only"],
            (rl[0], rl[1]) if rl[0] else None,
            row[prefix + "created_at"],
            row.get(prefix + "db_quota_bytes"),
            row.get(prefix + "cluster_id") or "default",
            row.get(prefix + "moving_to") is not None,
        )


class ProjectAccess(msgspec.Struct, frozen=True):
    """The outcome of authorisation: the project, the caller, and the SQL scope to run as."""

    project: Project
    principal: Principal
    sql_scope: str
    member_role: str | None

    def rate_limit(self, settings: Settings) -> tuple[int, int]:
        key = self.principal.key
        if key is not None and key.rate_limit:
            return key.rate_limit
        if self.project.rate_limit:
            return self.project.rate_limit
        return settings.tenant.rate_limit_requests, settings.tenant.rate_limit_window_s


# The key, its project and the project's auth epoch in one snapshot, and lastUsedAt touched in
# the same statement (one round trip on a cold key, not two): only for a key that is live (not
# revoked or expired), used from an origin it allows ($2 NULL: no Origin header) and not
# touched in the last minute. The touch changes no column the auth-epoch or control-bell
# triggers watch (sql/0011, sql/0038).
_KEY_QUERY = """
WITH k AS (
SELECT k.id AS k_id, k.project_id AS k_project_id, k.scope, k.allowed_origins, k.expires_at,
       k.revoked_at, k.last_used_at, k.rate_limit_requests AS k_rlr, k.rate_limit_window_s AS k_rlw,
       k.require_user_auth,
       p.id AS p_id, p.name AS p_name, p.status AS p_status, p.read_only AS p_read_only,
       p.rate_limit_requests AS p_rate_limit_requests, p.rate_limit_window_s AS p_rate_limit_window_s,
       p.created_at AS p_created_at, p.db_quota_bytes AS p_db_quota_bytes, p.cluster_id AS p_cluster_id,
       p.moving_to AS p_moving_to,
       (SELECT e.epoch FROM fluxbase_guard.auth_epochs e WHERE e.project_id = k.project_id) AS epoch
FROM fluxbase.api_keys k JOIN fluxbase.projects p ON p.id = k.project_id
WHERE k.key_hash = $1
), touched AS (
UPDATE fluxbase.api_keys t SET last_used_at = now() FROM k
WHERE t.id = k.k_id AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
  AND (cardinality(k.allowed_origins) = 0 OR $2::text = ANY (k.allowed_origins))
  AND (k.last_used_at IS NULL OR k.last_used_at < now() - interval '60 seconds')
)
SELECT * FROM k
"""


@dataclass(frozen=True)
class KeyAuth:
    """An API key resolved to its principal and project (what the key cache holds)."""

    principal: Principal
    project: Project
    key_hash: bytes
    allowed_origins: tuple[str, ...]
    expires_at: datetime | None
    # The project's auth epoch (sql/0011), read in the same snapshot as the state above.
    epoch: int | None = None


def _check_origin(auth: KeyAuth, origin: str | None) -> None:
    if auth.allowed_origins and origin not in auth.allowed_origins:
        raise OriginNotAllowed()


async def authenticate_key(db: asyncpg.Pool, raw_key: str, origin: str | None) -> KeyAuth:
    if not apikeys.well_formed(raw_key):
        raise AuthRequired("API key is malformed (checksum mismatch).")
    key_hash = apikeys.hash_key(raw_key)
    row = await fetchrow_stateless(db, _KEY_QUERY, key_hash, origin)
    if row is None:
        if await db.fetchval("SELECT true FROM fluxbase.rotated_api_keys WHERE key_hash = $1", key_hash):
            raise AuthRequired(
                "API key has been rotated: use the new key that the rotation returned (the old one "
                "stopped working at once)."
            )
        raise AuthRequired("API key is not valid.")
    if row["revoked_at"] is not None:
        raise AuthRequired("API key has been revoked.")
    now = datetime.now(UTC)
    if row["expires_at"] is not None and row["expires_at"] <= now:
        raise AuthRequired("API key has expired.")
    rl = (row["k_rlr"], row["k_rlw"]) if row["k_rlr"] else None
    key = ApiKeyIdentity(row["k_id"], row["k_project_id"], row["scope"], rl, row["require_user_auth"])
    auth = KeyAuth(
        Principal(key=key),
        Project.from_row(row, "p_"),
        key_hash,
        tuple(row["allowed_origins"]),
        row["expires_at"],
        row["epoch"],
    )
    _check_origin(auth, origin)
    return auth


class Authenticator:
    """Resolves a bearer credential to a principal, remembering the key's own project.

    `key_for_sql` serves keys from a short-lived in-process cache for the SQL hot path; the
    caller must then run `fluxbase_guard.check_key` inside its transaction, which refuses a key
    revoked or expired (or a project suspended) since it was cached, so revocation still takes
    effect at once.
    """

    CACHE_TTL_S = 30.0
    CACHE_MAX = 10_000
    TOUCH_EVERY_S = 60.0

    def __init__(self, db: asyncpg.Pool, settings: Settings):
        self.db = db
        self.settings = settings
        # Told each project a cold key lookup read (the API's tenancy.pools.TenantPools.locate:
        # the project's cluster then needs no query of its own on its first request).
        self.on_project: Callable[[Project], None] | None = None
        self._cache: dict[str, tuple[float, KeyAuth]] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def principal(self, bearer: str | None, origin: str | None) -> tuple[Principal, Project | None]:
        if not bearer:
            raise AuthRequired()
        if apikeys.looks_like_key(bearer):
            auth = await authenticate_key(self.db, bearer, origin)
            return auth.principal, auth.project
        user, session_id = await accounts.authenticate_session(self.db, self.settings, bearer)
        return Principal(user=user, session_id=session_id), None

    def cached_key(self, raw_key: str, origin: str | None) -> KeyAuth | None:
        """`key_for_sql` from the cache, without a coroutine (the hot path): None when the key
        is not cached (then `await key_for_sql`)."""
        # Keyed by the key itself: a hit skips the checksum and the SHA-256 (the process
        # already holds every key it is sent; the cache adds no new place for one to leak).
        hit = self._cache.get(raw_key)
        if hit is None:
            return None
        now = time.monotonic()
        if hit[0] <= now:
            return None
        auth = hit[1]
        if auth.expires_at is not None and auth.expires_at <= datetime.now(UTC):
            raise AuthRequired("API key has expired.")
        if auth.allowed_origins and origin not in auth.allowed_origins:
            raise OriginNotAllowed()
        self._touch(auth, now)
        return auth

    async def key_for_sql(self, raw_key: str, origin: str | None) -> KeyAuth:
        auth = self.cached_key(raw_key, origin)
        if auth is not None:
            return auth
        now = time.monotonic()
        auth = await authenticate_key(self.db, raw_key, origin)
        if self.on_project is not None:
            self.on_project(auth.project)
        if auth.project.status != "active":
            # Never cache a suspended project: resuming must take effect on the next request
            # (the guard only re-checks in the direction active → suspended).
            return auth
        if len(self._cache) >= self.CACHE_MAX:
            self._cache.clear()
        self._cache[raw_key] = (now + self.CACHE_TTL_S, auth)
        assert auth.principal.key is not None
        self._touched[auth.principal.key.id] = now
        return auth

    def evict(self, key_hash: bytes) -> None:
        for raw_key, (_, auth) in list(self._cache.items()):
            if auth.key_hash == key_hash:
                self._cache.pop(raw_key, None)

    def forget_all(self) -> None:
        """Drop every cached key (the control doorbell rang: another replica changed a key or project)."""
        self._cache.clear()

    def forget_project(self, project_id: str) -> None:
        """Drop this process's cached keys of a project (after its settings changed)."""
        for raw_key, (_, auth) in list(self._cache.items()):
            if auth.project.id == project_id:
                self._cache.pop(raw_key, None)

    def _touch(self, auth: KeyAuth, now: float) -> None:
        """Keep lastUsedAt roughly current without a write per request."""
        assert auth.principal.key is not None
        key_id = auth.principal.key.id
        if now - self._touched.get(key_id, 0.0) < self.TOUCH_EVERY_S:
            return
        self._touched[key_id] = now
        task = asyncio.create_task(self._touch_db(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch_db(self, key_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.db.execute("UPDATE fluxbase.api_keys SET last_used_at = now() WHERE id = $1", key_id)


async def load_project(db: asyncpg.Pool, project_id: str) -> Project:
    if not isinstance(project_id, str) or not ids.valid_project_id(project_id):
        raise ProjectNotFound()
    row = await db.fetchrow("SELECT * FROM fluxbase.projects WHERE id = $1", project_id)
    if row is None:
        raise ProjectNotFound()
    return Project.from_row(row)


async def authorize(
    db: asyncpg.Pool,
    principal: Principal,
    key_project: Project | None,
    project_id: str | None,
    need: Need,
    *,
    end_user_surface: bool = False,
) -> ProjectAccess:
    """Check that the principal may do `need` on project_id; raise the documented error if not.

    `end_user_surface=True` marks a data endpoint that resolves the request's end user with
    `IdentityResolver.identity` (SQL, batch, records, storage files, realtime tokens): only
    there may a `requireUserAuth` key be used at all (see `confine_end_user_key`).
    """
    if not project_id:
        raise ValidationError("projectId is required.")
    if principal.key is not None:
        confine_end_user_key(principal.key, end_user_surface)
        if project_id != principal.key.project_id:
            await load_project(db, project_id)  # 404 for an unknown project, else:
            raise ScopeMismatch("This API key does not have access to this project.")
        assert key_project is not None
        project = key_project
        _check_status(project, need)
        if need.min_scope is None or SCOPE_RANK[principal.key.scope] < SCOPE_RANK[need.min_scope]:
            raise InsufficientPermissions(
                f"This action needs a key with scope '{need.min_scope or 'dashboard session'}'; "
                f"this key has scope '{principal.key.scope}'."
            )
        return ProjectAccess(project, principal, principal.key.scope, None)
    assert principal.user is not None
    project = await load_project(db, project_id)
    role = await db.fetchval(
        "SELECT role FROM fluxbase.project_members WHERE project_id = $1 AND user_id = $2",
        project.id,
        principal.user.id,
    )
    if role is None:
        raise ScopeMismatch("You are not a member of this project.")
    _check_status(project, need)
    if ROLE_RANK[role] < ROLE_RANK[need.min_role]:
        raise InsufficientPermissions(f"This action needs the '{need.min_role}' role; you are '{role}'.")
    return ProjectAccess(project, principal, ROLE_SQL_SCOPE[role], role)


def confine_end_user_key(key: ApiKeyIdentity, end_user_surface: bool) -> None:
    """The one rule for `requireUserAuth` keys, the keys that ship inside browser apps.

    Such a key reaches a project only through an end user: on data surfaces, which then require
    a valid end-user token (`IdentityResolver.identity` raises USER_TOKEN_REQUIRED without one)
    and act as that user (RLS, storage bucket rules). Everything else (settings, keys, team,
    webhooks, buckets, migrations, broadcast) is refused with or without a token: a browser
    key that could mint a plain key or open a bucket would confine nothing.
    """
    if key.require_user_auth and not end_user_surface:
        raise InsufficientPermissions(
            "This API key is for end users (requireUserAuth): it reaches project data only, with an "
            "end-user token (X-Fluxbase-User-Token), and cannot manage the project."
        )


def require_end_user_token(access: ProjectAccess, user_token: str | None) -> None:
    """A `requireUserAuth` key without an end-user token is refused (401 USER_TOKEN_REQUIRED)."""
    key = access.principal.key
    if not user_token and key is not None and key.require_user_auth:
        raise UserTokenRequired()


# Needs that change a project's data or schema; a read-only project refuses them for every caller
# (settings, keys and team stay manageable, so an admin can switch read-only off again).
WRITE_NEEDS = frozenset({Need.WRITE, Need.SCHEMA})


def _check_status(project: Project, need: Need) -> None:
    if project.status == "suspended":
        raise ProjectSuspended()
    if project.moving and need in WRITE_NEEDS:
        raise ProjectMoving()
    if project.read_only and need in WRITE_NEEDS:
        raise ProjectReadOnly()
