-- Realtime capture (issue 20, hostile review 27): the PL/pgSQL capture leaves PostgreSQL 18's
-- virtual generated columns out of its images. Triggers see those columns as null (NEW, OLD and
-- transition tables), and imaged as null they could pass a SELECT policy that their value would
-- not: the realtime gate (rls.check_sql) evaluates end users' policies on the image, and refuses
-- an image that lacks a key a policy needs. The C capture computes them (ext/fluxbase_capture)
-- and leaves out only a value that fails to compute. These are the canonical PL/pgSQL bodies
-- that `fluxbase migrate` copies into fluxbase_capture.capture_insert() / capture_delete() /
-- capture_update() where the C library does not load (fluxbase/db/capture.py); on PostgreSQL
-- before 18 no column is virtual and the images are unchanged.

CREATE OR REPLACE FUNCTION fluxbase_capture.uncomputed_columns(p_table regclass) RETURNS text[]
    LANGUAGE sql STABLE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(pg_catalog.array_agg(a.attname::text), '{}'::text[])
    FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = p_table AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
      AND a.attgenerated OPERATOR(pg_catalog.=) 'v'
$$;
GRANT EXECUTE ON FUNCTION fluxbase_capture.uncomputed_columns(regclass) TO PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_insert_plpgsql() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'INSERT', i.imgs, NULL)
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*) OPERATOR(pg_catalog.-) u.cols) AS imgs
          FROM new_rows n,
               (SELECT fluxbase_capture.uncomputed_columns(TG_RELID) AS cols) AS u) AS i
    WHERE i.imgs IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_delete_plpgsql() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'DELETE', i.imgs, i.imgs)
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*) OPERATOR(pg_catalog.-) u.cols) AS imgs
          FROM old_rows o,
               (SELECT fluxbase_capture.uncomputed_columns(TG_RELID) AS cols) AS u) AS i
    WHERE i.imgs IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_update_plpgsql() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
DECLARE
    cols text[] := fluxbase_capture.uncomputed_columns(TG_RELID);
BEGIN
    PERFORM fluxbase_capture.write_events(
        TG_RELID, 'UPDATE',
        ARRAY[pg_catalog.to_jsonb(NEW) OPERATOR(pg_catalog.-) cols],
        ARRAY[pg_catalog.to_jsonb(OLD) OPERATOR(pg_catalog.-) cols]);
    RETURN NULL;
END
$$;
