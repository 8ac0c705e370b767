"""Metrics, request logs and process lifecycle, against real processes: an API with JSON logs
and a metrics token, the realtime service, `fluxbase worker` with its metrics listener, and a
real webhook receiver. Its S3 endpoint is a port nothing listens on, so S3 errors are real."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect

from fluxbase import metrics
from fluxbase.config import S3Settings, unknown_variables
from fluxbase.devstack.procs import free_port, stop_process
from fluxbase.storage.s3 import ObjectStore
from support import ROOT, Api, bearer, run_service
from test_storage import upload
from test_webhooks import Receiver

TOKEN = "metrics-token-" + "x" * 20
Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


def parse(text: str) -> Sample:
    out: Sample = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not a sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples: Sample, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str, token: str = TOKEN) -> Sample:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{url}/metrics", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


async def until(pred: Callable[[], Any], timeout: float = 20.0) -> None:
    """Wait for `pred()` (a bool, or an awaitable of one) to hold."""
    deadline = time.monotonic() + timeout

    async def check() -> bool:
        result = pred()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def obs(stack, log_dir) -> AsyncIterator[dict[str, Any]]:
    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(
        dbname,
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens: S3 is down
        FLUXBASE_LOG_FORMAT="json",
        FLUXBASE_LOG_LEVEL="info",
        FLUXBASE_METRICS_TOKEN=TOKEN,
        FLUXBASE_METRICS_TOKN="typo",  # an unknown setting: reported at start-up
        FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        FLUXBASE_WEBHOOKS_RETRY_SCHEDULE="0.2,0.2,0.2,0.2",
        FLUXBASE_WEBHOOKS_TIMEOUT_S="10",
    )
    try:
        with run_service(["api"], env, port, log_dir, ready_path="/live") as server:
            api = Api(server.url)
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
            r = await api.sql(key, pid, "CREATE TABLE items (id serial PRIMARY KEY, name text)")
            assert r.json()["success"], r.text
            db = await asyncpg.connect(stack.database_url(dbname))
            try:
                yield {
                    "url": server.url,
                    "server": server,
                    "api": api,
                    "pid": pid,
                    "key": key,
                    "env": env,
                    "db": db,
                }
            finally:
                await db.close()
                await api.close()
    finally:
        await stack.drop_database(dbname)


# -- API metrics ------------------------------------------------------------------------------


async def test_metrics_need_the_token(obs) -> None:
    async with httpx.AsyncClient(base_url=obs["url"]) as http:
        for headers in ({}, bearer("wrong"), {"Authorization": TOKEN}):
            r = await http.get("/metrics", headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "AUTH_REQUIRED"
            assert "fluxbase_" not in r.text
        assert (await http.get("/metrics", headers=bearer(TOKEN))).status_code == 200


def test_without_a_token_only_loopback_may_read() -> None:
    assert metrics.allowed("", None, "127.0.0.1")
    assert metrics.allowed("", None, "::1")
    assert metrics.allowed("", None, "::ffff:127.0.0.1")
    assert not metrics.allowed("", None, "10.1.2.3")
    assert not metrics.allowed("", None, "::ffff:10.1.2.3")
    assert not metrics.allowed("", None, None)
    assert not metrics.allowed("t", None, "127.0.0.1")  # a token, when set, is needed from anywhere
    assert metrics.allowed("t", "Bearer t", "10.1.2.3")
    # A reverse proxy on the same host connects from loopback: its forwarding header gives it away.
    assert not metrics.allowed("", None, "127.0.0.1", proxied=True)
    assert metrics.allowed("t", "Bearer t", "127.0.0.1", proxied=True)


async def test_a_proxied_request_is_not_loopback(stack, log_dir) -> None:
    """Without a token: direct loopback scrapes are answered, proxied ones refused (API, worker)."""
    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(dbname, FLUXBASE_API_PORT=str(port))
    try:
        with run_service(["api"], env, port, log_dir) as server:
            w = Worker(env, log_dir / f"obs-worker-{port}.log")
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    for url in (server.url, w.url):
                        deadline = time.monotonic() + 60
                        while True:
                            try:
                                direct = await http.get(f"{url}/metrics")
                                break
                            except httpx.HTTPError:
                                assert time.monotonic() < deadline and w.proc.poll() is None, w.log()
                                await asyncio.sleep(0.1)
                        assert direct.status_code == 200 and "fluxbase_" in direct.text
                        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                            r = await http.get(f"{url}/metrics", headers={header: "203.0.113.9"})
                            assert r.status_code == 401, (url, header)
            finally:
                stop_process(w.proc, signal.SIGTERM, timeout=30)
    finally:
        await stack.drop_database(dbname)


async def test_a_request_moves_its_counter_and_histogram_by_route_template(obs) -> None:
    before = await scrape(obs["url"])
    r = await obs["api"].sql(obs["key"], obs["pid"], "SELECT 1")
    assert r.json()["success"]
    r = await obs["api"].http.get(f"/api/projects/{obs['pid']}/api-keys", headers=bearer(obs["key"]))
    listed_status = str(r.status_code)
    after = await scrape(obs["url"])
    sql = {"method": "POST", "route": "/api/execute-sql"}
    assert value(after, "fluxbase_http_requests_total", **sql, status="200") == (
        value(before, "fluxbase_http_requests_total", **sql, status="200") + 1
    )
    assert value(after, "fluxbase_http_request_duration_seconds_count", **sql) == (
        value(before, "fluxbase_http_request_duration_seconds_count", **sql) + 1
    )
    # The route label is the template, never the path with the project id in it.
    routes = {dict(labels).get("route", "") for _, labels in after}
    keys_route = [r for r in routes if r.startswith("/api/projects/{") and r.endswith("/api-keys")]
    assert len(keys_route) == 1, routes
    key_labels = {"method": "GET", "route": keys_route[0], "status": listed_status}
    assert value(after, "fluxbase_http_requests_total", **key_labels) >= 1
    text = (await obs["api"].http.get("/metrics", headers=bearer(TOKEN))).text
    assert obs["pid"] not in text
    # The tenant pool that answered the SQL is counted.
    assert value(after, "fluxbase_tenant_pools") >= 1
    assert (
        value(after, "fluxbase_tenant_pool_connections", state="idle")
        + value(after, "fluxbase_tenant_pool_connections", state="in_use")
        >= 1
    )


def test_tallied_observations_land_in_the_buckets_one_by_one_would(tmp_path) -> None:
    """`Histogram.observe_many` (the SQL protocol path's flush) equals `observe_key` per value,
    in memory and in the shared file siblings read."""
    one, many = metrics.Registry(), metrics.Registry()
    for registry, name in ((one, "one"), (many, "many")):
        (tmp_path / name).mkdir()
        registry.share(tmp_path / name)
    a = one.histogram("t_seconds", "h", ("route",))
    b = many.histogram("t_seconds", "h", ("route",))
    values = [0.0, 0.0004, 0.004, 0.004, 0.05, 0.3, 2.5, 12.0, 1e9]
    for v in values:
        a.observe_key(v, ("/x",))
    b.observe_many(values, ("/x",))
    b.observe_many([], ("/x",))
    assert a.series == b.series and sum(b.series[("/x",)][:-1]) == len(values)

    def stored(directory: Path) -> dict[Any, float]:
        (path,) = directory.glob("*" + metrics.SharedStore.SUFFIX)
        return {(n, lb, slot): v for n, lb, slot, v in metrics.SharedStore.read(path) if v}

    assert stored(tmp_path / "one") == stored(tmp_path / "many")


async def test_unmatched_paths_share_one_label(obs) -> None:
    async with httpx.AsyncClient(base_url=obs["url"]) as http:
        for i in range(3):
            await http.get(f"/no/such/path/{i}")
    after = await scrape(obs["url"])
    assert value(after, "fluxbase_http_requests_total", method="GET", route="unmatched", status="404") >= 3
    assert not any("/no/such" in dict(labels).get("route", "") for _, labels in after)


def test_shared_registries_merge_every_process_and_keep_the_dead_ones_counts(tmp_path) -> None:
    """Two registries sharing a directory (as two API workers do): counters and histograms sum
    over both, gauges over the live ones (a ratio by its maximum); a dead process's counters
    stay, its gauges go; a file that grows past its first size reads back whole."""
    regs = [metrics.Registry(), metrics.Registry()]
    for r in regs:
        r.counter("t_requests_total", "requests", ("route",))
        r.histogram("t_seconds", "latency", ("route",))
        r.gauge("t_in_flight", "now")
        r.gauge("t_busiest_ratio", "max", merge="max")
        r.gauge("t_pools", "by project", ("project",))
    paths = [r.share(tmp_path, "api") for r in regs]
    a, b = regs
    a.counter("t_requests_total", "requests", ("route",)).inc("/x", amount=2)
    b.counter("t_requests_total", "requests", ("route",)).inc("/x", amount=3)
    b.counter("t_requests_total", "requests", ("route",)).inc("/y")
    a.histogram("t_seconds", "latency", ("route",)).observe(0.003, "/x")
    b.histogram("t_seconds", "latency", ("route",)).observe(7.0, "/x")
    a.gauge("t_in_flight", "now").set(value=1)
    b.gauge("t_in_flight", "now").set(value=2)
    a.gauge("t_busiest_ratio", "max", merge="max").set(value=0.25)
    b.gauge("t_busiest_ratio", "max", merge="max").set(value=0.75)
    pools = b.gauge("t_pools", "by project", ("project",))
    pools.set("p1", value=4)
    pools.clear()  # a labelled gauge's cleared series disappears from every scrape
    pools.set("p2", value=5)
    many = a.counter("t_many_total", "forces the file to grow", ("n",))
    for i in range(3000):
        many.inc(str(i), amount=i)

    both = parse(asyncio.run(a.render()).decode())
    assert value(both, "t_requests_total", route="/x") == 5
    assert value(both, "t_requests_total", route="/y") == 1
    assert value(both, "t_seconds_count", route="/x") == 2
    assert value(both, "t_seconds_bucket", route="/x", le="0.005") == 1
    assert value(both, "t_seconds_sum", route="/x") == 7.003
    assert value(both, "t_in_flight") == 3
    assert value(both, "t_busiest_ratio") == 0.75
    assert ("t_pools", frozenset({("project", "p1")})) not in both
    assert value(both, "t_pools", project="p2") == 5
    assert sum(v for (n, _), v in both.items() if n == "t_many_total") == sum(range(3000))
    assert os.path.getsize(paths[0]) > 64 * 1024

    gone = subprocess.Popen(["true"])
    gone.wait()
    paths[1].rename(tmp_path / f"api-{gone.pid}-dead{metrics.SharedStore.SUFFIX}")
    after_b_died = parse(asyncio.run(a.render()).decode())
    assert value(after_b_died, "t_requests_total", route="/x") == 5  # counters never go down
    assert value(after_b_died, "t_seconds_count", route="/x") == 2
    assert value(after_b_died, "t_in_flight") == 1
    assert value(after_b_died, "t_busiest_ratio") == 0.25
    assert ("t_pools", frozenset({("project", "p2")})) not in after_b_died


def _served(directory: Path, route: str) -> dict[int, float]:
    """Requests to `route` each API worker counted in its shared metrics file, by pid."""
    out: dict[int, float] = {}
    for path in directory.glob("*" + metrics.SharedStore.SUFFIX):
        pid = int(path.name.split("-")[1])
        for name, labels, _, v in metrics.SharedStore.read(path):
            if name == "fluxbase_http_requests_total" and labels[1] == route:
                out[pid] = out.get(pid, 0.0) + v
    return out


async def test_one_scrape_counts_every_api_workers_requests(stack, log_dir, tmp_path) -> None:
    """Two uvicorn workers, N requests spread over both: a scrape (answered by either) shows N,
    and still N after a worker is SIGKILLed: its counters outlive it."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    stale = shared / f"api-1-0000{metrics.SharedStore.SUFFIX}"  # a file of an earlier run
    stale.write_bytes(b"\0" * 64)
    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(
        dbname,
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_API_WORKERS="2",
        FLUXBASE_API_METRICS_DIR=str(shared),
        FLUXBASE_METRICS_TOKEN=TOKEN,
    )
    route = {"method": "GET", "route": "unmatched", "status": "404"}
    began = time.monotonic()
    try:
        # Two processes start at once: on a loaded machine that takes a while.
        with run_service(["api"], env, port, log_dir, ready_path="/live", timeout=180) as server:
            print(f"two workers ready in {time.monotonic() - began:.1f} s")
            assert not stale.exists()
            sent = 0
            # A fresh connection per request: the kernel hands them to both workers.
            async with httpx.AsyncClient(
                base_url=server.url, limits=httpx.Limits(max_keepalive_connections=0)
            ) as http:
                while sent < 40 or len([v for v in _served(shared, "unmatched").values() if v]) < 2:
                    assert sent < 400, f"one worker answered everything: {_served(shared, 'unmatched')}"
                    rs = await asyncio.gather(*(http.get(f"/no/such/{sent + i}") for i in range(8)))
                    assert all(r.status_code == 404 for r in rs)
                    sent += 8
            served = _served(shared, "unmatched")
            assert sum(served.values()) == sent and len(served) == 2, served
            for _ in range(4):  # whichever worker answers the scrape
                samples = await scrape(server.url)
                assert value(samples, "fluxbase_http_requests_total", **route) == sent
                assert (
                    value(
                        samples,
                        "fluxbase_http_request_duration_seconds_count",
                        method="GET",
                        route="unmatched",
                    )
                    == sent
                )
            victim = next(pid for pid, v in served.items() if v)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: not metrics._alive(victim))
            for _ in range(4):
                samples = await scrape(server.url)
                assert value(samples, "fluxbase_http_requests_total", **route) == sent
            assert value(samples, "fluxbase_http_requests_in_flight") == 0
    finally:
        await stack.drop_database(dbname)


async def test_s3_errors_are_counted(obs) -> None:
    before = await scrape(obs["url"])
    async with httpx.AsyncClient(base_url=obs["url"]) as http:
        r = await http.get("/ready")
    assert r.status_code == 503 and r.json()["checks"]["s3"] == "down"
    after = await scrape(obs["url"])
    assert value(after, "fluxbase_s3_errors_total", kind="unreachable") > value(
        before, "fluxbase_s3_errors_total", kind="unreachable"
    )


# -- logs --------------------------------------------------------------------------------------


def json_lines(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_one_json_line_per_request_with_the_given_request_id(obs) -> None:
    rid = "trace 0042-abc"
    secret = "sekret-in-the-query-string"
    r = await obs["api"].http.get(
        f"/api/projects/{obs['pid']}/api-keys",
        params={"token": secret},
        headers={**bearer(obs["key"]), "X-Request-Id": rid},
    )
    assert r.headers["x-request-id"] == rid
    await until(lambda: any(d.get("requestId") == rid for d in json_lines(obs["server"].log())))
    lines = [d for d in json_lines(obs["server"].log()) if d.get("requestId") == rid]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["logger"] == "fluxbase.request"
    assert line["status"] == r.status_code and line["method"] == "GET"
    assert line["route"].startswith("/api/projects/{") and line["project"] == obs["pid"]
    assert isinstance(line["durationMs"], float)
    log = obs["server"].log()
    assert secret not in log and obs["key"] not in log


async def test_execute_sql_logs_one_json_line_on_the_protocol_path(obs) -> None:
    """`fluxbase api` answers execute-sql inside its HTTP protocol (fluxbase.http.protocol), not
    through RequestLog: the same JSON line, request id and no key in the log."""
    rid = "sql-line-0042"
    r = await obs["api"].http.post(
        "/api/execute-sql",
        json={"projectId": obs["pid"], "query": "SELECT 1 AS x"},
        headers={**bearer(obs["key"]), "X-Request-Id": rid},
    )
    assert r.status_code == 200 and r.json()["success"] and r.headers["x-request-id"] == rid
    await until(lambda: any(d.get("requestId") == rid for d in json_lines(obs["server"].log())))
    lines = [d for d in json_lines(obs["server"].log()) if d.get("requestId") == rid]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["logger"] == "fluxbase.request" and line["method"] == "POST"
    assert line["route"] == "/api/execute-sql" and line["status"] == 200
    assert line["project"] == obs["pid"] and isinstance(line["durationMs"], float)
    assert obs["key"] not in obs["server"].log()


@pytest.mark.parametrize("given", [b"x" * 129, b"bad\tid", "caf\u00e9".encode("latin-1"), b""])
async def test_an_invalid_request_id_is_replaced(obs, given: bytes) -> None:
    async with httpx.AsyncClient(base_url=obs["url"]) as http:
        r = await http.get("/live", headers={"X-Request-Id": given} if given else {})
    assert re.fullmatch(r"req_[0-9a-f]{12}", r.headers["x-request-id"])
    assert r.headers.get_list("x-request-id") == [r.headers["x-request-id"]]


async def test_every_line_a_request_causes_carries_its_id(obs) -> None:
    """An upload while S3 is down: the storage layer's warning and the request line share the id."""
    r = await obs["api"].http.post(
        "/api/storage/buckets", json={"projectId": obs["pid"], "name": "b1"}, headers=bearer(obs["key"])
    )
    assert r.status_code in (201, 409), r.text
    rid = "upload-while-s3-down"
    r = await upload(
        obs["api"], obs["key"], obs["pid"], "b1", "a.txt", b"hello", headers={"X-Request-Id": rid}
    )
    assert r.status_code == 503, r.text
    assert r.headers["x-request-id"] == rid
    await until(lambda: any(d.get("requestId") == rid for d in json_lines(obs["server"].log())))
    mine = [d for d in json_lines(obs["server"].log()) if d.get("requestId") == rid]
    loggers = {d["logger"] for d in mine}
    assert "fluxbase.request" in loggers and len(loggers) >= 2, mine
    assert any("S3" in d["message"] for d in mine), mine


async def test_unknown_setting_is_reported_with_the_closest_name(obs) -> None:
    warnings = [d for d in json_lines(obs["server"].log()) if "FLUXBASE_METRICS_TOKN" in d.get("message", "")]
    assert warnings and "FLUXBASE_METRICS_TOKEN" in warnings[0]["message"], obs["server"].log()[-3000:]
    assert unknown_variables({"FLUXBASE_API_PORT": "1", "FLUXBASE_SQL_DEADLINE": "5", "HOME": "/"}) == [
        ("FLUXBASE_SQL_DEADLINE", "FLUXBASE_SQL_DEADLINE_MS")
    ]


# -- realtime ----------------------------------------------------------------------------------


async def test_realtime_metrics_count_subscribers_and_deliveries(obs, log_dir) -> None:
    port = free_port()
    env = dict(obs["env"], FLUXBASE_REALTIME_PORT=str(port))
    with run_service(["realtime"], env, port, log_dir, ready_path="/live") as rt:
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"{rt.url}/metrics")).status_code == 401
        before = await scrape(rt.url)
        async with connect(f"ws://127.0.0.1:{port}/?token={obs['key']}") as ws:
            await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{obs['pid']}"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "subscribed":
                pass
            mid = await scrape(rt.url)
            assert value(mid, "fluxbase_realtime_connections") == 1
            assert value(mid, "fluxbase_realtime_subscriptions") == 1
            assert ("fluxbase_outbox_lag_seconds", frozenset({("reader", "realtime")})) in mid
            r = await obs["api"].sql(obs["key"], obs["pid"], "INSERT INTO items (name) VALUES ('a')")
            assert r.json()["success"]
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "db_event":
                pass
            after = await scrape(rt.url)
            assert value(after, "fluxbase_realtime_delivered_messages_total") == (
                value(before, "fluxbase_realtime_delivered_messages_total") + 1
            )
        await until(lambda: _subs_zero(rt.url))


async def _subs_zero(url: str) -> bool:
    return value(await scrape(url), "fluxbase_realtime_subscriptions") == 0


# -- worker ------------------------------------------------------------------------------------


class Worker:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fluxbase", "worker"],
                env=dict(env, FLUXBASE_WORKER_METRICS_PORT=str(self.port)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
async def worker(obs, log_dir) -> AsyncIterator[Worker]:
    w = Worker(obs["env"], log_dir / f"obs-worker-{free_port()}.log")
    deadline = time.monotonic() + 60
    while True:  # ready once its metrics listener answers
        assert w.proc.poll() is None and time.monotonic() < deadline, w.log()[-3000:]
        try:
            await scrape(w.url)
            break
        except (httpx.HTTPError, AssertionError):
            await asyncio.sleep(0.1)
    try:
        yield w
    finally:
        stop_process(w.proc, signal.SIGTERM, timeout=30)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def create_hook(obs, url: str) -> str:
    r = await obs["api"].http.post(
        "/api/webhooks",
        json={"projectId": obs["pid"], "url": url, "events": ["row.inserted"], "tables": ["items"]},
        headers=bearer(obs["key"]),
    )
    assert r.status_code == 201, r.text
    return str(r.json()["webhook"]["id"])


async def delete_hook(obs, hook_id: str) -> None:
    await obs["api"].http.delete(f"/api/webhooks/{hook_id}", headers=bearer(obs["key"]))


async def test_worker_live_answers_without_a_token_and_the_metrics_stay_guarded(worker: Worker) -> None:
    """The container probes (compose.yaml, infra/k8s/worker.yaml) call /live with no token."""
    async with httpx.AsyncClient(timeout=10) as http:
        live = await http.get(f"{worker.url}/live")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        assert (await http.get(f"{worker.url}/metrics")).status_code == 401
        assert (await http.get(f"{worker.url}/live/x")).status_code == 404


async def test_worker_metrics_count_attempts_and_failures(obs, worker: Worker, receiver: Receiver) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{worker.url}/metrics")).status_code == 401
    before = await scrape(worker.url)
    receiver.status = 500
    hook = await create_hook(obs, receiver.url)
    try:
        r = await obs["api"].sql(obs["key"], obs["pid"], "INSERT INTO items (name) VALUES ('w')")
        assert r.json()["success"]
        await receiver.wait(lambda: len(receiver.requests) >= 2)
        mid = await scrape(worker.url)
        assert value(mid, "fluxbase_webhook_attempts_total", result="failed") >= (
            value(before, "fluxbase_webhook_attempts_total", result="failed") + 2
        )
        assert value(mid, "fluxbase_webhook_queue_depth") >= 1
        receiver.status = 200
        await receiver.wait(lambda: any(r["status"] == 200 for r in receiver.requests))

        async def delivered() -> bool:
            s = await scrape(worker.url)
            return (
                value(s, "fluxbase_webhook_attempts_total", result="delivered")
                == (value(before, "fluxbase_webhook_attempts_total", result="delivered") + 1)
                and value(s, "fluxbase_webhook_queue_depth") == 0
            )

        await until(delivered)
        # The delivery log shows every attempt: the 500s, then the 200.
        r = await obs["api"].http.get(f"/api/webhooks/{hook}/deliveries", headers=bearer(obs["key"]))
        (d,) = r.json()["deliveries"]
        log = d["attemptLog"]
        assert d["status"] == "delivered" and d["attempts"] == len(log) >= 3, d
        assert [a["responseStatus"] for a in log] == [500] * (len(log) - 1) + [200]
        assert all(a["responseTimeMs"] is not None and a["at"] and a["error"] is None for a in log[-1:])
        assert all(a["error"] == "HTTP 500" or "500" in a["error"] for a in log[:-1]), log
        assert log[-1]["responseBody"] == "OK"
        assert [a["at"] for a in log] == sorted(a["at"] for a in log)
    finally:
        await delete_hook(obs, hook)


async def test_sigterm_mid_delivery_finishes_it(obs, worker: Worker, receiver: Receiver) -> None:
    """SIGTERM while the receiver takes 2 s: the worker waits for the answer, writes the delivery
    down as delivered, and exits; the receiver saw the request exactly once."""
    receiver.delay = 2.0
    hook = await create_hook(obs, receiver.url)
    try:
        r = await obs["api"].sql(obs["key"], obs["pid"], "INSERT INTO items (name) VALUES ('slow')")
        assert r.json()["success"]
        await receiver.wait(lambda: len(receiver.requests) >= 1)
        worker.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.proc.wait, 20)
        assert code == 0, worker.log()[-3000:]
        rows = await obs["db"].fetch(
            "SELECT status, attempts FROM fluxbase.webhook_deliveries WHERE webhook_id = $1", hook
        )
        assert [(r["status"], r["attempts"]) for r in rows] == [("delivered", 1)], worker.log()[-3000:]
        assert len(receiver.requests) == 1
    finally:
        await delete_hook(obs, hook)


# -- migrate -----------------------------------------------------------------------------------


async def test_migrate_retries_until_the_database_accepts(obs, stack) -> None:
    """`fluxbase migrate` against a port where PostgreSQL appears only two seconds later."""
    pg = httpx.URL(obs["env"]["FLUXBASE_MIGRATION_DATABASE_URL"])
    port = free_port()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(pg.host, pg.port)
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    url = str(obs["env"]["FLUXBASE_MIGRATION_DATABASE_URL"]).replace(f":{pg.port}/", f":{port}/")
    env = dict(obs["env"], FLUXBASE_MIGRATION_DATABASE_URL=url, FLUXBASE_LOG_FORMAT="text")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fluxbase",
        "migrate",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    await asyncio.sleep(2.0)  # the process is up and failing to connect meanwhile
    assert proc.returncode is None
    server = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        server.close()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "retrying" in text and "applied" in text, text


def test_object_store_errors_count_without_a_server() -> None:
    async def go() -> float:
        store = ObjectStore(
            S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key="a", secret_key="b")
        )
        await store.start()
        try:
            before = metrics.S3_ERRORS.get("unreachable")
            assert not await store.ping()
            return metrics.S3_ERRORS.get("unreachable") - before
        finally:
            await store.close()

    assert asyncio.run(go()) == 1
