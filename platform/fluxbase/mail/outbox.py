"""The mail outbox: messages queued in PostgreSQL in the caller's transaction, their per-project
log, and per-project template overrides.

`enqueue` takes the caller's connection, so a message exists exactly when the action that causes
it commits (a rolled-back invitation sends nothing). The worker (`mail.sender`) claims due rows,
sends them and records the outcome; bodies are blanked when a message is finished, because they
carry single-use tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from fluxbase.mail import templates
from fluxbase.mail.templates import Rendered, Template

MAX_LOG = 500


@dataclass(frozen=True)
class LogEntry:
    id: int
    kind: str
    recipient: str
    subject: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    next_attempt_at: datetime
    finished_at: datetime | None


async def enqueue(
    conn: asyncpg.Connection | asyncpg.Pool,
    project_id: str | None,
    kind: str,
    recipient: str,
    message: Rendered,
) -> int:
    """Queue one message; call inside the transaction of the action that causes it."""
    return int(
        await conn.fetchval(
            """INSERT INTO fluxbase.mail_outbox (project_id, kind, recipient, subject, text_body, html_body)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
            project_id,
            kind,
            recipient,
            message.subject,
            message.text,
            message.html,
        )
    )


async def project_log(db: asyncpg.Pool, project_id: str, limit: int = 100) -> list[LogEntry]:
    rows = await db.fetch(
        """SELECT id, kind, recipient, subject, status, attempts, last_error, created_at, next_attempt_at,
                  finished_at
           FROM fluxbase.mail_outbox WHERE project_id = $1 ORDER BY id DESC LIMIT $2""",
        project_id,
        max(1, min(limit, MAX_LOG)),
    )
    return [LogEntry(**dict(r)) for r in rows]


async def trim_log(db: asyncpg.Pool, retention_s: int) -> int:
    status = await db.execute(
        """DELETE FROM fluxbase.mail_outbox
           WHERE status <> 'pending' AND finished_at < now() - make_interval(secs => $1)""",
        retention_s,
    )
    return int(status.split()[-1])


# -- templates ---------------------------------------------------------------------------------


async def template_for(
    conn: asyncpg.Connection | asyncpg.Pool, project_id: str | None, kind: str
) -> Template:
    """The project's override of `kind`, else the default."""
    if project_id is not None:
        row = await conn.fetchrow(
            """SELECT subject, text_body, html_body FROM fluxbase.project_mail_templates
               WHERE project_id = $1 AND kind = $2""",
            project_id,
            kind,
        )
        if row is not None:
            return Template(row["subject"], row["text_body"], row["html_body"])
    return templates.DEFAULTS[kind]


async def overridden(db: asyncpg.Pool, project_id: str) -> set[str]:
    rows = await db.fetch(
        "SELECT kind FROM fluxbase.project_mail_templates WHERE project_id = $1", project_id
    )
    return {r["kind"] for r in rows}


async def save_template(db: asyncpg.Pool, project_id: str, kind: str, t: Template) -> Template:
    templates.validate(kind, t)
    await db.execute(
        """INSERT INTO fluxbase.project_mail_templates (project_id, kind, subject, text_body, html_body)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (project_id, kind) DO UPDATE SET subject = EXCLUDED.subject,
               text_body = EXCLUDED.text_body, html_body = EXCLUDED.html_body, updated_at = now()""",
        project_id,
        kind,
        t.subject,
        t.text,
        t.html,
    )
    return t


async def reset_template(db: asyncpg.Pool, project_id: str, kind: str) -> Template:
    templates.check_kind(kind)
    await db.execute(
        "DELETE FROM fluxbase.project_mail_templates WHERE project_id = $1 AND kind = $2", project_id, kind
    )
    return templates.DEFAULTS[kind]


async def compose(
    conn: asyncpg.Connection | asyncpg.Pool, project_id: str | None, kind: str, values: dict[str, str]
) -> Rendered:
    """Render `kind` for a project (its override, else the default) with `values`."""
    return templates.render(await template_for(conn, project_id, kind), {"app_name": "Fluxbase", **values})
