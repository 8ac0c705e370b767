"""`make screenshots`: every dashboard screen, at 1280x800 and at phone width, into docs/screenshots/.

Starts its own embedded PostgreSQL, S3 and API server (as the tests do), fills a demo project
through the API, then drives Debian's Chromium through the screens. Run from the repository root:
`PYTHONPATH=tests .venv/bin/python tests/dashboard_screenshots.py`.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from dashboard_support import CHROMIUM, launch, sign_in
from fluxbase.devstack.procs import free_port
from support import ROOT, Api, bearer, random_ip, run_service, start_stack, stop_stack

OUT = ROOT / "docs" / "screenshots"
# A 1x1 PNG to upload.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f80f0000010101005b8d9a6a0000000049454e44ae426082"
)
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


async def fill_demo(api: Api) -> tuple[dict[str, str], str, str]:
    user = await api.register(email="ada@example.com", name="Ada")
    token = await api.login(user["email"], user["password"])
    pid = await api.new_project(token, "Notes app")
    admin = await api.new_key(token, pid, "admin")
    await api.new_key(
        token, pid, "readwrite", allowedOrigins=["https://notes.example.com"], requireUserAuth=True
    )
    await api.register(email="grace@example.com", name="Grace")
    r = await api.http.post(
        "/api/team",
        json={"projectId": pid, "email": "grace@example.com", "role": "developer"},
        headers=bearer(token),
    )
    assert r.status_code == 201, r.text
    for email in ("alice@example.com", "bob@example.com"):
        r = await api.http.post(
            f"/api/projects/{pid}/auth/register",
            json={"email": email, "password": "correct horse battery"},
            headers={"X-Forwarded-For": random_ip()},
        )
        assert r.status_code == 201, r.text
    for q in (
        "CREATE TABLE notes (id serial PRIMARY KEY, user_id text NOT NULL DEFAULT auth.uid(), "
        "body text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
        "INSERT INTO notes (user_id, body) VALUES ('alice', 'Buy milk'), ('alice', 'Call Bob'), "
        "('bob', 'Write the report')",
        "CREATE TABLE audit_log (id bigserial PRIMARY KEY, action text, at timestamptz DEFAULT now())",
    ):
        r = await api.sql(admin, pid, q)
        assert r.json()["success"], r.text
    r = await api.http.post(
        f"/api/projects/{pid}/migrations",
        json={"name": "0001_tags", "sql": "CREATE TABLE tags (id serial PRIMARY KEY, label text UNIQUE)"},
        headers=bearer(admin),
    )
    assert r.status_code == 200, r.text
    # A second user's project, for the instance-admin screen.
    grace = await api.login("grace@example.com", "correct horse battery")
    other = await api.new_project(grace, "Grace's shop")
    r = await api.http.post(f"/api/admin/projects/{other}/suspend", headers=bearer(token))
    assert r.status_code == 200, r.text
    return user, token, pid


async def shoot(page: object, name: str, *, full: bool = True) -> None:
    path = OUT / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full)  # type: ignore[attr-defined]
    print(f"  {path.relative_to(ROOT)}")


async def shoot_progress(page: Any, bar: str, name: str, bytes_per_s: int, start: Awaitable[Any]) -> None:
    """Start an upload under Chromium's network throttle and shoot it with its bar part-way."""
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("Network.enable")
    slow = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": bytes_per_s}
    await cdp.send("Network.emulateNetworkConditions", slow)
    await start
    # (wait_for_function would evaluate a string, which the page's CSP refuses: poll instead)
    while float(await page.locator(bar).get_attribute("value") or 0) < 25:
        await asyncio.sleep(0.05)
    await shoot(page, name, full=False)
    await cdp.send("Network.emulateNetworkConditions", {**slow, "uploadThroughput": -1})
    await page.wait_for_load_state()


async def main() -> int:
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is absent: apt-get install -y chromium", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fluxbase-shots-") as tmp:
        stack = start_stack(Path(tmp))
        try:
            dbname = await stack.create_database()
            port = free_port()
            # Loopback webhook URLs are allowed here (no DNS offline): the demo webhook is a local one.
            env = stack.env(dbname, FLUXBASE_API_PORT=str(port), FLUXBASE_WEBHOOKS_ALLOW_LOOPBACK="true")
            with run_service(["api"], env, port, Path(tmp)) as server:
                await run(server.url)
        finally:
            stop_stack(stack)
    return 0


async def run(base: str) -> None:
    api = Api(base)
    async for browser in launch():
        # First-admin setup, before any account exists.
        ctx = await browser.new_context(viewport=DESKTOP, extra_http_headers={"X-Forwarded-For": random_ip()})
        page = await ctx.new_page()
        await page.goto(f"{base}/dashboard/")
        await shoot(page, "setup")
        await ctx.close()
        user, token, pid = await fill_demo(api)

        for label, viewport in (("", DESKTOP), ("-phone", PHONE)):
            ctx = await browser.new_context(viewport=viewport)
            page = await ctx.new_page()
            await page.goto(f"{base}/dashboard/sign-in")
            await shoot(page, "sign-in" + label)
            await sign_in(page, base, user["email"], user["password"])
            await shoot(page, "projects" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/")
            await shoot(page, "project-home" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/keys")
            if not label:
                await page.get_by_label("Name").fill("backend")
                await page.get_by_label("Scope").select_option("admin")
                await page.get_by_role("button", name="Create key").click()
                await page.locator("#new-key").wait_for()
            await shoot(page, "api-keys" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/rls")
            if not label:
                await page.get_by_label("Table", exact=True).select_option("notes")
                await page.get_by_role("button", name="Create policy").click()
                await page.get_by_role("status").filter(has_text="RLS is on").wait_for()
            await shoot(page, "rls" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/sql")
            editor = page.get_by_role("textbox", name=re.compile("^Query"))
            await editor.fill("SELECT id, body, created_at\nFROM notes\nWHERE body <> $1\nORDER BY id")
            await page.get_by_label(re.compile("^Parameters")).fill('["nothing"]')
            await page.get_by_label(re.compile("Run as an end user")).check()
            await page.get_by_label("authUid").fill("alice")
            await editor.press("Control+Enter")
            await page.get_by_role("table", name="Query result").wait_for()
            await shoot(page, "sql-editor" + label)
            if not label:
                await editor.fill("SELECT * FROM missing_table")
                await editor.press("Control+Enter")
                await page.locator("[data-sql-error]").wait_for()
                await shoot(page, "sql-editor-error")
            await page.goto(f"{base}/dashboard/p/{pid}/tables")
            await shoot(page, "tables" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/tables/notes")
            await shoot(page, "table-editor" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/storage")
            if not label:
                await page.get_by_label("Bucket name").fill("avatars")
                await page.get_by_role("button", name="Create bucket").click()
                await page.get_by_role("heading", name="avatars").wait_for()
                async with page.expect_navigation():
                    await page.get_by_label("choose files").set_input_files(
                        files=[{"name": "ada.png", "mimeType": "image/png", "buffer": PNG}]
                    )
                await page.goto(f"{base}/dashboard/p/{pid}/storage")
            await shoot(page, "storage" + label)
            await page.get_by_role("link", name="avatars").click()
            await shoot(page, "storage-bucket" + label)
            if not label:
                await shoot_progress(
                    page,
                    "#upload-progress",
                    "storage-upload-progress",
                    1024 * 1024,
                    page.get_by_label("choose files").set_input_files(
                        files=[
                            {"name": "talk.mp4", "mimeType": "video/mp4", "buffer": bytes(9 * 1024 * 1024)}
                        ]
                    ),
                )
            await page.goto(f"{base}/dashboard/p/{pid}/realtime")
            await shoot(page, "realtime" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/users")
            await shoot(page, "end-users" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/team")
            await shoot(page, "team" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/webhooks")
            if not label:
                await page.get_by_label("Endpoint URL").fill("http://localhost:3000/hooks/fluxbase")
                await page.get_by_role("button", name="Create webhook").click()
                await page.locator("#new-secret").wait_for()
                await shoot(page, "webhook")
                await page.goto(f"{base}/dashboard/p/{pid}/webhooks")
            await shoot(page, "webhooks" + label)
            await page.goto(f"{base}/dashboard/p/{pid}/settings")
            await shoot(page, "settings" + label)
            if not label:
                dump = await api.http.get(f"/api/projects/{pid}/export", headers=bearer(token))
                assert dump.status_code == 200, dump.text
                await page.get_by_label("New project's name (optional)").fill("Notes app (copy)")
                await page.get_by_label("Export file (.sql)").set_input_files(
                    files=[{"name": "notes.sql", "mimeType": "application/sql", "buffer": dump.content}]
                )
                await shoot_progress(
                    page,
                    "#import-progress",
                    "settings-import-progress",
                    max(len(dump.content) // 4, 1024),
                    page.get_by_role("button", name="Import", exact=True).click(),
                )
                await page.wait_for_url(re.compile(r"/dashboard/p/[0-9a-f]+/$"))
            await page.goto(f"{base}/dashboard/admin")
            await shoot(page, "admin" + label)
            await page.goto(f"{base}/dashboard/admin/p/{pid}")
            await shoot(page, "admin-quotas" + label)
            await ctx.close()
    await api.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
