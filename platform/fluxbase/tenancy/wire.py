"""The only module that touches asyncpg's internals (tests/test_tenancy_kernel.py checks it).

Two things asyncpg's public API cannot do: run a statement with a row cap and return its rows,
command tag and columns in one round trip (`bind_execute`, what Connection.fetch itself does),
and the one-round-trip request prefix: PostgreSQL extended-protocol messages written ahead of a
statement's Bind/Execute/Sync on the same connection (sql/0011 explains the server side).
asyncpg is pinned to a tested range in pyproject.toml.

asyncpg sends one operation at a time and waits for its ReadyForQuery. Everything written
before its Bind/Execute/Sync, with no Sync of its own, runs in the same implicit transaction
and answers in the same reply; the driver's bind/execute reader skips ParseComplete,
BindComplete and CommandComplete, so prefix steps must not return rows (tests/test_sql.py
covers every step).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from fluxbase.errors import StatementFailed

log = logging.getLogger(__name__)

# Steps with no parameters, in this order: clear what a previous request left in the session
# (settings, cursors, LISTEN, temp objects, sequence state, session advisory locks) before
# anything of this request runs.
RESET_STEPS = (
    "CLOSE ALL",
    "UNLISTEN *",
    "RESET ALL",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
    "SELECT FROM pg_catalog.pg_advisory_unlock_all() u WHERE u IS NULL",
)
# The same where the server has the C function (issue 24: ext/fluxbase_capture's
# fluxbase_reset_session does all six at once; db/capture.install_reset creates it): a used
# session's reset is the call alone, and CLOSE ALL stays first only where the list is run whole
# (a session's first request runs only it, RequestPrefix.begin). It
# refuses once the request's identity or caps are set in the transaction, so tenant SQL cannot
# call it. Each session learns at login whether its server has it (NATIVE_RESET_SQL, a column of
# the login query). Only the one-round-trip prefix uses it: the simple-protocol resets
# (pools.SESSION_RESET, after COMMIT in the same query) stay the six statements, so that a reset
# that fails can never be taken for a failed COMMIT.
NATIVE_RESET_STEPS = ("CLOSE ALL", "SELECT WHERE fluxbase_guard.reset_session() IS NULL")
NATIVE_RESET_SQL = "pg_catalog.to_regprocedure('fluxbase_guard.reset_session()') IS NOT NULL"
# The same reset and the request identity in one call (the same library: db/capture.install_reset
# creates both). A used session's request then starts with this one step where it ran the reset
# and three SET LOCALs (`RequestPrefix.begins_request`); the function refuses as the reset does.
NATIVE_BEGIN = "SELECT WHERE fluxbase_guard.begin_request($1, $2, $3) IS NULL"
NATIVE_BEGIN_SQL = "pg_catalog.to_regprocedure('fluxbase_guard.begin_request(text,text,text)') IS NOT NULL"
# Errors a C function that no longer loads raises: gone (42883: dropped, or the library has no
# such symbol), its library missing (58P01) or unloadable (58000, XX000: another build).
NATIVE_RESET_FAILURES = frozenset({"42883", "58P01", "58000", "XX000"})
# Servers (address, database) where the C reset failed: sessions opened there for this long use
# the six statements, whatever the login query says (RequestPrefix.reset_failed).
NATIVE_RESET_RETRY_S = 60.0
_NATIVE_FAILED: dict[tuple[str, str], float] = {}


def reset_steps(native: bool) -> tuple[str, ...]:
    return NATIVE_RESET_STEPS if native else RESET_STEPS


def _server(conn: Any) -> tuple[str, str]:
    return (str(conn._addr), str(conn._params.database))


def _native_usable(conn: Any) -> bool:
    until = _NATIVE_FAILED.get(_server(conn))
    return until is None or time.monotonic() >= until


# Refuses (sql/0011) with FXRST when the transaction started with isolation, read-only or
# deferrable defaults a previous request changed, and with FXEPO when the project's auth epoch
# is not the one the API's cached key state was read with ($2 NULL: no cached key state).
# Every name and operator is schema-qualified: nothing resolves through the tenant's path.
# The epoch is a scalar subquery (project_id is the table's primary key: at most one row), not
# max(): a fresh backend parses and plans it without the aggregate's catalog lookups (issue 19:
# this step is part of every new connection's first request).
CHECK = """SELECT FROM (SELECT (SELECT a.epoch FROM fluxbase_guard.auth_epochs a
              WHERE a.project_id OPERATOR(pg_catalog.=) $1::pg_catalog.text) AS epoch) e
WHERE CASE
    WHEN pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed'
      OR pg_catalog.current_setting('transaction_read_only') OPERATOR(pg_catalog.<>) 'off'
      OR pg_catalog.current_setting('transaction_deferrable') OPERATOR(pg_catalog.<>) 'off'
    THEN fluxbase_guard.refuse('FXRST')
    WHEN $2::pg_catalog.int8 IS NOT NULL
      AND (e.epoch IS NULL OR e.epoch OPERATOR(pg_catalog.<>) $2::pg_catalog.int8)
    THEN fluxbase_guard.refuse('FXEPO')
    ELSE false
END"""
READ_ONLY = "SET transaction_read_only = on"
USER_SESSION = "SELECT FROM fluxbase_guard.check_user_session($1, $2, $3) s WHERE s IS NULL"

_EXECUTE = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"  # Execute: unnamed portal, no row limit
_BIND_NO_PARAMS_TAIL = b"\x00\x00\x00\x00\x00\x00"  # no param formats, no params, no result formats
_NULL = b"\xff\xff\xff\xff"


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def bind_execute(statement: str, params: Sequence[bytes | None] = ()) -> bytes:
    """Bind a prepared statement (text-format parameters) to the unnamed portal and run it."""
    parts = [b"\x00", statement.encode(), b"\x00\x00\x00", len(params).to_bytes(2, "big")]
    for value in params:
        if value is None:
            parts.append(_NULL)
        else:
            parts.append(len(value).to_bytes(4, "big"))
            parts.append(value)
    parts.append(b"\x00\x00")
    return _message(b"B", b"".join(parts)) + _EXECUTE


_BIND_EXECUTE_UNNAMED = _message(b"B", b"\x00\x00" + _BIND_NO_PARAMS_TAIL) + _EXECUTE


def parse_bind_execute(sql: str) -> bytes:
    """An unnamed statement without parameters, parsed, bound and run (a broadcast cap or an
    end user's identity, per request: the Parse message written out here, not by `_message`)."""
    text = sql.encode()
    # Parse: unnamed statement, the text, no declared parameter types (4 bytes around the text).
    return b"P%b\x00%b\x00\x00\x00%b" % ((len(text) + 8).to_bytes(4, "big"), text, _BIND_EXECUTE_UNNAMED)


# A step that fails, so that the Sync after it rolls the implicit transaction back (`drain`).
_ABORT = parse_bind_execute("SELECT fluxbase_guard.refuse('FXDRN')")


def parse(name: str, sql: str) -> bytes:
    """A Parse message: `sql` (no declared parameter types) as the named statement `name`."""
    return _message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


# RequestPrefix.shape: (parameter types, result attributes, column names).
Shape = tuple[Sequence[Any], Sequence[Any], list[str]]
_SHAPES_MAX = 512  # per connection (asyncpg caches 100 statements per connection by default)

# The check step's Bind/Execute by (its statement's name, project, epoch): RequestPrefix.checks.
_CHECKS: dict[tuple[str, str, int | None], bytes] = {}
_CHECKS_MAX = 4096


class RequestPrefix:
    """A connection's prepared pipeline steps, parsed once when the connection opens (`open`).

    `fixed` are statements the connection's requests often repeat (the identity of requests
    without an end user: constant per project and scope, hence per pool), and `limits` the
    resource caps (tenancy.statements.ASSERTED) that every request on a connection that logged in
    above them runs; they are prepared too, and any other statement is parsed unnamed.

    The steps are named statements that asyncpg does not know of (it never closes them: nothing
    but the session's end does); their names are as unguessable as asyncpg's own on a
    TenantConnection. `_login` is the one statement asyncpg prepared here (the login settings
    query); it stays referenced, so asyncpg never closes it, and `drain` runs it.

    Steps a connection's first request may not need are parsed when a request first needs them
    (issue 19: on a cold project's new backend every parse and first plan is catalog-cache work,
    and a connection evicted after one request never needs them): the reset steps but the first
    (a new session has nothing to reset: `fresh`, which every other use of the session clears,
    `pools.clean` and `TenantPool.release`), the read-only step and the end-user session check.
    Their Parse messages go first in that request's head, ahead of anything that could fail and
    make the server skip them, and count as sent when `send` wrote the head (`begin` only stages
    them). A fresh session's request still starts with the first reset step (`CLOSE ALL`: parsed
    without a catalog lookup, a no-op there): the identity's SET LOCAL must not be the pipeline's
    first statement, which PostgreSQL runs outside the implicit transaction block and answers
    with a "SET LOCAL can only be used in transaction blocks" warning."""

    __slots__ = (
        "_anonymous_begin",
        "_begin",
        "_check",
        "_first",
        "_fixed",
        "_login",
        "_read_only",
        "_shapes",
        "_staged",
        "_unparsed",
        "_user_session",
        "anonymous",
        "anonymous_claims",
        "fresh",
        "limits",
        "native_reset",
        "reset",
    )

    def __init__(
        self,
        names: Sequence[str],
        login: Any,
        fixed: Sequence[str],
        anonymous_claims: dict[str, Any],
        limits: Sequence[str] = (),
        native_reset: bool = False,
        reset_names: Sequence[str] = (),
        extra: Sequence[str] = (),
        begin: tuple[str, tuple[str, str, str]] | None = None,
    ):
        """`names`: the statements of (the first reset step, CHECK, READ_ONLY, USER_SESSION,
        *fixed, *limits, *extra); `reset_names`: those of the other reset steps (`reset_steps`);
        `extra`: other steps that repeat, prepared too (`statement`); `begin`: where the server
        has fluxbase_guard.begin_request(), the name its step is parsed under and the values of
        the `fixed` identity (`identity`)."""
        self._login = login
        self._shapes: dict[int, tuple[Any, Shape]] = {}
        # auth.jwt() of the requests whose whole identity is `fixed`, run as `anonymous`.
        self.anonymous_claims = anonymous_claims
        self.native_reset = native_reset
        rest = reset_steps(native_reset)[1:]
        self._first = bind_execute(names[0])  # a fresh session's only reset step (`begin`)
        # The C function closes the cursors too: a used session's reset is that one call.
        first = b"" if native_reset else self._first
        self.reset = first + b"".join(bind_execute(name) for name in reset_names)
        self._check, self._read_only, self._user_session = names[1:4]
        # Parse messages not sent yet, by what needs them (`begin`); a session nothing ran on yet.
        self._unparsed: dict[str, bytes] = {
            "reset": b"".join(parse(name, sql) for name, sql in zip(reset_names, rest, strict=True)),
            "read_only": parse(self._read_only, READ_ONLY),
            "user_session": parse(self._user_session, USER_SESSION),
        }
        # With begin_request, a used session's reset is that call, which `identity` makes: its
        # Parse is the "reset" step `begin` sends first, and the reset `begin` adds is nothing.
        self._begin: str | None = None
        self._anonymous_begin = b""
        if begin is not None and native_reset:
            self._begin, values = begin
            self._unparsed["reset"] = parse(self._begin, NATIVE_BEGIN)
            self.reset = b""
            self._anonymous_begin = bind_execute(self._begin, [v.encode() for v in values])
        self._staged: tuple[str, ...] | None = None
        self.fresh = True
        steps = (*fixed, *limits, *extra)
        self._fixed = {sql: bind_execute(name) for sql, name in zip(steps, names[4:], strict=True)}
        self.anonymous = b"".join(self._fixed[sql] for sql in fixed)
        self.limits = b"".join(self._fixed[sql] for sql in limits)

    @classmethod
    async def open(
        cls,
        conn: asyncpg.Connection,
        login_sql: str,
        fixed: Sequence[str],
        anonymous_claims: dict[str, Any],
        limits: Sequence[str] = (),
        extra: Sequence[str] = (),
        anonymous_values: tuple[str, str, str] | None = None,
    ) -> tuple[RequestPrefix, Any]:
        """Prepare the steps on a new connection and run `login_sql` (a query of one row, the
        session's login settings, with a `native_reset` column, NATIVE_RESET_SQL, where the C reset may
        be used): (the prefix, that row), in two round trips, not one per step.

        The steps' Parse messages go out ahead of asyncpg's own Parse/Describe/Flush of
        `login_sql` (no Sync between them): the server parses them all and answers in one reply,
        whose ParseCompletes asyncpg's prepare reader skips. A step that fails to parse fails
        that prepare (asyncpg then syncs and raises the error): the caller closes the connection.
        The first reset step, the check step, the identity and the caps are parsed now; the
        other reset steps, which of the two resets the login row tells, when first needed
        (`begin`). `anonymous_values`: the `fixed` identity's values (identity.identity_values),
        for fluxbase_guard.begin_request() where the login row's `native_begin` says the server
        has it (NATIVE_BEGIN_SQL).
        """
        sqls = (RESET_STEPS[0], CHECK, READ_ONLY, USER_SESSION, *fixed, *limits, *extra)
        names = [conn._get_unique_id("stmt") for _ in sqls]
        eager = 0, 1, *range(4, len(sqls))
        write(conn, b"".join(parse(names[i], sqls[i]) for i in eager))
        login = await conn.prepare(login_sql)
        row = await login.fetchrow()
        # (No such column: the six statements.)
        native = bool(row.get("native_reset")) and _native_usable(conn)
        reset_names = [conn._get_unique_id("stmt") for _ in reset_steps(native)[1:]]
        begin = None
        if native and anonymous_values is not None and row.get("native_begin"):
            begin = (conn._get_unique_id("stmt"), anonymous_values)
        prefix = cls(names, login, fixed, anonymous_claims, limits, native, reset_names, extra, begin)
        return prefix, row

    def begin(self, read_only: bool, user_session: bool) -> bytes:
        """The head's first part: the Parse messages of the lazily parsed steps this request
        needs (`read_only`, `user_session`, and the reset steps unless the session is fresh),
        then the reset (its first step only on a fresh session). Staged: `send` marks them sent."""
        unparsed = self._unparsed
        fresh = self.fresh
        if not (
            (not fresh and "reset" in unparsed)
            or (read_only and "read_only" in unparsed)
            or (user_session and "user_session" in unparsed)
        ):  # (the usual case: every step this request needs is parsed on the session)
            self._staged = ()
            return self._first if fresh else self.reset
        wanted = (("reset", not fresh), ("read_only", read_only), ("user_session", user_session))
        needed = tuple(k for k, want in wanted if want and k in unparsed)
        self._staged = needed
        return b"".join(unparsed[k] for k in needed) + (self._first if fresh else self.reset)

    def begins_request(self) -> bool:
        """Whether this attempt's identity is one call of fluxbase_guard.begin_request() (a used
        session of a server that has it), which resets the session first (`begin` added no
        reset), instead of the SET LOCAL statements."""
        return self._begin is not None and not self.fresh

    def begin_request(self, values: tuple[str, str, str] | None) -> bytes:
        """That call's step, for the `fixed` identity (None: prebuilt) or these values
        (identity.identity_values)."""
        if values is None:
            return self._anonymous_begin
        assert self._begin is not None
        return bind_execute(self._begin, [v.encode() for v in values])

    def use_statements(self, conn: Any) -> None:
        """Reset with the six statements from now on (the C reset failed: `reset_failed`)."""
        rest = RESET_STEPS[1:]
        names = [conn._get_unique_id("stmt") for _ in rest]
        self.native_reset = False
        self._begin = None
        self.reset = self._first + b"".join(bind_execute(name) for name in names)
        self._unparsed["reset"] = b"".join(parse(name, sql) for name, sql in zip(names, rest, strict=True))

    async def reset_failed(self, conn: Any, exc: BaseException) -> bool:
        """Whether a request's failure `exc` was this session's C reset failing to run (the
        function dropped, its library gone or another build): then nothing after it ran, this
        session resets with the six statements from now on, so do sessions opened on this server
        for NATIVE_RESET_RETRY_S, and the request may run again. Decided by calling the function
        on this session (now idle: the failed request's Sync ended its transaction), never from
        the error's text, which a tenant's own statement can write (hostile review 23), and only
        when the call fails with one of those codes too; a statement's own error costs that one
        round trip."""
        if not self.native_reset or getattr(exc, "sqlstate", None) not in NATIVE_RESET_FAILURES:
            return False
        try:
            # The call the request made: begin_request (with an empty identity, gone with the
            # probe's own transaction) where the session uses it, else the reset.
            await conn.execute(NATIVE_RESET_STEPS[1] if self._begin is None else _BEGIN_PROBE)
        except asyncpg.PostgresError as probe:
            if probe.sqlstate not in NATIVE_RESET_FAILURES:
                # It ran and failed at its work (its DISCARD TEMP waiting on a lock a tenant
                # holds, hostile review 24): not a reset that cannot run. The request's own
                # error stands; the session's next request resets it again.
                return False
            _NATIVE_FAILED[_server(conn)] = time.monotonic() + NATIVE_RESET_RETRY_S
            log.warning(
                "the C session reset failed (%s): this server's sessions reset with statements for %.0f s",
                probe.sqlstate,
                NATIVE_RESET_RETRY_S,
            )
            self.use_statements(conn)
            return True
        return False

    def statement(self, sql: str) -> bytes:
        """Run `sql` (no parameters): by name if prepared here, else parsed unnamed."""
        prepared = self._fixed.get(sql)
        return prepared if prepared is not None else parse_bind_execute(sql)

    def checks(
        self,
        project_id: str,
        epoch: int | None,
        read_only: bool,
        session: tuple[str, str] | None,
        user_id: str | None,
    ) -> bytes:
        key = (self._check, project_id, epoch)
        out = _CHECKS.get(key)
        if out is None:
            # The same bytes for every request of this connection until the project's auth
            # epoch moves: built once (the statement's name, random per session, is in the key).
            if len(_CHECKS) >= _CHECKS_MAX:
                _CHECKS.clear()
            out = _CHECKS[key] = bind_execute(
                self._check, (project_id.encode(), None if epoch is None else str(epoch).encode())
            )
        if session is not None:
            out += bind_execute(
                self._user_session, (session[0].encode(), (user_id or "").encode(), session[1].encode())
            )
        if read_only:
            out += bind_execute(self._read_only)
        return out

    def shape(self, stmt: Any) -> Shape:
        """(parameter types, result attributes, column names) of a statement asyncpg prepared
        on this connection: asyncpg builds the first two anew at each call (a named tuple per
        type), and they never change for one prepared statement, so they are built once here.
        Keyed by the statement object (a re-prepared statement is a new one), held with it."""
        known = self._shapes.get(id(stmt))
        if known is not None and known[0] is stmt:
            return known[1]
        if len(self._shapes) >= _SHAPES_MAX:
            self._shapes.clear()
        attrs = attributes(stmt)
        shape = (parameter_types(stmt), attrs, names(attrs))
        self._shapes[id(stmt)] = (stmt, shape)
        return shape

    def send(self, conn: Any, data: bytes) -> None:
        """Hold the prefix `data` so that it leaves with the driver's next write, in the same
        system call: one TCP segment, one wake-up of PostgreSQL for the prefix and the
        statement, where two writes made two. The connection writes through a `HeldTransport`
        (every asyncpg connection of the process does: `_Protocol`), which puts what it holds
        in front of the next write: asyncpg's Bind/Execute/Sync, its Parse/Describe/Flush
        (`prepare_after`), or `drain`'s. The order on the wire is the order of the writes."""
        staged = self._staged
        if staged is not None:  # the head `begin` built is on its way: what it parsed, and reset
            self._staged = None
            self.fresh = False
            for k in staged:
                del self._unparsed[k]
        transport = conn._transport
        if type(transport) is HeldTransport:
            transport.held += data
        else:  # (a connection asyncpg opened before this module was imported)
            transport.write(data)

    async def drain(self, conn: Any) -> None:
        """End a prefix written without its statement, rolling its transaction back: a step that
        fails (`_ABORT`), then the login settings query with a Sync after it. Nothing of the
        transaction commits: not the prefix's settings, nor what parsing a statement did in it
        (`prepare_after`: a request refused for its parameters, or whose types are introspected,
        must not keep its parse-time writes, hostile review 24). Its errors are moot (the request
        already failed, or is prepared again)."""
        write(conn, _ABORT)
        with contextlib.suppress(asyncpg.PostgresError):
            await conn._protocol.bind_execute(
                state=self._login._state,
                args=[],
                portal_name="",
                limit=0,
                return_extra=False,
                timeout=None,
            )


def loop_of(conn: Any) -> asyncio.AbstractEventLoop:
    """The event loop a connection runs on (its requests' loop), without asking Python for the
    running one (a getpid system call on 3.11)."""
    return conn._loop  # type: ignore[no-any-return]


def write(conn: Any, data: bytes) -> None:
    """Queue raw protocol messages ahead of the connection's next operation."""
    conn._transport.write(data)


_BEGIN_PROBE = "SELECT WHERE fluxbase_guard.begin_request('', '{}', '') IS NULL"


class HeldTransport:
    """The transport an asyncpg connection writes through: the event loop's, with bytes held for
    the next write (`RequestPrefix.send`). A held prefix goes out in front of whatever the
    connection writes next, in one system call and one TCP segment with it; nothing else
    changes. The rest of the transport's interface is passed through."""

    __slots__ = ("held", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.held = b""

    def write(self, data: Any) -> None:
        held = self.held
        if held:
            self.held = b""
            data = held + data
        self.transport.write(data)

    def writelines(self, lines: Any) -> None:
        held = self.held
        if held:
            self.held = b""
            lines = [held, *lines]
        self.transport.writelines(lines)

    def abort(self) -> None:
        self.held = b""
        self.transport.abort()

    def close(self) -> None:
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()  # type: ignore[no-any-return]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Protocol(asyncpg.protocol.Protocol):  # type: ignore[misc]
    """asyncpg's protocol, given a `HeldTransport` over the loop's transport when it connects.
    asyncpg keeps its transport in a C attribute that only `connection_made` sets, so this is
    the one place to put anything between the driver and the socket."""

    def connection_made(self, transport: Any) -> None:
        held = self.held_transport = HeldTransport(transport)
        super().connection_made(held)


class _ProtocolModule:
    """What `asyncpg.connect_utils` sees as its `protocol` module: it only ever takes
    `Protocol` from it (`__connect_addr`'s factory); anything else is asyncpg's."""

    Protocol = _Protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncpg.protocol, name)


def _install() -> None:
    """Every asyncpg connection this process opens from now on writes through a `HeldTransport`
    (its `Connection._transport` too, `held_transport`); tests/test_sql_prefix_write.py fails if an
    asyncpg upgrade moves the hook."""
    from asyncpg import connect_utils

    if connect_utils.protocol is asyncpg.protocol:
        connect_utils.protocol = _ProtocolModule()  # type: ignore[assignment]


_install()


def unfit(conn: Any) -> bool:
    """Whether a session must not go to the next request: it still holds prefix bytes that no
    statement followed (a request cancelled from outside between `RequestPrefix.send` and the
    driver's write, asyncpg waiting for an earlier cancel; hostile review 28), or a request left
    it a client encoding other than UTF-8 (dynamic SQL in a project function can SET it, and the
    next request's parameters, its identity's included, would be encoded and decoded with it
    before its reset runs; hostile review 29). asyncpg follows the server's reports of
    `client_encoding`, so its codec is the session's."""
    transport = conn._transport
    if type(transport) is HeldTransport and transport.held:
        return True
    return conn._protocol.get_settings().get_text_codec().name != "utf-8"  # type: ignore[no-any-return]


def held_transport(protocol: Any, transport: Any) -> Any:
    """The transport a new asyncpg Connection over `protocol` should keep: the protocol's
    `HeldTransport`, where it has one, so that every write of the connection goes through it."""
    return getattr(protocol, "held_transport", transport)


# -- statements with a row cap --------------------------------------------------------------------


def cached_statement(conn: Any, query: str) -> Any:
    """The statement `prepare` would answer from asyncpg's statement cache (None: not cached),
    without its two coroutines: the same cache key asyncpg's `_get_statement` looks up."""
    return conn._stmt_cache.get((query, conn._protocol.get_record_class(), False))


async def prepare(conn: Any, query: str) -> Any:
    """The connection's (cached) prepared statement for `query`."""
    try:
        return await conn._get_statement(query, None)
    except asyncpg.exceptions.UnsupportedClientFeatureError:
        # A parameter or result type the session's codecs cannot take (below, `execute`): a
        # statement error, never a "connection lost" 503; the session is not reused.
        conn.terminate()
        raise StatementFailed(UNDECODABLE, "0A000") from None


class NeedsIntrospection(Exception):
    """`prepare_after` met a type asyncpg must introspect: its queries each end with a Sync, which
    would end the request's transaction, so the request takes the explicit-transaction path
    (tenancy.session.Fallback), where they run inside the request's own transaction."""


async def prepare_after(conn: Any, prefix: RequestPrefix, head: bytes, query: str) -> Any:
    """Prepare `query`, which the statement cache does not hold, after the request prefix `head`
    in the same implicit transaction; the caller then sends only the statement's
    Bind/Execute/Sync.

    Parsing a statement can run tenant code (a domain's CHECK on a literal of the domain, an
    array or row input function): written first, the reset, identity, caps, checks and read-only
    mode are in force when it runs, as for the statement itself (hostile review 23: parsed ahead
    of them, in its own transaction, it wrote to a read-only project). asyncpg's own prepare
    (Parse, Describe, Flush: no Sync) skips the prefix's BindComplete and CommandComplete
    messages, and a prefix step's error fails it (asyncpg then syncs). Nothing may end the
    transaction between the prefix and the statement's Bind: statements evicted from the cache
    are closed first, and where a type must be introspected the transaction is rolled back
    (`drain`: what parsing did is undone, hostile review 24), this statement queued for Close, and
    NeedsIntrospection raised (hostile review 25: introspecting here ran asyncpg's queries on the
    session as the previous request left it, outside any request). Named statements only
    (`named`: the one-round-trip path takes no statement longer than asyncpg's cacheable size)."""
    config = conn._config
    if not conn._stmt_cache_enabled or (
        config.max_cacheable_statement_size and len(query) > config.max_cacheable_statement_size
    ):
        raise ValueError("prepare_after takes only statements asyncpg caches (named)")
    if conn._stmts_to_close:
        await conn._cleanup_stmts()  # their Close and Sync, before the request's transaction
    record_class = conn._protocol.get_record_class()
    prefix.send(conn, head)
    try:
        stmt = await conn._protocol.prepare(
            conn._get_unique_id("stmt"), query, None, record_class=record_class, ignore_custom_codec=False
        )
        if stmt._init_types():
            conn._stmts_to_close.add(stmt)  # closed before the next prepare: never left behind
            await prefix.drain(conn)
            raise NeedsIntrospection()
        stmt._init_codecs()
    except asyncpg.exceptions.UnsupportedClientFeatureError:
        conn.terminate()  # as `prepare`
        raise StatementFailed(UNDECODABLE, "0A000") from None
    conn._stmt_cache.put((query, record_class, False), stmt)
    return stmt


def named(stmt: Any) -> bool:
    """Whether asyncpg prepared `stmt` by name: it parses statements longer than its cache size
    unnamed, and a pipelined step's own (unnamed) Parse would replace them."""
    return bool(stmt.name)


# A statement run only to end a pipeline whose own statement was never sent (Bind refused while
# encoding its parameters): its Sync ends the implicit run of the steps written before it.
DRAIN = "SELECT WHERE false"


def parameter_types(stmt: Any) -> Sequence[Any]:
    """The statement's parameter types (each with `.name`)."""
    return stmt._get_parameters()  # type: ignore[no-any-return]


def column_names(stmt: Any) -> list[str]:
    return names(stmt._get_attributes())


def names(attributes: Sequence[Any]) -> list[str]:
    """The column names of `attributes(stmt)` (asyncpg builds that tuple anew at each call: a
    request asks for it once)."""
    return [a.name for a in attributes]


def attributes(stmt: Any) -> Sequence[Any]:
    """The statement's result columns as asyncpg `Attribute`s (`.name`, `.type.name`), built
    anew by asyncpg at each call."""
    return stmt._get_attributes()  # type: ignore[no-any-return]


async def execute(conn: Any, stmt: Any, args: list[Any], limit: int) -> tuple[list[Any], str | None, bool]:
    """Bind and run a prepared statement, fetching at most `limit` rows: (rows, command tag or
    None, whether it completed). Anything already `write`n goes out ahead of it."""
    try:
        rows, status, completed = await conn._protocol.bind_execute(
            state=stmt, args=args, portal_name="", limit=limit, return_extra=True, timeout=None
        )
    except asyncpg.DataError:
        raise  # refused while encoding the parameters, before anything was written
    except (asyncpg.exceptions.UnsupportedClientFeatureError, ValueError, TypeError):
        # A result value the session's codecs cannot decode (hostile review 15): a range or a
        # composite over numeric, whose codec is text-only here (exact numbers), or a numeric
        # field of an anonymous record whose binary form is not UTF-8 (tenancy.pools
        # `_numeric_decode`). The driver gave up mid-stream: never reuse the session; the caller
        # gets a statement error, not a 500 or a "connection lost" 503.
        conn.terminate()
        raise StatementFailed(UNDECODABLE, "0A000") from None
    return rows, (status.decode() if isinstance(status, bytes) else status), bool(completed)


# What `execute` turns into UNDECODABLE (asyncpg.DataError, a ValueError too, is caught before).
UNDECODABLE_ERRORS = (asyncpg.exceptions.UnsupportedClientFeatureError, ValueError, TypeError)


def run_bound(conn: Any, stmt: Any, args: list[Any], limit: int) -> Any:
    """`execute` without a coroutine frame of its own (the one-round-trip hot path awaits one
    frame less): awaiting it gives (rows, command tag as bytes or str, completed); its caller
    handles asyncpg.DataError as `execute`'s does, then UNDECODABLE_ERRORS with `undecodable`."""
    return conn._protocol.bind_execute(
        state=stmt, args=args, portal_name="", limit=limit, return_extra=True, timeout=None
    )


def refused_encoding(exc: BaseException) -> bool:
    """Whether asyncpg refused to encode a parameter (nothing of the statement written). It
    raises that as `asyncpg.DataError`, which is also the PostgresError of SQLSTATE 22000; the
    server's own errors carry a severity, the driver's none."""
    return type(exc) is asyncpg.DataError and getattr(exc, "severity", None) is None


def undecodable(conn: Any) -> StatementFailed:
    """What a result value the session's codecs cannot decode becomes (see `execute`)."""
    conn.terminate()
    return StatementFailed(UNDECODABLE, "0A000")


UNDECODABLE = (
    "A value of this statement cannot be sent or returned as it is: records, composites and ranges "
    "with numeric fields, and range parameters, are not supported. Select their fields, "
    "or cast the value to or from text or json."
)


async def forget_cached_plans(conn: Any, exc: BaseException) -> None:
    """Before the one retry after a DDL: without this asyncpg hands back the same cached
    statement (`prepare` is past the driver's own retry)."""
    if isinstance(exc, asyncpg.exceptions.OutdatedSchemaCacheError):
        await conn.reload_schema_state()
    else:
        conn._drop_local_statement_cache()


def forget_statements(conn: Any) -> None:
    """Drop asyncpg's statement cache of this session: what is used next is prepared afresh
    under new names (asyncpg closes the old ones; closing one that no longer exists is no
    error)."""
    conn._drop_local_statement_cache()


def no_jit_introspection(conn: Any) -> None:
    """asyncpg wraps its type introspection (first use of an enum, domain, composite, ...) in
    set_config('jit', ...), which read and readwrite roles may not call (sql/0007). Without
    this, such a type would fail for them; the introspection query runs with the role's jit."""
    conn._server_caps = conn._server_caps._replace(jit=False)
