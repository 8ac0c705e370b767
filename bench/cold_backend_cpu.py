"""CPU of a cold project's first request, this checkout against another git revision (issue 19).

Latency on 2 shared cores moves with everyone's load; CPU per request much less. This provisions
one project through an API process of this checkout, then alternates worker processes of this
checkout ("new") and of --base ("base": its platform/ exported with `git archive`, first on
PYTHONPATH), one request at a time, new and base in turn: each opens a new connection of the
project's admin pool (TenantPools, as the API does), runs one request on the one-round-trip
path on it, and reads
what that cost: the new backend's CPU from /proc/<pid>/schedstat (its start-up, the
connection's setup and the first request; not its exit), and the worker's own CPU
(asyncpg.connect, the setup, the request: the API process's share). Prints the medians per
round (--n requests a side) and overall.

    .venv/bin/python bench/cold_backend_cpu.py --base main --rounds 6 --n 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

QUERY = "SELECT 1 AS one"


def schedstat_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


async def worker(env_file: str, project: str) -> None:
    import asyncpg

    from fluxbase.config import load_settings
    from fluxbase.tenancy import session
    from fluxbase.tenancy.pools import TenantPools

    env = json.loads(Path(env_file).read_text())
    settings = load_settings(env)
    control = await asyncpg.create_pool(env["FLUXBASE_DATABASE_URL"], min_size=1, max_size=2)
    req = session.TenantRequest(
        project_id=project,
        scope="admin",
        identity=session.Identity(None, {"role": "admin", "project_id": project}, "admin"),
        limits=session.Limits(deadline_s=10, max_rows=100, max_bytes=1 << 20, acquire_timeout_s=5),
    )
    pools = TenantPools(settings, max_size=1, control=control)
    try:
        for _ in sys.stdin:  # one cold first request per line: its new backend's CPU and ours
            cpu0 = time.process_time()
            res = await session.one_round_trip(pools, control, req, QUERY, [], "SELECT")
            res.result()
            cpu = time.process_time() - cpu0
            pool = await pools.pool(project, "admin")
            conn = await pool.acquire()
            backend = schedstat_ns(conn.get_server_pid()) / 1e6
            await pool.release(conn)
            pool.discard_idle()  # the next request opens a new connection
            print(json.dumps([backend, cpu * 1000]), flush=True)
    finally:
        await pools.close()
        await control.close()


async def main() -> None:
    import httpx
    from many_projects import Errors, provision

    from fluxbase.devstack.procs import free_port
    from support import run_service, start_stack, stop_stack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main")
    ap.add_argument("--rounds", type=int, default=6, help="alternating worker runs per side")
    ap.add_argument("--n", type=int, default=40, help="new connections per worker run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-cpu-"))
    base = tmp / "base"
    base.mkdir()
    archive = subprocess.run(  # noqa: ASYNC221 (nothing else runs yet)
        ["git", "-C", str(ROOT), "archive", args.base, "platform"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)  # noqa: ASYNC221
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        port = free_port()
        env = stack.env(dbname, FLUXBASE_API_PORT=str(port), FLUXBASE_LOG_LEVEL="warning")
        with run_service(["api"], env, port, tmp) as svc:
            async with httpx.AsyncClient(base_url=svc.url, timeout=60) as api:
                email = "cpu@example.com"
                await api.post("/api/auth/register", json={"email": email, "password": "bench password 1"})
                r = await api.post("/api/auth/login", json={"email": email, "password": "bench password 1"})
                ids, _ = await provision(api, r.json()["token"], 1, 1, Errors())
        env_file = tmp / "env.json"
        env_file.write_text(json.dumps(env))
        out: dict[str, dict[str, list[float]]] = {s: {"backend": [], "client": []} for s in ("new", "base")}
        procs = {}
        for side in ("new", "base"):
            wenv = {**os.environ}
            if side == "base":
                wenv["PYTHONPATH"] = str(base / "platform")
            procs[side] = subprocess.Popen(  # noqa: ASYNC220 (the workers are driven in lockstep)
                [sys.executable, __file__, "--worker", str(env_file), ids[0]],
                env=wenv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        print(
            f"\nCold first request CPU, {args.rounds} rounds of {args.n} new connections per side, "
            f"alternating new/base connection by connection (--base {args.base}):"
        )
        try:
            for rnd in range(args.rounds):
                load = os.getloadavg()[0]
                got: dict[str, dict[str, list[float]]] = {s: {"backend": [], "client": []} for s in procs}
                for i in range(2 * args.n):
                    side = ("new", "base")[(i + rnd) % 2]
                    proc = procs[side]
                    assert proc.stdin is not None and proc.stdout is not None
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    backend, client = json.loads(proc.stdout.readline())
                    got[side]["backend"].append(backend)
                    got[side]["client"].append(client)
                for side in ("new", "base"):
                    for k in ("backend", "client"):
                        out[side][k] += got[side][k]
                    print(
                        f"  round {rnd} {side:<4} backend p50 {statistics.median(got[side]['backend']):5.2f} ms   "
                        f"API side p50 {statistics.median(got[side]['client']):5.2f} ms   load {load:.1f}",
                        flush=True,
                    )
        finally:
            for proc in procs.values():
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(30)
        for k, what in (("backend", "new backend"), ("client", "API side (connect, setup, request)")):
            a, b = statistics.median(out["new"][k]), statistics.median(out["base"][k])
            print(f"  {what:<38} base {b:5.2f} ms -> new {a:5.2f} ms  (ratio {a / b:.2f})")
        print(f"load after: {os.getloadavg()}")
    finally:
        stop_stack(stack)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        asyncio.run(worker(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(main())
