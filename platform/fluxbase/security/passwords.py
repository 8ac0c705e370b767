"""argon2id password hashing, with a dummy verify so unknown emails cost the same time."""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id with the library's RFC 9106 low-memory profile
# A hash of "fluxbase-timing-equaliser" with `_hasher`'s parameters, written out: hashing it at
# import cost every process ~0.2 s of CPU at start. Verifying against it costs what verifying a
# real hash does only while the parameters match (tests/test_accounts.py checks they do).
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$cqArQBP4Pa/TGlnM2ABA+g$2qr0nomoFx6ow04a/OqA4rPXF951FPvFH8Tx56ayuM0"
)

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
