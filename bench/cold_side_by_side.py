"""Cold first requests, this checkout against another git revision, side by side (issue 19).

On a machine whose load moves with other work, two runs of bench/many_projects.py minutes apart
compare the load more than the code. This runs both at once instead: one embedded PostgreSQL, one
database, one API process of this checkout ("new") and one of --base ("base", its platform/ and
sql/ exported with `git archive` and put first on PYTHONPATH), each with --budget. It provisions
--projects projects, then for each --clients value drives --active projects (a group of its own)
for --passes passes, each project alternating between the two processes every pass as in
many_projects.py, and prints each side's cold latency per pass: the first pass is every project's
first request, later ones are cold again after eviction. Both sides see the same load.

    .venv/bin/python bench/cold_side_by_side.py --base main --projects 2000 --active 300 --clients 4,2

The base revision must use the same migrations as this checkout (the database is migrated once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from many_projects import Errors, line, provision  # noqa: E402
from rawhttp import CpuShare, client  # noqa: E402

from fluxbase.devstack.procs import free_port  # noqa: E402
from support import Stack, run_service, start_stack, stop_stack  # noqa: E402

QUERY = "SELECT 1 AS one"


def export(rev: str, into: Path) -> Path:
    """platform/ and sql/ of `rev`, for PYTHONPATH."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "platform", "sql"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "platform"


def api_env(stack: Stack, dbname: str, budget: int, pythonpath: Path | None) -> tuple[dict[str, str], int]:
    port = free_port()
    env = stack.env(
        dbname,
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
        FLUXBASE_TENANT_CONNECTION_BUDGET=str(budget),
        FLUXBASE_LOG_LEVEL="warning",
    )
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env, port


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main", help="git revision to compare with")
    ap.add_argument("--projects", type=int, default=2000)
    ap.add_argument("--active", type=int, default=300, help="projects per --clients value")
    ap.add_argument("--budget", type=int, default=75, help="tenant connection budget per API process")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--clients", default="4,2", help="concurrent requests, one group per value")
    ap.add_argument("--max-connections", type=int, default=200)
    ap.add_argument(
        "--http-client",
        default="raw",
        choices=("raw", "httpx"),
        help="bench/rawhttp.py, or httpx (cross-check)",
    )
    args = ap.parse_args()
    clients_list = [int(c) for c in args.clients.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-side-"))
    base_path = export(args.base, tmp / "base")
    stack = start_stack(tmp, max_connections=args.max_connections)
    errors = Errors()
    try:
        dbname = await stack.create_database()
        with contextlib.ExitStack() as running:
            urls = []
            for path in (None, base_path):  # this checkout first: it migrates the database
                env, port = api_env(stack, dbname, args.budget, path)
                urls.append(running.enter_context(run_service(["api"], env, port, tmp)).url)
            apis = [client(args.http_client, u) for u in urls]
            print(f"HTTP client: {args.http_client}")
            try:
                email = f"side-{secrets.token_hex(4)}@example.com"
                await apis[0].post(
                    "/api/auth/register", json={"email": email, "password": "bench password 1"}
                )
                r = await apis[0].post(
                    "/api/auth/login", json={"email": email, "password": "bench password 1"}
                )
                auth = {"Authorization": f"Bearer {r.json()['token']}"}
                total = max(args.projects, args.active * len(clients_list))
                print(f"\nProvisioning {total} projects (load {os.getloadavg()[0]:.1f}):", flush=True)
                ids, _ = await provision(apis[0], r.json()["token"], total, 4, errors)
                keys: list[tuple[str, str]] = []
                for pid in ids[: args.active * len(clients_list)]:
                    k = await apis[0].post(
                        f"/api/projects/{pid}/api-keys", json={"name": "side", "scope": "admin"}, headers=auth
                    )
                    keys.append((pid, k.json()["key"]))
                names = ("new", "base")
                for g, clients in enumerate(clients_list):
                    group = keys[g * args.active : (g + 1) * args.active]
                    print(f"\n{clients} clients, {len(group)} projects, budget {args.budget} per process:")
                    for p in range(args.passes):
                        lat: dict[str, list[float]] = {"new": [], "base": []}
                        todo = iter(enumerate(group))

                        async def one_client(
                            p: int, lat: dict[str, list[float]], todo: Iterator[tuple[int, tuple[str, str]]]
                        ) -> None:
                            for i, (pid, key) in todo:
                                side = (i + p) % 2
                                t0 = time.perf_counter()
                                resp = await apis[side].post(
                                    "/api/execute-sql",
                                    json={"projectId": pid, "query": QUERY},
                                    headers={"Authorization": f"Bearer {key}"},
                                )
                                lat[names[side]].append(time.perf_counter() - t0)
                                if resp.status_code != 200:
                                    errors.add(resp.text)

                        load = os.getloadavg()[0]
                        cpu = CpuShare()
                        await asyncio.gather(*(one_client(p, lat, todo) for _ in range(clients)))
                        for side in names:
                            print(line(f"{side}, pass {p}", lat[side], f"  load {load:.1f}"), flush=True)
                        print(f"    {args.http_client} {cpu.report(len(group))}", flush=True)
            finally:
                for a in apis:
                    await a.aclose()
        print(f"\nfailed requests: {errors.count}")
        for s in errors.samples:
            print("  e.g.", s)
        print(f"load after: {os.getloadavg()}")
        if errors.count:
            raise SystemExit(1)
    finally:
        stop_stack(stack)


if __name__ == "__main__":
    asyncio.run(main())
