-- The privilege model (issue 15, docs/security.md): no platform privilege reachable from tenant
-- code. Before this file the capture triggers were SECURITY DEFINER, owned by the migration
-- role (a superuser), and called to_jsonb() on the tenant's row, which calls a tenant-created
-- cast: any project admin ran code as superuser.
--
-- Now everything that evaluates tenant data runs as the tenant (SECURITY INVOKER), and the
-- platform's SECURITY DEFINER functions are owned by NOLOGIN roles that are not superusers and
-- hold only what each function needs (granted here and, for tables of later files, by the
-- post-migration step in platform/fluxbase/db/migrate.py, which also re-owns the control plane).

-- Roles are cluster-wide and several databases may migrate at once: create each role only if it
-- is missing, and take a concurrent creator's "already exists" as success.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['fluxbase_owner', 'fluxbase_outbox_writer', 'fluxbase_guard_keys',
                             'fluxbase_guard_migrations', 'fluxbase_guard_quota'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                           'NOBYPASSRLS NOINHERIT', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END LOOP;
END
$$;

-- The capture path's functions live in a schema of their own that tenant roles may use (they
-- run the capture triggers and, through the DDL event trigger, attach them); `fluxbase` itself
-- stays closed to them.
CREATE SCHEMA IF NOT EXISTS fluxbase_capture;
REVOKE ALL ON SCHEMA fluxbase_capture FROM PUBLIC;
GRANT USAGE ON SCHEMA fluxbase_capture TO PUBLIC;

GRANT USAGE ON SCHEMA fluxbase TO fluxbase_outbox_writer, fluxbase_guard_keys, fluxbase_guard_migrations,
    fluxbase_guard_quota;
GRANT USAGE ON SCHEMA fluxbase_guard TO fluxbase_guard_migrations, fluxbase_guard_quota;

-- ---------------------------------------------------------------------------------------------
-- The outbox writer: the one definer on the capture path. It takes jsonb built by the caller
-- (with the caller's rights), never a tenant type, so it evaluates no tenant object.

GRANT INSERT ON fluxbase.events TO fluxbase_outbox_writer;
GRANT SELECT (waiting) ON fluxbase.event_readers TO fluxbase_outbox_writer;
GRANT SELECT (project_id, table_name, enabled) ON fluxbase.realtime_tables TO fluxbase_outbox_writer;

-- Row events (and TRUNCATE). Only from a trigger (pg_trigger_depth() > 0): a read or readwrite
-- role cannot call it from a statement to forge events. For a tenant session the project is the
-- session user's (a tenant cannot change its session user) and the table must be one of that
-- project's tables. A session that is not a tenant role is the platform's own (the runtime or a
-- migration, which may write the outbox directly anyway): its events go to the project whose
-- schema holds the table.
CREATE OR REPLACE FUNCTION fluxbase_capture.write_events(
    p_table regclass, p_operation text, p_records jsonb[], p_olds jsonb[]
) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    m text[];
    ident text[];
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
        INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
        VALUES (m[1], 'schema', ident[2], 'TRUNCATE',
                pg_catalog.jsonb_build_object('command', 'TRUNCATE', 'object', ident[1] || '.' || ident[2]));
    ELSIF p_operation IN ('INSERT', 'UPDATE', 'DELETE') THEN
        INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old)
        SELECT m[1], 'row', ident[2], p_operation, u.r, u.o
        FROM unnest(p_records, p_olds) AS u(r, o);  -- (multi-argument unnest: FROM only, unqualified)
        IF NOT FOUND THEN
            RETURN;
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

-- Schema events, from the DDL event triggers (which run as the role doing the DDL). Only a
-- project's admin role does DDL in its schema; it may call this directly, which tells its own
-- subscribers nothing it could not make true with a real statement. Read and readwrite roles
-- are refused (so a DDL statement of theirs in a project schema, should an admin ever grant them
-- that, fails instead of going unannounced). Platform sessions, as above, by schema.
CREATE OR REPLACE FUNCTION fluxbase_capture.write_schema_event(
    p_schema text, p_table text, p_command text, p_record jsonb
) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    m text[];
BEGIN
    m := pg_catalog.regexp_match(session_user::text, '^p_([0-9a-f]{16})_(admin|rw|ro|rt)$');
    IF m IS NULL THEN
        m := pg_catalog.regexp_match(p_schema, '^p_([0-9a-f]{16})$') || ARRAY['admin'];
    END IF;
    IF m IS NULL OR m[2] <> 'admin' OR p_schema IS DISTINCT FROM 'p_' || m[1] THEN
        RAISE EXCEPTION 'fluxbase_capture.write_schema_event: only the project''s admin role announces its DDL'
            USING ERRCODE = '42501';
    END IF;
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record)
    VALUES (m[1], 'schema', p_table, p_command, p_record);
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;

-- Whether the calling project switched realtime off for one of its tables.
CREATE OR REPLACE FUNCTION fluxbase_capture.capture_disabled(p_table text) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
    SELECT EXISTS (SELECT 1 FROM fluxbase.realtime_tables r
                   WHERE r.project_id = (pg_catalog.regexp_match(session_user::text, '^p_([0-9a-f]{16})_'))[1]
                     AND r.table_name = p_table AND NOT r.enabled)
$$;

ALTER FUNCTION fluxbase_capture.write_events(regclass, text, jsonb[], jsonb[]) OWNER TO fluxbase_outbox_writer;
ALTER FUNCTION fluxbase_capture.write_schema_event(text, text, text, jsonb) OWNER TO fluxbase_outbox_writer;
ALTER FUNCTION fluxbase_capture.capture_disabled(text) OWNER TO fluxbase_outbox_writer;
REVOKE ALL ON FUNCTION fluxbase_capture.write_events(regclass, text, jsonb[], jsonb[]),
    fluxbase_capture.write_schema_event(text, text, text, jsonb), fluxbase_capture.capture_disabled(text) FROM PUBLIC;
-- Tenant roles reach them only through triggers of their own tables (the checks above).
GRANT EXECUTE ON FUNCTION fluxbase_capture.write_events(regclass, text, jsonb[], jsonb[]),
    fluxbase_capture.write_schema_event(text, text, text, jsonb), fluxbase_capture.capture_disabled(text) TO PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- Capture triggers: SECURITY INVOKER. to_jsonb() of the tenant's rows (and so any cast, type
-- output function or composite of the tenant's) runs as the writer.

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    imgs jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n)) FROM new_rows n);
    IF imgs IS NOT NULL THEN
        PERFORM fluxbase_capture.write_events(TG_RELID, 'INSERT', imgs, NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    imgs jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o)) FROM old_rows o);
    IF imgs IS NOT NULL THEN
        PERFORM fluxbase_capture.write_events(TG_RELID, 'DELETE', imgs, imgs);
    END IF;
    RETURN NULL;
END
$$;

-- UPDATE is row-level: transition tables cannot pair each old row with its new row.
CREATE OR REPLACE FUNCTION fluxbase_capture.capture_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'UPDATE', ARRAY[pg_catalog.to_jsonb(NEW)], ARRAY[pg_catalog.to_jsonb(OLD)]);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_truncate() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'TRUNCATE', NULL, NULL);
    RETURN NULL;
END
$$;

-- Rung by the platform (broadcasts) on its own connection, with its own rights.
CREATE OR REPLACE FUNCTION fluxbase.ring_doorbell() RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;

-- Attach and detach run as the table's owner (the project's admin role: the DDL event trigger
-- runs as it, and the platform's realtime switch does SET LOCAL ROLE to it).
CREATE OR REPLACE FUNCTION fluxbase_capture.detach_capture(p_table regclass) RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
BEGIN
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_ins ON %s', p_table);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_upd ON %s', p_table);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_del ON %s', p_table);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_trunc ON %s', p_table);
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.attach_capture(p_table regclass) RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
BEGIN
    IF (SELECT relispartition FROM pg_catalog.pg_class WHERE oid = p_table) THEN
        RETURN;  -- the partitioned parent's triggers already cover its partitions
    END IF;
    PERFORM fluxbase_capture.detach_capture(p_table);
    EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_ins AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                              'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_insert()', p_table);
    EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_upd AFTER UPDATE ON %s '
                              'FOR EACH ROW EXECUTE FUNCTION fluxbase_capture.capture_update()', p_table);
    EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_del AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                              'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_delete()', p_table);
    EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_trunc AFTER TRUNCATE ON %s '
                              'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_truncate()', p_table);
END
$$;

-- Event trigger functions: SECURITY INVOKER, so they run as the role doing the DDL.
CREATE OR REPLACE FUNCTION fluxbase.on_ddl_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    cmd record;
    main record;
    found_main boolean := false;
BEGIN
    FOR cmd IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN cmd.schema_name IS NULL OR cmd.schema_name !~ '^p_[0-9a-f]{16}$';
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
           AND NOT fluxbase_capture.capture_disabled(pg_catalog.split_part(cmd.object_identity, '.', 2)) THEN
            PERFORM fluxbase_capture.attach_capture(cmd.objid::regclass);
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
    PERFORM fluxbase_capture.write_schema_event(
        main.schema_name,
        CASE WHEN main.object_type IN ('table', 'table column') THEN pg_catalog.split_part(main.object_identity, '.', 2) END,
        TG_TAG,
        pg_catalog.jsonb_build_object('command', TG_TAG, 'object', main.object_identity, 'objectType', main.object_type));
END
$$;

CREATE OR REPLACE FUNCTION fluxbase.on_sql_drop() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    obj record;
BEGIN
    FOR obj IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() LOOP
        CONTINUE WHEN obj.schema_name IS NULL OR obj.schema_name !~ '^p_[0-9a-f]{16}$' OR NOT obj.original
                      OR obj.object_type NOT IN ('table', 'view', 'materialized view', 'index', 'sequence',
                                                 'function', 'type', 'table column', 'policy');
        PERFORM fluxbase_capture.write_schema_event(
            obj.schema_name,
            CASE WHEN obj.object_type = 'table' THEN obj.object_name END,
            TG_TAG,
            pg_catalog.jsonb_build_object('command', TG_TAG, 'object', obj.object_identity, 'objectType', obj.object_type));
    END LOOP;
END
$$;

-- Trigger functions may only be called as triggers; CREATE TRIGGER needs EXECUTE on them, and
-- the project's admin role creates the capture triggers (through the DDL event trigger).
GRANT EXECUTE ON FUNCTION fluxbase_capture.capture_insert(), fluxbase_capture.capture_delete(), fluxbase_capture.capture_update(),
    fluxbase_capture.capture_truncate(), fluxbase_capture.attach_capture(regclass), fluxbase_capture.detach_capture(regclass) TO PUBLIC;
REVOKE ALL ON FUNCTION fluxbase.ring_doorbell() FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The request guards: owned by roles that may read exactly the columns each reads.

-- check_key as in sql/0002, but read-only mode is set with SET LOCAL (a statement, not the
-- set_config() function, which sql/0007 keeps from everyone but admin and checker roles).
CREATE OR REPLACE FUNCTION fluxbase_guard.check_key(p_key_hash bytea, p_project_id text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    k record;
BEGIN
    SELECT a.revoked_at, a.expires_at, p.status, p.read_only INTO k
    FROM fluxbase.api_keys a JOIN fluxbase.projects p ON p.id = a.project_id
    WHERE a.key_hash = p_key_hash AND a.project_id = p_project_id;
    IF NOT FOUND OR k.revoked_at IS NOT NULL OR (k.expires_at IS NOT NULL AND k.expires_at <= now()) THEN
        RAISE EXCEPTION 'API key is no longer valid' USING ERRCODE = 'FX401';
    END IF;
    IF k.status = 'suspended' THEN
        RAISE EXCEPTION 'Project is suspended' USING ERRCODE = 'FX403';
    END IF;
    IF k.read_only THEN
        SET LOCAL transaction_read_only = on;
    END IF;
END
$$;

GRANT SELECT (key_hash, project_id, revoked_at, expires_at) ON fluxbase.api_keys TO fluxbase_guard_keys;
GRANT SELECT (id, status, read_only) ON fluxbase.projects TO fluxbase_guard_keys;
GRANT SELECT (id, user_id, revoked_at) ON fluxbase.project_user_sessions TO fluxbase_guard_keys;
GRANT SELECT (id, project_id, disabled_at) ON fluxbase.project_users TO fluxbase_guard_keys;
ALTER FUNCTION fluxbase_guard.check_key(bytea, text) OWNER TO fluxbase_guard_keys;
ALTER FUNCTION fluxbase_guard.check_user_session(text, text, text) OWNER TO fluxbase_guard_keys;

-- These read nothing a caller may not read: plain functions.
ALTER FUNCTION fluxbase_guard.tenant_project() SECURITY INVOKER;
ALTER FUNCTION fluxbase_guard.schema_size(text) SECURITY INVOKER;

GRANT SELECT, DELETE ON fluxbase.migration_tickets TO fluxbase_guard_migrations;
GRANT INSERT ON fluxbase.project_migrations TO fluxbase_guard_migrations;
GRANT EXECUTE ON FUNCTION fluxbase_guard.tenant_project() TO fluxbase_guard_migrations;
ALTER FUNCTION fluxbase_guard.redeem_migration(bytea) OWNER TO fluxbase_guard_migrations;

GRANT SELECT (id, db_quota_bytes) ON fluxbase.projects TO fluxbase_guard_quota;
GRANT EXECUTE ON FUNCTION fluxbase_guard.tenant_project(), fluxbase_guard.schema_size(text) TO fluxbase_guard_quota;
ALTER FUNCTION fluxbase_guard.check_db_quota() OWNER TO fluxbase_guard_quota;

-- Every platform function lists pg_temp last. Unlisted, the caller's temporary schema is
-- searched FIRST for type and relation names: a tenant's `CREATE DOMAIN pg_temp.text ... CHECK
-- (its_function(VALUE))` made every `text` in a definer's body (a declaration, a cast) run the
-- tenant's function with the owner's rights; before this file that owner was a superuser
-- (tests/test_privilege.py). Invoker functions too: a definer calls some of them.
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_catalog.pg_proc p
             JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname IN ('fluxbase', 'fluxbase_guard', 'fluxbase_capture', 'auth')
               AND (p.prosecdef OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.proconfig) c
                                          WHERE c = 'search_path=pg_catalog')) LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f.sig);
    END LOOP;
END
$$;

-- Existing tables keep their triggers (same functions, replaced in place); attach them again
-- anyway so that every table of a project schema has the current set (except those switched off).
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname ~ '^p_[0-9a-f]{16}$'
               AND NOT EXISTS (SELECT 1 FROM fluxbase.realtime_tables r
                               WHERE r.project_id = substr(n.nspname, 3) AND r.table_name = c.relname
                                 AND NOT r.enabled) LOOP
        PERFORM fluxbase_capture.attach_capture(t.oid::regclass);
    END LOOP;
END
$$;

-- The old capture functions (SECURITY DEFINER, owned by the migration role) are gone; so are
-- their triggers, replaced above.
DROP FUNCTION IF EXISTS fluxbase.capture_insert(), fluxbase.capture_delete(), fluxbase.capture_update(),
    fluxbase.capture_truncate() CASCADE;
DROP FUNCTION IF EXISTS fluxbase.attach_capture(regclass), fluxbase.detach_capture(regclass);
