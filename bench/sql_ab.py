"""A/B of the SQL hot path: this tree's API against another checkout's, alternately, in one run.

Throughput on a shared, noisy machine moves by more than the difference a refactor makes, so
the two servers run side by side on one PostgreSQL (a database each) and are measured in turns
(A B A B ...), and each turn also reports the API process's CPU time per request (user + system,
from /proc): the Python work a request costs, which other load on the machine disturbs far less;
and, with the embedded PostgreSQL, the database's (its process tree over the same turn: only one
side is loaded at a time).

    .venv/bin/python bench/sql_ab.py --base /path/to/other/checkout [--rounds 4] [--seconds 6] [--wrk]

`--wrk` loads each side with wrk (one thread, as sql_throughput.py) and leaves the tenant pool at
its shipped size; without it, the Python generator in this process and a pool of 16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from sql_throughput import QUERY, Target, http_load, tree_cpu_ticks, wrk_load  # noqa: E402

from fluxbase.devstack.procs import free_port  # noqa: E402
from support import Stack, run_service, start_stack, stop_stack  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK


@contextmanager
def server(
    stack: Stack, dbname: str, tree: Path, tmp: Path, pool_max: str | None = "16"
) -> Iterator[tuple[int, int]]:
    """An API server running the code of `tree`: (its port, its pid)."""
    port = free_port()
    env = stack.env(
        dbname,
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_API_WORKERS="1",
        FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
        **({} if pool_max is None else {"FLUXBASE_TENANT_POOL_MAX": pool_max}),
        FLUXBASE_TENANT_CONNECTION_LIMIT="40",
        PYTHONPATH=f"{tree / 'platform'}:{tree / 'realtime'}",
    )
    with run_service(["api"], env, port, tmp) as proc:
        yield port, proc.proc.pid


def setup(port: int) -> bytes:
    """A user, a project with one row and an admin key; the request the load repeats."""
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    email = f"bench-{secrets.token_hex(4)}@example.com"
    api.post("/api/auth/register", json={"email": email, "password": "bench password 1"})
    token = api.post("/api/auth/login", json={"email": email, "password": "bench password 1"}).json()["token"]
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
    body = json.dumps({"projectId": pid, "query": QUERY, "params": [1]}).encode()
    return post("/api/execute-sql", port, body, {"Authorization": f"Bearer {key}"})


def post(path: str, port: int, body: bytes, headers: dict[str, str]) -> bytes:
    """A raw keep-alive HTTP/1.1 POST, as `http_load` sends it over and over."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (A); this tree is B")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument(
        "--wrk",
        action="store_true",
        help="load with wrk (bench/wrk_post.lua) and the shipped tenant pool, as sql_throughput.py does",
    )
    args = ap.parse_args()
    pool_max = None if args.wrk else "16"

    async def load(port: int, request: bytes, seconds: float) -> Any:
        if not args.wrk:
            return await http_load("127.0.0.1", port, request, args.clients, seconds, b'"Alice"')
        head, body = request.split(b"\r\n\r\n", 1)
        auth = [h for h in head.decode().split("\r\n")[1:] if h.lower().startswith("authorization")]
        target = Target("/api/execute-sql", body, auth, b'"Alice"')
        return await asyncio.to_thread(wrk_load, port, target, args.clients, seconds)

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-ab-"))
    stack = start_stack(tmp)
    try:
        db_a, db_b = await stack.create_database(), await stack.create_database()
        with (
            server(stack, db_a, args.base.resolve(), tmp, pool_max) as (port_a, pid_a),
            server(stack, db_b, ROOT, tmp, pool_max) as (
                port_b,
                pid_b,
            ),
        ):
            sides = {"A (base)": (port_a, pid_a, setup(port_a)), "B (this)": (port_b, pid_b, setup(port_b))}
            rps: dict[str, list[float]] = {k: [] for k in sides}
            cpu_us: dict[str, list[float]] = {k: [] for k in sides}
            db_us: dict[str, list[float]] = {k: [] for k in sides}
            db_pid = stack.pg.pid if stack.pg is not None else None
            for port, _, request in sides.values():
                await load(port, request, 2.0)  # warm-up
            for n in range(args.rounds):
                order = list(sides) if n % 2 == 0 else list(reversed(sides))
                for name in order:
                    port, pid, request = sides[name]
                    before = cpu_seconds(pid)
                    db_before = tree_cpu_ticks(db_pid) if db_pid is not None else 0
                    r = await load(port, request, args.seconds)
                    used = cpu_seconds(pid) - before
                    db_used = (tree_cpu_ticks(db_pid) - db_before) / TICK if db_pid is not None else 0.0
                    done = r.rps * args.seconds
                    rps[name].append(r.rps)
                    cpu_us[name].append(used / done * 1e6 if done else float("nan"))
                    db_us[name].append(db_used / done * 1e6 if done and db_pid is not None else float("nan"))
                    print(
                        f"round {n} {name}: {r.rps:8.0f} req/s  {cpu_us[name][-1]:6.1f} µs CPU/request  "
                        f"database {db_us[name][-1]:6.1f} µs/request  errors {r.errors}"
                    )
            print(f"\n{args.clients} clients, {args.rounds} rounds of {args.seconds:.0f}s each, alternating")
            for name in sides:
                print(
                    f"{name}: median {statistics.median(rps[name]):8.0f} req/s, "
                    f"median {statistics.median(cpu_us[name]):6.1f} µs API CPU per request, "
                    f"median {statistics.median(db_us[name]):6.1f} µs database CPU per request"
                )
            a, b = list(sides)
            print(f"B/A throughput {statistics.median(rps[b]) / statistics.median(rps[a]):.3f}")
            print(f"B/A CPU per request {statistics.median(cpu_us[b]) / statistics.median(cpu_us[a]):.3f}")
            if db_pid is not None:
                print(
                    f"B/A database CPU per request {statistics.median(db_us[b]) / statistics.median(db_us[a]):.3f}"
                )
        await stack.drop_database(db_a)
        await stack.drop_database(db_b)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
