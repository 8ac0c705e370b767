"""Per-process application context, built at startup and injected into handlers."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from fluxbase.config import Settings
from fluxbase.ratelimit import SharedRateLimiter
from fluxbase.security import ssrf
from fluxbase.services.access import Authenticator
from fluxbase.services.clusters import ClusterPools
from fluxbase.services.identity import IdentityResolver
from fluxbase.services.quota import SizeCache
from fluxbase.storage.s3 import ObjectStore
from fluxbase.tenancy.pools import TenantPools
from fluxbase.webhooks.sender import Sender


@dataclass
class AppContext:
    settings: Settings
    db: asyncpg.Pool
    tenants: TenantPools
    store: ObjectStore
    auth: Authenticator
    identity: IdentityResolver
    limiter: SharedRateLimiter
    sizes: SizeCache = field(default_factory=SizeCache)
    _sender: Sender | None = None
    _clusters: ClusterPools | None = None

    def cluster_pools(self) -> ClusterPools:
        """The runtime role's pools on registered database clusters, made on first use."""
        if self._clusters is None:
            self._clusters = ClusterPools(self.settings, self.db)
        return self._clusters

    def webhook_sender(self) -> Sender:
        """The HTTP client for webhook test pings, made on first use."""
        if self._sender is None:
            self._sender = Sender(self.settings.webhooks, ssrf.Policy.of(self.settings))
        return self._sender

    async def close(self) -> None:
        if self._sender is not None:
            await self._sender.close()
        await self.tenants.close()
        if self._clusters is not None:
            await self._clusters.close()
        await self.store.close()
        await self.db.close()
