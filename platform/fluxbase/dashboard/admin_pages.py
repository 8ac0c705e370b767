"""Instance admin: every project of the instance, suspend/resume, quotas.

The same service calls and the same check (`operations.require_instance_admin`) as the API's
/api/admin routes: an instance admin's dashboard session may do here exactly what it may do there,
and anyone else gets the API's own 403 INSUFFICIENT_PERMISSIONS.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError, ValidationError
from fluxbase.http.context import AppContext
from fluxbase.services import operations
from fluxbase.services.access import load_project

from .web import Dash, form, signed_in

PAGE = 200

# The quota form's fields: (form field and API name, label, unit shown next to the input).
QUOTA_FIELDS = (
    ("databaseBytes", "Database size", "bytes; empty: no cap"),
    ("storageBytes", "Storage", "bytes; empty: the instance default"),
    ("maxFileSize", "Largest file", "bytes; empty: the instance default"),
    ("rateLimitRequests", "Requests per window", "empty: the instance default"),
    ("rateLimitWindowSeconds", "Rate-limit window", "seconds; empty: the instance default"),
)


async def _admin(request: Request[Any, Any, Any], ctx: AppContext) -> Dash:
    dash = await signed_in(request, ctx)
    assert dash.principal is not None
    operations.require_instance_admin(dash.principal)
    return dash


async def _list_page(dash: Dash, after: str | None = None, status: int = 200, **extra: Any) -> Response[Any]:
    page, cursor = await operations.list_all_projects(dash.ctx.db, PAGE, after or None)
    return dash.render("admin.html", status, rows=page, next_cursor=cursor, **extra)


@get("/admin")
async def admin_page(request: Request[Any, Any, Any], ctx: AppContext, after: str = "") -> Response[Any]:
    return await _list_page(await _admin(request, ctx), after)


@post("/admin/p/{project_id:str}/status", status_code=200)
async def set_status(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The API's suspendProject / resumeProject."""
    dash = await _admin(request, ctx)
    action = (await form(request)).get("action")
    if action not in ("suspend", "resume"):
        return await _list_page(dash, status=400, error_message="Choose suspend or resume.")
    suspend = action == "suspend"
    project = await operations.set_status(ctx.db, project_id, "suspended" if suspend else "active")
    ctx.auth.forget_project(project.id)
    word = "suspended: every call to it answers 403 PROJECT_SUSPENDED" if suspend else "active again"
    return await _list_page(dash, notice=f"{project.name} is {word}.")


async def _quota_page(dash: Dash, project_id: str, status: int = 200, **extra: Any) -> Response[Any]:
    project = await load_project(dash.ctx.db, project_id)
    quotas = await operations.get_quotas(dash.ctx.db, dash.ctx.settings, project.id)
    return dash.render(
        "admin_project.html", status, target=project, quotas=quotas.out(), fields=QUOTA_FIELDS, **extra
    )


@get("/admin/p/{project_id:str}")
async def admin_project(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    return await _quota_page(await _admin(request, ctx), project_id)


def _changes(data: dict[str, str]) -> dict[str, Any]:
    """Only the fields the admin changed (each form row carries the value it showed): an empty
    field is null (the instance default, or no database cap), a number is an override."""
    changes: dict[str, Any] = {}
    for name, label, _ in QUOTA_FIELDS:
        value, shown = data.get(name, "").strip(), data.get("shown_" + name, "").strip()
        if value == shown:
            continue
        if value == "":
            changes[name] = None
        elif value.isdigit():
            changes[name] = int(value)
        else:
            raise ValidationError(f"{label} must be a whole number, or empty.")
    return changes


@post("/admin/p/{project_id:str}/quotas", status_code=200)
async def set_quotas(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    """The API's setQuotas."""
    dash = await _admin(request, ctx)
    try:
        changes = _changes(await form(request))
        if not changes:
            return await _quota_page(dash, project_id, notice="Nothing changed.")
        await operations.set_quotas(ctx.db, ctx.settings, project_id, changes, ctx.cluster_pools())
    except FluxbaseError as exc:
        return await _quota_page(dash, project_id, exc.status, error=exc)
    ctx.auth.forget_project(project_id)
    ctx.sizes.forget(project_id)
    return await _quota_page(dash, project_id, notice="Quotas saved: " + ", ".join(sorted(changes)) + ".")


ROUTES = [admin_page, set_status, admin_project, set_quotas]
