"""Issue 25, "the first hour": what a newcomer building the guide's app tripped over, each through
the real API, worker, realtime service and CLI (the dev stack's findings are in test_tutorial.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect

from fluxbase.devstack.procs import free_port
from support import ROOT, Api, assert_error, bearer
from test_realtime import _realtime
from test_webhooks import Receiver, run_worker

# -- 1. RLS: creating a policy enables RLS, and says so -----------------------------------------


async def _ok_sql(api: Api, key: str, pid: str, q: str, params: list[Any] | None = None, **extra: Any) -> Any:
    body = (await api.sql(key, pid, q, params, **extra)).json()
    assert body["success"], body
    return body["result"]


async def test_creating_a_policy_enables_rls_and_says_so(api: Api, project) -> None:
    await _ok_sql(api, project.admin_key, project.id, "CREATE TABLE notes (id serial, owner text, body text)")
    await _ok_sql(
        api,
        project.admin_key,
        project.id,
        "INSERT INTO notes (owner, body) VALUES ('ann', 'a'), ('bob', 'b')",
    )
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    r = await api.http.post(
        f"/api/projects/{project.id}/rls/policies",
        json={"table": "notes", "name": "own notes", "command": "ALL", "using": "owner = auth.uid()"},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["table"]["rlsEnabled"] is True, body
    assert body["rlsEnabledNow"] is True
    assert "ENABLE ROW LEVEL SECURITY" in body["message"] and "notes" in body["message"]
    rows = await _ok_sql(api, rw, project.id, "SELECT body FROM notes ORDER BY body", authUid="ann")
    assert rows["rows"] == [{"body": "a"}]
    # A second policy on the same table: RLS is already on, nothing to announce.
    r = await api.http.post(
        f"/api/projects/{project.id}/rls/policies",
        json={"table": "notes", "name": "read all", "command": "SELECT", "using": "true"},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 201, r.text
    assert r.json()["rlsEnabledNow"] is False and "message" not in r.json()


async def test_a_refused_policy_leaves_rls_as_it_was(api: Api, project) -> None:
    await _ok_sql(api, project.admin_key, project.id, "CREATE TABLE things (id serial, v text)")
    r = await api.http.post(
        f"/api/projects/{project.id}/rls/policies",
        json={"table": "things", "name": "bad", "command": "SELECT", "using": "owner = auth.uid()"},
        headers=bearer(project.admin_key),
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    listed = await api.http.get(f"/api/projects/{project.id}/rls", headers=bearer(project.admin_key))
    assert listed.json()["tables"][0]["rlsEnabled"] is False


# -- 3. webhooks: redeliver and re-enable send at once; a blocked queue says why ----------------


@pytest.fixture(scope="module")
async def slow_retries(spawn, stack, log_dir) -> AsyncIterator[dict[str, Any]]:
    """An instance whose retry schedule is 5 minutes, as in production, with one worker."""
    async with spawn(
        FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        FLUXBASE_WEBHOOKS_RETRY_SCHEDULE="300,300,300",
        FLUXBASE_WEBHOOKS_TIMEOUT_S="3",
    ) as inst:
        db = await asyncpg.connect(stack.database_url(inst.dbname))
        try:
            with run_worker(inst.env, log_dir, 25):
                deadline = time.monotonic() + 30
                while not await db.fetchval(
                    "SELECT count(*) FROM fluxbase.event_readers WHERE reader_id LIKE 'wh_%'"
                ):
                    assert time.monotonic() < deadline, "worker did not start"
                    await asyncio.sleep(0.1)
                yield {"url": inst.url, "db": db}
        finally:
            await db.close()


@pytest.fixture
async def wapi(slow_retries) -> AsyncIterator[Api]:
    client = Api(slow_retries["url"])
    yield client
    await client.close()


async def _hook_project(api: Api, url: str) -> tuple[str, str, str]:
    _, token = await api.new_user()
    pid = await api.new_project(token)
    key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
    await _ok_sql(api, key, pid, "CREATE TABLE orders (id serial PRIMARY KEY, amount int)")
    r = await api.http.post(
        "/api/webhooks",
        json={"projectId": pid, "url": url, "events": ["row.inserted"], "tables": ["orders"]},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    return pid, key, r.json()["webhook"]["id"]


async def _first_failure(api: Api, key: str, hook_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        r = await api.http.get(f"/api/webhooks/{hook_id}/deliveries", headers=bearer(key))
        ds = r.json()["deliveries"]
        if ds and ds[-1]["attempts"] >= 1:
            return dict(ds[-1])
        assert time.monotonic() < deadline, ds
        await asyncio.sleep(0.05)


async def test_redeliver_sends_at_once_after_the_receiver_is_fixed(wapi: Api) -> None:
    receiver = await Receiver().start()
    try:
        receiver.status = 500
        pid, key, hook_id = await _hook_project(wapi, receiver.url)
        await _ok_sql(wapi, key, pid, "INSERT INTO orders (amount) VALUES (1), (2)")
        failed = await _first_failure(wapi, key, hook_id)
        assert failed["status"] == "pending" and failed["error"] == "HTTP 500"

        # The endpoint says why it is stuck and when it tries again.
        r = await wapi.http.get(f"/api/webhooks/{hook_id}", headers=bearer(key))
        queue = r.json()["webhook"]["queue"]
        assert queue["pending"] == 2 and queue["blocked"] is True, queue
        assert queue["lastError"] == "HTTP 500" and queue["blockedBy"] == failed["id"]
        assert queue["nextRetryAt"] == failed["nextRetryAt"] and queue["nextRetryAt"].endswith("Z")

        receiver.status = 200
        r = await wapi.http.post(
            f"/api/webhooks/{hook_id}/deliveries/{failed['id']}/redeliver", headers=bearer(key)
        )
        assert r.status_code == 202, r.text
        # The retry was five minutes away: both events (in order) arrive now instead.
        await receiver.wait(lambda: len(receiver.bodies()) >= 2, timeout=10)
        amounts = [b["data"]["new"]["amount"] for b in receiver.bodies()]
        assert amounts[:2] == [1, 2]
        deadline = time.monotonic() + 10  # the worker writes results after its requests
        while (await wapi.http.get(f"/api/webhooks/{hook_id}", headers=bearer(key))).json()["webhook"][
            "queue"
        ] != {
            "pending": 0,
            "blocked": False,
            "reason": None,
            "blockedBy": None,
            "lastError": None,
            "nextRetryAt": None,
        }:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await receiver.stop()


async def test_re_enabling_an_endpoint_sends_its_backlog_at_once(wapi: Api) -> None:
    receiver = await Receiver().start()
    try:
        receiver.status = 503
        pid, key, hook_id = await _hook_project(wapi, receiver.url)
        await _ok_sql(wapi, key, pid, "INSERT INTO orders (amount) VALUES (7)")
        await _first_failure(wapi, key, hook_id)
        r = await wapi.http.patch(f"/api/webhooks/{hook_id}", json={"enabled": False}, headers=bearer(key))
        assert r.status_code == 200, r.text
        receiver.status = 200
        r = await wapi.http.patch(f"/api/webhooks/{hook_id}", json={"enabled": True}, headers=bearer(key))
        assert r.status_code == 200, r.text
        await receiver.wait(lambda: len(receiver.bodies()) >= 1, timeout=10)
        assert receiver.bodies()[0]["data"]["new"]["amount"] == 7
    finally:
        await receiver.stop()


async def test_webhook_tables_must_exist(api: Api, project) -> None:
    await _ok_sql(api, project.admin_key, project.id, "CREATE TABLE orders (id serial)")
    base = {"projectId": project.id, "url": "https://1.1.1.1/hook", "events": ["row.inserted"]}
    r = await api.http.post(
        "/api/webhooks", json={**base, "tables": ["nosuch"]}, headers=bearer(project.admin_key)
    )
    body = assert_error(r, 400, "VALIDATION_ERROR")
    assert "nosuch" in body["error"]["message"] and "orders" in body["error"]["message"]
    r = await api.http.post(
        "/api/webhooks", json={**base, "tables": ["orders"]}, headers=bearer(project.admin_key)
    )
    assert r.status_code == 201, r.text
    hook_id = r.json()["webhook"]["id"]
    r = await api.http.patch(
        f"/api/webhooks/{hook_id}", json={"tables": ["orders", "nosuch"]}, headers=bearer(project.admin_key)
    )
    assert_error(r, 400, "VALIDATION_ERROR")


# -- 6. errors in our words ---------------------------------------------------------------------


async def test_two_statements_in_one_query_point_at_execute_batch(api: Api, project) -> None:
    r = await api.sql(project.admin_key, project.id, "SELECT 1; SELECT 2")
    body = r.json()
    assert r.status_code == 200 and body["success"] is False
    assert body["error"]["code"] == "SQL_EXEC_ERROR" and body["error"]["details"] == "ERROR:  42601"
    message = body["error"]["message"]
    assert "prepared statement" not in message
    assert "one statement" in message.lower() and "/api/execute-batch" in message


async def test_a_bad_parameter_is_named_in_our_words(api: Api, project) -> None:
    r = await api.sql(project.admin_key, project.id, "SELECT $1::int AS n", ["twelve"])
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == "SQL_EXEC_ERROR"
    message = body["error"]["message"]
    assert "invalid literal" not in message and "base 10" not in message
    assert "$1" in message and "integer" in message and "'twelve'" in message


async def test_refused_connection_wording(wapi: Api) -> None:
    port = free_port()
    _, token = await wapi.new_user()
    pid = await wapi.new_project(token)
    key = await wapi.new_key(token, pid, "admin")
    r = await wapi.http.post(
        "/api/webhooks",
        json={"projectId": pid, "url": f"http://127.0.0.1:{port}/hook", "events": ["row.inserted"]},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    r = await wapi.http.post(f"/api/webhooks/{r.json()['webhook']['id']}/test", headers=bearer(key))
    error = r.json()["delivery"]["error"]
    assert "ssl:" not in error and "[" not in error, error
    assert error == f"could not connect to 127.0.0.1:{port}: connection refused"


async def test_an_unknown_role_lists_the_valid_ones(api: Api, project) -> None:
    r = await api.http.post(
        "/api/team",
        json={"projectId": project.id, "email": "x@example.com", "role": "owner"},
        headers=bearer(project.owner_token),
    )
    body = assert_error(r, 400, "VALIDATION_ERROR")
    message = body["error"]["message"]
    assert "enum" not in message.lower()
    assert "role" in message and all(role in message for role in ("admin", "developer", "viewer"))


async def test_a_rotated_key_is_told_so(api: Api, project) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "rotating", "scope": "read"},
        headers=bearer(project.owner_token),
    )
    old, key_id = r.json()["key"], r.json()["apiKey"]["id"]
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys/{key_id}/rotate", headers=bearer(project.owner_token)
    )
    assert r.status_code == 200, r.text
    for resp in (
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(old)),
        await api.sql(old, project.id, "SELECT 1"),
    ):
        body = assert_error(resp, 401, "AUTH_REQUIRED")
        assert "rotated" in body["error"]["message"], body


async def test_malformed_json_is_worded_once(api: Api, project) -> None:
    messages = set()
    for path in ("/api/execute-sql", "/api/execute-batch", "/api/webhooks", "/api/storage/buckets"):
        r = await api.http.post(
            path,
            content=b'{"projectId": "x", ',
            headers={**bearer(project.admin_key), "Content-Type": "application/json"},
        )
        body = assert_error(r, 400, "VALIDATION_ERROR")
        messages.add(body["error"]["message"])
    assert len(messages) == 1, messages
    assert "JSON" in messages.pop()


@pytest.fixture(scope="module")
def rt(instance, log_dir):
    with _realtime(instance, log_dir) as url:
        yield url


async def test_subscribing_to_an_unknown_project_says_project_not_found(api: Api, project, rt) -> None:
    missing = "0123456789abcdef"
    r = await api.http.get(f"/api/projects/{missing}", headers=bearer(project.admin_key))
    assert_error(r, 404, "PROJECT_NOT_FOUND")
    async with connect(f"{rt}/?token={project.admin_key}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{missing}"}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert msg["type"] == "error", msg
    assert msg["error"]["code"] == "PROJECT_NOT_FOUND", msg


# -- 5. export carries the ledger; import checks credentials first ------------------------------


def _cli(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxbase", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


async def test_export_import_keeps_the_migration_ledger(api: Api, project, instance, tmp_path: Path) -> None:
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    (mdir / "0001_orders.sql").write_text("CREATE TABLE orders (id serial PRIMARY KEY, amount int);\n")
    (mdir / "0002_amount_index.sql").write_text("CREATE INDEX orders_amount ON orders (amount);\n")
    env = {**instance.env, "FLUXBASE_URL": instance.url, "FLUXBASE_KEY": project.admin_key}
    res = _cli("migrations", "push", str(mdir), "--project", project.id, env=env)
    assert res.returncode == 0, res.stderr
    dump = tmp_path / "export.sql"
    res = _cli("export", "--project", project.id, "-o", str(dump), env=env)
    assert res.returncode == 0, res.stderr
    assert "-- fluxbase-migration name=0001_orders " in dump.read_text()

    res = _cli("import", str(dump), env={**env, "FLUXBASE_KEY": project.owner_token})
    assert res.returncode == 0, res.stderr
    new_id = re.search(r"new project (\w+)", res.stdout).group(1)  # type: ignore[union-attr]
    r = await api.http.get(f"/api/projects/{new_id}/migrations", headers=bearer(project.owner_token))
    assert [m["name"] for m in r.json()["migrations"]] == ["0001_orders", "0002_amount_index"]
    # Pushing the same folder to the copy skips both instead of failing with "already exists".
    new_key = await api.new_key(project.owner_token, new_id, "admin")
    res = _cli("migrations", "push", str(mdir), "--project", new_id, env={**env, "FLUXBASE_KEY": new_key})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["skipped 0001_orders", "skipped 0002_amount_index"]


async def test_import_refuses_an_api_key_before_uploading(project, instance, tmp_path: Path) -> None:
    dump = tmp_path / "big.sql"
    dump.write_bytes(
        b"-- fluxbase-export format=1 schema=p_0123456789abcdef created=x\n" + b"-- x\n" * 2_000_000
    )
    env = {**instance.env, "FLUXBASE_URL": instance.url, "FLUXBASE_KEY": project.admin_key}
    res = _cli("import", str(dump), env=env)
    assert res.returncode == 1
    assert "AUTH_REQUIRED" in res.stderr and "session" in res.stderr
    assert "import [" not in res.stderr and "MiB" not in res.stderr  # no upload was started


# -- 9. small things ------------------------------------------------------------------------------


async def test_invitations_lower_case_the_email(api: Api, project) -> None:
    user = await api.register(email=f"Mixed.Case-{time.time_ns()}@Example.COM")
    r = await api.http.post(
        "/api/team",
        json={"projectId": project.id, "email": user["email"], "role": "viewer"},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 201, r.text
    assert r.json()["invite"]["email"] == user["email"].lower()


async def test_rate_limit_headers(api: Api, project) -> None:
    key = await api.new_key(project.owner_token, project.id, "read", rateLimitRequests=3, rateLimitWindowS=60)
    first = await api.sql(key, project.id, "SELECT 1")
    assert first.headers["x-ratelimit-limit"] == "3"
    assert first.headers["x-ratelimit-remaining"] == "2"
    assert 0 < int(first.headers["x-ratelimit-reset"]) <= 60
    second = await api.http.get(f"/api/projects/{project.id}", headers=bearer(key))
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining"] == "1"
    await api.sql(key, project.id, "SELECT 1")
    refused = await api.sql(key, project.id, "SELECT 1")
    assert_error(refused, 429, "RATE_LIMIT")
    assert refused.headers["x-ratelimit-limit"] == "3" and refused.headers["x-ratelimit-remaining"] == "0"
    assert int(refused.headers["x-ratelimit-reset"]) == int(refused.headers["retry-after"])


async def test_event_timestamps_end_in_z_like_the_api(api: Api, project, rt) -> None:
    await _ok_sql(api, project.admin_key, project.id, "CREATE TABLE ticks (id serial)")
    async with connect(f"{rt}/?token={project.admin_key}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
        await _ok_sql(api, project.admin_key, project.id, "INSERT INTO ticks DEFAULT VALUES")
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg["type"] == "db_event":
                break
    r = await api.http.get(f"/api/projects/{project.id}", headers=bearer(project.admin_key))
    api_ts = r.json()["project"]["createdAt"]
    assert api_ts.endswith("Z") and msg["timestamp"].endswith("Z"), (api_ts, msg["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", msg["timestamp"]), msg["timestamp"]


# -- 7. OpenAPI pages without a CDN -------------------------------------------------------------


async def test_openapi_pages_use_packaged_assets(api: Api) -> None:
    for page in ("/schema", "/schema/redoc", "/schema/swagger"):
        r = await api.http.get(page)
        assert r.status_code == 200, (page, r.status_code)
        scripts = re.findall(r'<script[^>]+src="([^"]+)"', r.text) + re.findall(
            r'<link[^>]+href="([^"]+)"', r.text
        )
        assert scripts, r.text[:500]
        assert "cdn" not in r.text and "googleapis" not in r.text and "unpkg" not in r.text
        for src in scripts:
            assert not src.startswith(("http:", "https:", "//")), (page, src)
            asset = await api.http.get(src)
            assert asset.status_code == 200 and len(asset.content) > 1000, (src, asset.status_code)
    licence = await api.http.get("/schema/assets/LICENSES.txt")
    assert licence.status_code == 200 and "MIT" in licence.text
    assert httpx.URL(api.base_url).host == "127.0.0.1"
