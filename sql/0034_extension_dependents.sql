-- DROP EXTENSION refuses while a column default, a generated column or a view uses the
-- extension (hostile review 4): their dependency rows (pg_attrdef, pg_rewrite) name no schema,
-- so sql/0023's check missed them. Their table's schema is used now. Otherwise the same function.
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
          AND CASE d.classid
                  -- Column defaults, generated columns and view rules name no schema of their
                  -- own: theirs is their table's.
                  WHEN 'pg_catalog.pg_attrdef'::pg_catalog.regclass THEN
                      (SELECT n.nspname FROM pg_catalog.pg_attrdef a
                       JOIN pg_catalog.pg_class c ON c.oid = a.adrelid
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE a.oid = d.objid)
                  WHEN 'pg_catalog.pg_rewrite'::pg_catalog.regclass THEN
                      (SELECT n.nspname FROM pg_catalog.pg_rewrite r
                       JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE r.oid = d.objid)
                  ELSE (pg_catalog.pg_identify_object(d.classid, d.objid, 0)).schema
              END = 'p_' || pid;
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
