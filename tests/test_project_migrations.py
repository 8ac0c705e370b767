"""Project migrations: applied once on the project's admin role, checksummed, all or nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from support import ROOT, Api, assert_error, bearer


@pytest.fixture
async def project(api: Api, project):
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    return project


async def _migrate(api: Api, key: str, pid: str, name: str, sql: str) -> Any:
    return await api.http.post(
        f"/api/projects/{pid}/migrations", json={"name": name, "sql": sql}, headers=bearer(key)
    )


async def _tables(api: Api, key: str, pid: str) -> list[str]:
    r = await api.sql(
        key, pid, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
    )
    return [row["tablename"] for row in r.json()["result"]["rows"]]


async def test_apply_rerun_and_changed_checksum(api: Api, project, control_db: asyncpg.Pool) -> None:
    sql = """
        CREATE TABLE notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text NOT NULL);
        -- a comment; with a semicolon
        CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql AS $$ SELECT upper(t) || ';' $$;
        INSERT INTO notes (body) VALUES ('it''s; fine');
    """
    r = await _migrate(api, project.admin_key, project.id, "0001_notes", sql)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["applied"] is True
    assert body["migration"]["name"] == "0001_notes" and len(body["migration"]["checksum"]) == 64
    r = await api.sql(project.admin_key, project.id, "SELECT shout(body) AS s FROM notes")
    assert r.json()["result"]["rows"] == [{"s": "IT'S; FINE;"}]

    # Same name and SQL: a no-op, nothing runs twice.
    r = await _migrate(api, project.admin_key, project.id, "0001_notes", sql)
    assert r.status_code == 200 and r.json()["applied"] is False, r.text
    r = await api.sql(project.admin_key, project.id, "SELECT count(*)::int AS n FROM notes")
    assert r.json()["result"]["rows"] == [{"n": 1}]

    # Same name, different SQL: refused, and nothing of it runs.
    r = await _migrate(
        api, project.admin_key, project.id, "0001_notes", sql + "\nCREATE TABLE extra (x int);"
    )
    body = assert_error(r, 409, "MIGRATION_CHECKSUM_MISMATCH")
    assert body["error"]["appliedChecksum"] != body["error"]["checksum"]
    assert "extra" not in await _tables(api, project.admin_key, project.id)

    r = await api.http.get(f"/api/projects/{project.id}/migrations", headers=bearer(project.owner_token))
    assert r.status_code == 200
    assert [m["name"] for m in r.json()["migrations"]] == ["0001_notes"]
    # The ledger is in the control plane, out of the tenant's reach.
    r = await api.sql(project.admin_key, project.id, "SELECT * FROM fluxbase.project_migrations")
    assert r.json()["success"] is False and r.json()["error"]["details"] == "ERROR:  42501"
    r = await api.sql(project.admin_key, project.id, "SELECT fluxbase_guard.redeem_migration('\\x00'::bytea)")
    assert r.json()["success"] is False
    n = await control_db.fetchval(
        "SELECT count(*) FROM fluxbase.migration_tickets WHERE project_id = $1", project.id
    )
    assert n == 0


async def test_failing_migration_leaves_nothing(api: Api, project) -> None:
    sql = """
        CREATE TABLE a (id int PRIMARY KEY);
        INSERT INTO a VALUES (1);
        CREATE TABLE b (id int REFERENCES nowhere (id));
    """
    r = await _migrate(api, project.admin_key, project.id, "0002_broken", sql)
    body = assert_error(r, 400, "MIGRATION_FAILED")
    assert body["error"]["statementIndex"] == 2 and body["error"]["details"] == "ERROR:  42P01"
    assert await _tables(api, project.admin_key, project.id) == []
    r = await api.http.get(f"/api/projects/{project.id}/migrations", headers=bearer(project.admin_key))
    assert r.json()["migrations"] == []
    # Fixed, it applies under the same name (nothing was recorded for the failed run).
    r = await _migrate(
        api, project.admin_key, project.id, "0002_broken", sql.replace("REFERENCES nowhere", "REFERENCES a")
    )
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    assert await _tables(api, project.admin_key, project.id) == ["a", "b"]


async def test_transaction_control_and_scope_refused(api: Api, project) -> None:
    for sql in (
        "CREATE TABLE t (x int); COMMIT; DROP TABLE t",
        "create table t (x int);\n  rollback",
        "SAVEPOINT s; CREATE TABLE t (x int)",
        "CREATE TABLE t (x int); /* ; */ BEGIN",
        "SET SESSION AUTHORIZATION postgres",
        "CREATE TABLE t (x text DEFAULT 'unterminated)",
    ):
        r = await _migrate(api, project.admin_key, project.id, "0003_bad", sql)
        assert_error(r, 400, "VALIDATION_ERROR")
    # COMMIT inside a string or a dollar-quoted body is data, not a statement.
    r = await _migrate(
        api,
        project.admin_key,
        project.id,
        "0003_ok",
        "CREATE TABLE t (x text DEFAULT 'COMMIT; ROLLBACK'); "
        "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $body$ SELECT 'x; COMMIT' $body$",
    )
    assert r.status_code == 200, r.text
    # COMMIT inside DO is refused by PostgreSQL itself (we are in a transaction block).
    r = await _migrate(
        api, project.admin_key, project.id, "0004_do", "CREATE TABLE u (x int); DO $$ BEGIN COMMIT; END $$"
    )
    assert_error(r, 400, "MIGRATION_FAILED")
    assert "u" not in await _tables(api, project.admin_key, project.id)
    # A migration cannot reach another project: the admin role owns only its own schema.
    _, token = await api.new_user()
    other = await api.new_project(token)
    r = await _migrate(
        api, project.admin_key, project.id, "0005_evil", f"CREATE TABLE p_{other}.stolen (x int)"
    )
    assert_error(r, 400, "MIGRATION_FAILED")
    # Scopes: a readwrite key cannot migrate; a read key can list.
    rw = await api.new_key(project.owner_token, project.id, "readwrite")
    assert_error(
        await _migrate(api, rw, project.id, "0006", "CREATE TABLE v (x int)"), 403, "INSUFFICIENT_PERMISSIONS"
    )
    for bad in ("", "../x", "a b", "x" * 201):
        assert_error(
            await _migrate(api, project.admin_key, project.id, bad, "SELECT 1"), 400, "VALIDATION_ERROR"
        )


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxbase", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


async def test_cli_migrations_push(api: Api, project, tmp_path: Path) -> None:
    (tmp_path / "0001_create.sql").write_text("CREATE TABLE items (id int PRIMARY KEY, name text);")
    (tmp_path / "0002_seed.sql").write_text("INSERT INTO items VALUES (1, 'one'), (2, 'two');")
    (tmp_path / "README.md").write_text("not a migration")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXBASE_")}
    env.update(FLUXBASE_URL=api.base_url, FLUXBASE_KEY=project.admin_key)
    p = _cli("migrations", "push", str(tmp_path), "--project", project.id, env=env)
    assert p.returncode == 0, p.stderr
    assert "applied 0001_create" in p.stdout and "applied 0002_seed" in p.stdout
    assert project.admin_key not in p.stdout + p.stderr
    p = _cli("migrations", "push", str(tmp_path), "--project", project.id, env=env)
    assert p.returncode == 0, p.stderr
    assert "skipped 0001_create" in p.stdout and "skipped 0002_seed" in p.stdout
    r = await api.sql(project.admin_key, project.id, "SELECT count(*)::int AS n FROM items")
    assert r.json()["result"]["rows"] == [{"n": 2}]
    # An edited file stops the push with the server's code and a non-zero exit.
    (tmp_path / "0002_seed.sql").write_text("INSERT INTO items VALUES (3, 'three');")
    (tmp_path / "0003_more.sql").write_text("CREATE TABLE more (x int);")
    p = _cli("migrations", "push", str(tmp_path), "--project", project.id, env=env)
    assert p.returncode == 1 and "MIGRATION_CHECKSUM_MISMATCH" in p.stderr
    assert "0003_more" not in p.stdout
