-- The doorbell's hint (issue 20: capture that costs less). A captured write asks whether an
-- outbox reader sleeps, so that its commit rings the doorbell (NOTIFY fluxbase_events) only
-- then (sql/0005). The C capture asked fluxbase.event_readers directly: a lock, a snapshot and a
-- scan, about 5 µs of a captured single-row write's ~20 (bench/capture_cost.py, a build without
-- the check against one with it). The hint answers the common case without a snapshot or a scan:
-- a sequence (read as one buffer, not through MVCC) whose value is 0 only while no reader waits.
-- The C capture reads it first and, unless it says 0, asks event_readers as before, so it never
-- answers other than event_readers would. The PL/pgSQL capture and broadcast paths still read
-- event_readers.
--
-- A statement trigger on event_readers keeps the hint. After any change of `waiting` (and a
-- reader's row added, removed or truncated) it sets 1 if any reader waits, else 0, counting its
-- own uncommitted change and every committed one. It does so under an exclusive lock of
-- fluxbase.readers_hint_lock, held to its commit, so two readers changing at once cannot leave 0
-- while one of them waits: the second to take the lock sees the first's commit. The value moves
-- before the reader's commit: to 1 before its `waiting = true` is visible to anyone (a writer then
-- asks event_readers, which says what it said before), and to 0 only as a reader wakes, when no
-- other reader waits (were that transaction to fail, the reader is awake anyway and registers
-- again on reconnecting). A sequence's value is not transactional and is WAL-logged at once.
CREATE TABLE IF NOT EXISTS fluxbase.readers_hint_lock ();
REVOKE ALL ON fluxbase.readers_hint_lock FROM PUBLIC;

CREATE SEQUENCE IF NOT EXISTS fluxbase.readers_waiting_hint
    AS integer MINVALUE 0 MAXVALUE 1 START WITH 1 NO CYCLE;
REVOKE ALL ON SEQUENCE fluxbase.readers_waiting_hint FROM PUBLIC;
GRANT SELECT ON SEQUENCE fluxbase.readers_waiting_hint TO fluxbase_outbox_writer;

-- Run as whoever changes event_readers: the readers connect as the role that owns the platform's
-- tables (and so this lock table and sequence); no definer is needed.
CREATE OR REPLACE FUNCTION fluxbase.keep_readers_waiting_hint() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE fluxbase.readers_hint_lock IN EXCLUSIVE MODE;
    -- Only a statement's own snapshot, taken after the lock, sees what readers committed before
    -- it: at REPEATABLE READ or SERIALIZABLE (a default an operator may set) the transaction's
    -- snapshot predates the wait, and a waking reader would miss another's `waiting = true` and
    -- leave 0 while it sleeps (review 20). There the hint only goes up.
    IF pg_catalog.current_setting('transaction_isolation') <> 'read committed' THEN
        PERFORM pg_catalog.setval('fluxbase.readers_waiting_hint'::pg_catalog.regclass, 1);
        RETURN NULL;
    END IF;
    PERFORM pg_catalog.setval('fluxbase.readers_waiting_hint'::pg_catalog.regclass,
        CASE WHEN EXISTS (SELECT 1 FROM fluxbase.event_readers r WHERE r.waiting) THEN 1 ELSE 0 END);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION fluxbase.keep_readers_waiting_hint() FROM PUBLIC;

-- The lock first, before the statement takes any row lock (review 20: taken after them, a
-- transaction changing two readers' rows deadlocked with the second reader's own change).
CREATE OR REPLACE FUNCTION fluxbase.lock_readers_waiting_hint() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    LOCK TABLE fluxbase.readers_hint_lock IN EXCLUSIVE MODE;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION fluxbase.lock_readers_waiting_hint() FROM PUBLIC;
DROP TRIGGER IF EXISTS event_readers_hint_lock ON fluxbase.event_readers;
CREATE TRIGGER event_readers_hint_lock
    BEFORE INSERT OR UPDATE OF waiting OR DELETE OR TRUNCATE ON fluxbase.event_readers
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.lock_readers_waiting_hint();

DROP TRIGGER IF EXISTS event_readers_hint ON fluxbase.event_readers;
CREATE TRIGGER event_readers_hint
    AFTER INSERT OR UPDATE OF waiting OR DELETE ON fluxbase.event_readers
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.keep_readers_waiting_hint();
DROP TRIGGER IF EXISTS event_readers_hint_truncate ON fluxbase.event_readers;
CREATE TRIGGER event_readers_hint_truncate
    AFTER TRUNCATE ON fluxbase.event_readers
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.keep_readers_waiting_hint();

-- Its first value, under the same lock.
LOCK TABLE fluxbase.readers_hint_lock IN EXCLUSIVE MODE;
SELECT pg_catalog.setval('fluxbase.readers_waiting_hint'::pg_catalog.regclass,
    CASE WHEN EXISTS (SELECT 1 FROM fluxbase.event_readers r WHERE r.waiting) THEN 1 ELSE 0 END);
