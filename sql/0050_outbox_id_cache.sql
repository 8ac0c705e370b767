-- Capture that costs less (issue 20): the outbox's identity sequence hands each backend 64 ids
-- at a time. With CACHE 1 every captured row's nextval pinned and locked the sequence's page and
-- WAL-logged every 32nd value (about 4% of a captured write's CPU). Nothing reads `id` alone:
-- every reader orders and compares (xid, id), and within one transaction (one backend) the ids
-- still increase in insertion order; across backends they were never in commit order anyway.
-- What changes: gaps (up to 63 ids per backend that ends), which identity columns have anyway.
ALTER TABLE fluxbase.events ALTER COLUMN id SET CACHE 64;
