-- Replicas that agree (issue 19).
--
-- 1. Request rate limits shared by every API process (fluxbase/ratelimit.py SharedRateLimiter).
--    A process does not count each request here: it leases a slice of a name's window (one
--    token for limits under 200, about 1% of the limit above) and spends it locally. Each lease
--    is one element of the name's row: how many tokens, and until when (database clock, epoch
--    seconds) they count. A lease counts from its grant until grant + hold + window, so a token
--    spent at any moment of the hold still counts for a full window after it (a one-token lease
--    has no hold: the request that took it is admitted at the grant): no window of
--    `window` seconds ever holds more than `limit` spent tokens across all replicas. When the
--    process leases again it hands the previous lease back: the tokens it did not spend stop
--    counting, and the spent ones count until the last spend + window only.
--    UNLOGGED: a crash empties the table, which forgets at most one window of counts.
-- 2. A control-plane doorbell: revoking, rotating or deleting a key, suspending or deleting a
--    project (or changing a rate limit or the read-only flag) ring `fluxbase_control`; every API
--    replica drops its cached keys and every realtime replica re-checks its subscribers'
--    credentials at once (the payload is never read: a forged NOTIFY only causes a check).

CREATE UNLOGGED TABLE IF NOT EXISTS fluxbase.rate_leases (
    name      text PRIMARY KEY,
    until     float8[] NOT NULL,   -- per lease: counts until this epoch second (database clock)
    tokens    integer[] NOT NULL,  -- per lease: tokens granted and not handed back
    last_until float8 NOT NULL     -- the latest `until`: housekeeping deletes rows past it
);

-- Lease up to p_want tokens of p_name's window (p_limit per p_window seconds, the lease held
-- p_hold seconds), handing back the caller's previous lease first (p_old: its `until`; its
-- unspent tokens p_old_unspent; its spent ones count until p_old_until). Answers the tokens
-- granted (0: the window is full), the tokens counted after the grant, the database's now and
-- the earliest `until` still counted (when the next token frees up) and the new lease's `until`.
CREATE OR REPLACE FUNCTION fluxbase.rate_lease(
    p_name text, p_limit integer, p_window float8, p_want integer, p_hold float8,
    p_old float8, p_old_until float8, p_old_unspent integer,
    OUT granted integer, OUT counted integer, OUT now_s float8, OUT oldest float8, OUT until_s float8)
    LANGUAGE plpgsql
    SET search_path = pg_catalog
AS $$
DECLARE
    u float8[];
    t integer[];
    nu float8[] := '{}';
    nt integer[] := '{}';
    e float8;
    k integer;
BEGIN
    now_s := extract(epoch FROM clock_timestamp());
    -- The row lock serialises every process's lease of this name.
    INSERT INTO fluxbase.rate_leases AS r (name, until, tokens, last_until)
    VALUES (p_name, '{}', '{}', 0)
    ON CONFLICT (name) DO UPDATE SET last_until = r.last_until
    RETURNING r.until, r.tokens INTO u, t;
    counted := 0;
    FOR i IN 1 .. coalesce(array_length(u, 1), 0) LOOP
        e := u[i];
        k := t[i];
        IF p_old IS NOT NULL AND e = p_old THEN
            e := least(e, p_old_until);
            k := k - least(greatest(p_old_unspent, 0), k);
            p_old := NULL;  -- hand back one lease only
        END IF;
        IF e > now_s AND k > 0 THEN
            nu := nu || e;
            nt := nt || k;
            counted := counted + k;
        END IF;
    END LOOP;
    granted := greatest(0, least(p_want, p_limit - counted));
    IF granted > 0 THEN
        until_s := now_s + p_hold + p_window;
        nu := nu || until_s;
        nt := nt || granted;
        counted := counted + granted;
    END IF;
    SELECT min(x), max(x) INTO oldest, e FROM unnest(nu) AS x;
    UPDATE fluxbase.rate_leases SET until = nu, tokens = nt, last_until = coalesce(e, 0)
    WHERE name = p_name;
END
$$;
REVOKE ALL ON FUNCTION fluxbase.rate_lease(text, integer, float8, integer, float8, float8, float8, integer)
    FROM PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase.ring_control() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM pg_notify('fluxbase_control', '');
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION fluxbase.ring_control() FROM PUBLIC;

DROP TRIGGER IF EXISTS api_keys_ring_control ON fluxbase.api_keys;
CREATE TRIGGER api_keys_ring_control
    AFTER UPDATE OF revoked_at, key_hash, expires_at, rate_limit_requests, rate_limit_window_s
    OR DELETE ON fluxbase.api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.ring_control();

DROP TRIGGER IF EXISTS projects_ring_control ON fluxbase.projects;
CREATE TRIGGER projects_ring_control
    AFTER UPDATE OF status, read_only, rate_limit_requests, rate_limit_window_s OR DELETE ON fluxbase.projects
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.ring_control();
