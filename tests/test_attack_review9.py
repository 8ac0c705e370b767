"""Hostile review 9: the realtime fan-out by subscriber class (hub.Hub.dispatch: sockets whose
subscriptions want the same events share one joined byte buffer per batch; end users are
batched per class and viewer) and `fluxbase realtime --workers N` (workers.supervise, workers
bound with SO_REUSEPORT).

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix.

The service runs in this process (the real handler and hub on a real socket, negotiating no
compression exactly as `server.serve` does, so the class path is the one taken) where a test
needs to look at its internals; the supervisor runs as the real command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve as ws_serve

from fluxbase.config import load_settings
from fluxbase.devstack.procs import PortInUse, ensure_port_free, free_port
from fluxbase_realtime.hub import _small_frame_of
from fluxbase_realtime.server import RealtimeService
from support import Api, bearer
from test_realtime import Sub, subscribe

ROW = "db_event"


@contextlib.asynccontextmanager
async def served(instance: Any) -> AsyncIterator[tuple[str, RealtimeService]]:
    """The real service on a real socket in this process, framed as in production (no
    permessage-deflate: the hub's class path takes framed sockets only)."""
    service = RealtimeService(load_settings(instance.env))
    await service.start()
    port = free_port()
    try:
        async with ws_serve(
            service.handler,
            "127.0.0.1",
            port,
            process_request=service.process_request,
            ping_interval=None,
            compression=None,
        ):
            yield f"ws://127.0.0.1:{port}", service
    finally:
        await service.close()


async def _sql(api: Api, key: str, pid: str, q: str) -> None:
    r = await api.sql(key, pid, q)
    assert r.json()["success"], r.text


async def _until(sub: Sub, marker: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The row events up to (not including) the `mark` row whose v is `marker`."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        msg = await sub.next(max(0.01, deadline - time.monotonic()))
        if msg["type"] != ROW:
            continue
        p = msg["payload"]
        if p["table"] == "mark" and p["record"]["v"] == marker:
            return got
        got.append(msg)


def _ids(msgs: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    return [(m["payload"]["table"], m["payload"]["operation"], m["payload"]["record"]["id"]) for m in msgs]


def _framed(service: RealtimeService) -> None:
    assert service.clients and all(c.framed for c in service.clients), "class path not exercised"


async def _oracle(url: str, pid: str, token: str, stack: contextlib.AsyncExitStack, **spec: Any) -> Sub:
    """A socket that also joins a topic: it has two subscriptions, so the hub serves it event
    by event (the path that existed before the classes): the reference for its class."""
    sub = await stack.enter_async_context(subscribe(url, pid, token, **spec))
    await sub.ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}:oracle"}))
    ack = await sub.until(lambda m: m["type"] in ("subscribed", "error"))
    assert ack["type"] == "subscribed", ack
    return sub


# -- 1. cross-subscriber leakage through classes ---------------------------------------------

# Filters whose values are equal or alike in Python, in repr, or after normalisation, and lists
# in another order: each must deliver what the same filter delivers on the per-event path.
SPECS: list[dict[str, Any]] = [
    {},
    {"tables": ["t", "mark"]},
    {"tables": ["mark", "t"], "operations": ["insert"]},
    {"operations": ["INSERT", "UPDATE"]},
    {"filters": {"t": {"column": "s", "op": "eq", "value": "1"}}},
    {"filters": {"t": {"column": "s", "op": "eq", "value": "1 "}}},
    {"filters": {"t": {"column": "s", "op": "eq", "value": "\u00e9"}}},  # NFC é
    {"filters": {"t": {"column": "s", "op": "eq", "value": "e\u0301"}}},  # NFD é
    {"filters": {"t": {"column": "s", "op": "in", "value": ["a", "b"]}}},
    {"filters": {"t": {"column": "s", "op": "in", "value": ["b", "a"]}}},
    {"filters": {"t": {"column": "s", "op": "in", "value": ["a', 'b"]}}},  # repr-lookalike
    {"filters": {"t": {"column": "x", "op": "eq", "value": 1}}},
    {"filters": {"t": {"column": "x", "op": "eq", "value": 1.0}}},
    {"filters": {"t": {"column": "b", "op": "eq", "value": True}}},
    {"filters": {"t": {"column": "n", "op": "eq", "value": 1}}},
    {"filters": {"t": {"column": "s", "op": "neq", "value": "a"}}},
    {"filters": {"t": {"column": "n", "op": "gt", "value": 2}}},
]

ROWS = (
    "INSERT INTO t (n, x, s, b) VALUES (1, 1, '1', true), (1, 1.0, '1 ', false), (2, 2.5, '\u00e9', true),"
    " (3, 3, 'e\u0301', false), (4, 4, 'a', true), (5, 5, 'b', false), (6, 6, 'a'', ''b', true)"
)


async def test_admin_classes_get_what_the_per_event_path_gives_and_no_other_project(
    api: Api, project: Any, instance: Any
) -> None:
    pid, key = project.id, project.admin_key
    await _sql(api, key, pid, "CREATE TABLE t (id serial PRIMARY KEY, n int, x numeric, s text, b boolean)")
    await _sql(api, key, pid, "CREATE TABLE mark (id serial PRIMARY KEY, v text)")
    other = await api.new_project(project.owner_token)
    other_key = await api.new_key(project.owner_token, other, "admin", rateLimitRequests=1_000_000)
    await _sql(
        api, other_key, other, "CREATE TABLE t (id serial PRIMARY KEY, n int, x numeric, s text, b boolean)"
    )
    async with served(instance) as (url, service), contextlib.AsyncExitStack() as stack:
        # Two sockets per spec (a class of two), the reference beside them; the same shapes in
        # another project.
        classes = [
            [await stack.enter_async_context(subscribe(url, pid, key, **spec)) for _ in range(2)]
            for spec in SPECS
        ]
        oracles = [await _oracle(url, pid, key, stack, **spec) for spec in SPECS]
        strangers = [await stack.enter_async_context(subscribe(url, other, other_key)) for _ in range(2)]
        _framed(service)
        await _sql(api, key, pid, ROWS)
        await _sql(api, key, pid, "UPDATE t SET s = 'b' WHERE s = 'a'")
        await _sql(api, key, pid, "DELETE FROM t WHERE n = 1")
        await _sql(api, other_key, other, "INSERT INTO t (n) VALUES (99)")
        await _sql(api, key, pid, "INSERT INTO mark (v) VALUES ('end')")
        for spec, members, oracle in zip(SPECS, classes, oracles, strict=True):
            want = _ids(await _until(oracle, "end"))
            for member in members:
                assert _ids(await _until(member, "end")) == want, spec
        for s in strangers:
            got = await s.silent(0.3)
            assert [m["payload"]["record"]["n"] for m in got if m["type"] == ROW] == [99]


async def test_topic_and_project_rooms_never_share_a_class(api: Api, project: Any, instance: Any) -> None:
    pid, key = project.id, project.admin_key
    x, y = f"project_{pid}:x", f"project_{pid}:y"
    async with served(instance) as (url, service), contextlib.AsyncExitStack() as stack:
        rooms = {
            room: [await stack.enter_async_context(subscribe(url, pid, key, roomId=room)) for _ in range(n)]
            for room, n in ((f"project_{pid}", 2), (x, 2), (y, 1))
        }
        sender = await stack.enter_async_context(subscribe(url, pid, key, roomId=x))
        await sender.ws.send(json.dumps({"type": "subscribe", "roomId": y}))
        assert (await sender.until(lambda m: m["type"] == "subscribed"))["roomId"] == y
        _framed(service)
        for room, event in ((x, "ex"), (y, "ey")):
            await sender.ws.send(
                json.dumps({"type": "broadcast", "roomId": room, "event": event, "payload": room})
            )
        r = await api.http.post(
            "/api/realtime/broadcast",
            json={"projectId": pid, "event": "all", "payload": 1},
            headers=bearer(key),
        )
        assert r.status_code == 200, r.text
        want = {f"project_{pid}": ["all"], x: ["ex"], y: ["ey"]}
        for room, members in rooms.items():
            for s in members:
                got = await s.silent(0.7)
                assert [(m["event"], m["roomId"]) for m in got if m["type"] == "broadcast"] == [
                    (e, room) for e in want[room]
                ], room


async def _rls_docs(api: Api, project: Any) -> None:
    pid, key = project.id, project.admin_key
    await _sql(api, key, pid, "CREATE TABLE docs (id serial PRIMARY KEY, owner text, v text)")
    await _sql(api, key, pid, "CREATE TABLE mark (id serial PRIMARY KEY, v text)")
    h = bearer(key)
    r = await api.http.post(
        f"/api/projects/{pid}/rls/policies",
        json={"table": "docs", "name": "own", "command": "SELECT", "using": "owner = auth.uid()"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(f"/api/projects/{pid}/rls/tables/docs", json={"enabled": True}, headers=h)
    assert r.status_code == 200, r.text


async def _rt_token(api: Api, project: Any, uid: str | None, key: str | None = None) -> str:
    body: dict[str, Any] = {"projectId": project.id}
    if uid is not None:
        body["authUid"] = uid
    r = await api.http.post("/api/realtime/token", json=body, headers=bearer(key or project.admin_key))
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


async def test_end_users_sharing_a_class_see_only_their_own_rows(
    api: Api, project: Any, instance: Any
) -> None:
    await _rls_docs(api, project)
    pid = project.id
    read_key = await api.new_key(project.owner_token, pid, "read", rateLimitRequests=1_000_000)
    tokens = {u: await _rt_token(api, project, u) for u in ("u1", "u2", "U1", "u1 ")}
    async with served(instance) as (url, service), contextlib.AsyncExitStack() as stack:
        socks = {
            u: [await stack.enter_async_context(subscribe(url, pid, t)) for _ in range(3)]
            for u, t in tokens.items()
        }
        anon = [await stack.enter_async_context(subscribe(url, pid, read_key)) for _ in range(2)]
        _framed(service)
        await _sql(
            api,
            project.admin_key,
            pid,
            "INSERT INTO docs (owner, v) VALUES ('u1', 'a'), ('u2', 'b'), ('U1', 'c'), ('u1 ', 'd'),"
            " (NULL, 'e'), ('u1', 'f')",
        )
        await _sql(api, project.admin_key, pid, "UPDATE docs SET owner = 'u2' WHERE v = 'a'")
        await _sql(api, project.admin_key, pid, "INSERT INTO mark (v) VALUES ('end')")
        want = {
            "u1": [("INSERT", "a"), ("INSERT", "f")],
            "u2": [("INSERT", "b"), ("UPDATE", "a")],
            "U1": [("INSERT", "c")],
            "u1 ": [("INSERT", "d")],
        }
        for u, members in socks.items():
            for s in members:
                got = await _until(s, "end")
                assert [(m["payload"]["operation"], m["payload"]["record"]["v"]) for m in got] == want[u], u
        for s in anon:
            assert await _until(s, "end") == []


async def _key_id(api: Api, project: Any, key: str) -> str:
    r = await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(project.owner_token))
    return str(next(k["id"] for k in r.json()["apiKeys"] if key.startswith(k["prefix"])))


@pytest.mark.parametrize("scope", ["admin", "read"])
async def test_a_revoked_member_of_a_class_gets_nothing_more(
    api: Api, project: Any, instance: Any, scope: str
) -> None:
    """Two sockets in one class (same spec; for `read`, the same viewer too), one credential
    revoked: the class's next batch reaches only the other."""
    pid = project.id
    await _sql(api, project.admin_key, pid, "CREATE TABLE mark (id serial PRIMARY KEY, v text)")
    doomed = await api.new_key(project.owner_token, pid, scope, rateLimitRequests=1_000_000)
    kept = await api.new_key(project.owner_token, pid, scope, rateLimitRequests=1_000_000)
    async with (
        served(instance) as (url, service),
        subscribe(url, pid, doomed) as a,
        subscribe(url, pid, kept) as b,
    ):
        _framed(service)
        await _sql(api, project.admin_key, pid, "INSERT INTO mark (v) VALUES ('before')")
        assert await _until(a, "before") == [] and await _until(b, "before") == []
        r = await api.http.delete(
            f"/api/projects/{pid}/api-keys/{await _key_id(api, project, doomed)}",
            headers=bearer(project.owner_token),
        )
        assert r.status_code == 200, r.text
        await service.revalidate_once()  # (the doorbell starts one anyway; here it is certain)
        await _sql(api, project.admin_key, pid, "INSERT INTO mark (v) VALUES ('after')")
        assert await _until(b, "after") == []
        rest = await a.silent(0.5)
        assert [m["type"] for m in rest] == ["error"], rest


async def test_a_credential_revoked_while_the_gate_decides_gets_nothing(
    api: Api, project: Any, instance: Any
) -> None:
    """Two read-key sockets in one gated class (same viewer); the batch's policy check takes
    0.8 s and one key is revoked (and its subscription ended) meanwhile: the batch, once
    decided, reaches only the other."""
    pid, admin = project.id, project.admin_key
    await _sql(api, admin, pid, "CREATE TABLE mark (id serial PRIMARY KEY, v text)")
    await _sql(api, admin, pid, "CREATE TABLE slow (id serial PRIMARY KEY, v text)")
    h = bearer(admin)
    r = await api.http.post(
        f"/api/projects/{pid}/rls/policies",
        json={
            "table": "slow",
            "name": "slow",
            "command": "SELECT",
            "using": "(SELECT true FROM pg_sleep(0.8))",
        },
        headers=h,
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(f"/api/projects/{pid}/rls/tables/slow", json={"enabled": True}, headers=h)
    assert r.status_code == 200, r.text
    doomed = await api.new_key(project.owner_token, pid, "read", rateLimitRequests=1_000_000)
    kept = await api.new_key(project.owner_token, pid, "read", rateLimitRequests=1_000_000)
    async with (
        served(instance) as (url, service),
        subscribe(url, pid, doomed) as a,
        subscribe(url, pid, kept) as b,
    ):
        _framed(service)
        assert service.gate is not None
        before = service.gate.queries
        await _sql(api, admin, pid, "INSERT INTO slow (v) VALUES ('secret')")
        deadline = time.monotonic() + 5
        while service.gate.queries == before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the lane is deciding now (0.8 s)
        r = await api.http.delete(
            f"/api/projects/{pid}/api-keys/{await _key_id(api, project, doomed)}",
            headers=bearer(project.owner_token),
        )
        assert r.status_code == 200, r.text
        await service.revalidate_once()  # (unless the doorbell's round ended it already)
        assert len(service.hub.rooms[pid]) == 1, "the revoked subscription is still in the room"
        lane = service.hub._lanes.get(pid)
        assert lane is not None and lane.task is not None, "the decision ended before the revocation"
        await _sql(api, admin, pid, "INSERT INTO mark (v) VALUES ('after')")
        assert [m["payload"]["record"]["v"] for m in await _until(b, "after")] == ["secret"]
        rest = await a.silent(0.5)
        assert [m["type"] for m in rest] == ["error"], rest


async def test_switching_paths_keeps_order_without_gap_or_duplicate(
    api: Api, project: Any, instance: Any
) -> None:
    """A socket goes per-event (a second room) → class (it leaves the room) → replay (since) →
    class again, with events committed throughout: it sees each event once, in commit order."""
    pid, key = project.id, project.admin_key
    await _sql(api, key, pid, "CREATE TABLE mark (id serial PRIMARY KEY, v text)")
    async with served(instance) as (url, service), contextlib.AsyncExitStack() as stack:
        peer = await stack.enter_async_context(subscribe(url, pid, key))  # the class's other member
        s = await _oracle(url, pid, key, stack)
        _framed(service)

        async def writer(n: int, tag: str) -> None:
            for i in range(n):
                await _sql(api, key, pid, f"INSERT INTO mark (v) VALUES ('{tag}{i}')")

        w = asyncio.create_task(writer(6, "a"))
        await asyncio.sleep(0.05)
        await s.ws.send(json.dumps({"type": "unsubscribe", "roomId": f"project_{pid}:oracle"}))
        await w
        await _sql(api, key, pid, "INSERT INTO mark (v) VALUES ('m1')")
        first = [m["payload"]["record"]["v"] for m in await _until(s, "m1")]
        assert first == [f"a{i}" for i in range(6)], first
        # Resume on a new socket from the last cursor seen by the peer before a burst.
        seen = await _until(peer, "m1")
        assert [m["payload"]["record"]["v"] for m in seen] == first
        cursor = seen[2]["cursor"]
        w = asyncio.create_task(writer(6, "b"))
        async with subscribe(url, pid, key, since=cursor) as r:
            await w
            await _sql(api, key, pid, "INSERT INTO mark (v) VALUES ('m2')")
            got = [m["payload"]["record"]["v"] for m in await _until(r, "m2")]
        assert got == ["a3", "a4", "a5", "m1", *(f"b{i}" for i in range(6))], got


# -- 2. slow consumers on the class path -------------------------------------------------------


async def test_a_socket_that_stops_reading_holds_bounded_bytes(api: Api, project: Any, instance: Any) -> None:
    pid, key = project.id, project.admin_key
    await _sql(api, key, pid, "CREATE TABLE big (id serial PRIMARY KEY, v text)")
    async with served(instance) as (url, service):
        # max_queue=1: the client stops reading its transport after one message, so TCP pushes
        # back and the server's side fills (what a stalled browser tab does).
        async with connect(f"{url}/?token={key}", max_queue=1, compression=None) as ws:
            await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            port = ws.transport.get_extra_info("sockname")[1]
            client = next(c for c in service.clients if c.ws.remote_address[1] == port)
            before = service.hub.delivered
            # 28 rows of 900 kB each: what PostgreSQL stores is a few kB (TOAST compresses the
            # repeats), what the socket is sent is 25 MB.
            await _sql(
                api, key, pid, "INSERT INTO big (v) SELECT repeat('x', 900000) FROM generate_series(1, 28)"
            )
            deadline = time.monotonic() + 20
            while service.hub.delivered - before < 28 and not client.closed and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            held = sum(len(p) for p in client.pending) + client.ws.transport.get_write_buffer_size()
            ws.transport.abort()  # (no closing handshake behind 20 MB nobody reads)
            assert client.closed or held <= 8 << 20, f"{held / 1e6:.0f} MB held for one stalled socket"


def _frame_cache_bytes() -> int:
    """Bytes of messages (and as many again of frames) that hub.frame_of's cache keeps alive."""
    caches = [r for r in gc.get_referents(_small_frame_of) if isinstance(r, dict)]
    return sum(
        2 * len(k[0]) for c in caches for k in c if isinstance(k, tuple) and k and isinstance(k[0], bytes)
    )


async def test_delivered_messages_are_not_kept_alive(api: Api, project: Any, instance: Any) -> None:
    pid, key = project.id, project.admin_key
    await _sql(api, key, pid, "CREATE TABLE big (id serial PRIMARY KEY, v text)")
    async with served(instance) as (url, _service), subscribe(url, pid, key) as sub:
        before = _frame_cache_bytes()
        await _sql(
            api, key, pid, "INSERT INTO big (v) SELECT repeat('y', 900000) FROM generate_series(1, 24)"
        )
        assert len(await sub.rows(24, 20)) == 24  # every message delivered and read
        gc.collect()
        kept = _frame_cache_bytes() - before
        assert kept <= 8 << 20, f"{kept / 1e6:.0f} MB kept after delivery"


# -- 3. the supervisor of --workers ------------------------------------------------------------


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_workers_end_with_their_supervisor(instance: Any, sig: signal.Signals) -> None:
    """A supervisor killed outright (SIGKILL: the OOM killer) or hung up (SIGHUP) leaves no worker
    serving the port (they were orphaned, still accepting connections, before workers.py started
    them with die_with_parent and handled SIGHUP)."""
    port = free_port()
    env = dict(instance.env, FLUXBASE_REALTIME_PORT=str(port))
    sup = subprocess.Popen(
        [sys.executable, "-m", "fluxbase", "realtime", "--workers", "2"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 15
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = _children(sup.pid)
        assert len(workers) == 2, workers
        sup.send_signal(sig)
        sup.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived their supervisor"
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        for w in workers:  # (orphans this test started)
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


_HOLDER = """
import os, socket, sys, time
os.setgid(65534); os.setuid(65534)  # first: a socket belongs to the user that creates it
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the holder as another user")
async def test_a_port_held_by_another_user_is_not_shared(instance: Any) -> None:
    """Another user's process listens on the port with SO_REUSEPORT: neither the supervisor's
    check nor a worker's bind (websockets' serve with reuse_port, as server.serve does) may join
    it — the kernel only groups sockets of one user, and the check binds without the option."""
    port = free_port()
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(port), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and (await holder.stdout.readline()).strip() == b"ready"
        with pytest.raises(PortInUse):
            ensure_port_free("127.0.0.1", port, "realtime service", "FLUXBASE_REALTIME_PORT")

        async def nothing(_ws: Any) -> None:
            return None

        with pytest.raises(OSError):
            async with ws_serve(nothing, "127.0.0.1", port, reuse_port=True, compression=None):
                pass
    finally:
        holder.kill()
        await holder.wait()
