-- RLS management and RLS-filtered realtime: a per-project realtime setting, and the function the
-- realtime service calls on a project's read role to evaluate row images against the SELECT
-- policies of their tables for one end user.

-- Per-project realtime options (no row: defaults). Schema events reveal DDL (table and column
-- names, policies) that end users may not be meant to see, so they are off for them by default.
CREATE TABLE IF NOT EXISTS fluxbase.realtime_settings (
    project_id             text PRIMARY KEY REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    schema_events_to_users boolean NOT NULL DEFAULT false,
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- The two functions below are SECURITY INVOKER on purpose: they run as the calling tenant role
-- (the realtime service calls them as the project's RLS checker role `p_<id>_rt`, a member of
-- its read role) with that role's privileges and policies. Only checker roles may call them:
-- they set the request identity, which read and readwrite roles may not do (sql/0007), and
-- answer whether a given row would be visible to a given user. Each pins the
-- search_path to the project schema for its own transaction, so a policy function that changed
-- the session's search_path cannot change how the next check resolves names.

-- The SELECT policies that apply to the calling role on some tables, deparsed for that
-- search_path: permissive quals (a policy without one contributes `false`, as in PostgreSQL)
-- and restrictive quals.
CREATE OR REPLACE FUNCTION fluxbase_guard.select_policies(p_schema text, p_tables text[])
RETURNS TABLE (table_name text, rls_enabled boolean, can_select boolean, permissive text[], restrictive text[])
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_catalog.set_config('search_path', pg_catalog.quote_ident(p_schema), true);
    RETURN QUERY
    SELECT c.relname::text, c.relrowsecurity, pg_catalog.has_table_privilege(c.oid, 'SELECT'),
           ARRAY(SELECT coalesce(pg_catalog.pg_get_expr(p.polqual, p.polrelid), 'false')
                 FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = c.oid AND p.polpermissive AND p.polcmd IN ('r', '*')
                   AND (0::oid = ANY (p.polroles) OR EXISTS (
                        SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                        WHERE pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')))
                 ORDER BY p.polname),
           ARRAY(SELECT pg_catalog.pg_get_expr(p.polqual, p.polrelid)
                 FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = c.oid AND NOT p.polpermissive AND p.polcmd IN ('r', '*')
                   AND p.polqual IS NOT NULL
                   AND (0::oid = ANY (p.polroles) OR EXISTS (
                        SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                        WHERE pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')))
                 ORDER BY p.polname)
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = p_schema AND c.relname = ANY (p_tables) AND c.relkind IN ('r', 'p');
END
$$;

-- One call evaluates every table of a batch for some end users, one user after the other: each
-- user's identity is set for this transaction (set_config is immediate; auth.uid() reads it at
-- run time in every statement), each check is a statement the realtime service built from the
-- output of select_policies (parameters: $1 the row images as a jsonb array, $2 the check
-- number, $3 the user number), and a check that raises is reported in `failed` instead of
-- aborting the others (fail closed for that table and that user only). Query cancellation (the
-- caller's timeout) is not caught: the caller then retries the users one by one.
CREATE OR REPLACE FUNCTION fluxbase_guard.visible_rows(
    p_schema text, p_uids text[], p_claims text[], p_roles text[], p_checks text[], p_rows text[]
) RETURNS TABLE (user_no integer, check_no integer, ord bigint, failed text)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
    u integer;
    i integer;
BEGIN
    PERFORM pg_catalog.set_config('search_path', pg_catalog.quote_ident(p_schema), true);
    FOR u IN 1 .. coalesce(pg_catalog.array_length(p_uids, 1), 0) LOOP
        PERFORM pg_catalog.set_config('fluxbase.auth_uid', coalesce(p_uids[u], ''), true),
                pg_catalog.set_config('fluxbase.auth_claims', coalesce(p_claims[u], '{}'), true),
                pg_catalog.set_config('fluxbase.auth_role', coalesce(p_roles[u], ''), true);
        FOR i IN 1 .. coalesce(pg_catalog.array_length(p_checks, 1), 0) LOOP
            BEGIN
                RETURN QUERY EXECUTE p_checks[i] USING p_rows[i]::jsonb, i, u;
            EXCEPTION WHEN OTHERS THEN
                user_no := u;
                check_no := i;
                ord := NULL;
                failed := SQLSTATE || ': ' || SQLERRM;
                RETURN NEXT;
            END;
        END LOOP;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.select_policies(text, text[]),
    fluxbase_guard.visible_rows(text, text[], text[], text[], text[], text[]) FROM PUBLIC;

-- A checker role for every existing project (new projects get theirs when provisioned). The
-- password is set right after migrating, derived from the server secret like the others'.
DO $$
DECLARE
    p record;
    ro text;
    rt text;
    setting text;
BEGIN
    FOR p IN SELECT id FROM fluxbase.projects LOOP
        ro := 'p_' || p.id || '_ro';
        rt := 'p_' || p.id || '_rt';
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = ro)
                  OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = rt);
        EXECUTE format('CREATE ROLE %I LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION '
                       'NOBYPASSRLS CONNECTION LIMIT %s', rt,
                       (SELECT rolconnlimit FROM pg_catalog.pg_roles WHERE rolname = ro));
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), rt);
        FOR setting IN SELECT unnest(s.setconfig) FROM pg_catalog.pg_db_role_setting s
                       WHERE s.setrole = ro::regrole AND s.setdatabase = 0 LOOP
            EXECUTE format('ALTER ROLE %I SET %s = %L', rt, split_part(setting, '=', 1),
                           substr(setting, length(split_part(setting, '=', 1)) + 2));
        END LOOP;
        EXECUTE format('GRANT %I TO %I', ro, rt);
        EXECUTE format('GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO %I', rt);
        EXECUTE format('GRANT EXECUTE ON FUNCTION fluxbase_guard.select_policies(text, text[]), '
                       'fluxbase_guard.visible_rows(text, text[], text[], text[], text[], text[]) TO %I', rt);
    END LOOP;
END
$$;
