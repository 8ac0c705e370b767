"""The worker's mail loop: claim due messages, send them, record the outcome.

Claims take a lease (`locked_until`) with FOR UPDATE SKIP LOCKED, so several workers share the
queue and a worker that dies mid-send only delays its messages until the lease passes. A
temporary failure schedules the next attempt from the retry schedule (±20% jitter); past the
schedule the message is failed. Nothing here blocks a request: the API only inserts rows.
"""

from __future__ import annotations

import asyncio
import logging
import random

import asyncpg

from fluxbase.config import MailSettings
from fluxbase.mail import smtp

log = logging.getLogger("fluxbase.mail")

BATCH = 20

_CLAIM = """
UPDATE fluxbase.mail_outbox SET locked_until = now() + make_interval(secs => $2), attempts = attempts + 1
WHERE id IN (
    SELECT id FROM fluxbase.mail_outbox
    WHERE status = 'pending' AND next_attempt_at <= now() AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_attempt_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING id, recipient, subject, text_body, html_body, attempts
"""
_DONE = """
UPDATE fluxbase.mail_outbox SET status = $2, last_error = $3, finished_at = now(), locked_until = NULL,
    text_body = '', html_body = ''
WHERE id = $1
"""
_RETRY = """
UPDATE fluxbase.mail_outbox SET last_error = $2, locked_until = NULL,
    next_attempt_at = now() + make_interval(secs => $3)
WHERE id = $1
"""


async def send_due(db: asyncpg.Pool, settings: MailSettings) -> int:
    """Send up to BATCH due messages; returns how many were claimed. Each is claimed just before
    it is sent, so its lease covers one send and never a queue of them (a lease that ran out
    behind a slow batch would let another worker send the same message again)."""
    lease = settings.smtp_timeout_s * 8 + 30  # connect, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA
    claimed = 0
    for _ in range(BATCH):
        r = await db.fetchrow(_CLAIM, 1, lease)
        if r is None:
            break
        claimed += 1
        await _send_one(db, settings, r)
    return claimed


async def _send_one(db: asyncpg.Pool, settings: MailSettings, r: asyncpg.Record) -> None:
    msg = smtp.build(settings, r["recipient"], r["subject"], r["text_body"], r["html_body"])
    try:
        await smtp.send(settings, msg, r["recipient"])
    except smtp.SendFailed as exc:
        retries = settings.retry_schedule
        if exc.permanent:
            await db.execute(_DONE, r["id"], "bounced", exc.reason)
            log.warning("mail %s bounced: %s", r["id"], exc.reason)
        elif r["attempts"] > len(retries):
            await db.execute(_DONE, r["id"], "failed", exc.reason)
            log.warning("mail %s failed after %s attempts: %s", r["id"], r["attempts"], exc.reason)
        else:
            delay = retries[r["attempts"] - 1] * random.uniform(0.8, 1.2)
            await db.execute(_RETRY, r["id"], exc.reason, delay)
        return
    await db.execute(_DONE, r["id"], "sent", None)


async def run(db: asyncpg.Pool, settings: MailSettings, stop: asyncio.Event) -> None:
    """Send until `stop` is set; a database hiccup is logged and retried."""
    while not stop.is_set():
        claimed = 0
        try:
            claimed = await send_due(db, settings)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("mail sending failed, will retry: %r", exc)
        if claimed:
            continue
        try:
            await asyncio.wait_for(stop.wait(), settings.poll_s)
        except TimeoutError:
            pass
