"""Fluxbase client: SQL, records, storage, end-user auth, webhooks and exactly-once realtime."""

from fluxbase_client._client import AsyncFluxbase, Query
from fluxbase_client._models import Session, SqlResult
from fluxbase_client._sync import Fluxbase
from fluxbase_client.errors import (
    AuthError,
    ConnectionFailed,
    FluxbaseError,
    NotFoundError,
    PermissionDenied,
    RateLimitError,
    SqlError,
    UnavailableError,
    WebhookVerificationError,
)
from fluxbase_client.realtime import Channel, Realtime
from fluxbase_client.webhooks import verify

__all__ = [
    "AsyncFluxbase",
    "AuthError",
    "Channel",
    "ConnectionFailed",
    "Fluxbase",
    "FluxbaseError",
    "NotFoundError",
    "PermissionDenied",
    "Query",
    "RateLimitError",
    "Realtime",
    "Session",
    "SqlError",
    "SqlResult",
    "UnavailableError",
    "WebhookVerificationError",
    "verify",
]
__version__ = "0.1.0"
