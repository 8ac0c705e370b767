"""Projects and API keys through the real HTTP API against real PostgreSQL."""

from __future__ import annotations

import re

from fluxbase.db.quoting import quote_ident
from fluxbase.security import apikeys
from support import Api, assert_clean, assert_error, bearer


async def test_create_list_get_delete_project(api: Api, control_db, instance_admin) -> None:
    _, token = await api.new_user()
    r = await api.http.post("/api/projects", json={"name": "Shop"}, headers=bearer(token))
    assert r.status_code == 201
    project = r.json()["project"]
    assert re.fullmatch(r"[0-9a-f]{16}", project["id"])
    assert project["name"] == "Shop" and project["role"] == "admin"
    pid = project["id"]
    # Schema and the three key roles exist, owned as DESIGN.md says, plus the realtime RLS checker.
    owner = await control_db.fetchval(
        "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = $1", f"p_{pid}"
    )
    assert owner == f"p_{pid}_admin"
    roles = await control_db.fetch(
        "SELECT rolname, rolsuper, rolcanlogin FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%"
    )
    assert sorted(r["rolname"] for r in roles) == sorted(f"p_{pid}_{s}" for s in ("admin", "ro", "rw", "rt"))
    assert all(r["rolcanlogin"] and not r["rolsuper"] for r in roles)
    # The checker is the read role plus set_config; no other role may call the check functions.
    member = await control_db.fetchval("SELECT pg_has_role($1, $2, 'USAGE')", f"p_{pid}_rt", f"p_{pid}_ro")
    assert member is True
    for kind, may in (("ro", False), ("rw", False), ("admin", False), ("rt", True)):
        for fn in (
            "pg_catalog.set_config(text, text, boolean)",
            "fluxbase_guard.visible_rows_as(text, text, text[], text[], text[], text[], text[])",
        ):
            if fn.startswith("pg_catalog") and kind in ("admin", "rt"):
                continue  # admin keeps set_config (sql/0007)
            ok = await control_db.fetchval(
                "SELECT has_function_privilege($1, $2, 'EXECUTE')", f"p_{pid}_{kind}", fn
            )
            assert ok is may, (kind, fn)

    listed = (await api.http.get("/api/projects", headers=bearer(token))).json()["projects"]
    assert [p["id"] for p in listed] == [pid]
    got = await api.http.get(f"/api/projects/{pid}", headers=bearer(token))
    assert got.status_code == 200 and got.json()["project"]["name"] == "Shop"

    key = await api.new_key(token, pid)
    r = await api.http.delete(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code == 200
    assert await control_db.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", f"p_{pid}") == 0
    assert await control_db.fetchval("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%") == 0
    assert await control_db.fetchval("SELECT count(*) FROM fluxbase.api_keys WHERE project_id = $1", pid) == 0
    assert_error(await api.http.get(f"/api/projects/{pid}", headers=bearer(token)), 404, "PROJECT_NOT_FOUND")
    assert_error(await api.http.get(f"/api/projects/{pid}", headers=bearer(key)), 401, "AUTH_REQUIRED")


async def test_project_errors(api: Api, project) -> None:
    _, stranger = await api.new_user()
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(stranger)), 403, "SCOPE_MISMATCH"
    )
    assert_error(
        await api.http.get("/api/projects/ffffffffffffffff", headers=bearer(stranger)),
        404,
        "PROJECT_NOT_FOUND",
    )
    assert_error(
        await api.http.get("/api/projects/not-an-id", headers=bearer(stranger)), 404, "PROJECT_NOT_FOUND"
    )
    assert_error(
        await api.http.post("/api/projects", json={"name": ""}, headers=bearer(stranger)),
        400,
        "VALIDATION_ERROR",
    )
    assert_error(await api.http.post("/api/projects", json={"name": "x"}), 401, "AUTH_REQUIRED")
    # An API key cannot delete the project (dashboard admins only).
    assert_error(
        await api.http.delete(f"/api/projects/{project.id}", headers=bearer(project.admin_key)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(
        await api.http.delete(f"/api/projects/{project.id}", headers=bearer(stranger)), 403, "SCOPE_MISMATCH"
    )


async def test_unknown_route_and_method(api: Api) -> None:
    assert_error(await api.http.get("/api/definitely-not-here"), 404, "NOT_FOUND")
    assert_error(await api.http.put("/api/auth/login", json={}), 405, "METHOD_NOT_ALLOWED")


async def test_key_lifecycle(api: Api, project) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "backend", "scope": "readwrite", "expiresInDays": 30},
        headers=bearer(project.owner_token),
    )
    assert r.status_code == 201
    body = r.json()
    raw, meta = body["key"], body["apiKey"]
    assert raw.startswith("flx_live_") and apikeys.well_formed(raw)
    assert meta["scope"] == "readwrite" and meta["expiresAt"] and meta["revokedAt"] is None
    assert raw.startswith(meta["prefix"]) and len(meta["prefix"]) < 20

    listed = await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(project.owner_token))
    assert listed.status_code == 200
    assert_clean(listed, raw, raw[len("flx_live_") :])
    entry = next(k for k in listed.json()["apiKeys"] if k["id"] == meta["id"])
    assert set(entry) >= {"prefix", "scope", "createdAt", "lastUsedAt", "expiresAt", "revokedAt"}

    # The key works; lastUsedAt gets set.
    assert (await api.http.get(f"/api/projects/{project.id}", headers=bearer(raw))).status_code == 200
    listed = await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(project.owner_token))
    assert next(k for k in listed.json()["apiKeys"] if k["id"] == meta["id"])["lastUsedAt"] is not None

    # Rotation: new secret works, old one dies at once.
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys/{meta['id']}/rotate", headers=bearer(project.owner_token)
    )
    assert r.status_code == 200
    new_raw = r.json()["key"]
    assert new_raw != raw and r.json()["apiKey"]["id"] == meta["id"]
    assert_error(await api.http.get(f"/api/projects/{project.id}", headers=bearer(raw)), 401, "AUTH_REQUIRED")
    assert (await api.http.get(f"/api/projects/{project.id}", headers=bearer(new_raw))).status_code == 200

    # Revocation: refused at once.
    r = await api.http.delete(
        f"/api/projects/{project.id}/api-keys/{meta['id']}", headers=bearer(project.owner_token)
    )
    assert r.status_code == 200 and r.json()["apiKey"]["revokedAt"]
    body = assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(new_raw)), 401, "AUTH_REQUIRED"
    )
    assert "revoked" in body["error"]["message"]


async def test_key_checksum_rejects_typos_without_lookup(api: Api, project) -> None:
    key = project.admin_key
    typo = key[:-8] + ("A" if key[-8] != "A" else "B") + key[-7:]
    assert not apikeys.well_formed(typo)
    body = assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(typo)), 401, "AUTH_REQUIRED"
    )
    assert "checksum" in body["error"]["message"]
    # A well-formed key that was never issued is refused too.
    assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(apikeys.generate())),
        401,
        "AUTH_REQUIRED",
    )


async def test_expired_key_is_refused(api: Api, project, control_db) -> None:
    key = await api.new_key(project.owner_token, project.id, "read", expiresInDays=1)
    assert (await api.http.get(f"/api/projects/{project.id}", headers=bearer(key))).status_code == 200
    await control_db.execute(
        "UPDATE fluxbase.api_keys SET expires_at = now() - interval '1 second' WHERE key_hash = $1",
        apikeys.hash_key(key),
    )
    body = assert_error(
        await api.http.get(f"/api/projects/{project.id}", headers=bearer(key)), 401, "AUTH_REQUIRED"
    )
    assert "expired" in body["error"]["message"]


async def test_key_scopes_for_key_management(api: Api, project) -> None:
    # An admin key may mint read/readwrite keys for its own project, not admin keys.
    r = await api.http.post(
        f"/api/projects/{project.id}/api-keys",
        json={"name": "ro", "scope": "read"},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 201
    ro_key = r.json()["key"]
    assert_error(
        await api.http.post(
            f"/api/projects/{project.id}/api-keys",
            json={"name": "a", "scope": "admin"},
            headers=bearer(project.admin_key),
        ),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    # A read key manages nothing.
    assert_error(
        await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(ro_key)),
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert_error(
        await api.http.post(
            f"/api/projects/{project.id}/api-keys",
            json={"name": "x", "scope": "nope"},
            headers=bearer(project.owner_token),
        ),
        400,
        "VALIDATION_ERROR",
    )
    # A key of project A naming project B.
    _, other_token = await api.new_user()
    other = await api.new_project(other_token)
    assert_error(
        await api.http.get(f"/api/projects/{other}/api-keys", headers=bearer(project.admin_key)),
        403,
        "SCOPE_MISMATCH",
    )
    assert_error(
        await api.http.get("/api/projects/0123456789abcdef/api-keys", headers=bearer(project.admin_key)),
        404,
        "PROJECT_NOT_FOUND",
    )
    # Keys cannot act as dashboard sessions.
    assert_error(await api.http.get("/api/auth/me", headers=bearer(project.admin_key)), 401, "AUTH_REQUIRED")
    assert_error(
        await api.http.get(
            f"/api/projects/{project.id}/api-keys/nope/rotate", headers=bearer(project.owner_token)
        ),
        405,
        "METHOD_NOT_ALLOWED",
    )
    assert_error(
        await api.http.post(
            f"/api/projects/{project.id}/api-keys/key_0000/rotate", headers=bearer(project.owner_token)
        ),
        404,
        "NOT_FOUND",
    )


async def test_allowed_origins_pin_a_key(api: Api, project) -> None:
    key = await api.new_key(
        project.owner_token, project.id, "read", allowedOrigins=["https://app.example.com"]
    )
    url = f"/api/projects/{project.id}"
    ok = await api.http.get(url, headers={**bearer(key), "Origin": "https://app.example.com"})
    assert ok.status_code == 200
    assert_error(
        await api.http.get(url, headers={**bearer(key), "Origin": "https://evil.example.com"}),
        403,
        "ORIGIN_NOT_ALLOWED",
    )
    assert_error(await api.http.get(url, headers=bearer(key)), 403, "ORIGIN_NOT_ALLOWED")
    assert_error(
        await api.http.post(
            f"/api/projects/{project.id}/api-keys",
            json={"name": "x", "scope": "read", "allowedOrigins": ["javascript:alert(1)"]},
            headers=bearer(project.owner_token),
        ),
        400,
        "VALIDATION_ERROR",
    )


async def test_migration_0008_gives_existing_projects_a_checker_role(api: Api, control_db) -> None:
    """Projects created before 0008 get their RLS checker role from the migration's DO block.

    0008's own check functions are gone since sql/0022 (unused since 0015): the file is replayed
    whole (it creates them again), and 0022's drop afterwards."""
    from fluxbase.db.migrate import sql_dir
    from fluxbase.security.roles import CHECKER_FUNCTIONS
    from fluxbase.tenancy.buckets import bucket_of

    _, token = await api.new_user()
    pid = await api.new_project(token)
    rt, ro = f"p_{pid}_rt", f"p_{pid}_ro"
    async with control_db.acquire() as conn:
        # As before 0008. The project's provisioner role granted its privileges (tenancy/buckets.py):
        # only it can revoke them.
        db = quote_ident(await conn.fetchval("SELECT current_database()"))
        await conn.execute(
            f'SET ROLE "{bucket_of(pid)}"; REVOKE ALL ON DATABASE {db} FROM "{rt}"; '
            "REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean), "
            f'{CHECKER_FUNCTIONS} FROM "{rt}"; REVOKE "p_{pid}_rw" FROM "{rt}"; '
            "RESET ROLE"
        )
        await conn.execute(f'DROP OWNED BY "{rt}"; DROP ROLE "{rt}"')
        text = (sql_dir() / "0008_rls.sql").read_text()
        await conn.execute(text)
        row = await conn.fetchrow(
            "SELECT rolcanlogin, rolinherit, rolsuper, rolconnlimit FROM pg_roles WHERE rolname = $1", rt
        )
        assert row is not None and row["rolcanlogin"] and row["rolinherit"] and not row["rolsuper"]
        assert row["rolconnlimit"] == await conn.fetchval(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1", ro
        )
        assert await conn.fetchval("SELECT pg_has_role($1, $2, 'USAGE')", rt, ro)
        for fn in (
            "pg_catalog.set_config(text, text, boolean)",
            "fluxbase_guard.visible_rows(text, text[], text[], text[], text[], text[])",
        ):
            assert await conn.fetchval("SELECT has_function_privilege($1, $2, 'EXECUTE')", rt, fn)
        settings = await conn.fetchval(
            "SELECT setconfig FROM pg_db_role_setting WHERE setrole = $1::regrole AND setdatabase = 0", rt
        )
        # The read role's search_path, copied (with the extension schemas the read role has had
        # since sql/0023, which 0008 ran before in a real upgrade; db/extensions.py re-sets them).
        assert any(s.startswith("search_path=") and f"p_{pid}" in s for s in settings) and any(
            s.startswith("statement_timeout=") for s in settings
        )
        # Idempotent: a second run changes nothing and does not fail.
        await conn.execute(text[text.index("DO $$") :])
        drop = (sql_dir() / "0022_caps_outbox_bytes.sql").read_text()
        for stmt in re.findall(r"^DROP FUNCTION IF EXISTS fluxbase_guard\.[^;]*;", drop, re.M):
            await conn.execute(stmt)
        assert not await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('select_policies', 'visible_rows')"
        )
