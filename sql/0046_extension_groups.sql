-- Extension schemas through tenant groups (issue 19): create_extension used to grant USAGE on an
-- extension's schema to each of the installing project's four roles, so the schema's ACL held
-- four entries per project using it (checked whenever a tenant's search_path is resolved, and
-- rewritten whole by every grant). Each extension schema now has a NOLOGIN group per database
-- (db/privileges.extension_group: fluxbase_tenant_<hash of the database>_ext_<hash of the
-- schema>), made by the migration step that installs the extension (db/extensions.py), which
-- also gives fluxbase_guard_extensions ADMIN on it (not INHERIT, not SET) and moves the entries
-- of existing projects onto it. The project's roles are granted the group WITH INHERIT TRUE,
-- SET FALSE: the same USAGE, and no more, for the same roles. Where the group does not exist
-- (between this file and that step) the grant is the schema's, as before. Revoking removes both.

CREATE OR REPLACE FUNCTION fluxbase_guard.extension_grant(pid text, schema_name text, grant_it boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    roles text;
    members text;
    grp text := 'fluxbase_tenant_'
        || pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
               'fluxbase-tenant-group:' || pg_catalog.current_database(), 'UTF8')), 'hex'), 12)
        || '_ext_'
        || pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(schema_name, 'UTF8')), 'hex'), 8);
    grouped boolean;
BEGIN
    SELECT string_agg(pg_catalog.quote_ident(r.rolname), ', ') INTO roles
    FROM pg_catalog.pg_roles r
    WHERE r.rolname IN ('p_' || pid || '_admin', 'p_' || pid || '_rw', 'p_' || pid || '_ro', 'p_' || pid || '_rt');
    IF roles IS NULL THEN
        RETURN;
    END IF;
    grouped := EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = grp);
    IF grant_it AND grouped THEN
        EXECUTE format('GRANT %I TO %s WITH INHERIT TRUE, SET FALSE', grp, roles);
    ELSIF grant_it THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', schema_name, roles);
    ELSE
        IF grouped THEN
            SELECT string_agg(pg_catalog.quote_ident(r.rolname), ', ') INTO members
            FROM pg_catalog.pg_auth_members m
            JOIN pg_catalog.pg_roles r ON r.oid = m.member
            WHERE m.roleid = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = grp)
              AND m.grantor = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)
              AND r.rolname IN ('p_' || pid || '_admin', 'p_' || pid || '_rw', 'p_' || pid || '_ro',
                                'p_' || pid || '_rt');
            IF members IS NOT NULL THEN
                EXECUTE format('REVOKE %I FROM %s', grp, members);
            END IF;
        END IF;
        -- Entries of its own (granted before the group, not yet moved onto it).
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) x
                   JOIN pg_catalog.pg_roles r ON r.oid = x.grantee
                   WHERE n.nspname = schema_name
                     AND r.rolname IN ('p_' || pid || '_admin', 'p_' || pid || '_rw', 'p_' || pid || '_ro',
                                       'p_' || pid || '_rt')) THEN
            EXECUTE format('REVOKE USAGE ON SCHEMA %I FROM %s', schema_name, roles);
        END IF;
    END IF;
END
$$;
