"""The per-request session reset in one C call (issue 24), its guard, and the six-statement
reset where the server has no such function (tenancy/wire.py, db/capture.install_reset).

Each request on a pooled tenant session first clears what the previous one left there. Where
ext/fluxbase_capture loads, that is `CLOSE ALL` and fluxbase_guard.reset_session(), which does
what UNLISTEN *, RESET ALL, DISCARD TEMP, DISCARD SEQUENCES and pg_advisory_unlock_all() do.
Every role may execute it, so it refuses inside a request (once any setting changed in the
transaction): tenant SQL must not get the RESET ALL the classifier refuses it (it would drop the
request's SET LOCAL identity and caps).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from conftest import Instance
from fluxbase.db import capture as cap
from fluxbase.tenancy import wire
from support import Api, Stack
from support import end_user as _user_token
from support import has_capture_library as _has_library
from support import own_project as _own
from support import sql_body as _sql

REFUSED = "fluxbase_guard.reset_session() may only begin a request"
REFUSED_BEGIN = "fluxbase_guard.begin_request() may only begin a request"


async def test_sessions_of_a_server_with_the_library_use_the_c_reset(
    stack: Stack, instance: Instance, control_db: asyncpg.Pool, project: Any
) -> None:
    """The login query tells a session which reset its server has; the embedded server has the
    library (`make venv` builds it), so its sessions run the two-step reset."""
    from fluxbase.config import load_settings
    from fluxbase.tenancy.pools import TenantPools

    if not await _has_library(control_db):
        pytest.skip("FLUXBASE_TEST_DATABASE_URL's server has no fluxbase_capture library (docs/capture.md)")
    pools = TenantPools(load_settings(instance.env), max_size=1)
    try:
        pool = await pools.pool(project.id, "admin")
        async with pool.connection() as conn:
            assert conn.request_prefix.native_reset is True
            # ...which a session may run between requests, outside any transaction.
            await conn.execute("; ".join(wire.NATIVE_RESET_STEPS))
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await pools.close()
    assert wire.RESET_STEPS[0] == wire.NATIVE_RESET_STEPS[0]  # a fresh session's only step


async def test_tenant_sql_cannot_call_the_reset(api: Api, project: Any, control_db: asyncpg.Pool) -> None:
    """Through the API, with every kind of key and an end user, on the one-round-trip path and
    the explicit one, directly, in a subquery, in a DO block and in a function: refused (42501),
    and the request's identity is what it was."""
    if not await _has_library(control_db):
        pytest.skip("FLUXBASE_TEST_DATABASE_URL's server has no fluxbase_capture library (docs/capture.md)")
    pid, admin = project.id, project.admin_key
    alice, a_tok = await _user_token(api, pid)
    for q in (
        "CREATE TABLE notes (owner text NOT NULL, v text NOT NULL)",
        f"INSERT INTO notes VALUES ('{alice}', 'alice-row'), ('someone', 'other-row')",
        "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON notes USING (owner = auth.uid())",
        "GRANT SELECT ON notes TO PUBLIC",
        # an admin's functions, which the other roles may call
        "CREATE FUNCTION do_reset() RETURNS void LANGUAGE sql AS 'SELECT fluxbase_guard.reset_session()'",
        "CREATE FUNCTION do_reset_plain() RETURNS void LANGUAGE plpgsql "
        "AS $$ BEGIN PERFORM fluxbase_guard.reset_session(); END $$",
        "CREATE FUNCTION do_begin() RETURNS void LANGUAGE sql "
        "AS $$ SELECT fluxbase_guard.begin_request('forged', '{}', 'admin') $$",
    ):
        assert (await _sql(api, admin, pid, q))["success"], q
    keys = {
        "admin": admin,
        "readwrite": await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000),
        "read": await api.new_key(project.owner_token, pid, "read", rateLimitRequests=1_000_000),
    }
    forged = '\'forged\', \'{"sub": "forged", "role": "admin"}\', \'admin\''
    calls = [
        "SELECT fluxbase_guard.reset_session()",
        # begin_request would also set the identity: the same guard refuses it
        f"SELECT fluxbase_guard.begin_request({forged})",
        f"SELECT v FROM notes WHERE (SELECT fluxbase_guard.begin_request({forged})) IS NULL",
        "SELECT do_begin()",
        "SELECT fluxbase_guard.reset_session() IS NULL AS r, auth.uid() AS uid",
        "SELECT v FROM notes WHERE (SELECT fluxbase_guard.reset_session()) IS NULL",
        "SELECT do_reset()",
        "SELECT do_reset_plain()",
        # the explicit-transaction path (a statement naming an advisory lock takes it)
        "SELECT fluxbase_guard.reset_session(), pg_catalog.pg_advisory_xact_lock(7)",
    ]
    admin_only = [
        "DO $$ BEGIN PERFORM fluxbase_guard.reset_session(); END $$",
        "DO $$ BEGIN EXECUTE 'SELECT fluxbase_guard.reset_session()'; END $$",
        "DO $$ BEGIN PERFORM fluxbase_guard.begin_request('forged', '{}', 'admin'); END $$",
    ]
    tried = 0
    for label, key in keys.items():
        for token in (None, a_tok):
            for q in calls + (admin_only if label == "admin" else []):
                body = await _sql(api, key, pid, q, token)
                assert body["success"] is False, (label, token is not None, q, body)
                assert body["error"]["details"] == "ERROR:  42501", (label, q, body)
                assert (REFUSED if "reset_session" in q or "do_reset" in q else REFUSED_BEGIN) in body[
                    "error"
                ]["message"], body
                tried += 1
            # The refusal left the session as it was: the same identity, the same rows.
            who = await _sql(api, key, pid, "SELECT auth.uid() AS uid, auth.role() AS role", token)
            assert who["success"], who
            assert who["result"]["rows"][0]["uid"] == (alice if token else None), (label, who)
            if label != "admin":  # the admin owns the table: RLS does not apply to it
                rows = await _sql(api, key, pid, "SELECT v FROM notes ORDER BY v", token)
                assert rows["result"]["rows"] == ([{"v": "alice-row"}] if token else []), (label, rows)
    assert tried == 2 * (len(calls) * 3 + len(admin_only))
    # Caught in an exception block, the refusal leaves the request's settings in place.
    body = await _sql(
        api,
        admin,
        pid,
        "DO $$ BEGIN PERFORM fluxbase_guard.reset_session(); "
        "EXCEPTION WHEN insufficient_privilege THEN "
        "IF current_setting('fluxbase.auth_role') = '' THEN RAISE 'identity dropped'; END IF; END $$",
    )
    assert body["success"], body


async def test_what_a_request_leaves_is_gone_by_the_next_with_either_reset(
    spawn: Any, stack: Stack, control_db: asyncpg.Pool
) -> None:
    """A setting, a temporary table, a LISTEN, a sequence's currval, a session advisory lock and
    a held cursor, left by one request, are gone when the next starts on the same backend: with
    the C reset, and with the six statements once the function is dropped."""
    native = await _has_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, _token, key):
        leave = [
            "CREATE SEQUENCE s",
            "CREATE FUNCTION leave() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
            "EXECUTE 'LISTEN left_here'; PERFORM pg_advisory_lock(4242); "
            "PERFORM set_config('work_mem', '1MB', false); PERFORM nextval('s'); "
            "CREATE TEMP TABLE t_left (id int); END $$",
        ]
        for q in leave:
            assert (await _sql(api, key, pid, q))["success"], q
        probe = (
            "SELECT pg_backend_pid() AS p, current_setting('work_mem') AS wm, "
            "(SELECT count(*) FROM pg_catalog.pg_listening_channels()) AS listening, "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid = pg_backend_pid()) AS locks, "
            "to_regclass('pg_temp.t_left') IS NULL AS no_temp"
        )
        variants = [True, False] if native else [False]
        for with_c in variants:
            if not with_c and native:
                su = await asyncpg.connect(stack.database_url(inst.dbname))
                try:
                    await su.execute(
                        "DROP FUNCTION fluxbase_guard.reset_session(); "
                        "DROP FUNCTION fluxbase_guard.begin_request(text, text, text)"
                    )
                finally:
                    await su.close()
            first = await _sql(api, key, pid, "SELECT leave(), pg_backend_pid() AS p")
            assert first["success"], first
            backend = first["result"]["rows"][0]["p"]
            if not with_c and native:
                # That request's session found the function gone and switched to the statements
                # (below); leave the state on it again, which the statements must now clear.
                first = await _sql(api, key, pid, "SELECT leave(), pg_backend_pid() AS p")
                backend = first["result"]["rows"][0]["p"]
            row = (await _sql(api, key, pid, probe))["result"]["rows"][0]
            assert row["p"] == backend, (with_c, row)  # the same session: the checks mean something
            assert row["wm"] != "1MB" and row["locks"] == 0 and row["no_temp"], (with_c, row)
            # UNLISTEN takes effect at its transaction's commit (as the statement's does): gone
            # once the request whose reset ran it committed.
            assert row["listening"] == 1, (with_c, row)
            row = (await _sql(api, key, pid, probe))["result"]["rows"][0]
            assert row["p"] == backend and row["listening"] == 0, (with_c, row)
            currval = await _sql(api, key, pid, "SELECT currval('s')")
            assert currval["success"] is False and currval["error"]["details"] == "ERROR:  55000", currval


async def test_a_session_whose_reset_function_went_away_switches_to_the_statements(
    spawn: Any, stack: Stack, control_db: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fluxbase migrate` drops the function where the library no longer loads. A session that
    found it at login then fails its next reset, first in the pipeline, so nothing else of the
    request ran: the session calls the function to see that it fails, resets with the six
    statements from then on, and the request runs again, instead of failing (and failing again
    on that session)."""
    if not await _has_library(control_db):
        pytest.skip("FLUXBASE_TEST_DATABASE_URL's server has no fluxbase_capture library (docs/capture.md)")
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, _token, key):
        one = await _sql(api, key, pid, "SELECT pg_backend_pid() AS p")
        before = one["result"]["rows"][0]["p"]
        su = await asyncpg.connect(stack.database_url(inst.dbname))
        try:
            monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture_not_here")
            why = await cap.install_reset(su)
            assert why is not None and "fluxbase_capture_not_here" in why, why
            assert await su.fetchval("SELECT to_regprocedure('fluxbase_guard.reset_session()')") is None
            assert (
                await su.fetchval("SELECT to_regprocedure('fluxbase_guard.begin_request(text,text,text)')")
                is None
            )
            for n in range(3):
                body = await _sql(api, key, pid, f"SELECT pg_backend_pid() AS p, {n} AS n")
                assert body["success"], body
                assert body["result"]["rows"] == [{"p": before, "n": n}], body  # the same session
            # Back: a migration recreates it.
            monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture")
            assert await cap.install_reset(su) is None
            assert await cap.install_reset(su) is None  # idempotent: validated, not recreated
            assert await su.fetchval(
                "SELECT has_function_privilege('public', 'fluxbase_guard.reset_session()', 'EXECUTE')"
            )
            body = await _sql(api, key, pid, "SELECT 2 AS two")
            assert body["result"]["rows"] == [{"two": 2}], body
        finally:
            monkeypatch.setattr(cap, "LIBRARY", "$libdir/fluxbase_capture")
            await cap.install_reset(su)
            await su.close()


def test_the_guard_covers_every_setting_the_platform_sets_before_tenant_sql() -> None:
    """The C guard refuses once any of these has a stack entry: the identity and every cap the
    request (and admin_session's platform work) asserts with SET LOCAL (tenancy.statements)."""
    import re
    from pathlib import Path

    from fluxbase.tenancy.statements import ASSERTED

    source = (Path(__file__).parent.parent / "ext/fluxbase_capture/fluxbase_capture.c").read_text()
    block = source[source.index("request_settings[] = {") :]
    listed = set(re.findall(r'"([a-z_.]+)"', block[: block.index("};")]))
    assert listed == set(ASSERTED) | {"fluxbase.auth_uid", "fluxbase.auth_claims", "fluxbase.auth_role"}


async def test_a_role_that_is_not_a_superuser_does_not_install_it(stack: Stack, instance: Instance) -> None:
    conn = await asyncpg.connect(stack.runtime_url(instance.dbname))
    try:
        assert await cap.install_reset(conn) == cap.NOT_SUPERUSER
    finally:
        await conn.close()


async def test_begin_request_resets_then_sets_the_identity_for_its_transaction_only(
    stack: Stack, instance: Instance, control_db: asyncpg.Pool, project: Any
) -> None:
    """Outside a request (a tenant role's own session, as the pool's), begin_request sets the
    three identity settings for its transaction, as SET LOCAL does; a second call in the same
    transaction is refused (the first left stack entries); a null is refused, not skipped."""
    from fluxbase.config import load_settings
    from fluxbase.tenancy.pools import TenantPools

    if not await _has_library(control_db):
        pytest.skip("FLUXBASE_TEST_DATABASE_URL's server has no fluxbase_capture library (docs/capture.md)")
    pools = TenantPools(load_settings(instance.env), max_size=1)
    try:
        pool = await pools.pool(project.id, "admin")
        async with pool.connection() as conn:
            assert conn.request_prefix._begin is not None  # the login query found it
            who = (
                "SELECT current_setting('fluxbase.auth_uid', true) AS u,"
                " current_setting('fluxbase.auth_role', true) AS r"
            )
            async with conn.transaction():
                await conn.execute("SET LOCAL work_mem = '1MB'")  # a request setting: refused
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="begin_request"):
                    await conn.execute("SELECT fluxbase_guard.begin_request('a', '{}', 'user')")
            tx = conn.transaction()
            await tx.start()
            await conn.execute("SELECT fluxbase_guard.begin_request('alice', '{\"sub\":\"alice\"}', 'user')")
            assert tuple(await conn.fetchrow(who)) == ("alice", "user")
            assert await conn.fetchval("SELECT auth.uid()") == "alice"
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="begin_request"):
                await conn.execute("SELECT fluxbase_guard.begin_request('mallory', '{}', 'admin')")
            await tx.rollback()
            assert tuple(await conn.fetchrow(who)) in ((None, None), ("", ""))
            with pytest.raises(asyncpg.NullValueNotAllowedError):
                await conn.execute("SELECT fluxbase_guard.begin_request(NULL, '{}', 'user')")
    finally:
        await pools.close()
