"""Signed session tokens (HS256 JWTs with expiry) for dashboard accounts and realtime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from fluxbase.errors import AuthRequired, TokenExpired

ALGORITHM = "HS256"
ISSUER = "fluxbase"


@dataclass(frozen=True)
class TokenClaims:
    subject: str
    session_id: str
    kind: str
    expires_at: int
    extra: dict[str, Any]


def _key(secret: str, kind: str) -> bytes:
    # Separate keys per token kind: a realtime token can never pass as a session token.
    import hashlib
    import hmac

    return hmac.new(secret.encode(), f"fluxbase-token:{kind}".encode(), hashlib.sha256).digest()


def issue(
    secret: str,
    *,
    kind: str,
    subject: str,
    session_id: str,
    ttl_seconds: int,
    extra: dict[str, Any] | None = None,
    now: float | None = None,
) -> tuple[str, int]:
    """Return (token, expires_at_epoch)."""
    issued = int(now if now is not None else time.time())
    exp = issued + ttl_seconds
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "typ": kind,
        "sub": subject,
        "sid": session_id,
        "iat": issued,
        "exp": exp,
    }
    if extra:
        payload.update(extra)
    return jwt.encode(payload, _key(secret, kind), algorithm=ALGORITHM), exp


def verify(secret: str, token: str, *, kind: str) -> TokenClaims:
    """Decode and check signature, issuer, kind and expiry; raise AuthRequired/TokenExpired."""
    try:
        payload = jwt.decode(
            token,
            _key(secret, kind),
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "sid", "typ"]},
        )
    except jwt.ExpiredSignatureError:
        raise TokenExpired() from None
    except jwt.PyJWTError:
        raise AuthRequired("Invalid or malformed token.") from None
    if payload.get("typ") != kind:
        raise AuthRequired("Invalid or malformed token.")
    extra = {k: v for k, v in payload.items() if k not in ("iss", "typ", "sub", "sid", "iat", "exp")}
    return TokenClaims(payload["sub"], payload["sid"], kind, int(payload["exp"]), extra)
