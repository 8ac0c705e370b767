"""Projects: creation provisions a schema and roles; deletion removes everything of the project."""

from __future__ import annotations

import contextlib

import asyncpg

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.errors import ValidationError
from fluxbase.services import clusters
from fluxbase.services.access import Project
from fluxbase.tenancy import provision


def _check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ValidationError("name must be 1 to 100 characters.")
    return name


async def create_project(
    db: asyncpg.Pool,
    settings: Settings,
    owner_id: str,
    name: str,
    *,
    cluster_pools: clusters.ClusterPools | None = None,
    cluster_id: str | None = None,
) -> Project:
    """Insert the project, make the creator its first admin and provision schema + roles, atomically.

    The project goes to `cluster_id`, or to the cluster with the fewest projects
    (services.clusters.place). On a registered cluster the schema and roles are created there,
    with a mirror of the project row (what the tenant-side guards and the outbox reference), in a
    transaction committed just before the control plane's; if the latter fails, the cluster's
    side is dropped again."""
    name = _check_name(name)
    project_id = ids.project_id()
    provisioned_on: asyncpg.Pool | None = None
    try:
        async with db.acquire() as conn, conn.transaction():
            where = await clusters.place(conn, cluster_id) if cluster_pools is not None else clusters.DEFAULT
            row = await conn.fetchrow(
                """INSERT INTO fluxbase.projects (id, name, owner_id, cluster_id)
                   VALUES ($1, $2, $3, $4) RETURNING *""",
                project_id,
                name,
                owner_id,
                where,
            )
            await conn.execute(
                "INSERT INTO fluxbase.project_members (project_id, user_id, role) VALUES ($1, $2, 'admin')",
                project_id,
                owner_id,
            )
            if where == clusters.DEFAULT or cluster_pools is None:
                # The roles are made by the project's provisioner, committed before this
                # transaction (tenancy/buckets.py): dropped again if this one fails.
                provisioned_on = db
                await provision.provision_project(conn, project_id, settings)
            else:
                remote = await cluster_pools.pool(where)
                provisioned_on = remote
                async with remote.acquire() as rc, rc.transaction():
                    await rc.execute(
                        "INSERT INTO fluxbase.projects (id, name) VALUES ($1, $2)", project_id, name
                    )
                    await provision.provision_project(rc, project_id, settings)
    except BaseException:
        if provisioned_on is not None:
            with contextlib.suppress(Exception):
                await _drop_on(provisioned_on, project_id)
        raise
    assert row is not None
    return Project.from_row(row)


async def _drop_on(pool: asyncpg.Pool, project_id: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await provision.drop_project(conn, project_id)
        await conn.execute("DELETE FROM fluxbase.projects WHERE id = $1", project_id)


async def list_projects(db: asyncpg.Pool, user_id: str) -> list[tuple[Project, str]]:
    rows = await db.fetch(
        """SELECT p.*, m.role FROM fluxbase.projects p
           JOIN fluxbase.project_members m ON m.project_id = p.id AND m.user_id = $1
           ORDER BY p.created_at, p.id""",
        user_id,
    )
    return [(Project.from_row(r), r["role"]) for r in rows]


async def delete_project(
    db: asyncpg.Pool, project_id: str, cluster_pools: clusters.ClusterPools | None = None
) -> None:
    """Drop roles, schema and control-plane rows in one transaction (on a registered cluster, its
    side is dropped first, inside the control plane's transaction that holds the project row)."""
    async with db.acquire() as conn, conn.transaction():
        where = await conn.fetchval(
            "SELECT cluster_id FROM fluxbase.projects WHERE id = $1 FOR UPDATE", project_id
        )
        if where is None or where == clusters.DEFAULT or cluster_pools is None:
            await provision.drop_project(conn, project_id)
        else:
            await _drop_on(await cluster_pools.pool(where), project_id)
        await conn.execute("DELETE FROM fluxbase.projects WHERE id = $1", project_id)
