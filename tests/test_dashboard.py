"""The dashboard in a real Chromium against the real stack: one test per screen's main flow,
plus its security: session cookie, CSRF refusal, CSP on every page, a key shown once, viewers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Instance, ProjectCtx
from dashboard_support import PASSWORD, Console, add_member, launch, needs_chromium, sign_in
from fluxbase.devstack.procs import free_port
from support import Api, bearer, random_ip, run_service

pytestmark = needs_chromium


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async for b in launch():
        yield b


@pytest.fixture
async def context(browser: Any) -> AsyncIterator[Any]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    yield ctx
    await ctx.close()


@pytest.fixture
async def page(context: Any) -> Any:
    return await context.new_page()


def cookie(cookies: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [c for c in cookies if c["name"] == name]
    assert found, f"no {name} cookie in {[c['name'] for c in cookies]}"
    return found[0]


async def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_ends_the_session(
    api: Api, instance: Instance, context: Any, page: Any
) -> None:
    user, _ = await api.new_user()
    console = Console(page)
    await page.goto(instance.url + "/")
    assert page.url.endswith("/dashboard/sign-in")  # / → /dashboard/ → sign-in
    await page.get_by_label("Email").fill(user["email"])
    await page.get_by_label("Password").fill("wrong password!")
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("alert").filter(has_text="Invalid email or password").wait_for()
    await sign_in(page, instance.url, user["email"])
    await page.get_by_text("You have no projects yet").wait_for()
    session = cookie(await context.cookies(), "fluxbase_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/dashboard"
    assert await page.evaluate("document.cookie") == ""  # nothing readable by page scripts
    assert await page.evaluate("JSON.stringify(Object.keys(localStorage))") == "[]"
    token = session["value"]
    assert (await api.http.get("/api/auth/me", headers=bearer(token))).status_code == 200
    await page.get_by_role("button", name="Sign out").click()
    await page.get_by_role("heading", name="Sign in to Fluxbase").wait_for()
    # Ended server-side: the token no longer works anywhere, not just forgotten by the browser.
    assert (await api.http.get("/api/auth/me", headers=bearer(token))).status_code == 401
    await page.goto(instance.url + "/dashboard/")
    assert page.url.endswith("/dashboard/sign-in")
    assert console.errors == []


async def test_first_admin_setup_on_a_fresh_instance(spawn: Any, browser: Any) -> None:
    async with spawn() as fresh:
        ctx = await browser.new_context(extra_http_headers={"X-Forwarded-For": random_ip()})
        try:
            page = await ctx.new_page()
            console = Console(page)
            await page.goto(fresh.url + "/dashboard/")
            assert page.url.endswith("/dashboard/setup")
            await page.get_by_role("heading", name="Set up Fluxbase").wait_for()
            await page.get_by_label("Name").fill("Ada")
            await page.get_by_label("Email").fill("ada@example.com")
            await page.get_by_label("Password", exact=True).fill(PASSWORD)
            await page.get_by_label("Password again").fill(PASSWORD)
            await page.get_by_role("button", name="Create the administrator").click()
            await page.get_by_role("heading", name="Projects").wait_for()
            admin = Api(fresh.url)
            try:
                r = await admin.http.get("/api/admin/status")
                assert r.json()["adminExists"] is True
            finally:
                await admin.close()
            # Setup is a one-time page: once an admin exists it leads to sign-in.
            await page.get_by_role("button", name="Sign out").click()
            await page.goto(fresh.url + "/dashboard/setup")
            assert "Set up Fluxbase" not in await page.content()
            assert console.errors == []
        finally:
            await ctx.close()


async def test_projects_create_open_and_delete_by_typing_the_name(
    api: Api, instance: Instance, page: Any
) -> None:
    user, token = await api.new_user()
    console = Console(page)
    await sign_in(page, instance.url, user["email"])
    await page.get_by_label("Project name").fill("Dash Demo")
    await page.get_by_role("button", name="Create project").click()
    await page.get_by_role("heading", name="Dash Demo").wait_for()
    pid = (await page.locator("#project-id").text_content() or "").strip()
    r = await api.http.get(f"/api/projects/{pid}", headers=bearer(token))
    assert r.status_code == 200 and r.json()["project"]["name"] == "Dash Demo"
    await page.get_by_role("link", name="Settings").click()
    delete = page.get_by_role("button", name="Delete project")
    assert await delete.is_disabled()
    await page.get_by_label(re.compile("Type the project's name")).fill("Dash Dem")
    assert await delete.is_disabled()
    await page.get_by_label(re.compile("Type the project's name")).fill("Dash Demo")
    assert await delete.is_enabled()
    await delete.click()
    await page.get_by_role("heading", name="Projects").wait_for()
    assert (await api.http.get(f"/api/projects/{pid}", headers=bearer(token))).status_code == 404
    assert console.errors == []


async def test_project_home_shows_ids_urls_snippets_and_usage(
    instance: Instance, project: ProjectCtx, context: Any, page: Any
) -> None:
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=instance.url)
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/")
    assert (await page.locator("#project-id").text_content()) == project.id
    assert (await page.locator("#api-url").text_content() or "").startswith("http://127.0.0.1:")
    assert project.id in (await page.locator("#snippet-curl").text_content() or "")
    assert project.id in (await page.locator("#snippet-js").text_content() or "")
    await page.get_by_role("button", name="Copy Project id").click()
    assert await page.evaluate("navigator.clipboard.readText()") == project.id
    await page.locator("#u-st").wait_for()
    assert console.errors == []


async def test_api_key_is_shown_once_then_rotated_and_revoked(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/keys")
    await page.get_by_label("Name").fill("server key")
    await page.get_by_label("Scope").select_option("readwrite")
    await page.get_by_label(re.compile("Expires after")).fill("30")
    await page.get_by_label(re.compile("Allowed origins")).fill("https://app.example.com")
    await page.get_by_role("button", name="Create key").click()
    raw = (await page.locator("#new-key").text_content() or "").strip()
    assert raw.startswith("flx_live_")
    assert raw not in page.url
    body = {"projectId": project.id, "query": "SELECT 1 AS one"}
    for origin, works in (("https://app.example.com", True), ("https://evil.example.com", False)):
        r = await api.http.post("/api/execute-sql", json=body, headers={**bearer(raw), "Origin": origin})
        assert (r.status_code == 200) is works, r.text
    row = page.get_by_role("row").filter(has_text="server key")
    await row.get_by_text("https://app.example.com").wait_for()
    # Never again: reloading the list shows the prefix, not the key.
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/keys")
    assert raw not in await page.content()
    # Rotate: a new secret shown once; the old one stops working at once.
    await page.get_by_role("button", name="Rotate key server key").click()
    rotated = (await page.locator("#new-key").text_content() or "").strip()
    assert rotated.startswith("flx_live_") and rotated != raw
    origin = {"Origin": "https://app.example.com"}
    r = await api.http.post("/api/execute-sql", json=body, headers={**bearer(raw), **origin})
    assert r.status_code == 401
    r = await api.http.post("/api/execute-sql", json=body, headers={**bearer(rotated), **origin})
    assert r.json()["success"] is True
    await page.get_by_role("button", name="Revoke key server key").click()
    await page.get_by_role("status").filter(has_text="is revoked").wait_for()
    r = await api.http.post("/api/execute-sql", json=body, headers={**bearer(rotated), **origin})
    assert r.status_code == 401
    assert rotated not in await page.content()
    assert console.errors == []


async def test_sql_editor_runs_with_params_shows_errors_and_downloads_csv(
    instance: Instance, project: ProjectCtx, page: Any
) -> None:
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/sql")
    editor = page.get_by_role("textbox", name=re.compile("^Query"))
    await editor.fill("SELECT $1::text AS name, $2::int + 1 AS next, true AS ok, NULL AS nothing")
    await page.get_by_label(re.compile("^Parameters")).fill('["alice", 41]')
    await editor.press("Control+Enter")
    grid = page.get_by_role("table", name="Query result")
    await grid.wait_for()
    assert await grid.get_by_role("cell").all_inner_texts() == ["alice", "42", "true", "NULL"]
    headers = await grid.get_by_role("columnheader").all_inner_texts()
    # PostgreSQL's own column types, from the statement's description (not guessed from JSON).
    assert headers == ["name text", "next int4", "ok bool", "nothing text"]
    assert await page.locator("[data-row-count]").get_attribute("data-row-count") == "1"
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download CSV").click()
    download = await download_info.value
    path = await download.path()
    csv = Path(path).read_bytes()  # noqa: ASYNC240 (a small local file)
    assert csv == b"name,next,ok,nothing\r\nalice,42,true,\r\n"
    # An error: the API's code and the SQLSTATE.
    await page.get_by_label(re.compile("^Parameters")).fill("")
    await editor.fill("SELECT * FROM no_such_table")
    await editor.press("Control+Enter")
    error = page.locator("[data-sql-error]")
    await error.wait_for()
    assert "SQL_EXEC_ERROR" in await error.inner_text()
    assert await page.locator(".sqlstate").inner_text() == "42P01"
    # Truncated: more rows than the API returns.
    await editor.fill("SELECT g FROM generate_series(1, 20000) g")
    await editor.press("Control+Enter")
    await page.locator("[data-truncated]").wait_for()
    # History: both queries, newest first, one click puts one back.
    history = page.locator("#sql-history button")
    assert (await history.first.inner_text()).startswith("SELECT g FROM generate_series")
    await history.nth(2).click()
    assert (await editor.input_value()).startswith("SELECT $1::text")
    assert console.errors == []


async def test_rls_walkthrough_in_the_browser(instance: Instance, project: ProjectCtx, page: Any) -> None:
    """The guide's walkthrough: a table, RLS on with the owner template, then the same query as two
    end users in the SQL editor shows each their own rows."""
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/sql")
    editor = page.get_by_role("textbox", name=re.compile("^Query"))

    async def run(query: str) -> None:
        await editor.fill(query)
        async with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/sql")):
            await editor.press("Control+Enter")

    await run("CREATE TABLE notes (id serial PRIMARY KEY, user_id text NOT NULL, body text NOT NULL)")
    await run(
        "INSERT INTO notes (user_id, body) "
        "VALUES ('alice', 'alice 1'), ('alice', 'alice 2'), ('bob', 'bob 1')"
    )
    await (
        page.get_by_role("navigation", name="Project").get_by_role("link", name="Row Level Security").click()
    )
    table = page.locator("[data-table=notes]")
    assert await table.locator("[data-rls-state]").inner_text() == "RLS disabled"
    await page.get_by_label("Table", exact=True).select_option("notes")
    await page.get_by_role("radio", name=re.compile("User owns their rows")).check()
    await page.get_by_role("button", name="Create policy").click()
    await page.get_by_role("status").filter(has_text="RLS is on for notes").wait_for()
    assert await table.locator("[data-rls-state]").inner_text() == "RLS enabled"
    await table.get_by_role("cell", name="notes_owner", exact=True).wait_for()

    await page.get_by_role("navigation", name="Project").get_by_role("link", name="SQL editor").click()
    await page.get_by_label(re.compile("Run as an end user")).check()
    seen = {}
    for uid in ("alice", "bob"):
        await page.get_by_label("authUid").fill(uid)
        await run("SELECT body FROM notes ORDER BY id")
        # The response is in; wait until htmx has swapped this run's result in (it names the uid).
        await page.locator("code", has_text=re.compile(f"^{uid}$")).wait_for()
        grid = page.get_by_role("table", name="Query result")
        seen[uid] = await grid.get_by_role("cell").all_inner_texts()
    assert seen == {"alice": ["alice 1", "alice 2"], "bob": ["bob 1"]}
    # As the member (admin, the tables' owner) every row is there.
    await page.get_by_label(re.compile("Run as an end user")).uncheck()
    await run("SELECT body FROM notes ORDER BY id")
    # The response is in; wait until htmx has swapped this run's result in (the end user's
    # grid, one row, was still there once when read at once): its third row, which only the
    # owner's unfiltered run has.
    grid = page.get_by_role("table", name="Query result")
    await grid.get_by_role("cell", name="alice 2", exact=True).wait_for()
    await grid.get_by_role("cell").nth(2).wait_for()
    assert len(await grid.get_by_role("cell").all_inner_texts()) == 3
    assert console.errors == []


async def test_viewer_sees_read_only_screens_and_cannot_write(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    viewer, viewer_token = await api.new_user()
    await add_member(api, project.owner_token, project.id, viewer, viewer_token, "viewer")
    await api.sql(project.admin_key, project.id, "CREATE TABLE t (id int)")
    console = Console(page)
    await sign_in(page, instance.url, viewer["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/keys")
    await page.get_by_text("Needs the admin role; you are viewer.").wait_for()
    assert await page.get_by_role("button", name="Create key").count() == 0
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/settings")
    assert await page.get_by_role("button", name="Delete project").count() == 0
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/rls")
    await page.get_by_text("Needs the admin role; you are viewer.").wait_for()
    # Reads work; writes are refused by the database role the API gives viewers.
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/sql")
    editor = page.get_by_role("textbox", name=re.compile("^Query"))
    await editor.fill("SELECT count(*) AS n FROM t")
    await editor.press("Control+Enter")
    await page.get_by_role("table", name="Query result").wait_for()
    await editor.fill("INSERT INTO t VALUES (1)")
    await editor.press("Control+Enter")
    await page.locator("[data-sql-error]").wait_for()
    assert await page.locator(".sqlstate").inner_text() == "25006"  # a read-only transaction
    # A forged form (with a valid CSRF token) is refused by the same check as the API's.
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    r = await page.request.post(
        f"{instance.url}/dashboard/p/{project.id}/keys", form={"_csrf": csrf, "name": "x", "scope": "read"}
    )
    assert r.status == 403 and "INSUFFICIENT_PERMISSIONS" in await r.text()
    keys = await api.http.get(f"/api/projects/{project.id}/api-keys", headers=bearer(project.owner_token))
    assert [k["name"] for k in keys.json()["apiKeys"]] == ["admin key"]
    assert console.errors == []


async def test_a_state_change_without_a_csrf_token_is_refused(
    api: Api, instance: Instance, page: Any
) -> None:
    user, token = await api.new_user()
    await sign_in(page, instance.url, user["email"])
    url = f"{instance.url}/dashboard/projects"
    for form in ({"name": "forged"}, {"name": "forged", "_csrf": "not-the-token"}):
        r = await page.request.post(url, form=form)
        assert r.status == 403, await r.text()
        assert "CSRF_FAILED" in await r.text()
    r = await page.request.post(url, form={"name": "forged"}, headers={"X-CSRF-Token": "nope"})
    assert r.status == 403
    assert (await api.http.get("/api/projects", headers=bearer(token))).json()["projects"] == []
    # Sign-out is a state change too: without the token the session survives.
    session = next(c for c in await page.context.cookies() if c["name"] == "fluxbase_session")["value"]
    r = await page.request.post(f"{instance.url}/dashboard/sign-out", form={})
    assert r.status == 403
    assert (await api.http.get("/api/auth/me", headers=bearer(session))).status_code == 200
    # With the page's own token the same form works.
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    r = await page.request.post(url, form={"name": "real", "_csrf": csrf})
    assert r.status == 200
    assert [
        p["name"] for p in (await api.http.get("/api/projects", headers=bearer(token))).json()["projects"]
    ] == ["real"]


async def test_every_page_has_a_strict_csp_and_no_framing(
    instance: Instance, project: ProjectCtx, page: Any
) -> None:
    console = Console(page)
    seen: dict[str, dict[str, str]] = {}
    page.on(
        "response",
        lambda r: seen.__setitem__(r.url, r.headers) if "/dashboard" in r.url else None,
    )
    await page.goto(f"{instance.url}/dashboard/sign-in")
    await page.goto(f"{instance.url}/dashboard/register")
    await sign_in(page, instance.url, project.owner["email"])
    screens = (
        "",
        "keys",
        "tables",
        "sql",
        "rls",
        "storage",
        "realtime",
        "users",
        "team",
        "webhooks",
        "settings",
    )
    for screen in screens:
        await page.goto(f"{instance.url}/dashboard/p/{project.id}/{screen}")
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/no-such-screen")
    await page.goto(f"{instance.url}/dashboard/p/p_doesnotexist/")
    editor = page.get_by_role("textbox", name=re.compile("^Query"))
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/sql")
    await editor.press("Control+Enter")
    await page.get_by_role("table", name="Query result").wait_for()
    pages = [u for u in seen if "/static/" not in u]
    assert len(pages) >= 10, pages
    for url, headers in seen.items():
        csp = headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp, url
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp, url
        assert headers.get("x-frame-options") == "DENY", url
        assert headers.get("x-content-type-options") == "nosniff", url
    for url in pages:
        assert seen[url].get("cache-control") == "no-store", url
    assert console.errors == []  # no CSP violation on any page (Chromium reports them as errors)


async def test_team_invite_accept_change_role_and_remove(
    api: Api, instance: Instance, project: ProjectCtx, browser: Any, page: Any
) -> None:
    member, member_token = await api.new_user()
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/team")
    await page.get_by_text("No invitations yet").wait_for()
    await page.get_by_label("Email").fill(member["email"])
    await page.get_by_label("Role", exact=True).select_option("developer")
    await page.get_by_role("button", name="Invite").click()
    await page.get_by_role("status").filter(has_text=f"{member['email']} is invited as developer").wait_for()
    invites = page.get_by_role("table", name="Invitations")
    await invites.get_by_role("cell", name="pending").wait_for()

    # The invitee, in a browser of their own, accepts from the projects page.
    other = await browser.new_context()
    try:
        theirs = await other.new_page()
        await sign_in(theirs, instance.url, member["email"])
        await theirs.get_by_role("button", name="Accept the invitation to test project").click()
        await theirs.get_by_role("heading", name="test project").wait_for()
        assert await theirs.locator("header .badge").inner_text() == "developer"
    finally:
        await other.close()

    await page.reload()
    members = page.get_by_role("table", name="Members")
    await members.get_by_text(member["email"], exact=True).wait_for()
    await page.get_by_label(f"Role of {member['email']}", exact=True).select_option("viewer")
    await page.get_by_role("button", name=f"Change the role of {member['email']}").click()
    await page.get_by_role("status").filter(has_text=f"{member['email']} is now viewer").wait_for()
    r = await api.http.get(f"/api/projects/{project.id}", headers=bearer(member_token))
    assert r.json()["project"]["role"] == "viewer"
    await page.get_by_role("button", name=f"Remove {member['email']}").click()
    await page.get_by_role("status").filter(has_text="was removed").wait_for()
    r = await api.http.get(f"/api/projects/{project.id}", headers=bearer(member_token))
    assert r.status_code == 403
    assert console.errors == []


async def test_table_editor_creates_browses_inserts_edits_and_deletes(
    instance: Instance, project: ProjectCtx, page: Any
) -> None:
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/tables")
    await page.get_by_text("No tables yet").wait_for()
    await page.get_by_label("Table name").fill("todos")
    await page.get_by_label("Column 1 name").fill("id")  # bigint, primary key, auto increment by default
    await page.get_by_label("Column 2 name").fill("title")
    await page.get_by_label("Column 3 name").fill("done")
    await page.get_by_label("Column 3 type").select_option("boolean")
    await page.get_by_label("Column 3 default").fill("false")
    await page.get_by_role("button", name="Create table").click()
    await page.get_by_role("heading", name="todos").wait_for()
    create = await page.locator("#create-sql").inner_text()
    assert create.startswith('CREATE TABLE "todos"') and '"done" boolean DEFAULT false' in create
    for title in ("write tests", "ship it", "celebrate"):
        await page.get_by_label(re.compile("^title")).fill(title)
        await page.get_by_role("button", name="Insert row").click()
        await page.get_by_role("status").filter(has_text="Row inserted").wait_for()
    grid = page.get_by_role("table", name="Rows of todos")
    assert await grid.locator("tbody tr").count() == 3
    # Edit: mark row 2 done.
    await page.get_by_role("link", name="Edit row 2").click()
    await page.get_by_label("done boolean", exact=True).fill("true")
    await page.get_by_role("button", name="Save row").click()
    await page.get_by_role("status").filter(has_text="Row 2 updated").wait_for()
    # Filter and sort, as the REST endpoint's filter language.
    await page.get_by_label("Filter (JSON)").fill('{"done": false}')
    await page.get_by_label("Sort by").select_option("title")
    await page.get_by_label("Direction").select_option("desc")
    await page.get_by_role("button", name="Apply").click()
    await page.get_by_text("2 rows").wait_for()
    titles = await grid.locator("tbody tr td:nth-child(2)").all_inner_texts()
    assert titles == ["write tests", "celebrate"]
    await page.get_by_label("Filter (JSON)").fill("{not json")
    await page.get_by_role("button", name="Apply").click()
    await page.get_by_role("alert").filter(has_text="VALIDATION_ERROR").wait_for()
    # Delete.
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/tables/todos")
    await page.get_by_role("button", name="Delete row 1").click()
    await page.get_by_role("status").filter(has_text="Row 1 deleted").wait_for()
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/tables")
    assert await page.locator("[data-rows=todos]").inner_text() == "2"
    assert console.errors == []


async def test_webhook_created_with_its_secret_once_pinged_disabled_and_redelivered(
    spawn: Any, browser: Any
) -> None:
    from aiohttp import web

    received: list[dict[str, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with spawn(FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true") as inst:
            api = Api(inst.url)
            ctx = await browser.new_context()
            try:
                user, token = await api.new_user()
                pid = await api.new_project(token, "hooks")
                page = await ctx.new_page()
                console = Console(page)
                await sign_in(page, inst.url, user["email"])
                await page.goto(f"{inst.url}/dashboard/p/{pid}/webhooks")
                await page.get_by_label("Endpoint URL").fill(f"http://127.0.0.1:{port}/hook")
                await page.get_by_label("schema.changed").check()
                await page.get_by_role("button", name="Create webhook").click()
                secret = (await page.locator("#new-secret").inner_text()).strip()
                assert len(secret) >= 24
                await page.get_by_role("button", name="Send test ping").click()
                await (
                    page.get_by_role("status").filter(has_text="Test ping delivered: answered 200").wait_for()
                )
                assert received and received[-1]["X-Fluxbase-Signature"].startswith("sha256=")
                assert secret not in await page.content()  # shown once
                await page.get_by_role("button", name="Disable").click()
                assert (await page.locator("[data-webhook-state]").inner_text()).startswith("disabled")
                await page.get_by_role("button", name="Enable").click()
                assert await page.locator("[data-webhook-state]").inner_text() == "enabled"
                deliveries = page.get_by_role("table", name="Deliveries")
                first = (await deliveries.locator("tbody tr td").first.inner_text()).strip()
                await page.get_by_role("button", name=f"Redeliver {first}").click()
                await page.get_by_role("status").filter(has_text=f"Delivery {first} queued again").wait_for()
                assert await deliveries.locator("tbody tr").count() == 2
                assert console.errors == []
            finally:
                await ctx.close()
                await api.close()
    finally:
        await runner.cleanup()


async def test_settings_read_only_switch_vacuum_export_and_migrations(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/migrations",
        json={"name": "0001_items", "sql": "CREATE TABLE items (id int PRIMARY KEY)"},
        headers=bearer(project.admin_key),
    )
    assert r.status_code == 200, r.text
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/settings")
    await (
        page.get_by_role("table", name="Applied migrations").get_by_role("cell", name="0001_items").wait_for()
    )
    await page.get_by_role("button", name="Make read-only").click()
    await page.get_by_role("status").filter(has_text="read-only now").wait_for()
    r = await api.sql(project.admin_key, project.id, "INSERT INTO items VALUES (1)")
    assert r.status_code == 403 and r.json()["error"]["code"] == "PROJECT_READ_ONLY", r.text
    await page.get_by_role("button", name="Allow writes again").click()
    await page.get_by_role("status").filter(has_text="Writes are allowed again").wait_for()
    assert (await api.sql(project.admin_key, project.id, "INSERT INTO items VALUES (1)")).json()["success"]
    await page.get_by_role("button", name="Vacuum and analyze").click()
    await page.get_by_role("status").filter(has_text="Vacuumed").wait_for()
    async with page.expect_download() as info:
        await page.get_by_role("link", name="Download an export (.sql)").click()
    download = await info.value
    assert download.suggested_filename == f"fluxbase-{project.id}.sql"
    dumped = Path(await download.path()).read_text()  # noqa: ASYNC240 (a small local file)
    assert dumped.startswith("-- fluxbase-export") and "items" in dumped
    assert console.errors == []


async def test_end_users_disable_revoke_and_auth_settings(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    r = await api.http.post(
        f"/api/projects/{project.id}/auth/register",
        json={"email": "carol@example.com", "password": PASSWORD},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        f"/api/projects/{project.id}/auth/login",
        json={"email": "carol@example.com", "password": PASSWORD},
        headers={"X-Forwarded-For": random_ip()},
    )
    assert r.status_code == 200, r.text
    access = r.json()["accessToken"]
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/users")
    state = page.locator('[data-user-state="carol@example.com"]')
    assert await state.inner_text() == "active"
    await page.get_by_role("button", name="Sign out everywhere: carol@example.com").click()
    await page.get_by_role("status").filter(has_text="1 session ended").wait_for()
    me = await api.http.get(f"/api/projects/{project.id}/auth/me", headers=bearer(access))
    assert me.status_code == 401, me.text
    await page.get_by_role("button", name="Disable: carol@example.com").click()
    await page.get_by_role("status").filter(has_text="carol@example.com is disabled").wait_for()
    assert await state.inner_text() == "disabled"
    # Settings: the secret is write-only (never shown back), issuers and audiences saved.
    await page.get_by_label(re.compile("External JWT secret")).fill(
        "s3cret-for-hs256-tokens-0123456789abcdef"
    )
    await page.get_by_label(re.compile("Allowed issuers")).fill("https://idp.example.com")
    await page.get_by_label(re.compile("Expected audiences")).fill("my-app")
    await page.get_by_role("button", name="Save auth settings").click()
    await page.get_by_role("status").filter(has_text="Auth settings saved").wait_for()
    assert "s3cret-for-hs256" not in await page.content()
    await page.get_by_text("set: leave empty to keep it").wait_for()
    r = await api.http.get(f"/api/projects/{project.id}/auth/settings", headers=bearer(project.admin_key))
    settings = r.json()["settings"]
    assert settings["jwtSecretSet"] is True
    assert settings["jwtAllowedIssuers"] == ["https://idp.example.com"]
    assert settings["jwtExpectedAudiences"] == ["my-app"]
    assert console.errors == []


async def test_storage_bucket_upload_with_progress_download_and_delete(
    api: Api, instance: Instance, project: ProjectCtx, page: Any, tmp_path: Path
) -> None:
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/storage")
    await page.get_by_text("No buckets yet").wait_for()
    await page.get_by_label("Bucket name").fill("docs")
    await page.get_by_role("button", name="Create bucket").click()
    await page.get_by_role("heading", name="docs").wait_for()
    content = b"fluxbase " * 300_000  # 2.7 MB: several progress events
    local = tmp_path / "report.txt"
    local.write_bytes(content)
    progress: list[int] = []
    await page.expose_function("recordProgress", lambda v: progress.append(int(v)))
    await page.evaluate(
        """() => { const bar = document.getElementById('upload-progress');
                   new MutationObserver(() => window.recordProgress(bar.value))
                       .observe(bar, {attributes: true}); }"""
    )
    async with page.expect_navigation():  # the page reloads when the uploads are done
        await page.get_by_label("choose files").set_input_files(str(local))
    files = page.get_by_role("table", name="Files")
    link = files.get_by_role("link", name="Download report.txt")
    await link.wait_for()
    assert progress and progress[-1] == 100, progress
    # Download: the dashboard redirects to the file's presigned URL, as the API signs it.
    fetched = await page.request.get(instance.url + (await link.get_attribute("href") or ""))
    assert fetched.ok and await fetched.body() == content
    # The API sees the same file.
    r = await api.http.get(
        "/api/storage/files",
        params={"projectId": project.id, "bucketId": "docs"},
        headers=bearer(project.admin_key),
    )
    assert [f["name"] for f in r.json()["files"]] == ["report.txt"], r.text
    await page.get_by_role("button", name="Link to report.txt").click()
    assert "X-Amz-Signature" in await page.locator("#signed-url").inner_text()
    await page.get_by_role("button", name="Delete report.txt").click()
    await page.get_by_role("status").filter(has_text="Deleted report.txt").wait_for()
    await page.get_by_text("No files yet").wait_for()
    await page.get_by_role("button", name="Delete bucket (must be empty)").click()
    await page.get_by_role("status").filter(has_text="Bucket docs deleted").wait_for()
    assert console.errors == []


async def test_realtime_capture_switches(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    await api.sql(project.admin_key, project.id, "CREATE TABLE feed (id int)")
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/realtime")
    cell = page.locator("[data-capture=feed]")
    assert await cell.inner_text() == "captured"
    await page.get_by_role("button", name="Stop capturing feed").click()
    await page.get_by_role("status").filter(has_text="no longer captured").wait_for()
    assert await cell.inner_text() == "off"

    async def captured() -> bool:
        r = await api.http.get(
            "/api/realtime/tables", params={"projectId": project.id}, headers=bearer(project.admin_key)
        )
        return bool(next(t for t in r.json()["tables"] if t["name"] == "feed")["enabled"])

    assert await captured() is False
    await page.get_by_role("button", name="Capture feed").click()
    await page.get_by_role("status").filter(has_text="are captured").wait_for()
    assert await captured() is True
    assert console.errors == []


async def test_realtime_inspector_shows_live_changes_and_filters_by_table(
    spawn: Any, browser: Any, log_dir: Path
) -> None:
    rt_port = free_port()
    async with spawn(FLUXBASE_REALTIME_PORT=str(rt_port)) as inst:
        with run_service(["realtime"], inst.env, rt_port, log_dir):
            api = Api(inst.url)
            ctx = await browser.new_context()
            try:
                user, token = await api.new_user()
                pid = await api.new_project(token, "live")
                key = await api.new_key(token, pid, "admin")
                for q in ("CREATE TABLE a (id int)", "CREATE TABLE b (id int)"):
                    assert (await api.sql(key, pid, q)).json()["success"]
                page = await ctx.new_page()
                console = Console(page)
                seen: list[str] = []
                page.on("response", lambda r: seen.append(r.headers.get("content-security-policy", "")))
                await sign_in(page, inst.url, user["email"])
                await page.goto(f"{inst.url}/dashboard/p/{pid}/realtime")
                assert f"connect-src 'self' ws://127.0.0.1:{rt_port};" in seen[-1]
                await page.get_by_role("button", name="Start").click()
                await page.get_by_role("status").filter(has_text=f"Live: watching project_{pid}").wait_for()
                await page.get_by_role("textbox", name="Table").fill("a")
                assert (await api.sql(key, pid, "INSERT INTO b VALUES (1)")).json()["success"]
                assert (await api.sql(key, pid, "INSERT INTO a VALUES (42)")).json()["success"]
                events = page.get_by_role("list", name="Events")
                await events.get_by_text("INSERT a").wait_for()
                assert await events.locator("li[data-table=b]").count() == 0  # filtered out
                await page.get_by_role("button", name="Pause").click()
                assert (await api.sql(key, pid, "INSERT INTO a VALUES (43)")).json()["success"]
                await page.get_by_role("button", name="Resume").click()
                assert (await api.sql(key, pid, "INSERT INTO a VALUES (44)")).json()["success"]
                await events.get_by_text('{"id":44}').wait_for()
                texts = await events.locator("li").all_inner_texts()
                assert not any('"id":43' in t for t in texts), texts  # paused: not shown
                assert console.errors == []
            finally:
                await ctx.close()
                await api.close()
