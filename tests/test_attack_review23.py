"""Hostile review 23: the one-call session reset (issue 24, commit bcdd57a).

Each request on a pooled tenant session starts with `CLOSE ALL` and
`SELECT WHERE fluxbase_guard.reset_session() IS NULL` where the server has the C library; the
function (EXECUTE granted to PUBLIC) refuses in a security-restricted operation and once any
setting had a GUC stack entry (the request's `SET LOCAL` identity always makes one; since the fix
below, the identity's and the caps' settings only: the whole list cost too much), and
tenancy/errors.tampered takes "function fluxbase_guard.reset_session() does not exist" (42883) and
58P01 on the library for a session whose function went away (the request runs once more on a new
session).

Attacked, through the real API and PostgreSQL: calling the reset from tenant SQL of every scope
and an end user on the batch endpoint, from defaults, CHECK constraints, generated columns, index
expressions and triggers (immediate and deferred); after a procedure's COMMIT/ROLLBACK; from a
holdable cursor materialized at COMMIT; in a parallel worker (a PARALLEL SAFE wrapper, forced
parallel plan); from platform work (a migration's trigger, VACUUM (ANALYZE)'s index expressions);
from a realtime checker's policy evaluation; on a tenant role's own connection after SET LOCAL,
a function's SET clause, a rolled-back savepoint and in REFRESH MATERIALIZED VIEW; replacing,
dropping, revoking or shadowing the function; role defaults for the identity and session
transaction characteristics meant to brick the reset; state left by one end user for the next on
the same session across a failing request; tenant code run at parse time; and the new
`_RESET_GONE` tampered path raised by the tenant's own statement.

Holes found (each test was a strict xfail, seen failing, until its fix):

1. `_RESET_GONE` matches a substring of the error message, which any principal's own statement
   can produce: `SELECT "fluxbase_guard.reset_session"()` (a read key, an end user: no plpgsql
   needed) fails with exactly "function fluxbase_guard.reset_session() does not exist" (42883).
   The request is answered 503 DATABASE_CONNECTION_ERROR, its session terminated, the pool's
   idle sessions discarded and the request run again on a new backend (what it did before
   failing runs twice), and a migration with that statement gets 503 instead of
   MIGRATION_FAILED — what hostile review 6 took away from `RAISE ... USING ERRCODE '26000'`.
2. (Pre-existing, found attacking the guard's premise "tenant SQL always finds a stack entry".)
   On the one-round-trip path the tenant's statement is parsed by asyncpg's prepare, before the
   pipeline and outside the request's transaction; parse analysis runs tenant code (a domain
   CHECK reached through an array or record literal: array_in/record_in call domain_in). That
   code runs with no GUC stack entry (the C reset is not refused there: harmless, nothing is
   set yet and the pipeline resets again), but also before the key guard, without the identity
   and outside the read-only transaction: a readwrite key's statement writes to a project whose
   read-only switch is on.
3. (Operational.) Sessions choose the C reset when the function exists, not when it loads: with
   a library build that lacks the symbol (an older package after a migration), every request
   after a session's first fails with 42883 "could not find function ... in file <server path>"
   until `fluxbase migrate` runs; a missing library (58P01) is retried once and fails the same.

Fixed: (1) and (3) by deciding from the server, not the message: on 42883, 58P01, 58000 or XX000
a session whose reset is the C one calls the function once more; if that fails, the session
switches to the six statements, the server is marked for NATIVE_RESET_RETRY_S (new sessions use
the statements too), and the request runs again on the same session (the reset is the pipeline's
first step: nothing after it ran). Else the error is the statement's own, reported as such.
(2) by writing the request prefix ahead of the statement's Parse (wire.prepare_after): parse-time
code runs in the request's transaction, under its identity, caps, checks and read-only mode.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest

from conftest import Instance
from fluxbase.db import capture as cap
from support import Api, Stack, bearer
from support import end_user as _user_token
from support import need_capture_library as _need_library
from support import own_project as _own
from support import post_sql as _post
from support import sql_body as _sql
from support import sql_rows as _ok

REFUSED = "fluxbase_guard.reset_session() may only begin a request"


async def _batch(
    api: Api, key: str, pid: str, queries: list[str], token: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = bearer(key)
    if token is not None:
        headers["X-Fluxbase-User-Token"] = token
    r = await api.http.post(
        "/api/execute-batch",
        json={"projectId": pid, "statements": [{"query": q} for q in queries]},
        headers=headers,
    )
    return r.status_code, dict(r.json())


def _refused(body: dict[str, Any], what: Any) -> None:
    assert body["success"] is False, (what, body)
    assert body["error"]["details"] == "ERROR:  42501", (what, body)
    assert REFUSED in body["error"]["message"], (what, body)


async def _principals(api: Api, project: Any) -> tuple[dict[str, str], str, str]:
    """({scope: key}, an end user's id, that end user's token)."""
    pid = project.id
    keys = {
        "admin": project.admin_key,
        "readwrite": await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000),
        "read": await api.new_key(project.owner_token, pid, "read", rateLimitRequests=1_000_000),
    }
    uid, token = await _user_token(api, pid)
    return keys, uid, token


# -- the new tampered path -----------------------------------------------------------------------


async def test_a_read_key_cannot_pass_its_own_statement_off_as_the_reset_gone(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """A read key (no plpgsql, no DO) names a function that does not exist, quoted so that
    PostgreSQL's 42883 message is exactly the one `_RESET_GONE` waits for. That is the tenant's
    statement failing (it must be answered as such, 42883, on the same session), not the
    session's reset function having gone away."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, _admin):
        read = await api.new_key(token, pid, "read", rateLimitRequests=1_000_000)
        (before,) = await _ok(api, read, pid, "SELECT pg_backend_pid() AS p")
        status, body = await _post(api, read, pid, 'SELECT "fluxbase_guard.reset_session"()')
        # Now: 503 DATABASE_CONNECTION_ERROR "prepared statements were dropped", after the
        # session was terminated and the request ran once more on a new backend.
        assert status == 200 and body["success"] is False, (status, body)
        assert body["error"]["details"] == "ERROR:  42883", body
        (after,) = await _ok(api, read, pid, "SELECT pg_backend_pid() AS p")
        assert after["p"] == before["p"], (before, after)  # the session was not given up


async def test_an_end_user_cannot_pass_its_statement_off_as_the_reset_gone_on_any_path(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """The same from an end user (X-Fluxbase-User-Token) on the explicit-transaction path (a
    statement naming an advisory lock takes it) and in a batch: every one is the statement's own
    42883, never a lost session."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, _admin):
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        _uid, user = await _user_token(api, pid)
        tries = [
            await _post(
                api,
                rw,
                pid,
                'SELECT pg_catalog.pg_advisory_xact_lock(1), "fluxbase_guard.reset_session"()',
                user,
            ),
            await _batch(api, rw, pid, ["SELECT 1", 'SELECT "fluxbase_guard.reset_session"()'], user),
        ]
        for status, body in tries:
            assert status == 200 and body["success"] is False, (status, body)
            assert body["error"]["details"] == "ERROR:  42883", body


async def test_a_migration_statement_cannot_pass_itself_off_as_the_reset_gone(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """admin_session (migrations, import, RLS management) maps errors with `tampered` too, and
    walks the exception's __context__: the migration's own failing statement becomes a lost
    session (503, "prepared statements were dropped") instead of the migration failure that
    names the statement."""
    await _need_library(control_db)
    r = await api.http.post(
        f"/api/projects/{project.id}/migrations",
        json={"name": "0001_gone", "sql": 'SELECT "fluxbase_guard.reset_session"();'},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "MIGRATION_FAILED", r.text
    assert r.json()["error"]["statementIndex"] == 0, r.text
    assert r.json()["error"]["details"] == "ERROR:  42883", r.text


async def _parse_hook(api: Api, admin: str, pid: str) -> None:
    """A domain whose CHECK records, in `hooked`, each evaluation and whether the reset ran
    there, and counts its calls in the sequence `hook_calls`: an array literal of the domain in
    a statement is checked when the statement is parsed (array_in calls domain_in), not when it
    runs."""
    sch = f"p_{pid}"
    for q in (
        "CREATE TABLE hooked (v text, what text, uid text)",
        "GRANT SELECT, INSERT ON hooked TO PUBLIC",
        "CREATE SEQUENCE hook_calls",  # not transactional: counts evaluations that rolled back
        "GRANT USAGE ON SEQUENCE hook_calls TO PUBLIC",
        "CREATE FUNCTION hook(v text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
        f"PERFORM nextval('{sch}.hook_calls'); "
        "BEGIN PERFORM fluxbase_guard.reset_session(); "
        f"INSERT INTO {sch}.hooked VALUES (v, 'ran', current_setting('fluxbase.auth_uid', true)); "
        f"EXCEPTION WHEN insufficient_privilege THEN INSERT INTO {sch}.hooked "
        "VALUES (v, 'refused', current_setting('fluxbase.auth_uid', true)); END; RETURN true; END $$",
        "GRANT EXECUTE ON FUNCTION hook(text) TO PUBLIC",
        f"CREATE DOMAIN hooked_d AS text CHECK ({sch}.hook(VALUE))",
    ):
        await _ok(api, admin, pid, q)


async def test_a_statement_passing_itself_off_as_the_reset_gone_is_not_run_twice(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """The tampered path runs the request once more on a new session: whatever the statement
    did before it failed runs twice. Here the side effect is the tenant's parse-time code (a
    domain CHECK, see below) called once per attempt."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="2") as (_inst, api, pid, token, admin):
        await _parse_hook(api, admin, pid)
        # readwrite: a read key's parse-time nextval is refused now (read-only, wire.prepare_after)
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        calls = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS n FROM hook_calls"
        (before,) = await _ok(api, admin, pid, calls)
        await _post(api, rw, pid, """SELECT '{twice}'::hooked_d[], "fluxbase_guard.reset_session"()""")
        (after,) = await _ok(api, admin, pid, calls)
        assert after["n"] - before["n"] == 1, (before, after)


# -- calling the reset from tenant SQL -------------------------------------------------------------


async def test_batches_of_every_scope_and_an_end_user_cannot_call_the_reset(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """execute-batch: the reset as the first statement, as a later one (which the batch starts by
    setting the identity again), after a statement that SET LOCAL something, inside a CTE and a
    scalar subquery: refused (42501), all or nothing, and the next batch's identity is its own."""
    await _need_library(control_db)
    pid = project.id
    keys, uid, user = await _principals(api, project)
    batches = [
        ["SELECT fluxbase_guard.reset_session()"],
        ["SELECT 1 AS one", "SELECT fluxbase_guard.reset_session()"],
        ["SET LOCAL work_mem = '1MB'", "SELECT fluxbase_guard.reset_session()"],
        ["WITH r AS (SELECT fluxbase_guard.reset_session()) SELECT count(*) FROM r"],
        ["SELECT 1", "SELECT (SELECT fluxbase_guard.reset_session()) IS NULL, auth.uid()"],
    ]
    for label, key in keys.items():
        for token in (None, user):
            for queries in batches:
                status, body = await _batch(api, key, pid, queries, token)
                assert status == 200, (label, queries, body)
                _refused(body, (label, token is not None, queries))
            status, body = await _batch(
                api, key, pid, ["SELECT 1", "SELECT auth.uid() AS uid, auth.role() AS role"], token
            )
            assert body["success"], body
            assert body["results"][1]["rows"][0]["uid"] == (uid if token else None), (label, body)


async def test_defaults_checks_generated_columns_indexes_and_triggers_cannot_reset(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """Expressions the admin attached to a table run inside the writer's request (stack entry:
    its SET LOCAL identity): a readwrite key's and an end user's INSERT, on the one-round-trip
    path and the explicit one, is refused and writes nothing."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    keys, _uid, user = await _principals(api, project)
    setup = [
        "CREATE FUNCTION rs(v int) RETURNS int LANGUAGE sql IMMUTABLE "
        "AS 'SELECT v FROM (SELECT fluxbase_guard.reset_session()) x'",
        "CREATE FUNCTION rsv() RETURNS int LANGUAGE sql VOLATILE "
        "AS 'SELECT 1 FROM (SELECT fluxbase_guard.reset_session()) x'",
        "CREATE FUNCTION rs_trigger() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN PERFORM fluxbase_guard.reset_session(); RETURN NEW; END $$",
        "CREATE TABLE t_default (v int, d int DEFAULT rsv())",
        "CREATE TABLE t_check (v int CHECK (rs(v) = v))",
        "CREATE TABLE t_generated (v int, g int GENERATED ALWAYS AS (rs(v)) STORED)",
        "CREATE TABLE t_index (v int)",
        "CREATE INDEX ON t_index ((rs(v)))",
        "CREATE TABLE t_trigger (v int)",
        "CREATE TRIGGER tr BEFORE INSERT ON t_trigger FOR EACH ROW EXECUTE FUNCTION rs_trigger()",
        "CREATE TABLE t_deferred (v int)",
        "CREATE CONSTRAINT TRIGGER trd AFTER INSERT ON t_deferred DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION rs_trigger()",
    ]
    for q in setup:
        await _ok(api, admin, pid, q)
    tables = ["t_default", "t_check", "t_generated", "t_index", "t_trigger", "t_deferred"]
    for t in tables:
        await _ok(api, admin, pid, f"GRANT SELECT, INSERT ON {t} TO PUBLIC")
    for t in tables:
        for token in (None, user):
            for q in (
                f"INSERT INTO {t} (v) VALUES (1)",
                # the explicit-transaction path
                f"INSERT INTO {t} (v) SELECT 1 FROM pg_catalog.pg_advisory_xact_lock(5)",
            ):
                _refused(await _sql(api, keys["readwrite"], pid, q, token), (t, token is not None, q))
        (row,) = await _ok(api, admin, pid, f"SELECT count(*) AS n FROM {t}")
        assert row["n"] == 0, (t, row)


async def test_a_procedure_that_commits_cannot_reach_the_reset(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """A COMMIT inside a procedure would end the transaction and with it every GUC stack entry
    (the identity too): the reset could then run. CALL and DO only take the explicit path, inside
    BEGIN: the COMMIT is refused (2D000) for every scope and an end user, directly, nested in a
    procedure, and in a DO block."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    keys, uid, user = await _principals(api, project)
    for q in (
        "CREATE PROCEDURE commit_then_reset() LANGUAGE plpgsql "
        "AS $$ BEGIN COMMIT; PERFORM fluxbase_guard.reset_session(); END $$",
        "CREATE PROCEDURE nested() LANGUAGE plpgsql AS $$ BEGIN CALL commit_then_reset(); END $$",
        "CREATE PROCEDURE rollback_then_reset() LANGUAGE plpgsql "
        "AS $$ BEGIN ROLLBACK; PERFORM fluxbase_guard.reset_session(); END $$",
    ):
        await _ok(api, admin, pid, q)
    calls = ["CALL commit_then_reset()", "CALL nested()", "CALL rollback_then_reset()"]
    for label, key in keys.items():
        for token in (None, user):
            extra = (
                ["DO $$ BEGIN COMMIT; PERFORM fluxbase_guard.reset_session(); END $$"]
                if label == "admin"
                else []
            )
            for q in calls + extra:
                body = await _sql(api, key, pid, q, token)
                assert body["success"] is False, (label, q, body)
                assert body["error"]["details"] == "ERROR:  2D000", (label, q, body)
            (who,) = await _ok(api, key, pid, "SELECT auth.uid() AS uid", token)
            assert who["uid"] == (uid if token else None), (label, who)


async def test_a_holdable_cursor_materialized_at_commit_cannot_reset(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """`DECLARE ... WITH HOLD` runs its query when the transaction commits (before the GUC stack
    is popped): the reset is refused there too, on both paths, and no cursor is left for the
    next request (CLOSE c: no such cursor)."""
    await _need_library(control_db)
    pid = project.id
    keys, _uid, user = await _principals(api, project)
    for label, key in keys.items():
        for token in (None, user):
            for q in (
                "DECLARE c CURSOR WITH HOLD FOR SELECT fluxbase_guard.reset_session()",
                "DECLARE c CURSOR WITH HOLD FOR SELECT fluxbase_guard.reset_session(), "
                "pg_catalog.pg_advisory_xact_lock(6)",
            ):
                _refused(await _sql(api, key, pid, q, token), (label, q))
            gone = await _sql(api, key, pid, "CLOSE c", token)
            assert gone["success"] is False and gone["error"]["details"] == "ERROR:  34000", (label, gone)


async def test_platform_work_does_not_run_the_reset_for_tenant_code(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """Tenant code run by platform work on the admin session: a trigger fired by a project
    migration (admin_session: its statements start with SET LOCAL caps) and an index expression
    evaluated by the vacuum endpoint's VACUUM (ANALYZE) (a security-restricted operation, no
    transaction of the platform's). Each records whether the reset ran: it never does."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    sch = f"p_{pid}"  # maintenance runs with search_path pg_catalog, pg_temp: names qualified
    for q in (
        "CREATE TABLE outcome (via text, what text)",
        "CREATE FUNCTION try_reset(via text) RETURNS int LANGUAGE plpgsql VOLATILE AS $$ BEGIN "
        f"BEGIN PERFORM fluxbase_guard.reset_session(); INSERT INTO {sch}.outcome VALUES (via, 'ran'); "
        f"EXCEPTION WHEN insufficient_privilege THEN INSERT INTO {sch}.outcome VALUES (via, SQLERRM); END; "
        "RETURN 1; END $$",
        "CREATE FUNCTION idx_reset(v int) RETURNS int LANGUAGE plpgsql IMMUTABLE "
        f"AS $$ BEGIN RETURN v + {sch}.try_reset('analyze'); END $$",
        "CREATE FUNCTION trg_reset() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN PERFORM try_reset('migration'); RETURN NEW; END $$",
        "CREATE TABLE hooked (v int)",
        "CREATE TRIGGER hook BEFORE INSERT ON hooked FOR EACH ROW EXECUTE FUNCTION trg_reset()",
    ):
        await _ok(api, admin, pid, q)
    r = await api.http.post(
        f"/api/projects/{pid}/migrations",
        json={"name": "0001_hook", "sql": "INSERT INTO hooked VALUES (1);"},
        headers=bearer(admin),
    )
    assert r.status_code in (200, 201), r.text
    for q in (
        "CREATE TABLE indexed (v int)",
        "INSERT INTO indexed SELECT g FROM generate_series(1, 50) g",
        "CREATE INDEX ON indexed ((idx_reset(v)))",
        "DELETE FROM outcome WHERE via = 'analyze'",
    ):
        await _ok(api, admin, pid, q)
    r = await api.http.post(f"/api/projects/{pid}/vacuum", headers=bearer(project.owner_token))
    rows = await _ok(api, admin, pid, "SELECT via, what FROM outcome ORDER BY via")
    assert r.status_code == 200, r.text
    assert {row["via"] for row in rows} == {"migration", "analyze"}, rows  # both reached the call
    assert all(row["what"] == REFUSED for row in rows), rows


async def test_a_realtime_checker_policy_cannot_reset(
    instance: Instance, api: Api, project: Any, control_db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Realtime's RLS gate evaluates the table's SELECT policies for each subscriber on the
    checker role's connection (fluxbase_guard.visible_rows_as: SET LOCAL role, search_path and
    identity first). A policy calling the reset is refused there: the check fails closed (the
    event is withheld) and the log says 42501, not that the reset ran."""
    await _need_library(control_db)
    from fluxbase.config import load_settings
    from fluxbase_realtime.outbox import OutboxEvent
    from fluxbase_realtime.rls import RlsGate, Viewer

    pid, admin = project.id, project.admin_key
    for q in (
        "CREATE FUNCTION reset_ok() RETURNS boolean LANGUAGE sql "
        "AS 'SELECT true FROM (SELECT fluxbase_guard.reset_session()) x'",
        "CREATE TABLE watched (id int PRIMARY KEY, v text)",
        "ALTER TABLE watched ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY p ON watched FOR SELECT USING (reset_ok())",
        "GRANT SELECT ON watched TO PUBLIC",
    ):
        await _ok(api, admin, pid, q)
    message = b'{"type":"db_event","payload":{"operation":"INSERT","record":{"id":1,"v":"x"},"old":null}}'
    event = OutboxEvent((0, 0), pid, "row", "watched", "INSERT", message)  # type: ignore[arg-type]
    gate = RlsGate(load_settings(instance.env), control_db)
    viewers = [
        Viewer.of("someone", {"sub": "someone"}, "authenticated", "read"),
        Viewer.of("", {}, "", "read"),
    ]
    try:
        with caplog.at_level(logging.WARNING, logger="fluxbase.realtime.rls"):
            out = await gate.decide(pid, viewers, [event])
    finally:
        await gate.close()
    assert all(0 not in allowed for allowed in out.values()), out
    errors = [r.getMessage() for r in caplog.records if "RLS policy error" in r.getMessage()]
    assert errors and all("42501" in e and REFUSED in e for e in errors), errors


async def test_parse_time_tenant_code_runs_inside_the_request(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """On the one-round-trip path a statement the session has not prepared yet is parsed after
    the request prefix, in its transaction (wire.prepare_after): tenant code run by parse
    analysis (a domain CHECK reached through an array literal) runs with the request's identity
    and read-only mode, so the C reset is refused there, and a read key's parse-time write is
    refused like its statement's. (Before the fix the parse ran first, in a transaction of its
    own: no identity, no read-only mode, and the reset ran.)"""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    await _parse_hook(api, admin, pid)
    keys, uid, user = await _principals(api, project)
    for label, key in keys.items():
        for token in (None, user):
            tag = f"{label}-{token is not None}"
            q = (
                f"SELECT '{{{tag}}}'::hooked_d[] AS v, auth.uid() AS uid, "
                "pg_catalog.current_setting('transaction_read_only') AS ro"
            )
            if label == "read":
                body = await _sql(api, key, pid, q, token)
                assert body["success"] is False and body["error"]["details"] == "ERROR:  25006", (tag, body)
                continue
            (row,) = await _ok(api, key, pid, q, token)
            assert row["uid"] == (uid if token else None), (tag, row)
            assert row["ro"] == "off", (tag, row)
    rows = await _ok(api, admin, pid, "SELECT v, what, uid FROM hooked ORDER BY v")
    assert {r["v"] for r in rows} == {"admin-False", "admin-True", "readwrite-False", "readwrite-True"}, rows
    assert all(r["what"] == "refused" for r in rows), rows
    assert {r["v"]: r["uid"] for r in rows if r["v"].endswith("True")} == {
        "admin-True": uid,
        "readwrite-True": uid,
    }, rows


async def test_parse_time_tenant_code_cannot_write_to_a_read_only_project(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """The project's read-only switch (also what a move between clusters sets while it copies):
    a readwrite key's INSERT is refused, but the same key's SELECT of an array literal of a
    domain whose CHECK writes gets the write done while the statement is parsed."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    await _parse_hook(api, admin, pid)
    rw = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=1_000_000)
    owner = bearer(project.owner_token)
    r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": True}, headers=owner)
    assert r.status_code == 200, r.text
    try:
        direct = await _sql(api, rw, pid, "INSERT INTO hooked VALUES ('direct', 'x', 'x')")
        assert direct["success"] is False, direct
        await _sql(api, rw, pid, "SELECT '{while-read-only}'::hooked_d[] AS v")
        (row,) = await _ok(api, admin, pid, "SELECT count(*) AS n FROM hooked WHERE v = 'while-read-only'")
    finally:
        r = await api.http.patch(f"/api/projects/{pid}", json={"readOnly": False}, headers=owner)
        assert r.status_code == 200, r.text
    assert row["n"] == 0, row


async def test_a_parallel_worker_does_not_get_past_the_guard(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """The function is PARALLEL UNSAFE, but an admin's wrapper may be declared PARALLEL SAFE and
    a request may force a parallel plan (SET LOCAL debug_parallel_query): the wrapper then runs
    in a worker, whose settings are restored from the leader. The reset is refused there too,
    for the admin and a read key (the wrapper catches and returns the refusal)."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    keys, _uid, _user = await _principals(api, project)
    for q in (
        "CREATE FUNCTION in_worker() RETURNS text LANGUAGE plpgsql PARALLEL SAFE AS $$ BEGIN "
        "PERFORM fluxbase_guard.reset_session(); RETURN 'ran'; "
        "EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE || ' ' || SQLERRM; END $$",
        "CREATE TABLE big AS SELECT g FROM generate_series(1, 1000) g",
        "GRANT SELECT ON big TO PUBLIC",
    ):
        await _ok(api, admin, pid, q)
    for label in ("admin", "read"):
        status, body = await _batch(
            api,
            keys[label],
            pid,
            [
                "SET LOCAL debug_parallel_query = on",
                "EXPLAIN SELECT in_worker() AS r FROM big LIMIT 1",
                "SELECT in_worker() AS r, auth.role() AS role FROM big LIMIT 1",
            ],
        )
        assert status == 200 and body["success"], (label, body)
        plan = " ".join(r["QUERY PLAN"] for r in body["results"][1]["rows"])
        assert "Gather" in plan, plan  # it did run in a worker
        (row,) = body["results"][2]["rows"]
        assert row["r"] == f"42501 {REFUSED}", (label, row)
        assert row["role"] == label, (label, row)


async def test_transaction_defaults_left_in_the_session_do_not_brick_the_reset(
    api: Api, project: Any, control_db: asyncpg.Pool
) -> None:
    """An admin's DO block leaves SET SESSION CHARACTERISTICS (serializable, read only,
    deferrable) in its session: the next request's transaction starts with them, the pipeline's
    C reset still runs (no stack entry at a transaction's start), the check step refuses (FXRST)
    and the request runs on the explicit path, and the defaults are gone afterwards."""
    await _need_library(control_db)
    pid, admin = project.id, project.admin_key
    for _ in range(2):
        await _ok(
            api,
            admin,
            pid,
            "DO $$ BEGIN EXECUTE 'SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL "
            "SERIALIZABLE, READ ONLY, DEFERRABLE'; END $$",
        )
        await _ok(api, admin, pid, "CREATE TABLE IF NOT EXISTS after_defaults (v int)")
        (row,) = await _ok(
            api,
            admin,
            pid,
            "SELECT current_setting('default_transaction_read_only') AS ro, "
            "current_setting('transaction_isolation') AS iso",
        )
        assert row == {"ro": "off", "iso": "read committed"}, row


# -- the function itself -------------------------------------------------------------------------


async def test_the_function_cannot_be_replaced_dropped_revoked_or_shadowed(
    spawn: Any, stack: Stack, control_db: asyncpg.Pool
) -> None:
    """An admin key cannot create an overload in fluxbase_guard, replace, drop, rename, move or
    re-own the function; its REVOKE from PUBLIC changes nothing (a warning: not the owner); a
    `reset_session()` of its own schema (first on the session's search_path) is never what the
    reset calls (it is schema-qualified, no arguments), and the function stays what
    install_reset made: C, SECURITY INVOKER, no SET clause, the superuser's."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, _token, admin):
        for q in (
            "CREATE FUNCTION fluxbase_guard.reset_session(integer) RETURNS void LANGUAGE sql AS 'SELECT'",
            "CREATE FUNCTION fluxbase_guard.reset_session(VARIADIC text[]) RETURNS void "
            "LANGUAGE sql AS 'SELECT'",
            "CREATE OR REPLACE FUNCTION fluxbase_guard.reset_session() RETURNS void LANGUAGE sql AS 'SELECT'",
            "DROP FUNCTION fluxbase_guard.reset_session()",
            "ALTER FUNCTION fluxbase_guard.reset_session() RENAME TO gone",
            "ALTER FUNCTION fluxbase_guard.reset_session() SET search_path = public",
            "ALTER FUNCTION fluxbase_guard.reset_session() SECURITY DEFINER",
            "DO $$ BEGIN EXECUTE 'ALTER FUNCTION fluxbase_guard.reset_session() OWNER TO ' "
            "|| quote_ident(current_user); END $$",
            "DO $$ BEGIN EXECUTE 'ALTER FUNCTION fluxbase_guard.reset_session() SET SCHEMA ' "
            "|| quote_ident(current_schema()); END $$",
            "COMMENT ON FUNCTION fluxbase_guard.reset_session() IS 'mine'",
        ):
            body = await _sql(api, admin, pid, q)
            assert body["success"] is False, (q, body)
        await _ok(api, admin, pid, "REVOKE EXECUTE ON FUNCTION fluxbase_guard.reset_session() FROM PUBLIC")
        # A shadow in the project's schema: records a call if the reset ever resolved to it.
        for q in (
            "CREATE TABLE shadow_calls (at timestamptz DEFAULT now())",
            "CREATE FUNCTION reset_session() RETURNS void LANGUAGE sql "
            "AS 'INSERT INTO shadow_calls DEFAULT VALUES'",
            "CREATE FUNCTION leave() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
            "EXECUTE 'SET work_mem = ''1MB'''; PERFORM pg_advisory_lock(4242); "
            "CREATE TEMP TABLE t_left (id int); END $$",
        ):
            await _ok(api, admin, pid, q)
        await _ok(api, admin, pid, "SELECT leave()")
        (row,) = await _ok(
            api,
            admin,
            pid,
            "SELECT current_setting('work_mem') AS wm, to_regclass('pg_temp.t_left') IS NULL AS no_temp, "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid = pg_backend_pid()) AS locks, "
            "(SELECT count(*) FROM shadow_calls) AS shadowed",
        )
        assert row == {"wm": row["wm"], "no_temp": True, "locks": 0, "shadowed": 0}, row
        assert row["wm"] != "1MB", row
        su = await asyncpg.connect(stack.database_url(inst.dbname))
        try:
            fn = await su.fetchrow(
                """SELECT l.lanname, p.prosecdef, p.proconfig, r.rolsuper, p.probin, p.prosrc,
                          pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,
                          (SELECT count(*) FROM pg_catalog.pg_proc o WHERE o.proname = 'reset_session'
                             AND o.pronamespace = p.pronamespace) AS overloads
                   FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang
                   JOIN pg_catalog.pg_roles r ON r.oid = p.proowner
                   WHERE p.oid = pg_catalog.to_regprocedure('fluxbase_guard.reset_session()')"""
            )
        finally:
            await su.close()
        assert fn is not None
        assert dict(fn) == {
            "lanname": "c",
            "prosecdef": False,
            "proconfig": None,
            "rolsuper": True,
            "probin": cap.LIBRARY,
            "prosrc": cap.RESET_SYMBOL,
            "public_exec": True,
            "overloads": 1,
        }, dict(fn)
        # Another project's read key still gets the refusal, not a privilege error of a REVOKE.
        _, other_token = await api.new_user()
        other = await api.new_project(other_token)
        read = await api.new_key(other_token, other, "read", rateLimitRequests=1_000_000)
        _refused(await _sql(api, read, other, "SELECT fluxbase_guard.reset_session()"), "other project")


async def test_a_role_default_for_the_identity_does_not_brick_the_reset(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """An admin gives its own role defaults (a DO block's ALTER ROLE CURRENT_USER SET, which the
    classifier cannot see) for the identity settings and for the transaction defaults: new
    sessions start from them, with no GUC stack entry, so the reset is not refused there, every
    later request still succeeds with its own identity, and none of them can call the reset."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, _token, admin):
        for q in (
            "DO $$ BEGIN EXECUTE 'ALTER ROLE CURRENT_USER SET fluxbase.auth_uid = ''forged'''; "
            "EXECUTE 'ALTER ROLE CURRENT_USER SET fluxbase.auth_role = ''service_role'''; "
            "EXECUTE 'ALTER ROLE CURRENT_USER SET default_transaction_isolation = ''serializable'''; END $$",
            # a new session picks the defaults up: end this one
            "SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid())",
        ):
            await _sql(api, admin, pid, q)
        for _ in range(3):
            (row,) = await _ok(
                api,
                admin,
                pid,
                "SELECT auth.uid() AS uid, auth.role() AS role, "
                "current_setting('transaction_isolation') AS iso",
            )
            assert row["uid"] is None and row["role"] != "service_role", row
            assert row["iso"] == "read committed", row
            _refused(await _sql(api, admin, pid, "SELECT fluxbase_guard.reset_session()"), "defaults")


async def test_state_left_by_one_end_user_is_gone_for_the_next_after_a_failed_request(
    spawn: Any, control_db: asyncpg.Pool
) -> None:
    """End users of a project share the end-user pool's sessions. Alice leaves a setting, a
    session advisory lock and a temporary table (an admin's function); Bob's next request fails
    (its reset rolled back with it: the reset is transactional), and Bob's request after that,
    on the same backend, finds none of it."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (_inst, api, pid, token, admin):
        rw = await api.new_key(token, pid, "readwrite", rateLimitRequests=1_000_000)
        for q in (
            "CREATE FUNCTION leave() RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN "
            "EXECUTE 'SET work_mem = ''1MB'''; PERFORM pg_advisory_lock(4343); "
            "CREATE TEMP TABLE IF NOT EXISTS alice_was_here (secret text); "
            "INSERT INTO alice_was_here VALUES ('alice-secret'); RETURN pg_backend_pid(); END $$",
            "GRANT EXECUTE ON FUNCTION leave() TO PUBLIC",
        ):
            await _ok(api, admin, pid, q)
        _alice, a_tok = await _user_token(api, pid)
        _bob, b_tok = await _user_token(api, pid)
        (left,) = await _ok(api, rw, pid, "SELECT leave() AS p", a_tok)
        failed = await _sql(api, rw, pid, "SELECT 1 / 0", b_tok)
        assert failed["success"] is False, failed
        (row,) = await _ok(
            api,
            rw,
            pid,
            "SELECT pg_backend_pid() AS p, current_setting('work_mem') AS wm, "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND pid = pg_backend_pid()) AS locks, "
            "(SELECT count(*) FROM pg_catalog.pg_class WHERE relname = 'alice_was_here' "
            "AND relpersistence = 't') AS temp",
            b_tok,
        )
        assert row["p"] == left["p"], (left, row)  # the same session: the checks mean something
        assert row["wm"] != "1MB" and row["locks"] == 0 and row["temp"] == 0, row


async def test_the_reset_outside_a_request_is_harmless_and_inside_one_is_refused_on_the_wire(
    stack: Stack, instance: Instance, project: Any, control_db: asyncpg.Pool
) -> None:
    """On a tenant role's own connection (what a pooled session is): the reset outside any
    transaction is what the pipeline runs; in a transaction after the identity's SET LOCAL
    (also in a function with a SET clause), and inside a security-restricted operation (a
    materialized view's refresh) it is refused; a subtransaction's rollback does not pop the
    outer stack entry that guards it."""
    await _need_library(control_db)
    from fluxbase.config import load_settings
    from fluxbase.tenancy.pools import TenantPools

    pools = TenantPools(load_settings(instance.env), max_size=1)
    try:
        pool = await pools.pool(project.id, "admin")
        async with pool.connection() as conn:
            await conn.execute("SELECT fluxbase_guard.reset_session()")
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute("SET LOCAL fluxbase.auth_uid = 'x'")
                await conn.execute("SAVEPOINT a; SET LOCAL work_mem = '2MB'; ROLLBACK TO SAVEPOINT a")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("SELECT fluxbase_guard.reset_session()")
            finally:
                await tx.rollback()
            # A function's SET clause of another setting than the identity and the caps (tenants
            # may not give a function a cap's: sql/0022), outside any request, makes no entry
            # the guard looks at: there, with nothing of a request set, the reset has nothing
            # to drop. Inside a request it is refused.
            await conn.execute(
                "CREATE FUNCTION r23_with_set() RETURNS void LANGUAGE sql SET application_name = 'r23' "
                "AS 'SELECT fluxbase_guard.reset_session()'"
            )
            await conn.execute("SELECT r23_with_set()")
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute("SET LOCAL fluxbase.auth_role = 'anon'")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("SELECT r23_with_set()")
            finally:
                await tx.rollback()
            await conn.execute(
                "CREATE FUNCTION r23_mv() RETURNS int LANGUAGE sql "
                "AS 'SELECT 1 FROM (SELECT fluxbase_guard.reset_session()) x'"
            )
            try:
                await conn.execute("CREATE MATERIALIZED VIEW r23_mv_v AS SELECT r23_mv() AS v WITH NO DATA")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute("REFRESH MATERIALIZED VIEW r23_mv_v")
            finally:
                await conn.execute(
                    "DROP MATERIALIZED VIEW IF EXISTS r23_mv_v; DROP FUNCTION r23_mv(); "
                    "DROP FUNCTION r23_with_set()"
                )
                await conn.execute("DISCARD TEMP")
    finally:
        await pools.close()


async def test_a_reset_function_that_no_longer_loads_falls_back_to_the_statements(
    spawn: Any, stack: Stack, control_db: asyncpg.Pool
) -> None:
    """The server's library is replaced by a build without `fluxbase_reset_session` (a rolled-back
    package, a replica with the previous one) while the database keeps the function: the login
    query finds it (to_regprocedure) and each session's reset then fails. The 42883 "could not
    find function ... in file" is not `_RESET_GONE` (and the 58P01 of a missing library is, but the
    retry's new session chooses the same function): requests should fall back to the six
    statements instead of failing until the next migration."""
    await _need_library(control_db)
    async with _own(spawn, FLUXBASE_TENANT_POOL_MAX="1") as (inst, api, pid, _token, admin):
        su = await asyncpg.connect(stack.database_url(inst.dbname))
        try:
            # (CREATE FUNCTION checks the symbol: the catalog row is what the older build meets)
            await su.execute(
                "UPDATE pg_catalog.pg_proc SET prosrc = 'fluxbase_reset_session_of_another_build' "
                "WHERE oid = pg_catalog.to_regprocedure('fluxbase_guard.reset_session()')"
            )
            bodies = [await _sql(api, admin, pid, "SELECT 1 AS one") for _ in range(3)]
        finally:
            await su.execute("DROP FUNCTION fluxbase_guard.reset_session()")
            assert await cap.install_reset(su) is None
            await su.close()
        assert all(b.get("success") for b in bodies[1:]), bodies
