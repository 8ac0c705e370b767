"""auth.uid() cannot be forged by read or readwrite keys, with or without an end-user token.

Before sql/0007 any tenant SQL could call set_config('fluxbase.auth_uid', ...) inside its own
statement (a MATERIALIZED CTE runs first), or EXECUTE 'SET LOCAL ...' in a DO block, and read
another user's rows. Admin keys own the tables and bypass RLS, so they keep both.
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import jwt

from support import Api, bearer, random_ip

PASSWORD = "correct horse battery"
MANY = 1_000_000

FORGERIES = [
    # set_config in a CTE that runs before the scan
    "WITH x AS MATERIALIZED (SELECT set_config('fluxbase.auth_uid', '{victim}', true)) "
    "SELECT v FROM secrets, x",
    "SELECT v FROM secrets WHERE set_config('fluxbase.auth_uid', '{victim}', true) IS NOT NULL",
    "SELECT pg_catalog.set_config('fluxbase.auth_uid', '{victim}', true), "
    "(SELECT string_agg(v, ',') FROM secrets)",
    "SELECT set_config('fluxbase.auth_claims', '{{\"sub\": \"{victim}\"}}', true)",
    # a DO block that switches identity and smuggles the rows out in an error
    "DO $$ BEGIN EXECUTE 'SET LOCAL fluxbase.auth_uid = ''{victim}'''; "
    "RAISE EXCEPTION 'leak: %', (SELECT string_agg(v, ',') FROM secrets); END $$",
    "DO $$ BEGIN PERFORM set_config('fluxbase.auth_uid', '{victim}', true); END $$",
    # the pg_settings view's UPDATE rule calls set_config
    "UPDATE pg_settings SET setting = '{victim}' WHERE name = 'fluxbase.auth_uid'",
    # a temp function with a SET clause (readwrite may create temp objects)
    "CREATE FUNCTION pg_temp.forge() RETURNS text LANGUAGE sql SET fluxbase.auth_uid = '{victim}' "
    "AS $$ SELECT string_agg(v, ',') FROM secrets $$",
    "CREATE FUNCTION pg_temp.f2() RETURNS void LANGUAGE plpgsql AS $$ BEGIN END $$",
]
# Statements that may succeed on their own but must not change the identity of later requests.
HARMLESS_ALONE = [
    "SET fluxbase.auth_uid = '{victim}'",
    "SET LOCAL fluxbase.auth_uid = '{victim}'",
    "SELECT pg_temp.forge()",
]


async def run(api: Api, key: str, pid: str, q: str, token: str | None = None) -> httpx.Response:
    headers = bearer(key)
    if token is not None:
        headers["X-Fluxbase-User-Token"] = token
    return await api.http.post("/api/execute-sql", json={"projectId": pid, "query": q}, headers=headers)


async def user_token(api: Api, pid: str) -> tuple[str, str]:
    email = f"f-{secrets.token_hex(4)}@example.com"
    r = await api.http.post(f"/api/projects/{pid}/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await api.http.post(
        f"/api/projects/{pid}/auth/login",
        json={"email": email, "password": PASSWORD},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 200, r.text
    return r.json()["user"]["id"], r.json()["accessToken"]


async def test_read_and_readwrite_keys_cannot_forge_identity(api: Api, project) -> None:
    pid = project.id
    alice, a_tok = await user_token(api, pid)
    victim, _ = await user_token(api, pid)
    for q in (
        "CREATE TABLE secrets (owner text NOT NULL, v text NOT NULL)",
        f"INSERT INTO secrets VALUES ('{alice}', 'alice-row'), ('{victim}', 'victim-secret')",
        "ALTER TABLE secrets ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON secrets USING (owner = auth.uid())",
    ):
        assert (await run(api, project.admin_key, pid, q)).json()["success"], q
    keys: dict[str, str] = {}
    for scope in ("read", "readwrite"):
        keys[scope] = await api.new_key(project.owner_token, pid, scope, rateLimitRequests=MANY)
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys",
        json={"name": "browser", "scope": "readwrite", "requireUserAuth": True, "rateLimitRequests": MANY},
        headers=bearer(project.owner_token),
    )
    keys["readwrite+requireUserAuth"] = r.json()["key"]

    attempts = 0
    for label, key in keys.items():
        tokens: list[str | None] = [a_tok] if label.endswith("requireUserAuth") else [None, a_tok]
        for token in tokens:
            expected_uid = alice if token else None
            for template in FORGERIES:
                q = template.format(victim=victim)
                resp = await run(api, key, pid, q, token)
                body: dict[str, Any] = resp.json()
                assert body["success"] is False, (
                    f"{label} token={bool(token)} forged identity: {q!r} -> {body}"
                )
                assert "victim-secret" not in resp.text
                attempts += 1
            for template in HARMLESS_ALONE:
                await run(api, key, pid, template.format(victim=victim), token)
                after = (
                    await run(api, key, pid, "SELECT auth.uid() AS uid, v FROM secrets ORDER BY v", token)
                ).json()
                assert after["success"], after
                if expected_uid is None:
                    assert after["result"]["rows"] == []
                else:
                    assert after["result"]["rows"] == [{"uid": alice, "v": "alice-row"}], (label, template)
                assert "victim-secret" not in str(after)
    assert attempts == len(FORGERIES) * 5


async def test_admin_keys_keep_set_config_and_plpgsql(api: Api, project) -> None:
    pid = project.id
    admin = project.admin_key
    body = (await run(api, admin, pid, "SELECT set_config('myapp.tenant', 'chosen', true) AS v")).json()
    assert body["result"]["rows"] == [{"v": "chosen"}]
    # The request identity is Fluxbase's: as a statement, not even an admin key sets it.
    body = (await run(api, admin, pid, "SELECT set_config('fluxbase.auth_uid', 'chosen', true) AS v")).json()
    assert body["success"] is False and body["error"]["details"] == "ERROR:  42501", body
    assert (await run(api, admin, pid, "DO $$ BEGIN PERFORM 1; END $$")).json()["success"]
    q = "CREATE FUNCTION bump(i int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN i + 1; END $$"
    assert (await run(api, admin, pid, q)).json()["success"]
    # Non-admin roles may still call the admin's plpgsql functions; only creating them is denied.
    ro = await api.new_key(project.owner_token, pid, "read")
    assert (await run(api, ro, pid, "SELECT bump(1) AS n")).json()["result"]["rows"] == [{"n": 2}]
    # A dashboard developer runs as the admin role too, and a viewer as read: refused.
    denied = (await run(api, ro, pid, "SELECT set_config('search_path', 'public', true)")).json()
    assert denied["success"] is False and denied["error"]["details"] == "ERROR:  42501"


async def test_user_session_guard_answers_only_for_its_own_project(api: Api, project) -> None:
    ro = await api.new_key(project.owner_token, project.id, "read")
    _, owner = await api.new_user()
    other = await api.new_project(owner)
    uid_b, tok_b = await user_token(api, other)
    sid_b = jwt.decode(tok_b, options={"verify_signature": False})["sid"]
    q = f"SELECT fluxbase_guard.check_user_session('{sid_b}', '{uid_b}', '{other}')"
    body = (await run(api, ro, project.id, q)).json()
    assert body["success"] is False and body["error"]["details"] == "ERROR:  FXU01"
    # In its own project the same call passes (it reveals only what the caller already holds).
    other_ro = await api.new_key(owner, other, "read")
    assert (await run(api, other_ro, other, q)).json()["success"] is True


async def test_locked_down_roles_still_read_custom_types(api: Api, project) -> None:
    """asyncpg introspects an enum, domain or composite type on first use inside a
    set_config('jit', ...) wrapper; the tenant connections must not need set_config for it."""
    for q in (
        "CREATE TYPE mood AS ENUM ('sad', 'ok')",
        "CREATE DOMAIN score AS int CHECK (VALUE >= 0)",
        "CREATE TYPE pair AS (a int, b text)",
        "CREATE TABLE typed (id int PRIMARY KEY, m mood, s score, p pair)",
        "INSERT INTO typed VALUES (1, 'ok', 7, ROW(2, 'x'))",
    ):
        assert (await api.sql(project.admin_key, project.id, q)).json()["success"], q
    for scope in ("read", "readwrite"):
        key = await api.new_key(project.owner_token, project.id, scope)
        body = (await api.sql(key, project.id, "SELECT m, s, p FROM typed")).json()
        assert body["success"], body
        assert body["result"]["rows"] == [{"m": "ok", "s": 7, "p": {"a": 2, "b": "x"}}]
        r = await api.http.get("/api/schema", params={"projectId": project.id}, headers=bearer(key))
        assert r.status_code == 200 and [t["name"] for t in r.json()["tables"]] == ["typed"], r.text


async def _browser_setup(api: Api, project) -> tuple[str, str, str, str]:
    """secrets with RLS, a requireUserAuth readwrite key, the attacker's own token, the victim."""
    pid = project.id
    attacker, a_tok = await user_token(api, pid)
    victim, _ = await user_token(api, pid)
    for q in (
        "CREATE TABLE secrets (owner text NOT NULL, v text NOT NULL)",
        f"INSERT INTO secrets VALUES ('{attacker}', 'attacker-row'), ('{victim}', 'victim-secret')",
        "ALTER TABLE secrets ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON secrets USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())",
    ):
        assert (await run(api, project.admin_key, pid, q)).json()["success"], q
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys",
        json={"name": "browser", "scope": "readwrite", "requireUserAuth": True, "rateLimitRequests": MANY},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 201, r.text
    return r.json()["key"], a_tok, attacker, victim


async def _batch(
    api: Api, key: str, pid: str, token: str, queries: list[str], **extra: Any
) -> httpx.Response:
    return await api.http.post(
        "/api/execute-batch",
        json={"projectId": pid, "statements": [{"query": q} for q in queries], **extra},
        headers={**bearer(key), "X-Fluxbase-User-Token": token},
    )


# What PostgreSQL's lexer sees and a hand-written one did not: a `--` comment ends at `\r` too,
# U&"..." spells an identifier with escapes, and nested comments nest.
SMUGGLED_COMMIT = [
    "--\rCOMMIT",
    "--\r\nCOMMIT",
    "/* a /* b */ */ COMMIT",
    "--x\rEND",
    "--\rROLLBACK AND CHAIN",
]
SMUGGLED_SET = [
    "--\rSET fluxbase.auth_uid = '{victim}'",
    "--\rSET LOCAL fluxbase.auth_uid = '{victim}'",
    "SET LOCAL U&\"fluxbase\".auth_uid = '{victim}'",
    "SET LOCAL U&\"\\0066luxbase\".auth_uid = '{victim}'",
    "SET LOCAL \"FLUXBASE\".auth_uid = '{victim}'",
    "--\rRESET ALL",
    "--\rSET SESSION AUTHORIZATION DEFAULT",
]


async def test_end_user_cannot_forge_identity_through_comments_ending_at_cr(api: Api, project) -> None:
    """Issue 15 finding 2: ["--\\rCOMMIT", "--\\rSET fluxbase.auth_uid = victim", "SELECT"] in a batch
    with a requireUserAuth key and the attacker's own token returned the victim's rows."""
    pid = project.id
    key, a_tok, attacker, victim = await _browser_setup(api, project)
    for commit in SMUGGLED_COMMIT:
        for template in SMUGGLED_SET:
            stmts = [commit, template.format(victim=victim), "SELECT auth.uid() AS uid, v FROM secrets"]
            r = await _batch(api, key, pid, a_tok, stmts)
            body = r.json()
            assert "victim-secret" not in r.text, (stmts, body)
            assert body["success"] is False, (stmts, body)
            assert body["error"]["code"] == "SQL_EXEC_ERROR" and body["error"]["statementIndex"] == 0, body
            assert body["error"]["details"] == "ERROR:  0A000", body
        # Alone, the SET is refused too (not merely undone by the identity set again).
        for template in SMUGGLED_SET:
            stmts = ["SELECT 1", template.format(victim=victim), "SELECT v FROM secrets"]
            r = await _batch(api, key, pid, a_tok, stmts)
            assert "victim-secret" not in r.text and r.json()["success"] is False, (stmts, r.text)
            assert r.json()["error"]["statementIndex"] == 1, r.text
    # The same smuggling in execute-sql is refused with the same code.
    for commit in SMUGGLED_COMMIT:
        body = (await run(api, key, pid, commit, a_tok)).json()
        assert body["success"] is False and body["error"]["details"] == "ERROR:  0A000", (commit, body)
    # ...and the attacker still sees exactly their own row.
    body = (await run(api, key, pid, "SELECT auth.uid() AS uid, v FROM secrets", a_tok)).json()
    assert body["result"]["rows"] == [{"uid": attacker, "v": "attacker-row"}]


async def test_smuggled_commit_cannot_escape_read_only_or_run_past_the_batch(api: Api, project) -> None:
    """A COMMIT hidden behind `--\\r` ended the request's read-only transaction: the INSERT after it
    ran in a fresh transaction without read-only (and without the size check)."""
    pid = project.id
    key, a_tok, _, _ = await _browser_setup(api, project)
    assert (await run(api, project.admin_key, pid, "CREATE TABLE guestbook (v text)")).json()["success"]
    for commit in SMUGGLED_COMMIT:
        stmts = [commit, "INSERT INTO guestbook VALUES ('written-read-only')"]
        r = await _batch(api, key, pid, a_tok, stmts, readOnly=True)
        assert r.json()["success"] is False, (commit, r.text)
    body = (await run(api, project.admin_key, pid, "SELECT count(*)::int AS n FROM guestbook")).json()
    assert body["result"]["rows"] == [{"n": 0}]


async def test_prepared_statements_of_earlier_requests_are_not_visible(spawn) -> None:
    """`--\\rPREPARE` passed /api/execute-sql, and pg_prepared_statements showed the statements of
    earlier requests on the same connection (asyncpg names and caches each one)."""
    async with spawn(FLUXBASE_TENANT_POOL_MAX="1") as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin", rateLimitRequests=MANY)
            for q in ("--\rPREPARE p AS SELECT 1", "--\r\nDEALLOCATE ALL", "--\rDISCARD ALL", "--\rLISTEN x"):
                body = (await run(api, key, pid, q)).json()
                assert body["success"] is False and body["error"]["details"] == "ERROR:  0A000", (q, body)
            # Another request of the same role (same pool, same connection) leaves its text behind.
            secret = "SELECT 'earlier-request-literal' AS s"
            assert (await run(api, key, pid, secret)).json()["success"]
            for q in (
                "SELECT name, statement FROM pg_prepared_statements",
                "SELECT * FROM pg_catalog.pg_prepared_statement()",
                "SELECT statement FROM pg_cursors",
                "SELECT query FROM pg_stat_activity",
                "SELECT pg_stat_get_backend_activity(b) FROM pg_stat_get_backend_idset() b",
            ):
                r = await run(api, key, pid, q)
                assert "earlier-request-literal" not in r.text, (q, r.text)
                body = r.json()
                assert body["success"] is False and body["error"]["details"] == "ERROR:  42501", (q, body)
        finally:
            await api.close()


async def test_end_user_cannot_hide_a_set_in_a_temporary_sql_function(api: Api, project) -> None:
    """A SQL-language function's body may run SET: a readwrite role (which may create functions in
    pg_temp) wrapped `SET LOCAL fluxbase.auth_uid` and the query in one, and a batch called it."""
    pid = project.id
    key, a_tok, _, victim = await _browser_setup(api, project)
    bodies = [
        f"SET LOCAL fluxbase.auth_uid = '{victim}'; SELECT string_agg(v, ',') FROM secrets",
        f"--\r\nSET LOCAL \"fluxbase\".auth_uid = '{victim}'; SELECT string_agg(v, ',') FROM secrets",
        "SET work_mem = '8GB'; SELECT current_setting('work_mem')",
        "RESET ALL; SELECT string_agg(v, ',') FROM secrets",
    ]
    for body in bodies:
        for header in ("", "CREATE OR REPLACE "):
            create = (
                f"{header or 'CREATE '}FUNCTION pg_temp.peek() RETURNS text LANGUAGE sql AS $fn${body}$fn$"
            )
            r = await _batch(api, key, pid, a_tok, [create, "SELECT pg_temp.peek() AS v"])
            assert "victim-secret" not in r.text and r.json()["success"] is False, (body, r.text)
            err = r.json()["error"]
            assert err["statementIndex"] == 0 and err["details"] == "ERROR:  42501", (body, err)
    # Read and readwrite roles (end users) may not create temporary objects at all any more: an
    # ordinary temporary function is refused by PostgreSQL (no TEMPORARY on the database), so no
    # code of theirs can run inside a trigger (tests/test_attack_review2.py).
    create = "CREATE FUNCTION pg_temp.twice(i int) RETURNS int LANGUAGE sql AS 'SELECT i * 2'"
    r = await _batch(api, key, pid, a_tok, [create, "SELECT pg_temp.twice(21) AS v"])
    assert r.json()["success"] is False and r.json()["error"]["details"] == "ERROR:  42501", r.text
