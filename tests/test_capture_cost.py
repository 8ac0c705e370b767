"""sql/0048's cheaper capture keeps what capture did (bench/capture_cost.py measures the cost).

UPDATE is captured by a statement-level trigger now, pairing the n-th new image with the n-th
old one from the two transition tables; write_events takes its checks in one expression on the
way a project session goes, and the old way for everything else (platform sessions, TRUNCATE)."""

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
        events = await sub.rows(5)
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


async def test_partitioned_update_is_named_by_the_parent_and_pairs_across_partitions(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """Before sql/0048 the row-level UPDATE trigger, cloned on each partition, named the
    partition in the event; INSERT and DELETE named the parent. A row that moves to another
    partition is one UPDATE event with its old and new image."""
    await _ok(api, project, "CREATE TABLE parted (id int, v text) PARTITION BY RANGE (id)")
    await _ok(api, project, "CREATE TABLE parted_lo PARTITION OF parted FOR VALUES FROM (0) TO (100)")
    await _ok(api, project, "CREATE TABLE parted_hi PARTITION OF parted FOR VALUES FROM (100) TO (200)")
    await _ok(api, project, "INSERT INTO parted VALUES (1, 'a'), (2, 'b')")
    await _ok(api, project, "UPDATE parted SET id = id + 100 WHERE id = 1")
    await _ok(api, project, "UPDATE parted SET v = 'c' WHERE id = 2")
    events = await _events(control_db, project.id, "parted")
    assert [(e["operation"], e["old"], e["record"]) for e in events if e["operation"] == "UPDATE"] == [
        ("UPDATE", {"id": 1, "v": "a"}, {"id": 101, "v": "a"}),
        ("UPDATE", {"id": 2, "v": "b"}, {"id": 2, "v": "c"}),
    ], events
    for part in ("parted_lo", "parted_hi"):
        assert await _events(control_db, project.id, part) == []


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


async def test_capture_triggers_are_statement_level(api: Api, project: Any, control_db: asyncpg.Pool) -> None:
    await _ok(api, project, "CREATE TABLE shape (id int)")
    rows = await control_db.fetch(
        """SELECT t.tgname, t.tgfoid::regproc::text AS fn, (t.tgtype & 1) = 1 AS row_level,
                  t.tgoldtable, t.tgnewtable
           FROM pg_trigger t WHERE t.tgrelid = $1::regclass AND t.tgname LIKE 'fluxbase_capture_%'
           ORDER BY t.tgname""",
        f"p_{project.id}.shape",
    )
    got = {r["tgname"]: (r["fn"], r["row_level"], r["tgoldtable"], r["tgnewtable"]) for r in rows}
    assert got == {
        "fluxbase_capture_del": ("fluxbase_capture.capture_delete", False, "old_rows", None),
        "fluxbase_capture_ins": ("fluxbase_capture.capture_insert", False, None, "new_rows"),
        "fluxbase_capture_trunc": ("fluxbase_capture.capture_truncate", False, None, None),
        "fluxbase_capture_upd": ("fluxbase_capture.capture_update_rows", False, "old_rows", "new_rows"),
    }
