"""Hostile review 17: branch capture5 (the C capture keeps the outbox's oids, layout and IndexInfo
between calls; the outbox's identity sequence caches 64 ids per backend, sql/0050).

Review 16 (tests/test_attack_review16.py) attacked the C capture's images, bytes, trigger shapes,
tenant code and isolation levels; this one attacks what capture5 added: the kept catalog facts
(savepoints rolled back around outbox DDL, VACUUM FULL, REINDEX CONCURRENTLY, DISCARD ALL, a
dropped and re-created tenant table), the sequence cache (readers' (xid, id) cursors over
interleaved sessions), the outbox writer's privileges, and the memory a backend keeps per call.
Each test asserts the secure/correct behaviour; a hole not fixed here stays
`xfail(strict=True)` with its reason.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from conftest import Instance
from fluxbase.security.roles import role_name, role_password
from support import Stack
from test_attack_review16 import plpgsql_capture  # noqa: F401  (the PL/pgSQL capture for one test)
from test_capture_native import _indexes_hold_every_row, _native, superuser, tenant  # noqa: F401


async def _tenant_conn(stack: Stack, instance: Instance, pid: str) -> asyncpg.Connection:
    """Another session (another backend) as the project's admin role."""
    role = role_name(pid, "admin")
    server = urlsplit(stack.admin_url)
    return await asyncpg.connect(
        host=server.hostname or "127.0.0.1",
        port=server.port or 5432,
        user=role,
        password=role_password(stack.secret_key, role),
        database=instance.dbname,
    )


@pytest.fixture
async def tenant2(stack: Stack, instance: Instance, project: Any) -> AsyncIterator[asyncpg.Connection]:
    conn = await _tenant_conn(stack, instance, project.id)
    try:
        yield conn
    finally:
        await conn.close()


async def _ops(control_db: asyncpg.Pool, pid: str, table: str) -> list[tuple[str, int]]:
    rows = await control_db.fetch(
        "SELECT operation, record::text AS record FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = $2 AND kind = 'row' ORDER BY xid, id",
        pid,
        table,
    )
    return [(r["operation"], json.loads(r["record"])["id"]) for r in rows]


async def _mark(conn: asyncpg.Connection) -> Any:
    return await conn.fetchval("SELECT pg_postmaster_start_time()")


# -- the kept catalog facts ---------------------------------------------------------------------


async def test_outbox_index_ddl_in_a_savepoint_rolled_back_is_followed(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    control_db: asyncpg.Pool,
) -> None:
    """One backend, one transaction: the capture learns the outbox (facts kept), then in a
    savepoint an outbox index is dropped and a new one created, a capture learns that shape, and
    the savepoint is rolled back (this backend's own invalidations undo it): the captures after
    it write into the restored index (amcheck heapallindexed) and never into the rolled-back
    one; the server stays up."""
    assert await _native(control_db)
    started = await _mark(superuser)
    me = role_name(project.id, "admin")
    t = f'"p_{project.id}".sp17'
    await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
    await superuser.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
    await superuser.execute(f"INSERT INTO {t} VALUES (1, 'a')")
    await superuser.execute("RESET SESSION AUTHORIZATION")
    async with superuser.transaction():
        await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
        await superuser.execute(f"INSERT INTO {t} VALUES (2, 'a')")  # learnt in this transaction
        await superuser.execute("RESET SESSION AUTHORIZATION")
        sp = superuser.transaction()
        await sp.start()
        await superuser.execute("DROP INDEX fluxbase.events_project_xid_idx")
        await superuser.execute("CREATE INDEX review17_sp_idx ON fluxbase.events (table_name, id)")
        await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
        await superuser.execute(f"INSERT INTO {t} VALUES (3, 'a')")
        await superuser.execute(f"UPDATE {t} SET v = 'b' WHERE id = 3")
        await superuser.execute("RESET SESSION AUTHORIZATION")
        await sp.rollback()
        await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
        await superuser.execute(f"INSERT INTO {t} VALUES (4, 'a'), (5, 'a')")
        await superuser.execute(f"UPDATE {t} SET v = 'c' WHERE id = 4")
        await superuser.execute(f"DELETE FROM {t} WHERE id = 1")
        await superuser.execute("RESET SESSION AUTHORIZATION")
    assert await superuser.fetchval("SELECT to_regclass('fluxbase.review17_sp_idx')") is None
    assert await _ops(control_db, project.id, "sp17") == [
        ("INSERT", 1),
        ("INSERT", 2),
        ("INSERT", 4),
        ("INSERT", 5),
        ("UPDATE", 4),
        ("DELETE", 1),
    ]
    await _indexes_hold_every_row(superuser)
    assert await _mark(superuser) == started


async def test_vacuum_full_reindex_concurrently_and_a_recreated_table_are_followed(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    tenant: asyncpg.Connection,  # noqa: F811
    control_db: asyncpg.Pool,
) -> None:
    """A long-lived tenant session whose backend keeps the outbox's facts, while an operator
    rewrites the outbox (VACUUM FULL: new files, same oids), rebuilds its indexes concurrently
    (REINDEX CONCURRENTLY: new index oids swapped in), and the tenant drops and re-creates its
    table under the same name and runs DISCARD ALL: every capture lands in the table and every
    index (amcheck), the tenant's backend and the server survive."""
    assert await _native(control_db)
    started = await _mark(superuser)
    pid_before = await tenant.fetchval("SELECT pg_backend_pid()")
    await tenant.execute("CREATE TABLE vf (id int PRIMARY KEY, v text)")
    await tenant.execute("INSERT INTO vf VALUES (1, 'a')")
    idx_before = set(
        await superuser.fetchval(
            "SELECT array_agg(indexrelid::oid) FROM pg_index WHERE indrelid = 'fluxbase.events'::regclass"
        )
    )
    await superuser.execute("VACUUM FULL fluxbase.events")
    await tenant.execute("INSERT INTO vf VALUES (2, 'a')")
    await tenant.execute("UPDATE vf SET v = 'b' WHERE id = 2")
    await superuser.execute("REINDEX TABLE CONCURRENTLY fluxbase.events")
    idx_after = set(
        await superuser.fetchval(
            "SELECT array_agg(indexrelid::oid) FROM pg_index WHERE indrelid = 'fluxbase.events'::regclass"
        )
    )
    assert idx_before.isdisjoint(idx_after)  # the kept index oids are all gone
    await tenant.execute("INSERT INTO vf VALUES (3, 'a')")
    await tenant.execute("DELETE FROM vf WHERE id = 1")
    await tenant.execute("DROP TABLE vf")
    await tenant.execute("CREATE TABLE vf (id int PRIMARY KEY, w int)")
    await tenant.execute("INSERT INTO vf VALUES (10, 1)")
    await tenant.execute("DISCARD ALL")
    await tenant.execute("INSERT INTO vf VALUES (11, 1)")
    await tenant.execute("UPDATE vf SET w = 2 WHERE id = 11")
    assert await _ops(control_db, project.id, "vf") == [
        ("INSERT", 1),
        ("INSERT", 2),
        ("UPDATE", 2),
        ("INSERT", 3),
        ("DELETE", 1),
        ("INSERT", 10),
        ("INSERT", 11),
        ("UPDATE", 11),
    ]
    await _indexes_hold_every_row(superuser)
    # (statement texts asyncpg has not prepared before: DISCARD ALL dropped its prepared ones)
    assert await tenant.fetchval("SELECT pg_backend_pid() AS after_discard") == pid_before
    assert await tenant.fetchval("SELECT current_user AS after_discard") == role_name(project.id, "admin")
    assert await _mark(superuser) == started


async def test_an_index_built_concurrently_while_captures_run_holds_every_row(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    tenant: asyncpg.Connection,  # noqa: F811
    tenant2: asyncpg.Connection,
    control_db: asyncpg.Pool,
) -> None:
    """CREATE INDEX CONCURRENTLY (and REINDEX CONCURRENTLY) of the outbox while one tenant
    backend holds a capturing transaction open across the build and another keeps capturing in
    short transactions (both with the outbox's facts kept from before the index existed): once
    the build ends, the new index holds every row of the outbox (amcheck heapallindexed), so
    no capture skipped an index that was ready, and no event is lost."""
    assert await _native(control_db)
    started = await _mark(superuser)
    await tenant.execute("CREATE TABLE cic17 (id int PRIMARY KEY)")
    await tenant.execute("INSERT INTO cic17 VALUES (1)")
    await tenant2.execute("INSERT INTO cic17 VALUES (2)")
    tx = tenant2.transaction()
    await tx.start()
    await tenant2.execute("INSERT INTO cic17 VALUES (3)")
    build = asyncio.ensure_future(
        control_db.execute(
            "CREATE INDEX CONCURRENTLY review17_cic_idx ON fluxbase.events (project_id, table_name)"
        )
    )
    try:
        keys = [3]
        for i in range(4, 24):
            await (tenant if i % 3 else tenant2).execute("INSERT INTO cic17 VALUES ($1)", i)
            keys.append(i)
            await asyncio.sleep(0.01)
        assert not build.done()  # waits for tenant2's open transaction
        await tx.commit()
        await asyncio.wait_for(build, 30)
        for i in range(24, 30):
            await (tenant if i % 2 else tenant2).execute("INSERT INTO cic17 VALUES ($1)", i)
        reindex = asyncio.ensure_future(
            control_db.execute("REINDEX INDEX CONCURRENTLY fluxbase.review17_cic_idx")
        )
        for i in range(30, 40):
            await (tenant if i % 2 else tenant2).execute("INSERT INTO cic17 VALUES ($1)", i)
        await asyncio.wait_for(reindex, 30)
        await tenant.execute("INSERT INTO cic17 VALUES (40)")
        await tenant2.execute("INSERT INTO cic17 VALUES (41)")
        assert sorted(k for _, k in await _ops(control_db, project.id, "cic17")) == list(range(1, 42))
        await _indexes_hold_every_row(superuser)
        assert await superuser.fetchval(
            "SELECT indisvalid AND indisready FROM pg_index "
            "WHERE indexrelid = 'fluxbase.review17_cic_idx'::regclass"
        )
    finally:
        if not build.done():
            build.cancel()
        await superuser.execute("DROP INDEX IF EXISTS fluxbase.review17_cic_idx")
    assert await _mark(superuser) == started


async def test_a_statement_cancelled_mid_capture_leaves_the_session_and_outbox_sane(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    tenant: asyncpg.Connection,  # noqa: F811
    control_db: asyncpg.Pool,
) -> None:
    """Statements of many rows cancelled by statement_timeout at different points (building the
    images, or in the direct write's loop while the user id is the outbox writer's): each
    aborts cleanly, the session is the tenant's again (no writer's rights left behind), later
    captures write normally, the outbox holds exactly the committed rows' events and its
    indexes every row (amcheck); the server stays up."""
    assert await _native(control_db)
    started = await _mark(superuser)
    me = role_name(project.id, "admin")
    await tenant.execute("CREATE TABLE cx17 (id int PRIMARY KEY, v text)")
    cancelled = 0
    base = 0
    for ms in (40, 80, 160, 320, 640):
        await tenant.execute(f"SET statement_timeout = {ms}")
        try:
            await tenant.execute(
                "INSERT INTO cx17 SELECT g, repeat('x', 40) FROM generate_series($1::int, $1 + 59999) g", base
            )
        except asyncpg.QueryCanceledError:
            cancelled += 1
        await tenant.execute("RESET statement_timeout")
        base += 60_000
        assert await tenant.fetchval("SELECT current_user::text || session_user::text") == me + me
        await tenant.execute("INSERT INTO cx17 VALUES ($1, 'after')", 10_000_000 + ms)
    assert cancelled >= 1
    rows = await tenant.fetchval("SELECT count(*) FROM cx17")
    events = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND table_name = 'cx17' AND kind = 'row'",
        project.id,
    )
    assert events == rows
    await _indexes_hold_every_row(superuser)
    assert await _mark(superuser) == started


# -- the outbox writer's privileges -------------------------------------------------------------


async def test_the_outbox_write_needs_the_writers_insert_privilege(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    tenant: asyncpg.Connection,  # noqa: F811
    control_db: asyncpg.Pool,
) -> None:
    """The outbox is written with fluxbase_outbox_writer's rights: an operator who revokes its
    INSERT on fluxbase.events (freezing the outbox) gets the refusal every other capture path
    gives, not a silent write around the grant. (Review 17 F1: the direct write checked no
    privilege; seen failing as a strict xfail before the check in outbox_open.)"""
    assert await _native(control_db)
    await tenant.execute("CREATE TABLE acl17 (id int PRIMARY KEY)")
    await tenant.execute("INSERT INTO acl17 VALUES (1)")  # facts kept, the direct write chosen
    await superuser.execute("REVOKE INSERT ON fluxbase.events FROM fluxbase_outbox_writer")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO acl17 VALUES (2)")
    finally:
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
    assert await _ops(control_db, project.id, "acl17") == [("INSERT", 1)]


async def test_the_doorbell_read_needs_the_writers_select_privilege(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    tenant: asyncpg.Connection,  # noqa: F811
    control_db: asyncpg.Pool,
) -> None:
    """The doorbell (is a reader waiting?) reads fluxbase.event_readers with the outbox
    writer's rights, as the saved query and write_events do: once an operator revokes the
    writer's SELECT of `waiting`, a captured write is refused, not answered by a direct read
    around the grant. (Seen failing on a build whose direct read skipped the column check.)"""
    assert await _native(control_db)
    await tenant.execute("CREATE TABLE bell17 (id int PRIMARY KEY)")
    await tenant.execute("INSERT INTO bell17 VALUES (1)")  # facts kept, the direct read chosen
    await superuser.execute("REVOKE SELECT (waiting) ON fluxbase.event_readers FROM fluxbase_outbox_writer")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO bell17 VALUES (2)")
    finally:
        await superuser.execute("GRANT SELECT (waiting) ON fluxbase.event_readers TO fluxbase_outbox_writer")
    await tenant.execute("INSERT INTO bell17 VALUES (3)")
    assert await _ops(control_db, project.id, "bell17") == [("INSERT", 1), ("INSERT", 3)]


async def test_the_plpgsql_capture_needs_the_writers_insert_privilege(
    plpgsql_capture: None,  # noqa: F811
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    tenant: asyncpg.Connection,  # noqa: F811
    control_db: asyncpg.Pool,
) -> None:
    """What the C capture should match (F1): the PL/pgSQL capture (write_events, SECURITY
    DEFINER as fluxbase_outbox_writer) is refused once the writer's INSERT is revoked."""
    assert not await _native(control_db)
    await tenant.execute("CREATE TABLE aclp17 (id int PRIMARY KEY)")
    await tenant.execute("INSERT INTO aclp17 VALUES (1)")
    await superuser.execute("REVOKE INSERT ON fluxbase.events FROM fluxbase_outbox_writer")
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await tenant.execute("INSERT INTO aclp17 VALUES (2)")
    finally:
        await superuser.execute("GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer")
    assert await _ops(control_db, project.id, "aclp17") == [("INSERT", 1)]


# -- the sequence cache and the readers' cursors ------------------------------------------------


async def test_interleaved_sessions_with_cached_ids_read_in_order_exactly_once(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    tenant: asyncpg.Connection,  # noqa: F811
    tenant2: asyncpg.Connection,
    control_db: asyncpg.Pool,
) -> None:
    """Two backends, each with its own 64 cached ids, write interleaved transactions (one open
    across the other's commits, savepoints rolled back after the cache filled). A reader that
    keeps the global cursor of realtime/webhooks (events with (xid, id) after it, below the
    snapshot's xmin, in (xid, id) order) polled after every commit reads every committed event
    exactly once, each transaction's events in their insertion order; and the ids really are out
    of commit order (the cache is in force: `id` alone is no cursor)."""
    assert await _native(control_db)
    await tenant.execute("CREATE TABLE seq17 (id int PRIMARY KEY)")
    read: list[int] = []
    cursor: tuple[int, int] | None = None

    async def poll() -> None:
        nonlocal cursor
        xmin = int(await superuser.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))
        if cursor is None:
            cursor = (0, 0)
        rows = await superuser.fetch(
            "SELECT xid::text AS xid, id, (record->>'id')::int AS k FROM fluxbase.events "
            "WHERE project_id = $1 AND table_name = 'seq17' AND kind = 'row' "
            "AND (xid, id) > ($2::text::xid8, $3::bigint) AND xid < $4::text::xid8 ORDER BY xid, id",
            project.id,
            str(cursor[0]),
            cursor[1],
            str(xmin),
        )
        for r in rows:
            read.append(r["k"])
            cursor = (int(r["xid"]), r["id"])

    k = 0

    async def ins(conn: asyncpg.Connection, rows: int = 1) -> list[int]:
        nonlocal k
        keys = list(range(k + 1, k + rows + 1))
        k += rows
        await conn.execute("INSERT INTO seq17 SELECT unnest($1::int[])", keys)
        return keys

    committed: list[int] = []
    committed += await ins(tenant)  # tenant's backend caches ids
    await poll()
    committed += await ins(tenant2, 3)  # tenant2's backend: the next 64, higher
    await poll()
    tx = tenant.transaction()
    await tx.start()
    a1 = await ins(tenant)  # lower id than tenant2's, open
    sp = tenant.transaction()
    await sp.start()
    await ins(tenant, 2)  # rolled back: its ids are used up, not reused
    await sp.rollback()
    b1 = await ins(tenant2, 2)  # commits while tenant's transaction is open
    committed += b1
    await poll()
    a2 = await ins(tenant, 2)
    await tx.commit()
    committed += a1 + a2
    await poll()
    committed += await ins(tenant)
    await poll()
    assert sorted(read) == sorted(committed)  # every committed event, once
    assert len(read) == len(set(read))
    ids = {
        r["k"]: r["id"]
        for r in await control_db.fetch(
            "SELECT (record->>'id')::int AS k, id FROM fluxbase.events "
            "WHERE project_id = $1 AND table_name = 'seq17' AND kind = 'row'",
            project.id,
        )
    }
    # within each transaction, insertion order (a1 then a2 in tenant's one transaction)
    assert [ids[x] for x in a1 + a2] == sorted(ids[x] for x in a1 + a2)
    # and in the reader's order, a transaction's events are contiguous and in insertion order
    assert read.index(a1[0]) < read.index(a2[0]) < read.index(a2[1])
    # the cache is in force: an event committed later carries a lower id than an earlier one
    assert ids[a1[0]] < ids[b1[0]]


# -- memory -------------------------------------------------------------------------------------


async def test_a_backend_keeps_no_memory_per_capture(
    superuser: asyncpg.Connection,  # noqa: F811
    project: Any,
    control_db: asyncpg.Pool,
) -> None:
    """A backend capturing hundreds of statements (the direct write, and relearning the outbox
    after an invalidation every statement) keeps a bounded amount of memory: what it keeps
    between calls is reset, never accumulated."""
    assert await _native(control_db)
    me = role_name(project.id, "admin")
    t = f'"p_{project.id}".mem17'

    async def used() -> int:
        return int(await superuser.fetchval("SELECT sum(total_bytes) FROM pg_backend_memory_contexts"))

    async def burst(n: int, inval: bool, base: int = 0) -> None:
        for i in range(n):
            if inval:
                # a relcache invalidation of the outbox: the next capture learns it again
                await superuser.execute("RESET SESSION AUTHORIZATION")
                await superuser.execute(
                    f"ALTER TABLE fluxbase.events SET (autovacuum_vacuum_threshold = {50 + i % 2})"
                )
                await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
            await superuser.execute(f"INSERT INTO {t} VALUES ($1, 'a')", base + i)
            await superuser.execute(f"UPDATE {t} SET v = 'b' WHERE id = $1", base + i)
        await superuser.execute("RESET SESSION AUTHORIZATION")

    await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
    await superuser.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
    await burst(50, False)  # warm: plans, caches (ends as the superuser, who may read the view)
    before = await used()
    await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
    # (continues the ids after the warm-up)
    for i in range(50, 450):
        await superuser.execute(f"INSERT INTO {t} VALUES ($1, 'a')", i)
        await superuser.execute(f"UPDATE {t} SET v = 'b' WHERE id = $1", i)
    await superuser.execute("RESET SESSION AUTHORIZATION")
    plain = await used() - before
    try:
        await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
        await burst(20, True, 100_000)  # warm the relearning
        mid = await used()
        await superuser.execute(f'SET SESSION AUTHORIZATION "{me}"')
        await burst(150, True, 200_000)
        relearn = await used() - mid
    finally:
        await superuser.execute("RESET SESSION AUTHORIZATION")
        await superuser.execute("ALTER TABLE fluxbase.events RESET (autovacuum_vacuum_threshold)")
    # 800 captured statements / 300 relearnings: well under 100 bytes each
    assert plain < 64 * 1024, plain
    assert relearn < 64 * 1024, relearn
    assert await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events "
        "WHERE project_id = $1 AND table_name = 'mem17' AND kind = 'row'",
        project.id,
    ) == 2 * (450 + 170)
