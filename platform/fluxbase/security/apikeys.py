"""API key format: `flx_live_` + base62(32 random bytes) + a 6-char base62 CRC32 checksum.

The checksum lets a mistyped or truncated key be rejected without touching the database;
keys are stored only as SHA-256.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib

PREFIX = "flx_live_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # ceil(256 / log2(62))
_CHECK_LEN = 6
_KEY_RE = re.compile(rf"^{PREFIX}[0-9A-Za-z]{{{_BODY_LEN + _CHECK_LEN}}}$")
DISPLAY_PREFIX_LEN = len(PREFIX) + 6


def _base62(n: int, width: int) -> str:
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out)).rjust(width, "0")


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def generate() -> str:
    body = _base62(int.from_bytes(secrets.token_bytes(32), "big"), _BODY_LEN)
    return PREFIX + body + _checksum(body)


def looks_like_key(value: str) -> bool:
    return value.startswith(PREFIX)


def well_formed(key: str) -> bool:
    """Shape and checksum: False for any typo, with no database lookup."""
    if not _KEY_RE.match(key):
        return False
    body, check = key[len(PREFIX) : -_CHECK_LEN], key[-_CHECK_LEN:]
    return secrets.compare_digest(_checksum(body), check)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LEN]
