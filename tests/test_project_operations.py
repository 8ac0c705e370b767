"""Vacuum, the read-only switch, quotas and suspend/resume, through the HTTP API."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect

from support import Api, assert_error, bearer
from test_realtime import _realtime, rt  # noqa: F401  (the module-scoped realtime service fixture)


@pytest.fixture
async def project(api: Api, project):
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


async def _ok(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True, body
    return dict(body)


async def _upload(api: Api, key: str, pid: str, bucket: str, data: bytes, name: str = "f.bin") -> Any:
    return await api.http.post(
        "/api/storage/upload",
        data={"bucketId": bucket, "projectId": pid},
        files={"file": (name, data, "application/octet-stream")},
        headers=bearer(key),
    )


async def _no_capture(api: Api, key: str, pid: str, table: str) -> None:
    """Realtime off for `table`: its writes put no bytes in the outbox, which the project's size
    counts until retention trims them (sql/0022; tests/test_caps_outbox.py has captured tables)."""
    r = await api.http.post(
        "/api/realtime/disable", json={"projectId": pid, "tables": [table]}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text


async def test_vacuum_reports_sizes(api: Api, project) -> None:
    key, pid = project.admin_key, project.id
    await _ok(await api.sql(key, pid, "CREATE TABLE big (v text)"))
    await _no_capture(api, key, pid, "big")
    await _ok(
        await api.sql(key, pid, "INSERT INTO big SELECT repeat('x', 500) FROM generate_series(1, 4000)")
    )
    await _ok(await api.sql(key, pid, "DELETE FROM big"))
    r = await api.http.post(f"/api/projects/{pid}/vacuum", headers=bearer(key))
    body = await _ok(r)
    assert body["tables"] == 1
    assert body["sizeBefore"] > 2_000_000  # 4000 rows of ~500 bytes
    assert body["sizeAfter"] < body["sizeBefore"] // 10  # empty pages at the end are truncated
    assert isinstance(body["durationMs"], int) and body["durationMs"] >= 0
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    # Vacuum reports the relations; the size adds the outbox (here one CREATE TABLE event).
    assert 0 < (await _ok(r))["quotas"]["databaseUsedBytes"] - body["sizeAfter"] < 1024
    # Vacuum is an admin operation.
    rw = await api.new_key(project.owner_token, pid, "readwrite")
    assert_error(
        await api.http.post(f"/api/projects/{pid}/vacuum", headers=bearer(rw)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )


async def test_read_only_refuses_writes_for_every_caller(api: Api, project) -> None:
    key, pid, owner = project.admin_key, project.id, project.owner_token
    rw = await api.new_key(owner, pid, "readwrite", rateLimitRequests=1_000_000)
    await _ok(await api.sql(key, pid, "CREATE TABLE t (v int)"))
    await _ok(await api.sql(rw, pid, "INSERT INTO t VALUES (1)"))  # the key is now in the API's cache
    r = await api.http.post(
        "/api/storage/buckets", json={"projectId": pid, "name": "docs"}, headers=bearer(key)
    )
    assert r.status_code == 201, r.text

    # Only MANAGE may flip the switch.
    r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": True}, headers=bearer(rw))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": True}, headers=bearer(owner))
    assert (await _ok(r))["project"]["readOnly"] is True

    for cred in (key, rw, owner):
        assert_error(await api.sql(cred, pid, "INSERT INTO t VALUES (2)"), 403, "PROJECT_READ_ONLY")
        assert_error(await api.sql(cred, pid, "CREATE TABLE u (v int)"), 403, "PROJECT_READ_ONLY")
        r = await api.sql(cred, pid, "SELECT count(*)::int AS n FROM t")
        assert (await _ok(r))["result"]["rows"] == [{"n": 1}]
        assert_error(await _upload(api, cred, pid, "docs", b"hello"), 403, "PROJECT_READ_ONLY")
        r = await api.http.post(
            f"/api/projects/{pid}/migrations",
            json={"name": "m1", "sql": "CREATE TABLE m (x int)"},
            headers=bearer(cred),
        )
        assert r.status_code == 403 and r.json()["error"]["code"] in (
            "PROJECT_READ_ONLY",
            "INSUFFICIENT_PERMISSIONS",
        )
        # execute-batch and records REST share the transaction path, and the answer.
        r = await api.http.post(
            "/api/execute-batch",
            json={
                "projectId": pid,
                "statements": [{"query": "SELECT 1"}, {"query": "INSERT INTO t VALUES (3)"}],
            },
            headers=bearer(cred),
        )
        assert_error(r, 403, "PROJECT_READ_ONLY")
        r = await api.http.post(f"/api/projects/{pid}/tables/t/records", json={"v": 4}, headers=bearer(cred))
        assert_error(r, 403, "PROJECT_READ_ONLY")
        r = await api.http.get(f"/api/projects/{pid}/tables/t/records", headers=bearer(cred))
        assert (await _ok(r))["records"] == [{"v": 1}]
    # Reads of storage and settings keep working.
    r = await api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=bearer(rw))
    assert r.status_code == 200, r.text

    r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": False}, headers=bearer(key))
    assert (await _ok(r))["project"]["readOnly"] is False
    # A batch that asked for READ ONLY itself gets the SQL error, not the project's code.
    r = await api.http.post(
        "/api/execute-batch",
        json={"projectId": pid, "readOnly": True, "statements": [{"query": "INSERT INTO t VALUES (3)"}]},
        headers=bearer(rw),
    )
    body = r.json()
    assert r.status_code == 200 and body["success"] is False and body["error"]["details"] == "ERROR:  25006"
    await _ok(await api.sql(rw, pid, "INSERT INTO t VALUES (2)"))
    r = await _upload(api, rw, pid, "docs", b"hello")
    assert r.status_code == 201, r.text


async def test_database_quota_crossing_and_recovery(api: Api, project, instance_admin) -> None:
    key, pid = project.admin_key, project.id
    root = instance_admin["token"]
    await _ok(await api.sql(key, pid, "CREATE TABLE blob (v text)"))
    await _no_capture(api, key, pid, "blob")
    # Only an instance admin sets quotas; the project's own admin cannot raise its cap.
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas", json={"databaseBytes": 1}, headers=bearer(project.owner_token)
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    await _ok(
        await api.sql(key, pid, "INSERT INTO blob SELECT repeat('x', 1000) FROM generate_series(1, 250)")
    )
    r = await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))
    used = (await _ok(r))["quotas"]["databaseUsedBytes"]
    # A cap with the project at ~82% of it: from there on every write is measured before COMMIT.
    cap = int(used / 0.82)
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas", json={"databaseBytes": cap}, headers=bearer(root)
    )
    assert (await _ok(r))["quotas"]["databaseBytes"] == cap
    batch = "INSERT INTO blob SELECT repeat('x', 1000) FROM generate_series(1, 40)"  # ~41 KB
    committed = 250
    for _ in range(30):
        r = await api.sql(key, pid, batch)
        if r.status_code != 200:
            break
        await _ok(r)
        committed += 40
    body = assert_error(r, 413, "DATABASE_QUOTA_EXCEEDED")
    assert body["error"]["limitBytes"] == cap and body["error"]["sizeBytes"] > cap
    assert (
        str(cap) in body["error"]["message"] and str(body["error"]["sizeBytes"]) in body["error"]["message"]
    )
    assert committed >= 250
    # The refused write left nothing; reads keep working; further growth is refused.
    r = await api.sql(key, pid, "SELECT count(*)::int AS n FROM blob")
    assert (await _ok(r))["result"]["rows"] == [{"n": committed}]
    assert_error(await api.sql(key, pid, "INSERT INTO blob VALUES ('y')"), 413, "DATABASE_QUOTA_EXCEEDED")
    assert_error(await api.sql(key, pid, "CREATE TABLE more (v int)"), 413, "DATABASE_QUOTA_EXCEEDED")
    # The same cap holds on execute-batch and records REST.
    r = await api.http.post(
        "/api/execute-batch",
        json={"projectId": pid, "statements": [{"query": "INSERT INTO blob VALUES ('z')"}]},
        headers=bearer(key),
    )
    assert_error(r, 413, "DATABASE_QUOTA_EXCEEDED")
    r = await api.http.post(f"/api/projects/{pid}/tables/blob/records", json={"v": "z"}, headers=bearer(key))
    assert_error(r, 413, "DATABASE_QUOTA_EXCEEDED")
    # Deleting is allowed over the cap; vacuum gives the space back; writes work again.
    await _ok(await api.sql(key, pid, "DELETE FROM blob"))
    vac = await _ok(await api.http.post(f"/api/projects/{pid}/vacuum", headers=bearer(key)))
    assert vac["sizeBefore"] > cap >= vac["sizeAfter"]
    await _ok(await api.sql(key, pid, batch))
    # Sessions go through the same check.
    await _ok(await api.sql(project.owner_token, pid, batch))
    # Lifting the cap (null) removes the limit.
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas", json={"databaseBytes": None}, headers=bearer(root)
    )
    assert (await _ok(r))["quotas"]["databaseBytes"] is None


async def test_storage_and_request_quotas_are_exposed(api: Api, project, instance_admin) -> None:
    pid, root, owner = project.id, instance_admin["token"], project.owner_token
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"storageBytes": 1000, "maxFileSize": 800, "rateLimitRequests": 3, "rateLimitWindowSeconds": 60},
        headers=bearer(root),
    )
    q = (await _ok(r))["quotas"]
    assert (q["storageBytes"], q["maxFileSize"], q["rateLimitRequests"], q["rateLimitWindowSeconds"]) == (
        1000,
        800,
        3,
        60,
    )
    assert_error(
        await api.http.patch(
            f"/api/admin/projects/{pid}/quotas", json={"storageBytes": -5}, headers=bearer(root)
        ),
        400,
        "VALIDATION_ERROR",
    )
    assert_error(
        await api.http.patch(f"/api/admin/projects/{pid}/quotas", json={"bogus": 1}, headers=bearer(root)),
        400,
        "VALIDATION_ERROR",
    )
    r = await api.http.post(
        "/api/storage/buckets", json={"projectId": pid, "name": "q"}, headers=bearer(project.admin_key)
    )
    assert r.status_code == 201, r.text
    r = await _upload(api, project.admin_key, pid, "q", b"a" * 700, "one.bin")
    assert r.status_code == 201, r.text
    r = await _upload(api, project.admin_key, pid, "q", b"b" * 700, "two.bin")
    assert r.status_code == 413 and r.json()["error"]["code"] in (
        "STORAGE_QUOTA_EXCEEDED",
        "PAYLOAD_TOO_LARGE",
    )
    q = (await _ok(await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(owner))))["quotas"]
    assert q["storageUsedBytes"] == 700
    # The project's request limit applies to callers without their own (a session here).
    codes = [(await api.sql(owner, pid, "SELECT 1")).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200] and codes[3] == 429


async def test_suspend_and_resume(api: Api, project, instance_admin, rt) -> None:  # noqa: F811
    key, pid, owner, root = project.admin_key, project.id, project.owner_token, instance_admin["token"]
    await _ok(await api.sql(key, pid, "CREATE TABLE t (v int)"))  # key cached by the API
    assert_error(
        await api.http.post(f"/api/admin/projects/{pid}/suspend", headers=bearer(owner)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(
        await api.http.post(f"/api/admin/projects/{pid}/suspend", headers=bearer(key)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    r = await api.http.post(f"/api/admin/projects/{pid}/suspend", headers=bearer(root))
    assert (await _ok(r))["project"]["status"] == "suspended"

    calls = [
        api.sql(key, pid, "SELECT 1"),
        api.sql(owner, pid, "SELECT 1"),
        api.http.get(f"/api/projects/{pid}", headers=bearer(owner)),
        api.http.get(f"/api/projects/{pid}/api-keys", headers=bearer(key)),
        api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=bearer(key)),
        api.http.get(f"/api/projects/{pid}/migrations", headers=bearer(key)),
        api.http.post(f"/api/projects/{pid}/vacuum", headers=bearer(key)),
        api.http.get(f"/api/projects/{pid}/export", headers=bearer(key)),
        api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(owner)),
    ]
    for call in calls:
        assert_error(await call, 403, "PROJECT_SUSPENDED")
    async with connect(rt) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}", "token": key}))
        msg = json.loads(await ws.recv())
        assert msg["type"] == "error" and msg["error"]["code"] == "PROJECT_SUSPENDED"

    r = await api.http.post(f"/api/admin/projects/{pid}/resume", headers=bearer(root))
    assert (await _ok(r))["project"]["status"] == "active"
    await _ok(await api.sql(key, pid, "SELECT 1"))
    await _ok(await api.sql(owner, pid, "SELECT 1"))
    assert_error(
        await api.http.post("/api/admin/projects/0123456789abcdef/suspend", headers=bearer(root)),
        404,
        "PROJECT_NOT_FOUND",
    )


async def test_instance_admins_list_every_project_and_nobody_else_does(
    api: Api, project, instance_admin
) -> None:
    pid, root = project.id, instance_admin["token"]
    stranger, stranger_token = await api.new_user()
    other = await api.new_project(stranger_token, "stranger's")
    for denied in (project.owner_token, project.admin_key, stranger_token):
        assert_error(
            await api.http.get("/api/admin/projects", headers=bearer(denied)), 403, "INSUFFICIENT_PERMISSIONS"
        )
    assert_error(await api.http.get("/api/admin/projects"), 401, "AUTH_REQUIRED")
    body = await _ok(await api.http.get("/api/admin/projects", params={"limit": 1}, headers=bearer(root)))
    # Newest first: the stranger's project, then (on the next page) the fixture's.
    assert [p["id"] for p in body["projects"]] == [other]
    assert body["projects"][0]["ownerEmail"] == stranger["email"] and body["projects"][0]["members"] == 1
    assert body["projects"][0]["status"] == "active" and body["nextCursor"] == other
    body = await _ok(
        await api.http.get(
            "/api/admin/projects", params={"limit": 1, "after": body["nextCursor"]}, headers=bearer(root)
        )
    )
    assert [p["id"] for p in body["projects"]] == [pid]
    assert body["projects"][0]["ownerEmail"] == project.owner["email"]
    await _ok(await api.http.post(f"/api/admin/projects/{pid}/suspend", headers=bearer(root)))
    body = await _ok(await api.http.get("/api/admin/projects", params={"limit": 5}, headers=bearer(root)))
    assert {p["id"]: p["status"] for p in body["projects"]}[pid] == "suspended"
    await _ok(await api.http.post(f"/api/admin/projects/{pid}/resume", headers=bearer(root)))
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}):
        assert_error(
            await api.http.get("/api/admin/projects", params=bad, headers=bearer(root)),
            400,
            "VALIDATION_ERROR",
        )


async def test_suspension_ends_live_subscriptions(
    api: Api, project, instance_admin, instance, log_dir
) -> None:
    key, pid, root = project.admin_key, project.id, instance_admin["token"]
    await _ok(await api.sql(key, pid, "CREATE TABLE t (v int)"))
    with _realtime(instance, log_dir, FLUXBASE_REALTIME_PING_SECONDS="1") as url:
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}", "token": key}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            await _ok(await api.sql(key, pid, "INSERT INTO t VALUES (1)"))
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert msg["type"] == "db_event" and msg["payload"]["record"] == {"v": 1}
            await _ok(await api.http.post(f"/api/admin/projects/{pid}/suspend", headers=bearer(root)))
            # The next round of the service's ping loop ends the subscription with the documented code.
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert msg["type"] == "error" and msg["error"]["code"] == "PROJECT_SUSPENDED", msg
            assert msg["roomId"] == f"project_{pid}"
            # Nothing of the project reaches the socket any more, and it cannot broadcast there.
            await ws.send(
                json.dumps({"type": "broadcast", "roomId": f"project_{pid}", "event": "x", "payload": {}})
            )
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert msg["type"] == "error" and msg["error"]["code"] == "AUTH_REQUIRED"
            await api.http.post(f"/api/admin/projects/{pid}/resume", headers=bearer(root))
            await _ok(await api.sql(key, pid, "INSERT INTO t VALUES (2)"))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 1.5)
