"""A small HTTP/1.1 client for the benchmarks (issue 19, as issue 20 asks for the load clients):
keep-alive connections over raw asyncio streams, JSON bodies, nothing else. On 2 shared cores the
benchmark's own client competes with the server for CPU; httpx costs ~1.7-2.1 ms of CPU per
request there (docs/scaling.md), this a fraction of it. Benchmarks keep httpx as a cross-check
(`--http-client httpx`) and print which client ran and its CPU share (`CpuShare`).

`Client` answers the subset of httpx.AsyncClient the benchmarks use: `post`/`get` with `json=` and
`headers=`, responses with `status_code`, `text` and `json()`, and `aclose()`.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import os
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

IDLE_S = 2.0  # a connection idle this long is not reused (uvicorn closes idle ones after 5 s)


class Response:
    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class _Conn:
    __slots__ = ("reader", "used", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.used = reader, writer, time.monotonic()


class Client:
    """Keep-alive HTTP/1.1 to one base URL: one connection per request in flight, reused."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        u = urlsplit(base_url)
        assert u.scheme == "http" and u.hostname is not None
        self.host, self.port = u.hostname, u.port or 80
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._host_header = f"Host: {u.netloc}\r\n".encode()

    async def _conn(self) -> _Conn:
        now = time.monotonic()
        while self._idle:
            c = self._idle.pop()
            if now - c.used < IDLE_S and not c.reader.at_eof():
                return c
            c.writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Conn(reader, writer)

    async def request(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        body = b"" if json is None else jsonlib.dumps(json).encode()
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        if json is not None:
            head.append(b"Content-Type: application/json\r\n")
        head.append(f"Content-Length: {len(body)}\r\n".encode())
        for k, v in (headers or {}).items():
            head.append(f"{k}: {v}\r\n".encode())
        head.append(b"\r\n")
        data = b"".join(head) + body
        c = await self._conn()
        try:
            async with asyncio.timeout(self.timeout):
                c.writer.write(data)
                status_line = await c.reader.readuntil(b"\r\n\r\n")
                lines = status_line.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                length, close = 0, False
                for ln in lines[1:]:
                    name, _, value = ln.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                    elif name == b"transfer-encoding":
                        raise RuntimeError("chunked responses are not supported by rawhttp")
                content = await c.reader.readexactly(length)
        except BaseException:
            c.writer.close()
            raise
        if close:
            c.writer.close()
        else:
            c.used = time.monotonic()
            self._idle.append(c)
        return Response(status, content)

    async def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Response:
        return await self.request("POST", path, json, headers)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return await self.request("GET", path, None, headers)

    async def aclose(self) -> None:
        for c in self._idle:
            c.writer.close()
        self._idle.clear()


def client(kind: str, base_url: str) -> Any:
    """`raw` (this module) or `httpx`, for `--http-client`."""
    if kind == "httpx":
        # Idle keep-alive connections are dropped before uvicorn's 5 s would close them under a
        # request (a ReadError that is the client's, not the server's).
        return httpx.AsyncClient(base_url=base_url, timeout=60, limits=httpx.Limits(keepalive_expiry=IDLE_S))
    if kind == "raw":
        return Client(base_url)
    raise SystemExit(f"unknown --http-client {kind!r}")


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle and iowait
    v = [int(x) for x in fields[:8]]
    return sum(v) - v[3] - v[4]


class CpuShare:
    """This process's CPU (the benchmark client) over a phase, per request and as a share of the
    whole machine's busy CPU in that phase (/proc/stat)."""

    def __init__(self) -> None:
        self._cpu = time.process_time()
        self._busy = _busy_jiffies()

    def report(self, requests: int) -> str:
        cpu = time.process_time() - self._cpu
        busy = (_busy_jiffies() - self._busy) / os.sysconf("SC_CLK_TCK")
        share = 100 * cpu / busy if busy > 0 else float("nan")
        return (
            f"client CPU {cpu * 1000 / max(requests, 1):.2f} ms per request, "
            f"{share:.0f}% of the machine's busy CPU in this phase"
        )
