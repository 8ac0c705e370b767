-- Resource caps that plpgsql cannot lift for good, and the outbox as bytes of the project's
-- (issue 15, hostile reviews 1 and 2; docs/security.md).

-- ---------------------------------------------------------------------------------------------
-- Routine SET clauses. A function's or procedure's `SET work_mem = …` (or `FROM CURRENT`, which
-- takes whatever the creating session has, and a plpgsql EXECUTE may have raised that unseen)
-- applies at every call: the per-role caps would no longer bound the calls. The classifier
-- refuses the visible clauses (tenancy/statements.py, "resource setting in a routine"); this
-- event trigger refuses the same DDL when plpgsql builds it (`EXECUTE 'CREATE FUNCTION …'`),
-- which no classifier sees. It runs as the role doing the DDL and reads only the catalog.
CREATE OR REPLACE FUNCTION fluxbase.refuse_routine_settings() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad text;
BEGIN
    SELECT c.setting INTO bad
    FROM pg_catalog.pg_event_trigger_ddl_commands() d
    JOIN pg_catalog.pg_proc p ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = d.objid
    CROSS JOIN LATERAL pg_catalog.unnest(p.proconfig) AS c(setting)
    WHERE pg_catalog.lower(pg_catalog.split_part(c.setting, '=', 1)) IN (
              'work_mem', 'maintenance_work_mem', 'temp_file_limit', 'temp_buffers', 'hash_mem_multiplier',
              'max_parallel_workers_per_gather', 'max_parallel_maintenance_workers', 'statement_timeout',
              'lock_timeout', 'idle_in_transaction_session_timeout', 'fluxbase')
       OR pg_catalog.lower(c.setting) LIKE 'fluxbase.%'
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'a SET clause of % in a function or procedure is not allowed: resource settings are '
                        'per-role caps and fluxbase.* is the request identity',
                        pg_catalog.split_part(bad, '=', 1)
            USING ERRCODE = '42501';
    END IF;
END
$$;

DROP EVENT TRIGGER IF EXISTS fluxbase_routine_settings;
CREATE EVENT TRIGGER fluxbase_routine_settings ON ddl_command_end
    WHEN TAG IN ('CREATE FUNCTION', 'ALTER FUNCTION', 'CREATE PROCEDURE', 'ALTER PROCEDURE', 'ALTER ROUTINE')
    EXECUTE FUNCTION fluxbase.refuse_routine_settings();

-- ---------------------------------------------------------------------------------------------
-- Dead code: the realtime checker's first functions (sql/0008) are unused since sql/0015
-- (scope_policies, visible_rows_as). Their grants go with them.
DROP FUNCTION IF EXISTS fluxbase_guard.select_policies(text, text[]);
DROP FUNCTION IF EXISTS fluxbase_guard.visible_rows(text, text[], text[], text[], text[], text[]);

-- ---------------------------------------------------------------------------------------------
-- Outbox bytes. `write_events` stores the jsonb a trigger hands it; an admin's own BEFORE trigger
-- returning NULL stores nothing in the project's tables, so the size cap never saw those bytes
-- (hostile review 2). Now:
--   * one event's row images are bounded: over OUTBOX_EVENT_MAX (1 MiB, record and old image
--     together) each keeps only its fields of at most 64 bytes (the first 1000), as Supabase's
--     walrus does with max_record_bytes; the write itself goes through;
--   * each event records its size (`events.bytes`, the images' jsonb size before compression);
--   * a project's outbox bytes = its counter `outbox_usage.bytes` (events of transactions below
--     `outbox_usage_mark.counted_to_xid`, folded in by housekeeping, minus what trimming took)
--     plus the bytes of its events at or above the mark (those since the last fold: an index
--     range of the project's newest events, never a full scan). Writers update no shared row:
--     nothing serialises a project's concurrent writers;
--   * databaseUsedBytes and the quota check before COMMIT add them (`outbox_bytes`) to
--     `schema_size`, and a transaction that wrote outbox bytes counts as growing (but see
--     check_db_quota for deleting over the cap): over the cap it fails with FX413
--     (DATABASE_QUOTA_EXCEEDED), its events rolled back with it.

ALTER TABLE fluxbase.events ADD COLUMN IF NOT EXISTS bytes integer;

CREATE TABLE IF NOT EXISTS fluxbase.outbox_usage (
    project_id text PRIMARY KEY,
    bytes      bigint NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS fluxbase.outbox_usage_mark (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    counted_to_xid xid8 NOT NULL
);
INSERT INTO fluxbase.outbox_usage_mark (singleton, counted_to_xid) VALUES (true, '0') ON CONFLICT DO NOTHING;

-- An over-sized image's small fields (NULL for an image that is not a JSON object).
CREATE OR REPLACE FUNCTION fluxbase_capture.small_fields(p_image jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN pg_catalog.jsonb_typeof(p_image) = 'object' THEN
        (SELECT coalesce(pg_catalog.jsonb_object_agg(f.key, f.value), '{}'::jsonb)
         FROM (SELECT e.key, e.value FROM pg_catalog.jsonb_each(p_image) AS e
               WHERE pg_catalog.pg_column_size(e.value) <= 64 LIMIT 1000) AS f)
    END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.write_events(
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
BEGIN
    IF pg_catalog.pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION 'fluxbase_capture.write_events may only be called by the capture triggers'
            USING ERRCODE = '42501';
    END IF;
    -- The table's schema and name from the catalog (with search_path = pg_catalog, regclass
    -- output is always schema-qualified; an oid that is no relation comes out as a bare number).
    -- A catalog cache lookup: a query here would double the cost of a captured UPDATE.
    ident := pg_catalog.parse_ident(p_table::text);
    m := pg_catalog.regexp_match(session_user::text, '^p_([0-9a-f]{16})_(admin|rw|ro|rt)$');
    IF m IS NULL THEN
        m := pg_catalog.regexp_match(ident[1], '^p_([0-9a-f]{16})$');
    END IF;
    IF m IS NULL OR pg_catalog.array_length(ident, 1) <> 2 OR ident[1] IS DISTINCT FROM 'p_' || m[1] THEN
        RAISE EXCEPTION 'fluxbase_capture.write_events: not a table of the calling project' USING ERRCODE = '42501';
    END IF;
    IF p_operation = 'TRUNCATE' THEN
        v_rec := pg_catalog.jsonb_build_object('command', 'TRUNCATE', 'object', ident[1] || '.' || ident[2]);
        INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, bytes)
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
            INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes)
            VALUES (m[1], 'row', ident[2], p_operation, v_rec, v_old, v_n);
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
    ELSE
        RAISE EXCEPTION 'fluxbase_capture.write_events: unknown operation' USING ERRCODE = '22023';
    END IF;
    -- The doorbell, rung only while a reader sleeps (every notifying commit takes a cluster lock).
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.write_schema_event(
    p_schema text, p_table text, p_command text, p_record jsonb
) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text[];
    rec jsonb;
BEGIN
    m := pg_catalog.regexp_match(session_user::text, '^p_([0-9a-f]{16})_(admin|rw|ro|rt)$');
    IF m IS NULL THEN
        m := pg_catalog.regexp_match(p_schema, '^p_([0-9a-f]{16})$') || ARRAY['admin'];
    END IF;
    IF m IS NULL OR m[2] <> 'admin' OR p_schema IS DISTINCT FROM 'p_' || m[1] THEN
        RAISE EXCEPTION 'fluxbase_capture.write_schema_event: only the project''s admin role announces its DDL'
            USING ERRCODE = '42501';
    END IF;
    -- Built by the DDL event triggers (a few hundred bytes), but an admin may call this directly:
    -- over 8 KiB, only the small fields stay.
    rec := CASE WHEN pg_catalog.pg_column_size(p_record) > 8192
                THEN coalesce(fluxbase_capture.small_fields(p_record), '{}'::jsonb) ELSE p_record END;
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, bytes)
    VALUES (m[1], 'schema', p_table, p_command, rec, coalesce(pg_catalog.pg_column_size(rec), 0));
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;

-- The project's outbox bytes: its counter plus its events since the last fold.
CREATE OR REPLACE FUNCTION fluxbase_guard.outbox_bytes(p_project_id text) RETURNS bigint
    LANGUAGE sql STABLE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (coalesce((SELECT u.bytes FROM fluxbase.outbox_usage u WHERE u.project_id = p_project_id), 0)
          + coalesce((SELECT sum(e.bytes) FROM fluxbase.events e
                      WHERE e.project_id = p_project_id
                        AND e.xid >= (SELECT k.counted_to_xid FROM fluxbase.outbox_usage_mark k)), 0))::bigint
$$;
REVOKE ALL ON FUNCTION fluxbase_guard.outbox_bytes(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.outbox_bytes(text) TO fluxbase_guard_quota;

-- The size the cap bounds: the project's relations and catalog rows (schema_size, sql/0020) and
-- its outbox bytes. A transaction that wrote outbox bytes grows the project, except for what
-- deleting over the cap must be able to write: DELETE events up to four times what its deleted
-- rows occupy (two images each, jsonb against the row's share of the table with its TOAST and
-- indexes; a BEFORE trigger that deletes nothing earns nothing), and schema events up to 8 KiB
-- per relation it dropped.
CREATE OR REPLACE FUNCTION fluxbase_guard.check_db_quota() RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pid   text;
    cap   bigint;
    size  bigint;
    grew  bigint;
    o_rows bigint;
    o_deletes bigint;
    o_schema bigint;
    freed bigint := 0;
BEGIN
    IF pg_catalog.pg_current_xact_id_if_assigned() IS NULL THEN
        RETURN NULL;
    END IF;
    pid := fluxbase_guard.tenant_project();
    SELECT p.db_quota_bytes INTO cap FROM fluxbase.projects p WHERE p.id = pid;
    IF cap IS NULL THEN
        RETURN NULL;
    END IF;
    -- pg_stat_get_xact_* read this backend's pending counters, which also hold earlier
    -- transactions' counts until the next stats flush (at most ~10 s later when idle); force
    -- that flush when this transaction ends, so the counters the next one sees are its own.
    PERFORM pg_catalog.pg_stat_force_next_flush();
    size := fluxbase_guard.schema_size(pid) + fluxbase_guard.outbox_bytes(pid);
    IF size <= cap THEN
        RETURN size;
    END IF;
    SELECT coalesce(sum(pg_catalog.pg_stat_get_xact_tuples_inserted(c.oid)
                        + pg_catalog.pg_stat_get_xact_tuples_updated(c.oid)), 0)
    INTO grew
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'p_' || pid AND c.relkind IN ('r', 'm');
    -- Catalog rows: new relations, functions, types, comments, rules, defaults, constraints,
    -- policies, triggers (any of them, also another project's: that only makes this check stricter).
    SELECT grew + coalesce(sum(pg_catalog.pg_stat_get_xact_tuples_inserted(r)
                               + pg_catalog.pg_stat_get_xact_tuples_updated(r)), 0)
    INTO grew
    FROM unnest(ARRAY['pg_catalog.pg_class', 'pg_catalog.pg_proc', 'pg_catalog.pg_type',
                      'pg_catalog.pg_description', 'pg_catalog.pg_rewrite', 'pg_catalog.pg_attrdef',
                      'pg_catalog.pg_constraint', 'pg_catalog.pg_policy',
                      'pg_catalog.pg_trigger']::pg_catalog.regclass[]) AS r;
    -- Outbox events this transaction wrote for the project (its own, by the xid index).
    IF grew = 0 THEN
        SELECT coalesce(sum(e.bytes) FILTER (WHERE e.kind = 'row' AND e.operation <> 'DELETE'), 0),
               coalesce(sum(e.bytes) FILTER (WHERE e.kind = 'row' AND e.operation = 'DELETE'), 0),
               coalesce(sum(e.bytes) FILTER (WHERE e.kind = 'schema'), 0)
        INTO o_rows, o_deletes, o_schema
        FROM fluxbase.events e
        WHERE e.xid = pg_catalog.pg_current_xact_id() AND e.project_id = pid;
        IF o_deletes > 0 THEN
            SELECT coalesce(sum(4 * LEAST(
                       pg_catalog.pg_stat_get_xact_tuples_deleted(c.oid)::numeric
                           * pg_catalog.pg_total_relation_size(c.oid)
                           / GREATEST(c.reltuples::numeric, pg_catalog.pg_stat_get_live_tuples(c.oid)
                                      + pg_catalog.pg_stat_get_dead_tuples(c.oid), 1),
                       pg_catalog.pg_total_relation_size(c.oid)::numeric)), 0)::bigint
            INTO freed
            FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'p_' || pid AND c.relkind IN ('r', 'p');
            o_deletes := GREATEST(o_deletes - freed, 0);
        END IF;
        IF o_schema > 0 THEN
            o_schema := GREATEST(o_schema - 8192 * pg_catalog.pg_stat_get_xact_tuples_deleted(
                                     'pg_catalog.pg_class'::pg_catalog.regclass), 0);
        END IF;
        grew := o_rows + o_deletes + o_schema;
    END IF;
    IF grew > 0 THEN
        RAISE EXCEPTION 'Database size % bytes exceeds the project''s limit of % bytes', size, cap
            USING ERRCODE = 'FX413', DETAIL = pg_catalog.format('size=%s limit=%s', size, cap);
    END IF;
    RETURN size;
END
$$;

GRANT SELECT (project_id, xid, kind, operation, bytes) ON fluxbase.events TO fluxbase_guard_quota;
GRANT SELECT ON fluxbase.outbox_usage, fluxbase.outbox_usage_mark TO fluxbase_guard_quota;
