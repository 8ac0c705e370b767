"""Schema, tables and records REST (Boltstore-style) on the tenant transaction path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import MediaType, Request, Response, delete, get, patch, post
from litestar.params import QueryParameter

from fluxbase.errors import ValidationError
from fluxbase.http.context import AppContext
from fluxbase.http.controllers.sql import AUTH_UID_HEADER, forget_refused_key, tenant_request
from fluxbase.http.shapes import decode_body
from fluxbase.services import data
from fluxbase.services.access import Need
from fluxbase.tenancy.session import Tx

ProjectQ = Annotated[str | None, QueryParameter(name="projectId", required=False)]
FilterQ = Annotated[str | None, QueryParameter(name="filter", required=False)]
SortQ = Annotated[str | None, QueryParameter(name="sort", required=False)]
LimitQ = Annotated[str | None, QueryParameter(name="limit", required=False)]
OffsetQ = Annotated[str | None, QueryParameter(name="offset", required=False)]
FieldsQ = Annotated[str | None, QueryParameter(name="fields", required=False)]

RECORDS = "/api/projects/{project_id:str}/tables/{table:str}/records"


async def _run(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    project_id: str | None,
    need: Need,
    work: Callable[[Tx, str], Awaitable[dict[str, Any]]],
    status: int = 200,
) -> Response[bytes]:
    """Authorise `need` (execute-sql's hot path), run `work(tx, project_id)` as the caller's role."""
    req = await tenant_request(request, ctx, project_id, request.headers.get(AUTH_UID_HEADER), need)
    async with forget_refused_key(ctx, req):
        body = await data.run(
            ctx.tenants, ctx.db, req, lambda tx: work(tx, req.project_id), read_only=need is Need.READ
        )
    return Response(content=body, media_type=MediaType.JSON, status_code=status)


async def _json(request: Request[Any, Any, Any]) -> Any:
    return decode_body(await request.body(), Any)


@get("/api/schema", operation_id="getSchema", tags=["data"])
async def get_schema(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: ProjectQ = None
) -> Response[bytes]:
    return await _run(request, ctx, project_id, Need.READ, data.schema)


@get("/api/projects/{project_id:str}/tables", operation_id="listTables", tags=["data"])
async def list_tables(request: Request[Any, Any, Any], ctx: AppContext, project_id: str) -> Response[bytes]:
    return await _run(request, ctx, project_id, Need.READ, data.schema)


@post("/api/projects/{project_id:str}/tables", operation_id="createTable", tags=["data"], status_code=201)
async def create_table(request: Request[Any, Any, Any], ctx: AppContext, project_id: str) -> Response[bytes]:
    try:
        spec = msgspec.json.decode(await request.body(), type=data.TableDef)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValidationError(f"table definition: {exc}") from None
    data.check_table_def(spec)

    async def work(tx: Tx, pid: str) -> dict[str, Any]:
        return {"success": True, "table": (await data.create_table(tx, pid, spec)).out()}

    return await _run(request, ctx, project_id, Need.SCHEMA, work, 201)


@get(RECORDS, operation_id="listRecords", tags=["data"])
async def list_records(
    request: Request[Any, Any, Any],
    ctx: AppContext,
    project_id: str,
    table: str,
    filter_: FilterQ = None,
    sort: SortQ = None,
    limit: LimitQ = None,
    offset: OffsetQ = None,
    fields: FieldsQ = None,
) -> Response[bytes]:
    q = data.ListQuery.parse(filter_, sort, limit, offset, fields)
    return await _run(
        request, ctx, project_id, Need.READ, lambda tx, pid: data.list_records(tx, pid, table, q)
    )


@post(RECORDS, operation_id="createRecords", tags=["data"], status_code=201)
async def create_records(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str, table: str
) -> Response[bytes]:
    payload = await _json(request)
    data.check_insert(payload)
    return await _run(
        request,
        ctx,
        project_id,
        Need.WRITE,
        lambda tx, pid: data.insert_records(tx, pid, table, payload),
        201,
    )


@get(RECORDS + "/{key:str}", operation_id="getRecord", tags=["data"])
async def get_record(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str, table: str, key: str
) -> Response[bytes]:
    return await _run(
        request,
        ctx,
        project_id,
        Need.READ,
        lambda tx, pid: data.record_by_key(tx, pid, table, "get", key),
    )


@patch(RECORDS + "/{key:str}", operation_id="updateRecord", tags=["data"])
async def update_record(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str, table: str, key: str
) -> Response[bytes]:
    payload = await _json(request)
    data.check_patch(payload)
    return await _run(
        request,
        ctx,
        project_id,
        Need.WRITE,
        lambda tx, pid: data.record_by_key(tx, pid, table, "update", key, payload),
    )


# DELETE needs an admin key (or a developer/admin member): the reference doc's readwrite
# scope is SELECT, INSERT, UPDATE only, so Need.SCHEMA's (admin, developer) is the right bar.
@delete(RECORDS + "/{key:str}", operation_id="deleteRecord", tags=["data"], status_code=200)
async def delete_record(
    request: Request[Any, Any, Any], ctx: AppContext, project_id: str, table: str, key: str
) -> Response[bytes]:
    return await _run(
        request,
        ctx,
        project_id,
        Need.SCHEMA,
        lambda tx, pid: data.record_by_key(tx, pid, table, "delete", key),
    )
