"""The JavaScript client (clients/js) against the real stack: its own `node --test` suite, a
chaos run, and a page in a real Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from clients_chaos import ROWS, check_exactly_once_in_order, realtime_behind_proxy, write_rows_with_chaos
from support import ROOT, Api
from test_realtime import rt  # noqa: F401 - fixture
from test_webhooks import Proj, Receiver, create_hook, proj, receiver, wapi, wh  # noqa: F401 - fixtures

JS = ROOT / "clients" / "js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js (>= 20) is not installed")


def _node_flags() -> list[str]:
    out = subprocess.run([NODE or "node", "--version"], capture_output=True, text=True).stdout
    return ["--experimental-websocket"] if int(out[1:].split(".")[0]) < 22 else []


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NODE_NO_WARNINGS": "1", **extra}


async def _suite_env(api: Api, project: Any, rt_url: str, w: Api, p: Proj, rx: Receiver) -> dict[str, str]:
    # A real delivery from `fluxbase worker` for the webhook test.
    hook = await create_hook(w, p, rx.url)
    seen = len(rx.bodies())
    r = await w.sql(p.key, p.id, "INSERT INTO orders (customer_id, amount) VALUES (7, 59.99)")
    assert r.json()["success"]
    await rx.wait(lambda: len(rx.bodies()) > seen)
    delivery = [x for x in rx.requests if x["path"] == "/hook"][-1]
    key = await api.new_key(project.owner_token, project.id, "admin", rateLimitRequests=1_000_000)
    user_key = await api.new_key(project.owner_token, project.id, "readwrite", requireUserAuth=True)
    return _env(
        FLUXBASE_URL=api.base_url,
        FLUXBASE_PROJECT_ID=project.id,
        FLUXBASE_API_KEY=key,
        FLUXBASE_USER_KEY=user_key,
        FLUXBASE_REALTIME_URL=rt_url,
        FLUXBASE_WEBHOOK_BODY=base64.b64encode(delivery["body"]).decode(),
        FLUXBASE_WEBHOOK_HEADERS=json.dumps(delivery["headers"]),
        FLUXBASE_WEBHOOK_SECRET=hook["secret"],
    )


async def test_node_suite_against_the_real_stack(
    api: Api,
    project,
    rt,  # noqa: F811
    wapi: Api,  # noqa: F811
    proj: Proj,  # noqa: F811
    receiver: Receiver,  # noqa: F811
) -> None:
    env = await _suite_env(api, project, rt, wapi, proj, receiver)
    proc = await asyncio.create_subprocess_exec(
        NODE or "node",
        *_node_flags(),
        "--test",
        "--test-reporter=tap",
        str(JS / "test"),
        env=env,
        cwd=JS,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 100))[0].decode()
    assert proc.returncode == 0, out[-6000:]
    assert "# fail 0" in out and "# skipped 0" in out and "# todo 0" in out, out[-3000:]
    passed = int(out.split("# pass ")[1].split()[0])
    assert passed >= 7, out[-3000:]


# Deno comes from npm (the `deno` package ships the binary for this platform), pinned, installed
# once into the virtualenv; FLUXBASE_DENO points at another one.
DENO_VERSION = "2.9.6"


def _deno() -> str | None:
    if os.environ.get("FLUXBASE_DENO"):
        return os.environ["FLUXBASE_DENO"]
    home = ROOT / ".venv" / "deno"
    binary = home / "node_modules" / ".bin" / "deno"
    if not binary.exists():
        npm = shutil.which("npm")
        if npm is None:
            return None
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(home), "--no-audit", "--no-fund", f"deno@{DENO_VERSION}"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return str(binary)


async def test_deno_runs_the_same_suite(
    api: Api,
    rt,  # noqa: F811
    wapi: Api,  # noqa: F811
    proj: Proj,  # noqa: F811
    receiver: Receiver,  # noqa: F811
) -> None:
    """Deno (the runtime of Deno Deploy and Supabase-style edge functions) runs the client's own
    suite unchanged, through its native fetch and WebSocket, in a project of its own."""
    deno = await asyncio.to_thread(_deno)
    if deno is None:
        pytest.skip("npm is not installed, so Deno cannot be fetched (set FLUXBASE_DENO to a deno binary)")
    _, owner = await api.new_user()
    pid = await api.new_project(owner)
    project = type("P", (), {"id": pid, "owner_token": owner})()
    env = await _suite_env(api, project, rt, wapi, proj, receiver)
    env.update(DENO_DIR=str(ROOT / ".venv" / "deno" / "cache"), NO_COLOR="1", DENO_NO_UPDATE_CHECK="1")
    proc = await asyncio.create_subprocess_exec(
        deno,
        "test",
        "--allow-net=127.0.0.1",
        "--allow-env",
        "--allow-read",
        "test/client.test.mjs",
        env=env,
        cwd=JS,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 150))[0].decode()
    assert proc.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if " passed | " in line][-1]
    assert summary.startswith("ok | ") and "| 0 failed" in summary, out[-3000:]
    assert int(summary.split("ok | ")[1].split()[0]) >= 7, summary


async def test_js_client_gets_every_event_once_through_cuts_and_a_kill(
    api: Api, project, instance, log_dir, control_db
) -> None:
    key = await api.new_key(project.owner_token, project.id, "admin", rateLimitRequests=1_000_000)
    r = await api.sql(key, project.id, "CREATE TABLE items (id serial PRIMARY KEY, v int)")
    assert r.json()["success"]
    async with realtime_behind_proxy(instance, log_dir) as (chaos, kill_and_restart):
        env = _env(
            FLUXBASE_URL=api.base_url,
            FLUXBASE_PROJECT_ID=project.id,
            FLUXBASE_API_KEY=key,
            FLUXBASE_REALTIME_URL=chaos.url,
        )
        node = await asyncio.create_subprocess_exec(
            NODE or "node",
            *_node_flags(),
            str(JS / "tools" / "chaos-subscriber.mjs"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert node.stdout is not None
        received: list[tuple[int, str]] = []
        lines: list[dict[str, Any]] = []

        async def read_until(pred, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not pred():
                assert node.stdout is not None
                raw = await asyncio.wait_for(node.stdout.readline(), max(0.1, deadline - time.monotonic()))
                assert raw, f"node exited: {lines[-5:]}"
                msg = json.loads(raw)
                lines.append(msg)
                if "v" in msg:
                    received.append((msg["v"], msg["cursor"]))

        try:
            await read_until(lambda: any("subscribed" in m for m in lines), 15)
            started = time.monotonic()
            reader = asyncio.create_task(read_until(lambda: len(received) >= ROWS, 90))
            await write_rows_with_chaos(control_db, project.id, chaos, kill_and_restart)
            await asyncio.wait_for(reader, 30)
            elapsed = time.monotonic() - started
            # Anything extra (a duplicate) would arrive now.
            with pytest.raises(TimeoutError):
                await read_until(lambda: False, 0.7)
        finally:
            node.terminate()
            await node.wait()
    reconnects = sum(1 for m in lines if m.get("status") == "disconnected")
    assert chaos.proxy.cuts >= 3 and chaos.kills == 1 and reconnects >= 4, (chaos.proxy.cuts, reconnects)
    check_exactly_once_in_order(received, chaos.committed)
    assert elapsed < 60, elapsed


_: Path | None = None
