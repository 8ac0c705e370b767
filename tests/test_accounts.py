"""Dashboard accounts through the real HTTP API: register, login, throttling, sessions."""

from __future__ import annotations

import asyncio
import statistics
import time

from fluxbase.security import tokens
from support import Api, assert_error, bearer, random_ip


async def test_first_account_is_instance_admin_and_status_reports_it(spawn) -> None:
    async with spawn() as inst:
        api = Api(inst.url)
        try:
            r = await api.http.get("/api/admin/status")
            assert r.status_code == 200 and r.json()["adminExists"] is False
            first = await api.register(email="First@Example.com")
            second = await api.register()
            assert first["isInstanceAdmin"] is True
            assert second["isInstanceAdmin"] is False
            assert (await api.http.get("/api/admin/status")).json()["adminExists"] is True
        finally:
            await api.close()


async def test_closed_registration_refuses_all_but_the_first(spawn) -> None:
    async with spawn(FLUXBASE_ALLOW_REGISTRATION="false") as inst:
        api = Api(inst.url)
        try:
            await api.register()
            r = await api.http.post(
                "/api/auth/register", json={"email": "late@example.com", "password": "long enough pw"}
            )
            assert_error(r, 403, "REGISTRATION_CLOSED")
        finally:
            await api.close()


async def test_register_validation_and_duplicates(api: Api, instance_admin) -> None:
    r = await api.http.post(
        "/api/auth/register", json={"email": "not-an-email", "password": "long enough pw"}
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.post("/api/auth/register", json={"email": "a@b.co", "password": "short"})
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.post("/api/auth/register", json={"email": "a@b.co"})
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.post(
        "/api/auth/register", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    user = await api.register()
    r = await api.http.post(
        "/api/auth/register", json={"email": user["email"].upper(), "password": "another long pw"}
    )
    assert_error(r, 409, "CONFLICT")


async def test_login_me_logout(api: Api, instance_admin) -> None:
    user = await api.register(name="Alice")
    token = await api.login(user["email"].upper(), user["password"])  # emails are case-insensitive
    r = await api.http.get("/api/auth/me", headers=bearer(token))
    assert r.status_code == 200
    me = r.json()["user"]
    assert me["email"] == user["email"] and me["displayName"] == "Alice"
    assert "password" not in r.text and "passwordHash" not in r.text
    r = await api.http.post("/api/auth/logout", headers=bearer(token))
    assert r.status_code == 200
    assert_error(await api.http.get("/api/auth/me", headers=bearer(token)), 401, "AUTH_REQUIRED")


async def test_missing_and_garbage_credentials(api: Api) -> None:
    assert_error(await api.http.get("/api/auth/me"), 401, "AUTH_REQUIRED")
    assert_error(await api.http.get("/api/auth/me", headers=bearer("garbage")), 401, "AUTH_REQUIRED")
    assert_error(
        await api.http.get("/api/auth/me", headers={"Authorization": "Basic abc"}), 401, "AUTH_REQUIRED"
    )


async def test_expired_session_token(api: Api, stack, instance_admin) -> None:
    _user, token = await api.new_user()
    claims = tokens.verify(stack.secret_key, token, kind="session")
    expired, _ = tokens.issue(
        stack.secret_key,
        kind="session",
        subject=claims.subject,
        session_id=claims.session_id,
        ttl_seconds=60,
        now=time.time() - 3600,
    )
    assert_error(await api.http.get("/api/auth/me", headers=bearer(expired)), 401, "TOKEN_EXPIRED")
    # A token signed with another secret is not accepted.
    forged, _ = tokens.issue(
        "x" * 48, kind="session", subject=claims.subject, session_id=claims.session_id, ttl_seconds=60
    )
    assert_error(await api.http.get("/api/auth/me", headers=bearer(forged)), 401, "AUTH_REQUIRED")


async def test_login_throttled_per_account_and_client_with_retry_after(api: Api, instance_admin) -> None:
    """The basics; tests/test_login_throttle.py has the attacks (issue 15, finding 6)."""
    user = await api.register()
    ip = random_ip()
    for _ in range(5):
        r = await api.http.post(
            "/api/auth/login",
            json={"email": user["email"], "password": "wrong password"},
            headers={"X-Forwarded-For": ip},
        )
        assert_error(r, 401, "AUTH_REQUIRED")
    r = await api.http.post(
        "/api/auth/login",
        json={"email": user["email"], "password": user["password"]},
        headers={"X-Forwarded-For": ip},
    )
    assert_error(r, 429, "RATE_LIMIT")
    assert 1 <= int(r.headers["Retry-After"]) <= 15 * 60
    # Another client IP is not affected.
    r = await api.http.post(
        "/api/auth/login",
        json={"email": user["email"], "password": user["password"]},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 200


async def test_unknown_email_and_wrong_password_look_the_same(api: Api, instance_admin) -> None:
    user = await api.register()

    async def attempt(email: str) -> tuple[float, int, dict]:
        t0 = time.perf_counter()
        r = await api.http.post(
            "/api/auth/login",
            json={"email": email, "password": "definitely wrong"},
            headers={"X-Forwarded-For": random_ip()},
        )
        return time.perf_counter() - t0, r.status_code, r.json()

    unknown, wrong = [], []
    for _ in range(6):
        unknown.append(await attempt(f"nobody-{time.time_ns()}@example.com"))
        wrong.append(await attempt(user["email"]))
    assert {s for _, s, _ in unknown} == {s for _, s, _ in wrong} == {401}
    assert {b["error"]["message"] for *_, b in unknown} == {b["error"]["message"] for *_, b in wrong}
    # Both paths run one argon2 verification: medians within a factor of 2 of each other.
    mu, mw = statistics.median(t for t, *_ in unknown), statistics.median(t for t, *_ in wrong)
    assert 0.5 < mu / mw < 2.0, (mu, mw)


async def test_concurrent_first_registrations_make_one_admin(spawn) -> None:
    async with spawn() as inst:
        api = Api(inst.url)
        try:
            users = await asyncio.gather(*(api.register() for _ in range(5)))
            assert sum(u["isInstanceAdmin"] for u in users) == 1
        finally:
            await api.close()


async def test_tenant_advisory_lock_does_not_block_registration(api: Api, project, control_db) -> None:
    """Registration used to serialise on advisory key 7243190002, which any tenant can take."""
    hold_s = 8
    holder = asyncio.create_task(
        api.sql(
            project.admin_key, project.id, f"SELECT pg_advisory_xact_lock(7243190002), pg_sleep({hold_s})"
        )
    )

    async def lock_held() -> bool:
        n = await control_db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return bool(n)

    deadline = time.monotonic() + 10
    while not await lock_held():
        assert time.monotonic() < deadline, "the tenant never got its lock"
        await asyncio.sleep(0.05)
    try:
        user, _ = await api.new_user()
        assert user["email"]
        # Registered while the tenant still holds the key: nothing waited on it.
        assert await lock_held()
    finally:
        done = await holder
    assert done.json()["success"], done.text


def test_the_timing_equalisers_hash_has_the_hashers_parameters() -> None:
    """An unknown email is verified against a fixed dummy hash so that it costs what a known one
    does: only while that hash carries the parameters real hashes get (a library upgrade that
    changes them must change it too), and it is a hash of the phrase it claims."""
    from fluxbase.security import passwords

    assert not passwords._hasher.check_needs_rehash(passwords._DUMMY_HASH)
    assert passwords._hasher.verify(passwords._DUMMY_HASH, "fluxbase-timing-equaliser")
