-- Realtime authorization equal to SQL's (issue 15). A subscriber receives only rows its
-- credential could SELECT: read keys as the read role, readwrite keys as the readwrite role
-- (grants and policies, anonymous identity), end users by RLS as that user with the role of the
-- key that admitted them. The realtime checker role `p_<id>_rt` (sql/0008) evaluates the
-- policies; it now does so *as* the subscriber's role (SET ROLE), so current_user, privileges and
-- the policies that apply are exactly those of a SQL request with that key. Nothing here is
-- SECURITY DEFINER: tenant policies run with a tenant role's rights only.

-- Both functions may only be called on a checker role's own session for its own project, and
-- only to evaluate as that project's read or readwrite role (the roles it may SET ROLE to).
CREATE OR REPLACE FUNCTION fluxbase_guard.checker_role_ok(p_schema text, p_role text) RETURNS void
    LANGUAGE plpgsql STABLE SECURITY INVOKER
    SET search_path = pg_catalog
AS $$
BEGIN
    IF p_schema !~ '^p_[0-9a-f]{16}$' OR session_user::text <> p_schema || '_rt'
       OR p_role NOT IN (p_schema || '_ro', p_schema || '_rw') THEN
        RAISE EXCEPTION 'realtime checks run only on the project''s checker role' USING ERRCODE = '42501';
    END IF;
END
$$;

-- The tables' SELECT privilege and SELECT policies as they apply to `p_role`: schema USAGE and
-- table-level SELECT (a role with column grants only receives nothing: whole rows are sent),
-- and the quals of the policies whose roles include PUBLIC or a role `p_role` has the privileges
-- of (as PostgreSQL's RLS decides), deparsed for the project's search_path.
CREATE OR REPLACE FUNCTION fluxbase_guard.scope_policies(p_schema text, p_tables text[], p_role text)
RETURNS TABLE (table_name text, rls_enabled boolean, can_select boolean, permissive text[], restrictive text[])
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
BEGIN
    PERFORM fluxbase_guard.checker_role_ok(p_schema, p_role);
    PERFORM pg_catalog.set_config('search_path', pg_catalog.quote_ident(p_schema), true);
    RETURN QUERY
    SELECT c.relname::text, c.relrowsecurity,
           pg_catalog.has_schema_privilege(p_role, n.oid, 'USAGE')
               AND pg_catalog.has_table_privilege(p_role, c.oid, 'SELECT'),
           ARRAY(SELECT coalesce(pg_catalog.pg_get_expr(p.polqual, p.polrelid), 'false')
                 FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = c.oid AND p.polpermissive AND p.polcmd IN ('r', '*')
                   AND (0::oid = ANY (p.polroles) OR EXISTS (
                        SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                        WHERE pg_catalog.pg_has_role(p_role, r.oid, 'USAGE')))
                 ORDER BY p.polname),
           ARRAY(SELECT pg_catalog.pg_get_expr(p.polqual, p.polrelid)
                 FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = c.oid AND NOT p.polpermissive AND p.polcmd IN ('r', '*')
                   AND p.polqual IS NOT NULL
                   AND (0::oid = ANY (p.polroles) OR EXISTS (
                        SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                        WHERE pg_catalog.pg_has_role(p_role, r.oid, 'USAGE')))
                 ORDER BY p.polname)
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = p_schema AND c.relname = ANY (p_tables) AND c.relkind IN ('r', 'p');
END
$$;

-- As fluxbase_guard.visible_rows (sql/0008), but every user's checks run as `p_role`: before
-- each user the role, the search_path and the identity are set again with SET LOCAL statements
-- (the subscriber's role may not call set_config; a SET of these settings needs no privilege),
-- so what one user's policy code changed never carries over to the next user.
CREATE OR REPLACE FUNCTION fluxbase_guard.visible_rows_as(
    p_schema text, p_role text, p_uids text[], p_claims text[], p_roles text[], p_checks text[], p_rows text[]
) RETURNS TABLE (user_no integer, check_no integer, ord bigint, failed text)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
    u integer;
    i integer;
BEGIN
    PERFORM fluxbase_guard.checker_role_ok(p_schema, p_role);
    FOR u IN 1 .. coalesce(pg_catalog.array_length(p_uids, 1), 0) LOOP
        EXECUTE pg_catalog.format('SET LOCAL ROLE %I', p_role);
        EXECUTE pg_catalog.format('SET LOCAL search_path = %I', p_schema);
        EXECUTE pg_catalog.format('SET LOCAL fluxbase.auth_uid = %L', coalesce(p_uids[u], ''));
        EXECUTE pg_catalog.format('SET LOCAL fluxbase.auth_claims = %L', coalesce(p_claims[u], '{}'));
        EXECUTE pg_catalog.format('SET LOCAL fluxbase.auth_role = %L', coalesce(p_roles[u], ''));
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

REVOKE ALL ON FUNCTION fluxbase_guard.checker_role_ok(text, text),
    fluxbase_guard.scope_policies(text, text[], text),
    fluxbase_guard.visible_rows_as(text, text, text[], text[], text[], text[], text[]) FROM PUBLIC;

-- Every existing checker role may SET ROLE to its project's readwrite role (it already may to the
-- read role, whose privileges it inherits) without inheriting its privileges, and may call the
-- functions above. New projects get the same from fluxbase.services.realtime.provision_checker.
DO $$
DECLARE
    p record;
    rt text;
BEGIN
    FOR p IN SELECT id FROM fluxbase.projects LOOP
        rt := 'p_' || p.id || '_rt';
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = rt)
                  OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'p_' || p.id || '_rw');
        EXECUTE format('GRANT %I TO %I WITH INHERIT FALSE, SET TRUE', 'p_' || p.id || '_rw', rt);
        EXECUTE format('GRANT EXECUTE ON FUNCTION fluxbase_guard.checker_role_ok(text, text), '
                       'fluxbase_guard.scope_policies(text, text[], text), '
                       'fluxbase_guard.visible_rows_as(text, text, text[], text[], text[], text[], text[]) '
                       'TO %I', rt);
    END LOOP;
END
$$;

-- Per-project retention marks. Broadcasts are bounded per project (housekeeping keeps each
-- project's newest ones), so one project's broadcasts never push another project's history out
-- of the outbox; trimming a project's broadcasts moves only that project's mark, and a `since`
-- older than max(global mark, project mark) answers resync_required.
CREATE TABLE IF NOT EXISTS fluxbase.event_retention_projects (
    project_id     text PRIMARY KEY REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    trimmed_to_xid xid8 NOT NULL,
    trimmed_to_id  bigint NOT NULL
);
