"""Hostile review 14: the tenant groups (branch acl, issue 19) and one server one cluster with
moves of projects that have end users or extensions (branch sysid), attacked through the real API
on the real stack with the source in hand.

Each test asserts the SECURE behaviour. A hole still open is marked `xfail(strict=True)`; the
mark goes with the fix.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from fluxbase.db.privileges import GROUP_PRIVILEGES, tenant_group
from support import Api, bearer


async def _ok(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    assert r.status_code == 200 and r.json()["success"], (query, r.text)
    return dict(r.json())


async def _refused(api: Api, key: str, pid: str, query: str) -> dict[str, Any]:
    r = await api.sql(key, pid, query)
    assert r.status_code < 500, (query, r.text)
    assert not r.json().get("success"), (query, r.text)
    return dict(r.json())


async def _roles_of(control_db: asyncpg.Pool, pid: str) -> list[str]:
    return [
        r[0]
        for r in await control_db.fetch("SELECT rolname FROM pg_roles WHERE rolname LIKE $1", f"p_{pid}_%")
    ]


# -- 1. another tenant's grant to a project's role -------------------------------------------------


async def test_another_tenant_cannot_keep_a_project_from_being_deleted(
    api: Api, control_db: asyncpg.Pool
) -> None:
    """Tenant A grants its own objects to tenant B's roles (any owner may grant to any role) and
    names them in policies and default privileges. B's owner deletes B: before the fix the
    deletion answered 500 INTERNAL_ERROR and B's schema and roles stayed (DROP OWNED BY, run as
    the dying role, revokes only what that role could revoke itself: "permission denied for
    column tableoid of relation bait_seq", and DROP ROLE fails on the entries left). Any tenant
    of the database could keep any other project from being deleted, and a move from removing
    the source's copy. Now the grants are taken back by their grantor, and the attacker's own
    objects are otherwise untouched."""
    _, atk_token = await api.new_user()
    atk = await api.new_project(atk_token, "attacker")
    akey = await api.new_key(atk_token, atk, "admin")
    _, vic_token = await api.new_user()
    vic = await api.new_project(vic_token, "victim")
    roles = f"p_{vic}_ro, p_{vic}_admin, p_{vic}_rw, p_{vic}_rt"
    for q in (
        "CREATE TABLE bait (v int)",
        f"GRANT SELECT ON bait TO {roles}",
        f"GRANT UPDATE (v) ON bait TO {roles}",
        "CREATE SEQUENCE bait_seq",
        f"GRANT USAGE ON SEQUENCE bait_seq TO {roles}",
        "CREATE FUNCTION bait_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        f"GRANT EXECUTE ON FUNCTION bait_fn() TO {roles}",
        "CREATE TYPE bait_t AS ENUM ('a')",
        f"GRANT USAGE ON TYPE bait_t TO {roles}",
        f"GRANT USAGE ON SCHEMA p_{atk} TO {roles}",
        "ALTER TABLE bait ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY bait_pol ON bait FOR SELECT TO {roles} USING (true)",
        f"CREATE POLICY bait_mixed ON bait FOR SELECT TO p_{atk}_ro, p_{vic}_ro USING (v > 0)",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA p_{atk} GRANT SELECT ON TABLES TO {roles}",
    ):
        await _ok(api, akey, atk, q)
    r = await api.http.delete(f"/api/projects/{vic}", headers=bearer(vic_token))
    assert r.status_code < 500, r.text
    assert r.status_code in (200, 204), r.text
    assert await _roles_of(control_db, vic) == []
    assert not await control_db.fetchval("SELECT to_regnamespace($1) IS NOT NULL", f"p_{vic}")
    # The attacker's objects stay; its policy naming one of its roles too, without the victim's.
    pols = {
        r["polname"]: r["roles"]
        for r in await control_db.fetch(
            "SELECT polname, polroles::regrole[]::text[] AS roles FROM pg_policy WHERE polrelid = $1::regclass",
            f"p_{atk}.bait",
        )
    }
    assert pols == {"bait_mixed": [f"p_{atk}_ro"]}, pols
    await _ok(api, akey, atk, "SELECT bait_fn(), count(*) FROM bait")
