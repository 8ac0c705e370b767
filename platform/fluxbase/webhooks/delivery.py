"""Webhook delivery: the dispatcher turns outbox events into queued deliveries, the sender
drains each endpoint's queue in order. Both run in `fluxbase worker`, any number of them.

- **Dispatch.** One transaction: lock the single `webhook_dispatch` cursor row (SKIP LOCKED, so
  exactly one worker dispatches at a time), read events after the cursor in commit-safe order
  with per-project horizons above the snapshot's xmin (as the realtime reader does: one
  project's open transaction holds back only its own events; `webhook_dispatch_early` keeps
  what was queued of each project above the cursor, sql/0035), insert one delivery per
  matching endpoint and move the cursor. Either all of it commits or none of it: an event is
  queued exactly once, a rolled-back change never has an event to queue.
- **Send.** Per endpoint, a lease on the endpoint's row (`send_lease`, sql/0017), taken and
  released in short statements (never a long transaction: an open transaction with an xid would
  hold back every outbox reader's xmin; never an advisory lock: any tenant may take any advisory
  key), free as soon as the holder's backend is gone (a killed worker, a restarted PostgreSQL) and
  otherwise expiring on its own; then up to `batch`
  pending deliveries in id order; the first failure stops that endpoint until its retry is due,
  so receivers see events in order. Results are written in one statement after the requests.
  A crash in between re-sends those requests with the same `webhook-id`: at-least-once.
- **Doorbell.** The dispatcher registers as an outbox reader and sleeps on the same doorbell
  as the realtime service (NOTIFY only while someone waits; the payload is never read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from fluxbase import tracing
from fluxbase.config import Settings
from fluxbase.db.capture import OLD_IMAGE_SQL
from fluxbase.metrics import OUTBOX_LAG, REGISTRY
from fluxbase.security import ssrf
from fluxbase.services import clusters
from fluxbase.webhooks.sender import Attempt, Sender

log = logging.getLogger("fluxbase.webhooks")

CHANNEL = "fluxbase_events"
# How often the worker looks for registered clusters that appeared, went, or changed connection.
CLUSTERS_EVERY_S = 0.5

ATTEMPTS = REGISTRY.counter(
    "fluxbase_webhook_attempts_total", "Webhook requests made, by result (delivered or failed).", ("result",)
)
EXHAUSTED = REGISTRY.counter(
    "fluxbase_webhook_deliveries_failed_total", "Webhook deliveries given up after their last retry."
)
QUEUE_DEPTH = REGISTRY.gauge("fluxbase_webhook_queue_depth", "Webhook deliveries pending (all projects).")
IN_FLIGHT = REGISTRY.gauge("fluxbase_webhook_endpoints_in_flight", "Endpoints this worker is sending to now.")

EVENT_TYPES = {
    ("row", "INSERT"): "row.inserted",
    ("row", "UPDATE"): "row.updated",
    ("row", "DELETE"): "row.deleted",
}
ALL_EVENTS = ("row.inserted", "row.updated", "row.deleted", "schema.changed")

# After the global cursor ($1, $2), below every project's horizon and each project's own, and
# after what was queued of that project early ($4/$5/$6), of the projects $7 lists (those with
# an enabled endpoint; on a registered cluster the endpoints live in the control plane). One
# statement, so the open transactions and the events are seen in one snapshot; its sessions
# come from pg_stat_activity (the runtime role is a member of pg_read_all_stats). A project role
# (p_<16 hex>_<scope>, fluxbase.security.roles) writes only its own project's events (the
# capture definers check the schema against the session user), so it holds back only its
# project; any other open transaction, or one whose session has ended since the snapshot,
# holds back all. The same rule as the realtime reader (fluxbase_realtime.outbox.horizons).
_EVENTS_SQL = (
    r"""
WITH snap AS MATERIALIZED (SELECT pg_catalog.pg_current_snapshot() AS s),
open AS MATERIALIZED (
    SELECT x, (SELECT pg_catalog.substring(a.usename::text, '^p_([0-9a-f]{16})_[a-z]+$')
               FROM pg_catalog.pg_stat_activity a WHERE a.backend_xid = pg_catalog.xid(x) LIMIT 1) AS project
    FROM snap, pg_catalog.pg_snapshot_xip(snap.s) AS x
),
horizon AS MATERIALIZED (
    SELECT coalesce((SELECT min(x) FROM open WHERE project IS NULL),
                    (SELECT pg_catalog.pg_snapshot_xmax(s) FROM snap)) AS below_all
),
own AS MATERIALIZED (SELECT project, min(x) AS below FROM open WHERE project IS NOT NULL GROUP BY project)
SELECT e.id, e.xid::text AS xid, e.project_id, e.kind, e.table_name, e.operation,
       e.record::text AS record,
       """
    + OLD_IMAGE_SQL
    + r"""::text AS old, e.created_at,
       to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS ts
FROM fluxbase.events e
CROSS JOIN horizon h
LEFT JOIN own b ON b.project = e.project_id
LEFT JOIN unnest($4::text[], $5::text[], $6::bigint[]) AS f(project_id, xid, id)
    ON f.project_id = e.project_id
WHERE (e.xid, e.id) > ($1::text::xid8, $2::bigint) AND e.xid < h.below_all
  AND (b.below IS NULL OR e.xid < b.below)
  AND (f.project_id IS NULL OR (e.xid, e.id) > (f.xid::xid8, f.id))
  AND e.kind IN ('row', 'schema')
  AND e.project_id = ANY($7::text[])
ORDER BY e.xid, e.id
LIMIT $3
"""
)


# Endpoints whose oldest pending delivery is due.
_DUE_SQL = """
SELECT w.id FROM fluxbase.webhooks w
JOIN LATERAL (
    SELECT d.next_attempt_at FROM fluxbase.webhook_deliveries d
    WHERE d.webhook_id = w.id AND d.status = 'pending' ORDER BY d.id LIMIT 1
) head ON true
WHERE w.enabled AND head.next_attempt_at <= now() AND w.id <> ALL($2::text[])
ORDER BY head.next_attempt_at
LIMIT $1
"""

_NEXT_DUE_SQL = """
SELECT min(head.next_attempt_at) FROM fluxbase.webhooks w
JOIN LATERAL (
    SELECT d.next_attempt_at FROM fluxbase.webhook_deliveries d
    WHERE d.webhook_id = w.id AND d.status = 'pending' ORDER BY d.id LIMIT 1
) head ON true
WHERE w.enabled AND w.id <> ALL($1::text[])
"""

_RECORD_SQL = """
UPDATE fluxbase.webhook_deliveries d SET
    status = r.status, attempts = d.attempts + 1, last_attempt_at = r.at,
    next_attempt_at = r.next_at, response_status = r.code, response_ms = r.ms,
    response_body = r.body, error = r.error
FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::int[], $6::int[],
            $7::text[], $8::text[]) AS r(id, status, at, next_at, code, ms, body, error)
WHERE d.id = r.id
"""

# Every attempt, in the same statement's transaction as the delivery's new state.
_ATTEMPTS_SQL = """
INSERT INTO fluxbase.webhook_attempts
    (delivery_id, attempted_at, response_status, response_ms, response_body, error)
SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::int[], $4::int[], $5::text[], $6::text[])
"""

_ENC = msgspec.json.Encoder()


def message_body(
    event_type: str, project_id: str, table: str | None, ts: str, new: str | None, old: str | None
) -> bytes:
    """The reference doc's payload, keys in its order; row images are PostgreSQL's own JSON."""
    return _ENC.encode(
        {
            "event_type": event_type,
            "project_id": project_id,
            "table_id": table,
            "timestamp": ts,
            "data": {
                "new": msgspec.Raw(new.encode()) if new is not None else None,
                "old": msgspec.Raw(old.encode()) if old is not None else None,
            },
        }
    )


def event_message(row: asyncpg.Record) -> tuple[str, bytes] | None:
    """(event_type, body) for one outbox row, or None for what webhooks do not carry."""
    if row["kind"] == "schema":
        return "schema.changed", message_body(
            "schema.changed", row["project_id"], row["table_name"], row["ts"], row["record"], None
        )
    event_type = EVENT_TYPES.get((row["kind"], row["operation"]))
    if event_type is None:
        return None
    new = None if row["operation"] == "DELETE" else row["record"]
    old = row["old"] if row["operation"] != "INSERT" else None
    return event_type, message_body(event_type, row["project_id"], row["table_name"], row["ts"], new, old)


def retry_delay(settings: Settings, attempts: int) -> float | None:
    """Seconds before the next try after `attempts` failed ones, or None when the schedule is spent."""
    schedule = settings.webhooks.retry_schedule
    if attempts > len(schedule):
        return None
    return schedule[attempts - 1] * random.uniform(0.8, 1.2)


@dataclass
class _Hook:
    id: str
    project_id: str
    events: frozenset[str]
    tables: frozenset[str] | None
    created_at: Any

    def wants(self, event_type: str, table: str | None, created_at: Any) -> bool:
        if event_type not in self.events or created_at < self.created_at:
            return False
        return self.tables is None or table in self.tables


async def dispatch_once(
    conn: asyncpg.Connection,
    limit: int = 1000,
    *,
    control: asyncpg.Pool | None = None,
    cluster_id: str | None = None,
) -> tuple[set[str], bool, bool]:
    """Queue deliveries for the next events: (endpoints that got deliveries, more events pending,
    whether any endpoint is enabled at all). (empty, False, True) when another worker holds the
    cursor.

    `conn` is on the database whose outbox is read. For a registered cluster (`control` and
    `cluster_id` given) the endpoints are read from, and the deliveries written to, the control
    plane, before the cluster's cursor moves in its own transaction: a crash in between queues
    the same events again under the same message ids (at-least-once, as everywhere)."""
    hooks_db: asyncpg.Pool | asyncpg.Connection = conn if control is None else control
    async with conn.transaction():
        # Safe without waiting for the WAL flush: a crash loses the deliveries and the cursor
        # move together, and the next dispatcher queues the same events again.
        await conn.execute("SET LOCAL synchronous_commit = off")
        cursor = await conn.fetchrow(
            "SELECT last_xid::text AS xid, last_id FROM fluxbase.webhook_dispatch FOR UPDATE SKIP LOCKED"
        )
        if cursor is None:
            return set(), False, True
        # Taken before the events are read, in an earlier snapshot: every event below it is
        # visible to the read, and no horizon of the read's snapshot lies below it.
        xmin = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        # The projects with an enabled endpoint, passed to the read as a list rather than joined
        # in: a semi-join against the endpoints let the generic plan trade the cursor-ordered
        # probe for a walk of every project's events whenever the endpoint statistics moved.
        if control is None:
            hooked = [
                r["project_id"]
                for r in await conn.fetch("SELECT DISTINCT project_id FROM fluxbase.webhooks WHERE enabled")
            ]
        else:
            hooked = [
                r["project_id"]
                for r in await control.fetch(
                    """SELECT DISTINCT w.project_id FROM fluxbase.webhooks w
                       JOIN fluxbase.projects p ON p.id = w.project_id
                       WHERE w.enabled AND p.cluster_id = $1""",
                    cluster_id,
                )
            ]
        active = bool(hooked)
        early = {
            r["project_id"]: (int(r["xid"]), r["last_id"])
            for r in await conn.fetch(
                "SELECT project_id, last_xid::text AS xid, last_id FROM fluxbase.webhook_dispatch_early"
            )
        }
        rows = []
        if active:
            args = [
                cursor["xid"],
                cursor["last_id"],
                limit,
                list(early),
                [str(x) for x, _ in early.values()],
                [i for _, i in early.values()],
            ]
            rows = await conn.fetch(_EVENTS_SQL, *args, hooked)
        queued: list[tuple[str, str, str, str]] = []
        if rows:
            hooks: dict[str, list[_Hook]] = {}
            for h in await hooks_db.fetch(
                "SELECT id, project_id, events, tables, created_at FROM fluxbase.webhooks "
                "WHERE enabled AND project_id = ANY($1::text[])",
                list({r["project_id"] for r in rows}),
            ):
                hooks.setdefault(h["project_id"], []).append(
                    _Hook(
                        h["id"],
                        h["project_id"],
                        frozenset(h["events"]),
                        frozenset(h["tables"]) if h["tables"] is not None else None,
                        h["created_at"],
                    )
                )
            for r in rows:
                message = event_message(r)
                if message is None:
                    continue
                event_type, body = message
                message_id = f"msg_{r['xid']}_{r['id']}"
                for hook in hooks.get(r["project_id"], ()):
                    if hook.wants(event_type, r["table_name"], r["created_at"]):
                        queued.append((hook.id, message_id, event_type, body.decode()))
            if queued:
                await hooks_db.copy_records_to_table(
                    "webhook_deliveries",
                    schema_name="fluxbase",
                    columns=["webhook_id", "message_id", "event_type", "body"],
                    records=queued,
                )
        more = len(rows) == limit
        below = [r for r in rows if int(r["xid"]) < int(xmin)]
        if more and len(below) == len(rows):
            new_xid, new_id = rows[-1]["xid"], rows[-1]["id"]
        else:
            new_xid, new_id = xmin, 0  # every event below xmin has been seen
        await conn.execute(
            "UPDATE fluxbase.webhook_dispatch SET last_xid = $1::text::xid8, last_id = $2 "
            "WHERE (last_xid, last_id) < ($1::text::xid8, $2)",
            new_xid,
            new_id,
        )
        # Queued above xmin: remembered per project until the global cursor passes it.
        after = dict(early)
        for r in rows:
            if int(r["xid"]) >= int(xmin):
                after[r["project_id"]] = (int(r["xid"]), r["id"])
        gone = (int(new_xid), int(new_id))
        after = {p: c for p, c in after.items() if c > gone}
        if after != early:
            await conn.execute("DELETE FROM fluxbase.webhook_dispatch_early")
            if after:
                await conn.execute(
                    "INSERT INTO fluxbase.webhook_dispatch_early (project_id, last_xid, last_id) "
                    "SELECT * FROM unnest($1::text[], $2::text[]::xid8[], $3::bigint[])",
                    list(after),
                    [str(x) for x, _ in after.values()],
                    [i for _, i in after.values()],
                )
    return {q[0] for q in queued}, more, active


async def send_endpoint(
    db: asyncpg.Pool,
    settings: Settings,
    sender: Sender,
    webhook_id: str,
    stopping: asyncio.Event | None = None,
) -> tuple[int, bool] | None:
    """Send one endpoint's due deliveries in order: (requests made, more due now), or None
    when another worker is sending to this endpoint."""
    # Longer than one round of sending can take (5 s of progress plus one request's timeout).
    lease_s = max(60.0, 4 * settings.webhooks.timeout_s + 30)
    async with db.acquire() as conn:
        # The lease names the backend of the connection held for the whole round
        # ("<token>:<pid>"): when that backend is gone (the worker was SIGKILLed, PostgreSQL
        # restarted) the lease is free at once instead of stalling the endpoint until it expires
        # (issue 18, chaos). A reused pid only falls back to the expiry.
        lease = await conn.fetchval(
            "UPDATE fluxbase.webhooks SET send_lease = $2 || ':' || pg_backend_pid(), "
            "send_lease_until = now() + make_interval(secs => $3) "
            "WHERE id = $1 AND (send_lease_until IS NULL OR send_lease_until < now() "
            "OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
            "WHERE a.pid::text = split_part(send_lease, ':', 2))) RETURNING send_lease",
            webhook_id,
            secrets.token_hex(8),
            lease_s,
        )
        if lease is None:
            return None
        try:
            return await _send_locked(conn, settings, sender, webhook_id, stopping)
        finally:
            await conn.execute(
                "UPDATE fluxbase.webhooks SET send_lease = NULL, send_lease_until = NULL "
                "WHERE id = $1 AND send_lease = $2",
                webhook_id,
                lease,
            )


async def _send_locked(
    conn: asyncpg.Connection,
    settings: Settings,
    sender: Sender,
    webhook_id: str,
    stopping: asyncio.Event | None = None,
) -> tuple[int, bool]:
    hook = await conn.fetchrow(
        "SELECT id, project_id, url, secret, enabled FROM fluxbase.webhooks WHERE id = $1", webhook_id
    )
    if hook is None or not hook["enabled"]:
        return 0, False
    batch = settings.webhooks.batch
    pending = await conn.fetch(
        "SELECT id, message_id, event_type, body, attempts, next_attempt_at <= now() AS due "
        "FROM fluxbase.webhook_deliveries WHERE webhook_id = $1 AND status = 'pending' ORDER BY id LIMIT $2",
        webhook_id,
        batch,
    )
    results: list[tuple[asyncpg.Record, Attempt, datetime]] = []
    failed = False
    started = time.monotonic()
    for d in pending:
        if not d["due"]:
            break
        with tracing.span(
            "webhook attempt",
            "client",
            {
                "http.request.method": "POST",
                "fluxbase.webhook.id": str(webhook_id),
                "fluxbase.webhook.message_id": str(d["message_id"]),
                "fluxbase.webhook.event_type": str(d["event_type"]),
                "fluxbase.webhook.attempt": int(d["attempts"]) + 1,
            },
        ) as span:
            attempt = await sender.send(
                hook["url"], hook["secret"], d["message_id"], d["event_type"], d["body"].encode()
            )
            if attempt.status is not None:
                span.set_attribute("http.response.status_code", attempt.status)
            if not attempt.ok:
                span.set_attribute("error.type", str(attempt.status or "no answer"))
                tracing.set_error(span)
        results.append((d, attempt, datetime.now(UTC)))
        ATTEMPTS.inc("delivered" if attempt.ok else "failed")
        if not attempt.ok:
            failed = True
            break
        if time.monotonic() - started > 5.0 or (stopping is not None and stopping.is_set()):
            break  # write progress down regularly, and at once when the worker stops
    if not results:
        return 0, False
    columns: list[list[Any]] = [[] for _ in range(8)]
    exhausted: tuple[asyncpg.Record, Attempt] | None = None
    for d, attempt, at in results:
        if attempt.ok:
            status, next_at = "delivered", at
        else:
            delay = retry_delay(settings, d["attempts"] + 1)
            if delay is None:
                status, next_at = "failed", at
                exhausted = (d, attempt)
                EXHAUSTED.inc()
            else:
                status, next_at = "pending", at + timedelta(seconds=delay)
        if not attempt.ok:
            # Visible where the worker runs (the `fluxbase dev` terminal), not only in the log API.
            log.warning(
                "webhook %s: delivery %s (%s) to %s failed: %s; %s",
                webhook_id,
                d["id"],
                d["event_type"],
                hook["url"],
                attempt.error,
                f"next try at {next_at:%H:%M:%S} UTC" if status == "pending" else "no tries left",
            )
        row = (d["id"], status, at, next_at, attempt.status, attempt.ms, attempt.body, attempt.error)
        for col, value in zip(columns, row, strict=True):
            col.append(value)
    async with conn.transaction():
        # A lost result only means the request is made again (same webhook-id): at-least-once.
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute(_RECORD_SQL, *columns)
        await conn.execute(_ATTEMPTS_SQL, columns[0], columns[2], *columns[4:])
        if exhausted is not None:
            await _disable(conn, hook, *exhausted)
    more = not failed and (len(results) < len(pending) or len(pending) == batch)
    return len(results), more


async def _disable(
    conn: asyncpg.Connection, hook: asyncpg.Record, d: asyncpg.Record, attempt: Attempt
) -> None:
    """The schedule is spent: turn the endpoint off and tell the project in its log."""
    attempts = d["attempts"] + 1
    reason = f"disabled after {attempts} failed attempts; last error: {attempt.error}"
    await conn.execute(
        "UPDATE fluxbase.webhooks SET enabled = false, disabled_reason = $2, updated_at = now() "
        "WHERE id = $1",
        hook["id"],
        reason,
    )
    await conn.execute(
        "INSERT INTO fluxbase.project_log (project_id, level, source, message, details) "
        "VALUES ($1, 'error', 'webhooks', $2, $3::jsonb)",
        hook["project_id"],
        f"Webhook {hook['id']} ({hook['url']}) was {reason}. Fix the endpoint and enable it again "
        "(PATCH /api/webhooks/{id} with enabled: true); its pending deliveries then resume in order.",
        _ENC.encode({"webhookId": hook["id"], "deliveryId": d["id"], "attempts": attempts}).decode(),
    )
    log.warning("webhook %s disabled after %d failed attempts", hook["id"], attempts)


def _ring(bell: asyncio.Event) -> Any:
    """A LISTEN callback that only sets `bell` (the payload is never read)."""
    return lambda *_: bell.set()


class WebhookWorker:
    """The dispatcher and the sender loop of one worker process."""

    def __init__(
        self, settings: Settings, db: asyncpg.Pool, cluster_pools: clusters.ClusterPools | None = None
    ):
        self.settings = settings
        self.db = db
        # The process's runtime pools on registered clusters (housekeeping): closed with the
        # dispatchers when a cluster's connection changes.
        self.cluster_pools = cluster_pools
        self.sender = Sender(settings.webhooks, ssrf.Policy.of(settings))
        self.reader_id = "wh_" + secrets.token_hex(6)
        self.ready = asyncio.Event()
        self._bell = asyncio.Event()
        self._work = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._elsewhere: dict[str, float] = {}  # endpoints another worker is sending to, until
        self.delivered = 0
        self.stopping = asyncio.Event()  # set when the worker stops: finish, start nothing new
        # Outbox lag: seconds since the dispatcher last found the outbox drained (0 while it is).
        self._drained_at = time.monotonic()
        self._drained = False

    async def run(self, stop: asyncio.Event, grace_s: float | None = None) -> None:
        """Dispatch and send until `stop`; then start nothing new and give the requests in
        flight `grace_s` (default: the request timeout plus 5 s) to finish and be written
        down. What is still unfinished then is cancelled: its deliveries stay pending and are
        sent again later with the same webhook-id (at-least-once), its lease released."""
        tasks = [
            asyncio.create_task(self._dispatch_loop(stop)),
            asyncio.create_task(self._send_loop(stop)),
            asyncio.create_task(self._watch_clusters(stop)),
        ]
        unregister = REGISTRY.on_scrape(self._collect)
        try:
            await stop.wait()
        finally:
            self.stopping.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            inflight = list(self._inflight.values())
            if inflight:
                grace = self.settings.webhooks.timeout_s + 5 if grace_s is None else grace_s
                log.info("worker stopping: waiting up to %.0fs for %d endpoint(s)", grace, len(inflight))
                _, late = await asyncio.wait(inflight, timeout=grace)
                for t in late:
                    t.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
            unregister()
            await self.sender.close()
            with contextlib.suppress(Exception):
                await self.db.execute(
                    "DELETE FROM fluxbase.event_readers WHERE reader_id = $1", self.reader_id
                )

    async def _collect(self) -> None:
        IN_FLIGHT.set(value=len(self._inflight))
        OUTBOX_LAG.set("webhooks", value=0.0 if self._drained else time.monotonic() - self._drained_at)
        QUEUE_DEPTH.set(
            value=await self.db.fetchval(
                "SELECT count(*) FROM fluxbase.webhook_deliveries WHERE status = 'pending'", timeout=5
            )
        )

    # -- dispatch ---------------------------------------------------------------------------

    def _on_notify(self, *_: object) -> None:
        self._bell.set()

    async def _watch_clusters(self, stop: asyncio.Event) -> None:
        """One dispatcher per registered database cluster (services.clusters), started as they
        appear, stopped when they are removed, and restarted with the new details when a
        cluster's connection string changes (its cursor lives in the cluster's database, so the
        new connection goes on where the old one stopped); looked at every CLUSTERS_EVERY_S.
        The control plane's dispatcher is `_dispatch_loop`'s own."""
        loops: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        versions: dict[str, str] = {}
        try:
            while not stop.is_set():
                try:
                    current = await clusters.connection_versions(self.db)
                    changed = set(loops) - set(current) | {
                        c for c in loops if c in current and current[c] != versions.get(c)
                    }
                    if changed and self.cluster_pools is not None:
                        await self.cluster_pools.forget_changed()
                    for cluster_id in changed:
                        own_stop, task = loops.pop(cluster_id)
                        versions.pop(cluster_id, None)
                        own_stop.set()
                        # One stuck on an address that is gone is cancelled: a dispatch is one
                        # transaction there, and its cursor moves only when it commits.
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(task, 2.0)
                    for cluster_id in set(current) - set(loops):
                        stored, version = await clusters.stored_target_and_version(
                            self.db, self.settings, cluster_id
                        )
                        target = clusters.runtime_login(self.settings, stored, cluster_id)
                        own_stop = asyncio.Event()
                        task = asyncio.create_task(self._dispatch_loop(own_stop, target, cluster_id))
                        loops[cluster_id] = (own_stop, task)
                        versions[cluster_id] = version
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("could not refresh the database clusters (%r)", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CLUSTERS_EVERY_S)
        finally:
            for own_stop, task in loops.values():
                own_stop.set()
                task.cancel()
            await asyncio.gather(*(t for _, t in loops.values()), return_exceptions=True)

    async def _dispatch_loop(
        self, stop: asyncio.Event, target: clusters.Target | None = None, cluster_id: str | None = None
    ) -> None:
        backoff = 0.2
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                if target is None:
                    conn = await asyncpg.connect(
                        self.settings.database.url,
                        timeout=self.settings.database.connect_timeout,
                        server_settings={"application_name": "fluxbase-webhooks"},
                    )
                else:
                    conn = await asyncpg.connect(
                        host=target.host,
                        port=target.port,
                        user=target.user,
                        password=target.password or None,
                        database=target.database,
                        ssl=False,
                        timeout=self.settings.database.connect_timeout,
                        server_settings={"application_name": "fluxbase-webhooks"},
                    )
                # A registered cluster's doorbell wakes its own dispatcher only.
                bell = self._bell if target is None else asyncio.Event()
                await conn.add_listener(CHANNEL, self._on_notify if target is None else _ring(bell))
                await conn.execute(
                    "INSERT INTO fluxbase.event_readers (reader_id, waiting, backend_pid) "
                    "VALUES ($1, false, pg_backend_pid()) "
                    "ON CONFLICT (reader_id) DO UPDATE SET waiting = false, seen_at = now(), "
                    "backend_pid = pg_backend_pid()",
                    self.reader_id,
                )
                backoff = 0.2
                await self._dispatch_forever(conn, stop, cluster_id, bell)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("webhook dispatcher lost its connection (%r); retrying in %.1fs", exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)

    async def _set_waiting(self, conn: asyncpg.Connection, waiting: bool) -> None:
        await conn.execute(
            "UPDATE fluxbase.event_readers SET waiting = $2, seen_at = now() WHERE reader_id = $1",
            self.reader_id,
            waiting,
        )

    async def _dispatch(self, conn: asyncpg.Connection, cluster_id: str | None = None) -> tuple[bool, bool]:
        if cluster_id is None:
            queued, more, active = await dispatch_once(conn)
        else:
            queued, more, active = await dispatch_once(conn, control=self.db, cluster_id=cluster_id)
        # Start sending to those endpoints now, without waiting for the sender loop's next look.
        for hook_id in queued:
            if hook_id not in self._inflight and len(self._inflight) < self.settings.webhooks.concurrency:
                self._inflight[hook_id] = asyncio.create_task(self._send_one(hook_id))
        if queued:
            self._work.set()
        return more or bool(queued), active

    async def _dispatch_forever(
        self,
        conn: asyncpg.Connection,
        stop: asyncio.Event,
        cluster_id: str | None = None,
        bell: asyncio.Event | None = None,
    ) -> None:
        bell = bell or self._bell
        while not stop.is_set():
            busy, active = await self._dispatch(conn, cluster_id)
            if cluster_id is None:
                self.ready.set()
            if busy:
                self._drained = False
                await asyncio.sleep(0.002)
                continue
            self._drained, self._drained_at = True, time.monotonic()
            if not active:
                # No endpoint anywhere: no doorbell (each one costs writers a NOTIFY), just a
                # look once a second for the first endpoint.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                continue
            # Drained: ask for the doorbell, look once more, then sleep until it rings.
            bell.clear()
            await self._set_waiting(conn, True)
            if not (await self._dispatch(conn, cluster_id))[0]:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(bell.wait(), 1.0)
            self._drained, self._drained_at = False, time.monotonic()
            await self._set_waiting(conn, False)

    # -- send -------------------------------------------------------------------------------

    async def _send_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._work.clear()
            try:
                wait = await self._send_round()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("webhook sender could not reach the database (%r)", exc)
                wait = 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), wait)

    async def _send_round(self) -> float:
        """Start a task for each due endpoint there is room for; return how long to sleep."""
        now = time.monotonic()
        self._elsewhere = {h: t for h, t in self._elsewhere.items() if t > now}
        excluded = [*self._inflight, *self._elsewhere]
        room = self.settings.webhooks.concurrency - len(self._inflight)
        if room <= 0:
            return 1.0  # a finishing task sets _work
        for row in await self.db.fetch(_DUE_SQL, room, excluded):
            self._inflight[row["id"]] = asyncio.create_task(self._send_one(row["id"]))
        nxt = await self.db.fetchval(_NEXT_DUE_SQL, [*self._inflight, *self._elsewhere])
        if nxt is None:
            return 1.0
        return max(0.005, min(1.0, (nxt - datetime.now(UTC)).total_seconds()))

    async def _send_one(self, hook_id: str) -> None:
        try:
            while not self.stopping.is_set():
                outcome = await send_endpoint(self.db, self.settings, self.sender, hook_id, self.stopping)
                if outcome is None:  # another worker holds it; look again a little later
                    self._elsewhere[hook_id] = time.monotonic() + 0.5
                    break
                sent, more = outcome
                self.delivered += sent
                if not more:
                    break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("webhook %s: delivery round failed (%r)", hook_id, exc)
        finally:
            self._inflight.pop(hook_id, None)
            self._work.set()  # a slot is free; look for more
