"""Webhooks end to end: a real API, two real `fluxbase worker` processes, real local receivers
(an aiohttp server in the test, and the reference doc's handler under Node)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import standardwebhooks
from aiohttp import web

from fluxbase.config import WebhookSettings
from fluxbase.devstack.procs import free_port, stop_process
from fluxbase.security.ssrf import ForbiddenTarget, GuardedResolver, Policy
from fluxbase.webhooks.sender import Sender
from support import ROOT, Api, assert_clean, assert_error, bearer

SCHEDULE = "0.3,0.3,0.3,0.3,0.3"  # five retries, about 1.5 s in all
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# -- fixtures ---------------------------------------------------------------------------------


@contextlib.contextmanager
def run_worker(env: dict[str, str], log_dir: Path, n: int) -> Iterator[subprocess.Popen[bytes]]:
    log_path = log_dir / f"worker-{n}-{os.getpid()}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fluxbase", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    try:
        yield proc
    finally:
        stop_process(proc, signal.SIGTERM, timeout=15)


@pytest.fixture(scope="module")
async def wh(spawn, stack, log_dir) -> AsyncIterator[dict[str, Any]]:
    """An instance that allows loopback receivers, with a short retry schedule and two workers."""
    async with spawn(
        FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        FLUXBASE_WEBHOOKS_RETRY_SCHEDULE=SCHEDULE,
        FLUXBASE_WEBHOOKS_TIMEOUT_S="3",
    ) as inst:
        db = await asyncpg.connect(stack.database_url(inst.dbname))
        try:
            with run_worker(inst.env, log_dir, 1), run_worker(inst.env, log_dir, 2):
                deadline = time.monotonic() + 30
                while (
                    await db.fetchval(
                        "SELECT count(*) FROM fluxbase.event_readers WHERE reader_id LIKE 'wh_%'"
                    )
                    < 2
                ):
                    assert time.monotonic() < deadline, "workers did not start"
                    await asyncio.sleep(0.1)
                yield {"url": inst.url, "db": db}
        finally:
            await db.close()


@pytest.fixture
async def wapi(wh) -> AsyncIterator[Api]:
    client = Api(wh["url"])
    yield client
    await client.close()


class Proj:
    def __init__(self, pid: str, token: str, key: str):
        self.id, self.token, self.key = pid, token, key


@pytest.fixture
async def proj(wapi: Api) -> Proj:
    _, token = await wapi.new_user()
    pid = await wapi.new_project(token)
    key = await wapi.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
    r = await wapi.sql(
        key, pid, "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int, amount numeric, status text)"
    )
    assert r.json()["success"], r.text
    return Proj(pid, token, key)


class Receiver:
    """A real HTTP endpoint that records every request and answers as told."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        self.reply = "OK"
        self.redirect: str | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        status = 302 if self.redirect else self.status
        self.requests.append(
            {"path": request.path, "headers": dict(request.headers), "body": body, "status": status}
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect:
            raise web.HTTPFound(self.redirect)
        return web.Response(status=self.status, text=self.reply)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def bodies(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests if r["path"] == path and r["status"] < 300]

    async def wait(self, pred: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out; received {len(self.requests)} requests"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def create_hook(api: Api, p: Proj, url: str, **extra: Any) -> dict[str, Any]:
    body = {
        "projectId": p.id,
        "url": url,
        "events": ["row.inserted", "row.updated", "row.deleted", "schema.changed"],
    }
    body.update(extra)
    r = await api.http.post("/api/webhooks", json=body, headers=bearer(p.key))
    assert r.status_code == 201, r.text
    return dict(r.json()["webhook"])


async def deliveries(api: Api, p: Proj, hook_id: str, **params: Any) -> list[dict[str, Any]]:
    r = await api.http.get(f"/api/webhooks/{hook_id}/deliveries", params=params, headers=bearer(p.key))
    assert r.status_code == 200, r.text
    return list(r.json()["deliveries"])


async def wait_deliveries(
    api: Api, p: Proj, hook_id: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        ds = await deliveries(api, p, hook_id, limit=500)
        if pred(ds):
            return ds
        assert time.monotonic() < deadline, f"timed out waiting for deliveries: {ds[:3]}"
        await asyncio.sleep(0.05)


async def sql(api: Api, p: Proj, query: str, params: list[Any] | None = None) -> dict[str, Any]:
    body = (await api.sql(p.key, p.id, query, params)).json()
    assert body["success"], body
    return dict(body)


# -- configuration ----------------------------------------------------------------------------


async def test_configuration_round_trip_and_secret_shown_once(
    wapi: Api, proj: Proj, receiver: Receiver
) -> None:
    hook = await create_hook(wapi, proj, receiver.url, events=["row.inserted"], tables=["orders"])
    secret = hook["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert hook["events"] == ["row.inserted"] and hook["tables"] == ["orders"] and hook["enabled"] is True
    got = await wapi.http.get(f"/api/webhooks/{hook['id']}", headers=bearer(proj.key))
    listed = await wapi.http.get("/api/webhooks", params={"projectId": proj.id}, headers=bearer(proj.key))
    for r in (got, listed):
        assert r.status_code == 200 and "secret" not in r.text
        assert_clean(r, secret)
    assert [h["id"] for h in listed.json()["webhooks"]] == [hook["id"]]

    r = await wapi.http.patch(
        f"/api/webhooks/{hook['id']}",
        json={"events": ["row.deleted", "row.inserted"], "tables": None, "enabled": False},
        headers=bearer(proj.key),
    )
    assert r.status_code == 200, r.text
    changed = r.json()["webhook"]
    assert changed["events"] == ["row.inserted", "row.deleted"] and changed["tables"] is None
    assert changed["enabled"] is False and "secret" not in changed
    r = await wapi.http.patch(
        f"/api/webhooks/{hook['id']}", json={"rotateSecret": True}, headers=bearer(proj.key)
    )
    rotated = r.json()["webhook"]["secret"]
    assert rotated.startswith("whsec_") and rotated != secret

    for bad, field in (
        ({"events": ["row.created"]}, "row.created"),
        ({"events": []}, "events"),
        ({"url": "ftp://example.com/x"}, "http"),
        ({"url": "http://user:pw@93.184.215.14/x"}, "credentials"),
        ({"tables": ["orders; drop table x"]}, "table name"),
        ({"secret": "short"}, "secret"),
    ):
        r = await wapi.http.patch(f"/api/webhooks/{hook['id']}", json=bad, headers=bearer(proj.key))
        body = assert_error(r, 400, "VALIDATION_ERROR")
        assert field in body["error"]["message"], body

    r = await wapi.http.delete(f"/api/webhooks/{hook['id']}", headers=bearer(proj.key))
    assert r.status_code == 200
    assert_error(
        await wapi.http.get(f"/api/webhooks/{hook['id']}", headers=bearer(proj.key)), 404, "NOT_FOUND"
    )


async def test_webhooks_need_admin_scope_and_the_right_project(
    wapi: Api, proj: Proj, receiver: Receiver
) -> None:
    hook = await create_hook(wapi, proj, receiver.url)
    rw = await wapi.new_key(proj.token, proj.id, "readwrite")
    assert_error(
        await wapi.http.get("/api/webhooks", params={"projectId": proj.id}, headers=bearer(rw)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(
        await wapi.http.get(f"/api/webhooks/{hook['id']}", headers=bearer(rw)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    _, other_token = await wapi.new_user()
    other = await wapi.new_project(other_token)
    other_key = await wapi.new_key(other_token, other, "admin")
    for r in (
        await wapi.http.get(f"/api/webhooks/{hook['id']}", headers=bearer(other_key)),
        await wapi.http.delete(f"/api/webhooks/{hook['id']}", headers=bearer(other_key)),
        await wapi.http.get(f"/api/webhooks/{hook['id']}/deliveries", headers=bearer(other_key)),
    ):
        assert_error(r, 403, "SCOPE_MISMATCH")
    assert_error(await wapi.http.get("/api/webhooks", headers=bearer(proj.key)), 400, "VALIDATION_ERROR")
    assert_error(await wapi.http.get("/api/webhooks/wh_nope", headers=bearer(proj.key)), 404, "NOT_FOUND")


async def test_ssrf_targets_are_refused_at_configuration(api: Api, project) -> None:
    """The session instance keeps the default: loopback is not allowed either."""
    for url in (
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.10/hook",
        "http://100.64.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[fe80::1]/hook",
        "http://224.0.0.1/hook",
        "http://203.0.113.7/hook",  # documentation range
    ):
        r = await api.http.post(
            "/api/webhooks",
            json={"projectId": project.id, "url": url, "events": ["row.inserted"]},
            headers=bearer(project.admin_key),
        )
        body = assert_error(r, 400, "VALIDATION_ERROR")
        assert "not allowed" in body["error"]["message"], (url, body)
    # A public address is accepted (no request is made at configuration).
    r = await api.http.post(
        "/api/webhooks",
        # Disabled, so that it does not hold back outbox retention on this shared instance.
        json={
            "projectId": project.id,
            "url": "https://93.184.215.14/hook",
            "events": ["row.inserted"],
            "enabled": False,
        },
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 201, r.text


async def test_ssrf_guard_applies_again_at_connect_time(receiver: Receiver) -> None:
    """DNS may change after configuration: the sender's resolver refuses loopback answers."""
    with pytest.raises(ForbiddenTarget):
        await GuardedResolver(Policy()).resolve("localhost", receiver.port)
    sender = Sender(WebhookSettings(timeout_s=2), Policy())
    try:
        for url in (f"http://localhost:{receiver.port}/hook", receiver.url):
            attempt = await sender.send(url, "whsec_" + "A" * 44, "msg_1", "row.inserted", b"{}")
            assert (
                not attempt.ok
                and attempt.status is None
                and attempt.error
                and attempt.error.startswith("refused")
            )
    finally:
        await sender.close()
    assert receiver.requests == []


# -- delivery ---------------------------------------------------------------------------------


async def test_payload_and_both_signatures_verify(wapi: Api, proj: Proj, receiver: Receiver) -> None:
    hook = await create_hook(wapi, proj, receiver.url)
    secret = hook["secret"]
    await sql(wapi, proj, "INSERT INTO orders (customer_id, amount, status) VALUES (7, 59.99, 'pending')")
    await receiver.wait(lambda: len(receiver.bodies()) >= 1)
    req = receiver.requests[0]
    body, headers = req["body"], req["headers"]
    event = json.loads(body)
    assert list(event) == ["event_type", "project_id", "table_id", "timestamp", "data"]
    assert event["event_type"] == "row.inserted" and event["project_id"] == proj.id
    assert event["table_id"] == "orders" and TS_RE.match(event["timestamp"])
    assert event["data"] == {
        "new": {"id": 1, "customer_id": 7, "amount": 59.99, "status": "pending"},
        "old": None,
    }
    # The doc's check, byte for byte.
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Fluxbase-Signature"] == f"sha256={expected}"
    # The Standard Webhooks reference verifier.
    assert standardwebhooks.Webhook(secret).verify(body, headers) == event
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook("whsec_" + "B" * 44).verify(body, headers)
    assert headers["webhook-id"].startswith("msg_") and headers["X-Fluxbase-Event"] == "row.inserted"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60


async def test_columns_of_extension_types_are_serialised(wapi: Api, proj: Proj, receiver: Receiver) -> None:
    """A vector column arrives as pgvector's text form, an hstore one through its json cast."""
    await create_hook(wapi, proj, receiver.url, events=["row.inserted"])
    await sql(wapi, proj, "CREATE EXTENSION vector")
    await sql(wapi, proj, "CREATE EXTENSION hstore")
    await sql(wapi, proj, "CREATE TABLE docs (id int PRIMARY KEY, embedding vector(3), attrs hstore)")
    await sql(wapi, proj, "INSERT INTO docs VALUES (1, '[1,2.5,3]', 'lang=>en, n=>2')")
    await receiver.wait(lambda: len(receiver.bodies()) >= 1)
    event = receiver.bodies()[0]
    assert event["table_id"] == "docs", event
    assert event["data"]["new"] == {"id": 1, "embedding": "[1,2.5,3]", "attrs": {"lang": "en", "n": "2"}}, (
        event
    )


async def test_every_event_kind_in_order_with_filters(wapi: Api, proj: Proj, receiver: Receiver) -> None:
    # A table filter names an existing table (an unknown one is refused: issue 25).
    await sql(wapi, proj, "CREATE TABLE customers (id int PRIMARY KEY)")
    everything = await create_hook(wapi, proj, receiver.url)
    only_deletes = await create_hook(
        wapi, proj, receiver.url.replace("/hook", "/deletes"), events=["row.deleted"]
    )
    other_table = await create_hook(wapi, proj, receiver.url.replace("/hook", "/other"), tables=["customers"])
    await sql(wapi, proj, "ALTER TABLE customers ADD COLUMN note text")
    await sql(wapi, proj, "INSERT INTO orders (customer_id, amount, status) VALUES (1, 10, 'new')")
    await sql(wapi, proj, "UPDATE orders SET status = 'paid' WHERE id = 1")
    await sql(wapi, proj, "DELETE FROM orders WHERE id = 1")
    await receiver.wait(lambda: len(receiver.bodies()) >= 4 and len(receiver.bodies("/deletes")) >= 1)
    created, ins, upd, dele = receiver.bodies()
    assert created["event_type"] == "schema.changed" and created["table_id"] == "customers"
    assert created["data"]["new"]["command"] == "ALTER TABLE"
    assert ins["event_type"] == "row.inserted" and ins["data"]["old"] is None
    assert upd["event_type"] == "row.updated"
    assert upd["data"]["new"]["status"] == "paid" and upd["data"]["old"]["status"] == "new"
    assert (
        dele["event_type"] == "row.deleted" and dele["data"]["new"] is None and dele["data"]["old"]["id"] == 1
    )
    assert [b["event_type"] for b in receiver.bodies("/deletes")] == ["row.deleted"]
    # The customers-only endpoint got the ALTER TABLE and nothing about orders.
    await receiver.wait(lambda: len(receiver.bodies("/other")) >= 1)
    await asyncio.sleep(0.3)
    assert [b["table_id"] for b in receiver.bodies("/other")] == ["customers"]
    ds = await deliveries(wapi, proj, everything["id"])
    assert [d["status"] for d in ds] == ["delivered"] * 4 and all(d["responseStatus"] == 200 for d in ds)
    assert ds[0]["attempts"] == 1 and ds[0]["responseTimeMs"] is not None and ds[0]["nextRetryAt"] is None
    assert ds[0]["payload"]["event_type"] == "row.deleted"
    assert len(await deliveries(wapi, proj, only_deletes["id"])) == 1
    assert len(await deliveries(wapi, proj, other_table["id"])) == 1


async def test_rolled_back_transaction_sends_nothing(wapi: Api, proj: Proj, receiver: Receiver) -> None:
    await create_hook(wapi, proj, receiver.url, events=["row.inserted"])
    # Inserts two rows, then fails on the third: the statement's transaction rolls back.
    body = (
        await wapi.sql(
            proj.key,
            proj.id,
            "INSERT INTO orders (customer_id) SELECT 10 / (g - 3) FROM generate_series(1, 5) g",
        )
    ).json()
    assert body["success"] is False and body["error"]["details"] == "ERROR:  22012"
    await sql(wapi, proj, "INSERT INTO orders (customer_id, status) VALUES (99, 'marker')")
    await receiver.wait(lambda: len(receiver.bodies()) >= 1)
    await asyncio.sleep(0.5)
    assert [b["data"]["new"]["status"] for b in receiver.bodies()] == ["marker"]


async def test_receiver_down_then_back_gets_everything_in_order(wapi: Api, proj: Proj) -> None:
    receiver = Receiver()  # not listening yet: connection refused
    hook = await create_hook(wapi, proj, receiver.url, events=["row.inserted"])
    n = 20
    for i in range(n):
        await sql(wapi, proj, "INSERT INTO orders (customer_id) VALUES ($1)", [i])
    # The first delivery has failed at least twice before the receiver comes up.
    await wait_deliveries(wapi, proj, hook["id"], lambda ds: any(d["attempts"] >= 2 for d in ds))
    ds = await deliveries(wapi, proj, hook["id"], limit=500)
    head = min(ds, key=lambda d: int(d["id"]))
    assert head["status"] == "pending" and head["error"].startswith("could not connect to 127.0.0.1:")
    assert head["nextRetryAt"] is not None
    assert all(d["attempts"] == 0 for d in ds if d is not head)  # in order: nothing overtakes the head
    await receiver.start()
    try:
        receiver.status = 503  # up, but failing for a moment
        await receiver.wait(lambda: len(receiver.requests) >= 1)
        receiver.status = 200
        await receiver.wait(lambda: len(receiver.bodies()) >= n)
        got = [b["data"]["new"]["customer_id"] for b in receiver.bodies()]
        assert got == list(range(n))
        ids = [r["headers"]["webhook-id"] for r in receiver.requests]
        # Every retry of a message carries the message's webhook-id; each message once delivered.
        ok_ids = [r["headers"]["webhook-id"] for r in receiver.requests if r["status"] < 300]
        assert len(set(ok_ids)) == n == len(ok_ids)
        assert set(ids) == set(ok_ids)
        ds = await wait_deliveries(
            wapi, proj, hook["id"], lambda ds: all(d["status"] == "delivered" for d in ds)
        )
        head = next(d for d in ds if d["id"] == head["id"])
        assert head["attempts"] >= 3 and head["responseStatus"] == 200 and head["error"] is None
    finally:
        await receiver.stop()


async def test_exhausted_schedule_disables_endpoint_then_resume_and_redeliver(
    wapi: Api, proj: Proj, receiver: Receiver
) -> None:
    receiver.status = 500
    receiver.reply = "x" * 5000
    hook = await create_hook(wapi, proj, receiver.url, events=["row.inserted"])
    await sql(wapi, proj, "INSERT INTO orders (customer_id) VALUES (1)")
    await sql(wapi, proj, "INSERT INTO orders (customer_id) VALUES (2)")
    retries = len(SCHEDULE.split(","))

    async def disabled() -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            h = (await wapi.http.get(f"/api/webhooks/{hook['id']}", headers=bearer(proj.key))).json()[
                "webhook"
            ]
            if not h["enabled"]:
                return dict(h)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)

    h = await disabled()
    assert f"after {retries + 1} failed attempts" in h["disabledReason"] and "HTTP 500" in h["disabledReason"]
    first, second = sorted(await deliveries(wapi, proj, hook["id"]), key=lambda d: int(d["id"]))
    assert first["status"] == "failed" and first["attempts"] == retries + 1 and first["responseStatus"] == 500
    assert len(first["responseBody"]) == 1024  # truncated in the log
    assert second["status"] == "pending" and second["attempts"] == 0  # never overtook the first
    assert len(receiver.requests) == retries + 1
    log = (await wapi.http.get(f"/api/projects/{proj.id}/log", headers=bearer(proj.key))).json()["entries"]
    assert log[0]["source"] == "webhooks" and log[0]["level"] == "error" and hook["id"] in log[0]["message"]
    assert log[0]["details"]["webhookId"] == hook["id"]

    # Fixed and re-enabled: the queue resumes in order; the failed one comes back on request.
    receiver.status = 200
    r = await wapi.http.patch(f"/api/webhooks/{hook['id']}", json={"enabled": True}, headers=bearer(proj.key))
    assert r.json()["webhook"]["disabledReason"] is None
    await receiver.wait(lambda: len(receiver.bodies()) >= 1)
    r = await wapi.http.post(
        f"/api/webhooks/{hook['id']}/deliveries/{first['id']}/redeliver", headers=bearer(proj.key)
    )
    assert r.status_code == 202, r.text
    again = r.json()["delivery"]
    assert again["redeliveryOf"] == first["id"] and again["messageId"] == first["messageId"]
    await receiver.wait(lambda: len(receiver.bodies()) >= 2)
    assert [b["data"]["new"]["customer_id"] for b in receiver.bodies()] == [2, 1]
    ok = [r for r in receiver.requests if r["status"] == 200]
    assert ok[1]["headers"]["webhook-id"] == first["messageId"]
    assert_error(
        await wapi.http.post(
            f"/api/webhooks/{hook['id']}/deliveries/999999999/redeliver", headers=bearer(proj.key)
        ),
        404,
        "NOT_FOUND",
    )


async def test_redirects_are_not_followed_and_slow_receivers_time_out(
    wapi: Api, proj: Proj, receiver: Receiver
) -> None:
    receiver.redirect = "/elsewhere"
    hook = await create_hook(wapi, proj, receiver.url)
    r = await wapi.http.post(f"/api/webhooks/{hook['id']}/test", headers=bearer(proj.key))
    d = r.json()["delivery"]
    assert (
        d["status"] == "failed" and d["responseStatus"] == 302 and "redirects are not followed" in d["error"]
    )
    assert [q["path"] for q in receiver.requests] == ["/hook"]
    receiver.redirect = None
    receiver.delay = 3.5  # longer than FLUXBASE_WEBHOOKS_TIMEOUT_S
    d = (await wapi.http.post(f"/api/webhooks/{hook['id']}/test", headers=bearer(proj.key))).json()[
        "delivery"
    ]
    assert d["status"] == "failed" and d["responseStatus"] is None and "timed out" in d["error"]


async def test_test_ping_is_signed_and_logged(wapi: Api, proj: Proj, receiver: Receiver) -> None:
    hook = await create_hook(wapi, proj, receiver.url)
    r = await wapi.http.post(f"/api/webhooks/{hook['id']}/test", headers=bearer(proj.key))
    assert r.status_code == 200, r.text
    d = r.json()["delivery"]
    assert d["eventType"] == "ping" and d["status"] == "delivered" and d["responseStatus"] == 200
    assert d["responseBody"] == "OK"
    req = receiver.requests[0]
    assert (
        standardwebhooks.Webhook(hook["secret"]).verify(req["body"], req["headers"])["event_type"] == "ping"
    )
    assert [x["id"] for x in await deliveries(wapi, proj, hook["id"])] == [d["id"]]
    # Nobody listening: the ping reports the failure at once.
    dead = await create_hook(wapi, proj, f"http://127.0.0.1:{free_port()}/hook")
    d = (await wapi.http.post(f"/api/webhooks/{dead['id']}/test", headers=bearer(proj.key))).json()[
        "delivery"
    ]
    assert d["status"] == "failed" and d["error"].startswith("could not connect to 127.0.0.1:")


async def test_two_workers_never_double_send(wapi: Api, proj: Proj, receiver: Receiver) -> None:
    hooks = [
        await create_hook(wapi, proj, receiver.url.replace("/hook", f"/h{i}"), events=["row.inserted"])
        for i in range(4)
    ]
    n = 300
    await sql(wapi, proj, f"INSERT INTO orders (customer_id) SELECT g FROM generate_series(1, {n // 3}) g")
    await asyncio.gather(
        *(
            sql(wapi, proj, "INSERT INTO orders (customer_id) VALUES ($1)", [n // 3 + i + 1])
            for i in range(n - n // 3)
        )
    )
    await receiver.wait(lambda: len(receiver.requests) >= 4 * n, timeout=60)
    await asyncio.sleep(1.0)  # anything sent twice would show up by now
    for i, hook in enumerate(hooks):
        got = [r for r in receiver.requests if r["path"] == f"/h{i}"]
        ids = [r["headers"]["webhook-id"] for r in got]
        assert len(set(ids)) == n
        # Each event was queued once per endpoint, and sent once: a second request for a message
        # is only allowed where the log shows a failed first attempt (a timeout under load).
        ds = await deliveries(wapi, proj, hook["id"], limit=500)
        assert len(ds) == n and all(d["status"] == "delivered" for d in ds)
        retried = {d["messageId"] for d in ds if d["attempts"] > 1}
        assert not {m for m in ids if ids.count(m) > 1} - retried
        # In outbox order (commit-safe (xid, id)) per endpoint: msg_<xid>_<id>.
        first = list(dict.fromkeys(ids))
        order = [tuple(int(x) for x in m.split("_")[1:]) for m in first]
        assert order == sorted(order)


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_reference_webhook_handler_verifies_deliveries(wapi: Api, proj: Proj, tmp_path: Path) -> None:
    """The doc's webhook-handler.js, unchanged, behind a plain Node HTTP server."""
    js = ROOT / "tests" / "js"
    (tmp_path / "package.json").write_text('{"type": "module"}')
    shutil.copy(js / "webhook-handler.js", tmp_path / "webhook-handler.js")
    shutil.copy(js / "webhook-server.mjs", tmp_path / "webhook-server.mjs")
    port = free_port()
    right = await create_hook(wapi, proj, f"http://127.0.0.1:{port}/api/webhook", events=["row.inserted"])
    wrong = await create_hook(
        wapi,
        proj,
        f"http://127.0.0.1:{port}/api/webhook",
        events=["row.inserted"],
        secret="not-the-secret-in-env",
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PORT": str(port),
        "FLUXBASE_WEBHOOK_SECRET": right["secret"],
    }
    node = await asyncio.create_subprocess_exec(
        "node", "webhook-server.mjs", cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert node.stdout is not None
        line = await asyncio.wait_for(node.stdout.readline(), 30)
        assert line.strip() == b"listening", line
        await sql(wapi, proj, "INSERT INTO orders (customer_id, amount, status) VALUES (7, 59.99, 'pending')")
        ok = await wait_deliveries(wapi, proj, right["id"], lambda ds: bool(ds) and ds[0]["attempts"] >= 1)
        assert (
            ok[0]["status"] == "delivered"
            and ok[0]["responseStatus"] == 200
            and ok[0]["responseBody"] == "OK"
        )
        bad = await wait_deliveries(wapi, proj, wrong["id"], lambda ds: bool(ds) and ds[0]["attempts"] >= 1)
        assert bad[0]["responseStatus"] == 401 and bad[0]["responseBody"] == "Unauthorized"
    finally:
        node.terminate()
        await node.wait()


async def test_worker_inside_the_api_for_one_node_setups(spawn, receiver: Receiver) -> None:
    """FLUXBASE_RUN_WORKER_IN_API=true: no `fluxbase worker` process, deliveries still flow."""
    async with spawn(FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true", FLUXBASE_RUN_WORKER_IN_API="true") as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin")
            p = Proj(pid, token, key)
            await sql(api, p, "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int)")
            await create_hook(api, p, receiver.url, events=["row.inserted"])
            await sql(api, p, "INSERT INTO orders (customer_id) VALUES (42)")
            await receiver.wait(lambda: len(receiver.bodies()) >= 1)
            assert receiver.bodies()[0]["data"]["new"] == {"id": 1, "customer_id": 42}
        finally:
            await api.close()


async def test_tenant_advisory_lock_does_not_stall_deliveries(
    wapi: Api, proj: Proj, receiver: Receiver
) -> None:
    """Sending used to take advisory key (72431902, hashtext(webhook id)), which any tenant may hold."""
    hook = await create_hook(wapi, proj, receiver.url)
    hold_s = 10
    holder = asyncio.create_task(
        wapi.sql(
            proj.key,
            proj.id,
            f"SELECT pg_advisory_xact_lock(72431902, hashtext('{hook['id']}')), pg_sleep({hold_s})",
        )
    )
    started = time.monotonic()
    try:
        await asyncio.sleep(0.5)  # the holder's statement is running
        await sql(wapi, proj, "INSERT INTO orders (customer_id, amount, status) VALUES (1, 2, 'x')")
        await receiver.wait(lambda: len(receiver.bodies()) >= 1, timeout=hold_s - 2)
        assert time.monotonic() - started < hold_s, "delivered only after the tenant let go"
    finally:
        done = await holder
    assert done.json()["success"], done.text


async def test_one_projects_open_write_does_not_delay_other_projects_webhooks(
    wapi: Api, proj: Proj, receiver: Receiver
) -> None:
    """Per-project horizons (sql/0035): project A's open transaction holds back A's later events
    only; project B's webhook goes out meanwhile, and A's two arrive afterwards in order."""
    other_pid = await wapi.new_project(proj.token, "bystander")
    other_key = await wapi.new_key(proj.token, other_pid, "admin", rateLimitRequests=1_000_000)
    other = Proj(other_pid, proj.token, other_key)
    await sql(wapi, other, "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int)")
    base = f"http://127.0.0.1:{receiver.port}"
    await create_hook(wapi, proj, f"{base}/a", events=["row.inserted"])
    await create_hook(wapi, other, f"{base}/b", events=["row.inserted"])
    hold_s = 8
    holder = asyncio.create_task(
        wapi.sql(
            proj.key,
            proj.id,
            "WITH x AS (INSERT INTO orders (customer_id) VALUES (1) RETURNING id) "
            f"SELECT pg_sleep({hold_s}) FROM x",
        )
    )
    started = time.monotonic()
    try:
        await asyncio.sleep(0.7)  # the holder's transaction has its xid
        await sql(wapi, proj, "INSERT INTO orders (customer_id) VALUES (2)")
        await sql(wapi, other, "INSERT INTO orders (customer_id) VALUES (3)")
        await receiver.wait(lambda: len(receiver.bodies("/b")) >= 1, timeout=hold_s - 3)
        assert time.monotonic() - started < hold_s - 2, "delivered only after the other project let go"
        assert receiver.bodies("/a") == []  # A's committed second insert waits for its first
    finally:
        done = await holder
    assert done.json()["success"], done.text
    await receiver.wait(lambda: len(receiver.bodies("/a")) >= 2)
    assert [b["data"]["new"]["customer_id"] for b in receiver.bodies("/a")] == [1, 2]
