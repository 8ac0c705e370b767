"""tenancy.statements.RULES row by row: what each row refuses (spelled the ways a hand-written
lexer missed), what it leaves alone, and the answer through the real HTTP API.

A row added to the table without examples here fails `test_every_rule_has_examples`.
"""

from __future__ import annotations

from typing import Any

import pytest

from fluxbase.tenancy import statements as classification
from fluxbase.tenancy.statements import BATCH, REQUEST, RULES, SCRIPT, Caps, Classifier, over_cap
from support import Api, bearer

# rule -> (refused, allowed neighbours). Refused examples are checked in every context the row
# applies to; allowed ones in the same contexts must not be refused by it.
EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    "unparsable": (["selec 1", "SELECT 'unterminated", "SELECT 1 /* open", 'SELECT "x'], ["SELECT 1"]),
    "several statements": (
        ["SELECT 1; SELECT 2", "SELECT 1;--\rCOMMIT", "SELECT 1 /* ; */ ; /* */ DELETE FROM t"],
        ["SELECT 1;", "SELECT ';'; -- ; SELECT 2", "SELECT $$;$$"],
    ),
    "transaction control": (
        [
            "COMMIT",
            "--\rCOMMIT",
            "--\r\nEND",
            "/* a /* b */ c */ ROLLBACK",
            "BEGIN",
            "START TRANSACTION",
            "SAVEPOINT s",
            "RELEASE s",
            "ROLLBACK TO s",
            "COMMIT AND CHAIN",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "abort",
        ],
        ["SELECT 'COMMIT'", "-- COMMIT\nSELECT 1", 'SELECT 1 AS "commit"', "SET TRANSACTION READ ONLY"],
    ),
    "prepared statements": (
        [
            "PREPARE p AS SELECT 1",
            "--\rPREPARE p AS SELECT 1",
            "EXECUTE p",
            "DEALLOCATE ALL",
            "DEALLOCATE p",
            "EXPLAIN (VERBOSE) EXECUTE __asyncpg_stmt_1__",
            "EXPLAIN ANALYZE EXECUTE p",
            "CREATE TEMP TABLE x AS EXECUTE __asyncpg_stmt_2__",
        ],
        ["SELECT 'PREPARE'", "EXPLAIN SELECT 1"],
    ),
    "session state": (["DISCARD ALL", "--\rDISCARD PLANS", "LISTEN x", "UNLISTEN *"], ["NOTIFY x"]),
    "COPY": (["COPY t TO STDOUT", "--\rCOPY t FROM STDIN", "COPY (SELECT 1) TO '/tmp/x'"], ["SELECT 'COPY'"]),
    "LOAD": (["LOAD 'plpgsql'", "--\rLOAD 'x'"], []),
    "roles": (
        [
            "ALTER ROLE CURRENT_USER SET work_mem = '1MB'",
            "ALTER USER CURRENT_USER PASSWORD 'x'",
            "ALTER GROUP g ADD USER u",
            "--\rALTER ROLE current_user RESET ALL",
            "CREATE ROLE evil",
            "CREATE USER evil",
            "DROP ROLE evil",
            "GRANT p_x_admin TO CURRENT_USER",
            "REASSIGN OWNED BY CURRENT_USER TO evil",
            "ALTER ROLE evil RENAME TO x",
            "COMMENT ON ROLE evil IS 'x'",
        ],
        ["GRANT SELECT ON t TO PUBLIC", "ALTER TABLE t OWNER TO CURRENT_USER"],
    ),
    "database and system": (
        [
            "ALTER DATABASE db SET work_mem = '1MB'",
            "ALTER DATABASE db RENAME TO x",
            "ALTER DATABASE db OWNER TO CURRENT_USER",
            "COMMENT ON DATABASE db IS 'x'",
            "CREATE DATABASE x",
            "DROP DATABASE x",
            "ALTER SYSTEM SET fsync = off",
            "--\rALTER SYSTEM RESET ALL",
        ],
        [],
    ),
    "role switch": (
        [
            "SET ROLE postgres",
            "SET LOCAL ROLE NONE",
            "RESET ROLE",
            "SET SESSION AUTHORIZATION postgres",
            "SET SESSION AUTHORIZATION DEFAULT",
            "RESET SESSION AUTHORIZATION",
            'SET "role" = postgres',
            "SELECT set_config('role', 'postgres', true)",
            "SELECT 1 FROM t WHERE set_config('session_authorization', 'x', false) IS NULL",
        ],
        ["SELECT current_role"],
    ),
    "request identity": (
        [
            "SET fluxbase.auth_uid = 'x'",
            "SET LOCAL fluxbase.auth_uid = 'x'",
            "SET LOCAL U&\"fluxbase\".auth_uid = 'x'",
            "SET LOCAL U&\"\\0066luxbase\".auth_uid = 'x'",
            "SET \"FLUXBASE\".AUTH_CLAIMS TO '{}'",
            "set local FLUXBASE . AUTH_ROLE = 'admin'",
            "--\rSET fluxbase.auth_uid = 'x'",
            "RESET fluxbase.auth_uid",
            "SELECT set_config('fluxbase.auth_uid', 'x', true)",
            "SELECT pg_catalog.set_config(E'fluxbase.auth\\x5fuid', 'x', true)",
            "WITH x AS MATERIALIZED (SELECT set_config('fluxbase.auth_claims', '{}', true)) SELECT * FROM x",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET fluxbase.auth_uid = 'x' AS 'SELECT 1'",
            "ALTER FUNCTION f() SET fluxbase.auth_uid = 'x'",
            # a SQL function's body runs its SET inside the caller's statement
            "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS $$ SET LOCAL fluxbase.auth_uid = 'x'; "
            "SELECT 1 $$",
            "CREATE PROCEDURE pg_temp.p() AS 'RESET fluxbase.auth_uid' LANGUAGE SQL",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $a$ CREATE FUNCTION g() RETURNS void "
            "LANGUAGE sql AS $b$ SET fluxbase.auth_uid = 'x' $b$ $a$",
        ],
        [
            "SELECT current_setting('fluxbase.auth_uid', true)",
            "SELECT auth.uid()",
            "SET LOCAL myapp.x = 1",
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT current_setting('fluxbase.x') $$",
            "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN 'SET fluxbase.x'; END $$",
        ],
    ),
    "how SQL text is read": (
        [
            "SET LOCAL standard_conforming_strings = off",
            "--\rSET standard_conforming_strings TO off",
            "SELECT set_config('standard_conforming_strings', 'off', true)",
            "SET backslash_quote = on",
            "SET LOCAL client_encoding = 'SJIS'",
            "RESET standard_conforming_strings",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET standard_conforming_strings = off "
            "AS 'SELECT 1'",
        ],
        [
            "SHOW standard_conforming_strings",
            "SELECT current_setting('client_encoding')",
            "SET standard_conforming_strings = on",
            "SET client_encoding = 'UTF8'",
            "SET LOCAL work_mem = '1MB'",
        ],
    ),
    "RESET ALL": (["RESET ALL", "--\rRESET ALL", "ALTER FUNCTION f() RESET ALL"], ["RESET work_mem"]),
    "computed setting name": (
        [
            "SELECT set_config('fluxbase' || '.auth_uid', 'x', true)",
            "SELECT set_config($1, 'x', true)",
            "UPDATE pg_settings SET setting = 'x' WHERE name = 'work_mem'",
        ],
        ["SELECT name, setting FROM pg_settings"],
    ),
    "resource caps": (
        [
            "SET work_mem = '8GB'",
            "SET LOCAL work_mem = 8388608",
            "SET work_mem = '16385kB'",
            "SET maintenance_work_mem = '4GB'",
            "SET temp_file_limit = -1",
            "SET temp_buffers = '1GB'",
            "SET hash_mem_multiplier = 1000",
            "SET max_parallel_workers_per_gather = 64",
            "SET statement_timeout = 0",
            "SET statement_timeout = '1h'",
            "SET LOCAL statement_timeout = '0.4'",
            "SET LOCAL lock_timeout = '400us'",
            "SET lock_timeout = '6s'",
            "SET idle_in_transaction_session_timeout = 0",
            "SELECT set_config('work_mem', '8GB', false)",
            "SELECT set_config('work_mem', $1, false)",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET work_mem = '8GB' AS 'SELECT 1'",
            "CREATE PROCEDURE p() LANGUAGE sql SET statement_timeout = 0 AS 'SELECT 1'",
        ],
        [
            "SET LOCAL work_mem = '1MB'",
            "SET work_mem = '16MB'",
            "SET work_mem TO DEFAULT",
            "RESET work_mem",
            "SET statement_timeout = '2s'",
            "SET lock_timeout = 1000",
            "SET hash_mem_multiplier = 1.5",
            "SELECT set_config('work_mem', '4MB', true)",
        ],
    ),
    "resource setting in a routine": (
        [
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET work_mem = '1MB' AS 'SELECT 1'",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET work_mem FROM CURRENT AS 'SELECT 1'",
            "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql SET lock_timeout = '1s' AS 'SELECT 1'",
            "ALTER FUNCTION f() SET maintenance_work_mem = '1MB'",
            "ALTER ROUTINE f() SET hash_mem_multiplier FROM CURRENT",
            "ALTER PROCEDURE p() SET temp_buffers = '1MB'",
        ],
        [
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path FROM CURRENT AS 'SELECT 1'",
            "ALTER FUNCTION f() SET search_path = pg_catalog",
            "ALTER FUNCTION f() RESET work_mem",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET work_mem TO DEFAULT AS 'SELECT 1'",
            "SET LOCAL work_mem = '1MB'",
        ],
    ),
    "large objects": (
        [
            "SELECT lo_from_bytea(0, 'x')",
            "SELECT lo_create(0)",
            "SELECT pg_catalog.lo_put(lo_creat(-1), 0, 'x')",
            "SELECT loread(lo_open(1, 262144), 10)",
            "SELECT * FROM t WHERE lo_unlink(1) = 1",
            "COMMENT ON LARGE OBJECT 1 IS 'x'",
            "GRANT SELECT ON LARGE OBJECT 1 TO PUBLIC",
            "ALTER LARGE OBJECT 1 OWNER TO CURRENT_USER",
        ],
        ["SELECT 'lo_from_bytea'", "SELECT decode('00', 'hex')"],
    ),
    "extensions": (
        [
            "CREATE EXTENSION dblink",
            "create extension if not exists file_fdw",
            'CREATE EXTENSION "adminpack" CASCADE',
            "DROP EXTENSION vector, plpgsql",
            "ALTER EXTENSION vector UPDATE",
            "ALTER EXTENSION vector ADD FUNCTION now()",
            "ALTER EXTENSION vector SET SCHEMA public",
            "COMMENT ON EXTENSION vector IS 'x'",
            "CREATE EXTENSION vector VERSION '0.1.0'",
        ],
        [
            "CREATE EXTENSION vector",
            "CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA extensions",
            'DROP EXTENSION IF EXISTS "uuid-ossp", hstore',
            "SELECT 'CREATE EXTENSION dblink'",
        ],
    ),
    "session SET in a batch": (
        [
            "SET search_path = x",
            "SET SESSION statement_timeout = '1s'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        ],
        ["SET LOCAL search_path = x", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "RESET search_path"],
    ),
    "VACUUM in a script": (["VACUUM", "VACUUM (ANALYZE) t", "--\rVACUUM t"], ["ANALYZE t"]),
}

_ALL = {r.what: r for r in RULES}
_SEVERAL_CONTEXTS = (REQUEST, BATCH)


def _contexts(what: str) -> tuple[str, ...]:
    return _SEVERAL_CONTEXTS if what == "several statements" else _ALL[what].contexts


def _sqlstate(what: str) -> str:
    return "42601" if what == "several statements" else _ALL[what].sqlstate


def test_every_rule_has_examples() -> None:
    assert set(EXAMPLES) == {r.what for r in RULES} | {"several statements"}
    for rule in RULES:
        assert rule.why and rule.message and len(rule.sqlstate) == 5, rule.what


@pytest.mark.parametrize("what", list(EXAMPLES))
def test_rule(what: str) -> None:
    classifier = Classifier()
    refused, allowed = EXAMPLES[what]
    for context in _contexts(what):
        for text in refused:
            got = classifier.classify(text).refusal(context)
            assert got is not None and got.rule == what, (context, text, got)
            assert got.sqlstate == _sqlstate(what)
            assert got.message and "{" not in got.message, got
        for text in allowed:
            got = classifier.classify(text).refusal(context)
            assert got is None or got.rule != what, (context, text, got)
    for context in set((REQUEST, BATCH, SCRIPT)) - set(_contexts(what)):
        for text in refused:
            got = classifier.classify(text).refusal(context)
            assert got is None or got.rule != what, (context, text, got)


def test_caps_follow_the_settings() -> None:
    tight = Caps(work_mem_kb=1024, statement_timeout_ms=1000)
    assert over_cap("work_mem", "1MB", tight) is None
    assert over_cap("work_mem", "1025kB", tight) is not None
    assert over_cap("statement_timeout", "1s", tight) is None
    assert over_cap("statement_timeout", "1001", tight) is not None
    assert over_cap("statement_timeout", "0.5min", tight) is not None
    assert over_cap("work_mem", "1 mb", tight) is not None  # PostgreSQL's units are case-sensitive
    assert over_cap("search_path", "anything", tight) is None
    assert Classifier(tight).classify("SET work_mem = '2MB'").refusal(REQUEST) is not None
    assert Classifier().classify("SET work_mem = '2MB'").refusal(REQUEST) is None


def test_one_parse_per_distinct_text() -> None:
    classifier = Classifier()
    text = "SELECT id FROM notes WHERE id = $1"
    first = classifier.classify(text)
    assert classifier.classify(text) is first
    assert classifier.cache_info().misses == 1 and classifier.cache_info().hits == 1
    huge = "SELECT " + ", ".join(["1"] * 10_000)
    assert classifier.classify(huge).refusal(REQUEST) is None
    assert classifier.cache_info().currsize == 1  # long texts are not kept
    deep = "SELECT " + "1 + " * 10_000 + "1"  # refused, never a crash
    assert classifier.classify(deep).refusal(REQUEST).rule == "unparsable"


def test_script_split_follows_postgres() -> None:
    script = (
        "CREATE TABLE a (x text DEFAULT 'x; COMMIT');--\rCOMMIT\n;"
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END;"
        "/* ; /* ; */ ; */ SELECT $q$;$q$"
    )
    parts = classification.split(script)
    # The `--\r` comment and the nested block comment are not statements: PostgreSQL skips them.
    assert [p.split()[0] for p in parts] == ["CREATE", "COMMIT", "CREATE", "SELECT"]
    assert parts[2].endswith("END") and parts[3] == "SELECT $q$;$q$"
    assert classification.default().classify(parts[1]).refusal(SCRIPT).rule == "transaction control"


async def _through_api(api: Api, project: Any, what: str, text: str) -> dict[str, Any]:
    context = _contexts(what)[0]
    key, pid = project.admin_key, project.id
    if context == REQUEST:
        return (await api.sql(key, pid, text)).json()["error"]
    if context == BATCH:
        r = await api.http.post(
            "/api/execute-batch",
            json={"projectId": pid, "statements": [{"query": "SELECT 1"}, {"query": text}]},
            headers=bearer(key),
        )
        err = r.json()["error"]
        assert err["statementIndex"] == 1
        return dict(err)
    r = await api.http.post(
        f"/api/projects/{pid}/migrations", json={"name": "0001_x", "sql": text}, headers=bearer(key)
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR", r.text
    return {"details": "ERROR:  " + _sqlstate(what), "message": r.json()["error"]["message"]}


@pytest.mark.parametrize("what", list(EXAMPLES))
async def test_rule_through_the_api(api: Api, project: Any, what: str) -> None:
    """Each row's first example, as the documented SQL_EXEC_ERROR envelope (or a migration's
    VALIDATION_ERROR), with the row's SQLSTATE; nothing ran."""
    text = EXAMPLES[what][0][0]
    err = await _through_api(api, project, what, text)
    assert err["details"] == f"ERROR:  {_sqlstate(what)}", (what, err)
    if "code" in err:
        assert err["code"] == "SQL_EXEC_ERROR"
    assert "Traceback" not in err["message"]
