"""No platform privilege reachable from tenant code (issue 15, finding 1; DESIGN "Privilege model").

A tenant-defined cast is called by to_jsonb(); event capture, exports and schema listings must
only ever call it with a tenant role's rights. The tenant's own function records who it runs as.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import asyncpg

from fluxbase.db.extensions import CATALOG
from support import RUNTIME_ROLE, Api, bearer

SETUP = [
    "CREATE TYPE mood AS ENUM ('ok', 'bad')",
    "CREATE TYPE mood2 AS ENUM ('x', 'y')",
    "CREATE TABLE spy_log (at text, cu text, su text, cu_super boolean, su_super boolean)",
    # The tenant's cast functions: each records the roles it runs as, then converts.
    """CREATE FUNCTION spy(m mood) RETURNS json LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO p_{pid}.spy_log SELECT 'json', current_user, session_user,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
            (SELECT rolsuper FROM pg_roles WHERE rolname = session_user);
        RETURN to_json(m::text);
    END $$""",
    "CREATE CAST (mood AS json) WITH FUNCTION spy(mood)",
    """CREATE FUNCTION spyb(m mood2) RETURNS jsonb LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO p_{pid}.spy_log SELECT 'jsonb', current_user, session_user,
            (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
            (SELECT rolsuper FROM pg_roles WHERE rolname = session_user);
        RETURN to_jsonb(m::text);
    END $$""",
    "CREATE CAST (mood2 AS jsonb) WITH FUNCTION spyb(mood2)",
    "CREATE TYPE pair AS (m mood, n int)",
    "CREATE TABLE t (id int PRIMARY KEY, m mood, m2 mood2, p pair)",
]


async def _ok(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    body = r.json()
    assert body["success"], (query, r.text)
    return body


async def _log(control_db: asyncpg.Pool, pid: str) -> list[asyncpg.Record]:
    async with control_db.acquire() as conn:
        return list(await conn.fetch(f'SELECT * FROM "p_{pid}".spy_log'))


def _assert_tenant_only(rows: list[asyncpg.Record], pid: str) -> None:
    assert rows, "the tenant's cast function never ran: the test would prove nothing"
    for r in rows:
        assert r["cu"].startswith(f"p_{pid}_"), dict(r)
        assert r["su"].startswith(f"p_{pid}_"), dict(r)
        assert r["cu_super"] is False and r["su_super"] is False, dict(r)


async def test_tenant_cast_in_captured_rows_runs_as_the_tenant(api: Api, project, control_db) -> None:
    pid, admin = project.id, project.admin_key
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    for q in SETUP:
        await _ok(api, admin, pid, q.replace("{pid}", pid))
    await _ok(api, admin, pid, "INSERT INTO t VALUES (1, 'ok', 'x', ROW('bad', 1)), (2, 'bad', 'y', NULL)")
    await _ok(api, rw, pid, "INSERT INTO t VALUES (3, 'ok', 'y', ROW('ok', 3))")
    await _ok(api, rw, pid, "UPDATE t SET m = 'bad', m2 = 'x', p = ROW('ok', 2) WHERE id IN (1, 3)")
    await _ok(api, admin, pid, "DELETE FROM t WHERE id = 2")
    # The DDL path: a table created (and captured) by CREATE TABLE AS, then written.
    await _ok(api, admin, pid, "CREATE TABLE t2 AS SELECT 1 AS id, 'ok'::mood AS m, ROW('bad', 1)::pair AS p")
    await _ok(api, admin, pid, "INSERT INTO t2 VALUES (2, 'bad', ROW('ok', 2))")
    await _ok(api, admin, pid, "ALTER TABLE t2 ADD COLUMN m2 mood2 DEFAULT 'y'")
    await _ok(api, rw, pid, "UPDATE t2 SET m = 'ok'")

    rows = await _log(control_db, pid)
    _assert_tenant_only(rows, pid)
    # PostgreSQL 18's to_jsonb() calls a type's cast to json (a cast to jsonb it ignores, but
    # should a version use it, the rows above say as whom it ran).
    assert "json" in {r["at"] for r in rows}
    # Capture still works: every change has its event, built with the tenant's cast.
    async with control_db.acquire() as conn:
        events = await conn.fetch(
            "SELECT table_name, operation, record, old FROM fluxbase.events "
            "WHERE project_id = $1 AND kind = 'row' AND table_name IN ('t', 't2') ORDER BY xid, id",
            pid,
        )
    ops = [(e["table_name"], e["operation"]) for e in events]
    assert ops.count(("t", "INSERT")) == 3 and ops.count(("t", "UPDATE")) == 2
    assert (
        ops.count(("t", "DELETE")) == 1
        and ops.count(("t2", "INSERT")) == 1
        and ops.count(("t2", "UPDATE")) == 2
    )
    assert '"bad"' in events[0]["record"]


async def test_export_and_schema_listing_run_as_the_tenant(api: Api, project, control_db) -> None:
    pid, admin = project.id, project.admin_key
    for q in SETUP:
        await _ok(api, admin, pid, q.replace("{pid}", pid))
    await _ok(api, admin, pid, "INSERT INTO t VALUES (1, 'ok', 'x', ROW('bad', 1))")
    await _ok(api, admin, pid, "TRUNCATE spy_log")
    # A default and a view that call the tenant's cast, too.
    await _ok(api, admin, pid, "CREATE VIEW v AS SELECT id, to_jsonb(m) AS j FROM t")
    r = await api.http.get("/api/schema", params={"projectId": pid}, headers=bearer(admin))
    assert r.status_code == 200, r.text
    r = await api.http.get(f"/api/projects/{pid}/export", headers=bearer(admin))
    assert r.status_code == 200, r.text
    assert b"CREATE CAST" in r.content or b"spy" in r.content
    await _ok(api, admin, pid, "SELECT * FROM v")
    _assert_tenant_only(await _log(control_db, pid), pid)


async def test_outbox_cannot_be_forged_by_calling_the_writer(api: Api, project, control_db) -> None:
    """The definers that write the outbox refuse direct calls: read/readwrite end users cannot
    forge row or schema events, and nobody can write another project's events."""
    pid, admin = project.id, project.admin_key
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    other = await api.new_project(project.owner_token)
    await _ok(api, admin, pid, "CREATE TABLE items (id int PRIMARY KEY)")
    async with control_db.acquire() as conn:
        await conn.execute(f'CREATE TABLE "p_{other}".items (id int)')
        theirs = await conn.fetchval(f"SELECT 'p_{other}.items'::regclass::oid")
    before = await _event_count(control_db, pid), await _event_count(control_db, other)
    row = "ARRAY['{{\"id\": 666}}'::jsonb]"
    forged = [
        (rw, f"SELECT fluxbase_capture.write_events('p_{pid}.items', 'INSERT', {row}, NULL)"),
        (admin, f"SELECT fluxbase_capture.write_events('p_{pid}.items', 'INSERT', {row}, NULL)"),
        (admin, f"SELECT fluxbase_capture.write_events({theirs}, 'DELETE', {row}, {row})"),
        (rw, f"SELECT fluxbase_capture.write_schema_event('p_{pid}', 'items', 'DROP TABLE', '{{}}')"),
        (admin, f"SELECT fluxbase_capture.write_schema_event('p_{other}', NULL, 'DROP TABLE', '{{}}')"),
        (rw, "SELECT fluxbase.ring_doorbell()"),
        (rw, "INSERT INTO fluxbase.events (project_id, kind, operation) VALUES ('x', 'row', 'INSERT')"),
    ]
    for key, q in forged:
        r = await api.sql(key, pid, q.replace("{{", "{").replace("}}", "}"))
        assert r.json()["success"] is False, (q, r.text)
    # Nor through a trigger of its own table: the writer checks the table is the caller's.
    await _ok(
        api,
        admin,
        pid,
        f"""CREATE FUNCTION forge() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            PERFORM fluxbase_capture.write_events({theirs}, 'INSERT', ARRAY['{{}}'::jsonb], NULL);
            RETURN NULL; END $$""".replace("{{}}", "{}"),
    )
    await _ok(
        api, admin, pid, "CREATE TRIGGER forge AFTER INSERT ON items FOR EACH ROW EXECUTE FUNCTION forge()"
    )
    r = await api.sql(rw, pid, "INSERT INTO items VALUES (1)")
    assert r.json()["success"] is False, r.text
    assert (await _event_count(control_db, pid), await _event_count(control_db, other)) == before


async def _event_count(control_db: asyncpg.Pool, pid: str) -> int:
    async with control_db.acquire() as conn:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM fluxbase.events "
                "WHERE project_id = $1 AND (kind = 'row' OR operation = 'DROP TABLE')",
                pid,
            )
        )


# Every platform SECURITY DEFINER function, its owner, and everything that owner may do in the
# database (table and column privileges, function EXECUTE beyond PUBLIC's, schema USAGE).
DEFINERS = {
    "fluxbase_capture.write_events(regclass,text,jsonb[],jsonb[])": "fluxbase_outbox_writer",
    "fluxbase_capture.write_schema_event(text,text,text,jsonb)": "fluxbase_outbox_writer",
    "fluxbase_capture.capture_disabled(text)": "fluxbase_outbox_writer",
    "fluxbase_guard.check_key(bytea,text)": "fluxbase_guard_keys",
    "fluxbase_guard.check_user_session(text,text,text)": "fluxbase_guard_keys",
    "fluxbase_guard.redeem_migration(bytea)": "fluxbase_guard_migrations",
    "fluxbase_guard.check_db_quota()": "fluxbase_guard_quota",
    "fluxbase_guard.own_column_default(oid,smallint)": "fluxbase_catalog_own",
    "fluxbase_guard.own_constraint_def(oid)": "fluxbase_catalog_own",
    "fluxbase_guard.own_index_def(oid)": "fluxbase_catalog_own",
    "fluxbase_guard.own_policy_expr(oid,boolean)": "fluxbase_catalog_own",
    "fluxbase.refuse_routine_settings()": "fluxbase_catalog_own",
    "fluxbase_guard.create_extension(text,boolean)": "fluxbase_guard_extensions",
    "fluxbase_guard.drop_extensions(text[],boolean,boolean)": "fluxbase_guard_extensions",
    "fluxbase_guard.forget_extensions(text)": "fluxbase_guard_extensions",
    "realtime.broadcast(text,jsonb,text)": "fluxbase_guard_broadcast",
}
ALLOWED = {
    "fluxbase_outbox_writer": {
        "USAGE schema fluxbase",
        "INSERT fluxbase.events",
        "SELECT fluxbase.event_readers(waiting)",
        "SELECT fluxbase.readers_waiting_hint",  # the doorbell's hint (sql/0052)
        "SELECT fluxbase.realtime_tables(project_id)",
        "SELECT fluxbase.realtime_tables(table_name)",
        "SELECT fluxbase.realtime_tables(enabled)",
    },
    "fluxbase_guard_keys": {
        "USAGE schema fluxbase",
        *(f"SELECT fluxbase.api_keys({c})" for c in ("key_hash", "project_id", "revoked_at", "expires_at")),
        *(f"SELECT fluxbase.projects({c})" for c in ("id", "status", "read_only")),
        *(f"SELECT fluxbase.project_user_sessions({c})" for c in ("id", "user_id", "revoked_at")),
        *(f"SELECT fluxbase.project_users({c})" for c in ("id", "project_id", "disabled_at")),
    },
    "fluxbase_guard_migrations": {
        "USAGE schema fluxbase",
        "USAGE schema fluxbase_guard",
        "SELECT fluxbase.migration_tickets",
        "DELETE fluxbase.migration_tickets",
        "INSERT fluxbase.project_migrations",
        "EXECUTE fluxbase_guard.tenant_project()",
    },
    "fluxbase_guard_quota": {
        "USAGE schema fluxbase",
        "USAGE schema fluxbase_guard",
        "SELECT fluxbase.projects(id)",
        "SELECT fluxbase.projects(db_quota_bytes)",
        "EXECUTE fluxbase_guard.tenant_project()",
        "EXECUTE fluxbase_guard.schema_size(text)",
        # Schema sizes count function bodies, comments, rules ... of the project (sql/0020).
        "MEMBER OF fluxbase_catalog_reader",
        # The project's outbox bytes (sql/0022).
        *(f"SELECT fluxbase.events({c})" for c in ("project_id", "xid", "kind", "operation", "bytes")),
        "EXECUTE fluxbase_guard.outbox_bytes(text)",
        "SELECT fluxbase.outbox_usage",
        "SELECT fluxbase.outbox_usage_mark",
    },
    # Deparses a project's own defaults, constraints, indexes and policies for it (sql/0021).
    "fluxbase_catalog_own": {
        "USAGE schema fluxbase_guard",
        "EXECUTE fluxbase_guard.caller_schema()",
        "MEMBER OF fluxbase_catalog_reader",
    },
    # Grants USAGE on the extension schemas (sql/0023): it holds that with grant option, reads
    # the allow-list and writes which project installed what.
    "fluxbase_guard_extensions": {
        "USAGE schema fluxbase",
        "USAGE schema fluxbase_guard",
        *(
            f"SELECT fluxbase.extensions({c})"
            for c in ("name", "schema_name", "requires", "available", "position")
        ),
        "SELECT fluxbase.project_extensions",
        "INSERT fluxbase.project_extensions",
        "DELETE fluxbase.project_extensions",
        "EXECUTE fluxbase_guard.tenant_project()",
        "EXECUTE fluxbase_guard.allowed_extensions()",
        "EXECUTE fluxbase_guard.extension_grant(text,text,boolean)",
        # extension_grant names the schema's group from the database's stored prefix (sql/0051).
        "SELECT fluxbase.tenant_group_prefix",
        *(f"USAGE schema {o.schema}" for o in CATALOG),
    },
    # Broadcast from SQL (sql/0036): the calling project's status and topic rules, the outbox.
    "fluxbase_guard_broadcast": {
        "USAGE schema fluxbase",
        "INSERT fluxbase.events",
        # sql/0042: the broadcast budget counts the transaction's own broadcast rows.
        "SELECT fluxbase.events(xid)",
        "SELECT fluxbase.events(kind)",
        "SELECT fluxbase.event_readers(waiting)",
        *(f"SELECT fluxbase.projects({c})" for c in ("id", "status", "read_only")),
        *(f"SELECT fluxbase.realtime_settings({c})" for c in ("project_id", "topics")),
    },
}

_PRIVILEGES_SQL = """
SELECT a.privilege_type || ' ' || c.oid::regclass::text
FROM pg_class c, aclexplode(c.relacl) a WHERE a.grantee = $1::regrole
UNION ALL
SELECT a.privilege_type || ' ' || c.oid::regclass::text || '(' || att.attname || ')'
FROM pg_attribute att JOIN pg_class c ON c.oid = att.attrelid, aclexplode(att.attacl) a
WHERE a.grantee = $1::regrole
UNION ALL
SELECT a.privilege_type || ' ' || p.oid::regprocedure::text
FROM pg_proc p, aclexplode(p.proacl) a WHERE a.grantee = $1::regrole AND p.proowner <> $1::regrole
UNION ALL
SELECT a.privilege_type || ' schema ' || n.nspname
FROM pg_namespace n, aclexplode(n.nspacl) a WHERE a.grantee = $1::regrole
UNION ALL
SELECT 'OWNS ' || c.oid::regclass::text FROM pg_class c WHERE c.relowner = $1::regrole
UNION ALL
SELECT 'MEMBER OF ' || m.roleid::regrole::text FROM pg_auth_members m WHERE m.member = $1::regrole
UNION ALL
SELECT a.privilege_type || ' database ' || d.datname
FROM pg_database d, aclexplode(d.datacl) a WHERE a.grantee = $1::regrole AND d.datname = current_database()
"""


async def test_catalog_definer_functions_are_owned_by_narrow_roles(control_db, instance) -> None:
    """Fails if any SECURITY DEFINER function is owned by a superuser or a role with more than it
    needs, or does not pin search_path; and if the platform's roles are not what they must be."""
    async with control_db.acquire() as conn:
        funcs = await conn.fetch(
            """SELECT p.oid::regprocedure::text AS sig, n.nspname, pg_get_userbyid(p.proowner) AS owner,
                      p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
               WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 -- the platform's, not what tenants of the shared test instance defined
                 AND pg_get_userbyid(p.proowner) !~ '^p_[0-9a-f]{16}_'"""
        )
        found = {}
        for f in funcs:
            sig = f["sig"].replace(", ", ",")
            sig = sig if "." in sig.split("(")[0] else f"{f['nspname']}.{sig}"
            found[sig] = f["owner"]
            paths = [c[len("search_path=") :] for c in f["proconfig"] or [] if c.startswith("search_path=")]
            assert paths, f"{sig} does not pin search_path"
            # pg_temp last: unlisted, it is searched first for types (the pg_temp test below).
            assert paths[0].replace(" ", "").split(",")[-1] == "pg_temp", (sig, paths)
        assert found == DEFINERS, "SECURITY DEFINER functions differ from the allow-map (db/privileges.py)"
        for role, allowed in ALLOWED.items():
            r = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", role)
            assert r is not None, role
            for attr in (
                "rolsuper",
                "rolcanlogin",
                "rolcreaterole",
                "rolcreatedb",
                "rolreplication",
                "rolbypassrls",
            ):
                assert r[attr] is False, (role, attr)
            held = {row[0] for row in await conn.fetch(_PRIVILEGES_SQL, role)}
            if role == "fluxbase_catalog_own":  # USAGE on every project schema, and only that there
                held = {h for h in held if not re.fullmatch(r"USAGE schema p_[0-9a-f]{16}", h)}
            if role == "fluxbase_guard_extensions":
                # The extension schemas' tenant groups (sql/0046; every database's, roles being
                # cluster-wide): ADMIN only, to grant them to project roles, never their USAGE.
                ext_group = r"MEMBER OF fluxbase_tenant_[0-9a-f]{12}_ext_[0-9a-f]{8}"
                assert any(re.fullmatch(ext_group, h) for h in held), sorted(held)
                held = {h for h in held if not re.fullmatch(ext_group, h)}
                assert not await conn.fetchval(
                    """SELECT count(*) FROM pg_auth_members m WHERE m.member = $1::regrole
                         AND (m.inherit_option OR m.set_option OR NOT m.admin_option)""",
                    role,
                )
            assert held <= allowed, (role, sorted(held - allowed))
        # The control plane's owner: NOLOGIN, not a superuser, member of nothing.
        owner = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = 'fluxbase_owner'")
        assert owner is not None and not owner["rolsuper"] and not owner["rolcanlogin"]
        assert not owner["rolcreaterole"] and not owner["rolbypassrls"]
        assert not [
            row[0]
            for row in await conn.fetch(_PRIVILEGES_SQL, "fluxbase_owner")
            if row[0].startswith("MEMBER")
        ]
        wrong_owner = await conn.fetch(
            """SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname IN ('fluxbase', 'fluxbase_guard', 'fluxbase_capture', 'auth')
                 AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
                 AND pg_get_userbyid(c.relowner) <> 'fluxbase_owner'"""
        )
        assert not wrong_owner, wrong_owner
    # The runtime login role (what api, realtime and worker log in as) is not a superuser.
    runtime = instance.env["FLUXBASE_DATABASE_URL"].split("//", 1)[1].split(":", 1)[0]
    async with control_db.acquire() as conn:
        r = await conn.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", runtime)
        assert r is not None and r["rolcanlogin"] and not r["rolsuper"] and not r["rolbypassrls"]
        assert not r["rolcreatedb"] and not r["rolreplication"]
        active = await conn.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'fluxbase-control'"
        )
        assert {a["usename"] for a in active} <= {runtime}


async def test_runtime_refuses_a_superuser(spawn, stack, log_dir) -> None:
    """Started with a superuser as its runtime URL, the API refuses with a clear message."""

    from fluxbase.devstack.procs import free_port
    from support import run_service

    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(dbname, FLUXBASE_API_PORT=str(port), FLUXBASE_DATABASE_URL=stack.database_url(dbname))
    try:
        try:
            with run_service(["api"], env, port, log_dir):
                raise AssertionError("the API started as a superuser")
        except RuntimeError as exc:
            assert "superuser" in str(exc) and "FLUXBASE_DATABASE_ALLOW_SUPERUSER" in str(exc)
        # The development override.
        with run_service(
            ["api"], {**env, "FLUXBASE_DATABASE_ALLOW_SUPERUSER": "true"}, port, log_dir
        ) as server:
            client = Api(server.url)
            try:
                assert (await client.http.get("/ready")).status_code == 200
            finally:
                await client.close()
    finally:
        with contextlib.suppress(Exception):
            await stack.drop_database(dbname)


async def test_projects_provisioned_by_a_superuser_are_adopted(api: Api, instance, control_db) -> None:
    """A project made before the runtime role existed (by a superuser runtime) keeps working,
    and the non-superuser runtime can delete it, after the post-migration step adopts its roles."""
    from fluxbase.config import load_settings
    from fluxbase.db.migrate import migrate_database
    from fluxbase.services import projects

    settings = load_settings(instance.env)
    user, token = await api.new_user()
    legacy = await projects.create_project(control_db, settings, user["id"], "legacy")  # as superuser
    await migrate_database(settings)
    key = await api.new_key(token, legacy.id, "admin")
    await _ok(api, key, legacy.id, "CREATE TABLE t (id int)")
    await _ok(api, key, legacy.id, "INSERT INTO t VALUES (1)")
    r = await api.http.delete(f"/api/projects/{legacy.id}", headers=bearer(token))
    assert r.status_code in (200, 204), r.text
    async with control_db.acquire() as conn:
        left = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{legacy.id}_%")
        assert not left, left
        assert not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", f"p_{legacy.id}")


async def test_temporary_types_cannot_hijack_definer_functions(api: Api, project) -> None:
    """A type a tenant creates in its temporary schema (pg_temp.text, a domain whose CHECK calls
    the tenant's function) is found before pg_catalog's unless search_path lists pg_temp last:
    every `text` in a definer's body would then run the tenant's function with the owner's
    rights. The spy raises with the role it runs as; each vector is followed by a statement that
    runs it as the tenant, so the batch fails naming who ran it first (or the vector refuses on
    its own, having run nothing of the tenant's)."""
    pid, admin = project.id, project.admin_key
    await _ok(
        api,
        admin,
        pid,
        """CREATE FUNCTION spy_text(v pg_catalog.text) RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'spy as % / %', current_user, session_user; END $$""",
    )
    await _ok(api, admin, pid, "CREATE TABLE items (id int)")
    domain = f"CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (p_{pid}.spy_text(VALUE))"
    vectors = [
        "SELECT fluxbase_guard.check_db_quota()",  # plpgsql: `pid text`
        "CREATE TABLE items2 (id int)",  # DDL path: capture_disabled, write_schema_event
        "INSERT INTO items VALUES (1)",  # write_events
        "SELECT fluxbase_guard.check_key('\\x00'::bytea, 'x')",
        "SELECT fluxbase_guard.check_user_session('s', 'u', 'p')",
        "SELECT fluxbase_guard.redeem_migration('\\x00'::bytea)",
    ]
    for vector in vectors:
        r = await api.http.post(
            "/api/execute-batch",
            json={
                "projectId": pid,
                "statements": [{"query": domain}, {"query": vector}, {"query": "SELECT 'x'::pg_temp.text"}],
            },
            headers=bearer(admin),
        )
        text = r.text
        if "spy as" not in text:  # the vector refused on its own (a bogus key, ticket, session)
            assert r.json()["error"]["statementIndex"] == 1, (vector, text)
            continue
        who = text.split("spy as ", 1)[1].split(" / ", 1)[0]
        assert who.startswith(f"p_{pid}_"), (vector, text)


async def test_migrate_without_a_superuser(stack, instance) -> None:
    """With only the runtime URL, `fluxbase migrate` has nothing it may do: it succeeds when
    nothing is pending and refuses, saying what to set, when something is."""
    import subprocess
    import sys

    from support import ROOT

    def migrate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in env.items() if k != "FLUXBASE_MIGRATION_DATABASE_URL"}
        return subprocess.run(
            [sys.executable, "-m", "fluxbase", "migrate"], env=env, cwd=ROOT, capture_output=True, text=True
        )

    done = await asyncio.to_thread(migrate, instance.env)
    assert done.returncode == 0, done.stderr
    fresh = await stack.create_database()
    try:
        conn = await asyncpg.connect(stack.database_url(fresh))
        try:
            await conn.execute(f'GRANT CONNECT ON DATABASE "{fresh}" TO {RUNTIME_ROLE}')
        finally:
            await conn.close()
        pending = await asyncio.to_thread(migrate, stack.env(fresh))
        assert pending.returncode != 0
        assert "FLUXBASE_MIGRATION_DATABASE_URL" in pending.stderr, pending.stderr
        assert "Traceback" not in pending.stderr, pending.stderr
    finally:
        await stack.drop_database(fresh)
