"""`fluxbase dev`: embedded PostgreSQL and S3, a mail catcher, migrations, api + realtime + worker,
first-run credentials.

A supervisor: every child is started by us, in its own process group, and stopped by us on
SIGINT/SIGTERM (and by the kernel if we are killed), so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
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
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from fluxbase.config import load_settings
from fluxbase.db.migrate import migrate_database
from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import (
    Interrupted,
    PortInUse,
    StopCheck,
    die_with_parent,
    ensure_port_free,
    stop_process,
)
from fluxbase.devstack.s3 import EmbeddedS3
from fluxbase.security import apikeys as key_format
from fluxbase.services import accounts, apikeys, projects
from fluxbase.services.access import Principal, ProjectAccess, load_project

DEV_EMAIL = "admin@fluxbase.local"
# Written (mode 600) while the stack runs: its supervisor's pid and the services' environment.
DEV_ENV_FILE = "dev-env.json"


class _StopRequest:
    """SIGINT/SIGTERM handling for the supervisor.

    The first signal only records the request; every wait loop polls it, so the supervisor
    stops at its next check and cleans up. Raising from the handler instead can land inside a
    weakref callback or `__del__`, where Python prints the exception and carries on starting.
    A second signal interrupts at once.
    """

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self) -> bool:
        return self.signum != 0

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum:
            raise Interrupted()
        self.signum = signum

    def check(self) -> None:
        if self.signum:
            raise Interrupted()


def _dev_secret(base: Path) -> str:
    path = base / "dev-secret-key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


DEV_RUNTIME_ROLE = "fluxbase_app"


def _runtime_url(superuser_url: str, secret: str) -> str:
    """The runtime role's URL on the embedded server, its password derived from the secret."""
    password = hmac.new(secret.encode(), b"fluxbase-dev-runtime-role", hashlib.sha256).hexdigest()
    parts = urlsplit(superuser_url)
    return urlunsplit(parts._replace(netloc=f"{DEV_RUNTIME_ROLE}:{password}@{parts.hostname}:{parts.port}"))


def _write_private(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o600)
    tmp.replace(path)


async def _first_run(env: Mapping[str, str], saved: dict[str, Any]) -> dict[str, Any]:
    """Create the instance admin, a project, an admin key and a readwrite key once; reuse them on
    restarts.

    Saved credentials are reused only while they still work: if the project was deleted (or
    the database wiped) a new project and keys are made, so the printed curl line always works.
    The readwrite key is the one to try RLS with: the admin key owns the tables and bypasses it.
    """
    settings = load_settings(env)
    data = dict(saved)
    pool = await asyncpg.create_pool(settings.database.url, min_size=1, max_size=2)
    assert pool is not None

    async def works(field: str) -> bool:
        return bool(data.get(field)) and bool(
            await pool.fetchval(
                """SELECT EXISTS (SELECT 1 FROM fluxbase.api_keys
                                  WHERE key_hash = $1 AND project_id = $2 AND revoked_at IS NULL
                                    AND (expires_at IS NULL OR expires_at > now()))""",
                key_format.hash_key(str(data.get(field))),
                str(data.get("projectId")),
            )
        )

    try:
        key_ok = await works("apiKey")
        if not key_ok:
            row = await pool.fetchrow(
                "SELECT * FROM fluxbase.users WHERE lower(email) = lower($1)", DEV_EMAIL
            )
            if row is None:
                password = secrets.token_urlsafe(18)
                user = await accounts.create_user(pool, DEV_EMAIL, password, "Admin", instance_admin=True)
                data = {"email": DEV_EMAIL, "password": password}
            else:
                user = accounts.User.from_row(row)
            project = await projects.create_project(pool, settings, user.id, "My first project")
            access = ProjectAccess(project, Principal(user=user), "admin", "admin")
            raw, _ = await apikeys.create_key(pool, access, name="dev admin key", scope="admin")
            data.update(projectId=project.id, apiKey=raw)
            data.pop("readwriteKey", None)
        if not await works("readwriteKey"):
            project = await load_project(pool, str(data["projectId"]))
            owner = await pool.fetchrow(
                "SELECT * FROM fluxbase.users WHERE lower(email) = lower($1)", DEV_EMAIL
            )
            access = ProjectAccess(project, Principal(user=accounts.User.from_row(owner)), "admin", "admin")
            raw, _ = await apikeys.create_key(pool, access, name="dev readwrite key", scope="readwrite")
            data["readwriteKey"] = raw
    finally:
        await pool.close()
    data.update(apiUrl=settings.api_url, realtimeUrl=settings.realtime_url)
    return data


def _credentials(env: Mapping[str, str], path: Path) -> dict[str, Any]:
    """Load, check or create the dev credentials, and (re)write them with mode 600."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    data = asyncio.run(_first_run(env, saved))
    _write_private(path, data)
    return data


def _wait_ready(
    url: str, children: dict[str, subprocess.Popen[bytes]], should_stop: StopCheck, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if should_stop():
            raise Interrupted()
        for name, p in children.items():
            if p.poll() is not None:
                raise RuntimeError(f"the {name} service exited during startup (code {p.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become ready within {timeout:.0f}s")


def _start_child(
    children: dict[str, subprocess.Popen[bytes]], name: str, args: list[str], env: Mapping[str, str]
) -> None:
    children[name] = subprocess.Popen(
        [sys.executable, "-m", "fluxbase", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )


def _stop_all(children: dict[str, subprocess.Popen[bytes]], timeout: float = 15) -> None:
    """SIGTERM every child at once, then wait for each (and kill stragglers)."""
    for p in children.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in children.values():
        stop_process(p, signal.SIGTERM, timeout=timeout)


def _supervise(children: dict[str, subprocess.Popen[bytes]], stop: _StopRequest) -> int:
    """Wait for a stop request (exit code 0) or for a service to exit on its own (1)."""
    while not stop():
        for name, child in children.items():
            if child.poll() is not None:
                print(
                    f"fluxbase dev: the {name} service exited (code {child.returncode}); stopping",
                    file=sys.stderr,
                )
                return 1
        time.sleep(0.2)
    return 0


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def run_dev(environ: Mapping[str, str]) -> int:
    """Run the whole stack until SIGINT/SIGTERM; return the process exit code."""
    base = Path(environ.get("FLUXBASE_DEV_DIR") or ".fluxbase").resolve()
    api_host = environ.get("FLUXBASE_API_HOST") or "127.0.0.1"
    rt_host = environ.get("FLUXBASE_REALTIME_HOST") or "127.0.0.1"
    ports = {}
    for var, default in (
        ("FLUXBASE_API_PORT", 8080),
        ("FLUXBASE_REALTIME_PORT", 8081),
        ("FLUXBASE_DEV_PG_PORT", 54329),
        ("FLUXBASE_DEV_S3_PORT", 8333),
        ("FLUXBASE_DEV_SMTP_PORT", 1025),
        ("FLUXBASE_DEV_MAIL_PORT", 8025),
    ):
        raw = environ.get(var) or str(default)
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            print(f"fluxbase dev: {var} must be a port number, got {raw!r}", file=sys.stderr)
            return 2
        ports[var] = int(raw)
    api_port, rt_port = ports["FLUXBASE_API_PORT"], ports["FLUXBASE_REALTIME_PORT"]
    pg_port, s3_port = ports["FLUXBASE_DEV_PG_PORT"], ports["FLUXBASE_DEV_S3_PORT"]
    smtp_port, mail_port = ports["FLUXBASE_DEV_SMTP_PORT"], ports["FLUXBASE_DEV_MAIL_PORT"]
    # Without an SMTP server of the user's own, mail goes to the local catcher.
    catch_mail = not environ.get("FLUXBASE_SMTP_HOST")
    # Fail fast, before anything starts, if a port we need is taken (PortInUse → exit code 2),
    # naming every taken port at once rather than one per run.
    wanted = [
        (api_host, api_port, "API", "FLUXBASE_API_PORT"),
        (rt_host, rt_port, "realtime service", "FLUXBASE_REALTIME_PORT"),
        ("127.0.0.1", pg_port, "embedded PostgreSQL", "FLUXBASE_DEV_PG_PORT"),
        ("127.0.0.1", s3_port, "embedded S3 server", "FLUXBASE_DEV_S3_PORT"),
    ]
    if catch_mail:
        wanted.append(("127.0.0.1", smtp_port, "mail catcher (SMTP)", "FLUXBASE_DEV_SMTP_PORT"))
        wanted.append(("127.0.0.1", mail_port, "mail catcher (HTTP)", "FLUXBASE_DEV_MAIL_PORT"))
    taken: list[str] = []
    for host, port, what, var in wanted:
        try:
            ensure_port_free(host, port, what, var)
        except PortInUse as exc:
            taken.append(str(exc))
    if taken:
        raise PortInUse("\n".join(taken))
    base.mkdir(parents=True, exist_ok=True)

    stop = _StopRequest()
    signal.signal(signal.SIGINT, stop.handle)
    signal.signal(signal.SIGTERM, stop.handle)

    pg = EmbeddedPostgres(base / "pg", pg_port, durable=True)
    s3 = EmbeddedS3(base / "s3", s3_port)
    children: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        print(f"fluxbase dev: data in {base}", flush=True)
        pg.init()
        stop.check()
        pg.start(should_stop=stop)
        print(f"  PostgreSQL  127.0.0.1:{pg_port} (pid {pg.pid})", flush=True)
        s3.start(should_stop=stop)
        access_key, secret_key = s3.credentials()
        print(f"  S3          {s3.endpoint_url} (pid {s3.pid})", flush=True)
        env = dict(environ)
        secret = environ.get("FLUXBASE_SECRET_KEY") or _dev_secret(base)
        env.update(
            # The processes log in as a role of their own that is not a superuser; the embedded
            # server's superuser only migrates (and creates that role; docs/security.md).
            FLUXBASE_DATABASE_URL=_runtime_url(pg.url, secret),
            FLUXBASE_MIGRATION_DATABASE_URL=pg.url,
            FLUXBASE_S3_ENDPOINT=s3.endpoint_url,
            FLUXBASE_S3_ACCESS_KEY=access_key,
            FLUXBASE_S3_SECRET_KEY=secret_key,
            FLUXBASE_SECRET_KEY=secret,
            FLUXBASE_API_PORT=str(api_port),
            FLUXBASE_REALTIME_PORT=str(rt_port),
            # A development machine's receivers live on localhost.
            FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK=environ.get("FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK") or "true",
            # The worker runs as its own child here.
            FLUXBASE_RUN_WORKER_IN_API="false",
        )
        if catch_mail:
            env.update(
                FLUXBASE_SMTP_HOST="127.0.0.1",
                FLUXBASE_SMTP_PORT=str(smtp_port),
                FLUXBASE_SMTP_SECURITY="none",  # loopback only: config refuses it elsewhere
            )
            children["mail"] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fluxbase.mail.catcher",
                    "--smtp-port",
                    str(smtp_port),
                    "--http-port",
                    str(mail_port),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        applied = asyncio.run(migrate_database(load_settings(env)))
        if applied:
            print(f"  migrations  applied {', '.join(applied)}", flush=True)
        stop.check()
        creds = _credentials(env, base / "dev-credentials.json")
        # What the `fluxbase` CLI needs to reach this stack from inside the checkout (cli.py).
        _write_private(
            base / DEV_ENV_FILE,
            {"pid": os.getpid(), "env": {k: v for k, v in env.items() if v != environ.get(k)}},
        )
        stop.check()
        # One line per request (and every error with its request id) in this terminal.
        _start_child(children, "api", ["api", "--no-migrate", "--request-log"], env)
        _start_child(children, "realtime", ["realtime"], env)
        _wait_ready(f"http://{_probe_host(api_host)}:{api_port}/ready", children, stop)
        _wait_ready(f"http://{_probe_host(rt_host)}:{rt_port}/ready", children, stop)
        # After the API is ready, so the platform bucket it creates at startup exists.
        _start_child(children, "worker", ["worker"], env)
        body = json.dumps({"projectId": creds["projectId"], "query": "SELECT now() AS server_time"})
        curl = (
            f"curl -s {creds['apiUrl']}/api/execute-sql -H 'Authorization: Bearer {creds['apiKey']}' "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
        )
        print(f"\n  Dashboard   {creds['apiUrl']}/dashboard/   (sign in with the credentials below)")
        print(f"  API         {creds['apiUrl']}   (OpenAPI: {creds['apiUrl']}/schema)")
        print(f"  Realtime    {creds['realtimeUrl']}")
        if catch_mail:
            print(
                f"  Mail        http://127.0.0.1:{mail_port}/messages   (catcher: SMTP 127.0.0.1:{smtp_port})"
            )
        print(f"  Credentials {base / 'dev-credentials.json'} (admin {creds['email']})")
        print(f"  Admin key   {creds['apiKey']}   (owns the tables: bypasses RLS)")
        print(f"  Readwrite   {creds['readwriteKey']}   (RLS policies apply: use it for your app)")
        print("  CLI         `fluxbase …` commands run inside this checkout use this stack")
        print(f"\nTry it:\n  {curl}\n\nCtrl-C stops everything.", flush=True)
        code = _supervise(children, stop)
    except Interrupted:
        pass
    except Exception as exc:
        # A child (initdb, pg_isready) in our process group also gets a terminal's Ctrl-C and
        # fails; that is a stop, not an error.
        if not stop():
            print(f"fluxbase dev: {exc}", file=sys.stderr)
            code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_all(children)
        (base / DEV_ENV_FILE).unlink(missing_ok=True)
        s3.stop()
        pg.stop("fast")
        print("fluxbase dev: stopped", flush=True)
    return code
