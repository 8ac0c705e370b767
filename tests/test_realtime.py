"""Realtime end to end: real API and realtime processes, real WebSocket clients, real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from fluxbase.devstack.procs import free_port
from fluxbase.security import tokens
from support import Api, assert_error, bearer, run_service


@contextlib.contextmanager
def _realtime(instance, log_dir, **extra: str) -> Iterator[str]:
    port = free_port()
    env = dict(instance.env, FLUXBASE_REALTIME_PORT=str(port), **extra)
    with run_service(["realtime"], env, port, log_dir):
        yield f"ws://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def rt(instance, log_dir) -> Iterator[str]:
    with _realtime(instance, log_dir) as url:
        yield url


class Sub:
    """A subscribed WebSocket with helpers to await specific messages."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        return dict(json.loads(await asyncio.wait_for(self.ws.recv(), timeout)))

    async def until(self, pred, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.next(max(0.01, deadline - time.monotonic()))
            if pred(msg):
                return msg

    async def rows(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            msg = await self.next(max(0.01, deadline - time.monotonic()))
            if msg["type"] == "db_event":
                out.append(msg)
        return out

    async def silent(self, seconds: float) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(await self.next(seconds))
        return got


@contextlib.asynccontextmanager
async def subscribe(
    url: str, project_id: str, token: str | None = None, *, in_url: bool = True, **extra: Any
) -> AsyncIterator[Sub]:
    full = f"{url}/?token={token}" if token and in_url else url
    async with connect(full, max_queue=None) as ws:
        msg: dict[str, Any] = {"type": "subscribe", "roomId": f"project_{project_id}", **extra}
        if token and not in_url:
            msg["token"] = token
        await ws.send(json.dumps(msg))
        sub = Sub(ws)
        first = await sub.next()
        assert first["type"] == "subscribed", first
        yield sub


@pytest.fixture
async def project(api: Api, project):
    """The shared project fixture, with an admin key that is not rate-limited for bulk writes."""
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


async def _table(api: Api, project, name: str = "items") -> None:
    r = await api.sql(project.admin_key, project.id, f"CREATE TABLE {name} (id serial PRIMARY KEY, v text)")
    assert r.json()["success"], r.text


async def test_row_and_schema_events_follow_the_doc(api: Api, project, rt) -> None:
    async with subscribe(rt, project.id, project.admin_key) as sub:
        await _table(api, project)
        schema = await sub.until(lambda m: m["type"] == "schema_update")
        assert schema["payload"]["event_type"] == "schema_update"
        assert schema["payload"]["command"] == "CREATE TABLE" and schema["payload"]["table"] == "items"
        await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ('a')")
        await api.sql(project.admin_key, project.id, "UPDATE items SET v = 'b'")
        await api.sql(project.admin_key, project.id, "DELETE FROM items")
        ins, upd, dele = await sub.rows(3)
        assert ins["payload"] == {
            "operation": "INSERT",
            "table": "items",
            "record": {"id": 1, "v": "a"},
            "old": None,
        }
        assert upd["payload"]["operation"] == "UPDATE"
        assert upd["payload"]["record"] == {"id": 1, "v": "b"} and upd["payload"]["old"] == {
            "id": 1,
            "v": "a",
        }
        assert dele["payload"]["operation"] == "DELETE" and dele["payload"]["record"] == {"id": 1, "v": "b"}
        # (stored once in the outbox, sql/0053: the reader gives it as both)
        assert dele["payload"]["old"] == {"id": 1, "v": "b"}
        for m in (ins, upd, dele):
            assert m["roomId"] == f"project_{project.id}" and isinstance(m["id"], int) and m["timestamp"]
        assert ins["cursor"] < upd["cursor"] or ins["id"] < upd["id"]
        await api.sql(project.admin_key, project.id, "TRUNCATE items")
        trunc = await sub.until(lambda m: m["type"] == "schema_update")
        assert trunc["payload"]["command"] == "TRUNCATE"


async def test_rollback_sends_nothing_and_large_rows_arrive_whole(api: Api, project, rt, control_db) -> None:
    await _table(api, project)
    async with subscribe(rt, project.id, project.admin_key) as sub:
        async with control_db.acquire() as conn:
            with contextlib.suppress(RuntimeError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO p_{project.id}.items (v) VALUES ('rolled back')")
                    raise RuntimeError("abort")
        big = "x" * 50_000
        await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ($1)", [big])
        (ev,) = await sub.rows(1)
        assert ev["payload"]["record"]["v"] == big
        assert [m for m in await sub.silent(0.5) if m["type"] == "db_event"] == []


async def test_interleaved_transactions_lose_and_duplicate_nothing(api: Api, project, rt, control_db) -> None:
    await _table(api, project)
    table = f"p_{project.id}.items"
    async with subscribe(rt, project.id, project.admin_key) as sub:
        conns = [await control_db.acquire() for _ in range(3)]
        try:
            txs = [c.transaction() for c in conns]
            for tx in txs:
                await tx.start()
            # Ids are assigned in this order; commits happen in the reverse order.
            for i, c in enumerate(conns):
                await c.execute(f"INSERT INTO {table} (v) VALUES ($1)", f"tx{i}")
            await txs[2].commit()
            await asyncio.sleep(0.05)
            await txs[1].commit()
            await asyncio.sleep(0.05)
            await txs[0].commit()
        finally:
            for c in conns:
                await control_db.release(c)

        async def burst(k: int) -> None:
            for j in range(20):
                await api.sql(
                    project.admin_key, project.id, "INSERT INTO items (v) VALUES ($1)", [f"w{k}-{j}"]
                )

        await asyncio.gather(*(burst(k) for k in range(4)))
        got = await sub.rows(83, timeout=20)
        values = [m["payload"]["record"]["v"] for m in got]
        assert sorted(values[:3]) == ["tx0", "tx1", "tx2"]
        assert len(values) == len(set(values)) == 83
        assert [m for m in await sub.silent(0.5) if m["type"] == "db_event"] == []
        cursors = [tuple(map(int, m["cursor"].split(":"))) for m in got]
        assert cursors == sorted(cursors)


async def test_resume_with_since_gets_exactly_the_gap(api: Api, project, rt) -> None:
    await _table(api, project)
    async with subscribe(rt, project.id, project.admin_key) as sub:
        await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ('seen')")
        (seen,) = await sub.rows(1)
    for v in ("gap1", "gap2", "gap3"):
        await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ($1)", [v])
    async with subscribe(rt, project.id, project.admin_key, since=seen["cursor"]) as sub:
        await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ('live')")
        got = await sub.rows(4)
        assert [m["payload"]["record"]["v"] for m in got] == ["gap1", "gap2", "gap3", "live"]
        assert [m for m in await sub.silent(0.5) if m["type"] == "db_event"] == []
    # The version is commit-safe: it may lag while other transactions are open, never run ahead.
    deadline = time.monotonic() + 10
    while True:
        r = await api.http.get(
            "/api/version", params={"projectId": project.id}, headers=bearer(project.admin_key)
        )
        assert r.status_code == 200
        version = tuple(map(int, r.json()["version"].split(":")))
        last = tuple(map(int, got[-1]["cursor"].split(":")))
        assert version <= last
        if version == last or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert version == last


async def test_version_is_never_another_projects_event(api: Api, project, control_db) -> None:
    """/api/version looks up the newest entry of the project's index below (project, xmin); the
    entry just before a project without events belongs to the project sorting before it."""
    neighbour = project.id[:-1]  # a prefix sorts right before the project's id
    q = {"projectId": project.id}
    h = bearer(project.admin_key)
    event_id = await control_db.fetchval(
        "INSERT INTO fluxbase.events (project_id, kind, operation, record) "
        "VALUES ($1, 'broadcast', 'BROADCAST', '{}') RETURNING id",
        neighbour,
    )
    try:
        r = await api.http.get("/api/version", params=q, headers=h)
        assert r.status_code == 200 and r.json()["version"] is None, r.text
        await api.http.post("/api/realtime/broadcast", json={**q, "event": "e", "payload": {}}, headers=h)
        deadline = time.monotonic() + 10
        while (
            version := (await api.http.get("/api/version", params=q, headers=h)).json()["version"]
        ) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert not version.endswith(f":{event_id}")
    finally:
        await control_db.execute("DELETE FROM fluxbase.events WHERE id = $1", event_id)


async def test_forged_notify_delivers_nothing(api: Api, project, rt) -> None:
    await _table(api, project)
    forged = json.dumps(
        {
            "type": "db_event",
            "payload": {"operation": "INSERT", "table": "items", "record": {"id": 666, "v": "forged"}},
        }
    )
    async with subscribe(rt, project.id, project.admin_key) as sub:
        for q in (f"SELECT pg_notify('fluxbase_events', '{forged}')", "NOTIFY fluxbase_events, 'x'"):
            body = (await api.sql(project.admin_key, project.id, q)).json()
            assert body["success"] is True
        assert [m for m in await sub.silent(0.7) if m["type"] == "db_event"] == []


async def test_credentials_are_required_and_scoped(api: Api, project, rt, stack) -> None:
    _, other_token = await api.new_user()
    other = await api.new_project(other_token)
    async with connect(rt) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"}))
        msg = json.loads(await ws.recv())
        assert msg["type"] == "error" and msg["error"]["code"] == "AUTH_REQUIRED"
        await ws.send(
            json.dumps({"type": "subscribe", "roomId": f"project_{other}", "token": project.admin_key})
        )
        msg = json.loads(await ws.recv())
        assert msg["type"] == "error" and msg["error"]["code"] == "SCOPE_MISMATCH"
        await ws.send(
            json.dumps({"type": "subscribe", "roomId": f"project_{project.id}", "token": "flx_live_x"})
        )
        assert json.loads(await ws.recv())["error"]["code"] == "AUTH_REQUIRED"
        expired, _ = tokens.issue(
            stack.secret_key,
            kind="realtime",
            subject=project.id,
            session_id="rt_x",
            ttl_seconds=10,
            now=time.time() - 100,
        )
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}", "token": expired}))
        assert json.loads(await ws.recv())["error"]["code"] == "TOKEN_EXPIRED"
        # Nothing of the project reaches this socket.
        await _table(api, project)
        await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ('secret')")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.7)


async def test_realtime_token_and_broadcasts(api: Api, project, rt) -> None:
    r = await api.http.post(
        "/api/realtime/token",
        json={"projectId": project.id, "expiresIn": 60},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 201
    token = r.json()["token"]
    assert_error(
        await api.http.post(
            "/api/realtime/token",
            json={"projectId": project.id, "expiresIn": 0},
            headers=bearer(project.admin_key),
        ),
        400,
        "VALIDATION_ERROR",
    )
    async with (
        subscribe(rt, project.id, token, in_url=False) as a,
        subscribe(rt, project.id, project.admin_key) as b,
    ):
        r = await api.http.post(
            "/api/realtime/broadcast",
            json={"projectId": project.id, "event": "cursor", "payload": {"x": 1}},
            headers=bearer(project.admin_key),
        )
        assert r.status_code == 200
        for s in (a, b):
            msg = await s.until(lambda m: m["type"] == "broadcast")
            assert msg["event"] == "cursor" and msg["payload"] == {"x": 1}
        await a.ws.send(
            json.dumps(
                {"type": "broadcast", "roomId": f"project_{project.id}", "event": "hi", "payload": [1, 2]}
            )
        )
        msg = await b.until(lambda m: m["type"] == "broadcast")
        assert msg["event"] == "hi" and msg["payload"] == [1, 2]


async def test_filters_and_table_switch(api: Api, project, rt) -> None:
    await _table(api, project, "a")
    await _table(api, project, "b")
    async with subscribe(rt, project.id, project.admin_key, tables=["a"], operations=["INSERT"]) as sub:
        await api.sql(project.admin_key, project.id, "INSERT INTO b (v) VALUES ('no')")
        await api.sql(project.admin_key, project.id, "INSERT INTO a (v) VALUES ('yes')")
        await api.sql(project.admin_key, project.id, "UPDATE a SET v = 'no'")
        (ev,) = await sub.rows(1)
        assert ev["payload"]["table"] == "a" and ev["payload"]["record"]["v"] == "yes"
        assert [m for m in await sub.silent(0.5) if m["type"] == "db_event"] == []
    r = await api.http.post(
        "/api/realtime/disable",
        json={"projectId": project.id, "tables": ["a"]},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 200
    listed = await api.http.get(
        "/api/realtime/tables", params={"projectId": project.id}, headers=bearer(project.admin_key)
    )
    assert {t["name"]: t["enabled"] for t in listed.json()["tables"]} == {"a": False, "b": True}
    async with subscribe(rt, project.id, project.admin_key) as sub:
        await api.sql(project.admin_key, project.id, "INSERT INTO a (v) VALUES ('off')")
        await api.sql(project.admin_key, project.id, "INSERT INTO b (v) VALUES ('on')")
        (ev,) = await sub.rows(1)
        assert ev["payload"]["table"] == "b"
    assert_error(
        await api.http.post(
            "/api/realtime/enable",
            json={"projectId": project.id, "tables": ["nope"]},
            headers=bearer(project.admin_key),
        ),
        400,
        "VALIDATION_ERROR",
    )
    ro = await api.new_key(project.owner_token, project.id, "read")
    assert_error(
        await api.http.post(
            "/api/realtime/enable", json={"projectId": project.id, "tables": ["a"]}, headers=bearer(ro)
        ),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )


async def test_slow_consumer_is_cut_off_without_affecting_others(
    api: Api, project, instance, log_dir
) -> None:
    await _table(api, project)
    big = "y" * 20_000
    with _realtime(instance, log_dir, FLUXBASE_REALTIME_QUEUE_SIZE="300") as rt:
        await _slow_consumer(api, project, rt, big)


def _raw_ws(port: int, path: str) -> socket.socket:
    """A WebSocket handshake by hand on a socket with a tiny receive buffer, so it can stop reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _send_text(sock: socket.socket, text: str) -> None:
    data, mask = text.encode(), os.urandom(4)
    header = (
        bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big")
        if len(data) >= 126
        else bytes([0x81, 0x80 | len(data)])
    )
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def _read_frames(sock: socket.socket, timeout: float) -> tuple[int, int | None]:
    """Read until the server's close frame: (text frames seen, close code)."""
    sock.settimeout(timeout)
    buf = b""
    texts = 0

    def need(n: int) -> None:
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed without a close frame")
            buf += chunk

    while True:
        need(2)
        opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
        off = 2
        if length == 126:
            need(4)
            length, off = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            need(10)
            length, off = int.from_bytes(buf[2:10], "big"), 10
        need(off + length)
        payload, buf = buf[off : off + length], buf[off + length :]
        if opcode == 1:
            texts += 1
        elif opcode == 8:
            return texts, int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None


async def _slow_consumer(api: Api, project, rt: str, big: str) -> None:
    port = int(rt.rsplit(":", 1)[1])
    slow = await asyncio.to_thread(_raw_ws, port, f"/?token={project.admin_key}")
    try:
        await asyncio.to_thread(
            _send_text, slow, json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"})
        )
        async with subscribe(rt, project.id, project.admin_key) as fast:
            n = 1500
            for _ in range(0, n, 50):
                r = await api.sql(
                    project.admin_key,
                    project.id,
                    "INSERT INTO items (v) SELECT $1 FROM generate_series(1, 50)",
                    [big],
                )
                assert r.json()["success"], r.text
            got = await fast.rows(n, timeout=60)
            assert len(got) == n  # the fast consumer was not affected
        # The slow socket never read: it was closed with the documented code, well before n.
        texts, code = await asyncio.to_thread(_read_frames, slow, 15)
        assert code == 4008
        assert texts < n
    finally:
        slow.close()


async def test_two_realtime_processes_both_deliver_everything(
    api: Api, project, rt, instance, log_dir
) -> None:
    await _table(api, project)
    with _realtime(instance, log_dir) as rt2:
        async with (
            subscribe(rt, project.id, project.admin_key) as s1,
            subscribe(rt2, project.id, project.admin_key) as s2,
        ):
            for i in range(30):
                await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ($1)", [f"n{i}"])
            a, b = await s1.rows(30), await s2.rows(30)
            assert [m["id"] for m in a] == [m["id"] for m in b]


async def test_retention_trims_and_old_cursors_get_resync_required(api: Api, project, rt, control_db) -> None:
    # Retention never trims past the webhook dispatcher while an endpoint is enabled; this
    # instance runs no worker, so endpoints other tests left enabled here would hold it back.
    paused = await control_db.fetch("UPDATE fluxbase.webhooks SET enabled = false WHERE enabled RETURNING id")
    try:
        await _retention_trims_and_old_cursors_get_resync_required(api, project, rt, control_db)
    finally:
        await control_db.execute(
            "UPDATE fluxbase.webhooks SET enabled = true WHERE id = ANY($1::text[])",
            [r["id"] for r in paused],
        )


async def _retention_trims_and_old_cursors_get_resync_required(api: Api, project, rt, control_db) -> None:
    from fluxbase.services.realtime import trim_events

    await _table(api, project)
    async with subscribe(rt, project.id, project.admin_key) as sub:
        for v in ("old1", "old2"):
            await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ($1)", [v])
        first, _ = await sub.rows(2)
    # Trim by age (everything finished is older than 0 s) while a writer keeps inserting. Short
    # batches interleave with the writer; not single rows: the shared outbox holds every earlier
    # test's events (thousands from the review tests' floods), one round trip each took minutes.
    writer = asyncio.create_task(
        api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ('during')")
    )
    deleted = await trim_events(control_db, max_age_s=0, max_rows=1_000_000, batch=200)
    assert deleted >= 2
    assert (await writer).json()["success"]
    # By the readers' order (xid, id): ids alone are not ordered across backends (each caches 64,
    # sql/0050), so an event committed later may carry a lower id.
    fx, fid = first["cursor"].split(":")
    left = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events"
        " WHERE project_id = $1 AND (xid, id) <= ($2::text::xid8, $3::bigint)",
        project.id,
        fx,
        int(fid),
    )
    assert left == 0
    async with connect(f"{rt}/?token={project.admin_key}") as ws:
        await ws.send(
            json.dumps({"type": "subscribe", "roomId": f"project_{project.id}", "since": first["cursor"]})
        )
        kinds = [json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] for _ in range(2)]
        assert kinds == ["subscribed", "resync_required"]
    # Size limit: keep at most N rows.
    for i in range(5):
        await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ($1)", [f"n{i}"])
    await asyncio.sleep(0.2)
    await trim_events(control_db, max_age_s=10**9, max_rows=2)
    assert await control_db.fetchval("SELECT count(*) FROM fluxbase.events") <= 2


async def test_member_realtime_token_dies_with_the_membership(api: Api, project, rt, control_db) -> None:
    member, member_token = await api.new_user()
    await control_db.execute(
        "INSERT INTO fluxbase.project_members (project_id, user_id, role) VALUES ($1, $2, 'viewer')",
        project.id,
        member["id"],
    )
    r = await api.http.post(
        "/api/realtime/token", json={"projectId": project.id}, headers=bearer(member_token)
    )
    assert r.status_code == 201
    token = r.json()["token"]
    async with subscribe(rt, project.id, token):
        pass
    r = await api.http.delete(
        "/api/team",
        params={"projectId": project.id, "userId": member["id"]},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 200, r.text
    async with connect(f"{rt}/?token={token}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert msg["type"] == "error" and msg["error"]["code"] == "SCOPE_MISMATCH"


async def test_idle_sockets_are_pinged(api: Api, project, instance, log_dir) -> None:
    with _realtime(instance, log_dir, FLUXBASE_REALTIME_PING_SECONDS="1") as rt:
        sock = await asyncio.to_thread(_raw_ws, int(rt.rsplit(":", 1)[1]), f"/?token={project.admin_key}")
        try:
            await asyncio.to_thread(
                _send_text, sock, json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"})
            )
            await asyncio.sleep(2.5)
            sock.settimeout(2)
            data = await asyncio.to_thread(sock.recv, 1 << 16)
            opcodes = []
            while len(data) >= 2:
                length = data[1] & 0x7F
                opcodes.append(data[0] & 0x0F)
                data = data[2 + length :]
            assert 0x9 in opcodes, opcodes  # a ping frame arrived while the socket sat idle
        finally:
            sock.close()


async def test_outbox_reads_stay_index_probes_on_a_large_outbox(control_db) -> None:
    """The realtime reader's and the webhook dispatcher's polls, `since` replays and
    GET /api/version run these statements. As prepared statements they settle on a generic plan;
    with many events in the outbox that plan must still be an index probe, and a quiet project's
    reads must walk its own index, not every project's events (a scan per poll once cost the
    realtime reader's backend ~20 ms per 200k events, several times a second under load)."""
    from fluxbase.services.realtime import LATEST_CURSOR_SQL
    from fluxbase.webhooks.delivery import _EVENTS_SQL
    from fluxbase_realtime.outbox import _HELD_SQL, _PROJECT_POLL_SQL, _REPLAY_SQL

    statements = {
        "fx_probe_held": (
            _HELD_SQL,
            "(text, text[], text[], bigint[])",
            "('999999999', '{planbusy}', '{999999999}', '{1}')",
            "events_xid_idx",
        ),
        "fx_probe_poll": (
            _PROJECT_POLL_SQL,
            "(text, bigint, text, text[], text[], text[], text[], bigint[], int)",
            "('999999990', 0, '999999999', '{planquiet}', '{999999995}', '{planbusy}', '{999999991}', "
            "'{1}', 2000)",
            "events_xid_idx",
        ),
        "fx_probe_webhook": (
            _EVENTS_SQL,
            "(text, bigint, int, text[], text[], bigint[], text[])",
            "('999999990', 0, 1000, '{planbusy}', '{999999991}', '{1}', '{planbusy,o7,o8}')",
            "events_xid_idx|events_project_xid_idx",
        ),
        "fx_probe_replay": (
            _REPLAY_SQL,
            "(text, text, bigint, text, bigint, int)",
            "('planquiet', '0', 0, '999999999', 0, 1000)",
            "events_project_xid_idx",
        ),
        "fx_probe_version": (LATEST_CURSOR_SQL, "(text)", "('planquiet')", "events_project_xid_idx"),
    }
    async with control_db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                "INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record) "
                "SELECT CASE WHEN g <= 10 THEN 'planquiet' WHEN g % 2 = 0 THEN 'planbusy' "
                "ELSE 'o' || (g % 3000) END, 'row', 't', 'INSERT', "
                "'{}'::jsonb FROM generate_series(1, 50000) g"
            )
            # With no endpoints, then with endpoints of many projects (CI's plan once flipped on
            # those other tests left): the projects rows are not needed for a plan, so the
            # foreign key is not checked here.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("ANALYZE fluxbase.events")
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            for endpoints in (0, 300):
                await conn.execute("DELETE FROM fluxbase.webhooks")
                await conn.execute(
                    "INSERT INTO fluxbase.webhooks (id, project_id, url, events, secret) "
                    "SELECT 'wplan' || g, 'o' || g, 'http://127.0.0.1:9/', '{row.inserted}', 's' "
                    "FROM generate_series(1, $1::int) g",
                    endpoints,
                )
                await conn.execute("ANALYZE fluxbase.webhooks")
                for name, (sql, types, args, index) in statements.items():
                    await conn.execute(f"PREPARE {name}{types} AS {sql}")
                    try:
                        plan = "\n".join(
                            r[0] for r in await conn.fetch(f"EXPLAIN (COSTS OFF) EXECUTE {name}{args}")
                        )
                    finally:
                        await conn.execute(f"DEALLOCATE {name}")
                    where = f"{name} ({endpoints} endpoints):\n{plan}"
                    assert "Seq Scan on events" not in plan, where
                    # The dispatcher's read may probe the listed projects' own ranges after the
                    # cursor (bounded by both) or walk the cursor order: never every project's events.
                    walked = [
                        i for i in index.split("|") if f" {i} on events" in plan or f"Scan on {i}" in plan
                    ]
                    assert walked, where
                    if "events_project_xid_idx" in plan and name == "fx_probe_webhook":
                        conds = [line for line in plan.splitlines() if "Index Cond" in line and "xid" in line]
                        bounded = all("project_id = ANY" in c and "ROW(xid, id) >" in c for c in conds)
                        assert conds and bounded, where
        finally:
            await tx.rollback()  # the rows and the statistics both go
