-- Broadcast from SQL (issue 20): realtime.broadcast(topic, payload [, event]) called inside a
-- tenant transaction writes a topic broadcast to the outbox, so it reaches the subscribers of
-- `project_<id>:<topic>` only if that transaction commits (a rolled-back statement, savepoint or
-- transaction takes its event with it), with the message an HTTP/WebSocket broadcast has.
--
-- * The project is the session's (session_user p_<id>_admin or p_<id>_rw), never an argument.
-- * Who may send is the project's topic rules (fluxbase.realtime_settings.topics, the same rules
--   the WebSocket `broadcast` applies; services/realtime.py topic_allowed): admin keys always,
--   a readwrite key if the rule lists "readwrite", an end user (auth.uid() set, whatever key)
--   if it lists "user". Read keys never: their transactions are READ ONLY, and the read role is
--   not granted the function at all.
-- * The topic is checked as everywhere (1 to 64 of A-Z a-z 0-9 _ . -); the message
--   {"event", "payload"} is capped at 64 KiB of JSON (MAX_BROADCAST_BYTES), the event name at
--   1 to 100 characters, and its size counts toward the project's outbox bytes (sql/0022).
-- * A SECURITY DEFINER owned by the NOLOGIN role fluxbase_guard_broadcast, which may only read
--   the project's status and topic rules and insert into the outbox. Its arguments are of
--   built-in types (text, jsonb) and it calls only pg_catalog functions and operators: nothing
--   a tenant defined runs with its rights.
--
-- The schema is named `realtime` as the issue names the function. It cannot collide with a
-- tenant's schema: projects live in p_<id> and extensions in ext_<name>, and no tenant role may
-- create schemas (CREATE on the database is the runtime's only). Tenant search_paths do not list
-- it: the function is called by its qualified name.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'fluxbase_guard_broadcast') THEN
        BEGIN
            CREATE ROLE fluxbase_guard_broadcast NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                NOREPLICATION NOBYPASSRLS NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    -- The group the project roles that may call it belong to (admin and readwrite of every
    -- project: tenancy/provision.py grants it at provisioning, below for existing projects).
    -- A member's privileges on nothing else change; dropping a project role drops its membership.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'fluxbase_realtime_senders') THEN
        BEGIN
            CREATE ROLE fluxbase_realtime_senders NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                NOREPLICATION NOBYPASSRLS NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS realtime;
REVOKE ALL ON SCHEMA realtime FROM PUBLIC;
GRANT USAGE ON SCHEMA realtime TO fluxbase_realtime_senders;

GRANT USAGE ON SCHEMA fluxbase TO fluxbase_guard_broadcast;
GRANT INSERT ON fluxbase.events TO fluxbase_guard_broadcast;
GRANT SELECT (waiting) ON fluxbase.event_readers TO fluxbase_guard_broadcast;
GRANT SELECT (id, status, read_only) ON fluxbase.projects TO fluxbase_guard_broadcast;
GRANT SELECT (project_id, topics) ON fluxbase.realtime_settings TO fluxbase_guard_broadcast;

CREATE OR REPLACE FUNCTION realtime.broadcast(topic text, payload jsonb, event text DEFAULT 'broadcast')
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text[];
    pid text;
    principal text;
    uid text;
    rules jsonb;
    rule jsonb;
    pattern text;
    senders jsonb := '["readwrite"]'::jsonb;  -- services/realtime.py DEFAULT_TOPIC_RULE["send"]
    proj record;
    body jsonb;
    n integer;
BEGIN
    m := pg_catalog.regexp_match(session_user::text, '^p_([0-9a-f]{16})_(admin|rw)$');
    IF m IS NULL THEN
        RAISE EXCEPTION 'realtime.broadcast may only be called by a project''s admin or readwrite role'
            USING ERRCODE = '42501';
    END IF;
    pid := m[1];
    IF topic IS NULL OR pg_catalog.textregexeq(topic, '^[A-Za-z0-9_.-]{1,64}$') IS NOT TRUE THEN
        RAISE EXCEPTION 'realtime.broadcast: a topic is 1 to 64 letters, digits, ''_'', ''-'' or ''.'''
            USING ERRCODE = '22023';
    END IF;
    IF event IS NULL OR pg_catalog.char_length(event) OPERATOR(pg_catalog.<) 1
       OR pg_catalog.char_length(event) OPERATOR(pg_catalog.>) 100 THEN
        RAISE EXCEPTION 'realtime.broadcast: event must be a name of 1 to 100 characters'
            USING ERRCODE = '22023';
    END IF;
    -- The principal as the WebSocket sees it (topic_allowed): an end user whatever the key,
    -- else the key's scope. Read and readwrite roles cannot change fluxbase.auth_uid (sql/0007);
    -- an admin key that drops its end user only becomes what it already is, an admin.
    uid := NULLIF(pg_catalog.current_setting('fluxbase.auth_uid', true), '');
    principal := CASE WHEN uid IS NOT NULL THEN 'user' WHEN m[2] = 'admin' THEN 'admin' ELSE 'readwrite' END;
    SELECT p.status, p.read_only INTO proj FROM fluxbase.projects p WHERE p.id = pid;
    IF NOT FOUND OR proj.status IS DISTINCT FROM 'active' OR proj.read_only THEN
        RAISE EXCEPTION 'realtime.broadcast: the project is suspended or read-only' USING ERRCODE = '25006';
    END IF;
    IF principal <> 'admin' THEN
        SELECT s.topics INTO rules FROM fluxbase.realtime_settings s WHERE s.project_id = pid;
        -- The first rule whose pattern matches decides: `name`, `prefix*` or `*`.
        IF pg_catalog.jsonb_typeof(rules) = 'array' THEN
            FOR rule IN SELECT r.value FROM pg_catalog.jsonb_array_elements(rules) AS r LOOP
                pattern := rule OPERATOR(pg_catalog.->>) 'pattern';
                IF pattern = topic
                   OR (pg_catalog.right(pattern, 1) = '*'
                       AND pg_catalog.starts_with(topic, pg_catalog.left(pattern, -1))) THEN
                    IF pg_catalog.jsonb_typeof(rule OPERATOR(pg_catalog.->) 'send') = 'array' THEN
                        senders := rule OPERATOR(pg_catalog.->) 'send';
                    END IF;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF NOT senders OPERATOR(pg_catalog.?) principal THEN
            RAISE EXCEPTION 'The project''s topic rules do not let %s send on topic %',
                CASE WHEN principal = 'user' THEN 'end user' ELSE '''readwrite'' credential' END,
                pg_catalog.quote_literal(topic)
                USING ERRCODE = '42501';
        END IF;
    END IF;
    body := pg_catalog.jsonb_build_object('event', event, 'payload', payload);
    n := pg_catalog.octet_length(body::text);
    IF n OPERATOR(pg_catalog.>) 65536 THEN
        RAISE EXCEPTION 'realtime.broadcast: broadcasts are limited to 64 KiB of JSON (this one is % bytes)', n
            USING ERRCODE = '54000';
    END IF;
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, bytes)
    VALUES (pid, 'broadcast', topic, 'BROADCAST', body, pg_catalog.pg_column_size(body));
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers r WHERE r.waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;

REVOKE ALL ON FUNCTION realtime.broadcast(text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION realtime.broadcast(text, jsonb, text) TO fluxbase_realtime_senders;

-- Existing projects: their admin and readwrite roles join the senders.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT rolname FROM pg_catalog.pg_roles WHERE rolname ~ '^p_[0-9a-f]{16}_(admin|rw)$' LOOP
        EXECUTE pg_catalog.format('GRANT fluxbase_realtime_senders TO %I WITH INHERIT TRUE, SET FALSE', r.rolname);
    END LOOP;
END
$$;

-- The quota counts a transaction's broadcasts as growth, like its row events (sql/0031's
-- function otherwise unchanged).
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
    SELECT grew + coalesce(sum(pg_catalog.pg_stat_get_xact_tuples_inserted(r)
                               + pg_catalog.pg_stat_get_xact_tuples_updated(r)), 0)
    INTO grew
    FROM unnest(ARRAY['pg_catalog.pg_class', 'pg_catalog.pg_proc', 'pg_catalog.pg_type',
                      'pg_catalog.pg_description', 'pg_catalog.pg_rewrite', 'pg_catalog.pg_attrdef',
                      'pg_catalog.pg_constraint', 'pg_catalog.pg_policy',
                      'pg_catalog.pg_trigger', 'pg_catalog.pg_attribute', 'pg_catalog.pg_index',
                      'pg_catalog.pg_depend']::pg_catalog.regclass[]) AS r;
    IF grew = 0 THEN
        SELECT coalesce(sum(e.bytes) FILTER (WHERE (e.kind = 'row' AND e.operation <> 'DELETE')
                                                OR e.kind = 'broadcast'), 0),
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

-- ---------------------------------------------------------------------------------------------
-- Capture cost (issue 20). The capture trigger functions run as the writer (SECURITY INVOKER):
-- their `SET search_path` clause protected nothing (whatever they resolve runs with the writer's
-- own rights, and the table's owner can attach any trigger of its own anyway), but it cost a
-- GUC save, a search path recomputation and a restore at every call. Without it, every name
-- in them is schema-qualified (functions, types, operators). bench/capture_cost.py measures it.
CREATE OR REPLACE FUNCTION fluxbase_capture.capture_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
DECLARE
    imgs pg_catalog.jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) FROM new_rows n);
    IF imgs IS NOT NULL THEN
        PERFORM fluxbase_capture.write_events(TG_RELID, 'INSERT', imgs, NULL);
    END IF;
    RETURN NULL;
END
$$;
ALTER FUNCTION fluxbase_capture.capture_insert() RESET search_path;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
DECLARE
    imgs pg_catalog.jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*)) FROM old_rows o);
    IF imgs IS NOT NULL THEN
        PERFORM fluxbase_capture.write_events(TG_RELID, 'DELETE', imgs, imgs);
    END IF;
    RETURN NULL;
END
$$;
ALTER FUNCTION fluxbase_capture.capture_delete() RESET search_path;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'UPDATE', ARRAY[pg_catalog.to_jsonb(NEW)],
                                          ARRAY[pg_catalog.to_jsonb(OLD)]);
    RETURN NULL;
END
$$;
ALTER FUNCTION fluxbase_capture.capture_update() RESET search_path;

-- write_events as sql/0022 wrote it, except how it finds the session's project (below).
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
    su text;
BEGIN
    IF pg_catalog.pg_trigger_depth() < 1 THEN
        RAISE EXCEPTION 'fluxbase_capture.write_events may only be called by the capture triggers'
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
