"""The tenant groups' names are the database's own, not its name's (sql/0051).

Project roles reach what they need outside their schema through per-database NOLOGIN groups
(db/privileges.GROUP_PRIVILEGES), and roles are cluster-wide. Their names used to derive from
the database's name: an operator who renamed database A to B and made a new A (or dropped A,
whose project roles survive, and made a new one) gave the new A the same group names, so every
project role of the old database was already a member of the new one's groups and could connect
to it. The prefix is now stored in the database (fluxbase.tenant_group_prefix), chosen once by
the migration: from the name when those roles are free (or already this database's), else
fresh."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import asyncpg
import pytest

from fluxbase.devstack.procs import free_port
from fluxbase.security.roles import role_password
from support import ROOT, Api, run_service

# The tenant groups holding CONNECT on a database (an entry of its own ACL), by the grantee's name.
_CONNECT_GROUPS = r"""
SELECT g.rolname FROM pg_database d, aclexplode(d.datacl) x JOIN pg_roles g ON g.oid = x.grantee
WHERE d.datname = current_database() AND x.privilege_type = 'CONNECT'
  AND g.rolname LIKE 'fluxbase\_tenant\_%' ORDER BY 1
"""
# The tenant groups named in a database's extension schemas' ACLs (sql/0046).
_EXTENSION_GROUPS = r"""
SELECT DISTINCT g.rolname FROM pg_namespace n, aclexplode(n.nspacl) x JOIN pg_roles g ON g.oid = x.grantee
WHERE g.rolname LIKE 'fluxbase\_tenant\_%' ORDER BY 1
"""


async def _migrate(env: dict[str, str]) -> None:
    """`fluxbase migrate`, as an operator runs it on a database."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fluxbase",
        "migrate",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


async def _fetch(stack: Any, db: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(stack.database_url(db))
    try:
        return [r[0] for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def _admin(stack: Any, query: str) -> None:
    conn = await asyncpg.connect(stack.admin_url)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


async def _login(stack: Any, db: str, role: str) -> asyncpg.Connection:
    from urllib.parse import urlsplit

    u = urlsplit(stack.database_url(db))
    return await asyncpg.connect(
        host=u.hostname,
        port=u.port,
        database=db,
        user=role,
        password=role_password(stack.secret_key, role),
    )


def _prefixes(groups: list[str]) -> set[str]:
    return {g.split("_")[2] for g in groups}


async def test_a_renamed_database_hands_its_groups_to_no_new_one(stack: Any, log_dir: Any) -> None:
    """Rename A to B, make a new A and migrate it: A's groups are not B's, B's project roles may
    not connect to A (through a group or otherwise), and B's projects keep working under the new
    name. Then drop B (its project roles survive) and make a new B: the same holds."""
    a = await stack.create_database()
    b = a + "_renamed"
    env = stack.env(a, FLUXBASE_API_PORT=str(free_port()))
    try:
        with run_service(["api"], env, int(env["FLUXBASE_API_PORT"]), log_dir):
            api = Api(f"http://127.0.0.1:{env['FLUXBASE_API_PORT']}")
            try:
                _, token = await api.new_user()
                pid = await api.new_project(token, "old")
                key = await api.new_key(token, pid, "admin")
                for q in ("CREATE TABLE t (v int)", "INSERT INTO t VALUES (1)"):
                    r = await api.sql(key, pid, q)
                    assert r.json()["success"], r.text
            finally:
                await api.close()
        old_groups = await _fetch(stack, a, _CONNECT_GROUPS)
        assert len(old_groups) == 3, old_groups
        await _admin(stack, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{a}'")
        await _admin(stack, f'ALTER DATABASE "{a}" RENAME TO "{b}"')
        await _admin(stack, f'CREATE DATABASE "{a}"')
        await _migrate(stack.env(a))

        new_groups = await _fetch(stack, a, _CONNECT_GROUPS)
        assert len(new_groups) == 3, new_groups
        assert _prefixes(new_groups).isdisjoint(_prefixes(old_groups)), (new_groups, old_groups)
        # The new database's extension schemas are opened to its own extension groups only.
        ext = await _fetch(stack, a, _EXTENSION_GROUPS)
        assert ext and _prefixes(ext) == _prefixes(new_groups), (ext, new_groups)
        roles = [f"p_{pid}_{s}" for s in ("admin", "rw", "ro", "rt")]
        for role in roles:
            member = await _fetch(
                stack,
                a,
                "SELECT g FROM unnest($2::text[]) g WHERE pg_has_role($1, g, 'MEMBER')",
                role,
                new_groups,
            )
            assert member == [], (role, member)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for database"):
                conn = await _login(stack, a, role)
                await conn.close()

        # B, renamed, migrated again under its new name: the same groups, and its project works.
        env_b = stack.env(b, FLUXBASE_API_PORT=str(free_port()), FLUXBASE_S3_BUCKET=env["FLUXBASE_S3_BUCKET"])
        with run_service(["api"], env_b, int(env_b["FLUXBASE_API_PORT"]), log_dir):
            assert await _fetch(stack, b, _CONNECT_GROUPS) == old_groups
            api = Api(f"http://127.0.0.1:{env_b['FLUXBASE_API_PORT']}")
            try:
                r = await api.sql(key, pid, "INSERT INTO t VALUES (2) RETURNING v")
                assert r.json()["success"], r.text
                _, token2 = await api.new_user()
                pid2 = await api.new_project(token2, "after the rename")
                key2 = await api.new_key(token2, pid2, "admin")
                for q in (
                    "CREATE TABLE t2 (v int)",
                    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
                    "SELECT similarity('abc', 'abd')",
                ):
                    r = await api.sql(key2, pid2, q)
                    assert r.json()["success"], (q, r.text)
            finally:
                await api.close()
        # The extension's USAGE through B's own extension group (sql/0046: the stored prefix,
        # not one computed from B's new name), with no entry of the project's in the schema's ACL.
        ext_b = await _fetch(stack, b, _EXTENSION_GROUPS)
        assert _prefixes(ext_b) == _prefixes(old_groups), ext_b
        held = await _fetch(
            stack,
            b,
            "SELECT g FROM unnest($2::text[]) g WHERE pg_has_role($1, g, 'MEMBER')",
            f"p_{pid2}_ro",
            ext_b,
        )
        assert len(held) == 1, (held, ext_b)
        conn = await _login(stack, b, f"p_{pid}_ro")
        assert await conn.fetchval("SELECT count(*) FROM t") == 2
        await conn.close()
        conn = await _login(stack, b, f"p_{pid2}_admin")
        await conn.close()
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            conn = await _login(stack, a, f"p_{pid2}_admin")
            await conn.close()

        # Dropped (its project roles survive, as an operator's DROP DATABASE leaves them) and
        # made again under the same name: the new B's groups are not the old B's.
        await stack.drop_database(b)
        await _admin(stack, f'CREATE DATABASE "{b}"')
        await _migrate(stack.env(b))
        again = await _fetch(stack, b, _CONNECT_GROUPS)
        assert len(again) == 3 and _prefixes(again).isdisjoint(_prefixes(old_groups + new_groups))
        for role in roles:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for database"):
                conn = await _login(stack, b, role)
                await conn.close()
    finally:
        await stack.drop_database(a)
        await stack.drop_database(b)


async def _migrate_in_process(stack: Any, db: str, upto: str | None, tmp: Any) -> None:
    """Migrations (those numbered up to `upto` only, if given: an older Fluxbase) and the
    privilege step, as a superuser, in this process."""
    import shutil

    from fluxbase.db.migrate import migrate, sql_dir
    from fluxbase.db.privileges import apply_privileges

    directory = None
    if upto is not None:
        directory = tmp / f"sql-{db}"
        directory.mkdir(exist_ok=True)
        for f in sql_dir().glob("*.sql"):
            if f.name[:4] <= upto:
                shutil.copy(f, directory / f.name)
    conn = await asyncpg.connect(stack.database_url(db))
    try:
        await migrate(conn, directory)
        await apply_privileges(conn, None, None)
    finally:
        await conn.close()


async def test_existing_deployments_keep_their_groups(stack: Any, tmp_path: Any, caplog: Any) -> None:
    """sql/0051 on a database that already has groups keeps them: named from the database's
    name, or from its name before a rename done before the upgrade (the groups holding its
    CONNECT). Two databases that already share groups (a new one made under a renamed one's
    name before the upgrade) are reported by the privilege step, at every run."""
    from fluxbase.db.privileges import named_prefix

    x = await stack.create_database()
    y = x + "_renamed"
    try:
        await _migrate_in_process(stack, x, "0050", tmp_path)
        before = await _fetch(stack, x, _CONNECT_GROUPS)
        assert _prefixes(before) == {named_prefix(x)}
        await _admin(stack, f'ALTER DATABASE "{x}" RENAME TO "{y}"')
        # A new database under the old name, migrated by the older Fluxbase: it takes the groups.
        await _admin(stack, f'CREATE DATABASE "{x}"')
        await _migrate_in_process(stack, x, "0050", tmp_path)
        assert await _fetch(stack, x, _CONNECT_GROUPS) == before
        caplog.clear()
        await _migrate_in_process(stack, y, None, tmp_path)
        assert await _fetch(stack, y, "SELECT prefix FROM fluxbase.tenant_group_prefix") == [named_prefix(x)]
        assert await _fetch(stack, y, _CONNECT_GROUPS) == before
        assert any(
            r.levelname == "ERROR" and "tenant groups" in r.getMessage() and x in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
    finally:
        await stack.drop_database(x)
        await stack.drop_database(y)
    # A database on its own: the name's prefix, as before, and nothing reported.
    z = await stack.create_database()
    try:
        caplog.clear()
        await _migrate_in_process(stack, z, None, tmp_path)
        assert await _fetch(stack, z, "SELECT prefix FROM fluxbase.tenant_group_prefix") == [named_prefix(z)]
        assert _prefixes(await _fetch(stack, z, _CONNECT_GROUPS)) == {named_prefix(z)}
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.records
    finally:
        await stack.drop_database(z)


async def test_two_migrators_of_a_new_database_choose_one_prefix(stack: Any) -> None:
    """Two `fluxbase migrate` at once on a new database made under a dropped one's name (its
    groups exist): one stored prefix, fresh, and its three groups hold CONNECT there."""
    from fluxbase.db.privileges import named_prefix

    db = await stack.create_database()
    try:
        await _migrate(stack.env(db))
        old = await _fetch(stack, db, _CONNECT_GROUPS)
        await stack.drop_database(db)
        await _admin(stack, f'CREATE DATABASE "{db}"')
        await asyncio.gather(_migrate(stack.env(db)), _migrate(stack.env(db)))
        stored = await _fetch(stack, db, "SELECT prefix FROM fluxbase.tenant_group_prefix")
        assert len(stored) == 1 and stored[0] != named_prefix(db), stored
        groups = await _fetch(stack, db, _CONNECT_GROUPS)
        assert _prefixes(groups) == set(stored) and len(groups) == 3, groups
        assert _prefixes(groups).isdisjoint(_prefixes(old))
    finally:
        await stack.drop_database(db)


async def test_nobody_but_the_migration_writes_the_prefix(api: Api, stack: Any, instance: Any) -> None:
    """The stored prefix decides which roles the privilege step grants this database to: no
    tenant may read or write it (no USAGE on the control plane), and the runtime role only reads
    it (its grant on every control-plane table is taken back for this one)."""
    _, token = await api.new_user()
    pid = await api.new_project(token, "prefix")
    key = await api.new_key(token, pid, "admin")
    for q in (
        "SELECT prefix FROM fluxbase.tenant_group_prefix",
        "UPDATE fluxbase.tenant_group_prefix SET prefix = '000000000000'",
        "DO $$ BEGIN DELETE FROM fluxbase.tenant_group_prefix; END $$",
    ):
        r = await api.sql(key, pid, q)
        assert not r.json()["success"], (q, r.text)
    rt = await asyncpg.connect(stack.runtime_url(instance.dbname))
    try:
        h = await rt.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
        assert h is not None
        for q in (
            "UPDATE fluxbase.tenant_group_prefix SET prefix = '000000000000'",
            "DELETE FROM fluxbase.tenant_group_prefix",
            "INSERT INTO fluxbase.tenant_group_prefix (singleton, prefix) VALUES (false, '000000000000')",
            "TRUNCATE fluxbase.tenant_group_prefix",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await rt.execute(q)
        assert await rt.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix") == h
    finally:
        await rt.close()
