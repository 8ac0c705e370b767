"""A cold project's first request (issue 19): what a new tenant connection and a cold key lookup
cost in round trips, and that the cheaper setup keeps what the old one checked.

A TCP relay on loopback between the tenant connection and the session's real PostgreSQL counts
round trips: each time the client speaks again after the server answered is one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from fluxbase.config import load_settings
from fluxbase.errors import AuthRequired, OriginNotAllowed
from fluxbase.security.roles import role_name, role_password
from fluxbase.services import access
from fluxbase.tenancy import session, wire
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.results import encode
from support import Api, bearer


class Relay:
    """Forwards one TCP connection at a time to PostgreSQL and counts round trips."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.round_trips = 0
        self.sent = bytearray()  # what the client sent since the last `reset`
        self._last = "server"  # the client's first bytes start the first round trip
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def reset(self) -> None:
        """Count from zero; the client's next bytes start a round trip."""
        self.round_trips = 0
        self.sent.clear()
        self._last = "server"

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, side: str) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if side == "client":
                        self.sent += data
                        if self._last == "server":
                            self.round_trips += 1
                    self._last = side
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(cr, sw, "client"), pump(sr, cw, "server"))

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def relayed(instance: Any) -> AsyncIterator[tuple[Relay, dict[str, str]]]:
    """A relay in front of the session's PostgreSQL, and the instance's env pointed at it."""
    url = urlsplit(instance.env["FLUXBASE_DATABASE_URL"])
    relay = Relay(url.hostname or "127.0.0.1", url.port or 5432)
    port = await relay.start()
    netloc = url.netloc.rsplit(":", 1)[0] + f":{port}"
    env = {**instance.env, "FLUXBASE_DATABASE_URL": urlunsplit(url._replace(netloc=netloc))}
    try:
        yield relay, env
    finally:
        await relay.close()


async def _rows(pools: TenantPools, control: asyncpg.Pool, pid: str, query: str) -> Any:
    """One statement on the one-round-trip path, its rows as the API answers them."""
    res = await session.one_round_trip(pools, control, _request(pid), query, [], "SELECT")
    return msgspec.json.decode(encode(res.result()))["rows"]


def _request(pid: str) -> session.TenantRequest:
    return session.TenantRequest(
        project_id=pid,
        scope="admin",
        identity=session.Identity(None, {"role": "admin", "project_id": pid}, "admin"),
        limits=session.Limits(deadline_s=10, max_rows=100, max_bytes=1 << 20, acquire_timeout_s=5),
    )


async def test_a_new_connection_and_its_first_request_take_four_round_trips_after_login(
    relayed: tuple[Relay, dict[str, str]], control_db: asyncpg.Pool, project: Any
) -> None:
    """The pool's connection setup prepares the one-round-trip steps and reads the login
    settings in two round trips (it was 14: one per prepared step, two for the settings); the
    first request then prepares its statement and runs it (two more)."""
    relay, env = relayed
    settings = load_settings(env)
    role = role_name(project.id, "admin")
    host, port = settings.database.server()
    # What logging in alone costs through the relay (the SCRAM exchange).
    bare = await asyncpg.connect(
        host=host,
        port=port,
        user=role,
        password=role_password(settings.auth.secret_key, role),
        database=urlsplit(settings.database.url).path.lstrip("/"),
        ssl=False,
    )
    login = relay.round_trips
    await bare.close()
    relay.reset()

    pools = TenantPools(settings, max_size=1)
    try:
        assert await _rows(pools, control_db, project.id, "SELECT 41 + 1 AS answer") == [{"answer": 42}]
        assert relay.round_trips == login + 4, (login, relay.round_trips)
        # The steps prepared at setup serve the request: a second one is a single round trip.
        relay.reset()
        assert await _rows(pools, control_db, project.id, "SELECT 41 + 1 AS answer") == [{"answer": 42}]
        assert relay.round_trips == 1
    finally:
        await pools.close()


async def test_a_new_session_parses_the_reset_steps_only_when_a_request_needs_them(
    relayed: tuple[Relay, dict[str, str]], control_db: asyncpg.Pool, project: Any
) -> None:
    """A new session has nothing to reset: its first request runs only the first reset step
    (CLOSE ALL, so that the identity's SET LOCAL is not the pipeline's first statement, which
    PostgreSQL warns about), and neither the connection's setup nor that request parses the
    others (nor the read-only and end-user steps an admin key's request does not use). The next
    request on the session parses and runs them: what the first left in the session (a setting,
    an advisory lock) is gone, and a later one finds them parsed (a second Parse of a named
    statement would fail)."""
    relay, env = relayed
    pools = TenantPools(load_settings(env), max_size=1)
    try:
        pool = await pools.pool(project.id, "admin")
        conn = await pool.acquire()  # a new session, no request ran on it yet
        notices: list[str] = []
        conn.add_log_listener(lambda _c, msg: notices.append(f"{msg.severity}: {msg.message}"))
        left = "SELECT set_config('fx.left', 'x', false) AS s, pg_advisory_lock(4242) IS NULL AS l"
        try:
            res = await session._one_round_trip(
                conn, _request(project.id), left, [], "SELECT", pools.statements.caps
            )
        finally:
            await pool.release(conn)
        assert msgspec.json.decode(encode(res.result()))["rows"] == [{"s": "x", "l": False}]
        assert notices == []  # no "SET LOCAL can only be used in transaction blocks"
        first = bytes(relay.sent)
        steps = wire.reset_steps(conn.request_prefix.native_reset)
        # Where the server has it, a used session's reset is begin_request (with the identity).
        lazy = wire.NATIVE_BEGIN if conn.request_prefix._begin is not None else steps[-1]
        for step in (*steps[1:], wire.NATIVE_BEGIN, wire.READ_ONLY, wire.USER_SESSION):
            assert step.encode() not in first, step
        assert b"fluxbase_guard.auth_epochs" in first  # the check step is parsed at setup
        probe = (
            "SELECT coalesce(current_setting('fx.left', true), '') AS s,"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS l"
        )
        for n in range(2):
            relay.reset()
            assert await _rows(pools, control_db, project.id, probe) == [{"s": "", "l": 0}]
            parsed = lazy.encode() in relay.sent
            assert parsed == (n == 0), n  # parsed by the second request only
            await _rows(pools, control_db, project.id, left)  # state for the next probe to find gone
        assert notices == []
    finally:
        await pools.close()


async def test_the_pipelined_setup_still_reads_the_login_settings_of_each_new_session(
    instance: Any, control_db: asyncpg.Pool, api: Api, project: Any
) -> None:
    """A role's own defaults above the caps, set from plpgsql, are seen by the next login: its
    requests run with the caps asserted (the setup's login-settings read is the one that
    decides it), whether the request takes the one-round-trip path or the explicit one."""
    pid, key = project.id, project.admin_key
    settings = load_settings(instance.env)
    pools = TenantPools(settings, max_size=1)
    try:
        assert (await _rows(pools, control_db, pid, "SHOW work_mem"))[0]["work_mem"] != "4GB"
        pool = await pools.pool(pid, "admin")
        conn = await pool.acquire()
        assert conn.over_caps is False
        await pool.release(conn)
        raised = "DO $$ BEGIN EXECUTE 'ALTER ROLE CURRENT_USER SET work_mem = ''4GB'''; END $$"
        r = await api.http.post(
            "/api/execute-sql", json={"projectId": pid, "query": raised}, headers=bearer(key)
        )
        assert r.json()["success"], r.text
        pool.discard_idle()  # the next request logs in again
        assert await _rows(pools, control_db, pid, "SHOW work_mem") == [{"work_mem": "16MB"}]
        conn = await pool.acquire()
        try:
            assert conn.over_caps is True
            assert await conn.fetchval("SHOW work_mem") == "4GB"  # the login default, capped per request
        finally:
            await pool.release(conn)
    finally:
        await pools.close()
        async with control_db.acquire() as su:
            await su.execute(f"ALTER ROLE {role_name(pid, 'admin')} RESET work_mem")


async def _runtime_conn(instance: Any) -> asyncpg.Connection:
    return await asyncpg.connect(instance.env["FLUXBASE_DATABASE_URL"])


async def _last_used(control_db: asyncpg.Pool, key_id: str) -> datetime | None:
    return await control_db.fetchval("SELECT last_used_at FROM fluxbase.api_keys WHERE id = $1", key_id)  # type: ignore[no-any-return]


async def _key(api: Api, project: Any, **extra: Any) -> tuple[str, str]:
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "cold", "scope": "read", **extra},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["apiKey"]["id"]


async def test_a_cold_key_lookup_is_one_statement_that_touches_only_a_live_key(
    instance: Any, control_db: asyncpg.Pool, api: Api, project: Any
) -> None:
    """The key, its project and epoch, and the lastUsedAt touch: one statement (it was a second
    one, an UPDATE, on every cold lookup of a key not used in the last minute). The touch still
    skips a key used from an origin it does not allow, and a revoked key."""
    conn = await _runtime_conn(instance)
    queries: list[str] = []
    conn.add_query_logger(lambda rec: queries.append(rec.query))
    try:
        raw, key_id = await _key(api, project, allowedOrigins=["https://app.example"])
        # From an origin the key does not allow: refused, and not touched.
        with pytest.raises(OriginNotAllowed):
            await access.authenticate_key(conn, raw, "https://evil.example")
        assert await _last_used(control_db, key_id) is None
        queries.clear()
        before = datetime.now(UTC)
        auth = await access.authenticate_key(conn, raw, "https://app.example")
        await asyncio.sleep(0.05)  # query loggers are called soon, not at once
        assert len(queries) == 1, queries
        assert auth.principal.key is not None and auth.principal.key.id == key_id
        touched = await _last_used(control_db, key_id)
        assert touched is not None and touched >= before.replace(microsecond=0)
        # Touched at most once a minute.
        await access.authenticate_key(conn, raw, "https://app.example")
        assert await _last_used(control_db, key_id) == touched

        plain, plain_id = await _key(api, project)
        await access.authenticate_key(conn, plain, None)  # no Origin header, no origin list
        assert await _last_used(control_db, plain_id) is not None

        revoked, revoked_id = await _key(api, project)
        r = await api.http.delete(
            f"/api/projects/{project.id}/api-keys/{revoked_id}", headers=bearer(project.owner_token)
        )
        assert r.status_code in (200, 204), r.text
        with pytest.raises(AuthRequired):
            await access.authenticate_key(conn, revoked, None)
        assert await _last_used(control_db, revoked_id) is None
    finally:
        await conn.close()


async def _backends(control_db: asyncpg.Pool, role: str) -> int:
    return await control_db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)  # type: ignore[no-any-return]


async def test_a_connection_opened_ahead_is_the_one_the_request_takes(
    instance: Any, control_db: asyncpg.Pool, project: Any
) -> None:
    """`TenantPools.preopen` (called once a request is authenticated, while its rate lease is
    read) starts the cold project's connection; the request's acquire then waits for that one
    instead of opening a second. Nothing is opened for a project whose address the pools do not
    know, nor when a connection is idle or already opening."""
    settings = load_settings(instance.env)
    pools = TenantPools(settings, max_size=4)
    role = role_name(project.id, "admin")
    try:
        pools.preopen(project.id, "admin")  # not located by a key lookup: nothing to overlap
        assert (await pools.pool(project.id, "admin")).get_size() == 0
        await pools.close_project(project.id)
        pools.locate(project.id, "default")
        pools.preopen(project.id, "admin")
        pools.preopen(project.id, "admin")  # already opening: not a second one
        pool = await pools.pool(project.id, "admin")
        assert pool.get_size() == 1
        conn = await pool.acquire(5)
        try:
            assert pool.get_size() == 1 and conn.request_prefix is not None
            assert await _backends(control_db, role) == 1
        finally:
            await pool.release(conn)
        pools.preopen(project.id, "admin")  # one is idle
        assert pool.get_size() == 1
        assert await _rows(pools, control_db, project.id, "SELECT 41 + 1 AS answer") == [{"answer": 42}]
        assert await _backends(control_db, role) == 1
    finally:
        await pools.close()


async def test_a_failed_opening_ahead_leaves_the_request_its_own_error(
    instance: Any, control_db: asyncpg.Pool
) -> None:
    """When the connection opened ahead fails (here: the role does not exist), the waiting
    request opens one itself and gets that opening's error at once, not a wait for its timeout;
    the pool and the budget keep no slot for it."""
    settings = load_settings(instance.env)
    pools = TenantPools(settings, max_size=4)
    ghost = "0123456789abcdef"
    try:
        pools.locate(ghost, "default")
        pools.preopen(ghost, "admin")
        pool = await pools.pool(ghost, "admin")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await pool.acquire(10)
        assert loop.time() - started < 5
        assert pool.get_size() == 0 and pools.budget.used == 0
    finally:
        await pools.close()
