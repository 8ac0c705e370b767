"""Project end users: register, login, refresh rotation, logout, me, admin actions, auth settings."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import jwt

from fluxbase.config import load_settings
from fluxbase.worker import housekeeping
from support import Api, assert_clean, assert_error, bearer, random_ip

PASSWORD = "correct horse battery"


def base(pid: str) -> str:
    return f"/api/projects/{pid}/auth"


async def register(api: Api, pid: str, email: str | None = None, password: str = PASSWORD) -> dict[str, Any]:
    email = email or f"enduser-{secrets.token_hex(4)}@example.com"
    r = await api.http.post(f"{base(pid)}/register", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    return {**r.json()["user"], "password": password}


async def login(
    api: Api, pid: str, email: str, password: str = PASSWORD, ip: str | None = None
) -> httpx.Response:
    return await api.http.post(
        f"{base(pid)}/login",
        json={"email": email, "password": password},
        headers={"X-Forwarded-For": ip or random_ip()},
    )


async def new_session(api: Api, pid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    user = await register(api, pid)
    r = await login(api, pid, user["email"])
    assert r.status_code == 200, r.text
    return user, r.json()


async def test_register_login_me_and_token_shape(api: Api, project) -> None:
    user = await register(api, project.id, email="Ann@Example.com")
    assert user["id"].startswith("pu_") and user["email"] == "Ann@Example.com" and user["disabled"] is False
    assert_clean(await api.http.get(f"{base(project.id)}/users", headers=bearer(project.admin_key)))
    # Email is case-insensitive and unique per project.
    dup = await api.http.post(
        f"{base(project.id)}/register", json={"email": "ann@example.com", "password": PASSWORD}
    )
    assert_error(dup, 409, "CONFLICT")
    short = await api.http.post(
        f"{base(project.id)}/register", json={"email": "b@example.com", "password": "short"}
    )
    assert_error(short, 400, "VALIDATION_ERROR")

    r = await login(api, project.id, "ann@example.com")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokenType"] == "bearer" and body["refreshToken"].startswith("fxr_")
    assert body["user"]["id"] == user["id"]
    claims = jwt.decode(body["accessToken"], options={"verify_signature": False})
    assert claims["iss"] == "fluxbase" and claims["aud"] == project.id and claims["sub"] == user["id"]
    assert claims["exp"] == body["expiresAt"] and claims["sid"]
    assert_clean(r, PASSWORD)

    me = await api.http.get(f"{base(project.id)}/me", headers=bearer(body["accessToken"]))
    assert me.status_code == 200 and me.json()["user"]["email"] == "Ann@Example.com"
    assert me.json()["user"]["lastLoginAt"] is not None
    # The same user's token is not valid for another project (audience and key differ).
    _, other_token = await api.new_user()
    other = await api.new_project(other_token)
    assert_error(
        await api.http.get(f"{base(other)}/me", headers=bearer(body["accessToken"])),
        401,
        "INVALID_USER_TOKEN",
    )
    assert_error(await api.http.get(f"{base(project.id)}/me"), 401, "AUTH_REQUIRED")


async def test_unknown_email_and_wrong_password_answer_the_same(api: Api, project) -> None:
    user = await register(api, project.id)
    wrong = await login(api, project.id, user["email"], "not the password")
    unknown = await login(api, project.id, "nobody-" + user["email"], "not the password")
    a = assert_error(wrong, 401, "AUTH_REQUIRED")
    b = assert_error(unknown, 401, "AUTH_REQUIRED")
    assert a == b
    # Dashboard accounts and other projects' users are separate: this email is unknown elsewhere.
    _, token = await api.new_user()
    other = await api.new_project(token)
    assert_error(await login(api, other, user["email"]), 401, "AUTH_REQUIRED")


async def test_login_throttle_per_project_and_ip(api: Api, project) -> None:
    user = await register(api, project.id)
    ip = random_ip()
    for _ in range(5):
        assert_error(
            await login(api, project.id, user["email"], "wrong password!", ip=ip), 401, "AUTH_REQUIRED"
        )
    blocked = await login(api, project.id, user["email"], ip=ip)
    assert_error(blocked, 429, "RATE_LIMIT")
    assert int(blocked.headers["Retry-After"]) > 0
    # Another client address is not blocked.
    assert (await login(api, project.id, user["email"])).status_code == 200


async def test_two_refreshes_at_once_with_one_token_both_succeed(api: Api, project) -> None:
    """Two tabs that share a session may send the same refresh token at the same moment. Within
    FLUXBASE_ENDUSER_REFRESH_REUSE_SECONDS (10 s), while no successor of the token was used, the
    second is answered with a new pair of the same session instead of revoking it."""
    _, s1 = await new_session(api, project.id)
    url = f"{base(project.id)}/refresh"
    a, b = await asyncio.gather(
        api.http.post(url, json={"refreshToken": s1["refreshToken"]}),
        api.http.post(url, json={"refreshToken": s1["refreshToken"]}),
    )
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    pa, pb = a.json(), b.json()
    assert pa["refreshToken"] != pb["refreshToken"]
    for pair in (pa, pb):
        assert (
            await api.http.get(f"{base(project.id)}/me", headers=bearer(pair["accessToken"]))
        ).status_code == 200
    # Each successor works once, as usual.
    r = await api.http.post(url, json={"refreshToken": pa["refreshToken"]})
    assert r.status_code == 200, r.text


async def test_a_used_token_outside_the_reuse_window_revokes(api: Api, project, control_db) -> None:
    _, s1 = await new_session(api, project.id)
    url = f"{base(project.id)}/refresh"
    r = await api.http.post(url, json={"refreshToken": s1["refreshToken"]})
    assert r.status_code == 200, r.text
    s2 = r.json()
    await control_db.execute(
        "UPDATE fluxbase.project_user_refresh_tokens SET used_at = used_at - interval '11 seconds' "
        "WHERE used_at IS NOT NULL AND session_id IN (SELECT s.id FROM fluxbase.project_user_sessions s "
        "JOIN fluxbase.project_users u ON u.id = s.user_id WHERE u.project_id = $1)",
        project.id,
    )
    reuse = await api.http.post(url, json={"refreshToken": s1["refreshToken"]})
    assert_error(reuse, 401, "INVALID_USER_TOKEN")
    assert_error(
        await api.http.post(url, json={"refreshToken": s2["refreshToken"]}), 401, "INVALID_USER_TOKEN"
    )


async def test_refresh_rotates_and_reuse_revokes_the_session(api: Api, project) -> None:
    _, s1 = await new_session(api, project.id)
    r = await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": s1["refreshToken"]})
    assert r.status_code == 200, r.text
    s2 = r.json()
    assert s2["refreshToken"] != s1["refreshToken"] and s2["accessToken"]
    me = await api.http.get(f"{base(project.id)}/me", headers=bearer(s2["accessToken"]))
    assert me.status_code == 200
    # s2 is spent too: from now on s1 is a token whose successor was used, i.e. a stolen copy.
    r = await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": s2["refreshToken"]})
    assert r.status_code == 200, r.text
    s2 = r.json()
    # Presenting the rotated (used) token again: refused, and the whole session ends.
    reuse = await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": s1["refreshToken"]})
    assert_error(reuse, 401, "INVALID_USER_TOKEN")
    assert "already used" in reuse.json()["error"]["message"]
    assert_error(
        await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": s2["refreshToken"]}),
        401,
        "INVALID_USER_TOKEN",
    )
    assert_error(
        await api.http.get(f"{base(project.id)}/me", headers=bearer(s2["accessToken"])),
        401,
        "INVALID_USER_TOKEN",
    )
    for junk in ("fxr_nope", "not-a-token"):
        bad = await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": junk})
        assert_error(bad, 401, "INVALID_USER_TOKEN")
    # A refresh token only works on its own project.
    _, s3 = await new_session(api, project.id)
    _, token = await api.new_user()
    other = await api.new_project(token)
    cross = await api.http.post(f"{base(other)}/refresh", json={"refreshToken": s3["refreshToken"]})
    assert_error(cross, 401, "INVALID_USER_TOKEN")


async def test_logout_ends_access_and_refresh(api: Api, project) -> None:
    _, s = await new_session(api, project.id)
    _, other = await new_session(api, project.id)
    r = await api.http.post(f"{base(project.id)}/logout", headers=bearer(s["accessToken"]))
    assert r.status_code == 200 and r.json() == {"success": True}
    assert_error(
        await api.http.get(f"{base(project.id)}/me", headers=bearer(s["accessToken"])),
        401,
        "INVALID_USER_TOKEN",
    )
    refresh = await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": s["refreshToken"]})
    assert_error(refresh, 401, "INVALID_USER_TOKEN")
    # Other sessions are untouched.
    assert (
        await api.http.get(f"{base(project.id)}/me", headers=bearer(other["accessToken"]))
    ).status_code == 200


async def test_admin_list_disable_enable_revoke_delete(api: Api, project) -> None:
    user, s = await new_session(api, project.id)
    admin = bearer(project.admin_key)
    listed = await api.http.get(f"{base(project.id)}/users", headers=admin)
    assert listed.status_code == 200
    assert [u["id"] for u in listed.json()["users"]] == [user["id"]] and listed.json()["total"] == 1
    assert_clean(listed, "argon2")

    # Only MANAGE: a readwrite key and a viewer are refused.
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    assert_error(
        await api.http.get(f"{base(project.id)}/users", headers=bearer(rw)), 403, "INSUFFICIENT_PERMISSIONS"
    )
    assert_error(
        await api.http.get(f"{base(project.id)}/users", headers=bearer(s["accessToken"])),
        401,
        "AUTH_REQUIRED",
    )

    r = await api.http.post(f"{base(project.id)}/users/{user['id']}/disable", headers=admin)
    assert r.status_code == 200 and r.json()["user"]["disabled"] is True
    assert_error(
        await api.http.get(f"{base(project.id)}/me", headers=bearer(s["accessToken"])), 401, "USER_DISABLED"
    )
    assert_error(await login(api, project.id, user["email"]), 401, "USER_DISABLED")
    refresh = await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": s["refreshToken"]})
    assert_error(refresh, 401, "USER_DISABLED")
    r = await api.http.post(f"{base(project.id)}/users/{user['id']}/enable", headers=admin)
    assert r.status_code == 200 and r.json()["user"]["disabled"] is False
    assert (await api.http.get(f"{base(project.id)}/me", headers=bearer(s["accessToken"]))).status_code == 200

    r2 = (await login(api, project.id, user["email"])).json()
    r = await api.http.post(f"{base(project.id)}/users/{user['id']}/revoke-sessions", headers=admin)
    assert r.status_code == 200 and r.json()["revokedSessions"] == 2
    for tok in (s["accessToken"], r2["accessToken"]):
        assert_error(
            await api.http.get(f"{base(project.id)}/me", headers=bearer(tok)), 401, "INVALID_USER_TOKEN"
        )
    # A fresh login works again after a revocation.
    s3 = (await login(api, project.id, user["email"])).json()
    assert (
        await api.http.get(f"{base(project.id)}/me", headers=bearer(s3["accessToken"]))
    ).status_code == 200

    r = await api.http.delete(f"{base(project.id)}/users/{user['id']}", headers=admin)
    assert r.status_code == 200
    assert_error(
        await api.http.get(f"{base(project.id)}/me", headers=bearer(s3["accessToken"])),
        401,
        "INVALID_USER_TOKEN",
    )
    assert_error(
        await api.http.delete(f"{base(project.id)}/users/{user['id']}", headers=admin), 404, "USER_NOT_FOUND"
    )
    assert_error(
        await api.http.post(f"{base(project.id)}/users/pu_missing/disable", headers=admin),
        404,
        "USER_NOT_FOUND",
    )
    # Users of another project are out of reach.
    _, token = await api.new_user()
    other = await api.new_project(token)
    stranger = await register(api, other)
    assert_error(
        await api.http.post(f"{base(project.id)}/users/{stranger['id']}/disable", headers=admin),
        404,
        "USER_NOT_FOUND",
    )


async def test_settings_secret_is_write_only_and_registration_can_close(api: Api, project) -> None:
    owner = bearer(project.owner_token)
    r = await api.http.get(f"{base(project.id)}/settings", headers=owner)
    assert r.status_code == 200
    assert r.json()["settings"] == {
        "registrationOpen": True,
        "jwtSecretSet": False,
        "jwksUri": None,
        "jwtAllowedIssuers": [],
        "jwtExpectedAudiences": [],
        "emailVerification": "off",
        "redirectUrls": [],
    }
    secret = "s3cr3t-" + secrets.token_hex(24)
    r = await api.http.patch(
        f"{base(project.id)}/settings",
        json={
            "jwtSecret": secret,
            "jwksUri": "https://issuer.example.com/.well-known/jwks.json",
            "jwtAllowedIssuers": ["https://issuer.example.com/"],
            "jwtExpectedAudiences": ["my-app"],
            "registrationOpen": False,
        },
        headers=owner,
    )
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["jwtSecretSet"] is True and r.json()["settings"]["registrationOpen"] is False
    assert_clean(r, secret)
    got = await api.http.get(f"{base(project.id)}/settings", headers=bearer(project.admin_key))
    assert_clean(got, secret)
    assert got.json()["settings"]["jwtAllowedIssuers"] == ["https://issuer.example.com/"]

    closed = await api.http.post(
        f"{base(project.id)}/register", json={"email": "x@example.com", "password": PASSWORD}
    )
    assert_error(closed, 403, "REGISTRATION_CLOSED")

    # Invalid input changes nothing (validated before anything is written).
    for bad in (
        {"jwtSecret": "too-short", "registrationOpen": True},
        {"jwksUri": "ftp://x", "registrationOpen": True},
        {"jwtSecrets": secret},
        {"registrationOpen": "yes"},
    ):
        assert_error(
            await api.http.patch(f"{base(project.id)}/settings", json=bad, headers=owner),
            400,
            "VALIDATION_ERROR",
        )
    got = (await api.http.get(f"{base(project.id)}/settings", headers=owner)).json()["settings"]
    assert got["registrationOpen"] is False and got["jwtSecretSet"] is True

    # A partial PATCH keeps the rest; null clears.
    r = await api.http.patch(
        f"{base(project.id)}/settings", json={"registrationOpen": True, "jwtSecret": None}, headers=owner
    )
    s = r.json()["settings"]
    assert (
        s["registrationOpen"] is True
        and s["jwtSecretSet"] is False
        and s["jwtExpectedAudiences"] == ["my-app"]
    )
    await register(api, project.id)

    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    assert_error(
        await api.http.get(f"{base(project.id)}/settings", headers=bearer(rw)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(
        await api.http.patch(
            f"{base(project.id)}/settings", json={"registrationOpen": False}, headers=bearer(rw)
        ),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )


async def test_unknown_project(api: Api) -> None:
    r = await api.http.post(
        f"{base('0123456789abcdef')}/register", json={"email": "a@example.com", "password": PASSWORD}
    )
    assert_error(r, 404, "PROJECT_NOT_FOUND")
    assert_error(await login(api, "0123456789abcdef", "a@example.com"), 404, "PROJECT_NOT_FOUND")


async def test_housekeeping_removes_old_sessions(api: Api, project, instance, control_db) -> None:
    _, old = await new_session(api, project.id)
    _, live = await new_session(api, project.id)
    sid = jwt.decode(old["accessToken"], options={"verify_signature": False})["sid"]
    await control_db.execute(
        "UPDATE fluxbase.project_user_sessions SET expires_at = now() - interval '2 days' WHERE id = $1", sid
    )
    counts = await housekeeping(control_db, load_settings(instance.env))
    assert counts["projectUserSessions"] >= 1
    assert (
        await control_db.fetchval("SELECT count(*) FROM fluxbase.project_user_sessions WHERE id = $1", sid)
        == 0
    )
    gone = await api.http.post(f"{base(project.id)}/refresh", json={"refreshToken": old["refreshToken"]})
    assert_error(gone, 401, "INVALID_USER_TOKEN")
    assert_error(
        await api.http.get(f"{base(project.id)}/me", headers=bearer(old["accessToken"])),
        401,
        "INVALID_USER_TOKEN",
    )
    assert (
        await api.http.get(f"{base(project.id)}/me", headers=bearer(live["accessToken"]))
    ).status_code == 200
