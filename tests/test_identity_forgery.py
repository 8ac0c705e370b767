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
    body = (await run(api, admin, pid, "SELECT set_config('fluxbase.auth_uid', 'chosen', true) AS v")).json()
    assert body["result"]["rows"] == [{"v": "chosen"}]
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
