"""WebSocket server (the `websockets` library) with /live and /ready HTTP probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from http import HTTPStatus

import asyncpg
from websockets.asyncio.server import Request, Response, ServerConnection, serve as ws_serve

from fluxbase.config import Settings
from fluxbase.storage.s3 import ObjectStore

log = logging.getLogger("fluxbase.realtime")


class RealtimeService:
    """Holds the process-wide resources of the realtime service."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.db: asyncpg.Pool | None = None
        self.store = ObjectStore(settings.s3)

    async def start(self) -> None:
        self.db = await asyncpg.create_pool(self.settings.database.url, min_size=0, max_size=4)
        await self.store.start()

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
        await self.store.close()

    async def ready(self) -> dict[str, str]:
        async def pg() -> bool:
            try:
                assert self.db is not None
                return await asyncio.wait_for(self.db.fetchval("SELECT 1"), 2) == 1
            except Exception:
                return False

        async def s3() -> bool:
            try:
                return await asyncio.wait_for(self.store.ping(), 3)
            except Exception:
                return False

        pg_ok, s3_ok = await asyncio.gather(pg(), s3())
        return {"postgres": "ok" if pg_ok else "down", "s3": "ok" if s3_ok else "down"}

    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/live":
            return _json(connection, HTTPStatus.OK, {"status": "ok"})
        if path == "/ready":
            checks = await self.ready()
            ok = all(v == "ok" for v in checks.values())
            return _json(connection, HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                         {"status": "ok" if ok else "unavailable", "checks": checks})
        return None

    async def handler(self, ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "error", "error": {"code": "NOT_IMPLEMENTED",
                                                             "message": "Realtime events are not available yet."}}))
        await ws.close()


def _json(connection: ServerConnection, status: HTTPStatus, body: dict[str, object]) -> Response:
    response = connection.respond(status, json.dumps(body))
    response.headers["Content-Type"] = "application/json"
    return response


async def serve(settings: Settings, host: str, port: int) -> None:
    service = RealtimeService(settings)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with ws_serve(service.handler, host, port, process_request=service.process_request,
                            ping_interval=20, ping_timeout=20, max_size=1 << 20):
            log.info("realtime listening on ws://%s:%s", host, port)
            await stop.wait()
    finally:
        await service.close()
