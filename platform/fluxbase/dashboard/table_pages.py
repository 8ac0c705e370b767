"""The table editor: tables with row counts; browse with filter, sort and paging; insert, edit and
delete rows; create a table from a form; columns, indexes and the CREATE statement.

Every read and write is a `services.data` work function in the member's own tenant transaction,
exactly what the REST data endpoints run (same needs: READ to browse, WRITE to insert and edit,
SCHEMA to delete rows and create tables).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response, get, post

from fluxbase.db.quoting import quote_ident
from fluxbase.errors import FluxbaseError, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.security.roles import schema_name
from fluxbase.services import data
from fluxbase.services.access import Need
from fluxbase.tenancy.session import Tx

from .tenant import member_request
from .web import Dash, form, signed_in, unsegment

COUNT_CAP = 10_000  # row counts above this show as "10000+" (an exact count scans the table)
NEW_COLUMN_ROWS = 4
TYPES = (
    "text",
    "integer",
    "bigint",
    "boolean",
    "numeric",
    "timestamptz",
    "date",
    "uuid",
    "jsonb",
)


async def _work(
    dash: Dash, need: Need, work: Callable[[Tx, str], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    assert dash.access is not None
    req = await member_request(dash.ctx, dash.access)
    body = await data.run(
        dash.ctx.tenants, dash.ctx.db, req, lambda tx: work(tx, req.project_id), read_only=need is Need.READ
    )
    result: dict[str, Any] = msgspec.json.decode(body)
    return result


async def _overview(tx: Tx, pid: str) -> dict[str, Any]:
    tables = await data.describe(tx, pid, details=False)
    counts = {}
    for t in tables:
        target = f"{quote_ident(schema_name(pid))}.{quote_ident(t.name)}"
        q = f"SELECT count(*) AS n FROM (SELECT 1 FROM {target} LIMIT {COUNT_CAP + 1}) s"
        res = await tx.run(q, [], "SELECT")
        counts[t.name] = msgspec.json.decode(res.rows[0])["n"]
    return {
        "tables": [
            {"name": t.name, "columns": len(t.columns), "rows": counts[t.name], "rls": t.rls_enabled}
            for t in tables
        ]
    }


async def _list_page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    overview = await _work(dash, Need.READ, _overview)
    extra.setdefault("values", {})
    return dash.render(
        "tables.html",
        status,
        tables=overview["tables"],
        count_cap=COUNT_CAP,
        types=TYPES,
        new_rows=NEW_COLUMN_ROWS,
        **extra,
    )


@get("/p/{project_id:str}/tables")
async def tables_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _list_page(dash)


def _table_def(values: dict[str, str], fields: Any) -> data.TableDef:
    columns = []
    names = fields.getall("col_name", [])
    types = fields.getall("col_type", [])
    defaults = fields.getall("col_default", [])
    for i, name in enumerate(names):
        if not str(name).strip():
            continue
        flags = set(fields.getall(f"col_flags_{i}", []))
        spec: dict[str, Any] = {
            "name": str(name).strip(),
            "type": str(types[i]) if i < len(types) else "text",
            "primaryKey": "pk" in flags,
            "autoIncrement": "auto" in flags,
            "nullable": "notnull" not in flags and "pk" not in flags,
            "unique": "unique" in flags,
        }
        default = str(defaults[i]).strip() if i < len(defaults) else ""
        if default:
            spec["default"] = default
        columns.append(spec)
    if not columns:
        raise ValidationError("Give the table at least one column.")
    try:
        spec_def = msgspec.convert(
            {"name": values.get("table_name", "").strip(), "columns": columns}, data.TableDef
        )
    except msgspec.ValidationError as exc:
        raise ValidationError(f"table definition: {exc}") from None
    data.check_table_def(spec_def)
    return spec_def


@post("/p/{project_id:str}/tables", status_code=200)
async def create_table(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.SCHEMA)
    values = await form(request)
    try:
        spec = _table_def(values, await request.form())

        async def work(tx: Tx, pid: str) -> dict[str, Any]:
            return {"table": (await data.create_table(tx, pid, spec)).out()}

        created = await _work(dash, Need.SCHEMA, work)
    except FluxbaseError as exc:
        return await _list_page(dash, exc.status, error=exc, values=values)
    return dash.redirect(f"/p/{project_id}/tables/{created['table']['name']}")


def _browse_query(params: dict[str, str]) -> data.ListQuery:
    sort = params.get("sort", "").strip()
    if sort and params.get("dir") == "desc":
        sort = "-" + sort
    return data.ListQuery.parse(
        params.get("filter") or None, sort or None, params.get("limit") or None, params.get("offset") or None
    )


async def _table_page(
    dash: Dash, table: str, params: dict[str, str], status: int = 200, **extra: Any
) -> Response[Any]:
    query_error = None
    try:
        q = _browse_query(params)
    except FluxbaseError as exc:
        query_error, q = exc, data.ListQuery.parse()

    async def work(tx: Tx, pid: str) -> dict[str, Any]:
        described = await data.describe(tx, pid, table)
        if not described:
            await data.table_of(tx, pid, table)  # the API's own error for an unknown table
        return {"table": described[0].out()}

    info = (await _work(dash, Need.READ, work))["table"]
    try:
        records = await _work(dash, Need.READ, lambda tx, pid: data.list_records(tx, pid, table, q))
    except FluxbaseError as exc:
        query_error = query_error or exc
        records = {"records": [], "count": 0, "hasMore": False, "truncated": False}

    def page_link(offset: int) -> str:
        kept = {k: v for k, v in params.items() if k in ("filter", "sort", "dir", "limit") and v}
        return "?" + urlencode({**kept, "offset": max(0, offset)})

    return dash.render(
        "table.html",
        status,
        table=info,
        records=records,
        q=q,
        params=params,
        query_error=query_error,
        prev_link=page_link(q.offset - q.limit) if q.offset else None,
        next_link=page_link(q.offset + q.limit) if records["hasMore"] else None,
        key=info["primaryKey"][0] if len(info["primaryKey"]) == 1 else None,
        **extra,
    )


@get("/p/{project_id:str}/tables/{table:str}")
async def table_page(
    project_id: str, table: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    table = unsegment(table)
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    params = {k: v for k, v in request.query_params.items() if isinstance(v, str)}
    return await _table_page(dash, table, params)


def _values(fields: dict[str, str], prefix: str) -> dict[str, Any]:
    """Column values from `prefix<column>` fields; `null:<column>` checked means NULL."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name.startswith(prefix):
            column = name[len(prefix) :]
            out[column] = None if fields.get("null:" + column) == "on" else value
    return out


@post("/p/{project_id:str}/tables/{table:str}/rows", status_code=200)
async def insert_row(
    project_id: str, table: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    table = unsegment(table)
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.WRITE)
    fields = await form(request)
    record = {k: v for k, v in _values(fields, "new:").items() if v != ""}
    try:
        await _work(dash, Need.WRITE, lambda tx, pid: data.insert_records(tx, pid, table, record))
    except FluxbaseError as exc:
        return await _table_page(dash, table, {}, exc.status, error=exc)
    return await _table_page(dash, table, {}, notice="Row inserted.")


@post("/p/{project_id:str}/tables/{table:str}/rows/{key:str}", status_code=200)
async def update_row(
    project_id: str, table: str, key: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    table = unsegment(table)
    key = unsegment(key)
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.WRITE)
    fields = await form(request)
    new, old = _values(fields, "set:"), _values(fields, "old:")
    changed = {k: v for k, v in new.items() if k in old and v != old[k]}
    if not changed:
        return await _table_page(dash, table, {}, notice="Nothing changed.")
    try:
        await _work(
            dash, Need.WRITE, lambda tx, pid: data.record_by_key(tx, pid, table, "update", key, changed)
        )
    except FluxbaseError as exc:
        return await _table_page(dash, table, {}, exc.status, error=exc)
    return await _table_page(dash, table, {}, notice=f"Row {key} updated.")


@post("/p/{project_id:str}/tables/{table:str}/rows/{key:str}/delete", status_code=200)
async def delete_row(
    project_id: str, table: str, key: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    table = unsegment(table)
    key = unsegment(key)
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.SCHEMA)
    try:
        await _work(dash, Need.SCHEMA, lambda tx, pid: data.record_by_key(tx, pid, table, "delete", key))
    except FluxbaseError as exc:
        return await _table_page(dash, table, {}, exc.status, error=exc)
    return await _table_page(dash, table, {}, notice=f"Row {key} deleted.")


ROUTES = [tables_page, create_table, table_page, insert_row, update_row, delete_row]
