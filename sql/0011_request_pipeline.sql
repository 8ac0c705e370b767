-- One round trip per execute-sql request. The API pipelines, up to a single Sync (so all in one
-- implicit transaction): the session reset, the request identity, the checks below and the
-- tenant's statement. A pipeline step may not return rows (the driver would take them for the
-- tenant statement's), so each check is a SELECT that returns none or raises.
--
-- Auth epochs. The API caches a key's state (revoked, expiry, scope, project status, read-only)
-- together with its project's epoch, read in the same snapshot. Every change to that state
-- bumps the epoch in the same transaction (triggers below), so a request whose cached epoch is
-- no longer current is refused inside its own transaction (FXEPO) and the API re-checks the
-- key with fluxbase_guard.check_key. A revocation therefore still takes effect at once, at the
-- cost of one primary-key lookup instead of a plpgsql call per request.

CREATE TABLE IF NOT EXISTS fluxbase_guard.auth_epochs (
    project_id text PRIMARY KEY REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    epoch      bigint NOT NULL DEFAULT 1
);
INSERT INTO fluxbase_guard.auth_epochs (project_id) SELECT id FROM fluxbase.projects ON CONFLICT DO NOTHING;

-- Tenant roles read it in the request pipeline, each only its own project's row (role names
-- are p_<project id>_<scope>; project ids are fixed-length hex, so no prefix is another's).
ALTER TABLE fluxbase_guard.auth_epochs ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS own_project ON fluxbase_guard.auth_epochs;
CREATE POLICY own_project ON fluxbase_guard.auth_epochs FOR SELECT
    USING (starts_with(session_user::text, 'p_' || project_id || '_'));
REVOKE ALL ON fluxbase_guard.auth_epochs FROM PUBLIC;
GRANT SELECT ON fluxbase_guard.auth_epochs TO PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase.bump_auth_epoch() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog
AS $$
BEGIN
    IF TG_TABLE_NAME = 'projects' THEN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO fluxbase_guard.auth_epochs (project_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
        ELSE
            UPDATE fluxbase_guard.auth_epochs SET epoch = epoch + 1 WHERE project_id = NEW.id;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE fluxbase_guard.auth_epochs SET epoch = epoch + 1 WHERE project_id = OLD.project_id;
    ELSE
        UPDATE fluxbase_guard.auth_epochs SET epoch = epoch + 1 WHERE project_id IN (OLD.project_id, NEW.project_id);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS auth_epoch_insert ON fluxbase.projects;
CREATE TRIGGER auth_epoch_insert AFTER INSERT ON fluxbase.projects
    FOR EACH ROW EXECUTE FUNCTION fluxbase.bump_auth_epoch();

DROP TRIGGER IF EXISTS auth_epoch_update ON fluxbase.projects;
CREATE TRIGGER auth_epoch_update AFTER UPDATE ON fluxbase.projects
    FOR EACH ROW
    WHEN ((OLD.status, OLD.read_only, OLD.rate_limit_requests, OLD.rate_limit_window_s, OLD.db_quota_bytes)
          IS DISTINCT FROM
          (NEW.status, NEW.read_only, NEW.rate_limit_requests, NEW.rate_limit_window_s, NEW.db_quota_bytes))
    EXECUTE FUNCTION fluxbase.bump_auth_epoch();

-- Not last_used_at: that changes once a minute per key in use and says nothing about access.
DROP TRIGGER IF EXISTS auth_epoch_update ON fluxbase.api_keys;
CREATE TRIGGER auth_epoch_update AFTER UPDATE ON fluxbase.api_keys
    FOR EACH ROW
    WHEN ((OLD.project_id, OLD.key_hash, OLD.scope, OLD.allowed_origins, OLD.rate_limit_requests,
           OLD.rate_limit_window_s, OLD.expires_at, OLD.revoked_at, OLD.require_user_auth)
          IS DISTINCT FROM
          (NEW.project_id, NEW.key_hash, NEW.scope, NEW.allowed_origins, NEW.rate_limit_requests,
           NEW.rate_limit_window_s, NEW.expires_at, NEW.revoked_at, NEW.require_user_auth))
    EXECUTE FUNCTION fluxbase.bump_auth_epoch();

DROP TRIGGER IF EXISTS auth_epoch_delete ON fluxbase.api_keys;
CREATE TRIGGER auth_epoch_delete AFTER DELETE ON fluxbase.api_keys
    FOR EACH ROW EXECUTE FUNCTION fluxbase.bump_auth_epoch();

-- Raise `p_code` (a pipeline check's refusal). Anyone may call it: it can only fail the
-- caller's own statement.
CREATE OR REPLACE FUNCTION fluxbase_guard.refuse(p_code text) RETURNS boolean
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog
AS $$
BEGIN
    RAISE EXCEPTION 'request refused (%)', p_code USING ERRCODE = p_code;
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.refuse(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.refuse(text) TO PUBLIC;
