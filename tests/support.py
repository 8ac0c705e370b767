"""Test support: real PostgreSQL and S3 for the session, real API server processes, HTTP helpers."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from fluxbase.devstack.postgres import EmbeddedPostgres
from fluxbase.devstack.procs import free_port, stop_process
from fluxbase.devstack.s3 import EmbeddedS3

ROOT = Path(__file__).resolve().parent.parent

# Strings that must never appear in any response body.
RUNTIME_ROLE = "fluxbase_app"

NEVER_IN_RESPONSES = ("Traceback", "asyncpg", "password_hash", "key_hash", 'File "')


@dataclass
class Stack:
    """The session's PostgreSQL (superuser URL to an admin database) and S3 endpoint."""

    admin_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    pg: EmbeddedPostgres | None = None
    s3: EmbeddedS3 | None = None
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    # One runtime role per cluster (roles are cluster-wide): every database's migration sets the
    # same password, so no instance's migration breaks another's logins.
    runtime_password: str = field(default_factory=lambda: secrets.token_hex(24))

    def database_url(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + dbname))

    async def create_database(self) -> str:
        name = "fx_" + secrets.token_hex(6)
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return name

    async def drop_database(self, name: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def runtime_url(self, dbname: str) -> str:
        """The runtime's own login role (not a superuser): created by the migration step."""
        parts = urlsplit(self.database_url(dbname))
        netloc = f"{RUNTIME_ROLE}:{self.runtime_password}@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def env(self, dbname: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXBASE_")}
        env.update(
            FLUXBASE_DATABASE_URL=self.runtime_url(dbname),
            FLUXBASE_MIGRATION_DATABASE_URL=self.database_url(dbname),
            FLUXBASE_S3_ENDPOINT=self.s3_endpoint,
            FLUXBASE_S3_ACCESS_KEY=self.s3_access_key,
            FLUXBASE_S3_SECRET_KEY=self.s3_secret_key,
            FLUXBASE_S3_BUCKET="fx-" + dbname.replace("_", "-"),
            FLUXBASE_SECRET_KEY=self.secret_key,
            FLUXBASE_TRUSTED_PROXIES="127.0.0.1/32",
            FLUXBASE_LOG_LEVEL="warning",
        )
        env.update(extra)
        return env


def start_stack(tmp: Path, *, durable: bool = False, max_connections: int = 300) -> Stack:
    db_url = os.environ.get("FLUXBASE_TEST_DATABASE_URL")
    s3_url = os.environ.get("FLUXBASE_TEST_S3_URL")
    pg = s3 = None
    if db_url:
        admin_url = db_url
    else:
        pg = EmbeddedPostgres(tmp / "pg", free_port(), durable=durable, max_connections=max_connections)
        pg.init()
        pg.start()
        admin_url = pg.url
    if s3_url:
        access = os.environ["FLUXBASE_TEST_S3_ACCESS_KEY"]
        secret = os.environ["FLUXBASE_TEST_S3_SECRET_KEY"]
        endpoint = s3_url
    else:
        s3 = EmbeddedS3(tmp / "s3", free_port(below=55_000))
        s3.start()
        access, secret = s3.credentials()
        endpoint = s3.endpoint_url
    return Stack(admin_url, endpoint, access, secret, pg=pg, s3=s3)


def stop_stack(stack: Stack) -> None:
    if stack.s3 is not None:
        stack.s3.stop()
    if stack.pg is not None:
        stack.pg.stop("immediate")


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-4000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready:\n{log_path.read_text(errors='replace')[-4000:]}")


@contextlib.contextmanager
def run_service(
    command: list[str],
    env: dict[str, str],
    port: int,
    log_dir: Path,
    ready_path: str = "/ready",
    timeout: float = 60,
) -> Iterator[ServerProcess]:
    """Start `python -m fluxbase <command>` and wait for it to be ready; always stop it."""
    log_path = log_dir / f"{command[0]}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fluxbase", *command],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    try:
        wait_http_ok(f"http://127.0.0.1:{port}{ready_path}", proc, log_path, timeout)
        yield ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    finally:
        stop_process(proc, signal.SIGTERM, timeout=15)


def random_ip() -> str:
    return f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


def assert_clean(resp: httpx.Response, *secrets_: str) -> None:
    """No stack trace, internal name or secret in a response body."""
    text = resp.text
    for s in (*NEVER_IN_RESPONSES, *secrets_):
        assert s not in text, f"{s!r} leaked in response: {text[:500]}"


def assert_error(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, f"expected {status} {code}, got {resp.status_code}: {resp.text[:500]}"
    body = resp.json()
    assert body["success"] is False
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert_clean(resp)
    return body


class Api:
    """A thin async HTTP client for one Fluxbase API server."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)

    async def close(self) -> None:
        await self.http.aclose()

    async def register(
        self, email: str | None = None, password: str = "correct horse battery", name: str = "Test User"
    ) -> dict[str, Any]:
        email = email or f"user-{secrets.token_hex(5)}@example.com"
        r = await self.http.post(
            "/api/auth/register",
            json={"email": email, "password": password, "displayName": name},
            headers={"X-Forwarded-For": random_ip()},  # sign-ups are throttled per client
        )
        assert r.status_code == 201, r.text
        return {**r.json()["user"], "password": password}

    async def login(self, email: str, password: str) -> str:
        r = await self.http.post(
            "/api/auth/login",
            json={"email": email, "password": password},
            headers={"X-Forwarded-For": random_ip()},
        )
        assert r.status_code == 200, r.text
        return str(r.json()["token"])

    async def new_user(self) -> tuple[dict[str, Any], str]:
        user = await self.register()
        return user, await self.login(user["email"], user["password"])

    async def new_project(self, token: str, name: str = "test project") -> str:
        r = await self.http.post("/api/projects", json={"name": name}, headers=bearer(token))
        assert r.status_code == 201, r.text
        return str(r.json()["project"]["id"])

    async def new_key(self, token: str, project_id: str, scope: str = "admin", **extra: Any) -> str:
        r = await self.http.post(
            f"/api/projects/{project_id}/api-keys",
            json={"name": f"{scope} key", "scope": scope, **extra},
            headers=bearer(token),
        )
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    async def sql(
        self, key: str, project_id: str, query: str, params: list[Any] | None = None, **extra: Any
    ) -> httpx.Response:
        body: dict[str, Any] = {"projectId": project_id, "query": query}
        if params is not None:
            body["params"] = params
        body.update(extra)
        return await self.http.post("/api/execute-sql", json=body, headers=bearer(key))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- tenant SQL through the API (the session-reset tests and hostile reviews 23-25) -------------

END_USER_PASSWORD = "correct horse battery"


async def has_capture_library(control_db: asyncpg.Pool) -> bool:
    """Whether the test server runs the C functions of ext/fluxbase_capture (capture, reset)."""
    from fluxbase.db import capture

    async with control_db.acquire() as conn:
        return await capture.capture_language(conn) == capture.C


async def need_capture_library(control_db: asyncpg.Pool) -> None:
    import pytest

    if not await has_capture_library(control_db):
        pytest.skip("FLUXBASE_TEST_DATABASE_URL's server has no fluxbase_capture library (docs/capture.md)")


@contextlib.asynccontextmanager
async def own_project(spawn: Callable[..., Any], **env: str) -> AsyncIterator[tuple[Any, Api, str, str, str]]:
    """A spawned instance (conftest.spawn, `env` its extra settings) with one project:
    (instance, api, project id, owner token, an admin key without a practical rate limit)."""
    async with spawn(**env) as inst:
        api = Api(inst.url)
        try:
            _, token = await api.new_user()
            pid = await api.new_project(token)
            yield inst, api, pid, token, await api.new_key(token, pid, rateLimitRequests=1_000_000)
        finally:
            await api.close()


async def end_user(api: Api, pid: str, email: str | None = None) -> tuple[str, str]:
    """A new end user of the project (a random address unless `email`), signed in: (its id, its
    access token)."""
    email = email or f"u-{secrets.token_hex(4)}@example.com"
    r = await api.http.post(
        f"/api/projects/{pid}/auth/register", json={"email": email, "password": END_USER_PASSWORD}
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        f"/api/projects/{pid}/auth/login",
        json={"email": email, "password": END_USER_PASSWORD},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return body["user"]["id"], body["accessToken"]


async def post_sql(
    api: Api, key: str, pid: str, q: str, token: str | None = None, params: list[Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST /api/execute-sql with `key` and, given `token`, as that end user: (status, body)."""
    headers = bearer(key)
    if token is not None:
        headers["X-Fluxbase-User-Token"] = token
    payload: dict[str, Any] = {"projectId": pid, "query": q}
    if params is not None:
        payload["params"] = params
    r = await api.http.post("/api/execute-sql", json=payload, headers=headers)
    return r.status_code, dict(r.json())


async def sql_body(
    api: Api, key: str, pid: str, q: str, token: str | None = None, params: list[Any] | None = None
) -> dict[str, Any]:
    return (await post_sql(api, key, pid, q, token, params))[1]


async def sql_rows(
    api: Api, key: str, pid: str, q: str, token: str | None = None, params: list[Any] | None = None
) -> list[dict[str, Any]]:
    """The rows of a statement that must succeed."""
    body = await sql_body(api, key, pid, q, token, params)
    assert body["success"], (q, body)
    return list(body["result"]["rows"])
