-- Issue 18: the webhook delivery log keeps every attempt, not only the last one. A delivery's
-- attempts go with it (trimmed with the log). Idempotent.
CREATE TABLE IF NOT EXISTS fluxbase.webhook_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     bigint NOT NULL REFERENCES fluxbase.webhook_deliveries (id) ON DELETE CASCADE,
    attempted_at    timestamptz NOT NULL,
    response_status integer,
    response_ms     integer,
    response_body   text,
    error           text
);
CREATE INDEX IF NOT EXISTS webhook_attempts_delivery_idx ON fluxbase.webhook_attempts (delivery_id, id);
