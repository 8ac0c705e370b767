"""Point-SELECT throughput and latency through /api/execute-sql vs. asyncpg directly.

One invocation: starts an embedded PostgreSQL and S3, a Fluxbase API with --workers
processes, creates a project with one row, then measures at 8 and 32 concurrent clients:
  * direct: the same SELECT issued straight through asyncpg on connections each client holds for
    the whole run (no reset between queries: the limit),
  * pooled: the same SELECT through asyncpg's pool as its documentation uses it
    (`pool.fetchrow`: acquire, query, release; release resets the session, so two round trips),
    the baseline the issue's figures match and the one that does the per-request isolation
    work Fluxbase does,
  * fluxbase: POST /api/execute-sql over keep-alive HTTP/1.1,
  * postgraphile (optional, --postgraphile): PostGraphile 4 serving the same row over GraphQL,
  * minimal (optional, --minimal): a bare ASGI app over asyncpg (bench/minimal_app.py: no auth,
    no transaction, no reset) under uvicorn with the same workers, the floor for Python HTTP.
Prints req/s, p50/p99 latency and the ratios. Everything runs on this machine.

    .venv/bin/python bench/sql_throughput.py [--seconds 10] [--workers 1] [--postgraphile] [--minimal]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.devstack.procs import free_port, stop_process  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

QUERY = "SELECT id, name, email FROM bench_users WHERE id = $1"


class Result:
    def __init__(self, name: str, clients: int, latencies: list[float], seconds: float, errors: int):
        self.name, self.clients, self.errors = name, clients, errors
        self.rps = len(latencies) / seconds
        lat = sorted(latencies)
        self.p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
        self.p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else float("nan")

    def line(self) -> str:
        return (
            f"{self.name:<13} clients={self.clients:<3} {self.rps:>8.0f} req/s   p50 {self.p50:6.2f} ms   "
            f"p99 {self.p99:6.2f} ms   errors {self.errors}"
        )


async def http_load(
    host: str, port: int, request: bytes, clients: int, seconds: float, check: bytes
) -> Result:
    """Keep-alive HTTP/1.1 clients on raw asyncio streams (a lean load generator)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if not head.startswith(b"HTTP/1.1 200") or check not in body:
                    errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Result("", clients, latencies, time.perf_counter() - t0, errors)


async def asyncpg_load(url: str, clients: int, seconds: float, *, per_query_pool: bool) -> Result:
    """The query straight through asyncpg: on a connection each client holds for the whole run
    ("direct"), or through the pool per query ("pooled": acquire, fetch, release, which runs the
    session reset)."""
    pool = await asyncpg.create_pool(url, min_size=clients, max_size=clients)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        async with contextlib.AsyncExitStack() as stack:
            db = pool if per_query_pool else await stack.enter_async_context(pool.acquire())
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await db.fetchrow(QUERY, 1)
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    await pool.close()
    return Result("pooled" if per_query_pool else "direct", clients, latencies, elapsed, 0)


def post(path: str, port: int, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def start_postgraphile(db_url: str, schema: str, port: int, workdir: Path) -> subprocess.Popen[bytes] | None:
    npm = shutil.which("npm")
    if npm is None:
        print("postgraphile: npm not found, skipped")
        return None
    if not (workdir / "node_modules" / "postgraphile").exists():
        subprocess.run(
            [npm, "install", "--silent", "--no-audit", "--no-fund", "postgraphile@4"],
            cwd=workdir,
            check=True,
            capture_output=True,
        )
    cli = workdir / "node_modules" / ".bin" / "postgraphile"
    proc = subprocess.Popen(
        [str(cli), "-c", db_url, "-s", schema, "-p", str(port), "-n", "127.0.0.1", "--disable-query-log"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": "{__typename}"}, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    stop_process(proc)
    print("postgraphile: did not start, skipped")
    return None


def start_minimal(dsn: str, port: int, workers: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "minimal_app:app",
            "--app-dir",
            str(ROOT / "bench"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env={**os.environ, "MINIMAL_DSN": dsn},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"http://127.0.0.1:{port}/", json={"params": [1]}, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    stop_process(proc)
    raise SystemExit("minimal ASGI app did not start")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API worker processes (1 pays off best on 2 cores: docs/sql.md)",
    )
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--postgraphile", action="store_true", help="also measure PostGraphile 4 (npm install)")
    ap.add_argument("--minimal", action="store_true", help="also measure a bare ASGI app over asyncpg")
    ap.add_argument(
        "--socket",
        action="store_true",
        help="connect the API, asyncpg and PostGraphile over the embedded server's Unix socket",
    )
    args = ap.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        port = free_port()
        db_url = stack.runtime_url(dbname)
        if args.socket:
            if stack.pg is None:
                raise SystemExit("--socket needs the embedded PostgreSQL (no FLUXBASE_TEST_DATABASE_URL)")
            parts = urlsplit(db_url)
            db_url = (
                f"postgresql://{parts.username}:{parts.password}@/{dbname}"
                f"?host={stack.pg.socket_dir}&port={parts.port}"
            )
        env = stack.env(
            dbname,
            FLUXBASE_DATABASE_URL=db_url,
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
            body = json.dumps({"projectId": pid, "query": QUERY, "params": [1]}).encode()
            request = post("/api/execute-sql", port, body, {"Authorization": f"Bearer {key}"})
            # Direct asyncpg reads the same table in the project's schema (superuser connection,
            # so the project role's connection cap stays with the API).
            # (The API's runtime role may not read project tables: the superuser's URL, which the
            # --socket form shares host and port with.)
            super_url = stack.database_url(dbname)
            if args.socket:
                sparts = urlsplit(super_url)
                super_url = (
                    f"postgresql://{sparts.username}:{sparts.password}@/{dbname}"
                    f"?host={stack.pg.socket_dir}&port={sparts.port}"
                )
            sep = "&" if "?" in super_url else "?"
            direct_url = super_url + f"{sep}options=-csearch_path%3Dp_{pid}"
            pg_proc = None
            pg_port = free_port()
            if args.postgraphile:
                workdir = ROOT / "bench" / ".node"
                workdir.mkdir(exist_ok=True)
                pg_proc = start_postgraphile(direct_url, f"p_{pid}", pg_port, workdir)
            minimal_proc = None
            minimal_port = free_port()
            if args.minimal:
                minimal_proc = start_minimal(direct_url, minimal_port, args.workers)
            minimal_request = post("/", minimal_port, json.dumps({"params": [1]}).encode(), {})
            gql = json.dumps({"query": "{ benchUserById(id: 1) { id name email } }"}).encode()
            gql_request = post("/graphql", pg_port, gql, {})
            print(
                f"\nPoint SELECT, {args.seconds:.0f}s per run, API workers={args.workers}, cores={os.cpu_count()}, "
                f"database over {'Unix socket' if args.socket else 'TCP 127.0.0.1'}"
            )
            try:
                for clients in client_counts:
                    # Warm-up so pools and statement caches are filled.
                    await http_load("127.0.0.1", port, request, clients, 1.0, b'"Alice"')
                    d = await asyncpg_load(direct_url, clients, args.seconds, per_query_pool=False)
                    pl = await asyncpg_load(direct_url, clients, args.seconds, per_query_pool=True)
                    f = await http_load("127.0.0.1", port, request, clients, args.seconds, b'"Alice"')
                    f.name = "fluxbase"
                    print(d.line())
                    print(pl.line())
                    print(f.line())
                    if pg_proc is not None:
                        await http_load("127.0.0.1", pg_port, gql_request, clients, 1.0, b"Alice")
                        g = await http_load(
                            "127.0.0.1", pg_port, gql_request, clients, args.seconds, b"Alice"
                        )
                        g.name = "postgraphile4"
                        print(g.line())
                        print(f"  fluxbase / postgraphile4 = {f.rps / g.rps:.2f}x")
                    if minimal_proc is not None:
                        await http_load("127.0.0.1", minimal_port, minimal_request, clients, 1.0, b"Alice")
                        m = await http_load(
                            "127.0.0.1", minimal_port, minimal_request, clients, args.seconds, b"Alice"
                        )
                        m.name = "minimal"
                        print(m.line())
                        print(f"  fluxbase / minimal ASGI over asyncpg = {f.rps / m.rps:.2%}")
                    print(f"  fluxbase / direct asyncpg (held connections) = {f.rps / d.rps:.2%}")
                    print(f"  fluxbase / asyncpg pool (pool.fetchrow) = {f.rps / pl.rps:.2%}")
            finally:
                if pg_proc is not None:
                    stop_process(pg_proc, signal.SIGTERM)
                if minimal_proc is not None:
                    stop_process(minimal_proc, signal.SIGTERM)
            api.close()
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
