"""Webhook secrets and signatures: the reference doc's header and the Standard Webhooks ones.

- `X-Fluxbase-Signature: sha256=<hex HMAC-SHA256(secret, body)>`, the secret's UTF-8 bytes as
  the key, so the doc's `webhook-handler.js` verifies it unchanged.
- `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256(key,
  "id.timestamp.body")>` (standardwebhooks.com). For a `whsec_<base64>` secret the key is the
  decoded bytes, as every Standard Webhooks library expects; for any other secret it is the
  secret's UTF-8 bytes (verify with the raw-bytes form of those libraries).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from fluxbase.errors import ValidationError

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def check_secret(secret: str) -> str:
    if not isinstance(secret, str) or not 16 <= len(secret) <= 256 or not secret.isprintable():
        raise ValidationError("secret must be 16 to 256 printable characters.")
    if secret.startswith(PREFIX):
        try:
            if len(base64.b64decode(secret[len(PREFIX) :], validate=True)) < 16:
                raise ValueError
        except (ValueError, binascii.Error):
            raise ValidationError("a whsec_ secret must be whsec_ and base64 of at least 16 bytes.") from None
    return secret


def standard_key(secret: str) -> bytes:
    if secret.startswith(PREFIX):
        return base64.b64decode(secret[len(PREFIX) :])
    return secret.encode()


def headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    doc_sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    signed = f"{message_id}.{timestamp}.".encode() + body
    std_sig = base64.b64encode(hmac.new(standard_key(secret), signed, hashlib.sha256).digest()).decode()
    return {
        "X-Fluxbase-Signature": f"sha256={doc_sig}",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{std_sig}",
    }
