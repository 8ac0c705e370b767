"""Records REST: CRUD, filters, sorting and paging, hostile input, scopes, RLS and realtime."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from support import Api, assert_clean, assert_error, bearer
from test_realtime import _realtime, subscribe


@pytest.fixture
async def project(api: Api, project):
    """The shared project fixture, with an admin key that is not rate-limited."""
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


def url(pid: str, table: str, key: str | None = None) -> str:
    base = f"/api/projects/{pid}/tables/{quote(table, safe='')}/records"
    return base if key is None else f"{base}/{quote(key, safe='')}"


async def _sql(api: Api, key: str, pid: str, q: str) -> dict[str, Any]:
    body = (await api.sql(key, pid, q)).json()
    assert body["success"], (q, body)
    return dict(body)


async def _list(api: Api, key: str, pid: str, table: str = "items", **params: Any) -> httpx.Response:
    q = {k: (json.dumps(v) if k == "filter" and not isinstance(v, str) else v) for k, v in params.items()}
    r = await api.http.get(url(pid, table), params=q, headers=bearer(key))
    assert_clean(r)
    return r


async def _ids(api: Api, key: str, pid: str, **params: Any) -> list[int]:
    r = await _list(api, key, pid, **params)
    assert r.status_code == 200, r.text
    return [rec["id"] for rec in r.json()["records"]]


ITEMS = (
    "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, price numeric(10, 2), "
    "big bigint, tags jsonb, seen timestamptz, blob bytea, note text)"
)


async def _items(api: Api, project) -> None:
    await _sql(api, project.admin_key, project.id, ITEMS)
    rows = [
        {"id": 1, "name": "apple", "qty": 5, "price": "1.50", "note": None},
        {"id": 2, "name": "Banana", "qty": 0, "price": "0.25", "note": "ripe"},
        {"id": 3, "name": "cherry", "qty": 12, "price": "9.99", "note": "100% sweet"},
        {"id": 4, "name": "date", "qty": 5, "price": "4.00", "note": "dry_fruit"},
    ]
    r = await api.http.post(url(project.id, "items"), json=rows, headers=bearer(project.admin_key))
    assert r.status_code == 201, r.text
    assert r.json()["count"] == 4 and "record" not in r.json()


async def test_crud_and_json_faithful_values(api: Api, project) -> None:
    await _sql(api, project.admin_key, project.id, ITEMS)
    key, pid = project.admin_key, project.id
    record = {
        "id": 7,
        "name": "widget",
        "qty": "3",
        "price": "12.345",
        "big": "9007199254740993",
        "tags": {"a": [1, 2.5, None]},
        "seen": "2026-01-02T03:04:05+00:00",
        "blob": "AAEC",
    }
    r = await api.http.post(url(pid, "items"), json=record, headers=bearer(key))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["success"] is True and body["count"] == 1
    assert body["record"] == {
        "id": 7,
        "name": "widget",
        "qty": 3,
        "price": "12.35",
        "big": "9007199254740993",
        "tags": {"a": [1, 2.5, None]},
        "seen": "2026-01-02T03:04:05Z",
        "blob": "AAEC",
        "note": None,
    }
    assert body["records"] == [body["record"]]
    # The same row through execute-sql encodes identically.
    same = await _sql(api, key, pid, "SELECT * FROM items")
    assert same["result"]["rows"] == [body["record"]]
    r = await api.http.get(url(pid, "items", "7"), headers=bearer(key))
    assert r.status_code == 200 and r.json() == {"success": True, "record": body["record"]}
    r = await api.http.patch(url(pid, "items", "7"), json={"qty": 4, "note": "patched"}, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.json()["record"]["qty"] == 4 and r.json()["record"]["note"] == "patched"
    r = await api.http.delete(url(pid, "items", "7"), headers=bearer(key))
    assert r.status_code == 200 and r.json()["record"]["id"] == 7
    for method in ("get", "delete"):
        r = await api.http.request(method.upper(), url(pid, "items", "7"), headers=bearer(key))
        assert_error(r, 404, "NOT_FOUND")
    r = await api.http.patch(url(pid, "items", "7"), json={"qty": 1}, headers=bearer(key))
    assert_error(r, 404, "NOT_FOUND")
    # Constraint and type failures keep execute-sql's code and SQLSTATE, with a REST status.
    await api.http.post(url(pid, "items"), json={"id": 1}, headers=bearer(key))
    r = await api.http.post(url(pid, "items"), json=[{"id": 2}, {"id": 1}], headers=bearer(key))
    assert assert_error(r, 409, "SQL_EXEC_ERROR")["error"]["details"] == "ERROR:  23505"
    assert (await _sql(api, key, pid, "SELECT count(*)::int AS n FROM items"))["result"]["rows"] == [{"n": 1}]
    r = await api.http.post(url(pid, "items"), json={"id": 5, "qty": "many"}, headers=bearer(key))
    assert assert_error(r, 400, "SQL_EXEC_ERROR")["error"]["details"] == "ERROR:  22023"
    r = await api.http.get(url(pid, "items", "not-a-number"), headers=bearer(key))
    assert_error(r, 400, "SQL_EXEC_ERROR")
    for bad in ([], "text", [1, 2], [{}, {}]):
        r = await api.http.post(url(pid, "items"), json=bad, headers=bearer(key))
        assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.patch(url(pid, "items", "1"), json={}, headers=bearer(key))
    assert_error(r, 400, "VALIDATION_ERROR")


async def test_filter_operators(api: Api, project) -> None:
    await _items(api, project)
    key, pid = project.admin_key, project.id
    cases: list[tuple[Any, list[int]]] = [
        ({}, [1, 2, 3, 4]),
        ({"qty": 5}, [1, 4]),
        ({"qty": "5"}, [1, 4]),
        ({"qty": {"$eq": 5}, "name": "date"}, [4]),
        ({"qty": {"$ne": 5}}, [2, 3]),
        ({"note": {"$ne": "ripe"}}, [1, 3, 4]),
        ({"qty": {"$gt": 0, "$lt": 12}}, [1, 4]),
        ({"qty": {"$gte": 5, "$lte": 12}}, [1, 3, 4]),
        ({"price": {"$gt": "1.5"}}, [3, 4]),
        ({"id": {"$in": [1, 3, 99]}}, [1, 3]),
        ({"id": {"$nin": [1, 3]}}, [2, 4]),
        ({"id": {"$in": []}}, []),
        ({"name": {"$like": "%an%"}}, [2]),
        ({"name": {"$ilike": "b%"}}, [2]),
        ({"note": {"$like": "100\\%%"}}, [3]),
        ({"note": {"$null": True}}, [1]),
        ({"note": {"$null": False}}, [2, 3, 4]),
        ({"note": None}, [1]),
        ({"$or": [{"qty": 0}, {"name": "cherry"}]}, [2, 3]),
        ({"$and": [{"qty": 5}, {"$or": [{"id": 4}, {"note": {"$null": True}}]}]}, [1, 4]),
    ]
    for spec, expected in cases:
        assert await _ids(api, key, pid, filter=spec) == expected, spec


async def test_sort_paging_and_fields(api: Api, project) -> None:
    await _items(api, project)
    key, pid = project.admin_key, project.id
    assert await _ids(api, key, pid, sort="-qty,name") == [3, 1, 4, 2]
    assert await _ids(api, key, pid, sort="qty,-id") == [2, 4, 1, 3]
    r = await _list(api, key, pid, sort="id", limit="2", offset="1")
    body = r.json()
    assert [x["id"] for x in body["records"]] == [2, 3]
    assert body["count"] == 2 and body["limit"] == 2 and body["offset"] == 1 and body["hasMore"] is True
    r = await _list(api, key, pid, limit="2", offset="2")
    assert r.json()["hasMore"] is False and [x["id"] for x in r.json()["records"]] == [3, 4]
    r = await _list(api, key, pid, fields="name, id", filter={"id": 2})
    assert r.json()["records"] == [{"name": "Banana", "id": 2}]
    r = await _list(api, key, pid)
    assert r.json()["limit"] == 50
    for bad in ({"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"offset": "-1"}):
        assert_error(await _list(api, key, pid, **bad), 400, "VALIDATION_ERROR")


async def test_hostile_identifiers_and_values_never_reach_sql(api: Api, project) -> None:
    await _items(api, project)
    await _sql(api, project.admin_key, project.id, "CREATE TABLE victim (id int)")
    key, pid = project.admin_key, project.id
    hostile = [
        {"filter": {'id" = 1 OR 1=1 --': 1}},
        {"filter": {"id = 1 OR 1=1": 1}},
        {"filter": {"id": {"$gt; DROP TABLE victim; --": 1}}},
        {"filter": {"id": {"$raw": "1=1"}}},
        {"filter": {"$where": "1=1"}},
        {"filter": {"id": {"$in": "1); DROP TABLE victim; --"}}},
        {"filter": {"name": {"$like": ["%"]}}},
        {"filter": {"id": {"$null": "yes"}}},
        {"filter": {"id": {"$gt": 1, "plain": 2}}},
        {"filter": "not json"},
        {"filter": "[1, 2]"},
        {"filter": {"$or": []}},
        {"sort": "id; DROP TABLE victim"},
        {"sort": "-(SELECT 1)"},
        {"sort": "id,,name"},
        {"fields": "*"},
        {"fields": "id, (SELECT current_user)"},
        {"fields": 'name"; DROP TABLE victim; --'},
        {"filter": {"pg_sleep(5)": 1}},
    ]
    for params in hostile:
        r = await _list(api, key, pid, **params)
        body = assert_error(r, 400, "VALIDATION_ERROR")
        assert "DROP TABLE victim" not in r.text or "unknown" in body["error"]["message"], r.text
    r = await _list(api, key, pid, filter={'id" = 1 OR 1=1 --': 1})
    assert 'id\\" = 1 OR 1=1 --' in r.text and r.json()["error"]["columns"] == ['id" = 1 OR 1=1 --']
    # Deep nesting is bounded.
    deep: dict[str, Any] = {"id": 1}
    for _ in range(20):
        deep = {"$or": [deep]}
    assert_error(await _list(api, key, pid, filter=deep), 400, "VALIDATION_ERROR")
    # Hostile values are data: they match nothing (or exactly themselves).
    for value in ("1 OR 1=1", "'; DROP TABLE victim; --", "\\x00", "$1", "apple' --"):
        r = await _list(api, key, pid, filter={"name": value})
        assert r.status_code == 200 and r.json()["records"] == [], value
    r = await api.http.post(
        url(pid, "items"), json={"id": 9, "name": "x'); DROP TABLE victim; --"}, headers=bearer(key)
    )
    assert r.status_code == 201 and r.json()["record"]["name"] == "x'); DROP TABLE victim; --"
    assert await _ids(api, key, pid, filter={"name": "x'); DROP TABLE victim; --"}) == [9]
    # Hostile table and column names in paths and bodies.
    for table in ('items"; DROP TABLE victim; --', "victim; --", "pg_catalog.pg_authid", "it ems", "ITEMS"):
        r = await api.http.get(url(pid, table), headers=bearer(key))
        body = assert_error(r, 400, "VALIDATION_ERROR")
        assert body["error"]["table"] == table
    r = await api.http.post(
        url(pid, "items"), json={"id": 10, 'name") VALUES (1); --': 1}, headers=bearer(key)
    )
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.patch(url(pid, "items", "1"), json={"qty = 0, name": "x"}, headers=bearer(key))
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await api.http.get(url(pid, "items", "1 OR 1=1"), headers=bearer(key))
    assert_error(r, 400, "SQL_EXEC_ERROR")
    # Nothing was dropped or changed by any of it.
    got = await _sql(api, key, pid, "SELECT count(*)::int AS n FROM victim")
    assert got["result"]["rows"] == [{"n": 0}]
    assert await _ids(api, key, pid) == [1, 2, 3, 4, 9]
    # Other schemas' tables are unknown names, not reachable tables.
    r = await api.http.get(url(pid, "events"), headers=bearer(key))
    assert_error(r, 400, "VALIDATION_ERROR")


async def test_composite_and_missing_primary_keys(api: Api, project) -> None:
    key, pid = project.admin_key, project.id
    await _sql(api, key, pid, "CREATE TABLE pairs (a int, b int, v text, PRIMARY KEY (a, b))")
    await _sql(api, key, pid, "CREATE TABLE logs (msg text)")
    r = await api.http.post(url(pid, "pairs"), json={"a": 1, "b": 2, "v": "x"}, headers=bearer(key))
    assert r.status_code == 201
    for table in ("pairs", "logs"):
        for method in ("GET", "PATCH", "DELETE"):
            r = await api.http.request(method, url(pid, table, "1"), json={"v": "y"}, headers=bearer(key))
            body = assert_error(r, 400, "VALIDATION_ERROR")
            assert "primary key" in body["error"]["message"]
    r = await _list(api, key, pid, "pairs", filter={"a": 1, "b": 2})
    assert r.json()["records"] == [{"a": 1, "b": 2, "v": "x"}]


async def test_scopes(api: Api, project) -> None:
    await _items(api, project)
    pid = project.id
    ro = await api.new_key(project.owner_token, pid, "read")
    rw = await api.new_key(project.owner_token, pid, "readwrite")
    assert await _ids(api, ro, pid, filter={"id": 1}) == [1]
    r = await api.http.get(url(pid, "items", "1"), headers=bearer(ro))
    assert r.status_code == 200
    r = await api.http.post(url(pid, "items"), json={"id": 20}, headers=bearer(ro))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.http.patch(url(pid, "items", "1"), json={"qty": 1}, headers=bearer(ro))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.http.post(url(pid, "items"), json={"id": 20}, headers=bearer(rw))
    assert r.status_code == 201
    r = await api.http.patch(url(pid, "items", "20"), json={"qty": 2}, headers=bearer(rw))
    assert r.status_code == 200 and r.json()["record"]["qty"] == 2
    r = await api.http.delete(url(pid, "items", "20"), headers=bearer(rw))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.http.delete(url(pid, "items", "20"), headers=bearer(project.admin_key))
    assert r.status_code == 200
    r = await api.http.get(url(pid, "items"))
    assert_error(r, 401, "AUTH_REQUIRED")
    _, token = await api.new_user()
    other = await api.new_project(token)
    r = await api.http.get(url(other, "items"), headers=bearer(rw))
    assert_error(r, 403, "SCOPE_MISMATCH")
    # The records endpoints use the cached-key hot path; revocation still applies at once.
    keys = (await api.http.get(f"/api/projects/{pid}/api-keys", headers=bearer(project.owner_token))).json()
    rw_id = next(k["id"] for k in keys["apiKeys"] if rw.startswith(k["prefix"]))
    r = await api.http.delete(f"/api/projects/{pid}/api-keys/{rw_id}", headers=bearer(project.owner_token))
    assert r.status_code == 200, r.text
    for method, path in (
        ("GET", url(pid, "items")),
        ("POST", url(pid, "items")),
        ("GET", url(pid, "items", "1")),
    ):
        r = await api.http.request(method, path, json={"id": 21}, headers=bearer(rw))
        assert_error(r, 401, "AUTH_REQUIRED")


async def test_rls_applies_with_auth_uid(api: Api, project) -> None:
    key, pid = project.admin_key, project.id
    for q in (
        "CREATE TABLE posts (id serial PRIMARY KEY, owner text NOT NULL, body text)",
        "INSERT INTO posts (owner, body) VALUES ('u1', 'one'), ('u2', 'two'), ('u1', 'three')",
        "ALTER TABLE posts ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON posts USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())",
    ):
        await _sql(api, key, pid, q)
    rw = await api.new_key(project.owner_token, pid, "readwrite")
    as_u1 = {**bearer(rw), "X-Fluxbase-Auth-Uid": "u1"}
    r = await api.http.get(url(pid, "posts"), headers=as_u1)
    assert [p["body"] for p in r.json()["records"]] == ["one", "three"]
    r = await api.http.get(url(pid, "posts"), headers=bearer(rw))
    assert r.json()["records"] == []
    r = await api.http.get(url(pid, "posts", "2"), headers=as_u1)
    assert_error(r, 404, "NOT_FOUND")
    r = await api.http.patch(url(pid, "posts", "2"), json={"body": "hijacked"}, headers=as_u1)
    assert_error(r, 404, "NOT_FOUND")
    r = await api.http.post(url(pid, "posts"), json={"owner": "u2", "body": "forged"}, headers=as_u1)
    assert assert_error(r, 403, "SQL_EXEC_ERROR")["error"]["details"] == "ERROR:  42501"
    r = await api.http.post(url(pid, "posts"), json={"owner": "u1", "body": "mine"}, headers=as_u1)
    assert r.status_code == 201 and r.json()["record"]["owner"] == "u1"
    got = await _sql(api, key, pid, "SELECT owner, body FROM posts ORDER BY id")
    assert got["result"]["rows"] == [
        {"owner": "u1", "body": "one"},
        {"owner": "u2", "body": "two"},
        {"owner": "u1", "body": "three"},
        {"owner": "u1", "body": "mine"},
    ]


@pytest.fixture(scope="module")
def rt(instance, log_dir) -> Iterator[str]:
    with _realtime(instance, log_dir) as ws_url:
        yield ws_url


async def test_records_insert_fires_a_realtime_event(api: Api, project, rt) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/tables",
        json={
            "name": "events_t",
            "columns": [{"name": "id", "type": "int", "primaryKey": True}, {"name": "v", "type": "text"}],
        },
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 201, r.text
    async with subscribe(rt, project.id, project.admin_key) as sub:
        r = await api.http.post(
            url(project.id, "events_t"),
            json=[{"id": 1, "v": "a"}, {"id": 2, "v": "b"}],
            headers=bearer(project.admin_key),
        )
        assert r.status_code == 201
        got = await sub.rows(2)
        assert [m["payload"] for m in got] == [
            {"operation": "INSERT", "table": "events_t", "record": {"id": 1, "v": "a"}, "old": None},
            {"operation": "INSERT", "table": "events_t", "record": {"id": 2, "v": "b"}, "old": None},
        ]
