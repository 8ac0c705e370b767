"""A deleted project's keys answer 401 AUTH_REQUIRED on every surface (issue 15, finding 9).

The keys are used first, so every cache the API keeps (the key cache of the SQL hot path, the
tenant pools and their prepared request prefix) holds the project when it is deleted.
"""

from __future__ import annotations

from typing import Any

import httpx

from fluxbase.devstack.procs import free_port
from support import Api, assert_error, bearer, run_service

NEVER = ("Traceback", "asyncpg", "p_", "auth_epochs")


def _refused(r: httpx.Response) -> None:
    assert_error(r, 401, "AUTH_REQUIRED")
    for s in NEVER:
        assert s not in r.text, (s, r.text)


async def _surfaces(api: Api, pid: str, key: str) -> list[tuple[str, httpx.Response]]:
    h = bearer(key)
    calls: list[tuple[str, Any]] = [
        ("execute-sql", api.sql(key, pid, "SELECT 1 AS one")),
        ("execute-sql-write", api.sql(key, pid, "INSERT INTO notes (body) VALUES ('x')")),
        (
            "execute-batch",
            api.http.post(
                "/api/execute-batch",
                json={"projectId": pid, "statements": [{"query": "SELECT 1"}]},
                headers=h,
            ),
        ),
        ("records-list", api.http.get(f"/api/projects/{pid}/tables/notes/records", headers=h)),
        (
            "records-create",
            api.http.post(f"/api/projects/{pid}/tables/notes/records", json={"body": "y"}, headers=h),
        ),
        ("tables", api.http.get(f"/api/projects/{pid}/tables", headers=h)),
        ("schema", api.http.get("/api/schema", params={"projectId": pid}, headers=h)),
        ("buckets", api.http.get("/api/storage/buckets", params={"projectId": pid}, headers=h)),
        (
            "files",
            api.http.get("/api/storage/files", params={"projectId": pid, "bucketId": "docs"}, headers=h),
        ),
        ("realtime-token", api.http.post("/api/realtime/token", json={"projectId": pid}, headers=h)),
        ("version", api.http.get("/api/version", params={"projectId": pid}, headers=h)),
        (
            "upload-url",
            api.http.post(
                "/api/storage/upload-url",
                json={"projectId": pid, "bucketId": "docs", "name": "a.txt", "size": 1},
                headers=h,
            ),
        ),
        (
            "broadcast",
            api.http.post("/api/realtime/broadcast", json={"projectId": pid, "event": "e"}, headers=h),
        ),
    ]
    out = []
    for name, call in calls:
        out.append((name, await call))
    return out


async def _warm_project(api: Api) -> tuple[str, str, list[str]]:
    """A project with a table and a bucket whose admin and read keys have been used."""
    _, token = await api.new_user()
    pid = await api.new_project(token)
    admin = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
    read = await api.new_key(token, pid, "read", rateLimitRequests=1_000_000)
    r = await api.sql(admin, pid, "CREATE TABLE notes (id bigserial PRIMARY KEY, body text)")
    assert r.status_code == 200 and r.json()["success"], r.text
    r = await api.http.post(
        "/api/storage/buckets", json={"projectId": pid, "name": "docs"}, headers=bearer(admin)
    )
    assert r.status_code == 201, r.text
    # Warm every cache: the hot path twice per key (the key cache and the prepared prefix).
    for key in (admin, read, admin, read):
        r = await api.sql(key, pid, "SELECT count(*) AS n FROM notes")
        assert r.status_code == 200 and r.json()["success"], r.text
    for name, resp in await _surfaces(api, pid, read):
        assert resp.status_code in (200, 201, 403), (name, resp.text)
    return pid, token, [admin, read]


async def _all_refused(api: Api, pid: str, keys: list[str]) -> None:
    for key in keys:
        for name, resp in await _surfaces(api, pid, key):
            try:
                _refused(resp)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None
        # And again: a refusal is not cached as something else.
        _refused(await api.sql(key, pid, "SELECT 1"))


async def test_deleted_projects_used_keys_get_auth_required_everywhere(api: Api, instance_admin) -> None:
    pid, token, keys = await _warm_project(api)
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code == 200, r.text
    await _all_refused(api, pid, keys)


async def test_project_deleted_through_another_replica(api: Api, instance, log_dir, instance_admin) -> None:
    """The replica that deleted nothing still has the keys cached: it must answer 401 as well."""
    pid, token, keys = await _warm_project(api)
    port = free_port()
    with run_service(["api"], {**instance.env, "FLUXBASE_API_PORT": str(port)}, port, log_dir) as other:
        replica = Api(other.url)
        try:
            r = await replica.http.delete(f"/api/projects/{pid}", headers=bearer(token))
            assert r.status_code == 200, r.text
        finally:
            await replica.close()
    await _all_refused(api, pid, keys)
