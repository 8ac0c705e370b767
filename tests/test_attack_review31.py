"""Hostile review 31: realtime capture of partition trees (sql/0055 at 260e3f7: the row-at-a-time
capture_tree_insert/update/delete with lockstep refcursors and 16 MiB flushes, #variable_conflict
use_variable, fluxbase_capture.partition_tree, on_ddl_end attaching a new partition whatever
realtime_tables says of its name, the migration's DO block).

Attacked: the OLD/NEW pairing with equal counts (a tenant enum whose cast to json, called by
to_jsonb for every image, writes the tree while the cursors are read; writable CTEs mixing an
UPDATE whose moved row a BEFORE INSERT trigger drops, an INSERT ... ON CONFLICT DO UPDATE and an
UPDATE moving rows; MERGE in a CTE beside an UPDATE; a tenant function MOVEing the capture's
"<unnamed portal N>" cursors); tenant columns named like every variable of the functions and more
(root cols img imgs held n o op olds news n_old n_new c_old c_new r a tg_relid old_rows new_rows)
through the one-row path, the cursor path, a move and a DELETE; partition_tree on a plain table
with an INHERITS child; a table switched off by name passing through a captured tree; a tree
switched off by ALTER TABLE ... DISABLE TRIGGER ALL, which /api/realtime/tables reports as off.

Found (strict xfails, each seen failing). 1 is fixed since (settle_detached: after an ALTER
TABLE of a partitioned table, a table that was a partition becomes a table of its own for capture,
off if realtime was switched off for its name), its xfail marks removed; 2 is open
(docs/capture.md):
1. (low-medium, a switched-off table publishes) A table the project switched realtime off for
   (POST /api/realtime/disable: realtime_tables enabled = false) publishes again after it is
   ATTACHed to a captured tree and DETACHed: reshape_partitions gives it the partition shape
   whatever its realtime_tables row says (new in this change), and a detached partition keeps
   it, so its writes are row events naming it, under its own policies. The same for a partition
   created under a switched-off name (on_ddl_end now attaches it whatever realtime_tables says)
   and then detached (DETACH ... CONCURRENTLY: the same, seen). Nothing switched it back on:
   /api/realtime/tables now lists it as on while realtime_tables still says off (a project move
   reloads it without capture: the two disagree). Tests:
   test_a_table_switched_off_stays_off_after_a_stay_in_a_captured_tree,
   test_a_partition_created_under_a_switched_off_name_stays_off_once_detached.
2. (low, a tree listed as off publishes) ALTER TABLE pt DISABLE TRIGGER ALL: /api/realtime/tables
   lists pt as off (tgenabled = 'D'), and a plain table so switched publishes nothing; but the
   partitions' capture triggers are their own (not clones, so the DISABLE does not recurse), and
   attach_partition_capture / reshape_partitions test only that the root's fluxbase_capture_ins
   exists, not that it is enabled: INSERT/UPDATE naming a partition, and a partition created
   afterwards, are published under the root's name. Test: test_a_tree_listed_as_off_publishes_nothing.

Held: pairing by position with equal counts (only a dropped move makes an OLD without a NEW; a
tenant cast writing the tree mid-loop is a nested statement with its own transition tables; an
upsert's UPDATE shares the statement's UPDATE transition tables but pairs its own rows, its
INSERT goes to the INSERT table); the capture cursors are session portals a tenant's own cast can
MOVE (mispaired UPDATEs, a NULL record), but any tenant trigger can already call write_events with
any images for its own project: no gain, recorded as such; use_variable (every name imaged its
own column's value, no error); partition_tree leaves INHERITS children alone (a child keeps its
own capture when its parent is switched off and on).

Not tried: a project
move of finding 1's state (needs two clusters), partition_tree on very deep trees, foreign-table
partitions (no FDW for tenants).
"""

# ruff: noqa: F811  (the fixtures imported from test_capture_native are the parameters)
from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from support import Api, bearer
from test_attack_review30 import _rows, _tree
from test_capture_native import superuser, tenant  # noqa: F401

VARS = [
    "root", "cols", "img", "imgs", "held", "n", "o", "op", "olds", "news",
    "n_old", "n_new", "c_old", "c_new", "r", "a", "tg_relid", "old_rows", "new_rows",
]  # fmt: skip


async def _disable(api: Api, project: Any, table: str) -> None:
    r = await api.http.post(
        "/api/realtime/disable",
        json={"projectId": project.id, "tables": [table]},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 200, r.text


async def test_a_table_switched_off_stays_off_after_a_stay_in_a_captured_tree(
    api: Api, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await tenant.execute("CREATE TABLE arch (id int, v text)")
    await _disable(api, project, "arch")
    await _tree(tenant)
    await tenant.execute("ALTER TABLE pt ATTACH PARTITION arch FOR VALUES FROM (200) TO (300)")
    await tenant.execute("ALTER TABLE pt DETACH PARTITION arch")
    await tenant.execute("INSERT INTO arch VALUES (250, 'after')")
    assert [(t, op) for t, op, _, _ in await _rows(control_db, project.id)] == []


async def test_a_partition_created_under_a_switched_off_name_stays_off_once_detached(
    api: Api, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await tenant.execute("CREATE TABLE arch (id int, v text)")
    await _disable(api, project, "arch")
    await tenant.execute("DROP TABLE arch")
    await _tree(tenant)
    await tenant.execute("CREATE TABLE arch PARTITION OF pt FOR VALUES FROM (200) TO (300)")
    await tenant.execute("ALTER TABLE pt DETACH PARTITION arch")
    await tenant.execute("INSERT INTO arch VALUES (250, 'after')")
    assert [(t, op) for t, op, _, _ in await _rows(control_db, project.id)] == []


async def test_columns_named_like_every_variable_image_their_own_values(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    cols = "id int, " + ", ".join(f'"{c}" text' for c in VARS)
    await _tree(tenant, cols)
    vals = ", ".join(f"'{c}-' || g" for c in VARS)
    await tenant.execute(f"INSERT INTO pt_a SELECT g, {vals} FROM generate_series(1, 3) g")
    await tenant.execute("UPDATE pt SET id = id + 100, n = 'moved' WHERE id <= 2")  # two rows, moved
    await tenant.execute("UPDATE pt SET o = 'one' WHERE id = 3")  # the one-row path
    await tenant.execute("UPDATE pt_b SET cols = cols || '!'")  # naming a partition, two rows
    await tenant.execute("DELETE FROM pt_b WHERE id = 101")
    got = await _rows(control_db, project.id)
    assert all(t == "pt" for t, _, _, _ in got)
    for _, op, rec, old in got:
        for c in VARS:
            if c not in ("n", "o", "cols"):
                assert rec[c] == f"{c}-{rec['id'] % 100}", (op, c, rec)
        if op == "UPDATE":
            assert old["id"] % 100 == rec["id"] % 100 and old["root"] == rec["root"], (old, rec)
    ups = [(rec["id"], rec["n"], rec["o"], rec["cols"]) for _, op, rec, _ in got if op == "UPDATE"]
    assert sorted(ups) == sorted(
        [(101, "moved", "o-1", "cols-1"), (102, "moved", "o-2", "cols-2"), (3, "n-3", "one", "cols-3"),
         (101, "moved", "o-1", "cols-1!"), (102, "moved", "o-2", "cols-2!")]
    )  # fmt: skip
    assert [op for _, op, _, _ in got].count("DELETE") == 1


async def test_a_tenant_cast_writing_the_tree_mid_image_does_not_shift_pairs(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """A tenant enum with a cast to json (to_jsonb calls it for every image) that INSERTs into the
    tree while the capture's cursors are being read: its writes are a nested statement with its
    own transition tables; the UPDATE's pairs stay right."""
    await tenant.execute("CREATE TYPE k AS ENUM ('a', 'b', 'c')")
    await tenant.execute(
        """CREATE FUNCTION k_json(x k) RETURNS json LANGUAGE plpgsql AS $$
           BEGIN
             IF x = 'b' THEN INSERT INTO pt VALUES (50, 'nested', 'a'); END IF;
             RETURN to_json(x::text);
           END $$"""
    )
    await tenant.execute("CREATE CAST (k AS json) WITH FUNCTION k_json(k)")
    await _tree(tenant, "id int, v text, kk k")
    await tenant.execute("INSERT INTO pt SELECT g, 'v' || g, 'a' FROM generate_series(1, 4) g")
    await tenant.execute("UPDATE pt SET kk = 'b', id = id + 100, v = v || '+' WHERE id <= 4")
    ups = [(old, rec) for _, op, rec, old in await _rows(control_db, project.id) if op == "UPDATE"]
    assert len(ups) == 4
    for old, rec in ups:
        assert rec["id"] == old["id"] + 100 and rec["v"] == old["v"] + "+", (old, rec)


async def test_only_the_tenants_own_code_can_move_the_capture_cursors(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """The capture's cursors are session portals ("<unnamed portal N>"): a tenant cast run while
    the OLD cursor is read can MOVE the NEW one. Only the tenant's own code can do it, and a
    tenant trigger can call write_events with any images anyway: recorded, not a hole."""
    await tenant.execute("CREATE TYPE k AS ENUM ('a', 'b', 'c')")
    await tenant.execute(
        """CREATE FUNCTION k_json(x k) RETURNS json LANGUAGE plpgsql AS $$
           DECLARE c refcursor; top int := 0;
           BEGIN
             IF x = 'c' AND current_setting('r31.done', true) IS DISTINCT FROM 'y' THEN
               PERFORM set_config('r31.done', 'y', true);
               FOR i IN 1..300 LOOP  -- the newest unnamed portal is the capture's NEW cursor
                 c := '<unnamed portal ' || i || '>';
                 BEGIN
                   MOVE RELATIVE 0 FROM c;
                   top := i;
                 EXCEPTION WHEN invalid_cursor_name OR object_not_in_prerequisite_state THEN NULL;
                 END;
               END LOOP;
               FOR i IN REVERSE top..1 LOOP  -- the other one than the one being read
                 c := '<unnamed portal ' || i || '>';
                 BEGIN
                   MOVE c;
                   RAISE NOTICE 'moved %', i;
                   EXIT;
                 EXCEPTION WHEN OTHERS THEN RAISE NOTICE 'skip % %', i, SQLERRM;
                 END;
               END LOOP;
             END IF;
             RETURN to_json(x::text);
           END $$"""
    )
    await tenant.execute("CREATE CAST (k AS json) WITH FUNCTION k_json(k)")
    await _tree(tenant, "id int, v text, kk k")
    await tenant.execute("INSERT INTO pt SELECT g, 'v' || g, 'c' FROM generate_series(1, 4) g")
    await tenant.execute("UPDATE pt SET kk = 'a', id = id + 100 WHERE id <= 4")
    ups = await control_db.fetch(
        "SELECT (old->>'id')::int AS o, (record->>'id')::int AS n FROM fluxbase.events "
        "WHERE project_id = $1 AND operation = 'UPDATE' ORDER BY id",
        project.id,
    )
    assert [tuple(u) for u in ups] == [(1, 102), (2, 103), (3, 104), (4, None)]
    # The baseline: any trigger of the tenant's may write any images for its own tables.
    await tenant.execute(
        """CREATE FUNCTION forge() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             PERFORM fluxbase_capture.write_events('pt'::regclass, 'UPDATE',
                                                   ARRAY[NULL::jsonb], ARRAY['{"id": 1}'::jsonb]);
             RETURN NULL;
           END $$"""
    )
    await tenant.execute("CREATE TABLE other (id int)")
    await tenant.execute(
        "CREATE TRIGGER forge AFTER INSERT ON other FOR EACH STATEMENT EXECUTE FUNCTION forge()"
    )
    await tenant.execute("INSERT INTO other VALUES (1)")
    assert (
        await control_db.fetchval(
            "SELECT count(*) FROM fluxbase.events"
            " WHERE project_id = $1 AND operation = 'UPDATE' AND record IS NULL",
            project.id,
        )
        == 2
    )


async def test_an_inheritance_child_keeps_its_own_capture_when_its_parent_is_switched(
    api: Api, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    await tenant.execute("CREATE TABLE par (id int, v text)")
    await tenant.execute("CREATE TABLE chi () INHERITS (par)")
    assert await tenant.fetchval("SELECT count(*) FROM fluxbase_capture.partition_tree('par')") == 1
    await _disable(api, project, "par")
    await tenant.execute("INSERT INTO chi VALUES (1, 'c')")
    r = await api.http.post(
        "/api/realtime/enable",
        json={"projectId": project.id, "tables": ["par"]},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 200, r.text
    await _disable(api, project, "chi")
    await tenant.execute("INSERT INTO chi VALUES (2, 'c')")
    got = [(t, op, rec["id"]) for t, op, rec, _ in await _rows(control_db, project.id)]
    assert got == [("chi", "INSERT", 1)]


@pytest.mark.xfail(
    strict=True, reason="review 31 #2: partition capture ignores the root trigger being disabled"
)
async def test_a_tree_listed_as_off_publishes_nothing(
    api: Api, tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """ALTER TABLE ... DISABLE TRIGGER ALL: /api/realtime/tables lists the table as off
    (tgenabled = 'D'), and a plain table so switched publishes nothing. A tree's partitions have
    capture triggers of their own (not clones of the root's, so the DISABLE does not recurse to
    them), and attach_partition_capture does not look at tgenabled either."""
    await tenant.execute("CREATE TABLE plain (id int, v text)")
    await tenant.execute("ALTER TABLE plain DISABLE TRIGGER ALL")
    await tenant.execute("INSERT INTO plain VALUES (1, 'x')")
    await tenant.execute("UPDATE plain SET v = 'y'")
    await _tree(tenant)
    await tenant.execute("ALTER TABLE pt DISABLE TRIGGER ALL")
    r = await api.http.get(
        "/api/realtime/tables", params={"projectId": project.id}, headers=bearer(project.admin_key)
    )
    assert r.status_code == 200, r.text
    assert {t["name"]: t["enabled"] for t in r.json()["tables"]} == {"plain": False, "pt": False}
    await tenant.execute("INSERT INTO pt_a VALUES (1, 'x')")
    await tenant.execute("UPDATE pt_a SET v = 'secret'")
    await tenant.execute("CREATE TABLE pt_c PARTITION OF pt FOR VALUES FROM (200) TO (300)")
    await tenant.execute("INSERT INTO pt_c VALUES (201, 'y')")
    assert [(t, op) for t, op, _, _ in await _rows(control_db, project.id)] == []


async def test_one_statement_mixing_a_dropped_move_an_upsert_and_an_update_pairs_nothing_wrongly(
    tenant: asyncpg.Connection, project: Any, control_db: asyncpg.Pool
) -> None:
    """Writable CTEs: an UPDATE whose moved row a BEFORE INSERT trigger drops (an OLD without a
    NEW), an INSERT ... ON CONFLICT DO UPDATE (its own transition tables), and the main UPDATE
    moving two rows: no event pairs one row's old image with another's new one."""
    await _tree(tenant)
    await tenant.execute("CREATE UNIQUE INDEX ON pt (id)")
    await tenant.execute(
        "CREATE FUNCTION dropper() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.v = 'drop' THEN RETURN NULL; END IF; RETURN NEW; END $$"
    )
    await tenant.execute(
        "CREATE TRIGGER dropper BEFORE INSERT ON pt_b FOR EACH ROW EXECUTE FUNCTION dropper()"
    )
    await tenant.execute("INSERT INTO pt VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')")
    await tenant.execute(
        """WITH x AS (UPDATE pt SET id = 101, v = 'drop' WHERE id = 1 RETURNING 1),
                y AS (INSERT INTO pt VALUES (2, 'up'), (5, 'fresh')
                      ON CONFLICT (id) DO UPDATE SET v = 'upserted', id = 2
                      RETURNING 1)
           UPDATE pt SET id = id + 100, v = v || '!' WHERE id IN (3, 4)"""
    )
    got = [(op, rec, old) for _, op, rec, old in await _rows(control_db, project.id)][4:]
    for op, rec, old in got:
        if op == "UPDATE":
            assert old is not None and old["id"] % 100 == rec["id"] % 100, (rec, old)
    assert ("DELETE", {"id": 1, "v": "a"}) in [(op, rec) for op, rec, _ in got]
    # The upsert's UPDATE shares the statement's UPDATE transition tables (so its pair falls
    # back, with the dropped move, to a DELETE and an INSERT); its INSERT does not.
    assert ("INSERT", {"id": 5, "v": "fresh"}) in [(op, rec) for op, rec, _ in got]
    assert ("DELETE", {"id": 2, "v": "b"}) in [(op, rec) for op, rec, _ in got]
    assert ("INSERT", {"id": 2, "v": "upserted"}) in [(op, rec) for op, rec, _ in got]
