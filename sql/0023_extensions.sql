-- PostgreSQL extensions per project (issue 22).
--
-- An extension is per database, and every project lives in this one database: so each allowed
-- extension is installed once, by the migration role (a superuser, at migration time only:
-- db/extensions.py), into a schema of its own (`ext_<name>`) owned by fluxbase_owner, in which
-- no tenant may create or replace anything. "Installing" it in a project grants that project's
-- roles USAGE on the schema (their search_path lists every extension schema; PostgreSQL skips a
-- schema its user may not use), so a second project neither sees nor reaches it. No extension
-- script ever runs at request time, and none runs with a tenant object on its search_path.
--
-- The grants are made by the definer functions below, owned by a NOLOGIN role that holds only
-- the grant option on the extension schemas: a tenant's `CREATE EXTENSION vector` (rewritten by
-- tenancy/statements.py to a call of create_extension) is then part of the tenant's own
-- transaction, all or nothing with the rest of a batch, script or import.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'fluxbase_guard_extensions') THEN
        BEGIN
            CREATE ROLE fluxbase_guard_extensions NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                NOREPLICATION NOBYPASSRLS NOINHERIT;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$;

-- The instance's allow-list as the post-migration step found it on this server: one row per
-- extension Fluxbase knows, available or not (with the reason), written by db/extensions.py.
CREATE TABLE IF NOT EXISTS fluxbase.extensions (
    name text PRIMARY KEY,
    schema_name text NOT NULL,
    requires text[] NOT NULL DEFAULT '{}',
    version text,
    available boolean NOT NULL DEFAULT false,
    reason text NOT NULL,
    unavailable_reason text,
    position int NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS fluxbase.project_extensions (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name text NOT NULL REFERENCES fluxbase.extensions (name),
    installed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, name)
);

GRANT USAGE ON SCHEMA fluxbase, fluxbase_guard TO fluxbase_guard_extensions;
GRANT SELECT (name, schema_name, requires, available, position) ON fluxbase.extensions
    TO fluxbase_guard_extensions;
GRANT SELECT, INSERT, DELETE ON fluxbase.project_extensions TO fluxbase_guard_extensions;
GRANT EXECUTE ON FUNCTION fluxbase_guard.tenant_project() TO fluxbase_guard_extensions;

-- The names a message lists as allowed on this instance.
CREATE OR REPLACE FUNCTION fluxbase_guard.allowed_extensions() RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(string_agg(e.name, ', ' ORDER BY e.position, e.name), 'none')
    FROM fluxbase.extensions e WHERE e.available
$$;

-- Grant or revoke USAGE on one extension's schema to the roles of a project (those that exist).
CREATE OR REPLACE FUNCTION fluxbase_guard.extension_grant(pid text, schema_name text, grant_it boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    roles text;
BEGIN
    SELECT string_agg(pg_catalog.quote_ident(r.rolname), ', ') INTO roles
    FROM pg_catalog.pg_roles r
    WHERE r.rolname IN ('p_' || pid || '_admin', 'p_' || pid || '_rw', 'p_' || pid || '_ro', 'p_' || pid || '_rt');
    IF roles IS NULL THEN
        RETURN;
    END IF;
    IF grant_it THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', schema_name, roles);
    ELSE
        EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM %s', schema_name, roles);
    END IF;
END
$$;

-- CREATE EXTENSION [IF NOT EXISTS] <name> for the calling project (its admin role only):
-- the extensions it requires are installed with it, as CASCADE would.
CREATE OR REPLACE FUNCTION fluxbase_guard.create_extension(ext text, if_not_exists boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pid text := fluxbase_guard.tenant_project();
    e record;
    todo text[];
    n text;
BEGIN
    IF session_user::text <> 'p_' || pid || '_admin' THEN
        RAISE EXCEPTION 'only an admin key may install extensions' USING ERRCODE = '42501';
    END IF;
    SELECT x.schema_name, x.requires INTO e FROM fluxbase.extensions x WHERE x.name = ext AND x.available;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'extension "%" is not allowed on this Fluxbase instance (allowed: %)',
            ext, fluxbase_guard.allowed_extensions() USING ERRCODE = '42501',
            HINT = 'GET /api/projects/{id}/extensions lists them with the reason each is safe to offer.';
    END IF;
    IF EXISTS (SELECT 1 FROM fluxbase.project_extensions p WHERE p.project_id = pid AND p.name = ext) THEN
        IF if_not_exists THEN
            RAISE NOTICE 'extension "%" already exists, skipping', ext;
            RETURN;
        END IF;
        RAISE EXCEPTION 'extension "%" already exists', ext USING ERRCODE = '42710';
    END IF;
    todo := ARRAY[ext];
    WHILE cardinality(todo) > 0 LOOP
        n := todo[1];
        todo := todo[2:];
        CONTINUE WHEN EXISTS (SELECT 1 FROM fluxbase.project_extensions p WHERE p.project_id = pid AND p.name = n);
        SELECT x.schema_name, x.requires INTO e FROM fluxbase.extensions x WHERE x.name = n AND x.available;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'extension "%" requires "%", which is not available', ext, n USING ERRCODE = '42501';
        END IF;
        PERFORM fluxbase_guard.extension_grant(pid, e.schema_name, true);
        INSERT INTO fluxbase.project_extensions (project_id, name) VALUES (pid, n);
        todo := todo || e.requires;
    END LOOP;
END
$$;

-- DROP EXTENSION [IF EXISTS] <names> for the calling project: refused while the project's own
-- objects (columns, indexes, functions, ...) or another installed extension depend on it.
CREATE OR REPLACE FUNCTION fluxbase_guard.drop_extensions(exts text[], if_exists boolean, cascade boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pid text := fluxbase_guard.tenant_project();
    ext text;
    e record;
    users text;
    deps text;
BEGIN
    IF session_user::text <> 'p_' || pid || '_admin' THEN
        RAISE EXCEPTION 'only an admin key may remove extensions' USING ERRCODE = '42501';
    END IF;
    IF cascade THEN
        RAISE EXCEPTION 'DROP EXTENSION ... CASCADE is not supported'
            USING ERRCODE = '0A000', HINT = 'Drop the objects that use the extension first.';
    END IF;
    FOREACH ext IN ARRAY exts LOOP
        IF NOT EXISTS (SELECT 1 FROM fluxbase.project_extensions p WHERE p.project_id = pid AND p.name = ext) THEN
            IF if_exists THEN
                RAISE NOTICE 'extension "%" does not exist, skipping', ext;
                CONTINUE;
            END IF;
            RAISE EXCEPTION 'extension "%" does not exist', ext USING ERRCODE = '42704';
        END IF;
        SELECT string_agg(x.name, ', ' ORDER BY x.name) INTO users
        FROM fluxbase.project_extensions p JOIN fluxbase.extensions x ON x.name = p.name
        WHERE p.project_id = pid AND ext = ANY (x.requires) AND NOT x.name = ANY (exts);
        IF users IS NOT NULL THEN
            RAISE EXCEPTION 'cannot drop extension % because extension % requires it', ext, users
                USING ERRCODE = '2BP01';
        END IF;
        SELECT x.schema_name, x.requires INTO e FROM fluxbase.extensions x WHERE x.name = ext;
        -- The project's objects that depend on a member of the extension (or on its array types).
        SELECT string_agg(DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
        INTO deps
        FROM pg_catalog.pg_extension x
        JOIN pg_catalog.pg_depend m ON m.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
            AND m.refobjid = x.oid AND m.deptype = 'e'
        JOIN pg_catalog.pg_depend d ON d.refclassid = m.classid AND d.refobjid = m.objid
            AND d.deptype IN ('n', 'a')
        WHERE x.extname = ext
          AND (pg_catalog.pg_identify_object(d.classid, d.objid, 0)).schema = 'p_' || pid;
        IF deps IS NOT NULL THEN
            RAISE EXCEPTION 'cannot drop extension % because other objects depend on it', ext
                USING ERRCODE = '2BP01', DETAIL = pg_catalog.left(deps, 500),
                HINT = 'Drop the objects that use the extension first.';
        END IF;
        PERFORM fluxbase_guard.extension_grant(pid, e.schema_name, false);
        DELETE FROM fluxbase.project_extensions p WHERE p.project_id = pid AND p.name = ext;
    END LOOP;
END
$$;

-- Project deletion (runtime role only): revoke what create_extension granted the project's
-- roles, so they can be dropped.
CREATE OR REPLACE FUNCTION fluxbase_guard.forget_extensions(pid text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s text;
BEGIN
    IF pid !~ '^[0-9a-f]{16}$' THEN
        RAISE EXCEPTION 'not a project id' USING ERRCODE = '22023';
    END IF;
    FOR s IN SELECT x.schema_name FROM fluxbase.extensions x
             WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.nspname = x.schema_name) LOOP
        PERFORM fluxbase_guard.extension_grant(pid, s, false);
    END LOOP;
    DELETE FROM fluxbase.project_extensions p WHERE p.project_id = pid;
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.allowed_extensions(), fluxbase_guard.extension_grant(text, text, boolean),
    fluxbase_guard.create_extension(text, boolean), fluxbase_guard.drop_extensions(text[], boolean, boolean),
    fluxbase_guard.forget_extensions(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.allowed_extensions(), fluxbase_guard.extension_grant(text, text, boolean)
    TO fluxbase_guard_extensions;
-- Admin roles only, checked inside as well (the functions take the project from session_user).
GRANT EXECUTE ON FUNCTION fluxbase_guard.create_extension(text, boolean),
    fluxbase_guard.drop_extensions(text[], boolean, boolean) TO PUBLIC;
ALTER FUNCTION fluxbase_guard.create_extension(text, boolean) OWNER TO fluxbase_guard_extensions;
ALTER FUNCTION fluxbase_guard.drop_extensions(text[], boolean, boolean) OWNER TO fluxbase_guard_extensions;
ALTER FUNCTION fluxbase_guard.forget_extensions(text) OWNER TO fluxbase_guard_extensions;
