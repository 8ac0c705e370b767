"""The SQL editor: run a statement as the member (or as an end user), see the grid, types, timing.

The statement goes through `services.sql.execute`, the function `/api/execute-sql` calls, with
the member's own SQL scope from `authorize` and the same rate limit. "Run as end user" drops the
scope to readwrite (never raises it), so RLS applies as it does to an app's end users, and sets
`auth.uid()` from the `authUid` given, or from a verified end-user token: the reference guide's
step "Test in SQL Editor".
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError, StatementFailed, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.services import sql
from fluxbase.services.access import SCOPE_RANK, Need, ProjectAccess

from .tenant import tenant_request
from .web import Dash, form, signed_in

DISPLAY_ROWS = 1000  # the grid shows this many; the CSV has every row the API returned


@get("/p/{project_id:str}/sql")
async def sql_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return dash.render("sql.html")


def _params(text: str) -> list[Any]:
    text = text.strip()
    if not text:
        return []
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise ValidationError('params must be a JSON array, like ["alice", 42].') from None
    if not isinstance(value, list):
        raise ValidationError('params must be a JSON array, like ["alice", 42].')
    return value


def _type_of(values: list[Any]) -> str:
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("boolean")
        elif isinstance(v, int | float):
            kinds.add("number")
        elif isinstance(v, str):
            kinds.add("text")
        else:
            kinds.add("json")
    if not kinds:
        return "null"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _as_end_user(access: ProjectAccess) -> ProjectAccess:
    """The member's access with the scope an app's end users get: at most readwrite."""
    scope = "readwrite" if SCOPE_RANK[access.sql_scope] >= SCOPE_RANK["readwrite"] else access.sql_scope
    return msgspec.structs.replace(access, sql_scope=scope)


async def _run(dash: Dash, access: ProjectAccess, data: dict[str, str]) -> dict[str, Any]:
    ctx = dash.ctx
    as_user = data.get("as_user") == "on"
    auth_uid = data.get("auth_uid", "").strip() or None
    user_token = data.get("user_token", "").strip() or None
    if as_user:
        if auth_uid is None and user_token is None:
            raise ValidationError("To run as an end user, give an authUid or an end-user token.")
        access = _as_end_user(access)
    else:
        auth_uid = user_token = None
    identity = await ctx.identity.identity(
        access, user_token=user_token, auth_uid=auth_uid, session_checked_in_sql=True
    )
    req = await tenant_request(ctx, access, identity)
    query = data.get("query", "")
    params = _params(data.get("params", ""))
    started = time.perf_counter()
    res = await sql.execute(ctx.tenants, ctx.db, req, query, params)
    elapsed = (time.perf_counter() - started) * 1000
    rows = [msgspec.json.decode(r) for r in res.rows]
    types = res.column_types()
    columns = [
        {"name": c, "type": types[i] if i < len(types) else _type_of([r.get(c) for r in rows])}
        for i, c in enumerate(res.columns)
    ]
    return {
        "columns": columns,
        "rows": rows[:DISPLAY_ROWS],
        "data": {"columns": res.columns, "rows": rows},
        "row_count": res.count,
        "shown": min(len(rows), DISPLAY_ROWS),
        "message": res.message,
        "truncated": res.truncated,
        "operation": res.operation,
        "time_ms": elapsed,
        "as_user": auth_uid or ("token subject " + str(identity.uid) if as_user else None),
        "scope": access.sql_scope,
    }


@post("/p/{project_id:str}/sql", status_code=200)
async def run_sql(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The results panel (an htmx partial): the grid, or the error with its code and SQLSTATE."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.READ)
    data = await form(request)
    try:
        result = await _run(dash, access, data)
    except StatementFailed as exc:
        return dash.render("sql_result.html", error=exc, sqlstate=exc.sqlstate, result=None)
    except FluxbaseError as exc:
        return dash.render("sql_result.html", error=exc, sqlstate=None, result=None)
    return dash.render("sql_result.html", error=None, sqlstate=None, result=result)


ROUTES = [sql_page, run_sql]
