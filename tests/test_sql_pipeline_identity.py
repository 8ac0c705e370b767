"""The request identity is SET LOCAL on every path, the one-round-trip path included, and a
statement that ends the request's transaction fails the request and closes the connection.

These drive services.sql in this process against the session's real PostgreSQL (a project made
through the API), so that the tenant connection itself can be inspected after a request.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from fluxbase.errors import StatementFailed
from fluxbase.services import sql
from fluxbase.tenancy import session
from fluxbase.tenancy.results import encode
from support import Api


def _request(pid: str, scope: str, uid: str | None, end_user: bool = False) -> session.TenantRequest:
    claims: dict[str, Any] = {"role": scope, "project_id": pid}
    if uid is not None:
        claims["sub"] = uid
    return session.TenantRequest(
        project_id=pid,
        scope=scope,
        identity=session.Identity(uid, claims, scope, end_user=end_user),
        limits=session.Limits(deadline_s=10, max_rows=100, max_bytes=1 << 20, acquire_timeout_s=5),
    )


async def test_one_round_trip_identity_ends_with_its_transaction(tenancy, api: Api) -> None:
    pools, control, pid = tenancy
    pool = await pools.pool(pid, "admin")
    conn = await pool.acquire()
    notices: list[str] = []
    conn.add_log_listener(lambda _c, msg: notices.append(f"{msg.severity}: {msg.message}"))
    await pool.release(conn)

    body = await _body(pools, control, _request(pid, "admin", "alice"), "SELECT auth.uid() AS u", [])
    assert b'"rows":[{"u":"alice"}]' in body, body
    conn2 = await pool.acquire()
    try:
        assert conn2 is conn and conn.dirty  # the same session, used by the one-round-trip path
        # Outside the request's (implicit) transaction nothing of its identity is left: SET LOCAL.
        for name in ("fluxbase.auth_uid", "fluxbase.auth_claims", "fluxbase.auth_role"):
            assert await conn.fetchval("SELECT current_setting($1, true)", name) in (None, ""), name
    finally:
        await pool.release(conn2)
    # SET LOCAL after the reset steps is inside the pipeline's implicit transaction block: no
    # "SET LOCAL can only be used in transaction blocks" warning per request.
    assert notices == []


async def test_a_statement_that_ends_the_transaction_fails_and_closes_the_connection(tenancy) -> None:
    """The backstop behind tenancy.statements: if transaction control ever got through, the
    request fails and the session never serves another request."""
    pools, control, pid = tenancy
    req = _request(pid, "admin", "alice")
    pool = await pools.pool(pid, "admin")
    # AND CHAIN starts a new transaction at once: still one, but not the request's.
    for ender in ("COMMIT", "COMMIT AND CHAIN", "ROLLBACK AND CHAIN", "END"):
        seen: list[Any] = []

        async def work(tx: session.Tx, ender: str = ender, seen: list[Any] = seen) -> Any:
            seen.append(tx.conn)
            await tx.run("SELECT 1", [])
            return await tx.run(ender, [])  # as if the classifier had let it through

        with pytest.raises(StatementFailed) as caught:
            await session.transaction(pools, control, req, work)
        assert caught.value.sqlstate == "0A000", ender
        assert "ended the request's transaction" in caught.value.message
        assert seen[0].is_closed(), ender
        fresh = await pool.acquire()
        try:
            assert fresh is not seen[0] and not fresh.is_in_transaction()
        finally:
            await pool.release(fresh)
    # The project keeps working on a new connection.
    body = await _body(pools, control, req, "SELECT auth.uid() AS u", [])
    assert b'"rows":[{"u":"alice"}]' in body


async def test_end_user_requests_have_pools_of_their_own(tenancy) -> None:
    pools, control, pid = tenancy
    server = await pools.pool(pid, "readwrite")
    user = await pools.pool(pid, "readwrite", end_user=True)
    assert server is not user
    pids = set()
    for end_user in (False, True):
        req = _request(pid, "readwrite", "bob" if end_user else None, end_user=end_user)
        body = await _body(pools, control, req, "SELECT pg_backend_pid() AS p", [])
        pids.add(body)
    assert len(pids) == 2
    assert server.get_size() == 1 and user.get_size() == 1


async def test_control_connection_is_not_needed_for_refusals(tenancy) -> None:
    """Refused statements never reach a connection (one cached classification per text)."""
    pools, _, pid = tenancy
    req = _request(pid, "readwrite", None)
    before = pools.statements.cache_info().hits
    for _ in range(2):
        with pytest.raises(StatementFailed) as refused:
            await sql.execute(pools, asyncpg_pool_unused(), req, "--\rCOMMIT", [])
        assert refused.value.sqlstate == "0A000"
    assert pools.statements.cache_info().hits == before + 1
    assert (await pools.pool(pid, "readwrite")).get_size() == 0


async def _body(*args: Any) -> bytes:
    return encode((await sql.execute(*args)).result())


def asyncpg_pool_unused() -> asyncpg.Pool:
    return None  # type: ignore[return-value]  # a refusal must not touch it
