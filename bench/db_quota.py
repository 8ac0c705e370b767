"""Cost of the database-size quota check (fluxbase_guard.check_db_quota) on the write path.

One invocation: starts an embedded PostgreSQL and S3 and a Fluxbase API, creates two projects
(A without a cap, B with a cap far above its size and `--tables` extra tables with an index
each, since measuring the schema walks every relation). Then:

1. Logged in as each project's own admin role, exactly as the API is, sequential transactions
   in interleaved rounds (what one measured transaction costs):

     baseline      BEGIN; INSERT; COMMIT                       the commit without any check
     uncapped      BEGIN; INSERT; SELECT check(); COMMIT        on A: returns after one lookup
     capped        BEGIN; INSERT; SELECT check(); COMMIT        on B: the schema is measured
     capped read   BEGIN; SELECT; SELECT check(); COMMIT        on B: no xid, returns at once

2. INSERTs through POST /api/execute-sql with 8 clients on A (never checked) and on B (far
   below its cap: measured about once per 2 s per API process, see services/quota.py).

Prints tx/s, µs per transaction and the ratio to the baseline of the same run.

    .venv/bin/python bench/db_quota.py [--transactions 2000] [--rounds 3] [--tables 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from sql_throughput import http_load, post  # noqa: E402

from fluxbase.devstack.procs import free_port  # noqa: E402
from fluxbase.security.roles import role_name, role_password  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

CHECK = "SELECT fluxbase_guard.check_db_quota(); "


async def run_variant(conn: asyncpg.Connection, body: str, n: int) -> float:
    """Seconds for n sequential transactions of `BEGIN; <body> COMMIT` (one round trip each)."""
    script = f"BEGIN; {body} COMMIT"
    t0 = time.perf_counter()
    for _ in range(n):
        await conn.execute(script)
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transactions", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tables", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=5.0, help="per HTTP run")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        port = free_port()
        env = stack.env(dbname, FLUXBASE_API_PORT=str(port), FLUXBASE_RATE_LIMIT_REQUESTS="100000000")
        with run_service(["api"], env, port, tmp) as server:
            api = httpx.Client(base_url=server.url, timeout=60)
            email = f"bench-{secrets.token_hex(4)}@example.com"
            api.post("/api/auth/register", json={"email": email, "password": "bench password 1"})
            login = api.post("/api/auth/login", json={"email": email, "password": "bench password 1"})
            h = {"Authorization": f"Bearer {login.json()['token']}"}
            pids, keys = [], []
            for name in ("uncapped", "capped"):
                pid = api.post("/api/projects", json={"name": name}, headers=h).json()["project"]["id"]
                key = api.post(
                    f"/api/projects/{pid}/api-keys", json={"name": "b", "scope": "admin"}, headers=h
                ).json()["key"]
                sql = ["CREATE TABLE t (id bigserial PRIMARY KEY, v text)"]
                if name == "capped":
                    sql += [
                        f"CREATE TABLE extra_{i} (id int PRIMARY KEY, v text)" for i in range(args.tables)
                    ]
                for q in sql:
                    r = api.post(
                        "/api/execute-sql",
                        json={"projectId": pid, "query": q},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    assert r.json()["success"], r.text
                pids.append(pid)
                keys.append(key)
            # The login account is the first, so the instance admin: set B's cap (1 GiB).
            r = api.patch(f"/api/admin/projects/{pids[1]}/quotas", json={"databaseBytes": 1 << 30}, headers=h)
            assert r.status_code == 200, r.text

            parts = urlsplit(stack.database_url(dbname))
            conns = []
            for pid in pids:
                role = role_name(pid, "admin")
                conns.append(
                    await asyncpg.connect(
                        host=parts.hostname,
                        port=parts.port,
                        database=dbname,
                        user=role,
                        password=role_password(stack.secret_key, role),
                    )
                )
            insert = "INSERT INTO t (v) VALUES ('x');"
            variants = [
                ("baseline", conns[0], insert),
                ("uncapped", conns[0], insert + " " + CHECK),
                ("capped", conns[1], insert + " " + CHECK),
                ("capped read", conns[1], "SELECT count(*) FROM t WHERE id = 1; " + CHECK),
            ]
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for name, conn, body in variants:
                    s = await run_variant(conn, body, args.transactions)
                    best[name] = min(best.get(name, s), s)
            print(
                f"\nSequential transactions as the tenant admin role, {args.transactions} x best of "
                f"{args.rounds}; capped project has {args.tables + 1} tables"
            )
            base = best["baseline"]
            for name, _, _ in variants:
                s = best[name]
                us = s / args.transactions * 1e6
                print(
                    f"{name:<12} {args.transactions / s:>8.0f} tx/s  {us:7.1f} µs/tx  "
                    f"{us - base / args.transactions * 1e6:+7.1f} µs  ratio {base / s:6.2%}"
                )
            for conn in conns:
                await conn.close()

            print(f"\nINSERT through /api/execute-sql, 8 clients, {args.seconds:.0f}s each")
            rates = []
            for pid, key, label in zip(pids, keys, ("uncapped", "capped"), strict=True):
                body = json.dumps({"projectId": pid, "query": "INSERT INTO t (v) VALUES ('x')"}).encode()
                request = post("/api/execute-sql", port, body, {"Authorization": f"Bearer {key}"})
                await http_load("127.0.0.1", port, request, 8, 1.0, b'"success":true')
                res = await http_load("127.0.0.1", port, request, 8, args.seconds, b'"success":true')
                res.name = label
                rates.append(res.rps)
                print(res.line())
            print(f"  capped / uncapped = {rates[1] / rates[0]:.2%}")
            api.close()
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
