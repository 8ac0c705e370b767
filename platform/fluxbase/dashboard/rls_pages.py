"""Row Level Security: tables with their switches and policies; the guide's four patterns as
templates, free-form policies, drop, enable/disable and force (services.rls, as the API's)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response, get, post

from fluxbase.db.quoting import quote_ident
from fluxbase.errors import FluxbaseError, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.services import rls
from fluxbase.services.access import Need

from .web import Dash, form, signed_in, unsegment

COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Template:
    """One of the reference guide's "Common Policy Patterns"."""

    id: str
    title: str
    summary: str
    column: str | None  # the column the pattern compares with auth.uid(), if any
    # (name suffix, command, using, with check); "{col}" is the quoted column
    policies: tuple[tuple[str, str, str | None, str | None], ...]


TEMPLATES = (
    Template(
        "owner",
        "User owns their rows",
        "Each end user sees and changes only rows whose column equals auth.uid().",
        "user_id",
        (("owner", "ALL", "{col} = auth.uid()", "{col} = auth.uid()"),),
    ),
    Template(
        "org",
        "Multi-tenant (org-scoped)",
        "All members of an organization share rows; set auth.uid() to the org id at the API level.",
        "org_id",
        (("org", "ALL", "{col} = auth.uid()", "{col} = auth.uid()"),),
    ),
    Template(
        "public_read",
        "Public read, owner write",
        "Anyone may read; only the author inserts, updates and deletes.",
        "author_id",
        (
            ("read", "SELECT", "true", None),
            ("insert", "INSERT", None, "{col} = auth.uid()"),
            ("update", "UPDATE", "{col} = auth.uid()", "{col} = auth.uid()"),
            ("delete", "DELETE", "{col} = auth.uid()", None),
        ),
    ),
    Template(
        "lockdown",
        "Full lockdown",
        "No API caller but the admin key reads or writes (internal audit tables).",
        None,
        (("lockdown", "ALL", "false", None),),
    ),
)
BY_ID = {t.id: t for t in TEMPLATES}


async def _page(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    tables = await rls.list_tables(dash.ctx.tenants, dash.access.project.id) if dash.can(Need.MANAGE) else []
    return dash.render("rls.html", status, tables=tables, templates=TEMPLATES, **extra)


@get("/p/{project_id:str}/rls")
async def rls_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _page(dash)


async def _apply_template(dash: Dash, table: str, template: Template, column: str) -> str:
    """Enable RLS and create the pattern's policies; on a failure, drop the ones just created."""
    assert dash.access is not None
    pools, pid = dash.ctx.tenants, dash.access.project.id
    col = ""
    if template.column is not None:
        column = column.strip() or template.column
        if not COLUMN_RE.match(column):
            raise ValidationError("The column must be a plain column name, like user_id.")
        col = quote_ident(column)
    created: list[str] = []
    try:
        for suffix, command, using, check in template.policies:
            name = f"{table}_{suffix}"[:63]
            await rls.create_policy(
                pools,
                pid,
                table=table,
                name=name,
                command=command,
                using=using.format(col=col) if using else None,
                with_check=check.format(col=col) if check else None,
            )
            created.append(name)
        await rls.set_table(pools, pid, table, enabled=True, forced=None)
    except FluxbaseError:
        for name in created:
            with contextlib.suppress(FluxbaseError):
                await rls.drop_policy(pools, pid, table, name)
        raise
    count = f"{len(created)} {'policy' if len(created) == 1 else 'policies'}"
    return f"RLS is on for {table}, with the {template.title.lower()} pattern ({count})."


@post("/p/{project_id:str}/rls/policies", status_code=200)
async def create_policy(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    data = await form(request)
    table = data.get("table", "")
    try:
        template = BY_ID.get(data.get("template", "custom"))
        if template is not None:
            notice = await _apply_template(dash, table, template, data.get("column", ""))
        else:
            await rls.create_policy(
                ctx.tenants,
                access.project.id,
                table=table,
                name=data.get("name", "").strip(),
                command=data.get("command", "ALL"),
                using=data.get("using", "").strip() or None,
                with_check=data.get("with_check", "").strip() or None,
                permissive=data.get("restrictive") != "on",
            )
            notice = f"Policy {data.get('name', '').strip()} created on {table}."
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc, values=data)
    return await _page(dash, notice=notice)


@post("/p/{project_id:str}/rls/tables/{table:str}", status_code=200)
async def set_table(
    project_id: str, table: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    table = unsegment(table)
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    data = await form(request)
    flags = {k: data[k] == "true" for k in ("enabled", "forced") if k in data}
    try:
        await rls.set_table(
            ctx.tenants, access.project.id, table, enabled=flags.get("enabled"), forced=flags.get("forced")
        )
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    return await _page(dash, notice=f"Row Level Security settings of {table} updated.")


@post("/p/{project_id:str}/rls/tables/{table:str}/policies/{name:str}/drop", status_code=200)
async def drop_policy(
    project_id: str, table: str, name: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    table = unsegment(table)
    name = unsegment(name)
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    try:
        await rls.drop_policy(ctx.tenants, access.project.id, table, name)
    except FluxbaseError as exc:
        return await _page(dash, exc.status, error=exc)
    return await _page(dash, notice=f"Policy {name} dropped from {table}.")


ROUTES = [rls_page, create_policy, set_table, drop_policy]
