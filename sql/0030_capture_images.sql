-- Row images are whole rows whatever the table's columns are called. sql/0012 wrote
-- to_jsonb(n) FROM new_rows n: for a table with a column named n, `n` is that column, and the
-- event carried the column's value instead of the row (the same for `o` in DELETE). `n.*` can
-- only mean the row. Same functions otherwise (SECURITY INVOKER, search_path pinned).
CREATE OR REPLACE FUNCTION fluxbase_capture.capture_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    imgs jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) FROM new_rows n);
    IF imgs IS NOT NULL THEN
        PERFORM fluxbase_capture.write_events(TG_RELID, 'INSERT', imgs, NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    imgs jsonb[];
BEGIN
    imgs := (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*)) FROM old_rows o);
    IF imgs IS NOT NULL THEN
        PERFORM fluxbase_capture.write_events(TG_RELID, 'DELETE', imgs, imgs);
    END IF;
    RETURN NULL;
END
$$;
