-- The control doorbell (sql/0038) carries no trust: any session of the database may NOTIFY
-- `fluxbase_control`, tenants included (hostile review 8: one statement rang it 20 000 times,
-- and every ring dropped every API's key cache and re-checked every realtime subscriber). A real
-- ring now also bumps this one-row epoch, written only by the platform's triggers; listeners act
-- only when the epoch they read has moved, so a forged ring costs one indexed read per process.

CREATE TABLE IF NOT EXISTS fluxbase.control_epoch (
    id     integer PRIMARY KEY CHECK (id = 1),
    epoch  bigint  NOT NULL DEFAULT 0
);
INSERT INTO fluxbase.control_epoch (id, epoch) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;

CREATE OR REPLACE FUNCTION fluxbase.ring_control() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog
AS $$
BEGIN
    UPDATE fluxbase.control_epoch SET epoch = epoch + 1 WHERE id = 1;
    PERFORM pg_notify('fluxbase_control', '');
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION fluxbase.ring_control() FROM PUBLIC;
