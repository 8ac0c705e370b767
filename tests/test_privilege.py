"""No platform privilege reachable from tenant code (issue 15, finding 1; DESIGN "Privilege model").

A tenant-defined cast is called by to_jsonb(); event capture, exports and schema listings must
only ever call it with a tenant role's rights. The tenant's own function records who it runs as.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from support import Api, bearer

SETUP = [
    "CREATE TYPE mood AS ENUM ('ok', 'bad')",
    "CREATE TYPE mood2 AS ENUM ('x', 'y')",
    "CREATE TABLE spy_log (at text, cu text, su text, cu_super boolean, su_super boolean)",
    # The tenant's cast functions: each records the roles it runs as, then converts.
    """CREATE FUNCTION spy(m mood) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO p_{pid}.spy_log SELECT 'json', current_user, session_user,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
            (SELECT rolsuper FROM pg_roles WHERE rolname = session_user);
        RETURN to_json(m::text);
    END $$""",
    "CREATE CAST (mood AS json) WITH FUNCTION spy(mood)",
    """CREATE FUNCTION spyb(m mood2) RETURNS jsonb LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO p_{pid}.spy_log SELECT 'jsonb', current_user, session_user,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
            (SELECT rolsuper FROM pg_roles WHERE rolname = session_user);
        RETURN to_jsonb(m::text);
    END $$""",
    "CREATE CAST (mood2 AS jsonb) WITH FUNCTION spyb(mood2)",
    "CREATE TYPE pair AS (m mood, n int)",
    "CREATE TABLE t (id int PRIMARY KEY, m mood, m2 mood2, p pair)",
]


async def _ok(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    body = r.json()
    assert body["success"], (query, r.text)
    return body


async def _log(control_db: asyncpg.Pool, pid: str) -> list[asyncpg.Record]:
    async with control_db.acquire() as conn:
        return list(await conn.fetch(f'SELECT * FROM "p_{pid}".spy_log'))


def _assert_tenant_only(rows: list[asyncpg.Record], pid: str) -> None:
    assert rows, "the tenant's cast function never ran: the test would prove nothing"
    for r in rows:
        assert r["cu"].startswith(f"p_{pid}_"), dict(r)
        assert r["su"].startswith(f"p_{pid}_"), dict(r)
        assert r["cu_super"] is False and r["su_super"] is False, dict(r)


async def test_tenant_cast_in_captured_rows_runs_as_the_tenant(api: Api, project, control_db) -> None:
    pid, admin = project.id, project.admin_key
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    for q in SETUP:
        await _ok(api, admin, pid, q.replace("{pid}", pid))
    await _ok(api, admin, pid, "INSERT INTO t VALUES (1, 'ok', 'x', ROW('bad', 1)), (2, 'bad', 'y', NULL)")
    await _ok(api, rw, pid, "INSERT INTO t VALUES (3, 'ok', 'y', ROW('ok', 3))")
    await _ok(api, rw, pid, "UPDATE t SET m = 'bad', m2 = 'x', p = ROW('ok', 2) WHERE id IN (1, 3)")
    await _ok(api, admin, pid, "DELETE FROM t WHERE id = 2")
    # The DDL path: a table created (and captured) by CREATE TABLE AS, then written.
    await _ok(api, admin, pid, "CREATE TABLE t2 AS SELECT 1 AS id, 'ok'::mood AS m, ROW('bad', 1)::pair AS p")
    await _ok(api, admin, pid, "INSERT INTO t2 VALUES (2, 'bad', ROW('ok', 2))")
    await _ok(api, admin, pid, "ALTER TABLE t2 ADD COLUMN m2 mood2 DEFAULT 'y'")
    await _ok(api, rw, pid, "UPDATE t2 SET m = 'ok'")

    rows = await _log(control_db, pid)
    _assert_tenant_only(rows, pid)
    # PostgreSQL 18's to_jsonb() calls a type's cast to json (a cast to jsonb it ignores, but
    # should a version use it, the rows above say as whom it ran).
    assert "json" in {r["at"] for r in rows}
    # Capture still works: every change has its event, built with the tenant's cast.
    async with control_db.acquire() as conn:
        events = await conn.fetch(
            "SELECT table_name, operation, record, old FROM fluxbase.events "
            "WHERE project_id = $1 AND kind = 'row' AND table_name IN ('t', 't2') ORDER BY xid, id",
            pid,
        )
    ops = [(e["table_name"], e["operation"]) for e in events]
    assert ops.count(("t", "INSERT")) == 3 and ops.count(("t", "UPDATE")) == 2
    assert (
        ops.count(("t", "DELETE")) == 1
        and ops.count(("t2", "INSERT")) == 1
        and ops.count(("t2", "UPDATE")) == 2
    )
    assert '"bad"' in events[0]["record"]


async def test_export_and_schema_listing_run_as_the_tenant(api: Api, project, control_db) -> None:
    pid, admin = project.id, project.admin_key
    for q in SETUP:
        await _ok(api, admin, pid, q.replace("{pid}", pid))
    await _ok(api, admin, pid, "INSERT INTO t VALUES (1, 'ok', 'x', ROW('bad', 1))")
    await _ok(api, admin, pid, "TRUNCATE spy_log")
    # A default and a view that call the tenant's cast, too.
    await _ok(api, admin, pid, "CREATE VIEW v AS SELECT id, to_jsonb(m) AS j FROM t")
    r = await api.http.get("/api/schema", params={"projectId": pid}, headers=bearer(admin))
    assert r.status_code == 200, r.text
    r = await api.http.get(f"/api/projects/{pid}/export", headers=bearer(admin))
    assert r.status_code == 200, r.text
    assert b"CREATE CAST" in r.content or b"spy" in r.content
    await _ok(api, admin, pid, "SELECT * FROM v")
    _assert_tenant_only(await _log(control_db, pid), pid)


async def test_outbox_cannot_be_forged_by_calling_the_writer(api: Api, project, control_db) -> None:
    """The definer that writes the outbox refuses direct calls: read/readwrite end users cannot
    forge row events, and nobody can name another project."""
    pid, admin = project.id, project.admin_key
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    await _ok(api, admin, pid, "CREATE TABLE items (id int PRIMARY KEY)")
    async with control_db.acquire() as conn:
        writers = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS sig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname LIKE 'fluxbase%' AND p.prosecdef AND p.proname LIKE 'write_%'"
        )
    assert writers, "no outbox writer function found"
    before = await _event_count(control_db, pid)
    for w in writers:
        sig = w["sig"]
        name, argtypes = sig.split("(", 1)
        nargs = len([a for a in argtypes.rstrip(")").split(",") if a.strip()])
        args = ", ".join(["NULL"] * nargs)
        for key in (rw, admin):
            r = await api.sql(key, pid, f"SELECT {name}({args})")
            assert r.json()["success"] is False, (sig, r.text)
    assert await _event_count(control_db, pid) == before


async def _event_count(control_db: asyncpg.Pool, pid: str) -> int:
    async with control_db.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM fluxbase.events WHERE project_id = $1", pid))
