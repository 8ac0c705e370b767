"""Hostile review 16: the C capture trigger functions (capture3: ext/fluxbase_capture, the
post-migration step that installs them or keeps PL/pgSQL, sql/0049) and the cold4 merge,
attacked through the real API on the real stack with the source in hand.

The C functions run inside every tenant write to a captured table, in the tenant's backend: a
crash there restarts the whole server for every project. So the crash-path tests drive hostile
table shapes and trigger attachments through /api/execute-sql (tenant SQL, as the project's own
admin role) and assert that the postmaster did not restart (pg_postmaster_start_time and an
observer connection opened before survive), that another project keeps working, and that what
was captured is exactly to_jsonb(row) in the writer's own project.

Findings: F1 (low, fixed in ext/fluxbase_capture): the C capture counted a small image of a
single-row statement 3 bytes short of what write_events (the PL/pgSQL capture and the fallback)
stores as `bytes`, the figure the outbox quota adds up. Everything else here held: no crash path
(zero columns, missing attributes, external TOAST, generated columns, partitions and inheritance
with other tuple layouts, deferred constraint triggers, 1600 columns, forty triggers on one
transition table, MERGE and upsert, ALTER between captures, capture nested in a cast and in
foreign-key actions, unbounded recursion), no tenant code as the outbox writer, no event outside
the writer's project, the same events under the PL/pgSQL fallback; cold4's buckets untouchable.

Each test asserts the SECURE (or intended) behaviour. A hole still open is marked
`xfail(strict=True)`; the mark goes with the fix. The database fixtures (`control_db`,
`superuser`) only observe, never set an attack up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from conftest import Instance
from fluxbase.db import capture as cap
from fluxbase.security.roles import role_name
from fluxbase.tenancy.buckets import all_buckets, bucket_of
from support import Api, Stack, bearer
from test_attack_review15 import _ok, _sql
from test_capture_native import tenant  # noqa: F401  (a session as the project's admin role)

# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
async def observer(stack: Stack, instance: Instance) -> AsyncIterator[asyncpg.Connection]:
    """A superuser session opened before the attack: a backend crash (the postmaster's reset of
    every backend) ends it."""
    conn = await asyncpg.connect(stack.database_url(instance.dbname))
    try:
        yield conn
    finally:
        await conn.close()


async def _server_mark(observer: asyncpg.Connection) -> tuple[Any, int]:
    return (
        await observer.fetchval("SELECT pg_postmaster_start_time()"),
        await observer.fetchval("SELECT pg_backend_pid()"),
    )


async def _row_events(control_db: asyncpg.Pool, pid: str, table: str) -> list[asyncpg.Record]:
    return await control_db.fetch(
        "SELECT operation, record, old, bytes FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = $2 AND kind = 'row' ORDER BY xid, id",
        pid,
        table,
    )


async def _images(api: Api, key: str, pid: str, query: str) -> list[Any]:
    """to_jsonb of the rows `query` returns (one column `j`), as the tenant computes it."""
    body = await _ok(api, key, pid, query)
    return [json.loads(r["j"]) if isinstance(r["j"], str) else r["j"] for r in body["result"]["rows"]]


async def _another_project_works(api: Api, control_db: asyncpg.Pool) -> None:
    _, token = await api.new_user()
    other = await api.new_project(token)
    key = await api.new_key(token, other, "admin")
    await _ok(api, key, other, "CREATE TABLE alive (id int PRIMARY KEY)")
    await _ok(api, key, other, "INSERT INTO alive VALUES (1)")
    assert [json.loads(e["record"]) for e in await _row_events(control_db, other, "alive")] == [{"id": 1}]


# -- 1. crash paths: hostile table shapes, all through the SQL API ------------------------------

# (name, setup statements, writes): one statement a request, as /api/execute-sql takes them
SHAPES: list[tuple[str, list[str], list[str]]] = [
    (
        "zero_columns",
        ["CREATE TABLE zc ()"],
        [
            "INSERT INTO zc DEFAULT VALUES",
            "INSERT INTO zc SELECT FROM generate_series(1, 3)",
            "DELETE FROM zc",
        ],
    ),
    (
        # old tuples without the added columns (attmissingval), external TOAST values in both
        # images, a dropped column: the row-level UPDATE trigger builds them from heap tuples
        "missing_attributes_and_toast",
        [
            "CREATE TABLE ma (id int, big text, gone text)",
            "ALTER TABLE ma ALTER COLUMN big SET STORAGE EXTERNAL",
            "INSERT INTO ma SELECT g, (SELECT string_agg(md5(g::text || h::text), '') "
            "FROM generate_series(1, 200) h), 'g' FROM generate_series(1, 3) g",
            "ALTER TABLE ma ADD COLUMN x int DEFAULT 7",
            "ALTER TABLE ma DROP COLUMN gone",
            "ALTER TABLE ma ADD COLUMN y text DEFAULT 'dflt'",
        ],
        ["UPDATE ma SET id = id + 10 WHERE id = 1", "DELETE FROM ma WHERE id = 2", "UPDATE ma SET x = 8"],
    ),
    (
        "generated_columns",
        [
            "CREATE TABLE gc (a int, b int GENERATED ALWAYS AS (a * 2) VIRTUAL, "
            "c int GENERATED ALWAYS AS (a * 3) STORED)"
        ],
        [
            "INSERT INTO gc (a) VALUES (1), (2)",
            "UPDATE gc SET a = 5 WHERE a = 1",
            "DELETE FROM gc WHERE a = 2",
        ],
    ),
    (
        # a partition attached with another column order and a dropped column; a cross-partition
        # UPDATE; a statement trigger of the partition's own (its own tuple format)
        "partitions",
        [
            "CREATE TABLE pt (k int, v text, d int) PARTITION BY LIST (k)",
            "CREATE TABLE pt2 PARTITION OF pt FOR VALUES IN (2)",
            "CREATE TABLE pt1 (junk int, d int, v text, k int)",
            "ALTER TABLE pt1 DROP COLUMN junk",
            "SELECT fluxbase_capture.detach_capture('pt1'::regclass)",
            "ALTER TABLE pt ATTACH PARTITION pt1 FOR VALUES IN (1)",
            "CREATE TRIGGER own AFTER INSERT ON pt1 REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION fluxbase_capture.capture_insert()",
        ],
        [
            "INSERT INTO pt VALUES (1, 'a', 10), (2, 'b', 20)",
            "UPDATE pt SET k = 2 WHERE k = 1",
            "UPDATE pt SET v = 'c'",
            "INSERT INTO pt1 VALUES (40, 'direct', 1)",
            "DELETE FROM pt",
        ],
    ),
    (
        "inheritance",
        [
            "CREATE TABLE ip (a int, gone int, b text)",
            "ALTER TABLE ip DROP COLUMN gone",
            "CREATE TABLE ic (c text) INHERITS (ip)",
        ],
        [
            "INSERT INTO ic VALUES (1, 'x', 'y')",
            "INSERT INTO ip VALUES (2, 'p')",
            "UPDATE ip SET a = a + 1",
            "DELETE FROM ip",
        ],
    ),
    (
        # capture_update as a deferred constraint trigger: it fires at COMMIT, after the row
        # was updated again and deleted in the same transaction
        "deferred_constraint_trigger",
        [
            "CREATE TABLE dc (id int, v text, big text STORAGE EXTERNAL)",
            "INSERT INTO dc VALUES (1, 'a', repeat('0123456789', 700))",
            "CREATE CONSTRAINT TRIGGER late AFTER UPDATE ON dc DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            "EXECUTE FUNCTION fluxbase_capture.capture_update()",
        ],
        # each UPDATE replaces the TOASTed value: the deferred trigger reads values whose TOAST
        # rows the same transaction deleted
        [
            "DO $$ BEGIN UPDATE dc SET v = 'b', big = repeat('b', 7000); "
            "UPDATE dc SET v = 'c', big = repeat('c', 7000); DELETE FROM dc; END $$"
        ],
    ),
    (
        "wide_1600_columns",
        [
            "DO $$ BEGIN EXECUTE 'CREATE TABLE wide (' || (SELECT string_agg('c' || g || ' int', ', ') "
            "FROM generate_series(1, 1600) g) || ')'; END $$"
        ],
        ["INSERT INTO wide (c1, c1600) VALUES (1, 2)", "UPDATE wide SET c2 = 3", "DELETE FROM wide"],
    ),
    (
        # forty capture triggers reading one transition table (a read pointer each)
        "many_capture_triggers",
        [
            "CREATE TABLE mt (id int)",
            "DO $$ BEGIN FOR i IN 1..40 LOOP EXECUTE format('CREATE TRIGGER t%s AFTER INSERT ON mt "
            "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION fluxbase_capture.capture_insert()', i);"
            " END LOOP; END $$",
        ],
        ["INSERT INTO mt SELECT generate_series(1, 5)"],
    ),
    (
        "upsert_and_merge",
        ["CREATE TABLE um (id int PRIMARY KEY, v text)"],
        [
            "INSERT INTO um VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET v = 'x'",
            "INSERT INTO um VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET v = 'x'",
            "MERGE INTO um USING (VALUES (1, 'm'), (2, 'n')) s(id, v) ON um.id = s.id "
            "WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)",
        ],
    ),
    (
        # capture inside capture: a cast to json of the tenant's (called while an image is built)
        # writes the captured table again, 60 levels deep
        "capture_inside_capture",
        [
            "CREATE TYPE deep AS ENUM ('x')",
            "CREATE TABLE rec (id int, d deep)",
            "CREATE FUNCTION deep_json(v deep) RETURNS json LANGUAGE plpgsql VOLATILE AS $$ BEGIN "
            "IF pg_trigger_depth() < 60 THEN INSERT INTO rec VALUES (pg_trigger_depth(), 'x'); END IF; "
            "RETURN to_json(v::text); END $$",
            "CREATE CAST (deep AS json) WITH FUNCTION deep_json(deep)",
        ],
        ["INSERT INTO rec VALUES (0, 'x')"],
    ),
    (
        # writes made by foreign-key actions (RI triggers run them through SPI as the owner,
        # inside the parent's AFTER trigger): the child's captures nest in the parent's
        "foreign_key_actions",
        [
            "CREATE TABLE fkp (id int PRIMARY KEY)",
            "CREATE TABLE fkc (id int, p int REFERENCES fkp (id) ON UPDATE CASCADE ON DELETE CASCADE)",
            "CREATE TABLE fkn (id int, p int REFERENCES fkp (id) ON DELETE SET NULL)",
        ],
        [
            "INSERT INTO fkp VALUES (1), (2)",
            "INSERT INTO fkc VALUES (10, 1), (20, 2)",
            "INSERT INTO fkn VALUES (30, 2)",
            "UPDATE fkp SET id = 3 WHERE id = 1",
            "DELETE FROM fkp WHERE id = 2",
        ],
    ),
    (
        # the table altered between two captures of one session, its row type changed
        "altered_between_captures",
        ["CREATE TABLE ab (id int, v text)"],
        [
            "INSERT INTO ab VALUES (1, 'a')",
            "ALTER TABLE ab ADD COLUMN w numeric DEFAULT 1.5",
            "UPDATE ab SET v = 'b'",
            "ALTER TABLE ab DROP COLUMN v",
            "UPDATE ab SET w = 2",
            "ALTER TABLE ab ALTER COLUMN w TYPE text",
            "INSERT INTO ab VALUES (2, 'two')",
            "DELETE FROM ab",
        ],
    ),
]


@pytest.fixture
async def plpgsql_capture(
    stack: Stack, instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """The fallback installed for one test (a library name this server does not have, as where
    the module is missing), the C capture back afterwards."""
    conn = await asyncpg.connect(stack.database_url(instance.dbname))
    try:
        monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture_review16_missing")
        assert await cap.install_capture(conn) == cap.PLPGSQL
        yield
    finally:
        monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture")
        assert await cap.install_capture(conn) == cap.C
        await conn.close()


async def test_hostile_table_shapes_do_not_crash_the_server(
    api: Api, project: Any, control_db: asyncpg.Pool, observer: asyncpg.Connection
) -> None:
    """Every shape a tenant can give a captured table, written through the SQL API: the server
    keeps running (no backend crash), each write is captured in the writer's project only, and
    the images are the rows' to_jsonb."""
    await _hostile_shapes(api, project, control_db, observer, virtual_computed=True)


async def test_hostile_table_shapes_under_the_plpgsql_fallback(
    plpgsql_capture: None, api: Api, project: Any, control_db: asyncpg.Pool, observer: asyncpg.Connection
) -> None:
    """The same shapes where the library cannot load (the PL/pgSQL capture of sql/0049): the same
    events, so a server without the module captures as safely and the same way (but for
    PostgreSQL 18's virtual generated columns, which only the C capture computes: left out here)."""
    async with control_db.acquire() as c:
        assert await cap.capture_language(c) == cap.PLPGSQL
    await _hostile_shapes(api, project, control_db, observer, virtual_computed=False)


async def _hostile_shapes(
    api: Api, project: Any, control_db: asyncpg.Pool, observer: asyncpg.Connection, *, virtual_computed: bool
) -> None:
    before = await _server_mark(observer)
    started = await observer.fetchval("SELECT clock_timestamp()")
    key, pid = project.admin_key, project.id
    for name, setup, writes in SHAPES:
        for w in setup + writes:
            await _ok(api, key, pid, w)
        assert await _server_mark(observer) == before, name
    ev = {
        t: await _row_events(control_db, pid, t)
        for t in (
            "zc",
            "ma",
            "gc",
            "pt",
            "pt1",
            "pt2",
            "ip",
            "ic",
            "dc",
            "wide",
            "mt",
            "um",
            "ab",
            "rec",
            "fkc",
            "fkn",
        )
    }
    # zero columns: four inserts, four deletes, each image {}
    assert [(e["operation"], e["record"], e["bytes"] > 0) for e in ev["zc"]] == [
        ("INSERT", "{}", True)
    ] * 4 + [("DELETE", "{}", True)] * 4
    # missing attributes read as their defaults, the TOASTed value whole, the dropped column gone
    big = await _images(api, key, pid, "SELECT to_jsonb(m) AS j FROM ma m ORDER BY id")
    ma = [(e["operation"], json.loads(e["record"])) for e in ev["ma"]]
    assert [op for op, _ in ma] == ["INSERT"] * 3 + ["UPDATE", "DELETE", "UPDATE", "UPDATE"], ma
    assert ma[3][1]["id"] == 11 and ma[3][1]["x"] == 7 and ma[3][1]["y"] == "dflt" and "gone" not in ma[3][1]
    assert len(ma[3][1]["big"]) == 6400 and json.loads(ev["ma"][3]["old"])["id"] == 1
    assert sorted((r for _, r in ma[5:]), key=lambda r: r["id"]) == big
    # generated: the stored one as stored; the virtual one (not in the stored tuple) computed as
    # a SELECT of the row gives it by the C capture, left out by the PL/pgSQL one (sql/0054)
    want = [
        {"a": 1, "b": 2, "c": 3},
        {"a": 2, "b": 4, "c": 6},
        {"a": 5, "b": 10, "c": 15},
        {"a": 2, "b": 4, "c": 6},
    ]
    if not virtual_computed:
        want = [{k: v for k, v in r.items() if k != "b"} for r in want]
    assert [json.loads(e["record"]) for e in ev["gc"]] == want
    # partitions: the parent's images in the parent's column set, the partition's own trigger
    # in the partition's (another column order, a dropped column); since sql/0055 the attached
    # partition has its tree's capture too, so the INSERT naming it is also the tree's event
    assert [json.loads(e["record"]) for e in ev["pt"] if e["operation"] == "INSERT"] == [
        {"k": 1, "v": "a", "d": 10},
        {"k": 2, "v": "b", "d": 20},
        {"k": 1, "v": "direct", "d": 40},
    ]
    assert [json.loads(e["record"]) for e in ev["pt1"]] == [{"d": 40, "v": "direct", "k": 1}]
    assert len([e for e in ev["pt"] if e["operation"] == "DELETE"]) == 3
    # inheritance: the child's own rows with its own column, the parent's statement with the
    # parent's columns
    assert [json.loads(e["record"]) for e in ev["ic"] if e["operation"] == "INSERT"] == [
        {"a": 1, "b": "x", "c": "y"}
    ]
    assert sorted(json.loads(e["record"])["a"] for e in ev["ip"] if e["operation"] == "DELETE") == [2, 3]
    # the deferred constraint trigger ran at COMMIT: its two UPDATE images besides the regular ones
    dc = [(e["operation"], json.loads(e["record"])["v"]) for e in ev["dc"]]
    assert sorted(dc) == sorted(
        [("INSERT", "a"), ("UPDATE", "b"), ("UPDATE", "c"), ("DELETE", "c"), ("UPDATE", "b"), ("UPDATE", "c")]
    ), dc
    assert sorted((json.loads(e["record"])["v"], json.loads(e["record"])["big"]) for e in ev["dc"])[-1] == (
        "c",
        "c" * 7000,
    )
    assert {len(json.loads(e["record"])["big"]) for e in ev["dc"]} == {7000}
    assert [e["operation"] for e in ev["wide"]] == ["INSERT", "UPDATE", "DELETE"]
    wide = json.loads(ev["wide"][1]["record"])
    assert len(wide) == 1600 and (wide["c1"], wide["c2"], wide["c1600"], wide["c3"]) == (1, 3, 2, None)
    assert len(ev["mt"]) == 41 * 5  # the regular trigger and forty of the tenant's
    assert sorted((e["operation"], e["record"]) for e in ev["um"]) == [
        ("DELETE", '{"v": "x", "id": 1}'),
        ("INSERT", '{"v": "a", "id": 1}'),
        ("INSERT", '{"v": "n", "id": 2}'),
        ("UPDATE", '{"v": "x", "id": 1}'),
    ]
    assert [(e["operation"], json.loads(e["record"])) for e in ev["ab"]] == [
        ("INSERT", {"id": 1, "v": "a"}),
        ("UPDATE", {"id": 1, "v": "b", "w": 1.5}),
        ("UPDATE", {"id": 1, "w": 2}),
        ("INSERT", {"id": 2, "w": "two"}),
        ("DELETE", {"id": 1, "w": "2"}),
        ("DELETE", {"id": 2, "w": "two"}),
    ]
    assert [(e["operation"], json.loads(e["record"])) for e in ev["fkc"]] == [
        ("INSERT", {"id": 10, "p": 1}),
        ("INSERT", {"id": 20, "p": 2}),
        ("UPDATE", {"id": 10, "p": 3}),
        ("DELETE", {"id": 20, "p": 2}),
    ]
    assert [(e["operation"], json.loads(e["record"])) for e in ev["fkn"]] == [
        ("INSERT", {"id": 30, "p": 2}),
        ("UPDATE", {"id": 30, "p": None}),
    ]
    # each level's event written after the deeper levels' (their statements ended first)
    assert [json.loads(e["record"])["id"] for e in ev["rec"]] == list(range(59, -1, -1))
    # nothing of this project's tables went anywhere else
    assert not await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events WHERE project_id <> $1 AND table_name = ANY($2::text[]) "
        "AND created_at >= $3",
        pid,
        list(ev),
        started,
    )
    # without a bottom: PostgreSQL's stack depth check ends it with an error, not a crash
    await _ok(
        api,
        key,
        pid,
        "CREATE OR REPLACE FUNCTION deep_json(v deep) RETURNS json LANGUAGE plpgsql VOLATILE AS $$ BEGIN "
        "INSERT INTO rec VALUES (pg_trigger_depth(), 'x'); RETURN to_json(v::text); END $$",
    )
    r = await _sql(api, key, pid, "INSERT INTO rec VALUES (-1, 'x')")
    assert r.status_code < 500 and not r.json().get("success") and "stack depth limit exceeded" in r.text, (
        r.text
    )
    assert await _server_mark(observer) == before
    await _another_project_works(api, control_db)


# -- 2. the C functions attached in other shapes, or to a table outside the project -------------


async def test_c_functions_refuse_every_other_trigger_shape(
    api: Api, project: Any, control_db: asyncpg.Pool, observer: asyncpg.Connection
) -> None:
    """A tenant may attach the C functions itself (EXECUTE is PUBLIC's, as CREATE TRIGGER needs
    it): as an INSTEAD OF trigger of a view, BEFORE, FOR EACH ROW where a transition table is
    expected, on TRUNCATE, on a temporary table. Each write is refused with an error (the
    statement rolled back), none crashes the server, none writes an event."""
    before = await _server_mark(observer)
    key, pid = project.admin_key, project.id
    for q in (
        "CREATE TABLE base (id int, v text)",
        "INSERT INTO base VALUES (1, 'a')",
        "CREATE VIEW vw AS SELECT id, v FROM base",
        "CREATE TRIGGER io INSTEAD OF UPDATE ON vw FOR EACH ROW "
        "EXECUTE FUNCTION fluxbase_capture.capture_update()",
        "CREATE TRIGGER io_ins INSTEAD OF INSERT ON vw FOR EACH ROW "
        "EXECUTE FUNCTION fluxbase_capture.capture_insert()",
        "CREATE TABLE shapes (id int, v text)",
        "SELECT fluxbase_capture.detach_capture('shapes'::regclass)",
    ):
        await _ok(api, key, pid, q)
    attempts = [
        ("", "UPDATE vw SET v = 'b'"),
        ("", "INSERT INTO vw VALUES (2, 'x')"),
        (
            "CREATE TRIGGER s BEFORE UPDATE ON shapes FOR EACH ROW "
            "EXECUTE FUNCTION fluxbase_capture.capture_update()",
            "UPDATE shapes SET v = 'b'",
        ),
        (
            "CREATE TRIGGER s AFTER UPDATE ON shapes REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
            "EXECUTE FUNCTION fluxbase_capture.capture_insert()",
            "UPDATE shapes SET v = 'c'",
        ),
        (
            "CREATE TRIGGER s AFTER DELETE ON shapes FOR EACH ROW "
            "EXECUTE FUNCTION fluxbase_capture.capture_delete()",
            "DELETE FROM shapes",
        ),
        (
            "CREATE TRIGGER s AFTER TRUNCATE ON shapes FOR EACH STATEMENT "
            "EXECUTE FUNCTION fluxbase_capture.capture_insert()",
            "TRUNCATE shapes",
        ),
        (
            "CREATE TRIGGER s AFTER INSERT ON shapes FOR EACH STATEMENT "
            "EXECUTE FUNCTION fluxbase_capture.capture_insert()",
            "INSERT INTO shapes VALUES (3, 'no transition table')",
        ),
    ]
    await _ok(api, key, pid, "INSERT INTO shapes VALUES (1, 'a')")
    for create, write in attempts:
        if create:
            await _ok(api, key, pid, "DROP TRIGGER IF EXISTS s ON shapes")
            await _ok(api, key, pid, create)
        r = await _sql(api, key, pid, write)
        body = r.json()
        assert not body.get("success") and "fluxbase_capture." in r.text and "must be attached" in r.text, (
            write,
            body,
        )
        assert r.status_code < 500, r.text
        assert await _server_mark(observer) == before, write
    # the rows are as they were: every refused statement was rolled back
    assert (await _ok(api, key, pid, "SELECT count(*)::int AS n FROM shapes"))["result"]["rows"] == [{"n": 1}]
    assert (await _ok(api, key, pid, "SELECT v FROM base"))["result"]["rows"] == [{"v": "a"}]
    assert await _row_events(control_db, pid, "shapes") == []
    assert await _row_events(control_db, pid, "vw") == []
    # a temporary table is no table of the project's schema: write_events refuses it
    r = await _sql(
        api,
        key,
        pid,
        "DO $$ BEGIN CREATE TEMP TABLE tmp (id int); "
        "CREATE TRIGGER c AFTER INSERT ON tmp REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION fluxbase_capture.capture_insert(); INSERT INTO tmp VALUES (1); END $$",
    )
    assert not r.json().get("success") and "not a table of the calling project" in r.text, r.text
    assert await _row_events(control_db, pid, "tmp") == []
    # the project's schema cannot be renamed to another project's (or a look-alike) name
    r = await _sql(api, key, pid, f'ALTER SCHEMA "p_{pid}" RENAME TO "p_{pid}x"')
    assert not r.json().get("success"), r.text
    assert await _server_mark(observer) == before


# -- 3. nothing of the tenant's runs as the outbox writer; an error there gives the user back ----


async def test_tenant_code_in_a_capture_runs_as_the_tenant_and_errors_restore_it(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """A cast to json of the tenant's (which to_jsonb calls while building an image) records
    who it runs as and tries to write the outbox itself; then it makes the transaction read-only,
    so the C capture's outbox INSERT (run as fluxbase_outbox_writer) fails. The tenant catches
    that error: its session is its own role again, with no rights on the outbox."""
    key, pid = project.admin_key, project.id
    me = role_name(pid, "admin")
    for q in (
        "CREATE TYPE tone AS ENUM ('calm', 'loud')",
        "CREATE TABLE who (cur text, sess text, outbox text)",
        """CREATE FUNCTION tone_json(t tone) RETURNS json LANGUAGE plpgsql VOLATILE AS $$
           DECLARE o text := 'written';
           BEGIN
               BEGIN
                   INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
                   VALUES ('0000000000000000', 'row', 'forged', 'INSERT', '{}');
               EXCEPTION WHEN insufficient_privilege THEN o := 'denied';
               END;
               INSERT INTO who VALUES (current_user, session_user, o);
               IF t = 'loud' THEN
                   SET LOCAL transaction_read_only = on;
               END IF;
               RETURN to_json(t::text);
           END $$""",
        "CREATE CAST (tone AS json) WITH FUNCTION tone_json(tone)",
        "CREATE TABLE noisy (id int, t tone)",
        "INSERT INTO noisy VALUES (1, 'calm')",
    ):
        await _ok(api, key, pid, q)
    body = await _ok(
        api,
        key,
        pid,
        """DO $$ BEGIN
               BEGIN
                   UPDATE noisy SET t = 'loud';
                   RAISE EXCEPTION 'the capture should have failed';
               EXCEPTION WHEN read_only_sql_transaction THEN
                   IF current_user <> session_user THEN
                       RAISE EXCEPTION 'still as %', current_user;
                   END IF;
               END;
           END $$""",
    )
    assert body["success"]
    got = (await _ok(api, key, pid, "SELECT DISTINCT cur, sess, outbox FROM who"))["result"]["rows"]
    assert got == [{"cur": me, "sess": me, "outbox": "denied"}], got
    r = await _sql(api, key, pid, "SELECT count(*) FROM fluxbase.events")
    assert not r.json().get("success") and "permission denied" in r.text, r.text
    assert [json.loads(e["record"]) for e in await _row_events(control_db, pid, "noisy")] == [
        {"id": 1, "t": "calm"}
    ]
    assert not await control_db.fetchval("SELECT count(*) FROM fluxbase.events WHERE table_name = 'forged'")


# -- 4. bytes: the same whichever capture runs ----------------------------------------------------


async def test_bytes_are_the_same_whichever_capture_runs(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """F1 (fixed here): capture3 says `bytes` must be what write_events (the PL/pgSQL capture, and
    the fallback where the library cannot load) stores; the C capture counted a small image of a
    single-row statement 3 bytes short (a 1-byte header where write_events' one-image path
    measures the 4-byte one). The tenant attaches sql/0049's PL/pgSQL functions to
    one table and keeps the C ones on its twin; the same single-row and multi-row statements on
    both must count the same bytes (the outbox quota adds them up)."""
    key, pid = project.admin_key, project.id
    for q in (
        "CREATE TABLE by_c (id int, v text)",
        "CREATE TABLE by_pl (id int, v text)",
        "SELECT fluxbase_capture.detach_capture('by_pl'::regclass)",
        "CREATE TRIGGER i AFTER INSERT ON by_pl REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION fluxbase_capture.capture_insert_plpgsql()",
        "CREATE TRIGGER u AFTER UPDATE ON by_pl FOR EACH ROW "
        "EXECUTE FUNCTION fluxbase_capture.capture_update_plpgsql()",
        "CREATE TRIGGER d AFTER DELETE ON by_pl REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
        "EXECUTE FUNCTION fluxbase_capture.capture_delete_plpgsql()",
    ):
        await _ok(api, key, pid, q)
    for t in ("by_c", "by_pl"):
        for q in (
            "INSERT INTO {t} VALUES (1, 'a')",
            "INSERT INTO {t} VALUES (2, 'b'), (3, repeat('long', 40))",
            "UPDATE {t} SET v = 'c' WHERE id = 1",
            "UPDATE {t} SET v = v || '!' WHERE id = 3",
            # a row over 1 MiB among small ones (write_events keeps its small fields)
            "INSERT INTO {t} VALUES (4, repeat('x', 1100000)), (5, 'e')",
            "UPDATE {t} SET v = left(v, 3) WHERE id = 4",
            "DELETE FROM {t} WHERE id = 1",
            "DELETE FROM {t}",
        ):
            await _ok(api, key, pid, q.format(t=t))
    c = [
        (e["operation"], e["record"], e["old"], e["bytes"])
        for e in await _row_events(control_db, pid, "by_c")
    ]
    pl = [
        (e["operation"], e["record"], e["old"], e["bytes"])
        for e in await _row_events(control_db, pid, "by_pl")
    ]
    assert [x[:3] for x in c] == [x[:3] for x in pl] and len(c) == 13
    assert c == pl, [(a[0], a[3], b[3]) for a, b in zip(c, pl, strict=True)]


# -- 5. the direct outbox write under every isolation level, with a reader waiting -------------


async def test_capture_in_every_isolation_level_rings_and_writes(
    tenant: asyncpg.Connection,  # noqa: F811
    project: Any,
    control_db: asyncpg.Pool,
    observer: asyncpg.Connection,
) -> None:
    """capture3 writes the outbox row with heap and index inserts of its own and reads
    event_readers with its own scan (the saved query in a serializable transaction). In read
    committed, repeatable read and serializable transactions, with a reader marked waiting, every
    captured statement writes its events and rings once; a read-only transaction writes nothing."""
    before = await _server_mark(observer)
    await tenant.execute("CREATE TABLE iso (id int PRIMARY KEY, v text)")
    heard: list[str] = []
    await observer.add_listener("fluxbase_events", lambda *a: heard.append(a[2]))
    reader = f"test-review16-{project.id}"
    await observer.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ($1, true)", reader
    )
    try:
        for n, level in enumerate(("read_committed", "repeatable_read", "serializable")):
            heard.clear()
            async with tenant.transaction(isolation=level):
                await tenant.execute(f"INSERT INTO iso VALUES ({n}, 'a'), ({n + 10}, 'b')")
                await tenant.execute(f"UPDATE iso SET v = 'c' WHERE id = {n}")
                await tenant.execute(f"DELETE FROM iso WHERE id = {n + 10}")
            for _ in range(100):
                if heard:
                    break
                await asyncio.sleep(0.02)
            assert heard == ["fluxbase_events"], level  # one NOTIFY a transaction (deduplicated)
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            async with tenant.transaction(readonly=True):
                await tenant.execute("INSERT INTO iso VALUES (99, 'ro')")
    finally:
        await observer.execute("DELETE FROM fluxbase.event_readers WHERE reader_id = $1", reader)
    ev = [
        (e["operation"], json.loads(e["record"])["id"])
        for e in await _row_events(control_db, project.id, "iso")
    ]
    want: list[tuple[str, int]] = []
    for n in range(3):
        want += [("INSERT", n), ("INSERT", n + 10), ("UPDATE", n), ("DELETE", n + 10)]
    assert ev == want, ev
    assert await _server_mark(observer) == before


# -- 6. cold4: 128 provisioner buckets, the administrator read from the catalog ----------------


async def test_tenant_cannot_take_or_break_its_provisioner(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """cold4 reads the bucket that administers a project's roles from pg_auth_members (the first
    one holding ADMIN, its own hash's first) and grew the buckets to 128 (names up to
    fluxbase_provisioner_127). The project's admin tries, in plpgsql that no classifier sees, to
    join, become, alter or re-grant its own bucket and a three-digit one, to give another bucket
    ADMIN over its roles, and to take its bucket's ADMIN away: all refused, the administration
    unchanged, and deleting the project leaves none of its roles behind."""
    key, pid = project.admin_key, project.id
    me = role_name(pid, "admin")
    mine = bucket_of(pid)
    far = all_buckets()[-1]
    admins = """SELECT r.rolname AS role, b.rolname AS member FROM pg_auth_members m
                JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles b ON b.oid = m.member
                WHERE r.rolname LIKE $1 AND m.admin_option ORDER BY 1, 2"""
    before = [tuple(r) for r in await control_db.fetch(admins, f"p_{pid}_%")]
    assert {m for _, m in before} == {mine} and len(before) == 4, before
    attempts = [f'GRANT "{b}" TO "{me}"' for b in (mine, far)] + [
        f'SET ROLE "{mine}"',
        f"ALTER ROLE \"{far}\" PASSWORD 'owned'",
        f'ALTER ROLE "{far}" SET search_path = public',
        f'GRANT "{role_name(pid, "readwrite")}" TO "{far}" WITH ADMIN OPTION',
        f'GRANT "{me}" TO "{far}" WITH ADMIN OPTION',
        f'REVOKE "{role_name(pid, "readwrite")}" FROM "{mine}"',
        f'REVOKE "{me}" FROM "{mine}" CASCADE',
        f'DROP ROLE "{far}"',
    ]
    for q in attempts:
        r = await _sql(api, key, pid, f"DO $$ BEGIN EXECUTE $q${q}$q$; END $$")
        body = r.json()
        assert r.status_code < 500 and not body.get("success"), (q, body)
        assert "permission denied" in body["error"]["message"], (q, body)
    assert [tuple(r) for r in await control_db.fetch(admins, f"p_{pid}_%")] == before
    assert not await control_db.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", me, mine)
    assert not await control_db.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", me, far)
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(project.owner_token))
    assert r.status_code in (200, 204), r.text
    assert not await control_db.fetchval(
        "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"p\\_{pid}\\_%"
    )
