"""Realtime v2 through the real WebSocket API: row filters, topics with per-topic authorization,
and presence shared by two realtime replicas through PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from fluxbase.devstack.procs import free_port
from support import Api, assert_error, bearer, run_service
from test_realtime import Sub, subscribe
from test_realtime_rls import _docs, _token

HEARTBEAT_S = 3
MAX_MEMBERS = 3
ENV = {
    "FLUXBASE_REALTIME_PRESENCE_HEARTBEAT_SECONDS": str(HEARTBEAT_S),
    "FLUXBASE_REALTIME_PRESENCE_MAX_MEMBERS": str(MAX_MEMBERS),
    "FLUXBASE_REALTIME_PRESENCE_MAX_STATE_BYTES": "256",
}


@contextlib.contextmanager
def _replica(instance, log_dir) -> Iterator[Any]:
    port = free_port()
    env = dict(instance.env, FLUXBASE_REALTIME_PORT=str(port), **ENV)
    with run_service(["realtime"], env, port, log_dir) as proc:
        proc.ws = f"ws://127.0.0.1:{port}"
        yield proc


@pytest.fixture(scope="module")
def rt(instance, log_dir) -> Iterator[str]:
    with _replica(instance, log_dir) as p:
        yield p.ws


@pytest.fixture(scope="module")
def rt2(instance, log_dir) -> Iterator[str]:
    with _replica(instance, log_dir) as p:
        yield p.ws


@pytest.fixture
async def project(api: Api, project):
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


async def _sql(api: Api, project, q: str) -> None:
    r = await api.sql(project.admin_key, project.id, q)
    assert r.json()["success"], r.text


@contextlib.asynccontextmanager
async def _socket(url: str, token: str | None = None) -> AsyncIterator[Sub]:
    async with connect(f"{url}/?token={token}" if token else url, max_queue=None) as ws:
        yield Sub(ws)


async def _send(sub: Sub, **msg: Any) -> dict[str, Any]:
    """Send one message and return the first answer that is not an event."""
    await sub.ws.send(json.dumps(msg))
    return await sub.until(
        lambda m: (
            m["type"] not in ("db_event", "schema_update", "broadcast", "presence_diff", "presence_state")
        )
    )


def _err(msg: dict[str, Any], code: str) -> str:
    assert msg["type"] == "error" and msg["error"]["code"] == code, msg
    return str(msg["error"]["message"])


# -- row filters ---------------------------------------------------------------------------------


async def test_row_filters_narrow_what_arrives(api: Api, project, rt) -> None:
    await _sql(api, project, "CREATE TABLE items (id serial PRIMARY KEY, owner text, qty int, flag boolean)")
    await _sql(api, project, "CREATE TABLE other (id serial PRIMARY KEY, qty int)")
    key = project.admin_key
    async with (
        subscribe(rt, project.id, key, filters={"items": {"column": "qty", "op": "gt", "value": 5}}) as gt,
        subscribe(
            rt, project.id, key, filters={"items": {"column": "owner", "op": "in", "value": ["a", "c"]}}
        ) as inn,
        subscribe(
            rt,
            project.id,
            key,
            tables=["items"],
            filters={"items": {"column": "flag", "op": "eq", "value": True}},
        ) as flag,
        subscribe(
            rt, project.id, key, filters={"items": {"column": "owner", "op": "neq", "value": "a"}}
        ) as neq,
    ):
        await _sql(api, project, "INSERT INTO other (qty) VALUES (1)")
        await _sql(
            api,
            project,
            "INSERT INTO items (owner, qty, flag) VALUES "
            "('a', 1, true), ('b', 6, false), ('c', 9, NULL), (NULL, 7, true)",
        )
        await _sql(api, project, "DELETE FROM items WHERE owner = 'b'")
        got_gt = await gt.rows(5)
        # `other` is not filtered (no filter names it); items rows only with n > 5; the DELETE's
        # image is the old row (n = 6).
        assert [
            (e["payload"]["table"], e["payload"]["operation"], e["payload"]["record"]["qty"]) for e in got_gt
        ] == [
            ("other", "INSERT", 1),
            ("items", "INSERT", 6),
            ("items", "INSERT", 9),
            ("items", "INSERT", 7),
            ("items", "DELETE", 6),
        ]
        assert [e["payload"]["record"].get("owner") for e in await inn.rows(3)][1:] == ["a", "c"]
        assert [e["payload"]["record"]["qty"] for e in await flag.rows(2)] == [1, 7]
        # null never matches, not even neq
        got_neq = [(e["payload"]["table"], e["payload"]["record"].get("owner")) for e in await neq.rows(4)]
        assert got_neq == [("other", None), ("items", "b"), ("items", "c"), ("items", "b")]
        for s in (gt, inn, flag, neq):
            assert [m for m in await s.silent(0.3) if m["type"] == "db_event"] == []


async def test_bad_filters_answer_an_error_naming_the_problem(api: Api, project, rt) -> None:
    await _sql(api, project, "CREATE TABLE items (id serial PRIMARY KEY, owner text, qty int, doc jsonb)")
    room = f"project_{project.id}"
    async with _socket(rt, project.admin_key) as s:

        async def refused(filters: Any, *named: str, **extra: Any) -> None:
            msg = _err(
                await _send(s, type="subscribe", roomId=room, filters=filters, **extra), "VALIDATION_ERROR"
            )
            for n in named:
                assert n in msg, (n, msg)

        await refused({"items": {"column": "nope", "op": "eq", "value": 1}}, "nope")
        await refused({"items": {"column": "qty", "op": "like", "value": 1}}, "like")
        await refused({"missing": {"column": "qty", "op": "eq", "value": 1}}, "qty", "missing")
        await refused({"items": {"column": "qty", "op": "eq", "value": "1"}}, "qty", "number")
        await refused({"items": {"column": "owner", "op": "eq", "value": 1}}, "owner", "string")
        await refused({"items": {"column": "owner", "op": "eq", "value": "x" * 5000}}, "1024")
        await refused({"items": {"column": "qty", "op": "in", "value": list(range(101))}}, "100")
        await refused({"items": {"column": "qty", "op": "eq", "value": {"$gt": 1}}}, "qty")
        await refused({"items": {"column": "qty", "op": "eq", "value": None}}, "qty")
        await refused({"items": {"column": "doc", "op": "eq", "value": "x"}}, "doc")
        await refused({"items": {"column": "qty", "op": "eq", "value": 1}}, "items", tables=["other"])
        await refused({"items": {"column": "qty", "op": "eq", "value": 1, "extra": 1}}, "items")
        await refused([1, 2], "filters")
        await refused({f"t{i}": {"column": "qty", "op": "eq", "value": 1} for i in range(51)}, "50")
        # NaN is not JSON, but Python's parser takes it: refused as a value
        f = {"items": {"column": "qty", "op": "eq", "value": "@"}}
        await s.ws.send(json.dumps({"type": "subscribe", "roomId": room, "filters": f}).replace('"@"', "NaN"))
        assert "finite" in _err(await s.next(), "VALIDATION_ERROR")
        # After all that, nothing was half-applied: the socket has no subscription and gets nothing.
        await _sql(api, project, "INSERT INTO items (qty) VALUES (1)")
        assert [m for m in await s.silent(0.5) if m["type"] == "db_event"] == []


async def test_filters_never_widen_what_an_end_user_sees(api: Api, project, rt) -> None:
    await _docs(api, project)  # docs(id, owner, v): SELECT policy owner = auth.uid()
    alice = await _token(api, project, "alice")
    async with (
        subscribe(
            rt, project.id, alice, filters={"docs": {"column": "owner", "op": "eq", "value": "bob"}}
        ) as bobs,
        subscribe(
            rt, project.id, alice, filters={"docs": {"column": "v", "op": "neq", "value": "skip"}}
        ) as mine,
    ):
        await _sql(
            api,
            project,
            "INSERT INTO docs (owner, v) VALUES "
            "('bob', 'b1'), ('alice', 'a1'), ('alice', 'skip'), ('bob', 'b2')",
        )
        assert [e["payload"]["record"]["v"] for e in await mine.rows(1)] == ["a1"]
        assert [m for m in await bobs.silent(0.5) + await mine.silent(0.1) if m["type"] == "db_event"] == []


async def test_a_filter_cannot_probe_columns_the_role_may_not_read(api: Api, project, rt) -> None:
    await _sql(api, project, "CREATE TABLE secret (id serial PRIMARY KEY, pub text, hidden text)")
    read_role = f"p_{project.id}_ro"
    await _sql(api, project, f"REVOKE SELECT ON secret FROM {read_role}")
    await _sql(api, project, f"GRANT SELECT (id, pub) ON secret TO {read_role}")
    ro = await api.new_key(project.owner_token, project.id, "read")
    room = f"project_{project.id}"
    async with _socket(rt, ro) as s:
        hidden = _err(
            await _send(
                s,
                type="subscribe",
                roomId=room,
                filters={"secret": {"column": "hidden", "op": "eq", "value": "x"}},
            ),
            "VALIDATION_ERROR",
        )
        missing = _err(
            await _send(
                s,
                type="subscribe",
                roomId=room,
                filters={"secret": {"column": "nothere", "op": "eq", "value": "x"}},
            ),
            "VALIDATION_ERROR",
        )
        assert hidden.replace("hidden", "X") == missing.replace("nothere", "X")
        ok = await _send(
            s, type="subscribe", roomId=room, filters={"secret": {"column": "pub", "op": "eq", "value": "x"}}
        )
        assert ok["type"] == "subscribed", ok


# -- topics ------------------------------------------------------------------------------------------


async def _settings(api: Api, project, **body: Any) -> Any:
    return await api.http.post(
        "/api/realtime/settings", json={"projectId": project.id, **body}, headers=bearer(project.admin_key)
    )


async def test_topics_join_broadcast_and_stay_apart(api: Api, project, rt, rt2) -> None:
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    ro = await api.new_key(project.owner_token, project.id, "read")
    chat = f"project_{project.id}:chat"
    async with (
        _socket(rt, rw) as writer,
        _socket(rt2, ro) as reader,
        _socket(rt2, ro) as other_topic,
        subscribe(rt, project.id, project.admin_key) as room,
    ):
        for s, r in ((writer, chat), (reader, chat), (other_topic, f"project_{project.id}:lobby")):
            ok = await _send(s, type="subscribe", roomId=r)
            assert ok["type"] == "subscribed" and ok["roomId"] == r, ok
        # read keys may not send on a topic by default
        _err(
            await _send(reader, type="broadcast", roomId=chat, event="e", payload={}),
            "INSUFFICIENT_PERMISSIONS",
        )
        await writer.ws.send(
            json.dumps({"type": "broadcast", "roomId": chat, "event": "hello", "payload": {"x": 1}})
        )
        msg = await reader.until(lambda m: m["type"] == "broadcast")
        assert msg["roomId"] == chat and msg["event"] == "hello" and msg["payload"] == {"x": 1}
        # the project room's broadcast does not reach topics, nor a topic's the project room
        r = await api.http.post(
            "/api/realtime/broadcast",
            json={"projectId": project.id, "event": "all", "payload": 1},
            headers=bearer(project.admin_key),
        )
        assert r.status_code == 200
        got = await room.until(lambda m: m["type"] == "broadcast")
        assert got["event"] == "all" and got["roomId"] == f"project_{project.id}"
        await _sql(api, project, "CREATE TABLE t (id int)")
        await _sql(api, project, "INSERT INTO t VALUES (1)")
        await room.rows(1)
        for s in (reader, other_topic):
            assert [m for m in await s.silent(0.3) if m["type"] != "presence_state"] == []
        # the sender receives its own broadcast, and nothing else
        assert [
            (m["type"], m.get("event")) for m in await writer.silent(0.2) if m["type"] != "presence_state"
        ] == [("broadcast", "hello")]
        assert [m for m in await room.silent(0.2) if m["type"] == "broadcast"] == []


async def test_topic_names_cannot_cross_projects_or_rooms(api: Api, project, rt) -> None:
    other = await api.new_project(project.owner_token)
    async with _socket(rt, project.admin_key) as s:
        _err(await _send(s, type="subscribe", roomId=f"project_{other}:chat"), "SCOPE_MISMATCH")
        for bad in (":", ":a:b", ":../x", ":a b", ":é", ":" + "x" * 65, ":a%00"):
            _err(await _send(s, type="subscribe", roomId=f"project_{project.id}{bad}"), "VALIDATION_ERROR")
        _err(
            await _send(s, type="subscribe", roomId=f"project_{project.id}:chat", tables=["t"]),
            "VALIDATION_ERROR",
        )


async def test_topic_rules_decide_who_joins_sends_and_tracks(api: Api, project, rt) -> None:
    r = await _settings(
        api,
        project,
        topics=[
            {"pattern": "staff.*", "join": [], "send": [], "track": []},
            {"pattern": "public", "send": ["read", "readwrite", "user"]},
        ],
    )
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["topics"][0] == {"pattern": "staff.*", "join": [], "send": [], "track": []}
    for bad in (
        [{"pattern": "a", "join": ["admin"]}],
        [{"pattern": "a:b"}],
        [{"pattern": "a", "other": []}],
        {"pattern": "a"},
        [{"pattern": "a"}] * 51,
    ):
        assert_error(await _settings(api, project, topics=bad), 400, "VALIDATION_ERROR")
    ro = await api.new_key(project.owner_token, project.id, "read")
    user = await _token(api, project, "u1")
    async with (
        _socket(rt, ro) as reader,
        _socket(rt, user) as enduser,
        _socket(rt, project.admin_key) as admin,
    ):
        _err(
            await _send(reader, type="subscribe", roomId=f"project_{project.id}:staff.x"),
            "INSUFFICIENT_PERMISSIONS",
        )
        _err(
            await _send(enduser, type="subscribe", roomId=f"project_{project.id}:staff.x"),
            "INSUFFICIENT_PERMISSIONS",
        )
        assert (await _send(admin, type="subscribe", roomId=f"project_{project.id}:staff.x"))[
            "type"
        ] == "subscribed"
        pub = f"project_{project.id}:public"
        for s in (reader, enduser, admin):
            assert (await _send(s, type="subscribe", roomId=pub))["type"] == "subscribed"
        await enduser.ws.send(
            json.dumps({"type": "broadcast", "roomId": pub, "event": "hi", "payload": None})
        )
        assert (await admin.until(lambda m: m["type"] == "broadcast"))["event"] == "hi"
        # the default rule still applies elsewhere: end users may not send
        other = f"project_{project.id}:general"
        assert (await _send(enduser, type="subscribe", roomId=other))["type"] == "subscribed"
        _err(
            await _send(enduser, type="broadcast", roomId=other, event="x", payload=1),
            "INSUFFICIENT_PERMISSIONS",
        )


# -- presence ---------------------------------------------------------------------------------------


async def _join(s: Sub, room: str) -> dict[str, Any]:
    await s.ws.send(json.dumps({"type": "subscribe", "roomId": room}))
    assert (await s.next())["type"] == "subscribed"
    state = await s.next()
    assert state["type"] == "presence_state" and state["roomId"] == room, state
    return dict(state["payload"])


async def _track(s: Sub, room: str, state: Any) -> str:
    msg = await _send(s, type="track", roomId=room, payload=state)
    assert msg["type"] == "tracked", msg
    return str(msg["key"])


async def _diff(s: Sub, pred, timeout: float = 5.0) -> dict[str, Any]:
    msg = await s.until(lambda m: m["type"] == "presence_diff" and pred(m["payload"]), timeout)
    return dict(msg["payload"])


async def test_presence_across_two_replicas_and_a_killed_connection(api: Api, project, rt, rt2) -> None:
    room = f"project_{project.id}:lobby"
    key = project.admin_key
    async with _socket(rt, key) as a, _socket(rt2, key) as b:
        assert await _join(a, room) == {}
        ka = await _track(a, room, {"name": "a"})
        # B, on the other replica, joins and sees A in its state
        assert await _join(b, room) == {ka: {"name": "a"}}
        kb = await _track(b, room, {"name": "b"})
        assert (await _diff(a, lambda p: kb in p["joins"]))["joins"] == {kb: {"name": "b"}}
        # an update arrives as a join with the new state
        await _track(a, room, {"name": "a2"})
        assert (await _diff(b, lambda p: ka in p["joins"]))["joins"][ka] == {"name": "a2"}
        # A's connection dies without a close frame: B sees it leave
        started = time.monotonic()
        assert a.ws.transport is not None
        a.ws.transport.abort()
        left = await _diff(b, lambda p: ka in p["leaves"], timeout=HEARTBEAT_S + 2)
        assert left["leaves"] == {ka: {"name": "a2"}}
        assert time.monotonic() - started < HEARTBEAT_S
        # untrack
        async with _socket(rt, key) as c:
            await _join(c, room)
            assert (await _send(b, type="untrack", roomId=room))["type"] == "untracked"
            assert (await _diff(c, lambda p: kb in p["leaves"]))["leaves"] == {kb: {"name": "b"}}


async def test_presence_of_a_killed_replica_leaves_within_the_heartbeat(
    api: Api, project, instance, log_dir, rt
) -> None:
    room = f"project_{project.id}:lobby"
    async with _socket(rt, project.admin_key) as watcher:
        await _join(watcher, room)
        with _replica(instance, log_dir) as doomed:
            async with _socket(doomed.ws, project.admin_key) as s:
                await _join(s, room)
                k = await _track(s, room, {"v": 1})
                await _diff(watcher, lambda p: k in p["joins"])
                doomed.proc.send_signal(signal.SIGKILL)
                doomed.proc.wait(5)
                started = time.monotonic()
                left = await _diff(watcher, lambda p: k in p["leaves"], timeout=HEARTBEAT_S + 2)
                assert left["leaves"] == {k: {"v": 1}}
                assert time.monotonic() - started <= HEARTBEAT_S + 0.5


async def test_a_silent_connection_leaves_within_the_heartbeat(api: Api, project, rt, rt2) -> None:
    room = f"project_{project.id}:quiet"
    async with _socket(rt2, project.admin_key) as watcher, _socket(rt, project.admin_key) as s:
        await _join(watcher, room)
        await _join(s, room)
        k = await _track(s, room, {})
        await _diff(watcher, lambda p: k in p["joins"])
        assert s.ws.transport is not None
        s.ws.transport.pause_reading()  # no more pongs, and no close either
        started = time.monotonic()
        await _diff(watcher, lambda p: k in p["leaves"], timeout=HEARTBEAT_S + 2)
        assert time.monotonic() - started <= HEARTBEAT_S + 0.5


async def test_presence_bounds(api: Api, project, rt, rt2) -> None:
    room = f"project_{project.id}:full"
    ro = await api.new_key(project.owner_token, project.id, "read")
    async with contextlib.AsyncExitStack() as stack:
        socks = [
            await stack.enter_async_context(_socket(rt if i % 2 else rt2, ro)) for i in range(MAX_MEMBERS + 1)
        ]
        s0 = socks[0]
        _err(await _send(s0, type="track", roomId=room, payload={}), "AUTH_REQUIRED")  # not joined
        for s in socks:
            await _join(s, room)
        _err(await _send(s0, type="track", roomId=room, payload={"x": "y" * 300}), "PAYLOAD_TOO_LARGE")
        for bad in ([1], "x", None, 3):
            _err(await _send(s0, type="track", roomId=room, payload=bad), "VALIDATION_ERROR")
        nan = json.dumps({"type": "track", "roomId": room, "payload": {"x": "@"}}).replace('"@"', "NaN")
        await s0.ws.send(nan)
        _err(await s0.next(), "VALIDATION_ERROR")
        # members per topic: two replicas race for the last places, the cap holds
        results = await asyncio.gather(
            *(_send(s, type="track", roomId=room, payload={"i": i}) for i, s in enumerate(socks))
        )
        assert sorted(m["type"] for m in results) == ["error"] + ["tracked"] * MAX_MEMBERS, results
        (full,) = [m for m in results if m["type"] == "error"]
        assert full["error"]["code"] == "CONFLICT" and str(MAX_MEMBERS) in full["error"]["message"]
        # re-tracking (an update) is not a new member
        tracked = [s for s, m in zip(socks, results, strict=True) if m["type"] == "tracked"]
        assert (await _send(tracked[0], type="track", roomId=room, payload={"again": 1}))["type"] == "tracked"
        # rooms per connection
        many = socks[-1]
        for i in range(99):
            await many.ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}:t{i}"}))
        got = 0
        while got < 99:
            m = await many.next()
            got += m["type"] == "subscribed"
        _err(await _send(many, type="subscribe", roomId=f"project_{project.id}:one-more"), "VALIDATION_ERROR")


async def test_same_topic_name_in_two_projects_shares_nothing(api: Api, project, rt, rt2) -> None:
    other_id = await api.new_project(project.owner_token)
    other_key = await api.new_key(project.owner_token, other_id, "admin")
    mine, theirs = f"project_{project.id}:lobby", f"project_{other_id}:lobby"
    async with _socket(rt, project.admin_key) as a, _socket(rt2, other_key) as b:
        await _join(a, mine)
        await _track(a, mine, {"secret": "a"})
        await a.ws.send(json.dumps({"type": "broadcast", "roomId": mine, "event": "e", "payload": "a-only"}))
        assert (await a.until(lambda m: m["type"] == "broadcast"))["payload"] == "a-only"
        assert await _join(b, theirs) == {}
        # B's credential cannot name A's room, and B's own topic gets nothing of A's
        _err(await _send(b, type="subscribe", roomId=mine), "SCOPE_MISMATCH")
        _err(await _send(b, type="track", roomId=mine, payload={}), "AUTH_REQUIRED")
        assert [m for m in await b.silent(0.5) if m["type"] in ("presence_diff", "broadcast")] == []
