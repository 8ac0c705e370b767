"""Hostile review 29: fluxbase_guard.begin_request(uid, claims, role) (commit 4c0ee14), the used
session's reset and request identity in one call, and the pipeline order around it.

Attacked, through the real API and PostgreSQL: an end user (readwrite key + user token) calling
begin_request through project functions after a rolled-back subtransaction that set a cap, after
dynamic `RESET fluxbase.auth_*` and `RESET work_mem`, from a SECURITY DEFINER function, after a
procedure's COMMIT, and set_config of the identity directly; session state left by one request
for the next request's begin_request (the call is bound, and its text parameters read, before
its own RESET ALL runs), from the one-round-trip path and from the explicit-transaction path (a
DO block); a server whose begin_request is dropped while sessions still use it (rolling
upgrade).

Found (each a strict xfail, seen failing, until its fix; all three fixed in the same session):

1. (Low-Medium, new with begin_request; needs project code: a function, written by the
   tenant owner, that runs a dynamic SET reaching client_encoding — e.g. a "session
   preference" helper that refuses only fluxbase.* names. Read and readwrite keys and end users
   cannot create functions, and owner code could SET LOCAL fluxbase.auth_uid itself, so this is
   a broken invariant — what a request leaves never reaches the next request's identity —
   rather than a direct escalation.) Session state left by one request changes the identity of
   the next request on that pooled session. A request may leave client_encoding at the session
   level: the classifier refuses the literal SET / set_config forms, not a project function
   whose plpgsql body runs `EXECUTE 'SET client_' || 'encoding = ' || ...` (SECURITY INVOKER:
   SET needs no set_config privilege, so readwrite keys and end users can call it on the
   one-round-trip path). On a used session the next request's identity is the Bind parameters
   of begin_request, which the server decodes with that client_encoding before begin_request's
   own RESET ALL runs: authUid 'é' runs and commits as 'Ã©' (LATIN1; 'ﾃｩ' with SJIS, whose
   result then fails as 0A000 and kills the session), and on the (project, scope, end_user)
   pool that every end user shares, one end user's request mangles the next end user's claims:
   José's auth.jwt()->>'email' becomes 'josÃ©@example.com' (RLS on the email claim; a user
   whose address is another's mangled one carries that user's claim). The SET LOCAL statements
   this replaced were parsed after the reset and were not affected. End to end: Mallory
   registers 'josÃ©-…@example.com', leaves LATIN1, and reads the note José inserts next under
   an RLS policy on the email claim. Tests:
   test_session_encoding_left_by_a_request_does_not_change_the_next_identity,
   test_one_end_users_session_encoding_does_not_change_anothers_claims,
   test_an_end_user_cannot_take_anothers_rows_through_a_left_encoding. Fix ideas: reset before
   binding the identity (the reset step, then an identity step), send the identity in binary
   format (no client-encoding conversion), or refuse/undo a session-level client_encoding at
   run time (a check step, as FXRST does for transaction characteristics). Fixed (with 2):
   `TenantPool.release_now` closes a session a request left with a client encoding other than
   UTF-8 (`wire.unfit`: asyncpg's codec follows the server's reports), so no next request is
   ever bound on it.

2. (Low-Medium, pre-existing: the same with both functions dropped, the six-statement reset.)
   The same left client_encoding reaches asyncpg as a ParameterStatus, and asyncpg encodes the
   next request's text parameters (another principal's on the same pool) in it, while the server,
   reset to UTF8 by the prefix, reads them as UTF-8: 'é' is refused (22021, or 22023 from the
   driver for SJIS/WIN1251) and a value whose LATIN1 bytes are valid UTF-8 is stored as another
   value ('Ã©' as 'é'). Test: test_a_left_encoding_does_not_garble_the_next_principals_parameters.
   Both findings come from the classifier's `_LEXICAL` refusal of client_encoding being static:
   dynamic SQL in a project function sets it at run time. Fixed with 1.

3. (Low, pre-existing since the C reset_session of issue 24; begin_request inherits it.) A
   request that leaves a session-level statement_timeout of 1ms and enough temp tables (2 000)
   bricks its pooled session: each later request's begin_request is one statement whose timer
   was armed before its own RESET ALL, so its DISCARD TEMP is cancelled (57014), the transaction
   rolls back with the state, and the session is handed on to fail the next request — another
   key's of the same scope — for as long as it lives. With the six statements it recovers.
   Admin-only (read and readwrite roles may not create temp tables): one admin key bricks the
   admin pool of its project for the others (trusted servers using authUid). Test:
   test_a_left_statement_timeout_does_not_brick_the_pooled_session. Fix ideas: close a session
   whose reset failed with anything but the guard's 42501, or reset statement_timeout first.
   Fixed: the C reset (both functions) disables the statement timer it was called under, after
   its guard; RESET ALL then sets the setting back for the next message.

Held: every guard vector above is refused with 42501 and leaves auth.uid() the end user's; CALL
of a committing procedure is atomic in the pipeline (2D000); a DO block's session setting does
not survive the explicit path (its simple-protocol reset); a dropped begin_request falls back
to the statements and the request succeeds on the same session; with begin_request dropped the
left encoding does not change the identity (the comparison for finding 1).

Also held: the request's named steps cannot be replaced by a tenant PREPARE (dynamic EXECUTE
'PREPARE' works, but the names are 128-bit random and pg_prepared_statements is denied); read
and readwrite keys and end users cannot create functions or temp tables, and every static form
of changing client_encoding (set_config, SET TO DEFAULT / FROM CURRENT, UPDATE pg_settings) is
refused for them; a plain session-level SET statement_timeout does not outlive its request;
WITH HOLD cursors under a left 1 ms statement_timeout did not brick the readwrite pool; the
broadcast share is clamped to 0..1000 before it is formatted.

Not tried (time): external-IdP claims crafted for JSON injection through a multi-byte encoding
(msgspec escapes `"` as `\\"`; with SJIS/BIG5/GBK a lead byte swallows that backslash and the
quote closes the string, but what follows is outside a string and cannot open one, so it looked
like an invalid-JSON DoS, not injection), realtime checker and webhooks workers, parallel
workers, huge/invalid claims arguments.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from support import Api, Stack, bearer
from support import end_user as _user_token
from support import need_capture_library as _need_library
from support import own_project as _own
from support import sql_body as _sql
from support import sql_rows as _ok

REFUSED_BEGIN = "fluxbase_guard.begin_request() may only begin a request"

SETENC = (
    "CREATE FUNCTION setenc(e text) RETURNS int LANGUAGE plpgsql AS $f$ BEGIN "
    "EXECUTE 'SET client_' || 'encoding = ' || pg_catalog.quote_literal(e); RETURN 1; END $f$"
)


async def _with_setenc(api: Api, admin: str, pid: str, *more: str) -> None:
    """The project function that leaves a client encoding (SETENC, callable by every role), and
    `more` statements of the test's own, run with the admin key."""
    for q in (SETENC, "GRANT EXECUTE ON FUNCTION setenc(text) TO PUBLIC", *more):
        assert (await _sql(api, admin, pid, q))["success"], q


async def _as_uid(api: Api, key: str, pid: str, q: str, uid: str) -> dict[str, Any]:
    r = await api.http.post(
        "/api/execute-sql", json={"projectId": pid, "query": q, "authUid": uid}, headers=bearer(key)
    )
    return dict(r.json())


async def test_session_encoding_left_by_a_request_does_not_change_the_next_identity(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """A readwrite key's request calls a project function (SECURITY INVOKER: plain SET needs no
    set_config privilege) that leaves client_encoding = LATIN1 on the pooled session; the next
    request on that session (the key asserting authUid 'é', as a trusted server does for its
    users) must run as 'é'."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        await _with_setenc(
            api,
            admin,
            pid,
            "CREATE TABLE w (u text)",
            "GRANT SELECT, INSERT ON w TO PUBLIC",
        )
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        await _ok(api, rw, pid, "SELECT 1 AS one")  # used: its next request starts with begin_request
        await _ok(api, rw, pid, "SELECT setenc('LATIN1') AS x")  # (as another authUid, or none)
        body = await _as_uid(api, rw, pid, "INSERT INTO w VALUES (auth.uid())", "é")
        assert body["success"], body
        (row,) = await _ok(api, admin, pid, "SELECT u FROM w")
        assert row["u"] == "é", row  # now 'Ã©': another identity


async def test_a_do_blocks_session_encoding_does_not_outlive_the_explicit_path(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, _token, admin):
        who = "SELECT auth.uid() AS a"
        await _ok(api, admin, pid, "SELECT 1 AS one")
        q = "DO $$ BEGIN PERFORM pg_catalog.set_config('client_' || 'encoding', 'LATIN1', false); END $$"
        assert (await _sql(api, admin, pid, q))["success"]
        body = await _as_uid(api, admin, pid, who, "é")
        assert body["success"] and body["result"]["rows"] == [{"a": "é"}], body


async def test_an_end_user_cannot_reach_begin_request_through_project_functions(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    forged = '\'victim\', \'{"sub": "victim", "role": "service_role"}\', \'admin\''
    for q in (
        "CREATE FUNCTION b_sub() RETURNS text LANGUAGE plpgsql AS $f$ BEGIN "
        "BEGIN PERFORM pg_catalog.set_config('work_mem', '1MB', true); RAISE EXCEPTION 'x'; "
        "EXCEPTION WHEN OTHERS THEN NULL; END; "
        f"PERFORM fluxbase_guard.begin_request({forged}); RETURN auth.uid(); END $f$",
        "CREATE FUNCTION b_reset() RETURNS text LANGUAGE plpgsql AS $f$ BEGIN "
        "EXECUTE 'RESET fluxbase.auth_' || 'uid'; EXECUTE 'RESET fluxbase.auth_' || 'claims'; "
        "EXECUTE 'RESET fluxbase.auth_' || 'role'; EXECUTE 'RESET work_' || 'mem'; "
        f"PERFORM fluxbase_guard.begin_request({forged}); RETURN auth.uid(); END $f$",
        "CREATE FUNCTION b_definer() RETURNS text LANGUAGE plpgsql SECURITY DEFINER AS $f$ BEGIN "
        f"PERFORM fluxbase_guard.begin_request({forged}); RETURN auth.uid(); END $f$",
        "CREATE PROCEDURE b_commit() LANGUAGE plpgsql AS $f$ BEGIN COMMIT; "
        f"PERFORM fluxbase_guard.begin_request({forged}); END $f$",
    ):
        assert (await _sql(api, admin, pid, q))["success"], q
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    uid, token = await _user_token(api, pid)
    expected = {
        "SELECT b_sub() AS u": "42501",
        "SELECT b_reset() AS u": "42501",
        "SELECT b_definer() AS u": "42501",
        "CALL b_commit()": "2D000",
        "SELECT set_config('fluxbase.auth_uid', 'victim', true) AS u": "42501",
    }
    for q, state in expected.items():
        body = await _sql(api, rw, pid, q, token)
        assert body["success"] is False and body["error"]["details"] == f"ERROR:  {state}", (q, body)
        if "b_" in q and state == "42501":
            assert REFUSED_BEGIN in body["error"]["message"], body
        assert await _ok(api, rw, pid, "SELECT auth.uid() AS u", token) == [{"u": uid}], q


async def test_a_dropped_begin_request_falls_back_to_the_statements(
    spawn: Any, stack: Stack, control_db: asyncpg.Pool
) -> None:
    """Rolling upgrade: sessions found begin_request at login; it is dropped (reset_session
    stays). The next request's call fails (42883), the probe fails the same, the session switches
    to the statements and the request runs again, as the end user, on the same session."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, token, _admin):
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        uid, user = await _user_token(api, pid)
        who = "SELECT auth.uid() AS u, pg_backend_pid() AS p"
        (first,) = await _ok(api, rw, pid, who, user)
        (second,) = await _ok(api, rw, pid, who, user)
        su = await asyncpg.connect(stack.database_url(inst.dbname))
        try:
            await su.execute("DROP FUNCTION fluxbase_guard.begin_request(text, text, text)")
        finally:
            await su.close()
        (third,) = await _ok(api, rw, pid, who, user)
        assert first["u"] == second["u"] == third["u"] == uid
        assert third["p"] == second["p"], (second, third)


async def test_one_end_users_session_encoding_does_not_change_anothers_claims(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """End users of a project share its (project, scope, end_user) pool. Mallory calls a project
    function that leaves client_encoding = LATIN1; José's next request on that session must see
    his own email in auth.jwt(). Now he runs, and writes, as 'josÃ©@...': with an address that is
    another user's mangled one, his requests carry that user's email claim (RLS on
    auth.jwt()->>'email')."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        await _with_setenc(
            api,
            admin,
            pid,
            "CREATE TABLE mail (e text)",
            "GRANT SELECT, INSERT ON mail TO PUBLIC",
        )
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        _, jose = await _user_token(api, pid, "josé@example.com")
        _, mallory = await _user_token(api, pid, f"mallory-{pid[-6:]}@example.com")
        await _ok(api, rw, pid, "SELECT 1 AS one", jose)  # the end-user session is used
        await _ok(api, rw, pid, "SELECT setenc('LATIN1') AS x", mallory)
        body = await _sql(api, rw, pid, "INSERT INTO mail VALUES (auth.jwt() ->> 'email')", jose)
        assert body["success"], body
        (row,) = await _ok(api, admin, pid, "SELECT e FROM mail")
        assert row["e"] == "josé@example.com", row  # now 'josÃ©@example.com'


async def test_with_the_set_local_statements_the_left_encoding_does_not_change_the_identity(
    spawn: Any, stack: Stack, control_db: asyncpg.Pool
) -> None:
    """The comparison for finding 1: without begin_request (dropped; the C reset_session
    stays), the same sequence runs as 'é': the SET LOCAL identity is parsed after the reset."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, token, admin):
        su = await asyncpg.connect(stack.database_url(inst.dbname))
        try:
            await su.execute("DROP FUNCTION fluxbase_guard.begin_request(text, text, text)")
        finally:
            await su.close()
        await _with_setenc(
            api,
            admin,
            pid,
            "CREATE TABLE w (u text)",
            "GRANT SELECT, INSERT ON w TO PUBLIC",
        )
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        await _ok(api, rw, pid, "SELECT 1 AS one")
        await _ok(api, rw, pid, "SELECT setenc('LATIN1') AS x")
        body = await _as_uid(api, rw, pid, "INSERT INTO w VALUES (auth.uid())", "é")
        assert body["success"], body
        (row,) = await _ok(api, admin, pid, "SELECT u FROM w")
        assert row["u"] == "é", row


async def test_a_left_encoding_does_not_garble_the_next_principals_parameters(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """One principal's request leaves client_encoding = LATIN1 on the pooled session; the next
    request (another principal's) binds the text parameter 'é': asyncpg now encodes it as
    LATIN1 (0xE9) and the server, reset to UTF8 by then, refuses it (22021); a parameter whose
    LATIN1 bytes are valid UTF-8 ('Ã©') would be stored as another value ('é')."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        await _with_setenc(
            api,
            admin,
            pid,
            "CREATE TABLE w2 (v text)",
            "GRANT SELECT, INSERT ON w2 TO PUBLIC",
        )
        mallory = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        victim = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        await _ok(api, mallory, pid, "SELECT setenc('LATIN1') AS x")
        body = await _sql(api, victim, pid, "INSERT INTO w2 VALUES ($1)", None, ["Ã©"])
        assert body["success"], body
        (row,) = await _ok(api, admin, pid, "SELECT v FROM w2")
        assert row["v"] == "Ã©", row


BRICK = (
    "CREATE FUNCTION brick(n int) RETURNS int LANGUAGE plpgsql AS $f$ BEGIN "
    "FOR i IN 1..n LOOP EXECUTE format('CREATE TEMP TABLE tt%s (a int, b text, c jsonb)', i); END LOOP; "
    "EXECUTE 'SET statement_' || 'timeout = ''1ms'''; RETURN n; END $f$"
)


async def test_a_left_statement_timeout_does_not_brick_the_pooled_session(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """An admin key's request leaves 2 000 temp tables and statement_timeout = 1ms at the
    session level (dynamic SQL in a function, on the one-round-trip path). Every later request
    on that session starts with begin_request, one statement that does RESET ALL and DISCARD
    TEMP under the 1 ms timer armed before its RESET ALL: 57014, the transaction rolls back, the
    state stays, and the session is handed on to fail the next request too (another admin key's,
    e.g. a trusted server's for its users) for as long as it lives.
    (Admin-only: read and readwrite roles may not create temp tables.) With both C functions
    dropped the session recovers (RESET ALL is a statement of its own there)."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        assert (await _sql(api, admin, pid, BRICK))["success"]
        other = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
        await _ok(api, admin, pid, "SELECT 1 AS one")
        await _ok(api, admin, pid, "SELECT brick(2000) AS x")
        bodies = [await _sql(api, other, pid, "SELECT 1 AS one") for _ in range(3)]
        assert any(b["success"] for b in bodies), bodies


async def test_an_end_user_cannot_take_anothers_rows_through_a_left_encoding(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """Rows owned by the email claim (RLS: owner = auth.jwt()->>'email'). Mallory registers
    'josÃ©@…' (José's address as LATIN1 reads its UTF-8 bytes), calls a project function that
    leaves client_encoding = LATIN1 on the end-user session, and José's next request there
    inserts his note as 'josÃ©@…': Mallory's. Mallory must not read it."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        await _with_setenc(
            api,
            admin,
            pid,
            "CREATE TABLE notes (owner text NOT NULL DEFAULT auth.jwt() ->> 'email', body text)",
            "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY mine ON notes USING (owner = auth.jwt() ->> 'email') "
            "WITH CHECK (owner = auth.jwt() ->> 'email')",
            "GRANT SELECT, INSERT ON notes TO PUBLIC",
        )
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        tag = pid[-6:]
        _, jose = await _user_token(api, pid, f"josé-{tag}@example.com")
        _, mallory = await _user_token(api, pid, f"josÃ©-{tag}@example.com")
        await _ok(api, rw, pid, "SELECT 1 AS one", jose)  # the end-user session is used
        await _ok(api, rw, pid, "SELECT setenc('LATIN1') AS x", mallory)
        body = await _sql(api, rw, pid, "INSERT INTO notes (body) VALUES ('josé: my secret')", jose)
        assert body["success"], body
        assert await _ok(api, rw, pid, "SELECT body FROM notes", mallory) == []
