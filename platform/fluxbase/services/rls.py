"""Row Level Security management (the reference doc's "Step-by-Step Setup" as an API) and the
per-project realtime setting for end users.

Every statement runs on the project's own admin role (its tenant pool, never `SET ROLE`), in
one transaction per request: a hostile expression can do no more than the project's admin key
could with `/api/execute-sql`. Identifiers are quoted with `quote_ident`; expressions are SQL
fragments that PostgreSQL itself parses inside `CREATE POLICY`, sent with the extended protocol
(one statement only), and read back from the catalog so that an expression cannot smuggle in
a clause of its own (`true) WITH CHECK (true`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from fluxbase.db.quoting import quote_ident
from fluxbase.errors import NotFound, ValidationError
from fluxbase.security.roles import schema_name
from fluxbase.services import realtime
from fluxbase.tenancy.errors import management_error
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.session import admin_session

COMMANDS = ("ALL", "SELECT", "INSERT", "UPDATE", "DELETE")
MAX_NAME = 63  # NAMEDATALEN - 1: PostgreSQL would silently truncate a longer name
MAX_EXPRESSION = 8000

# Policy expressions are catalog content closed to tenant roles (sql/0021): read through
# fluxbase_guard.own_policy_expr, which deparses the caller's own project's policies only.
_TABLES_SQL = """
SELECT c.relname AS name, c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced,
       coalesce((
           SELECT json_agg(json_build_object(
                      'name', p.policyname, 'command', p.cmd, 'permissive', p.permissive = 'PERMISSIVE',
                      'roles', p.roles, 'using', fluxbase_guard.own_policy_expr(y.oid, false),
                      'withCheck', fluxbase_guard.own_policy_expr(y.oid, true))
                  ORDER BY p.policyname)
           FROM pg_policies p JOIN pg_policy y ON y.polrelid = c.oid AND y.polname = p.policyname
           WHERE p.schemaname = n.nspname AND p.tablename = c.relname
       ), '[]')::text AS policies
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND ($2::text IS NULL OR c.relname = $2)
ORDER BY c.relname
"""


@dataclass(frozen=True)
class Policy:
    name: str
    command: str
    permissive: bool
    roles: list[str]
    using: str | None
    with_check: str | None


@dataclass(frozen=True)
class TableRls:
    name: str
    enabled: bool
    forced: bool
    policies: list[Policy]


def _table_of(row: asyncpg.Record) -> TableRls:
    policies = [
        Policy(p["name"], p["command"], p["permissive"], p["roles"], p["using"], p["withCheck"])
        for p in msgspec.json.decode(row["policies"])
    ]
    return TableRls(row["name"], row["enabled"], row["forced"], policies)


async def _tables(conn: asyncpg.Connection, project_id: str, only: str | None = None) -> list[TableRls]:
    return [_table_of(r) for r in await conn.fetch(_TABLES_SQL, schema_name(project_id), only)]


async def _one_table(conn: asyncpg.Connection, project_id: str, table: str, *, in_path: bool) -> TableRls:
    found = await _tables(conn, project_id, table)
    if not found:
        message = f'table "{table}" does not exist in this project.'
        raise NotFound(message) if in_path else ValidationError(message)
    return found[0]


def _qualified(project_id: str, table: str) -> str:
    return f"{quote_ident(schema_name(project_id))}.{quote_ident(table)}"


def _check_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME or "\x00" in value:
        raise ValidationError(f"{field} must be a name of 1 to {MAX_NAME} characters.")
    return value


def _check_expression(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_EXPRESSION or "\x00" in value:
        raise ValidationError(f"{field} must be an SQL expression of 1 to {MAX_EXPRESSION} characters.")
    return value


async def list_tables(pools: TenantPools, project_id: str) -> list[TableRls]:
    """Every table of the project with its RLS switches and policies."""
    async with admin_session(pools, project_id) as conn:
        return await _tables(conn, project_id)


async def create_policy(
    pools: TenantPools,
    project_id: str,
    *,
    table: str,
    name: str,
    command: str,
    using: str | None,
    with_check: str | None,
    permissive: bool = True,
) -> tuple[TableRls, bool]:
    """CREATE POLICY on one table, and ENABLE ROW LEVEL SECURITY on it if it was off (the guide's
    step 03: a policy is switched on with its table's RLS). Answers the table and whether RLS was
    switched on now; nothing is left behind if PostgreSQL refuses either statement."""
    _check_name(table, "table")
    _check_name(name, "name")
    command = command.upper() if isinstance(command, str) else command
    if command not in COMMANDS:
        raise ValidationError(f"command must be one of {', '.join(COMMANDS)}.")
    using = _check_expression(using, "using")
    with_check = _check_expression(with_check, "withCheck")
    if command == "INSERT":
        if using is not None:
            raise ValidationError("An INSERT policy takes only withCheck (new rows), not using.")
        if with_check is None:
            raise ValidationError("An INSERT policy needs withCheck.")
    else:
        if using is None:
            raise ValidationError(f"A {command} policy needs using.")
        if command in ("SELECT", "DELETE") and with_check is not None:
            raise ValidationError(f"A {command} policy takes only using, not withCheck.")
    sql = (
        f"CREATE POLICY {quote_ident(name)} ON {_qualified(project_id, table)} "
        f"AS {'PERMISSIVE' if permissive else 'RESTRICTIVE'} FOR {command}"
    )
    if using is not None:
        sql += f" USING ({using})"
    if with_check is not None:
        sql += f" WITH CHECK ({with_check})"
    async with admin_session(pools, project_id) as conn:
        before = await _one_table(conn, project_id, table, in_path=False)
        try:
            # fetch() uses the extended protocol: one statement, so `; DROP ...` cannot ride along.
            await conn.fetch(sql)
            if not before.enabled:
                await conn.fetch(f"ALTER TABLE {_qualified(project_id, table)} ENABLE ROW LEVEL SECURITY")
        except asyncpg.PostgresError as exc:
            raise management_error(exc) from exc
        created = await _one_table(conn, project_id, table, in_path=False)
        policy = next(p for p in created.policies if p.name == name)
        if (policy.using is None) != (using is None) or (policy.with_check is None) != (with_check is None):
            # The expression closed its parenthesis and added a clause: refuse, roll back.
            raise ValidationError("using and withCheck must each be a single SQL expression.")
        return created, not before.enabled


async def drop_policy(pools: TenantPools, project_id: str, table: str, name: str) -> TableRls:
    async with admin_session(pools, project_id) as conn:
        found = await _one_table(conn, project_id, table, in_path=True)
        if not any(p.name == name for p in found.policies):
            raise NotFound(f'policy "{name}" does not exist on table "{table}".')
        try:
            await conn.fetch(f"DROP POLICY {quote_ident(name)} ON {_qualified(project_id, table)}")
        except asyncpg.PostgresError as exc:
            raise management_error(exc) from exc
        return await _one_table(conn, project_id, table, in_path=True)


async def set_table(
    pools: TenantPools, project_id: str, table: str, *, enabled: bool | None, forced: bool | None
) -> TableRls:
    """ALTER TABLE … ENABLE/DISABLE and FORCE/NO FORCE ROW LEVEL SECURITY, in one transaction."""
    if enabled is None and forced is None:
        raise ValidationError("Give enabled and/or forced.")
    actions = []
    if enabled is not None:
        actions.append("ENABLE ROW LEVEL SECURITY" if enabled else "DISABLE ROW LEVEL SECURITY")
    if forced is not None:
        actions.append("FORCE ROW LEVEL SECURITY" if forced else "NO FORCE ROW LEVEL SECURITY")
    async with admin_session(pools, project_id) as conn:
        await _one_table(conn, project_id, table, in_path=True)
        try:
            await conn.fetch(f"ALTER TABLE {_qualified(project_id, table)} {', '.join(actions)}")
        except asyncpg.PostgresError as exc:
            raise management_error(exc) from exc
        return await _one_table(conn, project_id, table, in_path=True)


# -- realtime for end users ---------------------------------------------------------------------


async def realtime_settings(db: asyncpg.Pool, project_id: str) -> dict[str, Any]:
    row = await db.fetchrow(
        """SELECT schema_events_to_users, topics::text AS topics
           FROM fluxbase.realtime_settings WHERE project_id = $1""",
        project_id,
    )
    topics = json.loads(row["topics"]) if row is not None and row["topics"] is not None else None
    return {
        "schemaEventsToUsers": bool(row and row["schema_events_to_users"]),
        # The topic rules (fluxbase.services.realtime.parse_topic_rules); none: the defaults.
        "topics": topics if topics is not None else [realtime.DEFAULT_TOPIC_RULE],
    }


async def set_realtime_settings(
    db: asyncpg.Pool,
    project_id: str,
    schema_events_to_users: bool | None,
    topics: list[Any] | None = None,
) -> dict[str, Any]:
    """Change the given settings; those left out (None) keep their value."""
    rules = json.dumps(realtime.parse_topic_rules(topics)) if topics is not None else None
    await db.execute(
        """INSERT INTO fluxbase.realtime_settings (project_id, schema_events_to_users, topics)
           VALUES ($1, coalesce($2, false), $3::jsonb)
           ON CONFLICT (project_id) DO UPDATE
           SET schema_events_to_users = coalesce($2, fluxbase.realtime_settings.schema_events_to_users),
               topics = coalesce($3::jsonb, fluxbase.realtime_settings.topics), updated_at = now()""",
        project_id,
        schema_events_to_users,
        rules,
    )
    return await realtime_settings(db, project_id)
