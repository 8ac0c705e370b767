"""POST /api/execute-sql: the reference doc's shapes, types, scopes and errors, end to end."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess

import pytest

from support import ROOT, Api, assert_error, bearer


async def test_doc_example_shapes(api: Api, project) -> None:
    r = await api.sql(
        project.admin_key,
        project.id,
        "CREATE TABLE users (id serial PRIMARY KEY, name text, email text, active boolean)",
    )
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert r.json()["executionInfo"]["operation"] == "CREATE TABLE"
    r = await api.sql(
        project.admin_key,
        project.id,
        "INSERT INTO users (name, email, active) VALUES ($1, $2, $3)",
        ["Alice", "alice@example.com", True],
    )
    body = r.json()
    assert (
        body["success"] and body["result"]["rowCount"] == 1 and body["executionInfo"]["operation"] == "INSERT"
    )
    r = await api.sql(project.admin_key, project.id, "SELECT id, name, email FROM users LIMIT 10;")
    body = r.json()
    assert body == {
        "success": True,
        "result": {
            "rows": [{"id": 1, "name": "Alice", "email": "alice@example.com"}],
            "columns": ["id", "name", "email"],
            "rowCount": 1,
            "message": None,
            "truncated": False,
        },
        "executionInfo": {
            "time": body["executionInfo"]["time"],
            "timeMs": body["executionInfo"]["timeMs"],
            "rowCount": 1,
            "operation": "SELECT",
        },
    }
    assert body["executionInfo"]["time"].endswith("ms")
    # The doc's error example, byte for byte where it matters.
    r = await api.sql(project.admin_key, project.id, "SELECT * FROM usrs")
    assert r.status_code == 200
    assert r.json() == {
        "success": False,
        "error": {
            "message": 'relation "usrs" does not exist',
            "code": "SQL_EXEC_ERROR",
            "details": "ERROR:  42P01",
        },
    }


async def test_json_faithful_values(api: Api, project) -> None:
    r = await api.sql(
        project.admin_key,
        project.id,
        """
        SELECT 9007199254740993::bigint AS big, 42::bigint AS small,
               12345678901234567890.123456789::numeric AS num,
               1.5::float8 AS f, '2026-04-14 12:00:00+00'::timestamptz AS ts, '2026-04-14'::date AS d,
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, '{"a": [1, 2, {"b": null}]}'::jsonb AS j,
               '[1,2]'::json AS js, '\\x0001ff'::bytea AS b, ARRAY[1,2,3] AS arr, ARRAY['x', NULL] AS tarr,
               NULL::text AS n, true AS t, interval '1 day 2 hours' AS iv, '10.0.0.1'::inet AS ip,
               int4range(1, 5) AS rng
    """,
    )
    body = r.json()
    assert body["success"], body
    row = body["result"]["rows"][0]
    assert row["big"] == "9007199254740993"  # beyond 2^53: a string, never a rounded number
    assert row["small"] == 42
    assert row["num"] == "12345678901234567890.123456789"
    assert row["f"] == 1.5
    assert row["ts"] == "2026-04-14T12:00:00Z"
    assert row["d"] == "2026-04-14"
    assert row["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert row["j"] == {"a": [1, 2, {"b": None}]}
    assert row["js"] == [1, 2]
    assert base64.b64decode(row["b"]) == b"\x00\x01\xff"
    assert row["arr"] == [1, 2, 3] and row["tarr"] == ["x", None]
    assert row["n"] is None and row["t"] is True
    assert row["iv"] == "P1DT7200S" or row["iv"].startswith("P1D")
    assert row["ip"] == "10.0.0.1"
    assert row["rng"]["lower"] == 1 and row["rng"]["upper"] == 5


async def test_params_are_bound_and_coerced(api: Api, project) -> None:
    await api.sql(
        project.admin_key,
        project.id,
        "CREATE TABLE ev (id bigserial PRIMARY KEY, at timestamptz, day date, tag uuid, meta jsonb, n int)",
    )
    r = await api.sql(
        project.admin_key,
        project.id,
        "INSERT INTO ev (at, day, tag, meta, n) VALUES ($1, $2, $3, $4, $5) RETURNING id, meta, n",
        [
            "2026-01-02T03:04:05Z",
            "2026-01-02",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            {"k": [1, "two"]},
            "7",
        ],
    )
    body = r.json()
    assert body["success"], body
    assert body["result"]["rows"] == [{"id": 1, "meta": {"k": [1, "two"]}, "n": 7}]
    # Injection through params is inert.
    r = await api.sql(
        project.admin_key, project.id, "SELECT count(*) AS c FROM ev WHERE meta->>'k' = $1", ["x' OR '1'='1"]
    )
    assert r.json()["result"]["rows"] == [{"c": 0}]
    r = await api.sql(project.admin_key, project.id, "SELECT $1::int AS x", ["not a number"])
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == "SQL_EXEC_ERROR"
    assert body["error"]["details"].startswith("ERROR:  ")
    r = await api.sql(project.admin_key, project.id, "SELECT $1::int AS x, $2::int AS y", [1])
    assert r.json()["success"] is False and "expects 2" in r.json()["error"]["message"]


async def test_credentials_and_project_errors(api: Api, project) -> None:
    r = await api.http.post("/api/execute-sql", json={"projectId": project.id, "query": "SELECT 1"})
    assert_error(r, 401, "AUTH_REQUIRED")
    r = await api.http.post(
        "/api/execute-sql",
        json={"projectId": project.id, "query": "SELECT 1"},
        headers=bearer("flx_live_nope"),
    )
    assert_error(r, 401, "AUTH_REQUIRED")
    _, token = await api.new_user()
    other = await api.new_project(token)
    assert_error(await api.sql(project.admin_key, other, "SELECT 1"), 403, "SCOPE_MISMATCH")
    assert_error(await api.sql(project.admin_key, "00000000000000aa", "SELECT 1"), 404, "PROJECT_NOT_FOUND")
    r = await api.http.post("/api/execute-sql", json={"query": "SELECT 1"}, headers=bearer(project.admin_key))
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.post(
        "/api/execute-sql",
        json={"projectId": project.id, "query": "SELECT 1", "params": 5},
        headers=bearer(project.admin_key),
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    assert_error(await api.sql(project.admin_key, project.id, "   "), 400, "VALIDATION_ERROR")


async def test_scopes_follow_the_doc_table(api: Api, project) -> None:
    await api.sql(project.admin_key, project.id, "CREATE TABLE items (id serial PRIMARY KEY, v text)")
    await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ('a')")
    ro = await api.new_key(project.owner_token, project.id, "read")
    rw = await api.new_key(project.owner_token, project.id, "readwrite")

    async def ok(key: str, q: str) -> bool:
        body = (await api.sql(key, project.id, q)).json()
        return bool(body["success"])

    assert await ok(ro, "SELECT * FROM items")
    assert not await ok(ro, "INSERT INTO items (v) VALUES ('b')")
    assert not await ok(ro, "UPDATE items SET v = 'z'")
    assert not await ok(ro, "SELECT nextval('items_id_seq')")
    assert await ok(rw, "INSERT INTO items (v) VALUES ('b')")
    assert await ok(rw, "UPDATE items SET v = 'c' WHERE v = 'b'")
    assert not await ok(rw, "DELETE FROM items")
    assert not await ok(rw, "TRUNCATE items")
    assert not await ok(rw, "CREATE TABLE t2 (id int)")
    assert not await ok(rw, "DROP TABLE items")
    assert not await ok(rw, "ALTER TABLE items ADD COLUMN x int")
    assert await ok(project.admin_key, "DELETE FROM items WHERE v = 'c'")
    assert await ok(project.admin_key, "ALTER TABLE items ADD COLUMN x int")
    # Tables created later are covered by default privileges.
    assert await ok(project.admin_key, "CREATE TABLE later (id int)")
    assert await ok(rw, "INSERT INTO later VALUES (1)")
    assert await ok(ro, "SELECT * FROM later")
    assert not await ok(ro, "DELETE FROM later")


async def test_dashboard_session_of_creator_acts_as_admin(api: Api, project) -> None:
    r = await api.sql(project.owner_token, project.id, "CREATE TABLE from_dashboard (id int)")
    assert r.json()["success"] is True
    _, stranger = await api.new_user()
    assert_error(await api.sql(stranger, project.id, "SELECT 1"), 403, "SCOPE_MISMATCH")


async def test_per_key_rate_limit(api: Api, project) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "limited", "scope": "read", "rateLimitRequests": 3, "rateLimitWindowSeconds": 10},
        headers=bearer(project.owner_token),
    )
    key = r.json()["key"]
    for _ in range(3):
        assert (await api.sql(key, project.id, "SELECT 1")).json()["success"]
    r = await api.sql(key, project.id, "SELECT 1")
    assert_error(r, 429, "RATE_LIMIT")
    assert 1 <= int(r.headers["Retry-After"]) <= 10
    # Other keys of the project are unaffected.
    assert (await api.sql(project.admin_key, project.id, "SELECT 1")).json()["success"]


async def test_default_rate_limit_is_50_per_10_seconds(api: Api, project) -> None:
    key = await api.new_key(project.owner_token, project.id, "read")
    results = await asyncio.gather(*(api.sql(key, project.id, "SELECT 1") for _ in range(55)))
    codes = [r.status_code for r in results]
    assert codes.count(200) == 50 and codes.count(429) == 5


async def test_row_cap_truncates(spawn) -> None:
    async with spawn(FLUXBASE_SQL_MAX_ROWS="100", FLUXBASE_SQL_MAX_BYTES="4000") as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid)
            body = (await api.sql(key, pid, "SELECT g FROM generate_series(1, 1000) g")).json()
            assert body["success"] and body["result"]["truncated"] is True
            assert body["result"]["rowCount"] == 100 and len(body["result"]["rows"]) == 100
            body = (
                await api.sql(key, pid, "SELECT repeat('x', 100) AS s FROM generate_series(1, 90)")
            ).json()
            assert body["result"]["truncated"] is True and len(body["result"]["rows"]) < 40
            body = (await api.sql(key, pid, "SELECT g FROM generate_series(1, 100) g")).json()
            assert body["result"]["truncated"] is False and body["result"]["rowCount"] == 100
        finally:
            await api.close()


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_reference_fluxbase_js_snippet_runs_unchanged(api: Api, project, tmp_path) -> None:
    await api.sql(
        project.admin_key, project.id, "CREATE TABLE users (id serial PRIMARY KEY, name text, active bool)"
    )
    await api.sql(
        project.admin_key, project.id, "INSERT INTO users (name, active) VALUES ('Ann', true), ('Bo', false)"
    )
    snippet = (ROOT / "tests" / "js" / "fluxbase.js").read_text()
    # Only BASE_URL differs from the doc: it points at the server under test.
    script = tmp_path / "fluxbase.mjs"
    script.write_text(snippet.replace("'https://fluxbase.vercel.app'", json.dumps(api.base_url)))
    env = {"FLUXBASE_API_KEY": project.admin_key, "FLUXBASE_PROJECT_ID": project.id, "PATH": "/usr/bin:/bin"}
    res = await asyncio.to_thread(
        subprocess.run, ["node", str(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "Ann" in res.stdout and "Bo" not in res.stdout


async def test_revocation_suspension_and_read_only_apply_at_once_despite_key_cache(
    api: Api, project, control_db
) -> None:
    key = await api.new_key(project.owner_token, project.id, "readwrite")
    await api.sql(project.admin_key, project.id, "CREATE TABLE ro_t (id int)")
    assert (await api.sql(key, project.id, "INSERT INTO ro_t VALUES (1)")).json()["success"]  # now cached
    # Read-only switch: writes refused on the very next request, reads still work.
    await control_db.execute("UPDATE fluxbase.projects SET read_only = true WHERE id = $1", project.id)
    assert_error(await api.sql(key, project.id, "INSERT INTO ro_t VALUES (2)"), 403, "PROJECT_READ_ONLY")
    assert (await api.sql(key, project.id, "SELECT count(*) AS n FROM ro_t")).json()["result"]["rows"] == [
        {"n": 1}
    ]
    await control_db.execute("UPDATE fluxbase.projects SET read_only = false WHERE id = $1", project.id)
    assert (await api.sql(key, project.id, "INSERT INTO ro_t VALUES (3)")).json()["success"]
    # Suspension.
    await control_db.execute("UPDATE fluxbase.projects SET status = 'suspended' WHERE id = $1", project.id)
    assert_error(await api.sql(key, project.id, "SELECT 1"), 403, "PROJECT_SUSPENDED")
    await control_db.execute("UPDATE fluxbase.projects SET status = 'active' WHERE id = $1", project.id)
    assert (await api.sql(key, project.id, "SELECT 1")).json()["success"]
    # Revocation through the API.
    key_id = (
        await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(project.owner_token))
    ).json()["apiKeys"][-1]["id"]
    r = await api.http.delete(
        f"/api/projects/{project.id}/api-keys/{key_id}", headers=bearer(project.owner_token)
    )
    assert r.status_code == 200
    assert_error(await api.sql(key, project.id, "SELECT 1"), 401, "AUTH_REQUIRED")


async def test_auth_epoch_moves_with_access_changes_only_and_stays_private(
    api: Api, project, control_db
) -> None:
    """The cached key state is trusted only while its project's auth epoch is current (sql/0011):
    a change made straight in the database, past every API cache, is still refused at once."""
    key = await api.new_key(project.owner_token, project.id, "readwrite")
    assert (await api.sql(key, project.id, "SELECT 1 AS x")).json()["success"]  # now cached

    async def epoch() -> int:
        q = "SELECT epoch FROM fluxbase_guard.auth_epochs WHERE project_id = $1"
        return int(await control_db.fetchval(q, project.id))

    e0 = await epoch()
    await control_db.execute(
        "UPDATE fluxbase.api_keys SET last_used_at = now() WHERE project_id = $1", project.id
    )
    await control_db.execute("UPDATE fluxbase.projects SET name = name || '!' WHERE id = $1", project.id)
    assert await epoch() == e0  # usage bookkeeping and renames do not flush caches
    assert (await api.sql(key, project.id, "SELECT 1 AS x")).json()["success"]
    key_hash = hashlib.sha256(key.encode()).digest()
    await control_db.execute("UPDATE fluxbase.api_keys SET revoked_at = now() WHERE key_hash = $1", key_hash)
    assert await epoch() > e0
    assert_error(await api.sql(key, project.id, "SELECT 1 AS x"), 401, "AUTH_REQUIRED")
    # A tenant sees its own project's epoch row only.
    _, owner = await api.new_user()
    await api.new_project(owner)
    body = (
        await api.sql(project.admin_key, project.id, "SELECT project_id FROM fluxbase_guard.auth_epochs")
    ).json()
    assert body["result"]["rows"] == [{"project_id": project.id}]
    body = (
        await api.sql(project.admin_key, project.id, "UPDATE fluxbase_guard.auth_epochs SET epoch = 0")
    ).json()
    assert body["success"] is False and body["error"]["details"] == "ERROR:  42501"


async def test_guard_function_reveals_nothing_without_a_key(api: Api, project) -> None:
    for q in ("SELECT fluxbase_guard.check_key('\\x00'::bytea, $1)", "SELECT * FROM fluxbase.api_keys"):
        body = (await api.sql(project.admin_key, project.id, q, [project.id] if "$1" in q else None)).json()
        assert body["success"] is False


async def test_execute_sql_edges_match_the_rest_of_the_api(api: Api, project) -> None:
    """`/api/execute-sql` is answered ahead of Litestar (http.fastpath); its edges must still
    behave as every other route's: CORS, preflight, method, body limit, envelope, OpenAPI."""
    h = {**bearer(project.admin_key), "Origin": "https://app.example"}
    r = await api.http.post(
        "/api/execute-sql", json={"projectId": project.id, "query": "SELECT 1 AS x"}, headers=h
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert r.headers["content-type"] == "application/json" and r.json()["result"]["rows"] == [{"x": 1}]
    r = await api.http.options(
        "/api/execute-sql",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code in (200, 204) and r.headers["access-control-allow-origin"] in (
        "*",
        "https://app.example",
    )
    assert_error(await api.http.get("/api/execute-sql", headers=h), 405, "METHOD_NOT_ALLOWED")
    r = await api.http.post("/api/execute-sql", content=b"{not json", headers=h)
    assert_error(r, 400, "VALIDATION_ERROR")
    assert r.headers["access-control-allow-origin"] == "*"
    assert_error(
        await api.http.post("/api/execute-sql", json={"projectId": project.id, "query": "SELECT 1"}),
        401,
        "AUTH_REQUIRED",
    )
    big = (
        b'{"projectId": "'
        + project.id.encode()
        + b'", "query": "SELECT 1", "x": "'
        + b"a" * 10_000_001
        + b'"}'
    )
    assert_error(await api.http.post("/api/execute-sql", content=big, headers=h), 413, "PAYLOAD_TOO_LARGE")
    spec = (await api.http.get("/schema/openapi.json")).json()
    assert spec["paths"]["/api/execute-sql"]["post"]["operationId"] == "executeSql"


async def test_key_rate_limit_counts_every_endpoint(api: Api, project) -> None:
    """RATE_LIMIT is per key, whatever the route: storage, realtime and webhook calls count too,
    and share the budget with SQL."""
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "limited", "scope": "read", "rateLimitRequests": 4, "rateLimitWindowSeconds": 10},
        headers=bearer(project.owner_token),
    )
    key = r.json()["key"]
    h = bearer(key)
    q = {"projectId": project.id}
    assert (await api.http.get("/api/storage/buckets", params=q, headers=h)).status_code == 200
    assert (await api.http.get("/api/realtime/tables", params=q, headers=h)).status_code == 200
    assert (await api.http.get("/api/version", params=q, headers=h)).status_code == 200
    assert (await api.sql(key, project.id, "SELECT 1")).json()["success"]
    r = await api.http.get("/api/storage/buckets", params=q, headers=h)
    assert_error(r, 429, "RATE_LIMIT")
    assert 1 <= int(r.headers["Retry-After"]) <= 10
    assert_error(await api.sql(key, project.id, "SELECT 1"), 429, "RATE_LIMIT")
    # Another key of the project is unaffected.
    r = await api.http.get("/api/storage/buckets", params=q, headers=bearer(project.admin_key))
    assert r.status_code == 200


async def test_cached_statements_survive_a_change_of_their_result_type(api: Api, project) -> None:
    """After ALTER TABLE changes what `SELECT *` returns, every pooled connection's cached plan
    is stale; each request retries once with a fresh statement instead of failing (0A000)."""
    key, pid = project.admin_key, project.id
    assert (await api.sql(key, pid, "CREATE TABLE shape (a int)")).json()["success"]
    assert (await api.sql(key, pid, "INSERT INTO shape VALUES (1)")).json()["success"]
    warm = await asyncio.gather(*(api.sql(key, pid, "SELECT * FROM shape") for _ in range(8)))
    assert all(r.json()["result"]["rows"] == [{"a": 1}] for r in warm)
    assert (await api.sql(key, pid, "ALTER TABLE shape ADD COLUMN b int DEFAULT 7")).json()["success"]
    for _ in range(3):
        after = await asyncio.gather(*(api.sql(key, pid, "SELECT * FROM shape") for _ in range(8)))
        for r in after:
            assert r.json()["result"]["rows"] == [{"a": 1, "b": 7}], r.text
    # The explicit-transaction path (a statement calling a session advisory-lock function, as
    # tenancy.statements sees it) retries the same way.
    q = "SELECT *, pg_advisory_unlock_all() AS note FROM shape"
    assert (await api.sql(key, pid, q)).json()["success"]
    assert (await api.sql(key, pid, "ALTER TABLE shape ADD COLUMN c int DEFAULT 8")).json()["success"]
    body = (await api.sql(key, pid, q)).json()
    assert body["result"]["rows"] == [{"a": 1, "b": 7, "c": 8, "note": None}], body
