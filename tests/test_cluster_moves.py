"""Moving a project between database clusters (issue 19): POST /api/admin/projects/{id}/move,
through the real API and realtime service, with two real PostgreSQL servers. A failing target
leaves the project on its source, writable, with nothing left on the target; a move copies rows,
RLS policies and grants, refuses writes while it copies (PROJECT_MOVING), keeps the keys working
and tells realtime subscribers to resync."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from websockets.asyncio.client import connect

from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import free_port
from support import Api, Stack, assert_error, bearer, run_service
from test_attack_review1 import end_user
from test_clusters import own_tmp, pg2  # noqa: F401  (module fixtures: a second PostgreSQL server)


def _url(pg: EmbeddedPostgres, db: str) -> str:
    return f"postgresql://postgres:{quote(pg.password, safe='')}@127.0.0.1:{pg.port}/{db}"


@pytest.fixture(scope="module")
async def inst(stack: Stack, log_dir: Path, pg2: EmbeddedPostgres) -> AsyncIterator[dict[str, Any]]:  # noqa: F811
    """An instance of its own with cluster two registered (by the admin's session: open), a
    project on the default cluster and its realtime service."""
    dbname = await stack.create_database()
    owner = await asyncpg.connect(pg2.url)
    try:
        await owner.execute("CREATE DATABASE move_two")
    finally:
        await owner.close()
    port = free_port()
    env = stack.env(dbname, FLUXBASE_API_PORT=str(port))
    try:
        with run_service(["api"], env, port, log_dir) as server:
            api = Api(server.url)
            admin = await api.register(email="mover@example.com")
            token = await api.login(admin["email"], admin["password"])
            r = await api.http.post(
                "/api/admin/clusters",
                json={"label": "two", "connectionString": _url(pg2, "move_two")},
                headers=bearer(token),
            )
            assert r.status_code == 201 and r.json()["cluster"]["placement"] == "open", r.text
            cid = r.json()["cluster"]["id"]
            r = await api.http.post(
                "/api/admin/management-keys", json={"name": "automation"}, headers=bearer(token)
            )
            mgmt = r.json()["key"]
            _user, user_token = await api.new_user()
            r = await api.http.post(
                "/api/projects", json={"name": "mover", "clusterId": "default"}, headers=bearer(token)
            )
            assert r.status_code == 201, r.text
            pid = r.json()["project"]["id"]
            rt_port = free_port()
            with run_service(["realtime"], dict(env, FLUXBASE_REALTIME_PORT=str(rt_port)), rt_port, log_dir):
                try:
                    yield {
                        "api": api,
                        "admin": token,
                        "mgmt": mgmt,
                        "cid": cid,
                        "pid": pid,
                        "user_token": user_token,
                        "control_url": stack.database_url(dbname),
                        "two_url": _url(pg2, "move_two"),
                        "rt": f"ws://127.0.0.1:{rt_port}/?token=",
                    }
                finally:
                    await api.close()
    finally:
        await stack.drop_database(dbname)


SETUP = [
    "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)",
    "INSERT INTO notes (body) VALUES ('public one'), ('private two'), ('public three')",
    "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY readers_see_public ON notes FOR SELECT USING (body LIKE 'public%')",
    "CREATE POLICY writers_all ON notes FOR ALL TO {rw} USING (true) WITH CHECK (true)",
]


async def _where(url: str, pid: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT cluster_id, moving_to, read_only FROM fluxbase.projects WHERE id = $1", pid
        )
        return dict(row) if row else {}
    finally:
        await conn.close()


async def _schema_on(url: str, pid: str) -> tuple[bool, int]:
    conn = await asyncpg.connect(url)
    try:
        schema = await conn.fetchval("SELECT to_regnamespace($1)", f"p_{pid}") is not None
        roles = await conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%")
        return schema, int(roles)
    finally:
        await conn.close()


async def test_a_move_is_refused_to_the_wrong_callers_and_targets(inst: dict[str, Any]) -> None:
    api: Api = inst["api"]
    http = api.http
    pid, cid = inst["pid"], inst["cid"]
    path = f"/api/admin/projects/{pid}/move"
    assert_error(await http.post(path, json={"clusterId": cid}), 401, "AUTH_REQUIRED")
    r = await http.post(path, json={"clusterId": cid}, headers=bearer(inst["user_token"]))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    project_key = await api.new_key(inst["admin"], pid, "admin")
    r = await http.post(path, json={"clusterId": cid}, headers=bearer(project_key))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    admin = bearer(inst["admin"])
    assert_error(
        await http.post(path, json={"clusterId": "cl_nope"}, headers=admin), 404, "CLUSTER_NOT_FOUND"
    )
    assert_error(await http.post(path, json={"clusterId": "default"}, headers=admin), 409, "CONFLICT")
    r = await http.post("/api/admin/projects/p_nope/move", json={"clusterId": cid}, headers=admin)
    assert_error(r, 404, "PROJECT_NOT_FOUND")
    # A management key moves projects only to clusters open to placement (review 7's hole).
    r = await http.patch(f"/api/admin/clusters/{cid}", json={"placement": "closed"}, headers=admin)
    assert r.status_code == 200, r.text
    try:
        r = await http.post(path, json={"clusterId": cid}, headers=bearer(inst["mgmt"]))
        assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    finally:
        r = await http.patch(f"/api/admin/clusters/{cid}", json={"placement": "open"}, headers=admin)
        assert r.status_code == 200, r.text
    assert (await _where(inst["control_url"], pid))["cluster_id"] == "default"


async def test_a_failing_target_leaves_the_project_on_its_source(inst: dict[str, Any]) -> None:
    api: Api = inst["api"]
    pid, cid = inst["pid"], inst["cid"]
    key = inst["key"] = await api.new_key(inst["admin"], pid, "admin", rateLimitRequests=100_000)
    rw = f"p_{pid}_rw"
    for q in SETUP:
        r = await api.sql(key, pid, q.format(rw=rw))
        assert r.json()["success"], (q, r.text)
    # The target refuses the copy half-way: its owner's event trigger fails the table's creation
    # (after the schema and roles were provisioned there).
    two = await asyncpg.connect(inst["two_url"])
    try:
        await two.execute(
            """CREATE FUNCTION public.refuse_notes() RETURNS event_trigger LANGUAGE plpgsql AS $$
               BEGIN IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()
                                WHERE object_identity LIKE '%.notes') THEN
                 RAISE EXCEPTION 'the target refuses'; END IF; END $$"""
        )
        await two.execute(
            "CREATE EVENT TRIGGER refuse_notes ON ddl_command_end EXECUTE FUNCTION public.refuse_notes()"
        )
        r = await api.http.post(
            f"/api/admin/projects/{pid}/move", json={"clusterId": cid}, headers=bearer(inst["admin"])
        )
        assert_error(r, 502, "PROJECT_MOVE_FAILED")
    finally:
        await two.execute("DROP EVENT TRIGGER IF EXISTS refuse_notes")
        await two.close()
    assert await _where(inst["control_url"], pid) == {
        "cluster_id": "default",
        "moving_to": None,
        "read_only": False,
    }
    assert await _schema_on(inst["two_url"], pid) == (False, 0)  # the partial copy is gone
    r = await api.sql(key, pid, "INSERT INTO notes (body) VALUES ('public four') RETURNING id")
    assert r.json()["success"], r.text  # writable on the source
    r = await api.sql(key, pid, "SELECT count(*)::int AS n, inet_server_port() AS port FROM notes")
    assert r.json()["result"]["rows"][0]["n"] == 4


async def test_a_move_copies_everything_and_refuses_writes_meanwhile(
    inst: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    api: Api = inst["api"]
    http = api.http
    pid, cid, key = inst["pid"], inst["cid"], inst["key"]
    read_key = await api.new_key(inst["admin"], pid, "read")
    rw_key = await api.new_key(inst["admin"], pid, "readwrite")
    r = await api.sql(read_key, pid, "SELECT body FROM notes ORDER BY id")
    visible_before = [row["body"] for row in r.json()["result"]["rows"]]
    assert visible_before == ["public one", "public three", "public four"]
    # A named migration: its ledger row lives beside the data and moves with it.
    migration = {"name": "001_tags", "sql": "CREATE TABLE tags (id int PRIMARY KEY)"}
    r = await http.post(f"/api/projects/{pid}/migrations", json=migration, headers=bearer(key))
    assert r.status_code == 200 and r.json()["applied"] is True, r.text

    async with connect(inst["rt"] + key) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"

        # A write under way on the source (a superuser's lock standing for it) holds the copy at
        # its start, while the project is already read-only: writes get PROJECT_MOVING.
        control = await asyncpg.connect(inst["control_url"])
        tx = control.transaction()
        await tx.start()
        await control.execute(f'LOCK TABLE "p_{pid}".notes IN ROW EXCLUSIVE MODE')
        move = asyncio.create_task(
            http.post(
                f"/api/admin/projects/{pid}/move", json={"clusterId": cid}, headers=bearer(inst["mgmt"])
            )
        )
        try:
            for _ in range(200):
                if (await _where(inst["control_url"], pid)).get("moving_to") == cid:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the move never started")
            r = await api.sql(key, pid, "INSERT INTO notes (body) VALUES ('during the move')")
            assert_error(r, 409, "PROJECT_MOVING")
            r = await api.sql(rw_key, pid, "UPDATE notes SET body = 'x'")
            assert_error(r, 409, "PROJECT_MOVING")
            r = await api.sql(key, pid, "SELECT count(*)::int AS n FROM notes")
            assert r.json()["success"] and r.json()["result"]["rows"][0]["n"] == 4, r.text  # reads work
        finally:
            await tx.rollback()
            await control.close()
        r = await move
        assert r.status_code == 200, r.text
        assert r.json()["fromClusterId"] == "default" and r.json()["clusterId"] == cid

        # Realtime subscribers are told to resync, and then receive the new cluster's events.
        async def next_of(kind: str) -> dict[str, Any]:
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] == kind:
                    return msg

        resync = await next_of("resync_required")
        assert resync["roomId"] == f"project_{pid}"
        r = await api.sql(key, pid, "INSERT INTO notes (body) VALUES ('public after')")
        assert r.json()["success"], r.text  # writable again, with the same key
        event = await next_of("db_event")
        assert event["payload"]["record"]["body"] == "public after"

    assert await _where(inst["control_url"], pid) == {
        "cluster_id": cid,
        "moving_to": None,
        "read_only": False,
    }
    # The rows, the RLS policies and the grants came along; the data lives on cluster two only.
    r = await api.sql(key, pid, "SELECT inet_server_port() AS port, count(*)::int AS n FROM notes")
    assert r.json()["result"]["rows"][0] == {"port": pg2.port, "n": 5}, r.text
    r = await api.sql(read_key, pid, "SELECT body FROM notes ORDER BY id")
    assert [row["body"] for row in r.json()["result"]["rows"]] == [*visible_before, "public after"]
    r = await api.sql(
        rw_key, pid, "UPDATE notes SET body = body || '!' WHERE body = 'private two' RETURNING body"
    )
    assert r.json()["result"]["rows"] == [{"body": "private two!"}], r.text
    r = await api.sql(read_key, pid, "INSERT INTO notes (body) VALUES ('nope')")
    assert r.json()["success"] is False
    r = await api.sql(key, pid, "INSERT INTO notes (body) VALUES ('serial goes on') RETURNING id")
    assert r.json()["result"]["rows"][0]["id"] == 6, r.text  # the sequence came along
    assert await _schema_on(inst["control_url"], pid) == (False, 0)  # the source's copy is gone
    assert (await _schema_on(inst["two_url"], pid))[0] is True
    # The ledger came along: the migration is listed and not applied again; none is left behind.
    r = await http.get(f"/api/projects/{pid}/migrations", headers=bearer(key))
    assert [m["name"] for m in r.json()["migrations"]] == ["001_tags"], r.text
    r = await http.post(f"/api/projects/{pid}/migrations", json=migration, headers=bearer(key))
    assert r.status_code == 200 and r.json()["applied"] is False, r.text
    control = await asyncpg.connect(inst["control_url"])
    try:
        assert (
            await control.fetchval(
                "SELECT count(*) FROM fluxbase.project_migrations WHERE project_id = $1", pid
            )
            == 0
        )
    finally:
        await control.close()
    # The team and the keys are untouched: the owner still lists them.
    r = await http.get(f"/api/projects/{pid}/api-keys", headers=bearer(inst["admin"]))
    assert r.status_code == 200 and len(r.json()["apiKeys"]) == 4, r.text


async def test_a_move_back_to_the_default_cluster(
    inst: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    """From a registered cluster (pg_dump pointed at it, its export role made there) back to the
    control plane's server, by the admin's session."""
    api: Api = inst["api"]
    pid, key = inst["pid"], inst["key"]
    control = await asyncpg.connect(inst["control_url"])
    try:
        # Every transaction that starts from here has an xid at least this (ids are not ordered
        # across backends: each caches 64, sql/0050).
        before = await control.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        r = await api.http.post(
            f"/api/admin/projects/{pid}/move", json={"clusterId": "default"}, headers=bearer(inst["admin"])
        )
        assert r.status_code == 200, r.text
        assert r.json()["fromClusterId"] == inst["cid"]
        # The copied rows are no new rows: no row events (for subscribers and webhooks) on the
        # target's outbox.
        copied = await control.fetchval(
            "SELECT count(*) FROM fluxbase.events"
            " WHERE project_id = $1 AND kind = 'row' AND xid >= $2::text::xid8",
            pid,
            before,
        )
        assert copied == 0
    finally:
        await control.close()
    r = await api.sql(key, pid, "SELECT inet_server_port() AS port, count(*)::int AS n FROM notes")
    row = r.json()["result"]["rows"][0]
    assert row["port"] != pg2.port and row["n"] == 6, r.text
    assert await _schema_on(inst["two_url"], pid) == (False, 0)
    assert await _where(inst["control_url"], pid) == {
        "cluster_id": "default",
        "moving_to": None,
        "read_only": False,
    }
    r = await api.sql(key, pid, "INSERT INTO notes (body) VALUES ('home again') RETURNING id")
    assert r.json()["result"]["rows"][0]["id"] == 7, r.text
    control = await asyncpg.connect(inst["control_url"])
    try:  # realtime capture is attached again after the copy: new rows are events
        n = await control.fetchval(
            "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND record->>'body' = 'home again'",
            pid,
        )
        assert n == 1
    finally:
        await control.close()


async def test_a_move_whose_process_died_is_recovered(inst: dict[str, Any]) -> None:
    """A mark left behind by a move whose API process died (no one holds the project's move
    lock) keeps writes refused, and the next move recovers it first instead of answering
    PROJECT_MOVING for ever."""
    api: Api = inst["api"]
    pid, cid, key = inst["pid"], inst["cid"], inst["key"]
    control = await asyncpg.connect(inst["control_url"])
    try:
        await control.execute(
            """UPDATE fluxbase.projects SET moving_to = $2, read_only_before_move = read_only,
                      read_only = true WHERE id = $1""",
            pid,
            cid,
        )
    finally:
        await control.close()
    r = await api.sql(key, pid, "INSERT INTO notes (body) VALUES ('refused')")
    assert_error(r, 409, "PROJECT_MOVING")
    r = await api.http.post(
        f"/api/admin/projects/{pid}/move", json={"clusterId": cid}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 200, r.text
    assert await _where(inst["control_url"], pid) == {
        "cluster_id": cid,
        "moving_to": None,
        "read_only": False,
    }
    r = await api.sql(key, pid, "INSERT INTO notes (body) VALUES ('on two again') RETURNING id")
    assert r.json()["result"]["rows"][0]["id"] == 8, r.text


async def test_a_project_with_end_users_moves_to_a_registered_cluster(
    inst: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    """End users live in the control plane (accounts, sessions), so a move carries nothing of
    theirs; what changes is where their identity is checked (on a registered cluster: on the
    control plane before each request, services.identity). Before, the move answered 409. Now an
    end user signed in before the move keeps using their token after it, through execute-sql and
    the records API, under the table's RLS on the new cluster; a new end user signs up there;
    logout still stops the next request."""
    api: Api = inst["api"]
    http = api.http
    admin, cid = bearer(inst["admin"]), inst["cid"]
    r = await http.post("/api/projects", json={"name": "with users", "clusterId": "default"}, headers=admin)
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], pid, "admin", rateLimitRequests=100_000)
    for q in (
        "CREATE TABLE notes (id serial PRIMARY KEY, owner text NOT NULL DEFAULT auth.uid(), body text)",
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON notes USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())",
    ):
        r = await api.sql(key, pid, q)
        assert r.json()["success"], (q, r.text)
    rw = await api.new_key(inst["admin"], pid, "readwrite", rateLimitRequests=100_000)
    ann, ann_token = await end_user(api, pid)
    bob, bob_token = await end_user(api, pid)

    def as_user(token: str) -> dict[str, str]:
        return {**bearer(rw), "X-Fluxbase-User-Token": token}

    async def sql_as(token: str, query: str) -> Any:
        return await http.post(
            "/api/execute-sql", json={"projectId": pid, "query": query}, headers=as_user(token)
        )

    for token, body in ((ann_token, "ann before"), (bob_token, "bob before")):
        r = await sql_as(token, f"INSERT INTO notes (body) VALUES ('{body}')")
        assert r.status_code == 200 and r.json()["success"], r.text
    # Used before the move: whatever a process cached of the token and the project's cluster.
    r = await sql_as(ann_token, "SELECT auth.uid() AS uid, body FROM notes")
    assert r.json()["result"]["rows"] == [{"uid": ann, "body": "ann before"}], r.text

    r = await http.post(f"/api/admin/projects/{pid}/move", json={"clusterId": cid}, headers=admin)
    assert r.status_code == 200, r.text
    assert (await _where(inst["control_url"], pid))["cluster_id"] == cid

    # Ann's token from before the move: SQL runs on cluster two, as the project's role, with her
    # identity under RLS (her row only).
    r = await sql_as(ann_token, "SELECT auth.uid() AS uid, inet_server_port() AS port, body FROM notes")
    assert r.status_code == 200, r.text
    assert r.json()["result"]["rows"] == [{"uid": ann, "port": pg2.port, "body": "ann before"}]
    records = f"/api/projects/{pid}/tables/notes/records"
    r = await http.post(records, json={"body": "ann after"}, headers=as_user(ann_token))
    assert r.status_code == 201, r.text
    r = await http.get(records, headers=as_user(ann_token))
    assert r.status_code == 200, r.text
    assert sorted((x["owner"], x["body"]) for x in r.json()["records"]) == [
        (ann, "ann after"),
        (ann, "ann before"),
    ]
    # RLS refuses a row in someone else's name.
    r = await sql_as(ann_token, f"INSERT INTO notes (owner, body) VALUES ('{bob}', 'forged')")
    assert not r.json().get("success"), r.text
    r = await http.get(records, headers=as_user(bob_token))
    assert [x["body"] for x in r.json()["records"]] == ["bob before"], r.text

    # A new end user signs up after the move and works there.
    carl, carl_token = await end_user(api, pid)
    r = await http.post(records, json={"body": "carl"}, headers=as_user(carl_token))
    assert r.status_code == 201, r.text
    r = await sql_as(carl_token, "SELECT owner, body, inet_server_port() AS port FROM notes")
    assert r.json()["result"]["rows"] == [{"owner": carl, "body": "carl", "port": pg2.port}], r.text

    # The session is still checked on every request: logout stops Ann's next one.
    r = await http.post(f"/api/projects/{pid}/auth/logout", headers=bearer(ann_token))
    assert r.status_code == 200, r.text
    assert_error(await sql_as(ann_token, "SELECT 1"), 401, "INVALID_USER_TOKEN")
    assert (await sql_as(bob_token, "SELECT 1")).status_code == 200
    # Nothing of the project is left on the control plane's server.
    assert await _schema_on(inst["control_url"], pid) == (False, 0)
    assert (await _schema_on(inst["two_url"], pid))[0] is True


async def test_installed_extensions_move_along(
    inst: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    """A project with an extension installed moves (before: 409): the dump turns it on in the
    project on the target (fluxbase_guard.create_extension as the project's admin role, like an
    install) before the tables that use it. A target whose server does not offer it is refused
    before anything is marked. The extensions page reads where the project lives."""
    api: Api = inst["api"]
    http = api.http
    admin, cid = bearer(inst["admin"]), inst["cid"]
    r = await http.post("/api/projects", json={"name": "with citext", "clusterId": "default"}, headers=admin)
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], pid, "admin", rateLimitRequests=100_000)
    r = await http.post(f"/api/projects/{pid}/extensions", json={"name": "citext"}, headers=bearer(key))
    assert r.status_code == 201, r.text
    for q in (
        "CREATE TABLE tags (id serial PRIMARY KEY, name citext NOT NULL UNIQUE)",
        "INSERT INTO tags (name) VALUES ('Fluxbase'), ('Postgres')",
    ):
        r = await api.sql(key, pid, q)
        assert r.json()["success"], (q, r.text)

    async def installed() -> list[str]:
        r = await http.get(f"/api/projects/{pid}/extensions", headers=bearer(key))
        assert r.status_code == 200, r.text
        return [e["name"] for e in r.json()["extensions"] if e["installed"]]

    assert await installed() == ["citext"]
    # A target whose server does not offer it: refused, nothing marked, still writable.
    two = await asyncpg.connect(inst["two_url"])
    try:
        await two.execute("UPDATE fluxbase.extensions SET available = false WHERE name = 'citext'")
        try:
            r = await http.post(f"/api/admin/projects/{pid}/move", json={"clusterId": cid}, headers=admin)
            body = assert_error(r, 409, "CONFLICT")
            assert "citext" in body["error"]["message"]
        finally:
            await two.execute("UPDATE fluxbase.extensions SET available = true WHERE name = 'citext'")
    finally:
        await two.close()
    assert await _where(inst["control_url"], pid) == {
        "cluster_id": "default",
        "moving_to": None,
        "read_only": False,
    }

    r = await http.post(f"/api/admin/projects/{pid}/move", json={"clusterId": cid}, headers=admin)
    assert r.status_code == 200, r.text
    r = await api.sql(
        key, pid, "SELECT name::text AS name, inet_server_port() AS port FROM tags WHERE name = 'FLUXBASE'"
    )
    assert r.json()["result"]["rows"] == [{"name": "Fluxbase", "port": pg2.port}], r.text
    r = await api.sql(key, pid, "INSERT INTO tags (name) VALUES ('POSTGRES')")
    assert not r.json()["success"], r.text  # citext's equality in the unique index, on the target
    assert await installed() == ["citext"]
    for url, want in ((inst["two_url"], ["citext"]), (inst["control_url"], [])):
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT name FROM fluxbase.project_extensions WHERE project_id = $1", pid)
            assert [x["name"] for x in rows] == want, url
        finally:
            await conn.close()

    # And back to the default cluster (read on the registered one, where it is recorded).
    r = await http.post(f"/api/admin/projects/{pid}/move", json={"clusterId": "default"}, headers=admin)
    assert r.status_code == 200, r.text
    r = await api.sql(
        key, pid, "SELECT count(*)::int AS n, inet_server_port() AS port FROM tags WHERE name = 'postgres'"
    )
    row = r.json()["result"]["rows"][0]
    assert row["n"] == 1 and row["port"] != pg2.port, r.text
    assert await installed() == ["citext"]
