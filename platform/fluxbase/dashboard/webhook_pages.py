"""Webhooks: create (events, tables; the secret shown once), enable/disable, rotate the secret,
test ping, the delivery log and redelivery, delete (fluxbase.webhooks.service, as the API's)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post

from fluxbase.errors import FluxbaseError
from fluxbase.http.context import AppContext
from fluxbase.services.access import Need
from fluxbase.webhooks import service
from fluxbase.webhooks.delivery import ALL_EVENTS

from .web import Dash, form, signed_in


def _tables(text: str) -> list[str] | None:
    names = [t.strip() for t in text.replace(",", " ").split() if t.strip()]
    return names or None


async def _list(dash: Dash, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    hooks = await service.list_for(dash.ctx.db, dash.access.project.id) if dash.can(Need.MANAGE) else []
    extra.setdefault("values", {})
    extra.setdefault("chosen", list(ALL_EVENTS[:3]))
    return dash.render("webhooks.html", status, hooks=hooks, events=ALL_EVENTS, **extra)


@get("/p/{project_id:str}/webhooks")
async def webhooks_page(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.READ)
    return await _list(dash)


@post("/p/{project_id:str}/webhooks", status_code=200)
async def create(project_id: str, request: Request[Any, Any, Any], ctx: AppContext) -> Response[Any]:
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    data = await form(request)
    chosen = [str(e) for e in (await request.form()).getall("events", [])]
    try:
        hook, secret = await service.create(
            ctx.db,
            ctx.settings,
            access.project.id,
            data.get("url", "").strip(),
            chosen,
            _tables(data.get("tables", "")),
            None,
            True,
            catalog=await ctx.cluster_pools().pool(access.project.cluster_id),  # where its tables are
        )
    except FluxbaseError as exc:
        return await _list(dash, exc.status, error=exc, values=data, chosen=chosen)
    return await _detail(dash, hook.id, secret=secret, what="created")


async def _detail(dash: Dash, webhook_id: str, status: int = 200, **extra: Any) -> Response[Any]:
    assert dash.access is not None
    hook = await service.get(dash.ctx.db, dash.access.project.id, webhook_id)
    deliveries = await service.deliveries(dash.ctx.db, hook.id, None, 50, None)
    return dash.render("webhook.html", status, hook=hook, deliveries=deliveries, **extra)


@get("/p/{project_id:str}/webhooks/{webhook_id:str}")
async def webhook_page(
    project_id: str, webhook_id: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    dash = await signed_in(request, ctx)
    await dash.project(project_id, Need.MANAGE)
    return await _detail(dash, webhook_id)


@post("/p/{project_id:str}/webhooks/{webhook_id:str}/{action:str}", status_code=200)
async def act(
    project_id: str, webhook_id: str, action: str, request: Request[Any, Any, Any], ctx: AppContext
) -> Response[Any]:
    """enable, disable, rotate, test, delete, or redeliver (with the delivery's id)."""
    dash = await signed_in(request, ctx)
    access = await dash.project(project_id, Need.MANAGE)
    pid = access.project.id
    data = await form(request)
    try:
        hook = await service.get(ctx.db, pid, webhook_id)  # the webhook belongs to this project
        if action in ("enable", "disable"):
            await service.update(ctx.db, ctx.settings, pid, hook.id, {"enabled": action == "enable"})
            return await _detail(dash, hook.id, notice=f"Webhook {action}d.")
        if action == "rotate":
            _, secret = await service.update(ctx.db, ctx.settings, pid, hook.id, {"rotate_secret": True})
            return await _detail(dash, hook.id, secret=secret, what="rotated")
        if action == "test":
            sent = await service.send_test(ctx.db, ctx.webhook_sender(), pid, hook.id)
            outcome = f"answered {sent['responseStatus']}" if sent["responseStatus"] else sent["error"]
            return await _detail(dash, hook.id, notice=f"Test ping {sent['status']}: {outcome}.")
        if action == "redeliver":
            again = await service.redeliver(ctx.db, hook.id, data.get("delivery", ""))
            return await _detail(dash, hook.id, notice=f"Delivery {again['redeliveryOf']} queued again.")
        if action == "delete":
            await service.delete(ctx.db, pid, hook.id)
            return await _list(dash, notice=f"Webhook to {hook.url} deleted.")
    except FluxbaseError as exc:
        return await _detail(dash, webhook_id, exc.status, error=exc)
    return await _detail(dash, webhook_id, 404, error_message=f"Unknown action {action!r}.")


ROUTES = [webhooks_page, create, webhook_page, act]
