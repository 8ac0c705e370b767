"""Realtime capture of partition trees (sql/0055): every write to a captured tree is captured,
whichever table of the tree it names, once, with its row events naming the tree's root.

Found by hostile review 27 and seen failing before sql/0055: an INSERT, UPDATE or DELETE naming a
partition wrote no event (or an UPDATE naming the partition), an UPDATE moving a row to another
partition wrote none, and a captured table could not be attached as a partition."""

# ruff: noqa: F811  (the fixtures imported from test_capture_native are the parameters)
from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from support import Api, bearer
from test_attack_review16 import plpgsql_capture  # noqa: F401
from test_attack_review22 import ROW, _sql, _token, _until, rt  # noqa: F401
from test_capture_native import _events, _images, superuser, tenant  # noqa: F401
from test_realtime import subscribe

TREE = (
    "CREATE TABLE pt (id int, v text, UNIQUE (id)) PARTITION BY RANGE (id)",
    "CREATE TABLE pt_a PARTITION OF pt FOR VALUES FROM (0) TO (100)",
    # a partition that is itself partitioned, with its own column order
    "CREATE TABLE pt_b (v text, id int) PARTITION BY RANGE (id)",
    "CREATE TABLE pt_b1 PARTITION OF pt_b FOR VALUES FROM (100) TO (200)",
    "ALTER TABLE pt ATTACH PARTITION pt_b FOR VALUES FROM (100) TO (200)",
)


async def _tree(tenant: asyncpg.Connection) -> None:
    for q in TREE:
        await tenant.execute(q)


async def _row_events(control_db: asyncpg.Pool, pid: str) -> list[tuple[str, str, Any, Any]]:
    """(table, operation, record, old) of every row event of the project, in commit order."""
    out = []
    for table in ("pt", "pt_a", "pt_b", "pt_b1"):
        for op, rec, old in await _images(control_db, pid, table):
            out.append((table, op, rec, old))
    return out


def _canon(events: list[Any]) -> list[str]:
    """The events as a multiset: one statement's rows have no order of their own."""
    return sorted(json.dumps(e, sort_keys=True) for e in events)


WRITES = (
    ("INSERT INTO pt VALUES (1, 'root')", [("INSERT", {"id": 1, "v": "root"}, None)]),
    ("INSERT INTO pt_a VALUES (2, 'leaf')", [("INSERT", {"id": 2, "v": "leaf"}, None)]),
    ("INSERT INTO pt_b VALUES ('mid', 150)", [("INSERT", {"id": 150, "v": "mid"}, None)]),
    ("INSERT INTO pt_b1 VALUES ('deep', 160)", [("INSERT", {"id": 160, "v": "deep"}, None)]),
    ("UPDATE pt SET v = 'same' WHERE id = 1", [("UPDATE", {"id": 1, "v": "same"}, {"id": 1, "v": "root"})]),
    # a move between partitions, through the root: one UPDATE
    ("UPDATE pt SET id = 101 WHERE id = 1", [("UPDATE", {"id": 101, "v": "same"}, {"id": 1, "v": "same"})]),
    (
        "UPDATE pt_a SET v = 'leaf2' WHERE id = 2",
        [("UPDATE", {"id": 2, "v": "leaf2"}, {"id": 2, "v": "leaf"})],
    ),
    (
        "UPDATE pt_b SET v = 'mid2' WHERE id = 150",
        [("UPDATE", {"id": 150, "v": "mid2"}, {"id": 150, "v": "mid"})],
    ),
    (
        "INSERT INTO pt_a VALUES (2, 'upsert') ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        [("UPDATE", {"id": 2, "v": "upsert"}, {"id": 2, "v": "leaf2"})],
    ),
    ("DELETE FROM pt_b1 WHERE id = 160", [("DELETE", {"id": 160, "v": "deep"}, {"id": 160, "v": "deep"})]),
    ("DELETE FROM pt_a WHERE id = 2", [("DELETE", {"id": 2, "v": "upsert"}, {"id": 2, "v": "upsert"})]),
    (
        "DELETE FROM pt WHERE id IN (101, 150)",
        [
            ("DELETE", {"id": 101, "v": "same"}, {"id": 101, "v": "same"}),
            ("DELETE", {"id": 150, "v": "mid2"}, {"id": 150, "v": "mid2"}),
        ],
    ),
)


async def _writes_named_by_root(tenant: asyncpg.Connection, control_db: asyncpg.Pool, pid: str) -> None:
    await _tree(tenant)
    expected: list[tuple[str, str, Any, Any]] = []
    for q, events in WRITES:
        await tenant.execute(q)
        expected += [("pt", *e) for e in events]
        got = await _row_events(control_db, pid)
        assert _canon(got) == _canon(expected), q


async def test_every_write_to_a_tree_is_captured_once_naming_its_root(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await _writes_named_by_root(tenant, control_db, project.id)


@pytest.mark.usefixtures("plpgsql_capture")
async def test_the_plpgsql_capture_captures_a_tree_the_same_way(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await _writes_named_by_root(tenant, control_db, project.id)


async def test_a_statement_moving_some_rows_pairs_each_rows_images(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await _tree(tenant)
    await tenant.execute("INSERT INTO pt VALUES (1, 'a'), (2, 'b'), (150, 'c'), (3, 'd'), (160, 'e')")
    await tenant.execute(
        "UPDATE pt SET id = CASE id WHEN 2 THEN 120 WHEN 150 THEN 5 ELSE id END, v = v || '!'"
    )
    updates = [(rec, old) for t, op, rec, old in await _row_events(control_db, project.id) if op == "UPDATE"]
    assert sorted(updates, key=lambda u: u[1]["id"]) == [
        ({"id": 1, "v": "a!"}, {"id": 1, "v": "a"}),
        ({"id": 120, "v": "b!"}, {"id": 2, "v": "b"}),
        ({"id": 3, "v": "d!"}, {"id": 3, "v": "d"}),
        ({"id": 5, "v": "c!"}, {"id": 150, "v": "c"}),
        ({"id": 160, "v": "e!"}, {"id": 160, "v": "e"}),
    ]


async def test_a_moved_row_its_new_partition_drops_is_a_delete_not_a_wrong_pair(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A BEFORE INSERT trigger of the new partition that returns NULL makes the moved row vanish:
    the transition tables no longer pair by position, and the statement's rows are written as
    what happened to them."""
    await _tree(tenant)
    await tenant.execute("INSERT INTO pt VALUES (1, 'gone'), (3, 'moves')")
    await tenant.execute(
        "CREATE FUNCTION drop_gone() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.v = 'gone' THEN RETURN NULL; END IF; RETURN NEW; END $$"
    )
    await tenant.execute(
        "CREATE TRIGGER drop_gone BEFORE INSERT ON pt_b1 FOR EACH ROW EXECUTE FUNCTION drop_gone()"
    )
    await tenant.execute("UPDATE pt SET id = id + 100 WHERE id IN (1, 3)")
    assert await tenant.fetch("SELECT id, v FROM pt ORDER BY id") == [(103, "moves")]
    got = [
        (op, rec)
        for t, op, rec, old in await _row_events(control_db, project.id)
        if op != "INSERT" or rec["id"] > 100
    ]
    assert _canon(got) == _canon(
        [
            ("DELETE", {"id": 1, "v": "gone"}),
            ("DELETE", {"id": 3, "v": "moves"}),
            ("INSERT", {"id": 103, "v": "moves"}),
        ]
    )


async def test_attaching_and_detaching_a_captured_table(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A captured table attached as a partition (refused before: its row-level trigger had the
    clone's name) is captured once, as part of the tree; detached, it names itself again."""
    await _tree(tenant)
    await tenant.execute("CREATE TABLE pt_c (id int, v text)")
    await tenant.execute("INSERT INTO pt_c VALUES (250, 'alone')")
    await tenant.execute("ALTER TABLE pt ATTACH PARTITION pt_c FOR VALUES FROM (200) TO (300)")
    await tenant.execute("UPDATE pt SET v = 'in tree' WHERE id = 250")
    await tenant.execute("UPDATE pt_c SET v = 'direct' WHERE id = 250")
    await tenant.execute("ALTER TABLE pt DETACH PARTITION pt_c")
    await tenant.execute("UPDATE pt_c SET v = 'detached' WHERE id = 250")
    assert await _images(control_db, project.id, "pt") == [
        ("UPDATE", {"id": 250, "v": "in tree"}, {"id": 250, "v": "alone"}),
        ("UPDATE", {"id": 250, "v": "direct"}, {"id": 250, "v": "in tree"}),
    ]
    assert await _images(control_db, project.id, "pt_c") == [
        ("INSERT", {"id": 250, "v": "alone"}, None),
        ("UPDATE", {"id": 250, "v": "detached"}, {"id": 250, "v": "direct"}),
    ]


async def test_a_tree_switched_off_captures_none_of_its_partitions(
    api: Api, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await _tree(tenant)
    h = bearer(project.admin_key)
    r = await api.http.get("/api/realtime/tables", params={"projectId": project.id}, headers=h)
    assert {t["name"]: t["enabled"] for t in r.json()["tables"]} == {"pt": True}  # partitions are not listed
    r = await api.http.post(
        "/api/realtime/disable", json={"projectId": project.id, "tables": ["pt"]}, headers=h
    )
    assert r.status_code == 200, r.text
    await tenant.execute("CREATE TABLE pt_c PARTITION OF pt FOR VALUES FROM (200) TO (300)")
    for q in (
        "INSERT INTO pt_a VALUES (1, 'x')",
        "INSERT INTO pt_b1 VALUES ('y', 150)",
        "INSERT INTO pt_c VALUES (250, 'z')",
    ):
        await tenant.execute(q)
    await tenant.execute("UPDATE pt SET id = id + 1")
    assert await _row_events(control_db, project.id) == []
    assert await _images(control_db, project.id, "pt_c") == []
    r = await api.http.post(
        "/api/realtime/enable", json={"projectId": project.id, "tables": ["pt"]}, headers=h
    )
    assert r.status_code == 200, r.text
    await tenant.execute("UPDATE pt_c SET v = 'on again'")
    assert await _images(control_db, project.id, "pt") == [
        ("UPDATE", {"id": 251, "v": "on again"}, {"id": 251, "v": "z"})
    ]


async def test_a_partition_follows_its_root_whatever_was_said_of_its_name(
    api: Api, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """Realtime switched off for a plain table that is then dropped: a partition created later
    with its name is still captured, because its root is."""
    await _tree(tenant)
    await tenant.execute("CREATE TABLE pt_c (id int, v text)")
    h = bearer(project.admin_key)
    r = await api.http.post(
        "/api/realtime/disable", json={"projectId": project.id, "tables": ["pt_c"]}, headers=h
    )
    assert r.status_code == 200, r.text
    await tenant.execute("DROP TABLE pt_c")
    await tenant.execute("CREATE TABLE pt_c PARTITION OF pt FOR VALUES FROM (200) TO (300)")
    await tenant.execute("INSERT INTO pt_c VALUES (250, 'z')")
    assert await _images(control_db, project.id, "pt") == [("INSERT", {"id": 250, "v": "z"}, None)]


async def test_columns_named_like_the_capture_s_variables(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A tree whose columns have the names of the PL/pgSQL capture's variables: its writes neither
    fail (an ambiguous column reference) nor image the wrong thing."""
    await tenant.execute(
        "CREATE TABLE vt (id int, root text, cols text, olds text, news text, imgs text) "
        "PARTITION BY RANGE (id)"
    )
    await tenant.execute("CREATE TABLE vt_a PARTITION OF vt FOR VALUES FROM (0) TO (100)")
    await tenant.execute("CREATE TABLE vt_b PARTITION OF vt FOR VALUES FROM (100) TO (200)")
    await tenant.execute("INSERT INTO vt_a VALUES (1, 'r', 'c', 'o', 'n', 'i')")
    await tenant.execute("UPDATE vt SET id = 101, cols = 'c2'")
    await tenant.execute("DELETE FROM vt_b")
    row = {"root": "r", "olds": "o", "news": "n", "imgs": "i"}
    assert await _images(control_db, project.id, "vt") == [
        ("INSERT", {"id": 1, "cols": "c", **row}, None),
        ("UPDATE", {"id": 101, "cols": "c2", **row}, {"id": 1, "cols": "c", **row}),
        ("DELETE", {"id": 101, "cols": "c2", **row}, {"id": 101, "cols": "c2", **row}),
    ]


async def test_truncating_a_partition_names_the_partition(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await _tree(tenant)
    await tenant.execute("INSERT INTO pt VALUES (1, 'a'), (150, 'b')")
    await tenant.execute("TRUNCATE pt_a")
    truncs = [
        r["record"] for r in await _events(control_db, project.id, "pt_a") if r["operation"] == "TRUNCATE"
    ]
    assert len(truncs) == 1 and '"TRUNCATE"' in truncs[0]
    assert not [r for r in await _events(control_db, project.id, "pt") if r["operation"] == "TRUNCATE"]


async def test_a_tree_captured_before_sql_0055_is_reshaped(
    tenant: asyncpg.Connection, superuser: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """sql/0012's shape (a row-level UPDATE trigger on the root, cloned onto each partition), then
    what sql/0055's migration does with it: no clone is left, and a move is captured."""
    await _tree(tenant)
    schema = f"p_{project.id}"
    for part in ("pt_a", "pt_b", "pt_b1"):
        for trig in ("ins", "upd", "del", "trunc"):
            await superuser.execute(f"DROP TRIGGER fluxbase_capture_{trig} ON {schema}.{part}")
    await superuser.execute(f"DROP TRIGGER fluxbase_capture_upd ON {schema}.pt")
    await superuser.execute(
        f"CREATE TRIGGER fluxbase_capture_upd AFTER UPDATE ON {schema}.pt "
        "FOR EACH ROW EXECUTE FUNCTION fluxbase_capture.capture_update()"
    )
    assert (
        await superuser.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'fluxbase_capture_upd' AND tgparentid <> 0"
        )
        >= 2
    )
    await superuser.execute(f"SELECT fluxbase_capture.attach_capture('{schema}.pt'::regclass)")
    assert (
        await superuser.fetchval(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "WHERE c.relnamespace = $1::regnamespace AND t.tgname LIKE 'fluxbase_capture%' "
            "AND t.tgparentid <> 0",
            schema,
        )
        == 0
    )
    await tenant.execute("INSERT INTO pt VALUES (1, 'a')")
    await tenant.execute("UPDATE pt SET id = 150")
    assert [op for _, op, _, _ in await _row_events(control_db, project.id)] == ["INSERT", "UPDATE"]


async def owned_tree(api: Api, project: Any) -> None:
    """`ord` (id, owner, v), LIST-partitioned by owner ('u1', 'u2'), whose rows only their owner
    may SELECT (end users), with RLS on."""
    await _sql(api, project, "CREATE TABLE ord (id int, owner text, v text) PARTITION BY LIST (owner)")
    await _sql(api, project, "CREATE TABLE ord_u1 PARTITION OF ord FOR VALUES IN ('u1')")
    await _sql(api, project, "CREATE TABLE ord_u2 PARTITION OF ord FOR VALUES IN ('u2')")
    h = bearer(project.admin_key)
    r = await api.http.post(
        f"/api/projects/{project.id}/rls/policies",
        json={"table": "ord", "name": "own", "command": "SELECT", "using": "owner = auth.uid()"},
        headers=h,
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(f"/api/projects/{project.id}/rls/tables/ord", json={"enabled": True}, headers=h)
    assert r.status_code == 200, r.text


async def test_a_subscriber_of_the_root_receives_every_write_as_its_policies_allow(
    api: Api, project: Any, rt: str
) -> None:
    """End to end: writes naming partitions and a move reach a subscriber of the root, and an end
    user's delivery follows the root's SELECT policy (the row of another owner is withheld)."""
    await owned_tree(api, project)
    async with (
        subscribe(rt, project.id, project.admin_key, tables=["ord"]) as admin,
        subscribe(rt, project.id, await _token(api, project, "u1")) as u1,
    ):
        await _sql(api, project, "INSERT INTO ord_u1 VALUES (1, 'u1', 'mine')")
        await _sql(api, project, "INSERT INTO ord_u2 VALUES (2, 'u2', 'theirs')")
        await _sql(api, project, "UPDATE ord SET owner = 'u1', v = 'given' WHERE id = 2")
        await _sql(api, project, "INSERT INTO ord VALUES (3, 'u1', 'end')")
        seen_admin = [
            (m["payload"]["table"], m["payload"]["operation"], m["payload"]["record"]["v"])
            for m in await _until(admin, "end")
            if m["type"] == ROW
        ]
        seen_u1 = [
            (m["payload"]["table"], m["payload"]["operation"], m["payload"]["record"]["v"])
            for m in await _until(u1, "end")
            if m["type"] == ROW
        ]
    assert seen_admin == [
        ("ord", "INSERT", "mine"),
        ("ord", "INSERT", "theirs"),
        ("ord", "UPDATE", "given"),
        ("ord", "INSERT", "end"),
    ]
    assert seen_u1 == [("ord", "INSERT", "mine"), ("ord", "UPDATE", "given"), ("ord", "INSERT", "end")]
