-- Tenant roles cannot reach what lies outside their project's schema and share (issue 15,
-- findings 2 and 5). tenancy.statements refuses these as statements; the privileges below refuse
-- them also where no statement shows them (a call inside a function body).
--
-- 1. Large objects live in pg_largeobject, outside the project's schema and its size quota:
--    nobody but superusers may call the lo_* functions (server-side lo_import/lo_export already
--    needed more).
-- 2. Nothing of one request's statement text is visible to the next. asyncpg keeps each tenant
--    statement prepared under a name, so pg_prepared_statements showed earlier requests' texts
--    (their literals included) to whoever ran next on the connection; pg_stat_activity and
--    pg_stat_get_backend_activity show the current text of every session of the same role, and
--    pg_cursors the text of open cursors. Only pg_read_all_stats members (monitoring, the
--    service role) may read them.
--
-- ACLs of pg_catalog objects are per database, so this holds in this database only, as every
-- other grant here. Idempotent: REVOKE and GRANT of what is already so change nothing.

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND p.proname IN ('lo_open', 'lo_close', 'loread', 'lowrite', 'lo_lseek', 'lo_lseek64',
                            'lo_creat', 'lo_create', 'lo_tell', 'lo_tell64', 'lo_truncate',
                            'lo_truncate64', 'lo_unlink', 'lo_import', 'lo_export', 'lo_from_bytea',
                            'lo_get', 'lo_put')
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

REVOKE SELECT ON pg_catalog.pg_prepared_statements, pg_catalog.pg_cursors, pg_catalog.pg_stat_activity
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_prepared_statement(), pg_catalog.pg_cursor(),
    pg_catalog.pg_stat_get_activity(integer), pg_catalog.pg_stat_get_backend_activity(integer)
    FROM PUBLIC;
GRANT SELECT ON pg_catalog.pg_prepared_statements, pg_catalog.pg_cursors, pg_catalog.pg_stat_activity
    TO pg_read_all_stats;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_prepared_statement(), pg_catalog.pg_cursor(),
    pg_catalog.pg_stat_get_activity(integer), pg_catalog.pg_stat_get_backend_activity(integer)
    TO pg_read_all_stats;

-- A REVOKE by a role that does not own the object only warns; this must not pass silently.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
               WHERE p.pronamespace = 'pg_catalog'::regnamespace AND a.grantee = 0
                 AND a.privilege_type = 'EXECUTE'
                 AND p.proname IN ('lo_from_bytea', 'lo_create', 'lo_put', 'pg_prepared_statement',
                                   'pg_cursor', 'pg_stat_get_activity', 'pg_stat_get_backend_activity'))
       OR has_table_privilege('public', 'pg_catalog.pg_prepared_statements', 'SELECT') THEN
        RAISE EXCEPTION 'could not revoke large objects / statement texts from PUBLIC: run migrations as a superuser';
    END IF;
END
$$;
