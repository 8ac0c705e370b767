"""Team & invitations through the real API with real accounts, and the permission matrix.

The matrix walks every project endpoint the server publishes in its OpenAPI for ten
callers (admin, developer and viewer members, a non-member, a removed admin, read, readwrite
and admin keys, another project's admin key, no credential) and checks the documented status
and error code. Expectations are written here from the contract (minimum key scope, minimum
member role), not read from the code under test. A route that is neither in the matrix nor in
the short list of account-level/public routes fails `test_every_route_is_in_the_matrix`.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from fluxbase.config import ConfigError, load_settings
from support import Api, assert_clean, assert_error, bearer

# ---------------------------------------------------------------------------------------------
# helpers


async def invite(api: Api, token: str, pid: str, email: str, role: str = "developer") -> httpx.Response:
    return await api.http.post(
        "/api/team", json={"projectId": pid, "email": email, "role": role}, headers=bearer(token)
    )


async def answer(api: Api, token: str | None, invite_id: str, status: str = "accepted") -> httpx.Response:
    return await api.http.post(
        "/api/team/invites/accept",
        json={"inviteId": invite_id, "status": status},
        headers=bearer(token) if token else {},
    )


async def team_of(api: Api, token: str, pid: str) -> dict[str, Any]:
    r = await api.http.get("/api/team", params={"projectId": pid}, headers=bearer(token))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def my_invites(api: Api, token: str) -> list[dict[str, Any]]:
    r = await api.http.get("/api/invites", headers=bearer(token))
    assert r.status_code == 200, r.text
    invites: list[dict[str, Any]] = r.json()["invites"]
    return invites


async def add_member(api: Api, admin: str, pid: str, user: dict[str, Any], token: str, role: str) -> None:
    r = await invite(api, admin, pid, user["email"], role)
    assert r.status_code == 201, r.text
    r = await answer(api, token, r.json()["invite"]["id"])
    assert r.status_code == 200, r.text


async def role_in(api: Api, token: str, pid: str) -> str:
    r = await api.http.get(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code == 200, r.text
    return str(r.json()["project"]["role"])


async def remove(api: Api, token: str, pid: str, user_id: str) -> httpx.Response:
    return await api.http.delete(
        "/api/team", params={"projectId": pid, "userId": user_id}, headers=bearer(token)
    )


async def set_role(api: Api, token: str, pid: str, user_id: str, role: str) -> httpx.Response:
    return await api.http.patch(
        "/api/team", json={"projectId": pid, "userId": user_id, "role": role}, headers=bearer(token)
    )


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


# ---------------------------------------------------------------------------------------------
# the invitation lifecycle


async def test_invite_accept_and_what_a_developer_may_do(api: Api, project) -> None:
    bob, bob_token = await api.new_user()
    r = await invite(api, project.owner_token, project.id, bob["email"].upper(), "developer")
    assert r.status_code == 201, r.text
    inv = r.json()["invite"]
    assert re.fullmatch(r"inv_[0-9a-f]{16}", inv["id"])
    assert inv["status"] == "pending" and inv["role"] == "developer" and inv["projectId"] == project.id
    assert inv["email"].lower() == bob["email"].lower() and inv["respondedAt"] is None
    assert ts(inv["expiresAt"]) - ts(inv["invitedAt"]) == timedelta(days=7)

    listing = await team_of(api, project.owner_token, project.id)
    [owner] = listing["members"]
    assert owner == {
        "userId": project.owner["id"],
        "email": project.owner["email"],
        "displayName": project.owner["displayName"],
        "role": "admin",
        "joinedAt": owner["joinedAt"],
    }
    [pending] = listing["invites"]
    assert {k: pending[k] for k in ("id", "email", "role", "invitedAt")} == {
        k: inv[k] for k in ("id", "email", "role", "invitedAt")
    }

    # Invited is not yet a member.
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(bob_token)), 403, "SCOPE_MISMATCH"
    )
    [mine] = await my_invites(api, bob_token)
    assert (
        mine["id"] == inv["id"] and mine["projectId"] == project.id and mine["projectName"] == "test project"
    )
    assert mine["role"] == "developer"

    r = await answer(api, bob_token, inv["id"], "accepted")
    assert r.status_code == 200, r.text
    assert r.json()["invite"]["status"] == "accepted" and r.json()["invite"]["respondedAt"]
    listing = await team_of(api, project.owner_token, project.id)
    assert [(m["userId"], m["role"]) for m in listing["members"]] == [
        (project.owner["id"], "admin"),
        (bob["id"], "developer"),
    ]
    assert listing["invites"] == []
    assert await my_invites(api, bob_token) == []
    assert_error(await answer(api, bob_token, inv["id"], "rejected"), 409, "CONFLICT")

    # A developer reads and writes data and manages schemas, from a dashboard session ...
    assert await role_in(api, bob_token, project.id) == "developer"
    r = await api.sql(bob_token, project.id, "CREATE TABLE notes (id int PRIMARY KEY)")
    assert r.json()["success"] is True, r.text
    # ... but does not manage keys or members.
    assert_error(
        await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(bob_token)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    outsider, _ = await api.new_user()
    assert_error(await invite(api, bob_token, project.id, outsider["email"]), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(
        await api.http.get("/api/team", params={"projectId": project.id}, headers=bearer(bob_token)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )


async def test_reject_and_reinvite_reset_the_invitation(api: Api, project, control_db) -> None:
    carol, carol_token = await api.new_user()
    first = (await invite(api, project.owner_token, project.id, carol["email"], "viewer")).json()["invite"]
    r = await answer(api, carol_token, first["id"], "rejected")
    assert r.status_code == 200 and r.json()["invite"]["status"] == "rejected"
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(carol_token)), 403, "SCOPE_MISMATCH"
    )
    assert_error(await answer(api, carol_token, first["id"], "accepted"), 409, "CONFLICT")
    assert (await team_of(api, project.owner_token, project.id))["invites"] == []

    # Inviting again, in another case, resets the rejected invitation: a new id, pending again.
    second = (await invite(api, project.owner_token, project.id, carol["email"].upper(), "developer")).json()[
        "invite"
    ]
    assert second["id"] != first["id"] and second["status"] == "pending" and second["role"] == "developer"
    assert second["respondedAt"] is None
    rows = await control_db.fetch(
        "SELECT id, status FROM fluxbase.invitations WHERE project_id = $1 AND lower(email) = lower($2)",
        project.id,
        carol["email"],
    )
    assert [(r["id"], r["status"]) for r in rows] == [(second["id"], "pending")]
    assert_error(await answer(api, carol_token, first["id"]), 404, "NOT_FOUND")
    assert (await answer(api, carol_token, second["id"])).status_code == 200
    assert await role_in(api, carol_token, project.id) == "developer"

    # An accepted invitation is reset too; accepting the new one changes the member's role.
    third = (await invite(api, project.owner_token, project.id, carol["email"], "viewer")).json()["invite"]
    assert third["status"] == "pending"
    assert (await answer(api, carol_token, third["id"])).status_code == 200
    assert await role_in(api, carol_token, project.id) == "viewer"
    members = (await team_of(api, project.owner_token, project.id))["members"]
    assert sorted(m["role"] for m in members) == ["admin", "viewer"]

    # So is a pending one: only the newest id can be answered.
    fourth = (await invite(api, project.owner_token, project.id, carol["email"], "developer")).json()[
        "invite"
    ]
    fifth = (await invite(api, project.owner_token, project.id, carol["email"], "admin")).json()["invite"]
    assert_error(await answer(api, carol_token, fourth["id"]), 404, "NOT_FOUND")
    [listed] = (await team_of(api, project.owner_token, project.id))["invites"]
    assert listed["id"] == fifth["id"] and listed["role"] == "admin"
    assert (await answer(api, carol_token, fifth["id"], "rejected")).status_code == 200
    assert await role_in(api, carol_token, project.id) == "viewer"


async def test_invitation_errors(api: Api, project) -> None:
    owner = project.owner_token
    dave, dave_token = await api.new_user()
    _eve, eve_token = await api.new_user()
    body = assert_error(
        await invite(api, owner, project.id, f"nobody-{secrets.token_hex(4)}@example.com"),
        404,
        "USER_NOT_FOUND",
    )
    assert "registered" in body["error"]["message"]
    assert_error(await invite(api, owner, project.id, "not-an-email"), 400, "VALIDATION_ERROR")
    assert_error(await invite(api, owner, project.id, dave["email"], "owner"), 400, "VALIDATION_ERROR")
    assert_error(await invite(api, owner, "ffffffffffffffff", dave["email"]), 404, "PROJECT_NOT_FOUND")
    assert_error(await api.http.get("/api/team", headers=bearer(owner)), 400, "VALIDATION_ERROR")
    assert_error(
        await api.http.post(
            "/api/team", json={"projectId": project.id, "email": dave["email"], "role": "developer"}
        ),
        401,
        "AUTH_REQUIRED",
    )

    inv = (await invite(api, owner, project.id, dave["email"])).json()["invite"]
    # Only the invited account answers, and only from a dashboard session.
    assert_error(await answer(api, eve_token, inv["id"]), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(await answer(api, owner, inv["id"]), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(await answer(api, project.admin_key, inv["id"]), 401, "AUTH_REQUIRED")
    assert_error(await answer(api, None, inv["id"]), 401, "AUTH_REQUIRED")
    assert_error(await answer(api, dave_token, "inv_0000000000000000"), 404, "NOT_FOUND")
    assert_error(await answer(api, dave_token, inv["id"], "maybe"), 400, "VALIDATION_ERROR")
    assert_error(await api.http.get("/api/invites", headers=bearer(project.admin_key)), 401, "AUTH_REQUIRED")
    assert_error(await api.http.get("/api/invites"), 401, "AUTH_REQUIRED")
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(eve_token)), 403, "SCOPE_MISMATCH"
    )
    assert await my_invites(api, eve_token) == []
    # None of that spent the invitation.
    assert (await answer(api, dave_token, inv["id"])).status_code == 200
    assert await role_in(api, dave_token, project.id) == "developer"


async def test_expired_invitation_cannot_be_answered_until_resent(api: Api, project, control_db) -> None:
    frank, frank_token = await api.new_user()
    inv = (await invite(api, project.owner_token, project.id, frank["email"], "viewer")).json()["invite"]
    await control_db.execute(
        "UPDATE fluxbase.invitations SET expires_at = now() - interval '1 second' WHERE id = $1", inv["id"]
    )
    assert await my_invites(api, frank_token) == []
    [listed] = (await team_of(api, project.owner_token, project.id))["invites"]
    assert listed["id"] == inv["id"] and listed["status"] == "expired"
    assert_error(await answer(api, frank_token, inv["id"]), 410, "INVITATION_EXPIRED")
    row = await control_db.fetchrow(
        "SELECT status, responded_at FROM fluxbase.invitations WHERE id = $1", inv["id"]
    )
    assert row["status"] == "expired" and row["responded_at"] is None
    assert_error(await answer(api, frank_token, inv["id"], "rejected"), 410, "INVITATION_EXPIRED")
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(frank_token)), 403, "SCOPE_MISMATCH"
    )

    again = (await invite(api, project.owner_token, project.id, frank["email"], "viewer")).json()["invite"]
    assert again["status"] == "pending" and again["id"] != inv["id"]
    assert [i["id"] for i in await my_invites(api, frank_token)] == [again["id"]]
    assert (await answer(api, frank_token, again["id"])).status_code == 200
    assert await role_in(api, frank_token, project.id) == "viewer"


async def test_invite_ttl_is_configurable(spawn) -> None:
    async with spawn(FLUXBASE_INVITE_TTL_SECONDS="1") as inst:
        client = Api(inst.url)
        try:
            _, owner_token = await client.new_user()
            pid = await client.new_project(owner_token)
            guest, guest_token = await client.new_user()
            inv = (await invite(client, owner_token, pid, guest["email"])).json()["invite"]
            assert ts(inv["expiresAt"]) - ts(inv["invitedAt"]) == timedelta(seconds=1)
            await asyncio.sleep(1.2)
            assert await my_invites(client, guest_token) == []
            assert_error(await answer(client, guest_token, inv["id"]), 410, "INVITATION_EXPIRED")
            assert_error(
                await client.http.get(f"/api/projects/{pid}", headers=bearer(guest_token)),
                403,
                "SCOPE_MISMATCH",
            )
        finally:
            await client.close()


def test_invite_ttl_setting() -> None:
    env = {
        "FLUXBASE_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db",
        "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:1",
        "FLUXBASE_S3_ACCESS_KEY": "a",
        "FLUXBASE_S3_SECRET_KEY": "b",
        "FLUXBASE_SECRET_KEY": "s" * 32,
    }
    assert load_settings(env).auth.invite_ttl_seconds == 7 * 24 * 3600
    assert load_settings({**env, "FLUXBASE_INVITE_TTL_SECONDS": "60"}).auth.invite_ttl_seconds == 60
    with pytest.raises(ConfigError, match="FLUXBASE_INVITE_TTL_SECONDS"):
        load_settings({**env, "FLUXBASE_INVITE_TTL_SECONDS": "0"})


# ---------------------------------------------------------------------------------------------
# members: removal, roles, the last admin, immediate loss of access


async def test_removed_member_loses_access_at_once(api: Api, project) -> None:
    dev, dev_token = await api.new_user()
    await add_member(api, project.owner_token, project.id, dev, dev_token, "developer")
    assert (await api.sql(dev_token, project.id, "SELECT 1 AS one")).json()["success"] is True
    listed = (await api.http.get("/api/projects", headers=bearer(dev_token))).json()["projects"]
    assert [p["id"] for p in listed] == [project.id]

    r = await remove(api, project.owner_token, project.id, dev["id"])
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "projectId": project.id, "userId": dev["id"]}
    # The session issued before the removal is refused on the very next request.
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(dev_token)), 403, "SCOPE_MISMATCH"
    )
    assert_error(await api.sql(dev_token, project.id, "SELECT 1 AS one"), 403, "SCOPE_MISMATCH")
    assert_error(
        await api.http.get(
            "/api/storage/buckets", params={"projectId": project.id}, headers=bearer(dev_token)
        ),
        403,
        "SCOPE_MISMATCH",
    )
    assert (await api.http.get("/api/projects", headers=bearer(dev_token))).json()["projects"] == []
    assert (
        await api.http.get("/api/auth/me", headers=bearer(dev_token))
    ).status_code == 200  # still an account
    members = (await team_of(api, project.owner_token, project.id))["members"]
    assert [m["userId"] for m in members] == [project.owner["id"]]

    assert_error(await remove(api, project.owner_token, project.id, dev["id"]), 404, "USER_NOT_FOUND")
    assert_error(
        await api.http.delete(
            "/api/team", params={"projectId": project.id}, headers=bearer(project.owner_token)
        ),
        400,
        "VALIDATION_ERROR",
    )


async def test_deleted_account_loses_access_at_once(api: Api, project, control_db) -> None:
    gone, token = await api.new_user()
    await add_member(api, project.owner_token, project.id, gone, token, "admin")
    assert (
        await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(token))
    ).status_code == 200
    await control_db.execute("DELETE FROM fluxbase.users WHERE id = $1", gone["id"])
    assert_error(await api.http.get("/api/auth/me", headers=bearer(token)), 401, "AUTH_REQUIRED")
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(token)), 401, "AUTH_REQUIRED"
    )
    assert_error(
        await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(token)),
        401,
        "AUTH_REQUIRED",
    )
    assert_error(await api.sql(token, project.id, "SELECT 1 AS one"), 401, "AUTH_REQUIRED")
    members = (await team_of(api, project.owner_token, project.id))["members"]
    assert [m["userId"] for m in members] == [project.owner["id"]]


async def test_last_admin_cannot_be_removed_or_demoted(api: Api, project) -> None:
    pid, owner_token, owner_id = project.id, project.owner_token, project.owner["id"]
    body = assert_error(await remove(api, owner_token, pid, owner_id), 409, "CONFLICT")
    assert "admin" in body["error"]["message"]
    assert_error(await set_role(api, owner_token, pid, owner_id, "developer"), 409, "CONFLICT")
    r = await set_role(api, owner_token, pid, owner_id, "admin")  # no change is not a demotion
    assert r.status_code == 200 and r.json()["member"]["role"] == "admin"

    bob, bob_token = await api.new_user()
    await add_member(api, owner_token, pid, bob, bob_token, "developer")
    r = await set_role(api, owner_token, pid, bob["id"], "admin")
    assert r.status_code == 200, r.text
    assert r.json()["member"] == {
        "userId": bob["id"],
        "email": bob["email"],
        "displayName": bob["displayName"],
        "role": "admin",
        "joinedAt": r.json()["member"]["joinedAt"],
    }
    # With a second admin, the first may be demoted; then it is no longer an admin itself.
    assert (await set_role(api, owner_token, pid, owner_id, "developer")).status_code == 200
    assert_error(await set_role(api, owner_token, pid, bob["id"], "viewer"), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(await remove(api, owner_token, pid, bob["id"]), 403, "INSUFFICIENT_PERMISSIONS")
    # Bob is now the last admin: he can neither leave nor demote himself ...
    assert_error(await remove(api, bob_token, pid, bob["id"]), 409, "CONFLICT")
    assert_error(await set_role(api, bob_token, pid, bob["id"], "viewer"), 409, "CONFLICT")
    # ... nor accept an invitation that would make him a viewer.
    inv = (await invite(api, bob_token, pid, bob["email"], "viewer")).json()["invite"]
    assert_error(await answer(api, bob_token, inv["id"]), 409, "CONFLICT")
    assert await role_in(api, bob_token, pid) == "admin"
    assert (await answer(api, bob_token, inv["id"], "rejected")).status_code == 200

    assert (await remove(api, bob_token, pid, owner_id)).status_code == 200
    members = (await team_of(api, bob_token, pid))["members"]
    assert [(m["userId"], m["role"]) for m in members] == [(bob["id"], "admin")]
    assert_error(await set_role(api, bob_token, pid, "usr_0000000000000000", "viewer"), 404, "USER_NOT_FOUND")
    assert_error(await set_role(api, bob_token, pid, owner_id, "root"), 400, "VALIDATION_ERROR")


async def test_two_admins_demoting_each_other_leave_one_admin(api: Api, project, control_db) -> None:
    pid, owner_token, owner_id = project.id, project.owner_token, project.owner["id"]
    bob, bob_token = await api.new_user()
    await add_member(api, owner_token, pid, bob, bob_token, "admin")
    for _ in range(5):
        a, b = await asyncio.gather(
            set_role(api, owner_token, pid, bob["id"], "viewer"),
            set_role(api, bob_token, pid, owner_id, "viewer"),
        )
        # Either both ran at once (one is refused as the last admin) or one after the other (the
        # second caller is no longer an admin by then).
        assert sorted([a.status_code, b.status_code])[0] == 200, (a.text, b.text)
        assert sorted([a.status_code, b.status_code])[1] in (403, 409), (a.text, b.text)
        admins = await control_db.fetch(
            "SELECT user_id FROM fluxbase.project_members WHERE project_id = $1 AND role = 'admin'", pid
        )
        assert len(admins) == 1
        winner = owner_token if admins[0]["user_id"] == owner_id else bob_token
        loser_id = bob["id"] if admins[0]["user_id"] == owner_id else owner_id
        assert (await set_role(api, winner, pid, loser_id, "admin")).status_code == 200


async def test_api_keys_manage_developers_and_viewers_only(api: Api, project) -> None:
    pid, key = project.id, project.admin_key
    dev, dev_token = await api.new_user()
    other, _ = await api.new_user()
    r = await invite(api, key, pid, dev["email"], "developer")
    assert r.status_code == 201, r.text
    assert (await answer(api, dev_token, r.json()["invite"]["id"])).status_code == 200
    assert len((await team_of(api, key, pid))["members"]) == 2
    assert_error(await invite(api, key, pid, other["email"], "admin"), 403, "INSUFFICIENT_PERMISSIONS")
    assert (await set_role(api, key, pid, dev["id"], "viewer")).status_code == 200
    assert await role_in(api, dev_token, pid) == "viewer"
    assert_error(await set_role(api, key, pid, dev["id"], "admin"), 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(
        await set_role(api, key, pid, project.owner["id"], "developer"), 403, "INSUFFICIENT_PERMISSIONS"
    )
    assert_error(await remove(api, key, pid, project.owner["id"]), 403, "INSUFFICIENT_PERMISSIONS")
    assert await role_in(api, project.owner_token, pid) == "admin"
    assert (await remove(api, key, pid, dev["id"])).status_code == 200
    rw = await api.new_key(project.owner_token, pid, "readwrite")
    assert_error(
        await api.http.get("/api/team", params={"projectId": pid}, headers=bearer(rw)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )


async def test_member_sessions_run_sql_as_their_role(api: Api, project) -> None:
    pid = project.id
    r = await api.sql(project.admin_key, pid, "CREATE TABLE notes (id int PRIMARY KEY, body text)")
    assert r.json()["success"] is True, r.text
    await api.sql(project.admin_key, pid, "INSERT INTO notes VALUES (1, 'hello')")
    viewer, viewer_token = await api.new_user()
    dev, dev_token = await api.new_user()
    await add_member(api, project.owner_token, pid, viewer, viewer_token, "viewer")
    await add_member(api, project.owner_token, pid, dev, dev_token, "developer")

    r = await api.sql(viewer_token, pid, "SELECT body FROM notes")
    assert r.json()["result"]["rows"] == [{"body": "hello"}]
    for query in ("INSERT INTO notes VALUES (2, 'no')", "CREATE TABLE mine (id int)"):
        body = (await api.sql(viewer_token, pid, query)).json()
        assert body["success"] is False and body["error"]["code"] == "SQL_EXEC_ERROR", body
        # The viewer runs as the read role: a read-only transaction (25006) without write grants (42501).
        assert body["error"]["details"] in ("ERROR:  25006", "ERROR:  42501"), body
    assert (await api.sql(dev_token, pid, "INSERT INTO notes VALUES (2, 'yes')")).json()["success"] is True
    assert (await api.sql(dev_token, pid, "CREATE TABLE theirs (id int)")).json()["success"] is True


# ---------------------------------------------------------------------------------------------
# the permission matrix: every project endpoint x every kind of caller

SCOPE_RANK = {"read": 0, "readwrite": 1, "admin": 2}
ROLE_RANK = {"viewer": 0, "developer": 1, "admin": 2}
# level -> (minimum API key scope or None for "dashboard session only", minimum member role)
LEVELS: dict[str, tuple[str | None, str]] = {
    "read": ("read", "viewer"),
    "write": ("readwrite", "developer"),
    "schema": ("admin", "developer"),
    "manage": ("admin", "admin"),
    "owner": (None, "admin"),
}
# Admin last: its deleteProject call removes the project.
PRINCIPALS = (
    "developer",
    "viewer",
    "non_member",
    "removed_admin",
    "key_read",
    "key_readwrite",
    "key_admin",
    "foreign_key",
    "no_credential",
    "admin",
)
SESSIONS = ("admin", "developer", "viewer", "non_member", "removed_admin")
# Routes that are not about one project: health, accounts, project creation/listing, public files.
NOT_PROJECT_SCOPED = {
    "live",
    "ready",
    "register",
    "login",
    "logout",
    "me",
    "adminStatus",
    "createProject",
    "listProjects",
    "getPublicFile",
    # A project's own end users: public (no key, no member), or the user's own access token.
    "projectUserRegister",
    "projectUserLogin",
    "projectUserRefresh",
    "projectUserLogout",
    "projectUserMe",
    # Email flows (docs/email.md): public request/confirm endpoints, or the user's own token.
    "projectUserRequestVerification",
    "projectUserVerifyEmail",
    "projectUserRecover",
    "projectUserResetPassword",
    "projectUserMagicLink",
    "projectUserMagicLinkLogin",
    "projectUserRequestEmailChange",
    "projectUserConfirmEmailChange",
    "recoverAccount",
    "resetAccountPassword",
}
# Instance-admin operations on a project (not member roles or key scopes): their own tests in
# test_project_operations.py check that keys, members and project admins are refused.
INSTANCE_ADMIN_ROUTES = {"setQuotas", "suspendProject", "resumeProject", "listAllProjects"}
# The database-cluster management API (instance admins and management keys; tested in
# tests/test_clusters.py and tests/test_attack_review7.py, which refuse every other principal).
INSTANCE_ADMIN_ROUTES |= {
    "registerCluster",
    "listClusters",
    "getCluster",
    "updateCluster",
    "removeCluster",
    "checkClusterConnection",
    "createManagementKey",
    "listManagementKeys",
    "revokeManagementKey",
    "moveProject",  # tests/test_cluster_moves.py refuses users, project keys and no credential
}


def expected(level: str, principal: str, ok: int) -> tuple[int, str | None]:
    """The documented answer for `principal` on an endpoint of `level`: (status, error code or None)."""
    if principal == "no_credential":
        return 401, "AUTH_REQUIRED"
    if level in ("session", "invitee"):  # a dashboard user acting for themselves, not for a project
        if principal not in SESSIONS:
            return 401, "AUTH_REQUIRED"
        return (ok, None) if level == "session" else (403, "INSUFFICIENT_PERMISSIONS")
    if principal in ("non_member", "removed_admin", "foreign_key"):
        return 403, "SCOPE_MISMATCH"
    min_scope, min_role = LEVELS[level]
    if principal.startswith("key_"):
        allowed = min_scope is not None and SCOPE_RANK[principal[4:]] >= SCOPE_RANK[min_scope]
    else:
        allowed = ROLE_RANK[principal] >= ROLE_RANK[min_role]
    return (ok, None) if allowed else (403, "INSUFFICIENT_PERMISSIONS")


@dataclass
class People:
    """Accounts shared by the matrix's projects: (user, session token) by name."""

    users: dict[str, tuple[dict[str, Any], str]]
    foreign_key: str

    def user(self, name: str) -> dict[str, Any]:
        return self.users[name][0]

    def token(self, name: str) -> str:
        return self.users[name][1]


@pytest.fixture(scope="module")
async def people(instance, instance_admin) -> AsyncIterator[People]:
    client = Api(instance.url)
    try:
        names = ("owner", "developer", "viewer", "stranger", "removed", "spare")
        users = {name: await client.new_user() for name in names}
        foreign = await client.new_project(users["stranger"][1], "someone else's")
        yield People(users, await client.new_key(users["stranger"][1], foreign, "admin"))
    finally:
        await client.close()


@dataclass
class World:
    """One project with a member or key for every kind of caller, a table, a bucket and a file."""

    api: Api
    pid: str
    people: People
    creds: dict[str, str | None]
    file_key: str
    file_id: str
    db: Any = None  # the control database, for the few rows that need a fixture behind the API

    def headers(self, principal: str) -> dict[str, str]:
        token = self.creds[principal]
        return bearer(token) if token else {}

    @property
    def owner(self) -> dict[str, str]:
        return self.headers("admin")

    async def fresh_key(self) -> str:
        r = await self.api.http.post(
            f"/api/projects/{self.pid}/api-keys", json={"name": "t", "scope": "readwrite"}, headers=self.owner
        )
        assert r.status_code == 201, r.text
        return str(r.json()["apiKey"]["id"])

    async def fresh_bucket(self) -> str:
        name = "t" + secrets.token_hex(4)
        r = await self.api.http.post(
            "/api/storage/buckets", json={"projectId": self.pid, "name": name}, headers=self.owner
        )
        assert r.status_code == 201, r.text
        return name

    async def upload(self, headers: dict[str, str], name: str | None = None) -> httpx.Response:
        return await self.api.http.post(
            "/api/storage/upload",
            data={"projectId": self.pid, "bucketId": "b"},
            files={"file": (name or f"f-{secrets.token_hex(4)}.txt", b"hello", "text/plain")},
            headers=headers,
        )

    async def fresh_file(self) -> str:
        r = await self.upload(self.owner)
        assert r.status_code == 201, r.text
        return str(r.json()["file"]["s3_key"])

    async def invite_spare(self) -> str:
        r = await invite(
            self.api, str(self.creds["admin"]), self.pid, self.people.user("spare")["email"], "viewer"
        )
        assert r.status_code == 201, r.text
        return str(r.json()["invite"]["id"])

    async def spare_joins(self) -> str:
        r = await answer(self.api, self.people.token("spare"), await self.invite_spare())
        assert r.status_code == 200, r.text
        return str(self.people.user("spare")["id"])


@pytest.fixture
async def world(api: Api, people: People, control_db: Any) -> World:
    owner = people.token("owner")
    pid = await api.new_project(owner, "matrix")
    keys = {scope: await api.new_key(owner, pid, scope) for scope in ("read", "readwrite", "admin")}
    for name, role in (("developer", "developer"), ("viewer", "viewer"), ("removed", "admin")):
        await add_member(api, owner, pid, people.user(name), people.token(name), role)
    assert (await remove(api, owner, pid, people.user("removed")["id"])).status_code == 200
    assert (await api.sql(keys["admin"], pid, "CREATE TABLE items (id int PRIMARY KEY)")).json()["success"]
    r = await api.http.post(
        "/api/storage/buckets", json={"projectId": pid, "name": "b"}, headers=bearer(owner)
    )
    assert r.status_code == 201, r.text
    creds: dict[str, str | None] = {
        "admin": owner,
        "developer": people.token("developer"),
        "viewer": people.token("viewer"),
        "non_member": people.token("stranger"),
        "removed_admin": people.token("removed"),
        "key_read": keys["read"],
        "key_readwrite": keys["readwrite"],
        "key_admin": keys["admin"],
        "foreign_key": people.foreign_key,
        "no_credential": None,
    }
    w = World(api, pid, people, creds, "", "", control_db)
    r = await w.upload(w.owner, "kept.txt")
    assert r.status_code == 201, r.text
    w.file_key, w.file_id = r.json()["file"]["s3_key"], r.json()["file"]["id"]
    return w


Call = Callable[[World, dict[str, str]], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class Row:
    op: str  # the route's operationId
    level: str  # read | write | schema | manage | owner | session | invitee
    ok: int  # the success status
    call: Call


def _q(w: World, **extra: str) -> dict[str, str]:
    # project_id too: some routes may still spell the query parameter that way.
    return {"projectId": w.pid, "project_id": w.pid, **extra}


async def _rotate(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.post(f"/api/projects/{w.pid}/api-keys/{await w.fresh_key()}/rotate", headers=h)


async def _revoke(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.delete(f"/api/projects/{w.pid}/api-keys/{await w.fresh_key()}", headers=h)


async def _project_user(w: World) -> str:
    r = await w.api.http.post(
        f"/api/projects/{w.pid}/auth/register",
        json={"email": f"pu-{secrets.token_hex(4)}@example.com", "password": "correct horse battery"},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["user"]["id"])


def _project_user_action(action: str) -> Call:
    async def call(w: World, h: dict[str, str]) -> httpx.Response:
        return await w.api.http.post(
            f"/api/projects/{w.pid}/auth/users/{await _project_user(w)}/{action}", headers=h
        )

    return call


async def _delete_project_user(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.delete(f"/api/projects/{w.pid}/auth/users/{await _project_user(w)}", headers=h)


async def _answer_someone_elses(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.post(
        "/api/team/invites/accept", json={"inviteId": await w.invite_spare(), "status": "accepted"}, headers=h
    )


async def _remove_member(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.delete(
        "/api/team", params={"projectId": w.pid, "userId": await w.spare_joins()}, headers=h
    )


async def _change_role(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.patch(
        "/api/team",
        json={"projectId": w.pid, "userId": await w.spare_joins(), "role": "developer"},
        headers=h,
    )


async def _update_bucket(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.patch(
        "/api/storage/buckets",
        json={"projectId": w.pid, "bucketId": await w.fresh_bucket(), "isPublic": True},
        headers=h,
    )


async def _delete_bucket(w: World, h: dict[str, str]) -> httpx.Response:
    return await w.api.http.delete(
        "/api/storage/buckets", params={"projectId": w.pid, "bucketId": await w.fresh_bucket()}, headers=h
    )


def _delete_files(path: str) -> Call:
    async def call(w: World, h: dict[str, str]) -> httpx.Response:
        return await w.api.http.delete(
            path, params={"projectId": w.pid, "s3Key": await w.fresh_file()}, headers=h
        )

    return call


# Disabled: an enabled endpoint holds back outbox retention until a worker dispatches, and this
# session's instance runs no worker (the retention test shares it).
OFF = {"enabled": False}


async def _webhook(w: World) -> str:
    """A fresh webhook whose URL (as if DNS had changed since) the sender refuses at once."""
    r = await w.api.http.post(
        "/api/webhooks",
        json={"projectId": w.pid, "url": "https://93.184.215.14/hook", "events": ["row.inserted"], **OFF},
        headers=w.owner,
    )
    assert r.status_code == 201, r.text
    hook_id = str(r.json()["webhook"]["id"])
    await w.db.execute("UPDATE fluxbase.webhooks SET url = 'http://127.0.0.1:9/hook' WHERE id = $1", hook_id)
    return hook_id


async def _hook_call(w: World, h: dict[str, str], method: str, suffix: str = "", **kw: Any) -> httpx.Response:
    return await w.api.http.request(method, f"/api/webhooks/{await _webhook(w)}{suffix}", headers=h, **kw)


async def _redeliver(w: World, h: dict[str, str]) -> httpx.Response:
    hook_id = await _webhook(w)
    ping = await w.api.http.post(f"/api/webhooks/{hook_id}/test", headers=w.owner)
    delivery_id = ping.json()["delivery"]["id"]
    return await w.api.http.post(f"/api/webhooks/{hook_id}/deliveries/{delivery_id}/redeliver", headers=h)


WEBHOOK_ROWS: tuple[Row, ...] = (
    Row(
        "createWebhook",
        "manage",
        201,
        lambda w, h: w.api.http.post(
            "/api/webhooks",
            json={"projectId": w.pid, "url": "https://93.184.215.14/hook", "events": ["row.deleted"], **OFF},
            headers=h,
        ),
    ),
    Row("listWebhooks", "manage", 200, lambda w, h: w.api.http.get("/api/webhooks", params=_q(w), headers=h)),
    Row("getWebhook", "manage", 200, lambda w, h: _hook_call(w, h, "GET")),
    Row("updateWebhook", "manage", 200, lambda w, h: _hook_call(w, h, "PATCH", json={"enabled": False})),
    Row("deleteWebhook", "manage", 200, lambda w, h: _hook_call(w, h, "DELETE")),
    Row("testWebhook", "manage", 200, lambda w, h: _hook_call(w, h, "POST", "/test")),
    Row("listWebhookDeliveries", "manage", 200, lambda w, h: _hook_call(w, h, "GET", "/deliveries")),
    Row("redeliverWebhook", "manage", 202, _redeliver),
    Row("projectLog", "manage", 200, lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/log", headers=h)),
)


async def _fresh_record(w: World) -> str:
    rid = secrets.randbelow(2**31 - 1)
    r = await w.api.http.post(
        f"/api/projects/{w.pid}/tables/items/records", json={"id": rid}, headers=w.headers("key_admin")
    )
    assert r.status_code == 201, r.text
    return str(rid)


def _record(method: str) -> Call:
    async def call(w: World, h: dict[str, str]) -> httpx.Response:
        rid = await _fresh_record(w)
        body = {"id": int(rid)} if method == "PATCH" else None
        return await w.api.http.request(
            method, f"/api/projects/{w.pid}/tables/items/records/{rid}", json=body, headers=h
        )

    return call


DATA_ROWS: tuple[Row, ...] = (
    Row(
        "executeBatch",
        "read",
        200,
        lambda w, h: w.api.http.post(
            "/api/execute-batch",
            json={"projectId": w.pid, "statements": [{"query": "SELECT count(*) AS n FROM items"}]},
            headers=h,
        ),
    ),
    Row("getSchema", "read", 200, lambda w, h: w.api.http.get("/api/schema", params=_q(w), headers=h)),
    Row("listTables", "read", 200, lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/tables", headers=h)),
    Row(
        "createTable",
        "schema",
        201,
        lambda w, h: w.api.http.post(
            f"/api/projects/{w.pid}/tables",
            json={"name": "t" + secrets.token_hex(4), "columns": [{"name": "id", "type": "int"}]},
            headers=h,
        ),
    ),
    Row(
        "listRecords",
        "read",
        200,
        lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/tables/items/records", headers=h),
    ),
    Row(
        "createRecords",
        "write",
        201,
        lambda w, h: w.api.http.post(
            f"/api/projects/{w.pid}/tables/items/records",
            json={"id": secrets.randbelow(2**31 - 1)},
            headers=h,
        ),
    ),
    Row("getRecord", "read", 200, _record("GET")),
    Row("updateRecord", "write", 200, _record("PATCH")),
    Row("deleteRecord", "schema", 200, _record("DELETE")),
)


async def _export(w: World, h: dict[str, str]) -> httpx.Response:
    r = await w.api.http.get(f"/api/projects/{w.pid}/export", headers=h)
    if r.status_code == 200 and r.content.startswith(b"-- fluxbase-export format=1"):
        return httpx.Response(200, json={"success": True})  # the dump is SQL, not an envelope
    return r


async def _import(w: World, h: dict[str, str]) -> httpx.Response:
    dump = await w.api.http.get(f"/api/projects/{w.pid}/export", headers=w.headers("key_admin"))
    assert dump.status_code == 200, dump.text
    return await w.api.http.post(
        "/api/projects/import",
        params={"name": "matrix import"},
        content=dump.content,
        headers={**h, "Content-Type": "application/sql"},
    )


async def _create_policy(w: World, h: dict[str, str], name: str | None = None) -> httpx.Response:
    return await w.api.http.post(
        f"/api/projects/{w.pid}/rls/policies",
        json={
            "table": "items",
            "name": name or "p" + secrets.token_hex(4),
            "command": "SELECT",
            "using": "id > 0",
        },
        headers=h,
    )


async def _drop_policy(w: World, h: dict[str, str]) -> httpx.Response:
    name = "p" + secrets.token_hex(4)
    r = await _create_policy(w, w.owner, name)
    assert r.status_code == 201, r.text
    return await w.api.http.delete(f"/api/projects/{w.pid}/rls/policies/items/{name}", headers=h)


async def _install_extension(w: World, h: dict[str, str]) -> httpx.Response:
    # Off first (as the owner), so every allowed caller's install is a new one (201).
    await w.api.http.delete(f"/api/projects/{w.pid}/extensions/pg_trgm", headers=w.owner)
    return await w.api.http.post(f"/api/projects/{w.pid}/extensions", json={"name": "pg_trgm"}, headers=h)


async def _remove_extension(w: World, h: dict[str, str]) -> httpx.Response:
    r = await w.api.http.post(f"/api/projects/{w.pid}/extensions", json={"name": "pg_trgm"}, headers=w.owner)
    assert r.status_code in (200, 201), r.text
    return await w.api.http.delete(f"/api/projects/{w.pid}/extensions/pg_trgm", headers=h)


MATRIX: tuple[Row, ...] = (
    Row(
        "listExtensions",
        "read",
        200,
        lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/extensions", headers=h),
    ),
    Row("installExtension", "schema", 201, _install_extension),
    Row("removeExtension", "schema", 200, _remove_extension),
    Row("getProject", "read", 200, lambda w, h: w.api.http.get(f"/api/projects/{w.pid}", headers=h)),
    Row(
        "createApiKey",
        "manage",
        201,
        lambda w, h: w.api.http.post(
            f"/api/projects/{w.pid}/api-keys", json={"name": "m", "scope": "readwrite"}, headers=h
        ),
    ),
    Row(
        "listApiKeys",
        "manage",
        200,
        lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/api-keys", headers=h),
    ),
    Row("rotateApiKey", "manage", 200, _rotate),
    Row("revokeApiKey", "manage", 200, _revoke),
    Row(
        "executeSql",
        "read",
        200,
        lambda w, h: w.api.http.post(
            "/api/execute-sql",
            json={"projectId": w.pid, "query": "SELECT count(*) AS n FROM items"},
            headers=h,
        ),
    ),
    Row(
        "listTeam",
        "manage",
        200,
        lambda w, h: w.api.http.get("/api/team", params={"projectId": w.pid}, headers=h),
    ),
    Row(
        "inviteMember",
        "manage",
        201,
        lambda w, h: w.api.http.post(
            "/api/team",
            json={"projectId": w.pid, "email": w.people.user("spare")["email"], "role": "viewer"},
            headers=h,
        ),
    ),
    Row("answerInvite", "invitee", 200, _answer_someone_elses),
    Row("removeMember", "manage", 200, _remove_member),
    Row("changeMemberRole", "manage", 200, _change_role),
    Row("listMyInvites", "session", 200, lambda w, h: w.api.http.get("/api/invites", headers=h)),
    Row(
        "listBuckets",
        "read",
        200,
        lambda w, h: w.api.http.get("/api/storage/buckets", params=_q(w), headers=h),
    ),
    Row(
        "createBucket",
        "schema",
        201,
        lambda w, h: w.api.http.post(
            "/api/storage/buckets", json={"projectId": w.pid, "name": "c" + secrets.token_hex(4)}, headers=h
        ),
    ),
    Row("updateBucket", "schema", 200, _update_bucket),
    Row("deleteBucket", "schema", 200, _delete_bucket),
    Row("uploadFile", "write", 201, lambda w, h: w.upload(h)),
    Row(
        "listFiles",
        "read",
        200,
        lambda w, h: w.api.http.get("/api/storage/files", params=_q(w, bucketId="b"), headers=h),
    ),
    Row(
        "getFileUrl",
        "read",
        200,
        lambda w, h: w.api.http.get("/api/storage/url", params=_q(w, s3Key=w.file_key), headers=h),
    ),
    Row("deleteFiles", "schema", 200, _delete_files("/api/storage/files")),
    Row("deleteFile", "schema", 200, _delete_files("/api/storage/delete")),
    Row(
        "createUploadUrl",
        "write",
        201,
        lambda w, h: w.api.http.post(
            "/api/storage/upload-url",
            json={"projectId": w.pid, "bucketId": "b", "name": f"u-{secrets.token_hex(4)}.bin"},
            headers=h,
        ),
    ),
    Row(
        "confirmUpload",
        "write",
        200,
        lambda w, h: w.api.http.post(
            "/api/storage/upload-url/confirm", json={"projectId": w.pid, "fileId": w.file_id}, headers=h
        ),
    ),
    Row(
        "listRealtimeTables",
        "read",
        200,
        lambda w, h: w.api.http.get("/api/realtime/tables", params=_q(w), headers=h),
    ),
    Row(
        "enableRealtime",
        "schema",
        200,
        lambda w, h: w.api.http.post(
            "/api/realtime/enable", json={"projectId": w.pid, "tables": ["items"]}, headers=h
        ),
    ),
    Row(
        "disableRealtime",
        "schema",
        200,
        lambda w, h: w.api.http.post(
            "/api/realtime/disable", json={"projectId": w.pid, "tables": ["items"]}, headers=h
        ),
    ),
    Row("getVersion", "read", 200, lambda w, h: w.api.http.get("/api/version", params=_q(w), headers=h)),
    Row(
        "createRealtimeToken",
        "read",
        201,
        lambda w, h: w.api.http.post("/api/realtime/token", json={"projectId": w.pid}, headers=h),
    ),
    Row(
        "broadcast",
        "write",
        200,
        lambda w, h: w.api.http.post(
            "/api/realtime/broadcast",
            json={"projectId": w.pid, "event": "ping", "payload": {"n": 1}},
            headers=h,
        ),
    ),
    *WEBHOOK_ROWS,
    *DATA_ROWS,
    Row(
        "applyMigration",
        "schema",
        200,
        lambda w, h: w.api.http.post(
            f"/api/projects/{w.pid}/migrations",
            json={"name": f"m_{secrets.token_hex(4)}", "sql": "SELECT 1"},
            headers=h,
        ),
    ),
    Row(
        "listMigrations",
        "read",
        200,
        lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/migrations", headers=h),
    ),
    Row(
        "vacuumProject",
        "manage",
        200,
        lambda w, h: w.api.http.post(f"/api/projects/{w.pid}/vacuum", headers=h),
    ),
    Row(
        "updateProject",
        "manage",
        200,
        lambda w, h: w.api.http.patch(f"/api/projects/{w.pid}", json={"readOnly": False}, headers=h),
    ),
    Row("getQuotas", "read", 200, lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/quotas", headers=h)),
    Row("exportProject", "manage", 200, _export),
    Row("importProject", "session", 201, _import),
    Row(
        "listProjectUsers",
        "manage",
        200,
        lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/auth/users", headers=h),
    ),
    Row("disableProjectUser", "manage", 200, _project_user_action("disable")),
    Row("enableProjectUser", "manage", 200, _project_user_action("enable")),
    Row("revokeProjectUserSessions", "manage", 200, _project_user_action("revoke-sessions")),
    Row("deleteProjectUser", "manage", 200, _delete_project_user),
    Row(
        "getProjectAuthSettings",
        "manage",
        200,
        lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/auth/settings", headers=h),
    ),
    Row(
        "updateProjectAuthSettings",
        "manage",
        200,
        lambda w, h: w.api.http.patch(
            f"/api/projects/{w.pid}/auth/settings", json={"registrationOpen": True}, headers=h
        ),
    ),
    Row(
        "listMailTemplates",
        "manage",
        200,
        lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/mail/templates", headers=h),
    ),
    Row(
        "setMailTemplate",
        "manage",
        200,
        lambda w, h: w.api.http.put(
            f"/api/projects/{w.pid}/mail/templates/reset",
            json={"subject": "Reset", "text": "{{ link }}", "html": "<a href='{{ link }}'>reset</a>"},
            headers=h,
        ),
    ),
    Row(
        "resetMailTemplate",
        "manage",
        200,
        lambda w, h: w.api.http.delete(f"/api/projects/{w.pid}/mail/templates/reset", headers=h),
    ),
    Row(
        "previewMailTemplate",
        "manage",
        200,
        lambda w, h: w.api.http.post(
            f"/api/projects/{w.pid}/mail/templates/verify/preview", json={}, headers=h
        ),
    ),
    Row("mailLog", "manage", 200, lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/mail/log", headers=h)),
    Row("listRls", "manage", 200, lambda w, h: w.api.http.get(f"/api/projects/{w.pid}/rls", headers=h)),
    Row("createPolicy", "manage", 201, _create_policy),
    Row("dropPolicy", "manage", 200, _drop_policy),
    Row(
        "setTableRls",
        "manage",
        200,
        lambda w, h: w.api.http.post(
            f"/api/projects/{w.pid}/rls/tables/items", json={"forced": False}, headers=h
        ),
    ),
    Row(
        "getRealtimeSettings",
        "read",
        200,
        lambda w, h: w.api.http.get("/api/realtime/settings", params=_q(w), headers=h),
    ),
    Row(
        "setRealtimeSettings",
        "manage",
        200,
        lambda w, h: w.api.http.post(
            "/api/realtime/settings", json={"projectId": w.pid, "schemaEventsToUsers": False}, headers=h
        ),
    ),
    # Last: the admin's call deletes the project.
    Row("deleteProject", "owner", 200, lambda w, h: w.api.http.delete(f"/api/projects/{w.pid}", headers=h)),
)


async def test_every_route_is_in_the_matrix(api: Api) -> None:
    spec = (await api.http.get("/schema/openapi.json")).json()
    routes = {
        op["operationId"] for path in spec["paths"].values() for op in path.values() if "operationId" in op
    }
    in_matrix = {row.op for row in MATRIX}
    assert len(in_matrix) == len(MATRIX)
    missing = routes - in_matrix - NOT_PROJECT_SCOPED - INSTANCE_ADMIN_ROUTES
    assert not missing, f"routes with no row in the permission matrix: {sorted(missing)}"
    assert in_matrix <= routes, f"matrix rows for routes that do not exist: {sorted(in_matrix - routes)}"


def test_expectations_follow_the_documented_model() -> None:
    # A few fixed points, so that a mistake in `expected` cannot silently weaken the matrix.
    assert expected("read", "viewer", 200) == (200, None)
    assert expected("write", "viewer", 201) == (403, "INSUFFICIENT_PERMISSIONS")
    assert expected("write", "key_read", 201) == (403, "INSUFFICIENT_PERMISSIONS")
    assert expected("schema", "developer", 200) == (200, None)
    assert expected("schema", "key_readwrite", 200) == (403, "INSUFFICIENT_PERMISSIONS")
    assert expected("manage", "developer", 200) == (403, "INSUFFICIENT_PERMISSIONS")
    assert expected("manage", "key_admin", 200) == (200, None)
    assert expected("owner", "key_admin", 200) == (403, "INSUFFICIENT_PERMISSIONS")
    assert expected("read", "removed_admin", 200) == (403, "SCOPE_MISMATCH")
    assert expected("read", "foreign_key", 200) == (403, "SCOPE_MISMATCH")
    assert expected("read", "no_credential", 200) == (401, "AUTH_REQUIRED")
    assert expected("session", "key_admin", 200) == (401, "AUTH_REQUIRED")


_DOCUMENTED: dict[str, dict[str, set[str]]] = {}


async def documented_codes(api: Api, op_id: str) -> dict[str, set[str]]:
    """The error codes the OpenAPI document lists for an operation, by status."""
    if not _DOCUMENTED:
        spec = (await api.http.get("/schema/openapi.json")).json()
        for item in spec["paths"].values():
            for op in item.values():
                if isinstance(op, dict) and "operationId" in op:
                    _DOCUMENTED[op["operationId"]] = {
                        status: set(
                            r["content"]["application/json"]["schema"]["properties"]["error"]["properties"][
                                "code"
                            ]["enum"]
                        )
                        for status, r in op["responses"].items()
                        if status[0] in "45"
                    }
    return _DOCUMENTED[op_id]


@pytest.mark.parametrize("row", MATRIX, ids=lambda row: row.op)
async def test_permission_matrix(world: World, row: Row) -> None:
    failures: list[str] = []
    listed = await documented_codes(world.api, row.op)
    for principal in PRINCIPALS:
        status, code = expected(row.level, principal, row.ok)
        resp = await row.call(world, world.headers(principal))
        assert_clean(resp, *(c for c in world.creds.values() if c))
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400 and isinstance(body, dict) and isinstance(body.get("error"), dict):
            # Every refusal is one the contract lists for this operation (http.error_codes).
            answered = body["error"].get("code")
            if answered not in listed.get(str(resp.status_code), set()):
                failures.append(f"{principal}: {resp.status_code} {answered} is not in the document's list")
        if code is None:
            good = resp.status_code == status and isinstance(body, dict) and body.get("success") is True
        else:
            error = body.get("error") if isinstance(body, dict) else None
            good = (
                resp.status_code == status
                and isinstance(error, dict)
                and error.get("code") == code
                and body.get("success") is False
            )
        if not good:
            failures.append(
                f"{principal}: expected {status} {code or 'success'}, got {resp.status_code} "
                f"{resp.text[:300]}"
            )
    assert not failures, f"{row.op} ({row.level}):\n" + "\n".join(failures)
