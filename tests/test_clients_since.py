"""The `since` resume contract through the real WebSocket: a cursor, never a bare number.

Every event carries an `id` and a `cursor`. A client that resumed with the event's `id` (the
natural choice) used to be read as "after transaction <id>", a different position: it was given
events it had already seen. A bare number is now refused with VALIDATION_ERROR and no
subscription; the cursor resumes exactly after the event.
"""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import connect

from support import Api
from test_realtime import _table, rt, subscribe  # noqa: F401 - rt is a fixture


async def test_since_refuses_a_bare_event_id_and_resumes_from_a_cursor(api: Api, project, rt) -> None:  # noqa: F811
    await _table(api, project)
    async with subscribe(rt, project.id, project.admin_key) as sub:
        for v in ("one", "two"):
            await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ($1)", [v])
        one, two = await sub.rows(2)
    await api.sql(project.admin_key, project.id, "INSERT INTO items (v) VALUES ('three')")
    for since in (one["id"], str(one["id"]), two["id"], " 12 ", -1, 1.5, True, "1:2:3", "abc:1"):
        async with connect(f"{rt}/?token={project.admin_key}") as ws:
            await ws.send(
                json.dumps({"type": "subscribe", "roomId": f"project_{project.id}", "since": since})
            )
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert msg["type"] == "error", (since, msg)
            assert msg["error"]["code"] == "VALIDATION_ERROR" and "cursor" in msg["error"]["message"]
            assert msg["roomId"] == f"project_{project.id}"
            # Nothing of the room follows: the subscribe was refused as a whole.
            await api.sql(project.admin_key, project.id, "SELECT 1")
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "pong"}
    # The cursor of `one` resumes exactly after it: `two`, then `three`, nothing repeated.
    async with subscribe(rt, project.id, project.admin_key, since=one["cursor"]) as sub:
        got = await sub.rows(2)
        assert [m["payload"]["record"]["v"] for m in got] == ["two", "three"]
        assert [m for m in await sub.silent(0.5) if m["type"] == "db_event"] == []
