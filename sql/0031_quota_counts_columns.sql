-- The size quota counts column definitions too (hostile review 3): tables of 1 600 columns with
-- long names put megabytes into pg_attribute under a 256 kB cap. schema_size (sql/0020) adds the
-- project's pg_attribute, pg_index and pg_depend rows; check_db_quota (sql/0022) counts rows
-- written to them as growth. Otherwise the same functions.
CREATE OR REPLACE FUNCTION fluxbase_guard.schema_size(p_project_id text) RETURNS bigint
    LANGUAGE sql STABLE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH ns AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = 'p_' || p_project_id),
    rels AS (SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relnamespace = (SELECT oid FROM ns))
    SELECT (
        coalesce((SELECT sum(pg_catalog.pg_total_relation_size(c.oid)) FROM pg_catalog.pg_class c
                  WHERE c.relnamespace = (SELECT oid FROM ns) AND c.relkind IN ('r', 'm', 'S')), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(p.*)) FROM pg_catalog.pg_proc p
                  WHERE p.pronamespace = (SELECT oid FROM ns)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(t.*)) FROM pg_catalog.pg_type t
                  WHERE t.typnamespace = (SELECT oid FROM ns)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(d.*)) FROM pg_catalog.pg_description d
                  WHERE d.objoid IN (SELECT oid FROM rels)
                     OR d.objoid IN (SELECT p.oid FROM pg_catalog.pg_proc p
                                     WHERE p.pronamespace = (SELECT oid FROM ns))
                     OR d.objoid IN (SELECT t.oid FROM pg_catalog.pg_type t
                                     WHERE t.typnamespace = (SELECT oid FROM ns))), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(r.*)) FROM pg_catalog.pg_rewrite r
                  WHERE r.ev_class IN (SELECT oid FROM rels)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(a.*)) FROM pg_catalog.pg_attrdef a
                  WHERE a.adrelid IN (SELECT oid FROM rels)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(k.*)) FROM pg_catalog.pg_constraint k
                  WHERE k.connamespace = (SELECT oid FROM ns)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(y.*)) FROM pg_catalog.pg_policy y
                  WHERE y.polrelid IN (SELECT oid FROM rels)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(g.*)) FROM pg_catalog.pg_trigger g
                  WHERE g.tgrelid IN (SELECT oid FROM rels)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(a.*)) FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid IN (SELECT oid FROM rels)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(x.*)) FROM pg_catalog.pg_index x
                  WHERE x.indrelid IN (SELECT oid FROM rels)), 0)
      + coalesce((SELECT sum(pg_catalog.pg_column_size(p.*)) FROM pg_catalog.pg_depend p
                  WHERE p.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND p.objid IN (SELECT oid FROM rels)), 0)
    )::bigint
$$;

CREATE OR REPLACE FUNCTION fluxbase_guard.check_db_quota() RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pid   text;
    cap   bigint;
    size  bigint;
    grew  bigint;
    o_rows bigint;
    o_deletes bigint;
    o_schema bigint;
    freed bigint := 0;
BEGIN
    IF pg_catalog.pg_current_xact_id_if_assigned() IS NULL THEN
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
    PERFORM pg_catalog.pg_stat_force_next_flush();
    size := fluxbase_guard.schema_size(pid) + fluxbase_guard.outbox_bytes(pid);
    IF size <= cap THEN
        RETURN size;
    END IF;
    SELECT coalesce(sum(pg_catalog.pg_stat_get_xact_tuples_inserted(c.oid)
                        + pg_catalog.pg_stat_get_xact_tuples_updated(c.oid)), 0)
    INTO grew
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'p_' || pid AND c.relkind IN ('r', 'm');
    -- Catalog rows: new relations, functions, types, comments, rules, defaults, constraints,
    -- policies, triggers (any of them, also another project's: that only makes this check stricter).
    SELECT grew + coalesce(sum(pg_catalog.pg_stat_get_xact_tuples_inserted(r)
                               + pg_catalog.pg_stat_get_xact_tuples_updated(r)), 0)
    INTO grew
    FROM unnest(ARRAY['pg_catalog.pg_class', 'pg_catalog.pg_proc', 'pg_catalog.pg_type',
                      'pg_catalog.pg_description', 'pg_catalog.pg_rewrite', 'pg_catalog.pg_attrdef',
                      'pg_catalog.pg_constraint', 'pg_catalog.pg_policy',
                      'pg_catalog.pg_trigger', 'pg_catalog.pg_attribute', 'pg_catalog.pg_index',
                      'pg_catalog.pg_depend']::pg_catalog.regclass[]) AS r;
    -- Outbox events this transaction wrote for the project (its own, by the xid index).
    IF grew = 0 THEN
        SELECT coalesce(sum(e.bytes) FILTER (WHERE e.kind = 'row' AND e.operation <> 'DELETE'), 0),
               coalesce(sum(e.bytes) FILTER (WHERE e.kind = 'row' AND e.operation = 'DELETE'), 0),
               coalesce(sum(e.bytes) FILTER (WHERE e.kind = 'schema'), 0)
        INTO o_rows, o_deletes, o_schema
        FROM fluxbase.events e
        WHERE e.xid = pg_catalog.pg_current_xact_id() AND e.project_id = pid;
        IF o_deletes > 0 THEN
            SELECT coalesce(sum(4 * LEAST(
                       pg_catalog.pg_stat_get_xact_tuples_deleted(c.oid)::numeric
                           * pg_catalog.pg_total_relation_size(c.oid)
                           / GREATEST(c.reltuples::numeric, pg_catalog.pg_stat_get_live_tuples(c.oid)
                                      + pg_catalog.pg_stat_get_dead_tuples(c.oid), 1),
                       pg_catalog.pg_total_relation_size(c.oid)::numeric)), 0)::bigint
            INTO freed
            FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'p_' || pid AND c.relkind IN ('r', 'p');
            o_deletes := GREATEST(o_deletes - freed, 0);
        END IF;
        IF o_schema > 0 THEN
            o_schema := GREATEST(o_schema - 8192 * pg_catalog.pg_stat_get_xact_tuples_deleted(
                                     'pg_catalog.pg_class'::pg_catalog.regclass), 0);
        END IF;
        grew := o_rows + o_deletes + o_schema;
    END IF;
    IF grew > 0 THEN
        RAISE EXCEPTION 'Database size % bytes exceeds the project''s limit of % bytes', size, cap
            USING ERRCODE = 'FX413', DETAIL = pg_catalog.format('size=%s limit=%s', size, cap);
    END IF;
    RETURN size;
END
$$;
