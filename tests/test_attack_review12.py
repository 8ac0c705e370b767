"""Hostile review 12: the rtfix merge (sql/0042's broadcast budget, the realtime per-socket byte
bound with writes in pieces), attacked through the real API and a real realtime service with the
source in hand.

Each test asserts the SECURE behaviour. A hole still open is marked `xfail(strict=True)`; the
mark goes with the fix. The realtime service runs in this process on a real socket, with the
options `serve` gives it (`RealtimeService.ws_options`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from websockets.asyncio.server import serve as ws_serve

from fluxbase.config import load_settings
from fluxbase.devstack.procs import free_port
from fluxbase_realtime.server import RealtimeService
from support import Api, bearer
from test_attack_review4 import browser, page_csrf
from test_realtime import subscribe

BOUND = 2 << 20


@contextlib.asynccontextmanager
async def served(instance: Any, **env: str) -> AsyncIterator[tuple[int, RealtimeService]]:
    service = RealtimeService(load_settings({**instance.env, **env}))
    await service.start()
    port = free_port()
    try:
        async with ws_serve(service.handler, "127.0.0.1", port, **service.ws_options()):
            yield port, service
    finally:
        await service.close()


async def _upgrade(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw WebSocket client: the handshake by hand, and then nothing is ever read again (a
    small receive buffer, so the kernel takes little of what the server writes)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    nonce = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /?token={key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _ping_frames(n: int) -> bytes:
    """`n` masked ping frames of the largest control payload (125 bytes; mask 0: sent as is)."""
    return (b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125) * n


# -- 1. realtime: a peer that sends pings and reads nothing -----------------------------------------


async def test_a_socket_that_pings_and_never_reads_is_dropped_before_its_pongs_pile_up(
    api: Api, project: Any, instance: Any
) -> None:
    """websockets answers every ping frame at once with a pong of the same payload, written to
    the transport whether or not the peer reads; the per-socket byte bound (hub.Client) only
    counts what the hub sends and is only checked when an event is delivered. Before the fix a
    socket that subscribed to nothing and sent 16 MB of pings made the server hold 15 MB of pongs
    (every byte the peer sent, for as long as it kept the socket open); now its connection is
    dropped once its unsent bytes pass twice the bound."""
    async with served(instance, FLUXBASE_REALTIME_MAX_BUFFERED_BYTES=str(BOUND)) as (port, service):
        _reader, writer = await _upgrade(port, project.admin_key)
        local = writer.get_extra_info("sockname")[1]
        client = None
        deadline = time.monotonic() + 10
        while client is None and time.monotonic() < deadline:
            client = next((c for c in service.clients if c.ws.remote_address[1] == local), None)
            await asyncio.sleep(0.01)
        assert client is not None
        most = 0
        chunk = _ping_frames(8000)  # 1 MB of pings
        dropped = False
        try:
            for _ in range(16):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 20)
                most = max(most, client.held())
        except (ConnectionError, TimeoutError):
            dropped = True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client in service.clients and client.ws.transport is not None:
            most = max(most, client.held())
            if client.ws.transport.is_closing():
                break
            await asyncio.sleep(0.05)
        held = (
            client.held() if client.ws.transport is not None and not client.ws.transport.is_closing() else 0
        )
        writer.close()
        assert most <= 2 * BOUND + (1 << 20), f"{most / 1e6:.1f} MB of pongs held (dropped: {dropped})"
        assert held == 0, f"the socket is still open holding {held / 1e6:.1f} MB"


# -- 2. the broadcast budget (sql/0042) ---------------------------------------------------------------


async def _sent(control_db: Any, pid: str) -> int:
    return int(
        await control_db.fetchval(
            "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'", pid
        )
    )


async def _ok(api: Api, key: str, pid: str, q: str) -> None:
    r = await api.sql(key, pid, q)
    assert r.status_code == 200 and r.json()["success"], r.text


async def _batch(api: Api, key: str, pid: str, statements: list[str]) -> httpx.Response:
    return await api.http.post(
        "/api/execute-batch",
        json={"projectId": pid, "statements": [{"query": q} for q in statements]},
        headers={"Authorization": f"Bearer {key}"},
    )


DEFERRED = [
    "CREATE TABLE notes (id int)",
    """CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM realtime.broadcast('room', jsonb_build_object('id', NEW.id)); RETURN NULL; END $$""",
    """CREATE CONSTRAINT TRIGGER shout AFTER INSERT ON notes DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION shout()""",
]


async def test_broadcasts_of_a_deferred_trigger_at_commit_are_capped_and_answered_429(
    api: Api, project: Any, control_db: Any
) -> None:
    """An admin's deferred constraint trigger broadcasts at COMMIT, after every statement of the
    request ran: the cap (SET LOCAL) is still in force there and the count is the transaction's,
    so a readwrite key limited to 3 requests still sends no more than 2. Both paths answer the
    documented 429 RATE_LIMIT."""
    pid = project.id
    for q in DEFERRED:
        await _ok(api, project.admin_key, pid, q)
    before = await _sent(control_db, pid)
    key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
    r = await api.sql(key, pid, "INSERT INTO notes SELECT g FROM generate_series(1, 5) g")  # one round trip
    assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMIT", r.text
    key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
    r = await _batch(api, key, pid, ["INSERT INTO notes SELECT g FROM generate_series(1, 5) g"])  # explicit
    assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMIT", r.text
    assert await _sent(control_db, pid) == before
    r = await api.sql(project.admin_key, pid, "SELECT count(*) AS n FROM notes")
    assert r.json()["result"]["rows"] == [{"n": 0}], r.text
    # Within the share, the deferred broadcasts go out.
    key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
    await _ok(api, key, pid, "INSERT INTO notes VALUES (1), (2)")
    assert await _sent(control_db, pid) == before + 2


def _flood(n: int) -> str:
    return (
        f"SELECT count(realtime.broadcast('room', jsonb_build_object('i', g))) FROM generate_series(1, {n}) g"
    )


async def test_a_readwrite_key_can_neither_reset_its_share_nor_leave_its_transaction(
    api: Api, project: Any, control_db: Any
) -> None:
    """A missing cap means the hard 1 000 (sql/0042 fails open to it), so RESET and SET ... TO
    DEFAULT of fluxbase.broadcast_cap would be a way out for a readwrite key: the classifier
    refuses both, as SET and set_config. A procedure that COMMITs between broadcasts (a new
    transaction: a new xid and no SET LOCAL) cannot run: CALL always runs in the explicit
    transaction. A cursor's broadcasts are counted as they are fetched."""
    pid = project.id
    await _ok(
        api,
        project.admin_key,
        pid,
        """CREATE PROCEDURE chunks(n int) LANGUAGE plpgsql AS $$
BEGIN FOR i IN 1..n LOOP PERFORM realtime.broadcast('room', '{}'::jsonb); COMMIT; END LOOP; END $$""",
    )
    await _ok(api, project.admin_key, pid, "GRANT EXECUTE ON PROCEDURE chunks(int) TO PUBLIC")
    before = await _sent(control_db, pid)
    for escape in (
        "RESET fluxbase.broadcast_cap",
        "SET LOCAL fluxbase.broadcast_cap TO DEFAULT",
        "SET LOCAL fluxbase.broadcast_cap = '1000'",
        'SET LOCAL "FLUXBASE"."BROADCAST_CAP" = \'1000\'',
        "SELECT set_config('fluxbase.broadcast_cap', '1000', true)",
    ):
        key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
        r = await _batch(api, key, pid, [escape, _flood(5)])
        assert r.status_code in (200, 403, 429), (escape, r.text)
        assert r.json()["success"] is False, (escape, r.text)
        assert r.json()["error"].get("statementIndex") == 0, (escape, r.text)  # refused itself
    key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
    r = await api.sql(key, pid, "CALL chunks(5)")
    assert r.json()["success"] is False, r.text
    assert "invalid transaction termination" in r.json()["error"]["message"], r.text
    key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
    r = await _batch(
        api,
        key,
        pid,
        [
            "DECLARE c CURSOR FOR SELECT realtime.broadcast('room', '{}'::jsonb) FROM generate_series(1, 5)",
            "FETCH 2 FROM c",
            "FETCH 3 FROM c",
        ],
    )
    assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMIT", r.text
    assert await _sent(control_db, pid) == before


async def test_the_dashboard_sql_page_spends_the_members_window_too(
    api: Api, project: Any, instance: Any, instance_admin: dict[str, Any], control_db: Any
) -> None:
    """The dashboard's SQL page built its TenantRequest without the broadcast share: every run
    there could broadcast the hard 1 000 whatever was left of the member's window (a project
    limited to 3 requests a minute sent 5 from one run). Now it is the same share as the API's."""
    pid = project.id
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"rateLimitRequests": 3, "rateLimitWindowSeconds": 60},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    before = await _sent(control_db, pid)
    async with browser(instance, project.owner_token) as b:
        _, csrf = await page_csrf(b, f"/dashboard/p/{pid}/sql")
        r = await b.post(f"/dashboard/p/{pid}/sql", data={"_csrf": csrf, "query": _flood(5)})
        assert r.status_code in (200, 429), r.text
    assert await _sent(control_db, pid) == before, "the dashboard run broadcast past its window"


# -- 3. after the sqlspeed merge: the hot path's rate limit under concurrency -------------------------


async def test_concurrent_requests_of_one_key_never_pass_its_limit_with_lease_waiters(
    api: Api, project: Any
) -> None:
    """sqlspeed replaced the per-name lease lock by one future its waiters share: twenty
    execute-sql requests of a key limited to 5 arriving at once still get 5 answers and 15
    refusals (429 RATE_LIMIT, with Retry-After), and none of the refused ran its statement."""
    pid = project.id
    await _ok(api, project.admin_key, pid, "CREATE TABLE hits (v int)")
    key = await api.new_key(
        project.owner_token, pid, "readwrite", rateLimitRequests=5, rateLimitWindowSeconds=60
    )
    answers = await asyncio.gather(*(api.sql(key, pid, f"INSERT INTO hits VALUES ({i})") for i in range(20)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 5 + [429] * 15, codes
    assert all("Retry-After" in r.headers for r in answers if r.status_code == 429)
    r = await api.sql(project.admin_key, pid, "SELECT count(*) AS n FROM hits")
    assert r.json()["result"]["rows"] == [{"n": 5}], r.text


# -- 4. realtime: one tenant's stalled socket holds every project's delivery --------------------------


def _text_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return b"\x81" + bytes([0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


async def test_another_tenants_stalled_socket_does_not_delay_a_projects_events(
    api: Api, project: Any, instance: Any
) -> None:
    """The attacker's project writes 24 rows of 900 kB while one of its sockets, subscribed, reads
    nothing; a victim project's one-row insert right after reaches its subscriber 0.35 s later
    (0.08 s without the stalled socket: one DRAIN_WAIT_S wait, measured at load average ~3 on
    2 cores). A reader that drains about half the bound per 0.25 s is never cut off and makes
    every part of every large batch wait. Fixed: the service no longer waits for any socket;
    each socket takes a large batch's parts at its own pace from its own backlog (hub.Client)
    and is cut off when a part has waited hub.STALL_S without fitting under its bound."""
    pid, key = project.id, project.admin_key
    await _ok(api, key, pid, "CREATE TABLE big (id serial PRIMARY KEY, v text)")
    vid = await api.new_project(project.owner_token, "victim")
    vkey = await api.new_key(project.owner_token, vid, "admin")
    await _ok(api, vkey, vid, "CREATE TABLE small (id int)")
    async with served(instance, FLUXBASE_REALTIME_MAX_BUFFERED_BYTES=str(BOUND)) as (port, service):
        _reader, stalled = await _upgrade(port, key)
        stalled.write(_text_frame(f'{{"type": "subscribe", "roomId": "project_{pid}"}}'.encode()))
        await stalled.drain()
        deadline = time.monotonic() + 10
        while not any(c.subs for c in service.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        async with subscribe(f"ws://127.0.0.1:{port}", vid, vkey) as victim:
            await _ok(
                api, key, pid, "INSERT INTO big (v) SELECT repeat('x', 900000) FROM generate_series(1, 24)"
            )
            started = time.monotonic()
            await _ok(api, vkey, vid, "INSERT INTO small VALUES (1)")
            await victim.rows(1, 30)
            took = time.monotonic() - started
        stalled.close()
    assert took < 0.2, f"the victim's event took {took:.2f} s"
