"""Realtime authorization equals SQL's (issue 15, finding 4), through the real WebSocket and HTTP
APIs: a subscriber receives only rows its credential could SELECT, WebSocket broadcast needs
write scope, and revoking a credential ends its live subscriptions within seconds, on every
realtime replica."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect

from support import Api, assert_error, bearer
from test_realtime import Sub, _realtime, subscribe
from test_realtime_rls import _rows, _sql, _until_marker
from test_user_tokens import project_user_token

# Revocation is noticed by a periodic re-validation; the tests run it every second and allow
# a few rounds before calling a subscription still alive a failure.
REVALIDATE = {"FLUXBASE_REALTIME_REVALIDATE_SECONDS": "1"}
ENDS_WITHIN_S = 8.0


@pytest.fixture(scope="module")
def rt(instance, log_dir) -> Iterator[str]:
    with _realtime(instance, log_dir, **REVALIDATE) as url:
        yield url


@pytest.fixture
async def project(api: Api, project):
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


async def _key(api: Api, project, scope: str, **extra: Any) -> tuple[str, str]:
    """A new API key: (raw key, key id)."""
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": f"{scope} key", "scope": scope, **extra},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["apiKey"]["id"]


async def _rt_token(api: Api, project, credential: str, **headers: str) -> str:
    r = await api.http.post(
        "/api/realtime/token", json={"projectId": project.id}, headers={**bearer(credential), **headers}
    )
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


async def _ended(sub: Sub, code: str) -> dict[str, Any]:
    """The subscription ends: an error naming the room and `code` arrives, and the room is gone
    from the socket (broadcasting there is refused as not subscribed)."""
    error = await sub.until(lambda m: m["type"] == "error", ENDS_WITHIN_S)
    assert error["error"]["code"] == code and error["roomId"].startswith("project_"), error
    room = error["roomId"]
    await sub.ws.send(json.dumps({"type": "broadcast", "roomId": room, "event": "after", "payload": 0}))
    refused = await sub.until(lambda m: m["type"] == "error", 5)
    assert refused["error"]["code"] == "AUTH_REQUIRED" and "Subscribe" in refused["error"]["message"]
    return error


async def _select(api: Api, key: str, project, table: str) -> list[str]:
    r = await api.sql(key, project.id, f"SELECT v FROM {table} ORDER BY id")
    body = r.json()
    return [row["v"] for row in body["result"]["rows"]] if body["success"] else []


async def test_keys_receive_only_rows_their_role_could_select(api: Api, project, rt) -> None:
    ro_role, rw_role = f"p_{project.id}_ro", f"p_{project.id}_rw"
    for statement in (
        "CREATE TABLE open_t (id serial PRIMARY KEY, v text)",
        "CREATE TABLE no_grant (id serial PRIMARY KEY, v text)",
        f"REVOKE SELECT ON no_grant FROM {ro_role}",
        "CREATE TABLE owned (id serial PRIMARY KEY, owner text, v text)",
        "ALTER TABLE owned ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON owned FOR SELECT USING (owner = auth.uid())",
        "CREATE TABLE public_rls (id serial PRIMARY KEY, v text)",
        "ALTER TABLE public_rls ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY everyone ON public_rls FOR SELECT USING (v <> 'never')",
        "CREATE TABLE rw_only (id serial PRIMARY KEY, v text)",
        "ALTER TABLE rw_only ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY writers ON rw_only FOR SELECT TO {rw_role} USING (true)",
        # A policy that asks who is asking: current_user is the key's role, as in SQL.
        "CREATE TABLE by_role (id serial PRIMARY KEY, v text)",
        "ALTER TABLE by_role ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY by_role ON by_role FOR SELECT USING (current_user = '{ro_role}')",
    ):
        await _sql(api, project, statement)
    ro, _ = await _key(api, project, "read")
    rw, _ = await _key(api, project, "readwrite")
    ro_token = await _rt_token(api, project, ro)
    async with (
        subscribe(rt, project.id, ro) as read_key,
        subscribe(rt, project.id, ro_token, in_url=False) as read_token,
        subscribe(rt, project.id, rw) as rw_key,
        subscribe(rt, project.id, project.admin_key) as admin,
    ):
        for statement in (
            "INSERT INTO open_t (v) VALUES ('open')",
            "INSERT INTO no_grant (v) VALUES ('no grant')",
            "INSERT INTO owned (owner, v) VALUES ('u1', 'owned')",
            "INSERT INTO public_rls (v) VALUES ('public'), ('never')",
            "INSERT INTO rw_only (v) VALUES ('rw only')",
            "INSERT INTO by_role (v) VALUES ('by role')",
        ):
            await _sql(api, project, statement)
        await _sql(api, project, "UPDATE no_grant SET v = 'no grant 2'")
        await _sql(api, project, "DELETE FROM owned")
        await _sql(api, project, "INSERT INTO open_t (v) VALUES ('end')")
        got = {
            name: [
                (m["payload"]["table"], m["payload"]["record"]["v"])
                for m in await _until_marker(sub, "end")
                if m["type"] == "db_event"
            ]
            for name, sub in (("read", read_key), ("token", read_token), ("rw", rw_key), ("admin", admin))
        }
    assert [v for _, v in got["admin"]] == [
        "open", "no grant", "owned", "public", "never", "rw only", "by role", "no grant 2", "owned", "end",
    ]  # fmt: skip
    assert [v for _, v in got["read"]] == ["open", "public", "by role", "end"]
    assert got["token"] == got["read"]
    assert [v for _, v in got["rw"]] == ["open", "no grant", "public", "rw only", "no grant 2", "end"]
    # Every row the same keys read with SQL now arrived as an event too.
    for key, name in ((ro, "read"), (rw, "rw")):
        for table in ("open_t", "no_grant", "public_rls", "rw_only", "by_role"):
            for v in await _select(api, key, project, table):
                assert (table, v) in got[name], (name, table, v)


async def test_readwrite_end_user_is_checked_as_the_readwrite_role(api: Api, project, rt) -> None:
    """A token minted with a requireUserAuth readwrite key and an end-user token: RLS as that
    user, with the readwrite role's grants and policies."""
    rw_role = f"p_{project.id}_rw"
    uid, user_token = await project_user_token(api, project.id)
    for statement in (
        "CREATE TABLE notes (id serial PRIMARY KEY, owner text, v text)",
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY mine ON notes FOR SELECT TO {rw_role} USING (owner = auth.uid())",
    ):
        await _sql(api, project, statement)
    browser, _ = await _key(api, project, "readwrite", requireUserAuth=True)
    token = await _rt_token(api, project, browser, **{"X-Fluxbase-User-Token": user_token})
    async with subscribe(rt, project.id, token) as sub:
        await _sql(
            api, project, "INSERT INTO notes (owner, v) VALUES ($1, 'mine'), ('other', 'theirs')", [uid]
        )
        await _sql(api, project, "INSERT INTO notes (owner, v) VALUES ($1, 'end')", [uid])
        assert [v for _, v, _ in _rows(await _until_marker(sub, "end"))] == ["mine", "end"]


async def test_websocket_broadcast_needs_write_scope(api: Api, project, rt) -> None:
    ro, _ = await _key(api, project, "read")
    rw, _ = await _key(api, project, "readwrite")
    _, user_token = await project_user_token(api, project.id)
    room = f"project_{project.id}"
    async with (
        subscribe(rt, project.id, project.admin_key) as listener,
        subscribe(rt, project.id, ro) as reader,
        subscribe(rt, project.id, user_token) as end_user,
        subscribe(rt, project.id, rw) as writer,
    ):
        for sub in (reader, end_user):
            await sub.ws.send(json.dumps({"type": "broadcast", "roomId": room, "event": "x", "payload": 1}))
            msg = await sub.until(lambda m: m["type"] == "error")
            assert msg["error"]["code"] == "INSUFFICIENT_PERMISSIONS" and msg["roomId"] == room, msg
        await writer.ws.send(json.dumps({"type": "broadcast", "roomId": room, "event": "ok", "payload": 2}))
        msg = await listener.until(lambda m: m["type"] == "broadcast")
        assert msg["event"] == "ok", msg  # the refused ones never arrived


async def test_websocket_broadcast_is_rate_limited_and_size_capped(api: Api, project, rt) -> None:
    limited, _ = await _key(api, project, "readwrite", rateLimitRequests=3, rateLimitWindowSeconds=60)
    room = f"project_{project.id}"
    async with subscribe(rt, project.id, limited) as sub:
        await sub.ws.send(
            json.dumps({"type": "broadcast", "roomId": room, "event": "big", "payload": "x" * 70_000})
        )
        msg = await sub.until(lambda m: m["type"] == "error")
        assert msg["error"]["code"] == "VALIDATION_ERROR", msg
        codes = []
        for i in range(5):
            await sub.ws.send(json.dumps({"type": "broadcast", "roomId": room, "event": "n", "payload": i}))
        for _ in range(5):
            msg = await sub.until(lambda m: m["type"] in ("broadcast", "error"))
            codes.append(msg["error"]["code"] if msg["type"] == "error" else "sent")
        assert codes.count("RATE_LIMIT") == 2 and codes.count("sent") == 3, codes


async def test_http_broadcast_with_a_browser_key_needs_a_user_token(api: Api, project) -> None:
    browser, _ = await _key(api, project, "readwrite", requireUserAuth=True)
    body = {"projectId": project.id, "event": "e", "payload": {}}
    assert_error(
        await api.http.post("/api/realtime/broadcast", json=body, headers=bearer(browser)),
        401,
        "USER_TOKEN_REQUIRED",
    )
    _, user_token = await project_user_token(api, project.id)
    r = await api.http.post(
        "/api/realtime/broadcast",
        json=body,
        headers={**bearer(browser), "X-Fluxbase-User-Token": user_token},
    )
    assert r.status_code == 200, r.text


async def test_revoking_a_key_ends_its_subscriptions_and_tokens(api: Api, project, rt) -> None:
    ro, ro_id = await _key(api, project, "read")
    token = await _rt_token(api, project, ro)
    async with (
        subscribe(rt, project.id, ro) as direct,
        subscribe(rt, project.id, token) as minted,
        subscribe(rt, project.id, project.admin_key) as bystander,
    ):
        r = await api.http.delete(
            f"/api/projects/{project.id}/api-keys/{ro_id}", headers=bearer(project.owner_token)
        )
        assert r.status_code == 200, r.text
        await asyncio.gather(_ended(direct, "AUTH_REQUIRED"), _ended(minted, "AUTH_REQUIRED"))
        await _sql(api, project, "CREATE TABLE still_here (id int)")
        assert (await bystander.until(lambda m: m["type"] == "schema_update"))["payload"][
            "table"
        ] == "still_here"
    # The token died with its key.
    async with connect(f"{rt}/?token={token}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{project.id}"}))
        assert json.loads(await ws.recv())["error"]["code"] == "AUTH_REQUIRED"


async def test_rotating_a_key_ends_its_subscriptions(api: Api, project, rt) -> None:
    rw, rw_id = await _key(api, project, "readwrite")
    token = await _rt_token(api, project, rw)
    async with subscribe(rt, project.id, rw) as direct, subscribe(rt, project.id, token) as minted:
        r = await api.http.post(
            f"/api/projects/{project.id}/api-keys/{rw_id}/rotate", headers=bearer(project.owner_token)
        )
        assert r.status_code == 200, r.text
        new_key = r.json()["key"]
        await asyncio.gather(_ended(direct, "AUTH_REQUIRED"), _ended(minted, "AUTH_REQUIRED"))
    async with subscribe(rt, project.id, new_key):
        pass  # the rotated key itself works


async def test_end_user_logout_and_disabling_end_subscriptions(api: Api, project, rt) -> None:
    _, own = await project_user_token(api, project.id)
    uid2, own2 = await project_user_token(api, project.id)
    browser, _ = await _key(api, project, "read", requireUserAuth=True)
    minted = await _rt_token(api, project, browser, **{"X-Fluxbase-User-Token": own})
    async with (
        subscribe(rt, project.id, own) as direct,
        subscribe(rt, project.id, minted) as via_token,
        subscribe(rt, project.id, own2) as disabled,
    ):
        r = await api.http.post(f"/api/projects/{project.id}/auth/logout", headers=bearer(own))
        assert r.status_code == 200, r.text
        r = await api.http.post(
            f"/api/projects/{project.id}/auth/users/{uid2}/disable", headers=bearer(project.owner_token)
        )
        assert r.status_code == 200, r.text
        await asyncio.gather(
            _ended(direct, "INVALID_USER_TOKEN"),
            _ended(via_token, "INVALID_USER_TOKEN"),
            _ended(disabled, "USER_DISABLED"),
        )


async def test_removing_a_member_ends_their_subscriptions(api: Api, project, rt, control_db) -> None:
    member, member_token = await api.new_user()
    await control_db.execute(
        "INSERT INTO fluxbase.project_members (project_id, user_id, role) VALUES ($1, $2, 'viewer')",
        project.id,
        member["id"],
    )
    token = await _rt_token(api, project, member_token)
    async with subscribe(rt, project.id, token) as sub:
        r = await api.http.delete(
            "/api/team",
            params={"projectId": project.id, "userId": member["id"]},
            headers=bearer(project.owner_token),
        )
        assert r.status_code == 200, r.text
        await _ended(sub, "SCOPE_MISMATCH")


async def test_dashboard_logout_ends_the_members_subscriptions(api: Api, project, rt) -> None:
    _, session = await api.new_user()
    pid = await api.new_project(session)
    token = await _rt_token(api, type(project)(pid, session, {}, ""), session)
    async with subscribe(rt, pid, token) as sub:
        r = await api.http.post("/api/auth/logout", headers=bearer(session))
        assert r.status_code == 200, r.text
        await _ended(sub, "AUTH_REQUIRED")


async def test_suspending_a_project_ends_subscriptions_within_seconds(
    api: Api, project, rt, instance_admin
) -> None:
    async with subscribe(rt, project.id, project.admin_key) as sub:
        r = await api.http.post(
            f"/api/admin/projects/{project.id}/suspend", headers=bearer(instance_admin["token"])
        )
        assert r.status_code == 200, r.text
        await _ended(sub, "PROJECT_SUSPENDED")


async def test_revocation_reaches_every_replica(api: Api, project, rt, instance, log_dir) -> None:
    ro, ro_id = await _key(api, project, "read")
    with _realtime(instance, log_dir, **REVALIDATE) as rt2:
        async with subscribe(rt, project.id, ro) as a, subscribe(rt2, project.id, ro) as b:
            r = await api.http.delete(
                f"/api/projects/{project.id}/api-keys/{ro_id}", headers=bearer(project.owner_token)
            )
            assert r.status_code == 200, r.text
            await asyncio.gather(_ended(a, "AUTH_REQUIRED"), _ended(b, "AUTH_REQUIRED"))


async def test_broadcast_flood_cannot_evict_another_projects_history(
    api: Api, project, rt, control_db
) -> None:
    from fluxbase.services.realtime import trim_events

    flooder = await api.new_project(project.owner_token)
    flood_key = await api.new_key(project.owner_token, flooder, "admin", rateLimitRequests=1_000_000)
    await _sql(api, project, "CREATE TABLE items (id serial PRIMARY KEY, v text)")
    async with subscribe(rt, project.id, project.admin_key) as sub:
        await _sql(api, project, "INSERT INTO items (v) VALUES ('seen')")
        (seen,) = await sub.rows(1)
    await _sql(api, project, "INSERT INTO items (v) VALUES ('gap')")
    first_flood = None
    for i in range(40):
        r = await api.http.post(
            "/api/realtime/broadcast",
            json={"projectId": flooder, "event": "spam", "payload": i},
            headers=bearer(flood_key),
        )
        assert r.status_code == 200, r.text
        first_flood = first_flood or r.json()["id"]
    first_cursor = await control_db.fetchval(
        "SELECT xid::text || ':' || id FROM fluxbase.events WHERE id = $1", first_flood
    )
    await asyncio.sleep(0.2)
    # The outbox's row budget is what came after 'seen' apart from the flood: trimming to it
    # may drop 'seen' and everything older, never 'gap'. Broadcasts are bounded per project and
    # never push another project's history out.
    budget = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events WHERE kind <> 'broadcast' "
        "AND (xid, id) > (split_part($1, ':', 1)::xid8, split_part($1, ':', 2)::bigint)",
        seen["cursor"],
    )
    await trim_events(control_db, max_age_s=10**9, max_rows=int(budget), broadcast_keep=10)
    async with subscribe(rt, project.id, project.admin_key, since=seen["cursor"]) as sub:
        (gap,) = await sub.rows(1)
        assert gap["payload"]["record"]["v"] == "gap"
    left = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'", flooder
    )
    assert left == 10
    # The flooder's own cursor from before the trim is now older than its retention:
    # resync_required, never a silent gap.
    async with connect(f"{rt}/?token={flood_key}") as ws:
        msg = {"type": "subscribe", "roomId": f"project_{flooder}", "since": first_cursor}
        await ws.send(json.dumps(msg))
        kinds = [json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] for _ in range(2)]
        assert kinds == ["subscribed", "resync_required"]


async def test_tenants_cannot_call_the_checker_functions(api: Api, project) -> None:
    """Only the checker role may evaluate rows as another identity: a key of any scope that
    calls the functions from SQL is refused (else it could read as any end user)."""
    schema, ro_role = f"p_{project.id}", f"p_{project.id}_ro"
    calls = (
        f"SELECT * FROM fluxbase_guard.visible_rows_as('{schema}', '{ro_role}', ARRAY['victim'], "
        "ARRAY['{}'], ARRAY['read'], ARRAY['SELECT 1, 1, 1::bigint, NULL::text'], ARRAY['[]'])",
        f"SELECT * FROM fluxbase_guard.scope_policies('{schema}', ARRAY['t'], '{ro_role}')",
        f"SELECT fluxbase_guard.checker_role_ok('{schema}', '{ro_role}')",
    )
    for scope in ("read", "readwrite", "admin"):
        key, _ = await _key(api, project, scope)
        for call in calls:
            body = (await api.sql(key, project.id, call)).json()
            assert body["success"] is False, (scope, call, body)
