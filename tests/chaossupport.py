"""Fault injection shared by tests/test_chaos.py and bench/chaos.py (issue 18, "faults survived").

A `Rig` runs one Fluxbase instance as separate real processes (API, realtime, webhook worker) on
its own PostgreSQL, with writers inserting numbered rows through /api/execute-sql, realtime
subscribers that resume by cursor (`since` = the last event cursor received) after every
reconnect, and a real aiohttp webhook endpoint. `Rig.phase(target)` runs a few seconds of write
load, kills `target` with SIGKILL mid-load (PostgreSQL: an immediate stop), restarts it, waits for
the consumers to catch up and returns an `Outcome`: what was committed (decided from the table
when a writer's request failed), what each consumer got, lost, got twice, and got without a
commit, the API statuses seen and the seconds to recover.

`Rig.storage_phase()` does the same to the S3 server (`weed mini`, SIGKILL) under upload load:
uploads streamed through the API and presigned POSTs straight to S3 (then confirmed). Then it
runs the worker's housekeeping as if its grace periods had passed, and compares rows and
objects: a file row without its object (or with other bytes) is lost, an object no row accounts
for is reported in the `duplicated` column.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from fluxbase.devstack.procs import free_port, stop_process
from support import ROOT, Api, Stack, bearer, wait_http_ok

TARGETS = ("realtime", "worker", "api", "postgres", "s3")  # "none": the same phase without a fault
SCHEDULE = "0.2,0.3,0.5,0.5,1,1,2,2,2,2"  # webhook retries: quick, and long enough for an outage


@dataclass
class Outcome:
    killed: str
    written: int  # rows committed in the phase (from the table)
    confirmed: int  # inserts whose request answered success
    delivered: dict[str, int]  # consumer -> distinct committed rows it got
    lost: dict[str, list[int]]  # consumer -> committed rows it never got
    duplicated: dict[str, int]  # consumer -> deliveries beyond the first of a row
    phantom: dict[str, list[int]]  # consumer -> rows it got that were never committed
    foreign_ids: list[int]  # rows delivered to the endpoint under two different webhook-ids
    vanished: list[int]  # inserts answered success but absent from the table
    statuses: Counter[str] = field(default_factory=Counter)  # API answers of failed writes
    recover_s: float | None = None  # restart issued -> every consumer got a row written after it
    api_recover_s: float | None = None  # restart issued -> first successful write
    ready_s: float = 0.0  # restart issued -> the process is ready (its own start-up time)

    @property
    def total_lost(self) -> int:
        return sum(len(v) for v in self.lost.values())

    @property
    def total_duplicated(self) -> int:
        return sum(self.duplicated.values())

    def row(self) -> list[str]:
        delivered = min(self.delivered.values()) if self.delivered else 0
        rec = "-" if self.recover_s is None else f"{self.recover_s:.2f}"
        return [
            self.killed,
            str(self.written),
            str(delivered),
            str(self.total_lost),
            str(self.total_duplicated),
            rec,
            f"{self.ready_s:.2f}",
        ]


HEADER = ["killed", "written", "delivered", "lost", "duplicated", "recover_s", "start_s"]


def table(outcomes: list[Outcome]) -> str:
    rows = [HEADER, *(o.row() for o in outcomes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


class Receiver:
    """A real webhook endpoint: records (time, phase, n, webhook-id) of every 2xx delivery."""

    def __init__(self) -> None:
        self.port = free_port()
        self.delay = 0.1
        self.in_flight = 0
        self.got: list[tuple[float, int, int, str]] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        new = event["data"]["new"]
        self.got.append((time.monotonic(), new["phase"], new["n"], request.headers["webhook-id"]))
        self.in_flight += 1
        try:
            await asyncio.sleep(self.delay)  # so that a worker can be killed mid-request
        finally:
            self.in_flight -= 1
        return web.Response(text="OK")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Subscriber:
    """A realtime client that reconnects forever and resumes from its last cursor."""

    def __init__(self, name: str, url: str, room: str):
        self.name, self.url, self.room = name, url, room
        self.got: list[tuple[float, int, int]] = []  # (time, phase, n)
        self.cursor: str | None = None
        self.reconnects = 0
        self.errors: list[str] = []

    async def run(self) -> None:
        while True:
            try:
                async with connect(self.url, open_timeout=3) as ws:
                    msg: dict[str, Any] = {"type": "subscribe", "roomId": self.room}
                    if self.cursor:
                        msg["since"] = self.cursor
                    await ws.send(json.dumps(msg))
                    async for raw in ws:
                        m = json.loads(raw)
                        if m["type"] == "db_event":
                            rec = m["payload"].get("record") or {}
                            if "n" in rec:
                                self.got.append((time.monotonic(), rec["phase"], rec["n"]))
                            self.cursor = m["cursor"]
                        elif m["type"] == "error":
                            self.errors.append(str(m)[:200])
                            break
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, ValueError) as exc:
                self.errors.append(repr(exc)[:200])
            self.reconnects += 1
            await asyncio.sleep(0.2)


def _popen(name: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fluxbase", name],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )


class Rig:
    """One instance as separate processes on `stack`, plus load and consumers."""

    def __init__(
        self, stack: Stack, log_dir: Path, *, writers: int = 3, rate: float = 6.0, subscribers: int = 2
    ):
        self.stack, self.log_dir = stack, log_dir
        self.n_writers, self.rate, self.n_subs = writers, rate, subscribers
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.counter = itertools.count(1)
        self.phases = itertools.count(1)
        self.receiver = Receiver()
        self.subs: list[Subscriber] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.bucket_made = False
        self.sizes: dict[str, int] = {}  # object key -> size, after the last storage phase
        self.storage_detail: dict[str, Any] = {}

    # -- processes ----------------------------------------------------------------------------

    async def _spawn(self, name: str) -> None:
        log_path = self.log_dir / f"chaos-{name}-{os.getpid()}.log"
        proc = self.procs[name] = await asyncio.to_thread(_popen, name, self.env, log_path)
        port = {"api": self.api_port, "realtime": self.rt_port}.get(name)
        if port is not None:
            await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/ready", proc, log_path)

    async def start(self) -> None:
        self.dbname = await self.stack.create_database()
        self.api_port, self.rt_port = free_port(), free_port()
        self.env = self.stack.env(
            self.dbname,
            FLUXBASE_API_PORT=str(self.api_port),
            FLUXBASE_REALTIME_PORT=str(self.rt_port),
            FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
            FLUXBASE_WEBHOOKS_RETRY_SCHEDULE=SCHEDULE,
            FLUXBASE_WEBHOOKS_TIMEOUT_S="3",
        )
        self.db = await asyncpg.connect(self.stack.database_url(self.dbname))
        await self._spawn("api")
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.api_port}", timeout=15)
        api = Api(f"http://127.0.0.1:{self.api_port}")
        try:
            _, token = await api.new_user()
            self.pid = await api.new_project(token)
            self.key = await api.new_key(token, self.pid, rateLimitRequests=1_000_000)
            r = await api.sql(
                self.key, self.pid, "CREATE TABLE items (n int PRIMARY KEY, phase int NOT NULL)"
            )
            assert r.json()["success"], r.text
            await self.receiver.start()
            r = await api.http.post(
                "/api/webhooks",
                json={
                    "projectId": self.pid,
                    "url": self.receiver.url,
                    "events": ["row.inserted"],
                    "tables": ["items"],
                },
                headers=bearer(self.key),
            )
            assert r.status_code == 201, r.text
        finally:
            await api.close()
        await self._spawn("realtime")
        await self._spawn("worker")
        deadline = time.monotonic() + 30
        while not await self.db.fetchval(
            "SELECT count(*) FROM fluxbase.event_readers WHERE reader_id LIKE 'wh_%'"
        ):
            assert time.monotonic() < deadline, "worker did not start"
            await asyncio.sleep(0.1)
        url = f"ws://127.0.0.1:{self.rt_port}/?token={self.key}"
        self.subs = [Subscriber(f"realtime-{i}", url, f"project_{self.pid}") for i in range(self.n_subs)]
        self._tasks = [asyncio.create_task(s.run()) for s in self.subs]
        # A first row every consumer must get: from then on each subscriber holds a cursor, so a
        # row it misses later is a loss and not a subscription that came too late.
        ready, warm = False, itertools.count(-1, -1)
        while not ready:
            assert time.monotonic() < deadline + 30, "consumers did not start"
            r = await self.http.post(
                "/api/execute-sql",
                json={
                    "projectId": self.pid,
                    "query": "INSERT INTO items (n, phase) VALUES ($1, 0)",
                    "params": [next(warm)],
                },
                headers=bearer(self.key),
            )
            assert r.status_code == 200, r.text
            for _ in range(20):
                await asyncio.sleep(0.1)
                if self.receiver.got and all(s.cursor for s in self.subs):
                    ready = True
                    break

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for proc in self.procs.values():
            await asyncio.to_thread(stop_process, proc, signal.SIGTERM, 15)
        with contextlib.suppress(Exception):
            await self.http.aclose()
        await self.receiver.stop()
        with contextlib.suppress(Exception):
            await self.db.close()
        with contextlib.suppress(Exception):
            await self.stack.drop_database(self.dbname)

    # -- load ---------------------------------------------------------------------------------

    async def _writer(self, phase: int, stop: asyncio.Event, st: dict[str, Any]) -> None:
        period = self.n_writers / self.rate
        while not stop.is_set():
            n = next(self.counter)
            began = time.monotonic()
            try:
                r = await self.http.post(
                    "/api/execute-sql",
                    json={
                        "projectId": self.pid,
                        "query": "INSERT INTO items (n, phase) VALUES ($1, $2)",
                        "params": [n, phase],
                    },
                    headers=bearer(self.key),
                )
                ok = r.status_code == 200 and r.json().get("success") is True
                label = str(r.status_code)
            except httpx.HTTPError as exc:
                ok, label = False, type(exc).__name__
            if ok:
                st["confirmed"][n] = began
            else:
                st["uncertain"][n] = began
                st["statuses"][label] += 1
            await asyncio.sleep(max(0.0, period - (time.monotonic() - began)))

    async def _kill_and_restart(
        self, target: str, down_s: float, met: Callable[[], bool] | None = None
    ) -> tuple[float, float]:
        """SIGKILL `target` (PostgreSQL: immediate stop), keep it down `down_s`, restart it.
        Returns the monotonic times the restart was issued and the process was ready again
        (/ready for the API and realtime, pg_isready for PostgreSQL, spawned for the worker).
        With `met` (S3 only), it stays down past `down_s` until `met()` says the load met the
        outage (at most 30 s more): on a loaded machine the load may not reach it in `down_s`."""
        if target == "none":
            await asyncio.sleep(down_s)
            return time.monotonic(), time.monotonic()
        if target in ("worker", "postgres"):  # mid-request: the worker holds the endpoint's send lease
            deadline = time.monotonic() + 5
            while not self.receiver.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        if target == "s3":
            s3 = self.stack.s3
            assert s3 is not None and s3.pid is not None, "needs the test's own weed mini"
            os.kill(s3.pid, signal.SIGKILL)
            await asyncio.to_thread(s3.stop)  # reaps it
            await asyncio.sleep(down_s)
            deadline = time.monotonic() + 30
            while met is not None and not met() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            restarted = time.monotonic()
            await asyncio.to_thread(s3.start)
            return restarted, time.monotonic()
        if target == "postgres":
            pg = self.stack.pg
            assert pg is not None, "needs the test's own embedded PostgreSQL"
            await asyncio.to_thread(pg.stop, "immediate")
            await asyncio.sleep(down_s)
            restarted = time.monotonic()
            await asyncio.to_thread(pg.start)
            return restarted, time.monotonic()
        proc = self.procs[target]
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        await asyncio.sleep(down_s)
        restarted = time.monotonic()
        await self._spawn(target)
        return restarted, time.monotonic()

    def _consumers(self, phase: int) -> dict[str, list[tuple[float, int]]]:
        out: dict[str, list[tuple[float, int]]] = {
            s.name: [(t, n) for t, p, n in s.got if p == phase] for s in self.subs
        }
        out["webhook"] = [(t, n) for t, p, n, _ in self.receiver.got if p == phase]
        return out

    async def phase(
        self,
        target: str,
        *,
        before_s: float = 2.0,
        down_s: float = 1.5,
        after_s: float = 2.5,
        settle_s: float = 45.0,
    ) -> Outcome:
        phase = next(self.phases)
        stop = asyncio.Event()
        st: dict[str, Any] = {"confirmed": {}, "uncertain": {}, "statuses": Counter()}
        writers = [asyncio.create_task(self._writer(phase, stop, st)) for _ in range(self.n_writers)]
        await asyncio.sleep(before_s)
        restarted, ready = await self._kill_and_restart(target, down_s)
        await asyncio.sleep(after_s)
        stop.set()
        await asyncio.gather(*writers)
        # Every request is over: the table says which of the failed ones committed anyway.
        rows = await self._fetch_rows(phase)
        committed = set(rows)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            got = self._consumers(phase)
            if all(committed <= {n for _, n in v} for v in got.values()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a duplicate or a late phantom would show up by now
        got = self._consumers(phase)
        confirmed: dict[int, float] = st["confirmed"]
        after = {n for n, t in {**confirmed, **st["uncertain"]}.items() if t >= restarted} & committed
        recover: float | None = None
        if after:
            firsts = []
            for v in got.values():
                ts = [t for t, n in v if n in after]
                firsts.append(min(ts) if ts else None)
            if all(t is not None for t in firsts):
                recover = max(t for t in firsts if t is not None) - restarted
        ok_after = [t for n, t in confirmed.items() if t >= restarted]
        ids: dict[int, set[str]] = {}
        for _, p, n, wid in self.receiver.got:
            if p == phase:
                ids.setdefault(n, set()).add(wid)
        return Outcome(
            killed=target,
            written=len(committed),
            confirmed=len(confirmed),
            delivered={k: len({n for _, n in v} & committed) for k, v in got.items()},
            lost={k: sorted(committed - {n for _, n in v}) for k, v in got.items()},
            duplicated={k: len(v) - len({n for _, n in v}) for k, v in got.items()},
            phantom={k: sorted({n for _, n in v} - committed) for k, v in got.items()},
            foreign_ids=sorted(n for n, s in ids.items() if len(s) > 1),
            vanished=sorted(set(confirmed) - committed),
            statuses=st["statuses"],
            recover_s=recover,
            api_recover_s=(min(ok_after) - restarted) if ok_after else None,
            ready_s=ready - restarted,
        )

    # -- storage --------------------------------------------------------------------------------

    async def _api_uploader(self, phase: int, stop: asyncio.Event, st: dict[str, Any]) -> None:
        """Uploads streamed through the API (POST /api/storage/upload), one after another."""
        while not stop.is_set():
            name = f"p{phase}/api-{next(self.counter)}.bin"
            data = name.encode() * 2000
            began = time.monotonic()
            try:
                r = await self.http.post(
                    "/api/storage/upload",
                    data={"projectId": self.pid, "bucketId": "chaos", "name": name},
                    files={"file": (name, data, "application/octet-stream")},
                    headers=bearer(self.key),
                )
                ok, label = r.status_code == 201, str(r.status_code)
                if not ok:
                    st["codes"][r.json().get("error", {}).get("code", "?")] += 1
            except httpx.HTTPError as exc:
                ok, label = False, type(exc).__name__
            if ok:
                st["confirmed"][name] = (time.monotonic(), len(data))
                st["ok_started"].append(began)
            else:
                st["statuses"][label] += 1
                await asyncio.sleep(0.1)

    async def _direct_uploader(self, phase: int, stop: asyncio.Event, st: dict[str, Any]) -> None:
        """Presigned POST uploads: a form from the API, the bytes straight to S3 (retried while
        S3 is down, for as long as the load runs), then confirmUpload (retried on 503)."""
        async with httpx.AsyncClient(timeout=10) as plain:
            while not stop.is_set():
                name = f"p{phase}/direct-{next(self.counter)}.bin"
                data = name.encode() * 1000
                try:
                    r = await self.http.post(
                        "/api/storage/upload-url",
                        json={"projectId": self.pid, "bucketId": "chaos", "name": name, "size": len(data)},
                        headers=bearer(self.key),
                    )
                except httpx.HTTPError as exc:
                    st["statuses"][type(exc).__name__] += 1
                    continue
                if r.status_code != 201:
                    st["statuses"][str(r.status_code)] += 1
                    await asyncio.sleep(0.1)
                    continue
                grant = r.json()
                posted = False
                while not posted and not stop.is_set():
                    try:
                        p = await plain.post(
                            grant["url"],
                            data=grant["fields"],
                            files={"file": (name, data, "application/octet-stream")},
                        )
                        posted = p.status_code in (200, 201, 204)
                    except httpx.HTTPError:
                        pass
                    if not posted:
                        await asyncio.sleep(0.2)
                while posted:
                    try:
                        c = await self.http.post(
                            "/api/storage/upload-url/confirm",
                            json={"projectId": self.pid, "fileId": grant["file"]["id"]},
                            headers=bearer(self.key),
                        )
                        if c.status_code == 200:
                            st["confirmed"][name] = (time.monotonic(), len(data))
                            break
                        st["statuses"][str(c.status_code)] += 1
                        st["codes"][c.json().get("error", {}).get("code", "?")] += 1
                    except httpx.HTTPError as exc:
                        st["statuses"][type(exc).__name__] += 1
                    if stop.is_set() and time.monotonic() > st["give_up"]:
                        break  # housekeeping registers what S3 holds
                    await asyncio.sleep(0.2)

    async def _housekeep(self) -> tuple[dict[str, int], list[str], set[str]]:
        """The worker's housekeeping, run as if every lease, form and grace period had run out
        (the load is over: nothing is in flight). Returns its counts, the keys in the bucket and
        the keys of multipart uploads left unfinished."""
        from fluxbase.config import load_settings
        from fluxbase.storage.s3 import ObjectStore
        from fluxbase.worker import housekeeping

        settings = load_settings({**self.env, "FLUXBASE_STORAGE_ORPHAN_GRACE_S": "0"})
        await self.db.execute(
            "UPDATE fluxbase.objects SET lease_until = now() - interval '1 second', "
            "upload_expires_at = CASE WHEN lease_kind = 'presigned' THEN now() - interval '1 second' "
            "ELSE upload_expires_at END WHERE project_id = $1 AND lease_id IS NOT NULL",
            self.pid,
        )
        pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
        store = ObjectStore(settings.s3)
        await store.start()
        try:
            await asyncio.sleep(1.0)  # LastModified has a resolution of a second
            counts = await housekeeping(pool, settings, store)
            counts = {k: v for k, v in counts.items() if k.startswith("storage.")}
            # Leases housekeeping took over while settling are released by its own next round.
            counts2 = await housekeeping(pool, settings, store)
            for k, v in counts2.items():
                if k.startswith("storage."):
                    counts[k] = counts.get(k, 0) + v
            keys: list[str] = []
            pages = store.client.get_paginator("list_objects_v2")
            async for page in pages.paginate(Bucket=store.bucket):
                keys += [o["Key"] for o in page.get("Contents", [])]
            uploads: set[str] = set()
            pages = store.client.get_paginator("list_multipart_uploads")
            async for page in pages.paginate(Bucket=store.bucket):
                uploads |= {u["Key"] for u in page.get("Uploads", [])}
            self.sizes = {}
            for key in keys:
                head = await store.client.head_object(Bucket=store.bucket, Key=key)
                self.sizes[key] = int(head["ContentLength"])
            return counts, keys, uploads
        finally:
            await store.close()
            await pool.close()

    async def storage_phase(
        self, *, before_s: float = 2.0, down_s: float = 1.5, after_s: float = 2.5, uploaders: int = 2
    ) -> Outcome:
        """SIGKILL the S3 server mid-load of uploads, restart it, settle, compare rows and objects."""
        if not self.bucket_made:
            body = {"projectId": self.pid, "name": "chaos"}
            r = await self.http.post("/api/storage/buckets", json=body, headers=bearer(self.key))
            assert r.status_code == 201, r.text
            self.bucket_made = True
        phase = next(self.phases)
        stop = asyncio.Event()
        st: dict[str, Any] = {
            "confirmed": {},
            "ok_started": [],
            "statuses": Counter(),
            "codes": Counter(),
            "give_up": math.inf,
        }
        tasks = [asyncio.create_task(self._api_uploader(phase, stop, st)) for _ in range(uploaders)]
        tasks.append(asyncio.create_task(self._direct_uploader(phase, stop, st)))
        await asyncio.sleep(before_s)
        # Down until an API call has met the outage (a 503): a presigned POST straight to S3 is
        # retried silently and does not count.
        met_before = st["statuses"]["503"]
        restarted, ready = await self._kill_and_restart(
            "s3", down_s, lambda: st["statuses"]["503"] > met_before
        )
        await asyncio.sleep(after_s)
        st["give_up"] = time.monotonic() + 10
        stop.set()
        await asyncio.gather(*tasks)
        counts, keys, unfinished = await self._housekeep()
        rows = {
            r["name"]: (r["s3_key"], r["size"])
            for r in await self.db.fetch(
                "SELECT o.name, o.s3_key, o.size FROM fluxbase.objects o JOIN fluxbase.buckets b "
                "ON b.id = o.bucket_id WHERE o.project_id = $1 AND b.name = 'chaos' AND o.status = 'ready' "
                "AND o.name LIKE $2",
                self.pid,
                f"p{phase}/%",
            )
        }
        pending = await self.db.fetchval(
            "SELECT count(*) FROM fluxbase.objects WHERE project_id = $1 AND status <> 'ready'", self.pid
        )
        confirmed: dict[str, tuple[float, int]] = st["confirmed"]
        stored = {n for n, (key, size) in rows.items() if self.sizes.get(key) == size}
        accounted = {key for key, _ in rows.values()} | {
            r["s3_key"] for r in await self.db.fetch("SELECT s3_key FROM fluxbase.objects")
        }
        mine = [k for k in keys if k.startswith((f"{self.pid}/", f"_presigned/{self.pid}/", "_staging/"))]
        unaccounted = sorted(k for k in mine if k not in accounted) + sorted(unfinished)
        ok_after = [t for t in st["ok_started"] if t >= restarted]
        first_ok = min((t for t, _ in confirmed.values() if t >= restarted), default=None)
        self.storage_detail = {
            "housekeeping": counts,
            "pending rows": pending,
            "codes": dict(st["codes"]),
            "unaccounted": unaccounted[:20],
        }
        return Outcome(
            killed="s3",
            written=len(rows),
            confirmed=len(confirmed),
            delivered={"s3": len(stored)},
            lost={"s3": sorted((set(rows) - stored) | (set(confirmed) - set(rows)))},
            duplicated={"s3": len(unaccounted)},
            phantom={"s3": []},
            foreign_ids=[],
            vanished=sorted(set(confirmed) - set(rows)),
            statuses=st["statuses"],
            recover_s=None if first_ok is None else first_ok - restarted,
            api_recover_s=(min(ok_after) - restarted) if ok_after else None,
            ready_s=ready - restarted,
        )

    async def _fetch_rows(self, phase: int) -> list[int]:
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.db.is_closed():
                    self.db = await asyncpg.connect(self.stack.database_url(self.dbname))
                return [
                    r["n"]
                    for r in await self.db.fetch(f"SELECT n FROM p_{self.pid}.items WHERE phase = $1", phase)
                ]
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if time.monotonic() > deadline:
                    raise
                with contextlib.suppress(Exception):
                    await self.db.close()
                await asyncio.sleep(0.3)

    def logs(self) -> str:
        tails = []
        for name in self.procs:
            p = self.log_dir / f"chaos-{name}-{os.getpid()}.log"
            if p.exists():
                tails.append(f"--- {name}\n{p.read_text(errors='replace')[-1500:]}")
        return "\n".join(tails)
