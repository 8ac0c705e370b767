-- Project operations: the per-project migration ledger, database-size quotas and the guard
-- functions tenant connections call for both. The ledger and quotas live in the control plane,
-- where tenants cannot write; tenants reach them only through the SECURITY DEFINER functions
-- below, which take the project from session_user (a tenant role p_<id>_admin|_rw|_ro), never
-- from an argument, so no project can touch another's rows.

CREATE TABLE IF NOT EXISTS fluxbase.project_migrations (
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    applied_by text,
    PRIMARY KEY (project_id, name)
);

-- One-use tickets: the API writes one (only the SHA-256 of a random token) before it runs a
-- migration on the tenant's admin connection; the tenant transaction redeems it, which writes
-- the ledger row in that same transaction, so the row commits or rolls back with the migration.
CREATE TABLE IF NOT EXISTS fluxbase.migration_tickets (
    token_hash bytea PRIMARY KEY,
    project_id text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_by text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Per-project database size cap (bytes of the project schema); NULL: no cap. On the project row
-- so that the API learns it with the project (and sends the check only for capped projects).
ALTER TABLE fluxbase.projects ADD COLUMN IF NOT EXISTS db_quota_bytes bigint CHECK (db_quota_bytes > 0);

-- The project id of the calling tenant role, or an error for anyone else.
CREATE OR REPLACE FUNCTION fluxbase_guard.tenant_project() RETURNS text
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    m text[];
BEGIN
    m := regexp_match(session_user::text, '^p_([0-9a-f]{16})_(admin|rw|ro)$');
    IF m IS NULL THEN
        RAISE EXCEPTION 'not a tenant role' USING ERRCODE = '42501';
    END IF;
    RETURN m[1];
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_guard.redeem_migration(p_token bytea) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    t record;
BEGIN
    DELETE FROM fluxbase.migration_tickets
    WHERE token_hash = sha256(p_token) AND project_id = fluxbase_guard.tenant_project()
    RETURNING * INTO t;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no such migration ticket' USING ERRCODE = 'FX409';
    END IF;
    INSERT INTO fluxbase.project_migrations (project_id, name, checksum, applied_by)
    VALUES (t.project_id, t.name, t.checksum, t.applied_by);
END
$$;

-- The project schema's size in bytes (tables with their indexes and TOAST, materialized views).
CREATE OR REPLACE FUNCTION fluxbase_guard.schema_size(p_project_id text) RETURNS bigint
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
    SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'p_' || p_project_id AND c.relkind IN ('r', 'm', 'S')
$$;

-- Called just before COMMIT by tenant write paths of a project that has a cap; returns the
-- schema size it measured (NULL when it measured nothing). A transaction that wrote nothing has
-- no xid and returns at once. Over the cap, the transaction is refused (FX413) if it inserted or
-- updated rows or created relations, so a transaction that only deletes or drops can always
-- bring the project back under it.
DROP FUNCTION IF EXISTS fluxbase_guard.check_db_quota();
CREATE FUNCTION fluxbase_guard.check_db_quota() RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    pid   text;
    cap   bigint;
    size  bigint;
    grew  bigint;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        RETURN NULL;
    END IF;
    pid := fluxbase_guard.tenant_project();
    SELECT p.db_quota_bytes INTO cap FROM fluxbase.projects p WHERE p.id = pid;
    IF cap IS NULL THEN
        RETURN NULL;
    END IF;
    -- pg_stat_get_xact_* read this backend's pending counters, which also hold earlier
    -- transactions' counts until the next stats flush (at most ~10 s later when idle); force
    -- that flush when this transaction ends, so the counters the next one sees are its own.
    PERFORM pg_stat_force_next_flush();
    size := fluxbase_guard.schema_size(pid);
    IF size <= cap THEN
        RETURN size;
    END IF;
    SELECT coalesce(sum(pg_stat_get_xact_tuples_inserted(c.oid) + pg_stat_get_xact_tuples_updated(c.oid)), 0)
    INTO grew
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'p_' || pid AND c.relkind IN ('r', 'm');
    grew := grew + pg_stat_get_xact_tuples_inserted('pg_catalog.pg_class'::regclass);
    IF grew > 0 THEN
        RAISE EXCEPTION 'Database size % bytes exceeds the project''s limit of % bytes', size, cap
            USING ERRCODE = 'FX413', DETAIL = format('size=%s limit=%s', size, cap);
    END IF;
    RETURN size;
END
$$;

REVOKE ALL ON FUNCTION fluxbase_guard.tenant_project(), fluxbase_guard.redeem_migration(bytea),
    fluxbase_guard.schema_size(text), fluxbase_guard.check_db_quota() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION fluxbase_guard.tenant_project(), fluxbase_guard.redeem_migration(bytea),
    fluxbase_guard.check_db_quota() TO PUBLIC;
