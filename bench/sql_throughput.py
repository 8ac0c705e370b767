"""Point-SELECT throughput and latency through /api/execute-sql vs. asyncpg directly.

One invocation: starts an embedded PostgreSQL and S3, a Fluxbase API (`fluxbase api`), creates a
project with one row, then measures at 8 and 32 concurrent clients:
  * held: the same SELECT issued straight through asyncpg on connections each client holds for
    the whole run (no reset between queries: the limit),
  * pool: the same SELECT through asyncpg's pool as its documentation uses it
    (`pool.fetchrow`: acquire, query, release; release resets the session, so two round trips),
    the baseline that does the per-request isolation work Fluxbase does,
  * fluxbase: POST /api/execute-sql over keep-alive HTTP/1.1, once per server variant of
    --servers (HTTP server and worker processes; `api` is `fluxbase api` as shipped, whose
    uvicorn protocol answers the route itself (fluxbase.http.protocol); the others serve the
    same ASGI factory under that server, so `uvicorn:1` is the ASGI path on the same server),
  * fluxbase xN (optional, --replicas N): N `fluxbase api` processes on N ports, each loaded by
    its own generator with 1/N of the clients at once (their req/s summed),
  * postgraphile (optional, --postgraphile): PostGraphile 4 serving the same row over GraphQL,
  * minimal (optional, --minimal): a bare ASGI app over asyncpg (bench/minimal_app.py: no auth,
    no transaction, no reset) under each variant's server and workers: the floor of that server.
The HTTP load comes from `wrk` (Debian's package, one thread, bench/wrk_post.lua) when it is
installed, else from the Python generator below; `--cross-check` measures Fluxbase with the
Python generator as well. Next to each HTTP result: the generator's and the server's CPU share
(% of one core, from /proc/<pid>/stat), and per client count the load average (`uptime`).
Prints req/s, p50/p99 latency and the ratios. Everything runs on this machine.

    .venv/bin/python bench/sql_throughput.py [--seconds 8] [--servers api,uvicorn:2,granian:1]
        [--rounds 3] [--postgraphile] [--minimal] [--generator wrk|python] [--cross-check] [--socket]
        [--pool-max N] [--tail] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.devstack.procs import free_port, stop_process  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

QUERY = "SELECT id, name, email FROM bench_users WHERE id = $1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The embedded postmaster's pid (main sets it): its tree's CPU is the database's per request.
DB_PID: int | None = None
WRK_SCRIPT = ROOT / "bench" / "wrk_post.lua"


class Result:
    def __init__(self, name: str, clients: int, latencies: list[float], seconds: float, errors: int):
        self.name, self.clients, self.errors = name, clients, errors
        self.rps = len(latencies) / seconds
        lat = sorted(latencies)
        self.p50 = lat[len(lat) // 2] * 1000 if lat else float("nan")
        self.p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else float("nan")
        self.gen_cpu: float | None = None  # % of one core: the load generator
        self.server_cpu: float | None = None  # % of one core: the server's process tree
        self.db_cpu: float | None = None  # % of one core: PostgreSQL (the postmaster's tree)

    def per_request(self, share: float | None) -> float:
        """µs of CPU per request of a share (% of one core) measured over the run."""
        return share / 100 / self.rps * 1e6 if share is not None and self.rps else 0.0

    def total_us(self) -> float:
        """CPU per request of everything the target needs on this machine: server (or client),
        database and load generator."""
        return (
            self.per_request(self.server_cpu) + self.per_request(self.db_cpu) + self.per_request(self.gen_cpu)
        )

    def line(self) -> str:
        cpu = ""
        if self.gen_cpu is not None:
            cpu = f"   generator CPU {self.gen_cpu:4.0f}%"
        if self.server_cpu is not None:
            cpu += f"   server CPU {self.server_cpu:4.0f}% ({self.per_request(self.server_cpu):4.0f} us/req)"
        if self.db_cpu is not None:
            cpu += f"   database {self.per_request(self.db_cpu):4.0f} us/req"
        return (
            f"{self.name:<24} clients={self.clients:<3} {self.rps:>8.0f} req/s   p50 {self.p50:6.2f} ms   "
            f"p99 {self.p99:6.2f} ms   errors {self.errors}{cpu}"
        )


def _stat_ticks(pid: int) -> tuple[int, int]:
    """(ppid, utime + stime + cutime + cstime in clock ticks) of one process: its own CPU and
    that of its children it has waited for (a PostgreSQL backend that exits during a round stays
    counted in the postmaster's, instead of its ticks leaving the tree's sum)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree_cpu_ticks(root: int) -> int:
    """CPU ticks of a process and all its descendants (server workers), the exited ones that
    were waited for included."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry)], ticks[int(entry)] = _stat_ticks(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


async def http_load(
    host: str, port: int, request: bytes, clients: int, seconds: float, check: bytes
) -> Result:
    """Keep-alive HTTP/1.1 clients on raw asyncio streams in this process (the cross-check)."""
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

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    result = Result("", clients, latencies, elapsed, errors)
    result.gen_cpu = 100 * (time.process_time() - cpu0) / elapsed
    return result


def wrk_load(port: int, target: Target, clients: int, seconds: float) -> Result:
    """`wrk -t1` with bench/wrk_post.lua; CPU share from /proc/<pid>/stat of wrk itself, read
    after it exited and before it is reaped."""
    env = {**os.environ, "WRK_BODY": target.body.decode(), "WRK_HEADERS": "\n".join(target.headers)}
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(WRK_SCRIPT)]
    proc = subprocess.Popen(
        [*cmd, f"http://127.0.0.1:{port}{target.path}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    t0 = time.perf_counter()
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    elapsed = time.perf_counter() - t0
    _, ticks = _stat_ticks(proc.pid)
    proc.wait()
    found = re.search(r"^WRKJSON (.*)$", out, re.M)
    if found is None:
        raise SystemExit(f"wrk gave no result:\n{out}")
    data = json.loads(found.group(1))
    result = Result("", clients, [], data["seconds"], data["errors"])
    result.rps = data["requests"] / data["seconds"]
    result.p50, result.p99 = data["p50_us"] / 1000, data["p99_us"] / 1000
    result.gen_cpu = 100 * ticks / CLK_TCK / elapsed
    return result


@dataclass
class Target:
    path: str
    body: bytes
    headers: list[str]
    check: bytes

    def raw(self, port: int) -> bytes:
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Content-Type: application/json",
            f"Content-Length: {len(self.body)}",
            *self.headers,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


@dataclass
class Server:
    """One HTTP server process (tree) under measurement."""

    label: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    # --replicas 2: further API processes on their own ports, loaded at the same time (the
    # clients split evenly, one generator per replica); req/s and CPU are their sums.
    peers: list[Server] = field(default_factory=list)


async def measure_http(
    server: Server, target: Target, clients: int, seconds: float, generator: str, warmup: float = 1.0
) -> Result:
    if server.peers:
        return await measure_replicas(server, target, clients, seconds, generator, warmup)
    if generator == "wrk":
        await asyncio.to_thread(wrk_load, server.port, target, clients, warmup)
    else:
        await http_load("127.0.0.1", server.port, target.raw(server.port), clients, warmup, target.check)
    cpu0 = tree_cpu_ticks(server.proc.pid) if server.proc is not None else 0
    db0 = tree_cpu_ticks(DB_PID) if DB_PID is not None else 0
    t0 = time.perf_counter()
    if generator == "wrk":
        result = await asyncio.to_thread(wrk_load, server.port, target, clients, seconds)
    else:
        result = await http_load(
            "127.0.0.1", server.port, target.raw(server.port), clients, seconds, target.check
        )
    elapsed = time.perf_counter() - t0
    if server.proc is not None:
        result.server_cpu = 100 * (tree_cpu_ticks(server.proc.pid) - cpu0) / CLK_TCK / elapsed
    if DB_PID is not None:
        result.db_cpu = 100 * (tree_cpu_ticks(DB_PID) - db0) / CLK_TCK / elapsed
    result.name = server.label
    return result


async def measure_replicas(
    server: Server, target: Target, clients: int, seconds: float, generator: str, warmup: float
) -> Result:
    """`server` and its peers loaded at once, `clients` split evenly among them."""
    group = [server, *server.peers]
    share = [clients // len(group) + (i < clients % len(group)) for i in range(len(group))]
    solo = [Server(s.label, s.port, s.proc) for s in group]
    results = await asyncio.gather(
        *(measure_http(s, target, c, seconds, generator, warmup) for s, c in zip(solo, share, strict=True))
    )
    total = Result(server.label, clients, [], 1.0, sum(r.errors for r in results))
    total.rps = sum(r.rps for r in results)
    total.p50 = max(r.p50 for r in results)  # the slower replica's
    total.p99 = max(r.p99 for r in results)
    total.gen_cpu = sum(r.gen_cpu or 0.0 for r in results)
    total.server_cpu = sum(r.server_cpu or 0.0 for r in results)
    # (each replica's run read the whole database's CPU over the same seconds)
    total.db_cpu = results[0].db_cpu
    return total


async def asyncpg_load(url: str, clients: int, seconds: float, *, per_query_pool: bool) -> Result:
    """The query straight through asyncpg: on a connection each client holds for the whole run
    ("held"), or through the pool per query ("pool": acquire, fetch, release, which runs the
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

    cpu0 = time.process_time()
    db0 = tree_cpu_ticks(DB_PID) if DB_PID is not None else 0
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    db1 = tree_cpu_ticks(DB_PID) if DB_PID is not None else 0
    await pool.close()
    result = Result("asyncpg pool" if per_query_pool else "asyncpg held", clients, latencies, elapsed, 0)
    result.server_cpu = 100 * (time.process_time() - cpu0) / elapsed  # the client is the "server"
    if DB_PID is not None:
        result.db_cpu = 100 * (db1 - db0) / CLK_TCK / elapsed
    return result


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


def server_command(server: str, workers: int, app: str, port: int, *, factory: bool) -> list[str]:
    """The command serving ASGI `app` ("module:attr") with `server` (uvicorn or granian)."""
    if server == "uvicorn":
        cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--workers", str(workers), "--log-level", "warning", "--no-access-log"]
        return cmd + (["--factory"] if factory else [])
    if server == "granian":
        if importlib.util.find_spec("granian") is None:
            raise SystemExit(
                "granian is not installed (not a Fluxbase dependency): .venv/bin/pip install granian"
            )
        cmd = [sys.executable, "-m", "granian", app, "--interface", "asgi", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
        cmd += ["--no-access-log", "--no-ws"]
        return cmd + (["--factory"] if factory else [])
    raise SystemExit(f"unknown server {server!r} (uvicorn, granian)")


def start_server(cmd: list[str], env: dict[str, str], probe: Target, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT / "bench"
    )
    deadline = time.monotonic() + 180  # a loaded machine starts a server slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
        try:
            headers = dict(h.split(": ", 1) for h in probe.headers)
            r = httpx.post(
                f"http://127.0.0.1:{port}{probe.path}", content=probe.body, headers=headers, timeout=2
            )
            if r.status_code == 200 and probe.check in r.content:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise SystemExit(f"{' '.join(cmd)} did not answer")


async def start_replicas(
    args: argparse.Namespace,
    env: dict[str, str],
    first: subprocess.Popen[bytes],
    port: int,
    probe: Target,
    procs: list[subprocess.Popen[bytes]],
) -> Server:
    """The shipped API plus `--replicas - 1` more `fluxbase api` processes on the same database."""
    group = Server(f"fluxbase api:{args.workers} x{args.replicas}", port, first)
    for _ in range(args.replicas - 1):
        peer = free_port()
        cmd = [sys.executable, "-m", "fluxbase", "api"]
        proc = await asyncio.to_thread(
            start_server, cmd, {**env, "FLUXBASE_API_PORT": str(peer)}, probe, peer
        )
        procs.append(proc)
        group.peers.append(Server(f"fluxbase api replica {len(group.peers) + 2}", peer, proc))
    return group


def print_tail(api: httpx.Client) -> None:
    """The `api` server's cumulative tenant-pool wait and execute-sql time buckets (since start)."""
    text = api.get("/metrics").text
    for line in text.splitlines():
        if line.startswith("fluxbase_tenant_pool_wait_seconds") or (
            line.startswith("fluxbase_http_request_duration_seconds") and "execute-sql" in line
        ):
            print("  " + line)


def parse_servers(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in spec.split(","):
        name, _, workers = item.strip().partition(":")
        out.append((name, int(workers or 1)))
    return out


@contextlib.contextmanager
def started(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            stop_process(proc, signal.SIGTERM)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def median(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


async def measure_all(
    args: argparse.Namespace,
    clients: int,
    direct_url: str,
    pg4: Server | None,
    gql: Target,
    apis: list[tuple[Server, Server | None]],
    sql: Target,
    minimal: Target,
) -> None:
    """Every target at `clients`, --rounds times in turn (so that load from elsewhere on the
    machine falls on all of them alike); prints each round's lines, then the medians (by req/s)
    and the ratios of the medians, with each ratio's range over the rounds."""
    runs: dict[str, list[Result]] = {}

    def keep(r: Result) -> None:
        runs.setdefault(r.name, []).append(r)
        if args.rounds > 1:
            print(f"  round {len(runs[r.name])}: {r.line()}")

    for _ in range(args.rounds):
        keep(await asyncpg_load(direct_url, clients, args.seconds, per_query_pool=False))
        keep(await asyncpg_load(direct_url, clients, args.seconds, per_query_pool=True))
        if pg4 is not None:
            keep(await measure_http(pg4, gql, clients, args.seconds, args.generator))
        for server, floor in apis:
            keep(await measure_http(server, sql, clients, args.seconds, args.generator))
            if args.cross_check and args.generator != "python":
                x = await measure_http(server, sql, clients, args.seconds, "python")
                x.name += " (python gen)"
                keep(x)
            if floor is not None and len(runs.get(floor.label, ())) < len(runs[server.label]):
                keep(await measure_http(floor, minimal, clients, args.seconds, args.generator))
    if args.rounds > 1:
        print(f"  medians of {args.rounds} rounds:")
    for results in runs.values():
        print(median(results).line())

    def ratio(a: str, b: str) -> str:
        per_round = [x.rps / y.rps for x, y in zip(runs[a], runs[b], strict=True)]
        text = f"{median(runs[a]).rps / median(runs[b]).rps:.2f}x"
        return text + (f" ({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else "")

    for server, floor in apis:
        ratios = [
            f"/ pool {ratio(server.label, 'asyncpg pool')}",
            f"/ held {ratio(server.label, 'asyncpg held')}",
        ]
        if pg4 is not None:
            ratios.insert(0, f"/ postgraphile4 {ratio(server.label, 'postgraphile4')}")
        if floor is not None:
            ratios.append(f"/ floor {ratio(server.label, floor.label)}")
        print(f"  {server.label}: " + "   ".join(ratios))
    budget(runs, [server.label for server, _ in apis])


def budget(runs: dict[str, list[Result]], labels: list[str]) -> None:
    """The machine's CPU budget: each target's CPU per request, all processes counted (server or
    client, PostgreSQL, generator), and the throughput it allows with every core busy; for
    Fluxbase, the CPU per request 0.8x the pool's median would allow on these cores. A target whose
    server is one process at a full core is bound by that process before the budget."""
    cores = os.cpu_count() or 1
    medians = [median(rs) for rs in runs.values()]
    if "asyncpg pool" not in runs or any(m.db_cpu is None or not m.rps for m in medians):
        return  # no database CPU measured (an external server), or a target served nothing
    print(f"  CPU per request, all processes (cores={cores}; bound = cores / total):")
    for name, results in runs.items():
        m = median(results)
        total = max(m.total_us(), 1e-3)
        parts = f"server {m.per_request(m.server_cpu):.0f} + database {m.per_request(m.db_cpu):.0f}"
        if m.gen_cpu is not None:
            parts += f" + generator {m.per_request(m.gen_cpu):.0f}"
        print(f"    {name:<24} {total:5.0f} us ({parts})   bound {cores * 1e6 / total:6.0f} req/s")
    need = cores * 1e6 / (0.8 * median(runs["asyncpg pool"]).rps)
    for label in labels:
        have = median(runs[label]).total_us()
        print(
            f"    {label}: 0.8x the pool on {cores} cores needs <= {need:.0f} us/req in all; it takes {have:.0f}"
        )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument(
        "--servers",
        default="api",
        help="comma-separated API variants: `api` (fluxbase api as shipped, FLUXBASE_API_WORKERS "
        "from --workers) and server:workers with server uvicorn or granian, e.g. api,uvicorn:1,granian:2",
    )
    ap.add_argument("--workers", type=int, default=1, help="workers of the `api` variant")
    ap.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="2: also measure two `fluxbase api` processes on two ports, one generator each "
        "(their rate limit and revocations are shared through PostgreSQL)",
    )
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--rounds", type=int, default=1, help="measure every target this many times in turn")
    ap.add_argument("--postgraphile", action="store_true", help="also measure PostGraphile 4 (npm install)")
    ap.add_argument("--minimal", action="store_true", help="also measure a bare ASGI app on each server")
    ap.add_argument(
        "--generator",
        choices=("wrk", "python"),
        default="wrk" if shutil.which("wrk") else "python",
        help="HTTP load generator (default wrk when installed: apt-get install wrk)",
    )
    ap.add_argument("--cross-check", action="store_true", help="also load Fluxbase with the Python generator")
    ap.add_argument(
        "--socket",
        action="store_true",
        help="connect the API, asyncpg and PostGraphile over the embedded server's Unix socket",
    )
    ap.add_argument(
        "--pool-max",
        type=int,
        default=None,
        help="FLUXBASE_TENANT_POOL_MAX of the API servers (default: the shipped default, unset)",
    )
    ap.add_argument(
        "--tail",
        action="store_true",
        help="after each client count, print the `api` server's tenant-pool wait and request-time buckets",
    )
    args = ap.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    variants = parse_servers(args.servers)

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-bench-"))
    stack = start_stack(tmp)
    global DB_PID
    DB_PID = stack.pg.pid if stack.pg is not None else None
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
            # every variant's workers hold their own tenant pool while all of them run
            FLUXBASE_TENANT_CONNECTION_LIMIT="200",
            **({} if args.pool_max is None else {"FLUXBASE_TENANT_POOL_MAX": str(args.pool_max)}),
        )
        with run_service(["api"], env, port, tmp) as api_server:
            api = httpx.Client(base_url=api_server.url, timeout=30)
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
            sql = Target(
                "/api/execute-sql",
                json.dumps({"projectId": pid, "query": QUERY, "params": [1]}).encode(),
                [f"Authorization: Bearer {key}"],
                b'"Alice"',
            )
            minimal = Target("/", json.dumps({"params": [1]}).encode(), [], b"Alice")
            gql = Target(
                "/graphql",
                json.dumps({"query": "{ benchUserById(id: 1) { id name email } }"}).encode(),
                [],
                b"Alice",
            )
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

            procs: list[subprocess.Popen[bytes]] = []
            with started(procs):
                apis: list[tuple[Server, Server | None]] = []
                for name, workers in variants:
                    server = Server(f"fluxbase {name}:{workers}", port)
                    if name == "api":
                        server = Server(f"fluxbase api:{args.workers}", port, api_server.proc)
                    else:
                        server.port = free_port()
                        cmd = server_command(
                            name, workers, "fluxbase.http.asgi:create_from_env", server.port, factory=True
                        )
                        server.proc = start_server(
                            cmd, {**env, "FLUXBASE_API_PORT": str(server.port)}, sql, server.port
                        )
                        procs.append(server.proc)
                    floor = None
                    real = "uvicorn" if name == "api" else name
                    label = f"minimal {real}:{args.workers if name == 'api' else workers}"
                    same = [f for _, f in apis if f is not None and f.label == label]
                    if args.minimal and same:
                        floor = same[0]  # one floor per server and workers, shared by its variants
                    elif args.minimal:
                        floor = Server(label, free_port())
                        cmd = server_command(
                            real,
                            args.workers if name == "api" else workers,
                            "minimal_app:app",
                            floor.port,
                            factory=False,
                        )
                        floor.proc = start_server(
                            cmd, {**env, "MINIMAL_DSN": direct_url}, minimal, floor.port
                        )
                        procs.append(floor.proc)
                    apis.append((server, floor))
                if args.replicas > 1:
                    apis.append((await start_replicas(args, env, api_server.proc, port, sql, procs), None))
                pg4 = None
                if args.postgraphile:
                    workdir = ROOT / "bench" / ".node"
                    workdir.mkdir(exist_ok=True)
                    pg_port = free_port()
                    pg_proc = start_postgraphile(direct_url, f"p_{pid}", pg_port, workdir)
                    if pg_proc is not None:
                        procs.append(pg_proc)
                        pg4 = Server("postgraphile4", pg_port, pg_proc)
                print(
                    f"\nPoint SELECT, {args.seconds:.0f}s per run, cores={os.cpu_count()}, generator={args.generator}, "
                    f"database over {'Unix socket' if args.socket else 'TCP 127.0.0.1'}"
                )
                for clients in client_counts:
                    print(f"\n-- {clients} clients, load average {loadavg()}")
                    await measure_all(args, clients, direct_url, pg4, gql, apis, sql, minimal)
                    if args.tail:
                        print_tail(api)
                    print(f"  load average after: {loadavg()}")
            api.close()
        await stack.drop_database(dbname)
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
