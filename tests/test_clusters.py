"""Database clusters (issue 19): registration verified before saving, CloudSync-style failure
codes, management keys, placement, and tenant SQL on a project that lives on a second
PostgreSQL server — all through the real API, with two (three, for the version check) real
PostgreSQL servers."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from aiohttp import web
from websockets.asyncio.client import connect

from fluxbase.config import load_settings
from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import free_port
from fluxbase.services.clusters import seal
from support import ROOT, Api, Stack, assert_clean, assert_error, bearer, run_service

PG15_BIN = Path("/usr/lib/postgresql/15/bin")


def _url(pg: EmbeddedPostgres, db: str, user: str = "postgres", password: str | None = None) -> str:
    pw = quote(password if password is not None else pg.password, safe="")
    return f"postgresql://{user}:{pw}@127.0.0.1:{pg.port}/{db}"


@pytest.fixture(scope="module")
def own_tmp() -> Iterator[Path]:
    """Data folders outside pytest's basetemp: a pytest session starting meanwhile (another
    checkout's) resets /tmp/pytest-of-<user> to 0700, and the servers' system user then cannot
    reach a data folder below it (initdb fails with "Permission denied")."""
    path = Path(tempfile.mkdtemp(prefix="fx-clusters-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pg2(own_tmp: Path) -> Iterator[EmbeddedPostgres]:
    """The second cluster: a PostgreSQL server of its own (port and data dir)."""
    pg = EmbeddedPostgres(own_tmp / "pg2", free_port(), durable=False, max_connections=100)
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        pg.stop("immediate")


@pytest.fixture(scope="module")
def pg3(own_tmp: Path) -> Iterator[EmbeddedPostgres]:
    """A third server, for modules that register a second cluster beside pg2's: one server is at
    most one cluster (roles are per server; services/clusters.py)."""
    pg = EmbeddedPostgres(own_tmp / "pg3", free_port(), durable=False, max_connections=50)
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        pg.stop("immediate")


@pytest.fixture(scope="module")
async def pg2_db(pg2: EmbeddedPostgres) -> str:
    conn = await asyncpg.connect(pg2.url)
    try:
        await conn.execute("CREATE DATABASE cluster_two")
        await conn.execute("CREATE ROLE weak LOGIN CREATEDB PASSWORD 'weak-password-1'")
        await conn.execute("GRANT CREATE ON DATABASE cluster_two TO weak")
    finally:
        await conn.close()
    return "cluster_two"


@pytest.fixture(scope="module")
async def inst(stack: Stack, log_dir: Path) -> AsyncIterator[dict[str, Any]]:
    """An instance of its own: registering a cluster changes where its new projects go."""
    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(
        dbname,
        FLUXBASE_API_PORT=str(port),
        FLUXBASE_RUN_WORKER_IN_API="true",
        FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true",
        FLUXBASE_LOG_LEVEL="info",  # the log is checked for the cluster password
    )
    try:
        with run_service(["api"], env, port, log_dir) as server:
            api = Api(server.url)
            admin = await api.register(email="root@example.com")
            token = await api.login(admin["email"], admin["password"])
            try:
                yield {
                    "url": server.url,
                    "dbname": dbname,
                    "admin": token,
                    "api": api,
                    "env": env,
                    "server": server,
                }
            finally:
                await api.close()
    finally:
        await stack.drop_database(dbname)


SEEN: list[str] = []  # every response body of this module, checked for the cluster password


def _seen(resp: httpx.Response) -> httpx.Response:
    SEEN.append(resp.text)
    assert_clean(resp)
    return resp


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    """What the tests of this module hand on to the next (they run in order)."""
    return {}


@pytest.fixture(scope="module")
async def mgmt(inst: dict[str, Any]) -> dict[str, str]:
    """A management key, minted by the instance admin's session."""
    r = _seen(
        await inst["api"].http.post(
            "/api/admin/management-keys", json={"name": "automation"}, headers=bearer(inst["admin"])
        )
    )
    assert r.status_code == 201, r.text
    assert r.json()["key"].startswith("flx_mgmt_")
    return bearer(r.json()["key"])


async def _register(
    inst: dict[str, Any], mgmt: dict[str, str], conn_str: str, label: str = "two"
) -> httpx.Response:
    return _seen(
        await inst["api"].http.post(
            "/api/admin/clusters",
            json={"label": label, "connectionString": conn_str, "region": "eu-west"},
            headers=mgmt,
        )
    )


async def test_verification_failures_save_nothing(
    inst: dict[str, Any], mgmt: dict[str, str], pg2: EmbeddedPostgres, pg2_db: str
) -> None:
    http = inst["api"].http
    assert_error(
        await http.post("/api/admin/management-keys", json={"name": "x"}, headers=mgmt),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(await http.get("/api/admin/clusters"), 401, "AUTH_REQUIRED")
    unreachable = f"postgresql://postgres:x@127.0.0.1:{free_port()}/postgres"
    body = assert_error(await _register(inst, mgmt, unreachable), 422, "DATABASE_UNREACHABLE")
    assert body["error"]["details"] == {"failure": "database_unreachable", "retryable": True}
    wrong = _url(pg2, pg2_db, password="wrong-password")
    body = assert_error(await _register(inst, mgmt, wrong), 422, "DATABASE_AUTH_FAILED")
    assert body["error"]["details"] == {"failure": "database_auth_failed", "retryable": False}
    weak = _url(pg2, pg2_db, "weak", "weak-password-1")
    body = assert_error(await _register(inst, mgmt, weak), 422, "DATABASE_PERMISSION_DENIED")
    assert body["error"]["details"]["failure"] == "database_permission_denied"
    assert "CREATEROLE" in body["error"]["message"]
    r = _seen(await http.get("/api/admin/clusters", headers=mgmt))
    assert r.status_code == 200
    assert [c["id"] for c in r.json()["clusters"]] == ["default"]


@pytest.mark.skipif(not (PG15_BIN / "postgres").exists(), reason="no Debian PostgreSQL 15 binaries")
async def test_version_unsupported_with_a_real_postgresql_15(
    inst: dict[str, Any], mgmt: dict[str, str], own_tmp: Path
) -> None:
    """Debian's PostgreSQL 15: Fluxbase's SQL needs 16 (GRANT … WITH INHERIT/SET options)."""
    pg15 = EmbeddedPostgres(own_tmp / "pg15", free_port(), durable=False, max_connections=20)
    pg15.bin_dir = PG15_BIN
    pg15.init()
    pg15.start()
    try:
        body = assert_error(
            await _register(inst, mgmt, _url(pg15, "postgres")), 422, "DATABASE_VERSION_UNSUPPORTED"
        )
        assert body["error"]["details"]["failure"] == "database_version_unsupported"
        assert "PostgreSQL 15" in body["error"]["message"]
    finally:
        pg15.stop("immediate")


async def test_register_update_and_live_check(
    inst: dict[str, Any], mgmt: dict[str, str], pg2: EmbeddedPostgres, pg2_db: str, state: dict[str, Any]
) -> None:
    http = inst["api"].http
    r = await _register(inst, mgmt, _url(pg2, pg2_db))
    assert r.status_code == 201, r.text
    cluster = r.json()["cluster"]
    cid = state["cid"] = cluster["id"]
    assert cluster["connection"] == {
        "host": "127.0.0.1",
        "port": pg2.port,
        "database": pg2_db,
        "user": "postgres",
    }
    assert cluster["region"] == "eu-west" and cluster["isDefault"] is False and cluster["projects"] == 0
    assert cluster["serverVersion"] >= 160000
    assert_error(await _register(inst, mgmt, _url(pg2, pg2_db), "again"), 409, "CONFLICT")

    r = _seen(await http.patch(f"/api/admin/clusters/{cid}", json={"label": "Second"}, headers=mgmt))
    assert r.status_code == 200 and r.json()["cluster"]["label"] == "Second"
    # A new connection string is verified before it is stored: a wrong one changes nothing.
    bad = _url(pg2, pg2_db, password="nope")
    r = _seen(await http.patch(f"/api/admin/clusters/{cid}", json={"connectionString": bad}, headers=mgmt))
    assert_error(r, 422, "DATABASE_AUTH_FAILED")
    r = _seen(await http.get(f"/api/admin/clusters/{cid}/connection", headers=mgmt))
    check = r.json()["connection"]
    assert check["ok"] is True and check["failure"] is None and check["latencyMs"] >= 0 and check["checkedAt"]
    assert_error(await http.get("/api/admin/clusters/cl_nope", headers=mgmt), 404, "CLUSTER_NOT_FOUND")

    # The live check sees the server as it is now: a changed password is reported, not raised.
    new_pw = secrets.token_hex(12)
    conn2 = await asyncpg.connect(pg2.url)
    try:
        await conn2.execute(f"ALTER ROLE postgres PASSWORD '{new_pw}'")
        r = _seen(await http.get(f"/api/admin/clusters/{cid}/connection", headers=mgmt))
        check = r.json()["connection"]
        assert check["ok"] is False and check["failure"]["code"] == "database_auth_failed", check
        await conn2.execute(f"ALTER ROLE postgres PASSWORD '{pg2.password}'")
    finally:
        await conn2.close()


async def test_placement_and_sql_on_cluster_two(
    inst: dict[str, Any],
    mgmt: dict[str, str],
    pg2: EmbeddedPostgres,
    pg2_db: str,
    stack: Stack,
    state: dict[str, Any],
) -> None:
    api: Api = inst["api"]
    http = api.http
    admin = bearer(inst["admin"])
    cid = state["cid"]
    _user, user_token = await api.new_user()
    state["user_token"] = user_token
    assert_error(
        await http.get("/api/admin/clusters", headers=bearer(user_token)), 403, "INSUFFICIENT_PERMISSIONS"
    )

    # Registered with a management key, the cluster is closed to placement; only an instance
    # admin's session opens it (hostile review 7).
    r = await http.get(f"/api/admin/clusters/{cid}", headers=mgmt)
    assert r.json()["cluster"]["placement"] == "closed"
    r = await http.patch(f"/api/admin/clusters/{cid}", json={"placement": "open"}, headers=mgmt)
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await http.patch(f"/api/admin/clusters/{cid}", json={"placement": "shut"}, headers=admin)
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await http.patch("/api/admin/clusters/default", json={"placement": "closed"}, headers=admin)
    assert_error(r, 400, "VALIDATION_ERROR")
    r = await http.patch(f"/api/admin/clusters/{cid}", json={"placement": "open"}, headers=admin)
    assert r.status_code == 200 and r.json()["cluster"]["placement"] == "open", r.text

    # Placement: fewest projects; an explicit clusterId is an instance admin's decision.
    first = await api.new_project(user_token, "first")  # both empty: the default cluster first
    second = state["second"] = await api.new_project(user_token, "second")  # now cluster two has fewer
    r = await http.post("/api/projects", json={"name": "x", "clusterId": cid}, headers=bearer(user_token))
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await http.post("/api/projects", json={"name": "third", "clusterId": "default"}, headers=admin)
    assert r.status_code == 201, r.text
    third = r.json()["project"]["id"]
    r = await http.post("/api/projects", json={"name": "x", "clusterId": "cl_nope"}, headers=admin)
    assert_error(r, 404, "CLUSTER_NOT_FOUND")
    control = await asyncpg.connect(stack.database_url(inst["dbname"]))
    try:
        placed = dict(await control.fetch("SELECT id, cluster_id FROM fluxbase.projects"))
        assert placed == {first: "default", second: cid, third: "default"}
    finally:
        await control.close()

    # Tenant SQL on cluster two runs there, as the project's own LOGIN role.
    key = state["key"] = await api.new_key(user_token, second, "admin", rateLimitRequests=100_000)
    query = {"projectId": second, "query": "SELECT 1"}
    assert_error(await http.post("/api/execute-sql", json=query, headers=mgmt), 401, "AUTH_REQUIRED")
    assert_error(await http.get("/api/projects", headers=mgmt), 401, "AUTH_REQUIRED")
    assert_error(await http.get("/api/admin/clusters", headers=bearer(key)), 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.sql(key, second, "CREATE TABLE items (id serial PRIMARY KEY, name text)")
    assert r.status_code == 200 and r.json()["success"], r.text
    r = await api.sql(key, second, "INSERT INTO items (name) VALUES ($1) RETURNING id", ["on cluster two"])
    assert r.json()["success"], r.text
    r = await api.sql(key, second, "SELECT session_user AS who, inet_server_port() AS port, name FROM items")
    row = r.json()["result"]["rows"][0]
    assert row["who"] == f"p_{second}_admin"
    assert row["port"] == pg2.port
    assert row["name"] == "on cluster two"
    # Physically on cluster two, absent from the control plane's server.
    there = await asyncpg.connect(_url(pg2, pg2_db))
    try:
        assert await there.fetchval(f'SELECT name FROM "p_{second}".items') == "on cluster two"
        # Its roles hold CONNECT there through that database's tenant groups (made by the
        # registration's privilege step), with no entry of their own in its ACL (issue 19).
        from fluxbase.db.privileges import group_prefix, tenant_group

        assert await there.fetchval(
            "SELECT pg_has_role($1, $2, 'USAGE')",
            f"p_{second}_admin",
            tenant_group(await group_prefix(there), "admin"),
        )
        assert not await there.fetchval(
            """SELECT count(*) FROM pg_database d, aclexplode(d.datacl) x JOIN pg_roles g ON g.oid = x.grantee
               WHERE d.datname = current_database() AND g.rolname ~ '^p_[0-9a-f]{16}_'"""
        )
    finally:
        await there.close()
    control = await asyncpg.connect(stack.database_url(inst["dbname"]))
    try:
        assert await control.fetchval("SELECT to_regnamespace($1)", f"p_{second}") is None
        assert await control.fetchval("SELECT to_regnamespace($1)", f"p_{first}") is not None
    finally:
        await control.close()
    # Projects on the default cluster still work alongside.
    key1 = await api.new_key(user_token, first, "admin", rateLimitRequests=100_000)
    r = await api.sql(key1, first, "SELECT inet_server_port() AS port")
    assert r.json()["success"], r.text
    assert r.json()["result"]["rows"][0]["port"] != pg2.port


async def test_one_server_is_one_cluster(
    inst: dict[str, Any], pg2: EmbeddedPostgres, stack: Stack, state: dict[str, Any]
) -> None:
    """Roles are per server: a second database of a registered cluster's server, or another
    database of the control plane's server, is refused (409 CONFLICT, failure
    database_already_registered), before anything is installed there. Before sql/0047 both were
    registered (201): the second registration set the runtime's and the provisioners' passwords
    from its own cluster id (on the control plane's server: the control plane's own runtime role),
    and a project created on cluster two afterwards could not be dropped (seen failing: 201)."""
    api: Api = inst["api"]
    http = api.http
    admin = bearer(inst["admin"])
    cid = state["cid"]
    owner = await asyncpg.connect(pg2.url)
    try:
        await owner.execute("CREATE DATABASE cluster_two_b")
    finally:
        await owner.close()
    same_server = _url(pg2, "cluster_two_b")
    # Cluster two as if registered before sql/0047 and unreachable at the last migrate: its
    # server's identifier is read when the next registration needs it.
    control = await asyncpg.connect(stack.database_url(inst["dbname"]))
    try:
        await control.execute("UPDATE fluxbase.clusters SET system_identifier = NULL WHERE id = $1", cid)
    finally:
        await control.close()
    r = _seen(
        await http.post(
            "/api/admin/clusters", json={"label": "b", "connectionString": same_server}, headers=admin
        )
    )
    body = assert_error(r, 409, "CONFLICT")
    assert body["error"]["details"] == {"failure": "database_already_registered", "retryable": False}
    assert "already registered" in body["error"]["message"]
    control_server_db = await stack.create_database()
    try:
        control_server = stack.database_url(control_server_db)  # its superuser, at 127.0.0.1
        r = _seen(
            await http.post(
                "/api/admin/clusters", json={"label": "c", "connectionString": control_server}, headers=admin
            )
        )
        body = assert_error(r, 409, "CONFLICT")
        assert body["error"]["details"]["failure"] == "database_already_registered"
        assert "control plane" in body["error"]["message"]
        # Nor may a registered cluster's connection string move to the control plane's server.
        r = _seen(
            await http.patch(
                f"/api/admin/clusters/{cid}", json={"connectionString": control_server}, headers=admin
            )
        )
        body = assert_error(r, 409, "CONFLICT")
        assert body["error"]["details"]["failure"] == "database_already_registered"
        check = await asyncpg.connect(stack.database_url(control_server_db))
        try:  # refused before the install: no Fluxbase SQL there
            assert await check.fetchval("SELECT to_regnamespace('fluxbase')") is None
        finally:
            await check.close()
    finally:
        await stack.drop_database(control_server_db)
    r = _seen(await http.get("/api/admin/clusters", headers=admin))
    assert [c["id"] for c in r.json()["clusters"]] == ["default", cid]
    there = await asyncpg.connect(_url(pg2, "cluster_two_b"))
    try:
        assert await there.fetchval("SELECT to_regnamespace('fluxbase')") is None
    finally:
        await there.close()

    # Cluster two's roles still log in: a project created there now is provisioned by its
    # provisioner role and dropped again, roles included.
    r = await http.post("/api/projects", json={"name": "same server", "clusterId": cid}, headers=admin)
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], pid, "admin", rateLimitRequests=100_000)
    r = await api.sql(key, pid, "CREATE TABLE t (id int)")
    assert r.json()["success"], r.text
    there = await asyncpg.connect(_url(pg2, "cluster_two"))
    try:
        admins = await there.fetch(
            """SELECT b.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
               JOIN pg_roles b ON b.oid = m.member WHERE r.rolname = $1 AND m.admin_option""",
            f"p_{pid}_admin",
        )
        assert [a["rolname"] for a in admins] and all(
            a["rolname"].startswith("fluxbase_provisioner_") for a in admins
        ), admins
        r = await http.delete(f"/api/projects/{pid}", headers=admin)
        assert r.status_code == 200, r.text
        left = await there.fetchval(
            "SELECT count(*) FROM pg_roles WHERE starts_with(rolname, $1)", f"p_{pid}_"
        )
        assert left == 0
        assert await there.fetchval("SELECT to_regnamespace($1)", f"p_{pid}") is None
    finally:
        await there.close()


async def test_realtime_reads_cluster_two(inst: dict[str, Any], state: dict[str, Any], log_dir: Path) -> None:
    """An admin key (everything) and a read key (through the RLS gate, on cluster two's checker
    role) receive cluster two's events; a replay from a cursor reads its outbox too."""
    api: Api = inst["api"]
    second, key = state["second"], state["key"]
    rt_port = free_port()
    rt_env = dict(inst["env"], FLUXBASE_REALTIME_PORT=str(rt_port))
    read_key = await api.new_key(state["user_token"], second, "read")
    with run_service(["realtime"], rt_env, rt_port, log_dir):
        ws_url = f"ws://127.0.0.1:{rt_port}/?token="
        room = {"type": "subscribe", "roomId": f"project_{second}"}
        async with connect(ws_url + key) as ws_admin, connect(ws_url + read_key) as ws_read:
            for ws in (ws_admin, ws_read):
                await ws.send(json.dumps(room))
                first_msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert first_msg["type"] == "subscribed", first_msg
            r = await api.sql(key, second, "INSERT INTO items (name) VALUES ('live')")
            assert r.json()["success"], r.text
            for ws in (ws_admin, ws_read):
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if event["type"] == "db_event":
                        break
                assert event["payload"]["operation"] == "INSERT"
                assert event["payload"]["record"]["name"] == "live", event
        async with connect(ws_url + key) as ws:
            await ws.send(json.dumps({**room, "since": "0:0"}))
            names = []
            while len(names) < 2:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] == "db_event":
                    names.append(msg["payload"]["record"]["name"])
            assert names == ["on cluster two", "live"]


async def test_worker_delivers_webhooks_from_cluster_two(inst: dict[str, Any], state: dict[str, Any]) -> None:
    api: Api = inst["api"]
    second, key = state["second"], state["key"]
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    try:
        r = await api.http.post(
            "/api/webhooks",
            json={
                "projectId": second,
                "url": f"http://127.0.0.1:{hook_port}/hook",
                "events": ["row.inserted"],
            },
            headers=bearer(key),
        )
        assert r.status_code == 201, r.text
        r = await api.sql(key, second, "INSERT INTO items (name) VALUES ('hooked')")
        assert r.json()["success"], r.text
        for _ in range(300):
            if any(b"hooked" in b for b in received):
                break
            await asyncio.sleep(0.05)
        assert [b for b in received if b"hooked" in b], received
        assert not [b for b in received if b"live" in b]  # written before the endpoint existed
    finally:
        await runner.cleanup()


async def test_fluxbase_migrate_reaches_registered_clusters(
    inst: dict[str, Any], pg2: EmbeddedPostgres, pg2_db: str, stack: Stack, state: dict[str, Any]
) -> None:
    """An upgrade's new migration files are applied on every registered cluster too. Clusters
    registered before sql/0047 get their server's identifier there; of two that share a server
    (possible then), the newest keeps it and the other is reported and left alone (installing
    there again would set the newest one's runtime and provisioner passwords)."""
    cid = state["cid"]
    control = await asyncpg.connect(stack.database_url(inst["dbname"]))
    there = await asyncpg.connect(_url(pg2, pg2_db))
    try:
        sysid = await control.fetchval("SELECT system_identifier FROM fluxbase.clusters WHERE id = $1", cid)
        assert sysid == str(await there.fetchval("SELECT system_identifier FROM pg_control_system()"))
        # (test_one_server_is_one_cluster erased it; the registration it refused read it again)
        # As before sql/0047: no identifiers, and an older registration of another database of
        # cluster two's server.
        if not await there.fetchval("SELECT 1 FROM pg_database WHERE datname = 'cluster_two_b'"):
            await there.execute("CREATE DATABASE cluster_two_b")
        await control.execute("UPDATE fluxbase.clusters SET system_identifier = NULL WHERE id = $1", cid)
        await control.execute(
            """INSERT INTO fluxbase.clusters (id, label, host, port, database, username, secret, placement,
                                              created_at)
               SELECT 'cl_legacy', 'legacy', host, port, 'cluster_two_b', username, $2, 'closed',
                      created_at - interval '1 day'
               FROM fluxbase.clusters WHERE id = $1""",
            cid,
            seal(load_settings(inst["env"]), "cl_legacy", pg2.password),
        )
        await there.execute("DELETE FROM fluxbase.schema_migrations WHERE version = '0037'")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fluxbase",
            "migrate",
            env=inst["env"],
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        assert await there.fetchval("SELECT 1 FROM fluxbase.schema_migrations WHERE version = '0037'") == 1
        ids = dict(
            await control.fetch("SELECT id, system_identifier FROM fluxbase.clusters WHERE id <> 'default'")
        )
        assert ids == {cid: sysid, "cl_legacy": None}
        assert b"cl_legacy is on the same PostgreSQL server as " + cid.encode() in out
        legacy = await asyncpg.connect(_url(pg2, "cluster_two_b"))
        try:  # not installed there
            assert await legacy.fetchval("SELECT to_regnamespace('fluxbase')") is None
        finally:
            await legacy.close()
    finally:
        await control.execute("DELETE FROM fluxbase.clusters WHERE id = 'cl_legacy'")
        await control.close()
        await there.close()
    # Cluster two's runtime and provisioner logins still work: a project is made and dropped there.
    http, admin = inst["api"].http, bearer(inst["admin"])
    r = await http.post("/api/projects", json={"name": "after migrate", "clusterId": cid}, headers=admin)
    assert r.status_code == 201, r.text
    r = await http.delete(f"/api/projects/{r.json()['project']['id']}", headers=admin)
    assert r.status_code == 200, r.text


async def test_revocation_and_removal(
    inst: dict[str, Any], mgmt: dict[str, str], pg2: EmbeddedPostgres, pg2_db: str, state: dict[str, Any]
) -> None:
    api: Api = inst["api"]
    http = api.http
    admin = bearer(inst["admin"])
    cid, second, key, user_token = state["cid"], state["second"], state["key"], state["user_token"]
    # A revoked key stops at once on cluster two too (checked on the control plane).
    keys = (await http.get(f"/api/projects/{second}/api-keys", headers=bearer(user_token))).json()["apiKeys"]
    r = await http.delete(f"/api/projects/{second}/api-keys/{keys[0]['id']}", headers=bearer(user_token))
    assert r.status_code == 200, r.text
    assert_error(await api.sql(key, second, "SELECT 1"), 401, "AUTH_REQUIRED")

    # Removal is refused while projects live there.
    body = assert_error(await http.delete(f"/api/admin/clusters/{cid}", headers=mgmt), 409, "CLUSTER_IN_USE")
    assert body["error"]["details"]["projects"] == 1
    assert_error(await http.delete("/api/admin/clusters/default", headers=mgmt), 409, "CLUSTER_IN_USE")
    r = await http.delete(f"/api/projects/{second}", headers=bearer(user_token))
    assert r.status_code == 200, r.text
    there = await asyncpg.connect(_url(pg2, pg2_db))
    try:
        assert await there.fetchval("SELECT to_regnamespace($1)", f"p_{second}") is None
        assert (
            await there.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"p_{second}_%") == 0
        )
    finally:
        await there.close()
    r = _seen(await http.delete(f"/api/admin/clusters/{cid}", headers=mgmt))
    assert r.status_code == 200, r.text

    # A revoked management key is no credential.
    mk_id = (await http.get("/api/admin/management-keys", headers=admin)).json()["managementKeys"][0]["id"]
    r = _seen(await http.delete(f"/api/admin/management-keys/{mk_id}", headers=admin))
    assert r.status_code == 200 and r.json()["managementKey"]["revokedAt"]
    assert_error(await http.get("/api/admin/clusters", headers=mgmt), 401, "AUTH_REQUIRED")

    # The superuser password of cluster two never appeared in any response.
    assert SEEN and all(pg2.password not in text for text in SEEN)
    # Nor in the API's log (which has logged every request and the failed verifications).
    assert inst["server"].log() and pg2.password not in inst["server"].log()
