"""argon2id password hashing, with a dummy verify so unknown emails cost the same time."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id with the library's RFC 9106 low-memory profile
_DUMMY_HASH = _hasher.hash("fluxbase-timing-equaliser")

MIN_PASSWORD_LENGTH = 8


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def verify_password(stored: str | None, password: str) -> bool:
    """Verify; with stored=None do the same work against a dummy hash and return False."""
    return await asyncio.to_thread(_verify, stored, password)
