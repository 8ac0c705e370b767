"""Features served for a project placed on a registered database cluster (issue 19): the
cluster's outbox housekeeping, export/import, named migrations, realtime row filters — through
the real API, with two real PostgreSQL servers (the fixtures of test_clusters.py: a second
embedded server, an instance of its own, a management key)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from fluxbase.config import load_settings
from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import free_port
from fluxbase.services.clusters import ClusterPools
from fluxbase.worker import housekeeping
from support import Api, Stack, assert_error, bearer, random_ip, run_service
from test_clusters import _register, _url, inst, mgmt, own_tmp, pg2, pg2_db  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
async def placed(
    inst: dict[str, Any],  # noqa: F811
    mgmt: dict[str, str],  # noqa: F811
    pg2: EmbeddedPostgres,  # noqa: F811
    pg2_db: str,  # noqa: F811
) -> dict[str, Any]:
    """Cluster two registered, a user with one project placed there (the instance admin's
    explicit choice) and that project's admin key, a table with a row."""
    r = await _register(inst, mgmt, _url(pg2, pg2_db))
    assert r.status_code == 201, r.text
    cid = r.json()["cluster"]["id"]
    api: Api = inst["api"]
    admin = bearer(inst["admin"])
    r = await api.http.post("/api/projects", json={"name": "on two", "clusterId": cid}, headers=admin)
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], pid, "admin", rateLimitRequests=100_000)
    r = await api.sql(key, pid, "CREATE TABLE items (id serial PRIMARY KEY, name text)")
    assert r.json()["success"], r.text
    return {"cid": cid, "pid": pid, "key": key}


@pytest.fixture
async def control(stack: Stack, inst: dict[str, Any]) -> AsyncIterator[asyncpg.Pool]:  # noqa: F811
    pool = await asyncpg.create_pool(stack.database_url(inst["dbname"]), min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def there(pg2: EmbeddedPostgres, pg2_db: str) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    """A superuser's connection to cluster two, to look at what the API did there."""
    conn = await asyncpg.connect(_url(pg2, pg2_db))
    yield conn
    await conn.close()


async def test_housekeeping_trims_the_outbox_of_every_cluster(
    inst: dict[str, Any],  # noqa: F811
    placed: dict[str, Any],
    control: asyncpg.Pool,
    there: asyncpg.Connection,
) -> None:
    """Cluster two's outbox (its projects' realtime events) and reader rows are trimmed by the
    worker's housekeeping, not only the control plane's: before, they grew without bound."""
    api: Api = inst["api"]
    pid, key = placed["pid"], placed["key"]
    for i in range(5):
        r = await api.sql(key, pid, "INSERT INTO items (name) VALUES ($1)", [f"row {i}"])
        assert r.json()["success"], r.text
    assert await there.fetchval("SELECT count(*) FROM fluxbase.events WHERE project_id = $1", pid) >= 5
    await there.execute(
        """INSERT INTO fluxbase.event_readers (reader_id, seen_at)
           VALUES ('stale-reader', now() - interval '1 hour')"""
    )
    # No event may be older than a second: every one of cluster two's finished events goes.
    settings = load_settings(dict(inst["env"], FLUXBASE_EVENTS_RETENTION_SECONDS="0"))
    pools = ClusterPools(settings, control)
    try:
        counts = await housekeeping(control, settings, cluster_pools=pools)
    finally:
        await pools.close()
    assert counts[f"events.{placed['cid']}"] >= 5, counts
    assert await there.fetchval("SELECT count(*) FROM fluxbase.events WHERE project_id = $1", pid) == 0
    # The retention mark moved first, so a `since` before it answers resync_required, not a gap.
    assert await there.fetchval("SELECT trimmed_to_xid::text::bigint FROM fluxbase.event_retention") > 0
    assert (
        await there.fetchval("SELECT count(*) FROM fluxbase.event_readers WHERE reader_id = 'stale-reader'")
        == 0
    )


async def test_housekeeping_keeps_what_the_clusters_webhook_dispatcher_has_not_read(
    inst: dict[str, Any],  # noqa: F811
    placed: dict[str, Any],
    control: asyncpg.Pool,
    there: asyncpg.Connection,
) -> None:
    """A registered cluster's own fluxbase.webhooks is empty (endpoints live in the control
    plane), so trimming there must ask the control plane whether its dispatcher still needs the
    events: while one of its projects has an enabled endpoint, nothing past the cursor goes."""
    api: Api = inst["api"]
    pid, key = placed["pid"], placed["key"]
    r = await api.http.post(
        "/api/webhooks",
        json={"projectId": pid, "url": "http://127.0.0.1:9/hook", "events": ["row.inserted"]},
        headers=bearer(key),
    )
    assert r.status_code == 201, r.text
    hook_id = r.json()["webhook"]["id"]
    # A dispatcher that is behind: its cursor at the start and held there.
    await there.execute(
        """CREATE FUNCTION public.hold_cursor() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RETURN NULL; END $$;
           UPDATE fluxbase.webhook_dispatch SET last_xid = '0'::xid8, last_id = 0;
           CREATE TRIGGER hold BEFORE UPDATE ON fluxbase.webhook_dispatch
           FOR EACH ROW EXECUTE FUNCTION public.hold_cursor()"""
    )
    settings = load_settings(dict(inst["env"], FLUXBASE_EVENTS_RETENTION_SECONDS="0"))
    pools = ClusterPools(settings, control)
    try:
        r = await api.sql(key, pid, "INSERT INTO items (name) VALUES ('for the hook')")
        assert r.json()["success"], r.text
        counts = await housekeeping(control, settings, cluster_pools=pools)
        assert counts[f"events.{placed['cid']}"] == 0, counts
        assert await there.fetchval("SELECT count(*) FROM fluxbase.events WHERE project_id = $1", pid) >= 1
        # Without an enabled endpoint the same events go.
        r = await api.http.delete(f"/api/webhooks/{hook_id}", headers=bearer(key))
        assert r.status_code == 200, r.text
        counts = await housekeeping(control, settings, cluster_pools=pools)
        assert counts[f"events.{placed['cid']}"] >= 1, counts
        assert await there.fetchval("SELECT count(*) FROM fluxbase.events WHERE project_id = $1", pid) == 0
    finally:
        await pools.close()
        await there.execute(
            "DROP TRIGGER hold ON fluxbase.webhook_dispatch; DROP FUNCTION public.hold_cursor()"
        )


async def test_named_migrations_on_a_cluster(
    inst: dict[str, Any],  # noqa: F811
    placed: dict[str, Any],
    control: asyncpg.Pool,
    there: asyncpg.Connection,
) -> None:
    """The ticket and the ledger live on the project's cluster, where the migration's transaction
    redeems the ticket (before: the ticket was stored in the control plane, which the cluster's
    fluxbase_guard.redeem_migration cannot see, and every push failed)."""
    http = inst["api"].http
    pid, key = placed["pid"], placed["key"]
    body = {"name": "001_tags", "sql": "CREATE TABLE tags (id int PRIMARY KEY, label text)"}
    r = await http.post(f"/api/projects/{pid}/migrations", json=body, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.json()["applied"] is True and r.json()["migration"]["name"] == "001_tags"
    r = await http.post(f"/api/projects/{pid}/migrations", json=body, headers=bearer(key))
    assert r.status_code == 200 and r.json()["applied"] is False, r.text
    changed = {"name": "001_tags", "sql": "CREATE TABLE tags (id bigint)"}
    r = await http.post(f"/api/projects/{pid}/migrations", json=changed, headers=bearer(key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "MIGRATION_CHECKSUM_MISMATCH", r.text
    # A failing migration leaves neither its changes nor a ledger row.
    bad = {"name": "002_bad", "sql": "CREATE TABLE half (id int); SELECT * FROM no_such_table"}
    r = await http.post(f"/api/projects/{pid}/migrations", json=bad, headers=bearer(key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "MIGRATION_FAILED", r.text
    r = await http.get(f"/api/projects/{pid}/migrations", headers=bearer(key))
    assert r.status_code == 200, r.text
    assert [m["name"] for m in r.json()["migrations"]] == ["001_tags"]
    assert await there.fetchval("SELECT to_regclass($1)", f"p_{pid}.tags") is not None
    assert await there.fetchval("SELECT to_regclass($1)", f"p_{pid}.half") is None
    assert (
        await there.fetchval("SELECT count(*) FROM fluxbase.project_migrations WHERE project_id = $1", pid)
        == 1
    )
    assert await there.fetchval("SELECT count(*) FROM fluxbase.migration_tickets") == 0
    assert (
        await control.fetchval("SELECT count(*) FROM fluxbase.project_migrations WHERE project_id = $1", pid)
        == 0
    )


async def test_export_and_import_on_a_cluster(
    inst: dict[str, Any],  # noqa: F811
    placed: dict[str, Any],
    control: asyncpg.Pool,
    pg2: EmbeddedPostgres,  # noqa: F811
    there: asyncpg.Connection,
) -> None:
    """Export dumps the project from its cluster's server (before: pg_dump was pointed at the
    control plane's, where the schema is not, and the export failed); an import is placed like
    any new project and loaded, with its ledger, on the cluster it lands on."""
    api: Api = inst["api"]
    http = api.http
    admin = bearer(inst["admin"])
    pid, key, cid = placed["pid"], placed["key"], placed["cid"]
    r = await api.sql(key, pid, "INSERT INTO items (name) VALUES ('exported from two')")
    assert r.json()["success"], r.text
    r = await http.post(
        f"/api/projects/{pid}/migrations",
        json={"name": "010_exported", "sql": "CREATE TABLE moved (id int)"},
        headers=bearer(key),
    )
    assert r.status_code == 200, r.text
    r = await http.get(f"/api/projects/{pid}/export", headers=admin)
    assert r.status_code == 200, r.text
    dump = r.content
    assert dump.startswith(f"-- fluxbase-export format=1 schema=p_{pid}".encode())
    assert b"exported from two" in dump and b"-- fluxbase-export-end sha256=" in dump
    assert b"010_exported" in dump  # the ledger, read from the cluster

    # Placement sends the import to cluster two once the default one holds more projects (a
    # cluster a management key registered is closed to placement until the admin opens it).
    r = await http.patch(f"/api/admin/clusters/{cid}", json={"placement": "open"}, headers=admin)
    assert r.status_code == 200, r.text
    while True:
        counts = dict(await control.fetch("SELECT cluster_id, count(*) FROM fluxbase.projects GROUP BY 1"))
        if counts.get("default", 0) > counts.get(cid, 0):
            break
        r = await http.post("/api/projects", json={"name": "filler", "clusterId": "default"}, headers=admin)
        assert r.status_code == 201, r.text
    r = await http.post(
        "/api/projects/import?name=copy", content=dump, headers={**admin, "Content-Type": "application/sql"}
    )
    assert r.status_code == 201, r.text
    new = r.json()["project"]["id"]
    assert await control.fetchval("SELECT cluster_id FROM fluxbase.projects WHERE id = $1", new) == cid
    new_key = await api.new_key(inst["admin"], new, "admin")
    r = await api.sql(new_key, new, "SELECT name, inet_server_port() AS port FROM items ORDER BY id")
    assert r.json()["success"], r.text
    rows = r.json()["result"]["rows"]
    assert "exported from two" in [row["name"] for row in rows] and rows[0]["port"] == pg2.port
    r = await http.get(f"/api/projects/{new}/migrations", headers=bearer(new_key))
    assert "010_exported" in [m["name"] for m in r.json()["migrations"]], r.text
    assert await there.fetchval("SELECT to_regclass($1)", f"p_{new}.moved") is not None


async def _next(ws: Any, types: tuple[str, ...]) -> dict[str, Any]:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg["type"] in types:
            return dict(msg)


async def test_realtime_row_filters_on_a_cluster(
    inst: dict[str, Any],  # noqa: F811
    placed: dict[str, Any],
    log_dir: Path,
) -> None:
    """A row filter's column is looked up in the catalog of the project's cluster (before: in the
    control plane's, where the table is not, so every filter answered "unknown column"), as the
    subscriber's role, which exists there; and the filter narrows the cluster's events."""
    api: Api = inst["api"]
    pid, key = placed["pid"], placed["key"]
    r = await api.sql(key, pid, "CREATE TABLE scores (id serial PRIMARY KEY, who text, n int)")
    assert r.json()["success"], r.text
    read_key = await api.new_key(inst["admin"], pid, "read")
    rt_port = free_port()
    rt_env = dict(inst["env"], FLUXBASE_REALTIME_PORT=str(rt_port))
    room = f"project_{pid}"
    with run_service(["realtime"], rt_env, rt_port, log_dir):
        ws_url = f"ws://127.0.0.1:{rt_port}/?token="
        async with connect(ws_url + key) as ws, connect(ws_url + read_key) as ws_read:
            for bad in (
                {"column": "nope", "op": "eq", "value": 1},
                {"column": "n", "op": "eq", "value": "x"},
            ):
                await ws.send(json.dumps({"type": "subscribe", "roomId": room, "filters": {"scores": bad}}))
                msg = await _next(ws, ("error", "subscribed"))
                assert msg["type"] == "error" and msg["error"]["code"] == "VALIDATION_ERROR", msg
            # A read key's filter is checked as its own role, which exists on cluster two only.
            await ws_read.send(
                json.dumps(
                    {
                        "type": "subscribe",
                        "roomId": room,
                        "filters": {"scores": {"column": "who", "op": "eq", "value": "high"}},
                    }
                )
            )
            msg = await _next(ws_read, ("error", "subscribed"))
            assert msg["type"] == "subscribed", msg
            good = {"scores": {"column": "n", "op": "gt", "value": 5}}
            await ws.send(
                json.dumps({"type": "subscribe", "roomId": room, "tables": ["scores"], "filters": good})
            )
            msg = await _next(ws, ("error", "subscribed"))
            assert msg["type"] == "subscribed", msg
            r = await api.sql(key, pid, "INSERT INTO scores (who, n) VALUES ('low', 1), ('high', 9)")
            assert r.json()["success"], r.text
            for sock in (ws, ws_read):
                event = await _next(sock, ("db_event",))
                assert event["payload"]["record"]["who"] == "high", event
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_next(ws, ("db_event",)), 1.0)


async def _end_user(api: Api, pid: str, email: str) -> dict[str, Any]:
    auth = f"/api/projects/{pid}/auth"
    r = await api.http.post(f"{auth}/register", json={"email": email, "password": "correct horse battery"})
    assert r.status_code == 201, r.text
    user = r.json()["user"]
    r = await api.http.post(
        f"{auth}/login",
        json={"email": email, "password": "correct horse battery"},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 200, r.text
    return {"id": user["id"], **r.json()}


async def test_end_user_tokens_on_a_cluster(
    inst: dict[str, Any],  # noqa: F811
    placed: dict[str, Any],
) -> None:
    """A project user's token is honoured on a registered cluster (before: the in-transaction
    check read the cluster's empty session tables and refused every token), and the session is
    still checked on every request: logout and disabling stop the next one; a forged or another
    project's token never becomes an identity."""
    api: Api = inst["api"]
    http = api.http
    pid, key = placed["pid"], placed["key"]
    for stmt in (
        "CREATE TABLE notes (id serial PRIMARY KEY, owner text DEFAULT auth.uid(), body text)",
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON notes USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())",
    ):
        r = await api.sql(key, pid, stmt)
        assert r.json()["success"], (stmt, r.text)
    rw = await api.new_key(inst["admin"], pid, "readwrite", rateLimitRequests=100_000)
    ann = await _end_user(api, pid, "ann@example.com")
    bob = await _end_user(api, pid, "bob@example.com")

    async def as_user(token: str, query: str) -> Any:
        return await http.post(
            "/api/execute-sql",
            json={"projectId": pid, "query": query},
            headers={**bearer(rw), "X-Fluxbase-User-Token": token},
        )

    for who in (ann, bob):
        r = await as_user(who["accessToken"], f"INSERT INTO notes (body) VALUES ('{who['id']}')")
        assert r.status_code == 200 and r.json()["success"], r.text
    r = await as_user(ann["accessToken"], "SELECT auth.uid() AS uid, body FROM notes")
    assert r.status_code == 200, r.text
    assert r.json()["result"]["rows"] == [{"uid": ann["id"], "body": ann["id"]}]

    # A token with a changed signature, or one of a project on the default cluster, is refused.
    head, payload, sig = ann["accessToken"].split(".")
    forged = f"{head}.{payload}.{sig[:-4]}{'AAAA' if not sig.endswith('AAAA') else 'BBBB'}"
    assert_error(await as_user(forged, "SELECT 1"), 401, "INVALID_USER_TOKEN")
    r = await http.post(
        "/api/projects", json={"name": "elsewhere", "clusterId": "default"}, headers=bearer(inst["admin"])
    )
    other = r.json()["project"]["id"]
    stranger = await _end_user(api, other, "ann@example.com")
    assert_error(await as_user(stranger["accessToken"], "SELECT 1"), 401, "INVALID_USER_TOKEN")

    # Disabling the user stops the next request; enabling lets it through again.
    auth, admin = f"/api/projects/{pid}/auth", bearer(key)
    r = await http.post(f"{auth}/users/{bob['id']}/disable", headers=admin)
    assert r.status_code == 200, r.text
    assert_error(await as_user(bob["accessToken"], "SELECT 1"), 401, "USER_DISABLED")
    r = await http.post(f"{auth}/users/{bob['id']}/enable", headers=admin)
    assert (await as_user(bob["accessToken"], "SELECT 1")).status_code == 200
    # Logout (a revoked session) stops the very next request.
    r = await http.post(f"{auth}/logout", headers=bearer(ann["accessToken"]))
    assert r.status_code == 200, r.text
    assert_error(await as_user(ann["accessToken"], "SELECT 1"), 401, "INVALID_USER_TOKEN")
    assert (await as_user(bob["accessToken"], "SELECT body FROM notes")).json()["result"]["rows"] == [
        {"body": bob["id"]}
    ]
