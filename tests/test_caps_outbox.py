"""Resource caps that hold against invisible SETs, and outbox bytes counted as the project's
(issue 15; docs/security.md, "Resource caps" and "Outbox bytes").

The caps: a project admin runs plpgsql, whose dynamic `EXECUTE 'SET …'` and `ALTER ROLE
CURRENT_USER SET …` the classifier cannot see. Every request's transaction therefore starts with
the caps asserted (SET LOCAL), each later statement of a batch too, and routine SET clauses that
would carry a resource setting into every call are refused, also when built dynamically (an
event trigger). The outbox: capture events are bytes of the project's, counted in its database
size and refused over its cap, and one event's row images are bounded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from fluxbase.services import realtime
from support import Api, assert_error, bearer
from test_attack_review1 import batch, sql

CAP = "16MB"  # the default per-role work_mem cap (FLUXBASE_TENANT_WORK_MEM_KB = 16384)


async def _work_mem_and_backend(api: Api, key: str, pid: str) -> tuple[str, int]:
    body = await sql(
        api, key, pid, "SELECT current_setting('work_mem') AS w, pg_backend_pid() AS b, pg_sleep(0.3) AS s"
    )
    assert body["success"], body
    row = body["result"]["rows"][0]
    return row["w"], row["b"]


async def test_role_defaults_set_from_plpgsql_do_not_lift_the_caps(api: Api, project: Any) -> None:
    pid, key = project.id, project.admin_key
    before = {b for _, b in await asyncio.gather(*(_work_mem_and_backend(api, key, pid) for _ in range(3)))}
    body = await sql(
        api,
        key,
        pid,
        "DO $$ BEGIN EXECUTE 'ALTER ROLE CURRENT_USER SET work_mem = ''4GB'''; "
        "EXECUTE 'ALTER ROLE CURRENT_USER SET hash_mem_multiplier = 1000'; END $$",
    )
    assert body["success"], body  # PostgreSQL lets any role change its own defaults
    # More requests at once than idle connections: some run on backends opened after the change.
    seen = await asyncio.gather(*(_work_mem_and_backend(api, key, pid) for _ in range(8)))
    assert {b for _, b in seen} - before, "no new backend was opened"
    assert {w for w, _ in seen} == {CAP}, seen
    body = await sql(api, key, pid, "SELECT current_setting('hash_mem_multiplier') AS h")
    assert body["result"]["rows"][0]["h"] == "2", body


async def test_batch_statements_keep_visible_set_local_and_lose_invisible_ones(
    api: Api, project: Any
) -> None:
    pid, key = project.id, project.admin_key
    body = await batch(
        api,
        key,
        pid,
        [
            "SET LOCAL work_mem = '1MB'",
            "SET LOCAL statement_timeout = '2s'",
            "DO $$ BEGIN EXECUTE 'SET LOCAL work_mem = ''4GB'''; "
            "EXECUTE 'SET LOCAL statement_timeout = 0'; EXECUTE 'SET maintenance_work_mem = ''4GB'''; END $$",
            "SELECT current_setting('work_mem') AS w, current_setting('statement_timeout') AS t, "
            "current_setting('maintenance_work_mem') AS m",
            "RESET work_mem",
            "SELECT current_setting('work_mem') AS w",
        ],
    )
    assert body["success"], body
    assert body["results"][3]["rows"] == [{"w": "1MB", "t": "2s", "m": "64MB"}], body
    assert body["results"][5]["rows"] == [{"w": CAP}], body


async def test_routine_set_clauses_of_resource_settings_are_refused_even_when_built_in_plpgsql(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    pid, key = project.id, project.admin_key
    assert (await sql(api, key, pid, "CREATE FUNCTION plain() RETURNS int LANGUAGE sql AS 'SELECT 1'"))[
        "success"
    ]
    for q in (
        "CREATE FUNCTION f() RETURNS text LANGUAGE sql SET work_mem FROM CURRENT AS 'SELECT 1::text'",
        "CREATE FUNCTION f() RETURNS text LANGUAGE sql SET work_mem = '1MB' AS 'SELECT 1::text'",
        "ALTER FUNCTION plain() SET maintenance_work_mem = '1MB'",
        "DO $$ BEGIN EXECUTE 'CREATE FUNCTION g() RETURNS text LANGUAGE sql SET work_mem = ''4GB'' "
        "AS ''SELECT current_setting(''''work_mem'''')'''; END $$",
        "DO $$ BEGIN EXECUTE 'ALTER FUNCTION plain() SET work_mem = ''4GB'''; END $$",
        "DO $$ BEGIN EXECUTE 'ALTER ROUTINE plain() SET hash_mem_multiplier = 1000'; END $$",
        "DO $$ BEGIN EXECUTE 'CREATE PROCEDURE pg_temp.p() LANGUAGE sql SET fluxbase.auth_uid = ''x'' "
        "AS ''SELECT 1'''; END $$",
    ):
        body = await sql(api, key, pid, q)
        assert not body["success"], (q, body)
    # (Observed as the platform: pg_proc.proconfig is closed to tenants, sql/0021.)
    configs = await control_db.fetch(
        "SELECT p.proconfig FROM pg_proc p WHERE p.proname IN ('plain', 'f', 'g') "
        "AND p.pronamespace = $1::regnamespace",
        f"p_{pid}",
    )
    assert [dict(r) for r in configs] == [{"proconfig": None}], configs
    # Other settings in routine SET clauses stay allowed (search_path is the usual one).
    body = await sql(api, key, pid, "ALTER FUNCTION plain() SET search_path = pg_catalog")
    assert body["success"], body


# -- outbox bytes ------------------------------------------------------------------------------


BIG = "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, {n}) g)"


async def _forging_table(api: Api, key: str, pid: str, chars: int) -> None:
    """A table whose BEFORE trigger stores nothing in it and hands write_events a `chars`-long
    image instead: bytes only the outbox holds."""
    big = BIG.format(n=chars // 32)
    for q in (
        "CREATE TABLE src (v text)",
        "CREATE FUNCTION stuff() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
        f"PERFORM fluxbase_capture.write_events('src'::regclass, 'INSERT', "
        f"ARRAY[pg_catalog.jsonb_build_object('v', {big})], NULL); RETURN NULL; END $f$",
        "CREATE TRIGGER stuff BEFORE INSERT ON src FOR EACH ROW EXECUTE FUNCTION stuff()",
    ):
        assert (await sql(api, key, pid, q))["success"], q


async def _used(api: Api, pid: str, key: str) -> int:
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    assert r.status_code == 200, r.text
    return int(r.json()["quotas"]["databaseUsedBytes"])


async def _outbox(control_db: asyncpg.Pool, pid: str) -> int:
    return int(
        await control_db.fetchval(
            "SELECT coalesce(sum(pg_column_size(record)), 0) FROM fluxbase.events WHERE project_id = $1", pid
        )
    )


async def test_outbox_bytes_count_in_the_database_size_and_over_the_cap_fail_the_write(
    api: Api, project: Any, instance_admin: dict[str, Any], control_db: asyncpg.Pool
) -> None:
    pid, key = project.id, project.admin_key
    await _forging_table(api, key, pid, 200_000)
    used = await _used(api, pid, key)
    body = await sql(api, key, pid, "INSERT INTO src SELECT 'x' FROM generate_series(1, 4)")
    assert body["success"], body
    grown = await _used(api, pid, key) - used
    assert grown >= 4 * 200_000, grown  # outbox bytes are the project's

    cap = await _used(api, pid, key) + 300_000
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"databaseBytes": cap},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    stored = await _outbox(control_db, pid)
    r = await api.http.post(
        "/api/execute-sql",
        json={"projectId": pid, "query": "INSERT INTO src SELECT 'x' FROM generate_series(1, 4)"},
        headers=bearer(key),
    )
    assert_error(r, 413, "DATABASE_QUOTA_EXCEEDED")
    assert await _outbox(control_db, pid) == stored  # nothing half-applied
    # A batch: the same, and its earlier statements are rolled back with it.
    r = await api.http.post(
        "/api/execute-batch",
        json={
            "projectId": pid,
            "statements": [
                {"query": "INSERT INTO src VALUES ('a')"},
                {"query": "INSERT INTO src VALUES ('b')"},
            ],
        },
        headers=bearer(key),
    )
    assert_error(r, 413, "DATABASE_QUOTA_EXCEEDED")
    assert await _outbox(control_db, pid) == stored
    # One event under the cap still passes.
    assert (await sql(api, key, pid, "INSERT INTO src VALUES ('c')"))["success"]


async def test_one_event_is_bounded_and_a_large_row_is_still_written(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    pid, key = project.id, project.admin_key
    assert (await sql(api, key, pid, "CREATE TABLE docs (id int PRIMARY KEY, title text, body text)"))[
        "success"
    ]
    body = await sql(api, key, pid, f"INSERT INTO docs VALUES (1, 'big', {BIG.format(n=50_000)})")
    assert body["success"], body  # 1.6 MB: the row is the tenant's, the event is bounded
    rows = await control_db.fetch(
        "SELECT record, pg_column_size(record) AS n FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = 'docs' AND kind = 'row'",
        pid,
    )
    assert len(rows) == 1 and rows[0]["n"] < 1_048_576, rows
    assert rows[0]["record"] == '{"id": 1, "title": "big"}', rows  # the small columns stay
    # The forged path is bounded the same way.
    await _forging_table(api, key, pid, 2_000_000)
    assert (await sql(api, key, pid, "INSERT INTO src VALUES ('x')"))["success"]
    n = await control_db.fetchval(
        "SELECT max(pg_column_size(record)) FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = 'src'",
        pid,
    )
    assert n < 1_048_576, n


async def test_trimming_the_outbox_gives_its_bytes_back(spawn: Any, stack: Any) -> None:
    # An instance of its own: trimming takes every project's finished events, and an enabled
    # webhook of another test would hold it back.
    async with spawn() as inst:
        api = Api(inst.url)
        db = await asyncpg.create_pool(stack.database_url(inst.dbname), min_size=1, max_size=2)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
            await _forging_table(api, key, pid, 200_000)
            used = await _used(api, pid, key)
            assert (await sql(api, key, pid, "INSERT INTO src SELECT 'x' FROM generate_series(1, 3)"))[
                "success"
            ]
            await realtime.count_outbox_bytes(db)  # folded into the per-project counter
            assert (await sql(api, key, pid, "INSERT INTO src SELECT 'x' FROM generate_series(1, 2)"))[
                "success"
            ]
            full = await _used(api, pid, key)
            assert full - used >= 5 * 200_000, (used, full)
            # Trim everything finished: the folded and the not yet folded events alike.
            await realtime.trim_events(db, max_age_s=0, max_rows=0)
            assert await _outbox(db, pid) == 0
            after = await _used(api, pid, key)
            assert abs(after - used) < 50_000, (used, full, after)
            await realtime.count_outbox_bytes(db)
            assert await _used(api, pid, key) == after
        finally:
            await db.close()
            await api.close()


async def test_deleting_over_the_cap_writes_its_delete_events_but_forged_ones_are_refused(
    api: Api, project: Any, instance_admin: dict[str, Any], control_db: asyncpg.Pool
) -> None:
    pid, key = project.id, project.admin_key
    for q in (
        "CREATE TABLE rows (id int PRIMARY KEY, v text)",
        "INSERT INTO rows SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 300) g",
        "CREATE TABLE fake (v text)",
        "INSERT INTO fake VALUES ('one')",
        "CREATE FUNCTION forge() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN "
        "PERFORM fluxbase_capture.write_events('fake'::regclass, 'DELETE', "
        f"ARRAY[pg_catalog.jsonb_build_object('v', {BIG.format(n=6_000)})], NULL); RETURN NULL; END $f$",
        "CREATE TRIGGER forge BEFORE DELETE ON fake FOR EACH ROW EXECUTE FUNCTION forge()",
    ):
        assert (await sql(api, key, pid, q))["success"], q
    cap = await _used(api, pid, key) - 1  # over the cap from here on
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"databaseBytes": cap},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    assert_error(await api.sql(key, pid, "INSERT INTO rows VALUES (0, 'x')"), 413, "DATABASE_QUOTA_EXCEEDED")
    # A DELETE event per deleted row (its record and old image) is what deleting must write.
    body = await sql(api, key, pid, "DELETE FROM rows WHERE id <= 200")
    assert body["success"], body
    deletes = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND table_name = 'rows' "
        "AND operation = 'DELETE'",
        pid,
    )
    assert deletes == 200
    # A BEFORE trigger that deletes nothing but hands write_events a DELETE event earns nothing.
    stored = await _outbox(control_db, pid)
    assert_error(await api.sql(key, pid, "DELETE FROM fake"), 413, "DATABASE_QUOTA_EXCEEDED")
    assert await _outbox(control_db, pid) == stored


async def test_batch_reassertion_rides_with_each_statement(api: Api, project: Any) -> None:
    """The identity and caps go out in the statement's own round trip (tenancy.session.Tx.run):
    also for a statement too long to be prepared by name, a later statement whose parameters the
    driver refuses, and a later statement cut at the row cap."""
    pid, key = project.id, project.admin_key
    raise_it = "DO $$ BEGIN EXECUTE 'SET LOCAL work_mem = ''4GB'''; END $$"
    long_probe = "SELECT current_setting('work_mem') AS w -- " + "x" * 16_000
    body = await batch(
        api, key, pid, [raise_it, long_probe, raise_it, "SELECT current_setting('work_mem') AS w"]
    )
    assert body["success"], body
    assert [r["rows"] for r in body["results"][1::2]] == [[{"w": CAP}], [{"w": CAP}]], body
    r = await api.http.post(
        "/api/execute-batch",
        json={
            "projectId": pid,
            "statements": [{"query": raise_it}, {"query": "SELECT $1::int4 AS n", "params": [2**40]}],
        },
        headers=bearer(key),
    )
    assert not r.json()["success"] and "int32" in r.json()["error"]["message"], r.text  # SQL envelope
    # The connection is still good for the next requests.
    for _ in range(3):
        assert (await batch(api, key, pid, ["SELECT 1 AS one", "SELECT 2 AS two"]))["results"][1]["rows"] == [
            {"two": 2}
        ]
    many = "SELECT g FROM generate_series(1, 100000) g"
    body = await batch(api, key, pid, [many, many])
    first, second = body["results"]
    assert {k: v for k, v in first.items() if k != "rows"} == {
        k: v for k, v in second.items() if k != "rows"
    }, body
