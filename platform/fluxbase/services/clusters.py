"""Database clusters: the registry of PostgreSQL servers projects live on, their verification,
installation and live checks, project placement, and the instance-scoped management keys.

The default cluster is the control-plane database (FLUXBASE_DATABASE_URL); it is always present
and has no stored address. A registered cluster is given as a connection string of a superuser
(what `fluxbase migrate` needs: event triggers, the privilege model's roles). It is verified
before anything is saved, then Fluxbase's SQL (migrations, privilege model, extensions) is
installed on it, and from then on the API reaches it as the runtime role, like the default one.
The password is stored encrypted (AES-GCM, key derived from FLUXBASE_SECRET_KEY) and is never
returned or logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.db.capture import install_capture
from fluxbase.db.extensions import apply_extensions
from fluxbase.db.migrate import migrate
from fluxbase.db.privileges import apply_privileges
from fluxbase.errors import (
    AuthRequired,
    ClusterAlreadyRegistered,
    ClusterAuthFailed,
    ClusterInUse,
    ClusterNotFound,
    ClusterPermissionDenied,
    ClusterUnreachable,
    ClusterVerificationFailed,
    ClusterVersionUnsupported,
    InsufficientPermissions,
    NotFound,
    ValidationError,
)

log = logging.getLogger(__name__)

DEFAULT = "default"
# Fluxbase's own SQL grants role memberships WITH INHERIT/SET options (tenancy/provision.py,
# sql/0036), which PostgreSQL 16 introduced: a 15 server fails at the first project.
MIN_SERVER_VERSION = 160000
VERIFY_TIMEOUT_S = 5.0
MGMT_PREFIX = "flx_mgmt_"
_LABEL_MAX = 100
_REGION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


# --- connection strings and the stored secret -------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a cluster is and who logs in (the password never leaves this module's callers)."""

    host: str
    port: int
    database: str
    user: str
    password: str = ""

    def public(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "database": self.database, "user": self.user}


def parse_connection_string(value: str) -> Target:
    """postgres[ql]://user:password@host[:port]/database — the only form accepted."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port or 5432
    except ValueError:
        raise ValidationError("connectionString is not a valid PostgreSQL URL.") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValidationError("connectionString must start with postgresql://.")
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    database = unquote(parts.path.lstrip("/"))
    if not host or not parts.username or not database:
        raise ValidationError("connectionString needs a user, a host and a database name.")
    if host.startswith(("/", "@")) or "," in host:
        # A Unix-socket directory (or several hosts) would let the API reach local servers
        # through peer/trust authentication of its own OS user: TCP hosts only.
        raise ValidationError("connectionString's host must be a network host, not a socket path.")
    if set(query) - {"host", "sslmode"} or query.get("sslmode", ["disable"])[0] not in ("disable", "prefer"):
        raise ValidationError("connectionString may only carry host and sslmode=disable|prefer parameters.")
    return Target(host, int(port), database, unquote(parts.username), unquote(parts.password or ""))


def _cipher(settings: Settings) -> AESGCM:
    key = hmac.new(settings.auth.secret_key.encode(), b"fluxbase cluster secrets v1", hashlib.sha256).digest()
    return AESGCM(key)


def seal(settings: Settings, cluster_id: str, password: str) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + _cipher(settings).encrypt(nonce, password.encode(), cluster_id.encode())


def unseal(settings: Settings, cluster_id: str, blob: bytes) -> str:
    return _cipher(settings).decrypt(blob[:12], blob[12:], cluster_id.encode()).decode()


# --- verification -------------------------------------------------------------------------------


async def connect(target: Target, timeout: float = VERIFY_TIMEOUT_S) -> asyncpg.Connection:  # noqa: ASYNC109
    """Connect or raise the CloudSync-style failure: unreachable, auth failed."""
    try:
        return await asyncpg.connect(
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password or None,
            database=target.database,
            timeout=timeout,
            ssl=False,
            server_settings={"application_name": "fluxbase-cluster-check"},
        )
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        raise ClusterAuthFailed() from None
    except asyncpg.InvalidCatalogNameError:
        raise ClusterVerificationFailed(
            f"Database {target.database!r} does not exist on the server."
        ) from None
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError):
        raise ClusterUnreachable() from None
    except asyncpg.PostgresError as exc:
        log.warning("cluster check at %s:%s failed: %s", target.host, target.port, exc.sqlstate)
        raise ClusterVerificationFailed() from None


async def verify(conn: asyncpg.Connection) -> int:
    """Check what `fluxbase migrate` needs of the server; return its server_version_num."""
    version = int(await conn.fetchval("SELECT current_setting('server_version_num')"))
    if version < MIN_SERVER_VERSION:
        raise ClusterVersionUnsupported(
            f"PostgreSQL {version // 10000} is not supported: "
            f"Fluxbase needs {MIN_SERVER_VERSION // 10000} or later."
        )
    row = await conn.fetchrow(
        """SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb,
                  has_database_privilege(current_database(), 'CREATE') AS can_create_schema
           FROM pg_roles r WHERE r.rolname = current_user"""
    )
    assert row is not None
    if not row["rolsuper"]:
        missing = [
            name
            for name, ok in (
                ("CREATEROLE", row["rolcreaterole"]),
                ("CREATEDB", row["rolcreatedb"]),
                ("CREATE on the database", row["can_create_schema"]),
            )
            if not ok
        ]
        raise ClusterPermissionDenied(
            "The role must be a superuser, as `fluxbase migrate` requires (event triggers, the "
            "privilege model's roles)" + (f"; it also lacks {', '.join(missing)}." if missing else ".")
        )
    return version


async def server_identifier(conn: asyncpg.Connection) -> str:
    """The server's `pg_control_system().system_identifier` (a superuser's session): the same for
    every database of one PostgreSQL server, which is what roles are shared by."""
    return str(await conn.fetchval("SELECT system_identifier::text FROM pg_catalog.pg_control_system()"))


def cluster_runtime_password(settings: Settings, cluster_id: str) -> str:
    """The runtime role's password on one registered cluster: derived from the server secret and
    the cluster's id, never the control plane's own. Whoever runs a registered server sees it (the
    privilege step sets it there), so it must open nothing but that server (hostile review 7)."""
    mac = hmac.new(
        settings.auth.secret_key.encode(),
        b"fluxbase cluster runtime v1:" + cluster_id.encode(),
        hashlib.sha256,
    )
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def runtime_login(settings: Settings, target: Target, cluster_id: str) -> Target:
    """How the API logs in to a registered cluster: as the runtime role (created there by the
    privilege step with the cluster's own derived password, `cluster_runtime_password`), or,
    where the processes run as the migrating role itself (a development override), as the
    registered role."""
    db = settings.database
    runtime = urlsplit(db.url)
    migrating = urlsplit(db.migration_url) if db.migration_url else None
    if migrating is not None and runtime.username and runtime.username != migrating.username:
        return Target(
            target.host,
            target.port,
            target.database,
            unquote(runtime.username),
            cluster_runtime_password(settings, cluster_id),
        )
    return target


async def install(conn: asyncpg.Connection, settings: Settings, cluster_id: str) -> list[str]:
    """What `fluxbase migrate` does, on a registered cluster (its session is a superuser's)."""
    applied = await migrate(conn)
    login = runtime_login(settings, Target("", 0, "", ""), cluster_id)
    runtime_user = login.user or None
    await apply_privileges(conn, runtime_user, login.password or None if runtime_user else None)
    await install_capture(conn, f"cluster {cluster_id}")
    await apply_extensions(conn, settings.tenant.extensions)
    return applied


async def migrate_registered(settings: Settings) -> dict[str, list[str] | None]:
    """Apply pending migrations (and the privilege model) on every registered cluster, as its
    registered role; returns what each applied (None: it failed, which is logged)."""
    db = settings.database
    control = await asyncpg.connect(db.url, timeout=db.connect_timeout)
    try:
        # Newest first: of two clusters registered on one server before sql/0047, the later one's
        # passwords are the ones in force there; it keeps them (`_record_identifier`).
        ids = [
            r["id"]
            for r in await control.fetch(
                "SELECT id FROM fluxbase.clusters WHERE id <> 'default' ORDER BY created_at DESC, id"
            )
        ]
        targets = {cid: await _stored_target(control, settings, cid) for cid in ids}
    finally:
        await control.close()
    done: dict[str, list[str] | None] = {}
    for cluster_id, target in targets.items():
        try:
            conn = await connect(target)
            try:
                await verify(conn)
                sysid = await server_identifier(conn)
                if not await _record_identifier(settings, cluster_id, sysid):
                    done[cluster_id] = None
                    continue
                done[cluster_id] = await install(conn, settings, cluster_id)
            finally:
                await conn.close()
        except Exception as exc:
            log.error(
                "could not migrate database cluster %s (%s:%s): %r", cluster_id, target.host, target.port, exc
            )
            done[cluster_id] = None
    return done


async def _record_identifier(settings: Settings, cluster_id: str, sysid: str) -> bool:
    """Store a registered cluster's server identifier (clusters registered before sql/0047 have
    none). False if another cluster, or the control plane, already has that server: it was
    registered twice before the check existed, and installing again would set the runtime's and
    the provisioners' passwords from this cluster's id (the other's logins would fail). It is
    then left as it is and reported: remove one of them (move its projects first)."""
    control = await asyncpg.connect(settings.database.url, timeout=settings.database.connect_timeout)
    try:
        other = await control.fetchval(
            "SELECT id FROM fluxbase.clusters WHERE system_identifier = $1 AND id <> $2", sysid, cluster_id
        )
        if other is None:
            try:
                await control.execute(
                    "UPDATE fluxbase.clusters SET system_identifier = $2 WHERE id = $1", cluster_id, sysid
                )
                return True
            except asyncpg.UniqueViolationError:
                other = "another cluster"
    finally:
        await control.close()
    log.error(
        "database cluster %s is on the same PostgreSQL server as %s (registered before one server "
        "was limited to one cluster): not migrated; remove one of them (docs/clusters.md)",
        cluster_id,
        other,
    )
    return False


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    id: str
    label: str
    region: str | None
    target: Target | None  # None: the default cluster (the control-plane database)
    server_version: int | None
    projects: int
    created_at: datetime
    updated_at: datetime
    placement: str = "open"  # "open": the placement policy may put new projects here


def _row_cluster(row: asyncpg.Record) -> Cluster:
    target = None
    if row["id"] != DEFAULT:
        target = Target(row["host"], row["port"], row["database"], row["username"])
    return Cluster(
        row["id"],
        row["label"],
        row["region"],
        target,
        row["server_version"],
        row["projects"],
        row["created_at"],
        row["updated_at"],
        row["placement"],
    )


PLACEMENTS = ("open", "closed")


def _placement(value: str) -> str:
    if value not in PLACEMENTS:
        raise ValidationError("placement must be 'open' or 'closed'.")
    return value


def _require_session(by_session: bool, what: str) -> None:
    """Opening a cluster to the placement policy puts other users' projects (and so their rows)
    on a server someone else may run: an instance admin's decision, never a management key's."""
    if not by_session:
        raise InsufficientPermissions(f"Only an instance admin's dashboard session may {what}.")


_SELECT = """SELECT c.*, (SELECT count(*) FROM fluxbase.projects p WHERE p.cluster_id = c.id)::int AS projects
             FROM fluxbase.clusters c"""


def _label(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= _LABEL_MAX:
        raise ValidationError(f"label must be 1 to {_LABEL_MAX} characters.")
    return value


def _region(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not _REGION_RE.match(value):
        raise ValidationError("region may hold letters, digits, '.', '_' and '-' (at most 64).")
    return value


async def list_clusters(db: asyncpg.Pool) -> list[Cluster]:
    return [_row_cluster(r) for r in await db.fetch(_SELECT + " ORDER BY c.created_at, c.id")]


async def get_cluster(db: asyncpg.Pool, cluster_id: str) -> Cluster:
    row = await db.fetchrow(_SELECT + " WHERE c.id = $1", cluster_id)
    if row is None:
        raise ClusterNotFound()
    return _row_cluster(row)


async def _refuse_duplicate(
    db: asyncpg.Pool, settings: Settings, target: Target, except_id: str = ""
) -> None:
    host, port = settings.database.server()
    control_db = (urlsplit(settings.database.url).path or "/postgres").lstrip("/") or "postgres"
    if (target.host, target.port, target.database) == (host, port, control_db):
        raise ClusterAlreadyRegistered("That database is the default cluster (the control plane).")
    taken = await db.fetchval(
        "SELECT id FROM fluxbase.clusters WHERE host = $1 AND port = $2 AND database = $3 AND id <> $4",
        target.host,
        target.port,
        target.database,
        except_id,
    )
    if taken:
        raise ClusterAlreadyRegistered("That database is already registered as a cluster.")


def _registry_lock(settings: Settings) -> tuple[int, int]:
    """The advisory-lock key that serialises registrations and new connection strings (a
    transaction lock on the control plane): between the server check and the stored row, no
    other registration of the same server installs there. Derived with the instance's secret,
    like a move's (services.moves): tenants on the default cluster may take any advisory key."""
    digest = hmac.new(settings.auth.secret_key.encode(), b"fluxbase.cluster-registry", "sha256").digest()
    return int.from_bytes(digest[:4], "big", signed=True), int.from_bytes(digest[4:8], "big", signed=True)


async def _identify_unrecorded(db: asyncpg.Pool, settings: Settings, except_id: str) -> None:
    """Record the server identifier of registered clusters that have none yet (registered before
    sql/0047 and unreachable at the last `fluxbase migrate`), so `_refuse_same_server` sees them;
    one still unreachable is logged and left out. Committed on its own (a refusal keeps it)."""
    rows = await db.fetch(
        "SELECT id FROM fluxbase.clusters WHERE system_identifier IS NULL AND id <> 'default' AND id <> $1",
        except_id,
    )
    for row in rows:
        try:
            other = await connect(await _stored_target(db, settings, row["id"]))
            try:
                sysid = await server_identifier(other)
            finally:
                await other.close()
        except (ClusterVerificationFailed, asyncpg.PostgresError, OSError) as exc:
            log.warning("could not read the server identifier of cluster %s: %r", row["id"], exc)
            continue
        try:
            await db.execute(
                "UPDATE fluxbase.clusters SET system_identifier = $2 WHERE id = $1", row["id"], sysid
            )
        except asyncpg.UniqueViolationError:
            log.error(
                "cluster %s is on the server of another cluster (registered before sql/0047)", row["id"]
            )


async def _refuse_same_server(conn: asyncpg.Connection, sysid: str, except_id: str) -> None:
    """One PostgreSQL server is at most one cluster: roles (the runtime's, the provisioners', every
    project's) are per server, so a second registration would set the first one's passwords and
    share its projects' roles (sql/0047)."""
    taken = await conn.fetchval(
        "SELECT id FROM fluxbase.clusters WHERE system_identifier = $1 AND id <> $2", sysid, except_id
    )
    if taken == DEFAULT:
        raise ClusterAlreadyRegistered(
            "That database is on the control plane's PostgreSQL server (the default cluster); "
            "roles are per server, so it cannot be a cluster of its own."
        )
    if taken is not None:
        raise ClusterAlreadyRegistered(
            "Another database of that PostgreSQL server is already registered as a cluster; roles "
            "are per server, so one server is one cluster."
        )


async def _verify_and_install(
    control: asyncpg.Connection, settings: Settings, target: Target, cluster_id: str
) -> tuple[int, str]:
    """Verify the server, refuse one already in use, install: returns (server_version_num, the
    server's system identifier). `control` is in a transaction that holds the registry lock
    (`_registry_lock`) until the caller has stored the row."""
    await control.execute("SELECT pg_advisory_xact_lock($1::int4, $2::int4)", *_registry_lock(settings))
    conn = await connect(target)
    try:
        version = await verify(conn)
        sysid = await server_identifier(conn)
        await _refuse_same_server(control, sysid, cluster_id)
        await install(conn, settings, cluster_id)
        return version, sysid
    finally:
        await conn.close()


async def register_cluster(
    db: asyncpg.Pool,
    settings: Settings,
    label: str,
    connection_string: str,
    region: str | None,
    *,
    by_session: bool,
    placement: str | None = None,
) -> Cluster:
    """Verify, install Fluxbase's SQL, then save: a cluster that fails any step is not saved.

    Registered by an instance admin's session, it is open to the placement policy unless asked
    otherwise; registered by a management key it starts closed, and only a session opens it
    (hostile review 7: the key's holder may run the server and read what is placed there)."""
    label, region = _label(label), _region(region)
    if placement is None:
        placement = "open" if by_session else "closed"
    if _placement(placement) == "open":
        _require_session(by_session, "open a cluster to placement")
    target = parse_connection_string(connection_string)
    await _refuse_duplicate(db, settings, target)
    await _identify_unrecorded(db, settings, "")
    cluster_id = ids.prefixed("cl")
    async with db.acquire() as conn, conn.transaction():
        version, sysid = await _verify_and_install(conn, settings, target, cluster_id)
        try:
            await conn.execute(
                """INSERT INTO fluxbase.clusters
                       (id, label, region, host, port, database, username, secret, server_version,
                        placement, system_identifier)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
                cluster_id,
                label,
                region,
                target.host,
                target.port,
                target.database,
                target.user,
                seal(settings, cluster_id, target.password),
                version,
                placement,
                sysid,
            )
        except asyncpg.UniqueViolationError:
            raise ClusterAlreadyRegistered() from None
    return await get_cluster(db, cluster_id)


async def update_cluster(
    db: asyncpg.Pool,
    settings: Settings,
    cluster_id: str,
    *,
    label: str | None,
    region: str | None,
    connection_string: str | None,
    clear_region: bool = False,
    placement: str | None = None,
    by_session: bool = False,
) -> Cluster:
    """Change label/region/placement; a new connection string is verified (and installed) before
    it is stored. Only a session opens placement (anyone here may close it); a key that changes the
    connection string closes it (the new address is a server the key's holder may run)."""
    current = await get_cluster(db, cluster_id)
    if current.target is None and connection_string is not None:
        raise ValidationError(
            "The default cluster's connection is FLUXBASE_DATABASE_URL; it cannot be changed here."
        )
    if (
        connection_string is not None
        and not by_session
        and (current.projects or await _holds_projects(db, cluster_id))
    ):
        # The projects living there follow the connection string: a key's holder would point
        # them at a server whose authentication they control and receive their writes.
        _require_session(by_session, "change the connection string of a cluster that holds projects")
    if placement is not None:
        if _placement(placement) == "open":
            _require_session(by_session, "open a cluster to placement")
        if current.target is None and placement != "open":
            raise ValidationError("The default cluster is always open to placement.")
    async with db.acquire() as conn, conn.transaction():
        if label is not None:
            await conn.execute(
                "UPDATE fluxbase.clusters SET label = $2, updated_at = now() WHERE id = $1",
                cluster_id,
                _label(label),
            )
        if region is not None or clear_region:
            await conn.execute(
                "UPDATE fluxbase.clusters SET region = $2, updated_at = now() WHERE id = $1",
                cluster_id,
                None if clear_region else _region(region),
            )
        if connection_string is not None:
            target = parse_connection_string(connection_string)
            await _refuse_duplicate(db, settings, target, except_id=cluster_id)
            await _identify_unrecorded(db, settings, cluster_id)
            version, sysid = await _verify_and_install(conn, settings, target, cluster_id)
            if not by_session:
                # Checked again under the cluster row's lock, after the (slow) verification: a
                # project placed there or marked to move there meanwhile takes a KEY SHARE lock
                # on this row (foreign keys), so it either is counted here or waits for this
                # transaction and then finds the cluster closed (hostile review 11 finding 1).
                await conn.execute("SELECT 1 FROM fluxbase.clusters WHERE id = $1 FOR UPDATE", cluster_id)
                if await _holds_projects(conn, cluster_id):
                    _require_session(
                        by_session, "change the connection string of a cluster that holds projects"
                    )
            await conn.execute(
                """UPDATE fluxbase.clusters
                   SET host = $2, port = $3, database = $4, username = $5, secret = $6,
                          server_version = $7, system_identifier = $8, updated_at = now() WHERE id = $1""",
                cluster_id,
                target.host,
                target.port,
                target.database,
                target.user,
                seal(settings, cluster_id, target.password),
                version,
                sysid,
            )
            if not by_session:
                await conn.execute(
                    "UPDATE fluxbase.clusters SET placement = 'closed' WHERE id = $1", cluster_id
                )
        if placement is not None:
            await conn.execute(
                "UPDATE fluxbase.clusters SET placement = $2, updated_at = now() WHERE id = $1",
                cluster_id,
                placement,
            )
    return await get_cluster(db, cluster_id)


async def _holds_projects(db: asyncpg.Pool | asyncpg.Connection, cluster_id: str) -> bool:
    """Whether projects live on the cluster or are being moved there (services.moves): both
    follow its connection string."""
    return bool(
        await db.fetchval(
            """SELECT EXISTS (SELECT 1 FROM fluxbase.projects
                              WHERE cluster_id = $1 OR moving_to = $1)""",
            cluster_id,
        )
    )


async def remove_cluster(db: asyncpg.Pool, cluster_id: str) -> None:
    """Remove a registered cluster; refused for the default one and while projects live there."""
    if cluster_id == DEFAULT:
        raise ClusterInUse("The default cluster (the control plane) cannot be removed.")
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT id FROM fluxbase.clusters WHERE id = $1 FOR UPDATE", cluster_id)
        if row is None:
            raise ClusterNotFound()
        # FOR UPDATE on the cluster row conflicts with the FOR KEY SHARE a project insert (or a
        # move's mark) takes. A project being moved there counts (its moving_to refers to the
        # row: the DELETE answered 500, hostile review 11).
        n = await conn.fetchval(
            "SELECT count(*) FROM fluxbase.projects WHERE cluster_id = $1 OR moving_to = $1", cluster_id
        )
        if n:
            raise ClusterInUse(extra={"details": {"projects": n}})
        await conn.execute("DELETE FROM fluxbase.clusters WHERE id = $1", cluster_id)


async def stored_target(db: asyncpg.Pool, settings: Settings, cluster_id: str) -> Target:
    return await _stored_target(db, settings, cluster_id)


async def _stored_target(
    db: asyncpg.Pool | asyncpg.Connection, settings: Settings, cluster_id: str
) -> Target:
    return (await stored_target_and_version(db, settings, cluster_id))[0]


def _version(row: asyncpg.Record) -> str:
    """Names one version of a cluster's connection (address, user and sealed secret): it changes
    exactly when `PATCH … {connectionString}` stores a new one. Never shown: a digest, kept in
    memory to tell whether a pool or reader was made from the current details."""
    digest = hashlib.sha256(
        f"{row['host']}\0{row['port']}\0{row['database']}\0{row['username']}\0".encode()
        + bytes(row["secret"])
    )
    return digest.hexdigest()


async def stored_target_and_version(
    db: asyncpg.Pool | asyncpg.Connection, settings: Settings, cluster_id: str
) -> tuple[Target, str]:
    """The stored connection of a registered cluster and its version (`connection_versions`)."""
    row = await db.fetchrow(
        "SELECT host, port, database, username, secret FROM fluxbase.clusters WHERE id = $1", cluster_id
    )
    if row is None:
        raise ClusterNotFound()
    password = unseal(settings, cluster_id, row["secret"])
    return Target(row["host"], row["port"], row["database"], row["username"], password), _version(row)


async def connection_versions(db: asyncpg.Pool | asyncpg.Connection) -> dict[str, str]:
    """Each registered cluster's connection version: a process compares it with the one its pools
    and readers were made from, and remakes them when the connection string changed (the control
    doorbell rings on that change, sql/0045)."""
    rows = await db.fetch(
        "SELECT id, host, port, database, username, secret FROM fluxbase.clusters WHERE id <> 'default'"
    )
    return {r["id"]: _version(r) for r in rows}


@dataclass(frozen=True)
class ConnectionCheck:
    ok: bool
    checked_at: datetime
    latency_ms: float | None
    failure: ClusterVerificationFailed | None


async def check_connection(db: asyncpg.Pool, settings: Settings, cluster_id: str) -> ConnectionCheck:
    """The live check: connect with the stored details and run a query, timing the round trip."""
    cluster = await get_cluster(db, cluster_id)
    checked_at = datetime.now(UTC)
    start = time.perf_counter()
    try:
        if cluster.target is None:
            await db.fetchval("SELECT 1")
        else:
            conn = await connect(await stored_target(db, settings, cluster_id))
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
    except ClusterVerificationFailed as failure:
        return ConnectionCheck(False, checked_at, None, failure)
    return ConnectionCheck(True, checked_at, round((time.perf_counter() - start) * 1000, 2), None)


# --- placement and the per-cluster runtime pools ------------------------------------------------


async def place(conn: asyncpg.Connection, cluster_id: str | None) -> str:
    """The cluster a new project goes to: the one asked for (an instance admin's choice, open or
    closed), or the open cluster with the fewest projects."""
    if cluster_id is not None:
        if not await conn.fetchval("SELECT 1 FROM fluxbase.clusters WHERE id = $1 FOR KEY SHARE", cluster_id):
            raise ClusterNotFound()
        return cluster_id
    for _ in range(3):
        chosen = await conn.fetchval(
            """SELECT c.id FROM fluxbase.clusters c LEFT JOIN fluxbase.projects p ON p.cluster_id = c.id
               WHERE c.placement = 'open' OR c.id = 'default'
               GROUP BY c.id ORDER BY count(p.id), c.id = 'default' DESC, c.created_at, c.id LIMIT 1"""
        )
        # The choice again under a KEY SHARE lock, which reads the row's latest version: a key
        # that repointed (and so closed) the cluster since the choice was read is not followed
        # (hostile review 11 finding 1); the lock holds off the next change until this commits.
        if await conn.fetchval(
            """SELECT 1 FROM fluxbase.clusters WHERE id = $1 AND (placement = 'open' OR id = 'default')
               FOR KEY SHARE""",
            chosen,
        ):
            return str(chosen)
    return DEFAULT


class ClusterPools:
    """The runtime role's small pool on each registered cluster (provisioning, dropping), made on
    first use; the default cluster's is the control pool itself."""

    def __init__(self, settings: Settings, control: asyncpg.Pool) -> None:
        self._settings = settings
        self._control = control
        self._pools: dict[str, asyncpg.Pool] = {}
        self._versions: dict[str, str] = {}  # the connection version each pool was made from
        self._lock = asyncio.Lock()

    async def pool(self, cluster_id: str) -> asyncpg.Pool:
        if cluster_id == DEFAULT:
            return self._control
        async with self._lock:
            existing = self._pools.get(cluster_id)
            if existing is not None:
                return existing
            stored, version = await stored_target_and_version(self._control, self._settings, cluster_id)
            login = runtime_login(self._settings, stored, cluster_id)
            db = self._settings.database
            pool = await asyncpg.create_pool(
                host=login.host,
                port=login.port,
                user=login.user,
                password=login.password or None,
                database=login.database,
                ssl=False,
                min_size=0,
                max_size=4,
                timeout=db.connect_timeout,
                server_settings={
                    "application_name": "fluxbase-cluster",
                    "lock_timeout": f"{db.lock_timeout_ms}ms",
                    "statement_timeout": f"{db.statement_timeout_ms}ms",
                },
            )
            assert pool is not None
            self._pools[cluster_id] = pool
            self._versions[cluster_id] = version
            return pool

    async def forget_changed(self) -> list[str]:
        """Close the pools of clusters whose connection changed (or that were removed) since
        they were made: the next use connects with the stored details. Returns their ids."""
        if not self._pools:
            return []
        current = await connection_versions(self._control)
        async with self._lock:
            changed = [c for c in self._pools if current.get(c) != self._versions.get(c)]
            pools = [self._pools.pop(c) for c in changed]
            for c in changed:
                self._versions.pop(c, None)
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()
        if changed:
            log.info("database cluster connection changed: reconnecting to %s", ", ".join(changed))
        return changed

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        self._versions = {}
        for pool in pools:
            await pool.close()


# --- management keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ManagementKey:
    id: str
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ManagementKey:
        return cls(
            row["id"], row["name"], row["prefix"], row["created_at"], row["last_used_at"], row["revoked_at"]
        )


def _hash(raw: str) -> bytes:
    return hashlib.sha256(raw.encode()).digest()


def looks_like_management_key(value: str) -> bool:
    return value.startswith(MGMT_PREFIX)


async def create_management_key(db: asyncpg.Pool, user_id: str, name: str) -> tuple[str, ManagementKey]:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ValidationError("name must be 1 to 100 characters.")
    raw = MGMT_PREFIX + secrets.token_urlsafe(32)
    row = await db.fetchrow(
        """INSERT INTO fluxbase.management_keys (id, name, prefix, key_hash, created_by)
           VALUES ($1, $2, $3, $4, $5) RETURNING *""",
        ids.prefixed("mk"),
        name,
        raw[: len(MGMT_PREFIX) + 6],
        _hash(raw),
        user_id,
    )
    assert row is not None
    return raw, ManagementKey.from_row(row)


async def list_management_keys(db: asyncpg.Pool) -> list[ManagementKey]:
    rows = await db.fetch("SELECT * FROM fluxbase.management_keys ORDER BY created_at, id")
    return [ManagementKey.from_row(r) for r in rows]


async def revoke_management_key(db: asyncpg.Pool, key_id: str) -> ManagementKey:
    row = await db.fetchrow(
        """UPDATE fluxbase.management_keys SET revoked_at = coalesce(revoked_at, now())
           WHERE id = $1 RETURNING *""",
        key_id,
    )
    if row is None:
        raise NotFound("Management key not found.")
    return ManagementKey.from_row(row)


async def authenticate_management_key(db: asyncpg.Pool, raw: str) -> ManagementKey:
    row = await db.fetchrow(
        """UPDATE fluxbase.management_keys SET last_used_at = now()
           WHERE key_hash = $1 AND revoked_at IS NULL RETURNING *""",
        _hash(raw),
    )
    if row is None:
        raise AuthRequired("Management key is not valid.")
    return ManagementKey.from_row(row)


def require_instance_admin(is_admin: bool) -> None:
    if not is_admin:
        raise InsufficientPermissions("Only an instance admin may manage database clusters.")


async def mirror_project(db: asyncpg.Pool, pools: ClusterPools | None, project_id: str) -> None:
    """Copy what the guards on a registered cluster read of the project row (the database quota,
    status, read-only flag) from the control plane to the cluster's copy: `check_db_quota` there
    reads the copy, which was written once with the id and name only (hostile review 7)."""
    row = await db.fetchrow(
        "SELECT cluster_id, db_quota_bytes, status, read_only FROM fluxbase.projects WHERE id = $1",
        project_id,
    )
    if row is None or row["cluster_id"] in (None, DEFAULT) or pools is None:
        return
    remote = await pools.pool(row["cluster_id"])
    await remote.execute(
        """UPDATE fluxbase.projects SET db_quota_bytes = $2, status = $3, read_only = $4
           WHERE id = $1""",
        project_id,
        row["db_quota_bytes"],
        row["status"],
        row["read_only"],
    )
