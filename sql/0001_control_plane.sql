-- Control plane: accounts, sessions, projects, members, API keys; the shared `auth` schema.
-- Owned by the service role. Tenants get nothing here but the auth.* helper functions.

CREATE SCHEMA IF NOT EXISTS fluxbase;
REVOKE ALL ON SCHEMA fluxbase FROM PUBLIC;

-- Tenants never connect to anything but their own schema; CONNECT is granted per project role.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
END
$$;
REVOKE ALL ON SCHEMA public FROM PUBLIC;

CREATE TABLE IF NOT EXISTS fluxbase.users (
    id                text PRIMARY KEY,
    email             text NOT NULL,
    password_hash     text NOT NULL,
    display_name      text NOT NULL DEFAULT '',
    is_instance_admin boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS users_email_lower_key ON fluxbase.users (lower(email));

CREATE TABLE IF NOT EXISTS fluxbase.sessions (
    id         text PRIMARY KEY,
    user_id    text NOT NULL REFERENCES fluxbase.users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX IF NOT EXISTS sessions_user_idx ON fluxbase.sessions (user_id);

CREATE TABLE IF NOT EXISTS fluxbase.login_failures (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_ip text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS login_failures_ip_idx ON fluxbase.login_failures (client_ip, failed_at);

CREATE TABLE IF NOT EXISTS fluxbase.projects (
    id                  text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{16}$'),
    name                text NOT NULL,
    owner_id            text REFERENCES fluxbase.users (id) ON DELETE SET NULL,
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    read_only           boolean NOT NULL DEFAULT false,
    rate_limit_requests integer CHECK (rate_limit_requests > 0),
    rate_limit_window_s integer CHECK (rate_limit_window_s > 0),
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS fluxbase.project_members (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    user_id    text NOT NULL REFERENCES fluxbase.users (id) ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('admin', 'developer', 'viewer')),
    joined_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX IF NOT EXISTS project_members_user_idx ON fluxbase.project_members (user_id);

CREATE TABLE IF NOT EXISTS fluxbase.api_keys (
    id                  text PRIMARY KEY,
    project_id          text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name                text NOT NULL,
    prefix              text NOT NULL,
    key_hash            bytea NOT NULL UNIQUE,
    scope               text NOT NULL CHECK (scope IN ('read', 'readwrite', 'admin')),
    allowed_origins     text[] NOT NULL DEFAULT '{}',
    rate_limit_requests integer CHECK (rate_limit_requests > 0),
    rate_limit_window_s integer CHECK (rate_limit_window_s > 0),
    created_by          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    last_used_at        timestamptz,
    expires_at          timestamptz,
    revoked_at          timestamptz
);
CREATE INDEX IF NOT EXISTS api_keys_project_idx ON fluxbase.api_keys (project_id);

-- Identity for Row Level Security: set per request with set_config(..., true).
CREATE SCHEMA IF NOT EXISTS auth;
GRANT USAGE ON SCHEMA auth TO PUBLIC;

CREATE OR REPLACE FUNCTION auth.uid() RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog
AS $$ SELECT nullif(current_setting('fluxbase.auth_uid', true), '') $$;

CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog
AS $$ SELECT coalesce(nullif(current_setting('fluxbase.auth_claims', true), '')::jsonb, '{}'::jsonb) $$;

CREATE OR REPLACE FUNCTION auth.role() RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog
AS $$ SELECT nullif(current_setting('fluxbase.auth_role', true), '') $$;

GRANT EXECUTE ON FUNCTION auth.uid(), auth.jwt(), auth.role() TO PUBLIC;
