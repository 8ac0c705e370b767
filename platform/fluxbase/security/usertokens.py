"""End-user JWTs: Fluxbase's own project-user tokens and external ones, verified by one path.

No I/O here. The algorithm list is fixed per key type, so a token can never choose how it is
checked: HS256/384/512 only with a shared secret, RS*/PS*/ES*/EdDSA only with a JWKS key of the
matching type. `alg: none` is refused before anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt

from fluxbase.errors import InvalidUserToken, TokenExpired

OWN_ISSUER = "fluxbase"
OWN_ALGORITHM = "HS256"
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
# Asymmetric algorithms by JWK key type; an EC key also pins its curve.
ALGORITHMS_BY_KTY = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC": ("ES256", "ES384", "ES512"),
    "OKP": ("EdDSA",),
}
EC_CURVE_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
ASYMMETRIC_ALGORITHMS = tuple(a for algs in ALGORITHMS_BY_KTY.values() for a in algs)
LEEWAY_S = 5
MAX_TOKEN_CHARS = 16_384


@dataclass(frozen=True)
class Header:
    alg: str
    kid: str | None
    issuer: str | None


def own_key(secret: str, project_id: str) -> bytes:
    """The HMAC key for a project's own user tokens, derived from the server secret."""
    return hmac.new(secret.encode(), f"fluxbase-project-user:{project_id}".encode(), hashlib.sha256).digest()


def issue_own(
    secret: str, project_id: str, *, user_id: str, session_id: str, email: str, ttl_s: int
) -> tuple[str, int]:
    """A project user's access token: (token, expires_at_epoch)."""
    now = int(time.time())
    exp = now + ttl_s
    claims = {
        "iss": OWN_ISSUER,
        "aud": project_id,
        "sub": user_id,
        "sid": session_id,
        "email": email,
        "role": "authenticated",
        "iat": now,
        "exp": exp,
    }
    return jwt.encode(claims, own_key(secret, project_id), algorithm=OWN_ALGORITHM), exp


def peek(token: str) -> Header:
    """The unverified header and issuer, only to choose the key; refuses `alg: none` at once."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise InvalidUserToken("The end-user token is empty or too long.")
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidUserToken("The end-user token is malformed (not a JWT).") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg.lower() == "none":
        raise InvalidUserToken("Unsigned tokens (alg: none) are not accepted.")
    if alg not in HMAC_ALGORITHMS and alg not in ASYMMETRIC_ALGORITHMS:
        raise InvalidUserToken(f"Token algorithm {alg!r} is not accepted.")
    kid = header.get("kid")
    iss = claims.get("iss")
    return Header(alg, kid if isinstance(kid, str) else None, iss if isinstance(iss, str) else None)


def verify(
    token: str,
    key: Any,
    *,
    algorithm: str,
    issuers: list[str] | None,
    audiences: list[str] | None,
) -> dict[str, Any]:
    """Check signature (with exactly one algorithm), `exp`, `sub`, and iss/aud when configured."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audiences or None,
            issuer=issuers or None,
            leeway=LEEWAY_S,
            options={"require": ["exp", "sub"], "verify_aud": bool(audiences)},
        )
    except jwt.ExpiredSignatureError:
        raise TokenExpired("The end-user token has expired.") from None
    except jwt.InvalidIssuerError:
        raise InvalidUserToken("The token's issuer (iss) is not allowed for this project.") from None
    except jwt.InvalidAudienceError:
        raise InvalidUserToken("The token's audience (aud) is not accepted by this project.") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidUserToken(f"The token has no {exc.claim!r} claim.") from None
    except jwt.InvalidSignatureError:
        raise InvalidUserToken("The token's signature does not verify.") from None
    except jwt.PyJWTError as exc:
        raise InvalidUserToken(f"The end-user token is not valid ({type(exc).__name__}).") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 256 or "\x00" in sub:
        raise InvalidUserToken("The token's sub claim must be a non-empty string of at most 256 characters.")
    return claims


def jwk_algorithms(jwk: dict[str, Any]) -> tuple[str, ...]:
    """The algorithms a JWK may verify: by key type (and curve), narrowed by its own `alg`."""
    kty = jwk.get("kty")
    allowed = ALGORITHMS_BY_KTY.get(kty, ()) if isinstance(kty, str) else ()
    if kty == "EC":
        curve_alg = EC_CURVE_ALG.get(str(jwk.get("crv")))
        allowed = (curve_alg,) if curve_alg else ()
    if kty == "OKP" and jwk.get("crv") not in ("Ed25519", "Ed448"):
        allowed = ()
    own = jwk.get("alg")
    if isinstance(own, str):
        allowed = tuple(a for a in allowed if a == own)
    return allowed
