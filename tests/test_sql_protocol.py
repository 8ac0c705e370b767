"""`POST /api/execute-sql` as `fluxbase api` serves it (fluxbase.http.protocol: answered inside
uvicorn's HTTP/1.1 protocol, not through ASGI): the HTTP/1.1 behaviours it takes over, on raw
sockets — keep-alive, pipelining order, `Connection: close`, the body limit, chunked bodies (left
to ASGI), HTTP/1.0, CORS, request ids and the request metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

from fluxbase import metrics
from support import Api

PATH = "/api/execute-sql"


def request(
    project,
    query: str,
    *,
    extra: dict[str, str] | None = None,
    version: str = "1.1",
    body: bytes | None = None,
) -> bytes:
    payload = body if body is not None else json.dumps({"projectId": project.id, "query": query}).encode()
    headers = {
        "Host": "127.0.0.1",
        "Authorization": f"Bearer {project.admin_key}",
        "Content-Type": "application/json",
        "Content-Length": str(len(payload)),
        **(extra or {}),
    }
    head = f"POST {PATH} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + payload


async def connect(api: Api) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(api.base_url)
    assert url.hostname in ("127.0.0.1", "localhost")
    return await asyncio.open_connection(url.hostname, url.port)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return status, headers, body
    return status, headers, await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)


def rows(body: bytes) -> list[dict[str, object]]:
    doc = json.loads(body)
    assert doc["success"] is True, doc
    return list(doc["result"]["rows"])


async def test_keep_alive_answers_several_requests_on_one_connection(api: Api, project) -> None:
    reader, writer = await connect(api)
    try:
        for n in range(3):
            writer.write(request(project, f"SELECT {n} AS n"))
            status, headers, body = await read_answer(reader)
            assert status == 200 and rows(body) == [{"n": n}]
            assert headers["content-type"] == "application/json"
            assert "connection" not in headers and "date" in headers
            assert re.fullmatch(r"req_[0-9a-f]{12}", headers["x-request-id"])
            assert int(headers["x-ratelimit-limit"]) == 1_000_000
    finally:
        writer.close()


async def test_keep_alive_timeout_counts_from_the_last_answer(api: Api, project) -> None:
    """uvicorn's keep-alive timeout (5 s), kept by one timer per connection: a connection used
    again within it stays open however long it lives, and one left idle closes about 5 s after
    its last answer, not before."""
    reader, writer = await connect(api)
    try:
        for n in range(3):  # 6 s in all, each request 3 s after the answer before it
            if n:
                await asyncio.sleep(3)
            writer.write(request(project, f"SELECT {n} AS n"))
            status, _, body = await read_answer(reader)
            assert status == 200 and rows(body) == [{"n": n}]
        answered = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 15) == b""  # the server closed it
        assert 4.5 <= time.monotonic() - answered <= 8.0
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(api: Api, project) -> None:
    """The first is the slowest: each answer still comes in the order the requests were sent,
    and a pipelined request to another route (ASGI) keeps its place between them."""
    reader, writer = await connect(api)
    try:
        writer.write(
            request(project, "SELECT 1 AS n FROM pg_sleep(0.3)")
            + request(project, "SELECT 2 AS n")
            + b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            + request(project, "SELECT 3 AS n")
        )
        assert rows((await read_answer(reader))[2]) == [{"n": 1}]
        assert rows((await read_answer(reader))[2]) == [{"n": 2}]
        status, _, _ = await read_answer(reader)
        assert status == 200
        assert rows((await read_answer(reader))[2]) == [{"n": 3}]
    finally:
        writer.close()


async def test_connection_close_and_http_1_0_close_after_the_answer(api: Api, project) -> None:
    for raw in (
        request(project, "SELECT 5 AS n", extra={"Connection": "close"}),
        request(project, "SELECT 5 AS n", version="1.0"),
    ):
        reader, writer = await connect(api)
        try:
            writer.write(raw)
            status, headers, body = await read_answer(reader)
            assert status == 200 and rows(body) == [{"n": 5}]
            assert headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
        finally:
            writer.close()


async def test_a_body_over_the_limit_is_refused_at_once_and_the_connection_closed(api: Api, project) -> None:
    reader, writer = await connect(api)
    try:
        size = 10_000_001 + 1_000_000
        head = request(project, "", extra={"Origin": "https://app.example"}, body=b"")
        head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % size)
        writer.write(head + b"x" * 10_000_500)  # past the limit, but not the whole body
        status, headers, body = await read_answer(reader)
        assert status == 413 and json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
        assert headers["connection"] == "close"
        assert headers["access-control-allow-origin"] == "*"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_a_chunked_body_is_answered_as_well(api: Api, project) -> None:
    payload = json.dumps({"projectId": project.id, "query": "SELECT 7 AS n"}).encode()
    half = len(payload) // 2
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half,
        payload[:half],
        len(payload) - half,
        payload[half:],
    )
    raw = (
        request(project, "", body=b"").replace(b"Content-Length: 0", b"Transfer-Encoding: chunked") + chunked
    )
    reader, writer = await connect(api)
    try:
        writer.write(raw)
        status, _, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 7}]
        writer.write(request(project, "SELECT 8 AS n"))  # and the connection goes on
        assert rows((await read_answer(reader))[2]) == [{"n": 8}]
    finally:
        writer.close()


async def test_a_body_in_pieces_is_read_whole(api: Api, project) -> None:
    raw = request(project, "SELECT 9 AS n")
    reader, writer = await connect(api)
    try:
        for i in range(0, len(raw), 40):
            writer.write(raw[i : i + 40])
            await writer.drain()
            await asyncio.sleep(0.02)
        status, _, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 9}]
    finally:
        writer.close()


async def test_cors_request_id_and_errors_on_the_protocol_path(api: Api, project) -> None:
    reader, writer = await connect(api)
    try:
        writer.write(
            request(project, "SELECT 1", extra={"Origin": "https://app.example", "X-Request-Id": "abc-42"})
        )
        status, headers, _ = await read_answer(reader)
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        assert headers["x-request-id"] == "abc-42"
        writer.write(request(project, "SELECT 1", extra={"X-Request-Id": "x" * 129}))
        _, headers, _ = await read_answer(reader)
        assert "access-control-allow-origin" not in headers
        assert re.fullmatch(r"req_[0-9a-f]{12}", headers["x-request-id"])
        writer.write(request(project, "", body=b"{not json"))
        status, _, body = await read_answer(reader)
        assert status == 400 and json.loads(body)["error"]["code"] == "VALIDATION_ERROR"
        bad = request(project, "SELECT 1").replace(project.admin_key.encode(), b"flx_live_nope")
        writer.write(bad)
        status, _, body = await read_answer(reader)
        assert status == 401 and json.loads(body)["error"]["code"] == "AUTH_REQUIRED"
        writer.write(request(project, "SELECT 1 FROM no_such_table"))
        status, _, body = await read_answer(reader)
        assert status == 200 and json.loads(body)["error"]["code"] == "SQL_EXEC_ERROR"
    finally:
        writer.close()


async def test_requests_on_the_protocol_path_are_counted(api: Api, project) -> None:
    def count(text: str, status: str) -> float:
        want = f'fluxbase_http_requests_total{{method="POST",route="{PATH}",status="{status}"}} '
        return sum(float(line[len(want) :]) for line in text.splitlines() if line.startswith(want))

    before = (await api.http.get("/metrics")).text
    reader, writer = await connect(api)
    try:
        for _ in range(3):
            writer.write(request(project, "SELECT 1"))
            await read_answer(reader)
        writer.write(request(project, "", body=b"[]"))
        await read_answer(reader)
    finally:
        writer.close()
    after = (await api.http.get("/metrics")).text
    assert count(after, "200") - count(before, "200") == 3
    assert count(after, "400") - count(before, "400") == 1


async def test_header_names_in_any_case_and_trailing_whitespace(api: Api, project) -> None:
    """The protocol lower-cases names and strips values' trailing whitespace once per header
    block (uvicorn did it per header): a key sent as `AUTHORIZATION: Bearer <key>  `, an origin
    and a request id in other cases are read as before; a request with an `Expect` header goes
    to ASGI (100-continue answered first) and gets the same answer; the next request on the
    connection takes the protocol path again."""
    reader, writer = await connect(api)
    try:
        payload = json.dumps({"projectId": project.id, "query": "SELECT 5 AS n"}).encode()
        head = (
            f"POST {PATH} HTTP/1.1\r\nhOsT: 127.0.0.1\r\nAUTHORIZATION: Bearer {project.admin_key} \t \r\n"
            "Content-TYPE: application/json\r\nORIGIN: https://app.example \r\n"
            "X-Request-ID: req_casecheck01\r\n"
            f"CONTENT-LENGTH: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status, headers, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 5}], body
        assert headers["access-control-allow-origin"] == "*"
        assert headers["x-request-id"] == "req_casecheck01"
        writer.write(request(project, "SELECT 6 AS n", extra={"Expect": "100-continue"}))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 "), interim  # uvicorn's, through ASGI
        status, _, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 6}], body
        writer.write(request(project, "SELECT 7 AS n", extra={"EXPECT": "something-else"}))
        status, _, body = await read_answer(reader)
        assert status == 417 or (status == 200 and rows(body) == [{"n": 7}]), (status, body)
        writer.write(request(project, "SELECT 8 AS n"))
        status, _, body = await read_answer(reader)
        assert status == 200 and rows(body) == [{"n": 8}], body
    finally:
        writer.close()


async def test_a_sibling_reads_the_protocol_paths_requests_within_a_second(spawn, tmp_path) -> None:
    """The protocol path tallies its request metrics (`http.protocol._Tally`) and adds them up
    before each scrape *and once a second*: with shared metrics (several workers), a sibling
    answering a scrape reads this process's file, which must show every request without this
    process being scraped itself."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    async with spawn(FLUXBASE_API_METRICS_DIR=str(shared)) as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)

            def served() -> float:
                return sum(
                    v
                    for path in shared.glob("*" + metrics.SharedStore.SUFFIX)
                    for name, labels, _, v in metrics.SharedStore.read(path)
                    if name == "fluxbase_http_requests_total" and labels[1] == PATH
                )

            # Three batches, each seen within 2 s: the flush of every second does it; the
            # 5-second refresh of collected gauges (`Registry.refresh_forever`, started by the
            # first ASGI request) alone would miss at least one of them almost every time.
            reader, writer = await connect(api)
            try:
                for _ in range(3):
                    before = served()
                    for _ in range(5):
                        writer.write(
                            request(SimpleNamespace(id=pid, admin_key=key), "SELECT 1")  # type: ignore[arg-type]
                        )
                        status, _, _ = await read_answer(reader)
                        assert status == 200
                    deadline = time.monotonic() + 2.0
                    while served() < before + 5 and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    assert served() == before + 5
            finally:
                writer.close()
        finally:
            await api.close()
