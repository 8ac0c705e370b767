"""Projects: creation provisions a schema and roles; deletion removes everything of the project."""

from __future__ import annotations

import asyncpg

from fluxbase import ids
from fluxbase.config import Settings
from fluxbase.db import tenants
from fluxbase.errors import ValidationError
from fluxbase.services.access import Project


def _check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ValidationError("name must be 1 to 100 characters.")
    return name


async def create_project(db: asyncpg.Pool, settings: Settings, owner_id: str, name: str) -> Project:
    """Insert the project, make the creator its first admin and provision schema + roles, atomically."""
    name = _check_name(name)
    async with db.acquire() as conn, conn.transaction():
        project_id = ids.project_id()
        row = await conn.fetchrow(
            "INSERT INTO fluxbase.projects (id, name, owner_id) VALUES ($1, $2, $3) RETURNING *",
            project_id,
            name,
            owner_id,
        )
        await conn.execute(
            "INSERT INTO fluxbase.project_members (project_id, user_id, role) VALUES ($1, $2, 'admin')",
            project_id,
            owner_id,
        )
        await tenants.provision_project(conn, project_id, settings)
    assert row is not None
    return Project.from_row(row)


async def list_projects(db: asyncpg.Pool, user_id: str) -> list[tuple[Project, str]]:
    rows = await db.fetch(
        """SELECT p.*, m.role FROM fluxbase.projects p
           JOIN fluxbase.project_members m ON m.project_id = p.id AND m.user_id = $1
           ORDER BY p.created_at, p.id""",
        user_id,
    )
    return [(Project.from_row(r), r["role"]) for r in rows]


async def delete_project(db: asyncpg.Pool, project_id: str) -> None:
    """Drop roles, schema and control-plane rows in one transaction."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM fluxbase.projects WHERE id = $1 FOR UPDATE", project_id)
        await tenants.drop_project(conn, project_id)
        await conn.execute("DELETE FROM fluxbase.projects WHERE id = $1", project_id)
