"""Webhook configuration, the delivery log, redelivery, test pings and the project log."""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.errors import NotFound, ValidationError
from fluxbase.security import ssrf
from fluxbase.security.roles import schema_name
from fluxbase.webhooks import signing
from fluxbase.webhooks.delivery import ALL_EVENTS, message_body
from fluxbase.webhooks.sender import Sender

MAX_PER_PROJECT = 50
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")
_COLUMNS = "id, project_id, url, events, tables, enabled, disabled_reason, created_at, updated_at"


@dataclass(frozen=True)
class Webhook:
    id: str
    project_id: str
    url: str
    events: list[str]
    tables: list[str] | None
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    # The delivery queue's state (pending count, what blocks it, when it retries): get and list.
    queue: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> Webhook:
        return cls(
            r["id"],
            r["project_id"],
            r["url"],
            list(r["events"]),
            list(r["tables"]) if r["tables"] is not None else None,
            r["enabled"],
            r["disabled_reason"],
            r["created_at"],
            r["updated_at"],
        )

    def out(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "projectId": self.project_id,
            "url": self.url,
            "events": self.events,
            "tables": self.tables,
            "enabled": self.enabled,
            "disabledReason": self.disabled_reason,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            **({"queue": self.queue} if self.queue is not None else {}),
        }


def check_events(events: list[str]) -> list[str]:
    if not isinstance(events, list) or not events:
        raise ValidationError(f"events must be a non-empty list of: {', '.join(ALL_EVENTS)}.")
    unknown = sorted({e for e in events if e not in ALL_EVENTS})
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValidationError(f"Unknown event(s) {names}; use: {', '.join(ALL_EVENTS)}.")
    return sorted(set(events), key=ALL_EVENTS.index)


def check_tables(tables: list[str] | None) -> list[str] | None:
    if tables is None:
        return None
    if not isinstance(tables, list) or not tables or len(tables) > 100:
        raise ValidationError("tables must be null (every table) or a list of 1 to 100 table names.")
    bad = [t for t in tables if not isinstance(t, str) or not _TABLE_RE.match(t)]
    if bad:
        raise ValidationError(f"Not a table name: {bad[0]!r}.")
    return sorted(set(tables))


async def check_tables_exist(db: asyncpg.Pool, project_id: str, tables: list[str] | None) -> None:
    """Refuse table names the project does not have (a typo would silently match nothing)."""
    if tables is None:
        return
    existing = {
        r["relname"]
        for r in await db.fetch(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')""",
            schema_name(project_id),
        )
    }
    missing = [t for t in tables if t not in existing]
    if missing:
        have = ", ".join(sorted(existing)) or "none yet"
        raise ValidationError(
            f"No table {', '.join(map(repr, missing))} in this project (its tables: {have}). "
            "Create the table first, or leave tables null for every table."
        )


async def check_url(settings: Settings, url: str) -> str:
    await ssrf.check_url(url, ssrf.Policy.of(settings))
    return url


async def create(
    db: asyncpg.Pool,
    settings: Settings,
    project_id: str,
    url: str,
    events: list[str],
    tables: list[str] | None,
    secret: str | None,
    enabled: bool,
    *,
    catalog: asyncpg.Pool | None = None,
) -> tuple[Webhook, str]:
    """Create an endpoint; returns it and its secret (shown this once). `catalog`: the pool of
    the project's cluster, whose catalog has its tables (the control plane's by default)."""
    events = check_events(events)
    tables = check_tables(tables)
    await check_tables_exist(catalog or db, project_id, tables)
    secret = signing.check_secret(secret) if secret is not None else signing.new_secret()
    await check_url(settings, url)
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR UPDATE", project_id)
        count = await conn.fetchval(
            "SELECT count(*) FROM fluxbase.webhooks WHERE project_id = $1", project_id
        )
        if count >= MAX_PER_PROJECT:
            raise ValidationError(f"A project may have at most {MAX_PER_PROJECT} webhooks.")
        row = await conn.fetchrow(
            f"INSERT INTO fluxbase.webhooks (id, project_id, url, events, tables, secret, enabled) "
            f"VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}",
            ids.prefixed("wh"),
            project_id,
            url,
            events,
            tables,
            secret,
            enabled,
        )
    return Webhook.from_row(row), secret


async def list_for(db: asyncpg.Pool, project_id: str) -> list[Webhook]:
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM fluxbase.webhooks WHERE project_id = $1 ORDER BY created_at, id", project_id
    )
    return await _with_queues(db, [Webhook.from_row(r) for r in rows])


async def project_of(db: asyncpg.Pool, webhook_id: str) -> str:
    """The project a webhook belongs to (for authorisation), or 404."""
    project_id = await db.fetchval("SELECT project_id FROM fluxbase.webhooks WHERE id = $1", webhook_id)
    if project_id is None:
        raise NotFound("No webhook with this id.")
    return str(project_id)


async def get(db: asyncpg.Pool, project_id: str, webhook_id: str) -> Webhook:
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM fluxbase.webhooks WHERE id = $1 AND project_id = $2", webhook_id, project_id
    )
    if row is None:
        raise NotFound("No webhook with this id.")
    return (await _with_queues(db, [Webhook.from_row(row)]))[0]


async def update(
    db: asyncpg.Pool,
    settings: Settings,
    project_id: str,
    webhook_id: str,
    changes: dict[str, Any],
    *,
    catalog: asyncpg.Pool | None = None,
) -> tuple[Webhook, str | None]:
    """Apply a PATCH; returns the endpoint and a new secret if one was set or generated.
    `catalog`: as for `create`."""
    sets: list[str] = []
    args: list[Any] = [webhook_id, project_id]

    def put(column: str, value: Any) -> None:
        args.append(value)
        sets.append(f"{column} = ${len(args)}")

    new_secret: str | None = None
    if "url" in changes:
        put("url", await check_url(settings, changes["url"]))
    if "events" in changes:
        put("events", check_events(changes["events"]))
    if "tables" in changes:
        tables = check_tables(changes["tables"])
        await check_tables_exist(catalog or db, project_id, tables)
        put("tables", tables)
    if changes.get("rotate_secret"):
        new_secret = signing.new_secret()
    elif changes.get("secret") is not None:
        new_secret = signing.check_secret(changes["secret"])
    if new_secret is not None:
        put("secret", new_secret)
    if "enabled" in changes:
        if not isinstance(changes["enabled"], bool):
            raise ValidationError("enabled must be true or false.")
        put("enabled", changes["enabled"])
        if changes["enabled"]:
            sets.append("disabled_reason = NULL")
        else:
            sets.append("disabled_reason = 'disabled by a project admin'")
    if not sets:
        return await get(db, project_id, webhook_id), None
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"UPDATE fluxbase.webhooks SET {', '.join(sets)}, updated_at = now() "
            f"WHERE id = $1 AND project_id = $2 RETURNING {_COLUMNS}",
            *args,
        )
        if row is None:
            raise NotFound("No webhook with this id.")
        if changes.get("enabled") is True:
            # Switched on again (usually after fixing the receiver): the backlog goes out now,
            # not when the retry schedule would have come round.
            await _due_now(conn, webhook_id)
    return (await _with_queues(db, [Webhook.from_row(row)]))[0], new_secret


async def _due_now(conn: asyncpg.Connection, webhook_id: str) -> None:
    await conn.execute(
        "UPDATE fluxbase.webhook_deliveries SET next_attempt_at = now() "
        "WHERE webhook_id = $1 AND status = 'pending' AND next_attempt_at > now()",
        webhook_id,
    )


_QUEUE_SQL = """
SELECT w.id, q.pending, h.id AS head_id, h.attempts, h.error, h.next_attempt_at
FROM unnest($1::text[]) AS w(id)
CROSS JOIN LATERAL (
    SELECT count(*) AS pending FROM fluxbase.webhook_deliveries d
    WHERE d.webhook_id = w.id AND d.status = 'pending'
) q
LEFT JOIN LATERAL (
    SELECT d.id, d.attempts, d.error, d.next_attempt_at FROM fluxbase.webhook_deliveries d
    WHERE d.webhook_id = w.id AND d.status = 'pending' ORDER BY d.id LIMIT 1
) h ON true
"""


async def _with_queues(db: asyncpg.Pool, hooks: list[Webhook]) -> list[Webhook]:
    """Each endpoint with its queue: how much waits, whether (and by what) it is blocked, and
    when it is tried next. Deliveries go out in order, so a failed head holds up the rest."""
    if not hooks:
        return hooks
    rows = {r["id"]: r for r in await db.fetch(_QUEUE_SQL, [h.id for h in hooks])}
    out = []
    for h in hooks:
        r = rows[h.id]
        failed_head = r["head_id"] is not None and r["attempts"] > 0
        blocked = bool(r["pending"]) and (failed_head or not h.enabled)
        if not blocked:
            reason = None
        elif not h.enabled:
            reason = h.disabled_reason or "the endpoint is disabled"
        else:
            reason = f"delivery {r['head_id']} failed {r['attempts']} time(s): {r['error']}"
        queue = {
            "pending": r["pending"],
            "blocked": blocked,
            "reason": reason,
            "blockedBy": str(r["head_id"]) if failed_head else None,
            "lastError": r["error"] if failed_head else None,
            # Disabled: nothing is tried until it is enabled again (which sends at once).
            "nextRetryAt": r["next_attempt_at"] if r["head_id"] is not None and h.enabled else None,
        }
        out.append(dataclasses.replace(h, queue=queue))
    return out


async def delete(db: asyncpg.Pool, project_id: str, webhook_id: str) -> None:
    status = await db.execute(
        "DELETE FROM fluxbase.webhooks WHERE id = $1 AND project_id = $2", webhook_id, project_id
    )
    if status.endswith(" 0"):
        raise NotFound("No webhook with this id.")


_DELIVERY_COLUMNS = """id, message_id, event_type, body, status, attempts, next_attempt_at, last_attempt_at,
response_status, response_ms, response_body, error, redelivery_of, created_at"""


def delivery_out(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(r["id"]),
        "messageId": r["message_id"],
        "eventType": r["event_type"],
        "status": r["status"],
        "attempts": r["attempts"],
        "responseStatus": r["response_status"],
        "responseTimeMs": r["response_ms"],
        "responseBody": r["response_body"],
        "error": r["error"],
        "nextRetryAt": r["next_attempt_at"] if r["status"] == "pending" else None,
        "lastAttemptAt": r["last_attempt_at"],
        "createdAt": r["created_at"],
        "redeliveryOf": str(r["redelivery_of"]) if r["redelivery_of"] is not None else None,
        "payload": msgspec.Raw(r["body"].encode()),
    }


def _delivery_id(value: str) -> int:
    if not isinstance(value, str) or not value.isdigit() or len(value) > 18:
        raise NotFound("No delivery with this id.")
    return int(value)


ATTEMPTS_SHOWN = 50  # per delivery, the newest


async def with_attempts(db: Any, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `attemptLog` to each delivery: its attempts (newest last, at most ATTEMPTS_SHOWN)."""
    ids = [int(d["id"]) for d in out]
    rows = await db.fetch(
        """SELECT delivery_id, attempted_at, response_status, response_ms, response_body, error FROM (
               SELECT a.*, row_number() OVER (PARTITION BY delivery_id ORDER BY id DESC) AS n
               FROM fluxbase.webhook_attempts a WHERE delivery_id = ANY($1::bigint[])) t
           WHERE n <= $2 ORDER BY delivery_id, id""",
        ids,
        ATTEMPTS_SHOWN,
    )
    log: dict[str, list[dict[str, Any]]] = {d["id"]: [] for d in out}
    for r in rows:
        log[str(r["delivery_id"])].append(
            {
                "at": r["attempted_at"],
                "responseStatus": r["response_status"],
                "responseTimeMs": r["response_ms"],
                "responseBody": r["response_body"],
                "error": r["error"],
            }
        )
    for d in out:
        d["attemptLog"] = log[d["id"]]
    return out


async def deliveries(
    db: asyncpg.Pool, webhook_id: str, status: str | None, limit: int, before: str | None
) -> list[dict[str, Any]]:
    if status is not None and status not in ("pending", "delivered", "failed"):
        raise ValidationError("status must be pending, delivered or failed.")
    if not 1 <= limit <= 500:
        raise ValidationError("limit must be between 1 and 500.")
    upper = _delivery_id(before) if before else 2**62
    rows = await db.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM fluxbase.webhook_deliveries "
        "WHERE webhook_id = $1 AND id < $2 AND ($3::text IS NULL OR status = $3) ORDER BY id DESC LIMIT $4",
        webhook_id,
        upper,
        status,
        limit,
    )
    return await with_attempts(db, [delivery_out(r) for r in rows])


async def redeliver(db: asyncpg.Pool, webhook_id: str, delivery_id: str) -> dict[str, Any]:
    """Send a delivery again now. A pending one (waiting for its retry) is simply made due; a
    delivered or failed one is queued again (same body, same webhook-id) behind the endpoint's
    queue. Either way the whole queue is due at once: whoever asks for a redelivery has just
    fixed the receiver, and deliveries go out in order."""
    wanted = _delivery_id(delivery_id)
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_DELIVERY_COLUMNS} FROM fluxbase.webhook_deliveries WHERE id = $1 AND webhook_id = $2",
            wanted,
            webhook_id,
        )
        if row is None:
            raise NotFound("No delivery with this id for this webhook.")
        if row["status"] != "pending":
            row = await conn.fetchrow(
                f"""INSERT INTO fluxbase.webhook_deliveries
                        (webhook_id, message_id, event_type, body, redelivery_of)
                    SELECT webhook_id, message_id, event_type, body, id FROM fluxbase.webhook_deliveries
                    WHERE id = $1 RETURNING {_DELIVERY_COLUMNS}""",
                wanted,
            )
        await _due_now(conn, webhook_id)
        row = await conn.fetchrow(
            f"SELECT {_DELIVERY_COLUMNS} FROM fluxbase.webhook_deliveries WHERE id = $1", row["id"]
        )
        return (await with_attempts(conn, [delivery_out(row)]))[0]


async def send_test(db: asyncpg.Pool, sender: Sender, project_id: str, webhook_id: str) -> dict[str, Any]:
    """Send a `ping` now (not queued, not retried) and log it like any delivery."""
    hook = await db.fetchrow(
        "SELECT url, secret FROM fluxbase.webhooks WHERE id = $1 AND project_id = $2", webhook_id, project_id
    )
    if hook is None:
        raise NotFound("No webhook with this id.")
    now = datetime.now(UTC)
    ts = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
    new = msgspec.json.encode({"message": "Fluxbase webhook test", "webhookId": webhook_id}).decode()
    body = message_body("ping", project_id, None, ts, new, None)
    message_id = f"msg_ping_{secrets.token_hex(8)}"
    attempt = await sender.send(hook["url"], hook["secret"], message_id, "ping", body)
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"""INSERT INTO fluxbase.webhook_deliveries (webhook_id, message_id, event_type, body, status,
                    attempts, last_attempt_at, response_status, response_ms, response_body, error)
                VALUES ($1, $2, 'ping', $3, $4, 1, now(), $5, $6, $7, $8) RETURNING {_DELIVERY_COLUMNS}""",
            webhook_id,
            message_id,
            body.decode(),
            "delivered" if attempt.ok else "failed",
            attempt.status,
            attempt.ms,
            attempt.body,
            attempt.error,
        )
        await conn.execute(
            "INSERT INTO fluxbase.webhook_attempts (delivery_id, attempted_at, response_status, "
            "response_ms, response_body, error) VALUES ($1, $2, $3, $4, $5, $6)",
            row["id"],
            row["last_attempt_at"],
            attempt.status,
            attempt.ms,
            attempt.body,
            attempt.error,
        )
        return (await with_attempts(conn, [delivery_out(row)]))[0]


async def project_log(db: asyncpg.Pool, project_id: str, limit: int) -> list[dict[str, Any]]:
    if not 1 <= limit <= 500:
        raise ValidationError("limit must be between 1 and 500.")
    rows = await db.fetch(
        "SELECT id, level, source, message, details::text AS details, created_at FROM fluxbase.project_log "
        "WHERE project_id = $1 ORDER BY id DESC LIMIT $2",
        project_id,
        limit,
    )
    return [
        {
            "id": str(r["id"]),
            "level": r["level"],
            "source": r["source"],
            "message": r["message"],
            "details": msgspec.Raw(r["details"].encode()) if r["details"] else None,
            "createdAt": r["created_at"],
        }
        for r in rows
    ]


async def trim_log(db: asyncpg.Pool, max_age_s: int) -> int:
    status = await db.execute(
        "DELETE FROM fluxbase.webhook_deliveries WHERE status <> 'pending' "
        "AND created_at < now() - make_interval(secs => $1)",
        max_age_s,
    )
    return int(status.split()[-1])
