"""A local mail catcher for development and tests: an SMTP server (aiosmtpd) on 127.0.0.1 that
keeps every message it receives, and a small HTTP endpoint to read them.

`fluxbase dev` runs it as `python -m fluxbase.mail.catcher`; the API and worker send to it with
FLUXBASE_SMTP_SECURITY=none (allowed to loopback hosts only). Read the messages with
`GET http://127.0.0.1:<http port>/messages` (optionally `?to=<address>`), clear them with
`DELETE /messages`. It binds to loopback only: what it holds are live sign-in links.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
MAX_KEPT = 1000


@dataclass(frozen=True)
class Caught:
    id: int
    mail_from: str
    to: list[str]
    subject: str
    text: str
    html: str
    headers: dict[str, str]


def _parse(id_: int, envelope: Envelope) -> Caught:
    raw = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    text_part = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    return Caught(
        id_,
        envelope.mail_from or "",
        list(envelope.rcpt_tos),
        str(msg.get("Subject", "")),
        text_part.get_content() if text_part is not None else "",
        html_part.get_content() if html_part is not None else "",
        {k: str(v) for k, v in msg.items()},
    )


class MailCatcher:
    """Keeps what it receives (the newest MAX_KEPT messages) and wakes whoever waits for one."""

    def __init__(
        self, smtp_port: int, http_port: int | None = None, refuse: frozenset[str] = frozenset()
    ) -> None:
        self.smtp_port = smtp_port
        self.http_port = http_port
        self.refuse = frozenset(
            a.lower() for a in refuse
        )  # answered 550, as a server does for no such mailbox
        self._messages: list[Caught] = []
        self._next = 1
        self._cond = threading.Condition()
        self._controller: Controller | None = None
        self._http: ThreadingHTTPServer | None = None

    # aiosmtpd handler hooks
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self.refuse:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._cond:
            self._messages.append(_parse(self._next, envelope))
            self._next += 1
            del self._messages[:-MAX_KEPT]
            self._cond.notify_all()
        return "250 Message accepted for delivery"

    def start(self) -> MailCatcher:
        self._controller = Controller(self, hostname=HOST, port=self.smtp_port)
        self._controller.start()
        if self.http_port is not None:
            self._http = ThreadingHTTPServer((HOST, self.http_port), _handler_for(self))
            threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def messages(self, to: str | None = None) -> list[Caught]:
        with self._cond:
            return [m for m in self._messages if to is None or to.lower() in (t.lower() for t in m.to)]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(
        self, match: Callable[[Caught], bool], timeout: float = 20.0, count: int = 1
    ) -> list[Caught]:
        """Block until `count` messages match (returns them) or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self._messages if match(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{count} matching message(s) not received within {timeout}s")
                self._cond.wait(left)


def _handler_for(catcher: MailCatcher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/messages":
                self._json(404, {"success": False, "error": "GET /messages[?to=address]"})
                return
            to = parse_qs(url.query).get("to", [None])[0]
            self._json(200, {"success": True, "messages": [asdict(m) for m in catcher.messages(to)]})

        def do_DELETE(self) -> None:
            catcher.clear()
            self._json(200, {"success": True})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Fluxbase development mail catcher")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--http-port", type=int, default=8025)
    args = parser.parse_args()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    catcher = MailCatcher(args.smtp_port, args.http_port).start()
    print(
        f"mail catcher: SMTP {HOST}:{args.smtp_port}, messages at http://{HOST}:{args.http_port}/messages",
        flush=True,
    )
    try:
        done.wait()
    finally:
        catcher.stop()


if __name__ == "__main__":
    main()
