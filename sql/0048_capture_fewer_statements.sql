-- Capture that costs less (issue 20): the capture path does sql/0036's work with less executor
-- setup. Why that is the cost: a captured write is usually its own transaction, and PL/pgSQL
-- prepares the executor state of every expression it evaluates (each IF, each assignment, each
-- DECLARE initializer; an ACL check and a function lookup for every function and operator in
-- it) anew in every transaction, and every SQL statement it runs starts and stops an executor
-- (perf of the writer's backend under bench/capture_cost.py: executor and expression setup, not
-- the row itself, is most of a capture). So, per captured single-row statement:
--   trigger (INSERT/DELETE)  one statement: the images and the call (was an assignment with a
--                            query, an IF and the call);
--   write_events             the checks a project session passes in one expression (was about
--                            fifteen), then the outbox INSERT and the doorbell as before;
--   the outbox               no CHECK on `kind` (below).
-- The SECURITY DEFINER switch and its pinned search_path stay: their GUC save and restore is
-- about 3% of a captured write (perf), not worth a definer whose callers choose its search_path.
-- The semantics are sql/0036's, unchanged:
-- * the project is the session's (p_<16 hex>_(admin|rw|ro|rt)), or for a platform session
--   (runtime, migration) the table's schema p_<16 hex>; the table must be in that project's
--   schema; only from inside a trigger (pg_trigger_depth() > 0);
-- * a row's images over 1 MiB (record and old together) keep only their small fields
--   (fluxbase_capture.small_fields, sql/0022), and `bytes` is what is stored;
-- * the doorbell rings only while a reader sleeps (fluxbase.event_readers.waiting) and only if
--   the statement wrote an event;
-- * TRUNCATE writes its schema event as before; any other operation is refused (22023).
-- The outbox, its two indexes and its columns are unchanged: the readers use both indexes
-- (the global cursor (xid, id); the per-project probes (project_id, xid, id): latest cursor,
-- quota, moves, broadcast bounds).

-- The outbox's CHECK (kind IN ('row', 'schema', 'broadcast')) goes: PostgreSQL reads a CHECK's
-- stored expression and plans it again for every INSERT statement (ExecConstraints:
-- stringToNode, expression_planner), about 5 µs of each captured write (perf, bench/
-- capture_cost.py). Only platform functions and the platform's own connections write the
-- outbox, each with a literal kind; the readers select the kinds they know.
ALTER TABLE fluxbase.events DROP CONSTRAINT IF EXISTS events_kind_check;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'INSERT', i.imgs, NULL)
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) AS imgs FROM new_rows n) AS i
    WHERE i.imgs IS NOT NULL;
    RETURN NULL;
END
$$;
ALTER FUNCTION fluxbase_capture.capture_insert() RESET search_path;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'DELETE', i.imgs, i.imgs)
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*)) AS imgs FROM old_rows o) AS i
    WHERE i.imgs IS NOT NULL;
    RETURN NULL;
END
$$;
ALTER FUNCTION fluxbase_capture.capture_delete() RESET search_path;

-- UPDATE stays row-level (capture_update, one expression already). A statement-level UPDATE
-- trigger with both transition tables makes a bulk UPDATE one write_events call per statement
-- (13-14 µs a row at 100 rows a statement instead of 37-47) but costs a single-row UPDATE 11-39
-- µs more (the two transition tables and their query); bench/capture_cost.py --breakdown
-- measures it as cc_updstmt, next to the installed one.

CREATE OR REPLACE FUNCTION fluxbase_capture.write_events(
    p_table regclass, p_operation text, p_records jsonb[], p_olds jsonb[]
) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- The table's schema and name from the catalog (with search_path = pg_catalog, regclass
    -- output is schema-qualified but for pg_catalog's and the session's temporary tables; an
    -- oid that is no relation comes out as a bare number: one part, refused below). A catalog
    -- cache lookup, no query.
    ident text[] := pg_catalog.parse_ident(p_table::text);
    m text[];
    su text;
    v_rec jsonb;
    v_old jsonb;
    v_n integer;
BEGIN
    -- The way every capture of a project session takes, in one expression: inside a trigger,
    -- a schema-qualified table, a project role p_<16 hex>_(admin|rw|ro|rt) as the session user
    -- (no regular expression: about 140 µs a call) whose project's schema p_<16 hex> holds the
    -- table, a row operation. (substr(.., 20) in the list makes the session user at least 21
    -- characters long, so the equality makes the schema 18; ltrim checks its hex.)
    IF (pg_catalog.pg_trigger_depth() > 0
        AND pg_catalog.array_length(ident, 1) = 2
        AND pg_catalog.substr(session_user::text, 1, 19) = ident[1] || '_'
        AND pg_catalog.substr(session_user::text, 20) IN ('admin', 'rw', 'ro', 'rt')
        AND pg_catalog.starts_with(ident[1], 'p_')
        AND pg_catalog.ltrim(pg_catalog.substr(ident[1], 3), '0123456789abcdef') = ''
        AND p_operation IN ('INSERT', 'UPDATE', 'DELETE')) IS TRUE THEN
        m := ARRAY[pg_catalog.substr(ident[1], 3)];
    ELSE
        -- Everything else (a refusal, a platform session, TRUNCATE) the way sql/0036 did it.
        IF pg_catalog.pg_trigger_depth() < 1 THEN
            RAISE EXCEPTION 'fluxbase_capture.write_events may only be called by the capture triggers'
                USING ERRCODE = '42501';
        END IF;
        su := session_user::text;
        IF pg_catalog.starts_with(su, 'p_') AND pg_catalog.substr(su, 19, 1) = '_'
           AND pg_catalog.substr(su, 20) IN ('admin', 'rw', 'ro', 'rt')
           AND pg_catalog.ltrim(pg_catalog.substr(su, 3, 16), '0123456789abcdef') = ''
           AND pg_catalog.octet_length(pg_catalog.substr(su, 3, 16)) = 16 THEN
            m := ARRAY[pg_catalog.substr(su, 3, 16)];
        ELSE
            -- a platform session (runtime, migration) is attributed by the schema
            m := pg_catalog.regexp_match(ident[1], '^p_([0-9a-f]{16})$');
        END IF;
        IF m IS NULL OR pg_catalog.array_length(ident, 1) <> 2 OR ident[1] IS DISTINCT FROM 'p_' || m[1] THEN
            RAISE EXCEPTION 'fluxbase_capture.write_events: not a table of the calling project' USING ERRCODE = '42501';
        END IF;
        IF p_operation = 'TRUNCATE' THEN
            v_rec := pg_catalog.jsonb_build_object('command', 'TRUNCATE', 'object', ident[1] || '.' || ident[2]);
            INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, bytes)
            VALUES (m[1], 'schema', ident[2], 'TRUNCATE', v_rec, pg_catalog.pg_column_size(v_rec));
            IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
                PERFORM pg_catalog.pg_notify('fluxbase_events', '');
            END IF;
            RETURN;
        ELSIF p_operation IN ('INSERT', 'UPDATE', 'DELETE') IS NOT TRUE THEN
            RAISE EXCEPTION 'fluxbase_capture.write_events: unknown operation' USING ERRCODE = '22023';
        END IF;
    END IF;
    IF pg_catalog.cardinality(p_records) = 1 THEN
        -- One image (pair), the common case (the row-level UPDATE trigger calls this for every
        -- row): a one-row VALUES, the cheapest plan to start.
        v_n := coalesce(pg_catalog.pg_column_size(p_records[1]), 0) + coalesce(pg_catalog.pg_column_size(p_olds[1]), 0);
        IF v_n <= 1048576 THEN
            INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes)
            VALUES (m[1], 'row', ident[2], p_operation, p_records[1], p_olds[1], v_n);
        ELSE
            v_rec := fluxbase_capture.small_fields(p_records[1]);
            v_old := fluxbase_capture.small_fields(p_olds[1]);
            v_n := coalesce(pg_catalog.pg_column_size(v_rec), 0) + coalesce(pg_catalog.pg_column_size(v_old), 0);
            INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes)
            VALUES (m[1], 'row', ident[2], p_operation, v_rec, v_old, v_n);
        END IF;
    ELSE
        -- (multi-argument unnest: FROM only, unqualified)
        INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes)
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
    -- The doorbell, rung only while a reader sleeps (every notifying commit takes a cluster lock).
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;
