"""Realtime control: per-table switches, the change cursor, realtime tokens and broadcasts.

Event messages are built by PostgreSQL itself (`MESSAGE_SQL`), so the realtime service and
the replay path forward the same bytes without re-encoding them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from fluxbase import ids
from fluxbase.db.capture import OLD_IMAGE_SQL
from fluxbase.db.quoting import quote_ident
from fluxbase.errors import ProjectNotFound, ProjectReadOnly, ProjectSuspended, ValidationError
from fluxbase.security import tokens
from fluxbase.security.roles import role_name, schema_name
from fluxbase.tenancy import buckets

TOKEN_KIND = "realtime"  # noqa: S105 - a token type, not a secret
MAX_TOKEN_TTL_S = 24 * 3600
# One broadcast's `{"event", "payload"}` as JSON, over HTTP and WebSocket alike.
MAX_BROADCAST_BYTES = 64 * 1024
# Broadcasts kept per project for `since` replays (beyond it, that project's oldest are trimmed).
BROADCAST_KEEP_PER_PROJECT = 1000
_CURSOR_RE = re.compile(r"^(\d{1,20}):(\d{1,20})$")

# One row of fluxbase.events → the wire message (type, id, cursor, roomId, timestamp, payload).
# Timestamps in UTC ending in `Z`, with microseconds, like every timestamp the API answers.
# A DELETE's old image is its record, stored once (sql/0053): given as both (OLD_IMAGE_SQL).
MESSAGE_SQL = (
    """
CASE e.kind
  WHEN 'row' THEN json_build_object(
    'type', 'db_event', 'id', e.id, 'cursor', e.xid::text || ':' || e.id,
    'roomId', 'project_' || e.project_id,
    'timestamp', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'payload', json_build_object('operation', e.operation, 'table', e.table_name,
                                 'record', e.record, 'old', """
    + OLD_IMAGE_SQL
    + """))
  WHEN 'schema' THEN json_build_object(
    'type', 'schema_update', 'id', e.id, 'cursor', e.xid::text || ':' || e.id,
    'roomId', 'project_' || e.project_id,
    'timestamp', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'payload', jsonb_build_object('event_type', 'schema_update', 'table', e.table_name) || e.record)
  ELSE json_build_object(
    'type', 'broadcast', 'id', e.id, 'cursor', e.xid::text || ':' || e.id,
    'roomId', 'project_' || e.project_id || coalesce(':' || e.table_name, ''),
    'timestamp', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'event', e.record->'event', 'payload', e.record->'payload')
END::text
"""
)


@dataclass(frozen=True)
class Cursor:
    xid: int
    id: int

    def __str__(self) -> str:
        return f"{self.xid}:{self.id}"


def parse_cursor(value: Any) -> Cursor:
    """A cursor is '<xid>:<id>' exactly as sent in every event's `cursor` field.

    A bare number is refused: it used to mean "after transaction <n>", so a client resuming with
    an event's `id` (the natural choice) silently got a different position and duplicates."""
    if isinstance(value, str):
        m = _CURSOR_RE.match(value.strip())
        if m:
            return Cursor(int(m.group(1)), int(m.group(2)))
    raise ValidationError(
        "since must be the `cursor` of the last event received (like '1234:56'), "
        "not an event id or another number."
    )


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
        # As the table's owner (capture functions are SECURITY INVOKER; docs/security.md), which
        # the project's provisioner may act as (tenancy/buckets.py); committed before the rows below.
        async with buckets.acting(conn, project_id) as owner:
            for table in tables:
                regclass = f"{quote_ident(schema_name(project_id))}.{quote_ident(table)}"
                fn = "fluxbase_capture.attach_capture" if enabled else "fluxbase_capture.detach_capture"
                await owner.execute(f"SET LOCAL ROLE {quote_ident(role_name(project_id, 'admin'))}")
                # Locked first, then looked at again: a table the tenant dropped or replaced since
                # the check above is unknown (its regclass would be a bare OID in the trigger's
                # DDL: a syntax error, a 500, review 13). The lock is the one CREATE TRIGGER takes.
                try:
                    await owner.execute(f"LOCK TABLE {regclass} IN SHARE ROW EXCLUSIVE MODE")
                except asyncpg.UndefinedTableError:
                    raise ValidationError(f"unknown table(s): {table}.") from None
                if not await owner.fetchval(
                    "SELECT relkind IN ('r', 'p') AND NOT relispartition FROM pg_catalog.pg_class"
                    " WHERE oid = $1::regclass",
                    regclass,
                ):
                    raise ValidationError(f"unknown table(s): {table}.")
                await owner.execute(f"SELECT {fn}($1::regclass)", regclass)
                await owner.execute("SET LOCAL ROLE NONE")
        for table in tables:
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


def key_fingerprint(key_hash: bytes) -> str:
    """Names one version of an API key (rotation changes it) without revealing its hash."""
    return hashlib.sha256(b"fluxbase-realtime-key:" + key_hash).hexdigest()[:32]


@dataclass(frozen=True)
class Minter:
    """Whose credential mints a realtime token: the token lives only as long as that credential.

    `key_id`/`key_fingerprint`: the API key (revoked, rotated or expired: the token dies);
    `member_id`/`session_id`: a dashboard member and their session (removed, logged out);
    `user_session`: a project user's own session (logged out, disabled)."""

    key_id: str | None = None
    key_fingerprint: str | None = None
    member_id: str | None = None
    session_id: str | None = None
    user_session: str | None = None


def mint_token(
    secret: str, project_id: str, scope: str, auth_uid: str | None, ttl_s: int, minter: Minter
) -> tuple[str, int]:
    if not 1 <= ttl_s <= MAX_TOKEN_TTL_S:
        raise ValidationError(f"expiresIn must be between 1 and {MAX_TOKEN_TTL_S} seconds.")
    if auth_uid is not None and (not auth_uid or len(auth_uid) > 256):
        raise ValidationError("authUid must be 1 to 256 characters.")
    extra: dict[str, Any] = {"scope": scope}
    # Re-checked on every subscribe and, while subscribed, by the realtime service's periodic
    # re-validation: the token dies with the credential that minted it.
    if minter.key_id:
        extra["keyId"] = minter.key_id
        extra["keyFp"] = minter.key_fingerprint
    if minter.member_id:
        extra["memberId"] = minter.member_id
        extra["sessionId"] = minter.session_id
    if minter.user_session:
        extra["userSession"] = minter.user_session
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


def broadcast_body(event: Any, payload: Any) -> str:
    """A broadcast's stored JSON, or ValidationError (event name, size cap)."""
    if not isinstance(event, str) or not 1 <= len(event) <= 100:
        raise ValidationError("event must be a name of 1 to 100 characters.")
    body = msgspec.json.encode({"event": event, "payload": payload}).decode()
    if len(body) > MAX_BROADCAST_BYTES:
        raise ValidationError(f"broadcasts are limited to {MAX_BROADCAST_BYTES // 1024} KiB of JSON.")
    return body


async def insert_broadcast(
    db: asyncpg.Pool | asyncpg.Connection, project_id: str, body: str, topic: str | None = None
) -> int:
    """Store a broadcast in the outbox if the project is active and writable (else the error).

    A topic's broadcast names its topic in the event's `table_name` (broadcasts have no table):
    it reaches that topic's room `project_<id>:<topic>` only, never the project room."""
    if topic is not None:
        check_topic(topic)
    event_id = await db.fetchval(
        """INSERT INTO fluxbase.events (project_id, kind, operation, record, table_name)
           SELECT p.id, 'broadcast', 'BROADCAST', $2::jsonb, $3::text FROM fluxbase.projects p
           WHERE p.id = $1 AND p.status = 'active' AND NOT p.read_only
           RETURNING id""",
        project_id,
        body,
        topic,
    )
    if event_id is None:
        row = await db.fetchrow("SELECT status FROM fluxbase.projects WHERE id = $1", project_id)
        if row is None:
            raise ProjectNotFound()
        raise ProjectSuspended() if row["status"] == "suspended" else ProjectReadOnly()
    await db.execute("SELECT fluxbase.ring_doorbell()")
    return int(event_id)


# -- topics ---------------------------------------------------------------------------------------

# A topic is a room inside its project, `project_<id>:<topic>`: letters, digits and `_ - .`
# only, so a topic can never name another project or another topic's room.
TOPIC_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TOPIC_ACTIONS = ("join", "send", "track")
# Who besides admin keys (always allowed) may act on a topic: keys and tokens without an end
# user by scope ("read", "readwrite"), and end users ("user", whatever key admitted them).
TOPIC_PRINCIPALS = ("read", "readwrite", "user")
DEFAULT_TOPIC_RULE: dict[str, Any] = {
    "pattern": "*",
    "join": ["read", "readwrite", "user"],
    "send": ["readwrite"],
    "track": ["read", "readwrite", "user"],
}
MAX_TOPIC_RULES = 50
_PATTERN_RE = re.compile(r"^(\*|[A-Za-z0-9_.-]{1,64}\*?)$")


def check_topic(topic: Any) -> str:
    if not isinstance(topic, str) or not TOPIC_RE.match(topic):
        raise ValidationError("A topic is 1 to 64 letters, digits, '_', '-' or '.'.")
    return topic


def parse_topic_rules(raw: Any) -> list[dict[str, Any]]:
    """The project setting `topics`: a list of {pattern, join?, send?, track?}; the first rule
    whose pattern matches a topic decides (`name`, `prefix*` or `*`); an action a rule leaves out
    takes the default (DEFAULT_TOPIC_RULE), as does a topic no rule matches."""
    if not isinstance(raw, list) or len(raw) > MAX_TOPIC_RULES:
        raise ValidationError(f"topics must be a list of at most {MAX_TOPIC_RULES} rules.")
    rules: list[dict[str, Any]] = []
    for rule in raw:
        if not isinstance(rule, dict) or set(rule) - {"pattern", *TOPIC_ACTIONS}:
            raise ValidationError('A topic rule is {"pattern", "join"?, "send"?, "track"?}.')
        pattern = rule.get("pattern")
        if not isinstance(pattern, str) or not _PATTERN_RE.match(pattern):
            raise ValidationError("A topic rule's pattern is a topic name, a prefix ending in '*', or '*'.")
        out: dict[str, Any] = {"pattern": pattern}
        for action in TOPIC_ACTIONS:
            who = rule.get(action, DEFAULT_TOPIC_RULE[action])
            if not isinstance(who, list) or not all(w in TOPIC_PRINCIPALS for w in who):
                raise ValidationError(
                    f"A topic rule's {action} lists some of {', '.join(TOPIC_PRINCIPALS)} "
                    "(admin keys always may)."
                )
            out[action] = sorted(set(who))
        rules.append(out)
    return rules


def topic_rule(rules: list[dict[str, Any]] | None, topic: str) -> dict[str, Any]:
    for rule in rules or ():
        pattern = rule["pattern"]
        if pattern == topic or (pattern.endswith("*") and topic.startswith(pattern[:-1])):
            return rule
    return DEFAULT_TOPIC_RULE


def topic_allowed(
    rules: list[dict[str, Any]] | None, topic: str, action: str, scope: str, uid: str | None
) -> bool:
    """Whether a credential (its scope, and its end user if any) may `action` on `topic`."""
    if scope == "admin" and not uid:
        return True
    principal = "user" if uid else scope
    return principal in topic_rule(rules, topic)[action]


async def broadcast(db: asyncpg.Pool | asyncpg.Connection, project_id: str, event: Any, payload: Any) -> int:
    return await insert_broadcast(db, project_id, broadcast_body(event, payload))


# The global bounds count only row and schema events: broadcasts have per-project bounds (below),
# so a project that broadcasts a lot never pushes another project's history out of the outbox.
# (Under the row bound, `rn` of the broadcasts before the window's first row event is 0: without
# `$3 > 0` every trim took them, whatever their project's own bound.)
_TRIM_CUTOFF_SQL = """
WITH oldest AS (
    SELECT xid, id, created_at,
           count(*) FILTER (WHERE kind <> 'broadcast') OVER (ORDER BY xid, id) AS rn
    FROM (SELECT xid, id, kind, created_at FROM fluxbase.events
          WHERE xid < pg_snapshot_xmin(pg_current_snapshot())
            -- never past the webhook dispatcher while any endpoint waits for events
            -- ($4: a registered cluster's endpoints are in the control plane, which the
            -- caller asked; its own fluxbase.webhooks is empty)
            AND (NOT ($4::boolean OR EXISTS (SELECT 1 FROM fluxbase.webhooks WHERE enabled))
                 OR (xid, id) <= (SELECT last_xid, last_id FROM fluxbase.webhook_dispatch))
          ORDER BY xid, id LIMIT $1) s
)
SELECT o.xid::text AS xid, o.id FROM oldest o
WHERE o.created_at < now() - make_interval(secs => $2) OR (o.rn <= $3 AND $3 > 0)
ORDER BY o.xid DESC, o.id DESC LIMIT 1
"""

# Projects over their broadcast bound, and the newest broadcast of one of them that goes.
_BROADCAST_HEAVY_SQL = """
SELECT project_id FROM fluxbase.events WHERE kind = 'broadcast'
GROUP BY project_id HAVING count(*) > $1
"""
# (Ordered by the xid8 columns, never their text aliases: '990' sorts after '1030'.)
_BROADCAST_CUTOFF_SQL = """
SELECT e.xid::text AS xid, e.id FROM fluxbase.events e
WHERE (e.project_id, e.xid) < ($1::text, pg_snapshot_xmin(pg_current_snapshot()))
  AND e.project_id = $1 AND e.kind = 'broadcast'
ORDER BY e.project_id DESC, e.xid DESC, e.id DESC OFFSET $2 LIMIT 1
"""


# Outbox bytes (sql/0022): events of transactions below the mark are in the per-project counter,
# newer ones are counted from their own rows. Folding and trimming both hold the mark's row, so a
# trim knows which of the events it deletes the counter holds.
_MARK_SQL = "SELECT counted_to_xid::text FROM fluxbase.outbox_usage_mark FOR UPDATE"
_FOLD_SQL = """
INSERT INTO fluxbase.outbox_usage AS u (project_id, bytes)
SELECT e.project_id, sum(e.bytes) FROM fluxbase.events e
WHERE e.xid >= $1::text::xid8 AND e.xid < $2::text::xid8 AND e.bytes IS NOT NULL
GROUP BY e.project_id
ON CONFLICT (project_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
"""
_TRIM_SQL = """
WITH gone AS (
    DELETE FROM fluxbase.events WHERE (xid, id) <= ($1::text::xid8, $2) RETURNING project_id, xid, bytes
), counted AS (
    INSERT INTO fluxbase.outbox_usage AS u (project_id, bytes)
    SELECT project_id, -sum(bytes) FROM gone WHERE bytes IS NOT NULL AND xid < $3::text::xid8
    GROUP BY project_id
    ON CONFLICT (project_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
)
SELECT count(*) FROM gone
"""


async def count_outbox_bytes(db: asyncpg.Pool) -> None:
    """Fold the outbox bytes of finished transactions since the mark into each project's
    counter (housekeeping), so a project's size reads a short range of its newest events only.
    Counters of deleted projects go."""
    async with db.acquire() as conn, conn.transaction():
        low = await conn.fetchval(_MARK_SQL)
        # Every transaction below the snapshot's xmin has finished: its events are all visible
        # now, or rolled back. (A statement of its own: a new snapshot after the lock.)
        high = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        await conn.execute(_FOLD_SQL, low, high)
        await conn.execute("UPDATE fluxbase.outbox_usage_mark SET counted_to_xid = $1::text::xid8", high)
        await conn.execute(
            """DELETE FROM fluxbase.outbox_usage u
               WHERE NOT EXISTS (SELECT 1 FROM fluxbase.projects p WHERE p.id = u.project_id)"""
        )


async def trim_events(
    db: asyncpg.Pool,
    max_age_s: int,
    max_rows: int,
    batch: int = 5000,
    broadcast_keep: int = BROADCAST_KEEP_PER_PROJECT,
    webhooks_waiting: bool = False,
) -> int:
    """Delete the oldest outbox events past the age or size limit, a short batch at a time,
    and each project's broadcasts beyond its newest `broadcast_keep`.

    Only finished transactions are trimmed, a prefix in cursor order (per project for
    broadcasts), and the retention mark (the project's, for broadcasts) moves first, so a
    `since` older than the mark answers resync_required instead of a gap. Inserts never wait
    on these deletes. Nothing past the webhook dispatcher's cursor goes while an endpoint is
    enabled: on a registered cluster the caller says so (`webhooks_waiting`, read from the
    control plane, where that cluster's projects' endpoints are).
    """
    deleted = await _trim_broadcasts(db, broadcast_keep)
    while True:
        estimate = await db.fetchval("SELECT count(*) FROM fluxbase.events WHERE kind <> 'broadcast'")
        excess = max(0, int(estimate) - max_rows)
        async with db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_TRIM_CUTOFF_SQL, batch, max_age_s, excess, webhooks_waiting)
            if row is None:
                return deleted
            await conn.execute(
                """UPDATE fluxbase.event_retention SET trimmed_to_xid = $1::text::xid8, trimmed_to_id = $2
                   WHERE (trimmed_to_xid, trimmed_to_id) < ($1::text::xid8, $2)""",
                row["xid"],
                row["id"],
            )
            mark = await conn.fetchval(_MARK_SQL)
            n = int(await conn.fetchval(_TRIM_SQL, row["xid"], row["id"], mark))
        deleted += n
        if n < batch:
            return deleted


_TRIM_BROADCASTS_SQL = """
WITH gone AS (
    DELETE FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'
    AND (project_id, xid, id) <= ($1::text, $2::text::xid8, $3::bigint) RETURNING xid, bytes
), counted AS (
    INSERT INTO fluxbase.outbox_usage AS u (project_id, bytes)
    SELECT $1, -sum(bytes) FROM gone WHERE bytes IS NOT NULL AND xid < $4::text::xid8
    HAVING count(*) > 0
    ON CONFLICT (project_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
)
SELECT count(*) FROM gone
"""


async def _trim_broadcasts(db: asyncpg.Pool, keep: int) -> int:
    deleted = 0
    for project in await db.fetch(_BROADCAST_HEAVY_SQL, keep):
        project_id = project["project_id"]
        async with db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_BROADCAST_CUTOFF_SQL, project_id, keep)
            if row is None:
                continue
            await conn.execute(
                """INSERT INTO fluxbase.event_retention_projects AS r
                       (project_id, trimmed_to_xid, trimmed_to_id)
                   SELECT p.id, $2::text::xid8, $3 FROM fluxbase.projects p WHERE p.id = $1
                   ON CONFLICT (project_id) DO UPDATE
                   SET trimmed_to_xid = EXCLUDED.trimmed_to_xid, trimmed_to_id = EXCLUDED.trimmed_to_id
                   WHERE (r.trimmed_to_xid, r.trimmed_to_id)
                         < (EXCLUDED.trimmed_to_xid, EXCLUDED.trimmed_to_id)""",
                project_id,
                row["xid"],
                row["id"],
            )
            # Broadcasts from SQL carry their size (sql/0036): what the counter holds of them goes.
            mark = await conn.fetchval(_MARK_SQL)
            n = await conn.fetchval(_TRIM_BROADCASTS_SQL, project_id, row["xid"], row["id"], mark)
        deleted += int(n)
    return deleted


_RETENTION_SQL = """
SELECT trimmed_to_xid::text AS x, trimmed_to_id AS i FROM fluxbase.event_retention
UNION ALL
SELECT trimmed_to_xid::text, trimmed_to_id FROM fluxbase.event_retention_projects WHERE project_id = $1
"""


async def retention_mark(db: asyncpg.Pool | asyncpg.Connection, project_id: str) -> Cursor | None:
    """The project's events at or before this cursor may have been trimmed (None: nothing was)."""
    marks = [Cursor(int(r["x"]), r["i"]) for r in await db.fetch(_RETENTION_SQL, project_id)]
    return max(marks, key=lambda c: (c.xid, c.id)) if marks else None
