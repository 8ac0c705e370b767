"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Response, get

from fluxbase.http.context import AppContext


@get("/live", operation_id="live", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", operation_id="ready", tags=["health"])
async def ready(ctx: AppContext) -> Response[dict[str, Any]]:
    async def pg() -> bool:
        try:
            return await asyncio.wait_for(ctx.db.fetchval("SELECT 1"), 2) == 1
        except Exception:
            return False

    async def s3() -> bool:
        try:
            return await asyncio.wait_for(ctx.store.ping(), 3)
        except Exception:
            return False

    pg_ok, s3_ok = await asyncio.gather(pg(), s3())
    body = {
        "status": "ok" if pg_ok and s3_ok else "unavailable",
        "checks": {"postgres": "ok" if pg_ok else "down", "s3": "ok" if s3_ok else "down"},
    }
    return Response(body, status_code=200 if pg_ok and s3_ok else 503)
