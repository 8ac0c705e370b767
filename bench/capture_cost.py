"""PostgreSQL CPU per captured single-row write: capture triggers against no trigger and a floor.

Measures, in one run and interleaved round by round, the CPU time of the writer's own
PostgreSQL backend (its run time in /proc/<pid>/schedstat, in nanoseconds; utime + stime count
10 ms ticks, 2.5 µs a write at 4 000 writes) for single-row INSERT,
UPDATE and DELETE statements, each its own transaction, as the project's admin role, on tables:
  off      realtime switched off (no trigger: the baseline);
  floor    a row trigger that writes 4 bytes to another table (what any AFTER trigger costs);
  capture  the capture triggers as the migrations installed them (C where ext/fluxbase_capture
           is built: `make venv` builds it for the embedded server);
  plpgsql  the same triggers on sql/0049's PL/pgSQL capture functions (what a server without
           the C library runs), in the same run;
  legacy   (with --legacy) sql/0036's capture triggers (what main installed before sql/0048),
           in a scratch schema, to compare against the installed ones in the same run;
  treeoff, tree
           (with --tree) a partitioned table with one partition, written through its root:
           realtime off, and captured as sql/0055 captures partition trees (statement-level
           PL/pgSQL UPDATE capture; INSERT and DELETE as installed);
  updstmt  (with --breakdown) the installed capture but a statement-level UPDATE trigger (both
           transition tables, one write_events call per statement) instead of the row-level one;
  images, hop, hopinv, hopnoset, hop1, check, chkbare, bell, bellseq, insert, lean1, heap, emit
           (with --breakdown) the capture path cut short at each step, and candidate cuts, to
           see where the CPU goes (BREAKDOWN below).
Prints µs per write per table, capture minus off (the capture cost), floor minus off, the
on/off CPU ratio, and the capture cost over the floor's (the figure to compare across machines). Load from other processes cancels out of the ratios (same run, interleaved);
the absolute figures are CPU time, which queueing behind other processes does not inflate.

    .venv/bin/python bench/capture_cost.py [--writes 3000] [--rounds 3] [--legacy] [--breakdown]
        [--fsync] [--concurrent 32]
    .venv/bin/python bench/capture_cost.py --decode [--writes 3000] [--rounds 2]

--concurrent N measures the same tables again with N writers at once (--writes in all per table
and operation and round), each write still its own transaction: with fsync on their commits
share WAL flushes (group commit), as in the pgbench runs of 32 clients that first measured
capture (docs/benchmarks.md). It prints the writers' backends' CPU per write and the whole
server's (every PostgreSQL process: the WAL writer, the checkpointer, ...).

--decode measures instead the pg_logical_emit_message path with a decoding reader, on a scratch
server of its own with wal_level=logical (DECODE_SQL below).

bench/realtime.py calls `measure` and `concurrent_run` for its capture tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fluxbase.devstack.procs import free_port  # noqa: E402
from fluxbase.security.roles import role_name, role_password  # noqa: E402
from support import run_service, start_stack, stop_stack  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
OPS = ("INSERT", "UPDATE", "DELETE")

# sql/0036's trigger functions and write_events (main's before sql/0048), under other names,
# writing to a copy of main's outbox (with the CHECK sql/0048 drops), so one run compares a
# change to the installed ones against them. Created by the superuser; the
# writer function is a definer owned like the real one.
LEGACY_SQL = """
CREATE SCHEMA IF NOT EXISTS bench_legacy;
GRANT USAGE ON SCHEMA bench_legacy TO PUBLIC;
-- The outbox as main has it (sql/0005's CHECK on kind, which sql/0048 drops; both indexes).
CREATE TABLE bench_legacy.events (LIKE fluxbase.events INCLUDING ALL);
ALTER TABLE bench_legacy.events DROP CONSTRAINT IF EXISTS events_kind_check;
ALTER TABLE bench_legacy.events ADD CONSTRAINT events_kind_check CHECK (kind IN ('row', 'schema', 'broadcast'));
GRANT INSERT ON bench_legacy.events TO fluxbase_outbox_writer;
CREATE OR REPLACE FUNCTION bench_legacy.capture_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
DECLARE
    imgs pg_catalog.jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) FROM new_rows n);
    IF imgs IS NOT NULL THEN
        PERFORM bench_legacy.write_events(TG_RELID, 'INSERT', imgs, NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION bench_legacy.capture_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
DECLARE
    imgs pg_catalog.jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*)) FROM old_rows o);
    IF imgs IS NOT NULL THEN
        PERFORM bench_legacy.write_events(TG_RELID, 'DELETE', imgs, imgs);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION bench_legacy.capture_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM bench_legacy.write_events(TG_RELID, 'UPDATE', ARRAY[pg_catalog.to_jsonb(NEW)],
                                          ARRAY[pg_catalog.to_jsonb(OLD)]);
    RETURN NULL;
END
$$;

-- write_events as sql/0022 wrote it, except how it finds the session's project (below).
CREATE OR REPLACE FUNCTION bench_legacy.write_events(
    p_table regclass, p_operation text, p_records jsonb[], p_olds jsonb[]
) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text[];
    ident text[];
    v_rec jsonb;
    v_old jsonb;
    v_n integer;
    su text;
BEGIN
    IF pg_catalog.pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION 'bench_legacy.write_events may only be called by the capture triggers'
            USING ERRCODE = '42501';
    END IF;
    -- The table's schema and name from the catalog (with search_path = pg_catalog, regclass
    -- output is always schema-qualified; an oid that is no relation comes out as a bare number).
    -- A catalog cache lookup: a query here would double the cost of a captured UPDATE.
    ident := pg_catalog.parse_ident(p_table::text);
    -- The session's project without a regular expression: regexp_match here cost about 140 µs
    -- of CPU per call (bench/capture_cost.py), more than the rest of the capture together.
    -- Same test as '^p_([0-9a-f]{16})_(admin|rw|ro|rt)$'.
    su := session_user::text;
    IF pg_catalog.starts_with(su, 'p_') AND pg_catalog.substr(su, 19, 1) = '_'
       AND pg_catalog.substr(su, 20) IN ('admin', 'rw', 'ro', 'rt')
       AND pg_catalog.ltrim(pg_catalog.substr(su, 3, 16), '0123456789abcdef') = ''
       AND pg_catalog.octet_length(pg_catalog.substr(su, 3, 16)) = 16 THEN
        m := ARRAY[pg_catalog.substr(su, 3, 16)];
    ELSE
        -- a platform session (runtime, migration) is attributed by the schema
        m := NULL;
    END IF;
    IF m IS NULL THEN
        m := pg_catalog.regexp_match(ident[1], '^p_([0-9a-f]{16})$');
    END IF;
    IF m IS NULL OR pg_catalog.array_length(ident, 1) <> 2 OR ident[1] IS DISTINCT FROM 'p_' || m[1] THEN
        RAISE EXCEPTION 'bench_legacy.write_events: not a table of the calling project' USING ERRCODE = '42501';
    END IF;
    IF p_operation = 'TRUNCATE' THEN
        v_rec := pg_catalog.jsonb_build_object('command', 'TRUNCATE', 'object', ident[1] || '.' || ident[2]);
        INSERT INTO bench_legacy.events (project_id, kind, table_name, operation, record, bytes)
        VALUES (m[1], 'schema', ident[2], 'TRUNCATE', v_rec, pg_catalog.pg_column_size(v_rec));
    ELSIF p_operation IN ('INSERT', 'UPDATE', 'DELETE') THEN
        IF pg_catalog.cardinality(p_records) = 1 THEN
            -- One image (pair): the row-level UPDATE trigger calls this for every row, so no
            -- set-returning query here.
            v_rec := p_records[1];
            v_old := p_olds[1];
            v_n := coalesce(pg_catalog.pg_column_size(v_rec), 0) + coalesce(pg_catalog.pg_column_size(v_old), 0);
            IF v_n > 1048576 THEN
                v_rec := fluxbase_capture.small_fields(v_rec);
                v_old := fluxbase_capture.small_fields(v_old);
                v_n := coalesce(pg_catalog.pg_column_size(v_rec), 0) + coalesce(pg_catalog.pg_column_size(v_old), 0);
            END IF;
            INSERT INTO bench_legacy.events (project_id, kind, table_name, operation, record, old, bytes)
            VALUES (m[1], 'row', ident[2], p_operation, v_rec, v_old, v_n);
        ELSE
            -- (multi-argument unnest: FROM only, unqualified)
            INSERT INTO bench_legacy.events (project_id, kind, table_name, operation, record, old, bytes)
            SELECT m[1], 'row', ident[2], p_operation, s.r, s.o,
                   CASE WHEN s.n > 1048576
                        THEN coalesce(pg_catalog.pg_column_size(s.r), 0) + coalesce(pg_catalog.pg_column_size(s.o), 0)
                        ELSE s.n END
            FROM (SELECT CASE WHEN u.n > 1048576 THEN fluxbase_capture.small_fields(u.r) ELSE u.r END AS r,
                         CASE WHEN u.n > 1048576 THEN fluxbase_capture.small_fields(u.o) ELSE u.o END AS o,
                         u.n
                  FROM (SELECT x.r, x.o, coalesce(pg_catalog.pg_column_size(x.r), 0)
                                         + coalesce(pg_catalog.pg_column_size(x.o), 0) AS n
                        FROM unnest(p_records, p_olds) AS x(r, o)) AS u) AS s;
            IF NOT FOUND THEN
                RETURN;
            END IF;
        END IF;
    ELSE
        RAISE EXCEPTION 'bench_legacy.write_events: unknown operation' USING ERRCODE = '22023';
    END IF;
    -- The doorbell, rung only while a reader sleeps (every notifying commit takes a cluster lock).
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;
ALTER FUNCTION bench_legacy.write_events(regclass, text, jsonb[], jsonb[]) OWNER TO fluxbase_outbox_writer;
"""

PLPGSQL_TRIGGERS = """
CREATE TRIGGER plpgsql_ins AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_insert_plpgsql();
CREATE TRIGGER plpgsql_upd AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION fluxbase_capture.capture_update_plpgsql();
CREATE TRIGGER plpgsql_del AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_delete_plpgsql();
"""

# --alt LIB: the same triggers on C functions of another build of ext/fluxbase_capture installed
# under another name ($libdir/LIB.so), in a scratch schema: a change to the C code against the
# build before it, interleaved in one run (`make -C ext/fluxbase_capture` then copy the .so).
ALT_SQL = """
CREATE SCHEMA bench_alt_{n};
GRANT USAGE ON SCHEMA bench_alt_{n} TO PUBLIC;
CREATE FUNCTION bench_alt_{n}.capture_insert() RETURNS trigger LANGUAGE c AS '$libdir/{lib}', 'fluxbase_capture_insert';
CREATE FUNCTION bench_alt_{n}.capture_update() RETURNS trigger LANGUAGE c AS '$libdir/{lib}', 'fluxbase_capture_update';
CREATE FUNCTION bench_alt_{n}.capture_delete() RETURNS trigger LANGUAGE c AS '$libdir/{lib}', 'fluxbase_capture_delete';
"""
ALT_TRIGGERS = """
CREATE TRIGGER alt_ins AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_alt_{n}.capture_insert();
CREATE TRIGGER alt_upd AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION bench_alt_{n}.capture_update();
CREATE TRIGGER alt_del AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_alt_{n}.capture_delete();
"""

LEGACY_TRIGGERS = """
CREATE TRIGGER legacy_ins AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_legacy.capture_insert();
CREATE TRIGGER legacy_upd AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION bench_legacy.capture_update();
CREATE TRIGGER legacy_del AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_legacy.capture_delete();
"""

# --breakdown: where a captured write's CPU goes. Each variant is the capture path cut short at
# one step: trigger functions shaped like the installed ones (statement-level INSERT and DELETE
# with transition tables, row-level UPDATE) calling a definer owned like the real writer, with
# the same pinned search_path (unless the name says otherwise), whose body does only:
#   hop     nothing (trigger, row images, definer call);
#   check   the caller checks (trigger depth, the table in the session user's project);
#   bell    check + the doorbell query (event_readers);
#   insert  check + the outbox INSERT (fluxbase.events, its two indexes);
#   lean1   check + the same INSERT into a copy of the outbox with one index (xid, id);
#   heap    check + the same INSERT into a copy with no index and no identity column;
#   emit    check + pg_logical_emit_message of the same content (raw WAL cost, no reader).
# and the candidates for cutting them:
#   images  the trigger functions build the images and call nothing (the trigger's own share);
#   hopinv  hop, but a plain SECURITY INVOKER function (what the definer switch costs);
#   hopnoset  hop, a definer without `SET search_path` (what the GUC save/restore costs);
#   hop1    hop, the INSERT/DELETE trigger builds the images inside the call (one SPI statement);
#   chkbare check without parse_ident: the schema from the catalog cache (regnamespace of the
#           relation is not reachable without a query, so: regclass text's prefix);
#   bellseq check + a doorbell read from a sequence's last value (no query);
BREAKDOWN_PRE = """
CREATE TABLE bench_t.ev1 (id bigint GENERATED ALWAYS AS IDENTITY, xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    project_id text NOT NULL, kind text NOT NULL, table_name text, operation text NOT NULL,
    record jsonb, old jsonb, created_at timestamptz NOT NULL DEFAULT now(), bytes integer);
CREATE UNIQUE INDEX ON bench_t.ev1 (xid, id);
CREATE TABLE bench_t.ev0 (xid xid8 NOT NULL DEFAULT pg_current_xact_id(), project_id text NOT NULL,
    kind text NOT NULL, table_name text, operation text NOT NULL, record jsonb, old jsonb, bytes integer);
GRANT INSERT ON bench_t.ev1, bench_t.ev0 TO fluxbase_outbox_writer;
CREATE SEQUENCE bench_t.bell MINVALUE 0 START 0;
GRANT SELECT ON bench_t.bell TO fluxbase_outbox_writer;
"""
UPDSTMT_SQL = """
CREATE SCHEMA IF NOT EXISTS bench_t;
GRANT USAGE ON SCHEMA bench_t TO PUBLIC;
CREATE FUNCTION bench_t.capture_update_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'UPDATE',
        (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) FROM new_rows n),
        (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*)) FROM old_rows o));
    RETURN NULL;
END
$$;
"""
_CHECK = """DECLARE
    ident pg_catalog.text[] := pg_catalog.parse_ident(p_table::pg_catalog.text);
BEGIN
    IF NOT (pg_catalog.pg_trigger_depth() > 0
            AND pg_catalog.substr(session_user::pg_catalog.text, 1, 19) = ident[1] || '_') THEN
        RAISE EXCEPTION 'not a capture trigger of the calling project' USING ERRCODE = '42501';
    END IF;
"""
_CHKBARE = """DECLARE
    t pg_catalog.text := p_table::pg_catalog.text;
    ident pg_catalog.text[] := ARRAY[pg_catalog.substr(t, 1, 18), pg_catalog.substr(t, 20)];
BEGIN
    IF NOT (pg_catalog.pg_trigger_depth() > 0
            AND pg_catalog.substr(session_user::pg_catalog.text, 1, 18) = ident[1]
            AND pg_catalog.substr(t, 19, 1) = '.') THEN
        RAISE EXCEPTION 'not a capture trigger of the calling project' USING ERRCODE = '42501';
    END IF;
"""
_INSERT = """    INSERT INTO {tbl} (project_id, kind, table_name, operation, record, old, bytes)
    VALUES (pg_catalog.substr(ident[1], 3), 'row', ident[2], p_operation, p_record, p_old,
            coalesce(pg_catalog.pg_column_size(p_record), 0) + coalesce(pg_catalog.pg_column_size(p_old), 0));
"""
_BELL = """    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
"""
_BELLSEQ = """    IF pg_catalog.pg_sequence_last_value('bench_t.bell'::pg_catalog.regclass) > 0 THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
"""
_EMIT = """    PERFORM pg_catalog.pg_logical_emit_message(true, 'fluxbase', pg_catalog.jsonb_build_array(
        pg_catalog.substr(ident[1], 3), ident[2], p_operation, p_record, p_old)::text);
"""
_SET = "SET search_path = pg_catalog, pg_temp"
# name: (definer body, SECURITY, proconfig, trigger shape)
BREAKDOWN: dict[str, tuple[str, str, str, str]] = {
    "images": ("BEGIN\n    RETURN;\nEND", "DEFINER", _SET, "nocall"),
    "hop": ("BEGIN\n    RETURN;\nEND", "DEFINER", _SET, "std"),
    "hopinv": ("BEGIN\n    RETURN;\nEND", "INVOKER", "", "std"),
    "hopnoset": ("BEGIN\n    RETURN;\nEND", "DEFINER", "", "std"),
    "hop1": ("BEGIN\n    RETURN;\nEND", "DEFINER", _SET, "one"),
    "check": (_CHECK + "END", "DEFINER", _SET, "std"),
    "chkbare": (_CHKBARE + "END", "DEFINER", _SET, "std"),
    "bell": (_CHECK + _BELL + "END", "DEFINER", _SET, "std"),
    "bellseq": (_CHECK + _BELLSEQ + "END", "DEFINER", _SET, "std"),
    "insert": (_CHECK + _INSERT.format(tbl="fluxbase.events") + "END", "DEFINER", _SET, "std"),
    "lean1": (_CHECK + _INSERT.format(tbl="bench_t.ev1") + "END", "DEFINER", _SET, "std"),
    "heap": (_CHECK + _INSERT.format(tbl="bench_t.ev0") + "END", "DEFINER", _SET, "std"),
    "emit": (_CHECK + _EMIT + "END", "DEFINER", _SET, "std"),
}
BREAKDOWN_SQL = """
CREATE SCHEMA bench_{n};
GRANT USAGE ON SCHEMA bench_{n} TO PUBLIC;
CREATE FUNCTION bench_{n}.w(p_table regclass, p_operation text, p_record jsonb, p_old jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY {sec} {config}
AS $$
{body}
$$;
ALTER FUNCTION bench_{n}.w(regclass, text, jsonb, jsonb) OWNER TO fluxbase_outbox_writer;
CREATE FUNCTION bench_{n}.upd() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {upd};
    RETURN NULL;
END
$$;
"""
_STMT_TRIGGERS = {
    "std": """
CREATE FUNCTION bench_{n}.{f}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    imgs pg_catalog.jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) FROM {rows} n);
    PERFORM bench_{n}.w(TG_RELID, '{op}', imgs[1], {old});
    RETURN NULL;
END
$$;
""",
    "nocall": """
CREATE FUNCTION bench_{n}.{f}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    imgs pg_catalog.jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) FROM {rows} n);
    RETURN NULL;
END
$$;
""",
    "one": """
CREATE FUNCTION bench_{n}.{f}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bench_{n}.w(TG_RELID, '{op}', i.a[1], {old1})
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) AS a FROM {rows} n) i;
    RETURN NULL;
END
$$;
""",
}
BREAKDOWN_TRIGGERS = """
CREATE TRIGGER b_ins AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_{n}.ins();
CREATE TRIGGER b_upd AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION bench_{n}.upd();
CREATE TRIGGER b_del AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_{n}.del();
"""


def breakdown_sql(n: str) -> str:
    body, sec, config, shape = BREAKDOWN[n]
    upd = "PERFORM pg_catalog.to_jsonb(NEW), pg_catalog.to_jsonb(OLD)"
    if shape != "nocall":
        upd = f"PERFORM bench_{n}.w(TG_RELID, 'UPDATE', pg_catalog.to_jsonb(NEW), pg_catalog.to_jsonb(OLD))"
    sql = BREAKDOWN_SQL.format(n=n, body=body, sec=sec, config=config, upd=upd)
    tpl = _STMT_TRIGGERS[shape]
    sql += tpl.format(n=n, f="ins", rows="new_rows", op="INSERT", old="NULL", old1="NULL")
    sql += tpl.format(n=n, f="del", rows="old_rows", op="DELETE", old="imgs[1]", old1="i.a[1]")
    return sql


FLOOR_SQL = """
CREATE TABLE cc_side (x int);
CREATE FUNCTION cc_floor_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cc_side VALUES (1);
    RETURN NULL;
END
$$;
CREATE TRIGGER cc_floor_trg AFTER INSERT OR UPDATE OR DELETE ON cc_floor
    FOR EACH ROW EXECUTE FUNCTION cc_floor_fn();
"""

TABLE = "(id bigserial PRIMARY KEY, v text, n int, at timestamptz DEFAULT now())"
TREE = "(id bigserial PRIMARY KEY, v text, n int, at timestamptz DEFAULT now()) PARTITION BY RANGE (id)"


def cpu_ns(pid: int) -> int:
    """The backend's CPU time in ns: /proc/<pid>/schedstat's run time (nanosecond resolution;
    utime + stime count 10 ms ticks, 2.5 µs per write at 4 000 writes), else utime + stime."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // TICK


async def setup(
    admin: asyncpg.Connection,
    superuser: asyncpg.Connection | None,
    breakdown: bool = False,
    alts: list[str] | None = None,
    legacy: bool = True,
    tree: bool = False,
) -> list[str]:
    """Create the tables (as the project's admin; the scratch functions as the superuser);
    returns the table names measured."""
    tables = ["cc_off", "cc_floor", "cc_capture"]
    for t in tables:
        await admin.execute(f"CREATE TABLE {t} {TABLE}")
    await admin.execute("SELECT fluxbase_capture.detach_capture('cc_off'::regclass)")
    await admin.execute("SELECT fluxbase_capture.detach_capture('cc_floor'::regclass)")
    await admin.execute(FLOOR_SQL)
    await admin.execute("SELECT fluxbase_capture.detach_capture('cc_side'::regclass)")
    if await admin.fetchval(
        "SELECT to_regprocedure('fluxbase_capture.capture_insert_plpgsql()') IS NOT NULL"
    ):
        # sql/0049's PL/pgSQL capture (what a server without the C library runs) beside the
        # installed one (C where ext/fluxbase_capture is built).
        await admin.execute("CREATE TABLE cc_plpgsql " + TABLE)
        await admin.execute("SELECT fluxbase_capture.detach_capture('cc_plpgsql'::regclass)")
        await admin.execute(PLPGSQL_TRIGGERS.format(t="cc_plpgsql"))
        tables.append("cc_plpgsql")
    if superuser is not None and legacy:
        await superuser.execute(LEGACY_SQL)
        await admin.execute("CREATE TABLE cc_legacy " + TABLE)
        await admin.execute("SELECT fluxbase_capture.detach_capture('cc_legacy'::regclass)")
        await admin.execute(LEGACY_TRIGGERS.format(t="cc_legacy"))
        tables.append("cc_legacy")
    for lib in alts or []:
        assert superuser is not None
        n = "".join(c if c.isalnum() else "_" for c in lib.removeprefix("fluxbase_capture_"))
        await superuser.execute(ALT_SQL.format(n=n, lib=lib))
        t = f"cc_alt_{n}"
        await admin.execute(f"CREATE TABLE {t} {TABLE}")
        await admin.execute(f"SELECT fluxbase_capture.detach_capture('{t}'::regclass)")
        await admin.execute(ALT_TRIGGERS.format(t=t, n=n))
        tables.append(t)
    if tree:
        for t in ("cc_treeoff", "cc_tree"):
            await admin.execute(f"CREATE TABLE {t} {TREE}")
            await admin.execute(
                f"CREATE TABLE {t}_all PARTITION OF {t} FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"
            )
            tables.append(t)
        await admin.execute("SELECT fluxbase_capture.detach_capture('cc_treeoff'::regclass)")
    if superuser is not None and breakdown:
        # The installed capture with a statement-level UPDATE trigger (both transition tables,
        # one write_events call per statement) instead of the row-level one.
        await superuser.execute(UPDSTMT_SQL)
        await admin.execute("CREATE TABLE cc_updstmt " + TABLE)
        await admin.execute("DROP TRIGGER fluxbase_capture_upd ON cc_updstmt")
        await admin.execute(
            "CREATE TRIGGER updstmt AFTER UPDATE ON cc_updstmt REFERENCING OLD TABLE AS old_rows "
            "NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bench_t.capture_update_rows()"
        )
        tables.append("cc_updstmt")
        await superuser.execute(BREAKDOWN_PRE)
        for n in BREAKDOWN:
            await superuser.execute(breakdown_sql(n))
            t = f"cc_{n}"
            await admin.execute(f"CREATE TABLE {t} {TABLE}")
            await admin.execute(f"SELECT fluxbase_capture.detach_capture('{t}'::regclass)")
            await admin.execute(BREAKDOWN_TRIGGERS.format(t=t, n=n))
            tables.append(t)
    for t in tables:
        await admin.execute(PROCS.format(t=t))
    return tables


PROCS = """
CREATE PROCEDURE {t}_insert(cnt int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..cnt LOOP
        INSERT INTO {t} (v, n) VALUES ('hello', i);
        COMMIT;
    END LOOP;
END
$$;
CREATE PROCEDURE {t}_update(lo bigint, cnt int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN lo..lo + cnt - 1 LOOP
        UPDATE {t} SET v = 'world', n = n + 1 WHERE id = i;
        COMMIT;
    END LOOP;
END
$$;
CREATE PROCEDURE {t}_delete(lo bigint, cnt int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN lo..lo + cnt - 1 LOOP
        DELETE FROM {t} WHERE id = i;
        COMMIT;
    END LOOP;
END
$$;
CREATE PROCEDURE {t}_binsert(cnt int, b int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..cnt / b LOOP
        INSERT INTO {t} (v, n) SELECT 'hello', g FROM generate_series(1, b) g;
        COMMIT;
    END LOOP;
END
$$;
CREATE PROCEDURE {t}_bupdate(lo bigint, cnt int, b int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 0..cnt / b - 1 LOOP
        UPDATE {t} SET v = 'world', n = n + 1 WHERE id >= lo + i * b AND id < lo + (i + 1) * b;
        COMMIT;
    END LOOP;
END
$$;
CREATE PROCEDURE {t}_bdelete(lo bigint, cnt int, b int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 0..cnt / b - 1 LOOP
        DELETE FROM {t} WHERE id >= lo + i * b AND id < lo + (i + 1) * b;
        COMMIT;
    END LOOP;
END
$$;
"""


async def _phase(conn: asyncpg.Connection, pid: int, op: str, table: str, n: int, bulk: int = 1) -> int:
    """Backend CPU ns of n single-row statements, each its own transaction (a procedure that
    commits after each: no client round trip between them, so the measurement takes seconds);
    with `bulk` > 1, of n rows written `bulk` rows a statement."""
    if bulk > 1:
        lo = await conn.fetchval(f"SELECT min(id) FROM {table}") if op != "INSERT" else None
        t0 = cpu_ns(pid)
        if op == "INSERT":
            await conn.execute(f"CALL {table}_binsert($1, $2)", n, bulk)
        else:
            await conn.execute(f"CALL {table}_b{op.lower()}($1, $2, $3)", lo, n, bulk)
        return cpu_ns(pid) - t0
    # CALLs of at most CHUNK writes: one statement of thousands of commits outlasts the project
    # role's statement_timeout on a loaded machine with fsync on (bench/realtime.py)
    lo = await conn.fetchval(f"SELECT min(id) FROM {table}") if op != "INSERT" else 0
    t0 = cpu_ns(pid)
    for start in range(0, n, CHUNK):
        cnt = min(CHUNK, n - start)
        if op == "INSERT":
            await conn.execute(f"CALL {table}_insert($1)", cnt)
        else:
            await conn.execute(f"CALL {table}_{op.lower()}($1, $2)", lo + start, cnt)
    return cpu_ns(pid) - t0


CHUNK = 500


async def measure_rounds(
    admin: asyncpg.Connection, tables: list[str], writes: int, rounds: int, bulk: int = 1
) -> dict:
    """µs of backend CPU per single-row write (per row, `bulk` rows a statement), per operation
    and table, one figure per round."""
    pid = await admin.fetchval("SELECT pg_backend_pid()")
    samples: dict = {(op, t): [] for op in OPS for t in tables}
    rows = writes // bulk * bulk
    for r in range(rounds):
        order = tables[r % len(tables) :] + tables[: r % len(tables)]  # rotate: no table always first
        for t in order:
            for op in OPS:
                samples[(op, t)].append(await _phase(admin, pid, op, t, writes, bulk) / rows / 1e3)
    return samples


async def measure(
    admin: asyncpg.Connection, tables: list[str], writes: int, rounds: int, bulk: int = 1
) -> dict:
    """µs of backend CPU per single-row write (per row, `bulk` rows a statement), per operation
    and table (means over rounds)."""
    samples = await measure_rounds(admin, tables, writes, rounds, bulk)
    return {k: statistics.mean(v) for k, v in samples.items()}


def tree_cpu_ns(root: int) -> int:
    """CPU ns of a process and its children (the postmaster and every server process: backends,
    WAL writer, checkpointer, ...), from /proc/<pid>/schedstat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_ns(pid)
        todo.extend(children.get(pid, ()))
    return total


async def measure_concurrent(
    writers: list[asyncpg.Connection], tables: list[str], writes: int, rounds: int, server_pid: int | None
) -> tuple[dict, dict]:
    """The issue's own yardstick (pgbench-like: 32 concurrent writers, fsync on, where commits
    share their WAL flushes): `writes` single-row writes per writer, each its own transaction,
    all writers at once, per operation and table, interleaved round by round. Returns µs per
    write of the writers' backends' CPU and (server_pid given) of the whole server's, one figure
    per round each."""
    pids = [await w.fetchval("SELECT pg_backend_pid()") for w in writers]
    own: dict = {(op, t): [] for op in OPS for t in tables}
    whole: dict = {(op, t): [] for op in OPS for t in tables}
    n = writes * len(writers)
    for r in range(rounds):
        order = tables[r % len(tables) :] + tables[: r % len(tables)]
        for t in order:
            for op in OPS:
                lo = await writers[0].fetchval(f"SELECT min(id) FROM {t}") if op != "INSERT" else 0
                s0 = tree_cpu_ns(server_pid) if server_pid is not None else 0
                c0 = sum(cpu_ns(p) for p in pids)
                calls = []
                for k, w in enumerate(writers):
                    if op == "INSERT":
                        calls.append(w.execute(f"CALL {t}_insert($1)", writes))
                    else:
                        calls.append(w.execute(f"CALL {t}_{op.lower()}($1, $2)", lo + k * writes, writes))
                await asyncio.gather(*calls)
                own[(op, t)].append((sum(cpu_ns(p) for p in pids) - c0) / n / 1e3)
                if server_pid is not None:
                    whole[(op, t)].append((tree_cpu_ns(server_pid) - s0) / n / 1e3)
    return own, whole


def report_concurrent(own: dict, whole: dict, tables: list[str], writers: int) -> list[str]:
    """The concurrent writers' figures: mean over rounds of each table minus off, per operation."""
    lines = [
        f"capture cost with {writers} concurrent writers (µs per single-row write, each its own "
        "transaction; mean over rounds, table - off)"
    ]
    for label, us in (("writers' backends", own), ("whole server", whole)):
        if not us[(OPS[0], tables[0])]:
            continue
        mean = {k: statistics.mean(v) for k, v in us.items()}
        lines.append(f"  {label}: " + "  ".join(f"off {op} {mean[(op, 'cc_off')]:.1f}" for op in OPS))
        for t in tables[1:]:
            d = [mean[(op, t)] - mean[(op, "cc_off")] for op in OPS]
            lines.append(
                f"    {t + ' - off':<18}"
                + "".join(f"{op} {x:>6.1f}   " for op, x in zip(OPS, d, strict=True))
                + f"mean {statistics.mean(d):.1f}"
            )
    lines.append(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return lines


def report_rounds(samples: dict, tables: list[str]) -> list[str]:
    """Each table's cost (minus the same round's off) per operation: median [min-max] over the
    rounds; with --alt, the figure to compare builds under a varying load."""
    lines = ["capture cost per round (µs, table - off of the same round): median [min-max]"]
    lines.append(f"  {'table':<14}" + "".join(f"{op:>22}" for op in OPS))
    for t in tables[1:]:
        cells = []
        for op in OPS:
            d = [a - b for a, b in zip(samples[(op, t)], samples[(op, "cc_off")], strict=True)]
            cells.append(f"{statistics.median(d):>8.1f} [{min(d):.1f}-{max(d):.1f}]")
        lines.append(f"  {t:<14}" + "".join(f"{c:>22}" for c in cells))
    lines.append(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return lines


async def concurrent_run(
    dsn: str,
    superuser_url: str,
    tables: list[str],
    writers: int,
    writes: int,
    rounds: int,
    server_pid: int | None,
) -> list[str]:
    """`measure_concurrent` with `writers` connections of the role of `dsn`, `writes` in all per
    operation and table a round (after a tenth as warm-up): the report's lines."""
    # (The project's roles have a connection limit below 32: raised for the run, as the superuser.)
    superuser = await asyncpg.connect(superuser_url)
    probe = await asyncpg.connect(dsn)
    role = await probe.fetchval("SELECT current_user")
    await probe.close()
    limit = await superuser.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", role)
    await superuser.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT {max(limit, writers + 8)}')
    conns: list[asyncpg.Connection] = []
    try:
        conns = [await asyncpg.connect(dsn) for _ in range(writers)]
        each = max(1, writes // writers)
        await measure_concurrent(conns, tables, max(1, each // 10), 1, None)  # warm-up
        own, whole = await measure_concurrent(conns, tables, each, rounds, server_pid)
    finally:
        for c in conns:
            await c.close()
        await superuser.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT {limit}')
        await superuser.close()
    return report_concurrent(own, whole, tables, writers)


async def installed_capture(conn: asyncpg.Connection) -> str:
    """Which capture functions the migration installed: 'C' (ext/fluxbase_capture) or 'PL/pgSQL'."""
    lang = await conn.fetchval(
        "SELECT l.lanname FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
        "WHERE p.oid = 'fluxbase_capture.capture_insert()'::pg_catalog.regprocedure"
    )
    return "C" if lang == "c" else "PL/pgSQL"


def report_tree(us: dict) -> list[str]:
    """The partition tree's capture cost (cc_tree minus cc_treeoff) against the plain table's."""
    lines = ["partition tree (sql/0055), µs of PostgreSQL CPU per write, capture minus off:"]
    for op in OPS:
        tree = us[(op, "cc_tree")] - us[(op, "cc_treeoff")]
        plain = us[(op, "cc_capture")] - us[(op, "cc_off")]
        lines.append(
            f"  {op:<7} tree {tree:>7.1f}   plain table {plain:>7.1f}   ratio {tree / max(plain, 1e-9):.2f}"
        )
    return lines


def report(us: dict, tables: list[str], bulk: int = 1, capture_installed: str = "") -> list[str]:
    lines = ["capture cost (PostgreSQL backend CPU, µs per single-row write, each its own transaction)"]
    if bulk > 1:
        lines = [
            f"capture cost (PostgreSQL backend CPU, µs per row, {bulk} rows a statement and transaction)"
        ]
    if capture_installed:
        lines.append(
            f"  cc_capture: the installed capture functions ({capture_installed}); cc_plpgsql: sql/0049's"
        )
    lines.append(f"  {'table':<12}" + "".join(f"{op:>10}" for op in OPS))
    for t in tables:
        lines.append(f"  {t:<12}" + "".join(f"{us[(op, t)]:>10.1f}" for op in OPS))
    for t in tables[1:]:
        lines.append(
            f"  {t + ' - off':<12}"
            + "".join(f"{us[(op, t)] - us[(op, 'cc_off')]:>10.1f}" for op in OPS)
            + "   on/off CPU "
            + " ".join(f"{us[(op, t)] / us[(op, 'cc_off')]:.2f}" for op in OPS)
        )
    for t in ["cc_capture", "cc_plpgsql", "cc_legacy"] + [t for t in tables if t.startswith("cc_alt_")]:
        if (OPS[0], t) in us:
            cost = statistics.mean(us[(op, t)] - us[(op, "cc_off")] for op in OPS)
            ratio = statistics.mean(us[(op, t)] / us[(op, "cc_off")] for op in OPS)
            lines.append(f"  mean {t} - off: {cost:.1f} µs, on/off CPU {ratio:.2f}")
    lines.append(
        "  capture cost / floor cost (a trigger writing 4 bytes; machine-independent): "
        + " ".join(
            f"{op} {(us[(op, 'cc_capture')] - us[(op, 'cc_off')]) / max(us[(op, 'cc_floor')] - us[(op, 'cc_off')], 1e-9):.1f}"
            for op in OPS
        )
    )
    lines.append(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return lines


# --decode: the pg_logical_emit_message path's whole cost, on a separate scratch server with
# wal_level=logical (the stack's server is not): the writer's CPU per write and a decoding
# reader's (a pgoutput slot with messages, polled with pg_logical_slot_get_binary_changes after
# each phase, so its per-call overhead is spread over the phase's writes: the cheapest polling).
# Tables: d_off (no trigger), d_outbox (the breakdown's `insert` shape: statement trigger,
# images, definer, an outbox INSERT into a copy of fluxbase.events with its two indexes, the
# doorbell query) and d_emit (same, pg_logical_emit_message instead of INSERT and doorbell).
# The decoder reads all WAL, so its CPU per write of d_off is what the slot costs every write.
DECODE_SQL = """
CREATE ROLE d_writer NOLOGIN;
CREATE SCHEMA d;
GRANT USAGE ON SCHEMA d TO PUBLIC;
CREATE TABLE d.events (id bigint GENERATED ALWAYS AS IDENTITY, xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    project_id text NOT NULL, kind text NOT NULL, table_name text, operation text NOT NULL,
    record jsonb, old jsonb, created_at timestamptz NOT NULL DEFAULT now(), bytes integer);
CREATE UNIQUE INDEX ON d.events (xid, id);
CREATE INDEX ON d.events (project_id, xid, id);
CREATE TABLE d.readers (reader_id text PRIMARY KEY, waiting boolean NOT NULL DEFAULT false);
GRANT INSERT ON d.events TO d_writer;
GRANT SELECT ON d.readers TO d_writer;
CREATE FUNCTION d.w_outbox(p_table regclass, p_operation text, p_record jsonb, p_old jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO d.events (project_id, kind, table_name, operation, record, old, bytes)
    VALUES ('0123456789abcdef', 'row', p_table::text, p_operation, p_record, p_old,
            coalesce(pg_catalog.pg_column_size(p_record), 0) + coalesce(pg_catalog.pg_column_size(p_old), 0));
    IF EXISTS (SELECT 1 FROM d.readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END $$;
CREATE FUNCTION d.w_emit(p_table regclass, p_operation text, p_record jsonb, p_old jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_catalog.pg_logical_emit_message(true, 'fluxbase', pg_catalog.jsonb_build_array(
        '0123456789abcdef', p_table::text, p_operation, p_record, p_old)::text);
END $$;
ALTER FUNCTION d.w_outbox(regclass, text, jsonb, jsonb) OWNER TO d_writer;
ALTER FUNCTION d.w_emit(regclass, text, jsonb, jsonb) OWNER TO d_writer;
"""
DECODE_TRIGGERS = """
CREATE FUNCTION d.{w}_ins() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM d.{w}(TG_RELID, 'INSERT', i.a[1], NULL)
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) AS a FROM new_rows n) i;
    RETURN NULL;
END $$;
CREATE FUNCTION d.{w}_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM d.{w}(TG_RELID, 'DELETE', i.a[1], i.a[1])
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*)) AS a FROM old_rows o) i;
    RETURN NULL;
END $$;
CREATE FUNCTION d.{w}_upd() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM d.{w}(TG_RELID, 'UPDATE', pg_catalog.to_jsonb(NEW), pg_catalog.to_jsonb(OLD));
    RETURN NULL;
END $$;
CREATE TRIGGER t_ins AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION d.{w}_ins();
CREATE TRIGGER t_upd AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION d.{w}_upd();
CREATE TRIGGER t_del AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION d.{w}_del();
"""


async def decode_run(writes: int, rounds: int) -> list[str]:
    """Writer and decoding-reader CPU per write on a wal_level=logical scratch server."""
    from fluxbase.devstack.postgres import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-cc-decode-"))
    pg = EmbeddedPostgres(tmp / "pg", free_port(), durable=False)
    pg.init()
    with (pg.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("\nwal_level = logical\nmax_replication_slots = 4\nmax_wal_senders = 4\n")
    pg.start()
    try:
        writer = await asyncpg.connect(pg.url)
        reader = await asyncpg.connect(pg.url)
        await writer.execute(DECODE_SQL)
        tables = ["cc_off", "cc_outbox", "cc_emit"]
        for t in tables:
            await writer.execute(f"CREATE TABLE {t} {TABLE}")
            await writer.execute(PROCS.format(t=t))
        await writer.execute(DECODE_TRIGGERS.format(t="cc_outbox", w="w_outbox"))
        await writer.execute(DECODE_TRIGGERS.format(t="cc_emit", w="w_emit"))
        await writer.execute("CREATE PUBLICATION d_pub")  # no tables: messages only
        await reader.execute("SELECT pg_create_logical_replication_slot('d_slot', 'pgoutput')")
        rpid = await reader.fetchval("SELECT pg_backend_pid()")
        poll = (
            "SELECT count(*) FROM pg_logical_slot_get_binary_changes('d_slot', NULL, 20000, "
            "'proto_version', '1', 'publication_names', 'd_pub', 'messages', 'true')"
        )

        async def drain() -> int:
            t0 = cpu_ns(rpid)
            while await reader.fetchval(poll):
                pass
            return cpu_ns(rpid) - t0

        wpid = await writer.fetchval("SELECT pg_backend_pid()")
        for t in tables:  # warm
            for op in OPS:
                await _phase(writer, wpid, op, t, max(100, writes // 10))
        await drain()
        w_ns = {(op, t): 0 for op in OPS for t in tables}
        r_ns = dict(w_ns)
        for r in range(rounds):
            for t in tables[r % len(tables) :] + tables[: r % len(tables)]:
                for op in OPS:
                    w_ns[(op, t)] += await _phase(writer, wpid, op, t, writes)
                    r_ns[(op, t)] += await drain()
        n = writes * rounds
        lines = [
            "pg_logical_emit_message path (scratch server, wal_level=logical; µs of CPU per write)",
            f"  {'table':<12}" + "".join(f"{op + ' w':>10}{op + ' r':>10}" for op in OPS),
        ]
        for t in tables:
            lines.append(
                f"  {t:<12}"
                + "".join(f"{w_ns[(op, t)] / n / 1e3:>10.1f}{r_ns[(op, t)] / n / 1e3:>10.1f}" for op in OPS)
            )
        for t in tables[1:]:
            lines.append(
                f"  {t + ' - off':<12}"
                + "".join(
                    f"{(w_ns[(op, t)] - w_ns[(op, 'cc_off')]) / n / 1e3:>10.1f}"
                    f"{(r_ns[(op, t)] - r_ns[(op, 'cc_off')]) / n / 1e3:>10.1f}"
                    for op in OPS
                )
            )
        lines.append("  (w: the writer's backend; r: the decoding reader's backend, polled after each phase)")
        lines.append(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        await writer.close()
        await reader.close()
        return lines
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fsync", action="store_true", help="PostgreSQL with fsync on (default off: CPU only)")
    ap.add_argument(
        "--legacy", action="store_true", help="also sql/0036's triggers, as a baseline for a change"
    )
    ap.add_argument("--breakdown", action="store_true", help="also the capture path cut short at each step")
    ap.add_argument(
        "--alt",
        action="append",
        default=[],
        metavar="LIB",
        help="also the C capture of $libdir/LIB.so (another build), on a table of its own; repeatable",
    )
    ap.add_argument(
        "--superuser-sql",
        default="",
        help="SQL the superuser runs after the setup (A/B of a schema change in alternating runs)",
    )
    ap.add_argument("--no-plpgsql", action="store_true", help="leave out the PL/pgSQL table")
    ap.add_argument("--tree", action="store_true", help="also a partitioned table, off and captured")
    ap.add_argument("--bulk", type=int, default=1, help="rows per statement (default 1)")
    ap.add_argument(
        "--concurrent",
        type=int,
        default=0,
        metavar="N",
        help="also N concurrent writers (the issue's pgbench-like yardstick), --writes / N each",
    )
    ap.add_argument(
        "--decode",
        action="store_true",
        help="only the pg_logical_emit_message path with a decoding reader (separate scratch server)",
    )
    args = ap.parse_args()
    if args.decode:
        print("\n" + "\n".join(await decode_run(args.writes, args.rounds)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="fluxbase-cc-bench-"))
    stack = start_stack(tmp, durable=args.fsync)
    try:
        dbname = await stack.create_database()
        api_port = free_port()
        env = stack.env(dbname, FLUXBASE_API_PORT=str(api_port), FLUXBASE_RATE_LIMIT_REQUESTS="100000000")
        with run_service(["api"], env, api_port, tmp):
            api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
            api.post("/api/auth/register", json={"email": "b@example.com", "password": "bench password"})
            tok = api.post(
                "/api/auth/login", json={"email": "b@example.com", "password": "bench password"}
            ).json()
            h = {"Authorization": f"Bearer {tok['token']}"}
            pid = api.post("/api/projects", json={"name": "cc"}, headers=h).json()["project"]["id"]
            role = role_name(pid, "admin")
            assert stack.pg is not None
            dsn = f"postgresql://{role}:{role_password(stack.secret_key, role)}@127.0.0.1:{stack.pg.port}/{dbname}"
            admin = await asyncpg.connect(dsn)
            superuser = (
                await asyncpg.connect(stack.database_url(dbname))
                if args.legacy or args.breakdown or args.alt or args.superuser_sql
                else None
            )
            tables = await setup(
                admin, superuser, args.breakdown, args.alt, args.legacy or args.breakdown, args.tree
            )
            if args.no_plpgsql and "cc_plpgsql" in tables:
                tables.remove("cc_plpgsql")
            if args.superuser_sql:
                assert superuser is not None
                await superuser.execute(args.superuser_sql)
            installed = await installed_capture(admin)
            await measure(admin, tables, max(100, args.writes // 10), 1)  # warm caches and plans
            samples = await measure_rounds(admin, tables, args.writes, args.rounds)
            us = {k: statistics.mean(v) for k, v in samples.items()}
            print("\n" + "\n".join(report(us, tables, 1, installed)))
            print("\n" + "\n".join(report_rounds(samples, tables)))
            if args.tree:
                print("\n" + "\n".join(report_tree(us)))
            if args.bulk > 1:
                us = await measure(admin, tables, args.writes, args.rounds, args.bulk)
                print("\n" + "\n".join(report(us, tables, args.bulk, installed)))
            if args.concurrent:
                print(
                    "\n"
                    + "\n".join(
                        await concurrent_run(
                            dsn,
                            stack.database_url(dbname),
                            tables,
                            args.concurrent,
                            args.writes,
                            args.rounds,
                            stack.pg.pid,
                        )
                    )
                )
            await admin.close()
            if superuser is not None:
                await superuser.close()
            api.close()
    finally:
        stop_stack(stack)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
