"""The JavaScript client in a real Chromium: examples/live-list.html, served by the test, signs an
end user up and in, subscribes with the user's token and shows only the user's rows, live."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from fluxbase.devstack.procs import free_port
from support import ROOT, Api
from test_realtime import rt  # noqa: F401 - fixture

CHROMIUM = Path(os.environ.get("FLUXBASE_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium; .ci/run does)",
)


@pytest.fixture
async def site() -> AsyncIterator[str]:
    """The repository's examples/ and clients/js/ as static files on their own origin."""
    app = web.Application()
    app.router.add_static("/examples/", ROOT / "examples")
    app.router.add_static("/clients/js/", ROOT / "clients" / "js")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_live_list_page_in_chromium(api: Api, project, rt, site: str) -> None:  # noqa: F811
    from playwright.async_api import async_playwright

    admin = await api.new_key(project.owner_token, project.id, "admin", rateLimitRequests=1_000_000)
    for q in (
        "CREATE TABLE todos (id serial PRIMARY KEY, owner text NOT NULL DEFAULT auth.uid(), "
        "title text NOT NULL)",
        "ALTER TABLE todos ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own_todos ON todos USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())",
        "INSERT INTO todos (owner, title) VALUES ('someone-else', 'not yours')",
    ):
        assert (await api.sql(admin, project.id, q)).json()["success"]
    browser_key = await api.new_key(project.owner_token, project.id, "readwrite", requireUserAuth=True)
    url = f"{site}/examples/live-list.html?api={api.base_url}&ws={rt}&project={project.id}&key={browser_key}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(url)
            await page.fill("#email", "carol@example.com")
            await page.fill("#password", "correct horse battery")
            await page.click("#register")
            status = page.locator("#status")
            await status.filter(has_text="live").wait_for(timeout=15000)
            # From the page: through the client, with the user's token, shown by the live event.
            await page.fill("#title", "from the page")
            await page.click("#add button[type=submit]")
            await page.locator("#list li", has_text="from the page").wait_for(timeout=10000)
            # From a server, for this user and for someone else: only the user's row appears.
            user_id = await page.evaluate(
                f"JSON.parse(localStorage.getItem('fluxbase.session.{project.id}')).user.id"
            )
            for owner, title in (("someone-else", "still not yours"), (user_id, "from the server")):
                r = await api.sql(
                    admin, project.id, "INSERT INTO todos (owner, title) VALUES ($1, $2)", [owner, title]
                )
                assert r.json()["success"]
            await page.locator("#list li", has_text="from the server").wait_for(timeout=10000)
            items = await page.locator("#list li").all_inner_texts()
            assert items == ["from the page", "from the server"], items
            assert errors == []
        finally:
            await browser.close()


async def test_two_tabs_refresh_once(api: Api, project, rt, site: str) -> None:  # noqa: F811
    from playwright.async_api import async_playwright

    browser_key = await api.new_key(project.owner_token, project.id, "readwrite", requireUserAuth=True)
    admin = await api.new_key(project.owner_token, project.id, "admin", rateLimitRequests=1_000_000)
    for q in (
        "CREATE TABLE todos (id serial PRIMARY KEY, owner text NOT NULL DEFAULT auth.uid(), "
        "title text NOT NULL)",
        "ALTER TABLE todos ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY own_todos ON todos USING (owner = auth.uid()) WITH CHECK (owner = auth.uid())",
    ):
        assert (await api.sql(admin, project.id, q)).json()["success"]
    url = f"{site}/examples/live-list.html?api={api.base_url}&ws={rt}&project={project.id}&key={browser_key}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(url)
            await page.fill("#email", "dave@example.com")
            await page.fill("#password", "correct horse battery")
            await page.click("#register")
            await page.locator("#status").filter(has_text="live").wait_for(timeout=15000)
            await page.fill("#title", "one")
            await page.click("#add button[type=submit]")
            await page.locator("#list li", has_text="one").wait_for(timeout=10000)
            # A second tab shares the session (localStorage). Both find the access token about
            # to expire and call at once: one refresh happens (a Web Lock), the other tab adopts
            # its result. Spending the single-use refresh token twice would revoke the session.
            tab2 = await context.new_page()
            tab2.on("pageerror", lambda e: errors.append(str(e)))
            await tab2.goto(url)
            await tab2.locator("#status").filter(has_text="live").wait_for(timeout=15000)
            before = await page.evaluate("fluxbase.auth.session.refreshToken")
            expire_soon = "fluxbase.auth.session.expiresAt = Date.now() / 1000 + 5"
            await page.evaluate(expire_soon)
            await tab2.evaluate(expire_soon)
            count = "fluxbase.sql('SELECT count(*)::int AS c FROM todos').then(r => r.rows[0].c)"
            both = await asyncio.gather(page.evaluate(count), tab2.evaluate(count))
            assert both == [1, 1]
            after = [await p.evaluate("fluxbase.auth.session.refreshToken") for p in (page, tab2)]
            # Usually one refresh (the Web Lock, and the other tab adopts its pair); when Chromium's
            # localStorage lags between renderer processes both tabs spend the same token, and the
            # server's reuse grace answers the second with a pair of the same session.
            assert before not in after
            assert await page.evaluate(count) == 1 and await tab2.evaluate(count) == 1  # not revoked
            # And each tab keeps refreshing afterwards: nothing was revoked behind their backs.
            for p in (page, tab2):
                await p.evaluate(expire_soon)
                assert await p.evaluate(count) == 1
            assert errors == []
        finally:
            await browser.close()
