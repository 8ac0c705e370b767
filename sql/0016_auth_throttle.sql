-- Login and sign-up throttling (services/throttle.py): one counter row per key, counted under a
-- row lock, so every API process and replica shares the count and a parallel burst cannot slip
-- between the check and the count. Keys name the realm (dashboard or a project), the account
-- (a user id, or a hash of an unknown email: no addresses are stored) and the client (an IPv4
-- address or an IPv6 /64). Housekeeping deletes rows whose window has passed.

CREATE TABLE IF NOT EXISTS fluxbase.auth_throttle (
    key       text PRIMARY KEY,
    hits      integer NOT NULL CHECK (hits >= 0),
    resets_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_throttle_resets_idx ON fluxbase.auth_throttle (resets_at);

-- Replaced by auth_throttle: per-IP failure rows, cleared by any success from that IP.
DROP TABLE IF EXISTS fluxbase.login_failures;
