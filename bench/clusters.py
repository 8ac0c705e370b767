"""What a project on a registered cluster costs against one on the default cluster.

One invocation: an embedded PostgreSQL and S3 (the control plane), a second embedded PostgreSQL
(cluster two), a Fluxbase API; registers cluster two (timing verification + installation), then
creates one project on each cluster and issues the same point SELECT through /api/execute-sql
sequentially, alternating between the two so machine load cancels out. Prints p50/p99 per
cluster and the ratio. A project on a registered cluster pays one uncached control-plane key
lookup per request (its in-transaction key guard cannot run there).

    .venv/bin/python bench/clusters.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import asyncpg  # noqa: E402

from fluxbase.devstack.postgres import EmbeddedPostgres  # noqa: E402
from fluxbase.devstack.procs import free_port  # noqa: E402
from support import Api, bearer, run_service, start_stack, stop_stack  # noqa: E402


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def main(requests: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fx-bench-clusters-"))
    stack = start_stack(tmp / "stack")
    pg2 = EmbeddedPostgres(tmp / "pg2", free_port(), durable=False, max_connections=100)
    pg2.init()
    pg2.start()
    try:
        conn = await asyncpg.connect(pg2.url)
        await conn.execute("CREATE DATABASE cluster_two")
        await conn.close()
        dbname = await stack.create_database()
        port = free_port()
        env = stack.env(dbname, FLUXBASE_API_PORT=str(port))
        (tmp / "logs").mkdir()
        with run_service(["api"], env, port, tmp / "logs") as server:
            api = Api(server.url)
            admin = await api.register(email="root@example.com")
            admin_token = await api.login(admin["email"], admin["password"])
            url = f"postgresql://postgres:{quote(pg2.password, safe='')}@127.0.0.1:{pg2.port}/cluster_two"
            t0 = time.perf_counter()
            r = await api.http.post(
                "/api/admin/clusters",
                json={"label": "two", "connectionString": url},
                headers=bearer(admin_token),
            )
            register_s = time.perf_counter() - t0
            assert r.status_code == 201, r.text
            cid = r.json()["cluster"]["id"]
            r = await api.http.get(f"/api/admin/clusters/{cid}/connection", headers=bearer(admin_token))
            check_ms = r.json()["connection"]["latencyMs"]
            projects = {}
            for where in ("default", cid):
                r = await api.http.post(
                    "/api/projects", json={"name": where, "clusterId": where}, headers=bearer(admin_token)
                )
                assert r.status_code == 201, r.text
                pid = r.json()["project"]["id"]
                key = await api.new_key(admin_token, pid, "admin", rateLimitRequests=10_000_000)
                await api.sql(key, pid, "CREATE TABLE t (id int PRIMARY KEY, v text)")
                await api.sql(key, pid, "INSERT INTO t VALUES (1, 'x')")
                projects[where] = (pid, key)
            times: dict[str, list[float]] = {"default": [], cid: []}
            for _ in range(20):  # warm both pools
                for pid, key in projects.values():
                    await api.sql(key, pid, "SELECT v FROM t WHERE id = $1", [1])
            for _ in range(requests):
                for where, (pid, key) in projects.items():
                    t = time.perf_counter()
                    r = await api.sql(key, pid, "SELECT v FROM t WHERE id = $1", [1])
                    times[where].append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200
            await api.close()
        load = os.getloadavg()
        d, c = times["default"], times[cid]
        print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2 cores)")
        print(f"register cluster (verify + install migrations): {register_s:.2f} s; live check {check_ms} ms")
        print(f"{'cluster':<10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for name, v in (("default", d), ("two", c)):
            print(f"{name:<10} {_pct(v, 0.5):8.2f} {_pct(v, 0.99):8.2f} {statistics.mean(v):8.2f}")
        print(
            f"ratio two/default: p50 {_pct(c, 0.5) / _pct(d, 0.5):.2f}, mean {statistics.mean(c) / statistics.mean(d):.2f}"
        )
    finally:
        pg2.stop("immediate")
        stop_stack(stack)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    asyncio.run(main(parser.parse_args().requests))
