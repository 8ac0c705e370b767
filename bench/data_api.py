"""Records REST and execute-batch against their execute-sql baselines, in one invocation.

Starts an embedded PostgreSQL and S3 and a Fluxbase API, creates a project with a 1 000-row
table, then measures with keep-alive HTTP/1.1 clients:
  * point read: GET …/records/{pk}  vs  execute-sql `SELECT * … WHERE id = $1`,
  * filtered list (50 rows): GET …/records?filter=&sort=&limit=50  vs  the same SELECT by hand,
  * writes: one execute-batch of 10 INSERTs  vs  10 execute-sql INSERT requests
    (compared as inserted rows per second).
Prints req/s, p50/p99 and the ratios to the baseline. The records endpoints add a catalog
lookup to each request; a batch adds one identity round trip per statement after the first.

    .venv/bin/python bench/data_api.py [--seconds 5] [--workers 1] [--clients 8]
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
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from sql_throughput import http_load, post  # noqa: E402

from fluxbase.devstack.procs import free_port  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402


def get(path: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def pair(
    title: str,
    port: int,
    baseline: bytes,
    candidate: bytes,
    clients: int,
    seconds: float,
    check: bytes,
    per_request: tuple[int, int] = (1, 1),
) -> None:
    """Measure baseline and candidate back to back; print both and the candidate's ratio."""
    await http_load("127.0.0.1", port, baseline, clients, 1.0, check)  # warm-up
    await http_load("127.0.0.1", port, candidate, clients, 1.0, check)
    b = await http_load("127.0.0.1", port, baseline, clients, seconds, check)
    c = await http_load("127.0.0.1", port, candidate, clients, seconds, check)
    b.name, c.name = "execute-sql", "candidate"
    print(f"\n{title}")
    print(b.line())
    print(c.line())
    b_ops, c_ops = b.rps * per_request[0], c.rps * per_request[1]
    if per_request != (1, 1):
        print(f"  rows/s: execute-sql {b_ops:.0f}, candidate {c_ops:.0f}")
    print(f"  candidate / execute-sql = {c_ops / b_ops:.2f}x")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1, help="API worker processes")
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        port = free_port()
        env = stack.env(
            dbname,
            FLUXBASE_API_PORT=str(port),
            FLUXBASE_API_WORKERS=str(args.workers),
            FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
            FLUXBASE_TENANT_POOL_MAX="16",
            FLUXBASE_TENANT_CONNECTION_LIMIT="40",
        )
        with run_service(["api"], env, port, tmp) as server:
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
            auth = {"Authorization": f"Bearer {key}"}
            for q in (
                "CREATE TABLE bench_items (id int PRIMARY KEY, name text, qty int, tags jsonb)",
                "INSERT INTO bench_items SELECT i, 'item ' || i, i % 100, '{\"a\": 1}' "
                "FROM generate_series(1, 1000) i",
                "CREATE TABLE bench_log (id bigserial PRIMARY KEY, v text)",
            ):
                r = api.post("/api/execute-sql", json={"projectId": pid, "query": q}, headers=auth)
                assert r.json()["success"], r.text
            api.close()

            def sql(query: str, params: list[object]) -> bytes:
                body = json.dumps({"projectId": pid, "query": query, "params": params}).encode()
                return post("/api/execute-sql", port, body, auth)

            print(
                f"{args.seconds:.0f}s per run, clients={args.clients}, API workers={args.workers}, "
                f"cores={os.cpu_count()}"
            )
            records = f"/api/projects/{pid}/tables/bench_items/records"
            await pair(
                "Point read by primary key",
                port,
                sql("SELECT * FROM bench_items WHERE id = $1", [500]),
                get(f"{records}/500", port, auth),
                args.clients,
                args.seconds,
                b'"item 500"',
            )
            flt = quote(json.dumps({"qty": {"$gte": 10, "$lt": 20}}))
            await pair(
                "Filtered, sorted list of 50 rows",
                port,
                sql(
                    "SELECT * FROM bench_items WHERE qty >= $1 AND qty < $2 ORDER BY name DESC, id LIMIT $3",
                    [10, 20, 51],
                ),
                get(f"{records}?filter={flt}&sort=-name&limit=50", port, auth),
                args.clients,
                args.seconds,
                b'"item ',
            )
            batch = json.dumps(
                {
                    "projectId": pid,
                    "statements": [
                        {"query": "INSERT INTO bench_log (v) VALUES ($1)", "params": [f"b{i}"]}
                        for i in range(10)
                    ],
                }
            ).encode()
            await pair(
                "Inserts: 10 per execute-batch vs 1 per execute-sql",
                port,
                sql("INSERT INTO bench_log (v) VALUES ($1)", ["s"]),
                post("/api/execute-batch", port, batch, auth),
                args.clients,
                args.seconds,
                b'"success":true',
                per_request=(1, 10),
            )
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
