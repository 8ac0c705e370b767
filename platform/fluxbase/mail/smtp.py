"""Sending one message over SMTP with the standard library's smtplib, in a thread.

STARTTLS (verified against the system's CA store, required, never silently skipped), implicit
TLS, or plain text to a loopback host only (config refuses anything else); authentication when
a username is set; one timeout for connect and every command. Failures are sorted once:
a 5xx answer is permanent (the message bounced), anything else (refused connection, timeout,
4xx, TLS failure) is temporary and the message is retried.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from fluxbase.config import MailSettings


class SendFailed(Exception):
    """`permanent`: the server refused the message for good (5xx): do not retry."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason[:500]
        self.permanent = permanent


def build(settings: MailSettings, recipient: str, subject: str, text: str, html: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=settings.sender.rsplit("@", 1)[-1].strip(" >") or "localhost")
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg


def _send_blocking(settings: MailSettings, msg: EmailMessage, recipient: str) -> None:
    timeout = settings.smtp_timeout_s
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if settings.smtp_security == "tls":
        client = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=timeout)
    with client:
        client.ehlo()
        if settings.smtp_security == "starttls":
            client.starttls(context=context)  # raises SMTPNotSupportedError if the server offers none
            client.ehlo()
        if settings.smtp_username:
            client.login(settings.smtp_username, settings.smtp_password)
        # The envelope names exactly the one stored recipient, never what a header parser makes
        # of it (a comma in an address would otherwise add recipients).
        client.send_message(msg, to_addrs=[recipient])


def _classify(exc: BaseException) -> SendFailed:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [c for c, _ in exc.recipients.values()]
        return SendFailed(f"recipient refused: {codes}", permanent=all(c >= 500 for c in codes))
    if isinstance(exc, smtplib.SMTPResponseException):
        text = (
            exc.smtp_error.decode(errors="replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        # Authentication failures are our configuration, not the recipient: retry after a fix.
        permanent = exc.smtp_code >= 500 and not isinstance(exc, smtplib.SMTPAuthenticationError)
        return SendFailed(f"{exc.smtp_code} {text}", permanent=permanent)
    return SendFailed(f"{type(exc).__name__}: {exc}", permanent=False)


async def send(settings: MailSettings, msg: EmailMessage, recipient: str) -> None:
    """Send, or raise SendFailed (permanent or not)."""
    if not settings.smtp_host:
        raise SendFailed("no SMTP server configured (FLUXBASE_SMTP_HOST)", permanent=False)
    try:
        await asyncio.to_thread(_send_blocking, settings, msg, recipient)
    except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
        raise _classify(exc) from None
