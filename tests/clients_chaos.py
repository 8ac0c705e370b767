"""Chaos harness shared by the client tests: a realtime service that can be SIGKILLed and
restarted on the same port, a TCP proxy in front of it that can cut every connection, and
writers that commit 1 000 rows meanwhile.

Each row's value is `writer * 10_000 + n`; a writer commits its rows one after another, so its
values must arrive in increasing order, and every committed value exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from fluxbase.devstack.procs import free_port
from support import ServerProcess, run_service

ROWS = 1000
WRITERS = 4


class Proxy:
    """Forwards 127.0.0.1:<port> to the realtime service; `cut()` aborts every connection."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.cuts = 0

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()  # the service is down: the client sees a failed connect
            return
        self.links |= {writer, up_w}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.links -= {writer, up_w}

    def cut(self) -> None:
        self.cuts += 1
        for w in list(self.links):
            w.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Chaos:
    proxy: Proxy
    url: str
    kills: int = 0
    committed: list[int] = field(default_factory=list)


@contextlib.contextmanager
def _service(env: dict[str, str], port: int, log_dir: Path) -> Iterator[ServerProcess]:
    with run_service(["realtime"], env, port, log_dir) as proc:
        yield proc


@contextlib.asynccontextmanager
async def realtime_behind_proxy(
    instance: Any, log_dir: Path
) -> AsyncIterator[tuple[Chaos, Callable[[], Any]]]:
    """A realtime service behind a proxy; yields (chaos, kill_and_restart)."""
    port = free_port()
    env = dict(instance.env, FLUXBASE_REALTIME_PORT=str(port))
    stack = contextlib.ExitStack()
    proc = stack.enter_context(_service(env, port, log_dir))
    proxy = await Proxy(port).start()
    chaos = Chaos(proxy, f"ws://127.0.0.1:{proxy.port}")

    async def kill_and_restart() -> None:
        nonlocal proc, stack
        proc.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.proc.wait, 10)
        chaos.kills += 1
        stack.close()
        stack = contextlib.ExitStack()
        proc = await asyncio.to_thread(stack.enter_context, _service(env, port, log_dir))

    try:
        yield chaos, kill_and_restart
    finally:
        await proxy.close()
        stack.close()


async def write_rows_with_chaos(
    pool: asyncpg.Pool, project_id: str, chaos: Chaos, kill_and_restart: Callable[[], Any]
) -> None:
    """Commit ROWS rows from WRITERS writers while cutting connections and killing the service."""
    per = ROWS // WRITERS
    done = 0

    async def writer(w: int) -> None:
        nonlocal done
        async with pool.acquire() as conn:
            for n in range(per):
                v = w * 10_000 + n
                await conn.execute(f"INSERT INTO p_{project_id}.items (v) VALUES ($1)", v)
                chaos.committed.append(v)
                done += 1
                await asyncio.sleep(0.02)

    async def monkey() -> None:
        plan = [(0.15, "cut"), (0.35, "kill"), (0.6, "cut"), (0.8, "cut")]
        for share, action in plan:
            while done < share * ROWS:
                await asyncio.sleep(0.01)
            if action == "cut":
                chaos.proxy.cut()
            else:
                await kill_and_restart()

    started = time.monotonic()
    await asyncio.gather(*(writer(w) for w in range(WRITERS)), monkey())
    assert len(chaos.committed) == ROWS, (len(chaos.committed), time.monotonic() - started)


def check_exactly_once_in_order(received: list[tuple[int, str]], committed: list[int]) -> None:
    values = [v for v, _ in received]
    dupes = len(values) - len(set(values))
    assert dupes == 0, f"{dupes} duplicate events"
    missing = set(committed) - set(values)
    assert not missing, f"{len(missing)} of {len(committed)} events lost: {sorted(missing)[:10]}"
    assert len(values) == len(committed)
    keys = [tuple(map(int, c.split(":"))) for _, c in received]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "events out of cursor order"
    for w in range(WRITERS):
        mine = [v for v in values if v // 10_000 == w]
        assert mine == sorted(mine), f"writer {w}'s rows arrived out of commit order"
