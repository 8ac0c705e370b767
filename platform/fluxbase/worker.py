"""The background worker: webhook delivery, email sending, and housekeeping (sessions, login throttle, outbox
retention, the webhook log, storage leftovers)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from fluxbase.config import Settings
from fluxbase.errors import StorageUnavailable
from fluxbase.mail import outbox as mail_outbox
from fluxbase.mail import sender as mail_sender
from fluxbase.metrics import serve_metrics
from fluxbase.services import clusters, realtime
from fluxbase.storage.s3 import ObjectStore
from fluxbase.storage.service import StorageService
from fluxbase.webhooks import service as webhooks
from fluxbase.webhooks.delivery import WebhookWorker

log = logging.getLogger("fluxbase.worker")

HOUSEKEEPING_INTERVAL_S = 60.0
# How long one registered cluster's outbox round may take: a server that stops answering (its
# operator controls it) must not hold the instance's housekeeping (hostile review 11 finding 2).
CLUSTER_HOUSEKEEPING_TIMEOUT_S = 30.0


async def housekeep_outbox(db: asyncpg.Pool, settings: Settings, webhooks_waiting: bool = False) -> int:
    """One database's realtime outbox: fold its byte counters, trim events past the retention
    limits, drop reader rows not seen for 10 minutes. The control plane's and every registered
    cluster's (each cluster holds the outbox of the projects placed on it). Returns events trimmed."""
    await realtime.count_outbox_bytes(db)
    trimmed = await realtime.trim_events(
        db,
        settings.realtime.events_retention_s,
        settings.realtime.events_max_rows,
        broadcast_keep=settings.realtime.broadcast_keep,
        webhooks_waiting=webhooks_waiting,
    )
    await db.execute("DELETE FROM fluxbase.event_readers WHERE seen_at < now() - interval '10 minutes'")
    return trimmed


_STRAGGLERS: set[asyncio.Task[int]] = set()  # cluster rounds past their time, left to end


async def housekeep_clusters(
    db: asyncpg.Pool,
    settings: Settings,
    cluster_pools: clusters.ClusterPools,
    timeout_s: float = CLUSTER_HOUSEKEEPING_TIMEOUT_S,
) -> dict[str, int]:
    """The outbox housekeeping on every registered cluster, as the runtime role there. An
    unreachable cluster is logged and skipped (the others go on); its outbox is trimmed on the
    next round it answers. Returns events trimmed per cluster id."""
    # A cluster whose connection string changed since its pool was made: connect anew.
    await cluster_pools.forget_changed()
    done: dict[str, int] = {}
    for row in await db.fetch(
        "SELECT id FROM fluxbase.clusters WHERE id <> $1 ORDER BY id", clusters.DEFAULT
    ):
        cluster_id = row["id"]
        # The cluster's webhook dispatcher reads its outbox for endpoints stored here: while one
        # of its projects has an enabled endpoint, nothing past that dispatcher's cursor goes.
        waiting = bool(
            await db.fetchval(
                """SELECT EXISTS (SELECT 1 FROM fluxbase.webhooks w JOIN fluxbase.projects p
                   ON p.id = w.project_id WHERE w.enabled AND p.cluster_id = $1)""",
                cluster_id,
            )
        )
        # A task waited on with a time limit, not wait_for: cancelling asyncpg on a server that
        # does not answer may itself wait on that server, so a round past its time is cancelled
        # and left to end on its own (its pool holds at most a few connections).
        task = asyncio.create_task(_housekeep_cluster(cluster_pools, cluster_id, settings, waiting))
        finished, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not finished:
            task.cancel()
            _STRAGGLERS.add(task)
            task.add_done_callback(_STRAGGLERS.discard)
            log.warning(
                "housekeeping of database cluster %s took over %ss, left for the next round",
                cluster_id,
                timeout_s,
            )
            continue
        try:
            done[cluster_id] = task.result()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("housekeeping of database cluster %s failed, will retry: %r", cluster_id, exc)
    return done


async def _housekeep_cluster(
    cluster_pools: clusters.ClusterPools, cluster_id: str, settings: Settings, waiting: bool
) -> int:
    return await housekeep_outbox(await cluster_pools.pool(cluster_id), settings, waiting)


async def housekeeping(
    db: asyncpg.Pool,
    settings: Settings,
    store: ObjectStore | None = None,
    cluster_pools: clusters.ClusterPools | None = None,
    cluster_timeout_s: float = CLUSTER_HOUSEKEEPING_TIMEOUT_S,
) -> dict[str, int]:
    """Trim expired sessions and throttle counters, the realtime outbox (and, given the cluster
    pools, every registered cluster's), and (given the object store) settle storage leftovers:
    abandoned uploads and deletes, orphaned objects. Returns counts."""
    sessions = await db.execute("DELETE FROM fluxbase.sessions WHERE expires_at < now() - interval '1 day'")
    throttle = await db.execute("DELETE FROM fluxbase.auth_throttle WHERE resets_at < now()")
    counts = {"sessions": int(sessions.split()[-1]), "throttleCounters": int(throttle.split()[-1])}
    # Rate-limit leases (sql/0038) of names no replica has leased for longer than their window.
    leases = await db.execute(
        "DELETE FROM fluxbase.rate_leases WHERE last_until < extract(epoch FROM clock_timestamp())"
    )
    counts["rateLeases"] = int(leases.split()[-1])
    # Project users' sessions (their refresh tokens cascade): a day after expiry or revocation
    # a token naming them is refused as "no such session" just as well.
    user_sessions = await db.execute(
        """DELETE FROM fluxbase.project_user_sessions
           WHERE expires_at < now() - interval '1 day' OR revoked_at < now() - interval '1 day'"""
    )
    counts["projectUserSessions"] = int(user_sessions.split()[-1])
    counts["events"] = await housekeep_outbox(db, settings)
    if cluster_pools is not None:
        for cluster_id, trimmed in (
            await housekeep_clusters(db, settings, cluster_pools, cluster_timeout_s)
        ).items():
            counts[f"events.{cluster_id}"] = trimmed
    counts["webhookDeliveries"] = await webhooks.trim_log(db, settings.webhooks.log_retention_s)
    counts["mailMessages"] = await mail_outbox.trim_log(db, settings.mail.log_retention_s)
    tokens = await db.execute("DELETE FROM fluxbase.mail_tokens WHERE expires_at < now() - interval '1 day'")
    counts["mailTokens"] = int(tokens.split()[-1])
    if store is not None:
        try:
            storage = await StorageService(db, store, settings).housekeep()
            counts.update({f"storage.{k}": v for k, v in storage.items()})
        except StorageUnavailable:
            log.warning("storage housekeeping skipped: S3 is unreachable")
    return counts


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    from fluxbase.db.control import create_control_pool

    stop = stop or asyncio.Event()
    # Each endpoint being sent to holds a connection (its advisory lock is session-level).
    db = await create_control_pool(settings, max_size=settings.webhooks.concurrency + 4)
    store = ObjectStore(settings.s3)
    await store.start()
    cluster_pools = clusters.ClusterPools(settings, db)
    hooks = WebhookWorker(settings, db, cluster_pools)
    delivery = asyncio.create_task(hooks.run(stop))
    mail = asyncio.create_task(mail_sender.run(db, settings.mail, stop))
    listener = None
    if settings.worker_metrics_port:
        listener = await serve_metrics(
            settings.http.host, settings.worker_metrics_port, settings.metrics_token
        )
    log.info("worker started")
    try:
        while not stop.is_set():
            try:
                await housekeeping(db, settings, store, cluster_pools)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("housekeeping failed, will retry: %r", exc)
            try:
                await asyncio.wait_for(stop.wait(), HOUSEKEEPING_INTERVAL_S)
            except TimeoutError:
                pass
    finally:
        stop.set()
        await asyncio.gather(delivery, mail, return_exceptions=True)
        if listener is not None:
            listener.close()
            await listener.wait_closed()
        log.info("worker stopped")
        await store.close()
        await cluster_pools.close()
        await db.close()
