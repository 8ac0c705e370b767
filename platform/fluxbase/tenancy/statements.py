"""What a tenant statement is, decided by PostgreSQL's own grammar, and whether it is refused.

The one place that classifies tenant SQL (execute-sql, execute-batch, migrations and scripts).
It asks libpg_query (through `pglast`), the parser of the server itself, never a hand-written
lexer: PostgreSQL ends a `--` comment at `\\r` as well as at `\\n`, spells identifiers with
`U&"\\0066..."`, nests block comments and dollar-quotes bodies, and any disagreement between a
lexer of ours and the server was a hole (issue 15). A statement we cannot parse is refused.

`Classifier.classify(text)` parses once per distinct text (a bounded LRU; ~10 µs a parse on a
miss, one dict lookup on a hit) and returns a `Verdict`: the statements' facts and, for each
context (a single request, a batch, a script), the first row of `RULES` that refuses it. Every
refusal is a row of that one table: what, why, SQLSTATE, message.

Privileges stay the boundary (sql/0007, sql/0013): a call hidden in a function body is not a
statement, so the classifier refuses what it can see and the REVOKEs refuse the rest.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from pglast import parser as pg

from fluxbase.db.extensions import CATALOG as EXTENSION_CATALOG
from fluxbase.db.extensions import NAMES as EXTENSION_NAMES
from fluxbase.db.quoting import quote_literal

REQUEST, BATCH, SCRIPT = "request", "batch", "script"
CONTEXTS = (REQUEST, BATCH, SCRIPT)

CACHE_SIZE = 4096  # distinct statement texts kept classified
CACHE_MAX_CHARS = 16_384  # longer texts are classified every time (the cache stays bounded)

_decode = msgspec.json.Decoder().decode


# -- per-role caps ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    """The most of each shared resource one request may ask for with SET or set_config."""

    work_mem_kb: int = 16_384
    maintenance_work_mem_kb: int = 65_536
    temp_file_limit_kb: int = 1_048_576
    temp_buffers_kb: int = 8_192
    hash_mem_multiplier: float = 2.0
    max_parallel_workers_per_gather: int = 2
    max_parallel_maintenance_workers: int = 2
    statement_timeout_ms: int = 15_000
    lock_timeout_ms: int = 5_000
    idle_in_transaction_ms: int = 10_000

    @classmethod
    def of(cls, tenant: Any) -> Caps:
        """The caps of `config.TenantSettings` (the values the roles are provisioned with)."""
        return cls(
            work_mem_kb=tenant.work_mem_kb,
            maintenance_work_mem_kb=max(65_536, tenant.work_mem_kb),
            temp_file_limit_kb=tenant.temp_file_limit_kb,
            statement_timeout_ms=tenant.statement_timeout_ms,
            lock_timeout_ms=tenant.lock_timeout_ms,
            idle_in_transaction_ms=tenant.idle_in_transaction_ms,
        )

    def limits(self) -> dict[str, tuple[str, float]]:
        """setting -> (unit kind, cap) in the setting's base unit (kB, ms, or plain)."""
        return {
            "work_mem": ("kB", self.work_mem_kb),
            "maintenance_work_mem": ("kB", self.maintenance_work_mem_kb),
            "temp_file_limit": ("kB", self.temp_file_limit_kb),
            "temp_buffers": ("8kB", self.temp_buffers_kb),
            "hash_mem_multiplier": ("", self.hash_mem_multiplier),
            "max_parallel_workers_per_gather": ("", self.max_parallel_workers_per_gather),
            "max_parallel_maintenance_workers": ("", self.max_parallel_maintenance_workers),
            "statement_timeout": ("ms", self.statement_timeout_ms),
            "lock_timeout": ("ms", self.lock_timeout_ms),
            "idle_in_transaction_session_timeout": ("ms", self.idle_in_transaction_ms),
        }

    def values(self, carried: dict[str, str] | None = None) -> dict[str, str]:
        """The value of each ASSERTED setting a statement starts with: its cap, or what the
        request itself SET visibly (the classifier checked that against the cap)."""
        out = {}
        for name, (unit, cap) in self.limits().items():
            if name in ASSERTED:
                out[name] = f"{int(cap)}{unit}" if unit else f"{cap:g}"
        if carried:
            out.update(carried)
        return out

    def statements(self, carried: dict[str, str] | None = None, *, local: bool = True) -> tuple[str, ...]:
        """`SET LOCAL` (or session `SET`) statements asserting `values(carried)`."""
        verb = "SET LOCAL" if local else "SET"
        return tuple(f"{verb} {n} = {_quote(v)}" for n, v in self.values(carried).items())

    def script(self, carried: dict[str, str] | None = None, *, local: bool = True) -> str:
        return "; ".join(self.statements(carried, local=local))


# The capped settings every request's transaction asserts at its start, and before each later
# statement of a batch (tenancy.session): a project admin runs plpgsql, whose `EXECUTE 'SET …'`
# and `ALTER ROLE CURRENT_USER SET …` the classifier never sees, and PostgreSQL has no per-role
# maximum for user-settable settings. Not temp_buffers (it cannot be set again once the session
# used temporary tables, so asserting it would fail every later request on that connection) and
# not temp_file_limit (superuser-only: tenants cannot change it).
ASSERTED = frozenset(
    {
        "work_mem",
        "maintenance_work_mem",
        "hash_mem_multiplier",
        "max_parallel_workers_per_gather",
        "max_parallel_maintenance_workers",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
    }
)
# Resource settings a function's or procedure's SET clause may not name (sql/0022 refuses the
# same in dynamic DDL): the clause applies at every call, also when the value comes FROM CURRENT.
ROUTINE_REFUSED = frozenset(Caps().limits())


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def carried_settings(statement: Statement, carried: dict[str, str]) -> None:
    """Update `carried` (setting → value) with the ASSERTED settings a statement SETs visibly,
    so a batch's later statements keep them (RESET or DEFAULT goes back to the cap)."""
    for st in statement.settings:
        if st.name not in ASSERTED or st.via == "SET clause":
            continue
        if st.resets:
            carried.pop(st.name, None)
        elif st.value is not None:
            carried[st.name] = st.value


_MEMORY = {"b": 1 / 1024, "kb": 1, "mb": 1024, "gb": 1024**2, "tb": 1024**3}
_TIME = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER_UNIT = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")


def _in_base_unit(value: str, unit: str) -> float | None:
    """A GUC value as PostgreSQL reads it, in the setting's base unit; None if unreadable."""
    m = _NUMBER_UNIT.fullmatch(value)
    if m is None:
        return None
    number, suffix = float(m.group(1)), m.group(2)
    if unit == "":
        return None if suffix else number
    table = _TIME if unit == "ms" else _MEMORY
    if not suffix:
        return number * (8 if unit == "8kB" else 1)
    scale = table.get(suffix if unit == "ms" else suffix.lower())
    if scale is None or (unit != "ms" and suffix not in ("B", "kB", "MB", "GB", "TB")):
        return None  # PostgreSQL's units are case-sensitive: "kb" is refused by the server too
    return number * scale


def over_cap(name: str, value: str | None, caps: Caps) -> str | None:
    """Why SET `name` = `value` takes more than a request's share, or None (not a capped setting,
    or within the cap). `value` None: not a literal, so unknown (refused for capped settings)."""
    limit = caps.limits().get(name)
    if limit is None:
        return None
    unit, cap = limit
    shown = {"kB": f"{int(cap)}kB", "8kB": f"{int(cap)}kB", "ms": f"{int(cap)}ms", "": f"{cap:g}"}[unit]
    if value is None:
        return f"{name} may only be set to a literal value (at most {shown})"
    amount = _in_base_unit(value, unit)
    if amount is None:
        return f"{name} = {value!r} is not a value Fluxbase can check against the cap ({shown})"
    if unit in ("kB", "8kB", "ms"):
        # PostgreSQL stores these as integers: it rounds the value in its base unit (rint, so
        # half to even), and '0.4' or '400us' for a timeout becomes 0, which means no limit.
        amount = float(round(amount / (8 if unit == "8kB" else 1))) * (8 if unit == "8kB" else 1)
    # -1 (temp_file_limit) and 0 (the timeouts) mean "no limit".
    unlimited = amount < 0 or (unit == "ms" and amount == 0)
    if unlimited or amount > cap:
        return f"{name} = {value!r} is above the per-role cap of {shown}: one request may not take more"
    return None


# -- facts of a statement -----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One change to a run-time setting that a statement makes or declares."""

    name: str | None  # lower-cased; None: RESET ALL, or set_config with a computed name
    value: str | None  # the literal value, None for RESET/DEFAULT/FROM CURRENT or a non-literal
    local: bool  # SET LOCAL / set_config(..., true) / a function's SET clause
    via: str  # "SET", "RESET", "set_config", "SET clause"
    resets: bool = False  # RESET, SET ... TO DEFAULT, FROM CURRENT: back to the role's value
    from_current: bool = False  # a routine's SET ... FROM CURRENT: whatever the session has then


@dataclass(frozen=True)
class ExtensionOp:
    """A CREATE EXTENSION or DROP EXTENSION, which Fluxbase runs as a call of its own definer
    (sql/0023): the extension was installed at migration time; a project only gets USAGE on it."""

    create: bool
    names: tuple[str, ...]
    missing_ok: bool  # IF NOT EXISTS / IF EXISTS
    cascade: bool
    version: str | None = None  # CREATE EXTENSION ... VERSION (refused: the instance's is installed)

    @property
    def tag(self) -> str:
        return "CREATE EXTENSION" if self.create else "DROP EXTENSION"

    def call(self) -> str:
        """The platform statement that does it, in the tenant's own transaction."""
        flag = "true" if self.missing_ok else "false"
        if self.create:
            return f"SELECT fluxbase_guard.create_extension({quote_literal(self.names[0])}, {flag})"
        names = ", ".join(quote_literal(n) for n in self.names)
        cascade = "true" if self.cascade else "false"
        return f"SELECT fluxbase_guard.drop_extensions(ARRAY[{names}]::text[], {flag}, {cascade})"


def _extension_op(node: str, body: dict[str, Any]) -> ExtensionOp | None:
    if node == "CreateExtensionStmt":
        version = None
        cascade = False
        for option in body.get("options") or []:
            d = option.get("DefElem", {})
            if d.get("defname") == "new_version":
                version = str(d.get("arg", {}).get("String", {}).get("sval", "")) or "?"
            elif d.get("defname") == "cascade":
                cascade = True
        return ExtensionOp(
            True, (str(body.get("extname", "")),), bool(body.get("if_not_exists")), cascade, version
        )
    if node == "DropStmt" and body.get("removeType") == "OBJECT_EXTENSION":
        names = tuple(str(o.get("String", {}).get("sval", "")) for o in body.get("objects") or [])
        return ExtensionOp(False, names, bool(body.get("missing_ok")), body.get("behavior") == "DROP_CASCADE")
    return None


@dataclass(frozen=True)
class Statement:
    """Facts of one statement, from its parse tree."""

    node: str  # the parse node, e.g. "SelectStmt", "TransactionStmt"; "" if it did not parse
    keyword: str  # its first keyword, upper-cased ("WITH", "SELECT", ...)
    detail: str = ""  # TransactionStmt kind, VariableSetStmt kind, or the parse error
    settings: tuple[Setting, ...] = ()
    functions: frozenset[str] = frozenset()  # names of every function called anywhere in it
    large_objects: bool = False  # an lo_* function or a LARGE OBJECT target
    targets: frozenset[str] = frozenset()  # object kinds it names (OBJECT_DATABASE, OBJECT_ROLE, ...)
    # The statements of a SQL-language function body it creates: they run whenever the function
    # is called, inside the caller's statement (a SET there changes the caller's settings).
    inner: tuple[Statement, ...] = ()
    pg_settings_write: bool = False  # UPDATE pg_settings (its rule calls set_config)
    # Every parse node kind inside it: EXECUTE hides in EXPLAIN and CREATE TABLE AS.
    kinds: frozenset[str] = frozenset()
    extension: ExtensionOp | None = None  # CREATE/DROP EXTENSION, run by Fluxbase (sql/0023)


@dataclass(frozen=True)
class Refusal:
    """Why a statement is refused, as the SQL_EXEC_ERROR envelope reports it."""

    rule: str
    message: str
    sqlstate: str
    index: int = 0  # the statement (within the text) that is refused


@dataclass(frozen=True)
class Verdict:
    """A classified text: its statements and the first refusal in each context (or None)."""

    statements: tuple[Statement, ...]
    refusals: dict[str, Refusal | None] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.statements)

    # keyword and pipelinable: read by every execute-sql request of a cached verdict, computed
    # once (a frozen verdict of frozen statements: the answer never changes).
    @functools.cached_property
    def keyword(self) -> str:
        """The first statement's first keyword ("" for an empty text)."""
        return self.statements[0].keyword if self.statements else ""

    @property
    def node(self) -> str:
        return self.statements[0].node if self.statements else ""

    def refusal(self, context: str) -> Refusal | None:
        return self.refusals[context]

    @functools.cached_property
    def pipelinable(self) -> bool:
        """May run on the one-round-trip path: one statement that can neither end the implicit
        transaction (CALL and DO may COMMIT outside a transaction block) nor take a session
        advisory lock (released at the end of an explicit request, not at the next one)."""
        if len(self.statements) != 1:
            return False
        s = self.statements[0]
        return (
            s.node not in ("CallStmt", "DoStmt", "")
            and not (s.functions & SESSION_LOCKS)
            and s.extension is None
        )


SESSION_LOCKS = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
    }
)
LARGE_OBJECT_FUNCTIONS = frozenset(
    {
        "lo_open",
        "lo_close",
        "loread",
        "lowrite",
        "lo_lseek",
        "lo_lseek64",
        "lo_creat",
        "lo_create",
        "lo_tell",
        "lo_tell64",
        "lo_truncate",
        "lo_truncate64",
        "lo_unlink",
        "lo_import",
        "lo_export",
        "lo_from_bytea",
        "lo_get",
        "lo_put",
    }
)


def _walk(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (node type, fields) pair in a pglast JSON parse tree, depth first."""
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for key, value in cur.items():
                if isinstance(value, dict) and key[:1].isupper():
                    yield key, value
                if isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(cur, list):
            stack.extend(cur)


def _const(node: Any) -> tuple[bool, str | None]:
    """(is a literal, its text) of an argument node: A_Const (or a cast of one)."""
    if not isinstance(node, dict):
        return False, None
    if "TypeCast" in node:
        return _const(node["TypeCast"].get("arg"))
    c = node.get("A_Const")
    if c is None:
        return False, None
    if c.get("isnull"):
        return True, None
    if "sval" in c:
        return True, str(c["sval"].get("sval", ""))
    if "ival" in c:
        return True, str(c["ival"].get("ival", 0))  # protobuf leaves out a zero
    if "fval" in c:
        return True, str(c["fval"].get("fval", "0"))
    if "boolval" in c:
        return True, "true" if c["boolval"].get("boolval") else "false"
    if "bsval" in c:
        return True, str(c["bsval"].get("bsval", ""))
    return False, None


def _variable_set(v: dict[str, Any], via_clause: bool) -> Setting:
    kind = v.get("kind", "VAR_SET_VALUE")
    name = v.get("name")
    local = bool(v.get("is_local")) or via_clause
    via = "SET clause" if via_clause else "SET"
    if kind == "VAR_RESET_ALL":
        return Setting(None, None, local, "RESET", resets=True)
    lname = name.lower() if isinstance(name, str) else None
    if kind in ("VAR_RESET", "VAR_SET_DEFAULT", "VAR_SET_CURRENT"):
        return Setting(
            lname,
            None,
            local,
            "RESET" if kind == "VAR_RESET" else via,
            resets=True,
            from_current=kind == "VAR_SET_CURRENT",
        )
    if kind == "VAR_SET_MULTI":
        # SET TRANSACTION ..., SET SESSION CHARACTERISTICS ..., SET TRANSACTION SNAPSHOT
        return Setting(lname, None, local or (lname or "").startswith("transaction"), via)
    args = v.get("args") or []
    value: str | None = None
    if len(args) == 1:
        _, value = _const(args[0])
    elif args:
        parts = [_const(a)[1] for a in args]
        value = None if any(p is None for p in parts) else ", ".join(str(p) for p in parts)
    return Setting(lname, value, local, via)


def _func_name(call: dict[str, Any]) -> str:
    names = call.get("funcname") or []
    last = names[-1] if names else {}
    return str(last.get("String", {}).get("sval", "")).lower()


MAX_BODY_DEPTH = 4  # SQL function bodies that create SQL functions, and so on


def _sql_body(fields: dict[str, Any]) -> str | None:
    """The body of CREATE FUNCTION/PROCEDURE ... LANGUAGE sql AS '...' (None for other languages
    and for BEGIN ATOMIC bodies, which are part of the parse tree already)."""
    language, body = "sql", None
    for option in fields.get("options") or []:
        d = option.get("DefElem", {})
        if d.get("defname") == "language":
            language = str(d.get("arg", {}).get("String", {}).get("sval", "")).lower()
        elif d.get("defname") == "as":
            items = d.get("arg", {}).get("List", {}).get("items") or []
            if items:
                body = str(items[0].get("String", {}).get("sval", ""))
    return body if language == "sql" else None


def _facts(stmt: dict[str, Any], keyword: str, depth: int = 0) -> Statement:
    (node, body), *_ = stmt.items()
    detail = ""
    if node == "TransactionStmt":
        detail = body.get("kind", "")
    elif node == "VariableSetStmt":
        detail = body.get("kind", "VAR_SET_VALUE")
    settings: list[Setting] = []
    functions: set[str] = set()
    large = False
    pg_settings_write = False
    targets: set[str] = set()
    inner: list[Statement] = []
    kinds: set[str] = set()
    for kind, fields in _walk(stmt):
        kinds.add(kind)
        if kind == "CreateFunctionStmt":
            body_text = _sql_body(fields)
            if body_text is not None:
                if depth >= MAX_BODY_DEPTH:
                    inner.append(
                        Statement(node="", keyword="", detail="SQL function bodies nested too deeply")
                    )
                else:
                    inner.extend(parse(body_text, depth + 1))
        if kind == "FuncCall":
            name = _func_name(fields)
            functions.add(name)
            if name == "set_config":
                args = fields.get("args") or []
                named, setting = _const(args[0]) if args else (False, None)
                _, value = _const(args[1]) if len(args) > 1 else (False, None)
                local_arg = _const(args[2])[1] if len(args) > 2 else None
                settings.append(
                    Setting(
                        setting.lower() if named and setting is not None else None,
                        value,
                        local_arg == "true",
                        "set_config",
                    )
                )
            if name in LARGE_OBJECT_FUNCTIONS:
                large = True
        elif kind == "VariableSetStmt":
            # A function's or procedure's SET clause (CREATE/ALTER FUNCTION ... SET x = v),
            # and ALTER ROLE/DATABASE ... SET: applied whenever the function or role runs.
            settings.append(_variable_set(fields, via_clause=fields is not body))
        elif kind == "UpdateStmt":
            rel = fields.get("relation", {})
            if str(rel.get("relname", "")).lower() == "pg_settings":
                pg_settings_write = True
        for attr in ("objtype", "objectType", "renameType", "relationType"):
            target = fields.get(attr)
            if isinstance(target, str):
                targets.add(target)
    return Statement(
        node=node,
        keyword=keyword,
        detail=detail,
        settings=tuple(settings),
        functions=frozenset(functions),
        large_objects=large or "OBJECT_LARGEOBJECT" in targets,
        targets=frozenset(targets),
        pg_settings_write=pg_settings_write,
        inner=tuple(inner),
        kinds=frozenset(kinds),
        extension=_extension_op(node, body),
    )


def _keywords(text: str, starts: list[int]) -> list[str]:
    """The first keyword (or identifier) at or after each statement start, from PG's scanner."""
    out = ["" for _ in starts]
    tokens = [t for t in pg.scan(text) if t.name not in ("SQL_COMMENT", "C_COMMENT")]
    i = 0
    for n, start in enumerate(starts):
        while i < len(tokens) and tokens[i].start < start:
            i += 1
        j = i
        while j < len(tokens) and tokens[j].name in ("ASCII_40", "ASCII_59"):  # "(" and ";"
            j += 1
        if j < len(tokens):
            out[n] = tokens[j].name  # a keyword token is named by its keyword: SELECT, WITH, ...
    return out


def parse(text: str, depth: int = 0) -> tuple[Statement, ...]:
    """The statements of `text` with their facts (a one-element "" node on a parse error)."""
    try:
        tree = _decode(pg.parse_sql_json(text))
    except pg.ParseError as exc:
        return (Statement(node="", keyword="", detail=str(exc.args[0]) if exc.args else "syntax error"),)
    except RecursionError:  # msgspec's limit on nesting, far below PostgreSQL's own stack limit
        return (Statement(node="", keyword="", detail="the statement is nested too deeply"),)
    raw = tree.get("stmts") or []
    starts = [int(r.get("stmt_location", 0)) for r in raw]
    if not text.isascii():  # the parser counts UTF-8 bytes, the scanner characters
        data = text.encode()
        starts = [len(data[:b].decode(errors="ignore")) for b in starts]
    keywords = _keywords(text, starts) if raw else []
    return tuple(_facts(r["stmt"], kw, depth) for r, kw in zip(raw, keywords, strict=True) if r.get("stmt"))


# -- the refusal table --------------------------------------------------------------------------

ONE_TRANSACTION = {
    REQUEST: "each request runs as exactly one transaction. "
    "Use /api/execute-batch to run several statements atomically.",
    BATCH: "the batch runs as exactly one transaction.",
    SCRIPT: "the whole script runs as one transaction.",
}


@dataclass(frozen=True)
class Rule:
    """One row of the refusal table: `check` returns the message's detail when it refuses."""

    what: str
    why: str
    sqlstate: str
    message: str  # formatted with {keyword}, {detail} and {context}
    check: Callable[[Statement, Caps], str | None]
    contexts: tuple[str, ...] = CONTEXTS


# How messages name a statement whose first keyword alone says too little.
LABELS = {
    "CreateRoleStmt": "CREATE ROLE",
    "AlterRoleStmt": "ALTER ROLE",
    "AlterRoleSetStmt": "ALTER ROLE ... SET",
    "DropRoleStmt": "DROP ROLE",
    "GrantRoleStmt": "GRANT/REVOKE of a role",
    "ReassignOwnedStmt": "REASSIGN OWNED",
    "CreatedbStmt": "CREATE DATABASE",
    "AlterDatabaseStmt": "ALTER DATABASE",
    "AlterDatabaseSetStmt": "ALTER DATABASE ... SET",
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE ... REFRESH COLLATION VERSION",
    "DropdbStmt": "DROP DATABASE",
    "AlterSystemStmt": "ALTER SYSTEM",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE",
}


def _node_in(*nodes: str, naming: str = "") -> Callable[[Statement, Caps], str | None]:
    """Statements of these kinds, and RENAME / OWNER TO / COMMENT ON of a `naming` object."""
    wanted = frozenset(nodes)

    def check(s: Statement, _caps: Caps) -> str | None:
        if s.node in wanted:
            return LABELS.get(s.node, s.keyword)
        hidden = wanted & s.kinds  # EXPLAIN EXECUTE, CREATE TABLE ... AS EXECUTE
        if hidden:
            return LABELS.get(min(hidden), min(hidden))
        if naming and naming in s.targets and s.node in ("RenameStmt", "AlterOwnerStmt", "CommentStmt"):
            return f"{s.keyword} of a {naming.removeprefix('OBJECT_').lower()}"
        return None

    return check


def _setting_named(test: Callable[[str], bool]) -> Callable[[Statement, Caps], str | None]:
    def check(s: Statement, _caps: Caps) -> str | None:
        for st in s.settings:
            if st.name is not None and test(st.name):
                return st.name
        return None

    return check


def _identity(name: str) -> bool:
    return name == "fluxbase" or name.startswith("fluxbase.")


# Settings that change how PostgreSQL reads SQL text. The classifier parses as the server does
# with these values (standard_conforming_strings on, UTF-8): once a request turned one of them,
# the server would read a later statement of the batch (or a SQL function body) differently from
# the classifier — `'a\\', '` is one string to one and an escaped quote to the other. Setting
# them to the values the classifier assumes (pg_dump's header does) changes nothing.
_LEXICAL: dict[str, frozenset[str]] = {
    "standard_conforming_strings": frozenset({"on", "true", "yes", "1"}),
    "client_encoding": frozenset({"utf8", "utf-8", "unicode"}),
    "backslash_quote": frozenset({"safe_encoding", "off", "false", "no", "0"}),
}


def _lexical(s: Statement, _caps: Caps) -> str | None:
    for st in s.settings:
        if st.name in _LEXICAL and (st.value is None or st.value.strip().lower() not in _LEXICAL[st.name]):
            return st.name
    return None


def _role_switch(s: Statement, _caps: Caps) -> str | None:
    for st in s.settings:
        if st.name in ("role", "session_authorization"):
            what = "ROLE" if st.name == "role" else "SESSION AUTHORIZATION"
            return f"{st.via} {what}" if st.via != "set_config" else f"set_config('{st.name}', ...)"
    return None


def _reset_all(s: Statement, _caps: Caps) -> str | None:
    return "RESET ALL" if any(st.name is None and st.via == "RESET" for st in s.settings) else None


def _computed_name(s: Statement, _caps: Caps) -> str | None:
    if s.pg_settings_write:
        return "UPDATE pg_settings"
    for st in s.settings:
        if st.name is None and st.via == "set_config":
            return "set_config with a computed setting name"
    return None


def _above_cap(s: Statement, caps: Caps) -> str | None:
    for st in s.settings:
        if st.name is None or st.resets:
            continue
        why = over_cap(st.name, st.value, caps)
        if why is not None:
            return why
    return None


def _routine_setting(s: Statement, _caps: Caps) -> str | None:
    for st in s.settings:
        if st.via == "SET clause" and st.name in ROUTINE_REFUSED and (not st.resets or st.from_current):
            return st.name
    return None


def _session_set(s: Statement, _caps: Caps) -> str | None:
    if s.node != "VariableSetStmt":
        return None
    st = s.settings[0]
    if st.local or st.via == "RESET":
        return None
    return "SET SESSION CHARACTERISTICS" if st.name == "session characteristics" else f"SET {st.name}"


def _extension(s: Statement, _caps: Caps) -> str | None:
    op = s.extension
    if op is None:
        if s.node in ("AlterExtensionStmt", "AlterExtensionContentsStmt"):
            return "ALTER EXTENSION is not allowed"
        if "OBJECT_EXTENSION" in s.targets:
            return f"{s.keyword} of an extension is not allowed"
        return None
    unknown = [n for n in op.names if n not in EXTENSION_NAMES]
    if unknown:
        return f'extension "{unknown[0]}" is not allowed'
    if op.version is not None:
        return f"{op.tag} ... VERSION is not allowed (the instance installs one version)"
    return None


RULES: tuple[Rule, ...] = (
    Rule(
        "unparsable",
        "PostgreSQL's grammar does not accept it; a text we cannot classify never runs",
        "42601",
        "{detail}",
        lambda s, _c: s.detail if s.node == "" else None,
    ),
    Rule(
        "transaction control",
        "ending or splitting the request's transaction would drop its identity, read-only mode "
        "and size check, and commit half of a batch",
        "0A000",
        "{keyword} is not allowed (transaction control): {context}",
        _node_in("TransactionStmt"),
    ),
    Rule(
        "prepared statements",
        "session prepared statements outlive the request and are visible to the next one",
        "0A000",
        "{detail} is not allowed (session prepared statements): {context}",
        _node_in("PrepareStmt", "ExecuteStmt", "DeallocateStmt"),
    ),
    Rule(
        "session state",
        "DISCARD, LISTEN and UNLISTEN act on a pooled session, which is not the request's",
        "0A000",
        "{keyword} is not allowed (session state): {context}",
        _node_in("DiscardStmt", "ListenStmt", "UnlistenStmt"),
    ),
    Rule(
        "COPY",
        "COPY streams have no place in a JSON request, and COPY FROM/TO files or programs is the server's",
        "0A000",
        "COPY is not allowed (COPY streams): {context}",
        _node_in("CopyStmt"),
    ),
    Rule(
        "LOAD",
        "loading a shared library into a backend is the server operator's",
        "0A000",
        "LOAD is not allowed (loading libraries).",
        _node_in("LoadStmt"),
    ),
    Rule(
        "roles",
        "a project's roles are Fluxbase's: a changed password or setting breaks every new "
        "connection of the project and scope",
        "42501",
        "{detail} is not allowed: a project's roles are managed by Fluxbase.",
        _node_in(
            "CreateRoleStmt",
            "AlterRoleStmt",
            "AlterRoleSetStmt",
            "DropRoleStmt",
            "GrantRoleStmt",
            "ReassignOwnedStmt",
            naming="OBJECT_ROLE",
        ),
    ),
    Rule(
        "database and system",
        "the database and the server are shared by every project",
        "42501",
        "{detail} is not allowed: the database and server settings are shared by every project.",
        _node_in(
            "CreatedbStmt",
            "AlterDatabaseStmt",
            "AlterDatabaseSetStmt",
            "AlterDatabaseRefreshCollStmt",
            "DropdbStmt",
            "AlterSystemStmt",
            naming="OBJECT_DATABASE",
        ),
    ),
    Rule(
        "role switch",
        "SET ROLE / SET SESSION AUTHORIZATION / RESET ROLE change who the statement runs as",
        "42501",
        "{detail} is not allowed: a request runs as its project's role and cannot switch.",
        _role_switch,
    ),
    Rule(
        "request identity",
        "fluxbase.* is the request identity (auth.uid(), auth.jwt(), auth.role()); only "
        "Fluxbase sets it, at the start of each request's transaction",
        "42501",
        "changing {detail} is not allowed: it is the request identity, which Fluxbase sets.",
        _setting_named(_identity),
    ),
    Rule(
        "how SQL text is read",
        "standard_conforming_strings, backslash_quote and client_encoding change how the server "
        "reads string literals: statements would then mean something else to the server than to "
        "the classifier that checked them (their default values stay allowed)",
        "42501",
        "changing {detail} is not allowed: it changes how SQL text is read.",
        _lexical,
    ),
    Rule(
        "RESET ALL",
        "RESET ALL drops the request identity with every other setting",
        "42501",
        "RESET ALL is not allowed: it would drop the request identity; reset settings by name.",
        _reset_all,
    ),
    Rule(
        "computed setting name",
        "a setting whose name is computed (set_config with an expression, UPDATE pg_settings) "
        "cannot be checked against the rules above",
        "42501",
        "{detail} is not allowed: change a setting by naming it literally (SET, set_config('name', ...)).",
        _computed_name,
    ),
    Rule(
        "resource caps",
        "work_mem, maintenance_work_mem, temp_file_limit, temp_buffers, hash_mem_multiplier, "
        "parallel workers and the timeouts are per-role caps: above them one request takes more "
        "than its share of a shared server",
        "42501",
        "{detail}.",
        _above_cap,
    ),
    Rule(
        "resource setting in a routine",
        "a function's or procedure's SET clause applies at every call, and FROM CURRENT takes "
        "whatever the creating session has (a plpgsql EXECUTE may have raised it unseen); per-role "
        "caps then no longer bound the calls (sql/0022 refuses the same DDL built dynamically)",
        "42501",
        "a SET clause of {detail} in a function or procedure is not allowed: resource settings are "
        "per-role caps; set them in the request with SET LOCAL.",
        _routine_setting,
    ),
    Rule(
        "extensions",
        "an extension is installed once per database by the platform (db/extensions.py); a "
        "project may turn on only those of the allow-list, and change none of them",
        "42501",
        "{detail}: Fluxbase offers only the extensions of its allow-list ("
        + ", ".join(o.name for o in EXTENSION_CATALOG)
        + "; GET /api/projects/<id>/extensions lists those this instance has).",
        _extension,
    ),
    Rule(
        "large objects",
        "large objects live in pg_largeobject, outside the project's schema and its size quota",
        "42501",
        "large objects are not allowed: they live outside the project's schema and quota "
        "(use bytea columns or storage).",
        lambda s, _c: "large objects" if s.large_objects else None,
    ),
    Rule(
        "session SET in a batch",
        "in a batch a session-level SET outlives the statement that made it; SET LOCAL ends with "
        "the batch's transaction",
        "42501",
        "session-level {detail} is not allowed in a batch; use SET LOCAL.",
        _session_set,
        (BATCH,),
    ),
    Rule(
        "VACUUM in a script",
        "a script runs in one transaction and VACUUM cannot",
        "25001",
        "VACUUM cannot run in a transaction; use the vacuum endpoint.",
        lambda s, _c: "VACUUM" if s.node == "VacuumStmt" and s.keyword == "VACUUM" else None,
        (SCRIPT,),
    ),
)

# A request (execute-sql) is one statement; a batch lists one per entry.
_SEVERAL = Rule(
    "several statements",
    "one query is one statement (the extended protocol runs only one); a batch runs several",
    "42601",
    "one statement per query is allowed ({detail} given): use /api/execute-batch to run several.",
    lambda s, _c: None,
    (REQUEST, BATCH),
)


def _refusal(statements: tuple[Statement, ...], context: str, caps: Caps) -> Refusal | None:
    if context in _SEVERAL.contexts and len(statements) > 1:
        return Refusal(_SEVERAL.what, _SEVERAL.message.format(detail=len(statements)), _SEVERAL.sqlstate)
    for index, s in enumerate(statements):
        found = _first_rule(s, context, caps)
        if found is not None:
            rule, message = found
            return Refusal(rule.what, message, rule.sqlstate, index)
    return None


def _first_rule(s: Statement, context: str, caps: Caps) -> tuple[Rule, str] | None:
    """The first row that refuses `s`, or one of the statements of a SQL function body it
    creates (each as if it ran where the function is called)."""
    for rule in RULES:
        if context not in rule.contexts:
            continue
        detail = rule.check(s, caps)
        if detail is not None:
            return rule, rule.message.format(
                keyword=s.keyword or s.node, detail=detail, context=ONE_TRANSACTION[context]
            )
    for inner in s.inner:
        # A function body is not a batch: its session-level SET is judged like a request's.
        found = _first_rule(inner, SCRIPT if context == BATCH else context, caps)
        if found is not None:
            return found[0], "in the body of a SQL function: " + found[1]
    return None


class Classifier:
    """Classifies tenant statement texts for one set of caps, each distinct text parsed once."""

    def __init__(self, caps: Caps | None = None, cache_size: int = CACHE_SIZE) -> None:
        self.caps = caps or Caps()
        self._cached = functools.lru_cache(maxsize=cache_size)(self._classify)

    def classify(self, text: str) -> Verdict:
        """The text's statements and refusals (cached by text)."""
        if len(text) > CACHE_MAX_CHARS:
            return self._classify(text)
        return self._cached(text)

    def _classify(self, text: str) -> Verdict:
        statements = parse(text)
        return Verdict(statements, {c: _refusal(statements, c, self.caps) for c in CONTEXTS})

    def cache_info(self) -> Any:
        return self._cached.cache_info()


@functools.cache
def default() -> Classifier:
    """A classifier with the default caps (scripts, which carry no settings)."""
    return Classifier()


def as_run(text: str) -> str:
    """The text to send for one statement of a script (migrations, imports): itself, or for
    CREATE/DROP EXTENSION the platform's call that does it (sql/0023)."""
    statements = default().classify(text).statements
    ext = statements[0].extension if len(statements) == 1 else None
    return text if ext is None else ext.call()


def split(script: str) -> list[str]:
    """The statements of a script as their own texts (PostgreSQL's grammar finds the ends:
    `BEGIN ATOMIC ... END` bodies, dollar quotes, comments ending at \\r); ValueError if it does
    not parse."""
    try:
        slices = pg.split(script, with_parser=True, only_slices=True)
    except pg.ParseError as exc:
        raise ValueError(str(exc.args[0]) if exc.args else "syntax error") from None
    return [script[s] for s in slices]


def tree(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The parse tree of each statement of `text`: (node type, its fields); ValueError if it does
    not parse. For callers that need more than `Statement`'s facts (the import's vetting)."""
    try:
        parsed = _decode(pg.parse_sql_json(text))
    except pg.ParseError as exc:
        raise ValueError(str(exc.args[0]) if exc.args else "syntax error") from None
    except RecursionError:
        raise ValueError("the statement is nested too deeply") from None
    out = []
    for raw in parsed.get("stmts") or []:
        stmt = raw.get("stmt") or {}
        for node, fields in stmt.items():
            out.append((node, fields))
    return out


def strings(node: Any) -> Iterator[str]:
    """Every name and string constant in a parse tree (identifiers, literals, function bodies)."""
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for value in cur.values():
                if isinstance(value, str):
                    yield value
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(cur, list):
            stack.extend(cur)


def blank(text: str) -> bool:
    """Whether `text` holds nothing but whitespace and comments, as PostgreSQL's scanner reads it
    (False for a text it cannot scan, such as an unterminated string)."""
    try:
        return all(t.name in ("SQL_COMMENT", "C_COMMENT") for t in pg.scan(text))
    except pg.ParseError:
        return False
