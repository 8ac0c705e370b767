"""Hostile review 15: sql/0048 (write_events' one-expression fast path, the outbox without its
CHECK on `kind`), the sqlspeed3 merge (the request prefix sent with MSG_MORE ahead of its
statement, per-request caches) and the cold3 merge (a cold project's connection opened while its
rate lease is read, a sixteenth of the connection budget kept free), attacked through the real API
on the real stack with the source in hand.

Each test asserts the SECURE behaviour. A hole still open is marked `xfail(strict=True)`; the
mark goes with the fix. The database fixture (`control_db`) only observes (the outbox, the
server's backends), never sets an attack up.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import asyncpg

from support import Api, assert_error, bearer
from test_attack_review1 import MANY, end_user

# -- helpers ------------------------------------------------------------------------------------


async def _sql(
    api: Api, key: str, pid: str, query: str, params: list[Any] | None = None, token: str | None = None
) -> Any:
    headers = bearer(key)
    if token is not None:
        headers["X-Fluxbase-User-Token"] = token
    body: dict[str, Any] = {"projectId": pid, "query": query}
    if params is not None:
        body["params"] = params
    headers["Content-Type"] = "application/json"
    # json.dumps escapes what UTF-8 cannot carry (a lone surrogate stays a \\ud800 escape).
    return await api.http.post("/api/execute-sql", content=json.dumps(body).encode(), headers=headers)


async def _ok(api: Api, key: str, pid: str, query: str, token: str | None = None) -> dict[str, Any]:
    r = await _sql(api, key, pid, query, token=token)
    assert r.status_code == 200 and r.json()["success"], (query, r.text)
    return dict(r.json())


async def _tenant_backends(control_db: asyncpg.Pool, pid: str) -> int:
    """The server's backends logged in as any of the project's roles."""
    return int(
        await control_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE $1", f"p\\_{pid}\\_%"
        )
    )


async def _none_opened(control_db: asyncpg.Pool, pid: str, wait_s: float = 1.0) -> int:
    """The most backends of the project seen over `wait_s` (a connection opened ahead is open, or
    opening, well within it)."""
    most = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + wait_s
    while loop.time() < end:
        most = max(most, await _tenant_backends(control_db, pid))
        await asyncio.sleep(0.05)
    return most


async def _drop_backends(control_db: asyncpg.Pool, pid: str) -> None:
    await control_db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename LIKE $1", f"p\\_{pid}\\_%"
    )
    for _ in range(100):
        if not await _tenant_backends(control_db, pid):
            break
        await asyncio.sleep(0.03)
    await asyncio.sleep(0.2)  # the API sees the ends (termination listeners) and empties its pools


# -- 1. sql/0048: write_events' fast path ---------------------------------------------------------


async def _outbox(control_db: asyncpg.Pool, marker: str) -> list[asyncpg.Record]:
    return list(
        await control_db.fetch(
            "SELECT project_id, kind, table_name, operation, bytes FROM fluxbase.events "
            "WHERE record::text LIKE $1",
            f"%{marker}%",
        )
    )


async def test_held_write_events_fast_path_refuses_crafted_calls(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """An admin key's own trigger calls write_events with what the fast path compares: another
    project's table (by oid, no USAGE needed), operations the fast path does not take (TRUNCATE on
    the other project's table, BROADCAST, 'insert', 'schema'), a record over the 1 MiB bound. Only
    events of the caller's own table, kind 'row' and a row operation land, with bounded bytes;
    none in the other project's stream. The outbox takes no direct INSERT of a forged kind."""
    pid, key = project.id, project.admin_key
    other = await api.new_project(project.owner_token, "victim")
    other_key = await api.new_key(project.owner_token, other, "admin", rateLimitRequests=MANY)
    await _ok(api, other_key, other, "CREATE TABLE messages (v text)")
    victim_oid = await control_db.fetchval(f"SELECT 'p_{other}.messages'::regclass::oid")
    marker = f"r15-{secrets.token_hex(4)}"
    rec = '{"v": "' + marker + '"}'
    calls = [
        f"{victim_oid}::regclass, 'INSERT'",
        f"{victim_oid}::regclass, 'TRUNCATE'",
        f"{victim_oid}::regclass, 'UPDATE'",
        "'src'::regclass, 'BROADCAST'",
        "'src'::regclass, 'insert'",
        "'src'::regclass, 'schema'",
        "'src'::regclass, NULL",
        "NULL, 'INSERT'",
        "'pg_catalog.pg_class'::regclass, 'INSERT'",
    ]
    await _ok(api, key, pid, "CREATE TABLE src (v text)")
    for n, call in enumerate(calls):
        fn = (
            f"CREATE FUNCTION fwd{n}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $f$ BEGIN "
            f"PERFORM fluxbase_capture.write_events({call}, ARRAY['{rec}'::jsonb], NULL); "
            "RETURN NULL; END $f$"
        )
        await _ok(api, key, pid, fn)
        await _ok(
            api, key, pid, f"CREATE TRIGGER fwd{n} AFTER INSERT ON src FOR EACH ROW EXECUTE FUNCTION fwd{n}()"
        )
        r = await _sql(api, key, pid, "INSERT INTO src VALUES ('x')")
        assert r.status_code < 500 and not r.json()["success"], (call, r.text)
        assert r.json()["error"]["code"] not in ("INTERNAL_ERROR",), r.text
        await _ok(api, key, pid, f"DROP TRIGGER fwd{n} ON src")
        await _ok(api, key, pid, f"DROP FUNCTION fwd{n}()")
    assert not await _outbox(control_db, marker)
    # Its own table, a record past the bound: stored with its small fields only.
    big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 40000) g)"
    await _ok(
        api,
        key,
        pid,
        "CREATE FUNCTION own() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
        f"PERFORM fluxbase_capture.write_events('src'::regclass, 'INSERT', ARRAY[jsonb_build_object("
        f"'v', '{marker}', 'big', {big})], NULL); RETURN NULL; END $f$",
    )
    await _ok(api, key, pid, "CREATE TRIGGER own AFTER INSERT ON src FOR EACH ROW EXECUTE FUNCTION own()")
    await _ok(api, key, pid, "INSERT INTO src VALUES ('y')")
    got = await _outbox(control_db, marker)
    assert [(e["project_id"], e["kind"], e["table_name"], e["operation"]) for e in got] == [
        (pid, "row", "src", "INSERT")
    ], got
    assert got[0]["bytes"] < 64 * 1024, got
    # No tenant path writes the outbox itself (its CHECK on kind is gone).
    r = await _sql(
        api,
        key,
        pid,
        "INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, bytes) "
        f"VALUES ('{other}', 'x', 't', 'INSERT', '{rec}', 1)",
    )
    assert r.status_code < 500 and not r.json()["success"], r.text
    assert [e["project_id"] for e in await _outbox(control_db, marker)] == [pid]


# -- 3. cold3: connections opened ahead of a request ---------------------------------------------


async def _browser_key(api: Api, project: Any, scope: str = "readwrite") -> str:
    return await api.new_key(
        project.owner_token, project.id, scope, requireUserAuth=True, rateLimitRequests=MANY
    )


async def test_a_browser_key_with_a_forged_user_token_opens_no_connection(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """A requireUserAuth key ships inside browser apps: it is public. `preopen` ran for any
    request that carried an `X-Fluxbase-User-Token` header, before the token was verified, so
    anybody with the page's key and a made-up token made the server open a tenant connection
    of the project (and the budget evict another project's idle one for it), then got 401."""
    pid = project.id
    browser = await _browser_key(api, project)
    assert await _tenant_backends(control_db, pid) == 0
    for token in ("x", "eyJhbGciOiJIUzI1NiJ9.e30.AAAA", "a" * 400):
        r = await _sql(api, browser, pid, "SELECT 1", token=token)
        assert r.status_code == 401, r.text
    assert await _none_opened(control_db, pid) == 0
    # An end user with a real token still gets its answer.
    _uid, tok = await end_user(api, pid)
    assert (await _ok(api, browser, pid, "SELECT 41 + 1 AS n", token=tok))["result"]["rows"] == [{"n": 42}]


async def test_a_rate_limited_request_opens_no_connection(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """`preopen` runs before the rate limiter's `hit` (that is the overlap), so a key over its
    limit still made the server open its pool's connection (and the budget evict another
    project's idle one for it) whenever none was idle, then got 429. Now a caller whose lease
    this process knows to be spent out opens none."""
    pid = project.id
    key = await api.new_key(project.owner_token, pid, "admin", rateLimitRequests=1)
    await _ok(api, key, pid, "SELECT 1")  # the window's one request
    await _drop_backends(control_db, pid)  # its connection ends (idle timeout, eviction, restart)
    for _ in range(3):
        assert_error(await _sql(api, key, pid, "SELECT 1"), 429, "RATE_LIMIT")
    assert await _none_opened(control_db, pid) == 0


async def test_held_refused_credentials_open_no_connection(
    api: Api, project: Any, control_db: asyncpg.Pool, instance_admin: dict[str, Any]
) -> None:
    """A wrong key, another project's key, a revoked key, a key from the wrong origin, a browser
    key without a token, a dashboard session of a non-member and a suspended project's key: each
    refused, and none makes the server open a connection of the project."""
    pid, owner = project.id, project.owner_token
    admin = bearer(owner)
    other = await api.new_project(owner, "other")
    other_key = await api.new_key(owner, other, "admin", rateLimitRequests=MANY)
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys", json={"name": "r", "scope": "admin"}, headers=admin
    )
    revoked, revoked_id = r.json()["key"], r.json()["apiKey"]["id"]
    pinned = await api.new_key(
        owner, pid, "admin", allowedOrigins=["https://app.example.com"], rateLimitRequests=MANY
    )
    browser = await _browser_key(api, project)
    _stranger, stranger_token = await api.new_user()
    r = await api.http.delete(f"/api/projects/{pid}/api-keys/{revoked_id}", headers=admin)
    assert r.status_code == 200, r.text
    attempts: list[tuple[str, dict[str, str]]] = [
        (project.admin_key[:-4] + "abcd", {}),
        (other_key, {}),
        (revoked, {}),
        (pinned, {"Origin": "https://evil.example.com"}),
        (pinned, {}),
        (browser, {}),
        (stranger_token, {}),
    ]
    for cred, extra in attempts:
        r = await api.http.post(
            "/api/execute-sql",
            json={"projectId": pid, "query": "SELECT 1"},
            headers={**bearer(cred), **extra},
        )
        assert r.status_code in (401, 403, 404), (cred[:12], r.text)
    r = await api.http.post(f"/api/admin/projects/{pid}/suspend", headers=bearer(instance_admin["token"]))
    assert r.status_code == 200, r.text
    r = await _sql(api, project.admin_key, pid, "SELECT 1")
    assert r.status_code in (401, 403, 423, 503), r.text
    assert await _none_opened(control_db, pid) == 0


# -- 2. sqlspeed3: the prefix sent ahead of its statement ------------------------------------------

HOSTILE_PARAMS: list[tuple[str, list[Any]]] = [
    ("SELECT $1::int AS v", ["abc"]),
    ("SELECT $1::int AS v", [2**70]),
    ("SELECT $1::int AS v", [1] * 40_000),
    ("SELECT $1::int AS v", []),
    ("SELECT $1::int AS v", [True]),
    ("SELECT $1::int AS v", [{"a": 1}]),
    ("SELECT $1::int[] AS v", [[[1], [2, 3]]]),
    ("SELECT $1::int[] AS v", [[1, "a"]]),
    ("SELECT $1::int[] AS v", [[[[[[[[1]]]]]]]]),
    ("SELECT $1::text AS v", ["a\u0000b"]),
    ("SELECT $1::text AS v", ["\ud800"]),
    ("SELECT '\ud800' AS v", []),
    ("SELECT $1::numeric AS v", ["1e100000"]),
    ("SELECT $1::numeric AS v", ["NaN"]),
    ("SELECT $1::float8 AS v", [1e308]),
    ("SELECT $1::bytea AS v", ["\\xzz"]),
    ("SELECT $1::date AS v", ["2020-13-45"]),
    ("SELECT $1::timestamptz AS v", [1e300]),
    ("SELECT $1::uuid AS v", ["zzz"]),
    ("SELECT $1::inet AS v", ["300.1.1.1"]),
    ("SELECT $1::point AS v", [[1, 2]]),
    ("SELECT $1::int8range AS v", ["[1,"]),
    ("SELECT $1::interval AS v", ["P1Y"]),
    ("SELECT $1::interval AS v", [12]),
    ("SELECT $1::bit(3) AS v", ["10101"]),
    ("SELECT $1::jsonb AS v", [[1, {"a": None}]]),
    ("SELECT $1::xml AS v", ["<"]),
    ("SELECT $1::money AS v", ["abc"]),
    ("SELECT $1::oid AS v", [-1]),
    ("SELECT $1::regclass AS v", ["pg_authid"]),
    ("SELECT $1 AS v", ["x" * 2_000_000]),
    ("SELECT $1::int AS v, $2::text AS w", [1]),
    # Result values the session's codecs could not decode (numeric is text-only there; int8 was).
    ("SELECT int8range(1, 2) AS v", []),
    ("SELECT numrange(1, 2) AS v", []),
    ("SELECT ROW(1::int8, 2) AS v", []),
    ("SELECT ARRAY[ROW(1::int8)] AS v", []),
    ("SELECT x FROM wide x", []),
    ("SELECT ROW(1::int8) AS v -- " + "p" * 16_000, []),  # the explicit-transaction path
    ("SELECT $1::int8range AS v -- " + "p" * 16_000, ["[1,2)"]),
]


async def test_held_hostile_parameters_answer_documented_errors(api: Api, project: Any) -> None:
    """Parameters the driver cannot encode, the server refuses, or that do not fit the statement,
    on the pipelined path (the prefix already written when the driver refuses), and results the
    driver cannot decode: a documented error or an answer, never a 500 (the decode failures were
    500 INTERNAL_ERROR or 503 DATABASE_CONNECTION_ERROR), and the next request on the pool runs
    with its own identity."""
    pid, key = project.id, project.admin_key
    await _ok(api, key, pid, "CREATE TABLE wide (id bigint, n numeric)")
    await _ok(api, key, pid, "INSERT INTO wide VALUES (1, 2)")
    failures = []
    for query, params in HOSTILE_PARAMS:
        r = await _sql(api, key, pid, query, params)
        if r.status_code >= 500 or (r.status_code == 200 and "INTERNAL" in r.text):
            failures.append((query, str(params)[:40], r.status_code, r.text[:200]))
        r = await _sql(api, key, pid, "SELECT auth.role() AS r, 7 AS n")
        assert r.status_code == 200 and r.json()["result"]["rows"] == [{"r": "admin", "n": 7}], (
            query,
            r.text,
        )
    assert not failures, failures


async def test_held_identity_and_limits_never_cross_principals_on_pooled_sessions(
    api: Api, project: Any
) -> None:
    """Two end users of one browser key share the end-user pool's sessions; a trusted key
    asserting authUid shares the other pool. One user leaves what it can in the session (search
    path, timeouts, work_mem, an identity SET); every request, run concurrently with the others,
    answers with its own identity and the platform's limits, never the other principal's."""
    pid = project.id
    browser = await _browser_key(api, project)
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=MANY)
    a_uid, a_tok = await end_user(api, pid)
    b_uid, b_tok = await end_user(api, pid)
    probe = (
        "SELECT auth.uid()::text AS u, current_setting('statement_timeout') AS st, "
        "current_setting('search_path') AS sp, current_setting('work_mem') AS wm"
    )
    base = (await _ok(api, browser, pid, probe, token=b_tok))["result"]["rows"][0]
    assert base["u"] == b_uid, base
    for q in (
        "SET search_path TO pg_catalog",
        "SET statement_timeout = 0",
        "SET work_mem = '1GB'",
        f"SET fluxbase.auth_uid = '{b_uid}'",
        f"SELECT set_config('fluxbase.auth_uid', '{b_uid}', false)",
    ):
        r = await _sql(api, browser, pid, q, token=a_tok)
        assert r.status_code < 500, (q, r.text)

    async def one(n: int) -> None:
        if n % 3 == 0:
            r = await _sql(api, browser, pid, probe, token=a_tok)
            want = a_uid
        elif n % 3 == 1:
            r = await _sql(api, browser, pid, probe, token=b_tok)
            want = b_uid
        else:
            headers = {**bearer(rw), "Content-Type": "application/json"}
            body = {"projectId": pid, "query": probe, "authUid": f"trusted-{n}"}
            r = await api.http.post("/api/execute-sql", content=json.dumps(body).encode(), headers=headers)
            want = f"trusted-{n}"
        assert r.status_code == 200 and r.json()["success"], r.text
        row = r.json()["result"]["rows"][0]
        assert row["u"] == want, (n, row)
        assert (row["st"], row["sp"], row["wm"]) == (base["st"], base["sp"], base["wm"]), (n, row, base)

    for _ in range(3):
        await asyncio.gather(*(one(n) for n in range(24)))


async def test_held_limits_and_a_refused_key_on_the_pipelined_path(api: Api, project: Any) -> None:
    """The row cap holds on the one-round-trip path (the prefix now leaves in the statement's
    segment); a revoked key's statement never runs, whatever its cached state."""
    pid, owner = project.id, project.owner_token
    body = await _ok(api, project.admin_key, pid, "SELECT g FROM generate_series(1, 10005) g")
    assert body["result"]["truncated"] is True and len(body["result"]["rows"]) == 10_000, body["result"][
        "rowCount"
    ]
    await _ok(api, project.admin_key, pid, "CREATE TABLE marks (v int)")
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys", json={"name": "k", "scope": "readwrite"}, headers=bearer(owner)
    )
    key, key_id = r.json()["key"], r.json()["apiKey"]["id"]
    await _ok(api, key, pid, "INSERT INTO marks VALUES (1)")  # cached, its session warm
    r = await api.http.delete(f"/api/projects/{pid}/api-keys/{key_id}", headers=bearer(owner))
    assert r.status_code == 200, r.text
    for n in range(2, 6):
        r = await _sql(api, key, pid, f"INSERT INTO marks VALUES ({n})")
        assert r.status_code == 401, r.text
    rows = (await _ok(api, project.admin_key, pid, "SELECT v FROM marks ORDER BY v"))["result"]["rows"]
    assert rows == [{"v": 1}], rows


async def test_record_fields_come_back_right_or_fail(api: Api, project: Any) -> None:
    """Inside an anonymous record asyncpg hands every field its binary form, also to the session's
    JSON-faithful int8/numeric codecs: 0x3132333435363738 came back as 12345678. int8 now has one
    binary codec for columns and record fields; a numeric field comes back as PostgreSQL writes
    it, or (binary that is not UTF-8) fails with 0A000, never a wrong number."""
    pid, key = project.id, project.admin_key
    for query, right in (
        ("SELECT ROW(3544952156018063160::int8) AS v", [3544952156018063160]),
        ("SELECT ROW(1::numeric) AS v", ["1"]),
    ):
        r = await _sql(api, key, pid, query)
        assert r.status_code == 200, r.text
        body = json.loads(r.content)  # an answer that is not JSON fails here
        assert not body["success"] or body["result"]["rows"][0]["v"] in (right, [str(v) for v in right]), body
    # int8 fields: always right (big ones as strings, like columns), next to other fields.
    big = 2**53
    for n in (3544952156018063160, 12345678, -1, 0, 2**53 - 1, -(2**53 - 1), big, -big, 2**63 - 1, -(2**63)):
        row = await _ok(api, key, pid, f"SELECT ROW('{n}'::int8, 'x', '{n}'::int8) AS v, '{n}'::int8 AS c")
        want = n if abs(n) < big else str(n)
        assert row["result"]["rows"] == [{"v": [want, "x", want], "c": want}], (n, row["result"])
    # numeric fields: PostgreSQL's own text, or 0A000; the ones whose binary is UTF-8 come back.
    for text in ("1", "0", "0.00", "10000", "123", "0.0001", "100000000", "-12.50", "NaN", "200", "1e-30"):
        r = await _sql(api, key, pid, f"SELECT ROW('{text}'::numeric) AS v, '{text}'::numeric::text AS t")
        assert r.status_code == 200, r.text
        body = json.loads(r.content)
        if body["success"]:
            row = body["result"]["rows"][0]
            assert row["v"] == [row["t"]], (text, row)
        else:
            assert body["error"]["code"] == "SQL_EXEC_ERROR" and "0A000" in r.text, (text, r.text)
            assert text not in ("1", "0", "0.00", "10000", "123", "100000000"), r.text
    # Columns, arrays, parameters and ranges of int8 and numeric, unchanged or now decodable.
    body = await _ok(
        api,
        key,
        pid,
        "SELECT 9007199254740993::int8 AS a, ARRAY[1, 9007199254740993]::int8[] AS b, "
        "1.50::numeric AS c, ARRAY[0.1, 2]::numeric[] AS d, int8range(1, 5) AS e",
    )
    assert body["result"]["rows"] == [
        {
            "a": "9007199254740993",
            "b": [1, "9007199254740993"],
            "c": "1.50",
            "d": ["0.1", "2"],
            "e": {"lower": 1, "upper": 5, "lowerInc": True, "upperInc": False, "empty": False},
        }
    ], body["result"]
    for param, want in ((7, 7), ("8", 8), (9007199254740993, "9007199254740993"), (-(2**63), str(-(2**63)))):
        r = await _sql(api, key, pid, "SELECT $1::int8 AS v", [param])
        assert r.status_code == 200 and r.json()["result"]["rows"] == [{"v": want}], (param, r.text)
    for param in (1.5, 2**63, "x", [1]):
        r = await _sql(api, key, pid, "SELECT $1::int8 AS v", [param])
        assert r.status_code == 200 and r.json()["error"]["code"] == "SQL_EXEC_ERROR", (param, r.text)


async def test_held_the_deadline_ends_a_pipelined_statement_that_swallows_cancels(
    spawn: Any,
) -> None:
    """On the one-round-trip path (the prefix, with the statement_timeout it sets, now leaves in
    the statement's segment) a statement past the request deadline is ended even when it catches
    the cancel itself, its backend terminated; the next request of the key is served."""
    async with spawn(FLUXBASE_SQL_DEADLINE_MS="1500") as inst:
        api = Api(inst.url)
        try:
            _owner, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin", rateLimitRequests=MANY)
            await _ok(
                api,
                key,
                pid,
                "CREATE FUNCTION stubborn() RETURNS int LANGUAGE plpgsql AS $f$ BEGIN LOOP BEGIN "
                "PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $f$",
            )
            loop = asyncio.get_running_loop()
            for query in ("SELECT pg_sleep(10)", "SELECT stubborn()"):
                started = loop.time()
                r = await _sql(api, key, pid, query)
                took = loop.time() - started
                assert r.status_code < 500 and not r.json()["success"], r.text
                assert "57014" in r.text, r.text
                assert took < 6, (query, took)
                assert (await _ok(api, key, pid, "SELECT 1 AS one"))["result"]["rows"] == [{"one": 1}]
        finally:
            await api.close()


async def test_a_jsonb_field_of_a_record_keeps_the_answer_json(api: Api, project: Any) -> None:
    """Inside an anonymous record a jsonb field reached the session's raw-JSON codec in binary:
    its version byte went into the answer as is, and the answer was not JSON."""
    pid, key = project.id, project.admin_key
    for query, want in (
        ("""SELECT ROW('{"a": 1}'::jsonb, '[2]'::json) AS v""", [{"a": 1}, [2]]),
        ("""SELECT ARRAY[ROW('"x"'::jsonb)] AS v""", [["x"]]),
        ("""SELECT '{"b": [1, null]}'::jsonb AS v""", {"b": [1, None]}),
    ):
        r = await _sql(api, key, pid, query)
        assert r.status_code == 200, r.text
        body = json.loads(r.content)
        assert body["success"] and body["result"]["rows"] == [{"v": want}], body


async def test_held_a_parameter_the_driver_refuses_ends_its_written_prefix(api: Api, project: Any) -> None:
    """asyncpg raises its own refusal to encode a parameter as `asyncpg.DataError`, which is a
    PostgresError (SQLSTATE class 22): on the one-round-trip path it was taken for the server's
    error, so the prefix already written stayed on the wire without its Sync (joining the next
    request's transaction) and the answer said 22000, not the documented 22023. Each refusal
    now answers 22023 and ends its prefix; the key's next requests run as before."""
    pid, key = project.id, project.admin_key
    for query, params in (
        ("SELECT $1::int8 AS v", [1.5]),
        ("SELECT $1::int8 AS v", [2**63]),
        ("SELECT $1::timestamptz AS v", [1e300]),
        ("SELECT $1::interval AS v", [12]),
    ):
        r = await _sql(api, key, pid, query, params)
        assert r.status_code == 200, r.text
        error = r.json()["error"]
        assert error["code"] == "SQL_EXEC_ERROR" and error["details"] == "ERROR:  22023", (query, r.text)
        # The explicit-transaction path (a statement too long to pipeline) answers the same.
        r = await _sql(api, key, pid, query + " -- " + "p" * 16_000, params)
        assert r.status_code == 200 and r.json()["error"]["details"] == "ERROR:  22023", (query, r.text)
        body = await _ok(
            api, key, pid, "SELECT auth.role() AS r, current_setting('transaction_read_only') AS ro"
        )
        assert body["result"]["rows"] == [{"r": "admin", "ro": "off"}], body["result"]
