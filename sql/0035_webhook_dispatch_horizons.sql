-- Per-project horizons for the webhook dispatcher (as the realtime reader has them,
-- realtime/fluxbase_realtime/outbox.py): above the cluster's xmin, a project's events are
-- queued once no open transaction of that project's roles (or of any other session) has a
-- lower xid, so one project's open transaction no longer delays every project's webhooks.
-- Each row: how far a project's events were queued above the global cursor
-- (fluxbase.webhook_dispatch); written in the dispatch transaction, under its row lock, and
-- dropped once the global cursor passes it.
CREATE TABLE IF NOT EXISTS fluxbase.webhook_dispatch_early (
    project_id text PRIMARY KEY,
    last_xid   xid8 NOT NULL,
    last_id    bigint NOT NULL
);
