"""Hostile review 26: the SQL hot path's timers and the borrowed socket (commits 4903c98, 1e61c45,
86d51b5 on top of 7125809; 86d51b5, the pool's one wait timer, was dropped after this review).

Attacked: `wire.RequestPrefix.send`'s socket object made once per connection (`_Borrowed`),
`session.Deadline` (one deadline timer per tenant connection), `SqlHttpProtocol`'s one keep-alive
timer per HTTP connection, and `TenantPool`'s one timer for its waiters' bounds (added by
86d51b5, whose message says it reverts it).

Holes (each a strict xfail, seen failing, until its fix):

1. `send` borrows the socket lazily, at the connection's first prefix, BEFORE it looks at
   `transport.is_closing()`: on a transport already closed, making the socket object fails
   (asyncio: its socket's fileno is -1, ValueError; uvloop: the stale descriptor number,
   OSError EBADF, or, reused, a socket object over another connection's descriptor), where the
   old code wrote through the transport (dropped, the driver then reports the lost connection).
   Fixed: `send` looks at the transport first and borrows only an open one's descriptor, and
   `_borrow` falls back to the transport's write if making the object fails.
2. `TenantPool._expire` (86d51b5: its message says "Revert the tenant pool's one wait timer: no
   gain measured", its diff adds that timer) scans every waiter at each firing and re-arms for
   the nearest bound only: waits giving up at spread-out times cost O(waiters) each, O(n^2) in
   all. 12000 queued waits expiring over 2 s: 1.8 s of the loop's CPU, against 0.25 s with one
   timer per wait; a flood queued on one project's pool slows every tenant of the process.
   Fixed by dropping that commit (it had measured no gain): one timer per wait again.

(Since 5 December 2026 the prefix is held in the connection's `wire.HeldTransport` and leaves
with the driver's next write: no socket object is borrowed any more. The two tests of the
borrowed socket stay, on that mechanism: a late `send` on a dead connection still fails cleanly
and never reaches the connection that got its descriptor number.)

Held: the borrowed socket never writes to a descriptor number reused by another connection
after its own was terminated, and finalising it leaves that descriptor open; a stale deadline
timer of an earlier request neither cancels a later request (explicit-transaction path) before
its own deadline nor lets it outlive it, a deadline-terminated request leaves no `expired` for
the next principal on the pool, and a plpgsql loop that swallows cancels still ends at the
deadline; the keep-alive timer lets neither a request split across its firing nor a pipelined
slow request be closed early, and still closes the connection ~5 s after the last answer; a
pool wait added after a longer one gives up at its own bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import uvloop

from fluxbase.tenancy import wire
from fluxbase.tenancy.errors import CONNECTION_LOST
from fluxbase.tenancy.pools import TenantConnection, TenantPool
from support import Api
from support import own_project as _own
from test_sql_protocol import connect, read_answer, request, rows

_LOOPS = pytest.mark.parametrize(
    "factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


def _run(factory: Callable[[], asyncio.AbstractEventLoop], main: Callable[[], Any]) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


# -- a late prefix on a dead connection ---------------------------------------------------------------


def _send_after_close(factory: Callable[[], asyncio.AbstractEventLoop], url: str) -> str:
    async def main() -> str:
        conn = await asyncpg.connect(url, connection_class=TenantConnection)
        prefix, _ = await wire.RequestPrefix.open(conn, "SELECT 1", (), {})
        conn.terminate()  # e.g. the server ended it, or the deadline's termination
        await asyncio.sleep(0.1)  # connection_lost ran: the descriptor is closed
        assert conn._transport.is_closing()
        try:
            prefix.send(conn, prefix.begin(False, False))
        except CONNECTION_LOST:
            return "ok"  # what _on_connection answers 503 DATABASE_CONNECTION_ERROR
        except Exception as exc:  # anything else: a 500 from _one_round_trip
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    return str(_run(factory, main))


async def test_prefix_send_on_a_transport_closed_before_its_first_send(stack: Any, instance: Any) -> None:
    """(Since the prefix is held for the driver's next write, a send on a dead connection only
    holds it: nothing reaches a socket, and the connection's next operation reports the loss.)"""
    url = stack.database_url(instance.dbname)
    assert await asyncio.to_thread(_send_after_close, asyncio.new_event_loop, url) == "ok"


def _reused_descriptor(factory: Callable[[], asyncio.AbstractEventLoop], url: str) -> tuple[int, int]:
    async def main() -> tuple[int, int]:
        a = await asyncpg.connect(url, connection_class=TenantConnection)
        prefix, _ = await wire.RequestPrefix.open(a, "SELECT 1", (), {})
        stmt = await wire.prepare(a, "SELECT 1")
        prefix.send(a, prefix.begin(False, False))
        await wire.execute(a, stmt, [], 10)
        fd = a._transport.get_extra_info("socket").fileno()
        a.terminate()
        await asyncio.sleep(0.1)
        others = []
        b = None
        try:
            for _ in range(20):  # a new connection gets the lowest free number: the old one
                c = await asyncpg.connect(url, connection_class=TenantConnection)
                if c._transport.get_extra_info("socket").fileno() == fd:
                    b = c
                    break
                others.append(c)
            assert b is not None, "the descriptor number was not reused"
            # The old connection's prefix: a message that would break b's protocol if it went there.
            with contextlib.suppress(RuntimeError):  # uvloop: a closed handle refuses writes
                prefix.send(a, b"X\x00\x00\x00\x04" + wire.parse_bind_execute("SELECT 1/0"))
                wire.write(a, b"")  # and anything the dead connection writes after it
            assert await b.fetchval("SELECT 41 + 1") == 42
            del prefix
            gc.collect()
            os.fstat(fd)  # b's descriptor is still open
            assert await b.fetchval("SELECT 43") == 43
            return fd, 0
        finally:
            for c in [*others, *([b] if b is not None else [])]:
                await c.close()

    return _run(factory, main)  # type: ignore[no-any-return]


@_LOOPS
async def test_a_late_prefix_never_touches_a_reused_descriptor(
    stack: Any, instance: Any, factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """The prefix outlives its connection (it is the prefix's): after the connection is
    terminated and its descriptor number goes to another connection, a late `send` on the old
    one, and a write after it, must not reach the new one, and collecting the prefix must not
    close the other connection's descriptor."""
    url = stack.database_url(instance.dbname)
    await asyncio.to_thread(_reused_descriptor, factory, url)


# -- the request deadline ---------------------------------------------------------------------------

_LONG = " /* " + "x" * (16 * 1024) + " */"  # past MAX_PIPELINED_CHARS: the explicit-transaction path


async def test_stale_deadline_timer_on_the_explicit_transaction_path(spawn: Any) -> None:
    """One pooled session (pool max 1), a 1.5 s deadline. A one-round-trip request arms the
    session's timer at t0+1.5; 1 s later a request on the explicit-transaction path (`transaction`,
    which also goes through `_on_connection`) runs 1 s: the stale timer fires during it and must
    not cancel it; one that sleeps 30 s is cancelled at its own deadline; then another admin
    key's request on the same pool is neither taken for timed out nor cancelled early; and a
    plpgsql loop that swallows cancels ends at the deadline too."""
    async with _own(spawn, FLUXBASE_SQL_DEADLINE_MS="1500", FLUXBASE_TENANT_POOL_MAX="1") as (
        _inst,
        api,
        pid,
        token,
        key,
    ):
        other = await api.new_key(token, pid, rateLimitRequests=1_000_000)

        async def timed(k: str, q: str) -> tuple[dict[str, Any], float]:
            t0 = time.monotonic()
            body = (await api.sql(k, pid, q)).json()
            return body, time.monotonic() - t0

        first, _ = await timed(key, "SELECT pg_backend_pid() AS p")
        assert first["success"], first
        await asyncio.sleep(1.0)
        second, took = await timed(key, "SELECT pg_backend_pid() AS p FROM pg_sleep(1.0)" + _LONG)
        assert second["success"] is True, second  # not cancelled at the first one's due time
        assert second["result"]["rows"] == first["result"]["rows"]  # the same session
        third, took = await timed(key, "SELECT pg_backend_pid() AS p FROM pg_sleep(30)" + _LONG)
        assert third["success"] is False and third["error"]["code"] == "QUERY_TIMEOUT", third
        assert 1.3 <= took < 6, took
        fourth, took = await timed(other, "SELECT pg_backend_pid() AS p FROM pg_sleep(1.0)")
        assert fourth["success"] is True, fourth
        assert fourth["result"]["rows"] != first["result"]["rows"]  # the timed-out session is gone
        swallow = (
            "DO $$ BEGIN LOOP BEGIN PERFORM pg_sleep(0.05); "
            "EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP; END $$"
        )
        fifth, took = await timed(other, swallow)
        assert fifth["success"] is False and fifth["error"]["code"] == "QUERY_TIMEOUT", fifth
        assert 1.3 <= took < 8, took
        sixth, _ = await timed(key, "SELECT pg_backend_pid() AS p")
        assert sixth["success"] is True and sixth["result"]["rows"] != fourth["result"]["rows"], sixth


# -- the keep-alive timer ---------------------------------------------------------------------------


async def test_keep_alive_timer_spares_a_request_split_across_its_firing(api: Api, project: Any) -> None:
    """An answer arms the timer (t0+5 s); the next request's first bytes come at t0+4 s, the rest
    at t0+7 s: the timer fires in between and must leave the connection be (data arrived, as
    uvicorn's cancel on data_received). The request is answered, and the connection then closes
    about 5 s after that answer."""
    reader, writer = await connect(api)
    try:
        writer.write(request(project, "SELECT 1 AS n"))
        status, _, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 1}]
        raw = request(project, "SELECT 2 AS n")
        await asyncio.sleep(4)
        writer.write(raw[:20])
        await writer.drain()
        await asyncio.sleep(3)
        writer.write(raw[20:])
        status, _, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 2}]
        answered = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 15) == b""
        assert 4.5 <= time.monotonic() - answered <= 8.0
    finally:
        writer.close()


async def test_keep_alive_timer_spares_a_pipelined_slow_request(api: Api, project: Any) -> None:
    """After an answer (timer at t0+5 s), two pipelined requests at t0+1 s, the first 6 s long:
    the timer fires while it runs and must not close the connection; both are answered in
    order, and the connection closes about 5 s after the last."""
    reader, writer = await connect(api)
    try:
        writer.write(request(project, "SELECT 0 AS n"))
        status, _, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 0}]
        await asyncio.sleep(1)
        writer.write(request(project, "SELECT 1 AS n FROM pg_sleep(6)") + request(project, "SELECT 2 AS n"))
        for n in (1, 2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await asyncio.wait_for(reader.readexactly(length), 5)
            assert head.startswith(b"HTTP/1.1 200") and rows(body) == [{"n": n}], body
        answered = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 15) == b""
        assert 4.5 <= time.monotonic() - answered <= 8.0
    finally:
        writer.close()


# -- the pool's one wait timer ----------------------------------------------------------------------


async def test_a_shorter_wait_added_later_gives_up_at_its_own_bound(stack: Any) -> None:
    """A pool wait of 0.3 s that starts after one of 3 s gives up at its own bound (86d51b5's one
    timer for all waiters had to re-arm earlier for it; one timer per wait again now)."""
    url = stack.database_url(await stack.create_database())

    async def connect_one() -> TenantConnection:
        conn: TenantConnection = await asyncpg.connect(url, connection_class=TenantConnection)
        return conn

    pool = TenantPool(connect_one, 1)
    loop = asyncio.get_running_loop()
    try:
        held = await pool.acquire(5)

        async def gives_up(timeout: float) -> float:
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await pool.acquire(timeout)
            return loop.time() - t0

        long = asyncio.create_task(gives_up(3.0))
        await asyncio.sleep(0.05)
        assert 0.25 <= await asyncio.wait_for(gives_up(0.3), 5) < 1.0
        assert not long.done()
        assert 2.9 <= await asyncio.wait_for(long, 5) < 4.0
        await pool.release(held)
    finally:
        await pool.close()


async def test_waits_that_give_up_cost_little_each(stack: Any) -> None:
    """12000 requests queued on a busy pool (one API key's flood), their bounds spread over 2 s:
    the process's CPU time while they give up stays small, as with one timer per wait."""
    url = stack.database_url(await stack.create_database())

    async def connect_one() -> TenantConnection:
        conn: TenantConnection = await asyncpg.connect(url, connection_class=TenantConnection)
        return conn

    pool = TenantPool(connect_one, 1)
    n = 12000
    try:
        held = await pool.acquire(5)

        async def gives_up(timeout: float) -> None:
            with pytest.raises(TimeoutError):
                await pool.acquire(timeout)

        waits = [asyncio.create_task(gives_up(1.0 + 2.0 * i / n)) for i in range(n)]
        await asyncio.sleep(0.9)  # all queued, none due yet
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.wait_for(asyncio.gather(*waits), 30)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        await pool.release(held)
        assert cpu < 0.8, (cpu, wall)  # one timer per wait: 0.25 s here; 86d51b5's one timer: 1.8 s
    finally:
        await pool.close()
