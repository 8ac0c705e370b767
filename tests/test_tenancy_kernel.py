"""The tenancy kernel's own promises: a busy pool answers 503 (not 429), and asyncpg's private
API is used by one module only (fluxbase.tenancy.wire)."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path
from typing import Any

import asyncpg
import asyncpg.connection
import asyncpg.pool
import asyncpg.prepared_stmt
import asyncpg.protocol

from support import Api, assert_error

ROOT = Path(__file__).resolve().parent.parent
WIRE = ROOT / "platform" / "fluxbase" / "tenancy" / "wire.py"


async def test_an_exhausted_pool_answers_503_with_a_clear_message(spawn) -> None:
    """A pool of one connection held by a long request: the next request waits for the acquire
    timeout and gets 503 DATABASE_CONNECTION_ERROR saying the connections are busy (not 429)."""
    async with spawn(FLUXBASE_TENANT_POOL_MAX="1") as inst:
        api = Api(inst.url)
        control = await asyncpg.connect(inst.env["FLUXBASE_DATABASE_URL"])
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, rateLimitRequests=1_000_000)
            slow = asyncio.create_task(api.sql(key, pid, "SELECT pg_sleep(10) AS s"))
            # Wait until the long statement holds the one connection (an event, not a sleep).
            for _ in range(200):
                running = await control.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE $1 AND query LIKE $2",
                    f"p_{pid}_%",
                    "%pg_sleep(10)%",
                )
                if running:
                    break
                await asyncio.sleep(0.05)
            assert running == 1
            # Both wait (together) for the acquire timeout, 5 s, well inside the 10 s statement.
            waiting = await asyncio.gather(
                api.sql(key, pid, "SELECT 1 AS x"),
                api.http.post(
                    "/api/execute-batch",
                    json={"projectId": pid, "statements": [{"query": "SELECT 1"}]},
                    headers={"Authorization": f"Bearer {key}"},
                ),
            )
            for r in waiting:
                body = assert_error(r, 503, "DATABASE_CONNECTION_ERROR")
                assert "connections" in body["error"]["message"] and "busy" in body["error"]["message"]
                assert r.headers.get("retry-after") == "1"
            assert (await slow).json()["success"] is True
            # The slot is free again.
            assert (await api.sql(key, pid, "SELECT 2 AS x")).json()["result"]["rows"] == [{"x": 2}]
        finally:
            await control.close()
            await api.close()


def _asyncpg_private_names() -> set[str]:
    """Private attributes and methods of asyncpg's connection, statement, pool and protocol."""
    names: set[str] = set()
    for cls in (
        asyncpg.connection.Connection,
        asyncpg.prepared_stmt.PreparedStatement,
        asyncpg.pool.Pool,
        asyncpg.pool.PoolConnectionProxy,
        asyncpg.protocol.Protocol,
        asyncpg.protocol.protocol.PreparedStatementState,
    ):
        for klass in inspect.getmro(cls):
            if klass.__module__.startswith("asyncpg"):
                names.update(vars(klass))
                names.update(getattr(klass, "__slots__", ()))
    names.update({"_protocol", "_transport", "_server_caps", "_state", "_get_statement"})
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_asyncpg_internals_only_in_the_wire_module() -> None:
    """Only tenancy/wire.py may touch asyncpg's private API (`conn._protocol`, `stmt._state`...)."""
    private = _asyncpg_private_names()
    assert {"_protocol", "_get_statement", "_drop_local_statement_cache"} <= private
    assert WIRE.exists(), "fluxbase.tenancy.wire is the module allowed asyncpg internals"
    found: list[str] = []
    for top in ("platform", "realtime", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == WIRE:
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Attribute) and node.attr in private):
                    continue
                owner: Any = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue  # a class's own private attribute of the same name
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not found, "asyncpg internals outside fluxbase.tenancy.wire:\n" + "\n".join(found)
