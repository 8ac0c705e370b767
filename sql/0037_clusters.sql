-- Database clusters (issue 19, "Clusters, CloudSync-style"): the PostgreSQL servers projects live
-- on, and the instance-scoped management keys that automate their registration.
--
-- The default cluster is the control-plane database itself (its address is the runtime's own
-- FLUXBASE_DATABASE_URL, so nothing of it is stored here); it is always present and can be
-- neither changed nor removed. Other clusters store their address, the registering role and its
-- password encrypted with a key derived from FLUXBASE_SECRET_KEY (services/clusters.py); the
-- password never leaves the API.

CREATE TABLE IF NOT EXISTS fluxbase.clusters (
    id            text PRIMARY KEY,
    label         text NOT NULL,
    region        text,
    host          text,
    port          integer,
    database      text,
    username      text,
    secret        bytea,
    server_version integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (id = 'default' OR (host IS NOT NULL AND port IS NOT NULL AND database IS NOT NULL
                              AND username IS NOT NULL AND secret IS NOT NULL))
);
INSERT INTO fluxbase.clusters (id, label) VALUES ('default', 'default') ON CONFLICT DO NOTHING;
REVOKE ALL ON fluxbase.clusters FROM PUBLIC;

-- Where each project lives. Existing projects are on the default cluster.
ALTER TABLE fluxbase.projects ADD COLUMN IF NOT EXISTS cluster_id text NOT NULL DEFAULT 'default'
    REFERENCES fluxbase.clusters (id);
CREATE INDEX IF NOT EXISTS projects_cluster_idx ON fluxbase.projects (cluster_id);

-- Management keys: instance-scoped credentials for automation (cluster management), minted by an
-- instance admin, stored as SHA-256 hashes like API keys; never valid for any project's data.
CREATE TABLE IF NOT EXISTS fluxbase.management_keys (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_by  text REFERENCES fluxbase.users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at  timestamptz
);
REVOKE ALL ON fluxbase.management_keys FROM PUBLIC;
