-- One PostgreSQL server is at most one cluster (issue 19; docs/clusters.md "One server, one
-- cluster"). Roles are per server, not per database: the runtime role, the provisioner roles and
-- every project's LOGIN roles are shared by all databases of a server. Two clusters on one server
-- set each other's runtime and provisioner passwords (the last registration won), and a move
-- between them would create a project's roles where they already exist and then drop them with
-- the source. So each cluster records its server's pg_control_system().system_identifier, and a
-- registration (or a new connection string) whose server is already registered, or is the
-- control plane's own server, is refused (409 CONFLICT, failure database_already_registered).
--
-- The default cluster's identifier is the server this migration runs on (and `fluxbase migrate`
-- refreshes it); registered clusters get theirs when registered, or, for clusters registered
-- before this migration, at the next `fluxbase migrate` (services/clusters.py).
ALTER TABLE fluxbase.clusters ADD COLUMN IF NOT EXISTS system_identifier text;
UPDATE fluxbase.clusters SET system_identifier = (SELECT s.system_identifier::text FROM pg_control_system() s)
    WHERE id = 'default';
CREATE UNIQUE INDEX IF NOT EXISTS clusters_system_identifier_key ON fluxbase.clusters (system_identifier);
