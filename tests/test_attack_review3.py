"""Hostile review 3: the tenancy kernel (pooled sessions, the one-round-trip path, the
classifier), the realtime checker and the end-user flows new since round 2, attacked through the
public HTTP and WebSocket API.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix. The database fixture (`control_db`) is used only to observe
effects, never to set an attack up.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from mailsupport import link_of, link_token, token_of, wait_mail
from support import Api, bearer, random_ip
from test_attack_review1 import MANY, PASSWORD, batch, browser_key, end_user, sql
from test_mail_flows import email as mail_address
from test_mail_flows import (
    env,  # noqa: F401 (its fixture: an instance with a mail catcher)
    login,
    new_project,
    post,
    register_user,
)
from test_realtime import _realtime, subscribe


@pytest.fixture(scope="module")
def rt(instance: Any, log_dir: Any) -> Iterator[str]:
    with _realtime(instance, log_dir) as url:
        yield url


# -- 1. other requests' prepared statements, run from a DO block's dynamic SQL --------------------

# Scans asyncpg's statement names (__asyncpg_stmt_<hex>__, one process-wide counter) on the
# pooled session from inside PL/pgSQL, where the classifier sees one DoStmt and nothing of the
# EXECUTE in the string. Whatever EXPLAIN VERBOSE shows of a statement that mentions `marker`
# comes back in the error message.
PEEK = """DO $peek$
DECLARE line text; found text := ''; n int;
BEGIN
  FOR n IN {lo} .. {hi} LOOP
    BEGIN
      FOR line IN EXECUTE pg_catalog.format('EXPLAIN (VERBOSE) EXECUTE %I',
                                            '__asyncpg_stmt_' || pg_catalog.to_hex(n) || '__') LOOP
        IF pg_catalog.strpos(line, '{marker}') > 0 THEN found := found || line; END IF;
      END LOOP;
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    EXIT WHEN found <> '';
  END LOOP;
  RAISE EXCEPTION 'peek: [%]', found;
END $peek$"""


async def peek_statements(api: Api, key: str, pid: str, marker: str, token: str | None = None) -> str:
    """What a DO block finds of `marker` in the session's prepared statements ('' if nothing)."""
    needle = marker[:8]  # the probe's own text holds only this prefix, never the whole marker
    for lo in range(1, 600_000, 60_000):
        body = await sql(api, key, pid, PEEK.format(lo=lo, hi=lo + 59_999, marker=needle), token)
        text = str(body)
        if marker in text:
            return text
        if "peek: [" not in text:
            return ""  # refused (or failed otherwise): nothing seen
    return ""


async def test_end_user_cannot_read_another_users_statement_via_dynamic_execute(
    api: Api, project: Any
) -> None:
    pid = project.id
    key = await browser_key(api, project)
    _v, victim = await end_user(api, pid)
    _m, mallory = await end_user(api, pid)
    marker = f"victimsecret{secrets.token_hex(6)}"
    for _ in range(3):
        assert (await sql(api, key, pid, f"SELECT '{marker}' AS s", victim))["success"]
    await asyncio.gather(*(sql(api, key, pid, f"SELECT '{marker}' AS s", victim) for _ in range(6)))
    leak = await peek_statements(api, key, pid, marker, mallory)
    assert marker not in leak, leak


async def test_key_cannot_read_another_keys_statement_via_dynamic_execute(api: Api, project: Any) -> None:
    pid = project.id
    victim = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    mallory = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    marker = f"keysecret{secrets.token_hex(6)}"
    for _ in range(3):
        assert (await sql(api, victim, pid, f"SELECT '{marker}' AS s"))["success"]
    leak = await peek_statements(api, mallory, pid, marker)
    assert marker not in leak, leak


async def test_admin_key_cannot_read_another_admin_keys_statement_via_dynamic_execute(
    api: Api, project: Any
) -> None:
    pid = project.id
    victim = await api.new_key(project.owner_token, pid, "admin", rateLimitRequests=MANY)
    mallory = await api.new_key(project.owner_token, pid, "admin", rateLimitRequests=MANY)
    marker = f"adminsecret{secrets.token_hex(6)}"
    for _ in range(3):
        assert (await sql(api, victim, pid, f"SELECT '{marker}' AS s"))["success"]
    leak = await peek_statements(api, mallory, pid, marker)
    assert marker not in leak, leak


# -- 2. the realtime checker: a policy that will not stop --------------------------------------------

# PL/pgSQL that swallows cancellation (the checker's timeout is a cancel request): it ends only
# by itself, after `seconds`, or when its backend is terminated.
STUBBORN = """CREATE FUNCTION stubborn() RETURNS boolean LANGUAGE plpgsql AS $f$
DECLARE t0 timestamptz := pg_catalog.clock_timestamp();
BEGIN
  LOOP
    BEGIN
      PERFORM pg_catalog.pg_sleep(0.1);
    EXCEPTION WHEN query_canceled THEN NULL;
    END;
    EXIT WHEN pg_catalog.clock_timestamp() - t0 > interval '{seconds} seconds';
  END LOOP;
  RETURN true;
END $f$"""


async def stalling_table(api: Api, project: Any, seconds: int) -> str:
    """A table whose SELECT policy runs STUBBORN; a read key (gated by the checker)."""
    pid, key = project.id, project.admin_key
    for q in (
        STUBBORN.format(seconds=seconds),
        "CREATE TABLE stalled (v text)",
        "ALTER TABLE stalled ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY slow ON stalled FOR SELECT USING (stubborn())",
        "GRANT SELECT ON stalled TO PUBLIC",
    ):
        body = await sql(api, key, pid, q)
        assert body["success"], (q, body)
    return await api.new_key(project.owner_token, pid, "read", rateLimitRequests=MANY)


async def busy_checkers(control_db: asyncpg.Pool, pid: str) -> int:
    return int(
        await control_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'", f"p_{pid}_rt"
        )
    )


async def test_checker_backend_does_not_outlive_its_timeout(
    api: Api, project: Any, rt: str, control_db: asyncpg.Pool
) -> None:
    pid = project.id
    reader = await stalling_table(api, project, seconds=25)
    async with subscribe(rt, pid, reader, tables=["stalled"]):
        assert (await sql(api, project.admin_key, pid, "INSERT INTO stalled VALUES ('x')"))["success"]
        # The checker's timeout is 2 s (FLUXBASE_REALTIME_RLS_TIMEOUT_MS); wait for the check to
        # start, then well past its timeout.
        for _ in range(50):
            if await busy_checkers(control_db, pid):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(6)
        left = await busy_checkers(control_db, pid)
    assert left == 0, f"{left} checker backend(s) still running a policy past the checker's timeout"


async def test_one_projects_slow_policy_does_not_delay_another_projects_events(
    api: Api, project: Any, rt: str
) -> None:
    pid = project.id
    reader = await stalling_table(api, project, seconds=1)
    other = await api.new_project(project.owner_token, "bystander")
    other_admin = await api.new_key(project.owner_token, other, "admin", rateLimitRequests=MANY)
    other_reader = await api.new_key(project.owner_token, other, "read", rateLimitRequests=MANY)
    assert (await sql(api, other_admin, other, "CREATE TABLE news (v text)"))["success"]
    async with (
        subscribe(rt, pid, reader, tables=["stalled"]),
        subscribe(rt, other, other_reader, tables=["news"]) as bystander,
    ):
        loop = asyncio.get_running_loop()
        lags: list[float] = []
        for i in range(3):
            assert (await sql(api, project.admin_key, pid, "INSERT INTO stalled VALUES ('x')"))["success"]
            t0 = loop.time()
            assert (await sql(api, other_admin, other, f"INSERT INTO news VALUES ('n{i}')"))["success"]
            await bystander.rows(1, timeout=15)
            lags.append(loop.time() - t0)
    # Undisturbed delivery takes milliseconds; the stalling policy takes 1 s per check.
    assert max(lags) < 0.6, lags


async def test_external_token_subscription_ends_when_the_token_expires(
    api: Api, project: Any, rt: str
) -> None:
    import time

    import jwt as pyjwt

    pid = project.id
    secret = "an external provider's shared secret, 32+ bytes long"
    settings = {"jwtSecret": secret, "jwtAllowedIssuers": ["https://idp.example"]}
    r = await api.http.patch(
        f"/api/projects/{pid}/auth/settings", json=settings, headers=bearer(project.owner_token)
    )
    assert r.status_code == 200, r.text
    assert (await sql(api, project.admin_key, pid, "CREATE TABLE pub (v text)"))["success"]
    claims = {"sub": "ext-user", "iss": "https://idp.example", "exp": int(time.time()) + 3}
    token = pyjwt.encode(claims, secret, algorithm="HS256")
    async with subscribe(rt, pid, token, tables=["pub"]) as sub:
        # The provider's secret is rotated, and the token expires; SQL refuses it from then on.
        rotated = {"jwtSecret": "a new shared secret of the provider, 32+ bytes"}
        r = await api.http.patch(
            f"/api/projects/{pid}/auth/settings", json=rotated, headers=bearer(project.owner_token)
        )
        assert r.status_code == 200, r.text
        browser = await browser_key(api, project)
        h = {**bearer(browser), "X-Fluxbase-User-Token": token}
        r = await api.http.post(
            "/api/execute-sql", json={"projectId": pid, "query": "SELECT 1 AS x"}, headers=h
        )
        assert r.status_code == 401, r.text
        # Past the token's exp and a re-validation round (2 s).
        await asyncio.sleep(max(0.0, claims["exp"] - time.time()) + 3)
        assert (await sql(api, project.admin_key, pid, "INSERT INTO pub VALUES ('after-expiry')"))["success"]
        got = await sub.silent(2.0)
    assert not any("after-expiry" in str(m) for m in got), got


# -- 3. sign-up with a taken address: does the answer really hide the account? ---------------------


async def auth_post(api: Api, pid: str, what: str, body: dict[str, Any]) -> Any:
    return await api.http.post(
        f"/api/projects/{pid}/auth/{what}", json=body, headers={"X-Forwarded-For": random_ip()}
    )


async def verification_project(api: Api, project: Any, mode: str) -> str:
    pid = await api.new_project(project.owner_token, "verifying")
    r = await api.http.patch(
        f"/api/projects/{pid}/auth/settings",
        json={"emailVerification": mode},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 200, r.text
    return pid


async def test_signup_then_login_does_not_reveal_a_taken_address(api: Api, project: Any) -> None:
    pid = await verification_project(api, project, "required")
    taken = f"owner-{secrets.token_hex(4)}@example.com"
    fresh = f"nobody-{secrets.token_hex(4)}@example.com"
    r = await auth_post(api, pid, "register", {"email": taken, "password": "the owner's own pw 1"})
    assert r.status_code == 201, r.text
    answers = []
    for address in (taken, fresh):
        r = await auth_post(api, pid, "register", {"email": address, "password": PASSWORD})
        assert r.status_code == 201, r.text
        r = await auth_post(api, pid, "login", {"email": address, "password": PASSWORD})
        answers.append((r.status_code, r.json().get("error", {}).get("code")))
    assert answers[0] == answers[1], answers


async def test_signup_with_a_taken_address_answers_alike_and_leaves_the_account_alone(
    api: Api, project: Any
) -> None:
    pid = await verification_project(api, project, "required")
    taken = f"owner-{secrets.token_hex(4)}@example.com"
    fresh = f"nobody-{secrets.token_hex(4)}@example.com"
    first = await auth_post(api, pid, "register", {"email": taken, "password": "the owner's own pw 1"})
    assert first.status_code == 201, first.text
    a = await auth_post(api, pid, "register", {"email": taken, "password": PASSWORD, "displayName": "x"})
    b = await auth_post(api, pid, "register", {"email": fresh, "password": PASSWORD, "displayName": "x"})
    assert a.status_code == b.status_code == 201
    ua, ub = a.json()["user"], b.json()["user"]
    assert set(ua) == set(ub) and ua["id"] != first.json()["user"]["id"]
    assert {k: v for k, v in ua.items() if k not in ("id", "email", "createdAt")} == {
        k: v for k, v in ub.items() if k not in ("id", "email", "createdAt")
    }
    # The attacker's password did not replace the owner's: it opens no session (it answers as a
    # new unverified account would, EMAIL_NOT_VERIFIED), and the owner's own is still the one.
    r = await auth_post(api, pid, "login", {"email": taken, "password": PASSWORD})
    assert r.status_code == 403 and r.json()["error"]["code"] == "EMAIL_NOT_VERIFIED", r.text
    users = await api.http.get(f"/api/projects/{pid}/auth/users", headers=bearer(project.owner_token))
    assert [u["displayName"] for u in users.json()["users"] if u["email"] == taken] != ["x"]


async def test_presigned_up_account_is_not_handed_to_the_attacker(env: Any) -> None:  # noqa: F811
    pid = await new_project(env, emailVerification="required")
    address = mail_address()
    attacker_pw = "attacker's own password 1"
    r = await register_user(env, pid, address, password=attacker_pw)  # before the owner does
    assert r.status_code == 201, r.text
    first = await wait_mail(env.catcher, address, lambda m: "Confirm your email" in m.subject)
    r = await register_user(env, pid, address)  # the owner signs up, with their own password
    assert r.status_code == 201, r.text
    second = await wait_mail(env.catcher, address, lambda m: token_of(m) != token_of(first))
    # The owner follows the link of the message their sign-up caused, whatever it asks for.
    kind, token = link_token(link_of(second))
    if kind == "verify":
        r = await post(env, f"/api/projects/{pid}/auth/verify", {"token": token})
    else:
        assert kind == "reset", kind
        r = await post(
            env, f"/api/projects/{pid}/auth/reset-password", {"token": token, "password": PASSWORD}
        )
    assert r.status_code == 200, r.text
    assert (await login(env, pid, address, attacker_pw)).status_code != 200


# -- 4. the refresh-token reuse grace ------------------------------------------------------------------


async def refresh(api: Api, pid: str, token: str) -> Any:
    return await api.http.post(f"/api/projects/{pid}/auth/refresh", json={"refreshToken": token})


async def test_a_used_refresh_token_cannot_mint_unbounded_forks(api: Api, project: Any) -> None:
    pid = project.id
    email = f"rf-{secrets.token_hex(4)}@example.com"
    r = await auth_post(api, pid, "register", {"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await auth_post(api, pid, "login", {"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    stolen = r.json()["refreshToken"]
    r = await refresh(api, pid, stolen)  # the victim's own refresh
    assert r.status_code == 200, r.text
    forks = []
    for _ in range(5):  # the thief replays the used token at once
        r = await refresh(api, pid, stolen)
        if r.status_code == 200:
            forks.append(r.json()["refreshToken"])
    # Each fork is an unused token: it refreshes later on its own.
    live = [f for f in forks if (await refresh(api, pid, f)).status_code == 200]
    assert len(live) <= 1, f"{len(live)} independent refresh chains from one used token"


# -- 5. the deadline: admin_session work (migrations) ---------------------------------------------------

STUBBORN_DO = """DO $d$
DECLARE t0 timestamptz := pg_catalog.clock_timestamp();
BEGIN
  LOOP
    BEGIN
      PERFORM pg_catalog.pg_sleep(0.1);
    EXCEPTION WHEN query_canceled THEN NULL;
    END;
    EXIT WHEN pg_catalog.clock_timestamp() - t0 > interval '{seconds} seconds';
  END LOOP;
END $d$"""


async def busy_backends(control_db: asyncpg.Pool, pid: str, needle: str) -> int:
    return int(
        await control_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE $1 AND state = 'active' "
            "AND strpos(query, $2) > 0",
            f"p_{pid}_%",
            needle,
        )
    )


async def test_migration_does_not_outlive_the_request_deadline(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    pid = project.id
    needle = f"stall{secrets.token_hex(4)}"
    script = STUBBORN_DO.format(seconds=30).replace("BEGIN", f"BEGIN -- {needle}", 1) + ";"
    task = asyncio.create_task(
        api.http.post(
            f"/api/projects/{pid}/migrations",
            json={"name": f"0001_{needle}", "sql": script},
            headers=bearer(project.admin_key),
            timeout=90,
        )
    )
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while not await busy_backends(control_db, pid, needle) and loop.time() - t0 < 10:
            await asyncio.sleep(0.1)
        assert await busy_backends(control_db, pid, needle), "the migration never started"
        # The SQL request deadline (FLUXBASE_SQL_DEADLINE_MS, 15 s) and the role's statement_timeout
        # (15 s) have both passed by then.
        await asyncio.sleep(max(0.0, t0 + 19 - loop.time()))
        left = await busy_backends(control_db, pid, needle)
    finally:
        await task
    assert left == 0, "the migration's statement still runs past every deadline"


# -- 6. state left on a pooled session for the next end user ------------------------------------------


async def test_session_state_of_one_end_user_is_gone_for_the_next(api: Api, project: Any) -> None:
    pid = project.id
    a_tok, victim = await _secrets(api, project)
    key = await browser_key(api, project)
    for q in ("CREATE SEQUENCE IF NOT EXISTS sq", "GRANT USAGE ON SEQUENCE sq TO PUBLIC"):
        assert (await sql(api, project.admin_key, pid, q))["success"], q
    # The victim's session state on the one-round-trip path: a session-level setting, a
    # sequence's currval, a temporary table. The pool hands out its most recently released
    # connection first: tries until the victim's requests and alice's ran on one backend.
    look = (
        "SELECT pg_backend_pid() AS p, current_setting('app.note', true) AS a, "
        "(SELECT count(*) FROM pg_catalog.pg_class WHERE relpersistence = 't') AS t"
    )
    for _ in range(20):
        first = await sql(api, key, pid, "SELECT pg_backend_pid() AS p, nextval('sq') AS n", victim)
        assert first["success"], first
        for q in ("SET app.note = 'victim-note'", "CREATE TEMP TABLE IF NOT EXISTS vt (x int)"):
            await sql(api, key, pid, q, victim)
        seen = await sql(api, key, pid, look, a_tok)
        cur = await sql(api, key, pid, "SELECT currval('sq') AS c", a_tok)
        assert seen["success"], seen
        row = seen["result"]["rows"][0]
        if row["p"] == first["result"]["rows"][0]["p"]:
            assert row["a"] in (None, "") and row["t"] == 0, row
            assert not cur.get("success"), cur
            return
    raise AssertionError("never ran on the same backend")


async def test_a_cursor_with_hold_does_not_reach_the_next_end_user(api: Api, project: Any) -> None:
    pid = project.id
    a_tok, victim = await _secrets(api, project)
    key = await browser_key(api, project)
    # A holdable cursor outlives the transaction that declared it (on both paths).
    one = await sql(api, key, pid, "DECLARE leak CURSOR WITH HOLD FOR SELECT v FROM secrets", victim)
    got = await sql(api, key, pid, "FETCH ALL FROM leak", a_tok)
    assert "victim-secret" not in str(got), (one, got)
    two = await batch(api, key, pid, ["DECLARE leak2 CURSOR WITH HOLD FOR SELECT v FROM secrets"], victim)
    got = await sql(api, key, pid, "FETCH ALL FROM leak2", a_tok)
    assert "victim-secret" not in str(got), (two, got)
    assert one["success"] and two["success"], (one, two)  # the cursors were there to find


async def test_a_parameter_the_driver_cannot_encode_leaves_no_identity_behind(api: Api, project: Any) -> None:
    """An int4 parameter out of range fails in the driver after the one-round-trip prefix (with
    the caller's identity) is on the wire without its Sync (session.py: asyncpg.DataError is a
    PostgresError, so the `except asyncpg.DataError` drain branch never runs). The next request
    on that connection must still run as its own end user, on both paths."""
    pid = project.id
    a_tok, victim = await _secrets(api, project)
    key = await browser_key(api, project)
    for _ in range(5):
        headers = {**bearer(key), "X-Fluxbase-User-Token": victim}
        bad = await api.http.post(
            "/api/execute-sql",
            json={"projectId": pid, "query": "SELECT $1::int4 AS x", "params": [2**40]},
            headers=headers,
        )
        assert bad.json()["success"] is False, bad.text
        one = await sql(api, key, pid, "SELECT string_agg(v, ',') AS v FROM secrets", a_tok)
        assert one["success"] and "victim-secret" not in str(one), one
        two = await batch(api, key, pid, ["SELECT string_agg(v, ',') AS v FROM secrets"], a_tok)
        assert two["success"] and "victim-secret" not in str(two), two


async def _secrets(api: Api, project: Any) -> tuple[str, str]:
    """A table with one row per end user under RLS: (alice's token, the victim's token)."""
    pid = project.id
    alice, a_tok = await end_user(api, pid)
    victim, v_tok = await end_user(api, pid)
    for q in (
        "CREATE TABLE IF NOT EXISTS secrets (owner text NOT NULL, v text NOT NULL)",
        f"INSERT INTO secrets VALUES ('{alice}', 'alice-row'), ('{victim}', 'victim-secret')",
        "ALTER TABLE secrets ENABLE ROW LEVEL SECURITY",
        "DROP POLICY IF EXISTS own ON secrets",
        "CREATE POLICY own ON secrets USING (owner = auth.uid())",
    ):
        assert (await sql(api, project.admin_key, pid, q))["success"], q
    return a_tok, v_tok


# -- 7. the database quota and catalog rows it does not count ------------------------------------------


async def test_db_quota_counts_column_definitions(
    api: Api, project: Any, instance_admin: dict[str, Any], control_db: asyncpg.Pool
) -> None:
    pid, key = project.id, project.admin_key
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    cap = r.json()["quotas"]["databaseUsedBytes"] * 2 + 262_144
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"databaseBytes": cap},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    cols = ", ".join(f"c{i:04d}_{'x' * 56} int" for i in range(1600))
    for n in range(12):
        body = await sql(api, key, pid, f"CREATE TABLE wide{n} ({cols})")
        if not body["success"]:
            break
    kept = await control_db.fetchval(
        "SELECT coalesce(sum(pg_column_size(a.*)), 0) "  # measured apart from schema_size
        "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = 'p_' || $1",
        pid,
    )
    assert kept <= cap * 1.5, (kept, cap)


# -- 8. the realtime checker writes: policies with side effects ---------------------------------------


async def test_policy_side_effects_in_the_checker_do_not_escape_the_quota(
    api: Api, project: Any, rt: str, instance_admin: dict[str, Any], control_db: asyncpg.Pool
) -> None:
    pid, key = project.id, project.admin_key
    for q in (
        "CREATE TABLE sink (v text)",
        "CREATE FUNCTION fill() RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN "
        "INSERT INTO sink SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 4000); "
        "RETURN true; END $f$",
        "CREATE TABLE watched (v text)",
        "ALTER TABLE watched ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY side ON watched FOR SELECT USING (fill())",
        "INSERT INTO watched VALUES ('one')",
    ):
        assert (await sql(api, key, pid, q))["success"], q
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    cap = r.json()["quotas"]["databaseUsedBytes"] + 131_072
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"databaseBytes": cap},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    for _ in range(8):  # each replay checks the old event again
        async with subscribe(rt, pid, rw, tables=["watched"], since="0:0") as sub:
            await sub.silent(0.5)
    size = await control_db.fetchval("SELECT fluxbase_guard.schema_size($1)", pid)
    assert size <= cap + 65_536, (size, cap)


async def test_policy_side_effects_in_the_checker_do_not_write_to_a_read_only_project(
    api: Api, project: Any, rt: str
) -> None:
    pid, key = project.id, project.admin_key
    for q in (
        "CREATE TABLE sink (v text)",
        "CREATE FUNCTION fill() RETURNS boolean LANGUAGE plpgsql AS $f$ BEGIN "
        "INSERT INTO sink VALUES ('written while read-only'); RETURN true; END $f$",
        "CREATE TABLE watched (v text)",
        "ALTER TABLE watched ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY side ON watched FOR SELECT USING (fill())",
        "INSERT INTO watched VALUES ('one')",
    ):
        assert (await sql(api, key, pid, q))["success"], q
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    r = await api.http.patch(
        f"/api/projects/{pid}", json={"readOnly": True}, headers=bearer(project.owner_token)
    )
    assert r.status_code == 200, r.text
    before = (await sql(api, key, pid, "SELECT count(*) AS n FROM sink"))["result"]["rows"][0]["n"]
    refused = await sql(api, rw, pid, "INSERT INTO sink VALUES ('api')")
    assert not refused["success"], refused
    for _ in range(3):
        async with subscribe(rt, pid, rw, tables=["watched"], since="0:0") as sub:
            await sub.silent(0.5)
    after = (await sql(api, key, pid, "SELECT count(*) AS n FROM sink"))["result"]["rows"][0]["n"]
    assert after == before, (before, after)


# -- 9. signals between sessions of one role ---------------------------------------------------------


async def test_end_user_cannot_terminate_a_server_keys_backend(api: Api, project: Any) -> None:
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    key = await browser_key(api, project)
    _m, mallory = await end_user(api, pid)
    assert (await sql(api, rw, pid, "SELECT 1 AS one"))["success"]  # the key's pooled connection
    # Mallory finds her role's other backends herself (the backend id set and user ids stay public).
    kill = (
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pg_stat_get_backend_pid(i))) AS n "
        "FROM pg_stat_get_backend_idset() i "
        "WHERE pg_stat_get_backend_userid(i) = (SELECT oid FROM pg_roles WHERE rolname = current_user) "
        "AND pg_stat_get_backend_pid(i) <> pg_backend_pid()"
    )
    body = await sql(api, key, pid, kill, mallory)
    assert not (body.get("success") and body["result"]["rows"][0]["n"] > 0), body


# -- 10. the outbox reader waits for the oldest open transaction of the cluster ------------------------


async def bystander_latency(api: Api, project: Any, rt: str) -> float:
    """Seconds from a write in a fresh project to its event at that project's admin subscriber."""
    other = await api.new_project(project.owner_token, "bystander")
    admin = await api.new_key(project.owner_token, other, "admin", rateLimitRequests=MANY)
    assert (await sql(api, admin, other, "CREATE TABLE news (v text)"))["success"]
    async with subscribe(rt, other, admin, tables=["news"]) as sub:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await sql(api, admin, other, "INSERT INTO news VALUES ('n')"))["success"]
        await sub.rows(1, timeout=60)
        return loop.time() - t0


async def test_a_migration_does_not_stall_other_projects_realtime(api: Api, project: Any, rt: str) -> None:
    pid = project.id
    needle = f"hold{secrets.token_hex(4)}"
    script = "CREATE TABLE held (v text);\n" + STUBBORN_DO.format(seconds=40).replace(
        "BEGIN", f"BEGIN -- {needle}", 1
    )
    task = asyncio.create_task(
        api.http.post(
            f"/api/projects/{pid}/migrations",
            json={"name": f"0001_{needle}", "sql": script},
            headers=bearer(project.admin_key),
            timeout=120,
        )
    )
    try:
        await asyncio.sleep(1.0)
        lag = await bystander_latency(api, project, rt)
    finally:
        await task
    # The migration's transaction holds back only its own project's events (per-project outbox
    # horizons); before those, the request deadline (15 s) bounded the stall.
    assert lag < 3, lag


async def test_one_projects_open_write_does_not_delay_other_projects_realtime(
    api: Api, project: Any, rt: str
) -> None:
    pid, key = project.id, project.admin_key
    assert (await sql(api, key, pid, "CREATE TABLE w (v int)"))["success"]
    hold = "WITH x AS (INSERT INTO w VALUES (1) RETURNING v) SELECT pg_sleep(6) FROM x"
    task = asyncio.create_task(sql(api, key, pid, hold))
    try:
        await asyncio.sleep(0.5)
        lag = await bystander_latency(api, project, rt)
    finally:
        await task
    assert lag < 2, lag


# -- 11. auth.role() in the checker vs in SQL -----------------------------------------------------------


async def test_realtime_role_matches_sql_role(api: Api, project: Any, rt: str) -> None:
    pid, key = project.id, project.admin_key
    for q in (
        "CREATE TABLE notes (v text)",
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY by_role ON notes FOR SELECT USING (auth.role() = 'authenticated')",
    ):
        assert (await sql(api, key, pid, q))["success"], q
    _uid, tok = await end_user(api, pid)
    reader = await api.http.post(
        f"/api/projects/{pid}/api-keys",
        json={"name": "ro", "scope": "read", "requireUserAuth": True, "rateLimitRequests": MANY},
        headers=bearer(project.owner_token),
    )
    assert reader.status_code == 201, reader.text
    seen = await sql(api, reader.json()["key"], pid, "SELECT auth.role() AS r, count(*) AS n FROM notes", tok)
    assert seen["success"], seen
    async with subscribe(rt, pid, tok, tables=["notes"]) as sub:
        assert (await sql(api, key, pid, "INSERT INTO notes VALUES ('role-gated')"))["success"]
        got = await sub.silent(2.0)
    delivered = any("role-gated" in str(m) for m in got)
    selectable = (await sql(api, reader.json()["key"], pid, "SELECT v FROM notes", tok))["result"]["rows"]
    assert delivered == bool(selectable), (seen, selectable, got)
