"""The policy API: list, create, drop, enable/force, against real tables and real end-user reads."""

from __future__ import annotations

from typing import Any

import pytest

from fluxbase.config import ConfigError, load_settings
from support import Api, assert_error, bearer


def _url(pid: str, tail: str = "") -> str:
    return f"/api/projects/{pid}/rls{tail}"


async def _sql(api: Api, key: str, pid: str, q: str, **extra: Any) -> dict[str, Any]:
    body = (await api.sql(key, pid, q, **extra)).json()
    assert body["success"], body
    return body


async def _posts(api: Api, project) -> None:
    await _sql(
        api,
        project.admin_key,
        project.id,
        "CREATE TABLE posts (id serial PRIMARY KEY, user_id text, body text)",
    )
    await _sql(
        api,
        project.admin_key,
        project.id,
        "INSERT INTO posts (user_id, body) VALUES ('u1', 'a'), ('u1', 'b'), ('u2', 'c')",
    )


async def _bodies(api: Api, key: str, pid: str, uid: str) -> list[str]:
    got = await _sql(api, key, pid, "SELECT body FROM posts ORDER BY body", authUid=uid)
    return [r["body"] for r in got["result"]["rows"]]


async def test_step_by_step_setup_through_the_api(api: Api, project) -> None:
    await _posts(api, project)
    ro = await api.new_key(project.owner_token, project.id, "read")
    h = bearer(project.admin_key)
    r = await api.http.get(_url(project.id), headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["tables"] == [{"name": "posts", "rlsEnabled": False, "rlsForced": False, "policies": []}]

    r = await api.http.post(
        _url(project.id, "/policies"),
        json={"table": "posts", "name": "own rows", "command": "select", "using": "user_id = auth.uid()"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    table = r.json()["table"]
    # The guide's step 03: the policy is switched on with its table's RLS, and the answer says so.
    assert table["rlsEnabled"] is True and r.json()["rlsEnabledNow"] is True
    assert table["policies"] == [
        {
            "name": "own rows",
            "command": "SELECT",
            "permissive": True,
            "roles": ["public"],
            "using": "(user_id = auth.uid())",
            "withCheck": None,
        }
    ]
    # Switched off again, the read key sees every row; on, only the policy's.
    r = await api.http.post(_url(project.id, "/tables/posts"), json={"enabled": False}, headers=h)
    assert r.status_code == 200, r.text
    assert await _bodies(api, ro, project.id, "u1") == ["a", "b", "c"]

    r = await api.http.post(_url(project.id, "/tables/posts"), json={"enabled": True}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["table"]["rlsEnabled"] is True and r.json()["table"]["rlsForced"] is False
    assert await _bodies(api, ro, project.id, "u1") == ["a", "b"]
    assert await _bodies(api, ro, project.id, "u2") == ["c"]
    # The admin key owns the table: it bypasses RLS until FORCE.
    assert await _bodies(api, project.admin_key, project.id, "u2") == ["a", "b", "c"]
    r = await api.http.post(_url(project.id, "/tables/posts"), json={"forced": True}, headers=h)
    assert r.json()["table"]["rlsForced"] is True
    assert await _bodies(api, project.admin_key, project.id, "u2") == ["c"]
    r = await api.http.post(_url(project.id, "/tables/posts"), json={"forced": False}, headers=h)
    assert r.json()["table"] == {**r.json()["table"], "rlsEnabled": True, "rlsForced": False}

    # A second policy with WITH CHECK, restrictive, for INSERT.
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    r = await api.http.post(
        _url(project.id, "/policies"),
        json={
            "table": "posts",
            "name": "insert own",
            "command": "INSERT",
            "withCheck": "user_id = auth.uid()",
        },
        headers=h,
    )
    assert r.status_code == 201, r.text
    ok = await api.sql(rw, project.id, "INSERT INTO posts (user_id, body) VALUES ('u1', 'd')", authUid="u1")
    assert ok.json()["success"], ok.text
    denied = (
        await api.sql(rw, project.id, "INSERT INTO posts (user_id, body) VALUES ('u2', 'e')", authUid="u1")
    ).json()
    assert denied["success"] is False and "row-level security" in denied["error"]["message"]

    r = await api.http.get(_url(project.id), headers=h)
    (posts,) = r.json()["tables"]
    assert [(p["name"], p["command"], p["withCheck"]) for p in posts["policies"]] == [
        ("insert own", "INSERT", "(user_id = auth.uid())"),
        ("own rows", "SELECT", None),
    ]

    # Drop the SELECT policy: RLS on with no SELECT policy hides everything from end users.
    r = await api.http.delete(_url(project.id, "/policies/posts/own rows"), headers=h)
    assert r.status_code == 200, r.text
    assert [p["name"] for p in r.json()["table"]["policies"]] == ["insert own"]
    assert await _bodies(api, ro, project.id, "u1") == []
    r = await api.http.post(_url(project.id, "/tables/posts"), json={"enabled": False}, headers=h)
    assert r.json()["table"]["rlsEnabled"] is False
    assert await _bodies(api, ro, project.id, "u1") == ["a", "b", "c", "d"]


async def test_errors_name_the_cause_and_leave_nothing_behind(api: Api, project) -> None:
    await _posts(api, project)
    h = bearer(project.admin_key)

    async def create(**body: Any):
        return await api.http.post(
            _url(project.id, "/policies"), json={"table": "posts", "name": "p", **body}, headers=h
        )

    # A column the table does not have: PostgreSQL's own message, 400.
    body = assert_error(await create(using="owner = auth.uid()"), 400, "VALIDATION_ERROR")
    assert (
        body["error"]["message"] == 'column "owner" does not exist' and body["error"]["sqlstate"] == "42703"
    )
    # Type mismatch (the doc's troubleshooting table): PostgreSQL names it.
    body = assert_error(await create(using="id = auth.uid()"), 400, "VALIDATION_ERROR")
    assert "operator does not exist: integer = text" in body["error"]["message"]
    # Unknown table in the body names it.
    r = await api.http.post(
        _url(project.id, "/policies"), json={"table": "nope", "name": "p", "using": "true"}, headers=h
    )
    assert 'table "nope" does not exist' in assert_error(r, 400, "VALIDATION_ERROR")["error"]["message"]
    # Shape errors before any SQL.
    assert_error(await create(command="MERGE", using="true"), 400, "VALIDATION_ERROR")
    assert_error(await create(command="SELECT"), 400, "VALIDATION_ERROR")
    assert_error(await create(command="INSERT", using="true"), 400, "VALIDATION_ERROR")
    assert_error(await create(command="SELECT", using="true", withCheck="true"), 400, "VALIDATION_ERROR")
    assert_error(await create(using="true", name=""), 400, "VALIDATION_ERROR")
    # Injection attempts: a second statement, or a clause of its own.
    body = assert_error(await create(using="true); DROP TABLE posts; --"), 400, "VALIDATION_ERROR")
    assert_error(await create(using="owner = $1"), 400, "VALIDATION_ERROR")
    assert_error(await create(using="user_id = 'x' /* unterminated"), 400, "VALIDATION_ERROR")
    body = assert_error(await create(using="true) WITH CHECK (true"), 400, "VALIDATION_ERROR")
    assert "single SQL expression" in body["error"]["message"]
    r = await api.sql(project.admin_key, project.id, "SELECT count(*) AS n FROM posts")
    assert r.json()["result"]["rows"] == [{"n": 3}]

    # Duplicate name: 409, and the first policy stays as it was.
    assert (await create(using="user_id = auth.uid()")).status_code == 201
    body = assert_error(await create(using="true"), 409, "CONFLICT")
    assert '"p"' in body["error"]["message"] and "already exists" in body["error"]["message"]
    (posts,) = (await api.http.get(_url(project.id), headers=h)).json()["tables"]
    assert [(p["name"], p["using"]) for p in posts["policies"]] == [("p", "(user_id = auth.uid())")]

    # Dropping or switching what does not exist: 404 naming it.
    body = assert_error(
        await api.http.delete(_url(project.id, "/policies/posts/q"), headers=h), 404, "NOT_FOUND"
    )
    assert '"q"' in body["error"]["message"]
    body = assert_error(
        await api.http.delete(_url(project.id, "/policies/nope/p"), headers=h), 404, "NOT_FOUND"
    )
    assert '"nope"' in body["error"]["message"]
    r = await api.http.post(_url(project.id, "/tables/nope"), json={"enabled": True}, headers=h)
    assert '"nope"' in assert_error(r, 404, "NOT_FOUND")["error"]["message"]
    assert_error(
        await api.http.post(_url(project.id, "/tables/posts"), json={}, headers=h), 400, "VALIDATION_ERROR"
    )


async def test_admin_scope_and_admin_role_only(api: Api, project) -> None:
    await _posts(api, project)
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    assert_error(await api.http.get(_url(project.id), headers=bearer(rw)), 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.http.post(
        _url(project.id, "/policies"),
        json={"table": "posts", "name": "p", "using": "true"},
        headers=bearer(rw),
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    assert_error(
        await api.http.post(_url(project.id, "/tables/posts"), json={"enabled": True}, headers=bearer(rw)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    # A developer member is not enough either; the owner (an admin member) is.
    dev, dev_token = await api.new_user()
    r = await api.http.post(
        "/api/team",
        json={"projectId": project.id, "email": dev["email"], "role": "developer"},
        headers=bearer(project.owner_token),
    )
    invite = r.json()["invite"]["id"]
    r = await api.http.post(
        "/api/team/invites/accept", json={"inviteId": invite, "status": "accepted"}, headers=bearer(dev_token)
    )
    assert r.status_code == 200, r.text
    assert_error(
        await api.http.get(_url(project.id), headers=bearer(dev_token)), 403, "INSUFFICIENT_PERMISSIONS"
    )
    assert (await api.http.get(_url(project.id), headers=bearer(project.owner_token))).status_code == 200
    # Another project's admin key: refused; no key: 401.
    other = await api.new_project(project.owner_token)
    assert_error(await api.http.get(_url(other), headers=bearer(project.admin_key)), 403, "SCOPE_MISMATCH")
    assert_error(await api.http.get(_url(project.id)), 401, "AUTH_REQUIRED")


async def test_realtime_setting_for_end_users(api: Api, project) -> None:
    h = bearer(project.admin_key)
    r = await api.http.get("/api/realtime/settings", params={"projectId": project.id}, headers=h)
    assert r.json()["settings"]["schemaEventsToUsers"] is False
    r = await api.http.post(
        "/api/realtime/settings", json={"projectId": project.id, "schemaEventsToUsers": True}, headers=h
    )
    assert r.status_code == 200 and r.json()["settings"]["schemaEventsToUsers"] is True
    ro = await api.new_key(project.owner_token, project.id, "read")
    r = await api.http.get("/api/realtime/settings", params={"projectId": project.id}, headers=bearer(ro))
    assert r.json()["settings"]["schemaEventsToUsers"] is True
    r = await api.http.post(
        "/api/realtime/settings",
        json={"projectId": project.id, "schemaEventsToUsers": False},
        headers=bearer(ro),
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")


async def test_openapi_lists_rls_operations(api: Api) -> None:
    spec = (await api.http.get("/schema/openapi.json")).json()
    op_ids = {
        op["operationId"] for path in spec["paths"].values() for op in path.values() if "operationId" in op
    }
    assert {
        "listRls",
        "createPolicy",
        "dropPolicy",
        "setTableRls",
        "getRealtimeSettings",
        "setRealtimeSettings",
    } <= op_ids


def test_rls_realtime_settings_are_checked() -> None:
    env = {
        "FLUXBASE_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db",
        "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:1",
        "FLUXBASE_S3_ACCESS_KEY": "a",
        "FLUXBASE_S3_SECRET_KEY": "b",
        "FLUXBASE_SECRET_KEY": "s" * 32,
    }
    s = load_settings(env).realtime
    assert (s.rls_pool_max, s.rls_timeout_ms) == (4, 2000)
    s = load_settings(
        {**env, "FLUXBASE_REALTIME_RLS_POOL_MAX": "2", "FLUXBASE_REALTIME_RLS_TIMEOUT_MS": "500"}
    )
    assert (s.realtime.rls_pool_max, s.realtime.rls_timeout_ms) == (2, 500)
    with pytest.raises(ConfigError, match="FLUXBASE_REALTIME_RLS_TIMEOUT_MS"):
        load_settings({**env, "FLUXBASE_REALTIME_RLS_TIMEOUT_MS": "0"})
