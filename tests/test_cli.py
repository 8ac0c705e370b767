"""Headless setup through the CLI: create-admin, create-project, create-key, then use the key."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from support import ROOT, Api


async def _cli(env: dict[str, str], *args: str) -> dict:
    res = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fluxbase", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


async def test_cli_creates_admin_project_and_key(spawn) -> None:
    async with spawn() as inst:
        admin = await _cli(
            inst.env, "create-admin", "--email", "ops@example.com", "--password", "ops password 1"
        )
        assert admin["isInstanceAdmin"] is True
        project = await _cli(inst.env, "create-project", "--owner", "OPS@example.com", "--name", "headless")
        key = await _cli(inst.env, "create-key", "--project", project["id"], "--scope", "readwrite")
        assert key["key"].startswith("flx_live_") and key["scope"] == "readwrite"
        api = Api(inst.url)
        try:
            r = await api.sql(key["key"], project["id"], "SELECT 1 AS one")
            assert r.json()["result"]["rows"] == [{"one": 1}]
            token = await api.login("ops@example.com", "ops password 1")
            r = await api.http.get("/api/projects", headers={"Authorization": f"Bearer {token}"})
            assert [p["id"] for p in r.json()["projects"]] == [project["id"]]
        finally:
            await api.close()
        res = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "fluxbase",
                "create-project",
                "--owner",
                "nobody@example.com",
                "--name",
                "x",
            ],
            env=inst.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode != 0 and "nobody@example.com" in (res.stderr + res.stdout)
        assert "Traceback" not in res.stderr
