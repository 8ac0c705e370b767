"""Provisioner roles: who creates, alters and drops a project's roles (issue 19).

PostgreSQL 16+ makes a CREATEROLE role an ADMIN member of every role it creates, and every
permission check of a role-touching statement walks the creator's membership list, rebuilt after
each CREATE ROLE or GRANT (quadratic in its length). With the runtime creating 4 roles per
project, provisioning slowed as projects accumulated (0.03 s a project at 500 roles, 0.33 s at
8 000, docs/scaling.md). So a fixed set of BUCKETS LOGIN roles with CREATEROLE (made by the
privilege step, db/privileges.py) each create and administer the roles of the projects hashed to
them: no role is a member of more than ~1/BUCKETS of the tenant roles, and the runtime role is a
member of none of them (pg_has_role(runtime, tenant, 'MEMBER') is false), so its own lists stay
short whatever the number of projects.

The runtime acts as a bucket on a connection of its own, logged in with a password derived from
the runtime role's password on that server (what the privilege step sets there): a bucket holds
nothing the runtime could not already reach, and nobody else can derive it. That connection runs
in a transaction of its own, committed when the `acting` block ends, before the caller's.

Projects whose roles the runtime administers (made before the buckets, or where the privilege
step could not give them a password) keep being managed by the runtime itself, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from fluxbase.config import Settings
from fluxbase.security.roles import ROLES, role_password, role_verifier

log = logging.getLogger(__name__)

# Every role-touching statement a bucket runs walks its whole membership list (two entries for
# each role it created, PostgreSQL's roles_is_member_of; not cached when it checks an ADMIN grant):
# a provisioning costs time proportional to the roles its bucket already administers, ~0.035 ms
# per entry per project on the test stack (docs/scaling.md). 128 buckets keep that to ~650
# entries each at 10 000 projects; 32 reached ~2 500 (at 4 000 projects, one at a time: the last
# tenth 85 ms a project with 32, 40 ms with 128).
# Changing it re-hashes new projects only: existing ones stay with the bucket that administers
# them (administered_by_bucket reads it from the catalog).
BUCKETS = 128
PREFIX = "fluxbase_provisioner_"
# A bucket's password is 256 random-looking bits: stretching protects nothing, and every
# provisioning opens a connection (security.roles.role_verifier).
SCRAM_ITERATIONS = 64


def bucket_of(project_id: str) -> str:
    n = int.from_bytes(hashlib.sha256(f"fluxbase-bucket:{project_id}".encode()).digest()[:4], "big")
    return f"{PREFIX}{n % BUCKETS:02d}"


def all_buckets() -> list[str]:
    return [f"{PREFIX}{n:02d}" for n in range(BUCKETS)]


def _secret(runtime_password: str) -> str:
    return f"fluxbase-provisioner-v1:{runtime_password}"


def bucket_password(runtime_password: str, bucket: str) -> str:
    return role_password(_secret(runtime_password), bucket)


def bucket_verifier(runtime_password: str, bucket: str) -> str:
    """What the privilege step stores as the bucket's password (never the password itself)."""
    return role_verifier(_secret(runtime_password), bucket, SCRAM_ITERATIONS)


async def administered_by_bucket(conn: asyncpg.Connection, project_id: str) -> str | None:
    """The bucket that administers the project's roles, or None (the runtime does, or they are gone).

    Read from the catalog, not recomputed: a project provisioned while BUCKETS was smaller is
    administered by the bucket its id hashed to then (bucket_of's own first, where both do)."""
    from fluxbase.security.roles import role_name

    return await conn.fetchval(
        """SELECT b.rolname FROM pg_catalog.pg_auth_members m
           JOIN pg_catalog.pg_roles r ON r.oid = m.roleid
           JOIN pg_catalog.pg_roles b ON b.oid = m.member
           WHERE r.rolname = ANY($1::text[]) AND b.rolname = ANY($2::text[]) AND m.admin_option
           ORDER BY b.rolname = $3 DESC, b.rolname LIMIT 1""",
        [role_name(project_id, k) for k in ROLES],
        all_buckets(),
        bucket_of(project_id),
    )


def _login(conn: asyncpg.Connection) -> tuple[dict[str, Any], str | None]:
    """Where `conn` is connected, and the password it logged in with (None if unknown)."""
    addr = getattr(conn, "_addr", None)
    params = getattr(conn, "_params", None)
    if isinstance(addr, str):  # a Unix socket: /dir/.s.PGSQL.5432
        host, port = os.path.dirname(addr), int(addr.rsplit(".", 1)[1])
    elif isinstance(addr, tuple):
        host, port = str(addr[0]), int(addr[1])
    else:
        return {}, None
    if params is None or not params.password:
        return {}, None
    return {
        "host": host,
        "port": port,
        "database": params.database,
        "ssl": _ssl(params),
    }, str(params.password)


def _ssl(params: Any) -> Any:
    """The caller's TLS choice again: its context where it required TLS, else its mode by name."""
    mode = int(getattr(params, "sslmode", 0) or 0)
    if mode >= 3:
        return params.ssl
    return {0: False, 1: "allow", 2: "prefer"}[mode]


async def _bucket_login(conn: asyncpg.Connection, project_id: str, *, new: bool) -> str | None:
    """The bucket to act as for the project, or None to act as `conn` itself."""
    if await conn.fetchval("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"):
        return None  # the migration role (a superuser): it may do everything itself
    if not new:
        return await administered_by_bucket(conn, project_id)
    bucket = bucket_of(project_id)
    if not await conn.fetchval("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1", bucket):
        return None  # before the privilege step made the buckets
    if _login(conn)[1] is None:
        log.warning("the runtime's password is unknown: project roles are created by the runtime role")
        return None
    return bucket


@contextlib.asynccontextmanager
async def acting(
    conn: asyncpg.Connection, project_id: str, settings: Settings | None = None, *, new: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """The connection that manages the project's roles: its bucket's own, in a transaction
    committed when the block ends (rolled back if it raises), or `conn` itself (the caller's
    transaction) for a project the runtime administers. `new`: the project is being created."""
    bucket = await _bucket_login(conn, project_id, new=new)
    if bucket is None:
        yield conn
        return
    where, runtime_password = _login(conn)
    if runtime_password is None:
        raise RuntimeError("the runtime's password is unknown: it cannot act as a provisioner role")
    # Its statements may wait for the caller's locks (the caller waits for it): bounded.
    timeouts = (10.0, 5_000, 60_000)
    if settings is not None:
        db = settings.database
        timeouts = (db.connect_timeout, db.lock_timeout_ms, db.statement_timeout_ms)
    # One server is one cluster (services.clusters refuses a second registration of a server,
    # sql/0047), so the privilege step that set this bucket's password there derived it from the
    # password this runtime logged in with: no other registration overwrites it.
    bconn = await asyncpg.connect(
        **where,
        user=bucket,
        password=bucket_password(runtime_password, bucket),
        timeout=timeouts[0],
        server_settings={
            "application_name": "fluxbase-provisioner",
            "lock_timeout": f"{timeouts[1]}ms",
            "statement_timeout": f"{timeouts[2]}ms",
            "search_path": "pg_catalog, pg_temp",
        },
    )
    try:
        async with bconn.transaction():
            yield bconn
    finally:
        await bconn.close()
