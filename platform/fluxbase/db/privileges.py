"""The privilege model, applied after every migration run (docs/security.md).

Migrations run as a superuser (event triggers need one) and so create objects it owns. This
step, idempotent and run after every `migrate`, hands the control plane to the NOLOGIN role
`fluxbase_owner`, each platform SECURITY DEFINER function to the NOLOGIN role that holds only
what it needs (created by sql/0012), and gives the runtime login role exactly what the
processes use: DML on the control plane (tables of later migration files included, because
this runs after them), CREATEROLE for project roles, and the grant options it passes on to
them. Cluster-wide changes (roles, role settings, memberships) are serialised across databases
by a lock on pg_authid, because several databases of one cluster may migrate at once.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets

import asyncpg

from fluxbase.db.quoting import quote_ident, quote_literal
from fluxbase.security.roles import CHECKER_FUNCTIONS, ROLES, role_name
from fluxbase.tenancy.buckets import PREFIX as PROVISIONER_PREFIX
from fluxbase.tenancy.buckets import all_buckets, bucket_of, bucket_verifier

log = logging.getLogger(__name__)

OWNER = "fluxbase_owner"
# `realtime` holds what tenant SQL calls by name (sql/0036: realtime.broadcast).
PLATFORM_SCHEMAS = ("fluxbase", "fluxbase_guard", "fluxbase_capture", "auth", "realtime")

# Every platform SECURITY DEFINER function and the role that owns it. A definer function not
# listed here is owned by OWNER and reported (tests/test_privilege.py fails on it): add it here
# with a role of its own, holding only what it needs, granted in its migration file.
DEFINER_OWNERS = {
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

# sql/0036: the group whose members (each project's admin and readwrite roles, granted at
# provisioning) may call realtime.broadcast; the runtime holds it with ADMIN and SET, never
# INHERIT (_runtime_role).
REALTIME_SENDERS = "fluxbase_realtime_senders"

# sql/0021: the group role that may read the catalog content closed to PUBLIC (function bodies,
# expressions, comments, statistics), and the platform roles that are its members. Tenant roles
# never are; a project's export role is, for the length of its pg_dump (services/dump.py).
CATALOG_READER = "fluxbase_catalog_reader"
CATALOG_READERS = ("fluxbase_catalog_own", "fluxbase_guard_quota")

# The tenant groups (issue 19): NOLOGIN roles, one per privilege set, that hold what project
# roles need outside their own schema (CONNECT and TEMPORARY on the database, EXECUTE on
# set_config and the realtime checker functions, USAGE on plpgsql). Each project role is granted
# its group WITH INHERIT TRUE, SET FALSE at provisioning, so those ACLs hold three entries
# whatever the number of projects, instead of one per role (40 034 entries on the database at
# 10 000 projects, scanned at every connection start, rewritten by every grant). Roles are
# cluster-wide and database privileges are not: the groups are per database, or a tenant of one
# database would gain CONNECT on every other database of the server. Their names' prefix is the
# database's own, stored in it (sql/0051, group_prefix), not derived from its name at each use:
# a renamed database keeps its groups, and a new database made under an old one's name gets
# groups of its own, not the old one's (whose project roles are members).
# kind -> (database privileges, set_config, plpgsql, checker functions)
GROUP_PRIVILEGES = {
    "admin": ("CONNECT, TEMPORARY", True, True, False),
    "checker": ("CONNECT", True, False, True),
    "connect": ("CONNECT", False, False, False),
}
# Each project role's group (security.roles.ROLES): the export role also inherits the admin role.
ROLE_GROUP = {
    "admin": "admin",
    "realtime": "checker",
    "read": "connect",
    "readwrite": "connect",
    "export": "connect",
}
_ROLE_SUFFIX_GROUP = {"admin": "admin", "rt": "checker", "ro": "connect", "rw": "connect", "ex": "connect"}
SET_CONFIG = "FUNCTION pg_catalog.set_config(text, text, boolean)"


_PREFIX_RE = re.compile(r"[0-9a-f]{12}")


def named_prefix(database: str) -> str:
    """The group prefix computed from a database's name: every database's before sql/0051, and a
    new database's first choice (sql/0051 stores what it chose)."""
    return hashlib.sha256(f"fluxbase-tenant-group:{database}".encode()).hexdigest()[:12]


async def group_prefix(conn: asyncpg.Connection) -> str:
    """This database's tenant group prefix (`<h>` of fluxbase_tenant_<h>_<kind>), as stored by
    sql/0051: chosen once, so a renamed database keeps its groups and a new database of an old
    one's name does not get them. Before sql/0051 (a test migrating a subset): from the name."""
    row = await conn.fetchrow(
        "SELECT pg_catalog.current_database() AS db, "
        "pg_catalog.to_regclass('fluxbase.tenant_group_prefix') IS NOT NULL AS stored"
    )
    if not row["stored"]:
        return named_prefix(row["db"])
    h = await conn.fetchval("SELECT prefix FROM fluxbase.tenant_group_prefix")
    if not isinstance(h, str) or not _PREFIX_RE.fullmatch(h):
        raise RuntimeError("fluxbase.tenant_group_prefix holds no valid prefix (sql/0051)")
    return h


def tenant_group(prefix: str, kind: str) -> str:
    """The database's tenant group of `kind` (GROUP_PRIVILEGES), `prefix` its group_prefix: one
    name per database of the server."""
    return f"fluxbase_tenant_{prefix}_{kind}"


def extension_group(prefix: str, schema: str) -> str:
    """The database's tenant group for an extension schema (sql/0051 computes the same name)."""
    return tenant_group(prefix, "ext_" + hashlib.sha256(schema.encode()).hexdigest()[:8])


def tenant_groups(prefix: str) -> list[str]:
    return [tenant_group(prefix, kind) for kind in GROUP_PRIVILEGES]


# Session settings the runtime writes into project roles (ALTER ROLE ... SET) that only a
# superuser or a holder of SET on the parameter may set.
SUSET_ROLE_SETTINGS = ("temp_file_limit",)

_FUNCTIONS_SQL = """
SELECT p.oid::regprocedure::text AS sig, n.nspname, p.prosecdef, pg_get_userbyid(p.proowner) AS owner,
       p.prokind::text AS prokind,
       (SELECT substr(c, 13) FROM unnest(p.proconfig) c WHERE starts_with(c, 'search_path=')) AS search_path
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY($1::text[])
"""

_RELATIONS_SQL = """
SELECT c.oid::regclass::text AS name, c.relkind::text AS relkind, pg_get_userbyid(c.relowner) AS owner,
       EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
               AND d.deptype IN ('a', 'i')) AS linked
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
"""


def _sig(row: asyncpg.Record) -> str:
    """regprocedure text without spaces after commas, schema-qualified."""
    sig = str(row["sig"]).replace(", ", ",")
    return sig if "." in sig.split("(")[0] else f"{row['nspname']}.{sig}"


async def apply_privileges(
    conn: asyncpg.Connection, runtime_user: str | None, runtime_password: str | None
) -> None:
    """Owners and grants of the privilege model; `runtime_user` (with its password, if known) is
    the login role of api/realtime/worker, or None when the processes log in as the migrating
    role itself (a development override)."""
    if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        raise RuntimeError("the post-migration privilege step must run as a superuser")
    if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", OWNER):
        return  # migrations before sql/0012 (a test migrating a subset)
    async with conn.transaction():
        # One privilege step per database at a time: two processes starting at once on a new
        # database both re-own and grant the same rows ("tuple concurrently updated"). The
        # ledger's lock, as migrate() takes it (no tenant may take it: not an advisory key),
        # taken before pg_authid's below.
        await conn.execute("LOCK TABLE fluxbase.schema_migrations IN SHARE ROW EXCLUSIVE MODE")
        await _own_control_plane(conn)
        # One database at a time for the cluster-wide part (roles, memberships, role
        # settings); taken after the per-database part, so it is held for as short as may be.
        await conn.execute("LOCK TABLE pg_catalog.pg_authid IN SHARE ROW EXCLUSIVE MODE")
        for member in CATALOG_READERS:
            await _grant_reader(conn, member, admin=False)
        await _tenant_groups(conn)
        if runtime_user:
            await _runtime_role(conn, runtime_user, runtime_password)
        await move_to_groups(conn)


async def _grant_reader(conn: asyncpg.Connection, member: str, *, admin: bool) -> None:
    """Make `member` an inheriting member of the catalog reader role (sql/0021), if both exist;
    `admin`: it may grant the role on (the runtime, to project export roles)."""
    row = await conn.fetchrow(
        """SELECT (SELECT oid FROM pg_roles WHERE rolname = $1) AS reader,
                  (SELECT oid FROM pg_roles WHERE rolname = $2) AS member,
                  EXISTS (SELECT 1 FROM pg_auth_members m
                          WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = $1)
                            AND m.member = (SELECT oid FROM pg_roles WHERE rolname = $2)
                            AND m.inherit_option AND (m.admin_option OR NOT $3)) AS done""",
        CATALOG_READER,
        member,
        admin,
    )
    if row["reader"] is None or row["member"] is None or row["done"]:
        return
    options = "ADMIN OPTION, INHERIT TRUE" if admin else "INHERIT TRUE"
    await conn.execute(f"GRANT {CATALOG_READER} TO {quote_ident(member)} WITH {options}")


async def _own_control_plane(conn: asyncpg.Connection) -> None:
    for schema in PLATFORM_SCHEMAS:
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", schema
        )
        if owner is not None and owner != OWNER:
            await conn.execute(f"ALTER SCHEMA {quote_ident(schema)} OWNER TO {OWNER}")
    # Tables first: their owned sequences follow them (and cannot be re-owned on their own).
    rels = await conn.fetch(_RELATIONS_SQL, list(PLATFORM_SCHEMAS))
    for r in sorted(rels, key=lambda r: r["relkind"] == "S"):
        if r["owner"] == OWNER or (r["relkind"] == "S" and r["linked"]):
            continue
        kind = {"S": "SEQUENCE", "v": "VIEW", "m": "MATERIALIZED VIEW", "f": "FOREIGN TABLE"}.get(
            r["relkind"], "TABLE"
        )
        await conn.execute(f"ALTER {kind} {r['name']} OWNER TO {OWNER}")
    for f in await conn.fetch(_FUNCTIONS_SQL, list(PLATFORM_SCHEMAS)):
        sig = _sig(f)
        want = DEFINER_OWNERS.get(sig, OWNER) if f["prosecdef"] else OWNER
        if f["prosecdef"] and sig not in DEFINER_OWNERS:
            log.warning("SECURITY DEFINER function %s has no owner role of its own (db/privileges.py)", sig)
        if f["prosecdef"] or f["search_path"] is not None:  # (invoker ones may be called by definers)
            await _pin_search_path(conn, sig, f["search_path"], f["prokind"])
        if f["owner"] != want:
            kind = "PROCEDURE" if f["prokind"] == "p" else "FUNCTION"
            await conn.execute(f"ALTER {kind} {sig} OWNER TO {quote_ident(want)}")


async def _pin_search_path(conn: asyncpg.Connection, sig: str, path: str | None, prokind: str) -> None:
    """A definer's search_path must exist and end with pg_temp: unlisted, the caller's temporary
    schema is searched first for types and relations (a tenant's pg_temp.text domain would run
    its CHECK function with the owner's rights). Appending pg_temp changes nothing else."""
    parts = [p.strip() for p in (path or "").split(",") if p.strip()]
    if parts and parts[-1] == "pg_temp":
        return
    parts = [p for p in parts if p != "pg_temp"] or ["pg_catalog"]
    kind = "PROCEDURE" if prokind == "p" else "FUNCTION"
    await conn.execute(f"ALTER {kind} {sig} SET search_path = {', '.join([*parts, 'pg_temp'])}")


async def _runtime_role(conn: asyncpg.Connection, user: str, password: str | None) -> None:
    rt = quote_ident(user)
    row = await conn.fetchrow("SELECT rolsuper FROM pg_roles WHERE rolname = $1", user)
    attrs = "LOGIN NOCREATEDB CREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"
    pw = f" PASSWORD {quote_literal(password)}" if password else ""
    if row is None:
        await conn.execute(f"CREATE ROLE {rt} NOSUPERUSER {attrs}{pw}")
    else:
        if row["rolsuper"]:
            log.warning("the runtime role %s is a superuser: the processes will refuse to run as it", user)
        await conn.execute(f"ALTER ROLE {rt} {attrs}{pw}")
    # Project roles it creates are granted to it WITH ADMIN and SET (not INHERIT): it can manage
    # them and SET ROLE to them for owner-only DDL, but does not hold their privileges.
    await conn.execute(f"ALTER ROLE {rt} SET createrole_self_grant = 'set'")
    db = quote_ident(await conn.fetchval("SELECT current_database()"))
    await conn.execute(f"GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {db} TO {rt} WITH GRANT OPTION")
    for schema in PLATFORM_SCHEMAS:
        await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {rt}")
    for schema in ("fluxbase", "fluxbase_guard"):
        s = quote_ident(schema)
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {rt}")
        await conn.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {s} TO {rt}")
        await conn.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO {rt}")
    # The group prefix (sql/0051) is read, never written, by the processes: a runtime that could
    # set it to another database's would have the next privilege step grant those groups (and so
    # that database's project roles) CONNECT here.
    if await conn.fetchval("SELECT to_regclass('fluxbase.tenant_group_prefix') IS NOT NULL"):
        await conn.execute(
            f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER "
            f"ON fluxbase.tenant_group_prefix FROM {rt}"
        )
    # Passed on to project roles at provisioning (sql/0007, sql/0008).
    await conn.execute(
        f"GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO {rt} WITH GRANT OPTION"
    )
    await conn.execute(f"GRANT USAGE ON LANGUAGE plpgsql TO {rt} WITH GRANT OPTION")
    await conn.execute(f"GRANT EXECUTE ON FUNCTION {CHECKER_FUNCTIONS} TO {rt} WITH GRANT OPTION")
    # The shared groups tenants are members of (realtime senders, the tenant groups): ADMIN to
    # grant them to the project roles it creates itself (where a provisioner cannot log in,
    # tenancy/buckets.py); SET (never INHERIT) to take back, as the group, what a tenant re-granted
    # through a group's grant option to a project being dropped (any owner may grant its objects
    # to a group WITH GRANT OPTION; a member's re-grant is recorded as the group's, which nobody
    # else may revoke, and kept DROP ROLE from succeeding: tenancy/provision._revoke_foreign,
    # hostile review 14). The groups hold nothing the runtime does not.
    shared = tenant_groups(await group_prefix(conn))
    if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", REALTIME_SENDERS):
        shared.append(REALTIME_SENDERS)
    await conn.execute(f"GRANT {', '.join(shared)} TO {rt} WITH ADMIN OPTION, INHERIT FALSE, SET TRUE")
    for param in SUSET_ROLE_SETTINGS:
        await conn.execute(f"GRANT SET ON PARAMETER {param} TO {rt}")
    # Terminating a project's backends (deadlines, project deletion). sql/0028 closes the signal
    # functions to PUBLIC (a role may signal its own role's backends: an end user could end the
    # connection a server key of the same scope was using).
    await conn.execute(f"GRANT pg_signal_backend TO {rt}")
    await conn.execute(
        f"GRANT EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint), "
        f"pg_catalog.pg_cancel_backend(integer) TO {rt}"
    )
    # Finding a project's backends: sql/0013 closes pg_stat_activity to PUBLIC (tenants must not
    # read other sessions' statements) and opens it to pg_read_all_stats.
    await conn.execute(f"GRANT pg_read_all_stats TO {rt}")
    # Reading every project's catalog content (sql/0021): schema sizes, platform listings; and
    # granting that to a project's export role for its pg_dump.
    await _grant_reader(conn, user, admin=True)
    # The request pipeline's epochs table has row security for tenants; the runtime sees all.
    policy_roles = await conn.fetchval(
        "SELECT roles::text[] FROM pg_policies WHERE schemaname = 'fluxbase_guard' "
        "AND tablename = 'auth_epochs' AND policyname = 'runtime_all'"
    )
    if policy_roles != [user]:
        await conn.execute("DROP POLICY IF EXISTS runtime_all ON fluxbase_guard.auth_epochs")
        await conn.execute(
            f"CREATE POLICY runtime_all ON fluxbase_guard.auth_epochs FOR ALL TO {rt} "
            "USING (true) WITH CHECK (true)"
        )
    if password:
        await _provisioners(conn, password)
    await _adopt_project_roles(conn, user, provisioners=bool(password))


async def _provisioners(conn: asyncpg.Connection, runtime_password: str) -> None:
    """The provisioner roles (tenancy/buckets.py): each creates and administers the roles of the
    projects hashed to it, and passes on to them what the runtime used to (see _runtime_role).
    Their password derives from the runtime's, which the processes log in with; the runtime is
    not a member of them (so not of any project role). One round trip for all of them."""
    db = quote_ident(await conn.fetchval("SELECT current_database()"))
    existing = {
        r["rolname"]: r["rolpassword"]
        for r in await conn.fetch(
            "SELECT rolname, rolpassword FROM pg_catalog.pg_authid WHERE rolname = ANY($1::text[])",
            all_buckets(),
        )
    }
    senders = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", REALTIME_SENDERS)
    reader = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", CATALOG_READER)
    forget = await conn.fetchval(
        "SELECT to_regprocedure('fluxbase_guard.forget_extensions(text)') IS NOT NULL"
    )
    # No connection limit of their own: a bucket is shared by every project hashed to it and by
    # every process, so a limit was one tenant's to fill for its whole bucket (a realtime switch
    # waiting on a lock of the tenant's table holds its connection; review 13). Each bucket
    # connection is opened while its caller holds a runtime pool connection (buckets.acting), so
    # the runtime's pools bound them. Attributes are asserted at every start, not only with a
    # new password.
    attrs = "LOGIN NOSUPERUSER NOCREATEDB CREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT CONNECTION LIMIT -1"
    groups = ", ".join(tenant_groups(await group_prefix(conn)))
    sql: list[str] = []
    for bucket in all_buckets():
        b = quote_ident(bucket)
        verifier = bucket_verifier(runtime_password, bucket)
        if bucket not in existing:
            sql.append(f"CREATE ROLE {b} {attrs} PASSWORD {quote_literal(verifier)}")
        elif existing[bucket] != verifier:
            sql.append(f"ALTER ROLE {b} {attrs} PASSWORD {quote_literal(verifier)}")
        else:
            sql.append(f"ALTER ROLE {b} {attrs}")
        # Roles it creates are granted to it WITH ADMIN and SET (not INHERIT), as to the runtime.
        sql.append(f"ALTER ROLE {b} SET createrole_self_grant = 'set'")
    # The grants, each one statement for every bucket (BUCKETS of them: one rewrite of each ACL,
    # not one per bucket; this runs at every start).
    bs = ", ".join(quote_ident(b) for b in all_buckets())
    sql.append(f"GRANT CONNECT, TEMPORARY, CREATE ON DATABASE {db} TO {bs} WITH GRANT OPTION")
    sql.append(f"GRANT USAGE ON SCHEMA fluxbase_guard TO {bs}")
    if forget:
        sql.append(f"GRANT EXECUTE ON FUNCTION fluxbase_guard.forget_extensions(text) TO {bs}")
    sql.append(
        f"GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO {bs} WITH GRANT OPTION"
    )
    sql.append(f"GRANT USAGE ON LANGUAGE plpgsql TO {bs} WITH GRANT OPTION")
    sql.append(f"GRANT EXECUTE ON FUNCTION {CHECKER_FUNCTIONS} TO {bs} WITH GRANT OPTION")
    if reader:
        sql.append(f"GRANT {CATALOG_READER} TO {bs} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE")
    # SET on the groups tenants are members of: as the runtime (_runtime_role).
    shared = f"{groups}, {REALTIME_SENDERS}" if senders else groups
    sql.append(f"GRANT {shared} TO {bs} WITH ADMIN OPTION, INHERIT FALSE, SET TRUE")
    for param in SUSET_ROLE_SETTINGS:
        sql.append(f"GRANT SET ON PARAMETER {param} TO {bs}")
    await conn.execute(";\n".join(sql))


async def _adopt_project_roles(conn: asyncpg.Connection, user: str, *, provisioners: bool) -> None:
    """Project roles created before the runtime role existed (by a superuser runtime): give their
    provisioner (or, without provisioners, the runtime) what it has over the ones it creates.
    Roles the runtime administers (made before the provisioners) are left to it
    (tenancy/buckets.py)."""
    kinds = {
        role_name(p["id"], kind): (p["id"], kind)
        for p in await conn.fetch("SELECT id FROM fluxbase.projects")
        for kind in ROLES
    }
    # One query whatever the number of projects (this runs at every start): the existing project
    # roles that neither their provisioner nor the runtime (ADMIN and SET) administers.
    orphans = await conn.fetch(
        """SELECT r.rolname FROM pg_roles r WHERE r.rolname = ANY($1::text[])
             AND NOT EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.member
                             WHERE m.roleid = r.oid AND m.admin_option AND starts_with(b.rolname, $3))
             AND NOT (EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.member
                              WHERE m.roleid = r.oid AND b.rolname = $2 AND m.admin_option)
                      AND EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.member
                                  WHERE m.roleid = r.oid AND b.rolname = $2 AND m.set_option))
           ORDER BY r.rolname""",
        list(kinds),
        user,
        PROVISIONER_PREFIX,
    )
    for row in orphans:
        role = row["rolname"]
        project_id, _kind = kinds[role]
        adopter = bucket_of(project_id) if provisioners else user
        rt = quote_ident(adopter)
        r = quote_ident(role)
        await conn.execute(f"GRANT {r} TO {rt} WITH ADMIN OPTION, INHERIT FALSE, SET TRUE")
        # What the superuser granted it outside its schema, move_to_groups (run next) revokes and
        # replaces by its tenant group's membership.


async def _own_prefix(conn: asyncpg.Connection, db: str, h: str) -> str:
    """This database's stored prefix `h`, or a new one if the database is a copy of another.

    A copy made on the same server (CREATE DATABASE … TEMPLATE, or a dump restored into a new
    database) carries the stored prefix (sql/0051), and its privilege step would give the
    original's groups CONNECT on it, so a project made on the copy could connect to the original
    (hostile review 19, G1). A copy does not inherit the original's database ACL: its prefix's
    groups hold privileges on another database and not CONNECT on this one. Such a database
    chooses again, as sql/0051 does (the name's prefix if no role has it, else a random one),
    under the pg_authid lock the caller holds. The copied projects' roles stay members of the
    original's groups only: on the copy they fail closed (no CONNECT) rather than reach both."""
    row = await conn.fetchrow(
        """SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database d, pg_catalog.aclexplode(d.datacl) x
                          WHERE d.datname = pg_catalog.current_database() AND x.privilege_type = 'CONNECT'
                            AND x.grantee = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1)) AS here,
                  EXISTS (SELECT 1 FROM pg_catalog.pg_database d, pg_catalog.aclexplode(d.datacl) x
                          WHERE d.datname <> pg_catalog.current_database()
                            AND x.grantee = ANY (SELECT oid FROM pg_catalog.pg_roles
                                                 WHERE rolname = ANY($2::text[]))) AS elsewhere,
                  pg_catalog.to_regclass('fluxbase.tenant_group_prefix') IS NOT NULL AS stored""",
        tenant_group(h, "connect"),
        tenant_groups(h),
    )
    if row["here"] or not row["elsewhere"] or not row["stored"]:  # (before sql/0051: by name)
        return h
    new = named_prefix(db)
    while await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE pg_catalog.starts_with(rolname, $1))",
        f"fluxbase_tenant_{new}_",
    ):
        new = secrets.token_hex(6)
    await conn.execute("UPDATE fluxbase.tenant_group_prefix SET prefix = $1", new)
    log.warning(
        "database %s carried the tenant group prefix of another database (a copy or a restore): "
        "it has groups of its own now (fluxbase_tenant_%s_*); projects copied with it do not "
        "connect here until they are provisioned again (docs/security.md, tenant groups)",
        db,
        new,
    )
    return new


async def _tenant_groups(conn: asyncpg.Connection) -> None:
    """Create this database's tenant groups (GROUP_PRIVILEGES) and give them their privileges.
    NOLOGIN, NOINHERIT and nothing else: no tenant holds ADMIN or SET on them (granted WITH
    INHERIT TRUE, SET FALSE), so none may grant them, become them, alter them or make them own
    anything; the runtime and provisioner roles hold ADMIN, to grant them, and SET (to revoke as
    a group, _runtime_role), never INHERIT."""
    db = await conn.fetchval("SELECT current_database()")
    h = await _own_prefix(conn, db, await group_prefix(conn))
    attrs = "NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT"
    existing = {
        r["rolname"]
        for r in await conn.fetch(
            "SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[])", tenant_groups(h)
        )
    }
    sql: list[str] = []
    for kind, (db_privs, set_config, plpgsql, checker) in GROUP_PRIVILEGES.items():
        g = quote_ident(tenant_group(h, kind))
        sql.append(f"{'ALTER' if tenant_group(h, kind) in existing else 'CREATE'} ROLE {g} {attrs}")
        sql.append(f"GRANT {db_privs} ON DATABASE {quote_ident(db)} TO {g}")
        if set_config:
            sql.append(f"GRANT EXECUTE ON {SET_CONFIG} TO {g}")
        if plpgsql:
            sql.append(f"GRANT USAGE ON LANGUAGE plpgsql TO {g}")
        if checker:
            sql.append(f"GRANT EXECUTE ON FUNCTION {CHECKER_FUNCTIONS} TO {g}")
    await conn.execute(";\n".join(sql))
    # Groups shared with another database: a database made under a renamed or dropped one's name
    # and migrated before sql/0051 took that one's groups (their project roles may connect to
    # both). Not undone here (which database's are they?): said, so an operator can act.
    shared = await conn.fetch(
        """SELECT DISTINCT d.datname FROM pg_catalog.pg_database d, pg_catalog.aclexplode(d.datacl) x
           WHERE x.grantee = ANY (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[]))
             AND d.datname <> pg_catalog.current_database() ORDER BY 1""",
        tenant_groups(h),
    )
    if shared:
        log.error(
            "the tenant groups of database %s (fluxbase_tenant_%s_*) hold privileges on database(s) %s "
            "too: their project roles may connect to both (docs/security.md, tenant groups)",
            db,
            h,
            ", ".join(r["datname"] for r in shared),
        )


# The entries naming project roles in the ACLs the tenant groups took over (one row per object,
# grantor and grantee): those of projects provisioned before the groups, and of a superuser's.
DIRECT_GRANTS_SQL = """
WITH objs AS (
    SELECT 'DATABASE ' || quote_ident(datname) AS target, datacl AS acl
    FROM pg_catalog.pg_database WHERE datname = current_database()
    UNION ALL
    SELECT 'LANGUAGE plpgsql', lanacl FROM pg_catalog.pg_language WHERE lanname = 'plpgsql'
    UNION ALL
    SELECT 'FUNCTION ' || p.oid::regprocedure::text, p.proacl FROM pg_catalog.pg_proc p
    WHERE p.oid IN (SELECT to_regprocedure(f) FROM unnest($1::text[]) f)
)
SELECT o.target, g.rolname AS grantee, gr.rolname AS grantor, array_agg(x.privilege_type) AS privs
FROM objs o, aclexplode(o.acl) x
JOIN pg_catalog.pg_roles g ON g.oid = x.grantee
JOIN pg_catalog.pg_roles gr ON gr.oid = x.grantor
WHERE g.rolname ~ '^p_[0-9a-f]{16}_(admin|rt|ro|rw|ex)$'
  AND ($2::text[] IS NULL OR g.rolname = ANY($2::text[]))
GROUP BY 1, 2, 3
ORDER BY 1, 3, 2
"""


def grant_targets() -> list[str]:
    """The functions whose ACLs the groups took over, as to_regprocedure() reads them."""
    return ["pg_catalog.set_config(text, text, boolean)", *re.findall(r"[\w.]+\([^)]*\)", CHECKER_FUNCTIONS)]


async def direct_grants(conn: asyncpg.Connection, roles: list[str] | None = None) -> list[asyncpg.Record]:
    return list(await conn.fetch(DIRECT_GRANTS_SQL, grant_targets(), roles))


async def move_to_groups(conn: asyncpg.Connection) -> int:
    """Projects provisioned before the tenant groups: grant each role its group, then revoke its
    own entries in the database's, set_config's, plpgsql's and the checker functions' ACLs, each
    as the role that granted it (a superuser's REVOKE only removes the owner's grants). One
    statement per group and per (object, grantor); nothing to do (one query) once moved.
    Returns how many entries it revoked."""
    rows = await direct_grants(conn)
    if not rows:
        return 0
    h = await group_prefix(conn)
    by_group: dict[str, set[str]] = {}
    for r in rows:
        kind = _ROLE_SUFFIX_GROUP[r["grantee"].rsplit("_", 1)[1]]
        by_group.setdefault(tenant_group(h, kind), set()).add(r["grantee"])
    for group, members in by_group.items():
        names = ", ".join(quote_ident(m) for m in sorted(members))
        await conn.execute(f"GRANT {quote_ident(group)} TO {names} WITH INHERIT TRUE, SET FALSE")
    revokes: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
    for r in rows:
        privs, grantees = revokes.setdefault((r["target"], r["grantor"]), (set(), set()))
        privs.update(r["privs"])
        grantees.add(r["grantee"])
    for (target, grantor), (privs, grantees) in revokes.items():
        names = ", ".join(quote_ident(g) for g in sorted(grantees))
        await conn.execute(f"SET LOCAL ROLE {quote_ident(grantor)}")
        await conn.execute(f"REVOKE {', '.join(sorted(privs))} ON {target} FROM {names}")
        await conn.execute("RESET ROLE")
    log.info(
        "moved %d ACL entries of %d project roles onto the tenant groups",
        len(rows),
        len({r["grantee"] for r in rows}),
    )
    return len(rows)
