"""Project operations: vacuum, the read-only switch, quotas, suspend/resume by an instance admin.

Vacuum runs on the project's own admin role (tables are the tenant's: their indexes and
triggers may call tenant functions). Quotas gather three limits in one place: the database-size
cap (`fluxbase.projects.db_quota_bytes`, enforced by `fluxbase_guard.check_db_quota` before
tenant COMMITs, see `services.quota`), the storage quota (`fluxbase.storage_limits`, enforced
by storage) and the request rate limit (`fluxbase.projects.rate_limit_*`, per API process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from fluxbase.config import Settings
from fluxbase.db.quoting import quote_ident
from fluxbase.errors import InsufficientPermissions, ValidationError
from fluxbase.security.roles import schema_name
from fluxbase.services.access import Principal, Project, load_project
from fluxbase.services.clusters import ClusterPools, mirror_project
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.session import admin_session

SIZE_SQL = "SELECT fluxbase_guard.schema_size($1)"


@dataclass(frozen=True)
class VacuumReport:
    tables: int
    size_before: int
    size_after: int
    duration_ms: int


async def vacuum(
    db: asyncpg.Pool, pools: TenantPools, project_id: str, acquire_timeout_s: float
) -> VacuumReport:
    """VACUUM (ANALYZE) every table and materialized view of the project schema, as its admin role."""
    started = time.perf_counter()
    async with admin_session(pools, project_id, acquire_timeout_s, begin=None) as conn:
        before = int(await db.fetchval(SIZE_SQL, project_id))
        tables = await conn.fetch(
            """SELECT c.relname FROM pg_class c
               WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $1)
                 AND c.relkind IN ('r', 'm')
               ORDER BY c.relname""",
            schema_name(project_id),
        )
        schema = quote_ident(schema_name(project_id))
        for row in tables:
            # VACUUM cannot run inside a transaction block; each table is its own command.
            await conn.execute(f"VACUUM (ANALYZE) {schema}.{quote_ident(row['relname'])}")
    after = int(await db.fetchval(SIZE_SQL, project_id))
    return VacuumReport(len(tables), before, after, round((time.perf_counter() - started) * 1000))


async def set_read_only(db: asyncpg.Pool, project_id: str, read_only: bool) -> Project:
    row = await db.fetchrow(
        "UPDATE fluxbase.projects SET read_only = $2 WHERE id = $1 RETURNING *", project_id, read_only
    )
    assert row is not None
    return Project.from_row(row)


def require_instance_admin(principal: Principal) -> None:
    if principal.user is None or not principal.user.is_instance_admin:
        raise InsufficientPermissions("Only an instance admin (dashboard session) can do this.")


async def set_status(db: asyncpg.Pool, project_id: str, status: str) -> Project:
    await load_project(db, project_id)
    row = await db.fetchrow(
        "UPDATE fluxbase.projects SET status = $2 WHERE id = $1 RETURNING *", project_id, status
    )
    assert row is not None
    return Project.from_row(row)


@dataclass(frozen=True)
class Quotas:
    database_bytes: int | None
    database_used: int
    storage_bytes: int
    storage_used: int
    max_file_size: int
    requests: int
    window_s: int

    def out(self) -> dict[str, Any]:
        return {
            "databaseBytes": self.database_bytes,
            "databaseUsedBytes": self.database_used,
            "storageBytes": self.storage_bytes,
            "storageUsedBytes": self.storage_used,
            "maxFileSize": self.max_file_size,
            "rateLimitRequests": self.requests,
            "rateLimitWindowSeconds": self.window_s,
        }


async def get_quotas(db: asyncpg.Pool | asyncpg.Connection, settings: Settings, project_id: str) -> Quotas:
    row = await db.fetchrow(
        """SELECT p.db_quota_bytes,
                  fluxbase_guard.schema_size(p.id) + fluxbase_guard.outbox_bytes(p.id) AS db_used,
                  l.quota_bytes, l.max_file_size,
                  (SELECT coalesce(sum(o.size), 0)::bigint FROM fluxbase.objects o
                    WHERE o.project_id = p.id) AS storage_used,
                  p.rate_limit_requests, p.rate_limit_window_s
           FROM fluxbase.projects p
           LEFT JOIN fluxbase.storage_limits l ON l.project_id = p.id
           WHERE p.id = $1""",
        project_id,
    )
    assert row is not None
    return Quotas(
        row["db_quota_bytes"],
        int(row["db_used"]),
        row["quota_bytes"] or settings.storage.quota_bytes,
        int(row["storage_used"]),
        row["max_file_size"] or settings.storage.max_file_size,
        row["rate_limit_requests"] or settings.tenant.rate_limit_requests,
        row["rate_limit_window_s"] or settings.tenant.rate_limit_window_s,
    )


_UNSET: Any = object()


def _limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"{name} must be a positive integer or null (no override).")
    return value


async def set_quotas(
    db: asyncpg.Pool,
    settings: Settings,
    project_id: str,
    changes: dict[str, Any],
    cluster_pools: ClusterPools | None = None,
) -> Quotas:
    """Apply the given fields (absent: unchanged; null: back to the instance default); a project
    on a registered cluster gets its database quota mirrored there (`clusters.mirror_project`)."""
    known = {"databaseBytes", "storageBytes", "maxFileSize", "rateLimitRequests", "rateLimitWindowSeconds"}
    unknown = set(changes) - known
    if unknown:
        raise ValidationError(f"unknown quota field(s): {', '.join(sorted(unknown))}.")
    vals = {k: _limit(v, k) for k, v in changes.items()}
    await load_project(db, project_id)
    async with db.acquire() as conn, conn.transaction():
        if "databaseBytes" in vals:
            await conn.execute(
                "UPDATE fluxbase.projects SET db_quota_bytes = $2 WHERE id = $1",
                project_id,
                vals["databaseBytes"],
            )
        for field, column in (("storageBytes", "quota_bytes"), ("maxFileSize", "max_file_size")):
            if field in vals:
                await conn.execute(
                    f"""INSERT INTO fluxbase.storage_limits (project_id, {column}) VALUES ($1, $2)
                        ON CONFLICT (project_id) DO UPDATE SET {column} = $2, updated_at = now()""",
                    project_id,
                    vals[field],
                )
        if "rateLimitRequests" in vals or "rateLimitWindowSeconds" in vals:
            requests = vals.get("rateLimitRequests")
            window = vals.get("rateLimitWindowSeconds") or (
                settings.tenant.rate_limit_window_s if requests else None
            )
            await conn.execute(
                """UPDATE fluxbase.projects SET rate_limit_requests = $2, rate_limit_window_s = $3
                   WHERE id = $1""",
                project_id,
                requests,
                window,
            )
        quotas = await get_quotas(conn, settings, project_id)
    if "databaseBytes" in vals:
        await mirror_project(db, cluster_pools, project_id)
    return quotas


@dataclass(frozen=True)
class InstanceProject:
    """One project as an instance admin sees it: who owns it and how many members it has."""

    project: Project
    owner_email: str | None
    members: int


async def list_all_projects(
    db: asyncpg.Pool, limit: int = 100, after: str | None = None
) -> tuple[list[InstanceProject], str | None]:
    """Every project of the instance, newest first, a page at a time (the next page's cursor, or None)."""
    if not 1 <= limit <= 1000:
        raise ValidationError("limit must be between 1 and 1000.")
    rows = await db.fetch(
        """SELECT p.*, u.email AS owner_email,
                  (SELECT count(*) FROM fluxbase.project_members m WHERE m.project_id = p.id) AS members
           FROM fluxbase.projects p LEFT JOIN fluxbase.users u ON u.id = p.owner_id
           WHERE $2::text IS NULL
              OR (p.created_at, p.id) < (SELECT a.created_at, a.id FROM fluxbase.projects a WHERE a.id = $2)
           ORDER BY p.created_at DESC, p.id DESC
           LIMIT $1""",
        limit + 1,
        after,
    )
    page = [InstanceProject(Project.from_row(r), r["owner_email"], int(r["members"])) for r in rows[:limit]]
    return page, page[-1].project.id if len(rows) > limit else None
