-- Who is sending to an endpoint now: a lease on the endpoint's row instead of an advisory lock
-- (every role in the database may take any advisory key, so a tenant could stall deliveries).
-- Taken and released in short autocommit statements: a long transaction would hold back the
-- xmin that every outbox reader waits for. A worker that dies loses its lease when it expires.

ALTER TABLE fluxbase.webhooks ADD COLUMN IF NOT EXISTS send_lease text;
ALTER TABLE fluxbase.webhooks ADD COLUMN IF NOT EXISTS send_lease_until timestamptz;
