"""The examples/ programs run against the real stack: the Python server script, and both
serverless webhook handlers receiving real deliveries from `fluxbase worker`."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from fluxbase.devstack.procs import free_port
from support import ROOT, Api
from test_realtime import rt  # noqa: F401 - fixture
from test_webhooks import Proj, create_hook, proj, wapi, wh  # noqa: F401 - fixtures

EX = ROOT / "examples"


async def _lines_until(
    proc: asyncio.subprocess.Process, text: str, out: list[str], timeout: float = 20
) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while not any(text in line for line in out):
        line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
        assert line, f"exited: {''.join(out)[-3000:]}"
        out.append(line.decode())


async def test_server_script(api: Api, project, rt) -> None:  # noqa: F811
    key = await api.new_key(project.owner_token, project.id, "admin", rateLimitRequests=1_000_000)
    env = dict(
        os.environ,
        FLUXBASE_URL=api.base_url,
        FLUXBASE_REALTIME_URL=rt,
        FLUXBASE_PROJECT_ID=project.id,
        FLUXBASE_API_KEY=key,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EX / "server_script.py"),
        "--events",
        "2",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out: list[str] = []
    try:
        await _lines_until(proc, "listening for 2 events", out)
        for cid in (41, 42):
            r = await api.sql(
                key, project.id, "INSERT INTO orders (customer_id, amount) VALUES ($1, 1)", [cid]
            )
            assert r.json()["success"]
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        rest = await proc.stdout.read() if proc.stdout else b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(out) + rest.decode()
    assert "pending orders: [(2, '12.50'), (1, '59.99')]" in text, text
    assert "as expected: SQL_EXEC_ERROR 42P01" in text
    assert "uploaded " in text
    inserts = [line for line in text.splitlines() if line.startswith("INSERT {")]
    assert len(inserts) == 2 and "'customer_id': 41" in inserts[0] and "'customer_id': 42" in inserts[1], text


@pytest.mark.parametrize("lang", ["python", "node"])
async def test_webhook_handlers_verify_real_deliveries(wapi: Api, proj: Proj, lang: str) -> None:  # noqa: F811
    if lang == "node" and shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    port = free_port()
    cmd = (
        [sys.executable, str(EX / "webhook_handler.py"), str(port)]
        if lang == "python"
        else ["node", str(EX / "webhook-handler.mjs"), str(port)]
    )
    hook = await create_hook(wapi, proj, f"http://127.0.0.1:{port}/hook", events=["row.inserted"])
    env = dict(os.environ, FLUXBASE_WEBHOOK_SECRET=hook["secret"], PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out: list[str] = []
    try:
        deadline = time.monotonic() + 15
        async with httpx.AsyncClient() as h:
            while True:  # until the handler listens
                try:
                    r = await h.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the handler did not start"
                    await asyncio.sleep(0.1)
            assert r.status_code == 401  # unsigned
            r = await wapi.sql(
                proj.key, proj.id, "INSERT INTO orders (customer_id, amount) VALUES (7, 59.99)"
            )
            assert r.json()["success"]
            await _lines_until(proc, "[Webhook] row.inserted", out)
            assert '"customer_id": 7' in out[-1] or '"customer_id":7' in out[-1], out[-1]
            # The worker logs the handler's answer: delivered, 200.
            deadline = time.monotonic() + 10
            while True:
                r = await wapi.http.get(
                    f"/api/webhooks/{hook['id']}/deliveries",
                    params={"limit": 5},
                    headers={"Authorization": f"Bearer {proj.key}"},
                )
                d = r.json()["deliveries"][0]
                if d["status"] != "pending" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert d["status"] == "delivered" and d["responseStatus"] == 200, d
    finally:
        proc.terminate()
        await proc.wait()
