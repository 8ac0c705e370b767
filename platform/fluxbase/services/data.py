"""Schema listing, table creation and records REST, built on the tenant transaction path.

Everything here runs inside `tenancy.session.transaction` on the project's own role, so RLS, scopes,
limits and the capture triggers apply exactly as for `/api/execute-sql`. Table and column
names from a request are looked up in the catalog first (as bind parameters); only names the
catalog returned are ever interpolated into SQL, and always through `quote_ident`. Values are
always bind parameters.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec

from fluxbase.db.quoting import quote_ident, quote_literal
from fluxbase.errors import NotFound, SqlConflict, StatementFailed, ValidationError
from fluxbase.security.roles import schema_name
from fluxbase.tenancy.errors import rest_error
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.results import encode
from fluxbase.tenancy.session import TenantRequest, Tx, transaction

# Tables whose names start with this prefix are the platform's own (e.g. a migration ledger
# kept in the project schema); they are hidden from the schema listing and the records API.
INTERNAL_PREFIX = "_fluxbase"

DEFAULT_LIMIT = 50
MAX_LIMIT = 1_000
MAX_OFFSET = 10_000_000
MAX_IN_VALUES = 1_000
MAX_FILTER_DEPTH = 8
MAX_FILTER_TERMS = 200
MAX_BULK_ROWS = 1_000
MAX_BIND_PARAMS = 32_767
MAX_COLUMNS = 250
_NAME_SHOWN = 80


def _shown(name: str) -> str:
    """A request-supplied name for an error message (JSON-escaped by the encoder; bounded)."""
    return name if len(name) <= _NAME_SHOWN else name[:_NAME_SHOWN] + "…"


# -- catalog ------------------------------------------------------------------------------------

# Defaults, constraints and index definitions are catalog content closed to tenant roles
# (sql/0021): the fluxbase_guard.own_* functions deparse them for the caller's own project only.

# Tables and their columns in one round trip (LEFT JOIN: a table may have no columns).
_TABLES_SQL = """
SELECT c.oid, c.relname, c.relrowsecurity, c.relforcerowsecurity,
       a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type, t.typname,
       NOT a.attnotnull AS nullable, fluxbase_guard.own_column_default(d.adrelid, d.adnum) AS expr,
       a.attidentity::text AS attidentity, a.attgenerated::text AS attgenerated,
       COALESCE(a.attnum = ANY(pk.conkey), false) AS primary_key
FROM pg_catalog.pg_class c
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_catalog.pg_constraint pk ON pk.conrelid = c.oid AND pk.contype = 'p'
WHERE c.relnamespace = pg_catalog.to_regnamespace($1)::oid AND c.relkind IN ('r', 'p')
  AND (c.relname = $2 OR $2 IS NULL)
  AND left(c.relname, length($3)) <> $3
ORDER BY c.relname, a.attnum
"""

_CONSTRAINTS_SQL = """
SELECT conrelid, conname, contype, fluxbase_guard.own_constraint_def(oid) AS def, conkey
FROM pg_catalog.pg_constraint
WHERE conrelid = ANY($1::oid[]) AND contype IN ('p', 'u', 'f', 'c', 'x')
ORDER BY conrelid, CASE contype WHEN 'p' THEN 0 WHEN 'u' THEN 1 WHEN 'f' THEN 2 ELSE 3 END, conname
"""

_INDEXES_SQL = """
SELECT i.indrelid, c.relname, fluxbase_guard.own_index_def(i.indexrelid) AS def,
       i.indisunique, i.indisprimary
FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = ANY($1::oid[])
ORDER BY i.indrelid, c.relname
"""


@dataclass
class Column:
    name: str
    type: str
    typname: str
    nullable: bool
    default: str | None
    identity: str
    generated: str
    primary_key: bool

    def out(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "nullable": self.nullable,
            "default": self.default,
            "primaryKey": self.primary_key,
            "identity": {"a": "always", "d": "by default"}.get(self.identity),
            "generated": self.generated in ("s", "v"),
        }

    def ddl(self) -> str:
        parts = [quote_ident(self.name), self.type]
        if self.identity:
            parts.append(f"GENERATED {'ALWAYS' if self.identity == 'a' else 'BY DEFAULT'} AS IDENTITY")
        elif self.generated and self.default is not None:
            kind = "STORED" if self.generated == "s" else "VIRTUAL"
            parts.append(f"GENERATED ALWAYS AS ({self.default}) {kind}")
        elif self.default is not None:
            parts.append(f"DEFAULT {self.default}")
        if not self.nullable:
            parts.append("NOT NULL")
        return " ".join(parts)


@dataclass
class Table:
    oid: int
    name: str
    rls_enabled: bool
    rls_forced: bool
    columns: list[Column] = field(default_factory=list)
    constraints: list[tuple[str, str]] = field(default_factory=list)
    indexes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def by_name(self) -> dict[str, Column]:
        return {c.name: c for c in self.columns}

    @property
    def primary_key(self) -> list[str]:
        return [c.name for c in self.columns if c.primary_key]

    def create_statement(self) -> str:
        lines = [c.ddl() for c in self.columns]
        lines += [f"CONSTRAINT {quote_ident(name)} {definition}" for name, definition in self.constraints]
        return f"CREATE TABLE {quote_ident(self.name)} (\n  " + ",\n  ".join(lines) + "\n);"

    def out(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "columns": [c.out() for c in self.columns],
            "primaryKey": self.primary_key,
            "indexes": self.indexes,
            "rls": {"enabled": self.rls_enabled, "forced": self.rls_forced},
            "sql": self.create_statement(),
        }


async def describe(tx: Tx, project_id: str, only: str | None = None, *, details: bool = True) -> list[Table]:
    """The project's tables (or just `only`) from the catalog, internal tables hidden."""
    schema = schema_name(project_id)
    tables: dict[int, Table] = {}
    for r in await tx.fetch(_TABLES_SQL, schema, only, INTERNAL_PREFIX):
        table = tables.get(r["oid"])
        if table is None:
            table = tables[r["oid"]] = Table(
                r["oid"], r["relname"], r["relrowsecurity"], r["relforcerowsecurity"]
            )
        if r["attname"] is not None:
            table.columns.append(
                Column(
                    r["attname"],
                    r["type"],
                    r["typname"],
                    r["nullable"],
                    r["expr"],
                    r["attidentity"],
                    r["attgenerated"],
                    r["primary_key"],
                )
            )
    if not tables:
        return []
    oids = list(tables)
    if details:
        for r in await tx.fetch(_CONSTRAINTS_SQL, oids):
            tables[r["conrelid"]].constraints.append((r["conname"], r["def"]))
        for r in await tx.fetch(_INDEXES_SQL, oids):
            tables[r["indrelid"]].indexes.append(
                {
                    "name": r["relname"],
                    "unique": r["indisunique"],
                    "primary": r["indisprimary"],
                    "sql": r["def"],
                }
            )
    return list(tables.values())


async def table_of(tx: Tx, project_id: str, name: str) -> Table:
    """One table by exact name, or VALIDATION_ERROR naming it."""
    if not name or len(name) > 200 or "\x00" in name:
        raise ValidationError("unknown table: the name is empty or not valid.", extra={"table": _shown(name)})
    found = await describe(tx, project_id, name, details=False)
    if not found:
        raise ValidationError(f"unknown table: {_shown(name)}", extra={"table": _shown(name)})
    return found[0]


def _qualified(project_id: str, table: str) -> str:
    return f"{quote_ident(schema_name(project_id))}.{quote_ident(table)}"


def _require_columns(table: Table, names: list[str], what: str) -> None:
    cols = table.by_name
    unknown = [n for n in names if n not in cols]
    if unknown:
        shown = [_shown(n) for n in unknown[:10]]
        raise ValidationError(
            f"unknown column(s) in {what} of table {_shown(table.name)}: " + ", ".join(shown),
            extra={"columns": shown},
        )


# -- table creation -----------------------------------------------------------------------------

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Allowed column types: request spelling -> (canonical SQL, modifier kind).
# Modifier kinds: None (no modifier), "len" (n), "prec" (p), "num" (p[, s]).
TYPES: dict[str, tuple[str, str | None]] = {
    "text": ("text", None),
    "varchar": ("varchar", "len"),
    "character varying": ("varchar", "len"),
    "char": ("char", "len"),
    "smallint": ("smallint", None),
    "int2": ("smallint", None),
    "integer": ("integer", None),
    "int": ("integer", None),
    "int4": ("integer", None),
    "bigint": ("bigint", None),
    "int8": ("bigint", None),
    "numeric": ("numeric", "num"),
    "decimal": ("numeric", "num"),
    "real": ("real", None),
    "float4": ("real", None),
    "double precision": ("double precision", None),
    "float8": ("double precision", None),
    "boolean": ("boolean", None),
    "bool": ("boolean", None),
    "timestamptz": ("timestamptz", "prec"),
    "timestamp": ("timestamp", "prec"),
    "date": ("date", None),
    "time": ("time", "prec"),
    "interval": ("interval", None),
    "uuid": ("uuid", None),
    "json": ("json", None),
    "jsonb": ("jsonb", None),
    "bytea": ("bytea", None),
    "inet": ("inet", None),
    "cidr": ("cidr", None),
}
_TYPE_RE = re.compile(r"^([a-z][a-z0-9 ]*?)\s*(?:\(\s*(\d{1,4})\s*(?:,\s*(\d{1,4})\s*)?\))?\s*(\[\])?$")
_INTEGER_TYPES = {"smallint", "integer", "bigint"}
_TIME_TYPES = {"timestamptz", "timestamp", "date", "time"}
# Function defaults allowed by exact spelling, per the column types they fit.
DEFAULT_FUNCTIONS = {
    "now()": ("now()", _TIME_TYPES),
    "current_timestamp": ("CURRENT_TIMESTAMP", _TIME_TYPES),
    "current_date": ("CURRENT_DATE", {"date", "timestamptz", "timestamp"}),
    "gen_random_uuid()": ("gen_random_uuid()", {"uuid"}),
}
ON_ACTIONS = {
    "cascade": "CASCADE",
    "restrict": "RESTRICT",
    "set null": "SET NULL",
    "set default": "SET DEFAULT",
    "no action": "NO ACTION",
}


class ReferenceDef(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    table: str
    column: str | None = None
    on_delete: str | None = None
    on_update: str | None = None


class ColumnDef(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    name: str
    type: str
    primary_key: bool = False
    auto_increment: bool = False
    nullable: bool = True
    default: Any = msgspec.UNSET
    unique: bool = False
    references: ReferenceDef | None = None


class TableDef(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    name: str
    columns: list[ColumnDef]
    if_not_exists: bool = False


def _check_new_name(name: str, what: str) -> None:
    if not _IDENT.match(name):
        raise ValidationError(
            f"{what} {_shown(name)!r} is not valid: use letters, digits and '_', "
            "starting with a letter or '_', at most 63 characters."
        )
    if name.lower().startswith(INTERNAL_PREFIX):
        raise ValidationError(f"{what} names starting with {INTERNAL_PREFIX!r} are reserved.")


def sql_type(spec: str) -> str:
    """The canonical SQL for an allowed column type (rebuilt, never echoed), or VALIDATION_ERROR."""
    m = _TYPE_RE.match(" ".join(spec.lower().split()))
    base = TYPES.get(m.group(1)) if m else None
    if m is None or base is None:
        raise ValidationError(
            f"type {_shown(spec)!r} is not allowed; allowed types: " + ", ".join(sorted(TYPES)) + "."
        )
    canonical, kind = base
    a, b, array = m.group(2), m.group(3), m.group(4)
    if a is not None:
        if kind is None or (b is not None and kind != "num"):
            raise ValidationError(f"type {_shown(spec)!r} does not take that modifier.")
        if (kind == "prec" and int(a) > 6) or (kind in ("len", "num") and not 1 <= int(a) <= 1000):
            raise ValidationError(f"type {_shown(spec)!r} has an out-of-range modifier.")
        mod = f"({int(a)}, {int(b)})" if b is not None else f"({int(a)})"
        if canonical in ("timestamptz", "timestamp", "time"):
            canonical = (
                {"timestamptz": "timestamp", "timestamp": "timestamp", "time": "time"}[canonical]
                + mod
                + (" with time zone" if base[0] == "timestamptz" else "")
            )
        else:
            canonical += mod
    return canonical + ("[]" if array else "")


def _literal(value: Any, type_sql: str) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        if type_sql not in ("json", "jsonb"):
            raise ValidationError("object and array defaults are only allowed for json/jsonb columns.")
        text = msgspec.json.encode(value).decode()
    if "\x00" in text or len(text) > 10_000:
        raise ValidationError("a default value is too long or contains NUL characters.")
    return f"{quote_literal(text)}::{type_sql}"


def _default_sql(col: ColumnDef, type_sql: str) -> str | None:
    if col.default is msgspec.UNSET:
        return None
    base = type_sql.split("(")[0].split(" with")[0]
    if isinstance(col.default, str):
        fn = DEFAULT_FUNCTIONS.get(col.default.strip().lower())
        if fn is not None and base in fn[1] and not type_sql.endswith("[]"):
            return fn[0]
    return _literal(col.default, type_sql)


def check_table_def(spec: TableDef) -> list[str]:
    """Everything about a table definition that needs no catalog: names, types, defaults, actions.

    Returns each column's SQL without its REFERENCES clause (that needs the catalog).
    Called before a connection is borrowed, and again by `create_table`.
    """
    _check_new_name(spec.name, "table")
    if not spec.columns:
        raise ValidationError("a table needs at least one column.")
    if len(spec.columns) > MAX_COLUMNS:
        raise ValidationError(f"at most {MAX_COLUMNS} columns are allowed.")
    seen: set[str] = set()
    out: list[str] = []
    for col in spec.columns:
        _check_new_name(col.name, "column")
        if col.name in seen:
            raise ValidationError(f"column {col.name!r} is defined twice.")
        seen.add(col.name)
        type_sql = sql_type(col.type)
        parts = [quote_ident(col.name), type_sql]
        if col.auto_increment:
            if type_sql not in _INTEGER_TYPES:
                raise ValidationError(
                    f"column {col.name!r}: autoIncrement needs smallint, integer or bigint."
                )
            if col.default is not msgspec.UNSET:
                raise ValidationError(f"column {col.name!r}: autoIncrement and default cannot be combined.")
            parts.append("GENERATED BY DEFAULT AS IDENTITY")
        default = _default_sql(col, type_sql)
        if default is not None:
            parts.append(f"DEFAULT {default}")
        if not col.nullable or col.primary_key:
            parts.append("NOT NULL")
        if col.unique:
            parts.append("UNIQUE")
        ref = col.references
        if ref is not None:
            for word, action in (("Delete", ref.on_delete), ("Update", ref.on_update)):
                if action is not None and " ".join(action.lower().split()) not in ON_ACTIONS:
                    raise ValidationError(f"on{word} must be one of: " + ", ".join(ON_ACTIONS) + ".")
        out.append(" ".join(parts))
    return out


async def create_table(tx: Tx, project_id: str, spec: TableDef) -> Table:
    """CREATE TABLE from JSON column definitions; returns the table as the catalog sees it."""
    columns_sql = check_table_def(spec)
    existing = {t.name: t for t in await describe(tx, project_id, None, details=False)}
    if spec.name in existing:
        if spec.if_not_exists:
            return (await describe(tx, project_id, spec.name))[0]
        raise SqlConflict(f"table {spec.name!r} already exists.", extra={"details": "ERROR:  42P07"})
    lines: list[str] = []
    for col, sql in zip(spec.columns, columns_sql, strict=True):
        if col.references is not None:
            sql += " " + _references(col, spec, existing, project_id)
        lines.append(sql)
    pk = [c.name for c in spec.columns if c.primary_key]
    if pk:
        lines.append("PRIMARY KEY (" + ", ".join(quote_ident(n) for n in pk) + ")")
    ddl = f"CREATE TABLE {_qualified(project_id, spec.name)} (" + ", ".join(lines) + ")"
    await tx.run(ddl, [], "CREATE")
    return (await describe(tx, project_id, spec.name))[0]


def _references(col: ColumnDef, spec: TableDef, existing: dict[str, Table], project_id: str) -> str:
    ref = col.references
    assert ref is not None
    if ref.table == spec.name:
        target_cols = [c.name for c in spec.columns]
        target_pk = [c.name for c in spec.columns if c.primary_key]
    elif ref.table in existing:
        target_cols = [c.name for c in existing[ref.table].columns]
        target_pk = existing[ref.table].primary_key
    else:
        raise ValidationError(f"column {col.name!r} references unknown table: {_shown(ref.table)}")
    target = ref.column
    if target is None:
        if len(target_pk) != 1:
            raise ValidationError(
                f"column {col.name!r}: name the referenced column (no single-column primary key)."
            )
        target = target_pk[0]
    if target not in target_cols:
        raise ValidationError(f"column {col.name!r} references unknown column: {_shown(target)}")
    out = f"REFERENCES {_qualified(project_id, ref.table)} ({quote_ident(target)})"
    for word, action in (("DELETE", ref.on_delete), ("UPDATE", ref.on_update)):
        if action is not None:  # checked by check_table_def
            out += f" ON {word} {ON_ACTIONS[' '.join(action.lower().split())]}"
    return out


# -- records: query compilation (pure) ----------------------------------------------------------

_COMPARE = {"$eq": "=", "$ne": "<>", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
FILTER_OPERATORS = (*_COMPARE, "$in", "$nin", "$like", "$ilike", "$null")


class _Params:
    def __init__(self, values: list[Any] | None = None) -> None:
        self.values: list[Any] = values if values is not None else []

    def add(self, value: Any) -> str:
        if len(self.values) >= MAX_BIND_PARAMS:
            raise ValidationError("the request needs too many parameters.")
        self.values.append(value)
        return f"${len(self.values)}"


@dataclass
class _FilterState:
    terms: int = 0


def compile_filter(
    table: Table, spec: Any, params: _Params, depth: int = 0, state: _FilterState | None = None
) -> str:
    """A filter object → a parenthesised SQL condition; values become bind parameters."""
    state = state or _FilterState()
    if depth > MAX_FILTER_DEPTH:
        raise ValidationError(f"filter is nested more than {MAX_FILTER_DEPTH} levels deep.")
    if not isinstance(spec, dict):
        raise ValidationError("filter must be a JSON object.")
    parts: list[str] = []
    for key, value in spec.items():
        state.terms += 1
        if state.terms > MAX_FILTER_TERMS:
            raise ValidationError(f"filter has more than {MAX_FILTER_TERMS} terms.")
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise ValidationError(f"{key} takes a non-empty array of filter objects.")
            subs = [compile_filter(table, v, params, depth + 1, state) for v in value]
            parts.append("(" + (" AND " if key == "$and" else " OR ").join(subs) + ")")
        elif key.startswith("$"):
            raise ValidationError(f"unknown filter operator at the top level: {_shown(key)}")
        else:
            _require_columns(table, [key], "filter")
            parts.append(_condition(key, value, params))
    return "(" + " AND ".join(parts) + ")" if parts else "TRUE"


def _condition(column: str, value: Any, params: _Params) -> str:
    col = quote_ident(column)
    if isinstance(value, dict) and value and all(isinstance(k, str) and k.startswith("$") for k in value):
        return "(" + " AND ".join(_operator(col, op, v, params) for op, v in value.items()) + ")"
    if isinstance(value, dict) and any(isinstance(k, str) and k.startswith("$") for k in value):
        raise ValidationError(f"filter on {_shown(column)} mixes operators and plain keys.")
    return _operator(col, "$eq", value, params)


def _operator(col: str, op: str, value: Any, params: _Params) -> str:
    if op in _COMPARE:
        if value is None:
            if op == "$eq":
                return f"{col} IS NULL"
            if op == "$ne":
                return f"{col} IS NOT NULL"
            raise ValidationError(f"{op} needs a non-null value.")
        if op == "$ne":
            return f"{col} IS DISTINCT FROM {params.add(value)}"
        return f"{col} {_COMPARE[op]} {params.add(value)}"
    if op in ("$in", "$nin"):
        if not isinstance(value, list) or len(value) > MAX_IN_VALUES or any(v is None for v in value):
            raise ValidationError(f"{op} takes an array of at most {MAX_IN_VALUES} non-null values.")
        if not value:
            return "FALSE" if op == "$in" else "TRUE"
        items = ", ".join(params.add(v) for v in value)
        return f"{col} IN ({items})" if op == "$in" else f"{col} NOT IN ({items})"
    if op in ("$like", "$ilike"):
        if not isinstance(value, str):
            raise ValidationError(f"{op} takes a string pattern.")
        return f"{col}::text {'LIKE' if op == '$like' else 'ILIKE'} {params.add(value)}"
    if op == "$null":
        if not isinstance(value, bool):
            raise ValidationError("$null takes true or false.")
        return f"{col} IS NULL" if value else f"{col} IS NOT NULL"
    raise ValidationError(
        f"unknown filter operator: {_shown(op)}; use one of " + ", ".join(FILTER_OPERATORS) + ", $and, $or."
    )


def _name_list(raw: str | None, what: str) -> list[str]:
    if raw is None:
        return []
    names = [n.strip() for n in raw.split(",")]
    if any(not n for n in names) or len(names) > MAX_COLUMNS:
        raise ValidationError(f"{what} must be a comma-separated list of column names.")
    return names


def _int_param(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValidationError(f"{name} must be an integer.") from None
    if not lo <= value <= hi:
        raise ValidationError(f"{name} must be between {lo} and {hi}.")
    return value


@dataclass(frozen=True)
class ListQuery:
    """GET …/records parameters, parsed before a connection is borrowed; names checked later."""

    filter: Any
    sort: list[tuple[str, str]]
    limit: int
    offset: int
    fields: list[str]

    @classmethod
    def parse(
        cls,
        filter_: str | None = None,
        sort: str | None = None,
        limit: str | None = None,
        offset: str | None = None,
        fields: str | None = None,
    ) -> ListQuery:
        spec: Any = {}
        if filter_ is not None and filter_.strip():
            try:
                spec = msgspec.json.decode(filter_)
            except msgspec.DecodeError:
                raise ValidationError("filter must be a JSON object (URL-encoded).") from None
            if not isinstance(spec, dict):
                raise ValidationError("filter must be a JSON object.")
        keys = [
            (n[1:], "DESC") if n.startswith("-") else (n.lstrip("+"), "ASC") for n in _name_list(sort, "sort")
        ]
        return cls(
            spec,
            keys,
            _int_param(limit, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
            _int_param(offset, "offset", 0, 0, MAX_OFFSET),
            _name_list(fields, "fields"),
        )


def compile_list(table: Table, project_id: str, q: ListQuery) -> tuple[str, list[Any]]:
    """SELECT for GET …/records. Fetches limit + 1 rows, so the caller can tell hasMore."""
    params = _Params()
    where = compile_filter(table, q.filter, params)
    _require_columns(table, q.fields, "fields")
    select = ", ".join(quote_ident(f) for f in q.fields) if q.fields else "*"
    _require_columns(table, [k for k, _ in q.sort], "sort")
    order = [f"{quote_ident(k)} {d}" for k, d in q.sort]
    order += [quote_ident(k) for k in table.primary_key if k not in {k for k, _ in q.sort}]
    sql = f"SELECT {select} FROM {_qualified(project_id, table.name)} WHERE {where}"
    if order:
        sql += " ORDER BY " + ", ".join(order)
    sql += f" LIMIT {params.add(q.limit + 1)} OFFSET {params.add(q.offset)}"
    return sql, params.values


def check_insert(payload: Any) -> None:
    """Shape checks of a POST …/records body (before a connection is borrowed)."""
    _object_rows(payload)


def check_patch(payload: Any) -> None:
    """Shape check of a PATCH …/records/{pk} body (before a connection is borrowed)."""
    if not isinstance(payload, dict) or not payload:
        raise ValidationError("the body must be a non-empty JSON object of column values.")


def _object_rows(payload: Any) -> tuple[list[dict[str, Any]], bool]:
    single = isinstance(payload, dict)
    rows = [payload] if single else payload
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValidationError("the body must be a JSON object or a non-empty array of objects.")
    if len(rows) > MAX_BULK_ROWS:
        raise ValidationError(f"at most {MAX_BULK_ROWS} records can be inserted at once.")
    return rows, single


def compile_insert(table: Table, project_id: str, payload: Any) -> tuple[str, list[Any], bool]:
    rows, single = _object_rows(payload)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    _require_columns(table, columns, "the record")
    target = _qualified(project_id, table.name)
    if not columns:
        if len(rows) > 1:
            raise ValidationError("bulk inserts need at least one column value.")
        return f"INSERT INTO {target} DEFAULT VALUES RETURNING *", [], single
    params = _Params()
    values = []
    for row in rows:
        values.append("(" + ", ".join(params.add(row[c]) if c in row else "DEFAULT" for c in columns) + ")")
    cols = ", ".join(quote_ident(c) for c in columns)
    return f"INSERT INTO {target} ({cols}) VALUES {', '.join(values)} RETURNING *", params.values, single


def single_key(table: Table) -> str:
    pk = table.primary_key
    if len(pk) != 1:
        why = "no primary key" if not pk else "a composite primary key (" + ", ".join(pk) + ")"
        raise ValidationError(
            f"table {_shown(table.name)} has {why}; records by id need a single-column primary key. "
            "Use GET …/records?filter= instead."
        )
    return pk[0]


def compile_by_key(
    table: Table, project_id: str, op: str, key: str, patch: Any = None
) -> tuple[str, list[Any]]:
    pk = quote_ident(single_key(table))
    target = _qualified(project_id, table.name)
    params = _Params()
    if op == "get":
        return f"SELECT * FROM {target} WHERE {pk} = {params.add(key)}", params.values
    if op == "delete":
        return f"DELETE FROM {target} WHERE {pk} = {params.add(key)} RETURNING *", params.values
    check_patch(patch)
    _require_columns(table, list(patch), "the record")
    sets = ", ".join(f"{quote_ident(c)} = {params.add(v)}" for c, v in patch.items())
    return f"UPDATE {target} SET {sets} WHERE {pk} = {params.add(key)} RETURNING *", params.values


# -- records: the work functions run inside tenancy.session.transaction --------------------------


async def list_records(tx: Tx, project_id: str, table_name: str, q: ListQuery) -> dict[str, Any]:
    table = await table_of(tx, project_id, table_name)
    sql, params = compile_list(table, project_id, q)
    res = await tx.run(sql, params, "SELECT")
    rows = res.rows[: q.limit]
    return {
        "success": True,
        "records": rows,
        "count": len(rows),
        "limit": q.limit,
        "offset": q.offset,
        "hasMore": len(res.rows) > q.limit,
        "truncated": res.truncated and len(res.rows) <= q.limit,
    }


async def insert_records(tx: Tx, project_id: str, table_name: str, payload: Any) -> dict[str, Any]:
    table = await table_of(tx, project_id, table_name)
    sql, params, single = compile_insert(table, project_id, payload)
    res = await tx.run(sql, params, "INSERT")
    out: dict[str, Any] = {"success": True, "records": res.rows, "count": res.count}
    if single and res.rows:
        out["record"] = res.rows[0]
    return out


async def record_by_key(
    tx: Tx, project_id: str, table_name: str, op: str, key: str, patch: Any = None
) -> dict[str, Any]:
    table = await table_of(tx, project_id, table_name)
    sql, params = compile_by_key(table, project_id, op, key, patch)
    res = await tx.run(sql, params, op.upper())
    if not res.rows:
        raise NotFound(
            f"no record with {table.primary_key[0]} = {_shown(key)} in table {_shown(table.name)}."
        )
    return {"success": True, "record": res.rows[0]}


async def schema(tx: Tx, project_id: str) -> dict[str, Any]:
    """GET /api/schema: every table with columns, indexes, RLS state and a CREATE statement."""
    return {"success": True, "tables": [t.out() for t in await describe(tx, project_id)]}


async def run(
    pools: TenantPools,
    control: asyncpg.Pool,
    req: TenantRequest,
    work: Callable[[Tx], Awaitable[dict[str, Any]]],
    *,
    read_only: bool = False,
) -> bytes:
    """Run a data work function in the tenant transaction; SQL failures become REST errors."""
    try:
        body = await transaction(pools, control, req, work, read_only=read_only)
    except StatementFailed as exc:
        raise rest_error(exc) from None
    return encode(body)
