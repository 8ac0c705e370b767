-- The event trigger that refuses routine SET clauses of capped settings (sql/0022) reads
-- pg_proc.proconfig, which sql/0021 closed to PUBLIC: as SECURITY INVOKER it failed every tenant
-- CREATE FUNCTION with "permission denied for table pg_proc". It runs as a definer now, owned
-- (db/privileges.py) by fluxbase_catalog_own, a member of fluxbase_catalog_reader; DDL of a
-- superuser session (migrations) returns before reading the column.
-- Safe: it takes no argument, reads only the routines of the DDL command that fired it (which
-- the caller just wrote) and evaluates nothing of theirs; its error names the caller's setting.
CREATE OR REPLACE FUNCTION fluxbase.refuse_routine_settings() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad text;
BEGIN
    -- The caps bound tenant roles; the platform's own DDL under the migration superuser
    -- (re-owning functions, extension scripts) returns here without reading the closed column.
    IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user) THEN
        RETURN;
    END IF;
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
