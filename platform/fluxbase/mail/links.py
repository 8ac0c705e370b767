"""Single-use link tokens and the redirect allow-list.

A token is `fxm_` + 32 random bytes; only its SHA-256 is stored. `consume` uses it up in one
statement (UPDATE ... WHERE used_at IS NULL AND expires_at > now() RETURNING), so two
concurrent uses cannot both succeed, and it runs in the caller's transaction, so a refused
effect (a weak new password, an address taken meanwhile) leaves the token unused.

Links point at a URL from the project's allow-list: a `redirectTo` must have exactly the scheme,
host and port of an allowed entry and a path under the entry's path (at a `/` boundary), and no
user-info or fragment; anything else is refused, whether or not the address has an account.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from fluxbase.errors import InvalidEmailToken, RedirectNotAllowed, ValidationError

PREFIX = "fxm_"
MAX_URL = 2048
MAX_REDIRECTS = 20


def new_token() -> tuple[str, bytes]:
    token = PREFIX + secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def consume(
    conn: asyncpg.Connection, token: str, purpose: str, project_id: str | None
) -> asyncpg.Record:
    """Use the token up (atomically), or refuse it: unknown, used, expired or for another purpose."""
    if not isinstance(token, str) or not token.startswith(PREFIX) or len(token) > 200:
        raise InvalidEmailToken()
    row = await conn.fetchrow(
        """UPDATE fluxbase.mail_tokens SET used_at = now()
           WHERE token_hash = $1 AND purpose = $2 AND project_id IS NOT DISTINCT FROM $3
             AND used_at IS NULL AND expires_at > now()
           RETURNING *""",
        hash_token(token),
        purpose,
        project_id,
    )
    if row is None:
        raise InvalidEmailToken()
    return row


def _parts(url: str) -> tuple[str, str, int, str]:
    p = urlsplit(url)
    if (
        p.scheme not in ("http", "https")
        or not p.hostname
        or p.username is not None
        or p.password is not None
    ):
        raise ValueError(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme, p.hostname.lower(), port, p.path or "/"


def check_allow_list(urls: Sequence[str]) -> tuple[str, ...]:
    """Validate a project's redirect allow-list (absolute http(s) URLs, no query or fragment)."""
    if len(urls) > MAX_REDIRECTS:
        raise ValidationError(f"redirectUrls may hold at most {MAX_REDIRECTS} URLs.")
    out = []
    for url in urls:
        if not isinstance(url, str) or len(url) > MAX_URL:
            raise ValidationError("redirectUrls must be absolute http(s) URLs.")
        try:
            _parts(url.strip())
        except ValueError:
            raise ValidationError(f"redirectUrls: {url!r} is not an absolute http(s) URL.") from None
        p = urlsplit(url.strip())
        if p.query or p.fragment or "#" in url:
            raise ValidationError(f"redirectUrls: {url!r} must have no query or fragment.")
        out.append(url.strip())
    return tuple(out)


def _under(path: str, prefix: str) -> bool:
    if path == prefix:
        return True
    return path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def choose_redirect(requested: str | None, allowed: Sequence[str]) -> str | None:
    """The URL a link should point at: `requested` if the allow-list covers it, else the first
    allowed URL; None when the project has none (the message then carries only the token)."""
    if requested is None or requested == "":
        return allowed[0] if allowed else None
    if not isinstance(requested, str) or len(requested) > MAX_URL or "#" in requested or "\\" in requested:
        raise RedirectNotAllowed()
    try:
        scheme, host, port, path = _parts(requested)
    except ValueError:
        raise RedirectNotAllowed() from None
    # No dot segments, also percent-encoded ones (browsers resolve %2e%2e as ..), which could
    # climb out of the allowed path prefix.
    if any(ord(c) < 0x21 for c in requested) or "/." in unquote(path):
        raise RedirectNotAllowed()
    for entry in allowed:
        e_scheme, e_host, e_port, e_path = _parts(entry)
        if (scheme, host, port) == (e_scheme, e_host, e_port) and _under(path, e_path):
            return requested
    raise RedirectNotAllowed()


def link(base: str | None, kind: str, token: str) -> str:
    """`base` with `type` and `token` added to its query; "" without a base."""
    if not base:
        return ""
    p = urlsplit(base)
    query = (p.query + "&" if p.query else "") + urlencode({"type": kind, "token": token})
    return urlunsplit((p.scheme, p.netloc, p.path, query, ""))
