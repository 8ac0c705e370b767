-- The tenant groups' prefix, stored in the database (hostile review 14, issue 19). The groups
-- (db/privileges.GROUP_PRIVILEGES and the extension groups of sql/0046) are roles, cluster-wide,
-- named fluxbase_tenant_<h>_<kind>, and <h> used to be computed from the database's NAME: an
-- operator who renamed database A to B and made a new A (or dropped A, whose project roles
-- survive, and made a new one) and migrated it gave the new A the same group names, so every
-- project role of the old database was already a member of the new one's groups and had CONNECT
-- (and more) on it. <h> is now chosen once, here, and read by every computation of a group's
-- name (db/privileges.group_prefix, fluxbase_guard.extension_grant below):
--   * the prefix of the tenant groups that already hold CONNECT on this database (an entry of its
--     own ACL, granted by the privilege step): an existing deployment keeps its groups, whatever
--     its name is now;
--   * else the one computed from the name, as before, if no role of that prefix exists;
--   * else (the name's groups are another database's, or an old one's) a fresh random one.
-- Migrations run as a superuser in one transaction under the ledger's lock (db/migrate.py), so
-- two migrators of one database choose once. Two databases choosing at once choose apart (their
-- names differ; a random prefix collides with odds of 2^-48), so pg_authid is not locked here
-- (that would hold every CREATE ROLE of the server until the run commits). The groups are
-- created by the privilege step that follows. Only the superuser writes the row: its owner is
-- fluxbase_owner (NOLOGIN), the runtime may only read it (db/privileges._runtime_role revokes
-- what its grant on every control-plane table gives), and no tenant may use the schema.

CREATE TABLE fluxbase.tenant_group_prefix (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    prefix    text NOT NULL CHECK (prefix ~ '^[0-9a-f]{12}$')
);

DO $$
DECLARE
    named text := pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
        'fluxbase-tenant-group:' || pg_catalog.current_database(), 'UTF8')), 'hex'), 12);
    h text;
BEGIN
    SELECT pg_catalog.substr(g.rolname, 17, 12) INTO h
    FROM pg_catalog.pg_database d, pg_catalog.aclexplode(d.datacl) x
    JOIN pg_catalog.pg_roles g ON g.oid = x.grantee
    WHERE d.datname = pg_catalog.current_database() AND x.privilege_type = 'CONNECT'
      AND g.rolname ~ '^fluxbase_tenant_[0-9a-f]{12}_connect$'
    ORDER BY pg_catalog.substr(g.rolname, 17, 12) = named DESC, 1
    LIMIT 1;
    IF h IS NULL THEN
        h := named;
        WHILE EXISTS (SELECT 1 FROM pg_catalog.pg_roles
                      WHERE pg_catalog.starts_with(rolname, 'fluxbase_tenant_' || h || '_')) LOOP
            h := pg_catalog.left(pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', ''), 12);
        END LOOP;
    END IF;
    INSERT INTO fluxbase.tenant_group_prefix (prefix) VALUES (h);
END
$$;

-- The extension definers' owner computes its groups' names (fluxbase_guard.extension_grant).
GRANT SELECT ON fluxbase.tenant_group_prefix TO fluxbase_guard_extensions;

CREATE OR REPLACE FUNCTION fluxbase_guard.extension_grant(pid text, schema_name text, grant_it boolean)
    RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    roles text;
    members text;
    grp text := 'fluxbase_tenant_'
        || (SELECT p.prefix FROM fluxbase.tenant_group_prefix p)
        || '_ext_'
        || pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(schema_name, 'UTF8')), 'hex'), 8);
    grouped boolean;
BEGIN
    IF grp IS NULL THEN
        RAISE EXCEPTION 'fluxbase.tenant_group_prefix holds no row';
    END IF;
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
