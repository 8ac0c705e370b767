"""A member's data request as the API builds it: `TenantRequest` for the member's own SQL scope,
counted against the same rate limit, for `services.sql` and `services.data`."""

from __future__ import annotations

from fluxbase.http.context import AppContext
from fluxbase.http.controllers.sql import limits_of
from fluxbase.services.access import ProjectAccess
from fluxbase.tenancy.session import Identity, TenantRequest


async def tenant_request(ctx: AppContext, access: ProjectAccess, identity: Identity) -> TenantRequest:
    limit, window = access.rate_limit(ctx.settings)
    quota = await ctx.limiter.hit(access.principal.label, limit, window)
    return TenantRequest(
        project_id=access.project.id,
        scope=access.sql_scope,
        identity=identity,
        limits=limits_of(ctx),
        project_read_only=access.project.read_only,
        project_moving=access.project.moving,
        db_quota=access.project.db_quota,
        sizes=ctx.sizes,
        # Broadcasts from SQL spend the member's window as the API's requests do (sql/0042).
        broadcasts=quota.remaining if access.sql_scope != "read" else None,
    )


async def member_request(ctx: AppContext, access: ProjectAccess) -> TenantRequest:
    """The member acting as themself (no end user): what a session's REST data call runs as."""
    identity = await ctx.identity.identity(access, user_token=None, auth_uid=None)
    return await tenant_request(ctx, access, identity)
