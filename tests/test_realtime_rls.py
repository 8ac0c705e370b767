"""RLS-filtered realtime: end users receive only rows their SELECT policies let them see."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt as pyjwt
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve as ws_serve

from fluxbase.config import load_settings
from fluxbase.devstack.procs import free_port
from fluxbase.errors import TokenExpired
from fluxbase_realtime.rls import EndUser
from fluxbase_realtime.server import RealtimeService
from support import Api, bearer
from test_realtime import Sub, _realtime, subscribe
from test_user_tokens import project_user_token

ROW = "db_event"


@pytest.fixture(scope="module")
def rt_log(instance, log_dir) -> Iterator[tuple[str, Any]]:
    # A short check timeout so that the slow-policy case below stays quick; one connection per
    # project, so that all end users of a batch are checked in one group (one query).
    env = {"FLUXBASE_REALTIME_RLS_TIMEOUT_MS": "1000", "FLUXBASE_REALTIME_RLS_POOL_MAX": "1"}
    with _realtime(instance, log_dir, **env) as url:
        yield url, log_dir / f"realtime-{url.rsplit(':', 1)[1]}.log"


@pytest.fixture
def rt(rt_log) -> str:
    return str(rt_log[0])


@pytest.fixture
async def project(api: Api, project):
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


async def _sql(api: Api, project, q: str, params: list[Any] | None = None) -> None:
    r = await api.sql(project.admin_key, project.id, q, params)
    assert r.json()["success"], r.text


async def _docs(api: Api, project, using: str = "owner = auth.uid()") -> None:
    await _sql(api, project, "CREATE TABLE docs (id serial PRIMARY KEY, owner text, v text)")
    h = bearer(project.admin_key)
    r = await api.http.post(
        f"/api/projects/{project.id}/rls/policies",
        json={"table": "docs", "name": "own", "command": "SELECT", "using": using},
        headers=h,
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(f"/api/projects/{project.id}/rls/tables/docs", json={"enabled": True}, headers=h)
    assert r.status_code == 200, r.text


async def _token(api: Api, project, uid: str | None) -> str:
    body: dict[str, Any] = {"projectId": project.id}
    if uid is not None:
        body["authUid"] = uid
    r = await api.http.post("/api/realtime/token", json=body, headers=bearer(project.admin_key))
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def _rows(msgs: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    return [
        (m["payload"]["operation"], m["payload"]["record"]["v"], (m["payload"]["old"] or {}).get("v"))
        for m in msgs
        if m["type"] == ROW
    ]


async def _until_marker(sub: Sub, marker: str) -> list[dict[str, Any]]:
    """Everything the socket receives up to and including the row event whose v is `marker`."""
    got: list[dict[str, Any]] = []
    while True:
        msg = await sub.next(10)
        got.append(msg)
        if msg["type"] == ROW and msg["payload"]["record"]["v"] == marker:
            return got


async def test_two_users_see_only_their_rows_and_an_api_key_sees_all(api: Api, project, rt) -> None:
    await _docs(api, project)
    t1, t2, t_all = (
        await _token(api, project, "u1"),
        await _token(api, project, "u2"),
        await _token(api, project, None),
    )
    async with (
        subscribe(rt, project.id, t1) as u1,
        subscribe(rt, project.id, t2) as u2,
        subscribe(rt, project.id, project.admin_key) as key,
        subscribe(rt, project.id, t_all) as no_uid,
    ):
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'a'), ('u2', 'b')")
        # The row moves from u1 to u2: u1 loses it (no event), u2 gains it without the old image.
        await _sql(api, project, "UPDATE docs SET owner = 'u2', v = 'a2' WHERE v = 'a'")
        await _sql(api, project, "UPDATE docs SET v = 'b2' WHERE v = 'b'")
        await _sql(api, project, "DELETE FROM docs WHERE v = 'a2'")
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'end1'), ('u2', 'end2')")
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('nobody', 'end')")

        assert _rows(await _until_marker(u1, "end1")) == [("INSERT", "a", None), ("INSERT", "end1", None)]
        assert _rows(await _until_marker(u2, "end2")) == [
            ("INSERT", "b", None),
            ("UPDATE", "a2", None),
            ("UPDATE", "b2", "b"),
            ("DELETE", "a2", "a2"),
            ("INSERT", "end2", None),
        ]
        everything = [
            ("INSERT", "a", None),
            ("INSERT", "b", None),
            ("UPDATE", "a2", "a"),
            ("UPDATE", "b2", "b"),
            ("DELETE", "a2", "a2"),
            ("INSERT", "end1", None),
            ("INSERT", "end2", None),
            ("INSERT", "end", None),
        ]
        assert _rows(await _until_marker(key, "end")) == everything
        assert _rows(await _until_marker(no_uid, "end")) == everything
        # Nothing else arrives later for the end users (the 'nobody' row included).
        assert _rows(await u1.silent(0.5)) == [] and _rows(await u2.silent(0.1)) == []


async def test_schema_events_follow_the_project_setting(api: Api, project, rt) -> None:
    await _docs(api, project)
    async with subscribe(rt, project.id, await _token(api, project, "u1")) as u1:
        await _sql(api, project, "CREATE TABLE hidden_ddl (id int)")
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'm1')")
        got = await _until_marker(u1, "m1")
        assert [m["type"] for m in got] == [ROW]
        r = await api.http.post(
            "/api/realtime/settings",
            json={"projectId": project.id, "schemaEventsToUsers": True},
            headers=bearer(project.admin_key),
        )
        assert r.status_code == 200, r.text
        await _sql(api, project, "CREATE TABLE shown_ddl (id int)")
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'm2')")
        got = await _until_marker(u1, "m2")
        schema = [m for m in got if m["type"] == "schema_update"]
        assert [m["payload"]["table"] for m in schema] == ["shown_ddl"]
        assert schema[0]["payload"]["event_type"] == "schema_update"


async def test_failing_or_slow_policy_withholds_only_that_users_events(api: Api, project, rt, rt_log) -> None:
    # 'boom' makes the policy raise, 'slow' makes it outlive the 1 s check timeout.
    using = (
        "CASE auth.uid() WHEN 'boom' THEN 1 / (length(owner) - length(owner)) = 1 "
        "WHEN 'slow' THEN (SELECT pg_sleep(5)) IS NOT NULL ELSE owner = auth.uid() END"
    )
    await _docs(api, project, using)
    async with (
        subscribe(rt, project.id, await _token(api, project, "boom")) as boom,
        subscribe(rt, project.id, await _token(api, project, "slow")) as slow,
        subscribe(rt, project.id, await _token(api, project, "u1")) as u1,
        subscribe(rt, project.id, project.admin_key) as key,
    ):
        await _sql(
            api, project, "INSERT INTO docs (owner, v) VALUES ('boom', 'x'), ('slow', 'y'), ('u1', 'z')"
        )
        assert _rows(await _until_marker(u1, "z")) == [("INSERT", "z", None)]
        assert [v for _, v, _ in _rows(await _until_marker(key, "z"))] == ["x", "y", "z"]
        assert _rows(await boom.silent(0.5)) == [] and _rows(await slow.silent(0.1)) == []
        # Later batches still reach the others.
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'z2')")
        assert _rows(await _until_marker(u1, "z2")) == [("INSERT", "z2", None)]
    log = rt_log[1].read_text()
    assert "division by zero" in log and "RLS check failed" in log


async def test_since_replay_is_filtered_too(api: Api, project, rt) -> None:
    await _docs(api, project)
    token = await _token(api, project, "u1")
    async with subscribe(rt, project.id, project.admin_key) as key:
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'start')")
        (first,) = await key.rows(1)
    await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u2', 'other'), ('u1', 'mine')")
    async with subscribe(rt, project.id, token, since=first["cursor"]) as u1:
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u2', 'other2'), ('u1', 'live')")
        assert _rows(await _until_marker(u1, "live")) == [("INSERT", "mine", None), ("INSERT", "live", None)]


async def test_tables_without_rls_and_locked_down_tables(api: Api, project, rt) -> None:
    await _sql(api, project, "CREATE TABLE open_t (id serial PRIMARY KEY, v text)")
    await _sql(api, project, "CREATE TABLE locked (id serial PRIMARY KEY, v text)")
    await _sql(api, project, "ALTER TABLE locked ENABLE ROW LEVEL SECURITY")  # no policy: nothing visible
    async with subscribe(rt, project.id, await _token(api, project, "u1")) as u1:
        await _sql(api, project, "INSERT INTO locked (v) VALUES ('secret')")
        await _sql(api, project, "INSERT INTO open_t (v) VALUES ('public')")
        got = await _until_marker(u1, "public")
        assert [(m["payload"]["table"], m["payload"]["record"]["v"]) for m in got if m["type"] == ROW] == [
            ("open_t", "public")
        ]


@contextlib.asynccontextmanager
async def in_process(instance, verify=None) -> AsyncIterator[tuple[str, RealtimeService]]:
    """The real service and handler on a real socket, in this process (to reach its internals)."""
    service = RealtimeService(load_settings(instance.env), verify)
    await service.start()
    port = free_port()
    try:
        async with ws_serve(service.handler, "127.0.0.1", port, process_request=service.process_request):
            yield f"ws://127.0.0.1:{port}", service
    finally:
        await service.close()


async def test_check_cost_grows_with_distinct_users_not_sockets(api: Api, project, instance) -> None:
    await _docs(api, project)
    tokens = {uid: await _token(api, project, uid) for uid in ("u1", "u2")}
    async with in_process(instance) as (url, service), contextlib.AsyncExitStack() as stack:
        socks = {
            uid: [await stack.enter_async_context(subscribe(url, project.id, tokens[uid])) for _ in range(15)]
            for uid in ("u1", "u2")
        }
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'warm')")
        for s in socks["u1"]:
            await _until_marker(s, "warm")
        assert service.gate is not None
        before = service.gate.queries
        # One transaction: one outbox batch with six events for thirty end-user sockets.
        await _sql(
            api,
            project,
            "INSERT INTO docs (owner, v) VALUES ('u1', 'a'), ('u2', 'b'), ('u1', 'c'), ('u2', 'd'), "
            "('x', 'e'), ('u1', 'end')",
        )
        for s in socks["u1"]:
            assert [v for _, v, _ in _rows(await _until_marker(s, "end"))] == ["a", "c", "end"]
        for s in socks["u2"]:
            assert [v for _, v, _ in _rows(await s.rows(2))] == ["b", "d"]
        # One policy lookup, then one query per distinct user (two), not per socket or event.
        assert service.gate.queries - before == 3


async def test_end_user_verifier_plugs_in(api: Api, project, instance) -> None:
    """The integration point for end-user JWTs: a verifier given to the service (in-process here,
    with the real handler on a real socket) turns a credential into (project, authUid, claims)."""
    await _docs(api, project, "owner = auth.uid() AND auth.jwt() ->> 'tier' = 'gold'")
    other = await api.new_project(project.owner_token)

    async def verify(credential: str, _project_id: str) -> EndUser | None:
        if not credential.startswith("jwt:"):
            return None
        pid, uid, tier = credential[4:].split(":")
        if uid == "expired":
            raise TokenExpired()
        return EndUser(pid, uid, {"sub": uid, "tier": tier, "role": "authenticated"})

    async with in_process(instance, verify) as (url, _):
        for bad, code in (
            ("jwt:" + other + ":u1:gold", "SCOPE_MISMATCH"),
            (f"jwt:{project.id}:expired:gold", "TOKEN_EXPIRED"),
            ("not-a-credential", "AUTH_REQUIRED"),
        ):
            async with connect(f"{url}/?token={bad}") as ws:
                await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"}))
                assert json.loads(await ws.recv())["error"]["code"] == code
        async with (
            subscribe(url, project.id, f"jwt:{project.id}:u1:gold") as gold,
            subscribe(url, project.id, f"jwt:{project.id}:u1:silver") as silver,
            subscribe(url, project.id, f"jwt:{project.id}:u2:gold") as u2,
        ):
            await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'a'), ('u2', 'b')")
            await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ('u1', 'end1'), ('u2', 'end2')")
            assert _rows(await _until_marker(gold, "end1")) == [
                ("INSERT", "a", None),
                ("INSERT", "end1", None),
            ]
            assert _rows(await _until_marker(u2, "end2")) == [
                ("INSERT", "b", None),
                ("INSERT", "end2", None),
            ]
            assert _rows(await silver.silent(0.5)) == []


async def test_end_user_jwts_subscribe_directly(api: Api, project, rt) -> None:
    """`fluxbase realtime` accepts the same end-user tokens as X-Fluxbase-User-Token: a project
    user's own access token and a token from the project's external provider (here HS256 with
    a jwtSecret); each sees only its rows, and a logged-out or forged token is refused."""
    await _docs(api, project)
    uid, own = await project_user_token(api, project.id)
    secret = "an external provider's shared secret, 32+ bytes long"
    r = await api.http.patch(
        f"/api/projects/{project.id}/auth/settings",
        json={"jwtSecret": secret, "jwtAllowedIssuers": ["https://idp.example"]},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 200, r.text
    claims = {"sub": "ext-user", "iss": "https://idp.example", "exp": int(time.time()) + 600}
    external = pyjwt.encode(claims, secret, algorithm="HS256")
    forged = pyjwt.encode(claims, "not the secret at all, but long enough", algorithm="HS256")
    for bad, code in ((forged, "INVALID_USER_TOKEN"), ("garbage", "AUTH_REQUIRED")):
        async with connect(f"{rt}/?token={bad}") as ws:
            await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"}))
            assert json.loads(await ws.recv())["error"]["code"] == code
    async with subscribe(rt, project.id, own) as mine, subscribe(rt, project.id, external) as ext:
        await _sql(api, project, "INSERT INTO docs (owner, v) VALUES ($1, 'own'), ('ext-user', 'ext')", [uid])
        await _sql(
            api, project, "INSERT INTO docs (owner, v) VALUES ($1, 'end1'), ('ext-user', 'end2')", [uid]
        )
        assert _rows(await _until_marker(mine, "end1")) == [("INSERT", "own", None), ("INSERT", "end1", None)]
        assert _rows(await _until_marker(ext, "end2")) == [("INSERT", "ext", None), ("INSERT", "end2", None)]
    # Logged out: the own token's session is gone, so it no longer subscribes.
    r = await api.http.post(f"/api/projects/{project.id}/auth/logout", headers=bearer(own))
    assert r.status_code == 200, r.text
    async with connect(f"{rt}/?token={own}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"}))
        assert json.loads(await ws.recv())["error"]["code"] == "INVALID_USER_TOKEN"
