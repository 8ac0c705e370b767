"""A project's email: its templates (list, override, reset, preview) and its delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import delete, get, post, put
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Answer, Body, Out
from fluxbase.mail import outbox, templates
from fluxbase.services.access import Need

BASE = "/api/projects/{project_id:str}/mail"
LimitQ = Annotated[int | None, QueryParameter(name="limit", required=False)]


class TemplateBody(Body):
    subject: str
    text: str
    html: str


class PreviewBody(Body):
    subject: str | None = None
    text: str | None = None
    html: str | None = None


class TemplateOut(Out):
    kind: str
    subject: str
    text: str
    html: str
    custom: bool
    placeholders: list[str]


class RenderedOut(Out):
    subject: str
    text: str
    html: str


class MessageOut(Out):
    id: int
    kind: str
    to: str
    subject: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None


class TemplatesAnswer(Answer, kw_only=True):
    templates: list[TemplateOut]


class TemplateAnswer(Answer, kw_only=True):
    template: TemplateOut


class PreviewAnswer(Answer, kw_only=True):
    preview: RenderedOut


class MailLogAnswer(Answer, kw_only=True):
    messages: list[MessageOut]


def template_out(kind: str, t: templates.Template, custom: bool) -> TemplateOut:
    return TemplateOut(kind, t.subject, t.text, t.html, custom, list(templates.FIELDS[kind]))


@get(f"{BASE}/templates", operation_id="listMailTemplates", tags=["email"])
async def list_templates(project_id: str, ctx: AppContext, caller: Caller) -> TemplatesAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    custom = await outbox.overridden(ctx.db, access.project.id)
    out: list[TemplateOut] = []
    for kind in templates.PROJECT_KINDS:
        t = await outbox.template_for(ctx.db, access.project.id, kind)
        out.append(template_out(kind, t, kind in custom))
    return TemplatesAnswer(templates=out)


@put(f"{BASE}/templates/{{kind:str}}", operation_id="setMailTemplate", tags=["email"])
async def set_template(
    project_id: str, kind: str, data: TemplateBody, ctx: AppContext, caller: Caller
) -> TemplateAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    t = await outbox.save_template(
        ctx.db, access.project.id, kind, templates.Template(data.subject, data.text, data.html)
    )
    return TemplateAnswer(template=template_out(kind, t, True))


@delete(f"{BASE}/templates/{{kind:str}}", operation_id="resetMailTemplate", tags=["email"], status_code=200)
async def reset_template(project_id: str, kind: str, ctx: AppContext, caller: Caller) -> TemplateAnswer:
    access = await caller.access(ctx, project_id, Need.MANAGE)
    t = await outbox.reset_template(ctx.db, access.project.id, kind)
    return TemplateAnswer(template=template_out(kind, t, False))


@post(
    f"{BASE}/templates/{{kind:str}}/preview",
    operation_id="previewMailTemplate",
    tags=["email"],
    status_code=200,
)
async def preview_template(
    project_id: str, kind: str, data: PreviewBody, ctx: AppContext, caller: Caller
) -> PreviewAnswer:
    """Render the saved template, or the one in the body (validated, not saved), with sample values."""
    access = await caller.access(ctx, project_id, Need.MANAGE)
    templates.check_kind(kind)
    t = await outbox.template_for(ctx.db, access.project.id, kind)
    if data.subject is not None or data.text is not None or data.html is not None:
        t = templates.validate(
            kind, templates.Template(data.subject or t.subject, data.text or t.text, data.html or t.html)
        )
    out = templates.render(t, {**templates.SAMPLE, "project_name": access.project.name})
    return PreviewAnswer(preview=RenderedOut(out.subject, out.text, out.html))


@get(f"{BASE}/log", operation_id="mailLog", tags=["email"])
async def mail_log(project_id: str, ctx: AppContext, caller: Caller, limit: LimitQ = None) -> MailLogAnswer:
    """Messages of this project, newest first: status (pending, sent, failed, bounced), attempts,
    the last error. Bodies are never returned (they hold single-use tokens)."""
    access = await caller.access(ctx, project_id, Need.MANAGE)
    entries = await outbox.project_log(ctx.db, access.project.id, limit or 100)
    return MailLogAnswer(
        messages=[
            MessageOut(
                e.id,
                e.kind,
                e.recipient,
                e.subject,
                e.status,
                e.attempts,
                e.last_error,
                e.created_at,
                e.next_attempt_at if e.status == "pending" else None,
                e.finished_at,
            )
            for e in entries
        ]
    )
