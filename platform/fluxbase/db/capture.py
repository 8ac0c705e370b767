"""Which capture trigger functions a database gets, decided at every migration (issue 20).

fluxbase_capture.capture_insert() / capture_delete() / capture_update() run for every captured
write. Their C versions (ext/fluxbase_capture, built and installed into the embedded server by
`make venv`) cost a fraction of the PL/pgSQL ones (docs/benchmarks.md "What capture costs a
writer"). After the migrations, `install_capture` tries, in a savepoint, to replace the three
functions' bodies with the C ones; where the library cannot be loaded (not installed on this
server, built for another major version) or the migrating role is not a superuser (a C function
needs one), it installs (or keeps) the PL/pgSQL bodies, whose canonical source is sql/0049
(fluxbase_capture.*_plpgsql). CREATE OR REPLACE keeps the functions' oids, so the triggers of
existing tables keep working whichever is installed.

The same library has the request pipeline's session reset (issue 24): `install_reset` creates
fluxbase_guard.reset_session() where the library loads and drops it where it does not, and each
tenant session asks at login whether it exists (tenancy.wire.NATIVE_RESET_SQL) to choose between
the two-step reset and the six statements.
"""

from __future__ import annotations

import logging

import asyncpg

log = logging.getLogger(__name__)

LIBRARY = "$libdir/fluxbase_capture"
# function -> the library's symbol
NATIVE = {
    "capture_insert": "fluxbase_capture_insert",
    "capture_delete": "fluxbase_capture_delete",
    "capture_update": "fluxbase_capture_update",
}
C, PLPGSQL = "c", "plpgsql"
# A row event's old image as every reader gives it (alias `e` for fluxbase.events): a DELETE's is
# its record, which the outbox stores once (sql/0053); events stored before keep `old` set.
OLD_IMAGE_SQL = "coalesce(e.old, CASE e.operation WHEN 'DELETE' THEN e.record END)"
NOT_SUPERUSER = "the migrating role is not a superuser"


async def capture_language(conn: asyncpg.Connection) -> str | None:
    """'c' when all three capture functions are the C ones, 'plpgsql' when all are PL/pgSQL,
    None when they are missing or mixed."""
    langs = {
        r["lanname"]
        for r in await conn.fetch(
            """SELECT l.lanname FROM pg_catalog.pg_proc p
               JOIN pg_catalog.pg_language l ON l.oid = p.prolang
               WHERE p.pronamespace = 'fluxbase_capture'::pg_catalog.regnamespace
                 AND p.proname = ANY($1::text[]) AND p.pronargs = 0""",
            list(NATIVE),
        )
    }
    return langs.pop() if len(langs) == 1 else None


async def _native_installed(conn: asyncpg.Connection) -> bool:
    """Are the three functions already the C ones of LIBRARY, with their symbols?"""
    rows = await conn.fetch(
        """SELECT p.proname, p.probin, p.prosrc FROM pg_catalog.pg_proc p
           JOIN pg_catalog.pg_language l ON l.oid = p.prolang
           WHERE p.pronamespace = 'fluxbase_capture'::pg_catalog.regnamespace
             AND p.proname = ANY($1::text[]) AND p.pronargs = 0 AND l.lanname = 'c'""",
        list(NATIVE),
    )
    return {(r["proname"], r["probin"], r["prosrc"]) for r in rows} == {
        (name, LIBRARY, symbol) for name, symbol in NATIVE.items()
    }


async def install_native(conn: asyncpg.Connection) -> str | None:
    """Make the three functions the C ones, in a savepoint. None on success, else why not (one
    line, no secrets). Functions already C are left as they are once the library loads (no
    catalog change at every start)."""
    if not await conn.fetchval("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"):
        return NOT_SUPERUSER
    try:
        async with conn.transaction():
            if await _native_installed(conn):
                # Still loadable by this server (not removed, not another major version), each
                # symbol still there (a LOAD alone would not look them up: review 16)?
                await conn.execute(
                    "SELECT pg_catalog.fmgr_c_validator(p.oid) FROM pg_catalog.pg_proc p "
                    "WHERE p.pronamespace = 'fluxbase_capture'::pg_catalog.regnamespace "
                    "AND p.proname = ANY($1::text[]) AND p.pronargs = 0",
                    list(NATIVE),
                )
                return None
            # The library is loaded and each symbol looked up when the function is created.
            await conn.execute("SET LOCAL check_function_bodies = on")
            for name, symbol in NATIVE.items():
                await conn.execute(
                    f"CREATE OR REPLACE FUNCTION fluxbase_capture.{name}() RETURNS trigger "
                    f"LANGUAGE c SECURITY INVOKER AS '{LIBRARY}', '{symbol}'"
                )
    except asyncpg.PostgresError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{first} ({exc.sqlstate})"
    return None


async def _plpgsql_current(conn: asyncpg.Connection) -> bool:
    """Do the three functions have the bodies of their *_plpgsql sources (a migration may have
    changed those: sql/0054)?"""
    return bool(
        await conn.fetchval(
            """SELECT pg_catalog.count(*) = $2 FROM pg_catalog.pg_proc f
               JOIN pg_catalog.pg_proc s ON s.pronamespace = f.pronamespace
                AND s.proname = f.proname || '_plpgsql' AND s.pronargs = 0
               WHERE f.pronamespace = 'fluxbase_capture'::pg_catalog.regnamespace
                 AND f.proname = ANY($1::text[]) AND f.pronargs = 0 AND f.prosrc = s.prosrc""",
            list(NATIVE),
            len(NATIVE),
        )
    )


async def install_plpgsql(conn: asyncpg.Connection) -> None:
    """Give the three functions the PL/pgSQL bodies of sql/0049's *_plpgsql functions."""
    async with conn.transaction():
        for name in NATIVE:
            src = await conn.fetchval(
                """SELECT p.prosrc FROM pg_catalog.pg_proc p
                   WHERE p.pronamespace = 'fluxbase_capture'::pg_catalog.regnamespace
                     AND p.proname = $1 AND p.pronargs = 0""",
                f"{name}_plpgsql",
            )
            if src is None:
                raise RuntimeError(f"fluxbase_capture.{name}_plpgsql() is missing (sql/0049)")
            await conn.execute(
                f"CREATE OR REPLACE FUNCTION fluxbase_capture.{name}() RETURNS trigger "
                f"LANGUAGE plpgsql SECURITY INVOKER AS {_dollar_quote(src)}"
            )
            await conn.execute(f"ALTER FUNCTION fluxbase_capture.{name}() RESET search_path")


RESET_FUNCTION = "fluxbase_guard.reset_session()"
RESET_SYMBOL = "fluxbase_reset_session"
# The reset and the request identity in one call (the same library and guard): tenancy.wire uses
# it where a session finds it at login (NATIVE_BEGIN_SQL), else the reset and three SET LOCALs.
BEGIN_FUNCTION = "fluxbase_guard.begin_request(text, text, text)"
BEGIN_SYMBOL = "fluxbase_begin_request"


async def install_reset(conn: asyncpg.Connection) -> str | None:
    """Make fluxbase_guard.reset_session() and fluxbase_guard.begin_request(text, text, text)
    the C functions of LIBRARY, in a savepoint: None on success, else why not, and then both are
    dropped, so that sessions fall back to the six reset statements and the identity's SET LOCALs
    (a function that cannot load would fail every request). Their guard is in the C code (they
    refuse inside a request), which is why every role may execute them. Needs a superuser, as
    install_native."""
    if not await conn.fetchval("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"):
        return NOT_SUPERUSER
    try:
        async with conn.transaction():
            for function, symbol in ((RESET_FUNCTION, RESET_SYMBOL), (BEGIN_FUNCTION, BEGIN_SYMBOL)):
                current = await conn.fetchrow(
                    """SELECT l.lanname, p.probin, p.prosrc FROM pg_catalog.pg_proc p
                       JOIN pg_catalog.pg_language l ON l.oid = p.prolang
                       WHERE p.oid = pg_catalog.to_regprocedure($1)""",
                    function,
                )
                if current is not None and tuple(current) == (C, LIBRARY, symbol):
                    # Still loadable here, its symbol still there (review 16: a LOAD alone would
                    # not look it up).
                    await conn.execute(
                        "SELECT pg_catalog.fmgr_c_validator(pg_catalog.to_regprocedure($1))", function
                    )
                else:
                    await conn.execute("SET LOCAL check_function_bodies = on")
                    await conn.execute(
                        f"CREATE OR REPLACE FUNCTION {function} RETURNS void LANGUAGE c VOLATILE "
                        f"PARALLEL UNSAFE SECURITY INVOKER AS '{LIBRARY}', '{symbol}'"
                    )
                await conn.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")
    except asyncpg.PostgresError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        await conn.execute(f"DROP FUNCTION IF EXISTS {RESET_FUNCTION}")
        await conn.execute(f"DROP FUNCTION IF EXISTS {BEGIN_FUNCTION}")
        return f"{first} ({exc.sqlstate})"
    return None


def _dollar_quote(src: str) -> str:
    tag = "$fluxbase_capture$"
    n = 0
    while tag in src:
        n += 1
        tag = f"$fluxbase_capture{n}$"
    return f"{tag}{src}{tag}"


async def install_capture(conn: asyncpg.Connection, where: str = "") -> str | None:
    """The C capture where this server can load it, else PL/pgSQL; returns which is installed
    ('c', 'plpgsql', None if neither whole) and logs it in one line. A role that is not a
    superuser changes nothing. Under the migrations' lock (migrate.py), so that processes
    migrating at once (replicas starting together) decide one after the other."""
    suffix = f" ({where})" if where else ""
    if not await conn.fetchval("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"):
        now = await capture_language(conn)
        log.warning(
            "realtime capture: %s trigger functions, left as they are: %s%s", now, NOT_SUPERUSER, suffix
        )
        return now
    async with conn.transaction():
        if await conn.fetchval("SELECT to_regclass('fluxbase.schema_migrations') IS NOT NULL"):
            await conn.execute("LOCK TABLE fluxbase.schema_migrations IN SHARE ROW EXCLUSIVE MODE")
        why_reset = await install_reset(conn)
        if why_reset is None:
            log.info("session reset: C function (%s)%s", LIBRARY, suffix)
        else:
            log.warning("session reset: six statements, the C library is not used: %s%s", why_reset, suffix)
        why = await install_native(conn)
        if why is None:
            log.info("realtime capture: C trigger functions (%s)%s", LIBRARY, suffix)
            return C
        if await capture_language(conn) != PLPGSQL or not await _plpgsql_current(conn):
            await install_plpgsql(conn)
    log.warning("realtime capture: PL/pgSQL trigger functions, the C library is not used: %s%s", why, suffix)
    return PLPGSQL
