"""Plain numbered SQL migrations with a checksum ledger, applied in order under a lock on the ledger."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg

from fluxbase.config import ConfigError, Settings
from fluxbase.db.capture import install_capture
from fluxbase.db.extensions import apply_extensions
from fluxbase.db.privileges import apply_privileges
from fluxbase.tenancy.provision import sync_role_passwords

log = logging.getLogger(__name__)

FILE_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(Exception):
    """The ledger disagrees with the files on disk (or a file is malformed)."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_dir() -> Path:
    """The migrations folder: packaged as fluxbase/_sql, or `sql/` in a source checkout."""
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_sql"
    if packaged.is_dir():
        return packaged
    return here.parent.parent / "sql"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        m = FILE_RE.match(path.name)
        if not m:
            raise MigrationError(f"migration file name must look like 0001_name.sql: {path.name}")
        found.append(Migration(version=m.group(1), name=path.name, sql=path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a number")
    return found


LEDGER_DDL = """
CREATE SCHEMA IF NOT EXISTS fluxbase;
CREATE TABLE IF NOT EXISTS fluxbase.schema_migrations (
    version    text PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


async def _ensure_ledger(conn: asyncpg.Connection) -> None:
    """Create the ledger if missing. Two first runs racing on CREATE ... IF NOT EXISTS can collide
    in the catalogs (unique_violation); the loser retries and finds it there."""
    for attempt in range(5):
        try:
            await conn.execute(LEDGER_DDL)
            return
        except (asyncpg.UniqueViolationError, asyncpg.DuplicateObjectError, asyncpg.DuplicateSchemaError):
            if attempt == 4:
                raise


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names applied. Refuse if an applied file changed.

    All pending files run in one transaction that first locks the ledger table, so concurrent
    migrators (several processes starting at once) apply each file exactly once, and a failing
    file leaves nothing of the run behind. Not an advisory lock: every role in the database,
    tenants included, may take any advisory key, and one holding ours would stall every start."""
    migrations = load_migrations(directory)
    await _ensure_ledger(conn)
    async with conn.transaction():
        # Conflicts with itself and with writers of the ledger, not with readers.
        await conn.execute("LOCK TABLE fluxbase.schema_migrations IN SHARE ROW EXCLUSIVE MODE")
        ledger = {r["version"]: r for r in await conn.fetch("SELECT * FROM fluxbase.schema_migrations")}
        for m in migrations:
            row = ledger.get(m.version)
            if row is not None and row["checksum"] != m.checksum:
                raise MigrationError(
                    f"migration {m.name} was changed after it was applied "
                    f"(ledger checksum {row['checksum'][:12]}…, file {m.checksum[:12]}…). "
                    "Applied migrations are never edited: add a new numbered file instead."
                )
        applied: list[str] = []
        for m in migrations:
            if m.version in ledger:
                continue
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO fluxbase.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                m.version,
                m.name,
                m.checksum,
            )
            applied.append(m.name)
        return applied


async def migrate_database(settings: Settings) -> list[str]:
    """What `fluxbase migrate` does: apply pending migrations as the migration role, apply the
    privilege model (db/privileges.py), then re-derive tenant role passwords.

    Without FLUXBASE_MIGRATION_DATABASE_URL the runtime URL migrates; if that role is not a
    superuser (the runtime's own role), there is nothing it may do: it only checks that no
    migration is pending."""
    db = settings.database
    conn = await asyncpg.connect(db.migration_url or db.url, timeout=db.connect_timeout)
    try:
        superuser = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if not superuser:
            await _refuse_pending(conn)
            return []
        applied = await migrate(conn)
        runtime_user, runtime_password = None, None
        if db.migration_url:
            parts = urlsplit(db.url)
            mig = urlsplit(db.migration_url)
            if parts.username and parts.username != mig.username:
                runtime_user = unquote(parts.username)
                runtime_password = unquote(parts.password) if parts.password else None
        await apply_privileges(conn, runtime_user, runtime_password)
        # C capture trigger functions where this server has the library, else PL/pgSQL (db/capture.py).
        await install_capture(conn)
        await apply_extensions(conn, settings.tenant.extensions)
        await sync_role_passwords(conn, settings)
        clusters = await conn.fetchval("SELECT to_regclass('fluxbase.clusters') IS NOT NULL")
        if clusters:
            await _record_default_server(conn)
    finally:
        await conn.close()
    if clusters:
        # Registered database clusters get the same files (services.clusters). A cluster that
        # cannot be reached is reported and skipped: one unreachable server must not keep the
        # instance from starting; its own projects fail until it is migrated.
        from fluxbase.services.clusters import migrate_registered

        await migrate_registered(settings)
    return applied


async def _record_default_server(conn: asyncpg.Connection) -> None:
    """The control plane's server identifier on the default cluster's row (sql/0047), again at
    every run (a restored or upgraded server has a new one): a registration of another database
    of this server is refused by it (services.clusters)."""
    try:
        await conn.execute(
            """UPDATE fluxbase.clusters c SET system_identifier = s.system_identifier::text
               FROM pg_catalog.pg_control_system() s
               WHERE c.id = 'default' AND c.system_identifier IS DISTINCT FROM s.system_identifier::text"""
        )
    except asyncpg.UniqueViolationError:
        log.error(
            "a registered database cluster is on the control plane's own PostgreSQL server "
            "(registered before sql/0047): remove it (docs/clusters.md)"
        )


async def _refuse_pending(conn: asyncpg.Connection) -> None:
    migrations = load_migrations()
    exists = await conn.fetchval("SELECT to_regclass('fluxbase.schema_migrations') IS NOT NULL")
    done = (
        {r["version"] for r in await conn.fetch("SELECT version FROM fluxbase.schema_migrations")}
        if exists
        else set()
    )
    pending = [m.name for m in migrations if m.version not in done]
    if pending:
        raise ConfigError(
            f"{len(pending)} migration(s) pending ({pending[0]}…) and this role is not a superuser: set "
            "FLUXBASE_MIGRATION_DATABASE_URL to a superuser URL (used only to migrate; docs/security.md)."
        )
