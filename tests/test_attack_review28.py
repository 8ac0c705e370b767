"""Hostile review 28: the request prefix held in the connection's transport (commit c6a27c1:
`wire.HeldTransport`, `wire._Protocol` installed into `asyncpg.connect_utils`,
`RequestPrefix.send` appending to `held`, `pools.TenantConnection` keeping the same object).

Attacked, through services.sql, the tenant pools and real PostgreSQL: every outcome of a
one-round-trip request after which a prefix could stay held for the next principal on the same
pooled session (asyncpg refusing a parameter while encoding it, on a fresh and on a cached
statement; a ParamError after `prepare_after`; a statement error; a statement needing type
introspection (NeedsIntrospection -> Fallback); CACHE_STALE and its retry after ALTER TABLE; an
error with one of NATIVE_RESET_FAILURES' codes (`reset_failed`'s probe); a result the codecs
cannot decode; FXRST after a session's defaults changed; the request deadline); a request task
cancelled by something other than its deadline, while asyncpg waits for an earlier cancel before
writing; the order of a held prefix against asyncpg's `writelines` (executemany) and COPY; a
connection asyncpg opened before the hook was installed; every non-tenant use of asyncpg in the
process now going through `_Protocol` (COPY in and out past the transport's write buffer
limits, so that flow control pauses writing, LISTEN/NOTIFY, executemany, a cursor with reading
paused, close) on asyncio's and uvloop's loops; TLS (direct and STARTTLS: the stack's
PostgreSQL has no TLS, so through a TLS-terminating proxy in the test), where the protocol is
built by asyncpg's own `_create_ssl_connection`.

Found (each a strict xfail, seen failing, until its fix; both fixed in the same session):

1. (low: needs a cancellation other than the request deadline, which no code path of the API
   makes today) A request task cancelled while asyncpg waits for an earlier cancel to finish
   (`Protocol._wait_for_cancellation`, which runs before the driver's write: the one await
   between `RequestPrefix.send` and the write) goes back to the pool with its prefix still
   held: the docs' "should a connection go back to its pool holding one (no path does)" does
   not hold. The next principal's request then runs behind the cancelled principal's reset,
   identity and checks, in one transaction: with the C reset it fails ("reset_session() may
   only begin a request"), and a check of the cancelled request (its epoch, its end-user
   session) refusing fails or reroutes it. The first step, a request cancelled that way going
   back to the pool while asyncpg's cancel is still in flight, predates the commit; so did the
   prefix sent ahead of a write that never came (MSG_MORE's bytes left after 200 ms), but the
   held prefix now also survives until whatever is written next on that session.
   Fixed: `TenantPool.release_now` closes a session that still holds bytes (`wire.unfit`).

2. (low, pre-existing, found at the CACHE_STALE retry) asyncpg's OutdatedSchemaCacheError, one
   of the two CACHE_STALE errors, is an InternalClientError, not a PostgresError: the retry
   `_one_round_trip` has for it (`forget_cached_plans` -> `reload_schema_state`) is dead code.
   After `ALTER TYPE ... ADD ATTRIBUTE` a session that decoded the composite before answers its
   next read of it with 503 DATABASE_CONNECTION_ERROR (CONNECTION_LOST: logged as a lost tenant
   connection, the session terminated), once per such pooled session, end users' included. The
   explicit path (Tx._failed) retries it. Fixed: the session's type codecs are reloaded and the
   session kept; a read-only request runs again, one that could have written is not run twice
   and answers `ResultTypeChanged` (503 DATABASE_CONNECTION_ERROR, "The statement ran; run it
   again to read the result"), since its transaction ended with the Sync before the rows were
   read.

Held: after every outcome above nothing is held on the pooled session and the next principal
sees its own identity, read-write (FXEPO and FXRST included); the retry after CACHE_STALE sends
one prefix per attempt, the first one gone with its Sync; a request deadline that passes while
asyncpg waits for an earlier cancel terminates the session, held prefix and all; hole 1's left
prefix never lends its identity: on a session resetting with the six statements the next
principal runs as itself and nothing of the left identity outlives that transaction; a held
prefix leads executemany's writelines (same transaction) and is rolled back with a failing COPY;
a connection opened before the hook (a raw transport) still gets prefix and statement in order;
COPY in/out past flow control, LISTEN/NOTIFY, executemany and a paused cursor work on both
loops through `_Protocol` with nothing held; TLS connections (direct and STARTTLS, both loops)
get the hook, and the prefix, its drain and a 3 MB write work over them. No HeldTransport
outlives its connection (checked by hand: 100 connections, closed or terminated, none left).

Not tried: a real PostgreSQL with TLS (this build has none: a TLS-terminating proxy instead); the
C reset really failing (`reset_failed` returning True: only its probe after a tenant's own 42883
was driven here; tests/test_session_reset.py drops the function on an instance of its own);
end-user session checks refusing (FXU01/FXU02) with real end-user sessions; pg_dump/pg_restore
(subprocesses, not asyncpg); the webhooks worker and realtime processes themselves (their
asyncpg uses, COPY, executemany, LISTEN, were reproduced here instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest
import uvloop
from asyncpg import connect_utils

from fluxbase.errors import FluxbaseError, StatementFailed
from fluxbase.services import sql
from fluxbase.tenancy import session, wire
from fluxbase.tenancy.pools import TenantConnection, TenantPools
from fluxbase.tenancy.results import encode

_LOOPS = pytest.mark.parametrize(
    "factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


def _request(
    pid: str, uid: str | None, *, scope: str = "admin", deadline_s: float = 10
) -> session.TenantRequest:
    claims: dict[str, Any] = {"role": scope, "project_id": pid}
    if uid is not None:
        claims["sub"] = uid
    return session.TenantRequest(
        project_id=pid,
        scope=scope,
        identity=session.Identity(uid, claims, scope),
        limits=session.Limits(deadline_s=deadline_s, max_rows=100, max_bytes=1 << 20, acquire_timeout_s=5),
    )


async def _body(pools: TenantPools, control: Any, req: session.TenantRequest, q: str, p: list[Any]) -> bytes:
    return encode((await sql.execute(pools, control, req, q, p)).result())


async def _outcome(pools: TenantPools, control: Any, req: session.TenantRequest, q: str, p: list[Any]) -> str:
    try:
        return (await _body(pools, control, req, q, p)).decode()
    except FluxbaseError as exc:
        return f"{type(exc).__name__}: {exc}"


_WHO = "SELECT auth.uid() AS u, current_setting('transaction_read_only') AS ro"


async def _next_principal_is_itself(pools: TenantPools, control: Any, pid: str, what: str) -> None:
    """The pooled session carries nothing held, and the next principal runs as itself."""
    pool = await pools.pool(pid, "admin")
    conn = pool.take_idle()
    if conn is not None:  # (terminated after its request: a new one comes next)
        try:
            assert type(conn._transport) is wire.HeldTransport
            assert conn._transport.held == b"", (what, conn._transport.held[:80])
        finally:
            await pool.release(conn)
    body = await _body(pools, control, _request(pid, "bob"), _WHO, [])
    assert '"u":"bob","ro":"off"' in body.decode(), (what, body)


# -- every outcome of a one-round-trip request ----------------------------------------------------


async def test_no_outcome_leaves_a_prefix_held_for_the_next_principal(tenancy) -> None:
    pools, control, pid = tenancy
    alice = _request(pid, "alice")
    await _body(pools, control, alice, "CREATE TABLE r28_t (a int)", [])
    await _body(pools, control, alice, "CREATE TYPE r28_mood AS ENUM ('ok', 'sad')", [])
    cases: list[tuple[str, list[Any], str]] = [
        # asyncpg refuses the value while encoding: a fresh statement (prepare_after sent the
        # prefix) and then the cached one (send, then the refused Bind): drain ends both.
        ("SELECT $1::int4 AS v, auth.uid() AS u", [2**40], "out of int32 range"),
        ("SELECT $1::int4 AS v, auth.uid() AS u", [2**40], "out of int32 range"),
        ("SELECT $1::int4 AS w, auth.uid() AS u", ["x"], "is not an integer"),  # ParamError
        ("SELECT 1/0 AS z", [], "division by zero"),
        ("SELECT 'ok'::r28_mood AS m", [], '"m":"ok"'),  # NeedsIntrospection -> Fallback
        ("SELECT * FROM r28_t", [], '"columns":["a"]'),
        ("ALTER TABLE r28_t ADD COLUMN b int", [], "ALTER TABLE"),
        ("SELECT * FROM r28_t", [], '"columns":["a","b"]'),  # CACHE_STALE, retried
        ("SELECT r28_no_such_fn()", [], "does not exist"),  # 42883: reset_failed's probe
        ("SELECT r28_no_such_fn()", [], "does not exist"),
        ("SELECT (1.5::numeric, 2) AS rec", [], "cannot be sent or returned"),  # undecodable
        ("SELECT 1 AS fine, auth.uid() AS u", [], '"u":"alice"'),
    ]
    for query, params, expected in cases:
        out = await _outcome(pools, control, alice, query, params)
        assert expected in out, (query, out)
        await _next_principal_is_itself(pools, control, pid, query)


async def test_cache_stale_retry_sends_one_prefix(tenancy) -> None:
    """Attempt 0's prefix left with its Bind/Execute/Sync; the retry's own is the only one held
    before its write (counted at the HeldTransport: two sends would be one write each)."""
    pools, control, pid = tenancy
    alice = _request(pid, "alice")
    await _body(pools, control, alice, "CREATE TABLE r28_s (a int)", [])
    await _body(pools, control, alice, "SELECT *, auth.uid() AS u FROM r28_s", [])
    await _body(pools, control, alice, "ALTER TABLE r28_s ADD COLUMN b int", [])
    pool = await pools.pool(pid, "admin")
    conn = pool.take_idle()
    assert conn is not None
    held = conn._transport
    writes: list[bytes] = []
    real_write = held.transport.write

    def spy(data: Any) -> None:
        writes.append(bytes(data))
        real_write(data)

    held.transport.write = spy
    await pool.release(conn)
    try:
        out = await _body(pools, control, alice, "SELECT *, auth.uid() AS u FROM r28_s", [])
    finally:
        with contextlib.suppress(AttributeError):
            del held.transport.write
    assert '"columns":["a","b","u"]' in out.decode(), out
    identity = b'"sub":"alice"'
    # Alice's claims go out once per prefix (in her SET LOCAL, or in begin_request's parameters).
    assert sum(w.count(identity) for w in writes) == 2, writes  # attempt 0 and the retry, one each
    assert all(w.count(identity) <= 1 for w in writes)
    assert held.held == b""
    await _next_principal_is_itself(pools, control, pid, "cache stale")


@pytest.mark.parametrize(
    "read_only", [True, False], ids=["read-only: run again", "could write: not run again"]
)
async def test_a_changed_composite_type_is_not_a_lost_connection(tenancy, read_only: bool) -> None:
    """(Pre-existing, found at the CACHE_STALE retry.) A session that decoded a composite type
    keeps its codec; after ALTER TYPE ... ADD ATTRIBUTE the next read of it on that session
    raises asyncpg's OutdatedSchemaCacheError (an InternalClientError, one of CONNECTION_LOST)
    while reading the rows, after the Sync ended the statement's transaction. It was answered
    503 DATABASE_CONNECTION_ERROR, logged as a lost connection, the session terminated. Now the
    session's type codecs are reloaded and the session kept; a read-only request runs again and
    reads the new shape, one that could have written is not run twice: its answer says it ran."""
    pools, control, pid = tenancy
    alice = _request(pid, "alice")
    for q in (
        "CREATE TYPE r28_comp AS (a int)",
        "CREATE TABLE r28_ct (c r28_comp)",
        "INSERT INTO r28_ct VALUES (ROW(1))",
        "SELECT c FROM r28_ct",  # introspected (explicit path), its codec kept by the session
        "SELECT c FROM r28_ct",  # one round trip, cached
        "ALTER TYPE r28_comp ADD ATTRIBUTE b int",
    ):
        await _body(pools, control, alice, q, [])
    pool = await pools.pool(pid, "admin")
    conn = pool.take_idle()
    assert conn is not None
    await pool.release(conn)
    req = msgspec.structs.replace(alice, project_read_only=True) if read_only else alice
    out = await _outcome(pools, control, req, "SELECT c FROM r28_ct", [])
    if read_only:
        assert '"c":{"a":1,"b":null}' in out, out
    else:
        assert out.startswith("ResultTypeChanged: ") and "The statement ran" in out, out
    again = pool.take_idle()
    assert again is conn and not conn.is_closed()  # the session was kept
    await pool.release(again)
    assert '"c":{"a":1,"b":null}' in await _outcome(pools, control, alice, "SELECT c FROM r28_ct", [])


async def test_fxrst_and_the_deadline_leave_nothing_held(tenancy) -> None:
    pools, control, pid = tenancy
    alice = _request(pid, "alice")
    await _body(pools, control, alice, _WHO, [])
    pool = await pools.pool(pid, "admin")
    conn = pool.take_idle()
    assert conn is not None
    # What an earlier request could leave: a session default FXRST refuses.
    await conn.execute("SET default_transaction_isolation = 'serializable'")
    await pool.release(conn)
    out = await _body(pools, control, alice, _WHO + ", current_setting('transaction_isolation') AS iso", [])
    assert '"u":"alice","ro":"off","iso":"read committed"' in out.decode(), out
    await _next_principal_is_itself(pools, control, pid, "FXRST")
    # FXEPO: the cached key state's epoch is not the project's (an unknown key: the explicit
    # path's key guard then refuses it).
    evicted: list[bytes] = []
    stale = msgspec.structs.replace(
        alice, guard=(b"\x01" * 32, pid), epoch=987654321, evict_key=evicted.append
    )
    out = await _outcome(pools, control, stale, _WHO, [])
    assert evicted == [b"\x01" * 32] and '"u":"alice"' not in out, out
    await _next_principal_is_itself(pools, control, pid, "FXEPO")
    slow = _request(pid, "alice", deadline_s=0.3)
    with pytest.raises(StatementFailed) as late:
        await _body(pools, control, slow, "SELECT pg_sleep(2), auth.uid()", [])
    assert late.value.sqlstate == "57014"
    await _next_principal_is_itself(pools, control, pid, "deadline")


# -- a request cancelled by something else than its deadline ----------------------------------------


async def test_a_cancelled_request_leaves_no_prefix_for_the_next_principal(tenancy) -> None:
    pools, control, pid = tenancy
    alice, bob, carol = (_request(pid, u) for u in ("alice", "bob", "carol"))
    await _body(pools, control, alice, _WHO, [])
    pool = await pools.pool(pid, "admin")
    # 1. alice's statement cancelled (not by its deadline): asyncpg sends a CancelRequest and
    #    the session goes back to the pool while that is in flight.
    first = asyncio.ensure_future(_body(pools, control, alice, "SELECT pg_sleep(2)", []))
    await asyncio.sleep(0.3)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    conn = pool._idle[0]
    assert conn._protocol._is_cancelling()
    # 2. bob's request: its prefix is held, then asyncpg waits for the cancel before writing;
    #    bob is cancelled there.
    second = asyncio.ensure_future(_body(pools, control, bob, _WHO, []))
    for _ in range(50):  # until bob's prefix is held (his task waits for alice's cancel)
        if b"bob" in conn._transport.held:
            break
        await asyncio.sleep(0)
    assert b"bob" in conn._transport.held  # bob's identity, waiting for the driver's write
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    try:
        # The secure outcome: a session that goes back to the pool holds nothing (or is closed) ...
        assert conn.is_closed() or conn._transport.held == b"", len(conn._transport.held)
    finally:
        # ... and carol, next, runs as herself (before the fix: behind bob's reset, identity
        # and checks, in one transaction, where the C reset refused).
        out = await _outcome(pools, control, carol, _WHO, [])
    assert '"u":"carol","ro":"off"' in out, out


async def test_a_left_prefix_never_lends_its_identity(tenancy) -> None:
    """Hole 1's held prefix, on a session that resets with the six statements (a server without
    the C reset, or after `reset_failed`): before the fix the next principal's request ran behind
    it and succeeded, as itself (its RESET ALL and SET LOCAL replaced everything the left prefix
    set). Since the fix the session is closed instead of going back to the pool, and the next
    principal runs as itself on another, with nothing of the left identity."""
    pools, control, pid = tenancy
    alice, bob, carol = (_request(pid, u) for u in ("alice", "bob", "carol"))
    await _body(pools, control, alice, _WHO, [])
    pool = await pools.pool(pid, "admin")
    conn = pool.take_idle()
    assert conn is not None
    conn.request_prefix.use_statements(conn)
    await pool.release(conn)
    first = asyncio.ensure_future(_body(pools, control, alice, "SELECT pg_sleep(2)", []))
    await asyncio.sleep(0.3)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.ensure_future(_body(pools, control, bob, _WHO, []))
    for _ in range(50):  # until bob's prefix is held (his task waits for alice's cancel)
        if b"bob" in conn._transport.held:
            break
        await asyncio.sleep(0)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert conn.is_closed()  # never handed on (`wire.unfit`)
    query = _WHO + ", current_setting('fluxbase.auth_claims', true) AS claims"
    out = await _body(pools, control, carol, query, [])
    assert '"u":"carol","ro":"off"' in out.decode() and "bob" not in out.decode(), out
    again = pool.take_idle()
    assert again is not None and again is not conn and again._transport.held == b""
    try:
        for name in ("fluxbase.auth_uid", "fluxbase.auth_claims", "fluxbase.auth_role"):
            assert await again.fetchval("SELECT current_setting($1, true)", name) in (None, ""), name
    finally:
        await pool.release(again)


async def test_a_deadline_while_waiting_for_an_earlier_cancel_closes_the_session(tenancy) -> None:
    """The same wait, ended by the request's own deadline: the session is terminated, its held
    prefix dropped with it, and the next principal gets another session."""
    pools, control, pid = tenancy
    alice = _request(pid, "alice")
    await _body(pools, control, alice, _WHO, [])
    pool = await pools.pool(pid, "admin")
    # A statement that ignores the cancel for a while: the cancel stays in flight.
    await _body(
        pools,
        control,
        alice,
        "CREATE FUNCTION r28_stubborn() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
        "FOR i IN 1..30 LOOP BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN "
        "NULL; END; END LOOP; END $$",
        [],
    )
    first = asyncio.ensure_future(_body(pools, control, alice, "SELECT r28_stubborn()", []))
    await asyncio.sleep(0.3)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    conn = pool._idle[0]
    bob = _request(pid, "bob", deadline_s=0.3)
    with pytest.raises(StatementFailed) as late:
        await _body(pools, control, bob, _WHO, [])
    assert late.value.sqlstate == "57014"
    assert conn.is_closed()
    await _next_principal_is_itself(pools, control, pid, "deadline in the cancel wait")


# -- order of the held prefix against the driver's other writes --------------------------------------


def _writelines_and_copy(factory: Callable[[], asyncio.AbstractEventLoop], url: str) -> list[Any]:
    async def main() -> list[Any]:
        conn = await asyncpg.connect(url, connection_class=TenantConnection)
        try:
            prefix, _ = await wire.RequestPrefix.open(conn, "SELECT 1", (), {})
            await conn.execute(
                "CREATE TEMP TABLE r28_w (v int, probe text DEFAULT current_setting('fx.probe', true))"
            )
            # executemany: Bind/Execute per row through writelines, one Sync: the held step
            # first, in the same transaction.
            prefix.send(conn, wire.parse_bind_execute("SET LOCAL fx.probe = 'held'"))
            await conn.executemany("INSERT INTO r28_w (v) VALUES ($1)", [(i,) for i in range(300)])
            out: list[Any] = [conn._transport.held]
            out.append(await conn.fetchval("SELECT count(*) FROM r28_w WHERE probe = 'held'"))
            out.append(await conn.fetchval("SELECT current_setting('fx.probe', true)") or "")
            # COPY behind a held failing step: its first query fails, nothing is copied.
            prefix.send(conn, wire.parse_bind_execute("SELECT 1/0"))
            with pytest.raises(asyncpg.PostgresError):
                await conn.copy_records_to_table("r28_w", records=[(1, "x")], columns=["v", "probe"])
            out.append(conn._transport.held)
            out.append(await conn.fetchval("SELECT count(*) FROM r28_w"))
            return out
        finally:
            await conn.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@_LOOPS
async def test_a_held_prefix_leads_writelines_and_copy(
    stack: Any, instance: Any, factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    url = stack.database_url(instance.dbname)
    assert await asyncio.to_thread(_writelines_and_copy, factory, url) == [b"", 300, "", b"", 300]


async def test_a_connection_opened_before_the_hook_keeps_the_order(stack, instance) -> None:
    """A TenantConnection whose protocol is asyncpg's own (opened before `wire` was imported):
    `send` writes at once through the raw transport, ahead of the statement."""
    url = stack.database_url(instance.dbname)
    hooked = connect_utils.protocol
    connect_utils.protocol = asyncpg.protocol  # type: ignore[assignment]
    try:
        conn = await asyncpg.connect(url, connection_class=TenantConnection)
    finally:
        connect_utils.protocol = hooked  # type: ignore[assignment]
    try:
        assert type(conn._transport) is not wire.HeldTransport
        prefix, _ = await wire.RequestPrefix.open(conn, "SELECT 1", (), {})
        stmt = await wire.prepare(conn, "SELECT current_setting('fx.probe', true) AS p, $1::int4 AS n")
        for n in range(3):
            prefix.send(
                conn, prefix.begin(False, False) + wire.parse_bind_execute("SET LOCAL fx.probe = 'p'")
            )
            rows, _, _ = await wire.execute(conn, stmt, [n], 10)
            assert tuple(rows[0]) == ("p", n)
        prefix.send(conn, prefix.begin(False, False) + wire.parse_bind_execute("SET LOCAL fx.probe = 'q'"))
        with pytest.raises(asyncpg.DataError):
            await wire.execute(conn, stmt, [2**40], 10)
        await prefix.drain(conn)
        assert await conn.fetchval("SELECT current_setting('fx.probe', true)") in (None, "")
    finally:
        await conn.close()


# -- every other asyncpg connection of the process ------------------------------------------------


def _plain_uses(factory: Callable[[], asyncio.AbstractEventLoop], url: str) -> list[Any]:
    async def main() -> list[Any]:
        conn = await asyncpg.connect(url)
        other = await asyncpg.connect(url)
        try:
            assert type(conn._protocol) is wire._Protocol
            held = conn._protocol.held_transport
            raw = held.transport
            raw.set_write_buffer_limits(high=4096, low=1024)  # make flow control pause writing
            await conn.execute("CREATE TEMP TABLE r28_c (a int, b text)")
            big = [(i, "x" * 200) for i in range(20000)]
            await conn.copy_records_to_table("r28_c", records=big)
            out: list[Any] = [await conn.fetchval("SELECT count(*) FROM r28_c")]
            sink: list[bytes] = []

            async def collect(chunk: bytes) -> None:
                sink.append(chunk)

            await conn.copy_from_query("SELECT * FROM r28_c", output=collect)
            out.append(sum(c.count(b"\n") for c in sink))
            await conn.executemany("INSERT INTO r28_c VALUES ($1, $2)", [(i, "y") for i in range(500)])
            out.append(await conn.fetchval("SELECT count(*) FROM r28_c WHERE b = 'y'"))
            got: asyncio.Queue[str] = asyncio.Queue()
            await conn.add_listener("r28", lambda *a: got.put_nowait(a[3]))
            await other.execute("NOTIFY r28, 'ping'")
            out.append(await asyncio.wait_for(got.get(), 5))
            async with conn.transaction():
                n = 0
                async for _ in conn.cursor("SELECT * FROM r28_c", prefetch=50):
                    n += 1
                out.append(n)
            out.append(held.held)
            return out
        finally:
            await other.close()
            await conn.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@_LOOPS
async def test_non_tenant_asyncpg_uses_work_through_the_hook(
    stack: Any, instance: Any, factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    url = stack.database_url(instance.dbname)
    out = await asyncio.to_thread(_plain_uses, factory, url)
    assert out == [20000, 20000, 500, "ping", 20500, b""]


# -- TLS ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("r28_tls")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    args = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    args += ["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(args, check=True, capture_output=True)
    return key, cert


async def _tls_proxy(pg: tuple[str, int], server_ctx: ssl.SSLContext, direct: bool) -> asyncio.Server:
    """Terminates TLS (direct, or after PostgreSQL's SSLRequest) and relays to the plain server."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not direct:
            request = await reader.readexactly(8)
            assert request == b"\x00\x00\x00\x08\x04\xd2\x16\x2f", request  # SSLRequest
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(server_ctx)
        up_reader, up_writer = await asyncio.open_connection(*pg)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx if direct else None)


def _over_tls(
    factory: Callable[[], asyncio.AbstractEventLoop], url: str, pem: tuple[Path, Path], direct: bool
) -> str:
    parts = urlsplit(url)
    key, cert = pem
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.check_hostname = False

    async def main() -> str:
        proxy = await _tls_proxy((parts.hostname or "127.0.0.1", parts.port or 5432), server_ctx, direct)
        port = proxy.sockets[0].getsockname()[1]
        try:
            conn = await asyncpg.connect(
                url,
                host="127.0.0.1",
                port=port,
                ssl=client_ctx,
                direct_tls=direct,
                connection_class=TenantConnection,
            )
            try:
                assert type(conn._protocol) is wire._Protocol
                assert conn._transport is conn._protocol.held_transport
                assert conn._transport.get_extra_info("ssl_object") is not None
                prefix, _ = await wire.RequestPrefix.open(conn, "SELECT 1", (), {})
                stmt = await wire.prepare(
                    conn, "SELECT current_setting('fx.probe', true) AS p, $1::int4 AS n"
                )
                for n in range(3):
                    step = wire.parse_bind_execute("SET LOCAL fx.probe = 'p'")
                    prefix.send(conn, prefix.begin(False, False) + step)
                    rows, _, _ = await wire.execute(conn, stmt, [n], 10)
                    assert tuple(rows[0]) == ("p", n)
                prefix.send(
                    conn, prefix.begin(False, False) + wire.parse_bind_execute("SET LOCAL fx.probe = 'q'")
                )
                with pytest.raises(asyncpg.DataError):
                    await wire.execute(conn, stmt, [2**40], 10)
                await prefix.drain(conn)
                assert conn._transport.held == b""
                assert await conn.fetchval("SELECT current_setting('fx.probe', true)") in (None, "")
                # A large write over TLS (flow control below the HeldTransport).
                assert await conn.fetchval("SELECT length($1::text)", "z" * 3_000_000) == 3_000_000
                return type(conn._transport.transport).__module__
            finally:
                await conn.close()
        finally:
            proxy.close()
            await proxy.wait_closed()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@_LOOPS
@pytest.mark.parametrize("direct", [True, False], ids=["direct TLS", "STARTTLS"])
async def test_tls_connections_get_the_hook(
    stack: Any,
    instance: Any,
    certificate: tuple[Path, Path],
    direct: bool,
    factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    url = stack.database_url(instance.dbname)
    transport = await asyncio.to_thread(_over_tls, factory, url, certificate, direct)
    assert ("uvloop" in transport) == (factory is uvloop.new_event_loop), transport
