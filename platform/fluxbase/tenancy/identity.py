"""Who a tenant request runs for, as the SQL that sets it (tenancy.session runs it; tenancy.pools
prepares the identity of requests without an end user when a connection opens)."""

from __future__ import annotations

from typing import Any

import msgspec

from fluxbase.db.quoting import quote_literal


class Identity(msgspec.Struct, frozen=True):
    """Who the statement runs for: auth.uid(), auth.jwt() claims and auth.role()."""

    uid: str | None
    claims: dict[str, Any]
    role: str
    # A Fluxbase project user's (session id, project id): checked inside the transaction by
    # fluxbase_guard.check_user_session, so logout and disabling apply to the next request.
    user_session: tuple[str, str] | None = None
    # An end user's request (a user token: requireUserAuth keys always carry one). It runs on
    # connections of its own, never shared with a trusted server key's requests.
    end_user: bool = False


def base_claims(scope: str, project_id: str) -> dict[str, Any]:
    """auth.jwt() of a request without an end user (an API key or member acting for itself)."""
    return {"role": scope, "project_id": project_id}


# realtime.broadcast takes at most 1 000 a transaction whatever `fluxbase.broadcast_cap` says
# (sql/0042), so a request's share past it is that cap. The statement for it, the one that repeats
# request after request wherever a key's window has that much left, is prepared on every tenant
# session (FULL_CAP: parsed with the request prefix's other steps when the connection opens,
# pools.open_tenant_session) instead of parsed with each request.
BROADCAST_CAP_MAX = 1000
FULL_CAP = f"SET LOCAL fluxbase.broadcast_cap = '{BROADCAST_CAP_MAX}'"


def identity_statements(identity: Identity) -> tuple[str, str, str]:
    """The request identity as SET LOCAL statements, not set_config(): tenant read and readwrite
    roles may not execute set_config (sql/0007), so they cannot change it mid-statement.

    SET LOCAL on every path, so no identity outlives its transaction. On the one-round-trip path
    the messages before the Sync are one implicit transaction: there SET LOCAL takes effect for
    the rest of it, and since the session reset steps come first (PostgreSQL 17+ treats the
    pipeline as an implicit transaction block from its second message on) it logs no "SET LOCAL
    can only be used in transaction blocks" warning (tests/test_sql_pipeline_identity.py)."""
    uid, claims, role = identity_values(identity)
    return (
        f"SET LOCAL fluxbase.auth_uid = {quote_literal(uid)}",
        f"SET LOCAL fluxbase.auth_claims = {quote_literal(claims)}",
        f"SET LOCAL fluxbase.auth_role = {quote_literal(role)}",
    )


def identity_values(identity: Identity) -> tuple[str, str, str]:
    """The values of fluxbase.auth_uid, auth_claims and auth_role for `identity`: what
    `identity_statements` sets, and what fluxbase_guard.begin_request() takes (tenancy.wire)."""
    return identity.uid or "", msgspec.json.encode(identity.claims).decode(), identity.role
