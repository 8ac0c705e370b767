"""The extensions Fluxbase offers its projects, and their installation at migration time.

An extension is per database and every project lives in one database, so each allowed extension
is installed once, by the migration role (a superuser — pgvector is not a trusted extension),
right after the SQL migrations, into a schema of its own (`ext_<name>`, owned by
`fluxbase_owner`; tenants get no CREATE on it, so nothing there can be created or replaced by a
tenant). "Installing" an extension in a project then grants the project's roles USAGE on that
schema (sql/0023: `fluxbase_guard.create_extension`). No extension script runs at request time.

While an extension script runs, PostgreSQL sets the search_path to the target schema and the
schemas of the extensions it requires (pg_catalog first); the migration connection is the
platform's own, with no temporary objects, so no tenant object — a function in a project schema
named like one the script calls — can be reached by the script.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import asyncpg

from fluxbase.db.quoting import quote_ident
from fluxbase.security.roles import ROLES, role_name, schema_name

log = logging.getLogger(__name__)
_PLAIN = re.compile(r"[a-z_][a-z0-9_]*")

OWNER = "fluxbase_owner"
GRANTOR = "fluxbase_guard_extensions"

_TRUSTED = (
    "PostgreSQL marks it trusted (safe for a non-superuser database owner to install): it adds "
    "types, functions and operators that run as the caller, with no file, network or role access"
)


@dataclass(frozen=True)
class Offer:
    """An extension Fluxbase may offer, and why that is safe."""

    name: str
    reason: str
    requires: tuple[str, ...] = ()

    @property
    def schema(self) -> str:
        return "ext_" + self.name.replace("-", "_")


# The allow-list (issue 22), in the order listings show it. FLUXBASE_EXTENSIONS may narrow it;
# nothing outside it can be offered (dblink, file_fdw, adminpack and the like reach the network,
# the file system or other sessions).
CATALOG: tuple[Offer, ...] = (
    Offer(
        "vector",
        "pgvector: a vector type with ivfflat and hnsw index methods; C functions that compute on "
        "their arguments only (no file, network or role access), all SECURITY INVOKER",
    ),
    Offer("pg_trgm", "trigram similarity and indexes; " + _TRUSTED),
    Offer("citext", "case-insensitive text type; " + _TRUSTED),
    Offer("uuid-ossp", "UUID generators; " + _TRUSTED),
    Offer("hstore", "key/value type; " + _TRUSTED),
    Offer("btree_gin", "GIN operator classes for scalar types; " + _TRUSTED),
    Offer("btree_gist", "GiST operator classes for scalar types (exclusion constraints); " + _TRUSTED),
    Offer("intarray", "integer array functions and indexes; " + _TRUSTED),
    Offer("unaccent", "accent-removing text search dictionary; " + _TRUSTED),
    Offer("fuzzystrmatch", "soundex, levenshtein, metaphone; " + _TRUSTED),
    Offer("ltree", "hierarchical label paths; " + _TRUSTED),
    Offer("cube", "multidimensional cubes; " + _TRUSTED),
    Offer(
        "earthdistance",
        "great-circle distances: SQL functions over cube, computing on their arguments only "
        "(not marked trusted by PostgreSQL only because it needs cube)",
        ("cube",),
    ),
    Offer("tablefunc", "crosstab and other set-returning functions; " + _TRUSTED),
    Offer("pgcrypto", "hashing and encryption functions; " + _TRUSTED),
)
BY_NAME = {o.name: o for o in CATALOG}
NAMES = frozenset(BY_NAME)


def allowed(names: tuple[str, ...] | None) -> tuple[Offer, ...]:
    """The catalog narrowed to `names` (None: all of it), with what each requires."""
    if names is None:
        return CATALOG
    wanted = set(names)
    for n in list(wanted):
        wanted.update(BY_NAME[n].requires)
    return tuple(o for o in CATALOG if o.name in wanted)


def search_path(project_id: str) -> str:
    """A project role's search_path: its schema, then the schema of every extension Fluxbase
    knows. PostgreSQL skips schemas that do not exist or that the role has no USAGE on, so only
    the project's installed extensions are found — and the path never changes when the operator
    changes the allow-list, so no pooled session holds a stale one."""
    names = [schema_name(project_id), *(o.schema for o in CATALOG)]
    if not all(_PLAIN.fullmatch(n) for n in names):
        raise ValueError("schema names of projects and extensions are plain lower-case identifiers")
    return ", ".join(names)  # the form PostgreSQL stores (it quotes only names that need it)


async def apply_extensions(conn: asyncpg.Connection, names: tuple[str, ...] | None) -> None:
    """Install the allowed extensions this server has (as the migration superuser), record the
    allow-list in fluxbase.extensions, and give project roles the search_path that lists them."""
    if not await conn.fetchval("SELECT to_regclass('fluxbase.extensions') IS NOT NULL"):
        return  # a test migrating a subset of the files
    offers = allowed(names)
    server = {
        r["name"]: r["default_version"]
        for r in await conn.fetch("SELECT name, default_version FROM pg_available_extensions")
    }
    async with conn.transaction():
        # One database's migration at a time installs (CREATE EXTENSION is per database, but two
        # migrations of the same database may run at once: `fluxbase migrate` and an api start).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('fluxbase.extensions'))")
        seen = []
        for position, offer in enumerate(CATALOG):
            version, why_not = None, None
            if offer not in offers:
                why_not = "not on this instance's allow-list (FLUXBASE_EXTENSIONS)"
            elif offer.name not in server:
                why_not = (
                    f"this PostgreSQL server does not have it ({offer.name}.control is not in its "
                    "SHAREDIR/extension directory): install the package that provides it, then run "
                    "`fluxbase migrate`"
                )
            elif any(r not in server for r in offer.requires):
                why_not = f"it requires {', '.join(offer.requires)}, which this server does not have"
            else:
                version, why_not = await _install(conn, offer)
            seen.append(offer.name)
            await conn.execute(
                """INSERT INTO fluxbase.extensions
                       (name, schema_name, requires, version, available, reason, unavailable_reason, position)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                   ON CONFLICT (name) DO UPDATE SET schema_name = $2, requires = $3,
                       version = $4, available = $5, reason = $6, unavailable_reason = $7,
                       position = $8, updated_at = now()""",
                offer.name,
                offer.schema,
                list(offer.requires),
                version,
                why_not is None,
                offer.reason,
                why_not,
                position,
            )
        await conn.execute(
            "UPDATE fluxbase.extensions SET available = false, "
            "unavailable_reason = 'no longer offered by Fluxbase' WHERE NOT name = ANY($1::text[])",
            seen,
        )
        await conn.execute("LOCK TABLE pg_catalog.pg_authid IN SHARE ROW EXCLUSIVE MODE")
        await _project_search_paths(conn)
        await _extension_groups(conn)


async def _install(conn: asyncpg.Connection, offer: Offer) -> tuple[str | None, str | None]:
    """Install one extension into its own schema: (version, None), or (None, why it cannot be)."""
    where = await conn.fetchval(
        """SELECT n.nspname FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
           WHERE x.extname = $1""",
        offer.name,
    )
    if where is not None and where != offer.schema:
        return None, (
            f"already installed in schema {where} (by the operator); Fluxbase offers it from its own "
            f"schema only: ALTER EXTENSION {quote_ident(offer.name)} SET SCHEMA {offer.schema}, "
            "then run `fluxbase migrate`"
        )
    schema = quote_ident(offer.schema)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {OWNER}")
    owner = await conn.fetchval(
        "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", offer.schema
    )
    if owner != OWNER:
        await conn.execute(f"ALTER SCHEMA {schema} OWNER TO {OWNER}")
    await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
    if where is None:
        # The script's search_path is set by PostgreSQL (this schema, then the required ones';
        # pg_catalog first); ours is pinned too, for anything the server resolves around it.
        await conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {quote_ident(offer.name)} SCHEMA {schema}")
        await conn.execute("RESET search_path")
        log.info("installed extension %s in schema %s", offer.name, offer.schema)
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {GRANTOR} WITH GRANT OPTION")
    version: str | None = await conn.fetchval(
        "SELECT extversion FROM pg_extension WHERE extname = $1", offer.name
    )
    return version, None


async def _project_search_paths(conn: asyncpg.Connection) -> None:
    """Every project role's search_path lists the extension schemas (roles made before this
    migration, or before a Fluxbase version that knows more extensions)."""
    for p in await conn.fetch("SELECT id FROM fluxbase.projects"):
        want = search_path(p["id"])
        for kind in ROLES:
            role = role_name(p["id"], kind)
            current = await conn.fetchval(
                """SELECT substr(c, 13) FROM pg_db_role_setting s, unnest(s.setconfig) c
                   WHERE s.setrole = (SELECT oid FROM pg_roles WHERE rolname = $1) AND s.setdatabase = 0
                     AND starts_with(c, 'search_path=')""",
                role,
            )
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            if exists and current != want:
                await conn.execute(f"ALTER ROLE {quote_ident(role)} SET search_path = {want}")


# sql/0046's helper grants and revokes as this role (the owner of the extension definers).
EXTENSIONS_ROLE = "fluxbase_guard_extensions"


async def _extension_groups(conn: asyncpg.Connection) -> None:
    """Each extension schema's tenant group (sql/0046, issue 19): created with USAGE on the schema,
    administered (ADMIN only) by the extension definers' owner; the entries existing projects'
    roles hold in the schema's ACL are moved onto it (membership granted, entry revoked, both as
    that owner, who granted them), so the ACL stops growing with the projects using it."""
    from fluxbase.db.privileges import (  # (imports config, which imports this)
        extension_group,
        group_prefix,
        tenant_group,
    )

    if not await conn.fetchval(
        "SELECT to_regprocedure('fluxbase_guard.extension_grant(text, text, boolean)') IS NOT NULL"
    ) or not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", EXTENSIONS_ROLE):
        return
    h = await group_prefix(conn)
    attrs = "NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT"
    schemas = [
        r["schema_name"]
        for r in await conn.fetch(
            """SELECT x.schema_name FROM fluxbase.extensions x
               WHERE EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = x.schema_name)
               ORDER BY x.schema_name"""
        )
    ]
    for schema in schemas:
        group = extension_group(h, schema)
        g = quote_ident(group)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", group)
        await conn.execute(f"{'ALTER' if exists else 'CREATE'} ROLE {g} {attrs}")
        await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(schema)} TO {g}")
        await conn.execute(f"GRANT {g} TO {EXTENSIONS_ROLE} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE")
        # SET (never INHERIT) for the roles that drop projects (the runtime and the provisioners,
        # which administer the database's tenant groups): what a member re-granted through a
        # grant option an owner gave this group is recorded as the group's, and only the group
        # may revoke it (tenancy/provision._revoke_foreign; hostile review 14).
        droppers = [
            r["rolname"]
            for r in await conn.fetch(
                """SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member
                   WHERE m.admin_option AND m.roleid = (SELECT oid FROM pg_roles WHERE rolname = $1)
                   ORDER BY 1""",
                tenant_group(h, "connect"),
            )
        ]
        if droppers:
            names = ", ".join(quote_ident(d) for d in droppers)
            await conn.execute(f"GRANT {g} TO {names} WITH INHERIT FALSE, SET TRUE")
        rows = await conn.fetch(
            """SELECT DISTINCT r.rolname, gr.rolname AS grantor
               FROM pg_namespace n, aclexplode(n.nspacl) x
               JOIN pg_roles r ON r.oid = x.grantee JOIN pg_roles gr ON gr.oid = x.grantor
               WHERE n.nspname = $1 AND r.rolname ~ '^p_[0-9a-f]{16}_(admin|rt|ro|rw|ex)$'
               ORDER BY 1""",
            schema,
        )
        if not rows:
            continue
        names = ", ".join(quote_ident(r["rolname"]) for r in rows)
        await conn.execute(f"SET LOCAL ROLE {EXTENSIONS_ROLE}")
        await conn.execute(f"GRANT {g} TO {names} WITH INHERIT TRUE, SET FALSE")
        await conn.execute("RESET ROLE")
        for grantor in sorted({r["grantor"] for r in rows}):
            theirs = ", ".join(quote_ident(r["rolname"]) for r in rows if r["grantor"] == grantor)
            await conn.execute(f"SET LOCAL ROLE {quote_ident(grantor)}")
            await conn.execute(f"REVOKE USAGE ON SCHEMA {quote_ident(schema)} FROM {theirs}")
            await conn.execute("RESET ROLE")
        log.info("moved %d project roles onto the tenant group of %s", len(rows), schema)
