"""Hostile review 24: parse after the request prefix (wire.prepare_after) and the C reset's
failure handling (RequestPrefix.reset_failed), issue 24, commits 7449026, f0b4d3d, bcdd57a.

Attacked through the real API and PostgreSQL: parse-time tenant code (a domain CHECK reached
through an array literal) after statement-cache eviction, with an end user, a read key and a
read-only project, in the introspection branch (a new enum; a domain's array type does it too),
after a prefix refusal surfacing from the prepare (FXU01, FXEPO, FXRST), with parameters refused
after the prefix went out; the reset probe and the retry; the C guard on RLS management.

Holes found (each test was a strict xfail, seen failing, until its fix):

1. A request refused for its parameters (ParamError: count or type; asyncpg's own encoding
   refusal, e.g. int4 out of range) after prepare_after wrote the prefix: `prefix.drain` ends the
   implicit transaction with a Sync, i.e. COMMITs what the tenant's parse-time code wrote in it,
   and the request is answered 22023.
2. The introspection branch: the first transaction (prefix + Parse) is drained, i.e. COMMITTED,
   before asyncpg introspects; the statement runs in a second one. A statement that then fails
   (22012) leaves its parse-time writes committed.
3. The same split gives one request two transactions, each with the full broadcast share
   (sql/0042 counts per top-level xid): a readwrite key limited to 3 requests (share 2) sends 4
   broadcasts in one request, 2 from parse-time code and 2 from the statement.
4. reset_failed takes ANY error of its probe for "the C reset is gone". The probe runs on the
   state the failed request's rollback restored (what the previous request left): a temporary
   trigger function of an admin's on a permanent table makes the probe's DISCARD TEMP wait for
   that table's lock; held (by the tenant's own readwrite key) past the role's lock_timeout,
   the probe fails with 55P03: the server is marked (60 s, every project's new sessions on that
   database use the six statements; renewable) and the statement runs a second time.

Fixed: (1)-(3) `drain` rolls back (a failing step before its Sync), and the introspection branch
rolls back, introspects, and parses the statement again under a new name after a new prefix, so
parse-time code takes effect only in the transaction that runs the statement (once). (4) only a
probe failing with the same codes (42883, 58P01, 58000, XX000) counts as the C reset unable to run.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg

from support import Api, bearer
from support import end_user as _user_token
from support import need_capture_library as _need_library
from support import own_project as _own
from support import post_sql as _post
from support import sql_body as _sql
from support import sql_rows as _ok


async def _parse_hook(api: Api, admin: str, pid: str) -> None:
    """A domain whose CHECK inserts a row into `hooked` (the value, the identity it saw) each
    time it is evaluated: an array literal of the domain is checked while the statement is
    parsed (array_in calls domain_in), not when it runs."""
    sch = f"p_{pid}"
    for q in (
        "CREATE TABLE hooked (v text, uid text, ro text)",
        "GRANT SELECT, INSERT ON hooked TO PUBLIC",
        "CREATE FUNCTION hook(v text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
        f"INSERT INTO {sch}.hooked VALUES (v, current_setting('fluxbase.auth_uid', true), "
        "current_setting('transaction_read_only')); RETURN true; END $$",
        "GRANT EXECUTE ON FUNCTION hook(text) TO PUBLIC",
        f"CREATE DOMAIN hooked_d AS text CHECK ({sch}.hook(VALUE))",
    ):
        await _ok(api, admin, pid, q)


async def _hooked(api: Api, admin: str, pid: str, v: str) -> list[dict[str, Any]]:
    return await _ok(api, admin, pid, f"SELECT v, uid, ro FROM hooked WHERE v = '{v}'")


# -- parse-time tenant code and the request's atomicity ---------------------------------------------


async def test_a_request_refused_for_its_parameters_commits_nothing_parse_time_code_wrote(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """The statement is parsed after the prefix (wire.prepare_after), then the JSON parameters
    are adapted to the parameter types the Parse reported; when they do not fit (ParamError:
    a wrong count, a value of the wrong type) the request is answered 22023 and
    `prefix.drain` ends the transaction with a Sync, i.e. COMMITs it, with whatever the tenant's
    parse-time code (the domain CHECK) wrote in it. A failed request must leave nothing."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    await _parse_hook(api, admin, pid)
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    # a wrong count and a wrong type (ParamError), and a value asyncpg refuses to encode
    # (wire.refused_encoding: int4 out of range), each after the prefix and the Parse went out
    for tag, params in (("count", []), ("type", ["not a number"]), ("range", [2**40])):
        body = await _sql(
            api, rw, pid, f"SELECT '{{pe-{tag}}}'::hooked_d[]::text AS v, $1::int4 AS n", params=params
        )
        assert body["success"] is False, (tag, body)
    leaked = await _ok(api, admin, pid, "SELECT v FROM hooked WHERE v LIKE 'pe-%' ORDER BY v")
    assert leaked == [], leaked  # now: pe-count, pe-range, pe-type


async def _enum(api: Api, admin: str, pid: str) -> str:
    """A new enum type: no session has its codec yet, so asyncpg must introspect it on the
    first statement returning it (wire.prepare_after's `drain` branch)."""
    name = f"mood_{secrets.token_hex(4)}"
    await _ok(api, admin, pid, f"CREATE TYPE {name} AS ENUM ('ok', 'sad')")
    return name


async def test_a_failing_statement_whose_types_need_introspection_commits_nothing_parse_time_code_wrote(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """The introspection branch: the statement returns a type the session's asyncpg has no codec
    for (a new enum), so prepare_after ends the prefix's transaction (`drain`, a Sync: COMMIT)
    before introspecting, and the statement runs later in a second transaction. What the
    tenant's parse-time code wrote in the first is committed even when the statement then fails
    (here 22012 at run time): the request is answered as failed, its writes stay."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    await _parse_hook(api, admin, pid)
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    mood = await _enum(api, admin, pid)
    body = await _sql(
        api, rw, pid, f"SELECT '{{intro-fail}}'::hooked_d[]::text AS v, 'ok'::{mood} AS m, 1 / 0 AS boom"
    )
    assert body["success"] is False and body["error"]["details"] == "ERROR:  22012", body
    leaked = await _hooked(api, admin, pid, "intro-fail")
    assert leaked == [], leaked


async def test_the_introspection_branch_does_not_double_a_requests_broadcast_share(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """sql/0042: a transaction may broadcast what is left of its credential's rate-limit window,
    counted per top-level transaction. The introspection branch runs one request as two
    transactions (the prefix with the Parse, drained and committed; the prefix again with the
    statement), each with the full share: parse-time code (a domain CHECK calling
    realtime.broadcast for each element of an array literal) spends it in the first, the
    statement again in the second. A readwrite key limited to 3 requests (a share of 2 for its
    first request) sends 4 broadcasts in one request; without a type to introspect the same
    request is refused (429)."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    for q in (
        "CREATE FUNCTION shout(v text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM realtime.broadcast('room', jsonb_build_object('v', v)); RETURN true; END $$",
        "GRANT EXECUTE ON FUNCTION shout(text) TO PUBLIC",
        f"CREATE DOMAIN shout_d AS text CHECK (p_{pid}.shout(VALUE))",
    ):
        await _ok(api, admin, pid, q)
    mood = await _enum(api, admin, pid)
    count = "SELECT count(*) FROM fluxbase.events WHERE project_id = $1 AND kind = 'broadcast'"

    async def sent_by(q: str) -> tuple[int, dict[str, Any]]:
        key = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=3)
        before = await control_db.fetchval(count, pid)
        body = await _sql(api, key, pid, q)
        return await control_db.fetchval(count, pid) - before, body

    runtime = "(SELECT count(realtime.broadcast('room', '{}'::jsonb)) FROM generate_series(1, 2) g) AS n"
    # control: the share is 2 (2 at parse time and 2 at run time in one transaction: refused)
    sent, body = await sent_by(f"SELECT '{{a,b}}'::shout_d[]::text AS v, {runtime}")
    assert sent == 0 and body["success"] is False, (sent, body)
    # the same with a result the session's asyncpg must introspect (a new enum; a domain's
    # array type, e.g. the literal's own, would do too)
    sent, body = await sent_by(f"SELECT '{{c,d}}'::shout_d[]::text AS v, 'ok'::{mood} AS m, {runtime}")
    assert sent <= 2, (sent, body)  # now: 4, and the request succeeds


# -- the C reset's failure handling (RequestPrefix.reset_failed) ---------------------------------------


async def _leave_lock_bait(api: Api, admin: str, pid: str, also: str = "") -> None:
    """What an admin request leaves in its session for the next request's reset: a temporary
    trigger function used by a trigger on a permanent table. The reset's DISCARD TEMP
    (ResetTempTableNamespace, CASCADE) drops that trigger, which takes an AccessExclusiveLock on
    the permanent table: the reset waits for any lock on it, up to the role's lock_timeout."""
    # A function called on the one-round-trip path (the explicit path resets at its COMMIT).
    await _ok(
        api,
        admin,
        pid,
        "CREATE OR REPLACE FUNCTION leave_bait() RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        "CREATE FUNCTION pg_temp.bait() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'; "
        "EXECUTE 'CREATE TRIGGER bait BEFORE INSERT ON locked_t FOR EACH ROW "
        "EXECUTE FUNCTION pg_temp.bait()'; "
        "RETURN 1; END $$",
    )
    await _ok(api, admin, pid, f"SELECT leave_bait() AS b{also}")


async def test_a_tenant_cannot_make_the_reset_probe_fail_and_its_statement_run_twice(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """reset_failed decides "the C reset failed" by calling it once more on the failed request's
    session, and takes ANY error of that call for the function being gone: it then marks the
    server (60 s: every new session there resets with the six statements), switches the session,
    and runs the request again. The session's state at the probe is what the failed request's
    rollback restored, i.e. what the previous request left (the reset is transactional). An
    admin key leaves a temporary trigger function used by a trigger on a permanent table; its
    next statement (a 42883 raised at run time after a nextval, a second later) fails while its
    readwrite key holds a lock on that table for longer than the role's lock_timeout (5 s):
    the probe's DISCARD TEMP waits, times out (55P03), the server is marked, and the statement
    runs a second time (nextval twice). Any statement error that ends in 42883, 58P01, 58000 or
    XX000 (a missing function: no plpgsql needed) can be followed by the probe."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, token, admin):
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        for q in (
            "CREATE TABLE locked_t (v int)",
            "INSERT INTO locked_t VALUES (1)",
            "GRANT SELECT ON locked_t TO PUBLIC",
            "CREATE SEQUENCE runs",
            "CREATE FUNCTION boom() RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM nextval('runs'); PERFORM pg_sleep(1); EXECUTE 'SELECT no_such_function_r24()'; "
            "RETURN 1; END $$",
        ):
            await _ok(api, admin, pid, q)
        await _leave_lock_bait(api, admin, pid)
        failing = asyncio.create_task(_sql(api, admin, pid, "SELECT boom() AS b"))
        await asyncio.sleep(0.4)  # its reset has run; boom() sleeps
        holder = asyncio.create_task(_sql(api, rw, pid, "SELECT pg_sleep(7) FROM locked_t"))
        body = await failing
        await holder
        assert body["success"] is False and body["error"]["details"] == "ERROR:  42883", body
        (row,) = await _ok(api, admin, pid, "SELECT last_value AS n FROM runs")
        marked = "the C session reset failed" in inst.server.log()
        assert (row["n"], marked) == (1, False), (row, marked)  # now: (2, True)


# -- parse-time tenant code: identity, checks and read-only mode (the system holds) ----------------------


async def test_parse_time_code_after_statement_cache_eviction_runs_under_the_end_users_identity(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """More distinct statements on one pooled session than asyncpg's cache holds (100): each new
    one evicts the oldest, whose Close prepare_after sends (`_cleanup_stmts`, with its own Sync)
    before the prefix. The hooked statement's parse-time code still runs in the request's
    transaction: the end user's uid, not read-only for a readwrite key; a read key's parse-time
    write is refused (25006) and nothing is written."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        await _parse_hook(api, admin, pid)
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        read = await api.new_key(token, pid, "read", rateLimitRequests=1_000_000)
        uid, user = await _user_token(api, pid)
        for key in (rw, read):
            for i in range(110):
                await _ok(api, key, pid, f"SELECT {i} AS n, auth.uid() AS u", user)
        (row,) = await _ok(api, rw, pid, "SELECT '{evicted-rw}'::hooked_d[]::text AS v", user)
        assert row["v"] == "{evicted-rw}", row
        assert await _hooked(api, admin, pid, "evicted-rw") == [{"v": "evicted-rw", "uid": uid, "ro": "off"}]
        body = await _sql(api, read, pid, "SELECT '{evicted-read}'::hooked_d[]::text AS v", user)
        assert body["success"] is False and body["error"]["details"] == "ERROR:  25006", body
        assert await _hooked(api, admin, pid, "evicted-read") == []
        # and the session's next request is its own (the prefix stood)
        (who,) = await _ok(
            api, rw, pid, "SELECT auth.uid() AS u, current_setting('transaction_read_only') AS ro"
        )
        assert who == {"u": None, "ro": "off"}, who


async def test_parse_time_code_of_a_revoked_end_user_session_or_key_never_runs(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """A prefix refusal now surfaces from the prepare (the Parse comes after the failing step
    and is skipped): an end user's logged-out session (FXU01) and a revoked key (FXEPO: the
    cached key state is stale) fall back to the explicit path, which refuses them (401); the
    hooked statement's parse-time code never ran, on either path."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    await _parse_hook(api, admin, pid)
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    _uid, user = await _user_token(api, pid)
    await _ok(api, rw, pid, "SELECT 1 AS warm", user)  # the token and key are cached
    r = await api.http.post(f"/api/projects/{pid}/auth/logout", headers=bearer(user))
    assert r.status_code in (200, 204), r.text
    status, body = await _post(api, rw, pid, "SELECT '{after-logout}'::hooked_d[]::text AS v", user)
    assert status == 401 and body["success"] is False, (status, body)
    r = await api.http.post(
        f"/api/projects/{pid}/api-keys",
        json={"name": "victim", "scope": "readwrite", "rateLimitRequests": 1_000_000},
        headers=bearer(project.owner_token),
    )
    victim, victim_id = r.json()["key"], r.json()["apiKey"]["id"]
    await _ok(api, victim, pid, "SELECT 2 AS warm")  # cached, its session warm
    r = await api.http.delete(
        f"/api/projects/{pid}/api-keys/{victim_id}", headers=bearer(project.owner_token)
    )
    assert r.status_code == 200, r.text
    status, body = await _post(api, victim, pid, "SELECT '{after-revoke}'::hooked_d[]::text AS v")
    assert status == 401 and body["success"] is False, (status, body)
    rows = await _ok(api, admin, pid, "SELECT v FROM hooked WHERE v IN ('after-logout', 'after-revoke')")
    assert rows == [], rows


async def test_parse_time_code_in_the_introspection_branch_keeps_read_only_mode(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """The introspection branch drains the first transaction and writes the prefix again: the
    project's read-only switch holds in both (a readwrite key's parse-time write is refused:
    PROJECT_READ_ONLY), and a statement that needs introspection still runs read-only."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    await _parse_hook(api, admin, pid)
    owner = bearer(project.owner_token)
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    mood = await _enum(api, admin, pid)
    r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": True}, headers=owner)
    assert r.status_code == 200, r.text
    try:
        body = await _sql(api, rw, pid, f"SELECT '{{ro-intro}}'::hooked_d[] AS v, 'sad'::{mood} AS m")
        (row,) = await _ok(
            api, rw, pid, f"SELECT 'ok'::{mood} AS m, current_setting('transaction_read_only') AS ro"
        )
    finally:
        r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": False}, headers=owner)
        assert r.status_code == 200, r.text
    assert body["success"] is False and body["error"]["code"] == "PROJECT_READ_ONLY", body
    assert row == {"m": "ok", "ro": "on"}, row
    assert await _hooked(api, admin, pid, "ro-intro") == []


# -- the C reset's failure handling: what holds -------------------------------------------------------


async def test_a_tenants_own_42883_neither_marks_the_server_nor_runs_twice(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """Without a lock in the way the probe succeeds: a statement's own 42883 (a missing function,
    raised at run time after a nextval; also a read key's parse-time one) is answered as such,
    once, and the server stays on the C reset."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, token, admin):
        read = await api.new_key(token, pid, "read", rateLimitRequests=1_000_000)
        for q in (
            "CREATE SEQUENCE runs",
            "CREATE FUNCTION boom() RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM nextval('runs'); EXECUTE 'SELECT no_such_function_r24()'; RETURN 1; END $$",
        ):
            await _ok(api, admin, pid, q)
        for _ in range(3):
            body = await _sql(api, admin, pid, "SELECT boom() AS b")
            assert body["success"] is False and body["error"]["details"] == "ERROR:  42883", body
            body = await _sql(api, read, pid, "SELECT no_such_function_r24()")
            assert body["success"] is False and body["error"]["details"] == "ERROR:  42883", body
        (row,) = await _ok(api, admin, pid, "SELECT last_value AS n FROM runs")
        assert row["n"] == 3, row
        assert "the C session reset failed" not in inst.server.log()


async def test_whichever_run_answers_after_a_failed_probe_starts_from_a_full_reset(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """The probe-failure scenario above (the server marked, the session switched to the six
    statements, the request run again): the run whose answer the client gets saw a reset
    session: the temporary trigger function and the session-level work_mem the previous request
    left are gone (the retry's head carries the Parse of the six statements and the whole reset,
    not just CLOSE ALL)."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        for q in (
            "CREATE TABLE locked_t (v int)",
            "INSERT INTO locked_t VALUES (1)",
            "GRANT SELECT ON locked_t TO PUBLIC",
            "CREATE FUNCTION leave_mem() RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
            "EXECUTE 'SET work_mem = ''1234kB'''; RETURN 1; END $$",
            "CREATE FUNCTION boom() RETURNS int LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); "
            "RAISE EXCEPTION USING ERRCODE = '42883', MESSAGE = 'state ' || "
            "(to_regprocedure('pg_temp.bait()') IS NULL)::text || ' ' || current_setting('work_mem'); END $$",
        ):
            await _ok(api, admin, pid, q)
        await _leave_lock_bait(api, admin, pid, ", leave_mem() AS m")
        failing = asyncio.create_task(_sql(api, admin, pid, "SELECT boom() AS b"))
        await asyncio.sleep(0.4)
        holder = asyncio.create_task(_sql(api, rw, pid, "SELECT pg_sleep(7) FROM locked_t"))
        body = await failing
        await holder
        assert body["success"] is False and body["error"]["details"] == "ERROR:  42883", body
        state = body["error"]["message"].split()
        assert state[0] == "state" and state[1] == "true" and state[2] != "1234kB", body


# -- the C guard: platform work that runs tenant code ---------------------------------------------------


async def test_a_policy_expression_parsed_by_rls_management_gets_nothing_from_the_reset(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """RLS management (admin_session: BEGIN, and the caps only where the admin role's defaults
    are over them) parses the policy's USING expression at CREATE POLICY: a domain array literal
    in it runs the tenant's CHECK there, in a transaction where none of the guarded settings may
    be stacked, so the reset is not refused (it runs there). It has nothing to drop there (the session was
    cleaned, the platform sets nothing else in that transaction): the policy is created as
    asked, the table's RLS switched on, and the admin session's next request is its own."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    sch = f"p_{pid}"
    for q in (
        "CREATE TABLE outcome (via text, what text)",
        "GRANT SELECT, INSERT ON outcome TO PUBLIC",
        "CREATE FUNCTION try_reset(v text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
        f"BEGIN PERFORM fluxbase_guard.reset_session(); INSERT INTO {sch}.outcome VALUES (v, 'ran'); "
        f"EXCEPTION WHEN insufficient_privilege THEN INSERT INTO {sch}.outcome VALUES (v, 'refused'); END; "
        "RETURN true; END $$",
        f"CREATE DOMAIN reset_d AS text CHECK ({sch}.try_reset(VALUE))",
        "CREATE TABLE guarded (id int, owner text)",
    ):
        await _ok(api, admin, pid, q)
    r = await api.http.post(
        f"/api/projects/{pid}/rls/policies",
        json={
            "table": "guarded",
            "name": "own",
            "command": "SELECT",
            "using": "owner = auth.uid() AND owner <> ALL ('{policy}'::reset_d[])",
        },
        headers=bearer(admin),
    )
    assert r.status_code == 201, r.text
    table = r.json()
    rows = await _ok(api, admin, pid, "SELECT via, what FROM outcome")
    # The CHECK ran at CREATE POLICY, and the reset with it (observed: 'ran', not 'refused').
    assert [row["via"] for row in rows] == ["policy"], rows
    (pol,) = await _ok(
        api,
        admin,
        pid,
        "SELECT c.relrowsecurity AS on, p.polname AS name FROM pg_policy p "
        "JOIN pg_class c ON c.oid = p.polrelid WHERE c.relname = 'guarded'",
    )
    assert pol == {"on": True, "name": "own"}, (pol, table)
    (who,) = await _ok(
        api, admin, pid, "SELECT auth.uid() AS u, current_setting('transaction_read_only') AS ro"
    )
    assert who == {"u": None, "ro": "off"}, who


async def test_a_prefix_refusal_from_the_prepare_falls_back_and_parse_time_code_runs_once(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """FXRST surfacing from prepare_after: an admin function leaves SET SESSION CHARACTERISTICS
    (serializable, read only) in its session; the next request's (a new, hooked statement of a
    readwrite key's end user) check step refuses ahead of the Parse, the session is reset and the
    request runs on the explicit path: its parse-time code ran once, there, under the end
    user's identity and not read-only; the statement's answer is its own."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        await _parse_hook(api, admin, pid)
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        uid, user = await _user_token(api, pid)
        for q in (
            "CREATE FUNCTION leave_chars() RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN "
            "EXECUTE 'SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY'; "
            "RETURN 1; END $$",
            "GRANT EXECUTE ON FUNCTION leave_chars() TO PUBLIC",
        ):
            await _ok(api, admin, pid, q)
        await _ok(api, rw, pid, "SELECT 0 AS warm", user)
        await _ok(api, rw, pid, "SELECT leave_chars() AS c", user)
        (row,) = await _ok(
            api,
            rw,
            pid,
            "SELECT '{after-chars}'::hooked_d[]::text AS v, current_setting('transaction_isolation') AS iso",
            user,
        )
        assert row == {"v": "{after-chars}", "iso": "read committed"}, row
        assert await _hooked(api, admin, pid, "after-chars") == [
            {"v": "after-chars", "uid": uid, "ro": "off"}
        ]
