"""Named, checksummed schema migrations of a project, applied once on its own admin role.

A migration runs in one transaction on a tenant connection whose session user is
`p_<id>_admin`. The ledger (`fluxbase.project_migrations`) is in the platform's schema of the
project's cluster (the control plane, or the registered cluster it lives on: callers pass that
cluster's runtime pool as `db`), which the tenant cannot write; the API first stores a one-use
ticket there (the SHA-256 of a random token), and
the tenant transaction redeems it with `fluxbase_guard.redeem_migration`, which writes the
ledger row inside that same transaction. So the row exists exactly when the migration
committed, and a failing migration leaves neither schema changes nor a ledger row.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from fluxbase.errors import (
    InternalError,
    MigrationChecksumMismatch,
    MigrationFailed,
    ValidationError,
)
from fluxbase.services import quota
from fluxbase.services.access import ProjectAccess
from fluxbase.services.sqlscript import ScriptError, check_statement, split_statements
from fluxbase.tenancy import statements as classification
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.session import admin_session
from fluxbase.tenancy.statements import carried_settings

log = logging.getLogger("fluxbase.migrations")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
MAX_SQL_CHARS = 5_000_000


@dataclass(frozen=True)
class Migration:
    name: str
    checksum: str
    applied_at: datetime
    applied_by: str | None


def checksum_of(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def _principal_label(access: ProjectAccess) -> str:
    p = access.principal
    return p.key.id if p.key else (p.user.id if p.user else "?")


async def list_migrations(db: asyncpg.Pool, project_id: str) -> list[Migration]:
    rows = await db.fetch(
        """SELECT name, checksum, applied_at, applied_by FROM fluxbase.project_migrations
           WHERE project_id = $1 ORDER BY applied_at, name""",
        project_id,
    )
    return [Migration(r["name"], r["checksum"], r["applied_at"], r["applied_by"]) for r in rows]


def _validate(name: Any, sql: Any) -> list[str]:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValidationError("name must be 1-200 characters: letters, digits, '_', '.', '-'.")
    if not isinstance(sql, str) or not sql.strip():
        raise ValidationError("sql must be a non-empty string.")
    if len(sql) > MAX_SQL_CHARS or "\x00" in sql:
        raise ValidationError(f"sql must be at most {MAX_SQL_CHARS} characters without NUL.")
    try:
        statements = split_statements(sql)
        for i, stmt in enumerate(statements):
            check_statement(stmt, i)
    except ScriptError as exc:
        raise ValidationError(f"migration {name}: {exc}", extra={"statementIndex": exc.index}) from None
    if not statements:
        raise ValidationError("sql contains no statements.")
    return statements


async def apply_migration(
    db: asyncpg.Pool, pools: TenantPools, access: ProjectAccess, name: Any, sql: Any, acquire_timeout_s: float
) -> tuple[bool, Migration]:
    """Apply `sql` under `name` once; (False, existing) if already applied with the same checksum."""
    statements = _validate(name, sql)
    assert isinstance(name, str) and isinstance(sql, str)
    project_id = access.project.id
    checksum = checksum_of(sql)
    existing = await _existing(db, project_id, name, checksum)
    if existing is not None:
        return False, existing
    token = secrets.token_bytes(32)
    await db.execute(
        """INSERT INTO fluxbase.migration_tickets (token_hash, project_id, name, checksum, applied_by)
           VALUES ($1, $2, $3, $4, $5)""",
        hashlib.sha256(token).digest(),
        project_id,
        name,
        checksum,
        _principal_label(access),
    )
    try:
        await _run(pools, project_id, token, statements, name, acquire_timeout_s)
    except asyncpg.UniqueViolationError:
        # A concurrent push of the same name won the race; answer as the re-run would.
        existing = await _existing(db, project_id, name, checksum)
        if existing is None:
            raise
        return False, existing
    finally:
        await db.execute(
            "DELETE FROM fluxbase.migration_tickets WHERE token_hash = $1", hashlib.sha256(token).digest()
        )
    row = await db.fetchrow(
        "SELECT * FROM fluxbase.project_migrations WHERE project_id = $1 AND name = $2", project_id, name
    )
    assert row is not None
    return True, Migration(row["name"], row["checksum"], row["applied_at"], row["applied_by"])


async def _existing(db: asyncpg.Pool, project_id: str, name: str, checksum: str) -> Migration | None:
    row = await db.fetchrow(
        "SELECT * FROM fluxbase.project_migrations WHERE project_id = $1 AND name = $2", project_id, name
    )
    if row is None:
        return None
    if row["checksum"] != checksum:
        raise MigrationChecksumMismatch(
            f"Migration {name} was applied with checksum {row['checksum'][:12]}…; this SQL has "
            f"{checksum[:12]}…. Applied migrations are never edited: add a new one instead.",
            extra={"appliedChecksum": row["checksum"], "checksum": checksum},
        )
    return Migration(row["name"], row["checksum"], row["applied_at"], row["applied_by"])


async def _run(
    pools: TenantPools,
    project_id: str,
    token: bytes,
    statements: list[str],
    name: str,
    acquire_timeout_s: float,
) -> None:
    redeem = f"BEGIN; SELECT fluxbase_guard.redeem_migration('\\x{token.hex()}'::bytea)"
    async with admin_session(pools, project_id, acquire_timeout_s, begin=redeem) as conn:
        # Each statement starts with the caps (a DO block may have raised them unseen for the
        # rest of the migration) at the values the migration SET visibly, in the same round trip.
        carried: dict[str, str] = {}
        for index, stmt in enumerate(statements):
            try:
                caps = pools.statements.caps.script(carried)
                # simple protocol: no parameters, any statement; CREATE EXTENSION as the call
                await conn.execute(f"{caps}; {classification.as_run(stmt)}")
                for st in pools.statements.classify(stmt).statements:
                    carried_settings(st, carried)
            except asyncpg.PostgresError as exc:
                raise MigrationFailed(
                    f"Migration {name} failed at statement {index}: {exc.args[0] if exc.args else exc}",
                    extra={"statementIndex": index, "details": f"ERROR:  {exc.sqlstate}"},
                ) from None
            if not conn.is_in_transaction():
                # The splitter refuses transaction control, so this is a bug, never a tenant path.
                log.error("migration %s of %s left its transaction at statement %d", name, project_id, index)
                raise InternalError()
        await quota.check(conn, project_id)
