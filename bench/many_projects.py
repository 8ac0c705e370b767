"""Many projects on one PostgreSQL (issue 19): provisioning, catalog size, cold first requests.

One invocation starts an embedded PostgreSQL with max_connections = 200 and S3, two Fluxbase API
processes on the same database (each with a tenant connection budget, FLUXBASE_TENANT_CONNECTION_
BUDGET), and then:
  1. measures what a new tenant connection costs on this server, SCRAM at PostgreSQL's 4096
     iterations against the 1 tenant roles get (connect + the pool's connection setup), the
     baseline of this invocation;
  2. provisions --projects projects through the API (POST /api/projects) with --provision-clients
     at once: seconds per project, and catalog bytes per project (the pg_catalog relations and the
     whole database, before and after);
  3. drives --active of them with an admin key each in a rotating pattern through both API
     processes (each pass visits every active project once, alternating the process): the first
     pass is every project's first request (no pool yet), later passes are cold again whenever the
     project's connection was evicted to stay under the budget;
  4. the same rotation after switching the active projects' roles to 4096 iterations (what they
     were before the fix), then back;
  5. warm: --warm projects (fewer than the budget) driven for --seconds;
and prints the table (projects, active, connections peak, cold p50/p99, warm req/s, provisioning
s/project). Any request that fails, and any "too many connections" in the server log, makes the
run fail.

    .venv/bin/python bench/many_projects.py [--projects 10000] [--active 1000] [--budget 75]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from rawhttp import CpuShare, client  # noqa: E402

from fluxbase.db.privileges import group_prefix, tenant_group  # noqa: E402
from fluxbase.devstack.procs import free_port  # noqa: E402
from fluxbase.security.roles import SCOPES, role_name, role_password, role_verifier  # noqa: E402
from fluxbase.tenancy.pools import TenantConnection, open_tenant_session  # noqa: E402
from fluxbase.tenancy.statements import Caps  # noqa: E402
from support import Stack, run_service, start_stack, stop_stack  # noqa: E402

MAX_CONNECTIONS = 200
QUERY = "SELECT 1 AS one"
CATALOG_BYTES = """SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c
    WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind IN ('r', 'm')"""
TOO_MANY = ("too many connections", "remaining connection slots are reserved")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] * 1000 if s else float("nan")


def line(name: str, lat: list[float], extra: str = "") -> str:
    return f"  {name:<44} n={len(lat):<6} p50 {pct(lat, 0.5):7.2f} ms   p99 {pct(lat, 0.99):7.2f} ms {extra}"


async def connection_cost(stack: Stack, dbname: str, rounds: int) -> dict[int, list[float]]:
    """connect + the pool's connection setup (pools.open_tenant_session: codecs, the prepared
    one-round-trip steps, the login settings) for a role at 4096 and at 1 iterations, interleaved."""
    su = await asyncpg.connect(stack.database_url(dbname))
    secret = secrets.token_urlsafe(32)
    roles = {4096: "bench_scram_4096", 1: "bench_scram_1"}
    try:
        # CONNECT as a tenant role gets it: through its tenant group (db/privileges.py), or, before
        # the groups, an entry of its own in the database's ACL.
        group = tenant_group(await group_prefix(su), "connect")
        grouped = await su.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", group)
        for it, role in roles.items():
            await su.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{role_verifier(secret, role, it)}'")
            if grouped:
                await su.execute(f"GRANT {group} TO {role} WITH INHERIT TRUE, SET FALSE")
            else:
                await su.execute(f'GRANT CONNECT ON DATABASE "{dbname}" TO {role}')
        assert stack.pg is not None
        out: dict[int, list[float]] = {4096: [], 1: []}
        for _ in range(rounds):
            for it, role in roles.items():
                t0 = time.perf_counter()
                conn = await asyncpg.connect(
                    host="127.0.0.1",
                    port=stack.pg.port,
                    user=role,
                    password=role_password(secret, role),
                    database=dbname,
                    ssl=False,
                    connection_class=TenantConnection,
                )
                await open_tenant_session(conn, "bench", "admin", Caps())
                out[it].append(time.perf_counter() - t0)
                await conn.close()
        return out
    finally:
        for role in roles.values():
            await su.execute(f'REVOKE CONNECT ON DATABASE "{dbname}" FROM {role}')
            await su.execute(f"DROP ROLE {role}")
        await su.close()


class Peak:
    """Client backends of the whole server, sampled every 20 ms."""

    def __init__(self, url: str) -> None:
        self.url, self.peak, self.tenant_peak = url, 0, 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while True:
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, count(*) FILTER (WHERE application_name LIKE 'fluxbase-tenant-%') AS t"
                    " FROM pg_stat_activity WHERE backend_type = 'client backend'"
                )
                self.peak = max(self.peak, row["n"])
                self.tenant_peak = max(self.tenant_peak, row["t"])
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Errors:
    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.samples) < 5:
            self.samples.append(text[:300])


async def provision(
    api: Any, token: str, n: int, clients: int, errors: Errors
) -> tuple[list[str], list[float]]:
    ids: list[str] = []
    lat: list[float] = []
    todo = iter(range(n))

    async def client() -> None:
        for i in todo:
            t0 = time.perf_counter()
            r = await api.post(
                "/api/projects", json={"name": f"p{i}"}, headers={"Authorization": f"Bearer {token}"}
            )
            lat.append(time.perf_counter() - t0)
            if r.status_code != 201:
                errors.add(r.text)
                continue
            ids.append(r.json()["project"]["id"])
            if len(ids) % 500 == 0:
                print(f"    {len(ids)} projects", flush=True)

    await asyncio.gather(*(client() for _ in range(clients)))
    return ids, lat


async def rotate(
    apis: list[Any], keys: list[tuple[str, str]], clients: int, shift: int, errors: Errors
) -> list[float]:
    """One pass over every active project, `clients` at a time; project i goes to API (i + shift) % 2."""
    lat: list[float] = []
    todo = iter(enumerate(keys))

    async def client() -> None:
        for i, (pid, key) in todo:
            api = apis[(i + shift) % len(apis)]
            t0 = time.perf_counter()
            r = await api.post(
                "/api/execute-sql",
                json={"projectId": pid, "query": QUERY},
                headers={"Authorization": f"Bearer {key}"},
            )
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200 or not r.json().get("success"):
                errors.add(r.text)

    await asyncio.gather(*(client() for _ in range(clients)))
    return lat


async def warm(
    apis: list[Any], keys: list[tuple[str, str]], clients: int, seconds: float, errors: Errors
) -> tuple[float, list[float]]:
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(c: int) -> None:
        i = c
        while time.perf_counter() < stop:
            pid, key = keys[i % len(keys)]
            api = apis[i % len(apis)]
            i += clients
            t0 = time.perf_counter()
            r = await api.post(
                "/api/execute-sql",
                json={"projectId": pid, "query": QUERY},
                headers={"Authorization": f"Bearer {key}"},
            )
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors.add(r.text)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return len(lat) / (time.perf_counter() - t0), lat


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{url}/metrics")).text
    for ln in text.splitlines():
        if ln.startswith(name + " "):
            return float(ln.split()[1])
    return 0.0


async def set_iterations(su: asyncpg.Connection, secret: str, ids: list[str], iterations: int) -> None:
    for pid in ids:
        for scope in SCOPES:
            role = role_name(pid, scope)
            await su.execute(f"ALTER ROLE {role} PASSWORD '{role_verifier(secret, role, iterations)}'")


@contextlib.contextmanager
def two_apis(stack: Stack, dbname: str, tmp: Path, budget: int) -> Iterator[list[str]]:
    urls: list[str] = []
    with contextlib.ExitStack() as stack_:
        for _ in range(2):
            port = free_port()
            env = stack.env(
                dbname,
                FLUXBASE_API_PORT=str(port),
                FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
                FLUXBASE_TENANT_CONNECTION_BUDGET=str(budget),
                FLUXBASE_LOG_LEVEL="warning",
            )
            urls.append(stack_.enter_context(run_service(["api"], env, port, tmp)).url)
        yield urls


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projects", type=int, default=10_000)
    ap.add_argument("--active", type=int, default=1_000)
    ap.add_argument("--budget", type=int, default=75, help="tenant connection budget per API process")
    ap.add_argument(
        "--clients",
        type=int,
        default=2,
        help="concurrent requests while rotating (default 2: one in flight per API process; a cold "
        "request is ~11 ms of CPU over all processes, so on 2 cores more clients measure the queue)",
    )
    ap.add_argument("--provision-clients", type=int, default=4)
    ap.add_argument("--passes", type=int, default=3, help="rotation passes after the first")
    ap.add_argument("--warm", type=int, default=40, help="projects in the warm phase (below the budget)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument(
        "--http-client",
        default="raw",
        choices=("raw", "httpx"),
        help="the benchmark's HTTP client: raw asyncio streams (bench/rawhttp.py, less CPU on the "
        "server's cores) or httpx (the cross-check)",
    )
    args = ap.parse_args()
    active_n = min(args.active, args.projects)

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-many-"))
    stack = start_stack(tmp, max_connections=MAX_CONNECTIONS)
    errors = Errors()
    try:
        dbname = await stack.create_database()
        su = await asyncpg.connect(stack.database_url(dbname))
        print(
            f"\nMany projects: max_connections={MAX_CONNECTIONS}, 2 API processes, budget {args.budget} each, "
            f"cores={os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
        )
        with two_apis(stack, dbname, tmp, args.budget) as urls:
            apis = [client(args.http_client, u) for u in urls]
            print(f"HTTP client: {args.http_client}")
            peak = Peak(stack.database_url(dbname))
            peak.start()
            try:
                print("\n1. A new tenant connection (connect + setup), this server, interleaved:")
                cost = await connection_cost(stack, dbname, 100)
                print(line("SCRAM 4096 iterations (PostgreSQL default)", cost[4096]))
                print(line("SCRAM 1 iteration (tenant roles now)", cost[1]))
                print(f"  ratio p50 4096/1: {pct(cost[4096], 0.5) / pct(cost[1], 0.5):.2f}")

                email = f"bench-{secrets.token_hex(4)}@example.com"
                await apis[0].post(
                    "/api/auth/register", json={"email": email, "password": "bench password 1"}
                )
                r = await apis[0].post(
                    "/api/auth/login", json={"email": email, "password": "bench password 1"}
                )
                token = r.json()["token"]
                db_before = await su.fetchval("SELECT pg_database_size(current_database())")
                cat_before = await su.fetchval(CATALOG_BYTES)
                print(f"\n2. Provisioning {args.projects} projects ({args.provision_clients} at a time):")
                t0 = time.perf_counter()
                ids, prov = await provision(apis[0], token, args.projects, args.provision_clients, errors)
                prov_s = time.perf_counter() - t0
                await su.execute("CHECKPOINT")
                db_after = await su.fetchval("SELECT pg_database_size(current_database())")
                cat_after = await su.fetchval(CATALOG_BYTES)
                n = max(len(ids), 1)
                print(line("POST /api/projects", prov))
                tenth = max(len(prov) // 10, 1)
                print(line("  the first 10%", prov[:tenth]))
                print(line("  the last 10%", prov[-tenth:]))
                print(f"  wall {prov_s:.1f} s: {prov_s / n * 1000:.1f} ms per project ({n / prov_s:.1f}/s)")
                print(
                    f"  catalog (pg_catalog relations) {(cat_after - cat_before) / n / 1024:.1f} KiB per project, "
                    f"database {(db_after - db_before) / n / 1024:.1f} KiB per project "
                    f"(database now {db_after / 2**20:.0f} MiB)"
                )

                acl = await su.fetchrow(
                    "SELECT cardinality(datacl) AS n, pg_column_size(datacl) AS b FROM pg_database"
                    " WHERE datname = current_database()"
                )
                tenant_entries = await su.fetchval(
                    """SELECT count(DISTINCT x.grantee) FROM pg_database d, aclexplode(d.datacl) x
                       JOIN pg_roles g ON g.oid = x.grantee
                       WHERE d.datname = current_database() AND g.rolname ~ '^p_[0-9a-f]{16}_'"""
                )
                print(
                    f"  the database's ACL: {acl['n']} entries ({tenant_entries} naming tenant roles), "
                    f"{acl['b']} bytes stored"
                )
                after = await connection_cost(stack, dbname, 100)
                print(line("new connection now, SCRAM 1 iteration", after[1]))
                print(f"  ratio p50 after/before provisioning: {pct(after[1], 0.5) / pct(cost[1], 0.5):.2f}")

                active = ids[:active_n]
                keys: list[tuple[str, str]] = []
                for pid in active:
                    r = await apis[0].post(
                        f"/api/projects/{pid}/api-keys",
                        json={"name": "bench", "scope": "admin"},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    keys.append((pid, r.json()["key"]))

                print(
                    f"\n3. Rotating over {len(keys)} active projects through both APIs, {args.clients} at a time"
                    f" (load {os.getloadavg()[0]:.1f}):"
                )
                cpu = CpuShare()
                first = await rotate(apis, keys, args.clients, 0, errors)
                print(line("first request of each project (cold)", first))
                print(f"  {args.http_client} {cpu.report(len(first))}")
                rot: list[float] = []
                cpu = CpuShare()
                for p in range(args.passes):
                    rot += await rotate(apis, keys, args.clients, p + 1, errors)
                evictions = sum([await metric(u, "fluxbase_tenant_pool_evictions_total") for u in urls])
                print(line("later passes (cold again after eviction)", rot, f"  evictions {evictions:.0f}"))
                print(f"  {args.http_client} {cpu.report(len(rot))}")

                print(
                    "\n4. The same rotation with the active roles at 4096 iterations (before the fix)"
                    f" (load {os.getloadavg()[0]:.1f}):"
                )
                secret = stack.secret_key
                await set_iterations(su, secret, active, 4096)
                old = await rotate(apis, keys, args.clients, 1, errors)
                await set_iterations(su, secret, active, 1)
                new = await rotate(apis, keys, args.clients, 0, errors)
                print(line("4096 iterations", old))
                print(line("1 iteration (same invocation, after)", new))
                print(
                    f"  ratio p50 4096/1: {pct(old, 0.5) / pct(new, 0.5):.2f}, "
                    f"p99 {pct(old, 0.99) / pct(new, 0.99):.2f}"
                )

                hot = keys[: args.warm]
                await rotate(apis, hot, args.clients, 0, errors)
                cpu = CpuShare()
                rps, warm_lat = await warm(apis, hot, args.clients, args.seconds, errors)
                print(f"\n5. Warm: {len(hot)} projects, {args.clients} clients, {args.seconds:.0f} s:")
                print(line("warm requests", warm_lat, f"  {rps:.0f} req/s"))
                print(f"  {args.http_client} {cpu.report(len(warm_lat))}")
                print(f"  ratio cold/warm p50: {pct(first, 0.5) / pct(warm_lat, 0.5):.2f}")
            finally:
                await peak.stop()
                for a in apis:
                    await a.aclose()
        await su.close()
        assert stack.pg is not None
        log = stack.pg.log_path.read_text(errors="replace")
        too_many = sum(log.count(t) for t in TOO_MANY)
        cold = first + rot + new
        print(
            f"\nHTTP client {args.http_client}\n| projects | active | connections peak (tenant) | cold p50 | cold p99 | warm req/s | "
            f"provisioning s/project |\n|---|---|---|---|---|---|---|\n"
            f"| {len(ids)} | {len(keys)} | {peak.peak} ({peak.tenant_peak}) of {MAX_CONNECTIONS} | "
            f"{pct(cold, 0.5):.1f} ms | {pct(cold, 0.99):.1f} ms | {rps:.0f} | {prov_s / n:.3f} |"
        )
        print(f"\nfailed requests: {errors.count}; 'too many connections' in the server log: {too_many}")
        for s in errors.samples:
            print("  e.g.", s)
        print(f"load after: {os.getloadavg()}")
        if errors.count or too_many:
            raise SystemExit(1)
    finally:
        stop_stack(stack)


if __name__ == "__main__":
    asyncio.run(main())
