"""Webhooks: deliveries per second to a local receiver, and commit-to-delivery latency.

One invocation starts an embedded PostgreSQL and S3, a Fluxbase API and --workers
`fluxbase worker` processes, and a local aiohttp receiver in this process, then measures:
  1. baseline: signed-size POSTs sent straight to the receiver, one at a time (the ceiling for
     one endpoint, whose deliveries are sent in order) and from 8 concurrent senders,
  2. throughput: one transaction inserts --burst rows; deliveries/s to 1 endpoint and to 8,
  3. latency: single-row commits at --rate/s for --seconds; p50/p99 from the commit returning
     to the request arriving at the receiver.
Writers use asyncpg directly as the project's admin role.

    .venv/bin/python bench/webhooks.py [--burst 5000] [--rate 50] [--seconds 10] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg
import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.devstack.procs import free_port  # noqa: E402
from fluxbase.security.roles import role_name, role_password  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: dict[str, list[tuple[float, bytes]]] = {}
        self.waiters: list[tuple[str, int, asyncio.Future[None]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        got = self.arrivals.setdefault(request.path, [])
        got.append((time.perf_counter(), body))
        for path, n, fut in self.waiters:
            if path == request.path and len(got) >= n and not fut.done():
                fut.set_result(None)
        return web.Response(text="OK")

    async def until(self, path: str, n: int) -> None:
        if len(self.arrivals.get(path, [])) >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append((path, n, fut))
        await asyncio.wait_for(fut, 300)

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner


async def baseline(url: str, n: int, body: bytes, parallel: int) -> float:
    async with aiohttp.ClientSession() as s:

        async def one(k: int) -> None:
            for _ in range(k):
                async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(n // parallel) for _ in range(parallel)))
        return (n // parallel * parallel) / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q))] * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-fsync", action="store_true", help="run PostgreSQL with fsync off (test settings)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-wh-bench-"))
    stack = start_stack(tmp, durable=not args.no_fsync)
    workers: list[asyncio.subprocess.Process] = []
    recv = Receiver()
    runner = await recv.start()
    try:
        dbname = await stack.create_database()
        api_port = free_port()
        env = stack.env(
            dbname,
            FLUXBASE_API_PORT=str(api_port),
            FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
            FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        )
        with run_service(["api"], env, api_port, tmp):
            for i in range(args.workers):
                log = (tmp / f"worker-{i}.log").open("wb")
                workers.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "fluxbase", "worker", env=env, stdout=log, stderr=log
                    )
                )
            api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
            api.post("/api/auth/register", json={"email": "b@example.com", "password": "bench password"})
            tok = api.post(
                "/api/auth/login", json={"email": "b@example.com", "password": "bench password"}
            ).json()
            h = {"Authorization": f"Bearer {tok['token']}"}
            pid = api.post("/api/projects", json={"name": "wh"}, headers=h).json()["project"]["id"]
            key = api.post(
                f"/api/projects/{pid}/api-keys", json={"name": "k", "scope": "admin"}, headers=h
            ).json()["key"]
            kh = {"Authorization": f"Bearer {key}"}
            role = role_name(pid, "admin")
            assert stack.pg is not None
            dsn = f"postgresql://{role}:{role_password(stack.secret_key, role)}@127.0.0.1:{stack.pg.port}/{dbname}"
            writer = await asyncpg.connect(dsn)
            await writer.execute("CREATE TABLE bench (id bigserial PRIMARY KEY, v text, amount numeric)")
            base = f"http://127.0.0.1:{recv.port}"

            def hook(path: str, tables: list[str]) -> str:
                r = api.post(
                    "/api/webhooks",
                    json={"projectId": pid, "url": base + path, "events": ["row.inserted"], "tables": tables},
                    headers=kh,
                )
                assert r.status_code == 201, r.text
                return str(r.json()["webhook"]["id"])

            cores = Path("/proc/cpuinfo").read_text().count("processor")
            print(
                f"\nWebhooks on {cores} cores, {args.workers} worker process(es), "
                f"PostgreSQL fsync {'off' if args.no_fsync else 'on'}"
            )
            sample = json.dumps(
                {
                    "event_type": "row.inserted",
                    "project_id": pid,
                    "table_id": "bench",
                    "timestamp": "2026-01-01T00:00:00.000Z",
                    "data": {"new": {"id": 1, "v": "x" * 16, "amount": 1.5}, "old": None},
                }
            ).encode()
            b1 = await baseline(base + "/baseline", 3000, sample, 1)
            b8 = await baseline(base + "/baseline8", 3000, sample, 8)
            print(f"baseline     direct POSTs to the receiver: 1 sender {b1:,.0f}/s, 8 senders {b8:,.0f}/s")

            # Throughput to one endpoint, then to eight (a table each, so each sees one burst).
            hook("/one", ["bench"])
            t0 = time.perf_counter()
            await writer.execute(
                "INSERT INTO bench (v, amount) SELECT 'b' || g, g / 3.0 FROM generate_series(1, $1) g",
                args.burst,
            )
            await recv.until("/one", args.burst)
            one = args.burst / (time.perf_counter() - t0)
            print(
                f"throughput   1 endpoint, {args.burst} events: {one:,.0f} deliveries/s ({one / b1:.0%} of 1 sender)"
            )
            await writer.execute("CREATE TABLE bench8 (id bigserial PRIMARY KEY, v text)")
            for i in range(8):
                hook(f"/eight{i}", ["bench8"])
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            await writer.execute(
                "INSERT INTO bench8 (v) SELECT 'b' || g FROM generate_series(1, $1) g", args.burst
            )
            for i in range(8):
                await recv.until(f"/eight{i}", args.burst)
            eight = 8 * args.burst / (time.perf_counter() - t0)
            print(
                f"throughput   8 endpoints x {args.burst} events: {eight:,.0f} deliveries/s "
                f"({eight / b8:.0%} of 8 senders)"
            )

            # Latency at a steady commit rate.
            await writer.execute("CREATE TABLE lat (id bigserial PRIMARY KEY, v text)")
            hook("/lat", ["lat"])
            await asyncio.sleep(0.5)
            sent: dict[str, float] = {}
            total = int(args.rate * args.seconds)
            start = time.perf_counter()
            for i in range(total):
                await asyncio.sleep(max(0.0, start + i / args.rate - time.perf_counter()))
                v = f"m{i}"
                await writer.execute("INSERT INTO lat (v) VALUES ($1)", v)
                sent[v] = time.perf_counter()
            await recv.until("/lat", total)
            lat = [t - sent[json.loads(body)["data"]["new"]["v"]] for t, body in recv.arrivals["/lat"]]
            print(
                f"latency      {args.rate:.0f} commits/s for {args.seconds:.0f}s: p50 {pct(lat, 0.5):.2f} ms  "
                f"p99 {pct(lat, 0.99):.2f} ms  ({len(lat)} deliveries)"
            )
            await writer.close()
            api.close()
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.send_signal(signal.SIGTERM)
            await w.wait()
        await runner.cleanup()
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
