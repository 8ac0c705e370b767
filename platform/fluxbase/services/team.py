"""Team: a project's members and their roles, and invitations to join it.

Whether a caller may use a team endpoint at all is decided by `access.authorize` (the handlers
ask for `Need.MANAGE`); this module holds the rules about the team itself:

- An invitation goes to a registered account only (404 USER_NOT_FOUND otherwise). Emails are
  compared without case. Inviting the same address again resets its invitation, whatever
  state it was in, to a new pending one (new id, new expiry): there is one row per
  (project, email).
- The invitee is emailed a link (queued in the invitation's transaction, sent by the worker);
  accepting still needs the invitee's own dashboard session, so the link alone grants nothing.
- Invitations expire `auth.invite_ttl_seconds` after they are sent. Only the invited account
  (by email) may answer; accepting adds the membership, or changes the role of an existing one.
- A project always keeps an admin: removing or demoting its last admin is a 409 CONFLICT.
- An API key (even admin scope) manages developers and viewers only. Granting the admin role,
  or changing or removing an admin, needs an admin member's dashboard session, just as a key
  cannot mint admin keys: a leaked key must not be able to make its holder a project admin.

Membership changes of one project are serialised by a lock on the project row, so two admins
demoting each other at the same moment cannot leave a project without an admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

import asyncpg

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.errors import (
    AuthRequired,
    Conflict,
    InsufficientPermissions,
    InvitationExpired,
    NotFound,
    UserNotFound,
    ValidationError,
)
from fluxbase.mail import outbox
from fluxbase.services.access import ROLE_RANK, Principal, ProjectAccess
from fluxbase.services.accounts import User, normalise_email

ROLES = ("admin", "developer", "viewer")
ANSWERS = ("accepted", "rejected")


@dataclass(frozen=True)
class Member:
    user_id: str
    email: str
    display_name: str
    role: str
    joined_at: datetime

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> Member:
        return cls(r["user_id"], r["email"], r["display_name"], r["role"], r["joined_at"])


@dataclass(frozen=True)
class Invitation:
    id: str
    project_id: str
    email: str
    role: str
    status: str  # pending | accepted | rejected | expired (a pending one past expires_at reads expired)
    invited_at: datetime
    expires_at: datetime
    responded_at: datetime | None

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> Invitation:
        return cls(
            r["id"],
            r["project_id"],
            r["email"],
            r["role"],
            r["status"],
            r["invited_at"],
            r["expires_at"],
            r["responded_at"],
        )


@dataclass(frozen=True)
class Team:
    members: list[Member]
    invites: list[Invitation]


@dataclass(frozen=True)
class OpenInvitation:
    """An invitation as its recipient sees it: with the project's name."""

    invitation: Invitation
    project_name: str


# The status as callers see it: a pending invitation past its expiry is expired.
_INVITE_COLUMNS = """i.id, i.project_id, i.email, i.role, i.invited_at, i.expires_at, i.responded_at,
       CASE WHEN i.status = 'pending' AND i.expires_at <= now() THEN 'expired' ELSE i.status END AS status"""

_MEMBER_COLUMNS = "m.user_id, u.email, u.display_name, m.role, m.joined_at"


def session_user(principal: Principal) -> User:
    """The dashboard user behind a request; API keys have no inbox to answer invitations from."""
    if principal.user is None:
        raise AuthRequired("This endpoint needs a dashboard session token, not an API key.")
    return principal.user


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValidationError("role must be one of admin, developer, viewer.")
    return role


def _key_may_touch(access: ProjectAccess, *roles: str) -> None:
    if access.principal.key is not None and any(ROLE_RANK[r] >= ROLE_RANK["admin"] for r in roles):
        raise InsufficientPermissions(
            "An API key may only manage developer and viewer members; the admin role is granted, "
            "changed or removed by an admin member from a dashboard session."
        )


async def _lock_project(conn: asyncpg.Connection, project_id: str) -> None:
    # NO KEY UPDATE: serialises membership changes without blocking inserts that reference the project.
    await conn.execute("SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR NO KEY UPDATE", project_id)


async def _keep_an_admin(conn: asyncpg.Connection, project_id: str, leaving_user_id: str) -> None:
    others = await conn.fetchval(
        """SELECT count(*) FROM fluxbase.project_members
           WHERE project_id = $1 AND role = 'admin' AND user_id <> $2""",
        project_id,
        leaving_user_id,
    )
    if others == 0:
        raise Conflict("A project must keep at least one admin: make another member an admin first.")


async def _member(conn: asyncpg.Connection, project_id: str, user_id: str | None) -> Member:
    if not user_id:
        raise ValidationError("userId is required.")
    row = await conn.fetchrow(
        f"""SELECT {_MEMBER_COLUMNS} FROM fluxbase.project_members m JOIN fluxbase.users u ON u.id = m.user_id
            WHERE m.project_id = $1 AND m.user_id = $2""",
        project_id,
        user_id,
    )
    if row is None:
        raise UserNotFound("No member with this userId in this project.")
    return Member.from_row(row)


async def list_team(db: asyncpg.Pool, project_id: str) -> Team:
    """Members, and the invitations still awaiting an answer (pending, or expired unanswered)."""
    members = await db.fetch(
        f"""SELECT {_MEMBER_COLUMNS} FROM fluxbase.project_members m JOIN fluxbase.users u ON u.id = m.user_id
            WHERE m.project_id = $1 ORDER BY m.joined_at, m.user_id""",
        project_id,
    )
    invites = await db.fetch(
        f"""SELECT {_INVITE_COLUMNS} FROM fluxbase.invitations i
            WHERE i.project_id = $1 AND i.status IN ('pending', 'expired') ORDER BY i.invited_at, i.id""",
        project_id,
    )
    return Team([Member.from_row(r) for r in members], [Invitation.from_row(r) for r in invites])


async def invite(
    db: asyncpg.Pool, settings: Settings, access: ProjectAccess, email: str, role: str
) -> Invitation:
    """Invite a registered account, or reset the existing invitation for that email to a new pending one."""
    _check_role(role)
    # Invitations are email-case-insensitive (the guide): stored and shown lower-case.
    email = normalise_email(email).lower()
    _key_may_touch(access, role)
    if await db.fetchval("SELECT id FROM fluxbase.users WHERE lower(email) = lower($1)", email) is None:
        raise UserNotFound("Invitee email does not match any registered Fluxbase account.")
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO fluxbase.invitations AS i (id, project_id, email, role, invited_by, expires_at)
                VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))
                ON CONFLICT (project_id, lower(email)) DO UPDATE
                   SET id = EXCLUDED.id, email = EXCLUDED.email, role = EXCLUDED.role, status = 'pending',
                       invited_by = EXCLUDED.invited_by, invited_at = now(), expires_at = EXCLUDED.expires_at,
                       responded_at = NULL
                RETURNING {_INVITE_COLUMNS}""",
            ids.prefixed("inv"),
            access.project.id,
            email,
            role,
            access.principal.label,
            settings.auth.invite_ttl_seconds,
        )
        assert row is not None
        invitation = Invitation.from_row(row)
        # The invitee gets a link, in the same transaction: no invitation without its message.
        values = {
            "project_name": access.project.name,
            "email": email,
            "role": role,
            "invite_id": invitation.id,
            "link": settings.api_url.rstrip("/")
            + "/dashboard/invites?"
            + urlencode({"invite": invitation.id}),
            "expires_hours": str(max(1, settings.auth.invite_ttl_seconds // 3600)),
        }
        message = await outbox.compose(conn, access.project.id, "invite", values)
        await outbox.enqueue(conn, access.project.id, "invite", email, message)
    return invitation


async def respond(db: asyncpg.Pool, user: User, invite_id: str, answer: str) -> Invitation:
    """The invited user accepts (joins with the invited role) or rejects a pending invitation."""
    if answer not in ANSWERS:
        raise ValidationError("status must be accepted or rejected.")
    async with db.acquire() as conn:
        # Record expiry first, in its own statement, so that it stays recorded when the answer is refused.
        await conn.execute(
            """UPDATE fluxbase.invitations SET status = 'expired'
               WHERE id = $1 AND status = 'pending' AND expires_at <= now()""",
            invite_id,
        )
        async with conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_INVITE_COLUMNS} FROM fluxbase.invitations i WHERE i.id = $1 FOR UPDATE", invite_id
            )
            if row is None:
                raise NotFound("No such invitation.")
            inv = Invitation.from_row(row)
            if inv.email.lower() != user.email.lower():
                raise InsufficientPermissions("This invitation was sent to a different email address.")
            if inv.status == "expired":
                raise InvitationExpired()
            if inv.status != "pending":
                raise Conflict(f"This invitation was already {inv.status}.")
            if answer == "accepted":
                await _join(conn, inv.project_id, user.id, inv.role)
            row = await conn.fetchrow(
                f"""UPDATE fluxbase.invitations AS i SET status = $2, responded_at = now() WHERE i.id = $1
                    RETURNING {_INVITE_COLUMNS}""",
                invite_id,
                answer,
            )
    assert row is not None
    return Invitation.from_row(row)


async def _join(conn: asyncpg.Connection, project_id: str, user_id: str, role: str) -> None:
    await _lock_project(conn, project_id)
    current = await conn.fetchval(
        "SELECT role FROM fluxbase.project_members WHERE project_id = $1 AND user_id = $2",
        project_id,
        user_id,
    )
    if current == "admin" and role != "admin":
        await _keep_an_admin(conn, project_id, user_id)
    await conn.execute(
        """INSERT INTO fluxbase.project_members (project_id, user_id, role) VALUES ($1, $2, $3)
           ON CONFLICT (project_id, user_id) DO UPDATE SET role = EXCLUDED.role""",
        project_id,
        user_id,
        role,
    )


async def remove_member(db: asyncpg.Pool, access: ProjectAccess, user_id: str | None) -> Member:
    """Remove a member; their sessions lose access to the project with the next request."""
    async with db.acquire() as conn, conn.transaction():
        await _lock_project(conn, access.project.id)
        member = await _member(conn, access.project.id, user_id)
        if member.role == "admin":
            _key_may_touch(access, member.role)
            await _keep_an_admin(conn, access.project.id, member.user_id)
        await conn.execute(
            "DELETE FROM fluxbase.project_members WHERE project_id = $1 AND user_id = $2",
            access.project.id,
            member.user_id,
        )
    return member


async def change_role(db: asyncpg.Pool, access: ProjectAccess, user_id: str | None, role: str) -> Member:
    """Give a member another role; the last admin cannot be demoted."""
    _check_role(role)
    async with db.acquire() as conn, conn.transaction():
        await _lock_project(conn, access.project.id)
        member = await _member(conn, access.project.id, user_id)
        if member.role == role:
            return member
        _key_may_touch(access, member.role, role)
        if member.role == "admin":
            await _keep_an_admin(conn, access.project.id, member.user_id)
        await conn.execute(
            "UPDATE fluxbase.project_members SET role = $3 WHERE project_id = $1 AND user_id = $2",
            access.project.id,
            member.user_id,
            role,
        )
    return Member(member.user_id, member.email, member.display_name, role, member.joined_at)


async def my_invites(db: asyncpg.Pool, user: User) -> list[OpenInvitation]:
    """The user's pending, unexpired invitations across all projects, newest first."""
    rows = await db.fetch(
        f"""SELECT {_INVITE_COLUMNS}, p.name AS project_name
            FROM fluxbase.invitations i JOIN fluxbase.projects p ON p.id = i.project_id
            WHERE lower(i.email) = lower($1) AND i.status = 'pending' AND i.expires_at > now()
            ORDER BY i.invited_at DESC, i.id""",
        user.email,
    )
    return [OpenInvitation(Invitation.from_row(r), r["project_name"]) for r in rows]
