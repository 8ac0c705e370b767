"""One outbox reader per registered database cluster (services.clusters): each cluster's
projects write their events to that cluster's own `fluxbase.events`, so the realtime service
reads every cluster's outbox and fans all of them out through the one hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import asyncpg

from fluxbase.config import Settings
from fluxbase.services import clusters
from fluxbase_realtime.outbox import OutboxEvent, OutboxReader

log = logging.getLogger(__name__)
RESTART_WAIT_S = 2.0  # how long a reader whose cluster's connection changed may take to stop

REFRESH_S = 2.0  # how soon a newly registered cluster's outbox is read without a subscriber asking


def _dsn(target: clusters.Target) -> str:
    auth = quote(target.user, safe="") + (":" + quote(target.password, safe="") if target.password else "")
    return f"postgresql://{auth}@{target.host}:{target.port}/{quote(target.database, safe='')}"


class ClusterReaders:
    """The default cluster's reader plus one per registered cluster, started as they appear and
    stopped when they are removed; which cluster each project lives on, remembered."""

    def __init__(
        self,
        settings: Settings,
        default: OutboxReader,
        deliver: Callable[[list[OutboxEvent]], Awaitable[None]],
        batch: int,
    ) -> None:
        self.settings = settings
        self.readers: dict[str, OutboxReader] = {clusters.DEFAULT: default}
        self.pools: dict[str, asyncpg.Pool] = {}  # replay reads on a registered cluster
        self._deliver = deliver
        self._batch = batch
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._where: dict[str, str] = {}
        self._versions: dict[str, str] = {}  # the connection version each reader was made from
        self._carry: dict[str, OutboxReader] = {}  # a stopped reader whose position goes on
        self._lock = asyncio.Lock()

    async def cluster_of(self, db: asyncpg.Pool, project_id: str) -> str:
        known = self._where.get(project_id)
        if known is None:
            found = await db.fetchval("SELECT cluster_id FROM fluxbase.projects WHERE id = $1", project_id)
            known = str(found or clusters.DEFAULT)
            if found is not None:
                self._where[project_id] = known
        return known

    async def moved(self, db: asyncpg.Pool, project_ids: set[str]) -> list[str]:
        """Which of these projects live on another cluster than remembered (a move between
        clusters, services.moves): their new cluster is remembered from now on."""
        known = [p for p in project_ids if p in self._where]
        if not known:
            return []
        rows = await db.fetch(
            "SELECT id, cluster_id FROM fluxbase.projects WHERE id = ANY($1::text[])", known
        )
        moved = []
        for row in rows:
            if self._where.get(row["id"]) != row["cluster_id"]:
                self._where[row["id"]] = str(row["cluster_id"])
                moved.append(str(row["id"]))
        if moved:
            await self.refresh(db)  # a reader for the new cluster, if it has none yet
        return moved

    async def reader_for(self, db: asyncpg.Pool, project_id: str) -> OutboxReader:
        cluster_id = await self.cluster_of(db, project_id)
        reader = self.readers.get(cluster_id)
        if reader is None:
            await self.refresh(db)
            reader = self.readers.get(cluster_id, self.readers[clusters.DEFAULT])
        return reader

    def _only(self, db: asyncpg.Pool, cluster_id: str) -> Callable[[list[OutboxEvent]], Awaitable[None]]:
        """A registered cluster's reader speaks only for the projects that live there: whoever runs
        that server can write any row into its outbox, naming any project (hostile review 7)."""

        async def deliver(events: list[OutboxEvent]) -> None:
            keep = []
            for event in events:
                if await self.cluster_of(db, event.project_id) == cluster_id:
                    keep.append(event)
                else:
                    log.warning("dropped an event of cluster %s for a project living elsewhere", cluster_id)
            if keep:
                await self._deliver(keep)

        return deliver

    async def replay_db(self, db: asyncpg.Pool, project_id: str) -> asyncpg.Pool:
        """Where a project's past events are read: its cluster's database."""
        cluster_id = await self.cluster_of(db, project_id)
        return self.pools.get(cluster_id, db)

    async def refresh(self, db: asyncpg.Pool) -> None:
        """Start a reader for every registered cluster that has none; stop removed ones'; and
        restart, with the new details, those whose connection string changed (`PATCH
        /api/admin/clusters/{id} {connectionString}`: the same database at another address, or
        a new password). A restarted reader goes on from the old one's position: every event
        the old one had not delivered is delivered by the new one, none twice."""
        async with self._lock:
            versions = await clusters.connection_versions(db)
            for cluster_id in [c for c in self.readers if c != clusters.DEFAULT]:
                if cluster_id in versions and versions[cluster_id] != self._versions.get(cluster_id):
                    log.info("cluster %s: its connection changed, reconnecting its outbox reader", cluster_id)
                    # Not through the old address (it may be gone): a short graceful stop, and
                    # the old reader's row is removed through the new connection below.
                    self._carry[cluster_id] = await self._stop(cluster_id, restart=True)
            for cluster_id in set(versions) - set(self.readers):
                stored, version = await clusters.stored_target_and_version(db, self.settings, cluster_id)
                dsn = _dsn(clusters.runtime_login(self.settings, stored, cluster_id))
                reader = OutboxReader(dsn, self._only(db, cluster_id), batch=self._batch)
                before = self._carry.pop(cluster_id, None)
                if before is not None and before.cursor is not None:
                    reader.cursor, reader.early = before.cursor, dict(before.early)
                self.pools[cluster_id] = await asyncpg.create_pool(dsn, min_size=0, max_size=2)  # type: ignore[assignment]
                if before is not None:
                    with contextlib.suppress(Exception):
                        await self.pools[cluster_id].execute(
                            "DELETE FROM fluxbase.event_readers WHERE reader_id = $1", before.reader_id
                        )
                stop = self._stops[cluster_id] = asyncio.Event()
                self.readers[cluster_id] = reader
                self._versions[cluster_id] = version
                self._tasks[cluster_id] = asyncio.create_task(reader.run(stop))
                log.info("reading the outbox of cluster %s", cluster_id)
            for cluster_id in set(self.readers) - set(versions) - {clusters.DEFAULT}:
                await self._stop(cluster_id)

    async def _stop(self, cluster_id: str, *, restart: bool = False) -> OutboxReader:
        self._stops.pop(cluster_id).set()
        task = self._tasks.pop(cluster_id)
        with contextlib.suppress(Exception):
            # A reader stops between two polls; one stuck on a connection to an address that is
            # gone is cancelled (its cursor moves only after a poll returned).
            await asyncio.wait_for(task, RESTART_WAIT_S if restart else 5)
        self._versions.pop(cluster_id, None)
        reader = self.readers.pop(cluster_id)
        if not restart:
            await reader.close()
        pool = self.pools.pop(cluster_id, None)
        if pool is not None:
            if restart:
                pool.terminate()
            else:
                await pool.close()
        return reader

    async def watch(self, db: asyncpg.Pool, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh(db)
            except Exception as exc:
                log.warning("could not refresh the database clusters (%r)", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REFRESH_S)

    async def close(self) -> None:
        for cluster_id in list(self._stops):
            await self._stop(cluster_id)
