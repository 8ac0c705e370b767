"""`fluxbase dev`: embedded PostgreSQL and S3, migrations, api + realtime, first-run credentials.

A supervisor: every child is started by us, in its own process group, and stopped by us on
SIGINT/SIGTERM (and by the kernel if we are killed), so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from fluxbase.config import load_settings
from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import die_with_parent, ensure_port_free, stop_process
from fluxbase.devstack.s3 import EmbeddedS3


class _Stop(Exception):
    pass


def _dev_secret(base: Path) -> str:
    path = base / "dev-secret-key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def _write_private(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


async def _first_run(env: Mapping[str, str], creds_path: Path) -> dict[str, Any]:
    """Create the instance admin, a project and an admin key once; reuse them on restarts."""
    import asyncpg

    from fluxbase.services import accounts, apikeys, projects
    from fluxbase.services.access import Principal, ProjectAccess

    settings = load_settings(env)
    if creds_path.exists():
        data: dict[str, Any] = json.loads(creds_path.read_text())
        data.update(apiUrl=settings.api_url, realtimeUrl=settings.realtime_url)
        _write_private(creds_path, data)
        return data
    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
    try:
        email = "admin@fluxbase.local"
        password = secrets.token_urlsafe(18)
        user = await accounts.create_user(pool, email, password, "Admin", instance_admin=True)
        project = await projects.create_project(pool, settings, user.id, "My first project")
        access = ProjectAccess(project, Principal(user=user), "admin", "admin")
        raw, _ = await apikeys.create_key(pool, access, name="dev admin key", scope="admin")
    finally:
        await pool.close()
    data = {"email": email, "password": password, "projectId": project.id, "apiKey": raw,
            "apiUrl": settings.api_url, "realtimeUrl": settings.realtime_url}
    _write_private(creds_path, data)
    return data


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a service exited during startup (code {p.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready")


def run_dev(environ: Mapping[str, str]) -> int:
    base = Path(environ.get("FLUXBASE_DEV_DIR", ".fluxbase")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    api_port = int(environ.get("FLUXBASE_API_PORT", "8080"))
    rt_port = int(environ.get("FLUXBASE_REALTIME_PORT", "8081"))
    pg_port = int(environ.get("FLUXBASE_DEV_PG_PORT", "54329"))
    s3_port = int(environ.get("FLUXBASE_DEV_S3_PORT", "8333"))
    # Fail fast, before anything starts, if a port we need is taken.
    ensure_port_free("127.0.0.1", api_port, "API", "FLUXBASE_API_PORT")
    ensure_port_free("127.0.0.1", rt_port, "realtime service", "FLUXBASE_REALTIME_PORT")
    ensure_port_free("127.0.0.1", pg_port, "embedded PostgreSQL", "FLUXBASE_DEV_PG_PORT")
    ensure_port_free("127.0.0.1", s3_port, "embedded S3 server", "FLUXBASE_DEV_S3_PORT")

    stopping = {"sig": 0}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping["sig"] = signum
        raise _Stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    pg = EmbeddedPostgres(base / "pg", pg_port, durable=True)
    s3 = EmbeddedS3(base / "s3", s3_port)
    children: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        print(f"fluxbase dev: data in {base}")
        pg.init()
        pg.start()
        print(f"  PostgreSQL  127.0.0.1:{pg_port} (pid {pg.pid})")
        s3.start()
        access_key, secret_key = s3.credentials()
        print(f"  S3          {s3.endpoint_url} (pid {s3.pid})")
        env = dict(environ)
        env.update(
            FLUXBASE_DATABASE_URL=pg.url,
            FLUXBASE_S3_ENDPOINT=s3.endpoint_url,
            FLUXBASE_S3_ACCESS_KEY=access_key,
            FLUXBASE_S3_SECRET_KEY=secret_key,
            FLUXBASE_SECRET_KEY=environ.get("FLUXBASE_SECRET_KEY") or _dev_secret(base),
            FLUXBASE_API_PORT=str(api_port),
            FLUXBASE_REALTIME_PORT=str(rt_port),
        )
        from fluxbase.cli import _migrate

        applied = asyncio.run(_migrate(load_settings(env)))
        if applied:
            print(f"  migrations  applied {', '.join(applied)}")
        creds = asyncio.run(_first_run(env, base / "dev-credentials.json"))
        for cmd in (["api"], ["realtime"]):
            children.append(
                subprocess.Popen([sys.executable, "-m", "fluxbase", *cmd], env=env, stdin=subprocess.DEVNULL,
                                 preexec_fn=die_with_parent())  # noqa: PLW1509
            )
        _wait_ready(f"http://127.0.0.1:{api_port}/ready", children)
        _wait_ready(f"http://127.0.0.1:{rt_port}/ready", children)
        body = json.dumps({"projectId": creds["projectId"], "query": "SELECT now() AS server_time"})
        curl = (f"curl -s {creds['apiUrl']}/api/execute-sql -H 'Authorization: Bearer {creds['apiKey']}' "
                f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")
        print(f"\n  API         {creds['apiUrl']}   (OpenAPI: {creds['apiUrl']}/schema)")
        print(f"  Realtime    {creds['realtimeUrl']}")
        print(f"  Credentials {base / 'dev-credentials.json'} (admin {creds['email']})")
        print(f"\nTry it:\n  {curl}\n\nCtrl-C stops everything.", flush=True)
        while True:
            for child in children:
                if child.poll() is not None:
                    print(f"fluxbase dev: a service exited (code {child.returncode}); stopping", file=sys.stderr)
                    code = 1
                    raise _Stop()
            time.sleep(0.5)
    except _Stop:
        pass
    except Exception as exc:
        print(f"fluxbase dev: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in children:
            stop_process(child, signal.SIGTERM, timeout=15)
        s3.stop()
        pg.stop("fast")
        print("fluxbase dev: stopped", flush=True)
    return code
