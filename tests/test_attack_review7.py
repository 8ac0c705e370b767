"""Hostile review 7: database clusters (management keys, /api/admin/clusters, projects on a
registered cluster) and the ops changes (shared metrics, tracing), attacked through the public
HTTP API with a second real PostgreSQL server.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix. The second server's superuser connection stands for the
attacker who owns that server (finding 1) or is used only to observe effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fluxbase.db.quoting import quote_ident
from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import free_port
from support import Api, Stack, assert_error, bearer, run_service
from test_attack_review1 import browser_key, end_user, sql
from test_clusters import own_tmp, pg2  # noqa: F401  (module fixtures: a second PostgreSQL server)

DEADLINE_MS = 1500

# Project-key and session routes a management key must not open (it is no credential there).
ELSEWHERE = [
    ("GET", "/api/projects", None),
    ("GET", "/api/auth/me", None),
    ("GET", "/api/admin/projects", None),
    ("GET", "/api/team", None),
    ("GET", "/api/invites", None),
    ("GET", "/api/webhooks", None),
    ("GET", "/api/storage/buckets", None),
    ("GET", "/api/schema", None),
    ("POST", "/api/execute-batch", {"projectId": "p_x", "statements": [{"query": "SELECT 1"}]}),
    ("POST", "/api/realtime/token", {}),
    ("POST", "/api/projects", {"name": "from a management key"}),
]


def _url(pg: EmbeddedPostgres, db: str = "postgres", host: str = "127.0.0.1", query: str = "") -> str:
    return f"postgresql://postgres:{quote(pg.password, safe='')}@{host}:{pg.port}/{db}{query}"


@pytest.fixture(scope="module")
async def inst(stack: Stack, log_dir: Path) -> AsyncIterator[dict[str, Any]]:
    """An instance of its own (registered clusters change its placement), with a short request
    deadline so the deadline-kill path is reached quickly."""
    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(dbname, FLUXBASE_API_PORT=str(port), FLUXBASE_SQL_DEADLINE_MS=str(DEADLINE_MS))
    try:
        with run_service(["api"], env, port, log_dir) as server:
            api = Api(server.url)
            admin = await api.register(email="root7@example.com")
            token = await api.login(admin["email"], admin["password"])
            r = await api.http.post(
                "/api/admin/management-keys", json={"name": "automation"}, headers=bearer(token)
            )
            assert r.status_code == 201, r.text
            try:
                yield {
                    "api": api,
                    "admin": token,
                    "mgmt": r.json()["key"],
                    "env": env,
                    "dbname": dbname,
                    "stack": stack,
                }
            finally:
                await api.close()
    finally:
        await stack.drop_database(dbname)


@pytest.fixture(scope="module")
async def registered(inst: dict[str, Any], pg2: EmbeddedPostgres) -> dict[str, Any]:  # noqa: F811
    """The management key's holder registers a server whose superuser they are (pg2). Before
    that, as that server's owner, they make it log every statement of the registering role."""
    owner = await asyncpg.connect(pg2.url)
    try:
        await owner.execute("CREATE DATABASE attacker_db")
        await owner.execute("ALTER ROLE postgres SET log_statement = 'all'")
    finally:
        await owner.close()
    r = await inst["api"].http.post(
        "/api/admin/clusters",
        json={"label": "mine", "connectionString": _url(pg2, "attacker_db")},
        headers=bearer(inst["mgmt"]),
    )
    assert r.status_code == 201, r.text
    return {"cid": r.json()["cluster"]["id"], "db": "attacker_db"}


@pytest.fixture(scope="module")
async def on_two(inst: dict[str, Any], registered: dict[str, Any]) -> dict[str, Any]:
    """A victim's project, placed by the placement policy (fewest projects) on the new cluster,
    once an instance admin's session has opened it to placement."""
    api: Api = inst["api"]
    # One project on the default cluster already (ties go to the default one).
    r = await api.http.post(
        "/api/projects", json={"name": "filler", "clusterId": "default"}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 201, r.text
    r = await api.http.patch(
        f"/api/admin/clusters/{registered['cid']}", json={"placement": "open"}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 200 and r.json()["cluster"]["placement"] == "open", r.text
    _user, token = await api.new_user()
    pid = await api.new_project(token, "victim")
    key = await api.new_key(token, pid, "admin", rateLimitRequests=100_000)
    control = await asyncpg.connect(inst["stack"].database_url(inst["dbname"]))  # observe only
    try:
        placed = await control.fetchval("SELECT cluster_id FROM fluxbase.projects WHERE id = $1", pid)
    finally:
        await control.close()
    assert placed == registered["cid"]
    return {"pid": pid, "key": key, "token": token}


@pytest.fixture(scope="module")
def rt(inst: dict[str, Any], registered: dict[str, Any], log_dir: Path) -> Iterator[str]:
    """The realtime service of the module's instance (started after the cluster's registration,
    so it reads that cluster's outbox too): its WebSocket URL up to `?token=`."""
    rt_port = free_port()
    env = dict(inst["env"], FLUXBASE_REALTIME_PORT=str(rt_port))
    with run_service(["realtime"], env, rt_port, log_dir):
        yield f"ws://127.0.0.1:{rt_port}/?token="


# -- 1. management keys and /api/admin/clusters --------------------------------------------------


async def test_a_management_key_is_no_credential_elsewhere(inst: dict[str, Any], rt: str) -> None:
    http: httpx.AsyncClient = inst["api"].http
    mgmt = bearer(inst["mgmt"])
    for method, path, body in ELSEWHERE:
        r = await http.request(method, path, json=body, headers=mgmt)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
    # Nor does it mint, list or revoke management keys (a session's business).
    for method, path in (
        ("POST", "/api/admin/management-keys"),
        ("GET", "/api/admin/management-keys"),
        ("DELETE", "/api/admin/management-keys/mk_x"),
    ):
        body = {"name": "more"} if method == "POST" else None
        r = await http.request(method, path, json=body, headers=mgmt)
        assert r.status_code == 403, (method, path, r.text)
    # The realtime service (its own process) refuses it as a token too.
    try:
        async with connect(rt + inst["mgmt"]) as ws:
            await ws.send('{"type": "subscribe", "roomId": "project_x"}')
            msg = await asyncio.wait_for(ws.recv(), 10)
            assert "error" in str(msg).lower(), msg
    except InvalidStatus as exc:
        assert exc.response.status_code in (401, 403)


async def test_no_connection_is_attempted_for_non_admins(inst: dict[str, Any], pg2: EmbeddedPostgres) -> None:  # noqa: F811
    """A plain user's session and a project key are refused before any connection is made: the
    register/check routes are no port-scanner for them."""
    api: Api = inst["api"]
    _user, token = await api.new_user()
    pid = await api.new_project(token, "plain")
    key = await api.new_key(token, pid, "admin")
    open_port = _url(pg2, "postgres")
    for who, status in ((bearer(token), 403), (bearer(key), 403), ({}, 401)):
        r = await api.http.post(
            "/api/admin/clusters", json={"label": "scan", "connectionString": open_port}, headers=who
        )
        assert r.status_code == status, r.text
        assert "DATABASE_" not in r.text
        r = await api.http.get("/api/admin/clusters/default/connection", headers=who)
        assert r.status_code == status, r.text
    # A revoked management key stops at once (exercised with a second one).
    r = await api.http.post(
        "/api/admin/management-keys", json={"name": "short-lived"}, headers=bearer(inst["admin"])
    )
    raw, mk = r.json()["key"], r.json()["managementKey"]["id"]
    assert (await api.http.get("/api/admin/clusters", headers=bearer(raw))).status_code == 200
    r = await api.http.delete(f"/api/admin/management-keys/{mk}", headers=bearer(inst["admin"]))
    assert r.status_code == 200
    assert_error(await api.http.get("/api/admin/clusters", headers=bearer(raw)), 401, "AUTH_REQUIRED")
    # A key differing in its last character is not accepted (hash lookup, no prefix match).
    bad = raw[:-1] + ("A" if raw[-1] != "A" else "B")
    assert_error(await api.http.get("/api/admin/clusters", headers=bearer(bad)), 401, "AUTH_REQUIRED")


async def test_a_connection_string_cannot_name_a_unix_socket(
    inst: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    sock = quote(str(pg2.socket_dir), safe="")
    socket_url = f"postgresql://postgres:wrong@ignored:{pg2.port}/postgres?host={sock}"
    r = await inst["api"].http.post(
        "/api/admin/clusters",
        json={"label": "socket", "connectionString": socket_url},
        headers=bearer(inst["mgmt"]),
    )
    # Reaching the socket answered DATABASE_AUTH_FAILED (it connected) before the fix.
    assert_error(r, 400, "VALIDATION_ERROR")


async def test_a_management_key_cannot_obtain_the_runtime_password(
    inst: dict[str, Any],
    registered: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
    stack: Stack,
) -> None:
    runtime = urlsplit(inst["env"]["FLUXBASE_DATABASE_URL"])
    password = unquote(runtime.password or "")
    assert password and runtime.username
    log = pg2.log_path.read_text(errors="replace")
    if password in log:
        # What the attacker does with it: the control plane's runtime role, every project's
        # rows of fluxbase.* (users, keys, sessions) — far beyond /api/admin/clusters.
        conn = await asyncpg.connect(inst["env"]["FLUXBASE_DATABASE_URL"])
        try:
            assert await conn.fetchval("SELECT count(*) FROM fluxbase.users") >= 1
        finally:
            await conn.close()
    assert password not in log


async def test_a_management_key_cannot_draw_other_users_projects(
    inst: dict[str, Any],
    registered: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    """Review 7 finding 1b: the key's cluster took the next project (fewest projects) and its
    owner read the victim's rows. A cluster registered by a management key is closed to
    placement until an instance admin's session opens it; the key cannot open it."""
    api: Api = inst["api"]
    mgmt = bearer(inst["mgmt"])
    r = await api.http.get(f"/api/admin/clusters/{registered['cid']}", headers=mgmt)
    assert r.json()["cluster"]["placement"] == "closed", r.text
    # One project on the default cluster already (ties go to the default one).
    r = await api.http.post(
        "/api/projects", json={"name": "filler", "clusterId": "default"}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 201, r.text
    _user, token = await api.new_user()
    pid = await api.new_project(token, "victim")
    key = await api.new_key(token, pid, "admin", rateLimitRequests=100_000)
    r = await api.sql(key, pid, "CREATE TABLE secrets (v text)")
    assert r.json()["success"], r.text
    r = await api.sql(key, pid, "INSERT INTO secrets VALUES ('victim-secret')")
    assert r.json()["success"], r.text
    owner = await asyncpg.connect(_url(pg2, registered["db"]))
    try:
        seen = await owner.fetchval(f"SELECT v FROM {quote_ident('p_' + pid)}.secrets")
    except asyncpg.UndefinedTableError:
        seen = None
    finally:
        await owner.close()
    assert seen != "victim-secret"
    # Nor can the key open its cluster, at registration or afterwards.
    r = await api.http.patch(
        f"/api/admin/clusters/{registered['cid']}", json={"placement": "open"}, headers=mgmt
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.http.post(
        "/api/admin/clusters",
        json={"label": "again", "connectionString": _url(pg2, "postgres"), "placement": "open"},
        headers=mgmt,
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await api.http.get(f"/api/admin/clusters/{registered['cid']}", headers=mgmt)
    assert r.json()["cluster"]["placement"] == "closed", r.text


# -- 2. projects on a registered cluster ----------------------------------------------------------


async def test_a_management_key_cannot_repoint_a_cluster_that_holds_projects(
    inst: dict[str, Any],
    registered: dict[str, Any],
    on_two: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    """The projects living on a cluster follow its connection string: a key that sends a new one
    (a server whose authentication its holder controls) would receive their new writes. While
    projects live there, only an instance admin's session changes it."""
    owner = await asyncpg.connect(pg2.url)
    try:
        await owner.execute("CREATE DATABASE attacker_db2")
    finally:
        await owner.close()
    r = await inst["api"].http.patch(
        f"/api/admin/clusters/{registered['cid']}",
        json={"connectionString": _url(pg2, "attacker_db2")},
        headers=bearer(inst["mgmt"]),
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    r = await inst["api"].http.get(f"/api/admin/clusters/{registered['cid']}", headers=bearer(inst["mgmt"]))
    assert r.json()["cluster"]["connection"]["database"] == registered["db"]


async def test_the_mirror_row_and_other_keys_on_the_cluster(
    inst: dict[str, Any], on_two: dict[str, Any]
) -> None:
    """The tenant cannot read or forge the cluster's copy of fluxbase.projects; a key of
    another project (on the default cluster) does not open the cluster's project; a read key
    does not write there."""
    api: Api = inst["api"]
    pid, key = on_two["pid"], on_two["key"]
    for q in (
        "SELECT * FROM fluxbase.projects",
        f"UPDATE fluxbase.projects SET read_only = false WHERE id = '{pid}'",
        "SELECT * FROM fluxbase.api_keys",
    ):
        body = (await api.sql(key, pid, q)).json()
        assert body["success"] is False, (q, body)
    _user, token = await api.new_user()
    other = await api.new_project(token, "elsewhere")
    other_key = await api.new_key(token, other, "admin")
    r = await api.sql(other_key, pid, "SELECT 1")
    assert r.status_code in (401, 403, 404), r.text
    read_key = await api.new_key(on_two["token"], pid, "read")
    r = await api.sql(key, pid, "CREATE TABLE IF NOT EXISTS ro (v int)")
    assert r.json()["success"], r.text
    body = (await api.sql(read_key, pid, "INSERT INTO ro VALUES (1)")).json()
    assert body["success"] is False, body


async def test_an_end_user_session_ends_on_a_registered_cluster_too(
    inst: dict[str, Any], on_two: dict[str, Any]
) -> None:
    """End-user tokens are not served there yet (docs/clusters.md): whatever the first answer,
    a logged-out session must not open the project."""
    api: Api = inst["api"]
    pid = on_two["pid"]
    browser = await browser_key(api, SimpleNamespace(id=pid, owner_token=on_two["token"]))
    _uid, token = await end_user(api, pid)
    before = await sql(api, browser, pid, "SELECT 1 AS one", token)
    r = await api.http.post(f"/api/projects/{pid}/auth/logout", headers=bearer(token))
    assert r.status_code == 200, r.text
    after = await sql(api, browser, pid, "SELECT 1 AS one", token)
    assert after["success"] is False, (before, after)
    # Without a user token the browser key (requireUserAuth) opens nothing either.
    assert (await sql(api, browser, pid, "SELECT 1 AS one"))["success"] is False


STUBBORN = """CREATE FUNCTION stubborn() RETURNS void LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := pg_catalog.clock_timestamp();
BEGIN LOOP BEGIN PERFORM pg_catalog.pg_sleep(0.2);
EXCEPTION WHEN query_canceled THEN NULL; END;
EXIT WHEN pg_catalog.clock_timestamp() - t0 > interval '60 seconds'; END LOOP;
END $$"""


async def test_a_backend_on_a_registered_cluster_does_not_outlive_the_deadline(
    inst: dict[str, Any],
    registered: dict[str, Any],
    on_two: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
) -> None:
    api: Api = inst["api"]
    pid, key = on_two["pid"], on_two["key"]
    r = await api.sql(key, pid, STUBBORN)
    assert r.json()["success"], r.text
    t0 = time.monotonic()
    body = (await api.sql(key, pid, "SELECT stubborn()")).json()
    assert time.monotonic() - t0 < 10
    assert body["error"]["code"] == "QUERY_TIMEOUT", body
    await asyncio.sleep(3)
    observer = await asyncpg.connect(_url(pg2, registered["db"]))
    try:
        busy = await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE $1 AND state = 'active'", f"p_{pid}_%"
        )
        # Leave no runaway behind for the next tests.
        await observer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename LIKE $1", f"p_{pid}_%"
        )
    finally:
        await observer.close()
    assert busy == 0, f"{busy} backend(s) of the project still running {3 + DEADLINE_MS / 1000:.1f} s after"


async def test_the_database_quota_holds_on_a_registered_cluster(
    inst: dict[str, Any], on_two: dict[str, Any]
) -> None:
    """The cap an instance admin sets on the control plane applies to a project whose data is on
    another server."""
    api: Api = inst["api"]
    pid, key = on_two["pid"], on_two["key"]
    assert (await api.sql(key, pid, "CREATE TABLE blob (v text)")).json()["success"]
    r = await api.http.patch(
        f"/api/admin/projects/{pid}/quotas", json={"databaseBytes": 1}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 200 and r.json()["quotas"]["databaseBytes"] == 1, r.text
    try:
        r = await api.sql(key, pid, "INSERT INTO blob SELECT repeat('x', 1000) FROM generate_series(1, 250)")
        assert_error(r, 413, "DATABASE_QUOTA_EXCEEDED")
    finally:
        await api.http.patch(
            f"/api/admin/projects/{pid}/quotas", json={"databaseBytes": None}, headers=bearer(inst["admin"])
        )


async def test_a_registered_cluster_cannot_speak_for_another_clusters_project(
    inst: dict[str, Any],
    registered: dict[str, Any],
    pg2: EmbeddedPostgres,  # noqa: F811
    rt: str,
) -> None:
    api: Api = inst["api"]
    r = await api.http.post(
        "/api/projects", json={"name": "on default", "clusterId": "default"}, headers=bearer(inst["admin"])
    )
    assert r.status_code == 201, r.text
    victim = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], victim, "admin")
    got: list[dict[str, Any]] = []
    async with connect(rt + key) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{victim}"}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["type"] == "subscribed", first
        owner = await asyncpg.connect(_url(pg2, registered["db"]))
        try:
            await owner.execute(
                """INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
                   VALUES ($1, 'row', 'accounts', 'UPDATE', '{"id": 1, "balance": 1000000}')""",
                victim,
            )
        finally:
            await owner.close()
        with contextlib.suppress(TimeoutError):
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if msg["type"] == "db_event":
                    got.append(msg)
    assert got == [], got
