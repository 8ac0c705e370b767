"""Tenant SQL over HTTP: /api/execute-sql and /api/execute-batch, one transaction per request.

A single execute-sql statement that `tenancy.session.pipelinable` allows runs in one round trip
(`one_round_trip`); everything else runs in `tenancy.session.transaction`. What a statement is,
and whether it is refused, is tenancy.statements' decision (PostgreSQL's own parser, one cached
classification per text); nothing here reads SQL text. Failures are raised (StatementFailed and
the catalog's errors); the HTTP layer renders the results and the SQL envelope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from fluxbase.errors import ProjectMoving, StatementFailed, ValidationError
from fluxbase.tenancy import statements as classification
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.results import StatementResult
from fluxbase.tenancy.session import Fallback, TenantRequest, Tx, one_round_trip, pipelinable, transaction

MAX_QUERY_CHARS = 1_000_000
MAX_PARAMS = 10_000
MAX_BATCH_STATEMENTS = 100
ISOLATION_LEVELS = {
    "read committed": "READ COMMITTED",
    "repeatable read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}


def _check_query(query: str, what: str = "query") -> None:
    if not query or query.isspace():
        raise ValidationError(f"{what} must not be empty.")
    if len(query) > MAX_QUERY_CHARS or "\x00" in query:
        raise ValidationError(f"{what} is too long or contains NUL characters.")


# Statements that only read: all a project being moved between clusters still runs (others are
# refused before they reach the database, where they would queue behind the move's table locks).
_READS = frozenset({"SelectStmt", "ExplainStmt", "VariableShowStmt"})
_WRITES_INSIDE = frozenset(
    {"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "LockingClause", "IntoClause"}
)


def _refuse_while_moving(req: TenantRequest, verdict: classification.Verdict) -> None:
    if req.project_moving and not all(
        s.node in _READS and not (s.kinds & _WRITES_INSIDE) for s in verdict.statements
    ):
        raise ProjectMoving()


async def execute(
    pools: TenantPools, control: asyncpg.Pool, req: TenantRequest, query: str, params: list[Any]
) -> StatementResult:
    """Run one tenant statement (StatementFailed if it, or its refusal, fails it)."""
    _check_query(query)
    if len(params) > MAX_PARAMS:
        raise ValidationError(f"at most {MAX_PARAMS} params are allowed.")
    verdict = pools.statements.classify(query)
    refused = verdict.refusal(classification.REQUEST)
    if refused is not None:
        raise StatementFailed(refused.message, refused.sqlstate)
    if req.project_moving:
        _refuse_while_moving(req, verdict)
    keyword = verdict.keyword
    if pipelinable(req, verdict, query):
        try:
            return await one_round_trip(pools, control, req, query, params, keyword)
        except Fallback:
            pass

    ext = verdict.statements[0].extension

    async def work(tx: Tx) -> StatementResult:
        return await _run(tx, ext, query, params, keyword)

    return await transaction(pools, control, req, work)


async def _run(
    tx: Tx,
    ext: classification.ExtensionOp | None,
    query: str,
    params: list[Any],
    keyword: str,
    before: tuple[str, ...] = (),
) -> StatementResult:
    """Run one statement (after `before`: Tx.reasserting); CREATE/DROP EXTENSION as the
    platform's call that does it (sql/0023)."""
    if ext is None:
        return await tx.run(query, params, keyword, before)
    if params:
        raise StatementFailed(f"{ext.tag} takes no parameters.", "42P02", tx.index)
    for step in before:
        await tx.fetch(step)
    await tx.fetch(ext.call())
    return StatementResult([], [], 0, ext.tag, False, ext.tag)


@dataclass(frozen=True)
class Statement:
    query: str
    params: list[Any]


async def execute_batch(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    statements: list[Statement],
    *,
    isolation: str,
    read_only: bool = False,
) -> list[StatementResult]:
    """Run statements in order in one transaction, all or nothing (StatementFailed carries the
    index of the statement that failed, None for the commit)."""
    if not statements:
        raise ValidationError("statements must not be empty.")
    if len(statements) > MAX_BATCH_STATEMENTS:
        raise ValidationError(f"at most {MAX_BATCH_STATEMENTS} statements are allowed in a batch.")
    if sum(len(s.query) for s in statements) > MAX_QUERY_CHARS:
        raise ValidationError(f"the statements may total at most {MAX_QUERY_CHARS} characters.")
    if sum(len(s.params) for s in statements) > MAX_PARAMS:
        raise ValidationError(f"at most {MAX_PARAMS} params are allowed in a batch.")
    level = ISOLATION_LEVELS.get(isolation.strip().lower())
    if level is None:
        raise ValidationError("isolationLevel must be one of: " + ", ".join(ISOLATION_LEVELS) + ".")
    keywords: list[str] = []
    verdicts: list[classification.Verdict] = []
    for i, s in enumerate(statements):
        _check_query(s.query, f"statements[{i}].query")
        verdict = pools.statements.classify(s.query)
        refused = verdict.refusal(classification.BATCH)
        if refused is not None:
            raise StatementFailed(refused.message, refused.sqlstate, i)
        _refuse_while_moving(req, verdict)
        keywords.append(verdict.keyword)
        verdicts.append(verdict)

    async def work(tx: Tx) -> list[StatementResult]:
        out = []
        carried: dict[str, str] = {}  # capped settings the batch SET visibly, as it SET them
        for i, s in enumerate(statements):
            tx.index = i
            # Whatever statement i-1 did to the settings unseen, statement i runs with the
            # request's identity and caps (and what the batch SET visibly), set in its round trip.
            before = tx.reasserting(carried) if i else ()
            out.append(
                await _run(tx, verdicts[i].statements[0].extension, s.query, s.params, keywords[i], before)
            )
            for st in verdicts[i].statements:
                classification.carried_settings(st, carried)
        return out

    return await transaction(pools, control, req, work, read_only=read_only, isolation=level)
