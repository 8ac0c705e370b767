"""Hostile review 8: the SQL protocol path (fluxbase.http.protocol.SqlHttpProtocol: execute-sql
answered inside uvicorn's httptools protocol), the rate limits shared through the control plane
(fluxbase.ratelimit.SharedRateLimiter, sql/0038 rate_lease) and the `fluxbase_control` doorbell.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix. The database fixtures are used only to observe effects (a
LISTEN on the doorbell) or, for the limiter, as the control plane the limiter itself talks to.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest

from fluxbase.db.doorbell import ControlBell
from fluxbase.ratelimit import SharedRateLimiter
from fluxbase.security.roles import role_name
from support import Api
from test_attack_review1 import sql
from test_sql_protocol import PATH, connect, read_answer, request, rows

# -- 1. the protocol path -------------------------------------------------------------------------


async def _answers(reader: asyncio.StreamReader, at_most_s: float = 3.0) -> list[tuple[int, bytes]]:
    """Every answer the server sends until it closes the connection or goes quiet."""
    out: list[tuple[int, bytes]] = []
    while True:
        try:
            if reader._buffer.startswith(b"HTTP/1.1 100 "):  # type: ignore[attr-defined]
                await reader.readuntil(b"\r\n\r\n")
                out.append((100, b""))
                continue
            status, _, body = await asyncio.wait_for(read_answer(reader), at_most_s)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return out
        out.append((status, body))


def _smuggled(project: Any) -> bytes:
    """A complete second execute-sql request: if any answer carries 424242, it was run."""
    return request(project, "SELECT 424242 AS smuggled")


@pytest.mark.parametrize("trick", ["cl+te", "te+cl", "two content-lengths", "te obfuscated"])
async def test_framing_conflicts_never_run_a_smuggled_request(api: Api, project: Any, trick: str) -> None:
    smuggled = _smuggled(project)
    payload = json.dumps({"projectId": project.id, "query": "SELECT 1 AS n"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    head = request(project, "", body=b"").split(b"\r\n\r\n")[0].replace(b"Content-Length: 0\r\n", b"")
    if trick == "cl+te":
        raw = head + b"\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked)
        raw += chunked + smuggled
    elif trick == "te+cl":
        raw = head + b"\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % len(payload)
        raw += chunked + smuggled
    elif trick == "two content-lengths":
        raw = head + b"\r\nContent-Length: %d\r\nContent-Length: %d\r\n\r\n" % (
            len(payload) + len(smuggled),
            len(payload),
        )
        raw += payload + smuggled
    else:
        raw = head + b"\r\nTransfer-Encoding: chunked, identity\r\nContent-Length: %d\r\n\r\n" % len(payload)
        raw += payload + smuggled
    reader, writer = await connect(api)
    try:
        writer.write(raw)
        answers = await _answers(reader)
    finally:
        writer.close()
    assert all(b"424242" not in body for _, body in answers), answers
    assert all(status in (200, 400) for status, _ in answers), answers


async def test_a_request_inside_a_body_is_only_a_body(api: Api, project: Any) -> None:
    inner = _smuggled(project).decode()
    body = json.dumps(
        {"projectId": project.id, "query": "SELECT length($1) AS n", "params": [inner]}
    ).encode()
    reader, writer = await connect(api)
    try:
        writer.write(request(project, "", body=body) + request(project, "SELECT 2 AS n"))
        first = await read_answer(reader)
        second = await read_answer(reader)
        assert rows(first[2]) == [{"n": len(inner)}]
        assert rows(second[2]) == [{"n": 2}]
        writer.write(b"")
        assert await _answers(reader, 0.5) == []  # nothing more: the inner request never ran
    finally:
        writer.close()


async def _second_project(api: Api) -> Any:
    _owner, token = await api.new_user()
    pid = await api.new_project(token)
    key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
    return type("P", (), {"id": pid, "admin_key": key})()


async def test_pipelined_requests_of_two_projects_get_their_own_answers(api: Api, project: Any) -> None:
    """A slow request of project A, then B's with its body split across packets, then A and B
    again, on one connection: each answer is its own request's (role, request id), in order."""
    other = await _second_project(api)
    q = "SELECT current_user AS u, {n} AS n FROM pg_sleep({s})"
    plan = [(project, 0.3), (other, 0.0), (project, 0.0), (other, 0.1)]
    reader, writer = await connect(api)
    try:
        for i, (p, s) in enumerate(plan):
            raw = request(p, q.format(n=i, s=s), extra={"X-Request-Id": f"mix-{i}"})
            if i == 1:  # split mid-body, the rest after A's answer may already be on its way
                cut = len(raw) - 20
                writer.write(raw[:cut])
                await writer.drain()
                await asyncio.sleep(0.15)
                writer.write(raw[cut:])
            else:
                writer.write(raw)
        for i, (p, _) in enumerate(plan):
            status, headers, body = await read_answer(reader)
            assert status == 200 and headers["x-request-id"] == f"mix-{i}"
            assert rows(body) == [{"u": role_name(p.id, "admin"), "n": i}]
    finally:
        writer.close()


_TARGETS = [
    "/api/execute-sql/",
    "//api/execute-sql",
    "/api%2Fexecute-sql",
    "/api/%65xecute-sql",
    "/api/execute-sql?x=1",
    "/API/execute-sql",
    "/api/execute-sql#frag",
    "/api/./execute-sql",
    "http://127.0.0.1/api/execute-sql",
]


async def test_path_variants_never_skip_the_key_check(api: Api, project: Any) -> None:
    bad = request(project, "SELECT 1 AS n").replace(project.admin_key.encode(), b"flx_live_nope")
    reader, writer = await connect(api)
    try:
        for target in _TARGETS:
            for raw in (bad, request(project, "SELECT 1 AS n", extra={"Authorization": ""})):
                raw = raw.replace(f"POST {PATH} ".encode(), f"POST {target} ".encode(), 1)
                if reader.at_eof():
                    writer.close()
                    reader, writer = await connect(api)
                writer.write(raw)
                status, _, body = await read_answer(reader)
                assert status in (400, 401, 404, 405), (target, status, body[:200])
    finally:
        writer.close()


async def test_duplicate_authorization_cannot_mix_two_keys(api: Api, project: Any) -> None:
    """Two Authorization headers: the request runs as one of the two keys, never as neither
    check's key (a bogus first one and a valid last one, and the reverse)."""
    good = f"Bearer {project.admin_key}"
    for first, last in ((good, "Bearer flx_live_nope"), ("Bearer flx_live_nope", good)):
        raw = request(project, "SELECT current_user AS u").replace(
            f"Authorization: {good}\r\n".encode(),
            f"Authorization: {first}\r\nAuthorization: {last}\r\n".encode(),
        )
        reader, writer = await connect(api)
        try:
            writer.write(raw)
            status, _, body = await read_answer(reader)
        finally:
            writer.close()
        assert status in (200, 401)
        if status == 200:
            assert rows(body) == [{"u": role_name(project.id, "admin")}]
            assert last == good  # the key checked is the key used


async def test_expect_100_continue_goes_through_auth(api: Api, project: Any) -> None:
    bad = request(project, "SELECT 1 AS n", extra={"Expect": "100-continue"}).replace(
        project.admin_key.encode(), b"flx_live_nope"
    )
    reader, writer = await connect(api)
    try:
        writer.write(bad)
        await asyncio.sleep(0.5)
        answers = await _answers(reader, 2.0)
    finally:
        writer.close()
    assert [s for s, _ in answers if s != 100] == [401], answers


async def test_non_utf8_and_control_bytes_in_headers_are_harmless(api: Api, project: Any) -> None:
    raw = request(
        project, "SELECT 1 AS n", extra={"Origin": "https://\xe9x.example", "X-Request-Id": 'a"b\\c{}'}
    )
    raw = raw.replace("\xe9".encode(), b"\xe9\xff")
    reader, writer = await connect(api)
    try:
        writer.write(raw)
        status, headers, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 1}]
        assert headers["x-request-id"] == 'a"b\\c{}'  # printable ASCII is kept, and only that
        writer.write(request(project, "SELECT 1", extra={"X-Request-Id": "a\x01b"}))
        answers = await _answers(reader, 2.0)
        assert all(b"a\x01b" not in b for _, b in answers)
    finally:
        writer.close()


async def test_an_oversized_header_block_is_refused(api: Api, project: Any) -> None:
    raw = request(project, "SELECT 1 AS n")
    head, _, body = raw.partition(b"\r\n\r\n")
    reader, writer = await connect(api)
    refused = False
    try:
        writer.write(head + b"\r\n")
        filler = b"X-Filler: " + b"a" * 8000 + b"\r\n"
        for _ in range(1000):  # 8 MB of headers; a server with a limit answers 431/400 or closes
            writer.write(filler)
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except (ConnectionError, TimeoutError):
                refused = True
                break
            if reader.at_eof() or len(reader._buffer) > 0:  # type: ignore[attr-defined]
                refused = True
                break
        if not refused:
            writer.write(b"\r\n" + body)
            status, _, _ = await read_answer(reader)
            refused = status in (400, 431)
    except (ConnectionError, asyncio.IncompleteReadError):
        refused = True
    finally:
        writer.close()
    assert refused, "8 MB of request headers were accepted"


async def test_a_stalled_body_is_dropped(api: Api, project: Any) -> None:
    raw = request(project, "SELECT 1 AS n")
    reader, writer = await connect(api)
    try:
        writer.write(raw[:-5])  # all but the last 5 bytes of the body, then nothing
        await writer.drain()
        # The request deadline (15 s) or uvicorn's keep-alive timeout (5 s) would have closed it.
        try:
            data = await asyncio.wait_for(reader.read(), 8)
        except TimeoutError:
            data = None
    finally:
        writer.close()
    assert data is not None, "a request whose body stalled was still open after 8 s"


async def test_an_error_answer_leaks_no_trace_and_the_log_no_key(
    api: Api, project: Any, instance: Any
) -> None:
    reader, writer = await connect(api)
    try:
        for raw in (
            request(project, "", body=b'{"projectId": "' + b"\xff" * 20 + b'", "query": 1}'),
            request(
                project,
                "",
                body=json.dumps({"projectId": project.id, "query": "SELECT 1", "params": [{}]}).encode(),
            ),
            request(project, "", body=b"[" * 100_000),
            request(project, "SELECT 1", extra={"X-Request-Id": 'x", "level": "CRITICAL'}),
        ):
            writer.write(raw)
            _status, _, body = await read_answer(reader)
            assert b"Traceback" not in body and b'File "' not in body, body[:300]
    finally:
        writer.close()
    assert project.admin_key not in instance.server.log()


# -- 2. shared rate limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM fluxbase.rate_leases",
        "DELETE FROM fluxbase.rate_leases",
        "UPDATE fluxbase.rate_leases SET until = '{}', tokens = '{}'",
        "SELECT * FROM fluxbase.rate_lease('key:x', 1000000, 1, 1000000, 0, NULL, 0, 0)",
        "SELECT * FROM fluxbase.rate_lease('key:x', 1, 1, 1, 0, 0, 0, 2147483647)",
        "TRUNCATE fluxbase.rate_leases",
    ],
)
async def test_a_tenant_cannot_reach_the_rate_leases(api: Api, project: Any, statement: str) -> None:
    out = await sql(api, project.admin_key, project.id, statement)
    assert not out["success"], out
    assert "permission denied" in out["error"]["message"], out


async def _limiter_pool(stack: Any, instance: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(stack.database_url(instance.dbname), min_size=1, max_size=4)
    assert pool is not None
    return pool


@pytest.mark.parametrize("limit", [5, 400])
async def test_two_replicas_never_admit_more_than_the_limit_in_any_window(
    stack: Any, instance: Any, limit: int
) -> None:
    """Two limiters (two API processes) hammer one name for 2.5 windows of 1 s: no sliding
    window of 1 s holds more than `limit` admissions (times taken after each grant; 30 ms for
    the distance between the database's clock and ours)."""
    pools = [await _limiter_pool(stack, instance) for _ in range(2)]
    try:
        limiters = [SharedRateLimiter(p) for p in pools]
        name = f"review8:{limit}:{time.monotonic_ns()}"
        admitted: list[float] = []

        async def hammer(lim: SharedRateLimiter) -> None:
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                try:
                    await lim.hit(name, limit, 1)
                    admitted.append(time.monotonic())
                except Exception:
                    await asyncio.sleep(0)

        await asyncio.gather(*(hammer(lim) for lim in limiters for _ in range(4)))
        admitted.sort()
        worst = 0
        j = 0
        for i, t in enumerate(admitted):
            while admitted[j] <= t - (1 - 0.03):
                j += 1
            worst = max(worst, i - j + 1)
        assert admitted and worst <= limit, f"{worst} admissions within one window of limit {limit}"
        # Refusals are remembered: far fewer round trips than refused hits.
        assert sum(lim.round_trips for lim in limiters) < 200 + 3 * limit
    finally:
        for p in pools:
            await p.close()


async def test_a_flood_of_refused_requests_costs_no_round_trips(stack: Any, instance: Any) -> None:
    pool = await _limiter_pool(stack, instance)
    try:
        lim = SharedRateLimiter(pool)
        name = f"review8:flood:{time.monotonic_ns()}"
        for _ in range(3):
            await lim.hit(name, 3, 60)
        before = lim.round_trips
        refused = 0
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            try:
                await lim.hit(name, 3, 60)
            except Exception:
                refused += 1
        assert refused > 1000
        assert lim.round_trips - before <= 3, f"{lim.round_trips - before} round trips for {refused} refusals"
    finally:
        await pool.close()


# -- 3. the fluxbase_control doorbell ----------------------------------------------------------------


async def _rings(stack: Any, instance: Any, api: Api, project: Any, statements: list[str]) -> list[str]:
    """The payloads `fluxbase_control` carried while the tenant ran `statements`."""
    conn = await asyncpg.connect(stack.database_url(instance.dbname))
    got: list[str] = []
    try:
        await conn.add_listener("fluxbase_control", lambda *a: got.append(a[3]))
        for q in statements:
            await sql(api, project.admin_key, project.id, q)
        await asyncio.sleep(0.5)
    finally:
        await conn.close()
    return [p for p in got if p.startswith("review8")]


async def test_a_tenants_forged_rings_do_not_ring_the_control_doorbell(
    stack: Any, instance: Any, api: Api, project: Any
) -> None:
    """NOTIFY cannot be restricted in PostgreSQL and `fluxbase_control` lives in the tenants'
    database: any key reaches the channel (one statement delivered 20 000 notifications). Before
    sql/0040 each one dropped every API's key cache and re-checked every realtime subscriber; now a
    listener acts only when the platform-written epoch moved."""
    bell = ControlBell(stack.database_url(instance.dbname), "review8-bell")
    stop = asyncio.Event()
    task = asyncio.create_task(bell.run(stop))
    try:
        await asyncio.wait_for(bell.listening.wait(), 30)
        await asyncio.sleep(0.2)
        before = bell.rings
        got = await _rings(
            stack,
            instance,
            api,
            project,
            [
                "NOTIFY fluxbase_control, 'review8-a'",
                "SELECT pg_notify('fluxbase_control', 'review8-b')",
                "SELECT count(pg_notify('fluxbase_control', 'review8-' || g))"
                " FROM generate_series(1, 20000) g",
            ],
        )
        assert len(got) > 20000  # the notifications do reach the channel ...
        await asyncio.sleep(0.5)
        assert bell.rings == before, (
            f"the tenant rang the doorbell {bell.rings - before} times"
        )  # ... but ring nothing
        # A real ring still rings: a platform change of api_keys bumps the epoch.
        conn = await asyncpg.connect(stack.database_url(instance.dbname))
        try:
            await conn.execute("UPDATE fluxbase.api_keys SET revoked_at = revoked_at WHERE false")
        finally:
            await conn.close()
        for _ in range(50):
            if bell.rings > before:
                break
            await asyncio.sleep(0.1)
        assert bell.rings == before + 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_tenant_cannot_listen_on_the_control_doorbell(api: Api, project: Any) -> None:
    for q in ("LISTEN fluxbase_control", 'LISTEN "fluxbase_control"', "UNLISTEN *"):
        out = await sql(api, project.admin_key, project.id, q)
        assert not out["success"], (q, out)
    # Through a function, LISTEN reaches the pooled session, whose notifications go to the API's
    # connection (which drops them), never back to the tenant; the pool's idle reset UNLISTENs
    # (LISTEN/UNLISTEN take effect at commit, so it is gone once a reset committed).
    fn = """CREATE FUNCTION sneaky() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE 'LISTEN fluxbase_control';
    RETURN array_to_string(ARRAY(SELECT pg_listening_channels()), ',');
END $f$"""
    out = await sql(api, project.admin_key, project.id, fn)
    assert out["success"], out
    out = await sql(api, project.admin_key, project.id, "SELECT sneaky() AS c")
    assert out["success"] and "fluxbase_control" not in json.dumps(out["result"]["rows"]), out
    await asyncio.sleep(0.6)  # the idle reset (0.2 s) has run and committed
    leftover = await sql(
        api, project.admin_key, project.id, "SELECT count(*) AS n FROM pg_listening_channels()"
    )
    assert leftover["success"] and leftover["result"]["rows"] == [{"n": 0}], leftover
