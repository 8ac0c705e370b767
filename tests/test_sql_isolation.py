"""Hostile SQL from project A's keys reaches nothing of project B, the control plane or the server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from support import Api

HOSTILE = [
    # role switching
    "SET ROLE p_{b}_admin",
    "SET ROLE postgres",
    "SELECT set_config('role', 'p_{b}_admin', false)",
    "SELECT set_config('role', 'postgres', true)",
    "SET SESSION AUTHORIZATION postgres",
    "SET SESSION AUTHORIZATION p_{b}_admin",
    # other schemas and the control plane
    "SELECT * FROM p_{b}.secrets",
    "INSERT INTO p_{b}.secrets VALUES ('pwned')",
    "SELECT * FROM fluxbase.users",
    "SELECT key_hash FROM fluxbase.api_keys",
    "UPDATE fluxbase.projects SET status = 'active'",
    "CREATE TABLE public.planted (id int)",
    "CREATE TABLE fluxbase.planted (id int)",
    "CREATE FUNCTION auth.uid() RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$",
    "CREATE OR REPLACE FUNCTION auth.uid() RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$",
    "ALTER SCHEMA p_{b} RENAME TO stolen",
    "DROP SCHEMA p_{b} CASCADE",
    # files and programs
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_ls_dir('.')",
    "COPY (SELECT 1) TO '/tmp/fluxbase-pwned'",
    "COPY secrets FROM PROGRAM 'id'",
    "SELECT lo_import('/etc/passwd')",
    "CREATE EXTENSION dblink",
    "CREATE EXTENSION file_fdw",
    "LOAD 'plpgsql'",
    # roles and grants
    "CREATE ROLE evil LOGIN SUPERUSER",
    "CREATE ROLE evil",
    "ALTER ROLE p_{a}_admin SUPERUSER",
    "ALTER ROLE p_{a}_rw CONNECTION LIMIT -1",
    "ALTER ROLE p_{a}_admin SET temp_file_limit = -1",
    "GRANT p_{b}_admin TO p_{a}_admin",
    "GRANT ALL ON SCHEMA p_{b} TO p_{a}_admin",
    "CREATE DATABASE evil",
    "ALTER SYSTEM SET fsync = off",
    "SET temp_file_limit = -1",
    # signalling other backends
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename <> current_user",
    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename <> current_user",
    "SELECT pg_reload_conf()",
    # transaction-control smuggling and multiple statements
    "COMMIT",
    "ROLLBACK",
    "BEGIN",
    "END",
    "  /* hidden */ -- comment\n COMMIT AND CHAIN",
    "(( ; COMMIT",
    "SAVEPOINT s1",
    "PREPARE TRANSACTION 'x'",
    "SELECT 1; SELECT * FROM p_{b}.secrets",
    "SELECT 1; COMMIT; SELECT 2",
    "DO $$ BEGIN COMMIT; END $$",
    # session state
    "PREPARE p AS SELECT 1",
    "DISCARD ALL",
    "LISTEN chan",
    "COPY secrets TO STDOUT",
]


@pytest.fixture
async def two_projects(api: Api):
    _, token_a = await api.new_user()
    _, token_b = await api.new_user()
    a = await api.new_project(token_a)
    b = await api.new_project(token_b)
    key_a = await api.new_key(token_a, a, rateLimitRequests=100_000)
    key_b = await api.new_key(token_b, b)
    assert (await api.sql(key_a, a, "CREATE TABLE secrets (v text)")).json()["success"]
    assert (await api.sql(key_b, b, "CREATE TABLE secrets (v text)")).json()["success"]
    assert (await api.sql(key_b, b, "INSERT INTO secrets VALUES ('b-secret')")).json()["success"]
    return a, b, key_a, key_b


@contextlib.asynccontextmanager
async def _own_project(
    spawn: Any, key_settings: dict[str, Any] | None = None, **env: str
) -> AsyncIterator[tuple[Any, Api, str, str]]:
    """A server process of its own (`env` overrides) with a user, a project and an admin key."""
    async with spawn(**env) as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            yield inst, api, pid, await api.new_key(token, pid, **(key_settings or {}))
        finally:
            await api.close()


async def test_hostile_statements_all_fail_and_change_nothing(api: Api, two_projects, control_db) -> None:
    a, b, key_a, key_b = two_projects
    before_roles = await control_db.fetch(
        "SELECT rolname, rolsuper, rolconnlimit, rolconfig FROM pg_roles ORDER BY rolname"
    )
    for template in HOSTILE:
        q = template.format(a=a, b=b)
        r = await api.sql(key_a, a, q)
        assert r.status_code == 200, (q, r.text)
        body = r.json()
        assert body["success"] is False, f"hostile statement succeeded: {q!r} -> {body}"
        assert "b-secret" not in r.text
    # Nothing changed: B's data, roles, schemas, the control plane.
    rows = (await api.sql(key_b, b, "SELECT v FROM secrets")).json()["result"]["rows"]
    assert rows == [{"v": "b-secret"}]
    after_roles = await control_db.fetch(
        "SELECT rolname, rolsuper, rolconnlimit, rolconfig FROM pg_roles ORDER BY rolname"
    )
    assert before_roles == after_roles
    assert await control_db.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 'planted'") == 0
    assert await control_db.fetchval("SELECT auth.uid()") is None


async def test_set_role_to_own_other_scopes_is_refused(api: Api, project) -> None:
    ro = await api.new_key(project.owner_token, project.id, "read")
    await api.sql(project.admin_key, project.id, "CREATE TABLE t (id int)")
    for q in (
        f"SET ROLE p_{project.id}_admin",
        f"SELECT set_config('role', 'p_{project.id}_admin', true)",
        "RESET ROLE; INSERT INTO t VALUES (1)",
    ):
        assert (await api.sql(ro, project.id, q)).json()["success"] is False
    # RESET ROLE is refused as a role switch (tenancy.statements); it would leave the session
    # user anyway: still read-only.
    assert (await api.sql(ro, project.id, "RESET ROLE")).json()["error"]["details"] == "ERROR:  42501"
    assert (await api.sql(ro, project.id, "INSERT INTO t VALUES (1)")).json()["success"] is False
    body = (await api.sql(ro, project.id, "SELECT session_user AS s, current_user AS c")).json()
    assert body["result"]["rows"] == [{"s": f"p_{project.id}_ro", "c": f"p_{project.id}_ro"}]


async def test_commit_smuggling_cannot_drop_identity(api: Api, project) -> None:
    for q in ("COMMIT", "COMMIT AND CHAIN", "ROLLBACK AND CHAIN", "END"):
        body = (await api.sql(project.admin_key, project.id, q, authUid="user-1")).json()
        assert body["success"] is False and body["error"]["details"] == "ERROR:  0A000"
    body = (await api.sql(project.admin_key, project.id, "SELECT auth.uid() AS u", authUid="user-1")).json()
    assert body["result"]["rows"] == [{"u": "user-1"}]


async def test_no_state_leaks_between_requests(spawn) -> None:
    # One tenant connection only, so every request reuses the same backend.
    async with _own_project(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_, api, pid, key):

        async def one(q: str, **kw) -> dict:
            return (await api.sql(key, pid, q, **kw)).json()

        pid1 = (await one("SELECT pg_backend_pid() AS p"))["result"]["rows"][0]["p"]
        # Session settings within the per-role caps are allowed (above them: refused, below).
        assert (await one("SET statement_timeout = '3s'"))["success"]
        assert (await one("SET work_mem = '1MB'"))["success"]
        # set_config of the identity is refused as a statement; an admin's plpgsql function can still.
        assert not (await one("SELECT set_config('fluxbase.auth_uid', 'forged', false)"))["success"]
        forge = (
            "CREATE FUNCTION forge() RETURNS text LANGUAGE plpgsql "
            "AS $$ BEGIN RETURN set_config('fluxbase.auth_uid', 'forged', false); END $$"
        )
        assert (await one(forge))["success"]
        assert (await one("SELECT forge()"))["success"]
        assert (await one("SELECT pg_advisory_lock(42)"))["success"]
        assert (await one("DECLARE c CURSOR WITH HOLD FOR SELECT 1"))["success"]
        assert (await one("CREATE TEMP TABLE tmp_leak (id int)"))["success"]
        # Transaction defaults: a one-round-trip request's transaction starts before its
        # session reset runs, so these must be caught too (sql/0011, FXRST).
        assert (await one("SET default_transaction_isolation = 'serializable'"))["success"]
        assert (await one("SET default_transaction_read_only = on"))["success"]
        # One-round-trip path (no advisory-lock text in the statement).
        body = await one("""SELECT pg_backend_pid() AS p,
                            current_setting('transaction_isolation') AS iso,
                            current_setting('transaction_read_only') AS ro,
                            current_setting('work_mem') AS wm,
                            auth.uid() AS uid, to_regclass('pg_temp.tmp_leak') IS NULL AS no_temp""")
        row = body["result"]["rows"][0]
        assert row == {
            "p": pid1,
            "iso": "read committed",
            "ro": "off",
            "wm": row["wm"],
            "uid": None,
            "no_temp": True,
        }
        assert row["wm"] != "1MB"
        # The WITH HOLD cursor is gone too (pg_cursors is not readable by tenants: sql/0013).
        assert (await one("FETCH c"))["error"]["details"] == "ERROR:  34000"
        # A session lock taken inside a function (no lock text in the request) is gone by the
        # next request on the connection.
        assert (
            await one(
                "CREATE FUNCTION take_lock() RETURNS void LANGUAGE sql AS 'SELECT pg_advisory_lock(43)'"
            )
        )["success"]
        assert (await one("SELECT take_lock()"))["success"]
        body = await one(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype::text LIKE 'adv%' AND pid = pg_backend_pid()"
        )
        assert body["result"]["rows"] == [{"n": 0}]
        assert (await one("SET default_transaction_isolation = 'repeatable read'"))["success"]
        assert (await one("CREATE TEMP TABLE tmp_leak (id int)"))["success"]
        body = await one("""SELECT pg_backend_pid() AS p, current_setting('statement_timeout') AS st,
                            current_setting('work_mem') AS wm, auth.uid() AS uid,
                            (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                              AND pid = pg_backend_pid()) AS locks,
                            to_regclass('pg_temp.tmp_leak') IS NULL AS no_temp""")
        row = body["result"]["rows"][0]
        assert row["p"] == pid1  # same backend, so the checks below are meaningful
        assert row["st"] != "3s" and row["wm"] != "1MB"
        assert row["uid"] is None and row["locks"] == 0 and row["no_temp"] is True


async def test_deadline_cancels_even_with_statement_timeout_disabled(spawn) -> None:
    async with _own_project(spawn, FLUXBASE_SQL_DEADLINE_MS="1500") as (inst, api, pid, key):
        t0 = time.monotonic()
        body = (await api.sql(key, pid, "SELECT pg_sleep(30)")).json()
        assert time.monotonic() - t0 < 6
        assert body["success"] is False and body["error"]["code"] == "QUERY_TIMEOUT"
        # A plpgsql loop that swallows cancellation is terminated too.
        await api.sql(
            key,
            pid,
            """CREATE FUNCTION stubborn() RETURNS void LANGUAGE plpgsql AS $$
            BEGIN LOOP BEGIN PERFORM pg_sleep(0.2);
            EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP;
            END $$""",
        )
        t0 = time.monotonic()
        body = (await api.sql(key, pid, "SELECT stubborn()")).json()
        assert time.monotonic() - t0 < 8
        assert body["error"]["code"] == "QUERY_TIMEOUT"
        # The project still works afterwards and no backend of its roles is left busy.
        assert (await api.sql(key, pid, "SELECT 1 AS one")).json()["result"]["rows"] == [{"one": 1}]
        await asyncio.sleep(0.5)
        # (Tenants cannot read pg_stat_activity, sql/0013: look from a platform connection.)
        control = await asyncpg.connect(inst.env["FLUXBASE_DATABASE_URL"])
        try:
            busy = await control.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE $1 AND state = 'active'",
                f"p_{pid}_%",
            )
        finally:
            await control.close()
        assert busy == 0


async def test_deadline_counts_from_each_request_on_a_reused_connection(spawn) -> None:
    """One deadline timer per tenant connection (session.Deadline): when the timer an earlier
    request armed fires during a later one on the same session, the later one runs on until
    its own deadline, and is cancelled then."""
    async with _own_project(spawn, FLUXBASE_SQL_DEADLINE_MS="1500") as (_inst, api, pid, key):

        async def backend(query: str) -> tuple[dict[str, Any], float]:
            t0 = time.monotonic()
            body = (await api.sql(key, pid, query)).json()
            return body, time.monotonic() - t0

        first, _ = await backend("SELECT pg_backend_pid() AS p")
        await asyncio.sleep(1.0)
        # Armed by the first request, the timer fires 0.5 s into this one: it must wait on for
        # this request's own deadline (1.5 s after it began), then cancel it.
        second, took = await backend("SELECT pg_backend_pid() AS p FROM pg_sleep(30)")
        assert second["success"] is False and second["error"]["code"] == "QUERY_TIMEOUT"
        assert 1.3 <= took < 6
        third, _ = await backend("SELECT pg_backend_pid() AS p FROM pg_sleep(0.5)")
        assert third["success"] is True, third
        assert third["result"]["rows"] != first["result"]["rows"]  # the timed-out session is gone


async def test_held_locks_do_not_outlive_the_request(api: Api, project) -> None:
    await api.sql(project.admin_key, project.id, "CREATE TABLE lk (id int)")
    assert (await api.sql(project.admin_key, project.id, "LOCK TABLE lk IN ACCESS EXCLUSIVE MODE")).json()[
        "success"
    ]
    # If the lock leaked, this would wait for lock_timeout and fail.
    assert (await api.sql(project.admin_key, project.id, "INSERT INTO lk VALUES (1)")).json()["success"]


async def test_one_project_saturating_its_pool_does_not_block_another(spawn) -> None:
    async with spawn(FLUXBASE_TENANT_POOL_MAX="2", FLUXBASE_SQL_DEADLINE_MS="4000") as inst:
        api = Api(inst.url)
        try:
            _, ta = await api.new_user()
            _, tb = await api.new_user()
            a, b = await api.new_project(ta), await api.new_project(tb)
            ka, kb = await api.new_key(ta, a), await api.new_key(tb, b)
            hogs = [asyncio.create_task(api.sql(ka, a, "SELECT pg_sleep(3)")) for _ in range(4)]
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            r = await api.sql(kb, b, "SELECT 1 AS one")
            assert r.json()["result"]["rows"] == [{"one": 1}] and time.monotonic() - t0 < 1.5
            await asyncio.gather(*hogs)
        finally:
            await api.close()


async def test_role_connection_cap_holds(api: Api, project, control_db) -> None:
    limits = await control_db.fetch(
        "SELECT rolname, rolconnlimit FROM pg_roles WHERE rolname LIKE $1", f"p_{project.id}_%"
    )
    assert limits and all(0 < r["rolconnlimit"] <= 100 for r in limits)


async def test_forged_notify_and_pg_notify_are_harmless(api: Api, project) -> None:
    # NOTIFY cannot be restricted in PostgreSQL; it must simply not break anything.
    for q in ("SELECT pg_notify('fluxbase_events', 'forged')", "NOTIFY fluxbase_events, 'forged'"):
        r = await api.sql(project.admin_key, project.id, q)
        assert r.status_code == 200 and r.json()["success"] is True, r.text
    # The pooled connection is reset and keeps serving the project.
    body = (await api.sql(project.admin_key, project.id, "SELECT 1 AS one")).json()
    assert body["result"]["rows"] == [{"one": 1}]


async def test_one_connection_pool_gives_its_slot_back_after_every_kind_of_end(spawn) -> None:
    """tenancy.pools.TenantPool with a single slot: a backend terminated at the deadline, one killed
    from outside and plain releases all leave the slot usable; a waiter gets the released one."""
    async with _own_project(
        spawn, {"rateLimitRequests": 1_000_000}, FLUXBASE_TENANT_POOL_MAX="1", FLUXBASE_SQL_DEADLINE_MS="1500"
    ) as (inst, api, pid, key):

        async def one(q: str) -> dict:
            return (await api.sql(key, pid, q)).json()

        assert (await one("SELECT pg_sleep(10)"))["error"]["code"] == "QUERY_TIMEOUT"
        assert (await one("SELECT 1 AS x"))["result"]["rows"] == [{"x": 1}]
        # Two at once on one slot: the second waits for the first's release.
        slow, fast = await asyncio.gather(one("SELECT pg_sleep(0.5) AS s"), one("SELECT 2 AS x"))
        assert slow["success"] and fast["result"]["rows"] == [{"x": 2}]
        # The idle connection's backend is killed from outside: at most one request notices
        # (503, nothing reported as done), then a new connection takes the slot.
        backend = (await one("SELECT pg_backend_pid() AS p"))["result"]["rows"][0]["p"]
        control = await asyncpg.connect(inst.env["FLUXBASE_DATABASE_URL"])
        try:
            await control.execute("SELECT pg_terminate_backend($1)", backend)
        finally:
            await control.close()
        await asyncio.sleep(0.3)
        first = await api.sql(key, pid, "SELECT 3 AS x")
        assert first.status_code == 503 or first.json()["result"]["rows"] == [{"x": 3}]
        for _ in range(5):
            assert (await one("SELECT 4 AS x"))["result"]["rows"] == [{"x": 4}]


async def test_session_lock_from_a_one_round_trip_request_is_released_when_idle(spawn) -> None:
    """A session advisory lock taken inside a function (the request text names no lock, so it
    takes the one-round-trip path, whose reset runs at the start of the next request) is released
    shortly after the request even if no other request comes (tenancy.pools.IDLE_RESET_S)."""
    async with _own_project(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, key):
        assert (await api.sql(key, pid, _GRAB)).json()["success"]
        assert (await api.sql(key, pid, "SELECT grab()")).json()["success"]
        assert await _advisory_locks_left(inst, pid) == 0
        # ...and the connection is still the pool's, clean, for the next request.
        body = (await api.sql(key, pid, "SELECT current_setting('work_mem') AS wm")).json()
        assert body["success"]


async def test_idle_reset_waits_for_the_last_request_of_a_busy_connection(spawn) -> None:
    """A connection has one idle-reset timer at a time (tenancy.pools.TenantPool.release): a
    request that ends while the timer of an earlier one is pending still gets its session reset
    once the connection is idle (the timer, finding it used since, waits for the rest)."""
    async with _own_project(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, key):
        assert (await api.sql(key, pid, _GRAB)).json()["success"]
        await asyncio.sleep(0.5)  # that request's own timer has fired
        for _ in range(3):  # back to back: each ends while the first one's timer is pending
            assert (await api.sql(key, pid, "SELECT 1")).json()["success"]
        assert (await api.sql(key, pid, "SELECT grab()")).json()["success"]
        assert await _advisory_locks_left(inst, pid) == 0


_GRAB = "CREATE FUNCTION grab() RETURNS void LANGUAGE sql AS 'SELECT pg_advisory_lock(77)'"


async def _advisory_locks_left(inst: Any, pid: str, within_s: float = 3.0) -> int:
    """The project's session advisory locks, polled until none is left or `within_s` passed."""
    held = (
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND a.usename LIKE $1"
    )
    control = await asyncpg.connect(inst.env["FLUXBASE_DATABASE_URL"])
    try:
        n = -1
        for _ in range(int(within_s / 0.1)):
            n = await control.fetchval(held, f"p_{pid}_%")
            if n == 0:
                break
            await asyncio.sleep(0.1)
        return n
    finally:
        await control.close()


ROLES_OF = """SELECT a.rolname, r.rolconfig, a.rolpassword FROM pg_authid a JOIN pg_roles r USING (oid)
               WHERE a.rolname LIKE $1 ORDER BY 1"""


async def test_tenant_roles_cannot_alter_themselves_or_take_more_than_their_share(
    api: Api, project, control_db
) -> None:
    """Issue 15 finding 5: `ALTER ROLE CURRENT_USER ...` succeeded (a password or setting that
    breaks every new connection of the project and scope), `SET work_mem = '8GB'` overrode the
    per-role cap, and `lo_from_bytea` stored data outside the schema and its quota."""
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    before = await control_db.fetch(ROLES_OF, f"p_{pid}_%")
    refused = [
        "ALTER ROLE CURRENT_USER SET search_path = nowhere",
        "ALTER ROLE CURRENT_USER PASSWORD 'chosen-by-tenant'",
        "ALTER USER CURRENT_USER SET work_mem = '8GB'",
        f"--\rALTER ROLE p_{pid}_admin SET statement_timeout = 0",
        "ALTER ROLE CURRENT_USER RESET ALL",
        f"ALTER DATABASE {await control_db.fetchval('SELECT current_database()')} SET work_mem = '8GB'",
        "SET work_mem = '8GB'",
        "SET LOCAL work_mem = 8388608",
        "SET maintenance_work_mem = '4GB'",
        "SET hash_mem_multiplier = 1000",
        "SET temp_file_limit = -1",
        "SET statement_timeout = 0",
        "SET lock_timeout = '1h'",
        "SET idle_in_transaction_session_timeout = 0",
        "SELECT set_config('work_mem', '8GB', false)",
        "SELECT pg_catalog.set_config('statement_timeout', '0', true)",
        "CREATE FUNCTION hog() RETURNS int LANGUAGE sql SET work_mem = '8GB' AS 'SELECT 1'",
        "SELECT lo_from_bytea(0, 'outside the quota')",
        "SELECT lo_create(0)",
        "SELECT lo_put(lo_creat(-1), 0, 'x')",
    ]
    for key in (project.admin_key, rw):
        for q in refused:
            body = (await api.sql(key, pid, q)).json()
            assert body["success"] is False, f"{q!r} -> {body}"
            assert body["error"]["code"] == "SQL_EXEC_ERROR", body
    after = await control_db.fetch(ROLES_OF, f"p_{pid}_%")
    assert before == after
    assert await control_db.fetchval("SELECT count(*) FROM pg_largeobject_metadata") == 0
    # A plpgsql function hides the large-object call from the classifier: privileges refuse it.
    hidden = (
        "CREATE FUNCTION stash() RETURNS oid LANGUAGE plpgsql "
        "AS $$ BEGIN RETURN lo_from_bytea(0, 'x'); END $$"
    )
    assert (await api.sql(project.admin_key, pid, hidden)).json()["success"]
    body = (await api.sql(project.admin_key, pid, "SELECT stash()")).json()
    assert body["success"] is False and body["error"]["details"] == "ERROR:  42501", body
    assert await control_db.fetchval("SELECT count(*) FROM pg_largeobject_metadata") == 0
    # Settings within the caps stay allowed, and end with the request.
    for q in ("SET LOCAL work_mem = '1MB'", "SET statement_timeout = '2s'", "SET lock_timeout = 1000"):
        body = (await api.sql(rw, pid, q)).json()
        assert body["success"], (q, body)


async def test_end_user_traffic_does_not_share_sessions_with_server_keys(spawn) -> None:
    """Requests carrying an end user's token run on connections of their own: nothing one of them
    leaves in a session (or reads of it) meets a trusted server key's requests."""
    async with _own_project(spawn, {"rateLimitRequests": 1_000_000}, FLUXBASE_TENANT_POOL_MAX="1") as (
        _,
        api,
        pid,
        admin,
    ):
        email = f"lane-{pid[:6]}@example.com"
        r = await api.http.post(
            f"/api/projects/{pid}/auth/register", json={"email": email, "password": "correct horse battery"}
        )
        assert r.status_code == 201, r.text
        r = await api.http.post(
            f"/api/projects/{pid}/auth/login",
            json={"email": email, "password": "correct horse battery"},
            headers={"X-Forwarded-For": "203.0.113.9"},
        )
        assert r.status_code == 200, r.text
        token = r.json()["accessToken"]

        async def pid_of(headers: dict[str, str]) -> int:
            r = await api.http.post(
                "/api/execute-sql",
                json={"projectId": pid, "query": "SELECT pg_backend_pid() AS p"},
                headers={"Authorization": f"Bearer {admin}", **headers},
            )
            assert r.json()["success"], r.text
            return int(r.json()["result"]["rows"][0]["p"])

        server = {await pid_of({}) for _ in range(3)}
        user = {await pid_of({"X-Fluxbase-User-Token": token}) for _ in range(3)}
        assert len(server) == 1 and len(user) == 1  # one connection each (pool max 1) ...
        assert server.isdisjoint(user)  # ... and never the same one
