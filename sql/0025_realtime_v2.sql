-- Realtime v2 (issue 20): per-topic authorization and presence shared by every realtime replica.

-- Who may join, send to and track presence on which topics of a project (null: the defaults,
-- fluxbase.services.realtime.DEFAULT_TOPIC_RULE). A list of {pattern, join, send, track}.
ALTER TABLE fluxbase.realtime_settings ADD COLUMN IF NOT EXISTS topics jsonb;

-- Presence: one row per tracked member of a topic, written by the realtime process that holds
-- its connection (`replica_id`). That process refreshes `expires_at` while it lives and deletes
-- the row when the connection ends; a row whose process died expires and any replica deletes it.
CREATE TABLE IF NOT EXISTS fluxbase.realtime_presence (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    topic      text NOT NULL,
    member_key text NOT NULL,
    replica_id text NOT NULL,
    state      jsonb NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, topic, member_key)
);
CREATE INDEX IF NOT EXISTS realtime_presence_replica_idx ON fluxbase.realtime_presence (replica_id);
CREATE INDEX IF NOT EXISTS realtime_presence_expires_idx ON fluxbase.realtime_presence (expires_at);

-- A version per topic, set from one sequence (under this row's lock) by every change of its
-- members: replicas read the versions of the topics their sockets watch and re-read the members
-- of those that moved. The lock also serializes the member cap check of concurrent joins. A
-- topic without members loses its row (a watcher then sees no version, and no members).
CREATE SEQUENCE IF NOT EXISTS fluxbase.realtime_presence_version;
CREATE TABLE IF NOT EXISTS fluxbase.realtime_presence_topics (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    topic      text NOT NULL,
    version    bigint NOT NULL DEFAULT nextval('fluxbase.realtime_presence_version'),
    PRIMARY KEY (project_id, topic)
);
