"""The floor for Python HTTP over asyncpg: a bare ASGI app, no auth, no transaction, no reset.

`bench/sql_throughput.py --minimal` serves it under each API variant's server (uvicorn or granian,
with that variant's workers) so the API's figures can be read against what any Python HTTP service
pays per request on the same server.
It answers POST / with the row of `QUERY` for the `params` in the JSON body, JSON-encoded.
Configured by MINIMAL_DSN (search_path of the project schema set in the DSN).
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg
import msgspec

QUERY = "SELECT id, name, email FROM bench_users WHERE id = $1"

_pool: asyncpg.Pool | None = None
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _pool
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _pool = await asyncpg.create_pool(os.environ["MINIMAL_DSN"], min_size=1, max_size=16)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _pool is not None:
                    await _pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    assert _pool is not None
    row = await _pool.fetchrow(QUERY, *_decode(body)["params"])
    content = _encode({"rows": [dict(row.items())] if row else []})
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})
