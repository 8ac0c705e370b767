"""The dashboard's remaining screens in a real Chromium against the real stack: large uploads
straight to S3 through the presigned POST, import with progress and the migration form in the
project settings, and the instance-admin screen (all projects, suspend/resume, quotas), each with
its permission cases."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import Instance, ProjectCtx
from dashboard_support import Console, add_member, launch, needs_chromium, sign_in
from support import Api, bearer

pytestmark = needs_chromium

MIB = 1024 * 1024


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    async for b in launch():
        yield b


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    yield await ctx.new_page()
    await ctx.close()


def s3_origin(instance: Instance) -> str:
    parts = urlsplit(instance.env["FLUXBASE_S3_ENDPOINT"])
    return f"{parts.scheme}://{parts.netloc}"


async def test_a_large_file_goes_straight_to_s3_with_progress_and_comes_back(
    api: Api, instance: Instance, project: ProjectCtx, page: Any, tmp_path: Path
) -> None:
    await api.http.post(
        "/api/storage/buckets",
        json={"projectId": project.id, "name": "big"},
        headers=bearer(project.admin_key),
    )
    console = Console(page)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    csp: dict[str, str] = {}
    page.on(
        "response",
        lambda r: (
            csp.__setitem__(r.url.split("?")[0], r.headers.get("content-security-policy", ""))
            if r.url.startswith(instance.url)
            else None
        ),
    )
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/storage")
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/storage/big")
    content = bytes(range(256)) * (9 * MIB // 256)  # 9 MiB: above the direct-upload threshold
    local = tmp_path / "video.bin"
    local.write_bytes(content)
    progress: list[int] = []
    await page.expose_function("recordProgress", lambda v: progress.append(int(v)))
    await page.evaluate(
        """() => { const bar = document.getElementById('upload-progress');
                   new MutationObserver(() => window.recordProgress(bar.value))
                       .observe(bar, {attributes: true}); }"""
    )
    # Loopback is too fast to see the bar move: Chromium's own throttle slows the upload to ~3 s.
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Network.enable")
    conditions = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 3 * MIB}
    await cdp.send("Network.emulateNetworkConditions", conditions)
    async with page.expect_navigation():  # the page reloads when the uploads are done
        await page.get_by_label("choose files").set_input_files(str(local))
    await cdp.send("Network.emulateNetworkConditions", {**conditions, "uploadThroughput": -1})
    link = page.get_by_role("table", name="Files").get_by_role("link", name="Download video.bin")
    await link.wait_for()
    assert progress and progress[-1] == 100 and len(set(progress)) > 2, progress
    # The bytes went to the S3 origin (the presigned form), not through the API's upload path.
    origin = s3_origin(instance)
    assert any(u.startswith(origin + "/") for u in posts), posts
    assert not any(re.search(r"/storage/[^/]+/upload(\?|$)", u) for u in posts), posts
    assert any(re.search(r"/storage/[^/]+/upload-url$", u) for u in posts), posts
    assert any(re.search(r"/storage/[^/]+/upload-confirm$", u) for u in posts), posts
    # Only the bucket page's CSP names the S3 origin, in connect-src, and never a wildcard.
    bucket_csp = csp[f"{instance.url}/dashboard/p/{project.id}/storage/big"]
    connect = next(d for d in bucket_csp.split(";") if d.strip().startswith("connect-src"))
    assert origin in connect.split() and "*" not in bucket_csp, bucket_csp
    assert "form-action 'self';" in bucket_csp
    assert origin not in csp[f"{instance.url}/dashboard/p/{project.id}/storage"]
    # The API sees the file with its size, and the download returns the same bytes.
    r = await api.http.get(
        "/api/storage/files",
        params={"projectId": project.id, "bucketId": "big"},
        headers=bearer(project.admin_key),
    )
    assert [(f["name"], f["size"]) for f in r.json()["files"]] == [("video.bin", len(content))], r.text
    fetched = await page.request.get(instance.url + (await link.get_attribute("href") or ""))
    assert fetched.ok and await fetched.body() == content
    # The same name again is refused with the API's own error, shown on the page.
    await page.get_by_label("choose files").set_input_files(str(local))
    await page.locator("#upload-status.error").filter(has_text="CONFLICT").wait_for()
    assert console.errors == []


async def test_a_viewer_cannot_get_a_presigned_upload_form(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    await api.http.post(
        "/api/storage/buckets", json={"projectId": project.id, "name": "b"}, headers=bearer(project.admin_key)
    )
    viewer, viewer_token = await api.new_user()
    await add_member(api, project.owner_token, project.id, viewer, viewer_token, "viewer")
    await sign_in(page, instance.url, viewer["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/storage/b")
    assert await page.get_by_label("choose files").count() == 0
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    base = f"{instance.url}/dashboard/p/{project.id}/storage/b"
    r = await page.request.post(
        base + "/upload-url", form={"name": "x.bin", "size": "10"}, headers={"X-CSRF-Token": csrf}
    )
    assert r.status == 403 and "INSUFFICIENT_PERMISSIONS" in await r.text()
    r = await page.request.post(base + "/upload-url", form={"name": "x.bin", "size": "10"})
    assert r.status == 403 and "CSRF_FAILED" in await r.text()


async def test_settings_migration_form_and_import_with_progress(
    api: Api, instance: Instance, project: ProjectCtx, page: Any, tmp_path: Path
) -> None:
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    settings = f"{instance.url}/dashboard/p/{project.id}/settings"
    await page.goto(settings)
    await page.get_by_text("No migrations applied yet").wait_for()
    # Apply a migration from the form: it is listed, and the API sees it.
    await page.get_by_label("Migration name").fill("0001_todos")
    await page.get_by_label("Migration SQL").fill(
        "CREATE TABLE todos (id int PRIMARY KEY, title text);\nINSERT INTO todos VALUES (1, 'write tests');"
    )
    await page.get_by_role("button", name="Apply migration").click()
    await page.get_by_role("status").filter(has_text="Applied migration 0001_todos").wait_for()
    await (
        page.get_by_role("table", name="Applied migrations").get_by_role("cell", name="0001_todos").wait_for()
    )
    r = await api.http.get(f"/api/projects/{project.id}/migrations", headers=bearer(project.admin_key))
    assert [m["name"] for m in r.json()["migrations"]] == ["0001_todos"]
    # A failing migration shows the API's error with its SQLSTATE, keeps the text, applies nothing.
    await page.get_by_label("Migration name").fill("0002_bad")
    await page.get_by_label("Migration SQL").fill("ALTER TABLE missing ADD COLUMN x int")
    await page.get_by_role("button", name="Apply migration").click()
    await page.locator(".sqlstate").filter(has_text="42P01").wait_for()
    assert await page.get_by_label("Migration SQL").input_value() == "ALTER TABLE missing ADD COLUMN x int"
    r = await api.http.get(f"/api/projects/{project.id}/migrations", headers=bearer(project.admin_key))
    assert len(r.json()["migrations"]) == 1
    # Import an export of this project as a new project, with upload progress.
    r = await api.http.get(f"/api/projects/{project.id}/export", headers=bearer(project.owner_token))
    assert r.status_code == 200, r.text
    dump = tmp_path / "export.sql"
    dump.write_bytes(r.content)
    await page.goto(settings)
    progress: list[int] = []
    await page.expose_function("recordProgress", lambda v: progress.append(int(v)))
    await page.evaluate(
        """() => { const bar = document.getElementById('import-progress');
                   new MutationObserver(() => window.recordProgress(bar.value))
                       .observe(bar, {attributes: true}); }"""
    )
    await page.get_by_label("New project's name (optional)").fill("todos copy")
    await page.get_by_label("Export file (.sql)").set_input_files(str(dump))
    async with page.expect_navigation(url=re.compile(r"/dashboard/p/[0-9a-f]+/$")):
        await page.get_by_role("button", name="Import", exact=True).click()
    assert progress and progress[-1] == 100, progress
    new_id = page.url.rstrip("/").rsplit("/", 1)[-1]
    assert new_id != project.id
    await page.get_by_text("todos copy").first.wait_for()
    r = await api.http.get(f"/api/projects/{new_id}/migrations", headers=bearer(project.owner_token))
    assert [m["name"] for m in r.json()["migrations"]] == ["0001_todos"], r.text
    r = await api.sql(project.owner_token, new_id, "SELECT title FROM todos")
    assert r.json()["result"]["rows"] == [{"title": "write tests"}], r.text
    # A file that is not an export: the API's refusal is shown, and no project appears.
    bogus = tmp_path / "bogus.sql"
    bogus.write_text("DROP TABLE everything;")
    await page.goto(settings)
    await page.get_by_label("Export file (.sql)").set_input_files(str(bogus))
    await page.get_by_role("button", name="Import", exact=True).click()
    await page.locator("#import-status.error").filter(has_text="IMPORT").wait_for()
    r = await api.http.get("/api/projects", headers=bearer(project.owner_token))
    assert len(r.json()["projects"]) == 2
    assert console.errors == []


async def test_viewer_and_developer_see_the_migration_form_as_their_role_allows(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    viewer, viewer_token = await api.new_user()
    await add_member(api, project.owner_token, project.id, viewer, viewer_token, "viewer")
    await sign_in(page, instance.url, viewer["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/settings")
    await page.get_by_text("Needs the developer role; you are viewer.").wait_for()
    assert await page.get_by_role("button", name="Apply migration").count() == 0
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    r = await page.request.post(
        f"{instance.url}/dashboard/p/{project.id}/migrations",
        form={"_csrf": csrf, "name": "0001_x", "sql": "CREATE TABLE x (id int)"},
    )
    assert r.status == 403 and "INSUFFICIENT_PERMISSIONS" in await r.text()
    r = await api.http.get(f"/api/projects/{project.id}/migrations", headers=bearer(project.admin_key))
    assert r.json()["migrations"] == []


async def test_instance_admin_lists_every_project_suspends_resumes_and_sets_quotas(
    api: Api, instance: Instance, instance_admin: dict[str, Any], project: ProjectCtx, page: Any
) -> None:
    console = Console(page)
    await sign_in(page, instance.url, instance_admin["email"], instance_admin["password"])
    await page.get_by_role("link", name="Instance admin").click()
    await page.get_by_role("heading", name="Instance admin").wait_for()
    # Another user's project is listed, with its owner.
    row = page.locator(f"tr[data-project='{project.id}']")
    await row.get_by_role("cell", name=project.owner["email"]).wait_for()
    await row.get_by_role("button", name="Suspend test project").click()
    await page.get_by_role("status").filter(has_text="is suspended").wait_for()
    assert await row.locator("[data-status]").inner_text() == "suspended"
    r = await api.sql(project.admin_key, project.id, "SELECT 1")
    assert r.status_code == 403 and r.json()["error"]["code"] == "PROJECT_SUSPENDED", r.text
    await row.get_by_role("button", name="Resume test project").click()
    await page.get_by_role("status").filter(has_text="is active again").wait_for()
    assert (await api.sql(project.admin_key, project.id, "SELECT 1")).json()["success"]
    # Quotas: change one, see it through the API; clear it, back to the default.
    await row.get_by_role("link", name="Quotas of test project").click()
    storage = page.get_by_label("Storage", exact=True)
    default = await storage.input_value()
    await storage.fill("5000")
    await page.get_by_role("button", name="Save quotas").click()
    await page.get_by_role("status").filter(has_text="Quotas saved: storageBytes").wait_for()
    r = await api.http.get(f"/api/projects/{project.id}/quotas", headers=bearer(project.admin_key))
    quotas = r.json()["quotas"]
    assert quotas["storageBytes"] == 5000, quotas
    assert quotas["rateLimitRequests"] > 0  # untouched fields stay untouched
    # Not a number: the browser's own check stops the form, and the server refuses it too.
    await page.get_by_label("Database size").fill("abc")
    assert not await page.get_by_label("Database size").evaluate("e => e.validity.valid")
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    r2 = await page.request.post(
        f"{instance.url}/dashboard/admin/p/{project.id}/quotas",
        form={"_csrf": csrf, "databaseBytes": "abc", "shown_databaseBytes": ""},
    )
    assert r2.status == 400 and "Database size must be a whole number" in await r2.text()
    await page.get_by_label("Database size").fill("")
    await page.get_by_label("Storage", exact=True).fill("")
    await page.get_by_role("button", name="Save quotas").click()
    await page.get_by_role("status").filter(has_text="Quotas saved").wait_for()
    assert await page.get_by_label("Storage", exact=True).input_value() == default
    r = await api.http.get(f"/api/projects/{project.id}/quotas", headers=bearer(project.admin_key))
    assert str(r.json()["quotas"]["storageBytes"]) == default
    assert console.errors == []


async def test_a_project_owner_who_is_not_an_instance_admin_gets_no_admin_screen(
    api: Api, instance: Instance, instance_admin: dict[str, Any], project: ProjectCtx, page: Any
) -> None:
    await sign_in(page, instance.url, project.owner["email"])
    assert await page.get_by_role("link", name="Instance admin").count() == 0
    r = await page.goto(f"{instance.url}/dashboard/admin")
    assert r is not None and r.status == 403
    await page.get_by_text("INSUFFICIENT_PERMISSIONS").wait_for()
    assert project.id not in await page.content() or "admin" not in page.url
    r = await page.goto(f"{instance.url}/dashboard/admin/p/{project.id}")
    assert r is not None and r.status == 403
    # Forged posts with a valid CSRF token: refused by the API's own check, nothing changes.
    await page.goto(f"{instance.url}/dashboard/")
    csrf = await page.locator("input[name=_csrf]").first.get_attribute("value")
    r2 = await page.request.post(
        f"{instance.url}/dashboard/admin/p/{project.id}/status", form={"_csrf": csrf, "action": "suspend"}
    )
    assert r2.status == 403 and "INSUFFICIENT_PERMISSIONS" in await r2.text()
    r2 = await page.request.post(
        f"{instance.url}/dashboard/admin/p/{project.id}/quotas",
        form={"_csrf": csrf, "databaseBytes": "1", "shown_databaseBytes": ""},
    )
    assert r2.status == 403
    assert (await api.sql(project.admin_key, project.id, "SELECT 1")).json()["success"]
    r3 = await api.http.get(f"/api/projects/{project.id}/quotas", headers=bearer(project.admin_key))
    assert r3.json()["quotas"]["databaseBytes"] is None
    # Without the CSRF token even the instance admin's session could not act (checked first).
    r2 = await page.request.post(
        f"{instance.url}/dashboard/admin/p/{project.id}/status", form={"action": "suspend"}
    )
    assert r2.status == 403 and "CSRF_FAILED" in await r2.text()


async def test_objects_named_dot_and_dot_dot_are_managed_in_the_browser(
    api: Api, instance: Instance, project: ProjectCtx, page: Any
) -> None:
    """Browsers resolve `.` and `..` path segments (encoded or not), so the dashboard escapes them
    in its URLs (and anything starting with `~`, the escape) and each action reaches its object."""
    for q in (
        'CREATE TABLE "." (k text PRIMARY KEY, v text)',
        """INSERT INTO "." VALUES ('..', 'dots'), ('~x', 'tilde'), ('plain', 'p')""",
        'CREATE TABLE "~." (id int PRIMARY KEY)',
        'CREATE POLICY ".." ON "." USING (true)',
    ):
        r = await api.sql(project.admin_key, project.id, q)
        assert r.json()["success"], r.text
    console = Console(page)
    await sign_in(page, instance.url, project.owner["email"])
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/tables")
    await page.get_by_role("link", name=".", exact=True).click()
    await page.get_by_role("heading", name=".", exact=True).wait_for()
    grid = page.get_by_role("table", name="Rows of .", exact=True)
    assert await grid.locator("tbody tr").count() == 3
    await page.get_by_role("link", name="Edit row ..", exact=True).click()
    edit = page.get_by_role("region", name=re.compile("^Edit row"))
    await edit.get_by_label("v text", exact=True).fill("edited")
    await page.get_by_role("button", name="Save row").click()
    await page.get_by_role("status").filter(has_text="Row .. updated").wait_for()
    await page.get_by_role("button", name="Delete row ~x", exact=True).click()
    await page.get_by_role("status").filter(has_text="Row ~x deleted").wait_for()
    r = await api.sql(project.admin_key, project.id, 'SELECT k, v FROM "." ORDER BY k')
    assert r.json()["result"]["rows"] == [{"k": "..", "v": "edited"}, {"k": "plain", "v": "p"}], r.text
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/tables")
    await page.get_by_role("link", name="~.", exact=True).click()
    await page.get_by_role("heading", name="~.", exact=True).wait_for()
    # RLS: enable on ".", drop the policy named "..".
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/rls")
    await page.get_by_role("button", name="Enable RLS on .", exact=True).click()
    await page.locator("[data-table='.'] [data-rls-state]").filter(has_text="RLS enabled").wait_for()
    await page.get_by_role("button", name="Drop policy ..", exact=True).click()
    await page.get_by_role("status").filter(has_text="dropped").wait_for()
    r = await api.sql(
        project.admin_key,
        project.id,
        "SELECT c.relrowsecurity AS rls, (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid) AS n "
        "FROM pg_class c WHERE c.relname = '.' AND c.relkind = 'r'",
    )
    assert r.json()["result"]["rows"] == [{"rls": True, "n": 0}], r.text
    # Realtime capture switch of ".".
    await page.goto(f"{instance.url}/dashboard/p/{project.id}/realtime")
    switch = page.get_by_role("button", name=re.compile(r"^(Capture|Stop capturing) \.$"))
    before = await switch.get_attribute("aria-label")
    await switch.click()
    await page.get_by_role("status").filter(has_text="Changes of . are").wait_for()
    assert await switch.get_attribute("aria-label") != before
    assert console.errors == []
