-- Capture in C (issue 20): the PL/pgSQL capture trigger functions' canonical source, kept under
-- other names. `fluxbase migrate` (fluxbase/db/capture.py) decides at every run which bodies
-- fluxbase_capture.capture_insert() / capture_delete() / capture_update() get: the C ones from
-- the fluxbase_capture library (ext/fluxbase_capture) when it loads into this server and the
-- migrating role is a superuser, else these PL/pgSQL ones, copied from the functions below
-- (CREATE OR REPLACE keeps the functions' oids, so existing projects' triggers keep working).
-- The bodies are sql/0048's (INSERT, DELETE) and sql/0036's (UPDATE), unchanged; they stay
-- callable only as triggers (a trigger function cannot be called directly), and nothing
-- attaches them (bench/capture_cost.py measures them next to the C ones).

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_insert_plpgsql() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'INSERT', i.imgs, NULL)
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(n.*)) AS imgs FROM new_rows n) AS i
    WHERE i.imgs IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_delete_plpgsql() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'DELETE', i.imgs, i.imgs)
    FROM (SELECT pg_catalog.array_agg(pg_catalog.to_jsonb(o.*)) AS imgs FROM old_rows o) AS i
    WHERE i.imgs IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_update_plpgsql() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
BEGIN
    PERFORM fluxbase_capture.write_events(TG_RELID, 'UPDATE', ARRAY[pg_catalog.to_jsonb(NEW)],
                                          ARRAY[pg_catalog.to_jsonb(OLD)]);
    RETURN NULL;
END
$$;
