"""Moving a project between database clusters (issue 19; docs/clusters.md "Moving a project").

The steps, each undone if a later one fails:

1. mark: the control plane's project row gets `moving_to` and `read_only` (its previous value
   kept in `read_only_before_move`), so every guard, key cache and replica that honours
   read-only refuses writes; the access layer answers them PROJECT_MOVING;
2. quiesce: a session of the project's admin role on the source takes SHARE locks on every
   table of the schema (it waits for writes already under way, and holds later ones off) and
   keeps them while the copy runs;
3. copy: pg_dump of the project's schema as its export role (services.dump), verified (trailer
   checksum), then the project's schema and LOGIN roles are provisioned on the target (same
   derived passwords, a mirror row on a registered cluster) and the dump is loaded there in one
   transaction as the project's admin role, vetted and retargeted like an import: tables, data,
   sequences, functions, views, RLS switches and policies; grants come from the roles' default
   privileges, as for any table the project creates, and Fluxbase's capture triggers from the
   event trigger;
4. drain: wait (FLUXBASE_MOVE_DRAIN_TIMEOUT_SECONDS at most) until the source's webhook
   dispatcher and every live realtime reader have passed the project's last event there
   (`_drain`): after the switch they no longer speak for it, so an unread event would be lost;
5. switch: one control-plane UPDATE sets `cluster_id` to the target and restores `read_only`;
   the project's tenant pools of this process are closed, and the control doorbell (sql/0043)
   tells realtime replicas, which re-read where the project lives and send its subscribers
   `resync_required`;
6. the source's schema and roles are dropped (a failure there is logged: the project already
   lives on the target).

A failure in steps 1 to 5 drops whatever was provisioned on the target, clears the mark (the project is
writable on the source again) and answers PROJECT_MOVE_FAILED. API keys, storage, webhooks, the
team and end users live in the control plane and are not touched; the migration ledger lives
with the project's data on its cluster and is carried over, as are its per-table realtime switches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import tempfile
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg

from fluxbase.config import Settings
from fluxbase.db.quoting import quote_ident
from fluxbase.errors import (
    ClusterNotFound,
    Conflict,
    FluxbaseError,
    InsufficientPermissions,
    ProjectMoveFailed,
    ProjectMoving,
    ProjectNotFound,
)
from fluxbase.security.roles import ROLES, role_name, role_password, schema_name
from fluxbase.services import clusters, dump, extensions
from fluxbase.tenancy import provision
from fluxbase.tenancy import statements as classification
from fluxbase.tenancy.pools import TenantPools

log = logging.getLogger("fluxbase.moves")

LOCK_WAIT_S = 10  # how long the quiesce waits for writes already under way


def _move_lock(settings: Settings, project_id: str) -> tuple[int, int]:
    """The advisory-lock key of a project's moves, derived with the instance's secret: the
    control database is the default cluster's, where every tenant may take any advisory lock,
    and with a key anyone could compute (it was (0x4D4F5645, hashtext(project id))) one project
    held another's move lock: its moves answered PROJECT_MOVING (hostile review 11)."""
    digest = hmac.new(
        settings.auth.secret_key.encode(), b"fluxbase.move:" + project_id.encode(), "sha256"
    ).digest()
    return int.from_bytes(digest[:4], "big", signed=True), int.from_bytes(digest[4:8], "big", signed=True)


async def _server(db: asyncpg.Pool, settings: Settings, cluster_id: str) -> tuple[str, int, str]:
    """(host, port, database) of a cluster, as tenant roles reach it."""
    if cluster_id == clusters.DEFAULT:
        parts = urlsplit(settings.database.url)
        host, port = settings.database.server()
        return host, port, (parts.path or "/postgres").lstrip("/") or "postgres"
    target = await clusters.stored_target(db, settings, cluster_id)
    return target.host, target.port, target.database


async def _admin_connect(
    settings: Settings, server: tuple[str, int, str], project_id: str
) -> asyncpg.Connection:
    role = role_name(project_id, "admin")
    return await asyncpg.connect(
        host=server[0],
        port=server[1],
        database=server[2],
        user=role,
        password=role_password(settings.auth.secret_key, role),
        ssl=False,
        timeout=settings.database.connect_timeout,
        server_settings={"application_name": f"fluxbase-move-{project_id}"},
    )


@contextlib.asynccontextmanager
async def _quiesced(settings: Settings, server: tuple[str, int, str], project_id: str) -> AsyncIterator[None]:
    """SHARE locks on every table of the project's schema on the source, held for the block:
    writes already running finish first, later ones wait (and are refused by read-only)."""
    conn = await _admin_connect(settings, server, project_id)
    try:
        async with conn.transaction():
            await conn.execute(
                f"SET LOCAL lock_timeout = '{LOCK_WAIT_S}s'; SET LOCAL statement_timeout = 0; "
                "SET LOCAL idle_in_transaction_session_timeout = 0"
            )
            tables = await conn.fetch(
                """SELECT c.relname FROM pg_catalog.pg_class c
                   WHERE c.relnamespace = pg_catalog.to_regnamespace($1) AND c.relkind IN ('r', 'p')""",
                schema_name(project_id),
            )
            if tables:
                names = ", ".join(
                    f"{quote_ident(schema_name(project_id))}.{quote_ident(t['relname'])}" for t in tables
                )
                await conn.execute(f"LOCK TABLE {names} IN SHARE MODE")
            yield
    finally:
        await conn.close()


async def _end_transactions_begun_before_the_mark(pool: asyncpg.Pool, project_id: str) -> None:
    """End the project's transactions open on the source when it was marked (its mirror row
    included): they began read-write, and a write of theirs that waits for the quiesce's locks (or
    comes after them) would commit on the source after the dump's snapshot and be dropped with it,
    though answered as a success (hostile review 11 finding 3). Their requests answer a retryable
    DATABASE_CONNECTION_ERROR; transactions begun from here on are read-only (the mark changed
    the project's auth epoch). Idle pooled connections hold no transaction and are left alone."""
    roles = [role_name(project_id, s) for s in ROLES]
    await pool.execute(
        """SELECT pg_catalog.pg_terminate_backend(pid, 5000) FROM pg_catalog.pg_stat_activity
           WHERE usename = ANY($1::text[]) AND state IS DISTINCT FROM 'idle'
             AND pid <> pg_catalog.pg_backend_pid()""",
        roles,
    )


# The project's newest event on the source, in the order every reader delivers it: by the
# project's index (project_id, xid, id). `$2`: the kinds that count (webhooks see row and schema
# events only).
_LAST_EVENT_SQL = """
SELECT e.xid::text AS xid, e.id FROM fluxbase.events e
WHERE e.project_id = $1 AND e.kind = ANY($2::text[])
ORDER BY e.project_id DESC, e.xid DESC, e.id DESC LIMIT 1
"""

# Whether the source's webhook dispatcher has queued the event ($2, $3): its global cursor, or
# what it queued of the project above it (webhook_dispatch_early, sql/0035), is at or past it.
_WEBHOOKS_PAST_SQL = """
SELECT EXISTS (SELECT 1 FROM fluxbase.webhook_dispatch
               WHERE (last_xid, last_id) >= ($2::text::xid8, $3::bigint))
    OR EXISTS (SELECT 1 FROM fluxbase.webhook_dispatch_early
               WHERE project_id = $1 AND (last_xid, last_id) >= ($2::text::xid8, $3::bigint))
"""

# The live realtime readers of the source (their backend still connected) whose recorded
# delivery position (sql/0045) is not yet past the event ($1, $2).
_REALTIME_BEHIND_SQL = """
SELECT count(*) FROM fluxbase.event_readers r
WHERE r.reader_id LIKE 'rt\\_%'
  AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = r.backend_pid)
  AND (r.read_xid IS NULL OR (r.read_xid, r.read_id) < ($1::text::xid8, $2::bigint))
"""

DRAIN_POLL_S = 0.05


async def _drain(db: asyncpg.Pool, source_pool: asyncpg.Pool, project_id: str, timeout_s: float) -> None:
    """Wait until the source's readers have passed the project's last event: the webhook
    dispatcher (if the project has an enabled endpoint) has queued it, and every live realtime
    reader has handed it to its subscribers. After the switch, the source's readers no longer
    speak for the project (a registered cluster's reader drops its events, the dispatcher no
    longer lists it), so an event still unread there would never reach its endpoints or
    subscribers. The project is read-only and quiesced by now: no later event is written there.
    Past `timeout_s` (a dispatcher down, a transaction holding every reader back), the move
    fails and is undone (ProjectMoveFailed)."""
    hooked = bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM fluxbase.webhooks WHERE project_id = $1 AND enabled)", project_id
        )
    )
    last_any = await source_pool.fetchrow(_LAST_EVENT_SQL, project_id, ["row", "schema", "broadcast"])
    last_hook = await source_pool.fetchrow(_LAST_EVENT_SQL, project_id, ["row", "schema"]) if hooked else None
    if last_any is None:
        return
    started = asyncio.get_running_loop().time()
    deadline = started + timeout_s
    while True:
        webhooks_done = last_hook is None or bool(
            await source_pool.fetchval(_WEBHOOKS_PAST_SQL, project_id, last_hook["xid"], last_hook["id"])
        )
        behind = await source_pool.fetchval(_REALTIME_BEHIND_SQL, last_any["xid"], last_any["id"])
        if webhooks_done and not behind:
            log.info(
                "project %s: the source's readers passed its last event after %.0f ms",
                project_id,
                (asyncio.get_running_loop().time() - started) * 1000,
            )
            return
        if asyncio.get_running_loop().time() >= deadline:
            what = [] if webhooks_done else ["the webhook dispatcher"]
            if behind:
                what.append(f"{behind} realtime reader(s)")
            log.error(
                "project %s: %s had not read its last event on the source after %.0f s",
                project_id,
                " and ".join(what),
                timeout_s,
            )
            raise ProjectMoveFailed(
                "The source cluster's "
                + " and ".join(what)
                + f" had not delivered the project's last events after {timeout_s:g} s; nothing was"
                " changed. Retry once they catch up (is a worker running?)."
            )
        await asyncio.sleep(DRAIN_POLL_S)


async def _drop_on_cluster(
    db: asyncpg.Pool, cluster_pools: clusters.ClusterPools, cluster_id: str, project_id: str
) -> None:
    """Drop the project's schema and roles on one cluster (and its mirror row on a registered
    one); the control plane's project row is left alone."""
    pool = await cluster_pools.pool(cluster_id)
    async with pool.acquire() as conn, conn.transaction():
        await provision.drop_project(conn, project_id)
        # The migration ledger lives with the project's data (services.migrations): it goes too.
        await conn.execute("DELETE FROM fluxbase.project_migrations WHERE project_id = $1", project_id)
        # So are its per-table realtime switches (on the default cluster, the control plane's
        # project row stays: its switches go here).
        await conn.execute("DELETE FROM fluxbase.realtime_tables WHERE project_id = $1", project_id)
        if cluster_id != clusters.DEFAULT:
            await conn.execute("DELETE FROM fluxbase.projects WHERE id = $1", project_id)


async def _refuse_unoffered_extensions(
    cluster_pools: clusters.ClusterPools, project_id: str, source_id: str, target_id: str
) -> None:
    """The project's installed extensions travel with it: the dump's header turns each on in the
    project on the target (`CREATE EXTENSION`, which the load runs as the project's admin role
    through fluxbase_guard.create_extension, the path a tenant's own install and an import take)
    before the tables that use them. So the target's server must offer every one of them (its
    fluxbase.extensions, written by its migration step): refused before anything is marked.
    Read where the project lives: its extensions are recorded beside its data (sql/0023)."""
    try:
        wanted = await extensions.installed(await cluster_pools.pool(source_id), project_id)
        if not wanted:
            return
        target_pool = await cluster_pools.pool(target_id)
        offered = {
            r["name"] for r in await target_pool.fetch("SELECT name FROM fluxbase.extensions WHERE available")
        }
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
        log.error(
            "project %s: reading the extensions of %s / %s failed: %r", project_id, source_id, target_id, exc
        )
        raise ProjectMoveFailed(
            "The source or the target cluster could not be read; nothing was changed."
        ) from None
    missing = [name for name in wanted if name not in offered]
    if missing:
        raise Conflict(
            f"The target cluster does not offer the extension(s) the project has installed: "
            f"{', '.join(missing)} (GET /api/projects/{{id}}/extensions lists them on each cluster)."
        )


async def _recover(db: asyncpg.Pool, cluster_pools: clusters.ClusterPools, project_id: str) -> None:
    """A mark left by a move whose process died (nobody holds the project's move lock): drop the
    target's partial copy and make the project writable on its source again."""
    row = await db.fetchrow("SELECT cluster_id, moving_to FROM fluxbase.projects WHERE id = $1", project_id)
    if row is None or row["moving_to"] is None:
        return
    log.warning("project %s: recovering an interrupted move to %s", project_id, row["moving_to"])
    if row["moving_to"] != row["cluster_id"]:
        await _drop_on_cluster(db, cluster_pools, row["moving_to"], project_id)
    await db.execute(
        """UPDATE fluxbase.projects
           SET moving_to = NULL, read_only = coalesce(read_only_before_move, read_only),
               read_only_before_move = NULL
           WHERE id = $1 AND moving_to = $2""",
        project_id,
        row["moving_to"],
    )
    await clusters.mirror_project(db, cluster_pools, project_id)


async def move_project(
    db: asyncpg.Pool,
    cluster_pools: clusters.ClusterPools,
    tenants: TenantPools,
    settings: Settings,
    project_id: str,
    target_id: str,
    *,
    by_session: bool,
) -> str:
    """Move the project to `target_id` (see the module's docstring); returns the source's id.

    The move holds a session advisory lock on the control plane for the project: a second move
    meanwhile answers PROJECT_MOVING, and a mark nobody holds the lock for (the moving process
    died) is recovered first (`_recover`)."""
    target = await clusters.get_cluster(db, target_id)
    lock_key = _move_lock(settings, project_id)
    async with db.acquire() as lock:
        if not await lock.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", *lock_key):
            raise ProjectMoving("The project is already being moved.")
        try:
            try:
                await _recover(db, cluster_pools, project_id)
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                log.error("project %s: recovering an interrupted move failed: %r", project_id, exc)
                raise ProjectMoveFailed(
                    "An interrupted earlier move could not be cleaned up (its target is unreachable?)."
                ) from None
            return await _move(
                db, cluster_pools, tenants, settings, project_id, target, by_session=by_session
            )
        finally:
            await lock.execute("SELECT pg_advisory_unlock($1::int4, $2::int4)", *lock_key)


async def _move(
    db: asyncpg.Pool,
    cluster_pools: clusters.ClusterPools,
    tenants: TenantPools,
    settings: Settings,
    project_id: str,
    target: clusters.Cluster,
    *,
    by_session: bool,
) -> str:
    target_id = target.id
    row = await db.fetchrow(
        "SELECT cluster_id, moving_to, name FROM fluxbase.projects WHERE id = $1", project_id
    )
    if row is None:
        raise ProjectNotFound()
    if row["moving_to"] is not None:
        raise ProjectMoving("The project is already being moved.")
    source_id = str(row["cluster_id"])
    if source_id == target_id:
        raise Conflict("The project already lives on that cluster.")
    if not by_session and target.placement != "open":
        # The key's holder may run a closed cluster's server: moving other users' projects
        # there is the same hole placement had (hostile review 7).
        raise InsufficientPermissions(
            "A management key moves projects only to clusters open to placement; "
            "an instance admin's session opens them."
        )
    await _refuse_unoffered_extensions(cluster_pools, project_id, source_id, target_id)
    # End users need nothing moved: their accounts and sessions live in the control plane, and
    # their tokens are served on every cluster (on a registered one the session is checked on the
    # control plane before each request, services.identity; tests/test_cluster_moves.py).

    async with db.acquire() as mc, mc.transaction():
        # The target's placement again under a SHARE lock on its row (the latest version): a
        # key's change of its connection string (which closes it) either committed before, and
        # a key's move is refused here, or waits for this mark and then counts this project
        # (services.clusters.update_cluster; hostile review 11 finding 1).
        placement = await mc.fetchval(
            "SELECT placement FROM fluxbase.clusters WHERE id = $1 FOR SHARE", target_id
        )
        if placement is None:
            raise ClusterNotFound()
        if not by_session and placement != "open" and target_id != clusters.DEFAULT:
            raise InsufficientPermissions(
                "A management key moves projects only to clusters open to placement; "
                "an instance admin's session opens them."
            )
        marked = await mc.fetchval(
            """UPDATE fluxbase.projects
               SET moving_to = $2, read_only_before_move = read_only, read_only = true
               WHERE id = $1 AND cluster_id = $3 AND moving_to IS NULL RETURNING id""",
            project_id,
            target_id,
            source_id,
        )
    if marked is None:
        raise ProjectMoving("The project is already being moved.")
    provisioned = False
    try:
        await clusters.mirror_project(db, cluster_pools, project_id)
        source = await _server(db, settings, source_id)
        there = await _server(db, settings, target_id)
        source_pool = await cluster_pools.pool(source_id)
        target_pool = await cluster_pools.pool(target_id)
        await _end_transactions_begun_before_the_mark(source_pool, project_id)
        with tempfile.TemporaryFile() as f:
            async with _quiesced(settings, source, project_id):
                export = await dump.start_export(
                    settings, db, project_id, server=source, roles_db=source_pool
                )
                async for chunk in export.stream():
                    f.write(chunk)
                # The ledger sits beside the project's data, on its cluster (services.migrations).
                ledger = await source_pool.fetch(
                    "SELECT name, checksum, applied_at, applied_by FROM fluxbase.project_migrations"
                    " WHERE project_id = $1",
                    project_id,
                )
                # The per-table realtime switches live beside the data too: the load below
                # attaches capture again only where they say realtime is on (capture_disabled).
                switches = await source_pool.fetch(
                    "SELECT table_name, enabled FROM fluxbase.realtime_tables WHERE project_id = $1",
                    project_id,
                )
            schema = await asyncio.to_thread(dump.check_dump, f)
            async with target_pool.acquire() as rc, rc.transaction():
                provisioned = True  # from here on, a failure drops what the target has
                if target_id != clusters.DEFAULT:
                    await rc.execute(
                        "INSERT INTO fluxbase.projects (id, name, read_only) VALUES ($1, $2, true)",
                        project_id,
                        row["name"],
                    )
                await provision.provision_project(rc, project_id, settings)
                await rc.executemany(
                    "INSERT INTO fluxbase.project_migrations"
                    " (project_id, name, checksum, applied_at, applied_by)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    [(project_id, *r) for r in ledger],
                )
                await rc.execute("DELETE FROM fluxbase.realtime_tables WHERE project_id = $1", project_id)
                await rc.executemany(
                    "INSERT INTO fluxbase.realtime_tables (project_id, table_name, enabled)"
                    " VALUES ($1, $2, $3)",
                    [(project_id, r["table_name"], r["enabled"]) for r in switches],
                )
            conn = await _admin_connect(settings, there, project_id)
            try:
                async with conn.transaction():
                    caps = classification.Caps.of(settings.tenant).script()
                    await dump.load_statements(conn, caps, f, schema, schema_name(project_id), quiet=True)
            finally:
                await conn.close()
        # Every event the project wrote on the source reaches its endpoints and subscribers
        # before the switch (the readers stop speaking for it there afterwards).
        await _drain(db, source_pool, project_id, settings.database.move_drain_s)
        switched = await db.fetchval(
            """UPDATE fluxbase.projects
               SET cluster_id = $2, moving_to = NULL, read_only = coalesce(read_only_before_move, false),
                   read_only_before_move = NULL
               WHERE id = $1 AND moving_to = $2 RETURNING id""",
            project_id,
            target_id,
        )
        if switched is None:
            raise ProjectNotFound("The project was deleted during the move.")
    except BaseException as exc:
        if provisioned:
            try:
                await _drop_on_cluster(db, cluster_pools, target_id, project_id)
            except Exception as drop_exc:
                log.error(
                    "could not remove the partial copy of %s on %s: %r", project_id, target_id, drop_exc
                )
        await db.execute(
            """UPDATE fluxbase.projects
               SET moving_to = NULL, read_only = coalesce(read_only_before_move, read_only),
                   read_only_before_move = NULL
               WHERE id = $1 AND moving_to = $2""",
            project_id,
            target_id,
        )
        with contextlib.suppress(Exception):
            await clusters.mirror_project(db, cluster_pools, project_id)
        if isinstance(exc, (ProjectNotFound, ProjectMoveFailed)):
            raise
        if isinstance(exc, (FluxbaseError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
            log.error("moving project %s from %s to %s failed: %r", project_id, source_id, target_id, exc)
            raise ProjectMoveFailed() from None
        raise

    # Switched: this process's pools reconnect to the target; the source's copy goes.
    await tenants.close_project(project_id)
    try:
        await clusters.mirror_project(db, cluster_pools, project_id)
        await _drop_on_cluster(db, cluster_pools, source_id, project_id)
    except Exception as exc:
        log.error(
            "project %s moved to %s; removing it from %s failed: %r", project_id, target_id, source_id, exc
        )
    log.info("project %s moved from cluster %s to %s", project_id, source_id, target_id)
    return source_id
