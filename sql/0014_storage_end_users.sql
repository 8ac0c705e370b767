-- Storage for end users (issue 15): per-bucket rules that say what an end user (a request with
-- an end-user token) may do with a bucket's files, and who uploaded each file.
--
-- Each of the five operations has one rule: 'none' (no end user; the default, so existing and
-- new buckets stay closed to browser keys until their owner opens them), 'authenticated' (any
-- end user of the project), 'owner' (files whose owner_uid is the user's id; any end user may
-- upload new files, which become theirs) or 'userFolder' (names whose first path segment is
-- the user's id). The platform evaluates them (storage/rules.py), never tenant SQL: these rows
-- are in the control plane, and tenant-written policies must never run with its rights.
-- Public buckets are readable by anyone regardless of eu_read. See docs/storage-access.md.

ALTER TABLE fluxbase.buckets
    ADD COLUMN IF NOT EXISTS eu_list text NOT NULL DEFAULT 'none'
        CHECK (eu_list IN ('none', 'authenticated', 'owner', 'userFolder')),
    ADD COLUMN IF NOT EXISTS eu_read text NOT NULL DEFAULT 'none'
        CHECK (eu_read IN ('none', 'authenticated', 'owner', 'userFolder')),
    ADD COLUMN IF NOT EXISTS eu_insert text NOT NULL DEFAULT 'none'
        CHECK (eu_insert IN ('none', 'authenticated', 'owner', 'userFolder')),
    ADD COLUMN IF NOT EXISTS eu_update text NOT NULL DEFAULT 'none'
        CHECK (eu_update IN ('none', 'authenticated', 'owner', 'userFolder')),
    ADD COLUMN IF NOT EXISTS eu_delete text NOT NULL DEFAULT 'none'
        CHECK (eu_delete IN ('none', 'authenticated', 'owner', 'userFolder'));

-- The end user (`sub` of the token) who uploaded the file; NULL for uploads by keys and members.
ALTER TABLE fluxbase.objects ADD COLUMN IF NOT EXISTS owner_uid text;
