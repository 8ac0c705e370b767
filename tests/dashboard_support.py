"""Helpers for the dashboard's browser tests: one Chromium per test module, a page per test."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import Api, bearer

CHROMIUM = Path(os.environ.get("FLUXBASE_CHROMIUM", "/usr/bin/chromium"))
ARGS = [
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
if os.geteuid() == 0:
    ARGS.insert(0, "--no-sandbox")

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium; .ci/run does)",
)

PASSWORD = "correct horse battery"


async def launch() -> AsyncIterator[Any]:
    """One browser for a module (tests open their own contexts and pages)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class Console:
    """Page errors and console errors (a CSP violation is reported as one) seen by a page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        # An expected 4xx answer (a refused sign-in) is logged as a failed load; tests check statuses.
        if message.type == "error" and not message.text.startswith("Failed to load resource: the server"):
            self.errors.append(f"console: {message.text}")


async def sign_in(page: Any, base_url: str, email: str, password: str = PASSWORD) -> None:
    await page.goto(f"{base_url}/dashboard/sign-in")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("heading", name="Projects").wait_for()


async def add_member(
    api: Api, admin_token: str, pid: str, user: dict[str, Any], token: str, role: str
) -> None:
    r = await api.http.post(
        "/api/team",
        json={"projectId": pid, "email": user["email"], "role": role},
        headers=bearer(admin_token),
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        "/api/team/invites/accept",
        json={"inviteId": r.json()["invite"]["id"], "status": "accepted"},
        headers=bearer(token),
    )
    assert r.status_code == 200, r.text


CSRF_RE = re.compile(r'name="_csrf" value="([^"]+)"')


def http_sign_in(client: httpx.Client, base_url: str, email: str, password: str) -> httpx.Response:
    """Sign in to the dashboard as a browser would, without one: the form's CSRF token, then POST."""
    page = client.get(f"{base_url}/dashboard/sign-in")
    match = CSRF_RE.search(page.text)
    assert match, page.text
    return client.post(
        f"{base_url}/dashboard/sign-in",
        data={"_csrf": match.group(1), "email": email, "password": password},
    )
