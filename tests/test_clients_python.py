"""The Python client (clients/python, `fluxbase_client`) against the real stack: API, realtime,
PostgreSQL, S3 and `fluxbase worker` webhook deliveries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web

from fluxbase.devstack.procs import free_port
from fluxbase_client import (
    AsyncFluxbase,
    AuthError,
    Fluxbase,
    FluxbaseError,
    PermissionDenied,
    SqlError,
    WebhookVerificationError,
    verify,
)
from support import Api, bearer
from test_realtime import rt  # noqa: F401 - fixture
from test_webhooks import Proj, Receiver, create_hook, proj, receiver, wapi, wh  # noqa: F401 - fixtures


@pytest.fixture
async def fx(api: Api, project, rt):  # noqa: F811
    key = await api.new_key(project.owner_token, project.id, "admin", rateLimitRequests=1_000_000)
    async with AsyncFluxbase(api.base_url, project.id, key, realtime_url=rt) as client:
        yield client


async def test_sql_values_batch_and_typed_errors(fx: AsyncFluxbase, api: Api, project) -> None:
    await fx.sql("CREATE TABLE t (id int8 PRIMARY KEY, n numeric, at timestamptz, b bytea)")
    big = 2**62 + 1
    r = await fx.sql(
        "INSERT INTO t VALUES ($1, $2, $3, $4) RETURNING *",
        [big, Decimal("12345678901234567890.123456789"), "2026-01-02T03:04:05Z", b"\x00\xff"],
    )
    assert r.columns == ["id", "n", "at", "b"] and r.row_count == 1
    row = r.rows[0]
    assert row["id"] == str(big)  # beyond 2^53: exact digits, never a rounded number
    assert row["n"] == "12345678901234567890.123456789"
    assert row["b"] == "AP8="
    assert r.execution_info["operation"] == "INSERT"

    with pytest.raises(SqlError) as e:
        await fx.sql("SELECT * FROM usrs")
    assert e.value.status == 200 and e.value.code == "SQL_EXEC_ERROR" and e.value.sqlstate == "42P01"

    results = await fx.batch(["INSERT INTO t (id) VALUES (1)", ("SELECT count(*) AS c FROM t", [])])
    assert results[1].rows == [{"c": 2}]
    with pytest.raises(SqlError) as e:
        await fx.batch(["INSERT INTO t (id) VALUES (2)", "INSERT INTO t (id) VALUES (1)"])
    assert e.value.statement_index == 1 and e.value.sqlstate == "23505"
    assert (await fx.sql("SELECT count(*) AS c FROM t")).rows == [{"c": 2}]  # nothing half-applied

    async with AsyncFluxbase(api.base_url, project.id, "flx_live_" + "x" * 49) as bad:
        with pytest.raises(AuthError) as a:
            await bad.sql("SELECT 1")
    assert a.value.status == 401 and a.value.code == "AUTH_REQUIRED" and a.value.message
    read = await api.new_key(project.owner_token, project.id, "read")
    async with AsyncFluxbase(api.base_url, project.id, read) as ro:
        with pytest.raises(FluxbaseError) as w:
            await ro.sql("CREATE TABLE nope (id int)")
        assert w.value.code == "SQL_EXEC_ERROR"
        with pytest.raises(PermissionDenied):
            await ro.storage.create_bucket("nope")


async def test_records_query_builder(fx: AsyncFluxbase) -> None:
    await fx.sql("CREATE TABLE items (id serial PRIMARY KEY, name text, qty int)")
    inserted = await fx.table("items").insert([{"name": f"n{i}", "qty": i} for i in range(10)])
    assert len(inserted) == 10
    got = await fx.table("items").gte("qty", 3).lt("qty", 8).order("qty", desc=True).select("name").get()
    assert got == [{"name": f"n{i}"} for i in (7, 6, 5, 4, 3)]
    page = await fx.table("items").order("id").range(2, 4).page()
    assert [r["qty"] for r in page["records"]] == [2, 3, 4] and page["hasMore"] is True
    assert [r["qty"] async for r in fx.table("items").in_("qty", [1, 9]).order("qty").all(page_size=1)] == [
        1,
        9,
    ]
    one = inserted[0]["id"]
    assert (await fx.table("items").update(one, {"qty": 100}))["qty"] == 100
    assert (await fx.table("items").get_one(one))["qty"] == 100
    await fx.table("items").delete(one)
    with pytest.raises(FluxbaseError) as e:
        await fx.table("items").get_one(one)
    assert e.value.status == 404 and e.value.code == "NOT_FOUND"


async def test_storage_streams_from_disk_with_progress(fx: AsyncFluxbase, tmp_path) -> None:
    await fx.storage.create_bucket("docs")
    src = tmp_path / "big.bin"
    payload = bytes(range(256)) * 4096  # 1 MiB
    src.write_bytes(payload)
    seen: list[tuple[int, int | None]] = []
    f = await fx.storage.upload("docs", src, progress=lambda sent, total: seen.append((sent, total)))
    assert f["size"] == len(payload) and f["name"] == "big.bin"
    assert len(seen) >= 4 and seen[-1] == (len(payload), len(payload))
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)
    listing = await fx.storage.list("docs")
    assert [x["name"] for x in listing["files"]] == ["big.bin"]
    url = await fx.storage.download_url(f["s3_key"])
    async with httpx.AsyncClient() as h:
        assert (await h.get(url)).content == payload
    back = await fx.storage.download(f["s3_key"], tmp_path / "back.bin")
    assert back.read_bytes() == payload
    direct = tmp_path / "direct.txt"
    direct.write_text("straight to S3")
    d = await fx.storage.upload_direct("docs", direct)
    assert d["size"] == len("straight to S3")
    out = await fx.storage.remove(f["s3_key"], d["s3_key"])
    assert sorted(out["deleted"]) == sorted([f["s3_key"], d["s3_key"]])
    assert (await fx.storage.list("docs"))["files"] == []


async def test_end_user_auth_refresh_is_single_flight(fx: AsyncFluxbase, api: Api, project) -> None:
    await fx.sql("CREATE TABLE notes (id serial PRIMARY KEY, owner text DEFAULT auth.uid(), body text)")
    await fx.sql("ALTER TABLE notes ENABLE ROW LEVEL SECURITY")
    await fx.sql("CREATE POLICY own ON notes USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())")
    await fx.sql("INSERT INTO notes (owner, body) VALUES ('someone-else', 'hidden')")
    rw = await api.new_key(project.owner_token, project.id, "readwrite", requireUserAuth=True)
    events: list[str] = []
    async with AsyncFluxbase(api.base_url, project.id, rw) as app:
        app.auth.on_change(lambda event, session: events.append(event))
        await app.auth.register("ann@example.com", "correct horse battery")
        session = await app.auth.login("ann@example.com", "correct horse battery")
        assert session.user["email"] == "ann@example.com" and events == ["SIGNED_IN"]
        await app.sql("INSERT INTO notes (body) VALUES ('mine')")  # the token goes with every call
        assert [r["body"] for r in (await app.sql("SELECT body FROM notes")).rows] == ["mine"]
        # Expiring soon: ten concurrent calls refresh once (a second use of the single-use
        # refresh token would revoke the whole session).
        app.session.expires_at = time.time() + 5  # type: ignore[union-attr]
        old_refresh = app.session.refresh_token  # type: ignore[union-attr]
        rows = await asyncio.gather(*(app.sql("SELECT count(*) AS c FROM notes") for _ in range(10)))
        assert all(r.rows == [{"c": 1}] for r in rows)
        assert events == ["SIGNED_IN", "TOKEN_REFRESHED"]
        assert app.session.refresh_token != old_refresh  # type: ignore[union-attr]
        assert (await app.auth.me())["email"] == "ann@example.com"
        token = app.session.access_token  # type: ignore[union-attr]
        await app.auth.logout()
        assert events[-1] == "SIGNED_OUT" and app.session is None
        with pytest.raises(AuthError) as e:
            await app.sql("SELECT 1")
        assert e.value.code == "USER_TOKEN_REQUIRED"
    r = await api.http.get(f"/api/projects/{project.id}/auth/me", headers=bearer(token))
    assert r.status_code == 401  # the server ended the session


async def test_429_is_retried_after_retry_after(api: Api, project) -> None:
    key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=3, rateLimitWindowSeconds=1
    )
    async with AsyncFluxbase(api.base_url, project.id, key, max_retries=5) as c:
        started = time.monotonic()
        for _ in range(5):
            assert (await c.sql("SELECT 1 AS one")).rows == [{"one": 1}]
        assert time.monotonic() - started >= 0.9  # it waited for the window, it did not hammer
    async with AsyncFluxbase(api.base_url, project.id, key, max_retries=0) as c:
        with pytest.raises(FluxbaseError) as e:
            for _ in range(10):
                await c.sql("SELECT 1")
        assert e.value.status == 429 and e.value.code == "RATE_LIMIT" and e.value.retry_after


async def test_realtime_events_filters_broadcast_and_resume(fx: AsyncFluxbase) -> None:
    await fx.sql("CREATE TABLE a (id serial PRIMARY KEY, v text)")
    await fx.sql("CREATE TABLE b (id serial PRIMARY KEY, v text)")
    statuses: list[str] = []
    async with fx.realtime(on_status=statuses.append) as rt_:
        ch = await rt_.subscribe(tables=["a"])
        await fx.sql("INSERT INTO b (v) VALUES ('other table')")
        await fx.sql("INSERT INTO a (v) VALUES ('one')")
        ev = await ch.next(10)
        while ev["type"] == "schema_update":  # a CREATE TABLE's, read after the subscription began
            ev = await ch.next(10)
        assert ev["type"] == "db_event" and ev["payload"]["record"] == {"id": 1, "v": "one"}
        await ch.broadcast("hello", {"x": 1})
        b = await ch.next(10)
        assert b["type"] == "broadcast" and b["event"] == "hello" and b["payload"] == {"x": 1}
        # Cut the socket; what is committed meanwhile arrives once, in order, after the resume.
        await rt_.disconnect()
        for v in ("two", "three"):
            await fx.sql("INSERT INTO a (v) VALUES ($1)", [v])
        got = [await ch.next(15) for _ in range(2)]
        assert [m["payload"]["record"]["v"] for m in got] == ["two", "three"]
        assert "disconnected" in statuses and statuses.count("connected") >= 2
        await asyncio.sleep(0.3)
        assert ch.queue.empty()
        saved = ch.cursor
    # A later process resumes from the saved cursor.
    await fx.sql("INSERT INTO a (v) VALUES ('while away')")
    async with fx.realtime() as rt2:
        ch2 = await rt2.subscribe(since=saved, tables=["a"])
        m = await ch2.next(10)
        assert m["payload"]["record"]["v"] == "while away"


async def test_realtime_row_filters_topics_and_presence(fx: AsyncFluxbase) -> None:
    await fx.sql("CREATE TABLE todos (id serial PRIMARY KEY, owner text, done boolean)")
    async with fx.realtime() as rt_, fx.realtime() as other:
        mine = await rt_.subscribe(
            tables=["todos"], filters={"todos": {"column": "owner", "op": "eq", "value": "u1"}}
        )
        await fx.sql("INSERT INTO todos (owner, done) VALUES ('u2', false), ('u1', true)")
        ev = await mine.next(10)
        while ev["type"] == "schema_update":
            ev = await mine.next(10)
        assert ev["payload"]["record"]["owner"] == "u1"
        with pytest.raises(FluxbaseError) as e:
            await rt_.subscribe(filters={"todos": {"column": "owner", "op": "like", "value": "u%"}})
        assert e.value.code == "VALIDATION_ERROR" and "like" in e.value.message
        # a topic: broadcasts and presence
        chat = await rt_.subscribe(topic="chat")
        seen = await other.subscribe(topic="chat")
        assert (await seen.next(10))["type"] == "presence_state"
        key = await chat.track({"name": "ann"})
        diff = await seen.next(10)
        while diff["type"] != "presence_diff":
            diff = await seen.next(10)
        assert diff["payload"]["joins"] == {key: {"name": "ann"}} and seen.presence == {key: {"name": "ann"}}
        with pytest.raises(FluxbaseError) as e:
            await chat.track({"big": "x" * 5000})
        assert e.value.code == "PAYLOAD_TOO_LARGE"
        await chat.broadcast("hi", {"n": 1})
        b = await seen.next(10)
        assert b["type"] == "broadcast" and b["roomId"].endswith(":chat") and b["payload"] == {"n": 1}
        # a dropped socket reconnects, and the state is tracked again (under a new key)
        await rt_.disconnect()
        for _ in range(4):
            await seen.next(10)
            if len(seen.presence) == 1 and key not in seen.presence:
                break
        assert list(seen.presence.values()) == [{"name": "ann"}] and key not in seen.presence
        await chat.untrack()
        while seen.presence:
            await seen.next(10)


async def test_realtime_with_a_refused_credential_raises(fx: AsyncFluxbase) -> None:
    async with fx.realtime(token="flx_live_" + "y" * 49) as rt_:
        with pytest.raises(FluxbaseError) as e:
            await rt_.subscribe()
    assert e.value.code == "AUTH_REQUIRED"


def test_sync_client_has_the_same_api(api: Api, project, fx) -> None:
    with Fluxbase(api.base_url, project.id, fx.api_key) as c:
        c.sql("CREATE TABLE s (id serial PRIMARY KEY, v text)")
        c.table("s").insert({"v": "sync"})
        assert c.table("s").eq("v", "sync").get()[0]["v"] == "sync"
        assert [r["v"] for r in c.table("s").all()] == ["sync"]
        with pytest.raises(SqlError):
            c.sql("SELEC 1")


async def test_webhook_verify_on_real_deliveries(wapi: Api, proj: Proj, receiver: Receiver) -> None:  # noqa: F811
    hook = await create_hook(wapi, proj, receiver.url)
    secret = hook["secret"]
    r = await wapi.sql(proj.key, proj.id, "INSERT INTO orders (customer_id, amount) VALUES (7, 59.99)")
    assert r.json()["success"]
    await receiver.wait(lambda: len(receiver.bodies()) >= 1)
    req = next(x for x in receiver.requests if x["path"] == "/hook")
    body, headers = req["body"], req["headers"]
    event = verify(body, headers, secret)
    assert event["event_type"] == "row.inserted" and event["data"]["new"]["customer_id"] == 7
    with pytest.raises(WebhookVerificationError):
        verify(body.replace(b"59.99", b"0.01"), headers, secret)  # tampered body
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, "whsec_" + "A" * 32)  # wrong secret
    with pytest.raises(WebhookVerificationError):
        verify(body, headers, secret, now=int(headers["webhook-timestamp"]) + 301)  # stale
    # A forged X-Fluxbase-Signature alone is refused even when the Standard Webhooks one holds.
    forged = {**headers, "X-Fluxbase-Signature": "sha256=" + "0" * 64}
    with pytest.raises(WebhookVerificationError):
        verify(body, forged, secret)
    assert hmac.compare_digest(
        headers["X-Fluxbase-Signature"],
        "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    )
    assert json.loads(body) == event


_: Any = None


async def test_503_is_retried_only_for_idempotent_calls() -> None:
    """A real HTTP server that answers 503 DATABASE_CONNECTION_ERROR twice: a GET is retried
    with backoff, a statement (which may have run) is not."""
    hits: dict[str, int] = {}

    async def flaky(request: web.Request) -> web.Response:
        hits[request.method] = hits.get(request.method, 0) + 1
        if hits[request.method] <= 2:
            body = {"success": False, "error": {"code": "DATABASE_CONNECTION_ERROR", "message": "retry"}}
            return web.json_response(body, status=503)
        return web.json_response({"success": True, "buckets": [], "result": {"rows": []}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", flaky)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with AsyncFluxbase(f"http://127.0.0.1:{port}", "0123456789abcdef", "k") as c:
            assert await c.storage.list_buckets() == []
            assert hits["GET"] == 3
            with pytest.raises(FluxbaseError) as e:
                await c.sql("INSERT INTO t VALUES (1)")
            assert e.value.status == 503 and e.value.code == "DATABASE_CONNECTION_ERROR"
            assert hits["POST"] == 1
    finally:
        await runner.cleanup()


def test_sync_realtime(api: Api, project, fx) -> None:
    with Fluxbase(api.base_url, project.id, fx.api_key, realtime_url=fx.realtime_url) as c:
        c.sql("CREATE TABLE sr (id serial PRIMARY KEY, v text)")
        rt_ = c.realtime()
        try:
            ch = rt_.subscribe(tables=["sr"])
            c.sql("INSERT INTO sr (v) VALUES ('blocking')")
            ev = ch.next(10)
            # The CREATE TABLE's schema_update may still be in flight when the subscription
            # starts (committed before it, not yet read by the service): skip it.
            while ev["type"] == "schema_update":
                ev = ch.next(10)
            assert ev["type"] == "db_event" and ev["payload"]["record"]["v"] == "blocking"
        finally:
            rt_.close()
