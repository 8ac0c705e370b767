-- Capture that costs less (issue 20): a DELETE's event stores the deleted row's image once.
-- The capture triggers have always given a DELETE the same image as `record` and `old`
-- (write_events(.., imgs, imgs)); the outbox now keeps it only in `record` and leaves `old`
-- NULL, and the readers give it as both (`coalesce(e.old, e.record)` for a DELETE:
-- fluxbase.services.realtime.MESSAGE_SQL, the webhook reader), so the wire, the webhooks and
-- the events already in the outbox are unchanged. A captured single-row DELETE writes one image
-- less into the outbox heap and the WAL (bench/capture_cost.py --fsync: about 4 µs of its
-- PostgreSQL CPU). `bytes` still counts the image twice, as the readers deliver it: the outbox
-- quota, the 1 MiB bound on one event's images and the moves' accounting are unchanged. The C
-- capture (ext/fluxbase_capture) stores the same rows.
-- A DELETE's old images are taken to be its records whatever write_events is handed (hostile
-- review 22): a tenant's own trigger calling it for a DELETE with no old images (or other ones,
-- which the outbox drops) would otherwise have an event delivered with its record twice but
-- counted once, up to 2 MiB of images where the bound is 1 MiB (the lines marked "review 22").

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
        -- (review 22) a DELETE's old image is its record, as the readers deliver it
        v_n := coalesce(pg_catalog.pg_column_size(p_records[1]), 0)
               + coalesce(pg_catalog.pg_column_size(CASE WHEN p_operation = 'DELETE' THEN p_records[1] ELSE p_olds[1] END), 0);
        IF v_n <= 1048576 THEN
            INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes)
            VALUES (m[1], 'row', ident[2], p_operation, p_records[1],
                    CASE WHEN p_operation <> 'DELETE' THEN p_olds[1] END, v_n);
        ELSE
            v_rec := fluxbase_capture.small_fields(p_records[1]);
            v_old := CASE WHEN p_operation = 'DELETE' THEN v_rec ELSE fluxbase_capture.small_fields(p_olds[1]) END;  -- (review 22)
            v_n := coalesce(pg_catalog.pg_column_size(v_rec), 0) + coalesce(pg_catalog.pg_column_size(v_old), 0);
            INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes)
            VALUES (m[1], 'row', ident[2], p_operation, v_rec, CASE WHEN p_operation <> 'DELETE' THEN v_old END, v_n);
        END IF;
    ELSE
        -- (multi-argument unnest: FROM only, unqualified)
        INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes)
        SELECT m[1], 'row', ident[2], p_operation, s.r, CASE WHEN p_operation <> 'DELETE' THEN s.o END,
               CASE WHEN s.n > 1048576
                    THEN coalesce(pg_catalog.pg_column_size(s.r), 0) + coalesce(pg_catalog.pg_column_size(s.o), 0)
                    ELSE s.n END
        FROM (SELECT CASE WHEN u.n > 1048576 THEN fluxbase_capture.small_fields(u.r) ELSE u.r END AS r,
                     CASE WHEN u.n > 1048576 THEN fluxbase_capture.small_fields(u.o) ELSE u.o END AS o,
                     u.n
              FROM (SELECT x.r, x.o, coalesce(pg_catalog.pg_column_size(x.r), 0)
                                     + coalesce(pg_catalog.pg_column_size(x.o), 0) AS n
                    -- (review 22) a DELETE's old images are its records
                    FROM unnest(p_records, CASE WHEN p_operation = 'DELETE' THEN p_records ELSE p_olds END)
                         AS x(r, o)) AS u) AS s;
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
