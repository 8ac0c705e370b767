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

-- SECURITY INVOKER on purpose: it runs as the calling tenant role (the project's read role) with
-- that role's privileges, policies and search_path, so it can do nothing the role could not do
-- with plain SQL. One call evaluates every table of a batch for one user: the identity is set
-- for this transaction only, each check is a statement the realtime service built from the
-- table's policies (parameters: $1 the row images as a jsonb array, $2 the check number), and a
-- check that raises is reported in `failed` instead of aborting the others (fail closed for
-- that table and that user only). Query cancellation (the caller's timeout) is not caught.
CREATE OR REPLACE FUNCTION fluxbase_guard.visible_rows(
    p_uid text, p_claims text, p_role text, p_checks text[], p_rows text[]
) RETURNS TABLE (check_no integer, ord bigint, failed text)
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $$
DECLARE
    i integer;
BEGIN
    PERFORM set_config('fluxbase.auth_uid', coalesce(p_uid, ''), true),
            set_config('fluxbase.auth_claims', coalesce(p_claims, '{}'), true),
            set_config('fluxbase.auth_role', coalesce(p_role, ''), true);
    FOR i IN 1 .. coalesce(array_length(p_checks, 1), 0) LOOP
        BEGIN
            RETURN QUERY EXECUTE p_checks[i] USING p_rows[i]::jsonb, i;
        EXCEPTION WHEN OTHERS THEN
            check_no := i;
            ord := NULL;
            failed := SQLSTATE || ': ' || SQLERRM;
            RETURN NEXT;
        END;
    END LOOP;
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.visible_rows(text, text, text, text[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.visible_rows(text, text, text, text[], text[]) TO PUBLIC;
