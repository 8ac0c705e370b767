-- Webhooks: endpoint configuration, a delivery queue that is also the delivery log, the
-- dispatcher's outbox cursor, and a per-project operations log.

CREATE TABLE IF NOT EXISTS fluxbase.webhooks (
    id              text PRIMARY KEY,
    project_id      text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    url             text NOT NULL,
    events          text[] NOT NULL,
    tables          text[],                 -- NULL: every table
    secret          text NOT NULL,          -- HMAC key; never returned after creation
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS webhooks_project_idx ON fluxbase.webhooks (project_id);

-- One row per (endpoint, message) attempt series. `body` is the exact payload, so every retry
-- sends the same bytes under the same `message_id` (the `webhook-id` header).
CREATE TABLE IF NOT EXISTS fluxbase.webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id      text NOT NULL REFERENCES fluxbase.webhooks (id) ON DELETE CASCADE,
    message_id      text NOT NULL,
    event_type      text NOT NULL,
    body            text NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    response_status integer,
    response_ms     integer,
    response_body   text,
    error           text,
    redelivery_of   bigint,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- The queue: each endpoint's pending deliveries in order (its head decides when it is due).
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending_idx
    ON fluxbase.webhook_deliveries (webhook_id, id) WHERE status = 'pending';
-- The log: newest first per endpoint.
CREATE INDEX IF NOT EXISTS webhook_deliveries_log_idx ON fluxbase.webhook_deliveries (webhook_id, id DESC);
CREATE INDEX IF NOT EXISTS webhook_deliveries_created_idx ON fluxbase.webhook_deliveries (created_at)
    WHERE status <> 'pending';

-- The dispatcher's position in the outbox (commit-safe (xid, id) order). One row; the worker
-- holding its row lock is the one dispatcher, so any number of workers can run.
CREATE TABLE IF NOT EXISTS fluxbase.webhook_dispatch (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_xid  xid8,
    last_id   bigint
);
INSERT INTO fluxbase.webhook_dispatch (singleton, last_xid, last_id)
VALUES (true, pg_snapshot_xmin(pg_current_snapshot()), 0)
ON CONFLICT (singleton) DO NOTHING;

-- What the platform did to a project that its owners should know (an endpoint disabled, ...).
CREATE TABLE IF NOT EXISTS fluxbase.project_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    level      text NOT NULL CHECK (level IN ('info', 'warning', 'error')),
    source     text NOT NULL,
    message    text NOT NULL,
    details    jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS project_log_project_idx ON fluxbase.project_log (project_id, id DESC);
