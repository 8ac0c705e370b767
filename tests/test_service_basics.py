"""Probes, OpenAPI, configuration checks and migrations."""

from __future__ import annotations

import subprocess
import sys

import asyncpg
import pytest

from fluxbase.config import ConfigError, load_settings
from fluxbase.db.migrate import Migration, MigrationError, load_migrations, migrate


async def test_live_ready_and_openapi(api) -> None:
    assert (await api.http.get("/live")).json() == {"status": "ok"}
    ready = await api.http.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"postgres": "ok", "s3": "ok"}
    spec = (await api.http.get("/schema/openapi.json")).json()
    assert "/api/projects/{project_id}/api-keys" in spec["paths"]
    op_ids = {
        op["operationId"] for path in spec["paths"].values() for op in path.values() if "operationId" in op
    }
    assert {"login", "createProject", "createApiKey", "rotateApiKey"} <= op_ids


def _env(**kw: str) -> dict[str, str]:
    base = {
        "FLUXBASE_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db",
        "FLUXBASE_S3_ENDPOINT": "http://127.0.0.1:1",
        "FLUXBASE_S3_ACCESS_KEY": "a",
        "FLUXBASE_S3_SECRET_KEY": "b",
        "FLUXBASE_SECRET_KEY": "s" * 32,
    }
    base.update(kw)
    return base


def test_settings_refuse_missing_or_weak_secret() -> None:
    with pytest.raises(ConfigError, match="not set"):
        load_settings(_env(FLUXBASE_SECRET_KEY=""))
    with pytest.raises(ConfigError, match="too weak"):
        load_settings(_env(FLUXBASE_SECRET_KEY="short-secret"))
    with pytest.raises(ConfigError, match="FLUXBASE_API_PORT"):
        load_settings(_env(FLUXBASE_API_PORT="eighty"))
    assert load_settings(_env()).auth.secret_key == "s" * 32


def test_api_command_with_weak_secret_stops_with_a_clear_message() -> None:
    env = _env(FLUXBASE_SECRET_KEY="weak")
    res = subprocess.run(
        [sys.executable, "-m", "fluxbase", "api"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "FLUXBASE_SECRET_KEY is too weak" in res.stderr
    assert "Traceback" not in res.stderr


async def test_migrations_twice_change_nothing(stack, tmp_path) -> None:
    dbname = await stack.create_database()
    try:
        conn = await asyncpg.connect(stack.database_url(dbname))
        try:
            first = await migrate(conn)
            assert first == [m.name for m in load_migrations()]
            dump1 = _schema_dump(stack, dbname)
            assert await migrate(conn) == []
            assert _schema_dump(stack, dbname) == dump1
            # A changed applied file stops startup.
            m = load_migrations()[0]
            changed = tmp_path / m.name
            changed.write_text(m.sql + "\n-- edited\n")
            with pytest.raises(MigrationError, match="changed after it was applied"):
                await migrate(conn, tmp_path)
        finally:
            await conn.close()
    finally:
        await stack.drop_database(dbname)


def _schema_dump(stack, dbname: str) -> str:
    from fluxbase.devstack.postgres import find_bin_dir

    res = subprocess.run(
        [str(find_bin_dir() / "pg_dump"), "--schema-only", "--no-owner", stack.database_url(dbname)],
        capture_output=True,
        text=True,
        check=True,
    )
    return "\n".join(
        line for line in res.stdout.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def test_migration_names_are_checked(tmp_path) -> None:
    (tmp_path / "bad.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError):
        load_migrations(tmp_path)
    assert Migration("0001", "0001_x.sql", "a").checksum != Migration("0001", "0001_x.sql", "b").checksum
