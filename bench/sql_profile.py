"""Where the time of one `POST /api/execute-sql` goes: microseconds per step (docs/sql.md).

Starts an embedded PostgreSQL and S3 and a Fluxbase API (to create a project with one row and an
admin key), then builds the same ASGI app in this process (`fluxbase.http.asgi.create_from_env`)
and sends it the benchmark's point SELECT --requests times, one at a time, without HTTP. Each
step below is timed around the function that does it (wall time, inclusive: a step contains the
steps indented under it), in wall time and in this thread's CPU time (which leaves out waiting:
the database round trip's wall time is mostly the wait for PostgreSQL's answer). The HTTP server's own share is not in here: `bench/sql_throughput.py` prints the server
CPU per request for each server, and the difference to "whole request" below is its part.

    .venv/bin/python bench/sql_profile.py [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.devstack.procs import free_port  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

QUERY = "SELECT id, name, email FROM bench_users WHERE id = $1"
TOTALS: dict[str, int] = defaultdict(int)
CPU: dict[str, int] = defaultdict(int)
COUNTS: dict[str, int] = defaultdict(int)

# (label, module, attribute path): what is timed, in the order and nesting it is printed. `a|b`:
# the last name's alternatives on the same owner, each timed where the code has it (the hot path
# calls one of them per request: a synchronous fast path, or the coroutine of earlier commits).
STEPS = [
    ("whole request (request log, fast path, handler)", "fluxbase.http.requestlog", "RequestLog.__call__"),
    ("  fast path (headers, body, answer)", "fluxbase.http.fastpath", "SqlFastPath.__call__"),
    ("    read the body", "fluxbase.http.fastpath", "_read_body"),
    ("    handler (run_execute_sql)", "fluxbase.http.controllers.sql", "run_execute_sql"),
    ("      decode the JSON body", "fluxbase.http.controllers.sql", "decode_body"),
    ("      key, project, authorisation", "fluxbase.http.controllers.sql", "sql_access|_granted"),
    ("      identity", "fluxbase.http.controllers.sql", "request_identity"),
    ("      classify the statement (cached)", "fluxbase.tenancy.statements", "Classifier.classify"),
    ("      connection + one round trip", "fluxbase.tenancy.session", "on_connection"),
    ("        pool: acquire a connection", "fluxbase.tenancy.pools", "TenantPool.acquire|take_idle"),
    ("        pool: release it", "fluxbase.tenancy.pools", "TenantPool.release|release_now"),
    ("        prepare (statement cache)", "fluxbase.tenancy.wire", "prepare|cached_statement"),
    ("        adapt parameters", "fluxbase.tenancy.session", "adapt_params"),
    (
        "        hold the request prefix (it leaves with the statement)",
        "fluxbase.tenancy.wire",
        "RequestPrefix.send",
    ),
    # (wire.run_bound returns the driver's awaitable: timed until it is done)
    ("        database round trip", "fluxbase.tenancy.wire", "run_bound"),
    ("        encode the rows", "fluxbase.tenancy.session", "encode_result"),
]


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(fn) or fn.__name__ == "run_bound":

        async def awrapper(*a: Any, **kw: Any) -> Any:
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            try:
                return await fn(*a, **kw)
            finally:
                TOTALS[label] += time.perf_counter_ns() - t0
                CPU[label] += time.thread_time_ns() - c0
                COUNTS[label] += 1

        return awrapper

    def wrapper(*a: Any, **kw: Any) -> Any:
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return fn(*a, **kw)
        finally:
            TOTALS[label] += time.perf_counter_ns() - t0
            CPU[label] += time.thread_time_ns() - c0
            COUNTS[label] += 1

    return wrapper


def instrument() -> None:
    import importlib

    for label, module_name, attr in STEPS:
        module = importlib.import_module(module_name)
        owner: Any = module
        *path, names = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        for name in names.split("|"):
            fn = getattr(owner, name, None)
            if fn is not None:
                setattr(owner, name, _timed(label, fn))
    # Names imported into other modules before the patch: point them at the timed versions.
    from fluxbase.http import fastpath
    from fluxbase.http.controllers import sql as controller

    fastpath.run_execute_sql = controller.run_execute_sql  # type: ignore[attr-defined]


async def run(app: Any, body: bytes, key: str, n: int) -> tuple[float, float]:
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/execute-sql",
        "raw_path": b"/api/execute-sql",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {key}".encode()),
        ],
    }
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    for _ in range(200):  # warm-up: pools, caches
        await app(dict(scope_base), receive, send)
    if b'"Alice"' not in sent[-1]["body"]:
        raise SystemExit(f"unexpected answer: {sent[-1]}")
    TOTALS.clear()
    CPU.clear()
    COUNTS.clear()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        sent.clear()
        await app(dict(scope_base), receive, send)
    return time.process_time() - cpu0, time.perf_counter() - t0


async def lifespan(app: Any) -> tuple[asyncio.Task[None], asyncio.Queue[Any]]:
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    started = asyncio.Event()

    async def send(message: Any) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"] == "lifespan.startup.failed":
            raise SystemExit(message)

    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send))
    await asyncio.wait_for(started.wait(), 30)
    return task, inbox


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-profile-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        port = free_port()
        env = stack.env(dbname, FLUXBASE_API_PORT=str(port), FLUXBASE_RATE_LIMIT_REQUESTS="100000000")
        with run_service(["api"], env, port, tmp) as server:
            api = httpx.Client(base_url=server.url, timeout=30)
            email = f"profile-{secrets.token_hex(4)}@example.com"
            api.post("/api/auth/register", json={"email": email, "password": "bench password 1"})
            token = api.post("/api/auth/login", json={"email": email, "password": "bench password 1"}).json()[
                "token"
            ]
            h = {"Authorization": f"Bearer {token}"}
            pid = api.post("/api/projects", json={"name": "profile"}, headers=h).json()["project"]["id"]
            key = api.post(
                f"/api/projects/{pid}/api-keys", json={"name": "profile", "scope": "admin"}, headers=h
            ).json()["key"]
            for q in (
                "CREATE TABLE bench_users (id int PRIMARY KEY, name text, email text)",
                "INSERT INTO bench_users VALUES (1, 'Alice', 'alice@example.com')",
            ):
                r = api.post(
                    "/api/execute-sql",
                    json={"projectId": pid, "query": q},
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert r.json()["success"], r.text
            api.close()
        os.environ.update(env)
        instrument()
        from fluxbase.http.asgi import create_from_env

        app = create_from_env()
        task, inbox = await lifespan(app)
        body = json.dumps({"projectId": pid, "query": QUERY, "params": [1]}).encode()
        cpu, wall = await run(app, body, key, args.requests)
        # copied before the lifespan call ends (it is timed too, as a whole request)
        totals, cpus, counts = dict(TOTALS), dict(CPU), dict(COUNTS)
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 30)
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(
            f"\n{args.requests} point SELECTs, one at a time, in-process ASGI (no HTTP); load average {load}"
        )
        print(
            f"wall {wall / args.requests * 1e6:7.1f} us/request, this process's CPU {cpu / args.requests * 1e6:7.1f} us/request"
        )
        print("step (inclusive: a step contains the ones indented under it)        wall       CPU")
        for label, _, _ in STEPS:
            if counts.get(label):
                per, cpu_per = totals[label] / args.requests / 1000, cpus[label] / args.requests / 1000
                print(f"{label:<52} {per:7.1f} us wall {cpu_per:7.1f} us CPU")
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
