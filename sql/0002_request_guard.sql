-- The request guard: called by tenant roles in the first round trip of every SQL request, so
-- that a key revoked, expired or a project suspended a moment ago is refused at once even when
-- the API serves the key's project and scope from its in-process cache. It reveals nothing to a
-- caller who does not already hold the key (lookup is by the key's SHA-256).

CREATE SCHEMA IF NOT EXISTS fluxbase_guard;
REVOKE ALL ON SCHEMA fluxbase_guard FROM PUBLIC;
GRANT USAGE ON SCHEMA fluxbase_guard TO PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_guard.check_key(p_key_hash bytea, p_project_id text) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    k record;
BEGIN
    SELECT a.revoked_at, a.expires_at, p.status, p.read_only INTO k
    FROM fluxbase.api_keys a JOIN fluxbase.projects p ON p.id = a.project_id
    WHERE a.key_hash = p_key_hash AND a.project_id = p_project_id;
    IF NOT FOUND OR k.revoked_at IS NOT NULL OR (k.expires_at IS NOT NULL AND k.expires_at <= now()) THEN
        RAISE EXCEPTION 'API key is no longer valid' USING ERRCODE = 'FX401';
    END IF;
    IF k.status = 'suspended' THEN
        RAISE EXCEPTION 'Project is suspended' USING ERRCODE = 'FX403';
    END IF;
    IF k.read_only THEN
        PERFORM set_config('transaction_read_only', 'on', true);
    END IF;
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.check_key(bytea, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.check_key(bytea, text) TO PUBLIC;
