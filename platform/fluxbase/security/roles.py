"""Tenant role names and their passwords, derived from the server secret (nothing stored)."""

from __future__ import annotations

import base64
import hashlib
import hmac

SCOPES = ("read", "readwrite", "admin")
# The realtime service's RLS checker: a member of the read role (so exactly its privileges and
# policies) that may also set the request identity, which the read role may not (sql/0007).
# No key or session ever runs SQL as it.
CHECKER = "realtime"
# The project's export role: pg_dump logs in as it (services/dump.py). It has the admin role's
# privileges and reads the catalog content closed to tenants (sql/0021), which pg_dump needs;
# created on the first export. No key or session ever runs SQL as it.
EXPORTER = "export"
ROLES = (*SCOPES, CHECKER, EXPORTER)
_SUFFIX = {"read": "ro", "readwrite": "rw", "admin": "admin", CHECKER: "rt", EXPORTER: "ex"}


def schema_name(project_id: str) -> str:
    return f"p_{project_id}"


def role_name(project_id: str, scope: str) -> str:
    return f"p_{project_id}_{_SUFFIX[scope]}"


def role_password(secret: str, role: str) -> str:
    return hmac.new(secret.encode(), f"fluxbase-tenant-role:{role}".encode(), hashlib.sha256).hexdigest()


def role_verifier(secret: str, role: str, iterations: int) -> str:
    """The role's SCRAM-SHA-256 secret (what `ALTER ROLE … PASSWORD` stores), computed here so
    that it carries `iterations` rather than the server-wide `scram_iterations` (4096).

    Every connection pays the iterations client-side (PBKDF2 on the SASL exchange), several
    milliseconds at 4096 on a cold project's first request. Stretching protects guessable
    passwords; a tenant password is 256 random bits, so a low count costs no security. The salt
    derives from the secret like the password, so re-deriving it (`fluxbase migrate`) changes
    nothing when the secret did not change."""
    password = role_password(secret, role)  # hex: SASLprep leaves it unchanged
    salt = hmac.new(secret.encode(), f"fluxbase-tenant-salt:{role}".encode(), hashlib.sha256).digest()[:16]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


# What a project's realtime checker role may call (sql/0015; sql/0008's first two are dropped by
# sql/0022): granted at provisioning, passed on by the runtime role (db/privileges.py), revoked
# when the project is dropped.
CHECKER_FUNCTIONS = (
    "fluxbase_guard.checker_role_ok(text, text), "
    "fluxbase_guard.scope_policies(text, text[], text), "
    "fluxbase_guard.visible_rows_as(text, text, text[], text[], text[], text[], text[])"
)
