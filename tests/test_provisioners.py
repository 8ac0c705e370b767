"""Provisioner roles (issue 19, tenancy/buckets.py): project roles are created and administered by
the project's provisioner role, never by the runtime role, whose role-membership list would
otherwise grow with every project (each CREATE ROLE or GRANT then cost time quadratic in it).
Projects whose roles the runtime already administers (made before the provisioners) keep working."""

from __future__ import annotations

from typing import Any

import asyncpg

from fluxbase.tenancy.buckets import BUCKETS, PREFIX, all_buckets, bucket_of
from support import RUNTIME_ROLE, Api, bearer

_MEMBERSHIPS = """SELECT count(*) FROM pg_auth_members m
                  WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = $1)"""

_ADMINS = """SELECT r.rolname AS role, b.rolname AS member, m.admin_option, m.set_option, m.inherit_option
             FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles b ON b.oid = m.member
             WHERE r.rolname LIKE $1"""


async def _ok(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    assert r.json()["success"], (query, r.text)
    return r.json()


async def _project_roles(control_db: asyncpg.Pool, pid: str) -> list[str]:
    rows = await control_db.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%")
    return sorted(r["rolname"] for r in rows)


async def test_runtime_is_a_member_of_no_project_role(api: Api, control_db) -> None:
    """New projects' roles are administered by their provisioner only: the runtime's memberships
    do not grow with projects, it is a member (even transitively) of none of their roles nor of a
    provisioner, and no provisioner inherits a project role's privileges."""
    _, token = await api.new_user()
    before = await control_db.fetchval(_MEMBERSHIPS, RUNTIME_ROLE)
    pids = [await api.new_project(token, f"p{i}") for i in range(3)]
    assert await control_db.fetchval(_MEMBERSHIPS, RUNTIME_ROLE) == before
    for pid in pids:
        roles = await _project_roles(control_db, pid)
        assert len(roles) == 4, roles
        for role in roles:
            assert not await control_db.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", RUNTIME_ROLE, role)
        admins = [dict(r) for r in await control_db.fetch(_ADMINS, f"p_{pid}_%") if r["admin_option"]]
        # Each role: administered by its project's provisioner, which may SET ROLE to it but does
        # not hold its privileges.
        assert {a["role"] for a in admins} == set(roles), admins
        assert {a["member"] for a in admins} == {bucket_of(pid)}, admins
        for r in await control_db.fetch(_ADMINS, f"p_{pid}_%"):
            if r["member"].startswith(PREFIX):
                assert not r["inherit_option"], dict(r)
    for bucket in all_buckets():
        assert not await control_db.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", RUNTIME_ROLE, bucket)
        row = await control_db.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", bucket)
        assert row is not None and row["rolcreaterole"] and row["rolcanlogin"] and not row["rolsuper"]
        assert not row["rolbypassrls"] and not row["rolcreatedb"] and not row["rolinherit"]
    assert len(all_buckets()) == BUCKETS


async def test_provisioned_project_works_and_is_dropped(api: Api, control_db) -> None:
    """Everything that acts on a provisioner-administered project's roles: SQL as its keys,
    realtime capture switched on and off (as the table's owner), the export role, deletion."""
    _, token = await api.new_user()
    pid = await api.new_project(token)
    key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
    await _ok(api, key, pid, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    await _ok(api, key, pid, "INSERT INTO t VALUES (1, 'a')")
    for action in ("enable", "disable", "enable"):
        r = await api.http.post(
            f"/api/realtime/{action}", json={"projectId": pid, "tables": ["t"]}, headers=bearer(key)
        )
        assert r.status_code == 200, r.text
    trigger = await control_db.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal", f"p_{pid}.t"
    )
    assert trigger > 0
    r = await api.http.get(f"/api/projects/{pid}/export", headers=bearer(token))
    assert r.status_code == 200, r.text[:300]
    assert "CREATE TABLE" in r.text
    roles = await _project_roles(control_db, pid)
    assert f"p_{pid}_ex" in roles
    assert not await control_db.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", RUNTIME_ROLE, f"p_{pid}_ex")
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code in (200, 204), r.text
    assert await _project_roles(control_db, pid) == []
    assert not await control_db.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", f"p_{pid}")


async def test_password_rotation_reaches_provisioned_roles(api: Api, instance, control_db) -> None:
    """Re-deriving tenant passwords (a new FLUXBASE_SECRET_KEY) changes a provisioned project's
    roles too, and migrating again leaves them with their provisioner (nothing adopted)."""
    from fluxbase.config import load_settings
    from fluxbase.db.migrate import migrate_database
    from fluxbase.security.roles import role_password
    from fluxbase.tenancy.provision import sync_role_passwords

    settings = load_settings(instance.env)
    _, token = await api.new_user()
    pid = await api.new_project(token)
    role = f"p_{pid}_admin"
    other = load_settings({**instance.env, "FLUXBASE_SECRET_KEY": "another-secret-" + "x" * 40})
    host, port = settings.database.server()
    dbname = instance.env["FLUXBASE_MIGRATION_DATABASE_URL"].rsplit("/", 1)[1]
    try:
        async with control_db.acquire() as conn:
            assert await sync_role_passwords(conn, other) >= 4
        c = await asyncpg.connect(
            host=host,
            port=port,
            database=dbname,
            user=role,
            password=role_password(other.auth.secret_key, role),
        )
        assert await c.fetchval("SELECT current_user") == role
        await c.close()
    finally:
        async with control_db.acquire() as conn:
            await sync_role_passwords(conn, settings)
    await migrate_database(settings)
    admins = {r["member"] for r in await control_db.fetch(_ADMINS, f"p_{pid}_%") if r["admin_option"]}
    assert admins == {bucket_of(pid)}
    key = await api.new_key(token, pid, "admin")
    await _ok(api, key, pid, "SELECT 1")


async def test_project_administered_by_the_runtime_keeps_working(api: Api, instance, control_db) -> None:
    """An installation upgraded with projects whose roles the runtime created: they keep working
    (SQL, realtime capture as the owner, a migration run) and can be deleted, by the runtime."""
    from fluxbase.config import load_settings
    from fluxbase.db.migrate import migrate_database

    _, token = await api.new_user()
    hidden = [f"{b}_hidden" for b in all_buckets()]
    # Before the provisioners existed: the runtime creates the roles itself.
    for b, h in zip(all_buckets(), hidden, strict=True):
        await control_db.execute(f'ALTER ROLE "{b}" RENAME TO "{h}"')
    try:
        pid = await api.new_project(token)
    finally:
        for b, h in zip(all_buckets(), hidden, strict=True):
            await control_db.execute(f'ALTER ROLE "{h}" RENAME TO "{b}"')
    admins = {r["member"] for r in await control_db.fetch(_ADMINS, f"p_{pid}_%") if r["admin_option"]}
    assert admins == {RUNTIME_ROLE}, admins
    await migrate_database(load_settings(instance.env))
    admins = {r["member"] for r in await control_db.fetch(_ADMINS, f"p_{pid}_%") if r["admin_option"]}
    assert admins == {RUNTIME_ROLE}, admins
    key = await api.new_key(token, pid, "admin")
    await _ok(api, key, pid, "CREATE TABLE t (id int)")
    r = await api.http.post(
        "/api/realtime/enable", json={"projectId": pid, "tables": ["t"]}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    await _ok(api, key, pid, "INSERT INTO t VALUES (1)")
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code in (200, 204), r.text
    assert await _project_roles(control_db, pid) == []


async def test_project_of_another_bucket_keeps_working(api: Api, control_db) -> None:
    """A project whose roles a bucket other than bucket_of(id) administers (provisioned when there
    were fewer buckets: BUCKETS grew so that no bucket's membership list, walked by every
    role-touching statement it runs, grows past ~1/BUCKETS of the roles): the export role, realtime
    capture as the owner and deletion go through the bucket that holds ADMIN, read from the
    catalog, not the one its id hashes to now."""
    _, token = await api.new_user()
    pid = await api.new_project(token)
    mine = bucket_of(pid)
    other = next(b for b in all_buckets()[:32] if b != mine)
    roles = await _project_roles(control_db, pid)
    # What a provisioning by `other` leaves: its ADMIN grant (grantor the bootstrap superuser) and
    # its createrole_self_grant SET grant (its own).
    for role in roles:
        await control_db.execute(f'GRANT "{role}" TO "{other}" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE')
        await control_db.execute(
            f'GRANT "{role}" TO "{other}" WITH INHERIT FALSE, SET TRUE GRANTED BY "{other}"'
        )
    # The memberships `mine` granted among the project's roles (read into the checker), as `other`.
    granted = await control_db.fetch(
        """SELECT r.rolname AS role, u.rolname AS member, m.admin_option, m.inherit_option, m.set_option
           FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles u ON u.oid = m.member
           WHERE m.grantor = $1::regrole AND r.rolname = ANY($2::text[])""",
        mine,
        roles,
    )
    for g in granted:
        opts = ", ".join(
            f"{o.split('_')[0].upper()} {str(g[o]).upper()}" for o in ("inherit_option", "set_option")
        )
        await control_db.execute(f'GRANT "{g["role"]}" TO "{g["member"]}" WITH {opts} GRANTED BY "{other}"')
    for role in roles:
        await control_db.execute(f'REVOKE "{role}" FROM "{mine}" GRANTED BY "{mine}" CASCADE')
        await control_db.execute(f'REVOKE "{role}" FROM "{mine}" CASCADE')
    admins = {r["member"] for r in await control_db.fetch(_ADMINS, f"p_{pid}_%") if r["admin_option"]}
    assert admins == {other}, admins
    key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
    await _ok(api, key, pid, "CREATE TABLE t (id int PRIMARY KEY)")
    r = await api.http.post(
        "/api/realtime/enable", json={"projectId": pid, "tables": ["t"]}, headers=bearer(key)
    )
    assert r.status_code == 200, r.text
    r = await api.http.get(f"/api/projects/{pid}/export", headers=bearer(token))
    assert r.status_code == 200, r.text[:300]
    admins = {r["member"] for r in await control_db.fetch(_ADMINS, f"p_{pid}_%") if r["admin_option"]}
    assert admins == {other}, admins  # the export role too
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code in (200, 204), r.text
    assert await _project_roles(control_db, pid) == []


async def test_role_defaults_set_as_the_role(api: Api, control_db) -> None:
    """A new project's roles get every default (search_path and the tenant settings, the
    superuser-only temp_file_limit included), all in one round trip (tenancy/provision.py
    _set_defaults)."""
    _, token = await api.new_user()
    pid = await api.new_project(token)
    rows = await control_db.fetch(
        """SELECT r.rolname, s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
           WHERE r.rolname LIKE $1 AND s.setdatabase = 0""",
        f"p_{pid}_%",
    )
    got = {r["rolname"]: {c.split("=", 1)[0] for c in r["setconfig"]} for r in rows}
    assert set(got) == set(await _project_roles(control_db, pid)), got
    want = {"search_path", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"}
    want |= {"work_mem", "temp_file_limit"}
    for role, names in got.items():
        assert names == want, (role, names)
