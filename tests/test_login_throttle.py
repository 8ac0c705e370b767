"""Login and registration throttling through the real HTTP API (issue 15, finding 6).

Dashboard accounts and project end users are throttled alike: failures per (account, client)
and per account, cleared only by that account's own successful login, counted atomically, with
IPv6 clients grouped by /64; registration per client. Every test runs on both surfaces.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fluxbase.config import AuthSettings, load_settings
from fluxbase.worker import housekeeping
from support import Api, assert_error, random_ip

PASSWORD = "correct horse battery"
WRONG = "not the password at all"
DEFAULTS = AuthSettings(secret_key="x" * 48)

# The instance the limit tests share: small limits so that crossing them takes few argon2 runs.
LOW = {
    "FLUXBASE_LOGIN_MAX_FAILURES": "3",
    "FLUXBASE_LOGIN_ACCOUNT_MAX_FAILURES": "6",
    "FLUXBASE_LOGIN_IP_MAX_FAILURES": "8",
    "FLUXBASE_REGISTER_MAX_PER_IP": "4",
}


@dataclass
class Surface:
    """Register and log in either dashboard accounts or one project's end users."""

    api: Api
    base: str  # "/api/auth" or "/api/projects/<id>/auth"

    async def register_raw(self, email: str, ip: str, password: str = PASSWORD) -> httpx.Response:
        return await self.api.http.post(
            f"{self.base}/register",
            json={"email": email, "password": password},
            headers={"X-Forwarded-For": ip},
        )

    async def register(self) -> str:
        email = f"t-{secrets.token_hex(5)}@example.com"
        r = await self.register_raw(email, random_ip())
        assert r.status_code == 201, r.text
        return email

    async def login(self, email: str, password: str, ip: str) -> httpx.Response:
        return await self.api.http.post(
            f"{self.base}/login", json={"email": email, "password": password}, headers={"X-Forwarded-For": ip}
        )


async def _surface(api: Api, kind: str) -> Surface:
    if kind == "dashboard":
        return Surface(api, "/api/auth")
    _, token = await api.new_user()
    pid = await api.new_project(token)
    return Surface(api, f"/api/projects/{pid}/auth")


KINDS = pytest.mark.parametrize("kind", ["dashboard", "end-user"])


def _retry_after(r: httpx.Response, window: int) -> int:
    assert_error(r, 429, "RATE_LIMIT")
    seconds = int(r.headers["Retry-After"])
    assert 1 <= seconds <= window + 1, seconds
    return seconds


@KINDS
async def test_own_success_does_not_reset_guesses_at_another_account(
    api: Api, instance_admin, kind: str
) -> None:
    """The finding: 4 wrong guesses at the victim, 1 correct login of the attacker's own account,
    repeated, used to guess without limit from one address."""
    s = await _surface(api, kind)
    victim, attacker = await s.register(), await s.register()
    ip = random_ip()
    answers = []
    for _ in range(3):
        for _ in range(4):
            answers.append((await s.login(victim, WRONG, ip)).status_code)
        assert (await s.login(attacker, PASSWORD, ip)).status_code == 200
    limit = DEFAULTS.login_max_failures
    assert answers[:limit] == [401] * limit
    assert set(answers[limit:]) == {429}, answers
    # Even the right password is refused from there until the window passes.
    _retry_after(await s.login(victim, PASSWORD, ip), DEFAULTS.login_window_seconds)
    # The victim elsewhere is not locked out by one address's failures.
    assert (await s.login(victim, PASSWORD, random_ip())).status_code == 200


@KINDS
async def test_parallel_burst_gets_no_more_guesses_than_the_limit(
    api: Api, instance_admin, kind: str
) -> None:
    s = await _surface(api, kind)
    victim = await s.register()
    ip = random_ip()
    burst = await asyncio.gather(*(s.login(victim, f"{WRONG} {i}", ip) for i in range(16)))
    codes = sorted(r.status_code for r in burst)
    assert codes.count(401) == DEFAULTS.login_max_failures, codes
    assert set(codes) == {401, 429}
    for r in burst:
        if r.status_code == 429:
            _retry_after(r, DEFAULTS.login_window_seconds)
    assert_error(await s.login(victim, PASSWORD, ip), 429, "RATE_LIMIT")


@KINDS
async def test_the_accounts_own_success_clears_its_failures(api: Api, instance_admin, kind: str) -> None:
    s = await _surface(api, kind)
    user = await s.register()
    ip = random_ip()
    for _ in range(2):
        for _ in range(DEFAULTS.login_max_failures - 1):
            assert_error(await s.login(user, WRONG, ip), 401, "AUTH_REQUIRED")
        assert (await s.login(user, PASSWORD, ip)).status_code == 200


@KINDS
async def test_ipv6_clients_are_grouped_by_64(api: Api, instance_admin, kind: str) -> None:
    s = await _surface(api, kind)
    victim = await s.register()
    net = f"2001:db8:{secrets.randbelow(0xFFFF):x}:{secrets.randbelow(0xFFFF):x}"
    for i in range(DEFAULTS.login_max_failures):
        assert_error(await s.login(victim, WRONG, f"{net}::{i + 1:x}"), 401, "AUTH_REQUIRED")
    # Every other address of that /64 is the same client; the IPv4-mapped form of an address too.
    _retry_after(await s.login(victim, PASSWORD, f"{net}:ffff:1:2:3"), DEFAULTS.login_window_seconds)
    v4 = random_ip()
    for _ in range(DEFAULTS.login_max_failures):
        assert_error(await s.login(victim, WRONG, v4), 401, "AUTH_REQUIRED")
    assert_error(await s.login(victim, PASSWORD, f"::ffff:{v4}"), 429, "RATE_LIMIT")
    # Another /64 is another client.
    assert (
        await s.login(victim, PASSWORD, f"2001:db8:ffff:{secrets.randbelow(0xFFFF):x}::1")
    ).status_code == 200


@KINDS
async def test_unknown_accounts_are_throttled_like_known_ones(api: Api, instance_admin, kind: str) -> None:
    s = await _surface(api, kind)
    ghost = f"nobody-{secrets.token_hex(5)}@example.com"
    ip = random_ip()
    for _ in range(DEFAULTS.login_max_failures):
        assert_error(await s.login(ghost, WRONG, ip), 401, "AUTH_REQUIRED")
    assert_error(await s.login(ghost.upper(), WRONG, ip), 429, "RATE_LIMIT")


# -- limits of a dedicated instance (small, so crossing them is cheap) --------------------------


@pytest.fixture(scope="module")
async def low(spawn: Callable[..., Any]) -> AsyncIterator[Api]:
    async with spawn(**LOW) as inst:
        api = Api(inst.url)
        try:
            await api.register(email="root@example.com")
            yield api
        finally:
            await api.close()


@KINDS
async def test_guesses_spread_over_many_addresses_hit_the_account_limit(low: Api, kind: str) -> None:
    s = await _surface(low, kind)
    victim = await s.register()
    answers = [(await s.login(victim, WRONG, random_ip())).status_code for _ in range(8)]
    assert answers == [401] * 6 + [429] * 2, answers
    # The account itself is throttled now, from every address, until the window passes.
    assert_error(await s.login(victim, PASSWORD, random_ip()), 429, "RATE_LIMIT")


@KINDS
async def test_the_owner_is_not_locked_out_where_they_logged_in_before(low: Api, kind: str) -> None:
    """The account limit lets anyone lock an account for a window; a client the account has
    logged in from before is held to its own (account, client) limit instead."""
    s = await _surface(low, kind)
    victim = await s.register()
    home = random_ip()
    assert (await s.login(victim, PASSWORD, home)).status_code == 200
    answers = [(await s.login(victim, WRONG, random_ip())).status_code for _ in range(8)]
    assert answers == [401] * 6 + [429] * 2, answers
    assert_error(await s.login(victim, PASSWORD, random_ip()), 429, "RATE_LIMIT")
    assert (await s.login(victim, PASSWORD, home)).status_code == 200
    # Home is not a free pass for guessing: its own limit still holds.
    for _ in range(3):
        assert_error(await s.login(victim, WRONG, home), 401, "AUTH_REQUIRED")
    assert_error(await s.login(victim, PASSWORD, home), 429, "RATE_LIMIT")


@KINDS
async def test_one_address_spraying_many_accounts_hits_the_client_limit(low: Api, kind: str) -> None:
    s = await _surface(low, kind)
    ip = random_ip()
    own = await s.register()
    answers = []
    for i in range(10):
        answers.append(
            (await s.login(f"sprayed-{i}-{secrets.token_hex(3)}@example.com", WRONG, ip)).status_code
        )
        # The client's own successful logins do not buy it more failures.
        assert (await s.login(own, PASSWORD, ip)).status_code in (200, 429)
    assert answers == [401] * 8 + [429] * 2, answers


@KINDS
async def test_registration_is_throttled_per_client(low: Api, kind: str) -> None:
    s = await _surface(low, kind)
    ip = random_ip()
    codes = []
    for _ in range(5):
        codes.append((await s.register_raw(f"r-{secrets.token_hex(5)}@example.com", ip)).status_code)
    assert codes == [201] * 4 + [429], codes
    r = await s.register_raw(f"r-{secrets.token_hex(5)}@example.com", ip)
    _retry_after(r, DEFAULTS.register_window_seconds)
    # Another client may still sign up.
    assert (await s.register_raw(f"r-{secrets.token_hex(5)}@example.com", random_ip())).status_code == 201


async def test_throttle_state_is_not_in_responses(low: Api) -> None:
    """A refused login says nothing about whether the account exists or how many tries are left."""
    s = await _surface(low, "dashboard")
    known = await s.register()
    ghost = f"ghost-{secrets.token_hex(4)}@example.com"
    ip = random_ip()
    bodies = []
    for email in (known, ghost):
        for _ in range(4):
            r = await s.login(email, WRONG, ip)
        bodies.append(r.json())
    assert bodies[0] == bodies[1] and bodies[0]["error"]["code"] == "RATE_LIMIT"


async def test_counters_hold_no_addresses_and_housekeeping_trims_them(
    api: Api, instance, control_db, instance_admin
) -> None:
    s = await _surface(api, "dashboard")
    known = await s.register()
    ghost = f"ghost-{secrets.token_hex(5)}@example.com"
    ip = random_ip()
    for email in (known, ghost):
        assert_error(await s.login(email, WRONG, ip), 401, "AUTH_REQUIRED")
    rows = await control_db.fetch("SELECT key, hits FROM fluxbase.auth_throttle WHERE key LIKE $1", f"%:{ip}")
    assert len(rows) == 3, rows  # (account, client) for each account, and the client over all
    assert not any("@" in r["key"] or "ghost" in r["key"] for r in rows), rows
    await control_db.execute(
        "UPDATE fluxbase.auth_throttle SET resets_at = now() - interval '1 second' WHERE key LIKE $1",
        f"%:{ip}",
    )
    counts = await housekeeping(control_db, load_settings(instance.env))
    assert counts["throttleCounters"] >= 3
    assert (
        await control_db.fetchval("SELECT count(*) FROM fluxbase.auth_throttle WHERE key LIKE $1", f"%:{ip}")
        == 0
    )
