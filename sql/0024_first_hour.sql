-- The first hour (issue 25): a rotated API key is told apart from an unknown one.
--
-- Rotation replaces a key's hash; the old hash is kept here (only the SHA-256, never the key)
-- so that a request with the old secret answers "rotated" instead of "not valid". Rows go with
-- their project, and with their key when it is deleted.

CREATE TABLE IF NOT EXISTS fluxbase.rotated_api_keys (
    key_hash   bytea PRIMARY KEY,
    key_id     text NOT NULL REFERENCES fluxbase.api_keys (id) ON DELETE CASCADE,
    rotated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS rotated_api_keys_key_idx ON fluxbase.rotated_api_keys (key_id);
