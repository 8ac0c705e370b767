-- Clusters that stay right after changes and moves (issue 19; docs/clusters.md).
--
-- 1. A move waits for the source's readers before it switches (services.moves): every outbox
--    reader (realtime's `rt_…`, the webhook dispatcher's `wh_…`) records the backend it reads
--    through and, for realtime, the global cursor up to which every event has been handed to its
--    subscribers; the move waits until every live reader (its backend still in
--    pg_stat_activity) stands past the project's last event.
ALTER TABLE fluxbase.event_readers ADD COLUMN IF NOT EXISTS backend_pid integer;
ALTER TABLE fluxbase.event_readers ADD COLUMN IF NOT EXISTS read_xid xid8;
ALTER TABLE fluxbase.event_readers ADD COLUMN IF NOT EXISTS read_id bigint;

-- 2. A cluster's connection changing (PATCH /api/admin/clusters/{id} {connectionString}) or the
--    cluster going rings the control doorbell: every API, realtime and worker process drops its
--    pools and readers for that cluster and reconnects with the new details.
DROP TRIGGER IF EXISTS clusters_ring_control ON fluxbase.clusters;
CREATE TRIGGER clusters_ring_control
    AFTER UPDATE OF host, port, database, username, secret OR DELETE ON fluxbase.clusters
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.ring_control();
