-- End-user auth: project users with refresh-token sessions, per-project identity settings
-- (external JWTs), API keys that require an end-user token, and the lockdown that keeps
-- auth.uid() unforgeable by read and readwrite roles.

ALTER TABLE fluxbase.api_keys ADD COLUMN IF NOT EXISTS require_user_auth boolean NOT NULL DEFAULT false;

-- One row per project that changed its settings; no row means the defaults (registration
-- open, no external identity provider).
CREATE TABLE IF NOT EXISTS fluxbase.project_auth_settings (
    project_id             text PRIMARY KEY REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    registration_open      boolean NOT NULL DEFAULT true,
    jwt_secret             text,
    jwks_uri               text,
    jwt_allowed_issuers    text[] NOT NULL DEFAULT '{}',
    jwt_expected_audiences text[] NOT NULL DEFAULT '{}',
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS fluxbase.project_users (
    id            text PRIMARY KEY,
    project_id    text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    email         text NOT NULL,
    password_hash text NOT NULL,
    display_name  text NOT NULL DEFAULT '',
    disabled_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS project_users_email_key ON fluxbase.project_users (project_id, lower(email));

-- A session is what an access token's `sid` names: revoking it ends its access and refresh tokens.
CREATE TABLE IF NOT EXISTS fluxbase.project_user_sessions (
    id         text PRIMARY KEY,
    user_id    text NOT NULL REFERENCES fluxbase.project_users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX IF NOT EXISTS project_user_sessions_user_idx ON fluxbase.project_user_sessions (user_id);

-- Refresh tokens are stored as SHA-256 and used once; a used one presented again revokes its
-- session (the token was stolen, or the client is confused: either way, log in again).
CREATE TABLE IF NOT EXISTS fluxbase.project_user_refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id text NOT NULL REFERENCES fluxbase.project_user_sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    used_at    timestamptz
);
CREATE INDEX IF NOT EXISTS project_user_refresh_session_idx ON fluxbase.project_user_refresh_tokens (session_id);

-- auth.uid() reads a request-local setting. Any role that can call set_config() or run a DO
-- block could change it in the middle of its own statement (a MATERIALIZED CTE, or EXECUTE
-- 'SET LOCAL ...' in plpgsql) and read as another end user. The API now sets identity with
-- SET LOCAL statements, so only project admin roles (which own the tables and bypass RLS
-- anyway) and the service role keep set_config and plpgsql. A single SET statement cannot be
-- combined with a query in one request, and the session reset undoes it.
REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO CURRENT_USER;
REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC;
GRANT USAGE ON LANGUAGE plpgsql TO CURRENT_USER;

-- A REVOKE by a role that does not own the object only warns and changes nothing; this must
-- not pass silently (the migration role must be a superuser, as for 0005's event triggers).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
               WHERE p.oid = 'pg_catalog.set_config(text, text, boolean)'::regprocedure AND a.grantee = 0)
       OR EXISTS (SELECT 1 FROM pg_language l, aclexplode(coalesce(l.lanacl, acldefault('l', l.lanowner))) a
                  WHERE l.lanname = 'plpgsql' AND a.grantee = 0) THEN
        RAISE EXCEPTION 'could not revoke set_config/plpgsql from PUBLIC: run migrations as a superuser';
    END IF;
END
$$;

DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT id FROM fluxbase.projects LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = format('p_%s_admin', p.id)) THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO %I',
                           format('p_%s_admin', p.id));
            EXECUTE format('GRANT USAGE ON LANGUAGE plpgsql TO %I', format('p_%s_admin', p.id));
        END IF;
    END LOOP;
END
$$;

-- The user-session guard: /api/execute-sql calls it in the request's first round trip (like
-- check_key), so a project user's logout, revoked sessions or disabled account take effect on
-- the very next request without a control-plane query. It only answers for the calling
-- project's own roles, and only to a caller who already holds the session id (128 random bits).
CREATE OR REPLACE FUNCTION fluxbase_guard.check_user_session(p_session_id text, p_user_id text, p_project_id text)
    RETURNS void
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    r record;
BEGIN
    IF left(session_user::text, length(p_project_id) + 3) <> 'p_' || p_project_id || '_' THEN
        RAISE EXCEPTION 'user session belongs to another project' USING ERRCODE = 'FXU01';
    END IF;
    SELECT s.revoked_at, u.disabled_at INTO r
    FROM fluxbase.project_user_sessions s JOIN fluxbase.project_users u ON u.id = s.user_id
    WHERE s.id = p_session_id AND u.id = p_user_id AND u.project_id = p_project_id;
    IF NOT FOUND OR r.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION 'user session revoked' USING ERRCODE = 'FXU01';
    END IF;
    IF r.disabled_at IS NOT NULL THEN
        RAISE EXCEPTION 'user disabled' USING ERRCODE = 'FXU02';
    END IF;
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.check_user_session(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.check_user_session(text, text, text) TO PUBLIC;
