"""What the shared rate limit costs per request (issue 19, "replicas that agree").

One invocation: starts an embedded PostgreSQL, applies the migrations, then times `hit()` of
  * local: `RateLimiter` (the in-process sliding window, one process alone),
  * shared: `SharedRateLimiter` (leases from `fluxbase.rate_leases`, sql/0038), for a limit of
    1 000 000 per 10 s (slices of 1 000 tokens: the SQL hot path's keys) and, separately, for
    the documented 50 per 10 s (one token per lease: a round trip per allowed request),
  * shared, two replicas: two SharedRateLimiter instances on separate pools spending one name
    alternately (what two API processes do),
in the same run, several rounds in turn, and prints µs/request, the round trips per request
and each ratio to the local limiter. The database runs on this machine.

    .venv/bin/python bench/ratelimit.py [--requests 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.db.migrate import migrate  # noqa: E402
from fluxbase.errors import RateLimited  # noqa: E402
from fluxbase.ratelimit import RateLimiter, SharedRateLimiter  # noqa: E402
from support import start_stack, stop_stack  # noqa: E402


async def time_local(n: int, limit: int) -> float:
    lim = RateLimiter()
    t0 = time.perf_counter()
    for i in range(n):
        lim.hit("key:bench", limit, 10, now=i * 1e-6)  # (the window never fills)
    return (time.perf_counter() - t0) / n * 1e6


async def time_shared(
    limiters: list[SharedRateLimiter], name: str, n: int, limit: int
) -> tuple[float, float, int]:
    """µs/request, round trips per request, requests refused."""
    trips0 = sum(x.round_trips for x in limiters)
    refused = 0
    t0 = time.perf_counter()
    for i in range(n):
        try:
            await limiters[i % len(limiters)].hit(name, limit, 10)
        except RateLimited:
            refused += 1
    us = (time.perf_counter() - t0) / n * 1e6
    return us, (sum(x.round_trips for x in limiters) - trips0) / n, refused


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-ratelimit-"))
    stack = start_stack(tmp)
    try:
        dbname = await stack.create_database()
        url = stack.database_url(dbname)
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        pools = [await asyncpg.create_pool(url, min_size=1, max_size=2) for _ in range(2)]
        one = SharedRateLimiter(pools[0])
        two = [SharedRateLimiter(pools[0]), SharedRateLimiter(pools[1])]
        n = args.requests
        with open("/proc/loadavg") as f:
            print(
                f"\n{n} requests per run, {args.rounds} rounds, cores={os.cpu_count()}, load {f.read().split()[:3]}"
            )
        rows: dict[str, list[tuple[float, float, int]]] = {}
        for r in range(args.rounds):
            big = 1_000_000_000  # never fills within a run: every request is allowed
            rows.setdefault("local", []).append((await time_local(n, big), 0.0, 0))
            rows.setdefault("shared, 1 replica", []).append(await time_shared([one], f"key:one:{r}", n, big))
            rows.setdefault("shared, 2 replicas", []).append(await time_shared(two, f"key:two:{r}", n, big))
            # The documented 50 per 10 s: a lease per allowed request; refusals are remembered.
            rows.setdefault("shared 50/10s, 2 replicas (2000 req)", []).append(
                await time_shared(two, f"key:small:{r}", 2000, 50)
            )
        local = sorted(x[0] for x in rows["local"])[len(rows["local"]) // 2]
        print(f"{'limiter':<40} {'us/request':>10} {'trips/req':>10} {'refused':>8}  ratio to local")
        for name, runs in rows.items():
            us, trips, refused = sorted(runs)[len(runs) // 2]
            spread = f"({min(x[0] for x in runs):.2f}-{max(x[0] for x in runs):.2f})"
            print(f"{name:<40} {us:>10.2f} {trips:>10.4f} {refused:>8}  {us / local:6.1f}x {spread}")
        for p in pools:
            await p.close()
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
