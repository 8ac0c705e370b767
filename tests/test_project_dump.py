"""Export and import: a psql-loadable dump, imported into a fresh project and into plain PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fluxbase.devstack.postgres import find_bin_dir
from support import ROOT, Api, Stack, assert_error, bearer

SETUP = [
    "CREATE TABLE authors (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL UNIQUE)",
    """CREATE TABLE posts (
         id serial PRIMARY KEY, author_id bigint REFERENCES authors (id), title text,
         body text, meta jsonb, owner text DEFAULT auth.uid(), created date DEFAULT '2024-01-02')""",
    "CREATE INDEX posts_title_idx ON posts (lower(title))",
    "CREATE VIEW post_titles AS SELECT p.id, a.name, p.title FROM posts p "
    "JOIN authors a ON a.id = p.author_id",
    "CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT upper(t) || '; !' $$",
    "ALTER TABLE posts ENABLE ROW LEVEL SECURITY",
    "CREATE POLICY own_posts ON posts FOR SELECT USING (owner IS NULL OR owner = auth.uid())",
    "CREATE POLICY rw_insert ON posts FOR INSERT TO {rw} WITH CHECK (true)",
    "INSERT INTO authors (name) VALUES ('Ada'), ('Bob ''the'' builder')",
]
TRICKY = "tab\there\nnewline \\ backslash ünïcødé 🚀 \\. end"


async def _ok(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True, r.text
    return dict(r.json())


@pytest.fixture
async def source(api: Api, project):
    project.admin_key = await api.new_key(
        project.owner_token, project.id, "admin", rateLimitRequests=1_000_000
    )
    for stmt in SETUP:
        await _ok(await api.sql(project.admin_key, project.id, stmt.replace("{rw}", f"p_{project.id}_rw")))
    await _ok(
        await api.sql(
            project.admin_key,
            project.id,
            "INSERT INTO posts (author_id, title, body, meta) "
            "VALUES (1, 'Hello', $1, $2), (2, NULL, NULL, NULL)",
            [TRICKY, {"tags": ["a", "b"], "n": 1.5}],
        )
    )
    return project


async def _export(api: Api, key: str, pid: str) -> bytes:
    r = await api.http.get(f"/api/projects/{pid}/export", headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/sql")
    return r.content


def _reseal(dump: bytes) -> bytes:
    """Recompute the trailer (what an attacker who edits a dump can always do)."""
    body = dump[: dump.rindex(b"-- fluxbase-export-end")]
    return body + f"-- fluxbase-export-end sha256={hashlib.sha256(body).hexdigest()}\n".encode()


async def _import(api: Api, token: str, dump: bytes, name: str = "copy") -> Any:
    return await api.http.post(
        "/api/projects/import",
        params={"name": name},
        content=dump,
        headers={**bearer(token), "Content-Type": "application/sql"},
    )


async def _project_count(control_db: asyncpg.Pool) -> tuple[int, int, int]:
    row = await control_db.fetchrow(
        """SELECT (SELECT count(*) FROM fluxbase.projects)::int AS p,
                  (SELECT count(*) FROM pg_namespace WHERE nspname ~ '^p_[0-9a-f]{16}$')::int AS s,
                  (SELECT count(*) FROM pg_roles WHERE rolname ~ '^p_[0-9a-f]{16}_')::int AS r"""
    )
    assert row is not None
    return row["p"], row["s"], row["r"]


async def _content(api: Api, key: str, pid: str) -> list[Any]:
    out = []
    for q in (
        "SELECT id, name FROM authors ORDER BY id",
        "SELECT id, author_id, title, body, meta, owner, created FROM posts ORDER BY id",
        "SELECT * FROM post_titles ORDER BY id",
        "SELECT shout('x') AS s",
    ):
        out.append((await _ok(await api.sql(key, pid, q)))["result"]["rows"])
    return out


async def test_export_shape_and_import_into_new_project(api: Api, source, control_db: asyncpg.Pool) -> None:
    dump = await _export(api, source.admin_key, source.id)
    text = dump.decode()
    assert re.match(rf"-- fluxbase-export format=1 schema=p_{source.id} created=\S+\n", text)
    assert re.search(r"\n-- fluxbase-export-end sha256=[0-9a-f]{64}\n$", text)
    assert "fluxbase_capture" not in text and "fluxbase." not in text
    # No owners or grants; the only role name is the one the project's own policy names.
    assert text.count(f"p_{source.id}_") == text.count(f"TO p_{source.id}_rw")
    assert "OWNER TO" not in text and "GRANT " not in text
    assert "CREATE POLICY own_posts" in text

    before = await _project_count(control_db)
    r = await _import(api, source.owner_token, dump, "restored")
    assert r.status_code == 201, r.text
    new = r.json()["project"]
    assert new["name"] == "restored" and new["role"] == "admin" and new["id"] != source.id
    key = await api.new_key(source.owner_token, new["id"], "admin", rateLimitRequests=1_000_000)
    assert await _content(api, key, new["id"]) == await _content(api, source.admin_key, source.id)
    # Sequences continue where the source left off; the imported tables are live tables.
    r = await _ok(await api.sql(key, new["id"], "INSERT INTO authors (name) VALUES ('Cy') RETURNING id"))
    assert r["result"]["rows"] == [{"id": 3}]
    r = await _ok(
        await api.sql(
            key, new["id"], "SELECT count(*)::int AS n FROM pg_trigger WHERE tgname LIKE 'fluxbase_capture%'"
        )
    )
    assert r["result"]["rows"][0]["n"] > 0  # realtime capture attached to the new tables
    after = await _project_count(control_db)
    assert after == (before[0] + 1, before[1] + 1, before[2] + 4)  # admin, rw, ro and the RLS checker
    # A policy naming the source project's role names the new project's role after import.
    r = await _ok(
        await api.sql(
            key,
            new["id"],
            "SELECT roles::text AS r FROM pg_policies "
            "WHERE policyname = 'rw_insert' AND schemaname = current_schema()",
        )
    )
    assert r["result"]["rows"] == [{"r": f"{{p_{new['id']}_rw}}"}]
    # Exporting needs MANAGE; importing needs a dashboard session.
    rw = await api.new_key(source.owner_token, source.id, "readwrite")
    assert_error(
        await api.http.get(f"/api/projects/{source.id}/export", headers=bearer(rw)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(await _import(api, source.admin_key, dump), 401, "AUTH_REQUIRED")


async def test_import_integrity_and_isolation(api: Api, source, control_db: asyncpg.Pool) -> None:
    dump = await _export(api, source.admin_key, source.id)
    _, other_token = await api.new_user()
    other = await api.new_project(other_token)
    other_key = await api.new_key(other_token, other, "admin")
    await _ok(await api.sql(other_key, other, "CREATE TABLE secrets (v text)"))
    await _ok(await api.sql(other_key, other, "INSERT INTO secrets VALUES ('s3cr3t')"))
    before = await _project_count(control_db)

    tampered = dump.replace(b"Ada", b"Eve", 1)
    assert_error(await _import(api, source.owner_token, tampered), 400, "IMPORT_INTEGRITY_ERROR")
    truncated = dump[: dump.rindex(b"-- fluxbase-export-end")]
    assert_error(await _import(api, source.owner_token, truncated), 400, "IMPORT_INTEGRITY_ERROR")
    assert_error(await _import(api, source.owner_token, b"SELECT 1;\n"), 400, "IMPORT_INTEGRITY_ERROR")

    def inject(sql: str) -> bytes:
        at = dump.index(b"\n--\n-- PostgreSQL database dump complete")
        return _reseal(dump[:at] + b"\n" + sql.encode() + b"\n" + dump[at:])

    for sql in (
        f"INSERT INTO p_{other}.secrets VALUES ('x');",
        f'CREATE TABLE stolen AS SELECT * FROM "p_{other}".secrets;',
        "UPDATE fluxbase.projects SET status = 'active';",
        "SELECT * FROM fluxbase.api_keys;",
        f"ALTER TABLE p_{source.id}.authors OWNER TO postgres;",
        "CREATE ROLE evil LOGIN;",
        "GRANT ALL ON SCHEMA public TO PUBLIC;",
        "COMMIT;",
        "COPY p_x.authors TO PROGRAM 'id';",
        "\\! id",
    ):
        r = await _import(api, source.owner_token, inject(sql))
        assert_error(r, 400, "IMPORT_REFUSED")

    # Dynamic SQL hides the name from the vetting; the new project's role is the isolation.
    half = other[:8]
    evil = (
        f"CREATE FUNCTION p_{source.id}.grab() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
        f"EXECUTE 'SELECT count(*) FROM p_' || '{half}' || '{other[8:]}' || '.secrets'; "
        "END $$;\n"
        f"SELECT p_{source.id}.grab();"
    )
    r = await _import(api, source.owner_token, inject(evil))
    body = assert_error(r, 400, "IMPORT_FAILED")
    assert body["error"]["details"] == "ERROR:  42501"
    assert await _project_count(control_db) == before  # the new project was removed again
    r = await _ok(await api.sql(other_key, other, "SELECT v FROM secrets"))
    assert r["result"]["rows"] == [{"v": "s3cr3t"}]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxbase", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _psql(path: Path, url: str) -> subprocess.CompletedProcess[str]:
    """Plain psql: Debian's PostgreSQL client if installed, else the embedded wheel's."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))
    psql = str(debian[0]) if debian else str(find_bin_dir() / "psql")
    return subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path), url],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_export_import_and_plain_psql(api: Api, source, stack: Stack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXBASE_")}
    env.update(FLUXBASE_URL=api.base_url, FLUXBASE_KEY=source.admin_key)
    out = tmp_path / "dump.sql"
    p = _cli("export", "--project", source.id, "-o", str(out), env=env)
    assert p.returncode == 0, p.stderr
    assert "export" in p.stderr and "MiB" in p.stderr  # progress on stderr
    assert out.read_bytes().startswith(b"-- fluxbase-export format=1")

    p = _cli("import", str(out), "--name", "from cli", "--key", source.owner_token, env=env)
    assert p.returncode == 0, p.stderr
    assert "100.0%" in p.stderr
    new_id = re.search(r"new project ([0-9a-f]{16})", p.stdout)
    assert new_id is not None, p.stdout
    key = await api.new_key(source.owner_token, new_id.group(1), "admin", rateLimitRequests=1_000_000)
    assert await _content(api, key, new_id.group(1)) == await _content(api, source.admin_key, source.id)
    p = _cli("import", str(tmp_path / "missing.sql"), "--key", source.owner_token, env=env)
    assert p.returncode == 1

    # Plain PostgreSQL, with a plain psql client (Debian's if present, else the wheel's).
    dbname = await stack.create_database()
    try:
        conn = await asyncpg.connect(stack.database_url(dbname))
        try:
            # The README's stub for dumps whose defaults or policies call auth.uid().
            await conn.execute(
                "CREATE SCHEMA auth; CREATE FUNCTION auth.uid() RETURNS text LANGUAGE sql STABLE "
                "AS $$ SELECT nullif(current_setting('fluxbase.auth_uid', true), '') $$"
            )
        finally:
            await conn.close()
        p = _psql(out, stack.database_url(dbname))
        assert p.returncode == 0, p.stderr
        conn = await asyncpg.connect(stack.database_url(dbname))
        try:
            schema = f"p_{source.id}"
            rows = await conn.fetch(f"SELECT name FROM {schema}.authors ORDER BY id")
            assert [r["name"] for r in rows] == ["Ada", "Bob 'the' builder"]
            assert await conn.fetchval(f"SELECT body FROM {schema}.posts WHERE id = 1") == TRICKY
            assert await conn.fetchval(f"SELECT {schema}.shout('x')") == "X; !"
            await conn.execute(f"ALTER SCHEMA {schema} RENAME TO app")  # the README's renaming step
            assert await conn.fetchval("SELECT count(*) FROM app.post_titles") == 2
        finally:
            await conn.close()
    finally:
        await stack.drop_database(dbname)


async def test_import_vetting_reads_sql_as_postgresql_does(api: Api, source) -> None:
    """The vetting asks PostgreSQL's parser (tenancy.statements), so comments, U& identifiers and
    spacing cannot hide a role, an owner change or the control plane from it: each is refused
    before anything runs (not merely failing later on the new project's privileges)."""
    dump = await _export(api, source.admin_key, source.id)

    def inject(sql: str) -> bytes:
        at = dump.index(b"\n--\n-- PostgreSQL database dump complete")
        return _reseal(dump[:at] + b"\n" + sql.encode() + b"\n" + dump[at:])

    for sql in (
        "CREATE /* c */ ROLE evil LOGIN;",
        f"ALTER TABLE p_{source.id}.authors OWNER /* c */ TO postgres;",
        "SET /* c */ ROLE postgres;",
        'SELECT * FROM "fluxbase" /* c */ . api_keys;',
        'SELECT * FROM U&"\\0066luxbase".api_keys;',
        "SET LOCAL\r\nSESSION AUTHORIZATION postgres;",
    ):
        r = await _import(api, source.owner_token, inject(sql))
        body = assert_error(r, 400, "IMPORT_REFUSED")
        assert "statementIndex" in body["error"], (sql, body)
