"""Webhook endpoints: configuration, test pings, the delivery log, redelivery, the project log.

Everything here needs `Need.MANAGE` (an admin-scope key or an admin member), as the issue
asks: webhook URLs and their logs describe a project's integrations.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import delete, get, patch, post
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Body
from fluxbase.services.access import Need, ProjectAccess, authorize
from fluxbase.webhooks import service

ProjectQ = Annotated[str | None, QueryParameter(name="projectId", required=False)]
StatusQ = Annotated[str | None, QueryParameter(name="status", required=False)]
BeforeQ = Annotated[str | None, QueryParameter(name="before", required=False)]
LimitQ = Annotated[int, QueryParameter(name="limit", required=False)]


class CreateWebhookBody(Body):
    project_id: str
    url: str
    events: list[str]
    tables: list[str] | None = None
    secret: str | None = None
    enabled: bool = True


class UpdateWebhookBody(Body):
    url: str | msgspec.UnsetType = msgspec.UNSET
    events: list[str] | msgspec.UnsetType = msgspec.UNSET
    tables: list[str] | msgspec.UnsetType | None = msgspec.UNSET
    secret: str | msgspec.UnsetType = msgspec.UNSET
    rotate_secret: bool = False
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


async def _access(ctx: AppContext, caller: Caller, webhook_id: str) -> ProjectAccess:
    project_id = await service.project_of(ctx.db, webhook_id)
    return await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)


@post("/api/webhooks", operation_id="createWebhook", tags=["webhooks"], status_code=201)
async def create_webhook(data: CreateWebhookBody, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, data.project_id, Need.MANAGE)
    hook, secret = await service.create(
        ctx.db, ctx.settings, access.project.id, data.url, data.events, data.tables, data.secret, data.enabled
    )
    return {"success": True, "webhook": {**hook.out(), "secret": secret}}


@get("/api/webhooks", operation_id="listWebhooks", tags=["webhooks"])
async def list_webhooks(ctx: AppContext, caller: Caller, project_id: ProjectQ = None) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    hooks = await service.list_for(ctx.db, access.project.id)
    return {"success": True, "webhooks": [h.out() for h in hooks]}


@get("/api/webhooks/{webhook_id:str}", operation_id="getWebhook", tags=["webhooks"])
async def get_webhook(webhook_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await _access(ctx, caller, webhook_id)
    return {"success": True, "webhook": (await service.get(ctx.db, access.project.id, webhook_id)).out()}


@patch("/api/webhooks/{webhook_id:str}", operation_id="updateWebhook", tags=["webhooks"])
async def update_webhook(
    webhook_id: str, data: UpdateWebhookBody, ctx: AppContext, caller: Caller
) -> dict[str, Any]:
    access = await _access(ctx, caller, webhook_id)
    changes = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET}
    hook, secret = await service.update(ctx.db, ctx.settings, access.project.id, webhook_id, changes)
    out = hook.out()
    if secret is not None:
        out["secret"] = secret  # a new secret is shown once, like the first one
    return {"success": True, "webhook": out}


@delete("/api/webhooks/{webhook_id:str}", operation_id="deleteWebhook", tags=["webhooks"], status_code=200)
async def delete_webhook(webhook_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await _access(ctx, caller, webhook_id)
    await service.delete(ctx.db, access.project.id, webhook_id)
    return {"success": True, "id": webhook_id}


@post("/api/webhooks/{webhook_id:str}/test", operation_id="testWebhook", tags=["webhooks"], status_code=200)
async def test_webhook(webhook_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await _access(ctx, caller, webhook_id)
    delivery = await service.send_test(ctx.db, ctx.webhook_sender(), access.project.id, webhook_id)
    return {"success": True, "delivery": delivery}


@get("/api/webhooks/{webhook_id:str}/deliveries", operation_id="listWebhookDeliveries", tags=["webhooks"])
async def list_deliveries(
    webhook_id: str,
    ctx: AppContext,
    caller: Caller,
    status: StatusQ = None,
    before: BeforeQ = None,
    limit: LimitQ = 50,
) -> dict[str, Any]:
    await _access(ctx, caller, webhook_id)
    return {
        "success": True,
        "deliveries": await service.deliveries(ctx.db, webhook_id, status, limit, before),
    }


@post(
    "/api/webhooks/{webhook_id:str}/deliveries/{delivery_id:str}/redeliver",
    operation_id="redeliverWebhook",
    tags=["webhooks"],
    status_code=202,
)
async def redeliver(webhook_id: str, delivery_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    await _access(ctx, caller, webhook_id)
    return {"success": True, "delivery": await service.redeliver(ctx.db, webhook_id, delivery_id)}


@get("/api/projects/{project_id:str}/log", operation_id="projectLog", tags=["projects"])
async def project_log(
    project_id: str, ctx: AppContext, caller: Caller, limit: LimitQ = 100
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    return {"success": True, "entries": await service.project_log(ctx.db, access.project.id, limit)}
