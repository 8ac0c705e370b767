"""A serverless webhook handler (AWS Lambda / any function taking an HTTP event), in Python.

Set FLUXBASE_WEBHOOK_SECRET to the endpoint's secret (shown once by POST /api/webhooks). Run it
locally as a plain HTTP server: `python examples/webhook_handler.py 9000`.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from fluxbase_client import WebhookVerificationError, verify

SEEN: set[str] = set()  # use your database in production: delivery is at-least-once


def handle(raw_body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """The handler proper: (status, body). Usable from any framework."""
    try:
        event = verify(raw_body, headers, os.environ["FLUXBASE_WEBHOOK_SECRET"])
    except WebhookVerificationError as exc:
        return 401, f"Unauthorized: {exc}"
    delivery = next(v for k, v in headers.items() if k.lower() == "webhook-id")
    if delivery in SEEN:
        return 200, "duplicate"
    SEEN.add(delivery)
    print("[Webhook]", event["event_type"], json.dumps(event["data"]["new"]), flush=True)
    return 200, "OK"


def lambda_handler(event: dict[str, Any], _context: Any) -> dict[str, Any]:
    """AWS Lambda (function URL / API Gateway v2) entry point."""
    body = event.get("body") or ""
    raw = base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()
    status, text = handle(raw, dict(event.get("headers") or {}))
    return {"statusCode": status, "body": text}


class _Local(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, text = handle(raw, dict(self.headers.items()))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *_: Any) -> None:
        pass


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 9000), _Local).serve_forever()
