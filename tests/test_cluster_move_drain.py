"""No event lost on a move between clusters (issue 19, docs/clusters.md "Moving a project"):
every row committed on the source before the switch reaches the webhook endpoint and the realtime
subscriber, even when the source's readers are behind when the copy is done; past the bound the
move fails with PROJECT_MOVE_FAILED and nothing is half-applied. Real API, realtime and worker
processes, two embedded PostgreSQL servers.

The readers are held behind the way production holds them: a platform session's open transaction
on the source (its xid holds every project's later events back from every reader)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
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
from support import ROOT, Api, Stack, assert_error, bearer, run_service
from test_clusters import own_tmp, pg2  # noqa: F401  (module fixtures: a second PostgreSQL server)

DRAIN_S = 6


def _url(pg: EmbeddedPostgres, db: str) -> str:
    return f"postgresql://postgres:{quote(pg.password, safe='')}@127.0.0.1:{pg.port}/{db}"


def spawn_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fluxbase", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )


@pytest.fixture(scope="module")
async def inst(stack: Stack, log_dir: Path, pg2: EmbeddedPostgres) -> AsyncIterator[dict[str, Any]]:  # noqa: F811
    """API, realtime and worker on an instance of their own, cluster two registered (open)."""
    dbname = await stack.create_database()
    owner = await asyncpg.connect(pg2.url)
    try:
        await owner.execute("CREATE DATABASE drain_two")
    finally:
        await owner.close()
    receiver = Receiver()
    receiver.delay = 0.0
    await receiver.start()
    port, rt_port = free_port(), free_port()
    env = stack.env(
        dbname,
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_REALTIME_PORT=str(rt_port),
        FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        FLUXBASE_MOVE_DRAIN_TIMEOUT_SECONDS=str(DRAIN_S),
        FLUXBASE_LOG_LEVEL="info",
    )
    try:
        with run_service(["api"], env, port, log_dir) as server:
            api = Api(server.url)
            admin = await api.register(email="drainer@example.com")
            token = await api.login(admin["email"], admin["password"])
            r = await api.http.post(
                "/api/admin/clusters",
                json={"label": "two", "connectionString": _url(pg2, "drain_two")},
                headers=bearer(token),
            )
            assert r.status_code == 201, r.text
            cid = r.json()["cluster"]["id"]
            worker = spawn_worker(env, log_dir / f"worker-drain-{port}.log")
            try:
                with run_service(["realtime"], env, rt_port, log_dir):
                    try:
                        yield {
                            "api": api,
                            "admin": token,
                            "cid": cid,
                            "receiver": receiver,
                            "control_url": stack.database_url(dbname),
                            "two_url": _url(pg2, "drain_two"),
                            "rt": f"ws://127.0.0.1:{rt_port}/?token=",
                        }
                    finally:
                        await api.close()
            finally:
                stop_process(worker, signal.SIGTERM, 15)
    finally:
        await receiver.stop()
        await stack.drop_database(dbname)


async def _project(inst: dict[str, Any], phase: int) -> tuple[str, str]:
    """A project on cluster two with a table `items` and a webhook endpoint on its inserts."""
    api: Api = inst["api"]
    r = await api.http.post(
        "/api/projects",
        json={"name": f"drain {phase}", "clusterId": inst["cid"]},
        headers=bearer(inst["admin"]),
    )
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], pid, "admin", rateLimitRequests=1_000_000)
    r = await api.sql(key, pid, f"CREATE TABLE items (n int PRIMARY KEY, phase int NOT NULL DEFAULT {phase})")
    assert r.json()["success"], r.text
    r = await api.http.post(
        "/api/webhooks",
        # A table filter: checked in the catalog of the project's cluster (seen failing before:
        # VALIDATION_ERROR "No table 'items' in this project", looked up in the control plane's).
        json={"projectId": pid, "url": inst["receiver"].url, "events": ["row.inserted"], "tables": ["items"]},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    return pid, key


async def _where(url: str, pid: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT cluster_id, moving_to, read_only FROM fluxbase.projects WHERE id = $1", pid
        )
        return dict(row) if row else {}
    finally:
        await conn.close()


async def _write_until_refused(api: Api, key: str, pid: str, started: asyncio.Event) -> list[int]:
    """Insert rows one by one until the move refuses writes; the ones that succeeded."""
    written: list[int] = []
    for n in range(100_000):
        r = await api.sql(key, pid, "INSERT INTO items (n) VALUES ($1)", [n])
        if r.status_code == 409:
            assert_error(r, 409, "PROJECT_MOVING")
            return written
        assert r.status_code == 200 and r.json()["success"], r.text
        written.append(n)
        if n == 20:
            started.set()
    raise AssertionError("the move never refused a write")


async def test_every_row_written_before_the_move_reaches_the_endpoint_and_the_subscriber(
    inst: dict[str, Any],
) -> None:
    """Seen failing without the drain step (services.moves._drain): the move switched while the
    readers were held back; afterwards cluster two's dispatcher no longer listed the project and
    its realtime reader dropped the project's events (the endpoint got none of the rows written
    after the hold began, the subscriber none either)."""
    api: Api = inst["api"]
    receiver: Receiver = inst["receiver"]
    pid, key = await _project(inst, phase=1)
    got_ws: list[int] = []
    resync_after = -1
    async with connect(inst["rt"] + key) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"

        async def listen() -> None:
            nonlocal resync_after
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "db_event" and msg["payload"]["table"] == "items":
                    got_ws.append(msg["payload"]["record"]["n"])
                elif msg["type"] == "resync_required":
                    resync_after = len(got_ws)

        listener = asyncio.create_task(listen())
        holder = await asyncpg.connect(inst["two_url"])
        try:
            # A platform transaction with an xid on the source: every reader there stops at it.
            hold = holder.transaction()
            await hold.start()
            await holder.fetchval("SELECT pg_current_xact_id()")
            started = asyncio.Event()
            writer = asyncio.create_task(_write_until_refused(api, key, pid, started))
            await asyncio.wait_for(started.wait(), 30)
            move = asyncio.create_task(
                api.http.post(
                    f"/api/admin/projects/{pid}/move",
                    json={"clusterId": "default"},
                    headers=bearer(inst["admin"]),
                    timeout=60,
                )
            )
            written = await asyncio.wait_for(writer, 30)  # write load until the mark refuses
            assert len(written) > 20
            await asyncio.sleep(2.0)
            # The copy is done by now, but the readers have not passed the project's last event:
            # the move waits for them instead of switching.
            assert not move.done(), (await move).text
            assert (await _where(inst["control_url"], pid))["cluster_id"] == inst["cid"]
            await hold.rollback()
            r = await move
            assert r.status_code == 200, r.text
            assert r.json()["clusterId"] == "default"
            deadline = time.monotonic() + 20
            want = set(written)
            while time.monotonic() < deadline:
                hooks = {n for _, phase, n, _ in receiver.got if phase == 1}
                if hooks >= want and set(got_ws) >= want and resync_after >= 0:
                    break
                await asyncio.sleep(0.1)
            hooks = {n for _, phase, n, _ in receiver.got if phase == 1}
            assert hooks >= want, sorted(want - hooks)[:20]
            assert set(got_ws) >= want, sorted(want - set(got_ws))[:20]
            # ...and the subscriber had them all before it was told to resync.
            assert resync_after >= len(want), (resync_after, len(want))
            # The project lives and takes writes on the default cluster, events flowing from there.
            r = await api.sql(key, pid, "INSERT INTO items (n) VALUES (-1) RETURNING inet_server_port() AS p")
            assert r.json()["success"], r.text
            for _ in range(100):
                if -1 in {n for _, phase, n, _ in receiver.got if phase == 1} and -1 in got_ws:
                    break
                await asyncio.sleep(0.1)
            assert -1 in {n for _, phase, n, _ in receiver.got if phase == 1}
            assert -1 in got_ws
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await holder.close()


async def test_a_move_whose_readers_stay_behind_fails_and_changes_nothing(inst: dict[str, Any]) -> None:
    api: Api = inst["api"]
    receiver: Receiver = inst["receiver"]
    pid, key = await _project(inst, phase=2)
    for n in range(5):
        r = await api.sql(key, pid, "INSERT INTO items (n) VALUES ($1)", [n])
        assert r.json()["success"], r.text
    holder = await asyncpg.connect(inst["two_url"])
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.fetchval("SELECT pg_current_xact_id()")
        r = await api.sql(key, pid, "INSERT INTO items (n) VALUES (5)")
        assert r.json()["success"], r.text
        started = time.monotonic()
        r = await api.http.post(
            f"/api/admin/projects/{pid}/move",
            json={"clusterId": "default"},
            headers=bearer(inst["admin"]),
            timeout=60,
        )
        body = assert_error(r, 502, "PROJECT_MOVE_FAILED")
        assert time.monotonic() - started >= DRAIN_S - 0.5
        assert "webhook dispatcher" in body["error"]["message"], body
        # Nothing half-applied: still on cluster two, writable, no copy left on the default one.
        assert await _where(inst["control_url"], pid) == {
            "cluster_id": inst["cid"],
            "moving_to": None,
            "read_only": False,
        }
        control = await asyncpg.connect(inst["control_url"])
        try:
            assert await control.fetchval("SELECT to_regnamespace($1)", f"p_{pid}") is None
        finally:
            await control.close()
        await hold.rollback()
        r = await api.sql(key, pid, "INSERT INTO items (n) VALUES (6) RETURNING inet_server_port() AS p")
        assert r.json()["success"], r.text
        # ...and its events still flow from the source.
        for _ in range(150):
            if {n for _, phase, n, _ in receiver.got if phase == 2} >= set(range(7)):
                break
            await asyncio.sleep(0.1)
        assert {n for _, phase, n, _ in receiver.got if phase == 2} >= set(range(7))
    finally:
        await holder.close()


async def test_per_table_realtime_switches_hold_on_a_registered_cluster_and_move_along(
    inst: dict[str, Any],
) -> None:
    """The switches live beside the project's data, on its cluster (fluxbase.realtime_tables
    there, read by its capture functions). Seen failing before: on cluster two the switch
    answered 400 VALIDATION_ERROR "unknown table(s): quiet" (the tables were looked for in the
    control plane's catalog), so every table stayed captured."""
    api: Api = inst["api"]
    r = await api.http.post(
        "/api/projects", json={"name": "switches", "clusterId": inst["cid"]}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], pid, "admin")
    for t in ("loud", "quiet"):
        r = await api.sql(key, pid, f"CREATE TABLE {t} (n int PRIMARY KEY)")
        assert r.json()["success"], r.text
    r = await api.http.post(
        "/api/realtime/disable", json={"projectId": pid, "tables": ["quiet"]}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    assert {t["name"]: t["enabled"] for t in r.json()["tables"]} == {"loud": True, "quiet": False}

    async with connect(inst["rt"] + key) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"

        async def rows_until_loud(n: int) -> list[tuple[str, int]]:
            """Insert into quiet, then loud; the row events received up to loud's (the project's
            events arrive in commit order: quiet's would come first)."""
            for t in ("quiet", "loud"):
                r = await api.sql(key, pid, f"INSERT INTO {t} (n) VALUES ($1)", [n])
                assert r.json()["success"], r.text
            seen: list[tuple[str, int]] = []
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 15))
                if msg["type"] == "db_event":
                    seen.append((msg["payload"]["table"], msg["payload"]["record"]["n"]))
                    if seen[-1] == ("loud", n):
                        return seen

        assert await rows_until_loud(1) == [("loud", 1)]
        # A table made again under the same name stays off (the event trigger asks the cluster).
        r = await api.sql(key, pid, "DROP TABLE quiet")
        assert r.json()["success"], r.text
        r = await api.sql(key, pid, "CREATE TABLE quiet (n int PRIMARY KEY)")
        assert r.json()["success"], r.text
        assert [x for x in await rows_until_loud(2) if x[0] != "schema"] == [("loud", 2)]

        # The switches move with the project (to the default cluster here).
        r = await api.http.post(
            f"/api/admin/projects/{pid}/move",
            json={"clusterId": "default"},
            headers=bearer(inst["admin"]),
            timeout=60,
        )
        assert r.status_code == 200, r.text
        while json.loads(await asyncio.wait_for(ws.recv(), 15))["type"] != "resync_required":
            pass
        r = await api.http.get(f"/api/realtime/tables?projectId={pid}", headers=bearer(key))
        assert {t["name"]: t["enabled"] for t in r.json()["tables"]} == {"loud": True, "quiet": False}
        assert await rows_until_loud(3) == [("loud", 3)]
        r = await api.http.post(
            "/api/realtime/enable", json={"projectId": pid, "tables": ["quiet"]}, headers=bearer(key)
        )
        assert r.status_code == 200, r.text
        assert await rows_until_loud(4) == [("quiet", 4), ("loud", 4)]
    # Nothing of the project's switches is left on cluster two.
    two = await asyncpg.connect(inst["two_url"])
    try:
        assert (
            await two.fetchval("SELECT count(*) FROM fluxbase.realtime_tables WHERE project_id = $1", pid)
            == 0
        )
    finally:
        await two.close()
