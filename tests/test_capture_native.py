"""Capture in C (ext/fluxbase_capture, issue 20): the C trigger functions are the ones the
embedded server runs, they capture what the PL/pgSQL ones did (images identical to to_jsonb,
bytes, refusals, the 1 MiB rule, TRUNCATE), they run nothing a tenant defined with another
role's rights, and `fluxbase migrate` falls back to PL/pgSQL where the library cannot load."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from conftest import Instance
from fluxbase.db import capture as cap
from fluxbase.security.roles import role_name, role_password
from fluxbase.services.realtime import MESSAGE_SQL
from support import Api, Stack

FUNCS = ("capture_insert", "capture_delete", "capture_update")


@pytest.fixture
async def tenant(stack: Stack, instance: Instance, project: Any) -> AsyncIterator[asyncpg.Connection]:
    """A session as the project's admin role itself (what the SQL API runs tenant SQL on)."""
    role = role_name(project.id, "admin")
    server = urlsplit(stack.admin_url)
    conn = await asyncpg.connect(
        host=server.hostname or "127.0.0.1",
        port=server.port or 5432,
        user=role,
        password=role_password(stack.secret_key, role),
        database=instance.dbname,
    )
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def superuser(stack: Stack, instance: Instance) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(stack.database_url(instance.dbname))
    try:
        yield conn
    finally:
        await conn.close()


async def _events(control_db: asyncpg.Pool, pid: str, table: str) -> list[asyncpg.Record]:
    return await control_db.fetch(
        "SELECT kind, operation, record::text AS record, old::text AS old, bytes, "
        "pg_column_size(record) AS rsize FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = $2 AND (kind = 'row' OR operation = 'TRUNCATE') "
        "ORDER BY xid, id",
        pid,
        table,
    )


async def _images(control_db: asyncpg.Pool, pid: str, table: str) -> list[tuple[str, Any, Any]]:
    """(operation, record, old) of the table's row events, as the readers give them."""
    rows = await control_db.fetch(
        f"SELECT e.operation, e.record::text AS record, {cap.OLD_IMAGE_SQL}::text AS old "
        "FROM fluxbase.events e WHERE project_id = $1 AND table_name = $2 AND kind = 'row' "
        "ORDER BY xid, id",
        pid,
        table,
    )
    return [
        (r["operation"], json.loads(r["record"]), None if r["old"] is None else json.loads(r["old"]))
        for r in rows
    ]


async def _native(control_db: asyncpg.Pool) -> bool:
    async with control_db.acquire() as conn:
        return await cap.capture_language(conn) == cap.C


async def test_the_embedded_server_runs_the_c_capture(stack: Stack, control_db: asyncpg.Pool) -> None:
    """`make venv` built the library and the migration installed it: a broken build must fail
    here, not fall back silently."""
    if stack.pg is None and not await _native(control_db):
        pytest.skip("FLUXBASE_TEST_DATABASE_URL's server has no fluxbase_capture library (docs/capture.md)")
    rows = await control_db.fetch(
        """SELECT p.proname, l.lanname, p.probin, p.prosrc, p.prosecdef, r.rolname
           FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang JOIN pg_roles r ON r.oid = p.proowner
           WHERE p.pronamespace = 'fluxbase_capture'::regnamespace AND p.proname = ANY($1::text[])""",
        list(FUNCS),
    )
    assert sorted((r["proname"], r["lanname"], r["probin"], r["prosrc"]) for r in rows) == sorted(
        (f, "c", "$libdir/fluxbase_capture", f"fluxbase_{f}") for f in FUNCS
    ), rows
    assert not any(r["prosecdef"] for r in rows) and {r["rolname"] for r in rows} == {"fluxbase_owner"}
    async with control_db.acquire() as conn:
        assert await cap.capture_language(conn) == cap.C


TYPES_SQL = """
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE TYPE spot AS (x int, y int);
CREATE TABLE cast_log (cur text, sess text, at_depth int);
CREATE FUNCTION mood_json(m mood) RETURNS json LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO cast_log VALUES (current_user, session_user, pg_trigger_depth());
    RETURN json_build_object('mood', m::text, 'by', current_user);
END
$$;
CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood);
CREATE TABLE kinds (
    id bigint PRIMARY KEY, d posint, ints int[], texts text[], p pair, ps pair[], n numeric,
    big numeric(30, 10), ts timestamptz, day date, iv interval, j jsonb, js json, b bytea,
    m mood, s spot, u uuid, f float8, ok boolean, t text, "Odd Name" text, gone text
);
ALTER TABLE kinds DROP COLUMN gone;
CREATE TABLE after_log (cur text, sess text);
CREATE FUNCTION after_kinds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO after_log VALUES (current_user, session_user);
    RETURN NULL;
END
$$;
CREATE TRIGGER zz_after AFTER INSERT OR UPDATE OR DELETE ON kinds
    FOR EACH STATEMENT EXECUTE FUNCTION after_kinds();
"""
ROWS_SQL = """
INSERT INTO kinds VALUES
 (1, 5, '{1,NULL,3}', '{"a b","q\\"uote",NULL}', ROW(1, 'x'), ARRAY[ROW(2, 'y')::pair, NULL], 1.50,
  12345678901234567890.0123456789, '2026-01-02 03:04:05.678+02', '2026-12-31', '1 day 02:03:04',
  '{"k": [1, {"z": null}], "a": "é"}', '{"raw":  1,"raw": 2}', '\\x00ff10', 'happy', ROW(3, 4),
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'NaN', true, E'line\\n"tab"\\t\\u00e9', 'spaced'),
 (2, NULL, NULL, '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'null', NULL, NULL, NULL, NULL,
  NULL, '-Infinity', NULL, '', NULL)
"""


async def test_images_are_to_jsonb_of_the_row_built_as_the_tenant(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """Every column type to_jsonb knows (domains, arrays, composites, enums, numeric,
    timestamptz, jsonb, json, bytea, a dropped column, a user type with a cast to json): the
    event's images are exactly to_jsonb(row). The tenant's cast runs as the tenant only (it
    records current_user and session_user), and after capture the session's user is the
    tenant's again."""
    me = role_name(project.id, "admin")
    await tenant.execute(TYPES_SQL)
    await tenant.execute(ROWS_SQL)
    want = {r["id"]: r["j"] for r in await tenant.fetch("SELECT id, to_jsonb(k)::text AS j FROM kinds k")}
    await tenant.execute("UPDATE kinds SET n = n + 1, s = ROW(5, 6), ints = ints || 9 WHERE id = 1")
    upd = {r["id"]: r["j"] for r in await tenant.fetch("SELECT id, to_jsonb(k)::text AS j FROM kinds k")}
    await tenant.execute("DELETE FROM kinds")

    events = await _events(control_db, project.id, "kinds")
    assert [(e["kind"], e["operation"]) for e in events] == [
        ("row", "INSERT"),
        ("row", "INSERT"),
        ("row", "UPDATE"),
        ("row", "DELETE"),
        ("row", "DELETE"),
    ], events
    assert [e["record"] for e in events[:2]] == [want[1], want[2]]
    assert events[0]["old"] is None and events[0]["bytes"] == events[0]["rsize"]
    assert (events[2]["record"], events[2]["old"]) == (upd[1], want[1])
    # a DELETE's image stored once (sql/0053)
    assert sorted((e["record"], e["old"]) for e in events[3:]) == sorted([(upd[1], None), (want[2], None)])
    assert all(e["bytes"] == 2 * e["rsize"] for e in events[3:])
    first = json.loads(events[0]["record"])
    assert (
        first["m"] == {"mood": "happy", "by": me}
        and first["s"] == {"x": 3, "y": 4}
        and first["Odd Name"] == "spaced"
        and "gone" not in first
    )
    # Every run of the tenant's cast: as the tenant, by both names.
    log = await tenant.fetch("SELECT DISTINCT cur, sess FROM cast_log")
    assert [tuple(r) for r in log] == [(me, me)], log
    assert await tenant.fetchval("SELECT count(*) FROM cast_log WHERE at_depth > 0") > 0
    assert {tuple(r) for r in await tenant.fetch("SELECT cur, sess FROM after_log")} == {(me, me)}
    assert await tenant.fetchval("SELECT current_user") == me


async def test_bulk_statements_write_one_event_per_row(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await tenant.execute("CREATE TABLE bulk (id int PRIMARY KEY, v text)")
    await tenant.execute("INSERT INTO bulk SELECT g, 'v' || g FROM generate_series(1, 50) g")
    await tenant.execute("UPDATE bulk SET v = v || '!' WHERE id <= 10")
    await tenant.execute("DELETE FROM bulk WHERE id > 40")
    events = await _events(control_db, project.id, "bulk")
    ops = [e["operation"] for e in events]
    assert ops == ["INSERT"] * 50 + ["UPDATE"] * 10 + ["DELETE"] * 10
    assert [json.loads(e["record"])["id"] for e in events[:50]] == list(range(1, 51))
    # a DELETE's image is stored once, as record (sql/0053)
    assert all(e["old"] is None for e in events[60:])
    assert sorted(json.loads(e["record"])["id"] for e in events[60:]) == list(range(41, 51))


async def test_rolled_back_writes_capture_nothing(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await tenant.execute("CREATE TABLE rb (id int PRIMARY KEY, v text)")
    await tenant.execute("INSERT INTO rb VALUES (1, 'kept')")
    tx = tenant.transaction()
    await tx.start()
    await tenant.execute("INSERT INTO rb VALUES (2, 'gone')")
    await tenant.execute("UPDATE rb SET v = 'changed'")
    await tenant.execute("DELETE FROM rb")
    await tx.rollback()
    async with tenant.transaction():
        await tenant.execute("INSERT INTO rb VALUES (3, 'kept too')")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with tenant.transaction():  # a savepoint rolled back
                await tenant.execute("UPDATE rb SET v = 'sp'")
                await tenant.execute("INSERT INTO rb VALUES (1, 'dup')")
    events = await _events(control_db, project.id, "rb")
    assert [(e["operation"], json.loads(e["record"])["id"]) for e in events] == [("INSERT", 1), ("INSERT", 3)]
    assert await tenant.fetchval("SELECT current_user") == role_name(project.id, "admin")


async def test_calling_the_c_functions_directly_is_refused(
    api: Api, tenant: asyncpg.Connection, project: Any
) -> None:
    for f in FUNCS:
        with pytest.raises(
            asyncpg.InsufficientPrivilegeError, match="may only be called by the capture triggers"
        ):
            await tenant.execute(f"SELECT fluxbase_capture.{f}()")
        r = await api.sql(
            project.admin_key, project.id, f"DO $$ BEGIN PERFORM fluxbase_capture.{f}(); END $$"
        )
        body = r.json()
        assert not body.get("success") and "may only be called by the capture triggers" in r.text, body


async def test_wrongly_attached_c_function_is_refused(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The tenant attaches the C functions in shapes the capture does not use: refused, nothing
    written."""
    await tenant.execute("CREATE TABLE odd (id int)")
    await tenant.execute("SELECT fluxbase_capture.detach_capture('odd'::regclass)")
    await tenant.execute(
        "CREATE TRIGGER w AFTER INSERT ON odd FOR EACH ROW EXECUTE FUNCTION fluxbase_capture.capture_update()"
    )
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await tenant.execute("INSERT INTO odd VALUES (1)")
    await tenant.execute("DROP TRIGGER w ON odd")
    await tenant.execute(
        "CREATE TRIGGER w AFTER INSERT ON odd FOR EACH STATEMENT "
        "EXECUTE FUNCTION fluxbase_capture.capture_delete()"
    )
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await tenant.execute("INSERT INTO odd VALUES (1)")
    assert await _events(control_db, project.id, "odd") == []


async def test_another_projects_table_is_refused(
    api: Api, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """Project A's session writing a table of project B's schema (a grant the platform never
    makes, made here by the superuser) is refused by write_events, as before: no event in
    either project."""
    _, token = await api.new_user()
    other = await api.new_project(token)
    key = await api.new_key(token, other, "admin")
    r = await api.sql(key, other, "CREATE TABLE theirs (id int PRIMARY KEY)")
    assert r.json()["success"], r.text
    me = role_name(project.id, "admin")
    await control_db.execute(f'GRANT USAGE ON SCHEMA "p_{other}" TO "{me}"')
    await control_db.execute(f'GRANT INSERT, UPDATE, DELETE, SELECT ON "p_{other}".theirs TO "{me}"')
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a table of the calling project"):
            await tenant.execute(f'INSERT INTO "p_{other}".theirs VALUES (1)')
        await control_db.execute(f'INSERT INTO "p_{other}".theirs VALUES (2)')
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a table of the calling project"):
            await tenant.execute(f'UPDATE "p_{other}".theirs SET id = 3')
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a table of the calling project"):
            await tenant.execute(f'DELETE FROM "p_{other}".theirs')
    finally:
        await control_db.execute(f'REVOKE ALL ON "p_{other}".theirs FROM "{me}"')
        await control_db.execute(f'REVOKE ALL ON SCHEMA "p_{other}" FROM "{me}"')
    assert await _events(control_db, project.id, "theirs") == []
    # the platform session's own insert: attributed to B by its schema (write_events' way)
    assert [(e["operation"], e["record"]) for e in await _events(control_db, other, "theirs")] == [
        ("INSERT", '{"id": 2}')
    ]


async def test_truncate_and_images_over_1_mib_go_through_write_events(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await tenant.execute("CREATE TABLE huge (id int PRIMARY KEY, small text, blob text)")
    await tenant.execute("INSERT INTO huge VALUES (1, 'tiny', repeat('x', 1100000)), (2, 's', 'short')")
    await tenant.execute("UPDATE huge SET small = 'tiny2' WHERE id = 1")
    await tenant.execute("DELETE FROM huge WHERE id = 1")
    await tenant.execute("TRUNCATE huge")
    events = await _events(control_db, project.id, "huge")
    assert [(e["kind"], e["operation"]) for e in events] == [
        ("row", "INSERT"),
        ("row", "INSERT"),
        ("row", "UPDATE"),
        ("row", "DELETE"),
        ("schema", "TRUNCATE"),
    ], [(e["kind"], e["operation"]) for e in events]
    assert json.loads(events[0]["record"]) == {"id": 1, "small": "tiny"}
    assert events[0]["bytes"] == events[0]["rsize"] < 1000
    assert json.loads(events[1]["record"]) == {"id": 2, "small": "s", "blob": "short"}
    assert json.loads(events[2]["record"]) == {"id": 1, "small": "tiny2"}
    assert json.loads(events[2]["old"]) == {"id": 1, "small": "tiny"}
    # a DELETE's image is stored once (sql/0053), its small fields as record
    assert json.loads(events[3]["record"]) == {"id": 1, "small": "tiny2"} and events[3]["old"] is None
    assert json.loads(events[4]["record"])["command"] == "TRUNCATE"


async def test_a_delete_stores_its_image_once_and_the_readers_give_it_as_both(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """sql/0053: a DELETE's outbox row keeps the deleted row's image in `record` only (`old`
    NULL), `bytes` counts it twice as before, and the realtime message (MESSAGE_SQL) gives it
    as `old` too (the webhook reader: tests/test_webhooks.py's row.deleted); an event stored
    before (old set) reads the same."""
    await tenant.execute("CREATE TABLE gone (id int PRIMARY KEY, v text)")
    for i, v in ((1, "a"), (2, "b"), (3, "c")):
        await tenant.execute("INSERT INTO gone VALUES ($1, $2)", i, v)
    await tenant.execute("DELETE FROM gone WHERE id = 1")  # one row
    await tenant.execute("DELETE FROM gone WHERE id IN (2, 3)")  # a statement of two
    rows = await control_db.fetch(
        f"""SELECT e.operation, e.record::text AS record, e.old IS NULL AS no_old, e.bytes,
                  pg_column_size(e.record) AS rsize, {MESSAGE_SQL} AS message
           FROM fluxbase.events e WHERE e.project_id = $1 AND e.table_name = 'gone' AND e.kind = 'row'
           ORDER BY e.xid, e.id""",
        project.id,
    )
    assert [r["operation"] for r in rows] == ["INSERT"] * 3 + ["DELETE"] * 3
    inserted, deleted = rows[:3], rows[3:]
    assert all(r["no_old"] for r in rows)
    for ins, dele in zip(inserted, deleted, strict=True):
        assert dele["record"] == ins["record"]
        payload = json.loads(dele["message"])["payload"]
        assert payload["record"] == payload["old"] == json.loads(ins["record"])
    # counted twice, as before: the single row's with its 4-byte header (as write_events'
    # p_records[1]), a statement's rows as stored
    assert deleted[0]["bytes"] == 2 * inserted[0]["bytes"]
    assert [r["bytes"] for r in deleted[1:]] == [2 * r["rsize"] for r in deleted[1:]]
    # an event stored before sql/0053 (old set) reads as it did
    await control_db.execute(
        "INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes) "
        "VALUES ($1, 'row', 'gone_before', 'DELETE', '{\"id\": 9}', '{\"id\": 9}', 20)",
        project.id,
    )
    msg = await control_db.fetchval(
        f"SELECT {MESSAGE_SQL} FROM fluxbase.events e "
        "WHERE e.project_id = $1 AND e.table_name = 'gone_before'",
        project.id,
    )
    assert json.loads(msg)["payload"]["old"] == {"id": 9} == json.loads(msg)["payload"]["record"]


async def test_fallback_to_plpgsql_captures_the_same_and_c_comes_back(
    superuser: asyncpg.Connection,
    tenant: asyncpg.Connection,
    project: Any,
    control_db: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where the library cannot be loaded (here: a library name this server does not have),
    install_capture keeps the PL/pgSQL bodies of sql/0049; both capture the same events, bytes
    included. The C functions are back afterwards (the shared instance unchanged)."""
    if not await _native(control_db):
        pytest.skip("the server has no fluxbase_capture library to come back to (docs/capture.md)")
    await tenant.execute("CREATE TABLE same (id int PRIMARY KEY, v text, n numeric, a int[], j jsonb)")
    work = [
        "INSERT INTO same VALUES ({i}, 'v', 1.5, '{{1,2}}', '{{\"k\": [1]}}'), "
        "({j}, NULL, NULL, NULL, 'null'), (3, repeat('long', 40), 2, NULL, NULL)",
        "UPDATE same SET v = 'w', a = a || 3 WHERE id = {i}",
        "DELETE FROM same WHERE id IN ({i}, {j}, 3)",
    ]
    try:
        monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture_not_here")
        with caplog.at_level(logging.INFO, logger="fluxbase.db.capture"):
            assert await cap.install_capture(superuser) == cap.PLPGSQL
        assert "PL/pgSQL" in caplog.text and "fluxbase_capture_not_here" in caplog.text
        assert await cap.capture_language(superuser) == cap.PLPGSQL
        for q in work:
            await tenant.execute(q.format(i=1, j=2))
        monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture")
        assert await cap.install_capture(superuser) == cap.C
        for q in work:
            await tenant.execute(q.format(i=1, j=2))
    finally:
        monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture")
        await cap.install_capture(superuser)
    assert await cap.capture_language(superuser) == cap.C
    events = [
        (e["kind"], e["operation"], e["record"], e["old"], e["bytes"])
        for e in await _events(control_db, project.id, "same")
    ]
    assert len(events) == 14 and events[:7] == events[7:], events
    # a small image's size is with its 1-byte header (as an element of write_events' jsonb[])
    assert events[1][4] < 127 < 130 < events[2][4], events


async def test_a_role_that_is_not_a_superuser_changes_nothing(
    stack: Stack, instance: Instance, control_db: asyncpg.Pool
) -> None:
    async with control_db.acquire() as c:
        before = await cap.capture_language(c)
    assert before in (cap.C, cap.PLPGSQL)
    conn = await asyncpg.connect(stack.runtime_url(instance.dbname))
    try:
        assert await cap.install_native(conn) == cap.NOT_SUPERUSER
        assert await cap.install_capture(conn) == before
    finally:
        await conn.close()
    async with control_db.acquire() as c:
        assert await cap.capture_language(c) == before


async def test_the_doorbell_rings_while_a_reader_waits(
    superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any
) -> None:
    """A captured statement notifies fluxbase_events while a reader is marked waiting (read as
    fluxbase_outbox_writer: the tenant cannot read event_readers), at every isolation level
    (a serializable transaction reads it through the saved query)."""
    await tenant.execute("CREATE TABLE bell (id int PRIMARY KEY)")
    heard: list[str] = []
    await superuser.add_listener("fluxbase_events", lambda *a: heard.append(a[2]))
    reader = f"test-capture-native-{project.id}"
    await superuser.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ($1, true)", reader
    )
    try:
        for iso in ("read_committed", "repeatable_read", "serializable"):
            for q in ("INSERT INTO bell VALUES (1)", "UPDATE bell SET id = 2", "DELETE FROM bell"):
                heard.clear()
                async with tenant.transaction(isolation=iso):
                    await tenant.execute(q)
                for _ in range(100):
                    if heard:
                        break
                    await asyncio.sleep(0.02)
                assert heard == ["fluxbase_events"], (iso, q)
    finally:
        await superuser.execute("DELETE FROM fluxbase.event_readers WHERE reader_id = $1", reader)


async def test_the_outbox_row_has_the_columns_defaults(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The C capture writes the outbox row without the INSERT statement while fluxbase.events is
    the table it knows: `xid` is the writing transaction's, `created_at` its start, `id` from the
    identity, in statement order, like the SQL defaults gave."""
    await tenant.execute("CREATE TABLE dflt (id int PRIMARY KEY)")
    async with tenant.transaction():
        xid = await tenant.fetchval("SELECT pg_current_xact_id()::text")
        now = await tenant.fetchval("SELECT now()")
        await tenant.execute("INSERT INTO dflt VALUES (1), (2)")
        await tenant.execute("UPDATE dflt SET id = id + 10")
    rows = await control_db.fetch(
        "SELECT id, xid::text AS xid, created_at, operation FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = 'dflt' AND kind = 'row' ORDER BY id",
        project.id,
    )
    assert [r["operation"] for r in rows] == ["INSERT", "INSERT", "UPDATE", "UPDATE"]
    assert {r["xid"] for r in rows} == {xid} and {r["created_at"] for r in rows} == {now}
    ids = [r["id"] for r in rows]
    assert ids == sorted(set(ids))
    # from the identity sequence: its shared last value (what any backend reserved; each keeps
    # a cache of 64, sql/0050, so another backend's nextval may be lower) is at or past them
    seq = await control_db.fetchval("SELECT pg_get_serial_sequence('fluxbase.events', 'id')")
    assert await control_db.fetchval(f"SELECT last_value FROM {seq}") >= ids[-1]


async def test_an_outbox_table_it_does_not_know_takes_the_insert_statement(
    superuser: asyncpg.Connection, project: Any, tenant: asyncpg.Connection
) -> None:
    """A later migration that changes fluxbase.events (here: a column with a default, in a
    transaction rolled back) makes the C capture write through its saved INSERT, so the new
    column gets its default; afterwards the direct write is back."""
    await tenant.execute("CREATE TABLE chg (id int PRIMARY KEY)")
    me = role_name(project.id, "admin")
    tx = superuser.transaction()
    await tx.start()
    try:
        await superuser.execute("ALTER TABLE fluxbase.events ADD COLUMN extra int NOT NULL DEFAULT 7")
        await superuser.execute(f'SET LOCAL SESSION AUTHORIZATION "{me}"')
        await superuser.execute(f'INSERT INTO "p_{project.id}".chg VALUES (1)')
        await superuser.execute("RESET SESSION AUTHORIZATION")
        got = await superuser.fetch(
            "SELECT extra, operation FROM fluxbase.events "
            "WHERE project_id = $1 AND table_name = 'chg' AND kind = 'row'",
            project.id,
        )
        assert [tuple(r) for r in got] == [(7, "INSERT")]
    finally:
        await tx.rollback()
    await tenant.execute("INSERT INTO chg VALUES (2)")
    assert (
        await superuser.fetchval(
            "SELECT count(*) FROM fluxbase.events "
            "WHERE project_id = $1 AND table_name = 'chg' AND kind = 'row'",
            project.id,
        )
        == 1
    )


@pytest.mark.parametrize("kind", ["check", "rule"])
async def test_a_check_or_rule_on_the_outbox_is_honoured(
    superuser: asyncpg.Connection, project: Any, tenant: asyncpg.Connection, kind: str
) -> None:
    """A CHECK or an INSERT rule added to fluxbase.events (in a transaction rolled back) applies
    to captured rows: the C capture writes through its saved INSERT while they exist."""
    table = f"chk_{kind}"
    await tenant.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    me = role_name(project.id, "admin")
    ddl = {
        "check": f"ALTER TABLE fluxbase.events ADD CONSTRAINT test_capture_native "
        f"CHECK (table_name IS DISTINCT FROM '{table}') NOT VALID",
        "rule": f"CREATE RULE test_capture_native AS ON INSERT TO fluxbase.events "
        f"WHERE new.table_name = '{table}' DO INSTEAD NOTHING",
    }[kind]
    tx = superuser.transaction()
    await tx.start()
    try:
        await superuser.execute(ddl)
        await superuser.execute(f'SET LOCAL SESSION AUTHORIZATION "{me}"')
        if kind == "check":
            with pytest.raises(asyncpg.CheckViolationError):
                await superuser.execute(f'INSERT INTO "p_{project.id}".{table} VALUES (1)')
        else:
            await superuser.execute(f'INSERT INTO "p_{project.id}".{table} VALUES (1)')
            await superuser.execute("RESET SESSION AUTHORIZATION")
            assert (
                await superuser.fetchval(
                    "SELECT count(*) FROM fluxbase.events "
                    "WHERE project_id = $1 AND table_name = $2 AND kind = 'row'",
                    project.id,
                    table,
                )
                == 0
            )
    finally:
        await tx.rollback()


async def test_processes_migrating_at_once_agree(
    stack: Stack, instance: Instance, control_db: asyncpg.Pool
) -> None:
    """Replicas starting together each run the capture step: they take the migrations' lock in
    turn, and all install the C functions (none falls back on a concurrent catalog update)."""
    if not await _native(control_db):
        pytest.skip("the server has no fluxbase_capture library (docs/capture.md)")
    conns = [await asyncpg.connect(stack.database_url(instance.dbname)) for _ in range(3)]
    try:
        await cap.install_plpgsql(conns[0])  # so that every process replaces the functions
        assert await asyncio.gather(*(cap.install_capture(c) for c in conns)) == [cap.C] * 3
    finally:
        await cap.install_capture(conns[0])
        for c in conns:
            await c.close()
    assert await _native(control_db)


async def _indexes_hold_every_row(superuser: asyncpg.Connection) -> None:
    """amcheck (in a transaction or savepoint rolled back): every index of fluxbase.events holds
    every row of it (a row the direct write left out of an index fails)."""
    tx = superuser.transaction()
    await tx.start()
    try:
        await superuser.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        indexes = await superuser.fetch(
            "SELECT indexrelid::regclass::text AS i FROM pg_index "
            "WHERE indrelid = 'fluxbase.events'::regclass"
        )
        assert indexes
        for idx in indexes:
            await superuser.execute("SELECT bt_index_check($1::regclass, true)", idx["i"])
    finally:
        await tx.rollback()


async def test_kept_catalog_facts_follow_outbox_changes_in_one_session(
    stack: Stack,
    superuser: asyncpg.Connection,
    project: Any,
    tenant: asyncpg.Connection,
    control_db: asyncpg.Pool,
) -> None:
    """The C capture keeps the outbox's oids, layout and IndexInfo between calls in a backend:
    committed changes from another session (an index dropped, recreated with other columns, a
    column added and dropped) between captures in one long-lived tenant session are followed:
    every event is written, with the new column's default while it exists, into every index
    that exists (amcheck), and neither the tenant's backend nor the server restarts."""
    started = await superuser.fetchval("SELECT pg_postmaster_start_time()")
    tenant_pid = await tenant.fetchval("SELECT pg_backend_pid()")
    await tenant.execute("CREATE TABLE kept (id int PRIMARY KEY, v text)")
    n = 0

    async def write() -> None:
        nonlocal n
        n += 1
        await tenant.execute("INSERT INTO kept VALUES ($1, 'a')", n)
        await tenant.execute("UPDATE kept SET v = 'b' WHERE id = $1", n)
        await tenant.execute("DELETE FROM kept WHERE id = $1", n - 1)

    async def check() -> None:
        got = await _events(control_db, project.id, "kept")
        want = []
        for i in range(1, n + 1):
            want += [("INSERT", i), ("UPDATE", i)] + ([("DELETE", i - 1)] if i > 1 else [])
        assert [(r["operation"], json.loads(r["record"])["id"]) for r in got] == want
        await _indexes_hold_every_row(superuser)

    await write()
    await write()
    await check()
    definition = await superuser.fetchval(
        "SELECT pg_get_indexdef('fluxbase.events_project_xid_idx'::regclass)"
    )
    try:
        # an index dropped, then one with other columns under the same name, then the original
        await superuser.execute("DROP INDEX fluxbase.events_project_xid_idx")
        await write()
        await check()
        await superuser.execute("CREATE INDEX events_project_xid_idx ON fluxbase.events (table_name, id)")
        await write()
        await check()
        await superuser.execute("DROP INDEX fluxbase.events_project_xid_idx")
        await superuser.execute(definition)
        await write()
        await check()
        # a column with a default (the saved INSERT fills it), then dropped (the direct write,
        # on a descriptor with a dropped column)
        await superuser.execute(
            "ALTER TABLE fluxbase.events ADD COLUMN kept_extra int, ALTER COLUMN kept_extra SET DEFAULT 7"
        )
        await write()
        await check()
        assert (
            await control_db.fetchval(
                "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND table_name = 'kept' "
                "AND kept_extra = 7",
                project.id,
            )
            == 3
        )
        await superuser.execute("ALTER TABLE fluxbase.events DROP COLUMN kept_extra")
        await write()
        await check()
    finally:
        await superuser.execute("ALTER TABLE fluxbase.events DROP COLUMN IF EXISTS kept_extra")
        if (
            await superuser.fetchval("SELECT pg_get_indexdef(to_regclass('fluxbase.events_project_xid_idx'))")
            != definition
        ):
            await superuser.execute("DROP INDEX IF EXISTS fluxbase.events_project_xid_idx")
            await superuser.execute(definition)
    assert await tenant.fetchval("SELECT pg_backend_pid()") == tenant_pid
    assert await superuser.fetchval("SELECT pg_postmaster_start_time()") == started


async def test_kept_catalog_facts_follow_a_replaced_outbox_and_its_rollback(
    superuser: asyncpg.Connection, project: Any
) -> None:
    """In one backend (the superuser's, writing as the project's admin): the outbox renamed away
    and a new fluxbase.events created in a transaction: the captures in it write to the new
    table; after the rollback (this backend's own invalidations) they write to the original
    one again; the server stays up."""
    started = await superuser.fetchval("SELECT pg_postmaster_start_time()")
    me = role_name(project.id, "admin")
    table = f'"p_{project.id}".repl'
    await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
    await superuser.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    await superuser.execute(f"INSERT INTO {table} VALUES (1)")  # the facts kept in this backend
    await superuser.execute("RESET SESSION AUTHORIZATION")
    count = "SELECT count(*) FROM {t} WHERE project_id = $1 AND table_name = 'repl' AND kind = 'row'"
    tx = superuser.transaction()
    await tx.start()
    try:
        await superuser.execute("ALTER TABLE fluxbase.events RENAME TO events_replaced")
        await superuser.execute("CREATE TABLE fluxbase.events (LIKE fluxbase.events_replaced INCLUDING ALL)")
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
        await superuser.execute(f'SET LOCAL SESSION AUTHORIZATION "{me}"')
        await superuser.execute(f"INSERT INTO {table} VALUES (2)")
        await superuser.execute(f"UPDATE {table} SET id = 3 WHERE id = 2")
        await superuser.execute("RESET SESSION AUTHORIZATION")
        assert await superuser.fetchval(count.format(t="fluxbase.events"), project.id) == 2
        assert await superuser.fetchval(count.format(t="fluxbase.events_replaced"), project.id) == 1
        await _indexes_hold_every_row(superuser)
    finally:
        await tx.rollback()
    await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
    await superuser.execute(f"INSERT INTO {table} VALUES (4)")
    await superuser.execute("RESET SESSION AUTHORIZATION")
    assert await superuser.fetchval(count.format(t="fluxbase.events"), project.id) == 2
    await _indexes_hold_every_row(superuser)
    assert await superuser.fetchval("SELECT pg_postmaster_start_time()") == started


async def test_the_outbox_grows_by_chunks_whose_pages_are_filled(
    superuser: asyncpg.Connection,
    project: Any,
    tenant: asyncpg.Connection,
    control_db: asyncpg.Pool,
) -> None:
    """Single-row captures add 32 empty pages at a time to fluxbase.events and enter them into
    the free space map (instead of PostgreSQL's one page per insert, each a write of 8 KiB of
    zeros): after the outbox grew by 100 pages, its end holds 1 to 32 pages not used yet (one page
    per insert leaves none), the new pages below them are filled (the free space map handed
    them out; none was skipped), every index holds every row (amcheck), and the events are
    the rows written, in order."""
    assert await _native(control_db)
    await tenant.execute("CREATE TABLE grow1 (id int PRIMARY KEY, v text)")
    pages = "SELECT pg_relation_size('fluxbase.events') / current_setting('block_size')::int"
    before = await superuser.fetchval(pages)
    written = 0
    while await superuser.fetchval(pages) < before + 100:
        # one INSERT statement per row (one capture each), 200 rows a round trip
        await tenant.execute(
            f"DO $$ BEGIN FOR i IN {written + 1}..{written + 200} LOOP "
            "INSERT INTO grow1 VALUES (i, repeat('x', 300)); END LOOP; END $$"
        )
        written += 200
        # A bound on the loop, not on the behaviour: free space that other tests' pruned events
        # left in the outbox is filled before it grows (a CI run needed 20 200 rows).
        assert written <= 100_000
    after = await superuser.fetchval(pages)
    last = await superuser.fetchval("SELECT max((ctid::text::point)[0])::int FROM fluxbase.events")
    assert 1 <= after - 1 - last <= 32, (before, after, last)
    used = {
        r["b"]
        for r in await superuser.fetch(
            "SELECT DISTINCT (ctid::text::point)[0]::int AS b FROM fluxbase.events "
            "WHERE project_id = $1 AND table_name = 'grow1'",
            project.id,
        )
    }
    new_pages = set(range(before, last + 1))
    assert new_pages <= used, sorted(new_pages - used)
    ids = await control_db.fetch(
        "SELECT (record->>'id')::int AS id FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = 'grow1' AND kind = 'row' ORDER BY xid, id",
        project.id,
    )
    assert [r["id"] for r in ids] == list(range(1, written + 1))
    await _indexes_hold_every_row(superuser)


async def _hint(conn: asyncpg.Connection) -> int | None:
    return await conn.fetchval("SELECT pg_sequence_last_value('fluxbase.readers_waiting_hint')")


async def test_the_doorbell_hint_says_what_event_readers_says(
    superuser: asyncpg.Connection, project: Any
) -> None:
    """The doorbell's hint (sql/0052) is 1 while a reader waits and 0 once none does: read under
    its lock, which holds every other reader's change of `waiting` back, it always agrees with
    event_readers (the C capture skips event_readers only when it says 0)."""
    reader = f"test-hint-{project.id}"

    async def agree() -> int:
        async with superuser.transaction():
            await superuser.execute("LOCK TABLE fluxbase.readers_hint_lock IN EXCLUSIVE MODE")
            hint = await _hint(superuser)
            anyone = await superuser.fetchval(
                "SELECT EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting)"
            )
        assert hint == (1 if anyone else 0)
        return hint

    await superuser.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ($1, true)", reader
    )
    try:
        assert await agree() == 1
        await superuser.execute(
            "UPDATE fluxbase.event_readers SET waiting = false WHERE reader_id = $1", reader
        )
        await agree()
        await superuser.execute(
            "UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", reader
        )
        assert await agree() == 1
    finally:
        await superuser.execute("DELETE FROM fluxbase.event_readers WHERE reader_id = $1", reader)
    await agree()


async def test_a_reader_waking_while_another_falls_asleep_leaves_the_hint_up(
    stack: Stack, instance: Instance, superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any
) -> None:
    """Reader A wakes (waiting = false) while reader B's `waiting = true` is not committed yet:
    without the hint's lock A's trigger sees nobody waiting and sets 0, B commits, and the hint
    says 0 while B sleeps, so captured writes ring no doorbell for it (seen failing with the
    function's LOCK removed). With it, A's trigger waits for B's commit and leaves 1, and a
    captured write rings."""
    a, b = f"test-hint-a-{project.id}", f"test-hint-b-{project.id}"
    other = await asyncpg.connect(stack.database_url(instance.dbname))
    await tenant.execute("CREATE TABLE hint_bell (id int PRIMARY KEY)")
    heard: list[str] = []
    await superuser.add_listener("fluxbase_events", lambda *args: heard.append(args[2]))
    await superuser.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ($1, true), ($2, false)", a, b
    )
    tx = other.transaction()
    try:
        await tx.start()
        await other.execute("UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", b)
        wake = asyncio.create_task(
            superuser.execute("UPDATE fluxbase.event_readers SET waiting = false WHERE reader_id = $1", a)
        )
        await asyncio.sleep(0.3)  # (held back by the hint's lock until B commits)
        await tx.commit()
        await wake
        assert await _hint(superuser) == 1, "B waits: the hint must not say 0"
        # Only B waits: a captured write rings for it.
        for _ in range(3):
            heard.clear()
            await tenant.execute("INSERT INTO hint_bell VALUES (1)")
            await tenant.execute("DELETE FROM hint_bell")
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.02)
            assert heard, "a reader waits: the captured write must ring"
    finally:
        if not other.is_closed() and other.is_in_transaction():
            await tx.rollback()
        await superuser.execute(
            "DELETE FROM fluxbase.event_readers WHERE reader_id = ANY($1::text[])", [a, b]
        )
        await other.close()


# -- the kept image plans and privilege answers (capture6) --------------------------------------

IMG6_SQL = """
CREATE DOMAIN posint6 AS int CHECK (VALUE > 0);
CREATE DOMAIN small6 AS smallint;
CREATE DOMAIN stamp6 AS timestamptz;
CREATE TYPE mood6 AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair6 AS (a int, b text);
CREATE TABLE img6 (
    id bigint PRIMARY KEY, i2 smallint, i4 int, i8 bigint, d posint6, s2 small6, n numeric,
    nb numeric(30, 10), f4 real, f8 float8, ok boolean, t text, vc varchar(20), c char(5), js json,
    jb jsonb, ints int[], p pair6, ps pair6[], m mood6, ts timestamptz, st stamp6, tsn timestamp,
    day date, b bytea, u uuid, iv interval, gone int, "Odd ""N"" x" text, zz text, a text
);
ALTER TABLE img6 DROP COLUMN gone;
CREATE TABLE img6_want (stage text, id bigint, j jsonb);
"""
IMG6_ROWS = """
INSERT INTO img6 VALUES
 (1, -32768, -2147483648, -9223372036854775808, 1, -1, 'NaN', -0.0000000001, 'NaN', 'Infinity',
  true, E'é😀\\n\\t"q"\\\\\\u0001', 'vc ', 'ab', '{"raw":  1,"raw": 2}', 'null', '{1,NULL,-3}',
  ROW(1, 'x'), ARRAY[ROW(2, 'y')::pair6, NULL], 'sad', '2026-01-02 03:04:05.678+02',
  'infinity', '1999-12-31 23:59:59.999999', '0001-01-01 BC', '\\x00ff10',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '-1 day 02:03:04', 'x', '', 'first'),
 (2, 32767, 2147483647, 9223372036854775807, 2147483647, 32767, 'Infinity', 12345678901234567890.0123456789,
  '-Infinity', '-Infinity', false, '', '', '', '"scalar"', '"s"', '{}', ROW(NULL, NULL), '{}', 'happy',
  '-infinity', '2026-06-30 12:00:00+00', 'infinity', 'infinity', '', NULL, '0', NULL, NULL, NULL),
 (3, 0, 0, 0, 3, 0, '-Infinity', 1.50, 0.1, 1e300, NULL, NULL, NULL, NULL, '5', '12.30',
  '{{1,2},{3,4}}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '-0', '-0', NULL, NULL, NULL, NULL, '[1, {"b": 2, "a": 1}]',
  '{"k": [1, {"z": null}], "a": "é", "n": -1.000}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL)
"""


async def test_images_are_byte_identical_to_to_jsonb_for_every_kind_of_column(
    tenant: asyncpg.Connection, superuser: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The images built from a kept plan (integers as numerics directly, text, dates and jsonb
    pushed as they are, the rest through PostgreSQL's datum_to_jsonb, keys pre-sorted) are the
    bytes to_jsonb(row) stores: ints at their limits, numerics and floats with NaN and the
    infinities, text with unicode and escapes, json (duplicate keys, scalars), jsonb, arrays,
    composites, domains over int and timestamptz, enums, dates, bytea, NULLs, a dropped column,
    and a column added after the rows existed (its default a missing attribute of the old
    tuples), for INSERT (one statement of several rows, and one row), UPDATE and DELETE. Compared
    as stored tuples' bytes (pageinspect), not as jsonb equality or text."""
    assert await _native(control_db)
    await tenant.execute(IMG6_SQL)
    await tenant.execute(IMG6_ROWS)
    await tenant.execute(
        "INSERT INTO img6 (id, i4, t) VALUES (5, -7, 'one row'); "
        "INSERT INTO img6_want SELECT 'ins', id, to_jsonb(img6_row) FROM img6 img6_row"
    )
    await tenant.execute("ALTER TABLE img6 ADD COLUMN late int DEFAULT 7, ADD COLUMN late2 text")
    await tenant.execute(
        "INSERT INTO img6 (id, late2) VALUES (6, 'after'); "
        "INSERT INTO img6_want SELECT 'ins', id, to_jsonb(img6_row) FROM img6 img6_row WHERE id = 6; "
        "INSERT INTO img6_want SELECT 'pre_upd', id, to_jsonb(img6_row) FROM img6 img6_row"
    )
    await tenant.execute("UPDATE img6 SET i4 = i4 - 1, late2 = 'u' WHERE id IN (2, 3, 5, 6)")
    await tenant.execute(
        "INSERT INTO img6_want SELECT 'upd', id, to_jsonb(img6_row) FROM img6 img6_row; "
        "DELETE FROM img6 WHERE id IN (1, 2); DELETE FROM img6 WHERE id = 4"
    )
    events = await control_db.fetch(
        "SELECT operation, record, old FROM fluxbase.events WHERE project_id = $1 "
        "AND table_name = 'img6' AND kind = 'row' ORDER BY xid, id",
        project.id,
    )
    assert [e["operation"] for e in events] == ["INSERT"] * 6 + ["UPDATE"] * 4 + ["DELETE"] * 3
    # Every image and its expected to_jsonb, into one table, read back as stored bytes.
    # (in a transaction rolled back: neither the extension nor the table stays)
    tx = superuser.transaction()
    await tx.start()
    try:
        await superuser.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        await superuser.execute("CREATE TABLE public.img6_cmp (k int, a jsonb)")
        sch = f"p_{project.id}"
        # Each event with the to_jsonb images it should hold (its record's, and for an UPDATE
        # the row's before it).
        wants = f"""WITH ev AS (
                  SELECT row_number() OVER (ORDER BY xid, id) AS n, operation, record,
                         {cap.OLD_IMAGE_SQL} AS old
                  FROM fluxbase.events e WHERE project_id = $1 AND table_name = 'img6' AND kind = 'row'),
                wants AS (
                  SELECT ev.n, ev.operation, ev.record, ev.old,
                         (SELECT j FROM "{sch}".img6_want w WHERE w.stage = CASE ev.operation
                             WHEN 'INSERT' THEN 'ins' ELSE 'upd' END
                           AND w.id = (ev.record->>'id')::bigint) AS want_rec,
                         (SELECT j FROM "{sch}".img6_want w WHERE w.stage = 'pre_upd'
                           AND w.id = (ev.record->>'id')::bigint) AS want_old
                  FROM ev)
                """
        pairs = await superuser.fetch(wants + "SELECT * FROM wants ORDER BY n", project.id)
        await superuser.execute(
            "INSERT INTO public.img6_cmp "
            + wants
            + """SELECT n * 10 + 1, record FROM wants UNION ALL SELECT n * 10 + 2, want_rec FROM wants
                UNION ALL SELECT n * 10 + 3, old FROM wants WHERE old IS NOT NULL
                UNION ALL SELECT n * 10 + 4, want_old FROM wants WHERE old IS NOT NULL""",
            project.id,
        )
        raw = await superuser.fetch(
            """SELECT d[1] AS k, d[2] AS a FROM (
                 SELECT tuple_data_split('public.img6_cmp'::regclass, t_data, t_infomask, t_infomask2,
                                         t_bits) AS d
                 FROM generate_series(0, (pg_relation_size('public.img6_cmp') / 8192)::int - 1) AS b,
                      LATERAL heap_page_items(get_raw_page('public.img6_cmp', b)) AS i
                 WHERE t_data IS NOT NULL) AS x"""
        )
    finally:
        await tx.rollback()
    stored = {int.from_bytes(r["k"], "little", signed=True): r["a"] for r in raw}
    assert len(pairs) == 13 and len(stored) == 13 * 2 + 7 * 2, (len(pairs), len(stored))
    for p in pairs:
        n, op = p["n"], p["operation"]
        assert p["want_rec"] is not None
        assert stored[n * 10 + 1] == stored[n * 10 + 2], (op, p["record"], p["want_rec"])
        if op == "INSERT":
            assert p["old"] is None
            continue
        want_old = p["want_old"] if op == "UPDATE" else p["want_rec"]
        assert stored[n * 10 + 3] == stored[n * 10 + 4 if op == "UPDATE" else n * 10 + 2], (
            op,
            p["old"],
            want_old,
        )
    # (and as values: the late column's default in the old tuples' images)
    assert {json.loads(p["old"])["late"] for p in pairs if p["operation"] == "UPDATE"} == {7}
    first = json.loads(pairs[0]["record"])
    assert first["i8"] == -9223372036854775808 and first["n"] == "NaN" and first["f8"] == "Infinity"


async def _img6_ops(control_db: asyncpg.Pool, pid: str, table: str) -> list[tuple[str, int]]:
    rows = await control_db.fetch(
        "SELECT operation, record->>'id' AS id FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = $2 AND kind = 'row' ORDER BY xid, id",
        pid,
        table,
    )
    return [(r["operation"], int(r["id"])) for r in rows]


async def test_the_writers_privileges_follow_grants_and_memberships_of_another_session(
    tenant: asyncpg.Connection, superuser: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The outbox writer's privileges hold in a long-lived session whatever a backend keeps
    between writes (a build that kept the checks' answers must drop them on every grant and
    membership change): a tenant session that wrote before sees another session's REVOKE of the
    writer's INSERT on the very next write (refused, 42501, as every capture path is), the GRANT
    back (written), the privilege held only through a role the writer is a member of (written),
    and that membership revoked (refused again). (Seen failing on a build that kept its privilege
    answers and never invalidated them.)"""
    assert await _native(control_db)
    grp = f"acl6_{project.id}"
    await tenant.execute("CREATE TABLE acl6 (id int PRIMARY KEY)")
    await tenant.execute("INSERT INTO acl6 VALUES (1)")
    await tenant.execute("INSERT INTO acl6 VALUES (2)")  # (a backend's kept facts learnt)
    await superuser.execute(f'CREATE ROLE "{grp}" NOLOGIN')
    try:
        await superuser.execute("REVOKE INSERT ON fluxbase.events FROM fluxbase_outbox_writer")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO acl6 VALUES (3)")
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
        await tenant.execute("INSERT INTO acl6 VALUES (4)")
        await tenant.execute("INSERT INTO acl6 VALUES (5)")
        # Only through a membership (the writer is NOINHERIT: the grant inherits): answered,
        # kept, then the membership goes.
        await superuser.execute(f'GRANT INSERT ON fluxbase.events TO "{grp}"')
        await superuser.execute("REVOKE INSERT ON fluxbase.events FROM fluxbase_outbox_writer")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO acl6 VALUES (6)")
        await superuser.execute(f'GRANT "{grp}" TO fluxbase_outbox_writer WITH INHERIT TRUE')
        await tenant.execute("INSERT INTO acl6 VALUES (7)")
        await tenant.execute("INSERT INTO acl6 VALUES (8)")
        await superuser.execute(f'REVOKE "{grp}" FROM fluxbase_outbox_writer')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO acl6 VALUES (9)")
    finally:
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
        await superuser.execute(f'REVOKE INSERT ON fluxbase.events FROM "{grp}"')
        await superuser.execute(f'DROP ROLE "{grp}"')
    await tenant.execute("INSERT INTO acl6 VALUES (10)")
    assert await _img6_ops(control_db, project.id, "acl6") == [("INSERT", i) for i in (1, 2, 4, 5, 7, 8, 10)]


async def test_the_hint_privilege_follows_a_revoke_in_another_session(
    tenant: asyncpg.Connection, superuser: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The doorbell's hint is read only with the writer's SELECT on the sequence:
    with the hint forced to 0 while a reader waits, a captured write trusts it and rings no
    doorbell; once another session revokes that SELECT, the long-lived tenant session's next
    write no longer reads the hint, asks event_readers and rings; granted back, it trusts the
    hint again. (Seen failing on a build that kept its privilege answers and never invalidated
    them.)"""
    assert await _native(control_db)
    reader = f"test-acl6-{project.id}"
    heard: list[str] = []
    await tenant.execute("CREATE TABLE bell6 (id int PRIMARY KEY)")
    await superuser.add_listener("fluxbase_events", lambda *args: heard.append(args[2]))
    await superuser.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ($1, true)", reader
    )

    async def rings(i: int) -> bool:
        await superuser.execute("SELECT setval('fluxbase.readers_waiting_hint', 0)")
        heard.clear()
        await tenant.execute(f"INSERT INTO bell6 VALUES ({i})")
        for _ in range(25):
            if heard:
                return True
            await asyncio.sleep(0.02)
        return False

    try:
        await rings(0)  # (a backend's first capture learns event_readers' column by reading it)
        assert not await rings(1)
        assert not await rings(2)
        # (USAGE granted instead: pg_sequence_last_value itself would read the value with it, so
        # only the capture's own check of SELECT can refuse)
        await superuser.execute(
            "REVOKE SELECT ON SEQUENCE fluxbase.readers_waiting_hint FROM fluxbase_outbox_writer; "
            "GRANT USAGE ON SEQUENCE fluxbase.readers_waiting_hint TO fluxbase_outbox_writer"
        )
        assert await rings(3)
        await superuser.execute(
            "GRANT SELECT ON SEQUENCE fluxbase.readers_waiting_hint TO fluxbase_outbox_writer"
        )
        assert not await rings(4)
    finally:
        await superuser.execute(
            "GRANT SELECT ON SEQUENCE fluxbase.readers_waiting_hint TO fluxbase_outbox_writer; "
            "REVOKE USAGE ON SEQUENCE fluxbase.readers_waiting_hint FROM fluxbase_outbox_writer"
        )
        await superuser.execute("DELETE FROM fluxbase.event_readers WHERE reader_id = $1", reader)
    assert await _img6_ops(control_db, project.id, "bell6") == [("INSERT", i) for i in range(5)]


async def test_a_kept_image_plan_follows_a_cast_to_json_created_and_dropped(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A column's JSON category depends on pg_cast (a cast to json of its type): a session whose
    image plan for a table is kept sees a cast created, then dropped, between its writes (the
    column's type is unchanged, so only the pg_cast invalidation can tell), and each image is
    to_jsonb of its row at that moment. (Seen failing on a build without the pg_cast callback.)"""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TYPE tone6 AS ENUM ('lo', 'hi'); CREATE TABLE cast6 (id int PRIMARY KEY, m tone6); "
        "CREATE FUNCTION tone6_json(m tone6) RETURNS json LANGUAGE sql IMMUTABLE "
        "AS $$ SELECT json_build_object('tone', m::text) $$"
    )
    want: list[str] = []

    async def write(i: int) -> None:
        await tenant.execute(f"INSERT INTO cast6 VALUES ({i}, 'hi')")
        want.append(await tenant.fetchval(f"SELECT to_jsonb(c)::text FROM cast6 c WHERE id = {i}"))

    await write(1)
    await write(2)  # (the plan kept)
    await tenant.execute("CREATE CAST (tone6 AS json) WITH FUNCTION tone6_json(tone6)")
    await write(3)
    await tenant.execute("DROP CAST (tone6 AS json)")
    await write(4)
    rows = await control_db.fetch(
        "SELECT record::text AS r FROM fluxbase.events WHERE project_id = $1 AND table_name = 'cast6' "
        "AND kind = 'row' ORDER BY xid, id",
        project.id,
    )
    assert [r["r"] for r in rows] == want
    assert [json.loads(w)["m"] for w in want] == ["hi", "hi", {"tone": "hi"}, "hi"]


# -- virtual generated columns (PostgreSQL 18) -----------------------------------------------------


async def test_virtual_generated_columns_are_computed_in_every_image(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """PostgreSQL hands triggers a virtual generated column as null (NEW, OLD, transition
    tables); the images carry its value, as to_jsonb of the row selected does: multi-row INSERT
    and DELETE (transition tables), UPDATE (both images), a column after a dropped one, a text
    expression and a null result."""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TABLE vg (id int PRIMARY KEY, gone int, a int, t text, "
        "v int GENERATED ALWAYS AS (a * 3) VIRTUAL, "
        "s text GENERATED ALWAYS AS (upper(t) || '!') VIRTUAL)"
    )
    await tenant.execute("ALTER TABLE vg DROP COLUMN gone")
    await tenant.execute("INSERT INTO vg (id, a, t) VALUES (1, 5, 'x'), (2, NULL, 'y'), (3, 7, NULL)")
    one = "SELECT to_jsonb(x)::text FROM vg x WHERE id = $1"
    want = {i: json.loads(await tenant.fetchval(one, i)) for i in (1, 2, 3)}
    assert want[1]["v"] == 15 and want[1]["s"] == "X!" and want[2]["v"] is None and want[3]["s"] is None
    await tenant.execute("UPDATE vg SET a = a + 1, t = 'z' WHERE id = 1")
    upd = json.loads(await tenant.fetchval("SELECT to_jsonb(x)::text FROM vg x WHERE id = 1"))
    assert upd["v"] == 18 and upd["s"] == "Z!"
    await tenant.execute("DELETE FROM vg WHERE id IN (1, 3)")
    got = await _images(control_db, project.id, "vg")
    assert got == [
        ("INSERT", want[1], None),
        ("INSERT", want[2], None),
        ("INSERT", want[3], None),
        ("UPDATE", upd, want[1]),
        ("DELETE", upd, upd),
        ("DELETE", want[3], want[3]),
    ], got


async def test_a_virtual_column_that_fails_to_compute_is_left_out_and_the_write_stands(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A value a SELECT of the row cannot compute (a division by zero: a data exception) is left
    out of the image (its key too: imaged as null it could pass a SELECT policy its value would
    not, hostile review 27), the row's other virtual columns computed, and the tenant's write is
    not failed by capture; the rows around it keep their values."""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TABLE vz (id int PRIMARY KEY, a int, q int GENERATED ALWAYS AS (100 / a) VIRTUAL, "
        "w int GENERATED ALWAYS AS (a + 1) VIRTUAL)"
    )
    await tenant.execute("INSERT INTO vz (id, a) VALUES (1, 4), (2, 0), (3, 5)")
    await tenant.execute("UPDATE vz SET a = 0 WHERE id = 1")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await tenant.fetchval("SELECT q FROM vz WHERE id = 2")
    assert await tenant.fetchval("SELECT count(*) FROM vz") == 3
    got = await _images(control_db, project.id, "vz")
    assert [(op, rec) for op, rec, _ in got] == [
        ("INSERT", {"id": 1, "a": 4, "q": 25, "w": 5}),
        ("INSERT", {"id": 2, "a": 0, "w": 1}),
        ("INSERT", {"id": 3, "a": 5, "q": 20, "w": 6}),
        ("UPDATE", {"id": 1, "a": 0, "w": 1}),
    ], got
    assert got[3][2] == {"id": 1, "a": 4, "q": 25, "w": 5}


async def test_a_cancel_while_computing_virtual_columns_is_not_swallowed(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """Only data exceptions are imaged as null: a statement timeout that fires while the images'
    virtual columns are computed (an expensive built-in expression over many rows) cancels the
    statement, which writes nothing."""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TABLE vc (id int PRIMARY KEY, t text, "
        "h text GENERATED ALWAYS AS (md5(repeat(t, 20000))) VIRTUAL)"
    )
    await tenant.execute("SET statement_timeout = '300ms'")
    try:
        with pytest.raises(asyncpg.QueryCanceledError):
            await tenant.execute(
                "INSERT INTO vc (id, t) SELECT g, 'abcdefgh' FROM generate_series(1, 5000) g"
            )
    finally:
        await tenant.execute("RESET statement_timeout")
    assert await tenant.fetchval("SELECT count(*) FROM vc") == 0
    assert await _images(control_db, project.id, "vc") == []
