"""Process lifecycle and settings, against real processes: the realtime service is ready while S3
is down, every setting has its variable (fractions parse where a setting is seconds), and the API
drains on SIGTERM: requests in flight finish, new connections are refused, and the process exits
within FLUXBASE_API_DRAIN_SECONDS even when a request would run longer."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect as websockets_connect

from fluxbase.config import ConfigError, load_settings
from fluxbase.devstack.procs import free_port, stop_process
from support import Api, bearer, run_service

REQUIRED = {
    "FLUXBASE_SECRET_KEY": "s" * 40,
    "FLUXBASE_DATABASE_URL": "postgresql://fluxbase:pw@127.0.0.1:5432/fluxbase",
    "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:9",
    "FLUXBASE_S3_ACCESS_KEY": "a",
    "FLUXBASE_S3_SECRET_KEY": "b",
}


@pytest.fixture(scope="module")
async def project(stack, log_dir) -> AsyncIterator[dict[str, Any]]:
    """A migrated database with one project and its admin key; S3 points at a dead port."""
    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(
        dbname,
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens: S3 is down
    )
    try:
        with run_service(["api"], env, port, log_dir, ready_path="/live") as server:
            api = Api(server.url)
            try:
                _, token = await api.new_user()
                pid = await api.new_project(token)
                key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
                yield {"env": env, "pid": pid, "key": key, "admin_url": stack.database_url(dbname)}
            finally:
                await api.close()
    finally:
        await stack.drop_database(dbname)


# -- realtime readiness --------------------------------------------------------------------------


async def test_realtime_is_ready_while_s3_is_down(project, log_dir) -> None:
    """The realtime service reads and writes no object: S3 being down must not take it out of
    rotation (before, /ready answered 503 with "s3": "down" here)."""
    port = free_port()
    env = dict(project["env"], FLUXBASE_REALTIME_PORT=str(port))
    with run_service(["realtime"], env, port, log_dir, ready_path="/live") as rt:
        async with httpx.AsyncClient(timeout=10) as http:
            deadline = time.monotonic() + 20
            while True:
                r = await http.get(f"{rt.url}/ready")
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ok", "checks": {"postgres": "ok", "outbox": "ok"}}


# -- settings ------------------------------------------------------------------------------------

# The settings that had no variable, and the value each is given here.
NEW_VARIABLES = [
    ("FLUXBASE_DATABASE_POOL_MIN", "2", lambda s: s.database.pool_min, 2),
    ("FLUXBASE_DATABASE_CONNECT_TIMEOUT_SECONDS", "2.5", lambda s: s.database.connect_timeout, 2.5),
    ("FLUXBASE_DATABASE_ACQUIRE_TIMEOUT_SECONDS", "0.75", lambda s: s.database.acquire_timeout_s, 0.75),
    ("FLUXBASE_WEBHOOKS_BATCH", "7", lambda s: s.webhooks.batch, 7),
    ("FLUXBASE_WEBHOOKS_RESPONSE_BODY_MAX", "64", lambda s: s.webhooks.response_body_max, 64),
    ("FLUXBASE_SQL_LOCK_TIMEOUT_MS", "1234", lambda s: s.tenant.lock_timeout_ms, 1234),
    ("FLUXBASE_SQL_IDLE_IN_TRANSACTION_MS", "4321", lambda s: s.tenant.idle_in_transaction_ms, 4321),
    ("FLUXBASE_SQL_TEMP_FILE_LIMIT_KB", "2048", lambda s: s.tenant.temp_file_limit_kb, 2048),
    ("FLUXBASE_SQL_WORK_MEM_KB", "8192", lambda s: s.tenant.work_mem_kb, 8192),
    ("FLUXBASE_API_DRAIN_SECONDS", "1.5", lambda s: s.http.drain_s, 1.5),
    ("FLUXBASE_REALTIME_MAX_BUFFERED_BYTES", "2097152", lambda s: s.realtime.max_buffered_bytes, 2 << 20),
]

# Settings in seconds: each takes a fraction.
FRACTIONAL = [
    ("FLUXBASE_WEBHOOKS_TIMEOUT_S", lambda s: s.webhooks.timeout_s),
    ("FLUXBASE_ENDUSER_JWKS_TIMEOUT_SECONDS", lambda s: s.end_user.jwks_timeout_s),
    ("FLUXBASE_TENANT_ACQUIRE_TIMEOUT_SECONDS", lambda s: s.tenant.pool_acquire_timeout_s),
    ("FLUXBASE_REALTIME_PING_SECONDS", lambda s: s.realtime.ping_interval_s),
    ("FLUXBASE_REALTIME_STALL_SECONDS", lambda s: s.realtime.stall_s),
    ("FLUXBASE_REALTIME_REVALIDATE_SECONDS", lambda s: s.realtime.revalidate_s),
    ("FLUXBASE_REALTIME_PRESENCE_HEARTBEAT_SECONDS", lambda s: s.realtime.presence_heartbeat_s),
    ("FLUXBASE_SMTP_TIMEOUT_SECONDS", lambda s: s.mail.smtp_timeout_s),
    ("FLUXBASE_MAIL_POLL_SECONDS", lambda s: s.mail.poll_s),
    ("FLUXBASE_DATABASE_CONNECT_TIMEOUT_SECONDS", lambda s: s.database.connect_timeout),
    ("FLUXBASE_DATABASE_ACQUIRE_TIMEOUT_SECONDS", lambda s: s.database.acquire_timeout_s),
    ("FLUXBASE_API_DRAIN_SECONDS", lambda s: s.http.drain_s),
]


@pytest.mark.parametrize(
    ("name", "raw", "read", "expected"), NEW_VARIABLES, ids=[v[0] for v in NEW_VARIABLES]
)
def test_every_setting_has_a_variable(name, raw, read, expected) -> None:
    assert read(load_settings(REQUIRED)) != expected
    assert read(load_settings({**REQUIRED, name: raw})) == expected


@pytest.mark.parametrize(("name", "read"), FRACTIONAL, ids=[v[0] for v in FRACTIONAL])
def test_seconds_take_fractions_and_refuse_nonsense(name, read) -> None:
    assert read(load_settings({**REQUIRED, name: "0.25"})) == 0.25
    for bad in ("0", "-1", "abc", "nan", "inf"):
        with pytest.raises(ConfigError, match=name):
            load_settings({**REQUIRED, name: bad})


def test_the_socket_byte_bound_holds_at_least_one_large_message() -> None:
    for bad in ("1048575", "0", "-1", "abc"):
        with pytest.raises(ConfigError, match="FLUXBASE_REALTIME_MAX_BUFFERED_BYTES"):
            load_settings({**REQUIRED, "FLUXBASE_REALTIME_MAX_BUFFERED_BYTES": bad})


def test_every_settings_field_is_read_from_the_environment() -> None:
    """Each leaf field of Settings moves when some FLUXBASE_* variable is set: none is left
    without one. Found by setting every variable load_settings reads, one at a time, to a value
    unlike its default and recording which fields changed."""
    import msgspec

    from test_docs_drift import settings_in_code

    def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, msgspec.Struct):
            out: dict[str, Any] = {}
            for f in obj.__struct_fields__:
                out.update(leaves(getattr(obj, f), f"{prefix}{f}."))
            return out
        return {prefix[:-1]: obj}

    base = leaves(load_settings(REQUIRED))
    moved: set[str] = set()
    candidates = (
        "7",
        "2",
        "true",
        "false",
        "json",
        "tls",
        "1,2",
        "127.0.0.1",
        "x@example.com",
        "60",
        "3600",
        "10485760",
        "pgcrypto",
    )
    for name in sorted(settings_in_code()):
        for raw in candidates:
            try:
                got = leaves(load_settings({**REQUIRED, name: raw}))
            except ConfigError:
                continue
            moved |= {k for k, v in got.items() if v != base[k]}
    # Set together only: S3 credentials and SMTP user/password; the required ones are always set.
    moved |= {"database.url", "s3.endpoint_url", "s3.access_key", "s3.secret_key", "auth.secret_key"}
    moved |= {"mail.smtp_username", "mail.smtp_password"}
    assert sorted(set(base) - moved) == []


# -- the API drains on SIGTERM -------------------------------------------------------------------


async def _in_flight(admin_url: str, needle: str, timeout: float = 10) -> None:
    """Wait until PostgreSQL runs a query containing `needle`."""
    conn = await asyncpg.connect(admin_url)
    try:
        deadline = time.monotonic() + timeout
        while not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
            f"%{needle}%",
        ):
            assert time.monotonic() < deadline, f"{needle} never started"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> float:
    start = time.monotonic()
    proc.wait(timeout)
    return time.monotonic() - start


async def test_sigterm_lets_a_request_in_flight_finish_and_refuses_new_ones(project, log_dir) -> None:
    port = free_port()
    env = dict(
        project["env"],
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_API_DRAIN_SECONDS="20",
        FLUXBASE_SQL_WORK_MEM_KB="12345",
    )
    with run_service(["api"], env, port, log_dir, ready_path="/live") as server:
        api = Api(server.url)
        try:
            # The setting reaches tenant sessions of a real process.
            r = await api.sql(project["key"], project["pid"], "SHOW work_mem")
            assert r.json()["result"]["rows"] == [{"work_mem": "12345kB"}], r.text
            slow = asyncio.create_task(
                api.sql(project["key"], project["pid"], "SELECT pg_sleep(2) AS drain_one")
            )
            await _in_flight(project["admin_url"], "drain_one")
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # the listener is closed
                async with httpx.AsyncClient(timeout=5) as fresh:
                    await fresh.get(f"{server.url}/live")
            r = await slow
            assert r.status_code == 200 and r.json()["success"], r.text
            await asyncio.to_thread(_wait_exit, server.proc, 15)
            # After a clean shutdown uvicorn re-raises the signal: the status a SIGTERM conventionally
            # gives (143 in a shell), not a crash.
            assert server.proc.returncode == -signal.SIGTERM, server.log()[-2000:]
            assert "graceful shutdown exceeded" not in server.log()
            assert time.monotonic() - sent < 10
        finally:
            await api.close()


async def test_sigterm_exits_within_the_drain_time(project, log_dir) -> None:
    """A request that would run 60 s does not hold the process: after FLUXBASE_API_DRAIN_SECONDS
    it is cancelled (its statement too) and the API exits. Before, uvicorn waited for it."""
    port = free_port()
    env = dict(
        project["env"],
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_API_DRAIN_SECONDS="1.5",
        FLUXBASE_SQL_DEADLINE_MS="120000",
        FLUXBASE_SQL_STATEMENT_TIMEOUT_MS="120000",
    )
    with run_service(["api"], env, port, log_dir, ready_path="/live") as server:
        api = Api(server.url)
        try:
            slow = asyncio.create_task(
                api.sql(project["key"], project["pid"], "SELECT pg_sleep(60) AS drain_two")
            )
            await _in_flight(project["admin_url"], "drain_two")
            sent = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(_wait_exit, server.proc, 30)
            took = time.monotonic() - sent
            print(f"API exit {took:.2f} s after SIGTERM (drain 1.5 s, a 60 s request in flight)")
            assert took < 8, f"exit took {took:.1f} s with a 1.5 s drain"
            assert took >= 1.4, f"exit after {took:.1f} s: the request was not given its drain time"
            assert "timeout graceful shutdown exceeded" in server.log(), server.log()[-2000:]
            # The client sees its request end (a dropped connection or an error answer), not a hang.
            try:
                r = await asyncio.wait_for(slow, 5)
                assert r.status_code >= 500
            except httpx.HTTPError:
                pass
            # Nothing keeps sleeping in PostgreSQL for the gone request.
            conn = await asyncpg.connect(project["admin_url"])
            try:
                deadline = time.monotonic() + 10
                while await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%drain_two%' "
                    "AND state = 'active' AND pid <> pg_backend_pid()"
                ):
                    assert time.monotonic() < deadline, "the cancelled statement still runs"
                    await asyncio.sleep(0.1)
            finally:
                await conn.close()
        finally:
            await api.close()


# -- OpenTelemetry tracing -----------------------------------------------------------------------


async def test_requests_are_traced_when_the_sdk_is_installed(project, log_dir) -> None:
    """OTEL_TRACES_EXPORTER=console: one SERVER span per request, child of the caller's
    traceparent, named by the route template, with the status and the request id, and no
    credential (the key in the Authorization header never appears in a span)."""
    pytest.importorskip("opentelemetry.sdk")
    port = free_port()
    env = dict(project["env"], FLUXBASE_API_PORT=str(port), OTEL_TRACES_EXPORTER="console")
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    with run_service(["api"], env, port, log_dir, ready_path="/live") as server:
        api = Api(server.url)
        try:
            r = await api.http.post(
                "/api/execute-sql",
                json={"projectId": project["pid"], "query": "SELECT 1 AS one"},
                headers={
                    **bearer(project["key"]),
                    "traceparent": f"00-{trace_id}-{parent}-01",
                    "X-Request-Id": "req_traced_one",
                },
            )
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 10
            while "req_traced_one" not in server.log():
                assert time.monotonic() < deadline, server.log()[-2000:]
                await asyncio.sleep(0.1)
        finally:
            await api.close()
        stop_process(server.proc, signal.SIGTERM, timeout=15)
    spans = _json_objects(server.log())
    mine = [s for s in spans if s.get("attributes", {}).get("fluxbase.request_id") == "req_traced_one"]
    assert len(mine) == 1, server.log()[-3000:]
    span = mine[0]
    assert span["name"] == "POST /api/execute-sql"
    assert span["kind"] == "SpanKind.SERVER"
    assert span["context"]["trace_id"] == f"0x{trace_id}"
    assert span["parent_id"] == f"0x{parent}"
    assert span["attributes"]["http.response.status_code"] == 200
    assert span["attributes"]["http.route"] == "/api/execute-sql"
    assert span["resource"]["attributes"]["service.name"] == "fluxbase-api"
    assert project["key"] not in server.log()
    # The tenant statement: a CLIENT span under the request's, named by its kind, no SQL text.
    (db,) = [
        s
        for s in spans
        if s["context"]["trace_id"] == f"0x{trace_id}" and s["attributes"].get("db.system") == "postgresql"
    ]
    assert db["parent_id"] == span["context"]["span_id"]
    assert db["kind"] == "SpanKind.CLIENT"
    assert db["name"] == "SELECT" and db["attributes"]["db.operation.name"] == "SELECT"
    assert "one" not in json.dumps(db), db


async def test_statements_realtime_and_webhook_attempts_are_traced(project, log_dir) -> None:
    """The explicit-transaction path's statement span carries no literal (a failing one only its
    SQLSTATE); the realtime service traces each delivery and the worker each webhook attempt,
    whose request carries the attempt's `traceparent` to the receiver."""
    pytest.importorskip("opentelemetry.sdk")
    from test_webhooks import Receiver

    api_port, rt_port = free_port(), free_port()
    env = dict(
        project["env"],
        FLUXBASE_API_PORT=str(api_port),
        FLUXBASE_REALTIME_PORT=str(rt_port),
        FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        OTEL_TRACES_EXPORTER="console",
    )
    receiver = await Receiver().start()
    api = Api(f"http://127.0.0.1:{api_port}")
    try:
        with (
            run_service(["api"], env, api_port, log_dir, ready_path="/live") as server,
            run_service(["realtime"], env, rt_port, log_dir, ready_path="/live") as rt,
        ):
            key, pid = project["key"], project["pid"]
            r = await api.sql(key, pid, "CREATE TABLE IF NOT EXISTS traced (id serial PRIMARY KEY, v text)")
            assert r.json()["success"], r.text
            r = await api.http.post(
                "/api/webhooks",
                json={
                    "projectId": pid,
                    "url": receiver.url,
                    "events": ["row.inserted"],
                    "tables": ["traced"],
                },
                headers=bearer(key),
            )
            assert r.status_code == 201, r.text
            hook = str(r.json()["webhook"]["id"])
            worker_log = log_dir / f"traced-worker-{rt_port}.log"
            worker = await asyncio.to_thread(_start_worker, env, worker_log)
            try:
                async with websockets_connect(f"ws://127.0.0.1:{rt_port}/?token={key}") as ws:
                    await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
                    while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "subscribed":
                        pass
                    batch = await api.http.post(
                        "/api/execute-batch",
                        json={
                            "projectId": pid,
                            "statements": [
                                {"query": "INSERT INTO traced (v) VALUES ('secret-literal-1')"},
                                {"query": "SELECT 'secret-literal-2'::int"},
                            ],
                        },
                        headers=bearer(key),
                    )
                    assert batch.status_code == 200 and batch.json()["success"] is False, batch.text
                    r = await api.sql(key, pid, "INSERT INTO traced (v) VALUES ($1)", ["secret-param-3"])
                    assert r.json()["success"], r.text
                    while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "db_event":
                        pass
                deadline = time.monotonic() + 30
                while not receiver.requests or "webhook attempt" not in worker_log.read_text(
                    errors="replace"
                ):
                    assert time.monotonic() < deadline and worker.poll() is None, worker_log.read_text()[
                        -3000:
                    ]
                    await asyncio.sleep(0.1)
            finally:
                stop_process(worker, signal.SIGTERM, timeout=30)
            await api.http.delete(f"/api/webhooks/{hook}", headers=bearer(key))
            stop_process(rt.proc, signal.SIGTERM, timeout=15)
            stop_process(server.proc, signal.SIGTERM, timeout=15)
        logs = server.log() + rt.log() + worker_log.read_text(errors="replace")
        for secret in ("secret-literal", "secret-param", key):
            assert secret not in logs
        spans = _json_objects(logs)
        db = [s for s in spans if s.get("attributes", {}).get("db.system") == "postgresql"]
        failed = [s for s in db if s["status"]["status_code"] == "ERROR"]
        assert [s["attributes"].get("error.type") for s in failed] == ["22P02"], failed
        assert {s["name"] for s in db} >= {"INSERT", "SELECT", "CREATE"}
        deliver = [s for s in spans if s.get("name") == "realtime deliver"]
        assert deliver and deliver[0]["resource"]["attributes"]["service.name"] == "fluxbase-realtime"
        assert sum(s["attributes"]["fluxbase.realtime.deliveries"] for s in deliver) >= 1
        (attempt, *_) = [s for s in spans if s.get("name") == "webhook attempt"]
        assert attempt["kind"] == "SpanKind.CLIENT"
        assert attempt["resource"]["attributes"]["service.name"] == "fluxbase-worker"
        assert attempt["attributes"]["http.response.status_code"] == 200
        assert attempt["attributes"]["fluxbase.webhook.id"] == hook
        assert receiver.url not in json.dumps(attempt)
        sent = receiver.requests[0]["headers"].get("traceparent", "")
        assert sent.split("-")[1:3] == [attempt["context"]["trace_id"][2:], attempt["context"]["span_id"][2:]]
    finally:
        await api.close()
        await receiver.stop()


def _start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fluxbase", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects (spans, pretty-printed over several lines) in a log."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = end
    return found


def test_tracing_is_off_and_not_imported_without_an_exporter() -> None:
    """No hard dependency: building the API does not import OpenTelemetry unless asked to."""
    from fluxbase.http.tracing import tracer_from_env

    assert tracer_from_env({}) is None
    assert tracer_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    code = "import sys, fluxbase.http.asgi; print(any(m.startswith('opentelemetry') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
