"""Helpers for the email tests: a mail catcher started by the test, and reading its messages."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from fluxbase.mail.catcher import Caught, MailCatcher

TOKEN = re.compile(r"fxm_[A-Za-z0-9_-]{40,}")


def mail_env(smtp_port: int, **extra: str) -> dict[str, str]:
    """Settings for an instance that sends to a catcher on 127.0.0.1 with its worker inside."""
    return {
        "FLUXBASE_SMTP_HOST": "127.0.0.1",
        "FLUXBASE_SMTP_PORT": str(smtp_port),
        "FLUXBASE_SMTP_SECURITY": "none",
        "FLUXBASE_MAIL_FROM": "Fluxbase Test <no-reply@fluxbase.test>",
        "FLUXBASE_MAIL_POLL_SECONDS": "1",
        "FLUXBASE_RUN_WORKER_IN_API": "true",
        **extra,
    }


async def wait_mail(
    catcher: MailCatcher, to: str, match: Callable[[Caught], bool] = lambda m: True, timeout: float = 30
) -> Caught:
    """The first message to `to` that matches; waits on the catcher's condition, not a sleep."""
    found = await asyncio.to_thread(
        catcher.wait_for, lambda m: to.lower() in (t.lower() for t in m.to) and match(m), timeout
    )
    return found[0]


def token_of(message: Caught) -> str:
    """The token of a message: in its text, its HTML and its link, the same."""
    tokens = set(TOKEN.findall(message.text))
    assert len(tokens) == 1, message.text
    token = tokens.pop()
    assert token in message.html
    return token


def link_of(message: Caught) -> str:
    links = re.findall(r"https?://\S+", message.text)
    assert links, message.text
    return str(links[0])


def link_token(link: str) -> tuple[str, str]:
    q = parse_qs(urlsplit(link).query)
    return q["type"][0], q["token"][0]
