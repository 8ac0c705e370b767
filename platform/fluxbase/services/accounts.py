"""Dashboard accounts: registration and login (both throttled), sessions, logout."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.errors import AuthRequired, Conflict, RegistrationClosed, ValidationError
from fluxbase.mail import links, outbox
from fluxbase.security import passwords, tokens
from fluxbase.services import throttle

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SESSION_KIND = "session"
MAX_EMAIL_CHARS = 320  # longer is no address at all: not looked up (but verified against a dummy)


@dataclass(frozen=True)
class User:
    id: str
    email: str
    display_name: str
    is_instance_admin: bool
    created_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> User:
        return cls(row["id"], row["email"], row["display_name"], row["is_instance_admin"], row["created_at"])


@dataclass(frozen=True)
class Session:
    token: str
    expires_at: int
    user: User


def normalise_email(email: str) -> str:
    email = email.strip()
    if len(email) > 254 or not EMAIL_RE.match(email):
        raise ValidationError("email must be a valid email address.")
    return email


def check_password_strength(password: str) -> None:
    if len(password) < passwords.MIN_PASSWORD_LENGTH:
        raise ValidationError(f"password must be at least {passwords.MIN_PASSWORD_LENGTH} characters.")
    if len(password) > 1024:
        raise ValidationError("password must be at most 1024 characters.")


async def admin_exists(db: asyncpg.Pool) -> bool:
    return bool(await db.fetchval("SELECT EXISTS (SELECT 1 FROM fluxbase.users WHERE is_instance_admin)"))


async def create_user(
    db: asyncpg.Pool | asyncpg.Connection,
    email: str,
    password: str,
    display_name: str,
    *,
    instance_admin: bool,
) -> User:
    email = normalise_email(email)
    check_password_strength(password)
    pw_hash = await passwords.hash_password(password)
    try:
        row = await db.fetchrow(
            """INSERT INTO fluxbase.users (id, email, password_hash, display_name, is_instance_admin)
               VALUES ($1, $2, $3, $4, $5) RETURNING *""",
            ids.prefixed("usr"),
            email,
            pw_hash,
            display_name.strip()[:200],
            instance_admin,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict("An account with this email already exists.") from None
    assert row is not None
    return User.from_row(row)


async def register(
    db: asyncpg.Pool, settings: Settings, email: str, password: str, display_name: str, client_ip: str
) -> User:
    """The first account becomes the instance admin; later ones need open registration.

    Sign-ups are throttled per client (every attempt that gets as far as hashing counts)."""
    email = normalise_email(email)
    check_password_strength(password)
    await throttle.signup_attempt(db, settings.auth, "dashboard", client_ip)
    async with db.acquire() as conn, conn.transaction():
        # Serialise first-admin creation so two racing registrations cannot both become admin: a
        # table lock tenants cannot take (an advisory key is open to every role in the database).
        # SHARE ROW EXCLUSIVE conflicts with itself and with inserts, not with reads (logins).
        await conn.execute("LOCK TABLE fluxbase.users IN SHARE ROW EXCLUSIVE MODE")
        first = not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM fluxbase.users)")
        if not first and not settings.auth.allow_registration:
            raise RegistrationClosed()
        return await create_user(conn, email, password, display_name, instance_admin=first)


async def login(db: asyncpg.Pool, settings: Settings, email: str, password: str, client_ip: str) -> Session:
    """Verify credentials; unknown email and wrong password cost the same and answer the same.

    Throttled (services/throttle.py) per account and client, per account and per client; only
    this account's own success clears its failures."""
    row = None
    if len(email) <= MAX_EMAIL_CHARS:
        row = await db.fetchrow("SELECT * FROM fluxbase.users WHERE lower(email) = lower($1)", email.strip())
    account = row["id"] if row is not None else throttle.unknown_account(email)
    counters = throttle.login_counters(settings.auth, "dashboard", account, client_ip)
    await throttle.login_attempt(db, counters)
    ok = await passwords.verify_password(row["password_hash"] if row else None, password)
    if not ok or row is None:
        raise AuthRequired("Invalid email or password.")
    await throttle.login_succeeded(db, counters)
    return await start_session(db, settings, User.from_row(row))


async def start_session(db: asyncpg.Pool, settings: Settings, user: User) -> Session:
    session_id = ids.prefixed("ses", 16)
    token, exp = tokens.issue(
        settings.auth.secret_key,
        kind=SESSION_KIND,
        subject=user.id,
        session_id=session_id,
        ttl_seconds=settings.auth.session_ttl_seconds,
    )
    await db.execute(
        "INSERT INTO fluxbase.sessions (id, user_id, expires_at) VALUES ($1, $2, to_timestamp($3))",
        session_id,
        user.id,
        exp,
    )
    return Session(token, exp, user)


async def authenticate_session(db: asyncpg.Pool, settings: Settings, token: str) -> tuple[User, str]:
    """A live session: valid signature, not expired, not logged out, account still there."""
    claims = tokens.verify(settings.auth.secret_key, token, kind=SESSION_KIND)
    row = await db.fetchrow(
        """SELECT u.* FROM fluxbase.sessions s JOIN fluxbase.users u ON u.id = s.user_id
           WHERE s.id = $1 AND s.user_id = $2 AND s.revoked_at IS NULL""",
        claims.session_id,
        claims.subject,
    )
    if row is None:
        raise AuthRequired("Session is no longer valid. Log in again.")
    return User.from_row(row), claims.session_id


async def logout(db: asyncpg.Pool, session_id: str) -> None:
    await db.execute(
        "UPDATE fluxbase.sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", session_id
    )


# -- password reset (the link goes to the address; the request answers the same for any address) --

_RESET_REQUEST = """
WITH u AS (SELECT id, email FROM fluxbase.users WHERE lower(email) = lower($1)),
t AS (
    INSERT INTO fluxbase.mail_tokens (token_hash, purpose, account_id, email, expires_at)
    SELECT $2, 'account_reset', u.id, u.email, now() + make_interval(secs => $3) FROM u
), m AS (
    INSERT INTO fluxbase.mail_outbox (project_id, kind, recipient, subject, text_body, html_body)
    SELECT NULL, 'account_reset', u.email, $4, $5, $6 FROM u
)
SELECT count(*) FROM u
"""


async def request_reset(db: asyncpg.Pool, settings: Settings, email: str, client_ip: str) -> None:
    """Queue a reset link if the address has an account; throttled per address and client."""
    email = normalise_email(email)
    token, token_hash = links.new_token()
    ttl = settings.mail.link_ttl_s
    values = {
        "email": email,
        "link": links.link(
            settings.api_url.rstrip("/") + "/dashboard/reset-password", "account_reset", token
        ),
        "token": token,
        "expires_minutes": str(max(1, ttl // 60)),
    }
    message = await outbox.compose(db, None, "account_reset", values)
    async with db.acquire() as conn, conn.transaction():
        await throttle.mail_request_attempt(conn, settings.mail, "dashboard", email, client_ip)
        await conn.fetchval(
            _RESET_REQUEST, email, token_hash, ttl, message.subject, message.text, message.html
        )


async def reset_password(db: asyncpg.Pool, token: str, new_password: str) -> int:
    """Use a reset token: new password, every session of the account ended (returns how many)."""
    check_password_strength(new_password)
    pw_hash = await passwords.hash_password(new_password)
    async with db.acquire() as conn, conn.transaction():
        t = await links.consume(conn, token, "account_reset", None)
        await conn.execute(
            "UPDATE fluxbase.users SET password_hash = $2 WHERE id = $1", t["account_id"], pw_hash
        )
        await conn.execute(
            """UPDATE fluxbase.mail_tokens SET used_at = now()
               WHERE account_id = $1 AND used_at IS NULL AND purpose = 'account_reset'""",
            t["account_id"],
        )
        status = await conn.execute(
            "UPDATE fluxbase.sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
            t["account_id"],
        )
    return int(status.rsplit(" ", 1)[-1])
