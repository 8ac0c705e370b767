"""RLS-filtered realtime: commit-to-client latency for end-user subscribers vs API-key subscribers.

One invocation starts an embedded PostgreSQL and S3, a Fluxbase API and realtime service, and
on one RLS-protected table (`owner = auth.uid() OR owner = 'all'`) measures p50/p99
commit-to-client latency while writing --rate single-row commits/s, for each subscriber count
in --counts:
  - API-key subscribers (admin keys: no filtering, the same bytes to every socket),
  - read-key subscribers and rows anyone may see ('all'): since read keys are checked as the
    read role (grants and policies, anonymous identity), one check per batch for all of them,
  - end-user subscribers (realtime tokens with a distinct authUid each) and rows every user may
    see ('all'): the same deliveries as the API-key run, plus one RLS check per distinct user
    per batch,
  - end-user subscribers and rows owned by one user each (round robin): each commit reaches one
    subscriber, but every batch is still checked for every user.
Ratios are against the API-key run with the same subscriber count. Besides latency, each run
prints the realtime process's CPU time per commit, which a busy machine disturbs less than
latency. Writers use asyncpg directly (as the project's admin role), so only the delivery path
differs.

    .venv/bin/python bench/rls_realtime.py [--counts 100,1000] [--rate 20] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.devstack.procs import free_port  # noqa: E402
from fluxbase.security.roles import role_name, role_password  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

MARK = '"v": "'  # the record is jsonb text


async def open_subscribers(url: str, pid: str, tokens: list[str]) -> list[ClientConnection]:
    async def one(token: str) -> ClientConnection:
        ws = await connect(f"{url}/?token={token}", max_queue=None, ping_interval=None)
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
        return ws

    socks: list[ClientConnection] = []
    for i in range(0, len(tokens), 50):
        socks += await asyncio.gather(*(one(t) for t in tokens[i : i + 50]))
    return socks


def value_of(raw: str) -> str | None:
    """The row's `v` without parsing the JSON (the client must keep up with 1 000 sockets)."""
    if '"db_event"' not in raw:
        return None
    i = raw.find(MARK)
    return raw[i + len(MARK) : raw.index('"', i + len(MARK))] if i >= 0 else None


async def latency(
    socks: list[ClientConnection], writer: asyncpg.Connection, rate: float, seconds: float, owners: list[str]
) -> tuple[list[float], int]:
    """Insert rows at `rate`; each row's owner is owners[i % len(owners)]. → latencies, expected."""
    total = int(rate * seconds)
    values = [f"m{i}" for i in range(total)]
    # Who must receive which value: with per-user rows only the owner's socket does.
    per_user = len(owners) > 1
    expect = [total // len(socks) + (1 if k < total % len(socks) else 0) for k in range(len(socks))]
    if not per_user:
        expect = [total] * len(socks)
    sent: dict[str, float] = {}
    lat: list[float] = []

    async def reader(ws: ClientConnection, n: int) -> None:
        got = 0
        while got < n:
            raw = await ws.recv()
            assert isinstance(raw, str)
            v = value_of(raw)
            if v is None:
                continue
            got += 1
            now = time.perf_counter()
            lat.append(now - sent[v])

    tasks = [asyncio.create_task(reader(ws, n)) for ws, n in zip(socks, expect, strict=True)]
    start = time.perf_counter()
    for i, v in enumerate(values):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        sent[v] = time.perf_counter()  # set before the commit: the reader may see it first
        await writer.execute("INSERT INTO docs (owner, v) VALUES ($1, $2)", owners[i % len(owners)], v)
        sent[v] = time.perf_counter()  # the commit has returned
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return lat, sum(expect)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="100,1000", help="subscriber counts, comma-separated")
    ap.add_argument("--rate", type=float, default=20.0, help="commits per second")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--no-fsync", action="store_true", help="run PostgreSQL with fsync off (test settings)")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-rls-bench-"))
    stack = start_stack(tmp, durable=not args.no_fsync)
    try:
        dbname = await stack.create_database()
        api_port, rt_port = free_port(), free_port()
        env = stack.env(
            dbname,
            FLUXBASE_API_PORT=str(api_port),
            FLUXBASE_REALTIME_PORT=str(rt_port),
            FLUXBASE_RATE_LIMIT_REQUESTS="100000000",
            FLUXBASE_REALTIME_QUEUE_SIZE="5000",
            FLUXBASE_TENANT_CONNECTION_LIMIT="100",
        )
        with run_service(["api"], env, api_port, tmp), run_service(["realtime"], env, rt_port, tmp) as rt:
            api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
            await api.post(
                "/api/auth/register", json={"email": "b@example.com", "password": "bench password"}
            )
            tok = (
                await api.post(
                    "/api/auth/login", json={"email": "b@example.com", "password": "bench password"}
                )
            ).json()
            h = {"Authorization": f"Bearer {tok['token']}"}
            pid = (await api.post("/api/projects", json={"name": "rls"}, headers=h)).json()["project"]["id"]
            key = (
                await api.post(
                    f"/api/projects/{pid}/api-keys", json={"name": "k", "scope": "admin"}, headers=h
                )
            ).json()["key"]
            kh = {"Authorization": f"Bearer {key}"}
            read_key = (
                await api.post(
                    f"/api/projects/{pid}/api-keys", json={"name": "r", "scope": "read"}, headers=h
                )
            ).json()["key"]
            r = await api.post(
                "/api/execute-sql",
                json={
                    "projectId": pid,
                    "query": "CREATE TABLE docs (id bigserial PRIMARY KEY, owner text, v text)",
                },
                headers=kh,
            )
            assert r.json()["success"], r.text
            r = await api.post(
                f"/api/projects/{pid}/rls/policies",
                json={
                    "table": "docs",
                    "name": "own or all",
                    "command": "SELECT",
                    "using": "owner = auth.uid() OR owner = 'all'",
                },
                headers=kh,
            )
            assert r.status_code == 201, r.text
            r = await api.post(f"/api/projects/{pid}/rls/tables/docs", json={"enabled": True}, headers=kh)
            assert r.status_code == 200, r.text

            async def user_token(uid: str) -> str:
                r = await api.post("/api/realtime/token", json={"projectId": pid, "authUid": uid}, headers=kh)
                return str(r.json()["token"])

            role = role_name(pid, "admin")
            assert stack.pg is not None
            dsn = f"postgresql://{role}:{role_password(stack.secret_key, role)}@127.0.0.1:{stack.pg.port}/{dbname}"
            writer = await asyncpg.connect(dsn)
            url = f"ws://127.0.0.1:{rt_port}"
            cores = Path("/proc/cpuinfo").read_text().count("processor")
            print(
                f"\nRLS realtime on {cores} cores, PostgreSQL fsync {'off' if args.no_fsync else 'on'}, "
                f"{args.rate:.0f} commits/s for {args.seconds:.0f} s per run"
            )
            for n in counts:
                users = [f"user-{i}" for i in range(n)]
                tokens: list[str] = []
                for i in range(0, n, 50):
                    tokens += await asyncio.gather(*(user_token(u) for u in users[i : i + 50]))
                results: dict[str, tuple[float, float, float]] = {}
                for label, creds, owners in (
                    ("api keys", [key] * n, ["all"]),
                    ("read keys, shared rows", [read_key] * n, ["all"]),
                    ("end users, shared rows", tokens, ["all"]),
                    ("end users, own rows", tokens, users),
                ):
                    socks = await open_subscribers(url, pid, creds)
                    await asyncio.sleep(0.5)
                    cpu0 = cpu_s(rt.proc.pid)
                    lat, expected = await latency(socks, writer, args.rate, args.seconds, owners)
                    cpu = (cpu_s(rt.proc.pid) - cpu0) * 1000 / int(args.rate * args.seconds)
                    assert len(lat) == expected, (len(lat), expected)
                    p50, p99 = pct(lat, 0.5), pct(lat, 0.99)
                    results[label] = (p50, p99, cpu)
                    base = results["api keys"]
                    ratio = (
                        ""
                        if label == "api keys"
                        else f"  p99 x{p99 / base[1]:.1f}, cpu x{cpu / base[2]:.1f} of api keys"
                    )
                    print(
                        f"{n:>5} subscribers  {label:<24} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms"
                        f"  realtime cpu {cpu:6.2f} ms/commit  ({len(lat)} deliveries){ratio}"
                    )
                    await asyncio.gather(*(ws.close() for ws in socks))
            await writer.close()
            await api.aclose()
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
