"""Verify webhook deliveries: `X-Fluxbase-Signature` and the Standard Webhooks headers.

Framework-free, so it runs in any serverless handler: give it the raw body bytes (before any JSON
parsing), the request headers and the endpoint's secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from fluxbase_client.errors import WebhookVerificationError

DEFAULT_TOLERANCE_S = 300


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return None


def _standard_key(secret: str) -> bytes:
    # Standard Webhooks: a `whsec_` secret's key is its base64 part; any other secret, its UTF-8.
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except (binascii.Error, ValueError):
            pass
    return secret.encode()


def verify(
    raw_body: bytes | str,
    headers: Mapping[str, str],
    secret: str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Any:
    """The delivery's parsed JSON if every signature present verifies and its timestamp is fresh.

    Requires `webhook-id`, `webhook-timestamp` and `webhook-signature` (replay protection: a
    timestamp further than `tolerance_s` from now is refused) and, when present,
    `X-Fluxbase-Signature`. Raises WebhookVerificationError otherwise."""
    if not secret:
        raise WebhookVerificationError("no webhook secret configured")
    body = raw_body.encode() if isinstance(raw_body, str) else bytes(raw_body)
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    sigs = _header(headers, "webhook-signature")
    if not (msg_id and stamp and sigs):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(stamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not a number") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance (a replay?)")
    expected = hmac.new(_standard_key(secret), f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    ok = False
    for part in sigs.split():
        version, _, value = part.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        ok = ok or hmac.compare_digest(given, expected)
    if not ok:
        raise WebhookVerificationError("webhook-signature does not match")
    fx = _header(headers, "x-fluxbase-signature")
    if fx is not None:
        want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(fx.strip().encode(), want.encode()):
            raise WebhookVerificationError("X-Fluxbase-Signature does not match")
    try:
        return json.loads(body)
    except ValueError:
        raise WebhookVerificationError("the body is not JSON") from None
