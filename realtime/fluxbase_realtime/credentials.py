"""Subscribers' credentials and whether they still hold.

A subscription is granted for a credential: an API key (this version of it: rotation ends it),
a realtime token (which names the key, or the dashboard member and session, that minted it), or
an end user's token (own tokens name their session). The service checks the credential when it
subscribes and again every few seconds for every live subscription, in one batched query per
kind against the control plane. The state lives in PostgreSQL, so a revocation reaches every
realtime replica: revoking or rotating a key, logging out or disabling an end user, removing a
member or ending their session, suspending or deleting the project. An end user's token also
ends its subscriptions at its exp, and an external provider's token when the project changes its
identity provider settings (SQL would refuse the token from then on).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from fluxbase.errors import (
    AuthRequired,
    FluxbaseError,
    InvalidUserToken,
    ProjectNotFound,
    ProjectSuspended,
    ScopeMismatch,
    TokenExpired,
    UserDisabled,
)
from fluxbase.services.access import ROLE_SQL_SCOPE
from fluxbase.services.realtime import key_fingerprint
from fluxbase_realtime.rls import Viewer


@dataclass(frozen=True)
class Credential:
    """What a subscription's right to its project rests on (all None: the project only)."""

    project_id: str
    scope: str
    key_id: str | None = None
    key_fingerprint: str | None = None
    key_direct: bool = False  # the key itself (not a token it minted): requireUserAuth refuses it
    member_id: str | None = None
    session_id: str | None = None  # the member's dashboard session
    user_id: str | None = None
    user_session: str | None = None  # a project user's own session
    # An end-user token's exp (Unix seconds): the subscription ends with it, as SQL refuses it.
    expires_at: float | None = None
    # A token of the project's external identity provider: the project's auth settings as they
    # were (updated_at) when it was verified; any change (a rotated jwtSecret, another jwksUri or
    # issuer) ends the subscription, whose token would have to be verified again.
    auth_settings_at: datetime | None = None
    external: bool = False


@dataclass(frozen=True)
class Grant:
    """What a verified credential allows on one project."""

    project_id: str
    scope: str
    viewer: Viewer | None  # None: every event (admin); else the gate decides per row
    credential: Credential
    limiter_name: str  # WebSocket broadcasts are rate-limited per key (or member, or end user)
    rate: tuple[int, int]


_KEYS_SQL = """
SELECT id, key_hash, scope, require_user_auth,
       revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) AS live
FROM fluxbase.api_keys WHERE id = ANY($1::text[])
"""
_PROJECTS_SQL = "SELECT id, status FROM fluxbase.projects WHERE id = ANY($1::text[])"
_MEMBERS_SQL = """
SELECT c.project_id, c.user_id, c.session_id, m.role,
       c.session_id IS NULL OR EXISTS (
           SELECT 1 FROM fluxbase.sessions s WHERE s.id = c.session_id AND s.user_id = c.user_id
           AND s.revoked_at IS NULL AND s.expires_at > now()) AS session_live
FROM unnest($1::text[], $2::text[], $3::text[]) AS c(project_id, user_id, session_id)
LEFT JOIN fluxbase.project_members m ON m.project_id = c.project_id AND m.user_id = c.user_id
"""
_AUTH_SETTINGS_SQL = (
    "SELECT project_id, updated_at FROM fluxbase.project_auth_settings WHERE project_id = ANY($1::text[])"
)
_USER_SESSIONS_SQL = """
SELECT s.id, u.id AS user_id, u.project_id, s.revoked_at IS NULL AND s.expires_at > now() AS live,
       u.disabled_at IS NOT NULL AS disabled
FROM fluxbase.project_user_sessions s JOIN fluxbase.project_users u ON u.id = s.user_id
WHERE s.id = ANY($1::text[])
"""


async def invalid(
    db: asyncpg.Pool | asyncpg.Connection, creds: Collection[Credential]
) -> dict[Credential, FluxbaseError]:
    """The credentials among `creds` that no longer hold, each with the error that says why."""
    bad: dict[Credential, FluxbaseError] = {}
    if not creds:
        return bad
    projects = {
        r["id"]: r["status"] for r in await db.fetch(_PROJECTS_SQL, list({c.project_id for c in creds}))
    }
    keyed = [c for c in creds if c.key_id is not None]
    keys = {r["id"]: r for r in await db.fetch(_KEYS_SQL, list({c.key_id for c in keyed}))} if keyed else {}
    members = [c for c in creds if c.member_id is not None]
    member_rows = {}
    if members:
        triples = sorted({(c.project_id, c.member_id, c.session_id) for c in members}, key=str)
        rows = await db.fetch(
            _MEMBERS_SQL, [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples]
        )
        member_rows = {(r["project_id"], r["user_id"], r["session_id"]): r for r in rows}
    users = [c for c in creds if c.user_session is not None]
    sessions = (
        {r["id"]: r for r in await db.fetch(_USER_SESSIONS_SQL, list({c.user_session for c in users}))}
        if users
        else {}
    )
    external = [c for c in creds if c.external]
    settings_at = (
        {
            r["project_id"]: r["updated_at"]
            for r in await db.fetch(_AUTH_SETTINGS_SQL, list({c.project_id for c in external}))
        }
        if external
        else {}
    )
    now = time.time()
    for c in creds:
        status = projects.get(c.project_id)
        if status is None:
            bad[c] = ProjectNotFound()
        elif status == "suspended":
            bad[c] = ProjectSuspended()
        elif c.expires_at is not None and c.expires_at <= now:
            bad[c] = TokenExpired("The end-user token has expired.")  # (as usertokens.verify says)
        elif c.external and settings_at.get(c.project_id) != c.auth_settings_at:  # (None: no settings)
            bad[c] = InvalidUserToken(
                "The project's identity provider settings changed: subscribe again with a token they accept."
            )
        elif c.key_id is not None and not _key_holds(c, keys.get(c.key_id)):
            bad[c] = AuthRequired("The API key was revoked, rotated or has expired.")
        elif c.member_id is not None:
            m = member_rows.get((c.project_id, c.member_id, c.session_id))
            if m is None or m["role"] is None or ROLE_SQL_SCOPE[m["role"]] != c.scope:
                bad[c] = ScopeMismatch("The member is no longer in the project with this role.")
            elif not m["session_live"]:
                bad[c] = AuthRequired("The dashboard session ended. Log in again.")
        if c in bad or c.user_session is None:
            continue
        s = sessions.get(c.user_session)
        if s is None or s["user_id"] != c.user_id or s["project_id"] != c.project_id or not s["live"]:
            bad[c] = InvalidUserToken("The end user's session ended (logged out or revoked).")
        elif s["disabled"]:
            bad[c] = UserDisabled()
    return bad


def _key_holds(c: Credential, row: asyncpg.Record | None) -> bool:
    return (
        row is not None
        and row["live"]
        and row["scope"] == c.scope
        and key_fingerprint(bytes(row["key_hash"])) == c.key_fingerprint
        and not (c.key_direct and row["require_user_auth"])
    )
