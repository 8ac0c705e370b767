"""`fluxbase realtime` with FLUXBASE_REALTIME_WORKERS=2: two processes on one port (SO_REUSEPORT)
each deliver every event exactly once, in order, to the sockets they hold; presence spans them; a
killed worker is replaced; SIGTERM stops them all. And the fan-out by class (hub.Hub.dispatch):
sockets in one batch that share a class and sockets that do not each get exactly their events."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fluxbase.devstack.procs import free_port
from support import Api, run_service
from test_realtime import Sub, subscribe
from test_realtime_v2 import _diff, _join, _send, _socket, _track

ENV = {"FLUXBASE_REALTIME_WORKERS": "2", "FLUXBASE_REALTIME_PRESENCE_HEARTBEAT_SECONDS": "3"}
# The first test also starts three processes (a supervisor and two workers), and on a loaded
# machine that alone has taken most of the default 120 s.
pytestmark = pytest.mark.timeout(240)


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _socket_inodes(pid: int) -> set[str]:
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    found.add(link[8:-1])
    return found


def _tcp() -> Iterator[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every TCP socket of this network namespace."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            f = line.split()
            yield int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3], f[9]


def _listening(pid: int, port: int) -> bool:
    mine = _socket_inodes(pid)
    return any(lp == port and st == "0A" and ino in mine for lp, _rp, st, ino in _tcp())


def _holder(port: int, sub: Sub, workers: list[int]) -> int:
    """The worker process holding the server side of `sub`'s connection."""
    client_port = sub.ws.transport.get_extra_info("sockname")[1]
    inode = next(ino for lp, rp, st, ino in _tcp() if lp == port and rp == client_port and st == "01")
    (pid,) = [w for w in workers if inode in _socket_inodes(w)]
    return pid


def _wait_workers(parent: int, port: int, n: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        kids = _children(parent)
        if len(kids) == n and all(_listening(k, port) for k in kids):
            return kids
        assert time.monotonic() < deadline, f"workers {kids} not all listening on {port}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def workers(instance, log_dir) -> Iterator[Any]:
    port = free_port()
    env = dict(instance.env, FLUXBASE_REALTIME_PORT=str(port), **ENV)
    with run_service(["realtime"], env, port, log_dir) as proc:
        proc.port = port
        proc.ws = f"ws://127.0.0.1:{port}"
        proc.kids = _wait_workers(proc.proc.pid, port, 2)
        yield proc
        kids = _children(proc.proc.pid)
    # SIGTERM to the supervisor stopped its workers too.
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]


async def _sql(api: Api, project, q: str) -> None:
    r = await api.sql(project.admin_key, project.id, q)
    assert r.json()["success"], r.text


@contextlib.asynccontextmanager
async def _spread(workers, project, each: int) -> AsyncIterator[dict[int, list[Sub]]]:
    """Subscribed sockets until every worker holds `each` of them (the kernel picks)."""
    held: dict[int, list[Sub]] = {k: [] for k in workers.kids}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(60):
            if all(len(v) >= each for v in held.values()):
                break
            s = await stack.enter_async_context(subscribe(workers.ws, project.id, project.admin_key))
            held[_holder(workers.port, s, workers.kids)].append(s)
        assert all(len(v) >= each for v in held.values()), {k: len(v) for k, v in held.items()}
        yield held


async def _values(s: Sub, n: int) -> list[str]:
    return [m["payload"]["record"]["v"] for m in await s.rows(n, timeout=15)]


async def test_two_workers_on_one_port_deliver_every_event_once(api: Api, project, workers) -> None:
    await _sql(api, project, "CREATE TABLE w (id serial PRIMARY KEY, v text)")
    expected = [f"s{i}" for i in range(3)] + [f"b{i}" for i in range(20)]
    async with _spread(workers, project, 3) as held:
        for v in expected[:3]:
            await _sql(api, project, f"INSERT INTO w (v) VALUES ('{v}')")
        await _sql(api, project, "INSERT INTO w (v) SELECT 'b' || g FROM generate_series(0, 19) g")
        socks = [s for group in held.values() for s in group]
        for s in socks:
            assert await _values(s, len(expected)) == expected
        for s in socks:  # and nothing twice
            assert [m for m in await s.silent(0.3) if m["type"] == "db_event"] == []

        # Presence is the same on both workers: a member tracked through one is seen by the other.
        a, b = (group[0] for group in held.values())
        room = f"project_{project.id}:lobby"
        await _join(a, room)
        ka = await _track(a, room, {"who": "a"})
        assert await _join(b, room) == {ka: {"who": "a"}}
        kb = await _track(b, room, {"who": "b"})
        joins = (await _diff(a, lambda p: kb in p["joins"]))["joins"]
        # a's own join may arrive in the same coalesced diff as b's; nothing else may.
        assert joins[kb] == {"who": "b"} and {k: v for k, v in joins.items() if k != kb} in (
            {},
            {ka: {"who": "a"}},
        )


async def test_a_killed_worker_is_replaced_and_the_other_keeps_delivering(api: Api, project, workers) -> None:
    await _sql(api, project, "CREATE TABLE k (id serial PRIMARY KEY, v text)")
    async with _spread(workers, project, 1) as held:
        doomed, survivor = workers.kids
        os.kill(doomed, signal.SIGKILL)
        await _sql(api, project, "INSERT INTO k (v) VALUES ('after')")
        assert await _values(held[survivor][0], 1) == ["after"]
    workers.kids = _wait_workers(workers.proc.pid, workers.port, 2)
    assert survivor in workers.kids and doomed not in workers.kids
    async with _spread(workers, project, 1) as held:
        await _sql(api, project, "INSERT INTO k (v) VALUES ('again')")
        for group in held.values():
            assert await _values(group[0], 1) == ["again"]


async def test_one_batch_reaches_each_fanout_class_exactly(api: Api, project, workers) -> None:
    """One statement's rows arrive in one batch: sockets of one class share its bytes, and
    sockets of other classes (filters equal in Python but not to a filter, a table list, an
    operation list, a second subscription on the socket) each get exactly their own events."""
    await _sql(api, project, "CREATE TABLE c (id serial PRIMARY KEY, v text, n numeric, f boolean)")
    await _sql(api, project, "CREATE TABLE d (id serial PRIMARY KEY, v text)")
    key, pid = project.admin_key, project.id
    kinds: dict[str, dict[str, Any]] = {
        "all": {},
        "c only": {"tables": ["c"]},
        "n eq 1": {"filters": {"c": {"column": "n", "op": "eq", "value": 1}}},
        "n eq 1.5": {"filters": {"c": {"column": "n", "op": "eq", "value": 1.5}}},
        "f eq true": {"filters": {"c": {"column": "f", "op": "eq", "value": True}}},
        "deletes": {"operations": ["DELETE"]},
    }
    async with contextlib.AsyncExitStack() as stack:
        socks = {
            name: [
                await stack.enter_async_context(subscribe(workers.ws, pid, key, **extra)) for _ in range(3)
            ]
            for name, extra in kinds.items()
        }
        # A socket that also joined a topic of the project takes the event-by-event path.
        two = await stack.enter_async_context(_socket(workers.ws, key))
        await two.ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
        assert (await two.next())["type"] == "subscribed"
        await _join(two, f"project_{pid}:side")
        await _sql(
            api,
            project,
            "WITH a AS (INSERT INTO c (v, n, f) VALUES ('one', 1, false), ('half', 1.5, true), "
            "('two', 2, true) RETURNING 1) INSERT INTO d (v) VALUES ('d')",
        )
        await _sql(api, project, "DELETE FROM c WHERE v = 'two'")
        # The INSERTs (one statement, in either table order), then the DELETE.
        want = {
            "all": (["d", "half", "one", "two"], ["two"]),
            "c only": (["half", "one", "two"], ["two"]),
            "n eq 1": (["d", "one"], []),  # d has no filter: every row of it
            "n eq 1.5": (["d", "half"], []),
            "f eq true": (["d", "half", "two"], ["two"]),
            "deletes": ([], ["two"]),
        }
        for name, group in socks.items():
            inserted, deleted = want[name]
            for s in group:
                got = [
                    (m["payload"]["operation"], (m["payload"].get("record") or m["payload"].get("old"))["v"])
                    for m in await s.rows(len(inserted) + len(deleted), timeout=15)
                ]
                assert sorted(v for op, v in got if op == "INSERT") == inserted, (name, got)
                assert [v for op, v in got[len(inserted) :] if op == "DELETE"] == deleted, (name, got)
                assert [m for m in await s.silent(0.3) if m["type"] == "db_event"] == [], name
        values = [m["payload"]["record"]["v"] for m in await two.rows(4, timeout=15)]
        assert sorted(values) == ["d", "half", "one", "two"]
        (last,) = await two.rows(1, timeout=15)
        assert last["payload"]["operation"] == "DELETE"
        assert await _send(two, type="ping") == {"type": "pong"}
