"""Project end users: registration, login, refresh-token sessions, admin actions, auth settings.

These are a project's own users (its app's customers), separate from dashboard accounts. An
access token is a short-lived HS256 JWT (issuer `fluxbase`, audience the project id, a key
derived from the server secret per project) naming a session; the refresh token is opaque,
stored as SHA-256 and used once. Revoking the session ends both.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.errors import (
    AuthRequired,
    Conflict,
    EmailNotVerified,
    InvalidEmailToken,
    InvalidUserToken,
    ProjectSuspended,
    RateLimited,
    RegistrationClosed,
    UserDisabled,
    UserNotFound,
    ValidationError,
)
from fluxbase.mail import links, outbox
from fluxbase.security import passwords, usertokens
from fluxbase.services import accounts, throttle
from fluxbase.services.access import Project, load_project

REFRESH_PREFIX = "fxr_"
MIN_JWT_SECRET_CHARS = 32
MAX_LIST = 1000


@dataclass(frozen=True)
class ProjectUser:
    id: str
    project_id: str
    email: str
    display_name: str
    disabled_at: datetime | None
    created_at: datetime
    last_login_at: datetime | None
    email_verified_at: datetime | None = None

    @classmethod
    def from_row(cls, r: asyncpg.Record) -> ProjectUser:
        return cls(
            r["id"],
            r["project_id"],
            r["email"],
            r["display_name"],
            r["disabled_at"],
            r["created_at"],
            r["last_login_at"],
            r["email_verified_at"],
        )


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    expires_at: int
    refresh_token: str
    user: ProjectUser


@dataclass(frozen=True)
class AuthConfig:
    """A project's end-user auth settings; `jwt_secret` never leaves the server."""

    registration_open: bool = True
    jwt_secret: str | None = None
    jwks_uri: str | None = None
    jwt_allowed_issuers: tuple[str, ...] = ()
    jwt_expected_audiences: tuple[str, ...] = ()
    email_verification: str = "off"  # off | optional | required
    redirect_urls: tuple[str, ...] = ()


VERIFICATION_MODES = ("off", "optional", "required")


# -- settings ---------------------------------------------------------------------------------


async def get_config(db: asyncpg.Pool | asyncpg.Connection, project_id: str) -> AuthConfig:
    row = await db.fetchrow("SELECT * FROM fluxbase.project_auth_settings WHERE project_id = $1", project_id)
    if row is None:
        return AuthConfig()
    return AuthConfig(
        row["registration_open"],
        row["jwt_secret"],
        row["jwks_uri"],
        tuple(row["jwt_allowed_issuers"]),
        tuple(row["jwt_expected_audiences"]),
        row["email_verification"],
        tuple(row["redirect_urls"]),
    )


def _check_uri(uri: str) -> str:
    parts = urlsplit(uri.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or len(uri) > 2048:
        raise ValidationError(
            "jwksUri must be an http(s) URL, e.g. https://issuer.example.com/.well-known/jwks.json."
        )
    return uri.strip()


def _check_list(name: str, values: list[str]) -> tuple[str, ...]:
    if len(values) > 20 or any(not isinstance(v, str) or not v.strip() or len(v) > 512 for v in values):
        raise ValidationError(f"{name} must be a list of at most 20 non-empty strings.")
    return tuple(v.strip() for v in values)


async def update_config(db: asyncpg.Pool, project_id: str, changes: dict[str, Any]) -> AuthConfig:
    """Apply a partial update (already type-checked); validate everything before writing."""
    current = await get_config(db, project_id)
    values: dict[str, Any] = {
        "registration_open": current.registration_open,
        "jwt_secret": current.jwt_secret,
        "jwks_uri": current.jwks_uri,
        "jwt_allowed_issuers": current.jwt_allowed_issuers,
        "jwt_expected_audiences": current.jwt_expected_audiences,
        "email_verification": current.email_verification,
        "redirect_urls": current.redirect_urls,
    }
    if "email_verification" in changes:
        if changes["email_verification"] not in VERIFICATION_MODES:
            raise ValidationError("emailVerification must be off, optional or required.")
        values["email_verification"] = changes["email_verification"]
    if "redirect_urls" in changes:
        values["redirect_urls"] = links.check_allow_list(changes["redirect_urls"] or [])
    if "registration_open" in changes:
        values["registration_open"] = bool(changes["registration_open"])
    if "jwt_secret" in changes:
        secret = changes["jwt_secret"]
        if secret is not None and (len(secret) < MIN_JWT_SECRET_CHARS or len(secret) > 4096):
            raise ValidationError(f"jwtSecret must be at least {MIN_JWT_SECRET_CHARS} characters.")
        values["jwt_secret"] = secret or None
    if "jwks_uri" in changes:
        values["jwks_uri"] = _check_uri(changes["jwks_uri"]) if changes["jwks_uri"] else None
    if "jwt_allowed_issuers" in changes:
        values["jwt_allowed_issuers"] = _check_list("jwtAllowedIssuers", changes["jwt_allowed_issuers"] or [])
    if "jwt_expected_audiences" in changes:
        values["jwt_expected_audiences"] = _check_list(
            "jwtExpectedAudiences", changes["jwt_expected_audiences"] or []
        )
    await db.execute(
        """INSERT INTO fluxbase.project_auth_settings AS s (project_id, registration_open, jwt_secret,
               jwks_uri, jwt_allowed_issuers, jwt_expected_audiences, email_verification, redirect_urls)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (project_id) DO UPDATE SET registration_open = EXCLUDED.registration_open,
               jwt_secret = EXCLUDED.jwt_secret, jwks_uri = EXCLUDED.jwks_uri,
               jwt_allowed_issuers = EXCLUDED.jwt_allowed_issuers,
               jwt_expected_audiences = EXCLUDED.jwt_expected_audiences,
               email_verification = EXCLUDED.email_verification, redirect_urls = EXCLUDED.redirect_urls,
               updated_at = now()""",
        project_id,
        values["registration_open"],
        values["jwt_secret"],
        values["jwks_uri"],
        list(values["jwt_allowed_issuers"]),
        list(values["jwt_expected_audiences"]),
        values["email_verification"],
        list(values["redirect_urls"]),
    )
    return await get_config(db, project_id)


# -- registration, login, sessions ------------------------------------------------------------


async def _active_project(db: asyncpg.Pool, project_id: str) -> None:
    """Public end-user endpoints take no API key: the project must exist and be active."""
    if (await load_project(db, project_id)).status == "suspended":
        raise ProjectSuspended()


async def register(
    db: asyncpg.Pool,
    settings: Settings,
    project_id: str,
    email: str,
    password: str,
    display_name: str,
    client_ip: str,
    redirect_to: str | None = None,
) -> ProjectUser:
    """A new project user; sign-ups are throttled per project and client. With email
    verification on, the verification message is queued in the same transaction."""
    email = accounts.normalise_email(email)
    accounts.check_password_strength(password)
    project = await load_project(db, project_id)
    if project.status == "suspended":
        raise ProjectSuspended()
    config = await get_config(db, project_id)
    if not config.registration_open:
        raise RegistrationClosed("Registration is closed for this project.")
    base = links.choose_redirect(redirect_to, config.redirect_urls)
    await throttle.signup_attempt(db, settings.auth, project_id, client_ip)
    pw_hash = await passwords.hash_password(password)
    try:
        async with db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """INSERT INTO fluxbase.project_users (id, project_id, email, password_hash, display_name)
                   VALUES ($1, $2, $3, $4, $5) RETURNING *""",
                ids.prefixed("pu"),
                project_id,
                email,
                pw_hash,
                display_name.strip()[:200],
            )
            assert row is not None
            if config.email_verification != "off":
                await _send_link(conn, settings, project, "verify", row["id"], email, email, base)
    except asyncpg.UniqueViolationError:
        if config.email_verification != "required":
            # The new account could sign in at once (its login would tell), so the answer
            # cannot hide that the address has one.
            raise Conflict("A user with this email already exists in this project.") from None
        await _signup_with_a_taken_address(db, settings, project, email, pw_hash, client_ip, base)
        # Answer exactly as for a new address: a user that is not verified yet.
        now = datetime.now(UTC)
        return ProjectUser(ids.prefixed("pu"), project_id, email, display_name.strip()[:200], None, now, None)
    return ProjectUser.from_row(row)


async def _signup_with_a_taken_address(
    db: asyncpg.Pool,
    settings: Settings,
    project: Project,
    email: str,
    pw_hash: str,
    client_ip: str,
    base: str | None,
) -> None:
    """Someone signed up with an address that has an account (with verification required, the
    answer does not say so). The chosen password is kept only so that logging in with it answers
    EMAIL_NOT_VERIFIED as for a new account (sql/0027); it never becomes the account's password.
    The address's owner gets a notice with a password-reset link — never a verification link for
    the existing account, whose password may be an attacker's who signed up first (following the
    reset proves the address, sets the owner's own password and ends every session). Throttled
    per address like the request endpoints; over the limit nothing is sent, the answer is the same."""
    try:
        async with db.acquire() as conn, conn.transaction():
            await throttle.mail_request_attempt(conn, settings.mail, project.id, email, client_ip)
            user = await conn.fetchrow(
                """SELECT id, email FROM fluxbase.project_users
                   WHERE project_id = $1 AND lower(email) = lower($2) AND disabled_at IS NULL""",
                project.id,
                email,
            )
            if user is None:
                return
            await conn.execute(
                """WITH gone AS (
                       DELETE FROM fluxbase.project_user_signup_attempts
                       WHERE user_id = $1 AND expires_at <= now())
                   INSERT INTO fluxbase.project_user_signup_attempts (user_id, password_hash, expires_at)
                   VALUES ($1, $2, now() + make_interval(secs => $3))""",
                user["id"],
                pw_hash,
                int(settings.mail.verify_ttl_s),
            )
            await _send_link(
                conn,
                settings,
                project,
                "reset",
                user["id"],
                user["email"],
                user["email"],
                base,
                kind="signup_existing",
            )
    except RateLimited:
        return


def _hash_refresh(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def _new_refresh(conn: asyncpg.Connection, session_id: str) -> str:
    token = REFRESH_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO fluxbase.project_user_refresh_tokens (token_hash, session_id) VALUES ($1, $2)",
        _hash_refresh(token),
        session_id,
    )
    return token


def _access(settings: Settings, user: ProjectUser, session_id: str) -> tuple[str, int]:
    return usertokens.issue_own(
        settings.auth.secret_key,
        user.project_id,
        user_id=user.id,
        session_id=session_id,
        email=user.email,
        ttl_s=settings.end_user.access_ttl_s,
    )


async def login(
    db: asyncpg.Pool, settings: Settings, project_id: str, email: str, password: str, client_ip: str
) -> TokenPair:
    """Unknown email and wrong password cost the same (a dummy argon2 verify) and answer the same.

    Throttled as dashboard logins are (services/throttle.py), within the project."""
    await _active_project(db, project_id)
    row = None
    if len(email) <= accounts.MAX_EMAIL_CHARS:
        row = await db.fetchrow(
            "SELECT * FROM fluxbase.project_users WHERE project_id = $1 AND lower(email) = lower($2)",
            project_id,
            email.strip(),
        )
    account = row["id"] if row is not None else throttle.unknown_account(email)
    counters = throttle.login_counters(settings.auth, project_id, account, client_ip)
    await throttle.login_attempt(db, counters)
    ok = await passwords.verify_password(row["password_hash"] if row else None, password)
    if row is not None and not ok and await _matches_a_signup_attempt(db, row["id"], password):
        # The password of a sign-up answered as new (register, verification required): answer as
        # a new account would, not as a wrong password, so the pair does not reveal the address.
        raise EmailNotVerified()
    if not ok or row is None:
        raise AuthRequired("Invalid email or password.")
    await throttle.login_succeeded(db, counters)  # the right password, even for a disabled user
    user = ProjectUser.from_row(row)
    if user.disabled_at is not None:
        raise UserDisabled()
    if user.email_verified_at is None and (await get_config(db, project_id)).email_verification == "required":
        raise EmailNotVerified()
    async with db.acquire() as conn, conn.transaction():
        return await _start_session(conn, settings, user)


async def _matches_a_signup_attempt(db: asyncpg.Pool, user_id: str, password: str) -> bool:
    hashes = await db.fetch(
        """SELECT password_hash FROM fluxbase.project_user_signup_attempts
           WHERE user_id = $1 AND expires_at > now() ORDER BY created_at DESC LIMIT 3""",
        user_id,
    )
    for h in hashes:
        if await passwords.verify_password(h["password_hash"], password):
            return True
    return False


async def _start_session(conn: asyncpg.Connection, settings: Settings, user: ProjectUser) -> TokenPair:
    session_id = ids.prefixed("pus", 16)
    await conn.execute(
        """INSERT INTO fluxbase.project_user_sessions (id, user_id, expires_at)
           VALUES ($1, $2, now() + make_interval(secs => $3))""",
        session_id,
        user.id,
        settings.end_user.refresh_ttl_s,
    )
    await conn.execute("UPDATE fluxbase.project_users SET last_login_at = now() WHERE id = $1", user.id)
    refresh_token = await _new_refresh(conn, session_id)
    token, exp = _access(settings, user, session_id)
    return TokenPair(token, exp, refresh_token, user)


_SESSION_USER = """
SELECT u.*, s.revoked_at AS s_revoked_at, s.expires_at AS s_expires_at
FROM fluxbase.project_user_sessions s JOIN fluxbase.project_users u ON u.id = s.user_id
WHERE s.id = $1 AND u.project_id = $2
"""


async def refresh(db: asyncpg.Pool, settings: Settings, project_id: str, refresh_token: str) -> TokenPair:
    """Exchange a refresh token for a new pair; a reused one revokes its whole session."""
    if not isinstance(refresh_token, str) or not refresh_token.startswith(REFRESH_PREFIX):
        raise InvalidUserToken("The refresh token is malformed.")
    await _active_project(db, project_id)
    token_hash = _hash_refresh(refresh_token)
    refused: str | None = None
    pair: TokenPair | None = None
    async with db.acquire() as conn, conn.transaction():
        # `concurrent`: used moments ago, no token of its session used since, and only one
        # successor so far — the same client (two tabs of one session) refreshing twice at once,
        # not a stolen copy. The grace is given once per token: a third use revokes the session,
        # so a used token can fork the session at most once (hostile review 3).
        row = await conn.fetchrow(
            """SELECT r.session_id, r.used_at,
                      r.used_at IS NOT NULL
                      AND r.used_at > now() - make_interval(secs => $2)
                      AND NOT EXISTS (SELECT 1 FROM fluxbase.project_user_refresh_tokens n
                                      WHERE n.session_id = r.session_id AND n.used_at > r.used_at)
                      AND (SELECT count(*) FROM fluxbase.project_user_refresh_tokens n
                           WHERE n.session_id = r.session_id AND n.created_at >= r.used_at) < 2
                      AS concurrent
               FROM fluxbase.project_user_refresh_tokens r
               WHERE r.token_hash = $1 FOR UPDATE OF r""",
            token_hash,
            settings.end_user.refresh_reuse_s,
        )
        session = await conn.fetchrow(_SESSION_USER, row["session_id"], project_id) if row else None
        if row is None or session is None:
            refused = "The refresh token is not valid."
        elif row["used_at"] is not None and not row["concurrent"]:
            # Reuse of a rotated token: someone else may hold the newer one. End the session.
            await conn.execute(
                """UPDATE fluxbase.project_user_sessions SET revoked_at = coalesce(revoked_at, now())
                   WHERE id = $1""",
                row["session_id"],
            )
            refused = "The refresh token was already used; the session has been revoked. Log in again."
        elif session["s_revoked_at"] is not None:
            refused = "The session has been revoked. Log in again."
        elif session["s_expires_at"] <= datetime.now(session["s_expires_at"].tzinfo):
            refused = "The session has expired. Log in again."
        elif session["disabled_at"] is not None:
            refused = "disabled"
        else:
            await conn.execute(
                """UPDATE fluxbase.project_user_refresh_tokens SET used_at = coalesce(used_at, now())
                   WHERE token_hash = $1""",
                token_hash,
            )
            user = ProjectUser.from_row(session)
            new_refresh = await _new_refresh(conn, row["session_id"])
            token, exp = _access(settings, user, row["session_id"])
            pair = TokenPair(token, exp, new_refresh, user)
    if refused == "disabled":
        raise UserDisabled()
    if refused is not None or pair is None:
        raise InvalidUserToken(refused)
    return pair


def verify_own_signature(settings: Settings, project_id: str, token: str) -> dict[str, Any]:
    """A project user's access token without the session check: signature, expiry, audience.

    The caller must still check the session (`verify_own`, or fluxbase_guard.check_user_session
    inside the request's transaction)."""
    header = usertokens.peek(token)
    if header.alg != usertokens.OWN_ALGORITHM:
        raise InvalidUserToken("Fluxbase user tokens are HS256.")
    claims = usertokens.verify(
        token,
        usertokens.own_key(settings.auth.secret_key, project_id),
        algorithm=usertokens.OWN_ALGORITHM,
        issuers=[usertokens.OWN_ISSUER],
        audiences=[project_id],
    )
    if not isinstance(claims.get("sid"), str):
        raise InvalidUserToken("The token names no session.")
    return claims


async def verify_own(
    db: asyncpg.Pool, settings: Settings, project_id: str, token: str
) -> tuple[dict[str, Any], ProjectUser]:
    """A project user's access token: signature, expiry, audience, and a live session."""
    claims = verify_own_signature(settings, project_id, token)
    row = await db.fetchrow(_SESSION_USER, claims["sid"], project_id)
    if row is None or row["id"] != claims["sub"]:
        raise InvalidUserToken("The token's session does not exist (the user may have been deleted).")
    if row["s_revoked_at"] is not None:
        raise InvalidUserToken("The token's session has been revoked (logged out).")
    if row["disabled_at"] is not None:
        raise UserDisabled()
    return claims, ProjectUser.from_row(row)


async def logout(db: asyncpg.Pool, session_id: str) -> None:
    await db.execute(
        "UPDATE fluxbase.project_user_sessions SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1",
        session_id,
    )


# -- admin ------------------------------------------------------------------------------------


async def list_users(
    db: asyncpg.Pool, project_id: str, limit: int, offset: int
) -> tuple[list[ProjectUser], int]:
    if not 1 <= limit <= MAX_LIST or offset < 0:
        raise ValidationError(f"limit must be 1..{MAX_LIST} and offset at least 0.")
    rows = await db.fetch(
        """SELECT * FROM fluxbase.project_users WHERE project_id = $1
           ORDER BY created_at, id LIMIT $2 OFFSET $3""",
        project_id,
        limit,
        offset,
    )
    total = await db.fetchval("SELECT count(*) FROM fluxbase.project_users WHERE project_id = $1", project_id)
    return [ProjectUser.from_row(r) for r in rows], int(total)


async def set_disabled(db: asyncpg.Pool, project_id: str, user_id: str, disabled: bool) -> ProjectUser:
    row = await db.fetchrow(
        """UPDATE fluxbase.project_users
           SET disabled_at = CASE WHEN $3 THEN coalesce(disabled_at, now()) ELSE NULL END
           WHERE id = $1 AND project_id = $2 RETURNING *""",
        user_id,
        project_id,
        disabled,
    )
    if row is None:
        raise UserNotFound()
    return ProjectUser.from_row(row)


async def delete_user(db: asyncpg.Pool, project_id: str, user_id: str) -> None:
    status = await db.execute(
        "DELETE FROM fluxbase.project_users WHERE id = $1 AND project_id = $2", user_id, project_id
    )
    if status.endswith(" 0"):
        raise UserNotFound()


async def revoke_sessions(db: asyncpg.Pool, project_id: str, user_id: str) -> int:
    """End every live session of a user (their access and refresh tokens stop working at once)."""
    async with db.acquire() as conn, conn.transaction():
        exists = await conn.fetchval(
            "SELECT 1 FROM fluxbase.project_users WHERE id = $1 AND project_id = $2", user_id, project_id
        )
        if not exists:
            raise UserNotFound()
        status = await conn.execute(
            """UPDATE fluxbase.project_user_sessions SET revoked_at = now()
               WHERE user_id = $1 AND revoked_at IS NULL""",
            user_id,
        )
    return int(status.rsplit(" ", 1)[-1])


# -- email flows: verification, password reset, magic links, email change -----------------------
#
# Request endpoints (verification, reset, magic link) answer the same whether or not the address
# has an account: the redirect is checked, the request is throttled per address and client, the
# message is rendered and one statement inserts the token and the message only if the user
# exists. The same work either way, so the answer and its timing say nothing about the address.

_PURPOSE_TTL = {
    "verify": "verify_ttl_s",
    "email_change": "verify_ttl_s",
    "reset": "link_ttl_s",
    "magic_link": "link_ttl_s",
}


def _values(
    settings: Settings, purpose: str, project_name: str, email: str, link: str, token: str
) -> dict[str, str]:
    ttl = int(getattr(settings.mail, _PURPOSE_TTL[purpose]))
    return {
        "project_name": project_name,
        "email": email,
        "link": link,
        "token": token,
        "expires_minutes": str(max(1, ttl // 60)),
        "expires_hours": str(max(1, ttl // 3600)),
    }


async def _send_link(
    conn: asyncpg.Connection,
    settings: Settings,
    project: Project,
    purpose: str,
    user_id: str,
    recipient: str,
    email_value: str,
    base: str | None,
    extra: dict[str, str] | None = None,
    *,
    kind: str | None = None,
) -> None:
    """Issue a token for a known user and queue its message (of `kind`, by default the token's
    purpose), in the caller's transaction."""
    token, token_hash = links.new_token()
    ttl = int(getattr(settings.mail, _PURPOSE_TTL[purpose]))
    await conn.execute(
        """INSERT INTO fluxbase.mail_tokens
               (token_hash, purpose, project_id, project_user_id, email, expires_at)
           VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))""",
        token_hash,
        purpose,
        project.id,
        user_id,
        recipient,
        ttl,
    )
    values = {
        **_values(settings, purpose, project.name, email_value, links.link(base, purpose, token), token),
        **(extra or {}),
    }
    kind = kind or purpose
    await outbox.enqueue(
        conn, project.id, kind, recipient, await outbox.compose(conn, project.id, kind, values)
    )


_REQUEST = """
WITH u AS (
    SELECT id, email FROM fluxbase.project_users
    WHERE project_id = $1 AND lower(email) = lower($2) AND disabled_at IS NULL
      AND ($3 <> 'verify' OR email_verified_at IS NULL)
), t AS (
    INSERT INTO fluxbase.mail_tokens (token_hash, purpose, project_id, project_user_id, email, expires_at)
    SELECT $4, $3, $1, u.id, u.email, now() + make_interval(secs => $5) FROM u
), m AS (
    INSERT INTO fluxbase.mail_outbox (project_id, kind, recipient, subject, text_body, html_body)
    SELECT $1, $3, u.email, $6, $7, $8 FROM u
)
SELECT count(*) FROM u
"""

REQUEST_PURPOSES = ("verify", "reset", "magic_link")


async def request_link(
    db: asyncpg.Pool,
    settings: Settings,
    project_id: str,
    purpose: str,
    email: str,
    redirect_to: str | None,
    client_ip: str,
) -> None:
    """Queue a verification, reset or magic-link message if the address has an account; the
    caller answers the same either way."""
    assert purpose in REQUEST_PURPOSES
    project = await load_project(db, project_id)
    if project.status == "suspended":
        raise ProjectSuspended()
    config = await get_config(db, project_id)
    base = links.choose_redirect(redirect_to, config.redirect_urls)
    email = accounts.normalise_email(email)
    token, token_hash = links.new_token()
    values = _values(settings, purpose, project.name, email, links.link(base, purpose, token), token)
    message = await outbox.compose(db, project_id, purpose, values)
    async with db.acquire() as conn, conn.transaction():
        await throttle.mail_request_attempt(conn, settings.mail, project_id, email, client_ip)
        await conn.fetchval(
            _REQUEST,
            project_id,
            email,
            purpose,
            token_hash,
            int(getattr(settings.mail, _PURPOSE_TTL[purpose])),
            message.subject,
            message.text,
            message.html,
        )


async def verify_email(db: asyncpg.Pool, project_id: str, token: str) -> ProjectUser:
    """Use a verification token: the address it was sent to is now verified."""
    await _active_project(db, project_id)
    async with db.acquire() as conn, conn.transaction():
        t = await links.consume(conn, token, "verify", project_id)
        row = await conn.fetchrow(
            """UPDATE fluxbase.project_users SET email_verified_at = coalesce(email_verified_at, now())
               WHERE id = $1 AND lower(email) = lower($2) RETURNING *""",
            t["project_user_id"],
            t["email"],
        )
        if row is None:  # the address changed since: this proves nothing about the new one
            raise InvalidEmailToken()
    return ProjectUser.from_row(row)


async def _end_other_links(conn: asyncpg.Connection, user_id: str) -> None:
    await conn.execute(
        """UPDATE fluxbase.mail_tokens SET used_at = now()
           WHERE project_user_id = $1 AND used_at IS NULL AND purpose IN ('reset', 'magic_link')""",
        user_id,
    )


async def reset_password(db: asyncpg.Pool, project_id: str, token: str, new_password: str) -> int:
    """Use a reset token: set the new password and revoke every session (returns how many)."""
    accounts.check_password_strength(new_password)
    await _active_project(db, project_id)
    pw_hash = await passwords.hash_password(new_password)
    async with db.acquire() as conn, conn.transaction():
        t = await links.consume(conn, token, "reset", project_id)
        # Following the link proves the address too.
        await conn.execute(
            """UPDATE fluxbase.project_users SET password_hash = $2,
                   email_verified_at = CASE WHEN lower(email) = lower($3)
                                            THEN coalesce(email_verified_at, now()) ELSE email_verified_at END
               WHERE id = $1""",
            t["project_user_id"],
            pw_hash,
            t["email"],
        )
        await _end_other_links(conn, t["project_user_id"])
        await conn.execute(
            "DELETE FROM fluxbase.project_user_signup_attempts WHERE user_id = $1", t["project_user_id"]
        )
        status = await conn.execute(
            """UPDATE fluxbase.project_user_sessions SET revoked_at = now()
               WHERE user_id = $1 AND revoked_at IS NULL""",
            t["project_user_id"],
        )
    return int(status.rsplit(" ", 1)[-1])


async def magic_link_login(db: asyncpg.Pool, settings: Settings, project_id: str, token: str) -> TokenPair:
    """Use a magic-link token: a new session, as a password login makes."""
    await _active_project(db, project_id)
    async with db.acquire() as conn, conn.transaction():
        t = await links.consume(conn, token, "magic_link", project_id)
        row = await conn.fetchrow(
            """UPDATE fluxbase.project_users SET email_verified_at = coalesce(email_verified_at, now())
               WHERE id = $1 AND lower(email) = lower($2) RETURNING *""",
            t["project_user_id"],
            t["email"],
        )
        if row is None:
            raise InvalidEmailToken()
        user = ProjectUser.from_row(row)
        if user.disabled_at is not None:
            raise UserDisabled()
        await _end_other_links(conn, user.id)
        return await _start_session(conn, settings, user)


async def request_email_change(
    db: asyncpg.Pool,
    settings: Settings,
    user: ProjectUser,
    new_email: str,
    redirect_to: str | None,
    client_ip: str,
) -> None:
    """Send a confirmation link to the new address; the address changes when it is followed.
    Whether the new address is taken is only told at confirmation (not to this caller now)."""
    project = await load_project(db, user.project_id)
    config = await get_config(db, user.project_id)
    base = links.choose_redirect(redirect_to, config.redirect_urls)
    new_email = accounts.normalise_email(new_email)
    if new_email.lower() == user.email.lower():
        raise ValidationError("The new email is the current one.")
    async with db.acquire() as conn, conn.transaction():
        await throttle.mail_request_attempt(conn, settings.mail, user.project_id, new_email, client_ip)
        await _send_link(
            conn,
            settings,
            project,
            "email_change",
            user.id,
            new_email,
            user.email,
            base,
            {"new_email": new_email},
        )


async def confirm_email_change(db: asyncpg.Pool, project_id: str, token: str) -> ProjectUser:
    await _active_project(db, project_id)
    project = await load_project(db, project_id)
    try:
        async with db.acquire() as conn, conn.transaction():
            t = await links.consume(conn, token, "email_change", project_id)
            old_email = await conn.fetchval(
                "SELECT email FROM fluxbase.project_users WHERE id = $1 FOR UPDATE", t["project_user_id"]
            )
            row = await conn.fetchrow(
                """UPDATE fluxbase.project_users SET email = $2, email_verified_at = now()
                   WHERE id = $1 RETURNING *""",
                t["project_user_id"],
                t["email"],
            )
            if row is None:
                raise InvalidEmailToken()
            # The old address hears about it: if the change was not its owner's doing, they know.
            values = {"project_name": project.name, "email": old_email, "new_email": t["email"]}
            await outbox.enqueue(
                conn,
                project_id,
                "email_changed",
                old_email,
                await outbox.compose(conn, project_id, "email_changed", values),
            )
    except asyncpg.UniqueViolationError:
        raise Conflict("Another user of this project has this email address now.") from None
    return ProjectUser.from_row(row)
