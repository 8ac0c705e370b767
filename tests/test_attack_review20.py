"""Hostile review 20: the doorbell's hint (commit fba6069: sql/0052 and `readers_hint()` in the C
capture). A sequence, fluxbase.readers_waiting_hint, kept by a statement trigger on
fluxbase.event_readers under an EXCLUSIVE lock of fluxbase.readers_hint_lock, lets a captured
write skip the event_readers scan while it says 0 (no reader waits), so a wrong 0 is a lost
doorbell (realtime and webhooks stall until their idle poll).

Attacked: a tenant's reach to the sequence, the lock table and the trigger function (as its LOGIN
role and through /api/execute-sql); a tenant's lock held on the sequence; readers holding the
hint's lock against captured writes; writers at every isolation level; a reader waking at
REPEATABLE READ while another falls asleep; a reader's aborted wake; a transaction changing two
readers' rows. Each test asserts the secure/correct behaviour; a hole still open is
`xfail(strict=True)` with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from conftest import ROOT_EMAIL, ROOT_PASSWORD, Instance, spawn_instance
from support import Api, Stack
from test_attack_review17 import _tenant_conn
from test_capture_native import superuser, tenant  # noqa: F401

HINT = "fluxbase.readers_waiting_hint"


async def _hint(conn: asyncpg.Connection) -> int | None:
    return await conn.fetchval(f"SELECT pg_sequence_last_value('{HINT}')")


async def _agrees(conn: asyncpg.Connection) -> tuple[int | None, bool]:
    """(hint, whether event_readers says a reader waits), read under the hint's lock."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE fluxbase.readers_hint_lock IN EXCLUSIVE MODE")
        hint = await _hint(conn)
        anyone = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting)")
    return hint, bool(anyone)


@dataclass
class Quiet:
    """A database of its own (its own API applied the migrations): no reader but this file's
    ever waits there, so the hint's value is this file's doing alone."""

    inst: Instance
    pid: str

    async def superuser(self, stack: Stack) -> asyncpg.Connection:
        return await asyncpg.connect(stack.database_url(self.inst.dbname))


@pytest.fixture(scope="module")
async def quiet(stack: Stack, log_dir: Path) -> AsyncIterator[Quiet]:
    async with spawn_instance(stack, log_dir) as inst:
        client = Api(inst.url)
        try:
            await client.register(email=ROOT_EMAIL, password=ROOT_PASSWORD, name="Root")
            _, token = await client.new_user()
            pid = await client.new_project(token)
        finally:
            await client.close()
        yield Quiet(inst, pid)


@dataclass
class QuietConns:
    su: asyncpg.Connection
    tenant: asyncpg.Connection
    readers: list[str]
    url: str


@pytest.fixture
async def q(stack: Stack, quiet: Quiet) -> AsyncIterator[QuietConns]:
    """The quiet database: a superuser session, a tenant session and two reader rows (awake)."""
    su = await quiet.superuser(stack)
    tconn = await _tenant_conn(stack, quiet.inst, quiet.pid)
    ids = ["r20-quiet-a", "r20-quiet-b"]
    await su.execute("DELETE FROM fluxbase.event_readers")
    await su.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) SELECT unnest($1::text[]), false", ids
    )
    try:
        yield QuietConns(su, tconn, ids, stack.database_url(quiet.inst.dbname))
    finally:
        await su.execute("DELETE FROM fluxbase.event_readers")
        await tconn.close()
        await su.close()


@pytest.fixture
async def readers(superuser: asyncpg.Connection, project: Any) -> AsyncIterator[list[str]]:  # noqa: F811
    """Two reader rows of this test (awake), removed afterwards."""
    ids = [f"r20-a-{project.id}", f"r20-b-{project.id}"]
    await superuser.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting) SELECT unnest($1::text[]), false", ids
    )
    try:
        yield ids
    finally:
        await superuser.execute("DELETE FROM fluxbase.event_readers WHERE reader_id = ANY($1::text[])", ids)


async def _rings(listener: asyncpg.Connection, writer: asyncpg.Connection, table: str, iso: str = "") -> bool:
    """Does one captured write (committed) by `writer` ring the doorbell heard on `listener`?"""
    heard: list[str] = []

    def on(*args: Any) -> None:
        heard.append(args[2])

    await listener.add_listener("fluxbase_events", on)
    try:
        async with writer.transaction(isolation=iso or "read_committed"):
            await writer.execute(f"INSERT INTO {table} VALUES (1)")
            await writer.execute(f"DELETE FROM {table}")
        for _ in range(100):
            if heard:
                return True
            await asyncio.sleep(0.02)
        return False
    finally:
        await listener.remove_listener("fluxbase_events", on)


# -- the tenant ---------------------------------------------------------------------------------

DENIED = [
    "SELECT setval('{hint}', 0)",
    "SELECT setval({oid}::oid::regclass, 0)",
    "SELECT nextval({oid}::oid::regclass)",
    "SELECT last_value FROM {hint}",
    "ALTER SEQUENCE {hint} RESTART WITH 0",
    "ALTER SEQUENCE {hint} OWNED BY NONE",
    "LOCK TABLE fluxbase.readers_hint_lock IN EXCLUSIVE MODE",
    "LOCK TABLE fluxbase.readers_hint_lock IN ACCESS SHARE MODE",
    "SELECT FROM fluxbase.readers_hint_lock",
    "DROP TABLE fluxbase.readers_hint_lock",
    "SELECT fluxbase.keep_readers_waiting_hint()",
    "CREATE TRIGGER r20 AFTER INSERT ON r20_own FOR EACH STATEMENT "
    "EXECUTE FUNCTION fluxbase.keep_readers_waiting_hint()",
    "CREATE OR REPLACE FUNCTION fluxbase.keep_readers_waiting_hint() RETURNS trigger "
    "LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$",
    "ALTER TABLE fluxbase.event_readers DISABLE TRIGGER event_readers_hint",
    "UPDATE fluxbase.event_readers SET waiting = false",
    "DELETE FROM fluxbase.event_readers",
    "TRUNCATE fluxbase.event_readers",
    "INSERT INTO fluxbase.event_readers (reader_id, waiting) VALUES ('r20-tenant', false)",
]


async def test_a_tenant_can_neither_move_read_lock_nor_borrow_the_hint(
    superuser: asyncpg.Connection,  # noqa: F811
    tenant: asyncpg.Connection,  # noqa: F811
    readers: list[str],
) -> None:
    """As the project's LOGIN role (what /api/execute-sql runs on): setval/nextval/ALTER of the
    sequence (by name, and by oid past the schema), reading it, locking the lock table in any
    mode, calling the trigger function, attaching it to its own table, replacing it, disabling
    the trigger, changing event_readers: each is refused (42501), and the hint still says 1
    while a reader waits. pg_sequence_last_value (PUBLIC) gives the tenant NULL, not the value."""
    await superuser.execute(
        "UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", readers[0]
    )
    oid = await superuser.fetchval(f"SELECT '{HINT}'::regclass::oid")
    await tenant.execute("CREATE TABLE r20_own (id int)")
    refused = []
    for q in DENIED:
        with pytest.raises(asyncpg.PostgresError) as err:
            async with tenant.transaction():
                await tenant.execute(q.format(hint=HINT, oid=oid))
        refused.append((q, err.value.sqlstate))
    assert all(state == "42501" for _, state in refused), refused
    assert await tenant.fetchval("SELECT pg_sequence_last_value($1::oid::regclass)", oid) is None
    assert await _agrees(superuser) == (1, True)


async def test_the_sql_api_cannot_move_the_hint(
    api: Api,
    project: Any,
    superuser: asyncpg.Connection,  # noqa: F811
    readers: list[str],
) -> None:
    """The same through /api/execute-sql (a project admin key): refused, hint unmoved."""
    await superuser.execute(
        "UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", readers[0]
    )
    oid = await superuser.fetchval(f"SELECT '{HINT}'::regclass::oid")
    for q in [*DENIED[:3], "LOCK TABLE fluxbase.readers_hint_lock IN EXCLUSIVE MODE"]:
        r = await api.sql(project.admin_key, project.id, q.format(hint=HINT, oid=oid))
        body = r.json()
        assert body.get("success") is False and "42501" in str(body["error"]), (q, r.status_code, r.text)
    r = await api.sql(
        project.admin_key, project.id, f"SELECT pg_sequence_last_value({oid}::oid::regclass) AS v"
    )
    assert '"v":null' in r.text.replace(" ", ""), r.text
    assert await _agrees(superuser) == (1, True)


async def test_a_tenant_holding_the_hint_sequence_blocks_neither_readers_nor_captured_writes(
    stack: Stack,
    instance: Instance,
    project: Any,
    superuser: asyncpg.Connection,  # noqa: F811
    tenant: asyncpg.Connection,  # noqa: F811
    readers: list[str],
) -> None:
    """pg_sequence_last_value takes the sequence's RowExclusiveLock before its privilege check
    and returns NULL, so a tenant's open transaction keeps that lock. It conflicts with neither
    the readers' setval nor the capture's read: a reader falls asleep and wakes, and another
    session's captured write rings, each within seconds (the lock would stop only an ALTER or
    DROP of the sequence: a later migration; see the report)."""
    oid = await superuser.fetchval(f"SELECT '{HINT}'::regclass::oid")
    await tenant.execute("CREATE TABLE r20_bell (id int PRIMARY KEY)")
    other = await _tenant_conn(stack, instance, project.id)
    tx = tenant.transaction()
    await tx.start()
    try:
        assert await tenant.fetchval("SELECT pg_sequence_last_value($1::oid::regclass)", oid) is None
        held = await superuser.fetchval(
            "SELECT mode FROM pg_locks WHERE relation = $1 AND pid = $2 AND granted",
            oid,
            tenant.get_server_pid(),
        )
        assert held == "RowExclusiveLock"  # what the tenant holds (the attack's premise)
        await superuser.execute("SET statement_timeout = '3s'")
        await superuser.execute(
            "UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", readers[0]
        )
        assert await asyncio.wait_for(_rings(superuser, other, "r20_bell"), 5)
        await superuser.execute(
            "UPDATE fluxbase.event_readers SET waiting = false WHERE reader_id = $1", readers[0]
        )
    finally:
        await tx.rollback()
        await superuser.execute("RESET statement_timeout")
        await other.close()


# -- readers against writers ----------------------------------------------------------------------


@pytest.mark.parametrize("iso", ["read_committed", "repeatable_read", "serializable"])
async def test_a_reader_holding_the_hint_lock_neither_blocks_nor_silences_a_captured_write(
    iso: str,
    stack: Stack,
    instance: Instance,
    superuser: asyncpg.Connection,  # noqa: F811
    tenant: asyncpg.Connection,  # noqa: F811
    readers: list[str],
) -> None:
    """A reader falls asleep in a transaction left open (it holds the hint's lock, and its
    `waiting = true` is not visible yet: the hint already says 1). A captured write at each
    isolation level neither waits for that lock nor fails; once the reader commits, a captured
    write at that level rings for it."""
    await tenant.execute("CREATE TABLE r20_iso (id int PRIMARY KEY)")
    sleeper = await asyncpg.connect(stack.database_url(instance.dbname))
    tx = sleeper.transaction()
    try:
        await tx.start()
        await sleeper.execute(
            "UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", readers[0]
        )
        assert await _hint(superuser) == 1  # moved before the commit, as sql/0052 says
        async with tenant.transaction(isolation=iso):
            await asyncio.wait_for(tenant.execute("INSERT INTO r20_iso VALUES (1)"), 3)
            await tenant.execute("DELETE FROM r20_iso")
        await tx.commit()
        assert await _rings(superuser, tenant, "r20_iso", iso), f"a reader waits: a {iso} write must ring"
    finally:
        if sleeper.is_in_transaction():
            await tx.rollback()
        await sleeper.close()


async def test_a_repeatable_read_reader_waking_while_another_falls_asleep_leaves_the_hint_up(
    q: QuietConns,
) -> None:
    """The commit's own race test, with the waking reader's session at REPEATABLE READ (one
    autocommit UPDATE, like outbox.py's `_set_waiting`): B's `waiting = true` is uncommitted and
    holds the lock; A wakes, waits for the lock; B commits. The hint must say 1 and a captured
    write must ring for B."""
    a, b = q.readers
    await q.su.execute("UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", a)
    await q.tenant.execute("CREATE TABLE r20_rr (id int PRIMARY KEY)")
    waker = await asyncpg.connect(q.url)
    sleeper = await asyncpg.connect(q.url)
    await waker.execute("SET default_transaction_isolation = 'repeatable read'")
    tx = sleeper.transaction()
    try:
        await tx.start()
        await sleeper.execute("UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", b)
        wake = asyncio.create_task(
            waker.execute("UPDATE fluxbase.event_readers SET waiting = false WHERE reader_id = $1", a)
        )
        await asyncio.sleep(0.3)  # A's statement (and snapshot) began; it waits for the lock
        await tx.commit()
        await wake
        assert await _agrees(q.su) == (1, True), "B sleeps: the hint must not say 0"
        assert await _rings(q.su, q.tenant, "r20_rr"), "B sleeps: a captured write must ring"
    finally:
        if sleeper.is_in_transaction():
            await tx.rollback()
        await waker.close()
        await sleeper.close()


async def test_a_reader_whose_wake_aborts_and_reconnects_leaves_the_hint_true(q: QuietConns) -> None:
    """A's wake (`waiting = false`) sets the hint to 0 at once (a sequence is not
    transactional) and then aborts: for a moment the hint says 0 while A's row says waiting,
    which sql/0052 accepts because A is awake. What puts it right is what the readers do after a
    failed statement (outbox.py `run`, delivery.py): reconnect, and `_connect`'s INSERT ... ON
    CONFLICT fires the trigger. After that the hint agrees again; and while B sleeps through A's
    abort, the hint never says 0."""
    a, b = q.readers
    su = q.su
    await su.execute("UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", a)
    tx = su.transaction()
    await tx.start()
    await su.execute("UPDATE fluxbase.event_readers SET waiting = false WHERE reader_id = $1", a)
    await tx.rollback()
    assert await _agrees(su) == (0, True)  # the accepted transient (A is awake)
    await su.execute(
        "INSERT INTO fluxbase.event_readers (reader_id, waiting, backend_pid) "
        "VALUES ($1, false, pg_backend_pid()) ON CONFLICT (reader_id) "
        "DO UPDATE SET waiting = false, seen_at = now(), backend_pid = pg_backend_pid()",
        a,
    )
    assert await _agrees(su) == (0, False)
    # B sleeps; A's wake aborts: the hint stays 1, and a captured write rings for B.
    await su.execute(
        "UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = ANY($1::text[])", [a, b]
    )
    tx = su.transaction()
    await tx.start()
    await su.execute("UPDATE fluxbase.event_readers SET waiting = false WHERE reader_id = $1", a)
    await tx.rollback()
    assert await _agrees(su) == (1, True)
    await q.tenant.execute("CREATE TABLE r20_abort (id int PRIMARY KEY)")
    assert await _rings(su, q.tenant, "r20_abort")


async def test_a_transaction_changing_two_readers_rows_does_not_deadlock_with_a_reader(
    stack: Stack,
    instance: Instance,
    superuser: asyncpg.Connection,  # noqa: F811
    readers: list[str],
) -> None:
    a, b = readers
    reader_b = await asyncpg.connect(stack.database_url(instance.dbname))
    tx = superuser.transaction()
    try:
        await tx.start()
        await superuser.execute(
            "UPDATE fluxbase.event_readers SET seen_at = now(), waiting = false WHERE reader_id = $1", a
        )
        # B's own autocommit sleep: takes its row, then waits for the hint's lock.
        own = asyncio.create_task(
            reader_b.execute("UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", b)
        )
        await asyncio.sleep(0.3)
        await superuser.execute("UPDATE fluxbase.event_readers SET seen_at = now() WHERE reader_id = $1", b)
        await tx.commit()
        await own
    finally:
        if superuser.is_in_transaction():
            await tx.rollback()
        await reader_b.close()


async def test_reading_the_hint_leaves_the_tenants_sequence_state_alone(q: QuietConns) -> None:
    """The C capture opens the hint sequence in the tenant's backend (pg_sequence_last_value):
    the tenant's currval() of its own sequence is unchanged after captured writes, with no reader
    waiting (the hint is read and says 0) and with one waiting (read, then the scan); lastval()
    names the outbox's identity sequence (its nextval, since sql/0050: not the hint's doing) and
    is refused, so it reads neither that sequence nor the hint."""
    t = q.tenant
    await t.execute("CREATE TABLE r20_seq (id int PRIMARY KEY); CREATE SEQUENCE r20_own_seq")
    await t.execute("INSERT INTO r20_seq VALUES (0); DELETE FROM r20_seq")  # (warm: see below)
    for waiting in (False, True):
        await q.su.execute(
            "UPDATE fluxbase.event_readers SET waiting = $2 WHERE reader_id = $1", q.readers[0], waiting
        )
        assert await _agrees(q.su) == (int(waiting), waiting)
        async with t.transaction():
            mine = await t.fetchval("SELECT nextval('r20_own_seq')")
            await t.execute("INSERT INTO r20_seq VALUES (1)")
            await t.execute("DELETE FROM r20_seq")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="events_id_seq"):
                async with t.transaction():
                    await t.execute("SELECT lastval()")
            assert await t.fetchval("SELECT currval('r20_own_seq')") == mine


@pytest.mark.parametrize(
    "iso",
    [
        "read_committed",
        "repeatable_read",
    ],
)
async def test_a_sleeping_realtime_reader_gets_a_write_at_once_after_another_readers_change(
    iso: str, q: QuietConns
) -> None:
    """A real realtime OutboxReader (idle poll 3 s) falls asleep while another reader's
    transaction (at `iso`, its snapshot taken before) is open; that reader then wakes and
    commits. A captured write must reach the sleeping reader at doorbell speed (< 1 s), not at
    its idle poll."""
    from fluxbase_realtime.outbox import OutboxReader

    got: list[float] = []

    async def deliver(events: list[Any]) -> None:
        got.append(time.monotonic())

    a = q.readers[0]
    await q.su.execute("UPDATE fluxbase.event_readers SET waiting = true WHERE reader_id = $1", a)
    await q.tenant.execute(f"CREATE TABLE r20_lat_{iso} (id int PRIMARY KEY)")
    # A warm tenant backend (as the SQL API's pooled sessions are): the C capture learns
    # event_readers on a backend's first captured write, which always asks the table.
    await q.tenant.execute(f"INSERT INTO r20_lat_{iso} VALUES (0)")
    reader = OutboxReader(q.url, deliver, idle_poll_s=3.0)
    other = await asyncpg.connect(q.url)
    tx = other.transaction(isolation=iso)
    await tx.start()
    await other.fetchval("SELECT 1")  # (its snapshot, at REPEATABLE READ, is taken here)
    task = asyncio.create_task(reader.run(asyncio.Event()))
    try:
        for _ in range(250):
            if await q.su.fetchval(
                "SELECT waiting FROM fluxbase.event_readers WHERE reader_id = $1", reader.reader_id
            ):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the realtime reader never fell asleep")
        await other.execute("UPDATE fluxbase.event_readers SET waiting = false WHERE reader_id = $1", a)
        await tx.commit()
        got.clear()
        t0 = time.monotonic()
        await q.tenant.execute(f"INSERT INTO r20_lat_{iso} VALUES (1)")
        for _ in range(250):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got, "the event never arrived"
        latency = got[0] - t0
        assert latency < 1.0, f"delivered after {latency:.2f}s: at the idle poll, not the doorbell"
    finally:
        if other.is_in_transaction():
            await tx.rollback()
        await other.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await reader.close()
