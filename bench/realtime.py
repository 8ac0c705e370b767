"""Realtime: commit-to-client latency, fan-out, write cost of capture, idle subscriber memory.

One invocation starts an embedded PostgreSQL and S3, a Fluxbase API and realtime service, and
measures on one table:
  1. p50/p99 commit-to-client latency with --subscribers clients while writing --rate commits/s,
  2. fan-out: deliveries/s when one transaction inserts --burst rows to all subscribers,
  3. write throughput of 32 concurrent single-row INSERT transactions, realtime on vs off,
  4. realtime-process RSS per idle subscriber (--idle clients),
  6. PostgreSQL CPU per captured single-row write against no trigger and a 4-byte trigger
     (bench/capture_cost.py; --capture-writes per table and operation, 0 to skip): one writer,
     a WAL flush per write, then 32 writers at once, whose commits share their flushes (the
     issue's own yardstick: pgbench's 32 clients),
  5. with a Node load client (bench/realtime_load.mjs, one process: the `ws` package, which the
     benchmark installs into bench/.node with npm when it is missing, else Node's built-in
     WebSocket, which
     costs the client about three times the server's CPU per message; either is lighter than
     the Python client, which would compete with the server for the same cores):
     p50/p99 commit-to-client latency at --node-subscribers and --rate commits/s, and the RSS of
     the realtime process(es) holding --node-idle idle sockets; once for each count of realtime
     processes on one port in --workers (FLUXBASE_REALTIME_WORKERS; default 1,2), in this one
     invocation, so the machine's load is shared by the figures compared. The realtime CPU per
     delivery and the load client's CPU are printed beside each latency.
Writers use asyncpg directly (as the project's admin role), so only the capture path differs.

    .venv/bin/python bench/realtime.py [--subscribers 100] [--rate 100] [--seconds 10]
    .venv/bin/python bench/realtime.py --only-node --no-fsync --workers 1,2 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import capture_cost  # noqa: E402  (bench/, on sys.path as the script's folder)

from fluxbase.devstack.procs import free_port  # noqa: E402
from fluxbase.security.roles import role_name, role_password  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def family(pid: int) -> list[int]:
    """The realtime process and its workers (FLUXBASE_REALTIME_WORKERS > 1: its children)."""
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    return [pid, *kids]


def family_rss_kb(pid: int) -> int:
    return sum(rss_kb(p) for p in family(pid))


def family_cpu_s(pid: int) -> float:
    return sum(cpu_s(p) for p in family(pid))


def listeners(port: int) -> int:
    """Listening TCP sockets on `port` (one per realtime worker with SO_REUSEPORT)."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            f = line.split()
            n += int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A"
    return n


def raise_fd_limit() -> int:
    """As many open files as the hard limit allows (10 000 idle sockets need more than 1 024);
    the realtime service and the load client started from here inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def open_subscribers(url: str, pid: str, key: str, n: int) -> list:
    socks = []
    for _ in range(n):
        ws = await connect(f"{url}/?token={key}", max_queue=None, ping_interval=None)
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        socks.append(ws)
    return socks


async def latency(socks: list, writer: asyncpg.Connection, rate: float, seconds: float) -> list[float]:
    sent: dict[str, float] = {}
    lat: list[float] = []
    total = int(rate * seconds)

    async def reader(ws) -> None:
        got = 0
        while got < total:
            msg = json.loads(await ws.recv())
            if msg["type"] != "db_event":
                continue
            got += 1
            t = time.perf_counter()
            lat.append(t - sent[msg["payload"]["record"]["v"]])

    tasks = [asyncio.create_task(reader(ws)) for ws in socks]
    start = time.perf_counter()
    for i in range(total):
        target = start + i / rate
        await asyncio.sleep(max(0.0, target - time.perf_counter()))
        v = f"m{i}"
        sent[v] = time.perf_counter()  # set before the commit: a reader may see the event first
        await writer.execute("INSERT INTO bench (v) VALUES ($1)", v)
        sent[v] = time.perf_counter()  # the commit has returned
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return lat


async def fanout(socks: list, writer: asyncpg.Connection, burst: int) -> float:
    async def reader(ws) -> None:
        got = 0
        while got < burst:
            raw = await ws.recv()
            if '"db_event"' in raw:
                got += 1

    tasks = [asyncio.create_task(reader(ws)) for ws in socks]
    t0 = time.perf_counter()
    await writer.execute("INSERT INTO bench (v) SELECT 'f' || g FROM generate_series(1, $1) g", burst)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return len(socks) * burst / (time.perf_counter() - t0)


async def write_rate(dsn: str, seconds: float, clients: int = 32) -> float:
    pool = await asyncpg.create_pool(dsn, min_size=clients, max_size=clients)
    n = 0
    stop_at = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal n
        async with pool.acquire() as conn:
            while time.perf_counter() < stop_at:
                await conn.execute("INSERT INTO bench (v) VALUES ('w')")
                n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    rate = n / (time.perf_counter() - t0)
    await pool.close()
    return rate


NODE_LOAD = ROOT / "bench" / "realtime_load.mjs"


def _ensure_ws() -> None:
    """The `ws` package in bench/.node (lighter per message than Node's built-in WebSocket, so
    the load client is not the ceiling), installed once from npm where npm is; else the load
    client falls back to the built-in one and says so in its result."""
    node_dir = ROOT / "bench" / ".node"
    npm = shutil.which("npm")
    # (ws 8's ES module entry: PostGraphile's npm install in the same folder brings ws 7, without it)
    if (node_dir / "node_modules" / "ws" / "wrapper.mjs").exists() or npm is None:
        return
    node_dir.mkdir(exist_ok=True)
    r = subprocess.run(
        [npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(node_dir), "ws@8"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        print(f"npm install ws failed (the load client uses Node's built-in WebSocket): {r.stderr[-300:]}")


async def _node(*args: str) -> asyncio.subprocess.Process:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node (20+) is needed for the load client")
    _ensure_ws()
    flags = ["--experimental-websocket"] if int(_node_major(node)) < 22 else []
    proc = await asyncio.create_subprocess_exec(
        node, *flags, str(NODE_LOAD), *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 300)
    if line.strip() != b"ready":
        raise SystemExit(f"load client failed to start: {line!r}")
    return proc


def _node_major(node: str) -> str:
    return (
        subprocess.run([node, "--version"], capture_output=True, text=True)
        .stdout.strip()
        .lstrip("v")
        .split(".")[0]
    )


async def node_latency(
    url: str, pid: str, key: str, n: int, writer: asyncpg.Connection, rate: float, seconds: float, rt_pid: int
) -> dict[str, Any]:
    total = int(rate * seconds)
    proc = await _node("latency", url, key, f"project_{pid}", str(n), str(total))
    cpu0 = family_cpu_s(rt_pid)  # from here on: deliveries only, not the 1 000 subscriptions
    start = time.perf_counter()
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        await writer.execute("INSERT INTO bench (v) VALUES ($1)", f"{time.time() * 1000:.3f}")
    assert proc.stdout is not None
    out = await asyncio.wait_for(proc.stdout.readline(), 180)
    result = dict(json.loads(out))
    result["realtimeCpuS"] = family_cpu_s(rt_pid) - cpu0
    result["wallS"] = time.perf_counter() - start
    await proc.wait()
    return result


async def node_idle(url: str, pid: str, key: str, n: int, rt_pid: int) -> tuple[int, int]:
    """RSS of the realtime process and its workers before and while holding `n` idle sockets."""
    await asyncio.sleep(1)
    before = family_rss_kb(rt_pid)
    proc = await _node("idle", url, key, f"project_{pid}", str(n))
    await asyncio.sleep(2)
    after = family_rss_kb(rt_pid)
    assert proc.stdin is not None
    proc.stdin.close()
    await proc.wait()
    return before, after


async def node_round(
    args: argparse.Namespace,
    env: dict[str, str],
    tmp: Path,
    pid: str,
    key: str,
    writer: asyncpg.Connection,
    workers: int,
    loop: str,
) -> None:
    """The Node load client against a realtime service of `workers` processes on one port."""
    port = free_port()
    wenv = dict(env, FLUXBASE_REALTIME_PORT=str(port), FLUXBASE_REALTIME_WORKERS=str(workers))
    with run_service(["realtime", "--loop", loop], wenv, port, tmp) as rt:
        deadline = time.monotonic() + 60
        while listeners(port) < workers and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        url = f"ws://127.0.0.1:{port}"
        what = f"{workers} process{'es' if workers > 1 else ''} ({loop} loop)"
        if args.node_subscribers:
            r = await node_latency(
                url, pid, key, args.node_subscribers, writer, args.rate, args.seconds, rt.proc.pid
            )
            cpu, wall = r["realtimeCpuS"], r["wallS"]
            print(
                f"latency      {what}, {args.node_subscribers} subscribers (Node load client, "
                f"{r.get('client', 'node-builtin')}), "
                f"{args.rate:.0f} commits/s: p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
                f"mean {r['mean']:.2f} ms  max {r['max']:.0f} ms ({r['deliveries']:.0f} deliveries); "
                f"realtime CPU {cpu:.1f} s = {cpu / max(1, r['deliveries']) * 1e6:.2f} us per delivery, "
                f"load client CPU {r.get('cpuS', 0):.1f} s, both from the first commit, in {wall:.0f} s; "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
                flush=True,
            )
        if args.node_idle:
            before, after = await node_idle(url, pid, key, args.node_idle, rt.proc.pid)
            print(
                f"idle memory  {what}, {args.node_idle} sockets (Node load client): realtime RSS "
                f"{before / 1024:.0f} -> {after / 1024:.0f} MB "
                f"({(after - before) / args.node_idle:.1f} KB each); "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--burst", type=int, default=2000)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--node-subscribers", type=int, default=1000)
    ap.add_argument("--node-idle", type=int, default=10000)
    ap.add_argument(
        "--workers",
        default="1,2",
        help="realtime processes for the Node measurements, one run each, e.g. 1,2 (FLUXBASE_REALTIME_WORKERS)",
    )
    ap.add_argument(
        "--loops",
        default="auto",
        help="event loops for the Node measurements: auto, asyncio, uvloop (e.g. asyncio,uvloop)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="repeat the --workers sequence (interleaved)")
    ap.add_argument("--only-node", action="store_true", help="only the Node load client measurements")
    ap.add_argument("--no-fsync", action="store_true", help="run PostgreSQL with fsync off (test settings)")
    ap.add_argument("--capture-writes", type=int, default=5000)
    args = ap.parse_args()

    fds = raise_fd_limit()
    if fds < args.node_idle + 1000:
        print(f"warning: {fds} open files allowed; {args.node_idle} idle sockets may not fit")
    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-rt-bench-"))
    stack = start_stack(tmp, durable=not args.no_fsync)
    try:
        dbname = await stack.create_database()
        api_port, rt_port = free_port(), free_port()
        env = stack.env(
            dbname,
            FLUXBASE_API_PORT=str(api_port),
            FLUXBASE_REALTIME_PORT=str(rt_port),
            FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
            FLUXBASE_REALTIME_QUEUE_SIZE="5000",
            FLUXBASE_TENANT_CONNECTION_LIMIT="100",
        )
        with contextlib.ExitStack() as services:
            # Migrate first, without the API's start-up deadline (a loaded machine takes minutes).
            migrate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fluxbase", "migrate", env=env, cwd=ROOT
            )
            if await migrate.wait():
                raise SystemExit("fluxbase migrate failed")
            services.enter_context(run_service(["api", "--no-migrate"], env, api_port, tmp))
            api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
            api.post("/api/auth/register", json={"email": "b@example.com", "password": "bench password"})
            tok = api.post(
                "/api/auth/login", json={"email": "b@example.com", "password": "bench password"}
            ).json()
            h = {"Authorization": f"Bearer {tok['token']}"}
            pid = api.post("/api/projects", json={"name": "rt"}, headers=h).json()["project"]["id"]
            key = api.post(
                f"/api/projects/{pid}/api-keys", json={"name": "k", "scope": "admin"}, headers=h
            ).json()["key"]
            kh = {"Authorization": f"Bearer {key}"}
            api.post(
                "/api/execute-sql",
                json={"projectId": pid, "query": "CREATE TABLE bench (id bigserial PRIMARY KEY, v text)"},
                headers=kh,
            )
            role = role_name(pid, "admin")
            assert stack.pg is not None
            dsn = f"postgresql://{role}:{role_password(stack.secret_key, role)}@127.0.0.1:{stack.pg.port}/{dbname}"
            writer = await asyncpg.connect(dsn)
            url = f"ws://127.0.0.1:{rt_port}"
            cores = Path("/proc/cpuinfo").read_text().count("processor")
            print(f"\nRealtime on {cores} cores, PostgreSQL fsync {'off' if args.no_fsync else 'on'}")

            configs = [(int(w), lp) for w in args.workers.split(",") for lp in args.loops.split(",")]
            for workers, loop in configs * args.rounds:
                await node_round(args, env, tmp, pid, key, writer, workers, loop)
            if args.only_node:
                return
            # The Python client's measurements, against one realtime process of their own.
            rt = services.enter_context(run_service(["realtime"], env, rt_port, tmp))

            socks = await open_subscribers(url, pid, key, args.subscribers)
            lat = sorted(await latency(socks, writer, args.rate, args.seconds))
            p50 = lat[len(lat) // 2] * 1000
            p99 = lat[int(len(lat) * 0.99)] * 1000
            print(
                f"latency      {args.subscribers} subscribers, {args.rate:.0f} commits/s: "
                f"p50 {p50:.2f} ms  p99 {p99:.2f} ms  mean {statistics.mean(lat) * 1000:.2f} ms "
                f"({len(lat)} deliveries)"
            )
            rate = await fanout(socks, writer, args.burst)
            print(
                f"fan-out      {args.subscribers} subscribers x {args.burst} events: {rate:,.0f} deliveries/s"
            )
            for ws in socks:
                await ws.close()

            on = await write_rate(dsn, args.seconds / 2)
            api.post("/api/realtime/disable", json={"projectId": pid, "tables": ["bench"]}, headers=kh)
            off = await write_rate(dsn, args.seconds / 2)
            api.post("/api/realtime/enable", json={"projectId": pid, "tables": ["bench"]}, headers=kh)
            print(
                f"writes       32 clients: realtime on {on:,.0f}/s, off {off:,.0f}/s, on/off = {on / off:.1%}"
            )

            await asyncio.sleep(1)
            before = rss_kb(rt.proc.pid)
            idle = await open_subscribers(url, pid, key, args.idle)
            await asyncio.sleep(1)
            after = rss_kb(rt.proc.pid)
            print(
                f"idle memory  {args.idle} subscribers: {(after - before) / args.idle:.1f} KB each "
                f"(realtime RSS {before / 1024:.0f} -> {after / 1024:.0f} MB)"
            )
            for ws in idle:
                await ws.close()
            if args.capture_writes:
                tables = await capture_cost.setup(writer, None)
                await capture_cost.measure(writer, tables, max(100, args.capture_writes // 10), 1)
                us = await capture_cost.measure(writer, tables, args.capture_writes, 3)
                installed = await capture_cost.installed_capture(writer)
                print("\n".join(capture_cost.report(us, tables, 1, installed)))
                # The issue's own yardstick: 32 writers at once, whose commits share WAL flushes.
                lines = await capture_cost.concurrent_run(
                    dsn, stack.database_url(dbname), tables, 32, args.capture_writes, 3, stack.pg.pid
                )
                print("\n".join(lines))
            await writer.close()
            api.close()
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
