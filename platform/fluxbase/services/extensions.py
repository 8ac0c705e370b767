"""A project's PostgreSQL extensions: the instance's allow-list, and turning one on or off.

The extensions themselves are installed once per database at migration time (db/extensions.py);
turning one on for a project grants the project's roles USAGE on its schema. Both this module
and a tenant's own `CREATE EXTENSION` do that through the same definer functions (sql/0023),
on the project's admin connection, so the project is taken from the session user and nothing
here runs with more than the project's rights.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from fluxbase.errors import Conflict, NotFound, ProjectReadOnly, ValidationError
from fluxbase.services.access import Project
from fluxbase.tenancy import statements as classification
from fluxbase.tenancy.pools import TenantPools
from fluxbase.tenancy.session import admin_session


@dataclass(frozen=True)
class Extension:
    """One extension of the allow-list, as a project sees it."""

    name: str
    available: bool
    installed: bool
    version: str | None
    schema: str
    requires: list[str]
    reason: str
    unavailable_reason: str | None
    installed_at: datetime | None

    def out(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "available": self.available,
            "installed": self.installed,
            "version": self.version,
            "schema": self.schema,
            "requires": self.requires,
            "reason": self.reason,
            "unavailableReason": self.unavailable_reason,
            "installedAt": self.installed_at,
        }


_LIST_SQL = """
SELECT e.name, e.available, e.version, e.schema_name, e.requires, e.reason, e.unavailable_reason,
       p.installed_at
FROM fluxbase.extensions e
LEFT JOIN fluxbase.project_extensions p ON p.name = e.name AND p.project_id = $1
ORDER BY e.position, e.name
"""


async def list_extensions(db: asyncpg.Pool, project_id: str) -> list[Extension]:
    """Every extension of the allow-list: available on this server or not (and why), installed
    in the project or not."""
    return [
        Extension(
            r["name"],
            r["available"],
            r["installed_at"] is not None,
            r["version"],
            r["schema_name"],
            list(r["requires"]),
            r["reason"],
            r["unavailable_reason"],
            r["installed_at"],
        )
        for r in await db.fetch(_LIST_SQL, project_id)
    ]


async def installed(db: asyncpg.Pool, project_id: str) -> tuple[str, ...]:
    """The names installed in the project, those another one requires first."""
    rows = await db.fetch(
        """SELECT p.name FROM fluxbase.project_extensions p JOIN fluxbase.extensions e USING (name)
           WHERE p.project_id = $1 ORDER BY cardinality(e.requires), p.installed_at, p.name""",
        project_id,
    )
    return tuple(r["name"] for r in rows)


async def _get(db: asyncpg.Pool, project_id: str, name: str) -> Extension:
    for e in await list_extensions(db, project_id):
        if e.name == name:
            return e
    raise NotFound(f'Extension "{name}" is not on this instance\'s allow-list.')


async def install(
    db: asyncpg.Pool, pools: TenantPools, project: Project, name: str, acquire_timeout_s: float
) -> tuple[bool, Extension]:
    """Turn the extension on for the project (and those it requires): (newly installed, it)."""
    allowed = await list_extensions(db, project.id)
    names = ", ".join(e.name for e in allowed if e.available) or "none"
    known = next((e for e in allowed if e.name == name), None)
    if known is None or not known.available:
        why = f" ({known.unavailable_reason})" if known is not None and known.unavailable_reason else ""
        raise ValidationError(
            f'Extension "{name}" is not available{why}. Allowed on this instance: {names}.',
            extra={"allowed": [e.name for e in allowed if e.available]},
        )
    if known.installed:
        return False, known
    if project.read_only:
        raise ProjectReadOnly("The project is read-only.")
    op = classification.ExtensionOp(True, (name,), True, False)
    try:
        async with admin_session(pools, project.id, acquire_timeout_s) as conn:
            await conn.execute(op.call())
    except asyncpg.UniqueViolationError:
        return False, await _get(db, project.id, name)  # a concurrent install won the race
    return True, await _get(db, project.id, name)


async def remove(
    db: asyncpg.Pool, pools: TenantPools, project: Project, name: str, acquire_timeout_s: float
) -> Extension:
    """Turn the extension off for the project: refused (CONFLICT) while the project's objects or
    another installed extension use it."""
    ext = await _get(db, project.id, name)
    if not ext.installed:
        raise NotFound(f'Extension "{name}" is not installed in this project.')
    if project.read_only:
        raise ProjectReadOnly("The project is read-only.")
    op = classification.ExtensionOp(False, (name,), False, False)
    try:
        async with admin_session(pools, project.id, acquire_timeout_s) as conn:
            await conn.execute(op.call())
    except asyncpg.UndefinedObjectError:
        raise NotFound(f'Extension "{name}" is not installed in this project.') from None
    except asyncpg.DependentObjectsStillExistError as exc:
        detail = f" ({exc.detail})" if getattr(exc, "detail", None) else ""
        raise Conflict(f"{exc.args[0] if exc.args else exc}{detail}. Drop them first.") from None
    return await _get(db, project.id, name)
