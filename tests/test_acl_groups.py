"""Tenant groups (issue 19): the ACLs outside a project's schema do not grow with projects.

Every project role used to hold its own entries in the database's ACL (CONNECT, TEMPORARY),
set_config's, plpgsql's and the realtime checker functions': 40 034 entries on the database at
10 000 projects, detoasted at every connection start and rewritten by every grant. They are held
by a few NOLOGIN groups per database (db/privileges.GROUP_PRIVILEGES) that each project role is
granted WITH INHERIT TRUE, SET FALSE. Who may do what is unchanged; the groups give a tenant
nothing it could use against another tenant."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from fluxbase.db.privileges import GROUP_PRIVILEGES, tenant_group, tenant_groups
from fluxbase.security.roles import role_password
from support import Api, bearer

# Entries naming project roles in the shared ACLs, per object (none once on groups).
_ENTRIES = """
WITH objs AS (
    SELECT 'database' AS obj, datacl AS acl FROM pg_database WHERE datname = current_database()
    UNION ALL SELECT 'plpgsql', lanacl FROM pg_language WHERE lanname = 'plpgsql'
    UNION ALL SELECT p.oid::regprocedure::text, p.proacl FROM pg_proc p
    WHERE p.oid IN ('pg_catalog.set_config(text,text,boolean)'::regprocedure,
                    'fluxbase_guard.checker_role_ok(text,text)'::regprocedure,
                    'fluxbase_guard.scope_policies(text,text[],text)'::regprocedure,
                    'fluxbase_guard.visible_rows_as(text,text,text[],text[],text[],text[],text[])'::regprocedure)
)
SELECT o.obj, count(x.grantee) FILTER (WHERE g.rolname ~ '^p_[0-9a-f]{16}_') AS tenant,
       count(x.grantee) AS total
FROM objs o LEFT JOIN LATERAL aclexplode(o.acl) x ON true LEFT JOIN pg_roles g ON g.oid = x.grantee
GROUP BY o.obj ORDER BY o.obj
"""

# What each project role may do outside its schema (kept exactly as before the groups).
_MAY = """SELECT has_database_privilege($1, current_database(), 'CONNECT') AS connect,
                 has_database_privilege($1, current_database(), 'TEMPORARY') AS temporary,
                 has_database_privilege($1, current_database(), 'CREATE') AS create,
                 has_function_privilege($1, 'pg_catalog.set_config(text,text,boolean)', 'EXECUTE')
                   AS set_config,
                 has_language_privilege($1, 'plpgsql', 'USAGE') AS plpgsql,
                 has_function_privilege($1, 'fluxbase_guard.checker_role_ok(text,text)', 'EXECUTE')
                   AS checker"""
_EXPECTED = {
    "admin": dict(connect=True, temporary=True, create=False, set_config=True, plpgsql=True, checker=False),
    "rw": dict(connect=True, temporary=False, create=False, set_config=False, plpgsql=False, checker=False),
    "ro": dict(connect=True, temporary=False, create=False, set_config=False, plpgsql=False, checker=False),
    "rt": dict(connect=True, temporary=False, create=False, set_config=True, plpgsql=False, checker=True),
    # the export role inherits the admin role (tenancy/provision.ensure_export_role)
    "ex": dict(connect=True, temporary=True, create=False, set_config=True, plpgsql=True, checker=False),
}


async def _entries(control_db: asyncpg.Pool) -> dict[str, tuple[int, int]]:
    return {r["obj"]: (r["tenant"], r["total"]) for r in await control_db.fetch(_ENTRIES)}


async def _ok(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    assert r.json()["success"], (query, r.text)
    return dict(r.json())


async def test_acl_entries_do_not_grow_with_projects(api: Api, control_db) -> None:
    """Three more projects (and an export role) add no entry to the database's, set_config's,
    plpgsql's or the checker functions' ACLs; each role may still do exactly what it could."""
    _, token = await api.new_user()
    first = await api.new_project(token, "first")
    before = await _entries(control_db)
    pids = [await api.new_project(token, f"p{i}") for i in range(3)]
    r = await api.http.get(f"/api/projects/{pids[0]}/export", headers=bearer(token))
    assert r.status_code == 200, r.text[:300]
    after = await _entries(control_db)
    assert after == before, (before, after)
    assert all(tenant == 0 for tenant, _ in after.values()), after
    for pid in [first, *pids]:
        for suffix, expected in _EXPECTED.items():
            role = f"p_{pid}_{suffix}"
            if suffix == "ex" and pid != pids[0]:
                continue
            row = await control_db.fetchrow(_MAY, role)
            assert dict(row) == expected, (role, dict(row))
    # The roles' keys work: connecting, temporary objects and plpgsql for the admin only.
    admin = await api.new_key(token, pids[1], "admin")
    await _ok(api, admin, pids[1], "CREATE TEMP TABLE tt (v int)")
    await _ok(api, admin, pids[1], "DO $$ BEGIN PERFORM 1; END $$")
    rw = await api.new_key(token, pids[1], "readwrite")
    r = await api.sql(rw, pids[1], "DO $$ BEGIN PERFORM 1; END $$")
    assert not r.json()["success"], r.text


async def test_groups_are_per_database_and_hold_only_their_privileges(stack, control_db) -> None:
    """Roles are cluster-wide, database privileges are not: another database's groups hold no
    privilege here (a tenant there may not connect here), and the groups log in as nobody."""
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    for kind in GROUP_PRIVILEGES:
        row = await control_db.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", tenant_group(h, kind))
        assert row is not None, kind
        assert not row["rolcanlogin"] and not row["rolsuper"] and not row["rolcreaterole"], dict(row)
        assert not row["rolinherit"] and not row["rolbypassrls"] and not row["rolcreatedb"], dict(row)
    # The groups that may connect here are this database's, and each tenant group of the server
    # may connect to one database only (its own).
    rows = await control_db.fetch(
        """SELECT g.rolname, array_agg(d.datname ORDER BY d.datname) AS dbs
           FROM pg_database d, aclexplode(d.datacl) x JOIN pg_roles g ON g.oid = x.grantee
           WHERE g.rolname LIKE 'fluxbase\\_tenant\\_%' AND x.privilege_type = 'CONNECT'
           GROUP BY 1"""
    )
    db = await control_db.fetchval("SELECT current_database()")
    assert sorted(r["rolname"] for r in rows if db in r["dbs"]) == sorted(tenant_groups(h)), rows
    for r in rows:
        assert len(r["dbs"]) == 1, dict(r)


async def _login(stack, instance, role: str) -> asyncpg.Connection:
    dbname = instance.env["FLUXBASE_MIGRATION_DATABASE_URL"].rsplit("/", 1)[1]
    from urllib.parse import urlsplit

    u = urlsplit(stack.database_url(dbname))
    return await asyncpg.connect(
        host=u.hostname,
        port=u.port,
        database=dbname,
        user=role,
        password=role_password(stack.secret_key, role),
    )


@pytest.mark.parametrize("suffix", ["admin", "rw"])
async def test_a_tenant_cannot_become_grant_alter_or_use_its_group(
    api: Api, stack, instance, control_db, suffix: str
) -> None:
    """Logged in as its own role (no API classifier in between): it may not SET ROLE to any
    tenant group, grant one to another role (its own project's or another's), alter, rename or
    drop one, make one own an object, or revoke a group's privileges; its membership gives it
    nothing of another project's."""
    _, token = await api.new_user()
    pid, other = await api.new_project(token, "a"), await api.new_project(token, "b")
    db = await control_db.fetchval("SELECT current_database()")
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    key = await api.new_key(token, pid, "admin")
    await _ok(api, key, pid, "CREATE TABLE mine (v int)")
    okey = await api.new_key(token, other, "admin")
    await _ok(api, okey, other, "CREATE TABLE theirs (v int)")
    await _ok(api, okey, other, "INSERT INTO theirs VALUES (42)")
    conn = await _login(stack, instance, f"p_{pid}_{suffix}")
    try:
        for kind in GROUP_PRIVILEGES:
            g = tenant_group(h, kind)
            attempts = [
                f"SET ROLE {g}",
                f"SELECT set_config('role', '{g}', false)",
                f"GRANT {g} TO p_{other}_ro",
                f"GRANT {g} TO p_{pid}_ro WITH INHERIT TRUE",
                f"GRANT {g} TO CURRENT_USER WITH SET TRUE",
                f"REVOKE {g} FROM p_{other}_admin",
                f"ALTER ROLE {g} LOGIN",
                f"ALTER ROLE {g} RENAME TO evil",
                f"ALTER ROLE {g} SET search_path = evil",
                f"DROP ROLE {g}",
                f"ALTER TABLE p_{pid}.mine OWNER TO {g}",
                f"CREATE SCHEMA evil AUTHORIZATION {g}",
                f"SELECT * FROM p_{other}.theirs",
            ]
            for q in attempts:
                with pytest.raises(asyncpg.PostgresError):
                    async with conn.transaction():
                        await conn.execute(q)
            # What a holder of the group's privileges may run (or not): none of it takes the
            # group's privileges away from every other tenant, or gives it an object.
            for q in (
                f'REVOKE ALL ON DATABASE "{db}" FROM {g}',
                f"REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM {g}",
                f"REVOKE USAGE ON LANGUAGE plpgsql FROM {g}",
                f"DROP OWNED BY {g} CASCADE",
                f"REASSIGN OWNED BY {g} TO CURRENT_USER",
                f"REASSIGN OWNED BY CURRENT_USER TO {g}",
            ):
                try:
                    async with conn.transaction():
                        await conn.execute(q)
                except asyncpg.PostgresError:
                    pass
            got = await control_db.fetchrow(_MAY, g)
            privs = GROUP_PRIVILEGES[kind]
            assert got["connect"] and got["temporary"] == ("TEMPORARY" in privs[0]), (g, dict(got))
            assert (got["set_config"], got["plpgsql"], got["checker"]) == privs[1:], (g, dict(got))
            assert not got["create"], (g, dict(got))
            owner = await control_db.fetchval(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass($1)", f"p_{pid}.mine"
            )
            assert owner == f"p_{pid}_admin", owner
            assert not await control_db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relowner = $1::regrole)", g
            ), g
            assert await control_db.fetchval(
                "SELECT pg_has_role($1, $2, 'MEMBER')", f"p_{pid}_{suffix}", g
            ) == (g == tenant_group(h, "admin" if suffix == "admin" else "connect"))
            assert not await control_db.fetchval("SELECT pg_has_role($1, $2, 'SET')", f"p_{pid}_{suffix}", g)
        # Its group reaches no other project's role.
        for s in ("admin", "rw", "ro", "rt"):
            assert not await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", f"p_{other}_{s}")
    finally:
        await conn.close()
    # And through the API (plpgsql EXECUTE included) the same statements fail as well.
    g = tenant_group(h, "connect")
    for q in (f"SET ROLE {g}", f"DO $$ BEGIN EXECUTE 'GRANT {g} TO p_{other}_ro'; END $$"):
        r = await api.sql(key, pid, q)
        assert not r.json()["success"], (q, r.text)
    assert not await control_db.fetchval(
        "SELECT pg_has_role($1, $2, 'MEMBER')", f"p_{other}_ro", f"p_{pid}_admin"
    )


async def test_granting_to_a_group_shares_no_more_than_public(api: Api, control_db) -> None:
    """A tenant may grant its own objects to any role today, PUBLIC included (its schema's USAGE
    too): a grant to a tenant group (a subset of PUBLIC) opens nothing PUBLIC does not. Without
    such a grant of its own, no tenant reaches another's table through the groups."""
    _, token = await api.new_user()
    a, b = await api.new_project(token, "a"), await api.new_project(token, "b")
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    ka, kb = await api.new_key(token, a, "admin"), await api.new_key(token, b, "admin")
    await _ok(api, ka, a, "CREATE TABLE s (v int)")
    await _ok(api, ka, a, "INSERT INTO s VALUES (1)")
    read = f"SELECT * FROM p_{a}.s"
    assert not (await api.sql(kb, b, read)).json()["success"]
    g = tenant_group(h, "admin")
    await _ok(api, ka, a, f"GRANT SELECT ON s TO {g}")
    assert not (await api.sql(kb, b, read)).json()["success"]  # no USAGE on a's schema
    await _ok(api, ka, a, f"REVOKE SELECT ON s FROM {g}")
    # What a tenant could always do by itself: open its schema and table to PUBLIC.
    await _ok(api, ka, a, f"GRANT USAGE ON SCHEMA p_{a} TO PUBLIC")
    await _ok(api, ka, a, "GRANT SELECT ON s TO PUBLIC")
    assert (await api.sql(kb, b, read)).json()["success"]


async def test_existing_roles_are_moved_onto_the_groups(api: Api, instance, control_db) -> None:
    """An installation from before the groups: project roles with entries of their own, granted
    by their provisioner, by the runtime or by a superuser. The privilege step (`migrate`) makes
    each a member of its group and revokes those entries (each as its grantor), once; the project
    keeps working and can be deleted."""
    from fluxbase.config import load_settings
    from fluxbase.db.migrate import migrate_database
    from fluxbase.db.privileges import move_to_groups
    from fluxbase.tenancy.buckets import bucket_of
    from support import RUNTIME_ROLE

    settings = load_settings(instance.env)
    _, token = await api.new_user()
    pid = await api.new_project(token, "legacy")
    db = await control_db.fetchval("SELECT current_database()")
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    sc = "FUNCTION pg_catalog.set_config(text, text, boolean)"
    checker = (
        "fluxbase_guard.checker_role_ok(text, text), fluxbase_guard.scope_policies(text, text[], text), "
        "fluxbase_guard.visible_rows_as(text, text, text[], text[], text[], text[], text[])"
    )
    r = {s: f'"p_{pid}_{s}"' for s in ("admin", "rw", "ro", "rt")}
    await _ok(api, await api.new_key(token, pid, "admin"), pid, "CREATE EXTENSION IF NOT EXISTS pg_trgm")
    from fluxbase.db.privileges import extension_group

    async with control_db.acquire() as conn, conn.transaction():
        # The extension schema's USAGE as create_extension granted it before sql/0046.
        await conn.execute("SET LOCAL ROLE fluxbase_guard_extensions")
        await conn.execute(f"REVOKE {extension_group(h, 'ext_pg_trgm')} FROM {', '.join(r.values())}")
        await conn.execute(f"GRANT USAGE ON SCHEMA ext_pg_trgm TO {', '.join(r.values())}")
        await conn.execute("RESET ROLE")
        for kind in GROUP_PRIVILEGES:
            await conn.execute(f"REVOKE {tenant_group(h, kind)} FROM {', '.join(r.values())}")
        # What provisioning granted before the groups, by whom it may have been granted.
        await conn.execute(f'SET LOCAL ROLE "{bucket_of(pid)}"')
        await conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{db}" TO {r["admin"]}')
        await conn.execute(f"GRANT EXECUTE ON {sc} TO {r['admin']}")
        await conn.execute(f"GRANT USAGE ON LANGUAGE plpgsql TO {r['admin']}")
        await conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{db}" TO {r["rw"]}')  # before review 2
        await conn.execute(f"SET LOCAL ROLE {RUNTIME_ROLE}")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO {r["rt"]}')
        await conn.execute(f"GRANT EXECUTE ON {sc}, {checker} TO {r['rt']}")
        await conn.execute("RESET ROLE")
        await conn.execute(f'GRANT CONNECT ON DATABASE "{db}" TO {r["ro"]}')
    legacy = {k: v for k, v in (await _entries(control_db)).items() if v[0]}
    assert legacy["database"][0] == 6 and legacy["plpgsql"][0] == 1, legacy
    trgm = "SELECT nspacl::text FROM pg_namespace WHERE nspname = 'ext_pg_trgm'"
    assert f"p_{pid}_ro" in await control_db.fetchval(trgm)
    await migrate_database(settings)
    assert all(tenant == 0 for tenant, _ in (await _entries(control_db)).values())
    assert "p_" not in await control_db.fetchval(trgm)
    for s in r:
        assert await control_db.fetchval(
            "SELECT has_schema_privilege($1, 'ext_pg_trgm', 'USAGE')", f"p_{pid}_{s}"
        ), s
    for suffix, expected in _EXPECTED.items():
        if suffix != "ex":
            row = await control_db.fetchrow(_MAY, f"p_{pid}_{suffix}")
            assert dict(row) == expected, (suffix, dict(row))
    async with control_db.acquire() as conn:
        assert await move_to_groups(conn) == 0  # idempotent: nothing left to move
    key = await api.new_key(token, pid, "admin")
    await _ok(api, key, pid, "CREATE TEMP TABLE tt (v int)")
    await _ok(api, key, pid, "DO $$ BEGIN PERFORM 1; END $$")
    r2 = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r2.status_code in (200, 204), r2.text
    assert not await control_db.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%")


async def test_dropping_a_project_with_entries_of_its_own(api: Api, control_db) -> None:
    """A project whose roles still hold entries their provisioner granted (not yet moved) is
    deleted: the provisioner revokes them before dropping the roles."""
    from fluxbase.tenancy.buckets import bucket_of

    _, token = await api.new_user()
    pid = await api.new_project(token, "legacy")
    db = await control_db.fetchval("SELECT current_database()")
    async with control_db.acquire() as conn, conn.transaction():
        await conn.execute(f'SET LOCAL ROLE "{bucket_of(pid)}"')
        await conn.execute(f'GRANT CONNECT, TEMPORARY ON DATABASE "{db}" TO "p_{pid}_admin"')
        await conn.execute(f'GRANT USAGE ON LANGUAGE plpgsql TO "p_{pid}_admin"')
    assert (await _entries(control_db))["database"][0] == 2
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code in (200, 204), r.text
    assert not await control_db.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%")
    assert all(tenant == 0 for tenant, _ in (await _entries(control_db)).values())


async def test_extension_schema_acl_does_not_grow_with_projects(api: Api, control_db) -> None:
    """Projects installing an extension join its schema's tenant group (sql/0046): the schema's
    ACL names no project role, each of the four roles may use the schema (and no other
    project's role gains anything); dropping the extension takes the membership back."""
    from fluxbase.db.privileges import extension_group

    _, token = await api.new_user()
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    acl = "SELECT nspacl::text FROM pg_namespace WHERE nspname = 'ext_pg_trgm'"
    pids = [await api.new_project(token, f"e{i}") for i in range(3)]
    keys = [await api.new_key(token, pid, "admin") for pid in pids]
    for pid, key in zip(pids[:2], keys[:2], strict=True):
        await _ok(api, key, pid, "CREATE EXTENSION IF NOT EXISTS pg_trgm")
        await _ok(api, key, pid, "SELECT similarity('abc', 'abd')")
    before = await control_db.fetchval(acl)
    assert "p_" not in before, before
    await _ok(api, keys[2], pids[2], "CREATE EXTENSION IF NOT EXISTS pg_trgm")
    assert await control_db.fetchval(acl) == before
    group = extension_group(h, "ext_pg_trgm")
    for suffix in ("admin", "rw", "ro", "rt"):
        for pid in pids:
            role = f"p_{pid}_{suffix}"
            assert await control_db.fetchval("SELECT has_schema_privilege($1, 'ext_pg_trgm', 'USAGE')", role)
            assert not await control_db.fetchval("SELECT pg_has_role($1, $2, 'SET')", role, group)
    other = await api.new_project(token, "none")
    assert not await control_db.fetchval(
        "SELECT has_schema_privilege($1, 'ext_pg_trgm', 'USAGE')", f"p_{other}_admin"
    )
    await _ok(api, keys[2], pids[2], "DROP EXTENSION pg_trgm")
    assert not await control_db.fetchval(
        "SELECT has_schema_privilege($1, 'ext_pg_trgm', 'USAGE')", f"p_{pids[2]}_admin"
    )
    assert await control_db.fetchval(
        "SELECT has_schema_privilege($1, 'ext_pg_trgm', 'USAGE')", f"p_{pids[0]}_ro"
    )


async def test_default_privileges_for_a_group_block_no_deletion(api: Api, control_db) -> None:
    """Holding a group's privileges, a tenant may set default privileges FOR ROLE the group
    (for objects the group would create: none ever can be). Naming its own or another project's
    roles there keeps neither project from being deleted."""
    _, token = await api.new_user()
    a, b = await api.new_project(token, "a"), await api.new_project(token, "b")
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    g = tenant_group(h, "admin")
    ka = await api.new_key(token, a, "admin")
    for q in (
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {g} GRANT SELECT ON TABLES TO p_{b}_ro",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {g} IN SCHEMA p_{a} GRANT SELECT ON TABLES TO p_{a}_rw",
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {g} GRANT EXECUTE ON FUNCTIONS TO p_{a}_ro",
    ):
        await _ok(api, ka, a, f"DO $$ BEGIN EXECUTE '{q}'; END $$")
    for pid in (b, a):
        r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
        assert r.status_code == 200, r.text
        assert not await control_db.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%")


async def test_grants_from_another_project_do_not_block_deletion(api: Api, control_db) -> None:
    """A tenant may grant its objects to any role, another project's included; such a grant kept
    that project's roles from being dropped (DROP ROLE: "some objects depend on it", a 500 on
    DELETE and a project nobody could delete). The deletion now revokes them as their grantor."""
    _, token = await api.new_user()
    a, b = await api.new_project(token, "a"), await api.new_project(token, "b")
    ka = await api.new_key(token, a, "admin")
    for q in (
        "CREATE TABLE s (v int, w int)",
        "CREATE SEQUENCE sq",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE TYPE mood AS ENUM ('ok')",
        f"GRANT SELECT ON s TO p_{b}_ro, p_{b}_admin",
        f"GRANT UPDATE (w) ON s TO p_{b}_rw",
        f"GRANT USAGE ON SEQUENCE sq TO p_{b}_rt",
        f"GRANT EXECUTE ON FUNCTION f() TO p_{b}_admin",
        f"GRANT USAGE ON TYPE mood TO p_{b}_ro",
        f"GRANT USAGE ON SCHEMA p_{a} TO p_{b}_admin",
        f"ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO p_{b}_ro",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA p_{a} GRANT EXECUTE ON FUNCTIONS TO p_{b}_rw",
    ):
        await _ok(api, ka, a, q)
    r = await api.http.delete(f"/api/projects/{b}", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert not await control_db.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{b}_%")
    # The granting project is untouched.
    await _ok(api, ka, a, "INSERT INTO s VALUES (1, 2)")
    assert (await _ok(api, ka, a, "SELECT f() AS one"))["result"]["rows"] == [{"one": 1}]
