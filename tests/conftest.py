"""Session fixtures: real PostgreSQL and S3, a real API server process, fresh projects per test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fluxbase.config import load_settings
from fluxbase.devstack.procs import free_port
from fluxbase.tenancy.pools import TenantPools
from support import Api, ServerProcess, Stack, bearer, run_service, start_stack, stop_stack

# `make test` runs the suite in two pytest-xdist workers with --dist loadfile (TEST_WORKERS=0:
# one process, see the Makefile): each file runs whole on one worker, files
# handed out in collection order as workers free up. The slowest files (measured:
# the sum of a file's test times in the JUnit report of a full run) go first, so that no long file
# starts last and leaves one worker running alone at the end; the rest keep their usual order.
SLOWEST_FILES: tuple[str, ...] = (  # seconds per file in a 2-worker run, 3 December 2026
    "test_attack_review3.py",  # 113
    "test_chaos.py",  # 113
    "test_dashboard.py",  # 105
    "test_dev_command.py",  # 78
    "test_team.py",  # 75
    "test_sql_isolation.py",  # 71
    "test_storage.py",  # 65
    "test_webhooks.py",  # 61
    "test_login_throttle.py",  # 58
    "test_observability.py",  # 54
    "test_openapi_contract.py",  # 52
    "test_lifecycle.py",  # 50
    "test_mail_flows.py",  # 45
    "test_dashboard_admin.py",  # 44
    "test_clients_chaos.py",  # 40
    "test_clients_js.py",  # 38
    "test_tutorial.py",  # 37
    "test_realtime.py",  # 35
    "test_sql_classifier_property.py",  # 35
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist: keep the order below, not "most tests first"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only in xdist workers; a serial run keeps its order
        return
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        stop_stack(s)


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@dataclass
class Instance:
    """One Fluxbase instance under test: its database, env and running API server."""

    dbname: str
    env: dict[str, str]
    server: ServerProcess

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.asynccontextmanager
async def spawn_instance(stack: Stack, log_dir: Path, **env_extra: str) -> AsyncIterator[Instance]:
    """A fresh database with a Fluxbase API on it (the API applies migrations at start)."""
    dbname = await stack.create_database()
    port = free_port()
    env = stack.env(dbname, FLUXBASE_API_PORT=str(port), **env_extra)
    try:
        with run_service(["api"], env, port, log_dir) as server:
            yield Instance(dbname, env, server)
    finally:
        await stack.drop_database(dbname)


ROOT_EMAIL, ROOT_PASSWORD = "root@example.com", "correct horse battery"


@pytest.fixture(scope="session")
async def instance(stack: Stack, log_dir: Path) -> AsyncIterator[Instance]:
    async with spawn_instance(stack, log_dir) as inst:
        # Its first account, so its instance admin (`instance_admin`), is registered before any
        # test can register another: under xdist a worker runs the files in any order.
        client = Api(inst.url)
        try:
            await client.register(email=ROOT_EMAIL, password=ROOT_PASSWORD, name="Root")
        finally:
            await client.close()
        yield inst


@pytest.fixture(scope="session")
def spawn(stack: Stack, log_dir: Path) -> Callable[..., Any]:
    def _spawn(**env_extra: str) -> Any:
        return spawn_instance(stack, log_dir, **env_extra)

    return _spawn


@pytest.fixture(scope="session")
async def control_db(stack: Stack, instance: Instance) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(stack.database_url(instance.dbname), min_size=1, max_size=4)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def api(instance: Instance) -> AsyncIterator[Api]:
    client = Api(instance.url)
    yield client
    await client.close()


@pytest.fixture(scope="session")
async def instance_admin(instance: Instance) -> dict[str, Any]:
    """The first account registered on the session instance (so its instance admin)."""
    client = Api(instance.url)
    try:
        token = await client.login(ROOT_EMAIL, ROOT_PASSWORD)
        r = await client.http.get("/api/auth/me", headers=bearer(token))
        assert r.status_code == 200, r.text
        return {**r.json()["user"], "password": ROOT_PASSWORD, "token": token}
    finally:
        await client.close()


@dataclass
class ProjectCtx:
    id: str
    owner_token: str
    owner: dict[str, Any]
    admin_key: str


@pytest.fixture
async def project(api: Api, instance_admin: dict[str, Any]) -> ProjectCtx:
    owner, token = await api.new_user()
    pid = await api.new_project(token)
    # Not rate-limited: tests drive many requests; tests of the limit make their own keys.
    key = await api.new_key(token, pid, "admin", rateLimitRequests=1_000_000)
    return ProjectCtx(pid, token, owner, key)


@pytest.fixture
async def tenancy(
    instance: Instance, control_db: asyncpg.Pool, project: ProjectCtx
) -> AsyncIterator[tuple[TenantPools, asyncpg.Pool, str]]:
    """The API's tenant pools, in the test's own process, one connection per pool (so consecutive
    requests share a session): (the pools, the control-plane pool, the project id)."""
    pools = TenantPools(load_settings({**instance.env, "FLUXBASE_TENANT_POOL_MAX": "1"}), max_size=1)
    try:
        yield pools, control_db, project.id
    finally:
        await pools.close()
