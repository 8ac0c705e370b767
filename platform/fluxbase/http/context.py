"""Per-process application context, built at startup and injected into handlers."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from fluxbase.config import Settings
from fluxbase.db.tenants import TenantPools
from fluxbase.ratelimit import RateLimiter
from fluxbase.services.access import Authenticator
from fluxbase.services.identity import IdentityResolver
from fluxbase.storage.s3 import ObjectStore


@dataclass
class AppContext:
    settings: Settings
    db: asyncpg.Pool
    tenants: TenantPools
    store: ObjectStore
    auth: Authenticator
    identity: IdentityResolver
    limiter: RateLimiter = field(default_factory=RateLimiter)
