-- Cluster placement policy and project moves between clusters (issue 19; hostile review 7).
--
-- placement: whether the placement policy (fewest projects) may put new projects on a cluster.
-- A cluster registered with a management key starts 'closed' (whoever runs that server reads
-- the rows of every project placed there, so a key minted for automation must not draw other
-- users' projects onto it); an instance admin's dashboard session opens it. The default cluster
-- is always open. Clusters registered before this migration are closed too: an admin reopens
-- them with PATCH /api/admin/clusters/{id} {"placement": "open"} (docs/clusters.md).
ALTER TABLE fluxbase.clusters ADD COLUMN IF NOT EXISTS placement text NOT NULL DEFAULT 'closed'
    CHECK (placement IN ('open', 'closed'));
UPDATE fluxbase.clusters SET placement = 'open' WHERE id = 'default';

-- A project being moved (services.clusters.move_project): the target cluster while the copy
-- runs, and the read_only value to restore afterwards (the move sets read_only, so every
-- guard, cache and replica that already honours it refuses writes during the copy).
ALTER TABLE fluxbase.projects ADD COLUMN IF NOT EXISTS moving_to text REFERENCES fluxbase.clusters (id);
ALTER TABLE fluxbase.projects ADD COLUMN IF NOT EXISTS read_only_before_move boolean;

-- The control doorbell also rings when a project changes cluster: realtime replicas re-read
-- where it lives and tell its subscribers to resync.
DROP TRIGGER IF EXISTS projects_ring_control ON fluxbase.projects;
CREATE TRIGGER projects_ring_control
    AFTER UPDATE OF status, read_only, rate_limit_requests, rate_limit_window_s, cluster_id OR DELETE
    ON fluxbase.projects
    FOR EACH STATEMENT EXECUTE FUNCTION fluxbase.ring_control();
