"""A registered cluster's connection string changed (issue 19, docs/clusters.md "What runs
where"): PATCH /api/admin/clusters/{id} {connectionString} with the same server at another address
takes effect in every running process without a restart — both API processes, realtime and the
worker drop their pools and readers for the cluster and reconnect with the new details, within
about a second (the control doorbell; the worker looks every half second). Real processes, two
embedded PostgreSQL servers; the other address is a TCP relay in front of server two, which
records the connections it carries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from websockets.asyncio.client import connect

from chaossupport import Receiver
from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import free_port, stop_process
from support import Api, Stack, assert_clean, bearer, run_service
from test_cluster_move_drain import spawn_worker
from test_clusters import own_tmp, pg2  # noqa: F401  (module fixtures: a second PostgreSQL server)


class Relay:
    """127.0.0.1:<port> → server two: another address of the same server. `upstream` holds the
    local ports of its connections to the server (what the server sees as client ports)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.upstream: set[int] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.upstream.add(up_writer.get_extra_info("sockname")[1])

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        tasks = [asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _url(pg: EmbeddedPostgres, db: str, port: int | None = None) -> str:
    return f"postgresql://postgres:{quote(pg.password, safe='')}@127.0.0.1:{port or pg.port}/{db}"


@pytest.fixture(scope="module")
async def inst(stack: Stack, log_dir: Path, pg2: EmbeddedPostgres) -> AsyncIterator[dict[str, Any]]:  # noqa: F811
    """Two API processes, realtime and a worker; cluster two registered at its own address."""
    dbname = await stack.create_database()
    owner = await asyncpg.connect(pg2.url)
    try:
        await owner.execute("CREATE DATABASE repoint_two")
    finally:
        await owner.close()
    relay = Relay(pg2.port)
    await relay.start()
    receiver = Receiver()
    receiver.delay = 0.0
    await receiver.start()
    port1, port2, rt_port = free_port(), free_port(), free_port()
    env = stack.env(
        dbname,
        FLUXBASE_REALTIME_PORT=str(rt_port),
        FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        FLUXBASE_REALTIME_REVALIDATE_SECONDS="30",  # so a reconnect within 1 s is the doorbell's
    )
    try:
        with run_service(["api"], dict(env, FLUXBASE_API_PORT=str(port1)), port1, log_dir) as one:
            api1 = Api(one.url)
            admin = await api1.register(email="repointer@example.com")
            token = await api1.login(admin["email"], admin["password"])
            r = await api1.http.post(
                "/api/admin/clusters",
                json={"label": "two", "connectionString": _url(pg2, "repoint_two")},
                headers=bearer(token),
            )
            assert r.status_code == 201, r.text
            cid = r.json()["cluster"]["id"]
            worker = spawn_worker(env, log_dir / f"worker-repoint-{port1}.log")
            try:
                with (
                    run_service(["api"], dict(env, FLUXBASE_API_PORT=str(port2)), port2, log_dir) as two,
                    run_service(["realtime"], env, rt_port, log_dir),
                ):
                    api2 = Api(two.url)

                    try:
                        yield {
                            "apis": (api1, api2),
                            "admin": token,
                            "cid": cid,
                            "relay": relay,
                            "receiver": receiver,
                            "two_direct": _url(pg2, "repoint_two"),
                            "two_relayed": _url(pg2, "repoint_two", relay.port),
                            "rt": f"ws://127.0.0.1:{rt_port}/?token=",
                        }
                    finally:
                        await api2.close()
                        await api1.close()
            finally:
                stop_process(worker, signal.SIGTERM, 15)
    finally:
        await receiver.stop()
        await relay.stop()
        await stack.drop_database(dbname)


async def _backends(url: str) -> list[dict[str, Any]]:
    """Fluxbase's sessions on server two's database (ours excluded): application and client port."""
    conn = await asyncpg.connect(url, server_settings={"application_name": "test-observer"})
    try:
        rows = await conn.fetch(
            """SELECT application_name AS app, client_port AS port FROM pg_stat_activity
               WHERE datname = current_database() AND backend_type = 'client backend'
                 AND application_name NOT IN ('test-observer') AND pid <> pg_backend_pid()"""
        )
        return [dict(r) for r in rows]
    finally:
        await conn.close()


async def test_a_new_connection_string_is_used_by_every_process_within_a_second(
    inst: dict[str, Any],
) -> None:
    api1, api2 = inst["apis"]
    relay: Relay = inst["relay"]
    receiver: Receiver = inst["receiver"]
    r = await api1.http.post(
        "/api/projects", json={"name": "repointed", "clusterId": inst["cid"]}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api1.new_key(inst["admin"], pid, "admin", rateLimitRequests=1_000_000)
    r = await api1.sql(key, pid, "CREATE TABLE items (n int PRIMARY KEY, phase int NOT NULL DEFAULT 3)")
    assert r.json()["success"], r.text
    r = await api1.http.post(
        "/api/webhooks",
        json={"projectId": pid, "url": receiver.url, "events": ["row.inserted"]},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    got_ws: list[int] = []
    async with connect(inst["rt"] + key) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"

        async def listen() -> None:
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "db_event" and msg["payload"]["table"] == "items":
                    got_ws.append(msg["payload"]["record"]["n"])

        listener = asyncio.create_task(listen())
        try:
            # Every process is connected to the direct address: tenant pools on both APIs,
            # realtime's reader, the worker's dispatcher.
            for n, api in enumerate((api1, api2)):
                r = await api.sql(key, pid, "INSERT INTO items (n) VALUES ($1)", [n])
                assert r.json()["success"], r.text
            for _ in range(100):
                if {0, 1} <= set(got_ws) and {0, 1} <= {n for _, ph, n, _ in receiver.got if ph == 3}:
                    break
                await asyncio.sleep(0.1)
            before = await _backends(inst["two_direct"])
            apps = {b["app"] for b in before}
            assert {f"fluxbase-tenant-{pid}", "fluxbase-realtime", "fluxbase-webhooks"} <= apps, apps
            assert not relay.upstream

            # The same server at another address, through the first API.
            r = await api1.http.patch(
                f"/api/admin/clusters/{inst['cid']}",
                json={"connectionString": inst["two_relayed"]},
                headers=bearer(inst["admin"]),
            )
            assert r.status_code == 200, r.text
            assert r.json()["cluster"]["connection"]["port"] == relay.port
            assert_clean(r, inst["two_relayed"].split(":")[2].split("@")[0])  # the password: never
            changed = time.monotonic()

            # Within about a second every old connection is gone and the readers run through the
            # new address (tenant pools reconnect on their next request).
            stale: list[dict[str, Any]] = before
            while time.monotonic() - changed < 3:
                now = await _backends(inst["two_direct"])
                stale = [b for b in now if b["port"] not in relay.upstream]
                via_relay = {b["app"] for b in now if b["port"] in relay.upstream}
                if not stale and {"fluxbase-realtime", "fluxbase-webhooks"} <= via_relay:
                    break
                await asyncio.sleep(0.1)
            took = time.monotonic() - changed
            assert not stale, stale
            assert took < 2.5, took  # measured: 0.99 s at load average 5 on 2 cores
            print(f"repoint: every process on the new address after {took:.2f} s")
            # Both APIs answer through the new address (the server sees the relay's ports).
            for n, api in enumerate((api1, api2), start=10):
                r = await api.sql(
                    key, pid, "INSERT INTO items (n) VALUES ($1) RETURNING inet_client_port() AS p", [n]
                )
                assert r.json()["success"], r.text
                assert r.json()["result"]["rows"][0]["p"] in relay.upstream, r.text
            # ...and the events written since reach the subscriber and the endpoint once more.
            for _ in range(100):
                hooks = {n for _, ph, n, _ in receiver.got if ph == 3}
                if {10, 11} <= set(got_ws) and {10, 11} <= hooks:
                    break
                await asyncio.sleep(0.1)
            assert {10, 11} <= set(got_ws), got_ws
            assert {10, 11} <= {n for _, ph, n, _ in receiver.got if ph == 3}
            assert sorted(got_ws) == [0, 1, 10, 11]  # the reader went on from where it stood
            stale = [b for b in await _backends(inst["two_direct"]) if b["port"] not in relay.upstream]
            assert not stale, stale
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
