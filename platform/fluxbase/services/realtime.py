"""Realtime control: per-table switches, the change cursor, realtime tokens and broadcasts.

Event messages are built by PostgreSQL itself (`MESSAGE_SQL`), so the realtime service and
the replay path forward the same bytes without re-encoding them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from fluxbase import ids
from fluxbase.db.tenants import quote_ident
from fluxbase.errors import ValidationError
from fluxbase.security import tokens
from fluxbase.security.roles import role_name, schema_name

TOKEN_KIND = "realtime"  # noqa: S105 - a token type, not a secret
MAX_TOKEN_TTL_S = 24 * 3600
_CURSOR_RE = re.compile(r"^(\d{1,20}):(\d{1,20})$")

# One row of fluxbase.events → the wire message (type, id, cursor, roomId, timestamp, payload).
MESSAGE_SQL = """
CASE e.kind
  WHEN 'row' THEN json_build_object(
    'type', 'db_event', 'id', e.id, 'cursor', e.xid::text || ':' || e.id,
    'roomId', 'project_' || e.project_id, 'timestamp', e.created_at,
    'payload', json_build_object('operation', e.operation, 'table', e.table_name,
                                 'record', e.record, 'old', e.old))
  WHEN 'schema' THEN json_build_object(
    'type', 'schema_update', 'id', e.id, 'cursor', e.xid::text || ':' || e.id,
    'roomId', 'project_' || e.project_id, 'timestamp', e.created_at,
    'payload', jsonb_build_object('event_type', 'schema_update', 'table', e.table_name) || e.record)
  ELSE json_build_object(
    'type', 'broadcast', 'id', e.id, 'cursor', e.xid::text || ':' || e.id,
    'roomId', 'project_' || e.project_id, 'timestamp', e.created_at,
    'event', e.record->'event', 'payload', e.record->'payload')
END::text
"""


@dataclass(frozen=True)
class Cursor:
    xid: int
    id: int

    def __str__(self) -> str:
        return f"{self.xid}:{self.id}"


def parse_cursor(value: Any) -> Cursor:
    """A cursor is '<xid>:<id>' as sent in every event; a bare integer means 'after that xid'."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Cursor(value, 2**63 - 1)
    if isinstance(value, str):
        m = _CURSOR_RE.match(value.strip())
        if m:
            return Cursor(int(m.group(1)), int(m.group(2)))
        if value.strip().isdigit():
            return Cursor(int(value.strip()), 2**63 - 1)
    raise ValidationError("since must be an event cursor like '1234:56'.")


async def list_tables(db: asyncpg.Pool, project_id: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT c.relname AS name,
                  EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid
                          AND t.tgname = 'fluxbase_capture_ins' AND t.tgenabled <> 'D') AS enabled
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
           ORDER BY c.relname""",
        schema_name(project_id),
    )
    return [{"name": r["name"], "enabled": r["enabled"]} for r in rows]


async def set_enabled(
    db: asyncpg.Pool, project_id: str, tables: list[str], enabled: bool
) -> list[dict[str, Any]]:
    if not tables or not all(isinstance(t, str) and t for t in tables):
        raise ValidationError("tables must be a non-empty list of table names.")
    known = {t["name"] for t in await list_tables(db, project_id)}
    unknown = [t for t in tables if t not in known]
    if unknown:
        raise ValidationError(f"unknown table(s): {', '.join(sorted(unknown))}.")
    async with db.acquire() as conn, conn.transaction():
        for table in tables:
            regclass = f"{quote_ident(schema_name(project_id))}.{quote_ident(table)}"
            fn = "fluxbase_capture.attach_capture" if enabled else "fluxbase_capture.detach_capture"
            # As the table's owner (capture functions are SECURITY INVOKER; docs/security.md).
            await conn.execute(f"SET LOCAL ROLE {quote_ident(role_name(project_id, 'admin'))}")
            await conn.execute(f"SELECT {fn}($1::regclass)", regclass)
            await conn.execute("SET LOCAL ROLE NONE")
            await conn.execute(
                """INSERT INTO fluxbase.realtime_tables (project_id, table_name, enabled) VALUES ($1, $2, $3)
                   ON CONFLICT (project_id, table_name) DO UPDATE SET enabled = EXCLUDED.enabled""",
                project_id,
                table,
                enabled,
            )
    return await list_tables(db, project_id)


# One probe of the project's index (project_id, xid, id), whatever the statistics say: its
# newest entry below (project, xmin). With `project_id = $1` the planner may instead walk the xid
# index back through every project's events (for a quiet project next to a busy one, the busy
# one's whole history); a row comparison that leads with project_id is an index condition only
# for the project's index. The row found may belong to an earlier project: then there is none.
# (Ordered by the xid8 column, not its text alias.)
LATEST_CURSOR_SQL = """
SELECT e.project_id, e.xid::text AS xid, e.id FROM fluxbase.events e
WHERE (e.project_id, e.xid) < ($1::text, pg_snapshot_xmin(pg_current_snapshot()))
ORDER BY e.project_id DESC, e.xid DESC, e.id DESC LIMIT 1
"""


async def latest_cursor(db: asyncpg.Pool, project_id: str) -> str | None:
    """The newest event of the project that every reader can already see (commit-safe)."""
    row = await db.fetchrow(LATEST_CURSOR_SQL, project_id)
    return f"{row['xid']}:{row['id']}" if row is not None and row["project_id"] == project_id else None


def mint_token(
    secret: str, project_id: str, scope: str, auth_uid: str | None, ttl_s: int, member_id: str | None = None
) -> tuple[str, int]:
    if not 1 <= ttl_s <= MAX_TOKEN_TTL_S:
        raise ValidationError(f"expiresIn must be between 1 and {MAX_TOKEN_TTL_S} seconds.")
    if auth_uid is not None and (not auth_uid or len(auth_uid) > 256):
        raise ValidationError("authUid must be 1 to 256 characters.")
    extra: dict[str, Any] = {"scope": scope}
    if member_id:
        extra["memberId"] = member_id  # re-checked on every subscribe: removal takes effect at once
    if auth_uid:
        extra["authUid"] = auth_uid
    return tokens.issue(
        secret,
        kind=TOKEN_KIND,
        subject=project_id,
        session_id=ids.prefixed("rt"),
        ttl_seconds=ttl_s,
        extra=extra,
    )


async def broadcast(db: asyncpg.Pool | asyncpg.Connection, project_id: str, event: Any, payload: Any) -> int:
    if not isinstance(event, str) or not 1 <= len(event) <= 100:
        raise ValidationError("event must be a name of 1 to 100 characters.")
    body = msgspec.json.encode({"event": event, "payload": payload}).decode()
    if len(body) > 256 * 1024:
        raise ValidationError("broadcast payloads are limited to 256 KiB.")
    event_id = await db.fetchval(
        """INSERT INTO fluxbase.events (project_id, kind, operation, record)
           VALUES ($1, 'broadcast', 'BROADCAST', $2::jsonb) RETURNING id""",
        project_id,
        body,
    )
    await db.execute("SELECT fluxbase.ring_doorbell()")
    return int(event_id)


_TRIM_CUTOFF_SQL = """
WITH oldest AS (
    SELECT xid, id, created_at, row_number() OVER (ORDER BY xid, id) AS rn
    FROM (SELECT xid, id, created_at FROM fluxbase.events
          WHERE xid < pg_snapshot_xmin(pg_current_snapshot())
            -- never past the webhook dispatcher while any endpoint waits for events
            AND (NOT EXISTS (SELECT 1 FROM fluxbase.webhooks WHERE enabled)
                 OR (xid, id) <= (SELECT last_xid, last_id FROM fluxbase.webhook_dispatch))
          ORDER BY xid, id LIMIT $1) s
)
SELECT xid::text AS xid, id FROM oldest
WHERE created_at < now() - make_interval(secs => $2) OR rn <= $3
ORDER BY xid DESC, id DESC LIMIT 1
"""


async def trim_events(db: asyncpg.Pool, max_age_s: int, max_rows: int, batch: int = 5000) -> int:
    """Delete the oldest outbox events past the age or size limit, a short batch at a time.

    Only finished transactions are trimmed, a prefix in cursor order, and the retention mark
    moves first, so a `since` older than the mark answers resync_required instead of a gap.
    Inserts never wait on these deletes.
    """
    deleted = 0
    while True:
        estimate = await db.fetchval("SELECT count(*) FROM fluxbase.events")
        excess = max(0, int(estimate) - max_rows)
        async with db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_TRIM_CUTOFF_SQL, batch, max_age_s, excess)
            if row is None:
                return deleted
            await conn.execute(
                """UPDATE fluxbase.event_retention SET trimmed_to_xid = $1::text::xid8, trimmed_to_id = $2
                   WHERE (trimmed_to_xid, trimmed_to_id) < ($1::text::xid8, $2)""",
                row["xid"],
                row["id"],
            )
            status = await conn.execute(
                "DELETE FROM fluxbase.events WHERE (xid, id) <= ($1::text::xid8, $2)", row["xid"], row["id"]
            )
        n = int(status.split()[-1])
        deleted += n
        if n < batch:
            return deleted
