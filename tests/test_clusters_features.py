"""Features served for a project placed on a registered database cluster (issue 19): the
cluster's outbox housekeeping, export/import, named migrations — through the real API, with two
real PostgreSQL servers (the fixtures of test_clusters.py: a second embedded server, an instance
of its own, a management key)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from fluxbase.config import load_settings
from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.services.clusters import ClusterPools
from fluxbase.worker import housekeeping
from support import Api, Stack, bearer
from test_clusters import _register, _url, inst, mgmt, own_tmp, pg2, pg2_db  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
async def placed(
    inst: dict[str, Any],  # noqa: F811
    mgmt: dict[str, str],  # noqa: F811
    pg2: EmbeddedPostgres,  # noqa: F811
    pg2_db: str,  # noqa: F811
) -> dict[str, Any]:
    """Cluster two registered, a user with one project placed there (the instance admin's
    explicit choice) and that project's admin key, a table with a row."""
    r = await _register(inst, mgmt, _url(pg2, pg2_db))
    assert r.status_code == 201, r.text
    cid = r.json()["cluster"]["id"]
    api: Api = inst["api"]
    admin = bearer(inst["admin"])
    r = await api.http.post("/api/projects", json={"name": "on two", "clusterId": cid}, headers=admin)
    assert r.status_code == 201, r.text
    pid = r.json()["project"]["id"]
    key = await api.new_key(inst["admin"], pid, "admin", rateLimitRequests=100_000)
    r = await api.sql(key, pid, "CREATE TABLE items (id serial PRIMARY KEY, name text)")
    assert r.json()["success"], r.text
    return {"cid": cid, "pid": pid, "key": key}


@pytest.fixture
async def control(stack: Stack, inst: dict[str, Any]) -> AsyncIterator[asyncpg.Pool]:  # noqa: F811
    pool = await asyncpg.create_pool(stack.database_url(inst["dbname"]), min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def there(pg2: EmbeddedPostgres, pg2_db: str) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    """A superuser's connection to cluster two, to look at what the API did there."""
    conn = await asyncpg.connect(_url(pg2, pg2_db))
    yield conn
    await conn.close()


async def test_housekeeping_trims_the_outbox_of_every_cluster(
    inst: dict[str, Any],  # noqa: F811
    placed: dict[str, Any],
    control: asyncpg.Pool,
    there: asyncpg.Connection,
) -> None:
    """Cluster two's outbox (its projects' realtime events) and reader rows are trimmed by the
    worker's housekeeping, not only the control plane's: before, they grew without bound."""
    api: Api = inst["api"]
    pid, key = placed["pid"], placed["key"]
    for i in range(5):
        r = await api.sql(key, pid, "INSERT INTO items (name) VALUES ($1)", [f"row {i}"])
        assert r.json()["success"], r.text
    assert await there.fetchval("SELECT count(*) FROM fluxbase.events WHERE project_id = $1", pid) >= 5
    await there.execute(
        """INSERT INTO fluxbase.event_readers (reader_id, seen_at)
           VALUES ('stale-reader', now() - interval '1 hour')"""
    )
    # No event may be older than a second: every one of cluster two's finished events goes.
    settings = load_settings(dict(inst["env"], FLUXBASE_EVENTS_RETENTION_SECONDS="0"))
    pools = ClusterPools(settings, control)
    try:
        counts = await housekeeping(control, settings, cluster_pools=pools)
    finally:
        await pools.close()
    assert counts[f"events.{placed['cid']}"] >= 5, counts
    assert await there.fetchval("SELECT count(*) FROM fluxbase.events WHERE project_id = $1", pid) == 0
    # The retention mark moved first, so a `since` before it answers resync_required, not a gap.
    assert await there.fetchval("SELECT trimmed_to_xid::text::bigint FROM fluxbase.event_retention") > 0
    assert (
        await there.fetchval("SELECT count(*) FROM fluxbase.event_readers WHERE reader_id = 'stale-reader'")
        == 0
    )
