-- Realtime capture of partitioned tables (found by hostile review 27): every write to a captured
-- partition tree is captured, whichever table of the tree the statement names, and its row
-- events name the tree's root, the table that realtime lists, subscribers name, and whose
-- policies apply to a SELECT through it.
--
-- Before this file, a captured partitioned table had the capture triggers of a plain table. Its
-- statement-level INSERT and DELETE triggers fire only for statements that name it, and its
-- row-level UPDATE trigger was cloned onto every partition. So:
-- * an INSERT, UPDATE or DELETE naming a partition wrote no event, or an UPDATE event that named
--   the partition;
-- * an UPDATE that moves a row to another partition wrote none: PostgreSQL runs it as a DELETE
--   and an INSERT, and fires neither the row-level UPDATE triggers nor any DELETE or INSERT
--   statement trigger for it;
-- * every other UPDATE named the partition, not the table subscribers subscribe to;
-- * a captured table could not be attached as a partition: its own row-level trigger has the
--   clone's name.
--
-- Now a tree's capture is statement-level throughout:
-- * The root keeps the statement-level INSERT, DELETE and TRUNCATE triggers of every table (the C
--   capture where it loads). Its UPDATE trigger is statement-level too, with both transition
--   tables (capture_tree_update): PostgreSQL puts a moved row's old image into the OLD TABLE when
--   it deletes it and its new image into the NEW TABLE when it inserts it, so a move is one
--   UPDATE of the root.
-- * Every partition, at any depth, has statement-level INSERT, UPDATE and DELETE triggers of its
--   own (capture_tree_*), which fire only for statements that name that partition. Statement
--   triggers of the table a statement names are the only ones that fire, so no write is captured
--   twice. Their events name the root. Their TRUNCATE trigger (capture_truncate) names the
--   partition: truncating a partition empties that partition, not the table.
-- * The two transition tables of an UPDATE are paired by position, the order PostgreSQL appends
--   them in. The one case where the counts differ: a moved row that a BEFORE INSERT trigger of
--   its new partition drops. That row is gone. Then the statement's old images are written as
--   DELETEs and its new images as INSERTs, which is what happened to the rows, without pairing
--   a row with another's image.
-- * Their variables win over the tenant's column names (#variable_conflict use_variable: a table
--   with a column named like one of them must not fail its writes).
-- * They read the transition tables a row at a time and write the events every 16 MiB of images:
--   a statement's images are never all in memory at once, nor in one array (1 GB at most).
-- * These functions are PL/pgSQL, so the tree's UPDATEs and its partitions' writes leave out the
--   virtual generated columns (sql/0054; a partition's column is virtual exactly where its
--   parent's is); writes through the root keep the C capture's images.
-- * A partition is captured when its root is: attach_capture of the root attaches the tree,
--   attach_capture of a partition whose root is not captured removes the partition's capture
--   triggers, and detach_capture of the root detaches the tree. The DDL event trigger attaches
--   a new partition (CREATE TABLE ... PARTITION OF, as before) and the partitions of a
--   partitioned table an ALTER TABLE changed (ATTACH PARTITION), so an attached table, captured
--   or not before, gets the partition shape.
--   A detached partition becomes a table of its own for capture (settle_detached): captured
--   unless realtime was switched off for its name.

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_root(p_table pg_catalog.regclass)
    RETURNS pg_catalog.regclass
    LANGUAGE sql STABLE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(pg_catalog.pg_partition_root(p_table), p_table)
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_tree_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
#variable_conflict use_variable
DECLARE
    root pg_catalog.regclass := coalesce(pg_catalog.pg_partition_root(TG_RELID), TG_RELID);
    -- fluxbase_capture.uncomputed_columns(TG_RELID), inline (a function with SET costs more)
    cols pg_catalog.text[] := (SELECT coalesce(pg_catalog.array_agg(a.attname::pg_catalog.text), '{}')
                               FROM pg_catalog.pg_attribute a
                               WHERE a.attrelid OPERATOR(pg_catalog.=) TG_RELID
                                 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                                 AND a.attgenerated OPERATOR(pg_catalog.=) 'v');
    img pg_catalog.jsonb;
    imgs pg_catalog.jsonb[] := '{}';
    held pg_catalog.int8 := 0;
BEGIN
    -- One row at a time from the transition table, written every 16 MiB of images.
    FOR img IN SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols FROM new_rows r LOOP
        imgs := pg_catalog.array_append(imgs, img);
        held := held OPERATOR(pg_catalog.+) pg_catalog.pg_column_size(img);
        IF held OPERATOR(pg_catalog.>=) 16777216 THEN
            PERFORM fluxbase_capture.write_events(root, 'INSERT', imgs, NULL);
            imgs := '{}';
            held := 0;
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(imgs) OPERATOR(pg_catalog.>) 0 THEN
        PERFORM fluxbase_capture.write_events(root, 'INSERT', imgs, NULL);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_tree_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
#variable_conflict use_variable
DECLARE
    root pg_catalog.regclass := coalesce(pg_catalog.pg_partition_root(TG_RELID), TG_RELID);
    -- fluxbase_capture.uncomputed_columns(TG_RELID), inline (a function with SET costs more)
    cols pg_catalog.text[] := (SELECT coalesce(pg_catalog.array_agg(a.attname::pg_catalog.text), '{}')
                               FROM pg_catalog.pg_attribute a
                               WHERE a.attrelid OPERATOR(pg_catalog.=) TG_RELID
                                 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                                 AND a.attgenerated OPERATOR(pg_catalog.=) 'v');
    img pg_catalog.jsonb;
    imgs pg_catalog.jsonb[] := '{}';
    held pg_catalog.int8 := 0;
BEGIN
    -- One row at a time from the transition table, written every 16 MiB of images.
    FOR img IN SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols FROM old_rows r LOOP
        imgs := pg_catalog.array_append(imgs, img);
        held := held OPERATOR(pg_catalog.+) pg_catalog.pg_column_size(img);
        IF held OPERATOR(pg_catalog.>=) 16777216 THEN
            PERFORM fluxbase_capture.write_events(root, 'DELETE', imgs, imgs);
            imgs := '{}';
            held := 0;
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(imgs) OPERATOR(pg_catalog.>) 0 THEN
        PERFORM fluxbase_capture.write_events(root, 'DELETE', imgs, imgs);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION fluxbase_capture.capture_tree_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
AS $$
#variable_conflict use_variable
DECLARE
    root pg_catalog.regclass := coalesce(pg_catalog.pg_partition_root(TG_RELID), TG_RELID);
    -- fluxbase_capture.uncomputed_columns(TG_RELID), inline (a function with SET costs more)
    cols pg_catalog.text[] := (SELECT coalesce(pg_catalog.array_agg(a.attname::pg_catalog.text), '{}')
                               FROM pg_catalog.pg_attribute a
                               WHERE a.attrelid OPERATOR(pg_catalog.=) TG_RELID
                                 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                                 AND a.attgenerated OPERATOR(pg_catalog.=) 'v');
    n_old pg_catalog.int8;
    n_new pg_catalog.int8;
    c_old pg_catalog.refcursor;
    c_new pg_catalog.refcursor;
    o pg_catalog.jsonb;
    n pg_catalog.jsonb;
    olds pg_catalog.jsonb[] := '{}';
    news pg_catalog.jsonb[] := '{}';
    held pg_catalog.int8 := 0;
    op pg_catalog.text;
BEGIN
    SELECT pg_catalog.count(*) INTO n_old FROM old_rows;
    SELECT pg_catalog.count(*) INTO n_new FROM new_rows;
    IF n_old OPERATOR(pg_catalog.=) 1 AND n_new OPERATOR(pg_catalog.=) 1 THEN
        -- One row, the common case: no cursors.
        SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols INTO o FROM old_rows r;
        SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols INTO n FROM new_rows r;
        PERFORM fluxbase_capture.write_events(root, 'UPDATE', ARRAY[n], ARRAY[o]);
        RETURN NULL;
    ELSIF n_old OPERATOR(pg_catalog.=) n_new THEN
        -- The two transition tables side by side, in the order PostgreSQL appended them, one
        -- pair at a time, written every 16 MiB of images.
        OPEN c_old FOR SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols FROM old_rows r;
        OPEN c_new FOR SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols FROM new_rows r;
        LOOP
            FETCH c_old INTO o;
            EXIT WHEN NOT FOUND;
            FETCH c_new INTO n;
            olds := pg_catalog.array_append(olds, o);
            news := pg_catalog.array_append(news, n);
            held := held OPERATOR(pg_catalog.+) pg_catalog.pg_column_size(o)
                    OPERATOR(pg_catalog.+) pg_catalog.pg_column_size(n);
            IF held OPERATOR(pg_catalog.>=) 16777216 THEN
                PERFORM fluxbase_capture.write_events(root, 'UPDATE', news, olds);
                olds := '{}';
                news := '{}';
                held := 0;
            END IF;
        END LOOP;
        CLOSE c_old;
        CLOSE c_new;
        IF pg_catalog.cardinality(olds) OPERATOR(pg_catalog.>) 0 THEN
            PERFORM fluxbase_capture.write_events(root, 'UPDATE', news, olds);
        END IF;
        RETURN NULL;
    END IF;
    -- A moved row was dropped by its new partition's BEFORE INSERT trigger: the positions no
    -- longer pair. What happened to the rows, without pairing one row with another's image: the
    -- old images as DELETEs, the new ones as INSERTs.
    FOREACH op IN ARRAY ARRAY['DELETE', 'INSERT'] LOOP
        IF op OPERATOR(pg_catalog.=) 'DELETE' THEN
            OPEN c_old FOR SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols FROM old_rows r;
        ELSE
            OPEN c_old FOR SELECT pg_catalog.to_jsonb(r.*) OPERATOR(pg_catalog.-) cols FROM new_rows r;
        END IF;
        LOOP
            FETCH c_old INTO o;
            EXIT WHEN NOT FOUND;
            olds := pg_catalog.array_append(olds, o);
            held := held OPERATOR(pg_catalog.+) pg_catalog.pg_column_size(o);
            IF held OPERATOR(pg_catalog.>=) 16777216 THEN
                PERFORM fluxbase_capture.write_events(root, op, olds, CASE WHEN op OPERATOR(pg_catalog.=) 'DELETE' THEN olds END);
                olds := '{}';
                held := 0;
            END IF;
        END LOOP;
        CLOSE c_old;
        IF pg_catalog.cardinality(olds) OPERATOR(pg_catalog.>) 0 THEN
            PERFORM fluxbase_capture.write_events(root, op, olds, CASE WHEN op OPERATOR(pg_catalog.=) 'DELETE' THEN olds END);
        END IF;
        olds := '{}';
        held := 0;
    END LOOP;
    RETURN NULL;
END
$$;

GRANT EXECUTE ON FUNCTION fluxbase_capture.capture_root(pg_catalog.regclass),
    fluxbase_capture.capture_tree_insert(), fluxbase_capture.capture_tree_delete(),
    fluxbase_capture.capture_tree_update() TO PUBLIC;

-- A table and the partitions below it, at any depth, with their level: pg_inherits, so a
-- partition left pending detach (DETACH ... CONCURRENTLY interrupted), which pg_partition_tree
-- omits, is in it (hostile review 30). Inheritance children (INHERITS) are not partitions.
CREATE OR REPLACE FUNCTION fluxbase_capture.partition_tree(p_table regclass)
    RETURNS TABLE (relid regclass, level integer)
    LANGUAGE sql STABLE SECURITY INVOKER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE t(relid, level) AS (
        SELECT p_table, 0
        UNION ALL
        SELECT i.inhrelid::regclass, t.level + 1
        FROM t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.relid
        JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
        WHERE c.relispartition AND c.relkind IN ('r', 'p')
    )
    SELECT t.relid, t.level FROM t
$$;
GRANT EXECUTE ON FUNCTION fluxbase_capture.partition_tree(regclass) TO PUBLIC;

-- The table and every partition below it, the root first: dropping a root's row-level trigger
-- drops its clones (sql/0012's shape).
CREATE OR REPLACE FUNCTION fluxbase_capture.detach_capture(p_table regclass) RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT r.relid FROM fluxbase_capture.partition_tree(p_table) r ORDER BY r.level LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_ins ON %s', t);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_upd ON %s', t);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_del ON %s', t);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_trunc ON %s', t);
    END LOOP;
END
$$;

-- A partition and the partitions below it: the partition shape when the tree's root is captured,
-- no capture triggers when it is not.
CREATE OR REPLACE FUNCTION fluxbase_capture.attach_partition_capture(p_table regclass) RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    t regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                   WHERE g.tgrelid = fluxbase_capture.capture_root(p_table)
                     AND g.tgname = 'fluxbase_capture_ins') THEN
        PERFORM fluxbase_capture.detach_capture(p_table);
        RETURN;
    END IF;
    FOR t IN SELECT r.relid FROM fluxbase_capture.partition_tree(p_table) r ORDER BY r.level LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_ins ON %s', t);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_upd ON %s', t);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_del ON %s', t);
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS fluxbase_capture_trunc ON %s', t);
        EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_ins AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_tree_insert()', t);
        EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_upd AFTER UPDATE ON %s '
                                  'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_tree_update()', t);
        EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_del AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_tree_delete()', t);
        EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_trunc AFTER TRUNCATE ON %s '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_truncate()', t);
    END LOOP;
END
$$;

-- After an ALTER TABLE of a partitioned table (ATTACH PARTITION names the parent): each direct
-- partition whose capture does not match its tree's (a table attached with a plain table's
-- capture, or with none into a captured tree) gets the partition shape, or none. Partitions that
-- already match are not touched (no lock taken on them).
CREATE OR REPLACE FUNCTION fluxbase_capture.reshape_partitions(p_parent regclass) RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    captured boolean := EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                                WHERE g.tgrelid = fluxbase_capture.capture_root(p_parent)
                                  AND g.tgname = 'fluxbase_capture_ins');
    shaped regprocedure := 'fluxbase_capture.capture_tree_insert()'::regprocedure;
    child regclass;
BEGIN
    FOR child IN SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = p_parent AND c.relkind IN ('r', 'p')
                   AND ((captured AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                                                  WHERE g.tgrelid = i.inhrelid AND g.tgname = 'fluxbase_capture_ins'
                                                    AND g.tgfoid = shaped))
                        OR (NOT captured AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                                                     WHERE g.tgrelid = i.inhrelid
                                                       AND g.tgname LIKE 'fluxbase\_capture\_%'))) LOOP
        PERFORM fluxbase_capture.attach_partition_capture(child);
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION fluxbase_capture.attach_partition_capture(regclass),
    fluxbase_capture.reshape_partitions(regclass) TO PUBLIC;

-- Tables of a schema that were partitions and are no longer (DETACH PARTITION, whose command
-- names the parent, not them): they still have a partition's triggers. Each becomes a table of
-- its own for capture: captured as any table, unless realtime was switched off for its name,
-- which its stay in a captured tree did not change (hostile review 31).
CREATE OR REPLACE FUNCTION fluxbase_capture.settle_detached(p_schema oid) RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid, c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_trigger g ON g.tgrelid = c.oid
             WHERE c.relnamespace = p_schema AND NOT c.relispartition AND c.relkind IN ('r', 'p')
               AND g.tgname = 'fluxbase_capture_ins'
               AND g.tgfoid = 'fluxbase_capture.capture_tree_insert()'::regprocedure LOOP
        IF fluxbase_capture.capture_disabled(t.relname::text) THEN
            PERFORM fluxbase_capture.detach_capture(t.oid::regclass);
        ELSE
            PERFORM fluxbase_capture.attach_capture(t.oid::regclass);
        END IF;
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION fluxbase_capture.settle_detached(oid) TO PUBLIC;

CREATE OR REPLACE FUNCTION fluxbase_capture.attach_capture(p_table regclass) RETURNS void
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    kind "char";
    part boolean;
BEGIN
    SELECT c.relkind, c.relispartition INTO kind, part FROM pg_catalog.pg_class c WHERE c.oid = p_table;
    IF part THEN
        PERFORM fluxbase_capture.attach_partition_capture(p_table);
        RETURN;
    END IF;
    PERFORM fluxbase_capture.detach_capture(p_table);
    EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_ins AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                              'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_insert()', p_table);
    IF kind = 'p' THEN
        EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_upd AFTER UPDATE ON %s '
                                  'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                                  'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_tree_update()', p_table);
    ELSE
        EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_upd AFTER UPDATE ON %s '
                                  'FOR EACH ROW EXECUTE FUNCTION fluxbase_capture.capture_update()', p_table);
    END IF;
    EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_del AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                              'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_delete()', p_table);
    EXECUTE pg_catalog.format('CREATE TRIGGER fluxbase_capture_trunc AFTER TRUNCATE ON %s '
                              'FOR EACH STATEMENT EXECUTE FUNCTION fluxbase_capture.capture_truncate()', p_table);
    IF kind = 'p' THEN
        PERFORM fluxbase_capture.attach_partition_capture(i.inhrelid::regclass)
        FROM pg_catalog.pg_inherits i JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = p_table AND c.relkind IN ('r', 'p');
    END IF;
END
$$;

-- The DDL event trigger as in sql/0012, and: a new partition is attached whatever realtime_tables
-- says of its name (attach_capture decides by its root); after an ALTER TABLE of a partitioned
-- table (ATTACH and DETACH PARTITION name the parent), reshape_partitions and settle_detached.
CREATE OR REPLACE FUNCTION fluxbase.on_ddl_end() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog
AS $$
DECLARE
    cmd record;
    main record;
    found_main boolean := false;
BEGIN
    FOR cmd IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN cmd.schema_name IS NULL OR cmd.schema_name !~ '^p_[0-9a-f]{16}$';
        -- (a partition follows its root, whatever realtime_tables says of its name)
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
           AND (EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = cmd.objid AND c.relispartition)
                OR NOT fluxbase_capture.capture_disabled(pg_catalog.split_part(cmd.object_identity, '.', 2))) THEN
            PERFORM fluxbase_capture.attach_capture(cmd.objid::regclass);
        ELSIF cmd.object_type = 'table' AND cmd.command_tag = 'ALTER TABLE'
              AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = cmd.objid AND c.relkind = 'p') THEN
            PERFORM fluxbase_capture.reshape_partitions(cmd.objid::regclass);
            PERFORM fluxbase_capture.settle_detached(
                (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = cmd.objid));
        END IF;
        -- One event per statement: the command that matches the statement's own tag.
        IF NOT found_main THEN
            main := cmd;
            found_main := true;
        ELSIF cmd.command_tag = TG_TAG AND main.command_tag <> TG_TAG THEN
            main := cmd;
        END IF;
    END LOOP;
    IF NOT found_main THEN
        RETURN;
    END IF;
    IF TG_TAG = 'CREATE TRIGGER' AND main.object_identity LIKE 'fluxbase_capture_%' THEN
        RETURN;
    END IF;
    PERFORM fluxbase_capture.write_schema_event(
        main.schema_name,
        CASE WHEN main.object_type IN ('table', 'table column') THEN pg_catalog.split_part(main.object_identity, '.', 2) END,
        TG_TAG,
        pg_catalog.jsonb_build_object('command', TG_TAG, 'object', main.object_identity, 'objectType', main.object_type));
END
$$;

-- Trees captured before this file get the new shape (the root first drops its cloned row-level
-- trigger from every partition). A tree switched off loses any capture a partition of it still
-- has (before this file, a captured table attached to such a tree kept its own: hostile review
-- 30). Plain tables are left as they are.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.oid,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                            WHERE g.tgrelid = c.oid AND g.tgname = 'fluxbase_capture_ins') AS captured
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'p' AND NOT c.relispartition AND n.nspname ~ '^p_[0-9a-f]{16}$' LOOP
        IF t.captured THEN
            PERFORM fluxbase_capture.attach_capture(t.oid::regclass);
        ELSIF EXISTS (SELECT 1 FROM fluxbase_capture.partition_tree(t.oid::regclass) r
                      JOIN pg_catalog.pg_trigger g ON g.tgrelid = r.relid
                      WHERE g.tgname LIKE 'fluxbase\_capture\_%') THEN
            PERFORM fluxbase_capture.detach_capture(t.oid::regclass);
        END IF;
    END LOOP;
END
$$;
