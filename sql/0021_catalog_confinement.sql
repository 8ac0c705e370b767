-- Catalog confinement (issue 15, hostile review 1 finding 9). Every project lives in the same
-- database, and pg_catalog is readable by PUBLIC: a tenant role read other projects' function
-- bodies, column defaults, comments, policies and row counters. This file closes the catalog
-- *content* a tenant writes (code, expressions, comments, statistics) to PUBLIC, and leaves the
-- catalog *structure* open (object names, oids, owners, column names and types, ACLs): the
-- parser, `::regclass`, asyncpg's type introspection and information_schema need only that.
--
-- * Columns holding tenant content are revoked from PUBLIC, the rest granted back column by
--   column (as PostgreSQL itself does for pg_subscription), and the whole table is granted to
--   the NOLOGIN group role `fluxbase_catalog_reader`: platform roles that read catalogs (the
--   runtime role, the quota definer's owner, the owner of the definers below) are its members
--   (db/privileges.py); tenant roles never are. Every pg_node_tree column is closed, so
--   pg_get_expr(pg_node_tree, oid) — which has no privilege check — has nothing left to deparse
--   (pg_node_tree has no input function: a tenant cannot make one up).
-- * Functions that deparse an object by oid without any privilege check (pg_get_viewdef,
--   pg_get_functiondef, ...) and the per-relation statistics functions are revoked from PUBLIC,
--   as are the views built on them (whole, or their definition column only).
-- * A tenant reads its own project's deparsed defaults, constraints, indexes and policies through
--   the definers fluxbase_guard.own_*: they take the project from session_user, answer NULL for
--   any other schema's object, and deparse for the project's search_path (so the text is what the
--   tenant's own session would have printed). /api/schema, the RLS API and the realtime checker
--   use them. information_schema views read catalogs as their owner and still work for a
--   tenant's own objects, except the columns computed by a revoked function (docs/security.md).
--
-- ACLs of pg_catalog objects are per database, so this holds in this database only. Idempotent:
-- a table-level REVOKE also revokes the column grants, which are then granted again.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['fluxbase_catalog_reader', 'fluxbase_catalog_own'] LOOP
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

-- Tables: the closed columns of each (NULL: the whole table).
DO $$
DECLARE
    t record;
    open_cols text;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('pg_proc', ARRAY['prosrc', 'probin', 'prosqlbody', 'proconfig', 'proargdefaults']),
        ('pg_attrdef', ARRAY['adbin']),
        ('pg_attribute', ARRAY['attmissingval']),
        ('pg_constraint', ARRAY['conbin']),
        ('pg_index', ARRAY['indexprs', 'indpred']),
        ('pg_policy', ARRAY['polqual', 'polwithcheck']),
        ('pg_rewrite', ARRAY['ev_action', 'ev_qual']),
        ('pg_trigger', ARRAY['tgqual', 'tgargs']),
        ('pg_type', ARRAY['typdefaultbin', 'typdefault']),
        ('pg_class', ARRAY['relpartbound']),
        ('pg_partitioned_table', ARRAY['partexprs']),
        ('pg_statistic_ext', ARRAY['stxexprs']),
        ('pg_publication_rel', ARRAY['prqual']),
        ('pg_aggregate', ARRAY['agginitval', 'aggminitval']),
        ('pg_description', NULL),
        ('pg_shdescription', NULL),
        ('pg_seclabel', NULL),
        ('pg_shseclabel', NULL)
    ) AS v(tab, closed) LOOP
        EXECUTE format('REVOKE SELECT ON pg_catalog.%I FROM PUBLIC', t.tab);
        EXECUTE format('GRANT SELECT ON pg_catalog.%I TO fluxbase_catalog_reader', t.tab);
        CONTINUE WHEN t.closed IS NULL;
        SELECT string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO open_cols
        FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = ('pg_catalog.' || t.tab)::regclass AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname <> ALL (t.closed);
        EXECUTE format('GRANT SELECT (%s) ON pg_catalog.%I TO PUBLIC', open_cols, t.tab);
    END LOOP;
END
$$;

-- Views: those that show content revoked above, computed as the view's owner or by a revoked
-- function, to rows a tenant may see. The listing columns (names) stay open; NULL: the whole view.
DO $$
DECLARE
    t record;
    rel text;
    open_cols text;
BEGIN
    FOR t IN SELECT * FROM (VALUES
        ('pg_policies', ARRAY['qual', 'with_check']),
        ('pg_views', ARRAY['definition']),
        ('pg_matviews', ARRAY['definition']),
        ('pg_rules', ARRAY['definition']),
        ('pg_indexes', ARRAY['indexdef']),
        ('pg_seclabels', NULL),
        ('pg_stat_all_tables', NULL), ('pg_stat_sys_tables', NULL), ('pg_stat_user_tables', NULL),
        ('pg_stat_all_indexes', NULL), ('pg_stat_sys_indexes', NULL), ('pg_stat_user_indexes', NULL),
        ('pg_statio_all_tables', NULL), ('pg_statio_sys_tables', NULL), ('pg_statio_user_tables', NULL),
        ('pg_statio_all_indexes', NULL), ('pg_statio_sys_indexes', NULL), ('pg_statio_user_indexes', NULL),
        ('pg_statio_all_sequences', NULL), ('pg_statio_sys_sequences', NULL),
        ('pg_statio_user_sequences', NULL),
        ('pg_stat_user_functions', NULL),
        -- Filtered by USAGE on the type, which every role has on every domain by default.
        ('information_schema.domains', ARRAY['domain_default'])
    ) AS v(tab, closed) LOOP
        rel := CASE WHEN t.tab LIKE '%.%' THEN t.tab ELSE 'pg_catalog.' || t.tab END;
        EXECUTE format('REVOKE SELECT ON %s FROM PUBLIC', rel);
        EXECUTE format('GRANT SELECT ON %s TO fluxbase_catalog_reader', rel);
        CONTINUE WHEN t.closed IS NULL;
        SELECT string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO open_cols
        FROM pg_catalog.pg_attribute a
        WHERE a.attrelid = rel::regclass AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname <> ALL (t.closed);
        EXECUTE format('GRANT SELECT (%s) ON %s TO PUBLIC', open_cols, rel);
    END LOOP;
END
$$;

-- Functions: deparsers that take an oid and check nothing, and the per-relation and per-function
-- statistics counters (the pg_stat_get_xact_* ones show only this backend's own transaction and
-- stay open: the quota check uses them).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'pg_catalog'::regnamespace
          AND (p.proname IN ('pg_get_functiondef', 'pg_get_function_arguments', 'pg_get_function_arg_default',
                             'pg_get_function_sqlbody', 'pg_get_viewdef', 'pg_get_ruledef',
                             'pg_get_triggerdef', 'pg_get_indexdef', 'pg_get_constraintdef',
                             'pg_get_partkeydef', 'pg_get_partition_constraintdef',
                             'pg_get_statisticsobjdef', 'pg_get_statisticsobjdef_columns',
                             'pg_get_statisticsobjdef_expressions')
               OR (p.proname ~ '^pg_stat_get_' AND p.pronargs = 1 AND p.proargtypes[0] = 'oid'::regtype
                   AND p.proname !~ '^pg_stat_get_(xact_|db_|subscription)'))
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO fluxbase_catalog_reader', f);
    END LOOP;
END
$$;

-- A REVOKE by a role that does not own the object only warns; this must not pass silently.
DO $$
BEGIN
    IF has_column_privilege('public', 'pg_catalog.pg_proc', 'prosrc', 'SELECT')
       OR has_function_privilege('public', 'pg_catalog.pg_get_viewdef(oid)', 'EXECUTE') THEN
        RAISE EXCEPTION 'could not revoke catalog content from PUBLIC: run migrations as a superuser';
    END IF;
END
$$;

-- The calling project's schema, from session_user (a tenant cannot change it): p_<id> for the
-- project's key roles and its realtime checker, NULL for anyone else.
CREATE OR REPLACE FUNCTION fluxbase_guard.caller_schema() RETURNS text
    LANGUAGE sql STABLE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (pg_catalog.regexp_match(session_user::text, '^(p_[0-9a-f]{16})_(admin|rw|ro|rt)$'))[1]
$$;

-- Each own_* definer checks that the object lies in the caller's schema with the pinned
-- search_path, then sets the path to what a tenant session has (pg_catalog, then the project's
-- schema) for the deparse alone, so names are qualified as the tenant's own session would print
-- them. The deparse call is schema-qualified and takes only variables of built-in types, so no
-- tenant object can be resolved by it; the function's SET clause restores the path on return
-- (SET LOCAL, not set_config: the owner needs no privilege for it).
CREATE OR REPLACE FUNCTION fluxbase_guard.own_column_default(p_rel oid, p_attnum smallint) RETURNS text
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sch text := fluxbase_guard.caller_schema();
    tree pg_catalog.pg_node_tree;
BEGIN
    SELECT d.adbin INTO tree
    FROM pg_catalog.pg_attrdef d JOIN pg_catalog.pg_class c ON c.oid = d.adrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE d.adrelid = p_rel AND d.adnum = p_attnum AND n.nspname = sch;
    IF tree IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE pg_catalog.format('SET LOCAL search_path = pg_catalog, %I, pg_temp', sch);
    RETURN pg_catalog.pg_get_expr(tree, p_rel);
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_guard.own_constraint_def(p_constraint oid) RETURNS text
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sch text := fluxbase_guard.caller_schema();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k JOIN pg_catalog.pg_namespace n ON n.oid = k.connamespace
                   WHERE k.oid = p_constraint AND n.nspname = sch) THEN
        RETURN NULL;
    END IF;
    EXECUTE pg_catalog.format('SET LOCAL search_path = pg_catalog, %I, pg_temp', sch);
    RETURN pg_catalog.pg_get_constraintdef(p_constraint);
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_guard.own_index_def(p_index oid) RETURNS text
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sch text := fluxbase_guard.caller_schema();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   WHERE i.indexrelid = p_index AND n.nspname = sch) THEN
        RETURN NULL;
    END IF;
    EXECUTE pg_catalog.format('SET LOCAL search_path = pg_catalog, %I, pg_temp', sch);
    RETURN pg_catalog.pg_get_indexdef(p_index);
END
$$;

-- A policy's USING (p_with_check false) or WITH CHECK expression.
CREATE OR REPLACE FUNCTION fluxbase_guard.own_policy_expr(p_policy oid, p_with_check boolean) RETURNS text
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sch text := fluxbase_guard.caller_schema();
    tree pg_catalog.pg_node_tree;
    rel oid;
BEGIN
    SELECT CASE WHEN p_with_check THEN y.polwithcheck ELSE y.polqual END, y.polrelid INTO tree, rel
    FROM pg_catalog.pg_policy y JOIN pg_catalog.pg_class c ON c.oid = y.polrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE y.oid = p_policy AND n.nspname = sch;
    IF tree IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE pg_catalog.format('SET LOCAL search_path = pg_catalog, %I, pg_temp', sch);
    RETURN pg_catalog.pg_get_expr(tree, rel);
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.caller_schema(),
    fluxbase_guard.own_column_default(oid, smallint), fluxbase_guard.own_constraint_def(oid),
    fluxbase_guard.own_index_def(oid), fluxbase_guard.own_policy_expr(oid, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.caller_schema() TO fluxbase_catalog_own;
GRANT EXECUTE ON FUNCTION fluxbase_guard.own_column_default(oid, smallint), fluxbase_guard.own_constraint_def(oid),
    fluxbase_guard.own_index_def(oid), fluxbase_guard.own_policy_expr(oid, boolean) TO PUBLIC;
GRANT USAGE ON SCHEMA fluxbase_guard TO fluxbase_catalog_own;

-- The deparser qualifies a name unless it is visible on the search_path, and a schema the current
-- user may not use is left out of the path: the definers' owner needs USAGE on each project's
-- schema to print names as the tenant's session does. USAGE resolves names only; the definers
-- resolve none in a project schema (see above). New projects grant it at provisioning.
DO $$
DECLARE
    s text;
BEGIN
    FOR s IN SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname ~ '^p_[0-9a-f]{16}$' LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO fluxbase_catalog_own', s);
    END LOOP;
END
$$;

-- The realtime checker (sql/0008, sql/0015) read pg_policy.polqual as the checker role: it now
-- reads its project's policies through own_policy_expr. Same results, same search_path.
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
           ARRAY(SELECT coalesce(fluxbase_guard.own_policy_expr(p.oid, false), 'false')
                 FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = c.oid AND p.polpermissive AND p.polcmd IN ('r', '*')
                   AND (0::oid = ANY (p.polroles) OR EXISTS (
                        SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                        WHERE pg_catalog.pg_has_role(p_role, r.oid, 'USAGE')))
                 ORDER BY p.polname),
           ARRAY(SELECT q.e FROM (
                     SELECT fluxbase_guard.own_policy_expr(p.oid, false) AS e, p.polname
                     FROM pg_catalog.pg_policy p
                     WHERE p.polrelid = c.oid AND NOT p.polpermissive AND p.polcmd IN ('r', '*')
                       AND (0::oid = ANY (p.polroles) OR EXISTS (
                            SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                            WHERE pg_catalog.pg_has_role(p_role, r.oid, 'USAGE')))) q
                 WHERE q.e IS NOT NULL
                 ORDER BY q.polname)
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = p_schema AND c.relname = ANY (p_tables) AND c.relkind IN ('r', 'p');
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_guard.select_policies(p_schema text, p_tables text[])
RETURNS TABLE (table_name text, rls_enabled boolean, can_select boolean, permissive text[], restrictive text[])
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
#variable_conflict use_column
BEGIN
    PERFORM pg_catalog.set_config('search_path', pg_catalog.quote_ident(p_schema), true);
    RETURN QUERY
    SELECT c.relname::text, c.relrowsecurity, pg_catalog.has_table_privilege(c.oid, 'SELECT'),
           ARRAY(SELECT coalesce(fluxbase_guard.own_policy_expr(p.oid, false), 'false')
                 FROM pg_catalog.pg_policy p
                 WHERE p.polrelid = c.oid AND p.polpermissive AND p.polcmd IN ('r', '*')
                   AND (0::oid = ANY (p.polroles) OR EXISTS (
                        SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                        WHERE pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')))
                 ORDER BY p.polname),
           ARRAY(SELECT q.e FROM (
                     SELECT fluxbase_guard.own_policy_expr(p.oid, false) AS e, p.polname
                     FROM pg_catalog.pg_policy p
                     WHERE p.polrelid = c.oid AND NOT p.polpermissive AND p.polcmd IN ('r', '*')
                       AND (0::oid = ANY (p.polroles) OR EXISTS (
                            SELECT 1 FROM pg_catalog.unnest(p.polroles) r(oid)
                            WHERE pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')))) q
                 WHERE q.e IS NOT NULL
                 ORDER BY q.polname)
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = p_schema AND c.relname = ANY (p_tables) AND c.relkind IN ('r', 'p');
END
$$;
