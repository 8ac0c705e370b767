"""POST /api/execute-batch: one transaction, all or nothing, the failing index, identity kept."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from support import Api, assert_clean, assert_error, bearer


async def batch(api: Api, key: str, project_id: str, statements: list[Any], **extra: Any) -> httpx.Response:
    stmts = [s if isinstance(s, dict) else {"query": s} for s in statements]
    return await api.http.post(
        "/api/execute-batch",
        json={"projectId": project_id, "statements": stmts, **extra},
        headers=bearer(key),
    )


async def _setup(api: Api, project) -> None:
    r = await api.sql(
        project.admin_key, project.id, "CREATE TABLE acct (id int PRIMARY KEY, owner text, balance int)"
    )
    assert r.json()["success"], r.text


async def test_results_per_statement_in_order(api: Api, project) -> None:
    await _setup(api, project)
    r = await batch(
        api,
        project.admin_key,
        project.id,
        [
            {"query": "INSERT INTO acct VALUES ($1, $2, $3), (2, 'bob', 5)", "params": [1, "ann", "10"]},
            {"query": "UPDATE acct SET balance = balance - $1 WHERE id = 1", "params": [3]},
            "SELECT id, owner, balance FROM acct ORDER BY id",
        ],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    ins, upd, sel = body["results"]
    assert ins == {"rows": [], "columns": [], "rowCount": 2, "message": "INSERT 0 2", "truncated": False}
    assert upd["rowCount"] == 1 and upd["message"] == "UPDATE 1"
    assert sel["rows"] == [
        {"id": 1, "owner": "ann", "balance": 7},
        {"id": 2, "owner": "bob", "balance": 5},
    ]
    assert sel["columns"] == ["id", "owner", "balance"] and sel["rowCount"] == 2
    info = body["executionInfo"]
    assert info["statements"] == 3 and info["operations"] == ["INSERT", "UPDATE", "SELECT"]


async def test_failing_statement_rolls_back_everything_and_names_its_index(api: Api, project) -> None:
    await _setup(api, project)
    r = await batch(
        api,
        project.admin_key,
        project.id,
        [
            "INSERT INTO acct VALUES (1, 'ann', 10)",
            "INSERT INTO acct VALUES (1, 'dup', 0)",
            "INSERT INTO acct VALUES (3, 'never', 0)",
        ],
    )
    assert r.status_code == 200
    err = r.json()["error"]
    assert r.json()["success"] is False
    assert err["code"] == "SQL_EXEC_ERROR" and err["statementIndex"] == 1
    assert err["details"] == "ERROR:  23505" and err["message"].startswith("statement 1: ")
    assert_clean(r)
    got = await api.sql(project.admin_key, project.id, "SELECT count(*)::int AS n FROM acct")
    assert got.json()["result"]["rows"] == [{"n": 0}]
    # A bad parameter is the same kind of failure, with its own index.
    r = await batch(
        api,
        project.admin_key,
        project.id,
        [
            "INSERT INTO acct VALUES (1, 'ann', 10)",
            {"query": "SELECT $1::int", "params": ["not a number"]},
        ],
    )
    err = r.json()["error"]
    assert err["statementIndex"] == 1 and err["details"] == "ERROR:  22023"
    got = await api.sql(project.admin_key, project.id, "SELECT count(*)::int AS n FROM acct")
    assert got.json()["result"]["rows"] == [{"n": 0}]


async def test_denied_statements_are_refused_before_anything_runs(api: Api, project) -> None:
    await _setup(api, project)
    refused = [
        ("COMMIT", "0A000"),
        ("/* sneaky */ savepoint a", "0A000"),
        ("SET fluxbase.auth_uid = 'root'", "42501"),
        ("SET LOCAL fluxbase.auth_uid = 'root'", "42501"),
        ('SET LOCAL "fluxbase".auth_uid TO root', "42501"),
        ("set local FLUXBASE . AUTH_CLAIMS = '{}'", "42501"),
        ("SET SESSION statement_timeout = 0", "42501"),
        ("SET statement_timeout = 0", "42501"),
        ("RESET ALL", "42501"),
        ("reset fluxbase.auth_uid", "42501"),
        ("RESET ROLE", "42501"),
        ("SET SESSION AUTHORIZATION DEFAULT", "42501"),
        ("SET LOCAL ROLE postgres", "42501"),
        ("SET LOCAL SESSION AUTHORIZATION postgres", "42501"),
    ]
    for query, state in refused:
        r = await batch(api, project.admin_key, project.id, ["INSERT INTO acct VALUES (1, 'a', 1)", query])
        body = r.json()
        assert body["success"] is False, query
        assert body["error"]["statementIndex"] == 1, (query, body)
        assert body["error"]["details"] == f"ERROR:  {state}", (query, body)
    got = await api.sql(project.admin_key, project.id, "SELECT count(*)::int AS n FROM acct")
    assert got.json()["result"]["rows"] == [{"n": 0}]
    # SET LOCAL of an ordinary setting stays allowed and ends with the transaction.
    r = await batch(
        api,
        project.admin_key,
        project.id,
        ["SET LOCAL statement_timeout = '3s'", "SELECT current_setting('statement_timeout') AS t"],
    )
    assert r.json()["results"][1]["rows"] == [{"t": "3s"}], r.text


async def test_identity_holds_across_statements(api: Api, project) -> None:
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    for q in (
        "CREATE TABLE notes (id serial PRIMARY KEY, owner text, body text)",
        "INSERT INTO notes (owner, body) VALUES ('u1', 'mine'), ('u2', 'theirs')",
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
        "ALTER TABLE notes FORCE ROW LEVEL SECURITY",  # the admin key (table owner) too
        "CREATE POLICY own ON notes USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())",
    ):
        assert (await api.sql(project.admin_key, project.id, q)).json()["success"], q
    # Read and readwrite roles may not call set_config() at all (sql/0007).
    r = await batch(api, rw, project.id, ["SELECT 1", "SELECT set_config('myapp.x', 'u2', false)"])
    err = r.json()["error"]
    assert err["statementIndex"] == 1 and err["details"] == "ERROR:  42501" and "set_config" in err["message"]
    # Of the identity, not even as admin: tenancy.statements refuses the statement.
    r = await batch(
        api, project.admin_key, project.id, ["SELECT set_config('fluxbase.auth_uid', 'u2', false)"]
    )
    assert r.json()["error"]["details"] == "ERROR:  42501" and "identity" in r.json()["error"]["message"]
    # An admin's plpgsql function may, and no statement check reads plpgsql: the identity is set again
    # before each statement.
    forge = (
        "CREATE FUNCTION forge() RETURNS text LANGUAGE plpgsql "
        "AS $$ BEGIN RETURN set_config('fluxbase.auth_uid', 'u2', false); END $$"
    )
    assert (await api.sql(project.admin_key, project.id, forge)).json()["success"]
    r = await api.http.post(
        "/api/execute-batch",
        json={
            "projectId": project.id,
            "statements": [
                {"query": "SELECT forge()"},
                {"query": "SELECT auth.uid() AS uid, auth.role() AS role"},
                {"query": "SELECT body FROM notes ORDER BY id"},
                {"query": "SELECT set_config('role', 'p_someone_else_admin', true)"},
            ],
        },
        headers={**bearer(project.admin_key), "X-Fluxbase-Auth-Uid": "u1"},
    )
    body = r.json()
    # Setting 'role' to a role the tenant is not a member of fails: the whole batch is refused.
    assert body["success"] is False and body["error"]["statementIndex"] == 3, body
    r = await batch(
        api,
        project.admin_key,
        project.id,
        [
            "SELECT forge()",
            "SELECT auth.uid() AS uid, auth.role() AS role",
            "SELECT body FROM notes ORDER BY id",
        ],
        authUid="u1",
    )
    results = r.json()["results"]
    assert results[1]["rows"] == [{"uid": "u1", "role": "admin"}]
    assert results[2]["rows"] == [{"body": "mine"}]
    # And nothing of the forged session setting survives into the next request.
    r = await api.sql(project.admin_key, project.id, "SELECT auth.uid() AS uid")
    assert r.json()["result"]["rows"] == [{"uid": None}]


async def test_read_only_and_isolation_levels(api: Api, project, control_db) -> None:
    await _setup(api, project)
    r = await batch(
        api, project.admin_key, project.id, ["SELECT 1", "INSERT INTO acct VALUES (1, 'a', 1)"], readOnly=True
    )
    err = r.json()["error"]
    assert err["statementIndex"] == 1 and err["details"] == "ERROR:  25006"
    for level, shown in (
        ("read committed", "read committed"),
        ("REPEATABLE READ", "repeatable read"),
        ("serializable", "serializable"),
    ):
        r = await batch(
            api,
            project.admin_key,
            project.id,
            ["SELECT current_setting('transaction_isolation') AS lvl"],
            isolationLevel=level,
        )
        assert r.json()["results"][0]["rows"] == [{"lvl": shown}], r.text
    r = await batch(api, project.admin_key, project.id, ["SELECT 1"], isolationLevel="chaos")
    assert_error(r, 400, "VALIDATION_ERROR")
    # Repeatable read: the snapshot taken by statement 0 hides a commit made while statement 1
    # waits on an advisory lock; read committed sees it. No sleeps: the test waits on pg_locks.
    await api.sql(project.admin_key, project.id, "INSERT INTO acct VALUES (1, 'a', 1)")
    for level, expected in (("repeatable read", [1, 1]), ("read committed", [1, 99])):
        await api.sql(project.admin_key, project.id, "UPDATE acct SET balance = 1")
        async with control_db.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(4242)")
            reader = asyncio.create_task(
                batch(
                    api,
                    project.admin_key,
                    project.id,
                    [
                        "SELECT balance FROM acct",
                        "SELECT pg_advisory_xact_lock(4242)",
                        "SELECT balance FROM acct",
                    ],
                    isolationLevel=level,
                )
            )
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted"
            ):
                await asyncio.sleep(0.02)
            await conn.execute(f"UPDATE p_{project.id}.acct SET balance = 99 WHERE id = 1")
            await conn.execute("SELECT pg_advisory_unlock(4242)")
            res = (await reader).json()["results"]
        assert [res[0]["rows"][0]["balance"], res[2]["rows"][0]["balance"]] == expected, level


async def test_scopes_limits_and_bad_bodies(api: Api, project) -> None:
    await _setup(api, project)
    ro = await api.new_key(project.owner_token, project.id, "read")
    r = await batch(api, ro, project.id, ["SELECT 1 AS one", "INSERT INTO acct VALUES (1, 'a', 1)"])
    err = r.json()["error"]
    assert err["statementIndex"] == 1 and err["details"] in ("ERROR:  25006", "ERROR:  42501")
    r = await batch(api, project.admin_key, project.id, ["SELECT 1"] * 101)
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await batch(api, project.admin_key, project.id, [])
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await batch(api, project.admin_key, project.id, ["  "])
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.post(
        "/api/execute-batch", json={"projectId": project.id, "statements": "SELECT 1"}, headers=bearer(ro)
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.post("/api/execute-batch", json={"projectId": project.id, "statements": []})
    assert_error(r, 401, "AUTH_REQUIRED")
    _, token = await api.new_user()
    other = await api.new_project(token)
    r = await batch(api, project.admin_key, other, ["SELECT 1"])
    assert_error(r, 403, "SCOPE_MISMATCH")


async def test_deadline_names_the_running_statement(spawn) -> None:
    async with spawn(FLUXBASE_SQL_DEADLINE_MS="700") as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin")
            await api.sql(key, pid, "CREATE TABLE t (id int)")
            r = await batch(api, key, pid, ["INSERT INTO t VALUES (1)", "SELECT pg_sleep(5)"])
            err = r.json()["error"]
            assert err["code"] == "QUERY_TIMEOUT" and err["statementIndex"] == 1, r.text
            got = await api.sql(key, pid, "SELECT count(*)::int AS n FROM t")
            assert got.json()["result"]["rows"] == [{"n": 0}]
        finally:
            await api.close()


async def test_connection_killed_mid_batch_never_reports_success(api: Api, project, control_db) -> None:
    await _setup(api, project)
    task = asyncio.create_task(
        batch(
            api,
            project.admin_key,
            project.id,
            ["INSERT INTO acct VALUES (1, 'a', 1)", "SELECT pg_sleep(5) /* batch victim */"],
        )
    )
    victim = None
    for _ in range(100):
        await asyncio.sleep(0.05)
        victim = await control_db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE usename = $1 AND query LIKE '%batch victim%'",
            f"p_{project.id}_admin",
        )
        if victim:
            break
    assert victim, "the batch never reached its second statement"
    await control_db.execute("SELECT pg_terminate_backend($1)", victim)
    assert_error(await task, 503, "DATABASE_CONNECTION_ERROR")
    got = await api.sql(project.admin_key, project.id, "SELECT count(*)::int AS n FROM acct")
    assert got.json()["result"]["rows"] == [{"n": 0}]
