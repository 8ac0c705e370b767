"""Login and sign-up throttling: counters in the control plane, shared by every process.

A login attempt is counted, before its password is checked, against three counters: the account
and the client together, the account from anywhere, and the client against any account. It may
go ahead only while all three are under their limits; if one is full, nothing is counted and
the caller gets RATE_LIMIT with Retry-After. The check and the count happen under row locks
taken in key order in one transaction, so a parallel burst cannot slip between them. Only the
account's own successful login clears the account's counters (and the one for this client); a
success gives back the client counter's one attempt and nothing more, so logging in to one's
own account buys no guesses at another. A client the account has logged in from before is
not held to the account counter (only to its own), so filling that counter locks everyone out
for a window except the owner where they usually log in. A client is an IPv4 address or an
IPv6 /64 (one subscriber usually holds a whole /64). Sign-ups count per client alone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from fluxbase.config import AuthSettings, MailSettings
from fluxbase.errors import RateLimited

MAX_CLIENT_CHARS = 64
ACQUIRE_TIMEOUT_S = 5.0  # a control connection not free by then: 503, not an unbounded wait

# Lock (creating it when missing) every counter in key order, starting a new window where the
# old one has passed; answers each counter's attempts in its current window.
_LOCK = """
INSERT INTO fluxbase.auth_throttle AS t (key, hits, resets_at)
SELECT u.key, 0, now() + make_interval(secs => u.window_s)
FROM unnest($1::text[], $2::int[]) AS u(key, window_s) ORDER BY u.key
ON CONFLICT (key) DO UPDATE
    SET hits = CASE WHEN t.resets_at <= now() THEN 0 ELSE t.hits END,
        resets_at = CASE WHEN t.resets_at <= now() THEN EXCLUDED.resets_at ELSE t.resets_at END
RETURNING t.key, t.hits, extract(epoch FROM t.resets_at - now())::float8 AS retry_s
"""
_COUNT = "UPDATE fluxbase.auth_throttle SET hits = hits + 1 WHERE key = ANY($1::text[])"
_SUCCEEDED = """
WITH cleared AS (DELETE FROM fluxbase.auth_throttle WHERE key = ANY($1::text[])),
known AS (
    INSERT INTO fluxbase.auth_throttle (key, hits, resets_at)
    VALUES ($3, 0, now() + make_interval(secs => $4))
    ON CONFLICT (key) DO UPDATE SET resets_at = EXCLUDED.resets_at
)
UPDATE fluxbase.auth_throttle SET hits = greatest(hits - 1, 0) WHERE key = $2
"""
_KNOWN = "SELECT EXISTS (SELECT 1 FROM fluxbase.auth_throttle WHERE key = $1 AND resets_at > now())"
# A client the account logged in from is remembered this long (see LoginCounters.known).
KNOWN_CLIENT_S = 30 * 24 * 3600


@dataclass(frozen=True)
class Counter:
    key: str
    limit: int
    window_s: int


@dataclass(frozen=True)
class LoginCounters:
    """The counters one login attempt is held to. A client the account has logged in from
    before (`known`, a marker row) is not held to the account counter: anyone can fill that one
    and lock the account for a window, but not for its owner at home."""

    pair: Counter
    account: Counter
    client: Counter
    known: str


def client_group(client_ip: str) -> str:
    """What one client counts as: an IPv4 address (also when IPv4-mapped), or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip[:MAX_CLIENT_CHARS]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def unknown_account(email: str) -> str:
    """The account name of an email with no account (hashed: the table keeps no addresses)."""
    return "unknown:" + hashlib.sha256(email.strip().casefold().encode()).hexdigest()[:32]


def login_counters(settings: AuthSettings, realm: str, account: str, client_ip: str) -> LoginCounters:
    """`realm` is "dashboard" or a project id; `account` a user id or `unknown_account(email)`."""
    client = client_group(client_ip)
    window = settings.login_window_seconds
    return LoginCounters(
        pair=Counter(f"login:{realm}:{account}:{client}", settings.login_max_failures, window),
        account=Counter(f"login:{realm}:{account}", settings.login_account_max_failures, window),
        client=Counter(f"login-client:{realm}:{client}", settings.login_ip_max_failures, window),
        known=f"login-known:{realm}:{account}:{client}",
    )


async def _take(db: asyncpg.Pool, counters: Sequence[Counter], message: str) -> None:
    """Count one attempt on every counter, or on none when one of them is full (RATE_LIMIT)."""
    async with db.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        await _take_in(conn, counters, message)


async def _take_in(conn: asyncpg.Connection, counters: Sequence[Counter], message: str) -> None:
    """`_take` inside the caller's transaction."""
    by_key = {c.key: c for c in counters}
    rows = await conn.fetch(_LOCK, list(by_key), [c.window_s for c in by_key.values()])
    full = [r["retry_s"] for r in rows if r["hits"] >= by_key[r["key"]].limit]
    if full:
        raise RateLimited(math.ceil(max(full)), message)
    await conn.execute(_COUNT, list(by_key))


async def login_attempt(db: asyncpg.Pool, counters: LoginCounters) -> None:
    """Count a login attempt before its password is checked, or refuse it (RATE_LIMIT)."""
    held = [counters.pair, counters.client]
    if not await db.fetchval(_KNOWN, counters.known):
        held.append(counters.account)
    await _take(db, held, "Too many failed login attempts. Try again later.")


async def login_succeeded(db: asyncpg.Pool, counters: LoginCounters) -> None:
    """The account's own success clears its counters and remembers the client as known; the
    client counter gets this one attempt back."""
    await db.execute(
        _SUCCEEDED,
        [counters.pair.key, counters.account.key],
        counters.client.key,
        counters.known,
        KNOWN_CLIENT_S,
    )


async def signup_attempt(db: asyncpg.Pool, settings: AuthSettings, realm: str, client_ip: str) -> None:
    """Count a registration from this client, or refuse it (RATE_LIMIT)."""
    counter = Counter(
        f"signup:{realm}:{client_group(client_ip)}",
        settings.register_max_per_ip,
        settings.register_window_seconds,
    )
    await _take(db, [counter], "Too many sign-ups from this address. Try again later.")


async def mail_request_attempt(
    conn: asyncpg.Connection, settings: MailSettings, realm: str, email: str, client_ip: str
) -> None:
    """Count a request that sends mail (reset, magic link, verification) per address and per
    client, or refuse it (RATE_LIMIT). The same for addresses with and without an account. In
    the caller's transaction: the request's own writes commit with the count, so a request for
    an unknown address writes (and flushes) as much as one for a known address."""
    window = settings.request_window_s
    counters = [
        Counter(f"mail:{realm}:{unknown_account(email)[8:]}", settings.request_max_per_address, window),
        Counter(f"mail-client:{realm}:{client_group(client_ip)}", settings.request_max_per_ip, window),
    ]
    await _take_in(conn, counters, "Too many email requests. Try again later.")
