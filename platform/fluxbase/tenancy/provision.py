"""Project schemas and roles: each (project, scope) its own LOGIN role, created, re-keyed and
dropped here (the caller owns the transaction; the runtime role is not a superuser). What needs
the project's roles' administrator runs as the project's provisioner role (tenancy/buckets.py),
in a transaction of its own committed before the caller's."""

from __future__ import annotations

import contextlib

import asyncpg

from fluxbase.config import Settings
from fluxbase.db import extensions
from fluxbase.db.privileges import REALTIME_SENDERS, ROLE_GROUP, direct_grants, tenant_group
from fluxbase.db.quoting import quote_ident, quote_literal
from fluxbase.security.roles import (
    CHECKER,
    EXPORTER,
    ROLES,
    SCOPES,
    role_name,
    role_verifier,
    schema_name,
)
from fluxbase.tenancy import buckets


def _password(settings: Settings, role: str) -> str:
    """The role's password clause value: a SCRAM secret with the tenant iteration count
    (security.roles.role_verifier), never the plain password, which the server would hash with
    the server-wide 4096 iterations that every connection then pays."""
    return quote_literal(role_verifier(settings.auth.secret_key, role, settings.tenant.scram_iterations))


def _role_settings(settings: Settings) -> dict[str, str]:
    t = settings.tenant
    return {
        "statement_timeout": f"{t.statement_timeout_ms}ms",
        "lock_timeout": f"{t.lock_timeout_ms}ms",
        "idle_in_transaction_session_timeout": f"{t.idle_in_transaction_ms}ms",
        "work_mem": f"{t.work_mem_kb}kB",
        "temp_file_limit": f"{t.temp_file_limit_kb}kB",
    }


async def serialise(conn: asyncpg.Connection) -> None:
    """Wait for any other transaction that creates or drops a project's roles.

    Provisioning changes the ACLs of shared catalog rows (the database's, set_config's, plpgsql's,
    the checker functions'): two at once fail with "tuple concurrently updated". A table lock no
    tenant can take (an advisory key is open to every role in the database); SHARE UPDATE
    EXCLUSIVE conflicts with itself, not with reads or writes of the table."""
    await conn.execute("LOCK TABLE fluxbase.projects IN SHARE UPDATE EXCLUSIVE MODE")


async def provision_project(conn: asyncpg.Connection, project_id: str, settings: Settings) -> None:
    """Create the project's schema and its LOGIN roles (caller owns the transaction, and holds the
    serialising lock until it commits; the roles are made by the project's provisioner role, in a
    transaction committed when this returns: a caller that fails after it drops the project)."""
    await serialise(conn)
    async with buckets.acting(conn, project_id, settings, new=True) as c:
        await _provision(c, project_id, settings)


async def _provision(conn: asyncpg.Connection, project_id: str, settings: Settings) -> None:
    schema = quote_ident(schema_name(project_id))
    admin, rw, ro = (quote_ident(role_name(project_id, s)) for s in ("admin", "readwrite", "read"))
    dbname = await conn.fetchval("SELECT current_database()")
    limit = settings.tenant.role_connection_limit
    # The project's schema, then every extension schema: PostgreSQL skips those the role may not
    # use, so an extension becomes visible when the project installs it (db/extensions.py).
    path = extensions.search_path(project_id)
    for scope in SCOPES:
        role = role_name(project_id, scope)
        pw = _password(settings, role)
        await conn.execute(
            f"CREATE ROLE {quote_ident(role)} LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE "
            f"NOREPLICATION NOBYPASSRLS CONNECTION LIMIT {int(limit)} PASSWORD {pw}"
        )
        # What it needs outside its schema, through its tenant group (db/privileges.py): CONNECT;
        # only the admin role may create temporary objects: with none of its own, a read or
        # readwrite key (an end user) cannot run code it wrote anywhere — a temporary cast called
        # by a foreign key's check trigger let it forge capture events (hostile review 2).
        await _join_group(conn, role, scope, dbname)
        await conn.execute(f"ALTER ROLE {quote_ident(role)} SET search_path = {path}")
        for name, value in _role_settings(settings).items():
            await conn.execute(f"ALTER ROLE {quote_ident(role)} SET {name} = {quote_literal(value)}")
    # Only the admin role may change request-local settings or run plpgsql (DO blocks,
    # functions): read and readwrite roles must not be able to forge auth.uid() (sql/0007). The
    # admin keeps set_config because pg_dump (the export, logged in as it) calls it on connecting;
    # what it could do with it, plpgsql's EXECUTE 'SET …' can as well, and both end with the
    # statement that ran them (the caps are asserted again: tenancy.statements.ASSERTED). Both
    # come with its group (db/privileges.GROUP_PRIVILEGES), joined above.
    # realtime.broadcast (sql/0036) for the roles that may write; the function applies the
    # project's topic rules. Dropping the role drops the membership.
    await conn.execute(f"GRANT {REALTIME_SENDERS} TO {admin}, {rw} WITH INHERIT TRUE, SET FALSE")
    await _provision_checker(conn, project_id, settings, path)
    await conn.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {admin}")
    # The provisioner is not a superuser: what only the schema's owner may do, it does as the
    # owner (it may SET ROLE to the roles it created; sql/0012, db/privileges.py).
    await conn.execute(f"SET LOCAL ROLE {admin}")
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {rw}, {ro}")
    # The owner of the fluxbase_guard.own_* deparsers (sql/0021) prints names as this schema's
    # sessions do only if it may use the schema.
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO fluxbase_catalog_own")
    defaults = f"ALTER DEFAULT PRIVILEGES FOR ROLE {admin} IN SCHEMA {schema}"
    await conn.execute(f"{defaults} GRANT SELECT, INSERT, UPDATE ON TABLES TO {rw}")
    await conn.execute(f"{defaults} GRANT SELECT ON TABLES TO {ro}")
    await conn.execute(f"{defaults} GRANT USAGE, SELECT ON SEQUENCES TO {rw}")
    await conn.execute(f"{defaults} GRANT SELECT ON SEQUENCES TO {ro}")
    await conn.execute("SET LOCAL ROLE NONE")


async def _provision_checker(
    conn: asyncpg.Connection, project_id: str, settings: Settings, path: str
) -> None:
    """The realtime RLS checker role: inherits the read role, may set the identity, and may call
    the check functions (sql/0008), which nobody else may."""
    rt, ro = (quote_ident(role_name(project_id, s)) for s in (CHECKER, "read"))
    pw = _password(settings, role_name(project_id, CHECKER))
    await conn.execute(
        f"CREATE ROLE {rt} LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
        f"CONNECTION LIMIT {int(settings.tenant.role_connection_limit)} PASSWORD {pw}"
    )
    # CONNECT, set_config and the check functions: its group's (db/privileges.GROUP_PRIVILEGES).
    await _join_group(
        conn, role_name(project_id, CHECKER), CHECKER, await conn.fetchval("SELECT current_database()")
    )
    await conn.execute(f"ALTER ROLE {rt} SET search_path = {path}")
    for name, value in _role_settings(settings).items():
        await conn.execute(f"ALTER ROLE {rt} SET {name} = {quote_literal(value)}")
    await conn.execute(f"GRANT {ro} TO {rt}")
    # Checks run as the subscriber's own role (sql/0015): read, or readwrite without its rights.
    rw = quote_ident(role_name(project_id, "readwrite"))
    await conn.execute(f"GRANT {rw} TO {rt} WITH INHERIT FALSE, SET TRUE")


async def _join_group(conn: asyncpg.Connection, role: str, kind: str, database: str) -> None:
    """Make the project role a member of its tenant group: it inherits the group's privileges
    but may not SET ROLE to it, and holds no ADMIN on it (it may not grant it on)."""
    group = quote_ident(tenant_group(database, ROLE_GROUP[kind]))
    await conn.execute(f"GRANT {group} TO {quote_ident(role)} WITH INHERIT TRUE, SET FALSE")


async def ensure_export_role(conn: asyncpg.Connection, project_id: str, settings: Settings) -> str:
    """The project's export role, created on first use (caller owns the transaction); returns its name.

    pg_dump must read the project's function bodies, defaults, views and policies, which sql/0021
    closes to tenant roles (pg_catalog has no per-row privileges, so no tenant role can be given
    its own rows only). This role holds the admin role's privileges (to lock and copy the tables)
    and the catalog reader's. It is safe because pg_dump evaluates nothing of the tenant's: it reads
    catalogs with built-in functions under an empty search_path, copies tables with built-in type
    output functions (only superusers create base types), and refuses rather than applies row
    security (row_security = off). Nobody but pg_dump logs in as it; its password derives from the
    server secret like every project role's."""
    role = role_name(project_id, EXPORTER)
    if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
        return role
    await serialise(conn)
    if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
        return role  # created while we waited
    async with buckets.acting(conn, project_id, settings) as c:
        r = quote_ident(role)
        admin = quote_ident(role_name(project_id, "admin"))
        pw = _password(settings, role)
        await c.execute(
            f"CREATE ROLE {r} LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            f"CONNECTION LIMIT 2 PASSWORD {pw}"
        )
        await _join_group(c, role, EXPORTER, await c.fetchval("SELECT current_database()"))
        await c.execute(f"ALTER ROLE {r} SET search_path = {quote_ident(schema_name(project_id))}")
        for name, value in _role_settings(settings).items():
            await c.execute(f"ALTER ROLE {r} SET {name} = {quote_literal(value)}")
        await c.execute(f"GRANT {admin} TO {r} WITH INHERIT TRUE, SET FALSE")
        await c.execute(f"GRANT fluxbase_catalog_reader TO {r} WITH INHERIT TRUE, SET FALSE")
    return role


async def drop_project(conn: asyncpg.Connection, project_id: str) -> None:
    """Remove the project's schema, objects and roles (caller owns the transaction; what its roles'
    provisioner does commits when this returns).

    Runs as the runtime role or the project's provisioner (not superusers): what only an owner may
    drop, it drops as that role (SET LOCAL ROLE); the privileges it granted the roles, it revokes."""
    roles = [role_name(project_id, s) for s in ROLES]
    # No new session of the project from here on (committed at once where a provisioner acts):
    # one opened after its sessions are terminated below would take the locks the drop needs,
    # and the drop would wait its lock_timeout holding the lock every project's provisioning
    # waits for (a tenant that keeps statements coming stalled everyone's; review 13). Given
    # back if the drop fails.
    await _logins(conn, project_id, roles, allowed=False)
    try:
        await serialise(conn)
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])", roles
        )
        await _revoke_foreign_grants(conn, roles)
        async with buckets.acting(conn, project_id) as c:
            await _drop(c, project_id, roles)
    except BaseException:
        with contextlib.suppress(Exception):
            await _logins(conn, project_id, roles, allowed=True)
        raise


# What another project's roles granted this project's roles on their objects (a tenant may grant
# its objects to any role): the entries that keep DROP ROLE from succeeding ("some objects depend
# on it"), found through pg_shdepend's index, with who granted them.
_FOREIGN_GRANTS_SQL = """
WITH mine AS (SELECT oid, rolname FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[])),
deps AS (
    SELECT d.classid, d.objid, d.objsubid FROM pg_catalog.pg_shdepend d
    WHERE d.refclassid = 'pg_catalog.pg_authid'::regclass AND d.refobjid IN (SELECT oid FROM mine)
      AND d.deptype = 'a'
      AND d.dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
),
entries AS (
    SELECT 'TABLE ' || c.oid::regclass::text AS target, c.relacl AS acl
    FROM pg_catalog.pg_class c JOIN deps ON deps.classid = 'pg_catalog.pg_class'::regclass
         AND deps.objid = c.oid AND deps.objsubid = 0
    UNION ALL
    SELECT '(' || quote_ident(a.attname) || ') ON TABLE ' || a.attrelid::regclass::text, a.attacl
    FROM pg_catalog.pg_attribute a JOIN deps ON deps.classid = 'pg_catalog.pg_class'::regclass
         AND deps.objid = a.attrelid AND deps.objsubid = a.attnum
    UNION ALL
    SELECT 'ROUTINE ' || p.oid::regprocedure::text, p.proacl
    FROM pg_catalog.pg_proc p
    JOIN deps ON deps.classid = 'pg_catalog.pg_proc'::regclass AND deps.objid = p.oid
    UNION ALL
    SELECT 'TYPE ' || t.oid::regtype::text, t.typacl
    FROM pg_catalog.pg_type t
    JOIN deps ON deps.classid = 'pg_catalog.pg_type'::regclass AND deps.objid = t.oid
    UNION ALL
    SELECT 'SCHEMA ' || quote_ident(n.nspname), n.nspacl
    FROM pg_catalog.pg_namespace n
    JOIN deps ON deps.classid = 'pg_catalog.pg_namespace'::regclass AND deps.objid = n.oid
    UNION ALL
    SELECT 'LARGE OBJECT ' || l.oid::text, l.lomacl
    FROM pg_catalog.pg_largeobject_metadata l
    JOIN deps ON deps.classid = 'pg_catalog.pg_largeobject'::regclass AND deps.objid = l.oid
)
SELECT DISTINCT e.target, m.rolname AS grantee, g.rolname AS grantor
FROM entries e, aclexplode(e.acl) x
JOIN mine m ON m.oid = x.grantee
JOIN pg_catalog.pg_roles g ON g.oid = x.grantor
WHERE g.rolname ~ '^p_[0-9a-f]{16}_' AND NOT g.rolname = ANY($1::text[])
ORDER BY 3, 1, 2
"""


async def _revoke_foreign_grants(conn: asyncpg.Connection, roles: list[str]) -> None:
    """Revoke what other projects' roles granted these roles, each as its grantor (acting as the
    grantor's project's administrator): without it one tenant could keep any project whose id it
    knows from being deleted by granting that project's role a privilege on its own table."""
    rows = await conn.fetch(_FOREIGN_GRANTS_SQL, roles)
    by_grantor: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        by_grantor.setdefault(r["grantor"], []).append(r)
    for grantor, grants in by_grantor.items():
        other = grantor.split("_")[1]
        async with buckets.acting(conn, other) as c:
            await c.execute(f"SET LOCAL ROLE {quote_ident(grantor)}")
            for g in grants:
                await c.execute(
                    f"REVOKE ALL {g['target']} FROM {quote_ident(g['grantee'])} CASCADE"
                    if g["target"].startswith("(")
                    else f"REVOKE ALL ON {g['target']} FROM {quote_ident(g['grantee'])} CASCADE"
                )
            await c.execute("RESET ROLE")


async def _logins(conn: asyncpg.Connection, project_id: str, roles: list[str], *, allowed: bool) -> None:
    """Let the project's roles log in, or not (as their administrator)."""
    async with buckets.acting(conn, project_id) as c:
        for row in await c.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1::text[])", roles):
            await c.execute(f"ALTER ROLE {quote_ident(row['rolname'])} {'LOGIN' if allowed else 'NOLOGIN'}")


async def _drop(conn: asyncpg.Connection, project_id: str, roles: list[str]) -> None:
    existing = {
        r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", roles)
    }
    # What create_extension granted the project's roles (USAGE on extension schemas), revoked by
    # the role that granted it (sql/0023).
    await conn.execute("SELECT fluxbase_guard.forget_extensions($1)", project_id)
    admin = role_name(project_id, "admin")
    if admin in existing:
        await conn.execute(f"SET LOCAL ROLE {quote_ident(admin)}")
    await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema_name(project_id))} CASCADE")
    await conn.execute("SET LOCAL ROLE NONE")
    # Entries of their own in the shared ACLs (granted before the tenant groups and not yet moved
    # onto them by the privilege step): revoked by whoever granted them, if that is this role.
    # Their group memberships go with the roles.
    me = await conn.fetchval("SELECT current_user")
    for g in await direct_grants(conn, sorted(existing)):
        if g["grantor"] == me:
            await conn.execute(
                f"REVOKE {', '.join(g['privs'])} ON {g['target']} FROM {quote_ident(g['grantee'])}"
            )
    for role in roles:
        if role not in existing:
            continue
        r = quote_ident(role)
        await conn.execute(f"SET LOCAL ROLE {r}")
        await conn.execute(f"DROP OWNED BY {r} CASCADE")
        await conn.execute("SET LOCAL ROLE NONE")
        await conn.execute(f"DROP ROLE {r}")


async def sync_role_passwords(conn: asyncpg.Connection, settings: Settings) -> int:
    """Re-derive every tenant role password (after FLUXBASE_SECRET_KEY rotation, or a change of
    FLUXBASE_TENANT_SCRAM_ITERATIONS); returns how many changed. Runs as the migration role (a
    superuser, which may read pg_authid): a role whose stored secret is already the derived one is
    left alone, so a restart with 10 000 projects costs one query, not 50 000 statements."""
    ids = [r["id"] for r in await conn.fetch("SELECT id FROM fluxbase.projects")]
    roles = [role_name(pid, kind) for pid in ids for kind in ROLES]
    n = 0
    for row in await conn.fetch(
        "SELECT rolname, rolpassword FROM pg_catalog.pg_authid WHERE rolname = ANY($1::text[])", roles
    ):
        role = row["rolname"]  # an export role exists from the project's first export on
        pw = role_verifier(settings.auth.secret_key, role, settings.tenant.scram_iterations)
        if row["rolpassword"] != pw:
            await conn.execute(f"ALTER ROLE {quote_ident(role)} PASSWORD {quote_literal(pw)}")
            n += 1
    return n
