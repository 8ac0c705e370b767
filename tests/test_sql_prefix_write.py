"""The one-round-trip request prefix leaves with its statement: one TCP segment per request.

`RequestPrefix.send` holds the prefix in the connection's `HeldTransport`, which puts it in front
of asyncpg's Bind/Execute/Sync, so both reach PostgreSQL in one write and one segment (one
wake-up of the backend, where two writes made two). Counted with the kernel's own per-socket
counter of data segments sent (`tcpi_data_segs_out` in TCP_INFO), on asyncio's loop and on
uvloop's (`fluxbase api` runs on uvloop), and over a Unix socket.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest
import uvloop

from fluxbase.services import sql
from fluxbase.tenancy import session, wire
from fluxbase.tenancy.pools import TenantConnection
from fluxbase.tenancy.results import encode

_LINUX = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO is Linux's")

_DATA_SEGS_OUT = 156  # offset of tcpi_data_segs_out in struct tcp_info (Linux 4.6+)


def _data_segments_out(sock: Any) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    return int(struct.unpack_from("I", info, _DATA_SEGS_OUT)[0])


def _request(pid: str, uid: str | None) -> session.TenantRequest:
    claims: dict[str, Any] = {"role": "admin", "project_id": pid}
    if uid is not None:
        claims["sub"] = uid
    return session.TenantRequest(
        project_id=pid,
        scope="admin",
        identity=session.Identity(uid, claims, "admin"),
        limits=session.Limits(deadline_s=10, max_rows=100, max_bytes=1 << 20, acquire_timeout_s=5),
    )


@_LINUX
@pytest.mark.parametrize("uid", [None, "alice"], ids=["prepared identity", "end-user identity"])
async def test_a_pipelined_request_sends_one_segment(tenancy, uid: str | None) -> None:
    pools, control, pid = tenancy
    req = _request(pid, uid)
    query = "SELECT $1::int + 1 AS n, auth.uid() AS u"
    body = encode((await sql.execute(pools, control, req, query, [1])).result())  # warm: prepared
    pool = await pools.pool(pid, "admin")
    conn = await pool.acquire()
    sock = conn._transport.get_extra_info("socket")
    await pool.release(conn)
    assert sock.family in (socket.AF_INET, socket.AF_INET6)
    for n in range(5):
        before = _data_segments_out(sock)
        body = encode((await sql.execute(pools, control, req, query, [n])).result())
        assert _data_segments_out(sock) - before == 1, "prefix and statement in one segment"
        assert f'"n":{n + 1}'.encode() in body and (uid or "null").encode() in body, body
    again = await pool.acquire()
    try:
        assert again is conn and conn.dirty  # the same session served them all, pipelined
    finally:
        await pool.release(again)


@_LINUX
async def test_a_failing_prefix_step_still_aborts_its_statement_in_one_segment(tenancy) -> None:
    """The statement after a refused step never runs: PostgreSQL skips to the Sync, as when the
    prefix had its own write (here a prefix step raises, then the statement would insert)."""
    pools, control, pid = tenancy
    req = _request(pid, None)
    await sql.execute(pools, control, req, "CREATE TABLE IF NOT EXISTS prefix_probe (n int)", [])
    pool = await pools.pool(pid, "admin")
    conn = await pool.acquire()
    try:
        prefix = conn.request_prefix
        stmt = await wire.prepare(conn, "INSERT INTO prefix_probe VALUES (1)")
        sock = conn._transport.get_extra_info("socket")
        before = _data_segments_out(sock)
        prefix.send(
            conn, prefix.begin(False, False) + wire.parse_bind_execute("SELECT 1 / 0 WHERE false IS NOT NULL")
        )
        with pytest.raises(asyncpg.DivisionByZeroError):
            await wire.execute(conn, stmt, [], 10)
        assert _data_segments_out(sock) - before == 1
        assert await conn.fetchval("SELECT count(*) FROM prefix_probe") == 0
    finally:
        await pool.release(conn)


async def test_the_read_only_step_is_parsed_when_first_needed_and_only_then(tenancy) -> None:
    """`begin` sends a lazily parsed step's Parse with the first request that needs it, and never
    again (a second Parse of the same name fails the request); requests that need none send none."""
    pools, control, pid = tenancy
    req = _request(pid, None)
    await sql.execute(pools, control, req, "CREATE TABLE IF NOT EXISTS lazy_probe (n int)", [])
    pool = await pools.pool(pid, "admin")
    conn = await pool.acquire()
    try:
        prefix = conn.request_prefix
        insert = await wire.prepare(conn, "INSERT INTO lazy_probe VALUES (1)")
        for read_only in (False, False, True, True, False):
            refused = read_only
            head = prefix.begin(read_only, False)
            assert (b"SET transaction_read_only" in head) == (read_only and "read_only" in prefix._unparsed)
            prefix.send(conn, head + prefix.checks(pid, None, read_only, None, None))
            if refused:
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await wire.execute(conn, insert, [], 10)
            else:
                await wire.execute(conn, insert, [], 10)
        assert "read_only" not in prefix._unparsed
        assert await conn.fetchval("SELECT count(*) FROM lazy_probe") == 3
    finally:
        await pool.release(conn)


class _Tap:
    """The loop's transport, with what is written through it kept (as PostgreSQL messages)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.sent = bytearray()

    def write(self, data: Any) -> None:
        self.sent += data
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def kinds(self) -> list[str]:
        out, i, data = [], 0, bytes(self.sent)
        while i < len(data):
            out.append(chr(data[i]))
            i += 1 + int.from_bytes(data[i + 1 : i + 5], "big")
        return out


@pytest.mark.parametrize(("share", "parses"), [(5000, 0), (1000, 0), (999, 1), (None, 0)])
async def test_a_full_broadcast_share_is_prepared_on_the_session(tenancy, share, parses) -> None:
    """The share of broadcasts that repeats (the cap, 1 000, wherever a window has that much
    left) is a statement prepared when the connection opened: a warm request then sends no Parse
    at all. A smaller share is parsed with its request, as before."""
    pools, control, pid = tenancy
    req = msgspec.structs.replace(_request(pid, None), broadcasts=share)
    query = "SELECT current_setting('fluxbase.broadcast_cap', true) AS cap"
    for _ in range(2):  # warm: the statement prepared, the session's lazily parsed steps too
        await sql.execute(pools, control, req, query, [])
    pool = await pools.pool(pid, "admin")
    conn = await pool.acquire()
    tap = conn._transport.transport = _Tap(conn._transport.transport)
    await pool.release(conn)
    try:
        body = encode((await sql.execute(pools, control, req, query, [])).result())
    finally:
        conn._transport.transport = tap.transport
    kinds = tap.kinds()
    assert kinds.count("P") == parses, kinds
    assert kinds[-1] == "S" and kinds.count("S") == 1
    expected = "null" if share is None else f'"{min(share, 1000)}"'
    assert f'"cap":{expected}'.encode() in body, body


def _on_loop(factory: Callable[[], asyncio.AbstractEventLoop], url: str, **connect: Any) -> tuple[int, Any]:
    async def main() -> tuple[int, Any]:
        conn = await asyncpg.connect(url, connection_class=TenantConnection, **connect)
        try:
            # The hook in asyncpg's connect: every write of the connection goes through it.
            assert type(conn._protocol) is wire._Protocol, type(conn._protocol)
            assert conn._transport is conn._protocol.held_transport
            prefix, _ = await wire.RequestPrefix.open(conn, "SELECT 1", (), {})
            stmt = await wire.prepare(conn, "SELECT $1::int * 2, current_setting('fx.probe', true)")
            raw = conn._transport.get_extra_info("socket")
            tcp = raw.family in (socket.AF_INET, socket.AF_INET6)
            segments = 0
            for n in range(5):
                before = _data_segments_out(raw) if tcp else 0
                # A prefix that leaves state for the statement: it must run first, in order.
                prefix.send(
                    conn, prefix.begin(False, False) + wire.parse_bind_execute("SET LOCAL fx.probe = 'p'")
                )
                rows, _, completed = await wire.execute(conn, stmt, [n], 10)
                segments = max(segments, (_data_segments_out(raw) - before) if tcp else 0)
                assert completed and tuple(rows[0]) == (2 * n, "p"), rows
            assert await conn.fetchval("SELECT current_setting('fx.probe', true)") in (None, "")
            assert conn._transport.held == b""
            return segments, type(conn._transport.transport).__module__
        finally:
            await conn.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@_LINUX
@pytest.mark.parametrize(
    "factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
async def test_send_on_each_event_loop(
    stack, instance, factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    url = stack.database_url(instance.dbname)  # migrated: the prefix's check step needs sql/0011
    segments, transport = await asyncio.to_thread(_on_loop, factory, url)
    assert segments == 1, transport
    assert ("uvloop" in transport) == (factory is uvloop.new_event_loop)


async def test_send_over_a_unix_socket(stack, instance) -> None:
    if getattr(stack, "pg", None) is None:
        pytest.skip("needs the embedded PostgreSQL's socket")
    url = stack.database_url(instance.dbname)
    where = {"host": str(stack.pg.socket_dir), "port": urlsplit(url).port}
    segments, _ = await asyncio.to_thread(_on_loop, uvloop.new_event_loop, url, **where)
    assert segments == 0  # no TCP: nothing counted; the order and the results were checked


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, lines: Any) -> None:
        self.calls.append(("writelines", [bytes(x) for x in lines]))

    def abort(self) -> None:
        self.calls.append(("abort", None))

    def get_write_buffer_size(self) -> int:
        return 7


def test_held_bytes_lead_the_next_write_once() -> None:
    """What is held goes out in front of the next write (a memoryview, as asyncpg writes), in the
    same call, and only once; writelines keeps it first; an abort drops it; everything else is
    the loop's transport's."""
    inner = _Recorder()
    held = wire.HeldTransport(inner)
    held.write(b"plain")
    held.held += b"P1"
    held.held += b"P2"
    held.write(memoryview(b"stmt"))
    held.write(b"next")
    held.held += b"P3"
    held.writelines([b"a", memoryview(b"b")])
    held.held += b"lost"
    held.abort()
    assert inner.calls == [
        ("write", b"plain"),
        ("write", b"P1P2stmt"),
        ("write", b"next"),
        ("writelines", [b"P3", b"a", b"b"]),
        ("abort", None),
    ]
    assert held.held == b"" and held.get_write_buffer_size() == 7
