"""Property test: tenancy.statements agrees with the server about what a statement is.

Hypothesis writes thousands of statements around SET / RESET / COMMIT / PREPARE / SELECT /
set_config cores, with the spellings where a hand-written lexer and PostgreSQL disagreed:
`--` comments ending at `\\r`, `\\r\\n` or `\\n`, nested block comments, dollar quotes,
`U&"..."` identifiers (with UESCAPE), E'' strings and unicode escapes, mixed case, quoted names.
Each runs on a real PostgreSQL connection inside a transaction that is then rolled back, and
what the server did (its command tag, whether the transaction ended, whether the identity
setting changed and to what, whether a prepared statement appeared) is compared with what the
classifier says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fluxbase.tenancy import statements as classification
from support import Stack

UID = "fluxbase.auth_uid"
SENTINEL = "sentinel-before"

_comment_chars = st.sampled_from(list("ab ;'\"$*-\\xü()"))
_line_end = st.sampled_from(["\r", "\n", "\r\n"])
_line_comment = st.builds(lambda t, e: f"--{t}{e}", st.text(_comment_chars, max_size=6), _line_end)
_block_body = st.text(_comment_chars, max_size=6).filter(lambda t: "*/" not in t and "/*" not in t)
_block_comment = st.one_of(
    st.builds(lambda t: f"/*{t}*/", _block_body),
    st.builds(lambda a, b: f"/*{a}/*{b}*/{a}*/", _block_body, _block_body),
)
_space = st.sampled_from([" ", "\t", "\n", "\r", "\r\n", "\f"])
_gap = st.lists(st.one_of(_space, _line_comment, _block_comment), min_size=1, max_size=3).map("".join)
_opt_gap = st.one_of(st.just(""), _gap)
# A gap that can stand between two tokens: it must end in whitespace or a comment.
_sep = _gap

IDENTITY_NAMES = [
    "fluxbase.auth_uid",
    "FLUXBASE.AUTH_UID",
    '"fluxbase".auth_uid',
    '"fluxbase"."auth_uid"',
    '"FLUXBASE".auth_uid',
    'U&"fluxbase".auth_uid',
    'U&"\\0066luxbase".auth_uid',
    'U&"fl\\0075xbase"."auth\\005fuid"',
    "U&\"!0066luxbase\" UESCAPE '!'.auth_uid",
]
OTHER_NAMES = ["myapp.note", "work_mem", "search_path", "application_name"]
VALUES = [
    "'v1'",
    "E'v\\x31'",
    "E'v\\u0031'",
    "U&'v\\0031'",
    "$$v1$$",
    "$q$v1$q$",
    "'v--1'",
    "'v;1'",
    "'v/*1'",
    "$$v'1$$",
    "'1MB'",
    "'8GB'",
    "64",
]


@st.composite
def _set(draw: Any) -> str:
    name = draw(st.sampled_from(IDENTITY_NAMES + OTHER_NAMES))
    scope = draw(st.sampled_from(["", "LOCAL", "SESSION", "local"]))
    head = "SET" + (draw(_sep) + scope if scope else "")
    eq = draw(st.sampled_from(["=", "TO", "to"]))
    value = draw(st.sampled_from(VALUES))
    return f"{head}{draw(_sep)}{name}{draw(_sep)}{eq}{draw(_sep)}{value}"


@st.composite
def _reset(draw: Any) -> str:
    return f"RESET{draw(_sep)}{draw(st.sampled_from(IDENTITY_NAMES + OTHER_NAMES))}"


@st.composite
def _set_config(draw: Any) -> str:
    name = draw(st.sampled_from(["'fluxbase.auth_uid'", "E'fluxbase.auth\\x5fuid'", "'myapp.note'"]))
    value = draw(st.sampled_from(["'v1'", "$$v1$$", "E'v\\x31'"]))
    local = draw(st.sampled_from(["true", "false"]))
    return f"SELECT{draw(_sep)}set_config({name},{draw(_opt_gap)}{value}, {local})"


_core = st.one_of(
    _set(),
    _reset(),
    _set_config(),
    st.sampled_from(
        [
            "COMMIT",
            "commit",
            "COMMIT AND CHAIN",
            "END",
            "ROLLBACK",
            "ABORT",
            "PREPARE p1 AS SELECT 1",
            "prepare p1 (int) AS SELECT $1",
            "SELECT 1",
            "SELECT 'COMMIT'",
            "SELECT $$; COMMIT; $$",
            "SELECT E'\\'; COMMIT; --'",
            'SELECT 1 AS "--"',
            "SELECT U&'\\0043OMMIT'",
            "VALUES (1)",
        ]
    ),
)


@st.composite
def statements(draw: Any) -> str:
    """One statement, with comments and whitespace around it and maybe a trailing `;`."""
    text = draw(_opt_gap) + draw(_core) + draw(_opt_gap)
    if draw(st.booleans()):
        text += ";" + draw(_opt_gap)
    return text


@pytest.fixture(scope="module")
async def scratch(stack: Stack) -> AsyncIterator[asyncpg.Connection]:
    name = await stack.create_database()
    # No statement cache: DEALLOCATE ALL after each example would pull asyncpg's from under it.
    conn = await asyncpg.connect(stack.database_url(name), statement_cache_size=0)
    try:
        yield conn
    finally:
        await conn.close()
        await stack.drop_database(name)


async def _observe(conn: asyncpg.Connection, text: str) -> dict[str, Any]:
    """Run `text` in a transaction as the server sees it (simple protocol), then undo all."""
    await conn.execute(f"BEGIN; SET LOCAL {UID} = '{SENTINEL}'")
    try:
        xid = await conn.fetchval("SELECT pg_current_xact_id()::text")
        out: dict[str, Any] = {"error": None, "tag": None}
        try:
            out["tag"] = await conn.execute(text)
        except asyncpg.PostgresError as exc:
            out["error"] = exc.sqlstate
            out["message"] = str(exc)
        if out["error"] is None:
            out["ended"] = await conn.fetchval("SELECT pg_current_xact_id_if_assigned()::text") != xid
            out["uid"] = await conn.fetchval("SELECT current_setting($1, true)", UID)
            out["prepared"] = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
        return out
    finally:
        await conn.execute("ROLLBACK; RESET ALL; DEALLOCATE ALL")  # ROLLBACK outside one only warns


# 42601 raised by parse analysis, not by the grammar: the grammar (which the classifier shares)
# accepted the text, and the server refused it whole, so nothing ran either way. Hypothesis found
# `SELECT/**/*--*/**/…`: the `--` starts a comment, leaving `SELECT *` with no FROM.
_ANALYSIS_SYNTAX_ERRORS = {"SELECT * with no tables specified is not valid"}


_TAGS = {
    "VariableSetStmt": {"SET", "RESET"},
    "TransactionStmt": {"COMMIT", "ROLLBACK"},
    "PrepareStmt": {"PREPARE"},
    "SelectStmt": {"SELECT"},
}


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=statements())
@example(text="SELECT/**/*--*/**/set_config('fluxbase.auth_uid','v1', true)")
async def test_classifier_agrees_with_the_server(scratch: asyncpg.Connection, text: str) -> None:
    verdict = classification.Classifier().classify(text)
    seen = await _observe(scratch, text)
    refused = verdict.refusal(classification.REQUEST)
    rule = refused.rule if refused is not None else None
    if verdict.node == "":  # the classifier's parser refused it: so does the server's
        assert seen["error"] == "42601", (text, seen)
        return
    assert verdict.count == 1, (text, verdict)
    if seen["error"] == "42601" and seen["message"] not in _ANALYSIS_SYNTAX_ERRORS:
        raise AssertionError(f"the server found a syntax error the classifier did not: {text!r}")
    if seen["error"] is not None:
        return  # e.g. an invalid value for work_mem: nothing happened either way
    tag = seen["tag"].split()[0]
    assert tag in _TAGS[verdict.node], (text, tag, verdict.node)
    if seen["ended"]:
        assert rule == "transaction control", (text, seen, rule)
    if seen["prepared"]:
        assert rule == "prepared statements", (text, seen, rule)
    if seen["uid"] != SENTINEL:
        assert rule in ("request identity", "transaction control"), (text, seen, rule)
    # What the classifier read as the identity's new value is what the server set.
    for s in verdict.statements[0].settings:
        if s.name == UID and s.value is not None and not s.resets:
            assert seen["uid"] == s.value, (text, seen, s)
            assert rule == "request identity"
