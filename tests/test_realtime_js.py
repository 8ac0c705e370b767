"""The reference doc's `realtime.js`, unchanged, under Node against a real realtime service.

Node 20 ships the browser `WebSocket` behind `--experimental-websocket` (on by default from
Node 22); the snippet itself is not touched. Like the doc's other snippets, only its
placeholders are filled in: the project id, and the URL (with the credential as `?token=`) in
the environment variable the snippet reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import pytest

from support import ROOT, Api
from test_realtime import _realtime

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
NODE_MAJOR = (
    int(subprocess.run(["node", "--version"], capture_output=True, text=True).stdout[1:].split(".")[0])
    if shutil.which("node")
    else 0
)


async def test_reference_realtime_js_runs_unchanged(api: Api, project, instance, log_dir, tmp_path) -> None:
    snippet = (ROOT / "tests" / "js" / "realtime.js").read_text()
    script = tmp_path / "realtime.mjs"
    script.write_text(snippet.replace("'YOUR_PROJECT_ID'", json.dumps(project.id)))
    flags = ["--experimental-websocket"] if NODE_MAJOR < 22 else []
    with _realtime(instance, log_dir) as url:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "NEXT_PUBLIC_WS_URL": f"{url}/?token={project.admin_key}",
        }
        node = await asyncio.create_subprocess_exec(
            "node", *flags, str(script), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert node.stdout is not None
        lines: list[str] = []

        async def until(text: str) -> None:
            while not any(text in line for line in lines):
                try:
                    line = (await asyncio.wait_for(node.stdout.readline(), 15)).decode()
                except TimeoutError:
                    raise AssertionError(f"{text!r} not seen in {lines}") from None
                assert line, f"node exited: {lines}"
                lines.append(line)

        try:
            await until("[WS] Subscription confirmed.")
            for q in (
                "CREATE TABLE items (id serial PRIMARY KEY, v text)",
                "INSERT INTO items (v) VALUES ('a')",
                "UPDATE items SET v = 'b'",
                "DELETE FROM items",
            ):
                assert (await api.sql(project.admin_key, project.id, q)).json()["success"]
            await until("[WS] Schema changed — refresh your table list.")
            await until("-  items")
            out = "".join(lines)
            assert (
                out.index("Schema changed")
                < out.index("+  items")
                < out.index("~  items")
                < out.index("-  items")
            )
            ins, upd, dele = (
                next(x for x in lines if x.startswith(p)) for p in ("+  items", "~  items", "-  items")
            )
            # jsonb orders keys its own way (shorter first); the values are what count.
            assert "id: 1" in ins and "v: 'a'" in ins
            assert "old: { v: 'a', id: 1 }" in upd and "record: { v: 'b', id: 1 }" in upd
            assert "id: 1" in dele and "v: 'b'" in dele
            assert "Error" not in out and "Disconnected" not in out
        finally:
            node.terminate()
            await node.wait()
