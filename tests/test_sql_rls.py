"""Row Level Security identity: auth.uid()/jwt()/role() and the reference doc's four patterns."""

from __future__ import annotations

from support import Api


async def _keys(api: Api, project) -> tuple[str, str]:
    return (
        await api.new_key(project.owner_token, project.id, "readwrite"),
        await api.new_key(project.owner_token, project.id, "read"),
    )


async def _ok(
    api: Api, key: str, pid: str, q: str, params=None, uid: str | None = None, header: bool = False
):
    extra = {}
    if uid is not None and not header:
        extra["authUid"] = uid
    if header and uid is not None:
        r = await api.http.post(
            "/api/execute-sql",
            json={"projectId": pid, "query": q, "params": params or []},
            headers={"Authorization": f"Bearer {key}", "X-Fluxbase-Auth-Uid": uid},
        )
    else:
        r = await api.sql(key, pid, q, params, **extra)
    body = r.json()
    return body


async def test_identity_functions(api: Api, project) -> None:
    rw, _ = await _keys(api, project)
    body = await _ok(
        api, rw, project.id, "SELECT auth.uid() AS uid, auth.role() AS role, auth.jwt() AS jwt", uid="user-42"
    )
    row = body["result"]["rows"][0]
    assert row["uid"] == "user-42" and row["role"] == "readwrite"
    assert row["jwt"]["sub"] == "user-42" and row["jwt"]["project_id"] == project.id
    body = await _ok(api, rw, project.id, "SELECT auth.uid() AS uid", uid="hdr-user", header=True)
    assert body["result"]["rows"] == [{"uid": "hdr-user"}]
    body = await _ok(api, rw, project.id, "SELECT auth.uid() AS uid")
    assert body["result"]["rows"] == [{"uid": None}]
    # Quotes and backslashes in the uid are data, not SQL.
    body = await _ok(api, rw, project.id, "SELECT auth.uid() AS uid", uid="o'brien\\'); DROP TABLE x; --")
    assert body["result"]["rows"] == [{"uid": "o'brien\\'); DROP TABLE x; --"}]


async def test_owner_rows_pattern(api: Api, project) -> None:
    rw, ro = await _keys(api, project)
    admin = project.admin_key
    for q in (
        "CREATE TABLE posts (id serial PRIMARY KEY, user_id text, body text)",
        "INSERT INTO posts (user_id, body) VALUES ('u1', 'a'), ('u1', 'b'), ('u2', 'c')",
        "ALTER TABLE posts ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own ON posts USING (user_id = auth.uid()) WITH CHECK (user_id = auth.uid())",
    ):
        assert (await _ok(api, admin, project.id, q))["success"], q
    got = await _ok(api, ro, project.id, "SELECT body FROM posts ORDER BY body", uid="u1")
    assert [r["body"] for r in got["result"]["rows"]] == ["a", "b"]
    got = await _ok(api, ro, project.id, "SELECT body FROM posts", uid="u2")
    assert [r["body"] for r in got["result"]["rows"]] == ["c"]
    got = await _ok(api, ro, project.id, "SELECT body FROM posts")
    assert got["success"] and got["result"]["rows"] == []  # silently filtered, no error
    # Writes are checked too.
    bad = await _ok(api, rw, project.id, "INSERT INTO posts (user_id, body) VALUES ('u2', 'spoof')", uid="u1")
    assert bad["success"] is False and bad["error"]["details"] == "ERROR:  42501"
    upd = await _ok(api, rw, project.id, "UPDATE posts SET body = 'x'", uid="u2")
    assert upd["result"]["rowCount"] == 1
    # Admin keys own the table and bypass RLS...
    got = await _ok(api, admin, project.id, "SELECT count(*) AS n FROM posts")
    assert got["result"]["rows"] == [{"n": 3}]


async def test_org_scoped_pattern(api: Api, project) -> None:
    _, ro = await _keys(api, project)
    for q in (
        "CREATE TABLE docs (id serial, org_id text, title text)",
        "INSERT INTO docs (org_id, title) VALUES ('acme', 'plan'), ('acme', 'memo'), ('globex', 'x')",
        "ALTER TABLE docs ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY org ON docs USING (org_id = auth.uid())",
    ):
        assert (await _ok(api, project.admin_key, project.id, q))["success"], q
    got = await _ok(api, ro, project.id, "SELECT title FROM docs ORDER BY title", uid="acme", header=True)
    assert [r["title"] for r in got["result"]["rows"]] == ["memo", "plan"]


async def test_public_read_owner_write_pattern(api: Api, project) -> None:
    rw, ro = await _keys(api, project)
    for q in (
        "CREATE TABLE articles (id serial PRIMARY KEY, author_id text, title text)",
        "INSERT INTO articles (author_id, title) VALUES ('alice', 'A1'), ('bob', 'B1')",
        "ALTER TABLE articles ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY read_all ON articles FOR SELECT USING (true)",
        "CREATE POLICY ins_own ON articles FOR INSERT WITH CHECK (author_id = auth.uid())",
        "CREATE POLICY upd_own ON articles FOR UPDATE USING (author_id = auth.uid())",
        "CREATE POLICY del_own ON articles FOR DELETE USING (author_id = auth.uid())",
    ):
        assert (await _ok(api, project.admin_key, project.id, q))["success"], q
    got = await _ok(api, ro, project.id, "SELECT title FROM articles ORDER BY title")
    assert [r["title"] for r in got["result"]["rows"]] == ["A1", "B1"]
    upd = await _ok(api, rw, project.id, "UPDATE articles SET title = 'hacked'", uid="alice")
    assert upd["result"]["rowCount"] == 1
    got = await _ok(api, ro, project.id, "SELECT title FROM articles WHERE author_id = 'bob'")
    assert got["result"]["rows"] == [{"title": "B1"}]
    ins = await _ok(
        api, rw, project.id, "INSERT INTO articles (author_id, title) VALUES ('bob', 'fake')", uid="alice"
    )
    assert ins["success"] is False
    ins = await _ok(
        api, rw, project.id, "INSERT INTO articles (author_id, title) VALUES ('alice', 'A2')", uid="alice"
    )
    assert ins["success"] is True


async def test_full_lockdown_and_force(api: Api, project) -> None:
    rw, ro = await _keys(api, project)
    admin = project.admin_key
    for q in (
        "CREATE TABLE audit (id serial, what text)",
        "INSERT INTO audit (what) VALUES ('login')",
        "ALTER TABLE audit ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY lock ON audit USING (false)",
    ):
        assert (await _ok(api, admin, project.id, q))["success"], q
    for key in (rw, ro):
        got = await _ok(api, key, project.id, "SELECT * FROM audit", uid="anyone")
        assert got["success"] and got["result"]["rows"] == []
    assert (await _ok(api, admin, project.id, "SELECT count(*) AS n FROM audit"))["result"]["rows"] == [
        {"n": 1}
    ]
    # FORCE ROW LEVEL SECURITY binds the owner (admin keys) too, as the doc's troubleshooting says.
    assert (await _ok(api, admin, project.id, "ALTER TABLE audit FORCE ROW LEVEL SECURITY"))["success"]
    assert (await _ok(api, admin, project.id, "SELECT count(*) AS n FROM audit"))["result"]["rows"] == [
        {"n": 0}
    ]
    assert (await _ok(api, admin, project.id, "ALTER TABLE audit NO FORCE ROW LEVEL SECURITY"))["success"]
    assert (await _ok(api, admin, project.id, "SELECT count(*) AS n FROM audit"))["result"]["rows"] == [
        {"n": 1}
    ]
