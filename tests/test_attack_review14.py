"""Hostile review 14: the tenant groups (branch acl, issue 19) and one server one cluster with
moves of projects that have end users or extensions (branch sysid), attacked through the real API
on the real stack with the source in hand.

Each test asserts the SECURE behaviour. A hole still open is marked `xfail(strict=True)`; the
mark goes with the fix.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from fluxbase.db.privileges import GROUP_PRIVILEGES, tenant_group
from support import Api, bearer
from test_clusters import own_tmp, pg2  # noqa: F401  (module fixtures: a second PostgreSQL server)


async def _ok(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    assert r.status_code == 200 and r.json()["success"], (query, r.text)
    return dict(r.json())


async def _refused(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    assert r.status_code < 500, (query, r.text)
    assert not r.json().get("success"), (query, r.text)
    return dict(r.json())


async def _roles_of(control_db: asyncpg.Pool, pid: str) -> list[str]:
    return [
        r[0]
        for r in await control_db.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%")
    ]


# -- 1. another tenant's grant to a project's role -------------------------------------------------


async def test_another_tenant_cannot_keep_a_project_from_being_deleted(
    api: Api, control_db: asyncpg.Pool
) -> None:
    """Tenant A grants its own objects to tenant B's roles (any owner may grant to any role) and
    names them in policies and default privileges. B's owner deletes B: before the fix the
    deletion answered 500 INTERNAL_ERROR and B's schema and roles stayed (DROP OWNED BY, run as
    the dying role, revokes only what that role could revoke itself: "permission denied for
    column tableoid of relation bait_seq", and DROP ROLE fails on the entries left). Any tenant
    of the database could keep any other project from being deleted, and a move from removing
    the source's copy. The tenant groups add a variant no project role could undo: a member's
    re-grant through a grant option an owner gave the group is recorded as the group's. Now the
    grants are taken back by their grantor (the group's by the drop's administrator, which holds
    SET on the groups), and the attacker's own objects are otherwise untouched."""
    _, atk_token = await api.new_user()
    atk = await api.new_project(atk_token, "attacker")
    akey = await api.new_key(atk_token, atk, "admin")
    _, vic_token = await api.new_user()
    vic = await api.new_project(vic_token, "victim")
    roles = f"p_{vic}_ro, p_{vic}_admin, p_{vic}_rw, p_{vic}_rt"
    for q in (
        "CREATE TABLE bait (v int)",
        f"GRANT SELECT ON bait TO {roles}",
        f"GRANT UPDATE (v) ON bait TO {roles}",
        "CREATE SEQUENCE bait_seq",
        f"GRANT USAGE ON SEQUENCE bait_seq TO {roles}",
        "CREATE FUNCTION bait_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        f"GRANT EXECUTE ON FUNCTION bait_fn() TO {roles}",
        "CREATE TYPE bait_t AS ENUM ('a')",
        f"GRANT USAGE ON TYPE bait_t TO {roles}",
        f"GRANT USAGE ON SCHEMA p_{atk} TO {roles}",
        "ALTER TABLE bait ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY bait_pol ON bait FOR SELECT TO {roles} USING (true)",
        f"CREATE POLICY bait_mixed ON bait FOR SELECT TO p_{atk}_ro, p_{vic}_ro USING (v > 0)",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA p_{atk} GRANT SELECT ON TABLES TO {roles}",
    ):
        await _ok(api, akey, atk, q)
    # A second project of the attacker re-grants A's table through the admin group's grant
    # option: that entry's grantor is the group, which nobody may become.
    atk2 = await api.new_project(atk_token, "attacker 2")
    akey2 = await api.new_key(atk_token, atk2, "admin")
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    g = tenant_group(h, "admin")
    await _ok(api, akey, atk, f"GRANT USAGE ON SCHEMA p_{atk} TO {g}")
    await _ok(api, akey, atk, f"GRANT SELECT, INSERT ON bait TO {g} WITH GRANT OPTION")
    await _ok(api, akey2, atk2, f"GRANT SELECT, INSERT ON p_{atk}.bait TO {roles}")
    # The same through an extension schema's group (sql/0046): both attacker projects installed
    # pg_trgm, so both are members of its group.
    from fluxbase.db.privileges import extension_group

    eg = extension_group(h, "ext_pg_trgm")
    for k, p in ((akey, atk), (akey2, atk2)):
        await _ok(api, k, p, "CREATE EXTENSION pg_trgm")
    await _ok(api, akey, atk, "CREATE TABLE bait2 (v int)")
    await _ok(api, akey, atk, f"GRANT USAGE ON SCHEMA p_{atk} TO {eg}")
    await _ok(api, akey, atk, f"GRANT SELECT ON bait2 TO {eg} WITH GRANT OPTION")
    await _ok(api, akey2, atk2, f"GRANT SELECT ON p_{atk}.bait2 TO {roles}")
    grantors = await control_db.fetchval(
        "SELECT array_agg(x.grantor::regrole::text) FROM pg_class c, aclexplode(c.relacl) x "
        "WHERE c.oid = $1::regclass AND x.grantee = $2::regrole",
        f"p_{atk}.bait2",
        f"p_{vic}_ro",
    )
    assert eg in grantors, grantors
    # Default privileges of the group in the victim's schema, naming the victim's roles.
    await _ok(
        api,
        akey,
        atk,
        f"DO $$ BEGIN EXECUTE 'ALTER DEFAULT PRIVILEGES FOR ROLE {g} IN SCHEMA p_{vic} "
        f"GRANT SELECT ON TABLES TO {roles}'; END $$",
    )
    await _ok(
        api,
        akey,
        atk,
        "CREATE FUNCTION bait_args(a int, VARIADIC b text[]) RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    await _ok(api, akey, atk, f"GRANT EXECUTE ON FUNCTION bait_args(int, text[]) TO {roles}")
    grantors = await control_db.fetchval(
        "SELECT array_agg(DISTINCT x.grantor::regrole::text) FROM pg_class c, aclexplode(c.relacl) x "
        "WHERE c.oid = $1::regclass AND x.grantee = $2::regrole",
        f"p_{atk}.bait",
        f"p_{vic}_ro",
    )
    assert sorted(grantors) == sorted([f"p_{atk}_admin", g]), grantors
    r = await api.http.delete(f"/api/projects/{vic}", headers=bearer(vic_token))
    assert r.status_code < 500, r.text
    assert r.status_code in (200, 204), r.text
    assert await _roles_of(control_db, vic) == []
    assert not await control_db.fetchval("SELECT to_regnamespace($1) IS NOT NULL", f"p_{vic}")
    # The attacker's objects stay; its policy naming one of its roles too, without the victim's.
    pols = {
        r["polname"]: r["roles"]
        for r in await control_db.fetch(
            "SELECT polname, polroles::regrole[]::text[] AS roles FROM pg_policy "
            "WHERE polrelid = $1::regclass",
            f"p_{atk}.bait",
        )
    }
    assert pols == {"bait_mixed": [f"p_{atk}_ro"]}, pols
    await _ok(api, akey, atk, "SELECT bait_fn(), count(*) FROM bait")


# -- 2. the tenant groups: no channel between tenants, nothing new for any scope -----------------

_MAY = """SELECT has_database_privilege(current_user, current_database(), 'TEMPORARY') AS temporary,
                 has_database_privilege(current_user, current_database(), 'CREATE') AS create,
                 has_function_privilege(current_user, 'pg_catalog.set_config(text,text,boolean)', 'EXECUTE')
                   AS set_config,
                 has_language_privilege(current_user, 'plpgsql', 'USAGE') AS plpgsql"""

_GROUP_STATE = """
SELECT g.rolname,
       (SELECT array_agg(m.member::regrole::text || ':' || m.admin_option || m.inherit_option || m.set_option
                         ORDER BY 1)
        FROM pg_auth_members m WHERE m.roleid = g.oid) AS members,
       (SELECT array_agg(m.roleid::regrole::text ORDER BY 1) FROM pg_auth_members m WHERE m.member = g.oid)
         AS member_of,
       (SELECT count(*) FROM pg_class WHERE relowner = g.oid)
       + (SELECT count(*) FROM pg_proc WHERE proowner = g.oid)
       + (SELECT count(*) FROM pg_namespace WHERE nspowner = g.oid)
       + (SELECT count(*) FROM pg_type WHERE typowner = g.oid) AS owns,
       has_database_privilege(g.oid, current_database(), 'CONNECT') AS connect,
       has_database_privilege(g.oid, current_database(), 'TEMPORARY') AS temporary,
       has_function_privilege(g.oid, 'pg_catalog.set_config(text,text,boolean)', 'EXECUTE') AS set_config,
       has_language_privilege(g.oid, 'plpgsql', 'USAGE') AS plpgsql,
       g.rolcanlogin, g.rolinherit, g.rolcreaterole, g.rolconfig
FROM pg_roles g WHERE g.rolname = ANY($1::text[]) ORDER BY 1
"""


async def test_no_scope_gains_a_privilege_through_its_group(api: Api, project: Any) -> None:
    """Read and readwrite keys, and an end user's token, hold no TEMPORARY, set_config or plpgsql
    through their group (the admin group has them); what needs them is refused."""
    from test_attack_review1 import end_user, sql

    pid, token = project.id, project.owner_token
    await _ok(api, project.admin_key, pid, "CREATE TABLE notes (v text)")
    read = await api.new_key(token, pid, "read")
    rw = await api.new_key(token, pid, "readwrite")
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys",
        json={"name": "browser", "scope": "readwrite", "requireUserAuth": True},
        headers=bearer(token),
    )
    assert r.status_code == 201, r.text
    browser = r.json()["key"]
    _, user_token = await end_user(api, pid)
    callers = [(read, None), (rw, None), (browser, user_token)]
    for key, ut in callers:
        body = await sql(api, key, pid, _MAY, ut)
        assert body["success"], body
        assert body["result"]["rows"] == [
            dict(temporary=False, create=False, set_config=False, plpgsql=False)
        ]
        for q in (
            "CREATE TEMP TABLE t (v int)",
            "SELECT set_config('fluxbase.auth_uid', 'someone', true)",
            "DO $$ BEGIN PERFORM 1; END $$",
        ):
            body = await sql(api, key, pid, q, ut)
            assert not body.get("success"), (q, body)
    body = await sql(api, project.admin_key, pid, _MAY)
    assert body["result"]["rows"] == [dict(temporary=True, create=False, set_config=True, plpgsql=True)]


async def test_a_project_admin_cannot_use_its_group_as_a_channel(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """Through the API, with DO blocks (the classifier does not see into them): becoming the
    group, granting it on, revoking it from itself or another tenant, altering it, making it own
    something (ownership transfer, REASSIGN OWNED, a schema), taking its privileges away from
    every other tenant (REVOKE, DROP OWNED BY). Afterwards every group is as it was: same members
    with the same options, owns nothing, same privileges.

    Seen succeeding, and inert: the admin role has the privileges of its group (INHERIT TRUE), so
    PostgreSQL lets it run ALTER DEFAULT PRIVILEGES FOR ROLE <group> (even IN SCHEMA of another
    project: the group creates nothing, so those entries never apply), REASSIGN OWNED BY <group>
    and DROP OWNED BY <group> (the group owns nothing; DROP OWNED revokes only what the caller
    granted), REVOKE ... FROM <group> (only the caller's own grants), and GRANT its own objects
    to a group WITH GRANT OPTION (see test 1 for what that did to project deletion)."""
    _, other_token = await api.new_user()
    other = await api.new_project(other_token, "bystander")
    pid, key = project.id, project.admin_key
    db = await control_db.fetchval("SELECT current_database()")
    h = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    groups = [tenant_group(h, k) for k in GROUP_PRIVILEGES]
    before = [dict(r) for r in await control_db.fetch(_GROUP_STATE, groups)]
    await _ok(api, key, pid, "CREATE TABLE mine (v int)")
    await _ok(api, key, pid, "CREATE TYPE mood AS ENUM ('ok')")
    await _ok(api, key, pid, "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    for g in groups:
        for q in (
            f"SET ROLE {g}",
            f"SELECT set_config('role', '{g}', true)",
            f"GRANT {g} TO p_{other}_ro",
            f"GRANT {g} TO p_{pid}_ro WITH INHERIT TRUE",
            f"GRANT {g} TO CURRENT_USER WITH SET TRUE",
            f"REVOKE {g} FROM CURRENT_USER",
            f"REVOKE {g} FROM p_{other}_admin",
            f"REVOKE INHERIT OPTION FOR {g} FROM p_{other}_ro",
            f"ALTER ROLE {g} LOGIN PASSWORD 'x'",
            f"ALTER ROLE {g} SET search_path = p_{pid}",
            f"ALTER ROLE {g} RENAME TO evil",
            f"COMMENT ON ROLE {g} IS 'evil'",
            f"ALTER TABLE mine OWNER TO {g}",
            f"ALTER TYPE mood OWNER TO {g}",
            f"ALTER FUNCTION f() OWNER TO {g}",
            f"CREATE SCHEMA evil AUTHORIZATION {g}",
            f"REASSIGN OWNED BY CURRENT_USER TO {g}",
            f"REASSIGN OWNED BY {g} TO CURRENT_USER",
            f"DROP OWNED BY {g}",
            f'REVOKE ALL ON DATABASE "{db}" FROM {g}',
            f"REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM {g}",
            f"REVOKE USAGE ON LANGUAGE plpgsql FROM {g}",
            f"SECURITY LABEL ON ROLE {g} IS 'x'",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {g} GRANT ALL ON TABLES TO p_{pid}_admin",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {g} IN SCHEMA p_{other} GRANT ALL ON TABLES TO p_{pid}_admin",
            f"GRANT SELECT ON mine TO {g} WITH GRANT OPTION",
        ):
            doubled = q.replace("'", "''")
            await api.sql(key, pid, q)  # the classifier refuses most; either way:
            await api.sql(key, pid, f"DO $$ BEGIN EXECUTE '{doubled}'; END $$")
    after = [dict(r) for r in await control_db.fetch(_GROUP_STATE, groups)]
    assert after == before
    assert all(r["owns"] == 0 and r["connect"] and not r["rolcanlogin"] for r in after), after
    owner = await control_db.fetchval(
        "SELECT relowner::regrole::text FROM pg_class WHERE oid = $1::regclass", f"p_{pid}.mine"
    )
    assert owner == f"p_{pid}_admin"
    # The bystander still works: connects, creates temporary objects, runs plpgsql.
    okey = await api.new_key(other_token, other, "admin")
    await _ok(api, okey, other, "CREATE TEMP TABLE tt (v int)")
    await _ok(api, okey, other, "DO $$ BEGIN PERFORM pg_catalog.set_config('work_mem', '4MB', true); END $$")


# -- 3. two databases of one server; a provisioning that fails half-way --------------------------


async def test_groups_of_two_databases_of_one_server_stay_apart(
    api: Api, spawn: Any, stack: Any, instance: Any, control_db: asyncpg.Pool
) -> None:
    """Two Fluxbase databases on one PostgreSQL server (roles are per server): each has its own
    groups, and a project role of one may not connect to the other, through its group or
    otherwise. A provisioning that fails after CREATE ROLE (its group grant refused) leaves no
    role behind."""
    from urllib.parse import urlsplit

    from fluxbase.security.roles import role_password

    _, token = await api.new_user()
    here = await api.new_project(token, "here")
    db1 = instance.dbname
    async with spawn() as inst2:
        db2 = inst2.dbname
        h1 = await control_db.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
        sup2 = await asyncpg.connect(stack.database_url(db2))
        try:
            h2 = await sup2.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
        finally:
            await sup2.close()
        assert {tenant_group(h1, k) for k in GROUP_PRIVILEGES}.isdisjoint(
            {tenant_group(h2, k) for k in GROUP_PRIVILEGES}
        )
        api2 = Api(inst2.url)
        try:
            _, token2 = await api2.new_user()
            there = await api2.new_project(token2, "there")
            for role, db in [(f"p_{here}_{s}", db2) for s in ("admin", "rw", "ro", "rt")] + [
                (f"p_{there}_{s}", db1) for s in ("admin", "rw", "ro", "rt")
            ]:
                assert not await control_db.fetchval(
                    "SELECT has_database_privilege($1, $2, 'CONNECT')", role, db
                ), (role, db)
                u = urlsplit(stack.database_url(db))
                with pytest.raises(asyncpg.PostgresError):
                    conn = await asyncpg.connect(
                        host=u.hostname,
                        port=u.port,
                        database=db,
                        user=role,
                        password=role_password(stack.secret_key, role),
                    )
                    await conn.close()
            # Half-way: the provisioner may no longer grant the connect group (as if the
            # privilege step had not run there); the project's creation fails, and leaves nothing.
            sup = await asyncpg.connect(stack.database_url(db2))
            try:
                before = await sup.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'p\\_%'")
                g = tenant_group(h2, "connect")
                holders = [
                    r[0]
                    for r in await sup.fetch(
                        "SELECT member::regrole::text FROM pg_auth_members WHERE roleid = $1::regrole "
                        "AND admin_option",
                        g,
                    )
                ]
                await sup.execute(f"REVOKE ADMIN OPTION FOR {g} FROM {', '.join(holders)} CASCADE")
                r = await api2.http.post("/api/projects", json={"name": "half"}, headers=bearer(token2))
                assert r.status_code >= 400, r.text
                after = await sup.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'p\\_%'")
                assert after == before
                assert await sup.fetchval("SELECT count(*) FROM fluxbase.projects WHERE name = 'half'") == 0
            finally:
                await sup.close()
        finally:
            await api2.close()


# -- 4. moves (sysid): another tenant's grant may not keep a moved project's copy on its source ---


async def test_a_tenant_on_the_source_cannot_keep_a_moved_projects_copy_there(
    stack: Any,
    log_dir: Any,
    pg2: Any,  # noqa: F811
) -> None:
    """The victim's project moves to a registered cluster; an attacker's project on the source
    had granted its table to the victim's roles (and named them in a policy). The move succeeds
    either way, but before the fix the source's drop failed (logged only): the victim's schema,
    data and LOGIN roles stayed on the source server after the move, and a later move back there
    failed (its roles already existed). Now nothing of the victim is left on the source, and
    the attacker's objects are otherwise untouched."""
    from urllib.parse import quote

    from fluxbase.devstack.procs import free_port
    from support import run_service

    dbname = await stack.create_database()
    owner = await asyncpg.connect(pg2.url)
    try:
        await owner.execute("CREATE DATABASE r14_two")
    finally:
        await owner.close()
    two_url = f"postgresql://postgres:{quote(pg2.password, safe='')}@127.0.0.1:{pg2.port}/r14_two"
    port = free_port()
    env = stack.env(dbname, FLUXBASE_API_PORT=str(port))
    try:
        with run_service(["api"], env, port, log_dir) as server:
            api = Api(server.url)
            try:
                admin = await api.register(email="r14-mover@example.com")
                token = await api.login(admin["email"], admin["password"])
                r = await api.http.post(
                    "/api/admin/clusters",
                    json={"label": "two", "connectionString": two_url},
                    headers=bearer(token),
                )
                assert r.status_code == 201, r.text
                cid = r.json()["cluster"]["id"]
                _, atk_token = await api.new_user()
                atk = await api.new_project(atk_token, "attacker")
                akey = await api.new_key(atk_token, atk, "admin")
                r = await api.http.post(
                    "/api/projects", json={"name": "victim", "clusterId": "default"}, headers=bearer(token)
                )
                assert r.status_code == 201, r.text
                vic = r.json()["project"]["id"]
                vkey = await api.new_key(token, vic, "admin")
                await _ok(api, vkey, vic, "CREATE TABLE mine (v text)")
                await _ok(api, vkey, vic, "INSERT INTO mine VALUES ('victim data')")
                roles = f"p_{vic}_ro, p_{vic}_admin, p_{vic}_rw"
                for q in (
                    "CREATE TABLE bait (v int)",
                    f"GRANT SELECT ON bait TO {roles}",
                    "ALTER TABLE bait ENABLE ROW LEVEL SECURITY",
                    f"CREATE POLICY bait_pol ON bait FOR SELECT TO {roles} USING (true)",
                ):
                    await _ok(api, akey, atk, q)
                r = await api.http.post(
                    f"/api/admin/projects/{vic}/move", json={"clusterId": cid}, headers=bearer(token)
                )
                assert r.status_code == 200, r.text
                body = await _ok(api, vkey, vic, "SELECT v FROM mine")
                assert body["result"]["rows"] == [{"v": "victim data"}]
                # An end user of the attacker's project is nobody on the moved project (its
                # identity is checked on the control plane there): refused, not run as anyone.
                from test_attack_review1 import end_user

                _, stranger = await end_user(api, atk)
                rw = await api.new_key(token, vic, "readwrite")
                r = await api.http.post(
                    "/api/execute-sql",
                    json={"projectId": vic, "query": "SELECT auth.uid() AS uid, v FROM mine"},
                    headers={**bearer(rw), "X-Fluxbase-User-Token": stranger},
                )
                assert r.status_code == 401 and r.json()["error"]["code"] == "INVALID_USER_TOKEN", r.text
                src = await asyncpg.connect(stack.database_url(dbname))
                try:
                    assert await src.fetchval("SELECT to_regnamespace($1)", f"p_{vic}") is None
                    left = await src.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{vic}_%")
                    assert [x[0] for x in left] == []
                    assert (
                        await src.fetchval("SELECT count(*) FROM pg_policy WHERE polname = 'bait_pol'") == 0
                    )
                finally:
                    await src.close()
                await _ok(api, akey, atk, "SELECT count(*) FROM bait")
                # And back: its roles are created on the source server again.
                r = await api.http.post(
                    f"/api/admin/projects/{vic}/move", json={"clusterId": "default"}, headers=bearer(token)
                )
                assert r.status_code == 200, r.text
                body = await _ok(api, vkey, vic, "SELECT v FROM mine")
                assert body["result"]["rows"] == [{"v": "victim data"}]
            finally:
                await api.close()
    finally:
        await stack.drop_database(dbname)
