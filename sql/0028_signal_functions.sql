-- A role may signal the backends of its own role (PostgreSQL's rule for pg_cancel_backend and
-- pg_terminate_backend). Every end user of a project shares the scope role with the server keys
-- of that scope, and the backend id set and user ids are public, so an end user could end the
-- connection a server key was using (hostile review 3). Tenants have no use for either
-- function; the runtime role, which ends a project's backends at deadlines and deletion, gets
-- them back in the post-migration step (platform/fluxbase/db/privileges.py).
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_cancel_backend(integer) FROM PUBLIC;
