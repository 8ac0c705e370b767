"""A project's email: its templates (list, override, reset, preview) and its delivery log."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import delete, get, post, put
from litestar.params import QueryParameter

from fluxbase.http.context import AppContext
from fluxbase.http.edge import Caller
from fluxbase.http.shapes import Body
from fluxbase.mail import outbox, templates
from fluxbase.services.access import Need, authorize

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


def template_out(kind: str, t: templates.Template, custom: bool) -> dict[str, Any]:
    return {
        "kind": kind,
        "subject": t.subject,
        "text": t.text,
        "html": t.html,
        "custom": custom,
        "placeholders": list(templates.FIELDS[kind]),
    }


@get(f"{BASE}/templates", operation_id="listMailTemplates", tags=["email"])
async def list_templates(project_id: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    custom = await outbox.overridden(ctx.db, access.project.id)
    out = []
    for kind in templates.PROJECT_KINDS:
        t = await outbox.template_for(ctx.db, access.project.id, kind)
        out.append(template_out(kind, t, kind in custom))
    return {"success": True, "templates": out}


@put(f"{BASE}/templates/{{kind:str}}", operation_id="setMailTemplate", tags=["email"])
async def set_template(
    project_id: str, kind: str, data: TemplateBody, ctx: AppContext, caller: Caller
) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    t = await outbox.save_template(
        ctx.db, access.project.id, kind, templates.Template(data.subject, data.text, data.html)
    )
    return {"success": True, "template": template_out(kind, t, True)}


@delete(f"{BASE}/templates/{{kind:str}}", operation_id="resetMailTemplate", tags=["email"], status_code=200)
async def reset_template(project_id: str, kind: str, ctx: AppContext, caller: Caller) -> dict[str, Any]:
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    t = await outbox.reset_template(ctx.db, access.project.id, kind)
    return {"success": True, "template": template_out(kind, t, False)}


@post(
    f"{BASE}/templates/{{kind:str}}/preview",
    operation_id="previewMailTemplate",
    tags=["email"],
    status_code=200,
)
async def preview_template(
    project_id: str, kind: str, data: PreviewBody, ctx: AppContext, caller: Caller
) -> dict[str, Any]:
    """Render the saved template, or the one in the body (validated, not saved), with sample values."""
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    templates.check_kind(kind)
    t = await outbox.template_for(ctx.db, access.project.id, kind)
    if data.subject is not None or data.text is not None or data.html is not None:
        t = templates.validate(
            kind, templates.Template(data.subject or t.subject, data.text or t.text, data.html or t.html)
        )
    out = templates.render(t, {**templates.SAMPLE, "project_name": access.project.name})
    return {"success": True, "preview": {"subject": out.subject, "text": out.text, "html": out.html}}


@get(f"{BASE}/log", operation_id="mailLog", tags=["email"])
async def mail_log(project_id: str, ctx: AppContext, caller: Caller, limit: LimitQ = None) -> dict[str, Any]:
    """Messages of this project, newest first: status (pending, sent, failed, bounced), attempts,
    the last error. Bodies are never returned (they hold single-use tokens)."""
    access = await authorize(ctx.db, caller.principal, caller.key_project, project_id, Need.MANAGE)
    entries = await outbox.project_log(ctx.db, access.project.id, limit or 100)
    return {
        "success": True,
        "messages": [
            {
                "id": e.id,
                "kind": e.kind,
                "to": e.recipient,
                "subject": e.subject,
                "status": e.status,
                "attempts": e.attempts,
                "lastError": e.last_error,
                "createdAt": e.created_at,
                "nextAttemptAt": e.next_attempt_at if e.status == "pending" else None,
                "finishedAt": e.finished_at,
            }
            for e in entries
        ],
    }
