"""Project schemas and roles: each (project, scope) its own LOGIN role, created, re-keyed and
dropped here (the caller owns the transaction; the runtime role is not a superuser). What needs
the project's roles' administrator runs as the project's provisioner role (tenancy/buckets.py),
in a transaction of its own committed before the caller's."""

from __future__ import annotations

import contextlib

import asyncpg

from fluxbase.config import Settings
from fluxbase.db import extensions
from fluxbase.db.privileges import REALTIME_SENDERS, ROLE_GROUP, direct_grants, group_prefix, tenant_group
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
    # Read here: the provisioner may not read the control plane (sql/0051).
    prefix = await group_prefix(conn)
    async with buckets.acting(conn, project_id, settings, new=True) as c:
        await _provision(c, project_id, settings, prefix)


async def _provision(conn: asyncpg.Connection, project_id: str, settings: Settings, prefix: str) -> None:
    schema = quote_ident(schema_name(project_id))
    admin, rw, ro = (quote_ident(role_name(project_id, s)) for s in ("admin", "readwrite", "read"))
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
        await _join_group(conn, role, scope, prefix)
        await _set_defaults(conn, role, settings, path)
    # Only the admin role may change request-local settings or run plpgsql (DO blocks,
    # functions): read and readwrite roles must not be able to forge auth.uid() (sql/0007). The
    # admin keeps set_config because pg_dump (the export, logged in as it) calls it on connecting;
    # what it could do with it, plpgsql's EXECUTE 'SET …' can as well, and both end with the
    # statement that ran them (the caps are asserted again: tenancy.statements.ASSERTED). Both
    # come with its group (db/privileges.GROUP_PRIVILEGES), joined above.
    # realtime.broadcast (sql/0036) for the roles that may write; the function applies the
    # project's topic rules. Dropping the role drops the membership.
    await conn.execute(f"GRANT {REALTIME_SENDERS} TO {admin}, {rw} WITH INHERIT TRUE, SET FALSE")
    await _provision_checker(conn, project_id, settings, path, prefix)
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
    conn: asyncpg.Connection, project_id: str, settings: Settings, path: str, prefix: str
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
    await _join_group(conn, role_name(project_id, CHECKER), CHECKER, prefix)
    await _set_defaults(conn, role_name(project_id, CHECKER), settings, path)
    await conn.execute(f"GRANT {ro} TO {rt}")
    # Checks run as the subscriber's own role (sql/0015): read, or readwrite without its rights.
    rw = quote_ident(role_name(project_id, "readwrite"))
    await conn.execute(f"GRANT {rw} TO {rt} WITH INHERIT FALSE, SET TRUE")


async def _set_defaults(conn: asyncpg.Connection, role: str, settings: Settings, path: str) -> None:
    """The new role's defaults (search_path, _role_settings), in one round trip (each is an ALTER
    ROLE of its own; the provisioning runs about thirty)."""
    r = quote_ident(role)
    values = {"search_path": path} | {n: quote_literal(v) for n, v in _role_settings(settings).items()}
    await conn.execute(";\n".join(f"ALTER ROLE {r} SET {n} = {v}" for n, v in values.items()))


async def _join_group(conn: asyncpg.Connection, role: str, kind: str, prefix: str) -> None:
    """Make the project role a member of its tenant group (`prefix`: the database's group_prefix):
    it inherits the group's privileges but may not SET ROLE to it, and holds no ADMIN on it (it
    may not grant it on)."""
    group = quote_ident(tenant_group(prefix, ROLE_GROUP[kind]))
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
    prefix = await group_prefix(conn)
    async with buckets.acting(conn, project_id, settings) as c:
        r = quote_ident(role)
        admin = quote_ident(role_name(project_id, "admin"))
        pw = _password(settings, role)
        await c.execute(
            f"CREATE ROLE {r} LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            f"CONNECTION LIMIT 2 PASSWORD {pw}"
        )
        await _join_group(c, role, EXPORTER, prefix)
        await _set_defaults(c, role, settings, quote_ident(schema_name(project_id)))
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
        as_groups = await _revoke_foreign(conn, roles)
        async with buckets.acting(conn, project_id) as c:
            await _as_grantors(c, as_groups)
            await _drop(c, project_id, roles)
    except BaseException:
        with contextlib.suppress(Exception):
            await _logins(conn, project_id, roles, allowed=True)
        raise


# What other projects' roles gave the dying roles (hostile review 14): an owner may grant its
# objects to any role, and create policies and default privileges naming any role. DROP OWNED BY,
# run as the dying role, revokes only the entries that role could revoke itself (it errors on an
# object it holds nothing else on), and leaves a policy on a table it does not own: DROP ROLE then
# failed, and any tenant kept any other project from being deleted (or a move from removing the
# source's copy). Entries in ACLs (table, column, sequence, function, schema, type, large object)
# naming one of `$1` and granted by another project's role, or by one of the shared groups in `$2`
# (a member re-granting what an owner granted a group WITH GRANT OPTION grants as the group);
# policies of another project's tables naming one of them. Default privileges are removed by DROP
# OWNED whoever set them.
_FOREIGN_ACL_SQL = r"""
WITH dying AS (SELECT oid, rolname FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[])),
deps AS (
    SELECT DISTINCT s.classid, s.objid FROM pg_catalog.pg_shdepend s
    WHERE s.dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
      AND s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass AND s.deptype = 'a'
      AND s.refobjid IN (SELECT oid FROM dying)
),
acls AS (
    SELECT CASE WHEN c.relkind = 'S' THEN 'SEQUENCE ' ELSE 'TABLE ' END
               || pg_catalog.format('%I.%I', n.nspname, c.relname) AS target,
           NULL::text AS col, c.relacl AS acl
    FROM deps d JOIN pg_catalog.pg_class c ON c.oid = d.objid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    SELECT 'TABLE ' || pg_catalog.format('%I.%I', n.nspname, c.relname),
           pg_catalog.quote_ident(a.attname), a.attacl
    FROM deps d JOIN pg_catalog.pg_class c ON c.oid = d.objid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND a.attacl IS NOT NULL
    WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    SELECT CASE WHEN p.prokind = 'p' THEN 'PROCEDURE ' ELSE 'FUNCTION ' END
               || pg_catalog.format('%I.%I(%s)', n.nspname, p.proname,
                                    pg_catalog.pg_get_function_identity_arguments(p.oid)), NULL, p.proacl
    FROM deps d JOIN pg_catalog.pg_proc p ON p.oid = d.objid
    JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
    UNION ALL
    SELECT 'SCHEMA ' || pg_catalog.quote_ident(n.nspname), NULL, n.nspacl
    FROM deps d JOIN pg_catalog.pg_namespace n ON n.oid = d.objid
    WHERE d.classid = 'pg_catalog.pg_namespace'::pg_catalog.regclass
    UNION ALL
    SELECT 'TYPE ' || pg_catalog.format('%I.%I', n.nspname, t.typname), NULL, t.typacl
    FROM deps d JOIN pg_catalog.pg_type t ON t.oid = d.objid
    JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
    WHERE d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass
    UNION ALL
    SELECT 'LARGE OBJECT ' || m.oid::text, NULL, m.lomacl
    FROM deps d JOIN pg_catalog.pg_largeobject_metadata m ON m.oid = d.objid
    WHERE d.classid = 'pg_catalog.pg_largeobject'::pg_catalog.regclass
)
SELECT a.target, a.col, gr.rolname AS grantor, d.rolname AS grantee,
       pg_catalog.array_agg(DISTINCT x.privilege_type ORDER BY x.privilege_type) AS privs
FROM acls a CROSS JOIN LATERAL pg_catalog.aclexplode(a.acl) x
JOIN dying d ON d.oid = x.grantee JOIN pg_catalog.pg_roles gr ON gr.oid = x.grantor
WHERE x.grantor NOT IN (SELECT oid FROM dying)
  AND (gr.rolname ~ '^p_[0-9a-f]{16}_(admin|rw|ro|rt|ex)$' OR gr.rolname = ANY ($2::text[]))
GROUP BY 1, 2, 3, 4
ORDER BY 3, 1, 2, 4
"""

_FOREIGN_POLICY_SQL = r"""
WITH dying AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[]))
SELECT pg_catalog.quote_ident(pol.polname) AS name, pg_catalog.format('%I.%I', n.nspname, c.relname) AS tbl,
       o.rolname AS owner,
       ARRAY(SELECT r.rolname FROM pg_catalog.unnest(pol.polroles) u(oid)
             JOIN pg_catalog.pg_roles r ON r.oid = u.oid
             WHERE u.oid NOT IN (SELECT oid FROM dying) ORDER BY 1) AS keep,
       0::oid = ANY (pol.polroles) AS public
FROM pg_catalog.pg_policy pol JOIN pg_catalog.pg_class c ON c.oid = pol.polrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
WHERE pol.polroles && ARRAY(SELECT oid FROM dying)
  AND c.relowner NOT IN (SELECT oid FROM dying) AND o.rolname ~ '^p_[0-9a-f]{16}_(admin|rw|ro|rt|ex)$'
ORDER BY 3, 2, 1
"""


async def _revoke_foreign(conn: asyncpg.Connection, roles: list[str]) -> list[tuple[str, str]]:
    """Take back what other projects' roles gave `roles` (_FOREIGN_ACL_SQL), each as the role that
    granted it (as the table's owner for a policy: the dying roles leave its role list, and a
    policy left with none is dropped, as DROP OWNED does for a superuser; it applied to them
    only). Done by the grantor project's own administrator, committed before the drop. What a
    shared group granted is returned, (group, statement): the dying project's administrator runs
    it as the group (it holds SET on them, db/privileges.py) in the drop's own transaction (the
    drop's DROP OWNED would wait for the ACL rows a transaction of its own left locked)."""
    # This database's tenant groups (extension schemas' included, sql/0046) and realtime senders.
    prefix = tenant_group(await group_prefix(conn), "")
    shared = [
        r["rolname"]
        for r in await conn.fetch(
            "SELECT rolname FROM pg_catalog.pg_roles WHERE pg_catalog.starts_with(rolname, $1) "
            "OR rolname = $2",
            prefix,
            REALTIME_SENDERS,
        )
    ]
    work: dict[str, list[tuple[str, str]]] = {}
    # Names as the provisioner's sessions read them (search_path pg_catalog, pg_temp: every type
    # of a function's arguments qualified unless it is pg_catalog's); the caller's path after.
    path = await conn.fetchval("SELECT pg_catalog.current_setting('search_path')")
    await conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
    try:
        acls = await conn.fetch(_FOREIGN_ACL_SQL, roles, shared)
    finally:
        await conn.execute("SELECT pg_catalog.set_config('search_path', $1, true)", path)
    for g in acls:
        privs = ", ".join(f"{p} ({g['col']})" if g["col"] else p for p in g["privs"])
        stmt = f"REVOKE {privs} ON {g['target']} FROM {quote_ident(g['grantee'])} CASCADE"
        work.setdefault(g["grantor"], []).append((g["grantor"], stmt))
    for p in await conn.fetch(_FOREIGN_POLICY_SQL, roles):
        keep = ", ".join(quote_ident(r) for r in p["keep"]) or None
        if p["public"]:
            keep = ", ".join(x for x in ("public", keep) if x)
        stmt = (
            f"ALTER POLICY {p['name']} ON {p['tbl']} TO {keep}"
            if keep
            else f"DROP POLICY {p['name']} ON {p['tbl']}"
        )
        work.setdefault(p["owner"], []).append((p["owner"], stmt))
    by_project: dict[str, list[tuple[str, str]]] = {}
    for grantor, stmts in work.items():
        if grantor not in shared:
            by_project.setdefault(grantor.split("_")[1], []).extend(stmts)
    for pid, stmts in sorted(by_project.items()):
        async with buckets.acting(conn, pid) as c:
            await _as_grantors(c, stmts)
    return [st for grantor in shared for st in work.get(grantor, [])]


async def _as_grantors(conn: asyncpg.Connection, stmts: list[tuple[str, str]]) -> None:
    for role, stmt in stmts:
        await conn.execute(f"SET LOCAL ROLE {quote_ident(role)}")
        await conn.execute(stmt)
        await conn.execute("SET LOCAL ROLE NONE")


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
