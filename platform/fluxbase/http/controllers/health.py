"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec

from fluxbase.http.context import AppContext


class Live(msgspec.Struct):
    status: str


class Checks(msgspec.Struct):
    postgres: str
    s3: str


class Readiness(msgspec.Struct):
    status: str
    checks: Checks


@get("/live", operation_id="live", tags=["health"])
async def live() -> Live:
    return Live("ok")


@get(
    "/ready",
    operation_id="ready",
    tags=["health"],
    responses={503: ResponseSpec(Readiness, description="PostgreSQL or S3 is down")},
)
async def ready(ctx: AppContext) -> Response[Readiness]:
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
    body = Readiness(
        "ok" if pg_ok and s3_ok else "unavailable",
        Checks("ok" if pg_ok else "down", "ok" if s3_ok else "down"),
    )
    return Response(body, status_code=200 if pg_ok and s3_ok else 503)
