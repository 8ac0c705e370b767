-- Storage v2: buckets, objects and per-project storage limits. Bytes live in S3 under
-- <projectId>/<bucketId>/<name>; these rows say which objects exist and who may see them.

CREATE TABLE IF NOT EXISTS fluxbase.buckets (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id         text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name               text NOT NULL CHECK (name ~ '^[a-z0-9_-]{1,63}$'),
    is_public          boolean NOT NULL DEFAULT false,
    -- NULL accepts any type; otherwise exact types or 'type/*' patterns.
    allowed_mime_types text[],
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

-- One row per object name. A row becomes visible (status 'ready') only after its bytes are
-- complete in S3; an operation in flight holds a lease (lease_id, lease_until) so that a crash
-- leaves a row housekeeping can finish or undo, never a half-done file.
CREATE TABLE IF NOT EXISTS fluxbase.objects (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id         uuid NOT NULL REFERENCES fluxbase.buckets (id) ON DELETE CASCADE,
    project_id        text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name              text COLLATE "C" NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 1024),
    s3_key            text COLLATE "C" NOT NULL UNIQUE,
    size              bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
    content_type      text NOT NULL DEFAULT 'application/octet-stream',
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'ready', 'deleting')),
    lease_id          uuid,
    lease_kind        text CHECK (lease_kind IN ('stream', 'presigned', 'delete')),
    lease_until       timestamptz,
    -- Bytes an upload in flight has reserved against the project's quota.
    pending_size      bigint CHECK (pending_size >= 0),
    -- For presigned POST uploads: when S3 stops accepting the form.
    upload_expires_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (bucket_id, name),
    CHECK ((lease_id IS NULL) = (lease_until IS NULL)),
    CHECK (status = 'ready' OR lease_id IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS objects_project_idx ON fluxbase.objects (project_id);
CREATE INDEX IF NOT EXISTS objects_lease_idx ON fluxbase.objects (lease_until) WHERE lease_id IS NOT NULL;

-- Per-project overrides; a missing row or NULL column means the instance default (settings).
CREATE TABLE IF NOT EXISTS fluxbase.storage_limits (
    project_id    text PRIMARY KEY REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    max_file_size bigint CHECK (max_file_size > 0),
    quota_bytes   bigint CHECK (quota_bytes > 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
