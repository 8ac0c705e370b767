"""Hostile review 4: the web dashboard, /metrics and the request log, attacked through the public
HTTP API of a real running server, with the source in hand.

Each test asserts the SECURE behaviour. Tests of holes that are still open are marked
`xfail(strict=True)`: they start passing (and so fail the suite) when the hole is closed, and
the mark is removed with the fix. The dashboard session cookie is the API's own session token
(services.accounts), so a test "browser" is an httpx client carrying it.
"""

from __future__ import annotations

import html
import json
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpx
import pytest

from dashboard_support import add_member
from support import Api, bearer
from test_attack_review1 import sql

CSRF_RE = re.compile(r'name="_csrf" value="([^"]+)"')


def browser(instance: Any, session: str | None = None) -> httpx.AsyncClient:
    """A cookie-keeping client, signed in to the dashboard with `session` (an API session token)."""
    client = httpx.AsyncClient(base_url=instance.url, timeout=30, follow_redirects=False)
    if session is not None:
        client.cookies.set("fluxbase_session", session, path="/dashboard")
    return client


async def page_csrf(client: httpx.AsyncClient, path: str) -> tuple[str, str]:
    """The page's text and its form's CSRF token (setting this browser's CSRF cookie)."""
    r = await client.get(path)
    assert r.status_code == 200, r.text
    m = CSRF_RE.search(r.text)
    assert m, r.text
    return r.text, m.group(1)


async def key_id(api: Api, project: Any, name: str) -> str:
    r = await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(project.owner_token))
    return str(next(k["id"] for k in r.json()["apiKeys"] if k["name"] == name))


async def key_works(api: Api, key: str, pid: str) -> bool:
    return bool((await sql(api, key, pid, "SELECT 1 AS one")).get("success"))


# -- 1. CSRF: the token is bound to a cookie any browser can be given, not to the session ---------


async def test_a_csrf_pair_from_another_browser_is_refused_for_a_signed_in_member(
    api: Api, instance: Any, project: Any
) -> None:
    async with browser(instance) as attacker:
        _, token = await page_csrf(attacker, "/dashboard/sign-in")
        basis = attacker.cookies.get("fluxbase_csrf")
    assert basis
    async with browser(instance, project.owner_token) as victim:
        victim.cookies.set("fluxbase_csrf", basis, path="/dashboard")  # the tossed cookie
        r = await victim.post("/dashboard/projects", data={"_csrf": token, "name": "forged by csrf"})
    projects = (await api.http.get("/api/projects", headers=bearer(project.owner_token))).json()["projects"]
    assert "forged by csrf" not in [p["name"] for p in projects], r.status_code
    assert r.status_code == 403


async def test_sign_in_replaces_a_tossed_csrf_cookie(api: Api, instance: Any) -> None:
    """Session fixation of the CSRF basis: a cookie planted before sign-in does not survive it."""
    user, _ = await api.new_user()
    async with browser(instance) as b:
        _, token = await page_csrf(b, "/dashboard/sign-in")
        planted = b.cookies.get("fluxbase_csrf")
        r = await b.post(
            "/dashboard/sign-in", data={"_csrf": token, "email": user["email"], "password": user["password"]}
        )
        assert r.status_code == 303, r.text
        assert "fluxbase_session" in r.cookies
        assert r.cookies.get("fluxbase_csrf") not in (None, planted)


async def test_a_session_token_in_the_cookie_of_a_state_change_needs_the_csrf_token(
    api: Api, instance: Any, project: Any
) -> None:
    """htmx headers do not stand in for the token (HX-Request, Origin of this site, no body)."""
    async with browser(instance, project.owner_token) as b:
        await page_csrf(b, f"/dashboard/p/{project.id}/keys")
        r = await b.post(
            f"/dashboard/p/{project.id}/keys",
            data={"name": "htmx forged", "scope": "admin"},
            headers={"HX-Request": "true", "Origin": instance.url, "Referer": instance.url + "/dashboard/"},
        )
        assert r.status_code == 403 and "CSRF_FAILED" in r.text
        # A GET to a POST-only action changes nothing.
        kid = await key_id(api, project, "admin key")
        r = await b.get(f"/dashboard/p/{project.id}/keys/{kid}/revoke")
        assert r.status_code in (404, 405)
    assert await key_works(api, project.admin_key, project.id)


async def test_the_api_does_not_honour_the_dashboard_cookie(api: Api, instance: Any, project: Any) -> None:
    """The session cookie is the API's session token: the API must take it from Authorization only,
    or any cross-site form could post to /api/* with the member's cookie."""
    async with browser(instance, project.owner_token) as b:
        b.cookies.set("fluxbase_session", project.owner_token, path="/")
        r = await b.post("/api/projects", json={"name": "via cookie"})
        assert r.status_code == 401, r.text
        r = await b.get("/api/projects")
        assert r.status_code == 401, r.text


# -- 2. form actions built from tenant values: Jinja's urlencode keeps "/" ------------------------


async def test_a_row_key_cannot_point_the_edit_form_at_another_action(
    api: Api, instance: Any, project: Any
) -> None:
    pid = project.id
    victim = await api.new_key(project.owner_token, pid, "read", rateLimitRequests=1_000_000)
    kid = await key_id(api, project, "read key")
    planted = f"../../../keys/{kid}/revoke"
    for q in (
        "CREATE TABLE notes (id text PRIMARY KEY, body text)",
        f"INSERT INTO notes VALUES ('{planted}', 'hello')",
    ):
        assert (await sql(api, project.admin_key, pid, q))["success"]
    async with browser(instance, project.owner_token) as b:
        page_url = f"/dashboard/p/{pid}/tables/notes?edit={quote(planted, safe='')}"
        text, csrf = await page_csrf(b, page_url)
        actions = [html.unescape(a) for a in re.findall(r'action="([^"]*/rows/[^"]*)"', text)]
        assert actions, text
        rows = f"/dashboard/p/{pid}/tables/notes/rows/"
        resolved = [urlsplit(urljoin(instance.url + page_url, a)).path for a in actions]
        # What the browser does on "Save row": post the form to its resolved action.
        edit = next(p for p, a in zip(resolved, actions, strict=True) if not a.endswith("/delete"))
        await b.post(edit, data={"_csrf": csrf, "set:body": "changed", "old:body": "hello"})
        assert await key_works(api, victim, pid)
        assert all(p.startswith(rows) for p in resolved), resolved


# -- 3. XSS: tenant-controlled names and values are escaped in every page -------------------------

XSS = "<img src=x onerror=alert(1)>"


async def test_tenant_names_and_values_are_escaped_in_dashboard_pages(
    api: Api, instance: Any, project: Any
) -> None:
    pid = project.id
    table, column = f"t{XSS}", f"c{XSS}"
    for q in (
        f'CREATE TABLE "{table}" (id int PRIMARY KEY, "{column}" text)',
        f"""INSERT INTO "{table}" VALUES (1, '{XSS}')""",
        f"""CREATE POLICY "p{XSS}" ON "{table}" USING (true)""",
    ):
        assert (await sql(api, project.admin_key, pid, q))["success"], q
    async with browser(instance, project.owner_token) as b:
        pages = [
            f"/dashboard/p/{pid}/tables",
            f"/dashboard/p/{pid}/tables/{quote(table, safe='')}",
            f"/dashboard/p/{pid}/tables/{quote(table, safe='')}?edit=1",
            f"/dashboard/p/{pid}/tables/{quote(table, safe='')}?filter={quote(XSS)}",
            f"/dashboard/p/{pid}/rls",
            f"/dashboard/p/{pid}/nope{quote(XSS)}",
        ]
        for path in pages:
            r = await b.get(path)
            assert r.status_code in (200, 400, 404), (path, r.status_code)
            assert XSS not in r.text, path
            assert "<img" not in r.text, path
        _, csrf = await page_csrf(b, f"/dashboard/p/{pid}/sql")
        for q in (f"SELECT '{XSS}' AS \"{XSS}\"", f'SELECT * FROM "{XSS}"'):  # a grid, an error
            r = await b.post(f"/dashboard/p/{pid}/sql", data={"_csrf": csrf, "query": q})
            assert "<img" not in r.text, r.text


async def test_reset_and_invite_links_neither_reflect_script_nor_redirect_off_site(
    api: Api, instance: Any, project: Any
) -> None:
    token = f'"><script>alert(1)</script>{secrets.token_hex(4)}'
    async with browser(instance) as b:
        r = await b.get("/dashboard/reset-password", params={"token": token})
        assert r.status_code == 200
        assert "<script>alert" not in r.text
        # The token in this URL never leaves in a Referer, nor stays in a cache.
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        for path in ("/dashboard/sign-in", "/dashboard/invites"):
            r = await b.get(path, params={"next": "https://evil.example/", "redirect": "//evil.example"})
            assert "evil.example" not in r.headers.get("location", ""), path
    async with browser(instance, project.owner_token) as b:
        r = await b.get("/dashboard/invites", params={"next": "//evil.example"})
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/"
        r = await b.get("//evil.example/dashboard/")
        assert "evil.example" not in r.headers.get("location", "")


# -- 4. a member of one project, or a viewer, reaches no action -----------------------------------


async def test_another_projects_member_and_a_viewer_reach_no_dashboard_action(
    api: Api, instance: Any, project: Any
) -> None:
    _, outsider = await api.new_user()
    await api.new_project(outsider, "mine")
    kid = await key_id(api, project, "admin key")
    async with browser(instance, outsider) as b:
        _, csrf = await page_csrf(b, "/dashboard/")
        for action, form in (
            (f"keys/{kid}/revoke", {}),
            ("keys", {"name": "x", "scope": "admin"}),
            ("read-only", {"read_only": "true"}),
            ("sql", {"query": "CREATE TABLE pwned (id int)"}),
            ("delete", {"confirm": "test project"}),
        ):
            r = await b.post(f"/dashboard/p/{project.id}/{action}", data={"_csrf": csrf, **form})
            assert r.status_code in (403, 404), (action, r.status_code)
        r = await b.get(f"/dashboard/p/{project.id}/export")
        assert r.status_code in (403, 404)
    assert await key_works(api, project.admin_key, project.id)
    # A viewer: "run as end user" never raises the member's read scope, with or without a token.
    viewer, viewer_token = await api.new_user()
    await add_member(api, project.owner_token, project.id, viewer, viewer_token, "viewer")
    async with browser(instance, viewer_token) as b:
        _, csrf = await page_csrf(b, f"/dashboard/p/{project.id}/sql")
        for extra in ({}, {"as_user": "on", "auth_uid": "u1"}):
            r = await b.post(
                f"/dashboard/p/{project.id}/sql",
                data={"_csrf": csrf, "query": "CREATE TABLE pwned (id int)", **extra},
            )
            assert r.status_code == 403 or "data-sql-error" in r.text, r.text
        r = await b.post(
            f"/dashboard/p/{project.id}/keys", data={"_csrf": csrf, "name": "v", "scope": "read"}
        )
        assert r.status_code == 403
    assert await key_works(api, project.admin_key, project.id)
    probe = "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'pwned'"
    assert (await sql(api, project.admin_key, project.id, probe))["result"]["rows"] == [{"n": 0}]


# -- 5. /metrics and the request log ----------------------------------------------------------------


async def test_metrics_refuses_forwarded_requests_and_routes_do_not_blow_up_labels(
    api: Api, instance: Any
) -> None:
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        r = await api.http.get("/metrics", headers={header: "127.0.0.1"})
        assert r.status_code == 401, header
    for i in range(20):
        await api.http.get(f"/api/no-such-route-{secrets.token_hex(8)}-{i}")
        await api.http.request("PROPFIND" if i % 2 else f"X{i}", "/api/projects")
    body = (await api.http.get("/metrics")).text
    assert "no-such-route" not in body
    methods = set(re.findall(r'method="([^"]+)"', body))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}, methods


async def test_a_request_id_with_control_characters_or_overlong_is_replaced(api: Api, instance: Any) -> None:
    for forged in ("a\r\nX-Injected: 1", "x" * 500, "tab\there", "esc\x1b[31mred"):
        try:
            r = await api.http.get("/api/health", headers={"X-Request-Id": forged})
        except httpx.LocalProtocolError:
            continue  # the client refuses to send it: nothing to check
        if r.status_code == 400 and "x-request-id" not in r.headers:
            continue  # the HTTP server refused the header before the app saw it
        assert r.headers["x-request-id"] != forged
        assert r.headers["x-request-id"].startswith("req_")
        assert "x-injected" not in r.headers


# -- 6. extensions: DROP's dependency check ---------------------------------------------------------


@pytest.mark.parametrize(
    "dependent",
    [
        pytest.param("CREATE TABLE tok (id int, t text DEFAULT soundex('x'))"),
        pytest.param("CREATE VIEW sounds AS SELECT soundex('a') AS s"),
        "CREATE TABLE checked (v text CHECK (levenshtein(v, 'x') < 100))",
        pytest.param("CREATE TABLE typed (v text, s text GENERATED ALWAYS AS (soundex(v)) STORED)"),
    ],
    ids=["column-default", "view", "check-constraint", "generated-column"],
)
async def test_drop_extension_is_refused_while_a_project_object_uses_it(
    api: Api, project: Any, dependent: str
) -> None:
    key, pid = project.admin_key, project.id
    assert (await sql(api, key, pid, "CREATE EXTENSION fuzzystrmatch"))["success"]
    body = await sql(api, key, pid, dependent)
    assert body["success"], body
    dropped = await sql(api, key, pid, "DROP EXTENSION fuzzystrmatch")
    assert not dropped["success"], "DROP EXTENSION left a project object that calls it"
    assert "2BP01" in str(dropped), dropped
    used = "SELECT * FROM sounds" if "VIEW" in dependent else "SELECT 1"
    assert (await sql(api, key, pid, used))["success"]


# -- 7. first hour: a hostile checkout's .fluxbase/dev-env.json -------------------------------------


def test_a_dev_env_file_from_a_checkout_is_not_trusted(tmp_path: Path) -> None:
    from fluxbase.devstack import discover

    dot = tmp_path / ".fluxbase"
    dot.mkdir()
    hostile = {
        "FLUXBASE_DATABASE_URL": "postgresql://u:p@attacker.invalid/x",
        "FLUXBASE_SECRET_KEY": "k" * 40,
    }
    for name, body in (("dev-env.json", {"pid": 1, "env": hostile}), ("dev-credentials.json", {})):
        (dot / name).write_text(json.dumps(body))
        (dot / name).chmod(0o644)
    (tmp_path / "src").mkdir()
    stack = discover.find({}, required=False, cwd=tmp_path / "src")
    assert stack is None or stack.env.get("FLUXBASE_DATABASE_URL") != hostile["FLUXBASE_DATABASE_URL"]


def test_a_dev_env_file_of_a_dead_stack_is_ignored(tmp_path: Path) -> None:
    from fluxbase.devstack import discover

    dot = tmp_path / ".fluxbase"
    dot.mkdir()
    for name, body in (
        ("dev-env.json", {"pid": 2**22 + 12345, "env": {"X": "y"}}),
        ("dev-credentials.json", {}),
    ):
        (dot / name).write_text(json.dumps(body))
        (dot / name).chmod(0o600)
    assert discover.find({}, required=False, cwd=tmp_path) is None
    for pid in ("1", -1, 0):
        (dot / "dev-env.json").write_text(json.dumps({"pid": pid, "env": {}}))
        assert discover.find({}, required=False, cwd=tmp_path) is None, pid


# -- 8. X-RateLimit-* tell a caller its own key's state only ----------------------------------------


async def test_rate_limit_headers_show_only_the_callers_own_key(api: Api, project: Any) -> None:
    pid = project.id
    busy = await api.new_key(project.owner_token, pid, "read", rateLimitRequests=50)
    quiet = await api.new_key(project.owner_token, pid, "readwrite", rateLimitRequests=50)
    for _ in range(10):
        await api.sql(busy, pid, "SELECT 1")
    r = await api.sql(quiet, pid, "SELECT 1")
    assert r.headers["x-ratelimit-limit"] == "50"
    assert r.headers["x-ratelimit-remaining"] == "49", r.headers
    bad = await api.http.post(
        "/api/execute-sql",
        json={"projectId": pid, "query": "SELECT 1"},
        headers=bearer("flx_live_" + "x" * 52),
    )
    assert bad.status_code == 401
    assert "x-ratelimit-remaining" not in bad.headers
