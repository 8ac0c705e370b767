"""Hostile review 21: capture6's kept answers in the C capture (ext/fluxbase_capture): the outbox
writer's privilege answers (INSERT on fluxbase.events, SELECT of event_readers.waiting and of the
hint sequence) kept until a syscache invalidation (taken out again by capture6's 73e1fd7: the
checks run per write; the tests below stay as guards, and failed on a build whose answers never
invalidate), and row images built from a kept per-relation plan (type categories, output
functions, integers straight to numeric) instead of PostgreSQL's to_jsonb path.

Attacked: REVOKE/GRANT inside one transaction and undone by a rollback (a kept "allowed" must not
outlive the rollback of the GRANT it was computed under), the writer's answer whoever invokes
(a SECURITY DEFINER function owned by a superuser), SELECT (waiting) revoked, INSERT held only
through pg_database_owner; images after another session's ALTER COLUMN TYPE (int4 -> int8 ->
text -> enum, rewrites) while this session keeps the plan, columns dropped and re-added under
the same name, renamed, generated columns (stored, and PostgreSQL 18's virtual), a tenant's cast
to json created and dropped by another session, a tenant's domain and type named like base types,
toasted text, more than 256 relations in one backend, partitions laid out differently, a tenant
cast function that writes captured rows (to another table, and to the same table while creating
types) in the middle of an image, and the backend's private memory over 20 000 captured writes.
Each test asserts the secure/correct behaviour (the image is what to_jsonb(row) gives; the
backend survives: pg_postmaster_start_time unchanged); a hole still open is `xfail(strict=True)`
with its reason. (Virtual generated columns imaged as null was one, a strict xfail until the C
capture computed them: issue 20, hostile review 27.)
"""

# ruff: noqa: F811  (the fixtures imported from test_capture_native are the parameters)
from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from conftest import Instance
from fluxbase.db.capture import OLD_IMAGE_SQL
from fluxbase.security.roles import role_name
from support import Stack
from test_attack_review17 import _tenant_conn
from test_capture_native import _images, _native, superuser, tenant  # noqa: F401


async def _want(conn: asyncpg.Connection, table: str, ident: int) -> Any:
    """to_jsonb of the row as stored now (PostgreSQL's own path), as JSON."""
    return json.loads(await conn.fetchval(f"SELECT to_jsonb(x)::text FROM {table} x WHERE id = $1", ident))


async def _last_record(control_db: asyncpg.Pool, pid: str, table: str) -> Any:
    return (await _images(control_db, pid, table))[-1][1]


# -- kept privilege answers ----------------------------------------------------------------------


async def test_a_grant_rolled_back_leaves_no_kept_allowed(
    superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """One backend both changes the writer's INSERT (as the superuser it logged in as) and writes
    on the fast path (SET SESSION AUTHORIZATION to the project's role: the capture's fast path
    is a project session's, and only it consults the kept answer). A REVOKE inside a transaction
    is seen by that transaction's next write; a REVOKE undone by ROLLBACK TO SAVEPOINT lets the
    next write through; with the INSERT revoked, a GRANT under which a write computed and kept
    'allowed' and that is then rolled back (whole transaction, or savepoint) leaves the next
    write refused, in this backend and in a long-lived other one."""
    assert await _native(control_db)
    sch = f'"p_{project.id}"'
    role = f'"{role_name(project.id, "admin")}"'
    revoke = "REVOKE INSERT ON fluxbase.events FROM fluxbase_outbox_writer"
    grant = "GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer"

    async def write(i: int) -> None:
        await superuser.execute(
            f"SET SESSION AUTHORIZATION {role}; INSERT INTO {sch}.acl21 VALUES ({i}); "
            "RESET SESSION AUTHORIZATION"
        )

    await tenant.execute("CREATE TABLE acl21 (id int PRIMARY KEY)")
    await tenant.execute("INSERT INTO acl21 VALUES (1)")  # the other backend's answers kept
    await write(2)  # this backend's kept
    try:
        async with superuser.transaction():
            await superuser.execute(revoke)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with superuser.transaction():  # (a savepoint)
                    await write(3)
            await superuser.execute(grant)
            await write(4)
        async with superuser.transaction():
            await superuser.execute("SAVEPOINT r")
            await superuser.execute(revoke)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with superuser.transaction():
                    await write(5)
            await superuser.execute("ROLLBACK TO SAVEPOINT r")
            await write(6)
        await superuser.execute(revoke)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await write(7)
        tr = superuser.transaction()
        await tr.start()
        await superuser.execute(grant)
        await write(8)  # 'allowed', computed under the uncommitted GRANT
        await tr.rollback()
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await write(9)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO acl21 VALUES (10)")
        async with superuser.transaction():
            await superuser.execute("SAVEPOINT g")
            await superuser.execute(grant)
            await write(11)
            await superuser.execute("ROLLBACK TO SAVEPOINT g")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with superuser.transaction():
                    await write(12)
    finally:
        await superuser.execute("RESET SESSION AUTHORIZATION")
        await superuser.execute(grant)
    await tenant.execute("INSERT INTO acl21 VALUES (13)")
    await write(14)
    ops = [(op, rec["id"]) for op, rec, _ in await _images(control_db, project.id, "acl21")]
    assert ops == [("INSERT", i) for i in (1, 2, 4, 6, 13, 14)]


async def test_the_kept_answer_is_the_writers_whoever_invokes(
    superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """Answers are kept per user id; the capture asks them as the outbox writer whoever the
    invoker is: the tenant writing as itself, then through a SECURITY DEFINER function owned by
    the superuser (current user a superuser while the capture runs, session user the tenant's:
    the fast path), keeps the writer's answer, and a REVOKE is seen by the next write whichever
    way it comes (no answer computed for the superuser serves the writer)."""
    assert await _native(control_db)
    sch = f'"p_{project.id}"'
    role = f'"{role_name(project.id, "admin")}"'
    await tenant.execute("CREATE TABLE sd21 (id int PRIMARY KEY)")
    await superuser.execute(
        f"CREATE FUNCTION {sch}.w21(i int) RETURNS void LANGUAGE sql SECURITY DEFINER "
        f"SET search_path = {sch} AS $$ INSERT INTO sd21 VALUES (i) $$; "
        f"GRANT EXECUTE ON FUNCTION {sch}.w21(int) TO {role}"
    )
    try:
        await tenant.execute("INSERT INTO sd21 VALUES (1)")
        await tenant.execute(f"SELECT {sch}.w21(2)")
        await superuser.execute("REVOKE INSERT ON fluxbase.events FROM fluxbase_outbox_writer")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute(f"SELECT {sch}.w21(3)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO sd21 VALUES (4)")
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
        await tenant.execute(f"SELECT {sch}.w21(5)")
        await tenant.execute("INSERT INTO sd21 VALUES (6)")
    finally:
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
        await superuser.execute(f"DROP FUNCTION {sch}.w21(int)")
    ops = [rec["id"] for _, rec, _ in await _images(control_db, project.id, "sd21")]
    assert ops == [1, 2, 5, 6]


# -- kept image plans ----------------------------------------------------------------------------


async def test_images_follow_column_type_changes_by_another_session(
    stack: Stack,
    instance: Instance,
    tenant: asyncpg.Connection,
    project: Any,
    control_db: asyncpg.Pool,
) -> None:
    """A long-lived session keeps the plan of a table (int4 column, integers straight to
    numeric); another session ALTERs the column int4 -> int8 (a rewrite) -> text -> a tenant
    enum, drops and re-adds a column of the same name with another type: each next write's image
    (INSERT, UPDATE's record and old, DELETE) is to_jsonb of the row. Also the same changes inside
    the writing session's own transaction."""
    assert await _native(control_db)
    other = await _tenant_conn(stack, instance, project.id)
    try:
        await tenant.execute("CREATE TYPE e21 AS ENUM ('2147483647', 'x')")
        await tenant.execute("CREATE TABLE ty21 (id int PRIMARY KEY, v int, w int, z text)")
        await tenant.execute("INSERT INTO ty21 VALUES (1, 2147483647, -1, 'a')")
        await tenant.execute("UPDATE ty21 SET v = v - 1 WHERE id = 1")  # plan kept
        steps = [
            "ALTER TABLE ty21 ALTER COLUMN v TYPE bigint",
            "ALTER TABLE ty21 ALTER COLUMN v TYPE text USING (v::text || '.5')",
            "ALTER TABLE ty21 ALTER COLUMN v TYPE e21 USING 'x'",
            "ALTER TABLE ty21 DROP COLUMN w, ADD COLUMN w numeric DEFAULT -0.0",
            "ALTER TABLE ty21 DROP COLUMN z; ALTER TABLE ty21 ADD COLUMN z int2 DEFAULT -32768",
            "ALTER TABLE ty21 RENAME COLUMN w TO aaaaaaaaaa",
        ]
        n = 10
        for k, ddl in enumerate(steps):
            conn = other if k % 2 == 0 else tenant
            if conn is tenant:
                async with tenant.transaction():
                    await tenant.execute(ddl)
                    await tenant.execute(f"INSERT INTO ty21 (id) VALUES ({n})")
            else:
                await other.execute(ddl)
                await tenant.execute(f"INSERT INTO ty21 (id) VALUES ({n})")
            assert await _last_record(control_db, project.id, "ty21") == await _want(tenant, "ty21", n), ddl
            before = await _want(tenant, "ty21", 1)
            await tenant.execute("UPDATE ty21 SET id = id WHERE id = 1")
            op, rec, old = (await _images(control_db, project.id, "ty21"))[-1]
            assert (op, rec, old) == ("UPDATE", await _want(tenant, "ty21", 1), before), ddl
            n += 1
        want = await _want(tenant, "ty21", 10)
        await tenant.execute("DELETE FROM ty21 WHERE id = 10")
        op, rec, old = (await _images(control_db, project.id, "ty21"))[-1]
        assert (op, rec, old) == ("DELETE", want, want)
        assert "aaaaaaaaaa" in want and want["z"] == -32768 and want["v"] == "x"
    finally:
        await other.close()


async def test_images_of_stored_generated_columns_are_to_jsonb_of_the_row(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A stored generated column: the image carries the generated value, as to_jsonb of the row,
    for INSERT, UPDATE and DELETE."""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TABLE gen21 (id int PRIMARY KEY, a int, s int GENERATED ALWAYS AS (a * 2) STORED)"
    )
    await tenant.execute("INSERT INTO gen21 (id, a) VALUES (1, 5)")
    ins = await _want(tenant, "gen21", 1)
    await tenant.execute("UPDATE gen21 SET a = 6 WHERE id = 1")
    upd = await _want(tenant, "gen21", 1)
    await tenant.execute("DELETE FROM gen21 WHERE id = 1")
    got = await _images(control_db, project.id, "gen21")
    assert [g[1]["s"] for g in got] == [10, 12, 12]
    assert got == [("INSERT", ins, None), ("UPDATE", upd, ins), ("DELETE", upd, upd)]


async def test_images_of_virtual_generated_columns_are_to_jsonb_of_the_row(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A (PostgreSQL 18) virtual generated column: the image should carry its value, as
    to_jsonb of the row selected does."""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TABLE vgen21 (id int PRIMARY KEY, a int, v int GENERATED ALWAYS AS (a * 3) VIRTUAL)"
    )
    await tenant.execute("INSERT INTO vgen21 (id, a) VALUES (1, 5)")
    ins = await _want(tenant, "vgen21", 1)
    assert ins["v"] == 15
    await tenant.execute("UPDATE vgen21 SET a = 6 WHERE id = 1")
    upd = await _want(tenant, "vgen21", 1)
    got = await _images(control_db, project.id, "vgen21")
    assert got == [("INSERT", ins, None), ("UPDATE", upd, ins)]


async def test_images_of_toasted_values_and_after_256_relations(
    tenant: asyncpg.Connection, superuser: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """Text pushed as it is (detoasted: an out-of-line, incompressible 256 KiB value, and a
    compressed one) in INSERT, UPDATE (unchanged toasted column in both images) and DELETE; then
    300 more captured relations written by the same backend (its kept plans dropped and
    restarted at 256) and the first table written again: every image is to_jsonb of the row
    and the server did not restart."""
    assert await _native(control_db)
    start = await superuser.fetchval("SELECT pg_postmaster_start_time()")
    await tenant.execute("CREATE TABLE big21 (id int PRIMARY KEY, t text, c text, n int)")
    await tenant.execute(
        "INSERT INTO big21 SELECT 1, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 8192) g), "
        "repeat('ab', 100000), 1"
    )
    ins = await _want(tenant, "big21", 1)
    await tenant.execute("UPDATE big21 SET n = 2")
    upd = await _want(tenant, "big21", 1)
    await tenant.execute(
        "DO $$ BEGIN FOR i IN 1..300 LOOP "
        "EXECUTE format('CREATE TABLE many21_%s (id int PRIMARY KEY, v bigint)', i); "
        "EXECUTE format('INSERT INTO many21_%s VALUES (1, %s)', i, -i); END LOOP; END $$"
    )
    await tenant.execute("UPDATE big21 SET n = 3")
    upd3 = await _want(tenant, "big21", 1)
    await tenant.execute("DELETE FROM big21")
    got = await _images(control_db, project.id, "big21")
    assert len(ins["t"]) == 8192 * 32 and len(ins["c"]) == 200000
    assert got == [("INSERT", ins, None), ("UPDATE", upd, ins), ("UPDATE", upd3, upd), ("DELETE", upd3, upd3)]
    for i in (1, 256, 257, 300):
        assert await _images(control_db, project.id, f"many21_{i}") == [("INSERT", {"id": 1, "v": -i}, None)]
    assert await superuser.fetchval("SELECT pg_postmaster_start_time()") == start


async def test_a_cast_to_json_made_later_by_another_session_changes_the_image(
    stack: Stack,
    instance: Instance,
    tenant: asyncpg.Connection,
    project: Any,
    control_db: asyncpg.Pool,
) -> None:
    """to_jsonb renders a non-built-in type through its cast to json if it has one: a tenant's
    enum column planned as 'output function' (kept) must follow another session's CREATE CAST
    (the cast's json from the next write on) and DROP CAST (back to the text). Types and domains
    named like base types (a domain int4 over text, a type int8 in the tenant schema) render as
    to_jsonb renders them."""
    assert await _native(control_db)
    other = await _tenant_conn(stack, instance, project.id)
    try:
        await tenant.execute(
            "CREATE TYPE c21 AS ENUM ('a', 'b'); CREATE DOMAIN int4 AS text; "
            "CREATE TYPE int8 AS ENUM ('9223372036854775807'); "
            "CREATE TABLE cast21 (id int PRIMARY KEY, c c21, d int4, e int8, f pg_catalog.int4)"
        )
        await tenant.execute("INSERT INTO cast21 VALUES (1, 'a', '007', '9223372036854775807', 7)")
        assert await _last_record(control_db, project.id, "cast21") == await _want(tenant, "cast21", 1)
        await other.execute(
            "CREATE FUNCTION c21_json(c21) RETURNS json LANGUAGE sql IMMUTABLE "
            "AS $$ SELECT json_build_object('cast', $1::text) $$; "
            "CREATE CAST (c21 AS json) WITH FUNCTION c21_json(c21)"
        )
        await tenant.execute("INSERT INTO cast21 VALUES (2, 'b', '-0', '9223372036854775807', -0)")
        got = await _last_record(control_db, project.id, "cast21")
        want = await _want(tenant, "cast21", 2)
        assert want["c"] == {"cast": "b"}
        assert got == want
        await other.execute("DROP CAST (c21 AS json)")
        await tenant.execute("INSERT INTO cast21 VALUES (3, 'a', NULL, NULL, 0)")
        assert await _last_record(control_db, project.id, "cast21") == await _want(tenant, "cast21", 3)
    finally:
        await other.close()


async def test_a_nested_capture_in_a_cast_function_keeps_both_images_right(
    superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The tenant's cast to json of a column's type writes to another captured table (that
    capture nested in the outer one's image building, both keeping plans): both tables' images
    are right, the cast ran as the tenant (never as the writer), the backend
    lives."""
    assert await _native(control_db)
    start = await superuser.fetchval("SELECT pg_postmaster_start_time()")
    await tenant.execute(
        "CREATE TABLE side21 (id serial PRIMARY KEY, v int, who text DEFAULT current_user); "
        "CREATE TYPE n21 AS ENUM ('p', 'q'); "
        "CREATE FUNCTION n21_json(x n21) RETURNS json LANGUAGE plpgsql VOLATILE AS $$ "
        "BEGIN INSERT INTO side21 (v) VALUES (length(x::text)); "
        "RETURN json_build_array(x::text, (SELECT count(*) FROM side21)); END $$; "
        "CREATE CAST (n21 AS json) WITH FUNCTION n21_json(n21); "
        "CREATE TABLE nest21 (id int PRIMARY KEY, z int, n n21, y bigint)"
    )
    await tenant.execute("INSERT INTO nest21 SELECT g, g, 'p', -g FROM generate_series(1, 3) g")
    await tenant.execute("UPDATE nest21 SET z = z + 1")
    await tenant.execute("DELETE FROM nest21 WHERE id = 1")
    got = await _images(control_db, project.id, "nest21")
    assert [g[0] for g in got] == ["INSERT"] * 3 + ["UPDATE"] * 3 + ["DELETE"]
    assert all(isinstance(g[1]["n"], list) and g[1]["z"] >= 1 and g[1]["y"] < 0 for g in got)
    side = await _images(control_db, project.id, "side21")
    assert len(side) == (await tenant.fetchval("SELECT count(*) FROM side21"))
    me = role_name(project.id, "admin")
    assert all(rec == {"id": rec["id"], "v": 1, "who": me} for _, rec, _ in side)
    assert await superuser.fetchval("SELECT pg_postmaster_start_time()") == start


async def test_a_cast_function_writing_its_own_table_and_making_types_mid_image(
    superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The tenant's cast to json, run while the UPDATE capture builds a row's image (only then:
    a setting of the session), creates a
    type (every kept plan goes stale: the nested capture rebuilds the kept plan of this very
    table, freeing the one the outer call copied) and inserts into the same table (a nested
    INSERT capture of it): every image is to_jsonb of its row, the backend lives."""
    assert await _native(control_db)
    start = await superuser.fetchval("SELECT pg_postmaster_start_time()")
    await tenant.execute(
        "CREATE SEQUENCE r21s; CREATE TYPE r21 AS ENUM ('p', 'q'); "
        "CREATE TABLE self21 (id int PRIMARY KEY, n r21, k bigint, t text); "
        "CREATE FUNCTION r21_json(x r21) RETURNS json LANGUAGE plpgsql VOLATILE AS $$ "
        "DECLARE s bigint; BEGIN IF x = 'p' AND current_setting('r21.nest', true) = 'on' THEN "
        "s := nextval('r21s'); "
        "EXECUTE format('CREATE TYPE r21_%s AS ENUM (''a'')', s); "
        "INSERT INTO self21 VALUES (100 + s, 'q', s, repeat('z', 3)); END IF; "
        "RETURN json_build_object('v', x::text); END $$; "
        "CREATE CAST (r21 AS json) WITH FUNCTION r21_json(r21)"
    )
    await tenant.execute("INSERT INTO self21 VALUES (1, 'q', -1, 'a'), (2, 'q', -2, 'b')")
    before = {i: await _want(tenant, "self21", i) for i in (1, 2)}
    await tenant.execute("SET r21.nest = 'on'; UPDATE self21 SET n = 'p' WHERE id IN (1, 2); RESET r21.nest")
    after = {i: await _want(tenant, "self21", i) for i in (1, 2, 101, 102)}
    got = await _images(control_db, project.id, "self21")
    assert sorted(got, key=lambda g: (g[0], g[1]["id"])) == [
        ("INSERT", before[1], None),
        ("INSERT", before[2], None),
        ("INSERT", after[101], None),
        ("INSERT", after[102], None),
        ("UPDATE", after[1], before[1]),
        ("UPDATE", after[2], before[2]),
    ]
    assert after[1]["n"] == {"v": "p"} and after[101]["n"] == {"v": "q"}
    assert await superuser.fetchval("SELECT pg_postmaster_start_time()") == start


async def test_the_backend_does_not_grow_over_20000_captured_writes(
    superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """20 000 captured single-row statements (INSERT and UPDATE, text, enum through its output
    function, numeric through datum_to_jsonb, integers straight, a jsonb column) in one backend:
    its private resident memory (RssAnon: not the shared buffers it touches) grows by less than
    2 MiB between the 2 000th and the 20 000th."""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TYPE m21 AS ENUM ('lo', 'hi'); "
        "CREATE TABLE mem21 (id int PRIMARY KEY, i8 bigint, t text, m m21, n numeric, j jsonb, "
        "ts timestamptz DEFAULT now())"
    )
    pid = await tenant.fetchval("SELECT pg_backend_pid()")

    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        raise AssertionError("no RssAnon")

    loop = (
        "DO $$ BEGIN FOR i IN {a}..{b} LOOP "
        "INSERT INTO mem21 VALUES (i, -i, repeat('x', 40), 'hi', i / 7.0, jsonb_build_object('k', i)); "
        "UPDATE mem21 SET t = 'y' WHERE id = i; END LOOP; END $$"
    )
    for k in range(10):  # ten transactions of 1 000 INSERTs and 1 000 UPDATEs
        await tenant.execute(loop.format(a=k * 1000 + 1, b=k * 1000 + 1000))
        if k == 0:
            first = rss()
    last = rss()
    assert (
        await control_db.fetchval(
            "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND table_name = 'mem21' "
            "AND kind = 'row'",
            project.id,
        )
        == 20000
    )
    assert last - first < 2 * 1024, (first, last)


async def test_kept_answers_follow_a_revoke_of_waiting_and_the_database_owner(
    superuser: asyncpg.Connection, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """With a reader waiting and the hint forced to 0, a long-lived tenant session's writes trust
    the hint (kept 'may read waiting' and 'may read the hint'). Another session revokes the
    writer's SELECT (waiting) on event_readers: the very next write must not keep trusting the
    hint (the saved SELECT would be refused: the write is, 42501, as review 17 made every path).
    Then the writer's INSERT only through pg_database_owner (a DATABASEOID fact): granted by
    making the writer the database's owner, then the owner changed back: the next write is
    refused."""
    assert await _native(control_db)
    reader = f"r21-{project.id}"
    db = await superuser.fetchval("SELECT current_database()")
    owner = await superuser.fetchval(
        "SELECT datdba::regrole::text FROM pg_database WHERE datname = current_database()"
    )
    await tenant.execute("CREATE TABLE wait21 (id int PRIMARY KEY)")
    await superuser.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ($1, true)", reader
    )
    try:
        await superuser.execute("SELECT setval('fluxbase.readers_waiting_hint', 0)")
        await tenant.execute("INSERT INTO wait21 VALUES (1)")
        await tenant.execute("INSERT INTO wait21 VALUES (2)")  # kept
        await superuser.execute(
            "REVOKE SELECT (waiting) ON fluxbase.event_readers FROM fluxbase_outbox_writer"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO wait21 VALUES (3)")
        await superuser.execute("GRANT SELECT (waiting) ON fluxbase.event_readers TO fluxbase_outbox_writer")
        await tenant.execute("INSERT INTO wait21 VALUES (4)")
        # INSERT only through the database owner's pseudo-role
        await superuser.execute("GRANT INSERT ON fluxbase.events TO pg_database_owner")
        await superuser.execute("REVOKE INSERT ON fluxbase.events FROM fluxbase_outbox_writer")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO wait21 VALUES (5)")
        await superuser.execute(f'ALTER DATABASE "{db}" OWNER TO fluxbase_outbox_writer')
        await tenant.execute("INSERT INTO wait21 VALUES (6)")
        await tenant.execute("INSERT INTO wait21 VALUES (7)")  # kept
        await superuser.execute(f'ALTER DATABASE "{db}" OWNER TO {owner}')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO wait21 VALUES (8)")
    finally:
        await superuser.execute(f'ALTER DATABASE "{db}" OWNER TO {owner}')
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
        await superuser.execute("REVOKE INSERT ON fluxbase.events FROM pg_database_owner")
        await superuser.execute("GRANT SELECT (waiting) ON fluxbase.event_readers TO fluxbase_outbox_writer")
        await superuser.execute("DELETE FROM fluxbase.event_readers WHERE reader_id = $1", reader)
    ops = [rec["id"] for _, rec, _ in await _images(control_db, project.id, "wait21")]
    assert ops == [1, 2, 4, 6, 7]


async def test_images_of_partitions_with_other_column_orders(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A partitioned table whose partitions lay their columns out differently (the parent and
    one partition with a dropped first column, the other without; a column added to all later):
    kept plans are per relation and a row-level UPDATE capture fires with the partition as its
    relation; every image (whichever table it is attributed to) is to_jsonb of the row. (A
    table made apart cannot be attached: its capture trigger's name collides with the
    parent's clone, DuplicateObjectError; not capture6's.)"""
    assert await _native(control_db)
    await tenant.execute(
        "CREATE TABLE par21 (x int, id int, a bigint, b text) PARTITION BY RANGE (id); "
        "CREATE TABLE par21_a PARTITION OF par21 FOR VALUES FROM (0) TO (100); "
        "ALTER TABLE par21 DROP COLUMN x; "
        "CREATE TABLE par21_b PARTITION OF par21 FOR VALUES FROM (100) TO (200); "
        "ALTER TABLE par21 ADD COLUMN c smallint"
    )
    await tenant.execute("INSERT INTO par21 VALUES (1, -1, 'one', 1), (101, -101, 'hundred', -32768)")
    ins = {i: await _want(tenant, "par21", i) for i in (1, 101)}
    await tenant.execute("UPDATE par21 SET b = b || '!', a = a * 2")
    upd = {i: await _want(tenant, "par21", i) for i in (1, 101)}
    await tenant.execute("DELETE FROM par21")
    rows = await control_db.fetch(
        f"SELECT e.operation, e.record::text AS record, {OLD_IMAGE_SQL}::text AS old FROM fluxbase.events e "
        "WHERE project_id = $1 AND table_name LIKE 'par21%' AND kind = 'row' ORDER BY xid, id",
        project.id,
    )
    got = [
        (r["operation"], json.loads(r["record"]), None if r["old"] is None else json.loads(r["old"]))
        for r in rows
    ]
    seen = sorted((op, rec["id"]) for op, rec, _ in got)
    assert seen == sorted((op, i) for op in ("INSERT", "UPDATE", "DELETE") for i in (1, 101)), got
    for op, rec, old in got:
        i = rec["id"]
        want = {"INSERT": (ins[i], None), "UPDATE": (upd[i], ins[i]), "DELETE": (upd[i], upd[i])}[op]
        assert (rec, old) == want, op
