"""The Python work of one /api/execute-sql request, counted: bytecodes executed, and the
in-process time of sequential requests, for this tree and another checkout, alternately.

Throughput on a shared machine is noisy; the number of Python bytecodes a request executes is
not (the same code path runs the same instructions), and it is what a refactor of the request
path changes. Each side runs in a process of its own that imports that tree's `fluxbase`,
builds the ASGI app (`create_app` + the SQL fast path, as uvicorn serves it), and drives it
directly (no HTTP parsing, no sockets to the client) against one real PostgreSQL.

    .venv/bin/python bench/sql_opcodes.py --base /path/to/other/checkout [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


async def _child(body: bytes, key: str, requests: int) -> dict[str, float]:
    from fluxbase.config import load_settings
    from fluxbase.http.app import create_app
    from fluxbase.http.fastpath import SqlFastPath

    app = SqlFastPath(create_app(load_settings(os.environ)))
    started, stop = asyncio.Event(), asyncio.Event()

    async def life_receive() -> dict[str, Any]:
        if not started.is_set():
            return {"type": "lifespan.startup"}
        await stop.wait()
        return {"type": "lifespan.shutdown"}

    async def life_send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"] == "lifespan.startup.failed":
            raise SystemExit(message.get("message"))

    life = asyncio.create_task(app({"type": "lifespan"}, life_receive, life_send))  # type: ignore[arg-type]
    await started.wait()
    scope = {
        "type": "http",
        "path": "/api/execute-sql",
        "method": "POST",
        "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")],
    }
    out: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            out.append(message["body"])

    async def one() -> None:
        await app(scope, receive, send)  # type: ignore[arg-type]

    for _ in range(500):  # warm-up: pools, prepared statements, classification cache
        await one()
    assert b'"Alice"' in out[-1], out[-1]
    # Sequential requests, timed (best of five batches).
    per_request = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(requests):
            await one()
        per_request.append((time.perf_counter() - t0) / requests * 1e6)
    # Bytecodes executed per request (all Python code on the path: ours, Litestar's, asyncio's).
    # ...and those of fluxbase's own code, which the scheduling of the event loop does not vary.
    count = ours = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "opcode":
            count += 1
        return local

    def local_ours(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count, ours
        if event == "opcode":
            count += 1
            ours += 1
        return local_ours

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local_ours if "/fluxbase/" in frame.f_code.co_filename else local

    traced = 200
    sys.settrace(tracer)
    try:
        for _ in range(traced):
            await one()
    finally:
        sys.settrace(None)
    assert b'"Alice"' in out[-1], out[-1]
    stop.set()
    await life
    return {
        "us_per_request": min(per_request),
        "opcodes_per_request": count / traced,
        "ours_per_request": ours / traced,
    }


def _setup(env: dict[str, str], tmp: Path) -> tuple[bytes, str]:
    """A project with one row and an admin key, through a real API server of this tree."""
    import secrets

    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from fluxbase.devstack.procs import free_port
    from support import run_service

    port = free_port()
    with run_service(["api"], {**env, "FLUXBASE_API_PORT": str(port)}, port, tmp) as server:
        api = httpx.Client(base_url=server.url, timeout=30)
        email = f"bench-{secrets.token_hex(4)}@example.com"
        api.post("/api/auth/register", json={"email": email, "password": "bench password 1"})
        token = api.post("/api/auth/login", json={"email": email, "password": "bench password 1"}).json()[
            "token"
        ]
        h = {"Authorization": f"Bearer {token}"}
        pid = api.post("/api/projects", json={"name": "bench"}, headers=h).json()["project"]["id"]
        key = api.post(
            f"/api/projects/{pid}/api-keys", json={"name": "bench", "scope": "admin"}, headers=h
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
    query = "SELECT id, name, email FROM bench_users WHERE id = $1"
    return json.dumps({"projectId": pid, "query": query, "params": [1]}).encode(), key


async def _parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from support import start_stack, stop_stack

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-opcodes-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        env = stack.env(dbname, FLUXBASE_RATE_LIMIT_REQUESTS="100000000", FLUXBASE_LOG_LEVEL="error")
        body, key = _setup(env, tmp)
        sides = {"A (base)": args.base.resolve(), "B (this)": ROOT}
        got: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for n in range(args.rounds):
            for name in list(sides) if n % 2 == 0 else list(reversed(sides)):
                tree = sides[name]
                child_env = {**env, "PYTHONPATH": f"{tree / 'platform'}:{tree / 'realtime'}"}
                proc = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, __file__, "--child", "--requests", str(args.requests)],
                    input=json.dumps({"body": body.decode(), "key": key}).encode(),
                    env=child_env,
                    capture_output=True,
                    check=True,
                )
                result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
                got[name].append(result)
                print(
                    f"round {n} {name}: {result['opcodes_per_request']:8.0f} bytecodes/request "
                    f"({result['ours_per_request']:6.0f} in fluxbase)  "
                    f"{result['us_per_request']:6.1f} µs/request (sequential, in-process)"
                )
        print()
        med = {
            name: (
                statistics.median(r["opcodes_per_request"] for r in rs),
                statistics.median(r["ours_per_request"] for r in rs),
                statistics.median(r["us_per_request"] for r in rs),
            )
            for name, rs in got.items()
        }
        for name, (ops, own, us) in med.items():
            print(f"{name}: {ops:8.0f} bytecodes/request ({own:6.0f} in fluxbase), {us:6.1f} µs/request")
        (a_ops, a_own, a_us), (b_ops, b_own, b_us) = med.values()
        print(
            f"B/A bytecodes {b_ops / a_ops:.3f} (in fluxbase {b_own / a_own:.3f}), B/A time {b_us / a_us:.3f}"
        )
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, help="the other checkout (A); this tree is B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(asyncio.run(_child(spec["body"].encode(), spec["key"], args.requests))))
        return
    if args.base is None:
        ap.error("--base is required")
    asyncio.run(_parent(args))


if __name__ == "__main__":
    main()
