"""Broadcast from SQL (sql/0036): `realtime.broadcast(topic, payload [, event])` inside a tenant
transaction reaches the topic's subscribers through the real realtime service only if the
transaction commits, for the session's own project, under the project's topic rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from support import Api, bearer
from test_realtime_v2 import _join, _replica, _settings, _socket


@pytest.fixture(scope="module")
def rt(instance, log_dir) -> Iterator[str]:
    with _replica(instance, log_dir) as p:
        yield p.ws


@pytest.fixture
async def project(api: Api, project):
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


def _bq(topic: str, payload: Any, event: str | None = None) -> str:
    """A SELECT of realtime.broadcast with literal arguments."""
    p = json.dumps(payload).replace("'", "''")
    ev = f", '{event}'" if event is not None else ""
    return f"SELECT realtime.broadcast('{topic}', '{p}'::jsonb{ev})"


async def _sql(api: Api, key: str, pid: str, q: str, **extra: Any) -> dict[str, Any]:
    r = await api.sql(key, pid, q, **extra)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _broadcasts(msgs: list[dict[str, Any]]) -> list[Any]:
    return [m["payload"] for m in msgs if m["type"] == "broadcast"]


async def test_a_committed_broadcast_arrives_as_an_http_broadcast_does(api: Api, project, rt) -> None:
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    room, chat = f"project_{project.id}", f"project_{project.id}:chat"
    async with _socket(rt, project.admin_key) as s, _socket(rt, project.admin_key) as lobby:
        await s.ws.send(json.dumps({"type": "subscribe", "roomId": room}))
        assert (await s.next())["type"] == "subscribed"
        await _join(s, chat)
        await _join(lobby, f"project_{project.id}:lobby")
        r = await api.http.post(
            "/api/realtime/broadcast",
            json={"projectId": project.id, "event": "hello", "payload": {"x": 1}},
            headers=bearer(project.admin_key),
        )
        assert r.status_code == 200, r.text
        http = await s.until(lambda m: m["type"] == "broadcast")
        body = await _sql(api, rw, project.id, _bq("chat", {"x": 1}, "hello"))
        assert body["success"], body
        got = await s.until(lambda m: m["type"] == "broadcast")
        assert (
            sorted(got) == sorted(http) == ["cursor", "event", "id", "payload", "roomId", "timestamp", "type"]
        )
        assert (got["roomId"], got["event"], got["payload"]) == (chat, "hello", {"x": 1})
        assert got["timestamp"].endswith("Z") and ":" in got["cursor"]
        # the event name defaults to "broadcast"; batches deliver too
        r = await api.http.post(
            "/api/execute-batch",
            json={
                "projectId": project.id,
                "statements": [{"query": _bq("chat", [1, "two"])}, {"query": _bq("chat", None, "e2")}],
            },
            headers=bearer(rw),
        )
        assert r.status_code == 200 and r.json()["success"], r.text
        a = await s.until(lambda m: m["type"] == "broadcast")
        b = await s.until(lambda m: m["type"] == "broadcast")
        assert [(a["event"], a["payload"]), (b["event"], b["payload"])] == [
            ("broadcast", [1, "two"]),
            ("e2", None),
        ]
        # the topic's message reaches neither the project room alone nor another topic
        assert _broadcasts(await lobby.silent(0.3)) == []


async def test_only_a_committed_transaction_broadcasts(api: Api, project, rt) -> None:
    key, pid = project.admin_key, project.id
    async with _socket(rt, key) as s:
        await _join(s, f"project_{pid}:chat")
        # a failing statement, a failing batch, and a rolled-back savepoint send nothing
        body = await _sql(api, key, pid, _bq("chat", {"n": 1}) + ", 1 / 0")
        assert not body["success"], body
        r = await api.http.post(
            "/api/execute-batch",
            json={
                "projectId": pid,
                "statements": [{"query": _bq("chat", {"n": 2})}, {"query": "SELECT 1 / 0"}],
            },
            headers=bearer(key),
        )
        assert r.status_code == 200 and not r.json()["success"], r.text
        do = (
            "DO $$ BEGIN "
            "BEGIN PERFORM realtime.broadcast('chat', '{\"n\": 3}'); RAISE EXCEPTION 'undo'; "
            "EXCEPTION WHEN OTHERS THEN NULL; END; "
            "PERFORM realtime.broadcast('chat', '{\"n\": 4}'); END $$"
        )
        assert (await _sql(api, key, pid, do))["success"]
        assert (await _sql(api, key, pid, _bq("chat", {"n": 5})))["success"]
        got: list[Any] = []
        while len(got) < 2:
            got.append((await s.until(lambda m: m["type"] == "broadcast"))["payload"])
        assert got == [{"n": 4}, {"n": 5}]
        assert _broadcasts(await s.silent(0.5)) == []


async def test_the_project_is_the_sessions_and_another_project_sees_nothing(
    api: Api, project, rt, control_db: asyncpg.Pool
) -> None:
    other = await api.new_project(project.owner_token)
    other_key = await api.new_key(project.owner_token, other, "admin")
    async with _socket(rt, project.admin_key) as mine, _socket(rt, other_key) as theirs:
        await _join(mine, f"project_{project.id}:chat")
        await _join(theirs, f"project_{other}:chat")
        assert (await _sql(api, project.admin_key, project.id, _bq("chat", "a-only")))["success"]
        assert _broadcasts([await mine.until(lambda m: m["type"] == "broadcast")]) == ["a-only"]
        assert _broadcasts(await theirs.silent(0.5)) == []
        # No argument names a project: a topic that looks like another project's room is refused.
        body = await _sql(api, project.admin_key, project.id, _bq(f"project_{other}:chat", 1))
        assert not body["success"] and "topic" in body["error"]["message"], body
    rows = await control_db.fetch(
        "SELECT project_id, table_name, bytes FROM fluxbase.events WHERE kind = 'broadcast' "
        "AND project_id = ANY($1::text[])",
        [project.id, other],
    )
    assert [(r["project_id"], r["table_name"]) for r in rows] == [(project.id, "chat")]
    assert rows[0]["bytes"] > 0  # counted toward the project's outbox bytes


async def test_who_may_send_follows_the_topic_rules(api: Api, project, rt) -> None:
    pid = project.id
    rw = await api.new_key(project.owner_token, pid, "readwrite")
    ro = await api.new_key(project.owner_token, pid, "read")
    r = await _settings(
        api,
        project,
        topics=[
            {"pattern": "staff.*", "join": [], "send": [], "track": []},
            {"pattern": "public", "send": ["readwrite", "user"]},
        ],
    )
    assert r.status_code == 200, r.text
    async with _socket(rt, project.admin_key) as s:
        for t in ("staff.x", "public", "general"):
            await _join(s, f"project_{pid}:{t}")
        # a read key may not send (as over the WebSocket by default; its SQL is READ ONLY, and
        # the read role is not granted the function)
        body = await _sql(api, ro, pid, _bq("public", "ro"))
        assert not body["success"] and "42501" in body["error"]["details"], body
        # readwrite: not on staff.* (send: []), yes elsewhere
        body = await _sql(api, rw, pid, _bq("staff.x", "rw"))
        assert not body["success"] and "topic rules" in body["error"]["message"], body
        assert (await _sql(api, rw, pid, _bq("general", "rw")))["success"]
        # an end user (behind the readwrite key): only where a rule lists "user"
        body = await _sql(api, rw, pid, _bq("general", "user"), authUid="u1")
        assert not body["success"] and "end users" in body["error"]["message"], body
        assert (await _sql(api, rw, pid, _bq("public", "user"), authUid="u1"))["success"]
        # admin keys always may
        assert (await _sql(api, project.admin_key, pid, _bq("staff.x", "admin")))["success"]
        got = []
        while len(got) < 3:
            m = await s.until(lambda m: m["type"] == "broadcast")
            got.append((m["roomId"].split(":", 1)[1], m["payload"]))
        assert sorted(got) == [("general", "rw"), ("public", "user"), ("staff.x", "admin")]
        assert _broadcasts(await s.silent(0.5)) == []


async def test_bad_arguments_are_refused_with_clear_errors(api: Api, project, rt) -> None:
    key, pid = project.admin_key, project.id
    async with _socket(rt, key) as s:
        await _join(s, f"project_{pid}:chat")
        body = await _sql(api, key, pid, _bq("chat", "x" * 70_000))
        assert not body["success"] and "64 KiB" in body["error"]["message"], body
        for topic in ("a:b", "", "x" * 65, "a b", "é"):
            body = await _sql(api, key, pid, _bq(topic, 1))
            assert not body["success"] and "topic" in body["error"]["message"], (topic, body)
        body = await _sql(api, key, pid, _bq("chat", 1, ""))
        assert not body["success"] and "event" in body["error"]["message"], body
        body = await _sql(api, key, pid, "SELECT realtime.broadcast(NULL, '1')")
        assert not body["success"], body
        # just under the cap passes
        assert (await _sql(api, key, pid, _bq("chat", "x" * 60_000)))["success"]
        m = await s.until(lambda m: m["type"] == "broadcast")
        assert len(m["payload"]) == 60_000
        assert _broadcasts(await s.silent(0.3)) == []


async def test_broadcast_bytes_count_toward_the_quota_and_trimming_gives_them_back(
    api: Api, project, rt, control_db: asyncpg.Pool, instance_admin: dict[str, Any]
) -> None:
    from fluxbase.services.realtime import count_outbox_bytes, trim_events

    key, pid = project.admin_key, project.id

    async def outbox() -> int:
        return int(await control_db.fetchval("SELECT fluxbase_guard.outbox_bytes($1)", pid))

    before = await outbox()
    for i in range(5):
        assert (await _sql(api, key, pid, _bq("chat", {"i": i, "pad": "x" * 20_000})))["success"]
    grown = await outbox() - before
    assert grown >= 5 * 20_000, grown
    # folded into the counter, then all but the newest two trimmed: their bytes go with them
    await count_outbox_bytes(control_db)
    assert await outbox() - before == grown
    await trim_events(control_db, max_age_s=10**9, max_rows=10**9, broadcast_keep=2)
    left = await control_db.fetchval(
        "SELECT sum(bytes) FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'", pid
    )
    assert await outbox() - before == left and 2 * 20_000 <= left < grown

    used = int(
        (await api.http.get(f"/api/projects/{pid}/quotas", headers=bearer(key))).json()["quotas"][
            "databaseUsedBytes"
        ]
    )
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas",
        json={"databaseBytes": used + 30_000},
        headers=bearer(instance_admin["token"]),
    )
    assert r.status_code == 200, r.text
    async with _socket(rt, key) as s:
        await _join(s, f"project_{pid}:chat")
        r = await api.sql(key, pid, _bq("chat", "x" * 60_000))
        assert r.status_code == 413 and r.json()["error"]["code"] == "DATABASE_QUOTA_EXCEEDED", r.text
        assert (await _sql(api, key, pid, _bq("chat", "small")))["success"]
        m = await s.until(lambda m: m["type"] == "broadcast")
        assert m["payload"] == "small"
        assert _broadcasts(await s.silent(0.3)) == []
