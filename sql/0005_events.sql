-- The event outbox: every committed row change and DDL command in a project schema, written by
-- triggers in the same transaction as the change. NOTIFY is only a doorbell, rung only while a
-- reader is waiting, and carries no payload anyone should trust.

CREATE TABLE IF NOT EXISTS fluxbase.events (
    -- No primary-key index: every read goes through (xid, id); one index fewer per captured row.
    id         bigint GENERATED ALWAYS AS IDENTITY,
    -- Commit-safe reading: readers only read transactions below their snapshot's xmin.
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    project_id text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('row', 'schema', 'broadcast')),
    table_name text,
    operation  text NOT NULL,
    record     jsonb,
    old        jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS events_xid_idx ON fluxbase.events (xid, id);
CREATE INDEX IF NOT EXISTS events_project_xid_idx ON fluxbase.events (project_id, xid, id);

-- Readers (realtime nodes, webhook workers) say here when they sleep and want a doorbell.
CREATE TABLE IF NOT EXISTS fluxbase.event_readers (
    reader_id  text PRIMARY KEY,
    waiting    boolean NOT NULL DEFAULT false,
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- Per-table realtime switch (default: enabled; a row here with enabled = false turns it off).
CREATE TABLE IF NOT EXISTS fluxbase.realtime_tables (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    table_name text NOT NULL,
    enabled    boolean NOT NULL DEFAULT true,
    PRIMARY KEY (project_id, table_name)
);

CREATE OR REPLACE FUNCTION fluxbase.ring_doorbell() RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    -- Every notifying commit takes a cluster-wide lock; ring only while a reader sleeps.
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_notify('fluxbase_events', '');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase.capture_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
    SELECT substr(TG_TABLE_SCHEMA, 3), 'row', TG_TABLE_NAME, 'INSERT', to_jsonb(n) FROM new_rows n;
    -- The doorbell check inline (a nested PL/pgSQL call costs more than the check itself).
    IF FOUND AND EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_notify('fluxbase_events', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase.capture_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old)
    SELECT substr(TG_TABLE_SCHEMA, 3), 'row', TG_TABLE_NAME, 'DELETE', to_jsonb(o), to_jsonb(o) FROM old_rows o;
    IF FOUND AND EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_notify('fluxbase_events', '');
    END IF;
    RETURN NULL;
END
$$;

-- UPDATE is row-level: transition tables cannot pair each old row with its new row.
CREATE OR REPLACE FUNCTION fluxbase.capture_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old)
    VALUES (substr(TG_TABLE_SCHEMA, 3), 'row', TG_TABLE_NAME, 'UPDATE', to_jsonb(NEW), to_jsonb(OLD));
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_notify('fluxbase_events', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase.capture_truncate() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
    VALUES (substr(TG_TABLE_SCHEMA, 3), 'schema', TG_TABLE_NAME, 'TRUNCATE',
            jsonb_build_object('command', 'TRUNCATE', 'object', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME));
    PERFORM fluxbase.ring_doorbell();
    RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION fluxbase.ring_doorbell(), fluxbase.capture_insert(), fluxbase.capture_delete(),
    fluxbase.capture_update(), fluxbase.capture_truncate() FROM PUBLIC;

-- Remove the capture triggers from one table (the per-table realtime switch).
CREATE OR REPLACE FUNCTION fluxbase.detach_capture(p_table regclass) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS fluxbase_capture_ins ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS fluxbase_capture_upd ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS fluxbase_capture_del ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS fluxbase_capture_trunc ON %s', p_table);
END
$$;

-- Attach (or re-attach) the capture triggers to one table.
CREATE OR REPLACE FUNCTION fluxbase.attach_capture(p_table regclass) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    IF (SELECT relispartition FROM pg_class WHERE oid = p_table) THEN
        RETURN;  -- the partitioned parent's triggers already cover its partitions
    END IF;
    PERFORM fluxbase.detach_capture(p_table);
    EXECUTE format('CREATE TRIGGER fluxbase_capture_ins AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.capture_insert()', p_table);
    EXECUTE format('CREATE TRIGGER fluxbase_capture_upd AFTER UPDATE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION fluxbase.capture_update()', p_table);
    EXECUTE format('CREATE TRIGGER fluxbase_capture_del AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                   'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.capture_delete()', p_table);
    EXECUTE format('CREATE TRIGGER fluxbase_capture_trunc AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.capture_truncate()', p_table);
END
$$;

REVOKE ALL ON FUNCTION fluxbase.attach_capture(regclass), fluxbase.detach_capture(regclass) FROM PUBLIC;

-- DDL in project schemas: a schema event, and capture triggers on every new table.
CREATE OR REPLACE FUNCTION fluxbase.on_ddl_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
DECLARE
    cmd record;
    main record;
    found_main boolean := false;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN cmd.schema_name IS NULL OR cmd.schema_name !~ '^p_[0-9a-f]{16}$';
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
           AND NOT EXISTS (SELECT 1 FROM fluxbase.realtime_tables r
                           WHERE r.project_id = substr(cmd.schema_name, 3)
                             AND r.table_name = split_part(cmd.object_identity, '.', 2) AND NOT r.enabled) THEN
            PERFORM fluxbase.attach_capture(cmd.objid::regclass);
        END IF;
        -- One event per statement: the command that matches the statement's own tag.
        IF NOT found_main THEN
            main := cmd;
            found_main := true;
        ELSIF cmd.command_tag = TG_TAG AND main.command_tag <> TG_TAG THEN
            main := cmd;
        END IF;
    END LOOP;
    IF NOT found_main THEN
        RETURN;
    END IF;
    IF TG_TAG = 'CREATE TRIGGER' AND main.object_identity LIKE 'fluxbase_capture_%' THEN
        RETURN;
    END IF;
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
    VALUES (substr(main.schema_name, 3), 'schema',
            CASE WHEN main.object_type IN ('table', 'table column') THEN split_part(main.object_identity, '.', 2) END,
            TG_TAG,
            jsonb_build_object('command', TG_TAG, 'object', main.object_identity, 'objectType', main.object_type));
    PERFORM fluxbase.ring_doorbell();
END
$$;

CREATE OR REPLACE FUNCTION fluxbase.on_sql_drop() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
DECLARE
    obj record;
    emitted boolean := false;
BEGIN
    FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
        CONTINUE WHEN obj.schema_name IS NULL OR obj.schema_name !~ '^p_[0-9a-f]{16}$' OR NOT obj.original
                      OR obj.object_type NOT IN ('table', 'view', 'materialized view', 'index', 'sequence',
                                                 'function', 'type', 'table column', 'policy');
        INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
        VALUES (substr(obj.schema_name, 3), 'schema',
                CASE WHEN obj.object_type = 'table' THEN obj.object_name END,
                TG_TAG,
                jsonb_build_object('command', TG_TAG, 'object', obj.object_identity, 'objectType', obj.object_type));
        emitted := true;
    END LOOP;
    IF emitted THEN PERFORM fluxbase.ring_doorbell(); END IF;
END
$$;

DROP EVENT TRIGGER IF EXISTS fluxbase_ddl_end;
CREATE EVENT TRIGGER fluxbase_ddl_end ON ddl_command_end EXECUTE FUNCTION fluxbase.on_ddl_end();
DROP EVENT TRIGGER IF EXISTS fluxbase_sql_drop;
CREATE EVENT TRIGGER fluxbase_sql_drop ON sql_drop EXECUTE FUNCTION fluxbase.on_sql_drop();

-- Tables that existed before this migration get their triggers too.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname ~ '^p_[0-9a-f]{16}$' LOOP
        PERFORM fluxbase.attach_capture(t.oid::regclass);
    END LOOP;
END
$$;

-- Housekeeping trims the outbox; a `since` older than this answers resync_required.
CREATE TABLE IF NOT EXISTS fluxbase.event_retention (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    trimmed_to_xid xid8 NOT NULL DEFAULT '0'::xid8,
    trimmed_to_id  bigint NOT NULL DEFAULT 0
);
INSERT INTO fluxbase.event_retention DEFAULT VALUES ON CONFLICT DO NOTHING;
