"""Per-project outbox horizons (realtime/fluxbase_realtime/outbox.py).

An open transaction of one project holds back only that project's later events; every other
project's events flow. Within a project events still arrive in (xid, id) order, so an event's
`cursor` stays a safe resume point, and a session that is not a project role (the platform's
own) still holds every project back: it may write any project's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.client import connect

from fluxbase_realtime.outbox import horizons, parse_snapshot
from support import Api
from test_attack_review1 import MANY, sql
from test_realtime import Sub, _realtime


@pytest.fixture(scope="module")
def rt(instance: Any, log_dir: Any) -> Iterator[str]:
    with _realtime(instance, log_dir) as url:
        yield url


def key(cursor: str) -> tuple[int, int]:
    xid, _, id_ = cursor.partition(":")
    return int(xid), int(id_)


@contextlib.asynccontextmanager
async def joined(url: str, pid: str, token: str, **extra: Any) -> AsyncIterator[tuple[Sub, str]]:
    """A subscription and the cursor its `subscribed` answer gave."""
    async with connect(f"{url}/?token={token}", max_queue=None) as ws:
        await ws.send(json.dumps({"type": "subscribe", "roomId": f"project_{pid}", **extra}))
        sub = Sub(ws)
        first = await sub.next()
        assert first["type"] == "subscribed", first
        yield sub, first["cursor"]


async def a_project(api: Api, owner: str, name: str) -> tuple[str, str]:
    pid = await api.new_project(owner, name)
    admin = await api.new_key(owner, pid, "admin", rateLimitRequests=MANY)
    assert (await sql(api, admin, pid, "CREATE TABLE t (v int)"))["success"]
    return pid, admin


def hold(seconds: float) -> str:
    """One statement that writes a row and keeps its transaction open for `seconds`."""
    return f"WITH x AS (INSERT INTO t VALUES (1) RETURNING v) SELECT pg_sleep({seconds}) FROM x"


def test_horizons_split_project_roles_from_everyone_else() -> None:
    a, b = "0123456789abcdef", "fedcba9876543210"
    holders = {
        100: f"p_{a}_admin",
        105: f"p_{b}_rw",
        107: "fluxbase_app",  # the platform: may write any project's events
        112: f"p_{a}_read",
    }
    below_all, below = horizons(120, [100, 105, 107, 112, 115], holders)
    # 115 is in no session (ended since the snapshot, or a prepared transaction): it holds all,
    # but 107 already does, lower.
    assert below_all == 107
    assert below == {a: 100, b: 105}
    # A project whose lowest open xid is above everyone's horizon needs no horizon of its own.
    assert horizons(120, [112, 110], {112: f"p_{a}_admin", 110: "postgres"}) == (110, {})
    assert horizons(120, [], {}) == (120, {})
    # Look-alike role names hold everyone back: only p_<16 hex>_<scope> is a project role.
    assert horizons(120, [101], {101: f"p_{a}_admin_x"})[0] == 101
    assert horizons(120, [101], {101: "p_0123_admin"})[0] == 101
    # 64-bit xids from the snapshot, 32-bit ones from pg_stat_activity.
    big = (7 << 32) + 300
    assert horizons(big + 10, [big], {300: f"p_{a}_admin"}) == (big + 10, {a: big})
    assert parse_snapshot("100:120:100,105") == (100, 120, [100, 105])
    assert parse_snapshot("120:120:") == (120, 120, [])


async def test_an_open_transaction_holds_back_only_its_own_projects_later_events(
    api: Api, project: Any, rt: str
) -> None:
    """Project A's second write commits while its first is still open: A's subscriber gets both,
    the first first (per-project commit-safe order), while project B's events flow meanwhile."""
    a, a_key = await a_project(api, project.owner_token, "held")
    b, b_key = await a_project(api, project.owner_token, "flowing")
    async with joined(rt, a, a_key) as (sub_a, _), joined(rt, b, b_key) as (sub_b, _):
        first = asyncio.create_task(sql(api, a_key, a, hold(4)))
        try:
            await asyncio.sleep(0.7)
            assert (await sql(api, a_key, a, "INSERT INTO t VALUES (2)"))["success"]
            assert (await sql(api, b_key, b, "INSERT INTO t VALUES (3)"))["success"]
            got_b = await sub_b.rows(1, timeout=2.5)
            assert got_b[0]["payload"]["record"]["v"] == 3
            # A's committed second write waits for A's open first one.
            assert [m for m in await sub_a.silent(0.5) if m["type"] == "db_event"] == []
        finally:
            assert (await first)["success"]
        got_a = await sub_a.rows(2, timeout=10)
    assert [m["payload"]["record"]["v"] for m in got_a] == [1, 2]
    assert key(got_a[0]["cursor"]) < key(got_a[1]["cursor"])


async def test_cursors_of_events_read_early_resume_without_loss_or_duplicates(
    api: Api, project: Any, rt: str
) -> None:
    a, a_key = await a_project(api, project.owner_token, "holder")
    b, b_key = await a_project(api, project.owner_token, "resumer")
    holding = asyncio.create_task(sql(api, a_key, a, hold(6)))
    try:
        await asyncio.sleep(0.7)
        async with joined(rt, b, b_key) as (sub, _):
            for v in (11, 12, 13):
                assert (await sql(api, b_key, b, f"INSERT INTO t VALUES ({v})"))["success"]
            seen = await sub.rows(3, timeout=2.5)  # read early: A's transaction is still open
        assert [m["payload"]["record"]["v"] for m in seen] == [11, 12, 13]
        # Resuming after the second: the third once (replayed), then live ones, nothing twice.
        async with joined(rt, b, b_key, since=seen[1]["cursor"]) as (again, upto):
            assert key(upto) >= key(seen[2]["cursor"])
            assert (await sql(api, b_key, b, "INSERT INTO t VALUES (14)"))["success"]
            more = await again.rows(2, timeout=5)
            assert [m for m in await again.silent(0.5) if m["type"] == "db_event"] == []
        assert [m["payload"]["record"]["v"] for m in more] == [13, 14]
        # A new subscriber's cursor already covers what was delivered early: resuming from it
        # replays nothing.
        async with joined(rt, b, b_key) as (_fresh, fresh_cursor):
            assert key(fresh_cursor) >= key(more[1]["cursor"])
        async with joined(rt, b, b_key, since=fresh_cursor) as (resumed, _):
            assert [m for m in await resumed.silent(0.7) if m["type"] == "db_event"] == []
    finally:
        assert (await holding)["success"]


async def test_a_platform_transaction_still_holds_every_project_back(
    api: Api, project: Any, rt: str, control_db: asyncpg.Pool
) -> None:
    """A session that is not a project role may write any project's events (the platform's own
    writes): while one is open, later events of every project wait for it, and then arrive."""
    b, b_key = await a_project(api, project.owner_token, "bystander")
    async with joined(rt, b, b_key) as (sub, _), control_db.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.fetchval("SELECT pg_current_xact_id()")  # holds a transaction id
            assert (await sql(api, b_key, b, "INSERT INTO t VALUES (21)"))["success"]
            assert [m for m in await sub.silent(1.0) if m["type"] == "db_event"] == []
        finally:
            await tx.rollback()
        got = await sub.rows(1, timeout=5)
    assert got[0]["payload"]["record"]["v"] == 21
