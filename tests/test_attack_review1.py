"""Hostile review 1: attacks on tenant confinement through the public HTTP API.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix.

The `standard_conforming_strings` attacks: the classifier (tenancy/statements.py) parses every
text with libpg_query, which always lexes '...' as if standard_conforming_strings were on. A
tenant could `SET LOCAL standard_conforming_strings = off` in a batch (the "how SQL text is read"
row of the refusal table refuses it now); from then on PostgreSQL reads a backslash in '...'
as an escape, so `'a\\', '` is one string to the server but a string, a comma and the start of
another to the classifier. Whatever the server then sees outside the string, the classifier saw inside it.
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx

from support import Api, bearer, random_ip

PASSWORD = "correct horse battery"
MANY = 1_000_000


async def sql(api: Api, key: str, pid: str, q: str, token: str | None = None) -> dict[str, Any]:
    headers = bearer(key)
    if token is not None:
        headers["X-Fluxbase-User-Token"] = token
    r = await api.http.post("/api/execute-sql", json={"projectId": pid, "query": q}, headers=headers)
    return dict(r.json())


async def batch(api: Api, key: str, pid: str, queries: list[str], token: str | None = None) -> dict[str, Any]:
    headers = bearer(key)
    if token is not None:
        headers["X-Fluxbase-User-Token"] = token
    body = {"projectId": pid, "statements": [{"query": q} for q in queries]}
    r = await api.http.post("/api/execute-batch", json=body, headers=headers)
    return dict(r.json())


async def end_user(api: Api, pid: str) -> tuple[str, str]:
    email = f"atk-{secrets.token_hex(4)}@example.com"
    r = await api.http.post(f"/api/projects/{pid}/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    r = await api.http.post(
        f"/api/projects/{pid}/auth/login",
        json={"email": email, "password": PASSWORD},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 200, r.text
    return r.json()["user"]["id"], r.json()["accessToken"]


async def browser_key(api: Api, project: Any) -> str:
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "browser", "scope": "readwrite", "requireUserAuth": True, "rateLimitRequests": MANY},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


async def secrets_table(api: Api, project: Any) -> tuple[str, str, str]:
    """A table with one row per end user under RLS; (alice id, alice token, victim id)."""
    pid = project.id
    alice, a_tok = await end_user(api, pid)
    victim, _ = await end_user(api, pid)
    for q in (
        "CREATE TABLE secrets (owner text NOT NULL, v text NOT NULL)",
        f"INSERT INTO secrets VALUES ('{alice}', 'alice-row'), ('{victim}', 'victim-secret')",
        "ALTER TABLE secrets ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON secrets USING (owner = auth.uid())",
    ):
        assert (await sql(api, project.admin_key, pid, q))["success"], q
    return alice, a_tok, victim


def smuggled_function(name: str, hidden: str, last: str) -> str:
    """A temp SQL function whose body the classifier reads as one harmless SELECT of two string
    constants, and PostgreSQL (standard_conforming_strings off) as `SELECT 'a'', '; <hidden>;
    <last> --'`. `hidden` and `last` may not contain a single quote."""
    assert "'" not in hidden + last
    body = f"SELECT 'a\\', ' ; {hidden} ; {last} --'"
    return f"CREATE FUNCTION pg_temp.{name}() RETURNS text LANGUAGE sql AS $fx${body}$fx$"


# -- 1. auth.uid() forged by an end user through a smuggled SET LOCAL -----------------------------


async def test_end_user_cannot_forge_uid_via_standard_conforming_strings(api: Api, project: Any) -> None:
    pid = project.id
    _alice, a_tok, victim = await secrets_table(api, project)
    key = await browser_key(api, project)
    create = smuggled_function(
        "forge",
        f"SET LOCAL fluxbase.auth_uid = $${victim}$$",
        "SELECT string_agg(v, $$,$$) FROM secrets",
    )
    body = await batch(
        api,
        key,
        pid,
        ["SET LOCAL standard_conforming_strings = off", create, "SELECT pg_temp.forge() AS leak"],
        a_tok,
    )
    assert "victim-secret" not in str(body), body


# -- 2. per-role resource caps escaped the same way --------------------------------------------------


async def test_caps_hold_against_standard_conforming_strings_smuggling(api: Api, project: Any) -> None:
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    create = smuggled_function(
        "caps",
        "SET LOCAL work_mem = 4000000 ; SET LOCAL statement_timeout = 0",
        "SELECT current_setting($$work_mem$$) || $$/$$ || current_setting($$statement_timeout$$)",
    )
    probe = "SELECT current_setting('work_mem') || '/' || current_setting('statement_timeout') AS v"
    baseline = (await sql(api, rw, pid, probe))["result"]["rows"][0]["v"]
    body = await batch(
        api, rw, pid, ["SET LOCAL standard_conforming_strings = off", create, "SELECT pg_temp.caps() AS v"]
    )
    got = body["results"][2]["rows"][0]["v"] if body.get("success") else None
    assert got in (None, baseline), (baseline, body)


# -- 3. the outer statement itself, as an admin: the identity rule that binds even admin keys ----


async def test_admin_cannot_set_identity_via_standard_conforming_strings(api: Api, project: Any) -> None:
    pid = project.id
    q = "SELECT 'a\\', ' , set_config($$fluxbase.auth_uid$$, $$chosen$$, true) AS x, auth.uid() AS u --'"
    body = await batch(api, project.admin_key, pid, ["SET LOCAL standard_conforming_strings = off", q])
    assert "chosen" not in str(body.get("results", "")), body


# -- 4. the same SET without the lexer trick stays refused (regression guards) ---------------------


async def test_sql_function_body_set_is_refused_plainly(api: Api, project: Any) -> None:
    pid = project.id
    alice, a_tok, victim = await secrets_table(api, project)
    key = await browser_key(api, project)
    for q in (
        "CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS "
        f"$$ SET LOCAL fluxbase.auth_uid = '{victim}'; SELECT string_agg(v, ',') FROM secrets $$",
        "CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql AS "
        f"'SET LOCAL fluxbase.auth_uid = ''{victim}''; SELECT string_agg(v, '','') FROM secrets'",
        # nested: a SQL function that creates one
        "CREATE FUNCTION pg_temp.g() RETURNS void LANGUAGE sql AS $a$ CREATE FUNCTION pg_temp.h() "
        f"RETURNS text LANGUAGE sql AS $b$ SET LOCAL fluxbase.auth_uid = '{victim}'; SELECT 'x' $b$ $a$",
        "CREATE FUNCTION pg_temp.g() RETURNS text LANGUAGE sql SET fluxbase.auth_uid FROM CURRENT "
        f"AS $$ SELECT '{victim}' $$",
    ):
        body = await sql(api, key, pid, q, a_tok)
        assert body["success"] is False, (q, body)
    body = await sql(api, key, pid, "SELECT auth.uid() AS u, v FROM secrets", a_tok)
    assert body["result"]["rows"] == [{"u": alice, "v": "alice-row"}], body


async def test_pg_temp_shadowing_does_not_reach_platform_statements(api: Api, project: Any) -> None:
    """A readwrite key puts pg_temp first and shadows functions/operators the platform's own
    statements might resolve; the next request still runs as itself."""
    pid = project.id
    alice, a_tok, victim = await secrets_table(api, project)
    key = await browser_key(api, project)
    body = await batch(
        api,
        key,
        pid,
        [
            "SET LOCAL search_path = pg_temp, pg_catalog",
            "CREATE FUNCTION pg_temp.current_setting(text) RETURNS text LANGUAGE sql "
            f"AS $$ SELECT '{victim}' $$",
            "CREATE FUNCTION pg_temp.eqx(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$",
            "CREATE OPERATOR pg_temp.= (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_temp.eqx)",
            "SELECT v FROM secrets",
        ],
        a_tok,
    )
    assert "victim-secret" not in str(body), body
    body = await sql(api, key, pid, "SELECT auth.uid() AS u, v FROM secrets", a_tok)
    assert body["result"]["rows"] == [{"u": alice, "v": "alice-row"}], body


async def test_readwrite_cannot_reach_another_project_or_control_plane(api: Api, project: Any) -> None:
    pid = project.id
    _, owner = await api.new_user()
    other = await api.new_project(owner)
    other_admin = await api.new_key(owner, other, "admin")
    assert (await sql(api, other_admin, other, "CREATE TABLE loot (v text)"))["success"]
    assert (await sql(api, other_admin, other, "INSERT INTO loot VALUES ('other-secret')"))["success"]
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    for key in (rw, project.admin_key):
        for q in (
            f"SELECT * FROM p_{other}.loot",
            "SELECT * FROM fluxbase.api_keys",
            "SELECT * FROM fluxbase.project_users",
            f"SET ROLE p_{other}_admin",
            "SELECT pg_read_file('postgresql.conf')",
            "SELECT * FROM pg_stat_activity WHERE query <> ''",
            "SELECT * FROM pg_prepared_statements",
            "CREATE EXTENSION dblink",
            "CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1' PUBLICATION p",
            "CREATE PUBLICATION p FOR ALL TABLES",
            "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION pg_catalog.now()",
            "SECURITY LABEL ON TABLE secrets IS 'x'",
            "COPY (SELECT 1) TO PROGRAM 'id'",
            "ALTER FUNCTION pg_catalog.now() SET work_mem = '1GB'",
            "EXPLAIN ANALYZE SELECT set_config('fluxbase.auth_uid', 'x', true)",
        ):
            body = await sql(api, key, pid, q)
            assert body["success"] is False or "other-secret" not in str(body), (q, body)
            assert "other-secret" not in str(body) and "key_hash" not in str(body), (q, body)


# -- 5. login throttling across rotated client addresses ----------------------------------------------


async def test_login_throttle_holds_across_rotated_forwarded_for(api: Api, project: Any) -> None:
    pid = project.id
    email = f"victim-{secrets.token_hex(4)}@example.com"
    r = await api.http.post(f"/api/projects/{pid}/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    limited = False
    for i in range(30):
        guess_email = email if i % 2 else email.upper()
        r = await api.http.post(
            f"/api/projects/{pid}/auth/login",
            json={"email": guess_email, "password": f"wrong-{i}"},
            headers={"X-Forwarded-For": random_ip()},
        )
        if r.status_code == 429:
            limited = True
            break
        assert r.status_code in (400, 401), r.text
    assert limited, "30 guesses from 30 addresses at one account were never throttled"


# -- 6. platform SQL built for standard_conforming_strings=on, run after the tenant turned it off --


async def _batch_as(api: Api, key: str, pid: str, queries: list[str], auth_uid: str) -> dict[str, Any]:
    body = {"projectId": pid, "statements": [{"query": q} for q in queries], "authUid": auth_uid}
    r = await api.http.post("/api/execute-batch", json=body, headers=bearer(key))
    return dict(r.json())


async def test_read_only_project_holds_against_auth_uid_injection(api: Api, project: Any) -> None:
    pid = project.id
    assert (await sql(api, project.admin_key, pid, "CREATE TABLE ro_t (v text)"))["success"]
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    r = await api.http.patch(
        f"/api/projects/{pid}", json={"readOnly": True}, headers=bearer(project.owner_token)
    )
    assert r.status_code == 200, r.text
    plain = await _batch_as(api, rw, pid, ["INSERT INTO ro_t VALUES ('plain')"], "u1")
    assert plain["success"] is False, plain
    await _batch_as(
        api,
        rw,
        pid,
        ["SET LOCAL standard_conforming_strings = off", "INSERT INTO ro_t VALUES ('escaped')"],
        "\\'; COMMIT; BEGIN; --",
    )
    got = await sql(api, project.admin_key, pid, "SELECT count(*) AS n FROM ro_t")
    assert got["result"]["rows"] == [{"n": 0}], got


async def test_classifier_holds_against_auth_uid_injection(api: Api, project: Any) -> None:
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    body = await _batch_as(
        api,
        rw,
        pid,
        ["SET LOCAL standard_conforming_strings = off", "SELECT current_setting('work_mem') AS w"],
        "\\'; SET LOCAL work_mem = 4000000; --",
    )
    got = body["results"][1]["rows"][0]["w"] if body.get("success") else None
    assert got != "4000000kB", body


# -- 7. caps checked on the literal, not on the value PostgreSQL stores -----------------------------


async def test_fractional_timeout_does_not_round_to_unlimited(api: Api, project: Any) -> None:
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    for setting, value in (("statement_timeout", "0.4"), ("lock_timeout", "400us")):
        body = await batch(api, rw, pid, [f"SET LOCAL {setting} = '{value}'", f"SHOW {setting}"])
        shown = body["results"][1]["rows"][0][setting] if body.get("success") else None
        assert shown != "0", (setting, value, body)


async def test_caps_refused_in_plain_spellings(api: Api, project: Any) -> None:
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    for q in (
        "SET LOCAL statement_timeout = 0",
        "SET LOCAL statement_timeout = '-1'",
        "SET LOCAL work_mem = '0x7fffffff'",
        "SET LOCAL work_mem = '1TB'",
        "SET LOCAL work_mem = 1e12",
        "SET LOCAL temp_file_limit = -1",
        "SET LOCAL hash_mem_multiplier = 1000",
        "SET LOCAL max_parallel_workers_per_gather = 64",
        "SELECT set_config('work_mem', '4GB', true)",
        "CREATE FUNCTION pg_temp.w() RETURNS int LANGUAGE sql SET work_mem = '4GB' AS $$ SELECT 1 $$",
        "CREATE FUNCTION pg_temp.w() RETURNS int LANGUAGE sql AS $$ SET LOCAL work_mem = '4GB'; SELECT 1 $$",
        "UPDATE pg_settings SET setting = '4GB' WHERE name = 'work_mem'",
        "WITH s AS (UPDATE pg_catalog.pg_settings SET setting = '4GB' WHERE name = 'work_mem' RETURNING 1) "
        "SELECT * FROM s",
    ):
        body = await batch(api, rw, pid, [q, "SELECT current_setting('work_mem') AS w"])
        assert body["success"] is False, (q, body)


# -- 8. the database-size cap, skipped for a write whose command tag hides its size ----------------


async def test_db_quota_holds_for_a_large_write_hidden_in_a_cte(
    api: Api, project: Any, instance_admin: dict[str, Any]
) -> None:
    pid, key = project.id, project.admin_key
    root = instance_admin["token"]
    assert (await sql(api, key, pid, "CREATE TABLE blob (v text)"))["success"]
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    used = r.json()["quotas"]["databaseUsedBytes"]
    cap = used * 4 + 65_536
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas", json={"databaseBytes": cap}, headers=bearer(root)
    )
    assert r.status_code == 200, r.text
    # A small write: measured (no fresh measurement yet), far below the cap.
    assert (await sql(api, key, pid, "INSERT INTO blob VALUES ('small')"))["success"]
    rows = cap // 1000 * 5  # ~5x the cap, incompressible
    hidden = (
        "WITH w AS (INSERT INTO blob SELECT (SELECT string_agg(md5(random()::text || g || i), '') "
        f"FROM generate_series(1, 31) i) FROM generate_series(1, {rows}) g RETURNING 1) SELECT 1 AS one"
    )
    r = await api.http.post("/api/execute-sql", json={"projectId": pid, "query": hidden}, headers=bearer(key))
    # Refused, and nothing of it committed. (The rolled-back rows' pages stay in the file until
    # vacuum, so the measured size may read above the cap; only deleting writes are allowed then.)
    assert r.json()["error"]["code"] == "DATABASE_QUOTA_EXCEEDED", r.text
    count = await sql(api, key, pid, "SELECT count(*) AS n FROM blob")
    assert count["result"]["rows"] == [{"n": 1}], count


# -- 9. the shared catalogs: another project's code, schema and statistics --------------------------


async def test_other_projects_catalog_entries_are_not_readable(api: Api, project: Any) -> None:
    _, owner = await api.new_user()
    other = await api.new_project(owner)
    other_admin = await api.new_key(owner, other, "admin")
    for q in (
        "CREATE FUNCTION stripe_key() RETURNS text LANGUAGE sql AS $$ SELECT 'sk_live_SECRETFN' $$",
        "CREATE TABLE customers (id int, plan text DEFAULT 'SECRETDEFAULT')",
        "COMMENT ON TABLE customers IS 'SECRETCOMMENT'",
        "ALTER TABLE customers ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY p ON customers USING (plan <> 'SECRETPOLICY')",
        "INSERT INTO customers SELECT g FROM generate_series(1, 77) g",
    ):
        assert (await sql(api, other_admin, other, q))["success"], q
    rw = await api.new_key(project.owner_token, project.id, "readwrite", rateLimitRequests=MANY)
    schema = f"p_{other}"
    leaks = []
    for q in (
        f"SELECT prosrc FROM pg_proc WHERE pronamespace = '{schema}'::regnamespace",
        "SELECT pg_get_expr(d.adbin, d.adrelid) AS e FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid "
        f"WHERE c.relnamespace = '{schema}'::regnamespace",
        "SELECT description FROM pg_description d JOIN pg_class c ON c.oid = d.objoid "
        f"WHERE c.relnamespace = '{schema}'::regnamespace",
        f"SELECT qual FROM pg_policies WHERE schemaname = '{schema}'",
        f"SELECT n_tup_ins FROM pg_stat_all_tables WHERE schemaname = '{schema}'",
    ):
        body = await sql(api, rw, project.id, q)
        text = str(body.get("result", ""))
        if any(s in text for s in ("SECRETFN", "SECRETDEFAULT", "SECRETCOMMENT", "SECRETPOLICY", "77")):
            leaks.append(q)
    assert leaks == [], leaks


# -- 10. outbound requests to loopback through other spellings of the address -----------------------


async def test_outbound_requests_never_reach_loopback(api: Api, project: Any) -> None:
    import asyncio

    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())

    hits: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(200))
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{"keys":[]}')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spellings = [
        f"http://127.0.0.1:{port}/",
        f"http://2130706433:{port}/",
        f"http://0x7f000001:{port}/",
        f"http://0177.0.0.1:{port}/",
        f"http://127.1:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
        f"http://[::ffff:7f00:1]:{port}/",
        f"http://localhost:{port}/",
        f"http://LOCALHOST.:{port}/",
        f"http://127.0.0.1.:{port}/",
        f"http://%31%32%37.0.0.1:{port}/",
    ]
    try:
        for url in spellings:
            r = await api.http.post(
                "/api/webhooks",
                json={"projectId": project.id, "url": url, "events": ["row.inserted"]},
                headers=bearer(project.admin_key),
            )
            if r.status_code == 201:
                hook = r.json()["webhook"]["id"]
                await api.http.post(f"/api/webhooks/{hook}/test", headers=bearer(project.admin_key))
            r = await api.http.patch(
                f"/api/projects/{project.id}/auth/settings",
                json={"jwksUri": url},
                headers=bearer(project.owner_token),
            )
            if r.status_code == 200:
                tok = pyjwt.encode(
                    {"sub": "x", "exp": 2_000_000_000}, ec_key, algorithm="ES256", headers={"kid": "a"}
                )
                await sql(api, project.admin_key, project.id, "SELECT 1", tok)
        await asyncio.sleep(0.5)
    finally:
        server.close()
    assert hits == [], hits


async def test_login_throttle_holds_against_a_parallel_burst(api: Api, project: Any) -> None:
    import asyncio

    pid = project.id
    email = f"burst-{secrets.token_hex(4)}@example.com"
    r = await api.http.post(f"/api/projects/{pid}/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text

    async def guess(i: int) -> int:
        r = await api.http.post(
            f"/api/projects/{pid}/auth/login",
            json={"email": email, "password": f"wrong-{i}"},
            headers={"X-Forwarded-For": random_ip()},
        )
        return r.status_code

    codes = await asyncio.gather(*(guess(i) for i in range(40)))
    checked = [c for c in codes if c != 429]
    assert len(checked) <= 20, codes  # login_account_max_failures


# -- 11. tenant code run by the platform's capture triggers -------------------------------------------


async def test_capture_trigger_does_not_run_tenant_cast_with_platform_rights(api: Api, project: Any) -> None:
    pid, key = project.id, project.admin_key
    schema = f"p_{pid}"
    for q in (
        "CREATE TABLE loot (who text, super boolean)",
        "CREATE TYPE mood AS ENUM ('happy')",
        f"CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql AS $$ INSERT INTO {schema}.loot "
        "SELECT current_user::text, (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user); "
        "SELECT '{}'::json $$",
        "CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)",
        "CREATE TABLE t (m mood)",
        "INSERT INTO t VALUES ('happy')",
    ):
        body = await sql(api, key, pid, q)
        assert body["success"], (q, body)
    body = await sql(api, key, pid, "SELECT who, super FROM loot")
    rows = body["result"]["rows"]
    assert all(r["who"].startswith(f"p_{pid}_") and not r["super"] for r in rows), rows


async def test_db_quota_counts_bytes_kept_in_the_catalogs(
    api: Api, project: Any, instance_admin: dict[str, Any]
) -> None:
    pid, key = project.id, project.admin_key
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    cap = r.json()["quotas"]["databaseUsedBytes"] + 262_144
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"databaseBytes": cap},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    stored = 0
    for i in range(8):
        body = secrets.token_hex(100_000)  # 200 kB, incompressible enough
        q = f"CREATE FUNCTION blob_{i}() RETURNS text LANGUAGE sql AS $$ SELECT '{body}' $$"
        if (await sql(api, key, pid, q)).get("success"):
            stored += len(body)
    assert stored <= cap, (stored, cap)


# -- 12. admin keys: caps and identity enforced only on what the classifier sees -------------------


async def test_admin_key_cannot_escape_caps_or_identity_without_a_visible_set(api: Api, project: Any) -> None:
    pid, key = project.id, project.admin_key
    probe = "SELECT current_setting('work_mem') AS w, auth.uid() AS u"
    attempts = {
        "DO": ["DO $$ BEGIN EXECUTE 'SET LOCAL work_mem = ''4GB'''; END $$", probe],
        "DO identity": [
            "DO $$ BEGIN PERFORM set_config('fluxbase.auth_uid', 'chosen', true); END $$",
            "SELECT auth.uid() AS u",
        ],
        "aggregate": [
            "CREATE AGGREGATE pg_temp.knob(text, boolean) (SFUNC = pg_catalog.set_config, STYPE = text, "
            "INITCOND = 'work_mem')",
            "SELECT pg_temp.knob('4GB', true) AS k",
            probe,
        ],
    }
    escaped = {}
    for label, stmts in attempts.items():
        body = await batch(api, key, pid, stmts)
        if body.get("success"):
            row = body["results"][-1]["rows"][0]
            if row.get("w") == "4GB" or row.get("u") == "chosen":
                escaped[label] = row
    assert escaped == {}, escaped


# -- 13. storage: userFolder names that might land in another user's folder ---------------------------


async def test_user_folder_rule_holds_for_tricky_names(api: Api, project: Any) -> None:
    from test_storage import create_bucket
    from test_storage_confinement import list_files, upload_as, user

    pid, admin = project.id, project.admin_key
    key = await browser_key(api, project)
    alice, a_tok = await end_user(api, pid)
    bob, b_tok = await end_user(api, pid)
    a, b = user(key, a_tok), user(key, b_tok)
    await create_bucket(
        api,
        admin,
        pid,
        "home",
        endUserAccess=dict.fromkeys(("list", "read", "insert", "update", "delete"), "userFolder"),
    )
    assert (await upload_as(api, b, pid, "home", f"{bob}/secret.txt", b"bob's")).status_code == 201
    names = [
        f"{alice}/../{bob}/x.txt",
        f"{alice}/./../{bob}/x.txt",
        f"{alice}%2F..%2F{bob}/x.txt",
        f"{alice}/..%2F{bob}/x.txt",
        f"{alice}\u2215..\u2215{bob}/x.txt",
        f"{alice}/\uff0e\uff0e/{bob}/x.txt",
        f"{alice}//{bob}/x.txt",
        f"{bob}/x.txt",
        f"{bob.upper()}/x.txt",
        f"{alice}/" + "a" * 2000,
        f"{bob}/secret.txt",
    ]
    for name in names:
        await upload_as(api, a, pid, "home", name, b"alice was here", upsert="true")
    listed = (await list_files(api, b, pid, "home")).json()["files"]
    assert [f["name"] for f in listed] == [f"{bob}/secret.txt"], listed
    r = await api.http.get(
        "/api/storage/url", params={"projectId": pid, "s3Key": listed[0]["s3_key"]}, headers=a
    )
    assert r.status_code == 404, r.text
    url = (
        await api.http.get(
            "/api/storage/url", params={"projectId": pid, "s3Key": listed[0]["s3_key"]}, headers=b
        )
    ).json()["url"]
    async with httpx.AsyncClient() as raw:
        assert (await raw.get(url)).content == b"bob's"
