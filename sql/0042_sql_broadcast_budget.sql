-- Broadcasts from SQL count against the request's rate limit (issue 20, hostile review 6).
--
-- realtime.broadcast() cost nothing of the key's rate limit: one execute-sql request of a key
-- limited to 3 requests a minute put 5 000 broadcasts into the outbox. Now a transaction may send
-- at most `fluxbase.broadcast_cap` broadcasts, the API sets it (SET LOCAL, with the request
-- identity) to what is left of the credential's rate-limit window after the request's own hit
-- (the budget a WebSocket or HTTP broadcast spends one of each), and never more than 1 000.
--
-- * The counter is the transaction's own `broadcast` rows in fluxbase.events (by the top-level
--   xid, so a rolled-back savepoint gives its broadcasts back with its rows): the tenant cannot
--   delete, update or hide them, whatever it sets in its session.
-- * The cap is a fluxbase.* setting: read and readwrite roles cannot change it (no set_config,
--   no plpgsql, and the statement classifier refuses SET of fluxbase.* as for auth_uid). An admin
--   role can (set_config), but not above the hard 1 000 per transaction checked here.
-- * A missing or malformed value means the hard cap (sessions the API did not start).
-- * Past the cap the call raises SQLSTATE FX429 and the whole transaction is rolled back: the
--   API answers 429 RATE_LIMIT (tenancy/errors.py).

GRANT SELECT (xid, kind) ON fluxbase.events TO fluxbase_guard_broadcast;

CREATE OR REPLACE FUNCTION realtime.broadcast(topic text, payload jsonb, event text DEFAULT 'broadcast')
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m text[];
    pid text;
    principal text;
    uid text;
    rules jsonb;
    rule jsonb;
    pattern text;
    senders jsonb := '["readwrite"]'::jsonb;  -- services/realtime.py DEFAULT_TOPIC_RULE["send"]
    proj record;
    body jsonb;
    n integer;
    cap integer;
    setting text;
BEGIN
    m := pg_catalog.regexp_match(session_user::text, '^p_([0-9a-f]{16})_(admin|rw)$');
    IF m IS NULL THEN
        RAISE EXCEPTION 'realtime.broadcast may only be called by a project''s admin or readwrite role'
            USING ERRCODE = '42501';
    END IF;
    pid := m[1];
    IF topic IS NULL OR pg_catalog.textregexeq(topic, '^[A-Za-z0-9_.-]{1,64}$') IS NOT TRUE THEN
        RAISE EXCEPTION 'realtime.broadcast: a topic is 1 to 64 letters, digits, ''_'', ''-'' or ''.'''
            USING ERRCODE = '22023';
    END IF;
    IF event IS NULL OR pg_catalog.char_length(event) OPERATOR(pg_catalog.<) 1
       OR pg_catalog.char_length(event) OPERATOR(pg_catalog.>) 100 THEN
        RAISE EXCEPTION 'realtime.broadcast: event must be a name of 1 to 100 characters'
            USING ERRCODE = '22023';
    END IF;
    -- The principal as the WebSocket sees it (topic_allowed): an end user whatever the key,
    -- else the key's scope. Read and readwrite roles cannot change fluxbase.auth_uid (sql/0007);
    -- an admin key that drops its end user only becomes what it already is, an admin.
    uid := NULLIF(pg_catalog.current_setting('fluxbase.auth_uid', true), '');
    principal := CASE WHEN uid IS NOT NULL THEN 'user' WHEN m[2] = 'admin' THEN 'admin' ELSE 'readwrite' END;
    SELECT p.status, p.read_only INTO proj FROM fluxbase.projects p WHERE p.id = pid;
    IF NOT FOUND OR proj.status IS DISTINCT FROM 'active' OR proj.read_only THEN
        RAISE EXCEPTION 'realtime.broadcast: the project is suspended or read-only' USING ERRCODE = '25006';
    END IF;
    IF principal <> 'admin' THEN
        SELECT s.topics INTO rules FROM fluxbase.realtime_settings s WHERE s.project_id = pid;
        -- The first rule whose pattern matches decides: `name`, `prefix*` or `*`.
        IF pg_catalog.jsonb_typeof(rules) = 'array' THEN
            FOR rule IN SELECT r.value FROM pg_catalog.jsonb_array_elements(rules) AS r LOOP
                pattern := rule OPERATOR(pg_catalog.->>) 'pattern';
                IF pattern = topic
                   OR (pg_catalog.right(pattern, 1) = '*'
                       AND pg_catalog.starts_with(topic, pg_catalog.left(pattern, -1))) THEN
                    IF pg_catalog.jsonb_typeof(rule OPERATOR(pg_catalog.->) 'send') = 'array' THEN
                        senders := rule OPERATOR(pg_catalog.->) 'send';
                    END IF;
                    EXIT;
                END IF;
            END LOOP;
        END IF;
        IF NOT senders OPERATOR(pg_catalog.?) principal THEN
            RAISE EXCEPTION 'The project''s topic rules do not let %s send on topic %',
                CASE WHEN principal = 'user' THEN 'end user' ELSE '''readwrite'' credential' END,
                pg_catalog.quote_literal(topic)
                USING ERRCODE = '42501';
        END IF;
    END IF;
    -- The request's share of its key's rate limit (sql/0042): at most `cap` broadcasts in this
    -- transaction, counted from its own outbox rows (which the tenant can neither delete nor hide).
    setting := pg_catalog.current_setting('fluxbase.broadcast_cap', true);
    cap := 1000;
    IF pg_catalog.textregexeq(setting, '^[0-9]{1,6}$') THEN
        cap := LEAST(setting::integer, 1000);
    END IF;
    SELECT pg_catalog.count(*) INTO n FROM fluxbase.events e
    WHERE e.xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id() AND e.kind = 'broadcast';
    IF n OPERATOR(pg_catalog.>=) cap THEN
        RAISE EXCEPTION 'realtime.broadcast: this request may send at most % broadcasts (what is left of its credential''s rate limit, at most 1000 per transaction); the transaction is rolled back', cap
            USING ERRCODE = 'FX429';
    END IF;
    body := pg_catalog.jsonb_build_object('event', event, 'payload', payload);
    n := pg_catalog.octet_length(body::text);
    IF n OPERATOR(pg_catalog.>) 65536 THEN
        RAISE EXCEPTION 'realtime.broadcast: broadcasts are limited to 64 KiB of JSON (this one is % bytes)', n
            USING ERRCODE = '54000';
    END IF;
    INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, bytes)
    VALUES (pid, 'broadcast', topic, 'BROADCAST', body, pg_catalog.pg_column_size(body));
    IF EXISTS (SELECT 1 FROM fluxbase.event_readers r WHERE r.waiting) THEN
        PERFORM pg_catalog.pg_notify('fluxbase_events', '');
    END IF;
END
$$;

REVOKE ALL ON FUNCTION realtime.broadcast(text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION realtime.broadcast(text, jsonb, text) TO fluxbase_realtime_senders;
