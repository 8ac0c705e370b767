"""sql/0048's cheaper capture keeps what capture did (bench/capture_cost.py measures the cost).

write_events takes its checks in one expression on the way a project session goes, and the old
way for everything else (platform sessions, TRUNCATE); bulk statements go through its many-row
INSERT, single rows through its one-row VALUES."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from support import Api
from test_realtime import rt, subscribe  # noqa: F401 - fixture


async def _ok(api: Api, project: Any, q: str) -> None:
    r = await api.sql(project.admin_key, project.id, q)
    assert r.json()["success"], (q, r.text)


async def _events(control_db: asyncpg.Pool, pid: str, table: str) -> list[dict[str, Any]]:
    rows = await control_db.fetch(
        "SELECT kind, table_name, operation, record::text AS record, old::text AS old, bytes "
        "FROM fluxbase.events WHERE project_id = $1 AND table_name = $2 "
        "AND (kind = 'row' OR operation = 'TRUNCATE') ORDER BY xid, id",
        pid,
        table,
    )
    return [
        {
            **dict(r),
            "record": json.loads(r["record"]) if r["record"] else None,
            "old": json.loads(r["old"]) if r["old"] else None,
        }
        for r in rows
    ]


async def test_bulk_update_pairs_each_rows_old_and_new_image(
    api: Api,
    project: Any,
    rt: str,  # noqa: F811
) -> None:
    """One statement changes five rows, their keys included, in an order that is not the
    insertion order: every event's old image is that row's before the statement."""
    await _ok(api, project, "CREATE TABLE bulk_upd (id int PRIMARY KEY, v text)")
    await _ok(api, project, "INSERT INTO bulk_upd SELECT g, 'v' || g FROM generate_series(1, 5) g")
    await _ok(api, project, "UPDATE bulk_upd SET v = 'w' WHERE id = 3")  # row 3 moves in the heap
    async with subscribe(rt, project.id, project.admin_key, tables=["bulk_upd"]) as sub:
        await _ok(api, project, "UPDATE bulk_upd SET id = id + 10, v = v || '!'")
        # The single-row UPDATE just before subscribing may still reach the new subscriber (the
        # outbox reader can be between polls when it joins): only the bulk statement's events.
        events = [
            await sub.until(lambda m: m["type"] == "db_event" and m["payload"]["record"]["id"] > 10)
            for _ in range(5)
        ]
    pairs = sorted(((e["payload"]["old"], e["payload"]["record"]) for e in events), key=lambda p: p[0]["id"])
    assert all(e["payload"]["operation"] == "UPDATE" for e in events), events
    assert [(o["id"], n["id"]) for o, n in pairs] == [(i, i + 10) for i in range(1, 6)], pairs
    assert all(n["v"] == o["v"] + "!" for o, n in pairs), pairs


async def test_update_of_no_row_writes_no_event(api: Api, project: Any, control_db: asyncpg.Pool) -> None:
    await _ok(api, project, "CREATE TABLE upd_none (id int PRIMARY KEY, v text)")
    await _ok(api, project, "INSERT INTO upd_none VALUES (1, 'a')")
    await _ok(api, project, "UPDATE upd_none SET v = 'b' WHERE id = 2")
    await _ok(api, project, "UPDATE upd_none SET v = 'c' WHERE id = 1")
    assert [(e["operation"], e["record"]) for e in await _events(control_db, project.id, "upd_none")] == [
        ("INSERT", {"id": 1, "v": "a"}),
        ("UPDATE", {"id": 1, "v": "c"}),
    ]


async def test_platform_session_and_truncate_still_captured(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """The ways write_events' fast check does not cover: a platform session's write is attributed
    by the table's schema, and TRUNCATE writes its schema event."""
    await _ok(api, project, "CREATE TABLE plat (id int PRIMARY KEY, v text)")
    await control_db.execute(f"INSERT INTO \"p_{project.id}\".plat VALUES (7, 'platform')")
    await control_db.execute(f"UPDATE \"p_{project.id}\".plat SET v = 'again'")
    await _ok(api, project, "TRUNCATE plat")
    events = await _events(control_db, project.id, "plat")
    assert [(e["kind"], e["operation"]) for e in events] == [
        ("row", "INSERT"),
        ("row", "UPDATE"),
        ("schema", "TRUNCATE"),
    ], events
    assert events[1]["old"] == {"id": 7, "v": "platform"} and events[1]["record"] == {"id": 7, "v": "again"}
    assert events[0]["bytes"] > 0
