"""Webhook endpoints: configuration, test pings, the delivery log, redelivery, the project log.

Everything here needs `Need.MANAGE` (an admin-scope key or an admin member), as the issue
asks: webhook URLs and their logs describe a project's integrations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import delete, get, patch, post
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Answer, Body, Out
from fluxbase.services.access import Need, ProjectAccess
from fluxbase.webhooks import service

ProjectQ = Annotated[str | None, QueryParameter(name="projectId", required=False)]
StatusQ = Annotated[str | None, QueryParameter(name="status", required=False)]
BeforeQ = Annotated[str | None, QueryParameter(name="before", required=False)]
LimitQ = Annotated[int, QueryParameter(name="limit", required=False)]
T = TypeVar("T")


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


class WebhookQueue(Out):
    """An endpoint's delivery queue: how much waits, whether (and by what) it is blocked, and
    when it is tried next (deliveries go out in order, so a failed head holds up the rest)."""

    pending: int
    blocked: bool
    reason: str | None
    blocked_by: str | None  # the id of the failed delivery at the head
    last_error: str | None
    next_retry_at: datetime | None


class DeliveryAttempt(Out):
    """One attempt at a delivery: when, the receiver's status, time and (truncated) body, or
    the error that kept it from answering."""

    at: datetime
    response_status: int | None
    response_time_ms: int | None
    response_body: str | None
    error: str | None


class DeliveryOut(Out):
    """A delivery of the log: its state, the last attempt, the payload sent and every attempt
    (`attemptLog`, oldest first, the newest 50)."""

    id: str
    message_id: str  # the `webhook-id` header: the same on every attempt and redelivery
    event_type: str
    status: str
    attempts: int
    response_status: int | None
    response_time_ms: int | None
    response_body: str | None
    error: str | None
    next_retry_at: datetime | None
    last_attempt_at: datetime | None
    created_at: datetime
    redelivery_of: str | None
    payload: Any  # the JSON body sent, as sent
    attempt_log: list[DeliveryAttempt] = []


class ProjectLogEntry(Out):
    """An entry of the project log (webhook endpoints disabled, deliveries given up, ...)."""

    id: str
    level: str
    source: str
    message: str
    details: Any | None  # a JSON object, or null
    created_at: datetime


class WebhookOut(Out):
    """An endpoint; `secret` only in the answer that created or rotated it, `queue` on get/list."""

    id: str
    project_id: str
    url: str
    events: list[str]
    tables: list[str] | None
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    queue: WebhookQueue | msgspec.UnsetType = msgspec.UNSET
    secret: str | msgspec.UnsetType = msgspec.UNSET


class WebhookAnswer(Answer, kw_only=True):
    webhook: WebhookOut


class WebhooksAnswer(Answer, kw_only=True):
    webhooks: list[WebhookOut]


class WebhookDeleted(Answer, kw_only=True):
    id: str


class DeliveryAnswer(Answer, kw_only=True):
    delivery: DeliveryOut


class DeliveriesAnswer(Answer, kw_only=True):
    deliveries: list[DeliveryOut]


class ProjectLogAnswer(Answer, kw_only=True):
    entries: list[ProjectLogEntry]


def _typed(rows: Any, t: type[T]) -> T:
    """The service's camelCase dicts (the dashboard renders them too) as the documented Struct."""
    return msgspec.convert(rows, t)


def webhook_out(h: service.Webhook, secret: str | None = None) -> WebhookOut:
    return WebhookOut(
        h.id,
        h.project_id,
        h.url,
        h.events,
        h.tables,
        h.enabled,
        h.disabled_reason,
        h.created_at,
        h.updated_at,
        _typed(h.queue, WebhookQueue) if h.queue is not None else msgspec.UNSET,
        secret if secret is not None else msgspec.UNSET,
    )


async def _access(ctx: AppContext, caller: Caller, webhook_id: str) -> ProjectAccess:
    project_id = await service.project_of(ctx.db, webhook_id)
    return await caller.access(ctx, project_id, Need.MANAGE)


@post("/api/webhooks", operation_id="createWebhook", tags=["webhooks"], status_code=201)
async def create_webhook(data: CreateWebhookBody, ctx: AppContext, caller: Caller) -> WebhookAnswer:
    access = await caller.access(ctx, data.project_id, Need.MANAGE)
    hook, secret = await service.create(
        ctx.db,
        ctx.settings,
        access.project.id,
        data.url,
        data.events,
        data.tables,
        data.secret,
        data.enabled,
        catalog=await ctx.cluster_pools().pool(access.project.cluster_id),  # where its tables are
    )
    return WebhookAnswer(webhook=webhook_out(hook, secret))


@get("/api/webhooks", operation_id="listWebhooks", tags=["webhooks"])
async def list_webhooks(ctx: AppContext, caller: Caller, project_id: ProjectQ = None) -> WebhooksAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    hooks = await service.list_for(ctx.db, access.project.id)
    return WebhooksAnswer(webhooks=[webhook_out(h) for h in hooks])


@get("/api/webhooks/{webhook_id:str}", operation_id="getWebhook", tags=["webhooks"])
async def get_webhook(webhook_id: str, ctx: AppContext, caller: Caller) -> WebhookAnswer:
    access = await _access(ctx, caller, webhook_id)
    return WebhookAnswer(webhook=webhook_out(await service.get(ctx.db, access.project.id, webhook_id)))


@patch("/api/webhooks/{webhook_id:str}", operation_id="updateWebhook", tags=["webhooks"])
async def update_webhook(
    webhook_id: str, data: UpdateWebhookBody, ctx: AppContext, caller: Caller
) -> WebhookAnswer:
    access = await _access(ctx, caller, webhook_id)
    changes = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET}
    hook, secret = await service.update(
        ctx.db,
        ctx.settings,
        access.project.id,
        webhook_id,
        changes,
        catalog=await ctx.cluster_pools().pool(access.project.cluster_id),
    )
    # A new secret is shown once, like the first one.
    return WebhookAnswer(webhook=webhook_out(hook, secret))


@delete("/api/webhooks/{webhook_id:str}", operation_id="deleteWebhook", tags=["webhooks"], status_code=200)
async def delete_webhook(webhook_id: str, ctx: AppContext, caller: Caller) -> WebhookDeleted:
    access = await _access(ctx, caller, webhook_id)
    await service.delete(ctx.db, access.project.id, webhook_id)
    return WebhookDeleted(id=webhook_id)


@post("/api/webhooks/{webhook_id:str}/test", operation_id="testWebhook", tags=["webhooks"], status_code=200)
async def test_webhook(webhook_id: str, ctx: AppContext, caller: Caller) -> DeliveryAnswer:
    access = await _access(ctx, caller, webhook_id)
    delivery = await service.send_test(ctx.db, ctx.webhook_sender(), access.project.id, webhook_id)
    return DeliveryAnswer(delivery=_typed(delivery, DeliveryOut))


@get("/api/webhooks/{webhook_id:str}/deliveries", operation_id="listWebhookDeliveries", tags=["webhooks"])
async def list_deliveries(
    webhook_id: str,
    ctx: AppContext,
    caller: Caller,
    status: StatusQ = None,
    before: BeforeQ = None,
    limit: LimitQ = 50,
) -> DeliveriesAnswer:
    await _access(ctx, caller, webhook_id)
    rows = await service.deliveries(ctx.db, webhook_id, status, limit, before)
    return DeliveriesAnswer(deliveries=_typed(rows, list[DeliveryOut]))


@post(
    "/api/webhooks/{webhook_id:str}/deliveries/{delivery_id:str}/redeliver",
    operation_id="redeliverWebhook",
    tags=["webhooks"],
    status_code=202,
)
async def redeliver(webhook_id: str, delivery_id: str, ctx: AppContext, caller: Caller) -> DeliveryAnswer:
    await _access(ctx, caller, webhook_id)
    return DeliveryAnswer(
        delivery=_typed(await service.redeliver(ctx.db, webhook_id, delivery_id), DeliveryOut)
    )


@get("/api/projects/{project_id:str}/log", operation_id="projectLog", tags=["projects"])
async def project_log(
    project_id: str, ctx: AppContext, caller: Caller, limit: LimitQ = 100
) -> ProjectLogAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    entries = await service.project_log(ctx.db, access.project.id, limit)
    return ProjectLogAnswer(entries=_typed(entries, list[ProjectLogEntry]))
